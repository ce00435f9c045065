use super::*;
use crate::config::UserConfig;
use crate::source::LookupError;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::BoxFuture;
use serde_json::json;
use std::time::Duration;

const SECRET: &[u8] = b"test-secret";

/// The users table on a real SQLite file, read through `SqliteLookup` as the gateway does:
/// ada@example.com is u1.
struct Users {
    /// Holds the database file for as long as the authenticator looks users up.
    _dir: tempfile::TempDir,
    lookup: crate::source::sqlite::SqliteLookup,
}

impl Users {
    fn new() -> Users {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE users (_id TEXT PRIMARY KEY, email TEXT, profile JSON);
                 INSERT INTO users VALUES ('u1', 'ada@example.com', '{\"team\": \"ops\"}');
                 INSERT INTO users VALUES ('u2', 'bob@example.com', NULL);",
            )
            .unwrap();
        Users {
            lookup: crate::source::sqlite::SqliteLookup::new(&path),
            _dir: dir,
        }
    }
}

impl Lookup for Users {
    fn find(&self, q: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>> {
        self.lookup.find(q)
    }
}

/// `[auth]` with its defaults and an HS256 secret.
fn hs256() -> AuthConfig {
    toml::from_str("jwt_secret = \"test-secret\"").unwrap()
}

async fn auth(user: UserConfig, client_ids: Option<Vec<String>>) -> Authenticator {
    let config = AuthConfig {
        jwt_secret_env: None,
        jwt_secret: Some(String::from_utf8(SECRET.to_vec()).unwrap()),
        user,
        client_ids,
        leeway: Duration::from_secs(0),
        ..hs256()
    };
    let mut errors = Vec::new();
    AuthPlan::compile(&config, &mut errors)
        .unwrap_or_else(|| panic!("{errors:?}"))
        .build(Arc::new(Users::new()))
        .await
        .unwrap()
}

async fn by_sub() -> Authenticator {
    auth(UserConfig::default(), None).await
}

fn raw_token(header: Value, claims: Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        signature
    )
}

#[tokio::test]
async fn a_valid_token_names_the_user() {
    let token = mint(SECRET, "u1", 60, &Map::new());
    let id = by_sub().await.identify(&token, None).await.unwrap();
    assert_eq!(id.user, "u1");
    assert!(id.expires_at > now_secs());
}

#[tokio::test]
async fn expired_wrongly_signed_and_malformed_tokens_are_refused() {
    let a = by_sub().await;
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "u1", "exp": now_secs() - 10}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let wrong_key = mint(b"another secret", "u1", 60, &Map::new());
    let no_exp = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "u1"}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    for token in [
        expired.as_str(),
        wrong_key.as_str(),
        no_exp.as_str(),
        "",
        "garbage",
        "a.b.c",
    ] {
        let err = a.identify(token, None).await.unwrap_err();
        assert!(matches!(err, AuthError::Invalid(_)), "{token}: {err:?}");
        assert_eq!(err.close_reason().code(), 1008);
    }
}

