//! Per-instance state: what one `Store` holds for one request. Built fresh for every call
//! from the deployment's grants, so nothing leaks between requests or tenants.
//!
//! This is where "no ambient authority" is made concrete: the WASI context starts empty
//! (no host environment, no arguments, no preopened directories, every socket address
//! denied) and only the manifest's grants are added: config values, directories (opened
//! through cap-std by wasmtime-wasi) and outbound HTTP hosts.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::capabilities::keyvalue::{KeyValue, KeyValueGrant};
use crate::capabilities::messaging::{Messaging, MessagingGrant};
use crate::capabilities::outbound::OutboundPolicy;
use crate::capabilities::sql::{Sql, SqlGrant};

/// One linker per engine (`crate::runtime::engine::Engines`).
pub struct Linkers {
    pub plain: wasmtime::component::Linker<InstanceState>,
    pub concurrent: wasmtime::component::Linker<InstanceState>,
}

impl Linkers {
    pub fn new(engines: &crate::runtime::engine::Engines) -> anyhow::Result<Self> {
        Ok(Self {
            plain: build_linker(&engines.plain, false)?,
            concurrent: build_linker(&engines.concurrent, true)?,
        })
    }

    /// The linker of the engine `component` was compiled for.
    pub fn for_component(
        &self,
        component: &wasmtime::component::Component,
    ) -> &wasmtime::component::Linker<InstanceState> {
        if wasmtime::Engine::same(component.engine(), self.plain.engine()) {
            &self.plain
        } else {
            &self.concurrent
        }
    }
}

/// The host interfaces every component may import, one line per capability. Interfaces
/// are added here once per node; what an instance may actually do is decided by its grants.
/// `wasip3`: the WASIp3 interfaces too (only an engine with concurrency support has them).
pub fn build_linker(
    engine: &wasmtime::Engine,
    wasip3: bool,
) -> anyhow::Result<wasmtime::component::Linker<InstanceState>> {
    let mut linker = wasmtime::component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    // WASIp3 (wasi:*@0.3.0): a p3 guest built with Rust std imports p2 interfaces too.
    if wasip3 {
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
    }
    wasmtime_wasi_config::add_to_linker(&mut linker, InstanceState::config)?;
    crate::capabilities::config::add_to_linker(&mut linker, InstanceState::config_drafts)?;
    crate::capabilities::logging::add_to_linker(&mut linker, InstanceState::logging)?;
    crate::capabilities::keyvalue::add_to_linker(&mut linker, InstanceState::keyvalue)?;
    crate::capabilities::keyvalue_draft2::add_to_linker(&mut linker, InstanceState::keyvalue)?;
    crate::capabilities::sql::add_to_linker(&mut linker, InstanceState::sql)?;
    crate::capabilities::messaging::add_to_linker(&mut linker, InstanceState::messaging)?;
    Ok(linker)
}

/// What a version grants each of its instances; shared, built once per deployment.
pub struct Grants {
    pub tenant: Arc<str>,
    pub component: Arc<str>,
    pub memory_limit: usize,
    /// The node's memory budget, which every instance reserves from.
    pub memory_budget: Arc<crate::runtime::memory::MemoryBudget>,
    /// The tenant the instances run for (its memory budget and CPU turns).
    pub owner: Arc<crate::tenancy::Tenant>,
    pub config: Arc<WasiConfigVariables>,
    /// The config values again, for the other `wasi:config` versions.
    pub config_values: crate::capabilities::config::ConfigValues,
    /// The config values again, as environment variables.
    pub env: Vec<(String, String)>,
    /// (host directory, guest path, writable)
    pub dirs: Vec<(std::path::PathBuf, String, bool)>,
    pub outbound: OutboundPolicy,
    /// Key-value buckets, when the manifest grants any.
    pub keyvalue: Option<Arc<KeyValueGrant>>,
    /// Relational storage, when the manifest grants it.
    pub sql: Option<Arc<SqlGrant>>,
    /// The bus, and the subjects the component may publish on.
    pub messaging: Arc<MessagingGrant>,
}

