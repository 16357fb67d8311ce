//! TLS end to end, with real processes on 127.0.0.1: `up --tls` and its
//! local CA, a broker and an agent given certificates of a CA made here,
//! pinning (a certificate of another CA is refused), plain HTTP to a TLS
//! port, the listen rule, and a key file others can read.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A certificate authority made for a test, as an attacker or an operator
/// would make one.
struct TestCa {
    certificate: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let certificate = params.self_signed(&key).unwrap();
        TestCa { certificate, key }
    }

    /// Writes the CA's certificate to `dir/NAME.pem` and returns its path.
    fn write_certificate(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.certificate.pem()).unwrap();
        path
    }

    /// A server certificate for 127.0.0.1 and localhost, written to
    /// `dir/NAME.pem` and `dir/NAME.key` (0600).
    fn issue_server(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .unwrap();
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, certificate.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

/// Leases the best partition, runs `echo` on it and releases it, as a
/// borrower pinned to `ca_cert`; returns the lease key, for checks after.
fn lease_run_release(broker_url: &str, borrower: &str, ca_cert: &Path) -> String {
    let env = [("LEASEHOLD_CA_CERT", ca_cert.to_str().unwrap())];
    let found = cli_with_env(broker_url, Some(borrower), &env, &["find"]);
    assert_eq!(found.code, 0, "{}", found.stderr);
    let lease = cli_with_env(
        broker_url,
        Some(borrower),
        &env,
        &["lease", "--best", "--output", "json"],
    );
    assert_eq!(lease.code, 0, "{}", lease.stderr);
    let lease = lease.json();
    let lease_id = lease["lease_id"].as_u64().expect("lease_id").to_string();
    assert!(
        lease["agent_url"].as_str().unwrap().starts_with("https://"),
        "{lease}"
    );
    let run = cli_with_env(
        broker_url,
        Some(borrower),
        &env,
        &["run", "--lease", &lease_id, "--", "echo", "hello over tls"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("hello over tls"), "{}", run.stdout);
    let released = cli_with_env(broker_url, Some(borrower), &env, &["release", &lease_id]);
    assert_eq!(released.code, 0, "{}", released.stderr);
    lease["lease_key"].as_str().expect("lease key").to_string()
}

#[test]
fn up_with_tls_serves_find_lease_run_release_over_https_to_a_pinned_client() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = spawn_ready(
        &[
            "up",
            "--tls",
            "--listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--image-store-listen",
            "127.0.0.1:0",
            "--data-dir",
            &text(&data),
            "--driver",
            "sim",
            "--output",
            "json",
        ],
        &dir.path().join("up.log"),
    );
    let broker_url = up.ready["broker_url"].as_str().unwrap().to_string();
    assert!(broker_url.starts_with("https://"), "{}", up.ready);
    assert!(
        up.ready["agent_url"]
            .as_str()
            .unwrap()
            .starts_with("https://"),
        "{}",
        up.ready
    );
    let ca_cert = PathBuf::from(up.ready["ca_cert"].as_str().expect("ca_cert"));
    assert!(ca_cert.is_absolute(), "{}", ca_cert.display());
    assert_eq!(ca_cert, data.join("tls/ca.pem").canonicalize().unwrap());
    let key_mode = std::fs::metadata(data.join("tls/ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(!up.ready.to_string().contains("PRIVATE KEY"));
    let borrower = up.ready["tokens"]["borrower"].as_str().unwrap().to_string();
    let old_key = lease_run_release(&broker_url, &borrower, &ca_cert);
    // The release notice reached the agent over TLS: the old key is fenced.
    let stale = cli_with_env(
        &broker_url,
        Some(&borrower),
        &[
            ("LEASEHOLD_CA_CERT", ca_cert.to_str().unwrap()),
            ("LEASEHOLD_LEASE_KEY", &old_key),
        ],
        &["run", "--lease", "1", "--", "echo", "after release"],
    );
    assert_ne!(stale.code, 0, "{}", stale.stdout);
    assert!(stale.stderr.contains("released"), "{}", stale.stderr);
    assert!(!stale.stdout.contains("after release"), "{}", stale.stdout);
}

/// A broker on 127.0.0.1:0 serving TLS with a certificate of `ca`, and an
/// agent (sim) serving TLS too that reaches it pinned to `ca`. Returns the
/// processes, the broker's URL, the admin token and a borrower's token.
fn start_tls_broker_and_agent(
    dir: &Path,
    ca: &TestCa,
    ca_cert: &Path,
) -> (Proc, Proc, String, String) {
    let (cert, key) = ca.issue_server(dir, "server");
    let broker = Cluster::start_broker(
        dir,
        "127.0.0.1:0",
        &[
            "--tls-cert".into(),
            text(&cert),
            "--tls-key".into(),
            text(&key),
        ],
    );
    let broker_url = broker.ready["broker_url"].as_str().unwrap().to_string();
    assert!(broker_url.starts_with("https://"), "{}", broker.ready);
    let admin = broker.ready["admin_token"].as_str().unwrap().to_string();
    let env = [("LEASEHOLD_CA_CERT", ca_cert.to_str().unwrap())];
    let mut tokens = Vec::new();
    for (name, role) in [("lender", "lender"), ("borrower", "borrower")] {
        let added = cli_with_env(
            &broker_url,
            Some(&admin),
            &env,
            &["principal", "add", name, "--role", role, "--output", "json"],
        );
        assert_eq!(added.code, 0, "{}", added.stderr);
        tokens.push(added.json()["token"].as_str().unwrap().to_string());
    }
    let agent = spawn_ready_with_token(
        &[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &text(&dir.join("agent")),
            "--host-id",
            "tls-host",
            "--driver",
            "sim",
            "--broker",
            &broker_url,
            "--ca-cert",
            &text(ca_cert),
            "--tls-cert",
            &text(&cert),
            "--tls-key",
            &text(&key),
            "--output",
            "json",
        ],
        Some(&tokens[0]),
        &dir.join("agent.log"),
    );
    assert!(
        agent.ready["agent_url"]
            .as_str()
            .unwrap()
            .starts_with("https://"),
        "{}",
        agent.ready
    );
    let added = cli_with_env(
        &broker_url,
        Some(&tokens[0]),
        &env,
        &[
            "host",
            "add",
            "--agent",
            agent.ready["agent_url"].as_str().unwrap(),
            "--vcpus",
            "1",
            "--cpu-cap",
            "50",
            "--memory-mib",
            "128",
            "--disk-gib",
            "1",
            "--price-per-hour",
            "0.05",
        ],
    );
    assert_eq!(added.code, 0, "{}", added.stderr);
    let borrower = tokens.pop().unwrap();
    (broker, agent, broker_url, borrower)
}

#[test]
fn a_broker_and_agent_with_certificates_of_their_own_ca_serve_a_pinned_borrower() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("operator CA");
    let ca_cert = ca.write_certificate(dir.path(), "operator-ca");
    let (_broker, _agent, broker_url, borrower) =
        start_tls_broker_and_agent(dir.path(), &ca, &ca_cert);
    lease_run_release(&broker_url, &borrower, &ca_cert);
}

#[test]
fn a_client_pinned_to_another_ca_or_to_none_refuses_the_server_as_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("operator CA");
    let ca_cert = ca.write_certificate(dir.path(), "operator-ca");
    let (_broker, _agent, broker_url, borrower) =
        start_tls_broker_and_agent(dir.path(), &ca, &ca_cert);
    // A man in the middle with a certificate of his own CA looks, to a
    // client pinned to that CA, like this server; a client pinned to the
    // operator's CA must refuse it, and the other way round.
    let stranger = TestCa::new("operator CA").write_certificate(dir.path(), "stranger-ca");
    let pinned_elsewhere = cli_with_env(
        &broker_url,
        Some(&borrower),
        &[("LEASEHOLD_CA_CERT", stranger.to_str().unwrap())],
        &["find"],
    );
    assert_eq!(pinned_elsewhere.code, 1, "{}", pinned_elsewhere.stdout);
    assert!(
        pinned_elsewhere
            .stderr
            .contains("certificate is not trusted"),
        "{}",
        pinned_elsewhere.stderr
    );
    // Without --ca-cert only public CAs are trusted, and this one is not.
    let unpinned = cli_with_env(&broker_url, Some(&borrower), &[], &["find"]);
    assert_eq!(unpinned.code, 1, "{}", unpinned.stdout);
    assert!(
        unpinned.stderr.contains("certificate is not trusted"),
        "{}",
        unpinned.stderr
    );
}

#[test]
fn plain_http_to_a_tls_port_is_refused_and_told_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("operator CA");
    let ca_cert = ca.write_certificate(dir.path(), "operator-ca");
    let (cert, key) = ca.issue_server(dir.path(), "server");
    let broker = Cluster::start_broker(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--tls-cert".into(),
            text(&cert),
            "--tls-key".into(),
            text(&key),
        ],
    );
    let admin = broker.ready["admin_token"].as_str().unwrap();
    let https_url = broker.ready["broker_url"].as_str().unwrap();
    let http_url = https_url.replace("https://", "http://");
    let plain = cli_with_env(&http_url, Some(admin), &[], &["whoami"]);
    assert_eq!(plain.code, 1, "{}", plain.stdout);
    assert!(!plain.stdout.contains("admin"), "{}", plain.stdout);
    assert!(plain.stderr.contains("https://"), "{}", plain.stderr);
    // The same request over TLS, pinned, is answered.
    let pinned = cli_with_env(
        https_url,
        Some(admin),
        &[("LEASEHOLD_CA_CERT", ca_cert.to_str().unwrap())],
        &["whoami"],
    );
    assert_eq!(pinned.code, 0, "{}", pinned.stderr);
    assert!(pinned.stdout.contains("admin"), "{}", pinned.stdout);
}

