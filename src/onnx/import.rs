//! `ModelProto` -> IR.

use std::collections::HashSet;

use anyhow::Result;

use super::external::ExternalData;
use crate::ir::Value;
use crate::ir::{
    Graph, Model, Names, Node, NodeId, Port, SubgraphAttr, Tensor, ValueDef, ValueId, ValueInfo,
};
use crate::pb;

/// Problems found while importing; all are reported together.
#[derive(Default)]
pub(crate) struct Problems {
    pub list: Vec<String>,
}

impl Problems {
    fn push(&mut self, msg: String) {
        // A mutated file can repeat one fault thousands of times; keep the report readable.
        if self.list.len() < 200 {
            self.list.push(msg);
        } else if self.list.len() == 200 {
            self.list
                .push("... (further problems not listed)".to_string());
        }
    }
}

/// Builds the IR of `proto`, resolving external data through `ext`.
///
/// Errors list every problem found: undefined values, values defined twice, bad tensors
/// (negative or overflowing dims, payloads of the wrong size), unsafe or broken external data.
pub(crate) fn import_model(
    mut proto: pb::ModelProto,
    ext: &mut ExternalData,
    problems: &mut Problems,
) -> Option<Model> {
    let Some(gp) = proto.graph.take() else {
        problems.push("the model has no graph (ModelProto.graph is missing)".into());
        return None;
    };
    let mut names = Names::default();
    let mut graph = import_graph(gp, "graph", &HashSet::new(), ext, &mut names, problems);
    graph.read_by_model = training_info_names(&proto.training_info);
    Some(Model {
        header: proto,
        graph,
        names,
    })
}

/// Every name `training_info` mentions: the node inputs of its graphs (subgraphs included),
/// their graph inputs, and the keys and values of its bindings (initializers of the main graph
/// that training reads or updates). More than it reads from the main graph: a superset is
/// safe, as these names are only kept.
fn training_info_names(info: &[pb::TrainingInfoProto]) -> HashSet<String> {
    fn graph_names(g: &pb::GraphProto, out: &mut HashSet<String>) {
        out.extend(g.input.iter().map(|i| i.name().to_string()));
        for n in &g.node {
            out.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
            for a in &n.attribute {
                for sub in a.g.iter().chain(&a.graphs) {
                    graph_names(sub, out);
                }
            }
        }
    }
    let mut out = HashSet::new();
    for t in info {
        for g in t.initialization.iter().chain(&t.algorithm) {
            graph_names(g, &mut out);
        }
        for b in t.initialization_binding.iter().chain(&t.update_binding) {
            out.insert(b.key().to_string());
            out.insert(b.value().to_string());
        }
    }
    out
}

fn import_tensor(
    mut t: pb::TensorProto,
    what: &str,
    ext: &mut ExternalData,
    problems: &mut Problems,
) -> Tensor {
    if let Err(e) = ext.resolve(&mut t) {
        if !e.is::<super::external::AlreadyReported>() {
            problems.push(format!("{what}: {e:#}"));
        }
    }
    let t = Tensor::new(t);
    if let Err(e) = t.check_payload() {
        problems.push(format!("{what}: {e:#}"));
    }
    t
}

/// Resolves external data held in attribute tensors (Constant values and the like).
fn import_attr_tensors(
    node: &mut pb::NodeProto,
    label: &str,
    ext: &mut ExternalData,
    problems: &mut Problems,
) {
    for a in &mut node.attribute {
        let an = a.name().to_string();
        if let Some(t) = a.t.take() {
            let what = format!("{label}, attribute '{an}' tensor");
            a.t = Some(import_tensor(t, &what, ext, problems).proto);
        }
        let ts = std::mem::take(&mut a.tensors);
        a.tensors = ts
            .into_iter()
            .map(|t| {
                let what = format!("{label}, attribute '{an}' tensor");
                import_tensor(t, &what, ext, problems).proto
            })
            .collect();
    }
}

