//! The `calsync` command line. Everything it runs lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use std::io::Write as _;

use calsync::app::{self, Application};
use calsync::config::Settings;
use calsync::store::RunOutcome;

/// mimalloc instead of the system allocator: a sync round allocates a few dozen strings per
/// event, and glibc's malloc and free were a fifth of calsync's instructions (BENCHMARKS.md).
/// Its `override` feature makes it the C code's `malloc` too (the bundled SQLite's, whose
/// writer thread otherwise ran glibc's, trimming its arena back to the kernel with `madvise`
/// and faulting the pages in again page write after page write).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "calsync",
    version,
    about = "Office 365 calendar sync over Microsoft Graph"
)]
struct Cli {
    /// TOML configuration file (defaults < file < CALSYNC_* environment variables).
    #[arg(long, global = true, env = "CALSYNC_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: HTTP endpoints and the sync workers, until SIGTERM or ctrl-c.
    Serve,
    /// Sync every mailbox once and exit: 0 if all succeeded, 1 otherwise.
    SyncOnce,
    /// Create or upgrade the store's tables (also done by `serve` at start), then exit.
    Migrate,
    /// Validate the configuration and print a summary (no secrets).
    CheckConfig,
    /// Run the simulator and the service together on loopback and check the store against the
    /// simulator's ground truth (exit 0 on a match).
    #[cfg(feature = "lab")]
    Demo(calsync::demo::DemoArgs),
    /// Replay the 22-minute identity outage on the simulator, compressed in time, and report
    /// lag, slot holds, requests and recovery per tenant against the targets (exit 0 if met).
    #[cfg(feature = "lab")]
    Drill(calsync::drill::DrillArgs),
    /// Measure sync throughput, idle-round cost, the raw HTTP ceiling and memory on this machine.
    #[cfg(feature = "lab")]
    Bench(calsync::bench::BenchArgs),
    /// Run the Microsoft Graph simulator (token endpoint, calendarView delta, faults).
    #[cfg(feature = "lab")]
    Sim(calsync::sim::SimArgs),
    /// Ask a running calsync for /healthz; exit 0 if it answers 200 (for Docker HEALTHCHECK).
    Health {
        /// Base URL of the running service; defaults to the configured server.listen on loopback.
        #[arg(long, env = "CALSYNC_URL")]
        url: Option<String>,
    },
}

/// Writes to stdout; a reader that went away (`calsync check-config | head -2`) ends the output
/// quietly instead of panicking like `println!`.
fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => eprintln!("calsync: cannot write to stdout: {e}"),
    }
}

macro_rules! say {
    ($($arg:tt)*) => { $crate::emit(&format!("{}\n", format_args!($($arg)*))) };
}
#[cfg(feature = "lab")]
pub(crate) use say;

