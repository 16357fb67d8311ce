//! The live part of each page, rendered from what the API's handlers answer
//! for the same principal, so the dashboard never shows a role more than the
//! API would (and shows a refusal as the API words it).

use super::charts::{self, Line, BLUE_LINE, ORANGE_LINE};
use super::FindLatencies;
use crate::http::{self, ListQuery};
use crate::reservations;
use crate::AppState;
use axum::extract::State;
use axum::{Extension, Json};
use leasehold_api::{
    rfc3339_from_ms, HostCapacityView, HostView, LedgerView, PartitionView, PoolView, WarningView,
    WorkloadView,
};
use leasehold_core::command::may_see_lease;
use leasehold_core::lease::{decide_alter, Lease, PartitionStatus, ReleaseOutcome};
use leasehold_core::money::format_micros;
use leasehold_core::reservation::Capacity;
use leasehold_core::table::Principal;
use leasehold_core::Role;
use leasehold_service::ErrorResponse;
use leasehold_service::QueryParams;
use maud::{html, Markup, PreEscaped};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Partitions are read up to the API's page bound (for the counts)...
const MAX_ROWS: u32 = 10_000;
/// ...but a table shows at most this many rows: it is sent every second.
const SHOWN_ROWS: usize = 500;
/// The charts read the newest this many leases and transfers.
const HISTORY_ROWS: u32 = 2_000;
/// The released leases shown are among the newest this many leases.
const RECENT_LEASES: u32 = 200;
/// The ledger page shows the newest transfers only.
const LEDGER_ROWS: u32 = 200;

type Answer<T> = Result<Json<T>, ErrorResponse>;

fn list_query(limit: u32) -> QueryParams<ListQuery> {
    QueryParams(ListQuery {
        host: None,
        limit: Some(limit),
        after_index: None,
    })
}

/// The API's refusal, worded as the API words it.
fn refusal(error: &ErrorResponse) -> Markup {
    html! { p.refusal role="status" { (error.detail.message) } }
}

fn money(micros: i128) -> String {
    format_micros(micros)
}

/// What the lease would cost if released now: core's bill, not a copy of it.
fn running_cost_micros(lease: &Lease, now_ms: u64, commission_basis_points: u32) -> Option<u64> {
    match lease.clone().release(now_ms, commission_basis_points) {
        Ok(ReleaseOutcome::Released(bill)) => Some(bill.charge_micros),
        Ok(ReleaseOutcome::AlreadyReleased) => lease.charge_micros,
        Err(_) => None,
    }
}

/// The active leases the principal may see (core's `may_see_lease`, as
/// `GET /v1/leases/{id}` decides), newest first.
fn visible_active_leases(app: &AppState, principal: &Principal) -> Vec<Lease> {
    let state = app.state.read().unwrap_or_else(|p| p.into_inner());
    let mut leases: Vec<Lease> = state
        .active_leases
        .values()
        .filter(|lease| may_see_lease(principal, lease))
        .cloned()
        .collect();
    leases.sort_by_key(|lease| std::cmp::Reverse(lease.lease_id));
    leases
}

/// The hosts of `GET /v1/hosts`, a lender's own only (the API shows every
/// host; a lender's dashboard is about theirs).
async fn visible_hosts(app: &Arc<AppState>, principal: &Principal) -> Answer<Vec<HostView>> {
    let Json(mut hosts) = http::list_hosts(State(app.clone())).await?;
    if principal.role == Role::Lender {
        hosts.retain(|h| h.lender == principal.name);
    }
    Ok(Json(hosts))
}

async fn visible_partitions(
    app: &Arc<AppState>,
    principal: &Principal,
) -> Answer<Vec<PartitionView>> {
    http::list_partitions(
        State(app.clone()),
        Extension(principal.clone()),
        list_query(MAX_ROWS),
    )
    .await
}