/// The data inside one instance's `Store`.
pub struct InstanceState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    /// What `wasi:config` answers for the current call: the grants' values, plus the
    /// call's own (an event's id) when it has any.
    config: Arc<WasiConfigVariables>,
    config_values: crate::capabilities::config::ConfigValues,
    /// The grants' values alone, for calls without values of their own.
    base_config: Arc<WasiConfigVariables>,
    base_config_values: crate::capabilities::config::ConfigValues,
    tenant: Arc<str>,
    component: Arc<str>,
    outbound: OutboundPolicy,
    keyvalue: Option<Arc<KeyValueGrant>>,
    sql: Option<Arc<SqlGrant>>,
    messaging: Arc<MessagingGrant>,
    pub limiter: MemoryLimiter,
    /// The tenant's CPU turn this instance holds, if it ran past an epoch tick (see
    /// `Version::new_store`).
    pub cpu_turn: Arc<crate::runtime::cpu_turn::CpuTurn>,
    /// When the current call must end; set for every call (a warm instance serves many).
    pub deadline: std::time::Instant,
}

impl InstanceState {
    pub fn new(grants: &Grants, extra_env: &[(String, String)]) -> wasmtime::Result<Self> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.envs(&grants.env)
            .envs(extra_env)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .stdout(GuestLog::new(grants, "stdout"))
            .stderr(GuestLog::new(grants, "stderr"));
        for (host, guest, writable) in &grants.dirs {
            let perms = if *writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            wasi.preopened_dir(host, guest, perms)?;
        }
        Ok(Self {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            config: grants.config.clone(),
            config_values: grants.config_values.clone(),
            base_config: grants.config.clone(),
            base_config_values: grants.config_values.clone(),
            tenant: grants.tenant.clone(),
            component: grants.component.clone(),
            outbound: grants.outbound.for_instance(),
            keyvalue: grants.keyvalue.clone(),
            sql: grants.sql.clone(),
            messaging: grants.messaging.clone(),
            limiter: MemoryLimiter {
                limit: grants.memory_limit,
                refused: false,
                budget: grants.memory_budget.clone(),
                tenant: grants.owner.clone(),
                reserved: 0,
                last_growth: 0,
                node_refused: false,
                tenant_refused: false,
            },
            cpu_turn: Arc::default(),
            deadline: std::time::Instant::now(),
        })
    }

    /// Makes `values` (a delivery's event id and attempt) readable through `wasi:config`
    /// for this call, over the grants' values; none: the grants' values alone. A warm
    /// instance gets them this way only, since a guest reads its environment once.
    pub fn set_call_values(&mut self, values: &[(String, String)]) {
        if values.is_empty() {
            if !Arc::ptr_eq(&self.config_values, &self.base_config_values) {
                self.config = self.base_config.clone();
                self.config_values = self.base_config_values.clone();
            }
            return;
        }
        let mut merged = (*self.base_config_values).clone();
        merged.extend(values.iter().cloned());
        self.config = Arc::new(merged.iter().collect::<WasiConfigVariables>());
        self.config_values = Arc::new(merged);
    }

    pub fn config(&mut self) -> WasiConfig<'_> {
        WasiConfig::new(&self.config)
    }

    pub fn config_drafts(&mut self) -> crate::capabilities::config::Config<'_> {
        crate::capabilities::config::Config {
            values: &self.config_values,
        }
    }

    pub fn logging(&mut self) -> crate::capabilities::logging::Logging<'_> {
        crate::capabilities::logging::Logging {
            tenant: &self.tenant,
            component: &self.component,
        }
    }

    pub fn messaging(&mut self) -> Messaging<'_> {
        Messaging {
            grant: &self.messaging,
        }
    }

    pub fn sql(&mut self) -> Sql<'_> {
        Sql {
            grant: self.sql.as_deref(),
            table: &mut self.table,
        }
    }

    pub fn keyvalue(&mut self) -> KeyValue<'_> {
        KeyValue {
            grant: self.keyvalue.as_deref(),
            table: &mut self.table,
        }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// Caps one instance's linear memory, and reserves it from its tenant's budget and the
