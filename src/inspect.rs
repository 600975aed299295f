//! `onnxopt inspect`: what a model holds, as a stable JSON document or a table.
//!
//! Parameters are the elements of every initializer (main graph and subgraphs) and of every
//! Constant node's tensor value (`value` attribute; also subgraphs). Bytes are storage bytes:
//! packed sub-byte types round up per tensor, strings count their lengths.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::ir::{elem_info, Graph, Model, Tensor, ValueDef};
use crate::onnx::LoadInfo;
use crate::pb;

/// The `inspect --json` document. Field names and meanings are stable.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Path as given.
    pub file: String,
    /// Size of the `.onnx` file in bytes (external data not included).
    pub file_size: u64,
    /// `ModelProto.ir_version`.
    pub ir_version: i64,
    /// `producer_name`.
    pub producer_name: String,
    /// `producer_version`.
    pub producer_version: String,
    /// `domain`.
    pub domain: String,
    /// `model_version`.
    pub model_version: i64,
    /// `doc_string`.
    pub doc_string: String,
    /// Opsets imported, in file order.
    pub opset_import: Vec<Opset>,
    /// Graph inputs that are not initializers.
    pub inputs: Vec<Io>,
    /// Graph outputs.
    pub outputs: Vec<Io>,
    /// Nodes in all graphs, subgraphs included.
    pub node_count: usize,
    /// Nodes by op type (`Conv`, or `domain:Op` outside the default domain), subgraphs included.
    pub op_counts: BTreeMap<String, usize>,
    /// Parameters (initializers and Constant values).
    pub parameters: Params,
    /// The 10 largest parameter tensors, largest first.
    pub largest_tensors: Vec<TensorEntry>,
    /// Subgraph attributes (If branches, Loop and Scan bodies), depth first.
    pub subgraphs: Vec<SubgraphEntry>,
    /// External data files read.
    pub external_data: Vec<ExternalEntry>,
    /// Model-local functions.
    pub functions: usize,
    /// `sparse_initializer` entries in all graphs.
    pub sparse_initializers: usize,
    /// `metadata_props` as key/value pairs.
    pub metadata: Vec<(String, String)>,
}

/// An opset import.
#[derive(Debug, Clone, Serialize)]
pub struct Opset {
    /// Domain (`""` = default ONNX domain).
    pub domain: String,
    /// Version.
    pub version: i64,
}

/// A graph input or output.
#[derive(Debug, Clone, Serialize)]
pub struct Io {
    /// Name.
    pub name: String,
    /// Element type name, or the kind of a non-tensor type (`sequence`, `map`, `optional`).
    pub dtype: String,
    /// Dims: a number, a symbolic name, or null when unknown; null for an unknown rank.
    pub shape: Option<Vec<serde_json::Value>>,
}

/// Parameter totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Params {
    /// Elements.
    pub count: u64,
    /// Storage bytes.
    pub bytes: u64,
    /// Tensors.
    pub tensors: u64,
    /// Per element type.
    pub by_dtype: BTreeMap<String, DtypeParams>,
}

/// Parameter totals of one element type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DtypeParams {
    /// Elements.
    pub count: u64,
    /// Storage bytes.
    pub bytes: u64,
    /// Tensors.
    pub tensors: u64,
}

/// One parameter tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorEntry {
    /// Initializer name, or the Constant node's output name.
    pub name: String,
    /// Element type.
    pub dtype: String,
    /// Dims.
    pub shape: Vec<i64>,
    /// Storage bytes.
    pub bytes: u64,
    /// `initializer` or `constant`.
    pub source: String,
}

/// One subgraph attribute.
#[derive(Debug, Clone, Serialize)]
pub struct SubgraphEntry {
    /// Name of the node holding it.
    pub node: String,
    /// Its op type.
    pub op: String,
    /// Attribute name (`then_branch`, `body`, ...).
    pub attribute: String,
    /// Nodes directly in the subgraph (not counting deeper ones).
    pub nodes: usize,
}

/// One external data file.
#[derive(Debug, Clone, Serialize)]
pub struct ExternalEntry {
    /// Location relative to the model's folder.
    pub location: String,
    /// Tensors read from it.
    pub tensors: usize,
    /// Bytes read from it.
    pub bytes: u64,
}

