//! The `onnxopt` binary: clap -> config -> library call -> exit code.
//!
//! Exit codes: 0 success, 1 accuracy gate failed (output still written), 2 error,
//! 3 unverified (tract cannot run the original, or a bfloat16 result; 0 with --allow-unverified).

mod cli;

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches};
use indicatif::{ProgressBar, ProgressStyle};

use cli::{CheckArgs, Cli, Command};
use onnxopt::optimize::{self, Outcome};
use onnxopt::quant::{ModeChoices, QuantizeMode};
use onnxopt::report::Reporter;
use onnxopt::verify::{self, Gates, InputOptions, Verification};
use onnxopt::{onnx, passes};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    cli::record_explicit(&matches);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            stderr(&format!("error: {e:#}\n"));
            ExitCode::from(2)
        }
    }
}

/// Refuses a command whose written files would replace a file it reads: `writes` and `reads`
/// are (option, path) pairs. A read folder (`--inputs DIR`, `--calibration DIR`) counts with
/// every `.npz` file in it; the written files must also differ from each other. Paths name the
/// same file when they resolve to one path (links, `..`) or, existing, share an inode (hard
/// links).
///
/// Errors: every such collision, one line each, naming both options and the file.
fn refuse_clobbering(writes: &[(&str, &Path)], reads: &[(&str, &Path)]) -> Result<()> {
    // The file a path names, resolved as far as it exists (a new file: its folder resolved).
    let resolved = |p: &Path| -> std::path::PathBuf {
        if let Ok(c) = p.canonicalize() {
            return c;
        }
        match (onnx::folder_of(p).canonicalize(), p.file_name()) {
            (Ok(d), Some(f)) => d.join(f),
            _ => p.to_path_buf(),
        }
    };
    let mut problems = Vec::new();
    for (k, (wo, w)) in writes.iter().enumerate() {
        let wr = resolved(w);
        for (ro, r) in reads {
            let rr = resolved(r);
            // Existing files compare by inode too: a hard link is the same file.
            if wr == rr || onnx::same_file(w, r) {
                problems.push(format!(
                    "{wo} {} would overwrite {}, which {ro} reads",
                    w.display(),
                    r.display()
                ));
            } else if r.is_dir()
                && wr.parent() == Some(rr.as_path())
                && w.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz"))
            {
                problems.push(format!(
                    "{wo} {} would write an .npz file into {}, whose .npz files {ro} reads",
                    w.display(),
                    r.display()
                ));
            }
        }
        for (wo2, w2) in &writes[k + 1..] {
            if wr == resolved(w2) || onnx::same_file(w, w2) {
                problems.push(format!("{wo} and {wo2} both write {}", w.display()));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "refusing to overwrite files this command reads or writes (choose other paths):\n  {}",
        problems.join("\n  ")
    )
}

/// [`refuse_clobbering`] for `optimize` and `quantize`: `-o` and `--report` against the model
/// and `others` (with `--force`, `-o` may replace the model).
fn refuse_clobbering_output(
    output: &Path,
    report: Option<&Path>,
    model: &Path,
    save: &cli::SaveArgs,
    others: &[(&str, Option<&Path>)],
) -> Result<()> {
    let force = save.force;
    let data = onnx::external_data_path(output);
    let mut writes = vec![("-o", output)];
    if save.external_data {
        writes.push(("-o's external data file", data.as_path()));
    }
    writes.extend(report.map(|r| ("--report", r)));
    if !force && onnx::same_file(output, model) {
        bail!(
            "refusing to overwrite the input model {} (choose another output, or pass --force)",
            output.display()
        );
    }
    let mut reads: Vec<(&str, &Path)> = others
        .iter()
        .filter_map(|(o, p)| p.map(|p| (*o, p)))
        .collect();
    refuse_clobbering(&writes, &reads)?;
    reads = vec![("the model argument", model)];
    refuse_clobbering(&writes[1..], &reads)
}

/// The files `compare --report` must not replace: the external data files the two models read
/// (known once they are loaded).
///
/// Errors: `report` is one of them.
fn refuse_report_over_external_data(
    report: Option<&Path>,
    models: &[(&Path, &onnx::LoadInfo)],
) -> Result<()> {
    let Some(report) = report else {
        return Ok(());
    };
    let reads: Vec<(String, std::path::PathBuf)> = models
        .iter()
        .flat_map(|(m, info)| {
            let label = format!("{} (its external data)", m.display());
            info.external_paths(m)
                .into_iter()
                .map(move |p| (label.clone(), p))
        })
        .collect();
    let reads: Vec<(&str, &Path)> = reads
        .iter()
        .map(|(o, p)| (o.as_str(), p.as_path()))
        .collect();
    refuse_clobbering(&[("--report", report)], &reads)
}

/// Refuses two models to compare when the candidate has a graph input the reference lacks:
/// the inputs are made from the reference's, so the candidate could not be fed. Returns a note
/// for each input only the reference has (fed to the reference alone).
///
/// Errors: that case, naming both files and the inputs.
fn refuse_other_inputs(
    reference: &onnxopt::pb::ModelProto,
    ref_path: &std::path::Path,
    candidate: &onnxopt::pb::ModelProto,
    cand_path: &std::path::Path,
) -> Result<Vec<String>> {
    let inputs = |m: &onnxopt::pb::ModelProto| -> Vec<String> {
        m.graph.as_ref().map_or(Vec::new(), |g| {
            verify::inputs::real_graph_inputs(g)
                .iter()
                .map(|i| i.name().to_string())
                .collect()
        })
    };
    let ours = inputs(reference);
    let theirs = inputs(candidate);
    let extra: Vec<&String> = theirs.iter().filter(|n| !ours.contains(n)).collect();
    anyhow::ensure!(
        extra.is_empty(),
        "{}: graph input(s) {} are not inputs of {} (its inputs: {}): the two models do not take the same inputs, so they cannot be compared",
        cand_path.display(),
        extra.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
        ref_path.display(),
        ours.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    );
    Ok(ours
        .iter()
        .filter(|n| !theirs.contains(n))
        .map(|n| {
            format!(
                "graph input `{n}` of {} is not an input of {}: it is fed to the reference alone",
                ref_path.display(),
                cand_path.display()
            )
        })
        .collect())
}

/// Warns that the check options of `check` that were given are ignored when the check does
/// not run (`--no-check`, or `--passes none`).
fn ignored_check_options(check: &CheckArgs, no_check: bool, passes_none: bool) {
    let given = check.given();
    if given.is_empty() || !(no_check || passes_none) {
        return;
    }
    let why = if no_check {
        "--no-check"
    } else {
        "--passes none loads and saves only"
    };
    stderr(&format!(
        "warning: check option(s) {} ignored: the check does not run ({why})\n",
        given.join(", ")
    ));
}

/// Writes `text` to stdout. A reader that closed the pipe (`onnxopt inspect --json | head`)
/// wanted no more: not an error, where `print!` would panic.
///
/// Errors: any other failure to write.
fn stdout(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to standard output")
        }
        _ => Ok(()),
    }
}

