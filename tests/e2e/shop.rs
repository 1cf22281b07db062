//! The shop example (`examples/shop/trellis.toml`): the five real service components
//! (user, product, order, payment, notification) on a real node, driven only through the
//! gateway, on the in-process bus and SQLite by default, and on a real nats-server and
//! PostgreSQL. The OpenAPI document (`examples/shop/openapi.json`) is checked against the
//! responses the services really give.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::openapi::{self, Exchange};
use common::{Nats, NodeOptions, Postgres, TestNode};
use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The example's manifest as the README runs it, with its repository-relative paths
/// made absolute (the test node writes it into a directory of its own).
fn shop_manifest() -> String {
    let text = std::fs::read_to_string(repo().join("examples/shop/trellis.toml")).unwrap();
    text.replace("\"../../", &format!("\"{}/", repo().display()))
}

const ADMIN_EMAIL: &str = "admin@shop.example";
const PASSWORD: &str = "correct horse battery";

/// A shop node and a JSON client for it, which keeps every exchange for the OpenAPI check.
struct Shop {
    node: TestNode,
    exchanges: Mutex<Vec<Exchange>>,
}

impl Shop {
    async fn start(options: &NodeOptions) -> Shop {
        Shop {
            node: TestNode::start_with(&shop_manifest(), options).await,
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// Sends `body` (raw text) and returns the status and the JSON answer (`null` when
    /// the answer is empty).
    async fn send_raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> (u16, Value) {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(bearer) = &bearer {
            headers.push(("authorization", bearer.as_str()));
        }
        let response = self
            .node
            .request(method, path, body.map(Into::into), &headers)
            .await;
        let value = if response.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&response.body).unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: answer is not JSON ({e}): {}\n{}",
                    response.body,
                    self.node.log()
                )
            })
        };
        self.exchanges.lock().unwrap().push(Exchange {
            method: method.to_string(),
            path: path.to_string(),
            status: response.status,
            body: value.clone(),
            content_type: openapi::content_type(&response),
        });
        (response.status, value)
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.send_raw(method, path, token, body.map(|b| b.to_string()))
            .await
    }

    /// Registers and logs in; returns (token, user id).
    async fn user(&self, email: &str, name: &str) -> (String, String) {
        let (status, user) = self
            .send(
                "POST",
                "/api/v1/users",
                None,
                Some(json!({"email": email, "password": PASSWORD, "name": name})),
            )
            .await;
        assert_eq!(status, 201, "registering {email}: {user}");
        (self.login(email).await, user["id"].as_str().unwrap().into())
    }

    async fn login(&self, email: &str) -> String {
        let (status, login) = self
            .send(
                "POST",
                "/api/v1/auth/login",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(status, 200, "logging in {email}: {login}");
        login["token"].as_str().unwrap().to_string()
    }

    /// The admin's token (its email is in the manifest's ADMIN_EMAILS).
    async fn admin(&self) -> String {
        self.user(ADMIN_EMAIL, "Ada Admin").await.0
    }

    async fn product(&self, admin: &str, sku: &str, price_cents: i64, stock: i64) -> String {
        let (status, product) = self
            .send(
                "POST",
                "/api/v1/products",
                Some(admin),
                Some(json!({"sku": sku, "name": format!("Product {sku}"),
                            "description": "made for the tests",
                            "price_cents": price_cents, "stock": stock})),
            )
            .await;
        assert_eq!(status, 201, "creating {sku}: {product}");
        product["id"].as_str().unwrap().to_string()
    }

    async fn stock(&self, product: &str) -> i64 {
        let (status, product) = self
            .send("GET", &format!("/api/v1/products/{product}"), None, None)
            .await;
        assert_eq!(status, 200, "{product}");
        product["stock"].as_i64().unwrap()
    }

    async fn order(
        &self,
        token: &str,
        items: &[(&str, i64)],
        payment_token: Option<&str>,
    ) -> (u16, Value) {
        let items: Vec<Value> = items
            .iter()
            .map(|(product, quantity)| json!({"product_id": product, "quantity": quantity}))
            .collect();
        let mut body = json!({"items": items});
        if let Some(payment_token) = payment_token {
            body["payment_token"] = json!(payment_token);
        }
        self.send("POST", "/api/v1/orders", Some(token), Some(body))
            .await
    }

    /// Polls the order until it has `status` (events are asynchronous); panics after 20 s.
    async fn wait_for_order(&self, token: &str, order: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, body) = self
                .send("GET", &format!("/api/v1/orders/{order}"), Some(token), None)
                .await;
            assert_eq!(code, 200, "{body}");
            if body["status"] == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "order {order} is still {} after 20 s, expected {status}\n{}",
                body["status"],
                self.node.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the caller's notifications until there are at least `count`.
    async fn wait_for_notifications(&self, token: &str, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, page) = self
                .send("GET", "/api/v1/notifications", Some(token), None)
                .await;
            assert_eq!(code, 200, "{page}");
            let items = page["items"].as_array().unwrap().clone();
            if items.len() >= count {
                return items;
            }
            assert!(
                Instant::now() < deadline,
                "{} notifications after 20 s, expected {count}: {page}\n{}",
                items.len(),
                self.node.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn templates(notifications: &[Value]) -> BTreeSet<String> {
    notifications
        .iter()
        .map(|n| n["template"].as_str().unwrap().to_string())
        .collect()
}

/// A whole purchase, from registration to delivery. Returns the customer's token and the
/// order id.
async fn purchase(shop: &Shop) -> (String, String) {
    let admin = shop.admin().await;
    let (carol, carol_id) = shop.user("carol@example.com", "Carol").await;
    let mug = shop.product(&admin, "MUG-1", 1250, 5).await;
    let tee = shop.product(&admin, "TEE-1", 2000, 3).await;

    let (status, order) = shop.order(&carol, &[(&mug, 2), (&tee, 1)], None).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["status"], "pending");
    assert_eq!(order["user_id"], carol_id.as_str());
    assert_eq!(order["total_cents"], 2 * 1250 + 2000);
    assert_eq!(order["items"].as_array().unwrap().len(), 2);
    let order_id = order["id"].as_str().unwrap().to_string();
    assert_eq!(shop.stock(&mug).await, 3, "the order reserved its stock");
    assert_eq!(shop.stock(&tee).await, 2);

    // order.created → payment charges it → payment.succeeded → the order is confirmed.
    shop.wait_for_order(&carol, &order_id, "confirmed").await;
    let (status, payments) = shop
        .send(
            "GET",
            &format!("/api/v1/payments?order_id={order_id}"),
            Some(&carol),
            None,
        )
        .await;
    assert_eq!(status, 200, "{payments}");
    assert_eq!(payments["total"], 1, "{payments}");
    let payment = &payments["items"][0];
    assert_eq!(payment["status"], "succeeded");
    assert_eq!(payment["amount_cents"], 4500);

    // Paying again through the API gives the same payment: one charge per order.
    let (status, again) = shop
        .send(
            "POST",
            "/api/v1/payments",
            Some(&carol),
            Some(json!({"order_id": order_id, "payment_token": "tok_visa"})),
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], payment["id"]);

    let notifications = shop.wait_for_notifications(&carol, 2).await;
    assert_eq!(
        templates(&notifications),
        BTreeSet::from(["order_created".into(), "order_confirmed".into()])
    );
    for notification in &notifications {
        assert_eq!(notification["recipient"], "carol@example.com");
        assert_eq!(notification["status"], "delivered");
        assert!(
            notification["body"].as_str().unwrap().contains(&order_id),
            "{notification}"
        );
    }
    let confirmed = notifications
        .iter()
        .find(|n| n["template"] == "order_confirmed")
        .unwrap();
    assert!(
        confirmed["body"].as_str().unwrap().contains("45.00 USD"),
        "{confirmed}"
    );

    // Fulfilment is the admin's; the customer may not ship their own order.
    let status_path = format!("/api/v1/orders/{order_id}/status");
    let (status, refused) = shop
        .send(
            "POST",
            &status_path,
            Some(&carol),
            Some(json!({"status": "shipped"})),
        )
        .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (403, Some("forbidden"))
    );
    for next in ["shipped", "delivered"] {
        let (status, order) = shop
            .send(
                "POST",
                &status_path,
                Some(&admin),
                Some(json!({"status": next})),
            )
            .await;
        assert_eq!(status, 200, "{order}");
        assert_eq!(order["status"], next);
    }
    let (status, refused) = shop
        .send(
            "POST",
            &status_path,
            Some(&carol),
            Some(json!({"status": "cancelled"})),
        )
        .await;
    assert_eq!(
        status, 409,
        "a delivered order cannot be cancelled: {refused}"
    );
    assert_eq!(refused["error"], "illegal_transition");

    let notifications = shop.wait_for_notifications(&carol, 4).await;
    assert!(templates(&notifications).contains("order_delivered"));

    let (status, mine) = shop.send("GET", "/api/v1/orders", Some(&carol), None).await;
    assert_eq!(status, 200);
    assert_eq!(mine["total"], 1);
    assert_eq!(mine["items"][0]["status"], "delivered");
    (carol, order_id)
}

