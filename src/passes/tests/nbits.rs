//! `quantize_weights` with `WeightFormat::MatMulNBits` on tiny graphs.
//!
//! Each test builds a model, runs the pass (IR validated after it), checks the packed bytes,
//! scales and zero points against a reference written here from the operator's documented
//! layout (onnxruntime `docs/ContribOperators.md`, `com.microsoft.MatMulNBits`), and runs the
//! result in onnxruntime against the float-equivalent model the pass writes with
//! `dequantized_weights` (the model the tract check runs): both must compute the same thing.
//! onnxruntime runs through `tests/py/ort_cosine.py` with the Python in `ONNXOPT_PYTHON`
//! (default `target/pyenv/bin/python`, built by tests/run.sh).

// Tests fail by panicking: unwrap and panic! are the point here.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use tract_onnx::prelude::Tensor as TractTensor;

use super::super::manager::{run_pipeline, PassRecord};
use super::super::{by_name, PassOptions};
use crate::ir::Tensor;
use crate::pb::{self, attribute_proto::AttributeType, tensor_proto::DataType};
use crate::quant::{Granularity, QType, Scheme, WeightFormat};

// ---------------------------------------------------------------------------------------------
// Builders

// Thin forms of the builders of `passes::tests`.

fn vi(name: &str, dt: DataType, dims: &[i64]) -> pb::ValueInfoProto {
    super::info(name, dt, dims)
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
    super::node(op, name, inputs, outputs, vec![])
}

fn with_attrs(mut n: pb::NodeProto, attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
    n.attribute = attrs;
    n
}

use super::{attr_i, model};

fn init(name: &str, dt: DataType, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    if dt == DataType::Float16 {
        super::f16_init(name, dims, data)
    } else {
        super::f32_init(name, dims, data)
    }
}

fn graph(
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    inits: Vec<pb::TensorProto>,
) -> pb::GraphProto {
    super::graph("g", nodes, inputs, outputs, inits)
}

/// `n` values in [-1, 1) from a fixed seed, with a few larger ones so blocks differ in range.
fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            if i % 29 == 0 {
                v * 3.0
            } else {
                v
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running the pass

fn opts(qtype: QType, symmetric: bool, bs: usize, dequantized: bool) -> PassOptions {
    PassOptions {
        weight_scheme: Some(Scheme {
            qtype,
            symmetric,
            granularity: Granularity::Block(bs),
            pow2: false,
        }),
        weight_format: WeightFormat::MatMulNBits,
        dequantized_weights: dequantized,
        ..Default::default()
    }
}

/// Runs `quantize_weights` on `proto` (validated) and exports the result.
fn run(proto: &pb::ModelProto, o: &PassOptions) -> (pb::ModelProto, PassRecord) {
    let (mut m, _) = crate::onnx::from_proto(proto.clone(), None, "test").unwrap();
    let pass = by_name("quantize_weights").unwrap();
    let mut rec = run_pipeline(&mut m, &[pass], o, true, &crate::report::Silent).unwrap();
    let out = crate::onnx::export::to_proto(&m).unwrap();
    crate::onnx::from_proto(out.clone(), None, "exported").unwrap();
    let g0 = proto.graph.as_ref().unwrap();
    let g1 = out.graph.as_ref().unwrap();
    let names = |g: &pb::GraphProto| -> Vec<String> {
        g.input
            .iter()
            .chain(&g.output)
            .map(|v| v.name().to_string())
            .collect()
    };
    assert_eq!(names(g0), names(g1), "the interface changed");
    (out, rec.remove(0))
}

fn main_graph(p: &pb::ModelProto) -> &pb::GraphProto {
    p.graph.as_ref().unwrap()
}

fn nbits_nodes(g: &pb::GraphProto) -> Vec<&pb::NodeProto> {
    g.node
        .iter()
        .filter(|n| n.op_type() == "MatMulNBits")
        .collect()
}

fn attr(n: &pb::NodeProto, name: &str) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name() == name)
        .unwrap_or_else(|| panic!("no attribute {name}"))
        .i()
}

