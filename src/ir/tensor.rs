//! Tensor data: element types and typed views over `TensorProto` payloads.
//!
//! A [`Tensor`] wraps the `TensorProto` exactly as it was read, so a tensor that no pass touches
//! is written back field for field (`raw_data` or the typed `*_data` fields, `doc_string`,
//! `metadata_props`). `raw_data` is a `bytes::Bytes` slice of the input buffer or memory map, so
//! cloning a tensor never copies its data. External data is resolved at import: its bytes are a
//! slice of the memory-mapped data file and `data_location` is cleared.

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use half::{bf16, f16};

use crate::pb::{self, tensor_proto::DataType};

/// Facts about one ONNX element type (`TensorProto.DataType`, ONNX IR spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElemInfo {
    /// Lowercase name as used in reports (`float32`, `int4`, ...).
    pub name: &'static str,
    /// Bits per element in `raw_data`; `None` for `string` and unknown types.
    pub bits: Option<u32>,
}

/// Name and storage size of the ONNX element type `code`.
pub fn elem_info(code: i32) -> ElemInfo {
    let (name, bits) = match DataType::try_from(code) {
        Ok(DataType::Float) => ("float32", Some(32)),
        Ok(DataType::Uint8) => ("uint8", Some(8)),
        Ok(DataType::Int8) => ("int8", Some(8)),
        Ok(DataType::Uint16) => ("uint16", Some(16)),
        Ok(DataType::Int16) => ("int16", Some(16)),
        Ok(DataType::Int32) => ("int32", Some(32)),
        Ok(DataType::Int64) => ("int64", Some(64)),
        Ok(DataType::String) => ("string", None),
        Ok(DataType::Bool) => ("bool", Some(8)),
        Ok(DataType::Float16) => ("float16", Some(16)),
        Ok(DataType::Double) => ("float64", Some(64)),
        Ok(DataType::Uint32) => ("uint32", Some(32)),
        Ok(DataType::Uint64) => ("uint64", Some(64)),
        Ok(DataType::Complex64) => ("complex64", Some(64)),
        Ok(DataType::Complex128) => ("complex128", Some(128)),
        Ok(DataType::Bfloat16) => ("bfloat16", Some(16)),
        Ok(DataType::Float8e4m3fn) => ("float8e4m3fn", Some(8)),
        Ok(DataType::Float8e4m3fnuz) => ("float8e4m3fnuz", Some(8)),
        Ok(DataType::Float8e5m2) => ("float8e5m2", Some(8)),
        Ok(DataType::Float8e5m2fnuz) => ("float8e5m2fnuz", Some(8)),
        Ok(DataType::Uint4) => ("uint4", Some(4)),
        Ok(DataType::Int4) => ("int4", Some(4)),
        Ok(DataType::Float4e2m1) => ("float4e2m1", Some(4)),
        Ok(DataType::Float8e8m0) => ("float8e8m0", Some(8)),
        Ok(DataType::Uint2) => ("uint2", Some(2)),
        Ok(DataType::Int2) => ("int2", Some(2)),
        Ok(DataType::Float6e2m3) => ("float6e2m3", None),
        Ok(DataType::Float6e3m2) => ("float6e3m2", None),
        Ok(DataType::Undefined) | Err(_) => ("undefined", None),
    };
    ElemInfo { name, bits }
}

/// Is `code` a floating-point element type that quantization and casts treat as "float"?
pub fn is_float(code: i32) -> bool {
    code == DataType::Float as i32
        || code == DataType::Float16 as i32
        || code == DataType::Bfloat16 as i32
        || code == DataType::Double as i32
}

/// Number of elements of a tensor with `dims`.
///
/// Errors when a dim is negative or the product overflows `usize`.
pub fn num_elements(dims: &[i64]) -> Result<usize> {
    let mut n: usize = 1;
    for &d in dims {
        ensure!(d >= 0, "negative dimension {d} in shape {dims:?}");
        n = usize::try_from(d)
            .ok()
            .and_then(|d| n.checked_mul(d))
            .with_context(|| format!("the element count of shape {dims:?} overflows"))?;
    }
    Ok(n)
}