/// Writes `text` to stderr, ignoring a failure to (a reader that closed the pipe), where
/// `eprint!` would panic: what the process does does not depend on who reads its messages.
fn stderr(text: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
}

/// Spinner on stderr per phase; hidden when stderr is not a terminal or with --quiet.
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    enabled: bool,
}

impl Reporter for Bars {
    fn phase(&self, name: &str) {
        if !self.enabled {
            return;
        }
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_message(name.to_string());
        pb.enable_steady_tick(Duration::from_millis(120));
        if let Ok(mut b) = self.bar.lock() {
            if let Some(old) = b.replace(pb) {
                old.finish_and_clear();
            }
        }
    }
    fn phase_done(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(old) = b.take() {
                old.finish_and_clear();
            }
        }
    }
}

/// The check's input options.
///
/// Errors: an `--input-shape` or `--input` that does not parse, or one input named twice by
/// the same option (only one of the two could be used).
fn input_options(c: &CheckArgs) -> Result<InputOptions> {
    let shapes: Vec<(String, Vec<usize>)> = c
        .input_shape
        .iter()
        .map(|s| verify::inputs::parse_input_shape(s))
        .collect::<Result<_>>()?;
    let values: Vec<(String, f64)> = c
        .input
        .iter()
        .map(|s| verify::inputs::parse_input_value(s))
        .collect::<Result<_>>()?;
    for (flag, names) in [
        (
            "--input-shape",
            shapes.iter().map(|s| &s.0).collect::<Vec<_>>(),
        ),
        ("--input", values.iter().map(|v| &v.0).collect()),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        let twice: Vec<&str> = names
            .into_iter()
            .filter(|n| !seen.insert(*n))
            .map(String::as_str)
            .collect();
        anyhow::ensure!(
            twice.is_empty(),
            "{flag} names input(s) {} more than once",
            twice.join(", ")
        );
    }
    Ok(InputOptions {
        npz: c.inputs.clone(),
        npz_sample: None,
        shapes,
        values,
        seed: c.seed,
    })
}

/// The calibration options of `c`, `None` without `--calibration`.
///
/// Errors: a percentile outside (50, 100], an activation type other than uint8 or int8.
fn calibration_options(
    c: &cli::CalibrationArgs,
) -> Result<Option<onnxopt::quant::CalibrationOptions>> {
    use onnxopt::quant::{QType, RangeMethod};
    let Some(source) = &c.calibration else {
        return Ok(None);
    };
    // Ignoring it would calibrate otherwise than the user believes.
    anyhow::ensure!(
        !cli::explicit("percentile")
            || matches!(c.calibrate_method, cli::CalibrateMethod::Percentile),
        "--percentile {} applies to --calibrate-method percentile, not {}: add --calibrate-method percentile or drop --percentile",
        c.percentile,
        clap::ValueEnum::to_possible_value(&c.calibrate_method)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    );
    Ok(Some(onnxopt::quant::CalibrationOptions {
        source: source.clone(),
        method: match c.calibrate_method {
            cli::CalibrateMethod::Minmax => RangeMethod::MinMax,
            cli::CalibrateMethod::Percentile => {
                anyhow::ensure!(
                    c.percentile > 50.0 && c.percentile <= 100.0,
                    "--percentile must be in (50, 100]"
                );
                RangeMethod::Percentile {
                    percentile: c.percentile,
                }
            }
            cli::CalibrateMethod::Entropy => RangeMethod::Entropy,
        },
        max_samples: c.calibration_samples.max(1),
        activation_type: match QType::parse(&c.activation_type) {
            Some(t @ (QType::Uint8 | QType::Int8)) => t,
            _ => anyhow::bail!("--activation-type must be uint8 or int8"),
        },
        cache: Default::default(),
    }))
}

fn regex(r: &Option<String>, flag: &str) -> Result<Option<regex::Regex>> {
    r.as_deref()
        .map(|r| regex::Regex::new(r).with_context(|| format!("{flag}: bad regex")))
        .transpose()
}

