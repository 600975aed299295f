//! `quantize_static`: calibrated int8 quantization of activations and weights in the QDQ form
//! (QuantizeLinear -> DequantizeLinear pairs around float ops), the form onnxruntime fuses
//! into integer kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm).
//!
//! Before (a Conv with a bias Add, a BatchNormalization and a ReLU, then another unit):
//! ```text
//! a -> Conv(W) -> y0 -> Add(c) -> BatchNormalization -> y -> Relu -> r -> ... -> MatMul(W2)
//! ```
//! After:
//! ```text
//! a -> Q -> DQ -> Conv(DQ(W'_q), DQ(b'_q)) -> y0 -> Relu -> r -> Q -> DQ -> ... -> MatMul(DQ(W2_q))
//! ```
//! - **Units**: every Conv, Gemm and MatMul of the main graph whose input 1 is a float32
//!   initializer (not a graph input) and whose input 0 is a computed activation, selected by
//!   the pass options (`--op-types`, `--include-nodes`, `--exclude-nodes`, and the layers the
//!   accuracy-gated fallback keeps in float).
//! - **Left in float for speed** (unless `PassOptions::all_layers`, `--all-layers`): units that
//!   onnxruntime's CPU int8 kernels run slower than float, by the rule of `slow_in_int8`:
//!   depthwise Convs, Convs with a 1x1 output map, and Convs with fewer than 64 multiply-adds
//!   per output value, 16 output channels or 2048 weights (Gemm and MatMul are always
//!   quantized: not measured). The rule comes from timing one Conv
//!   between float ops, `Q -> QLinearConv -> DQ` against the float Conv, with onnxruntime 1.32
//!   (default session options, one thread) on an AVX2 machine without VNNI; time of int8 over
//!   float, on 24x24 / 48x48 maps:
//!
//!   | Conv | 8 -> 8 | 16 -> 64 | 64 -> 16 | 64 -> 64 | 128 -> 128 | on a 1x1 map |
//!   | --- | --- | --- | --- | --- | --- | --- |
//!   | 1x1 | 1.51 / 1.89 | 1.18 / 1.12 | 1.05 / 0.98 | 0.89 / 0.96 | 0.73 / 0.81 | 1.04 - 1.26 |
//!   | 3x3 | 1.33 / 1.65 | 0.90 / 0.82 | 0.61 / 0.54 | 0.59 / 0.59 | 0.58 / 0.57 | 1.09 - 1.26 |
//!
//!   Depthwise Convs took 1.5x (3x3) to 3.7x (5x5) and 3-channel first layers 4x to 11x the
//!   time of the float Conv. The int8 unit pays a fixed cost (QuantizeLinear, DequantizeLinear
//!   and the NHWC transposes onnxruntime puts around QLinearConv) that only enough work wins
//!   back. On ppocr-mobile-v2-cls, whose Convs are small and separated by hard-swish
//!   activations, quantizing every unit made the model 1.2x to 1.3x slower than float in
//!   onnxruntime; with the rule it ran in 0.94x. Exception: such a Conv that reads a
//!   dequantized Conv output and feeds a quantized unit is quantized anyway, because
//!   onnxruntime's WeightBiasQuantization would quantize it there itself (below).
//! - **Activations**: the unit's input gets `QuantizeLinear(scale, zero_point)` ->
//!   `DequantizeLinear`, with the range calibrated on sample inputs
//!   ([`crate::quant::calibrate`]): uint8 asymmetric (the default; onnxruntime's U8S8) or int8
//!   symmetric, from [`crate::quant::scale_zero_point`] (the range always includes 0). One pair
//!   per value, shared by every quantized reader; float readers keep the float value, except
//!   on a Conv output (below).
//! - **Conv outputs**: onnxruntime fuses `DQ -> Conv -> Q` into QLinearConv only when every
//!   reader of the Conv output is a QuantizeLinear, so a quantized Conv's output always gets a
//!   pair that all its readers read. Before that, the ops that read the Conv output alone and
//!   fold into it are folded: an `Add` of a per-channel (or scalar) constant, also one built by
//!   `Reshape` of constants (`b' = b + c`), and an inference BatchNormalization
//!   (`s = scale / sqrt(var + eps)`, `W' = W * s` per output channel, `b' = (b - mean) * s + B`,
//!   BatchNormalization-15, as `fold_batchnorm` states it), in f64. A Relu that is then the
//!   only reader stays, with the pair on its output: its range starts at 0, the zero point is
//!   the type's minimum and onnxruntime drops the Relu as redundant. The output pair's
//!   DequantizeLinear takes the name of the last folded op's output, so every name read
//!   downstream stays defined. MatMul and Gemm outputs stay float unless a quantized unit
//!   reads them (onnxruntime runs `DQ -> MatMul` as MatMulIntegerToFloat and `DQ -> Gemm` as
//!   QGemm with a float output).
//! - **Weights**: int8 symmetric in `[-127, 127]` with an explicit zero point of 0
//!   ([`crate::quant::quantize`], axes of [`weight_axis`] as in `quantize_weights`): per output
//!   channel with DequantizeLinear-13 `axis` when the model's opset is 13 or more; per tensor
//!   for opsets 10 to 12 (DequantizeLinear-10 has no axis; this pass never raises the opset,
//!   `quantize --mode static` runs [`super::upgrade_opset`] before it). A per
//!   tensor Conv scale is the `max|W| / 127 * r`, `r` in `0.60, 0.61, .., 1.00`, with the
//!   smallest squared error (clipping a few large weights gives small channels more levels:
//!   without the fallback, the smallest held-out cosine went from 0.984 to 0.991 on
//!   ppocr-mobile-v2-cls and from 0.75 to 0.93 on ppocrv4-rec); MatMul/Gemm keep `r = 1`
//!   (their outliers matter on ppocrv4-rec).
//! - **Bias** (Conv input 2 or folded; Gemm `C` of shape `[N]` when `alpha = beta = 1`): int32,
//!   `q[c] = round_half_even(b[c] / (x_scale * w_scale[c]))`, zero point 0, by
//!   DequantizeLinear (axis 0 per channel) — the scale onnxruntime assumes when it fuses the
//!   node. int32 never overflows: when `|b[c] / (x_scale * w_scale[c])| > 2^31 - 1`, the weight
//!   scale of that channel is raised to `|b[c]| / (x_scale * (2^31 - 1))` and its weights are
//!   requantized with it (per-channel weights; a note says how many channels and by how much)
//!   or, with one weight scale per tensor, the bias stays float (a note says so; onnxruntime
//!   then runs that node in float).
//! - **onnxruntime's own quantization**: its WeightBiasQuantization (optimization level 1)
//!   quantizes, per tensor, the float weight of any Conv/Gemm/ConvTranspose that reads a
//!   DequantizeLinear output and whose output reaches a QuantizeLinear through one reader at
//!   a time (after its Conv+BatchNormalization/Add/Mul fusions, through Relu/Clip). A float node
//!   the user or the fallback keeps in that position reads the float Conv output instead of
//!   the dequantized one, so that it stays float in onnxruntime too (the producing Conv then
//!   runs in float there; a note names the nodes).
//!
//! Formulas: QuantizeLinear-13 `q = saturate(round_half_even(x / scale) + zero_point)`,
//! DequantizeLinear-13 `x' = (q - zero_point) * scale` (per axis from opset 13). Calibration
//! estimators (min/max, per-tail percentile, TensorRT entropy after S. Migacz, "8-bit Inference
//! with TensorRT", GTC 2017) are described in [`crate::quant::calibrate`].
//!
//! Preconditions: `PassOptions::calibration` is set (the pass fails otherwise), the model's
//! default-domain opset is 10 or more and its IR version 4 or more (otherwise nothing changes,
//! with a note), tract can run the model on the calibration samples.
//!
//! Never changed: graph inputs and outputs (a graph output keeps its float value and its
//! producer; only quantized readers of it read a dequantized copy), values that are both a
//! graph input and a graph output, non-float values. Deliberately not done: subgraphs
//! (If/Loop/Scan bodies stay float, with a note), ConvTranspose, MatMul whose weight is input 0,
//! float16 or float64 weights, already quantized inputs (a DequantizeLinear output), ops other
//! than the units (Add, Mul, pooling, activations stay float: the int8 kernels hand float back
//! to them), raising the opset (the `upgrade_opset` pass does), 16-bit activations. The pass is
//! deterministic, and calibration results are cached in the calibration options (shared by
//! their clones), so the fallback's re-runs with layers kept in float are cheap.
//!
//! Interplay with the accuracy-gated fallback: for a Conv whose Add/BatchNormalization this
//! pass folds, the Conv's own output name now holds the folded value; the fallback reads the
//! layer's output under the last folded op's output name, which keeps its meaning.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::{ensure, Context, Result};

use super::quantize_weights::{block_axis, weight_axis};
use super::{can_add_initializers, Pass, PassKind, PassOptions, PassStats};
use crate::ir::edit::attr_int;
use crate::ir::{Graph, Model, NodeId, Tensor, ValueId};
use crate::pb::tensor_proto::DataType;
use crate::quant::calibrate::calibrate;
use crate::quant::{
    quantize, round_clamped, scale_zero_point, split_axis, Granularity, QType, Scheme,
    REDUCED_INT8_MAX,
};

/// A uint8 activation zero point from which a layer's weights are narrowed to
/// [`REDUCED_INT8_MAX`] (unless `PassOptions::full_range_weights`): a quarter of the range is
/// below zero, so typical quantized values are large enough for onnxruntime's x86 u8 x s8
/// kernels to saturate often.
const REDUCED_ZERO_POINT: i32 = 64;

/// The fraction of a layer's int8 weights above [`REDUCED_INT8_MAX`] in magnitude from which
/// its weights are narrowed (with [`REDUCED_ZERO_POINT`]): with a fraction `f` of large
/// weights, about `f^2` of the adjacent pairs the kernel sums are both large. A sinusoid basis
/// has about 0.67; weights spread like a bell curve whose largest is 3 to 4 deviations out,
/// under 0.1.
const LARGE_WEIGHT_FRACTION: f64 = 0.25;

/// See the module documentation.
pub struct QuantizeStatic;

impl Pass for QuantizeStatic {
    fn name(&self) -> &'static str {
        "quantize_static"
    }
    fn summary(&self) -> &'static str {
        "calibrated int8 QDQ on the activations, weights and biases of Conv, Gemm and MatMul (--calibration)"
    }
    fn kind(&self) -> PassKind {
        PassKind::Lossy {
            tolerance: "cosine >= 0.99 per output on typical models",
        }
    }
    fn run(&self, model: &mut Model, opts: &PassOptions) -> Result<PassStats> {
        let mut stats = run(model, opts)?;
        stats
            .notes
            .extend(super::constant_weights_note(model, opts));
        Ok(stats)
    }
}

/// The largest int32.
const I32_MAX: f64 = 2_147_483_647.0;

/// A BatchNormalization that reads a unit's output and nothing else does.
#[derive(Debug, Clone)]
struct Bn {
    node: NodeId,
    /// scale, B, mean, var.
    params: [ValueId; 4],
    eps: f32,
}

/// An op after a Conv that folds into its weight and bias.
#[derive(Debug, Clone)]
enum Fold {
    /// `Add` of a constant per output channel (or a scalar): `b' = b + c`.
    Add {
        node: NodeId,
        /// The constant, one value per channel.
        c: Vec<f32>,
    },
    /// An inference BatchNormalization.
    Bn(Bn),
}

impl Fold {
    fn node(&self) -> NodeId {
        match self {
            Fold::Add { node, .. } => *node,
            Fold::Bn(b) => b.node,
        }
    }
}

/// A quantizable node and its surroundings, read before any edit.
#[derive(Debug, Clone)]
struct Unit {
    node: NodeId,
    op: &'static str,
    /// Activation input (input 0).
    x: ValueId,
    /// Weight initializer (input 1).
    w: ValueId,
    /// Its output-channel axis.
    axis: usize,
    /// Conv input 2, Gemm input 2.
    bias: Option<ValueId>,
    /// Ops that fold into a Conv, in order, each the only reader of the value before it.
    epilogue: Vec<Fold>,
    /// The value the epilogue ends with (`y0` when there is none).
    chain_out: ValueId,
    /// A Relu reading `chain_out` alone.
    relu: Option<NodeId>,
    /// Output 0 of the node.
    y0: ValueId,
    /// Where the output pair goes: `chain_out` or the Relu output.
    out: ValueId,
}

