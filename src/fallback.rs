//! Accuracy-gated fallback: keep the layers that cost the most accuracy in float until the
//! result meets the target ([`Target`]: the cosine, and the check's elementwise tolerance and
//! top-1 gates when the user gave them).
//!
//! Sensitivity is each layer's error alone: the SNR of its output when it is the only
//! quantized layer and its input is exact, `SNR = 10 log10(sum a^2 / sum (a - b)^2)` over the
//! reference `a` and quantized `b` values (summed over the input sets). One tract run measures
//! every layer: the shadow model is the reference (the model before the lossy passes) plus, for
//! each layer, a copy of what the quantized candidate made of it (the QuantizeLinear /
//! DequantizeLinear pair on its input, its weights' dequantization, the layer, what a pass
//! folded into it and its output pair) reading the reference's activations. This is the
//! per-layer "SNR of matched activations" of NNCF's and Neural Compressor's accuracy-aware
//! modes without the noise that arrives from upstream, which matched activations of a fully
//! quantized model mix in: ranked on those, the fallback walked ppocrv4-rec front to back and
//! kept 29 of 47 layers in float (6.3 MB) to reach cosine 0.99.
//!
//! Layers are ranked by the noise-to-signal ratio they add, `10^(-SNR/10)`, per square root of
//! their weight count (of two equally noisy layers, the smaller one, cheaper to keep in float,
//! goes first); layers whose error is below `EXACT_DB` rank last, after those whose error
//! could not be measured (only a tight tolerance sees them). The fallback then
//! looks for the shortest prefix of that ranking whose layers, kept in float, make every float
//! graph output reach the cosine target on every input set: it re-runs the lossy passes from
//! the snapshot with the k, 2k, 4k, ... first layers kept until the target holds, then bisects
//! between the last miss and the first hit (a handful of candidate runs, where keeping one layer
//! per run took one run per layer kept). `k` comes from a noise model (`first_guess`): the
//! output's noise as the sum of the layers' noise alone, scaled to the measured start. Once the
//! target holds, the three largest kept layers are tried back in int8, one at a time: the
//! ranking is an estimate and output accuracy is not monotonic in it.
//!
//! A real candidate costs a tract plan (0.4 s on ppocrv4-rec, where a run takes 0.05 s), so the
//! search first runs on the switched model (`with_switches`): the shadow model in which each
//! layer's value is chosen, by a bool input, between its float value and its quantized copy,
//! so that one plan serves every candidate. It is trusted only when, with every layer
//! quantized, it gives the real start's outputs (`faithful`): it does on ppocrv4-rec and both
//! silero models (there since a layer's copy holds its output pair when no other layer reads
//! it, and an LSTM's `Y_h` and `Y_c` switch with its `Y`: the estimates had been 11% and 31%
//! off, and silero sequence's fallback took 0.21 s on real candidates, 0.11 s now). When trusted, the
//! search runs on estimates alone, and only the set it settles on is made for real and given
//! the final check (tract's plain plan on the check's inputs), the switched model standing for
//! its optimized-plan runs; should that check miss, the search runs again with each estimate
//! that meets the target made for real and checked. When not trusted, the search runs on real
//! candidates. On ppocrv4-rec the fallback went from 10 real candidates to the real start (run
//! beside the measurement of the layers, on the other thread), 10 estimates (0.15 s each) and
//! one final check of a real candidate: static int8 from 12.7 s to 3.9 s.
//!
//! A candidate meets the target only if it also does in tract's plain (unoptimized) plan on
//! the check's own inputs, which is what the final check runs: the optimized plan, several
//! times faster, rounds differently, and on ppocrv4-rec, whose output is a softmax with near
//! ties, the two gave cosines 0.999 and 0.985 for one candidate. The input sets are the check's inputs and, for
//! calibrated passes, a few of the calibration samples, so that the layers kept in float do not
//! fit one input. A layer's output is read under its own name or, when a pass folded the ops
//! that follow it alone (bias Add, BatchNormalization, Relu, ...) into it, under the name at
//! the end of that chain, which is the one that survives with the same meaning (the layer's own
//! output name then holds the folded value).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tract_onnx::prelude::Tensor;

use crate::ir::{Graph, Model, ValueId};
use crate::onnx::export::to_proto;
use crate::passes::manager::{run_pipeline, PassRecord};
use crate::passes::quantize_weights::weight_axis;
use crate::passes::{Pass, PassOptions};
use crate::pb;
use crate::quant::calibrate::{float_values, Runner};
use crate::report::Reporter;
use crate::verify::gate::{Gates, OutputTolerance};
use crate::verify::metrics::{abs_error, agree_non_finite, cosine_of, Tolerance};
use crate::verify::{Comparison, Verification};

/// One layer kept in float.
#[derive(Debug, Clone, Serialize)]
pub struct KeptLayer {
    /// Node name.
    pub node: String,
    /// Op type.
    pub op: String,
    /// Its first output (the key used in [`PassOptions::keep_float`]).
    pub output: String,
    /// SNR of its output when it alone is quantized and its input is exact, dB (120 = exact).
    #[serde(serialize_with = "crate::verify::metrics::ser_f64")]
    pub snr_alone_db: f64,
    /// Elements of its weights.
    pub weights: usize,
}

/// One candidate the fallback ran.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    /// Layers kept in float: the first `kept` of the ranking, or such a prefix with one
    /// layer given back to int8.
    pub kept: usize,
    /// Their node names, in ranking order.
    pub nodes: Vec<String>,
    /// Smallest cosine of any float graph output on any input set.
    #[serde(serialize_with = "crate::verify::metrics::ser_f64")]
    pub cosine: f64,
    /// Smallest top-1 agreement of any output on any input set; `None` when no output has one
    /// (see [`crate::verify::metrics::ValueMetrics::top1_agreement`]).
    #[serde(serialize_with = "crate::verify::metrics::ser_opt_f64")]
    pub top1: Option<f64>,
    /// Elements of float graph outputs outside `|a - b| <= atol + rtol |a|`, summed over the
    /// input sets; `None` without `--atol`/`--rtol`.
    pub outside_tolerance: Option<usize>,
    /// Largest fraction of differing elements of an integer or bool graph output, measured by
    /// the final check (absent when 0: estimates and optimized-plan runs measure float outputs
    /// only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::verify::metrics::ser_opt_f64")]
    pub integer_mismatch: Option<f64>,
    /// Whether it met the target.
    pub met: bool,
    /// An estimate on the switched model (every layer's float and quantized forms in one
    /// model), not a real candidate: see the module documentation.
    pub estimated: bool,
}

impl Tried {
    /// A candidate with the layers `kept` in float, its figures and verdict.
    fn new(kept: &[usize], layers: &[Layer], score: &Score, met: bool, estimated: bool) -> Tried {
        Tried {
            kept: kept.len(),
            nodes: kept.iter().map(|&i| layers[i].node.clone()).collect(),
            cosine: score.cosine,
            top1: score.top1,
            outside_tolerance: score.outside,
            integer_mismatch: (score.integer_mismatch > 0.0).then_some(score.integer_mismatch),
            met,
            estimated,
        }
    }
}

/// What a candidate must reach on every input set: the check's gates as the fallback meets
/// them.
#[derive(Debug, Clone)]
pub struct Target {
    /// Smallest cosine of every float graph output (the fallback's own, in place of
    /// `gates.min_cosine`).
    pub cosine: f64,
    /// The check's gates: the top-1 drop (`--max-accuracy-drop`) and the elementwise
    /// tolerances (`--atol`/`--rtol`, no element outside) of the float graph outputs.
    pub gates: Gates,
}

/// A candidate's figures over the input sets.
#[derive(Debug, Clone, Copy)]
struct Score {
    /// Smallest output cosine.
    cosine: f64,
    /// Smallest top-1 agreement, when an output has one.
    top1: Option<f64>,
    /// Elements outside the tolerance, when there is one.
    outside: Option<usize>,
    /// Largest fraction of differing elements of an integer or bool output without a
    /// tolerance of its own; known from the final check only (0 in tract's optimized plan,
    /// which the search measures float outputs in).
    integer_mismatch: f64,
}

impl Target {
    fn met_by(&self, s: &Score) -> bool {
        s.cosine >= self.cosine
            && self
                .gates
                .max_accuracy_drop
                .is_none_or(|d| s.top1.is_none_or(|t| 1.0 - t <= d))
            && s.outside.is_none_or(|n| n == 0)
            && self
                .gates
                .max_integer_mismatch
                .is_none_or(|m| s.integer_mismatch <= m)
    }
}

/// Elements of `b` outside `|a - b| <= atol + rtol |a|` against `a` (NaN where `a` is not NaN
/// counts), as the check's allclose counts them ([`Tolerance::violated`]).
fn outside(a: &[f32], b: &[f32], t: Tolerance) -> usize {
    a.iter()
        .zip(b)
        .filter(|(&x, &y)| {
            let (x, y) = (f64::from(x), f64::from(y));
            t.violated(x, abs_error(x, y))
        })
        .count()
}

/// What the fallback did.
#[derive(Debug, Clone, Serialize)]
pub struct FallbackReport {
    /// The cosine every float graph output had to reach.
    #[serde(serialize_with = "crate::verify::metrics::ser_f64")]
    pub target_cosine: f64,
    /// The elementwise tolerance every float graph output had to meet, if any.
    pub target_tolerance: Option<Tolerance>,
    /// Tolerances of named outputs, in place of `target_tolerance` for those.
    pub target_output_tolerances: Vec<OutputTolerance>,
    /// The largest top-1 agreement drop allowed, if any (`--max-accuracy-drop`).
    pub target_max_accuracy_drop: Option<f64>,
    /// Smallest output cosine with every layer quantized, over the fallback's input sets in
    /// tract's optimized plan (the check's table gives the plain plan on the check's inputs).
    #[serde(serialize_with = "crate::verify::metrics::ser_f64")]
    pub start_cosine: f64,
    /// Smallest output cosine of the result.
    #[serde(serialize_with = "crate::verify::metrics::ser_f64")]
    pub final_cosine: f64,
    /// Layers kept in float, costliest first.
    pub kept: Vec<KeptLayer>,
    /// Quantizable layers, in the main graph and its subgraphs.
    pub layers: usize,
    /// Input sets every candidate was measured on: the check's inputs and the calibration
    /// samples of `--fallback-samples`.
    pub input_sets: usize,
    /// Layers whose error alone was measured (the others rank last, in node order).
    pub measured: usize,
    /// Candidate runs made: estimates and real candidates (the entries of `tried`).
    pub iterations: usize,
    /// The candidates run, in order.
    pub tried: Vec<Tried>,
    /// True when the target was met.
    pub met: bool,
    /// Why the layers were not ranked by their error alone, when they were not.
    pub note: Option<String>,
}

