//! Integration tests of the `onnxopt` command line: round-trips on the real models and on
//! onnx's backend test models, external data, error paths, atomic writes, determinism,
//! fuzzing of the reader, and `inspect --json` against the onnx Python package.
//!
//! Python peers (onnx, onnxruntime) run through the interpreter in `ONNXOPT_PYTHON`, which
//! `tests/run.sh` exports; without it the tests look for `target/pyenv/bin/python` and fail
//! with a message saying to run `tests/run.sh`. No test skips itself silently.

// Tests fail by panicking: unwrap and panic! are the point here.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "cli/optimize.rs"]
mod optimize;
#[path = "cli/quantize.rs"]
mod quantize;

mod common {
    use std::collections::BTreeMap;
    use std::fs;
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    pub const BIN: &str = env!("CARGO_BIN_EXE_onnxopt");

    /// A graph input or output `name` of element type `elem` and fixed `dims`.
    pub fn tensor_info(
        name: &str,
        elem: onnxopt::pb::tensor_proto::DataType,
        dims: &[i64],
    ) -> onnxopt::pb::ValueInfoProto {
        use onnxopt::pb;
        pb::ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: Some(elem as i32),
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| pb::tensor_shape_proto::Dimension {
                                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// A fresh temporary folder under target/tmp, removed when dropped.
    pub fn tempdir() -> tempfile::TempDir {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(&base).unwrap();
        tempfile::Builder::new()
            .prefix("cli-")
            .tempdir_in(base)
            .unwrap()
    }

    /// The real models in models/, sorted by name.
    pub fn real_models() -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(repo().join("models"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
            .collect();
        v.sort();
        assert!(
            v.len() >= 5,
            "expected the real models in models/, found {v:?}"
        );
        v
    }

    pub fn stem(p: &Path) -> String {
        p.file_stem().unwrap().to_string_lossy().into_owned()
    }

    /// The Python interpreter with onnx and onnxruntime (see the module doc).
    pub fn python() -> &'static Path {
        static PY: OnceLock<PathBuf> = OnceLock::new();
        PY.get_or_init(|| {
            if let Some(p) = std::env::var_os("ONNXOPT_PYTHON").filter(|p| !p.is_empty()) {
                let p = PathBuf::from(p);
                assert!(
                    p.exists(),
                    "ONNXOPT_PYTHON={} does not exist; run tests/run.sh",
                    p.display()
                );
                return p;
            }
            let p = repo().join("target/pyenv/bin/python");
            assert!(
                p.exists(),
                "no Python with onnx/onnxruntime: ONNXOPT_PYTHON is unset and {} does not \
                 exist; run tests/run.sh (it builds the venv and runs every test)",
                p.display()
            );
            p
        })
    }

    /// Outcome of one child process.
    #[derive(Debug)]
    pub struct Run {
        pub cmd: String,
        pub code: Option<i32>,
        pub signal: Option<i32>,
        pub timed_out: bool,
        pub stdout: String,
        pub stderr: String,
    }

    impl Run {
        pub fn ok(&self) -> bool {
            self.code == Some(0)
        }

        /// One-line description for failure messages.
        pub fn describe(&self) -> String {
            let how = if self.timed_out {
                "timed out".to_string()
            } else if let Some(s) = self.signal {
                format!("killed by signal {s}")
            } else {
                format!("exit {}", self.code.unwrap_or(-1))
            };
            let mut err = self.stderr.trim().to_string();
            if err.len() > 1500 {
                let mut cut = 1500;
                while !err.is_char_boundary(cut) {
                    cut -= 1;
                }
                err.truncate(cut);
                err.push_str(" ...");
            }
            format!("`{}`: {how}; stderr: {err}", self.cmd)
        }

        /// Panics unless the command exited 0.
        pub fn expect_ok(self) -> Self {
            assert!(self.ok(), "{}", self.describe());
            self
        }

        /// Exit code 2 with a message on stderr, no panic (101) and no signal.
        pub fn expect_error(self) -> Self {
            assert_eq!(self.code, Some(2), "expected exit 2: {}", self.describe());
            assert!(
                !self.stderr.trim().is_empty(),
                "exit 2 without a message on stderr: {}",
                self.describe()
            );
            assert!(
                !self.stderr.contains("panicked"),
                "the message is a panic: {}",
                self.describe()
            );
            self
        }
    }

    /// Runs a command with stdout/stderr captured through files (no pipe deadlock) and kills
    /// it after `timeout`.
    pub fn run_cmd(mut cmd: Command, timeout: Duration) -> Run {
        let desc = format!("{cmd:?}").replace('"', "");
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("stdout");
        let err_path = dir.path().join("stderr");
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).unwrap())
            .stderr(fs::File::create(&err_path).unwrap());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > timeout {
                timed_out = true;
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        Run {
            cmd: desc,
            code: status.code(),
            signal: status.signal(),
            timed_out,
            stdout: String::from_utf8_lossy(&fs::read(&out_path).unwrap()).into_owned(),
            stderr: String::from_utf8_lossy(&fs::read(&err_path).unwrap()).into_owned(),
        }
    }

    pub fn onnxopt<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env("NO_COLOR", "1");
        run_cmd(cmd, Duration::from_secs(300))
    }

