//! The IR validator: its own stage, run after import and, in tests and debug builds, after
//! every pass. It collects every problem instead of stopping at the first.

use std::collections::HashSet;

use anyhow::Result;

use super::{Graph, Model, SubgraphAttr, ValueDef};

/// Checks the invariants listed in [`crate::ir`] on every graph of `model`.
///
/// Errors: one message listing every problem, each naming the graph path, node, op and value.
pub fn validate(model: &Model) -> Result<()> {
    let mut problems = Vec::new();
    check_graph(&model.graph, "graph", &HashSet::new(), &mut problems);
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(100);
    Err(anyhow::anyhow!(
        "invalid graph, {n} problem{}:\n  - {}",
        if n == 1 { "" } else { "s" },
        problems.join("\n  - ")
    ))
}

fn check_graph(g: &Graph, path: &str, outer: &HashSet<String>, problems: &mut Vec<String>) {
    // Ids this graph does not have (edit-API misuse): reported, and the other checks, which
    // look values up by id, are skipped.
    let n_values = g.values.len();
    let before = problems.len();
    // The arena, not the order (which may list a removed node: reported below).
    let nodes = g.nodes.iter().enumerate();
    for (id, node) in nodes.filter_map(|(i, n)| Some((super::NodeId(i as u32), n.as_ref()?))) {
        for (what, ids) in [("input", &node.inputs), ("output", &node.outputs)] {
            for (k, v) in ids.iter().enumerate() {
                if let Some(v) = v.filter(|v| v.0 as usize >= n_values) {
                    problems.push(format!(
                        "{path}: {} {what} #{k} is value #{}, which this graph does not have ({n_values} values)",
                        node.label(id),
                        v.0
                    ));
                }
            }
        }
    }
    for (what, ports) in [("input", &g.inputs), ("output", &g.outputs)] {
        for p in ports.iter().filter(|p| p.value.0 as usize >= n_values) {
            problems.push(format!(
                "{path}: a graph {what} is value #{}, which this graph does not have ({n_values} values)",
                p.value.0
            ));
        }
    }
    if problems.len() > before {
        return;
    }
    // Values read by name: an enclosing graph's, or this graph's sparse initializers.
    let sparse: HashSet<&str> = g.sparse_initializer_names().collect();
    for (i, v) in g.values.iter().enumerate() {
        if v.def == ValueDef::Outer && !outer.contains(&v.name) && !sparse.contains(v.name.as_str())
        {
            problems.push(format!(
                "{path}: '{}' is read from an enclosing graph that does not define it",
                v.name
            ));
        }
        if let ValueDef::Node(n, k) = v.def {
            let ok = matches!(g.nodes.get(n.0 as usize), Some(Some(node))
                if node.outputs.get(k) == Some(&Some(super::ValueId(i as u32))));
            if !ok && g.is_live(super::ValueId(i as u32)) {
                problems.push(format!(
                    "{path}: value '{}' claims to be output #{k} of node #{}, which does not produce it",
                    v.name, n.0
                ));
            }
        }
        if let ValueDef::Initializer(t) = &v.def {
            if let Err(e) = t.check_payload() {
                problems.push(format!("{path}: initializer '{}': {e:#}", v.name));
            }
        }
    }
    let mut scope = outer.clone();
    scope.extend(
        g.values
            .iter()
            .enumerate()
            .filter(|(i, _)| g.is_live(super::ValueId(*i as u32)))
            .map(|(_, v)| v.name.clone()),
    );
    scope.extend(sparse.iter().map(|s| s.to_string()));
    let mut seen_nodes = HashSet::new();
    for &id in &g.order {
        if !seen_nodes.insert(id) {
            problems.push(format!("{path}: node #{} appears twice in the order", id.0));
            continue;
        }
        let Some(Some(node)) = g.nodes.get(id.0 as usize) else {
            problems.push(format!("{path}: the order lists removed node #{}", id.0));
            continue;
        };
        for (k, inp) in node.inputs.iter().enumerate() {
            if let Some(v) = inp {
                if !g.is_live(*v) {
                    problems.push(format!(
                        "{path}: {} input #{k} reads '{}', which is no longer defined",
                        node.label(id),
                        g.value(*v).name
                    ));
                }
            }
        }
        for sg in node.subgraphs() {
            check_graph(sg, &format!("{path}/{}", node.label(id)), &scope, problems);
        }
    }
    let live = g.nodes.iter().filter(|n| n.is_some()).count();
    if live != seen_nodes.len() {
        problems.push(format!(
            "{path}: {live} live nodes but {} in the order",
            seen_nodes.len()
        ));
    }
    for p in &g.outputs {
        if !g.is_live(p.value) {
            problems.push(format!(
                "{path}: graph output '{}' is no longer defined",
                g.value(p.value).name
            ));
        }
    }
    if let Err(e) = crate::onnx::export::topo_order(g) {
        problems.push(format!("{path}: {e:#}"));
    }
}

