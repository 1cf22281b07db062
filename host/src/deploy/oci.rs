//! Components from OCI registries (references: [`crate::grammar::oci`]).
//!
//! The artifact layout is the CNCF Wasm OCI one that wasmCloud, `wkg` and `oci-wasm` push:
//! an OCI image manifest whose config has media type `application/vnd.wasm.config.v0+json`
//! and whose single layer is the component (`application/wasm`). The registry protocol is
//! oci-client's; this module only decides what is accepted and where it is kept:
//!
//! - The manifest is checked before any layer is fetched (media types, one layer, size
//!   under `node.max_component_size`); oci-client verifies the manifest and the layer
//!   against their digests.
//! - The layer's digest is the component's `sha256` digest, so pulled code lands in the
//!   node's [`CodeStore`] like uploaded code, and a layer the node already has is not
//!   downloaded again.
//! - Which manifest and layer each reference last resolved to is kept in
//!   `DATA_DIR/oci/references.json`: a `@sha256:` reference is served from it without
//!   asking the registry, and a tag is too when the registry cannot be reached (a restart
//!   without the registry still serves).
//! - Credentials: `[node.registries."HOST"]` in the manifest, else the docker-style config
//!   file (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), else anonymous.
//! - A pull a tenant token asks for ([`Puller::Tenant`]) goes only to a registry the
//!   operator listed for that tenant (`tenants` in `node.registries`), and never takes a
//!   shortcut through what the node pulled before: the tenant's own access to the
//!   manifest and the layer is what lets its code in.
//!   Loopback registries (`localhost`, `127.*`, `[::1]`) and those marked `insecure` are
//!   spoken to over plain HTTP, as Docker does for localhost.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use super::code::{self, CodeStore};
pub use crate::grammar::oci::is_oci;
use crate::manifest::RegistrySpec;

/// The config media type of a Wasm component artifact.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The media type of its one layer, the component's bytes.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";

/// Why a component could not be pulled (or pushed).
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(
        "{reference:?} is not an OCI reference ({reason}); expected oci://HOST/REPO:TAG or oci://HOST/REPO@sha256:DIGEST"
    )]
    BadReference { reference: String, reason: String },
    #[error("registry {registry} cannot be reached: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("{reference}: the registry has no such tag or digest")]
    NotFound { reference: String },
    #[error("{reference}: the registry refused the credentials ({reason})")]
    Unauthorized { reference: String, reason: String },
    #[error("{reference}: not a Wasm component artifact: {reason}")]
    NotWasm { reference: String, reason: String },
    #[error("{reference}: the component is {size} bytes; node.max_component_size is {max}")]
    TooLarge {
        reference: String,
        size: u64,
        max: u64,
    },
    #[error("{reference}: what the registry sent does not match its digest: {reason}")]
    DigestMismatch { reference: String, reason: String },
    #[error("{reference}: {reason}")]
    Other { reference: String, reason: String },
    #[error(
        "registry {registry} is not one this tenant may pull from: the operator lists those in node.registries (tenants = [...])"
    )]
    NotAllowed { registry: String },
}

impl OciError {
    /// The admin API's error code for it.
    pub fn code(&self) -> &'static str {
        match self {
            OciError::BadReference { .. } => "bad_reference",
            OciError::Unreachable { .. } => "registry_unreachable",
            OciError::NotFound { .. } => "not_found",
            OciError::Unauthorized { .. } => "registry_unauthorized",
            OciError::NotWasm { .. } => "not_a_component",
            OciError::TooLarge { .. } => "too_large",
            OciError::DigestMismatch { .. } => "digest_mismatch",
            OciError::Other { .. } => "registry_error",
            OciError::NotAllowed { .. } => "forbidden",
        }
    }

    /// The admin API's status for it: the client's mistake (4xx) or the registry's (502).
    pub fn status(&self) -> u16 {
        match self {
            OciError::BadReference { .. } | OciError::NotWasm { .. } => 422,
            OciError::NotFound { .. } => 404,
            OciError::NotAllowed { .. } => 403,
            OciError::TooLarge { .. } => 413,
            OciError::Unreachable { .. }
            | OciError::Unauthorized { .. }
            | OciError::DigestMismatch { .. }
            | OciError::Other { .. } => 502,
        }
    }
}