    /// `onnxopt optimize IN -o OUT --passes none [extra...]`.
    pub fn roundtrip(input: &Path, output: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "optimize".as_ref(),
            input.as_os_str(),
            "-o".as_ref(),
            output.as_os_str(),
            "--passes".as_ref(),
            "none".as_ref(),
        ];
        args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
        onnxopt(&args)
    }

    /// Runs tests/py/SCRIPT with the venv's Python.
    pub fn py<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> Run {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/py").join(script)).args(args);
        run_cmd(cmd, Duration::from_secs(600))
    }

    /// `inspect --json` parsed.
    /// The record of the first pass called `name` in a JSON report.
    pub fn pass_record(report: &serde_json::Value, name: &str) -> serde_json::Value {
        report["passes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no pass {name} in the report: {report}"))
            .clone()
    }

    pub fn inspect_json(model: &Path) -> serde_json::Value {
        let r = onnxopt(&["inspect".as_ref(), model.as_os_str(), "--json".as_ref()]).expect_ok();
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
            panic!(
                "inspect --json {} printed invalid JSON ({e}):\n{}",
                model.display(),
                r.stdout
            )
        })
    }

    /// Compares pairs of models with same_model.py in one Python process; returns the
    /// failures as "a vs b: reasons".
    pub fn same_models(pairs: &[(PathBuf, PathBuf)], tensor_values: bool) -> Vec<String> {
        let dir = tempdir();
        let list = dir.path().join("pairs.tsv");
        let mut f = fs::File::create(&list).unwrap();
        for (a, b) in pairs {
            writeln!(f, "{}\t{}", a.display(), b.display()).unwrap();
        }
        drop(f);
        let mut args = vec!["--batch".to_string(), list.display().to_string()];
        if tensor_values {
            args.insert(0, "--tensor-values".into());
        }
        let r = py("same_model.py", &args);
        assert!(
            r.code == Some(0) || r.code == Some(1),
            "same_model.py failed to run: {}",
            r.describe()
        );
        let mut failures = Vec::new();
        let mut seen = 0;
        for line in r.stdout.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            seen += 1;
            if v["same"] != true {
                let why = if let Some(e) = v.get("error") {
                    e.to_string()
                } else {
                    v["diff"].to_string()
                };
                failures.push(format!("{} vs {}: {why}", v["a"], v["b"]));
            }
        }
        assert_eq!(
            seen,
            pairs.len(),
            "same_model.py answered for {seen} of {} pairs",
            pairs.len()
        );
        failures
    }

    /// Names of the entries of a folder, sorted.
    pub fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// SplitMix64: a tiny seeded generator, so fuzz cases are the same on every machine.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in 0..n (n > 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Counts outcomes by label, printed in a stable order.
    #[derive(Default)]
    pub struct Tally(pub BTreeMap<String, usize>);

    impl Tally {
        pub fn add(&mut self, label: &str) {
            *self.0.entry(label.to_string()).or_default() += 1;
        }
    }
}

use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

/// The failures collected by a test, printed together and then asserted empty.
fn assert_no_failures(what: &str, total: usize, failures: &[String]) {
    if !failures.is_empty() {
        panic!(
            "{what}: {} of {total} failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    println!("{what}: all {total} passed");
}

#[test]
fn roundtrip_real_models() {
    let dir = tempdir();
    let mut pairs = Vec::new();
    let mut failures = Vec::new();
    let models = real_models();
    for m in &models {
        let out = dir.path().join(format!("{}.onnx", stem(m)));
        let r = roundtrip(m, &out, &[]);
        if r.ok() {
            pairs.push((m.clone(), out));
        } else {
            failures.push(r.describe());
        }
    }
    failures.extend(same_models(&pairs, false));
    assert_no_failures(
        "roundtrip of models/*.onnx with --passes none",
        models.len(),
        &failures,
    );
}

/// Models shipped in onnx's backend test data (listed by backend_models.py).
fn backend_models() -> Vec<PathBuf> {
    let r = py::<&str>("backend_models.py", &[]).expect_ok();
    let v: Vec<PathBuf> = r.stdout.lines().map(PathBuf::from).collect();
    assert!(
        v.len() > 100,
        "backend_models.py listed only {} models",
        v.len()
    );
    v
}

/// A unique, readable file stem for a backend model: its case folder, or its file stem.
fn backend_name(m: &Path) -> String {
    if m.file_name().is_some_and(|f| f == "model.onnx") {
        let case = m.parent().unwrap();
        let set = case
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy();
        format!("{set}-{}", case.file_name().unwrap().to_string_lossy())
    } else {
        stem(m)
    }
}

#[test]
fn roundtrip_onnx_backend_models() {
    let models = backend_models();
    let dir = tempdir();
    let mut pairs = Vec::new();
    let mut failures = Vec::new();
    for m in &models {
        let out = dir.path().join(format!("{}.onnx", backend_name(m)));
        let r = roundtrip(m, &out, &[]);
        if r.ok() {
            pairs.push((m.clone(), out));
        } else {
            failures.push(r.describe());
        }
    }
    failures.extend(same_models(&pairs, false));
    assert_no_failures(
        "roundtrip of onnx backend test models",
        models.len(),
        &failures,
    );
}

/// The round-trip computes the same thing: `compare --atol 0 --rtol 0` in tract on the real
/// models (their npz inputs) and on the backend test models that ship inputs
/// (test_data_set_0, converted by pb_to_npz.py). The light_* backend models are left out:
/// they ship no inputs and are full-size networks (VGG-19, ZFNet) that take minutes each
/// in a debug build of tract; inputs that npz cannot carry for onnxopt (string tensors,
/// sequences) are counted and listed.
#[test]
fn roundtrip_outputs_bit_identical_in_tract() {
    let dir = tempdir();
    let mut failures = Vec::new();
    let mut cases: Vec<(String, PathBuf, PathBuf)> = real_models()
        .into_iter()
        .map(|m| (stem(&m), m.with_extension("npz"), m))
        .collect();
    let backend: Vec<(String, PathBuf, PathBuf)> = backend_models()
        .into_iter()
        .filter(|m| m.file_name().is_some_and(|f| f == "model.onnx"))
        .map(|m| {
            let name = backend_name(&m);
            (
                name.clone(),
                dir.path().join(format!("{name}.inputs.npz")),
                m,
            )
        })
        .collect();
    let list = dir.path().join("cases.tsv");
    let lines: Vec<String> = backend
        .iter()
        .map(|(_, npz, m)| {
            format!(
                "{}\t{}\t{}",
                m.parent().unwrap().join("test_data_set_0").display(),
                m.display(),
                npz.display()
            )
        })
        .collect();
    fs::write(&list, lines.join("\n") + "\n").unwrap();
    let r = py("pb_to_npz.py", &["--batch".as_ref(), list.as_os_str()]);
    let answers: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), backend.len(), "{}", r.describe());
    let mut not_npz = Vec::new();
    for (case, answer) in backend.into_iter().zip(answers) {
        match answer["code"].as_i64() {
            Some(0) => cases.push(case),
            Some(3) => not_npz.push(case.0),
            _ => failures.push(format!("pb_to_npz.py {}: {}", case.0, answer["message"])),
        }
    }
    let total = cases.len();
    let mut unverified = Vec::new();
    for (name, npz, m) in &cases {
        let out = dir.path().join(format!("{name}.onnx"));
        let r = roundtrip(m, &out, &[]);
        if !r.ok() {
            failures.push(r.describe());
            continue;
        }
        let r = onnxopt(&[
            "compare".as_ref(),
            m.as_os_str(),
            out.as_os_str(),
            "--inputs".as_ref(),
            npz.as_os_str(),
            "--atol".as_ref(),
            "0".as_ref(),
            "--rtol".as_ref(),
            "0".as_ref(),
        ]);
        let real = m.starts_with(repo().join("models"));
        match r.code {
            Some(0) => {}
            // Unverified: tract cannot run the model. Allowed for backend models (their
            // op coverage is wide), never for the real ones.
            Some(3) if !real => {
                let why = format!("{}{}", r.stdout, r.stderr);
                let first = why.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                let mut first = first.trim().to_string();
                if first.len() > 200 {
                    let mut cut = 200;
                    while !first.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    first.truncate(cut);
                    first.push_str(" ...");
                }
                unverified.push(format!("{name}: {first}"))
            }
            _ => failures.push(r.describe()),
        }
    }
    println!(
        "compare --atol 0 --rtol 0: {total} cases, {} unverified (tract cannot run them); \
         {} not compared (inputs npz cannot carry): {not_npz:?}",
        unverified.len(),
        not_npz.len()
    );
    for u in &unverified {
        println!("  unverified {u}");
    }
    assert_no_failures(
        "bit-identical outputs in tract after round-trip",
        total,
        &failures,
    );
}

