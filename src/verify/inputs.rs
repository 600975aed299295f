//! Inputs for a verification run: `.npz` bundles in and out, the CLI's `--input-shape` and
//! `--input` values, and seeded inputs generated from the graph's declared input types.
//!
//! Every function here returns data and errors; nothing prints. Errors name the file, the
//! array key or the graph input they are about.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::f16;
use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tract_onnx::prelude::{Datum, DatumType, Tensor};

use crate::pb;

/// How the inputs of a verification run are obtained.
///
/// Precedence for each real graph input: a `values` entry, then the `npz` bundle, then a
/// seeded random tensor.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InputOptions {
    /// An `.npz` bundle whose keys are graph input names (extra keys, such as reference
    /// outputs, are ignored). When given, every real graph input without a `values` entry must
    /// be in it, with the dtype the graph declares.
    pub npz: Option<PathBuf>,
    /// With `npz`: the file holds samples along axis 0 (a calibration batch file); feed sample
    /// `i` alone, split as [`crate::quant::calibrate::Samples`] splits it.
    pub npz_sample: Option<usize>,
    /// Full shapes for generated or filled inputs (`--input-shape NAME:D0,D1`): replaces the
    /// declared shape, so symbolic or unknown dims get a concrete size.
    pub shapes: Vec<(String, Vec<usize>)>,
    /// Constant values (`--input NAME=VALUE`): the whole tensor is filled with VALUE, converted
    /// to the input's dtype (integers must be whole and in range, booleans 0 or 1). A scalar
    /// input (shape `()`) is that one value.
    pub values: Vec<(String, f64)>,
    /// Seed for the ChaCha8 generator. Each input draws from its own stream, derived from
    /// its name, so its values depend only on the seed and the name, not on input order.
    pub seed: u64,
}

/// Parses a `--input-shape` argument `NAME:D0,D1,...` into the name and its dims.
///
/// The name is everything before the last `:` (names such as `input:0` keep their colon).
/// `NAME:` (nothing after the colon) is a scalar, shape `()`.
///
/// # Errors
/// When there is no `:`, the name is empty, or a dim is not a non-negative integer.
pub fn parse_input_shape(s: &str) -> Result<(String, Vec<usize>)> {
    let (name, dims) = s
        .rsplit_once(':')
        .with_context(|| format!("input shape `{s}` is not of the form NAME:D0,D1,..."))?;
    ensure!(
        !name.is_empty(),
        "input shape `{s}` has an empty input name"
    );
    let dims = dims.trim();
    if dims.is_empty() {
        return Ok((name.to_string(), vec![]));
    }
    let dims = dims
        .split(',')
        .map(|d| {
            d.trim().parse::<usize>().with_context(|| {
                format!("input shape `{s}`: dim `{d}` is not a non-negative integer")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((name.to_string(), dims))
}

/// Parses a `--input` argument `NAME=VALUE` into the name and the value.
///
/// The name is everything before the last `=`; VALUE is any number `f64` parses (`16000`,
/// `-1`, `0.5`, `1e-3`), or `true` / `false` (1 and 0, for bool inputs).
///
/// # Errors
/// When there is no `=`, the name is empty or the value is neither a number nor a bool.
pub fn parse_input_value(s: &str) -> Result<(String, f64)> {
    let (name, value) = s
        .rsplit_once('=')
        .with_context(|| format!("input value `{s}` is not of the form NAME=VALUE"))?;
    ensure!(
        !name.is_empty(),
        "input value `{s}` has an empty input name"
    );
    let value = match value.trim() {
        "true" => 1.0,
        "false" => 0.0,
        v => v.parse::<f64>().with_context(|| {
            format!("input value `{s}`: `{value}` is not a number (or true/false)")
        })?,
    };
    Ok((name.to_string(), value))
}

/// Where the values of one input came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputSource {
    /// Read from this `.npz` bundle.
    Npz {
        /// The bundle's path as given.
        path: PathBuf,
        /// The sample taken along axis 0 ([`InputOptions::npz_sample`]), if any.
        sample: Option<usize>,
    },
    /// Filled with one value (`--input NAME=VALUE`).
    Value {
        /// The value, before conversion to the input's dtype.
        value: f64,
    },
    /// Drawn uniformly from `low..=high` by the seeded ChaCha8 generator (booleans: fair coin,
    /// `low` 0 and `high` 1).
    Random {
        /// The run's seed ([`InputOptions::seed`]).
        seed: u64,
        /// Smallest value that can be drawn.
        low: f64,
        /// Largest value that can be drawn.
        high: f64,
        /// Why this range: `uniform floats`, `byte values`, or the index use that bounds it.
        why: String,
    },
}

/// One input that was fed: its name, dtype, shape and origin.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InputInfo {
    /// Graph input name.
    pub name: String,
    /// tract datum type, e.g. `F32`, `I64`.
    pub dtype: String,
    /// Concrete shape fed.
    pub shape: Vec<usize>,
    /// Where the values came from.
    pub source: InputSource,
}

/// The result of [`prepare_inputs`].
#[derive(Clone, Debug)]
pub struct PreparedInputs {
    /// One tensor per real graph input (graph inputs that are not initializers), in graph
    /// input order.
    pub tensors: Vec<(String, Tensor)>,
    /// What was fed, parallel to `tensors`.
    pub info: Vec<InputInfo>,
    /// Things the caller should tell the user: dims defaulted to 1, npz shapes that differ
    /// from the declared ones, options that were not used.
    pub notes: Vec<String>,
}

/// Reads every array of an `.npz` file, in archive order.
///
/// Supported dtypes: f16, f32, f64, i8, i16, i32, i64, u8, u16, u32, u64 and bool, either byte
/// order, C or Fortran order; scalars (shape `()`) become rank-0 tensors.
///
/// # Errors
/// When the file cannot be opened or is not a zip archive, or an array has another dtype
/// (strings, complex, structured); the message names the file and the key.
pub fn load_npz(path: &Path) -> Result<Vec<(String, Tensor)>> {
    load_npz_keys(path, |_| true)
}

/// The keys of the arrays of an `.npz` file, in archive order (nothing is read but the
/// archive's directory).
///
/// # Errors
/// When the file cannot be opened or is not a zip archive.
pub fn npz_keys(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("opening npz file {}", path.display()))?;
    let mut archive = npyz::npz::NpzArchive::new(BufReader::new(file))
        .with_context(|| format!("reading npz file {} as a zip archive", path.display()))?;
    // In the archive's order (the order numpy wrote them), not a hash map's.
    let zip = archive.zip_archive();
    (0..zip.len())
        .filter_map(|index| match zip.by_index_raw(index) {
            Ok(entry) => {
                npyz::npz::array_name_from_file_name(entry.name()).map(|k| Ok(k.to_owned()))
            }
            Err(e) => {
                Some(Err(e).with_context(|| {
                    format!("reading entry {index} of npz file {}", path.display())
                }))
            }
        })
        .collect()
}

/// [`load_npz`], reading only the arrays whose key `wanted` accepts: the others (reference
/// outputs, labels, metadata of any dtype) are skipped unread.
///
/// # Errors
/// As [`load_npz`], for the arrays read.
pub fn load_npz_keys(path: &Path, wanted: impl Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let file = File::open(path).with_context(|| format!("opening npz file {}", path.display()))?;
    let mut archive = npyz::npz::NpzArchive::new(BufReader::new(file))
        .with_context(|| format!("reading npz file {} as a zip archive", path.display()))?;
    let zip = archive.zip_archive();
    let mut arrays = vec![];
    for index in 0..zip.len() {
        let entry = zip
            .by_index(index)
            .with_context(|| format!("reading entry {index} of npz file {}", path.display()))?;
        let Some(key) = npyz::npz::array_name_from_file_name(entry.name()).map(str::to_owned)
        else {
            continue;
        };
        if !wanted(&key) {
            continue;
        }
        // The array's bytes, uncompressed: a bound on what it can hold, whatever its header
        // says.
        let bytes = entry.size();
        let npy = NpyFile::new(entry)
            .with_context(|| format!("reading the npy header of `{key}` in {}", path.display()))?;
        let tensor = npy_to_tensor(npy, bytes)
            .with_context(|| format!("reading array `{key}` of npz file {}", path.display()))?;
        arrays.push((key, tensor));
    }
    Ok(arrays)
}

/// The array of `npy`, whose file holds at most `bytes` bytes.
fn npy_to_tensor<R: Read>(npy: NpyFile<R>, bytes: u64) -> Result<Tensor> {
    let shape = npy
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).context("dim does not fit in usize"))
        .collect::<Result<Vec<_>>>()?;
    let order = npy.order();
    let DType::Plain(ts) = npy.dtype() else {
        bail!(
            "dtype `{}` is not supported (structured or sub-array)",
            npy.dtype().descr()
        );
    };
    let size = ts.size_field();
    let tensor = match (ts.type_char(), size) {
        (TypeChar::Float, 2) => read_typed::<f16, R>(npy, &shape, order, bytes)?,
        (TypeChar::Float, 4) => read_typed::<f32, R>(npy, &shape, order, bytes)?,
        (TypeChar::Float, 8) => read_typed::<f64, R>(npy, &shape, order, bytes)?,
        (TypeChar::Int, 1) => read_typed::<i8, R>(npy, &shape, order, bytes)?,
        (TypeChar::Int, 2) => read_typed::<i16, R>(npy, &shape, order, bytes)?,
        (TypeChar::Int, 4) => read_typed::<i32, R>(npy, &shape, order, bytes)?,
        (TypeChar::Int, 8) => read_typed::<i64, R>(npy, &shape, order, bytes)?,
        (TypeChar::Uint, 1) => read_typed::<u8, R>(npy, &shape, order, bytes)?,
        (TypeChar::Uint, 2) => read_typed::<u16, R>(npy, &shape, order, bytes)?,
        (TypeChar::Uint, 4) => read_typed::<u32, R>(npy, &shape, order, bytes)?,
        (TypeChar::Uint, 8) => read_typed::<u64, R>(npy, &shape, order, bytes)?,
        (TypeChar::Bool, 1) => read_typed::<bool, R>(npy, &shape, order, bytes)?,
        _ => bail!("dtype `{ts}` is not supported"),
    };
    Ok(tensor)
}