pub(crate) async fn overview(
    app: Arc<AppState>,
    finds: Arc<FindLatencies>,
    principal: Principal,
) -> Markup {
    let now_ms = app.config.clock.now_ms();
    let active = visible_active_leases(&app, &principal);
    let commission = app.config.commission_basis_points;
    let running: u64 = active
        .iter()
        .filter_map(|l| running_cost_micros(l, now_ms, commission))
        .sum();
    let balance = http::bill(State(app.clone()), Extension(principal.clone())).await;
    let partitions = match principal.role {
        Role::Borrower => None,
        _ => visible_partitions(&app, &principal).await.ok().map(|j| j.0),
    };
    html! {
        section.cards {
            div.card { span.label { "Active leases" } span.value #active-lease-count { (active.len()) } }
            div.card { span.label { "Running cost" } span.value { (money(running.into())) } }
            @match &balance {
                Ok(Json(bill)) => div.card { span.label { (balance_label(principal.role)) } span.value { (money(bill.balance_micros.into())) } },
                Err(e) => div.card { (refusal(e)) },
            }
            @if let Some(partitions) = &partitions {
                @let (free, leased, withdrawn) = status_counts(partitions);
                div.card { span.label { "Partitions free / leased / withdrawn" }
                    span.value { (free) " / " (leased) " / " (withdrawn) } }
            }
        }
        section.charts { (overview_charts(&app, &finds, &principal, partitions.as_deref(), now_ms).await) }
    }
}

/// Whose balance `GET /v1/bill` answers for each role.
fn balance_label(role: Role) -> &'static str {
    match role {
        Role::Borrower => "Balance (spent is negative)",
        Role::Lender => "Earnings",
        Role::Admin => "Broker commission",
    }
}

fn status_counts(partitions: &[PartitionView]) -> (usize, usize, usize) {
    let mut counts = (0, 0, 0);
    for p in partitions {
        match PartitionStatus::of(p.withdrawn, p.lease_id) {
            PartitionStatus::Free => counts.0 += 1,
            PartitionStatus::Leased { .. } => counts.1 += 1,
            PartitionStatus::Withdrawn => counts.2 += 1,
        }
    }
    counts
}

async fn overview_charts(
    app: &Arc<AppState>,
    finds: &FindLatencies,
    principal: &Principal,
    partitions: Option<&[PartitionView]>,
    now_ms: u64,
) -> Markup {
    let history = http::list_leases(
        State(app.clone()),
        Extension(principal.clone()),
        list_query(HISTORY_ROWS),
    )
    .await;
    let spans: Vec<(u64, Option<u64>)> = history
        .map(|Json(leases)| {
            leases
                .iter()
                .map(|l| (l.started_at_ms, l.release_requested_at_ms))
                .collect()
        })
        .unwrap_or_default();
    let leases_svg = charts::line_chart_svg(
        "Active leases",
        "leases",
        &[Line {
            name: "active leases",
            colour: BLUE_LINE,
            values: &charts::active_leases_series(&spans, now_ms),
        }],
    );
    let money_svg = money_chart(app, principal, now_ms).await;
    let utilisation_svg = match partitions {
        Some(partitions) => Some(utilisation_chart(app, principal, partitions).await),
        None => None,
    };
    // Only admins see how the market's finds perform.
    let latency_svg = (principal.role == Role::Admin).then(|| latency_chart(finds, now_ms));
    html! {
        figure.chart { (PreEscaped(leases_svg)) }
        figure.chart { (PreEscaped(money_svg)) }
        @if let Some(svg) = utilisation_svg { figure.chart { (PreEscaped(svg)) } }
        @if let Some(svg) = latency_svg { figure.chart { (PreEscaped(svg)) } }
    }
}

