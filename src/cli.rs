//! Command-line interface: clap structs and their help text only.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// Makes exported ONNX models smaller and faster, and proves they still compute the same thing.
///
/// Exit codes: 0 success; 1 an accuracy gate failed (the model is still written); 2 error
/// (bad input, bad options, I/O); 3 the result could not be verified (tract cannot run the
/// original, or the result computes in bfloat16), unless --allow-unverified.
#[derive(Debug, Parser)]
#[command(name = "onnxopt", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// No progress bars or summaries on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a model holds: opsets, inputs and outputs, op counts, parameters by dtype,
    /// largest tensors, subgraphs, external data.
    Inspect(InspectArgs),
    /// Run a pass pipeline on a model and write the result (checked in tract by default).
    Optimize(OptimizeArgs),
    /// Quantize a model (weight-only, dynamic, calibrated static, fp16/bf16) and check the
    /// result in tract.
    Quantize(QuantizeArgs),
    /// Run two models in tract on the same inputs and compare their outputs.
    Compare(CompareArgs),
    /// List the passes with their kind and summary.
    ListPasses,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Inputs as an .npz file whose keys are graph input names (other keys are ignored), or
    /// a folder of them: each .npz in it, in name order, is one input set, and the gates hold
    /// on every set (lowest cosine, largest errors, top-1 over all rows).
    #[arg(long, value_name = "FILE.npz|DIR")]
    pub inputs: Option<PathBuf>,
    /// Shape of a generated input, for symbolic dims: NAME:D0,D1,... (repeatable).
    #[arg(long = "input-shape", value_name = "NAME:D0,D1,..")]
    pub input_shape: Vec<String>,
    /// Fill an input with a value, e.g. a sample rate: NAME=VALUE (repeatable).
    #[arg(long = "input", value_name = "NAME=VALUE")]
    pub input: Vec<String>,
    /// Seed for generated inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Gate: |a - b| <= atol + rtol * |a| on every element of every output (finite, >= 0).
    /// `NAME:X` sets the tolerance of one output only (repeatable; the last colon splits).
    #[arg(long, value_name = "[NAME:]X", value_parser = per_output, allow_hyphen_values = true)]
    pub atol: Vec<(Option<String>, f64)>,
    /// Gate: relative tolerance of the same check (finite, >= 0); `NAME:X` as for `--atol`.
    #[arg(long, value_name = "[NAME:]X", value_parser = per_output, allow_hyphen_values = true)]
    pub rtol: Vec<(Option<String>, f64)>,
    /// Gate: smallest cosine similarity per float output, in [-1, 1]. When no gate is given:
    /// 0.9999 in `compare` and for lossless pipelines, 0.99 for lossy ones (their
    /// accuracy-gated fallback aims at 0.999, or at this value when given).
    #[arg(long, value_parser = cosine_limit, allow_hyphen_values = true)]
    pub min_cosine: Option<f64>,
    /// Gate: largest accuracy drop per classification-like output, measured as 1 - top-1
    /// agreement with the original (e.g. 0.01 = at most 1% of rows change their argmax), in
    /// [0, 1]. In `optimize` and `quantize`, also a target of the accuracy-gated fallback.
    #[arg(long, value_name = "FRACTION", value_parser = fraction, allow_hyphen_values = true)]
    pub max_accuracy_drop: Option<f64>,
    /// Exit 0 instead of 3 when tract cannot run the original model (or a bfloat16 result).
    #[arg(long)]
    pub allow_unverified: bool,
}

impl CheckArgs {
    /// The options given that only the check uses.
    pub fn given(&self) -> Vec<&'static str> {
        [
            (self.inputs.is_some(), "--inputs"),
            (!self.input_shape.is_empty(), "--input-shape"),
            (!self.input.is_empty(), "--input"),
            (self.seed != 0, "--seed"),
            (!self.atol.is_empty(), "--atol"),
            (!self.rtol.is_empty(), "--rtol"),
            (self.min_cosine.is_some(), "--min-cosine"),
            (self.max_accuracy_drop.is_some(), "--max-accuracy-drop"),
            (self.allow_unverified, "--allow-unverified"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The reference model.
    pub reference: PathBuf,
    /// The model to compare with it.
    pub candidate: PathBuf,
    #[command(flatten)]
    pub check: CheckArgs,
    /// Also write the comparison as JSON to this file.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Print the comparison as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model (.onnx).
    pub model: PathBuf,
    /// Print a stable JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// Write initializers to an external data file `OUT.data` beside the model.
    #[arg(long)]
    pub external_data: bool,
    /// With --external-data: minimum initializer size, in bytes, to store externally.
    #[arg(
        long,
        default_value_t = 1024,
        value_name = "BYTES",
        requires = "external_data"
    )]
    pub external_data_threshold: usize,
    /// Allow the output to overwrite the input model.
    #[arg(long)]
    pub force: bool,
}