fn read_typed<T, R>(npy: NpyFile<R>, shape: &[usize], order: Order, bytes: u64) -> Result<Tensor>
where
    T: npyz::Deserialize + Datum + Copy,
    R: Read,
{
    let n = checked_len(shape).context("the header's shape overflows")?;
    ensure!(
        (n as u128) * (std::mem::size_of::<T>() as u128) <= bytes as u128,
        "the header's shape {shape:?} needs {n} elements, more than the {bytes} bytes of the array's file hold"
    );
    // Read straight into the tensor (Fortran order is C order of the reversed shape, permuted
    // back after).
    let stored: Vec<usize> = match order {
        Order::C => shape.to_vec(),
        Order::Fortran => shape.iter().rev().copied().collect(),
    };
    let mut t = Tensor::zero_dt(T::datum_type(), &stored)?;
    let mut filled = 0;
    {
        let mut view = t.try_as_plain_ram_mut()?;
        let slots = view.as_slice_mut::<T>()?;
        for (slot, v) in slots
            .iter_mut()
            .zip(npy.data::<T>().map_err(|e| anyhow!("{e}"))?)
        {
            *slot = v.context("reading the array data")?;
            filled += 1;
        }
    }
    ensure!(
        filled == n,
        "the array data ends after {filled} of {n} elements"
    );
    match order {
        Order::C => Ok(t),
        Order::Fortran => {
            let axes: Vec<usize> = (0..shape.len()).rev().collect();
            Ok(t.permute_axes(&axes)?)
        }
    }
}

/// Writes arrays to an `.npz` file (uncompressed, like `numpy.savez`), keys as given.
///
/// Supported dtypes: those [`load_npz`] reads; tract `TDim` tensors are written as int64.
///
/// # Errors
/// When the file cannot be written, or a tensor has another dtype (e.g. strings).
pub fn save_npz(path: &Path, arrays: &[(String, Tensor)]) -> Result<()> {
    let file =
        File::create(path).with_context(|| format!("creating npz file {}", path.display()))?;
    let mut npz = npyz::npz::NpzWriter::new(BufWriter::new(file));
    for (name, tensor) in arrays {
        write_array(&mut npz, name, tensor)
            .with_context(|| format!("writing array `{name}` to npz file {}", path.display()))?;
    }
    let mut inner = npz
        .zip_writer()
        .finish()
        .with_context(|| format!("finishing npz file {}", path.display()))?;
    inner
        .flush()
        .with_context(|| format!("flushing npz file {}", path.display()))?;
    Ok(())
}

fn write_array<W: Write + Seek>(
    npz: &mut npyz::npz::NpzWriter<W>,
    name: &str,
    tensor: &Tensor,
) -> Result<()> {
    match tensor.datum_type().unquantized() {
        DatumType::F16 => write_typed::<f16, W>(npz, name, tensor),
        DatumType::F32 => write_typed::<f32, W>(npz, name, tensor),
        DatumType::F64 => write_typed::<f64, W>(npz, name, tensor),
        DatumType::I8 => write_typed::<i8, W>(npz, name, tensor),
        DatumType::I16 => write_typed::<i16, W>(npz, name, tensor),
        DatumType::I32 => write_typed::<i32, W>(npz, name, tensor),
        DatumType::I64 => write_typed::<i64, W>(npz, name, tensor),
        DatumType::U8 => write_typed::<u8, W>(npz, name, tensor),
        DatumType::U16 => write_typed::<u16, W>(npz, name, tensor),
        DatumType::U32 => write_typed::<u32, W>(npz, name, tensor),
        DatumType::U64 => write_typed::<u64, W>(npz, name, tensor),
        DatumType::Bool => write_typed::<bool, W>(npz, name, tensor),
        DatumType::TDim => write_typed::<i64, W>(npz, name, &*tensor.cast_to::<i64>()?),
        other => bail!("dtype {other:?} cannot be written to npz"),
    }
}

fn write_typed<T, W>(npz: &mut npyz::npz::NpzWriter<W>, name: &str, tensor: &Tensor) -> Result<()>
where
    T: npyz::AutoSerialize + Datum + Copy,
    W: Write + Seek,
{
    let view = tensor.try_as_plain_ram()?;
    let data = view.as_slice::<T>()?;
    let shape: Vec<u64> = tensor.shape().iter().map(|&d| d as u64).collect();
    let options = npyz::zip::write::FileOptions::default()
        .compression_method(npyz::zip::CompressionMethod::Stored)
        .large_file(true);
    let mut writer = npz
        .array::<T>(name, options)?
        .default_dtype()
        .shape(&shape)
        .begin_nd()?;
    writer.extend(data.iter().copied())?;
    writer.finish()?;
    Ok(())
}

