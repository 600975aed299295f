//! Calibration for static quantization: run the model in tract on sample inputs and estimate,
//! per activation tensor, the range `[lo, hi]` that its quantization parameters cover.
//!
//! Samples are read from [`CalibrationOptions::source`] and streamed: one sample's inputs and
//! activations are in memory at a time, and only running statistics per tensor are kept:
//! - a folder: every `*.npz` file in it, in name order, one sample each;
//! - one `.npz` file: arrays with a leading axis of samples. An array whose rank is one more
//!   than the graph input's declared rank is a stack (`sample i = a[i]`); an array of the
//!   declared rank whose graph input has a symbolic, unknown or unit first dim is split along
//!   axis 0 keeping a batch of 1 (`sample i = a[i:i+1]`); any other array is fed whole to every
//!   sample. Every split array must have the same number of samples.
//!
//! Keys that are not graph inputs are ignored (bundles also hold reference outputs). Errors
//! name the sample file and the graph input that is missing.
//!
//! The model runs in tract's optimized plan (as typed where tract cannot optimize it), with
//! the tensors to calibrate appended as graph outputs ([`crate::fallback::with_probes`]), so
//! tract keeps them; the plan is built once per distinct set of input shapes and reused for
//! every sample of those shapes, and as many samples run at a time as rayon has threads.
//!
//! Range estimators ([`RangeMethod`]):
//! - **MinMax**: the smallest and largest value seen.
//! - **Percentile p**: each tail separately. Values are counted in two histograms of
//!   [`BINS`] bins over `[0, R]`, one for the positive values and one for the magnitudes of the
//!   negative ones (zeros counted apart), sharing a range `R`, the smallest power of two
//!   above every magnitude seen, that doubles when a larger magnitude arrives: `2^k`
//!   neighbouring bins merge into one, exactly, so the histograms are those `R` alone gives,
//!   whatever the order of the samples (at least half the bins are in use). `hi` is the
//!   upper edge of the highest bin with more than `(100 - p)% * N` positive values at or
//!   above it (`N` counts every value),
//!   `lo` likewise on the negative side, each clamped to the observed min/max; a side with
//!   fewer values than that tail gives 0. So all-positive activations get `lo = 0`, and the
//!   range always includes 0 (a valid zero point).
//! - **Entropy**: TensorRT's calibration (S. Migacz, "8-bit Inference with TensorRT", GTC
//!   2017): over the histogram of `|x|` (the two histograms above added), every candidate
//!   threshold of `i` bins, `levels <= i <= BINS`, is scored by the KL divergence between the
//!   clipped reference distribution `P` (bins beyond `i` added to bin `i - 1`) and `Q`, the
//!   first `i` bins merged into `levels` groups and spread back evenly over each group's
//!   non-empty bins; the threshold `T = i * R / BINS` of the smallest divergence wins. `levels`
//!   is 128 (the magnitudes of a signed 8-bit range) for tensors with negative values, 256 for
//!   non-negative tensors (after ReLU) quantized as uint8, 128 for them as int8. The range is
//!   `[max(min, -T), min(max, T)]` (`[0, min(max, T)]` for non-negative tensors).
//!
//! A tensor holding an infinity or NaN, or no element at all, gets no range (it stays float).
//!
//! Results are cached in the options' [`CalibrationCache`] (shared by their clones, so for
//! one command's run), keyed by the model's bytes, the tensor names, the source (path, sizes
//! and modification times of its files) and the options, so the accuracy-gated fallback,
//! which re-runs the pass on the same snapshot several times, calibrates once.

use std::collections::{hash_map::DefaultHasher, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use prost::Message;
use rayon::prelude::*;
use tract_onnx::prelude::{
    DatumType, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, IntoTValue, TValue,
    TVec, Tensor, TypedRunnableModel,
};

use super::{CalibrationOptions, QType, RangeMethod};
use crate::pb;
use crate::verify::inputs::{load_npz_keys, npz_keys};
use crate::verify::specialize::IfResolver;

/// Histogram bins per sign (the resolution of the percentile and entropy estimators).
pub const BINS: usize = 2048;

/// Running statistics of one tensor over the samples seen so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Smallest finite value seen.
    pub min: f32,
    /// Largest finite value seen.
    pub max: f32,
    /// Values seen.
    pub count: u64,
    /// An infinity or NaN was seen.
    pub non_finite: bool,
    hist: Option<Histogram>,
}

/// Two histograms over `[0, range]`: positive values and magnitudes of negative values.
#[derive(Debug, Clone, PartialEq)]
struct Histogram {
    range: f64,
    pos: Vec<u64>,
    neg: Vec<u64>,
    zeros: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            range: 0.0,
            pos: vec![0; BINS],
            neg: vec![0; BINS],
            zeros: 0,
        }
    }

    /// Widens the range to cover `amax` (> 0), merging `2^k` bins into one.
    ///
    /// The range is always a power of two above every value seen, so the bins are those the
    /// final range alone would give (`a / range * BINS` is exact when `range` is a power of
    /// two, and halving it twice is halving once by four): the histogram does not depend on
    /// the order of the samples. A range set by the first sample and doubled made percentile
    /// and entropy ranges depend on that order (entropy scales 0.0170 against 0.0106 for the
    /// same samples in reverse order).
    fn grow(&mut self, amax: f64) {
        if amax < self.range {
            return;
        }
        let mut range = if self.range == 0.0 {
            2f64.powi(amax.log2().floor() as i32)
        } else {
            self.range
        };
        let mut shift = 0u32;
        while range <= amax {
            range *= 2.0;
            shift += 1;
        }
        if self.range > 0.0 && shift > 0 {
            for h in [&mut self.pos, &mut self.neg] {
                let mut merged = vec![0u64; BINS];
                for (j, &c) in h.iter().enumerate() {
                    merged[j.checked_shr(shift).unwrap_or(0)] += c;
                }
                *h = merged;
            }
        }
        self.range = range;
    }

    fn bin(&self, a: f64) -> usize {
        ((a / self.range * BINS as f64) as usize).min(BINS - 1)
    }

    fn width(&self) -> f64 {
        self.range / BINS as f64
    }
}

