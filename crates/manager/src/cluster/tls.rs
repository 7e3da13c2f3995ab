//! TLS to etcd (`vessel daemon --etcd-cacert FILE [--etcd-cert FILE --etcd-key FILE]`,
//! as etcdctl's `--cacert/--cert/--key`), and errors that say why a TLS connection failed.
//!
//! etcd serves its clients over TLS when started with `--cert-file/--key-file` (its
//! endpoints are then `https://`), and asks them for a certificate signed by its
//! `--trusted-ca-file` with `--client-cert-auth`. The daemon checks etcd's certificate
//! against the CA file alone (not the system's roots), for the endpoint's host name or IP
//! address, and shows its own certificate when one is given.

use std::path::PathBuf;

use etcd_client::{Certificate, Identity, TlsOptions};

use crate::error::{Error, Result};
use crate::tls::read_pem;

/// The files of `--etcd-cacert`, `--etcd-cert` and `--etcd-key`.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// The CA (PEM) that signed etcd's server certificates.
    pub cacert: Option<PathBuf>,
    /// This host's client certificate (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

impl EtcdTls {
    pub fn is_empty(&self) -> bool {
        self.cacert.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

/// Checks the endpoints against the TLS options and reads the files: `Ok(None)` for
/// plain `http://` endpoints without TLS options.
pub fn options(endpoints: &[String], tls: &EtcdTls) -> Result<Option<TlsOptions>> {
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    let plain: Vec<&String> = endpoints
        .iter()
        .filter(|e| !e.starts_with("https://"))
        .collect();
    if let Some(e) = plain.iter().find(|e| !e.starts_with("http://")) {
        return Err(Error::invalid(
            "etcd endpoint",
            format!("{e:?}: use http://HOST:PORT, or https://HOST:PORT for etcd with TLS"),
        ));
    }
    if https > 0 && !plain.is_empty() {
        return Err(Error::invalid(
            "etcd endpoints",
            format!(
                "{} is http:// and others are https://: one etcd cluster serves its clients one way",
                plain[0]
            ),
        ));
    }
    if https == 0 {
        if !tls.is_empty() {
            return Err(Error::invalid(
                "etcd TLS options",
                "--etcd-cacert, --etcd-cert and --etcd-key need https:// endpoints \
                 (etcd serving its clients over TLS)",
            ));
        }
        return Ok(None);
    }
    let Some(ca) = &tls.cacert else {
        return Err(Error::invalid(
            "etcd endpoints",
            "https:// endpoints need --etcd-cacert FILE: the CA that signed etcd's server \
             certificates (its --trusted-ca-file, or the CA of its --cert-file)",
        ));
    };
    let mut o = TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(
        "the etcd CA file (--etcd-cacert)",
        ca,
        "BEGIN CERTIFICATE",
    )?));
    match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            let cert = read_pem(
                "the etcd client certificate (--etcd-cert)",
                c,
                "BEGIN CERTIFICATE",
            )?;
            let key = read_pem("the etcd client key (--etcd-key)", k, "PRIVATE KEY")?;
            o = o.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => {
            return Err(Error::invalid(
                "etcd TLS options",
                "--etcd-cert and --etcd-key go together: the client certificate and its key",
            ))
        }
    }
    Ok(Some(o))
}

/// Why a TLS connection to `endpoint` fails, found by a handshake of our own with the
/// same files, and a first read (with TLS 1.3 a server that refuses the client's
/// certificate says so only after the handshake). None when the connection works, or
/// fails for another reason (nothing listens, no answer within 3 s).
///
/// tonic reports such a failure only as a cancelled request or a transport error.
pub async fn probe(endpoint: &str, tls: &EtcdTls) -> Option<String> {
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        probe_inner(endpoint, tls),
    );
    r.await.ok().flatten()
}

async fn probe_inner(endpoint: &str, tls: &EtcdTls) -> Option<String> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;

    let hostport = endpoint.strip_prefix("https://")?.trim_end_matches('/');
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h,
        None => hostport,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // The same reading of the files as the daemon's own TLS (crate::tls).
    let roots = match crate::tls::roots("the etcd CA file (--etcd-cacert)", tls.cacert.as_ref()?) {
        Ok(r) => r,
        Err(e) => return Some(e.to_string()),
    };
    // ring, as tonic's TLS (etcd-client's) uses: the probe must fail where it does.
    // (rustls deprecates it for want of post-quantum key exchange, which etcd's Go TLS
    // would not need.)
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            let (certs, key) = match crate::tls::identity(
                "the etcd client certificate (--etcd-cert)",
                c,
                "the etcd client key (--etcd-key)",
                k,
            ) {
                Ok(i) => i,
                Err(e) => return Some(e.to_string()),
            };
            match builder.with_client_auth_cert(certs, key) {
                Ok(c) => c,
                Err(e) => return Some(format!("the client certificate and key: {e}")),
            }
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let has_cert = tls.cert.is_some();
    let explain = |e: &std::io::Error| with_hint(chain(e), Some(has_cert));
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).ok()?;
    let tcp = tokio::net::TcpStream::connect(hostport).await.ok()?;
    let mut s = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(s) => s,
        Err(e) => return Some(explain(&e)),
    };
    // HTTP/2's preface and an empty SETTINGS frame: the server answers with its own.
    let hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    if let Err(e) = s.write_all(hello).await {
        return Some(explain(&e));
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf).await {
        Err(e) => Some(explain(&e)),
        Ok(_) => None,
    }
}

