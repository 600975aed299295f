//! `optimize`, `compare` and `list-passes` end to end on the real models in `models/`.
//!
//! Every optimized model must be written, pass the onnx checker with `full_check`, run in
//! onnxruntime (the deployment target) with cosine >= 0.999 per float output against the
//! original (reference run with onnxruntime's optimizations off), and its JSON report must show
//! the same in tract. Each model is optimized once (ppocrv4-rec takes over a minute in a debug
//! build) and every assertion reads that one result.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// The node tract stops at in `make_bad.py tract-cannot-run` (an op of a custom domain).
const UNVERIFIABLE_NODE: &str = "frobnicate";
/// Models whose optimized file must be at least 3.5x smaller than the original.
const SHRINK_3_5X: &[&str] = &["ppocrv4-rec", "magika-standard-v3-3"];
/// The cosine every float output must reach, in tract and in onnxruntime.
const MIN_COSINE: f64 = 0.999;

fn model(stem: &str) -> PathBuf {
    repo().join("models").join(format!("{stem}.onnx"))
}

/// Runs `onnxopt ARGS` with a timeout long enough for the slowest model in a debug build on a
/// busy machine.
fn onnxopt_slow(args: &[OsString]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("NO_COLOR", "1");
    run_cmd(cmd, Duration::from_secs(1200))
}

fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()))
}

/// `onnxopt optimize models/STEM.onnx -o DIR/STEM.onnx --inputs models/STEM.npz --report
/// DIR/STEM.json [extra...]`; returns the run, the output path and the report path.
fn optimize(stem: &str, dir: &Path, extra: &[&str]) -> (Run, PathBuf, PathBuf) {
    let m = model(stem);
    let out = dir.join(format!("{stem}.onnx"));
    let report = dir.join(format!("{stem}.json"));
    let mut args = os(&[
        &"optimize",
        &m,
        &"-o",
        &out,
        &"--inputs",
        &m.with_extension("npz"),
        &"--report",
        &report,
    ]);
    args.extend(extra.iter().map(OsString::from));
    (onnxopt_slow(&args), out, report)
}

/// The rows of tests/py/ort_cosine.py: the original (optimizations off) and `optimized` run in
/// onnxruntime on the model's npz bundle.
fn ort_cosines(stem: &str, optimized: &Path) -> Result<Vec<Value>, String> {
    let m = model(stem);
    let npz = m.with_extension("npz");
    let r = py(
        "ort_cosine.py",
        &[m.as_os_str(), optimized.as_os_str(), npz.as_os_str()],
    );
    if !r.ok() {
        return Err(r.describe());
    }
    let v: Value = serde_json::from_str(&r.stdout)
        .map_err(|e| format!("ort_cosine.py printed invalid JSON ({e}): {}", r.stdout))?;
    Ok(v["outputs"].as_array().cloned().unwrap_or_default())
}

