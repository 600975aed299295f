//! Numeric kernels shared by the quantization passes.
//!
//! Linear quantization as in the ONNX QuantizeLinear-21 / DequantizeLinear-21 specs:
//! `q = saturate(round(x / scale) + zero_point)`, `x' = (q - zero_point) * scale`, with
//! round-half-to-even.

pub mod calibrate;
pub mod nbits;

use std::path::PathBuf;

use rayon::prelude::*;

/// Range estimator used by static quantization's calibration.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "method")]
pub enum RangeMethod {
    /// Smallest and largest value seen.
    MinMax,
    /// The given percentile of each tail, computed separately for the low and the high tail
    /// (e.g. 99.99 keeps 0.01% of the values outside on each side).
    Percentile {
        /// Percentile in (50, 100].
        percentile: f64,
    },
    /// The threshold minimising the KL divergence between the float histogram and its
    /// quantized version (TensorRT's entropy calibration).
    Entropy,
}

/// Where static quantization's calibration data comes from and how ranges are estimated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CalibrationOptions {
    /// An `.npz` file (one sample, or a leading batch axis of samples for every input) or a
    /// folder of `.npz` files (one sample each, read in name order, streamed).
    pub source: PathBuf,
    /// Range estimator.
    pub method: RangeMethod,
    /// Most samples to read.
    pub max_samples: usize,
    /// Activation type: uint8 (asymmetric, onnxruntime's default) or int8 (symmetric).
    pub activation_type: QType,
    /// Calibrations already made with these options, shared by their clones: the
    /// accuracy-gated fallback re-runs the pass on the same model several times and
    /// calibrates once. Not part of the options' value (equal whatever it holds, not
    /// serialized); a new one starts empty.
    #[serde(skip)]
    pub cache: calibrate::CalibrationCache,
}

/// A tensor quantized per channel: `q` in the input's layout, one scale per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct PerAxis {
    /// Quantized values, row-major like the input.
    pub q: Vec<i8>,
    /// Scales, one per index of the quantization axis (float32, > 0, finite).
    pub scales: Vec<f32>,
}

/// Splits `dims` around `axis` into (outer, channels, inner) element counts.
pub fn split_axis(dims: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = dims[..axis].iter().product();
    let inner = dims[axis + 1..].iter().product();
    (outer, dims[axis], inner)
}

/// Symmetric per-channel quantization of `w` (shape `dims`, row-major) along `axis` to signed
/// integers in `[-qmax, qmax]` (127 for int8: the symmetric range, as onnxruntime uses for
/// weights), zero point 0.
///
/// `scale[c] = max_i |w[c, i]| / qmax`; an all-zero channel gets scale 1 (its values quantize
/// to 0 exactly), so no scale is ever 0, NaN or infinite. Returns `None` when `w` holds a NaN
/// or an infinity (such weights are left in float by the callers).
pub fn quantize_symmetric_per_axis(
    w: &[f32],
    dims: &[usize],
    axis: usize,
    qmax: f32,
) -> Option<PerAxis> {
    if w.par_iter().any(|v| !v.is_finite()) {
        return None;
    }
    let (outer, c, inner) = split_axis(dims, axis);
    debug_assert_eq!(outer * c * inner, w.len());
    let scales: Vec<f32> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut amax = 0f32;
            for o in 0..outer {
                let base = (o * c + ch) * inner;
                for v in &w[base..base + inner] {
                    amax = amax.max(v.abs());
                }
            }
            let s = amax / qmax;
            if s > 0.0 && s.is_finite() && s.is_normal() {
                s
            } else if amax > 0.0 {
                // Subnormal ranges: the smallest normal scale still represents them (as 0/±1).
                f32::MIN_POSITIVE
            } else {
                1.0
            }
        })
        .collect();
    let q: Vec<i8> = w
        .par_chunks(inner.max(1))
        .enumerate()
        .flat_map_iter(|(k, chunk)| {
            let s = scales[k % c.max(1)];
            chunk
                .iter()
                .map(move |&v| round_clamped(v / s, -qmax, qmax) as i8)
        })
        .collect();
    Some(PerAxis { q, scales })
}

/// `x` rounded half to even (IEEE 754 roundTiesToEven, as QuantizeLinear rounds) and clamped
/// to the integers `[lo, hi]`: the same value as `x.round_ties_even().clamp(lo, hi)` (zero
/// may come out as +0.0 where that gives -0.0), NaN for NaN, for `|lo|, |hi| <= 2^22`.
///
/// Clamping first keeps `|x| <= 2^22`, where adding and subtracting `1.5 * 2^23` rounds `x` to
/// an integer in the default rounding mode; that is a few instructions where
/// `round_ties_even` is a libm call on x86-64 without SSE4.1 (most of the time of the static
/// quantization pass's weight-scale search, measured on ppocrv4-rec).
#[inline]
pub fn round_clamped(x: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let c = x.clamp(lo, hi);
    (c + MAGIC) - MAGIC
}

