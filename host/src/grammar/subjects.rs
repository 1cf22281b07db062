//! Message subjects: NATS-style tokens separated by dots, `*` matching one token and `>`
//! the rest, and the tenant prefix that keeps each tenant's subjects apart on a shared bus.

/// Whether `subject` matches the NATS pattern `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return p.next().is_none(),
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Why a subject or pattern is not acceptable, if it is not.
pub fn subject_problem(subject: &str, wildcards_allowed: bool) -> Option<String> {
    if subject.is_empty() || subject.chars().any(|c| c.is_whitespace()) {
        return Some(format!(
            "{subject:?} is not a subject (empty, or contains whitespace)"
        ));
    }
    let mut tokens = subject.split('.').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() {
            return Some(format!("{subject:?} has an empty token"));
        }
        let wildcard = token == "*" || token == ">";
        if wildcard && !wildcards_allowed {
            return Some(format!(
                "{subject:?}: wildcards are for subscriptions, not for publishing"
            ));
        }
        if token == ">" && tokens.peek().is_some() {
            return Some(format!("{subject:?}: '>' must be the last token"));
        }
    }
    None
}

/// The bus subject of `tenant`'s core `subject` (or pattern): `order.created` of tenant
/// `shop` is `trellis.shop.order.created` on the bus.
pub fn core_subject(tenant: &str, subject: &str) -> String {
    [CORE, tenant, ".", subject].concat()
}

/// The subject of `tenant`'s durable event `subject` (or pattern): `order.created` of
/// tenant `shop`, published as an event, is `trellis-events.shop.order.created` (apart
/// from core subjects, which a JetStream stream must not capture: it would answer
/// requests).
pub fn event_subject(tenant: &str, subject: &str) -> String {
    [EVENTS, tenant, ".", subject].concat()
}

/// The subject `tenant`'s guests know a bus subject or event subject by: without the
/// tenant's prefix. `None` for a subject outside the tenant (a reply inbox, say).
pub fn guest_subject<'a>(tenant: &str, bus_subject: &'a str) -> Option<&'a str> {
    [CORE, EVENTS].iter().find_map(|kind| {
        bus_subject
            .strip_prefix(kind)?
            .strip_prefix(tenant)?
            .strip_prefix('.')
    })
}

const CORE: &str = "trellis.";
const EVENTS: &str = "trellis-events.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("order.*", "order.created"));
        assert!(!subject_matches("order.*", "order.created.eu"));
        assert!(subject_matches("order.>", "order.created.eu"));
        assert!(!subject_matches("order.>", "order"));
        assert!(subject_matches("order.created", "order.created"));
        assert!(!subject_matches("order.created", "order.cancelled"));
        assert!(subject_problem("order.*", false).is_some());
        assert!(subject_problem("order.>.x", true).is_some());
        assert!(subject_problem("order..x", true).is_some());
        assert!(subject_problem("order.created", false).is_none());
    }

    #[test]
    fn tenant_prefixes_come_and_go() {
        assert_eq!(core_subject("shop", "order.*"), "trellis.shop.order.*");
        assert_eq!(
            event_subject("shop", "order.created"),
            "trellis-events.shop.order.created"
        );
        assert_eq!(
            guest_subject("shop", "trellis.shop.order.created"),
            Some("order.created")
        );
        assert_eq!(
            guest_subject("shop", "trellis-events.shop.order.created"),
            Some("order.created")
        );
        assert_eq!(guest_subject("shop", "trellis.shopping.order"), None);
        assert_eq!(guest_subject("shop", "_INBOX.abc"), None);
    }
}
