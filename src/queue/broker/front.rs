//! The front door's side of the broker: hands journaled jobs to the model's stream, follows what
//! the workers report, writes each result's images once, and settles a job in Redis only after
//! the queue actor has journaled its end. Three tasks, each with its own connection and each
//! reconnecting with backoff: commands (enqueue, cancel, settle), the event tail (which also
//! re-synchronises every unsettled job after a (re)connect), and the worker registry.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::{RedisError, Script, Value};
use tokio::sync::{broadcast, mpsc};

use super::wire::{JobEntry, ModelRecord, Progress, RemoteEnd, WorkerInfo};
use super::*;
use crate::queue::job::{image_name, FailureKind, JobError, JobId, JobRecord};
use crate::queue::outputs::StorageProblem;
use crate::queue::worker::{write_all, RunError, RunOutput, WorkerEvent};

/// A worker's recent memory samples (JSON) and a receiver of the live ones.
pub type MemoryFeed = (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>);

/// Memory samples kept per worker for a chart that opens late.
pub const MEMORY_REPLAY: usize = 100;

/// Whether the broker can be reached now (what submissions and `/api/health` check).
#[derive(Debug, Default)]
pub struct BrokerHealth {
    problem: Mutex<Option<String>>,
}

impl BrokerHealth {
    /// `None` when the broker answers; otherwise why not, in one sentence.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn up(&self) {
        let mut p = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        if p.take().is_some() {
            tracing::info!("the broker is reachable again");
        }
    }

    fn down(&self, e: &BrokerError) {
        let mut p = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            tracing::warn!("{e}; reconnecting");
        }
        *p = Some(format!(
            "{e}; new jobs are refused until it is back (accepted jobs are kept and resume)"
        ));
    }
}

enum FrontCmd {
    Enqueue(JobId),
    Cancel(JobId),
    Settle(JobId),
}

struct Known {
    /// The stream entry's JSON ([`JobEntry`]).
    entry: String,
    /// The worker last heard running it.
    worker: Option<String>,
    /// Its result has been handed to the queue.
    delivered: bool,
}

struct Feed {
    recent: VecDeque<Arc<str>>,
    tx: broadcast::Sender<Arc<str>>,
}

struct Shared {
    broker: Broker,
    model: String,
    outputs: PathBuf,
    health: BrokerHealth,
    known: Mutex<HashMap<JobId, Known>>,
    workers: RwLock<Vec<WorkerInfo>>,
    models: RwLock<Vec<ModelRecord>>,
    memory: Mutex<HashMap<String, Feed>>,
    events: mpsc::UnboundedSender<WorkerEvent>,
    /// Jobs the journal has as ended, checked once after the first connection: one whose
    /// settling was cut off (the front door died between journaling its end and telling the
    /// broker) still has a result or an entry there, and is settled then.
    ended: Mutex<Vec<JobId>>,
}

impl Shared {
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Known>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The queue actor's handle on the broker; cheap to clone.
#[derive(Clone)]
pub struct FrontHandle {
    tx: mpsc::UnboundedSender<FrontCmd>,
    shared: Arc<Shared>,
}

impl FrontHandle {
    /// Hands a journaled job to the workers (idempotent: a job the broker has is not added again).
    pub fn enqueue(&self, record: &JobRecord) {
        let entry = JobEntry {
            request: record.request.clone(),
            created_at: record.created_at,
        };
        let entry = serde_json::to_string(&entry).unwrap_or_default();
        self.shared
            .known()
            .entry(record.id.clone())
            .or_insert(Known {
                entry,
                worker: None,
                delivered: false,
            });
        let _ = self.tx.send(FrontCmd::Enqueue(record.id.clone()));
    }

    /// Marks a job cancelled for the worker that runs it (or will pick it up).
    pub fn cancel(&self, id: &str) {
        let _ = self.tx.send(FrontCmd::Cancel(id.to_string()));
    }

    /// The job's end is journaled: the broker may forget it.
    pub fn settle(&self, id: &str) {
        self.shared.known().remove(id);
        let _ = self.tx.send(FrontCmd::Settle(id.to_string()));
    }

    pub fn health(&self) -> &BrokerHealth {
        &self.shared.health
    }

    /// The live workers, by name.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared
            .workers
            .read()
            .map(|w| w.clone())
            .unwrap_or_default()
    }

