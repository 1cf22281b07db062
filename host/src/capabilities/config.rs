//! Config values for guests in every `wasi:config` version components are built for:
//! `0.2.0-rc.1` (wasmtime's, from `wasmtime-wasi-config`), `0.2.0-draft-2024-09-27`
//! (Spin 4's), `0.2.0-draft` (wasmCloud's, as `store` and as its older name `runtime`).
//! All read the same values, the component's `config` (with its tenant's), which are also
//! its environment variables. The four texts are the same interface; only names differ.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

use crate::bindings::compat::wasi::config0_2_0_draft::store as draft;
use crate::bindings::compat::wasi::config0_2_0_draft_2024_09_27::store as spin;
use crate::bindings::compat_runtime::wasi::config::runtime as legacy;

/// The view a store gives the config host functions: the component's values.
pub struct Config<'a> {
    pub values: &'a BTreeMap<String, String>,
}

struct HasConfig;

impl HasData for HasConfig {
    type Data<'a> = Config<'a>;
}

/// The versions beyond rc.1 (which `wasmtime_wasi_config::add_to_linker` adds).
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> Config<'_>,
) -> wasmtime::Result<()> {
    draft::add_to_linker::<T, HasConfig>(linker, view)?;
    spin::add_to_linker::<T, HasConfig>(linker, view)?;
    legacy::add_to_linker::<T, HasConfig>(linker, view)?;
    Ok(())
}

impl Config<'_> {
    fn get(&self, key: &str) -> Option<String> {
        self.values.get(key).cloned()
    }

    fn all(&self) -> Vec<(String, String)> {
        self.values
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl draft::Host for Config<'_> {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<String>, draft::Error>> {
        Ok(Ok(Config::get(self, &key)))
    }

    async fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, draft::Error>> {
        Ok(Ok(self.all()))
    }
}

impl spin::Host for Config<'_> {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<String>, spin::Error>> {
        Ok(Ok(Config::get(self, &key)))
    }

    async fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, spin::Error>> {
        Ok(Ok(self.all()))
    }
}

impl legacy::Host for Config<'_> {
    fn get(
        &mut self,
        key: String,
    ) -> wasmtime::Result<Result<Option<String>, legacy::ConfigError>> {
        Ok(Ok(Config::get(self, &key)))
    }

    fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, legacy::ConfigError>> {
        Ok(Ok(self.all()))
    }
}

/// Shared, built once per version from its entry.
pub type ConfigValues = Arc<BTreeMap<String, String>>;
