//! The test harness: the real service on a free port, real HTTPS receivers whose CA the
//! test makes, and small helpers to speak HTTP to both.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use vignetim_webhooks::delivery::Resolver;
use vignetim_webhooks::domain::url_policy::AllowList;
use vignetim_webhooks::{Application, Config};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A certificate authority made for this test process, and a leaf it signed for
/// 127.0.0.1 and `receiver.test`.
pub struct TestPki {
    pub ca_pem: String,
    pub leaf_cert_pem: String,
    pub leaf_key_pem: String,
}

fn make_pki(names: Vec<String>) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Vignetim test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_params = CertificateParams::new(names).expect("leaf params");
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    TestPki {
        ca_pem: ca_cert.pem(),
        leaf_cert_pem: leaf_cert.pem(),
        leaf_key_pem: leaf_key.serialize_pem(),
    }
}

/// The CA every test service trusts (through `extra_roots_pem`, as
/// `VIGNETIM_EXTRA_CA_FILE` would give it).
pub fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| make_pki(vec!["127.0.0.1".into(), "receiver.test".into()]))
}

/// Another CA, trusted by nobody: for the "untrusted certificate" case.
pub fn rogue_pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| make_pki(vec!["127.0.0.1".into()]))
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A resolver the test controls: names map to whatever addresses the test sets.
#[derive(Default, Clone)]
pub struct MapResolver(pub Arc<Mutex<HashMap<String, Vec<IpAddr>>>>);

impl MapResolver {
    pub fn set(&self, name: &str, ips: &[&str]) {
        let ips = ips.iter().map(|s| s.parse().expect("ip")).collect();
        self.0.lock().expect("lock").insert(name.to_owned(), ips);
    }
}

impl Resolver for MapResolver {
    fn lookup(
        &self,
        host: &str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
        let found = self.0.lock().expect("lock").get(host).cloned();
        Box::pin(async move {
            found.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such host"))
        })
    }
}

/// The real service, started in-process on a free port.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub data_dir: PathBuf,
    pub resolver: MapResolver,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestApp {
    /// Loopback allowed (as `VIGNETIM_ALLOW_PRIVATE_CIDRS=127.0.0.0/8`), the test CA
    /// trusted, an admin token set.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> Self {
        install_crypto();
        let dir = tempfile::tempdir().expect("tempdir");
        let resolver = MapResolver::default();
        let mut config = Config::with_data_dir(dir.path().join("data"));
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.admin_token = Some(vignetim_webhooks::config::SecretString::new(ADMIN_TOKEN));
        config.allow_list = AllowList::parse("127.0.0.0/8").expect("cidr");
        config.extra_roots_pem = Some(pki().ca_pem.clone().into_bytes());
        config.resolver = Arc::new(resolver.clone());
        tweak(&mut config);
        let data_dir = config.store.data_dir.clone();
        let app = Application::build(config).await.expect("service starts");
        let base = format!("http://{}", app.local_addr());
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        Self {
            base,
            http,
            data_dir,
            resolver,
            _dir: dir,
            shutdown,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `GET /metrics`, the Prometheus text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text")
    }

    /// Creates an organization through the admin API; returns its id.
    pub async fn create_org(&self) -> String {
        let response = self
            .http
            .post(self.url("/admin/organizations"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"name": "Acme Travel"}))
            .send()
            .await
            .expect("send");
        let (status, body) = read(response).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Creates an API key through the admin API; returns the key.
    pub async fn create_key(&self, org: &str, environment: &str) -> String {
        let response = self
            .http
            .post(self.url(&format!("/admin/organizations/{org}/api-keys")))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"environment": environment}))
            .send()
            .await
            .expect("send");
        let (status, body) = read(response).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["key"].as_str().expect("key").to_owned()
    }

    /// A new organization with a sandbox key.
    pub async fn customer(&self) -> Customer {
        let org = self.create_org().await;
        let key = self.create_key(&org, "sandbox").await;
        Customer {
            http: self.http.clone(),
            base: self.base.clone(),
            key,
            org,
        }
    }

    /// `POST /admin/events` (sandbox); returns status and body.
    pub async fn publish_raw(&self, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url("/admin/events"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("send");
        read(response).await
    }

    /// Publishes an event for `customer`'s organization (sandbox), expecting 202;
    /// returns the body `{id, deliveries}`.
    pub async fn publish(&self, customer: &Customer, event_type: &str, data: Value) -> Value {
        let (status, body) = self
            .publish_raw(json!({
                "organizationId": customer.org,
                "environment": "sandbox",
                "type": event_type,
                "data": data,
            }))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body
    }
}