#[test]
fn a_broker_beyond_loopback_without_tls_is_refused_unless_insecure_http() {
    let dir = tempfile::tempdir().unwrap();
    let data = text(&dir.path().join("broker"));
    let refused = refused_start(
        &["broker", "--listen", "0.0.0.0:0", "--data-dir", &data],
        &[],
    );
    assert_ne!(refused.code, 0);
    for needle in ["0.0.0.0:0", "--tls-cert", "--tls-key", "--insecure-http"] {
        assert!(
            refused.stderr.contains(needle),
            "{needle}: {}",
            refused.stderr
        );
    }
    let log = dir.path().join("insecure.log");
    let started = spawn_ready(
        &[
            "broker",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            &data,
            "--insecure-http",
            "--output",
            "json",
        ],
        &log,
    );
    assert!(
        started.ready["broker_url"]
            .as_str()
            .unwrap()
            .starts_with("http://0.0.0.0:"),
        "{}",
        started.ready
    );
    assert_eq!(started.interrupt(), Some(0));
    let warned = std::fs::read_to_string(&log).unwrap();
    assert!(warned.contains("--insecure-http"), "{warned}");
}

#[test]
fn a_tls_key_file_others_can_read_is_refused_with_the_chmod_fix() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("operator CA");
    let (cert, key) = ca.issue_server(dir.path(), "server");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = text(&dir.path().join("broker"));
    let refused = refused_start(
        &[
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--tls-cert",
            &text(&cert),
            "--tls-key",
            &text(&key),
        ],
        &[],
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains(&format!("chmod 600 {}", key.display())),
        "{}",
        refused.stderr
    );
}

