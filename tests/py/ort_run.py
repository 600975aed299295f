"""Run a model in onnxruntime (CPU) on the graph inputs found in an npz.

    ort_run.py MODEL INPUTS.npz OUT.npz [--disable-opt]

Keys of INPUTS.npz that are not graph inputs (e.g. reference outputs) are ignored; a graph
input missing from the npz is an error. OUT.npz gets one array per graph output, keyed by
output name. --disable-opt sets graph_optimization_level = ORT_DISABLE_ALL (the reference
setting: onnxruntime's own fusions would hide a broken rewrite). One intra-op thread, so
results do not depend on the machine's load.

Exit codes: 0 ok, 1 onnxruntime failed, 2 bad arguments or inputs.
"""

import sys

import numpy as np
import onnxruntime as ort


def main(argv):
    disable = "--disable-opt" in argv
    args = [a for a in argv if a != "--disable-opt"]
    if len(args) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    model, inputs, out = args
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if disable:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        print(f"onnxruntime cannot load {model}: {e}", file=sys.stderr)
        return 1
    data = np.load(inputs)
    feed = {}
    for i in sess.get_inputs():
        if i.name not in data:
            print(f"{inputs} has no array for graph input {i.name!r} (has {sorted(data.keys())})",
                  file=sys.stderr)
            return 2
        feed[i.name] = data[i.name]
    try:
        results = sess.run(None, feed)
    except Exception as e:
        print(f"onnxruntime failed on {model}: {e}", file=sys.stderr)
        return 1
    names = [o.name for o in sess.get_outputs()]
    np.savez(out, **dict(zip(names, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
