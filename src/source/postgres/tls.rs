//! TLS for the PostgreSQL source's connections, chosen as libpq chooses it.
//!
//! In: the `sslmode` and `sslrootcert` parameters of `[source] url`'s query string (taken
//! out of the URL before tokio-postgres reads the rest: it knows neither `verify-ca`,
//! `verify-full` nor `sslrootcert`). Out: one [`Tls`] that secures both kinds of
//! connection alike: a rustls connector for the query connections (lookups, setup,
//! `check`; through `tokio-postgres-rustls`) and a `TlsConfig` for the replication
//! connection (pgwire-replication's own rustls upgrade). Both use rustls with the `ring`
//! provider, the one already in the tree.
//!
//! `sslmode`, as libpq's:
//! - `disable`: never TLS.
//! - `prefer` (the default): TLS when the server offers it, else plaintext; the
//!   certificate is not checked.
//! - `require`: TLS or no connection; the certificate is not checked, unless
//!   `sslrootcert` is given: then as `verify-ca`.
//! - `verify-ca`: TLS, and the server's certificate must chain to a trusted CA.
//! - `verify-full`: as `verify-ca`, and the certificate must name the URL's host (a DNS
//!   name, or an IP address in its subjectAltName).
//!
//! Trusted CAs: the PEM file `sslrootcert` (read at start: a missing or empty file stops
//! the start with its name); without it (or with `sslrootcert=system`), Mozilla's root
//! certificates as compiled in (`webpki-roots`), not the operating system's store.
//! Client certificates (`sslcert`/`sslkey`) are not supported (refused, not ignored).
//!
//! Errors say what to change: "the server does not support TLS but sslmode=require",
//! "certificate not trusted: …", "certificate not valid for host `…`".

