//! Cluster mode: several nodes share one NATS JetStream stream of routed events.
//!
//! In: `[cluster]` (the NATS servers, this node's name, a name prefix). Out: a connected
//! [`Nats`] — the stream every node reads (the history and the checkpoint), and the
//! key-value bucket that holds the router lease ([`lease`]) — plus the message format
//! ([`wire`]) the router writes and every gateway reads.
//!
//! The layout, for a prefix `changecast`:
//! - stream `changecast`, subjects `changecast.event.{change,alert,message,gap}`, file
//!   storage, `max_age` = `[history] max_age`, de-duplication by `Nats-Msg-Id` over
//!   `duplicate_window`;
//! - key-value bucket `changecast-lease`, one key `router`, `max_age` = `lease_ttl`.
//!
//! Ids are `<epoch>-<stream sequence>`: the same on every node. The epoch is derived from the
//! stream's creation time, so a stream deleted and recreated is a new epoch and older ids
//! get `gap`.

pub mod lease;
pub mod publish;
pub mod wire;

use std::fmt::Write;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::config::{ClusterConfig, ConfigError, HistoryConfig};

/// The names a prefix gives the stream, its subjects and the bucket.
#[derive(Debug, Clone)]
pub struct Names {
    pub stream: String,
    pub lease_bucket: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            stream: prefix.to_owned(),
            lease_bucket: format!("{prefix}-lease"),
        }
    }

    /// The subject for one kind of message.
    pub fn subject(&self, kind: wire::Kind) -> String {
        format!("{}.event.{}", self.stream, kind.as_str())
    }

    /// Every subject of the stream.
    pub fn subjects(&self) -> String {
        format!("{}.event.*", self.stream)
    }
}