/// The library's form of a `--mode`.
fn quantize_mode(m: cli::Mode) -> QuantizeMode {
    use cli::Mode;
    match m {
        Mode::WeightOnly => QuantizeMode::WeightOnly,
        Mode::Dynamic => QuantizeMode::Dynamic,
        Mode::Static => QuantizeMode::Static,
        Mode::Fp16 => QuantizeMode::Fp16,
        Mode::Bf16 => QuantizeMode::Bf16,
    }
}

/// `--include-nodes` and `--exclude-nodes` compiled.
///
/// Errors: either is not a valid regex; both are named when both are bad.
fn node_regexes(
    include: &Option<String>,
    exclude: &Option<String>,
) -> Result<(Option<regex::Regex>, Option<regex::Regex>)> {
    match (
        regex(include, "--include-nodes"),
        regex(exclude, "--exclude-nodes"),
    ) {
        (Ok(i), Ok(e)) => Ok((i, e)),
        (Err(a), Err(b)) => bail!("{a:#}\n{b:#}"),
        (Err(a), _) | (_, Err(a)) => Err(a),
    }
}

/// The gates of the check options: an unnamed `--atol`/`--rtol` for
/// every output, a named one for that output (with the unnamed value, or 0, for the other
/// half).
///
/// Errors: `--atol` or `--rtol` given twice for the same output (or twice unnamed) with
/// different values, which would leave one of them silently unused.
fn gates(c: &CheckArgs) -> Result<Gates> {
    for (flag, given) in [("--atol", &c.atol), ("--rtol", &c.rtol)] {
        for (k, (name, x)) in given.iter().enumerate() {
            if let Some((_, y)) = given[..k].iter().find(|(n, y)| n == name && y != x) {
                match name {
                    Some(n) => bail!("{flag} {n}:{y} and {flag} {n}:{x}: give one tolerance per output"),
                    None => bail!("{flag} {y} and {flag} {x}: give one tolerance for every output (or NAME:X for one output)"),
                }
            }
        }
    }
    let unnamed =
        |v: &[(Option<String>, f64)]| v.iter().rev().find_map(|(n, x)| n.is_none().then_some(*x));
    let (atol, rtol) = (unnamed(&c.atol), unnamed(&c.rtol));
    let mut names: Vec<&String> = c
        .atol
        .iter()
        .chain(&c.rtol)
        .filter_map(|(n, _)| n.as_ref())
        .collect();
    names.sort();
    names.dedup();
    let named = |v: &[(Option<String>, f64)], name: &String| {
        v.iter()
            .rev()
            .find_map(|(n, x)| (n.as_ref() == Some(name)).then_some(*x))
    };
    let output_tolerances = names
        .into_iter()
        .map(|n| verify::gate::OutputTolerance {
            output: n.clone(),
            tolerance: verify::metrics::Tolerance {
                atol: named(&c.atol, n).or(atol).unwrap_or(0.0),
                rtol: named(&c.rtol, n).or(rtol).unwrap_or(0.0),
            },
        })
        .collect();
    Ok(Gates {
        atol,
        rtol,
        min_cosine: c.min_cosine,
        max_accuracy_drop: c.max_accuracy_drop,
        max_integer_mismatch: None,
        output_tolerances,
    })
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    onnxopt::onnx::write_atomic(path, (text + "\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn save_options(
    model: &std::path::Path,
    s: &cli::SaveArgs,
    report: Option<&Path>,
) -> onnx::SaveOptions {
    onnx::SaveOptions {
        external_data: s.external_data,
        external_threshold: s.external_data_threshold,
        protect: if s.force {
            vec![]
        } else {
            vec![model.to_path_buf()]
        },
        replace_input: s.force,
        protect_data: Vec::new(),
        also_written: report
            .map(|r| ("--report".to_string(), r.to_path_buf()))
            .into_iter()
            .collect(),
    }
}

type NodeSchemes = std::collections::BTreeMap<String, onnxopt::quant::Scheme>;

/// A JSON value read with every object's keys unique: `serde_json` keeps the last of
/// duplicate keys, so a config naming a node twice would silently drop the first entry.
struct UniqueKeys(serde_json::Value);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, SeqAccess, Visitor};
        use serde_json::Value;
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(Value::Bool(b)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(n.into()))
            }
            fn visit_f64<E>(self, n: f64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(n.into()))
            }
            fn visit_str<E>(self, s: &str) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(s.into()))
            }
            fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
                let mut out = Vec::new();
                while let Some(UniqueKeys(v)) = seq.next_element()? {
                    out.push(v);
                }
                Ok(UniqueKeys(Value::Array(out)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((k, UniqueKeys(v))) = map.next_entry::<String, UniqueKeys>()? {
                    if out.contains_key(&k) {
                        return Err(A::Error::custom(format!("key \"{k}\" appears twice")));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueKeys(Value::Object(out)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads a `--config` file: per-node schemes, and the nodes to keep in float.
///
/// Errors name the file, the node and the field that is wrong.
fn read_config(
    path: &std::path::Path,
    base: &onnxopt::quant::Scheme,
) -> Result<(NodeSchemes, Vec<String>)> {
    use onnxopt::quant::{Granularity, QType};
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // A byte-order mark (Windows editors write one) is not part of the JSON.
    let v = serde_json::from_str::<UniqueKeys>(text.strip_prefix('\u{feff}').unwrap_or(&text))
        .with_context(|| format!("{}: not valid JSON", path.display()))?
        .0;
    let mut schemes = NodeSchemes::new();
    let mut float = Vec::new();
    let mut top_problem: Option<String> = None;
    match &v {
        serde_json::Value::Object(top) => {
            let unknown: Vec<String> = top
                .keys()
                .filter(|k| k.as_str() != "nodes")
                .map(|k| format!("\"{k}\""))
                .collect();
            if !unknown.is_empty() {
                top_problem = Some(format!(
                    "{}: unknown top-level field {} (a config holds only \"nodes\")",
                    path.display(),
                    unknown.join(", ")
                ));
            }
        }
        _ => anyhow::bail!("{}: expected a JSON object with \"nodes\"", path.display()),
    }
    let nodes = match v.get("nodes") {
        Some(serde_json::Value::Object(m)) => m.clone(),
        None => Default::default(),
        Some(_) => anyhow::bail!("{}: \"nodes\" must be an object", path.display()),
    };
    // Every entry is read; the problems of all of them are reported together.
    let mut problems: Vec<String> = top_problem.into_iter().collect();
    for (node, spec) in nodes {
        let entry = || -> Result<()> {
            let what = || format!("{}: node \"{node}\"", path.display());
            match spec {
                serde_json::Value::String(s) if s == "float" => float.push(node),
                serde_json::Value::Object(o) => {
                    let mut sc = *base;
                    for (k, val) in &o {
                        let bad = || anyhow::anyhow!("{}: bad value {val} for \"{k}\"", what());
                        match k.as_str() {
                            "dtype" => {
                                sc.qtype = val.as_str().and_then(QType::parse).ok_or_else(bad)?
                            }
                            "symmetric" => sc.symmetric = val.as_bool().ok_or_else(bad)?,
                            "scale" => {
                                sc.pow2 = match val.as_str() {
                                    Some("pow2") => true,
                                    Some("float") => false,
                                    _ => return Err(bad()),
                                }
                            }
                            "granularity" | "block_size" => {}
                            _ => anyhow::bail!("{}: unknown field \"{k}\"", what()),
                        }
                    }
                    let bs = match o.get("block_size") {
                        Some(b) => b.as_u64().filter(|&b| b >= 2).ok_or_else(|| {
                            anyhow::anyhow!("{}: block_size must be an integer >= 2", what())
                        })? as usize,
                        None => match base.granularity {
                            Granularity::Block(b) => b,
                            _ => 32,
                        },
                    };
                    // The node's granularity, or the command line's with this block size.
                    sc.granularity = match o.get("granularity") {
                        Some(g) => match g.as_str() {
                            Some("tensor") => Granularity::Tensor,
                            Some("channel") => Granularity::Channel,
                            Some("block") => Granularity::Block(bs),
                            _ => anyhow::bail!(
                                "{}: granularity must be tensor, channel or block",
                                what()
                            ),
                        },
                        None => match base.granularity {
                            Granularity::Block(_) => Granularity::Block(bs),
                            g => g,
                        },
                    };
                    // Power-of-two scales are symmetric (fixed point), as on the command line.
                    if sc.pow2 {
                        anyhow::ensure!(
                            o.get("symmetric") != Some(&serde_json::Value::Bool(false)),
                            "{}: \"scale\": \"pow2\" is symmetric (fixed point): drop \"symmetric\": false",
                            what()
                        );
                        sc.symmetric = true;
                    }
                    if o.contains_key("block_size")
                        && !matches!(sc.granularity, Granularity::Block(_))
                    {
                        anyhow::bail!(
                            "{}: block_size applies to \"granularity\": \"block\" (or --granularity block)",
                            what()
                        );
                    }
                    schemes.insert(node, sc);
                }
                other => anyhow::bail!("{}: expected \"float\" or an object, got {other}", what()),
            }
            Ok(())
        };
        if let Err(e) = entry() {
            problems.push(format!("{e:#}"));
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "{} problem(s) in the config:\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok((schemes, float))
}

/// `--op-types` entries without surrounding spaces, empty ones dropped (`Conv, MatMul`).
///
/// Errors: `--op-types` was given but names no op type (`''`, `,`), which would select every
/// node.
fn op_types(given: &[String]) -> Result<Vec<String>> {
    let ops: Vec<String> = given
        .iter()
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect();
    anyhow::ensure!(
        given.is_empty() || !ops.is_empty(),
        "--op-types names no op type (give e.g. --op-types Conv,MatMul)"
    );
    Ok(ops)
}

/// The selections of the command line and the config file that must name something in the
/// model (checked once it is loaded).
fn selectors(
    op_types: &[String],
    include: &Option<String>,
    exclude: &Option<String>,
    config: Option<(&std::path::Path, Vec<String>)>,
) -> Result<Vec<passes::Selector>> {
    let mut out = Vec::new();
    if !op_types.is_empty() {
        out.push(passes::Selector::OpTypes(op_types.to_vec()));
    }
    for (r, flag) in [(include, "--include-nodes"), (exclude, "--exclude-nodes")] {
        if let Some(re) = regex(r, flag)? {
            out.push(passes::Selector::NodeRegex {
                flag: flag.to_string(),
                re,
            });
        }
    }
    if let Some((path, names)) = config.filter(|(_, n)| !n.is_empty()) {
        out.push(passes::Selector::NodeNames {
            origin: format!("--config {}", path.display()),
            names,
        });
    }
    Ok(out)
}

/// `--exclude-nodes` combined with the node names a config keeps in float.
fn exclude_with(re: Option<regex::Regex>, names: &[String]) -> Result<Option<regex::Regex>> {
    if names.is_empty() {
        return Ok(re);
    }
    let mut parts: Vec<String> = names
        .iter()
        .map(|n| format!("^{}$", regex::escape(n)))
        .collect();
    if let Some(r) = re {
        parts.push(format!("(?:{})", r.as_str()));
    }
    Ok(Some(regex::Regex::new(&parts.join("|"))?))
}

/// `--fallback-samples` sizes the accuracy-gated fallback, which `--no-fallback` turns off.
///
/// Errors: both are given.
fn refuse_fallback_samples_without_fallback(no_fallback: bool) -> Result<()> {
    anyhow::ensure!(
        !(no_fallback && cli::explicit("fallback_samples")),
        "--fallback-samples sizes the accuracy-gated fallback, which --no-fallback turns off: drop one of them"
    );
    Ok(())
}

fn fallback_target(no_fallback: bool, c: &CheckArgs) -> Option<f64> {
    (!no_fallback).then(|| c.min_cosine.unwrap_or(optimize::DEFAULT_FALLBACK_COSINE))
}

/// Refuses, before any work, files that cannot be written where they go: the folder does not
/// exist or takes no new file, or the path is a folder. Every such file is named.
///
/// Errors: one line per file that cannot be written.
fn refuse_unwritable(paths: &[(Option<&std::path::Path>, &str)]) -> Result<()> {
    let mut problems = Vec::new();
    for (path, what) in paths {
        let Some(p) = path else { continue };
        let dir = onnx::folder_of(p);
        if dir.exists() && !dir.is_dir() {
            problems.push(format!(
                "cannot write the {what} {}: {} is not a folder",
                p.display(),
                dir.display()
            ));
        } else if !dir.is_dir() {
            problems.push(format!(
                "cannot write the {what} {}: the folder {} does not exist",
                p.display(),
                dir.display()
            ));
        } else if p.as_os_str().to_string_lossy().ends_with('/') {
            problems.push(format!(
                "cannot write the {what} {}: a path ending in / names a folder, not a file",
                p.display()
            ));
        } else if p.is_dir() {
            problems.push(format!(
                "cannot write the {what} {}: it is a folder",
                p.display()
            ));
        } else if std::fs::metadata(p).is_ok_and(|m| !m.is_file()) {
            // A device or FIFO (`/dev/stdout`) is written in place: its folder need not take
            // files.
        } else if let Err(e) = tempfile::Builder::new()
            .prefix(".onnxopt-write-test.")
            .tempfile_in(dir)
        {
            problems.push(format!(
                "cannot write the {what} {}: the folder {} takes no new file ({e})",
                p.display(),
                dir.display()
            ));
        }
    }
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// Runs `optimize` with `cfg`, writes the report, prints the summary and maps the outcome to
/// the exit code.
fn finish(
    cfg: &optimize::OptimizeConfig,
    reporter: &Bars,
    quiet: bool,
    report_path: Option<&std::path::Path>,
    allow_unverified: bool,
) -> Result<ExitCode> {
    // The output's external data file, which a save may write beside it.
    let data = onnx::external_data_path(&cfg.output);
    refuse_unwritable(&[
        (Some(cfg.output.as_path()), "output"),
        (report_path, "--report"),
        (
            (cfg.save.external_data && data.is_dir()).then_some(data.as_path()),
            "output's external data file",
        ),
    ])?;
    let report = optimize::optimize(cfg, reporter)?;
    if let Some(path) = report_path {
        write_json(path, &report).with_context(|| {
            format!(
                "the model was written to {}, but not its report",
                cfg.output.display()
            )
        })?;
    }
    if !quiet {
        stderr(&optimize::format_report(&report));
        if cfg.save.external_data && report.saved.external.is_none() {
            stderr(&format!(
                "note: --external-data: no initializer of {} bytes or more, so no data file was written (weights held in Constant nodes are not initializers: the cleanup passes move them)\n",
                cfg.save.external_threshold
            ));
        }
    }
    let out = cfg.output.display();
    Ok(match report.outcome {
        Outcome::Ok => ExitCode::SUCCESS,
        Outcome::GateFailed => {
            // Without -q the report above named every failure: with it, the first one here.
            let first = report
                .check
                .as_ref()
                .and_then(|c| c.failures.first())
                .filter(|_| quiet)
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            stderr(&format!(
                "error: the accuracy check failed{first}; the model was still written to {out}\n"
            ));
            ExitCode::from(1)
        }
        Outcome::Unverified => {
            let reason = match report.check.as_ref().map(|c| &c.status) {
                Some(Verification::Unverified { reason, .. }) => reason.clone(),
                _ => String::new(),
            };
            // Without -q the report above already gave tract's reason: not twice.
            let why = if quiet {
                reason
            } else {
                "the check could not run (reason above)".to_string()
            };
            stderr(&format!("warning: UNVERIFIED: {why}; the optimized model was written to {out} but not checked\n"));
            if allow_unverified {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    let reporter = Bars {
        bar: Mutex::new(None),
        enabled: !cli.quiet && std::io::stderr().is_terminal(),
    };
    match cli.command {
        Command::Inspect(a) => {
            let (model, info) = onnx::load(&a.model)?;
            let file = a.model.display().to_string();
            let report = onnxopt::inspect::inspect(&model, &file, &info);
            if a.json {
                stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                stdout(&onnxopt::inspect::format_text(&report))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ListPasses => {
            let mut text = String::new();
            for p in passes::registry() {
                text += &format!(
                    "{:<32} {:<22} {}\n",
                    p.name(),
                    p.kind().label(),
                    p.summary()
                );
            }
            text += &format!("\npresets: none (load + save), cleanup ({}), default (cleanup, fold_batchnorm, quantize_weights_int8, cleanup)\n", passes::CLEANUP.join(", "));
            stdout(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Optimize(a) => {
            refuse_clobbering_output(
                &a.output,
                a.report.as_deref(),
                &a.model,
                &a.save,
                &[
                    ("--inputs", a.check.inputs.as_deref()),
                    ("--calibration", a.cal.calibration.as_deref()),
                ],
            )?;
            let calibration = calibration_options(&a.cal)?;
            let pipeline: Vec<&str> = passes::parse_pipeline(&a.passes)?
                .iter()
                .map(|p| p.name())
                .collect();
            if a.cal.given() && !pipeline.contains(&"quantize_static") {
                anyhow::bail!(
                    "--calibration and the other calibration options apply to the quantize_static pass, which --passes {} does not run",
                    a.passes
                );
            }
            let misplaced: Vec<String> = a
                .tune
                .given()
                .into_iter()
                .filter(|(_, applies)| !applies.iter().any(|p| pipeline.contains(p)))
                .map(|(name, applies)| format!("{name} (the {} pass)", applies.join(" or ")))
                .collect();
            if !misplaced.is_empty() {
                anyhow::bail!(
                    "{} {} to a pass that --passes {} does not run",
                    misplaced.join(", "),
                    if misplaced.len() == 1 {
                        "applies"
                    } else {
                        "apply"
                    },
                    a.passes
                );
            }
            refuse_fallback_samples_without_fallback(a.no_fallback)?;
            let inputs = input_options(&a.check)?;
            // `--passes none` loads and saves only: no check.
            let passes_none = a.passes.trim() == "none";
            ignored_check_options(&a.check, a.no_check, passes_none);
            let check = !a.no_check && !passes_none;
            let (include_nodes, exclude_nodes) = node_regexes(&a.include_nodes, &a.exclude_nodes)?;
            let cfg = optimize::OptimizeConfig {
                model: a.model.clone(),
                output: a.output.clone(),
                passes: a.passes.clone(),
                pass_options: passes::PassOptions {
                    op_types: op_types(&a.op_types)?,
                    exclude_nodes,
                    include_nodes,
                    // The interface is a contract: float conversion keeps float32 graph
                    // inputs and outputs (only `quantize --keep-io-types false` changes them).
                    keep_io_types: true,
                    calibration,
                    conv_integer: a.tune.conv_integer,
                    all_layers: a.tune.all_layers,
                    full_range_weights: a.tune.full_range_weights,
                    reduce_range: a.tune.reduce_range,
                    ..Default::default()
                },
                save: save_options(&a.model, &a.save, a.report.as_deref()),
                check,
                inputs,
                gates: gates(&a.check)?,
                validate_each: a.validate,
                fallback_target: fallback_target(a.no_fallback, &a.check),
                fallback_samples: a.tune.fallback_samples,
                check_notes: vec![],
                selectors: selectors(
                    &op_types(&a.op_types)?,
                    &a.include_nodes,
                    &a.exclude_nodes,
                    None,
                )?,
            };
            finish(
                &cfg,
                &reporter,
                cli.quiet,
                a.report.as_deref(),
                a.check.allow_unverified,
            )
        }
        Command::Quantize(a) => {
            refuse_clobbering_output(
                &a.output,
                a.report.as_deref(),
                &a.model,
                &a.save,
                &[
                    ("--inputs", a.check.inputs.as_deref()),
                    ("--calibration", a.cal.calibration.as_deref()),
                    ("--config", a.config.as_deref()),
                ],
            )?;
            use cli::{GranularityArg, Mode, ScaleArg};
            use onnxopt::quant::{Granularity, QType, Scheme};
            let qtype = QType::parse(&a.dtype).with_context(|| {
                format!(
                    "--dtype {}: expected int8, uint8, int16, uint16, int4 or uint4",
                    a.dtype
                )
            })?;
            let scheme = Scheme {
                qtype,
                symmetric: !a.asymmetric,
                granularity: match a.granularity {
                    GranularityArg::Tensor => Granularity::Tensor,
                    GranularityArg::Channel => Granularity::Channel,
                    GranularityArg::Block => {
                        anyhow::ensure!(a.block_size >= 2, "--block-size must be at least 2");
                        Granularity::Block(a.block_size)
                    }
                },
                pow2: a.scale == ScaleArg::Pow2,
            };
            anyhow::ensure!(
                !(scheme.pow2 && a.asymmetric),
                "--scale pow2 is symmetric (fixed point): drop --asymmetric"
            );
            let weight_format = match a.format {
                cli::FormatArg::Qdq => onnxopt::quant::WeightFormat::Qdq,
                cli::FormatArg::Cast => {
                    anyhow::ensure!(
                        a.mode == Mode::WeightOnly,
                        "--format cast is a weight-only format: use --mode weight-only"
                    );
                    anyhow::ensure!(
                        !matches!(qtype, QType::Int4 | QType::Uint4)
                            && !matches!(scheme.granularity, Granularity::Block(_)),
                        "--format cast writes 8- and 16-bit weights per tensor or per channel: use --dtype int8/uint8/int16/uint16 without --granularity block"
                    );
                    onnxopt::quant::WeightFormat::Cast
                }
                cli::FormatArg::MatMulNBits => {
                    anyhow::ensure!(
                        a.mode == Mode::WeightOnly,
                        "--format matmulnbits is a weight-only format: use --mode weight-only"
                    );
                    anyhow::ensure!(
                        matches!(qtype, QType::Int4 | QType::Uint4)
                            && matches!(scheme.granularity, Granularity::Block(_)),
                        "--format matmulnbits writes 4-bit blocks: use --dtype int4 or uint4 with --granularity block"
                    );
                    anyhow::ensure!(
                        onnxopt::quant::nbits::valid_block_size(a.block_size),
                        "--format matmulnbits: --block-size {} must be a power of two >= 16 (MatMulNBits' block_size)",
                        a.block_size
                    );
                    onnxopt::quant::WeightFormat::MatMulNBits
                }
            };
            // Options of one mode given with another are refused, not ignored.
            let misplaced: Vec<&str> = [
                (
                    a.cal.calibration.is_some() && a.mode != Mode::Static,
                    "--calibration",
                ),
                (a.tune.all_layers && a.mode != Mode::Static, "--all-layers"),
                (a.keep_opset && a.mode != Mode::Static, "--keep-opset"),
                (
                    a.tune.full_range_weights && a.mode != Mode::Static,
                    "--full-range-weights",
                ),
                (
                    a.tune.reduce_range && !matches!(a.mode, Mode::Static | Mode::Dynamic),
                    "--reduce-range",
                ),
                (
                    a.tune.conv_integer && a.mode != Mode::Dynamic,
                    "--conv-integer",
                ),
                (
                    a.keep_float_weights && !matches!(a.mode, Mode::Static | Mode::Dynamic),
                    "--keep-float-weights",
                ),
                (
                    qtype != QType::Int8 && matches!(a.mode, Mode::Static | Mode::Dynamic),
                    "--dtype (static and dynamic weights are int8)",
                ),
                (
                    qtype != QType::Int8 && matches!(a.mode, Mode::Fp16 | Mode::Bf16),
                    "--dtype",
                ),
                (
                    a.granularity != cli::GranularityArg::Channel && a.mode != Mode::WeightOnly,
                    "--granularity (only weight-only weights take another granularity)",
                ),
                (
                    cli::explicit("block_size")
                        && (a.mode != Mode::WeightOnly
                            || a.granularity != cli::GranularityArg::Block),
                    "--block-size (only with --mode weight-only --granularity block)",
                ),
                (a.asymmetric && a.mode != Mode::WeightOnly, "--asymmetric"),
                (a.symmetric && a.mode != Mode::WeightOnly, "--symmetric"),
                (
                    cli::explicit("scale") && a.mode != Mode::WeightOnly,
                    "--scale",
                ),
                (
                    cli::explicit("keep_io_types") && !matches!(a.mode, Mode::Fp16 | Mode::Bf16),
                    "--keep-io-types",
                ),
                (
                    cli::explicit("calibrate_method") && a.mode != Mode::Static,
                    "--calibrate-method",
                ),
                (
                    cli::explicit("percentile") && a.mode != Mode::Static,
                    "--percentile",
                ),
                (
                    cli::explicit("calibration_samples") && a.mode != Mode::Static,
                    "--calibration-samples",
                ),
                (
                    cli::explicit("fallback_samples") && a.mode != Mode::Static,
                    "--fallback-samples",
                ),
                (
                    cli::explicit("activation_type") && a.mode != Mode::Static,
                    "--activation-type",
                ),
            ]
            .into_iter()
            .filter_map(|(bad, name)| bad.then_some(name))
            .collect();
            if !misplaced.is_empty() {
                use clap::ValueEnum;
                let mode = a
                    .mode
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                // Weight-only options also depend on the granularity (--block-size on blocks).
                let blocks = misplaced.iter().any(|m| m.starts_with("--block-size"));
                let context = match (a.mode, a.granularity.to_possible_value()) {
                    (Mode::WeightOnly, Some(g)) if blocks => {
                        format!("--mode {mode} --granularity {}", g.get_name())
                    }
                    _ => format!("--mode {mode}"),
                };
                anyhow::bail!(
                    "{} {} not apply to {context}; `onnxopt quantize --help` says which options each mode takes",
                    misplaced.join(", "),
                    if misplaced.len() == 1 { "does" } else { "do" }
                );
            }
            let (node_schemes, float_nodes) = match &a.config {
                Some(path) => read_config(path, &scheme)?,
                None => Default::default(),
            };
            if a.mode != Mode::WeightOnly && !node_schemes.is_empty() {
                anyhow::bail!(
                    "{}: per-node schemes ({}) apply to --mode weight-only; with --mode {} a config can only keep nodes in float (\"node\": \"float\")",
                    a.config.as_deref().map_or_else(String::new, |p| p.display().to_string()),
                    node_schemes.keys().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", "),
                    clap::ValueEnum::to_possible_value(&a.mode)
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default()
                );
            }
            // A scheme for a node the node regexes leave out would be dropped without a word.
            let (include, exclude) = node_regexes(&a.include_nodes, &a.exclude_nodes)?;
            let left_out: Vec<String> = node_schemes
                .keys()
                .filter(|n| {
                    exclude.as_ref().is_some_and(|r| r.is_match(n))
                        || include.as_ref().is_some_and(|r| !r.is_match(n))
                        || float_nodes.contains(n)
                })
                .map(|n| format!("\"{n}\""))
                .collect();
            if !left_out.is_empty() {
                anyhow::bail!(
                    "{}: node(s) {} have a scheme but --include-nodes/--exclude-nodes leave them out: drop one or the other",
                    a.config.as_deref().map_or_else(String::new, |p| p.display().to_string()),
                    left_out.join(", ")
                );
            }
            let config_names: Vec<String> =
                node_schemes.keys().chain(&float_nodes).cloned().collect();
            let calibration = calibration_options(&a.cal)?;
            if a.mode == Mode::Static && calibration.is_none() {
                anyhow::bail!(
                    "--mode static needs --calibration DIR|FILE.npz (samples of the graph inputs)"
                );
            }
            let mut pass_options = passes::PassOptions {
                op_types: op_types(&a.op_types)?,
                include_nodes: include,
                weight_scheme: Some(scheme),
                weight_format,
                keep_io_types: a.keep_io_types,
                calibration,
                conv_integer: a.tune.conv_integer,
                all_layers: a.tune.all_layers,
                full_range_weights: a.tune.full_range_weights,
                reduce_range: a.tune.reduce_range,
                node_schemes,
                exclude_nodes: exclude_with(exclude, &float_nodes)?,
                ..Default::default()
            };
            let passes = quantize_mode(a.mode).configure(
                &mut pass_options,
                ModeChoices {
                    keep_opset: a.keep_opset,
                    keep_float_weights: a.keep_float_weights,
                },
            );
            refuse_fallback_samples_without_fallback(a.no_fallback)?;
            let inputs = input_options(&a.check)?;
            ignored_check_options(&a.check, a.no_check, false);
            let check = !a.no_check;
            let cfg = optimize::OptimizeConfig {
                model: a.model.clone(),
                output: a.output.clone(),
                passes,
                pass_options,
                save: save_options(&a.model, &a.save, a.report.as_deref()),
                check,
                inputs,
                gates: gates(&a.check)?,
                validate_each: false,
                fallback_target: fallback_target(a.no_fallback, &a.check),
                fallback_samples: a.tune.fallback_samples,
                check_notes: vec![],
                selectors: selectors(
                    &op_types(&a.op_types)?,
                    &a.include_nodes,
                    &a.exclude_nodes,
                    a.config.as_deref().map(|p| (p, config_names)),
                )?,
            };
            finish(
                &cfg,
                &reporter,
                cli.quiet,
                a.report.as_deref(),
                a.check.allow_unverified,
            )
        }
        Command::Compare(a) => {
            if let Some(report) = &a.report {
                let mut reads = vec![
                    ("the reference argument", a.reference.as_path()),
                    ("the candidate argument", a.candidate.as_path()),
                ];
                reads.extend(a.check.inputs.as_deref().map(|p| ("--inputs", p)));
                refuse_clobbering(&[("--report", report)], &reads)?;
            }
            refuse_unwritable(&[(a.report.as_deref(), "--report")])?;
            // Both models are read before either's problems are reported: all of them at once.
            let ((reference_model, reference_info), (candidate_model, candidate_info)) =
                match (onnx::load(&a.reference), onnx::load(&a.candidate)) {
                    (Ok(r), Ok(c)) => (r, c),
                    (Err(r), Err(c)) => bail!("{r:#}\n{c:#}"),
                    (Err(e), _) | (_, Err(e)) => return Err(e),
                };
            let user_gates = gates(&a.check)?;
            verify::gate::check_output_names(&user_gates, &reference_model.graph, &a.reference)?;
            let r = onnx::export::to_proto(&reference_model)?;
            refuse_report_over_external_data(
                a.report.as_deref(),
                &[
                    (a.reference.as_path(), &reference_info),
                    (a.candidate.as_path(), &candidate_info),
                ],
            )?;
            let c = onnx::export::to_proto(&candidate_model)?;
            let input_notes = refuse_other_inputs(&r, &a.reference, &c, &a.candidate)?;
            let dir = |p: &std::path::Path| p.parent().map(|d| d.to_path_buf());
            let g = optimize::default_gates(user_gates, false);
            reporter.phase("running both models in tract");
            let mut cmp = verify::compare_models(
                &r,
                dir(&a.reference).as_deref(),
                &c,
                dir(&a.candidate).as_deref(),
                &input_options(&a.check)?,
                &g,
            )?;
            reporter.phase_done();
            cmp.notes.extend(input_notes);
            verify::unverified_if_bfloat16(&mut cmp, &candidate_model);
            verify::refuse_contradicted_shapes(&cmp, &a.reference)?;
            if let Some(path) = &a.report {
                write_json(path, &cmp)?;
            }
            if a.json {
                stdout(&format!("{}\n", serde_json::to_string_pretty(&cmp)?))?;
            } else {
                let notes: String = cmp.notes.iter().map(|n| format!("note: {n}\n")).collect();
                stdout(&(notes + &verify::format_table(&cmp)))?;
            }
            // The verdict on stderr too, as optimize and quantize give it (stdout may be piped
            // into a file or a JSON reader).
            match &cmp.status {
                Verification::Checked => {}
                Verification::Failed => {
                    let first = cmp
                        .failures
                        .first()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default();
                    stderr(&format!("error: the accuracy check failed{first}\n"));
                }
                Verification::CandidateFailed { reason, .. } => {
                    stderr(&format!("error: the candidate failed in tract: {reason}\n"));
                }
                Verification::Unverified { reason, .. } => {
                    stderr(&format!("warning: UNVERIFIED: {reason}\n"));
                }
            }
            Ok(match cmp.status {
                Verification::Checked => ExitCode::SUCCESS,
                Verification::Failed | Verification::CandidateFailed { .. } => ExitCode::from(1),
                Verification::Unverified { .. } if a.check.allow_unverified => ExitCode::SUCCESS,
                Verification::Unverified { .. } => ExitCode::from(3),
            })
        }
    }
}