/// The input sets of a check: one per `.npz` file, in name order, when `opts.npz` is a
/// folder (each prepared by [`prepare_inputs`] with that file), else the one set
/// [`prepare_inputs`] gives. Each set comes with its label: the file's name, or `""` for the
/// single set.
///
/// # Errors
/// The folder cannot be read or holds no `.npz` file; one error listing every file that
/// cannot be prepared (each message names the file and the graph input, as
/// [`prepare_inputs`]).
pub fn prepare_input_sets(
    model: &pb::ModelProto,
    opts: &InputOptions,
) -> Result<Vec<(String, PreparedInputs)>> {
    let Some(dir) = opts.npz.as_ref().filter(|p| p.is_dir()) else {
        return Ok(vec![(String::new(), prepare_inputs(model, opts)?)]);
    };
    let files = crate::quant::calibrate::sample_files(dir)?;
    ensure!(
        !files.is_empty(),
        "input folder {} holds no .npz file",
        dir.display()
    );
    let mut sets = Vec::with_capacity(files.len());
    let mut problems = Vec::new();
    for file in files {
        let label = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let one = InputOptions {
            npz: Some(file),
            npz_sample: None,
            ..opts.clone()
        };
        match prepare_inputs(model, &one) {
            Ok(p) => sets.push((label, p)),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    ensure!(
        problems.is_empty(),
        "{} of the {} files in input folder {} cannot be fed:\n  {}",
        problems.len(),
        problems.len() + sets.len(),
        dir.display(),
        problems.join("\n  ")
    );
    Ok(sets)
}

/// Builds one tensor per real graph input (graph inputs that are not initializers), in graph
/// input order; see [`InputOptions`] for precedence.
///
/// Generated inputs (no `values` entry, no npz):
/// - shape: the `shapes` entry, else the declared shape with every symbolic or unknown dim
///   (`dim_param`, negative or absent `dim_value`) set to 1, said in a note;
/// - floats (f16, f32, f64): uniform in [-1, 1];
/// - integers that are used as indices (followed through Cast, Identity, Unsqueeze, Squeeze,
///   Reshape, Flatten, Transpose and Expand, also into subgraphs) into Gather, GatherElements,
///   GatherND, ScatterElements, ScatterND, OneHot or com.microsoft EmbedLayerNormalization:
///   uniform in `0..bound` where `bound` is the smallest size of the indexed axis (for
///   GatherND/ScatterND the smallest indexed dim; for OneHot the depth) that an initializer or
///   Constant node makes known;
/// - other integers: int8 full range, every other integer type 0..=255 (byte values, as
///   magika reads); bool: fair coin.
///
/// # Errors
/// A graph without inputs' types where generation needs them, a `shapes`/`values` name that
/// is not a real graph input, an npz that lacks an input (the message lists the expected
/// names) or holds it with another dtype than declared, a value that does not fit the dtype.
pub fn prepare_inputs(model: &pb::ModelProto, opts: &InputOptions) -> Result<PreparedInputs> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let declared = real_inputs(graph)?;
    let names: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
    for (name, _) in &opts.shapes {
        ensure!(
            names.contains(&name.as_str()),
            "--input-shape names `{name}`, which is not a graph input; the inputs are {names:?}"
        );
    }
    for (name, _) in &opts.values {
        ensure!(
            names.contains(&name.as_str()),
            "--input names `{name}`, which is not a graph input; the inputs are {names:?}"
        );
    }
    let shape_of = |name: &str| {
        opts.shapes
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    };
    let value_of = |name: &str| {
        opts.values
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    };

    let mut npz: Option<HashMap<String, Tensor>> = match (&opts.npz, opts.npz_sample) {
        (Some(path), None) => Some(
            load_npz_keys(path, |k| names.contains(&k))?
                .into_iter()
                .collect(),
        ),
        // A batch file: sample `i`, split exactly as calibration splits it (an array without
        // the sample axis, such as a scalar, is fed whole).
        (Some(path), Some(i)) => {
            let sample = crate::quant::calibrate::Samples::open(path, model, i + 1)?
                .nth(i)
                .with_context(|| {
                    format!("npz file {} has no sample {i} on axis 0", path.display())
                })??;
            Some(sample.tensors.into_iter().collect())
        }
        (None, _) => None,
    };
    if let (Some(npz), Some(path)) = (&npz, &opts.npz) {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !npz.contains_key(*n) && value_of(n).is_none())
            .collect();
        ensure!(
            missing.is_empty(),
            "npz file {} lacks graph input(s) {missing:?}; the graph's inputs are {names:?}, the file holds {:?}",
            path.display(),
            {
                let mut keys = npz_keys(path)?;
                keys.sort();
                keys
            }
        );
    }

    let index_uses = IndexUses::new(graph);
    // The inputs to generate or fill, sized before any is made, with the types and shapes the
    // loop below gives them (two of 0.8 GB were refused only once the first had been built).
    let planned = declared
        .iter()
        .filter_map(|d| {
            let from_npz = npz.as_ref().and_then(|m| m.get(&d.name));
            let value = value_of(&d.name).is_some();
            if from_npz.is_some() && !value {
                return None;
            }
            let npz_fill = from_npz.filter(|_| value);
            let dt = d.dtype.or(npz_fill.map(Tensor::datum_type))?;
            let shape = match (shape_of(&d.name), npz_fill) {
                (Some(s), _) if value => s.clone(),
                (None, Some(t)) => t.shape().to_vec(),
                (given, _) => d.resolve_shape(given, &mut Vec::new()).ok()?,
            };
            Some(generated_len(dt, &shape).ok()?.saturating_mul(dt.size_of()))
        })
        .fold(0usize, usize::saturating_add);
    ensure!(
        planned <= MAX_GENERATED_BYTES,
        "the inputs to generate or fill take {:.2} GiB together, more than the {} GiB this tool generates; give smaller --input-shape dims, or the values in an --inputs file",
        planned as f64 / (1u64 << 30) as f64,
        MAX_GENERATED_BYTES >> 30
    );
    let mut prepared = PreparedInputs {
        tensors: vec![],
        info: vec![],
        notes: vec![],
    };
    for input in &declared {
        let name = input.name.as_str();
        let from_npz = npz.as_mut().and_then(|m| m.remove(name));
        let (tensor, source) = if let Some(value) = value_of(name) {
            let dt = match (input.dtype, &from_npz) {
                (Some(dt), _) => dt,
                (None, Some(t)) => t.datum_type(),
                (None, None) => bail!("input `{name}` declares no supported element type; cannot fill it with {value}"),
            };
            let shape = match (shape_of(name), &from_npz) {
                (Some(s), _) => s.clone(),
                (None, Some(t)) => t.shape().to_vec(),
                (None, None) => input.resolve_shape(None, &mut prepared.notes)?,
            };
            let tensor =
                filled(dt, &shape, value).with_context(|| format!("filling input `{name}`"))?;
            if crate::quant::calibrate::non_finite(&tensor) > 0 {
                let held = if value.is_finite() {
                    format!(", which {dt:?} cannot hold (it becomes infinite)")
                } else {
                    String::new()
                };
                prepared.notes.push(format!(
                    "input `{name}` is filled with {value}{held}: outputs that agree on NaN or infinity compare as equal, so the figures may say little"
                ));
            }
            (tensor, InputSource::Value { value })
        } else if let Some(tensor) = from_npz {
            let path = opts.npz.clone().unwrap_or_default();
            if let Some(dt) = input.dtype {
                ensure!(
                    tensor.datum_type() == dt,
                    "npz file {}: array `{name}` has dtype {:?}, the graph input declares {:?}",
                    path.display(),
                    tensor.datum_type(),
                    dt
                );
            }
            if let Some(dims) = &input.dims {
                let fits = dims.len() == tensor.rank()
                    && dims.iter().zip(tensor.shape()).all(|(d, &s)| match d {
                        DeclaredDim::Known(k) => *k == s,
                        DeclaredDim::Unknown(_) => true,
                    });
                if !fits {
                    prepared.notes.push(format!(
                        "input `{name}`: the shape {:?} of its array in {} differs from the declared shape {}",
                        tensor.shape(),
                        path.display(),
                        input.describe_dims()
                    ));
                }
            }
            if shape_of(name).is_some() {
                prepared.notes.push(format!(
                    "input `{name}`: --input-shape ignored, the npz file supplies the tensor"
                ));
            }
            let non_finite = crate::quant::calibrate::non_finite(&tensor);
            if non_finite > 0 {
                prepared.notes.push(format!(
                    "input `{name}` holds {non_finite} NaN or infinite value(s) of {}",
                    tensor.len()
                ));
            }
            (
                tensor,
                InputSource::Npz {
                    path,
                    sample: opts.npz_sample,
                },
            )
        } else {
            let dt = input.dtype.with_context(|| {
                format!(
                    "input `{name}` declares no element type tract can generate (elem_type {:?})",
                    input.elem_type
                )
            })?;
            let shape = input.resolve_shape(shape_of(name), &mut prepared.notes)?;
            let range = value_range(dt, index_uses.bound(name), name, &mut prepared.notes)?;
            let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
            rng.set_stream(fnv1a(name.as_bytes()));
            let tensor = random_tensor(dt, &shape, &range, &mut rng)
                .with_context(|| format!("generating input `{name}`"))?;
            (
                tensor,
                InputSource::Random {
                    seed: opts.seed,
                    low: range.low,
                    high: range.high,
                    why: range.why,
                },
            )
        };
        if tensor.len() == 0 {
            prepared.notes.push(format!(
                "input `{name}` is empty (shape {:?}): no value of it reaches the models, so what the check shows comes from the other inputs only (onnxruntime refuses such inputs for many models)",
                tensor.shape()
            ));
        }
        prepared.info.push(InputInfo {
            name: name.to_string(),
            dtype: format!("{:?}", tensor.datum_type()),
            shape: tensor.shape().to_vec(),
            source,
        });
        prepared.tensors.push((name.to_string(), tensor));
    }
    Ok(prepared)
}

