//! Reading and writing `.onnx` files.
//!
//! Load: the file is memory-mapped and decoded with prost straight from the map, so tensor
//! payloads are slices of the map (no copy); external data is resolved and checked; the IR is
//! built and every problem found is reported at once.
//!
//! Save: the IR is exported in a stable order and encoded by streaming into a temporary file in
//! the destination folder, then renamed over the destination (atomic). Tensor data goes to an
//! external data file when asked, and always when the protobuf would exceed its 2 GiB limit.

pub mod export;
pub(crate) mod external;
pub(crate) mod import;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use bytes::{BufMut, Bytes};
use prost::Message;

use crate::ir::Model;
use crate::pb;

/// Protobuf's hard limit on one message (2 GiB), less a margin for headers.
pub const PROTOBUF_LIMIT: u64 = (2u64 << 30) - (1 << 20);

/// What [`load`] found besides the model.
#[derive(Debug, Clone, Default)]
pub struct LoadInfo {
    /// Size of the `.onnx` file in bytes.
    pub file_size: u64,
    /// External data files read.
    pub external: Vec<ExternalUse>,
}

/// One external data file read: (location, tensors, bytes).
pub type ExternalUse = (String, usize, u64);

impl LoadInfo {
    /// The paths of the external data files read, for a model loaded from `model`
    /// (locations are relative to its folder).
    pub fn external_paths(&self, model: &Path) -> Vec<PathBuf> {
        let dir = model.parent().unwrap_or(Path::new(""));
        self.external
            .iter()
            .map(|(location, _, _)| dir.join(location))
            .collect()
    }
}

/// Reads a whole file as `Bytes`: memory-mapped when it is not empty.
pub(crate) fn read_file_bytes(path: &Path) -> Result<Bytes> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the map is read-only; like every mmap-based reader (onnxruntime included) we
    // assume the file is not truncated by another process while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    Ok(Bytes::from_owner(map))
}

/// Decodes a `ModelProto` from `bytes` without copying tensor payloads.
pub fn decode(bytes: Bytes, what: &str) -> Result<pb::ModelProto> {
    if bytes.is_empty() {
        bail!("{what}: the file is empty, not an ONNX model");
    }
    pb::ModelProto::decode(bytes).map_err(|e| {
        anyhow::anyhow!("{what}: not a valid ONNX model: the protobuf does not decode ({e})")
    })
}

/// Loads the model at `path` into the IR.
///
/// Errors (all problems listed at once, each naming graph, node, op and tensor): unreadable
/// file, protobuf that does not decode (truncated or not ONNX), no graph, unsafe or broken
/// external data, tensors whose dims overflow or whose payload has the wrong size, values
/// read but never defined, values defined twice.
pub fn load(path: &Path) -> Result<(Model, LoadInfo)> {
    let what = path.display().to_string();
    let bytes = read_file_bytes(path)?;
    let file_size = bytes.len() as u64;
    let proto = decode(bytes, &what)?;
    let dir = path.parent().map(|_| folder_of(path).to_path_buf());
    let (model, external) = from_proto(proto, dir, &what)?;
    Ok((
        model,
        LoadInfo {
            file_size,
            external,
        },
    ))
}

/// Builds the IR of a decoded model; `dir` is the folder external data is relative to.
pub fn from_proto(
    proto: pb::ModelProto,
    dir: Option<PathBuf>,
    what: &str,
) -> Result<(Model, Vec<ExternalUse>)> {
    let mut ext = external::ExternalData::new(dir);
    let mut problems = import::Problems::default();
    let model = import::import_model(proto, &mut ext, &mut problems);
    for (location, later) in &ext.unreadable {
        if let Some(first) = later.first() {
            problems.list.push(format!(
                "external data '{location}' (as above): {} more tensor(s) store their data there ('{first}'{})",
                later.len(),
                if later.len() > 1 { ", ..." } else { "" }
            ));
        }
    }
    import::into_result(problems, what)?;
    let model = model.context("no model")?;
    crate::ir::validate::validate(&model).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok((model, ext.used))
}

/// How [`save`] writes.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Write initializers of at least `external_threshold` bytes to an external data file
    /// named after the model (`OUT.onnx.data`), beside it.
    pub external_data: bool,
    /// Minimum initializer size in bytes to go to the external data file.
    pub external_threshold: usize,
    /// Files that must not be overwritten (the input model).
    pub protect: Vec<PathBuf>,
    /// Lets [`crate::optimize::optimize`] write over its input model (`--force`); without it
    /// the input model is protected whatever `protect` holds.
    pub replace_input: bool,
    /// Files the external data file must not overwrite (the input model's external data).
    pub protect_data: Vec<PathBuf>,
    /// Other files the run writes, by option (`--report`): checked with [`refuse_clobbering_external`].
    pub also_written: Vec<(String, PathBuf)>,
}

