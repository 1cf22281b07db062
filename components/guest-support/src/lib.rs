//! Helpers shared by the guests written directly on the `wasip2` crate: answer with a
//! complete body and a `content-length` (cheaper for the host than a chunked body), read a
//! request body, and quote JSON strings without pulling in a JSON library.

use std::io::{Read, Write};

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Sends a whole response: status, content type, body, with its `content-length`.
pub fn respond(out: ResponseOutparam, status: u16, content_type: &str, body: &[u8]) {
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
    // The inherent WASI methods shadow io::Write's, hence the qualified calls. A failed
    // write means the client is gone; there is no one left to tell.
    let _ = Write::write_all(&mut stream, body).and_then(|_| Write::flush(&mut stream));
    drop(stream);
    let _ = OutgoingBody::finish(outgoing, None);
}

/// Reads the whole request body, calling `chunk` with each piece as it arrives.
pub fn read_body(request: &IncomingRequest, mut chunk: impl FnMut(&[u8])) {
    let Ok(body) = request.consume() else { return };
    let Ok(mut stream) = body.stream() else {
        return;
    };
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = Read::read(&mut stream, &mut buf) {
        if n == 0 {
            break;
        }
        chunk(&buf[..n]);
    }
}

/// `s` as a JSON string literal, quotes included.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
