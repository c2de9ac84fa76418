//! TLS material for the two listeners and the peer client, loaded once from PEM files.
//!
//! * Client listener: `--cert-file`/`--key-file`; with `--trusted-ca-file` client
//!   certificates signed by that CA are verified when presented, and with
//!   `--client-cert-auth` they are required.
//! * Peers: `--peer-cert-file`/`--peer-key-file`/`--peer-trusted-ca-file` make peer
//!   traffic mutual TLS: the peer listener requires a client certificate signed by the
//!   peer CA, and outgoing peer connections present the peer certificate and verify the
//!   server's certificate (chain and hostname/IP SAN) against the same CA.
//!
//! Only rustls's `ring` provider is used (no process-wide default is installed), TLS 1.2
//! and 1.3. Everything here runs before the node touches its data directory, so a bad
//! file is a configuration error (exit code 2). See docs/security.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag} {path}: cannot read: {source}")]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file holds no PEM item of the wanted kind, or a malformed one.
    #[error("{flag} {path}: {what}")]
    Pem {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the material (a key that does not match its certificate, a CA
    /// certificate it cannot parse, ...).
    #[error("{context}: {message}")]
    Rejected {
        /// What was being built.
        context: String,
        /// rustls's reason.
        message: String,
    },
}

/// Mutual TLS between peers: the peer listener's config and the peer client's config.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// Peer listener: presents the peer certificate, requires a client certificate
    /// signed by the peer CA.
    pub server: Arc<ServerConfig>,
    /// Peer client: presents the peer certificate, trusts only the peer CA.
    pub client: Arc<ClientConfig>,
}

/// The crypto provider every config uses (ring; no process default is needed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { flag, path: path.to_path_buf(), source })
}

/// Reads every certificate of a PEM file (at least one).
pub fn load_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(flag, path)?;
    let pem_err = |what: String| TlsError::Pem { flag, path: path.to_path_buf(), what };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("no \"BEGIN CERTIFICATE\" block found (want PEM certificates)".into()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 RSA or SEC1 EC) of a PEM file.
pub fn load_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        flag,
        path: path.to_path_buf(),
        what: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no private key found (want a PEM PRIVATE KEY block)".into(),
            other => format!("bad PEM private key: {other}"),
        },
    })
}

