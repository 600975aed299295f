//! Generates the prost types for the pinned ONNX schema in `proto/onnx.proto`.
//! Uses the vendored `protoc`, so a fresh machine needs no system install.

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path().map_err(std::io::Error::other)?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Tensor payloads decode as `bytes::Bytes` slices of the input buffer: no copies.
    config.bytes(["."]);
    config.compile_protos(&["proto/onnx.proto"], &["proto"])?;
    Ok(())
}
