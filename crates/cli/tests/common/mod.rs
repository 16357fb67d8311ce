//! Test harness: the real `leasehold` binary in separate processes, on
//! 127.0.0.1 ports the OS picks. Each process prints one JSON line when it
//! is ready, so tests wait on that event, never on a sleep.

#![allow(dead_code)]

use leasehold_api::{Client, Role};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn leasehold_binary() -> &'static str {
    env!("CARGO_BIN_EXE_leasehold")
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub ready: Value,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Asks the process to stop as Ctrl-C would, and returns its exit code.
    #[allow(unsafe_code)]
    pub fn interrupt(mut self) -> Option<i32> {
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let status = self.child.wait().ok()?;
        status.code()
    }
}

/// Starts `leasehold ARGS` and waits for its ready line.
pub fn spawn_ready(args: &[&str], log: &Path) -> Proc {
    spawn_ready_with_token(args, None, log)
}

/// Like [`spawn_ready`], giving the process a token through LEASEHOLD_TOKEN
/// (tokens never go on a command line).
pub fn spawn_ready_with_token(args: &[&str], token: Option<&str>, log: &Path) -> Proc {
    let log_file = std::fs::File::create(log).expect("create log file");
    let mut command = Command::new(leasehold_binary());
    command
        .args(args)
        .env_remove("LEASEHOLD_TOKEN")
        .env_remove("LEASEHOLD_BROKER");
    if let Some(token) = token {
        command.env("LEASEHOLD_TOKEN", token);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("spawn leasehold");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read ready line");
    let ready: Value = match serde_json::from_str(&line) {
        Ok(value) => value,
        Err(_) => {
            let _ = child.kill();
            panic!(
                "leasehold {:?} did not print a ready line; got {line:?}; log:\n{}",
                args,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    };
    Proc { child, ready }
}

pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs one CLI command to completion.
pub fn cli(broker_url: &str, token: Option<&str>, args: &[&str]) -> CliOutput {
    let mut command = Command::new(leasehold_binary());
    command
        .env_remove("LEASEHOLD_TOKEN")
        .env("LEASEHOLD_BROKER", broker_url)
        .args(args);
    if let Some(token) = token {
        command.env("LEASEHOLD_TOKEN", token);
    }
    let output = command.output().expect("run leasehold");
    CliOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A broker and agents, each its own process.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub broker: Option<Proc>,
    pub broker_url: String,
    pub admin_token: String,
    pub lender_token: String,
    pub agents: Vec<(String, Proc)>,
    pub broker_args: Vec<String>,
}

impl Cluster {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn start_broker(dir: &Path, listen: &str, extra: &[String]) -> Proc {
        let data = dir.join("broker");
        let mut args = vec![
            "broker".to_string(),
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--output".into(),
            "json".into(),
        ];
        args.extend(extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_ready(&refs, &dir.join(format!("broker-{}.log", rand_suffix())))
    }

    /// A broker with the given extra flags, and a lender.
    pub async fn start(extra_broker_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker_args: Vec<String> = extra_broker_args.iter().map(|s| s.to_string()).collect();
        let broker = Self::start_broker(dir.path(), "127.0.0.1:0", &broker_args);
        let broker_url = broker.ready["broker_url"]
            .as_str()
            .expect("broker_url")
            .to_string();
        let admin_token = broker.ready["admin_token"]
            .as_str()
            .expect("admin token on first start")
            .to_string();
        let admin = Client::new(&broker_url, Some(admin_token.clone()));
        let lender_token = admin
            .create_principal("lender", Role::Lender)
            .await
            .expect("create lender")
            .token;
        Cluster {
            dir,
            broker: Some(broker),
            broker_url,
            admin_token,
            lender_token,
            agents: Vec::new(),
            broker_args,
        }
    }

    /// Starts an agent for `host_id` with the given driver.
    pub fn start_agent(&mut self, host_id: &str, driver: &str) -> String {
        self.start_agent_with(host_id, driver, &[])
    }

    /// Starts an agent for `host_id` with the given driver and extra flags.
    pub fn start_agent_with(&mut self, host_id: &str, driver: &str, extra: &[&str]) -> String {
        let data = self.path(&format!("agent-{host_id}"));
        let log = self.path(&format!("agent-{host_id}-{}.log", rand_suffix()));
        let data_text = data.display().to_string();
        let mut args = vec![
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_text,
            "--host-id",
            host_id,
            "--driver",
            driver,
            "--cpus",
            "64",
            "--memory-mib",
            "65536",
            "--disk-gib",
            "1000",
            "--broker",
            &self.broker_url,
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let proc = spawn_ready_with_token(&args, Some(&self.lender_token), &log);
        let url = proc.ready["agent_url"]
            .as_str()
            .expect("agent_url")
            .to_string();
        self.agents.retain(|(h, _)| h != host_id);
        self.agents.push((host_id.to_string(), proc));
        url
    }

    pub fn stop_agent(&mut self, host_id: &str) {
        self.agents.retain(|(h, _)| h != host_id);
    }

    pub fn admin(&self) -> Client {
        Client::new(&self.broker_url, Some(self.admin_token.clone()))
    }

    pub fn lender(&self) -> Client {
        Client::new(&self.broker_url, Some(self.lender_token.clone()))
    }

    pub async fn borrower(&self, name: &str) -> (String, Client) {
        let token = self
            .admin()
            .create_principal(name, Role::Borrower)
            .await
            .expect("create borrower")
            .token;
        (token.clone(), Client::new(&self.broker_url, Some(token)))
    }

    /// Kills the broker and starts it again on the same port and data.
    pub fn restart_broker(&mut self) {
        let listen = self.broker_url.trim_start_matches("http://").to_string();
        self.broker = None; // killed by Drop
        let proc = Self::start_broker(self.dir.path(), &listen, &self.broker_args);
        assert_eq!(
            proc.ready["broker_url"].as_str(),
            Some(self.broker_url.as_str())
        );
        assert!(
            proc.ready["admin_token"].is_null(),
            "a restart must not bootstrap a new admin"
        );
        self.broker = Some(proc);
    }
}

/// The time of the real binary's processes, set by the test: a private
/// (0600) file of milliseconds since 1970 that a broker, agent or `up` reads
/// when started with the hidden `--simulated-clock-file FILE`. Every write
/// is an atomic rename, so a process never reads half a number.
pub struct SimulatedClockFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    now_ms: std::sync::atomic::AtomicU64,
}

impl SimulatedClockFile {
    pub fn starting_at(start_ms: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = SimulatedClockFile {
            path: dir.path().join("clock"),
            _dir: dir,
            now_ms: std::sync::atomic::AtomicU64::new(start_ms),
        };
        clock.set_ms(start_ms);
        clock
    }

    /// The flag and its value, to append to a service's arguments.
    pub fn args(&self) -> [String; 2] {
        [
            "--simulated-clock-file".to_string(),
            self.path.display().to_string(),
        ]
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sets the processes' time to `now_ms` (they never go backwards).
    pub fn set_ms(&self, now_ms: u64) {
        leasehold_store::private_fs::write_private_file(&self.path, now_ms.to_string().as_bytes())
            .expect("write the simulated clock file");
        self.now_ms
            .store(now_ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Moves the processes' time forward by `by_ms`; the new time.
    pub fn advance_ms(&self, by_ms: u64) -> u64 {
        let now_ms = self.now_ms() + by_ms;
        self.set_ms(now_ms);
        now_ms
    }
}

pub fn terms(
    vcpus: u32,
    memory_mib: u64,
    image: &str,
    price_per_hour_micros: u64,
) -> leasehold_core::Terms {
    leasehold_core::Terms {
        vcpus,
        cpu_cap_percent: 100,
        memory_mib,
        disk_gib: 1,
        images: vec![image.to_string()],
        price_per_hour_micros,
        isolation: None,
    }
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A process's resident set size, from /proc/PID/status (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// The `host:port` of a `http://host:port` URL.
pub fn address_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Connections that each send a request declaring a `declared_bytes` body
/// but only `sent_bytes` of it, then stall (the slow-body attack). A
/// connection the server already closed while we wrote is kept too.
pub async fn open_stalled_bodies(
    address: &str,
    count: usize,
    path: &str,
    token: Option<&str>,
    declared_bytes: usize,
    sent_bytes: usize,
) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n{authorization}Content-Length: {declared_bytes}\r\n\r\n"
    );
    let mut request = head.into_bytes();
    request.extend(vec![b' '; sent_bytes]);
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect for a stalled body");
        // The server may answer and close before it has all of it: fine.
        let _ = stream.write_all(&request).await;
        streams.push(stream);
    }
    streams
}

/// Connections that send nothing at all (the idle-connection attack).
pub async fn open_idle_connections(address: &str, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        streams.push(
            tokio::net::TcpStream::connect(address)
                .await
                .expect("connect an idle connection"),
        );
    }
    streams
}

/// The status code a server wrote on `stream` (it may close right after);
/// None when it closed without answering. Panics after `deadline`.
pub async fn answered_status(
    stream: &mut tokio::net::TcpStream,
    deadline: std::time::Duration,
) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let read = async {
        let mut buffer = [0u8; 512];
        while !received.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .expect("the server answered or closed in time");
    let line = String::from_utf8_lossy(&received);
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok())
}

/// One request, its status and its body bytes exactly as sent.
pub async fn status_and_body(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<&str>,
) -> (u16, Vec<u8>) {
    let mut request = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token)
        .header("content-type", "application/json");
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("body").to_vec())
}

/// Runs one CLI command to completion with extra environment variables
/// (such as LEASEHOLD_CA_CERT).
pub fn cli_with_env(
    broker_url: &str,
    token: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> CliOutput {
    let mut command = Command::new(leasehold_binary());
    command
        .env_remove("LEASEHOLD_TOKEN")
        .env_remove("LEASEHOLD_CA_CERT")
        .env("LEASEHOLD_BROKER", broker_url)
        .envs(env.iter().copied())
        .args(args);
    if let Some(token) = token {
        command.env("LEASEHOLD_TOKEN", token);
    }
    let output = command.output().expect("run leasehold");
    CliOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Starts a service (`broker`, `agent`, `up`, `images serve`) that must
/// refuse to start: its exit code and stderr. Panics if it prints a ready
/// line instead (it is killed first).
pub fn refused_start(args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let mut child = Command::new(leasehold_binary())
        .args(args)
        .env_remove("LEASEHOLD_TOKEN")
        .env_remove("LEASEHOLD_BROKER")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn leasehold");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout piped");
    // A refused start closes stdout without a line; a start prints one.
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read stdout");
    if !line.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("leasehold {args:?} started: {line}");
    }
    let output = child.wait_with_output().expect("wait for leasehold");
    CliOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: line,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `admin` with a connection to the test server, on a thread of its
/// own: the `postgres` client blocks on a runtime of its own, which cannot
/// run inside a test's tokio runtime.
fn with_admin_connection(admin_url: &str, sql: String) -> Result<(), postgres::Error> {
    let admin_url = admin_url.to_string();
    std::thread::spawn(move || {
        postgres::Client::connect(&admin_url, postgres::NoTls)?.batch_execute(&sql)
    })
    .join()
    .expect("the admin connection's thread")
}

/// A database of its own for one test, dropped at the end.
pub struct TestDatabase {
    pub admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub fn create() -> Option<TestDatabase> {
        let Ok(admin_url) = std::env::var("LEASEHOLD_TEST_POSTGRES_URL") else {
            eprintln!("skipped: set LEASEHOLD_TEST_POSTGRES_URL (CI starts a throw-away cluster)");
            return None;
        };
        let name = format!(
            "leasehold_e2e_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        with_admin_connection(&admin_url, format!("CREATE DATABASE {name}"))
            .expect("create a database on LEASEHOLD_TEST_POSTGRES_URL");
        // The same server and user, another database: swap the URL's path.
        let (front, query) = match admin_url.split_once('?') {
            Some((front, query)) => (front, format!("?{query}")),
            None => (admin_url.as_str(), String::new()),
        };
        let (server, _) = front
            .rsplit_once('/')
            .filter(|(server, _)| server.contains("://"))
            .unwrap_or((front, ""));
        let url = format!("{server}/{name}{query}");
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = with_admin_connection(
            &self.admin_url,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}