/// Sum of `external_data[].tensors` and `.bytes` for `location`, from inspect --json.
fn external_entry(report: &Value, location: &str) -> Option<(u64, u64)> {
    report["external_data"]
        .as_array()
        .unwrap_or_else(|| panic!("inspect --json has no external_data array: {report}"))
        .iter()
        .find(|e| e["location"] == location)
        .map(|e| (e["tensors"].as_u64().unwrap(), e["bytes"].as_u64().unwrap()))
}

/// Does the model hold initializers (as opposed to weights in Constant nodes only)?
fn has_initializers(m: &Path) -> bool {
    inspect_json(m)["largest_tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["source"] == "initializer")
}

/// Every tensor external (threshold 0): the .data file appears beside the output, inspect
/// lists it, and the model reads back with the same values, names and structure.
#[test]
fn external_data_roundtrip() {
    let mut failures = Vec::new();
    let models: Vec<PathBuf> = real_models()
        .into_iter()
        .filter(|m| has_initializers(m))
        .collect();
    assert!(models.len() >= 3, "expected real models with initializers");
    for m in &models {
        let name = stem(m);
        let dir = tempdir();
        let out = dir.path().join(format!("{name}.onnx"));
        let data_name = format!("{name}.onnx.data");
        let data = dir.path().join(&data_name);
        let r = roundtrip(
            m,
            &out,
            &["--external-data", "--external-data-threshold", "0"],
        );
        if !r.ok() {
            failures.push(r.describe());
            continue;
        }
        let files = listing(dir.path());
        let expected = vec![format!("{name}.onnx"), data_name.clone()];
        if files != expected {
            failures.push(format!(
                "{name}: output folder holds {files:?}, expected {expected:?}"
            ));
            continue;
        }
        let report = inspect_json(&out);
        let size = fs::metadata(&data).unwrap().len();
        match external_entry(&report, &data_name) {
            Some((tensors, bytes)) if tensors > 0 && bytes > 0 && bytes <= size => {}
            other => failures.push(format!(
                "{name}: inspect --json external_data entry for {data_name} is {other:?} \
                 (file is {size} bytes): {}",
                report["external_data"]
            )),
        }
        // Tensor encodings may change (float_data -> raw bytes in the .data file); values,
        // names, dims and everything else must not.
        failures.extend(same_models(&[(m.clone(), out.clone())], true));
    }
    assert_no_failures(
        "--external-data --external-data-threshold 0",
        models.len(),
        &failures,
    );
}

/// With the default threshold (1024 bytes) the external-data model deploys: onnx's checker
/// (full_check) accepts it and onnxruntime gives the original's outputs bit for bit.
/// (With threshold 0 neither can load magika: the shape inputs of Reshape/Slice must be
/// inline for their shape inference; onnx's own converter behaves the same.)
#[test]
fn external_data_default_threshold_deploys_in_onnxruntime() {
    let mut failures = Vec::new();
    let models = real_models();
    for m in &models {
        let name = stem(m);
        let dir = tempdir();
        let out = dir.path().join(format!("{name}.onnx"));
        let r = roundtrip(m, &out, &["--external-data"]);
        if !r.ok() {
            failures.push(r.describe());
            continue;
        }
        let r = py("check.py", &[&out]);
        if !r.ok() {
            failures.push(r.describe());
        }
        let npz = m.with_extension("npz");
        let (a, b) = (dir.path().join("a.npz"), dir.path().join("b.npz"));
        let ra = py("ort_run.py", &[m, &npz, &a]);
        let rb = py("ort_run.py", &[&out, &npz, &b]);
        if !ra.ok() || !rb.ok() {
            failures.push(format!(
                "onnxruntime: {} / {}",
                ra.describe(),
                rb.describe()
            ));
        } else if !same_npz(&a, &b) {
            failures.push(format!(
                "{name}: onnxruntime outputs differ between the original and the external-data copy"
            ));
        }
        failures.extend(same_models(&[(m.clone(), out.clone())], true));
    }
    assert_no_failures(
        "--external-data (default threshold)",
        models.len(),
        &failures,
    );
}

/// A model whose weights all live in Constant nodes has no initializers to move out: the
/// output must not come with an empty .data file that nothing references.
#[test]
fn external_data_without_initializers_writes_no_empty_file() {
    let m = repo().join("models/ppocr-mobile-v2-cls.onnx");
    assert!(!has_initializers(&m));
    let dir = tempdir();
    let out = dir.path().join("cls.onnx");
    roundtrip(
        &m,
        &out,
        &["--external-data", "--external-data-threshold", "0"],
    )
    .expect_ok();
    let data = dir.path().join("cls.onnx.data");
    let size = fs::metadata(&data).map(|d| d.len()).ok();
    let listed = inspect_json(&out)["external_data"].clone();
    assert!(
        size.is_none_or(|s| s > 0),
        "optimize --external-data --external-data-threshold 0 on {} wrote an empty {} that no \
         tensor references (inspect --json external_data: {listed})",
        m.display(),
        data.display()
    );
    if size.is_some() {
        assert!(
            external_entry(&inspect_json(&out), "cls.onnx.data").is_some(),
            "{} exists but inspect does not list it: {listed}",
            data.display()
        );
    }
    assert_same_values(&m, &out);
    // ppocrv4-rec holds every weight in a Constant node: with --passes none no initializer
    // moves, and the run says why no data file was written (it said nothing).
    let rec = repo().join("models/ppocrv4-rec.onnx");
    let out = dir.path().join("rec.onnx");
    let r = roundtrip(&rec, &out, &["--external-data"]).expect_ok();
    assert!(!dir.path().join("rec.onnx.data").exists());
    assert!(
        r.stderr.contains("note: --external-data: no initializer of 1024 bytes or more, so no data file was written"),
        "{}",
        r.describe()
    );
}

fn assert_same_values(a: &Path, b: &Path) {
    let failures = same_models(&[(a.to_path_buf(), b.to_path_buf())], true);
    assert_no_failures("same model", 1, &failures);
}

/// Two npz files with the same arrays, bit for bit (numpy's own comparison).
fn same_npz(a: &Path, b: &Path) -> bool {
    let code = "import numpy as np, sys\n\
         a, b = np.load(sys.argv[1]), np.load(sys.argv[2])\n\
         ok = sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape \
         and a[k].tobytes() == b[k].tobytes() for k in a)\n\
         sys.exit(0 if ok else 1)";
    let mut cmd = std::process::Command::new(python());
    cmd.args(["-c", code]).arg(a).arg(b);
    run_cmd(cmd, std::time::Duration::from_secs(60)).ok()
}

/// Builds `make_bad.py KIND` in `<fresh folder>/models/` and returns (fresh folder, model
/// path). The fresh folder also holds a 64-byte file `x`, so that `../x` names a file that
/// exists: refusing it must come from the location escaping the model folder.
fn bad_model(kind: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    fs::write(dir.path().join("x"), [7u8; 64]).unwrap();
    let models = dir.path().join("models");
    fs::create_dir(&models).unwrap();
    let model = models.join(format!("{kind}.onnx"));
    py("make_bad.py", &[kind.as_ref(), model.as_os_str()]).expect_ok();
    (dir, model)
}

/// `optimize` must refuse with exit 2 and a message naming every string in `names`, write
/// nothing, and `inspect` must not panic either.
fn expect_refused(kind: &str, names: &[&str]) {
    let (_root, model) = bad_model(kind);
    let dir = model.parent().unwrap();
    let before = listing(dir);
    let out = dir.join("out.onnx");
    let r = roundtrip(&model, &out, &[]).expect_error();
    for n in names {
        assert!(
            r.stderr.contains(n),
            "{kind}: the message does not name {n:?}: {}",
            r.describe()
        );
    }
    assert_eq!(
        listing(dir),
        before,
        "{kind}: the failed run left files behind"
    );
    let r = onnxopt(&["inspect".as_ref(), model.as_os_str()]);
    assert!(
        r.code == Some(0) || r.code == Some(2),
        "{kind}: inspect must exit 0 or 2: {}",
        r.describe()
    );
    let r = onnxopt(&["inspect".as_ref(), model.as_os_str(), "--json".as_ref()]);
    assert!(
        r.code == Some(0) || r.code == Some(2),
        "{kind}: inspect --json must exit 0 or 2: {}",
        r.describe()
    );
}

#[test]
fn refuses_external_location_in_parent_folder() {
    expect_refused("ext-parent", &["w_parent", "../x"]);
}

#[test]
fn refuses_external_location_absolute_path() {
    expect_refused("ext-absolute", &["w_absolute", "/etc/passwd"]);
}

#[test]
fn refuses_missing_external_data_file() {
    expect_refused("ext-missing", &["w_missing", "missing.bin"]);
}

#[test]
fn refuses_external_range_beyond_file_end() {
    expect_refused("ext-beyond-eof", &["w_beyond", "beyond.bin"]);
}

#[test]
fn refuses_dims_whose_product_overflows() {
    expect_refused("dims-overflow", &["w_huge"]);
}

#[test]
fn refuses_node_reading_undefined_value() {
    expect_refused("undefined-value", &["ghost"]);
    let (_dir, model) = bad_model("undefined-value");
    let r = roundtrip(&model, &model.with_extension("out.onnx"), &[]).expect_error();
    assert!(
        r.stderr.contains("relu_ghost") || r.stderr.contains("Relu"),
        "the message names neither the node nor its op: {}",
        r.describe()
    );
}

#[test]
fn refuses_non_onnx_file() {
    let dir = tempdir();
    let notes = dir.path().join("notes.onnx");
    fs::write(&notes, "these are notes, not a model\n").unwrap();
    for args in [vec!["inspect"], vec!["inspect", "--json"]] {
        let mut a: Vec<&std::ffi::OsStr> = vec![args[0].as_ref(), notes.as_os_str()];
        a.extend(args[1..].iter().map(std::ffi::OsStr::new));
        let r = onnxopt(&a).expect_error();
        assert!(
            r.stderr.contains("notes.onnx"),
            "the message does not name the file: {}",
            r.describe()
        );
    }
    let r = roundtrip(&notes, &dir.path().join("out.onnx"), &[]).expect_error();
    assert!(
        r.stderr.contains("notes.onnx"),
        "the message does not name the file: {}",
        r.describe()
    );
    assert_eq!(listing(dir.path()), ["notes.onnx"]);
    // A file that does not exist at all.
    let r = onnxopt(&[
        "inspect".as_ref(),
        dir.path().join("absent.onnx").as_os_str(),
    ])
    .expect_error();
    assert!(r.stderr.contains("absent.onnx"), "{}", r.describe());
    // compare names both models when neither can be read (it named the first only).
    let r = onnxopt(&[
        "compare".as_ref(),
        notes.as_os_str(),
        dir.path().join("absent.onnx").as_os_str(),
    ])
    .expect_error();
    assert!(
        r.stderr.contains("notes.onnx") && r.stderr.contains("absent.onnx"),
        "{}",
        r.describe()
    );
}

#[test]
fn refuses_overwriting_input_without_force() {
    let dir = tempdir();
    let original = &real_models()[0];
    let model = dir.path().join("model.onnx");
    fs::copy(original, &model).unwrap();
    let bytes = fs::read(&model).unwrap();
    // The same file, spelled the same way and another way.
    let dotted = dir.path().join(".").join("model.onnx");
    for out in [&model, &dotted] {
        let r = roundtrip(&model, out, &[]).expect_error();
        assert!(
            r.stderr.contains("--force"),
            "the message should say that --force allows it: {}",
            r.describe()
        );
        assert_eq!(fs::read(&model).unwrap(), bytes, "the input was modified");
        assert_eq!(listing(dir.path()), ["model.onnx"]);
    }
    roundtrip(&model, &model, &["--force"]).expect_ok();
    assert_eq!(
        listing(dir.path()),
        ["model.onnx"],
        "temporary files left behind"
    );
    let failures = same_models(&[(original.clone(), model.clone())], false);
    assert_no_failures("overwrite with --force", 1, &failures);
}

/// No written file (`-o`, its external data, `--report`) may replace a file the command reads
/// (the model, `--inputs`, `--calibration`, `--config`, the model's external data) or another
/// written file: exit 2 before any work, every file as it was.
#[test]
fn refuses_writing_over_any_file_it_reads() {
    let dir = tempdir();
    let d = dir.path();
    let model = d.join("model.onnx");
    fs::copy(&real_models()[0], &model).unwrap();
    let inputs = d.join("in.npz");
    fs::copy(real_models()[0].with_extension("npz"), &inputs).unwrap();
    let cal = d.join("cal");
    fs::create_dir(&cal).unwrap();
    fs::copy(&inputs, cal.join("s0.npz")).unwrap();
    let config = d.join("config.json");
    fs::write(&config, "{}").unwrap();
    // Hard links to the model and to the inputs (another path, the same file).
    fs::hard_link(&model, d.join("model-link.json")).unwrap();
    fs::hard_link(&inputs, d.join("in-link.json")).unwrap();
    let p = |name: &str| d.join(name).display().to_string();
    let m = model.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "quantize".into(),
                m.clone(),
                "-o".into(),
                p("q.onnx"),
                "--report".into(),
                m.clone(),
            ],
            "--report",
        ),
        (
            vec![
                "optimize".into(),
                m.clone(),
                "-o".into(),
                p("q.onnx"),
                "--report".into(),
                p("model-link.json"),
            ],
            "--report",
        ),
        (
            vec![
                "optimize".into(),
                m.clone(),
                "-o".into(),
                p("q.onnx"),
                "--inputs".into(),
                p("in.npz"),
                "--report".into(),
                p("in-link.json"),
            ],
            "--report",
        ),
        (
            vec![
                "quantize".into(),
                m.clone(),
                "-o".into(),
                p("q.onnx"),
                "--report".into(),
                p("./q.onnx"),
            ],
            "both write",
        ),
        (
            vec![
                "quantize".into(),
                m.clone(),
                "-o".into(),
                p("in.npz"),
                "--inputs".into(),
                p("in.npz"),
            ],
            "--inputs",
        ),
        (
            vec![
                "quantize".into(),
                m.clone(),
                "-o".into(),
                p("cal/s1.npz"),
                "--mode".into(),
                "static".into(),
                "--calibration".into(),
                p("cal"),
            ],
            "--calibration",
        ),
        (
            vec![
                "quantize".into(),
                m.clone(),
                "-o".into(),
                p("q.onnx"),
                "--report".into(),
                p("config.json"),
                "--config".into(),
                p("config.json"),
            ],
            "--config",
        ),
        (
            vec![
                "optimize".into(),
                m.clone(),
                "-o".into(),
                m.clone(),
                "--force".into(),
                "--report".into(),
                m.clone(),
            ],
            "both write",
        ),
        (
            vec![
                "compare".into(),
                m.clone(),
                p("cal/s0.npz"),
                "--report".into(),
                p("cal/s0.npz"),
            ],
            "candidate",
        ),
    ];
    let before = |f: &Path| fs::read(f).unwrap();
    let saved = [&model, &inputs, &cal.join("s0.npz"), &config].map(|f| (f.clone(), before(f)));
    for (args, names) in &cases {
        let r = onnxopt(args).expect_error();
        assert!(
            r.stderr.contains("refusing to overwrite") && r.stderr.contains(names),
            "{args:?}: {}",
            r.describe()
        );
        for (f, bytes) in &saved {
            assert_eq!(
                &fs::read(f).unwrap(),
                bytes,
                "{args:?} changed {}",
                f.display()
            );
        }
    }
    assert_eq!(
        listing(d),
        [
            "cal",
            "config.json",
            "in-link.json",
            "in.npz",
            "model-link.json",
            "model.onnx"
        ]
    );
    // The external data the input reads: a model whose data file is `b.onnx.data`, saved as
    // `b.onnx` with external data, would replace it.
    let split = d.join("split");
    fs::create_dir(&split).unwrap();
    let b = split.join("b.onnx");
    roundtrip(
        &model,
        &b,
        &["--external-data", "--external-data-threshold", "0"],
    )
    .expect_ok();
    let a = split.join("a.onnx");
    fs::rename(&b, &a).unwrap();
    let data = before(&split.join("b.onnx.data"));
    let r = roundtrip(
        &a,
        &b,
        &["--external-data", "--external-data-threshold", "0"],
    )
    .expect_error();
    assert!(r.stderr.contains("external data"), "{}", r.describe());
    assert_eq!(
        before(&split.join("b.onnx.data")),
        data,
        "the input's external data changed"
    );
    assert_eq!(listing(&split), ["a.onnx", "b.onnx.data"]);
    // That data file as --report (optimize, compare) or as -o, and -o's own data file as
    // --report or as the --inputs file.
    let s = |p: &Path| p.display().to_string();
    let (data_file, o, o_data) = (
        split.join("b.onnx.data"),
        split.join("o.onnx"),
        split.join("o.onnx.data"),
    );
    fs::copy(&inputs, &o_data).unwrap();
    let kept = before(&o_data);
    let cases: Vec<Vec<String>> = vec![
        vec![
            "optimize".into(),
            s(&a),
            "-o".into(),
            s(&o),
            "--report".into(),
            s(&data_file),
        ],
        vec![
            "compare".into(),
            s(&a),
            m.clone(),
            "--report".into(),
            s(&data_file),
        ],
        vec!["optimize".into(), s(&a), "-o".into(), s(&data_file)],
        vec![
            "optimize".into(),
            m.clone(),
            "-o".into(),
            s(&o),
            "--external-data".into(),
            "--report".into(),
            s(&o_data),
        ],
        vec![
            "optimize".into(),
            m.clone(),
            "-o".into(),
            s(&o),
            "--external-data".into(),
            "--inputs".into(),
            s(&o_data),
        ],
    ];
    for args in &cases {
        let r = onnxopt(args).expect_error();
        assert!(
            r.stderr.contains("refusing to overwrite"),
            "{args:?}: {}",
            r.describe()
        );
        assert_eq!(
            before(&data_file),
            data,
            "{args:?} changed the input's external data"
        );
        assert_eq!(before(&o_data), kept, "{args:?} changed the --inputs file");
    }
    assert_eq!(listing(&split), ["a.onnx", "b.onnx.data", "o.onnx.data"]);
}

