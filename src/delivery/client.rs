//! The guarded HTTP client: the only way the service talks to the outside world.
//!
//! Defences, each against a known bypass:
//! - IP-literal hosts are checked here, because HTTP clients never ask a resolver about
//!   them;
//! - host names are resolved by [`GuardedResolver`], which refuses the name when *any*
//!   answer is non-public and hands the client exactly the addresses it checked, so the
//!   connection goes to a checked address (no validate-then-fetch window);
//! - redirects are not followed, no proxy is taken from the environment, no
//!   `Accept-Encoding` is sent (no decompression bombs);
//! - one overall time limit covers connect, TLS, request and response;
//! - at most [`MAX_RESPONSE_BODY`] bytes of the response are read, and nothing of it is
//!   ever returned to an API caller by this module's users.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue, InvalidHeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;

use super::endpoints::{Counting, Endpoint, Endpoints};
use crate::domain::retry::parse_retry_after;
use crate::domain::url_policy::{AllowList, BlockReason, WebhookUrl, check_ip};

/// How much of a response body is read and kept.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Turns a host name into addresses. Injectable so tests can make a name resolve to
/// whatever they need (e.g. a name that turns into loopback after creation).
pub trait Resolver: Send + Sync + 'static {
    fn lookup(
        &self,
        host: &str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;
}

/// The operating system's resolver (`getaddrinfo`, so `/etc/hosts` is honoured).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(
        &self,
        host: &str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// A name resolved to an address the policy refuses.
#[derive(Debug)]
struct Blocked {
    ip: IpAddr,
    reason: BlockReason,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "address {} is {}", self.ip, self.reason)
    }
}
impl StdError for Blocked {}

/// A name that did not resolve.
#[derive(Debug)]
struct DnsFailure(String);

impl fmt::Display for DnsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "could not resolve host: {}", self.0)
    }
}
impl StdError for DnsFailure {}

/// The connector's resolver: resolve, check every answer, return only checked addresses.
/// (hyper-util's connector asks it only about names: IP-literal hosts never reach it.)
#[derive(Clone)]
struct GuardedResolver {
    inner: Arc<dyn Resolver>,
    allow: AllowList,
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, BoxError>> + Send>>;
type BoxError = Box<dyn StdError + Send + Sync>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        let allow = self.allow.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = inner
                .lookup(&host)
                .await
                .map_err(|e| Box::new(DnsFailure(e.to_string())) as BoxError)?;
            if ips.is_empty() {
                return Err(Box::new(DnsFailure("no addresses".to_owned())) as _);
            }
            // Fail closed: one non-public answer refuses the whole name, so a receiver
            // cannot mix a public and a private address and hope for the private one.
            for ip in &ips {
                if let Err(reason) = check_ip(*ip, &allow) {
                    return Err(Box::new(Blocked { ip: *ip, reason }) as _);
                }
            }
            // The connector puts the URL's port on each address.
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(addrs.into_iter())
        })
    }
}

/// Why an attempt failed. The names are the delivery log's failure classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    Dns,
    Connect,
    Tls,
    Timeout,
    HttpStatus,
    BlockedAddress,
    ResponseTooLarge,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Dns => "dns",
            FailureClass::Connect => "connect",
            FailureClass::Tls => "tls",
            FailureClass::Timeout => "timeout",
            FailureClass::HttpStatus => "http_status",
            FailureClass::BlockedAddress => "blocked_address",
            FailureClass::ResponseTooLarge => "response_too_large",
        }
    }
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The HTTP status, if a response arrived.
    pub status: Option<u16>,
    /// `None` exactly when the attempt succeeded (a 2xx arrived in time).
    pub failure: Option<FailureClass>,
    /// Why no response came (a transport failure), for our own logs; never shown to API
    /// callers verbatim. Empty when a response arrived: its status says it.
    pub detail: String,
    /// At most [`MAX_RESPONSE_BODY`] bytes.
    pub body: Vec<u8>,
    pub elapsed: Duration,
    /// The receiver's `Retry-After` (seconds or an HTTP date), when it sent one.
    pub retry_after: Option<Duration>,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }

    /// The attempt as the delivery log keeps it.
    pub fn into_record(
        self,
        attempted_at: crate::domain::time::EpochMillis,
    ) -> crate::store::AttemptRecord {
        crate::store::AttemptRecord {
            attempted_at,
            response_time_ms: i64::try_from(self.elapsed.as_millis()).unwrap_or(i64::MAX),
            status_code: self.status,
            failure: self.failure.map(|f| f.as_str().to_owned()),
            response_body: (!self.body.is_empty()).then_some(self.body),
        }
    }

    fn failed(class: FailureClass, detail: String, elapsed: Duration) -> Self {
        Self {
            status: None,
            failure: Some(class),
            detail,
            body: Vec::new(),
            elapsed,
            retry_after: None,
        }
    }
}