#[tokio::test]
async fn a_whole_purchase_on_the_in_process_bus() {
    let shop = Shop::start(&NodeOptions::default()).await;
    purchase(&shop).await;
}

/// The scale-out setup: two nodes sharing a real nats-server and a real PostgreSQL. The
/// purchase runs on one node; the other sees the same data, and each event is handled
/// once across both (one payment, two notifications, not four).
#[tokio::test]
async fn a_whole_purchase_over_nats_and_postgres_on_two_nodes() {
    let nats = Nats::start();
    let postgres = Postgres::start();
    let options = NodeOptions {
        nats_url: Some(nats.url()),
        database_url: Some(postgres.url()),
        ..Default::default()
    };
    let first = Shop::start(&options).await;
    let second = Shop::start(&options).await;
    let (carol, order_id) = purchase(&first).await;

    let (status, order) = second
        .send(
            "GET",
            &format!("/api/v1/orders/{order_id}"),
            Some(&carol),
            None,
        )
        .await;
    assert_eq!(status, 200, "{order}");
    assert_eq!(order["status"], "delivered");
    let (_, payments) = second
        .send("GET", "/api/v1/payments", Some(&carol), None)
        .await;
    assert_eq!(payments["total"], 1, "{payments}");
    // Give stray duplicates a moment to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, notifications) = second
        .send("GET", "/api/v1/notifications", Some(&carol), None)
        .await;
    assert_eq!(notifications["total"], 4, "{notifications}");
}