/// Parses a reference (see [`crate::grammar::oci`]).
pub fn parse(reference: &str) -> Result<Reference, OciError> {
    crate::grammar::oci::parse(reference).map_err(|reason| OciError::BadReference {
        reference: reference.to_string(),
        reason,
    })
}

fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    };
    let ip = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Installs rustls's process-wide crypto provider (ring) once; oci-client needs one.
fn crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// One registry client per registry host (each remembers its credentials).
fn client_for(registry: &str, insecure: bool) -> Result<Client, OciError> {
    crypto_provider();
    let protocol = if insecure || is_loopback(registry) {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    Client::try_from(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(5)),
        read_timeout: Some(Duration::from_secs(60)),
        platform_resolver: None,
        ..Default::default()
    })
    .map_err(|e| OciError::Other {
        reference: registry.to_string(),
        reason: format!("cannot create the registry client: {e}"),
    })
}

/// Credentials for `registry`: the manifest's, else the docker config file's, else none.
pub fn credentials(registry: &str, configured: Option<&RegistrySpec>) -> RegistryAuth {
    if let Some(RegistrySpec {
        username: Some(username),
        password: Some(password),
        ..
    }) = configured
    {
        return RegistryAuth::Basic(username.clone(), password.clone());
    }
    let keys = [
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    for key in keys {
        match docker_credential::get_credential(&key) {
            Ok(docker_credential::DockerCredential::UsernamePassword(user, password)) => {
                return RegistryAuth::Basic(user, password);
            }
            Ok(docker_credential::DockerCredential::IdentityToken(_)) => {
                tracing::warn!(%registry, "the docker config has an identity token for this registry, which Trellis cannot use; pulling anonymously");
                return RegistryAuth::Anonymous;
            }
            Err(_) => continue,
        }
    }
    RegistryAuth::Anonymous
}

/// On whose behalf a pull runs.
#[derive(Clone, Copy)]
pub enum Puller<'a> {
    /// The operator (the manifest, the operator's token): the node's credentials and cache.
    Operator,
    /// A tenant token: only registries listed for the tenant, nothing from the cache.
    Tenant(&'a str),
}

/// Bytes kept under `digest`, if they still are exactly that.
async fn kept(code: &CodeStore, digest: &str) -> Option<Vec<u8>> {
    let bytes = code.get(digest).await.ok()?;
    if code::digest(&bytes) == digest {
        Some(bytes)
    } else {
        tracing::warn!(version = %digest, "a kept version does not match its digest; pulling it again");
        None
    }
}

/// How long one pull may take in all.
const PULL_TIMEOUT: Duration = Duration::from_secs(300);

/// What one reference resolved to, last time it was pulled.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Resolved {
    manifest: String,
    layer: String,
}

/// A pulled component: its bytes, their digest, and the manifest they came from.
pub struct Pulled {
    pub bytes: Vec<u8>,
    pub digest: String,
    pub manifest: String,
    /// Served from the node's cache because the registry could not be reached.
    pub from_cache: bool,
}

/// The node's registry source: clients, credentials and what references resolved to.
pub struct OciSource {
    registries: BTreeMap<String, RegistrySpec>,
    index_path: PathBuf,
    index: Mutex<BTreeMap<String, Resolved>>,
    clients: Mutex<HashMap<String, Client>>,
    /// One pull's index update at a time (the file is rewritten whole).
    writing: tokio::sync::Mutex<()>,
}