/// 64-bit FNV-1a, a stable hash used to give each input its own generator stream.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Maps an ONNX `TensorProto.DataType` code to the tract datum type, for the types inputs can
/// have here.
pub(crate) fn datum_type_of_onnx(code: i32) -> Option<DatumType> {
    use pb::tensor_proto::DataType as D;
    Some(match D::try_from(code).ok()? {
        D::Float => DatumType::F32,
        D::Double => DatumType::F64,
        D::Float16 => DatumType::F16,
        D::Int8 => DatumType::I8,
        D::Int16 => DatumType::I16,
        D::Int32 => DatumType::I32,
        D::Int64 => DatumType::I64,
        D::Uint8 => DatumType::U8,
        D::Uint16 => DatumType::U16,
        D::Uint32 => DatumType::U32,
        D::Uint64 => DatumType::U64,
        D::Bool => DatumType::Bool,
        _ => return None,
    })
}

/// The ONNX `TensorProto.DataType` code of a tract datum type, for the types
/// [`datum_type_of_onnx`] maps.
pub(crate) fn onnx_of_datum_type(dt: DatumType) -> Option<i32> {
    (1..=16).find(|&code| datum_type_of_onnx(code) == Some(dt))
}

#[derive(Clone, Debug)]
enum DeclaredDim {
    Known(usize),
    /// `dim_param` text, or `?` when the dim has no value.
    Unknown(String),
}

#[derive(Clone, Debug)]
struct DeclaredInput {
    name: String,
    elem_type: Option<i32>,
    dtype: Option<DatumType>,
    /// `None` when the input declares no shape at all (unknown rank).
    dims: Option<Vec<DeclaredDim>>,
}

impl DeclaredInput {
    fn describe_dims(&self) -> String {
        match &self.dims {
            None => "(unknown rank)".to_string(),
            Some(dims) => {
                let parts: Vec<String> = dims
                    .iter()
                    .map(|d| match d {
                        DeclaredDim::Known(k) => k.to_string(),
                        DeclaredDim::Unknown(p) => p.clone(),
                    })
                    .collect();
                format!("[{}]", parts.join(", "))
            }
        }
    }

    fn resolve_shape(
        &self,
        given: Option<&Vec<usize>>,
        notes: &mut Vec<String>,
    ) -> Result<Vec<usize>> {
        let name = &self.name;
        if let Some(given) = given {
            if let Some(dims) = &self.dims {
                ensure!(
                    dims.len() == given.len(),
                    "--input-shape gives input `{name}` rank {} ({given:?}), the graph declares rank {} {}",
                    given.len(),
                    dims.len(),
                    self.describe_dims()
                );
                for (axis, (d, &g)) in dims.iter().zip(given).enumerate() {
                    if let DeclaredDim::Known(k) = d {
                        if *k != g {
                            notes.push(format!(
                                "input `{name}`: --input-shape sets dim {axis} to {g}, the graph declares {k}"
                            ));
                        }
                    }
                }
            }
            return Ok(given.clone());
        }
        let dims = self.dims.as_ref().with_context(|| {
            format!(
                "input `{name}` declares no shape; give one with --input-shape {name}:D0,D1,..."
            )
        })?;
        let mut defaulted = vec![];
        let shape = dims
            .iter()
            .enumerate()
            .map(|(axis, d)| match d {
                DeclaredDim::Known(k) => *k,
                DeclaredDim::Unknown(p) => {
                    defaulted.push(format!("{axis} (`{p}`)"));
                    1
                }
            })
            .collect();
        if !defaulted.is_empty() {
            notes.push(format!(
                "input `{name}` {}: dim {} set to 1 (override with --input-shape {name}:D0,D1,...)",
                self.describe_dims(),
                defaulted.join(", ")
            ));
        }
        Ok(shape)
    }
}

/// The graph inputs that are not initializers (IR < 4 lists initializers as graph inputs
/// too), in graph input order: what a run must be fed.
pub fn real_graph_inputs(graph: &pb::GraphProto) -> Vec<&pb::ValueInfoProto> {
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name()))
        .collect()
}

/// The graph inputs that are not initializers, in graph input order.
fn real_inputs(graph: &pb::GraphProto) -> Result<Vec<DeclaredInput>> {
    let mut out = vec![];
    for input in real_graph_inputs(graph) {
        let tensor_type = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => Some(t),
            _ => None,
        };
        let elem_type = tensor_type.and_then(|t| t.elem_type);
        let dims = tensor_type.and_then(|t| t.shape.as_ref()).map(|shape| {
            shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                        DeclaredDim::Known(*v as usize)
                    }
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                        DeclaredDim::Unknown(v.to_string())
                    }
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                        DeclaredDim::Unknown(p.clone())
                    }
                    None => DeclaredDim::Unknown("?".to_string()),
                })
                .collect()
        });
        out.push(DeclaredInput {
            name: input.name().to_string(),
            elem_type,
            dtype: elem_type.and_then(datum_type_of_onnx),
            dims,
        });
    }
    Ok(out)
}

/// An inclusive range of values to draw, with the reason for it.
#[derive(Clone, Debug)]
struct ValueRange {
    low: f64,
    high: f64,
    why: String,
}