#[tokio::test]
async fn a_declined_payment_cancels_the_order_and_releases_its_stock() {
    let shop = Shop::start(&NodeOptions::default()).await;
    let admin = shop.admin().await;
    let (dave, _) = shop.user("dave@example.com", "Dave").await;
    let lamp = shop.product(&admin, "LAMP-1", 4999, 4).await;
    let sofa = shop.product(&admin, "SOFA-1", 600_000, 2).await;

    // The documented test token that every charge declines.
    let (status, order) = shop.order(&dave, &[(&lamp, 3)], Some("tok_decline")).await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(shop.stock(&lamp).await, 1);
    let order_id = order["id"].as_str().unwrap();
    let cancelled = shop.wait_for_order(&dave, order_id, "cancelled").await;
    assert!(
        cancelled["cancel_reason"]
            .as_str()
            .unwrap()
            .contains("card_declined"),
        "{cancelled}"
    );
    let (_, payments) = shop
        .send(
            "GET",
            &format!("/api/v1/payments?order_id={order_id}"),
            Some(&dave),
            None,
        )
        .await;
    assert_eq!(payments["items"][0]["status"], "failed");
    assert_eq!(payments["items"][0]["decline_reason"], "card_declined");
    // Stock is given back when the order is cancelled, asynchronously.
    let deadline = Instant::now() + Duration::from_secs(20);
    while shop.stock(&lamp).await != 4 {
        assert!(Instant::now() < deadline, "stock was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let notifications = shop.wait_for_notifications(&dave, 3).await;
    assert!(
        templates(&notifications).is_superset(&BTreeSet::from([
            "payment_failed".into(),
            "order_cancelled".into()
        ])),
        "{notifications:?}"
    );

    // A paid order its owner cancels: stock back, payment refunded.
    let (status, order) = shop.order(&dave, &[(&lamp, 2)], None).await;
    assert_eq!(status, 201, "{order}");
    let paid_id = order["id"].as_str().unwrap();
    shop.wait_for_order(&dave, paid_id, "confirmed").await;
    assert_eq!(shop.stock(&lamp).await, 2);
    let (status, cancelled) = shop
        .send(
            "POST",
            &format!("/api/v1/orders/{paid_id}/status"),
            Some(&dave),
            Some(json!({"status": "cancelled", "reason": "changed my mind"})),
        )
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["cancel_reason"], "changed my mind");
    assert_eq!(shop.stock(&lamp).await, 4, "cancelling released the stock");
    // Asking again (a client retrying a lost answer) changes nothing and answers the same.
    let (status, again) = shop
        .send(
            "POST",
            &format!("/api/v1/orders/{paid_id}/status"),
            Some(&dave),
            Some(json!({"status": "cancelled"})),
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["cancel_reason"], "changed my mind");
    assert_eq!(shop.stock(&lamp).await, 4, "the stock is given back once");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, payments) = shop
            .send(
                "GET",
                &format!("/api/v1/payments?order_id={paid_id}"),
                Some(&dave),
                None,
            )
            .await;
        if payments["items"][0]["status"] == "refunded" {
            break;
        }
        assert!(Instant::now() < deadline, "not refunded: {payments}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The other documented rule: more than MAX_AMOUNT_CENTS (10,000.00) is declined.
    let (status, order) = shop.order(&dave, &[(&sofa, 2)], None).await;
    assert_eq!(status, 201, "{order}");
    let cancelled = shop
        .wait_for_order(&dave, order["id"].as_str().unwrap(), "cancelled")
        .await;
    assert!(
        cancelled["cancel_reason"]
            .as_str()
            .unwrap()
            .contains("amount_over_limit"),
        "{cancelled}"
    );
}

/// 50 orders at once for the last 10 units: exactly 10 are placed, the others are told
/// there is not enough stock, and the stock ends at zero, never below.
async fn last_units(options: NodeOptions) {
    let shop = Arc::new(Shop::start(&options).await);
    let admin = shop.admin().await;
    let mut customers = Vec::new();
    for i in 0..5 {
        let (token, _) = shop
            .user(&format!("buyer{i}@example.com"), &format!("Buyer {i}"))
            .await;
        customers.push(token);
    }
    let widget = shop.product(&admin, "WIDGET", 999, 10).await;

    let mut orders = tokio::task::JoinSet::new();
    for i in 0..50 {
        let shop = shop.clone();
        let token = customers[i % customers.len()].clone();
        let widget = widget.clone();
        orders.spawn(async move { shop.order(&token, &[(&widget, 1)], None).await });
    }
    let mut placed = Vec::new();
    while let Some(result) = orders.join_next().await {
        let (status, body) = result.unwrap();
        match status {
            201 => placed.push(body),
            409 => assert_eq!(body["error"], "insufficient_stock", "{body}"),
            other => panic!("unexpected {other}: {body}\n{}", shop.node.log()),
        }
    }
    assert_eq!(placed.len(), 10, "exactly the last 10 units are sold");
    assert_eq!(shop.stock(&widget).await, 0);
    for order in &placed {
        shop.wait_for_order(&admin, order["id"].as_str().unwrap(), "confirmed")
            .await;
    }
    assert_eq!(shop.stock(&widget).await, 0);
}

common::on_both_backends!(last_units);

#[tokio::test]
async fn bad_requests_get_the_documented_errors() {
    let shop = Shop::start(&NodeOptions::default()).await;
    let admin = shop.admin().await;
    let (erin, erin_id) = shop.user("erin@example.com", "Erin").await;
    let (_, frank_id) = shop.user("frank@example.com", "Frank").await;
    let pen = shop.product(&admin, "PEN-1", 150, 100).await;
    let expect = |(status, body): (u16, Value), want: u16, error: &str| {
        assert_eq!(status, want, "{body}");
        assert_eq!(body["error"], error, "{body}");
        assert!(body["message"].is_string(), "{body}");
        body
    };

    // Bad bodies, as (method, path, token, raw body, status, error, field): 400 when the
    // body is not JSON or has a wrong JSON type, 422 naming a missing or invalid field,
    // 409 when the state forbids it.
    let line = |product: &str, quantity: i64| {
        json!({"items": [{"product_id": product, "quantity": quantity}]}).to_string()
    };
    let user = |email: &str, password: Option<&str>| {
        let mut body = json!({"email": email, "name": "Gina"});
        if let Some(password) = password {
            body["password"] = json!(password);
        }
        body.to_string()
    };
    let two_lines = json!({"items": [{"product_id": pen, "quantity": 1},
                                     {"product_id": "prd_0000000000000000", "quantity": 1}]});
    let erin_token = Some(erin.as_str());
    let admin_token = Some(admin.as_str());
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        String,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v1/users",
            None,
            "{\"email\":".into(),
            400,
            "bad_json",
            None,
        ),
        (
            "POST",
            "/api/v1/orders",
            erin_token,
            "not json".into(),
            400,
            "bad_json",
            None,
        ),
        (
            "POST",
            "/api/v1/orders",
            erin_token,
            r#"{"items": "pen"}"#.into(),
            400,
            "bad_json",
            None,
        ),
        (
            "POST",
            "/api/v1/users",
            None,
            user("gina@example.com", None),
            422,
            "validation_failed",
            Some("password"),
        ),
        (
            "POST",
            "/api/v1/users",
            None,
            user("not-an-email", Some(PASSWORD)),
            422,
            "validation_failed",
            Some("email"),
        ),
        (
            "POST",
            "/api/v1/users",
            None,
            user("gina@example.com", Some("short")),
            422,
            "validation_failed",
            Some("password"),
        ),
        (
            "POST",
            "/api/v1/orders",
            erin_token,
            line(&pen, 0),
            422,
            "validation_failed",
            Some("items[0].quantity"),
        ),
        (
            "POST",
            "/api/v1/orders",
            erin_token,
            r#"{"items": []}"#.into(),
            422,
            "validation_failed",
            Some("items"),
        ),
        (
            "POST",
            "/api/v1/orders",
            erin_token,
            two_lines.to_string(),
            422,
            "unknown_product",
            Some("items[1].product_id"),
        ),
        (
            "POST",
            "/api/v1/orders/ord_0000000000000000/status",
            admin_token,
            r#"{"status": "lost"}"#.into(),
            422,
            "validation_failed",
            Some("status"),
        ),
        (
            "POST",
            "/api/v1/users",
            None,
            user("ERIN@example.com", Some(PASSWORD)),
            409,
            "email_taken",
            Some("email"),
        ),
        (
            "POST",
            "/api/v1/products",
            admin_token,
            json!({"sku": "PEN-1", "name": "Pen again", "price_cents": 1, "stock": 1}).to_string(),
            409,
            "sku_taken",
            Some("sku"),
        ),
        (
            "POST",
            "/api/v1/orders",
            erin_token,
            line(&pen, 101),
            409,
            "insufficient_stock",
            Some("items[0].quantity"),
        ),
    ];
    for (method, path, token, body, status, error, field) in cases {
        let answer = expect(
            shop.send_raw(method, path, token, Some(body)).await,
            status,
            error,
        );
        assert_eq!(answer["field"].as_str(), field, "{method} {path}: {answer}");
    }
    assert_eq!(
        shop.stock(&pen).await,
        100,
        "a refused order reserves nothing"
    );

    // Authentication (401) and authorization (403), as (method, path, token, body,
    // status, error).
    let mut forged = erin.clone().into_bytes();
    let last = forged.len() - 2;
    // A token whose signature does not match: one character of it changed.
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let login = |email: &str, password: &str| Some(json!({"email": email, "password": password}));
    let cases = [
        (
            "GET",
            "/api/v1/orders".to_string(),
            None,
            None,
            401,
            "unauthorized",
        ),
        (
            "GET",
            "/api/v1/orders".into(),
            Some("not-a-token"),
            None,
            401,
            "unauthorized",
        ),
        (
            "GET",
            "/api/v1/users/me".into(),
            Some(forged.as_str()),
            None,
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/api/v1/auth/login".into(),
            None,
            login("erin@example.com", "wrong password"),
            401,
            "invalid_credentials",
        ),
        (
            "POST",
            "/api/v1/auth/login".into(),
            None,
            login("nobody@example.com", PASSWORD),
            401,
            "invalid_credentials",
        ),
        (
            "GET",
            format!("/api/v1/users/{frank_id}"),
            Some(erin.as_str()),
            None,
            403,
            "forbidden",
        ),
        (
            "POST",
            "/api/v1/products".into(),
            Some(erin.as_str()),
            Some(json!({"sku": "X", "name": "X", "price_cents": 1, "stock": 1})),
            403,
            "forbidden",
        ),
        (
            "GET",
            "/api/v1/users".into(),
            Some(erin.as_str()),
            None,
            403,
            "forbidden",
        ),
        (
            "GET",
            format!("/api/v1/orders?user_id={frank_id}"),
            Some(erin.as_str()),
            None,
            403,
            "forbidden",
        ),
    ];
    for (method, path, token, body, status, error) in cases {
        expect(shop.send(method, &path, token, body).await, status, error);
    }

    // Unknown ids: 404.
    for path in [
        "/api/v1/products/prd_0000000000000000",
        "/api/v1/orders/ord_0000000000000000",
        "/api/v1/payments/pay_0000000000000000",
        "/api/v1/notifications/ntf_0000000000000000",
        "/api/v1/users/usr_0000000000000000",
    ] {
        expect(
            shop.send("GET", path, Some(&admin), None).await,
            404,
            "not_found",
        );
    }
    expect(
        shop.send(
            "POST",
            "/api/v1/payments",
            Some(&erin),
            Some(json!({"order_id": "ord_0000000000000000", "payment_token": "tok_visa"})),
        )
        .await,
        404,
        "not_found",
    );

    // Paging: limit is 1..100.
    expect(
        shop.send("GET", "/api/v1/products?limit=500", None, None)
            .await,
        400,
        "bad_query",
    );
    let (status, page) = shop
        .send("GET", "/api/v1/users?limit=2&offset=1", Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 3);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["items"][0]["id"], erin_id.as_str());

    // Stock reservations are for sibling components only: the gateway has no route there.
    expect(
        shop.send(
            "POST",
            "/internal/v1/reservations",
            Some(&admin),
            Some(json!({"order_id": "x", "items": [{"product_id": pen, "quantity": 100}]})),
        )
        .await,
        404,
        "no_route",
    );
    assert_eq!(shop.stock(&pen).await, 100);

    // An order id must be exactly that: with anything appended it names no order (and
    // cannot become a second payment of the same order).
    let (status, order) = shop.order(&erin, &[(&pen, 1)], None).await;
    assert_eq!(status, 201, "{order}");
    let order_id = order["id"].as_str().unwrap();
    expect(
        shop.send(
            "POST",
            "/api/v1/payments",
            Some(&erin),
            Some(json!({"order_id": format!("{order_id}?again"), "payment_token": "tok_visa"})),
        )
        .await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn the_data_is_still_there_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    };
    let (product, order_id, notifications) = {
        let shop = Shop::start(&options).await;
        let admin = shop.admin().await;
        let (hana, _) = shop.user("hana@example.com", "Hana").await;
        let product = shop.product(&admin, "BOOK-1", 1999, 7).await;
        let (status, order) = shop.order(&hana, &[(&product, 2)], None).await;
        assert_eq!(status, 201, "{order}");
        let order_id = order["id"].as_str().unwrap().to_string();
        shop.wait_for_order(&hana, &order_id, "confirmed").await;
        let notifications = shop.wait_for_notifications(&hana, 2).await;
        (product, order_id, notifications)
        // The node stops here.
    };

    let shop = Shop::start(&options).await;
    // Same password, same account; the migrations are not applied twice.
    let hana = shop.login("hana@example.com").await;
    let order = shop.wait_for_order(&hana, &order_id, "confirmed").await;
    assert_eq!(order["total_cents"], 2 * 1999);
    assert_eq!(shop.stock(&product).await, 5);
    let (_, page) = shop
        .send("GET", "/api/v1/notifications", Some(&hana), None)
        .await;
    assert_eq!(page["items"].as_array().unwrap(), &notifications);
    let (status, _) = shop
        .send(
            "POST",
            "/api/v1/users",
            None,
            Some(json!({"email": "hana@example.com", "password": PASSWORD, "name": "Hana"})),
        )
        .await;
    assert_eq!(status, 409, "the email is still registered");
}

