//! onnxopt makes exported ONNX models smaller and faster and proves that they still compute
//! the same thing.
//!
//! The pipeline:
//! 1. [`onnx::load`] memory-maps the `.onnx` file, decodes it with prost (tensor payloads stay
//!    slices of the map), resolves external data and builds the IR ([`ir`]), reporting every
//!    problem found.
//! 2. Passes ([`passes`]) read the IR, then change it through the edit API ([`ir::edit`]); the
//!    validator ([`ir::validate`]) runs after each pass in tests and debug builds.
//! 3. [`onnx::save`] exports the IR in a stable topological order and streams the protobuf into
//!    a temporary file that is renamed over the destination.
//! 4. [`verify`] runs the original and the result in tract on the same inputs and measures the
//!    error per output against the user's gates.
//!
//! The IR's invariants are listed in [`ir`]. The library never prints: progress goes through
//! [`report::Reporter`], results come back as data.
//!
//! # Using the library
//!
//! [`optimize::optimize`] is what the `optimize` and `quantize` commands run: load, passes,
//! check in tract with the accuracy-gated fallback, save. A `quantize --mode` is a pipeline
//! of passes with their options, which [`quant::QuantizeMode::configure`] gives; for
//! example, what `onnxopt quantize model.onnx -o model.int8.onnx --mode static --calibration
//! samples/` does (calibrated static int8, the accuracy-gated fallback meeting cosine 0.999):
//!
//! ```no_run
//! use onnxopt::optimize::{format_report, optimize, OptimizeConfig};
//! use onnxopt::passes::PassOptions;
//! use onnxopt::quant::{CalibrationOptions, ModeChoices, QType, QuantizeMode, RangeMethod};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut pass_options = PassOptions {
//!     calibration: Some(CalibrationOptions {
//!         source: "samples/".into(), // a folder of .npz files, one sample each
//!         method: RangeMethod::MinMax,
//!         max_samples: 256,
//!         activation_type: QType::Uint8,
//!         cache: Default::default(),
//!     }),
//!     ..Default::default()
//! };
//! let passes = QuantizeMode::Static.configure(&mut pass_options, ModeChoices::default());
//! let cfg = OptimizeConfig {
//!     model: "model.onnx".into(),
//!     output: "model.int8.onnx".into(),
//!     passes,
//!     pass_options,
//!     save: Default::default(), // never replaces `model` (see `SaveOptions::replace_input`)
//!     check: true,
//!     inputs: Default::default(), // none given: the first calibration sample
//!     gates: Default::default(),
//!     validate_each: false,
//!     fallback_target: Some(onnxopt::optimize::DEFAULT_FALLBACK_COSINE),
//!     fallback_samples: onnxopt::optimize::FALLBACK_CALIBRATION_SAMPLES,
//!     check_notes: vec![],
//!     selectors: vec![],
//! };
//! let report = optimize(&cfg, &onnxopt::report::Silent)?;
//! println!("{}", format_report(&report));
//! # Ok(())
//! # }
//! ```

pub mod fallback;
pub mod inspect;
pub mod ir;
pub mod onnx;
pub mod optimize;
pub mod passes;
pub mod pb;
pub mod quant;
pub mod report;
pub mod verify;
