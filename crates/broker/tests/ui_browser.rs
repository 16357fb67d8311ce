//! The dashboard in a real browser: headless chromium driven through
//! chromedriver (WebDriver, the fantoccini crate). Logs in as each role,
//! sees a lease appear within 2 s of its creation and go on its release,
//! checks a borrower never sees another borrower's lease, and saves a
//! screenshot of every page of every role (and one on a phone-sized
//! window) into `target/tmp/ui-screenshots/`. Without chromium and
//! chromedriver (CI installs Debian's `chromium` and `chromium-driver`)
//! it says why it skipped.

mod ui_support;

use fantoccini::{Client, ClientBuilder, Locator};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use ui_support::{market, Market};

/// The dashboard must show a change within this long.
const LIVE_WITHIN: Duration = Duration::from_secs(2);

/// The first of `names` found on the PATH.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// chromedriver on a port that was free a moment ago; another process may
/// take it between, so a failed start tries another port.
struct ChromeDriver {
    child: Child,
    port: u16,
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_chromedriver(binary: &Path) -> Result<ChromeDriver, String> {
    let mut last_error = String::new();
    for _attempt in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let mut child = Command::new(binary)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        // chromedriver says on stdout when it listens, or exits if it
        // cannot. The rest of its output is read and dropped, so it never
        // blocks on (or dies of) a full or closed pipe.
        let stdout = child.stdout.take().expect("piped stdout");
        let (first_line, ready_receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut first_line = Some(first_line);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("started successfully") || line.contains("failed") {
                    if let Some(sender) = first_line.take() {
                        let _ = sender.send(line);
                    }
                }
            }
        });
        let ready = ready_receiver.recv_timeout(Duration::from_secs(20)).ok();
        match ready {
            Some(line) if line.contains("started successfully") => {
                return Ok(ChromeDriver { child, port })
            }
            other => last_error = format!("{other:?}"),
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    Err(format!("chromedriver did not start: {last_error}"))
}