/// One signed request to send.
#[derive(Debug, Clone)]
pub struct Dispatch<'a> {
    pub url: &'a str,
    pub msg_id: &'a str,
    pub timestamp: i64,
    pub signature: String,
    pub body: bytes::Bytes,
}

/// Settings of the guarded client.
#[derive(Clone)]
pub struct ClientSettings {
    pub allow: AllowList,
    /// Extra trusted roots (PEM), for a local HTTPS receiver in development.
    pub extra_roots_pem: Option<Vec<u8>>,
    pub timeout: Duration,
    pub resolver: Arc<dyn Resolver>,
}

type Connector = Counting<hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>>;

/// See the module docs.
#[derive(Clone)]
pub struct GuardedClient {
    http: Client<Connector, RequestBody>,
    allow: AllowList,
    timeout: Duration,
    targets: Arc<Mutex<HashMap<String, Target>>>,
    /// Connections open per endpoint: while there are none, one attempt at a time
    /// connects (see `endpoints`).
    endpoints: Endpoints,
}

/// A stored URL as this client judged it: where to send, or why not. The judgement
/// depends only on the text and the client's allow-list, which never changes, so it is
/// made once per URL (parsing it on every attempt was 1.7 % of the service).
type Target = Result<(Uri, Arc<Endpoint>), String>;

/// URLs whose judgement is kept at most; past it the cache starts afresh.
const MAX_TARGETS: usize = 4096;

/// Building the client failed (bad extra CA file, TLS set-up).
#[derive(Debug, thiserror::Error)]
#[error("could not build the HTTP client: {0}")]
pub struct ClientBuildError(String);

/// The `User-Agent` of every delivery (the benchmark's bare client sends it too).
pub const USER_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("Vignetim-Webhooks/", env!("CARGO_PKG_VERSION")));
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

