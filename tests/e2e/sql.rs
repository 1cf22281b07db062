//! Relational storage (`trellis:platform/sql`) through the gateway, on SQLite and on a real
//! PostgreSQL: tables with constraints, typed parameters and rows, transactions, isolation
//! and persistence. The same suite runs against both backends.

use crate::common;
use common::{NodeOptions, TestNode, on_both_backends};
use serde_json::{Value, json};

const MANIFEST: &str = r#"
[components.accounts]
source = "{wasm:sql-probe}"
routes = ["/accounts"]
sql = true

[components.billing]
source = "{wasm:sql-probe}"
routes = ["/billing"]
sql = true

[components.plain]
source = "{wasm:sql-probe}"
routes = ["/plain"]
"#;

/// Portable between SQLite and PostgreSQL.
const SCHEMA: &str = "CREATE TABLE users (
    id BIGINT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    age BIGINT CHECK (age >= 0),
    score DOUBLE PRECISION,
    avatar BYTEA,
    note TEXT)";

on_both_backends!(tables_constraints_and_typed_values);
on_both_backends!(transactions_commit_or_roll_back_as_a_whole);
on_both_backends!(each_component_has_its_own_tables_and_they_persist);
on_both_backends!(migrations_run_once_at_deploy_and_a_failing_one_stops_it);

/// Posts a script to the sql-probe at `path`; returns its answer.
async fn run(node: &TestNode, path: &str, script: Value) -> Value {
    let response = node.post(path, script.to_string()).await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

/// Runs one statement outside a transaction; returns its result.
async fn one(node: &TestNode, path: &str, kind: &str, sql: &str, params: Value) -> Value {
    let answer = run(
        node,
        path,
        json!({"statements": [{kind: sql, "params": params}]}),
    )
    .await;
    answer["results"][0].clone()
}

async fn tables_constraints_and_typed_values(options: NodeOptions) {
    let node = TestNode::start_with(MANIFEST, &options).await;
    assert_eq!(
        one(&node, "/accounts", "execute", SCHEMA, json!([])).await["error"],
        Value::Null
    );

    let inserted = one(
        &node,
        "/accounts",
        "execute",
        "INSERT INTO users (id, email, age, score, avatar, note) VALUES ($1, $2, $3, $4, $5, $6)",
        json!([1, "ada@example.com", 36, 4.5, {"blob": [0, 1, 255]}, null]),
    )
    .await;
    assert_eq!(inserted, json!({"changed": 1}));

    let selected = one(
        &node,
        "/accounts",
        "query",
        "SELECT id, email, age, score, avatar, note FROM users WHERE email = $1",
        json!(["ada@example.com"]),
    )
    .await;
    assert_eq!(
        selected["columns"],
        json!(["id", "email", "age", "score", "avatar", "note"])
    );
    assert_eq!(
        selected["rows"],
        json!([[1, "ada@example.com", 36, 4.5, {"blob": [0, 1, 255]}, null]])
    );

    // Numbered parameters mean their number wherever and however often they appear
    // (SQLite alone would number them by first appearance).
    let reordered = one(
        &node,
        "/accounts",
        "query",
        "UPDATE users SET age = age + $2, note = $3 WHERE id = $1 AND age >= $2 RETURNING age, note",
        json!([1, 4, "older"]),
    )
    .await;
    assert_eq!(reordered["rows"], json!([[40, "older"]]), "{reordered}");
    let missing = one(
        &node,
        "/accounts",
        "query",
        "SELECT id FROM users WHERE id = $2",
        json!([1]),
    )
    .await;
    assert_eq!(missing["error"]["kind"], "invalid-statement", "{missing}");

    let insert = "INSERT INTO users (id, email, age) VALUES ($1, $2, $3)";
    let duplicate = one(
        &node,
        "/accounts",
        "execute",
        insert,
        json!([2, "ada@example.com", 1]),
    )
    .await;
    assert_eq!(duplicate["error"]["kind"], "constraint", "{duplicate}");
    assert_eq!(duplicate["error"]["constraint"], "unique");
    let negative = one(
        &node,
        "/accounts",
        "execute",
        insert,
        json!([3, "neg@example.com", -1]),
    )
    .await;
    assert_eq!(negative["error"]["constraint"], "check", "{negative}");
    let no_email = one(&node, "/accounts", "execute", insert, json!([4, null, 1])).await;
    assert_eq!(no_email["error"]["constraint"], "not-null", "{no_email}");

    one(
        &node,
        "/accounts",
        "execute",
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users (id))",
        json!([]),
    )
    .await;
    let orphan = one(
        &node,
        "/accounts",
        "execute",
        "INSERT INTO orders (id, user_id) VALUES ($1, $2)",
        json!([1, 999]),
    )
    .await;
    assert_eq!(orphan["error"]["constraint"], "foreign-key", "{orphan}");

    let bad = one(
        &node,
        "/accounts",
        "query",
        "SELECT * FROM nowhere",
        json!([]),
    )
    .await;
    assert_eq!(bad["error"]["kind"], "invalid-statement", "{bad}");

    // Updates report how many rows they changed; RETURNING comes back as rows.
    let updated = one(
        &node,
        "/accounts",
        "execute",
        "UPDATE users SET age = age + 1",
        json!([]),
    )
    .await;
    assert_eq!(updated, json!({"changed": 1}));
    let returned = one(
        &node,
        "/accounts",
        "query",
        "INSERT INTO users (id, email) VALUES ($1, $2) RETURNING id, email",
        json!([7, "grace@example.com"]),
    )
    .await;
    assert_eq!(returned["rows"], json!([[7, "grace@example.com"]]));
}