fn value_range(
    dt: DatumType,
    bound: Option<(u64, String)>,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<ValueRange> {
    let (type_min, type_max): (i64, i64) = match dt {
        DatumType::F16 | DatumType::F32 | DatumType::F64 => {
            return Ok(ValueRange {
                low: -1.0,
                high: 1.0,
                why: "uniform floats".into(),
            })
        }
        DatumType::Bool => {
            return Ok(ValueRange {
                low: 0.0,
                high: 1.0,
                why: "fair coin".into(),
            })
        }
        DatumType::I8 => (i8::MIN.into(), i8::MAX.into()),
        DatumType::U8 => (0, u8::MAX.into()),
        DatumType::I16
        | DatumType::U16
        | DatumType::I32
        | DatumType::U32
        | DatumType::I64
        | DatumType::U64 => (0, 255),
        other => bail!("input `{name}` has dtype {other:?}, which cannot be generated"),
    };
    match bound {
        Some((0, why)) => {
            notes.push(format!(
                "input `{name}` indexes an empty axis ({why}); filled with 0"
            ));
            Ok(ValueRange {
                low: 0.0,
                high: 0.0,
                why,
            })
        }
        Some((b, why)) => {
            let high = (b - 1).min(u64::try_from(type_max).unwrap_or(0));
            Ok(ValueRange {
                low: 0.0,
                high: high as f64,
                why,
            })
        }
        None => {
            let why = if dt == DatumType::I8 {
                "int8 range"
            } else {
                "byte values"
            };
            Ok(ValueRange {
                low: type_min as f64,
                high: type_max as f64,
                why: why.into(),
            })
        }
    }
}

/// Most bytes of the input tensors generated or filled for one run (1 GiB), one or all
/// together: more is almost always a mistyped `--input-shape` dim, which would otherwise take
/// the machine's memory (running the models takes several times their inputs' size).
pub const MAX_GENERATED_BYTES: usize = 1 << 30;

/// The element count of `shape`, `None` when it overflows.
fn checked_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The element count of a tensor of `shape` and `dt` the tool generates or fills.
///
/// Errors: the count overflows, or the tensor would take more than [`MAX_GENERATED_BYTES`].
fn generated_len(dt: DatumType, shape: &[usize]) -> Result<usize> {
    let n = checked_len(shape).with_context(|| {
        format!("shape {shape:?} has more elements than this machine can address")
    })?;
    let bytes = n.saturating_mul(dt.size_of());
    ensure!(
        bytes <= MAX_GENERATED_BYTES,
        "shape {shape:?} has {n} elements, {:.2} GiB as {dt:?}, more than the {} GiB this tool generates for a run's inputs; give a smaller --input-shape, or the values in an --inputs file",
        bytes as f64 / (1u64 << 30) as f64,
        MAX_GENERATED_BYTES >> 30
    );
    Ok(n)
}

/// A tensor of `shape` made from `data` without copying it.
fn tensor_of<T: Datum>(shape: &[usize], data: Vec<T>) -> Result<Tensor> {
    Ok(tract_onnx::prelude::tract_ndarray::ArrayD::from_shape_vec(shape, data)?.into())
}

fn random_tensor(
    dt: DatumType,
    shape: &[usize],
    range: &ValueRange,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let n = generated_len(dt, shape)?;
    let tensor = match dt {
        // Drawn as f64 (the values depend on the seed only, whatever the float type), stored
        // in the input's type as they are drawn.
        DatumType::F32 => tensor_of(
            shape,
            (0..n)
                .map(|_| rng.random_range(range.low..=range.high) as f32)
                .collect::<Vec<f32>>(),
        )?,
        DatumType::F16 => tensor_of(
            shape,
            (0..n)
                .map(|_| f16::from_f64(rng.random_range(range.low..=range.high)))
                .collect::<Vec<f16>>(),
        )?,
        DatumType::F64 => tensor_of(
            shape,
            (0..n)
                .map(|_| rng.random_range(range.low..=range.high))
                .collect::<Vec<f64>>(),
        )?,
        DatumType::Bool => tensor_of(
            shape,
            (0..n).map(|_| rng.random_bool(0.5)).collect::<Vec<bool>>(),
        )?,
        _ => {
            let (low, high) = (range.low as i64, range.high as i64);
            let data: Vec<i64> = (0..n).map(|_| rng.random_range(low..=high)).collect();
            let t = tensor_of(shape, data)?;
            if dt == DatumType::I64 {
                t
            } else {
                t.cast_to_dt(dt)?.into_owned()
            }
        }
    };
    Ok(tensor)
}

/// A tensor of `shape` and `dt` filled with `value`, which must be representable.
fn filled(dt: DatumType, shape: &[usize], value: f64) -> Result<Tensor> {
    let n = generated_len(dt, shape)?;
    let int_range: Option<(f64, f64)> = match dt {
        DatumType::I8 => Some((i8::MIN.into(), i8::MAX.into())),
        DatumType::I16 => Some((i16::MIN.into(), i16::MAX.into())),
        DatumType::I32 => Some((i32::MIN.into(), i32::MAX.into())),
        DatumType::I64 => Some((i64::MIN as f64, i64::MAX as f64)),
        DatumType::U8 => Some((0.0, u8::MAX.into())),
        DatumType::U16 => Some((0.0, u16::MAX.into())),
        DatumType::U32 => Some((0.0, u32::MAX.into())),
        DatumType::U64 => Some((0.0, u64::MAX as f64)),
        _ => None,
    };
    match dt {
        DatumType::Bool => {
            ensure!(
                value == 0.0 || value == 1.0,
                "{value} is not a boolean (0 or 1)"
            );
            Ok(Tensor::from_shape(shape, &vec![value == 1.0; n])?)
        }
        DatumType::F16 | DatumType::F32 | DatumType::F64 => {
            Ok(Tensor::from_shape(shape, &vec![value; n])?
                .cast_to_dt(dt)?
                .into_owned())
        }
        _ => {
            let (lo, hi) = int_range.ok_or_else(|| anyhow!("dtype {dt:?} cannot be filled"))?;
            ensure!(
                value.fract() == 0.0 && value >= lo && value <= hi,
                "{value} is not a whole number in the range of {dt:?}"
            );
            let data: Vec<i64> = vec![value as i64; n];
            if dt == DatumType::U64 {
                let data: Vec<u64> = vec![value as u64; n];
                return Tensor::from_shape(shape, &data);
            }
            Tensor::from_shape(shape, &data)?
                .cast_to_dt(dt)
                .map(|t| t.into_owned())
        }
    }
}

/// Where integer inputs are used as indices, and the sizes they index into, as far as
/// initializers and Constant nodes make them known.
struct IndexUses<'a> {
    /// value name -> (node, input slot) reading it, over the graph and all its subgraphs.
    consumers: HashMap<&'a str, Vec<(&'a pb::NodeProto, usize)>>,
    /// dims of initializers and Constant outputs.
    shapes: HashMap<&'a str, Vec<i64>>,
    /// integer scalar (or one-element) values of initializers and Constant outputs.
    scalars: HashMap<&'a str, i64>,
}

impl<'a> IndexUses<'a> {
    fn new(graph: &'a pb::GraphProto) -> Self {
        let mut uses = IndexUses {
            consumers: HashMap::new(),
            shapes: HashMap::new(),
            scalars: HashMap::new(),
        };
        uses.collect(graph);
        uses
    }

    fn collect(&mut self, graph: &'a pb::GraphProto) {
        for init in &graph.initializer {
            self.add_constant(init.name(), init);
        }
        for node in &graph.node {
            for (slot, input) in node.input.iter().enumerate() {
                if !input.is_empty() {
                    self.consumers
                        .entry(input.as_str())
                        .or_default()
                        .push((node, slot));
                }
            }
            if node.op_type() == "Constant" && node.domain().is_empty() {
                if let Some(out) = node.output.first() {
                    for attr in &node.attribute {
                        match attr.name() {
                            "value" => {
                                if let Some(t) = &attr.t {
                                    self.add_constant(out, t);
                                }
                            }
                            "value_int" => {
                                self.shapes.insert(out, vec![]);
                                self.scalars.insert(out, attr.i());
                            }
                            "value_ints" => {
                                self.shapes.insert(out, vec![attr.ints.len() as i64]);
                                if let [v] = attr.ints.as_slice() {
                                    self.scalars.insert(out, *v);
                                }
                            }
                            "value_float" => {
                                self.shapes.insert(out, vec![]);
                            }
                            "value_floats" => {
                                self.shapes.insert(out, vec![attr.floats.len() as i64]);
                            }
                            _ => {}
                        }
                    }
                }
            }
            for attr in &node.attribute {
                if let Some(g) = &attr.g {
                    self.collect(g);
                }
                for g in &attr.graphs {
                    self.collect(g);
                }
            }
        }
    }

    fn add_constant(&mut self, name: &'a str, t: &'a pb::TensorProto) {
        self.shapes.insert(name, t.dims.clone());
        if t.dims.iter().product::<i64>() == 1 {
            if let Some(v) = tensor_first_int(t) {
                self.scalars.insert(name, v);
            }
        }
    }

