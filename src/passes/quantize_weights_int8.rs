//! `quantize_weights_int8`: weight-only int8 quantization with symmetric per-output-channel
//! scales.
//!
//! Before: a float weight initializer `W` read by Conv (input 1), ConvTranspose (input 1), Gemm
//! (input 1), MatMul (input 1) or LSTM/GRU/RNN (inputs 1 = W and 2 = R). After: an int8
//! initializer `W_quantized`, a float32 scale vector `W_scale` (one scale per output channel)
//! and a node that turns them back into floats, so the consumers are unchanged:
//! - opset >= 13: `DequantizeLinear(W_quantized, W_scale, axis=a)` (DequantizeLinear-13,
//!   per-axis);
//! - opset 10..12: `DequantizeLinear(W_quantized, 1.0)` (per-tensor, the only form there)
//!   followed by `Mul` with the scales shaped to broadcast along the axis, which keeps
//!   per-channel accuracy without raising the model's opset;
//! - opset < 10: `Cast(to=FLOAT)` followed by the same `Mul`.
//!
//! float16 weights: scales are computed in float32; at opset >= 19 the scale is stored as
//! float16 (DequantizeLinear-19 returns the scale's type), below that a `Cast(to=FLOAT16)`
//! follows. float64 and bfloat16 weights are left in float with a note.
//!
//! The output channel axis per op: Conv 0 (`[M, C/g, k..]`), ConvTranspose 1
//! (`[C, M/g, k..]`; with groups, channels of different groups at the same position share a
//! scale), Gemm 0 when `transB=1` (`[N, K]`) else 1 (`[K, N]`), MatMul the last axis
//! (`[.., K, N]`), LSTM/GRU/RNN 1 (`[dirs, gates*H, in]`; directions share a scale).
//! Scales: `scale[c] = max|W[c]| / 127`, values rounded half to even and clamped to
//! [-127, 127]; an all-zero channel gets scale 1 (see [`crate::quant`]).
//!
//! A weight read by several quantizable nodes is quantized once. A weight that is also read by
//! something else (another op, a graph output, a different axis) keeps its float copy for those
//! readers. Weights inside If/Loop/Scan bodies are quantized, and bodies that read an outer
//! weight by name are served too. Not done: initializers that are graph inputs (a caller may
//! override them), weights already in an integer type, weights holding NaN or infinity, and
//! models with IR < 4 (new initializers would have to become graph inputs).

use anyhow::Result;

use super::{can_add_initializers, Pass, PassKind, PassOptions, PassStats};
use crate::ir::edit::attr_int;
use crate::ir::{Graph, Model, Names, Node, NodeId, Tensor, ValueDef, ValueId};
use crate::pb::tensor_proto::DataType;
use crate::quant::quantize_symmetric_per_axis;

/// See the module documentation.
pub struct QuantizeWeightsInt8;

/// The output channel axis of weight input `idx` of `node` for a weight of rank `rank`, or
/// `None` when that input is not a weight this pass quantizes.
pub fn weight_axis(node: &Node, idx: usize, rank: usize) -> Option<usize> {
    weight_axis_any(node, idx, rank)
}

fn selected_axis(
    g: &Graph,
    node: &Node,
    idx: usize,
    rank: usize,
    opts: &PassOptions,
) -> Option<usize> {
    if !opts.selects(g, node) {
        return None;
    }
    weight_axis_any(node, idx, rank)
}

fn weight_axis_any(node: &Node, idx: usize, rank: usize) -> Option<usize> {
    if !node.domain().is_empty() {
        return None;
    }
    match (node.op_type(), idx) {
        ("Conv", 1) if rank >= 3 => Some(0),
        ("ConvTranspose", 1) if rank >= 3 => Some(1),
        ("Gemm", 1) if rank == 2 => Some(if node.attr_int("transB", 0) != 0 {
            0
        } else {
            1
        }),
        ("MatMul", 1) if rank >= 2 => Some(rank - 1),
        ("LSTM" | "GRU" | "RNN", 1 | 2) if rank == 3 => Some(1),
        _ => None,
    }
}

/// How the readers of one weight split.
struct Plan {
    weight: ValueId,
    axis: usize,
    /// Readers in this graph that get the dequantized value.
    local: Vec<(NodeId, usize)>,
    /// True when some reader (anywhere) keeps the float weight.
    keep_float: bool,
    /// True when a subgraph reads it for a quantizable use.
    in_subgraphs: bool,
}

impl Pass for QuantizeWeightsInt8 {
    fn name(&self) -> &'static str {
        "quantize_weights_int8"
    }
    fn summary(&self) -> &'static str {
        "weights of Conv, ConvTranspose, Gemm, MatMul, LSTM/GRU/RNN to int8, symmetric per output channel"
    }
    fn kind(&self) -> PassKind {
        PassKind::Lossy {
            tolerance: "cosine >= 0.999 per output on typical models",
        }
    }
    fn run(&self, model: &mut Model, opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        if !can_add_initializers(model) {
            stats.notes.push(format!(
                "IR version {} requires initializers to be graph inputs: weights left in float",
                model.header.ir_version()
            ));
            return Ok(stats);
        }
        let opset = model.opset("").unwrap_or(1);
        model.for_each_graph_mut(&mut |g, names| {
            quantize_graph(g, names, opset, opts, &mut stats);
        });
        Ok(stats)
    }
}

