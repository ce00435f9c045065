//! Auth: from a bearer token to a user id.
//!
//! In: a JWT (from a header, a query parameter or a first WebSocket frame) and an optional
//! client id. Out: an [`Identity`] — the user id the hub knows, and when the token expires
//! — or an [`AuthError`] that maps to one close code / HTTP status.
//!
//! Tokens must carry `exp`, and the one configured algorithm is pinned: a token whose
//! header names another algorithm, or `none`, is refused before its claims are read.
//! `exp` and `nbf` (when present) are checked with `[auth] leeway`; an `exp` more than
//! [`MAX_TOKEN_LIFETIME`] ahead is refused (no timer can honour it, and such a token is
//! a mistake), and a fractional `exp` is read as the verifier reads it (rounded), so a
//! connection expires exactly when its token does. HS256
//! takes a shared secret; RS256, ES256 and EdDSA take exactly one public key source — a PEM
//! file, a JWKS file or a JWKS URL (`keys.rs`). When `audience` / `issuer` are set, `aud` /
//! `iss` must be present and one of them. The user is the value of a claim, or — as in the
//! seed — the result of a lookup keyed by the claim (`users` by `email`), refused with 4003
//! when nothing matches.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::config::{AuthConfig, ConfigError};
use crate::event::CloseReason;
use crate::path::scalar_to_string;
use crate::route::{LookupSpec, Operand, compile_lookup};
use crate::source::{Lookup, Query};

mod keys;

use keys::{KeyMiss, KeySet, RemoteKeys, algorithm_name, pem_key};