/// Bytes that `n` elements of type `code` take in `raw_data` (sub-byte types packed, rounded up).
pub fn raw_len(code: i32, n: usize) -> Option<usize> {
    let bits = elem_info(code).bits? as usize;
    n.checked_mul(bits).map(|b| b.div_ceil(8))
}

/// The `raw_data` bytes (little-endian) of a tensor whose values are in its typed field
/// (`float_data`, `int32_data`, ...), as the ONNX spec lays each type out there (16- and
/// 8-bit types one value per `int32_data` entry); `None` for a tensor in `raw_data` or
/// external data, and for strings, complex and sub-byte types.
pub fn typed_to_raw(p: &pb::TensorProto) -> Option<Vec<u8>> {
    use DataType as D;
    if p.raw_data.is_some() || !p.external_data.is_empty() {
        return None;
    }
    let bytes: Vec<u8> = match DataType::try_from(p.data_type()).ok()? {
        D::Float => p.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        D::Double => p.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        D::Int64 => p.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        D::Uint64 => p.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        D::Uint32 => p
            .uint64_data
            .iter()
            .flat_map(|&v| (v as u32).to_le_bytes())
            .collect(),
        D::Int32 => p.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        D::Int16 | D::Uint16 | D::Float16 | D::Bfloat16 => p
            .int32_data
            .iter()
            .flat_map(|&v| (v as u16).to_le_bytes())
            .collect(),
        D::Int8
        | D::Uint8
        | D::Bool
        | D::Float8e4m3fn
        | D::Float8e4m3fnuz
        | D::Float8e5m2
        | D::Float8e5m2fnuz
        | D::Float8e8m0 => p.int32_data.iter().map(|&v| v as u8).collect(),
        _ => return None,
    };
    Some(bytes)
}

/// A tensor: an initializer, a Constant node's value or an attribute's tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The protobuf as read (external data already resolved into `raw_data`).
    pub proto: pb::TensorProto,
}

impl Tensor {
    /// Wraps a proto.
    pub fn new(proto: pb::TensorProto) -> Self {
        Tensor { proto }
    }

    /// `self` with the doc string and metadata of `of`, when there is one: a quantized weight
    /// keeps what an exporter said of its float weight (its source name, for example).
    pub fn described_as(mut self, of: Option<&Tensor>) -> Self {
        if let Some(of) = of {
            self.proto.doc_string = of.proto.doc_string.clone();
            self.proto.metadata_props = of.proto.metadata_props.clone();
        }
        self
    }