impl OciSource {
    pub fn new(data_dir: &Path, registries: BTreeMap<String, RegistrySpec>) -> Self {
        let index_path = data_dir.join("oci").join("references.json");
        let index = std::fs::read(&index_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            registries,
            index_path,
            index: Mutex::new(index),
            clients: Mutex::new(HashMap::new()),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    fn client(&self, registry: &str) -> Result<Client, OciError> {
        let mut clients = self.clients.lock().expect("oci clients lock");
        if let Some(client) = clients.get(registry) {
            return Ok(client.clone());
        }
        let insecure = self.registries.get(registry).is_some_and(|r| r.insecure);
        let client = client_for(registry, insecure)?;
        clients.insert(registry.to_string(), client.clone());
        Ok(client)
    }

    fn cached(&self, reference: &str) -> Option<Resolved> {
        self.index
            .lock()
            .expect("oci index lock")
            .get(reference)
            .cloned()
    }

    /// Pulls `reference` (see the module's documentation for what is checked and cached),
    /// keeping the component's bytes in `code`.
    pub async fn pull(
        &self,
        reference: &str,
        code: &CodeStore,
        max_size: u64,
        puller: Puller<'_>,
    ) -> Result<Pulled, OciError> {
        let parsed = parse(reference)?;
        if let Puller::Tenant(tenant) = puller {
            let registry = parsed.resolve_registry();
            let allowed = self
                .registries
                .get(registry)
                .is_some_and(|spec| spec.tenants.iter().any(|t| t == tenant || t == "*"));
            if !allowed {
                return Err(OciError::NotAllowed {
                    registry: registry.to_string(),
                });
            }
            let fetch = self.fetch(reference, &parsed, code, max_size, false);
            return match tokio::time::timeout(PULL_TIMEOUT, fetch).await {
                Ok(pulled) => pulled,
                Err(_) => Err(timed_out(registry)),
            };
        }
        // A digest names the same bytes forever: the cache answers without the registry.
        if parsed.digest().is_some()
            && let Some(resolved) = self.cached(reference)
            && let Some(bytes) = kept(code, &resolved.layer).await
        {
            return Ok(Pulled {
                bytes,
                digest: resolved.layer,
                manifest: resolved.manifest,
                from_cache: true,
            });
        }
        let fetch = self.fetch(reference, &parsed, code, max_size, true);
        let fetched = match tokio::time::timeout(PULL_TIMEOUT, fetch).await {
            Ok(fetched) => fetched,
            Err(_) => Err(timed_out(parsed.resolve_registry())),
        };
        match fetched {
            Ok(pulled) => {
                self.remember(reference, &pulled).await;
                Ok(pulled)
            }
            Err(error @ OciError::Unreachable { .. }) => {
                let Some(resolved) = self.cached(reference) else {
                    return Err(error);
                };
                let Some(bytes) = kept(code, &resolved.layer).await else {
                    return Err(error);
                };
                tracing::warn!(%reference, version = %resolved.layer, %error, "registry unreachable; using the version this reference last resolved to");
                Ok(Pulled {
                    bytes,
                    digest: resolved.layer,
                    manifest: resolved.manifest,
                    from_cache: true,
                })
            }
            Err(error) => Err(error),
        }
    }

    async fn fetch(
        &self,
        reference: &str,
        parsed: &Reference,
        code: &CodeStore,
        max_size: u64,
        known_layers: bool,
    ) -> Result<Pulled, OciError> {
        let registry = parsed.resolve_registry().to_string();
        let client = self.client(&registry)?;
        let auth = credentials(&registry, self.registries.get(&registry));
        let failed = |e: OciDistributionError| classify(reference, &registry, e);
        let (manifest, manifest_digest) = client
            .pull_image_manifest(parsed, &auth)
            .await
            .map_err(failed)?;
        let layer = check_manifest(reference, &manifest, max_size)?;
        // The layer digest is the component's digest: known bytes are not fetched again
        // (for the operator: a tenant's manifest could name code it may not read).
        if known_layers && let Some(bytes) = kept(code, &layer.digest).await {
            return Ok(Pulled {
                bytes,
                digest: layer.digest.clone(),
                manifest: manifest_digest,
                from_cache: false,
            });
        }
        let mut stream = client
            .pull_blob_stream(parsed, &layer)
            .await
            .map_err(failed)?;
        let mut bytes = Vec::with_capacity(layer.size.max(0) as usize);
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream.stream).await {
            let chunk = chunk.map_err(|e| io_failure(reference, &registry, e))?;
            if (bytes.len() + chunk.len()) as u64 > max_size {
                return Err(OciError::TooLarge {
                    reference: reference.to_string(),
                    size: layer.size.max(0) as u64,
                    max: max_size,
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        // oci-client verified the stream; the store's digest is checked once more, since
        // it is what the node will call this version.
        let digest = code::digest(&bytes);
        if digest != layer.digest {
            return Err(OciError::DigestMismatch {
                reference: reference.to_string(),
                reason: format!("the layer should be {}, it is {digest}", layer.digest),
            });
        }
        code.put(&bytes).await.map_err(|e| OciError::Other {
            reference: reference.to_string(),
            reason: format!("keeping it in the version store: {e:#}"),
        })?;
        Ok(Pulled {
            bytes,
            digest,
            manifest: manifest_digest,
            from_cache: false,
        })
    }

    async fn remember(&self, reference: &str, pulled: &Pulled) {
        let _writing = self.writing.lock().await;
        let text = {
            let mut index = self.index.lock().expect("oci index lock");
            index.insert(
                reference.to_string(),
                Resolved {
                    manifest: pulled.manifest.clone(),
                    layer: pulled.digest.clone(),
                },
            );
            serde_json::to_vec_pretty(&*index).expect("the index serializes")
        };
        let write = async {
            let dir = self.index_path.parent().expect("the index has a directory");
            tokio::fs::create_dir_all(dir).await?;
            let temporary = self.index_path.with_extension("json.tmp");
            tokio::fs::write(&temporary, text).await?;
            tokio::fs::rename(&temporary, &self.index_path).await
        };
        if let Err(e) = write.await {
            tracing::warn!(error = %e, path = %self.index_path.display(), "cannot keep what OCI references resolved to");
        }
    }
}

/// The one component layer of a Wasm artifact manifest, or why it is not one.
fn check_manifest<'a>(
    reference: &str,
    manifest: &'a OciImageManifest,
    max_size: u64,
) -> Result<&'a oci_client::manifest::OciDescriptor, OciError> {
    let not_wasm = |reason: String| OciError::NotWasm {
        reference: reference.to_string(),
        reason,
    };
    if manifest.config.media_type != WASM_CONFIG_MEDIA_TYPE {
        return Err(not_wasm(format!(
            "its config is {:?}, not {WASM_CONFIG_MEDIA_TYPE:?}",
            manifest.config.media_type
        )));
    }
    let [layer] = manifest.layers.as_slice() else {
        return Err(not_wasm(format!(
            "it has {} layers, not one",
            manifest.layers.len()
        )));
    };
    if layer.media_type != WASM_LAYER_MEDIA_TYPE {
        return Err(not_wasm(format!(
            "its layer is {:?}, not {WASM_LAYER_MEDIA_TYPE:?}",
            layer.media_type
        )));
    }
    if layer.urls.is_some() {
        return Err(not_wasm("its layer points outside the registry".into()));
    }
    if layer.size < 0 || layer.size as u64 > max_size {
        return Err(OciError::TooLarge {
            reference: reference.to_string(),
            size: layer.size.max(0) as u64,
            max: max_size,
        });
    }
    if !code::is_digest(&layer.digest) {
        return Err(not_wasm(format!(
            "its layer digest {:?} is not sha256",
            layer.digest
        )));
    }
    Ok(layer)
}

fn timed_out(registry: &str) -> OciError {
    OciError::Unreachable {
        registry: registry.to_string(),
        reason: format!("the pull took longer than {PULL_TIMEOUT:?}"),
    }
}

fn classify(reference: &str, registry: &str, error: OciDistributionError) -> OciError {
    let reference_owned = reference.to_string();
    match error {
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            OciError::Unreachable {
                registry: registry.to_string(),
                reason: e.to_string(),
            }
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) =>
        {
            OciError::NotFound {
                reference: reference_owned,
            }
        }
        OciDistributionError::ServerError { code: 404, .. }
        | OciDistributionError::ImageManifestNotFoundError(_) => OciError::NotFound {
            reference: reference_owned,
        },
        // The registry is down or overloaded: as good as unreachable (a restart may serve
        // what the reference last resolved to).
        OciDistributionError::ServerError {
            code: code @ (429 | 500..=599),
            url,
            ..
        } => OciError::Unreachable {
            registry: registry.to_string(),
            reason: format!("{code} from {url}"),
        },
        OciDistributionError::ServerError {
            code: code @ (401 | 403),
            url,
            ..
        } => OciError::Unauthorized {
            reference: reference_owned,
            reason: format!("{code} from {url}"),
        },
        OciDistributionError::UnauthorizedError { url } => OciError::Unauthorized {
            reference: reference_owned,
            reason: format!("401 from {url}"),
        },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Denied | OciErrorCode::Unauthorized)) =>
        {
            OciError::Unauthorized {
                reference: reference_owned,
                reason: "access denied".into(),
            }
        }
        // Its body is not passed on: a registry's error page is not the client's to read.
        OciDistributionError::ServerError { code, url, .. } => OciError::Other {
            reference: reference_owned,
            reason: format!("the registry answered {code} for {url}"),
        },
        OciDistributionError::DigestError(e) => OciError::DigestMismatch {
            reference: reference_owned,
            reason: e.to_string(),
        },
        OciDistributionError::ImageIndexParsingNoPlatformResolverError
        | OciDistributionError::IncompatibleLayerMediaTypeError(_)
        | OciDistributionError::UnsupportedMediaTypeError(_)
        | OciDistributionError::ManifestParsingError(_) => OciError::NotWasm {
            reference: reference_owned,
            reason: error.to_string(),
        },
        other => OciError::Other {
            reference: reference_owned,
            reason: other.to_string(),
        },
    }
}

