//! `raftkv-bench`: see `raftkv-bench --help` and docs/performance.md.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use raftkv_bench::cli::Args;
use raftkv_bench::report::Report;
use raftkv_bench::runner;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = match Args::parse().validate() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("raftkv-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(report) => {
            if cfg.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if report.ok == 0 {
                eprintln!("raftkv-bench: no request succeeded");
                return ExitCode::from(3);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("raftkv-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &raftkv_bench::cli::Config) -> anyhow::Result<Report> {
    let rt = if cfg.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")?;
    let result = rt.block_on(runner::run(cfg))?;
    Ok(Report::new(cfg, &result))
}
