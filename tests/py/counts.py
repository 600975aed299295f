"""Op, node and parameter statistics of ONNX models, computed with the onnx package.

    counts.py MODEL [MODEL...]

Prints one JSON object per model (one per line) with the same definitions as
`onnxopt inspect --json` (see onnx_common.py):
{"file", "ir_version", "producer_name", "producer_version",
 "opset_import": [{"domain", "version"}], "node_count", "op_counts": {"Conv": 53, "ai.onnx.ml:Foo": 1},
 "parameters": {"count", "bytes", "tensors",
                "by_dtype": {"float32": {"count", "bytes", "tensors"}}},
 "inputs"/"outputs": [{"name", "dtype", "shape": [int | "dim_param" | null]}]}
Element counts come from onnx.numpy_helper.to_array (external data loaded), checked against
the product of the dims.

Exit codes: 0 ok, 2 a model could not be read.
"""

import json
import sys
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_common import dtype_name, op_name, parameter_tensors, tensor_bytes, walk_graphs


def value_info(v):
    tt = v.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
    return {"name": v.name, "dtype": dtype_name(tt.elem_type), "shape": shape}


def counts(path):
    model = onnx.load(path, load_external_data=True)
    ops = Counter()
    nodes = 0
    for g in walk_graphs(model.graph):
        for n in g.node:
            ops[op_name(n)] += 1
            nodes += 1
    total = {"count": 0, "bytes": 0, "tensors": 0}
    by_dtype = {}
    for _, t in parameter_tensors(model.graph):
        dt = dtype_name(t.data_type)
        arr = numpy_helper.to_array(t)
        elements = int(arr.size)
        dims_product = int(np.prod(list(t.dims), dtype=object)) if len(t.dims) else 1
        if elements != dims_product:
            raise ValueError(f"tensor {t.name!r}: {elements} elements but dims {list(t.dims)}")
        nbytes = tensor_bytes(dt, elements, t)
        for acc in (total, by_dtype.setdefault(dt, {"count": 0, "bytes": 0, "tensors": 0})):
            acc["count"] += elements
            acc["bytes"] += nbytes
            acc["tensors"] += 1
    init_names = {t.name for t in model.graph.initializer}
    return {
        "file": path,
        "ir_version": model.ir_version,
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "opset_import": [{"domain": o.domain, "version": o.version} for o in model.opset_import],
        "node_count": nodes,
        "op_counts": dict(sorted(ops.items())),
        "parameters": {**total, "by_dtype": dict(sorted(by_dtype.items()))},
        "inputs": [value_info(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [value_info(v) for v in model.graph.output],
    }


def main(paths):
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    rc = 0
    for p in paths:
        try:
            print(json.dumps(counts(p)), flush=True)
        except Exception as e:
            print(f"{p}: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
