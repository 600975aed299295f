//! `upgrade_opset`: the default-domain opset raised from 10, 11 or 12 to 13, the first with
//! per-axis QuantizeLinear / DequantizeLinear (per-channel weights in QDQ form).
//!
//! The same output on every input: every op whose behaviour or signature changed between the
//! model's opset and 13 is rewritten to its opset-13 form, following the adapters of ONNX's
//! version converter (`onnx/version_converter/convert.h`, ONNX 1.17); every other op of the
//! default domain is unchanged in meaning over those versions (its newer versions only add
//! types). In every graph, subgraphs included:
//! - `Squeeze`, `Unsqueeze`, `ReduceSum` (12 -> 13): the `axes` attribute becomes an int64
//!   initializer input; `Split` (12 -> 13): the `split` attribute likewise. An empty list is
//!   dropped, not moved: it means what an absent one does, as does an absent input.
//! - `Softmax`, `LogSoftmax`, `Hardmax` (12 -> 13): before 13 they work on the input flattened to
//!   2-D at `axis` (default 1), from 13 along `axis` alone. `axis = -1` means the same in both
//!   and stays; any other axis becomes `Flatten(axis) -> op(axis = -1) -> Reshape(Shape(x))`,
//!   the version converter's rewrite, exact for any rank.
//! - `Dropout` (11 -> 12): the `ratio` attribute (default 0.5) becomes a float input.
//! - `Clip` (10 -> 11): the `min` / `max` attributes become inputs of the input's element type
//!   (a model with a Clip whose input type is not known keeps opset 10, with a note).
//!
//! Left alone, with a note saying why (the opset stays): models with `Pad`, `Resize`,
//! `Scatter` or `Upsample` at opset 10 (their opset-11 forms differ in ways this pass does not
//! rewrite), a Resize with `coordinate_transformation_mode = tf_half_pixel_for_nn` (removed
//! from Resize-13), a Dropout before opset 12 whose mask is read (onnxruntime's older kernel
//! gives an all-false mask, Dropout-12 an all-true one), models whose local functions import
//! the default domain, opsets outside 10..=12.
//! The IR version is raised to 7 (the first that ONNX pairs with opset 13) when lower.

use anyhow::Result;

use super::{Pass, PassKind, PassOptions, PassStats};
use crate::ir::edit::attr_int;
use crate::ir::{Graph, Model, Names, NodeId, Tensor};
use std::collections::HashMap;

use crate::passes::convert_fp16::visit_value_types;

/// `TensorProto.DataType` codes of the float types a bound can take.
const FLOAT: i32 = crate::pb::tensor_proto::DataType::Float as i32;
const FLOAT16: i32 = crate::pb::tensor_proto::DataType::Float16 as i32;
const BFLOAT16: i32 = crate::pb::tensor_proto::DataType::Bfloat16 as i32;
const DOUBLE: i32 = crate::pb::tensor_proto::DataType::Double as i32;

/// See the module documentation.
pub struct UpgradeOpset;

/// The opset this pass raises models to.
pub const TARGET_OPSET: i64 = 13;

/// Ops whose opset-11 form changed in ways this pass does not rewrite (opset 10 models).
const NOT_FROM_10: [&str; 4] = ["Pad", "Resize", "Scatter", "Upsample"];