/// The smallest and largest finite values of `data` (`(inf, -inf)` when it has none) and
/// whether it holds a NaN or an infinity.
///
/// Written so that the compiler vectorizes it (16 independent lanes; `v * 0` is NaN exactly
/// for NaN and infinite `v`): calibration reads every activation of every sample. The rare
/// non-finite tensor takes the plain loop, which skips those values.
fn finite_min_max(data: &[f32]) -> (f32, f32, bool) {
    const LANES: usize = 16;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut probe = [0f32; LANES];
    let chunks = data.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            let v = c[j];
            lo[j] = if v < lo[j] { v } else { lo[j] };
            hi[j] = if v > hi[j] { v } else { hi[j] };
            probe[j] += v * 0.0;
        }
    }
    let finite = probe.iter().all(|p| *p == 0.0) && rest.iter().all(|v| v.is_finite());
    if finite {
        let fold = |a: [f32; LANES], pick: fn(f32, f32) -> f32| a.into_iter().fold(a[0], pick);
        let lo = rest.iter().copied().fold(fold(lo, f32::min), f32::min);
        let hi = rest.iter().copied().fold(fold(hi, f32::max), f32::max);
        return (lo, hi, false);
    }
    let (mut lo, mut hi, mut bad) = (f32::INFINITY, f32::NEG_INFINITY, false);
    for &v in data {
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        } else {
            bad = true;
        }
    }
    (lo, hi, bad)
}

impl Stats {
    /// Empty statistics; `histogram` for the percentile and entropy estimators.
    pub fn new(histogram: bool) -> Self {
        Stats {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            non_finite: false,
            hist: histogram.then(Histogram::new),
        }
    }

    /// Adds the values of one sample.
    pub fn update(&mut self, data: &[f32]) {
        let (lo, hi, bad) = finite_min_max(data);
        self.non_finite |= bad;
        self.count += data.len() as u64;
        if lo > hi {
            return;
        }
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        if let Some(h) = &mut self.hist {
            let amax = (lo.abs().max(hi.abs())) as f64;
            if amax > 0.0 {
                h.grow(amax);
            }
            for &v in data {
                if !v.is_finite() {
                    continue;
                }
                if v > 0.0 {
                    let b = h.bin(v as f64);
                    h.pos[b] += 1;
                } else if v < 0.0 {
                    let b = h.bin(-(v as f64));
                    h.neg[b] += 1;
                } else {
                    h.zeros += 1;
                }
            }
        }
    }

    /// The range estimated by `method` for activations of type `qtype`, or `None` when the
    /// tensor held no element, an infinity or a NaN. The range always includes 0.
    pub fn range(&self, method: &RangeMethod, qtype: QType) -> Option<(f32, f32)> {
        if self.non_finite || self.min > self.max {
            return None;
        }
        let (min, max) = (self.min.min(0.0), self.max.max(0.0));
        let h = match (&self.hist, method) {
            (_, RangeMethod::MinMax) | (None, _) => return Some((min, max)),
            (Some(h), _) => h,
        };
        if h.range == 0.0 {
            return Some((0.0, 0.0));
        }
        let w = h.width();
        match method {
            RangeMethod::MinMax => Some((min, max)),
            RangeMethod::Percentile { percentile } => {
                let total =
                    (h.pos.iter().sum::<u64>() + h.neg.iter().sum::<u64>() + h.zeros) as f64;
                let tail = (100.0 - percentile).max(0.0) / 100.0 * total;
                let edge = |bins: &[u64]| -> f64 {
                    let mut above = 0f64;
                    for j in (0..BINS).rev() {
                        above += bins[j] as f64;
                        if above > tail {
                            return (j + 1) as f64 * w;
                        }
                    }
                    0.0
                };
                let hi = (edge(&h.pos) as f32).min(max);
                let lo = (-edge(&h.neg) as f32).max(min);
                Some((lo, hi))
            }
            RangeMethod::Entropy => {
                let non_negative = h.neg.iter().all(|&c| c == 0);
                let levels = if non_negative && qtype == QType::Uint8 {
                    256
                } else {
                    128
                };
                let mut mag: Vec<u64> = h.pos.iter().zip(&h.neg).map(|(a, b)| a + b).collect();
                mag[0] += h.zeros;
                let t = (kl_threshold_bins(&mag, levels) as f64 * w) as f32;
                if non_negative {
                    Some((0.0, t.min(max)))
                } else {
                    Some(((-t).max(min), t.min(max)))
                }
            }
        }
    }
}

/// The number of bins `i` (`levels <= i <= hist.len()`) whose threshold minimises the KL
/// divergence of TensorRT's entropy calibration (see the module documentation). Returns
/// `hist.len()` when the histogram has fewer bins than `levels`.
pub fn kl_threshold_bins(hist: &[u64], levels: usize) -> usize {
    let n = hist.len();
    if n <= levels {
        return n;
    }
    // The last non-empty bin: thresholds beyond it clip nothing and are all equivalent.
    let last = hist.iter().rposition(|&c| c > 0).map_or(0, |j| j + 1);
    if last <= levels {
        return last.max(1);
    }
    let scores: Vec<(usize, f64)> = (levels..=last)
        .into_par_iter()
        .map(|i| (i, kl_divergence(hist, i, levels)))
        .collect();
    scores
        .into_iter()
        .fold((last, f64::INFINITY), |best, (i, d)| {
            if d < best.1 {
                (i, d)
            } else {
                best
            }
        })
        .0
}

/// KL(P || Q) for the threshold of `i` bins (TensorRT's procedure).
fn kl_divergence(hist: &[u64], i: usize, levels: usize) -> f64 {
    let mut p: Vec<f64> = hist[..i].iter().map(|&c| c as f64).collect();
    let outliers: f64 = hist[i..].iter().map(|&c| c as f64).sum();
    p[i - 1] += outliers;
    let mut q = vec![0f64; i];
    for k in 0..levels {
        let start = k * i / levels;
        let end = ((k + 1) * i / levels).max(start + 1).min(i);
        let sum: f64 = hist[start..end].iter().map(|&c| c as f64).sum();
        let nonzero = hist[start..end].iter().filter(|&&c| c > 0).count();
        if nonzero == 0 {
            continue;
        }
        let each = sum / nonzero as f64;
        for j in start..end {
            if hist[j] > 0 {
                q[j] = each;
            }
        }
    }
    let ps: f64 = p.iter().sum();
    let qs: f64 = q.iter().sum();
    if ps == 0.0 || qs == 0.0 {
        return f64::INFINITY;
    }
    // Q is 0 only where the clipped outliers landed in an empty last bin: a small floor keeps
    // the divergence finite and penalises that threshold.
    const FLOOR: f64 = 1e-12;
    p.iter()
        .zip(&q)
        .filter(|(&pv, _)| pv > 0.0)
        .map(|(&pv, &qv)| {
            let pn = pv / ps;
            let qn = (qv / qs).max(FLOOR);
            pn * (pn / qn).ln()
        })
        .sum()
}