use std::path::{Path, PathBuf};
use std::sync::Arc;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` (plaintext first) has no use here: refuse it rather than
            // guess.
            other => {
                return Err(format!(
                    "sslmode `{other}`: use disable, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection without TLS is refused.
    fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

/// How the source's connections are secured. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    /// `sslmode` as written.
    requested: SslMode,
    /// What is done: `require` with `sslrootcert` verifies the chain, as in libpq.
    mode: SslMode,
    /// `sslrootcert` (absolute); `None`: Mozilla's roots.
    rootcert: Option<PathBuf>,
    /// The query connections' TLS; `None` with `disable`.
    connector: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Characters escaped when a path is written back into a URL's query string.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'=')
    .add(b'?');

/// Splits `url` into the URL without its TLS parameters (for tokio-postgres) and its
/// [`Tls`]; a relative `sslrootcert` is taken from the working folder (see
/// [`resolve_rootcert`] for the config file's folder).
pub fn split_url(url: &str) -> Result<(String, Tls), String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut rest = Vec::new();
    let mut mode = None;
    let mut rootcert = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || {
            percent_decode_str(value)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| format!("`{key}` is not UTF-8 once percent-decoded"))
        };
        match key {
            "sslmode" => mode = Some(SslMode::parse(&decoded()?)?),
            "sslrootcert" => rootcert = Some(decoded()?),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(format!(
                    "`{key}` is not supported (client certificates and CRLs are not): \
                     remove it from the URL"
                ));
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let rootcert = rootcert
        .filter(|r| r != "system" && !r.is_empty())
        .map(PathBuf::from);
    Ok((url, Tls::new(mode.unwrap_or_default(), rootcert)?))
}

/// `url` with a relative `sslrootcert` made relative to `base` (the config file's
/// folder); any other URL unchanged.
pub fn resolve_rootcert(url: &str, base: &Path) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("sslrootcert", value)) => {
                let path = percent_decode_str(value).decode_utf8_lossy().into_owned();
                if path.is_empty() || path == "system" || Path::new(&path).is_absolute() {
                    return pair.to_owned();
                }
                let joined = base.join(path);
                format!(
                    "sslrootcert={}",
                    utf8_percent_encode(&joined.to_string_lossy(), QUERY_VALUE)
                )
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{head}?{}", pairs.join("&"))
}

impl Tls {
    fn new(requested: SslMode, rootcert: Option<PathBuf>) -> Result<Tls, String> {
        let mode = match requested {
            SslMode::Require if rootcert.is_some() => SslMode::VerifyCa,
            m => m,
        };
        let connector = match mode {
            SslMode::Disable => None,
            _ => Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                client_config(mode, rootcert.as_deref())?,
            )),
        };
        Ok(Tls {
            requested,
            mode,
            rootcert,
            connector,
        })
    }

    /// For tokio-postgres: whether TLS is tried and required.
    pub fn pg_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// The query connections' TLS connector (`None`: `disable`).
    pub fn connector(&self) -> Option<&tokio_postgres_rustls::MakeRustlsConnect> {
        self.connector.as_ref()
    }

    /// pgwire-replication's settings for the replication connection to `host`.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as M;
        let mode = match self.mode {
            SslMode::Disable => M::Disable,
            SslMode::Prefer => M::Prefer,
            SslMode::Require => M::Require,
            SslMode::VerifyCa => M::VerifyCa,
            SslMode::VerifyFull => M::VerifyFull,
        };
        pgwire_replication::TlsConfig {
            mode,
            ca_pem_path: self.rootcert.clone(),
            // The name checked is the URL's host, as for the query connections: an IP
            // address is matched against the certificate's IP addresses (rustls sends
            // no SNI for it). Without this, pgwire-replication refuses an IP address
            // with verify-full.
            sni_hostname: Some(host.to_owned()),
            client_cert_pem_path: None,
            client_key_pem_path: None,
        }
    }

    /// `sslmode=verify-full, trusting the CA certificates in /x/ca.pem`, for messages.
    pub fn describe(&self) -> String {
        let roots = || match &self.rootcert {
            Some(p) => format!("the CA certificates in {}", p.display()),
            None => "Mozilla's root certificates (webpki-roots)".to_owned(),
        };
        match self.mode {
            SslMode::Disable => "sslmode=disable (no TLS)".to_owned(),
            SslMode::Prefer => {
                "sslmode=prefer (TLS when the server offers it; certificate not checked)".to_owned()
            }
            SslMode::Require => "sslmode=require (certificate not checked)".to_owned(),
            SslMode::VerifyCa if self.requested == SslMode::Require => format!(
                "sslmode=require with sslrootcert, so as verify-ca: trusting {}",
                roots()
            ),
            SslMode::VerifyCa => format!(
                "sslmode=verify-ca (host name not checked): trusting {}",
                roots()
            ),
            SslMode::VerifyFull => format!("sslmode=verify-full: trusting {}", roots()),
        }
    }

    /// A connection error's text, said in terms of the settings when TLS is the cause.
    /// `host` is the URL's host.
    pub fn explain(&self, host: &str, error: &str) -> String {
        if error.contains("does not support TLS") && self.mode.requires_tls() {
            return format!(
                "the server does not support TLS but sslmode={}",
                self.requested.as_str()
            );
        }
        let Some(at) = error.find("invalid peer certificate") else {
            return error.to_owned();
        };
        let detail = &error[at..];
        let roots = match &self.rootcert {
            Some(p) => format!("a CA in {}", p.display()),
            None => "Mozilla's root certificates (webpki-roots); give the server's CA \
                     as sslrootcert"
                .to_owned(),
        };
        if detail.contains("UnknownIssuer") {
            format!(
                "certificate not trusted: the server's certificate is not signed by {roots} \
                 ({})",
                self.describe()
            )
        } else if detail.contains("NotValidForName") || detail.contains("not valid for name") {
            format!(
                "certificate not valid for host `{host}`: {detail} (sslmode=verify-full checks \
                 the name; connect by a name the certificate has)"
            )
        } else {
            format!("certificate not trusted: {detail} ({})", self.describe())
        }
    }
}

/// A tokio-postgres error's full text: its `Display` stops at "error performing TLS
/// handshake", the cause (the rustls error) is in its sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut add = |part: String| {
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    };
    let mut source = e.source();
    while let Some(s) = source {
        add(s.to_string());
        // io::Error's `source` skips the error it wraps: look at that one too.
        if let Some(inner) = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            add(inner.to_string());
        }
        source = s.source();
    }
    text
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The query connections' rustls settings for `mode` (not `disable`).
fn client_config(mode: SslMode, rootcert: Option<&Path>) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(Lenient {
            chain: None,
            algorithms: provider.signature_verification_algorithms,
        }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let webpki = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(rootcert)?),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| format!("TLS: {e}"))?;
            if mode == SslMode::VerifyCa {
                Arc::new(Lenient {
                    chain: Some(webpki),
                    algorithms: provider.signature_verification_algorithms,
                })
            } else {
                webpki
            }
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The trusted CAs: `sslrootcert`'s, or Mozilla's.
fn roots(rootcert: Option<&Path>) -> Result<RootCertStore, String> {
    let Some(path) = rootcert else {
        return Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("sslrootcert {}: cannot read it: {e}", path.display()))?;
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {}: no CA certificate in it (expected PEM, \
             -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(store)
}

/// The modes that check less than verify-full; the handshake's signatures are always
/// checked. `chain: None` (`prefer`/`require` without `sslrootcert`): any certificate
/// (libpq checks none). `chain: Some` (`verify-ca`): the chain is checked, the host name
/// is not.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// The provider's, as the WebPKI verifier checks signatures with.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_url_and_others_stay() {
        let (url, tls) = split_url(
            "postgres://u@h:5/db?application_name=x&sslmode=verify-full&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@h:5/db?application_name=x&connect_timeout=3"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.rootcert, None);
        assert!(tls.describe().contains("webpki-roots"));

        let (url, tls) = split_url("postgres://u@h/db").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");

        let (url, tls) = split_url("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert!(tls.connector().is_none());
        assert_eq!(tls.pg_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn bad_tls_parameters_are_refused_saying_why() {
        let err = split_url("postgres://u@h/db?sslmode=allow").unwrap_err();
        assert!(err.contains("sslmode `allow`"), "{err}");
        let err = split_url("postgres://u@h/db?sslcert=/c.pem").unwrap_err();
        assert!(err.contains("`sslcert` is not supported"), "{err}");
        let err = split_url("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/no/such/ca%20x.pem")
            .unwrap_err();
        assert!(err.contains("sslrootcert /no/such/ca x.pem"), "{err}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = split_url(&format!(
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert={}",
            empty.path().display()
        ))
        .unwrap_err();
        assert!(err.contains("no CA certificate"), "{err}");
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_as_libpq_does() {
        // `system`: Mozilla's roots, no file read.
        let (_, tls) = split_url("postgres://u@h/db?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(tls.pg_mode(), tokio_postgres::config::SslMode::Require);
        let tls = Tls::new(SslMode::Require, None).unwrap();
        assert_eq!(
            tls.replication("h").mode,
            pgwire_replication::SslMode::Require
        );
        // With a file (checked by the end-to-end tests with a real CA): verify-ca.
        let err = Tls::new(SslMode::Require, Some("/no/such.pem".into())).unwrap_err();
        assert!(err.contains("/no/such.pem"), "{err}");
    }

    #[test]
    fn a_relative_rootcert_is_taken_from_the_config_folder() {
        let base = Path::new("/etc/changecast");
        assert_eq!(
            resolve_rootcert(
                "postgres://u@h/db?sslmode=verify-full&sslrootcert=ca%20certs/ca.pem",
                base
            ),
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/etc/changecast/ca%20certs/ca.pem"
        );
        for same in [
            "postgres://u@h/db",
            "postgres://u@h/db?sslrootcert=/abs/ca.pem",
            "postgres://u@h/db?sslrootcert=system",
        ] {
            assert_eq!(resolve_rootcert(same, base), same);
        }
    }

    #[test]
    fn errors_are_said_in_terms_of_the_settings() {
        let require = Tls::new(SslMode::Require, None).unwrap();
        assert_eq!(
            require.explain(
                "h",
                "error performing TLS handshake: server does not support TLS"
            ),
            "the server does not support TLS but sslmode=require"
        );
        let prefer = Tls::new(SslMode::Prefer, None).unwrap();
        assert_eq!(
            prefer.explain("h", "connection refused"),
            "connection refused"
        );
        let full = Tls::new(SslMode::VerifyFull, None).unwrap();
        let e = full.explain(
            "h",
            "TLS handshake failed: invalid peer certificate: UnknownIssuer",
        );
        assert!(e.starts_with("certificate not trusted: "), "{e}");
        let e = full.explain(
            "10.0.0.1",
            "invalid peer certificate: certificate not valid for name \"10.0.0.1\"",
        );
        assert!(
            e.starts_with("certificate not valid for host `10.0.0.1`"),
            "{e}"
        );
    }
}
