//! Flag values that must not leak: a token or password, and a URL list that may carry
//! credentials. Wrapped so that `Debug` of the parsed command line (a panic message, a
//! stray `?args` in a log line) shows no secret.

use std::convert::Infallible;

use secrecy::SecretString;

use crate::registry::eureka::http::redact_urls;

/// clap value parser for a secret flag (token, password).
pub fn secret(value: &str) -> Result<SecretString, Infallible> {
    Ok(SecretString::from(value))
}

/// One or more service URLs, comma-separated, possibly with `user:password@` in them.
/// `Debug` shows them with the password replaced.
#[derive(Clone)]
pub struct UrlList(pub String);

impl std::str::FromStr for UrlList {
    type Err = Infallible;

    fn from_str(value: &str) -> Result<Self, Infallible> {
        Ok(Self(value.to_string()))
    }
}

impl std::fmt::Debug for UrlList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("UrlList")
            .field(&redact_urls(&self.0))
            .finish()
    }
}
