//! Tests of the passes on tiny graphs built in code.
//!
//! Each test builds a `ModelProto`, imports it, runs one pass through the pass manager with
//! validation after every pass, exports the result and checks it: node counts by op, which
//! initializers exist, graph inputs and outputs, and the numbers the model computes in tract
//! (bit-identical for exact passes, cosine >= 0.999 for the int8 quantization). Every run also
//! checks that the graph inputs and outputs keep their names and order, and that the export
//! imports again. The float16 cases also run the onnx checker (`tests/py/check.py`) and, where
//! tract cannot, onnxruntime (`tests/py/ort_cosine.py`) with the Python in `ONNXOPT_PYTHON`
//! (default `target/pyenv/bin/python`, built by tests/run.sh).

// Tests fail by panicking: unwrap and panic! are the point here.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use tract_onnx::prelude::Tensor as TractTensor;

use super::manager::{run_pipeline, PassRecord};
use super::{by_name, Pass, PassOptions};
use crate::ir::Tensor;
use crate::pb::{self, attribute_proto::AttributeType, tensor_proto::DataType};

mod cast;
mod dynamic;
mod nbits;
mod selection;
mod transpose;
mod upgrade;

// ---------------------------------------------------------------------------------------------
// Builders

fn info(name: &str, dt: DataType, dims: &[i64]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| pb::tensor_shape_proto::Dimension {
            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: Some(dt as i32),
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn f32_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    info(name, DataType::Float, dims)
}

/// A graph output with only a name (tract ignores output shapes; the passes do not read them).
fn out(name: &str) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: Some(name.into()),
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn attr(name: &str, ty: AttributeType) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(ty as i32),
        ..Default::default()
    }
}

fn attr_i(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        i: Some(v),
        ..attr(name, AttributeType::Int)
    }
}

fn attr_f(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        f: Some(v),
        ..attr(name, AttributeType::Float)
    }
}

fn attr_floats(name: &str, v: &[f32]) -> pb::AttributeProto {
    pb::AttributeProto {
        floats: v.to_vec(),
        ..attr(name, AttributeType::Floats)
    }
}

fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        ints: v.to_vec(),
        ..attr(name, AttributeType::Ints)
    }
}

fn attr_s(name: &str, v: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        s: Some(Bytes::from(v.as_bytes().to_vec())),
        ..attr(name, AttributeType::String)
    }
}

fn attr_strings(name: &str, v: &[&str]) -> pb::AttributeProto {
    pb::AttributeProto {
        strings: v
            .iter()
            .map(|s| Bytes::from(s.as_bytes().to_vec()))
            .collect(),
        ..attr(name, AttributeType::Strings)
    }
}

fn attr_t(name: &str, t: pb::TensorProto) -> pb::AttributeProto {
    pb::AttributeProto {
        t: Some(t),
        ..attr(name, AttributeType::Tensor)
    }
}

fn attr_g(name: &str, g: pb::GraphProto) -> pb::AttributeProto {
    pb::AttributeProto {
        g: Some(g),
        ..attr(name, AttributeType::Graph)
    }
}

/// A float32 initializer (raw little-endian data).
fn f32_init(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "{name}");
    named(name, Tensor::from_f32(dims, data))
}

/// A float16 initializer.
fn f16_init(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    let raw = data
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    named(name, Tensor::from_raw(DataType::Float16 as i32, dims, raw))
}

fn named(name: &str, t: Tensor) -> pb::TensorProto {
    pb::TensorProto {
        name: Some(name.into()),
        ..t.proto
    }
}

fn graph(
    name: &str,
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    inits: Vec<pb::TensorProto>,
) -> pb::GraphProto {
    pb::GraphProto {
        name: Some(name.into()),
        node: nodes,
        input: inputs,
        output: outputs,
        initializer: inits,
        ..Default::default()
    }
}

/// IR 8 model importing the default domain at `opset`.
fn model(opset: i64, g: pb::GraphProto) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: Some(8),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        producer_name: Some("passes-tests".into()),
        graph: Some(g),
        ..Default::default()
    }
}

/// `n` values uniform in [-scale, scale], from a fixed seed (SplitMix64).
fn rand_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running passes

struct Ran {
    /// The exported result.
    proto: pb::ModelProto,
    /// One record per pipeline entry.
    records: Vec<PassRecord>,
}

impl Ran {
    fn g(&self) -> &pb::GraphProto {
        main(&self.proto)
    }
    fn notes(&self) -> Vec<String> {
        self.records.iter().flat_map(|r| r.notes.clone()).collect()
    }
    fn changes(&self) -> usize {
        self.records.iter().map(|r| r.changes).sum()
    }
}

/// Imports `proto`, runs the passes called `names` (validated after each), exports the result
/// and checks that the export imports again.
fn run_passes(proto: &pb::ModelProto, names: &[&str]) -> Ran {
    run_passes_with(proto, names, &PassOptions::default())
}

/// [`run_passes`] with pass options.
fn run_passes_with(proto: &pb::ModelProto, names: &[&str], opts: &PassOptions) -> Ran {
    let (mut m, _) = crate::onnx::from_proto(proto.clone(), None, "test").unwrap();
    let passes: Vec<&'static dyn Pass> = names
        .iter()
        .map(|n| by_name(n).unwrap_or_else(|| panic!("no pass called {n}")))
        .collect();
    let records = run_pipeline(&mut m, &passes, opts, true, &crate::report::Silent)
        .unwrap_or_else(|e| panic!("{names:?}: {e:#}"));
    let out = crate::onnx::export::to_proto(&m).unwrap();
    crate::onnx::from_proto(out.clone(), None, "exported")
        .unwrap_or_else(|e| panic!("the exported result does not import again: {e:#}"));
    // No pass may touch the interface: graph inputs and outputs, names and order.
    assert_eq!(
        input_names(main(&out)),
        input_names(main(proto)),
        "{names:?}"
    );
    assert_eq!(
        output_names(main(&out)),
        output_names(main(proto)),
        "{names:?}"
    );
    Ran {
        proto: out,
        records,
    }
}

fn run_pass(proto: &pb::ModelProto, name: &str) -> Ran {
    run_passes(proto, &[name])
}

// ---------------------------------------------------------------------------------------------
// Reading protos

fn main(p: &pb::ModelProto) -> &pb::GraphProto {
    p.graph.as_ref().unwrap()
}

/// Op counts of one graph (not its subgraphs).
fn ops(g: &pb::GraphProto) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in &g.node {
        *m.entry(n.op_type().to_string()).or_default() += 1;
    }
    m
}

fn count(g: &pb::GraphProto, op: &str) -> usize {
    g.node.iter().filter(|n| n.op_type() == op).count()
}

fn nodes<'a>(g: &'a pb::GraphProto, op: &str) -> Vec<&'a pb::NodeProto> {
    g.node.iter().filter(|n| n.op_type() == op).collect()
}

fn node_named<'a>(g: &'a pb::GraphProto, name: &str) -> &'a pb::NodeProto {
    g.node
        .iter()
        .find(|n| n.name() == name)
        .unwrap_or_else(|| panic!("no node named {name}: {:?}", ops(g)))
}

fn producer<'a>(g: &'a pb::GraphProto, value: &str) -> Option<&'a pb::NodeProto> {
    g.node.iter().find(|n| n.output.iter().any(|o| o == value))
}

fn init<'a>(g: &'a pb::GraphProto, name: &str) -> Option<&'a pb::TensorProto> {
    g.initializer.iter().find(|t| t.name() == name)
}

fn init_names(g: &pb::GraphProto) -> Vec<String> {
    let mut v: Vec<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
    v.sort();
    v
}

fn input_names(g: &pb::GraphProto) -> Vec<String> {
    g.input.iter().map(|i| i.name().to_string()).collect()
}

fn output_names(g: &pb::GraphProto) -> Vec<String> {
    g.output.iter().map(|i| i.name().to_string()).collect()
}

fn values(t: &pb::TensorProto) -> Vec<f32> {
    Tensor::new(t.clone()).to_f32().unwrap()
}

fn attr_of<'a>(n: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name() == name)
}

/// The subgraph held by attribute `attr` of the node called `node`.
fn branch<'a>(g: &'a pb::GraphProto, node: &str, attr: &str) -> &'a pb::GraphProto {
    attr_of(node_named(g, node), attr)
        .and_then(|a| a.g.as_ref())
        .unwrap_or_else(|| panic!("{node} has no graph attribute {attr}"))
}

// ---------------------------------------------------------------------------------------------
// Running in tract

type Outputs = Vec<(String, Vec<f64>)>;

fn tensor(shape: &[usize], data: &[f32]) -> TractTensor {
    TractTensor::from_shape(shape, data).unwrap()
}

fn tract(p: &pb::ModelProto, inputs: &[(&str, TractTensor)]) -> Outputs {
    let inputs: Vec<(String, TractTensor)> = inputs
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    crate::verify::run(p, None, &inputs)
        .unwrap_or_else(|e| panic!("tract: {e}"))
        .into_iter()
        .map(|(n, t)| (n, crate::verify::metrics::to_f64(&t).unwrap()))
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Runs both models in tract and asserts every output is bit-identical.
fn assert_same_in_tract(a: &pb::ModelProto, b: &pb::ModelProto, inputs: &[(&str, TractTensor)]) {
    let (ra, rb) = (tract(a, inputs), tract(b, inputs));
    assert_eq!(ra.len(), rb.len());
    for ((na, va), (nb, vb)) in ra.iter().zip(&rb) {
        assert_eq!(na, nb);
        let same = va.len() == vb.len()
            && va
                .iter()
                .zip(vb)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
        assert!(same, "output {na} differs: {va:?} vs {vb:?}");
    }
}

/// Runs both models in tract and asserts every output is finite, has the same shape and
/// cosine >= `min_cos`; returns the cosines.
fn assert_close_in_tract(
    a: &pb::ModelProto,
    b: &pb::ModelProto,
    inputs: &[(&str, TractTensor)],
    min_cos: f64,
) -> Vec<f64> {
    let (ra, rb) = (tract(a, inputs), tract(b, inputs));
    assert_eq!(ra.len(), rb.len());
    let mut cosines = Vec::new();
    for ((na, va), (nb, vb)) in ra.iter().zip(&rb) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len(), "output {na}");
        assert!(
            vb.iter().all(|v| v.is_finite()),
            "output {na} has NaN or infinity: {vb:?}"
        );
        let c = cosine(va, vb);
        assert!(c >= min_cos, "output {na}: cosine {c} < {min_cos}");
        cosines.push(c);
    }
    cosines
}

// ---------------------------------------------------------------------------------------------
// constant_to_initializer

#[test]
fn constant_to_initializer_every_value_form() {
    let tensor_value = f32_init("ignored_name", &[2, 3], &[1.0, -2.0, 3.5, 0.0, 5.0, -6.25]);
    let constants = vec![
        node(
            "Constant",
            "k_t",
            &[],
            &["c_tensor"],
            vec![attr_t("value", tensor_value.clone())],
        ),
        node(
            "Constant",
            "k_f",
            &[],
            &["c_float"],
            vec![attr_f("value_float", 2.5)],
        ),
        node(
            "Constant",
            "k_fs",
            &[],
            &["c_floats"],
            vec![attr_floats("value_floats", &[1.0, 2.0, -3.0])],
        ),
        node(
            "Constant",
            "k_i",
            &[],
            &["c_int"],
            vec![attr_i("value_int", -7)],
        ),
        node(
            "Constant",
            "k_is",
            &[],
            &["c_ints"],
            vec![attr_ints("value_ints", &[4, 5, 6, 7])],
        ),
        node(
            "Constant",
            "k_s",
            &[],
            &["c_string"],
            vec![attr_s("value_string", "hello")],
        ),
        node(
            "Constant",
            "k_ss",
            &[],
            &["c_strings"],
            vec![attr_strings("value_strings", &["a", "bc"])],
        ),
    ];
    let mut nodes = constants;
    let mut outputs = Vec::new();
    for c in [
        "c_tensor",
        "c_float",
        "c_floats",
        "c_int",
        "c_ints",
        "c_string",
        "c_strings",
    ] {
        let o = format!("{c}_out");
        nodes.push(node("Identity", &format!("id_{c}"), &[c], &[&o], vec![]));
        outputs.push(out(&o));
    }
    let p = model(13, graph("g", nodes, vec![], outputs, vec![]));
    let r = run_pass(&p, "constant_to_initializer");
    let g = r.g();
    assert_eq!(count(g, "Constant"), 0, "{:?}", ops(g));
    assert_eq!(count(g, "Identity"), 7);
    assert_eq!(
        init_names(g),
        [
            "c_float",
            "c_floats",
            "c_int",
            "c_ints",
            "c_string",
            "c_strings",
            "c_tensor"
        ]
    );
    assert_eq!(output_names(g), output_names(main(&p)));

    // value: the same tensor, under the output's name.
    let t = init(g, "c_tensor").unwrap();
    assert_eq!(
        *t,
        pb::TensorProto {
            name: Some("c_tensor".into()),
            ..tensor_value
        }
    );
    let t = init(g, "c_float").unwrap();
    assert_eq!(t.data_type(), DataType::Float as i32);
    assert!(t.dims.is_empty());
    assert_eq!(values(t), [2.5]);
    let t = init(g, "c_floats").unwrap();
    assert_eq!(t.data_type(), DataType::Float as i32);
    assert_eq!(t.dims, [3]);
    assert_eq!(values(t), [1.0, 2.0, -3.0]);
    let t = init(g, "c_int").unwrap();
    assert_eq!(t.data_type(), DataType::Int64 as i32);
    assert!(t.dims.is_empty());
    assert_eq!(Tensor::new(t.clone()).to_i64().unwrap(), [-7]);
    let t = init(g, "c_ints").unwrap();
    assert_eq!(t.data_type(), DataType::Int64 as i32);
    assert_eq!(t.dims, [4]);
    assert_eq!(Tensor::new(t.clone()).to_i64().unwrap(), [4, 5, 6, 7]);
    let t = init(g, "c_string").unwrap();
    assert_eq!(t.data_type(), DataType::String as i32);
    assert!(t.dims.is_empty());
    assert_eq!(t.string_data, [Bytes::from_static(b"hello")]);
    let t = init(g, "c_strings").unwrap();
    assert_eq!(t.data_type(), DataType::String as i32);
    assert_eq!(t.dims, [2]);
    assert_eq!(
        t.string_data,
        [Bytes::from_static(b"a"), Bytes::from_static(b"bc")]
    );
    assert_eq!(r.changes(), 7);
}