    /// The models live workers serve (their records).
    pub fn models(&self) -> Vec<ModelRecord> {
        self.shared
            .models
            .read()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Reads the worker registry now (the background task refreshes it every second), so that
    /// a front door lists its workers from its first answer.
    pub async fn refresh(&self) -> Result<(), BrokerError> {
        let broker = &self.shared.broker;
        let mut conn = broker.connect().await?;
        refresh_registry(&self.shared, &mut conn)
            .await
            .map_err(|e| broker.error(e))
    }

    /// The model this front door serves.
    pub fn model(&self) -> &str {
        &self.shared.model
    }

    /// A worker's recent memory samples (JSON) and the live ones after them; `None` for a worker
    /// that has sent none.
    pub fn memory(&self, worker: &str) -> Option<MemoryFeed> {
        let feeds = self.shared.memory.lock().unwrap_or_else(|e| e.into_inner());
        let f = feeds.get(worker)?;
        Some((f.recent.iter().cloned().collect(), f.tx.subscribe()))
    }
}

/// Reads the model's record, waiting (with a log line) until a worker of it has registered once.
/// Without `model`, the one model workers have registered is taken; several are an error.
pub async fn wait_for_model(
    broker: &Broker,
    model: Option<&str>,
) -> Result<ModelRecord, BrokerError> {
    let mut conn = broker.connect_patiently("the front door", None).await?;
    let mut told = false;
    loop {
        let name = match model {
            Some(m) => Some(m.to_string()),
            None => {
                let mut names: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(models_key())
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| broker.error(e))?;
                names.sort();
                if names.len() > 1 {
                    return Err(BrokerError::Other(format!(
                        "workers of several models have registered with the broker ({}); name the \
                         one this front door serves with --model",
                        names.join(", ")
                    )));
                }
                names.pop()
            }
        };
        if let Some(name) = name {
            let raw: Option<String> = redis::cmd("GET")
                .arg(model_key(&name))
                .query_async(&mut conn)
                .await
                .map_err(|e| broker.error(e))?;
            if let Some(raw) = raw {
                return serde_json::from_str(&raw).map_err(|e| {
                    BrokerError::Other(format!(
                        "the broker's record of model `{name}` is unreadable ({e}); start a worker \
                         of it again to rewrite it"
                    ))
                });
            }
        }
        if !told {
            tracing::warn!(
                "waiting for a worker{} to register with the broker at {} (start one with `zturbo \
                 worker --broker URL --model …`)",
                model
                    .map(|m| format!(" of model `{m}`"))
                    .unwrap_or_default(),
                broker.shown()
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Starts the transport on the current runtime. `recovered` are the journal's unfinished jobs:
/// they are known from the start, so a result that waits for one of them is taken, not dropped.
pub fn start(
    broker: Broker,
    model: String,
    outputs: PathBuf,
    recovered: &[JobRecord],
    events: mpsc::UnboundedSender<WorkerEvent>,
) -> FrontHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        broker,
        model,
        outputs,
        health: BrokerHealth::default(),
        known: Mutex::new(HashMap::new()),
        workers: RwLock::new(Vec::new()),
        models: RwLock::new(Vec::new()),
        memory: Mutex::new(HashMap::new()),
        events,
        ended: Mutex::new(
            recovered
                .iter()
                .filter(|r| r.state.is_terminal())
                .map(|r| r.id.clone())
                .collect(),
        ),
    });
    let handle = FrontHandle { tx, shared };
    for r in recovered.iter().filter(|r| !r.state.is_terminal()) {
        handle.enqueue(r);
    }
    tokio::spawn(commands(handle.shared.clone(), rx));
    tokio::spawn(tail(handle.shared.clone()));
    tokio::spawn(registry(handle.shared.clone()));
    handle
}

/// Connects, marking the broker down (and backing off) while it cannot be reached.
async fn reconnect(
    shared: &Shared,
    backoff: &mut Backoff,
    blocking: Option<Duration>,
) -> MultiplexedConnection {
    loop {
        let conn = match blocking {
            Some(b) => shared.broker.connect_blocking(b).await,
            None => shared.broker.connect().await,
        };
        match conn {
            Ok(c) => {
                backoff.reset();
                return c;
            }
            Err(e) => {
                shared.health.down(&e);
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

async fn commands(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<FrontCmd>) {
    let mut queue: VecDeque<FrontCmd> = VecDeque::new();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut backoff = Backoff::default();
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(c) => queue.push_back(c),
                None => return,
            }
        }
        while let Ok(c) = rx.try_recv() {
            queue.push_back(c);
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => conn.insert(reconnect(&shared, &mut backoff, None).await),
        };
        while let Some(cmd) = queue.front() {
            match command(&shared, c, cmd).await {
                Ok(()) => {
                    queue.pop_front();
                }
                Err(e) => {
                    let e = shared.broker.error(e);
                    shared.health.down(&e);
                    conn = None;
                    tokio::time::sleep(backoff.next_wait()).await;
                    break;
                }
            }
        }
    }
}

async fn command(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    cmd: &FrontCmd,
) -> Result<(), RedisError> {
    match cmd {
        FrontCmd::Enqueue(id) => {
            let entry = match shared.known().get(id) {
                Some(k) => k.entry.clone(),
                // Settled before it could be handed over.
                None => return Ok(()),
            };
            if enqueue(shared, conn, id, &entry).await? == "result" {
                deliver(shared, conn, id).await?;
            }
            Ok(())
        }
        FrontCmd::Cancel(id) => {
            redis::cmd("SET")
                .arg(cancel_key(id))
                .arg("1")
                .arg("EX")
                .arg(CANCEL_TTL_S)
                .query_async::<()>(conn)
                .await
        }
        FrontCmd::Settle(id) => {
            Script::new(SETTLE_LUA)
                .key(result_key(id))
                .key(done_key(id))
                .key(enqueued_key(id))
                .key(cancel_key(id))
                .key(attempts_key(id))
                .arg(DONE_TTL_S)
                .invoke_async::<i64>(conn)
                .await?;
            Ok(())
        }
    }
}

async fn enqueue(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    id: &str,
    entry: &str,
) -> Result<String, RedisError> {
    let status: String = Script::new(ENQUEUE_LUA)
        .key(done_key(id))
        .key(result_key(id))
        .key(enqueued_key(id))
        .key(jobs_key(&shared.model))
        .arg(id)
        .arg(entry)
        .invoke_async(conn)
        .await?;
    if status == "settled" {
        tracing::warn!(job_id = %id, "the broker has already settled this job");
    }
    Ok(status)
}

/// Takes a job's stored result: writes its images (all or none), hands the outcome to the queue.
/// A result already handed over, or gone, is left alone.
async fn deliver(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    id: &str,
) -> Result<(), RedisError> {
    {
        let mut known = shared.known();
        match known.get_mut(id) {
            Some(k) if !k.delivered => k.delivered = true,
            _ => return Ok(()),
        }
    }
    let fields: HashMap<String, Vec<u8>> = match redis::cmd("HGETALL")
        .arg(result_key(id))
        .query_async(conn)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            if let Some(k) = shared.known().get_mut(id) {
                k.delivered = false;
            }
            return Err(e);
        }
    };
    if fields.is_empty() {
        if let Some(k) = shared.known().get_mut(id) {
            k.delivered = false;
        }
        return Ok(());
    }
    let worker = fields
        .get("worker")
        .map(|w| String::from_utf8_lossy(w).into_owned());
    let outcome = read_result(shared, id, &fields).await;
    if let Some(worker) = worker {
        let _ = shared.events.send(WorkerEvent::Started {
            id: id.to_string(),
            worker,
        });
    }
    let _ = shared.events.send(WorkerEvent::Finished {
        id: id.to_string(),
        outcome,
    });
    Ok(())
}

