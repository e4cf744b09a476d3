//! A real browser for the web page's tests: Debian's `chromium`, headless, driven through
//! WebDriver (`chromedriver`, started per browser on a port it picks) with `fantoccini`.
//!
//! The tests are synchronous like the rest of the suite, so a [`Browser`] owns a small tokio
//! runtime and blocks on each WebDriver call. One browser runs at a time in a test process
//! (a browser takes most of a CPU while it renders; the suite runs on 2): [`Browser::start`]
//! waits for the previous one to be dropped. Screenshots go to `target/screenshots/`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use crate::{LONG, Proc, target_tmpdir, wait_for};

/// One browser at a time per test process: whether one is open.
static OPEN: Mutex<bool> = Mutex::new(false);
static CLOSED: Condvar = Condvar::new();

/// The turn of one browser; the next may start when it drops.
struct Turn;

impl Turn {
    fn take() -> Turn {
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        while *open {
            open = CLOSED.wait(open).unwrap_or_else(|p| p.into_inner());
        }
        *open = true;
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        *OPEN.lock().unwrap_or_else(|p| p.into_inner()) = false;
        CLOSED.notify_one();
    }
}

/// A headless chromium under WebDriver. Closed (browser and driver) on drop.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Proc,
    _profile: tempfile::TempDir,
    _turn: Turn,
}

/// The first of these programs that is on `PATH`.
fn which(names: &[&str]) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
    })
}

impl Browser {
    /// Starts `chromedriver` and a headless `chromium` with a fresh profile. Panics with how to
    /// install them when they are missing (the README's test command installs both).
    pub fn start() -> Browser {
        let turn = Turn::take();
        let driver_bin = which(&["chromedriver"]).expect(
            "no chromedriver on PATH: apt-get install chromium chromium-driver (scripts/test does)",
        );
        let chrome_bin = which(&["chromium", "chromium-browser", "google-chrome"])
            .expect("no chromium on PATH: apt-get install chromium (scripts/test does)");
        let mut cmd = Command::new(driver_bin);
        cmd.args(["--port=0", "--log-level=WARNING"]);
        let mut driver = Proc::spawn("chromedriver", cmd);
        let needle = b"was started successfully on port ";
        driver.wait_stdout(needle, LONG);
        let out = String::from_utf8_lossy(&driver.stdout()).into_owned();
        let port: u16 = out
            .split_once("was started successfully on port ")
            .and_then(|(_, rest)| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no port in chromedriver's output: {out:?}"));
        let profile = tempfile::Builder::new()
            .prefix("chromium-")
            .tempdir_in({
                let d = target_tmpdir();
                std::fs::create_dir_all(&d).unwrap();
                d
            })
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chrome_bin,
                "args": [
                    "--headless=new",
                    // Tests run as root in CI containers, where chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let client = rt
            .block_on(async {
                // chromedriver is on loopback: plain HTTP, no TLS stack.
                ClientBuilder::new(HttpConnector::new())
                    .capabilities(caps)
                    .connect(&url)
                    .await
                    .map_err(std::io::Error::other)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromium through chromedriver: {e}; chromedriver said {}",
                    String::from_utf8_lossy(&driver.stderr())
                )
            });
        Browser {
            rt,
            client: Some(client),
            driver,
            _profile: profile,
            _turn: turn,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the browser is open")
    }

    /// Opens `url` and waits until its document has loaded.
    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.rt
            .block_on(self.client().current_url())
            .unwrap()
            .into()
    }

    /// Runs JavaScript in the page (`return ...;` gives a value).
    pub fn eval(&self, js: &str) -> Value {
        self.rt
            .block_on(self.client().execute(js, vec![]))
            .unwrap_or_else(|e| panic!("script failed: {e}; script: {js}"))
    }

    /// The text of the first element matching `css`, if there is one.
    pub fn text(&self, css: &str) -> Option<String> {
        self.rt.block_on(async {
            let el = self.client().find(Locator::Css(css)).await.ok()?;
            el.text().await.ok()
        })
    }

    /// An attribute of the first element matching `css`, if both exist.
    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.rt.block_on(async {
            let el = self.client().find(Locator::Css(css)).await.ok()?;
            el.attr(name).await.ok().flatten()
        })
    }

    /// How many elements match `css`.
    pub fn count(&self, css: &str) -> usize {
        self.rt
            .block_on(self.client().find_all(Locator::Css(css)))
            .map(|v| v.len())
            .unwrap_or(0)
    }

    /// Waits until an element matches `css`, and returns its text.
    pub fn wait_css(&self, css: &str, timeout: Duration) -> String {
        wait_for(
            &format!("an element {css:?} on {}", self.url()),
            timeout,
            || self.text(css).ok_or_else(|| "none yet".to_string()),
        )
    }

    /// Waits until the text of the first element matching `css` contains `needle`; returns it.
    pub fn wait_text(&self, css: &str, needle: &str, timeout: Duration) -> String {
        wait_for(&format!("{needle:?} in {css:?}"), timeout, || {
            let t = self.text(css).unwrap_or_default();
            if t.contains(needle) { Ok(t) } else { Err(t) }
        })
    }

    /// Waits until `attr` of the first element matching `css` satisfies `check`; returns it.
    pub fn wait_attr(
        &self,
        css: &str,
        name: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        wait_for(
            &format!("{css:?} [{name}] to change"),
            timeout,
            || match self.attr(css, name) {
                Some(v) if check(&v) => Ok(v),
                other => Err(format!("{other:?}")),
            },
        )
    }

    /// Clicks the first element matching `css`.
    pub fn click(&self, css: &str) {
        self.rt
            .block_on(async {
                let el = self.client().find(Locator::Css(css)).await?;
                el.click().await
            })
            .unwrap_or_else(|e| panic!("cannot click {css:?}: {e}"));
    }

    /// Types `text` into the first element matching `css`.
    pub fn type_into(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let el = self.client().find(Locator::Css(css)).await?;
                el.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("cannot type into {css:?}: {e}"));
    }

    /// Saves a screenshot of the page as `target/screenshots/NAME.png`; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .rt
            .block_on(self.client().screenshot())
            .unwrap_or_else(|e| panic!("cannot take a screenshot: {e}"));
        let dir = target_tmpdir()
            .parent()
            .map_or_else(target_tmpdir, |t| t.join("screenshots"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // Ends the WebDriver session, which quits chromium; the driver is killed with
            // everything it started when `driver` drops.
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), c.close()).await });
        }
        self.driver.kill_all();
    }
}