/// The result of a calibration.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// `[lo, hi]` per calibrated float tensor (tensors without a range are absent).
    pub ranges: HashMap<String, (f32, f32)>,
    /// Shape of each calibrated tensor on the first sample (what the cost of an int8 kernel
    /// depends on).
    pub shapes: HashMap<String, Vec<usize>>,
    /// Samples run.
    pub samples: usize,
    /// Samples on which every calibrated tensor was empty (a sample with 0 rows): they
    /// count in `samples` but gave no value.
    pub empty_samples: usize,
    /// True when the ranges came from the options' [`CalibrationCache`].
    pub cached: bool,
}

/// The declared graph inputs (non-initializers): name, rank, and first dim when it is a
/// fixed value.
#[derive(Debug, Clone)]
struct InputDecl {
    name: String,
    rank: Option<usize>,
    first_dim: Option<i64>,
    /// ONNX element type, when declared.
    elem: Option<i32>,
    /// Declared dims: `Some(n)` for a fixed size, `None` for a symbolic or unknown one.
    dims: Option<Vec<Option<i64>>>,
}

fn declared_inputs(proto: &pb::ModelProto) -> Result<Vec<InputDecl>> {
    let g = proto.graph.as_ref().context("the model has no graph")?;
    let mut out = Vec::new();
    for i in crate::verify::inputs::real_graph_inputs(g) {
        let shape = i.r#type.as_ref().and_then(|t| match &t.value {
            Some(pb::type_proto::Value::TensorType(tt)) => tt.shape.as_ref(),
            _ => None,
        });
        let rank = shape.map(|s| s.dim.len());
        let first_dim = shape
            .and_then(|s| s.dim.first())
            .and_then(|d| match d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => Some(v),
                _ => None,
            });
        let elem = i.r#type.as_ref().and_then(|t| match &t.value {
            Some(pb::type_proto::Value::TensorType(tt)) => tt.elem_type,
            _ => None,
        });
        let dims = shape.map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => Some(v),
                    _ => None,
                })
                .collect()
        });
        out.push(InputDecl {
            elem,
            dims,
            name: i.name().to_string(),
            rank,
            first_dim,
        });
    }
    Ok(out)
}

/// One calibration sample: where it came from and one tensor per graph input.
pub struct Sample {
    /// `file.npz` or `file.npz[i]`.
    pub label: String,
    /// Graph input name and tensor.
    pub tensors: Vec<(String, Tensor)>,
}

enum Source {
    Files(Vec<PathBuf>),
    Batched {
        file: PathBuf,
        /// Per graph input: the array and how samples are taken from it.
        arrays: Vec<(String, Tensor, Split)>,
        count: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Split {
    /// Fed whole to every sample.
    Whole,
    /// `a[i:i+1]`.
    KeepBatch,
    /// `a[i]`.
    Stack,
}

/// Streams the samples of a calibration source (see the module documentation).
pub struct Samples {
    source: Source,
    inputs: Vec<InputDecl>,
    next: usize,
    max: usize,
}

impl Samples {
    /// Opens `path` for the graph inputs of `proto`; reads at most `max` samples.
    ///
    /// Errors: the path does not exist, a folder holds no `.npz` file, the single `.npz` lacks
    /// a graph input or its split arrays disagree on the number of samples.
    pub fn open(path: &Path, proto: &pb::ModelProto, max: usize) -> Result<Samples> {
        let inputs = declared_inputs(proto)?;
        let source = if path.is_dir() {
            let files = sample_files(path)?;
            ensure!(
                !files.is_empty(),
                "calibration folder {} holds no .npz file",
                path.display()
            );
            Source::Files(files)
        } else {
            ensure!(
                path.is_file(),
                "calibration data {} does not exist (expected a folder of .npz files or one .npz)",
                path.display()
            );
            let mut all = load_npz_keys(path, |k| inputs.iter().any(|d| d.name == k))?;
            let mut arrays = Vec::new();
            let mut count: Option<(usize, String)> = None;
            for decl in &inputs {
                let t = take_input(&mut all, &decl.name, path)?;
                let rank = t.rank();
                let split = match decl.rank {
                    Some(r) if rank == r + 1 => Split::Stack,
                    Some(r) if rank == r && r > 0 && decl.first_dim.is_none_or(|d| d == 1) => {
                        Split::KeepBatch
                    }
                    None if rank > 0 => Split::KeepBatch,
                    _ => Split::Whole,
                };
                if split != Split::Whole {
                    let n = t.shape()[0];
                    match &count {
                        Some((c, other)) if *c != n => bail!(
                            "calibration file {}: array `{}` holds {n} samples along axis 0 but \
                             `{other}` holds {c}; one .npz file holds samples along a first axis \
                             (an array of the graph input's rank whose first dim is symbolic or 1 \
                             is split along it): stack samples on a new first axis, or put each \
                             sample in its own file in a folder",
                            path.display(),
                            decl.name
                        ),
                        _ => count = Some((n, decl.name.clone())),
                    }
                }
                arrays.push((decl.name.clone(), t, split));
            }
            if let Some((0, name)) = &count {
                bail!(
                    "calibration file {}: array `{name}` holds 0 samples along axis 0; give at least one",
                    path.display()
                );
            }
            Source::Batched {
                file: path.to_path_buf(),
                arrays,
                count: count.map_or(1, |c| c.0),
            }
        };
        Ok(Samples {
            source,
            inputs,
            next: 0,
            max,
        })
    }

    /// Number of samples that will be read.
    pub fn len(&self) -> usize {
        let n = match &self.source {
            Source::Files(f) => f.len(),
            Source::Batched { count, .. } => *count,
        };
        n.min(self.max)
    }

    /// True when there is no sample to read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The files the samples come from (for the cache key).
    fn files(&self) -> Vec<PathBuf> {
        match &self.source {
            Source::Files(f) => f.iter().take(self.max).cloned().collect(),
            Source::Batched { file, .. } => vec![file.clone()],
        }
    }
}

/// The calibration samples of a folder: its `.npz` files (any case), in name order, the
/// order calibration reads them.
///
/// Errors: the folder cannot be read.
pub fn sample_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading sample folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("npz")))
        .collect();
    files.sort();
    Ok(files)
}

