//! `quantize_dynamic` on tiny graphs: the rewrite, the numbers in tract, and each case it must
//! leave alone with a note (opset below 11, float16 weights, already quantized models, weights
//! of an enclosing graph) without touching the interface.

use super::*;

const D: &str = "quantize_dynamic";

/// `y1 = MatMul(x, W1[16, 8])`, `y2 = Gemm(x, W2[8, 16], C[8], transB = 1)`, `y3 = x + x_quantized`:
/// one activation read by two quantizable nodes, and a graph input that already holds the name
/// the rewrite would pick first for the quantized activation.
fn matmul_and_gemm(opset: i64) -> pb::ModelProto {
    model(
        opset,
        graph(
            "g",
            vec![
                node("MatMul", "mm", &["x", "W1"], &["y1"], vec![]),
                node(
                    "Gemm",
                    "gemm",
                    &["x", "W2", "C"],
                    &["y2"],
                    vec![attr_i("transB", 1)],
                ),
                node("Add", "add", &["x", "x_quantized"], &["y3"], vec![]),
            ],
            vec![f32_info("x", &[2, 16]), f32_info("x_quantized", &[2, 16])],
            vec![out("y1"), out("y2"), out("y3")],
            vec![
                f32_init("W1", &[16, 8], &rand_f32(128, 21, 0.5)),
                f32_init("W2", &[8, 16], &rand_f32(128, 22, 0.5)),
                f32_init("C", &[8], &rand_f32(8, 23, 1.0)),
            ],
        ),
    )
}

