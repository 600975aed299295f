//! The default pipeline (`onnxopt optimize --no-check`) against the Python tools people use for
//! int8 weight quantization: time, peak memory, output size and accuracy, per model.
//!
//!     cargo bench --bench optimize      # release build, then about a minute
//!
//! Tools, each run as a child process on every `models/*.onnx`:
//! - `onnxopt optimize M.onnx -o OUT --no-check` (the binary of this build's profile);
//! - onnxruntime's `quantize_dynamic(M, OUT, weight_type=QuantType.QInt8)`;
//! - onnxsim's `simplify` then `quantize_weight_only` (what `onnxsim --weight-only-quantize`
//!   runs), when the installed onnxsim has it.
//!
//! Wall time is the child process's, interpreter start-up and imports included for Python
//! (`call s` is the time inside the tool's call, as `benches/py/quantize_peer.py` reports
//! it), best of 3 (`ONNXOPT_BENCH_RUNS`); a tool that fails is run once and shown as
//! `fails: <first line of its error>`. Peak RSS is the child's `ru_maxrss` from `wait4`.
//! Accuracy: `benches/py/accuracy.py` runs the original and each output in onnxruntime
//! (ORT_DISABLE_ALL) on the inputs of `models/M.npz` and compares the first output.
//!
//! Python runs in `target/benchenv`, a venv built from `benches/requirements.txt` and rebuilt
//! when that file's sha256 changes (as `tests/run.sh` does for `target/pyenv`);
//! `ONNXOPT_BENCH_PYTHON` names another interpreter that has those packages instead.
//! Outputs stay in `target/bench/optimize/` for inspection.
//!
//! Under `cargo test` (no `--bench` argument) this only checks that `optimize --no-check`
//! succeeds on the smallest model: no Python, no network, no timing.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use common::*;

/// onnxopt's wall time against onnxruntime's quantize_dynamic, on every model.
const SPEEDUP_TARGET: f64 = 20.0;
/// onnxopt's peak RSS over the model's file size.
const RSS_TARGET: f64 = 2.0;

fn onnxopt_optimize(model: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("optimize")
        .arg(model)
        .arg("-o")
        .arg(out)
        .arg("--no-check");
    cmd
}

/// First-output accuracy of one output in onnxruntime, as `benches/py/accuracy.py` reports it.
#[derive(Default)]
struct Accuracy {
    cosine: Option<f64>,
    max_abs: Option<f64>,
    int8_tensors: Option<u64>,
    elements: Option<u64>,
    error: Option<String>,
}

struct ToolRun {
    tool: &'static str,
    /// The best run and its output file, or the first line of the error.
    result: Result<(Measured, PathBuf), String>,
    /// Seconds inside the tool's call (Python peers only).
    call_s: Option<f64>,
    accuracy: Accuracy,
}

struct ModelRow {
    name: String,
    size: u64,
    tools: Vec<ToolRun>,
}

/// Runs `accuracy.py` on the original and every output that exists; fills `accuracy` in place.
fn measure_accuracy(python: &Path, model: &Path, tools: &mut [ToolRun]) {
    let bundle = model.with_extension("npz");
    let outs: Vec<PathBuf> = tools
        .iter()
        .filter_map(|t| t.result.as_ref().ok().map(|(_, p)| p.clone()))
        .collect();
    if outs.is_empty() {
        return;
    }
    let set_all = |tools: &mut [ToolRun], why: String| {
        for t in tools.iter_mut().filter(|t| t.result.is_ok()) {
            t.accuracy.error = Some(why.clone());
        }
    };
    if !bundle.exists() {
        set_all(tools, format!("no {}", bundle.display()));
        return;
    }
    let out = Command::new(python)
        .arg(repo().join("benches/py/accuracy.py"))
        .arg(model)
        .arg(&bundle)
        .args(&outs)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(v) = last_json(&stdout).filter(|_| out.status.success()) else {
        let why = first_line(&String::from_utf8_lossy(&out.stderr));
        set_all(tools, format!("accuracy.py failed: {why}"));
        return;
    };
    let results = v["candidates"].as_array().cloned().unwrap_or_default();
    for t in tools.iter_mut() {
        let Ok((_, path)) = &t.result else { continue };
        let path = path.to_string_lossy();
        if let Some(r) = results.iter().find(|r| r["path"].as_str() == Some(&path)) {
            t.accuracy = Accuracy {
                cosine: r["cosine"].as_f64(),
                max_abs: r["max_abs"].as_f64(),
                int8_tensors: r["int8_tensors"].as_u64(),
                elements: r["elements"].as_u64(),
                error: r["error"].as_str().map(str::to_owned),
            };
        }
    }
}

