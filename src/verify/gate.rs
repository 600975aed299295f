//! Accuracy gates: the limits a candidate's outputs must meet.
//!
//! The elementwise tolerance is evaluated inside [`metrics`](super::metrics) (it needs every
//! element); [`Gates::tolerance`] hands it there, and [`check`] reads the recorded result.

use std::fmt;

use serde::Serialize;

use super::metrics::{OutputMetrics, Tolerance};

/// The limits to check. A gate that is `None` is not checked.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Gates {
    /// Absolute tolerance of the elementwise check `|a - b| <= atol + rtol |a|` (as
    /// `numpy.allclose`, `a` the reference); 0 when only `rtol` is given.
    pub atol: Option<f64>,
    /// Relative tolerance of the same check; 0 when only `atol` is given.
    pub rtol: Option<f64>,
    /// Smallest acceptable cosine similarity per float output (integer outputs have none).
    pub min_cosine: Option<f64>,
    /// Largest acceptable accuracy drop per output with a top-1 (classification-like last
    /// axis): `1 - top1_agreement`, the fraction of rows whose argmax changed, since no labels
    /// are at hand (`--max-accuracy-drop`).
    pub max_accuracy_drop: Option<f64>,
    /// Largest acceptable fraction of elements that differ, per integer or bool output without
    /// an elementwise tolerance of its own (cosine and top-1 do not apply to those): 0 in a
    /// lossless pipeline, `--max-accuracy-drop` in a lossy one (see
    /// `optimize::default_gates`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_integer_mismatch: Option<f64>,
    /// Tolerances of named outputs (`--atol NAME:X`, `--rtol NAME:X`, as Polygraphy's), in
    /// place of `atol`/`rtol` for those outputs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_tolerances: Vec<OutputTolerance>,
}

/// The elementwise tolerance of one named output.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputTolerance {
    /// Graph output name.
    pub output: String,
    /// Its tolerance.
    #[serde(flatten)]
    pub tolerance: Tolerance,
}

impl Gates {
    /// Checks every limit is a number in its range, as the CLI's options are: tolerances
    /// finite and not negative, `min_cosine` in [-1, 1], the fractions in [0, 1]. A NaN
    /// would turn its gate off without a word.
    ///
    /// Errors: every limit out of range, one per line, naming its option.
    pub fn check(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        let mut within = |what: String, v: Option<f64>, lo: f64, hi: f64| {
            if let Some(v) = v.filter(|v| !(v.is_finite() && (lo..=hi).contains(v))) {
                problems.push(format!("{what} is {v}, not a number in [{lo}, {hi}]"));
            }
        };
        within("--atol".into(), self.atol, 0.0, f64::MAX);
        within("--rtol".into(), self.rtol, 0.0, f64::MAX);
        within("--min-cosine".into(), self.min_cosine, -1.0, 1.0);
        within(
            "--max-accuracy-drop".into(),
            self.max_accuracy_drop,
            0.0,
            1.0,
        );
        within(
            "the integer mismatch limit".into(),
            self.max_integer_mismatch,
            0.0,
            1.0,
        );
        for t in &self.output_tolerances {
            let name = &t.output;
            within(
                format!("--atol {name}:"),
                Some(t.tolerance.atol),
                0.0,
                f64::MAX,
            );
            within(
                format!("--rtol {name}:"),
                Some(t.tolerance.rtol),
                0.0,
                f64::MAX,
            );
        }
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
        Ok(())
    }

    /// The elementwise tolerance of outputs not named in `output_tolerances`, when `atol` or
    /// `rtol` is set.
    pub fn tolerance(&self) -> Option<Tolerance> {
        if self.atol.is_none() && self.rtol.is_none() {
            return None;
        }
        Some(Tolerance {
            atol: self.atol.unwrap_or(0.0),
            rtol: self.rtol.unwrap_or(0.0),
        })
    }

    /// The elementwise tolerance of the output `name`: its own, else [`Gates::tolerance`].
    pub fn tolerance_for(&self, name: &str) -> Option<Tolerance> {
        self.output_tolerances
            .iter()
            .find(|t| t.output == name)
            .map(|t| t.tolerance)
            .or_else(|| self.tolerance())
    }

    /// Whether any output has an elementwise tolerance.
    pub fn has_tolerance(&self) -> bool {
        self.tolerance().is_some() || !self.output_tolerances.is_empty()
    }
}