/// Parameter totals of `model` (see the module doc for the definition).
pub fn parameters(model: &Model) -> (Params, Vec<TensorEntry>) {
    let mut p = Params::default();
    let mut all = Vec::new();
    let mut add = |t: &Tensor, name: &str, source: &str| {
        let n = t.len().unwrap_or(0) as u64;
        let b = t.byte_size() as u64;
        p.count += n;
        p.bytes += b;
        p.tensors += 1;
        let e = p.by_dtype.entry(t.dtype_name().to_string()).or_default();
        e.count += n;
        e.bytes += b;
        e.tensors += 1;
        all.push(TensorEntry {
            name: name.to_string(),
            dtype: t.dtype_name().to_string(),
            shape: t.dims().to_vec(),
            bytes: b,
            source: source.to_string(),
        });
    };
    model.graph.visit(&mut |g: &Graph| {
        for v in g.initializers() {
            if let ValueDef::Initializer(t) = &g.value(v).def {
                add(t, &g.value(v).name, "initializer");
            }
        }
        for (_, n) in g.live_nodes() {
            if n.is("Constant") {
                if let Some(t) = n.attr("value").and_then(|a| a.t.as_ref()) {
                    let name = n
                        .outputs
                        .first()
                        .and_then(|o| *o)
                        .map(|v| g.value(v).name.clone())
                        .unwrap_or_default();
                    add(&Tensor::new(t.clone()), &name, "constant");
                }
            }
        }
    });
    all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    (p, all)
}

/// Key used for op counts: `Op`, or `domain:Op` outside the default domain.
pub fn op_key(n: &crate::ir::Node) -> String {
    if n.domain().is_empty() {
        n.op_type().to_string()
    } else {
        format!("{}:{}", n.domain(), n.op_type())
    }
}

/// Nodes by op type in all graphs.
pub fn op_counts(model: &Model) -> (usize, BTreeMap<String, usize>) {
    let mut total = 0;
    let mut counts = BTreeMap::new();
    model.graph.visit(&mut |g: &Graph| {
        for (_, n) in g.live_nodes() {
            total += 1;
            *counts.entry(op_key(n)).or_insert(0) += 1;
        }
    });
    (total, counts)
}

fn io_of(info: &pb::ValueInfoProto) -> Io {
    use pb::type_proto::Value as T;
    let (dtype, shape) = match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(T::TensorType(tt)) => (
            elem_info(tt.elem_type()).name.to_string(),
            tt.shape.as_ref().map(shape_json),
        ),
        Some(T::SparseTensorType(tt)) => (
            format!("sparse {}", elem_info(tt.elem_type()).name),
            tt.shape.as_ref().map(shape_json),
        ),
        Some(T::SequenceType(_)) => ("sequence".into(), None),
        Some(T::MapType(_)) => ("map".into(), None),
        Some(T::OptionalType(_)) => ("optional".into(), None),
        Some(T::OpaqueType(_)) => ("opaque".into(), None),
        None => ("unknown".into(), None),
    };
    Io {
        name: info.name().to_string(),
        dtype,
        shape,
    }
}

fn shape_json(s: &pb::TensorShapeProto) -> Vec<serde_json::Value> {
    use pb::tensor_shape_proto::dimension::Value as D;
    s.dim
        .iter()
        .map(|d| match &d.value {
            Some(D::DimValue(v)) => serde_json::Value::from(*v),
            Some(D::DimParam(p)) => serde_json::Value::from(p.clone()),
            None => serde_json::Value::Null,
        })
        .collect()
}

/// Inspects a loaded model.
pub fn inspect(model: &Model, file: &str, info: &LoadInfo) -> Inspection {
    let h = &model.header;
    let (node_count, op_counts) = op_counts(model);
    let (parameters, mut largest) = parameters(model);
    largest.truncate(10);
    let mut subgraphs = Vec::new();
    let mut sparse = 0;
    model.graph.visit(&mut |g: &Graph| {
        sparse += g.header.sparse_initializer.len();
        for (_, n) in g.live_nodes() {
            for (ai, sg) in &n.subgraphs {
                let attr = n
                    .proto
                    .attribute
                    .get(*ai)
                    .map(|a| a.name().to_string())
                    .unwrap_or_default();
                let graphs: Vec<&Graph> = match sg {
                    crate::ir::SubgraphAttr::One(g) => vec![&**g],
                    crate::ir::SubgraphAttr::Many(gs) => gs.iter().collect(),
                };
                for sgg in graphs {
                    subgraphs.push(SubgraphEntry {
                        node: n.name().to_string(),
                        op: op_key(n),
                        attribute: attr.clone(),
                        nodes: sgg.order.len(),
                    });
                }
            }
        }
    });
    Inspection {
        file: file.to_string(),
        file_size: info.file_size,
        ir_version: h.ir_version(),
        producer_name: h.producer_name().to_string(),
        producer_version: h.producer_version().to_string(),
        domain: h.domain().to_string(),
        model_version: h.model_version(),
        doc_string: h.doc_string().to_string(),
        opset_import: h
            .opset_import
            .iter()
            .map(|o| Opset {
                domain: o.domain().to_string(),
                version: o.version(),
            })
            .collect(),
        inputs: model
            .graph
            .inputs
            .iter()
            .filter(|p| model.graph.initializer(p.value).is_none())
            .map(|p| io_of(&p.info))
            .collect(),
        outputs: model.graph.outputs.iter().map(|p| io_of(&p.info)).collect(),
        node_count,
        op_counts,
        parameters,
        largest_tensors: largest,
        subgraphs,
        external_data: info
            .external
            .iter()
            .map(|(l, t, b)| ExternalEntry {
                location: l.clone(),
                tensors: *t,
                bytes: *b,
            })
            .collect(),
        functions: h.functions.len(),
        sparse_initializers: sparse,
        metadata: h
            .metadata_props
            .iter()
            .map(|e| (e.key().to_string(), e.value().to_string()))
            .collect(),
    }
}