/// Plans unit `u`: its float weight and bias, with the epilogue folded in when the output
/// pair can take its place. `None` (with a note) when its weight is not finite.
fn plan_unit(
    g: &Graph,
    u: &Unit,
    qparams: &dyn Fn(ValueId) -> Option<QParams>,
    notes: &mut Vec<String>,
) -> Option<Planned> {
    let (w, dims) = f32_init(g, u.w)?;
    let why = if w.is_empty() {
        Some("holds nothing")
    } else {
        crate::quant::unquantizable(&w)
    };
    if let Some(why) = why {
        notes.push(format!(
            "{}: weight {why}: left in float",
            g.node(u.node).label(u.node)
        ));
        return None;
    }
    let mut bias: Option<(Vec<f32>, String)> = u.bias.and_then(|b| {
        f32_init(g, b)
            .filter(|(v, _)| v.iter().all(|x| x.is_finite()))
            .map(|(v, _)| (v, g.value(b).name.clone()))
    });
    let mut plan = Planned {
        unit: u.clone(),
        folds: false,
        w,
        dims,
        bias: None,
    };
    if !u.epilogue.is_empty() && qparams(u.out).is_some() {
        let m = plan.dims[0];
        let b0 = match (&bias, u.bias) {
            (Some(b), _) if b.0.len() == m => Some(b.0.clone()),
            (None, None) => Some(vec![0.0; m]),
            _ => None, // a bias that is not a finite float32 [M] initializer
        };
        if let Some(b0) = b0 {
            let (nw, nb) = fold_epilogue(g, &plan.w, &plan.dims, &b0, &u.epilogue);
            if nw.iter().chain(&nb).all(|v| v.is_finite()) {
                plan.w = nw;
                let base = match u.bias {
                    Some(b) => g.value(b).name.clone(),
                    None => format!("{}_bias", g.value(u.y0).name),
                };
                bias = Some((nb, base));
                plan.folds = true;
            }
        }
    }
    plan.bias = bias;
    Some(plan)
}

/// Does the output of planned Conv unit `p` get a pair that all its readers read (so that
/// onnxruntime fuses it into QLinearConv)?
fn conv_output_pair(
    g: &Graph,
    p: &Planned,
    qparams: &dyn Fn(ValueId) -> Option<QParams>,
    visible: &dyn Fn(ValueId) -> bool,
) -> bool {
    let u = &p.unit;
    u.op == "Conv"
        && !visible(u.out)
        && !g.is_graph_output(u.out)
        && qparams(u.out).is_some()
        && (u.epilogue.is_empty() || p.folds)
}

/// Where the output `y` of a Conv/Gemm/ConvTranspose leads through one reader at a time, after
/// onnxruntime's level-1 fusions (BatchNormalization, Add and Mul of a constant) and through
/// Relu/Clip: the value whose reader decides whether onnxruntime's WeightBiasQuantization
/// applies.
fn ort_chain_end(
    g: &Graph,
    uses: &[Vec<(NodeId, usize)>],
    y: ValueId,
    visible: &dyn Fn(ValueId) -> bool,
) -> ValueId {
    let mut v = y;
    for _ in 0..16 {
        if visible(v) {
            break;
        }
        let [(r, i)] = uses[v.0 as usize].as_slice() else {
            break;
        };
        let n = g.node(*r);
        let through = n.is("Relu")
            || n.is("Clip")
            || (n.is("BatchNormalization") && *i == 0)
            || ((n.is("Add") || n.is("Mul"))
                && n.inputs.len() == 2
                && n.inputs
                    .get(1 - (*i).min(1))
                    .copied()
                    .flatten()
                    .is_some_and(|c| g.initializer(c).is_some() || reshaped_const(g, c).is_some()));
        match (through, n.outputs.first()) {
            (true, Some(Some(o))) => v = *o,
            _ => break,
        }
    }
    v
}

/// Why a unit is left in float for speed, if it is: `node` is the Conv, Gemm or MatMul, `dims`
/// its weight's dims, `axis` the weight's output-channel axis and `out` the shape of its
/// output on the first calibration sample (`None` when not calibrated).
///
/// The rule comes from timing one unit between float ops (`QuantizeLinear -> QLinearConv ->
/// DequantizeLinear` against the float Conv, each reading and feeding float ops as in a real
/// model) with onnxruntime 1.32's CPU provider, default session options, one thread, on an
/// AVX2 machine without VNNI: see the module documentation. An int8 unit pays a fixed cost
/// (the QuantizeLinear and DequantizeLinear around it, and the NHWC transposes onnxruntime
/// puts around QLinearConv) that only enough multiply-adds per output value win back:
/// - depthwise Convs (one input channel per group): 1.5x to 3.7x slower in int8;
/// - Convs whose output map is 1x1 (squeeze-and-excitation blocks): 1.1x to 1.25x slower
///   whatever the channel counts;
/// - fewer than [`MIN_REDUCTION`] multiply-adds per output value (input channels per group
///   times kernel size), fewer than [`MIN_OUTPUTS`] output channels, or
///   fewer than [`MIN_WEIGHTS`] weights: 1.0x to 1.9x slower (a 1x1 Conv 8 -> 8 channels on
///   a 24x96 map: 1.89x; 16 -> 64: 1.12x; 64 -> 16: 1.05x), while 64 -> 64 ran in 0.89x to
///   0.96x, a 3x3 Conv 16 -> 32 in 0.73x to 0.81x and 64 -> 64 in 0.59x.
fn slow_in_int8(
    node: &crate::ir::Node,
    dims: &[usize],
    axis: usize,
    out: Option<&[usize]>,
) -> Option<&'static str> {
    let conv = node.is("Conv");
    if conv && dims.len() < 3 {
        return None;
    }
    if conv && node.attr_int("group", 1) > 1 && dims[1] == 1 {
        return Some("depthwise Conv(s)");
    }
    if conv && out.is_some_and(|o| o.len() >= 3 && o[2..].iter().product::<usize>() <= 1) {
        return Some("Conv(s) with a 1x1 output map");
    }
    if !conv {
        // Not measured for QLinearMatMul / MatMulIntegerToFloat / QGemm: always quantized.
        return None;
    }
    let outputs = dims.get(axis).copied().unwrap_or(0);
    let reduction: usize = dims[1..].iter().product();
    (reduction < MIN_REDUCTION || outputs < MIN_OUTPUTS || reduction * outputs < MIN_WEIGHTS)
        .then_some(
            "Conv(s) with fewer than 64 multiply-adds per output value, 16 output channels or 2048 weights",
        )
}

/// Fewest multiply-adds per output value of a unit worth running in int8.
const MIN_REDUCTION: usize = 64;
/// Fewest output channels of a unit worth running in int8.
const MIN_OUTPUTS: usize = 16;
/// Fewest weights (per group) of a unit worth running in int8.
const MIN_WEIGHTS: usize = 2048;

/// A float32 initializer that is not a graph input: values and dims.
fn f32_init(g: &Graph, v: ValueId) -> Option<(Vec<f32>, Vec<usize>)> {
    let t = g.initializer(v)?;
    if t.data_type() != DataType::Float as i32 || g.is_graph_input(v) {
        return None;
    }
    let dims = t.dims().iter().map(|&d| d.max(0) as usize).collect();
    Some((t.to_f32().ok()?, dims))
}

/// Finds the units of `g` (independently of the pass options, so that the calibrated set of
/// tensors is the same whatever is selected).
fn find_units(g: &Graph, notes: &mut Vec<String>) -> Vec<Unit> {
    let uses = g.uses();
    let sub_reads = g.names_read_by_subgraphs();
    let visible = |v: ValueId| g.is_graph_output(v) || sub_reads.contains(&g.value(v).name);
    let sole_reader = |v: ValueId, op: &str| -> Option<NodeId> {
        match uses[v.0 as usize].as_slice() {
            [(n, 0)] if g.node(*n).is(op) && !visible(v) => Some(*n),
            _ => None,
        }
    };
    let mut units = Vec::new();
    let (mut conv_t, mut dq_input, mut non_f32) = (0, 0, 0);
    for (id, n) in g.live_nodes() {
        if !n.domain().is_empty() {
            continue;
        }
        let op = match n.op_type() {
            "Conv" => "Conv",
            "Gemm" => "Gemm",
            "MatMul" => "MatMul",
            "ConvTranspose" => {
                conv_t += 1;
                continue;
            }
            _ => continue,
        };
        let (Some(Some(x)), Some(Some(w)), Some(Some(y0))) =
            (n.inputs.first(), n.inputs.get(1), n.outputs.first())
        else {
            continue;
        };
        let (x, w, y0) = (*x, *w, *y0);
        let Some(wt) = g.initializer(w) else { continue };
        if g.initializer(x).is_some() {
            continue;
        }
        let Some(axis) = weight_axis(n, 1, wt.dims().len()) else {
            continue;
        };
        if wt.data_type() != DataType::Float as i32 || g.is_graph_input(w) {
            non_f32 += 1;
            continue;
        }
        if g.producer(x)
            .is_some_and(|p| g.node(p).is("DequantizeLinear"))
        {
            dq_input += 1;
            continue;
        }
        let bias = match op {
            "Conv" | "Gemm" => n.inputs.get(2).copied().flatten(),
            _ => None,
        };
        let mut chain_out = y0;
        let mut epilogue = Vec::new();
        let mut relu = None;
        let mut out = y0;
        if op == "Conv" {
            let m = wt.dims().first().copied().unwrap_or(0) as usize;
            let rank = wt.dims().len();
            loop {
                if visible(chain_out) {
                    break;
                }
                let next = match uses[chain_out.0 as usize].as_slice() {
                    [(n, i)] => (*n, *i),
                    _ => break,
                };
                let nn = g.node(next.0);
                let folded = if nn.is("Add") && nn.inputs.len() == 2 {
                    add_const(g, nn, next.1, m, rank).map(|c| Fold::Add { node: next.0, c })
                } else if nn.is("BatchNormalization") && next.1 == 0 {
                    batchnorm(g, next.0, m, &visible, &uses).map(Fold::Bn)
                } else {
                    None
                };
                let Some(f) = folded else { break };
                let Some(Some(o)) = nn.outputs.first() else {
                    break;
                };
                if visible(*o) {
                    break; // a graph output keeps its producer
                }
                chain_out = *o;
                epilogue.push(f);
            }
            out = chain_out;
            if let Some(r) = sole_reader(chain_out, "Relu") {
                if let Some(Some(ro)) = g.node(r).outputs.first() {
                    if !visible(*ro) {
                        out = *ro;
                        relu = Some(r);
                    }
                }
            }
        }
        units.push(Unit {
            node: id,
            op,
            x,
            w,
            axis,
            bias,
            epilogue,
            chain_out,
            relu,
            y0,
            out,
        });
    }
    // A weight something else also reads (another node or input, a graph output, a subgraph)
    // would keep its float copy beside the int8 one: its layers stay float. A weight several
    // layers read gets one int8 copy per layer (each with its own scales), noted.
    let unit_uses: HashSet<(NodeId, usize)> = units.iter().map(|u| (u.node, 1)).collect();
    let mut shared_with_others = Vec::new();
    let mut per_layer = BTreeMap::new();
    units.retain(|u| {
        let name = &g.value(u.w).name;
        match super::other_reader(g, &uses, &sub_reads, u.w, &unit_uses) {
            Some(o) => {
                shared_with_others.push(format!(
                    "{}: weight '{name}' is also read by {o}",
                    g.node(u.node).label(u.node)
                ));
                false
            }
            None => {
                *per_layer.entry(name.clone()).or_insert(0usize) += 1;
                true
            }
        }
    });
    if !shared_with_others.is_empty() {
        notes.push(format!(
            "{} layer(s) left in float because something else reads their weight in float, which quantizing it would store twice: {}",
            shared_with_others.len(),
            shared_with_others.join("; ")
        ));
    }
    let several: Vec<String> = per_layer
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(w, n)| format!("'{w}' ({n} layers)"))
        .collect();
    if !several.is_empty() {
        notes.push(format!(
            "weights read by several layers are quantized per layer, each with its own scales (identical copies are stored once by dedupe_initializers): {}",
            several.join(", ")
        ));
    }
    if conv_t > 0 {
        notes.push(format!("{conv_t} ConvTranspose node(s) left in float"));
    }
    if dq_input > 0 {
        notes.push(format!(
            "{dq_input} node(s) whose input is already dequantized left as they are"
        ));
    }
    if non_f32 > 0 {
        notes.push(format!(
            "{non_f32} node(s) with a weight that is not a float32 initializer (float16, float64, or a graph input) left in float"
        ));
    }
    units
}

/// The constant that `Add` node `n` adds to its input `idx` (a Conv output of rank `rank` with
/// `m` channels), one value per channel, when it is a float32 initializer that broadcasts
/// along the channel axis only (a scalar, or `[.., m, 1, .., 1]` aligned on axis 1).
fn add_const(
    g: &Graph,
    n: &crate::ir::Node,
    idx: usize,
    m: usize,
    rank: usize,
) -> Option<Vec<f32>> {
    let other = n.inputs.get(1 - idx.min(1)).copied().flatten()?;
    let (c, dims) = f32_init(g, other).or_else(|| reshaped_const(g, other))?;
    if !c.iter().all(|v| v.is_finite()) {
        return None;
    }
    if c.len() == 1 {
        return Some(vec![c[0]; m]);
    }
    if c.len() != m || dims.len() > rank || rank < 2 {
        return None;
    }
    let mut padded = vec![1usize; rank - dims.len()];
    padded.extend(&dims);
    let ok = padded
        .iter()
        .enumerate()
        .all(|(k, &d)| if k == 1 { d == m } else { d == 1 });
    ok.then_some(c)
}