fn initializer<'a>(g: &'a pb::GraphProto, name: &str) -> &'a pb::TensorProto {
    g.initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("no initializer {name}"))
}

fn floats(t: &pb::TensorProto) -> Vec<f32> {
    Tensor::new(t.clone()).to_f32().unwrap()
}

fn opset(p: &pb::ModelProto, domain: &str) -> Option<i64> {
    p.opset_import
        .iter()
        .find(|o| o.domain() == domain)
        .map(|o| o.version())
}

// ---------------------------------------------------------------------------------------------
// The reference: the operator's layout, written out element by element.

struct Reference {
    b: Vec<u8>,
    scales: Vec<f32>,
    zero_points: Option<Vec<u8>>,
}

/// `w` is `[K, N]` row-major (`transposed`: `[N, K]`). Symmetric int4: scale `amax / 7`,
/// `q = round_half_even(w / scale)` in [-7, 7] stored as `q + 8`, no zero points.
/// Asymmetric uint4: range `[min(lo, 0), max(hi, 0)]`, scale `(hi - lo) / 15`, zero point
/// `round_half_even(-lo / scale)`, `q = round_half_even(w / scale) + zero_point` in [0, 15].
/// The padding of the last block holds the zero point.
fn reference(w: &[f32], k: usize, n: usize, bs: usize, transposed: bool, sym: bool) -> Reference {
    let kb = k.div_ceil(bs);
    let at = |kk: usize, col: usize| {
        if transposed {
            w[col * k + kk]
        } else {
            w[kk * n + col]
        }
    };
    let mut b = vec![0u8; n * kb * bs / 2];
    let mut scales = Vec::new();
    let mut zps = Vec::new();
    for col in 0..n {
        for blk in 0..kb {
            let vals: Vec<f32> = (blk * bs..((blk + 1) * bs).min(k))
                .map(|kk| at(kk, col))
                .collect();
            let lo = vals.iter().copied().fold(0f32, f32::min);
            let hi = vals.iter().copied().fold(0f32, f32::max);
            let (s, zp) = if sym {
                let amax = lo.abs().max(hi);
                (if amax > 0.0 { amax / 7.0 } else { 1.0 }, 8i32)
            } else {
                let s = if hi > lo { (hi - lo) / 15.0 } else { 1.0 };
                (s, ((-lo / s).round_ties_even() as i32).clamp(0, 15))
            };
            scales.push(s);
            zps.push(zp as u8);
            for j in 0..bs {
                let kk = blk * bs + j;
                let q = if kk < k {
                    let r = (at(kk, col) / s).round_ties_even() as i32;
                    if sym {
                        r.clamp(-7, 7) + 8
                    } else {
                        (r + zp).clamp(0, 15)
                    }
                } else {
                    zp
                };
                b[(col * kb + blk) * bs / 2 + j / 2] |= (q as u8) << (4 * (j % 2));
            }
        }
    }
    let zero_points = (!sym).then(|| {
        let row = kb.div_ceil(2);
        let mut z = vec![0u8; n * row];
        for col in 0..n {
            for blk in 0..kb {
                z[col * row + blk / 2] |= zps[col * kb + blk] << (4 * (blk % 2));
            }
        }
        z
    });
    Reference {
        b,
        scales,
        zero_points,
    }
}

