//! One connection first: the guarded client's connections counted per endpoint, so that
//! a burst to an endpoint with none opens one, not one per attempt.
//!
//! hyper-util's pool cannot know before the TLS handshake whether an endpoint speaks
//! HTTP/2 (ALPN says so), so every request that finds no pooled connection starts its
//! own; once the first handshake reports HTTP/2, the others are thrown away. A burst of
//! 16 attempts to an idle endpoint cost 16 TCP and TLS handshakes against the customer's
//! server, and its first deliveries waited for all of them: in the benchmark, 40–150
//! handshakes and about 100 ms before the first delivery arrived (BENCHMARKS.md, step 27).
//!
//! Here the connector counts each endpoint's open connections ([`Tracked`] gives its
//! count back when hyper drops the connection), and [`Endpoint::turn`] lets one attempt
//! at a time go until the endpoint has a connection others can use:
//! - over HTTP/1.1, as soon as it is open (the others cannot share it, and open their
//!   own at once);
//! - over HTTP/2, once the server has spoken on it (its first frames, its settings, come
//!   one round trip after the handshake, whatever its handlers do) or [`SHARE_AFTER`]
//!   after it opened, whichever is first, **and** once hyper's connection task has taken
//!   the connecting attempt's request ([`Endpoint::taken`]), which it only can once
//!   hyper-util has pooled the connection, so that the others find it there; or once an
//!   answer has come over it. So an attempt that hangs, perhaps on another webhook's path
//!   at the same host, holds the others up for a round trip, not for its timeout; until
//!   step 31 they waited for an answer or the 50 ms, and in the benchmark's hang10
//!   scenario a hanging first attempt sent a third of the healthy webhooks' deliveries
//!   through the database (BENCHMARKS.md, step 31). Until step 35 the server's first
//!   frames alone let them go, on the assumption that hyper-util pools a connection
//!   before they can arrive; but hyper-util waits for the connection task to be ready
//!   before it pools, and a busy machine can let that task read the server's settings
//!   first: the others would then find nothing pooled and each make its own handshake
//!   (the likely cause of 60 connections in one burst under load: BENCHMARKS.md, item
//!   40).
//!
//! An attempt that fails to connect lets the next one try.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// One endpoint (scheme, host and port: what hyper-util pools connections by).
#[derive(Debug)]
pub(super) struct Endpoint {
    /// Connections open to it.
    live: AtomicUsize,
    /// One of them can be used by any attempt (see the module docs); false again when
    /// none is open.
    shareable: AtomicBool,
    /// What the other attempts wait for over HTTP/2, as bits ([`HEARD`], [`TOOK`]) of one
    /// atomic, so that of the two signals arriving at once exactly one sees both.
    signals: AtomicU8,
    /// Held by the one attempt that connects while no connection can be used.
    gate: Semaphore,
    /// Signalled when a connection becomes shareable.
    shared: Notify,
}

/// How long after an HTTP/2 connection opened the other attempts go without waiting
/// for the server to speak or answer (a server that accepts TLS and HTTP/2 but sends
/// nothing).
pub(super) const SHARE_AFTER: Duration = Duration::from_millis(50);

/// The server has spoken on one of its connections, or one has been open [`SHARE_AFTER`].
const HEARD: u8 = 1;
/// hyper's connection task has taken the connecting attempt's request: its connection is
/// pooled.
const TOOK: u8 = 2;

impl Endpoint {
    fn new() -> Self {
        Endpoint {
            live: AtomicUsize::new(0),
            shareable: AtomicBool::new(false),
            signals: AtomicU8::new(0),
            gate: Semaphore::new(1),
            shared: Notify::new(),
        }
    }

    fn ready(&self) -> bool {
        self.shareable.load(Ordering::Acquire) && self.live.load(Ordering::Acquire) > 0
    }