async fn read_result(
    shared: &Shared,
    id: &str,
    fields: &HashMap<String, Vec<u8>>,
) -> Result<Box<RunOutput>, RunError> {
    let end: RemoteEnd = fields
        .get("record")
        .and_then(|r| serde_json::from_slice(r).ok())
        .ok_or_else(|| {
            RunError::Failed(JobError::new(
                FailureKind::Internal,
                "the worker's result could not be read",
            ))
        })?;
    let done = match end {
        RemoteEnd::Done(d) => d,
        RemoteEnd::Failed { error } => return Err(RunError::Failed(error)),
        RemoteEnd::Cancelled => return Err(RunError::Cancelled),
    };
    let count: usize = fields
        .get("images")
        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
        .unwrap_or(0);
    let mut files = Vec::with_capacity(count);
    for n in 1..=count {
        let png = fields.get(&format!("png:{n}")).cloned().ok_or_else(|| {
            RunError::Failed(JobError::new(
                FailureKind::Internal,
                format!("the worker's result lacks image {n} of {count}"),
            ))
        })?;
        files.push((image_name(id, n), png));
    }
    let outputs = shared.outputs.clone();
    let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let written = tokio::task::spawn_blocking(move || write_all(&outputs, &files))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    if let Err(e) = written {
        return Err(RunError::Failed(JobError::new(
            StorageProblem::of(&e).into(),
            format!(
                "could not write the images to {}: {e}",
                shared.outputs.display()
            ),
        )));
    }
    Ok(Box::new(RunOutput {
        params: done.params,
        enhancement: done.enhancement,
        notices: done.notices,
        timings: done.timings,
        peak_memory_bytes: done.peak_memory_bytes,
        plan: done.plan,
        images: names,
        encoded: Vec::new(),
        image_seeds: done.image_seeds,
    }))
}

