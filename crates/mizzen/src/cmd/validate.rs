//! `mizzen validate PATH...`: load config the way the pilot does and report every problem.
//!
//! Exit code 1 when any error was found (so CI pipelines can gate on it), 0 otherwise.

use mizzen_config::load::load_paths;
use mizzen_config::ConfigError;
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One line per error, then a summary line.
    #[default]
    Text,
    /// A JSON array of errors (file, document, kind, namespace, name, field, message).
    Json,
}

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// Files or directories (walked recursively; *.yaml, *.yml, *.json).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Print only the summary line (text output).
    #[arg(short, long)]
    pub quiet: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// What one run found; split from printing so the counts are testable.
struct Report {
    errors: Vec<ConfigError>,
    resources: usize,
    ignored: usize,
    files: usize,
}

fn collect(paths: &[PathBuf]) -> Report {
    let (loads, root_errors) = load_paths(paths);
    let mut errors = root_errors;
    let mut resources = 0;
    let mut ignored = 0;
    for load in &loads {
        resources += load.resources.len();
        ignored += load.ignored.len();
        errors.extend(load.errors().cloned());
    }
    Report {
        errors,
        resources,
        ignored,
        files: loads.len(),
    }
}

pub fn run(args: ValidateArgs) -> anyhow::Result<u8> {
    // A path that does not exist is a usage error the user wants to hear about, not a
    // silently empty walk.
    for p in &args.paths {
        if !p.exists() {
            anyhow::bail!("{}: no such file or directory", p.display());
        }
    }
    let report = collect(&args.paths);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &report.errors)?;
            writeln!(out)?;
        }
        OutputFormat::Text => {
            if !args.quiet {
                for e in &report.errors {
                    writeln!(out, "{e}")?;
                }
            }
            writeln!(
                out,
                "{} resources valid, {} errors, {} ignored objects in {} files",
                report.resources,
                report.errors.len(),
                report.ignored,
                report.files
            )?;
        }
    }
    out.flush()?;
    Ok(u8::from(!report.errors.is_empty()))
}
