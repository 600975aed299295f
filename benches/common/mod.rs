//! What the benches share: the repository and its models, child processes measured with
//! `wait4` (wall time and peak RSS), the Python interpreters, and reading what the scripts in
//! `benches/py/` print. Each bench includes it with `mod common;`.

// Each bench is its own crate and uses a different part of this module.
#![allow(dead_code)]

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The onnxopt binary of this build's profile.
pub const BIN: &str = env!("CARGO_BIN_EXE_onnxopt");
/// Megabyte (10^6 bytes), the unit the tool prints sizes in.
pub const MB: f64 = 1e6;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True under `cargo bench` (which passes `--bench`), false under `cargo test`, where a bench
/// only runs its quick smoke check.
pub fn is_bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// `ONNXOPT_BENCH_RUNS`, else `default`: how many times each timed command runs.
pub fn bench_runs(default: usize) -> usize {
    std::env::var("ONNXOPT_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// One finished child: wall time, peak resident set in bytes, stdout, stderr, exit status.
pub struct Measured {
    pub wall: Duration,
    pub max_rss: u64,
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
}

/// Runs `cmd` to completion and reaps it with `wait4`, which reports the child's own peak RSS.
pub fn measure(cmd: &mut Command) -> Measured {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    cmd.stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap());
    let start = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data, valid when zeroed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (Child::drop does not wait); both out
    // pointers are valid for the call.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert_eq!(
        reaped,
        pid,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    drop(child);
    Measured {
        wall,
        // Linux reports ru_maxrss in KiB.
        max_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        stdout: fs::read_to_string(out.path()).unwrap_or_default(),
        stderr: fs::read_to_string(err.path()).unwrap_or_default(),
        status: ExitStatus::from_raw(status),
    }
}

/// Best of `runs` by wall time. The first failing run ends the series and is the `Err`.
pub fn best_of(runs: usize, mut make: impl FnMut() -> Command) -> Result<Measured, Measured> {
    let mut best: Option<Measured> = None;
    for _ in 0..runs.max(1) {
        let m = measure(&mut make());
        if !m.status.success() {
            return Err(m);
        }
        if best.as_ref().is_none_or(|b| m.wall < b.wall) {
            best = Some(m);
        }
    }
    Ok(best.unwrap())
}

/// Every `models/*.onnx`, sorted by name.
pub fn models() -> Vec<PathBuf> {
    let mut models: Vec<PathBuf> = fs::read_dir(repo().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    assert!(!models.is_empty(), "no models/*.onnx");
    models
}

/// The smallest of `models()`, for the smoke checks.
pub fn smallest_model() -> PathBuf {
    models().into_iter().min_by_key(|p| file_size(p)).unwrap()
}

pub fn file_size(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

pub fn stem(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Runs a set-up command with its output shown; panics when it fails.
pub fn run_step(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

pub fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sha256sum: {e}"));
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The interpreter with the peers: `ONNXOPT_BENCH_PYTHON`, else `target/benchenv`, built from
/// `benches/requirements.txt` unless its stamp already holds that file's sha256.
pub fn bench_python() -> PathBuf {
    if let Some(p) = std::env::var_os("ONNXOPT_BENCH_PYTHON").filter(|p| !p.is_empty()) {
        println!(
            "python: {} (ONNXOPT_BENCH_PYTHON)",
            PathBuf::from(&p).display()
        );
        return PathBuf::from(p);
    }
    let venv = repo().join("target/benchenv");
    let req = repo().join("benches/requirements.txt");
    let stamp = venv.join(".requirements.sha256");
    let python = venv.join("bin/python");
    let want = sha256_of(&req);
    if python.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want) {
        println!(
            "python venv {} is up to date with benches/requirements.txt ({want})",
            venv.display()
        );
        return python;
    }
    println!(
        "creating python venv {} from benches/requirements.txt",
        venv.display()
    );
    run_step(Command::new("python3").arg("-m").arg("venv").arg(&venv));
    run_step(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
            ])
            .arg("-r")
            .arg(&req),
    );
    fs::write(&stamp, format!("{want}\n")).unwrap();
    python
}

/// The interpreter of the test suite (`onnx` only): `ONNXOPT_PYTHON`, else the venv that
/// `tests/run.sh` builds in `target/pyenv`.
pub fn test_python() -> PathBuf {
    if let Some(p) = std::env::var_os("ONNXOPT_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let p = repo().join("target/pyenv/bin/python");
    assert!(
        p.exists(),
        "no Python with onnx: ONNXOPT_PYTHON is unset and {} does not exist; run tests/run.sh \
         once (it builds the venv)",
        p.display()
    );
    p
}

/// What `benches/py/peers.py` reports about the installed Python peers (versions, and which
/// quantizers each offers). Panics with its stderr when it fails.
pub fn probe_peers(python: &Path) -> Value {
    let probe = Command::new(python)
        .arg(repo().join("benches/py/peers.py"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    last_json(&String::from_utf8_lossy(&probe.stdout)).unwrap_or_else(|| {
        panic!(
            "benches/py/peers.py failed: {}",
            String::from_utf8_lossy(&probe.stderr)
        )
    })
}

pub fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned()
}

/// The last line of a script's stdout as JSON.
pub fn last_json(stdout: &str) -> Option<Value> {
    serde_json::from_str(stdout.lines().rev().find(|l| !l.trim().is_empty())?).ok()
}

/// Why a child failed, in one line: the script's `{"error"}`, else the first line of stderr.
pub fn failure(m: &Measured) -> String {
    let said = last_json(&m.stdout)
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| first_line(&m.stderr));
    if said.is_empty() {
        format!("{:?}", m.status)
    } else {
        said
    }
}

/// `v` formatted by `f`, or `-`.
pub fn opt_f(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".to_owned())
}
