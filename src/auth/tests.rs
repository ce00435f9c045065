use super::*;
use crate::config::UserConfig;
use crate::path::FieldPath;
use crate::source::LookupError;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::BoxFuture;
use serde_json::json;
use std::time::Duration;

const SECRET: &[u8] = b"test-secret";

struct Users;
impl Lookup for Users {
    fn find(&self, q: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>> {
        Box::pin(async move {
            assert_eq!(q.collection, "users");
            assert_eq!(q.filter[0].0, FieldPath::parse("email").unwrap());
            Ok(match q.filter[0].1.as_str() {
                Some("ada@example.com") => vec![json!({"_id": "u1", "email": "ada@example.com"})],
                _ => vec![],
            })
        })
    }
}

/// `[auth]` with its defaults and an HS256 secret.
fn hs256() -> AuthConfig {
    toml::from_str("jwt_secret = \"test-secret\"").unwrap()
}

fn auth(user: UserConfig, client_ids: Option<Vec<String>>) -> Authenticator {
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
        .build(Arc::new(Users))
}

fn by_sub() -> Authenticator {
    auth(UserConfig::default(), None)
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
    let id = by_sub().identify(&token, None).await.unwrap();
    assert_eq!(id.user, "u1");
    assert!(id.expires_at > now_secs());
}

#[tokio::test]
async fn expired_wrongly_signed_and_malformed_tokens_are_refused() {
    let a = by_sub();
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
    let a = by_sub();
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
    );
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
    let a = auth(UserConfig::default(), Some(vec!["web".into()]));
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