/// Every operation of `examples/shop/openapi.json` is exercised, and every answer the
/// services give has a status the document lists for it and a body its schema accepts.
#[tokio::test]
async fn the_openapi_document_matches_the_real_responses() {
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/shop/openapi.json")).unwrap(),
    )
    .expect("openapi.json is JSON");

    let shop = Shop::start(&NodeOptions::default()).await;
    // Every operation, succeeding and failing, through the scenarios above...
    let (carol, order_id) = purchase(&shop).await;
    let admin = shop.login(ADMIN_EMAIL).await;
    // ...and the operations they do not reach.
    let (status, me) = shop
        .send("GET", "/api/v1/users/me", Some(&carol), None)
        .await;
    assert_eq!(status, 200);
    let carol_id = me["id"].as_str().unwrap().to_string();
    shop.send(
        "GET",
        &format!("/api/v1/users/{carol_id}"),
        Some(&carol),
        None,
    )
    .await;
    shop.send(
        "PATCH",
        &format!("/api/v1/users/{carol_id}"),
        Some(&carol),
        Some(json!({"name": "Carol Q."})),
    )
    .await;
    shop.send("GET", "/api/v1/users?limit=5", Some(&admin), None)
        .await;
    let (_, products) = shop.send("GET", "/api/v1/products", None, None).await;
    let product = products["items"][0]["id"].as_str().unwrap().to_string();
    shop.send(
        "PATCH",
        &format!("/api/v1/products/{product}"),
        Some(&admin),
        Some(json!({"price_cents": 1300, "stock": 50})),
    )
    .await;
    shop.send("GET", &format!("/api/v1/products/{product}"), None, None)
        .await;
    shop.send("GET", "/api/v1/orders?limit=1", Some(&admin), None)
        .await;
    let (_, payments) = shop
        .send("GET", "/api/v1/payments", Some(&carol), None)
        .await;
    let payment = payments["items"][0]["id"].as_str().unwrap().to_string();
    shop.send(
        "GET",
        &format!("/api/v1/payments/{payment}"),
        Some(&carol),
        None,
    )
    .await;
    // A pending order paid through the API (201), then cancelled by its owner.
    let (status, pending) = shop
        .order(&carol, &[(&product, 1)], Some("tok_decline"))
        .await;
    assert_eq!(status, 201);
    let pending_id = pending["id"].as_str().unwrap().to_string();
    shop.send(
        "POST",
        "/api/v1/payments",
        Some(&carol),
        Some(json!({"order_id": pending_id, "payment_token": "tok_visa"})),
    )
    .await;
    let (_, notifications) = shop
        .send("GET", "/api/v1/notifications", Some(&carol), None)
        .await;
    let notification = notifications["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    shop.send(
        "GET",
        &format!("/api/v1/notifications/{notification}"),
        Some(&carol),
        None,
    )
    .await;
    shop.send(
        "POST",
        "/api/v1/notifications",
        Some(&admin),
        Some(
            json!({"user_id": carol_id, "recipient": "carol@example.com",
                    "template": "message",
                    "data": {"subject": "Hello", "body": "Spring sale"}}),
        ),
    )
    .await;
    shop.send(
        "POST",
        "/api/v1/notifications",
        Some(&admin),
        Some(
            json!({"user_id": carol_id, "recipient": "carol@example.com",
                    "template": "no_such_template"}),
        ),
    )
    .await;
    shop.send(
        "POST",
        &format!("/api/v1/orders/{order_id}/status"),
        Some(&carol),
        Some(json!({"status": "cancelled"})),
    )
    .await;
    shop.send("GET", "/api/v1/orders", None, None).await;
    shop.send("GET", "/api/v1/products?offset=-1", None, None)
        .await;
    let (status, _) = shop
        .send(
            "DELETE",
            &format!("/api/v1/users/{carol_id}"),
            Some(&carol),
            None,
        )
        .await;
    assert_eq!(status, 204);

    let problems = openapi::check(&spec, &shop.exchanges.lock().unwrap());
    assert!(
        problems.is_empty(),
        "{} mismatches:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// What happens to the shop's events while orders are being placed.
#[derive(Clone, Copy)]
enum Disruption {
    /// `kill -9` of the node, then a restart on the same data.
    KillTheNode,
    /// nats-server killed and started again on the same JetStream store.
    RestartNats,
}

/// Places one order straight through the gateway (no OpenAPI record: the node may be
/// gone): `Ok(Some(id))` when answered 201, `Ok(None)` when refused with 503 (its event
/// could not be stored; nothing was placed), `Err` when the node did not answer.
async fn place_order(
    node: &TestNode,
    token: &str,
    product: &str,
) -> Result<Option<String>, String> {
    let body = json!({"items": [{"product_id": product, "quantity": 1}]}).to_string();
    let bearer = format!("Bearer {token}");
    let response = node
        .try_request(
            "POST",
            "/api/v1/orders",
            Some(body.into()),
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer),
            ],
        )
        .await
        .map_err(|e| e.to_string())?;
    match response.status {
        201 => Ok(Some(response.json()["id"].as_str().unwrap().to_string())),
        503 => Ok(None),
        status => panic!("placing an order: {status} {}", response.body),
    }
}

