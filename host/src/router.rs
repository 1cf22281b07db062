//! Request routing: the `Host` header picks the tenant, then the longest route prefix
//! within that tenant picks the component.
//!
//! Host matching prefers an exact name, then the longest `*.domain` wildcard, then a
//! tenant that claimed `*`. Ports are ignored: tenants are told apart by name only.

use std::collections::HashMap;
use std::sync::Arc;

use crate::component::Deployment;
use crate::manifest::{normalize_route, route_matches};

pub struct TenantRoutes {
    pub name: Arc<str>,
    /// (normalized prefix, component), longest prefix first.
    routes: Vec<(String, Arc<Deployment>)>,
}

pub struct Router {
    tenants: Vec<TenantRoutes>,
    exact_hosts: HashMap<String, usize>,
    /// (suffix including the leading dot, tenant index), longest suffix first.
    wildcard_hosts: Vec<(String, usize)>,
    catch_all: Option<usize>,
    deployments: Vec<Arc<Deployment>>,
    /// (tenant, component) -> deployment, for component-to-component calls.
    by_name: HashMap<(Arc<str>, Arc<str>), Arc<Deployment>>,
}

impl Router {
    /// `tenants`: (name, host patterns); `deployments`: each with the routes it serves.
    pub fn new(
        tenants: &[(String, Vec<String>)],
        deployments: Vec<(Arc<Deployment>, Vec<String>)>,
    ) -> Self {
        let mut router = Router {
            tenants: Vec::new(),
            exact_hosts: HashMap::new(),
            wildcard_hosts: Vec::new(),
            catch_all: None,
            deployments: deployments.iter().map(|(d, _)| d.clone()).collect(),
            by_name: deployments
                .iter()
                .map(|(d, _)| ((d.tenant.clone(), d.name.clone()), d.clone()))
                .collect(),
        };
        for (index, (name, hosts)) in tenants.iter().enumerate() {
            let mut routes: Vec<(String, Arc<Deployment>)> = deployments
                .iter()
                .filter(|(d, _)| &*d.tenant == name.as_str())
                .flat_map(|(d, prefixes)| prefixes.iter().map(|p| (normalize_route(p), d.clone())))
                .collect();
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
    pub fn tenant_for_host(&self, host: &str) -> Option<&TenantRoutes> {
        let name = strip_port(host).to_ascii_lowercase();
        let index = self.exact_hosts.get(&name).copied().or_else(|| {
            self.wildcard_hosts
                .iter()
                .find(|(suffix, _)| name.ends_with(suffix.as_str()) && name.len() > suffix.len())
                .map(|(_, i)| *i)
        });
        index.or(self.catch_all).map(|i| &self.tenants[i])
    }

    /// The component serving `path` for `host`.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Deployment>> {
        let tenant = self.tenant_for_host(host)?;
        tenant
            .routes
            .iter()
            .find(|(prefix, _)| route_matches(prefix, path))
            .map(|(_, d)| d)
    }

    /// The component named `component` in `tenant`; components of other tenants are not
    /// found, whatever their name.
    pub fn component(&self, tenant: &str, component: &str) -> Option<&Arc<Deployment>> {
        self.by_name.get(&(Arc::from(tenant), Arc::from(component)))
    }

    pub fn deployments(&self) -> &[Arc<Deployment>] {
        &self.deployments
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: "[::1]:8080"
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(name, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            name
        } else {
            host
        }
    })
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn ports_are_ignored() {
        assert_eq!(strip_port("shop.example.com:8080"), "shop.example.com");
        assert_eq!(strip_port("shop.example.com"), "shop.example.com");
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("127.0.0.1:80"), "127.0.0.1");
    }
}
