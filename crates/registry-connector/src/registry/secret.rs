//! A registry password given either inline (a flag or the environment) or as a file (a
//! mounted Kubernetes Secret), read once at start. Shared by the sources that take one
//! this way (Nacos, ZooKeeper), so that the rules are the same: one or the other, never
//! both; the file's surrounding whitespace (a trailing newline) is not part of it; the
//! value only ever lives in a [`SecretString`], which `Debug` prints redacted.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

/// Why the password could not be had. Never holds the password itself.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("give the {what} or a file holding it, not both")]
    Both { what: &'static str },
    #[error("reading the {what} file {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} file {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
}

/// The secret from `inline` or from `file` (trimmed), `None` when neither is given; an
/// empty inline value counts as not given (an unset variable in a manifest).
pub fn resolve(
    what: &'static str,
    inline: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, SecretError> {
    let inline = inline.filter(|v| !v.is_empty());
    match (inline, file) {
        (Some(_), Some(_)) => Err(SecretError::Both { what }),
        (Some(value), None) => Ok(Some(SecretString::from(value.to_string()))),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })?;
            let text = text.trim();
            if text.is_empty() {
                return Err(SecretError::Empty {
                    what,
                    path: path.to_path_buf(),
                });
            }
            Ok(Some(SecretString::from(text.to_string())))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn inline_or_file_never_both() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").expect("write");
        let read = |inline: Option<&str>, file: Option<&Path>| {
            resolve("password", inline, file).map(|s| s.map(|s| s.expose_secret().to_string()))
        };
        assert_eq!(read(Some("a"), None).unwrap().as_deref(), Some("a"));
        assert_eq!(read(None, Some(&file)).unwrap().as_deref(), Some("s3cret"));
        assert_eq!(read(Some(""), None).unwrap(), None);
        assert_eq!(read(None, None).unwrap(), None);
        assert!(matches!(
            read(Some("a"), Some(&file)),
            Err(SecretError::Both { .. })
        ));
        let missing = dir.path().join("missing");
        let err = read(None, Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        std::fs::write(&file, " \n").expect("write");
        assert!(matches!(
            read(None, Some(&file)),
            Err(SecretError::Empty { .. })
        ));
    }
}
