//! Mutual TLS, set up the same way by both daemons: each side presents a
//! certificate signed by the pair's CA and trusts only that CA. The primary
//! refuses clients without such a certificate; the standby checks the
//! primary's name. Both ends are rustls, which negotiates TLS 1.3.
//!
//! `generate` writes a CA and leaf certificates for a quick start
//! (`tandem-primary certs`).

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not contain a PEM {what}")]
    NotPem { what: &'static str, path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The three files each side needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn read_pem(what: &'static str, path: &Path, marker: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.into(),
        source,
    })?;
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        return Err(TlsError::NotPem {
            what,
            path: path.into(),
        });
    }
    Ok(bytes)
}

impl TlsFiles {
    fn load(&self) -> Result<(Identity, Certificate), TlsError> {
        let cert = read_pem("certificate", &self.cert, "BEGIN CERTIFICATE")?;
        let key = read_pem("private key", &self.key, "PRIVATE KEY")?;
        let ca = read_pem("CA certificate", &self.ca, "BEGIN CERTIFICATE")?;
        Ok((Identity::from_pem(cert, key), Certificate::from_pem(ca)))
    }

    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        require_tls13();
        let (identity, ca) = self.load()?;
        Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
    }

    /// `server_name` must be a name in the primary's certificate.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        require_tls13();
        let (identity, ca) = self.load()?;
        Ok(ClientTlsConfig::new()
            .identity(identity)
            .ca_certificate(ca)
            .domain_name(server_name))
    }
}

/// Makes TLS 1.3 the only version this process speaks. tonic builds both
/// ends' rustls configurations from the process's default crypto provider,
/// with TLS 1.2 allowed; a provider holding only TLS 1.3 cipher suites leaves
/// TLS 1.2 nothing to negotiate with. Must run before tonic installs its own
/// default (the first TLS configuration does it); later calls change nothing.
pub fn require_tls13() {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    // Err: a provider is already installed, ours by an earlier call.
    let _ = provider.install_default();
}

/// The files `generate` writes, by name.
pub const GENERATED: [&str; 5] = [
    "ca.pem",
    "primary.pem",
    "primary-key.pem",
    "standby.pem",
    "standby-key.pem",
];

/// Writes a fresh CA and primary and standby certificates into `out`. Both
/// leaves carry `names` (host names or IP addresses) so either side can be
/// dialed by them; keys are written with mode 0600.
pub fn generate(out: &Path, names: &[String]) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.into(),
        source,
    })?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Tandem pair CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    // Each leaf can serve and dial, so a promoted standby can become a
    // primary with the same files.
    let leaf = |role: &str| -> Result<(String, String), TlsError> {
        let mut p = CertificateParams::new(names.to_vec())?;
        p.distinguished_name
            .push(DnType::CommonName, format!("tandem {role}"));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (p_cert, p_key) = leaf("primary")?;
    let (s_cert, s_key) = leaf("standby")?;
    for (name, body, secret) in [
        ("ca.pem", ca_cert.pem(), false),
        ("primary.pem", p_cert, false),
        ("primary-key.pem", p_key, true),
        ("standby.pem", s_cert, false),
        ("standby-key.pem", s_key, true),
    ] {
        let path = out.join(name);
        write_private(&path, body.as_bytes(), secret)
            .map_err(|source| TlsError::Write { path, source })?;
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_loadable_files() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        for f in GENERATED {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        let files = TlsFiles {
            cert: dir.path().join("primary.pem"),
            key: dir.path().join("primary-key.pem"),
            ca: dir.path().join("ca.pem"),
        };
        files.server_config().unwrap();
        files.client_config("localhost").unwrap();
        let bad = TlsFiles {
            cert: dir.path().join("missing.pem"),
            ..files
        };
        assert!(matches!(bad.server_config(), Err(TlsError::Read { .. })));
    }
}