/// Takes the array of graph input `name` out of `all`, read from `file`.
///
/// Errors: there is none; the message lists the file's arrays.
fn take_input(all: &mut Vec<(String, Tensor)>, name: &str, file: &Path) -> Result<Tensor> {
    match all.iter().position(|(k, _)| k == name) {
        Some(i) => Ok(all.swap_remove(i).1),
        None => bail!(
            "calibration sample {}: no array for graph input `{name}` (arrays: {})",
            file.display(),
            npz_keys(file)?
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Checks that a sample's value for `d` has the declared element type, rank and fixed dims;
/// the error names the sample, the array and what the graph input declares.
fn check_against(d: &InputDecl, t: &Tensor, label: &str) -> Result<()> {
    let declared_dt = d.elem.and_then(crate::verify::inputs::datum_type_of_onnx);
    let declared = declared_dt
        .map(|dt| format!("{dt:?}"))
        .unwrap_or_else(|| "of undeclared type".into());
    let dims = d.dims.as_ref().map(|ds| {
        ds.iter()
            .map(|x| x.map_or("?".to_string(), |v| v.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    });
    let want = || {
        format!(
            "graph input `{}` is {declared} [{}]",
            d.name,
            dims.clone().unwrap_or_else(|| "rank unknown".into())
        )
    };
    // The exact type, as for `--inputs`: an int64 array for an int32 input may hold values
    // beyond its range (which tract would wrap), and tract refuses some other pairs deep
    // inside the model.
    let dtype_ok = declared_dt.is_none_or(|dt| dt == t.datum_type());
    let shape_ok = d.dims.as_ref().is_none_or(|ds| {
        ds.len() == t.rank()
            && ds
                .iter()
                .zip(t.shape())
                .all(|(want, &got)| want.is_none_or(|w| w as usize == got))
    });
    ensure!(
        dtype_ok && shape_ok,
        "calibration sample {label}: array `{}` is {:?} {:?}, but {}",
        d.name,
        t.datum_type(),
        t.shape(),
        want()
    );
    // A NaN or infinity would give the activations it reaches no finite range, so that their
    // layers silently stay float (or a range that swamps every other sample's).
    let bad = non_finite(t);
    ensure!(
        bad == 0,
        "calibration sample {label}: array `{}` holds {bad} NaN or infinite value(s) of {}; calibration samples must be finite",
        d.name,
        t.len()
    );
    Ok(())
}

/// The values of `results`, or one error listing every error among them.
fn all_or_every_problem<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let mut values = Vec::new();
    let mut problems = Vec::new();
    for r in results {
        match r {
            Ok(v) => values.push(v),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if problems.is_empty() {
        Ok(values)
    } else {
        bail!("{}", problems.join("; "))
    }
}

impl Iterator for Samples {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        if self.next >= self.len() {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some(match &self.source {
            Source::Files(files) => {
                let file = &files[i];
                load_npz_keys(file, |k| self.inputs.iter().any(|d| d.name == k)).and_then(
                    |mut all| {
                        let label = file.display().to_string();
                        // Every problem of the sample, not only the first.
                        let checked: Vec<Result<(String, Tensor)>> = self
                            .inputs
                            .iter()
                            .map(|d| {
                                let t = take_input(&mut all, &d.name, file)?;
                                check_against(d, &t, &label)?;
                                Ok((d.name.clone(), t))
                            })
                            .collect();
                        Ok(Sample {
                            label,
                            tensors: all_or_every_problem(checked)?,
                        })
                    },
                )
            }
            Source::Batched { file, arrays, .. } => arrays
                .iter()
                .map(|(name, t, split)| {
                    let s = match split {
                        Split::Whole => t.clone(),
                        Split::KeepBatch => t.slice(0, i, i + 1)?,
                        Split::Stack => {
                            let rest = t.shape()[1..].to_vec();
                            t.slice(0, i, i + 1)?.into_shape(&rest)?
                        }
                    };
                    Ok((name.clone(), s))
                })
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("splitting calibration file {}", file.display()))
                .and_then(|tensors| {
                    let label = format!("{}[{i}]", file.display());
                    all_or_every_problem(
                        tensors
                            .iter()
                            .map(
                                |(name, t)| match self.inputs.iter().find(|d| &d.name == name) {
                                    Some(d) => check_against(d, t, &label),
                                    None => Ok(()),
                                },
                            )
                            .collect(),
                    )?;
                    Ok(Sample { label, tensors })
                }),
        })
    }
}

/// The model parsed once by tract, with plans built per set of input shapes (optimized by
/// tract when `optimize` and tract can, else as typed).
pub(crate) struct Runner {
    model: InferenceModel,
    /// When the main graph has If nodes: they are resolved for each input set before planning
    /// (see [`crate::verify::specialize`]).
    ifs: Option<IfResolver>,
    inputs: Vec<String>,
    /// The graph output names, in the order `run` returns their values.
    pub(crate) outputs: Vec<String>,
    plans: Vec<(PlanKey, Plan)>,
    /// Plans are tract's optimized plans (falling back to the typed plan where tract cannot
    /// optimize), not the plain typed plan.
    pub(crate) optimize: bool,
}

/// Most plans a [`Runner`] keeps, one per set of input shapes and way its If nodes resolve
/// (the oldest is dropped first).
const MAX_PLANS: usize = 16;

/// The input types and shapes a plan was built for, and how its If nodes were resolved.
type PlanKey = (Vec<(DatumType, Vec<usize>)>, Vec<Option<bool>>);

/// Runs `f`, turning a tract panic into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match crate::verify::tract_run::caught(f) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic".to_string());
            bail!("tract panicked while {what}: {msg}")
        }
    }
}

impl Runner {
    /// Parses `proto` (tract ignores its stored value_info and output shapes).
    ///
    /// Errors: tract cannot read or load the model, or it reads undefined values.
    pub(crate) fn new(proto: &pb::ModelProto, optimize: bool) -> Result<Runner> {
        Runner::new_in(proto, optimize, None)
    }

    /// [`Runner::new`], external data read from `dir`.
    pub(crate) fn new_in(
        proto: &pb::ModelProto,
        optimize: bool,
        dir: Option<&Path>,
    ) -> Result<Runner> {
        guarded("loading the model", || {
            let model = parse(proto, dir)?;
            let inputs = model
                .input_outlets()?
                .iter()
                .map(|o| model.node(o.node).name.clone())
                .collect();
            let outputs = proto
                .graph
                .as_ref()
                .map(|g| g.output.iter().map(|o| o.name().to_string()).collect())
                .unwrap_or_default();
            Ok(Runner {
                model,
                ifs: IfResolver::new(proto, dir),
                inputs,
                outputs,
                plans: Vec::new(),
                optimize,
            })
        })
    }

    /// The plan for these inputs' types and shapes (built when new, see [`Runner::run`]).
    ///
    /// Errors: as [`Runner::run`], short of running.
    pub(crate) fn plan(&mut self, tensors: &[(String, Tensor)]) -> Result<Plan> {
        Ok(self.prepare(tensors)?.0)
    }

    /// Plans built so far.
    #[cfg(test)]
    pub(crate) fn plans(&self) -> usize {
        self.plans.len()
    }

    /// Runs the model on one value per graph input (by name) and returns the graph outputs.
    ///
    /// Errors: a graph input has no value, or tract fails or panics planning or running.
    pub(crate) fn run(&mut self, tensors: &[(String, Tensor)]) -> Result<TVec<TValue>> {
        Ok(self.run_planned(tensors)?.0)
    }

    /// [`Runner::run`], and the plan it ran (to read tract's facts of its values).
    ///
    /// Errors: as [`Runner::run`].
    pub(crate) fn run_planned(
        &mut self,
        tensors: &[(String, Tensor)],
    ) -> Result<(TVec<TValue>, Plan)> {
        let (plan, values) = self.prepare(tensors)?;
        let outs = guarded("running the model", || plan.run(values))?;
        Ok((outs, plan))
    }

    /// [`Runner::run`] on several input sets, run in parallel (tract runs one model on one
    /// thread; each set gets its own state on the shared plan), one result per set in the
    /// order of `sets`. Holds every set's outputs at once.
    ///
    /// Errors (each set's own, whatever the other sets give): the set has no value for a
    /// graph input, or tract fails planning or fails or panics running it.
    pub(crate) fn run_many(&mut self, sets: &[&[(String, Tensor)]]) -> Vec<Result<TVec<TValue>>> {
        let prepared: Vec<_> = sets.iter().map(|t| self.prepare(t)).collect();
        prepared
            .into_par_iter()
            .map(|p| {
                let (plan, values) = p?;
                guarded("running the model", || plan.run(values))
            })
            .collect()
    }

    /// The plan for these inputs' types and shapes (built and cached when new) and the values
    /// to feed it, in graph input order.
    fn prepare(&mut self, tensors: &[(String, Tensor)]) -> Result<(Plan, TVec<TValue>)> {
        let mut fed: Vec<&Tensor> = Vec::new();
        for name in &self.inputs {
            let t = tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| anyhow!("no tensor for graph input `{name}`"))?;
            fed.push(t);
        }
        let shapes: Vec<(DatumType, Vec<usize>)> = fed
            .iter()
            .map(|t| (t.datum_type(), t.shape().to_vec()))
            .collect();
        let resolved = self.ifs.as_mut().map(|r| r.resolve(tensors));
        let key = (
            shapes,
            resolved.as_ref().map(|r| r.1.clone()).unwrap_or_default(),
        );
        let plan = match self.plans.iter().find(|(k, _)| *k == key) {
            Some((_, p)) => p.clone(),
            None => {
                let mut m = match &resolved {
                    Some((p, outcome)) if !outcome.is_empty() => {
                        guarded("loading the model", || parse(p, None))?
                    }
                    _ => self.model.clone(),
                };
                let plan = guarded("planning the model", || {
                    for (ix, t) in fed.iter().enumerate() {
                        m.set_input_fact(ix, InferenceFact::dt_shape_from_tensor(t))?;
                    }
                    let typed = m.into_typed()?;
                    // tract's optimizer makes a model several times faster; a model it cannot
                    // optimize runs as typed.
                    match self.optimize.then(|| typed.clone().into_optimized()) {
                        Some(Ok(o)) => o.into_runnable(),
                        _ => typed.into_runnable(),
                    }
                })?;
                if self.plans.len() >= MAX_PLANS {
                    self.plans.remove(0);
                }
                self.plans.push((key, plan.clone()));
                plan
            }
        };
        let values: TVec<TValue> = fed.iter().map(|t| (*t).clone().into_tvalue()).collect();
        Ok((plan, values))
    }
}

/// `proto` parsed by tract (external data read from `dir`), as [`crate::verify::tract_run::load`].
///
/// Errors: tract cannot read or load the model, or it reads undefined values.
fn parse(proto: &pb::ModelProto, dir: Option<&Path>) -> Result<InferenceModel> {
    crate::verify::tract_run::load(proto, dir).context("tract cannot load the model")
}

/// A runnable tract plan, shared between threads.
pub(crate) type Plan = Arc<TypedRunnableModel>;

/// How many of a float tensor's values are NaN or infinite (0 for other types).
pub(crate) fn non_finite(t: &Tensor) -> usize {
    float_values(t).map_or(0, |v| v.iter().filter(|x| !x.is_finite()).count())
}

/// The float values of a tract tensor as f32, or `None` for other types.
pub(crate) fn float_values(t: &Tensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    match t.datum_type() {
        DatumType::F32 => t
            .try_as_plain_ram()
            .ok()
            .and_then(|v| v.as_slice::<f32>().ok())
            .map(std::borrow::Cow::Borrowed),
        DatumType::F16 | DatumType::F64 => t
            .cast_to::<f32>()
            .ok()
            .and_then(|c| {
                c.try_as_plain_ram()
                    .ok()
                    .and_then(|v| v.as_slice::<f32>().ok().map(|s| s.to_vec()))
            })
            .map(std::borrow::Cow::Owned),
        _ => None,
    }
}

/// The calibrations made with one [`CalibrationOptions`] and its clones (at most
/// 8, the oldest dropped first), keyed by a hash of the probed model, the
/// options and the sample files. Clones share it; every instance compares equal, so options
/// compare by their values only.
#[derive(Clone, Default)]
pub struct CalibrationCache(Arc<Mutex<Vec<CacheEntry>>>);

/// A key of a [`CalibrationCache`] and the calibration it found.
type CacheEntry = (u64, Arc<Calibration>);

impl std::fmt::Debug for CalibrationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|c| c.len()).unwrap_or(0);
        write!(f, "CalibrationCache({n} entries)")
    }
}

