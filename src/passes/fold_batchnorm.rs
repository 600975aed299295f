//! `fold_batchnorm`: an inference BatchNormalization folded into the Conv, ConvTranspose or
//! Gemm that produces its input.
//!
//! Before:
//! ```text
//! x = Conv(a, W, b?)                          (or ConvTranspose, or Gemm(a, W, C?))
//! y = BatchNormalization(x, scale, B, mean, var)
//! ```
//! After:
//! ```text
//! y = Conv(a, W', b')                         (the producer's output takes y's place)
//! ```
//!
//! The formula is the one of ONNX BatchNormalization-15 (the same for every version in
//! inference): `Y = (X - input_mean) / sqrt(input_var + epsilon) * scale + B`, per channel
//! (axis 1). With `s = scale / sqrt(var + epsilon)`, computed in f64 and stored in the weight's
//! element type:
//! - `W'[o, ...] = W[o, ...] * s[o]` along the producer's output-channel axis: axis 0 of a Conv
//!   weight `[M, C/group, k...]`; for a ConvTranspose weight `[C_in, M/group, k...]` the slice
//!   `W[c, j, ...]` feeds output channel `(c / (C_in/group)) * (M/group) + j`; for Gemm
//!   (`Y = alpha * A * B' + beta * C`) row `n` of `B` when `transB = 1` (`[N, K]`), column `n`
//!   when `transB = 0` (`[K, N]`).
//! - Conv / ConvTranspose: `b'[o] = (b[o] - mean[o]) * s[o] + B[o]` (`b = 0` when the producer
//!   has no bias; a bias input is then added).
//! - Gemm: `C' = (s * (beta * C - mean) + B) / beta`, broadcast to at least `[N]` along the
//!   last axis (`C` of shape `[]`, `[1]`, `[N]`, `[1, N]`, `[M, 1]` or `[M, N]`); when `C` is
//!   absent or `beta == 0`, `C' = B - s * mean` and `beta` becomes 1. `alpha` is unchanged.
//!
//! Preconditions (anything else is left alone; a note says why when the BatchNormalization
//! follows a Conv, ConvTranspose or Gemm, runs in training mode or has `spatial = 0`):
//! - the BatchNormalization is of the default domain, `training_mode` absent or 0, `spatial`
//!   (opset < 9) absent or 1, and only output 0 is used; before opset 14 only output 0 is
//!   declared (declaring the statistics outputs selects training mode there; `is_test` of
//!   opset < 7 is ignored, as runtimes do);
//! - its input `x` is output 0 of a Conv, ConvTranspose or Gemm of the same graph, and the
//!   BatchNormalization is its only reader: `x` is not a graph output, not read by name by a
//!   subgraph and not read by another node;
//! - `scale`, `B`, `mean`, `var`, the producer's weight and bias (Gemm: `C`, unless `beta == 0`)
//!   are float32 or float16 initializers of this graph that are not graph inputs (a graph input
//!   can be overridden at run time), with per-channel vectors of length C = output channels;
//! - every folded value is finite in the weight's element type;
//! - Gemm from opset 7 on (earlier Gemm did not broadcast `C`); IR version 4 or later (new
//!   initializers need not be graph inputs).
//!
//! A weight, bias or `C` initializer that only the producer reads is rewritten in place;
//! one that anything else also reads (another node, a graph output, a subgraph, a graph input
//! listing) is left unchanged and the producer reads a new initializer named after it with
//! `_bnfolded` appended. When `y` is a graph output or a subgraph reads it, `x` takes its name.
//! Within one run, folding repeats until no BatchNormalization folds, so a chain
//! `Conv -> BatchNormalization -> BatchNormalization` folds completely.
//!
//! Not done: BatchNormalization after any other op (MatMul, Add, a graph input); folding into
//! the following layer instead of the preceding one; float64 or bfloat16 weights; removing an
//! original weight that became unused once folded copies were made
//! (`eliminate_unused_initializers` does that).

use anyhow::{ensure, Result};
use half::f16;
use rayon::prelude::*;

use super::{can_add_initializers, Pass, PassKind, PassOptions, PassStats};
use crate::ir::edit::attr_float;
use crate::ir::{Graph, Model, Names, NodeId, Tensor, ValueDef, ValueId};
use crate::pb::tensor_proto::DataType;

/// See the module documentation.
pub struct FoldBatchnorm;

/// Most rounds of folding in one graph per run (each round folds one more level of a chain).
const MAX_ROUNDS: usize = 16;

impl Pass for FoldBatchnorm {
    fn name(&self) -> &'static str {
        "fold_batchnorm"
    }
    fn summary(&self) -> &'static str {
        "inference BatchNormalization folded into the preceding Conv, ConvTranspose or Gemm"
    }
    fn kind(&self) -> PassKind {
        PassKind::ExactUpToRounding
    }
    fn run(&self, model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        if !can_add_initializers(model) {
            let mut count = 0;
            model.graph.visit(&mut |g| {
                count += g
                    .live_nodes()
                    .filter(|(_, n)| n.is("BatchNormalization"))
                    .count();
            });
            if count > 0 {
                stats.notes.push(format!(
                    "IR version {} requires initializers to be graph inputs: {count} \
                     BatchNormalization node(s) kept",
                    model.header.ir_version()
                ));
            }
            return Ok(stats);
        }
        // A model without a default-domain import has no valid BatchNormalization: no
        // opset-dependent restriction applies then.
        let opset = model.opset("").unwrap_or(i64::MAX);
        let mut notes: Vec<String> = Vec::new();
        model.for_each_graph_mut(&mut |g, names| {
            for _ in 0..MAX_ROUNDS {
                let (folds, round_notes) = find_folds(g, opset);
                for n in round_notes {
                    if !notes.contains(&n) {
                        notes.push(n);
                    }
                }
                if folds.is_empty() {
                    break;
                }
                for f in folds {
                    apply(g, names, f);
                    stats.changes += 1;
                }
            }
        });
        stats.notes = notes;
        Ok(stats)
    }
}

/// The op that produces the BatchNormalization's input.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Producer {
    Conv,
    ConvTranspose,
    Gemm,
}

/// Where a folded tensor goes.
#[derive(Debug)]
enum Target {
    /// Overwrite this initializer (only the producer reads it).
    InPlace(ValueId),
    /// Add an initializer with a fresh name derived from this base; the producer reads it.
    New(String),
}

/// One folded tensor: the producer's input `slot` gets `tensor`.
#[derive(Debug)]
struct Write {
    slot: usize,
    target: Target,
    tensor: Tensor,
}

/// Everything the write phase needs to fold one BatchNormalization.
#[derive(Debug)]
struct Fold {
    bn: NodeId,
    producer: NodeId,
    x: ValueId,
    y: ValueId,
    /// `y` is a graph output or read by a subgraph: `x` takes its name.
    keep_name: bool,
    writes: Vec<Write>,
    /// Gemm: set `beta` to this value.
    set_beta: Option<f32>,
}