/// A report is written atomically, but through a symbolic link (the file it names is
/// replaced, the link stays) and into a FIFO (a reader gets it), as a plain write would: the
/// atomic rename replaced both with a regular file (and `--report /dev/null` as root).
#[test]
fn a_report_goes_through_links_and_into_fifos() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempdir();
    let d = dir.path();
    let model = &real_models()[0];
    fs::write(d.join("t.json"), "old").unwrap();
    std::os::unix::fs::symlink("t.json", d.join("link.json")).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(d.join("fifo"))
        .status()
        .unwrap();
    assert!(st.success());
    let fifo = d.join("fifo");
    let reader = std::thread::spawn(move || fs::read_to_string(fifo).unwrap());
    for report in ["link.json", "fifo"] {
        let r = onnxopt(&[
            "optimize".as_ref(),
            model.as_os_str(),
            "-o".as_ref(),
            d.join("out.onnx").as_os_str(),
            "--no-check".as_ref(),
            "--report".as_ref(),
            d.join(report).as_os_str(),
        ]);
        r.expect_ok();
    }
    let link = fs::symlink_metadata(d.join("link.json")).unwrap();
    assert!(link.file_type().is_symlink());
    assert!(fs::read_to_string(d.join("t.json"))
        .unwrap()
        .contains("\"schema_version\""));
    assert!(fs::symlink_metadata(d.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(reader.join().unwrap().contains("\"schema_version\""));
}

#[test]
fn writes_output_atomically() {
    let model = &real_models()[0];
    // Success: only the output appears.
    let dir = tempdir();
    let out = dir.path().join("out.onnx");
    roundtrip(model, &out, &[]).expect_ok();
    assert_eq!(
        listing(dir.path()),
        ["out.onnx"],
        "temporary files left behind"
    );
    // Success over an existing file: replaced whole.
    fs::write(&out, "old").unwrap();
    roundtrip(model, &out, &[]).expect_ok();
    assert_eq!(listing(dir.path()), ["out.onnx"]);
    assert!(fs::metadata(&out).unwrap().len() > 1000);
    // Failure: an existing output stays as it was and nothing else appears.
    let src = tempdir();
    let truncated = src.path().join("truncated.onnx");
    let bytes = fs::read(model).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fs::write(&out, "precious").unwrap();
    roundtrip(&truncated, &out, &[]).expect_error();
    assert_eq!(
        fs::read(&out).unwrap(),
        b"precious",
        "a failed run changed the output"
    );
    assert_eq!(
        listing(dir.path()),
        ["out.onnx"],
        "a failed run left files behind"
    );
    // Failure with external data: neither the model nor its .data file appears.
    let ext = tempdir();
    roundtrip(
        &truncated,
        &ext.path().join("e.onnx"),
        &["--external-data", "--external-data-threshold", "0"],
    )
    .expect_error();
    assert!(listing(ext.path()).is_empty(), "{:?}", listing(ext.path()));
    // An output folder that does not exist is an error, not a panic.
    let r = roundtrip(model, &dir.path().join("no/such/folder/out.onnx"), &[]);
    assert!(r.code == Some(2) || r.ok(), "{}", r.describe());
}

#[test]
fn deterministic_output() {
    let dir = tempdir();
    let mut failures = Vec::new();
    let models = real_models();
    for m in &models {
        let name = stem(m);
        let (a, b, c) = (
            dir.path().join(format!("{name}.a.onnx")),
            dir.path().join(format!("{name}.b.onnx")),
            dir.path().join(format!("{name}.c.onnx")),
        );
        for out in [&a, &b] {
            roundtrip(m, out, &[]).expect_ok();
        }
        // Feeding the output back in must give the same bytes again (a fixed point).
        roundtrip(&a, &c, &[]).expect_ok();
        let (ba, bb, bc) = (
            fs::read(&a).unwrap(),
            fs::read(&b).unwrap(),
            fs::read(&c).unwrap(),
        );
        if ba != bb {
            failures.push(format!(
                "{name}: two runs differ ({} vs {} bytes)",
                ba.len(),
                bb.len()
            ));
        }
        if ba != bc {
            failures.push(format!(
                "{name}: round-trip of the output differs from the output ({} vs {} bytes)",
                ba.len(),
                bc.len()
            ));
        }
    }
    assert_no_failures("byte-identical outputs", models.len(), &failures);
}

/// One fuzz input: a name for reports and the bytes.
struct FuzzCase {
    name: String,
    bytes: Vec<u8>,
}

/// Applies 1 to 8 random edits: flip a bit, replace a byte, insert or delete a short run,
/// or overwrite a run with 0xFF (huge varints: lengths and dims that overflow).
fn mutate(rng: &mut Rng, src: &[u8]) -> (Vec<u8>, String) {
    let mut v = src.to_vec();
    let mut ops = Vec::new();
    for _ in 0..1 + rng.below(8) {
        if v.is_empty() {
            v.push(0);
        }
        let at = rng.below(v.len());
        let run = 1 + rng.below(16);
        match rng.below(5) {
            0 => {
                v[at] ^= 1 << rng.below(8);
                ops.push(format!("flip@{at}"));
            }
            1 => {
                v[at] = rng.next() as u8;
                ops.push(format!("set@{at}"));
            }
            2 => {
                let ins: Vec<u8> = (0..run).map(|_| rng.next() as u8).collect();
                v.splice(at..at, ins);
                ops.push(format!("insert{run}@{at}"));
            }
            3 => {
                let end = (at + run).min(v.len());
                v.drain(at..end);
                ops.push(format!("delete{run}@{at}"));
            }
            _ => {
                let end = (at + run).min(v.len());
                v[at..end].fill(0xFF);
                ops.push(format!("ff{run}@{at}"));
            }
        }
    }
    (v, ops.join(","))
}

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// For each real model: 10 truncations (the first `truncations` of them) and an even share
/// of `mutations` seeded random mutations.
fn fuzz_cases(seed: u64, truncations: usize, mutations: usize) -> Vec<FuzzCase> {
    let models = real_models();
    let mut rng = Rng(seed);
    let mut cases = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let bytes = fs::read(m).unwrap();
        let n = bytes.len();
        let mut cuts = vec![0, 1, 16];
        cuts.extend((1..=6).map(|k| n * k / 7));
        cuts.push(n - 1);
        for cut in cuts.into_iter().take(truncations) {
            cases.push(FuzzCase {
                name: format!("{}.truncated{cut}", stem(m)),
                bytes: bytes[..cut].to_vec(),
            });
        }
        let share = mutations / models.len() + usize::from(i < mutations % models.len());
        for k in 0..share {
            let (v, ops) = mutate(&mut rng, &bytes);
            cases.push(FuzzCase {
                name: format!("{}.mut{k}[{ops}]", stem(m)),
                bytes: v,
            });
        }
    }
    cases
}

