"""Turn one backend test case's input_N.pb files into an npz keyed by graph input name.

    pb_to_npz.py DIR MODEL OUT.npz
    pb_to_npz.py --batch CASES.tsv     (lines "DIR<TAB>MODEL<TAB>OUT.npz"; prints one JSON
                                        object per line: {"out", "code", "message"})

input_N.pb (a serialized TensorProto) becomes the array for the model's N-th graph input
that is not an initializer. When DIR does not exist (the light_* cases ship no inputs),
inputs are drawn from a seeded normal distribution with the declared shapes (symbolic dims
= 1), so reruns give the same file.

Exit codes: 0 written, 2 bad input, 3 an input is not a plain numeric tensor (a sequence,
optional or map, or a string tensor, which onnxopt's npz reader does not take); --batch exits
with the largest code of its cases.
"""

import glob
import json
import os
import re
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Unsupported(Exception):
    """An input that npz cannot carry for onnxopt (exit 3)."""


class Bad(Exception):
    """Inconsistent test data (exit 2)."""


def convert(data_dir, model_path, out):
    model = onnx.load(model_path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    arrays = {}
    if os.path.isdir(data_dir):
        files = glob.glob(os.path.join(data_dir, "input_*.pb"))
        files.sort(key=lambda p: int(re.search(r"input_(\d+)\.pb$", p).group(1)))
        for f in files:
            n = int(re.search(r"input_(\d+)\.pb$", f).group(1))
            if n >= len(inputs):
                raise Bad(f"{f}: model has only {len(inputs)} graph inputs")
            vi = inputs[n]
            if not vi.type.HasField("tensor_type"):
                raise Unsupported(f"{f}: input {vi.name!r} is not a tensor")
            if vi.type.tensor_type.elem_type == onnx.TensorProto.STRING:
                raise Unsupported(f"{f}: input {vi.name!r} is a string tensor")
            t = onnx.TensorProto()
            with open(f, "rb") as fh:
                t.ParseFromString(fh.read())
            arrays[vi.name] = numpy_helper.to_array(t)
    else:
        rng = np.random.default_rng(0)
        for vi in inputs:
            if not vi.type.HasField("tensor_type"):
                raise Unsupported(f"input {vi.name!r} is not a tensor")
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
            dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            arrays[vi.name] = rng.standard_normal(shape).astype(dt)
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise Bad(f"{data_dir}: no data for inputs {missing}")
    np.savez(out, **arrays)


def run(data_dir, model_path, out):
    """(exit code, message) for one case."""
    try:
        convert(data_dir, model_path, out)
        return 0, ""
    except Unsupported as e:
        return 3, str(e)
    except Exception as e:
        return 2, f"{type(e).__name__}: {e}"


def main(argv):
    if len(argv) == 2 and argv[0] == "--batch":
        worst = 0
        with open(argv[1]) as f:
            for line in f:
                if not line.strip():
                    continue
                data_dir, model_path, out = line.rstrip("\n").split("\t")
                code, msg = run(data_dir, model_path, out)
                worst = max(worst, code)
                print(json.dumps({"out": out, "code": code, "message": msg}), flush=True)
        return worst
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    code, msg = run(*argv)
    if msg:
        print(msg, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
