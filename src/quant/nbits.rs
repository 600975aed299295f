//! Packing of a 2-D weight for onnxruntime's `com.microsoft` `MatMulNBits` with 4 bits.
//!
//! Source: onnxruntime `docs/ContribOperators.md`, `com.microsoft.MatMulNBits` (version 1 of the
//! `com.microsoft` opset), and its CPU kernel (`contrib_ops/cpu/quantization/matmul_nbits.cc`).
//! The operator computes `Y = A @ W (+ bias)` for `A [..., K]` and a constant weight `W [K, N]`
//! stored transposed, as `[N, K]`, quantized in blocks of `block_size` consecutive K values of
//! each output column `n`:
//! - `B`: uint8 `[N, k_blocks, blob_size]` with `k_blocks = ceil(K / block_size)` and
//!   `blob_size = block_size * 4 / 8`; `W[k, n]` with `k = b * block_size + 2j` is the low nibble
//!   of `B[n, b, j]`, `W[k + 1, n]` its high nibble. When K is not a multiple of `block_size`,
//!   the last block is padded with the zero point (the value 0), never read from past the end.
//! - `scales`: `[N, k_blocks]` in A's float type (float32 or float16).
//! - `zero_points`: uint8 `[N, ceil(k_blocks / 2)]`, nibbles packed the same way (block `b` of
//!   row `n` in byte `b / 2`, low nibble first; each row starts on a byte); absent means 8 for
//!   every block.
//! - `W[k, n] = (q - zero_point) * scale` with `q`, `zero_point` in `[0, 15]`.
//!
//! Our int4 values `q` in `[-8, 7]` with zero point `z` are stored as `q + 8` and `z + 8`
//! (`(q + 8) - (z + 8) = q - z`), so symmetric int4 (`z = 0`) is the operator's default zero
//! point 8 and needs no `zero_points` input; symmetric uint4 has `z = 8` already.

use rayon::prelude::*;

use super::{quantize, Granularity, QType, Scheme};

/// A weight packed for `MatMulNBits` (see the module documentation for the layouts).
#[derive(Debug, Clone, PartialEq)]
pub struct NBits {
    /// Input features (rows of `W [K, N]`).
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Block size along K.
    pub block_size: usize,
    /// `ceil(K / block_size)`.
    pub k_blocks: usize,
    /// `B`: `N * k_blocks * block_size / 2` bytes, shape `[N, k_blocks, block_size / 2]`.
    pub b: Vec<u8>,
    /// `scales`, shape `[N, k_blocks]`; rounded to float16 when asked, so they are exactly the
    /// values the model stores.
    pub scales: Vec<f32>,
    /// `zero_points`, shape `[N, ceil(k_blocks / 2)]`; `None` for symmetric schemes (every
    /// zero point is the default 8).
    pub zero_points: Option<Vec<u8>>,
    /// `(q - zero_point) * scale` in the input weight's layout: the weight `MatMulNBits`
    /// multiplies by, for the float-equivalent model.
    pub dequantized: Vec<f32>,
}

impl NBits {
    /// Shape of `B`.
    pub fn b_dims(&self) -> [usize; 3] {
        [self.n, self.k_blocks, self.block_size / 2]
    }
    /// Shape of `scales`.
    pub fn scale_dims(&self) -> [usize; 2] {
        [self.n, self.k_blocks]
    }
    /// Shape of `zero_points`.
    pub fn zero_point_dims(&self) -> [usize; 2] {
        [self.n, self.k_blocks.div_ceil(2)]
    }
}

/// True when `MatMulNBits` accepts `block_size`: a power of two, at least 16.
pub fn valid_block_size(block_size: usize) -> bool {
    block_size >= 16 && block_size.is_power_of_two()
}

