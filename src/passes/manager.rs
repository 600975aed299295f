//! Runs a pipeline: consecutive exact passes repeat to a fixed point (capped), lossy passes
//! run once, every pass is timed and its changes counted, and the IR is validated after each
//! pass when asked (always in tests and debug builds).

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::eliminate_unused_initializers::{read_initializers, remove_unused};
use super::{Pass, PassKind, PassOptions};
use crate::ir::{validate::validate, Model};
use crate::report::Reporter;

/// Most rounds of a group of exact passes before the manager stops looking for a fixed point.
pub const FIXED_POINT_CAP: usize = 8;

/// What one pipeline entry did, summed over its rounds.
#[derive(Debug, Clone, Serialize)]
pub struct PassRecord {
    /// Pass name.
    pub name: String,
    /// `exact`, `exact up to rounding` or `lossy`.
    pub kind: String,
    /// Wall time in milliseconds, all rounds.
    pub time_ms: f64,
    /// Changes made, all rounds.
    pub changes: usize,
    /// Rounds run.
    pub rounds: usize,
    /// Notes from the pass (deduplicated, in first-seen order).
    pub notes: Vec<String>,
    /// What it changed (lossy passes: one line per weight or node).
    pub touched: Vec<String>,
}

/// Runs `passes` on `model` in order.
///
/// Errors: a pass fails (the error names the pass), or validation after a pass fails (a bug in
/// that pass: the error names it and lists the broken invariants).
pub fn run_pipeline(
    model: &mut Model,
    passes: &[&'static dyn Pass],
    opts: &PassOptions,
    validate_each: bool,
    reporter: &dyn Reporter,
) -> Result<Vec<PassRecord>> {
    let validate_each = validate_each || cfg!(debug_assertions);
    // A model an edit left invalid is refused before any pass, which would otherwise be
    // blamed for it (or panic on it).
    if validate_each && !passes.is_empty() {
        crate::ir::validate::validate(model)
            .context("the model given to the passes is invalid (before any pass ran)")?;
    }
    let mut records: Vec<PassRecord> = passes
        .iter()
        .map(|p| PassRecord {
            name: p.name().to_string(),
            kind: p.kind().label().to_string(),
            time_ms: 0.0,
            changes: 0,
            rounds: 0,
            notes: Vec::new(),
            touched: Vec::new(),
        })
        .collect();
    let mut i = 0;
    while i < passes.len() {
        // A group: a run of non-lossy passes, or one lossy pass.
        let lossy = matches!(passes[i].kind(), PassKind::Lossy { .. });
        let mut j = i + 1;
        if !lossy {
            while j < passes.len() && !matches!(passes[j].kind(), PassKind::Lossy { .. }) {
                j += 1;
            }
        }
        let cap = if lossy { 1 } else { FIXED_POINT_CAP };
        for _round in 0..cap {
            let mut changed = 0;
            for k in i..j {
                let p = passes[k];
                reporter.phase(&format!("pass {}", p.name()));
                let t = Instant::now();
                let read_before = lossy.then(|| read_initializers(model));
                let mut stats = p
                    .run(model, opts)
                    .with_context(|| format!("pass {} failed", p.name()))?;
                // The weights the lossy pass replaced go with it, whatever passes follow.
                // First, so that a summary listing only some notes still shows it.
                if lossy && stats.changes == 0 {
                    let why = if stats.notes.is_empty() {
                        let fallback = opts.keep_float.len();
                        format!(
                            "no{} node has what this pass rewrites in a form it takes{}",
                            if opts.selection_given() || fallback > 0 {
                                " selected"
                            } else {
                                ""
                            },
                            if fallback > 0 {
                                format!(" ({fallback} layer(s) kept in float by the accuracy-gated fallback)")
                            } else {
                                String::new()
                            }
                        )
                    } else {
                        "the notes that follow say why each candidate was left".to_string()
                    };
                    stats.notes.insert(0, format!("changed nothing: {why}"));
                }
                if let Some(before) = read_before {
                    let (n, bytes) = remove_unused(model, |name| before.contains(name));
                    if n > 0 {
                        stats.notes.push(format!(
                            "{n} float initializer(s) only the rewritten nodes read were removed ({bytes} bytes)"
                        ));
                    }
                }
                let rec = &mut records[k];
                rec.time_ms += t.elapsed().as_secs_f64() * 1e3;
                rec.rounds += 1;
                rec.changes += stats.changes;
                for n in stats.notes {
                    if !rec.notes.contains(&n) {
                        rec.notes.push(n);
                    }
                }
                rec.touched.extend(stats.touched);
                changed += stats.changes;
                if validate_each {
                    validate(model).with_context(|| {
                        format!(
                            "the graph is invalid after pass {} (a bug in that pass)",
                            p.name()
                        )
                    })?;
                }
                reporter.phase_done();
            }
            if changed == 0 {
                break;
            }
        }
        i = j;
    }
    Ok(records)
}