fn import_graph(
    mut gp: pb::GraphProto,
    path: &str,
    outer: &HashSet<String>,
    ext: &mut ExternalData,
    names: &mut Names,
    problems: &mut Problems,
) -> Graph {
    let nodes = std::mem::take(&mut gp.node);
    let inits = std::mem::take(&mut gp.initializer);
    let inputs = std::mem::take(&mut gp.input);
    let outputs = std::mem::take(&mut gp.output);
    let value_info = std::mem::take(&mut gp.value_info);
    let mut sparse = std::mem::take(&mut gp.sparse_initializer);
    for s in &mut sparse {
        let mut resolved = true;
        for t in [&mut s.values, &mut s.indices].into_iter().flatten() {
            if let Err(e) = ext.resolve(t) {
                problems.push(format!("{path}: sparse_initializer: {e:#}"));
                resolved = false;
            }
        }
        if resolved {
            if let Err(e) = check_sparse(s) {
                let name = s.values.as_ref().map_or("", |v| v.name());
                problems.push(format!("{path}: sparse_initializer '{name}': {e}"));
            }
        }
    }
    // A sparse initializer is named by its `values` tensor; it stays in the header, and a
    // node reading it reads it by name, as a subgraph reads an outer value.
    gp.sparse_initializer = sparse;
    let mut g = Graph::new(gp);
    let sparse_names: HashSet<String> = g.sparse_initializer_names().map(str::to_string).collect();

    for (pos, t) in inits.into_iter().enumerate() {
        let name = t.name().to_string();
        let what = format!("{path}: initializer '{name}'");
        let t = import_tensor(t, &what, ext, problems);
        if name.is_empty() {
            problems.push(format!("{path}: initializer #{pos} has no name"));
            continue;
        }
        if g.by_name.contains_key(&name) {
            problems.push(format!("{path}: initializer '{name}' is defined twice"));
            continue;
        }
        let id = add_value(&mut g, names, &name, ValueDef::Initializer(t));
        g.value_mut(id).init_pos = Some(pos);
    }
    for info in inputs {
        let name = info.name().to_string();
        let value = match g.by_name.get(&name) {
            Some(&id) if matches!(g.value(id).def, ValueDef::Initializer(_)) => {
                if g.inputs.iter().any(|p| p.value == id) {
                    problems.push(format!("{path}: graph input '{name}' is listed twice"));
                }
                id
            }
            Some(_) => {
                problems.push(format!("{path}: graph input '{name}' is listed twice"));
                continue;
            }
            None => add_value(&mut g, names, &name, ValueDef::Input),
        };
        g.inputs.push(Port { value, info });
    }

    // Node outputs first, so nodes out of topological order resolve.
    let mut protos = Vec::with_capacity(nodes.len());
    for (i, np) in nodes.into_iter().enumerate() {
        let id = NodeId(i as u32);
        let mut outs = Vec::with_capacity(np.output.len());
        for (k, o) in np.output.iter().enumerate() {
            if o.is_empty() {
                outs.push(None);
                continue;
            }
            if g.by_name.contains_key(o) {
                problems.push(format!(
                    "{path}: {} output #{k} '{o}' is already defined by another node, input or initializer",
                    label(&np, id)
                ));
                outs.push(None);
                continue;
            }
            outs.push(Some(add_value(&mut g, names, o, ValueDef::Node(id, k))));
        }
        if !np.name().is_empty() {
            names.insert(np.name());
        }
        protos.push((np, outs));
    }

    // Names visible to subgraphs of this graph: ours and every enclosing graph's.
    let mut scope: HashSet<String> = outer.clone();
    scope.extend(g.by_name.keys().cloned());
    scope.extend(sparse_names.iter().cloned());

    for (i, (mut np, outs)) in protos.into_iter().enumerate() {
        let id = NodeId(i as u32);
        let lbl = label(&np, id);
        let mut inputs = Vec::with_capacity(np.input.len());
        for (k, name) in std::mem::take(&mut np.input).into_iter().enumerate() {
            if name.is_empty() {
                inputs.push(None);
            } else if let Some(&v) = g.by_name.get(&name) {
                inputs.push(Some(v));
            } else if outer.contains(&name) || sparse_names.contains(&name) {
                inputs.push(Some(add_value(&mut g, names, &name, ValueDef::Outer)));
            } else {
                problems.push(format!(
                    "{path}: {lbl} input #{k} reads '{name}', which is not a graph input, initializer, node output or outer-scope value"
                ));
                inputs.push(None);
            }
        }
        np.output.clear();
        import_attr_tensors(&mut np, &format!("{path}: {lbl}"), ext, problems);
        let mut subgraphs = Vec::new();
        for (ai, a) in np.attribute.iter_mut().enumerate() {
            let an = a.name().to_string();
            if let Some(sg) = a.g.take() {
                let sub_path = format!("{path}/{lbl}/{an}");
                let sg = import_graph(sg, &sub_path, &scope, ext, names, problems);
                subgraphs.push((ai, SubgraphAttr::One(Box::new(sg))));
            } else if !a.graphs.is_empty() {
                let gs = std::mem::take(&mut a.graphs)
                    .into_iter()
                    .enumerate()
                    .map(|(j, sg)| {
                        let sub_path = format!("{path}/{lbl}/{an}[{j}]");
                        import_graph(sg, &sub_path, &scope, ext, names, problems)
                    })
                    .collect();
                subgraphs.push((ai, SubgraphAttr::Many(gs)));
            }
        }
        g.nodes.push(Some(Node {
            proto: np,
            inputs,
            outputs: outs,
            subgraphs,
        }));
        g.order.push(id);
    }

    for info in outputs {
        let name = info.name().to_string();
        let value = if let Some(&v) = g.by_name.get(&name) {
            v
        } else if outer.contains(&name) {
            add_value(&mut g, names, &name, ValueDef::Outer)
        } else {
            problems.push(format!(
                "{path}: graph output '{name}' is not produced by any node, input or initializer"
            ));
            continue;
        };
        g.outputs.push(Port { value, info });
    }
    for proto in value_info {
        let orphan = !g.by_name.contains_key(proto.name());
        g.value_info.push(ValueInfo { proto, orphan });
    }
    g
}

