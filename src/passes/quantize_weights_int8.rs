//! `quantize_weights_int8`: weight-only int8 quantization with symmetric per-output-channel
//! scales: the [`quantize_weights`](super::quantize_weights) pass with its default scheme
//! ([`Scheme::INT8_CHANNEL`]), whatever the quantize options say. The default pipeline uses
//! it. See `quantize_weights` for the forms written at each opset, the axis per op, and what is
//! deliberately left alone.

use anyhow::Result;

use super::quantize_weights::run_scheme;
use super::{Pass, PassKind, PassOptions, PassStats};
use crate::ir::Model;
use crate::quant::Scheme;

/// See the module documentation.
pub struct QuantizeWeightsInt8;

impl Pass for QuantizeWeightsInt8 {
    fn name(&self) -> &'static str {
        "quantize_weights_int8"
    }
    fn summary(&self) -> &'static str {
        "weights of Conv, ConvTranspose, Gemm, MatMul, LSTM/GRU/RNN to int8, symmetric per output channel"
    }
    fn kind(&self) -> PassKind {
        PassKind::Lossy {
            tolerance: "cosine >= 0.999 per output on typical models",
        }
    }
    fn run(&self, model: &mut Model, opts: &PassOptions) -> Result<PassStats> {
        let mut stats = run_scheme(model, opts, &Scheme::INT8_CHANNEL)?;
        stats
            .notes
            .extend(super::constant_weights_note(model, opts));
        Ok(stats)
    }
}