/// Feeds every case to `onnxopt ARGS(file, folder)` on two workers. Every run must exit 0
/// or 2 (2 with a message, not a panic); `on_ok` may add a problem for an exit 0. Failing
/// inputs are kept in target/fuzz-failures/ for reproduction. Prints the outcome counts.
fn fuzz(
    what: &str,
    seed: u64,
    cases: &[FuzzCase],
    args: impl Fn(&Path, &Path) -> Vec<std::ffi::OsString> + Sync,
    on_ok: impl Fn(&Run, &Path) -> Option<String> + Sync,
) {
    let total = cases.len();
    let start = std::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new((Tally::default(), Vec::<String>::new()));
    let fail_dir = repo().join("target/fuzz-failures");
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (next, results, fail_dir, args, on_ok) =
                (&next, &results, &fail_dir, &args, &on_ok);
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let dir = tempdir();
                let file = dir.path().join("case.onnx");
                fs::write(&file, &case.bytes).unwrap();
                let r = onnxopt(&args(&file, dir.path()));
                let kind = if case.name.contains(".truncated") {
                    "truncated"
                } else {
                    "mutated"
                };
                let mut problem = None;
                let label = match (r.code, r.signal, r.timed_out) {
                    (_, _, true) => {
                        problem = Some("timed out".to_string());
                        "timeout".to_string()
                    }
                    (Some(0), _, _) => {
                        problem = on_ok(&r, dir.path());
                        "exit 0".into()
                    }
                    (Some(2), _, _) => {
                        if r.stderr.trim().is_empty() || r.stderr.contains("panicked") {
                            problem = Some("exit 2 without a proper message".into());
                        }
                        "exit 2".into()
                    }
                    (Some(c), _, _) => {
                        problem = Some(format!("exit {c}"));
                        format!("exit {c}")
                    }
                    (None, Some(sig), _) => {
                        problem = Some(format!("signal {sig}"));
                        format!("signal {sig}")
                    }
                    (None, None, _) => unreachable!("a process ends by exit or by signal"),
                };
                let mut g = results.lock().unwrap();
                g.0.add(&format!("{kind} {label}"));
                if let Some(p) = problem {
                    fs::create_dir_all(fail_dir).unwrap();
                    let keep = fail_dir.join(format!("{}-case{i}.onnx", what.replace(' ', "-")));
                    fs::write(&keep, &case.bytes).unwrap();
                    g.1.push(format!(
                        "{} ({p}; kept as {}): {}",
                        case.name,
                        keep.display(),
                        r.stderr.lines().take(6).collect::<Vec<_>>().join(" | ")
                    ));
                }
            });
        }
    });
    let (tally, failures) = results.into_inner().unwrap();
    println!(
        "fuzz {what}: {total} inputs (seed {seed:#x}) in {:.1}s:",
        start.elapsed().as_secs_f64()
    );
    for (label, n) in &tally.0 {
        println!("  {label}: {n}");
    }
    assert_no_failures(
        &format!("{what} on truncated and mutated models"),
        total,
        &failures,
    );
}

