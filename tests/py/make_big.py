"""Write the synthetic large model for benches/io.rs.

    make_big.py OUT [--mib N]

A chain Y = X @ W0 @ W1 ... @ W{k-1} of MatMul nodes with float32 [2048, 2048] initializers
of 16 MiB each, k = N / 16 (default N = 1024: 64 weights, 1 GiB of parameters). Weights are
seeded pseudo-random values, so the file is the same on every run. Written inline
(single file, raw_data), opset 17.
"""

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIDE = 2048  # 2048 * 2048 * 4 bytes = 16 MiB per weight


def main(argv):
    mib = 1024
    if "--mib" in argv:
        i = argv.index("--mib")
        mib = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    k = max(1, mib // 16)
    rng = np.random.default_rng(1234)
    inits, nodes = [], []
    prev = "X"
    for i in range(k):
        w = rng.standard_normal((SIDE, SIDE), dtype=np.float32) * (1.0 / SIDE**0.5)
        inits.append(numpy_helper.from_array(w, name=f"W{i}"))
        out = "Y" if i == k - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out], name=f"matmul{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, SIDE])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, SIDE])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="onnxopt-bench")
    with open(argv[0], "wb") as f:
        f.write(model.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
