//! The `changecast` command: `serve`, `demo`, `check` and `token`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{Map, Value};
use tokio::net::TcpListener;

use changecast::config::{Config, ConfigError};
use changecast::plan::{Checked, Plan};
use changecast::{auth, demo, server};

#[derive(Parser)]
#[command(
    name = "changecast",
    version,
    about = "Streams a database's changes to the right users, live."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway from a config file.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// One-command demo: the Mercury app on SQLite, a simulator, and the activity page.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Folder for the demo database and config (default: a temporary folder).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Simulated changes per second (0: none).
        #[arg(long, default_value_t = 5)]
        rate: u32,
        /// Run as a cluster node on this NATS server (nats://HOST:PORT), with `--name`.
        /// Nodes given the same `--data` share the database and the demo secret.
        #[arg(long, requires = "name")]
        nats: Option<String>,
        /// This cluster node's name (unique per node).
        #[arg(long, requires = "nats")]
        name: Option<String>,
    },
    /// Validate a config without starting and print the compiled plan. Errors and
    /// warnings go to stderr, one per line, each naming its config path.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Fail (exit 1) on warnings too, not only on errors: for CI.
        #[arg(long)]
        strict: bool,
    },
    /// Mint an HS256 JWT for testing.
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long, conflicts_with = "secret_env")]
        secret: Option<String>,
        /// Environment variable holding the secret.
        #[arg(long)]
        secret_env: Option<String>,
        /// Lifetime, like 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Extra claim KEY=VALUE; VALUE is read as JSON when it parses, else as a string.
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, Value)>,
    },
}

fn parse_claim(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    if k.is_empty() {
        return Err("empty claim name".into());
    }
    let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
    Ok((k.to_owned(), v))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Command::Check { config, strict } => check(&config, strict),
        Command::Token {
            sub,
            secret,
            secret_env,
            ttl,
            claims,
        } => token(&sub, secret, secret_env, ttl, claims),
        Command::Serve { config } => run_async(serve(config)),
        Command::Demo {
            listen,
            data,
            rate,
            nats,
            name,
        } => run_async(run_demo(listen, data, rate, nats.zip(name))),
    }
}

