//! Component code by content. Every version's bytes are kept once under
//! `DATA_DIR/versions/sha256/HEX.wasm`, named by their digest, so a version can be
//! re-activated (or restored after a restart) by digest alone. Compiled code is shared:
//! one `Component` per digest in memory, and wasmtime's on-disk cache (keyed by the bytes
//! and the engine's settings) makes a restart or a re-deploy of known bytes skip Cranelift.
//! Compiling runs on the blocking pool, never on the runtime's workers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;

use crate::runtime::engine::Engines;
use crate::runtime::version::LoadError;

/// `sha256:HEX` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash {
        use std::fmt::Write;
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Whether `text` is a well-formed `sha256:HEX` digest.
pub fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

pub struct CodeStore {
    dir: PathBuf,
    engines: Engines,
    compiled: Mutex<HashMap<String, Component>>,
}

impl CodeStore {
    pub fn new(data_dir: &std::path::Path, engines: Engines) -> Self {
        Self {
            dir: data_dir.join("versions").join("sha256"),
            engines,
            compiled: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join(format!("{hex}.wasm"))
    }

    /// Keeps `bytes` under their digest (written once, atomically) and returns the digest.
    pub async fn put(&self, bytes: &[u8]) -> anyhow::Result<String> {
        let digest = digest(bytes);
        let path = self.path(&digest);
        if !path.is_file() {
            tokio::fs::create_dir_all(&self.dir)
                .await
                .with_context(|| format!("creating {}", self.dir.display()))?;
            // Unique per write: two pulls of the same layer may write at once.
            static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let temporary = path.with_extension(format!("tmp{}-{write}", std::process::id()));
            tokio::fs::write(&temporary, bytes)
                .await
                .with_context(|| format!("writing {}", temporary.display()))?;
            tokio::fs::rename(&temporary, &path)
                .await
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(digest)
    }

    /// The bytes of a version kept earlier.
    pub async fn get(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.path(digest);
        tokio::fs::read(&path)
            .await
            .with_context(|| format!("version {digest} is not in {}", self.dir.display()))
    }

    /// The compiled component for `digest`, compiling `bytes` (off the async workers) the
    /// first time. `component` and `source_name` only shape the error.
    pub async fn compile(
        &self,
        digest: &str,
        bytes: Vec<u8>,
        component: &str,
        source_name: &str,
    ) -> Result<Component, LoadError> {
        if let Some(compiled) = self.compiled.lock().expect("code lock").get(digest) {
            return Ok(compiled.clone());
        }
        if bytes.len() >= 8 && bytes.starts_with(b"\0asm") && bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule {
                component: component.to_string(),
                source_name: source_name.to_string(),
            });
        }
        let engines = self.engines.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            // The digest stays that of the bytes as uploaded.
            let bytes = super::wasip3_rc::to_final(&bytes).unwrap_or(bytes);
            // A component that needs the concurrency features (WASIp3) fails validation on
            // the plain engine, before any code is generated, and compiles for the other;
            // bytes that are no valid component at all are reported from the latter.
            Component::new(&engines.plain, &bytes)
                .or_else(|_| Component::new(&engines.concurrent, &bytes))
        })
        .await
        .map_err(|e| LoadError::Compile {
            component: component.to_string(),
            source_name: source_name.to_string(),
            reason: format!("the compile task failed: {e}"),
        })?
        .map_err(|e| LoadError::Compile {
            component: component.to_string(),
            source_name: source_name.to_string(),
            reason: format!("{e:#}"),
        })?;
        self.compiled
            .lock()
            .expect("code lock")
            .insert(digest.to_string(), compiled.clone());
        Ok(compiled)
    }

    /// Forgets compiled code no live version uses (the bytes stay on disk).
    pub fn retain(&self, in_use: &std::collections::HashSet<String>) {
        self.compiled
            .lock()
            .expect("code lock")
            .retain(|digest, _| in_use.contains(digest));
    }
}