#[test]
fn constant_to_initializer_numbers_unchanged_in_tract() {
    let p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "Constant",
                    "k",
                    &[],
                    &["c"],
                    vec![attr_t("value", f32_init("c", &[3], &[0.5, -1.0, 2.0]))],
                ),
                node(
                    "Constant",
                    "kf",
                    &[],
                    &["cf"],
                    vec![attr_floats("value_floats", &[3.0, 4.0, 5.0])],
                ),
                node("Add", "add", &["x", "c"], &["a"], vec![]),
                node("Mul", "mul", &["a", "cf"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[2, 3])],
            vec![out("y")],
            vec![],
        ),
    );
    let r = run_pass(&p, "constant_to_initializer");
    assert_eq!(count(r.g(), "Constant"), 0);
    assert_eq!(init_names(r.g()), ["c", "cf"]);
    let x = tensor(&[2, 3], &rand_f32(6, 1, 1.0));
    assert_same_in_tract(&p, &r.proto, &[("x", x)]);
}

/// A main graph output may be an initializer (onnxruntime and tract run it); a subgraph's
/// output stays a Constant node.
#[test]
fn constant_to_initializer_converts_a_graph_output_constant_of_the_main_graph_only() {
    let p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "Constant",
                    "k_out",
                    &[],
                    &["c_out"],
                    vec![attr_floats("value_floats", &[1.0, 2.0])],
                ),
                node(
                    "Constant",
                    "k_in",
                    &[],
                    &["c_in"],
                    vec![attr_floats("value_floats", &[3.0, 4.0])],
                ),
                node("Add", "add", &["x", "c_in"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[2])],
            vec![out("c_out"), out("y")],
            vec![],
        ),
    );
    let r = run_pass(&p, "constant_to_initializer");
    let g = r.g();
    assert_eq!(count(g, "Constant"), 0);
    assert_eq!(init_names(g), ["c_in", "c_out"]);
    assert_eq!(output_names(g), ["c_out", "y"]);
    assert_eq!(input_names(g), ["x"]);
    let x = [("x", tensor(&[2], &[0.5, -1.0]))];
    assert_eq!(tract(&p, &x), tract(&r.proto, &x));
    // A subgraph's output stays a Constant node.
    let branch_g = |tag: &str| {
        graph(
            tag,
            vec![node(
                "Constant",
                &format!("{tag}_k"),
                &[],
                &[&format!("{tag}_out")],
                vec![attr_floats("value_floats", &[1.0, 2.0])],
            )],
            vec![],
            vec![f32_info(&format!("{tag}_out"), &[2])],
            vec![],
        )
    };
    let p = model(
        13,
        graph(
            "g",
            vec![node(
                "If",
                "if",
                &["cond"],
                &["y"],
                vec![
                    attr_g("then_branch", branch_g("then")),
                    attr_g("else_branch", branch_g("else")),
                ],
            )],
            vec![info("cond", DataType::Bool, &[])],
            vec![out("y")],
            vec![],
        ),
    );
    let r = run_pass(&p, "constant_to_initializer");
    assert_eq!(r.changes(), 0);
}

/// `If(cond)`: then = `x + k` with `k` a Constant of the branch, else = `-x`.
fn if_with_constant_in_branch() -> pb::ModelProto {
    let then_g = graph(
        "then",
        vec![
            node(
                "Constant",
                "k_node",
                &[],
                &["k"],
                vec![attr_t("value", f32_init("k", &[3], &[10.0, 20.0, 30.0]))],
            ),
            node("Add", "then_add", &["x", "k"], &["then_out"], vec![]),
        ],
        vec![],
        vec![f32_info("then_out", &[3])],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![node("Neg", "else_neg", &["x"], &["else_out"], vec![])],
        vec![],
        vec![f32_info("else_out", &[3])],
        vec![],
    );
    model(
        13,
        graph(
            "g",
            vec![node(
                "If",
                "if",
                &["cond"],
                &["y"],
                vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
            )],
            vec![info("cond", DataType::Bool, &[]), f32_info("x", &[3])],
            vec![out("y")],
            vec![],
        ),
    )
}

#[test]
fn constant_to_initializer_in_if_branch_becomes_initializer_of_that_branch() {
    let p = if_with_constant_in_branch();
    let r = run_pass(&p, "constant_to_initializer");
    let g = r.g();
    let then_g = branch(g, "if", "then_branch");
    assert_eq!(count(then_g, "Constant"), 0, "{:?}", ops(then_g));
    assert_eq!(init_names(then_g), ["k"]);
    assert_eq!(values(init(then_g, "k").unwrap()), [10.0, 20.0, 30.0]);
    assert!(g.initializer.is_empty(), "{:?}", init_names(g));
    assert!(branch(g, "if", "else_branch").initializer.is_empty());
    let x = tensor(&[3], &[1.0, 2.0, 3.0]);
    for cond in [true, false] {
        assert_same_in_tract(
            &p,
            &r.proto,
            &[("cond", TractTensor::from(cond)), ("x", x.clone())],
        );
    }
}

#[test]
fn constant_to_initializer_leaves_ir3_model_alone_with_a_note() {
    let mut p = model(
        8,
        graph(
            "g",
            vec![
                node(
                    "Constant",
                    "k",
                    &[],
                    &["c"],
                    vec![attr_t("value", f32_init("c", &[2], &[1.0, 2.0]))],
                ),
                node("Add", "add", &["x", "c"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[2])],
            vec![out("y")],
            vec![],
        ),
    );
    p.ir_version = Some(3);
    let r = run_pass(&p, "constant_to_initializer");
    assert_eq!(r.proto, p, "an IR 3 model must come back unchanged");
    assert_eq!(r.changes(), 0);
    let notes = r.notes();
    assert!(
        notes.iter().any(|n| n.contains("IR version 3")),
        "no note about IR 3: {notes:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// eliminate_identity

#[test]
fn eliminate_identity_removes_a_chain() {
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Relu", "relu", &["x"], &["a"], vec![]),
                node("Identity", "id1", &["a"], &["b"], vec![]),
                node("Identity", "id2", &["b"], &["c"], vec![]),
                node("Neg", "neg", &["c"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[4])],
            vec![f32_info("y", &[4])],
            vec![],
        ),
    );
    let r = run_pass(&p, "eliminate_identity");
    let g = r.g();
    assert_eq!(count(g, "Identity"), 0, "{:?}", ops(g));
    assert_eq!(g.node.len(), 2);
    assert_eq!(node_named(g, "neg").input, ["a"]);
    assert_eq!(g.output, main(&p).output);
    assert_eq!(g.input, main(&p).input);
    let x = tensor(&[4], &[-1.0, 2.0, -3.0, 4.0]);
    assert_same_in_tract(&p, &r.proto, &[("x", x)]);
}

#[test]
fn eliminate_identity_on_a_graph_output_keeps_the_output_name() {
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Relu", "relu", &["x"], &["a"], vec![]),
                node("Identity", "id", &["a"], &["y"], vec![]),
                node("Neg", "neg", &["x"], &["z"], vec![]),
            ],
            vec![f32_info("x", &[4])],
            vec![f32_info("y", &[4]), f32_info("z", &[4])],
            vec![],
        ),
    );
    let r = run_pass(&p, "eliminate_identity");
    let g = r.g();
    assert_eq!(count(g, "Identity"), 0, "{:?}", ops(g));
    // The graph output list is exactly as before (names, order, types).
    assert_eq!(g.output, main(&p).output);
    assert_eq!(node_named(g, "relu").output, ["y"]);
    let x = tensor(&[4], &[-1.0, 2.0, -3.0, 4.0]);
    assert_same_in_tract(&p, &r.proto, &[("x", x)]);
}

#[test]
fn eliminate_identity_leaves_outputs_that_cannot_take_over_their_input() {
    // y = Identity(x) with x a graph input; w_out = Identity(w) with w an initializer;
    // z = Identity(a) with a itself a graph output.
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Identity", "id_input", &["x"], &["y"], vec![]),
                node("Identity", "id_init", &["w"], &["w_out"], vec![]),
                node("Relu", "relu", &["x"], &["a"], vec![]),
                node("Identity", "id_out", &["a"], &["z"], vec![]),
            ],
            vec![f32_info("x", &[2])],
            vec![out("y"), out("w_out"), out("a"), out("z")],
            vec![f32_init("w", &[2], &[1.0, 2.0])],
        ),
    );
    let r = run_pass(&p, "eliminate_identity");
    let g = r.g();
    assert_eq!(count(g, "Identity"), 3, "{:?}", ops(g));
    assert_eq!(r.changes(), 0);
    assert_eq!(g.output, main(&p).output);
    assert_eq!(g.input, main(&p).input);
    assert_eq!(r.proto, p);
}

#[test]
fn eliminate_identity_leaves_graph_output_that_is_a_graph_input() {
    // The graph output `x` IS the graph input `x`; `y = Identity(x)` is also an output.
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Identity", "id", &["x"], &["y"], vec![]),
                node("Relu", "relu", &["x"], &["r"], vec![]),
            ],
            vec![f32_info("x", &[2])],
            vec![out("x"), out("y"), out("r")],
            vec![],
        ),
    );
    let r = run_pass(&p, "eliminate_identity");
    assert_eq!(r.proto, p);
    assert_eq!(output_names(r.g()), ["x", "y", "r"]);
    assert_eq!(input_names(r.g()), ["x"]);

    // Without any node: the output is the input.
    let p = model(
        13,
        graph(
            "g",
            vec![],
            vec![f32_info("x", &[2])],
            vec![f32_info("x", &[2])],
            vec![],
        ),
    );
    let r = run_pass(&p, "eliminate_identity");
    assert_eq!(r.proto, p);
}

#[test]
fn eliminate_identity_keeps_identity_read_by_an_if_branch() {
    // b = Identity(a) is read by name inside the then branch.
    let then_g = graph(
        "then",
        vec![node("Neg", "then_neg", &["b"], &["then_out"], vec![])],
        vec![],
        vec![f32_info("then_out", &[3])],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![node("Abs", "else_abs", &["x"], &["else_out"], vec![])],
        vec![],
        vec![f32_info("else_out", &[3])],
        vec![],
    );
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Relu", "relu", &["x"], &["a"], vec![]),
                node("Identity", "id", &["a"], &["b"], vec![]),
                node(
                    "If",
                    "if",
                    &["cond"],
                    &["y"],
                    vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
                ),
            ],
            vec![info("cond", DataType::Bool, &[]), f32_info("x", &[3])],
            vec![out("y")],
            vec![],
        ),
    );
    let r = run_pass(&p, "eliminate_identity");
    let g = r.g();
    assert_eq!(count(g, "Identity"), 1, "{:?}", ops(g));
    assert_eq!(producer(g, "b").unwrap().op_type(), "Identity");
    assert_eq!(
        branch(g, "if", "then_branch").node[0].input,
        ["b"],
        "the branch must still read b"
    );
    let x = tensor(&[3], &[-1.0, 2.0, -3.0]);
    assert_same_in_tract(&p, &r.proto, &[("cond", TractTensor::from(true)), ("x", x)]);
}

// ---------------------------------------------------------------------------------------------
// eliminate_dead_nodes

#[test]
fn eliminate_dead_nodes_removes_an_unused_chain() {
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Relu", "relu", &["x"], &["y"], vec![]),
                node("Neg", "dead1", &["x"], &["d1"], vec![]),
                node("Abs", "dead2", &["d1"], &["d2"], vec![]),
                node("Add", "dead3", &["d2", "w"], &["d3"], vec![]),
            ],
            vec![f32_info("x", &[2])],
            vec![out("y")],
            vec![f32_init("w", &[2], &[1.0, 2.0])],
        ),
    );
    let r = run_pass(&p, "eliminate_dead_nodes");
    let g = r.g();
    assert_eq!(ops(g), BTreeMap::from([("Relu".to_string(), 1)]));
    assert_eq!(r.records[0].changes, 3);
    assert_eq!(output_names(g), ["y"]);
    // Initializers are another pass's business.
    assert_eq!(init_names(g), ["w"]);
    let x = tensor(&[2], &[-1.0, 2.0]);
    assert_same_in_tract(&p, &r.proto, &[("x", x)]);
}

#[test]
fn eliminate_dead_nodes_keeps_a_node_only_a_subgraph_reads() {
    let then_g = graph(
        "then",
        vec![node("Abs", "then_abs", &["s"], &["then_out"], vec![])],
        vec![],
        vec![f32_info("then_out", &[3])],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![node("Abs", "else_abs", &["x"], &["else_out"], vec![])],
        vec![],
        vec![f32_info("else_out", &[3])],
        vec![],
    );
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Neg", "neg", &["x"], &["s"], vec![]),
                node(
                    "If",
                    "if",
                    &["cond"],
                    &["y"],
                    vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
                ),
            ],
            vec![info("cond", DataType::Bool, &[]), f32_info("x", &[3])],
            vec![out("y")],
            vec![],
        ),
    );
    let r = run_pass(&p, "eliminate_dead_nodes");
    assert_eq!(r.proto, p);
    assert_eq!(count(r.g(), "Neg"), 1);
}

#[test]
fn eliminate_dead_nodes_keeps_custom_domain_nodes() {
    let mut p = model(
        13,
        graph(
            "g",
            vec![
                node("Relu", "relu", &["x"], &["y"], vec![]),
                pb::NodeProto {
                    domain: Some("com.example".into()),
                    ..node("Custom", "custom", &["x"], &["unused_custom"], vec![])
                },
                node("Neg", "plain_dead", &["x"], &["unused_plain"], vec![]),
            ],
            vec![f32_info("x", &[2])],
            vec![out("y")],
            vec![],
        ),
    );
    p.opset_import.push(pb::OperatorSetIdProto {
        domain: Some("com.example".into()),
        version: Some(1),
    });
    let r = run_pass(&p, "eliminate_dead_nodes");
    let g = r.g();
    assert_eq!(count(g, "Custom"), 1, "{:?}", ops(g));
    assert_eq!(node_named(g, "custom").domain(), "com.example");
    assert_eq!(count(g, "Neg"), 0, "the default-domain dead node goes");
    assert_eq!(r.changes(), 1);
}

