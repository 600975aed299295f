//! Verification: run the reference and the candidate model in tract on the same inputs and
//! compare their outputs against accuracy gates.
//!
//! ```text
//! inputs::prepare_inputs   npz bundle | --input values | seeded random, per real graph input
//!        |
//! tract_run::run(reference) --Err--> Verification::Unverified (candidate result unused)
//! tract_run::run(candidate) --Err--> Verification::CandidateFailed (an optimizer bug)
//!   (the two run side by side; a [`Reference`] keeps the first for more candidates)
//!        |
//! metrics::compare per output (elementwise tolerance evaluated here)
//! gate::check              --> Verification::Checked | Verification::Failed
//! ```
//!
//! The library never prints: [`compare_models`] returns a [`Comparison`] (serde-serializable
//! for the JSON report) and [`format_table`] renders it as text for the binary to print.

pub mod gate;
pub mod inline;
pub mod inputs;
pub mod metrics;
pub mod specialize;
pub mod tract_run;

use std::path::Path;

use anyhow::{bail, Result};
use serde::Serialize;

pub use gate::{check, GateFailure, GateKind, Gates};
pub use inputs::{InputInfo, InputOptions, InputSource, PreparedInputs};
pub use metrics::{OutputMetrics, Tolerance, ValueMetrics};
pub use tract_run::{holds_bfloat16, run, run_sets, tract_lacks_weight_forms, RunError, RunStage};

use crate::pb;

/// The outcome of a comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Verification {
    /// Both models ran and every gate held.
    Checked,
    /// Both models ran and at least one gate failed (see [`Comparison::failures`]).
    Failed,
    /// tract cannot run the reference, so nothing was compared and the candidate was not
    /// run; or (set by `optimize`) the candidate is in a form tract cannot load (bfloat16).
    Unverified {
        /// One line: stage, node, op and tract's message.
        reason: String,
        /// The structured error.
        error: RunError,
    },
    /// The reference ran but the candidate did not: the optimizer produced a model tract
    /// cannot run although it ran the original. A hard failure, not "unverified".
    CandidateFailed {
        /// One line: stage, node, op and tract's message.
        reason: String,
        /// The structured error.
        error: RunError,
    },
}

/// Everything a comparison found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    /// The inputs fed to both models: names, dtypes, shapes and where they came from (the
    /// first set's, when there are several).
    pub inputs: Vec<InputInfo>,
    /// The labels (file names) of the input sets, in order, when there are several (an input
    /// folder); empty for one set. The figures are then merged over the sets as
    /// [`metrics::merge_values`] says.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub input_sets: Vec<String>,
    /// Notes from input preparation and output matching (defaulted dims, extra outputs).
    pub notes: Vec<String>,
    /// The gates checked.
    pub gates: Gates,
    /// One row per reference output, in the reference's graph output order; empty unless
    /// both models ran.
    pub outputs: Vec<OutputMetrics>,
    /// Failed gates, in output order.
    pub failures: Vec<GateFailure>,
    /// The verdict.
    pub status: Verification,
}