/// Calibration of static quantization (`quantize --mode static`, the `quantize_static` pass).
#[derive(Debug, Args)]
pub struct CalibrationArgs {
    /// static: calibration data, an .npz file (a leading batch axis holds several samples) or
    /// a folder of .npz files (one sample each, streamed).
    #[arg(long, value_name = "DIR|FILE.npz")]
    pub calibration: Option<PathBuf>,
    /// static: range estimator.
    #[arg(long, value_enum, default_value = "minmax")]
    pub calibrate_method: CalibrateMethod,
    /// static: percentile of each tail for --calibrate-method percentile.
    #[arg(long, default_value_t = 99.999)]
    pub percentile: f64,
    /// static: most calibration samples to read (at least 1).
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    pub calibration_samples: usize,
    /// static: activation type, uint8 (asymmetric) or int8 (symmetric).
    #[arg(long, default_value = "uint8")]
    pub activation_type: String,
}

impl CalibrationArgs {
    /// Whether any calibration option was given on the command line.
    pub fn given(&self) -> bool {
        self.calibration.is_some()
            || [
                "calibrate_method",
                "percentile",
                "calibration_samples",
                "activation_type",
            ]
            .iter()
            .any(|id| explicit(id))
    }
}

/// How the static and dynamic quantization passes choose and write their layers (`quantize`
/// and `optimize` alike).
#[derive(Debug, Args)]
pub struct TuningArgs {
    /// static: calibration samples (the first N, at most --calibration-samples) on which the
    /// accuracy-gated fallback also meets its target, besides the check's inputs. More
    /// samples make the kept layers fit more inputs, at the cost of a longer search.
    #[arg(long, value_name = "N", default_value_t = onnxopt::optimize::FALLBACK_CALIBRATION_SAMPLES)]
    pub fallback_samples: usize,
    /// static: quantize every eligible layer, also those that onnxruntime's CPU int8 kernels
    /// run slower than float (depthwise, 1x1 maps, few channels): for integer-only targets.
    #[arg(long)]
    pub all_layers: bool,
    /// static: int8 weights use all of [-127, 127]. By default, layers whose weights are
    /// mostly large (over a quarter above 64) and that read int8 or signed uint8 activations
    /// (zero point >= 64) get weights in [-64, 64] (onnxruntime's `reduce_range`): on x86 CPUs
    /// without VNNI its u8 x s8 kernels saturate with full-range weights there. Use this for
    /// VNNI, ARM or integer-only targets.
    #[arg(long, conflicts_with = "reduce_range")]
    pub full_range_weights: bool,
    /// static and dynamic: every layer's int8 weights in [-64, 64] (onnxruntime's
    /// `reduce_range`), so that no u8 x s8 product pair can saturate on x86 CPUs without VNNI,
    /// whatever the activations; by default static narrows only the layers the rule above
    /// picks and dynamic none. Costs a bit of weight precision.
    #[arg(long)]
    pub reduce_range: bool,
    /// dynamic: also quantize Conv as ConvInteger (slow on common CPU runtimes).
    #[arg(long)]
    pub conv_integer: bool,
}

