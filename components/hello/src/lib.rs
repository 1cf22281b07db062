//! `hello`: the smallest useful Trellis service. It answers every request with a JSON
//! echo of the method, the path and the number of body bytes it received.
//!
//! Written against the `wasip2` crate directly (no async runtime), and it sends a
//! `content-length` instead of a chunked body: both keep a per-request instance cheap.

use trellis_guest_support::{json_string, read_body, respond};
use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, Method, ResponseOutparam};

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
    let mut total = 0u64;
    read_body(request, |chunk| total += chunk.len() as u64);
    total
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