// ---------------------------------------------------------------------------------------------
// eliminate_unused_initializers

#[test]
fn eliminate_unused_initializers_removes_only_unread_ones() {
    let then_g = graph(
        "then",
        vec![node(
            "Add",
            "then_add",
            &["x", "sub_read"],
            &["then_out"],
            vec![],
        )],
        vec![],
        vec![f32_info("then_out", &[2])],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![node("Neg", "else_neg", &["x"], &["else_out"], vec![])],
        vec![],
        vec![f32_info("else_out", &[2])],
        vec![],
    );
    let w = |name: &str, v: f32| f32_init(name, &[2], &[v, v]);
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Add", "add", &["x", "used"], &["a"], vec![]),
                node(
                    "If",
                    "if",
                    &["cond"],
                    &["y"],
                    vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
                ),
            ],
            vec![
                info("cond", DataType::Bool, &[]),
                f32_info("x", &[2]),
                f32_info("as_input", &[2]),
            ],
            vec![out("a"), out("y"), out("as_output")],
            vec![
                w("used", 1.0),
                w("unused", 2.0),
                w("as_output", 3.0),
                w("as_input", 4.0),
                w("sub_read", 5.0),
                w("unused_too", 6.0),
            ],
        ),
    );
    let r = run_pass(&p, "eliminate_unused_initializers");
    let g = r.g();
    assert_eq!(
        init_names(g),
        ["as_input", "as_output", "sub_read", "used"],
        "an initializer that is a graph output, a graph input or read by a subgraph stays"
    );
    assert_eq!(r.changes(), 2);
    assert_eq!(input_names(g), ["cond", "x", "as_input"]);
    assert_eq!(output_names(g), ["a", "y", "as_output"]);
    assert_eq!(g.node, main(&p).node);
    let x = tensor(&[2], &[1.0, -1.0]);
    assert_same_in_tract(&p, &r.proto, &[("cond", TractTensor::from(true)), ("x", x)]);
}

// ---------------------------------------------------------------------------------------------
// dedupe_initializers

#[test]
fn dedupe_initializers_merges_identical_tensors() {
    let data = [1.0, 2.0, 3.0, -4.0, 5.5, 6.0];
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Add", "add", &["x", "a"], &["y1"], vec![]),
                node("Mul", "mul", &["x", "b"], &["y2"], vec![]),
                node("Sub", "sub", &["x", "b"], &["y3"], vec![]),
            ],
            vec![f32_info("x", &[2, 3])],
            vec![out("y1"), out("y2"), out("y3")],
            vec![f32_init("a", &[2, 3], &data), f32_init("b", &[2, 3], &data)],
        ),
    );
    let r = run_pass(&p, "dedupe_initializers");
    let g = r.g();
    assert_eq!(init_names(g), ["a"]);
    assert_eq!(node_named(g, "mul").input, ["x", "a"]);
    assert_eq!(node_named(g, "sub").input, ["x", "a"]);
    assert_eq!(r.records[0].changes, 1);
    assert_eq!(output_names(g), ["y1", "y2", "y3"]);
    let x = tensor(&[2, 3], &rand_f32(6, 2, 3.0));
    assert_same_in_tract(&p, &r.proto, &[("x", x)]);
}

#[test]
fn dedupe_initializers_needs_same_dims_and_dtype() {
    // Same 24 bytes: f32 [2, 3], f32 [3, 2], f32 [6] and int32 [6].
    let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Identity", "i1", &["f23"], &["o1"], vec![]),
                node("Identity", "i2", &["f32_"], &["o2"], vec![]),
                node("Identity", "i3", &["f6"], &["o3"], vec![]),
                node("Identity", "i4", &["i6"], &["o4"], vec![]),
            ],
            vec![],
            vec![out("o1"), out("o2"), out("o3"), out("o4")],
            vec![
                f32_init("f23", &[2, 3], &data),
                f32_init("f32_", &[3, 2], &data),
                f32_init("f6", &[6], &data),
                named("i6", Tensor::from_raw(DataType::Int32 as i32, &[6], raw)),
            ],
        ),
    );
    let r = run_pass(&p, "dedupe_initializers");
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p);
}

#[test]
fn dedupe_initializers_does_not_merge_a_graph_output() {
    let data = [1.0, 2.0];
    for order in [["w_out", "w_used"], ["w_used", "w_out"]] {
        let p = model(
            13,
            graph(
                "g",
                vec![node("Add", "add", &["x", "w_used"], &["y"], vec![])],
                vec![f32_info("x", &[2])],
                vec![out("y"), out("w_out")],
                order.iter().map(|n| f32_init(n, &[2], &data)).collect(),
            ),
        );
        let r = run_pass(&p, "dedupe_initializers");
        assert_eq!(r.changes(), 0, "{order:?}");
        assert_eq!(r.proto, p, "{order:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// quantize_weights_int8

const Q: &str = "quantize_weights_int8";

/// The DequantizeLinear that reads the int8 initializer made from `weight`, with that
/// initializer and the scale initializer.
struct Dq<'a> {
    node: &'a pb::NodeProto,
    q: &'a pb::TensorProto,
    scale: &'a pb::TensorProto,
}

fn dq_of<'a>(g: &'a pb::GraphProto, weight: &str) -> Dq<'a> {
    let prefix = format!("{weight}_quantized");
    let found: Vec<&pb::NodeProto> = nodes(g, "DequantizeLinear")
        .into_iter()
        .filter(|n| n.input[0].starts_with(&prefix))
        .collect();
    assert_eq!(found.len(), 1, "DequantizeLinear nodes of {weight}");
    let node = found[0];
    let q = init(g, &node.input[0]).unwrap();
    let scale = init(g, &node.input[1]).unwrap();
    assert_eq!(q.data_type(), DataType::Int8 as i32, "{}", node.input[0]);
    Dq { node, q, scale }
}

fn axis_of(n: &pb::NodeProto) -> Option<i64> {
    attr_of(n, "axis").and_then(|a| a.i)
}

/// Checks that `q * scale[c]` along `axis` is within half a step of `w` everywhere.
fn assert_dequantizes_to(w: &[f32], dims: &[i64], axis: usize, q: &[f32], scales: &[f32]) {
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let c = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    assert_eq!(scales.len(), c, "one scale per channel along axis {axis}");
    for (i, (&wv, &qv)) in w.iter().zip(q).enumerate() {
        let s = scales[(i / inner) % c];
        assert!(s.is_finite() && s > 0.0, "scale {s}");
        assert!(
            (qv * s - wv).abs() <= s * 0.5 + 1e-6,
            "element {i}: {wv} quantized to {qv} * {s} along axis {axis}"
        );
    }
}

/// A Conv weight read by two Convs, by a ReduceSum whose result is a graph output, and itself
/// a graph output: stored once, quantized, and every reader reads the dequantized value (the
/// float copy kept for the other readers made the file larger than the original).
fn shared_weight_model(w: &[f32]) -> pb::ModelProto {
    model(
        13,
        graph(
            "g",
            vec![
                node(
                    "ReduceSum",
                    "wsum",
                    &["W"],
                    &["w_sum"],
                    vec![attr_i("keepdims", 0)],
                ),
                node("Conv", "conv1", &["x", "W"], &["c1"], vec![]),
                node(
                    "Conv",
                    "conv2",
                    &["x", "W"],
                    &["c2"],
                    vec![attr_ints("pads", &[1, 1, 1, 1])],
                ),
            ],
            vec![f32_info("x", &[1, 3, 8, 8])],
            vec![out("c1"), out("c2"), out("w_sum")],
            vec![f32_init("W", &[4, 3, 3, 3], w)],
        ),
    )
}

#[test]
fn quantize_shared_weight_is_stored_once_for_every_reader() {
    let w = rand_f32(4 * 3 * 3 * 3, 3, 0.5);
    let p = shared_weight_model(&w);
    let r = run_pass(&p, Q);
    let g = r.g();
    assert_eq!(count(g, "DequantizeLinear"), 1, "{:?}", ops(g));
    assert!(init(g, "W").is_none(), "the float weight goes");
    let dq = dq_of(g, "W");
    assert_eq!(
        dq.node.output[0], "W",
        "the dequantized value takes the weight's name"
    );
    assert_eq!(
        g.node[0].op_type(),
        "DequantizeLinear",
        "before its first reader"
    );
    for n in ["conv1", "conv2"] {
        assert_eq!(node_named(g, n).input[1], "W");
    }
    assert_eq!(node_named(g, "wsum").input[0], "W");
    assert_eq!(axis_of(dq.node), Some(0));
    assert_dequantizes_to(&w, &[4, 3, 3, 3], 0, &values(dq.q), &values(dq.scale));
    assert_eq!(output_names(g), ["c1", "c2", "w_sum"]);
    let notes = r.notes().join("\n");
    assert!(
        notes.contains(
            "weight 'W' is also read by ReduceSum node \"wsum\" (another op or axis): they read its dequantized value, so it is stored once"
        ),
        "{notes}"
    );
    // The bytes freed are noted, as every lossy pass does (the weight is replaced in place,
    // so the pass manager's note on weights left unread did not see it).
    assert!(
        notes.contains("float initializers went from 432 to 16 bytes"),
        "{notes}"
    );

    let x = tensor(&[1, 3, 8, 8], &rand_f32(192, 4, 1.0));
    let inputs = [("x", x)];
    let (before, after) = (tract(&p, &inputs), tract(&r.proto, &inputs));
    for k in 0..3 {
        let c = cosine(&before[k].1, &after[k].1);
        assert!(c >= 0.999, "{}: cosine {c}", before[k].0);
    }
    let deq = values(dq.q)
        .iter()
        .enumerate()
        .map(|(i, q)| q * values(dq.scale)[i / 27])
        .collect::<Vec<f32>>();
    let sum: f32 = deq.iter().sum();
    let got: f32 = after[2].1.iter().map(|v| *v as f32).sum();
    assert!(
        (sum - got).abs() < 1e-4,
        "ReduceSum reads the dequantized weight: {sum} vs {got}"
    );
}

/// A weight that is also a graph output stays float, its values exact, whatever the format
/// (it was stored quantized and the output gave the dequantized values, after a note of
/// dynamic mode's said it stayed float).
#[test]
fn a_weight_that_is_a_graph_output_stays_exact() {
    let w = rand_f32(4 * 3 * 3 * 3, 3, 0.5);
    let mut p = shared_weight_model(&w);
    p.graph.as_mut().unwrap().output.push(out("W"));
    use crate::quant::WeightFormat;
    for format in [WeightFormat::Qdq, WeightFormat::Cast] {
        let opts = PassOptions {
            weight_format: format,
            ..Default::default()
        };
        let r = run_passes_with(&p, &[Q], &opts);
        let g = r.g();
        assert_eq!(count(g, "DequantizeLinear"), 0, "{format:?}: {:?}", ops(g));
        assert_eq!(values(init(g, "W").unwrap()), w, "{format:?}");
        let notes = r.notes().join("\n");
        assert!(
            notes.contains("weight 'W' reaches a graph output unchanged (itself, through Identity, Reshape-like or Transpose nodes, or returned by a subgraph; its values are part of the interface): left in float"),
            "{format:?}: {notes}"
        );
    }
    // Through an Identity, and returned by an If branch through an Identity (onnxruntime
    // wants it there): the output gave the dequantized values.
    let mm = |x: &str, y: &str| node("MatMul", &format!("mm_{y}"), &[x, "W"], &[y], vec![]);
    let w = rand_f32(8 * 5, 7, 0.5);
    let through_identity = graph(
        "g",
        vec![
            mm("x", "y"),
            node("Identity", "id", &["W"], &["Wo"], vec![]),
        ],
        vec![f32_info("x", &[2, 8])],
        vec![out("y"), out("Wo")],
        vec![f32_init("W", &[8, 5], &w)],
    );
    let branch_g = |tag: &str, returns_w: bool| {
        let body = if returns_w {
            node(
                "Identity",
                &format!("{tag}_id"),
                &["W"],
                &[&format!("{tag}_out")],
                vec![],
            )
        } else {
            node(
                "Neg",
                &format!("{tag}_neg"),
                &["y"],
                &[&format!("{tag}_out")],
                vec![],
            )
        };
        graph(
            tag,
            vec![body],
            vec![],
            vec![out(&format!("{tag}_out"))],
            vec![],
        )
    };
    let returned_by_if = graph(
        "g",
        vec![
            mm("x", "y"),
            node(
                "If",
                "if",
                &["cond"],
                &["z"],
                vec![
                    attr_g("then_branch", branch_g("then", true)),
                    attr_g("else_branch", branch_g("else", false)),
                ],
            ),
        ],
        vec![f32_info("x", &[2, 8]), info("cond", DataType::Bool, &[])],
        vec![out("y"), out("z")],
        vec![f32_init("W", &[8, 5], &w)],
    );
    let through_transpose = graph(
        "g",
        vec![
            mm("x", "y"),
            node("Transpose", "t", &["W"], &["Wt"], vec![]),
        ],
        vec![f32_info("x", &[2, 8])],
        vec![out("y"), out("Wt")],
        vec![f32_init("W", &[8, 5], &w)],
    );
    for g in [through_identity, returned_by_if.clone(), through_transpose] {
        let r = run_pass(&model(13, g), Q);
        assert_eq!(count(r.g(), "DequantizeLinear"), 0, "{:?}", ops(r.g()));
        assert_eq!(values(init(r.g(), "W").unwrap()), w);
    }
    // An If that returns the weight into another op only: quantized as before (it was kept
    // in float as soon as a subgraph returned it).
    let mut to_op_only = returned_by_if;
    to_op_only
        .node
        .push(node("MatMul", "mm_z", &["x", "z"], &["u"], vec![]));
    to_op_only.output = vec![out("y"), out("u")];
    let r = run_pass(&model(13, to_op_only), Q);
    assert!(init(r.g(), "W").is_none(), "{:?}", ops(r.g()));
}