/// Integer type of quantized values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QType {
    /// int8, [-128, 127].
    Int8,
    /// uint8, [0, 255].
    Uint8,
    /// int16, [-32768, 32767].
    Int16,
    /// uint16, [0, 65535].
    Uint16,
    /// int4, [-8, 7], two per byte (low nibble first).
    Int4,
    /// uint4, [0, 15], two per byte.
    Uint4,
}

impl QType {
    /// Parses `int8`, `uint8`, `int16`, `uint16`, `int4`, `uint4`.
    pub fn parse(s: &str) -> Option<QType> {
        Some(match s {
            "int8" => QType::Int8,
            "uint8" => QType::Uint8,
            "int16" => QType::Int16,
            "uint16" => QType::Uint16,
            "int4" => QType::Int4,
            "uint4" => QType::Uint4,
            _ => return None,
        })
    }
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            QType::Int8 => "int8",
            QType::Uint8 => "uint8",
            QType::Int16 => "int16",
            QType::Uint16 => "uint16",
            QType::Int4 => "int4",
            QType::Uint4 => "uint4",
        }
    }
    /// Representable range `(qmin, qmax)`.
    pub fn range(self) -> (i32, i32) {
        match self {
            QType::Int8 => (-128, 127),
            QType::Uint8 => (0, 255),
            QType::Int16 => (-32768, 32767),
            QType::Uint16 => (0, 65535),
            QType::Int4 => (-8, 7),
            QType::Uint4 => (0, 15),
        }
    }
    /// True for signed types.
    pub fn signed(self) -> bool {
        matches!(self, QType::Int8 | QType::Int16 | QType::Int4)
    }
    /// ONNX `TensorProto.DataType` code.
    pub fn onnx_type(self) -> i32 {
        use crate::pb::tensor_proto::DataType as D;
        (match self {
            QType::Int8 => D::Int8,
            QType::Uint8 => D::Uint8,
            QType::Int16 => D::Int16,
            QType::Uint16 => D::Uint16,
            QType::Int4 => D::Int4,
            QType::Uint4 => D::Uint4,
        }) as i32
    }
    /// Little-endian `raw_data` of `values` (4-bit types packed two per byte, low nibble
    /// first, as the ONNX spec stores int4/uint4).
    pub fn pack(self, values: &[i32]) -> Vec<u8> {
        match self {
            QType::Int8 | QType::Uint8 => values.iter().map(|&v| v as u8).collect(),
            QType::Int16 | QType::Uint16 => values
                .iter()
                .flat_map(|&v| (v as u16).to_le_bytes())
                .collect(),
            QType::Int4 | QType::Uint4 => values
                .chunks(2)
                .map(|p| {
                    let lo = (p[0] as u8) & 0x0f;
                    let hi = p.get(1).map_or(0, |&v| (v as u8) & 0x0f);
                    lo | (hi << 4)
                })
                .collect(),
        }
    }
}

/// How scales are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per index of the output-channel axis.
    Channel,
    /// One scale per block of this many elements (at least 2, see [`Scheme::check`]) along
    /// the reduction axis (per output channel); a last, shorter block covers the rest
    /// (DequantizeLinear-21 `block_size`).
    Block(usize),
}

/// A quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scheme {
    /// Integer type.
    pub qtype: QType,
    /// Symmetric (zero point at the middle of the range: 0 for signed, 2^(bits-1) for
    /// unsigned) or asymmetric (zero point from the min/max range).
    pub symmetric: bool,
    /// Scale sharing.
    pub granularity: Granularity,
    /// Power-of-two scales: `scale = 2^-b` with the fraction bits `b` chosen from the range,
    /// so `q = round(x * 2^b)` (fixed point, for integer-only targets). Implies symmetric.
    pub pow2: bool,
}

impl Scheme {
    /// Checks what the type cannot: a block size of at least 2 (a block of 1 is a scale per
    /// element; 0 divides by zero).
    ///
    /// Errors: a smaller block size, naming it.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Granularity::Block(bs) = self.granularity {
            anyhow::ensure!(bs >= 2, "the block size must be at least 2, not {bs}");
        }
        Ok(())
    }

    /// The default weight scheme: int8, symmetric, per output channel.
    pub const INT8_CHANNEL: Scheme = Scheme {
        qtype: QType::Int8,
        symmetric: true,
        granularity: Granularity::Channel,
        pow2: false,
    };
}