/// `inspect --json` on 10 truncations of each real model and 1,000 seeded mutations
/// (ONNXOPT_FUZZ_SEED and ONNXOPT_FUZZ_MUTATIONS change the run; the defaults are fixed).
#[test]
fn fuzz_truncated_and_mutated() {
    let seed = env_or("ONNXOPT_FUZZ_SEED", 0x4E4E_5801u64);
    let cases = fuzz_cases(seed, 10, env_or("ONNXOPT_FUZZ_MUTATIONS", 1000));
    fuzz(
        "inspect",
        seed,
        &cases,
        |file, _| {
            vec![
                "inspect".into(),
                file.as_os_str().to_owned(),
                "--json".into(),
            ]
        },
        |r, _| {
            serde_json::from_str::<Value>(&r.stdout)
                .err()
                .map(|e| format!("exit 0 with invalid JSON: {e}"))
        },
    );
}

/// The full import/export path (`optimize --passes none`) on damaged models: exit 0 or 2,
/// and after exit 0 the output must itself be readable and the folder hold nothing else.
#[test]
fn fuzz_optimize_truncated_and_mutated() {
    let seed = env_or("ONNXOPT_FUZZ_SEED", 0x4E4E_5801u64) ^ 0x0F0F;
    let cases = fuzz_cases(seed, 4, env_or("ONNXOPT_FUZZ_OPTIMIZE_MUTATIONS", 150));
    fuzz(
        "optimize",
        seed,
        &cases,
        |file, dir| {
            vec![
                "optimize".into(),
                file.as_os_str().to_owned(),
                "-o".into(),
                dir.join("out.onnx").into_os_string(),
                "--passes".into(),
                "none".into(),
            ]
        },
        |_, dir| {
            let files = listing(dir);
            if files != ["case.onnx", "out.onnx"] {
                return Some(format!("exit 0 but the folder holds {files:?}"));
            }
            let r = onnxopt(&[
                "inspect".as_ref(),
                dir.join("out.onnx").as_os_str(),
                "--json".as_ref(),
            ]);
            (!r.ok()).then(|| format!("exit 0 but its output is unreadable: {}", r.describe()))
        },
    );
}