/// Runs `reference` and `candidate` in tract on the same inputs (prepared from the
/// reference's graph inputs with `opts`) and compares every reference output with the
/// candidate output of the same name under `gates`. The two models run at the same time, on
/// two threads.
///
/// `ref_dir` and `cand_dir` are the directories external data is read from.
///
/// # Errors
/// When a gate is out of range ([`Gates::check`]), a model holds external data but has no
/// directory to read it from (naming the model, the tensor and its file), or the inputs cannot
/// be prepared (see [`inputs::prepare_inputs`]). tract failing on either model is a
/// [`Verification`] status, not an error.
pub fn compare_models(
    reference: &pb::ModelProto,
    ref_dir: Option<&Path>,
    candidate: &pb::ModelProto,
    cand_dir: Option<&Path>,
    opts: &InputOptions,
    gates: &Gates,
) -> Result<Comparison> {
    gates.check()?;
    let mut problems = Vec::new();
    for (what, model, dir, arg) in [
        ("reference", reference, ref_dir, "ref_dir"),
        ("candidate", candidate, cand_dir, "cand_dir"),
    ] {
        if let (None, Some((tensor, location))) =
            (dir, crate::onnx::external::first_external(model))
        {
            problems.push(format!(
                "the {what} model keeps tensor '{tensor}' in external data ('{location}'), and no directory to read it from was given ({arg} is None)"
            ));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(Reference::run_beside(reference, ref_dir, candidate, cand_dir, opts, gates)?.1)
}

/// Tells, in the comparison's notes, that the reference's If nodes were `resolved` for the
/// inputs (see [`specialize`]).
fn note_ifs(resolved: bool, prepared: &mut PreparedInputs) {
    if resolved {
        prepared.notes.push(
            "the models' If nodes were resolved for these inputs: tract ran the branches they take"
                .to_string(),
        );
    }
}

/// A model's outputs in graph output order, or why tract could not run it.
type Outputs = Result<Vec<(String, tract_onnx::prelude::Tensor)>, RunError>;

/// One input set of a [`Reference`]: its label (the file's name, `""` for a single set), the
/// inputs and the reference's outputs on them.
struct RefSet {
    label: String,
    prepared: PreparedInputs,
    outputs: Outputs,
}

/// The reference side of a check, computed once for any number of candidates: the input
/// sets prepared from the reference's graph inputs (one, or one per file of an input folder,
/// see [`inputs::prepare_input_sets`]) and the reference's outputs on each (tract's plain
/// plan, as [`tract_run::run`]).
pub struct Reference {
    sets: Vec<RefSet>,
}

impl Reference {
    /// Prepares the input sets with `opts` and runs `reference` on them (`ref_dir`: where its
    /// external data is read from), the sets in parallel.
    ///
    /// # Errors
    /// Only when the inputs cannot be prepared; tract failing on the reference makes every
    /// comparison [`Verification::Unverified`].
    pub fn run(
        reference: &pb::ModelProto,
        ref_dir: Option<&Path>,
        opts: &InputOptions,
    ) -> Result<Reference> {
        let prepared = inputs::prepare_input_sets(reference, opts)?;
        let tensors: Vec<&[_]> = prepared.iter().map(|(_, p)| p.tensors.as_slice()).collect();
        let ran = tract_run::run_sets(reference, ref_dir, &tensors);
        Ok(Reference::of(prepared, ran))
    }

    /// The reference of the prepared sets and the reference's runs on them.
    fn of(prepared: Vec<(String, PreparedInputs)>, ran: Vec<(Outputs, bool)>) -> Reference {
        let sets = prepared
            .into_iter()
            .zip(ran)
            .map(|((label, mut prepared), (outputs, resolved))| {
                note_ifs(resolved, &mut prepared);
                RefSet {
                    label,
                    prepared,
                    outputs,
                }
            })
            .collect();
        Reference { sets }
    }

    /// [`Reference::run`] and the comparison of `candidate` with it, the two models run at
    /// the same time on two threads (see [`compare_models`]).
    ///
    /// # Errors
    /// As [`Reference::run`].
    pub fn run_beside(
        reference: &pb::ModelProto,
        ref_dir: Option<&Path>,
        candidate: &pb::ModelProto,
        cand_dir: Option<&Path>,
        opts: &InputOptions,
        gates: &Gates,
    ) -> Result<(Reference, Comparison)> {
        let prepared = inputs::prepare_input_sets(reference, opts)?;
        let tensors: Vec<&[_]> = prepared.iter().map(|(_, p)| p.tensors.as_slice()).collect();
        let (ran, (cand, cast)) = rayon::join(
            || tract_run::run_sets(reference, ref_dir, &tensors),
            || run_candidate(candidate, cand_dir, &tensors),
        );
        let r = Reference::of(prepared, ran);
        let mut cand: Vec<Option<Outputs>> = cand.into_iter().map(Some).collect();
        let mut c = r.compare_sets(
            |i| cand[i].take().expect("one candidate run per set"),
            gates,
        );
        note_cast(cast, &mut c);
        Ok((r, c))
    }

    /// The tensors of the first input set, one per real graph input, in graph input order.
    pub fn inputs(&self) -> &[(String, tract_onnx::prelude::Tensor)] {
        &self.sets[0].prepared.tensors
    }

    /// Every input set's tensors, in set order (file name order for an input folder).
    pub fn input_sets(&self) -> impl Iterator<Item = &[(String, tract_onnx::prelude::Tensor)]> {
        self.sets.iter().map(|s| s.prepared.tensors.as_slice())
    }

    /// The reference's outputs on the first input set in graph output order, or `None` when
    /// tract could not run it.
    pub fn outputs(&self) -> Option<&[(String, tract_onnx::prelude::Tensor)]> {
        self.sets[0].outputs.as_deref().ok()
    }

    /// Runs `candidate` (external data read from `cand_dir`) on each of the reference's input
    /// sets (in parallel) and compares its outputs with the reference's under `gates` (over
    /// several sets as [`metrics::merge_values`] says); `candidate` is not run on a set the
    /// reference did not run on.
    pub fn compare(
        &self,
        candidate: &pb::ModelProto,
        cand_dir: Option<&Path>,
        gates: &Gates,
    ) -> Comparison {
        // The candidate runs on the sets the reference ran on.
        let ran: Vec<usize> = (0..self.sets.len())
            .filter(|&i| self.sets[i].outputs.is_ok())
            .collect();
        let tensors: Vec<&[_]> = ran
            .iter()
            .map(|&i| self.sets[i].prepared.tensors.as_slice())
            .collect();
        let (outputs, cast) = run_candidate(candidate, cand_dir, &tensors);
        let mut runs: Vec<Option<Outputs>> = (0..self.sets.len()).map(|_| None).collect();
        for (&i, o) in ran.iter().zip(outputs) {
            runs[i] = Some(o);
        }
        let mut c = self.compare_sets(
            |i| {
                runs[i]
                    .take()
                    .expect("the candidate ran where the reference did")
            },
            gates,
        );
        note_cast(cast, &mut c);
        c
    }

    /// The comparison the candidate's outputs on each set (`cand_outputs(i)` for set `i`,
    /// asked for only when the reference ran on it) give: each set compared, then merged.
    fn compare_sets(
        &self,
        mut cand_outputs: impl FnMut(usize) -> Outputs,
        gates: &Gates,
    ) -> Comparison {
        let per_set: Vec<Comparison> = self
            .sets
            .iter()
            .enumerate()
            .map(|(i, set)| set.compare_outputs(|| cand_outputs(i), gates))
            .collect();
        let labels: Vec<&str> = self.sets.iter().map(|s| s.label.as_str()).collect();
        let mut comparison = merge(per_set, &labels);
        // Outputs without a value on every set: nothing was compared, whatever the gates say.
        let empty = |o: &metrics::OutputMetrics| o.values.as_ref().is_some_and(|v| v.elements == 0);
        if matches!(comparison.status, Verification::Checked)
            && !comparison.outputs.is_empty()
            && comparison.outputs.iter().all(empty)
        {
            let message = "every graph output is empty on the inputs checked".to_string();
            comparison.status = Verification::Unverified {
                reason: format!(
                    "nothing was compared: {message}; give inputs for which the model outputs values"
                ),
                error: tract_run::RunError {
                    stage: tract_run::RunStage::Run,
                    node: None,
                    op: None,
                    message,
                    panicked: false,
                },
            };
        }
        if matches!(comparison.status, Verification::Checked) {
            if gates.min_cosine.is_some() {
                let notes = output_notes(&comparison.outputs, gates);
                comparison.notes.extend(notes);
            }
            comparison.failures = check(gates, &comparison.outputs);
            if !comparison.failures.is_empty() {
                comparison.status = Verification::Failed;
            }
        }
        comparison
    }
}

impl RefSet {
    /// This set's comparison before gates are checked: inputs, notes, status and one row per
    /// reference output.
    fn compare_outputs(&self, cand_outputs: impl FnOnce() -> Outputs, gates: &Gates) -> Comparison {
        let mut comparison = Comparison {
            inputs: self.prepared.info.clone(),
            input_sets: vec![],
            notes: self.prepared.notes.clone(),
            gates: gates.clone(),
            outputs: vec![],
            failures: vec![],
            status: Verification::Checked,
        };
        let ref_outputs = match &self.outputs {
            Ok(outputs) => outputs,
            Err(error) => {
                comparison.status = Verification::Unverified {
                    // Which model: the candidate was not run.
                    reason: error
                        .to_string()
                        .replacen("the model", "the reference model", 1),
                    error: error.clone(),
                };
                return comparison;
            }
        };
        let cand_outputs = match cand_outputs() {
            Ok(outputs) => outputs,
            // tract folding a comparison it cannot compute says nothing of the candidate.
            Err(error) if error.message.contains(tract_run::MISFOLDED) => {
                comparison.status = Verification::Unverified {
                    reason: error.to_string(),
                    error,
                };
                return comparison;
            }
            Err(error) => {
                comparison.status = Verification::CandidateFailed {
                    reason: error.to_string(),
                    error,
                };
                return comparison;
            }
        };
        for (name, a) in ref_outputs {
            let row = match cand_outputs.iter().find(|(n, _)| n == name) {
                Some((_, b)) => metrics::compare(name, a, b, gates.tolerance_for(name)),
                None => metrics::missing(name, a),
            };
            comparison.outputs.push(row);
        }
        for (name, _) in &cand_outputs {
            if !ref_outputs.iter().any(|(n, _)| n == name) {
                comparison.notes.push(format!(
                    "candidate output `{name}` is not a reference output; not compared"
                ));
            }
        }
        comparison
    }
}

/// One comparison from the comparisons of the input sets `labels` (in set order): the first
/// set's inputs, every distinct note, and per output the figures of [`metrics::merge_values`]
/// (a row that could not be compared on some set keeps that set's problem). A set where tract
/// failed makes the whole comparison fail that way, its reason naming the set. Gates are not
/// checked here.
fn merge(mut per_set: Vec<Comparison>, labels: &[&str]) -> Comparison {
    if per_set.len() == 1 {
        return per_set.pop().expect("one set");
    }
    let on = |label: &str, what: &str| format!("on input set {label}: {what}");
    let mut merged = per_set[0].clone();
    merged.input_sets = labels.iter().map(|l| l.to_string()).collect();
    merged.notes.clear();
    for c in &per_set {
        for n in &c.notes {
            if !merged.notes.contains(n) {
                merged.notes.push(n.clone());
            }
        }
    }
    let failed = per_set
        .iter()
        .zip(labels)
        .find(|(c, _)| matches!(c.status, Verification::Unverified { .. }))
        .or_else(|| {
            per_set
                .iter()
                .zip(labels)
                .find(|(c, _)| matches!(c.status, Verification::CandidateFailed { .. }))
        });
    if let Some((c, label)) = failed {
        merged.outputs.clear();
        merged.status = match &c.status {
            Verification::Unverified { reason, error } => Verification::Unverified {
                reason: on(label, reason),
                error: error.clone(),
            },
            Verification::CandidateFailed { reason, error } => Verification::CandidateFailed {
                reason: on(label, reason),
                error: error.clone(),
            },
            other => other.clone(),
        };
        return merged;
    }
    for (i, row) in merged.outputs.iter_mut().enumerate() {
        let rows: Vec<(&str, &OutputMetrics)> = per_set
            .iter()
            .zip(labels)
            .filter_map(|(c, l)| Some((*l, c.outputs.get(i)?)))
            .collect();
        if let Some((label, bad)) = rows.iter().find(|(_, r)| r.values.is_none()) {
            *row = (*bad).clone();
            row.problem = Some(on(label, bad.problem.as_deref().unwrap_or("no values")));
            continue;
        }
        let values: Vec<(&str, &ValueMetrics, &[usize])> = rows
            .iter()
            .filter_map(|(l, r)| Some((*l, r.values.as_ref()?, r.reference.shape.as_slice())))
            .collect();
        row.values = metrics::merge_values(&values);
    }
    merged
}

/// tract cannot load bfloat16: a candidate that computes in bfloat16 ([`holds_bfloat16`]) and
/// that tract could not run is unverified, not wrong (its reason says so).
pub fn unverified_if_bfloat16(c: &mut Comparison, candidate: &crate::ir::Model) {
    if let Verification::CandidateFailed { reason, error } = &c.status {
        if holds_bfloat16(candidate) {
            c.status = Verification::Unverified {
                reason: format!(
                    "the result computes in bfloat16, which tract cannot run, so it was not checked; check it on its bf16 target (GPU or accelerator) ({reason})"
                ),
                error: error.clone(),
            };
        }
    }
}

/// The input sets as `model` declares its graph inputs: a float tensor fed to a graph input
/// of another float type (a float16 interface after an fp16 conversion without
/// keep_io_types) is cast to that type. `None` when no tensor needs a cast.
pub(crate) fn as_declared(
    model: &pb::ModelProto,
    sets: &[&[(String, tract_onnx::prelude::Tensor)]],
) -> Option<Vec<Vec<(String, tract_onnx::prelude::Tensor)>>> {
    let declared: Vec<(&str, tract_onnx::prelude::DatumType)> = model
        .graph
        .as_ref()?
        .input
        .iter()
        .filter_map(|i| {
            let elem = match i.r#type.as_ref()?.value.as_ref()? {
                pb::type_proto::Value::TensorType(t) => t.elem_type?,
                _ => return None,
            };
            Some((i.name(), inputs::datum_type_of_onnx(elem)?))
        })
        .filter(|(_, dt)| dt.is_float())
        .collect();
    let wanted = |name: &str, t: &tract_onnx::prelude::Tensor| {
        declared
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, dt)| dt)
            .filter(|&dt| t.datum_type().is_float() && dt != t.datum_type())
    };
    if !sets
        .iter()
        .any(|s| s.iter().any(|(n, t)| wanted(n, t).is_some()))
    {
        return None;
    }
    Some(
        sets.iter()
            .map(|s| {
                s.iter()
                    .map(|(n, t)| {
                        let t = match wanted(n, t).and_then(|dt| t.cast_to_dt(dt).ok()) {
                            Some(c) => c.into_owned(),
                            None => t.clone(),
                        };
                        (n.clone(), t)
                    })
                    .collect()
            })
            .collect(),
    )
}