fn io_failure(reference: &str, registry: &str, error: std::io::Error) -> OciError {
    let digest = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>());
    match digest {
        Some(digest) => OciError::DigestMismatch {
            reference: reference.to_string(),
            reason: digest.to_string(),
        },
        None => OciError::Unreachable {
            registry: registry.to_string(),
            reason: format!("the download broke off: {error}"),
        },
    }
}

/// The names a component imports and exports (its own, not those of nested ones), for a
/// pushed artifact's config; an error when the bytes are not a component.
pub fn component_world(bytes: &[u8]) -> Result<(Vec<String>, Vec<String>), String> {
    use wasmparser::{Encoding, Parser, Payload};
    let (mut imports, mut exports, mut depth) = (Vec::new(), Vec::new(), 0usize);
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| format!("not a WebAssembly binary: {e}"))? {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding != Encoding::Component {
                    return Err("a core module, not a component (adapt it with wasm-tools component new, or build for wasm32-wasip2)".into());
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    let import = import.map_err(|e| e.to_string())?;
                    imports.push(import.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(section) if depth == 1 => {
                for export in section {
                    let export = export.map_err(|e| e.to_string())?;
                    exports.push(export.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

/// Config of a pushed component: what `oci-wasm` and `wkg` write.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmConfig {
    created: String,
    architecture: &'static str,
    os: &'static str,
    layer_digests: Vec<String>,
    component: ComponentInfo,
}

#[derive(Serialize)]
struct ComponentInfo {
    exports: Vec<String>,
    imports: Vec<String>,
}

/// Publishes a component to `reference` (tag or digest) as a Wasm artifact; returns the
/// manifest's digest. `imports`/`exports` describe the component in the config.
pub async fn push(
    reference: &str,
    bytes: Vec<u8>,
    imports: Vec<String>,
    exports: Vec<String>,
    username: Option<(String, String)>,
) -> Result<String, OciError> {
    let parsed = parse(reference)?;
    let registry = parsed.resolve_registry().to_string();
    let client = client_for(&registry, false)?;
    let auth = match username {
        Some((user, password)) => RegistryAuth::Basic(user, password),
        None => credentials(&registry, None),
    };
    let failed = |e: OciDistributionError| classify(reference, &registry, e);
    let layer_digest = code::digest(&bytes);
    let config = WasmConfig {
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        architecture: "wasm",
        os: "wasip2",
        layer_digests: vec![layer_digest],
        component: ComponentInfo { exports, imports },
    };
    let config = Config::new(
        serde_json::to_vec(&config).expect("the config serializes"),
        WASM_CONFIG_MEDIA_TYPE.to_string(),
        None,
    );
    let layer = ImageLayer::new(bytes, WASM_LAYER_MEDIA_TYPE.to_string(), None);
    let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
    manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.to_string());
    client.store_auth_if_needed(&registry, &auth).await;
    client
        .push_blob(&parsed, layer.data.clone(), &manifest.layers[0].digest)
        .await
        .map_err(failed)?;
    client
        .push_blob(&parsed, config.data.clone(), &manifest.config.digest)
        .await
        .map_err(failed)?;
    let body = serde_json::to_vec(&manifest).expect("the manifest serializes");
    let digest = code::digest(&body);
    client
        .push_manifest_raw(
            &parsed,
            body,
            http::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE),
        )
        .await
        .map_err(failed)?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("ghcr.io"));
        assert!(!is_loopback("127.example.com:5000"));
    }
}
