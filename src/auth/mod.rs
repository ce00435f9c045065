//! Auth: from a bearer token to a user id.
//!
//! In: a JWT (from a header, a query parameter or a first WebSocket frame) and an optional
//! client id. Out: an [`Identity`] — the user id the hub knows, and when the token expires
//! — or an [`AuthError`] that maps to one close code / HTTP status.
//!
//! Tokens are HS256 with `exp` required and the algorithm pinned: a token whose header
//! names another algorithm, or `none`, is refused before its claims are read. The user is
//! the value of a claim, or — as in the seed — the result of a lookup keyed by the claim
//! (`users` by `email`), refused with 4003 when nothing matches.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::config::{AuthConfig, ConfigError};
use crate::event::CloseReason;
use crate::path::scalar_to_string;
use crate::route::{LookupSpec, Operand, compile_lookup};
use crate::source::{Lookup, Query};

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
    key: DecodingKey,
    validation: Validation,
    user: UserResolver,
    client_ids: Option<HashSet<String>>,
}

/// The compiled `[auth]` section, before it is bound to a source's lookups.
#[derive(Clone)]
pub struct AuthPlan {
    secret: Vec<u8>,
    leeway: u64,
    claim: String,
    lookup: Option<LookupSpec>,
    client_ids: Option<Vec<String>>,
}

impl AuthPlan {
    /// Validates `[auth]`: the secret must be present (reading the environment when told
    /// to) and the user lookup well formed.
    pub fn compile(config: &AuthConfig, errors: &mut Vec<ConfigError>) -> Option<AuthPlan> {
        let before = errors.len();
        let secret = match (&config.jwt_secret_env, &config.jwt_secret) {
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
        if errors.len() > before {
            return None;
        }
        Some(AuthPlan {
            secret: secret?,
            leeway: config.leeway.as_secs(),
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
        let user = match &self.lookup {
            None => format!("user id = claim `{}`", self.claim),
            Some(l) => format!(
                "user id = {} (with $claim = claim `{}`)",
                crate::route::RecipientSpec::Lookup(l.clone()),
                self.claim
            ),
        };
        match &self.client_ids {
            None => format!("HS256 JWT, exp required; {user}"),
            Some(ids) => format!(
                "HS256 JWT, exp required; {user}; client ids: {}",
                ids.join(", ")
            ),
        }
    }

    /// Binds the plan to the source's lookups.
    pub fn build(self, lookup: Arc<dyn Lookup>) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = self.leeway;
        validation.validate_aud = false;
        let user = match self.lookup {
            None => UserResolver::Claim(self.claim),
            Some(spec) => UserResolver::Lookup {
                claim: self.claim,
                spec,
                lookup,
            },
        };
        Authenticator {
            key: DecodingKey::from_secret(&self.secret),
            validation,
            user,
            client_ids: self.client_ids.map(|v| v.into_iter().collect()),
        }
    }
}

impl Authenticator {
    /// Checks the signature, algorithm and expiry; returns the claims.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| AuthError::Invalid(e.to_string()))
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
        let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
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
    claims.insert("exp".into(), Value::from(now + ttl_secs));
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
