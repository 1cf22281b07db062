//! The `trellis` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up {
                manifest,
                listen,
                data_dir,
                database_url,
                nats_url,
                cache_dir,
            } => {
                let mut manifest = trellis::manifest::load(&manifest)?;
                if let Some(listen) = listen {
                    manifest.manifest.node.listen = listen;
                }
                if let Some(data_dir) = data_dir {
                    manifest.manifest.node.data_dir = data_dir;
                }
                if database_url.is_some() {
                    manifest.manifest.node.database_url = database_url;
                }
                if nats_url.is_some() {
                    manifest.manifest.node.nats_url = nats_url;
                }
                override_cache_dir(&mut manifest, cache_dir);
                trellis::node::up(manifest).await.map(|()| true)
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
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
