//! The shop's **notification** service: turns order and payment events into messages for
//! the customer, renders them from templates, delivers them and records each one with its
//! delivery status.
//!
//! Delivery goes to the `WEBHOOK_URL` of the component's config when there is one (a POST
//! of `{"to", "subject", "body"}`; any 2xx is `delivered`, anything else `failed` with the
//! reason; the host must be in `outbound`), otherwise to the node's log (the `log`
//! channel). Templates are built in and can be replaced per template through config
//! (`TEMPLATE_ORDER_CONFIRMED_SUBJECT`, `TEMPLATE_ORDER_CONFIRMED_BODY`, ...);
//! `{{name}}` is replaced by the value of `name`.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use shop_common::api::required;
use shop_common::auth;
use shop_common::call;
use shop_common::db::{self, Db, Sql};
use shop_common::events;
use shop_common::{ApiError, ApiResult, Page, Request, Response, params};
use wasip2::http::types::Method;

shop_common::message_handler_bindings!();

use shop_common::wasmcloud::messaging::types::BrokerMessage;

struct NotificationService;

shop_common::export_http!(NotificationService, route);
export!(NotificationService);

/// Built-in templates: (name, subject, body).
const TEMPLATES: &[(&str, &str, &str)] = &[
    (
        "order_created",
        "We received your order {{order_id}}",
        "Your order {{order_id}} of {{total}} is placed and waits for its payment.",
    ),
    (
        "order_confirmed",
        "Order {{order_id}} is confirmed",
        "We received your payment of {{total}}. Your order {{order_id}} is being prepared.",
    ),
    (
        "order_cancelled",
        "Order {{order_id}} was cancelled",
        "Your order {{order_id}} of {{total}} was cancelled ({{reason}}). Anything charged is refunded.",
    ),
    (
        "order_shipped",
        "Order {{order_id}} has shipped",
        "Your order {{order_id}} is on its way.",
    ),
    (
        "order_delivered",
        "Order {{order_id}} was delivered",
        "Your order {{order_id}} was delivered. Thank you for shopping with us.",
    ),
    (
        "payment_failed",
        "Payment for order {{order_id}} failed",
        "We could not charge {{total}} for your order {{order_id}}: {{reason}}.",
    ),
    ("message", "{{subject}}", "{{body}}"),
];

/// The subject and body of template `name` (config overrides first), or `None` if there
/// is no such template.
fn template(name: &str) -> Option<(String, String)> {
    let (_, subject, body) = TEMPLATES.iter().find(|(n, _, _)| *n == name)?;
    let key = name.to_ascii_uppercase();
    let subject =
        shop_common::config(&format!("TEMPLATE_{key}_SUBJECT")).unwrap_or(subject.to_string());
    let body = shop_common::config(&format!("TEMPLATE_{key}_BODY")).unwrap_or(body.to_string());
    Some((subject, body))
}

/// `text` with every `{{name}}` replaced by `data[name]`; a name `data` lacks is an error.
fn render(text: &str, data: &Map<String, Value>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        let name = rest[start + 2..start + len].trim();
        match data.get(name) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => return Err(format!("the template needs data.{name}")),
            Some(other) => out.push_str(&other.to_string()),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `1234` cents in `EUR` as `12.34 EUR`.
fn money(cents: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, (cents % 100).abs())
}

/// What the handler reads from `order.*` and `payment.*` events.
#[derive(Deserialize)]
struct Event {
    order_id: String,
    user_id: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    total_cents: Option<i64>,
    #[serde(default)]
    amount_cents: Option<i64>,
    #[serde(default)]
    currency: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    decline_reason: Option<String>,
}

impl exports::wasmcloud::messaging::handler::Guest for NotificationService {
    fn handle_message(message: BrokerMessage) -> Result<(), String> {
        let event: Event = events::parse(&message.subject, &message.body)?;
        let template_name = message.subject.replace('.', "_");
        if template(&template_name).is_none() {
            return Err(format!(
                "notification has no template for {}",
                message.subject
            ));
        }
        let cents = event.total_cents.or(event.amount_cents).unwrap_or(0);
        let mut data = Map::new();
        data.insert("order_id".into(), json!(event.order_id));
        data.insert("total".into(), json!(money(cents, &event.currency)));
        data.insert(
            "reason".into(),
            json!(
                event
                    .reason
                    .or(event.decline_reason)
                    .unwrap_or_else(|| "no reason given".into())
            ),
        );
        let key = format!("{}:{}", message.subject, event.order_id);
        send(
            &event.user_id,
            &event.email,
            &template_name,
            &data,
            Some((&message.subject, &key)),
        )
        .map(|_| ())
        .map_err(|e| format!("{}: {}", e.code, e.message))
    }
}

