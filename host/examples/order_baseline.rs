//! Native baseline for the order-placement benchmark in BENCHMARKS.md: the storage work
//! of one shop order, done by native Rust on the same five SQLite databases, opened and
//! migrated exactly as Trellis opens and migrates the shop components' (same pool, same
//! pragmas, same migration files, writers taking turns the same way), with no HTTP, no
//! WebAssembly, no JSON and no messaging. It is the floor under what the shop can do.
//!
//! Per order, as the services do it: the user's row is read; the stock is reserved in
//! one transaction (conditional UPDATE ... RETURNING, one reservation row); the order and
//! its line are stored in one transaction; that is when the client is answered. Then,
//! as the events would: the payment row, the order's confirmation (UPDATE ... RETURNING,
//! its lines read back), and two notifications (each looked up by event, then stored).
//!
//! `order_baseline DATA_DIR MIGRATIONS_ROOT SECONDS CONCURRENCY` prints
//! `orders_per_sec=.. p50_ms=.. p99_ms=..`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::Row;
use trellis::storage::{ComponentDatabase, SqliteDatabase, Storage};

struct Shop {
    user: SqliteDatabase,
    product: SqliteDatabase,
    order: SqliteDatabase,
    payment: SqliteDatabase,
    notification: SqliteDatabase,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data_dir, migrations, seconds, concurrency] = args.as_slice() else {
        anyhow::bail!("usage: order_baseline DATA_DIR MIGRATIONS_ROOT SECONDS CONCURRENCY");
    };
    let seconds: u64 = seconds.parse()?;
    let concurrency: usize = concurrency.parse()?;
    let storage = Storage::open(Path::new(data_dir), None).await?;
    let open = |name: &'static str| {
        let storage = &storage;
        async move {
            let database = storage.component_database("baseline", name).await?;
            database
                .migrate(&Path::new(migrations).join(name).join("migrations"))
                .await?;
            let ComponentDatabase::Sqlite(database) = database else {
                anyhow::bail!("the baseline runs on SQLite");
            };
            Ok::<_, anyhow::Error>(database)
        }
    };
    let shop = Arc::new(Shop {
        user: open("user").await?,
        product: open("product").await?,
        order: open("order").await?,
        payment: open("payment").await?,
        notification: open("notification").await?,
    });
    sqlx::query("INSERT INTO users (id, email, name, role, password_hash, created_at, updated_at) VALUES ('usr_bench', 'bench@example.com', 'Bench', 'customer', 'x', 'now', 'now')")
        .execute(&shop.user.pool)
        .await?;
    sqlx::query("INSERT INTO products (id, sku, name, description, price_cents, currency, stock, created_at, updated_at) VALUES ('prd_bench', 'B', 'B', '', 100, 'USD', 1000000000, 'now', 'now')")
        .execute(&shop.product.pool)
        .await?;

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let shop = shop.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                let order_id = format!("ord_{worker}_{n}");
                place(&shop, &order_id).await?;
                latencies.push(started.elapsed());
                // The events' work, off the client's path as in the shop.
                let shop = shop.clone();
                tokio::spawn(async move {
                    if let Err(e) = after_placing(&shop, &order_id).await {
                        eprintln!("{order_id}: {e:#}");
                    }
                });
                n += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let percentile = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e3
    };
    println!(
        "orders_per_sec={:.0} p50_ms={:.2} p99_ms={:.2}",
        latencies.len() as f64 / elapsed,
        percentile(0.50),
        percentile(0.99)
    );
    Ok(())
}

