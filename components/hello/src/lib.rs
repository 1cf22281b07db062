//! `hello`: the smallest useful Trellis service. It answers every request with a JSON
//! echo of the method, the path and the number of body bytes it received.
//!
//! Written against the `wasip2` crate directly (no async runtime), and it sends a
//! `content-length` instead of a chunked body: both keep a per-request instance cheap.

use std::io::{Read, Write};

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasip2::http::proxy::export!(Hello);

impl Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = method_name(&request.method());
        let path = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let body_bytes = count_body_bytes(&request);

        let body = format!(
            "{{\"service\":\"hello\",\"method\":{},\"path\":{},\"body_bytes\":{}}}\n",
            json_string(&method),
            json_string(&path),
            body_bytes
        );
        respond(response_out, 200, "application/json", body.as_bytes());
    }
}

fn count_body_bytes(request: &IncomingRequest) -> u64 {
    let Ok(body) = request.consume() else {
        return 0;
    };
    let Ok(mut stream) = body.stream() else {
        return 0;
    };
    let mut total = 0u64;
    let mut buf = [0u8; 16 * 1024];
    // The inherent WASI `read` shadows `io::Read::read`, hence the qualified call.
    while let Ok(n) = Read::read(&mut stream, &mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total
}

fn respond(out: ResponseOutparam, status: u16, content_type: &str, body: &[u8]) {
    let headers = Fields::from_list(&[
        ("content-type".to_string(), content_type.as_bytes().to_vec()),
        (
            "content-length".to_string(),
            body.len().to_string().into_bytes(),
        ),
    ])
    .expect("static headers are valid");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("status is valid");
    let outgoing = response.body().expect("body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let mut stream = outgoing.write().expect("stream is taken once");
    // The host may be gone (client hung up); nothing useful to do about it here.
    let _ = Write::write_all(&mut stream, body).and_then(|_| Write::flush(&mut stream));
    drop(stream);
    let _ = OutgoingBody::finish(outgoing, None);
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
