//! Command-line interface: clap structs and their help text only.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Makes exported ONNX models smaller and faster, and proves they still compute the same thing.
///
/// Exit codes: 0 success; 1 an accuracy gate failed (the model is still written); 2 error
/// (bad input, bad options, I/O); 3 the result could not be verified (tract cannot run the
/// original), unless --allow-unverified.
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
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    pub external_data_threshold: usize,
    /// Allow the output to overwrite the input model.
    #[arg(long)]
    pub force: bool,
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
}