/// Checks one MatMulNBits node and its initializers (in `g`) against the reference.
fn assert_packed(g: &pb::GraphProto, n: &pb::NodeProto, want: &Reference, k: usize, cols: usize) {
    let bs = attr(n, "block_size") as usize;
    let kb = k.div_ceil(bs);
    assert_eq!(n.domain(), "com.microsoft");
    assert_eq!(
        (attr(n, "K"), attr(n, "N"), attr(n, "bits")),
        (k as i64, cols as i64, 4)
    );
    let b = initializer(g, &n.input[1]);
    assert_eq!(b.data_type(), DataType::Uint8 as i32);
    assert_eq!(b.dims, vec![cols as i64, kb as i64, bs as i64 / 2]);
    assert_eq!(b.raw_data(), &want.b[..], "packed B");
    let s = initializer(g, &n.input[2]);
    assert_eq!(s.dims, vec![cols as i64, kb as i64]);
    let got = floats(s);
    for (i, (a, w)) in got.iter().zip(&want.scales).enumerate() {
        assert!((a - w).abs() <= w.abs() * 1e-3, "scale {i}: {a} vs {w}");
    }
    match &want.zero_points {
        Some(z) => {
            let t = initializer(g, &n.input[3]);
            assert_eq!(t.data_type(), DataType::Uint8 as i32);
            assert_eq!(t.dims, vec![cols as i64, kb.div_ceil(2) as i64]);
            assert_eq!(t.raw_data(), &z[..], "zero points");
        }
        None => assert!(n.input.len() < 4 || n.input[3].is_empty(), "{n:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// onnxruntime

use super::python;

fn py(script: &str, args: &[&std::path::Path]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let o = std::process::Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `reference` and `candidate` in onnxruntime on `inputs` (the onnx checker must accept
/// the candidate) and returns (cosine, max abs) of each output.
fn ort(
    reference: &pb::ModelProto,
    candidate: &pb::ModelProto,
    inputs: &[(&str, TractTensor)],
) -> Vec<(f64, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("reference.onnx");
    let c = dir.path().join("candidate.onnx");
    let x = dir.path().join("inputs.npz");
    std::fs::write(&r, prost::Message::encode_to_vec(reference)).unwrap();
    std::fs::write(&c, prost::Message::encode_to_vec(candidate)).unwrap();
    let arrays: Vec<(String, TractTensor)> = inputs
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    crate::verify::inputs::save_npz(&x, &arrays).unwrap();
    py("check.py", &[&c]);
    let out: serde_json::Value = serde_json::from_str(&py("ort_cosine.py", &[&r, &c, &x])).unwrap();
    out["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["cosine"].as_f64().unwrap(),
                o["max_abs"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn f32_tensor(shape: &[usize], data: &[f32]) -> TractTensor {
    TractTensor::from_shape(shape, data).unwrap()
}

/// The MatMulNBits model computes what the float-equivalent model computes (up to float
/// summation order), and stays close to the original.
fn assert_equivalent_in_ort(
    original: &pb::ModelProto,
    o: &PassOptions,
    inputs: &[(&str, TractTensor)],
    tol: f64,
) -> pb::ModelProto {
    let (nbits, _) = run(original, o);
    let (equivalent, _) = run(
        original,
        &PassOptions {
            dequantized_weights: true,
            ..o.clone()
        },
    );
    assert!(
        nbits_nodes(main_graph(&equivalent)).is_empty(),
        "the float-equivalent model has no MatMulNBits"
    );
    for (cos, max_abs) in ort(&equivalent, &nbits, inputs) {
        assert!(
            max_abs <= tol,
            "MatMulNBits vs float equivalent: max abs {max_abs}"
        );
        assert!(
            cos >= 0.99999,
            "MatMulNBits vs float equivalent: cosine {cos}"
        );
    }
    for (cos, _) in ort(original, &nbits, inputs) {
        assert!(cos >= 0.99, "MatMulNBits vs the original: cosine {cos}");
    }
    nbits
}

// ---------------------------------------------------------------------------------------------
// Tests

/// X [2, 100] @ W [100, 3]: K = 100 with block 32 pads the last block (4 values + 28).
fn matmul_k100() -> (pb::ModelProto, Vec<f32>) {
    let w = rand(300, 1);
    let g = graph(
        vec![node("MatMul", "mm", &["x", "w"], &["y"])],
        vec![vi("x", DataType::Float, &[2, 100])],
        vec![vi("y", DataType::Float, &[2, 3])],
        vec![init("w", DataType::Float, &[100, 3], &w)],
    );
    (model(13, g), w)
}

#[test]
fn quantize_weights_nbits_matmul_k100_block32_symmetric_int4() {
    let (m, w) = matmul_k100();
    let o = opts(QType::Int4, true, 32, false);
    let (out, rec) = run(&m, &o);
    let g = main_graph(&out);
    let nodes = nbits_nodes(g);
    assert_eq!(nodes.len(), 1, "{g:?}");
    assert_eq!(g.node.len(), 1, "the MatMul is replaced");
    let n = nodes[0];
    assert_eq!(n.input[0], "x");
    assert_eq!(n.output, vec!["y".to_string()], "the output keeps its name");
    assert_eq!(n.input.len(), 3, "symmetric: no zero points");
    assert_packed(g, n, &reference(&w, 100, 3, 32, false, true), 100, 3);
    assert!(
        g.initializer.iter().all(|t| t.name() != "w"),
        "float weight removed"
    );
    assert_eq!(opset(&out, ""), Some(13), "default opset unchanged");
    assert_eq!(opset(&out, "com.microsoft"), Some(1));
    assert_eq!(rec.changes, 1);
    assert!(rec.touched[0].contains("MatMulNBits"), "{:?}", rec.touched);
    let x = rand(200, 2);
    assert_equivalent_in_ort(&m, &o, &[("x", f32_tensor(&[2, 100], &x))], 1e-5);
}

#[test]
fn quantize_weights_nbits_matmul_asymmetric_uint4_and_int4_zero_points() {
    let (m, w) = matmul_k100();
    let want = reference(&w, 100, 3, 32, false, false);
    let x = rand(200, 3);
    for qtype in [QType::Uint4, QType::Int4] {
        // int4 asymmetric q in [-8, 7] with zero point z is stored as q + 8, z + 8: the same
        // bytes as uint4.
        let o = opts(qtype, false, 32, false);
        let (out, _) = run(&m, &o);
        let g = main_graph(&out);
        let n = nbits_nodes(g)[0];
        assert_eq!(n.input.len(), 4, "{n:?}");
        assert_packed(g, n, &want, 100, 3);
        assert_equivalent_in_ort(&m, &o, &[("x", f32_tensor(&[2, 100], &x))], 1e-5);
    }
}

#[test]
fn quantize_weights_nbits_gemm_trans_b_with_bias() {
    // Y = X [4, 48] @ W^T, W [5, 48] (transB = 1), + C [5]: the bias goes to input 5.
    let (k, cols) = (48, 5);
    let w = rand(k * cols, 4);
    let c = rand(cols, 5);
    let gemm = with_attrs(
        node("Gemm", "fc", &["x", "w", "c"], &["y"]),
        vec![attr_i("transB", 1)],
    );
    let g = graph(
        vec![gemm],
        vec![vi("x", DataType::Float, &[4, k as i64])],
        vec![vi("y", DataType::Float, &[4, cols as i64])],
        vec![
            init("w", DataType::Float, &[cols as i64, k as i64], &w),
            init("c", DataType::Float, &[cols as i64], &c),
        ],
    );
    let m = model(11, g);
    let o = opts(QType::Int4, true, 16, false);
    let (out, _) = run(&m, &o);
    let g = main_graph(&out);
    let n = nbits_nodes(g)[0];
    assert_eq!(n.input.len(), 6, "{n:?}");
    assert_eq!(
        (&n.input[3][..], &n.input[4][..], &n.input[5][..]),
        ("", "", "c")
    );
    assert_packed(g, n, &reference(&w, k, cols, 16, true, true), k, cols);
    let x = rand(4 * k, 6);
    assert_equivalent_in_ort(&m, &o, &[("x", f32_tensor(&[4, k], &x))], 1e-5);
}

#[test]
fn quantize_weights_nbits_gemm_it_cannot_express_is_left_with_a_note() {
    // transA = 1 and a bias [1, N] are not MatMulNBits; opset 13 has no 4-bit DequantizeLinear.
    let w = rand(32 * 4, 7);
    let g = graph(
        vec![
            with_attrs(
                node("Gemm", "ta", &["xt", "w"], &["y1"]),
                vec![attr_i("transA", 1)],
            ),
            node("Gemm", "row_bias", &["x", "w2", "c"], &["y2"]),
        ],
        vec![
            vi("xt", DataType::Float, &[32, 2]),
            vi("x", DataType::Float, &[2, 32]),
        ],
        vec![
            vi("y1", DataType::Float, &[2, 4]),
            vi("y2", DataType::Float, &[2, 4]),
        ],
        vec![
            init("w", DataType::Float, &[32, 4], &w),
            init("w2", DataType::Float, &[32, 4], &w),
            init("c", DataType::Float, &[1, 4], &[0.5; 4]),
        ],
    );
    let (out, rec) = run(&model(13, g), &opts(QType::Int4, true, 32, false));
    assert!(nbits_nodes(main_graph(&out)).is_empty());
    let notes = rec.notes.join("\n");
    assert!(notes.contains("Gemm node \"ta\": transA = 1"), "{notes}");
    assert!(notes.contains("C is not a 1-D [4] initializer"), "{notes}");
    assert!(notes.contains("needs opset 21"), "{notes}");
    assert_eq!(rec.changes, 0);
    assert_eq!(
        opset(&out, "com.microsoft"),
        None,
        "no import when nothing is written"
    );
}

#[test]
fn quantize_weights_nbits_fp16_matmul_has_fp16_scales() {
    let (k, cols) = (64, 8);
    let w = rand(k * cols, 8);
    let g = graph(
        vec![node("MatMul", "mm", &["x", "w"], &["y"])],
        vec![vi("x", DataType::Float16, &[3, k as i64])],
        vec![vi("y", DataType::Float16, &[3, cols as i64])],
        vec![init("w", DataType::Float16, &[k as i64, cols as i64], &w)],
    );
    let m = model(17, g);
    let o = opts(QType::Int4, true, 32, false);
    let (out, _) = run(&m, &o);
    let g = main_graph(&out);
    let n = nbits_nodes(g)[0];
    let s = initializer(g, &n.input[2]);
    assert_eq!(
        s.data_type(),
        DataType::Float16 as i32,
        "scales in A's type"
    );
    // The reference of the float16-rounded weight.
    let w16: Vec<f32> = w.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    assert_packed(g, n, &reference(&w16, k, cols, 32, false, true), k, cols);
    let x: Vec<half::f16> = rand(3 * k, 9)
        .iter()
        .map(|v| half::f16::from_f32(*v))
        .collect();
    let x = TractTensor::from_shape(&[3, k], &x).unwrap();
    assert_equivalent_in_ort(&m, &o, &[("x", x)], 2e-2);
}

/// A weight MatMulNBits can take for one reader but not for another (an Add) is not packed:
/// the float weight would stay beside the packed copy and the file grow. It takes the regular
/// path: left in float below opset 21, one 4-bit DequantizeLinear copy for both readers at 21.
#[test]
fn quantize_weights_nbits_shared_weight_takes_the_regular_path() {
    let w = rand(32 * 4, 10);
    let g = graph(
        vec![
            node("MatMul", "mm", &["x", "w"], &["y"]),
            node("Add", "add", &["w", "b"], &["z"]),
        ],
        vec![
            vi("x", DataType::Float, &[2, 32]),
            vi("b", DataType::Float, &[32, 4]),
        ],
        vec![
            vi("y", DataType::Float, &[2, 4]),
            vi("z", DataType::Float, &[32, 4]),
        ],
        vec![init("w", DataType::Float, &[32, 4], &w)],
    );
    let o = opts(QType::Int4, true, 16, false);
    let x = rand(64, 11);
    let b = rand(128, 12);
    let inputs = [
        ("x", f32_tensor(&[2, 32], &x)),
        ("b", f32_tensor(&[32, 4], &b)),
    ];
    let m = model(13, g.clone());
    let (out, rec) = run(&m, &o);
    let og = main_graph(&out);
    assert_eq!(nbits_nodes(og).len(), 0);
    assert_eq!(
        floats(initializer(og, "w")),
        w,
        "left in float below opset 21"
    );
    assert!(
        rec.notes
            .iter()
            .any(|n| n.starts_with("weight 'w': 1 of its 2 readers can be MatMulNBits")),
        "{:?}",
        rec.notes
    );
    let m = model(21, g);
    let (out, _) = run(&m, &o);
    let og = main_graph(&out);
    assert_eq!(nbits_nodes(og).len(), 0);
    assert_eq!(
        og.node
            .iter()
            .filter(|n| n.op_type() == "DequantizeLinear")
            .count(),
        1
    );
    assert!(
        og.initializer.iter().all(|t| t.name() != "w"),
        "stored once"
    );
    let outs = ort(&m, &out, &inputs);
    assert!(outs[0].0 >= 0.99 && outs[1].0 >= 0.99, "{outs:?}");
    assert!(
        outs[1].1 > 0.0,
        "the Add reads the dequantized weight: {outs:?}"
    );
}

#[test]
fn quantize_weights_nbits_matmul_in_if_branch_reads_the_outer_weight() {
    // The then branch multiplies by the outer weight w; the else branch passes x through.
    let w = rand(32 * 4, 13);
    let then_g = pb::GraphProto {
        name: Some("then".into()),
        node: vec![node("MatMul", "branch_mm", &["x", "w"], &["t"])],
        output: vec![vi("t", DataType::Float, &[2, 4])],
        ..Default::default()
    };
    let else_g = pb::GraphProto {
        name: Some("else".into()),
        node: vec![node(
            "Slice",
            "cut",
            &["x", "starts", "ends", "axes"],
            &["e"],
        )],
        output: vec![vi("e", DataType::Float, &[2, 4])],
        ..Default::default()
    };
    let branch = |name: &str, g: pb::GraphProto| pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    };
    let iff = with_attrs(
        node("If", "if", &["cond"], &["y"]),
        vec![branch("then_branch", then_g), branch("else_branch", else_g)],
    );
    let ints = |name: &str, v: &[i64]| pb::TensorProto {
        name: Some(name.into()),
        data_type: Some(DataType::Int64 as i32),
        dims: vec![v.len() as i64],
        int64_data: v.to_vec(),
        ..Default::default()
    };
    let g = graph(
        vec![iff],
        vec![
            vi("cond", DataType::Bool, &[]),
            vi("x", DataType::Float, &[2, 32]),
        ],
        vec![vi("y", DataType::Float, &[2, 4])],
        vec![
            init("w", DataType::Float, &[32, 4], &w),
            ints("starts", &[0]),
            ints("ends", &[4]),
            ints("axes", &[1]),
        ],
    );
    let m = model(13, g);
    let o = opts(QType::Int4, true, 16, false);
    let (out, rec) = run(&m, &o);
    let g = main_graph(&out);
    let then_out = g.node[0]
        .attribute
        .iter()
        .find(|a| a.name() == "then_branch")
        .unwrap()
        .g
        .as_ref()
        .unwrap();
    let nodes = nbits_nodes(then_out);
    assert_eq!(nodes.len(), 1, "{then_out:?}");
    assert_eq!(nodes[0].output, vec!["t".to_string()]);
    // The packed weight lives in the main graph, read by the branch by name.
    assert_packed(g, nodes[0], &reference(&w, 32, 4, 16, false, true), 32, 4);
    assert!(
        g.initializer.iter().all(|t| t.name() != "w"),
        "float weight removed"
    );
    assert_eq!(rec.changes, 1, "{rec:?}");
    let x = rand(64, 14);
    let cond = TractTensor::from(true);
    assert_equivalent_in_ort(
        &m,
        &o,
        &[("cond", cond), ("x", f32_tensor(&[2, 32], &x))],
        1e-5,
    );
}
