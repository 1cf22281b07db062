//! The shop's **product** service: the catalog (public to read, admins write) and its
//! inventory.
//!
//! Inventory is reserved per order by the order service through
//! `POST /internal/v1/reservations` and given back through
//! `POST /internal/v1/reservations/{order_id}/release`. Those paths are outside the
//! gateway's routes (`/api/v1/products`), so only a sibling with `product.internal` in its
//! `outbound` grant reaches them. A reservation takes every item or none, in one
//! transaction, each with a conditional `UPDATE ... WHERE stock >= quantity`: concurrent
//! orders cannot oversell, on SQLite (one writer at a time) or PostgreSQL (row locks).
//! Reserving and releasing are idempotent per order.

use serde::Deserialize;
use serde_json::{Value, json};
use shop_common::api::{order_line, required};
use shop_common::auth;
use shop_common::db::{self, Db, Sql};
use shop_common::{ApiError, ApiResult, Page, Request, Response, params};

struct ProductService;

shop_common::export_http!(ProductService, route);

fn route(request: &Request) -> ApiResult {
    if let Some(segments) = request.segments_after("/internal/v1/reservations") {
        return match (request.method.as_str(), segments.as_slice()) {
            ("POST", []) => reserve(request),
            ("POST", [order_id, "release"]) => release(order_id),
            _ => Err(ApiError::no_such_path()),
        };
    }
    let Some(segments) = request.segments_after("/api/v1/products") else {
        return Err(ApiError::no_such_path());
    };
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", []) => create(request),
        ("GET", []) => list(request),
        ("GET", [id]) => Ok(Response::ok(&find(id)?)),
        ("PATCH", [id]) => update(request, id),
        (_, [] | [_]) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::no_such_path()),
    }
}

const COLUMNS: &str =
    "id, sku, name, description, price_cents, currency, stock, created_at, updated_at";

fn product_json(row: &[db::Value]) -> Value {
    json!({
        "id": db::text(row, 0),
        "sku": db::text(row, 1),
        "name": db::text(row, 2),
        "description": db::text(row, 3),
        "price_cents": db::int(row, 4),
        "currency": db::text(row, 5),
        "stock": db::int(row, 6),
        "created_at": db::text(row, 7),
        "updated_at": db::text(row, 8),
    })
}

fn find(id: &str) -> Result<Value, ApiError> {
    Db.row(
        &format!("SELECT {COLUMNS} FROM products WHERE id = $1"),
        params![id],
    )?
    .map(|row| product_json(&row))
    .ok_or_else(|| ApiError::not_found("product"))
}

fn non_negative(value: i64, field: &str) -> Result<i64, ApiError> {
    if value < 0 {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not be negative"),
        ));
    }
    Ok(value)
}

fn text_field(value: &str, field: &str, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > max {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be 1 to {max} characters"),
        ));
    }
    Ok(value.to_string())
}

#[derive(Deserialize)]
struct NewProduct {
    sku: Option<String>,
    name: Option<String>,
    description: Option<String>,
    price_cents: Option<i64>,
    currency: Option<String>,
    stock: Option<i64>,
}

fn create(request: &Request) -> ApiResult {
    auth::authenticate(request)?.require_admin()?;
    let body: NewProduct = request.json()?;
    let sku = text_field(&required(body.sku, "sku")?, "sku", 64)?;
    let name = text_field(&required(body.name, "name")?, "name", 200)?;
    let description = body.description.unwrap_or_default();
    let price = non_negative(required(body.price_cents, "price_cents")?, "price_cents")?;
    let stock = non_negative(required(body.stock, "stock")?, "stock")?;
    let currency = body.currency.unwrap_or_else(|| "USD".into());
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(ApiError::invalid(
            "currency",
            "currency must be three upper-case letters (ISO 4217)",
        ));
    }
    let id = shop_common::new_id("prd");
    let now = shop_common::now();
    match Db.raw_execute(
        "INSERT INTO products (id, sku, name, description, price_cents, currency, stock, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        params![&id, &sku, name, description, price, currency, stock, now],
    ) {
        Ok(_) => Ok(Response::created(&find(&id)?)),
        Err(e) if db::is_unique_violation(&e) => Err(ApiError::new(
            409,
            "sku_taken",
            format!("a product with SKU {sku} exists"),
        )
        .on("sku")),
        Err(e) => Err(db::storage_error(e)),
    }
}

#[derive(Deserialize)]
struct ProductUpdate {
    name: Option<String>,
    description: Option<String>,
    price_cents: Option<i64>,
    stock: Option<i64>,
}

fn update(request: &Request, id: &str) -> ApiResult {
    auth::authenticate(request)?.require_admin()?;
    let body: ProductUpdate = request.json()?;
    let name = body
        .name
        .as_deref()
        .map(|n| text_field(n, "name", 200))
        .transpose()?;
    let price = body
        .price_cents
        .map(|p| non_negative(p, "price_cents"))
        .transpose()?;
    let stock = body.stock.map(|s| non_negative(s, "stock")).transpose()?;
    let changed = Db.execute(
        "UPDATE products SET name = COALESCE($2, name), description = COALESCE($3, description), \
         price_cents = COALESCE($4, price_cents), stock = COALESCE($5, stock), updated_at = $6 \
         WHERE id = $1",
        &[
            id.into(),
            name.into(),
            body.description.into(),
            price.map_or(db::Value::Null, db::Value::Integer),
            stock.map_or(db::Value::Null, db::Value::Integer),
            shop_common::now().into(),
        ],
    )?;
    if changed == 0 {
        return Err(ApiError::not_found("product"));
    }
    Ok(Response::ok(&find(id)?))
}

