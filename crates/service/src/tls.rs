//! TLS for the servers (broker, agent, image store): a certificate and key
//! from PEM files (`--tls-cert/--tls-key`), or issued by a local CA that
//! `leasehold up` keeps in its data directory. Clients pin that CA's
//! certificate (`--ca-cert`), so a certificate from any other CA, public
//! ones included, is refused.

use leasehold_store::private_fs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What can go wrong setting up TLS. Messages name the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("{path}: {reason}")]
    Key { path: String, reason: String },
    /// A key file or the CA's directory that is not private, or unreadable.
    #[error("{0}")]
    Private(#[from] private_fs::PrivateFsError),
    #[error("the local CA in {dir}: {reason}")]
    LocalCa { dir: String, reason: String },
}

/// A server's TLS identity: its certificate chain and key, ready to accept
/// connections. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Reads a PEM certificate chain (leaf first) and its PEM private key.
    /// The key file must be private (0600, ours), like every other secret.
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let certificate_pem = std::fs::read(cert_path).map_err(|e| TlsError::Certificate {
            path: cert_path.display().to_string(),
            reason: format!("cannot read it: {e}"),
        })?;
        let key_pem = private_fs::read_private_file(key_path)?;
        Self::from_pem(
            &certificate_pem,
            &cert_path.display().to_string(),
            key_pem.as_bytes(),
            &key_path.display().to_string(),
        )
    }

    /// Builds the identity from PEM text; `cert_name` and `key_name` name
    /// where the text came from, for error messages.
    pub fn from_pem(
        certificate_pem: &[u8],
        cert_name: &str,
        key_pem: &[u8],
        key_name: &str,
    ) -> Result<Self, TlsError> {
        let certificate_error = |reason: String| TlsError::Certificate {
            path: cert_name.to_string(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(certificate_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| certificate_error(format!("not a PEM certificate: {e}")))?;
        if chain.is_empty() {
            return Err(certificate_error(
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key {
            path: key_name.to_string(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| certificate_error(e.to_string()))?
            .with_no_client_auth()
            // Also checks that the key belongs to the certificate.
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Key {
                path: key_name.to_string(),
                reason: format!("cannot serve {cert_name} with it: {e}"),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The TLS handshake, bounded by `deadline`: a client that connects and
    /// never finishes a handshake is dropped like one that never sends its
    /// headers. `None` when the handshake failed (a plain HTTP client, a
    /// client that does not trust us) or timed out: the client's business.
    pub(crate) async fn accept(
        &self,
        stream: tokio::net::TcpStream,
        deadline: std::time::Duration,
    ) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let handshake = async {
            if !starts_with_tls_handshake(&stream).await {
                refuse_plain_http(stream).await;
                return None;
            }
            match self.acceptor.accept(stream).await {
                Ok(stream) => Some(stream),
                Err(error) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    None
                }
            }
        };
        tokio::time::timeout(deadline, handshake)
            .await
            .ok()
            .flatten()
    }
}

/// Whether the client's first byte opens a TLS handshake record (0x16); a
/// plain HTTP request starts with a method's letter instead.
async fn starts_with_tls_handshake(stream: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16)
}

/// Answers a plain HTTP client with a 400 that says to use https, so it
/// does not see a garbled TLS alert, then closes. What it sent is drained
/// (at most 64 KiB, within the caller's deadline) rather than read: closing
/// with unread bytes would reset the connection before the client reads
/// the answer.
async fn refuse_plain_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_string(&leasehold_api::ErrorBody {
        error: leasehold_api::ErrorDetail {
            code: "tls_required".into(),
            message: "this server speaks TLS only: use an https:// URL".into(),
            field: None,
            key_rejection: None,
            explanation: None,
        },
    })
    .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
    let mut drained = [0u8; 4096];
    let mut left_bytes: usize = 64 * 1024;
    while left_bytes > 0 {
        match stream.read(&mut drained).await {
            Ok(0) | Err(_) => break,
            Ok(n) => left_bytes = left_bytes.saturating_sub(n),
        }
    }
}

/// Whether plain HTTP may be served on `address` without asking: only on
/// loopback (127.0.0.0/8, ::1, and ::ffff:127.0.0.0/104), which no other
/// machine reaches.
pub fn is_loopback(address: &SocketAddr) -> bool {
    match address.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The common name of a local CA, made of its public key so that two data
/// directories' CAs never share a name (and a regenerated certificate for
/// the same key has the same one).
fn local_ca_name(key: &rcgen::KeyPair) -> String {
    let raw = key.public_key_raw();
    let tag: String = raw
        .iter()
        .skip(1)
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("leasehold local CA {tag}")
}

/// A certificate authority private to one `leasehold up` data directory:
/// `tls/ca.pem` (the certificate clients pin with `--ca-cert`) and
/// `tls/ca.key` (0600, never printed). Made once, used on every start.
pub struct LocalCa {
    certificate: rcgen::Certificate,
    key: rcgen::KeyPair,
    certificate_path: PathBuf,
}

impl LocalCa {
    /// Opens the CA in `dir` (0700), creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        private_fs::ensure_private_dir(dir)?;
        let certificate_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        let ca_error = |reason: String| TlsError::LocalCa {
            dir: dir.display().to_string(),
            reason,
        };
        let key = if key_path.exists() {
            let pem = private_fs::read_private_file(&key_path)?;
            rcgen::KeyPair::from_pem(&pem)
                .map_err(|e| ca_error(format!("ca.key is not a usable key: {e}")))?
        } else {
            let key = rcgen::KeyPair::generate().map_err(|e| ca_error(e.to_string()))?;
            private_fs::write_private_file(&key_path, key.serialize_pem().as_bytes())?;
            key
        };
        // The certificate is made again from the key on every start: what
        // signs a server certificate is the key and the name, which are the
        // same, so certificates it issues verify against the ca.pem on disk.
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, local_ca_name(&key));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let certificate = params
            .self_signed(&key)
            .map_err(|e| ca_error(e.to_string()))?;
        if !certificate_path.exists() {
            private_fs::write_private_file(&certificate_path, certificate.pem().as_bytes())?;
        }
        Ok(LocalCa {
            certificate,
            key,
            certificate_path,
        })
    }

    /// Where the CA's certificate is: what clients give as `--ca-cert`.
    pub fn certificate_path(&self) -> &Path {
        &self.certificate_path
    }

    /// A server identity for `addresses` (as IP names), `dns_names` and
    /// `localhost`, signed by this CA. Its key lives only in memory: it is
    /// issued again on every start.
    pub fn issue_server_tls(
        &self,
        addresses: &[IpAddr],
        dns_names: &[String],
    ) -> Result<ServerTls, TlsError> {
        let ca_error = |reason: String| TlsError::LocalCa {
            dir: self.certificate_path.display().to_string(),
            reason,
        };
        let mut names = vec!["localhost".to_string()];
        names.extend(dns_names.iter().filter(|n| *n != "localhost").cloned());
        let mut params =
            rcgen::CertificateParams::new(names).map_err(|e| ca_error(e.to_string()))?;
        for address in addresses {
            let name = rcgen::SanType::IpAddress(*address);
            if !params.subject_alt_names.contains(&name) {
                params.subject_alt_names.push(name);
            }
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "leasehold server");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().map_err(|e| ca_error(e.to_string()))?;
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .map_err(|e| ca_error(e.to_string()))?;
        ServerTls::from_pem(
            certificate.pem().as_bytes(),
            "the server certificate issued by the local CA",
            key.serialize_pem().as_bytes(),
            "its key",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A TLS server on 127.0.0.1:0 answering `GET /` with "ok".
    async fn serve_tls(
        tls: ServerTls,
        limits: crate::ServeLimits,
    ) -> (crate::ServerHandle, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = crate::ServerHandle::spawn_with_tls(listener, router, limits, Some(tls));
        (server, address)
    }

    /// A TLS client that trusts exactly the certificates in `ca_pem`.
    fn pinned_connector(ca_pem: &[u8]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(certificate.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Connects over TLS pinned to `ca_pem` and asks `GET /`.
    async fn get_over_tls(address: SocketAddr, ca_pem: &[u8]) -> std::io::Result<String> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
        let mut stream = pinned_connector(ca_pem).connect(name, stream).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test]
    async fn a_reloaded_local_ca_issues_certificates_that_verify_against_its_pem_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let first = LocalCa::load_or_create(&tls_dir).unwrap();
        let ca_pem = std::fs::read(first.certificate_path()).unwrap();
        // The second start reads the CA back instead of making a new one.
        let again = LocalCa::load_or_create(&tls_dir).unwrap();
        assert_eq!(std::fs::read(again.certificate_path()).unwrap(), ca_pem);
        for file in ["ca.key", "ca.pem"] {
            let mode = std::fs::metadata(tls_dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let tls = again.issue_server_tls(&[LOCALHOST], &[]).unwrap();
        let (server, address) = serve_tls(tls, crate::ServeLimits::default()).await;
        let answer = get_over_tls(address, &ca_pem).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_client_pinned_to_another_ca_refuses_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let ours = LocalCa::load_or_create(&dir.path().join("ours")).unwrap();
        let theirs = LocalCa::load_or_create(&dir.path().join("theirs")).unwrap();
        let tls = ours.issue_server_tls(&[LOCALHOST], &[]).unwrap();
        let (server, address) = serve_tls(tls, crate::ServeLimits::default()).await;
        let other_pem = std::fs::read(theirs.certificate_path()).unwrap();
        let error = get_over_tls(address, &other_pem).await.unwrap_err();
        assert!(
            error.to_string().contains("invalid peer certificate"),
            "{error}"
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_client_that_never_handshakes_is_dropped_after_the_header_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&dir.path().join("tls")).unwrap();
        let limits = crate::ServeLimits {
            header_read_timeout: std::time::Duration::from_millis(200),
            max_connections: 1,
            ..crate::ServeLimits::default()
        };
        let tls = ca.issue_server_tls(&[LOCALHOST], &[]).unwrap();
        let (server, address) = serve_tls(tls, limits).await;
        // Connects and sends nothing, holding the only connection slot: if
        // the handshake had no deadline, it would hold it forever.
        let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            silent.read_to_end(&mut received),
        )
        .await
        .expect("the server closed the silent connection")
        .ok();
        assert!(received.is_empty(), "{received:?}");
        // The slot is free again: a real client is served.
        let ca_pem = std::fs::read(ca.certificate_path()).unwrap();
        let answer = get_over_tls(address, &ca_pem).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_client_that_never_handshakes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&dir.path().join("tls")).unwrap();
        let limits = crate::ServeLimits {
            header_read_timeout: std::time::Duration::from_secs(60),
            ..crate::ServeLimits::default()
        };
        let tls = ca.issue_server_tls(&[LOCALHOST], &[]).unwrap();
        let (server, address) = serve_tls(tls, limits).await;
        let _silent = tokio::net::TcpStream::connect(address).await.unwrap();
        // Connections are accepted in order: once this one is answered, the
        // silent one is in its handshake.
        let ca_pem = std::fs::read(ca.certificate_path()).unwrap();
        get_over_tls(address, &ca_pem).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server.shutdown())
            .await
            .expect("shutdown did not wait for the handshake's 60 s timeout");
    }

    #[tokio::test]
    async fn plain_http_to_a_tls_port_is_told_to_use_https_and_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&dir.path().join("tls")).unwrap();
        let tls = ca.issue_server_tls(&[LOCALHOST], &[]).unwrap();
        let (server, address) = serve_tls(tls, crate::ServeLimits::default()).await;
        let mut plain = tokio::net::TcpStream::connect(address).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            plain.read_to_end(&mut received),
        )
        .await
        .expect("the server closed the plain connection")
        .ok();
        let text = String::from_utf8_lossy(&received);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(
            text.contains("tls_required") && text.contains("https://"),
            "{text}"
        );
        server.shutdown().await;
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let certificate = params.self_signed(&key).unwrap();
        let cert_path = dir.path().join("server.pem");
        let key_path = dir.path().join("server.key");
        std::fs::write(&cert_path, certificate.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = ServerTls::from_pem_files(&cert_path, &key_path).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("chmod 600"), "{message}");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        ServerTls::from_pem_files(&cert_path, &key_path).unwrap();
        // A key that is not the certificate's is refused, naming the key.
        let stranger = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key_path, stranger.serialize_pem()).unwrap();
        let error = ServerTls::from_pem_files(&cert_path, &key_path).unwrap_err();
        assert!(error.to_string().contains("server.key"), "{error}");
    }

    #[test]
    fn only_loopback_addresses_count_as_loopback() {
        let check = |text: &str, expected: bool| {
            let address: SocketAddr = text.parse().unwrap();
            assert_eq!(is_loopback(&address), expected, "{text}");
        };
        check("127.0.0.1:7070", true);
        check("127.9.8.7:0", true);
        check("[::1]:7070", true);
        check("[::ffff:127.0.0.1]:7070", true);
        check("0.0.0.0:7070", false);
        check("[::]:7070", false);
        check("10.0.0.1:7070", false);
        check("[::ffff:10.0.0.1]:7070", false);
    }
}
