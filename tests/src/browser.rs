//! Headless Chromium driven through ChromeDriver (WebDriver), for the pages
//! the labs serve (chat's room page, telemetry's dashboard).

use crate::common::closed_port;

/// One headless browser session: each `Browser` is its own session, so two
/// of them are two people.
pub struct Browser {
    pub client: fantoccini::Client,
}

/// One ChromeDriver process, stopped when dropped.
pub struct ChromeDriver {
    pub url: String,
    child: std::process::Child,
}

impl ChromeDriver {
    /// Starts `chromedriver` (or `$CHROMEDRIVER`) on a free port. A missing
    /// browser fails the test, saying what to install: a browser test that
    /// quietly skips proves nothing.
    pub async fn start() -> Self {
        let driver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = closed_port().await;
        let child = std::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start {driver} ({err}): the browser tests need headless Chromium \
                     and ChromeDriver; install them with `apt-get install chromium \
                     chromium-driver` (or set CHROMEDRIVER and CHROME_BIN)"
                )
            });
        let driver_process = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
        };
        for _ in 0..100 {
            if reqwest::get(format!("{}/status", driver_process.url))
                .await
                .is_ok()
            {
                return driver_process;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "{driver} did not answer on {} within 10 s",
            driver_process.url
        );
    }

    /// A new headless browser session.
    pub async fn browser(&self) -> Browser {
        let chrome = std::env::var("CHROME_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            std::path::Path::new(&chrome).exists(),
            "{chrome} not found: install it with `apt-get install chromium` (or set CHROME_BIN)"
        );
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chrome,
                // No sandbox: tests run as root in CI. The rest keeps Chromium
                // from reaching for the network, which this machine refuses.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--window-size=1000,700"],
            }),
        );
        let client = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(capabilities)
        .connect(&self.url)
        .await
        .unwrap_or_else(|err| panic!("start a headless Chromium session: {err}"));
        Browser { client }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// Evaluates a JavaScript expression in the page.
    pub async fn eval(&self, expression: &str) -> serde_json::Value {
        self.client
            .execute(&format!("return {expression};"), vec![])
            .await
            .unwrap_or_else(|err| panic!("evaluate `{expression}`: {err}"))
    }

    /// Polls `expression` until it is true, for at most `limit`; fails
    /// showing the page's text.
    pub async fn wait_until(&self, expression: &str, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.eval(expression).await == serde_json::Value::Bool(true) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let text = self.eval("document.body.innerText").await;
        panic!("`{expression}` was not true within {limit:?}; the page shows:\n{text}");
    }

    /// Types `text` into the element with this id.
    pub async fn type_into(&self, id: &str, text: &str) {
        let input = self.client.find(fantoccini::Locator::Id(id)).await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    pub async fn click(&self, id: &str) {
        self.client
            .find(fantoccini::Locator::Id(id))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}
