//! The shop's **payment** service: charges each order at most once.
//!
//! An order is charged from its `order.created` event, or through `POST /api/v1/payments`
//! (e.g. when the event was lost); whichever comes first makes the payment, the other gets
//! that same payment back (the database's UNIQUE `order_id` decides). The outcome is
//! published as `payment.succeeded` or `payment.failed` for the order service. When a paid
//! order is cancelled (`order.cancelled`) its payment becomes `refunded`.
//!
//! There is no card network behind it: the decline rules are deterministic and documented
//! in this crate's README, so tests and demos can choose the outcome with the token.

use serde::Deserialize;
use serde_json::{Value, json};
use shop_common::api::required;
use shop_common::auth;
use shop_common::call;
use shop_common::db::{self, Db, Sql};
use shop_common::events;
use shop_common::{ApiError, ApiResult, Page, Request, Response, params};
use wasip2::http::types::Method;

shop_common::message_handler_bindings!();

use shop_common::wasmcloud::messaging::types::BrokerMessage;

struct PaymentService;

shop_common::export_http!(PaymentService, route);
export!(PaymentService);

impl exports::wasmcloud::messaging::handler::Guest for PaymentService {
    fn handle_message(message: BrokerMessage) -> Result<(), String> {
        let order: OrderEvent = events::parse(&message.subject, &message.body)?;
        let outcome = match message.subject.as_str() {
            "order.created" => {
                let token = order
                    .payment_token
                    .clone()
                    .unwrap_or_else(|| "tok_visa".into());
                charge(&order, &token).and_then(|(payment, created)| {
                    // A repeated event may mean the first outcome was never published.
                    if !created {
                        publish_outcome(&payment)
                    } else {
                        Ok(())
                    }
                })
            }
            "order.cancelled" => refund(&order),
            other => return Err(format!("payment does not handle {other}")),
        };
        outcome.map_err(|e| format!("{}: {}", e.code, e.message))
    }
}

fn route(request: &Request) -> ApiResult {
    let Some(segments) = request.segments_after("/api/v1/payments") else {
        return Err(ApiError::no_such_path());
    };
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", []) => pay(request),
        ("GET", []) => list(request),
        ("GET", [id]) => {
            let claims = auth::authenticate(request)?;
            let payment = Db
                .row(
                    &format!("SELECT {COLUMNS} FROM payments WHERE id = $1"),
                    params![*id],
                )?
                .ok_or_else(|| ApiError::not_found("payment"))?;
            claims.require_owner_or_admin(&db::text(&payment, 2))?;
            Ok(Response::ok(&payment_json(&payment)))
        }
        (_, [] | [_]) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::no_such_path()),
    }
}

const COLUMNS: &str =
    "id, order_id, user_id, email, amount_cents, currency, status, decline_reason, created_at";

fn payment_json(row: &[db::Value]) -> Value {
    json!({
        "id": db::text(row, 0),
        "order_id": db::text(row, 1),
        "user_id": db::text(row, 2),
        "amount_cents": db::int(row, 4),
        "currency": db::text(row, 5),
        "status": db::text(row, 6),
        "decline_reason": db::opt_text(row, 7),
        "created_at": db::text(row, 8),
    })
}

/// What a payment needs to know about an order (from its event or the order service).
#[derive(Deserialize)]
struct OrderEvent {
    order_id: String,
    user_id: String,
    #[serde(default)]
    email: String,
    total_cents: i64,
    currency: String,
    #[serde(default)]
    payment_token: Option<String>,
}

/// The decline rules (see README.md): `Err(reason)` when the charge is declined.
fn decide(token: &str, amount_cents: i64) -> Result<(), &'static str> {
    let limit: i64 = shop_common::config("MAX_AMOUNT_CENTS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    match token {
        "tok_decline" => Err("card_declined"),
        "tok_insufficient_funds" => Err("insufficient_funds"),
        t if !t.starts_with("tok_") => Err("invalid_token"),
        _ if amount_cents > limit => Err("amount_over_limit"),
        _ => Ok(()),
    }
}

/// Charges `order` once: `(payment, true)` when this call made it, `(payment, false)` when
/// the order already had one.
fn charge(order: &OrderEvent, token: &str) -> Result<(Vec<db::Value>, bool), ApiError> {
    let (status, reason) = match decide(token, order.total_cents) {
        Ok(()) => ("succeeded", None),
        Err(reason) => ("failed", Some(reason)),
    };
    let id = shop_common::new_id("pay");
    let now = shop_common::now();
    // The row as COLUMNS lists it.
    let payment: Vec<db::Value> = vec![
        id.as_str().into(),
        order.order_id.as_str().into(),
        order.user_id.as_str().into(),
        order.email.as_str().into(),
        order.total_cents.into(),
        order.currency.as_str().into(),
        status.into(),
        reason.into(),
        now.as_str().into(),
    ];
    let mut values = payment.clone();
    values.push(now.as_str().into());
    let inserted = Db.raw_execute(
        "INSERT INTO payments (id, order_id, user_id, email, amount_cents, currency, status, decline_reason, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &values,
    );
    match inserted {
        Ok(_) => {
            publish_outcome(&payment)?;
            Ok((payment, true))
        }
        // The order already has its payment (a repeated event, or the event and an API
        // call racing): that one stands.
        Err(e) if db::is_unique_violation(&e) => {
            let existing =
                by_order(&order.order_id)?.ok_or_else(|| ApiError::internal("payment vanished"))?;
            Ok((existing, false))
        }
        Err(e) => Err(e.into()),
    }
}

