//! Accuracy-gated fallback: keep the layers that cost the most accuracy in float until the
//! result meets the cosine target.
//!
//! Sensitivity is measured on matched activations (the approach of NNCF's and Neural
//! Compressor's accuracy-aware modes): the reference (the model before the lossy passes) and
//! the quantized candidate run in tract on the same inputs with every quantizable layer's
//! activation input and output exposed as extra graph outputs. A layer's cost is the SNR it
//! loses, `SNR(input) - SNR(output)` in dB (each capped at 60 dB, which counts as exact), per
//! square root of its weight count (a small layer is cheaper to keep in float), where `SNR(x) = 10 log10(sum a^2 / sum (a - b)^2)`
//! over the reference `a` and candidate `b` activations (summed over the input sets). This
//! favours layers whose input is still exact, the first quantized layers; ranking by the
//! noise power a layer adds, `10^(-out/10) - 10^(-in/10)`, was tried and chased deep layers
//! whose noise is mostly amplified from upstream: ppocrv4-rec came out 2.17x smaller instead of
//! 3.75x (int8 weights) and 7.46 MB instead of 6.77 MB (static), at the same target. A layer's output is read under its
//! own name or, when a pass folded the ops that follow it alone (bias Add, BatchNormalization,
//! Relu, ...) into it, under the name at the end of that chain, which is the one that survives.
//! The costliest layer not yet kept is
//! kept in float, the lossy passes are re-run from the snapshot, and the loop repeats until
//! every float graph output has cosine >= target on every input set or the iteration cap is
//! reached. The input sets are the check's inputs and, for calibrated passes, a few of the
//! calibration samples, so that the layers kept in float do not fit one input. One tract run
//! of the candidate per input set and iteration; the reference runs once per set.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, Result};
use serde::Serialize;
use tract_onnx::prelude::Tensor;

use crate::ir::{Graph, Model, ValueDef};
use crate::onnx::export::to_proto;
use crate::passes::manager::{run_pipeline, PassRecord};
use crate::passes::quantize_weights::weight_axis;
use crate::passes::{Pass, PassOptions};
use crate::pb;
use crate::quant::calibrate::{float_values, Runner};
use crate::report::Reporter;

/// One layer kept in float.
#[derive(Debug, Clone, Serialize)]
pub struct KeptLayer {
    /// Node name.
    pub node: String,
    /// Op type.
    pub op: String,
    /// Its first output (the key used in [`PassOptions::keep_float`]).
    pub output: String,
    /// SNR of its activation input when it was chosen, dB.
    pub snr_in_db: f64,
    /// SNR of its output when it was chosen, dB.
    pub snr_out_db: f64,
    /// Smallest output cosine before keeping it.
    pub cosine_before: f64,
}

/// What the fallback did.
#[derive(Debug, Clone, Serialize)]
pub struct FallbackReport {
    /// The cosine every float graph output had to reach.
    pub target_cosine: f64,
    /// Smallest output cosine with every layer quantized.
    pub start_cosine: f64,
    /// Smallest output cosine of the result.
    pub final_cosine: f64,
    /// Layers kept in float, in the order chosen.
    pub kept: Vec<KeptLayer>,
    /// Quantizable layers in the main graph.
    pub layers: usize,
    /// Candidate runs made.
    pub iterations: usize,
    /// True when the target was met.
    pub met: bool,
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
    input: Option<String>,
    /// Elements of its weights (what keeping it in float costs in size).
    params: usize,
}

/// Ops a quantization pass may fold into the layer before them (or fuse with it).
const EPILOGUE: [&str; 6] = ["Add", "Mul", "Sub", "BatchNormalization", "Relu", "Clip"];

/// Longest chain of epilogue ops followed after a layer's output.
const EPILOGUE_STEPS: usize = 4;

fn layers(g: &Graph, opts: &PassOptions) -> Vec<Layer> {
    let uses = g.uses();
    let mut out = Vec::new();
    for (_, n) in g.live_nodes() {
        if !opts.selects(g, n) {
            continue;
        }
        let params: usize = n
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let t = v.and_then(|v| g.initializer(v))?;
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
        let input = n.inputs.first().copied().flatten().and_then(|v| {
            matches!(g.value(v).def, ValueDef::Node(..) | ValueDef::Input)
                .then(|| g.value(v).name.clone())
        });
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
            match rn.outputs.first() {
                Some(Some(next)) if rn.domain().is_empty() && EPILOGUE.contains(&rn.op_type()) => {
                    v = *next;
                    readable.push(g.value(v).name.clone());
                }
                _ => break,
            }
        }
        out.push(Layer {
            node: n.name().to_string(),
            op: n.op_type().to_string(),
            output: g.value(*o).name.clone(),
            readable,
            input,
            params,
        });
    }
    out
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

