//! The accept loop. `axum::serve` never times a connection out, so a client that connects and
//! sends nothing (or half a request head) holds a file descriptor for ever — before any key is
//! checked. Here every HTTP/1 connection is served by hyper under a watchdog that closes it when:
//!
//! - no complete request head has arrived within `header_timeout` of connecting (a connection
//!   that never sends a byte included), or of the first byte of a later head on a kept-alive one;
//! - it has been idle between requests for `idle_timeout`;
//! - a request body being read, or a response being written, made no progress for
//!   `idle_timeout` (a client that stopped sending or stopped reading).
//!
//! A request being handled is never timed out here (a synchronous generation waits as long as its
//! own limit allows), and an SSE stream stays open while its client reads it: the keep-alive
//! comments it writes keep making progress. At most `max_connections` are open at once; beyond
//! that new connections wait in the kernel's accept backlog rather than taking descriptors.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Default of `--header-timeout`: seconds to send a complete request head.
pub const DEFAULT_HEADER_TIMEOUT_S: u64 = 10;
/// Default of `--idle-timeout`: seconds a kept-alive connection may idle, or a body stall.
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 30;
/// Default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// File descriptors kept free for everything but connections (weights, outputs, the journal).
const FD_RESERVE: u64 = 64;
/// How often a connection's watchdog looks at it when no deadline is nearer.
const WATCH_TICK: Duration = Duration::from_millis(250);

/// The limits every connection is served under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT_S),
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_S),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl ConnLimits {
    /// Lowers `max_connections` to what the process's open-file limit allows (raising the soft
    /// limit to the hard one first), so connections can never starve the server of descriptors.
    pub fn fit_to_fd_limit(mut self) -> Self {
        if let Some(limit) = raise_fd_limit(self.max_connections as u64 + FD_RESERVE) {
            let room = limit.saturating_sub(FD_RESERVE).max(1) as usize;
            if room < self.max_connections {
                tracing::warn!(
                    "the open-file limit is {limit}: serving at most {room} connections at once \
                     instead of {} (raise it with `ulimit -n`)",
                    self.max_connections
                );
                self.max_connections = room;
            }
        }
        self
    }
}

/// Raises the soft open-file limit towards `want` (up to the hard limit); returns the soft limit.
#[cfg(unix)]
fn raise_fd_limit(want: u64) -> Option<u64> {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return None;
        }
        let soft = rl.rlim_cur as u64;
        if soft < want && rl.rlim_max as u64 > soft {
            let raised = libc::rlimit {
                rlim_cur: want.min(rl.rlim_max as u64) as libc::rlim_t,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(raised.rlim_cur as u64);
            }
        }
        Some(soft)
    }
}

#[cfg(not(unix))]
fn raise_fd_limit(_want: u64) -> Option<u64> {
    None
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets every open
/// connection finish its current response (SSE streams end on the app's own shutdown signal)
/// and returns once all are closed.
pub async fn serve<F>(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send,
{
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let (drain_tx, drain_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut saturated = false;
    loop {
        if permits.available_permits() == 0 && !saturated {
            saturated = true;
            tracing::warn!(
                "{max} connections are open (--max-connections): new ones wait until one closes"
            );
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        if permits.available_permits() > max / 2 {
            saturated = false;
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    drop(permit);
                    if !is_connection_error(&e) {
                        // Out of descriptors (EMFILE/ENFILE) and the like: back off briefly.
                        tracing::warn!("accept failed: {e}");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = &mut shutdown => break,
                        }
                    }
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let drain = drain_rx.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, app, limits, drain).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    // Every connection holds a permit until it closes.
    let _all = permits.acquire_many(max as u32).await;
    Ok(())
}

/// Errors of one connection attempt, not of the listener (as hyper's own accept loop treats them).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ConnLimits,
    mut drain: watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        state: state.clone(),
    });
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = svc_state.clone();
        let app = app.clone();
        async move {
            let active = Active::begin(state.clone());
            let mut req = req.map(|inner| {
                Body::new(WatchedBody {
                    inner,
                    state: state.clone(),
                })
            });
            req.extensions_mut().insert(ConnectInfo(peer));
            let res = app.oneshot(req).await?;
            // The request counts as active until hyper has written (or dropped) the whole
            // response body: an SSE stream is a request that is still being answered.
            Ok::<_, std::convert::Infallible>(res.map(|inner| {
                Body::new(Tracked {
                    inner,
                    _active: active,
                })
            }))
        }
    });
    // No hyper timer: the watchdog below keeps every deadline (hyper's header timer would also
    // close idle kept-alive connections at the head deadline).
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let watchdog = watchdog(state, limits);
    tokio::pin!(watchdog);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                break;
            }
            reason = &mut watchdog => {
                tracing::debug!(%peer, "closing the connection: {reason}");
                break;
            }
            _ = drain.wait_for(|d| *d), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Resolves with the reason once one of the connection's deadlines has passed.
async fn watchdog(state: Arc<ConnState>, limits: ConnLimits) -> &'static str {
    loop {
        let now = state.now_ms();
        match state.deadline(&limits) {
            Some((at, reason)) if now >= at => return reason,
            Some((at, _)) => {
                tokio::time::sleep(Duration::from_millis(at - now).min(WATCH_TICK)).await
            }
            None => tokio::time::sleep(WATCH_TICK).await,
        }
    }
}

const UNSET: u64 = u64::MAX;