/// The values and dims of `v = Reshape(data, shape)` when both are initializers (exporters
/// write a Conv bias this way): the data in order, the dims from `shape` (`0` copies the input
/// dim unless `allowzero = 1`, `-1` is inferred).
fn reshaped_const(g: &Graph, v: ValueId) -> Option<(Vec<f32>, Vec<usize>)> {
    let p = g.node(g.producer(v)?);
    if !p.is("Reshape") || p.attr_int("allowzero", 0) != 0 {
        return None;
    }
    let (data, in_dims) = f32_init(g, p.inputs.first().copied().flatten()?)?;
    let shape = g
        .initializer(p.inputs.get(1).copied().flatten()?)?
        .to_i64()
        .ok()?;
    let mut dims = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (k, &d) in shape.iter().enumerate() {
        match d {
            0 => dims.push(*in_dims.get(k)?),
            -1 if infer.is_none() => {
                infer = Some(k);
                dims.push(1);
            }
            d if d > 0 => dims.push(d as usize),
            _ => return None,
        }
    }
    let known: usize = dims.iter().product();
    if let Some(k) = infer {
        if known == 0 || data.len() % known != 0 {
            return None;
        }
        dims[k] = data.len() / known;
    }
    (dims.iter().product::<usize>() == data.len()).then_some((data, dims))
}

/// `b` as a foldable BatchNormalization of a Conv with `m` output channels.
fn batchnorm(
    g: &Graph,
    b: NodeId,
    m: usize,
    visible: &dyn Fn(ValueId) -> bool,
    uses: &[Vec<(NodeId, usize)>],
) -> Option<Bn> {
    let n = g.node(b);
    if n.attr_int("training_mode", 0) != 0 || n.attr_int("spatial", 1) != 1 || n.inputs.len() != 5 {
        return None;
    }
    let y = (*n.outputs.first()?)?;
    let extra_used = n
        .outputs
        .iter()
        .skip(1)
        .flatten()
        .any(|&v| !uses[v.0 as usize].is_empty() || visible(v));
    if extra_used || visible(y) {
        return None;
    }
    let mut params = [y; 4];
    for (k, p) in params.iter_mut().enumerate() {
        let v = n.inputs.get(k + 1).copied().flatten()?;
        let (vals, dims) = f32_init(g, v)?;
        if vals.len() != m || dims.len() != 1 {
            return None;
        }
        *p = v;
    }
    Some(Bn {
        node: b,
        params,
        eps: n.attr_float("epsilon", 1e-5),
    })
}

/// A unit chosen for quantization, with its (folded) float weight and bias.
struct Planned {
    unit: Unit,
    /// Its BatchNormalization is folded.
    folds: bool,
    w: Vec<f32>,
    dims: Vec<usize>,
    /// Bias values and the base of their names (folded when `folds`).
    bias: Option<(Vec<f32>, String)>,
}

/// A QuantizeLinear -> DequantizeLinear pair planned on one value.
#[derive(Debug, Clone)]
struct Pair {
    /// The value whose range is used (a name of the graph before the pass).
    logical: ValueId,
    /// The value QuantizeLinear reads (the unit's own output when `logical` is a folded
    /// BatchNormalization output).
    source: ValueId,
    /// Every node reader of `logical` reads the dequantized value (a Conv output).
    all_readers: bool,
    /// Quantized units reading it as input 0.
    unit_readers: Vec<NodeId>,
    /// The DequantizeLinear output takes this (removed) value's name.
    rename_from: Option<ValueId>,
}

/// Activation quantization parameters.
#[derive(Debug, Clone, Copy)]
struct QParams {
    scale: f32,
    zero_point: i32,
    qtype: QType,
}