#[tokio::test]
async fn alg_none_and_other_algorithms_are_refused() {
    let a = by_sub().await;
    let claims = json!({"sub": "u1", "exp": now_secs() + 60});
    let none = raw_token(json!({"alg": "none", "typ": "JWT"}), claims.clone(), "");
    assert!(matches!(
        a.identify(&none, None).await,
        Err(AuthError::Invalid(_))
    ));
    // Same secret, stronger HMAC: still not the pinned algorithm.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    assert!(matches!(
        a.identify(&hs512, None).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn user_lookup_by_claim_as_the_seed_does() {
    let a = auth(
        UserConfig {
            claim: "user_id".into(),
            lookup: Some("users".into()),
            filter: Some([("email".to_string(), toml::Value::String("$claim".into()))].into()),
            pick: Some("_id".into()),
        },
        None,
    )
    .await;
    let mut extra = Map::new();
    extra.insert("user_id".into(), json!("ada@example.com"));
    let ok = mint(SECRET, "whatever", 60, &extra);
    assert_eq!(a.identify(&ok, None).await.unwrap().user, "u1");
    extra.insert("user_id".into(), json!("nobody@example.com"));
    let unknown = mint(SECRET, "whatever", 60, &extra);
    let err = a.identify(&unknown, None).await.unwrap_err();
    assert_eq!(err, AuthError::UnknownUser);
    assert_eq!(err.close_reason().code(), 4003);
    let no_claim = mint(SECRET, "x", 60, &Map::new());
    assert!(matches!(
        a.identify(&no_claim, None).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn client_id_allow_list() {
    let a = auth(UserConfig::default(), Some(vec!["web".into()])).await;
    let token = mint(SECRET, "u1", 60, &Map::new());
    assert!(a.identify(&token, Some("web")).await.is_ok());
    assert_eq!(
        a.identify(&token, Some("tv")).await,
        Err(AuthError::ClientNotAllowed)
    );
    assert_eq!(
        a.identify(&token, None).await,
        Err(AuthError::ClientNotAllowed)
    );
}

#[test]
fn auth_config_errors_are_named() {
    let base = AuthConfig {
        jwt_secret_env: Some("CHANGECAST_TEST_SURELY_UNSET_VAR".into()),
        jwt_secret: None,
        user: UserConfig::default(),
        client_ids: Some(vec![]),
        leeway: Duration::from_secs(5),
        ..hs256()
    };
    let mut errors = Vec::new();
    assert!(AuthPlan::compile(&base, &mut errors).is_none());
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["auth.jwt_secret_env", "auth.client_ids"]);

    let mut errors = Vec::new();
    let bad_lookup = AuthConfig {
        jwt_secret_env: None,
        jwt_secret: Some("s".into()),
        user: UserConfig {
            claim: "email".into(),
            lookup: Some("users".into()),
            filter: Some([("email".to_string(), toml::Value::String("$email".into()))].into()),
            pick: None,
        },
        client_ids: None,
        leeway: Duration::from_secs(5),
        ..hs256()
    };
    assert!(AuthPlan::compile(&bad_lookup, &mut errors).is_none());
    assert_eq!(errors[0].path, "auth.user.where.email");
}

// --- RS256, ES256 and EdDSA: PEM files, JWKS files and JWKS URLs -------------------------
//
// The keys are test-only fixtures made with the openssl CLI: tests/fixtures/jwt/README.md.

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

/// `[auth]` with its defaults and no key at all.
fn bare() -> AuthConfig {
    AuthConfig {
        leeway: Duration::from_secs(0),
        ..toml::from_str("").unwrap()
    }
}

fn with_public_key(algorithm: &str, file: &str) -> AuthConfig {
    AuthConfig {
        algorithm: algorithm.into(),
        public_key_file: Some(fixture(file)),
        ..bare()
    }
}

fn with_jwks_file(algorithm: &str, file: &str) -> AuthConfig {
    AuthConfig {
        algorithm: algorithm.into(),
        jwks_file: Some(fixture(file)),
        ..bare()
    }
}

fn with_jwks_url(url: &str, refresh: Duration) -> AuthConfig {
    AuthConfig {
        algorithm: "RS256".into(),
        jwks_url: Some(url.into()),
        jwks_refresh: refresh,
        ..bare()
    }
}

async fn build(config: &AuthConfig) -> Result<Authenticator, String> {
    let mut errors = Vec::new();
    AuthPlan::compile(config, &mut errors)
        .unwrap_or_else(|| panic!("{errors:?}"))
        .build(Arc::new(Users::new()))
        .await
}

/// Every error `compile` reports, as `path: message`.
fn config_errors(config: &AuthConfig) -> Vec<String> {
    let mut errors = Vec::new();
    let plan = AuthPlan::compile(config, &mut errors);
    assert!(plan.is_none() || errors.is_empty());
    errors.iter().map(ToString::to_string).collect()
}

fn claims() -> Value {
    json!({"sub": "u1", "exp": now_secs() + 60})
}

/// Signs `claims` with a fixture private key.
fn sign(alg: Algorithm, private_key: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = read_fixture(private_key);
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no fixture key for {other:?}"),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

async fn assert_accepted(a: &Authenticator, token: &str) {
    let id = a.identify(token, None).await;
    assert_eq!(id.map(|i| i.user), Ok("u1".to_string()));
}

async fn assert_refused(a: &Authenticator, token: &str) -> String {
    match a.identify(token, None).await {
        Err(AuthError::Invalid(why)) => why,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn each_algorithm_accepts_its_key_and_refuses_another() {
    for (name, alg, public, private, other) in [
        (
            "RS256",
            Algorithm::RS256,
            "rsa_public.pem",
            "rsa_private.pem",
            "rsa2_private.pem",
        ),
        (
            "ES256",
            Algorithm::ES256,
            "ec_public.pem",
            "ec_private.pem",
            "ec2_private.pem",
        ),
        (
            "EdDSA",
            Algorithm::EdDSA,
            "ed25519_public.pem",
            "ed25519_private.pem",
            "ed25519_2_private.pem",
        ),
    ] {
        let a = build(&with_public_key(name, public)).await.unwrap();
        assert_accepted(&a, &sign(alg, private, None, &claims())).await;
        // A `kid` is not read when there is one key.
        assert_accepted(&a, &sign(alg, private, Some("any"), &claims())).await;
        assert_refused(&a, &sign(alg, other, None, &claims())).await;
        let expired = json!({"sub": "u1", "exp": now_secs() - 10});
        assert_refused(&a, &sign(alg, private, None, &expired)).await;
        let no_exp = json!({"sub": "u1"});
        assert_refused(&a, &sign(alg, private, None, &no_exp)).await;
    }
}

#[tokio::test]
async fn the_algorithm_stays_pinned() {
    let rs256 = build(&with_public_key("RS256", "rsa_public.pem"))
        .await
        .unwrap();
    // The classic confusion: HS256 with the RSA public key (PEM bytes) as the secret.
    let public_pem = read_fixture("rsa_public.pem");
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    let why = assert_refused(&rs256, &confused).await;
    assert!(why.contains("HS256 is not accepted (only RS256)"), "{why}");
    // A valid signature by another algorithm's key.
    assert_refused(
        &rs256,
        &sign(Algorithm::ES256, "ec_private.pem", None, &claims()),
    )
    .await;
    let es256 = build(&with_public_key("ES256", "ec_public.pem"))
        .await
        .unwrap();
    assert_refused(
        &es256,
        &sign(Algorithm::RS256, "rsa_private.pem", None, &claims()),
    )
    .await;
    // HS256 configured: an RS256 token is refused too.
    assert_refused(
        &by_sub().await,
        &sign(Algorithm::RS256, "rsa_private.pem", None, &claims()),
    )
    .await;
}

#[tokio::test]
async fn alg_none_is_refused_with_public_keys() {
    let pem = build(&with_public_key("RS256", "rsa_public.pem"))
        .await
        .unwrap();
    let jwks = build(&with_jwks_file("RS256", "jwks.json")).await.unwrap();
    let good = sign(
        Algorithm::RS256,
        "rsa_private.pem",
        Some("rsa-1"),
        &claims(),
    );
    let real_signature = good.rsplit('.').next().unwrap();
    for signature in ["", real_signature] {
        for header in [
            json!({"alg": "none", "typ": "JWT"}),
            json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
            json!({"alg": "None", "kid": "rsa-1"}),
        ] {
            let token = raw_token(header, claims(), signature);
            assert_refused(&pem, &token).await;
            assert_refused(&jwks, &token).await;
        }
    }
}

#[tokio::test]
async fn jwks_file_picks_the_key_by_kid() {
    let rs = build(&with_jwks_file("RS256", "jwks.json")).await.unwrap();
    let rsa = |kid: Option<&str>| sign(Algorithm::RS256, "rsa_private.pem", kid, &claims());
    assert_accepted(&rs, &rsa(Some("rsa-1"))).await;
    let why = assert_refused(&rs, &rsa(Some("rsa-9"))).await;
    assert!(why.contains("no key with kid `rsa-9`"), "{why}");
    // Two keys in the set: a token must say which.
    let why = assert_refused(&rs, &rsa(None)).await;
    assert!(why.contains("no `kid`"), "{why}");
    // `ec-1` is in the set but is not an RS256 key.
    assert_refused(&rs, &rsa(Some("ec-1"))).await;
    // A key signed by another key under a known kid.
    assert_refused(
        &rs,
        &sign(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("rsa-1"),
            &claims(),
        ),
    )
    .await;

    let es = build(&with_jwks_file("ES256", "jwks.json")).await.unwrap();
    assert_accepted(
        &es,
        &sign(Algorithm::ES256, "ec_private.pem", Some("ec-1"), &claims()),
    )
    .await;
    assert_refused(
        &es,
        &sign(Algorithm::ES256, "ec_private.pem", Some("rsa-1"), &claims()),
    )
    .await;

    // One key in the set: a token without `kid` uses it; one naming another kid does not.
    let one = build(&with_jwks_file("RS256", "jwks-rotated.json"))
        .await
        .unwrap();
    let rsa2 = |kid: Option<&str>| sign(Algorithm::RS256, "rsa2_private.pem", kid, &claims());
    assert_accepted(&one, &rsa2(None)).await;
    assert_accepted(&one, &rsa2(Some("rsa-2"))).await;
    assert_refused(&one, &rsa2(Some("rsa-1"))).await;
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_set() {
    let config = AuthConfig {
        audience: Some(vec!["changecast".into(), "api".into()]),
        issuer: Some(vec!["https://idp.example.com".into()]),
        ..with_public_key("ES256", "ec_public.pem")
    };
    let a = build(&config).await.unwrap();
    let token = |claims: Value| sign(Algorithm::ES256, "ec_private.pem", None, &claims);
    let exp = now_secs() + 60;
    let iss = "https://idp.example.com";
    for ok in [
        json!({"sub": "u1", "exp": exp, "aud": "api", "iss": iss}),
        json!({"sub": "u1", "exp": exp, "aud": ["other", "changecast"], "iss": iss}),
    ] {
        assert_accepted(&a, &token(ok)).await;
    }
    for refused in [
        json!({"sub": "u1", "exp": exp, "aud": "other", "iss": iss}),
        json!({"sub": "u1", "exp": exp, "aud": ["other"], "iss": iss}),
        json!({"sub": "u1", "exp": exp, "iss": iss}),
        json!({"sub": "u1", "exp": exp, "aud": "api", "iss": "https://evil.example.com"}),
        json!({"sub": "u1", "exp": exp, "aud": "api"}),
    ] {
        let why = assert_refused(&a, &token(refused.clone())).await;
        assert!(
            why.contains("udience") || why.contains("ssuer") || why.contains("Missing"),
            "{refused}: {why}"
        );
    }

    // Unset: `aud` and `iss` are not checked (HS256 and public keys alike).
    let open = build(&with_public_key("ES256", "ec_public.pem"))
        .await
        .unwrap();
    let anything = json!({"sub": "u1", "exp": exp, "aud": ["x", "y"], "iss": "whoever"});
    assert_accepted(&open, &token(anything.clone())).await;
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &anything,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    assert_accepted(&by_sub().await, &hs).await;
}

#[test]
fn key_config_errors_are_named() {
    let cases: Vec<(AuthConfig, Vec<&str>)> = vec![
        (
            AuthConfig {
                algorithm: "HS512".into(),
                ..hs256()
            },
            vec!["auth.algorithm: \"HS512\" is not one of HS256, RS256, ES256, EdDSA"],
        ),
        (
            AuthConfig {
                jwt_secret: Some("s".into()),
                ..with_public_key("RS256", "rsa_public.pem")
            },
            vec!["auth.jwt_secret: not used with RS256"],
        ),
        (
            AuthConfig {
                jwt_secret_env: Some("X".into()),
                ..with_jwks_file("EdDSA", "jwks.json")
            },
            // The set has no Ed25519 key either.
            vec![
                "auth.jwt_secret_env: not used with EdDSA",
                "auth.jwks_file: ",
            ],
        ),
        (
            AuthConfig {
                public_key_file: Some(fixture("rsa_public.pem")),
                ..hs256()
            },
            vec!["auth.public_key_file: not used with HS256"],
        ),
        (
            AuthConfig {
                jwks_url: Some("https://idp.example.com/jwks".into()),
                ..hs256()
            },
            vec!["auth.jwks_url: not used with HS256"],
        ),
        (
            AuthConfig {
                jwks_file: Some(fixture("jwks.json")),
                jwks_url: Some("https://idp.example.com/jwks".into()),
                ..with_public_key("RS256", "rsa_public.pem")
            },
            vec![
                "auth.jwks_file: set only one of public_key_file, jwks_file and jwks_url",
                "auth.jwks_url: set only one of",
            ],
        ),
        (
            AuthConfig {
                algorithm: "RS256".into(),
                ..bare()
            },
            vec!["auth.public_key_file: missing: RS256 needs one of"],
        ),
        (
            with_public_key("RS256", "no-such-key.pem"),
            vec!["auth.public_key_file: cannot read "],
        ),
        (
            with_public_key("RS256", "ec_public.pem"),
            vec!["auth.public_key_file: "],
        ),
        (
            with_public_key("ES256", "ed25519_public.pem"),
            vec!["auth.public_key_file: "],
        ),
        (
            with_public_key("EdDSA", "rsa_public.pem"),
            vec!["auth.public_key_file: "],
        ),
        (
            with_public_key("RS256", "rsa_private.pem"),
            vec!["auth.public_key_file: "],
        ),
        (
            with_jwks_file("RS256", "no-such-jwks.json"),
            vec!["auth.jwks_file: cannot read "],
        ),
        (
            with_jwks_file("RS256", "rsa_public.pem"),
            vec!["auth.jwks_file: "],
        ),
        (
            with_jwks_file("ES256", "jwks-rotated.json"),
            vec!["auth.jwks_file: "],
        ),
        (
            with_jwks_url("ftp://idp.example.com/jwks", Duration::from_secs(60)),
            vec!["auth.jwks_url: \"ftp://idp.example.com/jwks\" is not an http"],
        ),
        (
            with_jwks_url("https://idp.example.com/jwks", Duration::ZERO),
            vec!["auth.jwks_refresh: must be longer than 0s"],
        ),
        (
            AuthConfig {
                audience: Some(vec![]),
                issuer: Some(vec![String::new()]),
                ..with_public_key("RS256", "rsa_public.pem")
            },
            vec!["auth.audience: an empty list", "auth.issuer: "],
        ),
    ];
    for (config, expected) in cases {
        let errors = config_errors(&config);
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, prefix) in errors.iter().zip(&expected) {
            assert!(
                error.starts_with(prefix),
                "{error:?} should start with {prefix:?}"
            );
        }
    }
    // The messages say what is wrong with the file.
    let wrong_type = config_errors(&with_public_key("RS256", "ec_public.pem"));
    assert!(
        wrong_type[0].contains("is not an RSA public key"),
        "{wrong_type:?}"
    );
    let private = config_errors(&with_public_key("RS256", "rsa_private.pem"));
    assert!(private[0].contains("is a private key"), "{private:?}");
    let no_es = config_errors(&with_jwks_file("ES256", "jwks-rotated.json"));
    assert!(
        no_es[0].contains("no key in the set can verify ES256"),
        "{no_es:?}"
    );
}

#[test]
fn describe_names_the_algorithm_and_the_key_source() {
    let plan = |config: &AuthConfig| {
        let mut errors = Vec::new();
        AuthPlan::compile(config, &mut errors)
            .unwrap_or_else(|| panic!("{errors:?}"))
            .describe()
    };
    assert!(plan(&hs256()).starts_with("HS256 JWT (shared secret), exp required"));
    let pem = plan(&with_public_key("EdDSA", "ed25519_public.pem"));
    assert!(pem.starts_with("EdDSA JWT (public key file "), "{pem}");
    assert!(pem.contains("ed25519_public.pem"), "{pem}");
    let jwks = plan(&AuthConfig {
        audience: Some(vec!["api".into()]),
        ..with_jwks_file("RS256", "jwks.json")
    });
    assert!(jwks.contains("RS256 JWT (JWKS file "), "{jwks}");
    assert!(jwks.contains("2 keys, 1 usable, kids: rsa-1"), "{jwks}");
    assert!(jwks.contains("aud one of api"), "{jwks}");
    let url = plan(&with_jwks_url(
        "https://idp.example.com/jwks",
        Duration::from_secs(300),
    ));
    assert!(
        url.contains(
            "RS256 JWT (JWKS URL https://idp.example.com/jwks, fetched at start and every 5m"
        ),
        "{url}"
    );
}

/// A local HTTP server for `/jwks.json`, whose body the test can change and whose
/// requests it can count. Stops when dropped.
struct JwksServer {
    url: String,
    body: Arc<std::sync::Mutex<Vec<u8>>>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(fixture_name: &str) -> JwksServer {
        use axum::routing::get;
        let body = Arc::new(std::sync::Mutex::new(read_fixture(fixture_name)));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (b, h) = (Arc::clone(&body), Arc::clone(&hits));
        let app = axum::Router::new().route(
            "/jwks.json",
            get(move || {
                let (b, h) = (Arc::clone(&b), Arc::clone(&h));
                async move {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = b.lock().unwrap().clone();
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        JwksServer {
            url: format!("http://{addr}/jwks.json"),
            body,
            hits,
            task,
        }
    }

    fn serve(&self, fixture_name: &str) {
        *self.body.lock().unwrap() = read_fixture(fixture_name);
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `check` every 20 ms until it holds, for at most 3 s.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn jwks_url_is_fetched_at_start() {
    let server = JwksServer::start("jwks.json").await;
    let a = build(&with_jwks_url(&server.url, Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(server.hits(), 1);
    assert_accepted(
        &a,
        &sign(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("rsa-1"),
            &claims(),
        ),
    )
    .await;
    assert_refused(
        &a,
        &sign(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("rsa-1"),
            &claims(),
        ),
    )
    .await;
    assert_refused(
        &a,
        &sign(Algorithm::RS256, "rsa_private.pem", None, &claims()),
    )
    .await;
}

#[tokio::test]
async fn an_unreachable_or_bad_jwks_url_fails_the_start() {
    // A port that was just free: connection refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/jwks.json");
    let err = build(&with_jwks_url(&url, Duration::from_secs(60)))
        .await
        .err()
        .expect("the start fails");
    assert!(
        err.starts_with(&format!("auth.jwks_url: cannot fetch {url}: ")),
        "{err}"
    );

    let server = JwksServer::start("jwks.json").await;
    let missing = server.url.replace("jwks.json", "nothing-here");
    let err = build(&with_jwks_url(&missing, Duration::from_secs(60)))
        .await
        .err()
        .expect("a 404 fails the start");
    assert!(err.contains("HTTP 404"), "{err}");
    server.serve("rsa_public.pem");
    let err = build(&with_jwks_url(&server.url, Duration::from_secs(60)))
        .await
        .err()
        .expect("a body that is not a JWKS fails the start");
    assert!(err.contains("not JSON"), "{err}");
}

#[tokio::test]
async fn a_rotated_jwks_is_picked_up_by_the_background_refresh() {
    let server = JwksServer::start("jwks.json").await;
    let a = build(&with_jwks_url(&server.url, Duration::from_millis(100)))
        .await
        .unwrap();
    let old = sign(
        Algorithm::RS256,
        "rsa_private.pem",
        Some("rsa-1"),
        &claims(),
    );
    let new = sign(
        Algorithm::RS256,
        "rsa2_private.pem",
        Some("rsa-2"),
        &claims(),
    );
    assert_accepted(&a, &old).await;
    assert_refused(&a, &new).await;
    server.serve("jwks-rotated.json");
    eventually("the new kid is accepted", async || {
        a.identify(&new, None).await.is_ok()
    })
    .await;
    // The old key left the set.
    assert_refused(&a, &old).await;
}

#[tokio::test]
async fn an_unknown_kid_asks_for_one_early_fetch_per_interval() {
    let server = JwksServer::start("jwks.json").await;
    // Far from the periodic fetch: only an early one can bring the new key.
    let a = build(&with_jwks_url(&server.url, Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(server.hits(), 1);
    server.serve("jwks-rotated.json");
    let new = sign(
        Algorithm::RS256,
        "rsa2_private.pem",
        Some("rsa-2"),
        &claims(),
    );
    // Refused at once (no waiting on the network), and a fetch is started.
    let started = std::time::Instant::now();
    assert_refused(&a, &new).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    eventually("the early fetch", async || server.hits() == 2).await;
    eventually("the new kid is accepted", async || {
        a.identify(&new, None).await.is_ok()
    })
    .await;
    let Keys::Remote(remote) = &a.keys else {
        panic!("a JWKS URL gives remote keys");
    };
    assert_eq!(remote.early_fetches_asked(), 1);
    // More unknown kids within the interval: each refusal checked the rate limit before
    // it returned, and none asked for a fetch. The refresh task fetches only when asked
    // or after the interval (an hour), so no fetch is on its way either.
    let unknown = sign(Algorithm::RS256, "rsa2_private.pem", Some("zzz"), &claims());
    for _ in 0..5 {
        assert_refused(&a, &unknown).await;
        assert_eq!(remote.early_fetches_asked(), 1, "rate-limited");
    }
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn the_refresh_stops_when_the_authenticator_is_dropped() {
    let server = JwksServer::start("jwks.json").await;
    let a = build(&with_jwks_url(&server.url, Duration::from_millis(30)))
        .await
        .unwrap();
    eventually("periodic fetches", async || server.hits() >= 3).await;
    let Keys::Remote(remote) = &a.keys else {
        panic!("a JWKS URL gives remote keys");
    };
    let task = remote.refresh_task().expect("the refresh task runs");
    assert!(!task.is_finished());
    drop(a);
    // Ended, not merely quiet for a while: a finished task fetches nothing more.
    eventually("the refresh task ends", async || task.is_finished()).await;
}

/// An HS256 token with these claims, signed with the test secret.
fn signed(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[tokio::test]
async fn nbf_in_the_future_is_refused_and_in_the_past_accepted() {
    let a = by_sub().await;
    let now = now_secs();
    let later = signed(json!({"sub": "u1", "exp": now + 600, "nbf": now + 300}));
    let err = a.identify(&later, None).await.unwrap_err();
    assert!(matches!(err, AuthError::Invalid(_)), "{err:?}");
    let earlier = signed(json!({"sub": "u1", "exp": now + 600, "nbf": now - 10}));
    assert_eq!(a.identify(&earlier, None).await.unwrap().user, "u1");
    let bad = signed(json!({"sub": "u1", "exp": now + 600, "nbf": "tomorrow"}));
    assert!(matches!(
        a.identify(&bad, None).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn an_exp_beyond_the_horizon_is_refused_without_overflow() {
    let a = by_sub().await;
    let now = now_secs();
    for exp in [
        json!(u64::MAX),
        json!(u64::MAX - 1),
        json!(1.8e19),
        json!(now + MAX_TOKEN_LIFETIME.as_secs() + 60),
    ] {
        let token = signed(json!({"sub": "u1", "exp": exp}));
        let err = a.identify(&token, None).await.unwrap_err();
        assert!(
            matches!(&err, AuthError::Invalid(m) if m.contains("exp")),
            "{exp}: {err:?}"
        );
    }
    // Just inside the horizon: accepted, and the connection's expiry is the token's.
    let exp = now + MAX_TOKEN_LIFETIME.as_secs() - 60;
    let id = a
        .identify(&signed(json!({"sub": "u1", "exp": exp})), None)
        .await
        .unwrap();
    assert_eq!(id.expires_at, exp);
}

#[tokio::test]
async fn a_fractional_exp_expires_when_the_verifier_says() {
    let a = by_sub().await;
    let now = now_secs();
    // jsonwebtoken rounds a fractional NumericDate; the connection's expiry must match.
    for (exp, want) in [
        (now as f64 + 120.4, now + 120),
        (now as f64 + 120.6, now + 121),
    ] {
        let id = a
            .identify(&signed(json!({"sub": "u1", "exp": exp})), None)
            .await
            .unwrap();
        assert_eq!(id.expires_at, want, "exp {exp}");
    }
    for exp in [json!(-5), json!(f64::MIN), json!("soon"), json!(true)] {
        let token = signed(json!({"sub": "u1", "exp": exp}));
        assert!(
            matches!(a.identify(&token, None).await, Err(AuthError::Invalid(_))),
            "{exp}"
        );
    }
}

#[test]
fn numeric_dates_are_read_as_the_verifier_reads_them() {
    assert_eq!(numeric_date(&json!(10)), Some(10));
    assert_eq!(numeric_date(&json!(10.49)), Some(10));
    assert_eq!(numeric_date(&json!(10.5)), Some(11));
    assert_eq!(numeric_date(&json!(u64::MAX)), Some(u64::MAX));
    assert_eq!(numeric_date(&json!(-1)), None);
    assert_eq!(numeric_date(&json!(-0.4)), None);
    assert_eq!(numeric_date(&json!(2e19)), None);
    assert_eq!(numeric_date(&json!("10")), None);
}
