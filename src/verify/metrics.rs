//! Error metrics between a reference output `a` and a candidate output `b`.
//!
//! Both tensors are read as f64 (f16, f32, f64, signed and unsigned integers, bool as 0/1,
//! tract `TDim` as int64). Per element the absolute error is
//! - 0 when `a == b` (so equal infinities agree) or both are NaN (NaN agrees with NaN),
//! - +inf when exactly one of them is NaN (a NaN where the other side has a number is an
//!   infinite error),
//! - `|a - b|` otherwise (+inf when one side is infinite and the other is not).
//!
//! Sums are taken in f64 over fixed chunks (in parallel with rayon) and combined in chunk
//! order, so the figures do not depend on thread scheduling.

use rayon::prelude::*;
use serde::{Serialize, Serializer};
use tract_onnx::prelude::{DatumType, Tensor};

/// Denominator floor of the relative error: `|a - b| / max(|a|, TINY)`; the smallest normal f32.
pub const TINY: f64 = f32::MIN_POSITIVE as f64;

/// Elements per rayon task.
const CHUNK: usize = 1 << 16;

/// Elementwise tolerance in the sense of `numpy.allclose(b, a, rtol, atol)` with `a` the
/// reference: element i passes when `|a_i - b_i| <= atol + rtol * |a_i|`. Unlike numpy, NaN in
/// both at the same place passes; an infinite error never passes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Tolerance {
    /// Absolute tolerance, in output units.
    pub atol: f64,
    /// Relative tolerance, a fraction of `|a|`.
    pub rtol: f64,
}

impl Tolerance {
    /// The error allowed at reference value `a`: `atol + rtol |a|`.
    pub fn allowed(&self, a: f64) -> f64 {
        self.atol + self.rtol * a.abs()
    }

    /// Whether the error `err` (see [`abs_error`]) at reference value `a` is outside the
    /// tolerance: an infinite error always is.
    pub fn violated(&self, a: f64, err: f64) -> bool {
        err.is_infinite() || err > self.allowed(a)
    }
}

/// Dtype and shape of one side of a comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorSummary {
    /// tract datum type, e.g. `F32`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSummary {
    /// The dtype and shape of `t`.
    pub fn of(t: &Tensor) -> TensorSummary {
        TensorSummary {
            dtype: format!("{:?}", t.datum_type()),
            shape: t.shape().to_vec(),
        }
    }
}

/// The comparison of one output.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputMetrics {
    /// Graph output name.
    pub name: String,
    /// The reference output's dtype and shape.
    pub reference: TensorSummary,
    /// The candidate output's dtype and shape; `None` when the candidate has no such output.
    pub candidate: Option<TensorSummary>,
    /// Why the values could not be compared: `shape mismatch`, `missing in candidate`, an
    /// unsupported dtype. `None` when `values` is set.
    pub problem: Option<String>,
    /// The figures, when both sides could be compared.
    pub values: Option<ValueMetrics>,
}

/// Figures over all elements of one output. Non-finite figures serialize as the strings
/// `"inf"`, `"-inf"` and `"nan"`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ValueMetrics {
    /// Number of elements compared.
    pub elements: usize,
    /// Both sides are integer or bool: cosine, SNR and top-1 do not apply.
    pub integer: bool,
    /// max |a - b|.
    #[serde(serialize_with = "ser_f64")]
    pub max_abs: f64,
    /// mean |a - b| (0 for an empty tensor).
    #[serde(serialize_with = "ser_f64")]
    pub mean_abs: f64,
    /// max |a - b| / max(|a|, [`TINY`]).
    #[serde(serialize_with = "ser_f64")]
    pub max_rel: f64,
    /// sum(a b) / sqrt(sum a^2 sum b^2); 1 when both are all zero, 0 when only one is;
    /// `None` for integer outputs.
    #[serde(serialize_with = "ser_opt_f64")]
    pub cosine: Option<f64>,
    /// 10 log10(sum a^2 / sum (a - b)^2) in dB, +inf when equal (NaN pairs that agree are left
    /// out, NaN in `a` adds no signal); `None` for integer outputs.
    #[serde(serialize_with = "ser_opt_f64")]
    pub snr_db: Option<f64>,
    /// Fraction of rows (all axes but the last) whose argmax over the last axis agrees (first
    /// maximum wins, a NaN counts as the maximum, as in `numpy.argmax`); `None` for integer
    /// outputs, rank 0, a last dim of 1 or no rows.
    #[serde(serialize_with = "ser_opt_f64")]
    pub top1_agreement: Option<f64>,
    /// Number of elements whose error is not 0.
    pub mismatches: usize,
    /// Index of the element with the largest |a - b| (first one on ties); empty for an empty
    /// tensor.
    pub worst_index: Vec<usize>,
    /// Reference value there.
    #[serde(serialize_with = "ser_f64")]
    pub worst_a: f64,
    /// Candidate value there.
    #[serde(serialize_with = "ser_f64")]
    pub worst_b: f64,
    /// The elementwise tolerance check, when a tolerance was given.
    pub allclose: Option<AllClose>,
    /// Over several input sets ([`merge_values`]): the set `worst_index` is in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst_set: Option<String>,
    /// Over several input sets: the set with the lowest cosine, the one reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine_set: Option<String>,
}