/// Tokens whose `exp` is further ahead than this are refused: ten years is beyond any
/// sane session, and it keeps every deadline computed from `exp` far from overflow.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Who a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// `exp` claim: seconds since the Unix epoch.
    pub expires_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <jwt>`, `?token=<jwt>` or an auth frame")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("client id not allowed")]
    ClientNotAllowed,
    #[error("unknown user")]
    UnknownUser,
    #[error("user lookup failed")]
    LookupFailed,
}

impl AuthError {
    pub fn close_reason(&self) -> CloseReason {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => CloseReason::BadCredentials,
            AuthError::ClientNotAllowed | AuthError::UnknownUser => CloseReason::Forbidden,
            AuthError::LookupFailed => CloseReason::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => StatusCode::UNAUTHORIZED,
            AuthError::ClientNotAllowed | AuthError::UnknownUser => StatusCode::FORBIDDEN,
            AuthError::LookupFailed => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// How a claim becomes a user id.
enum UserResolver {
    Claim(String),
    Lookup {
        claim: String,
        spec: LookupSpec,
        lookup: Arc<dyn Lookup>,
    },
}

/// Verifies tokens and resolves users. Built once from `[auth]`.
pub struct Authenticator {
    algorithm: Algorithm,
    keys: Keys,
    validation: Validation,
    user: UserResolver,
    client_ids: Option<HashSet<String>>,
}

/// The verification keys of a built [`Authenticator`].
enum Keys {
    /// The HS256 secret or a PEM public key: the token's `kid` is not read.
    One(DecodingKey),
    /// A JWKS file, read at start.
    Set(KeySet),
    /// A JWKS URL; its refresh task ends when this is dropped.
    Remote(Arc<RemoteKeys>),
}

/// The compiled `[auth]` section, before it is bound to a source's lookups.
#[derive(Clone)]
pub struct AuthPlan {
    algorithm: Algorithm,
    keys: KeyPlan,
    leeway: u64,
    audience: Option<Vec<String>>,
    issuer: Option<Vec<String>>,
    claim: String,
    lookup: Option<LookupSpec>,
    client_ids: Option<Vec<String>>,
}

/// Where the keys come from, with files already read.
#[derive(Clone)]
enum KeyPlan {
    Secret(Vec<u8>),
    PublicKey { file: PathBuf, key: DecodingKey },
    JwksFile { file: PathBuf, set: KeySet },
    JwksUrl { url: String, refresh: Duration },
}

/// The algorithms `[auth] algorithm` accepts.
const ALGORITHMS: [Algorithm; 4] = [
    Algorithm::HS256,
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

impl AuthPlan {
    /// Validates `[auth]`: the algorithm and its one key source (the HS256 secret, reading
    /// the environment when told to; or a PEM file, a JWKS file or a JWKS URL), `aud` /
    /// `iss` lists and the user lookup. Files are read here; a JWKS URL is first fetched
    /// by [`AuthPlan::build`].
    pub fn compile(config: &AuthConfig, errors: &mut Vec<ConfigError>) -> Option<AuthPlan> {
        let before = errors.len();
        let algorithm = ALGORITHMS
            .into_iter()
            .find(|a| algorithm_name(*a) == config.algorithm);
        let keys = match algorithm {
            None => {
                let names: Vec<&str> = ALGORITHMS.into_iter().map(algorithm_name).collect();
                errors.push(ConfigError::new(
                    "auth.algorithm",
                    format!("{:?} is not one of {}", config.algorithm, names.join(", ")),
                ));
                None
            }
            Some(Algorithm::HS256) => {
                for (name, set) in key_sources(config) {
                    if set {
                        errors.push(ConfigError::new(
                            format!("auth.{name}"),
                            "not used with HS256 (it takes jwt_secret_env or jwt_secret); \
                             set algorithm = \"RS256\", \"ES256\" or \"EdDSA\" to verify with a \
                             public key",
                        ));
                    }
                }
                compile_secret(config, errors).map(KeyPlan::Secret)
            }
            Some(alg) => compile_public_key(config, alg, errors),
        };
        let user = &config.user;
        if user.claim.is_empty() {
            errors.push(ConfigError::new("auth.user.claim", "must not be empty"));
        }
        let lookup = match &user.lookup {
            None => {
                if user.filter.is_some() || user.pick.is_some() {
                    errors.push(ConfigError::new(
                        "auth.user.lookup",
                        "`where` and `pick` need `lookup` (the collection to look in)",
                    ));
                }
                None
            }
            Some(collection) => {
                let mut table = toml::Table::new();
                table.insert("lookup".into(), toml::Value::String(collection.clone()));
                if let Some(w) = &user.filter {
                    table.insert(
                        "where".into(),
                        toml::Value::Table(w.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
                    );
                }
                if let Some(p) = &user.pick {
                    table.insert("pick".into(), toml::Value::String(p.clone()));
                }
                compile_lookup(&table, "auth.user", true, errors)
            }
        };
        if let Some(ids) = &config.client_ids
            && ids.is_empty()
        {
            errors.push(ConfigError::new(
                "auth.client_ids",
                "an empty allow-list would refuse every client; remove the key instead",
            ));
        }
        for (name, list) in [("audience", &config.audience), ("issuer", &config.issuer)] {
            match list {
                Some(list) if list.is_empty() => errors.push(ConfigError::new(
                    format!("auth.{name}"),
                    "an empty list would refuse every token; remove the key to skip the check",
                )),
                Some(list) if list.iter().any(String::is_empty) => errors.push(ConfigError::new(
                    format!("auth.{name}"),
                    "values must not be empty",
                )),
                _ => {}
            }
        }
        if errors.len() > before {
            return None;
        }
        Some(AuthPlan {
            algorithm: algorithm?,
            keys: keys?,
            leeway: config.leeway.as_secs(),
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            claim: user.claim.clone(),
            lookup,
            client_ids: config.client_ids.clone(),
        })
    }

    /// The user lookup, for validation against the source's catalog.
    pub fn lookup(&self) -> Option<&LookupSpec> {
        self.lookup.as_ref()
    }

    /// A human description for `check`.
    pub fn describe(&self) -> String {
        let alg = algorithm_name(self.algorithm);
        let mut s = match &self.keys {
            KeyPlan::Secret(_) => format!("{alg} JWT (shared secret), exp required"),
            KeyPlan::PublicKey { file, .. } => format!(
                "{alg} JWT (public key file {}), exp required",
                file.display()
            ),
            KeyPlan::JwksFile { file, set } => format!(
                "{alg} JWT (JWKS file {}: {}; key picked by kid), exp required",
                file.display(),
                set.describe()
            ),
            KeyPlan::JwksUrl { url, refresh } => format!(
                "{alg} JWT (JWKS URL {url}, fetched at start and every {}; key picked by kid), \
                 exp required",
                humantime::format_duration(*refresh)
            ),
        };
        if let Some(aud) = &self.audience {
            s.push_str(&format!("; aud one of {}", aud.join(", ")));
        }
        if let Some(iss) = &self.issuer {
            s.push_str(&format!("; iss one of {}", iss.join(", ")));
        }
        let user = match &self.lookup {
            None => format!("user id = claim `{}`", self.claim),
            Some(l) => format!(
                "user id = {} (with $claim = claim `{}`)",
                crate::route::RecipientSpec::Lookup(l.clone()),
                self.claim
            ),
        };
        s.push_str("; ");
        s.push_str(&user);
        if let Some(ids) = &self.client_ids {
            s.push_str(&format!("; client ids: {}", ids.join(", ")));
        }
        s
    }

    /// Binds the plan to the source's lookups. With a `jwks_url` this fetches the key set
    /// (failing when it cannot) and starts its refresh, which stops when the
    /// [`Authenticator`] is dropped; the error names the config path.
    pub async fn build(self, lookup: Arc<dyn Lookup>) -> Result<Authenticator, String> {
        let mut validation = Validation::new(self.algorithm);
        let mut required = vec!["exp"];
        validation.leeway = self.leeway;
        // Present `nbf` claims are checked (jsonwebtoken skips them by default).
        validation.validate_nbf = true;
        validation.validate_aud = false;
        if let Some(aud) = &self.audience {
            validation.set_audience(aud);
            validation.validate_aud = true;
            required.push("aud");
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(iss);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let keys = match self.keys {
            KeyPlan::Secret(secret) => Keys::One(DecodingKey::from_secret(&secret)),
            KeyPlan::PublicKey { key, .. } => Keys::One(key),
            KeyPlan::JwksFile { set, .. } => Keys::Set(set),
            KeyPlan::JwksUrl { url, refresh } => Keys::Remote(
                RemoteKeys::start(url, refresh, self.algorithm)
                    .await
                    .map_err(|e| format!("auth.jwks_url: {e}"))?,
            ),
        };
        let user = match self.lookup {
            None => UserResolver::Claim(self.claim),
            Some(spec) => UserResolver::Lookup {
                claim: self.claim,
                spec,
                lookup,
            },
        };
        Ok(Authenticator {
            algorithm: self.algorithm,
            keys,
            validation,
            user,
            client_ids: self.client_ids.map(|v| v.into_iter().collect()),
        })
    }
}

/// `[auth]` keys that name a public key source, and whether each is set.
fn key_sources(config: &AuthConfig) -> [(&'static str, bool); 3] {
    [
        ("public_key_file", config.public_key_file.is_some()),
        ("jwks_file", config.jwks_file.is_some()),
        ("jwks_url", config.jwks_url.is_some()),
    ]
}

/// The HS256 secret, from the environment or the config.
fn compile_secret(config: &AuthConfig, errors: &mut Vec<ConfigError>) -> Option<Vec<u8>> {
    match (&config.jwt_secret_env, &config.jwt_secret) {
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                "auth.jwt_secret",
                "set either jwt_secret_env or jwt_secret, not both",
            ));
            None
        }
        (Some(var), None) => match std::env::var(var) {
            Ok(s) if !s.is_empty() => Some(s.into_bytes()),
            _ => {
                errors.push(ConfigError::new(
                    "auth.jwt_secret_env",
                    format!("environment variable `{var}` is not set"),
                ));
                None
            }
        },
        (None, Some(s)) if !s.is_empty() => Some(s.clone().into_bytes()),
        (None, _) => {
            errors.push(ConfigError::new(
                "auth.jwt_secret_env",
                "missing: name the environment variable holding the HS256 secret",
            ));
            None
        }
    }
}

/// The one public key source of RS256, ES256 or EdDSA, with its file read.
fn compile_public_key(
    config: &AuthConfig,
    alg: Algorithm,
    errors: &mut Vec<ConfigError>,
) -> Option<KeyPlan> {
    let name = algorithm_name(alg);
    for (key, set) in [
        ("jwt_secret_env", config.jwt_secret_env.is_some()),
        ("jwt_secret", config.jwt_secret.is_some()),
    ] {
        if set {
            errors.push(ConfigError::new(
                format!("auth.{key}"),
                format!(
                    "not used with {name} (the secret is for HS256 only); \
                     {name} takes public_key_file, jwks_file or jwks_url"
                ),
            ));
        }
    }
    let set: Vec<&str> = key_sources(config)
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
    match set.as_slice() {
        [] => {
            errors.push(ConfigError::new(
                "auth.public_key_file",
                format!("missing: {name} needs one of public_key_file, jwks_file or jwks_url"),
            ));
            return None;
        }
        [_] => {}
        [first, rest @ ..] => {
            for other in rest {
                errors.push(ConfigError::new(
                    format!("auth.{other}"),
                    format!(
                        "set only one of public_key_file, jwks_file and jwks_url \
                         ({first} is set too)"
                    ),
                ));
            }
            return None;
        }
    }
    if let Some(file) = &config.public_key_file {
        let pem = match std::fs::read(file) {
            Ok(pem) => pem,
            Err(e) => {
                errors.push(ConfigError::new(
                    "auth.public_key_file",
                    format!("cannot read {}: {e}", file.display()),
                ));
                return None;
            }
        };
        return match pem_key(&pem, alg) {
            Ok(key) => Some(KeyPlan::PublicKey {
                file: file.clone(),
                key,
            }),
            Err(e) => {
                errors.push(ConfigError::new(
                    "auth.public_key_file",
                    format!("{} {e}", file.display()),
                ));
                None
            }
        };
    }
    if let Some(file) = &config.jwks_file {
        let text = match std::fs::read(file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(ConfigError::new(
                    "auth.jwks_file",
                    format!("cannot read {}: {e}", file.display()),
                ));
                return None;
            }
        };
        return match KeySet::parse(&text, alg) {
            Ok(set) => Some(KeyPlan::JwksFile {
                file: file.clone(),
                set,
            }),
            Err(e) => {
                errors.push(ConfigError::new(
                    "auth.jwks_file",
                    format!("{}: {e}", file.display()),
                ));
                None
            }
        };
    }
    let url = config.jwks_url.as_ref()?;
    let mut ok = true;
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        _ => {
            errors.push(ConfigError::new(
                "auth.jwks_url",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
            ok = false;
        }
    }
    if config.jwks_refresh.is_zero() {
        errors.push(ConfigError::new(
            "auth.jwks_refresh",
            "must be longer than 0s (how often the JWKS is fetched again)",
        ));
        ok = false;
    }
    ok.then(|| KeyPlan::JwksUrl {
        url: url.clone(),
        refresh: config.jwks_refresh,
    })
}

impl Authenticator {
    /// Checks the algorithm, picks the key (by `kid` for a key set), then checks the
    /// signature, expiry and the `aud` / `iss` lists when configured; returns the claims.
    /// Never waits on the network: with a JWKS URL, an unknown `kid` is refused at once
    /// and asks for an early fetch in the background.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::Invalid(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        if header.alg != self.algorithm {
            return Err(AuthError::Invalid(format!(
                "algorithm {} is not accepted (only {})",
                algorithm_name(header.alg),
                algorithm_name(self.algorithm)
            )));
        }
        let kid = header.kid.as_deref();
        let decode = |key: &DecodingKey| {
            jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
                .map(|data| data.claims)
                .map_err(invalid)
        };
        let claims = match &self.keys {
            Keys::One(key) => decode(key),
            Keys::Set(set) => decode(set.get(kid).map_err(miss)?),
            Keys::Remote(remote) => {
                let set = remote.current();
                match set.get(kid) {
                    Ok(key) => decode(key),
                    Err(e) => {
                        if matches!(e, KeyMiss::UnknownKid(_)) {
                            remote.request_refresh();
                        }
                        Err(miss(e))
                    }
                }
            }
        }?;
        expiry(&claims)?;
        Ok(claims)
    }

    /// The JWKS URL's background refresh task, once, for the server to supervise.
    pub fn take_refresh_task(&self) -> Option<tokio::task::JoinHandle<()>> {
        match &self.keys {
            Keys::Remote(remote) => remote.take_task(),
            Keys::One(_) | Keys::Set(_) => None,
        }
    }

    /// Checks the client id against the allow-list (when there is one).
    pub fn check_client(&self, client_id: Option<&str>) -> Result<(), AuthError> {
        match (&self.client_ids, client_id) {
            (None, _) => Ok(()),
            (Some(ids), Some(id)) if ids.contains(id) => Ok(()),
            _ => Err(AuthError::ClientNotAllowed),
        }
    }

    /// Verifies `token` and resolves its user.
    pub async fn identify(
        &self,
        token: &str,
        client_id: Option<&str>,
    ) -> Result<Identity, AuthError> {
        self.check_client(client_id)?;
        self.identify_token(token).await
    }

    /// Verifies `token` and resolves its user, without the client-id check.
    pub async fn identify_token(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = self.verify(token)?;
        let expires_at = expiry(&claims)?;
        let user = self.resolve_user(&claims).await?;
        Ok(Identity { user, expires_at })
    }

    async fn resolve_user(&self, claims: &Map<String, Value>) -> Result<String, AuthError> {
        let claim_value = |name: &str| claims.get(name).and_then(scalar_to_string);
        match &self.user {
            UserResolver::Claim(name) => claim_value(name)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| AuthError::Invalid(format!("token has no `{name}` claim"))),
            UserResolver::Lookup {
                claim,
                spec,
                lookup,
            } => {
                let value = claim_value(claim)
                    .ok_or_else(|| AuthError::Invalid(format!("token has no `{claim}` claim")))?;
                let filter = spec
                    .filter
                    .iter()
                    .map(|(target, operand)| {
                        let v = match operand {
                            Operand::Claim => Value::String(value.clone()),
                            Operand::Literal(v) => v.clone(),
                            // Refused when the plan was compiled.
                            Operand::Field(_) => Value::Null,
                        };
                        (target.clone(), v)
                    })
                    .collect();
                let found = lookup
                    .find(Query {
                        collection: spec.collection.clone(),
                        filter,
                        limit: Some(1),
                        // A connecting user is resolved against the current state.
                        as_of: None,
                    })
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "auth: user lookup failed");
                        AuthError::LookupFailed
                    })?;
                let mut ids = BTreeSet::new();
                if let Some(doc) = found.first() {
                    let mut values = Vec::new();
                    spec.pick.collect(doc, &mut values);
                    ids.extend(values.into_iter().filter_map(scalar_to_string));
                }
                ids.into_iter().next().ok_or(AuthError::UnknownUser)
            }
        }
    }
}

/// The `exp` of verified claims, refused beyond [`MAX_TOKEN_LIFETIME`] from now.
fn expiry(claims: &Map<String, Value>) -> Result<u64, AuthError> {
    // The verifier required `exp` and parsed it the same way; this cannot miss.
    let exp = claims
        .get("exp")
        .and_then(numeric_date)
        .ok_or_else(|| AuthError::Invalid("`exp` is not a NumericDate".into()))?;
    let horizon = now_secs().saturating_add(MAX_TOKEN_LIFETIME.as_secs());
    if exp > horizon {
        return Err(AuthError::Invalid(
            "`exp` is more than 10 years ahead".into(),
        ));
    }
    Ok(exp)
}

/// A NumericDate (`exp`, `nbf`) exactly as jsonwebtoken's verifier reads it: a
/// non-negative integer, or a finite non-negative number below 2^64, rounded.
fn numeric_date(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64().filter(|_| v.is_f64())?;
    // `as` saturates; the bounds keep it exact where it matters.
    (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.round() as u64)
}

fn miss(e: KeyMiss) -> AuthError {
    AuthError::Invalid(e.to_string())
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an HS256 token with `sub`, `iat`, `exp` and extra claims (`changecast token`,
/// the demo, tests).
pub fn mint(secret: &[u8], sub: &str, ttl_secs: u64, extra: &Map<String, Value>) -> String {
    let now = now_secs();
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::String(sub.into()));
    claims.insert("iat".into(), Value::from(now));
    // A huge `--ttl` saturates (and the token is then refused as beyond the horizon).
    claims.insert("exp".into(), Value::from(now.saturating_add(ttl_secs)));
    for (k, v) in extra {
        claims.insert(k.clone(), v.clone());
    }
    // HMAC signing of a JSON map cannot fail.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing does not fail")
}

#[cfg(test)]
mod tests;
