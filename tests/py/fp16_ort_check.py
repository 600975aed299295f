"""Checks a float16-converted model with onnx and onnxruntime against a reference bundle.

Usage: fp16_ort_check.py MODEL BUNDLE.npz

1. `onnx.checker.check_model(MODEL, full_check=True)` (type and shape inference included).
2. onnxruntime (CPU) loads MODEL twice, with all graph optimizations and with none, and runs it
   on the bundle's inputs (keys = graph input names; each array is cast to the input's declared
   element type, so a model whose interface became float16 is fed float16).
3. For every graph output present in the bundle with a float reference, the cosine similarity
   between the output (as float64) and the reference.

Prints one JSON object: {"checker": "ok", "outputs": {LEVEL: {OUTPUT: cosine}}} with LEVEL
`all` and `none`. Exit codes: 0 success, 1 the checker or onnxruntime rejected the model
(message on stderr), 2 usage error.
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def cosine(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0 or not np.isfinite(na) or not np.isfinite(nb):
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    model_path, bundle_path = sys.argv[1], sys.argv[2]
    try:
        onnx.checker.check_model(model_path, full_check=True)
    except Exception as e:  # noqa: BLE001 - any checker failure is the answer
        print(f"onnx.checker rejected {model_path}: {e}", file=sys.stderr)
        return 1
    bundle = np.load(bundle_path)
    result = {"checker": "ok", "outputs": {}}
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    for label, level in levels.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        try:
            sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            print(f"onnxruntime could not load {model_path} ({label}): {e}", file=sys.stderr)
            return 1
        feeds = {}
        for i in sess.get_inputs():
            arr = bundle[i.name]
            if i.type == "tensor(float16)":
                arr = arr.astype(np.float16)
            elif i.type == "tensor(float)":
                arr = arr.astype(np.float32)
            feeds[i.name] = arr
        try:
            outs = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            print(f"onnxruntime could not run {model_path} ({label}): {e}", file=sys.stderr)
            return 1
        cos = {}
        for meta, value in zip(sess.get_outputs(), outs):
            if meta.name in bundle.files and np.issubdtype(bundle[meta.name].dtype, np.floating):
                cos[meta.name] = cosine(value, bundle[meta.name])
        result["outputs"][label] = cos
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
