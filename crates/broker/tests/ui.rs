//! The dashboard over plain HTTP (the browser test, `ui_browser.rs`, drives
//! it in chromium): the login page, the session cookie and its bounds, and
//! that each role's fragments show exactly what the API shows that role.

mod ui_support;

use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use ui_support::{market, Market};

/// A session lasts 12 hours (`ui::session::SESSION_TTL_MS`).
const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in with `token`; answers the `name=value` of the session cookie.
async fn login(market: &Market, token: &str) -> String {
    let response = http()
        .post(format!("{}/ui/login", market.url))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/ui");
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
    cookie.split(';').next().unwrap().to_string()
}

/// GET `path` with the session cookie: status and body.
async fn get(market: &Market, cookie: &str, path: &str) -> (StatusCode, String) {
    let response = http()
        .get(format!("{}{path}", market.url))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test]
async fn the_login_page_is_html_and_a_good_token_opens_an_httponly_strict_session() {
    let market = market().await;
    let response = http()
        .get(format!("{}/ui", market.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let body = response.text().await.unwrap();
    assert!(body.starts_with("<!DOCTYPE html>") && body.contains("name=\"token\""));

    let response = http()
        .post(format!("{}/ui/login", market.url))
        .form(&[("token", market.bob_token.as_str())])
        .send()
        .await
        .unwrap();
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"] {
        assert!(cookie.contains(attribute), "{attribute} missing: {cookie}");
    }
    assert!(
        !cookie.contains(&market.bob_token),
        "the token never goes into the cookie"
    );
    let session = cookie.split(';').next().unwrap();
    let response = http()
        .get(format!("{}/ui", market.url))
        .header(COOKIE, session)
        .send()
        .await
        .unwrap();
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let (status, page) = get(&market, session, "/ui").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("bob · borrower") && page.contains("hx-get=\"/ui/overview/fragment\""));
}

#[tokio::test]
async fn an_unknown_token_or_a_host_credential_opens_no_session() {
    let market = market().await;
    for (token, problem) in [
        ("lh_not_a_token", "not a token this broker knows"),
        (market.host_credential.as_str(), "host credential"),
    ] {
        let response = http()
            .post(format!("{}/ui/login", market.url))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().get(SET_COOKIE).is_none());
        assert!(response.text().await.unwrap().contains(problem));
    }
    let (status, _) = get(&market, "leasehold_session=forged", "/ui/leases/fragment").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let response = http()
        .post(format!("{}/ui/login", market.url))
        .form(&[("password", "x")])
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error());
    assert!(response.headers().get(SET_COOKIE).is_none());
    let problem = response.text().await.unwrap();
    assert!(
        problem.contains("token"),
        "names the missing field: {problem}"
    );
}