/// A quantizable layer of the main graph: node label and the activation names around it.
struct Layer {
    node: String,
    op: String,
    output: String,
    /// Where its output can be read in a candidate: `output`, then the outputs of the ops that
    /// follow it alone (a bias Add, a BatchNormalization, an activation), which a lossy pass
    /// may fold into the layer, so that only the last of these names survives.
    readable: Vec<String>,
    /// Elements of its weights (what keeping it in float costs in size).
    params: usize,
    /// It is in a subgraph (it gets no shadow).
    in_subgraph: bool,
}

/// Ops a quantization pass may fold into the layer before them (or fuse with it).
const EPILOGUE: [&str; 6] = ["Add", "Mul", "Sub", "BatchNormalization", "Relu", "Clip"];

/// Longest chain of epilogue ops followed after a layer's output.
const EPILOGUE_STEPS: usize = 4;

/// The quantizable layers of `g` and, after them, of its subgraphs (If, Loop and Scan bodies,
/// whose layers have no shadow: they rank with the unmeasured ones, and the passes keep them
/// in float by the same output name).
fn layers(g: &Graph, opts: &PassOptions) -> Vec<Layer> {
    let mut out = Vec::new();
    layers_in(g, &[], opts, &mut out);
    out
}

/// [`layers`] of `g`, whose weights may be initializers of `g` or of the graphs enclosing it,
/// `outer` (innermost last).
fn layers_in(g: &Graph, outer: &[&Graph], opts: &PassOptions, out: &mut Vec<Layer>) {
    let uses = g.uses();
    // An initializer of `g`, or of the innermost enclosing graph that has one by that name.
    let weight = |v: ValueId| {
        g.initializer(v).or_else(|| {
            let name = &g.value(v).name;
            outer
                .iter()
                .rev()
                .find_map(|o| o.find(name).and_then(|w| o.initializer(w)))
        })
    };
    let mut subgraphs = Vec::new();
    for (_, n) in g.live_nodes() {
        subgraphs.extend(n.subgraphs());
        if !opts.selects(g, n) {
            continue;
        }
        let params: usize = n
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let t = v.and_then(weight)?;
                weight_axis(n, i, t.dims().len())?;
                t.len().ok()
            })
            .sum();
        let weighted = params > 0;
        let Some(Some(o)) = n.outputs.first() else {
            continue;
        };
        if !weighted {
            continue;
        }
        let mut readable = vec![g.value(*o).name.clone()];
        let mut v = *o;
        for _ in 0..EPILOGUE_STEPS {
            if g.is_graph_output(v) {
                break;
            }
            let [(r, _)] = uses[v.0 as usize].as_slice() else {
                break;
            };
            let rn = g.node(*r);
            // Only ops whose other operands are constants: what a pass can fold.
            let constant_operands = rn
                .inputs
                .iter()
                .flatten()
                .all(|&i| i == v || g.initializer(i).is_some());
            match rn.outputs.first() {
                Some(Some(next))
                    if rn.domain().is_empty()
                        && EPILOGUE.contains(&rn.op_type())
                        && constant_operands =>
                {
                    v = *next;
                    readable.push(g.value(v).name.clone());
                }
                _ => break,
            }
        }
        out.push(Layer {
            node: crate::passes::node_key(g, n).to_string(),
            op: n.op_type().to_string(),
            output: g.value(*o).name.clone(),
            readable,
            params,
            in_subgraph: !outer.is_empty(),
        });
    }
    let mut scopes = outer.to_vec();
    scopes.push(g);
    for sub in subgraphs {
        layers_in(sub, &scopes, opts, out);
    }
}

/// `proto` with the named values of its main graph appended as graph outputs (names only:
/// tract infers their types), to read intermediate activations.
pub fn with_probes(mut proto: pb::ModelProto, names: &BTreeSet<String>) -> pb::ModelProto {
    if let Some(g) = proto.graph.as_mut() {
        let existing: BTreeSet<String> = g.output.iter().map(|o| o.name().to_string()).collect();
        // Only values the graph has (node outputs, graph inputs): a pass may have folded a
        // probed value away, and tract panics on an output name nothing produces.
        let produced: BTreeSet<&str> = g
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .chain(g.input.iter().map(|i| i.name()))
            .collect();
        let wanted: Vec<String> = names
            .difference(&existing)
            .filter(|n| produced.contains(n.as_str()))
            .cloned()
            .collect();
        for n in &wanted {
            g.output.push(pb::ValueInfoProto {
                name: Some(n.clone()),
                ..Default::default()
            });
        }
    }
    proto
}

/// `shadowed` (see [`with_shadows`]) with a switch per layer that has a shadow: a scalar bool
/// graph input `switch<i>/on` and a `Where(on, shadow, float)` node that takes over the name
/// of the layer's value, so that everything after the layer reads its quantized copy when the
/// switch is on and the float value when it is off. With every switch off the model computes
/// the reference and each layer's error alone, as the shadowed model does; with a set of
/// switches on it estimates the candidate with those layers quantized, in one tract plan for
/// every candidate (a real candidate is planned anew, 0.4 s on ppocrv4-rec, where a run takes
/// 0.05 s). It is an estimate: it equals a real candidate only when every node the lossy
/// passes changed belongs to some layer's copy (on ppocrv4-rec and the silero models to the
/// last digit), hence [`faithful`]. A layer's other outputs ([`Shadow::also`]) switch with it.
///
/// Returns the model and, per layer, the name of its switch input (`None`: no shadow, or its
/// value is produced by no node of the reference; such a layer stays float here).
fn with_switches(
    mut shadowed: pb::ModelProto,
    shadows: &[Option<Shadow>],
) -> (pb::ModelProto, Vec<Option<String>>) {
    let mut switches: Vec<Option<String>> = shadows.iter().map(|_| None).collect();
    let Some(g) = shadowed.graph.as_mut() else {
        return (shadowed, switches);
    };
    let base = unused_prefix(&[g], "switch");
    let mut producer: HashMap<String, (usize, usize)> = HashMap::new();
    for (k, n) in g.node.iter().enumerate() {
        for (j, o) in n.output.iter().enumerate() {
            if !o.is_empty() {
                producer.insert(o.clone(), (k, j));
            }
        }
    }
    let mut wheres = Vec::new();
    for (i, s) in shadows.iter().enumerate() {
        let Some(s) = s else { continue };
        let Some((k, j)) = producer.remove(&s.reference) else {
            continue;
        };
        let on = format!("{base}{i}/on");
        let float = format!("{base}{i}/float");
        g.node[k].output[j] = float.clone();
        wheres.push(pb::NodeProto {
            name: Some(format!("{base}{i}/Where")),
            op_type: Some("Where".into()),
            input: vec![on.clone(), s.output.clone(), float],
            output: vec![s.reference.clone()],
            ..Default::default()
        });
        for (m, (reference, copy)) in s.also.iter().enumerate() {
            let Some((k, j)) = producer.remove(reference) else {
                continue;
            };
            let float = format!("{base}{i}/float_{}", m + 1);
            g.node[k].output[j] = float.clone();
            wheres.push(pb::NodeProto {
                name: Some(format!("{base}{i}/Where_{}", m + 1)),
                op_type: Some("Where".into()),
                input: vec![on.clone(), copy.clone(), float],
                output: vec![reference.clone()],
                ..Default::default()
            });
        }
        g.input.push(pb::ValueInfoProto {
            name: Some(on.clone()),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: Some(pb::tensor_proto::DataType::Bool as i32),
                    shape: Some(pb::TensorShapeProto::default()),
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
        switches[i] = Some(on);
    }
    g.node.extend(wheres);
    (shadowed, switches)
}

/// SNR above which a layer's error alone counts as none, dB: int8 weights alone give 40 to 50
/// dB on a layer, activations in int8 less.
const EXACT_DB: f64 = 60.0;

/// A layer's place in the ranking: the noise-to-signal ratio it adds alone, `10^(-snr/10)`,
/// per square root of its weight count. The ratio spans decades between layers (a layer with
/// an outlier-stretched activation range at 20 dB against a well-behaved one at 45 dB is 300x
/// noisier) where weight counts rarely differ by more than 30x in square root, so size only
/// orders layers of similar noise; ranking the SNR in dB per square root of the weight count
/// instead kept every small early layer of ppocrv4-rec before the noisy large ones.
fn score(snr_alone_db: f64, weights: usize) -> f64 {
    10f64.powf(-snr_alone_db / 10.0) / (weights.max(1) as f64).sqrt()
}

/// Signal power `sum a^2` and noise power `sum (a - b)^2` of a reference `a` and candidate `b`,
/// over the pairs that are not equal infinities or both NaN.
fn powers(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut sig, mut noise) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        // Agreeing non-finite pairs carry no error (see `cosine`).
        if agree_non_finite(x, y) {
            continue;
        }
        sig += x * x;
        noise += (x - y) * (x - y);
    }
    (sig, noise)
}

#[cfg(test)]
fn snr_db(a: &[f32], b: &[f32]) -> f64 {
    let (sig, noise) = powers(a, b);
    db(sig, noise)
}

/// `10 log10(sig / noise)`, within [-120, 120] dB.
fn db(sig: f64, noise: f64) -> f64 {
    if noise == 0.0 || !noise.is_finite() {
        return if noise == 0.0 { 120.0 } else { -120.0 };
    }
    (10.0 * (sig / noise).log10()).clamp(-120.0, 120.0)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        // As the check: pairs that agree although not finite are left out, where they made
        // the cosine NaN and every candidate miss.
        if agree_non_finite(x, y) {
            continue;
        }
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    cosine_of(ab, aa, bb)
}

