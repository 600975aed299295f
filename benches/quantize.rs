//! Calibrated static int8 quantization: `onnxopt quantize --mode static` against onnxruntime's
//! `quantize_static` and onnxsim's static quantizers, on the same calibration data, per model:
//! time, peak memory, output size, accuracy on held-out inputs and onnxruntime latency.
//!
//!     cargo bench --bench quantize      # release build, then several minutes
//!
//! Data, per `models/M.onnx` (in `target/bench/quantize/M/`): 32 calibration samples (seed 1)
//! and 8 held-out samples (seed 2), one `.npz` each, written by `tests/py/make_samples.py` from
//! the graph inputs of `models/M.npz`. Every tool reads the same calibration files.
//!
//! Tools, each run as a child process:
//! - `onnxopt quantize M -o OUT --mode static --calibration CAL --inputs M.npz --report R`:
//!   onnxopt as users run it, tract check and accuracy-gated fallback included; and the same
//!   with `--no-fallback` (the raw pass; still checked, exit 1 when its gate fails is reported
//!   in the note, not as a failure). `float` = layers the fallback kept in float (`--report`).
//! - onnxruntime's `quantize_static` (QDQ, QUInt8 activations, QInt8 weights, MinMax,
//!   per-channel weights at opset >= 13) through a `CalibrationDataReader` over the same files;
//!   and, labelled `after onnxopt cleanup`, the same on the output of
//!   `onnxopt optimize M --passes cleanup --no-check` (weights in Constant nodes become
//!   initializers, which onnxruntime's quantizer needs); its wall time is both processes', its
//!   RSS the larger of the two.
//! - onnxsim's `simplify` + `quantize_static` (QDQ on MatMul/Gemm/Conv inputs) and
//!   `simplify` + `quantize_full_qdq` (every activation in QDQ), on the same samples.
//!
//! See `benches/py/quantize_peer.py` for each peer's exact call.
//!
//! Wall time is the child process's (Python start-up and imports included; `call s` is the
//! time inside the tool's call), best of 3 (`ONNXOPT_BENCH_RUNS`); peak RSS is the child's
//! `ru_maxrss` from `wait4`. A tool that fails is run once and shown as `fails: <first line
//! of its error>`.
//!
//! Accuracy (`benches/py/heldout_accuracy.py`): every output of each result against the fp32
//! original in onnxruntime on the 8 held-out samples, the original unoptimised
//! (ORT_DISABLE_ALL), each result with default session options (as it deploys); the table
//! shows the output with the lowest cosine over the samples taken together (their outputs
//! concatenated). Latency (`tests/py/ort_latency.py`): onnxruntime
//! default session options, 1 thread, median of 50 interleaved runs
//! (`ONNXOPT_BENCH_LATENCY_RUNS`) on the first held-out sample, the fp32 original first.
//!
//! Python runs in `target/benchenv` (`benches/requirements.txt`; `ONNXOPT_BENCH_PYTHON` names
//! another interpreter). Outputs stay in `target/bench/quantize/` for inspection.
//!
//! Under `cargo test` (no `--bench` argument) this only checks that the scripts exist and that
//! `quantize --mode static` runs on a small model with a calibration file made here: no Python,
//! no timing.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use common::*;

/// onnxopt's wall time against onnxruntime's quantize_static, end to end.
const SPEEDUP_TARGET: f64 = 10.0;
const CALIBRATION_SAMPLES: usize = 32;
const CALIBRATION_SEED: u64 = 1;
const HELDOUT_SAMPLES: usize = 8;
const HELDOUT_SEED: u64 = 2;

const ONNXOPT: &str = "onnxopt static";
const ONNXOPT_RAW: &str = "onnxopt --no-fallback";
const ORT: &str = "ort quantize_static";
const ORT_CLEANUP: &str = "ort q_s after onnxopt cleanup";
const ONNXSIM: &str = "onnxsim quantize_static";
const ONNXSIM_FULL: &str = "onnxsim full_qdq";

/// Accuracy of one result: the output with the lowest cosine over the held-out samples.
struct Accuracy {
    output: String,
    outputs: usize,
    cosine: f64,
    min_cosine: f64,
    max_abs: f64,
}