    /// A float32 tensor with `dims`, stored in `raw_data` (little endian).
    pub fn from_f32(dims: &[i64], data: &[f32]) -> Self {
        let mut raw = Vec::with_capacity(data.len() * 4);
        for v in data {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        Self::from_raw(DataType::Float as i32, dims, raw)
    }

    /// An int8 tensor with `dims`.
    pub fn from_i8(dims: &[i64], data: &[i8]) -> Self {
        Self::from_raw(
            DataType::Int8 as i32,
            dims,
            data.iter().map(|&v| v as u8).collect(),
        )
    }

    /// An int64 tensor with `dims`.
    pub fn from_i64(dims: &[i64], data: &[i64]) -> Self {
        let mut raw = Vec::with_capacity(data.len() * 8);
        for v in data {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        Self::from_raw(DataType::Int64 as i32, dims, raw)
    }

    /// A tensor of element type `code` whose little-endian payload is `raw`.
    pub fn from_raw(code: i32, dims: &[i64], raw: Vec<u8>) -> Self {
        Tensor {
            proto: pb::TensorProto {
                dims: dims.to_vec(),
                data_type: Some(code),
                raw_data: Some(Bytes::from(raw)),
                ..Default::default()
            },
        }
    }

    /// ONNX element type code (`TensorProto.DataType`).
    pub fn data_type(&self) -> i32 {
        self.proto.data_type.unwrap_or(0)
    }

    /// Lowercase element type name.
    pub fn dtype_name(&self) -> &'static str {
        elem_info(self.data_type()).name
    }

    /// Shape.
    pub fn dims(&self) -> &[i64] {
        &self.proto.dims
    }

    /// Number of elements; errors on negative dims or overflow.
    pub fn len(&self) -> Result<usize> {
        num_elements(&self.proto.dims)
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        matches!(self.len(), Ok(0))
    }

    /// Storage size in bytes: the packed payload size, or the summed string lengths.
    pub fn byte_size(&self) -> usize {
        let n = self.len().unwrap_or(0);
        if self.data_type() == DataType::String as i32 {
            return self.proto.string_data.iter().map(|s| s.len()).sum();
        }
        raw_len(self.data_type(), n).unwrap_or(0)
    }

    /// Checks that the payload holds exactly as many elements as the dims say.
    pub fn check_payload(&self) -> Result<()> {
        let n = self.len()?;
        let code = self.data_type();
        let p = &self.proto;
        if p.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
            return Ok(());
        }
        if let Some(raw) = &p.raw_data {
            if let Some(want) = raw_len(code, n) {
                ensure!(
                    raw.len() == want,
                    "raw_data holds {} bytes, but {} elements of {} take {want}",
                    raw.len(),
                    n,
                    elem_info(code).name
                );
            }
            return Ok(());
        }
        let (have, per) = self.typed_field_len();
        if let Some(have) = have {
            ensure!(
                have == n.div_ceil(per),
                "the typed data field holds {have} values, but shape {:?} needs {}",
                p.dims,
                n.div_ceil(per)
            );
        }
        Ok(())
    }

    /// Length of the typed `*_data` field that this dtype uses, and how many elements one field
    /// value holds (2 for packed 4-bit types, 2 for complex in float_data is not modelled).
    fn typed_field_len(&self) -> (Option<usize>, usize) {
        let p = &self.proto;
        use DataType as D;
        match DataType::try_from(self.data_type()) {
            Ok(D::Float) => (Some(p.float_data.len()), 1),
            Ok(D::Complex64) => (Some(p.float_data.len() / 2), 1),
            Ok(D::Double) => (Some(p.double_data.len()), 1),
            Ok(D::Complex128) => (Some(p.double_data.len() / 2), 1),
            Ok(D::Int64) => (Some(p.int64_data.len()), 1),
            Ok(D::Uint32) | Ok(D::Uint64) => (Some(p.uint64_data.len()), 1),
            Ok(D::String) => (Some(p.string_data.len()), 1),
            Ok(D::Int4) | Ok(D::Uint4) | Ok(D::Float4e2m1) => (Some(p.int32_data.len()), 2),
            Ok(D::Int2) | Ok(D::Uint2) => (Some(p.int32_data.len()), 4),
            Ok(D::Undefined) | Err(_) | Ok(D::Float6e2m3) | Ok(D::Float6e3m2) => (None, 1),
            Ok(_) => (Some(p.int32_data.len()), 1),
        }
    }

