//! Bad input at load time: every kind of bad manifest, and a component the host cannot
//! satisfy, is refused with a message naming the file, the field and the reason, by both
//! `trellis check` and `trellis up`.

use crate::common;
use common::{run_trellis, write_manifest};

/// Runs `trellis check` on the manifest; asserts it fails and that the report mentions
/// the manifest file and every one of `expected`.
fn check_fails_with(manifest: &str, expected: &[&str]) -> String {
    let (_dir, path) = write_manifest(manifest);
    let (code, stdout, stderr) = run_trellis(&["check", path.to_str().unwrap()]);
    let output = format!("{stdout}{stderr}");
    assert_eq!(code, 1, "check must fail:\n{output}");
    assert!(
        output.contains(path.to_str().unwrap()),
        "the report names the file:\n{output}"
    );
    for text in expected {
        assert!(
            output.contains(text),
            "the report should contain {text:?}:\n{output}"
        );
    }
    output
}

#[test]
fn a_valid_manifest_checks_ok() {
    let (_dir, path) = write_manifest(
        r#"
[components.hello]
source = "{wasm:hello}"
routes = ["/hello"]
"#,
    );
    let (code, stdout, stderr) = run_trellis(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ok      component hello"), "{stdout}");
}

#[test]
fn syntax_errors_give_the_line() {
    check_fails_with("[components.hello\nsource = 1\n", &["(syntax)", "line 1"]);
}

#[test]
fn unknown_fields_are_named() {
    check_fails_with(
        r#"
[components.hello]
sorce = "{wasm:hello}"
"#,
        &["components.hello", "unknown field `sorce`"],
    );
}

#[test]
fn bad_values_name_their_field() {
    check_fails_with(
        r#"
[components.hello]
source = "{wasm:hello}"
limits = { memory = "lots" }
"#,
        &["components.hello.limits.memory"],
    );
    check_fails_with(
        r#"
[components.hello]
source = "{wasm:hello}"
limits = { deadline = "soon" }
"#,
        &["components.hello.limits.deadline"],
    );
    check_fails_with(
        r#"
[node]
listen = "not an address"
"#,
        &["node.listen"],
    );
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let output = check_fails_with(
        r#"
[tenants.shop]
hosts = ["shop.test"]

[tenants.blog]
hosts = ["shop.test"]

[components.a]
tenant = "shop"
source = "{dir}/missing.wasm"
routes = ["/api"]

[components.b]
tenant = "nobody"
source = "{wasm:hello}"
routes = ["api", "/health"]
limits = { memory = "1GiB", max_concurrent = 0 }

[components.c]
tenant = "shop"
source = "{wasm:hello}"
routes = ["/api/"]
outbound = ["*"]
"#,
        &[
            "tenants.shop.hosts[0]: host \"shop.test\" is already claimed by tenant \"blog\"",
            "components.a.source: no such file",
            "components.b.tenant: unknown tenant \"nobody\" (declared: blog, shop)",
            "components.b.routes[0]: route \"api\" must start with '/'",
            "components.b.routes[1]: route \"/health\" would shadow the gateway's own",
            "components.b.limits.memory: 1.0 GiB is above node.max_instance_memory",
            "components.b.limits.max_concurrent: must be at least 1",
            "components.c.routes[0]: route \"/api\" is already served by component \"a\"",
            "components.c.outbound[0]",
        ],
    );
    assert!(output.contains("9 problem(s)"), "{output}");
}

#[test]
fn reuse_settings_are_checked() {
    check_fails_with(
        r#"
[components.hello]
source = "{wasm:hello}"
routes = ["/hello"]
limits = { memory = "16MiB" }
reuse = { max_requests = 0, idle = "0s", max_memory = "32MiB", concurrent = 0 }
"#,
        &[
            "components.hello.reuse.max_requests: must be at least 1",
            "components.hello.reuse.concurrent: 0 is outside 1..1024",
            "components.hello.reuse.idle",
            "components.hello.reuse.max_memory: 32.0 MiB is above limits.memory (16.0 MiB)",
        ],
    );
    check_fails_with(
        r#"
[components.hello]
source = "{wasm:hello}"
reuse = { max_request = 10 }
"#,
        &["components.hello.reuse", "unknown field `max_request`"],
    );
    // Positive control: good settings pass.
    let (_dir, path) = write_manifest(
        r#"
[components.hello]
source = "{wasm:hello}"
routes = ["/hello"]
reuse = { max_requests = 10, idle = "250ms", max_memory = "8MiB", concurrent = 4 }
"#,
    );
    let (code, stdout, stderr) = run_trellis(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn a_file_that_is_not_a_component_is_refused() {
    let (dir, _) = write_manifest("");
    std::fs::write(dir.path().join("junk.wasm"), b"definitely not wasm").unwrap();
    check_fails_with(
        &format!(
            "[components.junk]\nsource = \"{}/junk.wasm\"\n",
            dir.path().display()
        ),
        &["component \"junk\"", "is not a valid WebAssembly component"],
    );
}

#[test]
fn an_unsatisfied_import_is_refused_naming_the_import() {
    let manifest = r#"
[components.needy]
source = "{wasm:needs-missing}"
routes = ["/"]
"#;
    check_fails_with(
        manifest,
        &["component \"needy\"", "trellis-fixture:missing/clock"],
    );

    // `up` refuses to start with it, for the same reason (on ports of its own: the
    // default admin port may be taken on the machine running the tests).
    let (_dir, path) = write_manifest(manifest);
    let (code, stdout, stderr) = run_trellis(&[
        "up",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("trellis-fixture:missing/clock"), "{stderr}");
}

#[test]
fn up_refuses_a_bad_manifest_naming_the_field() {
    let (_dir, path) = write_manifest(
        r#"
[components.hello]
source = "{wasm:hello}"
limits = { max_body = "huge" }
"#,
    );
    let (code, _stdout, stderr) = run_trellis(&["up", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(path.to_str().unwrap())
            && stderr.contains("components.hello.limits.max_body"),
        "{stderr}"
    );
}

#[test]
fn help_lists_every_command() {
    let (code, stdout, _) = run_trellis(&["--help"]);
    assert_eq!(code, 0);
    for command in ["up", "check"] {
        assert!(stdout.contains(command), "{stdout}");
    }
    let (_, up_help, _) = run_trellis(&["up", "--help"]);
    for option in ["--listen", "--data-dir", "<MANIFEST>"] {
        assert!(up_help.contains(option), "{up_help}");
    }
}

#[test]
fn storage_settings_are_checked() {
    check_fails_with(
        r#"
[node]
database_url = "mysql://db/shop"

[components.hello]
source = "{wasm:hello}"
keyvalue = ["default", ""]
migrations = "no-such-dir"
"#,
        &[
            "node.database_url: must be a postgres:// URL",
            "components.hello.keyvalue[1]: \"\" is not a bucket name",
            "components.hello.migrations: migrations need relational storage: set sql = true",
            "components.hello.migrations: no such directory",
        ],
    );
}

#[test]
fn relative_paths_work_from_any_directory() {
    // What `cargo xtask run` does: a relative manifest path whose data_dir and source are
    // relative to the manifest, started from another directory.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("site")).unwrap();
    std::fs::copy(common::wasm("hello"), dir.path().join("hello.wasm")).unwrap();
    std::fs::write(
        dir.path().join("site/trellis.toml"),
        "[node]\ndata_dir = \"../state\"\n[components.hello]\nsource = \"../hello.wasm\"\nroutes = [\"/\"]\n",
    )
    .unwrap();
    let output = std::process::Command::new(common::TRELLIS)
        .args(["check", "site/trellis.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}");
    assert!(
        dir.path().join("state/compile-cache").is_dir(),
        "the cache lands under the manifest's data_dir"
    );
}