/// Checks a sparse initializer against ONNX's `SparseTensorProto` rules: named 1-D `values`
/// of NNZ elements; int64 `indices` of shape `[NNZ]` (linear) or `[NNZ, rank]` (coordinates),
/// each within the dense shape `dims` (no negative dim).
///
/// Errors: the first rule broken, with the values found.
fn check_sparse(s: &pb::SparseTensorProto) -> std::result::Result<(), String> {
    let values = s.values.as_ref().ok_or("no values tensor")?;
    if values.name().is_empty() {
        return Err("its values tensor has no name".into());
    }
    if values.dims.len() != 1 {
        return Err(format!(
            "values have shape {:?}, expected [NNZ]",
            values.dims
        ));
    }
    let nnz = values.dims[0];
    let total =
        crate::ir::tensor::num_elements(&s.dims).map_err(|e| format!("dense shape: {e:#}"))?;
    let dims: Vec<u64> = s.dims.iter().map(|&d| d as u64).collect();
    let indices = s.indices.as_ref().ok_or("no indices tensor")?;
    if indices.data_type() != pb::tensor_proto::DataType::Int64 as i32 {
        let dt = crate::ir::tensor::elem_info(indices.data_type()).name;
        return Err(format!("indices are of type {dt}, expected int64"));
    }
    let coordinates = match indices.dims.as_slice() {
        [n] if *n == nnz => false,
        [n, r] if *n == nnz && *r == dims.len() as i64 => true,
        other => {
            return Err(format!(
                "indices have shape {other:?}, expected [{nnz}] or [{nnz}, {}]",
                dims.len()
            ))
        }
    };
    // Its payload holds as many indices as its shape says (checked by `to_i64`).
    let idx = Tensor::new(indices.clone())
        .to_i64()
        .map_err(|e| format!("indices: {e:#}"))?;
    let bad = if coordinates {
        idx.chunks(dims.len().max(1))
            .find(|c| c.iter().zip(&dims).any(|(&i, &d)| i < 0 || i as u64 >= d))
            .map(|c| format!("{c:?}"))
    } else {
        idx.iter()
            .find(|&&i| i < 0 || i as u64 >= total as u64)
            .map(|i| i.to_string())
    };
    match bad {
        Some(b) => Err(format!("index {b} is outside the dense shape {:?}", s.dims)),
        None => Ok(()),
    }
}

fn add_value(g: &mut Graph, names: &mut Names, name: &str, def: ValueDef) -> ValueId {
    let id = ValueId(g.values.len() as u32);
    g.values.push(Value {
        name: name.to_string(),
        def,
        init_pos: None,
    });
    g.by_name.insert(name.to_string(), id);
    names.insert(name);
    id
}

fn label(np: &pb::NodeProto, id: NodeId) -> String {
    let op = match np.domain() {
        "" | "ai.onnx" => np.op_type().to_string(),
        d => format!("{d}:{}", np.op_type()),
    };
    if np.name().is_empty() {
        format!("{op} node #{}", id.0)
    } else {
        format!("{op} node \"{}\"", np.name())
    }
}

/// Collects the problems as one error, or `Ok` when there are none.
pub(crate) fn into_result(problems: Problems, what: &str) -> Result<()> {
    if problems.list.is_empty() {
        return Ok(());
    }
    let n = problems.list.len();
    let mut msg = format!(
        "{what}: {n} problem{} found:",
        if n == 1 { "" } else { "s" }
    );
    for p in &problems.list {
        msg.push_str("\n  - ");
        msg.push_str(p);
    }
    Err(anyhow::anyhow!(msg))
}
