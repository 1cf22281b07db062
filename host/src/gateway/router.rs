//! Request routing: the `Host` header picks the tenant, then the longest route prefix
//! within that tenant picks the target (for the node, a component's slot). A leaf: it
//! depends on the route grammar only, and the registry builds one per change.
//!
//! Host matching prefers an exact name, then the longest `*.domain` wildcard, then a
//! tenant that claimed `*`. Ports are ignored: tenants are told apart by name only.

use std::collections::HashMap;
use std::sync::Arc;

use crate::grammar::routes::{normalize_route, route_matches, strip_port};

pub struct TenantRoutes<T> {
    pub name: Arc<str>,
    /// (normalized prefix, component), longest prefix first.
    routes: Vec<(String, T)>,
}

pub struct Router<T> {
    tenants: Vec<TenantRoutes<T>>,
    exact_hosts: HashMap<String, usize>,
    /// (suffix including the leading dot, tenant index), longest suffix first.
    wildcard_hosts: Vec<(String, usize)>,
    catch_all: Option<usize>,
}

impl<T: Clone> Router<T> {
    /// `tenants`: (name, host patterns); `targets`: (target, its tenant, the route
    /// prefixes it serves).
    pub fn new(tenants: &[(String, Vec<String>)], targets: &[(T, Arc<str>, Vec<String>)]) -> Self {
        let mut router = Router {
            tenants: Vec::new(),
            exact_hosts: HashMap::new(),
            wildcard_hosts: Vec::new(),
            catch_all: None,
        };
        // Grouped once: a node with thousands of tenants rebuilds this on every change.
        let mut by_tenant: HashMap<&str, Vec<(String, T)>> = HashMap::new();
        for (target, tenant, prefixes) in targets {
            by_tenant.entry(tenant).or_default().extend(
                prefixes
                    .iter()
                    .map(|p| (normalize_route(p), target.clone())),
            );
        }
        for (index, (name, hosts)) in tenants.iter().enumerate() {
            let mut routes = by_tenant.remove(name.as_str()).unwrap_or_default();
            routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
            router.tenants.push(TenantRoutes {
                name: name.as_str().into(),
                routes,
            });
            for host in hosts {
                let host = host.to_ascii_lowercase();
                if host == "*" {
                    router.catch_all = Some(index);
                } else if let Some(suffix) = host.strip_prefix('*') {
                    router.wildcard_hosts.push((suffix.to_string(), index));
                } else {
                    router.exact_hosts.insert(host, index);
                }
            }
        }
        router
            .wildcard_hosts
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        router
    }

    /// The tenant serving `host` (a `Host` header value; any port is ignored).
    pub fn tenant_for_host(&self, host: &str) -> Option<&TenantRoutes<T>> {
        let host = strip_port(host);
        // Hosts are nearly always sent in lower case already: no copy per request then.
        let name: std::borrow::Cow<str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            host.to_ascii_lowercase().into()
        } else {
            host.into()
        };
        let index = self.exact_hosts.get(&*name).copied().or_else(|| {
            self.wildcard_hosts
                .iter()
                .find(|(suffix, _)| name.ends_with(suffix.as_str()) && name.len() > suffix.len())
                .map(|(_, i)| *i)
        });
        index.or(self.catch_all).map(|i| &self.tenants[i])
    }

    /// The target serving `path` for `host`.
    pub fn route(&self, host: &str, path: &str) -> Option<&T> {
        let tenant = self.tenant_for_host(host)?;
        tenant
            .routes
            .iter()
            .find(|(prefix, _)| route_matches(prefix, path))
            .map(|(_, d)| d)
    }
}
