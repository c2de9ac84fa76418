//! The `raftkv-node` binary: parse flags, set up logging and signals, run the node.
//! `raftkv-node backup ...` is the backup client instead ([`raftkv_node::backup_client`]).

use clap::Parser;
use raftkv_node::config::{normalize_go_flags, Args};
use raftkv_node::shutdown::{Reason, Shutdown};
use tracing_subscriber::EnvFilter;

fn main() {
    tune_allocator();
    // `backup` (exactly, first) selects the backup client and its own flags; every other
    // command line is the node's.
    if std::env::args().nth(1).as_deref() == Some("backup") {
        std::process::exit(raftkv_node::backup_client::main(std::env::args().skip(1)));
    }
    let argv = normalize_go_flags(std::env::args());
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => e.exit(), // usage errors exit 2; --help/--version exit 0
    };
    let cfg = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("raftkv-node: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.worker_threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftkv-node: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        let shutdown = Shutdown::new();
        let sig = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            sig.trigger(Reason::Signal);
        });
        match raftkv_node::run(cfg, shutdown).await {
            Ok(Reason::Fatal) => 1,
            Ok(_) => 0,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("raftkv-node: {e}");
                1
            }
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}

/// Allocations of 128 KiB and more get their own mapping, returned to the kernel when
/// freed. glibc's default starts there but raises the threshold after each such block
/// is freed (up to 32 MiB), after which the large transient buffers of snapshots, WAL
/// batches and HTTP bodies come from the heap and stay resident after use: measured
/// 2-3 % lower peak RSS under the PUT benchmark, throughput unchanged (see
/// docs/performance.md). `MALLOC_MMAP_THRESHOLD_` in the environment still wins.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called first thing in main,
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}