impl GuardedClient {
    pub fn new(settings: ClientSettings) -> Result<Self, ClientBuildError> {
        // One crypto provider for the process (ring); a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let extra_roots = match &settings.extra_roots_pem {
            None => Vec::new(),
            Some(pem) => {
                use rustls::pki_types::pem::PemObject;
                let certs = CertificateDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ClientBuildError(format!("extra CA file: {e}")))?;
                if certs.is_empty() {
                    return Err(ClientBuildError(
                        "extra CA file holds no certificate".to_owned(),
                    ));
                }
                certs
            }
        };
        // The platform's roots (and any extra ones), verified as the platform does.
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider.clone())
                .map_err(|e| ClientBuildError(format!("TLS roots: {e}")))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientBuildError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let mut tcp = HttpConnector::new_with_resolver(GuardedResolver {
            inner: settings.resolver,
            allow: settings.allow.clone(),
        });
        // https is checked by the URL policy and by the TLS layer below, not here.
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        // No total timeout on the client: `send` enforces one deadline itself, so that a
        // response whose status arrived is judged by it even if its body stalls.
        tcp.set_connect_timeout(Some(settings.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let endpoints = Endpoints::default();
        let connector = Counting::new(connector, endpoints.clone());
        // hyper-util's pooled client: keep-alive per endpoint, HTTP/2 when the receiver
        // offers it (ALPN), no redirects, no proxy, no decompression.
        let http = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self {
            http,
            allow: settings.allow,
            timeout: settings.timeout,
            targets: Arc::default(),
            endpoints,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one signed POST and classifies what happened. Never panics, never returns
    /// an error: every way an attempt can go wrong is an [`Outcome`].
    pub async fn send(&self, dispatch: Dispatch<'_>) -> Outcome {
        let started = Instant::now();
        let (uri, endpoint) = match self.target(dispatch.url) {
            Ok(target) => target,
            Err(e) => {
                return Outcome::failed(FailureClass::BlockedAddress, e, started.elapsed());
            }
        };
        let deadline = tokio::time::Instant::from_std(started) + self.timeout;
        let mut outcome = self.exchange(uri, &endpoint, dispatch, deadline).await;
        outcome.elapsed = started.elapsed();
        outcome
    }

    /// Where `url` sends to. The stored URL passed the policy when it was saved; it is
    /// checked again against this client's allow-list (which may differ from the one it
    /// was saved under). `WebhookUrl::parse` judges IP-literal hosts: they never reach
    /// the resolver, so this is their check. Names are checked at every connection.
    fn target(&self, url: &str) -> Target {
        if let Ok(targets) = self.targets.lock()
            && let Some(target) = targets.get(url)
        {
            return target.clone();
        }
        let target = WebhookUrl::parse(url, &self.allow)
            .map_err(|e| e.to_string())
            .and_then(|url| Uri::try_from(url.url().as_str()).map_err(|e| e.to_string()))
            .map(|uri| {
                let endpoint = self.endpoints.get(&uri);
                (uri, endpoint)
            });
        if let Ok(mut targets) = self.targets.lock() {
            if targets.len() >= MAX_TARGETS {
                targets.clear();
            }
            targets.insert(url.to_owned(), target.clone());
        }
        target
    }

    /// Sends and reads the answer, all before `deadline`: no status by then is a
    /// `timeout`; a body still arriving then is cut, and the status decides.
    async fn exchange(
        &self,
        uri: Uri,
        endpoint: &Arc<Endpoint>,
        dispatch: Dispatch<'_>,
        deadline: tokio::time::Instant,
    ) -> Outcome {
        let started = Instant::now();
        // Held until the attempt ends, when this attempt is the one connecting.
        let Ok(turn) = tokio::time::timeout_at(deadline, endpoint.turn()).await else {
            return Outcome::failed(
                FailureClass::Timeout,
                format!(
                    "not sent within {} ms: another attempt was still connecting to the endpoint",
                    self.timeout.as_millis()
                ),
                started.elapsed(),
            );
        };
        // The attempt that connects tells the endpoint when its request is taken.
        let connecting = turn.as_ref().map(|_| Arc::clone(endpoint));
        let request = match signed_request(uri, dispatch, connecting) {
            Ok(request) => request,
            Err(e) => {
                return Outcome::failed(FailureClass::Connect, e.to_string(), started.elapsed());
            }
        };
        let response = match tokio::time::timeout_at(deadline, self.http.request(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let (class, detail) = classify_error(&e);
                return Outcome::failed(class, detail, started.elapsed());
            }
            Err(_) => {
                return Outcome::failed(
                    FailureClass::Timeout,
                    format!("no response within {} ms", self.timeout.as_millis()),
                    started.elapsed(),
                );
            }
        };
        endpoint.answered();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        let mut incoming = response.into_body();
        let mut body = Vec::new();
        let mut truncated = false;
        // Read in frames and stop at the cap: an endless body costs at most 64 KiB.
        // A body that breaks off or stalls after the status line does not change the
        // verdict: the status already arrived.
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, incoming.frame()).await {
            let Ok(chunk) = frame.into_data() else {
                continue; // trailers
            };
            let room = MAX_RESPONSE_BODY - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let failure = if (200..300).contains(&status) {
            None
        } else if truncated {
            Some(FailureClass::ResponseTooLarge)
        } else {
            Some(FailureClass::HttpStatus)
        };
        Outcome {
            status: Some(status),
            failure,
            detail: String::new(),
            body,
            elapsed: started.elapsed(),
            retry_after,
        }
    }
}

/// The POST with the Standard Webhooks headers over the stored bytes. Built in place
/// rather than through `http`'s builder, which moves the request at every header and parses
/// each name again (1.7 % of the service at the benchmark's peak, with the header names).
fn signed_request(
    uri: Uri,
    dispatch: Dispatch<'_>,
    connecting: Option<Arc<Endpoint>>,
) -> Result<Request<RequestBody>, InvalidHeaderValue> {
    let mut request = Request::new(RequestBody {
        bytes: Full::new(dispatch.body),
        connecting,
    });
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.reserve(5);
    headers.insert(header::USER_AGENT, USER_AGENT);
    headers.insert(header::CONTENT_TYPE, JSON);
    headers.insert(WEBHOOK_ID, HeaderValue::from_str(dispatch.msg_id)?);
    headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(dispatch.timestamp));
    headers.insert(
        WEBHOOK_SIGNATURE,
        HeaderValue::try_from(dispatch.signature)?,
    );
    Ok(request)
}

/// A request's body: the stored bytes, and for the attempt that opens its endpoint's
/// connection, the endpoint to tell when hyper's connection task takes the request.
/// That task asks every request's body whether it is empty before anything else, and it
/// only gets requests through a connection hyper-util has pooled: from then on the
/// other attempts find the connection there (`endpoints`, module docs).
struct RequestBody {
    bytes: Full<Bytes>,
    connecting: Option<Arc<Endpoint>>,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.bytes).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        if let Some(endpoint) = &self.connecting {
            endpoint.taken();
        }
        self.bytes.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.bytes.size_hint()
    }
}