/// Quantizes the 2-D weight `w` (row-major, shape `dims`) for `MatMulNBits` under `scheme`,
/// which must be int4 or uint4 with `Granularity::Block` of a valid size
/// ([`valid_block_size`]). `transposed` says that `w` is `[N, K]` (Gemm with `transB = 1`)
/// rather than `[K, N]` (MatMul). `f16_scales` rounds the scales to float16, as stored for a
/// float16 model.
///
/// The values are those of [`quantize`] with blocks along K (round half to even, symmetric
/// int4 in `[-7, 7]`). Returns `None` when `w` holds NaN or infinity or the scheme is not a
/// 4-bit block scheme.
pub fn quantize_nbits(
    w: &[f32],
    dims: [usize; 2],
    transposed: bool,
    scheme: &Scheme,
    f16_scales: bool,
) -> Option<NBits> {
    let Granularity::Block(bs) = scheme.granularity else {
        return None;
    };
    if !valid_block_size(bs) || w.len() != dims[0] * dims[1] {
        return None;
    }
    let offset = match scheme.qtype {
        QType::Int4 => 8,
        QType::Uint4 => 0,
        _ => return None,
    };
    let (k, n) = if transposed {
        (dims[1], dims[0])
    } else {
        (dims[0], dims[1])
    };
    // Output channel axis and the reduction axis the blocks run along.
    let (axis, block_axis) = if transposed { (0, 1) } else { (1, 0) };
    let qz = quantize(w, &dims, axis, block_axis, scheme)?;
    let kb = k.div_ceil(bs);
    // Index of (column n, block b) in `quantize`'s scale layout: [k_blocks, N] or [N, k_blocks].
    let scale_at = |col: usize, b: usize| {
        if transposed {
            col * kb + b
        } else {
            b * n + col
        }
    };
    let round = |s: f32| {
        if f16_scales {
            half::f16::from_f32(s).to_f32()
        } else {
            s
        }
    };
    let mut scales = vec![0f32; n * kb];
    let mut zps = vec![0i32; n * kb];
    for col in 0..n {
        for b in 0..kb {
            scales[col * kb + b] = round(qz.scales[scale_at(col, b)]);
            zps[col * kb + b] = qz.zero_points[scale_at(col, b)] + offset;
        }
    }
    let q_at = |row: usize, col: usize| {
        if transposed {
            col * k + row
        } else {
            row * n + col
        }
    };
    let blob = bs / 2;
    let mut b = vec![0u8; n * kb * blob];
    b.par_chunks_mut(kb * blob)
        .enumerate()
        .for_each(|(col, out)| {
            for kk in 0..kb * bs {
                let v = if kk < k {
                    qz.q[q_at(kk, col)] + offset
                } else {
                    zps[col * kb + kk / bs]
                };
                out[kk / 2] |= ((v as u8) & 0x0f) << (4 * (kk % 2));
            }
        });
    let zero_points = (!scheme.symmetric).then(|| {
        let row = kb.div_ceil(2);
        let mut z = vec![0u8; n * row];
        for col in 0..n {
            for blk in 0..kb {
                z[col * row + blk / 2] |= ((zps[col * kb + blk] as u8) & 0x0f) << (4 * (blk % 2));
            }
        }
        z
    });
    let dequantized = (0..w.len())
        .into_par_iter()
        .map(|i| {
            let (row, col) = if transposed {
                (i % k, i / k)
            } else {
                (i / n, i % n)
            };
            let s = col * kb + row / bs;
            ((qz.q[i] + offset) - zps[s]) as f32 * scales[s]
        })
        .collect();
    Some(NBits {
        k,
        n,
        block_size: bs,
        k_blocks: kb,
        b,
        scales,
        zero_points,
        dequantized,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn scheme(qtype: QType, symmetric: bool, bs: usize) -> Scheme {
        Scheme {
            qtype,
            symmetric,
            granularity: Granularity::Block(bs),
            pow2: false,
        }
    }

    /// Unpacks `B` and the zero points by the layout of the operator's documentation and
    /// checks every element against the dequantized value.
    fn check_layout(w: &[f32], dims: [usize; 2], transposed: bool, s: &Scheme, f16: bool) -> NBits {
        let p = quantize_nbits(w, dims, transposed, s, f16).unwrap();
        let (k, n, bs, kb) = (p.k, p.n, p.block_size, p.k_blocks);
        assert_eq!(p.b.len(), n * kb * bs / 2);
        for col in 0..n {
            for blk in 0..kb {
                let zp = match &p.zero_points {
                    Some(z) => {
                        let byte = z[col * kb.div_ceil(2) + blk / 2];
                        (if blk % 2 == 0 { byte & 0x0f } else { byte >> 4 }) as i32
                    }
                    None => 8,
                };
                let scale = p.scales[col * kb + blk];
                for j in 0..bs {
                    let kk = blk * bs + j;
                    let byte = p.b[(col * kb + blk) * (bs / 2) + j / 2];
                    let q = (if j % 2 == 0 { byte & 0x0f } else { byte >> 4 }) as i32;
                    if kk >= k {
                        assert_eq!(q, zp, "padding of column {col} at k = {kk}");
                        continue;
                    }
                    let i = if transposed {
                        col * k + kk
                    } else {
                        kk * n + col
                    };
                    let d = (q - zp) as f32 * scale;
                    assert_eq!(d, p.dequantized[i], "k = {kk}, n = {col}");
                    assert!(
                        (d - w[i]).abs() <= scale * 0.51 + 1e-6,
                        "k = {kk}, n = {col}: {d} vs {}",
                        w[i]
                    );
                }
            }
        }
        p
    }

    fn ramp(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect()
    }

    #[test]
    fn nbits_layouts_symmetric_and_asymmetric_with_a_padded_last_block() {
        // K = 100, block 32: 4 blocks, the last one holds 4 values and 28 of padding.
        let w = ramp(100 * 3);
        for qtype in [QType::Int4, QType::Uint4] {
            for symmetric in [true, false] {
                let s = scheme(qtype, symmetric, 32);
                let p = check_layout(&w, [100, 3], false, &s, false);
                assert_eq!((p.k, p.n, p.k_blocks), (100, 3, 4));
                assert_eq!(p.zero_points.is_some(), !symmetric);
                let t: Vec<f32> = (0..300).map(|i| w[(i % 100) * 3 + i / 100]).collect();
                let pt = check_layout(&t, [3, 100], true, &s, false);
                assert_eq!(pt.b, p.b, "{qtype:?} symmetric={symmetric}");
                assert_eq!(pt.scales, p.scales);
                assert_eq!(pt.zero_points, p.zero_points);
            }
        }
    }

    #[test]
    fn nbits_hand_computed_bytes() {
        // K = 20, N = 1, block 16: two blocks, the second holds 4 values.
        // Block 0: amax 7 -> scale 1, int4 q = w, stored q + 8.
        let mut w = vec![0f32; 20];
        w[0] = 7.0;
        w[1] = -7.0;
        w[2] = 1.0;
        w[3] = -2.0;
        // Block 1: amax 14 -> scale 2.
        w[16] = 14.0;
        w[17] = 3.0; // 1.5 rounds to 2 (half to even)
        w[18] = -1.0; // -0.5 rounds to -0 (half to even)
        w[19] = -14.0;
        let p = quantize_nbits(&w, [20, 1], false, &scheme(QType::Int4, true, 16), false).unwrap();
        assert_eq!(p.scales, vec![1.0, 2.0]);
        assert_eq!(p.zero_points, None);
        let mut want = vec![0x88u8; 16];
        want[0] = 0x1f; // 7 + 8 = 15 low, -7 + 8 = 1 high
        want[1] = 0x69; // 1 + 8 = 9 low, -2 + 8 = 6 high
        want[8] = 0xaf; // 7 + 8 = 15 low, 2 + 8 = 10 high
        want[9] = 0x18; // 0 + 8 = 8 low, -7 + 8 = 1 high
        assert_eq!(p.b, want);
        // Asymmetric uint4 of the same block 1 range [-14, 14]: scale 28/15, zero point 8.
        let p =
            quantize_nbits(&w, [20, 1], false, &scheme(QType::Uint4, false, 16), false).unwrap();
        assert_eq!(p.zero_points, Some(vec![0x88]));
        assert_eq!(p.b[8] & 0x0f, 15);
    }

    #[test]
    fn nbits_refuses_bad_block_sizes_types_and_non_finite_weights() {
        let w = ramp(64);
        assert!(
            quantize_nbits(&w, [32, 2], false, &scheme(QType::Int4, true, 24), false).is_none()
        );
        assert!(quantize_nbits(&w, [32, 2], false, &scheme(QType::Int4, true, 8), false).is_none());
        assert!(
            quantize_nbits(&w, [32, 2], false, &scheme(QType::Int8, true, 16), false).is_none()
        );
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        assert!(
            quantize_nbits(&bad, [32, 2], false, &scheme(QType::Int4, true, 16), false).is_none()
        );
    }

    #[test]
    fn nbits_f16_scales_are_rounded_and_used_for_the_dequantized_values() {
        let w = ramp(64);
        for symmetric in [true, false] {
            let p = check_layout(
                &w,
                [32, 2],
                false,
                &scheme(QType::Int4, symmetric, 16),
                true,
            );
            for s in &p.scales {
                assert_eq!(half::f16::from_f32(*s).to_f32(), *s);
            }
        }
    }
}