/// Result of the elementwise tolerance check.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AllClose {
    /// The tolerance checked.
    pub tolerance: Tolerance,
    /// Number of elements outside the tolerance.
    pub violations: usize,
    /// Index of the element furthest outside (largest `|a-b| - (atol + rtol |a|)`, an infinite
    /// error first); empty when there is no violation.
    pub worst_index: Vec<usize>,
    /// Reference value there.
    #[serde(serialize_with = "ser_f64")]
    pub a: f64,
    /// Candidate value there.
    #[serde(serialize_with = "ser_f64")]
    pub b: f64,
    /// |a - b| there.
    #[serde(serialize_with = "ser_f64")]
    pub error: f64,
    /// atol + rtol |a| there.
    #[serde(serialize_with = "ser_f64")]
    pub allowed: f64,
    /// Over several input sets ([`merge_values`]): the set `worst_index` is in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
}

/// Serializes a float as a JSON number, or as the string `"nan"`, `"inf"` or `"-inf"`
/// (JSON has no such numbers; serde_json would write `null`).
pub(crate) fn ser_f64<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else if v.is_nan() {
        s.serialize_str("nan")
    } else if *v > 0.0 {
        s.serialize_str("inf")
    } else {
        s.serialize_str("-inf")
    }
}

/// [`ser_f64`] of an optional float (`None`: `null`).
pub(crate) fn ser_opt_f64<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => ser_f64(v, s),
        None => s.serialize_none(),
    }
}

/// Whether a reference value `x` and a candidate value `y` agree although not finite (both
/// NaN, or equal infinities): such pairs are left out of the cosine and the error powers, where
/// `inf * inf / sqrt(inf * inf)` would make them NaN.
pub(crate) fn agree_non_finite(x: f64, y: f64) -> bool {
    (x.is_nan() && y.is_nan()) || (x.is_infinite() && x == y)
}

/// Cosine similarity from its sums: `dot / sqrt(norm_a norm_b)` with one square root (equal
/// vectors give exactly 1, where `sqrt(norm_a) sqrt(norm_b)` can round below it), clamped to
/// [-1, 1]; 1 when both norms are 0, 0 when one is.
pub(crate) fn cosine_of(dot: f64, norm_a: f64, norm_b: f64) -> f64 {
    if norm_a == 0.0 && norm_b == 0.0 {
        1.0
    } else if norm_a == 0.0 || norm_b == 0.0 {
        0.0
    } else {
        let product = norm_a * norm_b;
        let denominator = if product.is_finite() && product > 0.0 {
            product.sqrt()
        } else {
            norm_a.sqrt() * norm_b.sqrt()
        };
        (dot / denominator).clamp(-1.0, 1.0)
    }
}

/// Compares one output. Shapes must be equal (no broadcasting); otherwise, or when a dtype
/// cannot be read as numbers, the row carries a `problem` and no values.
pub fn compare(
    name: &str,
    reference: &Tensor,
    candidate: &Tensor,
    tolerance: Option<Tolerance>,
) -> OutputMetrics {
    let mut row = OutputMetrics {
        name: name.to_string(),
        reference: TensorSummary::of(reference),
        candidate: Some(TensorSummary::of(candidate)),
        problem: None,
        values: None,
    };
    if reference.shape() != candidate.shape() {
        row.problem = Some(format!(
            "shape mismatch: reference {:?}, candidate {:?}",
            reference.shape(),
            candidate.shape()
        ));
        return row;
    }
    // An integer or bool output that became float, or the reverse, is a changed interface,
    // whatever the values (float16 for float32 is a conversion the user asked for).
    let (rd, cd) = (reference.datum_type(), candidate.datum_type());
    if is_integer(rd) != is_integer(cd) {
        row.problem = Some(format!("type changed: reference {rd:?}, candidate {cd:?}"));
        return row;
    }
    // Strings (labels of a classifier's output) are equal or not: compared as an integer
    // output of 0 where they are equal, 1 where they differ, against 0.
    if rd == DatumType::String && cd == DatumType::String {
        if let (Ok(x), Ok(y)) = (
            reference
                .try_as_plain_ram()
                .and_then(|t| t.as_slice::<String>()),
            candidate
                .try_as_plain_ram()
                .and_then(|t| t.as_slice::<String>()),
        ) {
            let differ: Vec<f64> = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(u8::from(p != q)))
                .collect();
            let zeros = vec![0.0; differ.len()];
            // A tolerance asked for the output holds only where the strings are equal.
            let exact = tolerance.map(|_| Tolerance {
                atol: 0.0,
                rtol: 0.0,
            });
            let mut v = compare_values(&zeros, &differ, reference.shape(), true, exact);
            // No relative error between labels: 1 where they differ, as the absolute one.
            v.max_rel = v.max_abs;
            row.values = Some(v);
            return row;
        }
    }
    let (a, b) = match (to_f64(reference), to_f64(candidate)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) => {
            row.problem = Some(format!("reference: {e}"));
            return row;
        }
        (_, Err(e)) => {
            row.problem = Some(format!("candidate: {e}"));
            return row;
        }
    };
    let integer = is_integer(reference.datum_type()) && is_integer(candidate.datum_type());
    row.values = Some(compare_values(
        &a,
        &b,
        reference.shape(),
        integer,
        tolerance,
    ));
    // f64 holds integers exactly up to 2^53 only: count an integer output's mismatches on the
    // integers themselves (u64 values map to i64 one to one).
    if integer {
        if let (Ok(x), Ok(y), Some(v)) = (
            reference.cast_to::<i64>(),
            candidate.cast_to::<i64>(),
            row.values.as_mut(),
        ) {
            if let (Ok(x), Ok(y)) = (x.try_as_plain_ram(), y.try_as_plain_ram()) {
                if let (Ok(x), Ok(y)) = (x.as_slice::<i64>(), y.as_slice::<i64>()) {
                    v.mismatches = x.iter().zip(y).filter(|(p, q)| p != q).count();
                }
            }
        }
    }
    row
}

