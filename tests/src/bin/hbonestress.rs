//! `hbonestress`: a misbehaving HBONE client for the limits tests, run inside a pod.
//!
//! - `hold`: opens many TCP connections to an HBONE port (spread over several source
//!   addresses), sends the first bytes of a TLS record and never finishes the handshake;
//!   reports how many were opened and when the server closed them.
//! - `streams`: mutual TLS with a client certificate, then HTTP/2 CONNECT streams on several
//!   connections, held open; reports the statuses and stream errors the server answered.
//!   With `--header-bytes` each request carries one header value of that size.
//!
//! Output: one JSON object on stdout.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hold TLS handshakes open.
    Hold {
        /// HBONE address, ip:port.
        #[arg(long)]
        to: SocketAddr,
        /// Connections to open.
        #[arg(long)]
        conns: usize,
        /// Source addresses to spread them over (comma-separated; they must exist locally).
        #[arg(long, value_delimiter = ',')]
        from: Vec<IpAddr>,
        /// Seconds to hold them at most.
        #[arg(long)]
        secs: f64,
    },
    /// Open CONNECT streams with a client certificate.
    Streams {
        /// HBONE address, ip:port.
        #[arg(long)]
        to: SocketAddr,
        /// CONNECT authority, ip:port.
        #[arg(long)]
        authority: String,
        /// Client certificate chain (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Client key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// Connections.
        #[arg(long)]
        conns: usize,
        /// Streams per connection.
        #[arg(long)]
        streams: usize,
        /// Seconds to hold the streams open.
        #[arg(long)]
        secs: f64,
        /// Size of an `x-filler` header value on each request (0: none).
        #[arg(long, default_value_t = 0)]
        header_bytes: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = match cli.cmd {
        Cmd::Hold {
            to,
            conns,
            from,
            secs,
        } => rt.block_on(hold(to, conns, from, Duration::from_secs_f64(secs)))?,
        Cmd::Streams {
            to,
            authority,
            cert,
            key,
            conns,
            streams,
            secs,
            header_bytes,
        } => {
            let tls = client_config(&cert, &key)?;
            let spec = StreamSpec {
                to,
                authority,
                streams,
                hold: Duration::from_secs_f64(secs),
                header_bytes,
            };
            rt.block_on(streams_cmd(tls, spec, conns))?
        }
    };
    println!("{out}");
    Ok(())
}

/// The start of a TLS handshake record (type 22, TLS 1.0 record version, 512 bytes announced)
/// and a few of those bytes: the server waits for the rest.
const PARTIAL_CLIENT_HELLO: [u8; 9] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

async fn hold(to: SocketAddr, conns: usize, from: Vec<IpAddr>, secs: Duration) -> Result<String> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    let mut connect_failed = 0usize;
    for i in 0..conns {
        let sock = TcpSocket::new_v4()?;
        if let Some(ip) = from.get(i % from.len().max(1)) {
            sock.bind(SocketAddr::new(*ip, 0))
                .with_context(|| format!("bind {ip}"))?;
        }
        match tokio::time::timeout(Duration::from_secs(5), sock.connect(to)).await {
            Ok(Ok(mut tcp)) => {
                let _ = tcp.write_all(&PARTIAL_CLIENT_HELLO).await;
                tasks.push(tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    let read = tokio::time::timeout(secs, async {
                        loop {
                            match tcp.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    read.is_ok().then(|| start.elapsed().as_millis() as u64)
                }));
            }
            _ => connect_failed += 1,
        }
    }
    let opened = tasks.len();
    let mut closed_at = Vec::new();
    for t in tasks {
        if let Ok(Some(ms)) = t.await {
            closed_at.push(ms);
        }
    }
    closed_at.sort_unstable();
    let median = closed_at.get(closed_at.len() / 2).copied();
    Ok(serde_json::json!({
        "opened": opened,
        "connect_failed": connect_failed,
        "closed_by_server": closed_at.len(),
        "median_close_ms": median,
    })
    .to_string())
}

struct StreamSpec {
    to: SocketAddr,
    authority: String,
    streams: usize,
    hold: Duration,
    header_bytes: usize,
}

/// Outcome counts: `"200"`, `"429"`, ..., or `"reset:<reason>"`, `"error:<kind>"`.
type Tally = BTreeMap<String, usize>;

async fn streams_cmd(
    tls: Arc<rustls::ClientConfig>,
    spec: StreamSpec,
    conns: usize,
) -> Result<String> {
    let spec = Arc::new(spec);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(one_connection(tls.clone(), spec.clone())));
    }
    let mut tally = Tally::new();
    let mut conn_errors = Tally::new();
    for t in tasks {
        match t.await {
            Ok(Ok(t)) => {
                for (k, v) in t {
                    *tally.entry(k).or_default() += v;
                }
            }
            Ok(Err(e)) => *conn_errors.entry(format!("{e:#}")).or_default() += 1,
            Err(e) => *conn_errors.entry(e.to_string()).or_default() += 1,
        }
    }
    Ok(serde_json::json!({ "streams": tally, "connection_errors": conn_errors }).to_string())
}

async fn one_connection(tls: Arc<rustls::ClientConfig>, spec: Arc<StreamSpec>) -> Result<Tally> {
    let tcp = TcpStream::connect(spec.to).await.context("connect")?;
    let name = ServerName::IpAddress(spec.to.ip().into());
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS")?;
    let (client, conn) = h2::client::Builder::new()
        .max_header_list_size(1 << 24)
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake")?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut tasks = Vec::new();
    for _ in 0..spec.streams {
        let (mut client, spec) = (client.clone(), spec.clone());
        tasks.push(tokio::spawn(async move {
            let mut req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(spec.authority.as_str());
            if spec.header_bytes > 0 {
                req = req.header("x-filler", "a".repeat(spec.header_bytes));
            }
            let req = match req.body(()) {
                Ok(r) => r,
                Err(e) => return format!("error:request:{e}"),
            };
            client = match client.ready().await {
                Ok(c) => c,
                Err(e) => return outcome(&e),
            };
            let (resp, _send) = match client.send_request(req, false) {
                Ok(x) => x,
                Err(e) => return outcome(&e),
            };
            let resp = match resp.await {
                Ok(r) => r,
                Err(e) => return outcome(&e),
            };
            let status = resp.status().as_u16().to_string();
            if status == "200" {
                // Hold the stream (and the server's descriptor to the pod) open.
                tokio::time::sleep(spec.hold).await;
            }
            drop((resp, _send));
            status
        }));
    }
    let mut tally = Tally::new();
    for t in tasks {
        let key = t.await.unwrap_or_else(|e| format!("error:task:{e}"));
        *tally.entry(key).or_default() += 1;
    }
    driver.abort();
    Ok(tally)
}

fn outcome(e: &h2::Error) -> String {
    match e.reason() {
        Some(r) => format!("reset:{r:?}"),
        None => "error:connection".to_string(),
    }
}

fn client_config(cert: &PathBuf, key: &PathBuf) -> Result<Arc<rustls::ClientConfig>> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
            .collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))?
            .context("no private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts any server certificate: the tests attack the server, they do not check it.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