fn run_peer(
    python: &Path,
    tool: &'static str,
    script_tool: &str,
    model: &Path,
    out: &Path,
    runs: usize,
) -> ToolRun {
    let _ = fs::remove_file(out);
    let result = best_of(runs, || {
        let mut c = Command::new(python);
        c.arg(repo().join("benches/py/quantize_peer.py"))
            .arg(script_tool)
            .arg(model)
            .arg(out);
        c
    });
    match result {
        Ok(m) => {
            let call_s = last_json(&m.stdout).and_then(|v| v["call_s"].as_f64());
            ToolRun {
                tool,
                result: Ok((m, out.to_owned())),
                call_s,
                accuracy: Accuracy::default(),
            }
        }
        Err(m) => ToolRun {
            tool,
            result: Err(failure(&m)),
            call_s: None,
            accuracy: Accuracy::default(),
        },
    }
}

fn smoke() {
    // cargo test: one optimize run on the smallest model proves the harness works; no timing,
    // no Python.
    let small = smallest_model();
    for script in ["quantize_peer.py", "accuracy.py", "peers.py"] {
        let p = repo().join("benches/py").join(script);
        assert!(p.exists(), "{} is missing", p.display());
    }
    // A folder of its own: another `cargo test` on this target folder may run beside it.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("optimize-smoke.onnx");
    let m = measure(&mut onnxopt_optimize(&small, &out));
    assert!(
        m.status.success(),
        "onnxopt optimize --no-check failed on {}: {:?}\n{}",
        small.display(),
        m.status,
        m.stderr
    );
    assert!(file_size(&out) > 0, "{} is empty", out.display());
    println!(
        "optimize bench smoke: {} optimized; run `cargo bench --bench optimize` for figures",
        small.display()
    );
}

fn main() {
    if !is_bench() {
        smoke();
        return;
    }
    let runs = bench_runs(3);
    let dir = repo().join("target/bench/optimize");
    fs::create_dir_all(&dir).unwrap();

    let python = bench_python();
    let peers = probe_peers(&python);
    let version = |name: &str| peers["versions"][name].as_str().map(str::to_owned);
    assert!(
        version("onnxruntime").is_some(),
        "{} has no onnxruntime",
        python.display()
    );
    let with_onnxsim = peers["onnxsim_weight_only"].as_bool() == Some(true);

    // What onnxopt costs before it reads a model: a command that loads none.
    let startup = measure(Command::new(BIN).arg("list-passes"));
    assert!(startup.status.success(), "onnxopt list-passes failed");

    let mut rows = Vec::new();
    for model in models() {
        let name = stem(&model);
        println!("{name} ...");
        let mut tools = Vec::new();

        let out = dir.join(format!("{name}.onnxopt.onnx"));
        let _ = fs::remove_file(&out);
        let result = match best_of(runs, || onnxopt_optimize(&model, &out)) {
            Ok(m) => Ok((m, out)),
            Err(m) => Err(failure(&m)),
        };
        tools.push(ToolRun {
            tool: "onnxopt",
            result,
            call_s: None,
            accuracy: Accuracy::default(),
        });
        let out = dir.join(format!("{name}.quantize_dynamic.onnx"));
        tools.push(run_peer(
            &python,
            "ort quantize_dynamic",
            "onnxruntime",
            &model,
            &out,
            runs,
        ));
        if with_onnxsim {
            let out = dir.join(format!("{name}.onnxsim.onnx"));
            tools.push(run_peer(
                &python,
                "onnxsim weight-only",
                "onnxsim",
                &model,
                &out,
                runs,
            ));
        }
        measure_accuracy(&python, &model, &mut tools);
        rows.push(ModelRow {
            name,
            size: file_size(&model),
            tools,
        });
    }

    print_report(&rows, &peers, &startup, runs, &python);
    if rows.iter().any(|r| {
        r.tools
            .iter()
            .any(|t| t.tool == "onnxopt" && t.result.is_err())
    }) {
        eprintln!("onnxopt failed on at least one model (see the table)");
        std::process::exit(1);
    }
}