/// The row for a reference output the candidate does not produce.
pub fn missing(name: &str, reference: &Tensor) -> OutputMetrics {
    OutputMetrics {
        name: name.to_string(),
        reference: TensorSummary::of(reference),
        candidate: None,
        problem: Some("missing in candidate".to_string()),
        values: None,
    }
}

fn is_integer(dt: DatumType) -> bool {
    let dt = dt.unquantized();
    dt.is_integer() || dt == DatumType::Bool || dt == DatumType::TDim
}

/// Reads a tensor's elements as f64, in C order.
///
/// # Errors
/// For dtypes that are not numbers (strings, complex, opaque blobs).
pub fn to_f64(t: &Tensor) -> Result<Vec<f64>, String> {
    fn conv<T>(t: &Tensor, f: impl Fn(T) -> f64 + Sync) -> Result<Vec<f64>, String>
    where
        T: tract_onnx::prelude::Datum + Copy + Sync,
    {
        let view = t.try_as_plain_ram().map_err(|e| format!("{e:#}"))?;
        let s = view.as_slice::<T>().map_err(|e| format!("{e:#}"))?;
        Ok(if s.len() >= CHUNK {
            s.par_iter().map(|&x| f(x)).collect()
        } else {
            s.iter().map(|&x| f(x)).collect()
        })
    }
    match t.datum_type().unquantized() {
        DatumType::F16 => conv::<half::f16>(t, |x| x.to_f64()),
        DatumType::F32 => conv::<f32>(t, f64::from),
        DatumType::F64 => conv::<f64>(t, |x| x),
        DatumType::I8 => conv::<i8>(t, f64::from),
        DatumType::I16 => conv::<i16>(t, f64::from),
        DatumType::I32 => conv::<i32>(t, f64::from),
        DatumType::I64 => conv::<i64>(t, |x| x as f64),
        DatumType::U8 => conv::<u8>(t, f64::from),
        DatumType::U16 => conv::<u16>(t, f64::from),
        DatumType::U32 => conv::<u32>(t, f64::from),
        DatumType::U64 => conv::<u64>(t, |x| x as f64),
        DatumType::Bool => conv::<bool>(t, |x| if x { 1.0 } else { 0.0 }),
        DatumType::TDim => {
            let t = t.cast_to::<i64>().map_err(|e| format!("{e:#}"))?;
            conv::<i64>(&t, |x| x as f64)
        }
        other => Err(format!("dtype {other:?} cannot be compared as numbers")),
    }
}

/// The elementwise absolute error (see the module doc).
pub fn abs_error(a: f64, b: f64) -> f64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        0.0
    } else if a.is_nan() || b.is_nan() {
        f64::INFINITY
    } else {
        (a - b).abs()
    }
}

/// Per-chunk partial sums and extrema.
#[derive(Clone, Copy, Debug)]
struct Partial {
    max_err: f64,
    max_err_at: usize,
    sum_err: f64,
    max_rel: f64,
    dot: f64,
    norm_a: f64,
    norm_b: f64,
    signal: f64,
    noise: f64,
    mismatches: usize,
    violations: usize,
    worst_excess: f64,
    worst_excess_at: Option<usize>,
}

impl Partial {
    const EMPTY: Partial = Partial {
        max_err: f64::NEG_INFINITY,
        max_err_at: 0,
        sum_err: 0.0,
        max_rel: 0.0,
        dot: 0.0,
        norm_a: 0.0,
        norm_b: 0.0,
        signal: 0.0,
        noise: 0.0,
        mismatches: 0,
        violations: 0,
        worst_excess: f64::NEG_INFINITY,
        worst_excess_at: None,
    };