async fn transactions_commit_or_roll_back_as_a_whole(options: NodeOptions) {
    let node = TestNode::start_with(MANIFEST, &options).await;
    one(&node, "/accounts", "execute", SCHEMA, json!([])).await;
    let insert = "INSERT INTO users (id, email) VALUES ($1, $2)";
    let count = || async {
        one(
            &node,
            "/accounts",
            "query",
            "SELECT count(*) FROM users",
            json!([]),
        )
        .await["rows"][0][0]
            .clone()
    };

    let committed = run(
        &node,
        "/accounts",
        json!({"tx": "commit", "statements": [
            {"execute": insert, "params": [1, "a@example.com"]},
            {"execute": insert, "params": [2, "b@example.com"]},
        ]}),
    )
    .await;
    assert_eq!(committed["tx"], "committed", "{committed}");
    assert_eq!(count().await, 2);

    let rolled_back = run(
        &node,
        "/accounts",
        json!({"tx": "rollback", "statements": [{"execute": insert, "params": [3, "c@example.com"]}]}),
    )
    .await;
    assert_eq!(rolled_back["tx"], "rolled back");
    assert_eq!(count().await, 2, "a rolled-back insert leaves nothing");

    // A constraint failure inside a transaction: the guest rolls back, and the earlier
    // statement of the same transaction is gone too.
    let failed = run(
        &node,
        "/accounts",
        json!({"tx": "commit", "statements": [
            {"execute": insert, "params": [4, "d@example.com"]},
            {"execute": insert, "params": [5, "a@example.com"]},
        ]}),
    )
    .await;
    assert_eq!(
        failed["results"][1]["error"]["constraint"], "unique",
        "{failed}"
    );
    assert_eq!(failed["tx"], "rolled back");
    assert_eq!(count().await, 2);
}

async fn each_component_has_its_own_tables_and_they_persist(mut options: NodeOptions) {
    let data_dir = tempfile::tempdir().unwrap();
    options.data_dir = Some(data_dir.path().to_path_buf());

    let node = TestNode::start_with(MANIFEST, &options).await;
    one(&node, "/accounts", "execute", SCHEMA, json!([])).await;
    one(
        &node,
        "/accounts",
        "execute",
        "INSERT INTO users (id, email) VALUES (1, 'kept@example.com')",
        json!([]),
    )
    .await;

    // Another component asking for the same table finds none: its database is its own.
    let other = one(
        &node,
        "/billing",
        "query",
        "SELECT email FROM users",
        json!([]),
    )
    .await;
    assert_eq!(other["error"]["kind"], "invalid-statement", "{other}");
    // And it can create its own table of that name without touching the first.
    one(&node, "/billing", "execute", SCHEMA, json!([])).await;
    let empty = one(
        &node,
        "/billing",
        "query",
        "SELECT email FROM users",
        json!([]),
    )
    .await;
    assert_eq!(empty["rows"], json!([]));

    // Not even by naming the other database or schema outright.
    for table in [
        "trellis_default__accounts.users",
        "main.users",
        "public.users",
    ] {
        let sneaky = one(
            &node,
            "/billing",
            "query",
            &format!("SELECT email FROM {table} WHERE id = 1"),
            json!([]),
        )
        .await;
        assert!(
            sneaky["error"].is_object() || sneaky["rows"] == json!([]),
            "{table}: {sneaky}"
        );
        assert_ne!(
            sneaky["rows"],
            json!([["kept@example.com"]]),
            "{table} reached another component's data"
        );
    }

    // No grant, no SQL.
    let denied = one(&node, "/plain", "query", "SELECT 1", json!([])).await;
    assert_eq!(denied["error"]["kind"], "access-denied");
    drop(node);

    let node = TestNode::start_with(MANIFEST, &options).await;
    let kept = one(
        &node,
        "/accounts",
        "query",
        "SELECT email FROM users",
        json!([]),
    )
    .await;
    assert_eq!(
        kept["rows"],
        json!([["kept@example.com"]]),
        "data survives a restart"
    );
}