/// Names a subgraph defines (a graph input, an initializer or a node output) that an enclosing
/// graph also defines and that the subgraph could read from there, one line each naming the
/// node that holds the subgraph. ONNX requires distinct names (SSA), and runtimes disagree on
/// which definition a reader of such a name gets (onnxruntime 1.32 the enclosing one, tract
/// 0.23 and this IR the subgraph's own), so no rewrite of the model can be checked to keep
/// its meaning.
pub fn shadowed_names(model: &Model) -> Vec<String> {
    fn defined(g: &Graph) -> impl Iterator<Item = &str> {
        g.values
            .iter()
            .filter(|v| {
                matches!(
                    v.def,
                    ValueDef::Input | ValueDef::Initializer(_) | ValueDef::Node(..)
                )
            })
            .map(|v| v.name.as_str())
    }
    fn walk<'a>(g: &'a Graph, outer: &HashSet<&'a str>, out: &mut Vec<String>) {
        let mut visible = outer.clone();
        visible.extend(defined(g));
        for (id, n) in g.live_nodes() {
            for (attr, s) in &n.subgraphs {
                let which = n.proto.attribute.get(*attr).map_or("", |a| a.name());
                let subs: &[Graph] = match s {
                    SubgraphAttr::One(g) => std::slice::from_ref(&**g),
                    SubgraphAttr::Many(gs) => gs,
                };
                for sub in subs {
                    let mut names: Vec<&str> =
                        defined(sub).filter(|d| visible.contains(d)).collect();
                    names.sort_unstable();
                    names.dedup();
                    for name in names {
                        out.push(format!(
                            "`{name}` is defined in the {which} of {} and in an enclosing graph",
                            n.label(id)
                        ));
                    }
                    walk(sub, &visible, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&model.graph, &HashSet::new(), &mut out);
    out
}

/// Weights whose shape the op's ONNX definition rules out, one line each naming the graph
/// path, node, input and shape: a MatMul input of rank 0 (MatMul-13 takes N-D tensors,
/// N >= 1), a Gemm input A or B of rank other than 2 (Gemm-13), a Conv or ConvTranspose
/// weight of rank below 3 or with a kernel dimension of 0 (Conv-11, ConvTranspose-11:
/// `[M, C/group, k1, ...]`, kernel dimensions positive). Only initializers and Constant
/// nodes' values are looked at (their shapes are known). The onnx checker refuses such
/// models and tract panics on them; the passes would rewrite them anyway.
pub fn weight_shape_problems(model: &Model) -> Vec<String> {
    /// The shape of `v` when it is an initializer or a Constant node's value.
    fn known_dims(g: &Graph, v: super::ValueId) -> Option<Vec<i64>> {
        if let Some(t) = g.initializer(v) {
            return Some(t.dims().to_vec());
        }
        let p = g.node(g.producer(v)?);
        (p.is("Constant") && p.domain().is_empty())
            .then(|| crate::passes::constant_to_initializer::constant_tensor(p))
            .flatten()
            .map(|t| t.dims)
    }
    /// The inputs of `n` whose shape a rule constrains, the shapes it rules out and what it
    /// takes instead.
    type Rule = (&'static [usize], fn(&[i64]) -> bool, &'static str);
    fn rule(n: &super::Node) -> Option<Rule> {
        if !n.domain().is_empty() {
            return None;
        }
        match n.op_type() {
            "MatMul" => Some((&[0, 1], |d| d.is_empty(), "a tensor of rank 1 or more")),
            "Gemm" => Some((&[0, 1], |d| d.len() != 2, "a 2-D matrix")),
            "Conv" | "ConvTranspose" => Some((
                &[1],
                |d| d.len() < 3 || d[2..].iter().any(|&k| k <= 0),
                "a weight [M, C/group, k1, ...] with every kernel dimension positive",
            )),
            _ => None,
        }
    }
    fn walk(g: &Graph, path: &str, out: &mut Vec<String>) {
        for (id, n) in g.live_nodes() {
            if let Some((slots, bad, expected)) = rule(n) {
                for &i in slots {
                    let Some(v) = n.inputs.get(i).copied().flatten() else {
                        continue;
                    };
                    let Some(dims) = known_dims(g, v) else {
                        continue;
                    };
                    if bad(&dims) {
                        out.push(format!(
                            "{path}: {} input {i} ('{}') has shape {dims:?}; {} takes {expected}",
                            n.label(id),
                            g.value(v).name,
                            n.op_type()
                        ));
                    }
                }
            }
            for (attr, sub) in &n.subgraphs {
                let which = n.proto.attribute.get(*attr).map_or("", |a| a.name());
                let subs: &[Graph] = match sub {
                    SubgraphAttr::One(g) => std::slice::from_ref(&**g),
                    SubgraphAttr::Many(gs) => gs,
                };
                for sg in subs {
                    walk(sg, &format!("{path} > {} {which}", n.label(id)), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&model.graph, "graph", &mut out);
    out
}