impl TuningArgs {
    /// The options given, each with the passes it applies to (for `optimize`, which refuses
    /// them when `--passes` runs none of those).
    pub fn given(&self) -> Vec<(&'static str, &'static [&'static str])> {
        const STATIC: &[&str] = &["quantize_static"];
        const BOTH: &[&str] = &["quantize_static", "quantize_dynamic"];
        [
            (explicit("fallback_samples"), "--fallback-samples", STATIC),
            (self.all_layers, "--all-layers", STATIC),
            (self.full_range_weights, "--full-range-weights", STATIC),
            (self.reduce_range, "--reduce-range", BOTH),
            (
                self.conv_integer,
                "--conv-integer",
                &["quantize_dynamic"][..],
            ),
        ]
        .into_iter()
        .filter_map(|(on, name, passes)| on.then_some((name, passes)))
        .collect()
    }
}

#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// The model to optimize (.onnx).
    pub model: PathBuf,
    /// Where to write the result (written atomically).
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Comma-separated pass names to run in order, `none` for load + save only, or a preset
    /// (`default`). See `onnxopt list-passes`.
    #[arg(long, default_value = "default")]
    pub passes: String,
    #[command(flatten)]
    pub save: SaveArgs,
    /// Skip the tract check of the result.
    #[arg(long)]
    pub no_check: bool,
    #[command(flatten)]
    pub check: CheckArgs,
    /// Write the report as JSON to this file (schema in README.md).
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Lossy passes only touch these op types (comma-separated, e.g. Conv,MatMul).
    #[arg(long, value_delimiter = ',', value_name = "OPS")]
    pub op_types: Vec<String>,
    /// Lossy passes leave nodes whose name matches this regex alone.
    #[arg(long, value_name = "REGEX")]
    pub exclude_nodes: Option<String>,
    /// Lossy passes only touch nodes whose name matches this regex.
    #[arg(long, value_name = "REGEX")]
    pub include_nodes: Option<String>,
    /// Do not keep layers in float when the quantized result misses the cosine target
    /// (--min-cosine, default 0.999): the accuracy-gated fallback is on by default when the
    /// pipeline is lossy and the check runs.
    #[arg(long)]
    pub no_fallback: bool,
    /// Validate the IR after every pass (always on in debug builds).
    #[arg(long)]
    pub validate: bool,
    /// The `quantize_static` pass's calibration (as `quantize --mode static`).
    #[command(flatten)]
    pub cal: CalibrationArgs,
    /// The `quantize_static` and `quantize_dynamic` passes' options (as `quantize`).
    #[command(flatten)]
    pub tune: TuningArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Integer weights dequantized by DequantizeLinear; activations stay float.
    WeightOnly,
    /// DynamicQuantizeLinear + MatMulInteger (ConvInteger with --conv-integer).
    Dynamic,
    /// Calibrated QDQ on activations and weights (--calibration).
    Static,
    /// float32 tensors and ops to float16.
    Fp16,
    /// float32 tensors and ops to bfloat16.
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GranularityArg {
    /// One scale per tensor.
    Tensor,
    /// One scale per output channel.
    Channel,
    /// One scale per --block-size elements along the reduction axis (opset 21).
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Integer weights + DequantizeLinear (standard ONNX).
    Qdq,
    /// onnxruntime's com.microsoft MatMulNBits for MatMul and Gemm weights: 4-bit blocks
    /// (--dtype int4|uint4 --granularity block, --block-size a power of two >= 16).
    #[value(name = "matmulnbits")]
    MatMulNBits,
    /// Integer weights + Cast + Mul, which onnxruntime and tract fold into float weights when
    /// they load the model: a smaller file at float speed (8- and 16-bit, per tensor or channel).
    Cast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CalibrateMethod {
    /// Smallest and largest value seen.
    Minmax,
    /// --percentile of each tail, low and high computed separately.
    Percentile,
    /// Threshold minimising the KL divergence of the quantized histogram.
    Entropy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScaleArg {
    /// Float scales from the value range.
    Float,
    /// Power-of-two scales: q = round(x * 2^b), fraction bits b per tensor or channel.
    Pow2,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model to quantize (.onnx).
    pub model: PathBuf,
    /// Where to write the result (written atomically).
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// What to quantize.
    #[arg(long, value_enum, default_value = "weight-only")]
    pub mode: Mode,
    /// weight-only: integer type, int8, uint8, int16, uint16, int4, uint4 (static and dynamic
    /// weights are int8).
    #[arg(long, default_value = "int8")]
    pub dtype: String,
    /// weight-only: scale sharing (static and dynamic: per channel where the opset allows).
    #[arg(long, value_enum, default_value = "channel")]
    pub granularity: GranularityArg,
    /// weight-only: block size for --granularity block.
    #[arg(long, default_value_t = 32)]
    pub block_size: usize,
    /// weight-only: how quantized weights are written. `matmulnbits` replaces MatMul and Gemm
    /// by onnxruntime's com.microsoft MatMulNBits (runs in onnxruntime only; checked on the
    /// float-equivalent model).
    #[arg(long, value_enum, default_value = "qdq")]
    pub format: FormatArg,
    /// weight-only: symmetric scales, zero point at the middle of the range (the default).
    #[arg(long, conflicts_with = "asymmetric")]
    pub symmetric: bool,
    /// weight-only: asymmetric scales, zero point from the min/max range.
    #[arg(long)]
    pub asymmetric: bool,
    /// weight-only: float or power-of-two (fixed-point) scales.
    #[arg(long, value_enum, default_value = "float")]
    pub scale: ScaleArg,
    #[command(flatten)]
    pub cal: CalibrationArgs,
    /// static, dynamic: layers left in float keep float weights. By default their weights are
    /// stored in int8 per channel as Cast + Mul, which onnxruntime and tract fold back into
    /// float weights when they load the model (a smaller file at float speed).
    #[arg(long)]
    pub keep_float_weights: bool,
    /// static: keep a model's opset 10-12. By default static mode raises it to 13 (the first
    /// with per-channel DequantizeLinear), rewriting the few ops whose form changed, so that
    /// weights get one scale per output channel instead of one per tensor.
    #[arg(long)]
    pub keep_opset: bool,
    #[command(flatten)]
    pub tune: TuningArgs,
    /// fp16/bf16: keep float32 graph inputs and outputs, with Casts at the border.
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    pub keep_io_types: bool,
    #[command(flatten)]
    pub save: SaveArgs,
    /// Skip the tract check of the result.
    #[arg(long)]
    pub no_check: bool,
    #[command(flatten)]
    pub check: CheckArgs,
    /// Lossy passes only touch these op types (comma-separated, e.g. Conv,MatMul).
    #[arg(long, value_delimiter = ',', value_name = "OPS")]
    pub op_types: Vec<String>,
    /// Leave nodes whose name matches this regex alone.
    #[arg(long, value_name = "REGEX")]
    pub exclude_nodes: Option<String>,
    /// Only touch nodes whose name matches this regex.
    #[arg(long, value_name = "REGEX")]
    pub include_nodes: Option<String>,
    /// Do not keep layers in float when the result misses the cosine target.
    #[arg(long)]
    pub no_fallback: bool,
    /// Per-node settings, a JSON file: {"nodes": {"NODE": "float" | {"dtype": "int4",
    /// "granularity": "block", "block_size": 32, "symmetric": false, "scale": "pow2"}}}.
    /// Unset fields take the command line's values; "float" keeps the node in float.
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
}

/// A gate value: a finite number within `[lo, hi]` (`want` says so in the error).
fn gate_value(s: &str, lo: f64, hi: f64, want: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("expected {want}"))
    }
}

/// `--atol`, `--rtol`: finite and not negative.
fn non_negative(s: &str) -> Result<f64, String> {
    gate_value(s, 0.0, f64::MAX, "a finite number >= 0")
}

/// `--atol`, `--rtol`: `X` or `NAME:X` (split at the last colon: ONNX names may hold colons),
/// `X` finite and not negative.
fn per_output(s: &str) -> Result<(Option<String>, f64), String> {
    match s.rsplit_once(':') {
        Some((name, x)) if !name.is_empty() => Ok((Some(name.to_string()), non_negative(x)?)),
        _ => Ok((None, non_negative(s)?)),
    }
}

/// `--min-cosine`: a cosine, in [-1, 1].
fn cosine_limit(s: &str) -> Result<f64, String> {
    gate_value(s, -1.0, 1.0, "a cosine in [-1, 1]")
}

/// `--max-accuracy-drop`: a fraction, in [0, 1].
fn fraction(s: &str) -> Result<f64, String> {
    gate_value(s, 0.0, 1.0, "a fraction in [0, 1]")
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got `{s}`")),
    }
}