/// node's. Unlike
/// wasmtime's `StoreLimits` it remembers that it refused (and whose limit it was), so a
/// trap that follows (Rust guests abort when allocation fails) is reported as "memory
/// limit" or "node out of memory" rather than as an anonymous trap.
pub struct MemoryLimiter {
    limit: usize,
    /// The component's own limit refused a growth.
    pub refused: bool,
    budget: Arc<crate::runtime::memory::MemoryBudget>,
    tenant: Arc<crate::tenancy::Tenant>,
    /// Bytes this instance holds of the budgets (all its memories).
    reserved: u64,
    /// The last growth granted, taken back if it then fails.
    last_growth: u64,
    /// The node's budget refused a growth.
    pub node_refused: bool,
    /// The tenant's budget refused a growth.
    pub tenant_refused: bool,
}

/// Tables hold function references; no real guest needs more than this many entries.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl MemoryLimiter {
    /// Bytes of linear memory the instance holds.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = true;
            return Ok(false);
        }
        let growth = desired.saturating_sub(current) as u64;
        // Idle warm instances are a cache: they make room before a growth is refused.
        let room = |budget: &crate::runtime::memory::MemoryBudget| {
            budget.try_reserve(growth)
                || (crate::runtime::reuse::evict_idle_everywhere() > 0
                    && budget.try_reserve(growth))
        };
        if !room(&self.tenant.memory) {
            self.tenant_refused = true;
            self.tenant
                .breach(crate::tenancy::quota::MEMORY, "a memory growth was refused");
            return Ok(false);
        }
        if !room(&self.budget) {
            self.tenant.memory.release(growth);
            self.node_refused = true;
            return Ok(false);
        }
        self.reserved += growth;
        self.last_growth = growth;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // Granted, but the allocator could not: the reservation goes back.
        self.budget.release(self.last_growth);
        self.tenant.memory.release(self.last_growth);
        self.reserved -= self.last_growth;
        self.last_growth = 0;
        tracing::debug!(error = %error, "a memory growth failed after it was granted");
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.budget.release(self.reserved);
        self.tenant.memory.release(self.reserved);
    }
}

/// A guest's stdout or stderr, forwarded line by line to the node's log with the tenant
/// and component attached, so an operator can tell whose output it is.
///
/// The partial line lives with the instance, not with one stream handle: guests built on
/// the `wasip2` crate or wstd ask for a new stdout handle per write, so a line printed in
/// pieces arrives through several handles and is still logged once, at its newline (or
/// when the instance goes away).
#[derive(Clone)]
struct GuestLog {
    line: Arc<std::sync::Mutex<LineBuffer>>,
}

impl GuestLog {
    fn new(grants: &Grants, stream: &'static str) -> Self {
        Self {
            line: Arc::new(std::sync::Mutex::new(LineBuffer {
                tenant: grants.tenant.clone(),
                component: grants.component.clone(),
                stream,
                pending: Vec::new(),
            })),
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Longest line kept before it is logged anyway, so a guest cannot grow host memory by
/// never writing a newline.
const MAX_LOG_LINE: usize = 8 * 1024;

struct LineBuffer {
    tenant: Arc<str>,
    component: Arc<str>,
    stream: &'static str,
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Takes the guest's bytes a line (or 8 KiB) at a time, so the partial line never
    /// holds more than [`MAX_LOG_LINE`] however much one write carries.
    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = MAX_LOG_LINE - self.pending.len();
            let take = match bytes.iter().take(room).position(|&b| b == b'\n') {
                Some(newline) => newline + 1,
                None => bytes.len().min(room),
            };
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.last() == Some(&b'\n') || self.pending.len() >= MAX_LOG_LINE {
                self.emit(self.pending.len());
            }
        }
    }

    fn emit(&mut self, upto: usize) {
        let line: Vec<u8> = self.pending.drain(..upto).collect();
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        tracing::info!(
            target: "trellis::guest",
            tenant = %self.tenant,
            component = %self.component,
            stream = self.stream,
            "{text}"
        );
    }
}

impl Drop for LineBuffer {
    /// The instance is gone: an unfinished last line is still the guest's output.
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.emit(self.pending.len());
        }
    }
}

impl tokio::io::AsyncWrite for GuestLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.line.lock().expect("guest log lock").write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
