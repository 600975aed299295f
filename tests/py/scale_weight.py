"""Write a copy of a model with one weight multiplied by a factor: a model that is known to
compute something else, for the tests of `onnxopt compare`.

    scale_weight.py IN OUT [--factor F]

The weight is input 1 of the last Conv, ConvTranspose, Gemm or MatMul node of the main graph
(in node order) whose input 1 is a float initializer or the output of a Constant node with a
`value` tensor; F defaults to 2. Everything else is written back unchanged. Prints one JSON
object: {"node": name, "op": op_type, "weight": tensor name, "factor": F}.

Exit codes: 0 written, 1 no such weight, 2 bad arguments.
"""

import json
import sys

import numpy as np
import onnx
from onnx import numpy_helper

OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def main(argv):
    factor = 2.0
    if "--factor" in argv:
        i = argv.index("--factor")
        try:
            factor = float(argv[i + 1])
        except (IndexError, ValueError):
            print(__doc__, file=sys.stderr)
            return 2
        argv = argv[:i] + argv[i + 2:]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = argv
    model = onnx.load(src)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    constants = {}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and a.HasField("t"):
                    constants[n.output[0]] = a.t
    for n in reversed(g.node):
        if n.op_type not in OPS or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        t = inits.get(n.input[1]) or constants.get(n.input[1])
        if t is None:
            continue
        arr = numpy_helper.to_array(t)
        if not np.issubdtype(arr.dtype, np.floating):
            continue
        new = numpy_helper.from_array((arr * factor).astype(arr.dtype), t.name)
        t.CopyFrom(new)
        onnx.save(model, dst)
        print(json.dumps({"node": n.name, "op": n.op_type, "weight": n.input[1],
                          "factor": factor}))
        return 0
    print(f"{src}: no Conv, ConvTranspose, Gemm or MatMul reads a float weight", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