    fn over(a: &[f64], b: &[f64], base: usize, tol: Option<Tolerance>) -> Partial {
        let mut p = Partial::EMPTY;
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            let err = abs_error(x, y);
            if err > p.max_err {
                p.max_err = err;
                p.max_err_at = base + i;
            }
            p.sum_err += err;
            let rel = if err == 0.0 {
                0.0
            } else {
                err / x.abs().max(TINY)
            };
            // A NaN reference makes |a| NaN; the error is then infinite and so is `rel`.
            let rel = if rel.is_nan() { f64::INFINITY } else { rel };
            p.max_rel = p.max_rel.max(rel);
            if err != 0.0 {
                p.mismatches += 1;
            }
            // Pairs that agree although not finite (NaN and NaN, equal infinities) are left
            // out of the cosine: inf * inf / sqrt(inf * inf) would make it NaN.
            if !agree_non_finite(x, y) {
                p.dot += x * y;
                p.norm_a += x * x;
                p.norm_b += y * y;
                if x.is_finite() {
                    p.signal += x * x;
                }
                p.noise += err * err;
            }
            if let Some(t) = tol {
                let allowed = t.allowed(x);
                if t.violated(x, err) {
                    p.violations += 1;
                    let excess = if err.is_infinite() {
                        f64::INFINITY
                    } else {
                        err - allowed
                    };
                    if excess > p.worst_excess {
                        p.worst_excess = excess;
                        p.worst_excess_at = Some(base + i);
                    }
                }
            }
        }
        p
    }

    /// Combines with the partial of the chunk that follows (ties keep the earlier index).
    fn then(self, next: Partial) -> Partial {
        let (max_err, max_err_at) = if next.max_err > self.max_err {
            (next.max_err, next.max_err_at)
        } else {
            (self.max_err, self.max_err_at)
        };
        let (worst_excess, worst_excess_at) = if next.worst_excess > self.worst_excess {
            (next.worst_excess, next.worst_excess_at)
        } else {
            (self.worst_excess, self.worst_excess_at)
        };
        Partial {
            max_err,
            max_err_at,
            sum_err: self.sum_err + next.sum_err,
            max_rel: self.max_rel.max(next.max_rel),
            dot: self.dot + next.dot,
            norm_a: self.norm_a + next.norm_a,
            norm_b: self.norm_b + next.norm_b,
            signal: self.signal + next.signal,
            noise: self.noise + next.noise,
            mismatches: self.mismatches + next.mismatches,
            violations: self.violations + next.violations,
            worst_excess,
            worst_excess_at,
        }
    }
}

/// C-order multi-index of flat position `flat` in `shape`.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &d) in index.iter_mut().zip(shape).rev() {
        if d > 0 {
            *slot = flat % d;
            flat /= d;
        }
    }
    index
}

/// Compares two equally long element lists of one output of `shape` (see [`ValueMetrics`]).
/// `integer` leaves out cosine, SNR and top-1; `tolerance` adds the elementwise check.
pub fn compare_values(
    a: &[f64],
    b: &[f64],
    shape: &[usize],
    integer: bool,
    tolerance: Option<Tolerance>,
) -> ValueMetrics {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let partials: Vec<Partial> = if n > CHUNK {
        a.par_chunks(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .enumerate()
            .map(|(c, (ca, cb))| Partial::over(ca, cb, c * CHUNK, tolerance))
            .collect()
    } else {
        vec![Partial::over(a, b, 0, tolerance)]
    };
    let p = partials.into_iter().fold(Partial::EMPTY, Partial::then);
    let empty = n == 0;
    let max_abs = if empty { 0.0 } else { p.max_err };
    let cosine = cosine_of(p.dot, p.norm_a, p.norm_b);
    let snr_db = if p.noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (p.signal / p.noise).log10()
    };
    let allclose = tolerance.map(|t| {
        let (worst_index, a_w, b_w) = match p.worst_excess_at {
            Some(at) => (unravel(at, shape), a[at], b[at]),
            None => (vec![], 0.0, 0.0),
        };
        AllClose {
            tolerance: t,
            violations: p.violations,
            worst_index,
            a: a_w,
            b: b_w,
            error: abs_error(a_w, b_w),
            allowed: t.allowed(a_w),
            set: None,
        }
    });
    ValueMetrics {
        elements: n,
        integer,
        max_abs,
        mean_abs: if empty { 0.0 } else { p.sum_err / n as f64 },
        max_rel: p.max_rel,
        cosine: (!integer).then_some(cosine),
        snr_db: (!integer).then_some(snr_db),
        top1_agreement: if integer { None } else { top1(a, b, shape) },
        mismatches: p.mismatches,
        worst_index: if empty {
            vec![]
        } else {
            unravel(p.max_err_at, shape)
        },
        worst_a: if empty { 0.0 } else { a[p.max_err_at] },
        worst_b: if empty { 0.0 } else { b[p.max_err_at] },
        allclose,
        worst_set: None,
        cosine_set: None,
    }
}