#[test]
fn inspect_matches_python() {
    let models = real_models();
    let r = py("counts.py", &models).expect_ok();
    let expected: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(expected.len(), models.len());
    let mut failures = Vec::new();
    let mut shape_failures = Vec::new();
    for (m, want) in models.iter().zip(&expected) {
        let got = inspect_json(m);
        let name = stem(m);
        let mut check = |what: &str, g: &Value, w: &Value| {
            if g != w {
                failures.push(format!("{name}: {what}: inspect says {g}, onnx says {w}"));
            }
        };
        check("node_count", &got["node_count"], &want["node_count"]);
        check("op_counts", &got["op_counts"], &want["op_counts"]);
        for k in ["count", "bytes", "tensors"] {
            check(
                &format!("parameters.{k}"),
                &got["parameters"][k],
                &want["parameters"][k],
            );
        }
        check(
            "parameters.by_dtype",
            &got["parameters"]["by_dtype"],
            &want["parameters"]["by_dtype"],
        );
        for k in [
            "ir_version",
            "producer_name",
            "producer_version",
            "opset_import",
        ] {
            check(k, &got[k], &want[k]);
        }
        check(
            "file_size",
            &got["file_size"],
            &Value::from(fs::metadata(m).unwrap().len()),
        );
        for io in ["inputs", "outputs"] {
            let names = |v: &Value| -> Vec<(Value, Value)> {
                v[io]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| (x["name"].clone(), x["dtype"].clone()))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            check(
                &format!("{io} (name, dtype)"),
                &Value::from(format!("{:?}", names(&got))),
                &Value::from(format!("{:?}", names(want))),
            );
            // Fixed dims must match exactly; symbolic and unknown dims must not be numbers.
            for (g, w) in got[io]
                .as_array()
                .into_iter()
                .flatten()
                .zip(want[io].as_array().into_iter().flatten())
            {
                let (gs, ws) = (g["shape"].as_array(), w["shape"].as_array());
                let ok = match (gs, ws) {
                    (Some(gs), Some(ws)) => {
                        gs.len() == ws.len()
                            && gs.iter().zip(ws).all(|(a, b)| {
                                if b.is_number() {
                                    a == b
                                } else {
                                    !a.is_number()
                                }
                            })
                    }
                    (gs, ws) => gs.is_none() == ws.is_none(),
                };
                if !ok {
                    shape_failures.push(format!(
                        "{name}: {io} {} shape: inspect says {}, onnx says {}",
                        w["name"], g["shape"], w["shape"]
                    ));
                }
            }
        }
    }
    failures.extend(shape_failures);
    assert_no_failures(
        "inspect --json vs onnx (counts.py)",
        models.len(),
        &failures,
    );
}