/// The id of a stream's newest entry (`0-0` when it is empty): reading on from there misses
/// nothing that comes later.
async fn last_id(conn: &mut MultiplexedConnection, key: &str) -> Result<String, RedisError> {
    let r: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(r.ids
        .first()
        .map(|e| e.id.clone())
        .unwrap_or_else(|| "0-0".into()))
}

async fn tail(shared: Arc<Shared>) {
    let mut backoff = Backoff::default();
    let block = Duration::from_millis(BLOCK_MS as u64);
    loop {
        let mut conn = reconnect(&shared, &mut backoff, Some(block)).await;
        if let Err(e) = follow(&shared, &mut conn).await {
            shared.health.down(&shared.broker.error(e));
            tokio::time::sleep(backoff.next_wait()).await;
        }
    }
}

/// One connection's life of the event tail: fix where to read from, bring every unsettled job
/// up to date (added again if the broker lost it, its result taken if one waits), then follow.
async fn follow(shared: &Shared, conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
    let mut events_from = last_id(conn, &events_key()).await?;
    let mut memory_from = last_id(conn, &memory_key()).await?;
    ensure_group(conn, &jobs_key(&shared.model)).await?;
    let pending: Vec<(JobId, String)> = shared
        .known()
        .iter()
        .filter(|(_, k)| !k.delivered)
        .map(|(id, k)| (id.clone(), k.entry.clone()))
        .collect();
    for (id, entry) in pending {
        if enqueue(shared, conn, &id, &entry).await? == "result" {
            deliver(shared, conn, &id).await?;
        }
    }
    settle_ended(shared, conn).await?;
    shared.health.up();
    loop {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(500)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(events_key())
            .arg(memory_key())
            .arg(&events_from)
            .arg(&memory_from)
            .query_async(conn)
            .await?;
        shared.health.up();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            let is_events = key.key == events_key();
            for entry in key.ids {
                if is_events {
                    events_from = entry.id.clone();
                    event(shared, conn, &entry.map).await?;
                } else {
                    memory_from = entry.id.clone();
                    sample(shared, &entry.map);
                }
            }
        }
    }
}

/// Settles the journal's ended jobs that the broker still holds (see [`Shared::ended`]).
async fn settle_ended(shared: &Shared, conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
    let ended = std::mem::take(&mut *shared.ended.lock().unwrap_or_else(|e| e.into_inner()));
    let result = async {
        for chunk in ended.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.exists(result_key(id)).exists(enqueued_key(id));
            }
            let held: Vec<bool> = pipe.query_async(conn).await?;
            for (id, held) in chunk.iter().zip(held.chunks(2)) {
                if held.iter().any(|h| *h) {
                    tracing::info!(job_id = %id, "settling a job whose end was journaled before the broker heard of it");
                    command(shared, conn, &FrontCmd::Settle(id.clone())).await?;
                }
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        // Tried again after the next connection.
        *shared.ended.lock().unwrap_or_else(|e| e.into_inner()) = ended;
    }
    result
}