/// Why a BatchNormalization is not folded: `None` for a case nobody needs to hear about (not
/// after a foldable op), `Some(reason)` for one a user would want to know.
type Skip = Option<String>;

fn note<T>(why: impl Into<String>) -> Result<T, Skip> {
    Err(Some(why.into()))
}

/// Read phase: every BatchNormalization of `g` that can be folded, and notes on those that
/// cannot.
fn find_folds(g: &Graph, opset: i64) -> (Vec<Fold>, Vec<String>) {
    let reader = Reader {
        g,
        uses: g.uses(),
        sub_reads: g.names_read_by_subgraphs(),
        opset,
    };
    let mut folds = Vec::new();
    let mut notes = Vec::new();
    for (id, n) in g.live_nodes() {
        if !n.is("BatchNormalization") {
            continue;
        }
        match reader.plan(id) {
            Ok(f) => folds.push(f),
            Err(None) => {}
            Err(Some(why)) => notes.push(format!("{}: {why}, not folded", n.label(id))),
        }
    }
    (folds, notes)
}

/// The analyses of one graph that the read phase consults.
struct Reader<'a> {
    g: &'a Graph,
    uses: Vec<Vec<(NodeId, usize)>>,
    sub_reads: std::collections::HashSet<String>,
    opset: i64,
}

/// A float initializer read as f64 values.
struct Constant<'a> {
    tensor: &'a Tensor,
    values: Vec<f64>,
}

impl Constant<'_> {
    fn dims(&self) -> &[i64] {
        self.tensor.dims()
    }
    fn dtype(&self) -> i32 {
        self.tensor.data_type()
    }
}

impl<'a> Reader<'a> {
    fn name(&self, v: ValueId) -> &str {
        &self.g.value(v).name
    }

    /// Is `v` read by anyone besides input `slot` of `node`?
    fn exclusive(&self, v: ValueId, node: NodeId, slot: usize) -> bool {
        self.uses[v.0 as usize] == [(node, slot)]
            && !self.g.is_graph_output(v)
            && !self.g.is_graph_input(v)
            && !self.sub_reads.contains(self.name(v))
    }