/// Money moved over time in the ledger the principal may read: a
/// borrower's spending, a lender's earnings, every charge for an admin.
async fn money_chart(app: &Arc<AppState>, principal: &Principal, now_ms: u64) -> String {
    let ledger = http::ledger_view(
        State(app.clone()),
        Extension(principal.clone()),
        list_query(HISTORY_ROWS),
    )
    .await;
    let amounts: Vec<(u64, u64)> = ledger
        .map(|Json(l)| {
            l.transfers
                .iter()
                .map(|t| (t.at_ms, t.amount_micros))
                .collect()
        })
        .unwrap_or_default();
    let (title, name) = match principal.role {
        Role::Borrower => ("Spending (micros per 10 s)", "spent"),
        Role::Lender => ("Earnings (micros per 10 s)", "earned"),
        Role::Admin => ("Revenue (micros per 10 s)", "charged"),
    };
    charts::line_chart_svg(
        title,
        "micros",
        &[Line {
            name,
            colour: ORANGE_LINE,
            values: &charts::amount_series(&amounts, now_ms),
        }],
    )
}

/// The percentage of each visible host's CPU its leased partitions hold,
/// busiest first.
fn utilisation_by_host(hosts: &[HostView], partitions: &[PartitionView]) -> Vec<(String, u64)> {
    let mut leased_centicores: BTreeMap<&str, u64> = BTreeMap::new();
    for p in partitions.iter().filter(|p| p.lease_id.is_some()) {
        *leased_centicores.entry(&p.partition.host_id).or_default() +=
            u64::from(p.terms.vcpus) * u64::from(p.terms.cpu_cap_percent);
    }
    let mut rows: Vec<(String, u64)> = hosts
        .iter()
        .map(|h| {
            let leased = leased_centicores
                .get(h.host_id.as_str())
                .copied()
                .unwrap_or(0);
            let percent = (leased * 100)
                .checked_div(h.capacity.cpu_centicores)
                .unwrap_or(0);
            (h.host_id.clone(), percent)
        })
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    rows
}

async fn utilisation_chart(
    app: &Arc<AppState>,
    principal: &Principal,
    partitions: &[PartitionView],
) -> String {
    let hosts = visible_hosts(app, principal)
        .await
        .map(|j| j.0)
        .unwrap_or_default();
    let mut rows = utilisation_by_host(&hosts, partitions);
    rows.truncate(charts::MAX_CHART_HOSTS);
    charts::utilisation_chart_svg(&rows)
}

fn latency_chart(finds: &FindLatencies, now_ms: u64) -> String {
    let (medians, maxima) = charts::latency_series(&finds.snapshot(), now_ms);
    charts::line_chart_svg(
        "Find latency (µs)",
        "µs",
        &[
            Line {
                name: "median",
                colour: BLUE_LINE,
                values: &medians,
            },
            Line {
                name: "largest",
                colour: ORANGE_LINE,
                values: &maxima,
            },
        ],
    )
}

pub(crate) async fn hosts(app: Arc<AppState>, principal: Principal) -> Markup {
    let hosts = match visible_hosts(&app, &principal).await {
        Ok(Json(hosts)) => hosts,
        Err(e) => return refusal(&e),
    };
    let partitions = visible_partitions(&app, &principal)
        .await
        .map(|j| j.0)
        .unwrap_or_default();
    let utilisation: BTreeMap<String, u64> = utilisation_by_host(&hosts, &partitions)
        .into_iter()
        .collect();
    html! {
        div.table-scroll { table {
            thead { tr { th { "Host" } th { "Lender" } th { "Agent" } th.num { "CPU" }
                th.num { "Memory MiB" } th.num { "Disk GiB" } th.num { "Partitions" } th.num { "Leased CPU" } } }
            tbody {
                @for h in hosts.iter().take(SHOWN_ROWS) {
                    tr id=(format!("host-{}", h.host_id)) {
                        td data-label="Host" { (h.host_id) }
                        td data-label="Lender" { (h.lender) }
                        td data-label="Agent" { (h.agent_url.as_deref().unwrap_or("—")) }
                        td.num data-label="CPU" { (centicores(h.capacity.cpu_centicores)) }
                        td.num data-label="Memory MiB" { (h.capacity.memory_mib) }
                        td.num data-label="Disk GiB" { (h.capacity.disk_gib) }
                        td.num data-label="Partitions" { (h.partitions) }
                        td.num data-label="Leased CPU" { (utilisation.get(&h.host_id).copied().unwrap_or(0)) " %" }
                    }
                }
            }
        } }
        (shown_of(hosts.len()))
        @if hosts.is_empty() { p.empty { "No hosts yet." } }
    }
}