    /// The values converted to f32, for float and integer element types.
    ///
    /// Errors for strings, complex and sub-byte float types, or a payload of the wrong size.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.check_payload()?;
        let n = self.len()?;
        let p = &self.proto;
        use DataType as D;
        let dt = DataType::try_from(self.data_type())
            .map_err(|_| anyhow::anyhow!("unknown element type {}", self.data_type()))?;
        if let Some(raw) = p.raw_data.as_deref() {
            let v: Vec<f32> = match dt {
                D::Float => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                D::Double => raw
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                    .collect(),
                D::Float16 => raw
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                D::Bfloat16 => raw
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                D::Int8 => raw.iter().map(|&b| b as i8 as f32).collect(),
                D::Uint8 | D::Bool => raw.iter().map(|&b| b as f32).collect(),
                D::Int16 => raw
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
                    .collect(),
                D::Uint16 => raw
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as f32)
                    .collect(),
                D::Int32 => raw
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                    .collect(),
                D::Uint32 => raw
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                    .collect(),
                D::Int64 => raw
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                    .collect(),
                D::Uint64 => raw
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                    .collect(),
                D::Int4 | D::Uint4 => (0..n)
                    .map(|i| {
                        let nib = (raw[i / 2] >> ((i % 2) * 4)) & 0x0f;
                        if dt == D::Int4 {
                            (((nib << 4) as i8) >> 4) as f32
                        } else {
                            nib as f32
                        }
                    })
                    .collect(),
                _ => bail!(
                    "cannot read {} values as numbers",
                    elem_info(dt as i32).name
                ),
            };
            return Ok(v);
        }
        let v: Vec<f32> = match dt {
            D::Float => p.float_data.clone(),
            D::Double => p.double_data.iter().map(|&x| x as f32).collect(),
            D::Int64 => p.int64_data.iter().map(|&x| x as f32).collect(),
            D::Uint32 | D::Uint64 => p.uint64_data.iter().map(|&x| x as f32).collect(),
            D::Float16 => p
                .int32_data
                .iter()
                .map(|&x| f16::from_bits(x as u16).to_f32())
                .collect(),
            D::Bfloat16 => p
                .int32_data
                .iter()
                .map(|&x| bf16::from_bits(x as u16).to_f32())
                .collect(),
            D::Int8 | D::Uint8 | D::Int16 | D::Uint16 | D::Int32 | D::Bool => {
                p.int32_data.iter().map(|&x| x as f32).collect()
            }
            D::Int4 | D::Uint4 => (0..n)
                .map(|i| {
                    let nib = ((p.int32_data[i / 2] >> ((i % 2) * 4)) & 0x0f) as u8;
                    if dt == D::Int4 {
                        (((nib << 4) as i8) >> 4) as f32
                    } else {
                        nib as f32
                    }
                })
                .collect(),
            _ => bail!(
                "cannot read {} values as numbers",
                elem_info(dt as i32).name
            ),
        };
        Ok(v)
    }

    /// The values as i64, for integer and bool element types (shape arithmetic).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        use DataType as D;
        let dt = DataType::try_from(self.data_type())
            .map_err(|_| anyhow::anyhow!("unknown element type {}", self.data_type()))?;
        self.check_payload()?;
        let p = &self.proto;
        if let Some(raw) = p.raw_data.as_deref() {
            return Ok(match dt {
                D::Int64 => raw
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
                D::Int32 => raw
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
                _ => self.to_f32()?.into_iter().map(|v| v as i64).collect(),
            });
        }
        Ok(match dt {
            D::Int64 => p.int64_data.clone(),
            D::Uint32 | D::Uint64 => p.uint64_data.iter().map(|&x| x as i64).collect(),
            D::Int8 | D::Uint8 | D::Int16 | D::Uint16 | D::Int32 | D::Bool => {
                p.int32_data.iter().map(|&x| x as i64).collect()
            }
            _ => self.to_f32()?.into_iter().map(|v| v as i64).collect(),
        })
    }

    /// Payload bytes for hashing and equality: `raw_data` when present, else the encoded proto
    /// without its name (typed fields), so equal tensors compare equal whatever their name.
    pub fn content_key(&self) -> Bytes {
        if let Some(raw) = &self.proto.raw_data {
            return raw.clone();
        }
        let mut p = self.proto.clone();
        p.name = None;
        p.doc_string = None;
        Bytes::from(prost::Message::encode_to_vec(&p))
    }
}