/// `migrations = DIR`: the files run in name order at deploy, each once across restarts;
/// a failing file stops the deploy naming itself and leaves nothing behind.
async fn migrations_run_once_at_deploy_and_a_failing_one_stops_it(mut options: NodeOptions) {
    let data_dir = tempfile::tempdir().unwrap();
    options.data_dir = Some(data_dir.path().to_path_buf());
    let migrations = tempfile::tempdir().unwrap();
    let write = |name: &str, sql: &str| std::fs::write(migrations.path().join(name), sql).unwrap();
    // Written out of order on purpose: names decide the order, and 0002 needs 0001.
    write(
        "0002_tags.sql",
        "ALTER TABLE notes ADD COLUMN tag TEXT;\nUPDATE notes SET tag = 'first';",
    );
    write(
        "0001_notes.sql",
        "CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT NOT NULL);\n\
         INSERT INTO notes (id, body) VALUES (1, 'seeded');",
    );
    write("README.txt", "not SQL, not applied");
    let manifest = format!(
        r#"
[components.notes]
source = "{{wasm:sql-probe}}"
routes = ["/notes"]
sql = true
migrations = "{}"
"#,
        migrations.path().display()
    );
    let select = "SELECT id, body, tag FROM notes ORDER BY id";

    let node = TestNode::start_with(&manifest, &options).await;
    let rows = one(&node, "/notes", "query", select, json!([])).await;
    assert_eq!(rows["rows"], json!([[1, "seeded", "first"]]), "{rows}");
    drop(node);

    // Again on the same data: nothing re-runs (the seed row would be a duplicate key).
    let node = TestNode::start_with(&manifest, &options).await;
    let rows = one(&node, "/notes", "query", select, json!([])).await;
    assert_eq!(rows["rows"], json!([[1, "seeded", "first"]]), "{rows}");
    drop(node);

    // A new migration that fails halfway: the deploy stops and says which file and why.
    write(
        "0003_broken.sql",
        "INSERT INTO notes (id, body) VALUES (2, 'half');\nINSERT INTO no_such_table VALUES (1);",
    );
    let output = match TestNode::try_start_with(&manifest, &options).await {
        Ok(_) => panic!("a failing migration must stop the deploy"),
        Err(output) => output,
    };
    assert!(output.contains("0003_broken.sql"), "{output}");
    assert!(output.contains("no_such_table"), "{output}");

    // Fixed, it applies, and its failed first attempt left nothing behind.
    write(
        "0003_broken.sql",
        "INSERT INTO notes (id, body) VALUES (2, 'whole');",
    );
    let node = TestNode::start_with(&manifest, &options).await;
    let rows = one(
        &node,
        "/notes",
        "query",
        "SELECT body FROM notes ORDER BY id",
        json!([]),
    )
    .await;
    assert_eq!(rows["rows"], json!([["seeded"], ["whole"]]), "{rows}");
}

/// A transaction that holds a row lock and then writes must reach its commit while as many
/// transactions as the component's pool has connections wait behind that lock. The write
/// re-measures the database's size, a query that needs a connection of the same pool:
/// measured on the writer's path, it would wait for a connection that only the writer's
/// own commit can free, until the instance's deadline. Every transaction increments one
/// counter, so the final value shows that all of them, the lock holder first, committed.
#[tokio::test]
async fn a_lock_holder_commits_while_the_pool_waits_behind_its_locks() {
    let postgres = common::Postgres::start();
    let options = NodeOptions {
        database_url: Some(postgres.url()),
        ..Default::default()
    };
    let node = std::sync::Arc::new(
        TestNode::start_with(
            r#"
[components.counter]
source = "{wasm:sql-probe}"
routes = ["/counter"]
sql = true
limits = { deadline = "5s", max_concurrent = 32 }
"#,
            &options,
        )
        .await,
    );
    for statement in [
        "CREATE TABLE counter (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)",
        "INSERT INTO counter (id, v) VALUES (1, 0)",
    ] {
        let done = one(&node, "/counter", "execute", statement, json!([])).await;
        assert!(done["error"].is_null(), "{statement}: {done}");
    }
    let lock = json!({"query": "SELECT v FROM counter WHERE id = 1 FOR UPDATE"});
    let increment = json!({"execute": "UPDATE counter SET v = v + 1 WHERE id = 1"});
    // The holder writes only after a pause longer than the meter's one-second interval, by
    // which time the others wait behind its lock, each holding a connection (the pool has
    // 4; 7 others cover a pool of up to 8).
    let holder = json!({"tx": "commit", "statements": [
        lock, {"query": "SELECT 1 FROM pg_sleep(1.5)"}, increment]});
    let waiter = json!({"tx": "commit", "statements": [lock, increment]});
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..8 {
        let node = node.clone();
        let script = if i == 0 {
            holder.clone()
        } else {
            waiter.clone()
        };
        requests.spawn(async move {
            if i > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            (i, node.post("/counter", script.to_string()).await)
        });
    }
    while let Some(done) = requests.join_next().await {
        let (i, response) = done.unwrap();
        assert_eq!(
            response.status,
            200,
            "transaction {i}: {}\n{}",
            response.body,
            node.log()
        );
        let answer = response.json();
        assert_eq!(answer["tx"], "committed", "transaction {i}: {answer}");
    }
    let counted = one(
        &node,
        "/counter",
        "query",
        "SELECT v FROM counter WHERE id = 1",
        json!([]),
    )
    .await;
    assert_eq!(counted["rows"][0][0], 8, "{counted}");
}
