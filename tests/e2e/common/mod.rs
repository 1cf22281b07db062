//! Shared harness for the end-to-end tests: start the real `trellis` binary on a manifest,
//! wait until it is ready, talk HTTP to it, read its log, and stop it.

pub mod openapi;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// Runs the suite function `$suite(NodeOptions)` twice: on SQLite, and on a PostgreSQL
/// server started for the test.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($suite:ident) => {
        mod $suite {
            #[tokio::test]
            async fn sqlite() {
                super::$suite(super::common::NodeOptions::default()).await;
            }

            #[tokio::test]
            async fn postgres() {
                let postgres = super::common::Postgres::start();
                let options = super::common::NodeOptions {
                    database_url: Some(postgres.url()),
                    ..Default::default()
                };
                super::$suite(options).await;
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_backends;

/// The compile cache the test nodes share, under the workspace's `target/`.
pub fn shared_compile_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-compile-cache")
}

/// Path of a guest component built by `cargo xtask build`/`cargo xtask test`.
pub fn wasm(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo xtask test`, which builds the guest components first",
        path.display()
    );
    path.canonicalize().unwrap()
}

/// Replaces `{wasm:NAME}` with the path of that component and `{dir}` with `dir`.
pub fn render(template: &str, dir: &Path) -> String {
    let mut out = template.replace("{dir}", &dir.display().to_string());
    while let Some(start) = out.find("{wasm:") {
        let end = start + out[start..].find('}').expect("closing brace");
        let name = &out[start + 6..end];
        out.replace_range(start..=end, &wasm(name).display().to_string());
    }
    out
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// How to start a [`TestNode`] beyond its manifest.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Node state directory (default: a fresh one per node).
    pub data_dir: Option<PathBuf>,
    /// `postgres://` URL for components' data (default: SQLite under the data dir).
    pub database_url: Option<String>,
    /// `nats://` URL of the message bus (default: the in-process bus).
    pub nats_url: Option<String>,
    /// More arguments for `trellis up` (e.g. `--watch`).
    pub extra_args: Vec<String>,
    /// Start on this manifest file as it is (default: a fresh file from the template).
    pub manifest_path: Option<PathBuf>,
    /// Give the node no admin token, so that it generates its own (default: [`ADMIN_TOKEN`]).
    pub generated_admin_token: bool,
    /// More environment variables for the node process.
    pub env: Vec<(String, String)>,
}

/// The admin token every test node is started with.
pub const ADMIN_TOKEN: &str = "test-admin-token";

pub struct TestNode {
    child: Child,
    pub addr: SocketAddr,
    /// The admin API's address.
    pub admin_addr: SocketAddr,
    /// The manifest the node was started on.
    pub manifest_path: PathBuf,
    pub dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl TestNode {
    /// Starts a node on `manifest` (a template, see [`render`]) and waits until it is ready.
    pub async fn start(manifest: &str) -> TestNode {
        match Self::try_start(manifest).await {
            Ok(node) => node,
            Err(output) => panic!("trellis did not become ready:\n{output}"),
        }
    }

    /// Like [`start`](Self::start), but returns the node's output when it exits or does
    /// not become ready.
    pub async fn try_start(manifest: &str) -> Result<TestNode, String> {
        Self::try_start_with(manifest, &NodeOptions::default()).await
    }

    /// Starts a node with a given data dir and/or database (to restart on the same data).
    pub async fn start_with(manifest: &str, options: &NodeOptions) -> TestNode {
        match Self::try_start_with(manifest, options).await {
            Ok(node) => node,
            Err(output) => panic!("trellis did not become ready:\n{output}"),
        }
    }

    pub async fn try_start_with(manifest: &str, options: &NodeOptions) -> Result<TestNode, String> {
        let dir = tempfile::tempdir().unwrap();
        let manifest_path = match &options.manifest_path {
            Some(path) => path.clone(),
            None => {
                let path = dir.path().join("trellis.toml");
                std::fs::write(&path, render(manifest, dir.path())).unwrap();
                path
            }
        };
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let mut command = Command::new(TRELLIS);
        command
            .args([
                "up",
                manifest_path.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--data-dir", data_dir.to_str().unwrap()]);
        if let Some(url) = &options.database_url {
            command.args(["--database-url", url]);
        }
        if let Some(url) = &options.nats_url {
            command.args(["--nats-url", url]);
        }
        command.args(&options.extra_args);
        command.envs(options.env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .env("TRELLIS_LOG", "info,trellis=debug")
            .env(
                "TRELLIS_ADMIN_TOKEN",
                if options.generated_admin_token {
                    ""
                } else {
                    ADMIN_TOKEN
                },
            )
            // One compile cache for every test node: each guest is compiled once per run.
            .env("TRELLIS_CACHE_DIR", shared_compile_cache())
            // A host secret no guest may see (the sandbox tests look for it).
            .env("TRELLIS_TEST_HOST_SECRET", "must-not-leak")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting trellis");

        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut gateway = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("trellis listening on http://") {
                    gateway = Some(addr.parse::<SocketAddr>().unwrap());
                }
                if let Some(addr) = line.strip_prefix("trellis admin listening on http://") {
                    let admin = addr.parse::<SocketAddr>().unwrap();
                    let _ = addr_tx.send((gateway.expect("the gateway line comes first"), admin));
                }
            }
        });

        let deadline = Instant::now() + Duration::from_secs(120);
        let (addr, admin_addr) = loop {
            if let Ok(addrs) = addr_rx.try_recv() {
                break addrs;
            }
            if let Some(status) = child.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!("exited with {status}\n{}", log.lock().unwrap()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "no listening line after 120 s\n{}",
                    log.lock().unwrap()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut node = TestNode {
            child,
            addr,
            admin_addr,
            manifest_path,
            dir,
            log,
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        loop {
            if let Ok(response) = node.try_request("GET", "/health/ready", None, &[]).await
                && response.status == 200
            {
                return Ok(node);
            }
            if let Some(status) = node.child.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!("exited with {status}\n{}", node.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 120 s\n{}", node.log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the node wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The log once it contains every one of `needles` (or after 10 s, for the caller's
    /// assertion to show). A line the node wrote before answering may still be in the pipe
    /// when the answer arrives.
    pub async fn log_containing(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if needles.iter().all(|n| log.contains(n)) || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path, None, &[]).await
    }

    pub async fn get_host(&self, host: &str, path: &str) -> Response {
        self.request("GET", path, None, &[("host", host)]).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Response {
        self.request("POST", path, Some(body.into()), &[]).await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Response {
        match self.try_request(method, path, body, headers).await {
            Ok(response) => response,
            Err(e) => panic!("{method} {path} failed: {e}\nnode log:\n{}", self.log()),
        }
    }

    /// A call to the admin API with the node's token.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Bytes>) -> Response {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        self.admin_with(method, path, body, &[("authorization", &auth)])
            .await
    }

    /// A call to the admin API with exactly these headers.
    pub async fn admin_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Response {
        let url = format!("http://{}{path}", self.admin_addr);
        match self.try_request_url(method, &url, body, headers).await {
            Ok(response) => response,
            Err(e) => panic!(
                "admin {method} {path} failed: {e}\nnode log:\n{}",
                self.log()
            ),
        }
    }

    /// The node's Prometheus metrics (from the admin listener).
    pub async fn metrics(&self) -> String {
        let response = self.admin("GET", "/metrics", None).await;
        assert_eq!(response.status, 200, "{}", response.body);
        response.body
    }

    /// The value of `series` for `component` of `tenant` in the node's metrics (0 when absent).
    pub async fn metric(&self, series: &str, tenant: &str, component: &str) -> f64 {
        let prefix = format!("{series}{{tenant=\"{tenant}\",component=\"{component}\"}}");
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Response, String> {
        self.try_request_url(method, &self.url(path), body, headers)
            .await
    }

    async fn try_request_url(
        &self,
        method: &str,
        url: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Response, String> {
        let mut request = http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.unwrap_or_default())).unwrap();
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// POSTs `total` bytes of [`pattern`] to `path` as a chunked body, in lockstep with
    /// the answer: each chunk is sent only once everything before it has come back, so
    /// the exchange completes only if the node streams both ways (one that held the body
    /// back would never answer). Stops at the first error on either side.
    pub async fn stream_echo(&self, path: &str, total: usize, chunk: usize) -> Streamed {
        use hyper::body::Frame;
        type Chunk = Result<Frame<Bytes>, std::convert::Infallible>;
        let (frames, receiver) = tokio::sync::mpsc::channel::<Chunk>(1);
        let body = http_body_util::StreamBody::new(futures_util::StreamExt::boxed(
            futures_util::stream::unfold(receiver, |mut receiver| async move {
                receiver.recv().await.map(|frame| (frame, receiver))
            }),
        ));
        let client: Client<HttpConnector, _> = Client::builder(TokioExecutor::new()).build_http();
        let request = http::Request::post(self.url(path)).body(body).unwrap();
        let (progress, mut echoed) = tokio::sync::watch::channel(0usize);
        let writer = tokio::spawn(async move {
            let mut sent = 0;
            while sent < total {
                // Wait for the echo of everything sent so far (or for the reader to stop).
                if echoed.wait_for(|&echoed| echoed >= sent).await.is_err() {
                    break;
                }
                let len = chunk.min(total - sent);
                let bytes: Vec<u8> = (sent..sent + len).map(pattern).collect();
                if frames
                    .send(Ok(Frame::data(Bytes::from(bytes))))
                    .await
                    .is_err()
                {
                    break;
                }
                sent += len;
            }
            sent
        });
        let mut streamed = Streamed::default();
        match client.request(request).await {
            Ok(response) => {
                streamed.status = response.status().as_u16();
                let mut body = response.into_body();
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => {
                            if let Some(data) = frame.data_ref() {
                                streamed.received.extend_from_slice(data);
                                let _ = progress.send(streamed.received.len());
                            }
                        }
                        Err(e) => {
                            streamed.error = Some(format!("{e:?}"));
                            break;
                        }
                    }
                }
            }
            Err(e) => streamed.error = Some(format!("{e:?}")),
        }
        drop(progress);
        streamed.sent = tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .map(|sent| sent.unwrap_or(0))
            .unwrap_or(0);
        streamed
    }

    /// The node's process id (to kill it from another task while requests are running).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the node at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the node process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The byte at `offset` of a streamed test body (what the probe's `/duplex` sends, too).
pub fn pattern(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// What [`TestNode::stream_echo`] saw.
#[derive(Debug, Default)]
pub struct Streamed {
    pub status: u16,
    /// Bytes the client sent.
    pub sent: usize,
    pub received: Vec<u8>,
    /// The error that ended the exchange, if one did.
    pub error: Option<String>,
}

impl Streamed {
    /// Whether what came back is exactly the first `len` bytes of the pattern.
    pub fn echoes(&self, len: usize) -> bool {
        self.received.len() == len
            && self
                .received
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(i))
    }
}

/// Runs `trellis ARGS` to completion: (exit code, stdout, stderr).
pub fn run_trellis(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(TRELLIS)
        .args(args)
        .env("TRELLIS_LOG", "warn")
        .output()
        .expect("running trellis");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes `manifest` (a template) into a fresh directory; returns the directory and the
/// manifest's path.
pub fn write_manifest(manifest: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trellis.toml");
    std::fs::write(&path, render(manifest, dir.path())).unwrap();
    (dir, path)
}

/// A real PostgreSQL server on a free loopback port in a temporary directory, started with
/// initdb + pg_ctl from Debian's packages (installed by `cargo xtask test`) and stopped on
/// drop. A test that needs it fails, loudly, when it cannot start.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// A PostgreSQL tool as the `postgres` user when we are root (the server refuses root).
fn postgres_tool(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions.filter_map(Result::ok).map(|v| v.path().join("bin")).filter(|b| b.join("initdb").is_file()).max()
            })
            .expect("PostgreSQL server binaries not found under /usr/lib/postgresql: run `cargo xtask test`, which installs Debian's postgresql");
        let dir = tempfile::Builder::new()
            .prefix("trellis-pg")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown of the PostgreSQL directory failed");
        }
        let run = |program: &str, args: &[&str]| {
            let output = postgres_tool(&bin.join(program))
                .args(args)
                .output()
                .expect("running a PostgreSQL tool");
            assert!(
                output.status.success(),
                "PostgreSQL could not start: {program} {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let data = dir.path().join("data");
        run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        let server_options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            dir.path().display()
        );
        let log = dir.path().join("server.log");
        run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &server_options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        Postgres { dir, bin, port }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = postgres_tool(&self.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

/// A real nats-server (Debian's package, installed by `cargo xtask test`) on a free
/// loopback port with JetStream (file storage in its own directory), stopped on drop.
/// `restart` kills it and starts a new one on the same port and store.
pub struct Nats {
    child: Child,
    pub port: u16,
    /// JetStream's store; `None`: started without JetStream.
    store: Option<tempfile::TempDir>,
}

impl Nats {
    pub fn start() -> Nats {
        Self::start_with(true)
    }

    /// A server without JetStream (core NATS only).
    pub fn start_without_jetstream() -> Nats {
        Self::start_with(false)
    }

    fn start_with(jetstream: bool) -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = jetstream.then(|| tempfile::tempdir().unwrap());
        Nats {
            child: Self::spawn(port, store.as_ref().map(|d| d.path())),
            port,
            store,
        }
    }

    fn spawn(port: u16, store: Option<&Path>) -> Child {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("nats-server not found: run `cargo xtask test`, which installs Debian's nats-server");
        let mut command = Command::new(binary);
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(store) = store {
            command.args(["-js", "-sd", store.to_str().unwrap()]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start listening on port {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (clients see the connection drop) and starts it again on the same
    /// port and JetStream store.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, self.store.as_ref().map(|d| d.path()));
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real OCI registry (Debian's `docker-registry`, the CNCF distribution server, installed
/// by `cargo xtask test`) on a free loopback port, storing in its own directory, with
/// one user (`REGISTRY_USER`/`REGISTRY_PASSWORD`) required for every call. Stopped on drop.
pub struct OciRegistry {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

pub const REGISTRY_USER: &str = "shop";
pub const REGISTRY_PASSWORD: &str = "s3cret";
/// `htpasswd -nbB shop s3cret`
const REGISTRY_HTPASSWD: &str = "shop:$2y$05$hywjVALC0iVhu3dAJrJqkeBlWrgkYWjyc1wfXS9MKyMERYukwGYSe";

impl OciRegistry {
    pub fn start() -> OciRegistry {
        let binary = ["/usr/bin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("docker-registry not found: run `cargo xtask test`, which installs Debian's docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("trellis-registry")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            dir.path().join("htpasswd"),
            format!("{REGISTRY_HTPASSWD}\n"),
        )
        .unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: trellis-test\n    path: {htpasswd}\n",
                root = dir.path().join("storage").display(),
                htpasswd = dir.path().join("htpasswd").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = OciRegistry {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on port {port} within 15 s:\n{}",
                std::fs::read_to_string(registry.dir.path().join("registry.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        registry
    }

    /// `127.0.0.1:PORT`, as a reference's host.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's file for a blob (to corrupt it).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