/// One tool's result on one model.
struct ToolRun {
    tool: &'static str,
    /// The output file, or the first line of the error.
    result: Result<PathBuf, String>,
    wall: f64,
    max_rss: u64,
    /// Seconds inside the tool's call (Python peers only).
    call_s: Option<f64>,
    /// Layers the fallback kept in float (onnxopt only).
    kept: Option<Vec<String>>,
    notes: Vec<String>,
    int8_tensors: Option<u64>,
    accuracy: Result<Accuracy, String>,
    latency_ms: Result<f64, String>,
}

impl ToolRun {
    fn new(tool: &'static str, result: Result<PathBuf, String>) -> Self {
        ToolRun {
            tool,
            result,
            wall: 0.0,
            max_rss: 0,
            call_s: None,
            kept: None,
            notes: Vec::new(),
            int8_tensors: None,
            accuracy: Err("not measured".to_owned()),
            latency_ms: Err("not measured".to_owned()),
        }
    }

    fn ok(&self) -> Option<&Path> {
        self.result.as_ref().ok().map(PathBuf::as_path)
    }
}

struct ModelRow {
    name: String,
    size: u64,
    fp32_latency_ms: Result<f64, String>,
    /// tract's fp32 latency, optimized plan, one thread (what calibration runs on).
    tract_latency_ms: Result<f64, String>,
    tools: Vec<ToolRun>,
}

impl ModelRow {
    fn tool(&self, name: &str) -> Option<&ToolRun> {
        self.tools
            .iter()
            .find(|t| t.tool == name && t.ok().is_some())
    }
}

/// Graph input names, from `onnxopt inspect --json`.
fn input_names(model: &Path) -> Vec<String> {
    let out = Command::new(BIN)
        .arg("inspect")
        .arg(model)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnxopt inspect {} failed: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Writes `n` samples of the model's inputs into a fresh `dir` with `tests/py/make_samples.py`.
fn make_samples(python: &Path, model: &Path, dir: &Path, n: usize, seed: u64) {
    let _ = fs::remove_dir_all(dir);
    run_step(
        Command::new(python)
            .arg(repo().join("tests/py/make_samples.py"))
            .arg(model.with_extension("npz"))
            .arg(dir)
            .arg(n.to_string())
            .arg(seed.to_string())
            .arg("--inputs")
            .arg(input_names(model).join(",")),
    );
}

fn onnxopt_static(model: &Path, out: &Path, cal: &Path, report: &Path, fallback: bool) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("quantize")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(["--mode", "static", "--calibration"])
        .arg(cal)
        .arg("--inputs")
        .arg(model.with_extension("npz"))
        .arg("--report")
        .arg(report)
        .arg("-q");
    if !fallback {
        cmd.arg("--no-fallback");
    }
    cmd
}

fn onnxopt_cleanup(model: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("optimize").arg(model).arg("-o").arg(out).args([
        "--passes",
        "cleanup",
        "--no-check",
        "-q",
    ]);
    cmd
}

fn peer(python: &Path, script_tool: &str, model: &Path, out: &Path, cal: &Path) -> Command {
    let mut c = Command::new(python);
    c.arg(repo().join("benches/py/quantize_peer.py"))
        .arg(script_tool)
        .arg(model)
        .arg(out)
        .arg(cal);
    c
}

/// Best of `runs` by wall time, counting as success what `ok` accepts; the first run it does
/// not accept ends the series and is the `Err`.
fn best_accepted(
    runs: usize,
    mut make: impl FnMut() -> Command,
    ok: impl Fn(&Measured) -> bool,
) -> Result<Measured, Measured> {
    let mut best: Option<Measured> = None;
    for _ in 0..runs {
        let m = measure(&mut make());
        if !ok(&m) {
            return Err(m);
        }
        if best.as_ref().is_none_or(|b| m.wall < b.wall) {
            best = Some(m);
        }
    }
    Ok(best.unwrap())
}

/// A failure's first line, shortened for the table.
fn short(why: &str) -> String {
    const MAX: usize = 150;
    if why.chars().count() <= MAX {
        why.to_owned()
    } else {
        format!("{}...", why.chars().take(MAX).collect::<String>())
    }
}