/// Says so when a table shows only its first rows.
fn shown_of(total: usize) -> Markup {
    html! {
        @if total > SHOWN_ROWS {
            p.empty { "The first " (SHOWN_ROWS) " of " (total) "; the API lists them all." }
        }
    }
}

fn centicores(value: u64) -> String {
    format!("{}.{:02}", value / 100, value % 100)
}

/// A partition's lending status, with the lock rule's word for a leased one.
fn partition_status(p: &PartitionView) -> (&'static str, String) {
    let status = PartitionStatus::of(p.withdrawn, p.lease_id);
    match (status, decide_alter(status)) {
        (PartitionStatus::Free, _) => ("free", "free".into()),
        (PartitionStatus::Leased { lease_id }, Err(_)) => {
            ("leased", format!("leased (lease {lease_id}), locked"))
        }
        (PartitionStatus::Leased { lease_id }, Ok(())) => {
            ("leased", format!("leased (lease {lease_id})"))
        }
        (PartitionStatus::Withdrawn, _) => ("withdrawn", "withdrawn".into()),
    }
}

pub(crate) async fn partitions(app: Arc<AppState>, principal: Principal) -> Markup {
    let partitions = match visible_partitions(&app, &principal).await {
        Ok(Json(partitions)) => partitions,
        Err(e) => return refusal(&e),
    };
    html! {
        div.table-scroll { table {
            thead { tr { th { "Partition" } th { "Status" } th.num { "vCPUs" } th.num { "Memory MiB" }
                th.num { "Disk GiB" } th.num { "Price / hour" } th { "Images" } th.num { "Epoch" } } }
            tbody {
                @for p in partitions.iter().take(SHOWN_ROWS) {
                    @let (class, status) = partition_status(p);
                    tr id=(format!("partition-{}-{}", p.partition.host_id, p.partition.index)) {
                        td data-label="Partition" { (p.partition.to_string()) }
                        td data-label="Status" { span class=(format!("status {class}")) { (status) } }
                        td.num data-label="vCPUs" { (p.terms.vcpus) " × " (p.terms.cpu_cap_percent) " %" }
                        td.num data-label="Memory MiB" { (p.terms.memory_mib) }
                        td.num data-label="Disk GiB" { (p.terms.disk_gib) }
                        td.num data-label="Price / hour" { (money(p.terms.price_per_hour_micros.into())) }
                        td data-label="Images" { (p.terms.images.join(", ")) }
                        td.num data-label="Epoch" { (p.epoch) }
                    }
                }
            }
        } }
        (shown_of(partitions.len()))
        @if partitions.is_empty() { p.empty { "No partitions yet." } }
    }
}

pub(crate) async fn leases(app: Arc<AppState>, principal: Principal) -> Markup {
    let now_ms = app.config.clock.now_ms();
    let commission = app.config.commission_basis_points;
    let active = visible_active_leases(&app, &principal);
    html! {
        h2 { "Active" }
        div.table-scroll { table #active-leases {
            thead { tr { th.num { "Lease" } th { "Partition" } th { "Borrower" } th { "Lender" }
                th { "Started" } th.num { "Price / hour" } th.num { "Cost so far" } } }
            tbody {
                @for lease in active.iter().take(SHOWN_ROWS) {
                    tr id=(format!("lease-{}", lease.lease_id)) {
                        td.num data-label="Lease" { (lease.lease_id) }
                        td data-label="Partition" { (lease.partition.to_string()) }
                        td data-label="Borrower" { (lease.borrower) }
                        td data-label="Lender" { (lease.lender) }
                        td data-label="Started" { (rfc3339_from_ms(lease.started_at_ms)) }
                        td.num data-label="Price / hour" { (money(lease.terms.price_per_hour_micros.into())) }
                        td.num data-label="Cost so far" {
                            (running_cost_micros(lease, now_ms, commission).map_or("—".into(), |c| money(c.into())))
                        }
                    }
                }
            }
        } }
        (shown_of(active.len()))
        @if active.is_empty() { p.empty #no-active-leases { "No active leases." } }
        h2 { "Recently released" }
        (released_leases(&app, &principal).await)
    }
}