/// Runs `candidate` on `sets` (see [`tract_run::run_sets`]), each float input cast to the type
/// the candidate declares (see [`as_declared`]); returns its outputs per set and whether a
/// cast was needed.
fn run_candidate(
    candidate: &pb::ModelProto,
    cand_dir: Option<&Path>,
    sets: &[&[(String, tract_onnx::prelude::Tensor)]],
) -> (Vec<Outputs>, bool) {
    let cast = as_declared(candidate, sets);
    let fed: Vec<&[_]> = match &cast {
        Some(c) => c.iter().map(Vec::as_slice).collect(),
        None => sets.to_vec(),
    };
    let outputs = tract_run::run_sets(candidate, cand_dir, &fed)
        .into_iter()
        .map(|(o, _)| o)
        .collect();
    (outputs, cast.is_some())
}

/// Tells, in `c`'s notes, that the candidate's float inputs of another type were fed the
/// same values cast to it.
fn note_cast(cast: bool, c: &mut Comparison) {
    if cast {
        c.notes.push(
            "the candidate declares float inputs of another type than the reference (e.g. float16): it was fed the same values cast to that type".to_string(),
        );
    }
}

/// Fails when `c` is unverified and its notes say the input shapes contradict a fixed dim or
/// the rank the graph of `model` declares (`--input-shape`, or an array of an `--inputs`
/// file): the inputs are at fault, not the model (unless tract failed on an op it does not
/// implement, which no shape changes).
///
/// Errors: that case, naming the model, the inputs' contradictions and tract's reason.
pub fn refuse_contradicted_shapes(c: &Comparison, model: &std::path::Path) -> anyhow::Result<()> {
    if let Verification::Unverified { reason, error } = &c.status {
        // An op tract does not implement fails whatever the shapes: not the inputs' fault.
        if error.message.contains("Unimplemented(") {
            return Ok(());
        }
        let contradictions: Vec<&str> = c
            .notes
            .iter()
            .filter(|n| {
                n.contains("--input-shape sets dim")
                    || n.contains("differs from the declared shape")
            })
            .map(String::as_str)
            .collect();
        anyhow::ensure!(
            contradictions.is_empty(),
            "{}: the model cannot run with the input shapes given ({}): {reason}",
            model.display(),
            contradictions.join("; ")
        );
    }
    Ok(())
}