/// The ids (field names) of the subcommand's options given on the command line, as opposed
/// to their defaults; set once by `main` from clap's matches.
static EXPLICIT: OnceLock<HashSet<String>> = OnceLock::new();

/// Records which options `matches` (the whole command line) gives explicitly.
pub fn record_explicit(matches: &clap::ArgMatches) {
    let mut ids = HashSet::new();
    if let Some((_, sub)) = matches.subcommand() {
        for id in sub.ids() {
            if sub.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine) {
                ids.insert(id.as_str().to_string());
            }
        }
    }
    let _ = EXPLICIT.set(ids);
}

/// Whether the option with field name `id` was given on the command line, even at its
/// default value (an option given to a mode or pipeline that ignores it is refused). No
/// option reads the environment, so an option whose value differs from its default was
/// given.
pub fn explicit(id: &str) -> bool {
    EXPLICIT.get().is_some_and(|s| s.contains(id))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_tolerance_names_its_output_before_the_last_colon() {
        assert_eq!(per_output("0.01"), Ok((None, 0.01)));
        assert_eq!(per_output("output:0.01"), Ok((Some("output".into()), 0.01)));
        assert_eq!(
            per_output("onnx::LSTM_209:1e-3"),
            Ok((Some("onnx::LSTM_209".into()), 1e-3))
        );
        assert!(per_output("output:-1").unwrap_err().contains(">= 0"));
        assert!(per_output("output:nan").is_err());
        assert!(per_output(":0.1").is_err());
    }
}