fn matmul_inputs() -> [(&'static str, TractTensor); 2] {
    [
        ("x", tensor(&[2, 16], &rand_f32(32, 24, 2.0))),
        ("x_quantized", tensor(&[2, 16], &rand_f32(32, 25, 1.0))),
    ]
}

#[test]
fn dynamic_matmul_and_gemm_share_one_dynamic_quantize_and_match_in_tract() {
    let p = matmul_and_gemm(13);
    // The float weights become unused; the cleanup pass drops them.
    let r = run_passes(&p, &[D, "eliminate_unused_initializers"]);
    let g = r.g();
    assert_eq!(r.records[0].changes, 2, "{:?}", r.notes());
    assert_eq!(count(g, "DynamicQuantizeLinear"), 1, "{:?}", ops(g));
    assert_eq!(count(g, "MatMulInteger"), 2, "{:?}", ops(g));
    assert_eq!(count(g, "MatMul") + count(g, "Gemm"), 0, "{:?}", ops(g));
    // The outputs keep their names, produced by the rescaling (MatMul) and the bias Add (Gemm).
    assert_eq!(producer(g, "y1").unwrap().op_type(), "Mul");
    assert_eq!(producer(g, "y2").unwrap().op_type(), "Add");
    // The quantized activation got a fresh name: the graph input `x_quantized` is untouched.
    let dql = &nodes(g, "DynamicQuantizeLinear")[0];
    assert_eq!(dql.input, ["x"]);
    assert!(!dql.output.iter().any(|o| o == "x_quantized"), "{dql:?}");
    assert_eq!(node_named(g, "add").input, ["x", "x_quantized"]);
    // Both weights are int8 [K, N]: Gemm's [N, K] weight was transposed ahead of time, and its
    // per-channel scales run along N.
    for mmi in nodes(g, "MatMulInteger") {
        let w = init(g, &mmi.input[1]).unwrap();
        assert_eq!(w.data_type(), DataType::Int8 as i32);
        assert_eq!(w.dims, [16, 8], "{}", mmi.input[1]);
        assert_eq!(mmi.input[2], dql.output[2], "activation zero point");
    }
    let w2q = {
        let mmi = nodes(g, "MatMulInteger")
            .into_iter()
            .find(|n| n.input[1].starts_with("W2"))
            .unwrap();
        init(g, &mmi.input[1]).unwrap().raw_data.clone().unwrap()
    };
    let w2q: Vec<i8> = w2q.iter().map(|&b| b as i8).collect();
    // Entry [k, n] of the stored weight is W2[n, k] / scale[n], rounded: check column 3.
    let w2 = rand_f32(128, 22, 0.5);
    let row3 = &w2[3 * 16..4 * 16];
    let s3 = row3.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    for k in 0..16 {
        assert_eq!(
            w2q[k * 8 + 3],
            (row3[k] / s3).round_ties_even() as i8,
            "k {k}"
        );
    }
    assert!(init(g, "W1").is_none() && init(g, "W2").is_none());
    let c = assert_close_in_tract(&p, &r.proto, &matmul_inputs(), 0.999);
    assert_eq!(c.len(), 3);
    assert!(c[2] == 1.0, "the Add is not quantized: {c:?}");
}

#[test]
fn dynamic_below_opset_11_is_refused_naming_both_opsets() {
    let p = matmul_and_gemm(10);
    let (mut m, _) = crate::onnx::from_proto(p, None, "test").unwrap();
    let pass = by_name(D).unwrap();
    let e = run_pipeline(
        &mut m,
        &[pass],
        &PassOptions::default(),
        true,
        &crate::report::Silent,
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("opset 11") && msg.contains("opset 10") && msg.contains("weight-only"),
        "{msg}"
    );
}

#[test]
fn dynamic_conv_only_on_request_keeps_geometry_and_bias() {
    let p = model(
        13,
        graph(
            "g",
            vec![node(
                "Conv",
                "conv",
                &["x", "W", "B"],
                &["y"],
                vec![
                    attr_ints("pads", &[1, 1, 1, 1]),
                    attr_ints("strides", &[2, 2]),
                ],
            )],
            vec![f32_info("x", &[1, 3, 8, 8])],
            vec![out("y")],
            vec![
                f32_init("W", &[4, 3, 3, 3], &rand_f32(108, 31, 0.5)),
                f32_init("B", &[4], &[0.5, -1.0, 2.0, 0.0]),
            ],
        ),
    );
    let r = run_pass(&p, D);
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p, "Conv is left alone unless asked");

    let opts = PassOptions {
        conv_integer: true,
        ..Default::default()
    };
    let r = run_passes_with(&p, &[D], &opts);
    let g = r.g();
    assert_eq!(r.changes(), 1);
    let ci = &nodes(g, "ConvInteger")[0];
    assert_eq!(
        attr_of(ci, "pads").unwrap().ints,
        [1, 1, 1, 1],
        "geometry carried over"
    );
    assert_eq!(attr_of(ci, "strides").unwrap().ints, [2, 2]);
    // The bias is added after the rescaling, reshaped to broadcast along channels.
    let add = producer(g, "y").unwrap();
    assert_eq!(add.op_type(), "Add");
    let b = init(g, &add.input[1]).unwrap();
    assert_eq!(b.dims, [1, 4, 1, 1]);
    assert_eq!(values(b), [0.5, -1.0, 2.0, 0.0]);
    let x = [("x", tensor(&[1, 3, 8, 8], &rand_f32(192, 32, 1.0)))];
    assert_close_in_tract(&p, &r.proto, &x, 0.999);
}

#[test]
fn dynamic_leaves_float16_matmul_with_a_note() {
    let p = model(
        13,
        graph(
            "g",
            vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
            vec![info("x", DataType::Float16, &[2, 16])],
            vec![out("y")],
            vec![f16_init("W", &[16, 8], &rand_f32(128, 41, 0.5))],
        ),
    );
    let r = run_pass(&p, D);
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p);
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("'W' is float16") && notes.contains("weight-only"),
        "{notes}"
    );
}

#[test]
fn dynamic_leaves_an_already_quantized_model_alone() {
    // int8 W -> DequantizeLinear -> MatMul, and an existing MatMulInteger.
    let q: Vec<i8> = (0..128).map(|i| (i % 255 - 127) as i8).collect();
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
                    vec![attr_i("axis", 1)],
                ),
                node("MatMul", "mm", &["x", "W"], &["y"], vec![]),
                node(
                    "DynamicQuantizeLinear",
                    "dql",
                    &["x"],
                    &["xq", "xs", "xz"],
                    vec![],
                ),
                node("MatMulInteger", "mmi", &["xq", "Wq", "xz"], &["yi"], vec![]),
            ],
            vec![f32_info("x", &[2, 16])],
            vec![out("y"), out("yi")],
            vec![
                named("Wq", Tensor::from_i8(&[16, 8], &q)),
                f32_init("Ws", &[8], &[0.01; 8]),
            ],
        ),
    );
    let r = run_pass(&p, D);
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p);
}

