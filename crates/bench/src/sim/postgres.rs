//! A PostgreSQL database of its own for one seed, on the server an admin
//! URL names (CI's throw-away cluster), dropped when the seed is done.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct SeedDatabase {
    admin_url: String,
    name: String,
    /// The URL of the seed's database, for `BrokerConfig::database_url`.
    pub url: String,
}

/// Runs `sql` on the admin connection, on a thread of its own: the
/// `postgres` client blocks on a runtime of its own, which cannot run
/// inside a tokio runtime.
fn run_as_admin(admin_url: &str, sql: String) -> Result<(), String> {
    let admin_url = admin_url.to_string();
    std::thread::spawn(move || {
        postgres::Client::connect(&admin_url, postgres::NoTls)?.batch_execute(&sql)
    })
    .join()
    .map_err(|_| "the admin connection's thread panicked".to_string())?
    .map_err(|e| format!("PostgreSQL: {e}"))
}

/// `admin_url` with its database swapped for `name`: the same server and user.
fn url_of_database(admin_url: &str, name: &str) -> String {
    let (front, query) = match admin_url.split_once('?') {
        Some((front, query)) => (front, format!("?{query}")),
        None => (admin_url, String::new()),
    };
    let (server, _) = front
        .rsplit_once('/')
        .filter(|(server, _)| server.contains("://"))
        .unwrap_or((front, ""));
    format!("{server}/{name}{query}")
}

impl SeedDatabase {
    pub fn create(admin_url: &str, seed: u64) -> Result<SeedDatabase, String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "leasehold_sim_{}_{seed}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_as_admin(admin_url, format!("CREATE DATABASE {name}"))?;
        Ok(SeedDatabase {
            url: url_of_database(admin_url, &name),
            admin_url: admin_url.to_string(),
            name,
        })
    }
}

impl Drop for SeedDatabase {
    fn drop(&mut self) {
        let _ = run_as_admin(
            &self.admin_url,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}