/// Values by name: the elements and the size of the last axis.
type Outputs = HashMap<String, (Vec<f32>, usize)>;

/// Fraction of rows (all axes but the last) whose argmax over the last axis agrees.
fn top1(a: &[f32], b: &[f32], last: usize) -> Option<f64> {
    if last < 2 || a.is_empty() || a.len() != b.len() {
        return None;
    }
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |m, (i, &v)| if v > m.1 { (i, v) } else { m },
            )
            .0
    };
    let rows = a.len() / last;
    let same = a
        .chunks(last)
        .zip(b.chunks(last))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    Some(same as f64 / rows as f64)
}

/// Values by name as [`Outputs`], borrowed from tract's tensors where those hold f32.
type Views<'a> = HashMap<&'a str, (Cow<'a, [f32]>, usize)>;

/// The float values among `values` (name, tensor), as f32, without a copy for f32 tensors.
fn views<'a>(values: impl Iterator<Item = (&'a String, &'a Tensor)>) -> Views<'a> {
    values
        .filter_map(|(n, t)| {
            let last = t.shape().last().copied().unwrap_or(1);
            Some((n.as_str(), (float_values(t)?, last)))
        })
        .collect()
}

/// The values of `v` whose names `keep` accepts, copied.
fn owned(v: &Views, keep: impl Fn(&str) -> bool) -> Outputs {
    v.iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, (x, last))| (n.to_string(), (x.to_vec(), *last)))
        .collect()
}

/// A model with probed values, parsed once by tract and planned once per set of input shapes.
struct Probed {
    proto: pb::ModelProto,
    runner: Runner,
    /// The plain typed plan, made for the first set tract's optimized plan fails on.
    plain: Option<Runner>,
}

impl Probed {
    /// `proto` with the values `probes` exposed (see [`run_probed`] for `optimize`).
    fn new(proto: pb::ModelProto, probes: &BTreeSet<String>, optimize: bool) -> Result<Probed> {
        let proto = with_probes(proto, probes);
        let runner = Runner::new(&proto, optimize)?;
        Ok(Probed {
            proto,
            runner,
            plain: None,
        })
    }

    /// Runs every input set and hands `each` the float values of each set, in order.
    ///
    /// A set the optimized plan fails on runs in the plain typed plan; the others keep the
    /// optimized plan's values, so which plan gives a set's values depends on that set only,
    /// not on how many run at a time.
    fn run(
        &mut self,
        sets: &[Vec<(String, Tensor)>],
        what: &str,
        mut each: impl FnMut(&Views),
    ) -> Result<()> {
        // A float16 interface (fp16 without keep_io_types) is fed the same values cast.
        let cast = crate::verify::as_declared(
            &self.proto,
            &sets.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        );
        let sets = cast.as_deref().unwrap_or(sets);
        // As many sets at a time as there are threads, handed to `each` in order.
        let threads = rayon::current_num_threads().max(1);
        for chunk in sets.chunks(threads) {
            let refs: Vec<&[(String, Tensor)]> = chunk.iter().map(Vec::as_slice).collect();
            let results = self.runner.run_many(&refs);
            for (set, outs) in chunk.iter().zip(results) {
                let (outs, names) = match outs {
                    Ok(o) => (o, &self.runner.outputs),
                    Err(_) if self.runner.optimize => {
                        let plain = match &mut self.plain {
                            Some(p) => p,
                            None => self.plain.insert(Runner::new(&self.proto, false)?),
                        };
                        let outs = plain
                            .run(set)
                            .with_context(|| format!("running the {what} in tract"))?;
                        (outs, &plain.outputs)
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("running the {what} in tract"))
                    }
                };
                each(&views(names.iter().zip(outs.iter().map(|t| &**t))));
            }
        }
        Ok(())
    }
}

/// Runs `proto` with the values `probes` exposed on every input set and hands `each` the float
/// values of each set, in order (borrowed: `each` copies what it keeps).
///
/// With `optimize`, uses tract's optimized plan (several times faster, but not bit-exact with
/// the plain plan the final check runs), and the plain typed plan when that fails.
fn run_probed(
    proto: pb::ModelProto,
    probes: &BTreeSet<String>,
    sets: &[Vec<(String, Tensor)>],
    what: &str,
    optimize: bool,
    each: impl FnMut(&Views),
) -> Result<()> {
    Probed::new(proto, probes, optimize)?.run(sets, what, each)
}

/// One layer's copy in the shadow model: the name of its output there, and the reference's
/// value it is compared with.
struct Shadow {
    output: String,
    reference: String,
    /// The layer node's other outputs (an LSTM's `Y_h` and `Y_c`), by reference name and the
    /// name of their copy: the switched model switches them with the layer.
    also: Vec<(String, String)>,
}

/// `base` followed by a number (`base`, `base1`, ...) that no name of `graphs` (nodes, values,
/// initializers, graph inputs and outputs, subgraphs included) starts with: the prefix of the
/// names the fallback adds to its internal models, so that they cannot take an existing name.
fn unused_prefix(graphs: &[&pb::GraphProto], base: &str) -> String {
    fn names<'a>(g: &'a pb::GraphProto, out: &mut Vec<&'a str>) {
        for n in &g.node {
            out.push(n.name());
            out.extend(n.input.iter().chain(&n.output).map(String::as_str));
            for a in &n.attribute {
                for sub in a.g.iter().chain(&a.graphs) {
                    names(sub, out);
                }
            }
        }
        out.extend(g.initializer.iter().map(|t| t.name()));
        out.extend(g.input.iter().chain(&g.output).map(|v| v.name()));
    }
    let mut all = Vec::new();
    for g in graphs {
        names(g, &mut all);
    }
    (0..)
        .map(|k| {
            if k == 0 {
                base.to_string()
            } else {
                format!("{base}{k}_")
            }
        })
        .find(|p| !all.iter().any(|n| n.starts_with(p.as_str())))
        .unwrap_or_else(|| base.to_string())
}

/// Longest chain of nodes from a layer to the end of what was folded into it and its output
/// pair, and most nodes in one layer's shadow.
const SHADOW_CHAIN: usize = EPILOGUE_STEPS + 4;
const SHADOW_NODES: usize = 64;

