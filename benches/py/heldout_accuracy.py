"""Accuracy of quantized models on held-out inputs in onnxruntime, for benches/quantize.rs.

    heldout_accuracy.py ORIGINAL SAMPLES_DIR CANDIDATE...

SAMPLES_DIR holds one .npz per input sample (keys = graph input names, other keys ignored), as
tests/py/make_samples.py writes them. ORIGINAL runs in onnxruntime with
graph_optimization_level = ORT_DISABLE_ALL (the fp32 reference, nothing fused); each CANDIDATE
runs with the default session options, as it deploys (QDQ units fused into int8 kernels); both
on CPU with one thread. Every graph output of each candidate is compared with the original's,
as float64:
  cosine      over all samples at once (the outputs of every sample concatenated);
  min_cosine  the lowest cosine of any single sample;
  max_abs     the largest absolute difference over all samples.

Prints one JSON object: {"samples": n, "outputs": [names], "candidates": [{"path", "error",
"int8_tensors", "outputs": [{"name", "elements", "cosine", "min_cosine", "max_abs"}]}]} in
argument order. A candidate that does not load or run has its first error line in "error" and
no outputs. int8_tensors counts int8/uint8 initializers and Constant values in all graphs.

Exit codes: 0 ok (failed candidates included), 1 the original does not run, 2 bad arguments.
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort

from accuracy import first_line, int8_tensors


def session(path, disable_opt):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if disable_opt:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_all(path, samples, disable_opt):
    sess = session(path, disable_opt)
    names = [o.name for o in sess.get_outputs()]
    runs = []
    for s in samples:
        feed = {i.name: s[i.name] for i in sess.get_inputs()}
        runs.append([np.asarray(o, dtype=np.float64).ravel() for o in sess.run(None, feed)])
    return names, runs


def cosine(a, b):
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    original, sample_dir, *candidates = argv
    files = sorted(f for f in os.listdir(sample_dir) if f.endswith(".npz"))
    if not files:
        print(f"no .npz file in {sample_dir}", file=sys.stderr)
        return 2
    samples = []
    for f in files:
        with np.load(os.path.join(sample_dir, f)) as z:
            samples.append({k: z[k] for k in z.files})
    try:
        names, ref = run_all(original, samples, True)
    except Exception as e:
        print(f"onnxruntime cannot run {original}: {e}", file=sys.stderr)
        return 1
    results = []
    for path in candidates:
        r = {"path": path, "error": None, "int8_tensors": None, "outputs": []}
        try:
            r["int8_tensors"] = int8_tensors(path)
            got_names, got = run_all(path, samples, False)
            if got_names != names:
                raise ValueError(f"outputs {got_names}, original {names}")
            for k, name in enumerate(names):
                per = [(a[k], b[k]) for a, b in zip(ref, got)]
                for a, b in per:
                    if a.shape != b.shape:
                        raise ValueError(f"{name}: {b.size} elements, original {a.size}")
                a = np.concatenate([p[0] for p in per])
                b = np.concatenate([p[1] for p in per])
                r["outputs"].append({
                    "name": name,
                    "elements": int(per[0][0].size),
                    "cosine": cosine(a, b),
                    "min_cosine": min(cosine(x, y) for x, y in per),
                    "max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0,
                })
        except Exception as e:
            r["error"] = first_line(e)
            r["outputs"] = []
        results.append(r)
    print(json.dumps({"samples": len(samples), "outputs": names, "candidates": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