/// The external data file [`save`] writes beside `output`: `OUTPUT.data` (the file name with
/// `.data` appended) in the same folder.
pub fn external_data_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".data");
    output.with_file_name(name)
}

/// Refuses a run whose output (`output`, its external data file when `opts` writes one, the
/// files of `opts.also_written`) would replace an external data file the input `model` reads
/// (`info.external`), unless `output` replaces the model itself (`--force`).
///
/// Errors: every such collision, one line each.
pub fn refuse_clobbering_external(
    model: &Path,
    info: &LoadInfo,
    output: &Path,
    opts: &SaveOptions,
) -> Result<()> {
    let data = external_data_path(output);
    let mut writes: Vec<(&str, &Path)> = Vec::new();
    if !same_file(model, output) {
        writes.push(("-o", output));
        if opts.external_data {
            writes.push(("-o's external data file", data.as_path()));
        }
    }
    writes.extend(
        opts.also_written
            .iter()
            .map(|(o, p)| (o.as_str(), p.as_path())),
    );
    let mut problems = Vec::new();
    for read in info.external_paths(model) {
        for (option, w) in &writes {
            if same_file(w, &read) {
                problems.push(format!(
                    "{option} {} would overwrite {}, the external data {} reads",
                    w.display(),
                    read.display(),
                    model.display()
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "refusing to overwrite files this command reads (choose other paths):\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// What [`save`] wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SaveInfo {
    /// Bytes of the `.onnx` file.
    pub model_bytes: u64,
    /// External data file name and its bytes, when one was written.
    pub external: Option<(String, u64)>,
    /// True when external data was used only because the model exceeds 2 GiB.
    pub external_forced: bool,
}

/// Saves `model` to `path` atomically and deterministically.
///
/// Errors: `path` is a protected file (the input), the graph has a cycle, or I/O fails; on error
/// nothing is left behind at `path`.
pub fn save(model: &Model, path: &Path, opts: &SaveOptions) -> Result<SaveInfo> {
    let mut proto = export::to_proto(model)?;
    save_proto(&mut proto, path, opts)
}

/// Saves a `ModelProto` (see [`save`]); external data moves out of `proto` when written.
pub fn save_proto(proto: &mut pb::ModelProto, path: &Path, opts: &SaveOptions) -> Result<SaveInfo> {
    ensure!(
        !path.is_dir(),
        "cannot write {}: it is a folder",
        path.display()
    );
    for p in &opts.protect {
        if same_file(p, path) {
            bail!(
                "refusing to overwrite the input model {} (choose another output, or pass --force)",
                path.display()
            );
        }
    }
    let refuse_data = |data: &Path| -> Result<()> {
        for p in &opts.protect_data {
            if same_file(p, data) {
                bail!(
                    "refusing to overwrite {}, the input model's external data (choose another output name)",
                    data.display()
                );
            }
        }
        Ok(())
    };
    let (dir, file_name) = folder_and_name(path)?;
    let mut info = SaveInfo::default();
    let mut external = opts.external_data;
    if !external && proto.encoded_len() as u64 > PROTOBUF_LIMIT {
        external = true;
        info.external_forced = true;
    }
    let mut data_tmp = None;
    if external {
        let data_name = format!("{file_name}.data");
        let data_path = external_data_path(path);
        refuse_data(&data_path)?;
        let threshold = if opts.external_data {
            opts.external_threshold
        } else {
            1024
        };
        let mut tmp = temp_in(&dir, &data_name, ".tmp")?;
        let written = {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
            let mut offset = 0u64;
            if let Some(g) = proto.graph.as_mut() {
                externalize_graph(g, &data_name, threshold, &mut w, &mut offset)?;
            }
            w.flush()?;
            offset
        };
        // No tensor qualified: write no data file at all (the temporary one is removed).
        if written > 0 {
            info.external = Some((data_name.clone(), written));
            data_tmp = Some((tmp, data_path));
        }
    }
    let mut tmp = temp_in(&dir, &file_name, ".tmp")?;
    let len = proto.encoded_len() as u64;
    if len > PROTOBUF_LIMIT + (1 << 20) {
        bail!("the model's protobuf would be {len} bytes, over the 2 GiB limit, even with external data");
    }
    {
        let mut sink = StreamBuf::new(tmp.as_file_mut());
        proto
            .encode(&mut sink)
            .map_err(|e| anyhow::anyhow!("encoding failed: {e}"))?;
        sink.finish()
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    info.model_bytes = len;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    match data_tmp {
        None => {
            tmp.persist(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Some((data, dest)) => {
            data.as_file()
                .sync_all()
                .with_context(|| format!("cannot write {}", dest.display()))?;
            replace_pair(tmp, path, data, &dest, &dir)?;
        }
    }
    Ok(info)
}

/// Renames the temporary `model` and `data` files over `path` and `dest` as one change: the
/// previous files are moved aside first and put back if a rename fails, so a failure leaves
/// the previous pair (or nothing) and never a model beside another model's data, whose offsets
/// would read other values. A crash between the renames leaves no file at `path` (the previous
/// files stay in `dir` under hidden `.tmp` names).
///
/// Errors: a rename fails.
fn replace_pair(
    model: tempfile::NamedTempFile,
    path: &Path,
    data: tempfile::NamedTempFile,
    dest: &Path,
    dir: &Path,
) -> Result<()> {
    // Each previous file, moved aside to a free hidden name.
    let aside = |p: &Path| -> Result<Option<tempfile::TempPath>> {
        if std::fs::symlink_metadata(p).is_err() {
            return Ok(None);
        }
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        let backup = temp_in(dir, &name, ".old.tmp")?.into_temp_path();
        std::fs::rename(p, &backup)
            .with_context(|| format!("cannot move {} aside", p.display()))?;
        Ok(Some(backup))
    };
    let restore = |backup: Option<tempfile::TempPath>, p: &Path| {
        // Kept (the guard disarmed), then renamed back.
        if let Some(Ok(b)) = backup.map(tempfile::TempPath::keep) {
            let _ = std::fs::rename(b, p);
        }
    };
    let old_model = aside(path)?;
    let old_data = match aside(dest) {
        Ok(b) => b,
        Err(e) => {
            restore(old_model, path);
            return Err(e);
        }
    };
    // On failure the temporary files are removed (dropped) before the error returns.
    if let Err(e) = data.persist(dest) {
        drop(model);
        restore(old_data, dest);
        restore(old_model, path);
        return Err(e.error).with_context(|| format!("cannot write {}", dest.display()));
    }
    if let Err(e) = model.persist(path) {
        let _ = std::fs::remove_file(dest);
        restore(old_data, dest);
        restore(old_model, path);
        return Err(e.error).with_context(|| format!("cannot write {}", path.display()));
    }
    // The previous files are removed when their guards drop.
    drop((old_model, old_data));
    Ok(())
}

/// Mode of written files: 0666 less the process umask, as for any file a program creates
/// (the temporary file would otherwise keep tempfile's private 0600 after the rename).
fn output_permissions() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o666)
}

/// Whether `a` and `b` name one existing file: the same device and inode, so symbolic links,
/// `..` and hard links are seen through.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The folder `path` is in: its parent, `.` for a bare file name.
pub fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The folder `path` is in ([`folder_of`]) and its file name.
///
/// Errors: `path` has no file name (`..`, `/`).
fn folder_and_name(path: &Path) -> Result<(PathBuf, String)> {
    let dir = folder_of(path).to_path_buf();
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_string_lossy()
        .to_string();
    Ok((dir, name))
}

/// A new temporary file `.{name}.XXXXXX{suffix}` in `dir`, with the mode of written files
/// ([`output_permissions`]); removed when dropped unless persisted.
///
/// Errors: the file cannot be created.
fn temp_in(dir: &Path, name: &str, suffix: &str) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(suffix)
        .permissions(output_permissions())
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file in its folder, flushed to disk, then
/// renamed over `path`, so that `path` holds either its old content or the new one, and a
/// file hard-linked to `path` keeps its content. A symbolic link is followed (its target is
/// replaced, the link stays), and a path that is not a regular file (a device such as
/// `/dev/stdout`, a FIFO) is written in place, as a plain write would.
///
/// Errors: `path` is a folder, or the temporary file cannot be created, written or renamed
/// (it is removed then), or the write in place fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    ensure!(!path.is_dir(), "{} is a folder", path.display());
    let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match std::fs::metadata(path) {
        // A device or FIFO (through a link or not): renaming over it would replace it.
        Ok(m) if !m.is_file() => {
            std::fs::write(path, bytes)?;
            return Ok(());
        }
        // A link to a file: the file it names is replaced.
        Ok(_) if link => return write_atomic(&std::fs::canonicalize(path)?, bytes),
        // A dangling link: written through, as a plain write would.
        Err(_) if link => {
            std::fs::write(path, bytes)?;
            return Ok(());
        }
        _ => {}
    }
    let (dir, name) = folder_and_name(path)?;
    let mut tmp = temp_in(&dir, &name, ".tmp")?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}

/// Moves every non-empty initializer payload of at least `threshold` bytes (in `raw_data`, or
/// in a typed field, as raw bytes: [`crate::ir::tensor::typed_to_raw`]) of `g` and its
/// subgraphs to `w` (int32/int64 tensors under 1 KiB, shape data, stay inline),
/// replacing it by an external data reference. Offsets are aligned to 64
/// bytes, and to 4096 for tensors of 1 MiB or more, so readers can map them.
fn externalize_graph(
    g: &mut pb::GraphProto,
    location: &str,
    threshold: usize,
    w: &mut impl Write,
    offset: &mut u64,
) -> Result<()> {
    for t in &mut g.initializer {
        // Values in a typed field (`float_data`, ...) go out as their raw bytes.
        let converted = crate::ir::tensor::typed_to_raw(t);
        let raw: &[u8] = match (&t.raw_data, &converted) {
            (Some(raw), _) => raw,
            (None, Some(c)) => c,
            (None, None) => continue,
        };
        if raw.is_empty() || raw.len() < threshold {
            continue;
        }
        // Small integer tensors are shape data (Reshape shapes, Slice bounds) that runtimes
        // read while building their plan: they stay inline whatever the threshold.
        let int = matches!(
            pb::tensor_proto::DataType::try_from(t.data_type()),
            Ok(pb::tensor_proto::DataType::Int64 | pb::tensor_proto::DataType::Int32)
        );
        if int && raw.len() < 1024 {
            continue;
        }
        let align: u64 = if raw.len() >= 1 << 20 { 4096 } else { 64 };
        let pad = (align - *offset % align) % align;
        w.write_all(&vec![0u8; pad as usize])?;
        *offset += pad;
        w.write_all(raw)?;
        let entry = |k: &str, v: String| pb::StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v),
        };
        t.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", offset.to_string()),
            entry("length", raw.len().to_string()),
        ];
        *offset += raw.len() as u64;
        t.raw_data = None;
        if converted.is_some() {
            t.float_data.clear();
            t.double_data.clear();
            t.int32_data.clear();
            t.int64_data.clear();
            t.uint64_data.clear();
        }
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            if let Some(sg) = a.g.as_mut() {
                externalize_graph(sg, location, threshold, w, offset)?;
            }
            for sg in &mut a.graphs {
                externalize_graph(sg, location, threshold, w, offset)?;
            }
        }
    }
    Ok(())
}

/// A `BufMut` that streams into a writer through a 1 MiB buffer, so encoding a model never
/// holds a second copy of it in memory. Write errors are kept and returned by `finish`.
struct StreamBuf<W: Write> {
    w: W,
    buf: Vec<u8>,
    err: Option<std::io::Error>,
}

impl<W: Write> StreamBuf<W> {
    fn new(w: W) -> Self {
        StreamBuf {
            w,
            buf: Vec::with_capacity(1 << 20),
            err: None,
        }
    }
    fn flush_buf(&mut self) {
        if self.err.is_none() && !self.buf.is_empty() {
            if let Err(e) = self.w.write_all(&self.buf) {
                self.err = Some(e);
            }
        }
        self.buf.clear();
    }
    fn finish(mut self) -> std::io::Result<()> {
        self.flush_buf();
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        self.w.flush()
    }
}

// SAFETY: `chunk_mut` hands out the spare capacity of `buf` and `advance_mut` only extends the
// length over bytes the caller has initialised, as the trait requires.
unsafe impl<W: Write> BufMut for StreamBuf<W> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize
    }
    unsafe fn advance_mut(&mut self, cnt: usize) {
        let new_len = self.buf.len() + cnt;
        assert!(new_len <= self.buf.capacity());
        // SAFETY: the caller initialised `cnt` bytes of the spare capacity (trait contract).
        unsafe { self.buf.set_len(new_len) };
    }
    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
        self.buf.spare_capacity_mut().into()
    }
    fn put<T: bytes::Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let n = {
                let c = src.chunk();
                self.put_slice(c);
                c.len()
            };
            src.advance(n);
        }
    }
    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= self.buf.capacity() / 2 {
            self.flush_buf();
            if self.err.is_none() {
                if let Err(e) = self.w.write_all(src) {
                    self.err = Some(e);
                }
            }
            return;
        }
        if self.buf.capacity() - self.buf.len() < src.len() {
            self.flush_buf();
        }
        self.buf.extend_from_slice(src);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Initializers whose values are in a typed field (`float_data`, `int32_data` for
    /// float16, ...) go to the external data file too, as raw bytes (they stayed inline, so
    /// `--external-data` wrote no data file for such models), and read back the same.
    #[test]
    fn typed_field_initializers_go_to_external_data() {
        use pb::tensor_proto::DataType;
        let dir = tempfile::tempdir().unwrap();
        let typed = |name: &str, dt: DataType| pb::TensorProto {
            name: Some(name.into()),
            dims: vec![4],
            data_type: Some(dt as i32),
            ..Default::default()
        };
        let mut f = typed("f", DataType::Float);
        f.float_data = vec![1.0, -2.5, 3.25, 0.0];
        let mut h = typed("h", DataType::Float16);
        h.int32_data = [1.0f32, -2.0, 0.5, 65504.0]
            .iter()
            .map(|&v| i32::from(half::f16::from_f32(v).to_bits()))
            .collect();
        let mut i = typed("i", DataType::Int8);
        i.int32_data = vec![-128, -1, 0, 127];
        let mut l = typed("l", DataType::Int64);
        l.int64_data = vec![i64::MIN, -1, 0, 1 << 40];
        let inits = vec![f, h, i, l];
        let p = pb::ModelProto {
            ir_version: Some(8),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(pb::GraphProto {
                name: Some("g".into()),
                node: ["f", "h", "i", "l"]
                    .iter()
                    .map(|n| pb::NodeProto {
                        op_type: Some("Identity".into()),
                        input: vec![n.to_string()],
                        output: vec![format!("{n}_out")],
                        ..Default::default()
                    })
                    .collect(),
                output: ["f", "h", "i", "l"]
                    .iter()
                    .map(|n| pb::ValueInfoProto {
                        name: Some(format!("{n}_out")),
                        ..Default::default()
                    })
                    .collect(),
                initializer: inits.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let path = dir.path().join("m.onnx");
        let opts = SaveOptions {
            external_data: true,
            external_threshold: 0,
            ..Default::default()
        };
        let mut out = p.clone();
        save_proto(&mut out, &path, &opts).unwrap();
        let data = std::fs::read(external_data_path(&path)).unwrap();
        // 16 + 8 + 4 bytes of values (the int64 tensor is shape-sized and stays inline).
        let stored: Vec<&pb::TensorProto> =
            out.graph.as_ref().unwrap().initializer.iter().collect();
        let external: Vec<&str> = stored
            .iter()
            .filter(|t| !t.external_data.is_empty())
            .map(|t| t.name())
            .collect();
        assert_eq!(external, ["f", "h", "i"]);
        assert!(data.len() >= 28, "{}", data.len());
        let (m, _) = load(&path).unwrap();
        for want in &inits {
            let v = m.graph.find(want.name()).unwrap();
            let got = m.graph.initializer(v).unwrap();
            assert_eq!(
                got.to_f32().unwrap(),
                crate::ir::Tensor::new(want.clone()).to_f32().unwrap(),
                "{}",
                want.name()
            );
        }
    }

    /// A model and its external data replace the previous pair as one change: when the
    /// model's rename fails, the previous data file is put back (the new data beside the old
    /// model made it read other values: NaN outputs in onnxruntime), and no file is left
    /// behind; when both renames succeed, no previous file is left either.
    #[test]
    fn a_failed_save_with_external_data_leaves_the_previous_pair() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let tmp = |content: &str| {
            let mut t = tempfile::NamedTempFile::new_in(d).unwrap();
            t.write_all(content.as_bytes()).unwrap();
            t
        };
        let data = d.join("m.onnx.data");
        std::fs::write(&data, "old data").unwrap();
        // The model's rename fails: its folder does not exist.
        let path = d.join("missing").join("m.onnx");
        let err = replace_pair(tmp("new model"), &path, tmp("new data"), &data, d).unwrap_err();
        assert!(format!("{err:#}").contains("cannot write"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&data).unwrap(), "old data");
        let left: Vec<_> = std::fs::read_dir(d).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");

        let path = d.join("m.onnx");
        std::fs::write(&path, "old model").unwrap();
        replace_pair(tmp("new model"), &path, tmp("new data"), &data, d).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new model");
        assert_eq!(std::fs::read_to_string(&data).unwrap(), "new data");
        let mut left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["m.onnx", "m.onnx.data"]);
    }

    /// A malformed sparse initializer (int32 indices, an index outside the dense shape, values
    /// of rank 2) is refused when the model is loaded, naming it and what is wrong; it was
    /// run as if valid (int32 indices read as int64 put values elsewhere) or left
    /// "values used but never defined".
    #[test]
    fn a_malformed_sparse_initializer_is_refused_naming_it() {
        let values = |dims: Vec<i64>| pb::TensorProto {
            name: Some("w".into()),
            dims,
            data_type: Some(pb::tensor_proto::DataType::Float as i32),
            float_data: vec![5.0, 7.0],
            ..Default::default()
        };
        let indices =
            |dt: pb::tensor_proto::DataType, v: Vec<i64>, dims: Vec<i64>| pb::TensorProto {
                name: Some("w_indices".into()),
                dims,
                data_type: Some(dt as i32),
                int64_data: if dt == pb::tensor_proto::DataType::Int64 {
                    v.clone()
                } else {
                    vec![]
                },
                int32_data: if dt == pb::tensor_proto::DataType::Int32 {
                    v.iter().map(|&i| i as i32).collect()
                } else {
                    vec![]
                },
                ..Default::default()
            };
        use pb::tensor_proto::DataType::{Int32, Int64};
        for (sparse, want) in [
            (
                (
                    values(vec![2]),
                    indices(Int32, vec![1, 0, 2, 0], vec![2, 2]),
                ),
                "indices are of type int32, expected int64",
            ),
            (
                (values(vec![2]), indices(Int64, vec![1, 9], vec![2])),
                "index 9 is outside the dense shape [3, 3]",
            ),
            (
                (values(vec![1, 2]), indices(Int64, vec![1, 2], vec![2])),
                "values have shape [1, 2], expected [NNZ]",
            ),
        ] {
            let g = pb::GraphProto {
                name: Some("g".into()),
                node: vec![pb::NodeProto {
                    op_type: Some("Identity".into()),
                    input: vec!["w".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                output: vec![pb::ValueInfoProto {
                    name: Some("y".into()),
                    ..Default::default()
                }],
                sparse_initializer: vec![pb::SparseTensorProto {
                    values: Some(sparse.0),
                    indices: Some(sparse.1),
                    dims: vec![3, 3],
                }],
                ..Default::default()
            };
            let p = pb::ModelProto {
                ir_version: Some(8),
                opset_import: vec![pb::OperatorSetIdProto {
                    domain: Some(String::new()),
                    version: Some(13),
                }],
                graph: Some(g),
                ..Default::default()
            };
            let e = from_proto(p, None, "sparse.onnx").unwrap_err();
            let msg = format!("{e:#}");
            assert!(
                msg.contains("sparse_initializer 'w'") && msg.contains(want),
                "{want}: {msg}"
            );
        }
    }

    /// Three initializers stored in one missing file: one problem says why, one more names
    /// the other tensors stored there (it was one identical line per tensor: 65 on a model).
    #[test]
    fn a_missing_external_data_file_is_one_problem_not_one_per_tensor() {
        use pb::tensor_proto::{DataLocation, DataType};
        let dir = tempfile::tempdir().unwrap();
        let external = |name: &str| pb::TensorProto {
            name: Some(name.into()),
            dims: vec![4],
            data_type: Some(DataType::Float as i32),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![pb::StringStringEntryProto {
                key: Some("location".into()),
                value: Some("gone.bin".into()),
            }],
            ..Default::default()
        };
        let proto = pb::ModelProto {
            ir_version: Some(8),
            graph: Some(pb::GraphProto {
                initializer: ["a", "b", "c"].map(external).into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, proto.encode_to_vec()).unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("2 problems found"), "{e}");
        assert!(
            e.contains("tensor 'a': refusing external data location 'gone.bin'")
                && e.contains("does not exist"),
            "{e}"
        );
        assert!(
            e.contains("external data 'gone.bin' (as above): 2 more tensor(s) store their data there ('b', ...)"),
            "{e}"
        );
    }
}
