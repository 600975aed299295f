//! External tensor data (ONNX IR spec, "External Tensor Data"): `location`, `offset`, `length`
//! entries of `TensorProto.external_data`, relative to the model's folder.
//!
//! Reading: every data file is memory-mapped once and each tensor's bytes become a
//! `bytes::Bytes` slice of the map (no copy). A location must stay inside the model's folder:
//! absolute paths, `..` components and symbolic links that lead out are refused before anything
//! is read.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;

use crate::ir::tensor::{num_elements, raw_len};
use crate::pb::{self, tensor_proto::DataLocation};

/// Resolves external data relative to one model folder.
pub(crate) struct ExternalData {
    dir: Option<PathBuf>,
    files: HashMap<PathBuf, Bytes>,
    /// Location -> (tensors, bytes) read from it, for reports.
    pub used: Vec<(String, usize, u64)>,
    /// Locations that could not be opened, and the names of the tensors stored there after
    /// the first, whose error said why: one missing file is one problem, not one per tensor.
    pub unreadable: Vec<(String, Vec<String>)>,
}

/// The error [`ExternalData::resolve`] gives a tensor stored in a location that already failed
/// to open: the import does not report it again (see [`ExternalData::unreadable`]).
#[derive(Debug)]
pub(crate) struct AlreadyReported;

impl std::fmt::Display for AlreadyReported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("its external data location could not be opened (reported once)")
    }
}

impl std::error::Error for AlreadyReported {}

/// The first tensor of `model` (initializers, sparse initializers and tensor attributes, in
/// every graph and subgraph) whose data is external: its name and its `location`.
pub(crate) fn first_external(model: &pb::ModelProto) -> Option<(String, String)> {
    fn of(t: &pb::TensorProto) -> Option<(String, String)> {
        (t.data_location == Some(DataLocation::External as i32)).then(|| {
            let location = t
                .external_data
                .iter()
                .find(|e| e.key() == "location")
                .map_or_else(String::new, |e| e.value().to_string());
            (t.name().to_string(), location)
        })
    }
    fn in_graph(g: &pb::GraphProto) -> Option<(String, String)> {
        let sparse = g
            .sparse_initializer
            .iter()
            .flat_map(|s| s.values.iter().chain(s.indices.iter()));
        if let Some(f) = g.initializer.iter().chain(sparse).find_map(of) {
            return Some(f);
        }
        g.node.iter().flat_map(|n| &n.attribute).find_map(|a| {
            let sparse = a
                .sparse_tensor
                .iter()
                .chain(&a.sparse_tensors)
                .flat_map(|s| s.values.iter().chain(s.indices.iter()));
            a.t.iter()
                .chain(&a.tensors)
                .chain(sparse)
                .find_map(of)
                .or_else(|| a.g.iter().chain(&a.graphs).find_map(in_graph))
        })
    }
    model.graph.as_ref().and_then(in_graph)
}

impl ExternalData {
    /// A resolver for a model read from `dir` (`None` for a model read from memory: any
    /// external reference is then an error).
    pub fn new(dir: Option<PathBuf>) -> Self {
        ExternalData {
            dir,
            files: HashMap::new(),
            used: Vec::new(),
            unreadable: Vec::new(),
        }
    }

    /// If `t` stores its data externally, reads it into `raw_data` and marks it internal.
    pub fn resolve(&mut self, t: &mut pb::TensorProto) -> Result<()> {
        if t.data_location != Some(DataLocation::External as i32) {
            return Ok(());
        }
        let name = t.name().to_string();
        let mut location = None;
        let mut offset: u64 = 0;
        let mut length: Option<u64> = None;
        for e in &t.external_data {
            match e.key() {
                "location" => location = Some(e.value().to_string()),
                "offset" => {
                    offset = e.value().parse().with_context(|| {
                        format!(
                            "tensor '{name}': external data offset '{}' is not a number",
                            e.value()
                        )
                    })?
                }
                "length" => {
                    length = Some(e.value().parse().with_context(|| {
                        format!(
                            "tensor '{name}': external data length '{}' is not a number",
                            e.value()
                        )
                    })?)
                }
                _ => {}
            }
        }
        let location = location
            .with_context(|| format!("tensor '{name}' is stored externally but has no location"))?;
        if let Some((_, later)) = self.unreadable.iter_mut().find(|u| u.0 == location) {
            later.push(name);
            return Err(AlreadyReported.into());
        }
        let opened = self
            .safe_path(&location)
            .with_context(|| {
                format!("tensor '{name}': refusing external data location '{location}'")
            })
            .and_then(|path| {
                self.map(&path).with_context(|| {
                    format!("tensor '{name}': cannot read external data '{location}'")
                })
            });
        let data = match opened {
            Ok(data) => data,
            Err(e) => {
                self.unreadable.push((location, Vec::new()));
                return Err(e);
            }
        };
        let file_len = data.len() as u64;
        ensure!(
            offset <= file_len,
            "tensor '{name}': external data offset {offset} is beyond the end of '{location}' ({file_len} bytes)"
        );
        let length = length.unwrap_or(file_len - offset);
        let end = offset.checked_add(length).filter(|&e| e <= file_len);
        let Some(end) = end else {
            bail!(
                "tensor '{name}': external data [{offset}, {offset}+{length}) runs past the end of '{location}' ({file_len} bytes)"
            );
        };
        let n = num_elements(&t.dims).with_context(|| format!("tensor '{name}'"))?;
        if let Some(want) = raw_len(t.data_type(), n) {
            ensure!(
                want as u64 == length,
                "tensor '{name}': external data length is {length} bytes, but {n} elements of its type take {want}"
            );
        }
        t.raw_data = Some(data.slice(offset as usize..end as usize));
        t.data_location = None;
        t.external_data.clear();
        match self.used.iter_mut().find(|u| u.0 == location) {
            Some(u) => {
                u.1 += 1;
                u.2 += length;
            }
            None => self.used.push((location, 1, length)),
        }
        Ok(())
    }

    /// The file `location` names, checked to lie inside the model folder.
    fn safe_path(&self, location: &str) -> Result<PathBuf> {
        let Some(dir) = &self.dir else {
            bail!("the model was not read from a file, so external data cannot be located");
        };
        let rel = Path::new(location);
        ensure!(!location.is_empty(), "the location is empty");
        for c in rel.components() {
            match c {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir => {
                    bail!("it contains '..' and would leave the model's folder")
                }
                Component::RootDir | Component::Prefix(_) => {
                    bail!("it is an absolute path; locations are relative to the model's folder")
                }
            }
        }
        let path = dir.join(rel);
        // A symbolic link inside the folder may still point outside it.
        let real_dir = dir
            .canonicalize()
            .with_context(|| format!("model folder {}", dir.display()))?;
        let real = path
            .canonicalize()
            .with_context(|| format!("{} does not exist", path.display()))?;
        ensure!(
            real.starts_with(&real_dir),
            "it resolves to {}, outside the model's folder",
            real.display()
        );
        Ok(real)
    }

    fn map(&mut self, path: &Path) -> Result<Bytes> {
        if let Some(b) = self.files.get(path) {
            return Ok(b.clone());
        }
        let b = super::read_file_bytes(path)?;
        self.files.insert(path.to_path_buf(), b.clone());
        Ok(b)
    }
}
