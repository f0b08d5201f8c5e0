//! Every lab's HTTP API against its own OpenAPI document, fuzzed.
//!
//! `lab up` runs on free ports with a scratch database; schemathesis reads
//! each lab's `GET /openapi.json`, generates requests from it (valid ones,
//! and invalid ones: wrong types, out-of-range numbers, odd strings, NUL
//! bytes) and checks two things of every answer: it is not a server error
//! (no 500 anywhere), and it matches the schema the document gives for its
//! status. A bound on examples per operation and a fixed seed keep a run
//! short and repeatable; `LAB_FUZZ_SEED` and `LAB_FUZZ_EXAMPLES` change them.

mod support;

use std::{path::PathBuf, process::Command};

use support::{LabUp, drop_database, free_port, has_tool};

/// The documents, by the variable that moves the port that serves them.
const DOCUMENTS: &[(&str, &str)] = &[
    ("catalog REST", "CATALOG_HTTP_ADDR"),
    ("caching", "CACHING_HTTP_ADDR"),
    ("outbox API", "OUTBOX_HTTP_ADDR"),
    ("outbox consumer", "OUTBOX_CONSUMER_ADDR"),
    ("chat", "CHAT_HTTP_ADDR"),
    ("telemetry", "TELEMETRY_HTTP_ADDR"),
];

/// Every listen address, on a free port (the defaults may be in use).
const ADDRS: &[&str] = &[
    "CATALOG_HTTP_ADDR",
    "CATALOG_GRPC_ADDR",
    "CACHING_HTTP_ADDR",
    "OUTBOX_HTTP_ADDR",
    "OUTBOX_RELAY_ADDR",
    "OUTBOX_CONSUMER_ADDR",
    "CHAT_HTTP_ADDR",
    "TELEMETRY_HTTP_ADDR",
];

/// Which of the addresses answer `/readyz`.
const HTTP: &[&str] = &[
    "CATALOG_HTTP_ADDR",
    "CACHING_HTTP_ADDR",
    "OUTBOX_HTTP_ADDR",
    "OUTBOX_RELAY_ADDR",
    "OUTBOX_CONSUMER_ADDR",
    "CHAT_HTTP_ADDR",
    "TELEMETRY_HTTP_ADDR",
];

#[test]
fn every_api_answers_as_its_openapi_document_says_and_never_500() {
    assert!(
        has_tool("schemathesis"),
        "the fuzz test needs schemathesis: pip install schemathesis"
    );
    let pid = std::process::id();
    let ports: Vec<(&str, u16)> = ADDRS.iter().map(|v| (*v, free_port())).collect();
    let port = |variable: &str| ports.iter().find(|(v, _)| *v == variable).unwrap().1;
    let database_url = format!("postgres://postgres:postgres@localhost:5432/lab_fuzz_{pid}");
    let mut envs: Vec<(String, String)> = ports
        .iter()
        .map(|(v, p)| (v.to_string(), format!("127.0.0.1:{p}")))
        .collect();
    envs.extend(
        [
            ("DATABASE_URL", database_url.clone()),
            ("CACHE_KEY_PREFIX", format!("lab:fuzz:{pid}:caching:")),
            ("CHAT_KEY_PREFIX", format!("lab:fuzz:{pid}:chat:")),
            ("OUTBOX_EXCHANGE", "lab.fuzz.events".into()),
            ("OUTBOX_QUEUE", "lab.fuzz.notifications".into()),
            ("TELEMETRY_CLIENT_ID", format!("lab-fuzz-{pid}")),
            ("TELEMETRY_SHARE_GROUP", format!("lab-fuzz-{pid}")),
            ("TELEMETRY_TOPIC_PREFIX", format!("fuzz/{pid}/")),
            ("INGEST_SESSION_EXPIRY_SECS", "60".into()),
            ("RUST_LOG", "warn".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let work = std::env::temp_dir().join(format!("lab-fuzz-{pid}"));
    std::fs::create_dir_all(&work).unwrap();
    let ready: Vec<u16> = HTTP.iter().map(|v| port(v)).collect();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_lab"));
    let lab = LabUp::start(&bin, &envs, &ready, work.join("lab-up.log"));

    let failures: Vec<String> = DOCUMENTS
        .iter()
        .filter_map(|(name, variable)| fuzz(name, port(variable), &work))
        .collect();
    let log = lab.log();
    let status = lab.stop();
    drop_database(&database_url);
    assert!(
        failures.is_empty(),
        "{}\n(lab up's log:\n{log})",
        failures.join("\n\n")
    );
    assert!(
        status.success(),
        "lab up exited with {status} after SIGTERM"
    );
}

/// Runs schemathesis against one document; its report when it failed.
fn fuzz(name: &str, port: u16, work: &std::path::Path) -> Option<String> {
    let seed = std::env::var("LAB_FUZZ_SEED").unwrap_or_else(|_| "20261126".into());
    let examples = std::env::var("LAB_FUZZ_EXAMPLES").unwrap_or_else(|_| "50".into());
    let output = Command::new("schemathesis")
        .args(["run", &format!("http://127.0.0.1:{port}/openapi.json")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--max-examples", &examples, "--seed", &seed])
        .args(["--no-color", "--request-timeout", "10"])
        // Its example database and reports stay out of the checkout.
        .args(["--generation-database", "none"])
        .current_dir(work)
        .output()
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    let summary = report.lines().last().unwrap_or_default();
    eprintln!("fuzz {name}: {summary}");
    (!output.status.success()).then(|| {
        format!(
            "{name} (:{port}) failed schemathesis:\n{report}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}