impl Pass for UpgradeOpset {
    fn name(&self) -> &'static str {
        "upgrade_opset"
    }
    fn summary(&self) -> &'static str {
        "default-domain opset 10-12 raised to 13 (per-axis QDQ), ops rewritten to their opset-13 forms"
    }
    fn kind(&self) -> PassKind {
        PassKind::Exact
    }
    fn run(&self, model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        let Some(from) = model.opset("") else {
            return Ok(stats);
        };
        if from < 10 {
            stats.notes.push(format!(
                "opset {from} kept: this pass raises opsets 10 to 12 (ops such as Upsample, Slice, BatchNormalization and Dropout changed before opset 10 in ways it does not rewrite)"
            ));
            return Ok(stats);
        }
        if from >= TARGET_OPSET {
            return Ok(stats);
        }
        if model.header.functions.iter().any(|f| {
            f.opset_import
                .iter()
                .any(|o| crate::ir::normal_domain(o.domain()).is_empty())
        }) {
            stats.notes.push(format!(
                "opset {from} kept: the model's local functions import the default domain"
            ));
            return Ok(stats);
        }
        if from == 10 {
            let mut found: Vec<String> = Vec::new();
            model.graph.visit(&mut |g: &Graph| {
                for (_, n) in g.live_nodes() {
                    if n.domain().is_empty() && NOT_FROM_10.contains(&n.op_type()) {
                        found.push(format!("{} \"{}\"", n.op_type(), n.name()));
                    }
                }
            });
            if !found.is_empty() {
                found.sort();
                found.dedup();
                stats.notes.push(format!(
                    "opset 10 kept: {} changed at opset 11 in ways this pass does not rewrite",
                    found.join(", ")
                ));
                return Ok(stats);
            }
        }
        // What opset 13 removed or computes otherwise, which no rewrite here keeps: Resize's
        // `tf_half_pixel_for_nn` coordinate mode (gone from Resize-13), and Dropout's mask
        // when something reads it (onnxruntime's Dropout before opset 12 gives an all-false
        // mask in inference, its Dropout-12 and the spec an all-true one).
        let mut kept: Vec<String> = Vec::new();
        model.graph.visit(&mut |g: &Graph| {
            let uses = g.uses();
            let sub_reads = g.names_read_by_subgraphs();
            for (id, n) in g.live_nodes() {
                if !n.domain().is_empty() {
                    continue;
                }
                if n.is("Resize")
                    && n.attr_str("coordinate_transformation_mode") == Some(b"tf_half_pixel_for_nn")
                {
                    kept.push(format!(
                        "{} uses coordinate_transformation_mode tf_half_pixel_for_nn, which Resize-13 removed",
                        n.label(id)
                    ));
                }
                let mask_read = n.outputs.get(1).copied().flatten().is_some_and(|m| {
                    crate::passes::eliminate_unused_initializers::is_read(g, &uses, &sub_reads, m)
                });
                if n.is("Dropout") && from <= 11 && mask_read {
                    kept.push(format!(
                        "{} has its mask read, which onnxruntime computes otherwise from opset 12 (all true, not all false)",
                        n.label(id)
                    ));
                }
            }
        });
        if !kept.is_empty() {
            kept.sort();
            kept.dedup();
            stats
                .notes
                .push(format!("opset {from} kept: {}", kept.join("; ")));
            return Ok(stats);
        }
        // Clip-11's bounds are inputs of the input's own type (by the Clip's output name):
        // a Clip whose input type no rule gives could get bounds of another type, which
        // onnxruntime refuses.
        let mut clip_types: HashMap<String, i32> = HashMap::new();
        if from == 10 {
            let mut untyped: Vec<String> = Vec::new();
            visit_value_types(&model.graph, from, &HashMap::new(), &mut |g, types| {
                for (id, n) in g.live_nodes() {
                    if !(n.domain().is_empty() && n.is("Clip")) {
                        continue;
                    }
                    let x = n.inputs.first().copied().flatten();
                    match (
                        x.and_then(|x| types[x.0 as usize]),
                        n.outputs.first().copied().flatten(),
                    ) {
                        (Some(t), Some(y)) => {
                            clip_types.insert(g.value(y).name.clone(), t);
                        }
                        _ => untyped.push(n.label(id)),
                    }
                }
            });
            if !untyped.is_empty() {
                untyped.sort();
                untyped.dedup();
                stats.notes.push(format!(
                    "opset 10 kept: the input type of {} is not known, and Clip-11 takes its bounds in that type",
                    untyped.join(", ")
                ));
                return Ok(stats);
            }
        }
        let mut rewritten = 0usize;
        model.for_each_graph_mut(&mut |g, names| {
            rewritten += upgrade_graph(g, names, from, &clip_types);
        });
        model.set_opset("", TARGET_OPSET);
        if model.header.ir_version() < 7 {
            model.header.ir_version = Some(7);
        }
        stats.changes = 1 + rewritten;
        stats.notes.push(format!(
            "opset {from} -> {TARGET_OPSET}: {rewritten} node(s) rewritten to their opset-{TARGET_OPSET} form"
        ));
        Ok(stats)
    }
}

/// Rewrites the nodes of `g` (not its subgraphs) from opset `from` to [`TARGET_OPSET`];
/// returns how many were rewritten.
fn upgrade_graph(
    g: &mut Graph,
    names: &mut Names,
    from: i64,
    clip_types: &HashMap<String, i32>,
) -> usize {
    let ids: Vec<NodeId> = g
        .live_nodes()
        .filter(|(_, n)| n.domain().is_empty())
        .map(|(id, _)| id)
        .collect();
    let mut count = 0;
    for id in ids {
        let op = g.node(id).op_type().to_string();
        // A Clip's input type (its bounds take it), found in `run` by its output's name.
        let x_type = g
            .node(id)
            .outputs
            .first()
            .copied()
            .flatten()
            .and_then(|y| clip_types.get(&g.value(y).name).copied());
        let done = match op.as_str() {
            "Squeeze" | "Unsqueeze" | "ReduceSum" => {
                attr_to_input(g, names, id, "axes", 1, Kind::I64)
            }
            "Split" => attr_to_input(g, names, id, "split", 1, Kind::I64),
            "Softmax" | "LogSoftmax" | "Hardmax" => softmax_axis(g, names, id),
            // Dropout-12's ratio is its own type T1 (float32 here).
            "Dropout" if from <= 11 => {
                attr_to_input(g, names, id, "ratio", 1, Kind::Float(Some(0.5), FLOAT))
            }
            // Both moved (no short circuit), in the input's type (checked in `run`); an
            // absent bound stays absent.
            "Clip" if from == 10 => {
                let t = x_type.unwrap_or(FLOAT);
                attr_to_input(g, names, id, "min", 1, Kind::Float(None, t))
                    | attr_to_input(g, names, id, "max", 2, Kind::Float(None, t))
            }
            _ => false,
        };
        count += usize::from(done);
    }
    count
}

