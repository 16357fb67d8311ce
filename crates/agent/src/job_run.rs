//! Job submission (FIG. 9): the key check (S52-S54) through the partition's
//! fence, the build (FIG. 5), the run (S55) and its record (S56-S57).

use crate::driver::{self, JobEnd, JobOutcome, JobSpec, PartitionSpec};
use crate::{Agent, AgentError, RunningJob};
use leasehold_api::{JobResult, JobState, SubmitJobRequest};
use leasehold_core::fence::{FenceAction, FenceEvent};
use leasehold_core::key::{self, KeyRejection};
use leasehold_core::{FieldError, PartitionRef, Terms};
use leasehold_store::agent::JobRow;

/// A job the agent recorded and may run: its id, its switch, when it began.
struct RegisteredJob {
    job_id: u64,
    cancel: tokio::sync::watch::Receiver<bool>,
    started_at_ms: u64,
}

impl Agent {
    /// FIG. 9: check the key (S52-S54), build the partition if needed
    /// (FIG. 5), run the job (S55) and report its end (S56-S57). Live output
    /// goes to `output`; `started` learns the job id once it runs.
    pub(crate) async fn run_job(
        &self,
        index: u32,
        request: SubmitJobRequest,
        output: Option<driver::OutputSender>,
        started: Option<tokio::sync::oneshot::Sender<u64>>,
    ) -> Result<JobResult, AgentError> {
        use tracing::Instrument;
        // Every line logged while the job is handled carries its lease and
        // job ids (recorded once known) through this span.
        let span = tracing::info_span!(
            "job",
            partition = index,
            lease_id = tracing::field::Empty,
            job_id = tracing::field::Empty
        );
        let result = self
            .run_job_with_key(index, request, output, started)
            .instrument(span.clone())
            .await;
        self.metrics.count_job(&result);
        match &result {
            Ok(job) => span.in_scope(|| {
                tracing::info!(state = job.state.as_str(), exit_code = ?job.exit_code, "job ended")
            }),
            // Logged at a bounded rate (`refused`); in the span, a key
            // refused after its signature verified names its lease.
            Err(AgentError::KeyRejected(reason)) => {
                span.in_scope(|| self.note_refused_key(Some(index), reason))
            }
            Err(error) => span.in_scope(|| tracing::info!(%error, "job refused or failed")),
        }
        result
    }

    async fn run_job_with_key(
        &self,
        index: u32,
        request: SubmitJobRequest,
        output: Option<driver::OutputSender>,
        started: Option<tokio::sync::oneshot::Sender<u64>>,
    ) -> Result<JobResult, AgentError> {
        let claims = self
            .verify_key_for_partition(index, &request.lease_key)
            .await?;
        tracing::Span::current().record("lease_id", claims.lease_id);
        self.confirm_key_with_broker(&claims).await?;
        let lock = self.partition_lock(index);
        let _guard = lock.lock().await;
        // Under the lock: two jobs of a new carved lease make one row.
        self.ensure_carved_row(&claims)?;
        let decided = self.drive_fence(
            index,
            FenceEvent::KeyPresented {
                lease_id: claims.lease_id,
                epoch: claims.epoch,
                key_valid_from_ms: claims.not_before_ms.unwrap_or(0),
                key_expires_at_ms: claims.expires_at_ms,
            },
        )?;
        let spec = self.partition_for_lease(index, &claims)?;
        if let Some(rights) = &self.rights {
            // Seed 004: a lease of more vCPUs than the partition has
            // modules active first requests the rights for them.
            rights
                .ensure_active(index, spec.terms.vcpus, &self.config.lender_token)
                .await?;
        }
        let image = pick_image(&spec, request.image.as_deref())?;
        if decided.must(FenceAction::Build) {
            self.build_for_lease(&spec, &claims)?;
        }
        let job = self.register_job(index, &claims, &request.command)?;
        tracing::Span::current().record("job_id", job.job_id);
        if let Some(started) = started {
            let _ = started.send(job.job_id);
        }
        let outcome = self
            .driver
            .run_job(JobSpec {
                partition: spec,
                command: request.command.clone(),
                timeout: request.timeout_ms.map(std::time::Duration::from_millis),
                image: Some(image),
                cancel: job.cancel.clone(),
                output,
            })
            .await;
        self.forget_running_job(job.job_id);
        self.record_outcome(index, &claims, request.command, &job, outcome)
    }

    /// A verified key for this host and partition. Refused before it waits
    /// for the partition's lock, so it cannot queue behind a running job.
    async fn verify_key_for_partition(
        &self,
        index: u32,
        token: &str,
    ) -> Result<key::LeaseKeyClaims, AgentError> {
        let claims = self
            .verify_lease_key(token)
            .await
            .map_err(AgentError::KeyRejected)?;
        if claims.host_id != self.host_id() {
            return Err(AgentError::KeyRejected(KeyRejection::WrongHost));
        }
        if claims.partition_index != index {
            return Err(AgentError::KeyRejected(KeyRejection::WrongPartition));
        }
        Ok(claims)
    }

    /// The partition as this lease gets it: the terms the broker sold.
    fn partition_for_lease(
        &self,
        index: u32,
        claims: &key::LeaseKeyClaims,
    ) -> Result<PartitionSpec, AgentError> {
        let mut row = self.load(index)?;
        if let Some(sold) = &claims.terms {
            self.adopt_sold_terms(&mut row, sold)?;
        }
        Ok(PartitionSpec {
            index,
            terms: row.terms,
        })
    }

