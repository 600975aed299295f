//! IR -> `ModelProto`, in a stable topological order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use anyhow::{bail, Result};

use crate::ir::{Graph, Model, NodeId, SubgraphAttr, ValueDef};
use crate::pb;

/// The `ModelProto` of `model`. Tensor data is shared with the IR, not copied.
///
/// Errors when a graph has a cycle (a node that transitively reads its own output).
pub fn to_proto(model: &Model) -> Result<pb::ModelProto> {
    let mut proto = model.header.clone();
    proto.graph = Some(graph_to_proto(&model.graph, "graph")?);
    Ok(proto)
}

/// Node order for export: topological, and among ready nodes the earliest in `graph.order`, so
/// a graph that is already topologically ordered keeps its order exactly.
///
/// A node whose subgraph reads a value of this graph comes after that value's producer.
pub fn topo_order(graph: &Graph) -> Result<Vec<NodeId>> {
    let rank: HashMap<NodeId, usize> = graph
        .order
        .iter()
        .enumerate()
        .map(|(i, &n)| (n, i))
        .collect();
    let n = graph.order.len();
    let mut indeg = vec![0usize; n];
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, &id) in graph.order.iter().enumerate() {
        let node = graph.node(id);
        let mut deps: Vec<usize> = node
            .inputs
            .iter()
            .flatten()
            .filter_map(|&v| graph.producer(v))
            .filter_map(|p| rank.get(&p).copied())
            .collect();
        if !node.subgraphs.is_empty() {
            let mut reads = std::collections::HashSet::new();
            for sg in node.subgraphs() {
                reads.extend(sg.names_read_from_outside());
            }
            let mut reads: Vec<_> = reads.into_iter().collect();
            reads.sort();
            for name in reads {
                if let Some(v) = graph.find(&name) {
                    if let Some(p) = graph.producer(v).and_then(|p| rank.get(&p)) {
                        deps.push(*p);
                    }
                }
            }
        }
        deps.sort_unstable();
        deps.dedup();
        for d in deps {
            if d != i {
                indeg[i] += 1;
                succ[d].push(i);
            } else {
                bail!("{} reads its own output", node.label(id));
            }
        }
    }
    let mut heap: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indeg[i] == 0).map(Reverse).collect();
    let mut out = Vec::with_capacity(n);
    while let Some(Reverse(i)) = heap.pop() {
        out.push(graph.order[i]);
        for &s in &succ[i] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                heap.push(Reverse(s));
            }
        }
    }
    if out.len() != n {
        let stuck: Vec<String> = (0..n)
            .filter(|&i| indeg[i] > 0)
            .take(5)
            .map(|i| graph.node(graph.order[i]).label(graph.order[i]))
            .collect();
        bail!("the graph has a cycle through {}", stuck.join(", "));
    }
    Ok(out)
}

/// The `GraphProto` of `graph`.
pub fn graph_to_proto(graph: &Graph, path: &str) -> Result<pb::GraphProto> {
    let mut gp = graph.header.clone();
    let name_of = |v: crate::ir::ValueId| graph.value(v).name.clone();
    for id in topo_order(graph).map_err(|e| anyhow::anyhow!("{path}: {e}"))? {
        let node = graph.node(id);
        let mut np = node.proto.clone();
        np.input = node
            .inputs
            .iter()
            .map(|v| v.map(name_of).unwrap_or_default())
            .collect();
        np.output = node
            .outputs
            .iter()
            .map(|v| v.map(name_of).unwrap_or_default())
            .collect();
        for (ai, sg) in &node.subgraphs {
            let Some(attr) = np.attribute.get_mut(*ai) else {
                bail!(
                    "{path}: {} lost its subgraph attribute #{ai}",
                    node.label(id)
                );
            };
            let sub_path = format!("{path}/{}/{}", node.label(id), attr.name());
            match sg {
                SubgraphAttr::One(g) => attr.g = Some(graph_to_proto(g, &sub_path)?),
                SubgraphAttr::Many(gs) => {
                    attr.graphs = gs
                        .iter()
                        .map(|g| graph_to_proto(g, &sub_path))
                        .collect::<Result<_>>()?
                }
            }
        }
        gp.node.push(np);
    }
    for v in graph.initializers() {
        let val = graph.value(v);
        if let ValueDef::Initializer(t) = &val.def {
            let mut tp = t.proto.clone();
            if tp.name.as_deref() != Some(val.name.as_str()) {
                tp.name = Some(val.name.clone());
            }
            gp.initializer.push(tp);
        }
    }
    let port = |p: &crate::ir::Port| {
        let mut info = p.info.clone();
        let name = &graph.value(p.value).name;
        if info.name.as_deref() != Some(name.as_str()) {
            info.name = Some(name.clone());
        }
        info
    };
    gp.input = graph.inputs.iter().map(port).collect();
    gp.output = graph.outputs.iter().map(port).collect();
    gp.value_info = graph
        .value_info
        .iter()
        .filter(|vi| {
            vi.orphan
                || graph
                    .find(vi.proto.name())
                    .is_some_and(|v| graph.is_live(v))
        })
        .map(|vi| vi.proto.clone())
        .collect();
    Ok(gp)
}
