//! Numeric kernels shared by the quantization passes.
//!
//! Linear quantization as in the ONNX QuantizeLinear-21 / DequantizeLinear-21 specs:
//! `q = saturate(round(x / scale) + zero_point)`, `x' = (q - zero_point) * scale`, with
//! round-half-to-even.

use rayon::prelude::*;

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
                .map(move |&v| (v / s).round_ties_even().clamp(-qmax, qmax) as i8)
        })
        .collect();
    Some(PerAxis { q, scales })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