fn quantize_graph(
    g: &mut Graph,
    names: &mut Names,
    opset: i64,
    opts: &PassOptions,
    stats: &mut PassStats,
) {
    let uses = g.uses();
    let sub_nodes: Vec<NodeId> = g
        .live_nodes()
        .filter(|(_, n)| !n.subgraphs.is_empty())
        .map(|(id, _)| id)
        .collect();
    let mut plans = Vec::new();
    for w in g.initializers() {
        let Some(t) = g.initializer(w) else { continue };
        let dt = t.data_type();
        if !(dt == DataType::Float as i32
            || dt == DataType::Float16 as i32
            || dt == DataType::Double as i32
            || dt == DataType::Bfloat16 as i32)
        {
            continue;
        }
        let rank = t.dims().len();
        let name = g.value(w).name.clone();
        // Classify every reader: Some(axis) = quantizable, None = keeps float.
        let mut local_axes: Vec<((NodeId, usize), Option<usize>)> = uses[w.0 as usize]
            .iter()
            .map(|&(n, i)| ((n, i), selected_axis(g, g.node(n), i, rank, opts)))
            .collect();
        let mut sub_axes = Vec::new();
        for &id in &sub_nodes {
            for sg in g.node(id).subgraphs() {
                sub_uses(sg, &name, rank, opts, &mut sub_axes);
            }
        }
        let all: Vec<Option<usize>> = local_axes
            .iter()
            .map(|(_, a)| *a)
            .chain(sub_axes.iter().copied())
            .collect();
        // The axis most readers want (ties: the first reader's).
        let mut best: Option<(usize, usize)> = None;
        for a in all.iter().flatten() {
            let count = all.iter().filter(|x| **x == Some(*a)).count();
            if best.is_none_or(|(_, c)| count > c) {
                best = Some((*a, count));
            }
        }
        let Some((axis, _)) = best else { continue };
        if dt == DataType::Double as i32 || dt == DataType::Bfloat16 as i32 {
            stats.notes.push(format!(
                "weight '{name}' is {}: left in float",
                t.dtype_name()
            ));
            continue;
        }
        if g.is_graph_input(w) {
            stats.notes.push(format!(
                "weight '{name}' is also a graph input (callers may override it): left in float"
            ));
            continue;
        }
        let keep_float = all.iter().any(|a| *a != Some(axis)) || g.is_graph_output(w);
        local_axes.retain(|(_, a)| *a == Some(axis));

        plans.push(Plan {
            weight: w,
            axis,
            local: local_axes.into_iter().map(|(u, _)| u).collect(),
            keep_float,
            in_subgraphs: sub_axes.contains(&Some(axis)),
        });
    }
    for plan in plans {
        if apply(g, names, opset, opts, &plan, stats) {
            stats.changes += 1;
        }
    }
}

/// Readers of outer value `name` inside subgraph `sg` and deeper, unless shadowed.
fn sub_uses(sg: &Graph, name: &str, rank: usize, opts: &PassOptions, out: &mut Vec<Option<usize>>) {
    if let Some(v) = sg.find(name) {
        if sg.value(v).def != ValueDef::Outer {
            return; // shadowed by a local definition
        }
        for (n, i) in &sg.uses()[v.0 as usize] {
            out.push(selected_axis(sg, sg.node(*n), *i, rank, opts));
        }
        if sg.is_graph_output(v) {
            out.push(None);
        }
    }
    for (_, n) in sg.live_nodes() {
        for inner in n.subgraphs() {
            sub_uses(inner, name, rank, opts, out);
        }
    }
}

/// Points quantizable readers of outer `name` in `sg` (and deeper) at outer `new_name`.
fn redirect_sub(
    sg: &mut Graph,
    name: &str,
    new_name: &str,
    rank: usize,
    axis: usize,
    opts: &PassOptions,
) {
    if let Some(v) = sg.find(name) {
        if sg.value(v).def != ValueDef::Outer {
            return;
        }
        let targets: Vec<(NodeId, usize)> = sg.uses()[v.0 as usize]
            .iter()
            .copied()
            .filter(|&(n, i)| selected_axis(sg, sg.node(n), i, rank, opts) == Some(axis))
            .collect();
        if !targets.is_empty() {
            let nv = sg.outer_value(new_name);
            for (n, i) in targets {
                sg.set_input(n, i, Some(nv));
            }
        }
    }
    let ids: Vec<NodeId> = sg.order.clone();
    for id in ids {
        for inner in sg.node_mut(id).subgraphs_mut() {
            redirect_sub(inner, name, new_name, rank, axis, opts);
        }
    }
}

fn scalar_f32(v: f32) -> Tensor {
    Tensor::from_f32(&[], &[v])
}

