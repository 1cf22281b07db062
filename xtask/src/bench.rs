//! `cargo xtask bench`: the numbers in BENCHMARKS.md, measured in one run on this machine.
//!
//! Three servers answer the same request (`GET /hello/bench`) with the same JSON: a native
//! hyper server (the baseline), `wasmtime serve` (wasmtime-cli 48, default flags plus
//! `-S cli`, which Rust std guests need) running `hello.wasm`, and a Trellis node running
//! the same `hello.wasm`. Each is loaded by the same generator (Debian's `wrk`, 2 threads,
//! 32 connections) after a warm-up, in interleaved rounds; then the in-process instantiate+call cost is measured
//! with the `instantiate_cost` example. Results are printed as a Markdown table and kept in
//! `target/bench/results.md`.
//!
//! Installs `wrk` and `valgrind` (apt-get) and `wasmtime-cli` 48 (cargo install, ~11 min)
//! when missing.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const WASMTIME_VERSION: &str = "48.0.8";
const THREADS: &str = "2";
const CONNECTIONS: &str = "32";
const WARMUP: &str = "2s";
const DURATION: &str = "8s";
const ROUNDS: usize = 3;
/// Connections for the shop's latency-when-not-saturated run.
const LIGHT_CONNECTIONS: &str = "4";

struct Measured {
    name: &'static str,
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    /// Server CPU time per request (user + system), in µs.
    cpu_us_per_request: Option<f64>,
}

/// The sections of the report, in order; `cargo xtask bench SECTION...` runs only those.
const SECTIONS: [&str; 10] = [
    "gateway",
    "wasip3",
    "instructions",
    "capabilities",
    "events",
    "hot-deploy",
    "memory",
    "isolation",
    "density",
    "shop",
];

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let wanted: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if let Some(unknown) = wanted.iter().find(|w| !SECTIONS.contains(w)) {
        bail!(
            "no benchmark section {unknown:?}; sections: {}",
            SECTIONS.join(", ")
        );
    }
    let runs = |section: &str| wanted.is_empty() || wanted.contains(&section);
    ensure_wrk()?;
    super::run(super::cargo().args(["build", "--release", "--package", "trellis", "--examples"]))?;
    let release = root.join("target/release");
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;

    let mut report = String::new();
    if runs("gateway") {
        report.push_str(&gateway(root, &release, &out_dir)?);
    }
    if runs("wasip3") {
        report.push_str(&wasip3(root, &release, &out_dir)?);
    }
    if runs("instructions") {
        report.push_str(&instructions(root, &release, &out_dir)?);
    }
    if runs("capabilities") {
        report.push_str(&capabilities(&release, &out_dir)?);
    }
    if runs("events") {
        report.push_str(&events(&release, &out_dir)?);
    }
    if runs("hot-deploy") {
        report.push_str(&hot_deploy(root, &release, &out_dir)?);
    }
    if runs("memory") {
        report.push_str(&memory(root, &release, &out_dir)?);
    }
    if runs("isolation") {
        report.push_str(&isolation(root, &release, &out_dir)?);
    }
    if runs("density") {
        report.push_str(&density(root, &release, &out_dir)?);
    }
    if runs("shop") {
        report.push_str(&shop_orders(root, &release, &out_dir)?);
    }
    println!("\n{report}");
    std::fs::write(out_dir.join("results.md"), &report)?;
    Ok(())
}

/// Flags that make `wasmtime serve`'s pooling allocator fastest on this kind of machine:
/// the settings Trellis's own engine uses (`host/src/runtime/engine.rs`): pooling, no
/// copy-on-write memory images (their page faults and madvise cost more than copying a
/// small image), memory, tables and stacks kept resident between instances, decommits
/// unbatched, and a bounded set of warm slots.
const SERVE_TUNED_POOLING: &str = "pooling-allocator=y,memory-init-cow=n,\
     pooling-memory-keep-resident=4194304,pooling-table-keep-resident=65536,\
     pooling-async-stack-keep-resident=65536,pooling-decommit-batch-size=1,\
     pooling-pagemap-scan=auto,pooling-max-unused-warm-slots=32,pooling-total-memories=2000,\
     pooling-total-tables=4000,pooling-total-core-instances=4000,\
     pooling-total-component-instances=1000,pooling-total-stacks=1000";

/// Warm instance reuse as the benchmarks turn it on for a Trellis component.
const TRELLIS_REUSE: &str = r#"reuse = { max_requests = 1000, idle = "10s" }"#;

/// A Trellis node serving `wasm` at `/`, fresh per request or with `reuse`.
fn trellis_hello(
    name: &'static str,
    release: &Path,
    dir: &Path,
    wasm: &Path,
    reuse: Option<&str>,
) -> Result<Server> {
    let (manifest, port) = hello_manifest(dir, wasm, "", "", reuse.unwrap_or_default())?;
    start_trellis(name, release, &manifest, port)
}

/// Writes `dir/trellis.toml`: a node on a free port serving `wasm` at `/`, with `node`
/// and `limits` added to its defaults and `reuse` as the component's reuse line.
fn hello_manifest(
    dir: &Path,
    wasm: &Path,
    node: &str,
    limits: &str,
    reuse: &str,
) -> Result<(std::path::PathBuf, u16)> {
    let port = free_port()?;
    std::fs::create_dir_all(dir)?;
    let manifest = dir.join("trellis.toml");
    std::fs::write(
        &manifest,
        format!(
            "[node]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\n{node}\n\
             [components.hello]\nsource = \"{wasm}\"\nroutes = [\"/\"]\n\
             limits = {{ max_concurrent = 256{limits} }}\n{reuse}\n",
            data = dir.join("data").display(),
            wasm = wasm.display(),
        ),
    )?;
    Ok((manifest, port))
}