/// An API-key holder speaking to the service.
#[derive(Clone)]
pub struct Customer {
    pub http: reqwest::Client,
    pub base: String,
    pub key: String,
    /// The organization the key belongs to.
    pub org: String,
}

impl Customer {
    pub fn with_key(&self, key: &str) -> Self {
        Self {
            key: key.to_owned(),
            ..self.clone()
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        read(request.send().await.expect("send")).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// Creates a webhook to `url`, expecting 201; returns the whole response body.
    pub async fn create_webhook(&self, url: &str) -> Value {
        let (status, body) = self
            .post(
                "/webhooks",
                json!({"url": url, "events": ["order.completed", "order.failed"], "description": "Production order notifications"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Creates a webhook to `url`; returns its id.
    pub async fn create_webhook_id(&self, url: &str) -> String {
        self.create_webhook(url).await["id"]
            .as_str()
            .expect("id")
            .to_owned()
    }

    /// Sends a test call for `id`, expecting 200; returns its body.
    pub async fn test_webhook(&self, id: &str) -> Value {
        let (status, body) = self
            .call(reqwest::Method::POST, &format!("/webhooks/{id}/test"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

/// Status and JSON body (Null for an empty body; a non-JSON body fails the test, since
/// every response of the service is JSON or empty).
pub async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    if bytes.is_empty() {
        return (status, Value::Null);
    }
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("non-JSON body: {}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

/// A TLS listener on a free local port with `pki`'s leaf certificate, offering `alpn`.
async fn tls_endpoint(
    pki: &TestPki,
    alpn: &[&[u8]],
) -> (tokio_rustls::TlsAcceptor, tokio::net::TcpListener, u16) {
    install_crypto();
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_slice(pki.leaf_cert_pem.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(pki.leaf_key_pem.as_bytes()).expect("key");
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("tls config");
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        listener,
        port,
    )
}

/// An HTTPS endpoint that answers every connection with `answer`, byte for byte, whatever
/// it was sent (HTTP/1.1 by ALPN), then closes: for answers no HTTP server would give.
pub async fn raw_receiver(answer: Vec<u8>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (acceptor, listener, port) = tls_endpoint(pki(), &[b"http/1.1"]).await;
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, answer) = (acceptor.clone(), Arc::clone(&answer));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = [0u8; 16 * 1024];
                let _ = tls.read(&mut request).await;
                let _ = tls.write_all(&answer).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

/// How a receiver answers.
#[derive(Debug, Clone)]
pub enum Respond {
    Status(u16, &'static str),
    /// Accept the request and never answer.
    Hang,
    /// 302 to this location.
    Redirect(String),
    /// A 2xx or other status with an endless body.
    Endless(u16),
    /// The status and one chunk of body, then nothing more, ever.
    StallBody(u16),
    /// This status with a `Retry-After` header of this value.
    RetryAfter(u16, &'static str),
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: reqwest::header::HeaderMap,
    pub body: Bytes,
}

/// A real HTTPS receiver on 127.0.0.1 with a certificate from the test CA.
#[derive(Clone)]
pub struct TestReceiver {
    pub port: u16,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub respond: Arc<Mutex<Respond>>,
    /// Connections that completed their TLS handshake.
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// Whether a receiver keeps connections open between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    Yes,
    /// HTTP/1.1 only, one request per connection: every attempt is a new connection.
    No,
}

impl TestReceiver {
    pub async fn start() -> Self {
        Self::start_with(pki(), KeepAlive::Yes).await
    }

    pub async fn start_with(pki: &TestPki, keep_alive: KeepAlive) -> Self {
        let alpn: &[&[u8]] = match keep_alive {
            KeepAlive::Yes => &[b"h2", b"http/1.1"],
            KeepAlive::No => &[b"http/1.1"],
        };
        let (acceptor, listener, port) = tls_endpoint(pki, alpn).await;
        let receiver = Self {
            port,
            received: Arc::default(),
            respond: Arc::new(Mutex::new(Respond::Status(200, "ok"))),
            connections: Arc::default(),
        };
        let shared = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    shared
                        .connections
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { shared.handle(req).await }
                    });
                    let mut builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    builder.http1().keep_alive(keep_alive == KeepAlive::Yes);
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        receiver
    }

    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<ReceiverBody>, std::convert::Infallible> {
        let (parts, body) = req.into_parts();
        // A request cut off mid-body (its sender was killed) was never received. Over
        // HTTP/2 a dead connection can end the body early without an error, so the length
        // is checked against the sender's Content-Length too.
        let declared: Option<usize> = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let complete = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .ok()
            .filter(|b| declared.is_none_or(|n| n == b.len()));
        let Some(body) = complete else {
            return Ok(hyper::Response::builder()
                .status(400)
                .body(ReceiverBody::Full(Full::new(Bytes::new())))
                .expect("response"));
        };
        self.received.lock().expect("lock").push(Received {
            headers: parts.headers,
            body,
        });
        let respond = self.respond.lock().expect("lock").clone();
        let full = |status: u16, text: &'static str| {
            hyper::Response::builder()
                .status(status)
                .body(ReceiverBody::Full(Full::new(Bytes::from_static(
                    text.as_bytes(),
                ))))
                .expect("response")
        };
        Ok(match respond {
            Respond::Status(status, text) => full(status, text),
            Respond::Hang => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Respond::Redirect(location) => hyper::Response::builder()
                .status(302)
                .header("location", location)
                .body(ReceiverBody::Full(Full::new(Bytes::new())))
                .expect("response"),
            Respond::Endless(status) => {
                let chunks = futures_util::stream::repeat_with(|| {
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![
                        b'x';
                        16 * 1024
                    ])))
                });
                hyper::Response::builder()
                    .status(status)
                    .body(ReceiverBody::Stream(StreamBody::new(Box::pin(chunks))))
                    .expect("response")
            }
            Respond::RetryAfter(status, value) => hyper::Response::builder()
                .status(status)
                .header("retry-after", value)
                .body(ReceiverBody::Full(Full::new(Bytes::new())))
                .expect("response"),
            Respond::StallBody(status) => {
                use futures_util::StreamExt;
                let chunks = futures_util::stream::once(async {
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"partial")))
                })
                .chain(futures_util::stream::pending());
                hyper::Response::builder()
                    .status(status)
                    .body(ReceiverBody::Stream(StreamBody::new(Box::pin(chunks))))
                    .expect("response")
            }
        })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/webhooks/vignetim", self.port)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Connections opened to it so far (TLS handshakes completed).
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set(&self, respond: Respond) {
        *self.respond.lock().expect("lock") = respond;
    }
}

type FrameStream = Pin<
    Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Send>,
>;

/// A receiver's response body: fixed, or an endless stream.
pub enum ReceiverBody {
    Full(Full<Bytes>),
    Stream(StreamBody<FrameStream>),
}

impl hyper::body::Body for ReceiverBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReceiverBody::Full(b) => Pin::new(b).poll_frame(cx),
            ReceiverBody::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }
}

/// Waits until `check` holds, failing after `deadline` with what `check` last saw.
pub async fn eventually<T, F, Fut>(deadline: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Checks a delivered request's signature against `secret_whs` (independent HMAC) and
/// with the official Standard Webhooks library; panics with the reason if it fails.
pub fn assert_signed_by(request: &Received, secret_whs: &str) {
    use base64::Engine;
    let key = hex::decode(&secret_whs[4..]).expect("hex secret");
    let whsec = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(&key)
    );
    let wh = standardwebhooks::Webhook::new(&whsec).expect("official lib takes the key");
    let mut headers = http::HeaderMap::new();
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        headers.insert(name, request.headers[name].clone());
    }
    if let Err(e) = wh.verify(&request.body, &headers) {
        panic!(
            "official library does not verify ({e:?}): headers {:?}, body {:?}",
            headers,
            String::from_utf8_lossy(&request.body)
        );
    }
}

/// Rows of a query on a test service's database, opened read-only beside the service.
pub fn db_rows<T>(
    data_dir: &std::path::Path,
    sql: &str,
    params: impl rusqlite::Params,
    row: impl FnMut(&rusqlite::Row) -> rusqlite::Result<T>,
) -> Vec<T> {
    let db = rusqlite::Connection::open_with_flags(
        data_dir.join("vignetim.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open db");
    db.prepare(sql)
        .expect("prepare")
        .query_map(params, row)
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}