/// What the client waits for: user check, stock reservation, the order stored.
async fn place(shop: &Shop, order_id: &str) -> Result<()> {
    sqlx::query("SELECT id, email, name, role, created_at, updated_at FROM users WHERE id = $1")
        .bind("usr_bench")
        .fetch_one(&shop.user.pool)
        .await?;

    let turn = shop.product.write_turn().await;
    let mut tx = shop.product.pool.begin_with("BEGIN IMMEDIATE").await?;
    let product = sqlx::query(
        "UPDATE products SET stock = stock - $1, updated_at = $3 \
         WHERE id = $2 AND stock >= $1 RETURNING name, price_cents, currency",
    )
    .bind(1i64)
    .bind("prd_bench")
    .bind("now")
    .fetch_one(&mut *tx)
    .await
    .context("reserving")?;
    let price: i64 = product.get(1);
    sqlx::query(
        "INSERT INTO reservations (order_id, product_id, quantity, unit_price_cents, status, created_at) \
         VALUES ($1, $2, $3, $4, 'reserved', $5)",
    )
    .bind(order_id)
    .bind("prd_bench")
    .bind(1i64)
    .bind(price)
    .bind("now")
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    drop(turn);

    let turn = shop.order.write_turn().await;
    let mut tx = shop.order.pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "INSERT INTO orders (id, user_id, email, status, total_cents, currency, payment_token, created_at, updated_at) \
         VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $7)",
    )
    .bind(order_id)
    .bind("usr_bench")
    .bind("bench@example.com")
    .bind(price)
    .bind("USD")
    .bind("tok_visa")
    .bind("now")
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO order_items (order_id, product_id, name, quantity, unit_price_cents) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(order_id)
    .bind("prd_bench")
    .bind("B")
    .bind(1i64)
    .bind(price)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    drop(turn);
    Ok(())
}

/// The events' storage work: payment, confirmation, two notifications.
async fn after_placing(shop: &Shop, order_id: &str) -> Result<()> {
    {
        let _turn = shop.payment.write_turn().await;
        sqlx::query(
            "INSERT INTO payments (id, order_id, user_id, email, amount_cents, currency, status, decline_reason, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
        )
        .bind(format!("pay_{order_id}"))
        .bind(order_id)
        .bind("usr_bench")
        .bind("bench@example.com")
        .bind(100i64)
        .bind("USD")
        .bind("succeeded")
        .bind(None::<String>)
        .bind("now")
        .execute(&shop.payment.pool)
        .await?;
    }
    {
        let _turn = shop.order.write_turn().await;
        sqlx::query(
            "UPDATE orders SET status = 'confirmed', updated_at = $2 WHERE id = $1 AND status = 'pending' \
             RETURNING id, user_id, email, status, total_cents, currency, cancel_reason, created_at, updated_at",
        )
        .bind(order_id)
        .bind("now")
        .fetch_optional(&shop.order.pool)
        .await?;
    }
    sqlx::query(
        "SELECT order_id, product_id, name, quantity, unit_price_cents FROM order_items \
         WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(order_id)
    .fetch_all(&shop.order.pool)
    .await?;
    for event in ["order.created", "order.confirmed"] {
        notify(&shop.notification, event, order_id).await?;
    }
    Ok(())
}

async fn notify(database: &SqliteDatabase, event: &str, order_id: &str) -> Result<()> {
    let pool = &database.pool;
    let key = format!("{event}:{order_id}");
    let seen = sqlx::query("SELECT id FROM notifications WHERE event_key = $1")
        .bind(&key)
        .fetch_optional(pool)
        .await?;
    if seen.is_some() {
        return Ok(());
    }
    let _turn = database.write_turn().await;
    sqlx::query(
        "INSERT INTO notifications (id, user_id, recipient, channel, template, subject, body, event, status, error, created_at, event_key) \
         VALUES ($1, $2, $3, 'log', $4, $5, $6, $7, 'delivered', NULL, $8, $9)",
    )
    .bind(format!("ntf_{key}"))
    .bind("usr_bench")
    .bind("bench@example.com")
    .bind(event.replace('.', "_"))
    .bind("subject")
    .bind("body")
    .bind(event)
    .bind("now")
    .bind(&key)
    .execute(pool)
    .await?;
    Ok(())
}
