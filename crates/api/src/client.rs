//! The typed HTTP client. Every mutating call carries a fresh idempotency key
//! and is retried with the same key when the connection fails, so a retry
//! never doubles an effect.

use crate::types::*;
use leasehold_core::Requirements;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

mod reservations;
mod rights;

/// How often a request is retried after a connection failure.
const MAX_CONNECT_RETRIES: u32 = 3;
/// With several broker URLs: how long a request keeps trying them while
/// none is up and active (a standby takes over within its leadership time
/// to live, 5 s by default, plus a load).
const FAILOVER_WAIT: Duration = Duration::from_secs(30);

/// Whether another broker of the same database may answer instead: this
/// one cannot be reached (refused, reset, or it died with the request in
/// flight: the idempotency key makes asking the next one safe), or it
/// stands by.
fn not_serving(error: &ApiError) -> bool {
    match error {
        ApiError::Unreachable { .. } => true,
        ApiError::Status { status, code, .. } => *status == 503 && code == "standby",
        _ => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The server answered with an error status and body.
    #[error("{message}")]
    Status {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
        detail: Box<ErrorDetail>,
    },
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected answer from {url}: {problem}")]
    Protocol { url: String, problem: String },
    /// The server's TLS certificate is not signed by a CA this client
    /// trusts (the pinned one, or a public one when none is pinned).
    #[error("refusing {url}: its TLS certificate is not trusted ({reason}); give the certificate of the CA that signed it with --ca-cert FILE or LEASEHOLD_CA_CERT")]
    UntrustedCertificate { url: String, reason: String },
    /// The CA certificate to pin is not usable.
    #[error("{source_name}: not a usable CA certificate: {problem}")]
    InvalidCaCertificate {
        source_name: String,
        problem: String,
    },
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Status { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn detail(&self) -> Option<&ErrorDetail> {
        match self {
            ApiError::Status { detail, .. } => Some(detail),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    /// One URL, or several separated by commas: the brokers of one
    /// database (issue 11), tried in turn while one is down or standing by.
    base_url: String,
    /// Which of several URLs answered last; tried first next time.
    preferred_url: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: Option<String>,
    http: reqwest::Client,
    /// Answers longer than this are refused unread (`None`: no cap).
    max_response_bytes: Option<usize>,
}

/// The broker's calls to agents: an agent's URL is chosen by its lender, so
/// it must not make the broker wait, read without end, or call elsewhere.
pub const AGENT_CALL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const AGENT_CALL_TOTAL_TIMEOUT: Duration = Duration::from_secs(5);
pub const AGENT_CALL_MAX_RESPONSE_BYTES: usize = 64 * 1024;

fn new_idempotency_key() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The server certificates a client accepts on `https://` URLs.
#[derive(Debug, Clone, Default)]
pub enum ServerTrust {
    /// Certificates signed by a public CA (the Mozilla list built into the
    /// client): for servers with real certificates.
    #[default]
    PublicRoots,
    /// Only certificates signed by this CA (PEM, one or more certificates),
    /// no public one: a local CA such as the one `leasehold up` makes.
    PinnedCa {
        /// Where the PEM came from, for error messages.
        source_name: String,
        pem: Vec<u8>,
    },
}

impl ServerTrust {
    /// Pins the CA certificate(s) in the PEM file at `path`.
    pub fn pinned_ca_file(path: &std::path::Path) -> Result<Self, ApiError> {
        let source_name = path.display().to_string();
        let pem = std::fs::read(path).map_err(|e| ApiError::InvalidCaCertificate {
            source_name: source_name.clone(),
            problem: format!("cannot read it: {e}"),
        })?;
        let trust = ServerTrust::PinnedCa { source_name, pem };
        // Checked now (building parses the certificates), so a bad file is
        // reported once, at start.
        trust.build(reqwest::Client::builder())?;
        Ok(trust)
    }

    /// Builds `builder` trusting exactly these roots.
    pub fn build(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::Client, ApiError> {
        self.configure(builder)?
            .build()
            .map_err(|e| ApiError::InvalidCaCertificate {
                source_name: self.source_name().to_string(),
                problem: error_chain(&e),
            })
    }

    fn source_name(&self) -> &str {
        match self {
            ServerTrust::PublicRoots => "the public CAs",
            ServerTrust::PinnedCa { source_name, .. } => source_name,
        }
    }

    /// `builder` trusting exactly these roots.
    fn configure(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, ApiError> {
        let ServerTrust::PinnedCa { source_name, pem } = self else {
            return Ok(builder);
        };
        let invalid = |problem: String| ApiError::InvalidCaCertificate {
            source_name: source_name.clone(),
            problem,
        };
        let certificates =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| invalid(e.to_string()))?;
        if certificates.is_empty() {
            return Err(invalid(
                "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        // No public root: a certificate from any other CA, even a real one,
        // is refused. That is the pinning.
        let mut builder = builder.tls_built_in_root_certs(false);
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
        Ok(builder)
    }
}

impl Client {
    /// A client that trusts public CAs on `https://` URLs.
    pub fn new(base_url: &str, token: Option<String>) -> Self {
        Self::with_trust(base_url, token, &ServerTrust::PublicRoots)
            .expect("reqwest client builds with static settings")
    }

    /// A client that accepts only the server certificates `trust` allows.
    pub fn with_trust(
        base_url: &str,
        token: Option<String>,
        trust: &ServerTrust,
    ) -> Result<Self, ApiError> {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            // Below the servers' 10 s idle timeout, so a pooled connection is
            // dropped here before the server closes it under a request.
            .pool_idle_timeout(Duration::from_secs(5));
        let http = trust.build(builder)?;
        Ok(Client {
            base_url: base_url.trim_end_matches('/').to_string(),
            token,
            http,
            max_response_bytes: None,
            preferred_url: Default::default(),
        })
    }

    /// The client the broker calls agents with: it follows no redirect (a
    /// lender's URL must not aim the broker at another server), gives up
    /// connecting after [`AGENT_CALL_CONNECT_TIMEOUT`] and on the whole call
    /// after [`AGENT_CALL_TOTAL_TIMEOUT`], reads at most
    /// [`AGENT_CALL_MAX_RESPONSE_BYTES`] of an answer, and accepts only the
    /// certificates `trust` allows on https.
    pub fn for_calling_agents(trust: &ServerTrust) -> Result<Self, ApiError> {
        let builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(AGENT_CALL_CONNECT_TIMEOUT)
            .timeout(AGENT_CALL_TOTAL_TIMEOUT)
            .pool_max_idle_per_host(8);
        Ok(Client {
            base_url: String::new(),
            token: None,
            http: trust.build(builder)?,
            max_response_bytes: Some(AGENT_CALL_MAX_RESPONSE_BYTES),
            preferred_url: Default::default(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The same connection pool and token, another server.
    pub fn with_base_url(&self, base_url: &str) -> Self {
        Client {
            base_url: base_url.trim_end_matches('/').to_string(),
            token: self.token.clone(),
            http: self.http.clone(),
            max_response_bytes: self.max_response_bytes,
            preferred_url: Default::default(),
        }
    }

    pub fn with_token(&self, token: Option<String>) -> Self {
        Client {
            base_url: self.base_url.clone(),
            token,
            http: self.http.clone(),
            max_response_bytes: self.max_response_bytes,
            preferred_url: self.preferred_url.clone(),
        }
    }

    async fn send<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<R, ApiError> {
        let idempotency_key = (method != Method::GET).then(new_idempotency_key);
        self.send_with_key(method, path, body, timeout, idempotency_key)
            .await
    }

    async fn send_with_key<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
        idempotency_key: Option<String>,
    ) -> Result<R, ApiError> {
        let bases: Vec<&str> = self.base_url.split(',').collect();
        if bases.len() == 1 {
            let url = format!("{}{}", self.base_url, path);
            return self
                .send_to(method, &url, body, timeout, idempotency_key.as_deref())
                .await;
        }
        // Several brokers of one database: the first that is up and active
        // answers. The same idempotency key goes to each, and they share
        // the database, so trying the next never doubles an effect.
        let waited = std::time::Instant::now();
        let mut round = 0u64;
        loop {
            let first = self
                .preferred_url
                .load(std::sync::atomic::Ordering::Relaxed);
            let mut last_error = None;
            for offset in 0..bases.len() {
                let index = (first + offset) % bases.len();
                let url = format!("{}{}", bases[index].trim_end_matches('/'), path);
                let key = idempotency_key.as_deref();
                match self.send_to(method.clone(), &url, body, timeout, key).await {
                    Err(error) if not_serving(&error) => last_error = Some(error),
                    answer => {
                        self.preferred_url
                            .store(index, std::sync::atomic::Ordering::Relaxed);
                        return answer;
                    }
                }
            }
            if waited.elapsed() >= FAILOVER_WAIT {
                return Err(last_error.expect("at least one URL was tried"));
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(100 * round.min(5))).await;
        }
    }

    async fn send_to<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
        idempotency_key: Option<&str>,
    ) -> Result<R, ApiError> {
        let url = url.to_string();
        let mut attempt = 0;
        loop {
            let mut request = self.http.request(method.clone(), &url);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(key) = idempotency_key {
                request = request.header(IDEMPOTENCY_HEADER, key);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            request = request.timeout(timeout.unwrap_or(Duration::from_secs(30)));
            match request.send().await {
                Ok(response) => return decode(&url, response, self.max_response_bytes).await,
                // A certificate refused now is refused on every retry.
                Err(error)
                    if error.is_connect()
                        && attempt < MAX_CONNECT_RETRIES
                        && untrusted_certificate(&error).is_none() =>
                {
                    attempt += 1;
                    // Back off briefly; the key makes the retry safe.
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
                Err(source) => return Err(send_failed(url, source)),
            }
        }
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ApiError> {
        self.send::<(), R>(Method::GET, path, None, None).await
    }

    // ---- broker ----

    pub async fn health(&self) -> Result<serde_json::Value, ApiError> {
        self.get("/v1/health").await
    }

    pub async fn broker_info(&self) -> Result<BrokerInfo, ApiError> {
        self.get("/v1/broker").await
    }

    /// Whether the broker is the active one of its database or a standby.
    pub async fn broker_status(&self) -> Result<crate::broker_status::BrokerStatus, ApiError> {
        self.get("/v1/broker/status").await
    }

    pub async fn whoami(&self) -> Result<WhoAmI, ApiError> {
        self.get("/v1/whoami").await
    }

    pub async fn create_principal(
        &self,
        name: &str,
        role: Role,
    ) -> Result<PrincipalCreated, ApiError> {
        let body = CreatePrincipalRequest {
            name: name.to_string(),
            role,
        };
        self.send(Method::POST, "/v1/principals", Some(&body), None)
            .await
    }

    pub async fn register_host(
        &self,
        host_id: &str,
        request: &RegisterHostRequest,
    ) -> Result<HostView, ApiError> {
        self.send(
            Method::PUT,
            &format!("/v1/hosts/{host_id}"),
            Some(request),
            None,
        )
        .await
    }

    /// A credential acting for this lender on `host_id` only.
    pub async fn create_host_credential(
        &self,
        host_id: &str,
    ) -> Result<HostCredentialCreated, ApiError> {
        self.send(
            Method::POST,
            &format!("/v1/hosts/{host_id}/credentials"),
            Some(&serde_json::json!({})),
            None,
        )
        .await
    }

    pub async fn list_hosts(&self) -> Result<Vec<HostView>, ApiError> {
        self.get("/v1/hosts").await
    }

    pub async fn register_partition(
        &self,
        host_id: &str,
        index: u32,
        request: &RegisterPartitionRequest,
    ) -> Result<PartitionView, ApiError> {
        self.send(
            Method::PUT,
            &format!("/v1/hosts/{host_id}/partitions/{index}"),
            Some(request),
            None,
        )
        .await
    }

    pub async fn withdraw_partition(
        &self,
        host_id: &str,
        index: u32,
    ) -> Result<PartitionView, ApiError> {
        self.send::<(), _>(
            Method::DELETE,
            &format!("/v1/hosts/{host_id}/partitions/{index}"),
            None,
            None,
        )
        .await
    }

    pub async fn list_partitions(&self) -> Result<Vec<PartitionView>, ApiError> {
        self.get("/v1/partitions").await
    }

    /// One page of a host's partitions, in index order, after `after_index`.
    pub async fn list_host_partitions(
        &self,
        host_id: &str,
        after_index: Option<u32>,
        limit: u32,
    ) -> Result<Vec<PartitionView>, ApiError> {
        let after = after_index
            .map(|i| format!("&after_index={i}"))
            .unwrap_or_default();
        self.get(&format!(
            "/v1/partitions?host={host_id}&limit={limit}{after}"
        ))
        .await
    }

    pub async fn find(
        &self,
        requirements: &Requirements,
        limit: Option<u32>,
    ) -> Result<FindResponse, ApiError> {
        let body = FindRequest {
            requirements: requirements.clone(),
            limit,
        };
        self.send(Method::POST, "/v1/find", Some(&body), None).await
    }

    pub async fn lease(&self, request: &LeaseRequest) -> Result<LeaseView, ApiError> {
        self.send(Method::POST, "/v1/leases", Some(request), None)
            .await
    }

    /// Leases with the caller's idempotency key: a caller that got an
    /// error (or no answer) asks again with the same key and gets the lease
    /// the first request concluded, if it did, instead of a second one.
    pub async fn lease_with_idempotency_key(
        &self,
        request: &LeaseRequest,
        idempotency_key: &str,
    ) -> Result<LeaseView, ApiError> {
        self.send_with_key(
            Method::POST,
            "/v1/leases",
            Some(request),
            None,
            Some(idempotency_key.to_string()),
        )
        .await
    }

    pub async fn get_lease(&self, lease_id: u64) -> Result<LeaseView, ApiError> {
        self.get(&format!("/v1/leases/{lease_id}")).await
    }

    /// A lease on `host_id`, as its agent confirms a key (FIG. 15); a
    /// host credential may ask for its own host.
    pub async fn host_lease(&self, host_id: &str, lease_id: u64) -> Result<LeaseView, ApiError> {
        self.get(&format!("/v1/hosts/{host_id}/leases/{lease_id}"))
            .await
    }

    pub async fn list_leases(&self) -> Result<Vec<LeaseView>, ApiError> {
        self.get("/v1/leases").await
    }

    pub async fn release(&self, lease_id: u64) -> Result<ReleaseReceipt, ApiError> {
        self.send::<(), _>(
            Method::POST,
            &format!("/v1/leases/{lease_id}/release"),
            None,
            None,
        )
        .await
    }

    /// A page of the release notices of `host_id`'s leases after `after_seq`
    /// (for the host's lender; agents pull them).
    pub async fn host_revocations(
        &self,
        host_id: &str,
        after_seq: u64,
    ) -> Result<RevocationPage, ApiError> {
        self.get(&format!(
            "/v1/hosts/{host_id}/revocations?after_seq={after_seq}"
        ))
        .await
    }

    pub async fn bill(&self) -> Result<BillView, ApiError> {
        self.get("/v1/bill").await
    }

    pub async fn ledger(&self) -> Result<LedgerView, ApiError> {
        self.get("/v1/ledger").await
    }

    // ---- direct lending (an agent started with --direct) ----

    /// The owner lets `name` lease at this agent; the answer holds its token.
    pub async fn direct_grant(&self, name: &str) -> Result<DirectGrant, ApiError> {
        let body = DirectGrantRequest {
            name: name.to_string(),
        };
        self.send(Method::POST, "/v1/direct/grants", Some(&body), None)
            .await
    }

    pub async fn direct_revoke(&self, name: &str) -> Result<DirectGrant, ApiError> {
        self.send::<(), _>(
            Method::DELETE,
            &format!("/v1/direct/grants/{name}"),
            None,
            None,
        )
        .await
    }

    pub async fn direct_find(
        &self,
        requirements: &Requirements,
        limit: Option<u32>,
    ) -> Result<FindResponse, ApiError> {
        let body = FindRequest {
            requirements: requirements.clone(),
            limit,
        };
        self.send(Method::POST, "/v1/direct/find", Some(&body), None)
            .await
    }

    pub async fn direct_lease(&self, request: &DirectLeaseRequest) -> Result<LeaseView, ApiError> {
        self.send(Method::POST, "/v1/direct/leases", Some(request), None)
            .await
    }

    pub async fn direct_get_lease(&self, lease_id: u64) -> Result<LeaseView, ApiError> {
        self.get(&format!("/v1/direct/leases/{lease_id}")).await
    }

    pub async fn direct_release(&self, lease_id: u64) -> Result<LeaseView, ApiError> {
        self.send::<(), _>(
            Method::DELETE,
            &format!("/v1/direct/leases/{lease_id}"),
            None,
            None,
        )
        .await
    }

    // ---- agent ----

    pub async fn agent_info(&self) -> Result<AgentInfo, ApiError> {
        self.get("/v1/agent").await
    }

    pub async fn agent_add_partition(
        &self,
        terms: &leasehold_core::Terms,
    ) -> Result<AgentPartitionView, ApiError> {
        let body = AddPartitionRequest {
            terms: terms.clone(),
        };
        self.send(Method::POST, "/v1/partitions", Some(&body), None)
            .await
    }

    pub async fn agent_list_partitions(&self) -> Result<Vec<AgentPartitionView>, ApiError> {
        self.get("/v1/partitions").await
    }

    pub async fn agent_alter_partition(
        &self,
        index: u32,
        terms: &leasehold_core::Terms,
    ) -> Result<AgentPartitionView, ApiError> {
        let body = AddPartitionRequest {
            terms: terms.clone(),
        };
        self.send(
            Method::PUT,
            &format!("/v1/partitions/{index}"),
            Some(&body),
            None,
        )
        .await
    }

    pub async fn agent_withdraw_partition(
        &self,
        index: u32,
    ) -> Result<AgentPartitionView, ApiError> {
        self.send::<(), _>(
            Method::DELETE,
            &format!("/v1/partitions/{index}"),
            None,
            None,
        )
        .await
    }

    /// Submits a job and waits for it to finish (S51-S57).
    pub async fn submit_job(
        &self,
        index: u32,
        request: &SubmitJobRequest,
    ) -> Result<JobResult, ApiError> {
        // The job may run long; wait for its own timeout plus a margin, or a day.
        let wait = request
            .timeout_ms
            .map(|ms| Duration::from_millis(ms.saturating_add(30_000)))
            .unwrap_or(Duration::from_secs(24 * 3600));
        // The key goes as the bearer too: the agent checks it before it
        // reads the body.
        self.with_token(Some(request.lease_key.clone()))
            .send(
                Method::POST,
                &format!("/v1/partitions/{index}/jobs"),
                Some(request),
                Some(wait),
            )
            .await
    }

    /// A job's record; the client's token is the lender token or a lease key.
    pub async fn get_job(&self, job_id: u64) -> Result<JobResult, ApiError> {
        self.get(&format!("/v1/jobs/{job_id}")).await
    }

    /// Submits a job and follows it live: `on_event` sees the start (with
    /// the job id, to cancel it) and each piece of output as it comes; the
    /// answer is the job's result.
    pub async fn submit_job_streaming(
        &self,
        index: u32,
        request: &SubmitJobRequest,
        mut on_event: impl FnMut(&JobEvent),
    ) -> Result<JobResult, ApiError> {
        let url = format!("{}/v1/partitions/{index}/jobs", self.base_url);
        let mut body = request.clone();
        body.stream = true;
        let wait = request
            .timeout_ms
            .map(|ms| Duration::from_millis(ms.saturating_add(30_000)))
            .unwrap_or(Duration::from_secs(24 * 3600));
        let response = self
            .http
            .post(&url)
            .bearer_auth(&request.lease_key)
            .json(&body)
            .timeout(wait)
            .send()
            .await
            .map_err(|source| send_failed(url.clone(), source))?;
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/x-ndjson"));
        if !response.status().is_success() || !streamed {
            // A refusal, or a whole result at once: replay its output.
            let result: JobResult = decode(&url, response, self.max_response_bytes).await?;
            replay_job_output(&result, &mut on_event);
            return Ok(result);
        }
        read_job_events(url, response, on_event).await
    }
}

/// A whole job result told as the events a stream would have carried.
fn replay_job_output(result: &JobResult, on_event: &mut impl FnMut(&JobEvent)) {
    on_event(&JobEvent::Started {
        job_id: result.job_id,
    });
    if !result.stdout.is_empty() {
        on_event(&JobEvent::Stdout {
            data: result.stdout.clone(),
        });
    }
    if !result.stderr.is_empty() {
        on_event(&JobEvent::Stderr {
            data: result.stderr.clone(),
        });
    }
}

/// Reads a job's NDJSON events until its result (or its error).
async fn read_job_events(
    url: String,
    mut response: reqwest::Response,
    mut on_event: impl FnMut(&JobEvent),
) -> Result<JobResult, ApiError> {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|source| ApiError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let Some(chunk) = chunk else {
            return Err(ApiError::Protocol {
                url,
                problem: "the job's stream ended without a result".into(),
            });
        };
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: JobEvent =
                serde_json::from_slice(&line).map_err(|error| ApiError::Protocol {
                    url: url.clone(),
                    problem: format!("cannot decode a job event: {error}"),
                })?;
            match event {
                JobEvent::Result { result } => return Ok(result),
                JobEvent::Error { error } => {
                    return Err(ApiError::Status {
                        status: 500,
                        code: error.code.clone(),
                        message: error.message.clone(),
                        field: error.field.clone(),
                        detail: Box::new(error),
                    })
                }
                other => on_event(&other),
            }
        }
    }
}

impl Client {
    /// Cancels a running job; the client's token is a key of its lease.
    pub async fn cancel_job(&self, job_id: u64) -> Result<serde_json::Value, ApiError> {
        self.send::<(), _>(
            Method::POST,
            &format!("/v1/jobs/{job_id}/cancel"),
            None,
            None,
        )
        .await
    }

    pub async fn send_notice(&self, notice: &str) -> Result<serde_json::Value, ApiError> {
        let body = NoticeRequest {
            notice: notice.to_string(),
        };
        // The signed notice is its own credential, checked before the body.
        self.with_token(Some(notice.to_string()))
            .send(
                Method::POST,
                "/v1/notices",
                Some(&body),
                Some(Duration::from_secs(5)),
            )
            .await
    }
}

/// Reads an answer's body, refusing one longer than `max_bytes` as soon as
/// it says or shows so (without reading the rest).
async fn read_body(
    url: &str,
    mut response: reqwest::Response,
    max_bytes: Option<usize>,
) -> Result<Vec<u8>, ApiError> {
    let unreachable = |source| ApiError::Unreachable {
        url: url.to_string(),
        source,
    };
    let Some(max_bytes) = max_bytes else {
        return Ok(response.bytes().await.map_err(unreachable)?.to_vec());
    };
    let too_long = || ApiError::Protocol {
        url: url.to_string(),
        problem: format!("the answer is longer than {max_bytes} bytes"),
    };
    if response
        .content_length()
        .is_some_and(|length| length > max_bytes as u64)
    {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        if body.len() + chunk.len() > max_bytes {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error and its sources, joined by ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        text.push_str(&format!(": {source}"));
        next = source.source();
    }
    text
}

/// A request that got no answer: refused because of the server's
/// certificate, or the server could not be reached.
fn send_failed(url: String, source: reqwest::Error) -> ApiError {
    match untrusted_certificate(&source) {
        Some(reason) => ApiError::UntrustedCertificate { url, reason },
        None => ApiError::Unreachable { url, source },
    }
}

/// Why the server's certificate was refused, if that is why `error`
/// happened. rustls's error sits inside `io::Error`s in the chain, whose
/// `source()` skips what they wrap, so an `io::Error` is opened instead.
pub fn untrusted_certificate(error: &reqwest::Error) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = next {
        if let Some(rustls::Error::InvalidCertificate(reason)) =
            current.downcast_ref::<rustls::Error>()
        {
            return Some(format!("{reason:?}"));
        }
        next = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

async fn decode<R: DeserializeOwned>(
    url: &str,
    response: reqwest::Response,
    max_bytes: Option<usize>,
) -> Result<R, ApiError> {
    let status = response.status();
    let bytes = read_body(url, response, max_bytes).await?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|error| ApiError::Protocol {
            url: url.to_string(),
            problem: format!("cannot decode the answer: {error}"),
        });
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => Err(ApiError::Status {
            status: status.as_u16(),
            code: body.error.code.clone(),
            message: body.error.message.clone(),
            field: body.error.field.clone(),
            detail: Box::new(body.error),
        }),
        Err(_) => Err(ApiError::Status {
            status: status.as_u16(),
            code: status_code_name(status),
            message: format!(
                "{} answered {}: {}",
                url,
                status,
                String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
            ),
            field: None,
            detail: Box::new(ErrorDetail {
                code: status_code_name(status),
                message: String::new(),
                field: None,
                key_rejection: None,
                explanation: None,
            }),
        }),
    }
}

fn status_code_name(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("error")
        .to_lowercase()
        .replace(' ', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_a_usable_certificate_is_refused_naming_it() {
        let dir = std::env::temp_dir().join(format!("leasehold-api-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let check = |name: &str, contents: &[u8], problem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            let error = ServerTrust::pinned_ca_file(&path).unwrap_err().to_string();
            assert!(
                error.contains(&path.display().to_string()) && error.contains(problem),
                "{error}"
            );
        };
        check("empty.pem", b"", "no PEM certificate");
        check(
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "no PEM certificate",
        );
        check(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "not a usable CA certificate",
        );
        let missing = ServerTrust::pinned_ca_file(&dir.join("missing.pem")).unwrap_err();
        assert!(missing.to_string().contains("cannot read it"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
