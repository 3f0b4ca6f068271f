//! The broker transport: jobs travel between one front door (`zturbo serve --broker`) and any
//! number of remote workers (`zturbo worker`) on Redis Streams.
//!
//! - Each model has a job stream, `zturbo:jobs:<model>`, read by the consumer group `workers`.
//!   Delivery is at least once: an entry stays pending until the worker that runs it has stored
//!   the result; a dead worker's entries are taken over with `XAUTOCLAIM` after the visibility
//!   timeout, which a live worker extends (`XCLAIM … JUSTID`) while it runs the job.
//! - A worker ends every job with one Lua script that stores the result (the outcome, the record
//!   and the PNG bytes) in `zturbo:result:<id>`, acknowledges and deletes the entry, and announces
//!   the end — unless a result or a `done` mark is already there (the job id is the idempotency
//!   key), in which case it only acknowledges.
//! - The front door journals every job as before, hands it to the stream (idempotently, marked by
//!   `zturbo:job:<id>`), follows `zturbo:events` (progress, notices, starts, ends), writes each
//!   result's images once as `outputs/<id>-<n>.png`, journals the end, and only then settles the
//!   job in Redis (result deleted, `zturbo:done:<id>` kept a week).
//! - Workers register with heartbeats (`zturbo:worker:<name>`, a short TTL) and publish memory
//!   samples to `zturbo:memory`; a cancel is a mark (`zturbo:cancel:<id>`) that workers poll.

pub mod front;
pub mod remote;
pub mod wire;

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};

/// Every key starts with this, so a Redis database can be shared with other programs.
pub const PREFIX: &str = "zturbo";
/// The consumer group of the job streams.
pub const GROUP: &str = "workers";
/// Events kept in `zturbo:events` (the front door follows it live; results survive elsewhere).
pub const EVENTS_MAXLEN: usize = 20_000;
/// Memory samples kept in `zturbo:memory`, all workers together.
pub const MEMORY_MAXLEN: usize = 20_000;
/// How long a settled job's `done` mark is kept (a late duplicate run within it is dropped).
pub const DONE_TTL_S: u64 = 7 * 24 * 3600;
/// How long a cancel mark waits for a worker to see it.
pub const CANCEL_TTL_S: u64 = 24 * 3600;
/// Starts of one job after which it is failed rather than tried again (each start that did not
/// end means a worker died or stopped while running it).
pub const MAX_ATTEMPTS: u64 = 3;
/// Default visibility timeout (`--claim-after`): a job whose worker has not extended it for this
/// long is taken over by another worker.
pub const DEFAULT_CLAIM_AFTER_S: f64 = 30.0;
/// How often a worker says it is alive (and extends its job, and looks for a cancel).
pub const HEARTBEAT: Duration = Duration::from_millis(1000);
/// A worker not heard from for this long is no longer listed.
pub const WORKER_TTL: Duration = Duration::from_secs(5);
/// How long one blocking read waits before the loop looks around again.
pub const BLOCK_MS: usize = 1000;
/// Reconnection backoff: first wait and cap.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A command with no answer for this long counts as a lost connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn jobs_key(model: &str) -> String {
    format!("{PREFIX}:jobs:{model}")
}
pub fn events_key() -> String {
    format!("{PREFIX}:events")
}
pub fn memory_key() -> String {
    format!("{PREFIX}:memory")
}
pub fn result_key(id: &str) -> String {
    format!("{PREFIX}:result:{id}")
}
pub fn done_key(id: &str) -> String {
    format!("{PREFIX}:done:{id}")
}
pub fn enqueued_key(id: &str) -> String {
    format!("{PREFIX}:job:{id}")
}
pub fn cancel_key(id: &str) -> String {
    format!("{PREFIX}:cancel:{id}")
}
pub fn attempts_key(id: &str) -> String {
    format!("{PREFIX}:attempts:{id}")
}
pub fn worker_key(name: &str) -> String {
    format!("{PREFIX}:worker:{name}")
}
pub fn workers_key() -> String {
    format!("{PREFIX}:workers")
}
pub fn model_key(model: &str) -> String {
    format!("{PREFIX}:model:{model}")
}
pub fn models_key() -> String {
    format!("{PREFIX}:models")
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("--broker `{0}`: expected redis://[:PASSWORD@]HOST:PORT[/DB] or rediss://… (TLS)")]
    BadUrl(String),
    #[error("--broker-ca {path}: {message}")]
    BadCa { path: String, message: String },
    #[error(
        "the broker at {url} refused the password ({detail}); check the password in the --broker \
         URL (redis://:PASSWORD@HOST:PORT) against the server's requirepass"
    )]
    Auth { url: String, detail: String },
    #[error(
        "the broker at {url} presented a TLS certificate that is not trusted ({detail}); pass the \
         CA that signed it with --broker-ca FILE.pem"
    )]
    Tls { url: String, detail: String },
    #[error("the broker at {url} cannot be reached: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the broker at {url} answered with an error: {detail}")]
    Redis { url: String, detail: String },
    #[error("{0}")]
    Other(String),
}

