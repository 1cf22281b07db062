//! The shop's **order** service.
//!
//! Placing an order (`POST /api/v1/orders`, with the customer's token) checks the user
//! with the user service and reserves every line with the product service (both through
//! `*.internal` calls), stores the order as `pending` and publishes `order.created`. The
//! payment service charges it from that event and answers `payment.succeeded` or
//! `payment.failed`, which this service's message handler turns into `confirmed`, or
//! `cancelled` with the stock released. Admins then move it to `shipped` and `delivered`;
//! the owner or an admin may cancel it while `pending` or `confirmed`. Any other
//! transition answers 409. Every transition publishes `order.STATUS`.

use serde::Deserialize;
use serde_json::{Value, json};
use shop_common::api::{order_line, required};
use shop_common::auth::{self, Claims};
use shop_common::call;
use shop_common::db::{self, Db, Sql};
use shop_common::events;
use shop_common::{ApiError, ApiResult, Page, Request, Response, params};
use wasip2::http::types::Method;

shop_common::message_handler_bindings!();

use shop_common::wasmcloud::messaging::types::BrokerMessage;

struct OrderService;

shop_common::export_http!(OrderService, route);
export!(OrderService);

impl exports::wasmcloud::messaging::handler::Guest for OrderService {
    fn handle_message(message: BrokerMessage) -> Result<(), String> {
        let event: PaymentEvent = events::parse(&message.subject, &message.body)?;
        let outcome = match message.subject.as_str() {
            "payment.succeeded" => payment_succeeded(&event),
            "payment.failed" => payment_failed(&event),
            other => return Err(format!("order does not handle {other}")),
        };
        outcome.map_err(|e| format!("{}: {}", e.code, e.message))
    }
}

fn route(request: &Request) -> ApiResult {
    let Some(segments) = request.segments_after("/api/v1/orders") else {
        return Err(ApiError::no_such_path());
    };
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", []) => place(request),
        ("GET", []) => list(request),
        ("GET", [id]) => {
            let claims = auth::authenticate(request)?;
            let order = find(&Db, id)?;
            claims.require_owner_or_admin(&order.user_id)?;
            Ok(Response::ok(&order.to_json()))
        }
        ("POST", [id, "status"]) => change_status(request, id),
        (_, [] | [_] | [_, "status"]) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::no_such_path()),
    }
}

/// An order as stored.
struct Order {
    id: String,
    user_id: String,
    email: String,
    status: String,
    total_cents: i64,
    currency: String,
    cancel_reason: Option<String>,
    created_at: String,
    updated_at: String,
    items: Vec<Value>,
}

const COLUMNS: &str =
    "id, user_id, email, status, total_cents, currency, cancel_reason, created_at, updated_at";