fn onnxopt_wall(row: &ModelRow) -> Option<f64> {
    row.tools
        .iter()
        .find(|t| t.tool == "onnxopt")
        .and_then(|t| t.result.as_ref().ok())
        .map(|(m, _)| m.wall.as_secs_f64())
}

fn print_report(rows: &[ModelRow], peers: &Value, startup: &Measured, runs: usize, py: &Path) {
    let v = |name: &str| {
        peers["versions"][name]
            .as_str()
            .unwrap_or("not installed")
            .to_owned()
    };
    println!();
    println!(
        "int8 weight quantization of each model: onnxopt's default pipeline vs the Python peers"
    );
    println!(
        "onnxopt = `{} optimize M.onnx -o OUT --no-check` (cleanup, fold_batchnorm,",
        BIN
    );
    println!("  quantize_weights_int8, cleanup; no tract check, so no accuracy-gated fallback);");
    println!(
        "ort quantize_dynamic = onnxruntime.quantization.quantize_dynamic(weight_type=QInt8);"
    );
    println!("onnxsim weight-only = onnxsim.simplify + onnxsim.quantize_weight_only + onnx.save.");
    println!(
        "wall s = child process wall time, best of {runs} (Python: interpreter start and imports \
         included); call s = inside the tool's call;"
    );
    println!(
        "RSS = peak resident set of the child (wait4 ru_maxrss); RSS/size = RSS / model file size;"
    );
    println!("speedup = tool wall s / onnxopt wall s; vs call = tool call s / onnxopt wall s;");
    println!(
        "MB = 2^20 bytes; smaller = model size / output size; int8 t = int8/uint8 tensors stored"
    );
    println!(
        "  in the output; cosine, max abs = first graph output of the output vs the original, both \
         run in onnxruntime"
    );
    println!("  (ORT_DISABLE_ALL, 1 thread) on the inputs of models/M.npz.");
    println!();
    println!(
        "{:<24} {:>7}  {:<20} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7} {:>7} {:>6} {:>9} {:>8}  note",
        "model",
        "size MB",
        "tool",
        "wall s",
        "call s",
        "RSS MB",
        "RSS/size",
        "speedup",
        "vs call",
        "out MB",
        "smaller",
        "int8 t",
        "cosine",
        "max abs"
    );
    for row in rows {
        let ours = onnxopt_wall(row);
        for (i, t) in row.tools.iter().enumerate() {
            let (name, size) = if i == 0 {
                (row.name.as_str(), format!("{:.3}", row.size as f64 / MB))
            } else {
                ("", String::new())
            };
            let (m, out) = match &t.result {
                Ok(r) => r,
                Err(why) => {
                    println!("{name:<24} {size:>7}  {:<20} fails: {why}", t.tool);
                    continue;
                }
            };
            let wall = m.wall.as_secs_f64();
            let out_size = file_size(out);
            let peer = t.tool != "onnxopt";
            let speedup = ours.filter(|_| peer).map(|o| wall / o);
            let vs_call = ours.zip(t.call_s).map(|(o, c)| c / o);
            let a = &t.accuracy;
            let mut notes = Vec::new();
            if a.int8_tensors == Some(0) {
                notes.push("stores no int8 weight".to_owned());
            }
            if a.elements == Some(1) {
                notes.push("first output is 1 element: cosine is only its sign".to_owned());
            }
            if let Some(e) = &a.error {
                notes.push(format!("accuracy: {e}"));
            }
            println!(
                "{name:<24} {size:>7}  {:<20} {:>7.3} {:>7} {:>7.1} {:>8.2} {:>8} {:>8} {:>7.3} {:>6.2}x {:>6} {:>9} {:>8}  {}",
                t.tool,
                wall,
                opt_f(t.call_s, |c| format!("{c:.3}")),
                m.max_rss as f64 / MB,
                m.max_rss as f64 / row.size as f64,
                opt_f(speedup, |s| format!("{s:.1}x")),
                opt_f(vs_call, |s| format!("{s:.1}x")),
                out_size as f64 / MB,
                row.size as f64 / out_size.max(1) as f64,
                a.int8_tensors
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".to_owned()),
                opt_f(a.cosine, |c| format!("{c:.6}")),
                opt_f(a.max_abs, |x| format!("{x:.2e}")),
                notes.join("; "),
            );
        }
    }

    println!();
    println!(
        "targets: onnxopt >= {SPEEDUP_TARGET}x faster than ort quantize_dynamic (process wall \
         time); onnxopt peak RSS <= {RSS_TARGET} x model file size"
    );
    println!(
        "onnxopt start-up RSS (`onnxopt list-passes`, no model read): {:.1} MB; (RSS - start-up) \
         / size shows what the model itself costs",
        startup.max_rss as f64 / MB
    );
    println!(
        "{:<24} {:>8} {:>14}  {:>8} {:>9}  {:>20}",
        "model", "speedup", "target", "RSS/size", "target", "(RSS-start-up)/size"
    );
    let mut speed_met = 0;
    let mut speed_n = 0;
    let mut rss_met = 0;
    for row in rows {
        let ours = row
            .tools
            .iter()
            .find(|t| t.tool == "onnxopt")
            .and_then(|t| t.result.as_ref().ok());
        let ort = row.tools.iter().find(|t| t.tool == "ort quantize_dynamic");
        let (speed, speed_ok) = match (ours, ort.map(|t| &t.result)) {
            (Some((o, _)), Some(Ok((p, _)))) => {
                let s = p.wall.as_secs_f64() / o.wall.as_secs_f64();
                speed_n += 1;
                let ok = s >= SPEEDUP_TARGET;
                speed_met += usize::from(ok);
                (format!("{s:.1}x"), if ok { "met" } else { "NOT met" })
            }
            (Some(_), Some(Err(_))) => ("-".to_owned(), "n/a: ort fails"),
            _ => ("-".to_owned(), "n/a"),
        };
        let (rss, rss_ok, over) = match ours {
            Some((o, _)) => {
                let r = o.max_rss as f64 / row.size as f64;
                let over = o.max_rss.saturating_sub(startup.max_rss) as f64 / row.size as f64;
                let ok = r <= RSS_TARGET;
                rss_met += usize::from(ok);
                (
                    format!("{r:.2}x"),
                    if ok { "met" } else { "NOT met" },
                    format!("{over:.2}x"),
                )
            }
            None => ("-".to_owned(), "n/a", "-".to_owned()),
        };
        println!(
            "{:<24} {speed:>8} {speed_ok:>14}  {rss:>8} {rss_ok:>9}  {over:>20}",
            row.name
        );
    }
    println!(
        "speedup target met on {speed_met} of the {speed_n} models quantize_dynamic accepts (of \
         {}); RSS target met on {rss_met} of {}",
        rows.len(),
        rows.len()
    );

    println!();
    println!(
        "python {}: onnx {}, onnxruntime {}, numpy {}, onnxsim {}, onnxslim {}",
        py.display(),
        v("onnx"),
        v("onnxruntime"),
        v("numpy"),
        v("onnxsim"),
        v("onnxslim")
    );
    if peers["onnxsim_weight_only"].as_bool() != Some(true) {
        println!(
            "onnxsim {}: no column: onnxsim.quantize_weight_only is not available",
            v("onnxsim")
        );
    }
    match &peers["onnxslim_options"] {
        Value::Null => println!("onnxslim: no column: not installed in {}", py.display()),
        Value::Array(opts) => {
            let found: Vec<String> = opts
                .iter()
                .map(|o| {
                    let choices: Vec<&str> = o["choices"]
                        .as_array()
                        .map(|c| c.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    format!(
                        "{} {{{}}}",
                        o["option"].as_str().unwrap_or("?"),
                        choices.join(",")
                    )
                })
                .collect();
            let has_int8 = opts.iter().any(|o| {
                let text = o.to_string();
                text.contains("int8") || text.contains("quant")
            });
            if has_int8 {
                println!(
                    "onnxslim {}: has quantization options ({}) that this bench does not run yet",
                    v("onnxslim"),
                    found.join(", ")
                );
            } else {
                println!(
                    "onnxslim {}: no column: it has no int8 or weight-only quantization; its only \
                     precision option is {} (a float cast of the whole model, activations \
                     included; fp16 also needs onnxconverter-common, which it does not depend on)",
                    v("onnxslim"),
                    if found.is_empty() {
                        "none".to_owned()
                    } else {
                        found.join(", ")
                    }
                );
            }
        }
        other => println!(
            "onnxslim {}: no column: probe failed: {other}",
            v("onnxslim")
        ),
    }
    println!(
        "outputs: {}",
        repo().join("target/bench/optimize").display()
    );
}
