//! `upgrade_opset`: models at opset 10 to 12 raised to 13 compute the same outputs in tract
//! and onnxruntime, and pass the onnx checker.

use super::*;

const U: &str = "upgrade_opset";

fn tensor_of(dims: &[usize], seed: u64) -> TractTensor {
    let n: usize = dims.iter().product();
    TractTensor::from_shape(dims, &rand_f32(n, seed, 2.0)).unwrap()
}

/// Every op that changes between opset 12 and 13, on x f32 [2, 3, 4], one also inside If
/// branches: Softmax at axis 1 (flattened before 13), LogSoftmax at -1, Squeeze / Unsqueeze /
/// ReduceSum with `axes` and Split with `split` attributes.
fn opset_12_model() -> pb::ModelProto {
    let then_g = graph(
        "then",
        vec![node(
            "Softmax",
            "then_softmax",
            &["x"],
            &["then_out"],
            vec![attr_i("axis", 0)],
        )],
        vec![],
        vec![f32_info("then_out", &[2, 3, 4])],
        vec![],
    );
    let else_g = graph(
        "else",
        vec![
            node(
                "Unsqueeze",
                "else_unsq",
                &["x"],
                &["else_u"],
                vec![attr_ints("axes", &[1])],
            ),
            node(
                "Squeeze",
                "else_sq",
                &["else_u"],
                &["else_out"],
                vec![attr_ints("axes", &[1])],
            ),
        ],
        vec![],
        vec![f32_info("else_out", &[2, 3, 4])],
        vec![],
    );
    model(
        12,
        graph(
            "g",
            vec![
                node(
                    "Softmax",
                    "softmax",
                    &["x"],
                    &["s1"],
                    vec![attr_i("axis", 1)],
                ),
                node(
                    "LogSoftmax",
                    "logsoftmax",
                    &["x"],
                    &["s2"],
                    vec![attr_i("axis", -1)],
                ),
                node(
                    "Unsqueeze",
                    "unsq",
                    &["x"],
                    &["u"],
                    vec![attr_ints("axes", &[0, 3])],
                ),
                node(
                    "Squeeze",
                    "sq",
                    &["u"],
                    &["q"],
                    vec![attr_ints("axes", &[0])],
                ),
                node(
                    "ReduceSum",
                    "rsum",
                    &["x"],
                    &["rs"],
                    vec![attr_ints("axes", &[1]), attr_i("keepdims", 0)],
                ),
                node(
                    "Split",
                    "split",
                    &["x"],
                    &["sp1", "sp2"],
                    vec![attr_i("axis", 2), attr_ints("split", &[1, 3])],
                ),
                // A reader of the Softmax output besides the graph output.
                node("Neg", "neg", &["s1"], &["n1"], vec![]),
                node(
                    "If",
                    "if",
                    &["cond"],
                    &["y"],
                    vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
                ),
            ],
            vec![info("cond", DataType::Bool, &[]), f32_info("x", &[2, 3, 4])],
            vec![
                f32_info("s1", &[2, 3, 4]),
                f32_info("s2", &[2, 3, 4]),
                f32_info("q", &[2, 3, 1, 4]),
                f32_info("rs", &[2, 4]),
                f32_info("sp1", &[2, 3, 1]),
                f32_info("sp2", &[2, 3, 3]),
                f32_info("n1", &[2, 3, 4]),
                f32_info("y", &[2, 3, 4]),
            ],
            vec![],
        ),
    )
}

fn opset_of(p: &pb::ModelProto) -> i64 {
    p.opset_import
        .iter()
        .find(|o| o.domain().is_empty())
        .unwrap()
        .version()
}