/// A reader the selection leaves out (by op type or by name, a ReduceSum included) keeps the
/// weight in float for every reader: a float copy beside the quantized one would make the file
/// larger and the other readers less accurate for nothing. A note names the readers.
#[test]
fn quantize_shared_weight_with_a_reader_left_out_stays_float() {
    let w = rand_f32(4 * 3 * 3 * 3, 3, 0.5);
    let p = shared_weight_model(&w);
    let x = tensor(&[1, 3, 8, 8], &rand_f32(192, 4, 1.0));
    let inputs = [("x", x)];
    let before = tract(&p, &inputs);
    for (re, who) in [
        ("^conv2$", "Conv node \"conv2\""),
        ("^wsum$", "ReduceSum node \"wsum\""),
    ] {
        let opts = PassOptions {
            exclude_nodes: Some(regex::Regex::new(re).unwrap()),
            ..Default::default()
        };
        let r = run_passes_with(&p, &[Q], &opts);
        let g = r.g();
        assert_eq!(count(g, "DequantizeLinear"), 0, "{re}: {:?}", ops(g));
        assert_eq!(values(init(g, "W").unwrap()), w, "{re}");
        let notes = r.notes().join("\n");
        assert!(
            notes.contains(&format!(
                "weight 'W' left in float: {who} keep(s) it in float"
            )),
            "{re}: {notes}"
        );
        assert_eq!(tract(&r.proto, &inputs), before, "{re}");
    }
    // --op-types names the weight ops to quantize: the ReduceSum is not left out by it.
    let opts = PassOptions {
        op_types: vec!["Conv".into()],
        ..Default::default()
    };
    let r = run_passes_with(&p, &[Q], &opts);
    assert_eq!(count(r.g(), "DequantizeLinear"), 1, "{:?}", ops(r.g()));
}

/// Readers of one weight given different schemes by a config: one copy is stored, with the
/// first reader's scheme, and a note lists what each asked for.
#[test]
fn quantize_shared_weight_with_conflicting_schemes_says_which_one_it_used() {
    let w = rand_f32(4 * 3 * 3 * 3, 3, 0.5);
    let p = shared_weight_model(&w);
    let int16 = crate::quant::Scheme {
        qtype: crate::quant::QType::Int16,
        ..crate::quant::Scheme::INT8_CHANNEL
    };
    let opts = PassOptions {
        node_schemes: [("conv2".to_string(), int16)].into_iter().collect(),
        ..Default::default()
    };
    let r = run_passes_with(&p, &["quantize_weights"], &opts);
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("weight 'W' is read by nodes given different schemes (Conv node \"conv1\": the default int8 Channel, Conv node \"conv2\": int16 Channel): it is stored once, int16 Channel"),
        "{notes}"
    );
    assert_eq!(
        init(r.g(), "W_quantized").map(|t| t.data_type()),
        Some(DataType::Int16 as i32)
    );
}

/// A reader along another axis than the stored copy's (a Gemm with transB = 1 beside two
/// MatMuls) reads the same copy: a scheme asked for it is named in the note too (it was
/// dropped without a word).
#[test]
fn quantize_shared_weight_names_the_scheme_of_a_reader_along_another_axis() {
    let p = weight_read_at_two_axes();
    let int16 = crate::quant::Scheme {
        qtype: crate::quant::QType::Int16,
        ..crate::quant::Scheme::INT8_CHANNEL
    };
    let opts = PassOptions {
        node_schemes: [("gemm".to_string(), int16)].into_iter().collect(),
        ..Default::default()
    };
    let r = run_passes_with(&p, &["quantize_weights"], &opts);
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("weight 'W' is read by nodes given different schemes")
            && notes.contains("Gemm node \"gemm\": int16 Channel")
            && notes.contains("it is stored once, int8 Channel"),
        "{notes}"
    );
}

#[test]
fn quantize_all_zero_channel_gets_scale_one() {
    let mut w = rand_f32(4 * 3 * 3 * 3, 5, 0.5);
    w[2 * 27..3 * 27].iter_mut().for_each(|v| *v = 0.0);
    let p = model(
        13,
        graph(
            "g",
            vec![node("Conv", "conv", &["x", "W", "B"], &["y"], vec![])],
            vec![f32_info("x", &[1, 3, 6, 6])],
            vec![out("y")],
            vec![
                f32_init("W", &[4, 3, 3, 3], &w),
                f32_init("B", &[4], &[0.1, 0.2, 0.3, 0.4]),
            ],
        ),
    );
    let r = run_pass(&p, Q);
    let g = r.g();
    let dq = dq_of(g, "W");
    let scales = values(dq.scale);
    assert_eq!(scales.len(), 4);
    assert_eq!(scales[2], 1.0, "the all-zero channel's scale: {scales:?}");
    for t in &g.initializer {
        let v = values(t);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{} holds NaN or infinity: {v:?}",
            t.name()
        );
    }
    assert!(values(dq.q)[2 * 27..3 * 27].iter().all(|&q| q == 0.0));
    assert_dequantizes_to(&w, &[4, 3, 3, 3], 0, &values(dq.q), &scales);
    let x = tensor(&[1, 3, 6, 6], &rand_f32(108, 6, 1.0));
    assert_close_in_tract(&p, &r.proto, &[("x", x)], 0.999);
}

/// `If(cond)` whose branches both read the outer weights `Wm` (MatMul) and `Wc` (Conv).
fn if_reading_outer_weights() -> pb::ModelProto {
    let then_g = graph(
        "then",
        vec![
            node("MatMul", "then_mm", &["xm", "Wm"], &["then_m"], vec![]),
            node("Conv", "then_conv", &["xc", "Wc"], &["then_c"], vec![]),
        ],
        vec![],
        vec![
            f32_info("then_m", &[2, 8]),
            f32_info("then_c", &[1, 4, 6, 6]),
        ],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![
            node("Neg", "else_neg_m", &["xm"], &["else_xm"], vec![]),
            node("MatMul", "else_mm", &["else_xm", "Wm"], &["else_m"], vec![]),
            node("Relu", "else_relu_c", &["xc"], &["else_xc"], vec![]),
            node("Conv", "else_conv", &["else_xc", "Wc"], &["else_c"], vec![]),
        ],
        vec![],
        vec![
            f32_info("else_m", &[2, 8]),
            f32_info("else_c", &[1, 4, 6, 6]),
        ],
        vec![],
    );
    model(
        13,
        graph(
            "g",
            vec![node(
                "If",
                "if",
                &["cond"],
                &["m", "c"],
                vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
            )],
            vec![
                info("cond", DataType::Bool, &[]),
                f32_info("xm", &[2, 16]),
                f32_info("xc", &[1, 3, 8, 8]),
            ],
            vec![out("m"), out("c")],
            vec![
                f32_init("Wm", &[16, 8], &rand_f32(128, 7, 0.5)),
                f32_init("Wc", &[4, 3, 3, 3], &rand_f32(108, 8, 0.5)),
            ],
        ),
    )
}

#[test]
fn quantize_outer_weight_read_by_both_if_branches_once() {
    let p = if_reading_outer_weights();
    let r = run_pass(&p, Q);
    let g = r.g();
    assert_eq!(count(g, "DequantizeLinear"), 2, "{:?}", ops(g));
    let dqm = dq_of(g, "Wm");
    let dqc = dq_of(g, "Wc");
    assert_eq!(axis_of(dqm.node), Some(1));
    assert_eq!(axis_of(dqc.node), Some(0));
    let served = [dqm.node.output[0].clone(), dqc.node.output[0].clone()];
    assert!(init(g, "Wm").is_none() && init(g, "Wc").is_none());
    assert_eq!(
        init_names(g).len(),
        4,
        "one int8 tensor and one scale per weight: {:?}",
        init_names(g)
    );
    for (b, mm, conv) in [
        ("then_branch", "then_mm", "then_conv"),
        ("else_branch", "else_mm", "else_conv"),
    ] {
        let bg = branch(g, "if", b);
        assert!(bg.initializer.is_empty(), "{b}: {:?}", init_names(bg));
        assert_eq!(count(bg, "DequantizeLinear"), 0, "{b}");
        assert_eq!(node_named(bg, mm).input[1], served[0], "{b}");
        assert_eq!(node_named(bg, conv).input[1], served[1], "{b}");
    }
    let inputs = |cond: bool| {
        [
            ("cond", TractTensor::from(cond)),
            ("xm", tensor(&[2, 16], &rand_f32(32, 9, 1.0))),
            ("xc", tensor(&[1, 3, 8, 8], &rand_f32(192, 10, 1.0))),
        ]
    };
    for cond in [true, false] {
        assert_close_in_tract(&p, &r.proto, &inputs(cond), 0.999);
    }
}

#[test]
fn quantize_axis_per_op() {
    let (g0, g1, mm, ct) = (
        rand_f32(8 * 6, 11, 0.5),
        rand_f32(6 * 8, 12, 0.5),
        rand_f32(8 * 5, 13, 0.5),
        rand_f32(4 * 3 * 3 * 3, 14, 0.5),
    );
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Gemm", "gemm_n", &["x", "G0"], &["y0"], vec![]),
                node(
                    "Gemm",
                    "gemm_t",
                    &["x", "G1"],
                    &["y1"],
                    vec![attr_i("transB", 1)],
                ),
                node("MatMul", "matmul", &["x", "M"], &["y2"], vec![]),
                node("ConvTranspose", "convt", &["xc", "CT"], &["y3"], vec![]),
            ],
            vec![f32_info("x", &[2, 8]), f32_info("xc", &[1, 4, 5, 5])],
            vec![out("y0"), out("y1"), out("y2"), out("y3")],
            vec![
                f32_init("G0", &[8, 6], &g0),
                f32_init("G1", &[6, 8], &g1),
                f32_init("M", &[8, 5], &mm),
                f32_init("CT", &[4, 3, 3, 3], &ct),
            ],
        ),
    );
    let r = run_pass(&p, Q);
    let g = r.g();
    for (w, data, dims, axis) in [
        ("G0", &g0, &[8i64, 6][..], 1usize),
        ("G1", &g1, &[6, 8][..], 0),
        ("M", &mm, &[8, 5][..], 1),
        ("CT", &ct, &[4, 3, 3, 3][..], 1),
    ] {
        let dq = dq_of(g, w);
        assert_eq!(axis_of(dq.node), Some(axis as i64), "{w}");
        assert_eq!(dq.scale.dims, [dims[axis]], "{w}");
        assert_eq!(dq.q.dims, dims, "{w}");
        assert_dequantizes_to(data, dims, axis, &values(dq.q), &values(dq.scale));
        assert!(init(g, w).is_none(), "float {w} still stored");
    }
    let inputs = [
        ("x", tensor(&[2, 8], &rand_f32(16, 15, 1.0))),
        ("xc", tensor(&[1, 4, 5, 5], &rand_f32(100, 16, 1.0))),
    ];
    assert_close_in_tract(&p, &r.proto, &inputs, 0.999);
}

#[test]
fn quantize_lstm_w_and_r_on_axis_1() {
    let (h, inp, seq) = (6i64, 8i64, 4usize);
    let (w, rr, b) = (
        rand_f32((4 * h * inp) as usize, 17, 0.5),
        rand_f32((4 * h * h) as usize, 18, 0.5),
        rand_f32((8 * h) as usize, 19, 0.2),
    );
    let p = model(
        13,
        graph(
            "g",
            vec![node(
                "LSTM",
                "lstm",
                &["x", "W", "R", "B"],
                &["Y", "Y_h"],
                vec![attr_i("hidden_size", h)],
            )],
            vec![f32_info("x", &[seq as i64, 1, inp])],
            vec![out("Y"), out("Y_h")],
            vec![
                f32_init("W", &[1, 4 * h, inp], &w),
                f32_init("R", &[1, 4 * h, h], &rr),
                f32_init("B", &[1, 8 * h], &b),
            ],
        ),
    );
    let r = run_pass(&p, Q);
    let g = r.g();
    assert_eq!(count(g, "DequantizeLinear"), 2, "{:?}", ops(g));
    for (name, data, dims) in [("W", &w, [1, 4 * h, inp]), ("R", &rr, [1, 4 * h, h])] {
        let dq = dq_of(g, name);
        assert_eq!(axis_of(dq.node), Some(1), "{name}");
        assert_dequantizes_to(data, &dims, 1, &values(dq.q), &values(dq.scale));
    }
    assert_eq!(values(init(g, "B").unwrap()), b, "the bias stays float");
    let lstm = &nodes(g, "LSTM")[0];
    assert_eq!(lstm.input[3], "B");
    let x = tensor(&[seq, 1, inp as usize], &rand_f32(seq * 8, 20, 1.0));
    assert_close_in_tract(&p, &r.proto, &[("x", x)], 0.999);
}

fn conv_model(opset: i64) -> pb::ModelProto {
    model(
        opset,
        graph(
            "g",
            vec![node("Conv", "conv", &["x", "W"], &["y"], vec![])],
            vec![f32_info("x", &[1, 3, 8, 8])],
            vec![out("y")],
            vec![f32_init("W", &[4, 3, 3, 3], &rand_f32(108, 21, 0.5))],
        ),
    )
}

#[test]
fn quantize_opset_11_uses_per_tensor_dequantize_and_mul() {
    let p = conv_model(11);
    let r = run_pass(&p, Q);
    let g = r.g();
    assert_eq!(r.proto.opset_import, p.opset_import, "opset unchanged");
    assert_eq!(count(g, "DequantizeLinear"), 1, "{:?}", ops(g));
    assert_eq!(count(g, "Mul"), 1, "{:?}", ops(g));
    let dq = nodes(g, "DequantizeLinear")[0];
    assert_eq!(axis_of(dq), None, "DequantizeLinear-10 has no axis");
    let unit = init(g, &dq.input[1]).unwrap();
    assert!(unit.dims.is_empty(), "per-tensor scale: {:?}", unit.dims);
    assert_eq!(values(unit), [1.0]);
    let mul = nodes(g, "Mul")[0];
    assert_eq!(mul.input[0], dq.output[0]);
    let scale = init(g, &mul.input[1]).unwrap();
    assert_eq!(scale.dims, [4, 1, 1, 1]);
    assert_eq!(node_named(g, "conv").input[1], mul.output[0]);
    let q = init(g, &dq.input[0]).unwrap();
    assert_dequantizes_to(
        &values(init(main(&p), "W").unwrap()),
        &[4, 3, 3, 3],
        0,
        &values(q),
        &values(scale),
    );
    let x = tensor(&[1, 3, 8, 8], &rand_f32(192, 22, 1.0));
    assert_close_in_tract(&p, &r.proto, &[("x", x)], 0.999);
}