/// Everything `optimize` must deliver on one real model; returns the problems found.
fn check_optimized(stem: &str) -> Vec<String> {
    let dir = tempdir();
    let (r, out, report_path) = optimize(stem, dir.path(), &[]);
    if !r.ok() {
        return vec![r.describe()];
    }
    let mut problems = Vec::new();

    // A valid ONNX model (shape inference included).
    let c = py("check.py", &[&out]);
    if !c.ok() {
        problems.push(format!("onnx checker: {}", c.describe()));
    }

    // Deploys: onnxruntime runs it and every float output stays within the cosine target.
    match ort_cosines(stem, &out) {
        Err(e) => problems.push(format!("onnxruntime: {e}")),
        Ok(rows) => {
            if rows.is_empty() {
                problems.push("onnxruntime: no outputs".into());
            }
            for row in rows {
                let name = &row["name"];
                if row["finite"] != true {
                    problems.push(format!("onnxruntime: output {name} holds NaN or infinity"));
                }
                match row["cosine"].as_f64() {
                    Some(c) if c >= MIN_COSINE => {}
                    Some(c) => problems.push(format!(
                        "onnxruntime: output {name}: cosine {c} < {MIN_COSINE}"
                    )),
                    None if row["equal"] == true => {}
                    None => problems.push(format!(
                        "onnxruntime: non-float output {name} differs: {row}"
                    )),
                }
            }
        }
    }

    // The report's tract check.
    let report = read_json(&report_path);
    let check = &report["check"];
    // `check.status` is the tagged verdict: {"status": "checked" | "failed" | ...}.
    let status = check["status"]["status"].as_str().unwrap_or("(none)");
    if status != "checked" {
        problems.push(format!("report: check status {status}: {check}"));
    }
    let outputs = check["outputs"].as_array().cloned().unwrap_or_default();
    if outputs.is_empty() {
        problems.push("report: the tract check compared no output".into());
    }
    for o in outputs {
        let name = &o["name"];
        match o["values"]["cosine"].as_f64() {
            Some(c) if c >= MIN_COSINE => {}
            Some(c) => problems.push(format!("tract: output {name}: cosine {c} < {MIN_COSINE}")),
            None => problems.push(format!("tract: output {name} has no cosine: {o}")),
        }
    }

    // Size.
    let before = fs::metadata(model(stem)).unwrap().len();
    let after = fs::metadata(&out).unwrap().len();
    let ratio = before as f64 / after as f64;
    println!("{stem}: {before} -> {after} bytes ({ratio:.2}x smaller)");
    if SHRINK_3_5X.contains(&stem) && ratio < 3.5 {
        problems.push(format!(
            "{before} -> {after} bytes is only {ratio:.2}x smaller (want >= 3.5x)"
        ));
    }

    // BatchNormalization folded away.
    if stem == "ppocr-mobile-v2-cls" {
        let counts = inspect_json(&out);
        let bn = counts["op_counts"]["BatchNormalization"]
            .as_u64()
            .unwrap_or(0);
        if bn != 0 {
            problems.push(format!(
                "{bn} BatchNormalization nodes left (fold_batchnorm should fold all 35)"
            ));
        }
    }
    problems
        .into_iter()
        .map(|p| format!("{stem}: {p}"))
        .collect()
}