#[test]
fn upgrade_opset_12_rewrites_changed_ops_and_keeps_every_output() {
    let p = opset_12_model();
    let r = run_pass(&p, U);
    assert_eq!(opset_of(&r.proto), 13);
    let g = r.g();
    // Attributes became int64 inputs.
    for (op, name, want) in [
        ("Unsqueeze", "unsq", vec![0i64, 3]),
        ("Squeeze", "sq", vec![0]),
        ("ReduceSum", "rsum", vec![1]),
        ("Split", "split", vec![1, 3]),
    ] {
        let n = node_named(g, name);
        assert_eq!(n.op_type(), op);
        assert!(n
            .attribute
            .iter()
            .all(|a| a.name() != "axes" && a.name() != "split"));
        let t = Tensor::new(init(g, &n.input[1]).unwrap().clone());
        assert_eq!(t.to_i64().unwrap(), want, "{name}");
    }
    // Softmax at axis 1 runs on the input flattened at 1, then takes its shape back; the
    // LogSoftmax at -1 means the same at 13 and stays as it was.
    let sm = node_named(g, "softmax");
    assert_eq!(producer(g, &sm.input[0]).unwrap().op_type(), "Flatten");
    assert_eq!(attr_of(sm, "axis").and_then(|a| a.i), Some(-1));
    assert_eq!(producer(g, "s1").unwrap().op_type(), "Reshape");
    assert_eq!(node_named(g, "neg").input[0], "s1");
    assert_eq!(producer(g, "s2").unwrap().op_type(), "LogSoftmax");
    let then_g = branch(g, "if", "then_branch");
    assert_eq!(producer(then_g, "then_out").unwrap().op_type(), "Reshape");
    let else_g = branch(g, "if", "else_branch");
    assert_eq!(node_named(else_g, "else_sq").input.len(), 2);
    assert_onnx_checker_accepts(&r.proto, "upgraded");
    let x = tensor_of(&[2, 3, 4], 7);
    for cond in [true, false] {
        assert_close_in_tract(
            &p,
            &r.proto,
            &[("cond", TractTensor::from(cond)), ("x", x.clone())],
            0.999_999_9,
        );
        let rows = ort_cosines(
            &p,
            &r.proto,
            &[
                ("cond".to_string(), TractTensor::from(cond)),
                ("x".to_string(), x.clone()),
            ],
        );
        assert_eq!(rows.len(), 8);
        for row in rows {
            let c = row["cosine"].as_f64().unwrap();
            assert!(c >= 0.999_999_9, "onnxruntime: {row}");
        }
    }
    // Raised once: a second run changes nothing.
    let again = run_pass(&r.proto, U);
    assert_eq!(again.changes(), 0);
}

/// An empty `axes` list means every axis, as an absent one does: it is dropped, not made an
/// empty input, which tract reads as "no axis" (a ReduceSum reduced nothing, and the check
/// failed on a correct model).
#[test]
fn upgrade_opset_drops_an_empty_axes_list() {
    let p = model(
        12,
        graph(
            "g",
            vec![
                node(
                    "ReduceSum",
                    "rsum",
                    &["x"],
                    &["rs"],
                    vec![attr_ints("axes", &[])],
                ),
                node(
                    "Squeeze",
                    "sq",
                    &["x"],
                    &["q"],
                    vec![attr_ints("axes", &[])],
                ),
            ],
            vec![f32_info("x", &[2, 1, 3])],
            vec![f32_info("rs", &[1, 1, 1]), f32_info("q", &[2, 3])],
            vec![],
        ),
    );
    let r = run_pass(&p, U);
    assert_eq!(opset_of(&r.proto), 13);
    let g = r.g();
    for name in ["rsum", "sq"] {
        let n = node_named(g, name);
        assert_eq!(n.input.len(), 1, "{name}: {n:?}");
        assert!(n.attribute.iter().all(|a| a.name() != "axes"), "{name}");
    }
    assert_onnx_checker_accepts(&r.proto, "upgraded");
    let x = tensor_of(&[2, 1, 3], 9);
    assert_close_in_tract(&p, &r.proto, &[("x", x.clone())], 0.999_999_9);
    let rows = ort_cosines(&p, &r.proto, &[("x".to_string(), x)]);
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert!(
            row["cosine"].as_f64().unwrap() >= 0.999_999_9,
            "onnxruntime: {row}"
        );
    }
}

