//! OCI registry references as a component `source`: `oci://HOST/REPO:TAG` or
//! `oci://HOST/REPO@sha256:DIGEST`. Stricter than a container reference: the registry
//! host is required (no implied Docker Hub) and so is a tag or digest (no implied
//! `latest`), so that a manifest says exactly where its code comes from.

use oci_client::Reference;

/// The scheme of a registry source.
pub const SCHEME: &str = "oci://";

/// Whether a `source` names a registry artifact rather than a file.
pub fn is_oci(source: &str) -> bool {
    source.starts_with(SCHEME)
}

/// Parses a reference, or says what is wrong with it.
pub fn parse(reference: &str) -> Result<Reference, String> {
    let rest = reference
        .strip_prefix(SCHEME)
        .ok_or("it does not start with oci://")?;
    let (host, path) = rest.split_once('/').ok_or("it names no repository")?;
    if !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err("the first part must be the registry host".into());
    }
    let last = path.rsplit('/').next().unwrap_or_default();
    if !last.contains(':') && !last.contains('@') {
        return Err("it has neither a :TAG nor an @sha256: digest".into());
    }
    let parsed: Reference = rest.parse().map_err(|e| format!("{e}"))?;
    // The parser reads `NAME/REPO` without a dot as a Docker Hub name; refuse that.
    if parsed.registry() != host {
        return Err("the first part must be the registry host".into());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_need_a_host_and_a_tag_or_digest() {
        assert!(parse("oci://127.0.0.1:5000/shop/hello:1.0").is_ok());
        assert!(parse("oci://localhost:5000/hello:latest").is_ok());
        let digest = format!("oci://ghcr.io/acme/hello@sha256:{}", "0".repeat(64));
        assert!(parse(&digest).is_ok());
        for bad in [
            "127.0.0.1:5000/hello:1",
            "oci://127.0.0.1:5000/hello",
            "oci://hello:1",
            "oci://shop/hello:1",
            "oci://127.0.0.1:5000/Hello:1",
            "oci://ghcr.io/acme/hello@sha256:12",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
