//! The remote worker's side of the broker (`zturbo worker`): it reads jobs of its model from the
//! consumer group (first taking over entries a dead worker left pending past the visibility
//! timeout), runs each on the same worker thread `serve` uses, publishes starts, progress,
//! notices and memory samples, and ends each job with the one-step store-and-acknowledge script.
//! A heartbeat task keeps its registration alive, extends the running job's visibility timeout
//! and looks for a cancel mark. It listens on no port.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, Script};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::wire::{JobEntry, ModelRecord, Progress, RemoteDone, RemoteEnd, WorkerInfo};
use super::*;
use crate::engine::CancelToken;
use crate::memory::monitor::Monitor;
use crate::queue::job::{now_ms, FailureKind, JobError, JobId};
use crate::queue::worker::{RunError, RunOutput, Work, WorkItem, WorkerEvent};

/// Extends a running job's visibility timeout if this worker still holds its entry (1), or says
/// it lost it (0: another worker took it over, or it was settled).
const EXTEND_LUA: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"#;

pub struct RemoteSettings {
    pub broker: Broker,
    /// This worker's name (its consumer name in the group, and its name in the UI).
    pub name: String,
    /// The visibility timeout: a pending entry idle this long is taken over.
    pub claim_after: Duration,
    pub record: ModelRecord,
    pub device: String,
    pub device_name: String,
    pub total_bytes: u64,
}

/// The job being run, as the heartbeat sees it.
struct Current {
    id: JobId,
    entry: String,
    cancel: CancelToken,
    step: usize,
    total: usize,
    /// Another worker took it over: this run's result is not stored.
    lost: bool,
}

struct Ctx {
    settings: RemoteSettings,
    stream: String,
    current: Mutex<Option<Current>>,
    started_at: u64,
}