#[test]
fn quantize_opset_9_uses_cast_and_mul() {
    let p = conv_model(9);
    let r = run_pass(&p, Q);
    let g = r.g();
    assert_eq!(r.proto.opset_import, p.opset_import, "opset unchanged");
    assert_eq!(count(g, "DequantizeLinear"), 0, "{:?}", ops(g));
    assert_eq!(count(g, "Cast"), 1, "{:?}", ops(g));
    assert_eq!(count(g, "Mul"), 1, "{:?}", ops(g));
    let cast = nodes(g, "Cast")[0];
    assert_eq!(
        attr_of(cast, "to").and_then(|a| a.i),
        Some(DataType::Float as i64)
    );
    assert_eq!(
        init(g, &cast.input[0]).unwrap().data_type(),
        DataType::Int8 as i32
    );
    let mul = nodes(g, "Mul")[0];
    assert_eq!(mul.input[0], cast.output[0]);
    assert_eq!(node_named(g, "conv").input[1], mul.output[0]);
    let x = tensor(&[1, 3, 8, 8], &rand_f32(192, 23, 1.0));
    assert_close_in_tract(&p, &r.proto, &[("x", x)], 0.999);
}

fn fp16_conv_model(opset: i64) -> pb::ModelProto {
    model(
        opset,
        graph(
            "g",
            vec![node("Conv", "conv", &["x", "W"], &["y"], vec![])],
            vec![info("x", DataType::Float16, &[1, 3, 8, 8])],
            vec![info("y", DataType::Float16, &[1, 4, 6, 6])],
            vec![f16_init("W", &[4, 3, 3, 3], &rand_f32(108, 24, 0.5))],
        ),
    )
}

/// The interpreter that has onnx and onnxruntime (`ONNXOPT_PYTHON`, else the venv that
/// tests/run.sh builds).
fn python() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let p = std::env::var_os("ONNXOPT_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target/pyenv/bin/python"));
    assert!(
        p.exists(),
        "no Python with onnx: set ONNXOPT_PYTHON or run tests/run.sh (looked for {})",
        p.display()
    );
    p
}

/// `onnx.checker.check_model(full_check=True)` on `p` (tests/py/check.py).
fn assert_onnx_checker_accepts(p: &pb::ModelProto, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{what}.onnx"));
    std::fs::write(&path, prost::Message::encode_to_vec(p)).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/check.py");
    let o = std::process::Command::new(python())
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{what}: the onnx checker refuses the result: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `reference` (optimizations off) and `candidate` in onnxruntime on `inputs`
/// (tests/py/ort_cosine.py) and returns its rows: name, dtype, cosine, finite, ...
fn ort_cosines(
    reference: &pb::ModelProto,
    candidate: &pb::ModelProto,
    inputs: &[(String, TractTensor)],
) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, npz) = (
        dir.path().join("reference.onnx"),
        dir.path().join("candidate.onnx"),
        dir.path().join("inputs.npz"),
    );
    std::fs::write(&a, prost::Message::encode_to_vec(reference)).unwrap();
    std::fs::write(&b, prost::Message::encode_to_vec(candidate)).unwrap();
    crate::verify::inputs::save_npz(&npz, inputs).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/ort_cosine.py");
    let o = std::process::Command::new(python())
        .arg(script)
        .args([&a, &b, &npz])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ort_cosine.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["outputs"].as_array().unwrap().clone()
}

fn fp16_input() -> TractTensor {
    let x: Vec<half::f16> = rand_f32(192, 25, 1.0)
        .into_iter()
        .map(half::f16::from_f32)
        .collect();
    TractTensor::from_shape(&[1, 3, 8, 8], &x).unwrap()
}

#[test]
fn quantize_fp16_weight_opset_13_casts_back_to_fp16() {
    let p = fp16_conv_model(13);
    let r = run_pass(&p, Q);
    let g = r.g();
    let dq = dq_of(g, "W");
    assert_eq!(dq.scale.data_type(), DataType::Float as i32);
    let cast = producer(g, &node_named(g, "conv").input[1]).unwrap();
    assert_eq!(cast.op_type(), "Cast", "{:?}", ops(g));
    assert_eq!(
        attr_of(cast, "to").and_then(|a| a.i),
        Some(DataType::Float16 as i64)
    );
    assert_eq!(cast.input[0], dq.node.output[0]);
    assert_onnx_checker_accepts(&r.proto, "fp16-opset13");
    assert_close_in_tract(&p, &r.proto, &[("x", fp16_input())], 0.999);
}

#[test]
fn quantize_fp16_weight_opset_19_uses_an_fp16_scale() {
    let p = fp16_conv_model(19);
    let r = run_pass(&p, Q);
    let g = r.g();
    let dq = dq_of(g, "W");
    assert_eq!(dq.scale.data_type(), DataType::Float16 as i32);
    assert_eq!(count(g, "Cast"), 0, "{:?}", ops(g));
    assert_eq!(node_named(g, "conv").input[1], dq.node.output[0]);
    assert_onnx_checker_accepts(&r.proto, "fp16-opset19");
    // tract's DequantizeLinear takes float32 scales only: onnxruntime checks the numbers.
    let rows = ort_cosines(&p, &r.proto, &[("x".to_string(), fp16_input())]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let c = rows[0]["cosine"].as_f64().unwrap();
    assert!(c >= 0.999, "onnxruntime: cosine {c}: {rows:?}");
    assert_eq!(rows[0]["dtype"], "float16");
    assert_eq!(rows[0]["finite"], true);
}

/// float16 weights so small that a scale falls below float16's normal range (6.1e-5): the
/// scales stay float32 and a Cast to float16 follows. float16 scales rounded them to 0 or to
/// a subnormal: a zero output channel in onnxruntime, unseen by the float-equivalent check.
#[test]
fn quantize_fp16_weight_with_tiny_scales_keeps_float32_scales() {
    let mut w = rand_f32(108, 24, 0.5);
    // Output channel 0 about 1e-4 wide: an int8 scale near 1e-6.
    w[..27].iter_mut().for_each(|v| *v *= 2e-4);
    let mut p = fp16_conv_model(19);
    p.graph.as_mut().unwrap().initializer[0] = f16_init("W", &[4, 3, 3, 3], &w);
    let r = run_pass(&p, Q);
    let g = r.g();
    let dq = dq_of(g, "W");
    assert_eq!(dq.scale.data_type(), DataType::Float as i32);
    assert_eq!(count(g, "Cast"), 1, "{:?}", ops(g));
    assert_onnx_checker_accepts(&r.proto, "fp16-tiny-scales");
    let rows = ort_cosines(&p, &r.proto, &[("x".to_string(), fp16_input())]);
    let c = rows[0]["cosine"].as_f64().unwrap();
    assert!(c >= 0.999, "onnxruntime: cosine {c}: {rows:?}");
}

#[test]
fn quantize_leaves_weight_listed_as_graph_input_with_a_note() {
    let mut p = conv_model(13);
    let gp = p.graph.as_mut().unwrap();
    gp.input.push(f32_info("W", &[4, 3, 3, 3]));
    let r = run_pass(&p, Q);
    assert_eq!(r.proto, p);
    assert_eq!(r.changes(), 0);
    let notes = r.notes();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("'W'") && n.contains("graph input")),
        "no note about the graph input W: {notes:?}"
    );
}

#[test]
fn quantize_leaves_int8_weights_alone() {
    // An already quantized model: int8 W -> DequantizeLinear -> Conv.
    let q: Vec<i8> = (0..108).map(|i| (i % 255 - 127) as i8).collect();
    let p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "DequantizeLinear",
                    "dq",
                    &["Wq", "Ws"],
                    &["W"],
                    vec![attr_i("axis", 0)],
                ),
                node("Conv", "conv", &["x", "W"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[1, 3, 8, 8])],
            vec![out("y")],
            vec![
                named("Wq", Tensor::from_i8(&[4, 3, 3, 3], &q)),
                f32_init("Ws", &[4], &[0.01, 0.02, 0.03, 0.04]),
            ],
        ),
    );
    let r = run_pass(&p, Q);
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p);

    // An int8 initializer read directly at a weight position is not requantized either.
    let mut p2 = p.clone();
    let g2 = p2.graph.as_mut().unwrap();
    g2.node.remove(0);
    g2.initializer[0].name = Some("W".into());
    let r = run_pass(&p2, Q);
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p2);
}

#[test]
fn quantize_picks_fresh_names() {
    // `W_quantized` is already a graph input and `W_scale` a value inside an If branch.
    let then_g = graph(
        "then",
        vec![node("Neg", "then_neg", &["x2"], &["W_scale"], vec![])],
        vec![],
        vec![f32_info("W_scale", &[2])],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![node(
            "Abs",
            "else_abs",
            &["W_quantized"],
            &["else_out"],
            vec![],
        )],
        vec![],
        vec![f32_info("else_out", &[2])],
        vec![],
    );
    let mut p = conv_model(13);
    let gp = p.graph.as_mut().unwrap();
    gp.input.push(f32_info("W_quantized", &[2]));
    gp.input.push(f32_info("x2", &[2]));
    gp.input.push(info("cond", DataType::Bool, &[]));
    gp.node.push(node(
        "If",
        "if",
        &["cond"],
        &["z"],
        vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
    ));
    gp.output.push(out("z"));
    let r = run_pass(&p, Q);
    let g = r.g();
    let dq = dq_of(g, "W");
    assert_ne!(dq.node.input[0], "W_quantized");
    assert_ne!(dq.node.input[1], "W_scale");
    assert!(init(g, "W_quantized").is_none());
    assert_eq!(input_names(g), ["x", "W_quantized", "x2", "cond"]);
    assert_eq!(g.input, main(&p).input);
    assert_eq!(output_names(g), ["y", "z"]);
    assert_eq!(
        branch(g, "if", "then_branch"),
        branch(main(&p), "if", "then_branch")
    );
    let inputs = [
        ("x", tensor(&[1, 3, 8, 8], &rand_f32(192, 26, 1.0))),
        ("W_quantized", tensor(&[2], &[-1.0, 2.0])),
        ("x2", tensor(&[2], &[3.0, -4.0])),
        ("cond", TractTensor::from(false)),
    ];
    let (before, after) = (tract(&p, &inputs), tract(&r.proto, &inputs));
    let c = cosine(&before[0].1, &after[0].1);
    assert!(c >= 0.999, "y: cosine {c}");
    assert_eq!(before[1], after[1], "z is computed without the weight");
}

#[test]
fn quantize_twice_changes_nothing_the_second_time() {
    let p = conv_model(13);
    let r = run_passes(&p, &[Q, Q]);
    assert_eq!(r.records[0].changes, 1);
    assert_eq!(r.records[1].changes, 0, "{:?}", r.records[1]);
    assert_eq!(count(r.g(), "DequantizeLinear"), 1);
}

#[test]
fn constant_to_initializer_keeps_sparse_value_constants() {
    let sparse = pb::SparseTensorProto {
        values: Some(f32_init("sv", &[2], &[5.0, 6.0])),
        indices: Some(named("si", Tensor::from_i64(&[2], &[0, 3]))),
        dims: vec![4],
    };
    let p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "Constant",
                    "k_sparse",
                    &[],
                    &["c"],
                    vec![pb::AttributeProto {
                        sparse_tensor: Some(sparse),
                        ..attr("sparse_value", AttributeType::SparseTensor)
                    }],
                ),
                node("Add", "add", &["x", "c"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[4])],
            vec![out("y")],
            vec![],
        ),
    );
    let r = run_pass(&p, "constant_to_initializer");
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p);
}

/// A node reading a sparse initializer (valid ONNX, run by onnxruntime): the model loads,
/// the cleanup passes keep the sparse initializer and its reader, and it is written back as
/// it was. Before, every command refused the model ("reads 'spw', which is not a graph
/// input, initializer, node output or outer-scope value"), `inspect` included.
#[test]
fn a_node_reading_a_sparse_initializer_is_kept_with_it() {
    let mut g = graph(
        "g",
        vec![
            node("Add", "add", &["x", "spw"], &["a"], vec![]),
            node("Identity", "id", &["a"], &["y"], vec![]),
        ],
        vec![f32_info("x", &[4])],
        vec![out("y")],
        vec![],
    );
    g.sparse_initializer.push(pb::SparseTensorProto {
        values: Some(f32_init("spw", &[2], &[5.0, 6.0])),
        indices: Some(named("spw_indices", Tensor::from_i64(&[2], &[0, 3]))),
        dims: vec![4],
    });
    let sparse = g.sparse_initializer.clone();
    let p = model(13, g);
    // Read from an If branch only (the main graph's nodes do not read it).
    let branch = |name: &str, op: &str, inputs: &[&str]| {
        graph(
            name,
            vec![node(op, &format!("{name}_op"), inputs, &[name], vec![])],
            vec![],
            vec![out(name)],
            vec![],
        )
    };
    let mut g = graph(
        "g",
        vec![
            node("ReduceSum", "sum", &["x"], &["s"], vec![]),
            node("Greater", "positive", &["s", "zero"], &["c"], vec![]),
            node(
                "If",
                "if",
                &["c"],
                &["y"],
                vec![
                    attr_g("then_branch", branch("t", "Add", &["x", "spw"])),
                    attr_g("else_branch", branch("e", "Identity", &["x"])),
                ],
            ),
        ],
        vec![f32_info("x", &[4])],
        vec![out("y")],
        vec![f32_init("zero", &[], &[0.0])],
    );
    g.sparse_initializer = sparse;
    let in_branch = model(13, g);
    let r = run_passes_with(&in_branch, crate::passes::CLEANUP, &PassOptions::default());
    assert_eq!(
        r.g().sparse_initializer,
        in_branch.graph.as_ref().unwrap().sparse_initializer
    );
    for pass in crate::passes::CLEANUP {
        let r = run_pass(&p, pass);
        assert_eq!(
            r.g().sparse_initializer,
            p.graph.as_ref().unwrap().sparse_initializer,
            "{pass}"
        );
        assert!(
            r.g()
                .node
                .iter()
                .any(|n| n.input.contains(&"spw".to_string())),
            "{pass}"
        );
    }
}

