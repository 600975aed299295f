//! `quantize_dynamic`: (being written).

use anyhow::{bail, Result};

use super::{Pass, PassKind, PassOptions, PassStats};
use crate::ir::Model;

/// See the module documentation.
pub struct QuantizeDynamic;

impl Pass for QuantizeDynamic {
    fn name(&self) -> &'static str {
        "quantize_dynamic"
    }
    fn summary(&self) -> &'static str {
        "(being written)"
    }
    fn kind(&self) -> PassKind {
        PassKind::Lossy {
            tolerance: "cosine >= 0.99 per output on typical models",
        }
    }
    fn run(&self, _model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        bail!("quantize_dynamic is not available in this version")
    }
}