impl PartialEq for CalibrationCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl CalibrationCache {
    fn get(&self, key: u64) -> Option<Arc<Calibration>> {
        let c = self.0.lock().ok()?;
        c.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
    }

    fn insert(&self, key: u64, value: Arc<Calibration>) {
        if let Ok(mut c) = self.0.lock() {
            if c.len() >= CACHE_ENTRIES {
                c.remove(0);
            }
            c.push((key, value));
        }
    }
}

/// Most unreadable calibration samples listed in one error (the rest are counted).
const MAX_LISTED_PROBLEMS: usize = 20;

/// Most calibrations one [`CalibrationCache`] keeps.
const CACHE_ENTRIES: usize = 8;

/// Calibrates the tensors `names` of `proto` (the model as the pass sees it) on the samples of
/// `opts` and returns their ranges (see the module documentation).
///
/// Errors: the source cannot be read or lacks a graph input (the message names the sample
/// file and the input), or tract cannot load, plan or run the model on a sample (the message
/// names the sample).
pub fn calibrate(
    proto: &pb::ModelProto,
    names: &BTreeSet<String>,
    opts: &CalibrationOptions,
) -> Result<Arc<Calibration>> {
    // What the CLI refuses, refused here too for library callers.
    if let RangeMethod::Percentile { percentile } = opts.method {
        ensure!(
            percentile > 50.0 && percentile <= 100.0,
            "the calibration percentile must be in (50, 100], not {percentile}"
        );
    }
    ensure!(
        matches!(
            opts.activation_type,
            crate::quant::QType::Uint8 | crate::quant::QType::Int8
        ),
        "activations are quantized to uint8 or int8, not {:?}",
        opts.activation_type
    );
    let samples = Samples::open(&opts.source, proto, opts.max_samples.max(1))?;
    let probed = crate::fallback::with_probes(proto.clone(), names);
    let bytes = probed.encode_to_vec();
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    format!(
        "{:?}|{}|{:?}",
        opts.method, opts.max_samples, opts.activation_type
    )
    .hash(&mut h);
    for f in samples.files() {
        f.hash(&mut h);
        if let Ok(m) = std::fs::metadata(&f) {
            m.len().hash(&mut h);
            m.modified().ok().hash(&mut h);
        }
    }
    let key = h.finish();
    if let Some(c) = opts.cache.get(key) {
        let mut hit = (*c).clone();
        hit.cached = true;
        return Ok(Arc::new(hit));
    }
    let result = Arc::new(run_calibration(&probed, names, samples, opts)?);
    opts.cache.insert(key, result.clone());
    Ok(result)
}

