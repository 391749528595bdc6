//! `sixfold-node --config node.toml`: one storage node.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sixfold storage node.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file; without it the embedded default is used (see --print-default-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", node::config::DEFAULT_CONFIG);
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match &args.config {
        Some(path) => node::NodeConfig::load(path),
        None => node::NodeConfig::parse(node::config::DEFAULT_CONFIG, "embedded default config"),
    };
    let config = config.unwrap_or_else(|e| exit_with(&e));
    match run(config) {
        Ok(None) => {}
        // Stopped on a fatal disk error: already logged at ERROR; exit 1 (2 is for setup).
        Ok(Some(reason)) => {
            eprintln!("sixfold-node: stopped: {reason}");
            std::process::exit(1);
        }
        Err(e) => exit_with(&format!("{e:#}")),
    }
}

fn exit_with(message: &str) -> ! {
    eprintln!("sixfold-node: {message}");
    std::process::exit(2);
}

/// Serves until SIGTERM or SIGINT (`Ok(None)`) or until a fatal disk error stops the node
/// (`Ok(Some(reason))`).
fn run(config: node::NodeConfig) -> anyhow::Result<Option<String>> {
    let server_config =
        node::tls::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let listen = config.listen;
    let metrics_listen = config.metrics_listen;
    // One runtime thread serves the network and drives the node's core; the journal writer
    // runs on it too (`journal.persister = "inline"`) or beside it on its own thread, which is
    // why the node opens inside it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (node, report) = node::Node::open(config)?;
        log_recovery(&report);
        let endpoint = quinn::Endpoint::server(server_config, listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        // Bound before the node says it is ready: a port in use is a startup error.
        let metrics = match metrics_listen {
            Some(addr) => {
                let listener = node::metrics::bind(addr).await?;
                let bound = listener.local_addr()?;
                tracing::info!("metrics on http://{bound}/metrics");
                let driver = node.driver().clone();
                Some(tokio::spawn(node::metrics::serve(listener, driver)))
            }
            None => None,
        };
        tracing::info!(%listen, name = %node.config.name, az = %node.config.az, "serving");
        // The readiness line tests and scripts wait for.
        println!("sixfold-node ready on {}", endpoint.local_addr()?);
        let server = tokio::spawn(node::server::serve(Arc::clone(&node), endpoint.clone()));
        let fatal = tokio::select! {
            () = shutdown_signal() => None,
            reason = node.stopped() => Some(reason),
        };
        if fatal.is_some() {
            // The core has answered everything with ShuttingDown: let those replies leave
            // before the connections close.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        } else {
            tracing::info!("shutting down");
        }
        endpoint.close(0u32.into(), b"shutting down");
        server.abort();
        // The metrics server owns its connections: aborting it ends them all.
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        // Bounded: a connection a peer abandoned mid-handshake would otherwise hold the exit
        // until its idle timeout (tens of seconds), past a supervisor's stop deadline.
        let idle = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle());
        if idle.await.is_err() {
            tracing::info!("connections still open after 2 s; exiting anyway");
        }
        let stopped = node.shutdown().await.err();
        anyhow::Ok(fatal.or(stopped))
    })
}

/// A torn tail is the normal end of a journal after a crash (INFO); a corrupt range in the
/// middle lost acknowledged records on this node (WARN, one line per range, so an operator
/// sees which bytes and which group sequences).
fn log_recovery(report: &node::node::RecoveryReport) {
    for range in &report.corrupt {
        tracing::warn!(
            file = range.start.file,
            start = range.start.offset,
            end_file = range.end.file,
            end = range.end.offset,
            sequence_before = range.sequence_before,
            sequence_after = range.sequence_after,
            "journal corrupt in the middle: {range}: {}; every valid group after it is kept, \
             the missing groups' records are absent here until they are sent again",
            range.reason
        );
    }
    if report.corrupt_omitted > 0 {
        tracing::warn!(
            omitted = report.corrupt_omitted,
            "journal has more corrupt ranges than are listed"
        );
    }
    tracing::info!(
        groups = report.groups,
        records = report.records,
        corrupt_ranges = report.corrupt.len() as u64 + report.corrupt_omitted,
        stale_headers_erased = report.stale_headers_erased,
        "journal recovered; scan stopped: {}",
        report.stop_reason
    );
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
