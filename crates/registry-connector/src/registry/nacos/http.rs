//! The two things this client does over Nacos's HTTP API: log in (`POST
//! /nacos/v1/auth/login` → an access token the gRPC requests carry) and, for `--nacos-groups
//! '*'`, list every group's services (`GET /nacos/v1/ns/catalog/services`, the console's
//! listing: the gRPC `ServiceListRequest` needs a group, and Nacos 2.3 offers no request
//! that lists groups).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;

use super::error::NacosError;
use super::metrics::NacosMetrics;

/// The header carrying the access token. Nacos reads it before the query parameter of
/// the same name; in the URL the token would show in every logged request error
/// (reqwest's errors print their URL), in proxies' logs and in Nacos's access log.
const ACCESS_TOKEN: &str = "accessToken";

/// The token as a header value, marked sensitive (never printed by `Debug`).
fn token_header(token: &SecretString) -> Result<http::HeaderValue, NacosError> {
    let mut value = http::HeaderValue::from_str(token.expose_secret()).map_err(|_| {
        NacosError::Config("the Nacos access token is not a valid header value".into())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The HTTP side of one source.
#[derive(Clone)]
pub struct NacosHttp {
    client: reqwest::Client,
}

/// A token and when it should be replaced.
pub struct Login {
    pub token: SecretString,
    pub refresh_at: Instant,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginAnswer {
    access_token: String,
    /// Seconds.
    #[serde(default)]
    token_ttl: Option<u64>,
}

/// One page of the catalog listing.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CatalogPage {
    /// Services in all pages.
    pub count: i64,
    pub service_list: Vec<CatalogService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CatalogService {
    pub name: String,
    pub group_name: String,
}

impl NacosHttp {
    pub fn new(timeout: Duration) -> Result<Self, NacosError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|source| NacosError::Http {
                what: "client",
                url: String::new(),
                source,
            })?;
        Ok(Self { client })
    }

    /// Logs in at `addr` (`host:port` of the HTTP API). The token is replaced after
    /// 90 % of its lifetime, as Nacos's clients do.
    pub async fn login(
        &self,
        addr: &str,
        username: &str,
        password: &SecretString,
        metrics: &NacosMetrics,
    ) -> Result<Login, NacosError> {
        let url = format!("http://{addr}/nacos/v1/auth/login");
        let result = async {
            let answer = self
                .client
                .post(&url)
                .header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(form(&[
                    ("username", username),
                    ("password", password.expose_secret()),
                ]))
                .send()
                .await
                .map_err(|source| NacosError::Http {
                    what: "login",
                    url: url.clone(),
                    source: source.without_url(),
                })?;
            let answer: LoginAnswer = checked("login", &url, answer).await?;
            let ttl = Duration::from_secs(answer.token_ttl.unwrap_or(18_000).max(10));
            Ok(Login {
                token: SecretString::from(answer.access_token),
                refresh_at: Instant::now() + ttl.mul_f64(0.9),
            })
        }
        .await;
        metrics.record("login", result.is_ok());
        result
    }

    /// One page (1-based) of every group's services in `namespace`.
    pub async fn catalog_page(
        &self,
        addr: &str,
        namespace: &str,
        page_no: u32,
        page_size: u32,
        token: Option<&SecretString>,
        metrics: &NacosMetrics,
    ) -> Result<CatalogPage, NacosError> {
        let url = format!("http://{addr}/nacos/v1/ns/catalog/services");
        let page = page_no.to_string();
        let size = page_size.to_string();
        let query = [
            ("namespaceId", namespace),
            ("pageNo", page.as_str()),
            ("pageSize", size.as_str()),
            ("groupNameParam", ""),
            ("serviceNameParam", ""),
            ("hasIpCount", "false"),
            ("withInstances", "false"),
        ];
        let result = async {
            let mut request = self.client.get(format!("{url}?{}", form(&query)));
            if let Some(token) = token {
                request = request.header(ACCESS_TOKEN, token_header(token)?);
            }
            let answer = request.send().await.map_err(|source| NacosError::Http {
                what: "catalog listing",
                url: url.clone(),
                source: source.without_url(),
            })?;
            checked("catalog listing", &url, answer).await
        }
        .await;
        metrics.record("catalog_services", result.is_ok());
        result
    }
}

/// `k=v&k=v`, percent-encoded (reqwest's `form`/`query` features are off in this
/// workspace).
fn form(pairs: &[(&str, &str)]) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, NON_ALPHANUMERIC),
                utf8_percent_encode(v, NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

async fn checked<T: serde::de::DeserializeOwned>(
    what: &'static str,
    url: &str,
    answer: reqwest::Response,
) -> Result<T, NacosError> {
    let status = answer.status();
    let body = answer.bytes().await.map_err(|source| NacosError::Http {
        what,
        url: url.to_string(),
        source: source.without_url(),
    })?;
    if !status.is_success() {
        return Err(NacosError::HttpStatus {
            what,
            url: url.to_string(),
            status: status.as_u16(),
            body: crate::registry::error_body(&body),
        });
    }
    serde_json::from_slice(&body).map_err(|source| NacosError::Decode { kind: what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_percent_encoded() {
        assert_eq!(form(&[("a", "x y&z"), ("b", "")]), "a=x%20y%26z&b=");
    }

    /// The token travels in a header, and errors print no URL with a query: whatever
    /// fails, its text (which is logged) never holds the token.
    #[tokio::test]
    async fn the_token_never_shows_in_an_error() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let http = NacosHttp::new(Duration::from_secs(2)).expect("client");
        let token = SecretString::from("tok-5f3e9a".to_string());
        let err = http
            .catalog_page(
                &addr,
                "public",
                1,
                500,
                Some(&token),
                &NacosMetrics::default(),
            )
            .await
            .expect_err("nothing listens there");
        let text = crate::registry::error_chain(&err).to_string();
        assert!(text.contains("catalog listing"), "{text}");
        assert!(!text.contains("tok-5f3e9a"), "{text}");
        assert!(!format!("{err:?}").contains("tok-5f3e9a"));
    }

    #[test]
    fn the_catalog_answer_decodes() {
        let page: CatalogPage = serde_json::from_str(
            r#"{"count":2,"serviceList":[{"name":"orders","groupName":"G1","clusterCount":0,"ipCount":1,"healthyInstanceCount":1,"triggerFlag":"false"},{"name":"providers:com.example.OrderService:1.0.0:","groupName":"DEFAULT_GROUP"}]}"#,
        )
        .expect("decodes");
        assert_eq!(page.count, 2);
        assert_eq!(page.service_list[1].group_name, "DEFAULT_GROUP");
        let login: LoginAnswer =
            serde_json::from_str(r#"{"accessToken":"t","tokenTtl":18000,"globalAdmin":true}"#)
                .expect("decodes");
        assert_eq!(login.token_ttl, Some(18000));
    }
}