fn run_calibration(
    probed: &pb::ModelProto,
    names: &BTreeSet<String>,
    samples: Samples,
    opts: &CalibrationOptions,
) -> Result<Calibration> {
    let histogram = !matches!(opts.method, RangeMethod::MinMax);
    // Ranges need not be bit-exact: tract's optimized plan, about 4x faster on ppocrv4-rec.
    let mut runner = Runner::new(probed, true)?;
    let mut collected = Collected {
        names,
        histogram,
        stats: HashMap::new(),
        shapes: HashMap::new(),
        samples: 0,
        empty_samples: 0,
    };
    // Samples run in parallel, as many at a time as there are threads; statistics are updated
    // in sample order, so the result does not depend on threads.
    // The first problem in sample order is reported, as a run of one sample at a time would,
    // whatever the number of threads.
    let threads = rayon::current_num_threads().max(1);
    let mut samples = samples.peekable();
    while samples.peek().is_some() {
        let mut chunk: Vec<Sample> = Vec::with_capacity(threads);
        let mut unreadable = None;
        for s in samples.by_ref().take(threads) {
            match s {
                Ok(s) => chunk.push(s),
                Err(e) => {
                    unreadable = Some(e);
                    break;
                }
            }
        }
        let sets: Vec<&[(String, Tensor)]> = chunk.iter().map(|s| s.tensors.as_slice()).collect();
        let results = runner.run_many(&sets);
        for (sample, outs) in chunk.iter().zip(results) {
            let outs = outs.with_context(|| format!("calibration sample {}", sample.label))?;
            collected.add(&runner.outputs, &outs, &sample.label)?;
        }
        if let Some(first) = unreadable {
            // A sample cannot be fed: the others are read (not run) so that every such
            // problem is reported at once.
            let mut problems = vec![format!("{first:#}")];
            problems.extend(samples.filter_map(|s| s.err().map(|e| format!("{e:#}"))));
            let n = problems.len();
            let shown = problems.len().min(MAX_LISTED_PROBLEMS);
            bail!(
                "{} calibration sample(s) cannot be fed to the model:\n  {}{}",
                n,
                problems[..shown].join("\n  "),
                if n > shown {
                    format!("\n  ... and {} more", n - shown)
                } else {
                    String::new()
                }
            );
        }
    }
    ensure!(collected.samples > 0, "no calibration sample was read");
    let ranges = collected
        .stats
        .iter()
        .filter_map(|(n, s)| Some((n.clone(), s.range(&opts.method, opts.activation_type)?)))
        .collect();
    Ok(Calibration {
        ranges,
        shapes: collected.shapes,
        samples: collected.samples,
        empty_samples: collected.empty_samples,
        cached: false,
    })
}

/// Running statistics of the activations being calibrated: per name, its [`Stats`] and the
/// shape it had in the first sample.
struct Collected<'a> {
    names: &'a BTreeSet<String>,
    histogram: bool,
    stats: HashMap<String, Stats>,
    shapes: HashMap<String, Vec<usize>>,
    samples: usize,
    empty_samples: usize,
}

