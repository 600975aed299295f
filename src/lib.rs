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
