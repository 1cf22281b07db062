//! The `trellis` command line: `up` and `check` run a node; `deploy`, `activate`,
//! `rollback`, `canary`, `status` and `delete` talk to a running node's admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Method;
use trellis::admin::client::{AdminClient, ClientError, find_token};

/// The node's allocator. With glibc's `malloc`, WASIp3 requests spent more of the node's CPU
/// in the allocator than `wasmtime serve` does (10.4% of samples against 8.7%; jemalloc:
/// 4.9%): a request allocates on one thread and frees on another (arena locks), and every
/// allocation above 1 KiB (a delivery's boxed future, hyper's read buffer) first merged
/// glibc's fast bins. jemalloc serves those from per-thread caches, at their default sizes:
/// caches cut to 16 objects a size (chosen while every deploy left a SQLite thread behind,
/// thousands at once) cost WASIp3 requests 5.2k instructions each (4%) in refills and
/// flushes under the arena lock, and the node now runs few threads (BENCHMARKS.md, "The
/// node's allocator"). `MALLOC_CONF` in the environment still tunes it.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` runs (`MALLOC_CONF` adds to them). A thread
/// considers trimming its cache after every MiB it allocates, and every MiB it frees,
/// instead of every 64 KiB (and trims some size classes at most every 10 ms either way):
/// the checks, trims and the refills after them cost a WASIp3 request 2.6k instructions
/// (2%). An idle thread never trims either way, so what a thread can keep cached is
/// bounded as before (by the caches' sizes).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static malloc_conf: &[u8; 29] = b"tcache_gc_incr_bytes:1048576\0";

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Run microservices as sandboxed WASI 0.2 components behind one gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Log filter, in tracing's EnvFilter syntax (e.g. "info", "trellis=debug").
    #[arg(long, global = true, env = "TRELLIS_LOG", default_value = "info")]
    log: String,

    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Start a node: serve every component of the manifest until SIGINT/SIGTERM.
    Up {
        /// The node's manifest (trellis.toml).
        manifest: PathBuf,
        /// Listen on this address instead of node.listen (port 0 picks a free port; the
        /// address is printed as "trellis listening on http://ADDR").
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve the admin API on this address instead of node.admin_listen (printed as
        /// "trellis admin listening on http://ADDR").
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Keep node state here instead of node.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Keep components' data in this PostgreSQL database (postgres://...) instead of
        /// node.database_url or SQLite files.
        #[arg(long, env = "TRELLIS_DATABASE_URL")]
        database_url: Option<String>,
        /// Carry messages over this NATS server (nats://...) instead of node.nats_url or the
        /// in-process bus.
        #[arg(long, env = "TRELLIS_NATS_URL")]
        nats_url: Option<String>,
        /// Cache compiled components here instead of node.cache_dir (nodes on one machine
        /// may share one).
        #[arg(long, env = "TRELLIS_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Redeploy a component when its .wasm or its manifest entry changes.
        #[arg(long)]
        watch: bool,
    },
    /// Validate a manifest and every component it names (compile, link, instantiate)
    /// without serving. Exits 0 when everything is valid, 1 otherwise.
    Check {
        /// The manifest to check.
        manifest: PathBuf,
        /// Cache compiled components here instead of node.cache_dir.
        #[arg(long, env = "TRELLIS_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Upload a component's .wasm to a running node and activate it (or start a canary).
    Deploy {
        /// The component file, or a registry reference (oci://HOST/REPO:TAG or
        /// oci://HOST/REPO@sha256:DIGEST) for the node to pull.
        wasm: PathBuf,
        #[command(flatten)]
        target: Target,
        /// The component's entry (TOML as under [components.NAME] in a manifest, or JSON):
        /// creates the component, or changes its entry, before the upload.
        #[arg(long)]
        entry: Option<PathBuf>,
        /// Upload only; activate later with `trellis activate`.
        #[arg(long, conflicts_with = "canary")]
        no_activate: bool,
        /// Start a canary with this percentage of calls instead of activating.
        #[arg(long, value_name = "PERCENT")]
        canary: Option<u8>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Publish a component file to an OCI registry (the Wasm artifact layout wasmCloud,
    /// wkg and oci-wasm use); prints the manifest digest to deploy by.
    Push {
        /// The component file.
        wasm: PathBuf,
        /// Where: oci://HOST/REPO:TAG.
        reference: String,
        /// Registry user (default: the docker config's credentials for the registry).
        #[arg(long, env = "TRELLIS_REGISTRY_USERNAME")]
        username: Option<String>,
        /// Registry password (with --username).
        #[arg(long, env = "TRELLIS_REGISTRY_PASSWORD", requires = "username")]
        password: Option<String>,
    },
    /// Make an uploaded version active.
    Activate {
        /// The version (sha256:...), as `deploy` and `status` print it.
        version: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Go back to the previous version.
    Rollback {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Start, promote or abort a canary.
    Canary {
        #[command(subcommand)]
        action: CanaryAction,
    },
    /// Show the node's components, versions and canaries.
    Status {
        /// Only this component.
        #[arg(long, short)]
        component: Option<String>,
        /// The tenant (with --component).
        #[arg(long, short, default_value = "default")]
        tenant: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a component created through the admin API.
    Delete {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Create, change and remove tenants, and issue their tokens (operator's token).
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
}

#[derive(Subcommand)]
enum TenantAction {
    /// Every tenant with its quota and usage.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// One tenant (a tenant token may show its own).
    Show {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Create a tenant or change it: its entry (TOML as under [tenants.NAME] in a
    /// manifest, or JSON) and/or hosts.
    Put {
        name: String,
        /// The tenant's entry: hosts, config, quota.
        #[arg(long)]
        entry: Option<PathBuf>,
        /// A host it is served on (repeatable; replaces the entry's hosts).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a tenant: its traffic stops at once; its data is kept unless told.
    Remove {
        name: String,
        /// Delete its databases too.
        #[arg(long)]
        delete_data: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Issue a token that manages only this tenant (printed once; keep it).
    Token {
        name: String,
        /// A note to tell tokens apart.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke one of a tenant's tokens by id.
    Revoke {
        name: String,
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum CanaryAction {
    /// Send PERCENT of calls to an uploaded version.
    Start {
        version: String,
        #[command(flatten)]
        target: Target,
        /// Percentage of requests and messages (1-99).
        #[arg(long)]
        weight: u8,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make the canary the active version.
    Promote {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop the canary; the active version takes every call again.
    Abort {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args)]
struct Target {
    /// The component's name.
    #[arg(long, short)]
    component: String,
    /// Its tenant.
    #[arg(long, short, default_value = "default")]
    tenant: String,
}

impl Target {
    fn path(&self, rest: &str) -> String {
        format!(
            "/v1/tenants/{}/components/{}{rest}",
            self.tenant, self.component
        )
    }
}

#[derive(Args)]
struct PolicyArgs {
    /// Keep each user on one side by a hash of this request header.
    #[arg(long)]
    sticky_header: Option<String>,
    /// Keep each user on one side by a hash of this cookie.
    #[arg(long, conflicts_with = "sticky_header")]
    sticky_cookie: Option<String>,
    /// Window the failure rate is measured over (default 30s).
    #[arg(long)]
    window: Option<String>,
    /// Roll back above this failure rate in a window (0-1, default 0.1).
    #[arg(long)]
    max_failure_rate: Option<f64>,
    /// Calls a window needs before it is judged (default 10).
    #[arg(long)]
    min_requests: Option<u64>,
    /// Promote by itself after this long with a healthy window (e.g. "5m").
    #[arg(long)]
    promote_after: Option<String>,
}

impl PolicyArgs {
    fn fields(&self) -> Vec<(&'static str, serde_json::Value)> {
        let mut out = Vec::new();
        if let Some(v) = &self.sticky_header {
            out.push(("sticky_header", v.clone().into()));
        }
        if let Some(v) = &self.sticky_cookie {
            out.push(("sticky_cookie", v.clone().into()));
        }
        if let Some(v) = &self.window {
            out.push(("window", v.clone().into()));
        }
        if let Some(v) = self.max_failure_rate {
            out.push(("max_failure_rate", v.into()));
        }
        if let Some(v) = self.min_requests {
            out.push(("min_requests", v.into()));
        }
        if let Some(v) = &self.promote_after {
            out.push(("promote_after", v.clone().into()));
        }
        out
    }
}

#[derive(Args)]
struct AdminArgs {
    /// The node's admin API.
    #[arg(
        long,
        env = "TRELLIS_ADMIN_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    admin: String,
    /// The node's admin token.
    #[arg(long, env = "TRELLIS_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token (default: .trellis/admin-token, where a node started
    /// from this directory with the default data dir keeps it).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn client(&self) -> Result<AdminClient, ClientError> {
        let token = find_token(self.token.clone(), self.token_file.clone())?;
        Ok(AdminClient::new(&self.admin, token))
    }
}

fn override_cache_dir(manifest: &mut trellis::manifest::LoadedManifest, dir: Option<PathBuf>) {
    if let Some(dir) = dir {
        // wasmtime's cache insists on an absolute directory.
        manifest.manifest.node.cache_dir = Some(std::path::absolute(&dir).unwrap_or(dir));
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    let node_result = match command {
        Command::Up {
            manifest,
            listen,
            admin_listen,
            data_dir,
            database_url,
            nats_url,
            cache_dir,
            watch,
        } => {
            let started = async {
                let mut manifest = trellis::manifest::load(&manifest)?;
                let node = &mut manifest.manifest.node;
                if let Some(listen) = listen {
                    node.listen = listen;
                }
                if let Some(admin_listen) = admin_listen {
                    node.admin_listen = admin_listen;
                }
                if let Some(data_dir) = data_dir {
                    node.data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
                }
                if database_url.is_some() {
                    node.database_url = database_url;
                }
                if nats_url.is_some() {
                    node.nats_url = nats_url;
                }
                override_cache_dir(&mut manifest, cache_dir);
                trellis::node::up(manifest, trellis::node::UpOptions { watch }).await
            };
            started.await.map(|()| true)
        }
        Command::Check {
            manifest,
            cache_dir,
        } => match trellis::manifest::load(&manifest) {
            Ok(mut manifest) => {
                override_cache_dir(&mut manifest, cache_dir);
                trellis::node::check(manifest).await
            }
            Err(e) => {
                println!("FAILED  {e}");
                Ok(false)
            }
        },
        Command::Push {
            wasm,
            reference,
            username,
            password,
        } => {
            return match push(&wasm, &reference, username.zip(password)).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            };
        }
        admin_command => {
            return match admin(admin_command).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            };
        }
    };
    match node_result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The commands that talk to a running node.
async fn admin(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Deploy {
            wasm,
            target,
            entry,
            no_activate,
            canary,
            policy,
            admin,
        } => {
            let client = admin.client()?;
            // A registry reference is pulled by the node; a file is uploaded.
            let reference = trellis::manifest::component_oci_reference(&wasm).map(str::to_string);
            let bytes = match &reference {
                Some(_) => Vec::new(),
                None => std::fs::read(&wasm).map_err(|e| {
                    ClientError::Usage(format!("cannot read {}: {e}", wasm.display()))
                })?,
            };
            let entry = entry.map(|path| read_entry(&path)).transpose()?;
            // Whether the component exists (and that the token is good) before uploading.
            let exists = match client.call(Method::GET, &target.path(""), None).await {
                Ok(status) => status["state"] != "awaiting_version",
                Err(ClientError::Refused { status: 404, .. }) => false,
                Err(e) => return Err(e),
            };
            let action = if let Some(weight) = canary {
                let mut query = format!("canary={weight}");
                for (key, value) in policy.fields() {
                    let value = value
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| value.to_string());
                    query.push_str(&format!("&{key}={}", encode(&value)));
                }
                query
            } else if no_activate {
                "activate=false".to_string()
            } else {
                "activate=true".to_string()
            };
            let label = format!("{}/{}", target.tenant, target.component);
            let upload = |query: &str, bytes: Vec<u8>| {
                let (client, label, reference) = (&client, &label, &reference);
                let mut query = query.to_string();
                let mut headers = Vec::new();
                match reference {
                    Some(reference) => query.push_str(&format!("&source={}", encode(reference))),
                    None => {
                        headers.push(("x-trellis-digest", trellis::deploy::code::digest(&bytes)))
                    }
                }
                let path = target.path(&format!("/versions?{query}"));
                async move { client.upload(&path, label, bytes, &headers).await }
            };
            let answer = match entry {
                // New code with a new entry is one new version: the code is uploaded and
                // kept, then the entry names it, activated or as a canary.
                Some(entry) if exists => {
                    let mut answer = upload("activate=false", bytes).await?;
                    let digest = answer["version"].as_str().unwrap_or_default().to_string();
                    let path = target.path(&format!("?version={}&{action}", encode(&digest)));
                    let status = client.call(Method::PUT, &path, Some(entry)).await?;
                    let side = if status["canary"]["version"] == digest.as_str() {
                        "canary"
                    } else {
                        "active"
                    };
                    answer["state"] = side.into();
                    answer["seq"] = status[side]["seq"].clone();
                    answer
                }
                Some(entry) => {
                    client
                        .call(Method::PUT, &target.path(""), Some(entry))
                        .await?;
                    upload(&action, bytes).await?
                }
                None => upload(&action, bytes).await?,
            };
            let seq = answer["seq"]
                .as_u64()
                .map(|seq| format!(" (#{seq})"))
                .unwrap_or_default();
            if answer["state"] == "unchanged" {
                println!(
                    "{label}: version {}{seq} is already active; nothing changed",
                    answer["version"].as_str().unwrap_or("?")
                );
                return Ok(());
            }
            println!(
                "{label}: version {}{seq} is {} ({} bytes, compiled and checked in {} ms)",
                answer["version"].as_str().unwrap_or("?"),
                answer["state"].as_str().unwrap_or("?"),
                answer["size"],
                answer["elapsed_ms"]
            );
            Ok(())
        }
        Command::Activate {
            version,
            target,
            admin,
        } => {
            let status = admin
                .client()?
                .call(
                    Method::POST,
                    &target.path("/activate"),
                    Some(serde_json::json!({"version": version})),
                )
                .await?;
            print_component(&status);
            Ok(())
        }
        Command::Rollback { target, admin } => {
            let status = admin
                .client()?
                .call(Method::POST, &target.path("/rollback"), None)
                .await?;
            print_component(&status);
            Ok(())
        }
        Command::Canary { action } => {
            let (client, target, method, path, body) = match action {
                CanaryAction::Start {
                    version,
                    target,
                    weight,
                    policy,
                    admin,
                } => {
                    let mut body = serde_json::json!({"version": version, "weight": weight});
                    for (key, value) in policy.fields() {
                        body[key] = value;
                    }
                    (admin.client()?, target, Method::POST, "/canary", Some(body))
                }
                CanaryAction::Promote { target, admin } => (
                    admin.client()?,
                    target,
                    Method::POST,
                    "/canary/promote",
                    None,
                ),
                CanaryAction::Abort { target, admin } => {
                    (admin.client()?, target, Method::DELETE, "/canary", None)
                }
            };
            let status = client.call(method, &target.path(path), body).await?;
            print_component(&status);
            Ok(())
        }
        Command::Status {
            component,
            tenant,
            json,
            admin,
        } => {
            let client = admin.client()?;
            let answer = match &component {
                Some(name) => {
                    client
                        .call(
                            Method::GET,
                            &format!("/v1/tenants/{tenant}/components/{name}"),
                            None,
                        )
                        .await?
                }
                // A tenant token may not see the whole node: its tenant's components then.
                None => match client.call(Method::GET, "/v1/status", None).await {
                    Err(ClientError::Refused { status: 403, .. }) => {
                        client
                            .call(
                                Method::GET,
                                &format!("/v1/tenants/{tenant}/components"),
                                None,
                            )
                            .await?
                    }
                    other => other?,
                },
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&answer).unwrap_or_default()
                );
            } else if component.is_some() {
                print_component(&answer);
            } else {
                let all = answer["components"].as_array().into_iter().flatten();
                let pending = answer["pending"].as_array().into_iter().flatten();
                for component in all.chain(pending) {
                    print_component(component);
                }
            }
            Ok(())
        }
        Command::Delete { target, admin } => {
            admin
                .client()?
                .call(Method::DELETE, &target.path(""), None)
                .await?;
            println!("{}/{}: deleted", target.tenant, target.component);
            Ok(())
        }
        Command::Tenant { action } => tenant(action).await,
        Command::Up { .. } | Command::Check { .. } | Command::Push { .. } => {
            unreachable!("handled by run")
        }
    }
}

async fn tenant(action: TenantAction) -> Result<(), ClientError> {
    let show = |status: &serde_json::Value| {
        println!(
            "{}",
            serde_json::to_string_pretty(status).unwrap_or_default()
        )
    };
    match action {
        TenantAction::List { admin } => {
            let answer = admin
                .client()?
                .call(Method::GET, "/v1/tenants", None)
                .await?;
            for tenant in answer["tenants"].as_array().into_iter().flatten() {
                println!(
                    "{}: hosts {}, {} component(s), {} instance(s), {} bytes stored",
                    tenant["tenant"].as_str().unwrap_or("?"),
                    tenant["hosts"],
                    tenant["usage"]["components"],
                    tenant["usage"]["instances"],
                    tenant["usage"]["storage_bytes"],
                );
            }
            Ok(())
        }
        TenantAction::Show { name, admin } => {
            let path = format!("/v1/tenants/{name}");
            show(&admin.client()?.call(Method::GET, &path, None).await?);
            Ok(())
        }
        TenantAction::Put {
            name,
            entry,
            hosts,
            admin,
        } => {
            let mut entry = match entry {
                Some(path) => read_entry(&path)?,
                None => serde_json::json!({}),
            };
            if !hosts.is_empty() {
                entry["hosts"] = hosts.into();
            }
            let path = format!("/v1/tenants/{name}");
            show(
                &admin
                    .client()?
                    .call(Method::PUT, &path, Some(entry))
                    .await?,
            );
            Ok(())
        }
        TenantAction::Remove {
            name,
            delete_data,
            admin,
        } => {
            let data = if delete_data { "delete" } else { "keep" };
            let path = format!("/v1/tenants/{name}?data={data}");
            admin.client()?.call(Method::DELETE, &path, None).await?;
            println!(
                "tenant {name}: removed ({})",
                if delete_data {
                    "data deleted"
                } else {
                    "data kept"
                }
            );
            Ok(())
        }
        TenantAction::Token { name, label, admin } => {
            let path = format!("/v1/tenants/{name}/tokens");
            let answer = admin
                .client()?
                .call(
                    Method::POST,
                    &path,
                    Some(serde_json::json!({"label": label})),
                )
                .await?;
            println!("{}", answer["token"].as_str().unwrap_or("?"));
            eprintln!(
                "tenant {name}: token {} issued; it is shown only now",
                answer["id"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        TenantAction::Revoke { name, id, admin } => {
            let path = format!("/v1/tenants/{name}/tokens/{id}");
            admin.client()?.call(Method::DELETE, &path, None).await?;
            println!("tenant {name}: token {id} revoked");
            Ok(())
        }
    }
}

/// A component entry from a TOML or JSON file, as JSON for the API.
fn read_entry(path: &std::path::Path) -> Result<serde_json::Value, ClientError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Usage(format!("{}: {e}", path.display())))?
    } else {
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| ClientError::Usage(format!("{}: {e}", path.display())))?;
        serde_json::to_value(table).map_err(|e| ClientError::Usage(e.to_string()))?
    };
    Ok(value)
}

/// `trellis push`: publishes a component file to a registry and prints its digests.
async fn push(
    wasm: &std::path::Path,
    reference: &str,
    credentials: Option<(String, String)>,
) -> Result<(), ClientError> {
    use trellis::deploy::oci;
    let bytes = std::fs::read(wasm)
        .map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", wasm.display())))?;
    let (imports, exports) = oci::component_world(&bytes)
        .map_err(|reason| ClientError::Usage(format!("{}: {reason}", wasm.display())))?;
    oci::parse(reference).map_err(|e| ClientError::Usage(e.to_string()))?;
    let version = trellis::deploy::code::digest(&bytes);
    let manifest = oci::push(reference, bytes, imports, exports, credentials)
        .await
        .map_err(|e| ClientError::Refused {
            status: e.status(),
            code: e.code().to_string(),
            message: e.to_string(),
            problems: Vec::new(),
        })?;
    let repository = match reference.split_once('@') {
        Some((repository, _)) => repository,
        None => reference
            .rsplit_once(':')
            .map_or(reference, |(repository, _)| repository),
    };
    println!("pushed {reference} (manifest {manifest}, version {version})");
    println!("deploy it by digest: {repository}@{manifest}");
    Ok(())
}

fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// One line per component, then its canary and last events.
fn print_component(status: &serde_json::Value) {
    let name = format!(
        "{}/{}",
        status["tenant"].as_str().unwrap_or("?"),
        status["component"].as_str().unwrap_or("?")
    );
    if status["state"] == "awaiting_version" {
        println!("{name}  awaiting its first version (origin api)");
        return;
    }
    println!(
        "{name}  active {} (#{})  previous {}  origin {}",
        status["active"]["version"].as_str().unwrap_or("?"),
        status["active"]["seq"],
        status["previous"]["version"].as_str().unwrap_or("none"),
        status["origin"].as_str().unwrap_or("?"),
    );
    if let Some(canary) = status["canary"].as_object() {
        println!(
            "  canary {} (#{}) at {}%: {} calls, {} failed",
            canary["version"].as_str().unwrap_or("?"),
            canary["seq"],
            canary["policy"]["weight"],
            canary["calls"],
            canary["failures"]
        );
    }
    if let Some(rollback) = status["last_canary_rollback"].as_object() {
        println!(
            "  last canary rolled back at {}: {} ({})",
            rollback["at"].as_str().unwrap_or("?"),
            rollback["version"].as_str().unwrap_or("?"),
            rollback["reason"].as_str().unwrap_or("?")
        );
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: bad --log filter {filter:?} ({e}); using \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