fn run_async(fut: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads and compiles a config, printing every error on stderr. Returns the plan, if
/// there are no errors, and the warnings either way.
fn load_plan(path: &Path) -> (Option<Plan>, Vec<ConfigError>) {
    let checked = match Config::load_partial(path) {
        Ok(partial) => Plan::check_partial(&partial),
        Err(errors) => Checked {
            plan: Err(errors),
            warnings: Vec::new(),
        },
    };
    match checked.plan {
        Ok(plan) => (Some(plan), checked.warnings),
        Err(errors) => {
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            (None, checked.warnings)
        }
    }
}

fn check(path: &Path, strict: bool) -> ExitCode {
    let (plan, warnings) = load_plan(path);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    match plan {
        Some(_) if strict && !warnings.is_empty() => {
            eprintln!(
                "{}: {} warning(s), refused by --strict",
                path.display(),
                warnings.len()
            );
            ExitCode::FAILURE
        }
        Some(plan) => {
            println!("{}: ok", path.display());
            print!("{}", plan.describe());
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

fn token(
    sub: &str,
    secret: Option<String>,
    secret_env: Option<String>,
    ttl: Duration,
    claims: Vec<(String, Value)>,
) -> ExitCode {
    let secret = match (secret, secret_env) {
        (Some(s), _) => s,
        (None, Some(var)) => match std::env::var(&var) {
            Ok(s) if !s.is_empty() => s,
            _ => {
                eprintln!("error: environment variable `{var}` is not set");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => {
            eprintln!("error: give --secret or --secret-env");
            return ExitCode::FAILURE;
        }
    };
    let extra: Map<String, Value> = claims.into_iter().collect();
    println!(
        "{}",
        auth::mint(secret.as_bytes(), sub, ttl.as_secs(), &extra)
    );
    ExitCode::SUCCESS
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs until a stop signal or a fatal error, then stops in order.
async fn run_until_stopped(running: server::Running) -> anyhow::Result<()> {
    let shutdown = running.app.shutdown.clone();
    tokio::select! {
        _ = stop_signal() => {
            tracing::info!("stopping: clients get 1012, the source writes its last checkpoint");
            running.stop().await
        }
        _ = shutdown.cancelled() => running.wait().await,
    }
}

async fn serve(config: PathBuf) -> anyhow::Result<()> {
    let (plan, warnings) = load_plan(&config);
    for w in &warnings {
        tracing::warn!("config: {w}");
    }
    let Some(plan) = plan else {
        anyhow::bail!("invalid config");
    };
    let listener = bind(plan.server.listen).await?;
    let running = server::start(plan, listener, None).await?;
    tracing::info!(addr = %running.local_addr, "changecast listening");
    run_until_stopped(running).await
}

async fn run_demo(
    listen: SocketAddr,
    data: Option<PathBuf>,
    rate: u32,
    cluster: Option<(String, String)>,
) -> anyhow::Result<()> {
    // A temporary folder lives as long as this function; a given one is kept.
    let (dir, _temp) = match data {
        Some(d) => {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("changecast-demo-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let db = dir.join("mercury.db");
    demo::create_database(&db).with_context(|| format!("cannot create {}", db.display()))?;

    let listener = bind(listen).await?;
    let addr = listener.local_addr()?;
    let fresh = || -> String {
        std::iter::repeat_with(fastrand::alphanumeric)
            .take(32)
            .collect()
    };
    let (config_text, config_path) = match &cluster {
        None => (
            demo::config_toml(&db, &addr.to_string(), &fresh()),
            dir.join("changecast.toml"),
        ),
        Some((nats, name)) => {
            // Every node of the demo cluster signs and checks tokens with one secret.
            let path = dir.join("demo-secret");
            let secret = match std::fs::read_to_string(&path) {
                Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
                _ => {
                    let s = fresh();
                    demo::write_config(&path, &s)?;
                    s
                }
            };
            (
                demo::cluster_config_toml(&db, &addr.to_string(), &secret, nats, name),
                dir.join(format!("changecast-{name}.toml")),
            )
        }
    };
    let secret = Config::parse(&config_text)?
        .auth
        .jwt_secret
        .clone()
        .unwrap_or_default();
    demo::write_config(&config_path, &config_text)?;
    let plan = Plan::compile(&Config::parse(&config_text)?)?;

    // Demo tokens live 24 h; CHANGECAST_DEMO_TOKEN_TTL (seconds) shortens them, to watch
    // (and test) the page refreshing its token. `/demo/users` mints fresh ones each time.
    let token_ttl: u64 = std::env::var("CHANGECAST_DEMO_TOKEN_TTL")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(24 * 3600);
    let users = demo::demo_users(secret.as_bytes(), token_ttl);
    let mint = {
        let secret = secret.clone();
        move || demo::demo_users(secret.as_bytes(), token_ttl)
    };
    let running = server::start(plan, listener, Some(demo::routes(mint))).await?;

    let stop_sim = Arc::new(AtomicBool::new(false));
    let sim = {
        let (db, stop) = (db.clone(), Arc::clone(&stop_sim));
        std::thread::spawn(move || demo::simulate(&db, rate, stop))
    };

    match &cluster {
        None => println!("changecast demo: the Mercury app on SQLite"),
        Some((nats, name)) => {
            println!("changecast demo: the Mercury app on SQLite, cluster node {name} on {nats}")
        }
    }
    println!("  database: {}", db.display());
    println!(
        "  config:   {} (run it with `changecast serve --config ...`)",
        config_path.display()
    );
    println!("  simulator: {rate} changes per second");
    println!();
    println!("  activity page: http://{addr}/");
    for u in &users {
        println!();
        println!("  {} ({}), owner of {}", u.name, u.user, u.business);
        println!("    page:  http://{addr}/?user={}", u.user);
        println!(
            "    sse:   curl -N -H 'Authorization: Bearer {}' http://{addr}/v1/sse",
            u.token
        );
        println!("    ws:    websocat 'ws://{addr}/v1/ws?token={}'", u.token);
    }
    println!();
    println!("Ctrl-C to stop.");

    let result = run_until_stopped(running).await;
    stop_sim.store(true, Ordering::Relaxed);
    let _ = sim.join();
    result
}
