//! The TOML configuration: what users write, parsed strictly.
//!
//! In: the text of a config file. Out: a [`Config`] whose every key was known, or every
//! error in the file (TOML syntax included), each naming the exact key and line
//! (`source.poll_interval: ... (line 4)`), with a "did you mean" for misspelt keys. Each
//! section is read on its own; [`Config::parse_partial`] keeps what parsed, with stand-ins
//! for the rest, so the plan can check it in the same run. The semantic checks (does the
//! collection exist, is the path well formed) happen when the config is compiled into a
//! [`crate::plan::Plan`], which collects every error before anything starts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP listener and per-connection limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where changes come from.
    pub source: SourceConfig,
    /// How clients prove who they are.
    pub auth: AuthConfig,
    /// How much per-user history is kept for resume.
    #[serde(default)]
    pub history: HistoryConfig,
    /// Who hears about which changes. `[[route]]` in TOML.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Derived alerts: `[[alert]]` in TOML.
    #[serde(default, rename = "alert")]
    pub alerts: Vec<AlertConfig>,
    /// The lookup cache.
    #[serde(default)]
    pub lookups: LookupsConfig,
    /// `POST /v1/publish`: server-side publishing with API keys.
    #[serde(default)]
    pub publish: PublishConfig,
    /// `[cluster]`: several nodes over NATS JetStream. Absent: one process.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node's part in a cluster (see `crate::cluster`). Every node has the
/// same config but for `name`, `[server] listen` and `[history] path`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS server(s): one URL or a list.
    pub nats: NatsUrls,
    /// This node's name, unique in the cluster (the lease holder's name).
    pub name: String,
    /// Prefix of the stream, its subjects and the key-value buckets.
    #[serde(default = "default_stream_prefix")]
    pub stream: String,
    /// How long the router's lease lasts without renewal: a dead router's lease lapses
    /// after it, and a standby takes over.
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// Replicas of the stream and buckets (a NATS cluster of 3 or 5 servers: 3).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// How long JetStream remembers message ids: a router that re-reads changes after a
    /// failover later than this could publish them twice.
    #[serde(default = "default_duplicate_window", deserialize_with = "duration")]
    pub duplicate_window: Duration,
    /// A NATS credentials file (JWT and NKey seed).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// Environment variable holding a NATS token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// User name for user/password authentication (with `password_env`).
    #[serde(default)]
    pub user: Option<String>,
    /// Environment variable holding the NATS password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Require TLS to NATS.
    #[serde(default)]
    pub tls_required: bool,
    /// CA certificate(s) (PEM) to verify the NATS server with.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for NATS servers that verify clients.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

/// `[cluster] nats`: one URL or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NatsUrls {
    One(String),
    Many(Vec<String>),
}

impl NatsUrls {
    pub fn list(&self) -> Vec<String> {
        match self {
            NatsUrls::One(u) => vec![u.clone()],
            NatsUrls::Many(v) => v.clone(),
        }
    }
}

fn default_stream_prefix() -> String {
    "changecast".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(4)
}

fn default_replicas() -> usize {
    1
}

fn default_duplicate_window() -> Duration {
    Duration::from_secs(600)
}

/// `[publish]`. Without keys the endpoint answers 403.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// Environment variable holding the API key(s), comma-separated (recommended).
    pub api_keys_env: Option<String>,
    /// The API keys themselves. For demos and tests; prefer `api_keys_env`.
    pub api_keys: Option<Vec<String>>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Defaults to loopback: exposing the gateway is a decision.
    pub listen: SocketAddr,
    /// Events a connection may have queued before it is disconnected with 4008. Small by
    /// default: the queue is per connection, and a client this far behind should resume
    /// from history rather than hold memory here.
    pub send_queue: usize,
    /// Bytes a connection may have queued before it is disconnected with 4008.
    pub send_queue_bytes: usize,
    /// The kernel's send buffer (`SO_SNDBUF`) of each client socket, in bytes; 0 leaves it
    /// to the OS, which on Linux grows it up to 4 MiB per connection. A client that stops
    /// reading first fills this (Linux doubles the value), then `send_queue`: kept small,
    /// so the queue limits bound a stalled client's memory, kernel included, and it is cut
    /// off (4008) while the others are unaffected. 128 KiB in flight still moves over
    /// 1 MB/s per connection at 100 ms of round trip, far beyond an event feed's needs.
    pub socket_send_buffer: usize,
    /// How long a WebSocket client has to send its `auth` frame when it did not bring a
    /// token in the URL or header.
    #[serde(deserialize_with = "duration")]
    pub auth_timeout: Duration,
    /// Interval of WebSocket pings and SSE comments that keep idle connections open
    /// through proxies and reveal dead peers.
    #[serde(deserialize_with = "duration")]
    pub keepalive: Duration,
    /// A WebSocket connection that wrote live events less than this long ago waits for the
    /// next write tick (every `write_delay`) before it writes again, and then writes
    /// everything queued for it at once: under fan-out, fewer and larger writes (the kernel's
    /// cost is per write) at the price of at most this much latency, paid only by
    /// connections receiving more than one event per `write_delay`. `"0ms"` writes every
    /// event as soon as the connection's task runs.
    #[serde(deserialize_with = "duration")]
    pub write_delay: Duration,
    /// Largest frame a client may send, in bytes.
    pub max_client_frame: usize,
    /// Most connections at once (WebSocket and SSE); more are refused with HTTP 503.
    pub max_connections: usize,
    /// Most connections of one user at once; more are refused (WebSocket: close 1013 "try
    /// again later"; SSE: HTTP 429).
    pub max_connections_per_user: usize,
    /// A request head must be complete this long after the server starts waiting for it
    /// (slowloris; also idle keep-alive connections between requests).
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// A connection that sends nothing at all for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Most connections not yet authenticated (accepted, not yet a WebSocket/SSE session).
    /// At the cap a new one evicts the oldest idle one (no request in flight), or is closed.
    pub max_pending_connections: usize,
    /// File descriptors kept out of the socket budget (`RLIMIT_NOFILE` minus this) for the
    /// databases, the history file and health probes.
    pub fd_reserve: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            send_queue: 256,
            send_queue_bytes: 256 * 1024,
            socket_send_buffer: 64 * 1024,
            auth_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(15),
            write_delay: Duration::from_millis(20),
            max_client_frame: 16 * 1024,
            max_connections: 100_000,
            max_connections_per_user: 64,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            max_pending_connections: 1024,
            fd_reserve: 256,
        }
    }
}