    /// `v` as a float32 / float16 initializer of this graph that cannot be overridden.
    /// `what` is the tensor's role, `owner` the node it belongs to (`""` for the
    /// BatchNormalization itself): they name the tensor in notes.
    fn constant(&self, what: &str, owner: &str, v: ValueId) -> Result<Constant<'a>, Skip> {
        let what = describe(what, self.name(v), owner);
        let Some(tensor) = self.g.initializer(v) else {
            return note(format!("{what} is not an initializer of this graph"));
        };
        if self.g.is_graph_input(v) {
            return note(format!(
                "{what} is a graph input (it can be overridden at run time)"
            ));
        }
        let dt = tensor.data_type();
        if dt != DataType::Float as i32 && dt != DataType::Float16 as i32 {
            return note(format!("{what} is {}", tensor.dtype_name()));
        }
        match tensor.to_f32() {
            Ok(v) => Ok(Constant {
                tensor,
                values: v.into_iter().map(f64::from).collect(),
            }),
            Err(e) => note(format!("{what} cannot be read: {e}")),
        }
    }

    /// `v` as a per-channel vector of length `c`.
    fn channel_vector(
        &self,
        what: &str,
        owner: &str,
        v: ValueId,
        c: usize,
    ) -> Result<Vec<f64>, Skip> {
        let k = self.constant(what, owner, v)?;
        if k.dims().len() != 1 || k.values.len() != c {
            return note(format!(
                "{} has shape {:?}, not [{c}]",
                describe(what, self.name(v), owner),
                k.dims()
            ));
        }
        Ok(k.values)
    }

    /// Where a tensor written for input `slot` of `producer` (currently `old`) goes.
    fn target(
        &self,
        old: Option<ValueId>,
        producer: NodeId,
        slot: usize,
        tensor: &Tensor,
        new_base: &str,
    ) -> Target {
        if let Some(v) = old {
            let same_type = self
                .g
                .initializer(v)
                .is_some_and(|t| t.dims() == tensor.dims() && t.data_type() == tensor.data_type());
            if same_type && self.exclusive(v, producer, slot) {
                return Target::InPlace(v);
            }
        }
        Target::New(new_base.to_string())
    }

    fn plan(&self, bn_id: NodeId) -> Result<Fold, Skip> {
        let g = self.g;
        let bn = g.node(bn_id);
        if bn.attr_int("training_mode", 0) != 0 {
            return note("it runs in training mode (training_mode = 1)");
        }
        if bn.attr_int("spatial", 1) != 1 {
            return note("spatial = 0 (per-element statistics) is not handled");
        }
        // Before BatchNormalization-14, declaring the statistics outputs is what selects
        // training mode (onnxruntime then normalizes with the batch's statistics), used or not.
        if self.opset < 14 && bn.outputs.iter().skip(1).flatten().next().is_some() {
            return note(format!(
                "it declares running-statistics outputs, which before opset 14 means training mode (batch statistics; opset {})",
                self.opset
            ));
        }
        let &[Some(x), Some(bn_scale), Some(bn_bias), Some(bn_mean), Some(bn_var)] =
            bn.inputs.as_slice()
        else {
            return Err(None);
        };
        let Some(&Some(y)) = bn.outputs.first() else {
            return Err(None);
        };
        let ValueDef::Node(p, 0) = g.value(x).def else {
            return Err(None);
        };
        let prod = g.node(p);
        let kind = match prod.op_type() {
            _ if !prod.domain().is_empty() => return Err(None),
            "Conv" => Producer::Conv,
            "ConvTranspose" => Producer::ConvTranspose,
            "Gemm" => Producer::Gemm,
            _ => return Err(None),
        };
        let plabel = prod.label(p);
        for &o in bn.outputs.iter().skip(1).flatten() {
            if !self.uses[o.0 as usize].is_empty()
                || g.is_graph_output(o)
                || self.sub_reads.contains(self.name(o))
            {
                return note(format!(
                    "its output \"{}\" (running statistics) is used",
                    self.name(o)
                ));
            }
        }
        let xname = self.name(x);
        if self.uses[x.0 as usize] != [(bn_id, 0)] {
            return note(format!(
                "its input \"{xname}\" (from {plabel}) is also read by other nodes"
            ));
        }
        if g.is_graph_output(x) {
            return note(format!("its input \"{xname}\" is also a graph output"));
        }
        if self.sub_reads.contains(xname) {
            let by = if g.names_read_by_header().contains(xname) {
                "named by the model's training_info or the graph's quantization_annotation"
            } else {
                "read by a subgraph"
            };
            return note(format!("its input \"{xname}\" is also {by}"));
        }
        if kind == Producer::Gemm && self.opset < 7 {
            return note(format!(
                "Gemm before opset 7 (opset {}) is not handled",
                self.opset
            ));
        }
        let Some(&Some(w)) = prod.inputs.get(1) else {
            return Err(None);
        };
        let weight = self.constant("weight", &plabel, w)?;
        let wdims = weight.dims().to_vec();
        if wdims.iter().any(|&d| d < 1) {
            return note(format!("the weight of {plabel} has shape {wdims:?}"));
        }
        let dim = |i: usize| wdims.get(i).map_or(0, |&d| d as usize);
        let total = weight.values.len();

        // Output channels and, for every weight element, the channel it feeds.
        let group = prod.attr_int("group", 1);
        let trans_b = prod.attr_int("transB", 0) != 0;
        let (channels, chan): (usize, Box<dyn Fn(usize) -> usize + Sync>) = match kind {
            Producer::Conv => {
                if wdims.len() < 3 {
                    return note(format!("the weight of {plabel} has shape {wdims:?}"));
                }
                let m = dim(0);
                let inner = total / m;
                (m, Box::new(move |i| i / inner))
            }
            Producer::ConvTranspose => {
                let c_in = dim(0);
                let ok = wdims.len() >= 3 && group >= 1 && c_in % group as usize == 0;
                if !ok {
                    return note(format!(
                        "the weight of {plabel} has shape {wdims:?} with group {group}"
                    ));
                }
                let group = group as usize;
                let m_per_group = dim(1);
                let c_per_group = c_in / group;
                let kernel = total / (c_in * m_per_group);
                (
                    m_per_group * group,
                    Box::new(move |i| {
                        let cj = i / kernel;
                        let (c, j) = (cj / m_per_group, cj % m_per_group);
                        (c / c_per_group) * m_per_group + j
                    }),
                )
            }
            Producer::Gemm => {
                if wdims.len() != 2 {
                    return note(format!("the weight of {plabel} has shape {wdims:?}"));
                }
                if trans_b {
                    let (n, k) = (dim(0), dim(1));
                    (n, Box::new(move |i| i / k))
                } else {
                    let n = dim(1);
                    (n, Box::new(move |i| i % n))
                }
            }
        };

        let scale = self.channel_vector("scale", "", bn_scale, channels)?;
        let bias = self.channel_vector("B", "", bn_bias, channels)?;
        let mean = self.channel_vector("input_mean", "", bn_mean, channels)?;
        let var = self.channel_vector("input_var", "", bn_var, channels)?;
        let eps = f64::from(bn.attr_float("epsilon", 1e-5));
        let s: Vec<f64> = scale
            .iter()
            .zip(&var)
            .map(|(&sc, &v)| sc / (v + eps).sqrt())
            .collect();
        if let Some(o) = s.iter().position(|v| !v.is_finite()) {
            return note(format!(
                "scale / sqrt(input_var + epsilon) is not finite for channel {o}"
            ));
        }

        let dtype = weight.dtype();
        let new_w: Vec<f64> = weight
            .values
            .par_iter()
            .enumerate()
            .map(|(i, &v)| v * s[chan(i)])
            .collect();
        let new_w = encode(dtype, &wdims, &new_w)
            .map_err(|e| Some(format!("the folded weight of {plabel} {e}")))?;
        let wname = self.name(w);
        let mut writes = vec![Write {
            slot: 1,
            target: self.target(Some(w), p, 1, &new_w, &format!("{wname}_bnfolded")),
            tensor: new_w,
        }];
        let bias_base = format!("{}_bnfolded", self.name(bn_bias));
        let old_bias = prod.inputs.get(2).copied().flatten();
        let mut set_beta = None;

        if kind == Producer::Gemm {
            let beta = f64::from(prod.attr_float("beta", 1.0));
            // C' and its dims.
            let (c_new, c_dims) = match old_bias.filter(|_| beta != 0.0) {
                Some(c) => {
                    let k = self.constant("C", &plabel, c)?;
                    if k.dtype() != dtype {
                        return note(format!(
                            "C of {plabel} is {}, its weight {}",
                            k.tensor.dtype_name(),
                            weight.tensor.dtype_name()
                        ));
                    }
                    let cd = k.dims();
                    let (rows, cols, rank2) = match *cd {
                        [] => (1, 1, false),
                        [a] => (1, a as usize, false),
                        [a, b] => (a as usize, b as usize, true),
                        _ => (0, 0, false),
                    };
                    if rows == 0 || (cols != 1 && cols != channels) {
                        return note(format!(
                            "C of {plabel} has shape {cd:?}, which does not broadcast to \
                             [M, {channels}]"
                        ));
                    }
                    let mut out = Vec::with_capacity(rows * channels);
                    for r in 0..rows {
                        for n in 0..channels {
                            let cv = k.values[r * cols + if cols == 1 { 0 } else { n }];
                            out.push((s[n] * (beta * cv - mean[n]) + bias[n]) / beta);
                        }
                    }
                    let dims = if rank2 {
                        vec![rows as i64, channels as i64]
                    } else {
                        vec![channels as i64]
                    };
                    (out, dims)
                }
                None => {
                    set_beta = Some(1.0);
                    let out = (0..channels).map(|n| bias[n] - s[n] * mean[n]).collect();
                    (out, vec![channels as i64])
                }
            };
            let c_new = encode(dtype, &c_dims, &c_new)
                .map_err(|e| Some(format!("the folded C of {plabel} {e}")))?;
            let base = match old_bias {
                Some(c) => format!("{}_bnfolded", self.name(c)),
                None => bias_base,
            };
            writes.push(Write {
                slot: 2,
                target: self.target(old_bias, p, 2, &c_new, &base),
                tensor: c_new,
            });
        } else {
            let old = match old_bias {
                Some(b) => {
                    let k = self.channel_vector("bias", &plabel, b, channels)?;
                    if self.g.initializer(b).map(Tensor::data_type) != Some(dtype) {
                        return note(format!(
                            "the bias of {plabel} and its weight differ in element type"
                        ));
                    }
                    k
                }
                None => vec![0.0; channels],
            };
            let b_new: Vec<f64> = (0..channels)
                .map(|o| (old[o] - mean[o]) * s[o] + bias[o])
                .collect();
            let b_new = encode(dtype, &[channels as i64], &b_new)
                .map_err(|e| Some(format!("the folded bias of {plabel} {e}")))?;
            let base = match old_bias {
                Some(b) => format!("{}_bnfolded", self.name(b)),
                None => bias_base,
            };
            writes.push(Write {
                slot: 2,
                target: self.target(old_bias, p, 2, &b_new, &base),
                tensor: b_new,
            });
        }

        Ok(Fold {
            bn: bn_id,
            producer: p,
            x,
            y,
            keep_name: g.is_graph_output(y) || self.sub_reads.contains(self.name(y)),
            writes,
            set_beta,
        })
    }
}

