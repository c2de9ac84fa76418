//! `raftkv-operator`: `crd` prints the CustomResourceDefinition; `render` prints the
//! objects it would create for a RaftKV manifest; `run` runs the controller under a
//! leader-election Lease with `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::runtime::events::{Recorder, Reporter};
use raftkv_operator::controller::{self, Context};
use raftkv_operator::leader::{Fence, LeaseLock};
use raftkv_operator::metrics::{self, Metrics};
use raftkv_operator::node_client::HttpNodeClient;

/// Kubernetes operator for raftkv clusters.
#[derive(Parser, Debug)]
#[command(name = "raftkv-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the RaftKV CustomResourceDefinition as YAML.
    Crd,
    /// Print, as YAML, the objects the operator creates for a new RaftKV read from FILE
    /// (`-`: standard input): Services, StatefulSet, PodDisruptionBudget and, with
    /// `spec.backup`, the backup CronJob and claim. Nothing is sent anywhere.
    Render {
        /// A RaftKV manifest (one YAML document).
        file: std::path::PathBuf,
        /// Namespace to render into, unless the manifest has one.
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// Run the controller.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of the /metrics and /healthz endpoint.
    #[arg(long, env = "RAFTKV_OPERATOR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "RAFTKV_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "RAFTKV_OPERATOR_LEASE", default_value = "raftkv-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: the pod name or hostname).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Timeout of one node API request in seconds (membership changes wait for a commit).
    #[arg(long, default_value_t = 10)]
    node_timeout_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            match out.write_all(raftkv_operator::crd::crd_yaml().as_bytes()).and_then(|()| out.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the CRD"),
                _ => Ok(()),
            }
        }
        Command::Run(args) => run(args).await,
        Command::Render { file, namespace } => {
            use std::io::{Read as _, Write as _};
            let mut text = String::new();
            if file.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text).context("reading standard input")?;
            } else {
                text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            }
            let mut rkv: raftkv_operator::crd::RaftKV =
                serde_yaml::from_str(&text).with_context(|| format!("{} is not a RaftKV manifest", file.display()))?;
            if rkv.metadata.namespace.is_none() {
                rkv.metadata.namespace = Some(namespace);
            }
            // The API server gives every object a uid; owner references need one.
            rkv.metadata.uid.get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".to_string());
            let mut out = std::io::stdout().lock();
            for obj in raftkv_operator::resources::initial_objects(&rkv) {
                let doc = serde_yaml::to_string(&obj).context("rendering an object")?;
                match out.write_all(format!("---\n{doc}").as_bytes()) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    r => r.context("writing the objects")?,
                }
            }
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let server = tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("raftkv-operator-{}", std::process::id()));
    let fence = Fence::closed();
    let lock = LeaseLock::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_seconds),
        fence.clone(),
    );
    lock.acquire(Duration::from_secs(2)).await;
    let node = HttpNodeClient::new(Duration::from_secs(args.node_timeout_seconds)).context("building HTTP client")?;
    let reporter = Reporter { controller: "raftkv-operator".into(), instance: Some(identity) };
    let ctx = Arc::new(Context { recorder: Recorder::new(client.clone(), reporter), client, node, metrics, fence });
    let renew = Duration::from_secs((args.lease_seconds / 3).max(1));
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        lock.hold(renew).await;
        let _ = lost_tx.send(());
    });
    let shutdown = async move {
        // Kubernetes stops pods with SIGTERM; a terminal sends SIGINT.
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
            _ = term => tracing::info!("SIGTERM; stopping"),
        }
    };
    // A signal lets reconciles under way finish (the lease is still ours). A lost lease
    // drops them at once: the fence already keeps them from starting another step, and
    // steps are idempotent and crash-safe, so one cut short is as after a crash.
    tokio::select! {
        _ = controller::run(ctx, args.watch_namespace, shutdown) => {}
        _ = lost_rx => tracing::error!("lost the lease; stopping at once"),
    }
    holder.abort();
    server.abort();
    // Exiting non-zero after losing the lease lets the Deployment restart us as a
    // follower; a clean interrupt exits 0.
    if holder.await.is_ok() {
        anyhow::bail!("leader lease lost");
    }
    Ok(())
}