/// `[source]`, chosen by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    Sqlite(SqliteSourceConfig),
    Mongodb(MongoSourceConfig),
    Postgres(PostgresSourceConfig),
}

/// `[source] type = "postgres"`: logical replication (pgoutput) from one database.
/// Rules' `collection` is an unqualified table name in schema `public`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// `postgres://user[:password]@host[:port]/database`. The user needs the
    /// `REPLICATION` attribute (or superuser) and, with `manage = "create"`, the right
    /// to create publications and to alter the watched tables. TLS by the query
    /// parameters `sslmode` (disable | prefer, the default | require | verify-ca |
    /// verify-full, as libpq's) and `sslrootcert` (a PEM file of CA certificates; relative
    /// to the config file's folder): see `source::postgres::tls`.
    pub url: String,
    /// Name of an environment variable holding the password (instead of the URL).
    pub password_env: Option<String>,
    /// The publication read (default `changecast`).
    #[serde(default = "default_pg_name")]
    pub publication: String,
    /// The logical replication slot read (default `changecast`).
    #[serde(default = "default_pg_name")]
    pub slot: String,
    /// `create` (default): create the publication and slot when missing, and set the
    /// publication's tables to the watched ones; `assume`: they exist, only checked.
    #[serde(default)]
    pub manage: PgManage,
    /// `ensure` (default): `REPLICA IDENTITY FULL` on the tables whose rules need the old
    /// row; `assume`: already set; `off`: not used (deletes carry the key only).
    #[serde(default)]
    pub pre_images: Images,
    /// Tables to watch. Default: those the rules name (and the lookups read).
    pub tables: Option<Vec<String>>,
}

/// `manage`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgManage {
    #[default]
    Create,
    Assume,
}

fn default_pg_name() -> String {
    "changecast".into()
}

/// `[source] type = "sqlite"`: the embedded default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSourceConfig {
    /// The database file. A relative path is relative to the config file's folder.
    pub path: PathBuf,
    /// How often the database is checked for commits by other connections. The check
    /// (`PRAGMA data_version`) reads shared memory only, so a short interval is cheap.
    #[serde(default = "default_poll", deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// Most change-log rows read per batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Columns (`"table.column"`) whose TEXT holds JSON and is read as a nested document,
    /// besides those declared `JSON` or `JSONB`. Other TEXT stays a string, whatever it
    /// looks like. Checked against the database by `check`.
    #[serde(default)]
    pub json_columns: Vec<String>,
}

fn default_poll() -> Duration {
    Duration::from_millis(2)
}
fn default_batch() -> usize {
    512
}

/// `[source] type = "mongodb"`: one change stream on a database of a replica set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSourceConfig {
    /// Connection string, e.g. `mongodb://localhost:27017/?replicaSet=rs0`.
    pub uri: String,
    /// The database whose collections are watched.
    pub database: String,
    /// `ensure` (run `collMod … changeStreamPreAndPostImages` on the watched collections at
    /// start), `assume` (they are enabled already), or `off` (no pre-images: deletes cannot
    /// be routed by owner, and alerts cannot compare before and after).
    #[serde(default)]
    pub pre_and_post_images: Images,
    /// Collections to watch. Default: those the rules name (and the lookups read).
    pub collections: Option<Vec<String>>,
    /// Where the resume token is kept: `mongodb` (a collection in the watched database,
    /// default) or `file`.
    #[serde(default)]
    pub checkpoint: CheckpointStore,
    /// Collection for `checkpoint = "mongodb"`.
    #[serde(default = "default_checkpoint_collection")]
    pub checkpoint_collection: String,
    /// File for `checkpoint = "file"`; relative to the config file's folder.
    #[serde(default = "default_checkpoint_file")]
    pub checkpoint_file: PathBuf,
    /// Name of this stream's checkpoint (several changecasts can share a deployment).
    #[serde(default = "default_stream_name")]
    pub stream_name: String,
    /// How long the server waits for new events before answering an empty batch.
    #[serde(default = "default_max_await", deserialize_with = "duration")]
    pub max_await_time: Duration,
}

/// `pre_and_post_images`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Images {
    #[default]
    Ensure,
    Assume,
    Off,
}

/// `checkpoint`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointStore {
    #[default]
    Mongodb,
    File,
}