/// `x` ranks above `y` as an error: larger, a NaN above any number (first one wins ties).
fn above(x: f64, y: f64) -> bool {
    (x.is_nan() && !y.is_nan()) || x > y
}

/// The figures of one output over several input sets, from each set's label, figures and
/// reference shape (in set order):
/// - elements, mismatches and tolerance violations summed; mean abs over every element;
/// - max abs and max rel the largest (a NaN above any number), `worst_index` in the set
///   named by `worst_set`;
/// - cosine and SNR the lowest of the sets (a NaN below any number), so a gate on them holds
///   on every set; `cosine_set` names the set of the cosine;
/// - top-1 agreement over every set's rows (all axes but the last), from the sets that have it;
/// - the tolerance check's worst element the one furthest outside over all sets
///   (largest `|a-b| - allowed`, an infinite error first), its set in `set`.
///
/// Returns `None` for no set. Every set must hold the same kind of output (integer or not).
pub fn merge_values(sets: &[(&str, &ValueMetrics, &[usize])]) -> Option<ValueMetrics> {
    let (first_label, first, _) = sets.first()?;
    let mut m = (*first).clone();
    if sets.len() == 1 {
        return Some(m);
    }
    m.worst_set = Some(first_label.to_string());
    m.cosine_set = m.cosine.map(|_| first_label.to_string());
    if let Some(a) = m.allclose.as_mut() {
        a.set = (a.violations > 0).then(|| first_label.to_string());
    }
    let mut total_abs = first.mean_abs * first.elements as f64;
    let rows = |v: &ValueMetrics, shape: &[usize]| match shape.last() {
        Some(&last) if last > 0 => (v.elements / last) as f64,
        _ => 0.0,
    };
    let mut top1 = first
        .top1_agreement
        .map(|t| (t * rows(first, sets[0].2), rows(first, sets[0].2)));
    for &(label, v, shape) in &sets[1..] {
        m.elements += v.elements;
        m.mismatches += v.mismatches;
        total_abs += v.mean_abs * v.elements as f64;
        if above(v.max_abs, m.max_abs) {
            m.max_abs = v.max_abs;
            m.worst_index = v.worst_index.clone();
            m.worst_a = v.worst_a;
            m.worst_b = v.worst_b;
            m.worst_set = Some(label.to_string());
        }
        if above(v.max_rel, m.max_rel) {
            m.max_rel = v.max_rel;
        }
        if let (Some(c), Some(mc)) = (v.cosine, m.cosine) {
            if above(-c, -mc) {
                m.cosine = Some(c);
                m.cosine_set = Some(label.to_string());
            }
        }
        if let (Some(s), Some(ms)) = (v.snr_db, m.snr_db) {
            if above(-s, -ms) {
                m.snr_db = Some(s);
            }
        }
        if let Some(t) = v.top1_agreement {
            let r = rows(v, shape);
            let (agree, all) = top1.unwrap_or((0.0, 0.0));
            top1 = Some((agree + t * r, all + r));
        }
        if let (Some(a), Some(b)) = (m.allclose.as_mut(), v.allclose.as_ref()) {
            let excess = |c: &AllClose| {
                if c.error.is_infinite() {
                    f64::INFINITY
                } else {
                    c.error - c.allowed
                }
            };
            if b.violations > 0 && (a.violations == 0 || above(excess(b), excess(a))) {
                let total = a.violations + b.violations;
                *a = b.clone();
                a.violations = total;
                a.set = Some(label.to_string());
            } else {
                a.violations += b.violations;
            }
        }
    }
    m.mean_abs = if m.elements == 0 {
        0.0
    } else {
        total_abs / m.elements as f64
    };
    m.top1_agreement = top1.and_then(|(agree, all)| (all > 0.0).then(|| agree / all));
    Some(m)
}

/// `numpy.argmax` of one row: the first NaN, else the first maximum.
fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            return i;
        }
        if v > row[best] {
            best = i;
        }
    }
    best
}

