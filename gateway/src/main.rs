//! The `watchgate` binary: parse the command line, set up logging, run, and
//! map failures to exit codes (2: configuration or plugin problem found
//! before start; 1: failure while running; 0: clean shutdown).

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use watchgate::cli::{Cli, Command, LogFormat, PluginCommand, StateCommand};
use watchgate::config::Config;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WATCHGATE_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,wasmtime=warn,cranelift=warn,zookeeper_client=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let code = match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => watchgate::cli::check(&config),
        Command::State {
            command: StateCommand::Reset { config },
        } => watchgate::cli::state_reset(&config),
        Command::DeadLetters { command } => watchgate::cli::dead_letters(command),
        Command::Trace(args) => watchgate::cli::trace(&args),
        Command::Plugin {
            command: PluginCommand::Test(args),
        } => watchgate::cli::plugin_test(&args),
        Command::Plugin {
            command: PluginCommand::New(args),
        } => watchgate::cli::plugin_new(&args),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run(path: &std::path::Path) -> i32 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Invalid configuration.");
            eprintln!("error: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("watchgate")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        let app = watchgate::app::run(config, shutdown.clone());
        tokio::pin!(app);
        tokio::select! {
            r = &mut app => return r,
            _ = wait_for_signal() => {
                tracing::info!("Signal received; shutting down (a second signal exits at once).");
                signals.cancel();
            }
        }
        tokio::select! {
            r = &mut app => r,
            _ = wait_for_signal() => {
                tracing::warn!("Second signal; exiting now.");
                std::process::exit(130);
            }
        }
    });
    // Worker threads blocked in a plugin call are bounded by their deadline;
    // do not wait for anything else.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => 0,
        Err(e) => {
            let code = if e.downcast_ref::<watchgate::app::StartError>().is_some() {
                2
            } else {
                1
            };
            tracing::error!(error = %format!("{e:#}"), "watchgate stopped.");
            eprintln!("error: {e:#}");
            code
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on the default
        // action; wait forever here.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