impl Ctx {
    fn current(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn info(&self) -> WorkerInfo {
        let s = &self.settings;
        let cur = self.current();
        WorkerInfo {
            name: s.name.clone(),
            model: s.record.model.clone(),
            device: s.device.clone(),
            device_name: s.device_name.clone(),
            total_bytes: s.total_bytes,
            job: cur.as_ref().map(|c| c.id.clone()),
            step: cur.as_ref().map_or(0, |c| c.step),
            total_steps: cur.as_ref().map_or(0, |c| c.total),
            started_at: self.started_at,
            seen_at: now_ms(),
        }
    }
}

/// Checks the broker (a wrong password fails here, before the model loads); waits while it
/// cannot be reached.
pub async fn check(broker: &Broker) -> Result<(), BrokerError> {
    broker.connect_patiently("the worker", None).await.map(drop)
}

/// Serves jobs until `shutdown` turns true; the job running then is interrupted and left for
/// another worker (it is taken over after the visibility timeout).
pub async fn run(
    settings: RemoteSettings,
    jobs: std_mpsc::Sender<Work>,
    mut events: mpsc::UnboundedReceiver<WorkerEvent>,
    monitor: Arc<Monitor>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BrokerError> {
    let block = Duration::from_millis(BLOCK_MS as u64);
    let ctx = Arc::new(Ctx {
        stream: jobs_key(&settings.record.model),
        settings,
        current: Mutex::new(None),
        started_at: now_ms(),
    });
    let broker = ctx.settings.broker.clone();
    let mut conn = broker.connect_patiently("the worker", Some(block)).await?;
    register(&ctx, &mut conn)
        .await
        .map_err(|e| broker.error(e))?;
    tracing::info!(
        worker = %ctx.settings.name,
        model = %ctx.settings.record.model,
        "registered with the broker at {}; waiting for jobs",
        broker.shown()
    );
    let heartbeat = tokio::spawn(heartbeat(ctx.clone(), shutdown.clone()));
    let samples = tokio::spawn(publish_samples(ctx.clone(), monitor));
    let mut backoff = Backoff::default();
    let mut healthy = true;
    while !*shutdown.borrow() {
        let next = tokio::select! {
            n = next_entry(&ctx, &mut conn) => n,
            _ = shutdown.changed() => break,
        };
        match next {
            Ok(Some(entry)) => {
                backoff.reset();
                if let Err(e) = handle(&ctx, &mut conn, &jobs, &mut events, &shutdown, entry).await
                {
                    tracing::warn!("{}", broker.error(e));
                }
            }
            Ok(None) => {
                if !healthy {
                    tracing::info!("the broker is reachable again");
                    healthy = true;
                }
                backoff.reset();
            }
            Err(e) => {
                let e = broker.error(e);
                if healthy {
                    tracing::warn!("{e}; reconnecting");
                }
                healthy = false;
                tokio::time::sleep(backoff.next_wait()).await;
                match broker.connect_blocking(block).await {
                    Ok(mut c) => {
                        if register(&ctx, &mut c).await.is_ok() {
                            conn = c;
                        }
                    }
                    Err(e) if !e.is_transient() => return Err(e),
                    Err(_) => {}
                }
            }
        }
    }
    heartbeat.abort();
    samples.abort();
    // Struck off the list at once rather than when the heartbeat expires.
    if let Ok(mut c) = broker.connect().await {
        let _ = redis::pipe()
            .del(worker_key(&ctx.settings.name))
            .srem(workers_key(), &ctx.settings.name)
            .query_async::<()>(&mut c)
            .await;
    }
    Ok(())
}

/// Writes the model's record and the worker's registration, and makes sure the group exists.
async fn register(ctx: &Ctx, conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
    ensure_group(conn, &ctx.stream).await?;
    beat(ctx, conn).await
}

async fn beat(ctx: &Ctx, conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
    let info = serde_json::to_string(&ctx.info()).unwrap_or_default();
    let record = serde_json::to_string(&ctx.settings.record).unwrap_or_default();
    redis::pipe()
        .cmd("SET")
        .arg(worker_key(&ctx.settings.name))
        .arg(info)
        .arg("PX")
        .arg(WORKER_TTL.as_millis() as u64)
        .ignore()
        .sadd(workers_key(), &ctx.settings.name)
        .ignore()
        .set(model_key(&ctx.settings.record.model), record)
        .ignore()
        .sadd(models_key(), &ctx.settings.record.model)
        .ignore()
        .query_async::<()>(conn)
        .await
}

/// Every [`HEARTBEAT`]: the registration, the running job's visibility timeout, its cancel mark.
async fn heartbeat(ctx: Arc<Ctx>, shutdown: watch::Receiver<bool>) {
    let mut conn: Option<MultiplexedConnection> = None;
    let group_of = |ctx: &Ctx| (ctx.stream.clone(), ctx.settings.name.clone());
    while !*shutdown.borrow() {
        if conn.is_none() {
            conn = ctx.settings.broker.connect().await.ok();
        }
        if let Some(c) = conn.as_mut() {
            let running = ctx
                .current()
                .as_ref()
                .filter(|c| !c.lost)
                .map(|c| (c.id.clone(), c.entry.clone()));
            let result = async {
                beat(&ctx, c).await?;
                if let Some((id, entry)) = running {
                    let (stream, name) = group_of(&ctx);
                    let held: i64 = Script::new(EXTEND_LUA)
                        .key(&stream)
                        .arg(GROUP)
                        .arg(&entry)
                        .arg(&name)
                        .invoke_async(c)
                        .await?;
                    let cancelled: bool = redis::cmd("EXISTS")
                        .arg(cancel_key(&id))
                        .query_async(c)
                        .await?;
                    if let Some(cur) = ctx.current().as_mut().filter(|cur| cur.id == id) {
                        if held == 0 {
                            tracing::warn!(
                                job_id = %id,
                                "another worker has taken this job over; stopping this run"
                            );
                            cur.lost = true;
                            cur.cancel.cancel();
                        } else if cancelled {
                            cur.cancel.cancel();
                        }
                    }
                }
                Ok::<(), RedisError>(())
            }
            .await;
            if result.is_err() {
                conn = None;
            }
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// The memory monitor's samples, sent in small batches (a lost batch is just a gap in a chart).
async fn publish_samples(ctx: Arc<Ctx>, monitor: Arc<Monitor>) {
    let mut rx = monitor.subscribe();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut batch: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Ok(s) => {
                    if batch.len() < 64 {
                        batch.push(serde_json::to_string(&s).unwrap_or_default());
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                if batch.is_empty() {
                    continue;
                }
                if conn.is_none() {
                    conn = ctx.settings.broker.connect().await.ok();
                }
                let Some(c) = conn.as_mut() else {
                    batch.clear();
                    continue;
                };
                let mut pipe = redis::pipe();
                for s in batch.drain(..) {
                    pipe.cmd("XADD")
                        .arg(memory_key())
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(MEMORY_MAXLEN)
                        .arg("*")
                        .arg("worker")
                        .arg(&ctx.settings.name)
                        .arg("sample")
                        .arg(s)
                        .ignore();
                }
                if pipe.query_async::<()>(c).await.is_err() {
                    conn = None;
                }
            }
        }
    }
}

/// The next entry to run: first one a dead worker left behind, else a new one (blocking a
/// little); `None` when there is none yet.
async fn next_entry(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
) -> Result<Option<StreamId>, RedisError> {
    let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(&ctx.stream)
        .arg(GROUP)
        .arg(&ctx.settings.name)
        .arg(ctx.settings.claim_after.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    if let Some(e) = claimed.claimed.into_iter().next() {
        tracing::info!(entry = %e.id, "taking over a job whose worker stopped answering");
        return Ok(Some(e));
    }
    let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(&ctx.settings.name)
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(BLOCK_MS)
        .arg("STREAMS")
        .arg(&ctx.stream)
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(read
        .and_then(|r| r.keys.into_iter().next())
        .and_then(|k| k.ids.into_iter().next()))
}

async fn publish(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    id: &str,
    kind: &str,
    data: String,
) -> Result<(), RedisError> {
    redis::cmd("XADD")
        .arg(events_key())
        .arg("MAXLEN")
        .arg("~")
        .arg(EVENTS_MAXLEN)
        .arg("*")
        .arg("job")
        .arg(id)
        .arg("kind")
        .arg(kind)
        .arg("worker")
        .arg(&ctx.settings.name)
        .arg("data")
        .arg(data)
        .query_async::<()>(conn)
        .await
}

/// Acknowledges an entry that will not run (and drops it from the stream).
async fn ack(ctx: &Ctx, conn: &mut MultiplexedConnection, entry: &str) -> Result<(), RedisError> {
    redis::pipe()
        .cmd("XACK")
        .arg(&ctx.stream)
        .arg(GROUP)
        .arg(entry)
        .ignore()
        .cmd("XDEL")
        .arg(&ctx.stream)
        .arg(entry)
        .ignore()
        .query_async::<()>(conn)
        .await
}

/// Stores the end of a job and acknowledges its entry in one step (see [`COMPLETE_LUA`]);
/// whether it was stored (false: another run's result was already there).
async fn complete(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    id: &str,
    entry: &str,
    end: &RemoteEnd,
    pngs: &[Vec<u8>],
) -> Result<bool, RedisError> {
    let record = serde_json::to_string(end).unwrap_or_default();
    let script = Script::new(COMPLETE_LUA);
    let mut call = script.key(done_key(id));
    call.key(result_key(id))
        .key(&ctx.stream)
        .key(events_key())
        .arg(GROUP)
        .arg(entry)
        .arg(id)
        .arg(&ctx.settings.name)
        .arg(end.outcome())
        .arg(record)
        .arg(EVENTS_MAXLEN);
    for png in pngs {
        call.arg(png.as_slice());
    }
    let stored: i64 = call.invoke_async(conn).await?;
    Ok(stored == 1)
}

/// Ends a job that is not run (cancelled before it started, or given up).
async fn end_early(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    id: &str,
    entry: &str,
    end: RemoteEnd,
) -> Result<(), RedisError> {
    if complete(ctx, conn, id, entry, &end, &[]).await? {
        tracing::info!("job ended before it ran: {}", end.outcome());
    }
    Ok(())
}

async fn handle(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    jobs: &std_mpsc::Sender<Work>,
    events: &mut mpsc::UnboundedReceiver<WorkerEvent>,
    shutdown: &watch::Receiver<bool>,
    entry: StreamId,
) -> Result<(), RedisError> {
    let entry_id = entry.id.clone();
    let Some(id) = entry.get::<String>("job") else {
        tracing::warn!(entry = %entry_id, "a stream entry without a job id; dropped");
        return ack(ctx, conn, &entry_id).await;
    };
    let span = tracing::info_span!("job", job_id = %id, worker = %ctx.settings.name);
    run_entry(ctx, conn, jobs, events, shutdown, entry, entry_id, id)
        .instrument(span)
        .await
}

/// [`handle`] for an entry with a job id, in the job's span.
#[allow(clippy::too_many_arguments)]
async fn run_entry(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    jobs: &std_mpsc::Sender<Work>,
    events: &mut mpsc::UnboundedReceiver<WorkerEvent>,
    shutdown: &watch::Receiver<bool>,
    entry: StreamId,
    entry_id: String,
    id: String,
) -> Result<(), RedisError> {
    // The job id is the idempotency key: a job with a result (or settled) is not run again.
    let (has_result, settled, cancelled): (bool, bool, bool) = redis::pipe()
        .exists(result_key(&id))
        .exists(done_key(&id))
        .exists(cancel_key(&id))
        .query_async(conn)
        .await?;
    if has_result || settled {
        tracing::info!("redelivered, and its result is already stored: acknowledged, not run");
        return ack(ctx, conn, &entry_id).await;
    }
    if cancelled {
        return end_early(ctx, conn, &id, &entry_id, RemoteEnd::Cancelled).await;
    }
    let attempts: u64 = redis::pipe()
        .incr(attempts_key(&id), 1)
        .expire(attempts_key(&id), DONE_TTL_S as i64)
        .ignore()
        .query_async::<(u64,)>(conn)
        .await?
        .0;
    if attempts > MAX_ATTEMPTS {
        let end = RemoteEnd::Failed {
            error: JobError::new(
                FailureKind::Internal,
                format!(
                    "the job was started {MAX_ATTEMPTS} times and no worker finished it (each \
                     one running it died or stopped); it is not tried again"
                ),
            ),
        };
        return end_early(ctx, conn, &id, &entry_id, end).await;
    }
    let job: JobEntry = match entry
        .get::<String>("entry")
        .and_then(|raw| serde_json::from_str(&raw).ok())
    {
        Some(j) => j,
        None => {
            let end = RemoteEnd::Failed {
                error: JobError::new(
                    FailureKind::Internal,
                    "the job's entry in the broker could not be read",
                ),
            };
            return end_early(ctx, conn, &id, &entry_id, end).await;
        }
    };
    let cancel = CancelToken::new();
    *ctx.current() = Some(Current {
        id: id.clone(),
        entry: entry_id.clone(),
        cancel: cancel.clone(),
        step: 0,
        total: job.request.steps as usize,
        lost: false,
    });
    publish(ctx, conn, &id, "started", "{}".into()).await.ok();
    tracing::info!(attempt = attempts, "running");
    let item = WorkItem {
        id: id.clone(),
        request: job.request,
        cancel: cancel.clone(),
        queue_ms: now_ms().saturating_sub(job.created_at),
        // The one model this worker loaded (it never switches).
        model: ctx.settings.record.model.clone(),
    };
    let outcome = if jobs.send(Work::Job(item)).is_err() {
        Err(RunError::Failed(JobError::new(
            FailureKind::Internal,
            "the worker thread has stopped",
        )))
    } else {
        follow_run(ctx, conn, &id, events, shutdown, &cancel).await
    };
    let lost = ctx.current().as_ref().is_some_and(|c| c.lost);
    let interrupted = *shutdown.borrow() && matches!(outcome, Err(RunError::Cancelled));
    if lost || interrupted {
        *ctx.current() = None;
        if interrupted {
            tracing::info!(
                "interrupted by the worker's shutdown; another worker will take it over"
            );
            publish(ctx, conn, &id, "requeued", "{}".into()).await.ok();
        }
        return Ok(());
    }
    let (end, pngs) = match outcome {
        Ok(out) => {
            let RunOutput {
                params,
                enhancement,
                notices,
                timings,
                peak_memory_bytes,
                plan,
                encoded,
                image_seeds,
                ..
            } = *out;
            let done = RemoteDone {
                params,
                enhancement,
                notices,
                timings,
                peak_memory_bytes,
                plan,
                image_seeds,
            };
            (RemoteEnd::Done(Box::new(done)), encoded)
        }
        Err(RunError::Cancelled) => (RemoteEnd::Cancelled, Vec::new()),
        Err(RunError::Failed(error)) => (RemoteEnd::Failed { error }, Vec::new()),
    };
    // The result must reach the broker before the entry is acknowledged; keep trying while it
    // is away (the heartbeat keeps the entry ours meanwhile).
    let mut backoff = Backoff::default();
    let stored = loop {
        match complete(ctx, conn, &id, &entry_id, &end, &pngs).await {
            Ok(stored) => break Some(stored),
            Err(e) => {
                let e = ctx.settings.broker.error(e);
                if *shutdown.borrow() {
                    tracing::warn!("{e}; shutting down with the result unsent (the job will run again elsewhere)");
                    break None;
                }
                tracing::warn!("could not store the result ({e}); retrying");
                tokio::time::sleep(backoff.next_wait()).await;
                if let Ok(c) = ctx
                    .settings
                    .broker
                    .connect_blocking(Duration::from_millis(BLOCK_MS as u64))
                    .await
                {
                    *conn = c;
                }
            }
        }
    };
    *ctx.current() = None;
    match stored {
        Some(true) => tracing::info!("result stored: {}", end.outcome()),
        Some(false) => tracing::info!("another run's result was stored first; this one is dropped"),
        None => {}
    }
    Ok(())
}

/// Forwards the run's progress and notices to the broker until the worker thread reports the end.
async fn follow_run(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    id: &str,
    events: &mut mpsc::UnboundedReceiver<WorkerEvent>,
    shutdown: &watch::Receiver<bool>,
    cancel: &CancelToken,
) -> Result<Box<RunOutput>, RunError> {
    let mut shutdown = shutdown.clone();
    let mut stopping = *shutdown.borrow();
    if stopping {
        cancel.cancel();
    }
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = shutdown.changed(), if !stopping => {
                stopping = true;
                cancel.cancel();
                continue;
            }
        };
        let Some(ev) = ev else {
            return Err(RunError::Failed(JobError::new(
                FailureKind::Internal,
                "the worker thread has stopped",
            )));
        };
        match ev {
            WorkerEvent::Progress {
                id: ev_id,
                step,
                total,
                elapsed_ms,
            } if ev_id == id => {
                if let Some(c) = ctx.current().as_mut() {
                    c.step = step;
                    c.total = total;
                }
                let p = Progress {
                    step,
                    total,
                    elapsed_ms,
                };
                let data = serde_json::to_string(&p).unwrap_or_default();
                // A lost progress event only makes a bar jump.
                let _ = publish(ctx, conn, id, "progress", data).await;
            }
            WorkerEvent::Notice { id: ev_id, notice } if ev_id == id => {
                let data = serde_json::to_string(&notice).unwrap_or_default();
                // The notices also travel with the result.
                let _ = publish(ctx, conn, id, "notice", data).await;
            }
            WorkerEvent::Finished { id: ev_id, outcome } if ev_id == id => return outcome,
            _ => {}
        }
    }
}
