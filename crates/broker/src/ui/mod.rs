//! The web dashboard at `/ui`: server-rendered pages (maud) whose live part
//! is a fragment htmx fetches again every second, and charts drawn as SVG
//! on the server (plotters). A token entered once on the login page opens a
//! session (`session`): the browser keeps only a random session id in an
//! HttpOnly, SameSite=Strict cookie. Every fragment reads through the API's
//! own handlers and rules (`crate::http`, `crate::reservations`, core's
//! `may_see_lease`), so a page shows a role exactly what the API would.
//!
//! A page is one row of [`PAGES`]: its path, title, the roles that see it
//! and the function rendering its fragment.

mod charts;
mod fragments;
mod session;

use crate::AppState;
use crate::{http::err, token_sha256, BrokerError};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use leasehold_core::table::Principal;
use leasehold_core::Role;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

pub(crate) use charts::FindLatencies;

const COOKIE_NAME: &str = "leasehold_session";
const HTMX_JS: &str = include_str!("assets/htmx.min.js");
const HTMX_LICENSE: &str = include_str!("assets/htmx.LICENSE");
const STYLE_CSS: &str = include_str!("assets/style.css");
/// Scripts and styles only from the broker's own files (no inline script
/// or style: the charts are SVG with presentation attributes).
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'";

type Fragment = Pin<Box<dyn Future<Output = Markup> + Send>>;

/// A page of the dashboard.
pub(crate) struct Page {
    /// `/ui/{path}`; its fragment is `/ui/{path}/fragment`.
    pub path: &'static str,
    pub title: &'static str,
    pub roles: &'static [Role],
    pub fragment: fn(Arc<AppState>, Arc<FindLatencies>, Principal) -> Fragment,
}

const EVERYONE: &[Role] = &[Role::Borrower, Role::Lender, Role::Admin];
const LENDERS_AND_ADMINS: &[Role] = &[Role::Lender, Role::Admin];

/// Adding a page is a row here and a function in `fragments`.
pub(crate) const PAGES: &[Page] = &[
    Page {
        path: "overview",
        title: "Overview",
        roles: EVERYONE,
        fragment: |app, finds, p| Box::pin(fragments::overview(app, finds, p)),
    },
    Page {
        path: "hosts",
        title: "Hosts",
        roles: LENDERS_AND_ADMINS,
        fragment: |app, _, p| Box::pin(fragments::hosts(app, p)),
    },
    Page {
        path: "partitions",
        title: "Partitions",
        roles: LENDERS_AND_ADMINS,
        fragment: |app, _, p| Box::pin(fragments::partitions(app, p)),
    },
    Page {
        path: "leases",
        title: "Leases",
        roles: EVERYONE,
        fragment: |app, _, p| Box::pin(fragments::leases(app, p)),
    },
    Page {
        path: "ledger",
        title: "Ledger",
        roles: EVERYONE,
        fragment: |app, _, p| Box::pin(fragments::ledger(app, p)),
    },
    Page {
        path: "reservations",
        title: "Reservations",
        roles: EVERYONE,
        fragment: |app, _, p| Box::pin(fragments::reservations(app, p)),
    },
    Page {
        path: "rights",
        title: "Usage rights",
        roles: LENDERS_AND_ADMINS,
        fragment: |app, _, p| Box::pin(fragments::rights(app, p)),
    },
];

/// What the dashboard's handlers share.
pub(crate) struct Dashboard {
    app: Arc<AppState>,
    sessions: Mutex<session::Sessions>,
    pub finds: Arc<FindLatencies>,
}

impl Dashboard {
    pub(crate) fn new(app: Arc<AppState>) -> Arc<Self> {
        let finds = Arc::new(FindLatencies::new(app.config.clock.clone()));
        Arc::new(Dashboard {
            app,
            sessions: Mutex::new(session::Sessions::default()),
            finds,
        })
    }

    fn now_ms(&self) -> u64 {
        self.app.config.clock.now_ms()
    }

    /// The principal of the request's session cookie, resolved again from
    /// the token's hash as a bearer token would be.
    fn principal(&self, headers: &HeaderMap) -> Option<Principal> {
        let session_id = session_cookie(headers)?;
        let token_hash = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .token_of(&session_id, self.now_ms())?;
        let state = self.app.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .authenticate(&token_hash)
            .filter(|p| p.host_scope.is_none())
            .cloned()
    }
}

/// The routes under `/ui`, with their own state.
pub(crate) fn router<S: Clone + Send + Sync + 'static>(dashboard: Arc<Dashboard>) -> Router<S> {
    Router::new()
        .route("/ui", get(home))
        .route("/ui/", get(home))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/assets/{name}", get(asset))
        .route("/ui/{page}", get(page))
        .route("/ui/{page}/fragment", get(fragment))
        .with_state(dashboard)
}

type Ui = State<Arc<Dashboard>>;

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.to_string())
}

/// Pages are personal and live: never cached, never framed.
fn html_response(status: StatusCode, markup: Markup) -> Response {
    let mut response = (status, axum::response::Html(markup.into_string())).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn pages_for(role: Role) -> impl Iterator<Item = &'static Page> {
    PAGES.iter().filter(move |p| p.roles.contains(&role))
}

async fn home(State(ui): Ui, headers: HeaderMap) -> Response {
    match ui.principal(&headers) {
        Some(principal) => render_page(&ui, &PAGES[0], principal).await,
        None => html_response(StatusCode::OK, login_page(None)),
    }
}