fn text(map: &HashMap<String, Value>, key: &str) -> Option<String> {
    map.get(key)
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

async fn event(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    map: &HashMap<String, Value>,
) -> Result<(), RedisError> {
    let (Some(id), Some(kind), Some(worker)) =
        (text(map, "job"), text(map, "kind"), text(map, "worker"))
    else {
        return Ok(());
    };
    let data = text(map, "data").unwrap_or_default();
    let new_worker = {
        let mut known = shared.known();
        let Some(k) = known.get_mut(&id) else {
            // Not this front door's job, or already settled.
            return Ok(());
        };
        if kind == "end" {
            false
        } else if kind == "requeued" {
            k.worker = None;
            false
        } else if k.worker.as_deref() != Some(worker.as_str()) {
            k.worker = Some(worker.clone());
            true
        } else {
            false
        }
    };
    if new_worker {
        // A progress event can be the first word of a run (the front door restarted meanwhile).
        let _ = shared.events.send(WorkerEvent::Started {
            id: id.clone(),
            worker: worker.clone(),
        });
    }
    match kind.as_str() {
        "progress" => {
            if let Ok(p) = serde_json::from_str::<Progress>(&data) {
                let _ = shared.events.send(WorkerEvent::Progress {
                    id,
                    step: p.step,
                    total: p.total,
                    elapsed_ms: p.elapsed_ms,
                });
            }
        }
        "notice" => {
            if let Ok(notice) = serde_json::from_str(&data) {
                let _ = shared.events.send(WorkerEvent::Notice { id, notice });
            }
        }
        "requeued" => {
            let _ = shared.events.send(WorkerEvent::Requeued { id });
        }
        "end" => deliver(shared, conn, &id).await?,
        _ => {}
    }
    Ok(())
}

fn sample(shared: &Shared, map: &HashMap<String, Value>) {
    let (Some(worker), Some(data)) = (text(map, "worker"), text(map, "sample")) else {
        return;
    };
    let data: Arc<str> = data.into();
    let mut feeds = shared.memory.lock().unwrap_or_else(|e| e.into_inner());
    let feed = feeds.entry(worker).or_insert_with(|| Feed {
        recent: VecDeque::new(),
        tx: broadcast::channel(256).0,
    });
    if feed.recent.len() >= MEMORY_REPLAY {
        feed.recent.pop_front();
    }
    feed.recent.push_back(data.clone());
    let _ = feed.tx.send(data);
}

/// Keeps the list of live workers (and the models they serve) fresh, once a second.
async fn registry(shared: Arc<Shared>) {
    let mut conn: Option<MultiplexedConnection> = None;
    loop {
        if conn.is_none() {
            conn = shared.broker.connect().await.ok();
        }
        if let Some(c) = conn.as_mut() {
            if refresh_registry(&shared, c).await.is_err() {
                conn = None;
                if let Ok(mut w) = shared.workers.write() {
                    w.clear();
                }
            }
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

async fn refresh_registry(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
) -> Result<(), RedisError> {
    let (workers, models) = read_registry(conn).await?;
    let live: Vec<String> = workers.iter().map(|w| w.name.clone()).collect();
    if let Ok(mut w) = shared.workers.write() {
        *w = workers;
    }
    if let Ok(mut m) = shared.models.write() {
        *m = models;
    }
    // Feeds of workers that are gone are dropped.
    shared
        .memory
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|name, _| live.contains(name));
    Ok(())
}

/// The registered workers that are alive (those whose heartbeat key expired are struck off) and
/// the records of the models they serve.
pub async fn read_registry(
    conn: &mut MultiplexedConnection,
) -> Result<(Vec<WorkerInfo>, Vec<ModelRecord>), RedisError> {
    let mut names: Vec<String> = redis::cmd("SMEMBERS")
        .arg(workers_key())
        .query_async(conn)
        .await?;
    names.sort();
    let mut workers = Vec::new();
    if !names.is_empty() {
        let keys: Vec<String> = names.iter().map(|n| worker_key(n)).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        for (name, raw) in names.iter().zip(raw) {
            match raw.and_then(|r| serde_json::from_str::<WorkerInfo>(&r).ok()) {
                Some(w) => workers.push(w),
                None => {
                    redis::cmd("SREM")
                        .arg(workers_key())
                        .arg(name)
                        .query_async::<()>(conn)
                        .await?
                }
            }
        }
    }
    let mut served: Vec<String> = workers.iter().map(|w| w.model.clone()).collect();
    served.sort();
    served.dedup();
    let mut models = Vec::new();
    if !served.is_empty() {
        let keys: Vec<String> = served.iter().map(|m| model_key(m)).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        models = raw
            .into_iter()
            .flatten()
            .filter_map(|r| serde_json::from_str(&r).ok())
            .collect();
    }
    Ok((workers, models))
}
