//! The queue's handle: what the server asks of the actor.

use super::*;

impl QueueHandle {
    /// Whether the outputs folder can be written (what `/api/health` reports).
    pub fn outputs_health(&self) -> Arc<OutputsHealth> {
        self.outputs.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Accepts a job (journaled before this returns) or refuses it at once.
    pub async fn submit(&self, request: ValidRequest) -> Result<Submitted, SubmitError> {
        self.submit_on(request, None).await
    }

    /// [`QueueHandle::submit`] on `model` (a name `/api/models` lists) instead of the selected one;
    /// the worker switches to it when the job's turn comes.
    pub async fn submit_on(
        &self,
        request: ValidRequest,
        model: Option<String>,
    ) -> Result<Submitted, SubmitError> {
        self.ask(|tx| Command::Submit(request, model, tx))
            .await
            .unwrap_or(Err(SubmitError::Stopped))
    }

    /// Makes `model` the one new jobs run on, and has the worker load it as soon as it is idle.
    pub async fn select_model(&self, model: &str) -> Option<SelectOutcome> {
        self.ask(|tx| Command::SelectModel(model.to_string(), tx))
            .await
    }

    /// Every model switch from now on (`/api/events`, the server's view of the loaded model).
    pub async fn model_events(&self) -> Option<broadcast::Receiver<ModelEvent>> {
        self.ask(Command::SubscribeModels).await
    }

    /// Runs `hook` with each model the worker loads, before the switch is announced anywhere (job
    /// streams, [`Self::model_events`], the A1111 options call): whoever hears "loaded" and then
    /// reads what `hook` updated (the server's `/api/info`) sees the new model.
    pub async fn on_model_loaded(&self, hook: impl Fn(&Loaded) + Send + Sync + 'static) {
        let hook: LoadedHook = Box::new(hook);
        let _ = self.ask(|tx| Command::OnModelLoaded(hook, tx)).await;
    }

    pub async fn get(&self, id: &str) -> Option<JobSnapshot> {
        self.ask(|tx| Command::Get(id.to_string(), tx))
            .await
            .flatten()
    }

    /// Up to `limit` jobs, newest first: queued and running ones too.
    pub async fn list(&self, limit: usize) -> Vec<JobSnapshot> {
        self.ask(|tx| Command::List(limit, tx))
            .await
            .unwrap_or_default()
    }

    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, CancelError> {
        self.ask(|tx| Command::Cancel(id.to_string(), tx))
            .await
            .unwrap_or(Err(CancelError::Stopped))
    }

    /// Cancels the job only if it has not started; whether it did.
    pub async fn cancel_if_queued(&self, id: &str) -> bool {
        self.ask(|tx| Command::CancelQueued(id.to_string(), tx))
            .await
            .unwrap_or(false)
    }

    /// The job's current state and, unless it has ended, a receiver of every event after it
    /// (taken atomically, so nothing falls between the two).
    pub async fn subscribe(&self, id: &str) -> Option<Subscription> {
        self.ask(|tx| Command::Subscribe(id.to_string(), tx))
            .await
            .flatten()
    }

    /// The running job and the number of queued ones, read atomically.
    pub async fn status(&self) -> QueueStatus {
        self.ask(Command::Status).await.unwrap_or(QueueStatus {
            running: None,
            queued: 0,
            loaded: String::new(),
            selected: String::new(),
            switching: None,
        })
    }

    /// Follows a job to its end and returns its final snapshot (`None` if it is unknown or the
    /// queue stopped). Dropping the future does not cancel the job.
    pub async fn wait(&self, id: &str) -> Option<JobSnapshot> {
        let (snap, rx) = self.subscribe(id).await?;
        if let Some(mut rx) = rx.filter(|_| !snap.record.state.is_terminal()) {
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.is_terminal() => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        }
        // The record, not the event: it carries the images, params and error.
        let snap = self.get(id).await?;
        snap.record.state.is_terminal().then_some(snap)
    }

    /// Cancels every queued job (not the running one) in one step; returns their ids.
    pub async fn cancel_queued(&self) -> Vec<JobId> {
        self.ask(Command::CancelAllQueued).await.unwrap_or_default()
    }

    /// Deletes a finished job: its images, its sidecar, its journal entry and its history entry.
    pub async fn delete(&self, id: &str) -> Result<(), DeleteError> {
        self.ask(|tx| Command::Delete(id.to_string(), tx))
            .await
            .unwrap_or(Err(DeleteError::Stopped))
    }

    /// A page of the finished jobs kept in memory (the newest [`HISTORY_LIMIT`]).
    pub async fn history(&self, query: HistoryQuery) -> HistoryPage {
        self.ask(|tx| Command::History(query, tx))
            .await
            .unwrap_or(HistoryPage {
                jobs: Vec::new(),
                next_before: None,
            })
    }

    /// Stops starting jobs and interrupts the running one (it stays journaled and restarts with
    /// the next server); returns once the worker is idle.
    pub async fn shutdown(&self) {
        let _ = self.ask(Command::Shutdown).await;
    }
}
