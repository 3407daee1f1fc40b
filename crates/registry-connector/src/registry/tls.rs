//! TLS material for a registry's HTTP client: a CA bundle to trust instead of the system
//! roots, and a client certificate for mutual TLS. Every source reads the same kind of
//! PEM files the same way; each maps [`TlsFileError`] into its own error type.

use std::path::{Path, PathBuf};

/// What went wrong with a TLS file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read the {what} file {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what}")]
    Invalid {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// `builder` trusting only the CA certificates in `ca_file` (when given) and presenting
/// the client certificate and key (when given; both or neither).
pub fn with_tls_files(
    mut builder: reqwest::ClientBuilder,
    ca_file: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
) -> Result<reqwest::ClientBuilder, TlsFileError> {
    if let Some(ca) = ca_file {
        let pem = read_file("CA", ca)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
            TlsFileError::Invalid {
                what: "CA file",
                source,
            }
        })?;
        if certs.is_empty() {
            return Err(TlsFileError::Config(format!(
                "the CA file {} holds no certificate",
                ca.display()
            )));
        }
        builder = builder.tls_certs_only(certs);
    }
    match (client_cert, client_key) {
        (Some(cert), Some(key)) => {
            let mut pem = read_file("client certificate", cert)?;
            pem.push(b'\n');
            pem.extend(read_file("client key", key)?);
            let identity =
                reqwest::Identity::from_pem(&pem).map_err(|source| TlsFileError::Invalid {
                    what: "client certificate or key",
                    source,
                })?;
            builder = builder.identity(identity);
        }
        (None, None) => {}
        _ => {
            return Err(TlsFileError::Config(
                "a client certificate needs both the certificate and the key file".into(),
            ))
        }
    }
    Ok(builder)
}

/// Reads a file named in the configuration (TLS material, a token or password file).
pub fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_refused_with_their_reason() {
        let dir = std::env::temp_dir().join(format!("rc-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a pem").expect("write");
        let builder = || reqwest::Client::builder();
        assert!(matches!(
            with_tls_files(builder(), Some(&dir.join("missing")), None, None),
            Err(TlsFileError::Read { what: "CA", .. })
        ));
        assert!(with_tls_files(builder(), Some(&junk), None, None).is_err());
        assert!(matches!(
            with_tls_files(builder(), None, Some(&junk), None),
            Err(TlsFileError::Config(_))
        ));
        assert!(with_tls_files(builder(), None, None, None).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