fn default_checkpoint_collection() -> String {
    "changecast_checkpoints".into()
}
fn default_checkpoint_file() -> PathBuf {
    "changecast.resume".into()
}
fn default_stream_name() -> String {
    "changecast".into()
}
fn default_max_await() -> Duration {
    Duration::from_secs(1)
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Name of the environment variable that holds the HS256 secret (recommended).
    pub jwt_secret_env: Option<String>,
    /// The HS256 secret itself. For demos and tests; prefer `jwt_secret_env`.
    pub jwt_secret: Option<String>,
    /// How a verified token becomes a user id.
    #[serde(default)]
    pub user: UserConfig,
    /// If set, only these client ids may connect (4003 otherwise).
    pub client_ids: Option<Vec<String>>,
    /// Clock skew tolerated when checking `exp` and `nbf`.
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    /// The one signature algorithm accepted: `HS256` (default, with the secret above),
    /// `RS256`, `ES256` or `EdDSA` (with `public_key_file`, `jwks_file` or `jwks_url`).
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// PEM file with the public key (RS256, ES256, EdDSA). Relative to the config's folder.
    pub public_key_file: Option<PathBuf>,
    /// JWKS file (a JSON Web Key Set); keys are picked by the token's `kid`.
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL, fetched at start and refreshed every `jwks_refresh`.
    pub jwks_url: Option<String>,
    /// How often a `jwks_url` is fetched again (a `kid` not in the set also triggers a fetch,
    /// at most once per this interval).
    #[serde(default = "default_jwks_refresh", deserialize_with = "duration")]
    pub jwks_refresh: Duration,
    /// If set, the token's `aud` must be one of these.
    pub audience: Option<Vec<String>>,
    /// If set, the token's `iss` must be one of these.
    pub issuer: Option<Vec<String>>,
    /// How long before a connection's token expires it is sent an `expiring` event.
    #[serde(default = "default_expiry_warning", deserialize_with = "duration")]
    pub expiry_warning: Duration,
}

fn default_leeway() -> Duration {
    Duration::from_secs(5)
}
fn default_algorithm() -> String {
    "HS256".into()
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_expiry_warning() -> Duration {
    Duration::from_secs(60)
}

/// `[auth] user = { claim, lookup, where, pick }`: the claim that names the user and,
/// optionally, the lookup that turns it into a user id (the seed's `users` by `email`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The claim to read. Default `sub`.
    #[serde(default = "default_claim")]
    pub claim: String,
    /// Collection to look the user up in; without it the claim is the user id.
    pub lookup: Option<String>,
    /// Filter for the lookup; `"$claim"` stands for the claim's value.
    #[serde(rename = "where")]
    pub filter: Option<BTreeMap<String, toml::Value>>,
    /// Field of the found document that is the user id. Default `_id`.
    pub pick: Option<String>,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            claim: default_claim(),
            lookup: None,
            filter: None,
            pick: None,
        }
    }
}

fn default_claim() -> String {
    "sub".into()
}

/// `[history]`: what a reconnecting client can resume from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// `sqlite` (durable: survives restarts and crashes; the default) or `memory` (faster,
    /// lost on restart, when clients reconnecting after a restart get `gap`).
    pub store: HistoryKind,
    /// The history file for `store = "sqlite"`. Relative to the config file's folder.
    pub path: PathBuf,
    /// Events kept per user; a client asking for older ones gets `gap`.
    pub max_per_user: usize,
    /// Events older than this are dropped.
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    /// With `store = "sqlite"`: the newest events per user also kept in memory, so most
    /// resumes never read the file.
    pub memory_per_user: usize,
    /// How often retention is applied.
    #[serde(deserialize_with = "duration")]
    pub prune_interval: Duration,
}

/// `[history] store`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryKind {
    #[default]
    Sqlite,
    Memory,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            store: HistoryKind::Sqlite,
            path: "changecast-history.db".into(),
            max_per_user: 1000,
            max_age: Duration::from_secs(24 * 3600),
            memory_per_user: 64,
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// `[[route]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name carried in every event (`"route": "orders"`).
    pub name: String,
    /// Collection (table) whose changes this route delivers.
    pub collection: String,
    /// Operations delivered. Default: all of insert, update, replace, delete.
    pub on: Option<Vec<String>>,
    /// Recipients: `"$field.path"`, `{ lookup, where, pick, many }`, or a list of those.
    /// Kept as a raw value and compiled by hand so that errors name the exact key.
    pub to: toml::Value,
    /// If set, only these fields of the document are sent (`_id` always is).
    pub fields: Option<Vec<String>>,
    /// A CEL condition on the change; the route delivers only changes for which it is true.
    pub when: Option<String>,
}

/// `[[alert]]`: an event raised when a condition on a document *becomes* true.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Name carried in every alert event (`"alert": "stock_low"`).
    pub name: String,
    /// Collection (table) whose documents are watched.
    pub collection: String,
    /// CEL condition on `doc` (the document after the change). The alert fires when it is
    /// true after the change and was not true before it.
    pub when: String,
    /// Recipients, as for routes.
    pub to: toml::Value,
    /// Message template (minijinja): `{{ doc.name }}`, `{{ before.x }}`, `{{ key }}`.
    pub message: String,
    /// Operations that can raise it. Default: insert, update, replace.
    pub on: Option<Vec<String>>,
    /// After firing for a document, stay quiet for that document this long.
    #[serde(default, deserialize_with = "opt_duration")]
    pub cooldown: Option<Duration>,
    /// If set, only these fields of the document are sent (`_id` always is).
    pub fields: Option<Vec<String>>,
}

/// `[lookups]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupsConfig {
    /// Lookup answers kept in the cache (0 turns it off). Answers are invalidated by the
    /// changes of the collection they read; past this many, the cache starts over.
    pub cache_entries: usize,
}

impl Default for LookupsConfig {
    fn default() -> Self {
        LookupsConfig {
            cache_entries: 100_000,
        }
    }
}

