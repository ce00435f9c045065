//! Where the verification keys come from: one key (the HS256 secret or a PEM public key),
//! a JWKS file read at start, or a JWKS URL fetched at start and refreshed in the background.
//!
//! A JWKS is indexed by `kid`. A token names its key with `kid`; a token without `kid` may
//! use the set's key only when the set holds exactly one key. Keys that cannot verify the
//! configured algorithm (another key type or curve, `use` other than `sig`, `alg` naming
//! another algorithm, a key type jsonwebtoken does not know) stay in the count but are
//! never used. Token checks never wait on the network: a `kid` missing from a fetched set
//! is refused at once and asks the background task for an early fetch, at most once per
//! refresh interval.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

/// Largest JWKS document accepted from a URL.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Bound on one JWKS fetch (connect, request and body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The name `[auth] algorithm` uses for an algorithm.
pub(super) fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        // Not accepted by the config; named for completeness.
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES384 => "ES384",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
    }
}

/// Reads a PEM public key for `alg`. The error says what is wrong, without the config path.
pub(super) fn pem_key(pem: &[u8], alg: Algorithm) -> Result<DecodingKey, String> {
    if String::from_utf8_lossy(pem).contains("PRIVATE KEY-----") {
        return Err(
            "is a private key; give the public key (`openssl pkey -in KEY -pubout`)".into(),
        );
    }
    let (kind, key, len) = match alg {
        Algorithm::RS256 => ("an RSA", DecodingKey::from_rsa_pem(pem), None),
        // An uncompressed P-256 point, 0x04 || x || y.
        Algorithm::ES256 => ("a P-256 (EC)", DecodingKey::from_ec_pem(pem), Some(65)),
        Algorithm::EdDSA => ("an Ed25519", DecodingKey::from_ed_pem(pem), Some(32)),
        other => return Err(format!("{} takes no public key", algorithm_name(other))),
    };
    match key {
        Ok(key) if len.is_none_or(|len| key.as_bytes().len() == len) => Ok(key),
        Ok(_) => Err(format!("is not {kind} public key (another curve?)")),
        Err(e) => Err(format!("is not {kind} public key in PEM: {e}")),
    }
}

/// A JSON Web Key Set, ready for lookups by `kid`.
#[derive(Clone)]
pub(super) struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    /// The key a token without `kid` uses: set only when the set has exactly one key.
    only: Option<DecodingKey>,
    /// Keys in the document, usable or not.
    len: usize,
    usable: usize,
}

/// Why a token found no key in a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeyMiss {
    UnknownKid(String),
    NoKid(usize),
}