async fn released_leases(app: &Arc<AppState>, principal: &Principal) -> Markup {
    let history = match http::list_leases(
        State(app.clone()),
        Extension(principal.clone()),
        list_query(RECENT_LEASES),
    )
    .await
    {
        Ok(Json(leases)) => leases,
        Err(e) => return refusal(&e),
    };
    let released = history
        .iter()
        .filter(|l| l.release_requested_at_ms.is_some())
        .take(50);
    html! {
        div.table-scroll { table {
            thead { tr { th.num { "Lease" } th { "Partition" } th { "Borrower" } th { "Lender" }
                th { "Released" } th.num { "Charge" } } }
            tbody {
                @for lease in released {
                    tr id=(format!("released-lease-{}", lease.lease_id)) {
                        td.num data-label="Lease" { (lease.lease_id) }
                        td data-label="Partition" { (lease.partition.to_string()) }
                        td data-label="Borrower" { (lease.borrower) }
                        td data-label="Lender" { (lease.lender) }
                        td data-label="Released" { (lease.release_requested_at_ms.map(rfc3339_from_ms).unwrap_or_default()) }
                        td.num data-label="Charge" { (lease.charge_micros.map_or("—".into(), |c| money(c.into()))) }
                    }
                }
            }
        } }
    }
}

