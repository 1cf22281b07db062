//! Route prefixes and host names: how a manifest route is normalised, when a request path
//! falls under it, and how a `Host` header is compared (without its port).

/// Paths the gateway answers itself, on every host; no route may claim them.
pub const RESERVED_PATHS: &[&str] = &["/health", "/health/ready"];

/// Routes compare without a trailing slash (except the root route itself).
pub fn normalize_route(route: &str) -> String {
    let trimmed = route.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    }
}

/// Whether `path` falls under the route prefix `route` (normalized): the same path, or
/// below it at a segment boundary, so `/api/users` serves `/api/users/7` but not
/// `/api/usersettings`.
pub fn route_matches(route: &str, path: &str) -> bool {
    route == "/"
        || path == route
        || (path.starts_with(route) && path.as_bytes().get(route.len()) == Some(&b'/'))
}

/// A `Host` header value without its port (tenants are told apart by name only).
pub fn strip_port(host: &str) -> &str {
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
    use super::*;

    #[test]
    fn routes_match_at_segment_boundaries() {
        assert!(route_matches("/api/users", "/api/users"));
        assert!(route_matches("/api/users", "/api/users/7"));
        assert!(!route_matches("/api/users", "/api/usersettings"));
        assert!(route_matches("/", "/anything"));
        assert_eq!(normalize_route("/api/"), "/api");
        assert_eq!(normalize_route("/"), "/");
    }

    #[test]
    fn ports_are_ignored() {
        assert_eq!(strip_port("shop.example.com:8080"), "shop.example.com");
        assert_eq!(strip_port("shop.example.com"), "shop.example.com");
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("127.0.0.1:80"), "127.0.0.1");
    }
}