/// W [8, 8] read by two MatMuls (axis 1) and, between them, a Gemm with transB = 1 (axis 0).
fn weight_read_at_two_axes() -> pb::ModelProto {
    let w = rand_f32(64, 27, 0.5);
    model(
        13,
        graph(
            "g",
            vec![
                node("MatMul", "mm1", &["x", "W"], &["y1"], vec![]),
                node(
                    "Gemm",
                    "gemm",
                    &["x", "W"],
                    &["y2"],
                    vec![attr_i("transB", 1)],
                ),
                node("MatMul", "mm2", &["x", "W"], &["y3"], vec![]),
            ],
            vec![f32_info("x", &[2, 8])],
            vec![out("y1"), out("y2"), out("y3")],
            vec![f32_init("W", &[8, 8], &w)],
        ),
    )
}

#[test]
fn quantize_weight_read_at_two_axes_is_stored_once_along_the_majority_axis() {
    let p = weight_read_at_two_axes();
    let r = run_pass(&p, Q);
    let g = r.g();
    assert_eq!(count(g, "DequantizeLinear"), 1, "{:?}", ops(g));
    let dq = dq_of(g, "W");
    assert_eq!(axis_of(dq.node), Some(1));
    assert_eq!(dq.node.output[0], "W");
    for n in ["mm1", "gemm", "mm2"] {
        assert_eq!(
            node_named(g, n).input[1],
            "W",
            "{n} reads the dequantized weight"
        );
    }
    assert!(init(g, "W").is_none());
    let x = tensor(&[2, 8], &rand_f32(16, 28, 1.0));
    let (before, after) = (tract(&p, &[("x", x.clone())]), tract(&r.proto, &[("x", x)]));
    for k in 0..3 {
        let c = cosine(&before[k].1, &after[k].1);
        assert!(c >= 0.999, "{}: cosine {c}", before[k].0);
    }
}

/// `y = If(cond)`: the then branch computes `then_out = MatMul(x, Wt)`, the else branch
/// `else_out = MatMul(x, We)`, each weight `[k, n]` an initializer of its own branch (values
/// from seeds `seed` and `seed + 1`); x is f32 `[2, k]`.
fn if_with_branch_matmuls(k: i64, n: i64, seed: u64) -> pb::ModelProto {
    let size = (k * n) as usize;
    let branch_graph = |name: &str, w: &str, seed: u64| {
        let out_name = format!("{name}_out");
        graph(
            name,
            vec![node(
                "MatMul",
                &format!("{name}_mm"),
                &["x", w],
                &[&out_name],
                vec![],
            )],
            vec![],
            vec![f32_info(&out_name, &[2, n])],
            vec![f32_init(w, &[k, n], &rand_f32(size, seed, 0.5))],
        )
    };
    model(
        13,
        graph(
            "g",
            vec![node(
                "If",
                "if",
                &["cond"],
                &["y"],
                vec![
                    attr_g("then_branch", branch_graph("then", "Wt", seed)),
                    attr_g("else_branch", branch_graph("else", "We", seed + 1)),
                ],
            )],
            vec![info("cond", DataType::Bool, &[]), f32_info("x", &[2, k])],
            vec![out("y")],
            vec![],
        ),
    )
}

#[test]
fn quantize_weight_local_to_an_if_branch_in_that_branch() {
    let p = if_with_branch_matmuls(8, 5, 31);
    let r = run_pass(&p, Q);
    let g = r.g();
    assert_eq!(count(g, "DequantizeLinear"), 0, "{:?}", ops(g));
    assert!(g.initializer.is_empty(), "{:?}", init_names(g));
    for (b, w, mm) in [
        ("then_branch", "Wt", "then_mm"),
        ("else_branch", "We", "else_mm"),
    ] {
        let bg = branch(g, "if", b);
        let dq = dq_of(bg, w);
        assert_eq!(axis_of(dq.node), Some(1), "{b}");
        assert_eq!(node_named(bg, mm).input[1], dq.node.output[0], "{b}");
        assert!(init(bg, w).is_none(), "{b}: float {w} still stored");
    }
    for cond in [true, false] {
        let inputs = [
            ("cond", TractTensor::from(cond)),
            ("x", tensor(&[2, 8], &rand_f32(16, 33, 1.0))),
        ];
        assert_close_in_tract(&p, &r.proto, &inputs, 0.999);
    }
}

#[test]
fn quantize_leaves_fp64_and_non_finite_weights_with_notes() {
    let mut nan_w = rand_f32(40, 34, 0.5);
    nan_w[7] = f32::NAN;
    let f64_w: Vec<u8> = rand_f32(40, 35, 0.5)
        .iter()
        .flat_map(|&v| f64::from(v).to_le_bytes())
        .collect();
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("MatMul", "mm64", &["x64", "W64"], &["y64"], vec![]),
                node("MatMul", "mmnan", &["x", "Wnan"], &["ynan"], vec![]),
            ],
            vec![
                info("x64", DataType::Double, &[2, 8]),
                f32_info("x", &[2, 8]),
            ],
            vec![out("y64"), out("ynan")],
            vec![
                named(
                    "W64",
                    Tensor::from_raw(DataType::Double as i32, &[8, 5], f64_w),
                ),
                f32_init("Wnan", &[8, 5], &nan_w),
            ],
        ),
    );
    let r = run_pass(&p, Q);
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p);
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("'W64'") && notes.contains("float64"),
        "notes: {notes}"
    );
    assert!(
        notes.contains("'Wnan'") && notes.contains("NaN"),
        "notes: {notes}"
    );
}

#[test]
fn quantize_leaves_ir3_model_alone_with_a_note() {
    let mut p = conv_model(8);
    p.ir_version = Some(3);
    p.graph
        .as_mut()
        .unwrap()
        .input
        .push(f32_info("W", &[4, 3, 3, 3]));
    let r = run_pass(&p, Q);
    assert_eq!(r.proto, p);
    let notes = r.notes();
    assert!(
        notes.iter().any(|n| n.contains("IR version 3")),
        "notes: {notes:?}"
    );
}

/// Every value and node name in `g` and its subgraphs.
fn all_names(g: &pb::GraphProto, out: &mut Vec<String>) {
    for n in &g.node {
        out.push(n.name().to_string());
        out.extend(n.input.iter().cloned());
        out.extend(n.output.iter().cloned());
        for a in &n.attribute {
            if let Some(sg) = &a.g {
                all_names(sg, out);
            }
        }
    }
    out.extend(g.initializer.iter().map(|t| t.name().to_string()));
}

/// A float16 weight quantized below opset 19 goes through DequantizeLinear (or Mul) and then a
/// Cast back to float16: the intermediate value must get a real name, not the pass's internal
/// placeholder (which holds a control character).
#[test]
fn quantized_fp16_weight_leaves_no_placeholder_name() {
    let mut found = Vec::new();
    for opset in [9, 11, 13] {
        let r = run_pass(&fp16_conv_model(opset), Q);
        let mut names = Vec::new();
        all_names(r.g(), &mut names);
        names.retain(|n| n.chars().any(|c| c.is_control()));
        names.dedup();
        if !names.is_empty() {
            found.push(format!("opset {opset}: {names:?} (ops {:?})", ops(r.g())));
        }
    }
    assert!(
        found.is_empty(),
        "names with control characters in the output:\n  {}",
        found.join("\n  ")
    );
}

/// W is read by a main-graph Conv, by a Conv in the then branch and by a ReduceSum in the else
/// branch: both Convs read one DequantizeLinear, the ReduceSum keeps the float W.
#[test]
fn quantize_outer_weight_with_a_float_reader_in_a_branch() {
    let w = rand_f32(108, 36, 0.5);
    let then_g = graph(
        "then",
        vec![node(
            "Conv",
            "then_conv",
            &["xb", "W"],
            &["then_out"],
            vec![],
        )],
        vec![],
        vec![f32_info("then_out", &[1, 4, 6, 6])],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![
            node("Conv", "else_conv", &["xb", "W2"], &["else_c"], vec![]),
            node(
                "ReduceSum",
                "else_sum",
                &["W"],
                &["else_s"],
                vec![attr_i("keepdims", 0)],
            ),
            node(
                "Mul",
                "else_mul",
                &["else_c", "else_s"],
                &["else_out"],
                vec![],
            ),
        ],
        vec![],
        vec![f32_info("else_out", &[1, 4, 6, 6])],
        vec![],
    );
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Conv", "conv", &["x", "W"], &["y"], vec![]),
                node(
                    "If",
                    "if",
                    &["cond"],
                    &["z"],
                    vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
                ),
            ],
            vec![
                info("cond", DataType::Bool, &[]),
                f32_info("x", &[1, 3, 8, 8]),
                f32_info("xb", &[1, 3, 8, 8]),
            ],
            vec![out("y"), out("z")],
            vec![
                f32_init("W", &[4, 3, 3, 3], &w),
                f32_init("W2", &[4, 3, 3, 3], &rand_f32(108, 37, 0.5)),
            ],
        ),
    );
    let r = run_pass(&p, Q);
    let g = r.g();
    assert_eq!(count(g, "DequantizeLinear"), 2, "{:?}", ops(g));
    let dq = dq_of(g, "W");
    let dq2 = dq_of(g, "W2");
    // W is stored once: every reader, the branch's ReduceSum included, reads the dequantized
    // value under the weight's name.
    assert_eq!(dq.node.output[0], "W");
    assert_eq!(node_named(g, "conv").input[1], "W");
    assert!(init(g, "W").is_none(), "the float W goes");
    let then_b = branch(g, "if", "then_branch");
    let else_b = branch(g, "if", "else_branch");
    assert_eq!(node_named(then_b, "then_conv").input[1], "W");
    assert_eq!(node_named(else_b, "else_sum").input[0], "W");
    assert_eq!(node_named(else_b, "else_conv").input[1], dq2.node.output[0]);
    for cond in [true, false] {
        let inputs = [
            ("cond", TractTensor::from(cond)),
            ("x", tensor(&[1, 3, 8, 8], &rand_f32(192, 38, 1.0))),
            ("xb", tensor(&[1, 3, 8, 8], &rand_f32(192, 39, 1.0))),
        ];
        assert_close_in_tract(&p, &r.proto, &inputs, 0.999);
    }
}

#[test]
fn quantize_gru_rnn_and_batched_matmul_axes() {
    let (h, inp, seq) = (5i64, 6i64, 3usize);
    let gw = rand_f32((3 * h * inp) as usize, 40, 0.5);
    let gr = rand_f32((3 * h * h) as usize, 41, 0.5);
    let rw = rand_f32((h * inp) as usize, 42, 0.5);
    let rr = rand_f32((h * h) as usize, 43, 0.5);
    let m3 = rand_f32(2 * 6 * 4, 44, 0.5);
    let p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "GRU",
                    "gru",
                    &["x", "GW", "GR"],
                    &["gy", "gy_h"],
                    vec![attr_i("hidden_size", h)],
                ),
                node(
                    "RNN",
                    "rnn",
                    &["x", "RW", "RR"],
                    &["ry", "ry_h"],
                    vec![attr_i("hidden_size", h)],
                ),
                node("MatMul", "bmm", &["xb", "M3"], &["by"], vec![]),
            ],
            vec![
                f32_info("x", &[seq as i64, 1, inp]),
                f32_info("xb", &[2, 3, 6]),
            ],
            vec![out("gy"), out("gy_h"), out("ry"), out("ry_h"), out("by")],
            vec![
                f32_init("GW", &[1, 3 * h, inp], &gw),
                f32_init("GR", &[1, 3 * h, h], &gr),
                f32_init("RW", &[1, h, inp], &rw),
                f32_init("RR", &[1, h, h], &rr),
                f32_init("M3", &[2, 6, 4], &m3),
            ],
        ),
    );
    let r = run_pass(&p, Q);
    let g = r.g();
    for (w, data, dims, axis) in [
        ("GW", &gw, vec![1, 3 * h, inp], 1usize),
        ("GR", &gr, vec![1, 3 * h, h], 1),
        ("RW", &rw, vec![1, h, inp], 1),
        ("RR", &rr, vec![1, h, h], 1),
        ("M3", &m3, vec![2, 6, 4], 2),
    ] {
        let dq = dq_of(g, w);
        assert_eq!(axis_of(dq.node), Some(axis as i64), "{w}");
        assert_dequantizes_to(data, &dims, axis, &values(dq.q), &values(dq.scale));
    }
    let inputs = [
        (
            "x",
            tensor(&[seq, 1, inp as usize], &rand_f32(seq * 6, 45, 1.0)),
        ),
        ("xb", tensor(&[2, 3, 6], &rand_f32(36, 46, 1.0))),
    ];
    assert_close_in_tract(&p, &r.proto, &inputs, 0.999);
}