#[tokio::test]
async fn a_login_posted_from_another_site_is_refused() {
    let market = market().await;
    let response = http()
        .post(format!("{}/ui/login", market.url))
        .header("Origin", "https://elsewhere.example")
        .form(&[("token", market.bob_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(response.headers().get(SET_COOKIE).is_none());
    let own_origin = market.url.clone();
    let response = http()
        .post(format!("{}/ui/login", market.url))
        .header("Origin", own_origin)
        .form(&[("token", market.bob_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn each_role_sees_in_its_fragments_what_the_api_shows_it() {
    let market = market().await;
    let bobs = market.lease(&market.bob_token, 1).await;
    let carols = market.lease(&market.carol_token, 2).await;
    let row = |id: u64| format!("id=\"lease-{id}\"");
    for (token, sees_bobs, sees_carols) in [
        (&market.bob_token, true, false),
        (&market.carol_token, false, true),
        (&market.lender_token, true, true),
        (&market.admin_token, true, true),
    ] {
        let cookie = login(&market, token).await;
        let (status, leases) = get(&market, &cookie, "/ui/leases/fragment").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(leases.contains(&row(bobs)), sees_bobs, "{leases}");
        assert_eq!(leases.contains(&row(carols)), sees_carols, "{leases}");
    }
    // Borrowers may not list partitions in the API, so no such page.
    let bob = login(&market, &market.bob_token).await;
    let (status, _) = get(&market, &bob, "/ui/partitions/fragment").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, page) = get(&market, &bob, "/ui/overview").await;
    assert!(!page.contains("/ui/partitions") && !page.contains("/ui/hosts"));
    assert!(!page.contains("Find latency"), "only admins see the finds");
    let ann = login(&market, &market.lender_token).await;
    let (status, partitions) = get(&market, &ann, "/ui/partitions/fragment").await;
    assert_eq!(status, StatusCode::OK);
    assert!(partitions.contains("locked") && partitions.contains(">free<"));
}

#[tokio::test]
async fn a_lease_shows_with_its_running_cost_and_goes_on_release() {
    let market = market().await;
    let cookie = login(&market, &market.bob_token).await;
    let lease_id = market.lease(&market.bob_token, 3).await;
    // 3.6 units an hour is 1,000 micros a second: 36 s cost 0.036000.
    market.clock.advance_ms(36_000);
    let (_, leases) = get(&market, &cookie, "/ui/leases/fragment").await;
    assert!(leases.contains(&format!("id=\"lease-{lease_id}\"")));
    assert!(leases.contains("0.036000"), "{leases}");
    market
        .client(&market.bob_token)
        .release(lease_id)
        .await
        .unwrap();
    let (_, leases) = get(&market, &cookie, "/ui/leases/fragment").await;
    assert!(!leases.contains(&format!("id=\"lease-{lease_id}\"")));
    assert!(leases.contains(&format!("id=\"released-lease-{lease_id}\"")));
    let (_, ledger) = get(&market, &cookie, "/ui/ledger/fragment").await;
    assert!(ledger.contains("-0.036000"), "bob's balance: {ledger}");
}

#[tokio::test]
async fn a_session_ends_at_logout_and_when_it_expires() {
    let market = market().await;
    let cookie = login(&market, &market.admin_token).await;
    let (status, overview) = get(&market, &cookie, "/ui/overview/fragment").await;
    assert_eq!(status, StatusCode::OK);
    assert!(overview.contains("Find latency"), "admins see find latency");
    market.clock.advance_ms(SESSION_TTL_MS);
    let response = http()
        .get(format!("{}/ui/overview/fragment", market.url))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["hx-redirect"], "/ui");

    let cookie = login(&market, &market.admin_token).await;
    let response = http()
        .post(format!("{}/ui/logout", market.url))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (status, _) = get(&market, &cookie, "/ui/overview/fragment").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_vendored_script_and_its_licence_are_served() {
    let market = market().await;
    for (path, expect) in [
        ("/ui/assets/htmx.min.js", "htmx"),
        ("/ui/assets/htmx.LICENSE", "Zero-Clause BSD"),
        ("/ui/assets/style.css", "@media"),
    ] {
        let (status, body) = get(&market, "", path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(body.contains(expect), "{path}");
    }
    let (status, _) = get(&market, "", "/ui/assets/broker.db").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_workload_shows_to_its_owner_and_an_admin_only() {
    use leasehold_api::{rfc3339_from_ms, WorkloadFile};
    use leasehold_core::reservation::InstanceSpec;
    let market = market().await;
    let start_ms = 1_800_000_000_000 + 3_600_000;
    let file = WorkloadFile {
        name: "nightly-batch".into(),
        priority: 5,
        start: rfc3339_from_ms(start_ms),
        end: rfc3339_from_ms(start_ms + 3_600_000),
        instances: vec![InstanceSpec {
            name: "worker-1".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            image: None,
        }],
        rules: vec![],
    };
    market
        .client(&market.bob_token)
        .apply_workload(&file)
        .await
        .unwrap();
    for (token, sees) in [
        (&market.bob_token, true),
        (&market.carol_token, false),
        (&market.admin_token, true),
    ] {
        let cookie = login(&market, token).await;
        let (status, page) = get(&market, &cookie, "/ui/reservations/fragment").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page.contains("nightly-batch"), sees, "{page}");
    }
}

#[tokio::test]
async fn a_share_groups_rights_table_shows_to_its_lender_and_admins_not_to_borrowers() {
    use leasehold_core::rights::{GroupMode, HostRights, PartitionRights, ShareGroup};
    let market = market().await;
    let mut group = ShareGroup::new("rack-7", GroupMode::Centralized);
    let owner_share = PartitionRights {
        modules: 8,
        ..PartitionRights::default()
    };
    group.hosts.insert(
        "node-42".into(),
        HostRights {
            manager_url: "http://node-42.example".into(),
            partitions: [(0, owner_share)].into(),
            modules: 8,
            local_loans_through: 0,
        },
    );
    // The lender's manager writes the table (no rights: only an admin adds them).
    let lender = market.client(&market.lender_token);
    assert_eq!(lender.put_share_group(&group, 0).await.unwrap(), Some(1));
    // A stale version loses; rights made up by a manager are refused.
    assert_eq!(lender.put_share_group(&group, 0).await.unwrap(), None);
    let mut minted = group.clone();
    minted
        .hosts
        .get_mut("node-42")
        .unwrap()
        .partitions
        .get_mut(&0)
        .unwrap()
        .permanent = 8;
    let refused = lender.put_share_group(&minted, 1).await.unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    // An admin may: rights are bought.
    let admin = market.client(&market.admin_token);
    assert_eq!(admin.put_share_group(&minted, 1).await.unwrap(), Some(2));
    for (token, status, sees) in [
        (&market.lender_token, StatusCode::OK, true),
        (&market.admin_token, StatusCode::OK, true),
        (&market.bob_token, StatusCode::NOT_FOUND, false),
    ] {
        let cookie = login(&market, token).await;
        let (answered, page) = get(&market, &cookie, "/ui/rights/fragment").await;
        assert_eq!(answered, status, "{page}");
        assert_eq!(page.contains("node-42"), sees, "{page}");
    }
}
