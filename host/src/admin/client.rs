//! The CLI's side of the admin API (`trellis deploy`, `rollback`, `canary`, `status`, ...):
//! a small HTTP client that sends the token, shows progress while a component uploads and
//! compiles, and turns answers into exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why a CLI call failed; each has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error (exit 1).
    #[error("{status} {code}: {message}{}", problems.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    Refused {
        status: u16,
        code: String,
        message: String,
        problems: Vec<String>,
    },
    /// No node answered at the admin address (exit 3).
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The token was missing or wrong (exit 4).
    #[error(
        "the node refused the admin token (401); pass --token, TRELLIS_ADMIN_TOKEN or --token-file"
    )]
    Unauthorized,
    /// Bad local input (exit 2).
    #[error("{0}")]
    Usage(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused { .. } => 1,
            ClientError::Usage(_) => 2,
            ClientError::Unreachable { .. } => 3,
            ClientError::Unauthorized => 4,
        }
    }
}

type RequestBody = UnsyncBoxBody<Bytes, std::convert::Infallible>;

pub struct AdminClient {
    base: String,
    token: String,
    client: Client<HttpConnector, RequestBody>,
}

/// Finds the token: `--token`/`TRELLIS_ADMIN_TOKEN`, else `--token-file`, else the file a
/// node with data dir `.trellis` in the current directory generated.
pub fn find_token(
    token: Option<String>,
    token_file: Option<PathBuf>,
) -> Result<String, ClientError> {
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        return Ok(token);
    }
    let path = token_file
        .unwrap_or_else(|| crate::admin::auth::token_file(std::path::Path::new(".trellis")));
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            ClientError::Usage(format!(
                "no admin token: pass --token or TRELLIS_ADMIN_TOKEN, or --token-file (reading {}: {e})",
                path.display()
            ))
        })
}

impl AdminClient {
    pub fn new(base: &str, token: String) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A JSON call; the answer's JSON (null for an empty body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = match body {
            Some(value) => http_body_util::Full::new(Bytes::from(value.to_string())).boxed_unsync(),
            None => http_body_util::Empty::new().boxed_unsync(),
        };
        self.send(method, path, "application/json", body, &[]).await
    }

    /// Uploads a component's bytes, with a progress line on stderr.
    pub async fn upload(
        &self,
        path: &str,
        label: &str,
        bytes: Vec<u8>,
        headers: &[(&str, String)],
    ) -> Result<serde_json::Value, ClientError> {
        let body = Progress::new(label.to_string(), Bytes::from(bytes)).boxed_unsync();
        let answer = self
            .send(Method::POST, path, "application/wasm", body, headers)
            .await;
        if std::io::stderr().is_terminal() {
            eprint!("\r\x1b[2K");
        }
        answer
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: RequestBody,
        headers: &[(&str, String)],
    ) -> Result<serde_json::Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, content_type);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(body)
            .map_err(|e| ClientError::Usage(format!("bad admin URL {url}: {e}")))?;
        let response =
            self.client
                .request(request)
                .await
                .map_err(|e| ClientError::Unreachable {
                    url: self.base.clone(),
                    reason: format!("{e:#}"),
                })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                reason: e.to_string(),
            })?
            .to_bytes();
        let value: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        if status == http::StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized);
        }
        if !status.is_success() {
            return Err(ClientError::Refused {
                status: status.as_u16(),
                code: value["error"].as_str().unwrap_or("error").to_string(),
                message: value["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| value.to_string()),
                problems: value["problems"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| {
                                format!(
                                    "{}: {}",
                                    p["field"].as_str().unwrap_or(""),
                                    p["reason"].as_str().unwrap_or("")
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        Ok(value)
    }
}

/// An upload body that reports how much of it has been sent, then that the node is
/// compiling (the answer comes once the version is compiled and checked).
struct Progress {
    label: String,
    bytes: Bytes,
    sent: usize,
    terminal: bool,
}

const CHUNK: usize = 256 * 1024;

impl Progress {
    fn new(label: String, bytes: Bytes) -> Self {
        let terminal = std::io::stderr().is_terminal();
        if !terminal {
            eprintln!("uploading {label} ({} bytes)", bytes.len());
        }
        Self {
            label,
            bytes,
            sent: 0,
            terminal,
        }
    }
}

impl Body for Progress {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let total = self.bytes.len();
        if self.sent >= total {
            return Poll::Ready(None);
        }
        let end = (self.sent + CHUNK).min(total);
        let chunk = self.bytes.slice(self.sent..end);
        self.sent = end;
        if self.terminal {
            let percent = end * 100 / total.max(1);
            if end == total {
                eprint!(
                    "\r\x1b[2K{}: uploaded {total} bytes; compiling and checking...",
                    self.label
                );
            } else {
                eprint!(
                    "\r\x1b[2K{}: uploading {percent}% ({end} of {total} bytes)",
                    self.label
                );
            }
        } else if end == total {
            eprintln!("{}: uploaded; compiling and checking...", self.label);
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact((self.bytes.len() - self.sent) as u64)
    }
}