/// Rewrites one weight; returns false (with a note) when it is left alone.
fn apply(
    g: &mut Graph,
    names: &mut Names,
    opset: i64,
    opts: &PassOptions,
    plan: &Plan,
    stats: &mut PassStats,
) -> bool {
    let w = plan.weight;
    let name = g.value(w).name.clone();
    let Some(t) = g.initializer(w) else {
        return false;
    };
    let dt = t.data_type();
    let dims: Vec<usize> = t.dims().iter().map(|&d| d.max(0) as usize).collect();
    let values = match t.to_f32() {
        Ok(v) => v,
        Err(e) => {
            stats
                .notes
                .push(format!("weight '{name}': {e:#}; left in float"));
            return false;
        }
    };
    if values.is_empty() {
        return false;
    }
    let Some(pa) = quantize_symmetric_per_axis(&values, &dims, plan.axis, 127.0) else {
        stats.notes.push(format!(
            "weight '{name}' holds NaN or infinity: left in float"
        ));
        return false;
    };
    let dims_i64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let q = g.add_initializer(
        names,
        &format!("{name}_quantized"),
        Tensor::from_i8(&dims_i64, &pa.q),
    );
    // First reader in the node order (a reader of this graph, or a node holding a subgraph
    // that reads the weight): the new nodes go just before it.
    let before = g.order.iter().copied().find(|&id| {
        plan.local.iter().any(|(n, _)| *n == id)
            || (plan.in_subgraphs && !g.node(id).subgraphs.is_empty())
    });
    let is_f16 = dt == DataType::Float16 as i32;
    let c = dims[plan.axis] as i64;
    // Output name: the weight's own name when the float weight goes away entirely, so every
    // reader (including subgraphs reading it by name) is served unchanged.
    let take_over = !plan.keep_float;
    let out_base = if take_over {
        format!("{name}\u{1}tmp")
    } else {
        format!("{name}_dequantized")
    };
    let base = format!("{name}_DequantizeLinear");
    let mut last: ValueId;
    if opset >= 13 {
        let scale_t = if is_f16 && opset >= 19 {
            let raw: Vec<u8> = pa
                .scales
                .iter()
                .flat_map(|s| half::f16::from_f32(*s).to_le_bytes())
                .collect();
            Tensor::from_raw(DataType::Float16 as i32, &[c], raw)
        } else {
            Tensor::from_f32(&[c], &pa.scales)
        };
        let s = g.add_initializer(names, &format!("{name}_scale"), scale_t);
        let (_, outs) = g.add_node(
            names,
            "DequantizeLinear",
            "",
            &base,
            vec![attr_int("axis", plan.axis as i64)],
            vec![Some(q), Some(s)],
            &[&out_base],
            before,
        );
        last = outs[0];
        if is_f16 && opset < 19 {
            last = cast(g, names, last, DataType::Float16, &name, before);
        }
    } else {
        let (_, outs) = if opset >= 10 {
            let one = g.add_initializer(names, &format!("{name}_unit_scale"), scalar_f32(1.0));
            g.add_node(
                names,
                "DequantizeLinear",
                "",
                &base,
                vec![],
                vec![Some(q), Some(one)],
                &[&format!("{name}_int8_as_float")],
                before,
            )
        } else {
            g.add_node(
                names,
                "Cast",
                "",
                &format!("{name}_Cast"),
                vec![attr_int("to", DataType::Float as i32 as i64)],
                vec![Some(q)],
                &[&format!("{name}_int8_as_float")],
                before,
            )
        };
        let mut sdims = vec![1i64; dims.len()];
        sdims[plan.axis] = c;
        let s = g.add_initializer(
            names,
            &format!("{name}_scale"),
            Tensor::from_f32(&sdims, &pa.scales),
        );
        let (_, m) = g.add_node(
            names,
            "Mul",
            "",
            &format!("{name}_scale_Mul"),
            vec![],
            vec![Some(outs[0]), Some(s)],
            &[&out_base],
            before,
        );
        last = m[0];
        if is_f16 {
            last = cast(g, names, last, DataType::Float16, &name, before);
        }
    }
    if take_over {
        g.replace_uses(w, last);
        g.remove_initializer(w);
        g.transfer_name(w, last);
    } else {
        for &(n, i) in &plan.local {
            g.set_input(n, i, Some(last));
        }
        if plan.in_subgraphs {
            let new_name = g.value(last).name.clone();
            let rank = dims.len();
            let ids: Vec<NodeId> = g.order.clone();
            for id in ids {
                for sg in g.node_mut(id).subgraphs_mut() {
                    redirect_sub(sg, &name, &new_name, rank, plan.axis, opts);
                }
            }
        }
    }
    true
}

fn cast(
    g: &mut Graph,
    names: &mut Names,
    x: ValueId,
    to: DataType,
    name: &str,
    before: Option<NodeId>,
) -> ValueId {
    let (_, outs) = g.add_node(
        names,
        "Cast",
        "",
        &format!("{name}_Cast"),
        vec![attr_int("to", to as i32 as i64)],
        vec![Some(x)],
        &[&format!("{name}_dequantized_cast")],
        before,
    );
    outs[0]
}
