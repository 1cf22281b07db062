//! Native baselines for the capability benchmarks in BENCHMARKS.md: the same work the
//! benchmark's guests do, done by native Rust on the same infrastructure.
//!
//! - `capability_baseline nats URL N`: queue-subscribe, publish N messages, count them
//!   back; prints `messages_per_sec=..`.
//! - `capability_baseline storage DIR N`: on a SQLite database opened exactly as Trellis
//!   opens a component's, N key-value sets + N gets through Trellis's own key-value backend,
//!   then a table with N inserts + N selects by key; prints `kv_ops_per_sec=.. sql_ops_per_sec=..`.

use std::time::Instant;

use futures_util::StreamExt;
use trellis::capabilities::keyvalue::KeyValueGrant;
use trellis::storage::{ComponentDatabase, Storage};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(2000);
    match args.first().map(String::as_str) {
        Some("nats") => nats(&args[1], n).await,
        Some("storage") => storage(std::path::Path::new(&args[1]), n).await,
        _ => anyhow::bail!("usage: capability_baseline nats URL N | storage DIR N"),
    }
}

async fn nats(url: &str, n: u64) -> anyhow::Result<()> {
    let client = async_nats::connect(url).await?;
    let mut subscriber = client
        .queue_subscribe("baseline.>", "baseline".to_string())
        .await?;
    client.flush().await?;
    let started = Instant::now();
    let counter = tokio::spawn(async move {
        let mut received = 0;
        while received < n && subscriber.next().await.is_some() {
            received += 1;
        }
    });
    for i in 0..n {
        client
            .publish("baseline.load", i.to_string().into())
            .await?;
    }
    client.flush().await?;
    counter.await?;
    println!(
        "messages_per_sec={:.0}",
        n as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn storage(dir: &std::path::Path, n: u64) -> anyhow::Result<()> {
    let storage = Storage::open(dir, None).await?;
    let database = storage.component_database("baseline", "native").await?;
    let backend = KeyValueGrant::new(database.clone(), &["default".into()])
        .await?
        .backend();
    let started = Instant::now();
    for i in 0..n {
        backend
            .set(
                "default",
                &format!("bench:{i}"),
                format!("value {i}").as_bytes(),
            )
            .await?;
    }
    for i in 0..n {
        backend.get("default", &format!("bench:{i}")).await?;
    }
    let kv = (2 * n) as f64 / started.elapsed().as_secs_f64();

    let ComponentDatabase::Sqlite(database) = database else {
        anyhow::bail!("the baseline runs on SQLite")
    };
    let pool = database.pool;
    let started = Instant::now();
    sqlx::query("CREATE TABLE bench (id BIGINT PRIMARY KEY, name TEXT)")
        .execute(&pool)
        .await?;
    for i in 0..n as i64 {
        sqlx::query("INSERT INTO bench (id, name) VALUES ($1, $2)")
            .bind(i)
            .bind(format!("row {i}"))
            .persistent(false)
            .execute(&pool)
            .await?;
    }
    for i in 0..n as i64 {
        sqlx::query("SELECT id, name FROM bench WHERE id = $1")
            .bind(i)
            .persistent(false)
            .fetch_all(&pool)
            .await?;
    }
    let sql = (2 * n + 1) as f64 / started.elapsed().as_secs_f64();
    println!("kv_ops_per_sec={kv:.0} sql_ops_per_sec={sql:.0}");
    Ok(())
}