fn top1(a: &[f64], b: &[f64], shape: &[usize]) -> Option<f64> {
    let last = *shape.last()?;
    if last <= 1 || a.is_empty() {
        return None;
    }
    let rows = a.len() / last;
    let agree = |(ra, rb): (&[f64], &[f64])| usize::from(argmax(ra) == argmax(rb));
    let agreeing: usize = if a.len() > CHUNK {
        a.par_chunks(last).zip(b.par_chunks(last)).map(agree).sum()
    } else {
        a.chunks(last).zip(b.chunks(last)).map(agree).sum()
    };
    Some(agreeing as f64 / rows as f64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn t32(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_shape(shape, v).unwrap()
    }

    #[test]
    fn known_errors_and_worst_index() {
        let a = t32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let b = t32(&[2, 2], &[1.0, 2.5, 3.0, 3.0]);
        let m = compare("y", &a, &b, None);
        let v = m.values.unwrap();
        assert_eq!(v.elements, 4);
        assert!(!v.integer);
        assert_eq!(v.max_abs, 1.0);
        assert_eq!(v.mean_abs, 0.375);
        assert_eq!(v.max_rel, 0.25);
        assert_eq!(v.mismatches, 2);
        assert_eq!(v.worst_index, vec![1, 1]);
        assert_eq!((v.worst_a, v.worst_b), (4.0, 3.0));
        assert!(v.allclose.is_none());
    }

    #[test]
    fn merged_sets_take_the_worst_figures_and_pool_counts_and_rows() {
        let tol = Some(Tolerance {
            atol: 0.1,
            rtol: 0.0,
        });
        // Set p: two rows of 2, one argmax flips, one element 0.5 outside.
        let p = compare(
            "y",
            &t32(&[2, 2], &[1.0, 0.0, 0.0, 1.0]),
            &t32(&[2, 2], &[1.0, 0.0, 0.5, 0.4]),
            tol,
        );
        // Set q: four rows of 2, a NaN in the candidate (outside, worst).
        let q = compare(
            "y",
            &t32(&[4, 2], &[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
            &t32(&[4, 2], &[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, f32::NAN]),
            tol,
        );
        let (pv, qv) = (p.values.unwrap(), q.values.unwrap());
        let sets = [("p", &pv, &[2usize, 2][..]), ("q", &qv, &[4usize, 2][..])];
        let m = merge_values(&sets).unwrap();
        assert_eq!(m.elements, 12);
        assert_eq!(m.mismatches, pv.mismatches + qv.mismatches);
        assert!(m.max_abs.is_infinite() || m.max_abs.is_nan());
        assert_eq!(m.worst_set.as_deref(), Some("q"));
        // The NaN cosine of q is the lowest.
        assert!(m.cosine.unwrap().is_nan());
        assert_eq!(m.cosine_set.as_deref(), Some("q"));
        // 1 of 2 rows of p and 3 of 4 rows of q agree (the NaN is q's last row's argmax).
        assert_eq!(m.top1_agreement, Some(4.0 / 6.0));
        let a = m.allclose.unwrap();
        assert_eq!(a.violations, 3);
        assert_eq!(a.set.as_deref(), Some("q"));
        assert_eq!(a.worst_index, vec![3, 1]);
        // One set is returned as it is; no set gives nothing.
        assert_eq!(merge_values(&sets[..1]), Some(pv.clone()));
        assert_eq!(merge_values(&[]), None);
        // Without the NaN set, p's figures and mean abs over its elements.
        let m = merge_values(&[sets[0], sets[0]]).unwrap();
        assert_eq!(m.mean_abs, pv.mean_abs);
        assert_eq!(m.worst_set.as_deref(), Some("p"));
        assert_eq!(m.allclose.unwrap().violations, 4);
    }

    #[test]
    fn cosine_of_orthogonal_vectors_is_zero() {
        let v = compare("y", &t32(&[2], &[1.0, 0.0]), &t32(&[2], &[0.0, 1.0]), None)
            .values
            .unwrap();
        assert_eq!(v.cosine, Some(0.0));
        let v = compare(
            "y",
            &t32(&[2], &[1.0, 1.0]),
            &t32(&[2], &[-1.0, -1.0]),
            None,
        )
        .values
        .unwrap();
        assert_eq!(v.cosine, Some(-1.0));
    }

    #[test]
    fn cosine_of_two_zero_tensors_is_one_and_snr_infinite() {
        let z = t32(&[3], &[0.0; 3]);
        let v = compare("y", &z, &z, None).values.unwrap();
        assert_eq!(v.cosine, Some(1.0));
        assert_eq!(v.snr_db, Some(f64::INFINITY));
        assert_eq!(v.max_abs, 0.0);
        let v = compare("y", &z, &t32(&[3], &[0.0, 1.0, 0.0]), None)
            .values
            .unwrap();
        assert_eq!(v.cosine, Some(0.0));
    }

    /// String outputs (class labels) are compared for equality like integers: a model
    /// compared with itself was "not comparable" (`dtype String cannot be compared as
    /// numbers`), a failed gate.
    #[test]
    fn string_outputs_count_the_labels_that_differ() {
        let s = |v: &[&str]| {
            let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            Tensor::from(tract_onnx::prelude::tract_ndarray::Array1::from(v))
        };
        let a = s(&["cat", "dog", "bird"]);
        let v = compare("labels", &a, &a, None).values.unwrap();
        assert!(v.integer);
        assert_eq!((v.mismatches, v.max_abs), (0, 0.0));
        let v = compare("labels", &a, &s(&["cat", "cow", "owl"]), None)
            .values
            .unwrap();
        assert_eq!(v.mismatches, 2);
        assert_eq!(v.worst_index, vec![1]);
        assert_eq!(v.max_rel, 1.0);
        // A tolerance does not let different labels through, however loose.
        let loose = Tolerance {
            atol: 10.0,
            rtol: 10.0,
        };
        let v = compare("labels", &a, &s(&["cat", "cow", "owl"]), Some(loose))
            .values
            .unwrap();
        assert_eq!(v.allclose.as_ref().map(|c| c.violations), Some(2));
    }

    /// Integers beyond 2^53, which f64 cannot tell apart, are still counted as mismatches.
    #[test]
    fn integer_mismatches_are_counted_exactly_beyond_2_pow_53() {
        let big = 1i64 << 53;
        let a = Tensor::from_shape(&[2], &[big, 7]).unwrap();
        let b = Tensor::from_shape(&[2], &[big + 1, 7]).unwrap();
        assert_eq!(compare("y", &a, &b, None).values.unwrap().mismatches, 1);
        let u = Tensor::from_shape(&[1], &[u64::MAX]).unwrap();
        let v = Tensor::from_shape(&[1], &[u64::MAX - 1]).unwrap();
        assert_eq!(compare("y", &u, &v, None).values.unwrap().mismatches, 1);
        assert_eq!(compare("y", &u, &u, None).values.unwrap().mismatches, 0);
    }

    /// An integer output that became float (or the reverse) is not comparable, whatever the
    /// values: the interface changed.
    #[test]
    fn an_output_whose_type_changed_between_integer_and_float_is_not_comparable() {
        let i = Tensor::from_shape(&[3], &[1i64, 2, 3]).unwrap();
        let f = t32(&[3], &[1.0, 2.0, 3.0]);
        for (a, b) in [(&i, &f), (&f, &i)] {
            let row = compare("y", a, b, None);
            assert!(row.values.is_none());
            assert!(
                row.problem
                    .as_deref()
                    .is_some_and(|p| p.starts_with("type changed")),
                "{:?}",
                row.problem
            );
        }
        // int32 for int64 stays comparable (exact values).
        let i32s = Tensor::from_shape(&[3], &[1i32, 2, 3]).unwrap();
        assert!(compare("y", &i, &i32s, None).values.is_some());
    }

    /// Equal infinities agree, as equal NaNs do: a model compared with itself passes when an
    /// output holds infinities (its cosine was NaN, and the gate failed).
    #[test]
    fn equal_infinities_leave_the_cosine_alone() {
        let a = t32(&[4], &[1.0, f32::INFINITY, f32::NEG_INFINITY, 2.0]);
        let v = compare("y", &a, &a, None).values.unwrap();
        assert_eq!(v.cosine, Some(1.0));
        assert_eq!(v.max_abs, 0.0);
        let b = t32(&[4], &[1.0, f32::INFINITY, 5.0, 2.0]);
        let v = compare("y", &a, &b, None).values.unwrap();
        assert!(
            v.cosine.unwrap().is_nan() || v.cosine.unwrap() < 1.0,
            "{:?}",
            v.cosine
        );
        assert_eq!(v.max_abs, f64::INFINITY);
    }

    #[test]
    fn snr_of_known_noise() {
        // signal 3^2 + 4^2 = 25, noise 0.5^2 = 0.25: 10 log10(100) = 20 dB.
        let v = compare("y", &t32(&[2], &[3.0, 4.0]), &t32(&[2], &[3.0, 4.5]), None)
            .values
            .unwrap();
        assert_eq!(v.snr_db, Some(20.0));
    }

    #[test]
    fn top1_agreement_counts_rows() {
        let a = t32(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 5.0, 6.0]);
        let b = t32(&[3, 2], &[1.0, 0.0, 1.0, 0.0, 6.0, 5.0]);
        let v = compare("y", &a, &b, None).values.unwrap();
        assert_eq!(v.top1_agreement, Some(1.0 / 3.0));
        // A last dim of 1 has no argmax to compare.
        let v = compare(
            "y",
            &t32(&[2, 1], &[1.0, 2.0]),
            &t32(&[2, 1], &[1.0, 2.0]),
            None,
        )
        .values
        .unwrap();
        assert_eq!(v.top1_agreement, None);
        let v = compare("y", &Tensor::from(1.0f32), &Tensor::from(1.0f32), None)
            .values
            .unwrap();
        assert_eq!(v.top1_agreement, None);
        assert_eq!(v.worst_index, Vec::<usize>::new());
    }

    #[test]
    fn nan_in_candidate_is_an_infinite_error_and_nan_in_both_agrees() {
        let v = compare(
            "y",
            &t32(&[2], &[f32::NAN, 1.0]),
            &t32(&[2], &[f32::NAN, 1.0]),
            None,
        )
        .values
        .unwrap();
        assert_eq!(v.max_abs, 0.0);
        assert_eq!(v.mismatches, 0);
        assert_eq!(v.cosine, Some(1.0));
        assert_eq!(v.snr_db, Some(f64::INFINITY));

        let tol = Some(Tolerance {
            atol: 1.0,
            rtol: 1.0,
        });
        let v = compare(
            "y",
            &t32(&[2], &[1.0, 2.0]),
            &t32(&[2], &[1.0, f32::NAN]),
            tol,
        )
        .values
        .unwrap();
        assert_eq!(v.max_abs, f64::INFINITY);
        assert_eq!(v.max_rel, f64::INFINITY);
        assert_eq!(v.worst_index, vec![1]);
        assert!(v.cosine.unwrap().is_nan());
        assert_eq!(v.snr_db, Some(f64::NEG_INFINITY));
        let ac = v.allclose.unwrap();
        assert_eq!(ac.violations, 1);
        assert_eq!(ac.worst_index, vec![1]);
    }

    #[test]
    fn allclose_is_elementwise_with_rtol_on_the_reference() {
        let a = t32(&[4], &[1.0, 10.0, 100.0, 0.0]);
        let b = t32(&[4], &[1.05, 10.5, 104.0, 0.2]);
        // allowed: 0.1 + 0.01 |a| = 0.11, 0.2, 1.1, 0.1; errors 0.05, 0.5, 4, 0.2.
        let v = compare(
            "y",
            &a,
            &b,
            Some(Tolerance {
                atol: 0.1,
                rtol: 0.01,
            }),
        )
        .values
        .unwrap();
        let ac = v.allclose.unwrap();
        assert_eq!(ac.violations, 3);
        assert_eq!(ac.worst_index, vec![2]);
        assert_eq!((ac.a, ac.b), (100.0, 104.0));
        assert!((ac.error - 4.0).abs() < 1e-12 && (ac.allowed - 1.1).abs() < 1e-12);
    }

    #[test]
    fn integer_outputs_count_mismatches_without_cosine() {
        let a = Tensor::from_shape(&[4], &[1i64, 2, 3, 4]).unwrap();
        let b = Tensor::from_shape(&[4], &[1i64, 2, 7, 4]).unwrap();
        let v = compare("ids", &a, &b, None).values.unwrap();
        assert!(v.integer);
        assert_eq!(v.mismatches, 1);
        assert_eq!(v.max_abs, 4.0);
        assert_eq!(v.worst_index, vec![2]);
        assert_eq!((v.cosine, v.snr_db, v.top1_agreement), (None, None, None));
        let a = Tensor::from_shape(&[3], &[true, false, true]).unwrap();
        let b = Tensor::from_shape(&[3], &[true, true, true]).unwrap();
        let v = compare("mask", &a, &b, None).values.unwrap();
        assert_eq!((v.mismatches, v.max_abs), (1, 1.0));
    }

    #[test]
    fn shape_mismatch_is_a_problem_row() {
        let m = compare(
            "y",
            &t32(&[2], &[1.0, 2.0]),
            &t32(&[1, 2], &[1.0, 2.0]),
            None,
        );
        assert!(m.values.is_none());
        assert!(m.problem.unwrap().contains("shape mismatch"));
        let m = missing("y", &t32(&[2], &[1.0, 2.0]));
        assert_eq!(m.problem.as_deref(), Some("missing in candidate"));
    }

    #[test]
    fn f16_and_f64_sides_compare_as_numbers() {
        let a = t32(&[2], &[0.5, 0.25]);
        let b = Tensor::from_shape(&[2], &[half::f16::from_f32(0.5), half::f16::from_f32(0.25)])
            .unwrap();
        let v = compare("y", &a, &b, None).values.unwrap();
        assert_eq!(v.max_abs, 0.0);
        assert_eq!(v.cosine, Some(1.0));
    }

    #[test]
    fn parallel_chunks_match_a_sequential_reference() {
        let n = 3 * CHUNK + 123;
        let a: Vec<f64> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f64 / 100.0 - 5.0)
            .collect();
        let mut b = a.clone();
        b[CHUNK + 5] += 0.75;
        b[2 * CHUNK + 9] -= 0.75; // same error: the earlier index wins
        let v = compare_values(
            &a,
            &b,
            &[n],
            false,
            Some(Tolerance {
                atol: 0.5,
                rtol: 0.0,
            }),
        );
        assert_eq!(v.max_abs, 0.75);
        assert_eq!(v.worst_index, vec![CHUNK + 5]);
        assert_eq!(v.mismatches, 2);
        assert_eq!(v.allclose.as_ref().map(|a| a.violations), Some(2));
        let signal: f64 = a.iter().map(|x| x * x).sum();
        let expected_snr = 10.0 * (signal / (2.0 * 0.75 * 0.75)).log10();
        assert!((v.snr_db.unwrap() - expected_snr).abs() < 1e-9);
        assert!((v.mean_abs - 1.5 / n as f64).abs() < 1e-18);
    }

    #[test]
    fn unravel_is_c_order() {
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
    }

    #[test]
    fn non_finite_figures_serialize_as_strings() {
        let v = compare("y", &t32(&[1], &[1.0]), &t32(&[1], &[1.0]), None);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["values"]["snr_db"], "inf");
        assert_eq!(json["values"]["cosine"], 1.0);
    }
}