fn assert_optimized(stem: &str) {
    let problems = check_optimized(stem);
    assert!(
        problems.is_empty(),
        "optimize {stem}:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn optimize_magika_standard_v3_3() {
    assert_optimized("magika-standard-v3-3");
}

#[test]
fn optimize_ppocr_mobile_v2_cls() {
    assert_optimized("ppocr-mobile-v2-cls");
}

#[test]
fn optimize_ppocrv4_rec() {
    assert_optimized("ppocrv4-rec");
}

#[test]
fn optimize_silero_vad_16k_op15() {
    assert_optimized("silero-vad-16k-op15");
}

#[test]
fn optimize_silero_vad_16k_sequence() {
    assert_optimized("silero-vad-16k-sequence");
}

/// Every model in models/ has one of the tests above.
#[test]
fn optimize_tests_cover_every_real_model() {
    let covered = [
        "magika-standard-v3-3",
        "ppocr-mobile-v2-cls",
        "ppocrv4-rec",
        "silero-vad-16k-op15",
        "silero-vad-16k-sequence",
    ];
    let found: Vec<String> = real_models().iter().map(|m| stem(m)).collect();
    assert_eq!(found, covered, "add a test per new model in models/");
}

/// A model tract cannot run (an op of a custom domain): the result is written, the exit code
/// is 3 and the report says unverified, naming the node once.
#[test]
fn optimize_unverifiable_model_exits_3_and_still_writes() {
    let dir = tempdir();
    let m = dir.path().join("custom.onnx");
    py("make_bad.py", &["tract-cannot-run".as_ref(), m.as_os_str()]).expect_ok();
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("report.json");
    let r = onnxopt_slow(&os(&[&"optimize", &m, &"-o", &out, &"--report", &report]));
    assert_eq!(r.code, Some(3), "expected exit 3: {}", r.describe());
    assert!(r.stderr.contains("UNVERIFIED"), "{}", r.describe());
    assert!(
        r.stderr.contains(UNVERIFIABLE_NODE),
        "stderr does not name the node {UNVERIFIABLE_NODE}: {}",
        r.describe()
    );
    // tract's reason once: in the report, not again in the closing warning.
    assert_eq!(
        r.stderr
            .lines()
            .filter(|l| l.contains(UNVERIFIABLE_NODE))
            .count(),
        1,
        "tract's reason is repeated: {}",
        r.describe()
    );
    assert!(
        out.exists(),
        "the optimized model was not written: {}",
        r.describe()
    );
    inspect_json(&out);
    assert_eq!(
        read_json(&report)["check"]["status"]["status"],
        "unverified"
    );
    // An --input-shape contradicting X's declared [4] is not blamed: the custom op fails
    // whatever the shapes (it was refused with exit 2).
    let r = onnxopt_slow(&os(&[
        &"optimize",
        &m,
        &"-o",
        &out,
        &"--input-shape",
        &"X:5",
    ]));
    assert_eq!(r.code, Some(3), "{}", r.describe());
}

/// An --input-shape that contradicts a fixed dim the graph declares, with which the model then
/// cannot run, is the user's input at fault: exit 2 naming the input and the dims, nothing
/// written (it was exit 3, "unverified", with the model written). A contradiction the model
/// runs with is a note only.
#[test]
fn optimize_input_shape_contradicting_the_graph_is_refused_when_the_model_cannot_run() {
    let dir = tempdir();
    let out = dir.path().join("out.onnx");
    // `optimize STEM -o OUT` with `--input-shape` for each of `shapes`.
    let optimize_with = |stem: &str, shapes: &[&str]| {
        let mut args = os(&[&"optimize", &model(stem), &"-o", &out]);
        for s in shapes {
            args.extend(os(&[&"--input-shape", s]));
        }
        onnxopt_slow(&args)
    };
    let refused = |r: &Run, what: &str| {
        assert_eq!(r.code, Some(2), "{}", r.describe());
        assert!(r.stderr.contains(what), "{what}: {}", r.describe());
    };
    let r = optimize_with("ppocr-mobile-v2-cls", &["x:1,4,32,100"]);
    refused(
        &r,
        "the model cannot run with the input shapes given (input `x`: --input-shape sets dim 1 to 4, the graph declares 3)",
    );
    assert!(!out.exists());
    // compare too (it was exit 3, or 0 with --allow-unverified, with nothing compared).
    let m = model("ppocr-mobile-v2-cls");
    let r = onnxopt_slow(&os(&[
        &"compare",
        &m,
        &m,
        &"--input-shape",
        &"x:1,4,32,100",
        &"--allow-unverified",
    ]));
    refused(&r, "the model cannot run with the input shapes given");
    // The same shape from an --inputs file (it was exit 3 with the model written).
    let npz = dir.path().join("four_channels.npz");
    let x = tract_onnx::prelude::Tensor::zero::<f32>(&[1, 4, 32, 100]).unwrap();
    onnxopt::verify::inputs::save_npz(&npz, &[("x".to_string(), x)]).unwrap();
    let r = onnxopt_slow(&os(&[&"optimize", &m, &"-o", &out, &"--inputs", &npz]));
    refused(
        &r,
        "the model cannot run with the input shapes given (input `x`: the shape [1, 4, 32, 100] of its array in",
    );
    assert!(!out.exists());
    // A shape the declared dims allow runs.
    let r = optimize_with("magika-standard-v3-3", &["bytes:2,2048"]);
    assert!(r.ok(), "{}", r.describe());
    // One input given two shapes: only one could be used.
    let r = optimize_with("magika-standard-v3-3", &["bytes:2,2048", "bytes:1,2048"]);
    refused(&r, "--input-shape names input(s) bytes more than once");
}

#[test]
fn optimize_no_check_writes_the_model_and_reports_no_check() {
    let dir = tempdir();
    let (r, out, report) = optimize("ppocr-mobile-v2-cls", dir.path(), &["--no-check"]);
    let r = r.expect_ok();
    assert!(out.exists(), "{}", r.describe());
    inspect_json(&out);
    let report = read_json(&report);
    assert!(
        report["check"].is_null(),
        "--no-check: the report's check is {}",
        report["check"]
    );
    assert_eq!(report["outcome"], "ok");
    // The check options given (here --inputs) are said to be ignored, and why.
    assert!(
        r.stderr.contains(
            "warning: check option(s) --inputs ignored: the check does not run (--no-check)"
        ) && r.stderr.contains("not checked (--no-check)"),
        "{}",
        r.describe()
    );
    // `--passes none` loads and saves only: it says so, not --no-check.
    let out = dir.path().join("none.onnx");
    let m = model("ppocr-mobile-v2-cls");
    let r = onnxopt_slow(&os(&[
        &"optimize",
        &m,
        &"-o",
        &out,
        &"--passes",
        &"none",
        &"--min-cosine",
        &"0.5",
    ]));
    assert!(r.ok(), "{}", r.describe());
    assert!(
        r.stderr.contains("check option(s) --min-cosine ignored: the check does not run (--passes none loads and saves only)")
            && r.stderr.contains("not checked (--passes none: loaded and saved only)"),
        "{}",
        r.describe()
    );
}

#[test]
fn optimize_unmet_gate_exits_1_and_says_the_model_was_written() {
    let dir = tempdir();
    let (r, out, report) = optimize(
        "ppocr-mobile-v2-cls",
        dir.path(),
        &["--min-cosine", "0.9999999", "--no-fallback"],
    );
    assert_eq!(r.code, Some(1), "expected exit 1: {}", r.describe());
    assert!(
        r.stderr.contains("still written") && r.stderr.contains(&out.display().to_string()),
        "stderr must say the model was still written, and where: {}",
        r.describe()
    );
    assert!(out.exists(), "{} was not written", out.display());
    inspect_json(&out);
    let report = read_json(&report);
    assert_eq!(report["outcome"], "gate_failed");
    assert_eq!(report["check"]["status"]["status"], "failed");
    assert!(
        report["fallback"].is_null(),
        "--no-fallback: {}",
        report["fallback"]
    );
}

/// The options that tune the static and dynamic passes reach them in `optimize` too (the
/// dynamic pass's own note recommends `--reduce-range`, which optimize refused), and are
/// refused, each named with its pass, when `--passes` runs none of those passes.
#[test]
fn optimize_takes_the_quantization_tuning_options_of_the_passes_it_runs() {
    let dir = tempdir();
    let (r, _, report) = optimize(
        "magika-standard-v3-3",
        dir.path(),
        &["--passes", "quantize_dynamic,cleanup", "--reduce-range"],
    );
    assert!(r.ok(), "{}", r.describe());
    let v = read_json(&report);
    let pass = pass_record(&v, "quantize_dynamic");
    assert!(pass["changes"].as_u64().unwrap() > 0, "{pass}");
    assert!(
        pass["notes"]
            .to_string()
            .contains("--reduce-range: int8 weights in [-64, 64]"),
        "{pass}"
    );
    let (r, _, _) = optimize(
        "magika-standard-v3-3",
        dir.path(),
        &[
            "--passes",
            "quantize_dynamic",
            "--reduce-range",
            "--all-layers",
            "--fallback-samples",
            "5",
        ],
    );
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert!(
        r.stderr.contains("--fallback-samples (the quantize_static pass), --all-layers (the quantize_static pass) apply to a pass that --passes quantize_dynamic does not run"),
        "{}",
        r.describe()
    );
}

/// `compare --json` of `a` and `b` on `a`'s npz bundle.
fn compare(a: &Path, b: &Path, npz: &Path, extra: &[&str]) -> Run {
    let mut args = os(&[&"compare", &a, &b, &"--inputs", &npz]);
    args.extend(extra.iter().map(OsString::from));
    onnxopt_slow(&args)
}

#[test]
fn compare_model_with_itself_is_exact() {
    let mut problems = Vec::new();
    for m in real_models() {
        let name = stem(&m);
        let npz = m.with_extension("npz");
        let r = compare(&m, &m, &npz, &["--json"]);
        if !r.ok() {
            problems.push(r.describe());
            continue;
        }
        let v: Value = match serde_json::from_str(&r.stdout) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{name}: invalid JSON ({e}): {}", r.stdout));
                continue;
            }
        };
        let outputs = v["outputs"].as_array().cloned().unwrap_or_default();
        if outputs.is_empty() {
            problems.push(format!("{name}: no output compared: {v}"));
        }
        for o in outputs {
            if o["values"]["max_abs"].as_f64() != Some(0.0) {
                problems.push(format!(
                    "{name}: output {} max abs {} (want 0)",
                    o["name"], o["values"]["max_abs"]
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "compare M M:\n  {}",
        problems.join("\n  ")
    );
}

/// `compare` prints the check's notes above its table (here: silero op15's If nodes were
/// resolved for the inputs).
#[test]
fn compare_prints_the_notes() {
    let m = model("silero-vad-16k-op15");
    let r = compare(&m, &m, &m.with_extension("npz"), &[]);
    assert!(r.ok(), "{}", r.describe());
    let note = r
        .stdout
        .find("note: the models' If nodes were resolved for these inputs")
        .unwrap_or_else(|| panic!("no note: {}", r.stdout));
    assert!(note < r.stdout.find("max abs").unwrap(), "{}", r.stdout);
}

/// Two models that do not take the same inputs cannot be compared: exit 2 naming the inputs
/// (it was exit 1, "CANDIDATE FAILED", as if an accuracy gate had failed).
#[test]
fn compare_refuses_models_that_take_other_inputs() {
    let cls = model("ppocr-mobile-v2-cls");
    let r = onnxopt_slow(&os(&[&"compare", &cls, &model("magika-standard-v3-3")]));
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert!(
        r.stderr
            .contains("graph input(s) `bytes` are not inputs of")
            && r.stderr.contains("(its inputs: `x`)"),
        "{}",
        r.describe()
    );
}

/// An input only the reference takes is fed to it alone, with a note (it went unsaid), and
/// an output that changed type says so in its row (it read "ok").
#[test]
fn compare_notes_an_input_only_the_reference_takes_and_a_changed_output_type() {
    use onnxopt::pb::{self, tensor_proto::DataType};
    let dir = tempdir();
    let info = |name: &str, elem: DataType| tensor_info(name, elem, &[2, 3]);
    let node = |op: &str, input: &str, output: &str, to: Option<DataType>| pb::NodeProto {
        name: Some(op.to_lowercase()),
        op_type: Some(op.into()),
        input: vec![input.into()],
        output: vec![output.into()],
        attribute: to
            .map(|t| pb::AttributeProto {
                name: Some("to".into()),
                r#type: Some(pb::attribute_proto::AttributeType::Int as i32),
                i: Some(t as i64),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let write = |file: &str, extra_input: bool, double: bool| {
        let mut nodes = vec![node("Relu", "x", "r", None)];
        nodes.push(if double {
            node("Cast", "r", "y", Some(DataType::Double))
        } else {
            node("Identity", "r", "y", None)
        });
        let mut input = vec![info("x", DataType::Float)];
        if extra_input {
            input.push(info("k", DataType::Float));
        }
        let out_type = if double {
            DataType::Double
        } else {
            DataType::Float
        };
        let proto = pb::ModelProto {
            ir_version: Some(8),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(13),
            }],
            graph: Some(pb::GraphProto {
                name: Some("g".into()),
                node: nodes,
                input,
                output: vec![info("y", out_type)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let path = dir.path().join(file);
        fs::write(&path, prost::Message::encode_to_vec(&proto)).unwrap();
        path
    };
    let with_k = write("with_k.onnx", true, false);
    let plain = write("plain.onnx", false, false);
    let double = write("double.onnx", false, true);
    let r = onnxopt_slow(&os(&[&"compare", &with_k, &plain]));
    assert!(r.ok(), "{}", r.describe());
    assert!(
        r.stdout.contains("note: graph input `k` of")
            && r.stdout.contains("it is fed to the reference alone"),
        "{}",
        r.describe()
    );
    let r = onnxopt_slow(&os(&[&"compare", &plain, &double]));
    assert!(r.ok(), "{}", r.describe());
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with("y "))
        .unwrap_or_default();
    assert!(row.ends_with("ok, dtype F32 -> F64"), "{}", r.describe());
}

#[test]
fn compare_detects_a_scaled_weight() {
    let dir = tempdir();
    let m = model("ppocr-mobile-v2-cls");
    let broken = dir.path().join("broken.onnx");
    let r = py("scale_weight.py", &[m.as_os_str(), broken.as_os_str()]).expect_ok();
    println!("scaled: {}", r.stdout.trim());
    let r = compare(&m, &broken, &m.with_extension("npz"), &[]);
    assert_eq!(r.code, Some(1), "expected exit 1: {}", r.describe());
    let output = "save_infer_model/scale_0.tmp_1";
    assert!(
        r.stdout.contains(output),
        "the failing output {output} is not in the table: stdout: {}\n{}",
        r.stdout,
        r.describe()
    );
    // The verdict and the first failure also go to stderr, as optimize and quantize give
    // them (stderr was empty).
    assert!(
        r.stderr
            .contains("error: the accuracy check failed (output `save_infer_model/scale_0.tmp_1`"),
        "{}",
        r.describe()
    );
}

#[test]
fn list_passes_lists_every_pass_file() {
    let mut files: Vec<String> = fs::read_dir(repo().join("src/passes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| stem(&p))
        .filter(|s| !["mod", "manager", "tests"].contains(&s.as_str()))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let r = onnxopt(&["list-passes"]).expect_ok();
    let listed: Vec<&str> = r
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&String> = files
        .iter()
        .filter(|f| !listed.contains(&f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "list-passes does not list {missing:?}:\n{}",
        r.stdout
    );
}

/// `--passes ""` or `--passes ,` names no pass: refused (exit 2) like an unknown pass, where
/// it ran nothing and checked the unchanged model.
#[test]
fn an_empty_pass_list_is_refused() {
    let m = model("ppocr-mobile-v2-cls");
    let out = tempdir().path().join("o.onnx");
    for spec in ["", ",", " , "] {
        let r = onnxopt(&os(&[&"optimize", &m, &"-o", &out, &"--passes", &spec]));
        assert_eq!(r.code, Some(2), "{spec:?}: {}", r.describe());
        assert!(r.stderr.contains("--passes names no pass"), "{}", r.stderr);
        assert!(!out.exists());
    }
}

/// A gate value that cannot be met or means nothing (NaN, a negative tolerance, a cosine
/// above 1, a drop above 1, a tolerance of an output the model does not have, two tolerances
/// for one output, no calibration sample) is refused with exit 2, naming the option and what
/// it takes; a negative value is read as a value, also without `=`.
#[test]
fn impossible_gate_values_are_refused() {
    let m = model("ppocr-mobile-v2-cls");
    let out = "save_infer_model/scale_0.tmp_1";
    let two = [format!("{out}:0.1"), format!("{out}:0.2")];
    for (args, want) in [
        (vec!["--rtol=nan"], "expected a finite number >= 0"),
        (vec!["--atol=-1"], "expected a finite number >= 0"),
        (vec!["--atol", "-1"], "expected a finite number >= 0"),
        (vec!["--min-cosine=2"], "expected a cosine in [-1, 1]"),
        (vec!["--min-cosine=nan"], "expected a cosine in [-1, 1]"),
        (
            vec!["--max-accuracy-drop=1.5"],
            "expected a fraction in [0, 1]",
        ),
        (
            vec!["--max-accuracy-drop", "-0.1"],
            "expected a fraction in [0, 1]",
        ),
        (
            vec!["--atol=nosuch:0.1"],
            "name `nosuch` but the graph outputs are `save_infer_model/scale_0.tmp_1`",
        ),
        (
            vec!["--atol", &two[0], "--atol", &two[1]],
            "give one tolerance per output",
        ),
        (
            vec!["--rtol=0.1", "--rtol=0.2"],
            "give one tolerance for every output",
        ),
    ] {
        let mut a: Vec<OsString> = vec!["compare".into(), m.clone().into(), m.clone().into()];
        a.extend(args.iter().map(OsString::from));
        let r = onnxopt(&a);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.describe());
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
        let name = args[0].split('=').next().unwrap();
        assert!(r.stderr.contains(name), "{args:?}: {}", r.stderr);
    }
    let r = onnxopt(&os(&[
        &"quantize",
        &m,
        &"-o",
        &tempdir().path().join("q.onnx"),
        &"--mode",
        &"static",
        &"--calibration",
        &m.with_extension("npz"),
        &"--calibration-samples",
        &"0",
    ]));
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert!(r.stderr.contains("--calibration-samples"), "{}", r.stderr);
    // A negative cosine is a value (it was "unexpected argument '-0'"), in any spelling.
    for v in ["-0.5", "-.5", "-1e-3"] {
        let r = onnxopt(&os(&[
            &"compare",
            &m,
            &m,
            &"--min-cosine",
            &v,
            &"--inputs",
            &m.with_extension("npz"),
        ]));
        assert!(r.ok(), "{v}: {}", r.describe());
    }
}

/// A panic inside tract (its Gather on an out-of-range index) is reported as the reason the
/// check is unverified, once: the panic hook printed it before, and with `RUST_BACKTRACE` set
/// some 90 lines of backtrace.
#[test]
fn a_panic_inside_tract_is_reported_once_without_a_backtrace() {
    use onnxopt::pb;
    let dir = tempdir();
    let model = dir.path().join("gather.onnx");
    let info = tensor_info;
    let proto = pb::ModelProto {
        ir_version: Some(8),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(13),
        }],
        graph: Some(pb::GraphProto {
            name: Some("g".into()),
            node: vec![pb::NodeProto {
                name: Some("gather".into()),
                op_type: Some("Gather".into()),
                input: vec!["table".into(), "ids".into()],
                output: vec!["emb".into()],
                ..Default::default()
            }],
            initializer: vec![pb::TensorProto {
                name: Some("table".into()),
                dims: vec![3, 4],
                data_type: Some(pb::tensor_proto::DataType::Float as i32),
                float_data: (0..12).map(|v| v as f32).collect(),
                ..Default::default()
            }],
            input: vec![info("ids", pb::tensor_proto::DataType::Int64, &[1, 5])],
            output: vec![info("emb", pb::tensor_proto::DataType::Float, &[1, 5, 4])],
            ..Default::default()
        }),
        ..Default::default()
    };
    fs::write(&model, prost::Message::encode_to_vec(&proto)).unwrap();
    let ids = dir.path().join("ids.npz");
    let t = tract_onnx::prelude::Tensor::from_shape(&[1, 5], &[0i64, 1, 2, 10, 0]).unwrap();
    onnxopt::verify::inputs::save_npz(&ids, &[("ids".into(), t)]).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(os(&[&"compare", &model, &model, &"--inputs", &ids]))
        .env("RUST_BACKTRACE", "1");
    let r = run_cmd(cmd, Duration::from_secs(120));
    assert_eq!(r.code, Some(3), "{}", r.describe());
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("tract panicked"), "{}", r.describe());
    assert!(!all.contains("panicked at"), "{}", r.describe());
    assert!(!all.contains("stack backtrace"), "{}", r.describe());
}

/// A reader that closes the pipe early (`onnxopt inspect --json | head -1`) wanted no more:
/// exit 0 without a panic (it was exit 101, "failed printing to stdout: Broken pipe", one
/// run in three).
#[test]
fn a_reader_closing_the_pipe_early_is_not_an_error() {
    use std::process::Stdio;
    for args in [
        os(&[&"inspect", &model("ppocrv4-rec"), &"--json"]),
        os(&[&"list-passes"]),
    ] {
        let mut child = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the child writes: every write it makes fails with EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