fn list(request: &Request) -> ApiResult {
    let page = Page::from_query(request)?;
    let total = Db.count("SELECT COUNT(*) FROM products", &[])?;
    let items = Db
        .rows(
            &format!("SELECT {COLUMNS} FROM products ORDER BY created_at, id LIMIT $1 OFFSET $2"),
            params![page.limit, page.offset],
        )?
        .iter()
        .map(|row| product_json(row))
        .collect();
    Ok(page.answer(items, total))
}

#[derive(Deserialize)]
struct ReservationRequest {
    order_id: Option<String>,
    items: Option<Vec<Line>>,
}

#[derive(Deserialize)]
struct Line {
    product_id: Option<String>,
    quantity: Option<i64>,
}

fn reservation_json(tx: &impl Sql, order_id: &str) -> Result<Value, ApiError> {
    let items: Vec<Value> = tx
        .rows(
            "SELECT r.product_id, p.name, r.quantity, r.unit_price_cents, p.currency, r.status \
             FROM reservations r JOIN products p ON p.id = r.product_id \
             WHERE r.order_id = $1 ORDER BY r.product_id",
            params![order_id],
        )?
        .iter()
        .map(|row| {
            json!({
                "product_id": db::text(row, 0),
                "name": db::text(row, 1),
                "quantity": db::int(row, 2),
                "unit_price_cents": db::int(row, 3),
                "currency": db::text(row, 4),
                "status": db::text(row, 5),
            })
        })
        .collect();
    Ok(json!({"order_id": order_id, "items": items}))
}

fn reserve(request: &Request) -> ApiResult {
    let body: ReservationRequest = request.json()?;
    let order_id = required(body.order_id, "order_id")?;
    let lines = required(body.items, "items")?;
    if lines.is_empty() {
        return Err(ApiError::invalid(
            "items",
            "an order needs at least one item",
        ));
    }
    // Validate everything before touching stock; the same product twice is one line.
    let mut wanted: Vec<(usize, String, i64)> = Vec::new();
    for (i, line) in lines.into_iter().enumerate() {
        let (product_id, quantity) = order_line(i, line.product_id, line.quantity)?;
        match wanted.iter_mut().find(|(_, id, _)| *id == product_id) {
            Some(line) => line.2 += quantity,
            None => wanted.push((i, product_id, quantity)),
        }
    }
    // One order in which every reservation takes its row locks (PostgreSQL): no deadlocks.
    wanted.sort_by(|a, b| a.1.cmp(&b.1));

    let tx = db::begin()?;
    // A retry of a reservation that was made: the same answer, not a second reservation
    // (nor "insufficient stock" because the first one took the last units).
    if tx
        .row(
            "SELECT 1 FROM reservations WHERE order_id = $1 LIMIT 1",
            params![&order_id],
        )?
        .is_some()
    {
        return Ok(Response::ok(&reservation_json(&tx, &order_id)?));
    }
    let now = shop_common::now();
    let mut reserved = Vec::new();
    for (i, product_id, quantity) in &wanted {
        let taken = tx.rows(
            "UPDATE products SET stock = stock - $1, updated_at = $3 \
             WHERE id = $2 AND stock >= $1 RETURNING name, price_cents, currency",
            params![*quantity, product_id, &now],
        )?;
        let Some(product) = taken.first() else {
            // Dropping `tx` rolls back whatever this order took so far.
            return Err(
                match tx.row(
                    "SELECT stock FROM products WHERE id = $1",
                    params![product_id],
                )? {
                    None => {
                        ApiError::new(404, "unknown_product", format!("no product {product_id}"))
                            .on(format!("items[{i}].product_id"))
                    }
                    Some(row) => ApiError::new(
                        409,
                        "insufficient_stock",
                        format!(
                            "only {} of product {product_id} left, {quantity} wanted",
                            db::int(&row, 0)
                        ),
                    )
                    .on(format!("items[{i}].quantity")),
                },
            );
        };
        let price = db::int(product, 1);
        let inserted = tx.raw_execute(
            "INSERT INTO reservations (order_id, product_id, quantity, unit_price_cents, status, created_at) \
             VALUES ($1, $2, $3, $4, 'reserved', $5)",
            params![&order_id, product_id, *quantity, price, &now],
        );
        match inserted {
            Ok(_) => {}
            // This order was reserved before (a retry): undo this attempt, answer that one.
            Err(e) if db::is_unique_violation(&e) => {
                drop(tx);
                return Ok(Response::ok(&reservation_json(&Db, &order_id)?));
            }
            Err(e) => return Err(e.into()),
        }
        reserved.push(json!({
            "product_id": product_id,
            "name": db::text(product, 0),
            "quantity": quantity,
            "unit_price_cents": price,
            "currency": db::text(product, 2),
            "status": "reserved",
        }));
    }
    db::commit(tx)?;
    Ok(Response::created(
        &json!({"order_id": order_id, "items": reserved}),
    ))
}

fn release(order_id: &str) -> ApiResult {
    let tx = db::begin()?;
    // Marked released first, restocked from exactly the rows that this call changed: two
    // concurrent releases of one order cannot both give the stock back.
    let held = tx.rows(
        "UPDATE reservations SET status = 'released' WHERE order_id = $1 AND status = 'reserved' \
         RETURNING product_id, quantity",
        params![order_id],
    )?;
    let now = shop_common::now();
    for row in &held {
        tx.execute(
            "UPDATE products SET stock = stock + $1, updated_at = $3 WHERE id = $2",
            params![db::int(row, 1), db::text(row, 0), &now],
        )?;
    }
    db::commit(tx)?;
    Ok(Response::ok(
        &json!({"order_id": order_id, "released": !held.is_empty()}),
    ))
}
