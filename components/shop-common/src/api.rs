//! The HTTP side of a service: [`Request`] is the incoming request read whole, handlers
//! return [`ApiResult`], and [`serve`] writes either the answer or the error as JSON.
//!
//! Errors follow one rule across the shop: 400 when the body is not JSON or a field has
//! the wrong JSON type, 422 when it is well-formed but a required field is missing or a
//! value is invalid (naming the field), 401 without a valid token, 403 when the token's
//! user may not do this, 404 for unknown ids, 409 when the state forbids it.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use trellis_guest_support::{read_body, respond};
use wasip2::http::types::{IncomingRequest, Method, ResponseOutparam};

/// A request, read whole.
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn read(incoming: &IncomingRequest) -> Self {
        let method = match incoming.method() {
            Method::Get => "GET".to_string(),
            Method::Post => "POST".to_string(),
            Method::Put => "PUT".to_string(),
            Method::Patch => "PATCH".to_string(),
            Method::Delete => "DELETE".to_string(),
            Method::Head => "HEAD".to_string(),
            Method::Options => "OPTIONS".to_string(),
            Method::Connect => "CONNECT".to_string(),
            Method::Trace => "TRACE".to_string(),
            Method::Other(other) => other,
        };
        let path_and_query = incoming.path_with_query().unwrap_or_default();
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((&path_and_query, ""));
        let query = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        let headers = incoming
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_ascii_lowercase(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        read_body(incoming, |chunk| body.extend_from_slice(chunk));
        Request {
            method,
            path: path.to_string(),
            query,
            headers,
            body,
        }
    }

    /// The path's segments after `prefix` (`/api/v1`), or `None` when it does not start
    /// with it.
    pub fn segments_after(&self, prefix: &str) -> Option<Vec<&str>> {
        let rest = self.path.strip_prefix(prefix)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        Some(rest.split('/').filter(|s| !s.is_empty()).collect())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as `T`: 400 `bad_json` when it is not JSON or a field has the wrong type.
    /// Give `T` optional fields and check them with [`required`], so a missing field
    /// answers 422 naming it.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.body.is_empty() {
            return Err(ApiError::new(
                400,
                "bad_json",
                "the request body must be a JSON object",
            ));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::new(400, "bad_json", format!("the body is not valid: {e}")))
    }
}

/// `value`, or 422 naming `field` when it is absent.
pub fn required<T>(value: Option<T>, field: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::invalid(field, format!("{field} is required")))
}

/// One line of an order (`items[i]`): its product id and a quantity from 1 to 1000, or 422
/// naming the field.
pub fn order_line(
    i: usize,
    product_id: Option<String>,
    quantity: Option<i64>,
) -> Result<(String, i64), ApiError> {
    let product_id = required(product_id, &format!("items[{i}].product_id"))?;
    let quantity = required(quantity, &format!("items[{i}].quantity"))?;
    if !(1..=1000).contains(&quantity) {
        return Err(ApiError::invalid(
            &format!("items[{i}].quantity"),
            "quantity must be from 1 to 1000",
        ));
    }
    Ok((product_id, quantity))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a handler answers: a status and an optional JSON body.
pub struct Response {
    pub status: u16,
    pub body: Option<Vec<u8>>,
}

impl Response {
    pub fn json(status: u16, value: &impl Serialize) -> Self {
        Response {
            status,
            body: Some(serde_json::to_vec(value).expect("plain data serializes")),
        }
    }

    pub fn ok(value: &impl Serialize) -> Self {
        Self::json(200, value)
    }

    pub fn created(value: &impl Serialize) -> Self {
        Self::json(201, value)
    }

    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }
}

/// An error as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

pub type ApiResult = Result<Response, ApiError>;

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// 422 `validation_failed` on `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(422, "validation_failed", message).on(field)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(404, "not_found", format!("no such {what}"))
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "forbidden", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "unauthorized", message)
    }

    /// A fault of this service or its dependencies, not of the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "method_not_allowed",
            "this method is not allowed on this path",
        )
    }

    pub fn no_such_path() -> Self {
        Self::new(404, "not_found", "no such path")
    }

    /// The same error, about `field`.
    pub fn on(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some(field) = &self.field {
            body["field"] = json!(field);
        }
        body
    }
}

/// Reads the request, runs `handler`, and writes its answer or its error.
pub fn serve(
    incoming: IncomingRequest,
    out: ResponseOutparam,
    handler: impl FnOnce(&Request) -> ApiResult,
) {
    let request = Request::read(&incoming);
    match handler(&request) {
        Ok(response) => match response.body {
            Some(body) => respond(out, response.status, "application/json", &body),
            None => respond(out, response.status, "application/json", b""),
        },
        Err(error) => {
            if error.status >= 500 {
                // Goes to the node's log, tagged with this component.
                eprintln!(
                    "{} {}: {} {}",
                    request.method, request.path, error.code, error.message
                );
            }
            let body = serde_json::to_vec(&error.to_json()).expect("json serializes");
            respond(out, error.status, "application/json", &body);
        }
    }
}

/// `?limit=&offset=`: 1..=100 items (20 by default) from `offset` (0 by default).
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

impl Page {
    pub fn from_query(request: &Request) -> Result<Self, ApiError> {
        let number = |name: &str, default: i64, min: i64, max: i64| match request.query(name) {
            None => Ok(default),
            Some(raw) => match raw.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::new(
                    400,
                    "bad_query",
                    format!("{name} must be an integer from {min} to {max}"),
                )
                .on(name)),
            },
        };
        Ok(Page {
            limit: number("limit", 20, 1, 100)?,
            offset: number("offset", 0, 0, i64::MAX)?,
        })
    }

    /// The page's JSON: `{"items", "total", "limit", "offset"}`.
    pub fn answer(&self, items: Vec<Value>, total: i64) -> Response {
        Response::ok(&json!({
            "items": items,
            "total": total,
            "limit": self.limit,
            "offset": self.offset,
        }))
    }
}
