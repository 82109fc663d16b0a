//! How the scraper reaches model servers: plain HTTP (the default) or HTTPS, and for HTTPS
//! which certificates it trusts. Builds the rustls client setup once, at start, so a CA
//! bundle that is missing or holds no certificates stops the process instead of failing
//! every scrape; touches the CA file and the platform trust store, nothing else.
//!
//! Model servers are scraped by IP address, so a verified certificate must carry the
//! endpoint's IP as an IP subject alternative name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_rustls::ConfigBuilderExt as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How every endpoint is scraped.
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// `http://ip:port/path`.
    #[default]
    Http,
    /// `https://ip:port/path` with this TLS setup.
    Https(ScrapeTls),
}

impl Transport {
    /// The URL scheme: `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Https(_) => "https",
        }
    }
}

/// Which certificates a model server's TLS certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The CA certificates of this PEM bundle, and nothing else.
    CaFile(PathBuf),
    /// The operating system's trust store (rarely useful: public CAs do not sign
    /// certificates for private IP addresses).
    PlatformRoots,
    /// No check at all: the traffic is encrypted but the server is not authenticated.
    InsecureSkipVerify,
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::CaFile(path) => write!(f, "CA bundle {}", path.display()),
            Trust::PlatformRoots => f.write_str("the platform trust store"),
            Trust::InsecureSkipVerify => f.write_str("no verification (insecure skip verify)"),
        }
    }
}

/// A checked TLS client setup for scraping: trust roots loaded, protocol versions chosen.
#[derive(Clone)]
pub struct ScrapeTls {
    config: Arc<ClientConfig>,
    trust: Trust,
}

impl fmt::Debug for ScrapeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapeTls")
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

/// Why a TLS setup for scraping cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read the CA bundle {}: {source}", .path.display())]
    ReadCaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA bundle {} is not valid PEM: {reason}", .path.display())]
    CaFilePem { path: PathBuf, reason: String },
    #[error(
        "the CA bundle {} holds no certificates; it must contain PEM blocks \
         `-----BEGIN CERTIFICATE-----` of the CAs that sign the model servers' certificates",
        .path.display()
    )]
    NoCertificates { path: PathBuf },
    #[error(
        "the CA bundle {}: certificate {number} cannot be a trust root: {reason}",
        .path.display()
    )]
    BadCertificate {
        path: PathBuf,
        /// 1-based position in the file.
        number: usize,
        reason: String,
    },
    #[error("no usable CA certificates in the platform trust store: {0}")]
    NoPlatformRoots(String),
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

impl ScrapeTls {
    /// Builds the setup for `trust`, reading a CA bundle or the platform trust store now.
    pub fn new(trust: Trust) -> Result<ScrapeTls, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let config = match &trust {
            Trust::CaFile(path) => builder
                .with_root_certificates(load_ca_file(path)?)
                .with_no_client_auth(),
            Trust::PlatformRoots => builder
                .with_native_roots()
                .map_err(|e| TlsSetupError::NoPlatformRoots(e.to_string()))?
                .with_no_client_auth(),
            Trust::InsecureSkipVerify => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth(),
        };
        Ok(ScrapeTls {
            config: Arc::new(config),
            trust,
        })
    }

    /// What the server certificates are checked against.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        ClientConfig::clone(&self.config)
    }
}

/// Reads a PEM bundle of CA certificates; every certificate in it must be usable.
fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let pem = std::fs::read(path).map_err(|source| TlsSetupError::ReadCaFile {
        path: path.to_path_buf(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| TlsSetupError::CaFilePem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsSetupError::BadCertificate {
            path: path.to_path_buf(),
            number: i + 1,
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// Accepts any server certificate, but still checks that the server holds the key of the
/// certificate it sent, so the handshake itself is sound. Public for tests that play a
/// gateway which, like most, does not verify the picker's certificate.
#[derive(Debug)]
pub struct AcceptAnyCertificate(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_file(name: &str, contents: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infergate-scrape-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn missing_ca_file_is_named_in_the_error() {
        let path = PathBuf::from("/nonexistent/infergate/ca.pem");
        let err = ScrapeTls::new(Trust::CaFile(path)).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/infergate/ca.pem") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn ca_file_without_certificates_is_refused_naming_the_file() {
        let path = mk_file("empty-ca.pem", b"# nothing here\n");
        let err = ScrapeTls::new(Trust::CaFile(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("holds no certificates"),
            "{err}"
        );
    }

    #[test]
    fn ca_file_with_a_broken_certificate_is_refused_with_its_position() {
        let good = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .unwrap()
            .cert
            .pem();
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let path = mk_file("broken-ca.pem", format!("{good}{broken}").as_bytes());
        let err = ScrapeTls::new(Trust::CaFile(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("certificate 2"),
            "{err}"
        );
    }

    #[test]
    fn insecure_setup_needs_no_files() {
        let tls = ScrapeTls::new(Trust::InsecureSkipVerify).unwrap();
        assert_eq!(tls.trust(), &Trust::InsecureSkipVerify);
        assert_eq!(Transport::Https(tls).scheme(), "https");
        assert_eq!(Transport::default().scheme(), "http");
    }
}