/// W is read by MatMuls two If levels down and, in float, by a ReduceSum in the main graph.
#[test]
fn quantize_outer_weight_read_by_nested_if_branches() {
    let w = rand_f32(40, 47, 0.5);
    let leaf = |tag: &str, neg: bool| {
        let out_name = format!("{tag}_out");
        let mut ns = Vec::new();
        let mut xin = "x".to_string();
        if neg {
            xin = format!("{tag}_nx");
            ns.push(node("Neg", &format!("{tag}_neg"), &["x"], &[&xin], vec![]));
        }
        ns.push(node(
            "MatMul",
            &format!("{tag}_mm"),
            &[&xin, "W"],
            &[&out_name],
            vec![],
        ));
        // Leaf a_t has its own initializer named W, shadowing the outer one.
        let own = if tag == "a_t" {
            vec![f32_init("W", &[8, 5], &rand_f32(40, 49, 0.5))]
        } else {
            vec![]
        };
        graph(tag, ns, vec![], vec![f32_info(&out_name, &[2, 5])], own)
    };
    let inner = |tag: &str| {
        let out_name = format!("{tag}_out");
        graph(
            tag,
            vec![node(
                "If",
                &format!("{tag}_if"),
                &["cond2"],
                &[&out_name],
                vec![
                    attr_g("then_branch", leaf(&format!("{tag}_t"), false)),
                    attr_g("else_branch", leaf(&format!("{tag}_e"), true)),
                ],
            )],
            vec![],
            vec![f32_info(&out_name, &[2, 5])],
            vec![],
        )
    };
    let p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "If",
                    "outer_if",
                    &["cond"],
                    &["y"],
                    vec![
                        attr_g("then_branch", inner("a")),
                        attr_g("else_branch", inner("b")),
                    ],
                ),
                node(
                    "ReduceSum",
                    "wsum",
                    &["W"],
                    &["w_sum"],
                    vec![attr_i("keepdims", 0)],
                ),
            ],
            vec![
                info("cond", DataType::Bool, &[]),
                info("cond2", DataType::Bool, &[]),
                f32_info("x", &[2, 8]),
            ],
            vec![out("y"), out("w_sum")],
            vec![f32_init("W", &[8, 5], &w)],
        ),
    );
    // Both W are quantized. The name W is defined in two graphs, so neither dequantized
    // value takes it (two node outputs named W break single static assignment): the outer
    // one gets a fresh name that the ReduceSum and the three leaves reading the outer W (two
    // levels down) are pointed at; leaf a_t reads its own.
    let r = run_pass(&p, Q);
    let g = r.g();
    let mut outputs = Vec::new();
    collect_node_outputs(g, &mut outputs);
    let before_dedup = outputs.len();
    outputs.sort();
    outputs.dedup();
    assert_eq!(
        outputs.len(),
        before_dedup,
        "a node output name is used twice: {outputs:?}"
    );
    assert!(!outputs.contains(&"W".to_string()), "{outputs:?}");
    let dq = dq_of(g, "W");
    let served = &dq.node.output[0];
    assert!(init(g, "W").is_none());
    assert_eq!(node_named(g, "wsum").input[0], *served);
    for (b, tag) in [("then_branch", "a"), ("else_branch", "b")] {
        let ig = branch(g, "outer_if", b);
        for (bb, leaf_tag) in [
            ("then_branch", format!("{tag}_t")),
            ("else_branch", format!("{tag}_e")),
        ] {
            let lg = branch(ig, &format!("{tag}_if"), bb);
            let read = &node_named(lg, &format!("{leaf_tag}_mm")).input[1];
            if leaf_tag == "a_t" {
                assert_eq!(*read, dq_of(lg, "W").node.output[0], "its own W");
                assert_ne!(read, served);
            } else {
                assert_eq!(read, served, "{b}/{bb}");
            }
        }
    }
    for (c1, c2) in [(true, true), (true, false), (false, false)] {
        let inputs = [
            ("cond", TractTensor::from(c1)),
            ("cond2", TractTensor::from(c2)),
            ("x", tensor(&[2, 8], &rand_f32(16, 48, 1.0))),
        ];
        let (before, after) = (tract(&p, &inputs), tract(&r.proto, &inputs));
        for k in 0..2 {
            let c = cosine(&before[k].1, &after[k].1);
            assert!(c >= 0.999, "cond {c1}/{c2}: {} cosine {c}", before[k].0);
            assert_ne!(before[k], after[k], "cond {c1}/{c2} reads a quantized W");
        }
    }
}

/// Every node output name of `g` and its subgraphs.
fn collect_node_outputs(g: &pb::GraphProto, out: &mut Vec<String>) {
    for n in &g.node {
        out.extend(n.output.iter().cloned());
        for a in &n.attribute {
            if let Some(sg) = &a.g {
                collect_node_outputs(sg, out);
            }
            for sg in &a.graphs {
                collect_node_outputs(sg, out);
            }
        }
    }
}

#[test]
fn dedupe_initializers_does_not_merge_a_graph_input_or_a_subgraph_read() {
    let data = [1.0, 2.0];
    let then_g = graph(
        "then",
        vec![node(
            "Add",
            "then_add",
            &["x", "w_sub"],
            &["then_out"],
            vec![],
        )],
        vec![],
        vec![f32_info("then_out", &[2])],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![node("Neg", "else_neg", &["x"], &["else_out"], vec![])],
        vec![],
        vec![f32_info("else_out", &[2])],
        vec![],
    );
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("Add", "add_in", &["x", "w_in"], &["y1"], vec![]),
                node("Add", "add_sub", &["x", "w_sub"], &["y2"], vec![]),
                node("Mul", "mul", &["x", "w_a"], &["y3"], vec![]),
                node(
                    "If",
                    "if",
                    &["cond"],
                    &["z"],
                    vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
                ),
            ],
            vec![
                info("cond", DataType::Bool, &[]),
                f32_info("x", &[2]),
                f32_info("w_in", &[2]),
            ],
            vec![out("y1"), out("y2"), out("y3"), out("z")],
            ["w_in", "w_sub", "w_a", "w_b"]
                .iter()
                .map(|n| f32_init(n, &[2], &data))
                .collect(),
        ),
    );
    let r = run_pass(&p, "dedupe_initializers");
    let g = r.g();
    // w_b (unread) merges into w_a; the graph input and the subgraph-read one stay.
    assert_eq!(init_names(g), ["w_a", "w_in", "w_sub"]);
    assert_eq!(node_named(g, "add_in").input[1], "w_in");
    assert_eq!(node_named(g, "add_sub").input[1], "w_sub");
    assert_eq!(node_named(g, "mul").input[1], "w_a");
}

/// A `--config` scheme of a node inside an If branch applies to the outer weight it reads (it
/// was taken from the weight's own graph's readers only, so the pass's scheme was used).
#[test]
fn quantize_config_scheme_of_a_branch_node_reading_an_outer_weight() {
    let w = rand_f32(40, 61, 0.5);
    let branch_graph = |tag: &str| {
        let out_name = format!("{tag}_out");
        graph(
            tag,
            vec![node(
                "MatMul",
                &format!("{tag}_mm"),
                &["x", "W"],
                &[&out_name],
                vec![],
            )],
            vec![],
            vec![f32_info(&out_name, &[2, 5])],
            vec![],
        )
    };
    let p = model(
        13,
        graph(
            "g",
            vec![node(
                "If",
                "if",
                &["cond"],
                &["y"],
                vec![
                    attr_g("then_branch", branch_graph("then")),
                    attr_g("else_branch", branch_graph("else")),
                ],
            )],
            vec![info("cond", DataType::Bool, &[]), f32_info("x", &[2, 8])],
            vec![out("y")],
            vec![f32_init("W", &[8, 5], &w)],
        ),
    );
    let int16 = crate::quant::Scheme {
        qtype: crate::quant::QType::Int16,
        ..crate::quant::Scheme::INT8_CHANNEL
    };
    let opts = PassOptions {
        node_schemes: [("else_mm".to_string(), int16)].into_iter().collect(),
        ..Default::default()
    };
    let r = run_passes_with(&p, &["quantize_weights"], &opts);
    let g = r.g();
    let q = init(g, "W_quantized").expect("W_quantized");
    assert_eq!(q.data_type(), DataType::Int16 as i32);
    for cond in [true, false] {
        let inputs = [
            ("cond", TractTensor::from(cond)),
            ("x", tensor(&[2, 8], &rand_f32(16, 62, 1.0))),
        ];
        assert_close_in_tract(&p, &r.proto, &inputs, 0.99999);
    }
}

/// Initializers that `training_info` or a `quantization_annotation` names are read by them:
/// not removed, renamed or rewritten in place (cleanup deleted a learning rate only training
/// read, fold_batchnorm rewrote a weight training updates, and an annotation's scale tensor
/// was removed, leaving them pointing at nothing).
#[test]
fn names_in_training_info_and_quantization_annotations_are_kept() {
    let c = 4;
    let bn = ["bn_s", "bn_b", "bn_m", "bn_v"];
    let mut inits = vec![
        f32_init("W", &[4, 3, 1, 1], &rand_f32(12, 3, 1.0)),
        f32_init("lr", &[], &[0.01]),
        f32_init("sc2", &[], &[0.5]),
        f32_init("M", &[4, 4], &rand_f32(16, 4, 1.0)),
    ];
    for (k, n) in bn.iter().enumerate() {
        let v: Vec<f32> = rand_f32(c, 10 + k as u64, 0.5)
            .iter()
            .map(|x| x + 1.0)
            .collect();
        inits.push(f32_init(n, &[4], &v));
    }
    let mut g = graph(
        "g",
        vec![
            node("Conv", "conv", &["x", "W"], &["c"], vec![]),
            node(
                "BatchNormalization",
                "bn",
                &["c", "bn_s", "bn_b", "bn_m", "bn_v"],
                &["b"],
                vec![],
            ),
            node("Flatten", "flat", &["b"], &["f"], vec![]),
            node("MatMul", "mm", &["f", "M"], &["y"], vec![]),
        ],
        vec![f32_info("x", &[1, 3, 1, 1])],
        vec![out("y")],
        inits,
    );
    let entry = |k: &str, v: &str| pb::StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    };
    g.quantization_annotation.push(pb::TensorAnnotation {
        tensor_name: Some("f".into()),
        quant_parameter_tensor_names: vec![entry("SCALE_TENSOR", "sc2")],
    });
    let mut p = model(13, g);
    p.training_info.push(pb::TrainingInfoProto {
        algorithm: Some(graph(
            "train",
            vec![
                node("Mul", "step", &["W", "lr"], &["W_new"], vec![]),
                node("Mul", "step2", &["M", "lr"], &["M_new"], vec![]),
            ],
            vec![],
            vec![out("W_new"), out("M_new")],
            vec![],
        )),
        update_binding: vec![entry("W", "W_new"), entry("M", "M_new")],
        ..Default::default()
    });
    let r = run_passes(
        &p,
        &[
            "constant_to_initializer",
            "eliminate_identity",
            "eliminate_dead_nodes",
            "eliminate_unused_initializers",
            "dedupe_initializers",
            "fold_batchnorm",
            "eliminate_unused_initializers",
            "quantize_weights_int8",
            "eliminate_unused_initializers",
        ],
    );
    let g = r.g();
    let init_names: Vec<&str> = g.initializer.iter().map(|t| t.name()).collect();
    for name in ["lr", "sc2", "W", "M"] {
        assert!(init_names.contains(&name), "{name} removed: {init_names:?}");
    }
    // W and M keep their values: the folded weight is a copy, M stays float.
    for name in ["W", "M"] {
        let before = main(&p).initializer.iter().find(|t| t.name() == name);
        let after = g.initializer.iter().find(|t| t.name() == name);
        assert_eq!(before, after, "{name}");
    }
    assert_eq!(
        nodes(g, "BatchNormalization").len(),
        0,
        "the BN still folds"
    );
    assert_ne!(node_named(g, "conv").input[1], "W");
    assert_eq!(node_named(g, "mm").input[1], "M");
    let notes: Vec<&String> = r.records.iter().flat_map(|r| &r.notes).collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("weight 'M' is named by the model's training_info")),
        "{notes:#?}"
    );
    assert_eq!(r.proto.training_info, p.training_info);
    assert_eq!(g.quantization_annotation, main(&p).quantization_annotation);
    // Dynamic mode keeps M too, and its note names training_info (it said "a subgraph").
    let r = run_passes(&p, &["quantize_dynamic"]);
    assert_eq!(node_named(r.g(), "mm").input[1], "M");
    let notes: Vec<&String> = r.records.iter().flat_map(|r| &r.notes).collect();
    assert!(
        notes.iter().any(|n| n.contains("training_info")),
        "{notes:#?}"
    );
}

/// A block size below 2 is refused by the pass, as by the CLI: library callers got a panic
/// (division by zero) for 0, and a scale per element for 1.
#[test]
fn block_sizes_below_2_are_refused_not_a_panic() {
    use crate::quant::{Granularity, QType, Scheme, WeightFormat};
    let block = |bs| Scheme {
        qtype: QType::Int4,
        symmetric: true,
        granularity: Granularity::Block(bs),
        pow2: false,
    };
    let p = one_matmul(21, 32, 5, false);
    let pass = by_name("quantize_weights").unwrap();
    for bs in [0, 1] {
        for format in [WeightFormat::Qdq, WeightFormat::MatMulNBits] {
            let (mut m, _) = crate::onnx::from_proto(p.clone(), None, "test").unwrap();
            let opts = PassOptions {
                weight_scheme: Some(block(bs)),
                weight_format: format,
                ..Default::default()
            };
            let err = pass.run(&mut m, &opts).unwrap_err();
            assert!(
                format!("{err:#}").contains(&format!("block size must be at least 2, not {bs}")),
                "{err:#}"
            );
        }
        let (mut m, _) = crate::onnx::from_proto(p.clone(), None, "test").unwrap();
        let opts = PassOptions {
            node_schemes: [("mm".to_string(), block(bs))].into(),
            ..Default::default()
        };
        let err = pass.run(&mut m, &opts).unwrap_err();
        assert!(format!("{err:#}").contains("node \"mm\""), "{err:#}");
    }
}

/// At IR 3 a weight held in a Constant node stays there (no initializer can be added): the
/// weight passes say so, without advising constant_to_initializer, which cannot help there.
#[test]
fn at_ir_3_constant_weights_are_not_sent_to_constant_to_initializer() {
    let mut p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "Constant",
                    "k",
                    &[],
                    &["W"],
                    vec![attr_t(
                        "value",
                        f32_init("W", &[4, 4], &rand_f32(16, 5, 1.0)),
                    )],
                ),
                node("MatMul", "mm", &["x", "W"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[1, 4])],
            vec![out("y")],
            vec![],
        ),
    );
    for ir in [3, 7] {
        p.ir_version = Some(ir);
        for pass in ["quantize_weights", "quantize_dynamic"] {
            let notes = run_pass(&p, pass).notes().join("\n");
            assert_eq!(
                notes.contains("run constant_to_initializer before it"),
                ir == 7,
                "IR {ir} {pass}: {notes}"
            );
            assert_eq!(
                notes.contains("IR version 3"),
                ir == 3,
                "IR {ir} {pass}: {notes}"
            );
        }
    }
}

