//! `lab reset` empties a stopped lab's tables and keys, leaves other labs'
//! and other prefixes' data alone, and refuses while the lab is running.

mod support;

use std::{net::TcpListener, process::Command};

use sqlx::Connection;
use support::free_port;

struct Scratch {
    url: String,
    name: String,
}

impl Scratch {
    async fn new() -> Self {
        let name = format!("lab_reset_{}", std::process::id());
        let mut admin = admin().await;
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
                .unwrap();
        }
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        lab_core::postgres::MIGRATOR.run(&mut conn).await.unwrap();
        Self { url, name }
    }

    async fn count(&self, table: &str) -> i64 {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    async fn drop(self) {
        let mut admin = admin().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await
        .unwrap();
    }
}

async fn admin() -> sqlx::PgConnection {
    sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap()
}

/// `lab reset` with the lab ports moved to `ports` (free unless the test
/// binds one) and the database and key prefix given.
fn reset(labs: &str, db: &str, prefix: &str, catalog_port: u16) -> (i32, String) {
    let mut envs = vec![
        ("DATABASE_URL".to_owned(), db.to_owned()),
        ("CACHE_KEY_PREFIX".to_owned(), prefix.to_owned()),
        (
            "CATALOG_HTTP_ADDR".to_owned(),
            format!("127.0.0.1:{catalog_port}"),
        ),
    ];
    for var in support::ADDRS
        .iter()
        .filter(|var| **var != "CATALOG_HTTP_ADDR")
    {
        envs.push((var.to_string(), format!("127.0.0.1:{}", free_port())));
    }
    let output = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["reset", "--lab", labs])
        .envs(envs)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn reset_empties_the_named_labs_only_and_refuses_while_one_runs() {
    let db = Scratch::new().await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO products (id, sku, name, price_cents, currency) VALUES (gen_random_uuid(), 'R-1', 'r', 1, 'EUR'); \
         INSERT INTO profiles (id, name, email) VALUES (gen_random_uuid(), 'r', 'r@example.com'); \
         INSERT INTO devices (id) VALUES ('reset-device');",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let prefix = format!("lab:reset-test:{}:", std::process::id());
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    let mine = format!("{prefix}profile:1");
    let other = format!("lab:reset-test-other:{}", std::process::id());
    for key in [&mine, &other] {
        redis::cmd("SET")
            .arg(key)
            .arg("x")
            .query_async::<()>(&mut redis)
            .await
            .unwrap();
    }

    // The catalog "runs": something answers on its port.
    let running = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = running.local_addr().unwrap().port();
    let (code, out) = reset("catalog,caching", &db.url, &prefix, port);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("the catalog lab is running") && out.contains("stop it first"),
        "{out}"
    );
    assert_eq!(
        db.count("products").await,
        1,
        "a refused reset emptied nothing"
    );
    drop(running);

    let (code, out) = reset("catalog,caching", &db.url, &prefix, free_port());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("catalog") && out.contains("caching"), "{out}");
    assert_eq!(db.count("products").await, 0, "{out}");
    assert_eq!(db.count("profiles").await, 0, "{out}");
    assert_eq!(
        db.count("devices").await,
        1,
        "telemetry was not named: {out}"
    );
    let exists = |key: String| {
        let mut redis = redis.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async::<i64>(&mut redis)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        exists(mine).await,
        0,
        "the key under the lab's prefix is deleted"
    );
    assert_eq!(
        exists(other.clone()).await,
        1,
        "a key under another prefix stays"
    );
    redis::cmd("DEL")
        .arg(&other)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    db.drop().await;
}