/// Renders, delivers and records one notification; `event` is the subject and the
/// idempotency key when an event caused it. Returns the stored row.
fn send(
    user_id: &str,
    recipient: &str,
    template_name: &str,
    data: &Map<String, Value>,
    event: Option<(&str, &str)>,
) -> Result<Vec<db::Value>, ApiError> {
    if let Some((_, key)) = event
        && let Some(done) = Db.row(
            &format!("SELECT {COLUMNS} FROM notifications WHERE event_key = $1"),
            params![key],
        )?
    {
        return Ok(done);
    }
    let (subject, body) = template(template_name)
        .ok_or_else(|| ApiError::invalid("template", format!("no template {template_name:?}")))?;
    let subject = render(&subject, data).map_err(|e| ApiError::invalid("data", e))?;
    let body = render(&body, data).map_err(|e| ApiError::invalid("data", e))?;
    let (channel, outcome) = deliver(recipient, &subject, &body);
    let id = shop_common::new_id("ntf");
    let status = if outcome.is_ok() {
        "delivered"
    } else {
        "failed"
    };
    // The row as COLUMNS lists it.
    let row: Vec<db::Value> = vec![
        id.as_str().into(),
        user_id.into(),
        recipient.into(),
        channel.into(),
        template_name.into(),
        subject.into(),
        body.into(),
        event.map(|(subject, _)| subject).into(),
        status.into(),
        outcome.err().into(),
        shop_common::now().into(),
    ];
    let mut values = row.clone();
    values.push(event.map(|(_, key)| key).into());
    let inserted = Db.raw_execute(
        "INSERT INTO notifications (id, user_id, recipient, channel, template, subject, body, event, status, error, created_at, event_key) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &values,
    );
    match (inserted, event) {
        (Ok(_), _) => Ok(row),
        // A concurrent delivery of the same event recorded it first.
        (Err(e), Some((_, key))) if db::is_unique_violation(&e) => Db
            .row(
                &format!("SELECT {COLUMNS} FROM notifications WHERE event_key = $1"),
                params![key],
            )?
            .ok_or_else(|| ApiError::internal("notification vanished")),
        (Err(e), _) => Err(e.into()),
    }
}

/// Sends it on the configured channel: (channel, Ok or why it failed).
fn deliver(recipient: &str, subject: &str, body: &str) -> (&'static str, Result<(), String>) {
    match shop_common::config("WEBHOOK_URL") {
        Some(url) => {
            let payload = json!({"to": recipient, "subject": subject, "body": body});
            let outcome = match call::external(Method::Post, &url, Some(&payload)) {
                Ok(reply) if (200..300).contains(&reply.status) => Ok(()),
                Ok(reply) => Err(format!("the webhook answered {}", reply.status)),
                Err(why) => Err(format!("the webhook did not answer: {why}")),
            };
            ("webhook", outcome)
        }
        None => {
            // Goes to the node's log, tagged with this component.
            println!("to {recipient}: {subject}");
            ("log", Ok(()))
        }
    }
}

const COLUMNS: &str =
    "id, user_id, recipient, channel, template, subject, body, event, status, error, created_at";

fn notification_json(row: &[db::Value]) -> Value {
    json!({
        "id": db::text(row, 0),
        "user_id": db::text(row, 1),
        "recipient": db::text(row, 2),
        "channel": db::text(row, 3),
        "template": db::text(row, 4),
        "subject": db::text(row, 5),
        "body": db::text(row, 6),
        "event": db::opt_text(row, 7),
        "status": db::text(row, 8),
        "error": db::opt_text(row, 9),
        "created_at": db::text(row, 10),
    })
}

fn route(request: &Request) -> ApiResult {
    let Some(segments) = request.segments_after("/api/v1/notifications") else {
        return Err(ApiError::no_such_path());
    };
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", []) => send_api(request),
        ("GET", []) => list(request),
        ("GET", [id]) => {
            let claims = auth::authenticate(request)?;
            let row = Db
                .row(
                    &format!("SELECT {COLUMNS} FROM notifications WHERE id = $1"),
                    params![*id],
                )?
                .ok_or_else(|| ApiError::not_found("notification"))?;
            claims.require_owner_or_admin(&db::text(&row, 1))?;
            Ok(Response::ok(&notification_json(&row)))
        }
        (_, [] | [_]) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::no_such_path()),
    }
}

#[derive(Deserialize)]
struct SendRequest {
    user_id: Option<String>,
    recipient: Option<String>,
    template: Option<String>,
    data: Option<Map<String, Value>>,
}

fn send_api(request: &Request) -> ApiResult {
    auth::authenticate(request)?.require_admin()?;
    let body: SendRequest = request.json()?;
    let user_id = required(body.user_id, "user_id")?;
    let recipient = required(body.recipient, "recipient")?;
    if recipient.trim().is_empty() {
        return Err(ApiError::invalid(
            "recipient",
            "recipient must not be empty",
        ));
    }
    let template_name = required(body.template, "template")?;
    let data = body.data.unwrap_or_default();
    let row = send(&user_id, &recipient, &template_name, &data, None)?;
    Ok(Response::created(&notification_json(&row)))
}

fn list(request: &Request) -> ApiResult {
    let claims = auth::authenticate(request)?;
    let page = Page::from_query(request)?;
    let user = claims.list_scope(request.query("user_id"))?;
    let filter = "CAST($1 AS TEXT) IS NULL OR user_id = $1";
    let total = Db.count(
        &format!("SELECT COUNT(*) FROM notifications WHERE {filter}"),
        params![user.clone()],
    )?;
    let items = Db
        .rows(
            &format!("SELECT {COLUMNS} FROM notifications WHERE {filter} ORDER BY created_at, id LIMIT $2 OFFSET $3"),
            params![user, page.limit, page.offset],
        )?
        .iter()
        .map(|row| notification_json(row))
        .collect();
    Ok(page.answer(items, total))
}