/// `weight "w" of Conv node "c1"`, or `scale "s"` when `owner` is empty.
fn describe(what: &str, name: &str, owner: &str) -> String {
    if owner.is_empty() {
        format!("{what} \"{name}\"")
    } else {
        format!("{what} \"{name}\" of {owner}")
    }
}

/// `values` stored as a tensor of element type `dtype` (float32 or float16) with `dims`.
///
/// Errors (completing "the folded weight of ... ") when a value is not finite once stored.
fn encode(dtype: i32, dims: &[i64], values: &[f64]) -> Result<Tensor> {
    if dtype == DataType::Float16 as i32 {
        let h: Vec<f16> = values.iter().map(|&v| f16::from_f64(v)).collect();
        ensure!(
            h.iter().all(|v| v.is_finite()),
            "does not fit in float16 (overflow or not a number)"
        );
        let raw: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
        return Ok(Tensor::from_raw(dtype, dims, raw));
    }
    let f: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    ensure!(
        f.iter().all(|v| v.is_finite()),
        "does not fit in float32 (overflow or not a number)"
    );
    Ok(Tensor::from_f32(dims, &f))
}

/// Write phase: applies one fold through the edit API.
fn apply(g: &mut Graph, names: &mut Names, f: Fold) {
    for w in f.writes {
        match w.target {
            Target::InPlace(v) => g.set_initializer(v, w.tensor),
            Target::New(base) => {
                let v = g.add_initializer(names, &base, w.tensor);
                g.set_input(f.producer, w.slot, Some(v));
            }
        }
    }
    if let Some(beta) = f.set_beta {
        let attrs = &mut g.node_mut(f.producer).proto.attribute;
        match attrs.iter_mut().find(|a| a.name() == "beta") {
            Some(a) => a.f = Some(beta),
            None => attrs.push(attr_float("beta", beta)),
        }
    }
    g.remove_node(f.bn);
    if f.keep_name {
        g.transfer_name(f.y, f.x);
        g.redirect_outputs(f.y, f.x);
    }
    g.replace_uses(f.y, f.x);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use anyhow::{ensure, Context, Result};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tract_onnx::prelude::Tensor as TractTensor;

    use super::*;
    use crate::ir::edit::attr_int;
    use crate::pb;

    fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto {
            name: Some(name.to_string()),
            ints: v.to_vec(),
            r#type: Some(pb::attribute_proto::AttributeType::Ints as i32),
            ..Default::default()
        }
    }

    fn attr_graph(name: &str, g: pb::GraphProto) -> pb::AttributeProto {
        pb::AttributeProto {
            name: Some(name.to_string()),
            g: Some(g),
            r#type: Some(pb::attribute_proto::AttributeType::Graph as i32),
            ..Default::default()
        }
    }

    fn node(
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
    ) -> pb::NodeProto {
        pb::NodeProto {
            op_type: Some(op.to_string()),
            name: Some(name.to_string()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        }
    }

    /// A float32 initializer in `float_data`, as many exporters write them.
    fn init(name: &str, dims: &[i64], data: Vec<f32>) -> pb::TensorProto {
        pb::TensorProto {
            name: Some(name.to_string()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Float as i32),
            float_data: data,
            ..Default::default()
        }
    }

    fn info(name: &str, elem: DataType, dims: Option<&[i64]>) -> pb::ValueInfoProto {
        let shape = dims.map(|dims| pb::TensorShapeProto {
            dim: dims
                .iter()
                .map(|&d| pb::tensor_shape_proto::Dimension {
                    value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                    ..Default::default()
                })
                .collect(),
        });
        pb::ValueInfoProto {
            name: Some(name.to_string()),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: Some(elem as i32),
                    shape,
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn graph(
        nodes: Vec<pb::NodeProto>,
        inputs: Vec<pb::ValueInfoProto>,
        outputs: &[&str],
        inits: Vec<pb::TensorProto>,
    ) -> pb::GraphProto {
        pb::GraphProto {
            name: Some("g".to_string()),
            node: nodes,
            input: inputs,
            output: outputs
                .iter()
                .map(|o| info(o, DataType::Float, None))
                .collect(),
            initializer: inits,
            ..Default::default()
        }
    }

    fn model(g: pb::GraphProto) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: Some(8),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(15),
            }],
            producer_name: Some("fold_batchnorm tests".to_string()),
            graph: Some(g),
            ..Default::default()
        }
    }

    fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..hi)).collect()
    }

    /// `scale`, `B`, `mean` and `var` initializers named `{p}.scale` ... for `c` channels.
    fn bn_params(rng: &mut ChaCha8Rng, p: &str, c: usize) -> Vec<pb::TensorProto> {
        let d = [c as i64];
        vec![
            init(&format!("{p}.scale"), &d, uniform(rng, c, 0.5, 2.0)),
            init(&format!("{p}.bias"), &d, uniform(rng, c, -1.0, 1.0)),
            init(&format!("{p}.mean"), &d, uniform(rng, c, -1.0, 1.0)),
            init(&format!("{p}.var"), &d, uniform(rng, c, 0.1, 2.0)),
        ]
    }

    fn bn_node(p: &str, x: &str, y: &str, attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
        let params = ["scale", "bias", "mean", "var"].map(|k| format!("{p}.{k}"));
        let mut inputs = vec![x];
        inputs.extend(params.iter().map(String::as_str));
        node("BatchNormalization", p, &inputs, &[y], attrs)
    }

    /// `x -> op(x, w, b?) -> BatchNormalization -> (Relu ->) y`.
    struct Case {
        op: &'static str,
        x: Vec<i64>,
        w: Vec<i64>,
        channels: usize,
        bias: bool,
        attrs: Vec<pb::AttributeProto>,
        relu_after: bool,
    }

    fn case_model(seed: u64, c: Case) -> pb::ModelProto {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let wn: i64 = c.w.iter().product();
        let mut inits = vec![init("w", &c.w, uniform(&mut rng, wn as usize, -1.0, 1.0))];
        let mut prod_inputs = vec!["x", "w"];
        if c.bias {
            let b = uniform(&mut rng, c.channels, -1.0, 1.0);
            inits.push(init("b", &[c.channels as i64], b));
            prod_inputs.push("b");
        }
        inits.extend(bn_params(&mut rng, "bn", c.channels));
        let bn_out = if c.relu_after { "bn_out" } else { "y" };
        let mut nodes = vec![
            node(c.op, "prod", &prod_inputs, &["prod_out"], c.attrs),
            bn_node("bn", "prod_out", bn_out, vec![]),
        ];
        if c.relu_after {
            nodes.push(node("Relu", "relu", &["bn_out"], &["y"], vec![]));
        }
        model(graph(
            nodes,
            vec![info("x", DataType::Float, Some(&c.x))],
            &["y"],
            inits,
        ))
    }

    /// The result of running the pass on a proto.
    struct Folded {
        stats: PassStats,
        model: Model,
        after: pb::ModelProto,
    }

    fn fold(proto: &pb::ModelProto) -> Result<Folded> {
        let (mut model, _) = crate::onnx::from_proto(proto.clone(), None, "test")?;
        let stats = FoldBatchnorm.run(&mut model, &PassOptions::default())?;
        crate::ir::validate::validate(&model)?;
        let after = crate::onnx::export::to_proto(&model)?;
        Ok(Folded {
            stats,
            model,
            after,
        })
    }

    fn count(model: &Model, op: &str) -> usize {
        let mut n = 0;
        model.graph.visit(&mut |g| {
            n += g.live_nodes().filter(|(_, node)| node.is(op)).count();
        });
        n
    }

    fn random_input(seed: u64, name: &str, shape: &[i64]) -> Result<(String, TractTensor)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let data = uniform(&mut rng, shape.iter().product(), -2.0, 2.0);
        Ok((name.to_string(), TractTensor::from_shape(&shape, &data)?))
    }

    fn run(
        proto: &pb::ModelProto,
        inputs: &[(String, TractTensor)],
    ) -> Result<Vec<(String, TractTensor)>> {
        crate::verify::run(proto, None, inputs).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Largest absolute difference over every output of `a` and `b` (matched by name).
    fn max_abs_error(
        a: &pb::ModelProto,
        b: &pb::ModelProto,
        inputs: &[(String, TractTensor)],
    ) -> Result<f32> {
        let ra = run(a, inputs).context("running the original")?;
        let rb = run(b, inputs).context("running the folded model")?;
        ensure!(ra.len() == rb.len(), "output counts differ");
        let mut worst = 0f32;
        for (name, ta) in &ra {
            let (_, tb) = rb
                .iter()
                .find(|(n, _)| n == name)
                .with_context(|| format!("output {name} missing after folding"))?;
            ensure!(ta.shape() == tb.shape(), "output {name}: shapes differ");
            let (va, vb) = (
                ta.to_plain_array_view::<f32>()?,
                tb.to_plain_array_view::<f32>()?,
            );
            for (u, v) in va.iter().zip(vb.iter()) {
                ensure!(u.is_finite() && v.is_finite(), "output {name}: not finite");
                worst = worst.max((u - v).abs());
            }
        }
        Ok(worst)
    }

    /// Folds `proto`, checks every BatchNormalization is gone, and that tract computes the
    /// same outputs before and after on random inputs (one per `inputs` entry).
    fn check_folds(
        proto: &pb::ModelProto,
        inputs: &[(&str, &[i64])],
        folds: usize,
    ) -> Result<Folded> {
        let f = fold(proto)?;
        ensure!(
            f.stats.changes == folds,
            "changes {} != {folds}: {:?}",
            f.stats.changes,
            f.stats.notes
        );
        ensure!(
            count(&f.model, "BatchNormalization") == 0,
            "a BatchNormalization is left"
        );
        let fed: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(i, (n, s))| random_input(100 + i as u64, n, s))
            .collect::<Result<_>>()?;
        let err = max_abs_error(proto, &f.after, &fed)?;
        eprintln!("max abs error: {err:e}");
        ensure!(err < 1e-4, "max abs error {err}");
        Ok(f)
    }

    fn conv(x: &[i64], w: &[i64], bias: bool, attrs: Vec<pb::AttributeProto>) -> Case {
        Case {
            op: "Conv",
            x: x.to_vec(),
            w: w.to_vec(),
            channels: w[0] as usize,
            bias,
            attrs,
            relu_after: true,
        }
    }

    fn producer_inputs(f: &Folded) -> Result<Vec<String>> {
        let g = f.after.graph.as_ref().context("no graph")?;
        let n = g
            .node
            .iter()
            .find(|n| n.name() == "prod")
            .context("producer gone")?;
        Ok(n.input.clone())
    }

    #[test]
    fn conv_with_bias() -> Result<()> {
        let pads = attr_ints("pads", &[1, 1, 1, 1]);
        let m = case_model(1, conv(&[1, 4, 6, 6], &[6, 4, 3, 3], true, vec![pads]));
        let f = check_folds(&m, &[("x", &[1, 4, 6, 6])], 1)?;
        // Only the Conv read them: rewritten in place, same names.
        ensure!(producer_inputs(&f)? == ["x", "w", "b"]);
        Ok(())
    }

    #[test]
    fn conv_without_bias_gets_one() -> Result<()> {
        let m = case_model(2, conv(&[1, 3, 7, 7], &[5, 3, 3, 3], false, vec![]));
        let f = check_folds(&m, &[("x", &[1, 3, 7, 7])], 1)?;
        ensure!(producer_inputs(&f)? == ["x", "w", "bn.bias_bnfolded"]);
        Ok(())
    }

    #[test]
    fn grouped_conv() -> Result<()> {
        let attrs = vec![attr_int("group", 2)];
        let m = case_model(3, conv(&[1, 4, 5, 5], &[6, 2, 3, 3], true, attrs));
        check_folds(&m, &[("x", &[1, 4, 5, 5])], 1).map(drop)
    }

    #[test]
    fn depthwise_conv() -> Result<()> {
        let attrs = vec![attr_int("group", 4), attr_ints("pads", &[1, 1, 1, 1])];
        let m = case_model(4, conv(&[1, 4, 5, 5], &[4, 1, 3, 3], false, attrs));
        check_folds(&m, &[("x", &[1, 4, 5, 5])], 1).map(drop)
    }

    #[test]
    fn conv_1d() -> Result<()> {
        let m = case_model(5, conv(&[2, 3, 9], &[4, 3, 2], true, vec![]));
        check_folds(&m, &[("x", &[2, 3, 9])], 1).map(drop)
    }

    fn conv_transpose(w: &[i64], group: i64, bias: bool) -> Case {
        Case {
            op: "ConvTranspose",
            x: vec![1, w[0], 5, 5],
            w: w.to_vec(),
            channels: (w[1] * group) as usize,
            bias,
            attrs: vec![attr_int("group", group), attr_ints("strides", &[2, 2])],
            relu_after: true,
        }
    }

    #[test]
    fn conv_transpose_group_2() -> Result<()> {
        // C_in 4, M/group 3: output channel of W[c, j] is (c / 2) * 3 + j.
        let m = case_model(6, conv_transpose(&[4, 3, 3, 3], 2, true));
        check_folds(&m, &[("x", &[1, 4, 5, 5])], 1).map(drop)
    }

    #[test]
    fn conv_transpose_group_3_without_bias() -> Result<()> {
        let m = case_model(7, conv_transpose(&[6, 2, 2, 2], 3, false));
        check_folds(&m, &[("x", &[1, 6, 5, 5])], 1).map(drop)
    }

    #[test]
    fn conv_transpose_group_1() -> Result<()> {
        let m = case_model(8, conv_transpose(&[4, 5, 2, 2], 1, false));
        check_folds(&m, &[("x", &[1, 4, 5, 5])], 1).map(drop)
    }

    /// `a [3, 8] -> Gemm(a, w, c?) [3, 5] -> BatchNormalization -> Relu -> y`.
    fn gemm_model(
        seed: u64,
        trans_b: bool,
        c: Option<&[i64]>,
        beta: Option<f32>,
    ) -> pb::ModelProto {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (m, k, n) = (3usize, 8usize, 5usize);
        let wd: [i64; 2] = if trans_b {
            [n as i64, k as i64]
        } else {
            [k as i64, n as i64]
        };
        let mut inits = vec![init("w", &wd, uniform(&mut rng, k * n, -1.0, 1.0))];
        let mut inputs = vec!["a", "w"];
        if let Some(cd) = c {
            let len: i64 = cd.iter().product();
            inits.push(init("c", cd, uniform(&mut rng, len as usize, -1.0, 1.0)));
            inputs.push("c");
        }
        inits.extend(bn_params(&mut rng, "bn", n));
        let mut attrs = vec![
            attr_int("transB", i64::from(trans_b)),
            attr_float("alpha", 0.7),
        ];
        attrs.extend(beta.map(|b| attr_float("beta", b)));
        let nodes = vec![
            node("Gemm", "prod", &inputs, &["prod_out"], attrs),
            bn_node("bn", "prod_out", "bn_out", vec![]),
            node("Relu", "relu", &["bn_out"], &["y"], vec![]),
        ];
        let a = [m as i64, k as i64];
        model(graph(
            nodes,
            vec![info("a", DataType::Float, Some(&a))],
            &["y"],
            inits,
        ))
    }

    fn gemm_beta(f: &Folded) -> Result<Option<f32>> {
        let g = f.after.graph.as_ref().context("no graph")?;
        let n = g
            .node
            .iter()
            .find(|n| n.name() == "prod")
            .context("Gemm gone")?;
        Ok(n.attribute
            .iter()
            .find(|a| a.name() == "beta")
            .and_then(|a| a.f))
    }

    #[test]
    fn gemm_trans_b_with_c() -> Result<()> {
        let m = gemm_model(10, true, Some(&[5]), Some(0.6));
        let f = check_folds(&m, &[("a", &[3, 8])], 1)?;
        ensure!(gemm_beta(&f)? == Some(0.6), "beta must stay");
        Ok(())
    }

    #[test]
    fn gemm_no_trans_with_c() -> Result<()> {
        let m = gemm_model(11, false, Some(&[5]), None);
        check_folds(&m, &[("a", &[3, 8])], 1).map(drop)
    }

    #[test]
    fn gemm_with_broadcast_c_shapes() -> Result<()> {
        for (i, cd) in [&[][..], &[1], &[1, 5], &[3, 1], &[3, 5]]
            .into_iter()
            .enumerate()
        {
            let m = gemm_model(20 + i as u64, i % 2 == 0, Some(cd), Some(1.3));
            check_folds(&m, &[("a", &[3, 8])], 1).with_context(|| format!("C shape {cd:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn gemm_without_c() -> Result<()> {
        for trans_b in [true, false] {
            let m = gemm_model(12, trans_b, None, Some(0.5));
            let f = check_folds(&m, &[("a", &[3, 8])], 1)?;
            ensure!(gemm_beta(&f)? == Some(1.0), "beta must become 1");
            ensure!(producer_inputs(&f)? == ["a", "w", "bn.bias_bnfolded"]);
        }
        Ok(())
    }

    #[test]
    fn gemm_with_beta_zero_ignores_c() -> Result<()> {
        let m = gemm_model(13, true, Some(&[5]), Some(0.0));
        let f = check_folds(&m, &[("a", &[3, 8])], 1)?;
        ensure!(gemm_beta(&f)? == Some(1.0), "beta must become 1");
        Ok(())
    }

    #[test]
    fn shared_weight_is_copied_not_changed() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(30);
        let w = uniform(&mut rng, 4 * 3 * 3 * 3, -1.0, 1.0);
        let mut inits = vec![
            init("w", &[4, 3, 3, 3], w),
            init("b", &[4], uniform(&mut rng, 4, -1.0, 1.0)),
        ];
        inits.extend(bn_params(&mut rng, "bn", 4));
        let nodes = vec![
            node("Conv", "prod", &["x", "w", "b"], &["c1"], vec![]),
            bn_node("bn", "c1", "y1", vec![]),
            node("Conv", "conv2", &["x", "w", "b"], &["y2"], vec![]),
        ];
        let x = [1, 3, 6, 6];
        let m = model(graph(
            nodes,
            vec![info("x", DataType::Float, Some(&x))],
            &["y1", "y2"],
            inits,
        ));
        let f = check_folds(&m, &[("x", &x)], 1)?;
        ensure!(producer_inputs(&f)? == ["x", "w_bnfolded", "b_bnfolded"]);
        let g = f.after.graph.as_ref().context("no graph")?;
        let conv2 = g
            .node
            .iter()
            .find(|n| n.name() == "conv2")
            .context("conv2 gone")?;
        ensure!(
            conv2.input == ["x", "w", "b"],
            "conv2 must still read w and b"
        );
        let before = m.graph.as_ref().context("no graph")?;
        for name in ["w", "b"] {
            let find =
                |g: &pb::GraphProto| g.initializer.iter().find(|t| t.name() == name).cloned();
            let (old, new) = (find(before), find(g));
            ensure!(old.is_some() && old == new, "initializer {name} changed");
        }
        let fed = [random_input(31, "x", &x)?];
        let (ra, rb) = (run(&m, &fed)?, run(&f.after, &fed)?);
        ensure!(ra[1] == rb[1], "the second Conv's result changed");
        Ok(())
    }

    #[test]
    fn bn_output_that_is_a_graph_output_keeps_its_name() -> Result<()> {
        let mut c = conv(&[1, 2, 4, 4], &[3, 2, 1, 1], true, vec![]);
        c.relu_after = false;
        let m = case_model(40, c);
        let f = check_folds(&m, &[("x", &[1, 2, 4, 4])], 1)?;
        let g = f.after.graph.as_ref().context("no graph")?;
        ensure!(g.output.iter().map(|o| o.name()).collect::<Vec<_>>() == ["y"]);
        let n = g
            .node
            .iter()
            .find(|n| n.name() == "prod")
            .context("Conv gone")?;
        ensure!(n.output == ["y"], "the Conv must now produce y");
        Ok(())
    }

    #[test]
    fn conv_output_read_elsewhere_is_not_folded() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(50);
        let mut inits = vec![init("w", &[4, 3, 1, 1], uniform(&mut rng, 12, -1.0, 1.0))];
        inits.extend(bn_params(&mut rng, "bn", 4));
        let nodes = vec![
            node("Conv", "prod", &["x", "w"], &["c1"], vec![]),
            bn_node("bn", "c1", "y1", vec![]),
            node("Relu", "relu", &["c1"], &["y2"], vec![]),
        ];
        let x = [1, 3, 4, 4];
        let m = model(graph(
            nodes,
            vec![info("x", DataType::Float, Some(&x))],
            &["y1", "y2"],
            inits,
        ));
        let f = fold(&m)?;
        ensure!(f.stats.changes == 0 && count(&f.model, "BatchNormalization") == 1);
        ensure!(
            f.stats.notes
                == [
                    "BatchNormalization node \"bn\": its input \"c1\" (from Conv node \
                               \"prod\") is also read by other nodes, not folded"
                ],
            "{:?}",
            f.stats.notes
        );
        ensure!(f.after == m, "the model must be unchanged");
        Ok(())
    }

    #[test]
    fn training_mode_is_not_folded() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(60);
        let mut inits = vec![init("w", &[4, 3, 1, 1], uniform(&mut rng, 12, -1.0, 1.0))];
        inits.extend(bn_params(&mut rng, "bn", 4));
        let nodes = vec![
            node("Conv", "prod", &["x", "w"], &["c1"], vec![]),
            bn_node("bn", "c1", "y", vec![attr_int("training_mode", 1)]),
        ];
        let x = [1, 3, 4, 4];
        let m = model(graph(
            nodes,
            vec![info("x", DataType::Float, Some(&x))],
            &["y"],
            inits,
        ));
        let f = fold(&m)?;
        ensure!(f.stats.changes == 0 && count(&f.model, "BatchNormalization") == 1);
        ensure!(f.stats.notes.len() == 1 && f.stats.notes[0].contains("training mode"));
        ensure!(f.after == m, "the model must be unchanged");
        Ok(())
    }

    /// A weight and bias rewritten in place keep their doc string and metadata (an
    /// exporter's source names were dropped).
    #[test]
    fn a_weight_folded_in_place_keeps_its_description() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(63);
        let mut w = init("w", &[4, 3, 1, 1], uniform(&mut rng, 12, -1.0, 1.0));
        w.doc_string = Some("conv weight".to_string());
        w.metadata_props = vec![pb::StringStringEntryProto {
            key: Some("torch_name".to_string()),
            value: Some("layer1.0.conv1.weight".to_string()),
        }];
        let mut inits = vec![w.clone()];
        inits.extend(bn_params(&mut rng, "bn", 4));
        let nodes = vec![
            node("Conv", "prod", &["x", "w"], &["c1"], vec![]),
            bn_node("bn", "c1", "y", vec![]),
        ];
        let m = model(graph(
            nodes,
            vec![info("x", DataType::Float, Some(&[1, 3, 4, 4]))],
            &["y"],
            inits,
        ));
        let f = fold(&m)?;
        ensure!(f.stats.changes == 1, "{:?}", f.stats.notes);
        let folded = f
            .after
            .graph
            .iter()
            .flat_map(|g| &g.initializer)
            .find(|t| t.name() == "w")
            .ok_or_else(|| anyhow::anyhow!("no initializer w"))?;
        ensure!(folded.raw_data != w.raw_data || folded.float_data != w.float_data);
        ensure!(folded.doc_string == w.doc_string, "{folded:?}");
        ensure!(folded.metadata_props == w.metadata_props, "{folded:?}");
        Ok(())
    }

    /// Before opset 14 a BatchNormalization that declares its statistics outputs runs in
    /// training mode, used or not (it was folded: up to 2.1 off in onnxruntime).
    #[test]
    fn declared_statistics_outputs_before_opset_14_mean_training_mode() -> Result<()> {
        for (opset, outputs, folds) in
            [(9, 5, false), (13, 5, false), (13, 3, false), (14, 3, true)]
        {
            let mut rng = ChaCha8Rng::seed_from_u64(62);
            let mut inits = vec![init("w", &[4, 3, 1, 1], uniform(&mut rng, 12, -1.0, 1.0))];
            inits.extend(bn_params(&mut rng, "bn", 4));
            let mut bn = bn_node("bn", "c1", "y", vec![]);
            for k in 1..outputs {
                bn.output.push(format!("stat{k}"));
            }
            let nodes = vec![node("Conv", "prod", &["x", "w"], &["c1"], vec![]), bn];
            let x = [2, 3, 4, 4];
            let mut m = model(graph(
                nodes,
                vec![info("x", DataType::Float, Some(&x))],
                &["y"],
                inits,
            ));
            m.opset_import[0].version = Some(opset);
            let f = fold(&m)?;
            let folded = count(&f.model, "BatchNormalization") == 0;
            ensure!(
                folded == folds,
                "opset {opset}, {outputs} outputs: {:?}",
                f.stats.notes
            );
            if !folds {
                ensure!(
                    f.stats.notes.len() == 1
                        && f.stats.notes[0].contains("before opset 14 means training mode"),
                    "{:?}",
                    f.stats.notes
                );
                ensure!(f.after == m, "the model must be unchanged");
            }
        }
        Ok(())
    }

    #[test]
    fn used_running_statistics_are_not_folded() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(61);
        let mut inits = vec![init("w", &[4, 3, 1, 1], uniform(&mut rng, 12, -1.0, 1.0))];
        inits.extend(bn_params(&mut rng, "bn", 4));
        let mut bn = bn_node("bn", "c1", "y", vec![]);
        bn.output.push("running_mean".to_string());
        let nodes = vec![node("Conv", "prod", &["x", "w"], &["c1"], vec![]), bn];
        let x = [1, 3, 4, 4];
        let g = graph(
            nodes,
            vec![info("x", DataType::Float, Some(&x))],
            &["y", "running_mean"],
            inits,
        );
        let f = fold(&model(g))?;
        ensure!(f.stats.changes == 0, "{:?}", f.stats.notes);
        ensure!(f.stats.notes[0].contains("running statistics"));
        Ok(())
    }

    #[test]
    fn chain_of_two_batchnorms_folds_in_one_run() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(70);
        let mut inits = vec![init("w", &[4, 3, 3, 3], uniform(&mut rng, 108, -1.0, 1.0))];
        inits.extend(bn_params(&mut rng, "bn1", 4));
        inits.extend(bn_params(&mut rng, "bn2", 4));
        let nodes = vec![
            node("Conv", "prod", &["x", "w"], &["c1"], vec![]),
            bn_node("bn1", "c1", "b1", vec![attr_float("epsilon", 1e-3)]),
            bn_node("bn2", "b1", "y", vec![]),
        ];
        let x = [1, 3, 6, 6];
        let m = model(graph(
            nodes,
            vec![info("x", DataType::Float, Some(&x))],
            &["y"],
            inits,
        ));
        check_folds(&m, &[("x", &x)], 2).map(drop)
    }

    #[test]
    fn folds_inside_if_branches_and_keeps_names_read_by_them() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(80);
        // Main graph: Conv -> bn -> feat, read by name by both branches.
        let mut inits = vec![init("w", &[4, 3, 3, 3], uniform(&mut rng, 108, -1.0, 1.0))];
        inits.extend(bn_params(&mut rng, "bn", 4));
        // then: Conv(feat, wt) -> bn_t -> t_out; else: Relu(feat).
        let mut then_inits = vec![init("wt", &[4, 4, 1, 1], uniform(&mut rng, 16, -1.0, 1.0))];
        then_inits.extend(bn_params(&mut rng, "bn_t", 4));
        let then_g = graph(
            vec![
                node("Conv", "conv_t", &["feat", "wt"], &["ct"], vec![]),
                bn_node("bn_t", "ct", "t_out", vec![]),
            ],
            vec![],
            &["t_out"],
            then_inits,
        );
        let else_g = graph(
            vec![node("Relu", "relu_e", &["feat"], &["e_out"], vec![])],
            vec![],
            &["e_out"],
            vec![],
        );
        let nodes = vec![
            node(
                "Conv",
                "prod",
                &["x", "w"],
                &["c1"],
                vec![attr_ints("pads", &[1, 1, 1, 1])],
            ),
            bn_node("bn", "c1", "feat", vec![]),
            node(
                "If",
                "if",
                &["cond"],
                &["y"],
                vec![
                    attr_graph("then_branch", then_g),
                    attr_graph("else_branch", else_g),
                ],
            ),
        ];
        let x = [1, 3, 5, 5];
        let inputs = vec![
            info("x", DataType::Float, Some(&x)),
            info("cond", DataType::Bool, Some(&[])),
        ];
        let m = model(graph(nodes, inputs, &["y"], inits));
        let f = fold(&m)?;
        ensure!(f.stats.changes == 2, "{:?}", f.stats.notes);
        ensure!(count(&f.model, "BatchNormalization") == 0);
        let g = f.after.graph.as_ref().context("no graph")?;
        let conv = g
            .node
            .iter()
            .find(|n| n.name() == "prod")
            .context("Conv gone")?;
        ensure!(
            conv.output == ["feat"],
            "the Conv must take the name the branches read"
        );
        for cond in [true, false] {
            let fed = [
                random_input(81, "x", &x)?,
                ("cond".to_string(), TractTensor::from(cond)),
            ];
            let err = max_abs_error(&m, &f.after, &fed)?;
            eprintln!("cond {cond}: max abs error {err:e}");
            ensure!(err < 1e-4, "cond {cond}: max abs error {err}");
        }
        Ok(())
    }

    #[test]
    fn float64_weight_is_not_folded_and_said_so() -> Result<()> {
        let mut m = case_model(90, conv(&[1, 2, 3, 3], &[3, 2, 1, 1], false, vec![]));
        let g = m.graph.as_mut().context("no graph")?;
        let w = g
            .initializer
            .iter_mut()
            .find(|t| t.name() == "w")
            .context("no w")?;
        w.double_data = w.float_data.drain(..).map(f64::from).collect();
        w.data_type = Some(DataType::Double as i32);
        let f = fold(&m)?;
        ensure!(f.stats.changes == 0);
        ensure!(
            f.stats.notes
                == ["BatchNormalization node \"bn\": weight \"w\" of Conv node \
                               \"prod\" is float64, not folded"],
            "{:?}",
            f.stats.notes
        );
        Ok(())
    }

    #[test]
    fn float16_weights_fold_in_float16() -> Result<()> {
        let (w, scale, bias, mean, var) =
            ([0.5f32, -1.25, 2.0, 0.75], 1.5f32, 0.25f32, 0.1f32, 0.8f32);
        let h = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect()
        };
        let t16 = |name: &str, dims: &[i64], v: &[f32]| {
            let mut t = Tensor::from_raw(DataType::Float16 as i32, dims, h(v)).proto;
            t.name = Some(name.to_string());
            t
        };
        let inits = vec![
            t16("w", &[1, 4, 1, 1], &w),
            t16("bn.scale", &[1], &[scale]),
            t16("bn.bias", &[1], &[bias]),
            t16("bn.mean", &[1], &[mean]),
            t16("bn.var", &[1], &[var]),
        ];
        let nodes = vec![
            node("Conv", "prod", &["x", "w"], &["c1"], vec![]),
            bn_node("bn", "c1", "y", vec![]),
        ];
        let m = model(graph(
            nodes,
            vec![info("x", DataType::Float16, Some(&[1, 4, 2, 2]))],
            &["y"],
            inits,
        ));
        let f = fold(&m)?;
        ensure!(f.stats.changes == 1, "{:?}", f.stats.notes);
        let g = &f.model.graph;
        let read = |name: &str| -> Result<Vec<f32>> {
            let t = g
                .find(name)
                .and_then(|v| g.initializer(v))
                .context("missing")?;
            ensure!(
                t.data_type() == DataType::Float16 as i32,
                "{name} is not float16"
            );
            t.to_f32()
        };
        let q = |v: f32| f64::from(f16::from_f32(v).to_f32());
        let s = q(scale) / (q(var) + 1e-5f64).sqrt();
        let want_w: Vec<f32> = w
            .iter()
            .map(|&v| f16::from_f64(q(v) * s).to_f32())
            .collect();
        ensure!(read("w")? == want_w, "w: {:?} != {want_w:?}", read("w")?);
        let want_b = f16::from_f64(q(bias) - q(mean) * s).to_f32();
        ensure!(read("bn.bias_bnfolded")? == [want_b]);
        Ok(())
    }

    #[test]
    fn ppocr_mobile_v2_cls_folds_all_35() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let (mut model, _) = crate::onnx::load(&dir.join("ppocr-mobile-v2-cls.onnx"))?;
        let original = crate::onnx::export::to_proto(&model)?;
        ensure!(count(&model, "BatchNormalization") == 35);
        let opts = PassOptions::default();
        crate::passes::constant_to_initializer::ConstantToInitializer.run(&mut model, &opts)?;
        let stats = FoldBatchnorm.run(&mut model, &opts)?;
        crate::ir::validate::validate(&model)?;
        ensure!(stats.changes == 35, "{stats:?}");
        ensure!(count(&model, "BatchNormalization") == 0);
        let folded = crate::onnx::export::to_proto(&model)?;
        let inputs = crate::verify::inputs::load_npz(&dir.join("ppocr-mobile-v2-cls.npz"))?;
        let inputs: Vec<_> = inputs.into_iter().filter(|(k, _)| k == "x").collect();
        ensure!(inputs.len() == 1, "no input x in the bundle");
        let err = max_abs_error(&original, &folded, &inputs)?;
        eprintln!("ppocr-mobile-v2-cls: max abs error {err:e}");
        ensure!(err < 1e-4, "max abs error {err}");
        Ok(())
    }
}