fn by_order(order_id: &str) -> Result<Option<Vec<db::Value>>, ApiError> {
    Db.row(
        &format!("SELECT {COLUMNS} FROM payments WHERE order_id = $1"),
        params![order_id],
    )
}

/// `payment.succeeded` / `payment.failed` / `payment.refunded`, with the payment.
fn publish_outcome(payment: &[db::Value]) -> Result<(), ApiError> {
    let mut event = payment_json(payment);
    event["payment_id"] = event["id"].clone();
    event["email"] = json!(db::text(payment, 3));
    events::publish(&format!("payment.{}", db::text(payment, 6)), &event)
}

#[derive(Deserialize)]
struct PayRequest {
    order_id: Option<String>,
    payment_token: Option<String>,
}

fn pay(request: &Request) -> ApiResult {
    let claims = auth::authenticate(request)?;
    let body: PayRequest = request.json()?;
    let order_id = required(body.order_id, "order_id")?;
    let token = required(body.payment_token, "payment_token")?;
    if let Some(existing) = by_order(&order_id)? {
        claims.require_owner_or_admin(&db::text(&existing, 2))?;
        // Paying again may mean the outcome's event was lost: send it again (whoever
        // consumes it handles it once).
        publish_outcome(&existing)?;
        return Ok(Response::ok(&payment_json(&existing)));
    }
    // The order service applies its own rules: not found, or not the caller's.
    let reply = call::internal(
        Method::Get,
        "order",
        &format!("/api/v1/orders/{order_id}"),
        request.header("authorization"),
        None,
    )?;
    match reply.status {
        200 => {}
        404 => return Err(ApiError::not_found("order").on("order_id")),
        403 => return Err(ApiError::forbidden("this order belongs to another user")),
        status => {
            return Err(ApiError::new(
                503,
                "dependency_unavailable",
                format!("the order service answered {status}"),
            ));
        }
    }
    let order = &reply.body;
    // The id must be the order's own, character for character: anything else in the
    // path (a query string, say) would make a second payment row for the same order.
    if order["id"].as_str() != Some(order_id.as_str()) {
        return Err(ApiError::not_found("order").on("order_id"));
    }
    // Only the customer pays (the payment's notices go to the payer's email).
    if order["user_id"].as_str() != Some(claims.sub.as_str()) {
        return Err(ApiError::forbidden("only the order's owner pays it"));
    }
    if order["status"] != "pending" {
        return Err(ApiError::new(
            409,
            "order_not_payable",
            format!(
                "the order is {}, only pending orders are paid",
                order["status"].as_str().unwrap_or("?")
            ),
        ));
    }
    let order = OrderEvent {
        order_id: order_id.clone(),
        user_id: order["user_id"].as_str().unwrap_or_default().to_string(),
        email: claims.email.clone(),
        total_cents: order["total_cents"].as_i64().unwrap_or(0),
        currency: order["currency"].as_str().unwrap_or("USD").to_string(),
        payment_token: None,
    };
    let (payment, created) = charge(&order, &token)?;
    let body = payment_json(&payment);
    Ok(if created {
        Response::created(&body)
    } else {
        Response::ok(&body)
    })
}

/// An order was cancelled: refund its payment, or, when it has none yet (the cancellation
/// overtook `order.created`), record a failed one so that it can never be charged.
fn refund(order: &OrderEvent) -> Result<(), ApiError> {
    // Twice at most: the void row can lose a race with a charge, which is then refunded.
    for _ in 0..2 {
        let refunded = Db.row(
            &format!(
                "UPDATE payments SET status = 'refunded', updated_at = $2 \
                 WHERE order_id = $1 AND status = 'succeeded' RETURNING {COLUMNS}"
            ),
            params![&order.order_id, shop_common::now()],
        )?;
        if let Some(payment) = refunded {
            return publish_outcome(&payment);
        }
        if by_order(&order.order_id)?.is_some() {
            // Failed, or refunded before: nothing was taken, or it was given back.
            return Ok(());
        }
        let now = shop_common::now();
        let void = Db.raw_execute(
            "INSERT INTO payments (id, order_id, user_id, email, amount_cents, currency, status, decline_reason, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'failed', 'order_cancelled', $7, $7)",
            params![
                shop_common::new_id("pay"),
                &order.order_id,
                &order.user_id,
                &order.email,
                order.total_cents,
                &order.currency,
                now
            ],
        );
        match void {
            Ok(_) => return Ok(()),
            Err(e) if db::is_unique_violation(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal(format!(
        "could not settle the payment of cancelled order {}",
        order.order_id
    )))
}

fn list(request: &Request) -> ApiResult {
    let claims = auth::authenticate(request)?;
    let page = Page::from_query(request)?;
    // Customers see their own payments; an admin sees everyone's.
    let user = if claims.is_admin() {
        None
    } else {
        Some(claims.sub.clone())
    };
    let order = request.query("order_id").map(str::to_string);
    // The casts give PostgreSQL a type for parameters that may be NULL.
    let filter = "(CAST($1 AS TEXT) IS NULL OR user_id = $1) AND (CAST($2 AS TEXT) IS NULL OR order_id = $2)";
    let total = Db.count(
        &format!("SELECT COUNT(*) FROM payments WHERE {filter}"),
        params![user.clone(), order.clone()],
    )?;
    let items = Db
        .rows(
            &format!("SELECT {COLUMNS} FROM payments WHERE {filter} ORDER BY created_at, id LIMIT $3 OFFSET $4"),
            params![user, order, page.limit, page.offset],
        )?
        .iter()
        .map(|row| payment_json(row))
        .collect();
    Ok(page.answer(items, total))
}
