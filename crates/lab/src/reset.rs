//! `lab reset`: a clean slate for a lab, so an exercise can be run again
//! from the start and a group sharing one lab can begin together.
//!
//! It empties what the lab keeps, and only that: the lab's Postgres tables
//! (the schema stays, so no migration runs again), the Redis keys under the
//! lab's own prefix, and the outbox's queues on RabbitMQ. It refuses while
//! the lab is running: a service that holds rows, keys or a consumer group
//! in memory would go on from a state that no longer exists (the caching
//! flusher's stream group, the chat's presence), and a reset that looks
//! done but is undone by the next tick teaches the wrong lesson.

use anyhow::{Context, bail};
use clap::Args;
use lab_core::config::Listen;

use crate::labs::{Backing, Lab, LabSettings};

#[derive(Args)]
pub struct Reset {
    /// Reset only these labs (comma-separated); all of them when absent.
    #[arg(long, value_enum, value_delimiter = ',')]
    lab: Vec<Lab>,
    #[command(flatten)]
    backing: Backing,
    #[command(flatten)]
    labs: LabSettings,
}

/// What a lab keeps, and so what a reset empties.
pub struct Kept {
    pub tables: &'static [&'static str],
    pub redis_prefix: Option<String>,
    pub queues: Vec<String>,
}

pub async fn run(reset: Reset) -> anyhow::Result<()> {
    let wanted: Vec<Lab> = Lab::ALL
        .into_iter()
        .filter(|lab| reset.lab.is_empty() || reset.lab.contains(lab))
        .collect();
    for lab in &wanted {
        refuse_if_running(*lab, &lab.listeners(&reset.labs)).await?;
    }
    for lab in wanted {
        let kept = lab.kept(&reset.labs);
        let mut done = Vec::new();
        if !kept.tables.is_empty() {
            truncate(&reset.backing.postgres.database_url, kept.tables).await?;
            done.push(format!("{} table(s) emptied", kept.tables.len()));
        }
        if let Some(prefix) = &kept.redis_prefix {
            let deleted = delete_keys(&reset.backing.redis.redis_url, prefix).await?;
            done.push(format!("{deleted} Redis key(s) under {prefix} deleted"));
        }
        if !kept.queues.is_empty() {
            let purged = purge(&reset.backing.amqp.amqp_url, &kept.queues).await?;
            done.push(format!("{purged} queued message(s) purged"));
        }
        println!("{:<10} {}", lab.name(), done.join(", "));
    }
    Ok(())
}

async fn refuse_if_running(lab: Lab, listeners: &[Listen]) -> anyhow::Result<()> {
    for listen in listeners {
        if tokio::net::TcpStream::connect(&listen.addr).await.is_ok() {
            bail!(
                "the {} lab is running ({} answers on {}): stop it first (Ctrl-C on `lab up`), \
                 then reset, then start it again",
                lab.name(),
                listen.name,
                listen.addr
            );
        }
    }
    Ok(())
}

async fn truncate(database_url: &str, tables: &[&str]) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(database_url)
        .await
        .with_context(|| format!("connect to Postgres at {database_url}"))?;
    // One statement, so tables that reference each other empty together.
    let sql = format!("TRUNCATE {} RESTART IDENTITY", tables.join(", "));
    // The table names are the constants in `Lab::kept`, never input.
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&mut conn)
        .await
        .with_context(|| format!("`{sql}` (has the lab ever run against this database?)"))?;
    Ok(())
}

async fn delete_keys(redis_url: &str, prefix: &str) -> anyhow::Result<usize> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connect to Redis at {redis_url}"))?;
    let pattern = format!("{prefix}*");
    let keys: Vec<String> = {
        use futures::StreamExt;
        let mut scan = redis::AsyncCommands::scan_match::<_, String>(&mut conn, &pattern).await?;
        let mut keys = Vec::new();
        while let Some(key) = scan.next().await {
            keys.push(key?);
        }
        keys
    };
    for chunk in keys.chunks(500) {
        redis::cmd("UNLINK")
            .arg(chunk)
            .query_async::<()>(&mut conn)
            .await?;
    }
    Ok(keys.len())
}

async fn purge(amqp_url: &str, queues: &[String]) -> anyhow::Result<u32> {
    let connection = lab_core::amqp::connect(amqp_url, "lab-reset")
        .await
        .map_err(anyhow::Error::msg)?;
    let channel = connection.create_channel().await?;
    let mut purged = 0;
    for queue in queues {
        // A queue that does not exist yet holds nothing; a passive declare
        // would close the channel, so ask on a channel of its own.
        let probe = connection.create_channel().await?;
        let exists = probe
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .is_ok();
        if exists {
            purged += channel
                .queue_purge(queue.as_str().into(), Default::default())
                .await?;
        }
    }
    lab_core::amqp::close(&connection, "reset done").await;
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::labs::{Lab, LabSettings};
    use clap::Parser;

    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        labs: LabSettings,
    }

    /// A table no lab claims would survive `lab reset`; a table two labs
    /// claim would be emptied by resetting the wrong one. The migrations are
    /// the truth: run them on a scratch database and compare.
    #[tokio::test]
    async fn every_table_the_migrations_create_belongs_to_exactly_one_lab() {
        let settings = Defaults::parse_from(["lab"]).labs;
        let mut owners: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for lab in Lab::ALL {
            for table in lab.kept(&settings).tables {
                owners.entry(table).or_default().push(lab.name());
            }
        }
        let shutdown = tokio_util::sync::CancellationToken::new();
        let url = lab_core::config::DEFAULT_DATABASE_URL;
        // Dropped and created afresh on every run, as experiments' are.
        let scratch = crate::scratch::database(url, "lab_reset_tables", &shutdown)
            .await
            .unwrap();
        let pool = scratch.pool.clone();
        let created: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' \
             AND tablename <> '_sqlx_migrations' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        shutdown.cancel();

        let unowned: Vec<&String> = created
            .iter()
            .filter(|t| !owners.contains_key(t.as_str()))
            .collect();
        assert!(
            unowned.is_empty(),
            "no lab's `kept` names {unowned:?}: add them in labs.rs"
        );
        for (table, labs) in &owners {
            assert!(
                created.iter().any(|t| t == table),
                "{table} is not a table the migrations create"
            );
            assert_eq!(labs.len(), 1, "{table} is claimed by {labs:?}");
        }
    }
}
