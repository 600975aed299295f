"""Turn one backend test case's input_N.pb files into an npz keyed by graph input name.

    pb_to_npz.py DIR MODEL OUT.npz

input_N.pb (a serialized TensorProto) becomes the array for the model's N-th graph input
that is not an initializer. When DIR does not exist (the light_* cases ship no inputs),
inputs are drawn from a seeded normal distribution with the declared shapes (symbolic dims
= 1), so reruns give the same file.

Exit codes: 0 written, 2 bad input, 3 an input is not a plain tensor (sequence/optional/map)
and cannot be expressed in npz.
"""

import glob
import os
import re
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    data_dir, model_path, out = argv
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
                print(f"{f}: model has only {len(inputs)} graph inputs", file=sys.stderr)
                return 2
            vi = inputs[n]
            if not vi.type.HasField("tensor_type"):
                print(f"{f}: input {vi.name!r} is not a tensor", file=sys.stderr)
                return 3
            t = onnx.TensorProto()
            with open(f, "rb") as fh:
                t.ParseFromString(fh.read())
            arrays[vi.name] = numpy_helper.to_array(t)
    else:
        rng = np.random.default_rng(0)
        for vi in inputs:
            if not vi.type.HasField("tensor_type"):
                print(f"input {vi.name!r} is not a tensor", file=sys.stderr)
                return 3
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
            dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            arrays[vi.name] = rng.standard_normal(shape).astype(dt)
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        print(f"{data_dir}: no data for inputs {missing}", file=sys.stderr)
        return 2
    np.savez(out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