/// A note per empty output, and per float output of one element (a scalar score, a speech
/// probability) that no tolerance of `gates` covers: its cosine is 1 whenever the signs agree,
/// so the cosine gate cannot see its error.
fn output_notes(outputs: &[metrics::OutputMetrics], gates: &Gates) -> Vec<String> {
    // An empty output passes every gate without a value compared.
    let empty = outputs
        .iter()
        .filter(|o| o.values.as_ref().is_some_and(|v| v.elements == 0))
        .map(|o| {
            format!(
                "output `{}` is empty (shape {:?}): no value was compared; give inputs that make it non-empty (--inputs, --input-shape)",
                o.name, o.reference.shape
            )
        });
    // A float16 output where the reference is beyond float16's range: inf in the candidate
    // whatever precision its layers keep (an fp16 conversion without keep_io_types).
    let overflow = outputs.iter().filter_map(|o| {
        let v = o.values.as_ref()?;
        let f16 = o.candidate.as_ref()?.dtype == "F16";
        (f16 && v.worst_b.is_infinite() && v.worst_a.is_finite() && v.worst_a.abs() > 65504.0)
            .then(|| {
                format!(
                    "output `{}` is float16 in the candidate, which holds at most 65504, and the reference reaches {} (at {:?}): it overflows there whatever the layers before it compute in (`--keep-io-types true` keeps the interface float32)",
                    o.name,
                    fmt_num(v.worst_a),
                    v.worst_index
                )
            })
    });
    empty
        .chain(overflow)
        .collect::<Vec<_>>()
        .into_iter()
        .chain(outputs
        .iter()
        .filter(|o| gates.tolerance_for(&o.name).is_none())
        .filter_map(|o| {
            let v = o
                .values
                .as_ref()
                .filter(|v| !v.integer && v.max_abs != 0.0)
                .filter(|_| o.reference.shape.iter().product::<usize>() == 1)?;
            Some(format!(
                "output `{}` has one element: its cosine is 1 whenever the signs agree, so the cosine gate cannot see its error (here {} absolute, {} relative); `--atol {}:X` gates it alone",
                o.name,
                fmt_num(v.max_abs),
                fmt_num(v.max_rel),
                o.name
            ))
        }))
        .collect()
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else if v == 0.0 {
        "0".into()
    } else {
        format!("{v:.3e}")
    }
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// Renders a comparison as plain text: a status line, one table row per output (name, max
/// abs, mean abs, max rel, cosine, SNR dB, top-1, status) and one line per failed gate. Ends
/// with a newline.
pub fn format_table(c: &Comparison) -> String {
    let mut out = String::new();
    let status = match &c.status {
        Verification::Checked => "checked: every gate holds".to_string(),
        Verification::Failed => format!("FAILED: {} gate(s) broken", c.failures.len()),
        Verification::Unverified { reason, .. } => format!("unverified: {reason}"),
        Verification::CandidateFailed { reason, .. } => format!("CANDIDATE FAILED: {reason}"),
    };
    out.push_str(&status);
    out.push('\n');
    if let (Some(first), Some(last)) = (c.input_sets.first(), c.input_sets.last()) {
        out.push_str(&format!(
            "over {} input sets ({first} .. {last}): max abs and max rel the largest, cosine and SNR the lowest set's, mean abs and top-1 over all of them\n",
            c.input_sets.len()
        ));
    }
    if !c.outputs.is_empty() {
        let header = [
            "output", "max abs", "mean abs", "max rel", "cosine", "SNR dB", "top-1", "status",
        ];
        let mut rows: Vec<[String; 8]> = vec![header.map(String::from)];
        for o in &c.outputs {
            let failed: Vec<&str> = c
                .failures
                .iter()
                .filter(|f| f.output == o.name)
                .map(|f| match f.gate {
                    GateKind::Comparable => "not comparable",
                    GateKind::Allclose => "allclose",
                    GateKind::MinCosine => "cosine",
                    GateKind::MaxAccuracyDrop => "top-1 drop",
                    GateKind::IntegerMismatch => "integer mismatch",
                })
                .collect();
            let mut row_status = match (&o.problem, failed.is_empty()) {
                (Some(p), _) => p.clone(),
                (None, true) => "ok".to_string(),
                (None, false) => format!("FAIL {}", failed.join(", ")),
            };
            // Values that compare well in another type are still an interface change.
            if let Some(c) = o
                .candidate
                .as_ref()
                .filter(|c| c.dtype != o.reference.dtype)
            {
                if o.problem.is_none() {
                    row_status.push_str(&format!(", dtype {} -> {}", o.reference.dtype, c.dtype));
                }
            }
            // A row without figures: the name, dashes and the status.
            let no_figures = |status: String| -> [String; 8] {
                let mut r: [String; 8] = Default::default();
                r[0] = o.name.clone();
                for cell in r.iter_mut().take(7).skip(1) {
                    *cell = "-".into();
                }
                r[7] = status;
                r
            };
            let row = match &o.values {
                // Nothing was compared (a note says so): no figure, not "ok".
                Some(v) if v.elements == 0 => no_figures("empty: not compared".into()),
                Some(v) => [
                    o.name.clone(),
                    fmt_num(v.max_abs),
                    fmt_num(v.mean_abs),
                    fmt_num(v.max_rel),
                    fmt_opt(v.cosine, |x| {
                        if x.is_finite() {
                            format!("{x:.6}")
                        } else {
                            fmt_num(x)
                        }
                    }),
                    fmt_opt(v.snr_db, |x| {
                        if x.is_finite() {
                            format!("{x:.1}")
                        } else {
                            fmt_num(x)
                        }
                    }),
                    fmt_opt(v.top1_agreement, |x| format!("{:.1}%", 100.0 * x)),
                    row_status,
                ],
                None => no_figures(row_status),
            };
            rows.push(row);
        }
        let mut widths = [0usize; 8];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in &rows {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                if i == 0 {
                    line.push_str(&format!("{cell:<w$}"));
                } else if i == 7 {
                    line.push_str(&format!("  {cell}"));
                } else {
                    line.push_str(&format!("  {cell:>w$}"));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    for o in &c.outputs {
        if let Some(v) = o.values.as_ref().filter(|_| c.input_sets.len() > 1) {
            let mut at = vec![];
            if let Some(set) = &v.cosine_set {
                at.push(format!("lowest cosine on {set}"));
            }
            if let (Some(set), true) = (&v.worst_set, v.max_abs != 0.0) {
                at.push(format!("largest |a - b| on {set}"));
            }
            if !at.is_empty() {
                out.push_str(&format!("  {}: {}\n", o.name, at.join(", ")));
            }
        }
    }
    for f in &c.failures {
        out.push_str(&f.message);
        out.push('\n');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