/// `reference` with a shadow of every layer appended (see the module documentation): the
/// candidate's nodes for that layer, renamed under `shadow<i>/`, reading the reference's
/// activations, with the copy of the layer's output as a graph output.
///
/// A layer's shadow is the candidate's node of the same name and op type, the single-reader
/// chain from it to the last of its [`Layer::readable`] names the candidate produces (and the
/// output pair after it, QuantizeLinear then DequantizeLinear, when no other layer reads it),
/// backwards from the inputs of those nodes, every candidate node and initializer up to values
/// the reference computes (its node outputs and graph inputs). A layer gets no shadow
/// (`None`) when the candidate has no such node or chain, the shadow would hold a subgraph,
/// or the models' default-domain opsets differ.
fn with_shadows(
    mut reference: pb::ModelProto,
    candidate: &pb::ModelProto,
    layers: &[Layer],
    reference_types: &HashMap<String, i32>,
    candidate_types: &HashMap<String, i32>,
) -> (pb::ModelProto, Vec<Option<Shadow>>) {
    let mut shadows: Vec<Option<Shadow>> = layers.iter().map(|_| None).collect();
    let default_opset = |m: &pb::ModelProto| {
        m.opset_import
            .iter()
            .find(|o| crate::ir::normal_domain(o.domain()).is_empty())
            .map(|o| o.version())
    };
    let (Some(rg), Some(cg)) = (reference.graph.as_ref(), candidate.graph.as_ref()) else {
        return (reference, shadows);
    };
    if default_opset(&reference) != default_opset(candidate) {
        return (reference, shadows);
    }
    let ref_inits: HashSet<&str> = rg.initializer.iter().map(|t| t.name()).collect();
    let activations: HashSet<&str> = rg
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .chain(rg.input.iter().map(|i| i.name()))
        .filter(|n| !n.is_empty() && !ref_inits.contains(n))
        .collect();
    let inits: HashMap<&str, &pb::TensorProto> =
        cg.initializer.iter().map(|t| (t.name(), t)).collect();
    // Values whose element type the candidate changed (float16 after an fp16 conversion):
    // a copy reads them through a Cast to the candidate's type.
    let retyped: HashMap<&str, i32> = candidate_types
        .iter()
        .filter(|(n, t)| reference_types.get(*n).is_some_and(|r| r != *t))
        .map(|(n, t)| (n.as_str(), *t))
        .collect();
    let base = unused_prefix(&[rg, cg], "shadow");
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, n) in cg.node.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            producer.insert(o, k);
        }
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            readers.entry(i).or_default().push(k);
        }
    }
    let mut nodes_out = Vec::new();
    let mut inits_out = Vec::new();
    let mut outputs_out = Vec::new();
    for (ix, l) in layers.iter().enumerate() {
        if l.in_subgraph {
            continue;
        }
        // The layer's node, or the integer node dynamic quantization put in its place
        // (`MatMulInteger` for MatMul and Gemm, `ConvInteger` for Conv, writing
        // `OUTPUT_int32`, see `quantize_dynamic`).
        let integer_op = match l.op.as_str() {
            "Gemm" => "MatMulInteger".to_string(),
            op => format!("{op}Integer"),
        };
        let integer_out = format!("{}_int32", l.output);
        let Some(start) = cg.node.iter().position(|n| {
            (crate::passes::proto_node_key(n) == l.node && n.op_type() == l.op)
                || (n.op_type() == integer_op
                    && n.domain().is_empty()
                    && n.output.first() == Some(&integer_out))
        }) else {
            continue;
        };
        let Some(end) = l
            .readable
            .iter()
            .rev()
            .find(|n| producer.contains_key(n.as_str()))
        else {
            continue;
        };
        // The chain from the layer to `end`, one reader at a time.
        let mut chain = vec![start];
        let mut v = cg.node[start].output.first().map(String::as_str);
        while v.is_some_and(|v| v != end) && chain.len() <= SHADOW_CHAIN {
            match v.and_then(|v| readers.get(v)).map(Vec::as_slice) {
                Some(&[r]) => {
                    chain.push(r);
                    v = cg.node[r].output.first().map(String::as_str);
                }
                _ => v = None,
            }
        }
        if v != Some(end.as_str()) {
            continue;
        }
        // The layer's output pair (QuantizeLinear then DequantizeLinear on `end`) when no
        // other layer reads it: its noise is the layer's, which the readers of `end` get in
        // the candidate (a pair another layer reads is that layer's input pair).
        let mut out = end.as_str();
        if let Some(&[q]) = readers.get(out).map(Vec::as_slice) {
            let qn = &cg.node[q];
            let dq = qn.output.first().and_then(|o| readers.get(o.as_str()));
            if let (true, Some(&[d])) = (qn.op_type() == "QuantizeLinear", dq.map(Vec::as_slice)) {
                let dn = &cg.node[d];
                let pair_readers = dn.output.first().and_then(|o| readers.get(o.as_str()));
                let own = pair_readers.is_some_and(|rs| {
                    rs.iter().all(|&r| {
                        let rn = &cg.node[r];
                        !layers.iter().any(|l| {
                            l.node == crate::passes::proto_node_key(rn) && l.op == rn.op_type()
                        })
                    })
                });
                if dn.op_type() == "DequantizeLinear" && own {
                    chain.extend([q, d]);
                    out = dn.output[0].as_str();
                }
            }
        }
        // Backwards from the chain's inputs to the reference's activations.
        let mut nodes: BTreeSet<usize> = chain.iter().copied().collect();
        let mut used: BTreeSet<&str> = BTreeSet::new();
        let mut cast: BTreeSet<&str> = BTreeSet::new();
        let mut stack: Vec<&str> = chain
            .iter()
            .flat_map(|&k| cg.node[k].input.iter().map(String::as_str))
            .collect();
        let mut ok = true;
        while let Some(v) = stack.pop() {
            let produced_here = producer.get(v).is_some_and(|p| nodes.contains(p));
            if v.is_empty() || produced_here {
                continue;
            }
            if inits.contains_key(v) {
                used.insert(v);
            } else if activations.contains(v) {
                // read from the reference, through a Cast when the candidate retyped it
                if retyped.contains_key(v) {
                    cast.insert(v);
                }
            } else if let Some(&p) = producer.get(v).filter(|_| nodes.len() < SHADOW_NODES) {
                nodes.insert(p);
                stack.extend(cg.node[p].input.iter().map(String::as_str));
            } else {
                ok = false;
                break;
            }
        }
        let subgraph = nodes.iter().any(|&k| {
            cg.node[k]
                .attribute
                .iter()
                .any(|a| a.g.is_some() || !a.graphs.is_empty())
        });
        if !ok || subgraph {
            continue;
        }
        let prefix = format!("{base}{ix}/");
        let local: HashSet<&str> = nodes
            .iter()
            .flat_map(|&k| cg.node[k].output.iter().map(String::as_str))
            .chain(used.iter().copied())
            .chain(cast.iter().copied())
            .collect();
        let rename = |v: &String| {
            if local.contains(v.as_str()) {
                format!("{prefix}{v}")
            } else {
                v.clone()
            }
        };
        for &k in &nodes {
            let mut n = cg.node[k].clone();
            // An unnamed node stays unnamed: tract names it by its (renamed) first output,
            // where one name for all of them would repeat.
            if !n.name().is_empty() {
                n.name = Some(format!("{prefix}{}", n.name()));
            }
            n.input = n.input.iter().map(rename).collect();
            n.output = n.output.iter().map(rename).collect();
            nodes_out.push(n);
        }
        for v in &cast {
            nodes_out.push(pb::NodeProto {
                op_type: Some("Cast".into()),
                input: vec![v.to_string()],
                output: vec![format!("{prefix}{v}")],
                attribute: vec![crate::ir::edit::attr_int("to", i64::from(retyped[v]))],
                ..Default::default()
            });
        }
        for u in &used {
            let mut t = inits[u].clone();
            t.name = Some(format!("{prefix}{u}"));
            inits_out.push(t);
        }
        let output = format!("{prefix}{out}");
        outputs_out.push(pb::ValueInfoProto {
            name: Some(output.clone()),
            ..Default::default()
        });
        // The layer node's other outputs the reference computes too.
        let also = cg.node[start]
            .output
            .iter()
            .skip(1)
            .filter(|o| activations.contains(o.as_str()))
            .map(|o| (o.clone(), format!("{prefix}{o}")))
            .collect();
        shadows[ix] = Some(Shadow {
            output,
            reference: end.clone(),
            also,
        });
    }
    for o in &candidate.opset_import {
        if !reference
            .opset_import
            .iter()
            .any(|r| r.domain() == o.domain())
        {
            reference.opset_import.push(o.clone());
        }
    }
    if let Some(g) = reference.graph.as_mut() {
        g.node.extend(nodes_out);
        g.initializer.extend(inits_out);
        g.output.extend(outputs_out);
    }
    (reference, shadows)
}

impl Score {
    /// The figures of the final check's comparison: its smallest float output cosine (an
    /// output that could not be compared, or a NaN cosine, counts as -1), top-1 agreement and,
    /// with `tolerance`, elements outside it.
    ///
    /// Errors: the candidate did not run.
    fn of(c: &Comparison, tolerance: bool) -> Result<Score> {
        match &c.status {
            Verification::Checked | Verification::Failed => {}
            Verification::Unverified { reason, .. }
            | Verification::CandidateFailed { reason, .. } => {
                bail!("the quantized model does not run in tract: {reason}")
            }
        }
        let mut score = Score::new(tolerance);
        for o in &c.outputs {
            let Some(v) = &o.values else {
                score.cosine = -1.0;
                continue;
            };
            if let (Some(n), Some(a)) = (score.outside.as_mut(), &v.allclose) {
                *n += a.violations;
            }
            if v.integer {
                if v.allclose.is_none() && v.elements > 0 {
                    let fraction = v.mismatches as f64 / v.elements as f64;
                    score.integer_mismatch = score.integer_mismatch.max(fraction);
                }
                continue;
            }
            score.fold(v.cosine.unwrap_or(1.0), v.top1_agreement);
        }
        Ok(score)
    }

    /// Folds in one output's cosine and top-1 agreement. A NaN cosine (a NaN in an output) is
    /// no match at all, as in the final check.
    fn fold(&mut self, cosine: f64, top1: Option<f64>) {
        self.cosine = if cosine.is_nan() {
            -1.0
        } else {
            self.cosine.min(cosine)
        };
        if let Some(t) = top1 {
            self.top1 = Some(self.top1.map_or(t, |s| s.min(t)));
        }
    }

    /// The worse figures of two runs of one candidate (the optimized plan on every input set,
    /// the final check on the check's inputs).
    fn worst(self, other: &Score) -> Score {
        let mut w = self;
        w.fold(other.cosine, other.top1);
        w.outside = w.outside.zip(other.outside).map(|(a, b)| a.max(b));
        w.integer_mismatch = w.integer_mismatch.max(other.integer_mismatch);
        w
    }

    /// Before any input set: every figure at its best.
    fn new(tolerance: bool) -> Score {
        Score {
            cosine: 1.0,
            top1: None,
            outside: tolerance.then_some(0),
            integer_mismatch: 0.0,
        }
    }

    /// Folds in one input set: the candidate's values `c` against the reference's `r`, over
    /// the float graph outputs.
    fn add(&mut self, r: &Outputs, c: &Views, graph_outputs: &[String], target: &Target) {
        for n in graph_outputs {
            if let (Some((a, last)), Some((b, _))) = (r.get(n), c.get(n.as_str())) {
                self.fold(cosine(a, b), top1(a, b, *last));
                if let (Some(count), Some(t)) =
                    (self.outside.as_mut(), target.gates.tolerance_for(n))
                {
                    *count += outside(a, b, t);
                }
            }
        }
    }
}

/// A candidate's smallest output cosine and top-1 agreement over the input sets, and with
/// `tolerance` its elements outside it (see [`run_probed`] for `optimize`).
fn check_candidate(
    model: &Model,
    reference: &[Outputs],
    graph_outputs: &[String],
    inputs: &[Vec<(String, Tensor)>],
    optimize: bool,
    target: &Target,
) -> Result<Score> {
    let mut score = Score::new(target.gates.has_tolerance());
    let mut set = 0;
    run_probed(
        to_proto(model)?,
        &BTreeSet::new(),
        inputs,
        "candidate",
        optimize,
        |c| {
            score.add(&reference[set], c, graph_outputs, target);
            set += 1;
        },
    )
    .context("the quantized model does not run in tract")?;
    Ok(score)
}