fn run(model: &mut Model, opts: &PassOptions) -> Result<PassStats> {
    let mut stats = PassStats::default();
    let cal_opts = opts
        .calibration
        .as_ref()
        .context("quantize_static needs calibration data (--calibration DIR|FILE.npz)")?;
    // As dynamic mode does below its opset: an error, not a model left as it was.
    let opset = model.opset("").unwrap_or(1);
    ensure!(
        opset >= 10,
        "static quantization needs QuantizeLinear/DequantizeLinear (opset 10) but the model is opset {opset}; onnxopt does not raise a model's opset below 10: use --mode weight-only"
    );
    if !can_add_initializers(model) {
        stats.notes.push(format!(
            "IR version {} requires initializers to be graph inputs: nothing quantized",
            model.header.ir_version()
        ));
        return Ok(stats);
    }
    let per_channel = opset >= 13;

    let mut sub_units = 0;
    for (_, n) in model.graph.live_nodes() {
        for sg in n.subgraphs() {
            sg.visit(&mut |g| {
                sub_units += g
                    .live_nodes()
                    .filter(|(_, n)| {
                        n.domain().is_empty() && matches!(n.op_type(), "Conv" | "Gemm" | "MatMul")
                    })
                    .count();
            });
        }
    }
    if sub_units > 0 {
        stats.notes.push(format!(
            "{sub_units} Conv/Gemm/MatMul node(s) inside If/Loop/Scan bodies left in float (static quantization covers the main graph)"
        ));
    }

    let units = find_units(&model.graph, &mut stats.notes);
    if units.is_empty() {
        stats
            .notes
            .push("no Conv, Gemm or MatMul with a float32 weight in the main graph".into());
        return Ok(stats);
    }
    let g = &model.graph;
    let names: BTreeSet<String> = units
        .iter()
        .flat_map(|u| [u.x, u.out])
        .map(|v| g.value(v).name.clone())
        .collect();
    let proto = crate::onnx::export::to_proto(model)?;
    let cal = calibrate(&proto, &names, cal_opts)
        .map_err(|e| {
            // tract lacks an op of the model: no calibration sample can change that.
            if format!("{e:#}").contains("Unimplemented(") {
                e.context(
                    "static quantization calibrates by running the model in tract, which lacks an op of this model (named at the end); --mode dynamic and --mode weight-only quantize without running it",
                )
            } else {
                e
            }
        })
        .context("calibrating quantize_static")?;
    ensure!(
        !cal.ranges.is_empty(),
        "calibration on {} sample(s) from {} gave none of the {} activations to quantize a range: each was empty or held NaN or infinity on every sample (a sample whose arrays have 0 rows has no values)",
        cal.samples,
        cal_opts.source.display(),
        names.len()
    );
    stats.notes.push(format!(
        "calibrated {} activation tensors on {} sample(s) from {} ({}){}",
        cal.ranges.len(),
        cal.samples,
        cal_opts.source.display(),
        match cal_opts.method {
            crate::quant::RangeMethod::MinMax => "minmax".to_string(),
            crate::quant::RangeMethod::Percentile { percentile } =>
                format!("percentile {percentile}"),
            crate::quant::RangeMethod::Entropy => "entropy".to_string(),
        },
        if cal.cached {
            " (once for this run: later passes reuse it)"
        } else {
            ""
        }
    ));
    if cal.empty_samples > 0 {
        stats.notes.push(format!(
            "{} of the {} calibration sample(s) gave no value (every activation empty: a sample with 0 rows): the ranges come from the others",
            cal.empty_samples, cal.samples
        ));
    }
    // Activations that were 0 on every sample get a placeholder scale of 1: on other data
    // every value outside [-0.5, 0.5] would clip. The samples may not be representative.
    let mut zero: Vec<&str> = cal
        .ranges
        .iter()
        .filter(|(_, &(lo, hi))| lo == 0.0 && hi == 0.0)
        .map(|(n, _)| n.as_str())
        .collect();
    if !zero.is_empty() {
        zero.sort_unstable();
        let shown = zero.len().min(5);
        stats.notes.push(format!(
            "{} activation(s) were 0 on every calibration sample, so their range says nothing (scale 1, zero point 0; other inputs would clip): {}{}; check that the samples are representative",
            zero.len(),
            zero[..shown].iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", "),
            if zero.len() > shown { ", ..." } else { "" }
        ));
    }
    let act_scheme = Scheme {
        qtype: cal_opts.activation_type,
        symmetric: cal_opts.activation_type.signed(),
        granularity: Granularity::Tensor,
        pow2: false,
    };
    let qparams = |v: ValueId| qparams_of(&cal.ranges, g, v, &act_scheme);

    // Plan: which units are quantized, which fold, which pairs go where.
    let uses = g.uses();
    let sub_reads = g.names_read_by_subgraphs();
    let visible = |v: ValueId| g.is_graph_output(v) || sub_reads.contains(&g.value(v).name);
    let mut chosen: Vec<Planned> = Vec::new();
    let (mut not_selected, mut no_range) = (0, Vec::new());
    let mut slow: BTreeMap<&str, usize> = BTreeMap::new();
    // Units left in float only because int8 would be slower.
    let mut slow_units: Vec<&Unit> = Vec::new();
    for u in &units {
        let node = g.node(u.node);
        if !opts.selects(g, node) {
            not_selected += 1;
            continue;
        }
        if (g.is_graph_input(u.x) && g.is_graph_output(u.x)) || qparams(u.x).is_none() {
            no_range.push(node.label(u.node));
            continue;
        }
        let Some((_, dims)) = f32_init(g, u.w) else {
            continue;
        };
        let out_shape = cal.shapes.get(&g.value(u.out).name).map(Vec::as_slice);
        if let Some(why) = (!opts.all_layers)
            .then(|| slow_in_int8(node, &dims, u.axis, out_shape))
            .flatten()
        {
            *slow.entry(why).or_default() += 1;
            slow_units.push(u);
            continue;
        }
        if let Some(plan) = plan_unit(g, u, &qparams, &mut stats.notes) {
            chosen.push(plan);
        }
    }
    // onnxruntime's WeightBiasQuantization (graph optimization level 1) quantizes, per tensor,
    // the float weight of any Conv/Gemm/ConvTranspose that reads a DequantizeLinear output and
    // whose output reaches a QuantizeLinear through one reader at a time (after its own
    // Conv+BatchNormalization/Add/Mul fusions, through Relu/Clip). A unit left float for speed in
    // that position is quantized here instead (onnxruntime would run it in int8 anyway, with
    // numerics the check would not see); a node kept float on request (options, fallback) reads
    // the float value instead of the dequantized one, so that it stays float there too.
    let mut float_readers: BTreeSet<NodeId> = BTreeSet::new();
    let mut forced = 0;
    loop {
        let fused: HashSet<ValueId> = chosen
            .iter()
            .filter(|p| conv_output_pair(g, p, &qparams, &visible))
            .map(|p| p.unit.out)
            .collect();
        let quantized: HashSet<NodeId> = chosen.iter().map(|p| p.unit.node).collect();
        let unit_inputs: HashMap<ValueId, Vec<NodeId>> =
            chosen.iter().fold(HashMap::new(), |mut m, p| {
                m.entry(p.unit.x).or_insert_with(Vec::new).push(p.unit.node);
                m
            });
        let mut added = false;
        for (id, n) in g.live_nodes() {
            if quantized.contains(&id)
                || float_readers.contains(&id)
                || !matches!(n.op_type(), "Conv" | "Gemm" | "ConvTranspose")
                || !n.domain().is_empty()
            {
                continue;
            }
            let (Some(Some(x)), Some(Some(w)), Some(Some(y))) =
                (n.inputs.first(), n.inputs.get(1), n.outputs.first())
            else {
                continue;
            };
            if !fused.contains(x) || g.initializer(*w).is_none() {
                continue;
            }
            let end = ort_chain_end(g, &uses, *y, &visible);
            let feeds_q = unit_inputs.get(&end).is_some_and(|readers| {
                !visible(end)
                    && uses[end.0 as usize]
                        .iter()
                        .all(|(r, i)| *i == 0 && readers.contains(r))
            });
            if !feeds_q {
                continue;
            }
            let slow_unit = slow_units.iter().find(|u| u.node == id).copied();
            match slow_unit.and_then(|u| plan_unit(g, u, &qparams, &mut stats.notes)) {
                Some(plan) => {
                    chosen.push(plan);
                    forced += 1;
                    added = true;
                }
                None => {
                    float_readers.insert(id);
                }
            }
        }
        if !added {
            break;
        }
    }
    // The pass's own order (node order) for deterministic names.
    chosen.sort_by_key(|p| g.order.iter().position(|&n| n == p.unit.node));
    for (why, n) in &slow {
        stats.notes.push(format!(
            "{n} {why} left in float: onnxruntime's int8 kernels run them slower than float"
        ));
    }
    if forced > 0 {
        stats.notes.push(format!(
            "{forced} of them quantized after all: each reads a dequantized Conv output and feeds a quantized node, where onnxruntime's WeightBiasQuantization would quantize it per tensor itself"
        ));
    }
    if !float_readers.is_empty() {
        let names: Vec<String> = float_readers
            .iter()
            .map(|&id| g.node(id).label(id))
            .collect();
        stats.notes.push(format!(
            "{} float node(s) read their input unquantized, so that onnxruntime does not quantize them (the Conv producing that input then runs in float there): {}",
            names.len(),
            names.join(", ")
        ));
    }
    if not_selected > 0 {
        stats.notes.push(format!(
            "{not_selected} node(s) not selected (options or kept in float) left in float"
        ));
    }
    if !no_range.is_empty() {
        stats.notes.push(format!(
            "{} node(s) whose input is not a float activation with a finite calibrated range (or is both a graph input and output) left in float: {}",
            no_range.len(),
            no_range.join(", ")
        ));
    }
    // Folded chain outputs -> the unit output that now carries their values.
    let folded: HashMap<ValueId, ValueId> = chosen
        .iter()
        .filter(|p| p.folds)
        .map(|p| (p.unit.chain_out, p.unit.y0))
        .collect();
    let mut pairs: BTreeMap<ValueId, Pair> = BTreeMap::new();
    let new_pair = |v: ValueId| Pair {
        logical: v,
        source: folded.get(&v).copied().unwrap_or(v),
        all_readers: false,
        unit_readers: Vec::new(),
        rename_from: None,
    };
    for plan in &chosen {
        let u = &plan.unit;
        pairs
            .entry(u.x)
            .or_insert_with(|| new_pair(u.x))
            .unit_readers
            .push(u.node);
        if conv_output_pair(g, plan, &qparams, &visible) {
            let p = pairs.entry(u.out).or_insert_with(|| new_pair(u.out));
            p.all_readers = true;
            if plan.folds && u.relu.is_none() {
                p.rename_from = Some(u.chain_out);
            }
        }
    }

    // Write.
    let model_names = &mut model.names;
    let g = &mut model.graph;
    let qp: HashMap<ValueId, QParams> = pairs
        .keys()
        .filter_map(|&v| Some((v, qparams_of(&cal.ranges, g, v, &act_scheme)?)))
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut reduced = 0usize;
    let mut full_range_at_risk = 0usize;
    let mut full_range = 0usize;
    let mut bias_float = 0;
    for plan in chosen {
        let Planned {
            unit: u,
            folds,
            w,
            dims,
            bias,
        } = plan;
        let Some(x_qp) = qp.get(&u.x).copied() else {
            continue;
        };
        let label = g.node(u.node).label(u.node);
        if folds {
            for f in &u.epilogue {
                g.remove_node(f.node());
                *counts
                    .entry(match f {
                        Fold::Add { .. } => "Add folded",
                        Fold::Bn(_) => "BatchNormalization folded",
                    })
                    .or_default() += 1;
            }
            match u.relu {
                Some(r) => g.set_input(r, 0, Some(u.y0)),
                // Readers of the folded chain read the Conv output (then its pair, below).
                None => g.replace_uses(u.chain_out, u.y0),
            }
        }
        let node = g.node(u.node);
        let bias_ok = match u.op {
            "Conv" => bias.as_ref().is_some_and(|b| b.0.len() == dims[0]),
            "Gemm" => {
                node.attr_float("alpha", 1.0) == 1.0
                    && node.attr_float("beta", 1.0) == 1.0
                    && u.bias
                        .is_some_and(|b| g.initializer(b).is_some_and(|t| t.dims().len() == 1))
                    && bias.as_ref().is_some_and(|b| b.0.len() == dims[u.axis])
            }
            _ => false,
        };
        let rank = dims.len();
        // onnxruntime's MatMulIntegerToFloat, which its QDQ fusion makes of a MatMul, takes a
        // zero point per column only for a 2-D weight ("b zero point is not valid" at run
        // time otherwise): a batched weight gets one scale.
        let per_channel = per_channel && (u.op != "MatMul" || rank == 2);
        let scheme = Scheme {
            qtype: QType::Int8,
            symmetric: true,
            granularity: if per_channel {
                Granularity::Channel
            } else {
                Granularity::Tensor
            },
            pow2: false,
        };
        let Some(mut qz) = quantize(&w, &dims, u.axis, block_axis(node, rank, u.axis), &scheme)
        else {
            continue; // finite weights were checked while planning
        };
        if !per_channel && u.op == "Conv" {
            // One scale for every channel: clip the largest magnitudes where that lowers the
            // squared error (small channels keep more levels). MatMul/Gemm weights keep the
            // max: on ppocrv4-rec their outliers matter (measured).
            let s = mse_scale(&w, qz.scales[0]);
            qz.scales[0] = s;
            for (q, &v) in qz.q.iter_mut().zip(&w) {
                *q = round_clamped(v / s, -127.0, 127.0) as i32;
            }
        }
        // Weights in 7 bits where onnxruntime's x86 u8 x s8 kernels would saturate: the
        // layer reads int8 activations (shifted to u8 by +128) or uint8 ones whose zero point
        // sits high (a signed range, so quantized values far from 0 are common), and many of
        // its weights are large, so that two large products often meet in one int16 sum. On
        // silero-vad-16k-sequence, whose STFT Conv (a sinusoid basis) reads audio (zero point
        // 128), full-range weights gave cosine 0.89 in onnxruntime (tract: 0.9996; onnxruntime
        // without its fusions agreed with tract). On ppocrv4-rec, whose MatMuls read signed
        // activations with weights mostly small against their largest, 7 bits everywhere
        // lowered the held-out cosine in onnxruntime from 0.9984 to 0.9950: no saturation there.
        // The rule can miss: silero-vad-16k-op15's first encoder Conv reads zero-point-0
        // activations with 4% of its weights large and still saturates (0.981 against tract's
        // 0.9992); weights alone do not tell it apart (85 to 100% of the output channels of
        // every layer of the five models have an adjacent weight pair above 128 in magnitude),
        // so `reduce_range` narrows every layer, which no activation can saturate.
        let large = qz.q.iter().filter(|q| q.abs() > REDUCED_INT8_MAX).count();
        let saturates = opts.reduce_range
            || (x_qp.qtype == QType::Int8 || x_qp.zero_point >= REDUCED_ZERO_POINT)
                && large as f64 > LARGE_WEIGHT_FRACTION * qz.q.len() as f64;
        let limit = if saturates && !opts.full_range_weights {
            qz.narrow(&w, &dims, u.axis, 127, REDUCED_INT8_MAX);
            reduced += 1;
            REDUCED_INT8_MAX as f32
        } else {
            full_range_at_risk += usize::from(saturates);
            full_range += 1;
            127.0
        };
        stats.touched.push(format!(
            "{label}: {} int8 weights in [-{limit}, {limit}], {} activations",
            if per_channel {
                "per-channel"
            } else {
                "per-tensor"
            },
            cal_opts.activation_type.name()
        ));
        // The int32 bias, raising channel scales where it would overflow.
        let mut bias_q: Option<(Vec<i32>, Vec<f32>)> = None;
        if bias_ok {
            if let Some((b, bname)) = &bias {
                let channels = b.len();
                let w_scale = |c: usize, s: &[f32]| if s.len() == 1 { s[0] } else { s[c] };
                let overflow = |c: usize, s: &[f32]| {
                    let bs = x_qp.scale * w_scale(c, s);
                    !(bs.is_normal() && (b[c] as f64 / bs as f64).abs() <= I32_MAX)
                };
                let bad: Vec<usize> = (0..channels).filter(|&c| overflow(c, &qz.scales)).collect();
                let mut keep = true;
                if !bad.is_empty() && !per_channel {
                    keep = false;
                    let worst = bad
                        .iter()
                        .map(|&c| (b[c] as f64 / (x_qp.scale as f64 * qz.scales[0] as f64)).abs())
                        .fold(0f64, f64::max);
                    stats.notes.push(format!(
                        "{label}: bias '{bname}' would overflow int32 (|bias / (x_scale * w_scale)| up to {worst:.3e} > 2^31-1) with one weight scale per tensor (opset {opset}): bias kept in float, so onnxruntime runs this node in float"
                    ));
                    bias_float += 1;
                } else if !bad.is_empty() {
                    let mut max_raise = 1f64;
                    for &c in &bad {
                        let old = qz.scales[c];
                        let mut s = ((b[c].abs() as f64) / (x_qp.scale as f64 * I32_MAX)
                            * (1.0 + 1e-6)) as f32;
                        s = s.max(old).max(f32::MIN_POSITIVE);
                        while overflow_with(b[c], x_qp.scale, s) {
                            s *= 1.0001;
                        }
                        qz.scales[c] = s;
                        requantize_channel(&w, &dims, u.axis, c, s, limit, &mut qz.q);
                        max_raise = max_raise.max(s as f64 / old as f64);
                    }
                    stats.notes.push(format!(
                        "{label}: bias '{bname}' would overflow int32 in {} of {channels} channel(s) (|bias / (x_scale * w_scale)| > 2^31-1): their weight scales were raised (up to {max_raise:.3e}x) so that the int32 bias fits",
                        bad.len()
                    ));
                }
                if keep {
                    let scales: Vec<f32> = (0..channels)
                        .map(|c| x_qp.scale * w_scale(c, &qz.scales))
                        .collect();
                    let q = b
                        .iter()
                        .zip(&scales)
                        .map(|(&v, &s)| {
                            ((v as f64 / s as f64).round_ties_even()).clamp(-I32_MAX, I32_MAX)
                                as i32
                        })
                        .collect();
                    let scales = if per_channel { scales } else { vec![scales[0]] };
                    bias_q = Some((q, scales));
                }
            }
        }
        // Weight: int8 initializer, scale, zero point 0, DequantizeLinear.
        let wname = g.value(u.w).name.clone();
        let dims_i64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let q8: Vec<i8> = qz.q.iter().map(|&v| v as i8).collect();
        let wt = Tensor::from_i8(&dims_i64, &q8).described_as(g.initializer(u.w));
        let wq = g.add_initializer(model_names, &format!("{wname}_quantized"), wt);
        let sd: Vec<i64> = if per_channel {
            vec![dims[u.axis] as i64]
        } else {
            vec![]
        };
        let ws = g.add_initializer(
            model_names,
            &format!("{wname}_scale"),
            Tensor::from_f32(&sd, &qz.scales),
        );
        let wz = g.add_initializer(
            model_names,
            &format!("{wname}_zero_point"),
            Tensor::from_i8(&sd, &vec![0i8; qz.scales.len()]),
        );
        let attrs = if per_channel {
            vec![attr_int("axis", u.axis as i64)]
        } else {
            vec![]
        };
        let (_, wo) = g.add_node(
            model_names,
            "DequantizeLinear",
            "",
            &format!("{wname}_DequantizeLinear"),
            attrs,
            vec![Some(wq), Some(ws), Some(wz)],
            &[&format!("{wname}_dequantized")],
            Some(u.node),
        );
        g.set_input(u.node, 1, Some(wo[0]));
        // Bias: int32 DequantizeLinear, or float (folded values) when it cannot be int32.
        match (&bias_q, &bias) {
            (Some((q, scales)), Some((_, bname))) => {
                let raw: Vec<u8> = q.iter().flat_map(|v| v.to_le_bytes()).collect();
                let bq = g.add_initializer(
                    model_names,
                    &format!("{bname}_quantized"),
                    Tensor::from_raw(DataType::Int32 as i32, &[q.len() as i64], raw),
                );
                let bsd: Vec<i64> = if per_channel {
                    vec![scales.len() as i64]
                } else {
                    vec![]
                };
                let bs = g.add_initializer(
                    model_names,
                    &format!("{bname}_scale"),
                    Tensor::from_f32(&bsd, scales),
                );
                let attrs = if per_channel {
                    vec![attr_int("axis", 0)]
                } else {
                    vec![]
                };
                let (_, bo) = g.add_node(
                    model_names,
                    "DequantizeLinear",
                    "",
                    &format!("{bname}_DequantizeLinear"),
                    attrs,
                    vec![Some(bq), Some(bs)],
                    &[&format!("{bname}_dequantized")],
                    Some(u.node),
                );
                g.set_input(u.node, 2, Some(bo[0]));
            }
            (None, Some((b, bname))) if folds => {
                let bv = g.add_initializer(
                    model_names,
                    &format!("{bname}_bnfolded"),
                    Tensor::from_f32(&[b.len() as i64], b),
                );
                g.set_input(u.node, 2, Some(bv));
            }
            _ => {}
        }
        if u.bias.is_some() && bias_q.is_none() && u.op == "Gemm" && !bias_ok {
            bias_float += 1;
        }
        *counts.entry(u.op).or_default() += 1;
    }

    // Activation pairs.
    let mut pair_count = 0;
    for p in pairs.values() {
        let Some(params) = qp.get(&p.logical).copied() else {
            continue;
        };
        let mut readers: Vec<(NodeId, usize)> = Vec::new();
        if p.all_readers {
            readers.extend(
                uses[p.logical.0 as usize]
                    .iter()
                    .copied()
                    .filter(|(n, _)| !float_readers.contains(n)),
            );
        }
        for &n in &p.unit_readers {
            if !readers.contains(&(n, 0)) {
                readers.push((n, 0));
            }
        }
        // Readers that were removed (a folded BatchNormalization) are skipped.
        readers.retain(|(n, _)| g.order.contains(n));
        if readers.is_empty() {
            continue;
        }
        let base = g.value(p.logical).name.clone();
        let before = g
            .order
            .iter()
            .copied()
            .find(|id| readers.iter().any(|(n, _)| n == id));
        let zp_type = params.qtype.onnx_type();
        let s = g.add_initializer(
            model_names,
            &format!("{base}_scale"),
            Tensor::from_f32(&[], &[params.scale]),
        );
        let z = g.add_initializer(
            model_names,
            &format!("{base}_zero_point"),
            Tensor::from_raw(zp_type, &[], params.qtype.pack(&[params.zero_point])),
        );
        let (_, qo) = g.add_node(
            model_names,
            "QuantizeLinear",
            "",
            &format!("{base}_QuantizeLinear"),
            vec![],
            vec![Some(p.source), Some(s), Some(z)],
            &[&format!("{base}_quantized")],
            before,
        );
        let (_, dqo) = g.add_node(
            model_names,
            "DequantizeLinear",
            "",
            &format!("{base}_DequantizeLinear"),
            vec![],
            vec![Some(qo[0]), Some(s), Some(z)],
            &[&format!("{base}_dequantized")],
            before,
        );
        for (n, i) in readers {
            g.set_input(n, i, Some(dqo[0]));
        }
        if let Some(from) = p.rename_from {
            g.transfer_name(from, dqo[0]);
        }
        pair_count += 1;
    }
    let units_done: usize = counts
        .iter()
        .filter(|(k, _)| matches!(**k, "Conv" | "Gemm" | "MatMul"))
        .map(|(_, v)| v)
        .sum();
    stats.changes = units_done;
    let mut summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    if summary.is_empty() {
        summary.push("nothing".into());
    }
    stats.notes.push(format!(
        "{} quantized ({} activation Q/DQ pairs, {} {} weights, {} activations){}",
        summary.join(", "),
        pair_count,
        if per_channel {
            "per-channel"
        } else {
            "per-tensor"
        },
        "int8",
        cal_opts.activation_type.name(),
        if per_channel {
            String::new()
        } else {
            format!(" - opset {opset} < 13 has no per-axis DequantizeLinear")
        }
    ));
    if reduced > 0 && opts.reduce_range {
        stats.notes.push(format!(
            "--reduce-range: the weights of all {reduced} layer(s) in [-{REDUCED_INT8_MAX}, {REDUCED_INT8_MAX}]"
        ));
    } else if reduced > 0 {
        stats.notes.push(format!(
            "{reduced} layer(s) with mostly large weights reading int8 or signed uint8 activations (zero point >= {REDUCED_ZERO_POINT}) have weights in [-{REDUCED_INT8_MAX}, {REDUCED_INT8_MAX}]: onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI saturate with full-range weights there (--full-range-weights for other targets)"
        ));
    }
    if full_range > 0 && !opts.full_range_weights {
        stats.notes.push(format!(
            "{full_range} layer(s) keep int8 weights up to 127: onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI can still saturate there (silero-vad-16k-op15: cosine 0.98 in onnxruntime, 0.999 in tract), which the tract check cannot show; --reduce-range rules it out for such targets"
        ));
    }
    if full_range_at_risk > 0 {
        stats.notes.push(format!(
            "{full_range_at_risk} layer(s) with mostly large weights read int8 or signed uint8 activations and keep full-range weights (--full-range-weights): onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI can saturate there, which the tract check does not show"
        ));
    }
    if bias_float > 0 {
        stats.notes.push(format!(
            "{bias_float} bias(es) kept in float (int32 overflow, or a Gemm C that is not a [N] vector with alpha = beta = 1)"
        ));
    }
    Ok(stats)
}

