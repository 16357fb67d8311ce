//! The OpenAPI document of the broker, served at `/openapi.json`.

use serde_json::{json, Value};

fn op(summary: &str, role: &str) -> Value {
    json!({"summary": summary, "description": format!("Role: {role}."), "responses": {"200": {"description": "OK"}, "4XX": {"description": "An error body {error: {code, message, field}}"}}})
}

pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {"title": "leasehold broker", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Resource table, matching, leases, lease keys and ledger. Authenticate with 'Authorization: Bearer TOKEN'. Mutating requests may carry an 'Idempotency-Key' header. Money is integer micro-units."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/health": {"get": op("Liveness", "none")},
            "/v1/broker": {"get": op("Version, public key for verifying lease keys, commission", "none")},
            "/v1/whoami": {"get": op("The caller's name and role", "any")},
            "/v1/principals": {"post": op("Create a principal {name, role}; returns its token once", "admin")},
            "/v1/hosts": {"get": op("List hosts", "any")},
            "/v1/hosts/{host_id}": {"put": op("Register or update a host {agent_url, capacity}", "lender")},
            "/v1/hosts/{host_id}/revocations": {"get": op("Signed release notices of the host's leases whose keys have not expired, in release order (?after_seq=, ?limit= up to 1000); agents pull them", "lender owning the host, admin")},
            "/v1/hosts/{host_id}/partitions/{index}": {
                "put": op("Register or alter a partition {terms}; refused with 409 partition_locked while leased", "lender owning the host"),
                "delete": op("Withdraw a partition; refused with 409 partition_locked while leased", "lender owning the host")
            },
            "/v1/partitions": {"get": op("Partitions with their lending status (?host=, ?limit=)", "lender (own) or admin")},
            "/v1/find": {"post": op("Find free partitions {requirements, limit}: cheapest first, then best fit; an explanation when none match", "any")},
            "/v1/leases": {
                "post": op("Conclude a lease {partition} or {best: requirements}; 201 with the lease key, 409 partition_taken", "borrower"),
                "get": op("Leases of the caller (borrower: borrowed, lender: lent, admin: all)", "any")
            },
            "/v1/leases/{lease_id}": {"get": op("One lease; the key is shown to its borrower while active", "borrower, lender, admin")},
            "/v1/leases/{lease_id}/release": {"post": op("Release a lease and bill it once; retries answer with the same bill", "the lease's borrower")},
            "/v1/bill": {"get": op("The caller's leases and balance", "any")},
            "/v1/ledger": {"get": op("Transfers and balances (admin: whole ledger, sums to zero)", "any")},
            "/v1/hosts/{host_id}/samples": {"post": op("An agent's sample {owner_used: {cpu_centicores, memory_mib, disk_gib}}; answers {guaranteed, next_sample_after_ms}", "lender owning the host (or its host credential)")},
            "/v1/workloads": {
                "post": op("Create or replace a workload {name, priority, start, end, instance: [...], rule: [...]} (seed 003)", "borrower, admin"),
                "get": op("Workloads with each instance's status and acquisition (own; admin: all)", "borrower, admin")
            },
            "/v1/workloads/{name}": {
                "get": op("One workload", "its owner, admin"),
                "delete": op("Delete a workload; its pools give their capacity back", "its owner, admin")
            },
            "/v1/instances/{name}": {"delete": op("Delete one instance of a workload", "its owner, admin")},
            "/v1/pools": {"get": op("Acquisition pools (FIG. 3) and instance-pool links (FIG. 6)", "borrower (own workloads), lender (own hosts), admin")},
            "/v1/host-capacity": {"get": op("Per host: total, owner share, lent, available, held, not yet acquired (FIG. 5)", "admin, lender (own hosts), borrower (hosts of own pools)")},
            "/v1/warnings": {"get": op("Instances whose target will not be held by their start, with the earliest start and the largest reachable guarantee (FIG. 14)", "borrower (own), admin")},
            "/v1/plan": {"post": op("Run a planning round now", "admin")},
            "/v1/instances/{name}/migrate": {"post": op("Move a placed instance to another host {to}; a pool ramps there and takes over once it holds the target (FIG. 15)", "its owner, admin")},
            "/v1/power/save": {"post": op("Drain the least-used host that may go {horizon_secs}: its instances move elsewhere, it takes no new pools (FIG. 17)", "admin")},
            "/v1/power/up/{host_id}": {"post": op("Power a drained host up again", "admin")}
        }
    })
}
