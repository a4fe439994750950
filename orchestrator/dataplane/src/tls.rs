//! TLS termination for client listeners (rustls): server certificate, optional mTLS.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A listener's TLS settings, as PEM file paths.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    pub cert_path: String,
    pub key_path: String,
    /// CA bundle that client certificates must chain to; `None`: no client certificates.
    pub client_ca_path: Option<String>,
    /// With a client CA: refuse clients without a certificate (else they are `anonymous`).
    pub require_client_cert: bool,
}

fn io_err(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what)
}

fn certs(path: &str) -> std::io::Result<Vec<CertificateDer<'static>>> {
    let file = File::open(path).map_err(|e| io_err(format!("cannot read {path}: {e}")))?;
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut BufReader::new(file)).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err(io_err(format!("{path} holds no PEM certificate")));
    }
    Ok(certs)
}

fn key(path: &str) -> std::io::Result<PrivateKeyDer<'static>> {
    let file = File::open(path).map_err(|e| io_err(format!("cannot read {path}: {e}")))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))?
        .ok_or_else(|| io_err(format!("{path} holds no PEM private key")))
}

/// The rustls server configuration (ALPN `h2`) for these settings.
pub fn server_config(settings: &TlsSettings) -> std::io::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| io_err(format!("TLS: {e}")))?;
    let builder = match &settings.client_ca_path {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca)? {
                roots.add(cert).map_err(|e| io_err(format!("{ca}: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| io_err(format!("{ca}: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs(&settings.cert_path)?, key(&settings.key_path)?)
        .map_err(|e| io_err(format!("TLS certificate/key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