/// `wasmtime serve` on `wasm` with `args` before it.
fn wasmtime_serve(
    name: &'static str,
    wasmtime: &Path,
    args: &[&str],
    wasm: &Path,
) -> Result<Server> {
    let port = free_port()?;
    Server::start(
        name,
        Command::new(wasmtime)
            .args(["serve", "-S", "cli", "--addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .arg(wasm),
        port,
        "/hello/ready",
    )
}

fn native_hello(release: &Path) -> Result<Server> {
    let port = free_port()?;
    Server::start(
        "native hyper (baseline)",
        Command::new(release.join("examples/native_hello")).arg(format!("127.0.0.1:{port}")),
        port,
        "/hello/ready",
    )
}

/// Hello through native hyper, `wasmtime serve` (default flags, tuned pooling flags, and
/// reusing instances) and Trellis (fresh instance per request, and reusing warm ones),
/// then the in-process instantiate+call cost.
fn gateway(root: &Path, release: &Path, out_dir: &Path) -> Result<String> {
    let wasmtime = ensure_wasmtime_cli()?;
    let hello = root.join("target/wasm/hello.wasm");

    // All run at once (an idle server costs nothing) so that the rounds can be
    // interleaved: drift in the machine's speed then hits every server alike.
    let native = native_hello(release)?;
    let serve = wasmtime_serve("wasmtime serve 48 (default flags)", &wasmtime, &[], &hello)?;
    let tuned = wasmtime_serve(
        "wasmtime serve 48, tuned pooling flags (below)",
        &wasmtime,
        &["-O", SERVE_TUNED_POOLING],
        &hello,
    )?;
    let serve_reuse = wasmtime_serve(
        "wasmtime serve 48, tuned pooling, --max-instance-reuse-count 1000",
        &wasmtime,
        &[
            "-O",
            SERVE_TUNED_POOLING,
            "--max-instance-reuse-count",
            "1000",
        ],
        &hello,
    )?;
    let trellis = trellis_hello(
        "trellis gateway (fresh instance per request)",
        release,
        &out_dir.join("gateway-fresh"),
        &hello,
        None,
    )?;
    let trellis_reuse = trellis_hello(
        "trellis gateway, reuse = { max_requests = 1000 }",
        release,
        &out_dir.join("gateway-reuse"),
        &hello,
        Some(TRELLIS_REUSE),
    )?;
    let results = interleaved_rounds(
        "gateway",
        &[
            &native,
            &serve,
            &tuned,
            &serve_reuse,
            &trellis,
            &trellis_reuse,
        ],
    )?;
    let metrics = trellis.metrics()?;
    drop((native, serve, tuned, serve_reuse, trellis, trellis_reuse));

    let cost = Command::new(release.join("examples/instantiate_cost"))
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .arg(&hello)
        .arg("5")
        .current_dir(root)
        .output()
        .context("running the instantiate_cost example")?;
    let cost = String::from_utf8_lossy(&cost.stdout).trim().to_string();

    let mut out = render(&results, &cost, &metrics);
    out.push_str(&format!(
        "\nTuned pooling flags given to wasmtime serve: `-O {SERVE_TUNED_POOLING}`\n"
    ));
    out.push_str(&ratio_lines(
        &results,
        &[
            ("trellis fresh vs wasmtime serve default", 4, 1, 2.5),
            ("trellis fresh vs wasmtime serve tuned pooling", 4, 2, 1.3),
            ("trellis reuse vs native hyper", 5, 0, 0.35),
            (
                "trellis reuse vs wasmtime serve reusing instances",
                5,
                3,
                1.0,
            ),
        ],
    ));
    Ok(out)
}

/// One line per aim: the ratio of two servers' median rounds (indices into `results`)
/// against the aim.
fn ratio_lines(results: &[(Measured, Vec<f64>)], aims: &[(&str, usize, usize, f64)]) -> String {
    let mut out = String::from("\n| aim | ratio | target | met |\n|---|---|---|---|\n");
    for (what, a, b, target) in aims {
        let ratio = results[*a].0.requests_per_sec / results[*b].0.requests_per_sec;
        out.push_str(&format!(
            "| {what} | {ratio:.2}x | {target:.2}x | {} |\n",
            if ratio >= *target { "yes" } else { "no" }
        ));
    }
    out
}

/// The same WASIp3 hello (`components/fixtures/hello-p3`) through `wasmtime serve` (which
/// reuses a p3 instance for up to 128 requests, 16 at once) and through Trellis (a fresh
/// instance per request, and reusing instances 16 at once or one at a time), beside
/// native hyper; interleaved
/// rounds as in `gateway`.
fn wasip3(root: &Path, release: &Path, out_dir: &Path) -> Result<String> {
    let wasmtime = ensure_wasmtime_cli()?;
    let hello = root.join("target/wasm/hello-p3.wasm");
    let native = native_hello(release)?;
    let serve = wasmtime_serve(
        "wasmtime serve 48, WASIp3 (default flags: instance reuse)",
        &wasmtime,
        &[],
        &hello,
    )?;
    let trellis = trellis_hello(
        "trellis, WASIp3 (fresh instance per request)",
        release,
        &out_dir.join("wasip3-fresh"),
        &hello,
        None,
    )?;
    let trellis_reuse = trellis_hello(
        "trellis, WASIp3, reuse = { max_requests = 1000 } (16 at once per instance)",
        release,
        &out_dir.join("wasip3-reuse"),
        &hello,
        Some(TRELLIS_REUSE),
    )?;
    let trellis_reuse_one = trellis_hello(
        "trellis, WASIp3, reuse = { max_requests = 1000, concurrent = 1 }",
        release,
        &out_dir.join("wasip3-reuse-one"),
        &hello,
        Some(r#"reuse = { max_requests = 1000, idle = "10s", concurrent = 1 }"#),
    )?;
    let results = interleaved_rounds(
        "wasip3",
        &[
            &native,
            &serve,
            &trellis,
            &trellis_reuse,
            &trellis_reuse_one,
        ],
    )?;
    let metrics = trellis_reuse.metrics()?;
    drop((native, serve, trellis, trellis_reuse, trellis_reuse_one));
    let mut out = String::from("### WASIp3 hello\n\n");
    out.push_str(&table(&results, &metrics));
    out.push_str(&ratio_lines(
        &results,
        &[
            (
                "trellis p3 reuse vs wasmtime serve p3 (its default reuse)",
                3,
                1,
                1.0,
            ),
            (
                "trellis p3 reuse, one at a time, vs wasmtime serve p3",
                4,
                1,
                1.0,
            ),
        ],
    ));
    Ok(out)
}

/// Seconds of load before and while callgrind counts.
const COUNTED_WARMUP: &str = "10s";
const COUNTED_DURATION: &str = "20s";

/// User-space instructions per request of the WASIp3 hello's servers, counted by
/// callgrind: unlike requests per second on a shared 2-core VM (±15-20% between rounds),
/// these repeat to about 1-2%, so a change of a few percent shows. Each server runs under
/// `valgrind --tool=callgrind` with counting off while it starts and warms up, then on for
/// a fixed load (`wrk -t1 -c8`). The kernel's share (loopback, scheduling) is not counted.
/// The Trellis node gets a pool of 4 instances: the default pool's address-space
/// reservation does not fit under valgrind.
fn instructions(root: &Path, release: &Path, out_dir: &Path) -> Result<String> {
    if super::which("valgrind").is_none() {
        super::apt_install(&["valgrind"])?;
    }
    let wasmtime = ensure_wasmtime_cli()?;
    let hello_p3 = root.join("target/wasm/hello-p3.wasm");
    let hello = root.join("target/wasm/hello.wasm");
    let dir = out_dir.join("instructions");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let trellis = |label: &str, wasm: &Path, reuse: &str| -> Result<(u64, u64)> {
        let node = dir.join(label);
        // A pool that fits valgrind's address space; a deadline for a slowed-down guest.
        let (manifest, port) = hello_manifest(
            &node,
            wasm,
            "max_instances = 4\n",
            ", deadline = \"60s\"",
            reuse,
        )?;
        count_instructions(
            &node.join("callgrind.out"),
            &mut trellis_command(release, &manifest, free_port()?),
            port,
            "/health/ready",
        )
    };
    let serve = |label: &str, args: &[&str], wasm: &Path| -> Result<(u64, u64)> {
        let port = free_port()?;
        count_instructions(
            &dir.join(format!("{label}.callgrind.out")),
            Command::new(&wasmtime)
                .args(["serve", "-S", "cli", "--addr", &format!("127.0.0.1:{port}")])
                .args(args)
                .arg(wasm),
            port,
            "/hello/ready",
        )
    };
    // (name, counted, compared with `wasmtime serve`'s default)
    let rows = [
        (
            "wasmtime serve 48, WASIp3 (default flags: instance reuse, no request timeout)",
            serve("serve-p3", &[], &hello_p3)?,
            true,
        ),
        (
            "wasmtime serve 48, WASIp3, -W timeout=60s (epoch interruption, as Trellis's deadlines)",
            serve("serve-p3-timeout", &["-W", "timeout=60s"], &hello_p3)?,
            true,
        ),
        (
            "trellis, WASIp3, reuse = { max_requests = 1000 } (16 at once per instance)",
            trellis("p3-reuse", &hello_p3, TRELLIS_REUSE)?,
            true,
        ),
        (
            "trellis, WASIp2 hello, fresh instance per request",
            trellis("p2-fresh", &hello, "")?,
            false,
        ),
    ];
    let serve_per_request = rows[0].1.0 as f64 / rows[0].1.1 as f64;
    let mut out = format!(
        "### Instructions per request (callgrind)\n\n\
         `valgrind --tool=callgrind`, counting only during `wrk -t1 -c8 -d{COUNTED_DURATION}` \
         (after {COUNTED_WARMUP} uncounted), GET /hello/bench; user space only\n\n\
         | server | requests counted | instructions per request | vs wasmtime serve (fewer is better) |\n\
         |---|---|---|---|\n"
    );
    for (name, (instructions, requests), compared) in rows {
        let per_request = instructions as f64 / requests as f64;
        let ratio = if compared {
            format!("{:.2}x", per_request / serve_per_request)
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "| {name} | {requests} | {per_request:.0} | {ratio} |\n"
        ));
    }
    out.push_str(
        "\nThe WASIp2 row is for tracking the fresh path, not for comparing: under valgrind, \
         wasmtime's PAGEMAP_SCAN reset of a pooled memory falls back to a memset, which a \
         real run does not do.\n\n",
    );
    Ok(out)
}

/// Runs `command` under callgrind with counting off, warms it up, counts a fixed load:
/// (instructions, requests).
fn count_instructions(
    out_file: &Path,
    command: &mut Command,
    port: u16,
    ready_path: &str,
) -> Result<(u64, u64)> {
    let program = command.get_program().to_owned();
    let mut valgrind = Command::new("valgrind");
    valgrind
        .args(["--tool=callgrind", "--instr-atstart=no"])
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(program)
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => valgrind.env(key, value),
            None => valgrind.env_remove(key),
        };
    }
    let server = Server::start("under callgrind", &mut valgrind, port, ready_path)?;
    let url = format!("http://127.0.0.1:{port}/hello/bench");
    let load = |duration: &str| -> Result<String> {
        let output = Command::new("wrk")
            .args(["-t", "1", "-c", "8", "-d", duration, &url])
            .output()
            .context("running wrk")?;
        if !output.status.success() {
            bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let control = |what: &str| -> Result<()> {
        let status = Command::new("callgrind_control")
            .arg(what)
            .arg(server.pid().to_string())
            .stdout(Stdio::null())
            .status()
            .context("running callgrind_control")?;
        if !status.success() {
            bail!("callgrind_control {what} failed with {status}");
        }
        Ok(())
    };
    load(COUNTED_WARMUP)?;
    control("--instr=on")?;
    let output = load(COUNTED_DURATION)?;
    control("--instr=off")?;
    control("--dump")?;
    let requests = output
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .context("wrk printed no request count")?;
    if output.contains("Non-2xx") {
        bail!("errors under callgrind:\n{output}");
    }
    drop(server);
    // The dump after the counted load is the one with the most instructions.
    let mut instructions = 0;
    let name = out_file
        .file_name()
        .context("no file name")?
        .to_string_lossy()
        .into_owned();
    for entry in std::fs::read_dir(out_file.parent().context("no directory")?)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(&name) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())?;
        // `summary:` heads the file (0 when counting started later), `totals:` ends it.
        let total = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("totals:")
                    .or_else(|| l.strip_prefix("summary:"))
            })
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        instructions = instructions.max(total);
    }
    if instructions == 0 || requests == 0 {
        bail!("callgrind counted nothing ({instructions} instructions, {requests} requests)");
    }
    Ok((instructions, requests))
}