fn qparams_of(
    ranges: &HashMap<String, (f32, f32)>,
    g: &Graph,
    v: ValueId,
    scheme: &Scheme,
) -> Option<QParams> {
    let (lo, hi) = *ranges.get(&g.value(v).name)?;
    let (scale, zero_point) = scale_zero_point(lo, hi, scheme);
    Some(QParams {
        scale,
        zero_point,
        qtype: scheme.qtype,
    })
}

/// The symmetric int8 scale, among `max_scale * r` for clipping ratios `r` in
/// `0.60, 0.61, .., 1.00`, with the smallest squared quantization error over `w` (ties keep the
/// larger scale).
fn mse_scale(w: &[f32], max_scale: f32) -> f32 {
    let err = |s: f32| -> f64 {
        w.iter()
            .map(|&v| {
                let d = v - round_clamped(v / s, -127.0, 127.0) * s;
                (d as f64) * (d as f64)
            })
            .sum()
    };
    use rayon::prelude::*;
    let candidates: Vec<(f64, f32)> = (60..100)
        .into_par_iter()
        .filter_map(|k| {
            let s = max_scale * k as f32 / 100.0;
            s.is_normal().then(|| (err(s), s))
        })
        .collect();
    let mut best = (err(max_scale), max_scale);
    for (e, s) in candidates {
        if e < best.0 {
            best = (e, s);
        }
    }
    best.1
}

fn overflow_with(b: f32, x_scale: f32, w_scale: f32) -> bool {
    let bs = x_scale * w_scale;
    !(bs.is_normal() && (b as f64 / bs as f64).abs() <= I32_MAX)
}

/// Requantizes channel `c` (along `axis`) of `w` with `scale` into `q` (symmetric, within
/// `[-limit, limit]`).
fn requantize_channel(
    w: &[f32],
    dims: &[usize],
    axis: usize,
    c: usize,
    scale: f32,
    limit: f32,
    q: &mut [i32],
) {
    let (outer, channels, inner) = split_axis(dims, axis);
    for o in 0..outer {
        let base = (o * channels + c) * inner;
        for i in base..base + inner {
            q[i] = round_clamped(w[i] / scale, -limit, limit) as i32;
        }
    }
}