pub(crate) async fn ledger(app: Arc<AppState>, principal: Principal) -> Markup {
    let ledger = http::ledger_view(
        State(app.clone()),
        Extension(principal.clone()),
        list_query(LEDGER_ROWS),
    )
    .await;
    let bill = http::bill(State(app.clone()), Extension(principal.clone())).await;
    html! {
        @match &bill {
            Ok(Json(bill)) => section.cards { div.card {
                span.label { "Balance of " (bill.principal) }
                span.value #balance { (money(bill.balance_micros.into())) } } },
            Err(e) => (refusal(e)),
        }
        @match &ledger {
            Ok(Json(ledger)) => (ledger_tables(ledger)),
            Err(e) => (refusal(e)),
        }
    }
}

fn ledger_tables(ledger: &LedgerView) -> Markup {
    html! {
        h2 { "Balances" }
        div.table-scroll { table {
            thead { tr { th { "Account" } th.num { "Balance" } } }
            tbody {
                @for b in &ledger.balances {
                    tr { td data-label="Account" { (b.account) } td.num data-label="Balance" { (money(b.balance_micros.into())) } }
                }
            }
            tfoot { tr { th { "Sum" } th.num { (money(ledger.sum_micros.into())) } } }
        } }
        h2 { "Transfers (newest " (LEDGER_ROWS) ")" }
        div.table-scroll { table {
            thead { tr { th.num { "Transfer" } th.num { "Lease" } th { "From" } th { "To" } th.num { "Amount" } th { "At" } } }
            tbody {
                @for t in &ledger.transfers {
                    tr {
                        td.num data-label="Transfer" { (t.transfer_id) }
                        td.num data-label="Lease" { (t.lease_id) }
                        td data-label="From" { (t.debit_account) }
                        td data-label="To" { (t.credit_account) }
                        td.num data-label="Amount" { (money(t.amount_micros.into())) }
                        td data-label="At" { (rfc3339_from_ms(t.at_ms)) }
                    }
                }
            }
        } }
        @if ledger.transfers.is_empty() { p.empty { "No transfers yet." } }
    }
}

pub(crate) async fn reservations(app: Arc<AppState>, principal: Principal) -> Markup {
    let state = || State(app.clone());
    let who = || Extension(principal.clone());
    let workloads = reservations::list_workloads(state(), who()).await;
    let pools = reservations::list_pools(state(), who()).await;
    let capacity = reservations::host_capacity(state(), who()).await;
    let warnings = reservations::list_warnings(state(), who()).await;
    html! {
        h2 { "Warnings" }
        (answer_or_refusal(&warnings, |w| warnings_list(w)))
        h2 { "Workloads" }
        (answer_or_refusal(&workloads, |w| workloads_table(w)))
        h2 { "Acquisition pools" }
        (answer_or_refusal(&pools, |p| pools_table(&p.pools)))
        h2 { "Host capacity" }
        (answer_or_refusal(&capacity, |c| capacity_table(c)))
    }
}

fn answer_or_refusal<T>(answer: &Answer<T>, render: impl FnOnce(&T) -> Markup) -> Markup {
    match answer {
        Ok(Json(value)) => render(value),
        Err(e) => refusal(e),
    }
}

fn warnings_list(warnings: &[WarningView]) -> Markup {
    html! {
        @if warnings.is_empty() { p.empty { "No warnings." } }
        @for w in warnings.iter().take(SHOWN_ROWS) {
            p.refusal { strong { (w.workload) } " (" (w.instances.join(", ")) "): " (w.message) }
        }
    }
}

fn workloads_table(workloads: &[WorkloadView]) -> Markup {
    if workloads.is_empty() {
        return html! { p.empty { "No workloads." } };
    }
    html! {
        div.table-scroll { table {
            thead { tr { th { "Workload" } th { "Owner" } th.num { "Priority" } th { "Start" } th { "End" } th.num { "Instances" } } }
            tbody { @for w in workloads.iter().take(SHOWN_ROWS) { tr {
                td data-label="Workload" { (w.name) } td data-label="Owner" { (w.owner) }
                td.num data-label="Priority" { (w.priority) } td data-label="Start" { (w.start) }
                td data-label="End" { (w.end) } td.num data-label="Instances" { (w.instances.len()) }
            } } }
        } }
        (shown_of(workloads.len()))
    }
}

fn pools_table(pools: &[PoolView]) -> Markup {
    if pools.is_empty() {
        return html! { p.empty { "No pools." } };
    }
    html! {
        div.table-scroll { table {
            thead { tr { th.num { "Pool" } th { "Host" } th { "Workload" } th { "Phase" }
                th.num { "Target CPU" } th.num { "Acquired CPU" } th.num { "Target MiB" } th.num { "Acquired MiB" } } }
            tbody { @for p in pools.iter().take(SHOWN_ROWS) { tr {
                td.num data-label="Pool" { (p.pool_id) } td data-label="Host" { (p.host_id) }
                td data-label="Workload" { (p.workload) } td data-label="Phase" { (format!("{:?}", p.phase)) }
                td.num data-label="Target CPU" { (centicores(p.target.cpu_centicores)) }
                td.num data-label="Acquired CPU" { (centicores(p.acquired.cpu_centicores)) }
                td.num data-label="Target MiB" { (p.target.memory_mib) }
                td.num data-label="Acquired MiB" { (p.acquired.memory_mib) }
            } } }
        } }
        (shown_of(pools.len()))
    }
}

fn capacity_table(hosts: &[HostCapacityView]) -> Markup {
    let cpu = |c: Option<&Capacity>| c.map_or("—".into(), |c| centicores(c.cpu_centicores));
    if hosts.is_empty() {
        return html! { p.empty { "No hosts." } };
    }
    html! {
        div.table-scroll { table {
            thead { tr { th { "Host" } th.num { "Total CPU" } th.num { "Owner share" } th.num { "Lent" }
                th.num { "Available" } th.num { "Held" } th.num { "Owner uses" } th { "Power" } } }
            tbody { @for h in hosts.iter().take(SHOWN_ROWS) { tr {
                td data-label="Host" { (h.host_id) }
                td.num data-label="Total CPU" { (cpu(Some(&h.total))) }
                td.num data-label="Owner share" { (cpu(Some(&h.owner_share))) }
                td.num data-label="Lent" { (cpu(Some(&h.lent))) }
                td.num data-label="Available" { (cpu(h.available.as_ref())) }
                td.num data-label="Held" { (cpu(Some(&h.held))) }
                td.num data-label="Owner uses" { (cpu(h.owner_used.as_ref())) }
                td data-label="Power" { (if h.powered_down { "drained" } else { "on" }) }
            } } }
        } }
        (shown_of(hosts.len()))
    }
}

/// Transfers shown per share group (the newest).
const SHOWN_TRANSFERS: usize = 20;

/// Seed 004: each share group the principal may see (FIG. 4A rows, the
/// primary and its epoch, the newest transfers) and, for admins, the
/// rights' side of the ledger.
pub(crate) async fn rights(app: Arc<AppState>, principal: Principal) -> Markup {
    let groups = crate::groups::list_groups(State(app.clone()), Extension(principal.clone())).await;
    let ledger = http::ledger_view(
        State(app.clone()),
        Extension(principal.clone()),
        list_query(LEDGER_ROWS),
    )
    .await;
    let now_ms = app.config.clock.now_ms();
    html! {
        (answer_or_refusal(&groups, |groups| html! {
            @if groups.is_empty() { p.empty { "No share groups." } }
            @for document in groups { (share_group_tables(document, now_ms)) }
        }))
        @if let Ok(Json(ledger)) = &ledger {
            @if !ledger.rights_balances.is_empty() {
                h2 { "Rights in the ledger" }
                div.table-scroll { table {
                    thead { tr { th { "Account" } th.num { "Rights" } } }
                    tbody { @for b in &ledger.rights_balances {
                        tr { td data-label="Account" { (b.account) } td.num data-label="Rights" { (b.balance_micros) } }
                    } }
                } }
            }
        }
    }
}

fn share_group_tables(document: &leasehold_api::rights::ShareGroupDocument, now_ms: u64) -> Markup {
    let view = leasehold_api::rights::RightsTableView::of(document, None, now_ms);
    let group = &document.group;
    html! {
        h2 { "Share group " (view.group) }
        p { (view.mode) ", primary " (view.primary.as_deref().unwrap_or("none")) " at epoch " (view.primary_epoch) ", version " (view.version)
            @if view.unassigned > 0 { ", " (view.unassigned) " rights unassigned" } }
        div.table-scroll { table {
            thead { tr { th { "Host" } th { "Partition" } th.num { "Rights" } th.num { "Active" } th.num { "Inactive" } th.num { "Workload" } th { "Manager" } } }
            tbody { @for row in view.rows.iter().take(SHOWN_ROWS) {
                tr {
                    td data-label="Host" { (row.host_id) }
                    td data-label="Partition" { @if row.partition == 0 { "owner" } @else { (row.partition) } }
                    td.num data-label="Rights" { (row.rights_owned) }
                    td.num data-label="Active" { (row.modules_active) }
                    td.num data-label="Inactive" { (row.modules_inactive) }
                    td.num data-label="Workload" { (row.workload_percent) "%" }
                    td data-label="Manager" { (row.manager_url) }
                }
            } }
        } }
        @if !group.transfers.is_empty() {
            div.table-scroll { table {
                thead { tr { th.num { "Transfer" } th { "From" } th { "To" } th.num { "Modules" } th { "Phase" } th { "At" } } }
                tbody { @for t in group.transfers.values().rev().take(SHOWN_TRANSFERS) {
                    tr {
                        td.num data-label="Transfer" { (t.transfer_id) }
                        td data-label="From" { (t.from.to_string()) }
                        td data-label="To" { (t.to.to_string()) }
                        td.num data-label="Modules" { (t.modules) }
                        td data-label="Phase" { (format!("{:?}", t.phase).to_lowercase()) }
                        td data-label="At" { (rfc3339_from_ms(t.created_at_ms)) }
                    }
                } }
            } }
        }
    }
}
