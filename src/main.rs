//! The `onnxopt` binary: clap -> config -> library call -> exit code.

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Command};
use onnxopt::onnx;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect(a) => {
            let (model, info) = onnx::load(&a.model)?;
            let file = a.model.display().to_string();
            let report = onnxopt::inspect::inspect(&model, &file, &info);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", onnxopt::inspect::format_text(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Optimize(a) => {
            let (model, _info) = onnx::load(&a.model)?;
            let opts = onnx::SaveOptions {
                external_data: a.save.external_data,
                external_threshold: a.save.external_data_threshold,
                protect: if a.save.force { vec![] } else { vec![a.model.clone()] },
            };
            onnx::save(&model, &a.output, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
