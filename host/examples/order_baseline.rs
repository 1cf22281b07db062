//! Native baseline for the order-placement benchmark in BENCHMARKS.md: the storage work
//! of one shop order, done by native Rust on the same five SQLite databases, opened and
//! migrated exactly as Trellis opens and migrates the shop components' (same connections,
//! same pragmas, same migration files, statements run on the caller's thread as a guest's
//! are, writers taking turns the same way), with no HTTP, no
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
use trellis::storage::sqlite::{Pooled, bind_numbered};
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

type Params = Vec<rusqlite::types::Value>;

fn text(s: impl Into<String>) -> rusqlite::types::Value {
    rusqlite::types::Value::Text(s.into())
}

fn int(i: i64) -> rusqlite::types::Value {
    rusqlite::types::Value::Integer(i)
}

/// Runs one statement outside a transaction as Trellis runs a guest's (on the caller's
/// thread, under the statement budget); the rows it returned.
async fn statement(database: &SqliteDatabase, sql: &'static str, params: Params) -> Result<usize> {
    run(database.connections.get()?, sql, params).await
}

/// Runs one writing statement outside a transaction as Trellis runs a guest's: in the
/// database's write turn, on the writers' connection.
async fn write(database: &SqliteDatabase, sql: &'static str, params: Params) -> Result<usize> {
    let _turn = database.write_turn().await;
    run(database.connections.writer()?, sql, params).await
}

async fn run(connection: Pooled, sql: &'static str, params: Params) -> Result<usize> {
    Ok(connection
        .run(move |c| {
            let mut statement = c.prepare_cached(sql)?;
            bind_numbered(&mut statement, &params)?;
            let mut rows = statement.raw_query();
            let mut n = 0;
            while rows.next()?.is_some() {
                n += 1;
            }
            Ok(n)
        })
        .await?)
}

/// Runs `work` in one IMMEDIATE transaction under the write turn, as a guest's
/// transaction runs (its statements one after another on the caller's thread).
async fn transaction<R>(
    database: &SqliteDatabase,
    work: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R>,
) -> Result<R> {
    let _turn = database.write_turn().await;
    let connection = database.connections.writer()?;
    let c = connection.connection();
    c.execute_batch("BEGIN IMMEDIATE")?;
    let result = work(c)?;
    c.execute_batch("COMMIT")?;
    Ok(result)
}

/// One statement of a transaction; the first column of its first row, if any.
fn first(c: &rusqlite::Connection, sql: &str, params: Params) -> rusqlite::Result<Option<i64>> {
    let mut statement = c.prepare_cached(sql)?;
    bind_numbered(&mut statement, &params)?;
    let mut rows = statement.raw_query();
    Ok(match rows.next()? {
        Some(row) => row.get::<_, i64>(0).ok(),
        None => None,
    })
}

/// What the client waits for: user check, stock reservation, the order stored.
async fn place(shop: &Shop, order_id: &str) -> Result<()> {
    statement(
        &shop.user,
        "SELECT id, email, name, role, created_at, updated_at FROM users WHERE id = $1",
        vec![text("usr_bench")],
    )
    .await?;

    let price = transaction(&shop.product, |c| {
        let price = first(
            c,
            "UPDATE products SET stock = stock - $1, updated_at = $3 \
             WHERE id = $2 AND stock >= $1 RETURNING price_cents, name, currency",
            vec![int(1), text("prd_bench"), text("now")],
        )?;
        first(
            c,
            "INSERT INTO reservations (order_id, product_id, quantity, unit_price_cents, status, created_at) \
             VALUES ($1, $2, $3, $4, 'reserved', $5)",
            vec![
                text(order_id),
                text("prd_bench"),
                int(1),
                int(price.unwrap_or(0)),
                text("now"),
            ],
        )?;
        Ok(price)
    })
    .await
    .context("reserving")?
    .context("the product ran out")?;

    transaction(&shop.order, |c| {
        first(
            c,
            "INSERT INTO orders (id, user_id, email, status, total_cents, currency, payment_token, created_at, updated_at) \
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $7)",
            vec![
                text(order_id),
                text("usr_bench"),
                text("bench@example.com"),
                int(price),
                text("USD"),
                text("tok_visa"),
                text("now"),
            ],
        )?;
        first(
            c,
            "INSERT INTO order_items (order_id, product_id, name, quantity, unit_price_cents) \
             VALUES ($1, $2, $3, $4, $5)",
            vec![text(order_id), text("prd_bench"), text("B"), int(1), int(price)],
        )
    })
    .await?;
    Ok(())
}

/// The events' storage work: payment, confirmation, two notifications.
async fn after_placing(shop: &Shop, order_id: &str) -> Result<()> {
    write(
        &shop.payment,
        "INSERT INTO payments (id, order_id, user_id, email, amount_cents, currency, status, decline_reason, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
        vec![
            text(format!("pay_{order_id}")),
            text(order_id),
            text("usr_bench"),
            text("bench@example.com"),
            int(100),
            text("USD"),
            text("succeeded"),
            rusqlite::types::Value::Null,
            text("now"),
        ],
    )
    .await?;
    write(
        &shop.order,
        "UPDATE orders SET status = 'confirmed', updated_at = $2 WHERE id = $1 AND status = 'pending' \
         RETURNING id, user_id, email, status, total_cents, currency, cancel_reason, created_at, updated_at",
        vec![text(order_id), text("now")],
    )
    .await?;
    statement(
        &shop.order,
        "SELECT order_id, product_id, name, quantity, unit_price_cents FROM order_items \
         WHERE order_id = $1 ORDER BY product_id",
        vec![text(order_id)],
    )
    .await?;
    for event in ["order.created", "order.confirmed"] {
        notify(&shop.notification, event, order_id).await?;
    }
    Ok(())
}

async fn notify(database: &SqliteDatabase, event: &str, order_id: &str) -> Result<()> {
    let key = format!("{event}:{order_id}");
    let seen = statement(
        database,
        "SELECT id FROM notifications WHERE event_key = $1",
        vec![text(&key)],
    )
    .await?;
    if seen > 0 {
        return Ok(());
    }
    write(
        database,
        "INSERT INTO notifications (id, user_id, recipient, channel, template, subject, body, event, status, error, created_at, event_key) \
         VALUES ($1, $2, $3, 'log', $4, $5, $6, $7, 'delivered', NULL, $8, $9)",
        vec![
            text(format!("ntf_{key}")),
            text("usr_bench"),
            text("bench@example.com"),
            text(event.replace('.', "_")),
            text("subject"),
            text("body"),
            text(event),
            text("now"),
            text(&key),
        ],
    )
    .await?;
    Ok(())
}