/// Checks `[cluster]`; each error names its key.
pub fn validate(c: &ClusterConfig, errors: &mut Vec<ConfigError>) {
    let urls = c.nats.list();
    if urls.is_empty() {
        errors.push(ConfigError::new(
            "cluster.nats",
            "name at least one NATS server",
        ));
    }
    for (i, u) in urls.iter().enumerate() {
        if u.parse::<async_nats::ServerAddr>().is_err() {
            let at = match &c.nats {
                crate::config::NatsUrls::One(_) => "cluster.nats".to_string(),
                crate::config::NatsUrls::Many(_) => format!("cluster.nats[{i}]"),
            };
            errors.push(ConfigError::new(
                at,
                format!("`{u}` is not a NATS URL like nats://127.0.0.1:4222"),
            ));
        }
    }
    if c.name.is_empty() || !c.name.chars().all(name_char) {
        errors.push(ConfigError::new(
            "cluster.name",
            "must be a non-empty name of letters, digits, `-` and `_` (unique per node)",
        ));
    }
    // Stream and bucket names: no `.`, `*`, `>` or spaces (JetStream's own rule).
    if c.stream.is_empty() || c.stream.len() > 64 || !c.stream.chars().all(name_char) {
        errors.push(ConfigError::new(
            "cluster.stream",
            "must be 1 to 64 letters, digits, `-` and `_`",
        ));
    }
    if !(1..=5).contains(&c.replicas) {
        errors.push(ConfigError::new(
            "cluster.replicas",
            "must be between 1 and 5",
        ));
    }
    if c.user.is_some() != c.password_env.is_some() {
        errors.push(ConfigError::new(
            "cluster.password_env",
            "`user` and `password_env` go together",
        ));
    }
    if c.tls_cert_file.is_some() != c.tls_key_file.is_some() {
        errors.push(ConfigError::new(
            "cluster.tls_key_file",
            "`tls_cert_file` and `tls_key_file` go together",
        ));
    }
    for (key, path) in [
        ("cluster.creds_file", &c.creds_file),
        ("cluster.tls_ca_file", &c.tls_ca_file),
        ("cluster.tls_cert_file", &c.tls_cert_file),
        ("cluster.tls_key_file", &c.tls_key_file),
    ] {
        if let Some(p) = path
            && !p.is_file()
        {
            errors.push(ConfigError::new(key, format!("no file at {}", p.display())));
        }
    }
    for (key, var) in [
        ("cluster.token_env", &c.token_env),
        ("cluster.password_env", &c.password_env),
    ] {
        if let Some(v) = var
            && std::env::var(v).map_or(true, |s| s.is_empty())
        {
            errors.push(ConfigError::new(
                key,
                format!("the environment variable {v} is not set"),
            ));
        }
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The cluster plan in words, for `changecast check`.
pub fn describe(c: &ClusterConfig, history: &HistoryConfig) -> String {
    let names = Names::new(&c.stream);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cluster: node {} on NATS {}",
        c.name,
        c.nats.list().join(", ")
    );
    let _ = writeln!(
        s,
        "  stream {}: subjects {}, file storage, {} replica(s), max age {} ([history] max_age), \
         duplicate window {}",
        names.stream,
        names.subjects(),
        c.replicas,
        humantime::format_duration(history.max_age),
        humantime::format_duration(duplicate_window(c, history)),
    );
    let _ = writeln!(
        s,
        "  router lease: bucket {} key `router`, TTL {} (renewed every {}; a standby takes over \
         within about the TTL)",
        names.lease_bucket,
        humantime::format_duration(c.lease_ttl),
        humantime::format_duration(c.lease_ttl / 4),
    );
    s
}

/// JetStream refuses a duplicate window longer than the stream's max age.
fn duplicate_window(c: &ClusterConfig, history: &HistoryConfig) -> Duration {
    c.duplicate_window.min(history.max_age)
}

/// A node's connection to the cluster.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub stream: stream::Stream,
    pub lease: kv::Store,
    pub names: Names,
    /// `<epoch>` of every id: the stream's lifetime.
    pub epoch: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cluster: {0}")]
pub struct ClusterError(pub String);

impl ClusterError {
    pub fn new(what: &str, e: impl std::fmt::Display) -> Self {
        ClusterError(format!("{what}: {e}"))
    }
}

/// Connects to NATS and makes sure the stream and the bucket exist with this config,
/// retrying until NATS answers or `give_up` fires.
pub async fn connect(
    c: &ClusterConfig,
    history: &HistoryConfig,
    give_up: &tokio_util::sync::CancellationToken,
) -> Result<Nats, ClusterError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("changecast {}", c.name))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // A silent partition is noticed within a few pings, not after minutes.
        .ping_interval(Duration::from_secs(2))
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(2)));
    if let Some(path) = &c.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| ClusterError::new("cannot read cluster.creds_file", e))?;
    }
    if let Some(var) = &c.token_env {
        options = options.token(std::env::var(var).unwrap_or_default());
    }
    if let (Some(user), Some(var)) = (&c.user, &c.password_env) {
        options = options.user_and_password(user.clone(), std::env::var(var).unwrap_or_default());
    }
    if c.tls_required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &c.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&c.tls_cert_file, &c.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let urls: Vec<async_nats::ServerAddr> = c
        .nats
        .list()
        .iter()
        .filter_map(|u| u.parse().ok())
        .collect();
    let client = options
        .connect(urls)
        .await
        .map_err(|e| ClusterError::new("cannot connect to NATS", e))?;
    let js = jetstream::new(client.clone());
    let names = Names::new(&c.stream);
    let wanted = stream::Config {
        name: names.stream.clone(),
        subjects: vec![names.subjects()],
        max_age: history.max_age,
        storage: stream::StorageType::File,
        num_replicas: c.replicas,
        duplicate_window: duplicate_window(c, history),
        allow_direct: true,
        ..Default::default()
    };
    let lease_config = kv::Config {
        bucket: names.lease_bucket.clone(),
        history: 1,
        max_age: c.lease_ttl,
        storage: stream::StorageType::File,
        num_replicas: c.replicas,
        ..Default::default()
    };
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let info = js
                .create_or_update_stream(wanted.clone())
                .await
                .map_err(|e| ClusterError::new("cannot create or update the stream", e))?;
            // Updated, not just opened: a changed `lease_ttl` is the bucket's max age.
            let lease = js
                .create_or_update_key_value(lease_config.clone())
                .await
                .map_err(|e| ClusterError::new("cannot create the lease bucket", e))?;
            let stream = js
                .get_stream(&names.stream)
                .await
                .map_err(|e| ClusterError::new("cannot open the stream", e))?;
            Ok::<_, ClusterError>((epoch_of(info.created), stream, lease))
        };
        match attempt.await {
            Ok((epoch, stream, lease)) => {
                return Ok(Nats {
                    client,
                    js,
                    stream,
                    lease,
                    names,
                    epoch,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster: NATS not ready; retrying");
                tokio::select! {
                    _ = give_up.cancelled() => return Err(e),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The epoch of a stream created at `created`: `s` and its creation time in microseconds,
/// base 36 (no `-`, as ids need).
pub fn epoch_of(created: async_nats::datetime::DateTime) -> String {
    let micros = (created.unix_timestamp_nanos() / 1000).max(0) as u128;
    crate::hub::epoch_name('s', micros)
}

impl Nats {
    /// The stream's current epoch and last sequence (one request).
    pub async fn state(&self) -> Result<(String, u64, u64), ClusterError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| ClusterError::new("stream info", e))?;
        Ok((
            epoch_of(info.created),
            info.state.first_sequence,
            info.state.last_sequence,
        ))
    }
}
