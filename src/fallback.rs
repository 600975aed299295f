//! Accuracy-gated fallback: keep the layers that cost the most accuracy in float until the
//! result meets the cosine target.
//!
//! Sensitivity is measured on matched activations (the approach of NNCF's and Neural
//! Compressor's accuracy-aware modes): the reference (the model before the lossy passes) and
//! the quantized candidate run in tract on the same inputs with every quantizable layer's
//! activation input and output exposed as extra graph outputs. A layer's cost is the SNR it
//! loses, `SNR(input) - SNR(output)` in dB, where `SNR(x) = 10 log10(sum a^2 / sum (a - b)^2)`
//! over the reference `a` and candidate `b` activations. The costliest layer not yet kept is
//! kept in float, the lossy passes are re-run from the snapshot, and the loop repeats until
//! every float graph output has cosine >= target or the iteration cap is reached. One tract run
//! of the candidate per iteration; the reference runs once.

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
use crate::report::Reporter;
use crate::verify::{metrics::to_f64, tract_run};

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
    input: Option<String>,
}

fn layers(g: &Graph, opts: &PassOptions) -> Vec<Layer> {
    let mut out = Vec::new();
    for (_, n) in g.live_nodes() {
        if !opts.selects(g, n) {
            continue;
        }
        let weighted = n.inputs.iter().enumerate().any(|(i, v)| {
            v.and_then(|v| g.initializer(v))
                .is_some_and(|t| weight_axis(n, i, t.dims().len()).is_some())
        });
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
        out.push(Layer {
            node: n.name().to_string(),
            op: n.op_type().to_string(),
            output: g.value(*o).name.clone(),
            input,
        });
    }
    out
}

/// `proto` with the named values of its main graph appended as graph outputs (names only:
/// tract infers their types), to read intermediate activations.
pub fn with_probes(mut proto: pb::ModelProto, names: &BTreeSet<String>) -> pb::ModelProto {
    if let Some(g) = proto.graph.as_mut() {
        let existing: BTreeSet<String> = g.output.iter().map(|o| o.name().to_string()).collect();
        for n in names.difference(&existing) {
            g.output.push(pb::ValueInfoProto {
                name: Some(n.clone()),
                ..Default::default()
            });
        }
    }
    proto
}

fn snr_db(a: &[f64], b: &[f64]) -> f64 {
    let (mut sig, mut noise) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        sig += x * x;
        noise += (x - y) * (x - y);
    }
    if noise == 0.0 || !noise.is_finite() {
        return if noise == 0.0 { 120.0 } else { -120.0 };
    }
    (10.0 * (sig / noise).log10()).clamp(-120.0, 120.0)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
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
type Outputs = HashMap<String, (Vec<f64>, usize)>;

/// Fraction of rows (all axes but the last) whose argmax over the last axis agrees.
fn top1(a: &[f64], b: &[f64], last: usize) -> Option<f64> {
    if last < 2 || a.is_empty() || a.len() != b.len() {
        return None;
    }
    let argmax = |r: &[f64]| {
        r.iter()
            .enumerate()
            .fold(
                (0, f64::NEG_INFINITY),
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

fn run_probed(
    proto: pb::ModelProto,
    probes: &BTreeSet<String>,
    inputs: &[(String, Tensor)],
    what: &str,
) -> Result<Outputs> {
    let proto = with_probes(proto, probes);
    let outs = tract_run::run(&proto, None, inputs).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok(outs
        .into_iter()
        .filter_map(|(n, t)| {
            let is_float = t.datum_type().is_float();
            let last = t.shape().last().copied().unwrap_or(1);
            is_float
                .then(|| to_f64(&t).ok().map(|v| (n, (v, last))))
                .flatten()
        })
        .collect())
}

/// Re-runs `suffix` on copies of `snapshot` until every float output of the graph has cosine
/// >= `target` against `snapshot`, keeping the costliest layer in float each round.
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
    inputs: &[(String, Tensor)],
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
        probes.insert(l.output.clone());
        if let Some(i) = &l.input {
            probes.insert(i.clone());
        }
    }
    reporter.phase("fallback: running the reference with activations exposed");
    let reference = run_probed(to_proto(snapshot)?, &probes, inputs, "reference")?;
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
        let cand = run_probed(to_proto(&model)?, &probes, inputs, "candidate")
            .context("the quantized model does not run in tract")?;
        reporter.phase_done();
        iterations += 1;
        let min_cos = graph_outputs
            .iter()
            .filter_map(|n| Some(cosine(&reference.get(n)?.0, &cand.get(n)?.0)))
            .fold(1.0f64, f64::min);
        let min_top1 = graph_outputs
            .iter()
            .filter_map(|n| {
                let (a, last) = reference.get(n)?;
                top1(a, &cand.get(n)?.0, *last)
            })
            .fold(1.0f64, f64::min);
        start_cosine.get_or_insert(min_cos);
        let met = min_cos >= target && max_accuracy_drop.is_none_or(|d| 1.0 - min_top1 <= d);
        let done = met || iterations > max_iterations;
        // The costliest layer not yet kept.
        let choice = (!done)
            .then(|| {
                layers
                    .iter()
                    .filter(|l| !opts.keep_float.contains(&l.output))
                    .filter_map(|l| {
                        let out = snr_db(&reference.get(&l.output)?.0, &cand.get(&l.output)?.0);
                        let inp = match &l.input {
                            Some(i) => snr_db(&reference.get(i)?.0, &cand.get(i)?.0),
                            None => 120.0,
                        };
                        Some((l, inp, out))
                    })
                    .max_by(|a, b| (a.1 - a.2).total_cmp(&(b.1 - b.2)))
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
