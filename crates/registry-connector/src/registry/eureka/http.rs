//! The HTTP side of the Eureka source: the service URLs (with failover between peers),
//! basic auth, TLS, JSON `Accept`, timeouts and counting every request.
//!
//! The writes of the Kubernetes → Eureka direction (register, status overrides, lease
//! renewals, cancels) go through the same client, so they share the failover, the
//! credentials, TLS, the timeouts and the request counters of the reads.
//!
//! Does not retry (the poll loop and the export engine do, with backoff) and decides
//! nothing about the registry's content.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, Url};

use super::api::{self, Applications};
use super::config::EurekaConfig;
use super::delta::{self, DecodedDelta, DeltaMemo};
use super::error::EurekaError;
use super::metrics::{Endpoint, EurekaMetrics};

/// An answer's body as a blocking reader, fed chunk by chunk by the task that reads it
/// (see [`EurekaHttp::fetch_streamed`]). Written here rather than taken from tokio-util's
/// `SyncIoBridge`: that polls the body, and reqwest's timeout timer with it, from the
/// blocking thread, which stalled reads for seconds and panics when the runtime stops
/// during a read. Here every poll stays on the runtime; the reader only waits on a
/// channel, which ends (as an end of input) when the reading task is dropped.
pub struct BodyReader {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use bytes::Buf;
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// What a write request answered, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 2xx: done.
    Done,
    /// 404: the peer does not hold the application or the instance.
    NotFound,
}

#[derive(Clone)]
struct Credentials {
    username: String,
    password: Option<String>,
}

/// The Eureka HTTP client of one source.
#[derive(Clone)]
pub struct EurekaHttp {
    client: reqwest::Client,
    /// Service URLs without credentials, each ending in `/`.
    urls: Arc<[Url]>,
    /// The URL in use; moves to the next peer after a failed request, as Eureka clients
    /// fail over.
    current: Arc<AtomicUsize>,
    /// Basic-auth credentials for each URL (same index): a password given in one URL is
    /// never sent to another peer.
    credentials: Arc<[Option<Credentials>]>,
    timeout: std::time::Duration,
    metrics: Arc<EurekaMetrics>,
}

