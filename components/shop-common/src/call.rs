//! Calls to sibling components over `http://NAME.internal/...`, which the host serves
//! in-process (the caller needs `NAME.internal` in its `outbound` grant). The caller's
//! token is passed on, so the callee applies its own authorization.

use serde_json::Value;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

use crate::api::ApiError;

/// A sibling's answer.
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// `method` `http://component.internal{path}` with an optional JSON body and bearer
/// header. A call that does not get an answer (denied, overloaded callee, timeout) is a
/// 503 `dependency_unavailable` for our own client.
pub fn internal(
    method: Method,
    component: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> Result<Reply, ApiError> {
    send(
        method,
        Scheme::Http,
        &format!("{component}.internal"),
        path,
        authorization,
        body,
    )
    .map_err(|why| {
        ApiError::new(
            503,
            "dependency_unavailable",
            format!("the {component} service did not answer: {why}"),
        )
    })
}

/// `method` `url` (`http://` or `https://`) with an optional JSON body; an answer that is
/// not JSON comes back as a JSON string. `Err` says why there was no answer.
pub fn external(method: Method, url: &str, body: Option<&Value>) -> Result<Reply, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(format!("{url} is not an http(s) URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    send(method, scheme, authority, path, None, body)
}

fn send(
    method: Method,
    scheme: Scheme,
    authority: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> Result<Reply, String> {
    let unavailable = |why: String| why;
    let mut headers = vec![("accept".to_string(), b"application/json".to_vec())];
    if let Some(auth) = authorization {
        headers.push(("authorization".to_string(), auth.as_bytes().to_vec()));
    }
    let payload = body.map(|b| serde_json::to_vec(b).expect("json serializes"));
    if let Some(payload) = &payload {
        headers.push(("content-type".to_string(), b"application/json".to_vec()));
        headers.push((
            "content-length".to_string(),
            payload.len().to_string().into_bytes(),
        ));
    }
    let fields = Fields::from_list(&headers).map_err(|e| unavailable(format!("{e:?}")))?;
    let request = OutgoingRequest::new(fields);
    let _ = request.set_method(&method);
    let _ = request.set_scheme(Some(&scheme));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    let outgoing_body = request.body().map_err(|_| unavailable("no body".into()))?;
    let future =
        outgoing_handler::handle(request, None).map_err(|code| unavailable(format!("{code:?}")))?;
    if let Some(payload) = &payload {
        let stream = outgoing_body
            .write()
            .map_err(|_| unavailable("no body stream".into()))?;
        for chunk in payload.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| unavailable(format!("writing the body: {e:?}")))?;
        }
    }
    OutgoingBody::finish(outgoing_body, None).map_err(|e| unavailable(format!("{e:?}")))?;
    let response = loop {
        match future.get() {
            Some(result) => break result,
            None => future.subscribe().block(),
        }
    };
    let response = match response {
        Ok(Ok(response)) => response,
        Ok(Err(code)) => return Err(unavailable(format!("{code:?}"))),
        Err(()) => return Err(unavailable("the response was taken twice".into())),
    };
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|_| unavailable("no response body".into()))?;
    let stream = incoming
        .stream()
        .map_err(|_| unavailable("no response stream".into()))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(e) => return Err(unavailable(format!("reading the answer: {e:?}"))),
        }
    }
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok(Reply { status, body })
}
