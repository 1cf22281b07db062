//! The node's wasmtime engines: how they are configured (component model, async, epoch
//! interruption, the pooling allocator, the on-disk compiled-code cache) and the epoch
//! ticker thread that makes request deadlines work.
//!
//! There are two ([`Engines`]), alike but for the component model's concurrency support:
//! a WASIp3 component (async exports, streams, futures) needs it, and with it on, every
//! call into any component goes through wasmtime's task machinery: a WASIp2 hello's
//! in-process instantiate + call took 100-116 µs with it and 61-88 µs without, in five
//! paired runs of `instantiate_cost`. So WASIp2-only components are compiled for the `plain`
//! engine and only those that need it for the `concurrent` one (`crate::deploy::code`).
//! Each engine has its own instance pool of `node.max_instances`.
//!
//! The pooling knobs are chosen for per-request instantiation on small VMs, where instances
//! are created and torn down thousands of times a second: memory is initialised by copying
//! the (small) data segments rather than by copy-on-write mappings, dirtied pages are reset
//! in place (PAGEMAP_SCAN) rather than decommitted, and what is decommitted goes in batches. BENCHMARKS.md has the measurements behind each choice.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

/// How often the epoch advances. A guest stuck in a loop yields to the executor this often
/// (and queues for its tenant's CPU turn), and request deadlines are enforced to this
/// granularity. It bounds how long a looping guest can hold a worker thread that another
/// tenant's request is waiting for: at 10 ms a quiet tenant's p99 went from 1.5 ms to 17 ms
/// beside a looping neighbour (BENCHMARKS.md, "Noisy neighbours").
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Unused pool slots kept warm (reset, up to 4 MiB resident each) for the next instances.
pub const WARM_SLOTS: u32 = 32;

/// The engine-wide limits a node is built with.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Instances that may exist at once across the node.
    pub max_instances: u32,
    /// Largest linear memory any one instance may have.
    pub max_instance_memory: u64,
    /// Where compiled code is cached between runs; `None` disables the cache.
    pub cache_dir: Option<std::path::PathBuf>,
}

/// The node's two engines, alike but for the component model's concurrency support.
#[derive(Clone)]
pub struct Engines {
    /// For components that need no concurrency support (WASIp2 and earlier).
    pub plain: Engine,
    /// For WASIp3 components.
    pub concurrent: Engine,
}

/// The engines plus the thread that advances their epochs. Dropping it stops the thread.
pub struct Runtime {
    pub engines: Engines,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    pub fn new(settings: &EngineSettings) -> Result<Self> {
        let build = |concurrency: bool| -> Result<Engine> {
            let mut config = engine_config(settings)?;
            config.concurrency_support(concurrency);
            Engine::new(&config)
                .map_err(anyhow::Error::from)
                .context("creating the wasmtime engine")
        };
        let engines = Engines {
            plain: build(false)?,
            concurrent: build(true)?,
        };
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (ticked, stop) = (engines.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("trellis-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticked.plain.increment_epoch();
                    ticked.concurrent.increment_epoch();
                }
            })
            .context("starting the epoch ticker")?;
        Ok(Self {
            engines,
            ticker_stop,
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config(settings: &EngineSettings) -> Result<Config> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Copying a small data segment is cheaper here than mapping it copy-on-write and
    // paying the page faults plus the madvise on every instance teardown.
    config.memory_init_cow(false);

    let instances = settings.max_instances;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        // A component built with the preview1 adapter has a handful of core instances,
        // memories and tables (the module, the adapter, shims).
        .max_core_instances_per_component(32)
        .total_core_instances(instances.saturating_mul(4))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
        .total_stacks(instances)
        .max_memory_size(usize::try_from(settings.max_instance_memory).unwrap_or(usize::MAX))
        // Reset memory in place instead of giving it back: with PAGEMAP_SCAN (Linux 6.7+)
        // wasmtime finds the pages an instance dirtied and restores only those, so up to
        // 4 MiB of each slot stays resident and the next instance takes no page faults.
        // Where the ioctl is missing this falls back to memset of the low 4 MiB, which
        // measured slower; then only the batching below helps. Each madvise on a
        // multi-core host sends TLB-shootdown IPIs, so what is decommitted goes in batches.
        .linear_memory_keep_resident(4 << 20)
        .pagemap_scan(wasmtime::Enabled::Auto)
        .table_keep_resident(64 << 10)
        // Decommit what lies past the kept 4 MiB when the instance ends, not in batches:
        // a batch holds every queued memory resident (64 entries of a guest that grew to
        // 64 MiB is 4 GiB) with nothing to flush it when the node goes idle, and a queued
        // slot cannot be reused meanwhile. A small guest's entry is empty (its dirty
        // pages were reset in place), so this costs it no system call.
        .decommit_batch_size(1)
        // Reset slots kept warm for reuse beyond what is in use: each holds at most the
        // 4 MiB above, so this bounds the node's reserve (see README, "Memory").
        .max_unused_warm_slots(WARM_SLOTS.min(instances));
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));

    if let Some(dir) = &settings.cache_dir {
        config.cache(Some(compile_cache(dir)?));
    }
    Ok(config)
}

fn compile_cache(dir: &Path) -> Result<Cache> {
    // wasmtime's cache refuses relative directories (e.g. from `--data-dir data`).
    let dir = &std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the compile cache {}", dir.display()))?;
    let mut cache_config = CacheConfig::new();
    cache_config.with_directory(dir);
    Cache::new(cache_config)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("opening the compile cache {}", dir.display()))
}