impl std::fmt::Debug for EurekaHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EurekaHttp")
            .field(
                "urls",
                &self.urls.iter().map(Url::as_str).collect::<Vec<_>>(),
            )
            .field(
                "usernames",
                &self
                    .credentials
                    .iter()
                    .map(|c| c.as_ref().map(|c| c.username.as_str()))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl EurekaHttp {
    /// Parses the URLs, reads the password and TLS files, builds the client.
    pub fn new(cfg: &EurekaConfig, metrics: Arc<EurekaMetrics>) -> Result<Self, EurekaError> {
        let parsed = parse_service_urls(&cfg.service_urls)?;
        let password = match (&cfg.password, &cfg.password_file) {
            (Some(p), _) if !p.is_empty() => Some(p.clone()),
            (_, Some(file)) => Some(read_secret(file)?),
            _ => None,
        };
        let flag_user = cfg
            .username
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty());
        // The flags apply to every URL; otherwise each URL keeps its own user, with the
        // flag password (if any) standing in for a password the URL lacks.
        let credentials = parsed
            .iter()
            .map(|(_, in_url)| match (flag_user, in_url) {
                (Some(user), _) => Ok(Some(Credentials {
                    username: user.to_string(),
                    password: password.clone(),
                })),
                (None, Some(c)) => Ok(Some(Credentials {
                    username: c.username.clone(),
                    password: password.clone().or_else(|| c.password.clone()),
                })),
                (None, None) if password.is_some() => Err(EurekaError::Config(
                    "a password was given without a user name (neither --eureka-username nor \
                     one in the URL)"
                        .into(),
                )),
                (None, None) => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .user_agent(concat!("registry-connector/", env!("CARGO_PKG_VERSION")));
        builder = crate::registry::tls::with_tls_files(
            builder,
            cfg.ca_file.as_deref(),
            cfg.client_cert_file.as_deref(),
            cfg.client_key_file.as_deref(),
        )?;
        Ok(Self {
            client: builder.build().map_err(EurekaError::Client)?,
            urls: parsed.into_iter().map(|(url, _)| url).collect(),
            current: Arc::default(),
            credentials: credentials.into(),
            timeout: cfg.request_timeout,
            metrics,
        })
    }

    /// Which of the service URLs the next request goes to; changes on failover.
    pub fn peer(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.urls.len()
    }

    /// The URL the next request goes to (no credentials in it).
    pub fn current_url(&self) -> &Url {
        &self.urls[self.peer()]
    }

    /// `GET apps/`: the whole registry, decoded as it arrives, with the memo of its
    /// entries (see [`DeltaMemo`]).
    pub async fn apps(&self) -> Result<DecodedDelta, EurekaError> {
        let index = self.peer();
        let url = join(&self.urls[index], &["apps", ""]);
        let result = self
            .fetch_streamed(url, self.credentials[index].as_ref(), |body| {
                delta::read_delta(body, &DeltaMemo::default())
            })
            .await;
        self.finish(Endpoint::Apps, index, result)
    }

    /// `GET apps/delta`: the changes of the last few minutes, and the hash code of the
    /// server's whole registry.
    pub async fn delta(&self) -> Result<Applications, EurekaError> {
        self.get(
            Endpoint::Delta,
            &["apps", "delta"],
            api::decode_applications,
        )
        .await
    }

    /// `GET /apps/delta` decoded as it arrives, only the entries that `last` did not
    /// hold (see [`DeltaMemo`]).
    pub async fn delta_since(&self, last: Arc<DeltaMemo>) -> Result<DecodedDelta, EurekaError> {
        let index = self.peer();
        let url = join(&self.urls[index], &["apps", "delta"]);
        let result = self
            .fetch_streamed(url, self.credentials[index].as_ref(), move |body| {
                delta::read_delta(body, &last)
            })
            .await;
        self.finish(Endpoint::Delta, index, result)
    }

    /// `GET apps/` decoded by `decode` (the writer reads other fields than the source).
    pub async fn apps_with<T>(
        &self,
        decode: impl FnOnce(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<T, EurekaError> {
        self.get(Endpoint::Apps, &["apps", ""], decode).await
    }

    /// `POST apps/{app}` with `body` (`{"instance": {...}}`): registers or replaces an
    /// instance. Eureka answers 204.
    pub async fn register(&self, app: &str, body: &serde_json::Value) -> Result<(), EurekaError> {
        let url = || join(self.current_url(), &["apps", app]).to_string();
        let body = serde_json::to_vec(body)
            .map_err(|source| EurekaError::Encode { url: url(), source })?;
        match self
            .write(
                Endpoint::Register,
                Method::POST,
                &["apps", app],
                &[],
                Some(body),
            )
            .await?
        {
            Answer::Done => Ok(()),
            // No Eureka server answers a registration so; a proxy in front of one may.
            Answer::NotFound => Err(EurekaError::Status {
                method: "POST",
                url: url(),
                status: 404,
                body: String::new(),
            }),
        }
    }

    /// `PUT apps/{app}/{id}?status=..&lastDirtyTimestamp=..`: renews the lease, with the
    /// parameters Eureka clients send. [`Answer::NotFound`] asks for a registration (the
    /// server forgot the instance, or holds an older copy of it).
    pub async fn renew(
        &self,
        app: &str,
        id: &str,
        status: &str,
        last_dirty: Option<i64>,
    ) -> Result<Answer, EurekaError> {
        let dirty = last_dirty.map(|d| d.to_string());
        let mut query = vec![("status", status)];
        if let Some(dirty) = &dirty {
            query.push(("lastDirtyTimestamp", dirty));
        }
        self.write(
            Endpoint::Heartbeat,
            Method::PUT,
            &["apps", app, id],
            &query,
            None,
        )
        .await
    }

    /// `PUT apps/{app}/{id}/status?value=STATUS`: sets a status override.
    pub async fn set_status(
        &self,
        app: &str,
        id: &str,
        status: &str,
    ) -> Result<Answer, EurekaError> {
        self.write(
            Endpoint::StatusOverride,
            Method::PUT,
            &["apps", app, id, "status"],
            &[("value", status)],
            None,
        )
        .await
    }

    /// `DELETE apps/{app}/{id}/status?value=STATUS`: removes the status override (if
    /// there is one) and leaves the instance at `status`.
    pub async fn delete_status_override(
        &self,
        app: &str,
        id: &str,
        status: &str,
    ) -> Result<Answer, EurekaError> {
        self.write(
            Endpoint::StatusOverrideDelete,
            Method::DELETE,
            &["apps", app, id, "status"],
            &[("value", status)],
            None,
        )
        .await
    }

    /// `DELETE apps/{app}/{id}`: cancels the instance's lease (deregisters it).
    pub async fn cancel(&self, app: &str, id: &str) -> Result<Answer, EurekaError> {
        self.write(
            Endpoint::Cancel,
            Method::DELETE,
            &["apps", app, id],
            &[],
            None,
        )
        .await
    }

    /// One write request to the current peer; a failure (no answer, an error status other
    /// than 404) moves the next request to the next peer, as a read's does. A 404 is an
    /// answer, not a failure: the peer does not hold the instance.
    async fn write(
        &self,
        endpoint: Endpoint,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, EurekaError> {
        let index = self.peer();
        let mut url = join(&self.urls[index], segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let result = self
            .send(method, url, self.credentials[index].as_ref(), body)
            .await;
        // Requests count as ok when they did what was asked; a 404 counts as ok only
        // for a cancel (the instance is gone either way).
        let ok = match &result {
            Ok(Answer::Done) => true,
            Ok(Answer::NotFound) => endpoint == Endpoint::Cancel,
            Err(_) => false,
        };
        self.metrics.record(endpoint, ok);
        if result.is_err() {
            self.fail_over(index);
        }
        result
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        credentials: Option<&Credentials>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, EurekaError> {
        let name = method_name(&method);
        let shown = url.to_string();
        let mut request = self
            .client
            .request(method, url)
            .timeout(self.timeout)
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body);
        }
        if let Some(c) = credentials {
            request = request.basic_auth(&c.username, c.password.as_deref());
        }
        let request_error = |source| EurekaError::Request {
            method: name,
            url: shown.clone(),
            source,
        };
        let response = request.send().await.map_err(request_error)?;
        let status = response.status();
        let body = response.bytes().await.map_err(request_error)?;
        if status.is_success() {
            Ok(Answer::Done)
        } else if status == reqwest::StatusCode::NOT_FOUND {
            Ok(Answer::NotFound)
        } else {
            Err(EurekaError::Status {
                method: name,
                url: shown,
                status: status.as_u16(),
                body: crate::registry::error_body(&body),
            })
        }
    }

    /// Moves the next request to the peer after `index` (compare-and-swap, so that two
    /// failures of one peer move on once).
    fn fail_over(&self, index: usize) {
        if self.urls.len() > 1 {
            let _ = self.current.compare_exchange(
                index,
                (index + 1) % self.urls.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    async fn get<T>(
        &self,
        endpoint: Endpoint,
        segments: &[&str],
        decode: impl FnOnce(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<T, EurekaError> {
        let index = self.peer();
        let url = join(&self.urls[index], segments);
        let result = self
            .fetch(url, self.credentials[index].as_ref(), decode)
            .await;
        self.finish(endpoint, index, result)
    }

    /// Counts a read and moves to the next peer when it failed.
    fn finish<T>(
        &self,
        endpoint: Endpoint,
        index: usize,
        result: Result<T, EurekaError>,
    ) -> Result<T, EurekaError> {
        self.metrics.record(endpoint, result.is_ok());
        // A refused delta is not this peer failing: the full read that follows asks the
        // same peer whether it serves `/apps` (deltas off) or refuses everything.
        let peer_failed = match &result {
            Ok(_) => false,
            Err(e) => !(endpoint == Endpoint::Delta && e.is_refusal()),
        };
        if peer_failed {
            self.fail_over(index);
        }
        result
    }

    async fn fetch<T>(
        &self,
        url: Url,
        credentials: Option<&Credentials>,
        decode: impl FnOnce(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<T, EurekaError> {
        let shown = url.to_string();
        let response = self.answer(url, credentials).await?;
        let body = response
            .bytes()
            .await
            .map_err(|source| EurekaError::Request {
                method: "GET",
                url: shown.clone(),
                source,
            })?;
        decode(&body).map_err(|source| EurekaError::Decode { url: shown, source })
    }

    /// `GET url` with the body decoded by `decode` while it is read, on a blocking
    /// thread: serde_json reads from `std::io::Read` only, and tokio-util's bridge turns
    /// the body's stream into one. A registry read is never held whole (25 MB of JSON at
    /// 30,000 instances, beside what it decodes to). The request's timeout still covers
    /// the whole body.
    async fn fetch_streamed<T: Send + 'static>(
        &self,
        url: Url,
        credentials: Option<&Credentials>,
        decode: impl FnOnce(std::io::BufReader<BodyReader>) -> Result<T, serde_json::Error>
            + Send
            + 'static,
    ) -> Result<T, EurekaError> {
        let shown = url.to_string();
        let mut response = self.answer(url, credentials).await?;
        // A few chunks in flight between the reader and the decoder, no more.
        let (tx, chunks) = tokio::sync::mpsc::channel(4);
        let reader = BodyReader {
            chunks,
            current: bytes::Bytes::new(),
        };
        let decoder = tokio::task::spawn_blocking(move || {
            decode(std::io::BufReader::with_capacity(16 * 1024, reader))
        });
        let mut read_error = None;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    // The decoder stopped (the body is not what it reads): stop too.
                    if tx.send(Ok(chunk)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx
                        .send(Err(std::io::Error::other("the answer was cut short")))
                        .await;
                    read_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let decoded = decoder.await;
        if let Some(source) = read_error {
            return Err(EurekaError::Request {
                method: "GET",
                url: shown,
                source,
            });
        }
        match decoded {
            Ok(result) => result.map_err(|source| EurekaError::Decode { url: shown, source }),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(EurekaError::DecodeCancelled { url: shown }),
        }
    }

    /// `GET url`, answered with a success status (an error status becomes an error, with
    /// the start of its body).
    async fn answer(
        &self,
        url: Url,
        credentials: Option<&Credentials>,
    ) -> Result<reqwest::Response, EurekaError> {
        let shown = url.to_string();
        let mut request = self
            .client
            .get(url)
            .timeout(self.timeout)
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(c) = credentials {
            request = request.basic_auth(&c.username, c.password.as_deref());
        }
        let request_error = |source| EurekaError::Request {
            method: "GET",
            url: shown.clone(),
            source,
        };
        let response = request.send().await.map_err(request_error)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.map_err(request_error)?;
            return Err(EurekaError::Status {
                method: "GET",
                url: shown,
                status: status.as_u16(),
                body: crate::registry::error_body(&body),
            });
        }
        Ok(response)
    }
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "GET",
    }
}

/// `base` with `segments` appended (percent-encoded).
fn join(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Splits a comma-separated `defaultZone`-style list into URLs ending in `/`, each with
/// the credentials it carried (removed from the URL).
fn parse_service_urls(list: &str) -> Result<Vec<(Url, Option<Credentials>)>, EurekaError> {
    let mut out = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let invalid = |reason: &str| EurekaError::InvalidUrl {
            url: redact_urls(raw),
            reason: reason.to_string(),
        };
        let mut url = Url::parse(raw).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "no query or fragment allowed (a '?' or '#' in a password must be \
                 percent-encoded)",
            ));
        }
        if url.path().contains('@') {
            // `http://user:pa/ss@host` parses as host `user` and path `/ss@host`.
            return Err(invalid(
                "an '@' in the path (a '/' in a password must be percent-encoded)",
            ));
        }
        let credentials = (!url.username().is_empty()).then(|| Credentials {
            username: percent_decode(url.username()),
            password: url.password().map(percent_decode),
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        out.push((url, credentials));
    }
    if out.is_empty() {
        return Err(EurekaError::InvalidUrl {
            url: list.to_string(),
            reason: "no URL given".into(),
        });
    }
    Ok(out)
}

/// The URL list with any password replaced, for logs and debug output.
pub fn redact_urls(list: &str) -> String {
    list.split(',')
        .map(|raw| {
            let raw = raw.trim();
            match Url::parse(raw) {
                Ok(mut url) if url.password().is_some() => {
                    let _ = url.set_password(Some("redacted"));
                    url.to_string()
                }
                // A user name alone may be a token.
                Ok(mut url) if !url.username().is_empty() => {
                    let _ = url.set_username("redacted");
                    url.to_string()
                }
                // An '@' the parser did not take for userinfo: a password with an
                // unencoded '/', '?' or '#', or a URL without its scheme. Whatever
                // precedes the last '@' may be a secret.
                _ if raw.contains('@') => redact_before_last_at(raw),
                Ok(url) => url.to_string(),
                Err(_) => raw.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `scheme://<redacted>@rest` (or `<redacted>@rest` without a scheme).
fn redact_before_last_at(raw: &str) -> String {
    let at = raw.rfind('@').unwrap_or(0);
    let scheme = raw[..at]
        .find("://")
        .map(|end| &raw[..end + 3])
        .unwrap_or("");
    format!("{scheme}<redacted>{}", &raw[at..])
}

/// Userinfo in a URL is percent-encoded (`svc%40corp`); the header wants it plain.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

fn read_secret(path: &Path) -> Result<String, EurekaError> {
    let bytes = crate::registry::tls::read_file("password", path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        EurekaError::Config(format!("the password file {} is not UTF-8", path.display()))
    })?;
    Ok(text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(urls: &str) -> EurekaHttp {
        EurekaHttp::new(&EurekaConfig::new(urls), Arc::default()).expect("builds")
    }

    #[test]
    fn service_urls_are_normalised_and_joined() {
        let h = http(" http://127.0.0.1:8761/eureka , https://peer:8443/eureka/");
        assert_eq!(h.urls.len(), 2);
        assert_eq!(h.current_url().as_str(), "http://127.0.0.1:8761/eureka/");
        assert_eq!(
            join(h.current_url(), &["apps", ""]).as_str(),
            "http://127.0.0.1:8761/eureka/apps/"
        );
        assert_eq!(
            join(&h.urls[1], &["apps", "delta"]).as_str(),
            "https://peer:8443/eureka/apps/delta"
        );
        assert_eq!(
            join(&http("http://e:8761").urls[0], &["apps", "delta"]).as_str(),
            "http://e:8761/apps/delta"
        );
    }

    #[test]
    fn bad_urls_are_refused_with_the_password_hidden() {
        for bad in [
            "",
            " , ",
            "eureka:8761",
            "ftp://e/eureka",
            "http://e/eureka?x=1",
        ] {
            assert!(
                matches!(
                    EurekaHttp::new(&EurekaConfig::new(bad), Arc::default()),
                    Err(EurekaError::InvalidUrl { .. })
                ),
                "{bad:?}"
            );
        }
        let err = EurekaHttp::new(
            &EurekaConfig::new("gopher://u:hunter2@e/eureka"),
            Arc::default(),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn credentials_come_from_the_url_or_the_flags() {
        let h = http("http://svc%40corp:p%3Ass@e:8761/eureka,http://other:8761/eureka");
        let c = h.credentials[0].clone().expect("from the URL");
        assert_eq!(c.username, "svc@corp");
        assert_eq!(c.password.as_deref(), Some("p:ss"));
        assert!(h.credentials[1].is_none(), "never sent to another peer");
        assert!(!h.current_url().as_str().contains("p%3Ass"));
        assert!(!format!("{h:?}").contains("p%3Ass"));

        let cfg = EurekaConfig {
            username: Some("flag-user".into()),
            password: Some("flag-pass".into()),
            ..EurekaConfig::new("http://u:p@e/eureka,http://f/eureka")
        };
        let h = EurekaHttp::new(&cfg, Arc::default()).expect("builds");
        for c in h.credentials.iter() {
            let c = c.clone().expect("from the flags, for every URL");
            assert_eq!(
                (c.username.as_str(), c.password.as_deref()),
                ("flag-user", Some("flag-pass"))
            );
        }

        // A user in the URL, the password from the environment (as the chart sets it).
        let cfg = EurekaConfig {
            password: Some("from-secret".into()),
            ..EurekaConfig::new("http://svc@e/eureka")
        };
        let h = EurekaHttp::new(&cfg, Arc::default()).expect("builds");
        let c = h.credentials[0].clone().expect("combined");
        assert_eq!(
            (c.username.as_str(), c.password.as_deref()),
            ("svc", Some("from-secret"))
        );

        let cfg = EurekaConfig {
            password: Some("orphan".into()),
            ..EurekaConfig::default()
        };
        assert!(matches!(
            EurekaHttp::new(&cfg, Arc::default()),
            Err(EurekaError::Config(_))
        ));
    }

    #[test]
    fn an_at_sign_the_parser_did_not_take_for_userinfo_is_redacted() {
        for (raw, secret) in [
            ("http://svc:2024/Secret@eureka:8761/eureka", "Secret"),
            ("http://svc:pa?ss@eureka:8761/eureka", "pa?ss"),
            ("svc:hunter2@eureka:8761/eureka", "hunter2"),
        ] {
            let shown = redact_urls(raw);
            assert!(!shown.contains(secret), "{raw} shown as {shown}");
            assert!(shown.ends_with("@eureka:8761/eureka"), "{shown}");
            let err = EurekaHttp::new(&EurekaConfig::new(raw), Arc::default())
                .expect_err("refused")
                .to_string();
            assert!(!err.contains(secret), "{err}");
        }
        assert_eq!(
            redact_urls("http://svc:2024/Secret@eureka:8761/eureka"),
            "http://<redacted>@eureka:8761/eureka"
        );
    }

    #[test]
    fn redaction_keeps_the_rest_of_the_url() {
        assert_eq!(
            redact_urls("http://TOKEN@e:8761/eureka"),
            "http://redacted@e:8761/eureka"
        );
        assert_eq!(
            redact_urls("http://u:secret@e:8761/eureka,http://f/eureka"),
            "http://u:redacted@e:8761/eureka,http://f/eureka"
        );
    }
}