/// Re-runs `suffix` on copies of `snapshot` with layers kept in float until every float output
/// of the graph meets `target` against `snapshot` on every input set of `inputs` (each one
/// value per graph input): cosine, and, when given, top-1 agreement and the elementwise
/// tolerance.
/// Layers are ranked once, by their error alone; the shortest prefix of the ranking that meets
/// the target is searched for (see the module documentation), in at most `max_iterations`
/// candidate runs.
///
/// `exact` is the final check: it compares a candidate with the original in tract's plain plan
/// on the check's input sets (see [`crate::verify::Reference::compare`]). A candidate meets the
/// target only if it also does so there.
///
/// `quantized`, when the caller has it, is `suffix` already run on `snapshot` with `opts`
/// (every layer quantized) and its pass records: the first candidate, not made again.
///
/// Returns the model of the shortest prefix found that meets the target (or, when none does,
/// of the longest tried), the pass records of the run that made it, the report, and `exact`'s
/// comparison of that model when it was made (the final check, not to be run again).
///
/// Errors: a pass fails, or tract cannot run the snapshot or a candidate (the caller has
/// already checked that tract runs the original).
#[allow(clippy::too_many_arguments)]
pub fn run(
    snapshot: &Model,
    suffix: &[&'static dyn Pass],
    opts: &PassOptions,
    validate_each: bool,
    quantized: Option<(Model, Vec<PassRecord>)>,
    inputs: &[Vec<(String, Tensor)>],
    exact: &dyn Fn(&pb::ModelProto) -> Result<Comparison>,
    target: &Target,
    max_iterations: usize,
    reporter: &dyn Reporter,
) -> Result<(Model, Vec<PassRecord>, FallbackReport, Option<Comparison>)> {
    let layers = layers(&snapshot.graph, opts);
    let graph_outputs: Vec<String> = snapshot
        .graph
        .outputs
        .iter()
        .map(|p| snapshot.graph.value(p.value).name.clone())
        .collect();
    let candidate = |keep: &[usize]| -> Result<(Model, Vec<PassRecord>)> {
        let mut o = opts.clone();
        o.keep_float
            .extend(keep.iter().map(|&i| layers[i].output.clone()));
        let mut model = snapshot.clone();
        let records = run_pipeline(&mut model, suffix, &o, validate_each, reporter)?;
        Ok((model, records))
    };
    let first = match quantized {
        Some(q) => q,
        None => candidate(&[])?,
    };

    reporter.phase("fallback: measuring each layer alone against the reference");
    let (shadowed, shadows) = with_shadows(
        to_proto(snapshot)?,
        &to_proto(&first.0)?,
        &layers,
        &crate::passes::convert_fp16::value_types(snapshot),
        &crate::passes::convert_fp16::value_types(&first.0),
    );
    let (switched, switches) = with_switches(shadowed, &shadows);
    let probes: BTreeSet<String> = shadows
        .iter()
        .flatten()
        .map(|s| s.reference.clone())
        .collect();
    // The input sets, each with the switch of every layer `on` accepts set.
    let switched_sets = |on: &dyn Fn(usize) -> bool| -> Vec<Vec<(String, Tensor)>> {
        inputs
            .iter()
            .map(|set| {
                let mut s = set.clone();
                for (i, sw) in switches.iter().enumerate() {
                    if let Some(name) = sw {
                        s.push((name.clone(), tensor0(on(i))));
                    }
                }
                s
            })
            .collect()
    };
    let mut powers_alone = vec![(0f64, 0f64); layers.len()];
    let mut reference: Vec<Outputs> = Vec::new();
    let unmatched = shadows.iter().filter(|s| s.is_none()).count();
    let mut note = (unmatched > 0).then(|| {
        format!(
            "{unmatched} of {} layers have no quantized form the shadow model could copy (in a subgraph, left in float by the pass, or the opsets differ); they are tried last, in node order",
            layers.len()
        )
    });
    // Every switch off: the reference, and each layer's copy on the reference's activations;
    // beside it, on the other thread, the real start (every layer quantized) on every input
    // set, which the search needs anyway.
    let off_sets = switched_sets(&|_| false);
    let start_proto = to_proto(&first.0)?;
    let (measured, start_outputs) = rayon::join(
        || {
            Probed::new(switched, &probes, true).and_then(|mut p| {
                p.run(&off_sets, "shadow model", |o| {
                    for (i, s) in shadows.iter().enumerate() {
                        if let Some(s) = s {
                            if let (Some((a, _)), Some((b, _))) =
                                (o.get(s.reference.as_str()), o.get(s.output.as_str()))
                            {
                                let (sig, noise) = powers(a, b);
                                powers_alone[i].0 += sig;
                                powers_alone[i].1 += noise;
                            }
                        }
                    }
                    reference.push(owned(o, |k| graph_outputs.iter().any(|g| g == k)));
                })?;
                Ok(p)
            })
        },
        || {
            let mut outs: Vec<Outputs> = Vec::new();
            run_probed(
                start_proto,
                &BTreeSet::new(),
                inputs,
                "candidate",
                true,
                |o| outs.push(owned(o, |k| graph_outputs.iter().any(|g| g == k))),
            )
            .context("the quantized model does not run in tract")?;
            anyhow::Ok(outs)
        },
    );
    let start_outputs = start_outputs?;
    let (snr_alone, mut estimator): (Vec<Option<f64>>, Option<Probed>) = match measured {
        Ok(p) => (
            shadows
                .iter()
                .zip(&powers_alone)
                .map(|(s, &(sig, noise))| s.as_ref().map(|_| db(sig, noise)))
                .collect(),
            Some(p),
        ),
        Err(e) => {
            // tract cannot run the shadows: the reference alone, layers in node order.
            note = Some(format!(
                "the layers' errors alone could not be measured, so they were tried in node order: {e:#}"
            ));
            reference.clear();
            run_probed(
                to_proto(snapshot)?,
                &BTreeSet::new(),
                inputs,
                "reference",
                true,
                |o| reference.push(owned(o, |_| true)),
            )?;
            (layers.iter().map(|_| None).collect(), None)
        }
    };
    reporter.phase_done();

    // The ranking: measured layers by score, then unmeasured ones in node order, then the
    // layers whose error alone is below `EXACT_DB` (which only a tight tolerance sees).
    let exact_alone = |i: usize| snr_alone[i].is_some_and(|d| d >= EXACT_DB);
    let key = |i: usize| snr_alone[i].map_or(f64::NEG_INFINITY, |d| score(d, layers[i].params));
    let mut order: Vec<usize> = (0..layers.len()).collect();
    order.sort_by(|&a, &b| {
        exact_alone(a)
            .cmp(&exact_alone(b))
            .then(key(b).total_cmp(&key(a)))
            .then(a.cmp(&b))
    });

    let tried: RefCell<Vec<Tried>> = RefCell::new(Vec::new());
    let tol = target.gates.has_tolerance();
    // A real candidate: the passes re-run with `kept` in float, checked in tract's optimized
    // plan on every input set (unless `known` gives that score: the real start's outputs, or
    // a faithful estimate) and, when it meets the target there, by the final check.
    let evaluate_made = |kept: Vec<usize>,
                         (model, records): (Model, Vec<PassRecord>),
                         known: Option<Score>|
     -> Result<(Evaluated, f64, bool)> {
        reporter.phase(&format!(
            "fallback: checking with {} layers in float",
            kept.len()
        ));
        let mut score = match known {
            Some(score) => score,
            None => check_candidate(&model, &reference, &graph_outputs, inputs, true, target)?,
        };
        let mut met = target.met_by(&score);
        let mut comparison = None;
        if met {
            let c = exact(&to_proto(&model)?)?;
            let exact = Score::of(&c, tol)?;
            met = target.met_by(&exact);
            score = score.worst(&exact);
            comparison = Some(c);
        }
        reporter.phase_done();
        tried
            .borrow_mut()
            .push(Tried::new(&kept, &layers, &score, met, false));
        let cosine = score.cosine;
        Ok((
            Evaluated {
                kept,
                model,
                records,
                cosine,
                met,
                comparison,
            },
            cosine,
            met,
        ))
    };
    let evaluate = |kept: Vec<usize>| {
        let made = candidate(&kept)?;
        evaluate_made(kept, made, None)
    };
    let searching = Search {
        order: &order,
        layers: &layers,
        snr_alone: &snr_alone,
        target_cosine: target.cosine,
        max_iterations,
    };
    // Every layer quantized, for real: the search's start.
    let mut start_score = Score::new(tol);
    for (r, c) in reference.iter().zip(&start_outputs) {
        let c: Views = c
            .iter()
            .map(|(n, (v, last))| (n.as_str(), (Cow::Borrowed(v.as_slice()), *last)))
            .collect();
        start_score.add(r, &c, &graph_outputs, target);
    }
    let start = evaluate_made(Vec::new(), first, Some(start_score))?;
    let start_cosine = start.1;
    // Then on the switched model, one plan for every candidate, when with every layer
    // quantized it gives the real start's outputs (see `faithful`). Each estimate that meets
    // the target is then made for real and given the final check (tract's plain plan on the
    // check's inputs); the switched model stands for its optimized-plan runs. When the switched
    // model is not faithful, the search runs on real candidates.
    let mut guided = None;
    if let Some(p) = estimator
        .as_mut()
        .filter(|_| !start.2 && switches.iter().any(Option::is_some))
    {
        // An estimate: its score, and the values of every input set.
        let mut estimate = |kept: &[usize], keep_outputs: bool| -> Result<(Score, Vec<Outputs>)> {
            reporter.phase(&format!(
                "fallback: estimating with {} layers in float",
                kept.len()
            ));
            let keep: HashSet<usize> = kept.iter().copied().collect();
            let sets = switched_sets(&|i| !keep.contains(&i));
            let mut score = Score::new(tol);
            let mut outs = Vec::new();
            let mut set = 0;
            p.run(&sets, "switched model", |c| {
                score.add(&reference[set], c, &graph_outputs, target);
                if keep_outputs {
                    outs.push(owned(c, |k| graph_outputs.iter().any(|g| g == k)));
                }
                set += 1;
            })?;
            reporter.phase_done();
            let met = target.met_by(&score);
            tried
                .borrow_mut()
                .push(Tried::new(kept, &layers, &score, met, true));
            Ok((score, outs))
        };
        let (est_start, est_outputs) = estimate(&[], true)?;
        if faithful(&reference, &start_outputs, &est_outputs) {
            // Each set of kept layers is estimated once (sorted, as a key), even when the
            // search runs again.
            let mut estimated: HashMap<Vec<usize>, Score> = HashMap::new();
            let mut estimate_once = |kept: &[usize]| -> Result<Score> {
                let key = as_set(kept);
                if let Some(s) = estimated.get(&key) {
                    return Ok(*s);
                }
                let (score, _) = estimate(kept, false)?;
                estimated.insert(key, score);
                Ok(score)
            };
            // Estimates alone steer the search; only the set it settles on is made for real
            // and given the final check.
            let quick = |kept: Vec<usize>| -> Result<(Score, f64, bool)> {
                let score = estimate_once(&kept)?;
                Ok((score, score.cosine, target.met_by(&score)))
            };
            let found = searching.run((est_start, est_start.cosine, false), quick)?;
            // The set the final check missed, sorted, and its cosine there.
            let mut missed: Option<(Vec<usize>, f64)> = None;
            if let Some((kept, score)) = found.hit {
                let made = candidate(&kept)?;
                let (e, cosine, met) = evaluate_made(kept.clone(), made, Some(score))?;
                if met {
                    guided = Some(Found {
                        hit: Some((kept, Ok(e))),
                        longest: None,
                    });
                } else {
                    missed = Some((as_set(&kept), cosine));
                }
            } else {
                guided = Some(Found {
                    hit: None,
                    longest: found.longest.map(|(k, score)| (k, Err(score.cosine))),
                });
            }
            if let Some((missed_key, missed_cosine)) = missed {
                // The final check missed where the estimate met the target (the plain plan
                // rounds otherwise): the search again, each estimate that meets the target
                // made for real and given the final check (the set that missed is not made
                // again). The payload: the real candidate when one was made, else the cosine.
                let step = |kept: Vec<usize>| -> Result<(Result<Evaluated, f64>, f64, bool)> {
                    let score = estimate_once(&kept)?;
                    if as_set(&kept) == missed_key {
                        return Ok((Err(missed_cosine), missed_cosine, false));
                    }
                    if !target.met_by(&score) {
                        return Ok((Err(score.cosine), score.cosine, false));
                    }
                    let made = candidate(&kept)?;
                    let (e, cosine, met) = evaluate_made(kept, made, Some(score))?;
                    Ok((Ok(e), cosine, met))
                };
                guided =
                    Some(searching.run((Err(est_start.cosine), est_start.cosine, false), step)?);
            }
        }
    }
    let chosen = match guided {
        Some(found) => match found.hit.or(found.longest) {
            Some((_, Ok(e))) => e,
            Some((kept, Err(cosine))) => {
                // Nothing met the target: the longest estimate, made for real.
                let (model, records) = candidate(&kept)?;
                Evaluated {
                    kept,
                    model,
                    records,
                    cosine,
                    met: false,
                    comparison: None,
                }
            }
            None => bail!("the fallback ran no candidate"),
        },
        None => {
            let found = searching.run(start, evaluate)?;
            found
                .hit
                .or(found.longest)
                .context("the fallback ran no candidate")?
                .1
        }
    };
    let kept = chosen
        .kept
        .iter()
        .map(|&i| KeptLayer {
            node: layers[i].node.clone(),
            op: layers[i].op.clone(),
            output: layers[i].output.clone(),
            snr_alone_db: snr_alone[i].unwrap_or(f64::NAN),
            weights: layers[i].params,
        })
        .collect();
    let tried = tried.into_inner();
    let report = FallbackReport {
        target_cosine: target.cosine,
        target_tolerance: target.gates.tolerance(),
        target_output_tolerances: target.gates.output_tolerances.clone(),
        target_max_accuracy_drop: target.gates.max_accuracy_drop,
        start_cosine,
        final_cosine: chosen.cosine,
        kept,
        layers: layers.len(),
        input_sets: inputs.len(),
        measured: snr_alone.iter().flatten().count(),
        iterations: tried.len(),
        tried,
        met: chosen.met,
        note,
    };
    Ok((chosen.model, chosen.records, report, chosen.comparison))
}

/// Whether the switched model, with every layer quantized, gives the real start's outputs:
/// on every float graph output (over the input sets), its distance to the real start's values
/// is within 2% in power of the real start's error, `sum (est - real)^2 <= 0.02 sum (real -
/// ref)^2` (both 0 when the real start is exact). Each of `reference`, `real` and `estimated`
/// holds one [`Outputs`] per input set.
fn faithful(reference: &[Outputs], real: &[Outputs], estimated: &[Outputs]) -> bool {
    let mut per_output: HashMap<&str, (f64, f64)> = HashMap::new();
    if reference.len() != real.len() || real.len() != estimated.len() {
        return false;
    }
    for ((r, q), e) in reference.iter().zip(real).zip(estimated) {
        for (name, (a, _)) in r {
            let (Some((b, _)), Some((c, _))) = (q.get(name), e.get(name)) else {
                return false;
            };
            let p = per_output.entry(name.as_str()).or_default();
            p.0 += powers(a, b).1;
            p.1 += powers(b, c).1;
        }
    }
    per_output
        .values()
        .all(|&(error, distance)| distance.is_finite() && distance <= 0.02 * error)
}

/// A set of kept layers (indexes, in any order) as a key: sorted.
fn as_set(kept: &[usize]) -> Vec<usize> {
    let mut key = kept.to_vec();
    key.sort_unstable();
    key
}

/// A bool scalar.
fn tensor0(v: bool) -> Tensor {
    Tensor::from(v)
}

/// What a [`Search`] found: the shortest set of kept layers that met the target and, when none
/// did, the longest tried, each with its evaluation's payload.
struct Found<T> {
    hit: Option<(Vec<usize>, T)>,
    longest: Option<(Vec<usize>, T)>,
}

/// The search for the shortest prefix of the ranking that meets the target (see the module
/// documentation).
struct Search<'a> {
    order: &'a [usize],
    layers: &'a [Layer],
    snr_alone: &'a [Option<f64>],
    target_cosine: f64,
    max_iterations: usize,
}