impl BrokerError {
    /// Whether waiting and reconnecting may help (a wrong password or URL never gets better).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BrokerError::Unreachable { .. } | BrokerError::Redis { .. }
        )
    }
}

/// A validated `--broker` URL and the client built from it.
#[derive(Clone)]
pub struct Broker {
    client: Client,
    /// The URL without its password, for messages and logs.
    shown: String,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Broker {
    /// Parses `redis://` or `rediss://` (TLS; the server's certificate is checked against the
    /// system's roots, or only against `ca_pem` when given).
    pub fn new(url: &str, ca_pem: Option<(&str, Vec<u8>)>) -> Result<Broker, BrokerError> {
        let shown = redact(url);
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        let tls = match scheme.as_deref() {
            Some("redis") => false,
            Some("rediss") => true,
            _ => return Err(BrokerError::BadUrl(shown)),
        };
        let bad = |_| BrokerError::BadUrl(shown.clone());
        let client = match ca_pem {
            Some((path, pem)) => {
                if !tls {
                    return Err(BrokerError::BadCa {
                        path: path.to_string(),
                        message: "a CA certificate needs a rediss:// (TLS) broker URL".into(),
                    });
                }
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(BrokerError::BadCa {
                        path: path.to_string(),
                        message: "not a PEM certificate (no BEGIN CERTIFICATE block)".into(),
                    });
                }
                let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(bad)?;
                Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(|e| BrokerError::BadCa {
                    path: path.to_string(),
                    message: e.to_string(),
                })?
            }
            None => Client::open(url).map_err(bad)?,
        };
        if tls {
            // One crypto provider for the process (ring, which the HTTP client uses too); a
            // second install is refused harmlessly.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        Ok(Broker { client, shown })
    }

    /// The broker of `--broker` and `--broker-ca` (the CA file is read here).
    pub fn open(settings: &crate::settings::BrokerSettings) -> Result<Broker, BrokerError> {
        let ca = match &settings.ca {
            Some(path) => {
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|e| BrokerError::BadCa {
                    path: shown.clone(),
                    message: format!("cannot be read: {e}"),
                })?;
                Some((shown, pem))
            }
            None => None,
        };
        let ca = ca.as_ref().map(|(p, pem)| (p.as_str(), pem.clone()));
        Broker::new(&settings.url, ca)
    }

    /// The URL without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// A fresh multiplexed connection, checked with a PING (so a wrong password shows here).
    pub async fn connect(&self) -> Result<MultiplexedConnection, BrokerError> {
        self.connect_with(RESPONSE_TIMEOUT).await
    }

    /// A connection for blocking reads: its answers may take up to `block` longer.
    pub async fn connect_blocking(
        &self,
        block: Duration,
    ) -> Result<MultiplexedConnection, BrokerError> {
        self.connect_with(RESPONSE_TIMEOUT + block).await
    }

