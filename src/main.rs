//! The `tally` binary: parse the command line, run the command, map the outcome to an exit code.
//!
//! Exit codes: 0 success, 1 failure (printed as one chained line), 2 bad usage (clap), and
//! whatever a command documents beyond that: 3 when a command worked but found something that
//! needs attention (`tally queue stats --max-age` with an older pending event, `tally replay
//! --ship` with events Lago has not acknowledged, an interrupted replay, `tally audit` finding
//! events Lago lacks, holds differently or cannot bill).

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use anyhow::Context;
use tally::cli::{Cli, Command};
use tally::commands::settings;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own summary; keep the services' info lines out of it unless asked.
    if matches!(cli.command, Command::Demo(_)) && std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet (the runtime starts below), so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    tally::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tally: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            // A closed stdout (`tally queue list | head`) is not an error.
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            // Errors can quote input (a file's line, Lago's answer): escaped like all record text.
            let text = tally::text::printable(&tally::text::error_chain(&err));
            eprintln!("tally: error: {text}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_on_signals();
    match command {
        Command::Proxy(args) => {
            let (config, address) = settings::proxy(args)?;
            tally::proxy::run(config, &address, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Ship(args) => {
            let settings = settings::ship(&args).context("invalid shipper settings")?;
            tally::ship::run(settings, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Replay(args) => tally::commands::replay::run(args, shutdown).await,
        Command::Queue(args) => tally::commands::queue::run(args).await,
        Command::Demo(args) => tally::commands::demo::run(args, shutdown).await,
        Command::Audit(args) => tally::commands::audit::run(args, shutdown).await,
        Command::Keys(args) => tally::commands::keys::run(args).await,
        Command::LagoEmulator(args) => {
            let (config, addr) = settings::lago_emulator(args).await?;
            tally::lago_emulator::run(config, addr, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
    }
}

/// A token cancelled on SIGTERM or SIGINT; long-running commands drain and exit 0.
///
/// The handlers are installed here, before the command starts, not in the spawned task: a
/// SIGTERM that arrives while the task has not yet run (a `systemctl stop` right after start)
/// would otherwise meet the default action and kill the process instead of stopping it cleanly.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    #[cfg(unix)]
    let signalled = {
        use tokio::signal::unix::{SignalKind, signal};
        let (term, int) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                // Without handlers the default actions stay: the process ends on the signal.
                (Err(e), _) | (Ok(_), Err(e)) => {
                    tracing::warn!(error = %e, "cannot handle SIGTERM/SIGINT; a stop will not drain");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    #[cfg(not(unix))]
    let signalled = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::spawn(async move {
        signalled.await;
        tracing::info!("shutdown requested; draining");
        trigger.cancel();
    });
    token
}