/// An etcd client error with its causes: tonic says only "transport error", and the
/// reason (a certificate etcd or this host refused) is further down the chain. A TLS
/// failure gets a hint naming the option to check.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    with_hint(chain(e), None)
}

/// The error's text and its sources', each piece once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        // A wrapper often repeats its source's text: keep each piece once.
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// `msg` with what it means for the daemon's options; `has_cert`: whether this host
/// showed a client certificate (when known).
fn with_hint(mut msg: String, has_cert: Option<bool>) -> String {
    if let Some(hint) = hint(&msg, has_cert) {
        msg.push_str(" (");
        msg.push_str(hint);
        msg.push(')');
    }
    msg
}

/// Whether an error's text (from [`describe`]) is a TLS failure: a certificate refused
/// on one side or the other, not an outage.
pub fn is_tls_failure(msg: &str) -> bool {
    hint(msg, None).is_some()
}

/// What a TLS failure's text means for the daemon's options.
fn hint(msg: &str, has_cert: Option<bool>) -> Option<&'static str> {
    let m = msg.to_ascii_lowercase();
    if m.contains("unknownissuer") || m.contains("unknown issuer") || m.contains("badsignature") {
        Some(
            "etcd's server certificate is not signed by the CA of --etcd-cacert: give the CA \
             that signed etcd's --cert-file",
        )
    } else if m.contains("notvalidforname") || m.contains("not valid for name") {
        Some(
            "etcd's server certificate does not name the host or address of the endpoint: \
             reissue it with that name or IP address among its subject alternative names",
        )
    } else if m.contains("certificate expired")
        || m.contains("invalid peer certificate") && m.contains("expired")
        || m.contains("notvalidyet")
    {
        Some("a certificate is outside its validity period")
    } else if m.contains("certificaterequired")
        || m.contains("certificate required")
        // etcd built with an older Go answers a missing certificate so too.
        || has_cert == Some(false) && (m.contains("badcertificate") || m.contains("bad certificate"))
    {
        Some(
            "etcd requires a client certificate (--client-cert-auth): give --etcd-cert and \
             --etcd-key, signed by a CA in etcd's --trusted-ca-file",
        )
    } else if m.contains("badcertificate")
        || m.contains("bad certificate")
        || m.contains("unknownca")
        || m.contains("unknown ca")
    {
        Some(
            "etcd refused this host's client certificate (--etcd-cert): it must be signed by \
             a CA in etcd's --trusted-ca-file",
        )
    } else if m.contains("invalidcontenttype")
        || m.contains("corrupt message")
        || m.contains("http2 error") && m.contains("frame")
    {
        Some("is the endpoint's scheme right? https:// for etcd with TLS, http:// without")
    } else if m.contains("handshake") || m.contains("tls") || m.contains("certificate") {
        Some("a TLS handshake with etcd failed: check --etcd-cacert, --etcd-cert and --etcd-key")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plain_endpoints_take_no_tls_options() {
        assert!(options(&eps(&["http://a:2379"]), &EtcdTls::default())
            .unwrap()
            .is_none());
        let tls = EtcdTls {
            cacert: Some("/nonexistent".into()),
            ..EtcdTls::default()
        };
        let e = options(&eps(&["http://a:2379"]), &tls).unwrap_err();
        assert!(e.to_string().contains("need https:// endpoints"), "{e}");
    }

    #[test]
    fn https_needs_a_ca_and_one_scheme() {
        let e = options(&eps(&["https://a:2379"]), &EtcdTls::default()).unwrap_err();
        assert!(e.to_string().contains("--etcd-cacert"), "{e}");
        let e = options(
            &eps(&["https://a:2379", "http://b:2379"]),
            &EtcdTls::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("http://b:2379"), "{e}");
        let e = options(&eps(&["a:2379"]), &EtcdTls::default()).unwrap_err();
        assert!(e.to_string().contains("use http://"), "{e}");
    }

    #[test]
    fn files_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("vessel-etcd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let mut tls = EtcdTls {
            cacert: Some(ca.clone()),
            ..EtcdTls::default()
        };
        let e = options(&eps(&["https://a:2379"]), &tls).unwrap_err();
        assert!(e.to_string().contains("BEGIN CERTIFICATE"), "{e}");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(options(&eps(&["https://a:2379"]), &tls).unwrap().is_some());
        tls.cert = Some(ca.clone());
        let e = options(&eps(&["https://a:2379"]), &tls).unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        tls.key = Some(dir.join("missing.key"));
        let e = options(&eps(&["https://a:2379"]), &tls).unwrap_err();
        assert!(e.to_string().contains("missing.key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_failures_name_the_option() {
        let h = hint("invalid peer certificate: UnknownIssuer", None).unwrap();
        assert!(h.contains("--etcd-cacert"), "{h}");
        let h = hint("received fatal alert: CertificateRequired", None).unwrap();
        assert!(h.contains("give --etcd-cert"), "{h}");
        let h = hint("received fatal alert: BadCertificate", Some(true)).unwrap();
        assert!(h.contains("refused this host's client certificate"), "{h}");
        let h = hint("received fatal alert: BadCertificate", Some(false)).unwrap();
        assert!(h.contains("give --etcd-cert"), "{h}");
        assert!(hint("connection refused", None).is_none());
        // etcd's own words are no TLS failure.
        assert!(hint(
            "etcdserver: requested lease not found (lease expired)",
            None
        )
        .is_none());
        assert!(hint("invalid peer certificate: Expired", None).is_some());
    }
}