    fn dim(&self, name: &str, axis: i64) -> Option<u64> {
        let dims = self.shapes.get(name)?;
        let rank = dims.len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        let d = *dims.get(usize::try_from(axis).ok()?)?;
        u64::try_from(d).ok()
    }

    /// The smallest exclusive bound among the index uses of `input`, with a description.
    fn bound(&self, input: &str) -> Option<(u64, String)> {
        let mut best: Option<(u64, String)> = None;
        let mut seen: HashSet<&str> = HashSet::new();
        let mut queue: VecDeque<&str> = VecDeque::new();
        queue.push_back(input);
        while let Some(value) = queue.pop_front() {
            if !seen.insert(value) {
                continue;
            }
            for (node, slot) in self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[]) {
                let op = node.op_type();
                let node_name = if node.name().is_empty() {
                    node.output.first().map(String::as_str).unwrap_or("")
                } else {
                    node.name()
                };
                let data = |i: usize| node.input.get(i).map(String::as_str).unwrap_or("");
                let attr_i = |n: &str, default: i64| {
                    node.attribute
                        .iter()
                        .find(|a| a.name() == n)
                        .map(|a| a.i())
                        .unwrap_or(default)
                };
                let found: Option<u64> = match (op, *slot) {
                    (
                        "Cast" | "Identity" | "Unsqueeze" | "Squeeze" | "Flatten" | "Transpose",
                        0,
                    )
                    | ("Reshape" | "Expand", 0) => {
                        if let Some(out) = node.output.first() {
                            queue.push_back(out.as_str());
                        }
                        None
                    }
                    ("Gather" | "GatherElements" | "ScatterElements" | "Scatter", 1) => {
                        self.dim(data(0), attr_i("axis", 0))
                    }
                    ("GatherND" | "ScatterND", 1) => {
                        let batch_dims = if op == "GatherND" {
                            attr_i("batch_dims", 0)
                        } else {
                            0
                        };
                        self.shapes.get(data(0)).and_then(|dims| {
                            dims.iter()
                                .skip(usize::try_from(batch_dims).unwrap_or(0))
                                .filter_map(|&d| u64::try_from(d).ok())
                                .min()
                        })
                    }
                    ("OneHot", 0) => self
                        .scalars
                        .get(data(1))
                        .and_then(|&d| u64::try_from(d).ok()),
                    ("EmbedLayerNormalization", 0) => self.dim(data(2), 0),
                    ("EmbedLayerNormalization", 1) => self.dim(data(3), 0),
                    _ => None,
                };
                if let Some(b) = found {
                    if best.as_ref().is_none_or(|(old, _)| b < *old) {
                        best = Some((
                            b,
                            format!("indexes {op} `{node_name}` input {slot} (size {b})"),
                        ));
                    }
                }
            }
        }
        best
    }
}

