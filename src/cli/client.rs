//! The CLI's HTTP client: one call per API request, the API's `{"error": ...}` turned into a [`CliError`].

use super::Settings;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API answered 404, or a name matched nothing.
    #[error("{0}")]
    NotFound(String),
    /// The API refused or failed: its own `error` text.
    #[error("{message}")]
    Api { status: u16, message: String },
    /// The daemon could not be reached, or answered something that is not the API.
    #[error("{0}")]
    Transport(String),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NotFound(_) => super::EXIT_NOT_FOUND,
            _ => super::EXIT_FAILURE,
        }
    }
}

/// One answer of the API: the body exactly as sent (for `--json`), checked
/// to be JSON, and parsed when first asked for (`--json` prints the text and
/// never needs the tree: 10,000 VMs are 4 MB of it).
pub struct Answer {
    pub text: String,
    parsed: std::cell::OnceCell<Value>,
}

impl Answer {
    /// The answer as a JSON value.
    pub fn json(&self) -> &Value {
        self.parsed.get_or_init(|| {
            // `send` checked it is JSON: this cannot fail.
            serde_json::from_str(&self.text).unwrap_or(Value::Null)
        })
    }
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    pub fn new(settings: Settings) -> Result<Client, CliError> {
        let http = reqwest::Client::builder()
            // No overall timeout: a snapshot or an upload takes as long as it takes.
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CliError::Other(format!("making the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: settings.url,
            key: settings.api_key,
        })
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r
    }

    /// Sends a request and reads the whole answer; a non-2xx status is an error.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer, CliError> {
        let resp = self.start(req).await?;
        let text = resp
            .text()
            .await
            .map_err(|e| CliError::Transport(format!("reading the answer: {e}")))?;
        // Checked without building the tree.
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|_| {
            CliError::Transport(format!(
                "{} did not answer with JSON (is it a hatch daemon?)",
                self.base
            ))
        })?;
        Ok(Answer {
            text,
            parsed: std::cell::OnceCell::new(),
        })
    }

    /// Sends a request and hands back the response once its status is a success.
    pub async fn start(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, CliError> {
        let resp = req.send().await.map_err(|e| {
            CliError::Transport(format!(
                "cannot reach the hatch API at {}: {}",
                self.base,
                error_chain(&e)
            ))
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(self.refusal(status, &body))
    }

    /// A non-2xx answer as the error the user sees.
    fn refusal(&self, status: StatusCode, body: &str) -> CliError {
        match api_error(status, body) {
            CliError::Api { status: 401, message } if self.key.is_none() => CliError::Api {
                status: 401,
                message: format!("{message} (no key given: set HATCH_API_KEY, --api-key or api_key in the config file)"),
            },
            e => e,
        }
    }

    /// Opens a WebSocket on `path` (the base's `http` becomes `ws`, `https`
    /// `wss`), with the key in the handshake. A refused handshake is the
    /// API's error, as for any other call.
    pub async fn websocket(
        &self,
        path: &str,
        query: &[(String, String)],
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        CliError,
    > {
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::header, Error};
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| CliError::Other(format!("the API address {}: {e}", self.base)))?;
        url.query_pairs_mut().extend_pairs(query);
        let scheme = match url.scheme() {
            "http" => "ws",
            "https" => "wss",
            other => {
                return Err(CliError::Other(format!(
                    "the API address {} is {other}:, not http: or https:",
                    self.base
                )))
            }
        };
        url.set_scheme(scheme)
            .map_err(|()| CliError::Other(format!("the API address {}", self.base)))?;
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| CliError::Other(format!("the WebSocket request: {e}")))?;
        if let Some(k) = &self.key {
            let value = format!("Bearer {k}")
                .parse()
                .map_err(|_| CliError::Other("the API key is not a valid header value".into()))?;
            req.headers_mut().insert(header::AUTHORIZATION, value);
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(ws),
            Err(Error::Http(resp)) => {
                let status =
                    StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let body = resp.body().as_deref().map(String::from_utf8_lossy);
                Err(self.refusal(status, body.as_deref().unwrap_or_default()))
            }
            Err(e) => Err(CliError::Transport(format!(
                "cannot reach the hatch API at {}: {}",
                self.base,
                error_chain(&e)
            ))),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Answer, CliError> {
        self.send(self.request(Method::GET, path)).await
    }

    /// A GET with query parameters, each encoded.
    pub async fn get_query(
        &self,
        path: &str,
        query: &[(String, String)],
    ) -> Result<Answer, CliError> {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| CliError::Other(format!("the API address {}: {e}", self.base)))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut r = self.http.get(url);
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        self.send(r).await
    }

    pub async fn delete(&self, path: &str) -> Result<Answer, CliError> {
        self.send(self.request(Method::DELETE, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Answer, CliError> {
        self.send(self.request(Method::POST, path).json(body)).await
    }
}

/// The API's own error text when it sent one, else the status.
fn api_error(status: StatusCode, body: &str) -> CliError {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| format!("the API answered {status}"));
    if status == StatusCode::NOT_FOUND {
        CliError::NotFound(message)
    } else {
        CliError::Api {
            status: status.as_u16(),
            message,
        }
    }
}

/// reqwest's error with its causes ("error sending request: ... Connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apis_error_text_is_the_message_and_404_is_not_found() {
        let e = api_error(StatusCode::CONFLICT, r#"{"error":"vm is stopped"}"#);
        assert!(matches!(&e, CliError::Api { status: 409, .. }), "{e:?}");
        assert_eq!(e.to_string(), "vm is stopped");
        assert_eq!(e.exit_code(), super::super::EXIT_FAILURE);
        let e = api_error(StatusCode::NOT_FOUND, r#"{"error":"vm not found"}"#);
        assert_eq!(e.to_string(), "vm not found");
        assert_eq!(e.exit_code(), super::super::EXIT_NOT_FOUND);
        let e = api_error(StatusCode::BAD_GATEWAY, "<html>");
        assert_eq!(e.to_string(), "the API answered 502 Bad Gateway");
    }

    /// A server on loopback that answers every connection with `200` and `body`.
    async fn answering(body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn an_answer_that_is_not_json_is_an_error_and_json_is_kept_as_sent() {
        let client = |url: String| Client::new(Settings { url, api_key: None }).unwrap();
        let e = client(answering("hello, not JSON").await)
            .get("/vms")
            .await
            .err()
            .expect("a body that is not JSON is refused");
        assert!(e.to_string().contains("did not answer with JSON"), "{e}");
        // Truncated JSON is not JSON either.
        let e = client(answering(r#"[{"id": "vm_1""#).await)
            .get("/vms")
            .await
            .err()
            .expect("truncated JSON is refused");
        assert!(e.to_string().contains("did not answer with JSON"), "{e}");
        let sent = r#"[ {"id": "vm_1", "state": "running"} ]"#;
        let a = client(answering(sent).await).get("/vms").await.unwrap();
        assert_eq!(a.text, sent, "--json prints the answer as sent");
        assert_eq!(a.json()[0]["state"], "running");
    }
}