/// SNR above which an activation counts as exact, dB: int8 weights alone give 40 to 50 dB on a
/// layer, activations in int8 less.
const EXACT_DB: f64 = 60.0;

/// A layer's cost: the SNR it loses, `in - out` in dB, both capped at [`EXACT_DB`]. Without
/// the cap, the first layer after an exact prefix (120 dB in) always ranked first even when it
/// added almost no noise (50 dB out), and the fallback walked the graph in node order: on
/// ppocr-mobile-v2-cls calibrated on one sample it kept all 54 layers in float while the 4
/// quantized layers that cost the accuracy (4 to 12 dB out) waited their turn.
fn cost(snr_in: f64, snr_out: f64) -> f64 {
    snr_in.min(EXACT_DB) - snr_out.min(EXACT_DB)
}

/// The order in which layers go back to float: [`cost`] per square root of the layer's weight
/// count, so that of two layers losing as much, the smaller one (cheaper to keep in float) goes
/// first. On ppocrv4-rec with int8 weights, ranking by cost alone kept one large 1x1 Conv
/// (3.03x smaller); this keeps the two stem Convs of 432 and 144 weights (3.75x).
fn rank(l: &Layer, snr_in: f64, snr_out: f64) -> f64 {
    cost(snr_in, snr_out) / (l.params.max(1) as f64).sqrt()
}

/// Signal power `sum a^2` and noise power `sum (a - b)^2` of a reference `a` and candidate `b`.
fn powers(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut sig, mut noise) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
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
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 && bb == 0.0 {
        1.0
    } else if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
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

/// Runs `proto` with the values `probes` exposed on every input set; float values only.
///
/// Uses tract's optimized plan (several times faster; the layer costs and cosines need not be
/// bit-exact, the final check is), and the plain typed plan when that fails.
fn run_probed(
    proto: pb::ModelProto,
    probes: &BTreeSet<String>,
    sets: &[Vec<(String, Tensor)>],
    what: &str,
    mut each: impl FnMut(Outputs),
) -> Result<()> {
    let proto = with_probes(proto, probes);
    let mut runner = Runner::new(&proto, true)?;
    for set in sets {
        let outs = match runner.run(set) {
            Ok(o) => o,
            Err(_) => {
                // tract's optimized plan failed: the plain typed plan from here on.
                runner = Runner::new(&proto, false)?;
                runner
                    .run(set)
                    .with_context(|| format!("running the {what} in tract"))?
            }
        };
        each(
            runner
                .outputs
                .iter()
                .zip(outs.iter())
                .filter_map(|(n, t)| {
                    let last = t.shape().last().copied().unwrap_or(1);
                    let v = float_values(t)?.into_owned();
                    Some((n.clone(), (v, last)))
                })
                .collect(),
        );
    }
    Ok(())
}