/// The first element of an integer (or float) initializer, from typed fields or raw data.
fn tensor_first_int(t: &pb::TensorProto) -> Option<i64> {
    use pb::tensor_proto::DataType as D;
    let dt = D::try_from(t.data_type()).ok()?;
    if let Some(raw) = t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        let le = |n: usize| -> Option<[u8; 8]> {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(raw.get(..n)?);
            Some(b)
        };
        return Some(match dt {
            D::Int64 => i64::from_le_bytes(le(8)?),
            D::Int32 => i64::from(i32::from_le_bytes(le(4)?[..4].try_into().ok()?)),
            D::Uint64 => i64::try_from(u64::from_le_bytes(le(8)?)).ok()?,
            D::Int16 => i64::from(i16::from_le_bytes(le(2)?[..2].try_into().ok()?)),
            D::Float => f32::from_le_bytes(le(4)?[..4].try_into().ok()?) as i64,
            D::Double => f64::from_le_bytes(le(8)?) as i64,
            _ => return None,
        });
    }
    match dt {
        D::Int64 => t.int64_data.first().copied(),
        D::Int32 | D::Int16 | D::Int8 | D::Uint8 | D::Uint16 => {
            t.int32_data.first().map(|&v| i64::from(v))
        }
        D::Uint64 | D::Uint32 => t.uint64_data.first().and_then(|&v| i64::try_from(v).ok()),
        D::Float => t.float_data.first().map(|&v| v as i64),
        D::Double => t.double_data.first().map(|&v| v as i64),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::verify::testutil::*;
    use pb::tensor_proto::DataType;

    fn slice<T: Datum>(t: &Tensor) -> Vec<T> {
        t.try_as_plain_ram()
            .unwrap()
            .as_slice::<T>()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn parses_input_shapes() {
        assert_eq!(
            parse_input_shape("x:1,3,48,192").unwrap(),
            ("x".to_string(), vec![1, 3, 48, 192])
        );
        assert_eq!(
            parse_input_shape("input:0:2, 5").unwrap(),
            ("input:0".to_string(), vec![2, 5])
        );
        assert_eq!(
            parse_input_shape("sr:").unwrap(),
            ("sr".to_string(), vec![])
        );
        assert!(parse_input_shape("x").is_err());
        assert!(parse_input_shape(":1").is_err());
        assert!(parse_input_shape("x:1,-2").is_err());
    }

    #[test]
    fn parses_input_values() {
        assert_eq!(
            parse_input_value("sr=16000").unwrap(),
            ("sr".to_string(), 16000.0)
        );
        assert_eq!(
            parse_input_value("a=b=-0.5").unwrap(),
            ("a=b".to_string(), -0.5)
        );
        assert!(parse_input_value("sr").is_err());
        assert!(parse_input_value("sr=fast").is_err());
        assert_eq!(
            parse_input_value("cond=true").unwrap(),
            ("cond".into(), 1.0)
        );
        assert_eq!(
            parse_input_value("cond=false").unwrap(),
            ("cond".into(), 0.0)
        );
    }

    #[test]
    fn npz_round_trip_of_every_dtype() {
        let arrays: Vec<(String, Tensor)> = vec![
            (
                "f16".into(),
                Tensor::from_shape(&[2], &[f16::from_f32(0.5), f16::from_f32(-2.0)]).unwrap(),
            ),
            (
                "f32".into(),
                Tensor::from_shape(&[2, 2], &[1.0f32, -2.5, 3.25, f32::NAN]).unwrap(),
            ),
            (
                "f64".into(),
                Tensor::from_shape(&[1, 3], &[1.0f64, 1e-300, -7.0]).unwrap(),
            ),
            (
                "i8".into(),
                Tensor::from_shape(&[2], &[-128i8, 127]).unwrap(),
            ),
            ("u8".into(), Tensor::from_shape(&[2], &[0u8, 255]).unwrap()),
            (
                "i16".into(),
                Tensor::from_shape(&[2], &[-300i16, 300]).unwrap(),
            ),
            (
                "u16".into(),
                Tensor::from_shape(&[2], &[0u16, 65535]).unwrap(),
            ),
            (
                "i32".into(),
                Tensor::from_shape(&[2], &[i32::MIN, i32::MAX]).unwrap(),
            ),
            (
                "u32".into(),
                Tensor::from_shape(&[2], &[0u32, u32::MAX]).unwrap(),
            ),
            (
                "i64".into(),
                Tensor::from_shape(&[2], &[i64::MIN, i64::MAX]).unwrap(),
            ),
            (
                "u64".into(),
                Tensor::from_shape(&[2], &[0u64, u64::MAX]).unwrap(),
            ),
            (
                "bool".into(),
                Tensor::from_shape(&[3], &[true, false, true]).unwrap(),
            ),
            ("scalar".into(), Tensor::from(16000i64)),
            (
                "empty".into(),
                Tensor::from_shape::<f32>(&[0, 3], &[]).unwrap(),
            ),
            (
                "save_infer_model/scale_0.tmp_1".into(),
                Tensor::from_shape(&[1, 2], &[0.25f32, 0.75]).unwrap(),
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("round.npz");
        save_npz(&path, &arrays).unwrap();
        let back = load_npz(&path).unwrap();
        assert_eq!(back.len(), arrays.len());
        for ((n1, t1), (n2, t2)) in arrays.iter().zip(&back) {
            assert_eq!(n1, n2);
            assert_eq!(t1.datum_type(), t2.datum_type(), "{n1}");
            assert_eq!(t1.shape(), t2.shape(), "{n1}");
            assert_eq!(
                t1.try_as_plain_ram().unwrap().as_bytes(),
                t2.try_as_plain_ram().unwrap().as_bytes(),
                "{n1}"
            );
        }
    }

    #[test]
    fn npz_fortran_order_is_read_in_c_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fortran.npz");
        {
            let file = File::create(&path).unwrap();
            let mut npz = npyz::npz::NpzWriter::new(BufWriter::new(file));
            let mut w = npz
                .array::<i32>("m", Default::default())
                .unwrap()
                .default_dtype()
                .shape(&[2, 3])
                .order(Order::Fortran)
                .begin_nd()
                .unwrap();
            // Fortran order: element (i, j) is at i + 2 j.
            w.extend([0i32, 10, 1, 11, 2, 12]).unwrap();
            w.finish().unwrap();
            npz.zip_writer().finish().unwrap();
        }
        let back = load_npz(&path).unwrap();
        assert_eq!(back[0].1.shape(), &[2, 3]);
        assert_eq!(slice::<i32>(&back[0].1), vec![0, 1, 2, 10, 11, 12]);
    }

    #[test]
    fn npz_keys_come_in_the_order_the_file_holds_them() {
        // They came from a hash map: an error listing a sample's arrays changed from run to
        // run.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.npz");
        let names = ["state", "input", "sr", "zeta", "alpha", "h", "c", "mid"];
        let arrays: Vec<(String, Tensor)> = names
            .iter()
            .map(|n| (n.to_string(), Tensor::from(1f32)))
            .collect();
        save_npz(&p, &arrays).unwrap();
        assert_eq!(npz_keys(&p).unwrap(), names);
    }

    #[test]
    fn load_npz_errors_name_the_file() {
        let err = load_npz(Path::new("/nonexistent/inputs.npz")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/inputs.npz"));
    }

    #[test]
    fn generated_gather_indices_stay_in_range() {
        let model = gather_model(7);
        let prepared = prepare_inputs(
            &model,
            &InputOptions {
                seed: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let (name, ids) = &prepared.tensors[0];
        assert_eq!(name, "ids");
        assert_eq!(ids.datum_type(), DatumType::I64);
        assert_eq!(ids.shape(), &[1, 5]);
        let opts = InputOptions {
            seed: 3,
            shapes: vec![("ids".into(), vec![40, 5])],
            ..Default::default()
        };
        let prepared = prepare_inputs(&model, &opts).unwrap();
        let values = slice::<i64>(&prepared.tensors[0].1);
        assert_eq!(values.len(), 200);
        assert!(values.iter().all(|&v| (0..7).contains(&v)), "{values:?}");
        assert!(
            values.contains(&0) && values.contains(&6),
            "the whole range is used"
        );
        match &prepared.info[0].source {
            InputSource::Random { low, high, why, .. } => {
                assert_eq!((*low, *high), (0.0, 6.0));
                assert!(why.contains("Gather `gather`"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // It runs in tract: the indices are valid.
        crate::verify::run(&model, None, &prepared.tensors).unwrap();
    }

    #[test]
    fn the_smallest_bound_wins_and_gather_axis_is_honoured() {
        // ids feeds Gather(axis 1) of a [100, 3] table through Unsqueeze and Reshape, and
        // GatherElements(axis 0) of a [9, 2] tensor directly: bound min(3, 9) = 3.
        let m = model(
            vec![
                node("Unsqueeze", "u", &["ids", "axes"], &["ids_u"], vec![]),
                node("Reshape", "r", &["ids_u", "shape"], &["ids_r"], vec![]),
                node(
                    "Gather",
                    "g1",
                    &["t1", "ids_r"],
                    &["o1"],
                    vec![attr_i("axis", 1)],
                ),
                node(
                    "GatherElements",
                    "g2",
                    &["t2", "ids"],
                    &["o2"],
                    vec![attr_i("axis", 0)],
                ),
            ],
            vec![info("ids", DataType::Int64, &[4, 2])],
            vec![out("o1"), out("o2")],
            vec![
                init_f32("t1", &[100, 3], &vec![0.0; 300]),
                init_f32("t2", &[9, 2], &[0.0; 18]),
                init_i64("axes", &[1], &[0]),
                init_i64("shape", &[1], &[-1]),
            ],
        );
        let opts = InputOptions {
            seed: 1,
            shapes: vec![("ids".into(), vec![64, 2])],
            ..Default::default()
        };
        let p = prepare_inputs(&m, &opts).unwrap();
        let values = slice::<i64>(&p.tensors[0].1);
        assert!(values.iter().all(|&v| (0..3).contains(&v)));
        assert!(values.contains(&2));
    }

    #[test]
    fn unbounded_integers_are_bytes_and_floats_are_in_minus_one_one() {
        let m = model(
            vec![
                node("Identity", "i", &["bytes"], &["o"], vec![]),
                node("Identity", "j", &["x"], &["p"], vec![]),
            ],
            vec![
                info("bytes", DataType::Int32, &[1, 2048]),
                info("x", DataType::Float, &[64]),
            ],
            vec![out("o"), out("p")],
            vec![],
        );
        let p = prepare_inputs(&m, &InputOptions::default()).unwrap();
        let bytes = slice::<i32>(&p.tensors[0].1);
        assert!(bytes.iter().all(|&v| (0..=255).contains(&v)));
        assert!(bytes.iter().any(|&v| v > 200));
        let x = slice::<f32>(&p.tensors[1].1);
        assert!(x.iter().all(|&v| (-1.0..=1.0).contains(&v)));
        assert!(x.iter().any(|&v| v < -0.5) && x.iter().any(|&v| v > 0.5));
    }

    #[test]
    fn generation_is_seeded_per_input_name() {
        let m = add_model(&[0.0; 6]);
        let opts = InputOptions {
            seed: 42,
            ..Default::default()
        };
        let a = prepare_inputs(&m, &opts).unwrap();
        let b = prepare_inputs(&m, &opts).unwrap();
        assert_eq!(slice::<f32>(&a.tensors[0].1), slice::<f32>(&b.tensors[0].1));
        let c = prepare_inputs(
            &m,
            &InputOptions {
                seed: 43,
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(slice::<f32>(&a.tensors[0].1), slice::<f32>(&c.tensors[0].1));
    }

    #[test]
    fn symbolic_dims_default_to_one_with_a_note() {
        let m = model(
            vec![node("Identity", "i", &["x"], &["y"], vec![])],
            vec![dims_info(
                "x",
                DataType::Float,
                &[Dim::P("batch"), Dim::N(3), Dim::N(-1)],
            )],
            vec![out("y")],
            vec![],
        );
        let p = prepare_inputs(&m, &InputOptions::default()).unwrap();
        assert_eq!(p.tensors[0].1.shape(), &[1, 3, 1]);
        assert_eq!(p.notes.len(), 1);
        assert!(
            p.notes[0].contains("`batch`") && p.notes[0].contains("2 (`-1`)"),
            "{}",
            p.notes[0]
        );
        let opts = InputOptions {
            shapes: vec![("x".into(), vec![2, 3])],
            ..Default::default()
        };
        let err = prepare_inputs(&m, &opts).unwrap_err();
        assert!(format!("{err:#}").contains("rank"), "{err:#}");
        // An empty input gets a note (the check passed on it without a word).
        let opts = InputOptions {
            shapes: vec![("x".into(), vec![1, 3, 0])],
            ..Default::default()
        };
        let p = prepare_inputs(&m, &opts).unwrap();
        assert!(
            p.notes
                .iter()
                .any(|n| n.starts_with("input `x` is empty (shape [1, 3, 0])")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn values_fill_the_tensor_and_are_checked_against_the_dtype() {
        let m = model(
            vec![node("Identity", "i", &["sr"], &["y"], vec![])],
            vec![info("sr", DataType::Int64, &[])],
            vec![out("y")],
            vec![],
        );
        let opts = InputOptions {
            values: vec![("sr".into(), 16000.0)],
            ..Default::default()
        };
        let p = prepare_inputs(&m, &opts).unwrap();
        assert_eq!(p.tensors[0].1.shape(), &[] as &[usize]);
        assert_eq!(slice::<i64>(&p.tensors[0].1), vec![16000]);
        assert_eq!(p.info[0].source, InputSource::Value { value: 16000.0 });
        let opts = InputOptions {
            values: vec![("sr".into(), 0.5)],
            ..Default::default()
        };
        assert!(prepare_inputs(&m, &opts).is_err());
        let opts = InputOptions {
            values: vec![("nope".into(), 1.0)],
            ..Default::default()
        };
        let err = format!("{:#}", prepare_inputs(&m, &opts).unwrap_err());
        assert!(err.contains("nope") && err.contains("sr"), "{err}");
        // A float input filled with NaN gives a note, as NaN in an npz input does (the check
        // said "every gate holds" without a word).
        let m = add_model(&[0.0; 6]);
        let opts = InputOptions {
            values: vec![("x".into(), f64::NAN)],
            ..Default::default()
        };
        let p = prepare_inputs(&m, &opts).unwrap();
        assert!(
            p.notes
                .iter()
                .any(|n| n.starts_with("input `x` is filled with NaN")),
            "{:?}",
            p.notes
        );
        // So does a finite value the input's type cannot hold.
        let opts = InputOptions {
            values: vec![("x".into(), 1e39)],
            ..Default::default()
        };
        let p = prepare_inputs(&m, &opts).unwrap();
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains(", which F32 cannot hold (it becomes infinite)")),
            "{:?}",
            p.notes
        );
    }

    /// A batch file (samples on axis 0) gives sample `i` alone; NaN in an npz input gives a
    /// note.
    #[test]
    fn npz_sample_and_non_finite_values() {
        let m = add_model(&[0.0; 6]); // x f32 [2, 3]
        let dir = tempfile::tempdir().unwrap();
        let batch = dir.path().join("batch.npz");
        let data: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let x = Tensor::from_shape(&[3, 2, 3], &data).unwrap();
        save_npz(&batch, &[("x".into(), x)]).unwrap();
        let p = prepare_inputs(
            &m,
            &InputOptions {
                npz: Some(batch.clone()),
                npz_sample: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        let want = Tensor::from_shape(&[2, 3], &data[6..12]).unwrap();
        assert_eq!(p.tensors[0].1, want);
        assert_eq!(
            p.info[0].source,
            InputSource::Npz {
                path: batch.clone(),
                sample: Some(1)
            }
        );
        let err = prepare_inputs(
            &m,
            &InputOptions {
                npz: Some(batch),
                npz_sample: Some(3),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("no sample 3"), "{err:#}");

        // An input without the sample axis (a scalar) is fed whole, as calibration feeds it.
        use crate::verify::testutil::{info, model, node, out};
        let scaled = model(
            vec![node("Mul", "mul", &["x", "s"], &["y"], vec![])],
            vec![
                info("x", pb::tensor_proto::DataType::Float, &[2, 3]),
                info("s", pb::tensor_proto::DataType::Float, &[]),
            ],
            vec![out("y")],
            vec![],
        );
        let with_scalar = dir.path().join("with_scalar.npz");
        let x = Tensor::from_shape(&[3, 2, 3], &data).unwrap();
        save_npz(
            &with_scalar,
            &[("x".into(), x), ("s".into(), Tensor::from(2.5f32))],
        )
        .unwrap();
        let p = prepare_inputs(
            &scaled,
            &InputOptions {
                npz: Some(with_scalar),
                npz_sample: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        let want = Tensor::from_shape(&[2, 3], &data[12..18]).unwrap();
        assert_eq!(p.tensors[0].1, want);
        assert_eq!(p.tensors[1].1, Tensor::from(2.5f32));

        let nan = dir.path().join("nan.npz");
        let x =
            Tensor::from_shape(&[2, 3], &[1.0, f32::NAN, 2.0, f32::INFINITY, 0.0, 0.0]).unwrap();
        save_npz(&nan, &[("x".into(), x)]).unwrap();
        let p = prepare_inputs(
            &m,
            &InputOptions {
                npz: Some(nan),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            p.notes
                .iter()
                .any(|n| n == "input `x` holds 2 NaN or infinite value(s) of 6"),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn npz_inputs_are_checked() {
        let m = add_model(&[0.0; 6]);
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.npz");
        let x = Tensor::from_shape(&[2, 3], &[1.0f32; 6]).unwrap();
        save_npz(&good, &[("x".into(), x.clone()), ("y".into(), x.clone())]).unwrap();
        let p = prepare_inputs(
            &m,
            &InputOptions {
                npz: Some(good.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.tensors.len(), 1);
        assert_eq!(p.tensors[0].1, x);
        assert_eq!(
            p.info[0].source,
            InputSource::Npz {
                path: good,
                sample: None
            }
        );

        let missing = dir.path().join("missing.npz");
        save_npz(&missing, &[("y".into(), x.clone())]).unwrap();
        let err = format!(
            "{:#}",
            prepare_inputs(
                &m,
                &InputOptions {
                    npz: Some(missing),
                    ..Default::default()
                }
            )
            .unwrap_err()
        );
        assert!(
            err.contains("missing.npz") && err.contains("\"x\""),
            "{err}"
        );

        let wrong = dir.path().join("wrong.npz");
        save_npz(
            &wrong,
            &[(
                "x".into(),
                Tensor::from_shape(&[2, 3], &[1.0f64; 6]).unwrap(),
            )],
        )
        .unwrap();
        let err = format!(
            "{:#}",
            prepare_inputs(
                &m,
                &InputOptions {
                    npz: Some(wrong),
                    ..Default::default()
                }
            )
            .unwrap_err()
        );
        assert!(
            err.contains("`x`") && err.contains("F64") && err.contains("F32"),
            "{err}"
        );
    }

    #[test]
    fn onehot_depth_and_constant_shapes_bound_indices() {
        let depth = pb::TensorProto {
            dims: vec![],
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some(bytes::Bytes::copy_from_slice(&5i64.to_le_bytes())),
            ..Default::default()
        };
        let table = pb::AttributeProto {
            name: Some("value".into()),
            t: Some(pb::TensorProto {
                dims: vec![11, 2],
                data_type: Some(DataType::Float as i32),
                ..Default::default()
            }),
            ..Default::default()
        };
        let depth_attr = pb::AttributeProto {
            name: Some("value".into()),
            t: Some(depth),
            ..Default::default()
        };
        let m = model(
            vec![
                node("Constant", "k", &[], &["depth"], vec![depth_attr]),
                node("Constant", "tab", &[], &["table"], vec![table]),
                node("OneHot", "oh", &["a", "depth", "vals"], &["o"], vec![]),
                node("Gather", "g", &["table", "b"], &["p"], vec![]),
            ],
            vec![
                info("a", DataType::Int64, &[50]),
                info("b", DataType::Int32, &[50]),
            ],
            vec![out("o"), out("p")],
            vec![],
        );
        let p = prepare_inputs(&m, &InputOptions::default()).unwrap();
        assert!(slice::<i64>(&p.tensors[0].1)
            .iter()
            .all(|&v| (0..5).contains(&v)));
        assert!(slice::<i32>(&p.tensors[1].1)
            .iter()
            .all(|&v| (0..11).contains(&v)));
    }
}
