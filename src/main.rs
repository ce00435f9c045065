//! The `changecast` command: `serve`, `demo`, `check`, `token`, `init` and `explain`.

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

use changecast::change::Op;
use changecast::config::{Config, ConfigError};
use changecast::plan::{Checked, Plan};
use changecast::{auth, demo, explain, init, server};

#[derive(Parser)]
#[command(
    name = "changecast",
    version,
    about = "Streams a database's changes to the right users, live.",
    after_help = "Environment:\n  \
        RUST_LOG  what to log (default `info`; e.g. `changecast=debug`)\n  \
        A config names the other variables it reads: [auth] jwt_secret_env, [publish] \
        api_keys_env, [cluster] token_env and password_env."
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
    #[command(
        after_help = "Environment: RUST_LOG, and the variables the config names \
        ([auth] jwt_secret_env, [publish] api_keys_env, [cluster] token_env / password_env)."
    )]
    Serve {
        /// The TOML config file (see `changecast check`).
        #[arg(long)]
        config: PathBuf,
    },
    /// One-command demo: the Mercury app on SQLite, a simulator, and the activity page.
    #[command(
        after_help = "Environment: CHANGECAST_DEMO_TOKEN_TTL (seconds) shortens the demo \
        tokens' 24 h lifetime, to watch the page refresh its token."
    )]
    Demo {
        /// The address to serve the activity page and the API on.
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
    #[command(
        after_help = "Environment: the variables the config names (the JWT secret, \
        the API keys) must be set, as for `serve`."
    )]
    Check {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// Also connect to the source and verify what the config assumes of it (MongoDB: a
        /// replica set, the collections, pre- and post-images, the oplog window, the fields
        /// in a sample of documents), one `ok:`/`warning:`/`error:` line per finding.
        #[arg(long)]
        connect: bool,
        /// Fail (exit 1) on warnings too, not only on errors: for CI.
        #[arg(long)]
        strict: bool,
    },
    /// Read a database and write a commented starter config that passes `check`.
    ///
    /// One route per table (collection), its recipient guessed from a field named like a
    /// user or owner (user_id, owner_id, created_by, assignee_id, ...); a table with none
    /// gets a commented-out route to fill in. The config reads the JWT secret from the
    /// environment variable CHANGECAST_JWT_SECRET.
    Init {
        /// The SQLite database file to read (opened read-only).
        #[arg(long, required_unless_present = "mongodb", conflicts_with = "mongodb")]
        sqlite: Option<PathBuf>,
        /// The MongoDB connection string to read (with --database); each collection's
        /// field paths come from a $sample of its documents.
        #[arg(long, requires = "database")]
        mongodb: Option<String>,
        /// The MongoDB database whose collections to read.
        #[arg(long, requires = "mongodb")]
        database: Option<String>,
        /// Write the config to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace --out FILE when it exists.
        #[arg(long, requires = "out")]
        force: bool,
        /// The `[server] listen` address to write.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Print the whole routing decision for one document, and why a user is or is not a
    /// recipient.
    ///
    /// Runs the routing code on the document as it is now (lookups read the current state),
    /// as a dry run. Reads the environment variables the config names (the JWT secret).
    Explain {
        /// The TOML config file whose rules to run.
        #[arg(long)]
        config: PathBuf,
        /// The table or collection.
        #[arg(long)]
        collection: String,
        /// The document's key, as events carry it (`key`); it is read from the database.
        /// `-` reads the document from stdin instead.
        #[arg(long, required_unless_present = "stdin")]
        key: Option<String>,
        /// Read the document as JSON from stdin instead of the database.
        #[arg(long)]
        stdin: bool,
        /// The user id to explain the decision for.
        #[arg(long)]
        user: Option<String>,
        /// The operation to explain: insert, update, replace or delete.
        #[arg(long, default_value = "update", value_parser = parse_op)]
        op: Op,
        /// Print JSON (what GET /v1/admin/explain answers) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Mint an HS256 JWT for testing.
    Token {
        /// The token's subject (`sub`): the user id, unless the config reads another claim.
        #[arg(long)]
        sub: String,
        /// The HS256 secret itself (prefer --secret-env: a command line is visible to others).
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

fn parse_op(s: &str) -> Result<Op, String> {
    Op::parse(s).ok_or_else(|| format!("`{s}` is not one of insert, update, replace, delete"))
}

fn parse_claim(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    if k.is_empty() {
        return Err("empty claim name".into());
    }
    let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
    Ok((k.to_owned(), v))
}

/// jemalloc rather than the system allocator: an idle connection is a dozen small,
/// long-lived allocations made among the handshake's short-lived ones, and glibc's malloc
/// left about 1 KiB of headers and holes per connection around them. Measured in workload
/// (c), RSS per idle connection: glibc 3.7 KiB, mimalloc 3.4, jemalloc 2.9 (BENCHMARKS.md).
/// Set here, in the binary: the library leaves the allocator to whoever embeds it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        Command::Check {
            config,
            connect,
            strict,
        } => match check(&config, strict) {
            code if connect && code == ExitCode::SUCCESS => check_connect(&config),
            code => code,
        },
        Command::Token {
            sub,
            secret,
            secret_env,
            ttl,
            claims,
        } => token(&sub, secret, secret_env, ttl, claims),
        Command::Init {
            sqlite,
            mongodb,
            database,
            out,
            force,
            listen,
        } => run_async(run_init(sqlite, mongodb.zip(database), out, force, listen)),
        Command::Explain {
            config,
            collection,
            key,
            stdin,
            user,
            op,
            json,
        } => run_async(run_explain(config, collection, key, stdin, user, op, json)),
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
            // PostgreSQL has a catalog to check names against, as SQLite's file does:
            // `check` reads it with or without --connect.
            if let changecast::plan::SourcePlan::Postgres(_) = &plan.source {
                return run_async(changecast::source::mongodb::preflight::run(plan));
            }
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

/// `check --connect`: what the config assumes of its source, checked against it.
fn check_connect(path: &Path) -> ExitCode {
    match load_plan(path) {
        (Some(plan), _) => run_async(changecast::source::mongodb::preflight::run(plan)),
        (None, _) => ExitCode::FAILURE,
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

async fn run_init(
    sqlite: Option<PathBuf>,
    mongodb: Option<(String, String)>,
    out: Option<PathBuf>,
    force: bool,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let schema = match (sqlite, mongodb) {
        (Some(path), _) => {
            // Written into the config: absolute, so the config works from any folder.
            let path = std::path::absolute(&path).unwrap_or(path);
            init::read_sqlite(&path)?
        }
        (None, Some((uri, database))) => init::read_mongodb(&uri, &database).await?,
        (None, None) => anyhow::bail!("give --sqlite PATH or --mongodb URI --database NAME"),
    };
    let text = init::render(&schema, &listen.to_string());
    let Some(out) = out else {
        print!("{text}");
        return Ok(());
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = match options.open(&out) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "{} already exists: give --force to replace it",
            out.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot write {}", out.display())),
    };
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "wrote {}: check it with `changecast check --config {}`",
        out.display(),
        out.display()
    );
    Ok(())
}

async fn run_explain(
    config: PathBuf,
    collection: String,
    key: Option<String>,
    stdin: bool,
    user: Option<String>,
    op: Op,
    json: bool,
) -> anyhow::Result<()> {
    let (Some(plan), _) = load_plan(&config) else {
        anyhow::bail!("invalid config");
    };
    let document = match key {
        Some(k) if k != "-" && !stdin => explain::Document::Key(k),
        key => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read the document from stdin")?;
            let doc: Value =
                serde_json::from_str(&text).context("the document on stdin is not JSON")?;
            explain::Document::Given {
                doc,
                key: key.filter(|k| k != "-"),
            }
        }
    };
    let lookup = server::open_lookup(&plan).await?;
    let explainer = explain::Explainer::new(&plan, lookup);
    let explanation = explainer
        .explain(&collection, document, op, user.as_deref())
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print!("{}", explanation.to_text());
    }
    Ok(())
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
        // wscat installs from npm on first use (Node is all it needs).
        println!(
            "    ws:    npx -y wscat -c 'ws://{addr}/v1/ws?token={}'",
            u.token
        );
    }
    println!();
    println!("Ctrl-C to stop.");

    let result = run_until_stopped(running).await;
    stop_sim.store(true, Ordering::Relaxed);
    let _ = sim.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_of_every_subcommand_has_help_text() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{} --{id}", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    #[test]
    fn help_names_the_environment_variables_read() {
        let mut cli = Cli::command();
        let top = cli.render_long_help().to_string();
        assert!(
            top.contains("RUST_LOG") && top.contains("jwt_secret_env"),
            "{top}"
        );
        let demo = cli
            .find_subcommand_mut("demo")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(demo.contains("CHANGECAST_DEMO_TOKEN_TTL"), "{demo}");
        let token = cli
            .find_subcommand_mut("token")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            token.contains("Environment variable holding the secret"),
            "{token}"
        );
    }
}
