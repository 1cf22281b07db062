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
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Some(format!("{subject:?} has an empty token"));
        }
        let wildcard = *token == "*" || *token == ">";
        if wildcard && !wildcards_allowed {
            return Some(format!(
                "{subject:?}: wildcards are for subscriptions, not for publishing"
            ));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Some(format!("{subject:?}: '>' must be the last token"));
        }
    }
    None
}

/// The prefix of every bus subject of `tenant`: `order.created` of tenant `shop` is
/// `trellis.shop.order.created` on the bus.
pub fn tenant_prefix(tenant: &str) -> String {
    format!("trellis.{tenant}.")
}

/// The prefix of `tenant`'s durable events: `order.created` of tenant `shop`, published
/// as an event, is `trellis-events.shop.order.created` (apart from core subjects, which a
/// JetStream stream must not capture: it would answer requests).
pub fn events_prefix(tenant: &str) -> String {
    format!("trellis-events.{tenant}.")
}

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
}
