//! Who may use the admin API: the bearer of the node's operator token (tenant tokens are
//! `crate::tenancy::tokens`). The token comes from
//! `node.admin_token`, else `TRELLIS_ADMIN_TOKEN`, else a token the node generates at its
//! first start and keeps in `DATA_DIR/admin-token` (mode 0600), so it stays the same across
//! restarts and only the node's owner can read it.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where a generated token is kept.
pub fn token_file(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-token")
}

/// The node's admin token, and where it came from (for the start-up line).
pub fn resolve_token(configured: Option<&str>, data_dir: &Path) -> Result<(String, String)> {
    if let Some(token) = configured.filter(|t| !t.is_empty()) {
        return Ok((token.to_string(), "node.admin_token".into()));
    }
    if let Ok(token) = std::env::var("TRELLIS_ADMIN_TOKEN")
        && !token.is_empty()
    {
        return Ok((token, "TRELLIS_ADMIN_TOKEN".into()));
    }
    let path = token_file(data_dir);
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_string();
        if !token.is_empty() {
            return Ok((token, path.display().to_string()));
        }
    }
    let token = generate()?;
    write_private(&path, &token)?;
    Ok((token, path.display().to_string()))
}

fn generate() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for an admin token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, token: &str) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing the admin token to {}", path.display()))?;
    writeln!(file, "{token}")?;
    Ok(())
}

/// The bearer token an `Authorization` header carries.
pub fn bearer(header: Option<&http::HeaderValue>) -> Option<&str> {
    // The scheme name is case-insensitive (RFC 9110), the token is not.
    header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Whether the `Authorization` header carries `token`, compared in constant time.
pub fn authorized(header: Option<&http::HeaderValue>, token: &str) -> bool {
    let Some(presented) = bearer(header) else {
        return false;
    };
    let (a, b) = (presented.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