#[test]
fn dynamic_weights_of_an_enclosing_graph_are_left_with_a_note() {
    // Both If branches read the outer Wm: they are not quantized, and each is named.
    let p = if_reading_outer_weights();
    let r = run_pass(&p, D);
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p);
    let notes = r.notes().join("\n");
    for mm in ["then_mm", "else_mm"] {
        assert!(
            notes
                .lines()
                .any(|l| l.contains(mm) && l.contains("'Wm' comes from an enclosing graph")),
            "{notes}"
        );
    }
}

#[test]
fn dynamic_matmul_with_its_own_weight_in_an_if_branch_is_quantized_there() {
    let p = if_with_branch_matmuls(16, 8, 51);
    let r = run_pass(&p, D);
    assert_eq!(r.changes(), 2, "{:?}", r.notes());
    let g = r.g();
    let mut new_names = Vec::new();
    for (b, out) in [("then_branch", "then_out"), ("else_branch", "else_out")] {
        let bg = branch(g, "if", b);
        assert_eq!(count(bg, "MatMulInteger"), 1, "{b}: {:?}", ops(bg));
        assert_eq!(count(bg, "MatMul"), 0, "{b}");
        assert_eq!(
            output_names(bg),
            [out],
            "{b}: branch outputs keep their names"
        );
        new_names.extend(bg.node.iter().flat_map(|n| n.output.clone()));
    }
    // The two branches quantize the same outer activation `x`: their new values get distinct
    // names (names are unique across the whole model, subgraphs included).
    let mut sorted = new_names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), new_names.len(), "{new_names:?}");
    for cond in [true, false] {
        let inputs = [
            ("cond", TractTensor::from(cond)),
            ("x", tensor(&[2, 16], &rand_f32(32, 53, 1.0))),
        ];
        assert_close_in_tract(&p, &r.proto, &inputs, 0.999);
    }
}

/// `reduce_range` (onnxruntime's option of the same name): every int8 weight lies in
/// [-64, 64] and each column's largest value reaches 64, so no pair of uint8 x int8 products
/// can exceed int16 in onnxruntime's u8 x s8 kernels; without it the columns reach 127. Both
/// notes say which, and the reduced model still computes the same thing in tract.
#[test]
fn dynamic_reduce_range_keeps_int8_weights_within_64() {
    let p = matmul_and_gemm(13);
    let largest = |r: &Ran| -> Vec<i32> {
        nodes(r.g(), "MatMulInteger")
            .iter()
            .map(|n| {
                let w = init(r.g(), &n.input[1]).unwrap();
                let raw = w.raw_data.as_ref().unwrap();
                raw.iter().map(|&b| i32::from(b as i8).abs()).max().unwrap()
            })
            .collect()
    };
    let full = run_passes(&p, &[D]);
    assert_eq!(largest(&full), [127, 127]);
    assert!(
        full.notes()
            .iter()
            .any(|n| n.contains("--reduce-range rules it out")),
        "{:?}",
        full.notes()
    );
    let opts = PassOptions {
        reduce_range: true,
        ..Default::default()
    };
    let reduced = run_passes_with(&p, &[D], &opts);
    assert_eq!(largest(&reduced), [64, 64]);
    assert!(
        reduced
            .notes()
            .iter()
            .any(|n| n.starts_with("--reduce-range: int8 weights in [-64, 64]")),
        "{:?}",
        reduced.notes()
    );
    let c = assert_close_in_tract(&p, &reduced.proto, &matmul_inputs(), 0.999);
    assert_eq!(c.len(), 3);
}