    /// Waits until this attempt may go: at once while a shareable connection is open;
    /// otherwise until it holds the gate (returned: hold it until the attempt ends) or
    /// until another attempt's connection has become shareable.
    pub(super) async fn turn(&self) -> Option<SemaphorePermit<'_>> {
        // The common case, without touching the notifier's lock.
        if self.ready() {
            return None;
        }
        loop {
            let shared = self.shared.notified();
            tokio::pin!(shared);
            // Registered before the state is read: a connection that becomes shareable
            // between the two is not missed.
            shared.as_mut().enable();
            if self.ready() {
                return None;
            }
            tokio::select! {
                permit = self.gate.acquire() => {
                    // The semaphore is never closed; if it were, the attempt goes ungated.
                    let permit = permit.ok()?;
                    if self.ready() {
                        return None;
                    }
                    return Some(permit);
                }
                () = &mut shared => {}
            }
        }
    }

    /// An answer came over one of its connections: it can be shared.
    pub(super) fn answered(&self) {
        if !self.shareable.load(Ordering::Relaxed) {
            self.share();
        }
    }

    /// hyper's connection task has taken the connecting attempt's request (it asks the
    /// body whether it is empty as it does): the connection is in hyper-util's pool.
    pub(super) fn taken(&self) {
        self.signal(TOOK);
    }

    /// The server has spoken on an HTTP/2 connection, or one has been open for
    /// [`SHARE_AFTER`].
    fn hear(&self) {
        self.signal(HEARD);
    }

    /// Records one signal; the one that completes both shares the connection.
    fn signal(&self, bit: u8) {
        let before = self.signals.fetch_or(bit, Ordering::AcqRel);
        if before & bit == 0 && before | bit == HEARD | TOOK {
            self.share();
        }
    }

    fn share(&self) {
        self.shareable.store(true, Ordering::Release);
        self.shared.notify_waiters();
    }
}

/// Each endpoint's count, shared by the client (which waits on it) and its connector
/// (which keeps it).
#[derive(Clone, Default)]
pub(super) struct Endpoints(Arc<Mutex<Known>>);

#[derive(Default)]
struct Known {
    endpoints: HashMap<String, Arc<Endpoint>>,
    /// The size at which those with nothing open and nobody holding them are forgotten:
    /// at least `MAX_ENDPOINTS`, and twice what the last sweep kept (so that the sweeps
    /// cost nothing much however many endpoints are in use).
    sweep_at: usize,
}

const MAX_ENDPOINTS: usize = 4096;

impl Endpoints {
    /// The endpoint `uri` is sent to.
    pub(super) fn get(&self, uri: &Uri) -> Arc<Endpoint> {
        let key = match uri.authority() {
            Some(authority) => format!("{}://{}", uri.scheme_str().unwrap_or(""), authority),
            None => String::new(),
        };
        let Ok(mut map) = self.0.lock() else {
            // Unreachable in practice (nothing panics while holding the lock); an
            // endpoint of its own only loses the one-connection-first rule.
            return Arc::new(Endpoint::new());
        };
        let known = &mut *map;
        if known.endpoints.len() >= known.sweep_at.max(MAX_ENDPOINTS) {
            known
                .endpoints
                .retain(|_, endpoint| Arc::strong_count(endpoint) > 1);
            known.sweep_at = known.endpoints.len().saturating_mul(2);
        }
        let endpoint = known
            .endpoints
            .entry(key)
            .or_insert_with(|| Arc::new(Endpoint::new()));
        Arc::clone(endpoint)
    }
}

/// The client's connector, counting the connections it opens per endpoint.
///
/// Shared behind one `Arc`: hyper-util's client clones its connector twice per request
/// (with the client itself, and for the connect it keeps ready in case no pooled
/// connection is free), although almost every request finds one. The connector inside is
/// cloned only when a connection is really opened.
pub(super) struct Counting<C>(Arc<CountingParts<C>>);

struct CountingParts<C> {
    inner: C,
    endpoints: Endpoints,
}

impl<C> Counting<C> {
    pub(super) fn new(inner: C, endpoints: Endpoints) -> Self {
        Self(Arc::new(CountingParts { inner, endpoints }))
    }
}

impl<C> Clone for Counting<C> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

type Connecting<T, E> = Pin<Box<dyn Future<Output = Result<Tracked<T>, E>> + Send>>;

impl<C> tower_service::Service<Uri> for Counting<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Response: Connection + Send + 'static,
{
    type Response = Tracked<C::Response>;
    type Error = C::Error;
    type Future = Connecting<C::Response, C::Error>;