async fn browser(driver: &ChromeDriver, chromium: &Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            // As root, chromium needs --no-sandbox.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900"],
        }),
    );
    // chromedriver is on 127.0.0.1: plain HTTP, no TLS stack needed.
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless chromium")
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn login(browser: &Client, market: &Market, token: &str) {
    browser.goto(&format!("{}/ui", market.url)).await.unwrap();
    let input = browser
        .find(Locator::Css("input[name=token]"))
        .await
        .unwrap();
    input.send_keys(token).await.unwrap();
    browser
        .find(Locator::Css("main.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("header nav"))
        .await
        .expect("logged in: the dashboard's navigation");
}

async fn logout(browser: &Client) {
    browser
        .find(Locator::Css("header form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("input[name=token]"))
        .await
        .expect("logged out: the login page");
}

/// Visits every page the role's navigation offers and saves a screenshot.
async fn screenshot_every_page(browser: &Client, role: &str) -> Vec<String> {
    let mut pages = Vec::new();
    for link in browser
        .find_all(Locator::Css("header nav a"))
        .await
        .unwrap()
    {
        pages.push(link.attr("href").await.unwrap().unwrap());
    }
    for page in &pages {
        let url = browser.current_url().await.unwrap().join(page).unwrap();
        browser.goto(url.as_str()).await.unwrap();
        browser.find(Locator::Css("#live")).await.unwrap();
        let name = page.trim_start_matches("/ui/").replace('/', "-");
        let png = browser.screenshot().await.unwrap();
        std::fs::write(screenshot_dir().join(format!("{role}-{name}.png")), png).unwrap();
    }
    pages
}

/// Waits (a bounded WebDriver poll) for the element with `id`; answers how
/// long it took from `since`.
async fn appears(browser: &Client, id: &str, since: Instant) -> Duration {
    browser
        .wait()
        .at_most(LIVE_WITHIN + Duration::from_millis(500))
        .every(Duration::from_millis(50))
        .for_element(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("#{id} did not appear: {e}"));
    since.elapsed()
}

/// Waits for two live refreshes of the open page and answers the content
/// security policy violations the browser reported meanwhile.
async fn policy_violations_over_two_refreshes(browser: &Client) -> Vec<serde_json::Value> {
    let script = r#"
        const done = arguments[arguments.length - 1];
        const seen = [];
        document.addEventListener('securitypolicyviolation',
            e => seen.push(e.violatedDirective + ' ' + e.blockedURI));
        let settled = 0;
        document.body.addEventListener('htmx:afterSettle', () => {
            settled += 1;
            if (settled === 2) { done(seen); }
        });
    "#;
    let seen = browser.execute_async(script, vec![]).await.unwrap();
    seen.as_array().cloned().unwrap_or_default()
}

async fn present(browser: &Client, id: &str) -> bool {
    !browser.find_all(Locator::Id(id)).await.unwrap().is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_watches_the_market_live_in_chromium() {
    let (Some(chromium), Some(chromedriver)) = (
        on_path(&["chromium", "chromium-browser", "google-chrome"]),
        on_path(&["chromedriver"]),
    ) else {
        eprintln!("skipped: chromium and chromedriver are not installed (apt-get install chromium chromium-driver)");
        return;
    };
    let driver = start_chromedriver(&chromedriver).unwrap();
    let market = market().await;
    let browser = browser(&driver, &chromium).await;
    let result = tokio::spawn(drive(browser.clone(), market)).await;
    let _ = browser.close().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic.into_panic());
    }
}

async fn drive(browser: Client, market: Market) {
    let (carols, bobs) = borrowers_see_their_own_leases_live(&browser, &market).await;
    // Finds for the admin's find-latency chart.
    for _ in 0..20 {
        let requirements = leasehold_core::Requirements::default();
        market
            .client(&market.bob_token)
            .find(&requirements, None)
            .await
            .unwrap();
    }
    // The lender and the admin see both borrowers' leases, and every page.
    for (role, token) in [
        ("lender", &market.lender_token),
        ("admin", &market.admin_token),
    ] {
        login(&browser, &market, token).await;
        open(&browser, &market, "leases").await;
        appears(&browser, &format!("lease-{carols}"), Instant::now()).await;
        assert!(present(&browser, &format!("lease-{bobs}")).await);
        open(&browser, &market, "overview").await;
        let violations = policy_violations_over_two_refreshes(&browser).await;
        assert!(violations.is_empty(), "{violations:?}");
        let pages = screenshot_every_page(&browser, role).await;
        assert!(pages.iter().any(|p| p.contains("partitions")), "{pages:?}");
        logout(&browser).await;
    }

    // A session that expires while its page is open goes back to the login
    // page at the next refresh (12 h: `ui::session::SESSION_TTL_MS`).
    login(&browser, &market, &market.admin_token).await;
    market.clock.advance_ms(12 * 3600 * 1000);
    browser
        .wait()
        .at_most(LIVE_WITHIN + Duration::from_millis(500))
        .every(Duration::from_millis(50))
        .for_element(Locator::Css("input[name=token]"))
        .await
        .expect("an expired session's page returns to the login page");
}

async fn open(browser: &Client, market: &Market, page: &str) {
    browser
        .goto(&format!("{}/ui/{page}", market.url))
        .await
        .unwrap();
}

/// Bob watches his lease come and go within 2 s; neither borrower ever
/// sees the other's lease. Answers Carol's lease and Bob's active one.
async fn borrowers_see_their_own_leases_live(browser: &Client, market: &Market) -> (u64, u64) {
    login(browser, market, &market.bob_token).await;
    open(browser, market, "leases").await;
    let leased = Instant::now();
    let bobs_first = market.lease(&market.bob_token, 1).await;
    let took = appears(browser, &format!("lease-{bobs_first}"), leased).await;
    assert!(took <= LIVE_WITHIN, "the lease showed after {took:?}");
    let released = Instant::now();
    market
        .client(&market.bob_token)
        .release(bobs_first)
        .await
        .unwrap();
    let took = appears(browser, &format!("released-lease-{bobs_first}"), released).await;
    assert!(took <= LIVE_WITHIN, "the release showed after {took:?}");
    assert!(!present(browser, &format!("lease-{bobs_first}")).await);

    // Carol's lease commits before Bob's second: once Bob's shows, the
    // page has been refreshed after Carol's, and must not show it.
    let carols = market.lease(&market.carol_token, 2).await;
    let since = Instant::now();
    let bobs_second = market.lease(&market.bob_token, 3).await;
    appears(browser, &format!("lease-{bobs_second}"), since).await;
    assert!(!present(browser, &format!("lease-{carols}")).await);
    let bob_pages = screenshot_every_page(browser, "borrower").await;
    assert!(!bob_pages.iter().any(|p| p.contains("partitions")));
    browser.set_window_size(390, 844).await.unwrap();
    open(browser, market, "leases").await;
    appears(browser, &format!("lease-{bobs_second}"), Instant::now()).await;
    let png = browser.screenshot().await.unwrap();
    std::fs::write(screenshot_dir().join("borrower-leases-phone.png"), png).unwrap();
    open(browser, market, "overview").await;
    browser
        .find(Locator::Css("figure.chart svg"))
        .await
        .unwrap();
    let png = browser.screenshot().await.unwrap();
    std::fs::write(screenshot_dir().join("borrower-overview-phone.png"), png).unwrap();
    browser.set_window_size(1280, 900).await.unwrap();
    logout(browser).await;

    login(browser, market, &market.carol_token).await;
    open(browser, market, "leases").await;
    appears(browser, &format!("lease-{carols}"), Instant::now()).await;
    assert!(!present(browser, &format!("lease-{bobs_second}")).await);
    logout(browser).await;
    (carols, bobs_second)
}