/// Element type of an attribute turned into an input: ints, or a float with the value an
/// absent attribute has (`None`: an absent attribute stays an absent input) and the tensor's
/// element type (float32, float16, bfloat16 or double).
enum Kind {
    I64,
    Float(Option<f32>, i32),
}

/// Moves attribute `name` of node `id` to input `slot` as an initializer (ints as a 1-D int64
/// tensor, a float as a scalar; an absent float with a default becomes that default). Returns
/// false when nothing was moved.
fn attr_to_input(
    g: &mut Graph,
    names: &mut Names,
    id: NodeId,
    name: &str,
    slot: usize,
    kind: Kind,
) -> bool {
    let n = g.node(id);
    let pos = n.proto.attribute.iter().position(|a| a.name() == name);
    let attr = match (pos, &kind) {
        (Some(p), _) => n.proto.attribute[p].clone(),
        (None, Kind::Float(Some(v), _)) => crate::ir::edit::attr_float(name, *v),
        (None, _) => return false,
    };
    let base = format!(
        "{}_{name}",
        if n.name().is_empty() {
            n.op_type()
        } else {
            n.name()
        }
    );
    if matches!(kind, Kind::I64) && attr.ints.is_empty() {
        // An empty list means what an absent one does (reduce or squeeze every axis, split
        // evenly), and so does an absent input; an empty input is read otherwise by some
        // runtimes (tract reduces no axis).
        if let Some(p) = pos {
            g.node_mut(id).proto.attribute.remove(p);
        }
        return pos.is_some();
    }
    let tensor = match kind {
        Kind::I64 => Tensor::from_i64(&[attr.ints.len() as i64], &attr.ints),
        Kind::Float(_, code) => {
            let v = attr.f.unwrap_or(0.0);
            match code {
                FLOAT16 => {
                    Tensor::from_raw(code, &[], half::f16::from_f32(v).to_le_bytes().to_vec())
                }
                DOUBLE => Tensor::from_raw(code, &[], f64::from(v).to_le_bytes().to_vec()),
                BFLOAT16 => {
                    Tensor::from_raw(code, &[], half::bf16::from_f32(v).to_le_bytes().to_vec())
                }
                _ => Tensor::from_f32(&[], &[v]),
            }
        }
    };
    let v = g.add_initializer(names, &base, tensor);
    if let Some(p) = pos {
        g.node_mut(id).proto.attribute.remove(p);
    }
    // Optional inputs between the existing ones and `slot` are empty.
    g.set_input(id, slot, Some(v));
    true
}

/// Softmax-family `axis` from opset-12 to opset-13 meaning (see the module documentation).
fn softmax_axis(g: &mut Graph, names: &mut Names, id: NodeId) -> bool {
    let n = g.node(id);
    let axis = n.attr_int("axis", 1);
    if axis == -1 {
        return false;
    }
    let (Some(Some(x)), Some(Some(y))) = (n.inputs.first().copied(), n.outputs.first().copied())
    else {
        return false;
    };
    let base = if n.name().is_empty() {
        n.op_type().to_string()
    } else {
        n.name().to_string()
    };
    let after = g
        .order
        .iter()
        .position(|&k| k == id)
        .and_then(|p| g.order.get(p + 1).copied());
    let (_, shape) = g.add_node(
        names,
        "Shape",
        "",
        &format!("{base}_shape"),
        vec![],
        vec![Some(x)],
        &[&format!("{base}_shape")],
        Some(id),
    );
    let (_, flat) = g.add_node(
        names,
        "Flatten",
        "",
        &format!("{base}_flatten"),
        vec![attr_int("axis", axis)],
        vec![Some(x)],
        &[&format!("{base}_flat")],
        Some(id),
    );
    g.set_input(id, 0, Some(flat[0]));
    {
        let attrs = &mut g.node_mut(id).proto.attribute;
        attrs.retain(|a| a.name() != "axis");
        attrs.push(attr_int("axis", -1));
    }
    // The op's output moves to a fresh name; a Reshape back to the input's shape takes over
    // the original value's name, readers and graph-output place.
    let y_name = g.value(y).name.clone();
    let (reshape, r) = g.add_node(
        names,
        "Reshape",
        "",
        &format!("{base}_reshape"),
        vec![],
        vec![Some(y), Some(shape[0])],
        &[&format!("{y_name}_2d")],
        after,
    );
    let r = r[0];
    // Swap names: `r` becomes `y_name`, `y` takes `r`'s fresh name.
    let r_name = g.value(r).name.clone();
    g.value_mut(y).name = r_name.clone();
    g.value_mut(r).name = y_name.clone();
    g.by_name.insert(r_name, y);
    g.by_name.insert(y_name, r);
    g.replace_uses(y, r);
    g.set_input(reshape, 0, Some(y));
    g.redirect_outputs(y, r);
    true
}
