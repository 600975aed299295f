//! Load + save throughput and peak memory of `onnxopt optimize --passes none`, against
//! Python's `onnx.load` + `onnx.save`.
//!
//!     cargo bench --bench io            # release build; about 2 minutes with the 1 GiB model
//!     ONNXOPT_BENCH_BIG_MIB=0 cargo bench --bench io   # real models only
//!
//! Models: every `models/*.onnx` and a synthetic model with 1 GiB of float32 initializers
//! (64 MatMul weights of 16 MiB in a chain), written once to `target/bench/` by
//! `tests/py/make_big.py` (`ONNXOPT_BENCH_BIG_MIB` sets its size). Each tool runs as a child
//! process; wall time is best of 3 (1 run for the big model) and peak RSS is the child's
//! `ru_maxrss` from `wait4`. Python runs in the venv that `tests/run.sh` builds
//! (`ONNXOPT_PYTHON`, else `target/pyenv/bin/python`); its time is the in-process
//! load + save time that `tests/py/load_save.py` reports (interpreter start and imports
//! excluded), its RSS includes the interpreter.
//!
//! Under `cargo test` (no `--bench` argument) this only checks that one small round-trip
//! runs, so the test suite stays fast.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Best of `runs` by wall time; panics if any run fails.
fn best_of_ok(runs: usize, make: impl FnMut() -> Command) -> Measured {
    best_of(runs, make).unwrap_or_else(|m| panic!("{:?}: {}", m.status, m.stderr))
}

fn onnxopt_roundtrip(model: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("optimize")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(["--passes", "none"]);
    cmd
}

/// The synthetic model, made once and reused while its size is right.
fn big_model(dir: &Path, mib: u64) -> PathBuf {
    let path = dir.join(format!("matmul-chain-{mib}mib.onnx"));
    let want = mib * 1024 * 1024;
    let ok = fs::metadata(&path).is_ok_and(|m| m.len() >= want && m.len() < want + (1 << 20));
    if !ok {
        println!("writing {} ...", path.display());
        let m = measure(
            Command::new(test_python())
                .arg(repo().join("tests/py/make_big.py"))
                .arg(&path)
                .args(["--mib", &mib.to_string()]),
        );
        assert!(m.status.success(), "make_big.py failed: {}", m.stderr);
    }
    path
}

struct Row {
    name: String,
    size: u64,
    ours: Measured,
    py_secs: f64,
    py_wall: f64,
    py_rss: u64,
}

fn main() {
    let dir = repo().join("target/bench");
    fs::create_dir_all(&dir).unwrap();

    if !is_bench() {
        // cargo test: one small round-trip proves the harness works; no timing.
        let small = smallest_model();
        // A folder of its own: another `cargo test` on this target folder may run beside it.
        let tmp = tempfile::tempdir_in(&dir).unwrap();
        let out = tmp.path().join("smoke.onnx");
        let m = measure(&mut onnxopt_roundtrip(&small, &out));
        assert!(
            m.status.success(),
            "onnxopt failed on {}: {}",
            small.display(),
            m.stderr
        );
        println!(
            "io bench smoke: {} round-trip ok; run `cargo bench --bench io` for figures",
            small.display()
        );
        return;
    }

    let big_mib: u64 = std::env::var("ONNXOPT_BENCH_BIG_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let mut cases: Vec<(PathBuf, usize)> = models().into_iter().map(|m| (m, 3)).collect();
    if big_mib > 0 {
        cases.push((big_model(&dir, big_mib), 1));
    }

    let py = test_python();
    let out = dir.join("out.onnx");
    let py_out = dir.join("out-python.onnx");
    let mut rows = Vec::new();
    for (model, runs) in &cases {
        let size = fs::metadata(model).unwrap().len();
        let ours = best_of_ok(*runs, || onnxopt_roundtrip(model, &out));
        let _ = fs::remove_file(&out);
        let theirs = best_of_ok(*runs, || {
            let mut c = Command::new(&py);
            c.arg(repo().join("tests/py/load_save.py"))
                .arg(model)
                .arg(&py_out);
            c
        });
        let _ = fs::remove_file(&py_out);
        let t: serde_json::Value = serde_json::from_str(theirs.stdout.trim())
            .unwrap_or_else(|e| panic!("load_save.py printed {:?}: {e}", theirs.stdout));
        let py_secs = t["load_s"].as_f64().unwrap() + t["save_s"].as_f64().unwrap();
        rows.push(Row {
            name: model.file_stem().unwrap().to_string_lossy().into_owned(),
            size,
            ours,
            py_secs,
            py_wall: theirs.wall.as_secs_f64(),
            py_rss: theirs.max_rss,
        });
    }

    println!();
    println!("load + save of one model file (`optimize --passes none` vs onnx.load + onnx.save)");
    println!("MB = 2^20 bytes; MB/s = file size / wall time of the whole load + save run;");
    println!("onnxopt s = child process wall time (best of 3, 1 run for the big model);");
    println!("python s = onnx.load + onnx.save inside the interpreter (start-up excluded),");
    println!("py wall s = the whole python process (interpreter start and imports included);");
    println!(
        "RSS = peak resident set of the child (wait4 ru_maxrss); speedup = python s / onnxopt s"
    );
    println!(
        "{:<28} {:>9} {:>10} {:>10} {:>10} {:>8} {:>9} {:>10} {:>10} {:>8}",
        "model",
        "size MB",
        "onnxopt s",
        "MB/s",
        "RSS MB",
        "RSS/size",
        "python s",
        "py wall s",
        "py RSS MB",
        "speedup"
    );
    for r in &rows {
        let size_mb = r.size as f64 / MB;
        let secs = r.ours.wall.as_secs_f64();
        println!(
            "{:<28} {:>9.1} {:>10.3} {:>10.0} {:>10.1} {:>8.2} {:>9.3} {:>10.3} {:>10.1} {:>7.1}x",
            r.name,
            size_mb,
            secs,
            size_mb / secs,
            r.ours.max_rss as f64 / MB,
            r.ours.max_rss as f64 / r.size as f64,
            r.py_secs,
            r.py_wall,
            r.py_rss as f64 / MB,
            r.py_secs / secs,
        );
    }
    if big_mib > 0 {
        let big = rows.last().unwrap();
        let secs = big.ours.wall.as_secs_f64();
        let gbs = big.size as f64 / secs / (1u64 << 30) as f64;
        let ratio = big.ours.max_rss as f64 / big.size as f64;
        println!();
        println!(
            "targets on {}: throughput >= 1 GiB/s: {:.2} GiB/s ({}); peak RSS <= 1.5 x size: \
             {:.2} x ({})",
            big.name,
            gbs,
            if gbs >= 1.0 { "met" } else { "NOT met" },
            ratio,
            if ratio <= 1.5 { "met" } else { "NOT met" },
        );
    }
}