    async fn connect_with(&self, timeout: Duration) -> Result<MultiplexedConnection, BrokerError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(timeout));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.error(e))?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        Ok(conn)
    }

    /// A Redis error as this module tells it.
    pub fn error(&self, e: RedisError) -> BrokerError {
        let url = self.shown.clone();
        let detail = e.to_string();
        let code = e.code().unwrap_or("");
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
            || detail.contains("WRONGPASS")
            || detail.contains("NOAUTH")
        {
            BrokerError::Auth { url, detail }
        } else if detail.contains("certificate") {
            // Waiting does not make a certificate trusted.
            BrokerError::Tls { url, detail }
        } else if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            // A server still loading its data (or busy) is as good as away for a moment.
            || matches!(code, "LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN")
        {
            BrokerError::Unreachable { url, detail }
        } else {
            BrokerError::Redis { url, detail }
        }
    }

    /// Connects, waiting with backoff while the broker cannot be reached; a wrong password (or
    /// any error that waiting cannot fix) is returned at once.
    pub async fn connect_patiently(
        &self,
        what: &str,
        blocking: Option<Duration>,
    ) -> Result<MultiplexedConnection, BrokerError> {
        let mut backoff = Backoff::default();
        loop {
            let conn = match blocking {
                Some(b) => self.connect_blocking(b).await,
                None => self.connect().await,
            };
            match conn {
                Ok(c) => return Ok(c),
                Err(e) if e.is_transient() => {
                    let wait = backoff.next_wait();
                    tracing::warn!("{what}: {e}; retrying in {} ms", wait.as_millis());
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// `redis://:secret@host:6379/0` → `redis://:***@host:6379/0`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// Exponential backoff between reconnection attempts.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    pub fn next_wait(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        now
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Creates the consumer group of a job stream (and the stream) unless it exists. Entries added
/// before the group was made are delivered too (it starts at id 0).
pub async fn ensure_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> Result<(), RedisError> {
    let made: Result<(), RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match made {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Adds a job to its stream unless the broker already knows it; answers `added`, `queued`
/// (already in the stream), `result` (a result waits) or `settled`.
pub const ENQUEUE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 'result' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'settled' end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'queued' end
local e = redis.call('XADD', KEYS[4], '*', 'job', ARGV[1], 'entry', ARGV[2])
redis.call('SET', KEYS[3], e)
return 'added'
"#;

/// KEYS: done mark, result, job stream, events; ARGV: group, entry id, job id, worker, outcome,
/// record, events cap, PNGs. Stores a job's result, acknowledges and deletes its stream entry and announces the end, in
/// one step — or, when the job already has a result or was settled, only acknowledges (1 when
/// stored, 0 when it was a duplicate).
pub const COMPLETE_LUA: &str = r#"
local function ack()
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[1]) == 1 then
  ack()
  return 0
end
local h = {'outcome', ARGV[5], 'worker', ARGV[4], 'record', ARGV[6], 'images', tostring(#ARGV - 7)}
for i = 8, #ARGV do
  table.insert(h, 'png:' .. tostring(i - 7))
  table.insert(h, ARGV[i])
end
redis.call('HSET', KEYS[2], unpack(h))
ack()
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'job', ARGV[3], 'kind', 'end', 'worker', ARGV[4], 'data', ARGV[5])
return 1
"#;

/// Settles a job the front door has journaled as ended: its result and marks go, a `done` mark
/// stays for a week so that a late duplicate run is dropped.
pub const SETTLE_LUA: &str = r#"
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("redis://:s3cret@10.0.0.5:6379/2"),
            "redis://:***@10.0.0.5:6379/2"
        );
        assert_eq!(
            redact("rediss://zturbo:s3cret@cache.example:6380"),
            "rediss://zturbo:***@cache.example:6380"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        let e = Broker::new("http://:s3cret@host:1", None).unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(e.to_string().contains("redis://"), "{e}");
    }

    #[test]
    fn only_redis_urls_and_pem_certificates_are_taken() {
        assert!(Broker::new("redis://127.0.0.1:6379/0", None).is_ok());
        assert!(Broker::new("rediss://127.0.0.1:6380", None).is_ok());
        for bad in ["127.0.0.1:6379", "tcp://127.0.0.1:6379", ""] {
            assert!(
                matches!(Broker::new(bad, None), Err(BrokerError::BadUrl(_))),
                "{bad}"
            );
        }
        let e = Broker::new("redis://127.0.0.1:6379", Some(("ca.pem", b"x".to_vec())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.pem") && e.contains("rediss://"), "{e}");
        let e = Broker::new(
            "rediss://127.0.0.1:6379",
            Some(("ca.pem", b"not pem".to_vec())),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a PEM certificate"), "{e}");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert_eq!(waits[0], BACKOFF_MIN);
        assert_eq!(waits[1], BACKOFF_MIN * 2);
        assert_eq!(*waits.last().unwrap(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next_wait(), BACKOFF_MIN);
    }
}