/// A float initializer a weight op reads where the pass takes no weight (a 1-D MatMul weight,
/// a constant A input) is named with its node and input (weight-only mode said only "changed
/// nothing"); biases are not.
#[test]
fn weights_read_where_the_pass_takes_none_are_named() {
    let mm = |inputs: &[&str], w_dims: &[i64]| {
        let n: i64 = w_dims.iter().product();
        model(
            13,
            graph(
                "g",
                vec![node("MatMul", "mm", inputs, &["y"], vec![])],
                vec![f32_info("x", &[4, 4])],
                vec![out("y")],
                vec![f32_init("W", w_dims, &rand_f32(n as usize, 3, 1.0))],
            ),
        )
    };
    for (inputs, dims, said) in [
        (
            ["x", "W"],
            &[4][..],
            "weight 'W' (rank 1) is read by MatMul node \"mm\" input 1",
        ),
        (
            ["W", "x"],
            &[4, 4][..],
            "weight 'W' (rank 2) is read by MatMul node \"mm\" input 0",
        ),
    ] {
        let r = run_pass(&mm(&inputs, dims), "quantize_weights");
        assert_eq!(r.changes(), 0);
        let notes = r.notes().join("\n");
        assert!(notes.contains(said), "{notes}");
    }
    // A Conv's bias stays float without such a note.
    let conv = model(
        13,
        graph(
            "g",
            vec![node("Conv", "conv", &["x", "W", "B"], &["y"], vec![])],
            vec![f32_info("x", &[1, 2, 4, 4])],
            vec![out("y")],
            vec![
                f32_init("W", &[3, 2, 1, 1], &rand_f32(6, 4, 1.0)),
                f32_init("B", &[3], &[0.1, 0.2, 0.3]),
            ],
        ),
    );
    let r = run_pass(&conv, "quantize_weights");
    assert_eq!(r.changes(), 1);
    assert!(
        !r.notes().join("\n").contains("not as a weight"),
        "{:?}",
        r.notes()
    );
}

/// onnxruntime fuses a 4- or 8-bit `DequantizeLinear` weight into the MatMul (or Gemm without
/// transB) reading it as B, as `MatMulNBits` with int8 activations: the pass says so for those
/// weights only (not int16, not the cast form, not a Gemm with transB, not below opset 13's
/// per-channel DequantizeLinear).
#[test]
fn weights_onnxruntime_fuses_into_matmulnbits_get_a_note() {
    use crate::quant::{QType, Scheme, WeightFormat};
    let note = "fuses each pair into com.microsoft MatMulNBits";
    let gemm = |trans_b: i64| {
        let w = if trans_b == 1 { [4, 32] } else { [32, 4] };
        model(
            13,
            graph(
                "g",
                vec![node(
                    "Gemm",
                    "gemm",
                    &["x", "W"],
                    &["y"],
                    vec![attr_i("transB", trans_b)],
                )],
                vec![f32_info("x", &[1, 32])],
                vec![out("y")],
                vec![f32_init("W", &w, &rand_f32(128, 6, 1.0))],
            ),
        )
    };
    let int16 = PassOptions {
        weight_scheme: Some(Scheme {
            qtype: QType::Int16,
            ..Scheme::INT8_CHANNEL
        }),
        ..Default::default()
    };
    let cast = PassOptions {
        weight_format: WeightFormat::Cast,
        ..Default::default()
    };
    let cases = [
        (
            "MatMul int8",
            one_matmul(13, 32, 6, false),
            PassOptions::default(),
            true,
        ),
        ("MatMul int16", one_matmul(21, 32, 6, false), int16, false),
        ("MatMul cast", one_matmul(13, 32, 6, false), cast, false),
        (
            "MatMul opset 12",
            one_matmul(12, 32, 6, false),
            PassOptions::default(),
            false,
        ),
        ("Gemm", gemm(0), PassOptions::default(), true),
        ("Gemm transB", gemm(1), PassOptions::default(), false),
    ];
    for (what, p, opts, noted) in cases {
        let r = run_passes_with(&p, &["quantize_weights"], &opts);
        assert_eq!(r.changes(), 1, "{what}");
        let notes = r.notes().join("\n");
        assert_eq!(notes.contains(note), noted, "{what}: {notes}");
    }
}

/// Dynamic mode leaves a MatMul of a declared 1-D input (a vector times the weight) in float,
/// saying why: tract's MatMulInteger gave it shape [1, N] where MatMul gives [N], so the check
/// failed on a correct result. A 2-D input is rewritten. A weight held in a sparse initializer
/// is named as such (it was said to come from an enclosing graph).
#[test]
fn dynamic_mode_names_why_a_vector_input_and_a_sparse_weight_stay_float() {
    let mm = |x_dims: &[i64]| {
        model(
            13,
            graph(
                "g",
                vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
                vec![f32_info("x", x_dims)],
                vec![out("y")],
                vec![f32_init("W", &[32, 16], &rand_f32(32 * 16, 2, 1.0))],
            ),
        )
    };
    let r = run_pass(&mm(&[32]), "quantize_dynamic");
    assert_eq!(r.changes(), 0);
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("MatMul node \"mm\": input 'x' is 1-D"),
        "{notes}"
    );
    let r = run_pass(&mm(&[2, 32]), "quantize_dynamic");
    assert!(r.changes() > 0);
    assert_eq!(ops(r.g()).get("MatMulInteger"), Some(&1));

    let mut g = graph(
        "g",
        vec![node("MatMul", "mm", &["x", "spw"], &["y"], vec![])],
        vec![f32_info("x", &[2, 4])],
        vec![out("y")],
        vec![],
    );
    g.sparse_initializer.push(pb::SparseTensorProto {
        values: Some(f32_init("spw", &[2], &[5.0, 6.0])),
        indices: Some(named("spw_indices", Tensor::from_i64(&[2], &[0, 3]))),
        dims: vec![4, 2],
    });
    let r = run_pass(&model(13, g), "quantize_dynamic");
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("weight 'spw' is a sparse initializer")
            && !notes.contains("enclosing graph"),
        "{notes}"
    );
}

/// A weight whose values are all subnormal (|w| < 2^-126) would quantize to 0 with the
/// smallest normal scale, while the check, in tract, which flushes subnormals, called the
/// result exact: every weight pass leaves it in float and says why. A weight with one normal
/// value is quantized.
#[test]
fn subnormal_weights_are_left_in_float_with_a_note() {
    use crate::quant::{Granularity, QType, Scheme, WeightFormat};
    let tiny: Vec<f32> = rand_f32(32 * 4, 4, 1.0).iter().map(|v| v * 1e-39).collect();
    assert!(tiny.iter().all(|v| v.abs() < f32::MIN_POSITIVE) && tiny.iter().any(|v| *v != 0.0));
    let with = |w: &[f32]| {
        let mut p = one_matmul(21, 32, 1, false);
        p.graph.as_mut().unwrap().initializer[0] = f32_init("W", &[32, 4], w);
        p
    };
    let nbits = PassOptions {
        weight_scheme: Some(Scheme {
            qtype: QType::Int4,
            symmetric: true,
            granularity: Granularity::Block(16),
            pow2: false,
        }),
        weight_format: WeightFormat::MatMulNBits,
        ..Default::default()
    };
    let cast = PassOptions {
        weight_format: WeightFormat::Cast,
        ..Default::default()
    };
    let runs = [
        ("quantize_weights", PassOptions::default()),
        ("quantize_weights", cast),
        ("quantize_weights", nbits),
        ("quantize_dynamic", PassOptions::default()),
    ];
    for (pass, opts) in &runs {
        let r = run_passes_with(&with(&tiny), &[pass], opts);
        assert_eq!(r.changes(), 0, "{pass} {:?}", opts.weight_format);
        let notes = r.notes().join("\n");
        assert!(
            notes.contains("weight 'W' holds only subnormal values"),
            "{pass} {:?}: {notes}",
            opts.weight_format
        );
        assert!(r.g().initializer.iter().any(|t| t.name() == "W"), "{pass}");
    }
    let mut one_normal = tiny.clone();
    one_normal[5] = 1e-30;
    for (pass, opts) in &runs {
        let r = run_passes_with(&with(&one_normal), &[pass], opts);
        assert!(r.changes() > 0, "{pass} {:?}", opts.weight_format);
    }
}

/// The cast weight format cannot write 4-bit or block-wise weights: a scheme given per node
/// (`--config`) asking for either is refused naming the node, at opset 21 (it wrote a scale
/// of shape [] holding one value per block, which onnxruntime refuses to load) and below (the
/// error blamed the opset for what the format cannot do).
#[test]
fn the_cast_format_refuses_node_schemes_it_cannot_write() {
    use crate::quant::{Granularity, QType, Scheme, WeightFormat};
    let blocks = Scheme {
        qtype: QType::Uint8,
        symmetric: false,
        granularity: Granularity::Block(8),
        pow2: false,
    };
    let int4 = Scheme {
        qtype: QType::Int4,
        symmetric: true,
        granularity: Granularity::Channel,
        pow2: false,
    };
    let pass = by_name("quantize_weights").unwrap();
    for opset in [13, 21] {
        for (scheme, said) in [(blocks, "uint8 in blocks"), (int4, "int4")] {
            let (mut m, _) =
                crate::onnx::from_proto(one_matmul(opset, 32, 3, false), None, "test").unwrap();
            let opts = PassOptions {
                weight_format: WeightFormat::Cast,
                node_schemes: [("mm".to_string(), scheme)].into(),
                ..Default::default()
            };
            let err = format!("{:#}", pass.run(&mut m, &opts).unwrap_err());
            assert!(
                err.contains("cast weight format") && err.contains(&format!("node \"mm\": {said}")),
                "opset {opset}: {err}"
            );
            assert!(!err.contains("DequantizeLinear-21"), "{err}");
        }
        // An 8-bit per-tensor scheme for the node is written.
        let (mut m, _) =
            crate::onnx::from_proto(one_matmul(opset, 32, 3, false), None, "test").unwrap();
        let opts = PassOptions {
            weight_format: WeightFormat::Cast,
            node_schemes: [(
                "mm".to_string(),
                Scheme {
                    granularity: Granularity::Tensor,
                    ..Scheme::INT8_CHANNEL
                },
            )]
            .into(),
            ..Default::default()
        };
        assert_eq!(pass.run(&mut m, &opts).unwrap().changes, 1);
    }
}

/// A model an edit left invalid is reported, not a panic: a node reading a value id the graph
/// does not have (validate indexed out of bounds), and a node removed while its output is
/// still read (a weight pass then panicked, or the first pass was blamed for it).
#[test]
fn a_model_left_invalid_by_edits_is_refused_before_any_pass() {
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("MatMul", "mm1", &["x", "W"], &["h"], vec![]),
                node("MatMul", "mm2", &["h", "W"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[1, 4])],
            vec![out("y")],
            vec![f32_init("W", &[4, 4], &rand_f32(16, 8, 1.0))],
        ),
    );
    let (mut m, _) = crate::onnx::from_proto(p.clone(), None, "test").unwrap();
    let (id, _) = m.graph.live_nodes().next().unwrap();
    m.graph.node_mut(id).inputs[0] = Some(crate::ir::ValueId(9999));
    let err = crate::ir::validate::validate(&m).unwrap_err();
    assert!(
        format!("{err:#}").contains("input #0 is value #9999, which this graph does not have"),
        "{err:#}"
    );
    let (mut m, _) = crate::onnx::from_proto(p, None, "test").unwrap();
    let (id, _) = m.graph.live_nodes().next().unwrap();
    m.graph.remove_node(id);
    let pass = by_name("quantize_weights_int8").unwrap();
    let err = run_pipeline(
        &mut m,
        &[pass],
        &PassOptions::default(),
        true,
        &crate::report::Silent,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("before any pass ran") && msg.contains("'h'"),
        "{msg}"
    );
}

/// `convert_fp16` with default options keeps the graph's float32 inputs and outputs, as the
/// CLI does (the library's default turned them into float16, changing the model's contract).
#[test]
fn convert_fp16_with_default_options_keeps_the_interface() {
    let p = one_matmul(13, 4, 9, true);
    let r = run_pass(&p, "convert_fp16");
    assert!(r.changes() > 0);
    assert_eq!(main(&r.proto).input, main(&p).input);
    assert_eq!(main(&r.proto).output, main(&p).output);
}

/// A lossy pass that changes nothing because the fallback keeps every layer in float says so
/// (it said "no node has what this pass rewrites", as if the model had no such layer).
#[test]
fn a_pass_left_nothing_by_the_fallback_says_so() {
    let p = one_matmul(13, 4, 10, false);
    let opts = PassOptions {
        keep_float: ["y".to_string()].into(),
        ..Default::default()
    };
    let r = run_passes_with(&p, &["quantize_weights_int8"], &opts);
    assert_eq!(r.changes(), 0);
    let notes = r.notes();
    assert!(
        notes[0].starts_with("changed nothing")
            && notes
                .iter()
                .any(|n| n.contains("kept in float by the accuracy-gated fallback")),
        "{notes:#?}"
    );
}

/// `y = MatMul(x [1, k], W [k, 4])` at `opset`, W from `seed`; `typed_output`: `y` declares
/// its type and shape.
fn one_matmul(opset: i64, k: i64, seed: u64, typed_output: bool) -> pb::ModelProto {
    model(
        opset,
        graph(
            "g",
            vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
            vec![f32_info("x", &[1, k])],
            vec![if typed_output {
                f32_info("y", &[1, 4])
            } else {
                out("y")
            }],
            vec![f32_init("W", &[k, 4], &rand_f32(k as usize * 4, seed, 1.0))],
        ),
    )
}

/// A quantized weight keeps the doc string and metadata of its float weight (an exporter's
/// source name), in every weight format and mode (they were dropped).
#[test]
fn quantized_weights_keep_their_description() {
    let mut p = one_matmul(13, 16, 11, false);
    let w = &mut p.graph.as_mut().unwrap().initializer[0];
    w.doc_string = Some("fc weight".into());
    w.metadata_props = vec![pb::StringStringEntryProto {
        key: Some("torch_name".into()),
        value: Some("fc.weight".into()),
    }];
    let described = |r: &Ran, what: &str| {
        let q = main(&r.proto)
            .initializer
            .iter()
            .find(|t| t.name() == "W_quantized")
            .unwrap_or_else(|| panic!("{what}: no W_quantized"));
        assert_eq!(q.doc_string(), "fc weight", "{what}");
        assert_eq!(q.metadata_props[0].value(), "fc.weight", "{what}");
    };
    for format in [
        crate::quant::WeightFormat::Qdq,
        crate::quant::WeightFormat::Cast,
    ] {
        let opts = PassOptions {
            weight_format: format,
            ..Default::default()
        };
        described(
            &run_passes_with(&p, &["quantize_weights"], &opts),
            &format!("{format:?}"),
        );
    }
    described(&run_pass(&p, "quantize_dynamic"), "dynamic");
}