/// How weight-only quantization writes a quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// Integer initializer + `DequantizeLinear` (or `Cast`/`Mul` below its opset): standard
    /// ONNX, the readers stay as they are.
    #[default]
    Qdq,
    /// 4-bit blocks in onnxruntime's `com.microsoft` `MatMulNBits`, which replaces the MatMul
    /// or Gemm that reads the weight ([`nbits`]); other readers fall back to `Qdq`.
    MatMulNBits,
    /// Integer initializer + `Cast` to float + `Mul` by the scale (`Sub` of the zero point
    /// first when asymmetric), at any opset, per tensor or per channel, 8- or 16-bit. Every
    /// input of these nodes is a constant, so runtimes fold them into a float weight when they
    /// load the model (onnxruntime's constant folding does, and leaves `DequantizeLinear`
    /// alone): the file is smaller and the model runs at float speed, with its float kernels
    /// and fusions (Conv + BatchNormalization, NCHWc) that a `DequantizeLinear` weight blocks.
    Cast,
}

/// A mode of `onnxopt quantize --mode`: which passes run, and the pass options the mode fixes.
///
/// A library caller gets the command line's result by giving [`QuantizeMode::configure`]'s
/// passes and options to [`crate::optimize::optimize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizeMode {
    /// Integer weights dequantized by `DequantizeLinear` (or `Cast` + `Mul`, or
    /// `MatMulNBits`) in the scheme of [`crate::passes::PassOptions::weight_scheme`];
    /// activations stay float.
    WeightOnly,
    /// `DynamicQuantizeLinear` + `MatMulInteger` (`ConvInteger` on request).
    Dynamic,
    /// Calibrated QDQ on activations and weights; needs
    /// [`crate::passes::PassOptions::calibration`].
    Static,
    /// float32 tensors and ops to float16.
    Fp16,
    /// float32 tensors and ops to bfloat16.
    Bf16,
}

/// Choices of `quantize` that change a mode's pipeline rather than a pass's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeChoices {
    /// static: keep a model's opset 10 to 12 (one weight scale per tensor) rather than raise
    /// it to 13 with `upgrade_opset` (`--keep-opset`).
    pub keep_opset: bool,
    /// static, dynamic: the layers left in float keep float weights, rather than int8 weights
    /// per channel in the [`WeightFormat::Cast`] form (`--keep-float-weights`).
    pub keep_float_weights: bool,
}

impl QuantizeMode {
    /// The passes `quantize --mode` runs (a `--passes` list for
    /// [`crate::optimize::OptimizeConfig::passes`]), after setting in `opts` what the mode
    /// fixes: `bf16`, and, in static and dynamic mode unless `keep_float_weights`, the int8
    /// per-channel `Cast` scheme of the weights of layers left in float (they are stored by
    /// a `quantize_weights` run after the mode's pass). Other options of `opts` are kept.
    ///
    /// | mode | passes |
    /// | --- | --- |
    /// | weight-only | `cleanup,quantize_weights,cleanup` |
    /// | dynamic | `cleanup,quantize_dynamic,quantize_weights,cleanup` |
    /// | static | `cleanup,upgrade_opset,quantize_static,quantize_weights,cleanup` |
    /// | fp16, bf16 | `cleanup,convert_fp16,cleanup` |
    pub fn configure(self, opts: &mut crate::passes::PassOptions, choices: ModeChoices) -> String {
        let pass = match self {
            QuantizeMode::WeightOnly => "quantize_weights",
            QuantizeMode::Fp16 | QuantizeMode::Bf16 => "convert_fp16",
            QuantizeMode::Dynamic => "quantize_dynamic",
            QuantizeMode::Static if choices.keep_opset => "quantize_static",
            QuantizeMode::Static => "upgrade_opset,quantize_static",
        };
        opts.bf16 = self == QuantizeMode::Bf16;
        let leftover = matches!(self, QuantizeMode::Static | QuantizeMode::Dynamic)
            && !choices.keep_float_weights;
        if leftover {
            opts.weight_scheme = Some(Scheme::INT8_CHANNEL);
            opts.weight_format = WeightFormat::Cast;
            format!("cleanup,{pass},quantize_weights,cleanup")
        } else {
            format!("cleanup,{pass},cleanup")
        }
    }
}

/// A quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Quantized values in the input's layout (within the type's range).
    pub q: Vec<i32>,
    /// Scales, laid out as `scale_dims`.
    pub scales: Vec<f32>,
    /// Zero points, same layout as the scales.
    pub zero_points: Vec<i32>,
    /// Shape of the scale and zero point tensors: `[]` per tensor, `[C]` per channel, the
    /// weight's shape with the block axis divided (rounded up) per block.
    pub scale_dims: Vec<usize>,
}

/// Largest int8 weight magnitude that onnxruntime's u8 x s8 integer kernels on x86 CPUs
/// without VNNI cannot saturate: their AVX2 path (`vpmaddubsw`) adds two u8 x s8 products into
/// an int16 that saturates, and `2 * 255 * 64 = 32,640` fits where `2 * 255 * 127` does not.
/// This is onnxruntime's `reduce_range` (7-bit weights), documented in its quantization guide
/// for non-VNNI machines.
pub const REDUCED_INT8_MAX: i32 = 64;