/// Opset 11: Dropout's `ratio` becomes an input (12); opset 10: Clip's `min` / `max` become
/// inputs (11).
#[test]
fn upgrade_opset_10_and_11_move_dropout_and_clip_attributes_to_inputs() {
    let clip = model(
        10,
        graph(
            "g",
            vec![node(
                "Clip",
                "clip",
                &["x"],
                &["y"],
                vec![attr_f("min", -0.5), attr_f("max", 0.75)],
            )],
            vec![f32_info("x", &[2, 3, 4])],
            vec![f32_info("y", &[2, 3, 4])],
            vec![],
        ),
    );
    let r = run_pass(&clip, U);
    assert_eq!(opset_of(&r.proto), 13);
    let n = node_named(r.g(), "clip");
    assert_eq!(n.input.len(), 3);
    assert!(n.attribute.is_empty());
    assert_eq!(values(init(r.g(), &n.input[1]).unwrap()), [-0.5]);
    assert_eq!(values(init(r.g(), &n.input[2]).unwrap()), [0.75]);
    let x = tensor_of(&[2, 3, 4], 3);
    assert_same_in_tract(&clip, &r.proto, &[("x", x.clone())]);
    assert_onnx_checker_accepts(&r.proto, "clip");

    let dropout = model(
        11,
        graph(
            "g",
            vec![
                node(
                    "Dropout",
                    "drop",
                    &["x"],
                    &["d"],
                    vec![attr_f("ratio", 0.3)],
                ),
                node("Softmax", "softmax", &["d"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[2, 3, 4])],
            vec![f32_info("y", &[2, 3, 4])],
            vec![],
        ),
    );
    let r = run_pass(&dropout, U);
    let n = node_named(r.g(), "drop");
    assert_eq!(values(init(r.g(), &n.input[1]).unwrap()), [0.3]);
    // Softmax without `axis` (1 by default) gets the flattened form.
    assert_eq!(producer(r.g(), "y").unwrap().op_type(), "Reshape");
    assert_close_in_tract(&dropout, &r.proto, &[("x", x)], 0.999_999_9);
    assert_onnx_checker_accepts(&r.proto, "dropout");
}

/// A model importing the default domain as `"ai.onnx"` has that import raised in place (a
/// second, `""` import was added beside it, so the opset never read 13, the pass ran 8
/// rounds and tract loaded the rewritten nodes at opset 12).
#[test]
fn upgrade_opset_raises_an_ai_onnx_import_in_place() {
    let mut p = model(
        12,
        graph(
            "g",
            vec![node(
                "Unsqueeze",
                "unsq",
                &["x"],
                &["y"],
                vec![attr_ints("axes", &[0])],
            )],
            vec![f32_info("x", &[2, 3])],
            vec![f32_info("y", &[1, 2, 3])],
            vec![],
        ),
    );
    p.opset_import[0].domain = Some("ai.onnx".into());
    let r = run_pass(&p, U);
    assert_eq!(r.proto.opset_import.len(), 1, "{:?}", r.proto.opset_import);
    assert_eq!(r.proto.opset_import[0].domain(), "ai.onnx");
    assert_eq!(r.proto.opset_import[0].version(), 13);
    assert_same_in_tract(&p, &r.proto, &[("x", tensor_of(&[2, 3], 5))]);
}

/// Clip-11 takes its bounds in the input's type: a float16 or double Clip gets float16 or
/// double bounds (they were float32, which the checker and onnxruntime refuse), and a Clip
/// whose input type no rule gives keeps the model at opset 10 with a note.
#[test]
fn upgrade_opset_10_gives_clip_bounds_the_input_type() {
    let clip = |dt: DataType, x: pb::ValueInfoProto| {
        model(
            10,
            graph(
                "g",
                vec![node(
                    "Clip",
                    "clip",
                    &["x"],
                    &["y"],
                    vec![attr_f("min", -0.5), attr_f("max", 0.75)],
                )],
                vec![x],
                vec![info("y", dt, &[2, 3])],
                vec![],
            ),
        )
    };
    for dt in [DataType::Float16, DataType::Double] {
        let p = clip(dt, info("x", dt, &[2, 3]));
        let r = run_pass(&p, U);
        assert_eq!(opset_of(&r.proto), 13);
        let n = node_named(r.g(), "clip");
        for bound in &n.input[1..] {
            assert_eq!(init(r.g(), bound).unwrap().data_type(), dt as i32, "{dt:?}");
        }
        assert_onnx_checker_accepts(&r.proto, "clip");
    }
    // The input's type unknown (a graph input without a type).
    let untyped = pb::ValueInfoProto {
        name: Some("x".into()),
        ..Default::default()
    };
    let r = run_pass(&clip(DataType::Float16, untyped), U);
    assert_eq!(opset_of(&r.proto), 10);
    assert!(
        r.notes()
            .iter()
            .any(|n| n.contains("the input type of Clip node \"clip\" is not known")),
        "{:?}",
        r.notes()
    );
    // A Clip in an If branch reading the (float16) graph input: typed from the enclosing
    // graph (it kept opset 10 as not known).
    let branch = |name: &str, op: &str, attrs: Vec<pb::AttributeProto>| {
        graph(
            name,
            vec![node(op, &format!("{name}_op"), &["x"], &[name], attrs)],
            vec![],
            vec![out(name)],
            vec![],
        )
    };
    let bounds = vec![attr_f("min", -0.5), attr_f("max", 0.75)];
    let p = model(
        10,
        graph(
            "g",
            vec![
                node("Cast", "cond", &["flag"], &["c"], vec![attr_i("to", 9)]),
                node(
                    "If",
                    "if",
                    &["c"],
                    &["y"],
                    vec![
                        attr_g("then_branch", branch("t", "Clip", bounds)),
                        attr_g("else_branch", branch("e", "Identity", vec![])),
                    ],
                ),
            ],
            vec![
                info("x", DataType::Float16, &[2, 3]),
                info("flag", DataType::Int64, &[]),
            ],
            vec![info("y", DataType::Float16, &[2, 3])],
            vec![],
        ),
    );
    let r = run_pass(&p, U);
    assert_eq!(opset_of(&r.proto), 13, "{:?}", r.notes());
    assert_onnx_checker_accepts(&r.proto, "clip-in-branch");
}

/// Opset 10 with an op whose opset-11 form this pass does not write (Pad), opset 13 and opset
/// 9: nothing changes; the first says why.
#[test]
fn upgrade_opset_leaves_what_it_cannot_raise_alone() {
    let pad = model(
        10,
        graph(
            "g",
            vec![node(
                "Pad",
                "pad",
                &["x"],
                &["y"],
                vec![attr_ints("pads", &[0, 1, 0, 1])],
            )],
            vec![f32_info("x", &[2, 3])],
            vec![out("y")],
            vec![],
        ),
    );
    let r = run_pass(&pad, U);
    assert_eq!(r.changes(), 0);
    assert_eq!(opset_of(&r.proto), 10);
    assert!(
        r.notes().iter().any(|n| n.contains("Pad \"pad\"")),
        "{:?}",
        r.notes()
    );
    for opset in [9, 13] {
        let mut p = opset_12_model();
        p.opset_import[0].version = Some(opset);
        let r = run_pass(&p, U);
        assert_eq!(r.changes(), 0);
        assert_eq!(opset_of(&r.proto), opset);
        // Below 10 a note says why (there was none); at 13 there is nothing to raise.
        let noted = r.notes().iter().any(|n| n.contains("opset 9 kept"));
        assert_eq!(noted, opset == 9, "{:?}", r.notes());
    }
}

/// What opset 13 removed or computes otherwise keeps the opset, with a note naming the node:
/// a Resize in `tf_half_pixel_for_nn` mode (gone from Resize-13; the raised model kept it) and
/// a Dropout whose mask is read (onnxruntime's Dropout-10/11 gives an all-false mask, its
/// Dropout-12 an all-true one: a graph output changed). A Dropout whose mask is not read, and
/// a Resize in another mode, are raised.
#[test]
fn upgrade_opset_keeps_what_opset_13_removed_or_changed() {
    let resize = |mode: &str| {
        model(
            11,
            graph(
                "g",
                vec![node(
                    "Resize",
                    "resize",
                    &["x", "roi", "scales"],
                    &["y"],
                    vec![
                        attr_s("mode", "nearest"),
                        attr_s("coordinate_transformation_mode", mode),
                    ],
                )],
                vec![f32_info("x", &[1, 1, 2, 2])],
                vec![out("y")],
                vec![
                    f32_init("roi", &[0], &[]),
                    f32_init("scales", &[4], &[1.0, 1.0, 2.0, 2.0]),
                ],
            ),
        )
    };
    let r = run_pass(&resize("tf_half_pixel_for_nn"), U);
    assert_eq!((r.changes(), opset_of(&r.proto)), (0, 11));
    let notes = r.notes().join("\n");
    assert!(
        notes.contains("opset 11 kept: Resize node \"resize\" uses coordinate_transformation_mode tf_half_pixel_for_nn"),
        "{notes}"
    );
    assert_eq!(opset_of(&run_pass(&resize("asymmetric"), U).proto), 13);

    let dropout = |opset: i64, mask_out: bool| {
        let outputs = if mask_out {
            vec![out("y"), out("mask")]
        } else {
            vec![out("y")]
        };
        model(
            opset,
            graph(
                "g",
                vec![node(
                    "Dropout",
                    "drop",
                    &["x"],
                    &["y", "mask"],
                    vec![attr_f("ratio", 0.3)],
                )],
                vec![f32_info("x", &[2, 3])],
                outputs,
                vec![],
            ),
        )
    };
    for opset in [10, 11] {
        let r = run_pass(&dropout(opset, true), U);
        assert_eq!(opset_of(&r.proto), opset);
        let notes = r.notes().join("\n");
        assert!(
            notes.contains("Dropout node \"drop\" has its mask read"),
            "{notes}"
        );
        assert_eq!(opset_of(&run_pass(&dropout(opset, false), U).proto), 13);
    }
    // Opset 12's Dropout already has the new behaviour.
    assert_eq!(opset_of(&run_pass(&dropout(12, true), U).proto), 13);
}
