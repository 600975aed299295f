"""Accuracy of quantized models in onnxruntime, for benches/optimize.rs.

    accuracy.py ORIGINAL BUNDLE.npz CANDIDATE...

Runs ORIGINAL and each CANDIDATE in onnxruntime (CPU, graph_optimization_level =
ORT_DISABLE_ALL, one thread) on the graph inputs in BUNDLE.npz (other keys ignored) and
compares the first graph output of each candidate with the original's, as float64.

Prints one JSON object: {"output": name of the original's first output, "candidates":
[{"path", "cosine", "max_abs", "elements", "int8_tensors", "error"}]} in argument order.
cosine is null when a run fails (error then holds its first line); elements is the size of the
first output (with 1 element, cosine only tells its sign); int8_tensors counts int8/uint8
initializers and Constant values in all graphs (0: the tool stores no int8 weight).

Exit codes: 0 ok (failed candidates included), 1 the original does not run, 2 bad arguments.
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def run(path, bundle):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {i.name: bundle[i.name] for i in sess.get_inputs()}
    return sess.get_outputs()[0].name, sess.run(None, feed)[0]


def int8_tensors(path):
    model = onnx.load(path, load_external_data=False)
    small = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    count = 0

    def walk(graph):
        nonlocal count
        count += sum(t.data_type in small for t in graph.initializer)
        for node in graph.node:
            for a in node.attribute:
                if node.op_type == "Constant" and a.HasField("t"):
                    count += a.t.data_type in small
                if a.HasField("g"):
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(model.graph)
    return count


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    original, bundle_path, *candidates = argv
    bundle = np.load(bundle_path)
    try:
        name, ref = run(original, bundle)
    except Exception as e:
        print(f"onnxruntime cannot run {original}: {e}", file=sys.stderr)
        return 1
    ref = np.asarray(ref, dtype=np.float64).ravel()
    results = []
    for path in candidates:
        r = {"path": path, "cosine": None, "max_abs": None, "elements": int(ref.size),
             "int8_tensors": None, "error": None}
        try:
            r["int8_tensors"] = int8_tensors(path)
            _, out = run(path, bundle)
            out = np.asarray(out, dtype=np.float64).ravel()
            if out.shape != ref.shape:
                raise ValueError(f"first output has {out.size} elements, original {ref.size}")
            denom = np.linalg.norm(ref) * np.linalg.norm(out)
            r["cosine"] = float(ref @ out / denom) if denom > 0 else float(np.array_equal(ref, out))
            r["max_abs"] = float(np.max(np.abs(ref - out))) if ref.size else 0.0
        except Exception as e:
            r["error"] = first_line(e)
        results.append(r)
    print(json.dumps({"output": name, "candidates": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
