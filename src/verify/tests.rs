//! Tests of running models in tract and of whole comparisons, on tiny graphs and on the real
//! models in `models/`.

use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::prelude::{Datum, Tensor};

use super::testutil::*;
use super::*;
use crate::pb;
use pb::tensor_proto::DataType;

fn f32s(t: &Tensor) -> Vec<f32> {
    slice::<f32>(t)
}

fn slice<T: Datum>(t: &Tensor) -> Vec<T> {
    t.try_as_plain_ram()
        .unwrap()
        .as_slice::<T>()
        .unwrap()
        .to_vec()
}

fn x23(v: f32) -> Vec<(String, Tensor)> {
    vec![("x".into(), Tensor::from_shape(&[2, 3], &[v; 6]).unwrap())]
}

#[test]
fn run_adds() {
    let m = add_model(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let out = run(&m, None, &x23(0.5)).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, "y");
    assert_eq!(f32s(&out[0].1), vec![1.5, 2.5, 3.5, 4.5, 5.5, 6.5]);
}

/// y = Relu(x), x float [batch, 3].
fn relu_batch_model() -> pb::ModelProto {
    model(
        vec![node("Relu", "relu", &["x"], &["y"], vec![])],
        vec![dims_info(
            "x",
            DataType::Float,
            &[Dim::P("batch"), Dim::N(3)],
        )],
        vec![out("y")],
        vec![],
    )
}

#[test]
fn run_takes_concrete_shapes_from_the_inputs_fed() {
    // x declared [batch, 3]; fed [4, 3].
    let m = relu_batch_model();
    let x = Tensor::from_shape(&[4, 3], &[-1.0f32; 12]).unwrap();
    let out = run(
        &m,
        None,
        &[("x".into(), x), ("unused".into(), Tensor::from(1.0f32))],
    )
    .unwrap();
    assert_eq!(out[0].1.shape(), &[4, 3]);
    assert!(f32s(&out[0].1).iter().all(|&v| v == 0.0));
}

#[test]
fn run_error_names_the_node_and_op() {
    let m = model(
        vec![
            node("Relu", "first", &["x"], &["r"], vec![]),
            node("NoSuchOp", "the_culprit", &["r"], &["y"], vec![]),
        ],
        vec![info("x", DataType::Float, &[2, 3])],
        vec![out("y")],
        vec![],
    );
    let err = run(&m, None, &x23(1.0)).unwrap_err();
    assert_eq!(err.node.as_deref(), Some("the_culprit"), "{err}");
    assert_eq!(err.op.as_deref(), Some("NoSuchOp"), "{err}");
    assert!(!err.panicked);
    assert!(err.to_string().contains("the_culprit"), "{err}");
}

#[test]
fn run_error_on_a_missing_input_and_a_broken_graph() {
    let m = add_model(&[0.0; 6]);
    let err = run(&m, None, &[]).unwrap_err();
    assert_eq!(err.stage, RunStage::Inputs);
    assert!(err.message.contains("`x`"), "{err}");

    // A node reads a value nothing defines.
    let m = model(
        vec![node("Add", "add", &["x", "ghost"], &["y"], vec![])],
        vec![info("x", DataType::Float, &[2, 3])],
        vec![out("y")],
        vec![],
    );
    let err = run(&m, None, &x23(1.0)).unwrap_err();
    assert_eq!(err.stage, RunStage::Load);
    assert!(err.message.contains("ghost"), "{err}");

    // Incompatible shapes are found while typing, at the node.
    let m = model(
        vec![node("MatMul", "mm", &["x", "w"], &["y"], vec![])],
        vec![info("x", DataType::Float, &[2, 3])],
        vec![out("y")],
        vec![init_f32("w", &[4, 2], &[0.0; 8])],
    );
    let err = run(&m, None, &x23(1.0)).unwrap_err();
    assert_eq!(err.stage, RunStage::Type, "{err}");
    assert_eq!(err.node.as_deref(), Some("mm"), "{err}");
    assert_eq!(err.op.as_deref(), Some("MatMul"), "{err}");
}

#[test]
fn run_error_on_a_model_without_graph() {
    let err = run(&pb::ModelProto::default(), None, &[]).unwrap_err();
    assert_eq!(err.stage, RunStage::Load);
}

/// A model whose tensors are in external data, given without a directory to read them from,
/// is an error naming the model, the tensor and its file (it was a "candidate failed" status
/// from tract); with the directory it is compared.
#[test]
fn external_data_without_a_directory_is_an_error_naming_the_tensor() {
    use pb::tensor_proto::DataLocation;
    let values: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let inline = add_model(&values);
    let mut external = inline.clone();
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("c.data"), &bytes).unwrap();
    {
        let c = &mut external.graph.as_mut().unwrap().initializer[0];
        c.float_data.clear();
        c.data_location = Some(DataLocation::External as i32);
        c.external_data = vec![pb::StringStringEntryProto {
            key: Some("location".into()),
            value: Some("c.data".into()),
        }];
    }
    let opts = InputOptions::default();
    let gates = Gates {
        atol: Some(0.0),
        ..Default::default()
    };
    let err = compare_models(&inline, None, &external, None, &opts, &gates).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("candidate model keeps tensor 'c' in external data ('c.data')")
            && msg.contains("cand_dir"),
        "{msg}"
    );
    assert!(!msg.contains("reference model"), "{msg}");
    let both = compare_models(&external, None, &external, None, &opts, &gates).unwrap_err();
    assert!(
        format!("{both:#}").contains("reference model")
            && format!("{both:#}").contains("candidate model"),
        "{both:#}"
    );
    let c = compare_models(&inline, None, &external, Some(dir.path()), &opts, &gates).unwrap();
    assert_eq!(c.status, Verification::Checked);
    assert_eq!(c.outputs[0].values.as_ref().unwrap().max_abs, 0.0);
}