/// One problem with a config, at a config path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a config; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Parses a config's text, reporting every problem in one go: every TOML syntax
    /// error, then each section deserialized on its own (each `[[route]]` and `[[alert]]`
    /// too) so that one bad section does not hide another's errors. Errors name the exact
    /// key (`source.poll_interval`, `history.max_per_usr`) and the line; an unknown key,
    /// section or variant gets the closest known one as a "did you mean".
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let partial = Config::parse_partial(text);
        match partial.config {
            Some(c) if partial.errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(partial.errors)),
        }
    }

    /// Parses as far as the text goes: see [`Partial`].
    pub fn parse_partial(text: &str) -> Partial {
        let (doc, syntax) = toml::de::DeTable::parse_recoverable(text);
        let doc = doc.into_inner();
        let broken = broken_sections(&doc, &syntax);
        let mut errors: Vec<ConfigError> = syntax
            .iter()
            .zip(&broken)
            .map(|(e, at)| {
                located(
                    text,
                    at.as_deref().unwrap_or("config"),
                    e.message(),
                    e.span(),
                )
            })
            .collect();
        let mut sections = Sections {
            broken: broken.into_iter().flatten().collect(),
            any_broken: !syntax.is_empty(),
            ..Sections::default()
        };
        for (key, value) in doc {
            let name = key.get_ref().to_string();
            if !SECTIONS.contains(&name.as_str()) {
                let message = match crate::suggest::closest(&name, SECTIONS) {
                    Some(s) => format!("unknown section `{name}`, did you mean `{s}`?"),
                    None => format!("unknown section `{name}` (known: {})", SECTIONS.join(", ")),
                };
                errors.push(located(text, &name, &message, Some(key.span())));
                continue;
            }
            sections.found.insert(name, value);
        }
        let (config, stand_ins) = sections.build(text, &mut errors);
        if config.is_none() && errors.is_empty() {
            errors.push(ConfigError::new("config", "invalid"));
        }
        Partial {
            config,
            errors,
            stand_ins,
        }
    }

    /// Reads and parses a config file, resolving relative paths in it against the file's
    /// folder.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let partial = Config::load_partial(path)?;
        match partial.config {
            Some(c) if partial.errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(partial.errors)),
        }
    }

    /// Reads a config file and parses it as far as it goes ([`Partial`]), resolving
    /// relative paths as [`Config::load`] does. Errs only when the file cannot be read.
    pub fn load_partial(path: &Path) -> Result<Partial, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::new(
                path.display().to_string(),
                format!("cannot read config: {e}"),
            )])
        })?;
        let mut partial = Config::parse_partial(&text);
        if let Some(config) = &mut partial.config {
            config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        }
        Ok(partial)
    }

    /// Makes relative paths in the config relative to `base`, the config file's folder.
    fn resolve_paths(&mut self, base: &Path) {
        let config = self;
        match &mut config.source {
            SourceConfig::Sqlite(s) if s.path.is_relative() => s.path = base.join(&s.path),
            SourceConfig::Mongodb(m) if m.checkpoint_file.is_relative() => {
                m.checkpoint_file = base.join(&m.checkpoint_file)
            }
            // The URL's `sslrootcert`.
            SourceConfig::Postgres(p) => {
                p.url = crate::source::postgres::tls::resolve_rootcert(&p.url, base)
            }
            _ => {}
        }
        if config.history.path.is_relative() {
            config.history.path = base.join(&config.history.path);
        }
        for p in [&mut config.auth.public_key_file, &mut config.auth.jwks_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// A config parsed as far as it goes: the errors of every section, and a [`Config`] in
/// which defaults stand in for the sections (and `[[route]]`s) that did not parse, so
/// that [`crate::plan::Plan::check_partial`] can still check the rest in the same run.
pub struct Partial {
    /// `None` only if not even a stand-in could be made.
    pub config: Option<Config>,
    pub errors: Vec<ConfigError>,
    /// Config paths (`source`, `route[2]`) holding stand-ins, not what the file says.
    stand_ins: Vec<String>,
}

impl Partial {
    /// Whether a config path is inside a stand-in: an error there is about the default,
    /// not the file, and is not reported.
    pub fn is_stand_in(&self, path: &str) -> bool {
        self.stand_ins.iter().any(|s| {
            path.strip_prefix(s.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }
}

/// The range a duration key accepts.
struct DurationRange {
    min: Duration,
    max: Duration,
}

/// The range a size or count key accepts.
struct SizeRange {
    min: usize,
    max: usize,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
const MIB: usize = 1024 * 1024;

/// Most changes read per SQLite batch: one batch is routed and stored in one transaction.
pub const MAX_BATCH_SIZE: usize = 100_000;

impl Config {
    /// Checks that every duration and size key is in a range the server can honour: no
    /// zero where zero would stop a task or refuse everyone, nothing so large that the
    /// arithmetic on it overflows (timers, `now - max_age`) or that a bounded queue turns
    /// into an allocation nobody can make. Each error names the key's config path.
    /// [`crate::plan::Plan::compile`] runs this, so `check`, `serve` and `demo` agree.
    pub fn check_ranges(&self, errors: &mut Vec<ConfigError>) {
        let ms = Duration::from_millis;
        let mut duration = |path: &str, value: Duration, range: DurationRange| {
            let fmt = humantime::format_duration;
            if value < range.min {
                let message = if range.min == ms(1) {
                    "must be greater than zero".to_string()
                } else {
                    format!("must be at least {}", fmt(range.min))
                };
                errors.push(ConfigError::new(path, message));
            } else if value > range.max {
                errors.push(ConfigError::new(
                    path,
                    format!("must be at most {} (got {})", fmt(range.max), fmt(value)),
                ));
            }
        };
        let s = &self.server;
        let a = &self.auth;
        let h = &self.history;
        let r = |min, max| DurationRange { min, max };
        duration("server.auth_timeout", s.auth_timeout, r(ms(1), secs(HOUR)));
        duration("server.keepalive", s.keepalive, r(ms(1), secs(HOUR)));
        duration(
            "server.write_delay",
            s.write_delay,
            r(Duration::ZERO, secs(1)),
        );
        // Zero would close every connection before its first byte or request head.
        duration(
            "server.header_read_timeout",
            s.header_read_timeout,
            r(ms(1), secs(HOUR)),
        );
        duration("server.idle_timeout", s.idle_timeout, r(ms(1), secs(HOUR)));
        duration("auth.leeway", a.leeway, r(Duration::ZERO, secs(HOUR)));
        // Zero is refused with the other `jwks_url` checks (AuthPlan::compile).
        if a.jwks_url.is_some() && !a.jwks_refresh.is_zero() {
            duration("auth.jwks_refresh", a.jwks_refresh, r(secs(1), secs(DAY)));
        }
        duration(
            "auth.expiry_warning",
            a.expiry_warning,
            r(Duration::ZERO, secs(DAY)),
        );
        // Zero panics the pruning task; tests prune every few milliseconds.
        duration("history.max_age", h.max_age, r(ms(1), secs(3650 * DAY)));
        duration(
            "history.prune_interval",
            h.prune_interval,
            r(ms(1), secs(DAY)),
        );
        if let Some(c) = &self.cluster {
            // Renewed every quarter of it; under a second leaves too little for a round trip.
            duration("cluster.lease_ttl", c.lease_ttl, r(secs(1), secs(HOUR)));
            duration(
                "cluster.duplicate_window",
                c.duplicate_window,
                r(secs(1), secs(DAY)),
            );
        }
        match &self.source {
            SourceConfig::Sqlite(q) => {
                duration("source.poll_interval", q.poll_interval, r(ms(1), secs(60)))
            }
            SourceConfig::Mongodb(m) => duration(
                "source.max_await_time",
                m.max_await_time,
                r(ms(1), secs(HOUR)),
            ),
            SourceConfig::Postgres(_) => {}
        }
        for (i, alert) in self.alerts.iter().enumerate() {
            // Zero is refused where alerts are compiled ("or left out").
            if let Some(c) = alert.cooldown.filter(|c| !c.is_zero()) {
                duration(
                    &format!("alert[{i}].cooldown"),
                    c,
                    r(ms(1), secs(365 * DAY)),
                );
            }
        }

        let mut size = |path: &str, value: usize, range: SizeRange| {
            if value < range.min {
                errors.push(ConfigError::new(
                    path,
                    format!("must be at least {}", range.min),
                ));
            } else if value > range.max {
                errors.push(ConfigError::new(
                    path,
                    format!("must be at most {} (got {value})", range.max),
                ));
            }
        };
        let n = |min, max| SizeRange { min, max };
        size("server.send_queue", s.send_queue, n(1, 1_000_000));
        size(
            "server.send_queue_bytes",
            s.send_queue_bytes,
            n(1024, 1024 * MIB),
        );
        size(
            "server.socket_send_buffer",
            s.socket_send_buffer,
            n(0, 64 * MIB),
        );
        size(
            "server.max_client_frame",
            s.max_client_frame,
            n(256, 16 * MIB),
        );
        size(
            "server.max_connections",
            s.max_connections,
            n(1, 10_000_000),
        );
        size(
            "server.max_pending_connections",
            s.max_pending_connections,
            n(1, 10_000_000),
        );
        size("server.fd_reserve", s.fd_reserve, n(0, 1_000_000));
        size(
            "server.max_connections_per_user",
            s.max_connections_per_user,
            n(1, 1_000_000),
        );
        size("history.max_per_user", h.max_per_user, n(1, 10_000_000));
        size(
            "history.memory_per_user",
            h.memory_per_user,
            n(0, 1_000_000),
        );
        size(
            "lookups.cache_entries",
            self.lookups.cache_entries,
            n(0, 100_000_000),
        );
        if let SourceConfig::Sqlite(q) = &self.source {
            size("source.batch_size", q.batch_size, n(1, MAX_BATCH_SIZE));
        }
    }
}

/// The top-level sections a config may have.
const SECTIONS: &[&str] = &[
    "server", "source", "auth", "history", "route", "alert", "lookups", "publish", "cluster",
];

/// A config's sections as parsed, before each is deserialized on its own.
#[derive(Default)]
struct Sections<'i> {
    found: BTreeMap<String, toml::Spanned<toml::de::DeValue<'i>>>,
    /// Sections (`auth`) and `[[route]]`s (`route[1]`) a syntax error falls in: parsed
    /// only in part, so their other errors would be noise. Stand-ins take their place.
    broken: BTreeSet<String>,
    /// Some syntax error: a required section that seems missing may be swallowed by it,
    /// so it is not reported missing.
    any_broken: bool,
}

/// For each syntax error, the section or `[[route]]`/`[[alert]]` element it falls in
/// (`None` before the first). Spans of tables cover only their header, so each one is
/// taken to extend to the next header.
fn broken_sections(doc: &toml::de::DeTable<'_>, syntax: &[toml::de::Error]) -> Vec<Option<String>> {
    let mut starts: Vec<(usize, String)> = Vec::new();
    for (key, value) in doc.iter() {
        let name = key.get_ref();
        match value.get_ref() {
            toml::de::DeValue::Array(items) if ["route", "alert"].contains(&name.as_ref()) => {
                for (i, item) in items.iter().enumerate() {
                    starts.push((item.span().start, format!("{name}[{i}]")));
                }
            }
            _ => starts.push((value.span().start, name.to_string())),
        }
    }
    starts.sort();
    syntax
        .iter()
        .map(|e| {
            let at = e.span()?.start;
            let after = starts.partition_point(|(start, _)| *start <= at);
            after.checked_sub(1).map(|i| starts[i].1.clone())
        })
        .collect()
}

impl<'i> Sections<'i> {
    /// Deserializes every section; one that fails is replaced by a stand-in (its default,
    /// or a placeholder), whose path is returned with the config.
    fn build(mut self, text: &str, errors: &mut Vec<ConfigError>) -> (Option<Config>, Vec<String>) {
        let mut stand_ins = Vec::new();
        let broken = &self.broken;
        // A broken section is taken out unparsed: its stand-in is used.
        let found = &mut self.found;
        found.retain(|name, _| !broken.contains(name));
        let mut one = Taker {
            text,
            broken,
            found,
            stand_ins: &mut stand_ins,
            errors,
        };
        let (server, _) = one.take("server", "", section);
        let (source, has_source) = one.take("source", STAND_IN_SOURCE, |text, _, v, errors| {
            source_section(text, v, errors)
        });
        let (auth, has_auth) = one.take("auth", "jwt_secret = \"stand-in\"", section);
        let (history, _) = one.take("history", "", section);
        let (lookups, _) = one.take("lookups", "", section);
        let (publish, _) = one.take("publish", "", section);
        for (name, present) in [("source", has_source), ("auth", has_auth)] {
            if !present && !self.any_broken {
                errors.push(ConfigError::new(name, "missing section"));
            }
        }
        let cluster = match found.remove("cluster") {
            None if broken.contains("cluster") => {
                stand_ins.push("cluster".into());
                Some(None)
            }
            None => Some(None),
            Some(v) => match section(text, "cluster", v, errors) {
                Some(c) => Some(Some(c)),
                None => {
                    stand_ins.push("cluster".into());
                    Some(None)
                }
            },
        };
        let routes = found.remove("route").map_or(Some(Vec::new()), |v| {
            list(
                text,
                "route",
                v,
                STAND_IN_ROUTE,
                broken,
                &mut stand_ins,
                errors,
            )
        });
        let alerts = found.remove("alert").map_or(Some(Vec::new()), |v| {
            list(
                text,
                "alert",
                v,
                STAND_IN_ALERT,
                broken,
                &mut stand_ins,
                errors,
            )
        });
        let config = (|| {
            Some(Config {
                server: server?,
                source: source?,
                auth: auth?,
                history: history?,
                routes: routes?,
                alerts: alerts?,
                lookups: lookups?,
                publish: publish?,
                cluster: cluster?,
            })
        })();
        (config, stand_ins)
    }
}

/// Takes sections out of the parsed document one by one.
struct Taker<'a, 'i> {
    text: &'a str,
    broken: &'a BTreeSet<String>,
    found: &'a mut BTreeMap<String, toml::Spanned<toml::de::DeValue<'i>>>,
    stand_ins: &'a mut Vec<String>,
    errors: &'a mut Vec<ConfigError>,
}

type Parse<T> =
    fn(&str, &str, toml::Spanned<toml::de::DeValue<'_>>, &mut Vec<ConfigError>) -> Option<T>;

impl Taker<'_, '_> {
    /// Section `name` parsed, or its stand-in; and whether the file has it.
    fn take<T: serde::de::DeserializeOwned>(
        &mut self,
        name: &str,
        stand_in: &str,
        parse: Parse<T>,
    ) -> (Option<T>, bool) {
        let value = self.found.remove(name);
        let present = value.is_some();
        let parsed = value.and_then(|v| parse(self.text, name, v, self.errors));
        let parsed = parsed.or_else(|| {
            // A required section missing is an error (reported by the caller); an
            // optional one missing just takes its default.
            if present || self.broken.contains(name) || ["source", "auth"].contains(&name) {
                self.stand_ins.push(name.to_owned());
            }
            placeholder(stand_in)
        });
        (parsed, present)
    }
}

const STAND_IN_SOURCE: &str = "type = \"sqlite\"\npath = \"\"";
const STAND_IN_ROUTE: &str = "name = \"\"\ncollection = \"\"\nto = false";
const STAND_IN_ALERT: &str =
    "name = \"\"\ncollection = \"\"\nwhen = \"\"\nto = false\nmessage = \"\"";

/// A stand-in parsed from fixed text (it always parses; `None` if it ever did not).
fn placeholder<T: serde::de::DeserializeOwned>(text: &str) -> Option<T> {
    toml::from_str(text).ok()
}

/// Deserializes one section (or one `[[route]]`), its errors named from `at`.
fn section<T: serde::de::DeserializeOwned>(
    text: &str,
    at: &str,
    value: toml::Spanned<toml::de::DeValue<'_>>,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let span = value.span();
    let de = toml::de::ValueDeserializer::from(value);
    match serde_path_to_error::deserialize(de) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.inner();
            let mut path = at.to_string();
            let inside = e.path().to_string();
            if inside != "." {
                path.push('.');
                path.push_str(&inside);
            }
            let (key, message) = explain_serde(inner.message());
            // serde_path_to_error names an unknown key already, a missing one not.
            if let Some(key) = key
                && !path.ends_with(&format!(".{key}"))
            {
                path.push('.');
                path.push_str(&key);
            }
            errors.push(located(text, &path, &message, inner.span().or(Some(span))));
            None
        }
    }
}

/// `[[route]]`, `[[alert]]`: each element deserialized on its own.
fn list<T: serde::de::DeserializeOwned>(
    text: &str,
    at: &str,
    value: toml::Spanned<toml::de::DeValue<'_>>,
    stand_in: &str,
    broken: &BTreeSet<String>,
    stand_ins: &mut Vec<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<T>> {
    let span = value.span();
    let toml::de::DeValue::Array(items) = value.into_inner() else {
        let message = format!("expected [[{at}]] tables");
        errors.push(located(text, at, &message, Some(span)));
        return None;
    };
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("{at}[{i}]");
        let parsed = if broken.contains(&path) {
            None
        } else {
            section(text, &path, item, errors)
        };
        match parsed {
            Some(v) => out.push(v),
            // Keeps the indices of the ones after it right.
            None => {
                out.push(placeholder(stand_in)?);
                stand_ins.push(path);
            }
        }
    }
    Some(out)
}

/// `[source]`: its `type` picks the struct the other keys must fit.
fn source_section(
    text: &str,
    value: toml::Spanned<toml::de::DeValue<'_>>,
    errors: &mut Vec<ConfigError>,
) -> Option<SourceConfig> {
    const TYPES: &[&str] = &["sqlite", "mongodb", "postgres"];
    let span = value.span();
    let toml::de::DeValue::Table(mut table) = value.into_inner() else {
        errors.push(located(text, "source", "expected a table", Some(span)));
        return None;
    };
    let Some(kind) = table.remove("type") else {
        let message = "missing key `type` (sqlite, mongodb or postgres)";
        errors.push(located(text, "source.type", message, Some(span)));
        return None;
    };
    let kind_span = kind.span();
    let rest = toml::Spanned::new(span, toml::de::DeValue::Table(table));
    match kind.get_ref().as_str() {
        Some("sqlite") => section(text, "source", rest, errors).map(SourceConfig::Sqlite),
        Some("mongodb") => section(text, "source", rest, errors).map(SourceConfig::Mongodb),
        Some("postgres") => section(text, "source", rest, errors).map(SourceConfig::Postgres),
        other => {
            let mut message = format!(
                "`{}` is not one of sqlite, mongodb, postgres",
                other.unwrap_or("?")
            );
            if let Some(s) = other.and_then(|o| crate::suggest::closest(o, TYPES)) {
                message.push_str(&format!(", did you mean `{s}`?"));
            }
            errors.push(located(text, "source.type", &message, Some(kind_span)));
            None
        }
    }
}

/// Serde's message, reworded for a config: an unknown or missing key is named in the
/// path (returned first) rather than only in the message, with the closest known key.
fn explain_serde(message: &str) -> (Option<String>, String) {
    let message = message.trim();
    let quoted =
        |s: &str| -> Vec<String> { s.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = quoted(rest);
        if let Some((key, expected)) = names.split_first() {
            let known: Vec<&str> = expected.iter().map(String::as_str).collect();
            let m = match crate::suggest::closest(key, &known) {
                Some(s) => format!("unknown key `{key}`, did you mean `{s}`?"),
                None => format!("unknown key `{key}` (known: {})", known.join(", ")),
            };
            return (Some(key.clone()), m);
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let names = quoted(rest);
        if let Some((got, expected)) = names.split_first() {
            let known: Vec<&str> = expected.iter().map(String::as_str).collect();
            let mut m = format!("`{got}` is not one of {}", known.join(", "));
            if let Some(s) = crate::suggest::closest(got, &known) {
                m.push_str(&format!(", did you mean `{s}`?"));
            }
            return (None, m);
        }
    }
    if let Some(rest) = message.strip_prefix("missing field ")
        && let Some(key) = quoted(rest).into_iter().next()
    {
        return (Some(key), "missing".to_string());
    }
    (None, message.to_string())
}

/// An error at `path`, with the line `span` starts on.
fn located(
    text: &str,
    path: &str,
    message: &str,
    span: Option<std::ops::Range<usize>>,
) -> ConfigError {
    // A key the parser recovered with no name (text `=`) is no path to show.
    let path = if path.is_empty() { "config" } else { path };
    let mut message = message.trim().to_string();
    if let Some(span) = span {
        let start = span.start.min(text.len());
        let line = text
            .get(..start)
            .map(|before| before.matches('\n').count() + 1)
            .unwrap_or(1);
        message.push_str(&format!(" (line {line})"));
    }
    ConfigError::new(path, message)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration like \"5s\": {e}")))
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [source]
        type = "sqlite"
        path = "app.db"

        [auth]
        jwt_secret = "s"

        [[route]]
        name = "orders"
        collection = "orders"
        to = "$owner_id"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.auth_timeout, Duration::from_secs(5));
        assert_eq!(c.auth.user.claim, "sub");
        assert_eq!(c.history.max_per_user, 1000);
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let text = MINIMAL.replace("to = \"$owner_id\"", "to = \"$owner_id\"\ncolour = 1");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.0[0].path.starts_with("route[0]"), "{err}");
        assert!(err.0[0].message.contains("colour"), "{err}");
        assert!(err.0[0].message.contains("line"), "{err}");
    }

    #[test]
    fn bad_duration_is_a_clear_error() {
        let text = format!("[server]\nauth_timeout = \"soon\"\n{MINIMAL}");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.0[0].path, "server.auth_timeout");
        assert!(err.0[0].message.contains("soon"), "{err}");
    }

    /// `MINIMAL` with `line` added to the `[section]` it names.
    fn with(section: &str, line: &str) -> Config {
        let text = if section == "source" {
            MINIMAL.replace("path = \"app.db\"", &format!("path = \"app.db\"\n{line}"))
        } else if section == "auth" {
            MINIMAL.replace("[auth]", &format!("[auth]\n{line}"))
        } else {
            format!("[{section}]\n{line}\n{MINIMAL}")
        };
        Config::parse(&text).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn range_errors(config: &Config) -> Vec<String> {
        let mut errors = Vec::new();
        config.check_ranges(&mut errors);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn defaults_and_ordinary_values_are_in_range() {
        assert_eq!(
            range_errors(&Config::parse(MINIMAL).unwrap()),
            Vec::<String>::new()
        );
        for (section, line) in [
            ("server", "keepalive = \"1h\""),
            ("server", "socket_send_buffer = 0"),
            ("server", "write_delay = \"0ms\""),
            ("server", "write_delay = \"1s\""),
            ("history", "prune_interval = \"1s\""),
            ("history", "memory_per_user = 0"),
            ("auth", "leeway = \"0s\""),
            ("lookups", "cache_entries = 0"),
            ("source", "poll_interval = \"1ms\""),
        ] {
            assert_eq!(
                range_errors(&with(section, line)),
                Vec::<String>::new(),
                "{line}"
            );
        }
    }

    #[test]
    fn out_of_range_values_are_named_by_their_path() {
        let cases = [
            (
                "history",
                "prune_interval = \"0s\"",
                "history.prune_interval: must be greater than zero",
            ),
            (
                "server",
                "keepalive = \"300000000000y\"",
                "server.keepalive: must be at most 1h",
            ),
            (
                "server",
                "write_delay = \"2s\"",
                "server.write_delay: must be at most 1s",
            ),
            (
                "server",
                "auth_timeout = \"300000000000y\"",
                "server.auth_timeout: must be at most 1h",
            ),
            (
                "server",
                "send_queue = 4611686018427387904",
                "server.send_queue: must be at most 1000000",
            ),
            (
                "auth",
                "leeway = \"100y\"",
                "auth.leeway: must be at most 1h",
            ),
            (
                "history",
                "max_age = \"0s\"",
                "history.max_age: must be greater than zero",
            ),
            (
                "server",
                "idle_timeout = \"0s\"",
                "server.idle_timeout: must be greater than zero",
            ),
            (
                "server",
                "header_read_timeout = \"2h\"",
                "server.header_read_timeout: must be at most 1h",
            ),
            (
                "server",
                "max_pending_connections = 0",
                "server.max_pending_connections: must be at least 1",
            ),
            (
                "source",
                "batch_size = 0",
                "source.batch_size: must be at least 1",
            ),
            (
                "source",
                "poll_interval = \"0s\"",
                "source.poll_interval: must be greater than zero",
            ),
            (
                "server",
                "max_connections = 0",
                "server.max_connections: must be at least 1",
            ),
        ];
        for (section, line, expected) in cases {
            let errors = range_errors(&with(section, line));
            assert_eq!(errors.len(), 1, "{line}: {errors:?}");
            assert!(errors[0].starts_with(expected), "{line}: {errors:?}");
        }
    }

    #[test]
    fn every_section_is_checked_even_when_another_fails() {
        let text = format!(
            "[server]\nkeepalive = 5\n[history]\nstore = \"memroy\"\n{MINIMAL}\ncolour = 1\n\
             [[route]]\nname = \"b\"\ncollection = \"orders\"\nto = \"$owner_id\"\n"
        );
        let partial = Config::parse_partial(&text);
        let errors: Vec<String> = partial.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].starts_with("server.keepalive: "), "{errors:#?}");
        assert!(
            errors[1].starts_with(
                "history.store: `memroy` is not one of sqlite, memory, did you mean `memory`?"
            ),
            "{errors:#?}"
        );
        assert!(
            errors[2].starts_with("route[0].colour: unknown key `colour`"),
            "{errors:#?}"
        );
        // Stand-ins keep the indices of the routes after a bad one.
        let config = partial.config.as_ref().expect("a config with stand-ins");
        assert_eq!(config.routes.len(), 2);
        assert_eq!(config.routes[1].name, "b");
        assert!(partial.is_stand_in("route[0].to"));
        assert!(partial.is_stand_in("server"));
        assert!(!partial.is_stand_in("route[1].to"));
        assert!(!partial.is_stand_in("route[10]"));
    }

    #[test]
    fn every_syntax_error_is_named_by_its_section_and_line() {
        let text = MINIMAL
            .replace("[auth]\n", "[auth]\nleeway = = \"1s\"\n")
            .replace("to = \"$owner_id\"", "to = \"$owner_id\" \"x\"");
        let err = Config::parse(&text).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"auth"), "{err}");
        assert!(paths.contains(&"route[0]"), "{err}");
        // The broken sections' own errors (a missing `to`) would be noise.
        assert!(err.0.iter().all(|e| e.message.contains("(line ")), "{err}");
        assert!(!err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn a_missing_key_is_named_by_its_path() {
        let err = Config::parse(&MINIMAL.replace("collection = \"orders\"", "")).unwrap_err();
        assert_eq!(err.0[0].path, "route[0].collection", "{err}");
        assert!(err.0[0].message.starts_with("missing"), "{err}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = Config::parse("[source\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn load_resolves_sqlite_path_against_the_config_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, MINIMAL).unwrap();
        let c = Config::load(&file).unwrap();
        let SourceConfig::Sqlite(s) = c.source else {
            panic!("sqlite source expected")
        };
        assert_eq!(s.path, dir.path().join("app.db"));
    }
}