#[cfg(feature = "lab")]
macro_rules! say_raw {
    ($($arg:tt)*) => { $crate::emit(&format!($($arg)*)) };
}
#[cfg(feature = "lab")]
pub(crate) use say_raw;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("calsync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        // The simulator and the demo bring their own configuration.
        #[cfg(feature = "lab")]
        Command::Demo(args) => runtime.block_on(lab::demo(args)),
        #[cfg(feature = "lab")]
        Command::Sim(args) => runtime.block_on(lab::sim(args)),
        #[cfg(feature = "lab")]
        Command::Drill(args) => runtime.block_on(lab::drill(args)),
        #[cfg(feature = "lab")]
        Command::Bench(args) => runtime.block_on(lab::bench(args)),
        command => {
            let settings = match Settings::load(cli.config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("calsync: {e}");
                    return ExitCode::from(2);
                }
            };
            runtime.block_on(async move {
                match command {
                    Command::Serve => serve(settings).await,
                    Command::SyncOnce => sync_once(settings).await,
                    Command::CheckConfig => check_config(&settings),
                    Command::Migrate => migrate(&settings).await,
                    Command::Health { url } => health(&settings, url).await,
                    #[cfg(feature = "lab")]
                    Command::Demo(_) | Command::Sim(_) | Command::Drill(_) | Command::Bench(_) => {
                        unreachable!("matched above")
                    }
                }
            })
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("calsync: {}", calsync::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<ExitCode> {
    calsync::telemetry::init(&settings.log);
    let app = Application::build(settings).await?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        app::shutdown_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    app.run_until_stopped(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn sync_once(settings: Settings) -> anyhow::Result<ExitCode> {
    calsync::telemetry::init(&settings.log);
    let store = app::open_store(&settings).await?;
    let (worker, _) = app::build_worker(&settings, store)?;
    let results = worker.sync_all_once().await?;
    let failed = results
        .iter()
        .filter(|r| r.outcome != RunOutcome::Ok)
        .count();
    for r in &results {
        match &r.error {
            None => say!(
                "ok      {}/{}: {} pages, {} upserted, {} deleted{}",
                r.tenant,
                r.mailbox,
                r.report.pages,
                r.report.upserted,
                r.report.deleted,
                if r.report.full_round {
                    " (full round)"
                } else {
                    ""
                }
            ),
            Some(e) => say!("FAILED  {}/{}: {e}", r.tenant, r.mailbox),
        }
    }
    say!(
        "{} mailboxes synced, {failed} failed",
        results.len() - failed
    );
    Ok(if failed == 0 && !results.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn migrate(settings: &Settings) -> anyhow::Result<ExitCode> {
    let shown = app::redact_url(&settings.store.url);
    let backend = calsync::store::migrate(&settings.store.url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot migrate the store at {shown}: {e}"))?;
    say!("store at {shown} is up to date ({})", backend.as_str());
    Ok(ExitCode::SUCCESS)
}

fn check_config(settings: &Settings) -> anyhow::Result<ExitCode> {
    say!("configuration is valid");
    say!(
        "  server.listen      {} (health, metrics, status page, admin API)",
        settings.server.listen
    );
    say!(
        "  public listener    {}",
        if settings.notifications.enabled() {
            format!("{} (notifications only)", settings.server.public_listen)
        } else {
            "off (no notifications.public_url)".to_string()
        }
    );
    say!(
        "  store.url          {}",
        app::redact_url(&settings.store.url)
    );
    say!("  graph.base_url     {}", settings.graph.base_url);
    say!("  graph.authority    {}", settings.graph.authority);
    say!(
        "  sync               every {} (+ up to {} jitter), {} workers, job deadline {}",
        calsync::config::HumanDuration(settings.sync.interval),
        calsync::config::HumanDuration(settings.sync.jitter),
        settings.sync.workers,
        calsync::config::HumanDuration(settings.sync.job_deadline)
    );
    say!(
        "  admin API (/v1)    {}",
        if settings.api.token.is_some() {
            "enabled"
        } else {
            "disabled (no api.token)"
        }
    );
    for t in &settings.tenants {
        say!(
            "  tenant {:<12} tenant_id {} client_id {} credential {:?} mailboxes {}",
            t.name,
            t.tenant_id,
            t.client_id,
            t.credential,
            t.mailboxes.len()
        );
    }
    if settings.tenants.is_empty() {
        say!("  (no tenants configured: nothing will be synced)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn health(settings: &Settings, url: Option<String>) -> anyhow::Result<ExitCode> {
    let base = url.unwrap_or_else(|| {
        let mut addr = settings.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    let client = calsync::net::http_client(Duration::from_secs(2), Duration::from_secs(5))?;
    let url = format!("{}/healthz", base.trim_end_matches('/'));
    match client.get(&url).send().await {
        Ok(response) if response.status().is_success() => {
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            say!("{}", body["status"].as_str().unwrap_or("ok"));
            Ok(ExitCode::SUCCESS)
        }
        Ok(response) => {
            say!("unhealthy: HTTP {}", response.status());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            say!("unreachable: {}", calsync::net::describe_transport(&e));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The lab commands: the simulator, the demo, the drill and the benchmarks.
#[cfg(feature = "lab")]
mod lab {
    use std::process::ExitCode;

    pub async fn demo(args: calsync::demo::DemoArgs) -> anyhow::Result<ExitCode> {
        let json = args.json;
        let summary = calsync::demo::run(args).await?;
        if json {
            crate::say!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            crate::say_raw!("{}", calsync::demo::render_summary(&summary));
        }
        Ok(if summary.matched {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    pub async fn drill(args: calsync::drill::DrillArgs) -> anyhow::Result<ExitCode> {
        let json = args.json;
        let report = calsync::drill::run(args).await?;
        if json {
            crate::say!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            crate::say_raw!("{}", calsync::drill::render(&report));
        }
        Ok(if report.all_targets_met {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    pub async fn bench(args: calsync::bench::BenchArgs) -> anyhow::Result<ExitCode> {
        let json = args.json;
        if let Some(calls) = args.pipeline_calls {
            let run = calsync::instructions::pipeline_calls(calls)?;
            crate::say!("{}", serde_json::to_string_pretty(&run)?);
            return Ok(ExitCode::SUCCESS);
        }
        if args.instructions {
            let report = calsync::instructions::count(&args).await?;
            if json {
                crate::say!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                crate::say_raw!("{}", calsync::instructions::render(&report));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if args.sync_only {
            let report = calsync::bench::sync_only(&args).await?;
            crate::say!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(ExitCode::SUCCESS);
        }
        let report = calsync::bench::run(args).await?;
        if json {
            crate::say!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            crate::say_raw!("{}", calsync::bench::render(&report));
        }
        Ok(ExitCode::SUCCESS)
    }

    pub async fn sim(args: calsync::sim::SimArgs) -> anyhow::Result<ExitCode> {
        calsync::telemetry::init(&calsync::config::LogSettings {
            format: calsync::config::LogFormat::Pretty,
            level: "info".into(),
        });
        calsync::sim::run(args).await?;
        Ok(ExitCode::SUCCESS)
    }
}