/// Checks that every output named in `gates.output_tolerances` is a graph output of `graph`
/// (the model read from `path`).
///
/// Errors: names every one that is not, with the graph outputs there are.
pub fn check_output_names(
    gates: &Gates,
    graph: &crate::ir::Graph,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let outputs: Vec<&str> = graph
        .outputs
        .iter()
        .map(|o| graph.value(o.value).name.as_str())
        .collect();
    let unknown: Vec<&str> = gates
        .output_tolerances
        .iter()
        .map(|t| t.output.as_str())
        .filter(|n| !outputs.contains(n))
        .collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "{}: --atol/--rtol name {} but the graph outputs are {}",
        path.display(),
        unknown
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", "),
        outputs
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Which gate failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateKind {
    /// The outputs could not be compared at all (missing output, shape mismatch, unreadable
    /// dtype). Always checked.
    Comparable,
    /// `|a - b| <= atol + rtol |a|` on every element.
    Allclose,
    /// cosine >= `min_cosine`.
    MinCosine,
    /// 1 - top-1 agreement <= `max_accuracy_drop`.
    MaxAccuracyDrop,
    /// The fraction of an integer output's elements that differ <= `max_integer_mismatch`.
    IntegerMismatch,
}

/// One failed gate on one output.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateFailure {
    /// Graph output name.
    pub output: String,
    /// The gate.
    pub gate: GateKind,
    /// The measured value: for `Allclose` |a - b| at the element furthest outside, for
    /// `MinCosine` the cosine; `None` for `Comparable`.
    #[serde(serialize_with = "crate::verify::metrics::ser_opt_f64")]
    pub measured: Option<f64>,
    /// The limit it broke: `atol + rtol |a|` at that element, or `min_cosine`.
    #[serde(serialize_with = "crate::verify::metrics::ser_opt_f64")]
    pub limit: Option<f64>,
    /// Where: the element furthest outside the tolerance (`Allclose`) or with the largest
    /// |a - b| (`MinCosine`); empty for `Comparable`.
    pub index: Vec<usize>,
    /// Reference value at `index`.
    #[serde(serialize_with = "crate::verify::metrics::ser_opt_f64")]
    pub a: Option<f64>,
    /// Candidate value at `index`.
    #[serde(serialize_with = "crate::verify::metrics::ser_opt_f64")]
    pub b: Option<f64>,
    /// One line for a person, naming all of the above.
    pub message: String,
}

impl fmt::Display for GateFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// ` of input set NAME` for a figure of one set among several, else nothing.
fn of_set(set: &Option<String>) -> String {
    set.as_ref()
        .map(|s| format!(" of input set {s}"))
        .unwrap_or_default()
}

