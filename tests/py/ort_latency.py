"""Measure onnxruntime (CPU) latency of one or more models on the same inputs, and count the
ops onnxruntime actually runs after its own graph optimizations.

    ort_latency.py MODEL [MODEL...] INPUTS.npz [--runs N] [--warmup N] [--threads N]
                   [--optimized-dir DIR]

Each model runs with onnxruntime's default session options (all graph optimizations) and
`intra_op_num_threads = 1`, `inter_op_num_threads = 1` unless --threads says otherwise. After
--warmup runs (default 5), --runs timed runs (default 50) are made, and the median, the
minimum and the 90th percentile in milliseconds are reported. The models are timed
interleaved (one run of each in turn), so a machine whose load changes during the measurement
affects each model alike.

The model onnxruntime optimized is saved (`so.optimized_model_filepath`) under
--optimized-dir (default: a temporary folder) and its op counts are reported, so one can see
which QDQ node units onnxruntime fused (QLinearConv, QLinearMatMul, ...) and which
DequantizeLinear / Conv / MatMul nodes it left in float.

Inputs are the arrays of INPUTS.npz named after each model's graph inputs (other keys are
ignored).

Prints one JSON object:
{"models": [{"path", "median_ms", "min_ms", "p90_ms", "runs", "threads",
             "optimized_model", "optimized_op_counts": {op: n}}]}

Exit codes: 0 success, 1 onnxruntime failed, 2 bad arguments or inputs.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort


def session(path, threads, optimized):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def op_counts(path):
    m = onnx.load(path, load_external_data=False)
    c = collections.Counter(
        (n.domain + ":" if n.domain not in ("", "ai.onnx") else "") + n.op_type
        for n in m.graph.node
    )
    return dict(sorted(c.items()))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--optimized-dir", default=None)
    a = ap.parse_args(argv)
    if len(a.paths) < 2:
        print("need at least one MODEL and INPUTS.npz", file=sys.stderr)
        return 2
    models, inputs = a.paths[:-1], a.paths[-1]
    data = dict(np.load(inputs))
    out_dir = a.optimized_dir or tempfile.mkdtemp(prefix="ort_latency_")
    os.makedirs(out_dir, exist_ok=True)
    runs = []
    for k, path in enumerate(models):
        optimized = os.path.join(out_dir, f"{k}_" + os.path.basename(path) + ".ort-optimized.onnx")
        try:
            sess = session(path, a.threads, optimized)
        except Exception as e:
            print(f"onnxruntime cannot load {path}: {e}", file=sys.stderr)
            return 1
        feed = {}
        for i in sess.get_inputs():
            if i.name not in data:
                print(f"{inputs} has no array for graph input {i.name!r} of {path}",
                      file=sys.stderr)
                return 2
            feed[i.name] = data[i.name]
        runs.append((path, sess, feed, optimized, []))
    try:
        for _ in range(a.warmup):
            for _, sess, feed, _, _ in runs:
                sess.run(None, feed)
        for _ in range(a.runs):
            for _, sess, feed, _, times in runs:
                t = time.perf_counter()
                sess.run(None, feed)
                times.append((time.perf_counter() - t) * 1e3)
    except Exception as e:
        print(f"onnxruntime failed: {e}", file=sys.stderr)
        return 1
    rows = []
    for path, _, _, optimized, times in runs:
        t = np.array(times)
        rows.append({
            "path": path,
            "median_ms": float(np.median(t)),
            "min_ms": float(t.min()),
            "p90_ms": float(np.percentile(t, 90)),
            "runs": a.runs,
            "threads": a.threads,
            "optimized_model": optimized,
            "optimized_op_counts": op_counts(optimized),
        })
    print(json.dumps({"models": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