/// Re-runs `suffix` on copies of `snapshot` until every float output of the graph reaches
/// cosine `target` against `snapshot` on every input set of `inputs` (each one value per graph
/// input), keeping the costliest layer in float each round. Layer costs sum the signal and
/// noise powers over the sets, so that the choice does not fit one input.
///
/// Returns the final model, the pass records of its last run, and the report.
///
/// Errors: a pass fails, or tract cannot run the snapshot or a candidate (the caller has
/// already checked that tract runs the original).
#[allow(clippy::too_many_arguments)]
pub fn run(
    snapshot: &Model,
    suffix: &[&'static dyn Pass],
    opts: &PassOptions,
    validate_each: bool,
    inputs: &[Vec<(String, Tensor)>],
    target: f64,
    max_accuracy_drop: Option<f64>,
    max_iterations: usize,
    reporter: &dyn Reporter,
) -> Result<(Model, Vec<PassRecord>, FallbackReport)> {
    let layers = layers(&snapshot.graph, opts);
    let graph_outputs: Vec<String> = snapshot
        .graph
        .outputs
        .iter()
        .map(|p| snapshot.graph.value(p.value).name.clone())
        .collect();
    let mut probes: BTreeSet<String> = BTreeSet::new();
    for l in &layers {
        probes.extend(l.readable.iter().cloned());
        if let Some(i) = &l.input {
            probes.insert(i.clone());
        }
    }
    reporter.phase("fallback: running the reference with activations exposed");
    let mut reference: Vec<Outputs> = Vec::new();
    run_probed(to_proto(snapshot)?, &probes, inputs, "reference", |o| {
        reference.push(o)
    })?;
    reporter.phase_done();
    let mut opts = opts.clone();
    let mut kept: Vec<KeptLayer> = Vec::new();
    let mut iterations = 0;
    let mut start_cosine = None;
    loop {
        let mut model = snapshot.clone();
        let records = run_pipeline(&mut model, suffix, &opts, validate_each, reporter)?;
        reporter.phase(&format!(
            "fallback: checking with {} layers in float",
            kept.len()
        ));
        // Each set's candidate values are compared with the reference as they come, then
        // dropped: only the reference's values are held, once.
        let (mut min_cos, mut min_top1) = (1.0f64, 1.0f64);
        let mut sums: HashMap<String, (f64, f64)> = HashMap::new();
        let mut set = 0;
        run_probed(to_proto(&model)?, &probes, inputs, "candidate", |c| {
            let r = &reference[set];
            set += 1;
            for n in &graph_outputs {
                if let (Some((a, last)), Some((b, _))) = (r.get(n), c.get(n)) {
                    min_cos = min_cos.min(cosine(a, b));
                    if let Some(t) = top1(a, b, *last) {
                        min_top1 = min_top1.min(t);
                    }
                }
            }
            for (name, (b, _)) in &c {
                if let Some((a, _)) = r.get(name) {
                    let (sig, noise) = powers(a, b);
                    let e = sums.entry(name.clone()).or_default();
                    e.0 += sig;
                    e.1 += noise;
                }
            }
        })
        .context("the quantized model does not run in tract")?;
        reporter.phase_done();
        iterations += 1;
        start_cosine.get_or_insert(min_cos);
        let met = min_cos >= target && max_accuracy_drop.is_none_or(|d| 1.0 - min_top1 <= d);
        let done = met || iterations > max_iterations;
        // The SNR of one activation over every input set (signal and noise powers summed).
        let snr = |name: &str| -> Option<f64> { sums.get(name).map(|&(s, n)| db(s, n)) };
        // The costliest layer not yet kept.
        let choice = (!done)
            .then(|| {
                layers
                    .iter()
                    .filter(|l| !opts.keep_float.contains(&l.output))
                    .filter_map(|l| {
                        // The first name the candidate still has: the layer's output, or
                        // the end of what was folded into it.
                        let out = l.readable.iter().find_map(|n| snr(n))?;
                        let inp = match &l.input {
                            Some(i) => snr(i)?,
                            None => 120.0,
                        };
                        Some((l, inp, out))
                    })
                    .max_by(|a, b| rank(a.0, a.1, a.2).total_cmp(&rank(b.0, b.1, b.2)))
            })
            .flatten();
        match choice {
            Some((l, inp, out)) => {
                kept.push(KeptLayer {
                    node: l.node.clone(),
                    op: l.op.clone(),
                    output: l.output.clone(),
                    snr_in_db: inp,
                    snr_out_db: out,
                    cosine_before: min_cos,
                });
                opts.keep_float.insert(l.output.clone());
            }
            None => {
                let report = FallbackReport {
                    target_cosine: target,
                    start_cosine: start_cosine.unwrap_or(min_cos),
                    final_cosine: min_cos,
                    kept,
                    layers: layers.len(),
                    iterations,
                    met,
                };
                return Ok((model, records, report));
            }
        }
    }
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
        assert_eq!(ls[0].input.as_deref(), Some("x"));
        assert_eq!(ls[1].readable, ["y", "z"]);
        assert_eq!(ls[1].input.as_deref(), Some("r"));
    }

    #[test]
    fn an_exact_input_does_not_make_a_quiet_layer_the_costliest() {
        // A first layer after an exact prefix, adding little noise, against a quantized layer
        // that loses 22 dB: the second goes back to float first.
        assert_eq!(cost(120.0, 50.0), 10.0);
        assert!(cost(30.0, 7.7) > cost(120.0, 50.0));
        // Both exact: nothing to gain.
        assert_eq!(cost(120.0, 120.0), 0.0);
        // Of two layers losing as much, the smaller one ranks first.
        let layer = |params| Layer {
            node: String::new(),
            op: "Conv".into(),
            output: String::new(),
            readable: vec![],
            input: None,
            params,
        };
        assert!(rank(&layer(432), 60.0, 48.0) > rank(&layer(57_600), 60.0, 48.0));
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
    fn snr_of_equal_and_of_noisy_activations() {
        assert_eq!(snr_db(&[1.0, 2.0], &[1.0, 2.0]), 120.0);
        let s = snr_db(&[1.0, 0.0], &[1.1, 0.0]);
        assert!((s - 20.0).abs() < 1e-5, "{s}"); // 1.1 is not exact in f32
    }
}