impl Search<'_> {
    /// Searches with `eval(kept)`, which gives a payload, the smallest output cosine and
    /// whether the target was met, from `start`, what `eval` gave with nothing kept (counted
    /// in the iterations).
    fn run<T>(
        &self,
        start: (T, f64, bool),
        mut eval: impl FnMut(Vec<usize>) -> Result<(T, f64, bool)>,
    ) -> Result<Found<T>> {
        let order = self.order;
        // Every set of layers run, sorted: a prune try can give back the layer that a
        // bisection step had already left out.
        let seen: RefCell<BTreeSet<Vec<usize>>> = RefCell::new(BTreeSet::new());
        let mut run = |kept: Vec<usize>| {
            seen.borrow_mut().insert(as_set(&kept));
            let (payload, cos, met) = eval(kept.clone())?;
            anyhow::Ok((kept, payload, cos, met))
        };
        seen.borrow_mut().insert(Vec::new());
        let (payload, start_cosine, met) = start;
        let kept = Vec::new();
        let mut iterations = 1;
        // `lo`: the longest prefix known to miss; `hit`: the shortest known to meet the
        // target; `longest`: the longest run, returned when nothing meets it.
        let mut lo = 0;
        let (mut hit, mut longest) = if met {
            (Some((kept, payload)), None)
        } else {
            (None, Some((kept, payload)))
        };
        // Exponential search from the noise model's estimate: k, 2k, 4k, ... layers kept
        // until the target holds.
        let mut k = first_guess(order, self.snr_alone, start_cosine, self.target_cosine);
        while hit.is_none() && !order.is_empty() {
            let k_now = k.min(order.len());
            let (kept, payload, _, met) = run(order[..k_now].to_vec())?;
            iterations += 1;
            if met {
                hit = Some((kept, payload));
                break;
            }
            lo = k_now;
            longest = Some((kept, payload));
            if k_now == order.len() || iterations >= self.max_iterations {
                break;
            }
            k *= 2;
        }
        if let Some(h) = hit.as_mut() {
            // Bisection between the last miss and the first hit.
            while h.0.len() > lo + 1 && iterations < self.max_iterations {
                let mid = lo + (h.0.len() - lo) / 2;
                let (kept, payload, _, met) = run(order[..mid].to_vec())?;
                iterations += 1;
                if met {
                    *h = (kept, payload);
                } else {
                    lo = mid;
                }
            }
            // The ranking is a noise estimate, and output accuracy is not monotonic in it:
            // try giving the largest kept layers back to int8, one at a time.
            let mut largest = h.0.clone();
            largest.sort_by_key(|&i| std::cmp::Reverse(self.layers[i].params));
            for &drop in largest.iter().take(PRUNE_TRIES) {
                if h.0.len() < 2 || iterations >= self.max_iterations {
                    break;
                }
                let without: Vec<usize> = h.0.iter().copied().filter(|&i| i != drop).collect();
                if seen.borrow().contains(&as_set(&without)) {
                    continue;
                }
                let (kept, payload, _, met) = run(without)?;
                iterations += 1;
                if met {
                    *h = (kept, payload);
                }
            }
        }
        Ok(Found { hit, longest })
    }
}

/// The noise-to-signal ratio of an output with cosine `cos` against its reference, assuming
/// the error is uncorrelated with the signal: `cos = 1 / sqrt(1 + NSR)`.
fn nsr_of_cosine(cos: f64) -> f64 {
    if cos > 0.0 {
        1.0 / (cos * cos) - 1.0
    } else {
        f64::INFINITY
    }
}

/// Where the prefix search starts: the fewest layers of `order` that, kept in float, bring the
/// output's noise under half the target's, if the output noise is the layers' noise alone
/// (`10^(-snr/10)`) summed and scaled by one gain, the ratio of the measured output noise
/// with every layer quantized (`start_cosine`) to that sum. At least 1.
fn first_guess(
    order: &[usize],
    snr_alone: &[Option<f64>],
    start_cosine: f64,
    target: f64,
) -> usize {
    let local: Vec<f64> = order
        .iter()
        .map(|&i| snr_alone[i].map_or(0.0, |d| 10f64.powf(-d / 10.0)))
        .collect();
    let total: f64 = local.iter().sum();
    let measured = nsr_of_cosine(start_cosine);
    if !(total > 0.0 && measured.is_finite() && target < 1.0) {
        return 1;
    }
    let gain = measured / total;
    let budget = nsr_of_cosine(target) / 2.0;
    let (mut rest, mut k) = (total, 0);
    while k < local.len() && gain * rest > budget {
        rest -= local[k];
        k += 1;
    }
    k.max(1)
}

/// How many of the largest kept layers the fallback tries to give back to int8 once the target
/// holds (one candidate run each).
const PRUNE_TRIES: usize = 3;

