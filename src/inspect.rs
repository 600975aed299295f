//! `onnxopt inspect`: what a model holds, as a stable JSON document or a table.
//!
//! Parameters are the elements of every initializer (main graph and subgraphs), of every
//! Constant node's value (any `value*` attribute; also subgraphs) and the stored values of
//! every sparse initializer and sparse Constant (`sparse_value`), whose bytes also count their
//! indices. Bytes are storage bytes: packed sub-byte types round up per tensor, strings count
//! their lengths.

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
    /// `initializer`, `constant`, `sparse initializer` or `sparse constant`.
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
    // `sized`: (elements, bytes) when they are not the tensor's own (a sparse tensor's).
    let mut add = |t: &Tensor, name: &str, source: &str, sized: Option<(usize, usize)>| {
        let (n, b) = sized.unwrap_or_else(|| (t.len().unwrap_or(0), t.byte_size()));
        let (n, b) = (n as u64, b as u64);
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
    // A sparse tensor: a tensor of its dense shape and type, with its stored values' count
    // and bytes (indices included).
    let sparse = |s: &pb::SparseTensorProto| -> (Tensor, (usize, usize)) {
        let mut stored = Tensor::new(s.values.clone().unwrap_or_default());
        let indices = s
            .indices
            .as_ref()
            .map_or(0, |i| Tensor::new(i.clone()).byte_size());
        let sized = (stored.len().unwrap_or(0), stored.byte_size() + indices);
        stored.proto.dims = s.dims.clone();
        (stored, sized)
    };
    model.graph.visit(&mut |g: &Graph| {
        for v in g.initializers() {
            if let ValueDef::Initializer(t) = &g.value(v).def {
                add(t, &g.value(v).name, "initializer", None);
            }
        }
        for s in &g.header.sparse_initializer {
            let (t, sized) = sparse(s);
            let name = s.values.as_ref().map_or("", |v| v.name());
            add(&t, name, "sparse initializer", Some(sized));
        }
        for (_, n) in g.live_nodes() {
            if n.is("Constant") {
                let name = n
                    .outputs
                    .first()
                    .and_then(|o| *o)
                    .map(|v| g.value(v).name.clone())
                    .unwrap_or_default();
                if let Some(t) = crate::passes::constant_to_initializer::constant_tensor(n) {
                    add(&Tensor::new(t), &name, "constant", None);
                } else if let Some(s) = n
                    .attr("sparse_value")
                    .and_then(|a| a.sparse_tensor.as_ref())
                {
                    let (t, sized) = sparse(s);
                    add(&t, &name, "sparse constant", Some(sized));
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
        let _ = writeln!(s, "metadata     {k} = {}", shortened(v));
    }
    s
}

/// Most characters of a metadata value the text summary shows (`--json` gives it whole).
const METADATA_SHOWN: usize = 200;

/// `v` on one line, cut after [`METADATA_SHOWN`] characters with a count of the rest: an
/// exporter's metadata can hold a whole dictionary (ppocrv4-rec's `character`, 6625 lines).
fn shortened(v: &str) -> String {
    let one_line = v.replace('\n', "\\n");
    let n = one_line.chars().count();
    if n <= METADATA_SHOWN {
        return one_line;
    }
    let head: String = one_line.chars().take(METADATA_SHOWN).collect();
    format!("{head}... ({n} characters in all; --json shows them)")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A long or multi-line metadata value takes one line of the text summary, cut after 200
    /// characters with the count of all (ppocrv4-rec's `character` dictionary filled 6625
    /// lines); short values are shown whole.
    #[test]
    fn long_metadata_values_take_one_line() {
        assert_eq!(shortened("torch 2.3"), "torch 2.3");
        let dict: String = (0..6625).map(|i| format!("c{i}\n")).collect();
        let shown = shortened(&dict);
        assert!(!shown.contains('\n'));
        assert!(shown.starts_with("c0\\nc1\\n"), "{shown}");
        let total = dict.replace('\n', "\\n").chars().count();
        assert!(
            shown.ends_with(&format!(
                "... ({total} characters in all; --json shows them)"
            )),
            "{shown}"
        );
        assert_eq!(
            shown.chars().count(),
            200 + format!("... ({total} characters in all; --json shows them)")
                .chars()
                .count()
        );
    }
    use crate::verify::testutil::{attr_ints, info, init_f32, init_i64, model, node, out};
    use pb::tensor_proto::DataType;

    fn attr(name: &str, f: impl FnOnce(&mut pb::AttributeProto)) -> pb::AttributeProto {
        let mut a = pb::AttributeProto {
            name: Some(name.to_string()),
            ..Default::default()
        };
        f(&mut a);
        a
    }

    /// Every Constant form counts, and sparse tensors count their stored values (only the
    /// `value` form and dense initializers counted: "3 in 1 tensors" for 6 in 2, and a
    /// constant_to_initializer run seemed to add parameters).
    #[test]
    fn parameters_count_every_constant_form_and_sparse_tensors() {
        use pb::attribute_proto::AttributeType as A;
        let constant = |out_: &str, a: pb::AttributeProto| {
            node("Constant", &format!("c_{out_}"), &[], &[out_], vec![a])
        };
        let floats = attr("value_floats", |a| {
            a.r#type = Some(A::Floats as i32);
            a.floats = vec![1.0, 2.0, 3.0];
        });
        let int = attr("value_int", |a| {
            a.r#type = Some(A::Int as i32);
            a.i = Some(4);
        });
        let mut ints = attr_ints("value_ints", &[1, 2]);
        ints.name = Some("value_ints".to_string());
        let sparse = |name: &str| pb::SparseTensorProto {
            values: Some(init_f32(name, &[2], &[5.0, 6.0])),
            indices: Some(init_i64(&format!("{name}_indices"), &[2], &[0, 3])),
            dims: vec![4],
        };
        let sparse_const = attr("sparse_value", |a| {
            a.r#type = Some(A::SparseTensor as i32);
            a.sparse_tensor = Some(sparse("sc"));
        });
        let mut p = model(
            vec![
                constant("cf", floats),
                constant("ci", int),
                constant("cis", ints),
                constant("cs", sparse_const),
                node("Add", "add", &["x", "w"], &["y"], vec![]),
            ],
            vec![info("x", DataType::Float, &[3])],
            vec![out("y")],
            vec![init_f32("w", &[3], &[1.0, 2.0, 3.0])],
        );
        p.graph
            .as_mut()
            .unwrap()
            .sparse_initializer
            .push(sparse("sw"));
        let (m, _) = crate::onnx::from_proto(p, None, "test").unwrap();
        let (params, all) = parameters(&m);
        // w 3, cf 3, ci 1, cis 2, and 2 stored values of each sparse tensor.
        assert_eq!(params.count, 3 + 3 + 1 + 2 + 2 + 2, "{all:#?}");
        assert_eq!(params.tensors, 6);
        let sw = all.iter().find(|t| t.name == "sw").unwrap();
        assert_eq!(
            (sw.source.as_str(), sw.shape.as_slice(), sw.bytes),
            ("sparse initializer", &[4i64][..], 8 + 16)
        );
        let cs = all.iter().find(|t| t.name == "cs").unwrap();
        assert_eq!(cs.source, "sparse constant");
        assert_eq!(params.by_dtype["int64"].count, 3);
    }
}