impl fmt::Display for KeyMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyMiss::UnknownKid(kid) => write!(f, "no key with kid `{kid}`"),
            KeyMiss::NoKid(n) => write!(
                f,
                "the token has no `kid` and the key set has {n} keys: name one with `kid`"
            ),
        }
    }
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`) for verifying `alg` signatures. Fails
    /// when the text is not a JWKS or no key in it can verify `alg`.
    pub(super) fn parse(text: &[u8], alg: Algorithm) -> Result<KeySet, String> {
        let doc: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("not a JWKS: expected {\"keys\": [...]}")?;
        let mut by_kid = HashMap::new();
        let mut usable = Vec::new();
        for value in keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else {
                continue;
            };
            let Some(key) = usable_key(&jwk, alg) else {
                continue;
            };
            if let Some(kid) = &jwk.common.key_id {
                by_kid.entry(kid.clone()).or_insert_with(|| key.clone());
            }
            usable.push(key);
        }
        if usable.is_empty() {
            return Err(format!(
                "no key in the set can verify {} signatures ({} {})",
                algorithm_name(alg),
                keys.len(),
                if keys.len() == 1 { "key" } else { "keys" }
            ));
        }
        let only = match (keys.len(), usable.len()) {
            (1, 1) => usable.pop(),
            _ => None,
        };
        Ok(KeySet {
            by_kid,
            only,
            len: keys.len(),
            usable: usable.len(),
        })
    }

    /// The key a token with this `kid` (or none) is verified with.
    pub(super) fn get(&self, kid: Option<&str>) -> Result<&DecodingKey, KeyMiss> {
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .ok_or_else(|| KeyMiss::UnknownKid(kid.to_string())),
            None => self.only.as_ref().ok_or(KeyMiss::NoKid(self.len)),
        }
    }

    pub(super) fn describe(&self) -> String {
        let mut kids: Vec<&str> = self.by_kid.keys().map(String::as_str).collect();
        kids.sort_unstable();
        format!(
            "{} keys, {} usable, kids: {}",
            self.len,
            self.usable,
            if kids.is_empty() {
                "none".to_string()
            } else {
                kids.join(", ")
            }
        )
    }
}

/// The key of `jwk` when it can verify `alg` signatures.
fn usable_key(jwk: &Jwk, alg: Algorithm) -> Option<DecodingKey> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let wanted = match alg {
        Algorithm::RS256 => KeyAlgorithm::RS256,
        Algorithm::ES256 => KeyAlgorithm::ES256,
        Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        _ => return None,
    };
    if jwk.common.key_algorithm.is_some_and(|a| a != wanted) {
        return None;
    }
    let fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    };
    if !fits {
        return None;
    }
    DecodingKey::from_jwk(jwk).ok()
}

/// A JWKS fetched from a URL, kept fresh by a background task.
pub(super) struct RemoteKeys {
    url: String,
    refresh: Duration,
    set: RwLock<Arc<KeySet>>,
    /// Asks the background task for an early fetch.
    wake: Arc<Notify>,
    /// When the last early fetch was asked for.
    last_early: Mutex<Option<Instant>>,
    /// How many early fetches were asked for (tests read it: a rate-limited request
    /// leaves it unchanged, synchronously).
    early_asked: std::sync::atomic::AtomicUsize,
    task: OnceLock<AbortHandle>,
    /// The refresh task, until the server takes it to watch (a panic must not go unseen).
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for RemoteKeys {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

impl RemoteKeys {
    /// Fetches the set once (failing when that fails) and starts the refresh task, which
    /// ends when the returned value is dropped.
    pub(super) async fn start(
        url: String,
        refresh: Duration,
        alg: Algorithm,
    ) -> Result<Arc<RemoteKeys>, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot create the HTTP client: {}", chain(&e)))?;
        let set = fetch(&client, &url, alg).await?;
        tracing::info!(url = %url, keys = %set.describe(), "auth: JWKS fetched");
        let remote = Arc::new(RemoteKeys {
            url,
            refresh,
            set: RwLock::new(Arc::new(set)),
            wake: Arc::new(Notify::new()),
            last_early: Mutex::new(None),
            early_asked: std::sync::atomic::AtomicUsize::new(0),
            task: OnceLock::new(),
            handle: Mutex::new(None),
        });
        let task = tokio::spawn(refresh_loop(
            Arc::downgrade(&remote),
            Arc::clone(&remote.wake),
            remote.url.clone(),
            refresh,
            client,
            alg,
        ));
        let _ = remote.task.set(task.abort_handle());
        *remote.handle.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(remote)
    }

    /// The refresh task's handle, once, for the server to watch.
    pub(super) fn take_task(&self) -> Option<JoinHandle<()>> {
        self.handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The set as last fetched.
    pub(super) fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.set.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Asks for an early fetch (a token named an unknown `kid`), unless one was asked for
    /// less than one refresh interval ago. Does not wait for it.
    pub(super) fn request_refresh(&self) {
        let mut last = self
            .last_early
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.refresh) {
            return;
        }
        *last = Some(now);
        tracing::debug!(url = %self.url, "auth: unknown kid, fetching the JWKS early");
        self.early_asked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The refresh task, to watch it end.
    #[cfg(test)]
    pub(super) fn refresh_task(&self) -> Option<AbortHandle> {
        self.task.get().cloned()
    }

    /// How many early fetches [`Self::request_refresh`] has asked for so far.
    #[cfg(test)]
    pub(super) fn early_fetches_asked(&self) -> usize {
        self.early_asked.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Fetches the set every `refresh`, and early when woken; a failed fetch keeps the set it
/// had. Holds the [`RemoteKeys`] only while storing a fetched set, and ends when it is
/// dropped (which also aborts this task).
async fn refresh_loop(
    remote: Weak<RemoteKeys>,
    wake: Arc<Notify>,
    url: String,
    refresh: Duration,
    client: reqwest::Client,
    alg: Algorithm,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(refresh) => {}
            () = wake.notified() => {}
        }
        if remote.strong_count() == 0 {
            return;
        }
        let fetched = fetch(&client, &url, alg).await;
        let Some(keys) = remote.upgrade() else {
            return;
        };
        match fetched {
            Ok(set) => {
                tracing::debug!(url = %url, keys = %set.describe(), "auth: JWKS refreshed");
                *keys.set.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
            }
            Err(e) => tracing::warn!("auth: JWKS refresh failed, keeping the previous keys: {e}"),
        }
    }
}

/// One fetch of a JWKS URL.
async fn fetch(client: &reqwest::Client, url: &str, alg: Algorithm) -> Result<KeySet, String> {
    let fail = |what: String| format!("cannot fetch {url}: {what}");
    let mut response = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| fail(chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(fail(format!("HTTP {status}")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| fail(chain(&e)))? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(fail(format!("larger than {MAX_JWKS_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    KeySet::parse(&body, alg).map_err(|e| format!("{url}: {e}"))
}

/// An error and its causes, `a: b: c` (reqwest's own message omits the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}
