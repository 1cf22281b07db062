//! The per-request cost of Trellis's core step, measured without HTTP or sockets: create a
//! `Store`, instantiate from the version's pre-instance, call the guest's
//! `wasi:http/incoming-handler`, and read the whole response. The same steps the invocation
//! path (`trellis::runtime::invoke`) runs for each request.
//!
//! `cargo run --release -p trellis --example instantiate_cost -- target/wasm/hello.wasm [SECONDS]`
//! prints `iterations=N mean_us=.. p50_us=.. p99_us=..`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;

use trellis::capabilities::messaging::InProcessBus;
use trellis::manifest;
use trellis::runtime::engine::{EngineSettings, Runtime};
use trellis::runtime::version::{Version, VersionServices, VersionSource};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let wasm = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/wasm/hello.wasm".into());
    let seconds: f64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let dir = tempfile_dir()?;
    let manifest_path = dir.join("trellis.toml");
    let wasm = std::fs::canonicalize(&wasm)?;
    std::fs::write(
        &manifest_path,
        format!(
            "[node]\ndata_dir = \"{}\"\n[components.hello]\nsource = \"{}\"\nroutes = [\"/\"]\n",
            dir.join("data").display(),
            wasm.display()
        ),
    )?;
    let loaded = manifest::load(&manifest_path)?;
    let runtime = Runtime::new(&EngineSettings {
        max_instances: 100,
        max_instance_memory: 256 << 20,
        cache_dir: None,
    })?;
    // As the node does: the plain engine unless the component needs concurrency support.
    let linkers = trellis::runtime::instance::Linkers::new(&runtime.engines)?;
    let component = wasmtime::component::Component::from_file(&runtime.engines.plain, &wasm)
        .or_else(|_| wasmtime::component::Component::from_file(&runtime.engines.concurrent, &wasm))
        .map_err(anyhow::Error::from)?;
    let linker = linkers.for_component(&component);
    let bus: Arc<dyn trellis::capabilities::messaging::MessageBus> =
        Arc::new(InProcessBus::default());
    let deployment = Version::link(
        linker,
        VersionSource {
            tenant: "default",
            name: "hello",
            digest: "sha256:-",
            component: &component,
            spec: &loaded.manifest.components["hello"],
            seq: 1,
        },
        VersionServices {
            storage: Default::default(),
            internal_calls: None,
            bus: bus.clone(),
            events: Arc::new(trellis::capabilities::events::EphemeralLog::new(bus)),
            memory_budget: Arc::new(trellis::runtime::memory::MemoryBudget::new(
                u64::MAX,
                Default::default(),
            )),
            owner: trellis::tenancy::Tenants::new(
                &loaded.tenant_specs(),
                Default::default(),
                Arc::new(trellis::telemetry::metrics::Metrics::default()),
            )
            .get("default")
            .expect("the default tenant"),
        },
    )?;

    // Warm up the pool slots and caches.
    for _ in 0..200 {
        one_request(&deployment).await?;
    }
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs_f64(seconds) {
        let t = Instant::now();
        one_request(&deployment).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "iterations={} mean_us={:.1} p50_us={:.1} p99_us={:.1}",
        samples.len(),
        mean.as_secs_f64() * 1e6,
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn one_request(deployment: &Version) -> anyhow::Result<()> {
    let mut store = deployment.new_store(Instant::now() + Duration::from_secs(10), &[])?;
    let request = hyper::Request::builder()
        .uri("http://localhost/hello/bench")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()).map_err(|never| match never {}))?;
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let (guest_request, out) = {
        let mut http = store.data_mut().http();
        (
            http.new_incoming_request::<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>(
                Scheme::Http,
                request.map(|b| b.boxed()),
            )?,
            http.new_response_outparam(sender)?,
        )
    };
    let Some(trellis::runtime::version::HttpPre::P2(pre)) = deployment.http() else {
        anyhow::bail!("hello serves WASIp2 HTTP");
    };
    let proxy = pre.instantiate_async(&mut store).await?;
    proxy
        .wasi_http_incoming_handler()
        .call_handle(&mut store, guest_request, out)
        .await?;
    let response = receiver.await??;
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(!body.is_empty(), "empty response");
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("trellis-instantiate-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