/// `ROUNDS` rounds over `servers`, one after another within a round (so that drift in the
/// machine's speed hits every server alike): each server's median round, and all of its
/// rounds' requests/s.
fn interleaved_rounds(section: &str, servers: &[&Server]) -> Result<Vec<(Measured, Vec<f64>)>> {
    let mut rounds: Vec<Vec<Measured>> = servers.iter().map(|_| Vec::new()).collect();
    for round in 1..=ROUNDS {
        for (server, measured) in servers.iter().zip(rounds.iter_mut()) {
            eprintln!("== {section} round {round}/{ROUNDS}: {}", server.name);
            measured.push(measure(server)?);
        }
    }
    Ok(rounds
        .into_iter()
        .map(|mut runs| {
            let all: Vec<f64> = runs.iter().map(|m| m.requests_per_sec).collect();
            runs.sort_by(|a, b| a.requests_per_sec.total_cmp(&b.requests_per_sec));
            (runs.swap_remove(runs.len() / 2), all)
        })
        .collect())
}

fn render(results: &[(Measured, Vec<f64>)], cost: &str, metrics: &str) -> String {
    let mut out = table(results, metrics);
    out.push_str(&format!(
        "In-process, one thread, no HTTP (new Store + instantiate + call + read response): {cost}\n"
    ));
    out
}

/// The servers' table (the first is the baseline, the second `wasmtime serve`) and what
/// Trellis's metrics said about the run.
fn table(results: &[(Measured, Vec<f64>)], metrics: &str) -> String {
    let baseline = results[0].0.requests_per_sec;
    let serve = results[1].0.requests_per_sec;
    let mut out = format!(
        "wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION} --latency (each after a {WARMUP} warm-up), GET /hello/bench, \
         {ROUNDS} interleaved rounds, median round shown\n\n\
         | server | requests/s | p50 | p99 | vs native | vs wasmtime serve | server CPU per request | non-2xx | all rounds (req/s) |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for (m, all) in results {
        let all: Vec<String> = all.iter().map(|r| format!("{r:.0}")).collect();
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {:.2}x | {:.2}x | {} | {} | {} |\n",
            m.name,
            m.requests_per_sec,
            m.p50_ms,
            m.p99_ms,
            m.requests_per_sec / baseline,
            m.requests_per_sec / serve,
            m.cpu_us_per_request
                .map_or("-".into(), |c| format!("{c:.1} µs")),
            m.non_2xx,
            all.join(", ")
        ));
    }
    let mean = |series: &str| -> Option<f64> {
        let value = |suffix: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(&format!("{series}_{suffix}{{")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        Some(value("sum")? / value("count")? * 1e6)
    };
    out.push_str(&format!(
        "\nDuring the trellis run, from its /metrics: mean instantiation {:.1} µs, mean gateway time to response head {:.1} µs.\n",
        mean("trellis_instantiation_duration_seconds").unwrap_or(f64::NAN),
        mean("trellis_request_duration_seconds").unwrap_or(f64::NAN)
    ));
    out
}

/// Messages in the NATS benchmark, and key-value / SQL operations per load.
const MESSAGES: u64 = 20_000;
const STORAGE_OPS: u64 = 2_000;