/// Checks every output against the gates; returns one failure per output and broken gate, in
/// output order. Outputs that could not be compared always fail.
pub fn check(gates: &Gates, outputs: &[OutputMetrics]) -> Vec<GateFailure> {
    let mut failures = vec![];
    for out in outputs {
        let name = &out.name;
        let Some(v) = &out.values else {
            let problem = out.problem.as_deref().unwrap_or("no values to compare");
            failures.push(GateFailure {
                output: name.clone(),
                gate: GateKind::Comparable,
                measured: None,
                limit: None,
                index: vec![],
                a: None,
                b: None,
                message: format!("output `{name}`: {problem}"),
            });
            continue;
        };
        if let (Some(_), Some(ac)) = (gates.tolerance_for(name), &v.allclose) {
            if ac.violations > 0 {
                failures.push(GateFailure {
                    output: name.clone(),
                    gate: GateKind::Allclose,
                    measured: Some(ac.error),
                    limit: Some(ac.allowed),
                    index: ac.worst_index.clone(),
                    a: Some(ac.a),
                    b: Some(ac.b),
                    message: format!(
                        "output `{name}`: {} of {} elements outside atol {:e} + rtol {:e} * |a|; \
                         worst at {:?}{}: |a - b| = {:.4e} > {:.4e} (a = {}, b = {})",
                        ac.violations,
                        v.elements,
                        ac.tolerance.atol,
                        ac.tolerance.rtol,
                        ac.worst_index,
                        of_set(&ac.set),
                        ac.error,
                        ac.allowed,
                        ac.a,
                        ac.b
                    ),
                });
            }
        }
        let tolerance = gates.tolerance_for(name).is_some();
        if let (Some(max), true, false) = (gates.max_integer_mismatch, v.integer, tolerance) {
            let fraction = if v.elements == 0 {
                0.0
            } else {
                v.mismatches as f64 / v.elements as f64
            };
            if fraction > max {
                failures.push(GateFailure {
                    output: name.clone(),
                    gate: GateKind::IntegerMismatch,
                    measured: Some(fraction),
                    limit: Some(max),
                    index: v.worst_index.clone(),
                    a: Some(v.worst_a),
                    b: Some(v.worst_b),
                    message: format!(
                        "output `{name}`: {} of {} integer elements differ (fraction {fraction:.4} > {max}); largest difference at {:?}{}: a = {}, b = {}",
                        v.mismatches,
                        v.elements,
                        v.worst_index,
                        of_set(&v.worst_set),
                        v.worst_a,
                        v.worst_b
                    ),
                });
            }
        }
        if let (Some(max), Some(top1)) = (gates.max_accuracy_drop, v.top1_agreement) {
            let drop = 1.0 - top1;
            if drop > max {
                failures.push(GateFailure {
                    output: name.clone(),
                    gate: GateKind::MaxAccuracyDrop,
                    measured: Some(drop),
                    limit: Some(max),
                    index: v.worst_index.clone(),
                    a: Some(v.worst_a),
                    b: Some(v.worst_b),
                    message: format!(
                        "output `{name}`: top-1 agreement {:.2}% is a drop of {:.4} > {max}",
                        top1 * 100.0,
                        drop
                    ),
                });
            }
        }
        if let (Some(min), Some(cos)) = (gates.min_cosine, v.cosine) {
            if cos.is_nan() || cos < min {
                failures.push(GateFailure {
                    output: name.clone(),
                    gate: GateKind::MinCosine,
                    measured: Some(cos),
                    limit: Some(min),
                    index: v.worst_index.clone(),
                    a: Some(v.worst_a),
                    b: Some(v.worst_b),
                    message: format!(
                        "output `{name}`: cosine {cos:.6}{} < {min}; largest error at {:?}{}: a = {}, b = {} (|a - b| = {:.4e})",
                        of_set(&v.cosine_set).replace(" of", " on"),
                        v.worst_index,
                        of_set(&v.worst_set),
                        v.worst_a,
                        v.worst_b,
                        v.max_abs
                    ),
                });
            }
        }
    }
    failures
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::verify::metrics::{compare, missing};
    use tract_onnx::prelude::Tensor;

    fn t32(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_shape(shape, v).unwrap()
    }

    /// NaN and infinities in a failure are the strings the check's values use (`"nan"`,
    /// `"inf"`), not `null` (which serde_json writes for them).
    #[test]
    fn a_failure_writes_nan_and_infinities_as_strings() {
        let f = GateFailure {
            output: "y".into(),
            gate: GateKind::MinCosine,
            measured: Some(f64::NAN),
            limit: Some(0.99),
            index: vec![0],
            a: Some(f64::INFINITY),
            b: Some(f64::NEG_INFINITY),
            message: String::new(),
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(
            (&v["measured"], &v["limit"], &v["a"], &v["b"]),
            (
                &serde_json::json!("nan"),
                &serde_json::json!(0.99),
                &serde_json::json!("inf"),
                &serde_json::json!("-inf")
            )
        );
    }

    #[test]
    fn allclose_failure_names_output_and_index() {
        let gates = Gates {
            atol: Some(1e-3),
            rtol: None,
            min_cosine: None,
            max_accuracy_drop: None,
            ..Default::default()
        };
        let a = t32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let b = t32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.5, 5.0]);
        let rows = vec![
            compare("logits", &a, &b, gates.tolerance()),
            compare("same", &a, &a, gates.tolerance()),
        ];
        let failures = check(&gates, &rows);
        assert_eq!(failures.len(), 1);
        let f = &failures[0];
        assert_eq!(f.output, "logits");
        assert_eq!(f.gate, GateKind::Allclose);
        assert_eq!(f.index, vec![1, 1]);
        assert_eq!((f.a, f.b), (Some(4.0), Some(4.5)));
        assert_eq!(f.measured, Some(0.5));
        assert_eq!(f.limit, Some(1e-3));
        assert!(
            f.message.contains("`logits`") && f.message.contains("[1, 1]"),
            "{}",
            f.message
        );
    }

    #[test]
    fn min_cosine_failure_names_worst_element() {
        let gates = Gates {
            atol: None,
            rtol: None,
            min_cosine: Some(0.99),
            max_accuracy_drop: None,
            ..Default::default()
        };
        let a = t32(&[2], &[1.0, 0.0]);
        let b = t32(&[2], &[0.0, 1.0]);
        let failures = check(&gates, &[compare("y", &a, &b, gates.tolerance())]);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].gate, GateKind::MinCosine);
        assert_eq!(failures[0].measured, Some(0.0));
        assert_eq!(failures[0].index, vec![0]);
        // No gates: nothing fails.
        assert!(check(&Gates::default(), &[compare("y", &a, &b, None)]).is_empty());
    }

    #[test]
    fn a_named_output_tolerance_takes_the_place_of_the_default() {
        let t = |atol: f64| Tolerance { atol, rtol: 0.0 };
        let gates = Gates {
            atol: Some(0.5),
            output_tolerances: vec![OutputTolerance {
                output: "p".into(),
                tolerance: t(0.01),
            }],
            ..Default::default()
        };
        assert_eq!(gates.tolerance_for("p"), Some(t(0.01)));
        assert_eq!(gates.tolerance_for("state"), Some(t(0.5)));
        let a = t32(&[1], &[0.5]);
        let b = t32(&[1], &[0.55]);
        // 0.05 off: outside p's 0.01, inside the default 0.5.
        let rows = [
            compare("p", &a, &b, gates.tolerance_for("p")),
            compare("state", &a, &b, gates.tolerance_for("state")),
        ];
        let failures = check(&gates, &rows);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].output, "p");
        assert_eq!(failures[0].gate, GateKind::Allclose);
        // Named only: the other outputs have no tolerance.
        let named = Gates {
            atol: None,
            ..gates
        };
        assert_eq!(named.tolerance_for("state"), None);
        assert!(named.has_tolerance());
    }

    #[test]
    fn nan_cosine_fails_the_cosine_gate() {
        let gates = Gates {
            atol: None,
            rtol: None,
            min_cosine: Some(0.5),
            max_accuracy_drop: None,
            ..Default::default()
        };
        let failures = check(
            &gates,
            &[compare(
                "y",
                &t32(&[2], &[1.0, 2.0]),
                &t32(&[2], &[1.0, f32::NAN]),
                None,
            )],
        );
        assert_eq!(failures.len(), 1);
        assert!(failures[0].measured.unwrap().is_nan());
    }

    #[test]
    fn missing_or_mismatched_outputs_always_fail() {
        let a = t32(&[2], &[1.0, 2.0]);
        let rows = vec![
            missing("gone", &a),
            compare("reshaped", &a, &t32(&[1, 2], &[1.0, 2.0]), None),
        ];
        let failures = check(&Gates::default(), &rows);
        assert_eq!(failures.len(), 2);
        assert!(failures.iter().all(|f| f.gate == GateKind::Comparable));
        assert!(
            failures[0].message.contains("gone") && failures[1].message.contains("shape mismatch")
        );
    }

    /// Limits the CLI refuses are refused for library callers too (a NaN turned its gate
    /// off: a failing model passed).
    #[test]
    fn limits_out_of_range_are_refused_together() {
        assert!(Gates::default().check().is_ok());
        let ok = Gates {
            atol: Some(0.0),
            rtol: Some(1e-3),
            min_cosine: Some(-1.0),
            max_accuracy_drop: Some(1.0),
            max_integer_mismatch: Some(0.0),
            ..Default::default()
        };
        assert!(ok.check().is_ok());
        let bad = Gates {
            atol: Some(-1.0),
            min_cosine: Some(f64::NAN),
            max_accuracy_drop: Some(1.5),
            output_tolerances: vec![OutputTolerance {
                output: "y".into(),
                tolerance: Tolerance {
                    atol: 0.0,
                    rtol: f64::INFINITY,
                },
            }],
            ..Default::default()
        };
        let msg = format!("{:#}", bad.check().unwrap_err());
        for want in [
            "--atol is -1",
            "--min-cosine is NaN",
            "--max-accuracy-drop is 1.5",
            "--rtol y: is inf",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
    }

    #[test]
    fn tolerance_defaults_the_missing_half_to_zero() {
        assert_eq!(Gates::default().tolerance(), None);
        let g = Gates {
            atol: None,
            rtol: Some(0.1),
            min_cosine: None,
            max_accuracy_drop: None,
            ..Default::default()
        };
        assert_eq!(
            g.tolerance(),
            Some(Tolerance {
                atol: 0.0,
                rtol: 0.1
            })
        );
    }
}