/// Human-readable rendering of an [`Inspection`].
pub fn format_text(i: &Inspection) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mb = |b: u64| b as f64 / 1e6;
    let _ = writeln!(s, "model        {}", i.file);
    let _ = writeln!(
        s,
        "file size    {:.3} MB ({} bytes)",
        mb(i.file_size),
        i.file_size
    );
    let _ = writeln!(
        s,
        "ir_version   {}    producer {} {}",
        i.ir_version, i.producer_name, i.producer_version
    );
    let ops: Vec<String> = i
        .opset_import
        .iter()
        .map(|o| {
            let d = if o.domain.is_empty() {
                "ai.onnx"
            } else {
                &o.domain
            };
            format!("{d} {}", o.version)
        })
        .collect();
    let _ = writeln!(s, "opsets       {}", ops.join(", "));
    let shape = |io: &Io| match &io.shape {
        None => "?".to_string(),
        Some(d) => format!(
            "[{}]",
            d.iter()
                .map(|v| match v {
                    serde_json::Value::String(p) => p.clone(),
                    serde_json::Value::Null => "?".into(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let _ = writeln!(s, "\ninputs");
    for io in &i.inputs {
        let _ = writeln!(s, "  {:<32} {:<10} {}", io.name, io.dtype, shape(io));
    }
    let _ = writeln!(s, "outputs");
    for io in &i.outputs {
        let _ = writeln!(s, "  {:<32} {:<10} {}", io.name, io.dtype, shape(io));
    }
    let _ = writeln!(s, "\nnodes        {} (subgraphs included)", i.node_count);
    let mut ops: Vec<(&String, &usize)> = i.op_counts.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in ops {
        let _ = writeln!(s, "  {op:<30} {n:>7}");
    }
    let p = &i.parameters;
    let _ = writeln!(
        s,
        "\nparameters   {} in {} tensors, {:.3} MB",
        p.count,
        p.tensors,
        mb(p.bytes)
    );
    for (dt, d) in &p.by_dtype {
        let _ = writeln!(
            s,
            "  {dt:<12} {:>12} elements {:>6} tensors {:>10.3} MB",
            d.count,
            d.tensors,
            mb(d.bytes)
        );
    }
    if !i.largest_tensors.is_empty() {
        let _ = writeln!(s, "largest tensors");
        for t in &i.largest_tensors {
            let _ = writeln!(
                s,
                "  {:<40} {:<8} {:<20} {:>10.3} MB  {}",
                t.name,
                t.dtype,
                format!("{:?}", t.shape),
                mb(t.bytes),
                t.source
            );
        }
    }
    if !i.subgraphs.is_empty() {
        let _ = writeln!(s, "\nsubgraphs    {}", i.subgraphs.len());
        for sg in &i.subgraphs {
            let _ = writeln!(
                s,
                "  {} \"{}\" .{}: {} nodes",
                sg.op, sg.node, sg.attribute, sg.nodes
            );
        }
    }
    for e in &i.external_data {
        let _ = writeln!(
            s,
            "external     {}: {} tensors, {:.3} MB",
            e.location,
            e.tensors,
            mb(e.bytes)
        );
    }
    if i.functions > 0 {
        let _ = writeln!(s, "functions    {}", i.functions);
    }
    if i.sparse_initializers > 0 {
        let _ = writeln!(s, "sparse initializers {}", i.sparse_initializers);
    }
    for (k, v) in &i.metadata {
        let _ = writeln!(s, "metadata     {k} = {v}");
    }
    s
}