async fn page(State(ui): Ui, headers: HeaderMap, Path(path): Path<String>) -> Response {
    let Some(principal) = ui.principal(&headers) else {
        return html_response(StatusCode::UNAUTHORIZED, login_page(None));
    };
    match pages_for(principal.role).find(|p| p.path == path) {
        Some(page) => render_page(&ui, page, principal).await,
        None => not_found(),
    }
}

/// The live part of a page, fetched every second. An expired session
/// sends the browser back to the login page.
async fn fragment(State(ui): Ui, headers: HeaderMap, Path(path): Path<String>) -> Response {
    let Some(principal) = ui.principal(&headers) else {
        let mut response = html_response(StatusCode::UNAUTHORIZED, html! { p { "Logged out." } });
        response
            .headers_mut()
            .insert("HX-Redirect", HeaderValue::from_static("/ui"));
        return response;
    };
    match pages_for(principal.role).find(|p| p.path == path) {
        Some(page) => {
            let markup = (page.fragment)(ui.app.clone(), ui.finds.clone(), principal).await;
            html_response(StatusCode::OK, markup)
        }
        None => not_found(),
    }
}

fn not_found() -> Response {
    err(BrokerError::NotFound("no such dashboard page".into())).into_response()
}

async fn render_page(ui: &Dashboard, page: &Page, principal: Principal) -> Response {
    let nav = navigation(page, principal.role);
    let who = html! { span.who { (principal.name) " · " (principal.role.as_str()) } };
    let body = (page.fragment)(ui.app.clone(), ui.finds.clone(), principal).await;
    let live = format!("/ui/{}/fragment", page.path);
    html_response(
        StatusCode::OK,
        layout(
            page.title,
            html! {
                header {
                    strong.brand { "leasehold" }
                    (nav)
                    (who)
                    form method="post" action="/ui/logout" { button type="submit" { "Log out" } }
                }
                main {
                    h1 { (page.title) }
                    noscript { p.hint { "Live updates need JavaScript; reload the page to refresh it." } }
                    div #live hx-get=(live) hx-trigger="every 1s" hx-swap="innerHTML" { (body) }
                }
            },
        ),
    )
}

fn navigation(current: &Page, role: Role) -> Markup {
    html! {
        nav {
            @for page in pages_for(role) {
                a href=(format!("/ui/{}", page.path))
                  aria-current=[(page.path == current.path).then_some("page")] { (page.title) }
            }
        }
    }
}

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // htmx would otherwise add an inline style element, which
                // the content security policy is kept free of.
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false}"#;
                title { (title) " · leasehold" }
                link rel="stylesheet" href="/ui/assets/style.css";
                script src="/ui/assets/htmx.min.js" defer {}
            }
            body { (body) }
        }
    }
}

fn login_page(problem: Option<&str>) -> Markup {
    layout(
        "Log in",
        html! {
            main.login {
                h1 { "leasehold" }
                form method="post" action="/ui/login" {
                    label for="token" { "Token" }
                    input #token type="password" name="token" autocomplete="current-password" required;
                    @if let Some(problem) = problem { p.error role="alert" { (problem) } }
                    button type="submit" { "Log in" }
                }
                p.hint { "The token of a lender, a borrower or an admin (not a host credential)." }
            }
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// A form posted from another site's page is refused: browsers name the
/// page's origin, which must be this broker's host. (A client that sends
/// no `Origin` is not a browser posting across sites.)
fn from_this_site(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, host)| host);
    origin_host.is_some() && origin_host == host
}

fn cross_site_refused() -> Response {
    err(BrokerError::Forbidden(
        "Origin: a dashboard form must be posted from the dashboard's own pages".into(),
    ))
    .into_response()
}

/// Checks the token as the API's authentication would and opens a session.
async fn login(State(ui): Ui, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    if !from_this_site(&headers) {
        return cross_site_refused();
    }
    let token_hash = token_sha256(form.token.trim());
    let principal = {
        let state = ui.app.state.read().unwrap_or_else(|p| p.into_inner());
        state.authenticate(&token_hash).cloned()
    };
    let problem = match &principal {
        None => Some("token: not a token this broker knows"),
        Some(p) if p.host_scope.is_some() => Some(
            "token: a host credential acts for its host's agent only; use the lender's own token",
        ),
        Some(_) => None,
    };
    if let Some(problem) = problem {
        return html_response(StatusCode::UNAUTHORIZED, login_page(Some(problem)));
    }
    let session_id = session::new_session_id();
    ui.sessions.lock().unwrap_or_else(|p| p.into_inner()).open(
        session_id.clone(),
        token_hash,
        ui.now_ms(),
    );
    let secure = if ui.app.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE_NAME}={session_id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        session::SESSION_TTL_MS / 1000
    );
    redirect_home(Some(cookie))
}

async fn logout(State(ui): Ui, headers: HeaderMap) -> Response {
    if !from_this_site(&headers) {
        return cross_site_refused();
    }
    if let Some(session_id) = session_cookie(&headers) {
        ui.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close(&session_id);
    }
    redirect_home(Some(format!(
        "{COOKIE_NAME}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"
    )))
}

fn redirect_home(cookie: Option<String>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/ui"));
    if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::SET_COOKIE, value);
    }
    response
}

/// The vendored script, its licence and the stylesheet; cached for an hour.
async fn asset(Path(name): Path<String>) -> Response {
    let (content_type, body) = match name.as_str() {
        "htmx.min.js" => ("text/javascript; charset=utf-8", HTMX_JS),
        "htmx.LICENSE" => ("text/plain; charset=utf-8", HTMX_LICENSE),
        "style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        _ => return not_found(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Records how long each find took, for the find-latency chart.
pub(crate) async fn record_find_latency(
    State(finds): State<Arc<FindLatencies>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    finds.record(started.elapsed());
    response
}