    /// Builds the partition, then records that it is built for this lease
    /// (refused if a release came meanwhile: the job must not start) and
    /// the cores the driver gave it.
    fn build_for_lease(
        &self,
        spec: &PartitionSpec,
        claims: &key::LeaseKeyClaims,
    ) -> Result<(), AgentError> {
        self.driver.build(spec)?;
        self.drive_fence(
            spec.index,
            FenceEvent::Built {
                lease_id: claims.lease_id,
                epoch: claims.epoch,
            },
        )?;
        self.persist_cores(spec.index)
    }

    /// Records the job and makes it cancellable, then checks the fence
    /// again: a release notice writes its fence before it cancels jobs, so
    /// either it saw this job registered and cancelled it, or the fence is
    /// visible here and the job never starts.
    fn register_job(
        &self,
        index: u32,
        claims: &key::LeaseKeyClaims,
        command: &[String],
    ) -> Result<RegisteredJob, AgentError> {
        let started_at_ms = self.config.clock.now_ms();
        let job_id = self
            .db()
            .insert_job(index, claims.lease_id, command, started_at_ms)?;
        let (stop, cancel) = tokio::sync::watch::channel(false);
        self.running_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                job_id,
                RunningJob {
                    index,
                    lease_id: claims.lease_id,
                    stop,
                },
            );
        let admitted = self
            .db()
            .partition(index)?
            .is_some_and(|row| row.fence.admits_job(claims.lease_id, claims.epoch));
        if !admitted {
            self.forget_running_job(job_id);
            self.db().finish_job(&JobRow {
                job_id,
                index,
                lease_id: claims.lease_id,
                command: command.to_vec(),
                state: JobState::Cancelled,
                exit_code: None,
                stdout: String::new(),
                stderr: "the lease was released before the job started\n".into(),
                output_truncated: false,
                started_at_ms,
                finished_at_ms: Some(self.config.clock.now_ms()),
            })?;
            return Err(AgentError::KeyRejected(KeyRejection::Released));
        }
        Ok(RegisteredJob {
            job_id,
            cancel,
            started_at_ms,
        })
    }

    fn forget_running_job(&self, job_id: u64) {
        self.running_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job_id);
    }

    /// Writes the job's end into its record and answers it.
    fn record_outcome(
        &self,
        index: u32,
        claims: &key::LeaseKeyClaims,
        command: Vec<String>,
        job: &RegisteredJob,
        outcome: Result<JobOutcome, driver::DriverError>,
    ) -> Result<JobResult, AgentError> {
        let mut record = JobRow {
            job_id: job.job_id,
            index,
            lease_id: claims.lease_id,
            command,
            state: JobState::Failed,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            output_truncated: false,
            started_at_ms: job.started_at_ms,
            finished_at_ms: Some(self.config.clock.now_ms()),
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                record.stderr = format!("{error}\n");
                self.db().finish_job(&record)?;
                return Err(error.into());
            }
        };
        let (state, exit_code) = job_state_of(&outcome);
        let result = JobResult {
            job_id: job.job_id,
            lease_id: claims.lease_id,
            partition: PartitionRef::new(self.host_id(), index),
            state,
            exit_code,
            stdout: outcome.stdout,
            stderr: outcome.stderr,
            output_truncated: outcome.output_truncated,
            wall_ms: outcome.wall_ms,
            cpu_ms: outcome.cpu_ms,
            peak_memory_bytes: outcome.peak_memory_bytes,
            oom_killed: outcome.oom_killed,
        };
        record.state = state;
        record.exit_code = exit_code;
        record.stdout = result.stdout.clone();
        record.stderr = result.stderr.clone();
        record.output_truncated = result.output_truncated;
        self.db().finish_job(&record)?;
        Ok(result)
    }
}

/// The state and exit code a job's end reads as.
fn job_state_of(outcome: &JobOutcome) -> (JobState, Option<i32>) {
    match outcome.end {
        JobEnd::Exited(0) if !outcome.oom_killed => (JobState::Succeeded, Some(0)),
        JobEnd::Exited(code) => (JobState::Failed, Some(code)),
        JobEnd::Signalled(signal) => (JobState::Failed, Some(128 + signal)),
        JobEnd::TimedOut => (JobState::TimedOut, None),
        JobEnd::Cancelled => (JobState::Cancelled, None),
    }
}

/// The image the job boots: the one asked for, or the partition's first; a
/// bare name picks the digest the terms pin for it.
fn pick_image(spec: &PartitionSpec, wanted: Option<&str>) -> Result<String, AgentError> {
    let terms: &Terms = &spec.terms;
    let wanted = wanted
        .map(str::to_string)
        .or_else(|| terms.default_image().map(str::to_string))
        .unwrap_or_default();
    terms
        .images
        .iter()
        .find(|offered| leasehold_core::image_ref::offers_image(offered, &wanted))
        .cloned()
        .ok_or_else(|| {
            AgentError::Invalid(FieldError::new(
                "image",
                format!(
                    "partition {} cannot boot '{wanted}'; its terms offer: {}",
                    spec.index,
                    terms.images.join(", ")
                ),
            ))
        })
}