/// A root store holding every certificate of a CA bundle.
pub fn load_roots(flag: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(flag, path)? {
        roots.add(cert).map_err(|e| TlsError::Rejected {
            context: format!("{flag} {}", path.display()),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// How a listener treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates asked for.
    None,
    /// Verified against the CA when presented; connections without one are accepted.
    Optional,
    /// Required and verified against the CA; the handshake fails without one.
    Required,
}

/// Files and policy for one listener.
#[derive(Debug, Clone)]
pub struct ServerFiles<'a> {
    /// Flag names used in error messages: (cert, key, ca).
    pub flags: (&'static str, &'static str, &'static str),
    /// Certificate chain (PEM).
    pub cert: &'a Path,
    /// Private key (PEM).
    pub key: &'a Path,
    /// CA bundle for client certificates.
    pub ca: Option<&'a Path>,
    /// Client certificate policy (anything but `None` needs `ca`).
    pub auth: ClientAuth,
}

/// Builds a listener's server config.
pub fn server_config(files: &ServerFiles<'_>) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_flag, key_flag, ca_flag) = files.flags;
    let certs = load_certs(cert_flag, files.cert)?;
    let key = load_key(key_flag, files.key)?;
    let context = format!("{cert_flag} {} / {key_flag} {}", files.cert.display(), files.key.display());
    let rejected = |context: &str, e: &dyn std::fmt::Display| TlsError::Rejected { context: context.to_string(), message: e.to_string() };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| rejected(&context, &e))?;
    let builder = match (files.auth, files.ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (auth, Some(ca)) => {
            let roots = load_roots(ca_flag, ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if auth == ClientAuth::Optional { verifier.allow_unauthenticated() } else { verifier };
            let verifier = verifier.build().map_err(|e| rejected(&format!("{ca_flag} {}", ca.display()), &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        (_, None) => {
            return Err(TlsError::Rejected { context, message: format!("client certificate checks need {ca_flag}") })
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| rejected(&context, &e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Builds the peer client config: trusts `ca`, presents `cert`/`key`.
pub fn client_config(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots("--peer-trusted-ca-file", ca)?;
    let certs = load_certs("--peer-cert-file", cert)?;
    let key = load_key("--peer-key-file", key)?;
    let context = "peer client certificate (--peer-cert-file/--peer-key-file)";
    let rejected = |e: &dyn std::fmt::Display| TlsError::Rejected { context: context.to_string(), message: e.to_string() };
    // No ALPN here: hyper-rustls sets it (HTTP/1.1 only) when it wraps the config.
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| rejected(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| rejected(&e))?;
    Ok(Arc::new(cfg))
}

/// Loads mutual peer TLS from the three peer files.
pub fn peer_tls(cert: &Path, key: &Path, ca: &Path) -> Result<PeerTls, TlsError> {
    let server = server_config(&ServerFiles {
        flags: ("--peer-cert-file", "--peer-key-file", "--peer-trusted-ca-file"),
        cert,
        key,
        ca: Some(ca),
        auth: ClientAuth::Required,
    })?;
    let client = client_config(cert, key, ca)?;
    Ok(PeerTls { server, client })
}

/// A client config that trusts nothing: the peer client of a plaintext cluster (an
/// `https://` peer URL cannot be verified, so it is never used).
pub fn untrusting_client_config() -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions();
    match builder {
        Ok(b) => Arc::new(b.with_root_certificates(RootCertStore::empty()).with_no_client_auth()),
        // ring supports the default protocol versions; this arm is unreachable in practice.
        Err(_) => Arc::new(
            ClientConfig::builder().with_root_certificates(RootCertStore::empty()).with_no_client_auth(),
        ),
    }
}

/// A throw-away CA, a 127.0.0.1 certificate it signed (`ca.pem`, `cert.pem`,
/// `key.pem`), a key that matches nothing (`other-key.pem`) and `garbage.pem`.
#[cfg(test)]
pub(crate) struct Pki {
    pub(crate) dir: tempfile::TempDir,
}

#[cfg(test)]
impl Pki {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("other-key.pem"), other_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("garbage.pem"), "hello\n").unwrap();
        Pki { dir }
    }
    pub(crate) fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_good_material() {
        let k = Pki::new();
        peer_tls(&k.p("cert.pem"), &k.p("key.pem"), &k.p("ca.pem")).unwrap();
        for auth in [ClientAuth::None, ClientAuth::Optional, ClientAuth::Required] {
            let files = ServerFiles {
                flags: ("--cert-file", "--key-file", "--trusted-ca-file"),
                cert: &k.p("cert.pem"),
                key: &k.p("key.pem"),
                ca: Some(&k.p("ca.pem")),
                auth,
            };
            server_config(&files).unwrap();
        }
    }

    #[test]
    fn bad_material_names_the_flag_and_file() {
        let k = Pki::new();
        let e = peer_tls(&k.p("missing.pem"), &k.p("key.pem"), &k.p("ca.pem")).unwrap_err().to_string();
        assert!(e.contains("--peer-cert-file") && e.contains("missing.pem") && e.contains("cannot read"), "{e}");
        let e = peer_tls(&k.p("garbage.pem"), &k.p("key.pem"), &k.p("ca.pem")).unwrap_err().to_string();
        assert!(e.contains("--peer-cert-file") && e.contains("CERTIFICATE"), "{e}");
        let e = peer_tls(&k.p("cert.pem"), &k.p("cert.pem"), &k.p("ca.pem")).unwrap_err().to_string();
        assert!(e.contains("--peer-key-file") && e.contains("private key"), "{e}");
        let e = peer_tls(&k.p("cert.pem"), &k.p("key.pem"), &k.p("garbage.pem")).unwrap_err().to_string();
        assert!(e.contains("--peer-trusted-ca-file"), "{e}");
        // A key that does not belong to the certificate.
        let e = peer_tls(&k.p("cert.pem"), &k.p("other-key.pem"), &k.p("ca.pem")).unwrap_err().to_string();
        assert!(e.contains("--peer-cert-file"), "{e}");
    }
}