/// onnxopt's run (exit 0, or exit 1 = the accuracy gate failed with the output written).
fn run_onnxopt(
    tool: &'static str,
    model: &Path,
    dir: &Path,
    cal: &Path,
    fallback: bool,
    runs: usize,
) -> ToolRun {
    let suffix = if fallback { "onnxopt" } else { "onnxopt-raw" };
    let out = dir.join(format!("{suffix}.onnx"));
    let report = dir.join(format!("{suffix}.json"));
    let _ = fs::remove_file(&out);
    let written = |m: &Measured| matches!(m.status.code(), Some(0 | 1)) && out.exists();
    let r = best_accepted(
        runs,
        || onnxopt_static(model, &out, cal, &report, fallback),
        written,
    );
    let m = match r {
        Ok(m) => m,
        Err(m) => return ToolRun::new(tool, Err(short(&failure(&m)))),
    };
    let mut t = ToolRun::new(tool, Ok(out.clone()));
    t.wall = m.wall.as_secs_f64();
    t.max_rss = m.max_rss;
    if m.status.code() == Some(1) {
        t.notes.push("onnxopt's gate failed (exit 1)".to_owned());
    }
    if let Ok(text) = fs::read_to_string(&report) {
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        t.kept = Some(
            v["fallback"]["kept"]
                .as_array()
                .map(|k| {
                    k.iter()
                        .map(|e| e["node"].as_str().unwrap_or("?").to_owned())
                        .collect()
                })
                .unwrap_or_default(),
        );
        if let Some(s) = v["check"]["status"]["status"].as_str() {
            if s != "checked" {
                t.notes.push(format!("tract check: {s}"));
            }
        }
    }
    t
}

fn run_peer_tool(
    python: &Path,
    tool: &'static str,
    script_tool: &str,
    model: &Path,
    out: &Path,
    cal: &Path,
    runs: usize,
) -> ToolRun {
    let _ = fs::remove_file(out);
    match best_of(runs, || peer(python, script_tool, model, out, cal)) {
        Ok(m) => {
            let mut t = ToolRun::new(tool, Ok(out.to_owned()));
            t.wall = m.wall.as_secs_f64();
            t.max_rss = m.max_rss;
            t.call_s = last_json(&m.stdout).and_then(|v| v["call_s"].as_f64());
            t
        }
        Err(m) => ToolRun::new(tool, Err(short(&failure(&m)))),
    }
}

/// onnxruntime's quantize_static on onnxopt's cleanup of the model: both steps timed.
fn run_ort_after_cleanup(
    python: &Path,
    model: &Path,
    dir: &Path,
    cal: &Path,
    runs: usize,
) -> ToolRun {
    let clean = dir.join("cleanup.onnx");
    let cleanup = match best_of(runs, || onnxopt_cleanup(model, &clean)) {
        Ok(m) => m,
        Err(m) => return ToolRun::new(ORT_CLEANUP, Err(short(&failure(&m)))),
    };
    let out = dir.join("ort-static-after-cleanup.onnx");
    let mut t = run_peer_tool(python, ORT_CLEANUP, "ort-static", &clean, &out, cal, runs);
    t.wall += cleanup.wall.as_secs_f64();
    t.max_rss = t.max_rss.max(cleanup.max_rss);
    t
}