/// The epilogue folded into a Conv weight `[M, ...]` and bias `[M]` (in f64): `Add` gives
/// `b' = b + c`; BatchNormalization gives `W' = W * s`, `b' = (b - mean) * s + B` with
/// `s = scale / sqrt(var + eps)`.
fn fold_epilogue(
    g: &Graph,
    w: &[f32],
    dims: &[usize],
    b: &[f32],
    epilogue: &[Fold],
) -> (Vec<f32>, Vec<f32>) {
    let m = dims[0];
    let per = (w.len() / m.max(1)).max(1);
    let mut w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    for f in epilogue {
        match f {
            Fold::Add { c, .. } => {
                for (bv, cv) in b.iter_mut().zip(c) {
                    *bv += *cv as f64;
                }
            }
            Fold::Bn(bn) => {
                let p: Vec<Vec<f32>> = bn
                    .params
                    .iter()
                    .map(|&v| f32_init(g, v).map(|t| t.0).unwrap_or_default())
                    .collect();
                if p.iter().any(|v| v.len() != m) {
                    return (vec![f32::NAN], vec![]); // checked when found; never reached
                }
                let s: Vec<f64> = (0..m)
                    .map(|c| p[0][c] as f64 / (p[3][c] as f64 + bn.eps as f64).sqrt())
                    .collect();
                for (i, v) in w.iter_mut().enumerate() {
                    *v *= s[i / per];
                }
                for c in 0..m {
                    b[c] = (b[c] - p[2][c] as f64) * s[c] + p[1][c] as f64;
                }
            }
        }
    }
    (
        w.into_iter().map(|v| v as f32).collect(),
        b.into_iter().map(|v| v as f32).collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::path::{Path, PathBuf};

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tract_onnx::prelude::Tensor as TractTensor;

    use super::*;
    use crate::pb;
    use crate::quant::{CalibrationOptions, RangeMethod};
    use crate::verify::inputs::{load_npz, save_npz};

    // ---- tiny models -------------------------------------------------------------------

    fn info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{dimension::Value, Dimension};
        pb::ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: Some(DataType::Float as i32),
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto {
            name: Some(name.into()),
            ints: v.to_vec(),
            r#type: Some(pb::attribute_proto::AttributeType::Ints as i32),
            ..Default::default()
        }
    }

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        pb::NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn init(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
        let mut t = Tensor::from_f32(dims, data).proto;
        t.name = Some(name.into());
        t
    }

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..hi)).collect()
    }

    fn model_io(
        nodes: Vec<pb::NodeProto>,
        inits: Vec<pb::TensorProto>,
        opset: i64,
        inputs: Vec<pb::ValueInfoProto>,
        outputs: Vec<pb::ValueInfoProto>,
    ) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: Some(8),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(pb::GraphProto {
                name: Some("g".into()),
                node: nodes,
                initializer: inits,
                input: inputs,
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// ```text
    /// x -> conv1(3x3, bias) -> bn1 -> relu1 = r1 -> conv2(1x1) -> Add(Reshape(B2)) = a2
    ///   -> dw(depthwise 3x3) = c3 (a graph output) -> GlobalAveragePool -> Flatten = f
    ///   -> fc(Gemm, C) = y
    /// ```
    fn tiny_cnn(opset: i64) -> pb::ModelProto {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut conv1 = node("Conv", "conv1", &["x", "W1", "b1"], &["c1"]);
        conv1.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
        let mut dw = node("Conv", "dw", &["a2", "W3"], &["c3"]);
        dw.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
        dw.attribute.push(crate::ir::edit::attr_int("group", C));
        let nodes = vec![
            conv1,
            node(
                "BatchNormalization",
                "bn1",
                &["c1", "g1", "be1", "m1", "v1"],
                &["n1"],
            ),
            node("Relu", "relu1", &["n1"], &["r1"]),
            node("Conv", "conv2", &["r1", "W2"], &["c2"]),
            node("Reshape", "bias_shape", &["B2", "S2"], &["B2r"]),
            node("Add", "bias_add", &["c2", "B2r"], &["a2"]),
            dw,
            node("GlobalAveragePool", "gap", &["c3"], &["p"]),
            node("Flatten", "flat", &["p"], &["f"]),
            node("Gemm", "fc", &["f", "W4", "C4"], &["y"]),
        ];
        let mut shape = Tensor::from_i64(&[4], &[1, C, 1, 1]).proto;
        shape.name = Some("S2".into());
        let inits = vec![
            init(
                "W1",
                &[C, C, 3, 3],
                &rand_vec(&mut rng, N * N * 9, -0.3, 0.3),
            ),
            init("b1", &[C], &rand_vec(&mut rng, N, -0.2, 0.2)),
            init("g1", &[C], &rand_vec(&mut rng, N, 0.5, 1.5)),
            init("be1", &[C], &rand_vec(&mut rng, N, -0.3, 0.3)),
            init("m1", &[C], &rand_vec(&mut rng, N, -0.2, 0.2)),
            init("v1", &[C], &rand_vec(&mut rng, N, 0.5, 2.0)),
            init("W2", &[C, C, 1, 1], &rand_vec(&mut rng, N * N, -0.5, 0.5)),
            init("B2", &[C], &rand_vec(&mut rng, N, -0.5, 0.5)),
            shape,
            init("W3", &[C, 1, 3, 3], &rand_vec(&mut rng, N * 9, -0.5, 0.5)),
            init("W4", &[C, 5], &rand_vec(&mut rng, N * 5, -1.0, 1.0)),
            init("C4", &[5], &rand_vec(&mut rng, 5, -0.5, 0.5)),
        ];
        model_io(
            nodes,
            inits,
            opset,
            vec![info("x", &[1, C, 8, 8])],
            vec![info("y", &[1, 5]), info("c3", &[1, C, 8, 8])],
        )
    }

    /// Channels of the tiny models: enough for their Convs to pay off in int8 (`slow_in_int8`).
    const C: i64 = 64;
    const N: usize = C as usize;
    const X: [usize; 4] = [1, N, 8, 8];

    fn import(p: pb::ModelProto) -> Model {
        crate::onnx::from_proto(p, None, "test").unwrap().0
    }

    fn uniform_input(rng: &mut ChaCha8Rng, shape: &[usize]) -> TractTensor {
        let n = shape.iter().product();
        TractTensor::from_shape(shape, &rand_vec(rng, n, -1.0, 1.0)).unwrap()
    }

    /// Writes `n` samples of `x` (drawn by `gen`) as one .npz each into `dir`.
    fn write_samples(
        dir: &Path,
        prefix: &str,
        n: usize,
        mut gen: impl FnMut(usize) -> TractTensor,
    ) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let p = dir.join(format!("{prefix}_{i:03}.npz"));
                save_npz(&p, &[("x".to_string(), gen(i))]).unwrap();
                p
            })
            .collect()
    }

    fn cal_opts(source: &Path, method: RangeMethod, qtype: QType) -> PassOptions {
        PassOptions {
            calibration: Some(CalibrationOptions {
                source: source.to_path_buf(),
                method,
                max_samples: 256,
                activation_type: qtype,
                cache: Default::default(),
            }),
            ..Default::default()
        }
    }

    fn cosine(a: &TractTensor, b: &TractTensor) -> f64 {
        let a = crate::verify::metrics::to_f64(a).unwrap();
        let b = crate::verify::metrics::to_f64(b).unwrap();
        let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
        for (x, y) in a.iter().zip(&b) {
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        if aa == 0.0 && bb == 0.0 {
            return 1.0;
        }
        ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
    }

    fn nodes_of<'a>(p: &'a pb::ModelProto, op: &'a str) -> impl Iterator<Item = &'a pb::NodeProto> {
        p.graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .filter(move |n| n.op_type() == op)
    }

    fn count(p: &pb::ModelProto, op: &str) -> usize {
        nodes_of(p, op).count()
    }

    fn named<'a>(p: &'a pb::ModelProto, name: &str) -> &'a pb::NodeProto {
        let g = p.graph.as_ref().unwrap();
        g.node.iter().find(|n| n.name() == name).unwrap()
    }

    fn initializer<'a>(p: &'a pb::ModelProto, name: &str) -> &'a pb::TensorProto {
        let g = p.graph.as_ref().unwrap();
        g.initializer.iter().find(|t| t.name() == name).unwrap()
    }

    /// The smallest output cosine of `b` against `a` over `inputs`, run in tract.
    fn min_cosine(a: &pb::ModelProto, b: &pb::ModelProto, inputs: &[TractTensor]) -> f64 {
        let mut worst = 1f64;
        for x in inputs {
            let feed = vec![("x".to_string(), x.clone())];
            let ra = crate::verify::run(a, None, &feed).unwrap();
            let rb = crate::verify::run(b, None, &feed).unwrap();
            assert_eq!(ra.len(), rb.len());
            for ((na, ta), (nb, tb)) in ra.iter().zip(&rb) {
                assert_eq!(na, nb);
                worst = worst.min(cosine(ta, tb));
            }
        }
        worst
    }

    /// Calibration samples on which an activation is 0 throughout (here the model's input)
    /// say nothing of its range: a note names it (its placeholder scale of 1 clipped other
    /// inputs, cosine 0.70 in onnxruntime, without a word). Samples that vary give no note.
    #[test]
    fn activations_zero_on_every_sample_are_named() {
        for (zero, noted) in [(true, true), (false, false)] {
            let dir = tempfile::tempdir().unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            write_samples(dir.path(), "cal", 4, |_| {
                if zero {
                    TractTensor::zero::<f32>(&X).unwrap()
                } else {
                    uniform_input(&mut rng, &X)
                }
            });
            let mut m = import(tiny_cnn(13));
            let opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
            let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
            let notes = stats.notes.join("\n");
            assert_eq!(
                notes.contains("were 0 on every calibration sample, so their range says nothing"),
                noted,
                "{notes}"
            );
            if zero {
                assert!(notes.contains("'x'"), "{notes}");
            }
        }
    }

    #[test]
    fn tiny_cnn_runs_in_tract_close_to_float_with_io_unchanged() {
        for (opset, qtype) in [(13, QType::Uint8), (11, QType::Uint8), (13, QType::Int8)] {
            let src = tiny_cnn(opset);
            let dir = tempfile::tempdir().unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            write_samples(dir.path(), "cal", 16, |_| uniform_input(&mut rng, &X));
            let mut m = import(src.clone());
            let opts = cal_opts(dir.path(), RangeMethod::MinMax, qtype);
            let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
            crate::ir::validate::validate(&m).unwrap();
            let notes = format!("{:#?}", stats.notes);
            assert_eq!(stats.changes, 3, "{notes}");
            assert!(
                notes.contains("1 depthwise Conv(s) left in float"),
                "{notes}"
            );
            let out = crate::onnx::export::to_proto(&m).unwrap();
            let (gs, go) = (src.graph.as_ref().unwrap(), out.graph.as_ref().unwrap());
            assert_eq!(gs.input, go.input, "graph inputs unchanged");
            assert_eq!(gs.output, go.output, "graph outputs unchanged");
            // c3 is a graph output: still produced by the float depthwise Conv, and nothing
            // quantizes it.
            assert_eq!(named(&out, "dw").output, vec!["c3"]);
            assert!(nodes_of(&out, "QuantizeLinear").all(|q| q.input[0] != "c3"));
            // BatchNormalization and the bias Add folded, the Relu kept (onnxruntime drops it
            // after a zero point of 0), pairs on x, r1, a2 (the DequantizeLinear keeps the
            // name the depthwise Conv reads) and f; 3 weights and 3 biases dequantized.
            assert_eq!(count(&out, "BatchNormalization"), 0);
            assert_eq!(count(&out, "Add"), 0);
            assert_eq!(count(&out, "Relu"), 1);
            let quantized: Vec<&str> = nodes_of(&out, "QuantizeLinear")
                .map(|q| q.input[0].as_str())
                .collect();
            assert_eq!(quantized, vec!["x", "r1", "c2", "f"], "{quantized:?}");
            assert_eq!(count(&out, "DequantizeLinear"), 4 + 3 + 3);
            let dq_a2 = nodes_of(&out, "DequantizeLinear").find(|n| n.output[0] == "a2");
            assert!(
                dq_a2.is_some(),
                "the folded Add's output name is the pair's"
            );
            assert_eq!(named(&out, "dw").input[0], "a2");
            // The conv outputs are read by their QuantizeLinear only (onnxruntime's
            // QLinearConv fusion needs that).
            for conv in ["conv1", "conv2"] {
                let o = &named(&out, conv).output[0];
                let readers: Vec<&str> = go
                    .node
                    .iter()
                    .filter(|n| n.input.contains(o))
                    .map(|n| n.op_type())
                    .collect();
                let want = if conv == "conv1" {
                    "Relu"
                } else {
                    "QuantizeLinear"
                };
                assert_eq!(readers, vec![want], "{conv}");
            }
            let q_r1 = nodes_of(&out, "QuantizeLinear")
                .find(|n| n.input[0] == "r1")
                .unwrap();
            let zp = initializer(&out, &q_r1.input[2]);
            assert_eq!(zp.data_type(), qtype.onnx_type());
            assert_eq!(
                zp.raw_data.as_ref().unwrap()[0],
                0,
                "zero point of the Relu output"
            );
            // Per-channel weights from opset 13, per tensor below.
            let w1s = initializer(&out, "W1_scale");
            assert_eq!(w1s.dims, if opset >= 13 { vec![C] } else { vec![] });
            // Held-out inputs: another seed.
            let mut rng = ChaCha8Rng::seed_from_u64(99);
            let held: Vec<TractTensor> = (0..8).map(|_| uniform_input(&mut rng, &X)).collect();
            let c = min_cosine(&src, &out, &held);
            assert!(c >= 0.99, "opset {opset} {qtype:?}: cosine {c}");
            // Deterministic: a second run gives the same model (and uses the cache).
            let mut m2 = import(src.clone());
            let stats2 = QuantizeStatic.run(&mut m2, &opts).unwrap();
            assert!(stats2.notes.iter().any(|n| n.contains("once for this run")));
            assert_eq!(out, crate::onnx::export::to_proto(&m2).unwrap());
            // New options start a new cache: the cache is not shared by the whole process
            // (another test's calibrations could evict this one's between the two runs).
            let fresh = cal_opts(dir.path(), RangeMethod::MinMax, qtype);
            let stats3 = QuantizeStatic
                .run(&mut import(src.clone()), &fresh)
                .unwrap();
            assert!(!stats3.notes.iter().any(|n| n.contains("once for this run")));
        }
    }

    #[test]
    fn opset_9_is_refused_and_float16_and_already_quantized_models_are_left_alone_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        let unchanged = |src: pb::ModelProto, want: &str| {
            let mut m = import(src.clone());
            let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
            assert_eq!(stats.changes, 0, "{:?}", stats.notes);
            assert!(
                stats.notes.iter().any(|n| n.contains(want)),
                "want a note with {want:?}: {:?}",
                stats.notes
            );
            let before = crate::onnx::export::to_proto(&import(src)).unwrap();
            assert_eq!(crate::onnx::export::to_proto(&m).unwrap(), before);
        };
        // Opset 9 has no QuantizeLinear: refused before calibrating (no samples exist), as
        // dynamic mode refuses its opsets (it was a note, and exit 0 with nothing quantized).
        let err = QuantizeStatic
            .run(&mut import(tiny_cnn(9)), &opts)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("static quantization needs QuantizeLinear/DequantizeLinear (opset 10) but the model is opset 9"),
            "{err:#}"
        );

        // A float16 model: its weights are not float32.
        let mut x16 = info("x", &[1, C, 8, 8]);
        if let Some(pb::type_proto::Value::TensorType(t)) =
            x16.r#type.as_mut().unwrap().value.as_mut()
        {
            t.elem_type = Some(DataType::Float16 as i32);
        }
        let mut w16 = Tensor::from_raw(
            DataType::Float16 as i32,
            &[C, C, 1, 1],
            (0..N * N)
                .flat_map(|i| half::f16::from_f32((i % 7) as f32 * 0.1 - 0.3).to_le_bytes())
                .collect(),
        )
        .proto;
        w16.name = Some("W".into());
        let fp16 = model_io(
            vec![node("Conv", "conv", &["x", "W"], &["y"])],
            vec![w16],
            13,
            vec![x16],
            vec![info("y", &[])],
        );
        unchanged(fp16, "not a float32 initializer (float16");

        // Already quantized: the Conv reads a DequantizeLinear output.
        let mut s = Tensor::from_f32(&[], &[0.02]).proto;
        s.name = Some("s".into());
        let mut z = Tensor::from_raw(DataType::Uint8 as i32, &[], vec![128]).proto;
        z.name = Some("z".into());
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let qdq = model_io(
            vec![
                node("QuantizeLinear", "q", &["x", "s", "z"], &["xq"]),
                node("DequantizeLinear", "dq", &["xq", "s", "z"], &["xd"]),
                node("Conv", "conv", &["xd", "W"], &["y"]),
            ],
            vec![
                s,
                z,
                init("W", &[C, C, 1, 1], &rand_vec(&mut rng, N * N, -0.5, 0.5)),
            ],
            13,
            vec![info("x", &[1, C, 8, 8])],
            vec![info("y", &[])],
        );
        unchanged(qdq, "already dequantized left as they are");
    }

    #[test]
    fn speed_rule_follows_the_measured_timings() {
        // (weight dims, group, output shape, left float?, int8 / float time measured)
        type Case = (&'static [i64], i64, &'static [usize], bool, &'static str);
        let cases: [Case; 9] = [
            (&[8, 8, 1, 1], 1, &[1, 8, 48, 48], true, "1.89"),
            (&[64, 16, 1, 1], 1, &[1, 64, 24, 24], true, "1.18"),
            (&[16, 64, 1, 1], 1, &[1, 16, 24, 24], true, "1.05"),
            (&[64, 64, 1, 1], 1, &[1, 64, 24, 24], false, "0.89"),
            (&[32, 16, 3, 3], 1, &[1, 32, 24, 24], false, "0.73"),
            (&[8, 8, 3, 3], 1, &[1, 8, 24, 24], true, "1.33"),
            (&[64, 64, 1, 1], 1, &[1, 64, 1, 1], true, "1.04 - 1.26"),
            (&[64, 1, 3, 3], 64, &[1, 64, 24, 24], true, "depthwise, 1.5"),
            (
                &[64, 3, 3, 3],
                1,
                &[1, 64, 24, 24],
                true,
                "3 input channels, 4",
            ),
        ];
        for (dims, group, out, slow, measured) in cases {
            let mut conv = node("Conv", "conv", &["x", "W"], &["y"]);
            conv.attribute
                .push(crate::ir::edit::attr_int("group", group));
            let n: i64 = dims.iter().product();
            let p = model_io(
                vec![conv],
                vec![init("W", dims, &vec![0.1; n as usize])],
                13,
                vec![info("x", &[1, dims[1] * group, 24, 24])],
                vec![info("y", &[])],
            );
            let m = import(p);
            let (_, node) = m.graph.live_nodes().next().unwrap();
            let d: Vec<usize> = dims.iter().map(|&v| v as usize).collect();
            let why = slow_in_int8(node, &d, 0, Some(out));
            assert_eq!(
                why.is_some(),
                slow,
                "{dims:?} -> {out:?} ({measured}): {why:?}"
            );
        }
        // Gemm and MatMul are not covered by the rule.
        let p = model_io(
            vec![node("MatMul", "mm", &["x", "W"], &["y"])],
            vec![init("W", &[8, 4], &[0.1; 32])],
            13,
            vec![info("x", &[1, 8])],
            vec![info("y", &[])],
        );
        let m = import(p);
        let (_, node) = m.graph.live_nodes().next().unwrap();
        assert_eq!(slow_in_int8(node, &[8, 4], 1, Some(&[1, 4])), None);
    }

    #[test]
    fn all_layers_quantizes_the_slow_convs_too() {
        let src = between_quantized_convs();
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        write_samples(dir.path(), "cal", 4, |_| uniform_input(&mut rng, &X));
        let mut opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        opts.all_layers = true;
        let mut m = import(src.clone());
        let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
        assert_eq!(stats.changes, 3, "{:?}", stats.notes);
        assert!(
            !stats.notes.iter().any(|n| n.contains("slower")),
            "{:?}",
            stats.notes
        );
        let out = crate::onnx::export::to_proto(&m).unwrap();
        assert_ne!(
            named(&out, "dw").input[1],
            "Wd",
            "the depthwise weight is quantized"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let held: Vec<TractTensor> = (0..4).map(|_| uniform_input(&mut rng, &X)).collect();
        assert!(min_cosine(&src, &out, &held) >= 0.99);
    }

    #[test]
    fn kept_float_layers_and_unselected_ops_stay_float() {
        let src = tiny_cnn(13);
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        write_samples(dir.path(), "cal", 4, |_| uniform_input(&mut rng, &X));
        let mut opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        opts.keep_float.insert("c1".into());
        opts.op_types = vec!["Conv".into()];
        let mut m = import(src.clone());
        let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
        assert_eq!(stats.changes, 1, "{:?}", stats.notes);
        let out = crate::onnx::export::to_proto(&m).unwrap();
        // conv1 kept float: its BatchNormalization stays; conv2 quantized; the Gemm untouched.
        assert_eq!(count(&out, "BatchNormalization"), 1);
        assert_eq!(named(&out, "conv1").input, vec!["x", "W1", "b1"]);
        assert_eq!(named(&out, "fc").input, vec!["f", "W4", "C4"]);
        assert_ne!(named(&out, "conv2").input[1], "W2");
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let held: Vec<TractTensor> = (0..4).map(|_| uniform_input(&mut rng, &X)).collect();
        assert!(min_cosine(&src, &out, &held) >= 0.99);
    }

    /// tiny_cnn with conv2's weight also read by a ReduceSum whose result is a graph output:
    /// conv2 stays float with a note (its float weight stays for the ReduceSum, and an int8
    /// copy beside it would grow the file); the other layers are quantized.
    #[test]
    fn a_layer_whose_weight_something_else_reads_stays_float() {
        let mut src = tiny_cnn(13);
        let g = src.graph.as_mut().unwrap();
        let mut rs = node("ReduceSum", "wsum", &["W2"], &["w_sum"]);
        rs.attribute.push(crate::ir::edit::attr_int("keepdims", 0));
        g.node.push(rs);
        g.output.push(info("w_sum", &[]));
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        write_samples(dir.path(), "cal", 4, |_| uniform_input(&mut rng, &X));
        let opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        let mut m = import(src.clone());
        let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
        let out = crate::onnx::export::to_proto(&m).unwrap();
        assert_eq!(
            named(&out, "conv2").input[1],
            "W2",
            "conv2 reads the float weight"
        );
        assert!(
            out.graph
                .as_ref()
                .unwrap()
                .initializer
                .iter()
                .all(|t| t.name() != "W2_quantized"),
            "no int8 copy of W2"
        );
        assert_ne!(named(&out, "conv1").input[1], "W1", "conv1 is quantized");
        assert!(
            stats.notes.iter().any(|n| n.contains(
                "layer(s) left in float because something else reads their weight in float"
            ) && n.contains("Conv node \"conv2\": weight 'W2' is also read by ReduceSum node \"wsum\" (input 0)")),
            "{:?}",
            stats.notes
        );
    }

    /// x -> c1 (1x1) -> Relu = r1 -> dw (depthwise 3x3) = d -> Relu = r2 -> c3 (1x1) = y:
    /// the depthwise Conv reads a Conv output and feeds a quantized Conv, the position where
    /// onnxruntime's WeightBiasQuantization quantizes a float Conv itself.
    fn between_quantized_convs() -> pb::ModelProto {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let mut dw = node("Conv", "dw", &["r1", "Wd"], &["d"]);
        dw.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
        dw.attribute.push(crate::ir::edit::attr_int("group", C));
        model_io(
            vec![
                node("Conv", "c1", &["x", "W1"], &["o1"]),
                node("Relu", "relu1", &["o1"], &["r1"]),
                dw,
                node("Relu", "relu2", &["d"], &["r2"]),
                node("Conv", "c3", &["r2", "W3"], &["y"]),
            ],
            vec![
                init("W1", &[C, C, 1, 1], &rand_vec(&mut rng, N * N, -0.5, 0.5)),
                init("Wd", &[C, 1, 3, 3], &rand_vec(&mut rng, N * 9, -0.5, 0.5)),
                init("W3", &[32, C, 1, 1], &rand_vec(&mut rng, 32 * N, -0.5, 0.5)),
            ],
            13,
            vec![info("x", &[1, C, 8, 8])],
            vec![info("y", &[1, 32, 8, 8])],
        )
    }

    #[test]
    fn float_conv_between_quantized_convs_is_not_left_to_onnxruntime() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        write_samples(dir.path(), "cal", 4, |_| uniform_input(&mut rng, &X));
        let src = between_quantized_convs();
        // Left float for speed, but onnxruntime would quantize it: quantized here.
        let opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        let mut m = import(src.clone());
        let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
        assert_eq!(stats.changes, 3, "{:?}", stats.notes);
        assert!(stats
            .notes
            .iter()
            .any(|n| n.contains("quantized after all")));
        // Kept float on request: it reads the float Relu output, not a DequantizeLinear.
        let mut opts = opts.clone();
        opts.keep_float.insert("d".into());
        let mut m = import(src.clone());
        let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
        assert_eq!(stats.changes, 2, "{:?}", stats.notes);
        assert!(
            stats
                .notes
                .iter()
                .any(|n| n.contains("read their input unquantized")),
            "{:?}",
            stats.notes
        );
        let out = crate::onnx::export::to_proto(&m).unwrap();
        assert_eq!(named(&out, "dw").input, vec!["r1", "Wd"]);
        // c1's output has no quantized reader left: no pair on it (c1 runs in float there).
        let quantized: Vec<&str> = nodes_of(&out, "QuantizeLinear")
            .map(|q| q.input[0].as_str())
            .collect();
        assert_eq!(quantized, vec!["x", "r2"]);
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let held: Vec<TractTensor> = (0..4).map(|_| uniform_input(&mut rng, &X)).collect();
        assert!(min_cosine(&src, &out, &held) >= 0.99);
    }

    /// The biases of [`huge_bias`]: 1e6 and -1e6, then 14 ordinary ones.
    fn huge_bias_values() -> Vec<f32> {
        let mut b = vec![1e6f32, -1e6];
        b.extend((0..14).map(|i| i as f32 * 0.25 - 1.5));
        b
    }

    /// One Conv whose first two output channels have weights about 1e-6 and biases of 1e6:
    /// `bias / (x_scale * w_scale)` is about 1e16, far beyond int32. The other 14 channels are
    /// ordinary.
    fn huge_bias(opset: i64) -> pb::ModelProto {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut w: Vec<f32> = rand_vec(&mut rng, 2 * N * 9, -1e-6, 1e-6);
        w.extend(rand_vec(&mut rng, 14 * N * 9, -0.5, 0.5));
        let b = huge_bias_values();
        let mut conv = node("Conv", "conv", &["x", "W", "b"], &["c"]);
        conv.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
        model_io(
            vec![conv, node("Relu", "relu", &["c"], &["y"])],
            vec![init("W", &[16, C, 3, 3], &w), init("b", &[16], &b)],
            opset,
            vec![info("x", &[1, C, 8, 8])],
            vec![info("y", &[1, 16, 8, 8])],
        )
    }

    /// conv1 reads the signed graph input (uint8 zero point near 128): its weights use
    /// [-64, 64], which onnxruntime's x86 u8 x s8 kernels cannot saturate; conv2 reads a Relu
    /// output (zero point 0) and keeps [-127, 127]. `full_range_weights` keeps all full.
    #[test]
    fn weights_reading_signed_activations_use_7_bits() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        write_samples(dir.path(), "cal", 8, |_| uniform_input(&mut rng, &X));
        let held: Vec<TractTensor> = (0..4).map(|_| uniform_input(&mut rng, &X)).collect();
        let q_max = |out: &pb::ModelProto, name: &str| {
            Tensor::new(initializer(out, name).clone())
                .to_i64()
                .unwrap()
                .iter()
                .map(|v| v.abs())
                .max()
                .unwrap()
        };
        let src = tiny_cnn(13);
        for full in [false, true] {
            let mut opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
            opts.full_range_weights = full;
            let mut m = import(src.clone());
            let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
            let out = crate::onnx::export::to_proto(&m).unwrap();
            let note = stats.notes.iter().find(|n| n.contains("[-64, 64]"));
            if full {
                assert_eq!(q_max(&out, "W1_quantized"), 127);
                assert!(note.is_none(), "{:?}", stats.notes);
                // The user is told what the tract check cannot show.
                assert!(
                    stats
                        .notes
                        .iter()
                        .any(|n| n.starts_with("2 layer(s)") && n.contains("can saturate")),
                    "{:?}",
                    stats.notes
                );
            } else {
                assert_eq!(q_max(&out, "W1_quantized"), 64);
                // conv1, and fc reading the pooled output of the float depthwise Conv.
                assert!(
                    note.is_some_and(|n| n.starts_with("2 layer(s)")),
                    "{:?}",
                    stats.notes
                );
            }
            assert_eq!(q_max(&out, "W2_quantized"), 127);
            assert!(min_cosine(&src, &out, &held) >= 0.999);
        }
        // `reduce_range`: conv2, which reads the Relu output, too.
        let mut opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        opts.reduce_range = true;
        let mut m = import(src.clone());
        let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
        let out = crate::onnx::export::to_proto(&m).unwrap();
        assert_eq!(q_max(&out, "W1_quantized"), 64);
        assert_eq!(q_max(&out, "W2_quantized"), 64);
        assert!(
            stats
                .notes
                .iter()
                .any(|n| n.starts_with("--reduce-range: the weights of all 3 layer(s)")),
            "{:?}",
            stats.notes
        );
        assert!(min_cosine(&src, &out, &held) >= 0.999);
    }

    /// A model with an op tract lacks (Det) cannot be calibrated: the error says why, and which
    /// modes quantize without running the model.
    #[test]
    fn a_model_tract_cannot_run_is_refused_saying_which_modes_need_no_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let shape = [2usize, 3, 3];
        write_samples(dir.path(), "cal", 2, |_| uniform_input(&mut rng, &shape));
        let src = model_io(
            vec![
                node("MatMul", "mm", &["x", "W"], &["h"]),
                node("Det", "det", &["h"], &["y"]),
            ],
            vec![init("W", &[3, 3], &rand_vec(&mut rng, 9, -1.0, 1.0))],
            13,
            vec![info("x", &[2, 3, 3])],
            vec![info("y", &[2])],
        );
        let mut opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        opts.all_layers = true;
        let e = QuantizeStatic.run(&mut import(src), &opts).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("which lacks an op of this model")
                && msg.contains("--mode dynamic and --mode weight-only")
                && msg.contains("Det"),
            "{msg}"
        );
    }

    /// A MatMul with a 3-D (batched) weight: one weight scale, since onnxruntime's fused
    /// MatMulIntegerToFloat refuses a per-column zero point there at run time ("b zero point
    /// is not valid"); the 2-D weight beside it stays per channel.
    #[test]
    fn a_batched_matmul_weight_gets_one_scale_and_runs_in_onnxruntime() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let shape = [2usize, 4, 16];
        write_samples(dir.path(), "cal", 8, |_| uniform_input(&mut rng, &shape));
        let held = uniform_input(&mut rng, &shape);
        let src = model_io(
            vec![
                node("MatMul", "batched", &["x", "W3"], &["h"]),
                node("MatMul", "plain", &["h", "W2"], &["y"]),
            ],
            vec![
                init("W3", &[2, 16, 8], &rand_vec(&mut rng, 256, -1.0, 1.0)),
                init("W2", &[8, 8], &rand_vec(&mut rng, 64, -1.0, 1.0)),
            ],
            13,
            vec![info("x", &[2, 4, 16])],
            vec![info("y", &[2, 4, 8])],
        );
        let mut opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        opts.all_layers = true;
        let mut m = import(src.clone());
        QuantizeStatic.run(&mut m, &opts).unwrap();
        let out = crate::onnx::export::to_proto(&m).unwrap();
        let scale_len = |name: &str| -> usize {
            let dq = nodes_of(&out, "DequantizeLinear")
                .find(|n| n.input[0] == format!("{name}_quantized"))
                .unwrap_or_else(|| panic!("{name} is not quantized"));
            initializer(&out, &dq.input[1]).dims.iter().product::<i64>() as usize
        };
        assert_eq!(scale_len("W3"), 1);
        assert_eq!(scale_len("W2"), 8);
        assert!(min_cosine(&src, &out, std::slice::from_ref(&held)) >= 0.999);
        let Some(py) = python() else {
            eprintln!("no Python with onnxruntime (ONNXOPT_PYTHON): onnxruntime not checked");
            return;
        };
        let model = dir.path().join("q.onnx");
        std::fs::write(&model, prost::Message::encode_to_vec(&out)).unwrap();
        let inputs = dir.path().join("held.npz");
        save_npz(&inputs, &[("x".to_string(), held)]).unwrap();
        // onnxruntime's default session options: its QDQ fusions on.
        let o = std::process::Command::new(&py)
            .arg(repo().join("tests/py/ort_run.py"))
            .arg(&model)
            .arg(&inputs)
            .arg(dir.path().join("ort.npz"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "onnxruntime: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    #[test]
    fn huge_bias_never_overflows_int32() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        write_samples(dir.path(), "cal", 4, |_| uniform_input(&mut rng, &X));
        let opts = cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8);
        let held: Vec<TractTensor> = (0..4).map(|_| uniform_input(&mut rng, &X)).collect();

        // Per-channel weights (opset 13): the two channels' weight scales are raised.
        let src = huge_bias(13);
        let mut m = import(src.clone());
        let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
        let note = stats.notes.iter().find(|n| n.contains("overflow")).unwrap();
        assert!(
            note.contains("2 of 16 channel(s)") && note.contains("raised"),
            "{note}"
        );
        let out = crate::onnx::export::to_proto(&m).unwrap();
        let q = Tensor::new(initializer(&out, "b_quantized").clone())
            .to_i64()
            .unwrap();
        let s = Tensor::new(initializer(&out, "b_scale").clone())
            .to_f32()
            .unwrap();
        for (c, want) in huge_bias_values().iter().enumerate() {
            let want = *want as f64;
            assert!(q[c].abs() < i32::MAX as i64, "channel {c}: {}", q[c]);
            let got = q[c] as f64 * s[c] as f64;
            assert!(
                (got - want).abs() <= 1e-3 * want.abs() + s[c] as f64,
                "channel {c}: {got} vs {want}"
            );
        }
        assert!(min_cosine(&src, &out, &held) >= 0.9999);

        // One weight scale per tensor (opset 11): the bias stays float, and the note says so.
        let src = huge_bias(11);
        let mut m = import(src.clone());
        let stats = QuantizeStatic.run(&mut m, &opts).unwrap();
        let note = stats.notes.iter().find(|n| n.contains("overflow")).unwrap();
        assert!(note.contains("bias kept in float"), "{note}");
        let out = crate::onnx::export::to_proto(&m).unwrap();
        assert_eq!(named(&out, "conv").input[2], "b");
        assert!(min_cosine(&src, &out, &held) >= 0.9999);
    }

    #[test]
    fn calibration_errors_name_the_sample_and_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npz");
        let zeros = TractTensor::zero::<f32>(&X).unwrap();
        save_npz(&p, &[("not_x".to_string(), zeros)]).unwrap();
        let mut m = import(tiny_cnn(13));
        let err = QuantizeStatic
            .run(
                &mut m,
                &cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8),
            )
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("a.npz") && msg.contains("`x`"), "{msg}");
        let mut m = import(tiny_cnn(13));
        let err = QuantizeStatic
            .run(&mut m, &PassOptions::default())
            .unwrap_err();
        assert!(format!("{err:#}").contains("--calibration"));
    }

    /// A quantized weight keeps its float weight's doc string and metadata.
    #[test]
    fn a_quantized_weight_keeps_its_description() {
        let mut src = tiny_cnn(13);
        let w1 = src
            .graph
            .as_mut()
            .unwrap()
            .initializer
            .iter_mut()
            .find(|t| t.name() == "W1")
            .unwrap();
        w1.doc_string = Some("conv1 weight".into());
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        write_samples(dir.path(), "cal", 2, |_| uniform_input(&mut rng, &X));
        let mut m = import(src);
        QuantizeStatic
            .run(
                &mut m,
                &cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8),
            )
            .unwrap();
        let out = crate::onnx::export::to_proto(&m).unwrap();
        assert_eq!(
            initializer(&out, "W1_quantized").doc_string(),
            "conv1 weight"
        );
    }

    /// What the CLI refuses in the calibration options is refused for library callers too:
    /// an int16 activation type wrote QuantizeLinear nodes onnxruntime and the onnx checker
    /// reject, and a percentile of 10 or NaN calibrated nonsense ranges.
    #[test]
    fn calibration_options_the_cli_refuses_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        write_samples(dir.path(), "cal", 2, |_| uniform_input(&mut rng, &X));
        let cases = [
            (
                RangeMethod::MinMax,
                QType::Int16,
                "uint8 or int8, not Int16",
            ),
            (RangeMethod::MinMax, QType::Int4, "uint8 or int8, not Int4"),
            (
                RangeMethod::Percentile { percentile: 10.0 },
                QType::Uint8,
                "must be in (50, 100], not 10",
            ),
            (
                RangeMethod::Percentile {
                    percentile: f64::NAN,
                },
                QType::Uint8,
                "must be in (50, 100], not NaN",
            ),
        ];
        for (method, qtype, want) in cases {
            let mut m = import(tiny_cnn(13));
            let err = QuantizeStatic
                .run(&mut m, &cal_opts(dir.path(), method, qtype))
                .unwrap_err();
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
    }

    #[test]
    fn calibration_samples_of_the_wrong_dtype_or_shape_or_not_finite_are_named() {
        let nan = TractTensor::from_shape(&X, &vec![f32::NAN; X.iter().product()]).unwrap();
        let cases: [(TractTensor, &str); 3] = [
            (
                TractTensor::zero::<f64>(&X).unwrap(),
                "array `x` is F64 [1, 64, 8, 8], but graph input `x` is F32 [1, 64, 8, 8]",
            ),
            (
                nan,
                "array `x` holds 4096 NaN or infinite value(s) of 4096; calibration samples must be finite",
            ),
            (
                TractTensor::zero::<f32>(&[1, 3, 8, 8]).unwrap(),
                "array `x` is F32 [1, 3, 8, 8], but graph input `x` is F32 [1, 64, 8, 8]",
            ),
        ];
        for (t, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            save_npz(&dir.path().join("s.npz"), &[("x".to_string(), t)]).unwrap();
            let mut m = import(tiny_cnn(13));
            let err = QuantizeStatic
                .run(
                    &mut m,
                    &cal_opts(dir.path(), RangeMethod::MinMax, QType::Uint8),
                )
                .unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(want) && msg.contains("s.npz"), "{msg}");
        }
    }

    #[test]
    fn one_npz_with_a_batch_axis_is_split_into_samples() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("batch.npz");
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        save_npz(
            &p,
            &[("x".to_string(), uniform_input(&mut rng, &[6, N, 8, 8]))],
        )
        .unwrap();
        // Declared batch is symbolic.
        let mut src = tiny_cnn(13);
        let g = src.graph.as_mut().unwrap();
        if let Some(pb::type_proto::Value::TensorType(t)) =
            g.input[0].r#type.as_mut().unwrap().value.as_mut()
        {
            t.shape.as_mut().unwrap().dim[0].value = Some(
                pb::tensor_shape_proto::dimension::Value::DimParam("N".into()),
            );
        }
        let mut m = import(src);
        let method = RangeMethod::Percentile { percentile: 99.9 };
        let stats = QuantizeStatic
            .run(&mut m, &cal_opts(&p, method, QType::Uint8))
            .unwrap();
        assert!(
            stats.notes.iter().any(|n| n.contains("on 6 sample(s)")),
            "{:?}",
            stats.notes
        );
    }

    // ---- real models ---------------------------------------------------------------------

    /// A smooth image in [-1, 1] like the bundles in models/ (mean about 0, std about 0.43):
    /// three octaves of bilinear value noise per channel (one shared by the channels), plus a
    /// few dark strokes.
    fn smooth_image(rng: &mut ChaCha8Rng, h: usize, w: usize) -> TractTensor {
        let mut data = vec![0f32; 3 * h * w];
        let octave = |rng: &mut ChaCha8Rng, cy: usize, cx: usize, amp: f32| -> Vec<f32> {
            let (gh, gw) = (h / cy + 2, w / cx + 2);
            let grid = rand_vec(rng, gh * gw, -1.0, 1.0);
            let mut out = vec![0f32; h * w];
            for y in 0..h {
                let fy = y as f32 / cy as f32;
                let (y0, ty) = (fy as usize, fy.fract());
                for x in 0..w {
                    let fx = x as f32 / cx as f32;
                    let (x0, tx) = (fx as usize, fx.fract());
                    let g = |a: usize, b: usize| grid[a * gw + b];
                    let top = g(y0, x0) * (1.0 - tx) + g(y0, x0 + 1) * tx;
                    let bot = g(y0 + 1, x0) * (1.0 - tx) + g(y0 + 1, x0 + 1) * tx;
                    out[y * w + x] = amp * (top * (1.0 - ty) + bot * ty);
                }
            }
            out
        };
        let shared = octave(rng, 8, 16, 0.3);
        for c in 0..3 {
            let a = octave(rng, 6, 12, 0.6);
            let b = octave(rng, 3, 6, 0.25);
            for i in 0..h * w {
                data[c * h * w + i] = 1.45 * (0.3 * shared[i] + a[i] + b[i]);
            }
        }
        for _ in 0..rng.random_range(3..9) {
            let value = rng.random_range(-1.0..-0.6f32);
            let t = rng.random_range(2..5);
            let y = rng.random_range(4..h - 8);
            let x = rng.random_range(0..w - 24);
            let horizontal = rng.random_bool(0.5);
            let len = rng.random_range(8..w / 3);
            let (dh, dw) = if horizontal {
                (t, len.min(w - x))
            } else {
                ((len / 4).min(h - y), t)
            };
            for c in 0..3 {
                for dy in 0..dh {
                    for dx in 0..dw {
                        data[c * h * w + (y + dy) * w + x + dx] = value;
                    }
                }
            }
        }
        for v in &mut data {
            *v = v.clamp(-1.0, 1.0);
        }
        TractTensor::from_shape(&[1, 3, h, w], &data).unwrap()
    }

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn python() -> Option<PathBuf> {
        let p = std::env::var_os("ONNXOPT_PYTHON")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/pyenv/bin/python"));
        p.exists().then_some(p)
    }

    /// Writes 32 calibration samples into `dir/cal/` and 8 held-out ones as `dir/held_*.npz`
    /// for a `[1, 3, 48, w]` model (deterministic: fixed seeds).
    fn write_ocr_samples(dir: &Path, w: usize) -> Vec<PathBuf> {
        let cal = dir.join("cal");
        std::fs::create_dir_all(&cal).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2026);
        write_samples(&cal, "sample", 32, |_| smooth_image(&mut rng, 48, w));
        let mut rng = ChaCha8Rng::seed_from_u64(4242);
        write_samples(dir, "held", 8, |_| smooth_image(&mut rng, 48, w))
    }

    /// `onnxopt quantize models/NAME.onnx -o OUT --mode static --calibration DIR --inputs
    /// held_000.npz` (the same configuration as the command line, accuracy-gated fallback
    /// included), then every held-out input in tract and onnxruntime: cosine >= 0.99, and
    /// `onnx.checker.check_model(full_check=True)` accepts the result. The samples are kept
    /// under `$ONNXOPT_STATIC_SAMPLES/NAME` when that is set.
    fn real_model(name: &str, w: usize) {
        let keep = std::env::var_os("ONNXOPT_STATIC_SAMPLES").map(PathBuf::from);
        let tmp = tempfile::tempdir().unwrap();
        let dir = keep
            .map(|k| k.join(name))
            .unwrap_or_else(|| tmp.path().to_path_buf());
        std::fs::create_dir_all(&dir).unwrap();
        let held = write_ocr_samples(&dir, w);
        let path = repo().join(format!("models/{name}.onnx"));
        let out_path = dir.join(format!("{name}.static.onnx"));
        let cfg = crate::optimize::OptimizeConfig {
            model: path.clone(),
            output: out_path.clone(),
            passes: "cleanup,quantize_static,cleanup".into(),
            pass_options: cal_opts(&dir.join("cal"), RangeMethod::MinMax, QType::Uint8),
            save: Default::default(),
            check: true,
            inputs: crate::verify::InputOptions {
                npz: Some(held[0].clone()),
                ..Default::default()
            },
            gates: Default::default(),
            validate_each: true,
            fallback_target: Some(crate::optimize::DEFAULT_FALLBACK_COSINE),
            fallback_samples: crate::optimize::FALLBACK_CALIBRATION_SAMPLES,
            check_notes: vec![],
            selectors: vec![],
        };
        let t0 = std::time::Instant::now();
        let report = crate::optimize::optimize(&cfg, &crate::report::Silent).unwrap();
        let notes: Vec<&String> = report.passes.iter().flat_map(|r| &r.notes).collect();
        let kept = report.fallback.as_ref().map_or(0, |f| f.kept.len());
        eprintln!(
            "{name}: {:.1} s, {kept} layer(s) kept in float by the fallback; {notes:#?}",
            t0.elapsed().as_secs_f64()
        );
        let (m, _) = crate::onnx::load(&path).unwrap();
        let reference = crate::onnx::export::to_proto(&m).unwrap();
        let (q, _) = crate::onnx::load(&out_path).unwrap();
        let out = crate::onnx::export::to_proto(&q).unwrap();
        assert!(count(&out, "QuantizeLinear") > 0);
        let inputs: Vec<TractTensor> = held
            .iter()
            .map(|p| load_npz(p).unwrap().into_iter().next().unwrap().1)
            .collect();
        let c = min_cosine(&reference, &out, &inputs);
        eprintln!("{name}: smallest tract cosine over 8 held-out inputs {c:.6}");
        assert!(c >= 0.99, "{name}: tract cosine {c}");
        let Some(py) = python() else {
            eprintln!("no Python with onnxruntime (ONNXOPT_PYTHON): onnxruntime not checked");
            return;
        };
        let o = std::process::Command::new(&py)
            .arg(repo().join("tests/py/check.py"))
            .arg(&out_path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "onnx checker: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mut worst = 1f64;
        for h in &held {
            let o = std::process::Command::new(&py)
                .arg(repo().join("tests/py/ort_cosine.py"))
                .arg(&path)
                .arg(&out_path)
                .arg(h)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "ort_cosine: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            for row in v["outputs"].as_array().unwrap() {
                worst = worst.min(row["cosine"].as_f64().unwrap());
            }
        }
        eprintln!("{name}: smallest onnxruntime cosine over 8 held-out inputs {worst:.6}");
        assert!(worst >= 0.99, "{name}: onnxruntime cosine {worst}");
    }

    #[test]
    fn real_ppocr_mobile_v2_cls() {
        real_model("ppocr-mobile-v2-cls", 192);
    }

    #[test]
    fn real_ppocrv4_rec() {
        real_model("ppocrv4-rec", 320);
    }
}
