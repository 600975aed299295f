"""Helpers shared by the scripts in tests/py.

The definitions here mirror what `onnxopt inspect --json` promises:
- op names: default domain ("" or "ai.onnx") plain, any other domain as "domain:Op";
- nodes are counted in the main graph and in every subgraph reached through a GRAPH or
  GRAPHS attribute, recursively (function bodies are not part of the graph);
- parameters are the initializers of every graph (subgraphs included) plus the `value`
  tensors of Constant nodes (subgraphs included); count = number of elements;
  bytes = elements * dtype size, 4-bit types rounded up to whole bytes per tensor,
  string tensors = sum of the string lengths.
"""

from onnx import AttributeProto, TensorProto

# Element sizes in bytes; 4-bit types are handled separately (half a byte, rounded up per tensor).
_SIZES = {
    "float32": 4, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "int32": 4, "int64": 8,
    "bool": 1, "float16": 2, "float64": 8, "uint32": 4, "uint64": 8, "complex64": 8,
    "complex128": 16, "bfloat16": 2, "float8e4m3fn": 1, "float8e4m3fnuz": 1, "float8e5m2": 1,
    "float8e5m2fnuz": 1, "float8e8m0": 1,
}
_NIBBLE = {"int4", "uint4", "float4e2m1", "int2", "uint2"}


def dtype_name(elem_type: int) -> str:
    """Lowercase ONNX name of a TensorProto.DataType value: FLOAT -> float32, DOUBLE -> float64."""
    try:
        name = TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"dtype{elem_type}"
    return {"FLOAT": "float32", "DOUBLE": "float64"}.get(name, name.lower())


def tensor_bytes(dtype: str, elements: int, tensor=None) -> int:
    """Bytes a tensor of `elements` elements of `dtype` occupies (see module doc)."""
    if dtype == "string":
        return sum(len(s) for s in tensor.string_data) if tensor is not None else 0
    if dtype in ("int2", "uint2"):
        return (elements + 3) // 4
    if dtype in _NIBBLE:
        return (elements + 1) // 2
    return elements * _SIZES.get(dtype, 0)


def op_name(node) -> str:
    """Qualified op type: default domain plain, others 'domain:Op'."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.domain}:{node.op_type}"


def subgraphs(node):
    """Yield (attribute name, GraphProto) for every graph held by a node's attributes."""
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH or a.HasField("g"):
            yield a.name, a.g
        for g in a.graphs:
            yield a.name, g


def walk_graphs(graph):
    """Yield the graph and every nested subgraph, depth first."""
    yield graph
    for node in graph.node:
        for _, g in subgraphs(node):
            yield from walk_graphs(g)


def parameter_tensors(graph):
    """Yield (source, TensorProto) for the parameters of `graph` and its subgraphs."""
    for g in walk_graphs(graph):
        for t in g.initializer:
            yield "initializer", t
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value" and a.HasField("t"):
                        yield "constant", a.t


def all_tensors(model):
    """Yield every TensorProto message in a model (graphs, attributes, functions, sparse parts)."""

    def from_attr(a):
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("sparse_tensor"):
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        for s in a.sparse_tensors:
            yield s.values
            yield s.indices
        if a.HasField("g"):
            yield from from_graph(a.g)
        for g in a.graphs:
            yield from from_graph(g)

    def from_nodes(nodes):
        for n in nodes:
            for a in n.attribute:
                yield from from_attr(a)

    def from_graph(g):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        yield from from_nodes(g.node)

    yield from from_graph(model.graph)
    for f in model.functions:
        yield from from_nodes(f.node)
    for ti in model.training_info:
        for g in (ti.initialization, ti.algorithm):
            yield from from_graph(g)