#[test]
fn compare_models_checks_and_fails_gates() {
    let reference = add_model(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let candidate = add_model(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
    let opts = InputOptions {
        seed: 7,
        ..Default::default()
    };

    let same = compare_models(
        &reference,
        None,
        &reference,
        None,
        &opts,
        &Gates {
            atol: Some(0.0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(same.status, Verification::Checked);
    assert_eq!(same.outputs[0].values.as_ref().unwrap().max_abs, 0.0);
    assert_eq!(same.inputs[0].name, "x");
    assert_eq!(same.inputs[0].shape, vec![2, 3]);

    let gates = Gates {
        atol: Some(1e-3),
        rtol: Some(1e-3),
        min_cosine: Some(0.999),
        max_accuracy_drop: None,
        ..Default::default()
    };
    let c = compare_models(&reference, None, &candidate, None, &opts, &gates).unwrap();
    assert_eq!(c.status, Verification::Failed);
    let v = c.outputs[0].values.as_ref().unwrap();
    assert!((v.max_abs - 0.5).abs() < 1e-12);
    assert_eq!(v.worst_index, vec![1, 2]);
    assert_eq!(c.failures.len(), 1, "{:?}", c.failures);
    assert_eq!(c.failures[0].gate, GateKind::Allclose);
    assert_eq!(c.failures[0].index, vec![1, 2]);

    let table = format_table(&c);
    assert!(table.starts_with("FAILED"), "{table}");
    assert!(table.contains("FAIL allclose"), "{table}");
    assert!(table.contains("output `y`"), "{table}");
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["status"]["status"], "failed");
    assert_eq!(json["failures"][0]["index"], serde_json::json!([1, 2]));
}

/// A float16 output (an fp16 result without keep_io_types) where the reference goes beyond
/// 65504 is inf there whatever its layers compute in: a note says so, naming the value.
#[test]
fn a_float16_output_beyond_its_range_gets_a_note() {
    let scaled = |cast: bool| {
        let mut nodes = vec![node("Mul", "scale", &["x", "k"], &["m"], vec![])];
        nodes.push(if cast {
            node("Cast", "to_f16", &["m"], &["y"], vec![attr_i("to", 10)])
        } else {
            node("Identity", "same", &["m"], &["y"], vec![])
        });
        model(
            nodes,
            vec![info("x", DataType::Float, &[2, 3])],
            vec![out("y")],
            vec![init_f32("k", &[], &[1e6])],
        )
    };
    let opts = InputOptions {
        values: vec![("x".into(), 0.5)],
        ..Default::default()
    };
    let c = compare_models(
        &scaled(false),
        None,
        &scaled(true),
        None,
        &opts,
        &Gates {
            min_cosine: Some(0.99),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.status, Verification::Failed, "{}", format_table(&c));
    assert!(
        c.notes
            .iter()
            .any(|n| n.starts_with("output `y` is float16 in the candidate")
                && n.contains("5.000e5")),
        "{:?}",
        c.notes
    );
}

#[test]
fn compare_models_reports_unverified_and_candidate_failures() {
    let good = add_model(&[0.0; 6]);
    let mut bad = add_model(&[0.0; 6]);
    if let Some(g) = bad.graph.as_mut() {
        g.node[0].op_type = Some("NoSuchOp".into());
    }
    let opts = InputOptions::default();
    let c = compare_models(&bad, None, &good, None, &opts, &Gates::default()).unwrap();
    match &c.status {
        Verification::Unverified { reason, error } => {
            // It names the model tract could not run: the reference (it said "the model").
            assert!(
                reason.contains("`add`")
                    && reason.contains("NoSuchOp")
                    && reason.starts_with("tract could not type the reference model"),
                "{reason}"
            );
            assert_eq!(error.node.as_deref(), Some("add"));
        }
        other => panic!("{other:?}"),
    }
    assert!(c.outputs.is_empty());
    assert!(format_table(&c).starts_with("unverified: "));

    let c = compare_models(&good, None, &bad, None, &opts, &Gates::default()).unwrap();
    assert!(
        matches!(c.status, Verification::CandidateFailed { .. }),
        "{:?}",
        c.status
    );
    assert!(format_table(&c).starts_with("CANDIDATE FAILED: "));
}

#[test]
fn a_reference_run_once_compares_each_candidate_as_compare_models_does() {
    let reference = add_model(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let near = add_model(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
    let mut broken = add_model(&[0.0; 6]);
    if let Some(g) = broken.graph.as_mut() {
        g.node[0].op_type = Some("NoSuchOp".into());
    }
    let opts = InputOptions {
        seed: 3,
        ..Default::default()
    };
    let gates = Gates {
        atol: Some(1e-3),
        ..Default::default()
    };
    let (run, first) =
        crate::verify::Reference::run_beside(&reference, None, &near, None, &opts, &gates).unwrap();
    assert_eq!(
        first,
        compare_models(&reference, None, &near, None, &opts, &gates).unwrap()
    );
    assert_eq!(first.status, Verification::Failed);
    assert_eq!(run.inputs()[0].0, "x");
    assert_eq!(run.outputs().unwrap()[0].0, "y");
    // Later candidates, without running the reference again.
    assert_eq!(run.compare(&near, None, &gates), first);
    let same = run.compare(&reference, None, &gates);
    assert_eq!(same.status, Verification::Checked);
    assert_eq!(same.outputs[0].values.as_ref().unwrap().max_abs, 0.0);
    assert!(matches!(
        run.compare(&broken, None, &gates).status,
        Verification::CandidateFailed { .. }
    ));
    // A reference tract cannot run leaves every comparison unverified.
    let dead = crate::verify::Reference::run(&broken, None, &opts).unwrap();
    assert!(dead.outputs().is_none());
    assert!(matches!(
        dead.compare(&reference, None, &gates).status,
        Verification::Unverified { .. }
    ));
}

#[test]
fn compare_models_flags_a_missing_output() {
    let reference = add_model(&[0.0; 6]);
    let mut candidate = add_model(&[0.0; 6]);
    if let Some(g) = candidate.graph.as_mut() {
        g.node[0].output[0] = "z".into();
        g.output[0].name = Some("z".into());
    }
    let c = compare_models(
        &reference,
        None,
        &candidate,
        None,
        &InputOptions::default(),
        &Gates::default(),
    )
    .unwrap();
    assert_eq!(c.status, Verification::Failed);
    assert_eq!(c.failures[0].gate, GateKind::Comparable);
    assert!(c.notes.iter().any(|n| n.contains("`z`")), "{:?}", c.notes);
    assert!(format_table(&c).contains("missing in candidate"));
}

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn real_models() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(models_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    paths.sort();
    paths
}

fn load(path: &Path) -> pb::ModelProto {
    pb::ModelProto::decode(bytes::Bytes::from(std::fs::read(path).unwrap())).unwrap()
}

/// Every real model runs in tract on its bundled inputs and matches onnxruntime's outputs to
/// within 1e-3; silero-vad-16k-op15, whose If branches disagree on output rank, with its Ifs
/// resolved for the inputs.
#[test]
fn real_models_match_onnxruntime() {
    let paths = real_models();
    assert!(paths.len() >= 5, "{paths:?}");
    for path in paths {
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let model = load(&path);
        let bundle = inputs::load_npz(&path.with_extension("npz")).unwrap();
        let graph = model.graph.as_ref().unwrap();
        let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name()).collect();
        let fed: Vec<(String, Tensor)> = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(&i.name()))
            .map(|i| bundle.iter().find(|(n, _)| n == i.name()).unwrap().clone())
            .collect();
        let result = run(&model, path.parent(), &fed);
        let outputs = result.unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert_eq!(outputs.len(), graph.output.len());
        for (name, got) in &outputs {
            let expected = &bundle.iter().find(|(n, _)| n == name).unwrap().1;
            let m = metrics::compare(name, expected, got, None);
            let v = m
                .values
                .unwrap_or_else(|| panic!("{stem} `{name}`: {:?}", m.problem));
            eprintln!(
                "{stem} `{name}` {:?}: max abs {:.3e}, mean abs {:.3e}, cosine {:?}",
                got.shape(),
                v.max_abs,
                v.mean_abs,
                v.cosine
            );
            assert!(
                v.max_abs < 1e-3,
                "{stem} `{name}`: max abs {} at {:?}",
                v.max_abs,
                v.worst_index
            );
        }
    }
}

/// The comparison on a real model with generated inputs (magika's int32 bytes input).
#[test]
fn real_model_compared_with_itself_on_generated_inputs() {
    let path = models_dir().join("magika-standard-v3-3.onnx");
    let model = load(&path);
    let gates = Gates {
        atol: Some(0.0),
        rtol: Some(0.0),
        min_cosine: Some(1.0),
        max_accuracy_drop: None,
        ..Default::default()
    };
    let c = compare_models(
        &model,
        path.parent(),
        &model,
        path.parent(),
        &InputOptions::default(),
        &gates,
    )
    .unwrap();
    assert_eq!(c.status, Verification::Checked, "{}", format_table(&c));
    assert_eq!(c.inputs[0].shape, vec![1, 2048]);
    assert!(matches!(&c.inputs[0].source, InputSource::Random { high, .. } if *high == 255.0));
    assert!(
        c.notes.iter().any(|n| n.contains("unk__214")),
        "{:?}",
        c.notes
    );
    eprintln!("{}", format_table(&c));
}

#[test]
fn a_panic_inside_tract_becomes_a_run_error_naming_the_node() {
    // tract 0.23.9's Gather panics on an out-of-range index at run time.
    let m = gather_model(3);
    let ids = Tensor::from_shape(&[1, 5], &[0i64, 1, 2, 10, 0]).unwrap();
    let err = run(&m, None, &[("ids".into(), ids)]).unwrap_err();
    assert!(err.panicked, "{err}");
    assert_eq!(err.stage, RunStage::Run);
    assert_eq!(err.node.as_deref(), Some("gather"), "{err}");
    assert_eq!(err.op.as_deref(), Some("Gather"), "{err}");
    assert!(err.to_string().contains("tract panicked"), "{err}");
}

/// silero-vad-16k-op15, whose If branches disagree on output rank, is checked with its Ifs
/// resolved for the inputs, and the comparison says so.
#[test]
fn real_model_with_if_nodes_is_checked_on_the_branches_its_inputs_take() {
    let path = models_dir().join("silero-vad-16k-op15.onnx");
    let model = load(&path);
    let opts = InputOptions {
        npz: Some(path.with_extension("npz")),
        values: vec![("sr".into(), 16000.0)],
        ..Default::default()
    };
    let c = compare_models(
        &model,
        path.parent(),
        &model,
        path.parent(),
        &opts,
        &Gates::default(),
    )
    .unwrap();
    assert_eq!(c.status, Verification::Checked, "{}", format_table(&c));
    assert_eq!(c.inputs.len(), 3);
    assert_eq!(c.inputs[2].source, InputSource::Value { value: 16000.0 });
    assert!(
        c.notes.iter().any(|n| n.contains("If nodes were resolved")),
        "{:?}",
        c.notes
    );
    assert_eq!(c.outputs.len(), 2);
    assert!(c
        .outputs
        .iter()
        .all(|o| o.values.as_ref().is_some_and(|v| v.max_abs == 0.0)));
}

/// An If whose condition is not one value (here three) cannot be resolved: it stays, and the
/// comparison is unverified, naming it.
#[test]
fn an_if_that_cannot_be_resolved_leaves_the_check_unverified_naming_it() {
    let mut m = if_model();
    let g = m.graph.as_mut().unwrap();
    g.node[0] = node("Greater", "positive", &["x", "zero_f"], &["cond"], vec![]);
    g.initializer.push(init_f32("zero_f", &[], &[0.0]));
    let opts = InputOptions::default();
    let c = compare_models(&m, None, &m, None, &opts, &Gates::default()).unwrap();
    match &c.status {
        Verification::Unverified { reason, error } => {
            assert_eq!(error.node.as_deref(), Some("outer_if"), "{reason}");
            assert_eq!(error.op.as_deref(), Some("If"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// A graph attribute holding `g`.
/// Node names that tract would repeat, which ONNX allows (node names and value names are
/// apart): a node named like the graph input it reads, an unnamed node whose output is
/// another node's name, a node named like an initializer, and a branch node named like the
/// outer value it reads. tract refused them ("duplicate name for node"), so such models could
/// not be checked, compared or calibrated.
#[test]
fn node_names_that_repeat_other_names_run_in_tract() {
    let if_node = node(
        "If",
        "branch",
        &["k"],
        &["y2"],
        vec![
            attr_g(
                "then_branch",
                branch(
                    "then",
                    vec![node("Neg", "c", &["c"], &["t1"], vec![])],
                    vec![],
                    "t1",
                ),
            ),
            attr_g(
                "else_branch",
                branch(
                    "else",
                    vec![node("Identity", "c", &["c"], &["t2"], vec![])],
                    vec![],
                    "t2",
                ),
            ),
        ],
    );
    let m = model(
        vec![
            node("Relu", "x", &["x"], &["a"], vec![]),
            node("Neg", "", &["a"], &["abs"], vec![]),
            node("Abs", "abs", &["abs"], &["c"], vec![]),
            node("Add", "W", &["c", "W"], &["y"], vec![]),
            node("Cast", "cast", &["one"], &["k"], vec![attr_i("to", 9)]),
            if_node,
        ],
        vec![info("x", DataType::Float, &[2, 3])],
        vec![out("y"), out("y2")],
        vec![init_f32("W", &[], &[10.0]), init_i64("one", &[], &[1])],
    );
    let x = Tensor::from_shape(&[2, 3], &[-1.0f32, 2.0, -3.0, 4.0, 0.5, 0.0]).unwrap();
    let out = run(&m, None, &[("x".into(), x)]).unwrap();
    assert_eq!(f32s(&out[0].1), vec![10.0, 12.0, 10.0, 14.0, 10.5, 10.0]);
    assert_eq!(f32s(&out[1].1), vec![-0.0, -2.0, -0.0, -4.0, -0.5, -0.0]);
}

/// A Conv whose optional bias is `""` (valid ONNX, which onnxruntime runs and exporters write)
/// runs in tract, in the main graph and in an If branch, and so do nodes whose optional
/// outputs are `""`: tract panicked on it ("index out of
/// bounds"), so no mode could check such a model and static mode could not calibrate it.
#[test]
fn an_empty_optional_input_at_the_end_runs_in_tract() {
    let conv = |out_: &str| {
        node(
            "Conv",
            &format!("conv_{out_}"),
            &["x", "w", ""],
            &[out_],
            vec![],
        )
    };
    let if_node = node(
        "If",
        "branch",
        &["k"],
        &["y2"],
        vec![
            attr_g(
                "then_branch",
                branch("then", vec![conv("t1")], vec![], "t1"),
            ),
            attr_g(
                "else_branch",
                branch(
                    "else",
                    vec![node("Neg", "neg", &["y"], &["t2"], vec![])],
                    vec![],
                    "t2",
                ),
            ),
        ],
    );
    let m = model(
        vec![
            conv("y"),
            node("Cast", "cast", &["one"], &["k"], vec![attr_i("to", 9)]),
            if_node,
        ],
        vec![info("x", DataType::Float, &[1, 1, 2, 2])],
        vec![out("y"), out("y2")],
        vec![
            init_f32("w", &[2, 1, 1, 1], &[2.0, -1.0]),
            init_i64("one", &[], &[1]),
        ],
    );
    let x = Tensor::from_shape(&[1, 1, 2, 2], &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let ran = run(&m, None, &[("x".into(), x.clone())]).unwrap();
    let want = vec![2.0, 4.0, 6.0, 8.0, -1.0, -2.0, -3.0, -4.0];
    assert_eq!(f32s(&ran[0].1), want);
    assert_eq!(f32s(&ran[1].1), want);
    // Optional outputs left out with "": MaxPool's indices, Dropout's mask ("Wrong number of
    // outputs").
    let m = model(
        vec![
            node(
                "MaxPool",
                "mp",
                &["x"],
                &["p", ""],
                vec![attr_ints("kernel_shape", &[2, 2])],
            ),
            node("Dropout", "drop", &["p"], &["y", ""], vec![]),
        ],
        vec![info("x", DataType::Float, &[1, 1, 2, 2])],
        vec![out("y")],
        vec![],
    );
    let ran = run(&m, None, &[("x".into(), x)]).unwrap();
    assert_eq!(f32s(&ran[0].1), vec![4.0]);
    // A Split makes as many parts as it has outputs, "" ones included: dropping its "" made
    // tract run a one-part split ([2, 6], not [2, 3]) and the check pass on it. tract cannot
    // run it with the "": an error, never the wrong shape.
    let m = model(
        vec![node(
            "Split",
            "split",
            &["x"],
            &["a", ""],
            vec![attr_i("axis", 1)],
        )],
        vec![info("x", DataType::Float, &[2, 6])],
        vec![out("a")],
        vec![],
    );
    let x = Tensor::from_shape(&[2, 6], &[0f32; 12]).unwrap();
    if let Ok(ran) = run(&m, None, &[("x".into(), x)]) {
        assert_eq!(ran[0].1.shape(), &[2, 3]);
    }
}

/// Unseeded random ops draw the same numbers in the reference and the candidate (a seed made
/// from the output's name), so a model compared with itself checks (it failed, cosine 0.76);
/// two such ops still draw different numbers, and a seeded one keeps its seed.
#[test]
fn unseeded_random_ops_draw_the_same_numbers_in_both_models() {
    let m = model(
        vec![
            node(
                "RandomUniform",
                "r1",
                &[],
                &["u1"],
                vec![attr_ints("shape", &[2, 3])],
            ),
            node(
                "RandomUniform",
                "r2",
                &[],
                &["u2"],
                vec![attr_ints("shape", &[2, 3])],
            ),
            node("Add", "add", &["x", "u1"], &["y"], vec![]),
            node("Add", "add2", &["x", "u2"], &["y2"], vec![]),
        ],
        vec![info("x", DataType::Float, &[2, 3])],
        vec![out("y"), out("y2")],
        vec![],
    );
    let c = compare_models(
        &m,
        None,
        &m,
        None,
        &InputOptions::default(),
        &Gates {
            atol: Some(0.0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.status, Verification::Checked, "{c:#?}");
    let x = Tensor::from_shape(&[2, 3], &[0f32; 6]).unwrap();
    let ran = run(&m, None, &[("x".into(), x)]).unwrap();
    assert_ne!(f32s(&ran[0].1), f32s(&ran[1].1));
    assert!(f32s(&ran[0].1).iter().all(|v| (0.0..1.0).contains(v)));
    // The seed survives a rename of the op's output (eliminate_identity makes the random op
    // write the graph output): it comes from the node's name (it came from the output's, and
    // the check of that exact cleanup failed, cosine 0.13).
    let random = |out_: &str| {
        node(
            "RandomNormal",
            "noise",
            &[],
            &[out_],
            vec![attr_ints("shape", &[2, 3])],
        )
    };
    let with_identity = model(
        vec![random("r"), node("Identity", "id", &["r"], &["y"], vec![])],
        vec![],
        vec![out("y")],
        vec![],
    );
    let cleaned = model(vec![random("y")], vec![], vec![out("y")], vec![]);
    let c = compare_models(
        &with_identity,
        None,
        &cleaned,
        None,
        &InputOptions::default(),
        &Gates {
            atol: Some(0.0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.status, Verification::Checked, "{c:#?}");
}

/// Calls of local functions run in tract (inlined into its copy; tract stopped at them,
/// "Unimplemented"): attributes given by the call or defaulted by the function, nested calls,
/// two calls of one function, a call in an If branch, a function output the call leaves out.
#[test]
fn local_functions_run_in_tract() {
    use pb::attribute_proto::AttributeType as A;
    let call = |f: &str, name: &str, x: &str, y: &[&str], alpha: Option<f32>| {
        let mut n = node(f, name, &[x], y, vec![]);
        n.domain = Some("my".into());
        if let Some(a) = alpha {
            n.attribute.push(pb::AttributeProto {
                name: Some("alpha".into()),
                r#type: Some(A::Float as i32),
                f: Some(a),
                ..Default::default()
            });
        }
        n
    };
    let opsets = |my: bool| {
        let mut v = vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }];
        if my {
            v.push(pb::OperatorSetIdProto {
                domain: Some("my".into()),
                version: Some(1),
            });
        }
        v
    };
    // Scale(a) -> (b, c): b = a * alpha (default 2), c = a + b.
    let mut k = node("Constant", "k", &[], &["k"], vec![]);
    k.attribute.push(pb::AttributeProto {
        name: Some("value_float".into()),
        ref_attr_name: Some("alpha".into()),
        r#type: Some(A::Float as i32),
        ..Default::default()
    });
    let scale = pb::FunctionProto {
        name: Some("Scale".into()),
        domain: Some("my".into()),
        input: vec!["a".into()],
        output: vec!["b".into(), "c".into()],
        attribute_proto: vec![pb::AttributeProto {
            name: Some("alpha".into()),
            r#type: Some(A::Float as i32),
            f: Some(2.0),
            ..Default::default()
        }],
        node: vec![
            k,
            node("Mul", "mul", &["a", "k"], &["b"], vec![]),
            node("Add", "add", &["a", "b"], &["c"], vec![]),
        ],
        opset_import: opsets(false),
        ..Default::default()
    };
    // Twice(a) -> b: Scale(alpha 3) then Scale (default 2): b = 6a.
    let twice = pb::FunctionProto {
        name: Some("Twice".into()),
        domain: Some("my".into()),
        input: vec!["a".into()],
        output: vec!["b".into()],
        node: vec![
            call("Scale", "s1", "a", &["t"], Some(3.0)),
            call("Scale", "s2", "t", &["b"], None),
        ],
        opset_import: opsets(true),
        ..Default::default()
    };
    let if_node = node(
        "If",
        "branch",
        &["cond"],
        &["y4"],
        vec![
            attr_g(
                "then_branch",
                branch(
                    "then",
                    vec![call("Scale", "s_then", "x", &["t4", "c4"], None)],
                    vec![],
                    "c4",
                ),
            ),
            attr_g(
                "else_branch",
                branch(
                    "else",
                    vec![node("Neg", "neg", &["x"], &["n4"], vec![])],
                    vec![],
                    "n4",
                ),
            ),
        ],
    );
    let mut m = model(
        vec![
            call("Twice", "tw1", "x", &["y1"], None),
            call("Twice", "tw2", "y1", &["y2"], None),
            call("Scale", "s3", "x", &["y3"], Some(-1.0)),
            node("Cast", "cast", &["one"], &["cond"], vec![attr_i("to", 9)]),
            if_node,
        ],
        vec![info("x", DataType::Float, &[2])],
        vec![out("y1"), out("y2"), out("y3"), out("y4")],
        vec![init_i64("one", &[], &[1])],
    );
    m.ir_version = Some(10);
    m.opset_import = opsets(true);
    m.functions = vec![scale, twice];
    let x = Tensor::from_shape(&[2], &[1.0f32, -2.0]).unwrap();
    let ran = run(&m, None, &[("x".into(), x)]).unwrap();
    let got: Vec<Vec<f32>> = ran.iter().map(|(_, t)| f32s(t)).collect();
    assert_eq!(
        got,
        vec![
            vec![6.0, -12.0],
            vec![36.0, -72.0],
            vec![-1.0, 2.0],
            vec![3.0, -6.0],
        ]
    );
    // Only tract's copy changes.
    let mut copy = m.clone();
    assert_eq!(
        inline::inline_local_functions(&mut copy),
        (2 * 3 + 1 + 1, vec![])
    );
    assert!(copy
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .all(|n| n.domain() != "my"));
}

/// A nested call's prefix extends its caller's, so a caller's body value could be named like
/// the nested body's (`inner/inlined2/t` under `call/inlined1/`): tract's copy had two
/// producers of one name and computed another function (cosine 0.956 against onnxruntime's
/// values). Names given to a body are now reserved before nested calls pick prefixes; and a
/// call that stays is refused with its reason.
#[test]
fn inlined_names_never_collide_and_calls_left_say_why() {
    let local = |op: &str, name: &str, inputs: &[&str], outputs: &[&str]| {
        let mut n = node(op, name, inputs, outputs, vec![]);
        n.domain = Some("local".into());
        n
    };
    let opsets = vec![
        pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        },
        pb::OperatorSetIdProto {
            domain: Some("local".into()),
            version: Some(1),
        },
    ];
    let function = |name: &str, nodes: Vec<pb::NodeProto>| pb::FunctionProto {
        name: Some(name.into()),
        domain: Some("local".into()),
        input: vec!["x".into()],
        output: vec!["y".into()],
        node: nodes,
        opset_import: opsets.clone(),
        ..Default::default()
    };
    let inner = function(
        "Inner",
        vec![
            node("Neg", "", &["x"], &["t"], vec![]),
            node("Exp", "", &["t"], &["y"], vec![]),
        ],
    );
    let outer = function(
        "Outer",
        vec![
            local("Inner", "inner", &["x"], &["a"]),
            node("Sigmoid", "", &["x"], &["inner/inlined2/t"], vec![]),
            node("Add", "", &["a", "inner/inlined2/t"], &["y"], vec![]),
        ],
    );
    let mut m = model(
        vec![local("Outer", "call", &["x"], &["y"])],
        vec![info("x", DataType::Float, &[3])],
        vec![out("y")],
        vec![],
    );
    m.opset_import = opsets.clone();
    m.functions = vec![outer, inner];
    let xs = [-1.0f32, 0.0, 2.0];
    let x = Tensor::from_shape(&[3], &xs).unwrap();
    let ran = run(&m, None, &[("x".into(), x.clone())]).unwrap();
    let want: Vec<f32> = xs
        .iter()
        .map(|v| (-v).exp() + 1.0 / (1.0 + (-v).exp()))
        .collect();
    for (g, w) in f32s(&ran[0].1).iter().zip(&want) {
        assert!((g - w).abs() < 1e-6, "{:?} vs {want:?}", f32s(&ran[0].1));
    }
    // A function calling itself stays a call: refused, naming the user's node and why.
    let mut looped = m.clone();
    looped.functions[1].node = vec![local("Inner", "again", &["x"], &["y"])];
    let err = run(&looped, None, &[("x".into(), x)]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("local function `Inner` (local) called by the body of node \"call\"")
            && msg.contains("it calls itself"),
        "{msg}"
    );
}

fn attr_g(name: &str, g: pb::GraphProto) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(pb::attribute_proto::AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    }
}

fn branch(
    name: &str,
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    out_: &str,
) -> pb::GraphProto {
    pb::GraphProto {
        name: Some(name.into()),
        node: nodes,
        initializer: inits,
        output: vec![out(out_)],
        ..Default::default()
    }
}

/// `t = If(cond)`, named `inner_if`: then `-x`, else `x`.
fn neg_or_keep_if(cond: &str, x: &str) -> pb::NodeProto {
    let one = |name: &str, op: &str, out_: &str| {
        branch(
            name,
            vec![node(op, name, &[x], &[out_], vec![])],
            vec![],
            out_,
        )
    };
    node(
        "If",
        "inner_if",
        &[cond],
        &["t"],
        vec![
            attr_g("then_branch", one("neg", "Neg", "t_neg")),
            attr_g("else_branch", one("keep", "Identity", "t_keep")),
        ],
    )
}

/// silero-vad's shape at opset 15: `y = If(sr > 0)` whose branches differ in shape (then:
/// x [1, 3, 1] squeezed to [1, 3], negated when `sr > 10000` by a nested If; else: `2 x`,
/// still [1, 3, 1]), which tract refuses to type unresolved.
fn if_model() -> pb::ModelProto {
    let inner = neg_or_keep_if("big", "sq");
    let then_b = branch(
        "then",
        vec![
            node("Squeeze", "squeeze", &["x", "axes"], &["sq"], vec![]),
            node("Greater", "greater", &["sr", "k10"], &["big"], vec![]),
            inner,
        ],
        vec![init_i64("axes", &[1], &[2])],
        "t",
    );
    let else_b = branch(
        "else",
        vec![node("Mul", "double", &["x", "two"], &["e"], vec![])],
        vec![init_f32("two", &[], &[2.0])],
        "e",
    );
    model(
        vec![
            node("Greater", "positive", &["sr", "zero"], &["cond"], vec![]),
            node(
                "If",
                "outer_if",
                &["cond"],
                &["y"],
                vec![attr_g("then_branch", then_b), attr_g("else_branch", else_b)],
            ),
        ],
        vec![
            info("x", DataType::Float, &[1, 3, 1]),
            info("sr", DataType::Int64, &[]),
        ],
        vec![out("y")],
        vec![init_i64("k10", &[], &[10000]), init_i64("zero", &[], &[0])],
    )
}

fn if_inputs(sr: i64) -> Vec<(String, Tensor)> {
    let x = Tensor::from_shape(&[1, 3, 1], &[1.0f32, -2.0, 3.0]).unwrap();
    vec![("x".into(), x), ("sr".into(), Tensor::from(sr))]
}

#[test]
fn tract_runs_if_nodes_whose_branches_differ_by_resolving_them_for_the_inputs() {
    let m = if_model();
    // Both levels resolved: then, then inner then.
    let y = run(&m, None, &if_inputs(16000)).unwrap();
    assert_eq!(y[0].0, "y");
    assert_eq!(y[0].1.shape(), &[1, 3]);
    assert_eq!(f32s(&y[0].1), [-1.0, 2.0, -3.0]);
    // Then, inner else.
    let y = run(&m, None, &if_inputs(8000)).unwrap();
    assert_eq!(y[0].1.shape(), &[1, 3]);
    assert_eq!(f32s(&y[0].1), [1.0, -2.0, 3.0]);
    // Else.
    let y = run(&m, None, &if_inputs(-1)).unwrap();
    assert_eq!(y[0].1.shape(), &[1, 3, 1]);
    assert_eq!(f32s(&y[0].1), [2.0, -4.0, 6.0]);

    // The resolved model names the taken branch's nodes and keeps the interface.
    let resolved = super::specialize::inline_ifs(&m, None, &if_inputs(16000)).unwrap();
    let g = resolved.graph.as_ref().unwrap();
    let ops: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
    assert_eq!(
        ops,
        ["Greater", "Squeeze", "Greater", "Neg", "Identity", "Identity"]
    );
    assert_eq!(g.node[4].name(), "inner_if/taken_0");
    assert_eq!(g.node[5].name(), "outer_if/taken_0");
    assert!(g.initializer.iter().any(|t| t.name() == "axes"));
    assert_eq!(g.output[0].name(), "y");
    // Nothing to resolve: no copy.
    assert!(super::specialize::inline_ifs(&add_model(&[0.0; 6]), None, &[]).is_none());
}

#[test]
fn one_resolver_plans_each_outcome_once_and_tells_outcomes_apart() {
    let m = if_model();
    let mut r = super::specialize::IfResolver::new(&m, None).unwrap();
    let (a, ka) = r.resolve(&if_inputs(16000));
    let (b, kb) = r.resolve(&if_inputs(32000)); // another value, same branches
    let (_, kc) = r.resolve(&if_inputs(8000)); // inner else
    assert_eq!(ka, vec![Some(true), Some(true)]);
    assert_eq!(ka, kb);
    assert!(
        std::sync::Arc::ptr_eq(&a, &b),
        "the outcome's model is made once"
    );
    assert_eq!(kc, vec![Some(true), Some(false)]);
    let (_, kd) = r.resolve(&if_inputs(-1));
    assert_eq!(kd, vec![Some(false)]);
    // Calibration's runner: one plan per outcome, the right branch each time.
    let mut runner = crate::quant::calibrate::Runner::new(&m, true).unwrap();
    for (sr, want) in [
        (16000, vec![-1.0f32, 2.0, -3.0]),
        (-1, vec![2.0, -4.0, 6.0]),
        (8000, vec![1.0, -2.0, 3.0]),
    ] {
        let out = runner.run(&if_inputs(sr)).unwrap();
        assert_eq!(f32s(&out[0]), want, "sr {sr}");
    }
}

/// Two Ifs of one name whose branches define the same names (sibling scopes may): both are
/// resolved, the second's names renamed.
#[test]
fn ifs_whose_branches_reuse_names_are_all_resolved() {
    let mut m = if_model();
    let g = m.graph.as_mut().unwrap();
    let mut twin = g.node[1].clone();
    twin.output = vec!["y2".into()];
    g.node.push(twin);
    g.output.push(out("y2"));
    for sr in [16000, 8000, -1] {
        let y = run(&m, None, &if_inputs(sr)).unwrap();
        assert_eq!(y.len(), 2);
        assert_eq!(y[0].1, y[1].1, "sr {sr}");
    }
    let resolved = super::specialize::inline_ifs(&m, None, &if_inputs(16000)).unwrap();
    let g = resolved.graph.as_ref().unwrap();
    assert!(g.node.iter().all(|n| n.op_type() != "If"));
    let mut names: Vec<&str> = g.node.iter().map(|n| n.name()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "node names are unique: {names:?}");
    assert!(g
        .node
        .iter()
        .any(|n| n.output.iter().any(|o| o == "sq/outer_if")));
}

/// The conditions of one round are computed together; when tract cannot compute one of them
/// (here an op of an unknown domain), the others are still resolved, each on its own.
#[test]
fn a_condition_tract_cannot_compute_does_not_hold_back_the_others() {
    let mut m = if_model();
    let g = m.graph.as_mut().unwrap();
    let mut mystery = node("Mystery", "mystery", &["sr"], &["c2"], vec![]);
    mystery.domain = Some("x.unknown".into());
    let mut twin = g.node[1].clone();
    twin.name = Some("twin_if".into());
    twin.input = vec!["c2".into()];
    twin.output = vec!["y2".into()];
    g.node.extend([mystery, twin]);
    g.output.push(out("y2"));
    m.opset_import.push(pb::OperatorSetIdProto {
        domain: Some("x.unknown".into()),
        version: Some(1),
    });
    for sr in [16000, -1] {
        let resolved = super::specialize::inline_ifs(&m, None, &if_inputs(sr)).unwrap();
        let g = resolved.graph.as_ref().unwrap();
        let ifs: Vec<&str> = g
            .node
            .iter()
            .filter(|n| n.op_type() == "If")
            .map(|n| n.name())
            .collect();
        assert_eq!(ifs, ["twin_if"], "sr {sr}");
        assert!(
            g.node.iter().any(|n| n.name() == "outer_if/taken_0"),
            "sr {sr}"
        );
    }
}

/// A nested If whose condition reads the shape of a value the previous round's cone computed
/// (`Size(r)`, as exporters test shapes): its cone is cut at that value, fed as zeros of its
/// shape, and tract folds the condition to a constant; the whole cone is typed only in the
/// first round.
#[test]
fn a_nested_condition_on_a_shape_is_computed_from_the_cut_cone() {
    let inner = neg_or_keep_if("c2", "r");
    let then_b = branch(
        "then",
        vec![
            node("Size", "size_b", &["r"], &["n2"], vec![]),
            node("Greater", "greater", &["n2", "k"], &["c2"], vec![]),
            inner,
        ],
        vec![],
        "t",
    );
    let else_b = branch(
        "else",
        vec![node("Identity", "same", &["r"], &["e"], vec![])],
        vec![],
        "e",
    );
    let m = model(
        vec![
            node("Relu", "relu", &["x"], &["r"], vec![]),
            node("Size", "size", &["r"], &["n"], vec![]),
            node("Equal", "is_three", &["n", "three"], &["c1"], vec![]),
            node(
                "If",
                "outer_if",
                &["c1"],
                &["y"],
                vec![attr_g("then_branch", then_b), attr_g("else_branch", else_b)],
            ),
        ],
        vec![info("x", DataType::Float, &[1, -1, 1])],
        vec![out("y")],
        vec![init_i64("three", &[], &[3]), init_i64("k", &[], &[2])],
    );
    let x = |v: &[f32]| {
        vec![(
            "x".to_string(),
            Tensor::from_shape(&[1, v.len(), 1], v).unwrap(),
        )]
    };
    let mut r = super::specialize::IfResolver::new(&m, None).unwrap();
    let (_, key) = r.resolve(&x(&[1.0, -2.0, 3.0]));
    assert_eq!(key, vec![Some(true), Some(true)]);
    assert_eq!(r.whole_cones(), 1, "the second round ran its cut cone only");
    // Another shape: the outer else.
    let (_, key) = r.resolve(&x(&[1.0, -2.0]));
    assert_eq!(key, vec![Some(false)]);
    let y = run(&m, None, &x(&[1.0, -2.0, 3.0])).unwrap();
    assert_eq!(f32s(&y[0].1), [-1.0, 0.0, -3.0]);
}

/// A nested If whose condition reads the value (not the shape) of a value the previous
/// round's cone computed: tract cannot fold its cut cone, fed zeros, to a constant, so the
/// whole cone computes it, and each branch is the right one.
#[test]
fn a_nested_condition_on_a_value_is_not_taken_from_the_cut_cone() {
    let mut m = if_model();
    let g = m.graph.as_mut().unwrap();
    g.node
        .insert(0, node("Identity", "copy", &["sr"], &["sr_copy"], vec![]));
    g.node[1].input[0] = "sr_copy".into();
    let outer = &mut g.node[2];
    let then_b = outer.attribute[0].g.as_mut().unwrap();
    then_b.node[1].input[0] = "sr_copy".into();
    let mut r = super::specialize::IfResolver::new(&m, None).unwrap();
    assert_eq!(r.resolve(&if_inputs(16000)).1, vec![Some(true), Some(true)]);
    assert_eq!(r.resolve(&if_inputs(8000)).1, vec![Some(true), Some(false)]);
    assert_eq!(r.whole_cones(), 2);
    for (sr, want) in [(16000, [-1.0f32, 2.0, -3.0]), (8000, [1.0, -2.0, 3.0])] {
        let y = run(&m, None, &if_inputs(sr)).unwrap();
        assert_eq!(f32s(&y[0].1), want, "sr {sr}");
    }
}

/// `Equal(Shape(TopK(x, k))[0], 2)`: tract types the TopK output's dim as a symbol and folds
/// the comparison to false, whatever k is; onnxruntime gives true for k = 2. The run fails,
/// naming the node, instead of giving another value than the model's.
#[test]
fn a_comparison_of_a_dim_that_depends_on_the_data_is_not_trusted() {
    let m = model(
        vec![
            node("TopK", "topk", &["x", "k"], &["tv", "ti"], vec![]),
            node("Shape", "shape", &["tv"], &["s"], vec![]),
            node("Gather", "first", &["s", "zero"], &["n"], vec![]),
            node("Equal", "is_two", &["n", "two"], &["b"], vec![]),
            node("Cast", "to_float", &["b"], &["y"], vec![attr_i("to", 1)]),
        ],
        vec![
            info("x", DataType::Float, &[6]),
            info("k", DataType::Int64, &[1]),
        ],
        vec![out("y")],
        vec![init_i64("zero", &[], &[0]), init_i64("two", &[], &[2])],
    );
    let inputs = vec![
        (
            "x".to_string(),
            Tensor::from_shape(&[6], &[3.0f32, 1.0, 4.0, 1.0, 5.0, 9.0]).unwrap(),
        ),
        ("k".to_string(), Tensor::from_shape(&[1], &[2i64]).unwrap()),
    ];
    let err = run(&m, None, &inputs).unwrap_err();
    assert_eq!(err.stage, RunStage::Type, "{err}");
    assert_eq!(err.node.as_deref(), Some("is_two"), "{err}");
    assert!(err.message.contains("depends on the data"), "{err}");
    // As a candidate beside a reference tract computes (`y = Cast(k == 2)`), the check is
    // unverified: tract's limit says nothing of the candidate (it was "candidate failed").
    let mut reference = m.clone();
    let g = reference.graph.as_mut().unwrap();
    g.node.drain(..3);
    g.node[0].input[0] = "k".into();
    let opts = InputOptions {
        values: vec![("k".into(), 2.0)],
        ..Default::default()
    };
    let c = compare_models(&reference, None, &m, None, &opts, &Gates::default()).unwrap();
    assert!(
        matches!(&c.status, Verification::Unverified { reason, .. } if reason.contains("is_two")),
        "{:?}",
        c.status
    );
}

/// An If whose condition compares the shape of a NonZero output with a constant: tract would
/// fold it to a constant that is not the model's, so the If is not resolved, and the failure
/// of the run says why.
#[test]
fn an_if_on_a_dim_that_depends_on_the_data_is_left_and_the_failure_says_why() {
    let mut m = if_model();
    let g = m.graph.as_mut().unwrap();
    g.node[0] = node("Greater", "positive", &["x", "half"], &["pos"], vec![]);
    g.node.splice(
        1..1,
        [
            node("NonZero", "nonzero", &["pos"], &["nz"], vec![]),
            node("Shape", "shape", &["nz"], &["s"], vec![]),
            node("Gather", "count", &["s", "one"], &["n"], vec![]),
            node("Equal", "two_positive", &["n", "two"], &["cond"], vec![]),
        ],
    );
    g.initializer.extend([
        init_f32("half", &[], &[0.5]),
        init_i64("one", &[], &[1]),
        init_i64("two", &[], &[2]),
    ]);
    let inputs = if_inputs(16000); // x = [1, -2, 3]: two positive values
    assert!(super::specialize::inline_ifs(&m, None, &inputs).is_none());
    let err = run(&m, None, &inputs).unwrap_err();
    assert!(
        err.message.contains("an If condition was left: #")
            && err.message.contains("\"two_positive\" Equal"),
        "{err}"
    );
}

/// A malformed If (a branch missing, or a condition that is not bool) is not resolved: tract's
/// own error names it.
#[test]
fn malformed_ifs_are_left_for_tract_to_refuse() {
    let mut no_then = if_model();
    no_then.graph.as_mut().unwrap().node[1]
        .attribute
        .retain(|a| a.name() != "then_branch");
    let mut float_cond = if_model();
    let g = float_cond.graph.as_mut().unwrap();
    g.node[0] = node(
        "Cast",
        "to_float",
        &["sr"],
        &["cond"],
        vec![attr_i("to", 1)],
    );
    for (what, m) in [("no then_branch", no_then), ("float cond", float_cond)] {
        assert!(
            super::specialize::inline_ifs(&m, None, &if_inputs(-1)).is_none(),
            "{what}"
        );
        let err = run(&m, None, &if_inputs(-1)).unwrap_err();
        assert_eq!(err.node.as_deref(), Some("outer_if"), "{err}");
    }
}

#[test]
fn a_one_element_float_output_gets_a_note_that_its_cosine_is_blind() {
    let t = |v: &[f32]| Tensor::from_shape(&[1, v.len()], v).unwrap();
    let rows = vec![
        metrics::compare("p", &t(&[0.5]), &t(&[0.6]), None),
        metrics::compare("y", &t(&[0.5, 1.0]), &t(&[0.6, 1.0]), None),
    ];
    // 20% off, and the cosine still says 1.
    assert_eq!(rows[0].values.as_ref().unwrap().cosine, Some(1.0));
    // A tolerance of `p` gates it: no note.
    let gated = Gates {
        output_tolerances: vec![gate::OutputTolerance {
            output: "p".into(),
            tolerance: metrics::Tolerance {
                atol: 0.01,
                rtol: 0.0,
            },
        }],
        ..Default::default()
    };
    assert!(output_notes(&rows, &gated).is_empty());
    let notes = output_notes(&rows, &Gates::default());
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("output `p` has one element"),
        "{notes:?}"
    );
    assert!(notes[0].contains("2.000e-1 relative"), "{notes:?}");
    // Integer outputs have no cosine to be blind.
    let i = Tensor::from_shape(&[1], &[3i64]).unwrap();
    assert!(output_notes(&[metrics::compare("n", &i, &i, None)], &Gates::default()).is_empty());
    // An empty output: every gate holds with nothing compared, and a note says so.
    let e = Tensor::from_shape(&[0, 3], &[] as &[f32]).unwrap();
    let notes = output_notes(&[metrics::compare("e", &e, &e, None)], &Gates::default());
    assert_eq!(
        notes,
        ["output `e` is empty (shape [0, 3]): no value was compared; give inputs that make it non-empty (--inputs, --input-shape)"]
    );
}

/// y = Relu(x), x float [2, 3].
fn relu_model() -> pb::ModelProto {
    model(
        vec![node("Relu", "relu", &["x"], &["y"], vec![])],
        vec![info("x", DataType::Float, &[2, 3])],
        vec![out("y")],
        vec![],
    )
}

#[test]
fn an_input_folder_checks_every_file_and_names_the_sets_of_the_worst_figures() {
    let dir = tempfile::tempdir().unwrap();
    let x = |v: [f32; 6]| vec![("x".to_string(), Tensor::from_shape(&[2, 3], &v).unwrap())];
    // Relu changes nothing on the positive set, and halves the mixed one.
    inputs::save_npz(
        &dir.path().join("a_positive.npz"),
        &x([1., 2., 3., 4., 5., 6.]),
    )
    .unwrap();
    inputs::save_npz(
        &dir.path().join("b_mixed.npz"),
        &x([1., -1., 2., -2., 3., -3.]),
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a sample").unwrap();
    let opts = InputOptions {
        npz: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let gates = Gates {
        min_cosine: Some(0.99),
        ..Default::default()
    };
    let identity = add_model(&[0.0; 6]);
    let c = compare_models(&identity, None, &relu_model(), None, &opts, &gates).unwrap();
    assert_eq!(c.input_sets, vec!["a_positive.npz", "b_mixed.npz"]);
    let v = c.outputs[0].values.as_ref().unwrap();
    assert_eq!(v.elements, 12);
    assert_eq!(v.max_abs, 3.0);
    assert_eq!(v.worst_index, vec![1, 2]);
    assert_eq!(v.worst_set.as_deref(), Some("b_mixed.npz"));
    assert_eq!(v.mean_abs, 0.5); // (0 * 6 + (1 + 2 + 3)) / 12
                                 // b's cosine: 14 / sqrt(28 * 14); a's is 1.
    assert!((v.cosine.unwrap() - 0.5f64.sqrt()).abs() < 1e-6);
    assert_eq!(v.cosine_set.as_deref(), Some("b_mixed.npz"));
    assert_eq!(v.top1_agreement, Some(1.0));
    assert_eq!(c.status, Verification::Failed);
    assert!(c.failures[0]
        .message
        .contains("cosine 0.707107 on input set b_mixed.npz"));
    let table = format_table(&c);
    assert!(
        table.contains("over 2 input sets (a_positive.npz .. b_mixed.npz)"),
        "{table}"
    );
    assert!(table.contains("y: lowest cosine on b_mixed.npz, largest |a - b| on b_mixed.npz"));
    // The same folder with the positive file alone passes, as one set would.
    std::fs::remove_file(dir.path().join("b_mixed.npz")).unwrap();
    let one = compare_models(&identity, None, &relu_model(), None, &opts, &gates).unwrap();
    assert_eq!(one.status, Verification::Checked);
    assert!(one.input_sets.is_empty());
    let json = serde_json::to_string(&one).unwrap();
    assert!(
        !json.contains("input_sets") && !json.contains("cosine_set"),
        "{json}"
    );
}

#[test]
fn an_input_folder_reports_every_file_that_cannot_be_fed() {
    let dir = tempfile::tempdir().unwrap();
    let ok = vec![(
        "x".to_string(),
        Tensor::from_shape(&[2, 3], &[1f32; 6]).unwrap(),
    )];
    inputs::save_npz(&dir.path().join("a.npz"), &ok).unwrap();
    let wrong = vec![(
        "z".to_string(),
        Tensor::from_shape(&[2, 3], &[1f32; 6]).unwrap(),
    )];
    inputs::save_npz(&dir.path().join("b.npz"), &wrong).unwrap();
    std::fs::write(dir.path().join("c.npz"), b"truncated").unwrap();
    let opts = InputOptions {
        npz: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let m = add_model(&[0.0; 6]);
    let e = format!(
        "{:#}",
        compare_models(&m, None, &m, None, &opts, &Gates::default()).unwrap_err()
    );
    assert!(e.contains("2 of the 3 files in input folder"), "{e}");
    assert!(
        e.contains("b.npz") && e.contains("lacks graph input") && e.contains("c.npz"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let opts = InputOptions {
        npz: Some(empty.path().to_path_buf()),
        ..Default::default()
    };
    let e = compare_models(&m, None, &m, None, &opts, &Gates::default()).unwrap_err();
    assert!(e.to_string().contains("holds no .npz file"), "{e}");
}

#[test]
fn run_sets_gives_each_set_what_run_gives_it() {
    // x declared [batch, 3]: two sets of one shape share a plan, the third gets its own.
    let m = relu_batch_model();
    let set = |rows: usize, v: f32| {
        let data: Vec<f32> = (0..rows * 3).map(|i| v * (i as f32 - 2.0)).collect();
        vec![(
            "x".to_string(),
            Tensor::from_shape(&[rows, 3], &data).unwrap(),
        )]
    };
    let sets = [set(2, 1.0), set(2, -1.0), set(4, 0.5), vec![]];
    let refs: Vec<&[(String, Tensor)]> = sets.iter().map(|s| s.as_slice()).collect();
    let all = run_sets(&m, None, &refs);
    assert_eq!(all.len(), 4);
    for (s, (got, resolved)) in sets[..3].iter().zip(&all) {
        assert!(!resolved);
        assert_eq!(got.as_ref().unwrap(), &run(&m, None, s).unwrap());
    }
    assert_eq!(
        f32s(&all[1].0.as_ref().unwrap()[0].1),
        vec![2.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    );
    // A set without the input fails alone, at the input stage.
    assert_eq!(all[3].0.as_ref().unwrap_err().stage, RunStage::Inputs);
}

/// One resolver serves every set of `run_sets`: each set runs the branches its own inputs
/// take, as `run` gives it, and a malformed If is left for tract to refuse.
#[test]
fn run_sets_resolves_each_sets_if_nodes() {
    let m = if_model();
    let sets: Vec<_> = [16000, 8000, 32000, -1].map(if_inputs).into();
    let refs: Vec<&[(String, Tensor)]> = sets.iter().map(|s| s.as_slice()).collect();
    let all = run_sets(&m, None, &refs);
    for (s, (got, resolved)) in sets.iter().zip(&all) {
        assert!(resolved);
        assert_eq!(got.as_ref().unwrap(), &run(&m, None, s).unwrap());
    }
    assert_eq!(f32s(&all[2].0.as_ref().unwrap()[0].1), [-1.0, 2.0, -3.0]);
    assert_eq!(f32s(&all[1].0.as_ref().unwrap()[0].1), [1.0, -2.0, 3.0]);
    let mut no_then = if_model();
    no_then.graph.as_mut().unwrap().node[1]
        .attribute
        .retain(|a| a.name() != "then_branch");
    let (got, resolved) = &run_sets(&no_then, None, &refs[..1])[0];
    assert!(!resolved);
    assert_eq!(got.as_ref().unwrap_err().node.as_deref(), Some("outer_if"));
}

#[test]
fn a_candidate_with_float16_inputs_is_fed_the_same_values_cast_to_float16() {
    // fp16 conversion without keep_io_types: the candidate's interface is float16.
    let half = model(
        vec![node("Relu", "relu", &["x"], &["y"], vec![])],
        vec![info("x", DataType::Float16, &[2, 3])],
        vec![out("y")],
        vec![],
    );
    let opts = InputOptions {
        seed: 5,
        ..Default::default()
    };
    let gates = Gates {
        min_cosine: Some(0.9999),
        ..Default::default()
    };
    let (run, c) =
        crate::verify::Reference::run_beside(&relu_model(), None, &half, None, &opts, &gates)
            .unwrap();
    assert_eq!(c.status, Verification::Checked, "{}", format_table(&c));
    assert!(
        c.notes.iter().any(|n| n.contains("cast to that type")),
        "{:?}",
        c.notes
    );
    let v = c.outputs[0].values.as_ref().unwrap();
    assert!(
        v.max_abs > 0.0 && v.max_abs < 1e-3,
        "float16 rounding only: {}",
        v.max_abs
    );
    assert_eq!(
        run.compare(&half, None, &gates).status,
        Verification::Checked
    );
    // A float32 candidate gets no cast and no note.
    let same = run.compare(&relu_model(), None, &gates);
    assert!(same.notes.is_empty(), "{:?}", same.notes);
}

/// A float16 `Gemm(A, B, C)` (valid ONNX; onnxruntime runs it) fails to type in tract 0.23,
/// whose Gemm multiplies C by a float32 beta. tract runs it once split into Gemm + Add, with
/// exact values: x = [[1, 2]], B = [[1, 0, 2], [0, 1, -1]], C = [0.5, 0.25, -4] gives
/// [[1.5, 2.25, -4]] for the Cast(to float16) input and its Cast back, also inside an If
/// branch. A float32 Gemm with a bias is left as tract reads it.
#[test]
fn float16_gemm_with_a_bias_runs_in_tract() {
    let f16 = |name: &str, dims: &[i64], v: &[f32]| pb::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float16 as i32),
        raw_data: Some(
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        ..Default::default()
    };
    let gemm_in = |g: &str, cast_out: &str| {
        vec![
            node(
                "Cast",
                &format!("{g}_in"),
                &["x"],
                &[&format!("{g}_x16")],
                vec![attr_i("to", 10)],
            ),
            node(
                "Gemm",
                g,
                &[&format!("{g}_x16"), "B", "C"],
                &[&format!("{g}_y16")],
                vec![],
            ),
            node(
                "Cast",
                &format!("{g}_out"),
                &[&format!("{g}_y16")],
                &[cast_out],
                vec![attr_i("to", 1)],
            ),
        ]
    };
    let mut m = model(
        gemm_in("gemm", "y"),
        vec![info("x", DataType::Float, &[1, 2])],
        vec![out("y")],
        vec![
            f16("B", &[2, 3], &[1.0, 0.0, 2.0, 0.0, 1.0, -1.0]),
            f16("C", &[3], &[0.5, 0.25, -4.0]),
        ],
    );
    let x = vec![(
        "x".to_string(),
        Tensor::from_shape(&[1, 2], &[1f32, 2.0]).unwrap(),
    )];
    let ran = run(&m, None, &x).unwrap();
    assert_eq!(f32s(&ran[0].1), vec![1.5, 2.25, -4.0]);
    // The same Gemm inside an If branch.
    let branch = |name: &str, cast_out: &str| pb::GraphProto {
        name: Some(name.into()),
        node: gemm_in(&format!("{name}_gemm"), cast_out),
        output: vec![out(cast_out)],
        ..Default::default()
    };
    let g = m.graph.as_mut().unwrap();
    g.node = vec![node(
        "If",
        "if",
        &["cond"],
        &["y"],
        vec![
            pb::AttributeProto {
                name: Some("then_branch".into()),
                r#type: Some(pb::attribute_proto::AttributeType::Graph as i32),
                g: Some(branch("then", "t_y")),
                ..Default::default()
            },
            pb::AttributeProto {
                name: Some("else_branch".into()),
                r#type: Some(pb::attribute_proto::AttributeType::Graph as i32),
                g: Some(branch("else", "e_y")),
                ..Default::default()
            },
        ],
    )];
    g.input.push(info("cond", DataType::Bool, &[]));
    let mut xc = x.clone();
    xc.push(("cond".into(), Tensor::from(true)));
    let ran = run(&m, None, &xc).unwrap();
    assert_eq!(f32s(&ran[0].1), vec![1.5, 2.25, -4.0]);
    // alpha = 2, beta = 0.5 and transA = 1 (A is [2, 1]), with and without C.
    let attr_f = |name: &str, f: f32| pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(pb::attribute_proto::AttributeType::Float as i32),
        f: Some(f),
        ..Default::default()
    };
    let scaled = |inputs: &[&str]| {
        let mut nodes = gemm_in("gemm", "y");
        nodes[0].output = vec!["x16".into()];
        nodes[1] = node(
            "Transpose",
            "t",
            &["x16"],
            &["xt"],
            vec![pb::AttributeProto {
                name: Some("perm".into()),
                r#type: Some(pb::attribute_proto::AttributeType::Ints as i32),
                ints: vec![1, 0],
                ..Default::default()
            }],
        );
        nodes.insert(
            2,
            node(
                "Gemm",
                "gemm",
                inputs,
                &["gemm_y16"],
                vec![
                    attr_f("alpha", 2.0),
                    attr_f("beta", 0.5),
                    attr_i("transA", 1),
                ],
            ),
        );
        model(
            nodes,
            vec![info("x", DataType::Float, &[1, 2])],
            vec![out("y")],
            vec![
                f16("B", &[2, 3], &[1.0, 0.0, 2.0, 0.0, 1.0, -1.0]),
                f16("C", &[3], &[0.5, 0.25, -4.0]),
            ],
        )
    };
    // A * B = [1, 2, 0]: 2 * [1, 2, 0] + 0.5 * [0.5, 0.25, -4] and 2 * [1, 2, 0].
    let ran = run(&scaled(&["xt", "B", "C"]), None, &x).unwrap();
    assert_eq!(f32s(&ran[0].1), vec![2.25, 4.125, -2.0]);
    let ran = run(&scaled(&["xt", "B"]), None, &x).unwrap();
    assert_eq!(f32s(&ran[0].1), vec![2.0, 4.0, 0.0]);
    // float32 with a bias and beta = 0.5: tract's own Gemm.
    let m = model(
        vec![node(
            "Gemm",
            "gemm",
            &["x", "B", "C"],
            &["y"],
            vec![pb::AttributeProto {
                name: Some("beta".into()),
                r#type: Some(pb::attribute_proto::AttributeType::Float as i32),
                f: Some(0.5),
                ..Default::default()
            }],
        )],
        vec![info("x", DataType::Float, &[1, 2])],
        vec![out("y")],
        vec![
            init_f32("B", &[2, 3], &[1.0, 0.0, 2.0, 0.0, 1.0, -1.0]),
            init_f32("C", &[3], &[0.5, 0.25, -4.0]),
        ],
    );
    let ran = run(&m, None, &x).unwrap();
    assert_eq!(f32s(&ran[0].1), vec![1.25, 2.125, -2.0]);
}

/// tract's load errors name a node by its name, empty for an unnamed node: the message says
/// "an unnamed Constant node" rather than "node `` (Constant)".
#[test]
fn a_run_error_at_an_unnamed_node_says_so() {
    let e = RunError {
        stage: RunStage::Load,
        node: Some(String::new()),
        op: Some("Constant".into()),
        message: "Could not extract value out of Constant node".into(),
        panicked: false,
    };
    assert_eq!(
        e.to_string(),
        "tract could not load the model at an unnamed Constant node: Could not extract value out of Constant node"
    );
}

/// A sparse initializer (which tract does not read) is run as the dense tensor it stands for,
/// with linear indices and with coordinates: `y = x + spw`, spw [2, 3] holding 5 at [0, 1]
/// and 6 at [1, 2].
#[test]
fn a_sparse_initializer_runs_as_its_dense_tensor() {
    for (index_dims, indices) in [(vec![2], vec![1i64, 5]), (vec![2, 2], vec![0, 1, 1, 2])] {
        let mut m = model(
            vec![node("Add", "add", &["x", "spw"], &["y"], vec![])],
            vec![info("x", DataType::Float, &[2, 3])],
            vec![out("y")],
            vec![],
        );
        m.graph
            .as_mut()
            .unwrap()
            .sparse_initializer
            .push(pb::SparseTensorProto {
                values: Some(init_f32("spw", &[2], &[5.0, 6.0])),
                indices: Some(init_i64("spw_indices", &index_dims, &indices)),
                dims: vec![2, 3],
            });
        let out = run(&m, None, &x23(1.0)).unwrap();
        assert_eq!(
            f32s(&out[0].1),
            vec![1.0, 6.0, 1.0, 1.0, 1.0, 7.0],
            "indices {index_dims:?}"
        );
    }
}

/// Sparse float16 values stored the non-raw way (one per `int32_data` entry, as
/// onnx.helper.make_tensor writes them) run too; they were left sparse and unverified.
#[test]
fn sparse_float16_values_in_int32_data_run() {
    let mut m = model(
        vec![
            node("Cast", "cast", &["x"], &["x16"], vec![attr_i("to", 10)]),
            node("Add", "add", &["x16", "spw"], &["y"], vec![]),
        ],
        vec![info("x", DataType::Float, &[2, 3])],
        vec![out("y")],
        vec![],
    );
    let bits = |v: f32| i32::from(half::f16::from_f32(v).to_bits());
    m.graph
        .as_mut()
        .unwrap()
        .sparse_initializer
        .push(pb::SparseTensorProto {
            values: Some(pb::TensorProto {
                name: Some("spw".into()),
                dims: vec![2],
                data_type: Some(DataType::Float16 as i32),
                int32_data: vec![bits(5.0), bits(6.0)],
                ..Default::default()
            }),
            indices: Some(init_i64("spw_indices", &[2], &[1, 5])),
            dims: vec![2, 3],
        });
    let out = run(&m, None, &x23(1.0)).unwrap();
    let y: Vec<f32> = out[0]
        .1
        .cast_to::<f32>()
        .unwrap()
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec();
    assert_eq!(y, vec![1.0, 6.0, 1.0, 1.0, 1.0, 7.0]);
}