/// Runs `heldout_accuracy.py` on every result that exists; fills `accuracy` and
/// `int8_tensors` in place.
fn measure_accuracy(python: &Path, model: &Path, held: &Path, tools: &mut [ToolRun]) {
    let outs: Vec<PathBuf> = tools
        .iter()
        .filter_map(|t| t.ok().map(Path::to_path_buf))
        .collect();
    if outs.is_empty() {
        return;
    }
    let out = Command::new(python)
        .arg(repo().join("benches/py/heldout_accuracy.py"))
        .arg(model)
        .arg(held)
        .args(&outs)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let Some(v) = last_json(&String::from_utf8_lossy(&out.stdout)).filter(|_| out.status.success())
    else {
        let why = first_line(&String::from_utf8_lossy(&out.stderr));
        for t in tools.iter_mut() {
            t.accuracy = Err(format!("heldout_accuracy.py failed: {why}"));
        }
        return;
    };
    let results = v["candidates"].as_array().cloned().unwrap_or_default();
    for t in tools.iter_mut() {
        let Some(path) = t.ok().map(|p| p.to_string_lossy().into_owned()) else {
            continue;
        };
        let Some(r) = results.iter().find(|r| r["path"].as_str() == Some(&path)) else {
            continue;
        };
        t.int8_tensors = r["int8_tensors"].as_u64();
        if let Some(e) = r["error"].as_str() {
            t.accuracy = Err(e.to_owned());
            continue;
        }
        let outputs = r["outputs"].as_array().cloned().unwrap_or_default();
        let worst = outputs.iter().min_by(|a, b| {
            let (a, b) = (a["cosine"].as_f64(), b["cosine"].as_f64());
            a.unwrap_or(f64::NAN).total_cmp(&b.unwrap_or(f64::NAN))
        });
        t.accuracy = match worst {
            Some(w) => Ok(Accuracy {
                output: w["name"].as_str().unwrap_or("?").to_owned(),
                outputs: outputs.len(),
                cosine: w["cosine"].as_f64().unwrap_or(f64::NAN),
                min_cosine: w["min_cosine"].as_f64().unwrap_or(f64::NAN),
                max_abs: outputs
                    .iter()
                    .filter_map(|o| o["max_abs"].as_f64())
                    .fold(0.0, f64::max),
            }),
            None => Err("no output compared".to_owned()),
        };
    }
}