#[test]
fn up_beyond_loopback_serves_tls_with_its_local_ca_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = spawn_ready(
        &[
            "up",
            "--listen",
            "0.0.0.0:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--image-store-listen",
            "127.0.0.1:0",
            "--data-dir",
            &text(&data),
            "--driver",
            "sim",
            "--output",
            "json",
        ],
        &dir.path().join("up.log"),
    );
    let broker_url = up.ready["broker_url"].as_str().unwrap();
    assert!(broker_url.starts_with("https://0.0.0.0:"), "{}", up.ready);
    let ca_cert = up.ready["ca_cert"].as_str().expect("ca_cert");
    // Reached on loopback: the certificate names 127.0.0.1 as well.
    let local_url = broker_url.replace("0.0.0.0", "127.0.0.1");
    let admin = up.ready["tokens"]["admin"].as_str().unwrap();
    let whoami = cli_with_env(
        &local_url,
        Some(admin),
        &[("LEASEHOLD_CA_CERT", ca_cert)],
        &["whoami"],
    );
    assert_eq!(whoami.code, 0, "{}", whoami.stderr);
    // Asking for plain HTTP beyond loopback instead is an explicit choice.
    let plain = spawn_ready(
        &[
            "up",
            "--listen",
            "0.0.0.0:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--image-store-listen",
            "127.0.0.1:0",
            "--data-dir",
            &text(&dir.path().join("plain")),
            "--driver",
            "sim",
            "--insecure-http",
            "--output",
            "json",
        ],
        &dir.path().join("plain.log"),
    );
    assert!(plain.ready["ca_cert"].is_null(), "{}", plain.ready);
    assert!(
        plain.ready["broker_url"]
            .as_str()
            .unwrap()
            .starts_with("http://"),
        "{}",
        plain.ready
    );
}