/// A lossy pass alone (no cleanup after it) leaves no float copy of the weights it replaced,
/// and says how many bytes that freed; an initializer the original model already left unread
/// is not the pass's to remove, and stays.
#[test]
fn dynamic_alone_removes_the_weights_it_replaced_and_nothing_else() {
    let mut p = matmul_and_gemm(13);
    p.graph
        .as_mut()
        .unwrap()
        .initializer
        .push(f32_init("unread", &[2], &[1.0, 2.0]));
    let r = run_passes(&p, &[D]);
    let g = r.g();
    assert!(
        init(g, "W1").is_none() && init(g, "W2").is_none(),
        "{:?}",
        init_names(g)
    );
    assert!(init(g, "unread").is_some(), "{:?}", init_names(g));
    assert!(init(g, "C").is_some(), "the bias is still read");
    assert!(
        r.notes().iter().any(|n| n
            == "2 float initializer(s) only the rewritten nodes read were removed (1024 bytes)"),
        "{:?}",
        r.notes()
    );
}

/// A weight also read by another node or as a graph output is left in float with a note: the
/// float copy would stay beside the int8 one and the file would grow. Weights read by the
/// quantized nodes only are still quantized.
#[test]
fn dynamic_leaves_a_weight_other_nodes_also_read_in_float() {
    let mut p = matmul_and_gemm(13);
    let g = p.graph.as_mut().unwrap();
    g.node.push(node(
        "ReduceSum",
        "wsum",
        &["W1"],
        &["w_sum"],
        vec![attr_i("keepdims", 0)],
    ));
    g.output.push(out("w_sum"));
    g.output.push(out("W2"));
    let r = run_passes(&p, &[D]);
    let g = r.g();
    assert_eq!(count(g, "MatMulInteger"), 0, "{:?}", ops(g));
    assert_eq!(node_named(g, "mm").op_type(), "MatMul");
    assert_eq!(node_named(g, "gemm").op_type(), "Gemm");
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("MatMul node \"mm\": weight 'W1' is also read by ReduceSum node \"wsum\"")
            && notes.contains("weight 'W2' is also read by a graph output")
            && notes.contains("store it twice"),
        "{notes}"
    );
    assert_eq!(
        prost::Message::encoded_len(&r.proto),
        prost::Message::encoded_len(&p),
        "nothing else changed"
    );
    // Without the other readers both are quantized.
    let r = run_passes(&matmul_and_gemm(13), &[D]);
    assert_eq!(count(r.g(), "MatMulInteger"), 2, "{:?}", ops(r.g()));
    // The site itself reading the weight as its activation too: MatMul(W, W).
    let w = rand_f32(64, 26, 0.5);
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("MatMul", "sq", &["W", "W"], &["s"], vec![]),
                node("MatMul", "mm", &["x", "W"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[2, 8])],
            vec![out("s"), out("y")],
            vec![f32_init("W", &[8, 8], &w)],
        ),
    );
    let r = run_passes(&p, &[D]);
    assert_eq!(count(r.g(), "MatMulInteger"), 0, "{:?}", ops(r.g()));
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("weight 'W' is also read by MatMul node \"sq\" (input 0)"),
        "{notes}"
    );
    // Read as [K, N] by a MatMul and as [N, K] by a Gemm with transB = 1: one int8 copy per
    // layout, noted.
    let p = model(
        13,
        graph(
            "g",
            vec![
                node("MatMul", "mm", &["x", "W"], &["y"], vec![]),
                node(
                    "Gemm",
                    "gemm",
                    &["x", "W"],
                    &["z"],
                    vec![attr_i("transB", 1)],
                ),
            ],
            vec![f32_info("x", &[2, 8])],
            vec![out("y"), out("z")],
            vec![f32_init("W", &[8, 8], &w)],
        ),
    );
    let r = run_passes(&p, &[D]);
    assert_eq!(count(r.g(), "MatMulInteger"), 2, "{:?}", ops(r.g()));
    assert!(init(r.g(), "W").is_none());
    assert!(
        r.notes()
            .iter()
            .any(|n| n.starts_with("weight 'W' is read as [K, N] by MatMul and as [N, K]")),
        "{:?}",
        r.notes()
    );
}