/// A nats-server with JetStream (its store under `out_dir`), killed on drop.
struct NatsServer {
    child: Child,
    url: String,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nats(out_dir: &Path) -> Result<NatsServer> {
    if !Path::new("/usr/sbin/nats-server").is_file() && super::which("nats-server").is_none() {
        super::apt_install(&["nats-server"])?;
    }
    let port = free_port()?;
    let binary = if Path::new("/usr/sbin/nats-server").is_file() {
        "/usr/sbin/nats-server".into()
    } else {
        "nats-server".to_string()
    };
    let store = out_dir.join("nats-store");
    let _ = std::fs::remove_dir_all(&store);
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server")?;
    let server = NatsServer {
        child,
        url: format!("nats://127.0.0.1:{port}"),
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("nats-server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// Messages/s from NATS into a handler, key-value and SQL operations/s from inside a
/// component, each against a native baseline run on the same infrastructure.
fn capabilities(release: &Path, out_dir: &Path) -> Result<String> {
    let nats = start_nats(out_dir)?;
    capability_runs(release, out_dir, &nats.url)
}

fn capability_runs(release: &Path, out_dir: &Path, nats_url: &str) -> Result<String> {
    let baseline = release.join("examples/capability_baseline");
    let native_nats =
        run_baseline(Command::new(&baseline).args(["nats", nats_url, &MESSAGES.to_string()]))?;
    let storage_dir = out_dir.join("baseline-data");
    let _ = std::fs::remove_dir_all(&storage_dir);
    let native_storage = run_baseline(
        Command::new(&baseline)
            .arg("storage")
            .arg(&storage_dir)
            .arg(STORAGE_OPS.to_string()),
    )?;

    let port = free_port()?;
    let data = out_dir.join("capability-data");
    let _ = std::fs::remove_dir_all(&data);
    let wasm = release.parent().unwrap().join("wasm");
    let manifest = out_dir.join("capabilities.toml");
    std::fs::write(
        &manifest,
        format!(
            "[node]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\nnats_url = \"{nats_url}\"\n\
             [node.events]\ndurable = false\n\n\
             [components.producer]\nsource = \"{msg}\"\nroutes = [\"/producer\"]\nkeyvalue = [\"default\"]\npublish = [\"bench.>\"]\n\n\
             [components.sink]\nsource = \"{msg}\"\nroutes = [\"/sink\"]\nkeyvalue = [\"default\"]\nsubscriptions = [\"bench.fresh.>\"]\n\
             limits = {{ max_concurrent = 64 }}\n\n\
             [components.sink-warm]\nsource = \"{msg}\"\nroutes = [\"/sink-warm\"]\nkeyvalue = [\"default\"]\nsubscriptions = [\"bench.warm.>\"]\n\
             limits = {{ max_concurrent = 64 }}\n{TRELLIS_REUSE}\n\n\
             [components.kv]\nsource = \"{kv}\"\nroutes = [\"/store\"]\nkeyvalue = [\"default\"]\nlimits = {{ deadline = \"60s\" }}\n\n\
             [components.sql]\nsource = \"{sql}\"\nroutes = [\"/sql\"]\nsql = true\nlimits = {{ deadline = \"60s\", max_body = \"16MiB\" }}\n",
            data = data.display(),
            msg = wasm.join("msg-probe.wasm").display(),
            kv = wasm.join("kv-probe.wasm").display(),
            sql = wasm.join("sql-probe.wasm").display(),
        ),
    )?;
    let node = start_trellis("trellis capabilities", release, &manifest, port)?;

    // Messages: one guest publishes them all; count what the sink's handler accepted. A
    // fresh instance per message, then the same through warm instances.
    let mut message_rates = Vec::new();
    for (subject, sink) in [
        ("bench.fresh.load", "sink"),
        ("bench.warm.load", "sink-warm"),
    ] {
        let started = Instant::now();
        http_post(
            port,
            &format!("/producer/publish-many/{subject}?n={MESSAGES}"),
            "",
        )?;
        wait_until_handled(&node, sink, MESSAGES, started, Duration::from_secs(120))?;
        message_rates.push(MESSAGES as f64 / started.elapsed().as_secs_f64());
    }
    let (messages_per_sec, warm_messages_per_sec) = (message_rates[0], message_rates[1]);

    let started = Instant::now();
    http_post(port, &format!("/store/bench/default?n={STORAGE_OPS}"), "")?;
    let kv_per_sec = (2 * STORAGE_OPS) as f64 / started.elapsed().as_secs_f64();

    let mut statements =
        vec![r#"{"execute":"CREATE TABLE bench (id BIGINT PRIMARY KEY, name TEXT)"}"#.to_string()];
    statements.extend((0..STORAGE_OPS).map(|i| {
        format!(r#"{{"execute":"INSERT INTO bench (id, name) VALUES ($1, $2)","params":[{i},"row {i}"]}}"#)
    }));
    statements.extend((0..STORAGE_OPS).map(|i| {
        format!(r#"{{"query":"SELECT id, name FROM bench WHERE id = $1","params":[{i}]}}"#)
    }));
    let script = format!(r#"{{"statements":[{}]}}"#, statements.join(","));
    let started = Instant::now();
    let answer = http_post(port, "/sql", &script)?;
    let sql_per_sec = (2 * STORAGE_OPS + 1) as f64 / started.elapsed().as_secs_f64();
    if answer.contains("\"error\"") {
        bail!(
            "the SQL load failed: {}",
            answer.lines().last().unwrap_or_default()
        );
    }
    drop(node);

    let native = |text: &str, key: &str| -> f64 {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let rows = [
        (
            "messages from core NATS into a handler component (one node, events at most once)",
            messages_per_sec,
            native(&native_nats, "messages_per_sec"),
            "async-nats queue subscriber",
        ),
        (
            "the same into a handler reusing warm instances (`reuse`)",
            warm_messages_per_sec,
            native(&native_nats, "messages_per_sec"),
            "async-nats queue subscriber",
        ),
        (
            "key-value set/get from inside a component (SQLite)",
            kv_per_sec,
            native(&native_storage, "kv_ops_per_sec"),
            "the same backend called natively",
        ),
        (
            "SQL insert/select by key from inside a component (SQLite)",
            sql_per_sec,
            native(&native_storage, "sql_ops_per_sec"),
            "the same statements through sqlx",
        ),
    ];
    let mut out = format!(
        "\nCapabilities: {MESSAGES} messages published by one guest into NATS and handled by another \
         (a fresh instance each, then warm instances); {STORAGE_OPS} sets + {STORAGE_OPS} gets, and {STORAGE_OPS} inserts + \
         {STORAGE_OPS} selects, each a host call from one guest request\n\n\
         | load | trellis ops/s | native ops/s | trellis vs native | native baseline |\n|---|---|---|---|---|\n"
    );
    for (load, trellis, native, baseline) in rows {
        out.push_str(&format!(
            "| {load} | {trellis:.0} | {native:.0} | {:.2}x | {baseline} |\n",
            trellis / native
        ));
    }
    Ok(out)
}

/// Waits until `component`'s handler has accepted `count` messages, at most `patience`
/// after `started`.
fn wait_until_handled(
    node: &Server,
    component: &str,
    count: u64,
    started: Instant,
    patience: Duration,
) -> Result<()> {
    let line =
        format!("trellis_messages_handled_total{{tenant=\"default\",component=\"{component}\"}}");
    loop {
        let metrics = node.metrics()?;
        let handled = metrics
            .lines()
            .find(|l| l.starts_with(&line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if handled >= count as f64 {
            return Ok(());
        }
        if started.elapsed() > patience {
            bail!("only {handled} of {count} messages were handled within {patience:?}");
        }
        // Fine-grained: 20,000 warm messages take ~40 ms, and a 10 ms poll added up to a
        // quarter to what was measured.
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Events in the events benchmark, and the guest requests publishing them at once.
const EVENTS: u64 = 20_000;
const PUBLISHERS: u64 = 8;

/// Events/s from publishing guests into a handler component, durable against at most
/// once, on NATS and embedded, all in this run.
fn events(release: &Path, out_dir: &Path) -> Result<String> {
    let nats = start_nats(out_dir)?;
    let mut rows = Vec::new();
    for (label, nats_url, durable) in [
        ("core NATS, at most once", Some(nats.url.as_str()), false),
        ("JetStream, durable", Some(nats.url.as_str()), true),
        ("in-process bus, at most once", None, false),
        ("local queue (SQLite), durable", None, true),
    ] {
        eprintln!("== events: {label}");
        rows.push((
            label,
            durable,
            event_rate(release, out_dir, nats_url, durable)?,
        ));
    }
    let mut out = format!(
        "\n### Events into a handler\n\n\
         {EVENTS} events published by {PUBLISHERS} concurrent guest requests (`msg-probe` \
         `publish-many`) and handled by another component (a fresh instance each, \
         `max_concurrent = 64`), timed from the first publish until the handler's \
         counter reaches {EVENTS}. Durable: each `publish` returns once the event is stored; \
         each handled event is acknowledged.\n\n\
         | delivery | events/s | durable vs at most once on the same transport |\n|---|---|---|\n"
    );
    for pair in rows.chunks(2) {
        let (core_label, _, core) = pair[0];
        let (durable_label, _, durable) = pair[1];
        out.push_str(&format!("| {core_label} | {core:.0} | 1.00x |\n"));
        out.push_str(&format!(
            "| {durable_label} | {durable:.0} | {:.2}x |\n",
            durable / core
        ));
    }
    Ok(out)
}

fn event_rate(
    release: &Path,
    out_dir: &Path,
    nats_url: Option<&str>,
    durable: bool,
) -> Result<f64> {
    let port = free_port()?;
    let data = out_dir.join("events-data");
    let _ = std::fs::remove_dir_all(&data);
    let msg = release.parent().unwrap().join("wasm/msg-probe.wasm");
    let manifest = out_dir.join("events.toml");
    let nats_line = nats_url
        .map(|url| format!("nats_url = \"{url}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &manifest,
        format!(
            "[node]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\n{nats_line}\
             [node.events]\ndurable = {durable}\n\n\
             [components.producer]\nsource = \"{msg}\"\nroutes = [\"/producer\"]\nkeyvalue = [\"default\"]\n\
             publish = [\"bench.>\"]\nlimits = {{ deadline = \"300s\" }}\n\n\
             [components.sink]\nsource = \"{msg}\"\nroutes = [\"/sink\"]\nkeyvalue = [\"default\"]\n\
             subscriptions = [\"bench.>\"]\nlimits = {{ max_concurrent = 64 }}\n",
            data = data.display(),
            msg = msg.display(),
        ),
    )?;
    let node = start_trellis("trellis events", release, &manifest, port)?;
    let started = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            std::thread::spawn(move || {
                http_post(
                    port,
                    &format!(
                        "/producer/publish-many/bench.load?n={}",
                        EVENTS / PUBLISHERS
                    ),
                    "",
                )
            })
        })
        .collect();
    for publisher in publishers {
        let answer = publisher.join().expect("publisher thread")?;
        if !answer.contains("\"failed\":0") {
            bail!("some publishes failed: {answer}");
        }
    }
    wait_until_handled(&node, "sink", EVENTS, started, Duration::from_secs(300))?;
    Ok(EVENTS as f64 / started.elapsed().as_secs_f64())
}

/// Order placement through the gateway on the shop example (SQLite, in-process bus): the
/// whole flow of `POST /api/v1/orders` (token check, user check, stock reservation, the
/// order stored, `order.created` published), with the events' work (payment,
/// confirmation, notifications) running on the same cores. Against the native storage
/// floor (`order_baseline`): the same SQL on the same databases, with no HTTP or Wasm.
/// A shop node with a customer, a product and a wrk script placing one-line orders.
struct ShopNode {
    server: Server,
    script: std::path::PathBuf,
}

impl ShopNode {
    fn start(release: &Path, manifest: &Path, out_dir: &Path, data: &str) -> Result<ShopNode> {
        let data = out_dir.join(data);
        let _ = std::fs::remove_dir_all(&data);
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let server = start_trellis_with(
            "trellis shop",
            release,
            manifest,
            port,
            &[
                "--listen".as_ref(),
                listen.as_ref(),
                "--data-dir".as_ref(),
                data.as_os_str(),
            ],
        )?;
        let json = "content-type: application/json";
        for (email, password) in [
            ("admin@shop.example", "admin-password"),
            ("bench@example.com", "bench-password"),
        ] {
            let body = format!(r#"{{"email":"{email}","password":"{password}","name":"Bench"}}"#);
            exchange(port, "POST", "/api/v1/users", &[json], &body, 201)?;
        }
        let login = |email: &str, password: &str| -> Result<String> {
            let body = format!(r#"{{"email":"{email}","password":"{password}"}}"#);
            let answer = exchange(port, "POST", "/api/v1/auth/login", &[json], &body, 200)?;
            json_string_field(&answer, "token").context("login answered no token")
        };
        let admin = format!(
            "authorization: Bearer {}",
            login("admin@shop.example", "admin-password")?
        );
        let customer = login("bench@example.com", "bench-password")?;
        let product = exchange(
            port,
            "POST",
            "/api/v1/products",
            &[json, &admin],
            r#"{"sku":"BENCH","name":"Bench","price_cents":100,"stock":1000000000}"#,
            201,
        )?;
        let product = json_string_field(&product, "id").context("no product id")?;
        let script = data.with_extension("lua");
        std::fs::write(
            &script,
            format!(
                "wrk.method = \"POST\"\nwrk.headers[\"content-type\"] = \"application/json\"\n\
                 wrk.headers[\"authorization\"] = \"Bearer {customer}\"\n\
                 wrk.body = '{{\"items\":[{{\"product_id\":\"{product}\",\"quantity\":1}}]}}'\n"
            ),
        )?;
        Ok(ShopNode { server, script })
    }
}

fn shop_orders(root: &Path, release: &Path, out_dir: &Path) -> Result<String> {
    // The same shop with its events at most once: the cost of durable events.
    let text = std::fs::read_to_string(root.join("examples/shop/trellis.toml"))?;
    let ephemeral_manifest = out_dir.join("shop-at-most-once.toml");
    std::fs::write(
        &ephemeral_manifest,
        format!(
            "[node.events]\ndurable = false\n\n{}",
            text.replace("\"../../", &format!("\"{}/", root.display()))
        ),
    )?;
    let durable = ShopNode::start(
        release,
        &root.join("examples/shop/trellis.toml"),
        out_dir,
        "shop-data",
    )?;
    let ephemeral = ShopNode::start(
        release,
        &ephemeral_manifest,
        out_dir,
        "shop-data-at-most-once",
    )?;
    let load_with = |shop: &ShopNode, connections: &str, duration: &str| -> Result<String> {
        let output = Command::new("wrk")
            .args([
                "-t",
                THREADS,
                "-c",
                connections,
                "-d",
                duration,
                "--latency",
                "-s",
            ])
            .arg(&shop.script)
            .arg(format!(
                "http://127.0.0.1:{}/api/v1/orders",
                shop.server.port
            ))
            .output()
            .context("running wrk")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let load = |shop: &ShopNode, duration: &str| load_with(shop, CONNECTIONS, duration);
    let measure = |output: &str| -> Result<(f64, f64, f64, f64)> {
        Ok((
            field(output, "Requests/sec:").context("wrk printed no Requests/sec")?,
            latency(output, "50%").context("no p50")?,
            latency(output, "99%").context("no p99")?,
            field(output, "Non-2xx or 3xx responses:").unwrap_or(0.0),
        ))
    };
    eprintln!("== shop: order placement");
    load(&durable, WARMUP)?;
    load(&ephemeral, WARMUP)?;
    let mut rounds = Vec::new();
    let mut ephemeral_rounds = Vec::new();
    for _ in 0..ROUNDS {
        rounds.push(measure(&load(&durable, DURATION)?)?);
        ephemeral_rounds.push(measure(&load(&ephemeral, DURATION)?)?);
    }
    // Latency when the node is not saturated: a few clients at a time.
    let light = measure(&load_with(&durable, LIGHT_CONNECTIONS, DURATION)?)?;
    let metrics = durable.server.metrics()?;
    drop((durable, ephemeral));
    rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (orders, p50, p99, non_2xx) = rounds[rounds.len() / 2];
    ephemeral_rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let ephemeral = ephemeral_rounds[ephemeral_rounds.len() / 2];

    let baseline_dir = out_dir.join("order-baseline");
    let _ = std::fs::remove_dir_all(&baseline_dir);
    let native = run_baseline(
        Command::new(release.join("examples/order_baseline"))
            .arg(&baseline_dir)
            .arg(root.join("components"))
            .arg(DURATION.trim_end_matches('s'))
            .arg(CONNECTIONS),
    )?;
    let value = |name: &str| -> Result<f64> {
        native
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("order_baseline printed no {name}: {native}"))
    };
    let (native_orders, native_p50, native_p99) =
        (value("orders_per_sec")?, value("p50_ms")?, value("p99_ms")?);
    let handled = metrics
        .lines()
        .filter(|l| l.starts_with("trellis_messages_handled_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    let all: Vec<String> = rounds.iter().map(|r| format!("{:.0}", r.0)).collect();
    Ok(format!(
        "\n### Shop: order placement (SQLite, in-process bus)\n\n\
         wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION} --latency, POST /api/v1/orders (one line), after a {WARMUP} warm-up, \
         {ROUNDS} rounds, median shown; the events' work runs on the same cores\n\n\
         | what | orders/s | p50 | p99 | vs native | non-2xx | all rounds |\n|---|---|---|---|---|---|---|\n\
         | native storage floor (order_baseline: same SQL, same databases, no HTTP/Wasm) | {native_orders:.0} | {native_p50:.2} ms | {native_p99:.2} ms | 1.00x | - | - |\n\
         | trellis shop, whole flow through the gateway | {orders:.0} | {p50:.2} ms | {p99:.2} ms | {:.2}x | {non_2xx:.0} | {} |\n\
         | the same, {LIGHT_CONNECTIONS} connections (not saturated) | {:.0} | {:.2} ms | {:.2} ms | - | - | - |\n\
         | the same, events at most once (`node.events.durable = false`), interleaved rounds | {:.0} | {:.2} ms | {:.2} ms | {:.2}x | {:.0} | {} |\n\n\
         Durable events (the default, a local SQLite queue) against at most once: {:.2}x the orders/s.\n\
         Messages handled by the shop's components during the durable run: {handled:.0}.\n",
        orders / native_orders,
        all.join(", "),
        light.0,
        light.1,
        light.2,
        ephemeral.0,
        ephemeral.1,
        ephemeral.2,
        ephemeral.0 / native_orders,
        ephemeral.3,
        ephemeral_rounds
            .iter()
            .map(|r| format!("{:.0}", r.0))
            .collect::<Vec<_>>()
            .join(", "),
        orders / ephemeral.0,
    ))
}

/// Hot deploy: how long an upload of the shop's `order` takes until it serves (compiled
/// from scratch; the same bytes again for another component, sharing the compiled code;
/// on a new node whose on-disk compile cache knows the bytes), and hello's requests/s
/// while its entry is changed (a new version built and swapped in) every 100 ms, against
/// the same load without swaps, in interleaved rounds.
fn hot_deploy(root: &Path, release: &Path, out_dir: &Path) -> Result<String> {
    let cache = out_dir.join("deploy-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let hello = root.join("target/wasm/hello.wasm");
    let order = std::fs::read(root.join("target/wasm/order.wasm"))?;
    let migrations = root.join("components/order/migrations");
    let start_node = |label: &'static str, data: &str| -> Result<Server> {
        let data = out_dir.join(data);
        let _ = std::fs::remove_dir_all(&data);
        let port = free_port()?;
        let manifest = out_dir.join(format!(
            "{data}.toml",
            data = data.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(
            &manifest,
            format!(
                "[node]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\ncache_dir = \"{cache}\"\n\n\
                 [components.hello]\nsource = \"{hello}\"\nroutes = [\"/hello\"]\n\
                 limits = {{ max_concurrent = 256 }}\n",
                data = data.display(),
                cache = cache.display(),
                hello = hello.display()
            ),
        )?;
        start_trellis(label, release, &manifest, port)
    };
    // Upload to serving: from the first byte of the upload until the route answers.
    let deploy = |node: &Server, name: &str| -> Result<f64> {
        let entry = format!(
            r#"{{"routes":["/{name}"],"sql":true,"migrations":"{}","config":{{"JWT_SECRET":"bench-secret-0123456789-0123456789-abcdef"}}}}"#,
            migrations.display()
        );
        let component = format!("/v1/tenants/default/components/{name}");
        node.admin("PUT", &component, entry.as_bytes(), 201)?;
        let started = Instant::now();
        node.admin(
            "POST",
            &format!("{component}/versions?activate=true"),
            &order,
            201,
        )?;
        // The order service answers its own 404 for this path: it is serving.
        exchange(node.port, "GET", &format!("/{name}"), &[], "", 404)?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    eprintln!("== hot deploy: upload to serving");
    let node = start_node("trellis deploy (cold cache)", "deploy-data-a")?;
    let uncached = deploy(&node, "order1")?;
    let shared = deploy(&node, "order2")?;
    drop(node);
    let node = start_node("trellis deploy (warm cache)", "deploy-data-b")?;
    let disk_cached = deploy(&node, "order1")?;

    // Requests/s with and without a swap every 100 ms.
    let url = format!("http://127.0.0.1:{}/hello/bench", node.port);
    wrk(&url, WARMUP)?;
    let mut steady = Vec::new();
    let mut swapping = Vec::new();
    let mut swaps = 0;
    for round in 1..=ROUNDS {
        eprintln!("== hot deploy: round {round}/{ROUNDS} without swaps");
        steady.push(field(&wrk(&url, DURATION)?, "Requests/sec:").context("no Requests/sec")?);
        eprintln!("== hot deploy: round {round}/{ROUNDS} swapping every 100 ms");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let stop = stop.clone();
            let admin_port = node.admin_port.context("admin port")?;
            std::thread::spawn(move || -> Result<u32> {
                let auth = format!("authorization: Bearer {ADMIN_TOKEN}");
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let entry = format!(
                        r#"{{"routes":["/hello"],"limits":{{"max_concurrent":256}},"config":{{"SWAP":"{n}"}}}}"#
                    );
                    exchange(
                        admin_port,
                        "PUT",
                        "/v1/tenants/default/components/hello",
                        &[&auth],
                        &entry,
                        200,
                    )?;
                    n += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(n)
            })
        };
        let output = wrk(&url, DURATION)?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swaps += swapper
            .join()
            .map_err(|_| anyhow::anyhow!("the swapper panicked"))??;
        if field(&output, "Non-2xx or 3xx responses:").unwrap_or(0.0) > 0.0 {
            bail!("requests failed while swapping:\n{output}");
        }
        swapping.push(field(&output, "Requests/sec:").context("no Requests/sec")?);
    }
    drop(node);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (steady_rps, swapping_rps) = (median(steady.clone()), median(swapping.clone()));
    let list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(format!(
        "\n### Hot deploy\n\n\
         Upload to serving, the shop's `order` ({} KB): `POST .../versions?activate=true` (compile, migrations, link, \
         one trial instance, swap) until its route answers\n\n\
         | case | upload to serving |\n|---|---|\n\
         | new bytes, empty compile cache | {uncached:.0} ms |\n\
         | the same bytes for a second component (compiled code shared in memory) | {shared:.0} ms |\n\
         | a new node whose on-disk compile cache knows the bytes | {disk_cached:.0} ms |\n\n\
         hello under wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION}, with its entry changed (a new version built, \
         checked and swapped in) every 100 ms ({swaps} swaps in all, no failed request), against the same load \
         without swaps; {ROUNDS} interleaved rounds, median shown\n\n\
         | load | requests/s | vs without swaps | all rounds |\n|---|---|---|---|\n\
         | no swaps | {steady_rps:.0} | 1.00x | {} |\n\
         | a swap every 100 ms | {swapping_rps:.0} | {:.2}x | {} |\n",
        order.len() / 1000,
        list(&steady),
        swapping_rps / steady_rps,
        list(&swapping),
    ))
}

/// Requests in the memory benchmark.
const GROWERS: usize = 1_000;

/// Node memory: resident set size of a node while 1,000 requests in a row each grow a
/// guest's memory to its 64 MiB cap (the probe's `/grow`, which then traps at the cap),
/// and once idle afterwards, against the cap and the node's budget.
fn memory(root: &Path, release: &Path, out_dir: &Path) -> Result<String> {
    let data = out_dir.join("memory-data");
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port()?;
    let manifest = out_dir.join("memory.toml");
    std::fs::write(
        &manifest,
        format!(
            "[node]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\nmax_memory = \"1GiB\"\n\n\
             [components.grower]\nsource = \"{probe}\"\nroutes = [\"/\"]\nlimits = {{ memory = \"64MiB\" }}\n",
            data = data.display(),
            probe = root.join("target/wasm/probe.wasm").display()
        ),
    )?;
    let node = start_trellis("trellis memory", release, &manifest, port)?;
    let pid = node.pid();
    let at_start = rss(pid).unwrap_or(0);
    eprintln!("== memory: {GROWERS} requests growing to 64 MiB each");
    let started = Instant::now();
    let mut peak = at_start;
    for _ in 0..GROWERS {
        exchange(port, "GET", "/grow", &[], "", 500)?;
        peak = peak.max(rss(pid).unwrap_or(0));
    }
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss(pid).unwrap_or(0);
    drop(node);
    Ok(format!(
        "\n### Node memory\n\n\
         {GROWERS} requests in a row, each growing the probe's memory to its 64 MiB cap (then trapping there); \
         node.max_memory = 1 GiB; resident set size of the node process (VmRSS), read after every request\n\n\
         | when | node RSS | vs the 64 MiB cap |\n|---|---|---|\n\
         | started, ready | {:.0} MiB | {:.1}x |\n\
         | highest after any of the {GROWERS} requests ({:.1} s in all) | {:.0} MiB | {:.1}x |\n\
         | idle, 2 s after the last | {:.0} MiB | {:.1}x |\n",
        mib(at_start),
        mib(at_start) / 64.0,
        elapsed.as_secs_f64(),
        mib(peak),
        mib(peak) / 64.0,
        mib(idle),
        mib(idle) / 64.0,
    ))
}

/// Resident set size of a process, in bytes.
fn rss(pid: u32) -> Option<u64> {
    proc_status_field(pid, "VmRSS:").map(|kib| kib * 1024)
}

/// A number field of `/proc/PID/status` ("VmRSS:", "Threads:").
fn proc_status_field(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The status of one request (0 when it failed), its body unread.
fn status_of(port: u16, path: &str, host: &str) -> u16 {
    let host = format!("host: {host}");
    match exchange(port, "GET", path, &[&host], "", 200) {
        Ok(_) => 200,
        Err(e) => e
            .to_string()
            .split_once("HTTP/1.1 ")
            .and_then(|(_, rest)| rest.get(..3)?.parse().ok())
            .unwrap_or(0),
    }
}

/// wrk on one connection (each request waits for the one before): the latency a single
/// client sees. Returns (p50 ms, p99 ms, requests/s).
fn single_client(url: &str, host: &str, duration: &str) -> Result<(f64, f64, f64)> {
    let output = Command::new("wrk")
        .args(["-t", "1", "-c", "1", "-d", duration, "--latency", "-H"])
        .arg(format!("Host: {host}"))
        .arg(url)
        .output()
        .context("running wrk")?;
    let output = String::from_utf8_lossy(&output.stdout);
    Ok((
        latency(&output, "50%").context("no p50")?,
        latency(&output, "99%").context("no p99")?,
        field(&output, "Requests/sec:").context("no Requests/sec")?,
    ))
}

/// Noisy neighbours: a quiet tenant's latency alone, then while another tenant keeps its
/// instance quota full of guests that loop until their deadline or grow their memory to
/// the limit, with the node's CPU turns (`cpu_threads`, the default) and without them.
fn isolation(root: &Path, release: &Path, out_dir: &Path) -> Result<String> {
    let data = out_dir.join("isolation-data");
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port()?;
    let manifest = out_dir.join("isolation.toml");
    std::fs::write(
        &manifest,
        format!(
            "[node]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\n\n\
             [tenants.noisy]\nhosts = [\"noisy.test\"]\nquota = {{ max_instances = {NOISY_CLIENTS}, max_memory = \"400MiB\" }}\n\n\
             [tenants.quiet]\nhosts = [\"quiet.test\"]\n\n\
             [components.noise]\ntenant = \"noisy\"\nsource = \"{probe}\"\nroutes = [\"/\"]\n\
             limits = {{ deadline = \"1s\", memory = \"48MiB\" }}\n\n\
             [components.hello]\ntenant = \"quiet\"\nsource = \"{hello}\"\nroutes = [\"/\"]\n",
            data = data.display(),
            probe = root.join("target/wasm/probe.wasm").display(),
            hello = root.join("target/wasm/hello.wasm").display(),
        ),
    )?;
    let node = start_trellis("trellis isolation", release, &manifest, port)?;
    let url = format!("http://127.0.0.1:{port}/hello/bench");
    eprintln!("== isolation: a quiet tenant next to a noisy one");
    single_client(&url, "quiet.test", WARMUP)?;

    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let paused = std::sync::Arc::new(AtomicBool::new(true));
    let noise: Vec<_> = (0..NOISY_CLIENTS)
        .map(|i| {
            let (stop, paused) = (stop.clone(), paused.clone());
            let path = if i % 2 == 0 { "/loop" } else { "/grow" };
            std::thread::spawn(move || {
                let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
                while !stop.load(Ordering::Relaxed) {
                    if paused.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    *statuses
                        .entry(status_of(port, path, "noisy.test"))
                        .or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    // Alone and beside the noise in interleaved rounds, so that the machine's own drift
    // falls on both; the median round of each is reported.
    let (mut alone, mut fair) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        paused.store(true, Ordering::Relaxed);
        // The noisy guests still running end within their 1 s deadline.
        std::thread::sleep(Duration::from_millis(1500));
        alone.push(single_client(&url, "quiet.test", DURATION)?);
        paused.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(1));
        fair.push(single_client(&url, "quiet.test", DURATION)?);
    }
    // The same neighbour with CPU turns out of the way: as many threads as it likes.
    node.admin(
        "PUT",
        "/v1/tenants/noisy",
        format!(
            r#"{{"hosts":["noisy.test"],"quota":{{"max_instances":{NOISY_CLIENTS},"max_memory":"400MiB","cpu_threads":64}}}}"#
        )
        .as_bytes(),
        200,
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let unfair = single_client(&url, "quiet.test", DURATION)?;
    stop.store(true, Ordering::Relaxed);
    let mut noisy = std::collections::BTreeMap::<u16, u64>::new();
    for thread in noise {
        for (status, count) in thread.join().expect("a noise thread") {
            *noisy.entry(status).or_default() += count;
        }
    }
    let median = |mut rounds: Vec<(f64, f64, f64)>| {
        rounds.sort_by(|a, b| a.1.total_cmp(&b.1));
        rounds[rounds.len() / 2]
    };
    let all = |rounds: &[(f64, f64, f64)]| {
        rounds
            .iter()
            .map(|r| format!("{:.2}", r.1))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (alone_rounds, fair_rounds) = (all(&alone), all(&fair));
    let (alone, fair) = (median(alone), median(fair));
    drop(node);
    let row = |label: &str, (p50, p99, rps): (f64, f64, f64)| {
        format!(
            "| {label} | {p50:.2} ms | {p99:.2} ms | {:.2}x | {rps:.0} |\n",
            p99 / alone.1
        )
    };
    let noisy_answers: Vec<String> = noisy
        .iter()
        .map(|(status, count)| format!("{count} x {status}"))
        .collect();
    Ok(format!(
        "\n### Noisy neighbours\n\n\
         The quiet tenant's hello, one client (wrk -t1 -c1, {DURATION} each); the noisy tenant keeps its \
         quota of {NOISY_CLIENTS} instances full: half its clients call a guest that loops until its 1 s deadline, \
         half one that grows its memory to its 48 MiB limit, each again as soon as it is answered \
         ({}). {ROUNDS} interleaved rounds of alone / beside the noise, the median round (by p99) shown; \
         p99 of every round: alone {alone_rounds} ms, beside the noise {fair_rounds} ms. \
         Aim: the quiet p99 within 2x of alone.\n\n\
         | quiet tenant | p50 | p99 | p99 vs alone | req/s |\n|---|---|---|---|---|\n{}{}{}",
        noisy_answers.join(", "),
        row("alone", alone),
        row("noisy neighbour, CPU turns (default cpu_threads)", fair),
        row(
            "noisy neighbour, no CPU turns (cpu_threads = 64, one round)",
            unfair
        ),
    ))
}

/// Clients the noisy tenant keeps busy (its instance quota).
const NOISY_CLIENTS: usize = 6;

/// Tenants the density section creates (`TRELLIS_BENCH_TENANTS` to change).
const DENSITY_TENANTS: usize = 1000;

/// A thousand tenants, each with the five shop components, created through the admin API
/// on one node: its memory, threads and files, the time to add a tenant, the first request
/// to a cold tenant, and requests spread across all of them.
fn density(root: &Path, release: &Path, out_dir: &Path) -> Result<String> {
    let tenants: usize = std::env::var("TRELLIS_BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DENSITY_TENANTS);
    let data = out_dir.join("density-data");
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port()?;
    let manifest = out_dir.join("density.toml");
    std::fs::write(
        &manifest,
        format!(
            "[node]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n",
            data.display()
        ),
    )?;
    let node = start_trellis("trellis density", release, &manifest, port)?;
    let pid = node.pid();
    let at_start = rss(pid).unwrap_or(0);
    let services = ["user", "product", "order", "payment", "notification"];
    let code: Vec<Vec<u8>> = services
        .iter()
        .map(|s| std::fs::read(root.join(format!("target/wasm/{s}.wasm"))))
        .collect::<std::io::Result<_>>()?;
    let migrations = |s: &str| {
        root.join(format!("components/{s}/migrations"))
            .display()
            .to_string()
    };
    let entries = [
        format!(
            r#"{{"routes":["/api/v1/users","/api/v1/auth"],"sql":true,"migrations":"{}","limits":{{"memory":"64MiB"}}}}"#,
            migrations("user")
        ),
        format!(
            r#"{{"routes":["/api/v1/products"],"sql":true,"migrations":"{}","limits":{{"memory":"32MiB"}}}}"#,
            migrations("product")
        ),
        format!(
            r#"{{"routes":["/api/v1/orders"],"sql":true,"migrations":"{}","outbound":["user.internal","product.internal"],"subscriptions":["payment.succeeded","payment.failed"],"publish":["order.*"],"limits":{{"memory":"32MiB"}}}}"#,
            migrations("order")
        ),
        format!(
            r#"{{"routes":["/api/v1/payments"],"sql":true,"migrations":"{}","outbound":["order.internal"],"subscriptions":["order.created","order.cancelled"],"publish":["payment.*"],"config":{{"MAX_AMOUNT_CENTS":"1000000"}},"limits":{{"memory":"32MiB"}}}}"#,
            migrations("payment")
        ),
        format!(
            r#"{{"routes":["/api/v1/notifications"],"sql":true,"migrations":"{}","subscriptions":["order.created","order.confirmed","order.cancelled","order.shipped","order.delivered","payment.failed"],"limits":{{"memory":"32MiB"}}}}"#,
            migrations("notification")
        ),
    ];
    eprintln!("== density: {tenants} tenants x 5 shop components");
    let host = |t: usize| format!("t{t:04}.shop.test");
    let started = Instant::now();
    let mut per_tenant = Vec::with_capacity(tenants);
    for t in 0..tenants {
        let began = Instant::now();
        node.admin(
            "PUT",
            &format!("/v1/tenants/t{t:04}"),
            format!(
                r#"{{"hosts":["{}"],"config":{{"JWT_SECRET":"density-secret-{t:04}-0123456789abcdef0123","ADMIN_EMAILS":"admin@shop.example"}}}}"#,
                host(t)
            )
            .as_bytes(),
            201,
        )?;
        for ((service, entry), bytes) in services.iter().zip(&entries).zip(&code) {
            let path = format!("/v1/tenants/t{t:04}/components/{service}");
            node.admin("PUT", &path, entry.as_bytes(), 201)?;
            node.admin(
                "POST",
                &format!("{path}/versions?activate=true"),
                bytes,
                201,
            )?;
        }
        per_tenant.push(began.elapsed().as_secs_f64() * 1000.0);
        if (t + 1) % 100 == 0 {
            eprintln!(
                "   {} tenants, {:.0} s, RSS {:.0} MiB",
                t + 1,
                started.elapsed().as_secs_f64(),
                mib(rss(pid).unwrap_or(0))
            );
        }
    }
    let deployed_in = started.elapsed();
    let after_deploy = (
        rss(pid).unwrap_or(0),
        proc_status_field(pid, "Threads:").unwrap_or(0),
        open_files(pid),
    );
    // Idle: every database connection closed (storage::IDLE_CONNECTION, 10 s, checked as often).
    std::thread::sleep(Duration::from_secs(25));
    let idle = (
        rss(pid).unwrap_or(0),
        proc_status_field(pid, "Threads:").unwrap_or(0),
        open_files(pid),
    );
    // The first request to tenants nobody has called yet.
    let mut cold = Vec::new();
    for t in (0..tenants).step_by((tenants / 10).max(1)) {
        let began = Instant::now();
        let status = status_of(port, "/api/v1/products", &host(t));
        if status != 200 {
            bail!("GET /api/v1/products on {} answered {status}", host(t));
        }
        cold.push(began.elapsed().as_secs_f64() * 1000.0);
    }
    // Requests spread across every tenant.
    let script = out_dir.join("density.lua");
    std::fs::write(
        &script,
        format!(
            "request = function()\n  wrk.headers[\"Host\"] = string.format(\"t%04d.shop.test\", math.random(0, {}))\n  \
             return wrk.format(\"GET\", \"/api/v1/products\")\nend\n",
            tenants - 1
        ),
    )?;
    let output = Command::new("wrk")
        .args([
            "-t",
            THREADS,
            "-c",
            CONNECTIONS,
            "-d",
            DURATION,
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/api/v1/products"))
        .output()
        .context("running wrk")?;
    let output = String::from_utf8_lossy(&output.stdout);
    let spread = (
        field(&output, "Requests/sec:").context("no Requests/sec")?,
        latency(&output, "50%").context("no p50")?,
        latency(&output, "99%").context("no p99")?,
        field(&output, "Non-2xx or 3xx responses:").unwrap_or(0.0),
    );
    let under_load = (
        rss(pid).unwrap_or(0),
        proc_status_field(pid, "Threads:").unwrap_or(0),
        open_files(pid),
    );
    drop(node);
    per_tenant.sort_by(f64::total_cmp);
    cold.sort_by(f64::total_cmp);
    let pct = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let state = |label: &str, (bytes, threads, files): (u64, u64, usize)| {
        format!(
            "| {label} | {:.0} MiB | {threads} | {files} |\n",
            mib(bytes)
        )
    };
    Ok(format!(
        "\n### Density\n\n\
         {tenants} tenants created through the admin API on one node (SQLite, in-process bus), each with \
         its own host and the five shop components (the same bytes for every tenant, so compiled once), \
         then left idle, then called. Aim: under 1 GiB resident.\n\n\
         | node | RSS | threads | open files |\n|---|---|---|---|\n{}{}{}{}\n\
         - Creating a tenant and deploying its five components (each: entry, upload, migrations, a trial \
         instance): median {:.0} ms, p99 {:.0} ms; {tenants} tenants in {:.0} s.\n\
         - First request to a tenant nobody had called (GET /api/v1/products, its database closed): \
         median {:.1} ms, slowest {:.1} ms.\n\
         - Requests spread at random over all {tenants} tenants (wrk, {CONNECTIONS} connections, {DURATION}): \
         {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} non-2xx.\n",
        state("started, no tenants", (at_start, 0, 0)).replace("| 0 | 0 |", "| - | - |"),
        state(&format!("{tenants} tenants deployed"), after_deploy),
        state("idle 25 s later", idle),
        state("after the spread load", under_load),
        pct(&per_tenant, 0.5),
        pct(&per_tenant, 0.99),
        deployed_in.as_secs_f64(),
        pct(&cold, 0.5),
        cold.last().copied().unwrap_or(0.0),
        spread.0,
        spread.1,
        spread.2,
        spread.3,
    ))
}

/// `"name":"value"` out of a JSON answer (the xtask has no JSON parser).
fn json_string_field(body: &str, name: &str) -> Option<String> {
    let start = body.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let end = start + body[start..].find('"')?;
    Some(body[start..end].to_string())
}

/// One request with extra headers; fails unless the status is `expect`. Returns the body.
fn exchange(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
    expect: u16,
) -> Result<String> {
    exchange_bytes(port, method, path, headers, body.as_bytes(), expect)
}

fn exchange_bytes(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
    expect: u16,
) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        extra.insert_str(0, "host: 127.0.0.1\r\n");
    }
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with(&format!("HTTP/1.1 {expect}")) {
        bail!("{method} {path}: {response}");
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

fn run_baseline(command: &mut Command) -> Result<String> {
    let output = command
        .env_remove("RUST_BACKTRACE")
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The admin token of every node the benchmark starts.
const ADMIN_TOKEN: &str = "bench-admin-token";

/// A release Trellis node on `manifest` (plus `args`), ready when its `/health/ready` says
/// so, with its admin API on a free port.
fn start_trellis(name: &'static str, release: &Path, manifest: &Path, port: u16) -> Result<Server> {
    start_trellis_with(name, release, manifest, port, &[])
}

fn start_trellis_with(
    name: &'static str,
    release: &Path,
    manifest: &Path,
    port: u16,
    args: &[&std::ffi::OsStr],
) -> Result<Server> {
    let admin_port = free_port()?;
    let mut server = Server::start(
        name,
        trellis_command(release, manifest, admin_port).args(args),
        port,
        "/health/ready",
    )?;
    server.admin_port = Some(admin_port);
    Ok(server)
}

/// `trellis up manifest` with its admin API on `admin_port` and warnings logged.
fn trellis_command(release: &Path, manifest: &Path, admin_port: u16) -> Command {
    let mut command = Command::new(release.join("trellis"));
    command
        .arg("up")
        .arg(manifest)
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .env("TRELLIS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("TRELLIS_LOG", "warn");
    command
}

impl Server {
    /// A call to the node's admin API; fails unless the status is `expect`.
    fn admin(&self, method: &str, path: &str, body: &[u8], expect: u16) -> Result<String> {
        let port = self.admin_port.context("not a trellis node")?;
        let auth = format!("authorization: Bearer {ADMIN_TOKEN}");
        exchange_bytes(port, method, path, &[&auth], body, expect)
    }

    fn metrics(&self) -> Result<String> {
        self.admin("GET", "/metrics", b"", 200)
    }
}

/// A server process, killed on drop.
struct Server {
    name: &'static str,
    port: u16,
    /// A Trellis node's admin API.
    admin_port: Option<u16>,
    child: Child,
}

impl Server {
    /// Starts the server and waits until `ready_path` answers 200.
    fn start(
        name: &'static str,
        command: &mut Command,
        port: u16,
        ready_path: &str,
    ) -> Result<Self> {
        // A developer's RUST_BACKTRACE=1 makes every error capture a backtrace, which
        // costs real time per request in every server; measure without it.
        command
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        // The server's log goes to a file: a pipe nobody reads fills up and then blocks a
        // server that logs (a warning per failed request, say) in the middle of a load.
        let log_path = std::env::temp_dir().join(format!(
            "trellis-bench-{}-{port}.log",
            name.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        ));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let mut server = Server {
            name,
            port,
            admin_port: None,
            child,
        };
        let started = Instant::now();
        loop {
            if http_get(port, ready_path).is_ok() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{command:?} exited with {status}:\n{stderr}");
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("{command:?} did not answer within 120 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn measure(server: &Server) -> Result<Measured> {
    let url = format!("http://127.0.0.1:{}/hello/bench", server.port);
    let pid = server.pid();
    wrk(&url, WARMUP)?;
    let cpu_before = cpu_ticks(pid);
    let output = wrk(&url, DURATION)?;
    let cpu_after = cpu_ticks(pid);
    let requests_per_sec =
        field(&output, "Requests/sec:").context("wrk printed no Requests/sec")?;
    let total_requests = output
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok());
    let cpu_us_per_request = match (cpu_before, cpu_after, total_requests) {
        (Some(before), Some(after), Some(total)) if total > 0.0 => {
            Some((after - before) as f64 / clock_ticks_per_second() * 1e6 / total)
        }
        _ => None,
    };
    Ok(Measured {
        name: server.name,
        requests_per_sec,
        p50_ms: latency(&output, "50%").context("wrk printed no p50")?,
        p99_ms: latency(&output, "99%").context("wrk printed no p99")?,
        non_2xx: field(&output, "Non-2xx or 3xx responses:").map_or(0, |n| n as u64),
        cpu_us_per_request,
    })
}

fn wrk(url: &str, duration: &str) -> Result<String> {
    let output = Command::new("wrk")
        .args([
            "-t",
            THREADS,
            "-c",
            CONNECTIONS,
            "-d",
            duration,
            "--latency",
            url,
        ])
        .output()
        .context("running wrk")?;
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn field(output: &str, label: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|v| v.trim().parse().ok())
}

/// A latency percentile line of `wrk --latency` ("     99%    1.23ms"), in ms.
fn latency(output: &str, percentile: &str) -> Option<f64> {
    let value = output
        .lines()
        .find_map(|l| l.trim().strip_prefix(percentile))?
        .trim();
    let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic())?);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        _ => return None,
    })
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of /proc/PID/stat; the slice starts at field 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A minimal GET: whether a server is up, and /metrics.
fn http_get(port: u16, path: &str) -> Result<String> {
    http(port, "GET", path, "")
}

/// A minimal POST for the benchmark's loads.
fn http_post(port: u16, path: &str, body: &str) -> Result<String> {
    http(port, "POST", path, body)
}

/// One HTTP/1.1 exchange on a fresh connection; the response must be a 200. Returns the body.
fn http(port: u16, method: &str, path: &str, body: &str) -> Result<String> {
    exchange(port, method, path, &[], body, 200)
}

fn ensure_wrk() -> Result<()> {
    if super::which("wrk").is_none() {
        super::apt_install(&["wrk"])?;
    }
    Ok(())
}

fn ensure_wasmtime_cli() -> Result<std::path::PathBuf> {
    let installed = Command::new("wasmtime").arg("--version").output();
    if let Ok(output) = installed
        && String::from_utf8_lossy(&output.stdout).contains(WASMTIME_VERSION)
    {
        return Ok("wasmtime".into());
    }
    eprintln!(
        "installing wasmtime-cli {WASMTIME_VERSION} with cargo install (about 11 minutes on 2 cores)"
    );
    super::run(Command::new("cargo").args([
        "install",
        "wasmtime-cli",
        "--version",
        WASMTIME_VERSION,
        "--locked",
    ]))?;
    Ok("wasmtime".into())
}