/// A candidate the fallback made and checked.
struct Evaluated {
    /// Layers kept in float (indexes into the layers).
    kept: Vec<usize>,
    model: Model,
    records: Vec<PassRecord>,
    cosine: f64,
    met: bool,
    /// The final check's comparison of this candidate, when it was run.
    comparison: Option<Comparison>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_is_read_at_the_end_of_what_follows_it_alone() {
        use crate::verify::testutil::{info, init_f32, model, node, out};
        use pb::tensor_proto::DataType;
        let p = model(
            vec![
                node("Conv", "conv", &["x", "W"], &["c"], vec![]),
                node("Add", "bias", &["c", "B"], &["a"], vec![]),
                node("Relu", "relu", &["a"], &["r"], vec![]),
                node("Conv", "conv2", &["r", "W2"], &["y"], vec![]),
                node("Relu", "relu2", &["y"], &["z"], vec![]),
                node("Neg", "neg", &["z"], &["n"], vec![]),
            ],
            vec![info("x", DataType::Float, &[1, 1, 4, 4])],
            vec![out("z"), out("n")],
            vec![
                init_f32("W", &[2, 1, 1, 1], &[1.0, 2.0]),
                init_f32("B", &[1, 2, 1, 1], &[0.5, -0.5]),
                init_f32("W2", &[1, 2, 1, 1], &[1.0, 1.0]),
            ],
        );
        let (m, _) = crate::onnx::from_proto(p, None, "test").unwrap();
        let ls = layers(&m.graph, &PassOptions::default());
        assert_eq!(ls.len(), 2);
        // conv: its bias Add and Relu follow it alone; conv2's Relu output is a graph output,
        // where the chain stops.
        assert_eq!(ls[0].readable, ["c", "a", "r"]);
        assert_eq!(ls[1].readable, ["y", "z"]);
    }

    #[test]
    fn a_much_noisier_layer_ranks_first_whatever_its_size() {
        // ppocrv4-rec: a 230,400-weight Conv at 6 dB alone against a 432-weight stem Conv at
        // 48 dB: the noisy one first.
        assert!(score(6.0, 230_400) > score(48.0, 432));
        // Of two layers as noisy, the smaller one first.
        assert!(score(30.0, 432) > score(30.0, 57_600));
        // Exact: nothing to gain.
        assert!(score(120.0, 1) < 1e-11);
    }

