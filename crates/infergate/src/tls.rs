//! TLS material for the servers: the picker's ext_proc port (on by default, as the reference
//! picker) and, when asked, the standalone gateway's HTTP port. Loads a PEM certificate and
//! key, or makes a self-signed certificate at start; touches files and the crypto provider,
//! nothing else.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain and its private key, in PEM (what tonic takes) and checked to form a
/// usable server identity.
pub struct ServerIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// SHA-256 of the leaf certificate's DER, as `AB:CD:...`; what `openssl x509 -fingerprint
    /// -sha256` prints, so an operator can compare it with what the gateway saw.
    pub fingerprint: String,
}

/// Makes ring the process's rustls crypto provider. rustls refuses to choose when more than
/// one provider is compiled in, so this is explicit; a second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl ServerIdentity {
    /// A fresh self-signed certificate for `localhost`, `127.0.0.1` and `hostnames` (the
    /// Pod's name), as the reference picker makes when no certificate is mounted. Gateways
    /// skip verification of the picker by default, so its value is encryption, not identity.
    pub fn self_signed(hostnames: &[String]) -> anyhow::Result<ServerIdentity> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        for h in hostnames {
            // X.509 DNS names are ASCII; a name that is not must not stop the start.
            if !h.is_empty() && h.is_ascii() && !names.contains(h) {
                names.push(h.clone());
            }
        }
        let certified = rcgen::generate_simple_self_signed(names)
            .context("cannot generate a self-signed certificate")?;
        ServerIdentity::from_pem(
            certified.cert.pem().into_bytes(),
            certified.signing_key.serialize_pem().into_bytes(),
            "self-signed certificate",
            "self-signed key",
        )
    }

    /// Loads `tls.crt` and `tls.key` from `dir`, the layout of a Kubernetes TLS Secret.
    pub fn from_dir(dir: &Path) -> anyhow::Result<ServerIdentity> {
        ServerIdentity::from_files(&dir.join("tls.crt"), &dir.join("tls.key"))
    }

    /// Loads a PEM certificate chain and a PEM private key; errors name the file at fault.
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<ServerIdentity> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("cannot read the TLS {what} {}", p.display()))
        };
        let (cert_pem, key_pem) = (read(cert, "certificate")?, read(key, "private key")?);
        ServerIdentity::from_pem(
            cert_pem,
            key_pem,
            &cert.display().to_string(),
            &key.display().to_string(),
        )
    }

    fn from_pem(
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        cert_name: &str,
        key_name: &str,
    ) -> anyhow::Result<ServerIdentity> {
        let (chain, key) = parse(&cert_pem, &key_pem, cert_name, key_name)?;
        let fingerprint = sha256_fingerprint(&chain[0]);
        // Building a server config checks what tonic would only find at bind time: that the
        // key is of a supported kind and belongs to the certificate.
        server_config(chain, key).with_context(|| {
            format!("{key_name} cannot serve TLS with the certificate in {cert_name}")
        })?;
        Ok(ServerIdentity {
            cert_pem,
            key_pem,
            fingerprint,
        })
    }

    /// A rustls server config for this identity, offering `alpn` (e.g. `h2`, `http/1.1`).
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let (chain, key) = parse(&self.cert_pem, &self.key_pem, "certificate", "key")?;
        let mut config = server_config(chain, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

fn parse(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{cert_name}: not a valid PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        bail!("{cert_name}: no PEM CERTIFICATE block found");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        anyhow::anyhow!("{key_name}: no valid PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")
    })?;
    Ok((chain, key))
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<rustls::ServerConfig> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    Ok(config)
}

fn sha256_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut s = String::with_capacity(95);
    for (i, b) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02X}");
    }
    s
}

/// This machine's (or Pod's) hostname: `$HOSTNAME`, else the kernel's.
pub fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_identity_serves_and_has_a_sha256_fingerprint() {
        let id = ServerIdentity::self_signed(&["epp-0".to_owned()]).unwrap();
        assert_eq!(id.fingerprint.len(), 32 * 3 - 1);
        assert!(id.rustls_config(&[b"h2"]).is_ok());
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let a = ServerIdentity::self_signed(&[]).unwrap();
        let b = ServerIdentity::self_signed(&[]).unwrap();
        let err = ServerIdentity::from_pem(a.cert_pem, b.key_pem, "a.crt", "b.key")
            .err()
            .expect("mismatched key accepted");
        assert!(format!("{err:#}").contains("b.key"), "{err:#}");
    }
}
