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

use std::process::Command;

use support::{ScratchLab, has_tool};

/// The documents, by the variable that moves the port that serves them.
const DOCUMENTS: &[(&str, &str)] = &[
    ("catalog REST", "CATALOG_HTTP_ADDR"),
    ("caching", "CACHING_HTTP_ADDR"),
    ("outbox API", "OUTBOX_HTTP_ADDR"),
    ("outbox consumer", "OUTBOX_CONSUMER_ADDR"),
    ("chat", "CHAT_HTTP_ADDR"),
    ("telemetry", "TELEMETRY_HTTP_ADDR"),
];

#[test]
fn every_api_answers_as_its_openapi_document_says_and_never_500() {
    assert!(
        has_tool("schemathesis"),
        "the fuzz test needs schemathesis: pip install schemathesis"
    );
    let lab = ScratchLab::start("fuzz");
    let work = std::env::temp_dir().join(format!("lab-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let failures: Vec<String> = DOCUMENTS
        .iter()
        .filter_map(|(name, variable)| {
            let port = lab.port(variable);
            misplaced_parameters(name, port).or_else(|| fuzz(name, port, &work))
        })
        .collect();
    let log = lab.lab.log();
    let status = lab.stop();
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

/// A parameter the document puts in the path must be a `{name}` of the
/// path, and one that is not must be in the query: a document that says
/// `in: path` for `?limit=` tells every client and fuzzer to send it where
/// the server never reads it. Schemathesis does not complain; this does.
fn misplaced_parameters(name: &str, port: u16) -> Option<String> {
    let url = format!("http://127.0.0.1:{port}/openapi.json");
    let output = Command::new("curl")
        .args(["-sf", &url])
        .output()
        .expect("run curl");
    let doc: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("{name}: {url} is not JSON: {err}"));
    let mut wrong = Vec::new();
    for (path, operations) in doc["paths"].as_object().into_iter().flatten() {
        for (method, operation) in operations.as_object().into_iter().flatten() {
            for param in operation["parameters"].as_array().into_iter().flatten() {
                let in_template =
                    path.contains(&format!("{{{}}}", param["name"].as_str().unwrap_or("")));
                let place = param["in"].as_str().unwrap_or("");
                if (place == "path") != in_template || !matches!(place, "path" | "query" | "header")
                {
                    wrong.push(format!("{method} {path}: {} is in {place}", param["name"]));
                }
            }
        }
    }
    (!wrong.is_empty()).then(|| {
        format!(
            "{name}'s document misplaces parameters:\n  {}",
            wrong.join("\n  ")
        )
    })
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
