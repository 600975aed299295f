"""Run a reference and a candidate model in onnxruntime (CPU) on the same inputs and print the
cosine similarity of every output as JSON.

    ort_cosine.py REFERENCE CANDIDATE INPUTS.npz

The reference runs with graph_optimization_level = ORT_DISABLE_ALL (onnxruntime's own fusions
would hide a broken rewrite), the candidate with onnxruntime's default optimizations (how it is
deployed). One intra-op thread. Inputs are the arrays of INPUTS.npz named after the
reference's graph inputs (other keys, e.g. reference outputs, are ignored); the candidate gets
the ones it has.

Prints one JSON object:
{"outputs": [{"name", "dtype", "shape", "cosine", "max_abs", "finite"}]}
one entry per reference output, in order: cosine (float64, 1.0 when both are all zero) and
max_abs for float outputs, null otherwise; "equal" (exact equality) for every output;
"finite" is false when the candidate output holds NaN or infinity.

Exit codes: 0 both ran, 1 onnxruntime failed on either model or a reference output is missing
from the candidate (message on stderr), 2 bad arguments or inputs.
"""

import json
import sys

import numpy as np
import onnxruntime as ort


def session(path, disable):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if disable:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(path, disable, data, what):
    try:
        sess = session(path, disable)
    except Exception as e:
        raise RuntimeError(f"onnxruntime cannot load the {what} {path}: {e}")
    feed = {}
    for i in sess.get_inputs():
        if i.name not in data:
            print(f"the npz has no array for graph input {i.name!r} of {path} "
                  f"(has {sorted(data.keys())})", file=sys.stderr)
            sys.exit(2)
        feed[i.name] = data[i.name]
    try:
        results = sess.run(None, feed)
    except Exception as e:
        raise RuntimeError(f"onnxruntime failed on the {what} {path}: {e}")
    return dict(zip([o.name for o in sess.get_outputs()], results)), [
        o.name for o in sess.get_outputs()]


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    reference, candidate, inputs = argv
    data = dict(np.load(inputs))
    try:
        ref, order = run(reference, True, data, "reference")
        cand, _ = run(candidate, False, data, "candidate")
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return 1
    rows = []
    for name in order:
        if name not in cand:
            print(f"the candidate has no output {name!r} (has {sorted(cand)})", file=sys.stderr)
            return 1
        a, b = np.asarray(ref[name]), np.asarray(cand[name])
        row = {"name": name, "dtype": str(b.dtype), "shape": list(b.shape),
               "cosine": None, "max_abs": None,
               "equal": bool(a.shape == b.shape and np.array_equal(a, b)), "finite": True}
        if np.issubdtype(a.dtype, np.floating) and a.shape == b.shape:
            x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            row["finite"] = bool(np.all(np.isfinite(y)))
            nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
            if nx == 0.0 and ny == 0.0:
                row["cosine"] = 1.0
            elif nx == 0.0 or ny == 0.0:
                row["cosine"] = 0.0
            else:
                row["cosine"] = float(np.dot(x, y) / (nx * ny))
            row["max_abs"] = float(np.max(np.abs(x - y))) if x.size else 0.0
        rows.append(row)
    print(json.dumps({"outputs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