#[test]
fn inspect_json_has_the_documented_fields() {
    let mut failures = Vec::new();
    let models = real_models();
    for m in &models {
        let v = inspect_json(m);
        let name = stem(m);
        for (key, kind) in [
            ("file", "string"),
            ("file_size", "number"),
            ("ir_version", "number"),
            ("producer_name", "string"),
            ("producer_version", "string"),
            ("domain", "string"),
            ("model_version", "number"),
            ("doc_string", "string"),
            ("opset_import", "array"),
            ("inputs", "array"),
            ("outputs", "array"),
            ("node_count", "number"),
            ("op_counts", "object"),
            ("parameters", "object"),
            ("largest_tensors", "array"),
            ("subgraphs", "array"),
            ("external_data", "array"),
            ("functions", "number"),
            ("sparse_initializers", "number"),
        ] {
            let ok = matches!(
                (kind, &v[key]),
                ("string", Value::String(_))
                    | ("number", Value::Number(_))
                    | ("array", Value::Array(_))
                    | ("object", Value::Object(_))
            );
            if !ok {
                failures.push(format!("{name}: {key} should be a {kind}, is {}", v[key]));
            }
        }
        let largest = v["largest_tensors"].as_array().cloned().unwrap_or_default();
        if largest.is_empty() || largest.len() > 10 {
            failures.push(format!(
                "{name}: largest_tensors has {} entries",
                largest.len()
            ));
        }
        let bytes: Vec<u64> = largest
            .iter()
            .map(|t| t["bytes"].as_u64().unwrap_or(0))
            .collect();
        if bytes.windows(2).any(|w| w[0] < w[1]) {
            failures.push(format!(
                "{name}: largest_tensors not sorted by bytes: {bytes:?}"
            ));
        }
        for t in &largest {
            for k in ["name", "dtype", "shape", "bytes", "source"] {
                if t.get(k).is_none() {
                    failures.push(format!("{name}: largest_tensors entry lacks {k}: {t}"));
                }
            }
        }
        if v["external_data"].as_array().is_some_and(|a| !a.is_empty()) {
            failures.push(format!("{name}: inline model lists external data"));
        }
    }
    // silero-vad-16k-op15 has 12 If nodes, each with then/else branches.
    let op15 = repo().join("models/silero-vad-16k-op15.onnx");
    let subgraphs = inspect_json(&op15)["subgraphs"].clone();
    let ifs: Vec<&Value> = subgraphs
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["op"] == "If")
        .collect();
    if ifs.len() < 24 {
        failures.push(format!(
            "silero-vad-16k-op15: expected >= 24 If branches in subgraphs, got {}: {subgraphs}",
            ifs.len()
        ));
    }
    assert_no_failures("inspect --json fields", models.len(), &failures);
}

/// Written files get the mode any new file gets, 0666 less the umask (not the temporary
/// file's private 0600), for the model and its external data.
#[test]
fn output_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    // Weights in initializers, so that external data is written.
    let m = repo().join("models/magika-standard-v3-3.onnx");
    for (umask, want) in [("022", 0o644), ("077", 0o600)] {
        let out = dir.path().join(format!("u{umask}.onnx"));
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask} && exec \"$0\" optimize \"$1\" -o \"$2\" --passes none --external-data --no-check"
            ))
            .arg(BIN)
            .arg(&m)
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "umask {umask}");
        let data = dir.path().join(format!("u{umask}.onnx.data"));
        for f in [&out, &data] {
            let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{} under umask {umask}: {mode:o}", f.display());
        }
    }
}