impl Collected<'_> {
    /// Adds one sample's graph outputs `outs` (named `outputs`).
    ///
    /// Errors: tract returned another number of outputs than the model declares.
    fn add(&mut self, outputs: &[String], outs: &TVec<TValue>, label: &str) -> Result<()> {
        ensure!(
            outs.len() == outputs.len(),
            "calibration sample {label}: tract returned {} outputs, the model declares {}",
            outs.len(),
            outputs.len()
        );
        let wanted: Vec<(&String, &TValue)> = outputs
            .iter()
            .zip(outs.iter())
            .filter(|(n, _)| self.names.contains(*n))
            .collect();
        for (name, v) in &wanted {
            if self.samples == 0 {
                self.shapes.insert((*name).clone(), v.shape().to_vec());
            }
            let histogram = self.histogram;
            self.stats
                .entry((*name).clone())
                .or_insert_with(|| Stats::new(histogram));
        }
        if !wanted.is_empty() && wanted.iter().all(|(_, v)| v.len() == 0) {
            self.empty_samples += 1;
        }
        let mut refs: Vec<(&Tensor, &mut Stats)> = Vec::new();
        let mut by_name: HashMap<&String, &TValue> = wanted.into_iter().collect();
        for (name, st) in self.stats.iter_mut() {
            if let Some(v) = by_name.remove(name) {
                refs.push((&**v, st));
            }
        }
        refs.into_par_iter().for_each(|(t, st)| {
            if let Some(v) = float_values(t) {
                st.update(&v);
            } else {
                st.non_finite = true; // not a float tensor: never quantized
            }
        });
        self.samples += 1;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn gaussian(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller.
                let u: f64 = rng.random_range(1e-12..1.0);
                let v: f64 = rng.random();
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    fn exact_percentile(v: &[f32], p: f64) -> f32 {
        let mut s = v.to_vec();
        s.sort_by(f32::total_cmp);
        s[((p / 100.0) * (s.len() - 1) as f64).round() as usize]
    }

    /// The error a calibration gives names the first sample in order that fails, and that
    /// sample, whatever the number of threads (it named the first sample of the failing
    /// chunk, and a sample that could not be read hid an earlier one that failed to run).
    #[test]
    fn the_first_failing_sample_is_named_whatever_the_threads() {
        use crate::verify::inputs::save_npz;
        use crate::verify::testutil::{dims_info, init_f32, init_i64, model, node, out, Dim};
        // Reshape to [1, 12]: a sample of 2 rows fails in tract's planning.
        let proto = model(
            vec![
                node("Reshape", "reshape", &["x", "S"], &["r"], vec![]),
                node("MatMul", "mm", &["r", "W"], &["y"], vec![]),
            ],
            vec![dims_info(
                "x",
                crate::pb::tensor_proto::DataType::Float,
                &[Dim::P("N"), Dim::N(12)],
            )],
            vec![out("y")],
            vec![
                init_f32("W", &[12, 4], &[0.5; 48]),
                init_i64("S", &[2], &[1, 12]),
            ],
        );
        let rows = |n: usize| Tensor::from_shape(&[n, 12], &vec![1f32; n * 12]).unwrap();
        // (samples: rows of `x`, 0 for a file without `x`; the sample the error must name)
        let cases: [(&[usize], &str); 3] = [
            (&[1, 2, 1], "s1.npz: "),
            (&[2, 0], "s0.npz: "),
            (&[1, 1, 0, 2], "s2.npz: no array for graph input `x`"),
        ];
        let names = BTreeSet::from(["r".to_string()]);
        for (samples, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            for (i, &n) in samples.iter().enumerate() {
                let key = if n == 0 { "not_x" } else { "x" };
                let arrays = [(key.to_string(), rows(n.max(1)))];
                save_npz(&dir.path().join(format!("s{i}.npz")), &arrays).unwrap();
            }
            for threads in [1, 2, 3] {
                let opts = CalibrationOptions {
                    source: dir.path().to_path_buf(),
                    method: RangeMethod::MinMax,
                    max_samples: 16,
                    activation_type: crate::quant::QType::Uint8,
                    cache: Default::default(),
                };
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let err = pool
                    .install(|| calibrate(&proto, &names, &opts))
                    .unwrap_err();
                let msg = format!("{err:#}");
                assert!(
                    msg.contains(want),
                    "{samples:?} at {threads} thread(s): {msg}"
                );
                let named = msg.matches(".npz").count();
                assert_eq!(named, 1, "{samples:?} at {threads} thread(s): {msg}");
            }
        }
    }

    /// One .npz holding 0 samples along axis 0 is refused naming the file and the array (it
    /// said "no calibration sample was read").
    #[test]
    fn a_stacked_file_of_no_samples_is_refused_naming_it() {
        use crate::verify::inputs::save_npz;
        use crate::verify::testutil::{info, model, node, out};
        let proto = model(
            vec![node("Relu", "relu", &["x"], &["y"], vec![])],
            vec![info("x", crate::pb::tensor_proto::DataType::Float, &[1, 4])],
            vec![out("y")],
            vec![],
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("none.npz");
        let empty = Tensor::from_shape(&[0, 1, 4], &[0f32; 0]).unwrap();
        save_npz(&file, &[("x".to_string(), empty)]).unwrap();
        let err = Samples::open(&file, &proto, 8).err().unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("none.npz: array `x` holds 0 samples along axis 0"),
            "{msg}"
        );
    }

    #[test]
    fn finite_min_max_matches_the_plain_loop_and_flags_every_non_finite_value() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let plain = |d: &[f32]| {
            let f: Vec<f32> = d.iter().copied().filter(|v| v.is_finite()).collect();
            let lo = f.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = f.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (lo, hi, f.len() != d.len())
        };
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            let base = gaussian(&mut rng, n);
            assert_eq!(finite_min_max(&base), plain(&base), "n={n}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, n / 2, n.saturating_sub(1)] {
                    if n == 0 {
                        continue;
                    }
                    let mut d = base.clone();
                    d[at] = bad;
                    let (lo, hi, flagged) = finite_min_max(&d);
                    let want = plain(&d);
                    assert!(flagged, "n={n} {bad} at {at}");
                    assert_eq!((lo, hi), (want.0, want.1), "n={n} {bad} at {at}");
                }
            }
        }
        assert_eq!(finite_min_max(&[-0.5, 3.0, 1e30]), (-0.5, 1e30, false));
    }

    #[test]
    fn percentile_on_all_positive_activations_keeps_zero_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut st = Stats::new(true);
        // ReLU-like activations: exponential values >= 0, a third exactly 0, over 4 samples
        // whose maxima grow (the histogram is re-binned on the way).
        let mut all = Vec::new();
        for s in 0..4 {
            let v: Vec<f32> = (0..50_000)
                .map(|i| {
                    if i % 3 == 0 {
                        0.0
                    } else {
                        -(rng.random_range(1e-9..1.0f64).ln() as f32) * (s + 1) as f32
                    }
                })
                .collect();
            st.update(&v);
            all.extend(v);
        }
        let (lo, hi) = st
            .range(&RangeMethod::Percentile { percentile: 99.9 }, QType::Uint8)
            .unwrap();
        assert_eq!(lo, 0.0, "the low tail of non-negative values stays at 0");
        let exact = exact_percentile(&all, 99.9);
        let w = st.hist.as_ref().unwrap().width() as f32;
        assert!(
            hi >= exact && hi <= exact + 2.0 * w,
            "hi {hi} vs exact {exact} (bin {w})"
        );
        assert!(hi < st.max);
        // The zero point of the range is valid: 0 maps to qmin exactly.
        let (s, zp) = crate::quant::scale_zero_point(
            lo,
            hi,
            &crate::quant::Scheme {
                qtype: QType::Uint8,
                symmetric: false,
                granularity: crate::quant::Granularity::Tensor,
                pow2: false,
            },
        );
        assert_eq!(zp, 0);
        assert!(s > 0.0);
    }

    /// The histogram, and so the percentile and entropy ranges, are the same whatever the
    /// order of the samples: 8 samples of growing scale, fed in increasing, decreasing and a
    /// shuffled order (the first sample set the bins, so the same samples reversed gave
    /// entropy scales 0.0170 against 0.0106).
    #[test]
    fn histogram_ranges_do_not_depend_on_the_order_of_the_samples() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let samples: Vec<Vec<f32>> = (0..8)
            .map(|i| {
                let scale = 0.3 * 1.7f32.powi(i);
                gaussian(&mut rng, 4096)
                    .into_iter()
                    .map(|v| (v * scale).max(-0.2 * scale))
                    .collect()
            })
            .collect();
        let orders: [Vec<usize>; 3] = [
            (0..8).collect(),
            (0..8).rev().collect(),
            vec![3, 7, 0, 5, 1, 6, 2, 4],
        ];
        let methods = [
            RangeMethod::Entropy,
            RangeMethod::Percentile { percentile: 99.9 },
            RangeMethod::MinMax,
        ];
        let mut first: Option<Vec<(f32, f32)>> = None;
        for order in &orders {
            let mut st = Stats::new(true);
            for &i in order {
                st.update(&samples[i]);
            }
            let ranges: Vec<(f32, f32)> = methods
                .iter()
                .flat_map(|m| [QType::Uint8, QType::Int8].map(|q| st.range(m, q).unwrap()))
                .collect();
            match &first {
                None => first = Some(ranges),
                Some(f) => assert_eq!(f, &ranges, "order {order:?}"),
            }
        }
    }

    #[test]
    fn percentile_tails_are_separate() {
        // Skewed: negatives in [-1, 0), positives up to 10.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let v: Vec<f32> = (0..100_000)
            .map(|i| {
                if i % 2 == 0 {
                    -rng.random_range(0.0..1.0f32)
                } else {
                    rng.random_range(0.0..10.0f32)
                }
            })
            .collect();
        let mut st = Stats::new(true);
        st.update(&v);
        let (lo, hi) = st
            .range(&RangeMethod::Percentile { percentile: 99.0 }, QType::Uint8)
            .unwrap();
        let (elo, ehi) = (exact_percentile(&v, 1.0), exact_percentile(&v, 99.0));
        let w = st.hist.as_ref().unwrap().width() as f32;
        assert!((lo - elo).abs() <= 2.0 * w, "lo {lo} vs {elo}");
        assert!((hi - ehi).abs() <= 2.0 * w, "hi {hi} vs {ehi}");
    }

    #[test]
    fn entropy_threshold_is_between_the_99th_percentile_and_the_max() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut st = Stats::new(true);
        let mut all = Vec::new();
        for _ in 0..4 {
            let v = gaussian(&mut rng, 250_000);
            st.update(&v);
            all.extend(v);
        }
        let (lo, hi) = st.range(&RangeMethod::Entropy, QType::Int8).unwrap();
        let abs: Vec<f32> = all.iter().map(|v| v.abs()).collect();
        let p99 = exact_percentile(&abs, 99.0);
        let amax = abs.iter().copied().fold(0f32, f32::max);
        assert!(
            hi > p99 && hi < amax,
            "threshold {hi}: p99 {p99}, max {amax}"
        );
        assert!(-lo > p99 && -lo < amax, "threshold {lo}");
        // Non-negative (ReLU) activations as uint8 use the positive side only.
        let mut st = Stats::new(true);
        st.update(&abs);
        let (lo, hi) = st.range(&RangeMethod::Entropy, QType::Uint8).unwrap();
        assert_eq!(lo, 0.0);
        assert!(
            hi > p99 && hi < amax,
            "threshold {hi}: p99 {p99}, max {amax}"
        );
    }

    #[test]
    fn minmax_includes_zero_and_skips_non_finite_tensors() {
        let mut st = Stats::new(false);
        st.update(&[1.0, 2.0]);
        st.update(&[3.0]);
        assert_eq!(
            st.range(&RangeMethod::MinMax, QType::Uint8),
            Some((0.0, 3.0))
        );
        st.update(&[f32::INFINITY]);
        assert_eq!(st.range(&RangeMethod::MinMax, QType::Uint8), None);
        assert_eq!(
            Stats::new(true).range(&RangeMethod::Entropy, QType::Uint8),
            None
        );
    }

    #[test]
    fn histogram_growth_merges_bins_exactly() {
        let mut st = Stats::new(true);
        st.update(&[1.0, 0.5, -0.25]);
        st.update(&[3.0]);
        let h = st.hist.as_ref().unwrap();
        assert_eq!(h.range, 4.0);
        assert_eq!(h.pos.iter().sum::<u64>(), 3);
        assert_eq!(h.neg.iter().sum::<u64>(), 1);
        // The first range is 2, the power of two above 1.0 (1.0 in bin 1024, 0.5 in 512, a
        // magnitude of 0.25 in 256); growing to 4 merges 2 bins into one, which puts every value
        // where the range 4 alone puts it (1.0 was clamped into the last bin of a range of
        // exactly 1, and landed in bin 511 instead of 512).
        assert_eq!(h.pos[512], 1);
        assert_eq!(h.pos[256], 1);
        assert_eq!(h.neg[128], 1);
        assert_eq!(h.pos[1536], 1);
        let mut once = Stats::new(true);
        once.update(&[1.0, 0.5, -0.25, 3.0]);
        let o = once.hist.as_ref().unwrap();
        assert_eq!((o.range, &o.pos, &o.neg), (h.range, &h.pos, &h.neg));
    }
}
