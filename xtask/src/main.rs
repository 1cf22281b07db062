//! `cargo xtask`: the project's build orchestration, so that a fresh clone needs two
//! commands and nothing else.
//!
//! - `cargo xtask run [MANIFEST]` builds everything and starts a node on the example.
//! - `cargo xtask test` installs what the tests need when missing, builds, runs every test.
//! - `cargo xtask build [--release]` builds the guests (wasm32-wasip2, plus the wasip1 +
//!   adapter fixture) into `target/wasm/` and the host.
//! - `cargo xtask bench` runs the benchmark harness (see BENCHMARKS.md).
//!
//! It shells out to cargo/rustup/apt-get rather than re-implementing them; the one thing
//! it does in-process is wrapping the wasip1 fixture with the preview1 adapter, which is
//! what `cargo component build` does.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench;

/// The example `cargo xtask run` starts when given no manifest.
const DEFAULT_EXAMPLE: &str = "examples/shop/trellis.toml";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = args
        .split_first()
        .map_or(("help", &[][..]), |(c, r)| (c.as_str(), r));
    let release = rest.iter().any(|a| a == "--release");
    let positional: Vec<&String> = rest.iter().filter(|a| !a.starts_with("--")).collect();
    match command {
        "build" => build_all(release),
        "components" => build_components(),
        "run" => {
            build_all(true)?;
            let manifest = positional.first().map_or(DEFAULT_EXAMPLE, |m| m.as_str());
            let status = Command::new(host_binary(true))
                .args(["up", manifest])
                .current_dir(workspace_root())
                .status()
                .context("starting trellis")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        "test" => {
            install_test_dependencies()?;
            build_components()?;
            let mut cargo = cargo();
            cargo.args(["test", "--workspace"]);
            cargo.args(rest);
            run(&mut cargo)?;
            if rest.is_empty() {
                guest_unit_tests()?;
            }
            Ok(())
        }
        "bench" => {
            build_all(true)?;
            bench::run(&workspace_root(), rest)
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 run [MANIFEST]     build everything (release) and start a node (default: {DEFAULT_EXAMPLE})\n  \
                 test [ARGS..]      install test dependencies when missing, build guests, run all tests\n  \
                 build [--release]  build the guest components into target/wasm/ and the host\n  \
                 components         build only the guest components\n  \
                 bench [SECTION...] run the benchmarks recorded in BENCHMARKS.md (sections: gateway,\n                                    capabilities, events, hot-deploy, memory, shop; default all)"
            );
            if command == "help" || command == "--help" {
                Ok(())
            } else {
                bail!("unknown command {command:?}")
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where the built guest components are collected, one `NAME.wasm` each.
fn wasm_dir() -> PathBuf {
    workspace_root().join("target").join("wasm")
}

fn host_binary(release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    workspace_root()
        .join("target")
        .join(profile)
        .join("trellis")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn build_all(release: bool) -> Result<()> {
    build_components()?;
    let mut host = cargo();
    host.args(["build", "--package", "trellis"]);
    if release {
        host.arg("--release");
    }
    run(&mut host)
}

/// Runs the unit tests of guest libraries that can run natively (the shop's token checks),
/// on the host's own target.
fn guest_unit_tests() -> Result<()> {
    let host = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV printed no host")?;
    run(cargo()
        .current_dir(workspace_root().join("components"))
        .args(["test", "--package", "shop-common", "--target", &host]))
}

/// Builds every guest crate under `components/` and copies the results to `target/wasm/`.
fn build_components() -> Result<()> {
    ensure_rust_target("wasm32-wasip2")?;
    ensure_rust_target("wasm32-wasip1")?;
    let components = workspace_root().join("components");
    // The components workspace sets its own target in components/.cargo/config.toml, and
    // cargo reads that file from the working directory, hence current_dir.
    run(cargo().current_dir(&components).args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
    ]))?;
    run(cargo().current_dir(&components).args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip1",
        "--package",
        "hello-p1",
    ]))?;

    let out = wasm_dir();
    std::fs::create_dir_all(&out)?;
    let built = components.join("target/wasm32-wasip2/release");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&built)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            let name = path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace('_', "-");
            std::fs::copy(&path, out.join(&name))?;
            names.push(name);
        }
    }

    let core = std::fs::read(components.join("target/wasm32-wasip1/release/hello_p1.wasm"))?;
    std::fs::write(out.join("hello-p1.wasm"), adapt_preview1(&core)?)?;
    names.push("hello-p1.wasm".into());
    names.sort();
    eprintln!("components in {}: {}", out.display(), names.join(", "));
    Ok(())
}

/// Wraps a wasip1 core module into a component with the preview1 reactor adapter, as
/// `cargo component build` does for a library crate.
fn adapt_preview1(core_module: &[u8]) -> Result<Vec<u8>> {
    use wasi_preview1_component_adapter_provider::{
        WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
    };
    wit_component::ComponentEncoder::default()
        .module(core_module)?
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .validate(true)
        .encode()
        .context("wrapping the wasip1 module with the preview1 adapter")
}

fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup (is it on PATH?)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        return Ok(());
    }
    eprintln!("installing the {target} target with rustup");
    run(Command::new("rustup").args(["target", "add", target]))
}

/// The Debian packages the test suite starts servers from, each with how to tell it is
/// already installed. Installed with apt-get only when missing.
/// A Debian package, and how to tell it is already installed.
type Requirement = (&'static str, fn() -> bool);

const TEST_PACKAGES: &[Requirement] = &[
    ("postgresql", postgres_installed),
    ("nats-server", nats_installed),
    ("docker-registry", registry_installed),
];

fn registry_installed() -> bool {
    Path::new("/usr/bin/docker-registry").is_file() || which("docker-registry").is_some()
}

fn nats_installed() -> bool {
    // Debian installs it in /usr/sbin, which is not on every PATH.
    Path::new("/usr/sbin/nats-server").is_file() || which("nats-server").is_some()
}

fn postgres_installed() -> bool {
    // The server binaries live under /usr/lib/postgresql/VERSION/bin, off PATH.
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|versions| {
            versions
                .filter_map(Result::ok)
                .any(|v| v.path().join("bin/initdb").is_file())
        })
        .unwrap_or(false)
}

fn install_test_dependencies() -> Result<()> {
    let missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .filter(|(_, installed)| !installed())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// `apt-get install` (through sudo when not root), after one `apt-get update`.
fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("installing with apt-get: {}", packages.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if is_root() {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        run(&mut cmd)
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(packages.iter().copied());
    apt(&install)
}

fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(binary))
            .find(|p| p.is_file())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
