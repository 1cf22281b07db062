//! The native baseline for BENCHMARKS.md: the same service as `components/hello` (a JSON
//! echo of method, path and body size), written directly on hyper, with the same server
//! setup as the Trellis gateway (tokio multi-thread, TCP_NODELAY, HTTP/1.1 keep-alive).
//!
//! `cargo run --release -p trellis --example native_hello -- 127.0.0.1:9000`

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

async fn hello(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let body_bytes = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let body = format!(
        "{{\"service\":\"hello\",\"method\":{},\"path\":{},\"body_bytes\":{body_bytes}}}\n",
        serde_json::Value::from(method),
        serde_json::Value::from(path)
    );
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid"))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "native hello listening on http://{}",
        listener.local_addr()?
    );
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        tokio::spawn(async move {
            let _ = builder
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(hello))
                .await;
        });
    }
}