impl Order {
    fn from_row(row: &[db::Value]) -> Self {
        Order {
            id: db::text(row, 0),
            user_id: db::text(row, 1),
            email: db::text(row, 2),
            status: db::text(row, 3),
            total_cents: db::int(row, 4),
            currency: db::text(row, 5),
            cancel_reason: db::opt_text(row, 6),
            created_at: db::text(row, 7),
            updated_at: db::text(row, 8),
            items: Vec::new(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "user_id": self.user_id,
            "status": self.status,
            "items": self.items,
            "total_cents": self.total_cents,
            "currency": self.currency,
            "cancel_reason": self.cancel_reason,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }

    /// The body of the `order.STATUS` event.
    fn event(&self) -> Value {
        json!({
            "order_id": self.id,
            "user_id": self.user_id,
            "email": self.email,
            "status": self.status,
            "total_cents": self.total_cents,
            "currency": self.currency,
            "items": self.items,
            "reason": self.cancel_reason,
        })
    }
}

fn item_json(row: &[db::Value]) -> Value {
    json!({
        "product_id": db::text(row, 1),
        "name": db::text(row, 2),
        "quantity": db::int(row, 3),
        "unit_price_cents": db::int(row, 4),
    })
}

fn find(sql: &impl Sql, id: &str) -> Result<Order, ApiError> {
    let row = sql
        .row(
            &format!("SELECT {COLUMNS} FROM orders WHERE id = $1"),
            params![id],
        )?
        .ok_or_else(|| ApiError::not_found("order"))?;
    let mut order = Order::from_row(&row);
    order.items = items_of(sql, id)?;
    Ok(order)
}

fn items_of(sql: &impl Sql, order_id: &str) -> Result<Vec<Value>, ApiError> {
    Ok(sql
        .rows(
            "SELECT order_id, product_id, name, quantity, unit_price_cents FROM order_items \
             WHERE order_id = $1 ORDER BY product_id",
            params![order_id],
        )?
        .iter()
        .map(|row| item_json(row))
        .collect())
}

#[derive(Deserialize)]
struct NewOrder {
    items: Option<Vec<NewLine>>,
    payment_token: Option<String>,
}

#[derive(Deserialize)]
struct NewLine {
    product_id: Option<String>,
    quantity: Option<i64>,
}

const MAX_LINES: usize = 50;

fn place(request: &Request) -> ApiResult {
    let claims = auth::authenticate(request)?;
    let body: NewOrder = request.json()?;
    let lines = required(body.items, "items")?;
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(ApiError::invalid(
            "items",
            format!("an order has 1 to {MAX_LINES} items"),
        ));
    }
    let mut wanted = Vec::new();
    for (i, line) in lines.into_iter().enumerate() {
        let (product_id, quantity) = order_line(i, line.product_id, line.quantity)?;
        wanted.push(json!({"product_id": product_id, "quantity": quantity}));
    }
    let payment_token = body.payment_token.unwrap_or_else(|| "tok_visa".into());
    if payment_token.is_empty() || payment_token.len() > 200 {
        return Err(ApiError::invalid(
            "payment_token",
            "payment_token must be 1 to 200 characters",
        ));
    }

    // The user must still exist (a token outlives a deleted account).
    let user = call::internal(
        Method::Get,
        "user",
        &format!("/api/v1/users/{}", claims.sub),
        request.header("authorization"),
        None,
    )?;
    match user.status {
        200 => {}
        401 | 404 => return Err(ApiError::unauthorized("the token's user no longer exists")),
        status => return Err(dependency("user", status, &user.body)),
    }

    let order_id = shop_common::new_id("ord");
    let reservation = call::internal(
        Method::Post,
        "product",
        "/internal/v1/reservations",
        None,
        Some(&json!({"order_id": order_id, "items": wanted})),
    )
    .inspect_err(|_| {
        // No answer (a timeout, say) does not mean nothing was reserved.
        let _ = release(&order_id);
    })?;
    match reservation.status {
        200 | 201 => {}
        // The product service's own answer (unknown product, not enough stock, a bad
        // line) is the client's answer, with the same field.
        404 => return Err(relay(422, "unknown_product", &reservation.body)),
        409 => return Err(relay(409, "insufficient_stock", &reservation.body)),
        422 => return Err(relay(422, "validation_failed", &reservation.body)),
        status => {
            // It may have reserved before failing: give back whatever this order holds.
            let _ = release(&order_id);
            return Err(dependency("product", status, &reservation.body));
        }
    }
    let items: Vec<Value> = reservation.body["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let currency = items
        .first()
        .and_then(|i| i["currency"].as_str())
        .unwrap_or("USD")
        .to_string();
    if items
        .iter()
        .any(|i| i["currency"].as_str() != Some(currency.as_str()))
    {
        release(&order_id)?;
        return Err(ApiError::invalid(
            "items",
            "all products of an order must share a currency",
        ));
    }
    let total: i64 = items
        .iter()
        .map(|i| i["quantity"].as_i64().unwrap_or(0) * i["unit_price_cents"].as_i64().unwrap_or(0))
        .sum();

    let stored = store(&order_id, &claims, total, &currency, &payment_token, &items);
    let order = match stored {
        Ok(order) => order,
        Err(e) => {
            // Give the stock back; the client may retry the whole order.
            let _ = release(&order_id);
            return Err(e);
        }
    };
    let mut event = order.event();
    event["payment_token"] = json!(payment_token);
    // An order is only placed once its event is stored: otherwise nothing would ever pay
    // or cancel it. If the event cannot be stored, the order is withdrawn and the client
    // told to try again.
    if let Err(e) = events::publish("order.created", &event) {
        eprintln!("order {}: withdrawn: {}", order.id, e.message);
        let _ = withdraw(&order.id);
        return Err(ApiError::new(
            503,
            "events_unavailable",
            "the order could not be recorded just now; try again".to_string(),
        ));
    }
    Ok(Response::created(&order.to_json()))
}

fn store(
    order_id: &str,
    claims: &Claims,
    total: i64,
    currency: &str,
    payment_token: &str,
    items: &[Value],
) -> Result<Order, ApiError> {
    let now = shop_common::now();
    let tx = db::begin()?;
    tx.execute(
        "INSERT INTO orders (id, user_id, email, status, total_cents, currency, payment_token, created_at, updated_at) \
         VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $7)",
        params![order_id, &claims.sub, &claims.email, total, currency, payment_token, &now],
    )?;
    // Every line in one statement.
    let mut rows = Vec::new();
    let mut values: Vec<db::Value> = Vec::new();
    for item in items {
        let n = values.len();
        rows.push(format!(
            "(${}, ${}, ${}, ${}, ${})",
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            n + 5
        ));
        values.extend([
            db::Value::from(order_id),
            db::Value::from(item["product_id"].as_str().unwrap_or_default()),
            db::Value::from(item["name"].as_str().unwrap_or_default()),
            db::Value::Integer(item["quantity"].as_i64().unwrap_or(0)),
            db::Value::Integer(item["unit_price_cents"].as_i64().unwrap_or(0)),
        ]);
    }
    tx.execute(
        &format!(
            "INSERT INTO order_items (order_id, product_id, name, quantity, unit_price_cents) VALUES {}",
            rows.join(", ")
        ),
        &values,
    )?;
    db::commit(tx)?;
    let mut items: Vec<Value> = items
        .iter()
        .map(|item| {
            json!({
                "product_id": item["product_id"],
                "name": item["name"],
                "quantity": item["quantity"],
                "unit_price_cents": item["unit_price_cents"],
            })
        })
        .collect();
    items.sort_by(|a, b| a["product_id"].as_str().cmp(&b["product_id"].as_str()));
    Ok(Order {
        id: order_id.to_string(),
        user_id: claims.sub.clone(),
        email: claims.email.clone(),
        status: "pending".into(),
        total_cents: total,
        currency: currency.to_string(),
        cancel_reason: None,
        created_at: now.clone(),
        updated_at: now,
        items,
    })
}

/// Another service's error, passed on with its message and field.
fn relay(status: u16, code: &'static str, body: &Value) -> ApiError {
    let message = body["message"].as_str().unwrap_or("refused").to_string();
    let error = ApiError::new(status, code, message);
    match body["field"].as_str() {
        Some(field) => error.on(field),
        None => error,
    }
}

fn dependency(service: &str, status: u16, body: &Value) -> ApiError {
    ApiError::new(
        503,
        "dependency_unavailable",
        format!(
            "the {service} service answered {status}: {}",
            body["message"].as_str().unwrap_or("")
        ),
    )
}

/// Gives an order's stock back (idempotent on the product side).
/// Removes an order that was never announced, and gives its stock back.
fn withdraw(order_id: &str) -> Result<(), ApiError> {
    let tx = db::begin()?;
    tx.execute(
        "DELETE FROM order_items WHERE order_id = $1",
        params![order_id],
    )?;
    tx.execute("DELETE FROM orders WHERE id = $1", params![order_id])?;
    db::commit(tx)?;
    release(order_id)
}

fn release(order_id: &str) -> Result<(), ApiError> {
    let reply = call::internal(
        Method::Post,
        "product",
        &format!("/internal/v1/reservations/{order_id}/release"),
        None,
        None,
    )?;
    match reply.status {
        200 => Ok(()),
        status => Err(dependency("product", status, &reply.body)),
    }
}

fn list(request: &Request) -> ApiResult {
    let claims = auth::authenticate(request)?;
    let page = Page::from_query(request)?;
    let user_id = claims.list_scope(request.query("user_id"))?;
    let (total, rows) = match &user_id {
        Some(user) => (
            Db.count(
                "SELECT COUNT(*) FROM orders WHERE user_id = $1",
                params![user],
            )?,
            Db.rows(
                &format!(
                    "SELECT {COLUMNS} FROM orders WHERE user_id = $1 \
                     ORDER BY created_at, id LIMIT $2 OFFSET $3"
                ),
                params![user, page.limit, page.offset],
            )?,
        ),
        None => (
            Db.count("SELECT COUNT(*) FROM orders", &[])?,
            Db.rows(
                &format!("SELECT {COLUMNS} FROM orders ORDER BY created_at, id LIMIT $1 OFFSET $2"),
                params![page.limit, page.offset],
            )?,
        ),
    };
    let mut orders: Vec<Order> = rows.iter().map(|row| Order::from_row(row)).collect();
    if !orders.is_empty() {
        // All the page's lines in one query.
        let placeholders: Vec<String> = (1..=orders.len()).map(|i| format!("${i}")).collect();
        let ids: Vec<db::Value> = orders.iter().map(|o| db::Value::from(&o.id)).collect();
        let lines = Db.rows(
            &format!(
                "SELECT order_id, product_id, name, quantity, unit_price_cents FROM order_items \
                 WHERE order_id IN ({}) ORDER BY product_id",
                placeholders.join(", ")
            ),
            &ids,
        )?;
        for line in &lines {
            let order_id = db::text(line, 0);
            if let Some(order) = orders.iter_mut().find(|o| o.id == order_id) {
                order.items.push(item_json(line));
            }
        }
    }
    Ok(page.answer(orders.iter().map(Order::to_json).collect(), total))
}

#[derive(Deserialize)]
struct StatusChange {
    status: Option<String>,
    reason: Option<String>,
}

/// The statuses an order may move to from `from`.
fn allowed_next(from: &str) -> &'static [&'static str] {
    match from {
        "pending" => &["confirmed", "cancelled"],
        "confirmed" => &["shipped", "cancelled"],
        "shipped" => &["delivered"],
        _ => &[],
    }
}

fn change_status(request: &Request, id: &str) -> ApiResult {
    let claims = auth::authenticate(request)?;
    let body: StatusChange = request.json()?;
    let to = required(body.status, "status")?;
    if !["pending", "confirmed", "shipped", "delivered", "cancelled"].contains(&to.as_str()) {
        return Err(ApiError::invalid(
            "status",
            format!("unknown status {to:?}"),
        ));
    }
    let order = find(&Db, id)?;
    claims.require_owner_or_admin(&order.user_id)?;
    if to != "cancelled" {
        claims.require_admin()?;
    }
    if order.status == to {
        // A retry of a change that was made but whose answer or event was lost: finish
        // its side effects again (each is idempotent downstream) and answer as before.
        return finish_transition(order);
    }
    if !allowed_next(&order.status).contains(&to.as_str()) {
        return Err(illegal(&order.status, &to));
    }
    let reason = (to == "cancelled").then(|| {
        body.reason.unwrap_or_else(|| {
            format!(
                "cancelled by {}",
                if claims.is_admin() {
                    "an admin"
                } else {
                    "the customer"
                }
            )
        })
    });
    // The transition first, the stock after: a cancellation that loses a race (a
    // payment, an admin shipping it) must give nothing back.
    let changed = Db.execute(
        "UPDATE orders SET status = $2, cancel_reason = COALESCE($3, cancel_reason), updated_at = $4 \
         WHERE id = $1 AND status = $5",
        params![id, &to, reason, shop_common::now(), &order.status],
    )?;
    if changed == 0 {
        // Someone else moved it meanwhile (a payment, an admin).
        let now = find(&Db, id)?;
        return Err(illegal(&now.status, &to));
    }
    finish_transition(find(&Db, id)?)
}

/// The side effects of reaching a status: stock back for a cancellation, the event.
fn finish_transition(order: Order) -> ApiResult {
    if order.status == "cancelled" {
        release(&order.id)?;
    }
    announce(&order)?;
    Ok(Response::ok(&order.to_json()))
}

fn illegal(from: &str, to: &str) -> ApiError {
    ApiError::new(
        409,
        "illegal_transition",
        format!("an order that is {from} cannot become {to}"),
    )
    .on("status")
}

/// Publishes `order.STATUS` for the order as it now is.
fn announce(order: &Order) -> Result<(), ApiError> {
    events::publish(&format!("order.{}", order.status), &order.event())
}

/// What this service reads from `payment.*` events.
#[derive(Deserialize)]
struct PaymentEvent {
    order_id: String,
    #[serde(default)]
    decline_reason: Option<String>,
}

fn payment_succeeded(event: &PaymentEvent) -> Result<(), ApiError> {
    let confirmed = Db.row(
        &format!(
            "UPDATE orders SET status = 'confirmed', updated_at = $2 \
             WHERE id = $1 AND status = 'pending' RETURNING {COLUMNS}"
        ),
        params![&event.order_id, shop_common::now()],
    )?;
    match confirmed {
        Some(row) => {
            let mut order = Order::from_row(&row);
            order.items = items_of(&Db, &order.id)?;
            announce(&order)
        }
        None => {
            // A redelivery: if an earlier attempt confirmed it but failed to announce it,
            // announce it now. (Cancelled first? The payment service refunds those when it
            // sees `order.cancelled`.)
            let order = find(&Db, &event.order_id)?;
            if order.status == "confirmed" {
                announce(&order)?;
            }
            Ok(())
        }
    }
}

fn payment_failed(event: &PaymentEvent) -> Result<(), ApiError> {
    let reason = format!(
        "payment failed: {}",
        event.decline_reason.as_deref().unwrap_or("declined")
    );
    Db.execute(
        "UPDATE orders SET status = 'cancelled', cancel_reason = $2, updated_at = $3 \
         WHERE id = $1 AND status = 'pending'",
        params![&event.order_id, &reason, shop_common::now()],
    )?;
    let order = find(&Db, &event.order_id)?;
    // Released and announced on every delivery while the order is cancelled: if an
    // earlier attempt failed after cancelling, its retry still finishes the job (both are
    // idempotent downstream).
    if order.status == "cancelled" {
        release(&order.id)?;
        announce(&order)?;
    }
    Ok(())
}