/// Orders are placed by four clients at once while `disruption` happens. Afterwards every
/// order that was answered 201 ends `confirmed`, with exactly one payment and exactly one
/// `order_created` and one `order_confirmed` notification: no event was lost, and none
/// was handled twice where it shows.
async fn every_placed_order_is_completed(
    options: NodeOptions,
    disruption: Disruption,
    mut nats: Option<Nats>,
) {
    let shop = Shop::start(&options).await;
    let admin = shop.admin().await;
    let (dana, _) = shop.user("dana@example.com", "Dana").await;
    let product = shop.product(&admin, "STEADY-1", 100, 1_000_000).await;

    let placed = Mutex::new(Vec::<String>::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let client = || async {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match place_order(&shop.node, &dana, &product).await {
                Ok(Some(id)) => placed.lock().unwrap().push(id),
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => break,
            }
        }
    };
    let disrupt = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while placed.lock().unwrap().len() < 30 {
            assert!(
                Instant::now() < deadline,
                "orders are too slow to place\n{}",
                shop.node.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match disruption {
            Disruption::KillTheNode => {
                let killed = std::process::Command::new("kill")
                    .args(["-9", &shop.node.pid().to_string()])
                    .status()
                    .unwrap();
                assert!(killed.success());
            }
            Disruption::RestartNats => {
                nats.as_mut().expect("a NATS server to restart").restart();
                // Keep placing orders while the node reconnects.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::join!(client(), client(), client(), client(), disrupt);
    let placed = placed.into_inner().unwrap();
    let shop = match disruption {
        Disruption::KillTheNode => {
            drop(shop);
            Shop::start(&options).await
        }
        Disruption::RestartNats => shop,
    };

    let dana = shop.login("dana@example.com").await;
    for order in &placed {
        shop.wait_for_order(&dana, order, "confirmed").await;
    }
    for order in &placed {
        let (status, payments) = shop
            .send(
                "GET",
                &format!("/api/v1/payments?order_id={order}"),
                Some(&dana),
                None,
            )
            .await;
        assert_eq!(status, 200, "{payments}");
        assert_eq!(payments["total"], 1, "order {order}: {payments}");
    }
    // Notifications trail the confirmation a little.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut notifications = Vec::new();
        let mut offset = 0;
        loop {
            let (status, page) = shop
                .send(
                    "GET",
                    &format!("/api/v1/notifications?limit=100&offset={offset}"),
                    Some(&dana),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{page}");
            let items = page["items"].as_array().unwrap().clone();
            offset += items.len();
            let done = items.len() < 100;
            notifications.extend(items);
            if done {
                break;
            }
        }
        let count = |order: &str, template: &str| {
            notifications
                .iter()
                .filter(|n| {
                    n["template"] == template && n["body"].as_str().unwrap().contains(order)
                })
                .count()
        };
        let wrong: Vec<String> = placed
            .iter()
            .flat_map(|order| {
                ["order_created", "order_confirmed"]
                    .into_iter()
                    .filter(|t| count(order, t) != 1)
                    .map(move |t| format!("{order}: {t} x{}", count(order, t)))
            })
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            wrong.iter().all(|w| w.ends_with("x0")) && Instant::now() < deadline,
            "notifications not exactly once: {wrong:?}\n{}",
            shop.node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(nats);
}

#[tokio::test]
async fn no_order_is_lost_when_the_node_is_killed_embedded() {
    let data = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    };
    every_placed_order_is_completed(options, Disruption::KillTheNode, None).await;
}

#[tokio::test]
async fn no_order_is_lost_when_the_node_is_killed_on_jetstream() {
    let nats = Nats::start();
    let data = tempfile::tempdir().unwrap();
    let options = NodeOptions {
        data_dir: Some(data.path().to_path_buf()),
        nats_url: Some(nats.url()),
        ..Default::default()
    };
    every_placed_order_is_completed(options, Disruption::KillTheNode, Some(nats)).await;
}

#[tokio::test]
async fn no_order_is_lost_when_nats_restarts() {
    let nats = Nats::start();
    let options = NodeOptions {
        nats_url: Some(nats.url()),
        ..Default::default()
    };
    every_placed_order_is_completed(options, Disruption::RestartNats, Some(nats)).await;
}