/// Maps a transport error to its failure class by walking the cause chain. The texts
/// carry no URL (a customer's URL may carry a token in its query): hyper-util's errors
/// never name it.
fn classify_error(error: &hyper_util::client::legacy::Error) -> (FailureClass, String) {
    let mut source: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(blocked) = e.downcast_ref::<Blocked>() {
            return (FailureClass::BlockedAddress, blocked.to_string());
        }
        if let Some(dns) = e.downcast_ref::<DnsFailure>() {
            return (FailureClass::Dns, dns.to_string());
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return (FailureClass::Tls, format!("TLS: {tls}"));
        }
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return (FailureClass::Timeout, "timed out".to_owned());
        }
        source = next_cause(e);
    }
    // Refused, reset, closed before a response: the endpoint could not be reached.
    (FailureClass::Connect, chain_text(error))
}

/// The next error in the chain. A custom `io::Error` reports its inner error's *source*
/// as its own, skipping the inner error itself (where rustls's error sits), so descend
/// through `get_ref` instead.
fn next_cause<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    match e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        Some(inner) => Some(inner as &(dyn StdError + 'static)),
        None => e.source(),
    }
}

fn chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = next_cause(error);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = next_cause(e);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(allow: &str) -> GuardedClient {
        GuardedClient::new(ClientSettings {
            allow: AllowList::parse(allow).expect("allow-list"),
            extra_roots_pem: None,
            timeout: Duration::from_secs(1),
            resolver: Arc::new(SystemResolver),
        })
        .expect("client")
    }

    #[test]
    fn a_stored_url_is_judged_by_the_clients_own_allow_list_every_time() {
        let strict = client("");
        let loopback = client("127.0.0.0/8");
        let url = "https://127.0.0.1:8443/hooks?t=1";
        // The same text, judged twice by each client (the second time from its cache).
        for _ in 0..2 {
            let refused = strict.target(url).expect_err("loopback is not public");
            assert!(refused.contains("127.0.0.1"), "{refused}");
            let (uri, _) = loopback.target(url).expect("allowed");
            assert_eq!(uri.to_string(), url);
        }
        assert!(strict.target("http://example.com/").is_err());
        assert!(strict.target("https://example.com/").is_ok());
    }
}