/// What the watchdog needs to know about one connection; times in ms since it was accepted.
#[derive(Debug)]
struct ConnState {
    start: Instant,
    /// Requests being handled or answered (response body not yet fully written).
    active: AtomicUsize,
    /// Requests whose head arrived.
    heads: AtomicU64,
    /// When `active` last fell to 0.
    idle_since: AtomicU64,
    /// First byte received since the connection became idle (a new head is arriving).
    head_started: AtomicU64,
    /// Since when the handler has been waiting for request body bytes.
    body_wait: AtomicU64,
    /// Since when the socket has refused to take response bytes (the client is not reading).
    write_wait: AtomicU64,
}

impl ConnState {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            active: AtomicUsize::new(0),
            heads: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(UNSET),
            body_wait: AtomicU64::new(UNSET),
            write_wait: AtomicU64::new(UNSET),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn read_bytes(&self) {
        if self.active.load(Ordering::SeqCst) == 0 {
            let now = self.now_ms();
            let _ =
                self.head_started
                    .compare_exchange(UNSET, now, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    fn write_progress(&self, pending: bool) {
        if pending {
            let now = self.now_ms();
            let _ =
                self.write_wait
                    .compare_exchange(UNSET, now, Ordering::SeqCst, Ordering::SeqCst);
        } else {
            self.write_wait.store(UNSET, Ordering::SeqCst);
        }
    }

    /// The earliest deadline now in force, and what it guards.
    fn deadline(&self, l: &ConnLimits) -> Option<(u64, &'static str)> {
        let ms = |d: Duration| d.as_millis() as u64;
        let header = ms(l.header_timeout);
        let idle = ms(l.idle_timeout);
        let mut best: Option<(u64, &'static str)> = None;
        let mut consider = |at: u64, why: &'static str| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, why));
            }
        };
        if self.active.load(Ordering::SeqCst) == 0 {
            let started = self.head_started.load(Ordering::SeqCst);
            if self.heads.load(Ordering::SeqCst) == 0 {
                consider(header, "no complete request head in time");
            } else if started != UNSET {
                consider(
                    started.saturating_add(header),
                    "request head not completed in time",
                );
            } else {
                let since = self.idle_since.load(Ordering::SeqCst);
                consider(since.saturating_add(idle), "idle keep-alive timeout");
            }
        } else {
            let body = self.body_wait.load(Ordering::SeqCst);
            if body != UNSET {
                consider(body.saturating_add(idle), "the request body stalled");
            }
        }
        let write = self.write_wait.load(Ordering::SeqCst);
        if write != UNSET {
            consider(write.saturating_add(idle), "the client stopped reading");
        }
        best
    }
}

/// One request from its head to the end of its response; the connection is idle when none is.
struct Active(Arc<ConnState>);

impl Active {
    fn begin(state: Arc<ConnState>) -> Self {
        state.heads.fetch_add(1, Ordering::SeqCst);
        state.active.fetch_add(1, Ordering::SeqCst);
        state.head_started.store(UNSET, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let s = &self.0;
        s.body_wait.store(UNSET, Ordering::SeqCst);
        if s.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            s.idle_since.store(s.now_ms(), Ordering::SeqCst);
            s.head_started.store(UNSET, Ordering::SeqCst);
        }
    }
}

/// The socket, reporting read and write progress to the watchdog.
struct Watched {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.read_bytes();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.state.write_progress(r.is_pending());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.state.write_progress(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.state.write_progress(r.is_pending());
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that tells the watchdog while its reader waits for bytes.
struct WatchedBody<B> {
    inner: B,
    state: Arc<ConnState>,
}

impl<B> HttpBody for WatchedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        let wait = &self.state.body_wait;
        if r.is_pending() {
            let now = self.state.now_ms();
            let _ = wait.compare_exchange(UNSET, now, Ordering::SeqCst, Ordering::SeqCst);
        } else {
            wait.store(UNSET, Ordering::SeqCst);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for WatchedBody<B> {
    fn drop(&mut self) {
        self.state.body_wait.store(UNSET, Ordering::SeqCst);
    }
}

/// A response body that keeps its request [`Active`] until hyper drops it.
struct Tracked {
    inner: Body,
    _active: Active,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_millis(1000),
            idle_timeout: Duration::from_millis(5000),
            max_connections: 4,
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let d = ConnLimits::default();
        assert_eq!(d.header_timeout, Duration::from_secs(10));
        assert_eq!(d.idle_timeout, Duration::from_secs(30));
        assert_eq!(d.max_connections, 256);
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let l = limits();
        let s = Arc::new(ConnState::new());
        // Fresh: the head deadline runs from the accept, bytes or not.
        assert_eq!(s.deadline(&l).unwrap().0, 1000);
        s.read_bytes();
        assert_eq!(s.deadline(&l).unwrap().0, 1000);
        // A request in flight with no stalled body: no deadline at all.
        let active = Active::begin(s.clone());
        assert_eq!(s.deadline(&l), None);
        // Its body stalls: the idle timeout from then.
        s.body_wait.store(200, Ordering::SeqCst);
        assert_eq!(s.deadline(&l).unwrap().0, 5200);
        drop(active);
        // Idle between requests: the idle timeout from when the response ended.
        let idle_since = s.idle_since.load(Ordering::SeqCst);
        assert_eq!(s.deadline(&l).unwrap().0, idle_since + 5000);
        // The next head's first byte: the head deadline from then.
        s.read_bytes();
        let started = s.head_started.load(Ordering::SeqCst);
        assert_eq!(
            s.deadline(&l).unwrap(),
            (started + 1000, "request head not completed in time")
        );
        // A client that stops reading a response.
        let _active = Active::begin(s.clone());
        s.write_wait.store(300, Ordering::SeqCst);
        assert_eq!(
            s.deadline(&l).unwrap(),
            (5300, "the client stopped reading")
        );
        s.write_progress(false);
        assert_eq!(s.deadline(&l), None);
    }
}