/// onnxruntime latency of the original and of every result that onnxruntime ran for the
/// accuracy check, timed interleaved by `tests/py/ort_latency.py`.
fn measure_latency(python: &Path, model: &Path, held: &Path, row: &mut ModelRow, runs: usize) {
    let outs: Vec<PathBuf> = row
        .tools
        .iter()
        .filter(|t| t.accuracy.is_ok())
        .filter_map(|t| t.ok().map(Path::to_path_buf))
        .collect();
    let out = Command::new(python)
        .arg(repo().join("tests/py/ort_latency.py"))
        .arg(model)
        .args(&outs)
        .arg(held.join("sample_000.npz"))
        .args(["--runs", &runs.to_string(), "--threads", "1"])
        .arg("--optimized-dir")
        .arg(held.with_file_name("ort-optimized"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parsed: Option<Value> = serde_json::from_str(&stdout).ok();
    let Some(v) = parsed.filter(|_| out.status.success()) else {
        let why = format!(
            "ort_latency.py failed: {}",
            first_line(&String::from_utf8_lossy(&out.stderr))
        );
        row.fp32_latency_ms = Err(why.clone());
        for t in row.tools.iter_mut() {
            t.latency_ms = Err(why.clone());
        }
        return;
    };
    let rows = v["models"].as_array().cloned().unwrap_or_default();
    let median = |p: &Path| {
        let p = p.to_string_lossy();
        rows.iter()
            .find(|r| r["path"].as_str() == Some(&p))
            .and_then(|r| r["median_ms"].as_f64())
            .ok_or_else(|| "not timed".to_owned())
    };
    row.fp32_latency_ms = median(model);
    for t in row.tools.iter_mut() {
        if let Some(p) = t.ok() {
            t.latency_ms = match &t.accuracy {
                Ok(_) => median(p),
                Err(_) => Err("onnxruntime did not run it".to_owned()),
            };
        }
    }
}

/// tract's latency of the fp32 `model` on its bundled inputs (`<model>.npz`, the graph inputs
/// of it), in ms: its optimized plan (as calibration runs it), one thread, median of `runs`
/// runs after one warm-up; If nodes resolved for those inputs first, as every tract run of
/// onnxopt does.
fn tract_latency_ms(model: &Path, runs: usize) -> Result<f64, String> {
    use onnxopt::verify::{inputs::load_npz, specialize::inline_ifs};
    use prost::Message;
    use tract_onnx::prelude::*;
    let e = |e: anyhow::Error| format!("{e:#}");
    let bytes = fs::read(model).map_err(|x| x.to_string())?;
    let proto = onnxopt::onnx::decode(bytes.into(), &model.display().to_string()).map_err(e)?;
    let all = load_npz(&model.with_extension("npz")).map_err(e)?;
    let proto = inline_ifs(&proto, model.parent(), &all).unwrap_or(proto);
    let buf = proto.encode_to_vec();
    let mut m = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .model_for_read(&mut buf.as_slice())
        .map_err(e)?;
    let mut fed = TVec::new();
    for (ix, outlet) in m
        .input_outlets()
        .map_err(e)?
        .to_vec()
        .into_iter()
        .enumerate()
    {
        let name = m.node(outlet.node).name.clone();
        let t = all
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| format!("no array for input `{name}`"))?;
        m.set_input_fact(ix, InferenceFact::dt_shape_from_tensor(&t))
            .map_err(e)?;
        fed.push(t.into_tvalue());
    }
    let plan = m
        .into_optimized()
        .and_then(|o| o.into_runnable())
        .map_err(e)?;
    plan.run(fed.clone()).map_err(e)?;
    let mut ms: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t0 = std::time::Instant::now();
            plan.run(fed.clone())
                .map(|_| t0.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<TractResult<_>>()
        .map_err(e)?;
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn smoke() {
    // cargo test: the scripts exist and static quantization runs on a small model with a
    // calibration file written here; no Python, no timing.
    for script in ["quantize_peer.py", "heldout_accuracy.py", "accuracy.py"] {
        let p = repo().join("benches/py").join(script);
        assert!(p.exists(), "{} is missing", p.display());
    }
    for script in ["make_samples.py", "ort_latency.py"] {
        let p = repo().join("tests/py").join(script);
        assert!(p.exists(), "{} is missing", p.display());
    }
    let model = repo().join("models/ppocr-mobile-v2-cls.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("q.json");
    // The model's own input bundle is a valid calibration file (other keys are ignored).
    let cal = model.with_extension("npz");
    let mut cmd = onnxopt_static(&model, &out, &cal, &report, true);
    cmd.arg("--no-check");
    let m = measure(&mut cmd);
    assert!(
        m.status.success(),
        "onnxopt quantize --mode static failed on {}: {:?}\n{}",
        model.display(),
        m.status,
        m.stderr
    );
    assert!(file_size(&out) > 0, "{} is empty", out.display());
    assert!(report.exists(), "no report {}", report.display());
    println!(
        "quantize bench smoke: {} quantized (static); run `cargo bench --bench quantize` for \
         figures",
        model.display()
    );
}

fn main() {
    if !is_bench() {
        smoke();
        return;
    }
    let runs = bench_runs(3);
    let latency_runs: usize = std::env::var("ONNXOPT_BENCH_LATENCY_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let root = repo().join("target/bench/quantize");
    fs::create_dir_all(&root).unwrap();
    let python = bench_python();
    let peers = probe_peers(&python);
    assert!(
        peers["versions"]["onnxruntime"].is_string(),
        "{} has no onnxruntime",
        python.display()
    );
    let with_onnxsim = peers["versions"]["onnxsim"].is_string();

    let mut rows = Vec::new();
    for model in models() {
        let name = stem(&model);
        println!("{name} ...");
        let dir = root.join(&name);
        fs::create_dir_all(&dir).unwrap();
        let cal = dir.join("calibration");
        let held = dir.join("heldout");
        make_samples(&python, &model, &cal, CALIBRATION_SAMPLES, CALIBRATION_SEED);
        make_samples(&python, &model, &held, HELDOUT_SAMPLES, HELDOUT_SEED);

        let mut tools = vec![
            run_onnxopt(ONNXOPT, &model, &dir, &cal, true, runs),
            run_onnxopt(ONNXOPT_RAW, &model, &dir, &cal, false, runs),
        ];
        let out = dir.join("ort-static.onnx");
        tools.push(run_peer_tool(
            &python,
            ORT,
            "ort-static",
            &model,
            &out,
            &cal,
            runs,
        ));
        tools.push(run_ort_after_cleanup(&python, &model, &dir, &cal, runs));
        if with_onnxsim {
            for (tool, script) in [
                (ONNXSIM, "onnxsim-static"),
                (ONNXSIM_FULL, "onnxsim-full-qdq"),
            ] {
                let out = dir.join(format!("{script}.onnx"));
                tools.push(run_peer_tool(
                    &python, tool, script, &model, &out, &cal, runs,
                ));
            }
        }
        measure_accuracy(&python, &model, &held, &mut tools);
        let mut row = ModelRow {
            name,
            size: file_size(&model),
            fp32_latency_ms: Err("not measured".to_owned()),
            tract_latency_ms: Err("not measured".to_owned()),
            tools,
        };
        measure_latency(&python, &model, &held, &mut row, latency_runs);
        rows.push(row);
    }
    // In this process, after every tool ran: a child's peak RSS (wait4) starts from this
    // process's at fork on Linux, which models loaded here would raise.
    for (row, model) in rows.iter_mut().zip(models()) {
        row.tract_latency_ms = tract_latency_ms(&model, latency_runs);
    }
    print_report(&rows, &peers, runs, latency_runs, &python);
}

/// The onnxruntime row the speed-up is measured against: quantize_static on the model as
/// given, else after onnxopt's cleanup.
fn ort_reference(row: &ModelRow) -> Option<&ToolRun> {
    row.tool(ORT).or_else(|| row.tool(ORT_CLEANUP))
}

fn print_report(rows: &[ModelRow], peers: &Value, runs: usize, latency_runs: usize, py: &Path) {
    let v = |name: &str| {
        peers["versions"][name]
            .as_str()
            .unwrap_or("not installed")
            .to_owned()
    };
    println!();
    println!(
        "calibrated static int8 quantization (QDQ, uint8 activations, int8 weights, MinMax) on \
         {CALIBRATION_SAMPLES} samples (seed {CALIBRATION_SEED}), accuracy on \
         {HELDOUT_SAMPLES} held-out samples (seed {HELDOUT_SEED})"
    );
    println!(
        "wall s = child process wall time, best of {runs} (Python: interpreter start and imports \
         included); call s = inside the tool's call;"
    );
    println!(
        "RSS = peak resident set of the child (wait4 ru_maxrss); faster = ort quantize_static \
         wall s / tool wall s (ort after cleanup where ort fails);"
    );
    println!(
        "MB = 2^20 bytes; smaller = model size / output size; int8 t = int8/uint8 tensors \
         stored; float = layers onnxopt's fallback kept in float;"
    );
    println!(
        "cosine, min cos, max abs: every output vs the fp32 original in onnxruntime on the \
         held-out samples (cosine over all samples, min cos = worst"
    );
    println!(
        "  single sample), the output with the lowest cosine shown; ms = onnxruntime median \
         latency, default session options, 1 thread, {latency_runs} interleaved runs;"
    );
    println!("vs fp32 = latency / fp32 latency (below 1 is faster).");
    println!();
    println!(
        "{:<24} {:>7}  {:<29} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>5} {:>9} {:>9} {:>8} {:>7} {:>7}  note",
        "model",
        "size MB",
        "tool",
        "wall s",
        "call s",
        "RSS MB",
        "faster",
        "out MB",
        "smaller",
        "int8 t",
        "float",
        "cosine",
        "min cos",
        "max abs",
        "ms",
        "vs fp32"
    );
    for row in rows {
        let fp32 = row.fp32_latency_ms.as_ref().ok().copied();
        let lat = |l: &Result<f64, String>| match l {
            Ok(ms) => (
                format!("{ms:.2}"),
                opt_f(fp32, |f| format!("{:.2}", ms / f)),
            ),
            Err(_) => ("-".to_owned(), "-".to_owned()),
        };
        let (ms, _) = lat(&row.fp32_latency_ms);
        let mut note = String::new();
        if let Err(e) = &row.fp32_latency_ms {
            note = format!("latency: {e}");
        }
        println!(
            "{:<24} {:>7.3}  {:<29} {:>7} {:>7} {:>7} {:>7} {:>7.3} {:>7} {:>6} {:>5} {:>9} {:>9} {:>8} {ms:>7} {:>7}  {note}",
            row.name,
            row.size as f64 / MB,
            "fp32 original",
            "",
            "",
            "",
            "",
            row.size as f64 / MB,
            "1.00x",
            "",
            "",
            "",
            "",
            "",
            "1.00",
        );
        let reference = ort_reference(row).map(|t| t.wall);
        for t in &row.tools {
            let Some(out) = t.ok() else {
                let why = t.result.as_ref().err().map(String::as_str).unwrap_or("");
                println!("{:<24} {:>7}  {:<29} fails: {why}", "", "", t.tool);
                continue;
            };
            let out_size = file_size(out);
            let mut notes = t.notes.clone();
            if t.int8_tensors == Some(0) {
                notes.push("stores no int8 tensor".to_owned());
            }
            let (cos, min_cos, max_abs) = match &t.accuracy {
                Ok(a) => {
                    if a.outputs > 1 {
                        notes.push(format!("worst of {} outputs: {}", a.outputs, a.output));
                    }
                    (
                        format!("{:.6}", a.cosine),
                        format!("{:.6}", a.min_cosine),
                        format!("{:.2e}", a.max_abs),
                    )
                }
                Err(e) => {
                    notes.push(format!("onnxruntime: {e}"));
                    ("-".to_owned(), "-".to_owned(), "-".to_owned())
                }
            };
            let (ms, vs) = lat(&t.latency_ms);
            println!(
                "{:<24} {:>7}  {:<29} {:>7.3} {:>7} {:>7.1} {:>7} {:>7.3} {:>6.2}x {:>6} {:>5} {cos:>9} {min_cos:>9} {max_abs:>8} {ms:>7} {vs:>7}  {}",
                "",
                "",
                t.tool,
                t.wall,
                opt_f(t.call_s, |c| format!("{c:.3}")),
                t.max_rss as f64 / MB,
                opt_f(reference.map(|r| r / t.wall), |s| format!("{s:.1}x")),
                out_size as f64 / MB,
                row.size as f64 / out_size.max(1) as f64,
                t.int8_tensors
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".to_owned()),
                t.kept
                    .as_ref()
                    .map(|k| k.len().to_string())
                    .unwrap_or_default(),
                notes.join("; "),
            );
        }
    }

    println!();
    println!("layers onnxopt's accuracy-gated fallback kept in float:");
    for row in rows {
        if let Some(k) = row.tool(ONNXOPT).and_then(|t| t.kept.as_ref()) {
            if !k.is_empty() {
                println!("  {}: {}", row.name, k.join(", "));
            }
        }
    }

    println!();
    println!(
        "targets: onnxopt static (fallback included) >= {SPEEDUP_TARGET}x faster than ort \
         quantize_static end to end (process wall time); no worse accuracy (lowest output \
         cosine on the held-out samples) at equal or smaller size"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "10x needs s = reference wall s / {SPEEDUP_TARGET}; floor s = {CALIBRATION_SAMPLES} \
         samples x fp32 onnxruntime latency / {cores} cores: the least time any tool needs just \
         to run the calibration samples through the model on this machine, at onnxruntime's own \
         speed (10x is out of reach where floor s > 10x needs s); tract s = the same at tract's \
         speed (fp32, optimized plan, 1 thread), where onnxopt's calibration runs"
    );
    println!(
        "{:<24} {:<29} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8}  {:>10} {:>10} {:>8} {:>8}  {:<40} {:>8} {:>8}",
        "model",
        "reference",
        "faster",
        "vs call",
        "10x",
        "needs s",
        "floor s",
        "tract s",
        "cos ours",
        "cos ort",
        "MB ours",
        "MB ort",
        "accuracy at size",
        "ms ours",
        "ms ort"
    );
    let mut met = 0;
    let mut n = 0;
    let mut out_of_reach = 0;
    let mut out_of_reach_tract = 0;
    for row in rows {
        let Some(o) = row.tool(ONNXOPT) else {
            println!("{:<24} {:<29} n/a: onnxopt fails", row.name, "");
            continue;
        };
        let refs: Vec<&ToolRun> = [ORT, ORT_CLEANUP]
            .iter()
            .filter_map(|name| row.tool(name))
            .collect();
        if refs.is_empty() {
            println!("{:<24} {:<29} n/a: onnxruntime fails", row.name, "");
            continue;
        }
        n += 1;
        met += usize::from(refs[0].wall / o.wall >= SPEEDUP_TARGET);
        let floor = row
            .fp32_latency_ms
            .as_ref()
            .ok()
            .map(|ms| CALIBRATION_SAMPLES as f64 * ms / 1000.0 / cores as f64);
        out_of_reach += usize::from(floor.is_some_and(|f| f > refs[0].wall / SPEEDUP_TARGET));
        let tract_floor = row
            .tract_latency_ms
            .as_ref()
            .ok()
            .map(|ms| CALIBRATION_SAMPLES as f64 * ms / 1000.0 / cores as f64);
        out_of_reach_tract +=
            usize::from(tract_floor.is_some_and(|f| f > refs[0].wall / SPEEDUP_TARGET));
        for (i, r) in refs.into_iter().enumerate() {
            let speed = r.wall / o.wall;
            let size_o = file_size(o.ok().unwrap());
            let size_r = file_size(r.ok().unwrap());
            let cos = |t: &ToolRun| t.accuracy.as_ref().ok().map(|a| a.cosine);
            let verdict = match (cos(o), cos(r)) {
                (Some(co), Some(cr)) => {
                    let size = size_o as f64 / size_r as f64;
                    // The raw pass, when no larger and no worse, shows accuracy at equal size.
                    let raw = row
                        .tool(ONNXOPT_RAW)
                        .and_then(|t| Some((cos(t)?, file_size(t.ok()?))))
                        .filter(|&(c, s)| c >= cr && s <= size_r);
                    match (co >= cr, size_o <= size_r) {
                        (true, true) => "no worse, no larger: met".to_owned(),
                        (true, false) => match raw {
                            Some((c, s)) => format!(
                                "{:.0}% larger; raw {c:.6} at {:.3} MB: met",
                                (size - 1.0) * 100.0,
                                s as f64 / MB
                            ),
                            None => format!("no worse, {:.0}% larger", (size - 1.0) * 100.0),
                        },
                        (false, true) => "worse accuracy: NOT met".to_owned(),
                        (false, false) => {
                            format!("worse and {:.0}% larger: NOT met", (size - 1.0) * 100.0)
                        }
                    }
                }
                _ => "n/a".to_owned(),
            };
            let ms =
                |t: &ToolRun| opt_f(t.latency_ms.as_ref().ok().copied(), |m| format!("{m:.2}"));
            println!(
                "{:<24} {:<29} {:>7.1}x {:>8} {:>9} {:>8.3} {:>8} {:>8}  {:>10} {:>10} {:>8.3} {:>8.3}  {verdict:<40} {:>8} {:>8}",
                if i == 0 { row.name.as_str() } else { "" },
                r.tool,
                speed,
                opt_f(r.call_s.map(|c| c / o.wall), |s| format!("{s:.1}x")),
                if speed >= SPEEDUP_TARGET { "met" } else { "NOT met" },
                r.wall / SPEEDUP_TARGET,
                opt_f(floor, |f| format!("{f:.3}")),
                opt_f(tract_floor, |f| format!("{f:.3}")),
                opt_f(cos(o), |c| format!("{c:.6}")),
                opt_f(cos(r), |c| format!("{c:.6}")),
                size_o as f64 / MB,
                size_r as f64 / MB,
                ms(o),
                ms(r),
            );
        }
    }
    println!(
        "speed target (against ort quantize_static on the model as given, else after cleanup) \
         met on {met} of the {n} models both tools quantize (of {}); out of reach by the \
         floor on {out_of_reach}, by tract's speed of the calibration samples alone on \
         {out_of_reach_tract}",
        rows.len()
    );
    println!();
    println!(
        "python {}: onnx {}, onnxruntime {}, numpy {}, onnxsim {}",
        py.display(),
        v("onnx"),
        v("onnxruntime"),
        v("numpy"),
        v("onnxsim"),
    );
    println!(
        "outputs: {}",
        repo().join("target/bench/quantize").display()
    );
}