    /// Always ready: the readiness that counts is that of the connector's own clone,
    /// asked for in `call` before it connects.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let endpoint = self.0.endpoints.get(&uri);
        let mut inner = self.0.inner.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            let io = inner.call(uri).await?;
            endpoint.live.fetch_add(1, Ordering::AcqRel);
            if !io.connected().is_negotiated_h2() {
                endpoint.share();
            } else if !endpoint.shareable.load(Ordering::Acquire) {
                let endpoint = Arc::clone(&endpoint);
                tokio::spawn(async move {
                    tokio::time::sleep(SHARE_AFTER).await;
                    if endpoint.live.load(Ordering::Acquire) > 0 {
                        endpoint.hear();
                    }
                });
            }
            // Over HTTP/1.1 there is nothing more to tell.
            let told = !io.connected().is_negotiated_h2();
            Ok(Tracked { io, endpoint, told })
        })
    }
}

/// An open connection, counted in its endpoint until hyper drops it.
pub(super) struct Tracked<T> {
    io: T,
    endpoint: Arc<Endpoint>,
    /// Its endpoint knows it can be shared (after its first read, over HTTP/2).
    told: bool,
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        if self.endpoint.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The next attempt connects first again.
            self.endpoint.shareable.store(false, Ordering::Release);
            self.endpoint.signals.store(0, Ordering::Release);
        }
    }
}

impl<T: Connection> Connection for Tracked<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: Read + Unpin> Read for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        // The server has spoken (or closed: either way waiting longer tells nothing).
        if !self.told && matches!(read, Poll::Ready(Ok(()))) {
            self.told = true;
            self.endpoint.hear();
        }
        read
    }
}

impl<T: Write + Unpin> Write for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn an_http2_connection_is_shared_once_the_server_has_spoken() {
        let endpoint = Arc::new(Endpoint::new());
        endpoint.live.fetch_add(1, Ordering::AcqRel);
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut tracked = Tracked {
            io: hyper_util::rt::TokioIo::new(ours),
            endpoint: Arc::clone(&endpoint),
            told: false,
        };
        assert!(!endpoint.ready());
        theirs.write_all(b"settings").await.expect("write");
        let mut bytes = [0u8; 16];
        let mut buf = hyper::rt::ReadBuf::new(&mut bytes);
        std::future::poll_fn(|cx| Pin::new(&mut tracked).poll_read(cx, buf.unfilled()))
            .await
            .expect("read");
        assert_eq!(buf.filled(), b"settings");
        // Heard, but the connecting attempt's request not yet taken: the connection may
        // not be pooled yet, and the others would each open their own.
        assert!(!endpoint.ready());
        endpoint.taken();
        // No answer yet, and long before `SHARE_AFTER`: the others may go.
        assert!(endpoint.ready());
    }

    #[test]
    fn a_request_taken_before_the_server_speaks_waits_for_it_and_an_answer_for_nothing() {
        let endpoint = Endpoint::new();
        endpoint.live.fetch_add(1, Ordering::AcqRel);
        endpoint.taken();
        assert!(!endpoint.ready());
        endpoint.hear();
        assert!(endpoint.ready());

        // Once the last connection is gone, the next one starts from nothing; an answer
        // shares it whatever else is known.
        let endpoint = Arc::new(endpoint);
        drop(Tracked {
            io: (),
            endpoint: Arc::clone(&endpoint),
            told: true,
        });
        endpoint.live.fetch_add(1, Ordering::AcqRel);
        endpoint.hear();
        assert!(!endpoint.ready());
        endpoint.answered();
        assert!(endpoint.ready());
    }

    fn uri(text: &str) -> Uri {
        text.parse().expect("a URI")
    }

    #[test]
    fn one_endpoint_per_host_and_port_and_those_nobody_holds_are_forgotten() {
        let endpoints = Endpoints::default();
        let kept = endpoints.get(&uri("https://kept.example/a"));
        // Paths do not matter: hyper-util pools by scheme, host and port.
        assert!(Arc::ptr_eq(
            &kept,
            &endpoints.get(&uri("https://kept.example/b"))
        ));
        assert!(!Arc::ptr_eq(
            &kept,
            &endpoints.get(&uri("https://kept.example:8443/a"))
        ));
        for n in 0..MAX_ENDPOINTS {
            endpoints.get(&uri(&format!("https://h{n}.example/")));
        }
        // The sweep at the limit kept only the endpoint still held.
        let known = endpoints.0.lock().expect("lock").endpoints.len();
        assert!(known < 8, "{known} endpoints kept");
        assert!(Arc::ptr_eq(
            &kept,
            &endpoints.get(&uri("https://kept.example/"))
        ));
    }
}