impl Quantized {
    /// Narrows symmetric values (zero points 0) to `[-limit, limit]`: every scale is multiplied
    /// by `max_q / limit` and `w` (the values that were quantized, shape `dims`, one scale per
    /// tensor or per slice along `axis`) is quantized again with it. Block scales are left
    /// alone.
    pub fn narrow(&mut self, w: &[f32], dims: &[usize], axis: usize, max_q: i32, limit: i32) {
        if limit >= max_q || self.zero_points.iter().any(|&z| z != 0) {
            return;
        }
        let f = max_q as f32 / limit as f32;
        let granularity = match self.scales.len() {
            1 => Granularity::Tensor,
            n if n == split_axis(dims, axis).1 => Granularity::Channel,
            _ => return,
        };
        for s in &mut self.scales {
            *s *= f;
        }
        let l = limit as f32;
        let idx = ScaleIndex::new(dims, axis, granularity, axis);
        for (i, (q, &v)) in self.q.iter_mut().zip(w).enumerate() {
            let s = self.scales[idx.of(i)];
            *q = if s.is_normal() {
                round_clamped(v / s, -l, l) as i32
            } else {
                0
            };
        }
    }

    /// The dequantized values `(q - zero_point) * scale`, in the input's layout.
    pub fn dequantize(
        &self,
        dims: &[usize],
        axis: usize,
        g: Granularity,
        block_axis: usize,
    ) -> Vec<f32> {
        let idx = ScaleIndex::new(dims, axis, g, block_axis);
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let k = idx.of(i);
                (q - self.zero_points[k]) as f32 * self.scales[k]
            })
            .collect()
    }
}

/// Maps an element's flat index to the index of its scale.
struct ScaleIndex {
    strides: Vec<usize>,
    dims: Vec<usize>,
    g: Granularity,
    axis: usize,
    block_axis: usize,
    scale_strides: Vec<usize>,
}

impl ScaleIndex {
    fn new(dims: &[usize], axis: usize, g: Granularity, block_axis: usize) -> Self {
        let mut strides = vec![1; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        let sd = scale_dims(dims, axis, g, block_axis);
        let mut scale_strides = vec![1; sd.len()];
        for i in (0..sd.len().saturating_sub(1)).rev() {
            scale_strides[i] = scale_strides[i + 1] * sd[i + 1];
        }
        ScaleIndex {
            strides,
            dims: dims.to_vec(),
            g,
            axis,
            block_axis,
            scale_strides,
        }
    }
    fn of(&self, flat: usize) -> usize {
        match self.g {
            Granularity::Tensor => 0,
            Granularity::Channel => (flat / self.strides[self.axis]) % self.dims[self.axis],
            Granularity::Block(bs) => {
                let mut k = 0;
                for d in 0..self.dims.len() {
                    let mut c = (flat / self.strides[d]) % self.dims[d];
                    if d == self.block_axis {
                        c /= bs;
                    }
                    k += c * self.scale_strides[d];
                }
                k
            }
        }
    }
}

/// Shape of the scale tensor for a weight of shape `dims`.
pub fn scale_dims(dims: &[usize], axis: usize, g: Granularity, block_axis: usize) -> Vec<usize> {
    match g {
        Granularity::Tensor => vec![],
        Granularity::Channel => vec![dims[axis]],
        Granularity::Block(bs) => {
            let mut d = dims.to_vec();
            d[block_axis] = d[block_axis].div_ceil(bs.max(1));
            d
        }
    }
}

/// Scale and zero point for values in `[lo, hi]` under `scheme` (ONNX QuantizeLinear range
/// conventions: the range always includes 0, so 0 is exactly representable).
pub fn scale_zero_point(lo: f32, hi: f32, scheme: &Scheme) -> (f32, i32) {
    let (qmin, qmax) = scheme.qtype.range();
    let lo = lo.min(0.0);
    let hi = hi.max(0.0);
    let fix = |s: f32| {
        if s > 0.0 && s.is_normal() {
            s
        } else if s > 0.0 {
            f32::MIN_POSITIVE
        } else {
            1.0
        }
    };
    if scheme.symmetric || scheme.pow2 {
        let amax = lo.abs().max(hi);
        // Symmetric ranges: signed [-qmax, qmax] around 0; unsigned around the middle.
        let (half, zp) = if scheme.qtype.signed() {
            (qmax as f32, 0)
        } else {
            (((qmax - qmin) / 2) as f32, (qmax + 1) / 2)
        };
        let mut s = fix(amax / half);
        if scheme.pow2 && amax > 0.0 {
            // Fraction bits b: the largest with amax * 2^b <= half.
            let b = (half / amax).log2().floor();
            s = (-b).exp2();
            // Weights below about 1e-36 would need b >= 127 (`half / amax` may even overflow
            // to infinity): the scale stays at the smallest normal power of two, 2^-126,
            // where 0 or a subnormal would make DequantizeLinear degenerate.
            if !s.is_normal() {
                s = f32::MIN_POSITIVE;
            }
        }
        (s, zp)
    } else {
        // The width in f64: `hi - lo` of two finite float32 can overflow (2e38 - -2e38).
        let s = fix(((hi as f64 - lo as f64) / (qmax - qmin) as f64) as f32);
        let zp = (qmin as f32 - lo / s).round_ties_even() as i32;
        (s, zp.clamp(qmin, qmax))
    }
}

/// Why the weight passes leave a float weight `w` in float, or `None` when it can be
/// quantized: it holds NaN or infinity (no scale covers them), or its largest magnitude is
/// subnormal, below 2^-126 (about 1.18e-38): every value would quantize to 0, and runtimes that
/// flush subnormals to zero (tract does) would compute the original otherwise than a runtime
/// that keeps them, so no check could tell what was lost.
pub fn unquantizable(w: &[f32]) -> Option<&'static str> {
    let (amax, finite) = w
        .par_chunks(1 << 16)
        .map(|c| {
            c.iter().fold((0f32, true), |(m, ok), v| {
                (m.max(v.abs()), ok && v.is_finite())
            })
        })
        .reduce(|| (0.0, true), |(m, a), (n, b)| (m.max(n), a && b));
    if !finite {
        Some("holds NaN or infinity")
    } else if amax > 0.0 && amax < f32::MIN_POSITIVE {
        Some("holds only subnormal values (below 1.18e-38), which quantize to 0")
    } else {
        None
    }
}