    /// A layer with several outputs (an LSTM's `Y` and `Y_h`) is switched whole: with its
    /// switch on, every output reads its quantized copy. Only `Y` was, so silero-vad's states
    /// stayed float in the estimates, 23% and 31% off the real candidate's noise, and its
    /// fallback ran real candidates only (0.21 s; 0.11 s now). An unnamed layer gets its
    /// copy too (it got none: layers are keyed by their first output when unnamed, and the
    /// candidate's node was looked up by name only).
    #[test]
    fn a_layer_with_several_outputs_is_switched_whole() {
        use crate::verify::testutil::{info, init_f32, model, node, out};
        use pb::tensor_proto::DataType;
        let wave = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k % 17) as f32 - 8.0) * 0.0731)
                .collect()
        };
        let lstm = {
            // Unnamed, as exporters often leave nodes: a layer is known by its first output.
            let mut n = node("LSTM", "", &["x", "W", "R"], &["y", "yh"], vec![]);
            n.attribute
                .push(crate::verify::testutil::attr_i("hidden_size", 2));
            n
        };
        let p = model(
            vec![lstm],
            vec![info("x", DataType::Float, &[3, 1, 3])],
            vec![out("y"), out("yh")],
            vec![
                init_f32("W", &[1, 8, 3], &wave(24, 5)),
                init_f32("R", &[1, 8, 2], &wave(16, 7)),
            ],
        );
        let (m, _) = crate::onnx::from_proto(p, None, "test").unwrap();
        let opts = PassOptions::default();
        let mut c = m.clone();
        let suffix = [crate::passes::by_name("quantize_weights_int8").unwrap()];
        run_pipeline(&mut c, &suffix, &opts, true, &crate::report::Silent).unwrap();
        let candidate = to_proto(&c).unwrap();
        let reference = to_proto(&m).unwrap();
        let ls = layers(&m.graph, &opts);
        assert_eq!(ls.len(), 1);
        let (shadowed, shadows) = with_shadows(
            reference.clone(),
            &candidate,
            &ls,
            &HashMap::new(),
            &HashMap::new(),
        );
        let s = shadows[0].as_ref().unwrap();
        assert_eq!(s.also.len(), 1);
        assert_eq!(s.also[0].0, "yh");
        let (switched, switches) = with_switches(shadowed, &shadows);
        let on = switches[0].clone().unwrap();
        let x: Vec<f32> = (0..9).map(|i| ((i * 4 % 9) as f32 - 4.0) * 0.31).collect();
        let set = vec![("x".to_string(), Tensor::from_shape(&[3, 1, 3], &x).unwrap())];
        let run = |p: &pb::ModelProto, extra: Option<bool>| -> Vec<Vec<f32>> {
            let mut s = set.clone();
            if let Some(v) = extra {
                s.push((on.clone(), tensor0(v)));
            }
            let mut r = Runner::new(p, false).unwrap();
            let outs = r.run(&s).unwrap();
            ["y", "yh"]
                .iter()
                .map(|name| {
                    let ix = r.outputs.iter().position(|n| n == name).unwrap();
                    float_values(&outs[ix]).unwrap().into_owned()
                })
                .collect()
        };
        let quantized = run(&candidate, None);
        let exact = run(&reference, None);
        assert_ne!(quantized[1], exact[1], "the weights' rounding reaches Y_h");
        assert_eq!(run(&switched, Some(true)), quantized);
        assert_eq!(run(&switched, Some(false)), exact);
    }

    /// The shadow of a layer computes what that layer alone, quantized, makes of the
    /// reference's input: on a two-Conv graph with int8 weights, the second layer's shadow
    /// equals the output of the model with only that layer quantized, not that of the fully
    /// quantized model (whose second layer reads a noisy input).
    #[test]
    fn a_shadow_is_the_layer_alone_on_the_reference_input() {
        use crate::verify::testutil::{info, init_f32, model, node, out};
        use pb::tensor_proto::DataType;
        let w1: Vec<f32> = (0..16)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.173)
            .collect();
        let w2: Vec<f32> = (0..16)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.091)
            .collect();
        let p = model(
            vec![
                node("Conv", "conv1", &["x", "W1"], &["c1"], vec![]),
                node("Add", "bias1", &["c1", "B1"], &["a1"], vec![]),
                node("Relu", "relu1", &["a1"], &["r1"], vec![]),
                node("Conv", "conv2", &["r1", "W2"], &["y"], vec![]),
            ],
            vec![info("x", DataType::Float, &[1, 4, 3, 3])],
            vec![out("y")],
            vec![
                init_f32("W1", &[4, 4, 1, 1], &w1),
                init_f32("B1", &[1, 4, 1, 1], &[0.5, -0.25, 0.125, 0.0]),
                init_f32("W2", &[4, 4, 1, 1], &w2),
            ],
        );
        let (m, _) = crate::onnx::from_proto(p, None, "test").unwrap();
        let opts = PassOptions::default();
        let suffix = [crate::passes::by_name("quantize_weights_int8").unwrap()];
        let quantized = |keep: &[&str]| {
            let mut o = opts.clone();
            o.keep_float.extend(keep.iter().map(|s| s.to_string()));
            let mut c = m.clone();
            run_pipeline(&mut c, &suffix, &o, true, &crate::report::Silent).unwrap();
            to_proto(&c).unwrap()
        };
        let ls = layers(&m.graph, &opts);
        let (shadowed, shadows) = with_shadows(
            to_proto(&m).unwrap(),
            &quantized(&[]),
            &ls,
            &HashMap::new(),
            &HashMap::new(),
        );
        let s2 = shadows[1].as_ref().unwrap();
        assert_eq!(s2.reference, "y");
        assert!(shadows[0].is_some());
        let x: Vec<f32> = (0..36).map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.37).collect();
        let set = vec![(
            "x".to_string(),
            Tensor::from_shape(&[1, 4, 3, 3], &x).unwrap(),
        )];
        let run = |p: &pb::ModelProto, name: &str| -> Vec<f32> {
            let mut r = Runner::new(p, false).unwrap();
            let outs = r.run(&set).unwrap();
            let ix = r.outputs.iter().position(|n| n == name).unwrap();
            float_values(&outs[ix]).unwrap().into_owned()
        };
        let shadow = run(&shadowed, &s2.output);
        let alone = run(&quantized(&["c1"]), "y");
        let all = run(&quantized(&[]), "y");
        let exact = run(&to_proto(&m).unwrap(), "y");
        assert_eq!(shadow, alone);
        assert_ne!(shadow, all);
        assert_ne!(shadow, exact);
        // The shadow model still computes the reference's own outputs.
        assert_eq!(run(&shadowed, "y"), exact);
        // A candidate at another default-domain opset gets no shadows (copied nodes would not
        // mean the same there).
        let mut other = quantized(&[]);
        other.opset_import[0].version = Some(21);
        let (_, none) = with_shadows(
            to_proto(&m).unwrap(),
            &other,
            &ls,
            &HashMap::new(),
            &HashMap::new(),
        );
        assert!(none.iter().all(Option::is_none));

        // The switched model is each candidate in one model: a layer's switch on reads its
        // quantized copy, off its float value, and what follows reads whichever is chosen.
        let (switched, switches) = with_switches(shadowed, &shadows);
        assert_eq!(
            switches,
            vec![
                Some("switch0/on".to_string()),
                Some("switch1/on".to_string())
            ]
        );
        let with = |on: [bool; 2]| {
            let mut s = set.clone();
            for (i, v) in on.iter().enumerate() {
                s.push((format!("switch{i}/on"), tensor0(*v)));
            }
            let mut r = Runner::new(&switched, false).unwrap();
            let outs = r.run(&s).unwrap();
            let ix = r.outputs.iter().position(|n| n == "y").unwrap();
            float_values(&outs[ix]).unwrap().into_owned()
        };
        assert_eq!(with([false, false]), exact);
        assert_eq!(with([true, true]), all);
        assert_eq!(with([false, true]), alone);
        assert_eq!(with([true, false]), run(&quantized(&["y"]), "y"));
        assert_ne!(with([true, false]), exact);
        // One plan serves every candidate: the switches are inputs, not constants.
        let mut r = Runner::new(&switched, true).unwrap();
        for on in [[false, true], [true, false], [true, true]] {
            let mut s = set.clone();
            for (i, v) in on.iter().enumerate() {
                s.push((format!("switch{i}/on"), tensor0(*v)));
            }
            r.run(&s).unwrap();
        }
        assert_eq!(r.plans(), 1);
    }

    #[test]
    fn internal_names_avoid_every_name_of_the_model_subgraphs_included() {
        use crate::verify::testutil::{info, model, node, out};
        use pb::tensor_proto::DataType;
        let mut p = model(
            vec![node("Relu", "r", &["x"], &["switch0/on"], vec![])],
            vec![info("x", DataType::Float, &[1])],
            vec![out("switch0/on")],
            vec![],
        );
        let g = p.graph.clone().unwrap();
        assert_eq!(unused_prefix(&[&g], "switch"), "switch1_");
        assert_eq!(unused_prefix(&[&g], "shadow"), "shadow");
        // A name inside an If branch counts too.
        let mut branch = g.clone();
        branch.node[0].output[0] = "shadow7".into();
        let graph = p.graph.as_mut().unwrap();
        graph.node[0].attribute.push(pb::AttributeProto {
            name: Some("then_branch".into()),
            g: Some(branch),
            ..Default::default()
        });
        let g = p.graph.unwrap();
        assert_eq!(unused_prefix(&[&g], "shadow"), "shadow1_");
    }

    #[test]
    fn layers_in_if_branches_are_candidates_with_outer_scope_weights() {
        use crate::verify::testutil::{info, init_f32, model, node, out};
        use pb::tensor_proto::DataType;
        let branch = |name: &str, w: &str| pb::GraphProto {
            name: Some(name.into()),
            node: vec![node(
                "MatMul",
                &format!("{name}_mm"),
                &["x", w],
                &[&format!("{name}_y")],
                vec![],
            )],
            output: vec![out(&format!("{name}_y"))],
            ..Default::default()
        };
        let mut p = model(
            vec![
                node("MatMul", "mm0", &["x", "W0"], &["h"], vec![]),
                node("If", "if", &["c"], &["y"], vec![]),
            ],
            vec![
                info("x", DataType::Float, &[1, 4]),
                info("c", DataType::Bool, &[]),
            ],
            vec![out("h"), out("y")],
            vec![
                init_f32("W0", &[4, 4], &[0.5; 16]),
                init_f32("Wt", &[4, 2], &[0.25; 8]),
            ],
        );
        let then_branch = {
            let mut b = branch("then", "Wt");
            b.initializer.clear();
            b
        };
        let mut else_branch = branch("else", "We");
        else_branch
            .initializer
            .push(init_f32("We", &[4, 3], &[0.125; 12]));
        let g = p.graph.as_mut().unwrap();
        g.node[1].attribute = vec![
            pb::AttributeProto {
                name: Some("then_branch".into()),
                r#type: Some(pb::attribute_proto::AttributeType::Graph as i32),
                g: Some(then_branch),
                ..Default::default()
            },
            pb::AttributeProto {
                name: Some("else_branch".into()),
                r#type: Some(pb::attribute_proto::AttributeType::Graph as i32),
                g: Some(else_branch),
                ..Default::default()
            },
        ];
        let (m, _) = crate::onnx::from_proto(p, None, "test").unwrap();
        let ls = layers(&m.graph, &PassOptions::default());
        let got: Vec<(&str, usize, bool)> = ls
            .iter()
            .map(|l| (l.node.as_str(), l.params, l.in_subgraph))
            .collect();
        // The then branch reads its weight from the main graph's initializers.
        assert_eq!(
            got,
            vec![
                ("mm0", 16, false),
                ("then_mm", 8, true),
                ("else_mm", 12, true)
            ]
        );
        assert_eq!(ls[1].output, "then_y");
    }

    #[test]
    fn a_nan_in_a_candidate_output_misses_any_target() {
        let r: Outputs = [("y".to_string(), (vec![1.0, 2.0, 3.0], 3))].into();
        let c: Views = [("y", (Cow::Owned(vec![1.0, f32::NAN, 3.0]), 3))].into();
        let target = Target {
            cosine: 0.99,
            gates: Gates::default(),
        };
        let mut score = Score::new(false);
        score.add(&r, &c, &["y".to_string()], &target);
        assert_eq!(score.cosine, -1.0);
        let c: Views = [("y", (Cow::Owned(vec![1.0, 2.0, 3.0]), 3))].into();
        score.add(&r, &c, &["y".to_string()], &target);
        assert_eq!(score.cosine, -1.0);
    }

    #[test]
    fn the_switched_model_is_trusted_only_when_it_gives_the_real_start() {
        let set = |y: &[f32], p: f32| -> Outputs {
            [
                ("y".to_string(), (y.to_vec(), y.len())),
                ("p".to_string(), (vec![p], 1)),
            ]
            .into()
        };
        let reference = vec![set(&[1.0, 2.0, 3.0], 0.5)];
        let real = vec![set(&[1.1, 2.0, 2.9], 0.52)];
        // Equal to the real start: trusted.
        assert!(faithful(&reference, &real, &real.clone()));
        // 1% of the real error's power away on both outputs: trusted.
        let near = vec![set(&[1.11, 2.0, 2.9], 0.5218)];
        assert!(faithful(&reference, &real, &near));
        // The one-element output off by as much as its real error: not trusted, whatever the
        // cosines (1 for one element) say.
        let off = vec![set(&[1.1, 2.0, 2.9], 0.54)];
        assert!(!faithful(&reference, &real, &off));
        // An exact real start needs an exact estimate; a missing output or set is not trusted.
        assert!(!faithful(&reference, &reference, &real));
        assert!(faithful(&reference, &reference, &reference.clone()));
        assert!(!faithful(&reference, &real, &[]));
        let missing: Vec<Outputs> = vec![[("y".to_string(), (vec![1.1, 2.0, 2.9], 3))].into()];
        assert!(!faithful(&reference, &real, &missing));
        let nan = vec![set(&[1.1, f32::NAN, 2.9], 0.52)];
        assert!(!faithful(&reference, &real, &nan));
    }

    #[test]
    fn the_search_starts_where_the_noise_model_meets_half_the_budget() {
        // Three layers at 20, 30 and 40 dB alone (NSR 1e-2, 1e-3, 1e-4): with all quantized
        // the output measured NSR 2 * 0.0111 (gain 2). Target 0.999 (NSR 0.002): half of it is
        // 0.001; keeping the first leaves 2 * 0.0011 = 0.0022, the first two 2e-4.
        let snr = [Some(20.0), Some(30.0), Some(40.0)];
        let cos = 1.0 / (1.0 + 2.0 * 0.0111f64).sqrt();
        assert_eq!(first_guess(&[0, 1, 2], &snr, cos, 0.999), 2);
        // Already there, or nothing measured: start at 1.
        assert_eq!(first_guess(&[0, 1, 2], &snr, 0.99999, 0.999), 1);
        assert_eq!(first_guess(&[0, 1], &[None, None], 0.9, 0.999), 1);
        assert!((nsr_of_cosine(1.0 / 2f64.sqrt()) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn probes_name_only_values_the_graph_has() {
        use crate::verify::testutil::{info, model, node, out};
        let p = model(
            vec![node("Relu", "relu", &["x"], &["y"], vec![])],
            vec![info("x", pb::tensor_proto::DataType::Float, &[2])],
            vec![out("y")],
            vec![],
        );
        let names: BTreeSet<String> = ["x", "y", "folded_away"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let probed = with_probes(p, &names);
        let outs: Vec<&str> = probed
            .graph
            .as_ref()
            .unwrap()
            .output
            .iter()
            .map(|o| o.name())
            .collect();
        assert_eq!(outs, ["y", "x"]);
    }

    #[test]
    fn a_candidate_meets_the_target_only_within_the_tolerance() {
        let t = Tolerance {
            atol: 0.01,
            rtol: 0.1,
        };
        // Allowed: 0.01 + 0.1 |a|, so 0.06 at a = 0.5 and 0.01 at a = 0; NaN is outside.
        let a = [0.5, 0.5, 0.0, 0.0, 1.0];
        let b = [0.559, 0.561, 0.009, -0.011, f32::NAN];
        assert_eq!(outside(&a, &b, t), 3);
        // An infinite error is outside even where rtol |a| allows infinity, as in the check.
        assert_eq!(outside(&[f32::INFINITY], &[1.0], t), 1);
        let target = Target {
            cosine: 0.99,
            gates: Gates {
                atol: Some(t.atol),
                rtol: Some(t.rtol),
                ..Gates::default()
            },
        };
        let score = |outside| Score {
            cosine: 0.999,
            top1: Some(1.0),
            outside,
            integer_mismatch: 0.0,
        };
        assert!(target.met_by(&score(Some(0))));
        assert!(!target.met_by(&score(Some(1))));
        let cosine_only = Target {
            cosine: 0.99,
            gates: Gates::default(),
        };
        assert!(cosine_only.met_by(&score(None)));
        assert!(!cosine_only.met_by(&Score {
            cosine: 0.98,
            ..score(None)
        }));
        // A top-1 drop counts only when an output has a top-1.
        let top1 = Target {
            cosine: 0.99,
            gates: Gates {
                max_accuracy_drop: Some(0.0),
                ..Gates::default()
            },
        };
        assert!(top1.met_by(&score(None)));
        assert!(!top1.met_by(&Score {
            top1: Some(0.975),
            ..score(None)
        }));
        assert!(top1.met_by(&Score {
            top1: None,
            ..score(None)
        }));
    }

    #[test]
    fn equal_outputs_have_a_cosine_of_exactly_1() {
        // sqrt(5) * sqrt(5) rounds below 5 in f64: a target of 1 was missed with every layer
        // kept in float, while the check (one square root) gave 1.
        assert_eq!(cosine(&[1.0, 2.0], &[1.0, 2.0]), 1.0);
        assert_eq!(cosine(&[2.0, 3.0], &[2.0, 3.0]), 1.0);
        assert_eq!(cosine(&[1.0, 2.0], &[-1.0, -2.0]), -1.0);
        // Equal infinities and NaN pairs are left out, as in the check.
        let inf = f32::INFINITY;
        assert_eq!(cosine(&[1.0, inf, f32::NAN], &[1.0, inf, f32::NAN]), 1.0);
        assert!(cosine(&[1.0, inf], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn snr_of_equal_and_of_noisy_activations() {
        assert_eq!(snr_db(&[1.0, 2.0], &[1.0, 2.0]), 120.0);
        let s = snr_db(&[1.0, 0.0], &[1.1, 0.0]);
        assert!((s - 20.0).abs() < 1e-5, "{s}"); // 1.1 is not exact in f32
    }
}
