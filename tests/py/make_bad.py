"""Write a deliberately broken ONNX model for the error-path tests.

    make_bad.py KIND OUT
    make_bad.py --list

Every model is Y = Add(X, W) with X, Y float32[4] and W a float32[4] initializer, except
where KIND says otherwise. The onnx checker is not run (these models are invalid on purpose).

KIND (the initializer is named after the kind so error messages can be checked):
  undefined-value   a Relu node "relu_ghost" reads "ghost", which nothing defines
  ext-parent        W ("w_parent") is external with location "../x"
  ext-absolute      W ("w_absolute") is external with location "/etc/passwd"
  ext-missing       W ("w_missing") is external with location "missing.bin", which does not exist
  ext-beyond-eof    W ("w_beyond") is external in "beyond.bin" (written beside OUT, 64 bytes)
                    at offset 48 with length 16 + 32 bytes past the end (offset 48, length 48)
  dims-overflow     W ("w_huge") has dims [2^31, 2^31, 2^31, 2^31] (product overflows 64 bits)
                    and no data
  tract-cannot-run  valid, but not for tract: Y = Add(Frobnicate(X), W), node "frobnicate" of
                    the custom domain com.example

Exit codes: 0 written, 2 unknown kind.
"""

import os
import sys

import onnx
from onnx import TensorProto, helper


def external(name, location, offset=None, length=None):
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    t.data_location = TensorProto.EXTERNAL
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", str(offset)))
    if length is not None:
        entries.append(("length", str(length)))
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def add_model(w, nodes=None, extra_inputs=()):
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])
    nodes = nodes or [helper.make_node("Add", ["X", w.name], ["Y"], name="add")]
    graph = helper.make_graph(nodes, "bad", [x, *extra_inputs], [y], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build(kind, out):
    ok_w = helper.make_tensor("W", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    if kind == "undefined-value":
        nodes = [
            helper.make_node("Relu", ["ghost"], ["r"], name="relu_ghost"),
            helper.make_node("Add", ["r", "W"], ["Y"], name="add"),
        ]
        return add_model(ok_w, nodes)
    if kind == "ext-parent":
        return add_model(external("w_parent", "../x", 0, 16))
    if kind == "ext-absolute":
        return add_model(external("w_absolute", "/etc/passwd", 0, 16))
    if kind == "ext-missing":
        return add_model(external("w_missing", "missing.bin", 0, 16))
    if kind == "ext-beyond-eof":
        with open(os.path.join(os.path.dirname(os.path.abspath(out)), "beyond.bin"), "wb") as f:
            f.write(bytes(range(64)))
        return add_model(external("w_beyond", "beyond.bin", 48, 48))
    if kind == "tract-cannot-run":
        nodes = [
            helper.make_node("Frobnicate", ["X"], ["f"], name="frobnicate", domain="com.example"),
            helper.make_node("Add", ["f", "W"], ["Y"], name="add"),
        ]
        m = add_model(ok_w, nodes)
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        return m
    if kind == "dims-overflow":
        w = TensorProto(name="w_huge", data_type=TensorProto.FLOAT, dims=[2**31] * 4)
        return add_model(w)
    return None


KINDS = ["undefined-value", "ext-parent", "ext-absolute", "ext-missing", "ext-beyond-eof",
         "dims-overflow", "tract-cannot-run"]


def main(argv):
    if argv == ["--list"]:
        print("\n".join(KINDS))
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    model = build(*argv)
    if model is None:
        print(f"unknown kind {argv[0]!r}; kinds: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    with open(argv[1], "wb") as f:  # no onnx.save: it would try to resolve external data
        f.write(model.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