/// Runs (elements sharing one scale, in a row) shorter than this are walked a row at a time.
const MIN_PARALLEL_RUN: usize = 1024;

/// Quantizes `w` (shape `dims`, row-major) under `scheme`. `axis` is the output-channel axis
/// (per-channel scales), `block_axis` the reduction axis that blocks run along.
///
/// `q = clamp(round_half_even(w / scale) + zero_point, qmin, qmax)` (QuantizeLinear-21).
/// Returns `None` when `w` holds NaN or infinity.
pub fn quantize(
    w: &[f32],
    dims: &[usize],
    axis: usize,
    block_axis: usize,
    scheme: &Scheme,
) -> Option<Quantized> {
    let sd = scale_dims(dims, axis, scheme.granularity, block_axis);
    let n_scales: usize = sd.iter().product::<usize>().max(1);
    // Per tensor and per channel, elements come in contiguous runs that share one scale:
    // run j belongs to scale j % n_scales. Blocks take the general index map.
    let run = match scheme.granularity {
        Granularity::Tensor => Some(1 << 16),
        Granularity::Channel => Some(split_axis(dims, axis).2.max(1)),
        Granularity::Block(_) => None,
    };
    let idx = ScaleIndex::new(dims, axis, scheme.granularity, block_axis);
    let mut lo = vec![f32::INFINITY; n_scales];
    let mut hi = vec![f32::NEG_INFINITY; n_scales];
    // Short runs (a MatMul weight's channels are its last axis: runs of one element) are
    // walked a row of `n_scales` runs at a time, each thread folding rows into its own
    // per-scale ranges; one task per run made a 12-byte range per element (3x the weight).
    let by_rows = run.is_some_and(|len| len < MIN_PARALLEL_RUN);
    match run {
        Some(len) if by_rows => {
            let fresh = || {
                (
                    vec![f32::INFINITY; n_scales],
                    vec![f32::NEG_INFINITY; n_scales],
                    true,
                )
            };
            let (l, h, ok) = w
                .par_chunks(len * n_scales)
                .fold(fresh, |(mut l, mut h, mut ok), row| {
                    for (k, r) in row.chunks(len).enumerate() {
                        for &v in r {
                            l[k] = l[k].min(v);
                            h[k] = h[k].max(v);
                            ok &= v.is_finite();
                        }
                    }
                    (l, h, ok)
                })
                .reduce(fresh, |(mut l, mut h, ok), (l2, h2, ok2)| {
                    for k in 0..n_scales {
                        l[k] = l[k].min(l2[k]);
                        h[k] = h[k].max(h2[k]);
                    }
                    (l, h, ok && ok2)
                });
            if !ok {
                return None;
            }
            (lo, hi) = (l, h);
        }
        Some(len) => {
            let ranges: Vec<(f32, f32, bool)> = w
                .par_chunks(len)
                .map(|r| {
                    r.iter().fold(
                        (f32::INFINITY, f32::NEG_INFINITY, true),
                        |(l, h, ok), &v| (l.min(v), h.max(v), ok && v.is_finite()),
                    )
                })
                .collect();
            for (j, (l, h, ok)) in ranges.into_iter().enumerate() {
                if !ok {
                    return None;
                }
                let k = j % n_scales;
                lo[k] = lo[k].min(l);
                hi[k] = hi[k].max(h);
            }
        }
        None => {
            for (i, &v) in w.iter().enumerate() {
                if !v.is_finite() {
                    return None;
                }
                let k = idx.of(i);
                lo[k] = lo[k].min(v);
                hi[k] = hi[k].max(v);
            }
        }
    }
    let (scales, zero_points): (Vec<f32>, Vec<i32>) = lo
        .iter()
        .zip(&hi)
        .map(|(&l, &h)| {
            if l > h {
                (1.0, scale_zero_point(0.0, 0.0, scheme).1)
            } else {
                scale_zero_point(l, h, scheme)
            }
        })
        .unzip();
    let (qmin, qmax) = scheme.qtype.range();
    let (qmin, qmax) = if scheme.symmetric && scheme.qtype.signed() {
        (-qmax, qmax)
    } else {
        (qmin, qmax)
    };
    let quant = |v: f32, k: usize| {
        let z = zero_points[k];
        round_clamped(v / scales[k], (qmin - z) as f32, (qmax - z) as f32) as i32 + z
    };
    // Written in place into a buffer of the final size (collecting a flat map grows it by
    // doubling: up to three times the result at once on a large weight).
    let mut q = vec![0i32; w.len()];
    match run {
        Some(len) if by_rows => q
            .par_chunks_mut(len * n_scales)
            .zip(w.par_chunks(len * n_scales))
            .for_each(|(out, row)| {
                for (k, (o, r)) in out.chunks_mut(len).zip(row.chunks(len)).enumerate() {
                    for (o, &v) in o.iter_mut().zip(r) {
                        *o = quant(v, k);
                    }
                }
            }),
        Some(len) => q
            .par_chunks_mut(len)
            .zip(w.par_chunks(len))
            .enumerate()
            .for_each(|(j, (out, r))| {
                let k = j % n_scales;
                for (o, &v) in out.iter_mut().zip(r) {
                    *o = quant(v, k);
                }
            }),
        None => q
            .par_iter_mut()
            .zip(w.par_iter())
            .enumerate()
            .for_each(|(i, (o, &v))| *o = quant(v, idx.of(i))),
    }
    Some(Quantized {
        q,
        scales,
        zero_points,
        scale_dims: sd,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Asymmetric scales of a range wider than float32 can hold (max - min of two finite
    /// values overflows): the width is taken in f64, so the scale is finite and the values
    /// come back within half a step (it was the smallest normal scale, and the channel
    /// dequantized to about 0).
    #[test]
    fn asymmetric_ranges_wider_than_float32_get_a_finite_scale() {
        for qtype in [QType::Int8, QType::Uint8, QType::Uint16, QType::Uint4] {
            let scheme = Scheme {
                qtype,
                symmetric: false,
                granularity: Granularity::Channel,
                pow2: false,
            };
            let (lo, hi) = (-2.0e38f32, 3.0e38f32);
            let (s, z) = scale_zero_point(lo, hi, &scheme);
            let (qmin, qmax) = qtype.range();
            let want = ((hi as f64 - lo as f64) / (qmax - qmin) as f64) as f32;
            assert!(
                s.is_finite() && (s / want - 1.0).abs() < 1e-6,
                "{qtype:?}: {s} vs {want}"
            );
            assert!((qmin..=qmax).contains(&z), "{qtype:?}: {z}");
            let w = [lo, -1.5, 0.0, 2.5e37, hi];
            let r = quantize(&w, &[5, 1], 1, 0, &scheme).unwrap();
            let d = r.dequantize(&[5, 1], 1, scheme.granularity, 0);
            for (a, b) in w.iter().zip(&d) {
                assert!(
                    ((a - b).abs() as f64) <= 0.5 * s as f64 * 1.0001,
                    "{qtype:?}: {a} -> {b}"
                );
            }
        }
    }

    /// Each mode gives the command line's passes, and fixes only the options the mode owns:
    /// static and dynamic store the weights of layers left in float in int8 per channel in
    /// the cast form (unless asked to keep them float), bf16 sets `bf16`, and a weight-only
    /// scheme is left as given.
    #[test]
    fn each_mode_configures_the_command_lines_pipeline() {
        use crate::passes::PassOptions;
        let int4 = Scheme {
            qtype: QType::Int4,
            symmetric: false,
            granularity: Granularity::Block(32),
            pow2: false,
        };
        let given = || PassOptions {
            weight_scheme: Some(int4),
            weight_format: WeightFormat::MatMulNBits,
            bf16: true,
            ..Default::default()
        };
        let float_weights = ModeChoices {
            keep_float_weights: true,
            ..Default::default()
        };
        let keep_opset = ModeChoices {
            keep_opset: true,
            ..Default::default()
        };
        let cases = [
            (
                QuantizeMode::WeightOnly,
                ModeChoices::default(),
                "cleanup,quantize_weights,cleanup",
                Some(int4),
                WeightFormat::MatMulNBits,
                false,
            ),
            (
                QuantizeMode::Dynamic,
                ModeChoices::default(),
                "cleanup,quantize_dynamic,quantize_weights,cleanup",
                Some(Scheme::INT8_CHANNEL),
                WeightFormat::Cast,
                false,
            ),
            (
                QuantizeMode::Dynamic,
                float_weights,
                "cleanup,quantize_dynamic,cleanup",
                Some(int4),
                WeightFormat::MatMulNBits,
                false,
            ),
            (
                QuantizeMode::Static,
                ModeChoices::default(),
                "cleanup,upgrade_opset,quantize_static,quantize_weights,cleanup",
                Some(Scheme::INT8_CHANNEL),
                WeightFormat::Cast,
                false,
            ),
            (
                QuantizeMode::Static,
                keep_opset,
                "cleanup,quantize_static,quantize_weights,cleanup",
                Some(Scheme::INT8_CHANNEL),
                WeightFormat::Cast,
                false,
            ),
            (
                QuantizeMode::Fp16,
                ModeChoices::default(),
                "cleanup,convert_fp16,cleanup",
                Some(int4),
                WeightFormat::MatMulNBits,
                false,
            ),
            (
                QuantizeMode::Bf16,
                ModeChoices::default(),
                "cleanup,convert_fp16,cleanup",
                Some(int4),
                WeightFormat::MatMulNBits,
                true,
            ),
        ];
        for (mode, choices, passes, scheme, format, bf16) in cases {
            let mut o = given();
            assert_eq!(
                mode.configure(&mut o, choices),
                passes,
                "{mode:?} {choices:?}"
            );
            assert_eq!(
                (o.weight_scheme, o.weight_format, o.bf16),
                (scheme, format, bf16),
                "{mode:?}"
            );
            // Every pass named exists.
            assert!(crate::passes::parse_pipeline(passes).is_ok(), "{passes}");
        }
    }

    /// Channels along a later axis (short runs, walked by rows) and along the first (long
    /// runs, one task each) give each channel the scale of its own values, whatever the
    /// layout: checked against a plain per-channel loop.
    #[test]
    fn per_channel_scales_by_rows_and_by_runs_match_a_plain_loop() {
        for (dims, axis) in [
            (vec![300usize, 7], 1usize),
            (vec![5, 9, 4], 1),
            (vec![6, 2000], 0),
        ] {
            let n: usize = dims.iter().product();
            let w: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 97.0)
                .collect();
            let (outer, c, inner) = split_axis(&dims, axis);
            let r = quantize(&w, &dims, axis, axis, &Scheme::INT8_CHANNEL).unwrap();
            for ch in 0..c {
                let amax = (0..outer)
                    .flat_map(|o| (0..inner).map(move |t| (o * c + ch) * inner + t))
                    .map(|i| w[i].abs())
                    .fold(0f32, f32::max);
                let want = amax / 127.0;
                assert!(
                    (r.scales[ch] - want).abs() <= want * 1e-6,
                    "{dims:?} axis {axis} channel {ch}: {} vs {want}",
                    r.scales[ch]
                );
            }
            for (i, (&q, &v)) in r.q.iter().zip(&w).enumerate() {
                let ch = (i / inner) % c;
                assert_eq!(q, (v / r.scales[ch]).round() as i32, "{dims:?} element {i}");
            }
        }
    }

    #[test]
    fn per_axis_scales_and_values() {
        // [2, 3]: channel axis 1.
        let w = [1.0, -2.0, 0.0, 0.5, 4.0, 0.0];
        let r = quantize_symmetric_per_axis(&w, &[2, 3], 1, 127.0).unwrap();
        assert_eq!(r.scales, vec![1.0 / 127.0, 4.0 / 127.0, 1.0]);
        assert_eq!(r.q, vec![127, -64, 0, 64, 127, 0]);
    }

    #[test]
    fn all_zero_channel_gets_unit_scale() {
        let w = [0.0f32; 8];
        let r = quantize_symmetric_per_axis(&w, &[2, 4], 0, 127.0).unwrap();
        assert_eq!(r.scales, vec![1.0, 1.0]);
        assert!(r.q.iter().all(|&q| q == 0));
    }

    #[test]
    fn generic_matches_per_axis_int8() {
        let w: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let a = quantize_symmetric_per_axis(&w, &[4, 6], 0, 127.0).unwrap();
        let b = quantize(&w, &[4, 6], 0, 1, &Scheme::INT8_CHANNEL).unwrap();
        assert_eq!(a.scales, b.scales);
        assert_eq!(a.q.iter().map(|&q| q as i32).collect::<Vec<_>>(), b.q);
        assert!(b.zero_points.iter().all(|&z| z == 0));
    }

    #[test]
    fn blocks_with_a_short_last_block() {
        // K = 100 along axis 0, N = 2, block 32: 4 blocks (32, 32, 32, 4) per column.
        let w: Vec<f32> = (0..200).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Scheme {
            qtype: QType::Int4,
            symmetric: true,
            granularity: Granularity::Block(32),
            pow2: false,
        };
        let r = quantize(&w, &[100, 2], 1, 0, &s).unwrap();
        assert_eq!(r.scale_dims, vec![4, 2]);
        assert!(r.q.iter().all(|&q| (-7..=7).contains(&q)));
        let d = r.dequantize(&[100, 2], 1, s.granularity, 0);
        for (k, (x, y)) in w.iter().zip(&d).enumerate() {
            let sc = r.scales[(k / 2 / 32) * 2 + k % 2];
            assert!((x - y).abs() <= sc / 2.0 + 1e-6, "{k}: {x} vs {y}");
        }
        // The last block's scale comes from its 4 rows only.
        let amax = (96..100).map(|r| w[r * 2].abs()).fold(0f32, f32::max);
        assert!((r.scales[6] - amax / 7.0).abs() < 1e-7);
    }

    #[test]
    fn asymmetric_uint8_covers_the_range() {
        let w = [0.5f32, 1.0, 2.0, 3.0];
        let s = Scheme {
            qtype: QType::Uint8,
            symmetric: false,
            granularity: Granularity::Tensor,
            pow2: false,
        };
        let r = quantize(&w, &[4], 0, 0, &s).unwrap();
        // Range [0, 3] -> scale 3/255, zero point 0.
        assert!((r.scales[0] - 3.0 / 255.0).abs() < 1e-9);
        assert_eq!(r.zero_points, vec![0]);
        assert_eq!(r.q[3], 255);
        let w = [-1.0f32, 3.0];
        let r = quantize(&w, &[2], 0, 0, &s).unwrap();
        assert_eq!(r.zero_points, vec![64]);
        assert_eq!(r.q, vec![0, 255]);
    }

    #[test]
    fn pow2_scales_are_powers_of_two() {
        let w = [0.3f32, -0.9, 0.05];
        let s = Scheme {
            qtype: QType::Int8,
            symmetric: true,
            granularity: Granularity::Tensor,
            pow2: true,
        };
        let r = quantize(&w, &[3], 0, 0, &s).unwrap();
        // 0.9 * 2^b <= 127 -> b = 7, scale 2^-7.
        assert_eq!(r.scales, vec![1.0 / 128.0]);
        assert_eq!(r.q, vec![38, -115, 6]);
        // Weights too small for a normal power-of-two scale get 2^-126, never 0 or a
        // subnormal (1e-38 made 127 / amax overflow to infinity and the scale 0).
        for tiny in [1e-38f32, 3e-37, 1e-45] {
            let r = quantize(&[tiny, -tiny], &[2], 0, 0, &s).unwrap();
            assert_eq!(r.scales, vec![f32::MIN_POSITIVE], "{tiny}");
        }
    }

    #[test]
    fn int4_packs_low_nibble_first() {
        assert_eq!(QType::Int4.pack(&[1, -1, 7]), vec![0xf1, 0x07]);
        assert_eq!(QType::Uint16.pack(&[258]), vec![2, 1]);
    }

    #[test]
    fn non_finite_weights_are_refused() {
        assert!(quantize_symmetric_per_axis(&[1.0, f32::NAN], &[2], 0, 127.0).is_none());
        assert!(quantize_symmetric_per_axis(&[f32::INFINITY], &[1], 0, 127.0).is_none());
    }

    #[test]
    fn round_half_to_even() {
        // scale 1: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2.
        let w = [127.0, 2.5, 3.5, -2.5];
        let r = quantize_symmetric_per_axis(&w, &[4], 0, 127.0).unwrap();
        // One channel per element along axis 0: each scale is |w|/127.
        assert_eq!(r.q, vec![127, 127, 127, -127]);
        let r = quantize_symmetric_per_axis(&w, &[1, 4], 0, 127.0).unwrap();
        assert_eq!(r.scales, vec![1.0]);
        assert_eq!(r.q, vec![127, 2, 4, -2]);
    }

    #[test]
    fn round_clamped_matches_round_ties_even_then_clamp() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            126.5,
            127.5,
            -127.5,
            -128.5,
            254.5,
            255.5,
            1e-30,
            -1e-30,
            1e30,
            -1e30,
            65535.5,
            -32768.5,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let mut s = 1u64;
        for _ in 0..100_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            xs.push((u - 0.5) * 600.0);
            xs.push(((u - 0.5) * 600.0).round() + 0.5);
        }
        for (lo, hi) in [
            (-127.0, 127.0),
            (-128.0, 127.0),
            (0.0, 255.0),
            (-200.0, 55.0),
        ] {
            for &x in &xs {
                let want = x.round_ties_even().clamp(lo, hi);
                let got = round_clamped(x, lo, hi);
                // Equal values (a rounded -0.3 gives +0.0 here, -0.0 there).
                assert_eq!(got, want, "{x} in [{lo}, {hi}]");
            }
            assert!(round_clamped(f32::NAN, lo, hi).is_nan());
        }
    }
}
