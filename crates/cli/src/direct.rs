//! Direct lending from the command line (an agent started with `agent
//! --direct`, no broker): `agent grant|revoke NAME` for the host's owner,
//! `find|lease|release|run --agent URL` for a granted borrower.

use crate::verbs::{client_of, explain_text, print_json, terms_text, EXIT_NO_MATCH};
use crate::{Global, OutputFormat};
use anyhow::{Context, Result};
use leasehold_api::{DirectLeaseRequest, LeaseView};
use leasehold_core::Requirements;

/// `leasehold agent grant NAME --agent URL`: the owner's token (the
/// agent's `owner.token`) lets `name` lease there; prints its token once.
pub async fn grant(global: &Global, agent_url: &str, name: &str) -> Result<i32> {
    let client = client_of(global, agent_url, global.token.clone())?;
    let granted = client
        .direct_grant(name)
        .await
        .with_context(|| format!("failed to grant '{name}' at {agent_url}"))?;
    if global.output == OutputFormat::Json {
        print_json(&granted);
    } else {
        println!(
            "granted '{}' the right to lease at {agent_url}",
            granted.name
        );
        println!(
            "token (shown once; keep it in a 0600 file): {}",
            granted.token.as_deref().unwrap_or("")
        );
    }
    Ok(0)
}

/// `leasehold agent revoke NAME --agent URL`.
pub async fn revoke(global: &Global, agent_url: &str, name: &str) -> Result<i32> {
    let client = client_of(global, agent_url, global.token.clone())?;
    let revoked = client
        .direct_revoke(name)
        .await
        .with_context(|| format!("failed to revoke '{name}' at {agent_url}"))?;
    if global.output == OutputFormat::Json {
        print_json(&revoked);
    } else {
        println!(
            "revoked '{}': {} lease(s) ended",
            revoked.name, revoked.leases_released
        );
    }
    Ok(0)
}

/// `leasehold find --agent URL`: the agent's own free partitions.
pub async fn find(
    global: &Global,
    agent_url: &str,
    requirements: &Requirements,
    limit: u32,
) -> Result<i32> {
    let client = client_of(global, agent_url, global.token.clone())?;
    let answer = client
        .direct_find(requirements, Some(limit))
        .await
        .with_context(|| format!("failed to find partitions at {agent_url}"))?;
    if global.output == OutputFormat::Json {
        print_json(&answer);
    } else if answer.offers.is_empty() {
        match &answer.explanation {
            Some(explanation) => print!("{}", explain_text(explanation, Some(requirements))),
            None => println!("no free partition at {agent_url} meets the requirements"),
        }
    } else {
        println!("{:<16} TERMS (direct: not billed)", "PARTITION");
        for offer in &answer.offers {
            println!(
                "{:<16} {}",
                offer.partition.to_string(),
                terms_text(&offer.terms)
            );
        }
    }
    Ok(if answer.offers.is_empty() {
        EXIT_NO_MATCH
    } else {
        0
    })
}

/// `leasehold lease --agent URL [INDEX | --best ...]`: a key signed by the
/// host's owner.
pub async fn lease(
    global: &Global,
    agent_url: &str,
    partition: Option<&str>,
    best: Option<Requirements>,
) -> Result<i32> {
    let partition = match partition {
        Some(text) => Some(parse_direct_partition(text)?),
        None => None,
    };
    let request = DirectLeaseRequest {
        partition,
        best: if partition.is_some() { None } else { best },
        key_ttl_secs: None,
    };
    let client = client_of(global, agent_url, global.token.clone())?;
    let lease = client
        .direct_lease(&request)
        .await
        .with_context(|| format!("failed to lease at {agent_url}"))?;
    print_lease(global, &lease);
    Ok(0)
}

/// A partition named as INDEX or HOST/INDEX (the host is the agent's).
fn parse_direct_partition(text: &str) -> Result<u32> {
    let index = text.rsplit('/').next().unwrap_or(text);
    index
        .parse()
        .with_context(|| format!("'{text}' is not a partition (INDEX or HOST/INDEX)"))
}

fn print_lease(global: &Global, lease: &LeaseView) {
    if global.output == OutputFormat::Json {
        print_json(lease);
        return;
    }
    println!(
        "lease {} on {} ({}), direct from the host's owner (not billed)",
        lease.lease_id,
        lease.partition,
        terms_text(&lease.terms)
    );
    println!(
        "  lease key: {}",
        lease.lease_key.as_deref().unwrap_or("(not shown)")
    );
    if let Some(url) = &lease.agent_url {
        println!(
            "next: leasehold run --agent {url} --lease {} -- echo hello",
            lease.lease_id
        );
    }
}

/// `leasehold release --agent URL ID`.
pub async fn release(global: &Global, agent_url: &str, lease_id: u64) -> Result<i32> {
    let client = client_of(global, agent_url, global.token.clone())?;
    let lease = client
        .direct_release(lease_id)
        .await
        .with_context(|| format!("failed to release lease {lease_id} at {agent_url}"))?;
    if global.output == OutputFormat::Json {
        print_json(&lease);
    } else {
        println!("lease {} released (direct: nothing billed)", lease.lease_id);
    }
    Ok(0)
}

/// For `run --agent URL`: the lease if the agent lends directly and the
/// caller holds it; `None` when the agent lends through brokers (or the
/// lease is not a direct one of the caller), so the broker is asked.
pub async fn direct_lease_for_run(
    global: &Global,
    agent_url: &str,
    lease_id: u64,
) -> Result<Option<LeaseView>> {
    let client = client_of(global, agent_url, global.token.clone())?;
    match client.direct_get_lease(lease_id).await {
        Ok(lease) => Ok(Some(lease)),
        Err(error) if matches!(error.status(), Some(401) | Some(404)) => Ok(None),
        Err(error) => {
            Err(error).with_context(|| format!("failed to ask {agent_url} for lease {lease_id}"))
        }
    }
}
