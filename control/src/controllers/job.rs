//! Job controller: runs a `batch/v1` Job's pods to completion. It keeps up to
//! `spec.parallelism` pods running, never more than the completions still missing, counts the
//! pods that succeeded and failed, and finishes the Job as upstream's 1.31 controller does:
//! `SuccessCriteriaMet` then `Complete` once enough pods succeeded, `FailureTarget` then
//! `Failed` (reason `BackoffLimitExceeded` or `DeadlineExceeded`) once too many failed or the
//! deadline passed; the terminal condition waits until no pod of the Job is still
//! terminating. `spec.suspend` deletes the running pods, `Indexed` completion gives each pod
//! its completion index, and `ttlSecondsAfterFinished` deletes a finished Job (its pods go
//! with it through the garbage collector).
//!
//! What to do is decided by [`plan`], a pure function of the Job, its pods and the time;
//! the controller only carries the plan out. Like the ReplicaSet controller it waits until
//! its own creations and deletions show in the pod cache (its expectations) before it
//! counts pods again.
//!
//! Unlike upstream, pods carry no `batch.kubernetes.io/job-tracking` finalizer and
//! `status.uncountedTerminatedPods` is not used: finished pods are counted while they exist
//! (and the counters never go down), so a finished pod deleted by hand before the Job saw
//! it finish is not counted, and pods the controller deletes are not counted as failed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobSpec, JobStatus};
use k8s_openapi::api::core::v1::{self as core, EnvVar, EnvVarSource, ObjectFieldSelector};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, PostParams, Preconditions, PropagationPolicy};
use kube::{Client, ResourceExt as _};

use super::expectations::PodExpectations;
use super::pod::Pod;
use super::runtime::{
    Cache, Queue, controller_of, controller_reference, feed, is_not_found, pod_is_ready,
    seed_and_run_workers, slow_start_batch, split_key,
};

/// The annotation (and label) holding an Indexed Job's pod's completion index.
pub const COMPLETION_INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";
/// The environment variable an Indexed Job's containers read their index from.
const COMPLETION_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";
/// The `spec.managedBy` of Jobs this controller runs (and of Jobs that name no manager).
const JOB_CONTROLLER_NAME: &str = "kubernetes.io/job-controller";

/// At most this many pods are created or deleted in one pass (upstream's
/// `MaxPodCreateDeletePerSync`).
const MAX_POD_CREATE_DELETE_PER_SYNC: usize = 500;
/// The wait before replacing a failed pod, doubled for each failure since the last success
/// (upstream's `DefaultJobPodFailureBackOff` and `MaxJobPodFailureBackOff`).
const POD_FAILURE_BACKOFF: Duration = Duration::from_secs(10);
const MAX_POD_FAILURE_BACKOFF: Duration = Duration::from_secs(600);

const BACKOFF_LIMIT_EXCEEDED: (&str, &str) = (
    "BackoffLimitExceeded",
    "Job has reached the specified backoff limit",
);
const DEADLINE_EXCEEDED: (&str, &str) = (
    "DeadlineExceeded",
    "Job was active longer than specified deadline",
);
const COMPLETIONS_REACHED: (&str, &str) = (
    "CompletionsReached",
    "Reached expected number of succeeded pods",
);

/// What one look at a Job and its pods decided.
#[derive(Debug, Default)]
pub struct Plan {
    /// The status the Job should have.
    pub status: JobStatus,
    /// Pods to create: one entry per pod, its completion index for an Indexed Job.
    pub create: Vec<Option<i64>>,
    /// Running pods to delete.
    pub delete: Vec<Arc<Pod>>,
    /// When to look again even if nothing changes (a deadline, a back-off, a TTL).
    pub requeue: Option<Duration>,
    /// Whether the Job itself is to be deleted (its `ttlSecondsAfterFinished` ran out).
    pub delete_job: bool,
}

impl Plan {
    fn requeue_within(&mut self, delay: Duration) {
        self.requeue = Some(self.requeue.map_or(delay, |current| current.min(delay)));
    }
}

/// How a Job that stops making pods ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Finish {
    Success,
    Failure {
        reason: &'static str,
        message: &'static str,
    },
}

/// Decides what to do with `job`, given the pods it controls (terminated ones included) and
/// the time. `may_manage` is false while the pod cache may not yet show the controller's
/// last creations and deletions: pods are then neither created nor deleted and the Job is
/// not declared finished, but its counts are still reported.
pub fn plan(job: &Job, pods: &[Arc<Pod>], now: Timestamp, may_manage: bool) -> Plan {
    let spec = job.spec.clone().unwrap_or_default();
    let old = job.status.clone().unwrap_or_default();
    let mut plan = Plan::default();

    if let Some(finished_at) = finish_time(&old) {
        if let Some(ttl) = spec.ttl_seconds_after_finished {
            let expires = finished_at + SignedDuration::from_secs(i64::from(ttl.max(0)));
            match duration_until(expires, now) {
                None => plan.delete_job = true,
                Some(wait) => plan.requeue_within(wait),
            }
        }
        plan.status = old;
        return plan;
    }

    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let parallelism = spec.parallelism.unwrap_or(1).max(0) as usize;
    let completions = spec.completions.map(|c| c.max(0) as usize);
    let suspended = spec.suspend == Some(true);
    let replace_only_failed = spec.pod_replacement_policy.as_deref() == Some("Failed");

    let mut active = Vec::new();
    let mut terminating = 0;
    let mut succeeded_pods = Vec::new();
    let mut failed_pods = Vec::new();
    for pod in pods {
        match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Succeeded") => succeeded_pods.push(pod.clone()),
            Some("Failed") => failed_pods.push(pod.clone()),
            _ if pod.metadata.deletion_timestamp.is_some() => terminating += 1,
            _ => active.push(pod.clone()),
        }
    }

    let failed = old.failed.unwrap_or(0).max(failed_pods.len() as i32);
    let mut completed_indexes = BTreeSet::new();
    let succeeded = if indexed {
        let limit = completions.unwrap_or(0) as i64;
        completed_indexes = parse_indexes(old.completed_indexes.as_deref().unwrap_or(""));
        completed_indexes.extend(
            succeeded_pods
                .iter()
                .filter_map(|pod| completion_index(pod)),
        );
        completed_indexes.retain(|index| *index < limit);
        completed_indexes.len() as i32
    } else {
        old.succeeded.unwrap_or(0).max(succeeded_pods.len() as i32)
    };

    let mut status = old.clone();
    let mut conditions = old.conditions.clone().unwrap_or_default();
    if suspended {
        ensure_condition(
            &mut conditions,
            "Suspended",
            "True",
            ("JobSuspended", "Job suspended"),
            now,
        );
    } else {
        // The deadline counts the time a Job runs without a break, so a resumed Job starts
        // its clock again.
        let resumed = ensure_condition(
            &mut conditions,
            "Suspended",
            "False",
            ("JobResumed", "Job resumed"),
            now,
        );
        if resumed || status.start_time.is_none() {
            status.start_time = Some(Time(now));
        }
    }

    let mut finish = if let Some(target) = true_condition(&conditions, "FailureTarget") {
        Some(Finish::Failure {
            reason: known_reason(target.reason.as_deref()),
            message: known_message(target.reason.as_deref()),
        })
    } else if true_condition(&conditions, "SuccessCriteriaMet").is_some() {
        Some(Finish::Success)
    } else if failed > spec.backoff_limit.unwrap_or(6).max(0)
        || past_backoff_limit_on_failure(&spec, &active)
    {
        Some(failure(BACKOFF_LIMIT_EXCEEDED))
    } else {
        None
    };
    if finish.is_none()
        && !suspended
        && let (Some(deadline), Some(start)) = (spec.active_deadline_seconds, &status.start_time)
    {
        let ends = start.0 + SignedDuration::from_secs(deadline.max(0));
        match duration_until(ends, now) {
            None => finish = Some(failure(DEADLINE_EXCEEDED)),
            Some(wait) => plan.requeue_within(wait),
        }
    }

    if finish.is_some() || suspended {
        // Nothing of a finishing or suspended Job may keep running.
        plan.delete = active.clone();
    } else if may_manage {
        let want = match completions {
            Some(completions) => parallelism.min(completions.saturating_sub(succeeded as usize)),
            // Any success ends a Job without completions: start nothing after one, but let
            // the pods still running finish.
            None if succeeded > 0 => active.len(),
            None => parallelism,
        };
        let counted_terminating = if replace_only_failed { terminating } else { 0 };
        let backoff = failure_backoff(&succeeded_pods, &failed_pods, now);
        if indexed {
            let (create, delete) = manage_indexed(
                &active,
                &completed_indexes,
                completions.unwrap_or(0) as i64,
                want.saturating_sub(counted_terminating),
            );
            plan.delete = delete;
            match backoff {
                Some(wait) if !create.is_empty() => plan.requeue_within(wait),
                _ => plan.create = create.into_iter().map(Some).collect(),
            }
        } else if active.len() > want {
            plan.delete = pods_to_delete(&active, active.len() - want);
        } else if active.len() + counted_terminating < want {
            match backoff {
                Some(wait) => plan.requeue_within(wait),
                None => plan.create = vec![None; want - active.len() - counted_terminating],
            }
        }
        plan.create.truncate(MAX_POD_CREATE_DELETE_PER_SYNC);
        plan.delete.truncate(MAX_POD_CREATE_DELETE_PER_SYNC);
        let active_after = active.len() - plan.delete.len();
        let enough = match completions {
            Some(completions) => succeeded as usize >= completions,
            None => succeeded > 0,
        };
        if enough && active_after == 0 && plan.create.is_empty() {
            finish = Some(Finish::Success);
        }
    }

    let deleted: HashSet<&str> = plan
        .delete
        .iter()
        .filter_map(|pod| pod.metadata.uid.as_deref())
        .collect();
    let still_active: Vec<&Arc<Pod>> = active
        .iter()
        .filter(|pod| !deleted.contains(pod.metadata.uid.as_deref().unwrap_or("")))
        .collect();
    let terminating_after = terminating + deleted.len();
    status.active = nonzero(still_active.len() as i32);
    status.ready = Some(still_active.iter().filter(|pod| pod_is_ready(pod)).count() as i32);
    status.terminating = Some(terminating_after as i32);
    status.succeeded = nonzero(succeeded);
    status.failed = nonzero(failed);
    if indexed {
        status.completed_indexes = Some(format_indexes(&completed_indexes));
    }

    if let Some(finish) = finish {
        let (interim, terminal, (reason, message)) = match finish {
            Finish::Success => ("SuccessCriteriaMet", "Complete", COMPLETIONS_REACHED),
            Finish::Failure { reason, message } => ("FailureTarget", "Failed", (reason, message)),
        };
        ensure_condition(&mut conditions, interim, "True", (reason, message), now);
        // The terminal condition waits until every pod has stopped, so that a client that
        // sees the Job finished never sees one of its pods still running.
        if may_manage && still_active.is_empty() && terminating_after == 0 {
            ensure_condition(&mut conditions, terminal, "True", (reason, message), now);
            if finish == Finish::Success {
                status.completion_time = Some(Time(now));
            }
            if let Some(ttl) = spec.ttl_seconds_after_finished {
                plan.requeue_within(Duration::from_secs(ttl.max(0) as u64));
            }
        }
    }
    status.conditions = (!conditions.is_empty()).then_some(conditions);
    plan.status = status;
    plan
}

fn failure((reason, message): (&'static str, &'static str)) -> Finish {
    Finish::Failure { reason, message }
}

/// The reasons a FailureTarget condition this controller wrote can carry, as `'static`
/// strings (a reason it does not know is reported as a backoff limit).
fn known_reason(reason: Option<&str>) -> &'static str {
    match reason {
        Some(reason) if reason == DEADLINE_EXCEEDED.0 => DEADLINE_EXCEEDED.0,
        _ => BACKOFF_LIMIT_EXCEEDED.0,
    }
}

fn known_message(reason: Option<&str>) -> &'static str {
    match reason {
        Some(reason) if reason == DEADLINE_EXCEEDED.0 => DEADLINE_EXCEEDED.1,
        _ => BACKOFF_LIMIT_EXCEEDED.1,
    }
}

/// Upstream leaves zero counters out (`omitempty`).
fn nonzero(count: i32) -> Option<i32> {
    (count != 0).then_some(count)
}

/// How long from `now` until `moment`, or `None` if it has come.
fn duration_until(moment: Timestamp, now: Timestamp) -> Option<Duration> {
    let left = moment.duration_since(now);
    if left <= SignedDuration::ZERO {
        return None;
    }
    Some(Duration::try_from(left).unwrap_or_default())
}

fn true_condition<'a>(conditions: &'a [JobCondition], type_: &str) -> Option<&'a JobCondition> {
    conditions
        .iter()
        .find(|condition| condition.type_ == type_)
        .filter(|condition| condition.status == "True")
}

/// When the Job finished, if it has: its completion time, or when it was marked Failed.
fn finish_time(status: &JobStatus) -> Option<Timestamp> {
    let conditions = status.conditions.as_deref().unwrap_or_default();
    let finished =
        true_condition(conditions, "Complete").or_else(|| true_condition(conditions, "Failed"))?;
    Some(
        status
            .completion_time
            .as_ref()
            .or(finished.last_transition_time.as_ref())
            .map_or(Timestamp::UNIX_EPOCH, |time| time.0),
    )
}

/// Upstream's `ensureJobConditionStatus`: sets the condition of `type_` to `status` with the
/// reason and message, stamped now, if it differs; a missing condition is added only when
/// True. Returns whether anything changed.
fn ensure_condition(
    conditions: &mut Vec<JobCondition>,
    type_: &str,
    status: &str,
    (reason, message): (&str, &str),
    now: Timestamp,
) -> bool {
    let wanted = JobCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(current) => {
            if current.status == status
                && current.reason.as_deref() == Some(reason)
                && current.message.as_deref() == Some(message)
            {
                return false;
            }
            *current = wanted;
            true
        }
        None if status == "True" => {
            conditions.push(wanted);
            true
        }
        None => false,
    }
}

/// A pod's completion index, if it carries a valid one.
pub fn completion_index(pod: &Pod) -> Option<i64> {
    let text = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(COMPLETION_INDEX_ANNOTATION))
        .or_else(|| pod.labels().get(COMPLETION_INDEX_ANNOTATION))?;
    text.parse().ok().filter(|index| *index >= 0)
}

/// `status.completedIndexes` as upstream writes it: `1,3-5,7` (runs of three or more become
/// ranges).
pub fn format_indexes(indexes: &BTreeSet<i64>) -> String {
    fn push((first, last): (i64, i64), parts: &mut Vec<String>) {
        match last - first {
            0 => parts.push(first.to_string()),
            1 => parts.extend([first.to_string(), last.to_string()]),
            _ => parts.push(format!("{first}-{last}")),
        }
    }
    let mut parts = Vec::new();
    let mut run: Option<(i64, i64)> = None;
    for &index in indexes {
        run = match run {
            Some((first, last)) if index == last + 1 => Some((first, index)),
            Some(done) => {
                push(done, &mut parts);
                Some((index, index))
            }
            None => Some((index, index)),
        };
    }
    if let Some(done) = run {
        push(done, &mut parts);
    }
    parts.join(",")
}

/// The indexes of a `completedIndexes` text; malformed parts are skipped.
pub fn parse_indexes(text: &str) -> BTreeSet<i64> {
    let mut indexes = BTreeSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                if let (Ok(first), Ok(last)) = (first.parse::<i64>(), last.parse::<i64>()) {
                    indexes.extend(first.max(0)..=last);
                }
            }
            None => {
                if let Ok(index) = part.parse::<i64>() {
                    indexes.insert(index);
                }
            }
        }
    }
    indexes
}

/// The indexes to start and the pods to delete for an Indexed Job that wants `want` pods
/// running: pods without a valid index, with an index already completed, or duplicating
/// another pod's index go; then the highest indexes go, or the lowest missing ones start.
fn manage_indexed(
    active: &[Arc<Pod>],
    completed: &BTreeSet<i64>,
    completions: i64,
    want: usize,
) -> (Vec<i64>, Vec<Arc<Pod>>) {
    let mut running: BTreeMap<i64, Arc<Pod>> = BTreeMap::new();
    let mut delete = Vec::new();
    for pod in active {
        match completion_index(pod) {
            Some(index)
                if index < completions
                    && !completed.contains(&index)
                    && !running.contains_key(&index) =>
            {
                running.insert(index, pod.clone());
            }
            _ => delete.push(pod.clone()),
        }
    }
    if running.len() > want {
        let extra = running.len() - want;
        delete.extend(running.values().rev().take(extra).cloned());
        return (Vec::new(), delete);
    }
    let create = (0..completions)
        .filter(|index| !completed.contains(index) && !running.contains_key(index))
        .take(want - running.len())
        .collect();
    (create, delete)
}

/// Upstream's `pastBackoffLimitOnFailure`: with restartPolicy OnFailure failures are
/// container restarts in place, so the restarts of running pods count toward the limit.
fn past_backoff_limit_on_failure(spec: &JobSpec, active: &[Arc<Pod>]) -> bool {
    let restart_policy = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref());
    if restart_policy != Some("OnFailure") {
        return false;
    }
    let restarts: i32 = active
        .iter()
        .filter(|pod| {
            matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Running" | "Pending")
            )
        })
        .filter_map(|pod| pod.status.as_ref())
        .flat_map(|status| {
            status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
        })
        .map(|container| container.restart_count)
        .sum();
    let limit = spec.backoff_limit.unwrap_or(6);
    if limit == 0 {
        restarts > 0
    } else {
        restarts >= limit
    }
}

/// When a pod stopped: its containers' latest finish, else its latest condition change,
/// else its creation.
fn finished_at(pod: &Pod) -> Timestamp {
    let status = pod.status.as_ref();
    let container_finish = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|time| time.0)
        .max();
    let condition_change = || {
        status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.last_transition_time.as_ref())
            .map(|time| time.0)
            .max()
    };
    container_finish
        .or_else(condition_change)
        .or_else(|| pod.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// How much longer new pods must wait after the failures since the last success: 10 s after
/// one, doubling per failure up to 10 minutes, counted from the last failure (upstream's
/// `getRemainingTimeForFailuresCount`). `None` when they may start now.
fn failure_backoff(
    succeeded: &[Arc<Pod>],
    failed: &[Arc<Pod>],
    now: Timestamp,
) -> Option<Duration> {
    let last_success = succeeded.iter().map(|pod| finished_at(pod)).max();
    let failures: Vec<Timestamp> = failed
        .iter()
        .map(|pod| finished_at(pod))
        .filter(|finished| last_success.is_none_or(|success| *finished > success))
        .collect();
    let last_failure = failures.iter().max()?;
    let mut backoff = POD_FAILURE_BACKOFF;
    for _ in 1..failures.len() {
        backoff = (backoff * 2).min(MAX_POD_FAILURE_BACKOFF);
        if backoff == MAX_POD_FAILURE_BACKOFF {
            break;
        }
    }
    let backoff = SignedDuration::try_from(backoff).unwrap_or(SignedDuration::MAX);
    duration_until(*last_failure + backoff, now)
}

/// The running pods to delete first: unscheduled before scheduled, pending before running,
/// not ready before ready, newer before older.
fn pods_to_delete(pods: &[Arc<Pod>], count: usize) -> Vec<Arc<Pod>> {
    let mut ranked = pods.to_vec();
    ranked.sort_by_key(|pod| {
        let scheduled = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|node| !node.is_empty());
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let created = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second());
        (
            scheduled,
            running,
            pod_is_ready(pod),
            std::cmp::Reverse(created),
        )
    });
    ranked.truncate(count);
    ranked
}

/// A new pod of `job`, from its template; `index` is its completion index in an Indexed Job.
/// The API server picks the name from `<job>-` (`<job>-<index>-` when indexed).
pub fn pod_for(job: &Job, index: Option<i64>) -> anyhow::Result<core::Pod> {
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .context("job has no pod template")?;
    let template_meta = template.metadata.unwrap_or_default();
    let mut spec = template.spec.context("job's pod template has no spec")?;
    let mut labels = template_meta.labels.unwrap_or_default();
    let mut annotations = template_meta.annotations.unwrap_or_default();
    let job_name = job.name_any();
    let mut generate_name = format!("{job_name}-");
    if let Some(index) = index {
        annotations.insert(COMPLETION_INDEX_ANNOTATION.to_string(), index.to_string());
        labels.insert(COMPLETION_INDEX_ANNOTATION.to_string(), index.to_string());
        generate_name = format!("{job_name}-{index}-");
        if spec.hostname.as_deref().is_none_or(str::is_empty) {
            spec.hostname = Some(format!("{job_name}-{index}"));
        }
        let index_env = EnvVar {
            name: COMPLETION_INDEX_ENV.to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: None,
                    field_path: format!("metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"),
                }),
                ..EnvVarSource::default()
            }),
        };
        let containers = spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten());
        for container in containers {
            let env = container.env.get_or_insert_with(Vec::new);
            if !env.iter().any(|var| var.name == COMPLETION_INDEX_ENV) {
                env.push(index_env.clone());
            }
        }
    }
    Ok(core::Pod {
        metadata: ObjectMeta {
            generate_name: Some(generate_name),
            namespace: job.namespace(),
            labels: (!labels.is_empty()).then_some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            finalizers: template_meta.finalizers,
            owner_references: Some(vec![controller_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

pub struct JobController {
    client: Client,
    jobs: Cache<Job>,
    pods: Cache<Pod>,
    expectations: PodExpectations,
}

impl JobController {
    pub fn new(client: Client, jobs: Cache<Job>, pods: Cache<Pod>) -> Arc<Self> {
        Arc::new(Self {
            client,
            jobs,
            pods,
            expectations: PodExpectations::default(),
        })
    }

    /// Runs until the caches close.
    pub async fn run(self: Arc<Self>, workers: usize) {
        let queue = Queue::new();
        let jobs = self.jobs.clone();
        let from_jobs = self.jobs.feed_own_keys(queue.clone());
        let from_pods = feed(
            queue.clone(),
            self.pods.subscribe(),
            job_of_pod,
            move || jobs.keys(),
        );
        let _ = self.jobs.store.wait_until_ready().await;
        let _ = self.pods.store.wait_until_ready().await;
        let workers = seed_and_run_workers(
            "job",
            queue,
            &self.jobs,
            workers,
            self.clone(),
            |this, key| async move { this.reconcile(&key).await },
        );
        tokio::join!(from_jobs, from_pods, workers);
    }

    async fn reconcile(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let (namespace, name) = split_key(key);
        let namespace = namespace.unwrap_or("default");
        let Some(job) = self.jobs.get(Some(namespace), name) else {
            self.expectations.forget(key);
            return Ok(None);
        };
        let managed_by = job.spec.as_ref().and_then(|s| s.managed_by.as_deref());
        if job.metadata.deletion_timestamp.is_some()
            || managed_by.is_some_and(|manager| manager != JOB_CONTROLLER_NAME)
        {
            return Ok(None);
        }
        let uid = job.metadata.uid.clone().unwrap_or_default();
        // Judged before the pods are listed: judged after, a cache that caught up in
        // between would satisfy them while the list still missed the pods just created.
        let may_manage = self.expectations.satisfied(key, namespace, &self.pods);
        let pods: Vec<Arc<Pod>> = self
            .pods
            .in_namespace(namespace)
            .into_iter()
            .filter(|pod| controller_of(&**pod).is_some_and(|owner| owner.uid == uid))
            .collect();
        let plan = plan(&job, &pods, Timestamp::now(), may_manage);

        let jobs_api: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        if plan.delete_job {
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            return match jobs_api.delete(name, &params).await {
                Ok(_) => Ok(None),
                Err(error) if is_not_found(&error) => Ok(None),
                Err(error) => Err(error).context(format!("delete finished job {key}")),
            };
        }

        let manage_error = self.manage_pods(key, &job, &plan).await.err();
        if job.status.as_ref() != Some(&plan.status) {
            let mut updated = (*job).clone();
            updated.status = Some(plan.status.clone());
            match jobs_api
                .replace_status(name, &PostParams::default(), &updated)
                .await
            {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context(format!("update status of job {key}")),
            }
        }
        match manage_error {
            Some(error) => Err(error),
            None => Ok(plan.requeue),
        }
    }

    /// Creates and deletes the pods the plan names, recording what it expects to see.
    async fn manage_pods(&self, key: &str, job: &Job, plan: &Plan) -> anyhow::Result<()> {
        let namespace = job.namespace().unwrap_or_default();
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);

        let mut deleted = Vec::new();
        let mut first_error = None;
        let results = futures::future::join_all(plan.delete.iter().map(|pod| {
            let pods_api = pods_api.clone();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pod.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            async move { pods_api.delete(&pod.name_any(), &params).await }
        }))
        .await;
        for (pod, result) in plan.delete.iter().zip(results) {
            match result {
                Ok(_) => {
                    deleted.push((pod.name_any(), pod.metadata.uid.clone().unwrap_or_default()))
                }
                Err(error) if is_not_found(&error) => {}
                Err(error) => {
                    first_error.get_or_insert(
                        anyhow::Error::new(error).context(format!("delete pods of job {key}")),
                    );
                }
            }
        }
        self.expectations.expect(key, Vec::new(), deleted);

        if !plan.create.is_empty() {
            let pods = plan
                .create
                .iter()
                .map(|index| pod_for(job, *index))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let created = Mutex::new(Vec::new());
            let create_api: Api<core::Pod> = Api::namespaced(self.client.clone(), &namespace);
            let (_, error) = slow_start_batch(pods.len(), 1, |i| {
                let pods_api = create_api.clone();
                let pod = pods[i].clone();
                let created = &created;
                async move {
                    let pod = pods_api.create(&PostParams::default(), &pod).await?;
                    created.lock().expect("created lock").push(pod.name_any());
                    anyhow::Ok(())
                }
            })
            .await;
            let created = created.into_inner().expect("created lock");
            tracing::debug!(job = %key, created = created.len(), "created pods");
            self.expectations.expect(key, created, Vec::new());
            if let Some(error) = error {
                first_error.get_or_insert(error.context(format!("create pods for job {key}")));
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// The Job a pod change concerns: its controller, if that is a Job.
fn job_of_pod(pod: &Pod) -> Vec<String> {
    match controller_of(pod) {
        Some(owner) if owner.kind == "Job" && owner.api_version.starts_with("batch/") => {
            vec![format!(
                "{}/{}",
                pod.namespace().unwrap_or_default(),
                owner.name
            )]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::pod::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodCondition, PodSpec, PodStatus,
    };
    use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};

    fn now() -> Timestamp {
        "2026-11-23T08:00:00Z".parse().unwrap()
    }

    fn at(seconds_ago: i64) -> Time {
        Time(now() - SignedDuration::from_secs(seconds_ago))
    }

    fn job(change: impl FnOnce(&mut JobSpec)) -> Job {
        let mut spec = JobSpec {
            parallelism: Some(2),
            completions: Some(3),
            backoff_limit: Some(6),
            completion_mode: Some("NonIndexed".into()),
            suspend: Some(false),
            pod_replacement_policy: Some("TerminatingOrFailed".into()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some([("job-name".to_string(), "pi".to_string())].into()),
                    ..ObjectMeta::default()
                }),
                spec: Some(core::PodSpec {
                    restart_policy: Some("Never".into()),
                    containers: vec![Container {
                        name: "main".into(),
                        image: Some("busybox".into()),
                        ..Container::default()
                    }],
                    ..core::PodSpec::default()
                }),
            },
            ..JobSpec::default()
        };
        change(&mut spec);
        Job {
            metadata: ObjectMeta {
                name: Some("pi".into()),
                namespace: Some("default".into()),
                uid: Some("job-uid".into()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: Some(JobStatus::default()),
        }
    }

    fn with_status(mut job: Job, change: impl FnOnce(&mut JobStatus)) -> Job {
        change(job.status.get_or_insert_with(JobStatus::default));
        job
    }

    /// A pod of the Job in `phase`, finished (if terminal) `finished_ago` seconds ago.
    fn pod(name: &str, phase: &str, finished_ago: i64) -> Arc<Pod> {
        let terminated = matches!(phase, "Succeeded" | "Failed").then(|| ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: i32::from(phase == "Failed"),
                finished_at: Some(at(finished_ago)),
            }),
        });
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                creation_timestamp: Some(at(100)),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "main".into(),
                    state: terminated,
                    ..ContainerStatus::default()
                }]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if phase == "Running" { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        })
    }

    fn indexed_pod(name: &str, phase: &str, index: i64) -> Arc<Pod> {
        let mut pod = (*pod(name, phase, 60)).clone();
        pod.metadata.annotations =
            Some([(COMPLETION_INDEX_ANNOTATION.to_string(), index.to_string())].into());
        Arc::new(pod)
    }

    fn condition<'a>(plan: &'a Plan, type_: &str) -> Option<&'a JobCondition> {
        plan.status
            .conditions
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|c| c.type_ == type_)
    }

    fn names(pods: &[Arc<Pod>]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn a_new_job_starts_parallelism_pods_and_its_clock() {
        let plan = plan(&job(|_| {}), &[], now(), true);
        assert_eq!(plan.create, vec![None, None]);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.status.start_time, Some(Time(now())));
        assert_eq!(plan.status.active, None);
        assert_eq!(plan.status.ready, Some(0));
        assert!(plan.status.conditions.is_none());
    }

    #[test]
    fn never_more_pods_than_completions_left() {
        let pods = [pod("a", "Succeeded", 5), pod("b", "Succeeded", 4)];
        let plan = plan(&job(|_| {}), &pods, now(), true);
        assert_eq!(plan.create, vec![None], "one completion is missing");
        assert_eq!(plan.status.succeeded, Some(2));
        let plan_running = super::plan(
            &job(|_| {}),
            &[pods[0].clone(), pods[1].clone(), pod("c", "Running", 0)],
            now(),
            true,
        );
        assert!(plan_running.create.is_empty());
        assert_eq!(plan_running.status.active, Some(1));
        assert_eq!(plan_running.status.ready, Some(1));
    }

    #[test]
    fn nothing_is_created_or_finished_while_expectations_are_pending() {
        let plan = plan(&job(|_| {}), &[], now(), false);
        assert!(plan.create.is_empty());
        let done = [
            pod("a", "Succeeded", 5),
            pod("b", "Succeeded", 4),
            pod("c", "Succeeded", 3),
        ];
        let plan = super::plan(&job(|_| {}), &done, now(), false);
        assert!(condition(&plan, "Complete").is_none());
    }

    #[test]
    fn enough_successes_complete_the_job_in_one_pass() {
        let pods = [
            pod("a", "Succeeded", 5),
            pod("b", "Succeeded", 4),
            pod("c", "Succeeded", 3),
        ];
        let plan = plan(&job(|_| {}), &pods, now(), true);
        assert!(plan.create.is_empty());
        let met = condition(&plan, "SuccessCriteriaMet").expect("interim condition");
        assert_eq!(met.status, "True");
        let complete = condition(&plan, "Complete").expect("terminal condition");
        assert_eq!(complete.reason.as_deref(), Some("CompletionsReached"));
        assert_eq!(plan.status.completion_time, Some(Time(now())));
        assert_eq!(plan.status.succeeded, Some(3));
        assert_eq!(plan.status.active, None);
    }

    #[test]
    fn completion_waits_for_extra_pods_to_stop() {
        let pods = [
            pod("a", "Succeeded", 5),
            pod("b", "Succeeded", 4),
            pod("c", "Succeeded", 3),
            pod("d", "Running", 0),
        ];
        let plan = plan(&job(|_| {}), &pods, now(), true);
        assert_eq!(names(&plan.delete), ["d"]);
        assert!(condition(&plan, "SuccessCriteriaMet").is_some());
        assert!(
            condition(&plan, "Complete").is_none(),
            "d is still stopping"
        );
        assert_eq!(plan.status.terminating, Some(1));
        // Next pass: d is gone; the interim condition leads to the terminal one.
        let job = with_status(job(|_| {}), |s| *s = plan.status.clone());
        let plan = super::plan(&job, &pods[..3], now(), true);
        assert!(condition(&plan, "Complete").is_some());
    }

    #[test]
    fn without_completions_one_success_ends_the_job_once_the_others_finish() {
        let unset = |spec: &mut JobSpec| spec.completions = None;
        let pods = [pod("a", "Succeeded", 5), pod("b", "Running", 0)];
        let plan = plan(&job(unset), &pods, now(), true);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert!(condition(&plan, "Complete").is_none());
        let plan = super::plan(&job(unset), &pods[..1], now(), true);
        assert!(condition(&plan, "Complete").is_some());
    }

    #[test]
    fn failures_beyond_the_backoff_limit_fail_the_job() {
        let limit_one = |spec: &mut JobSpec| spec.backoff_limit = Some(1);
        // One failure is within a limit of 1: replaced, after the back-off.
        let plan = plan(&job(limit_one), &[pod("a", "Failed", 3)], now(), true);
        assert!(plan.create.is_empty(), "back-off: no pod yet");
        assert_eq!(plan.requeue, Some(Duration::from_secs(7)));
        assert_eq!(plan.status.failed, Some(1));
        let plan = super::plan(&job(limit_one), &[pod("a", "Failed", 30)], now(), true);
        assert_eq!(plan.create.len(), 2);
        // A second failure is one too many: the running pod goes, the Job fails.
        let pods = [
            pod("a", "Failed", 30),
            pod("b", "Failed", 1),
            pod("c", "Running", 0),
        ];
        let plan = super::plan(&job(limit_one), &pods, now(), true);
        assert_eq!(names(&plan.delete), ["c"]);
        assert!(plan.create.is_empty());
        let target = condition(&plan, "FailureTarget").expect("interim condition");
        assert_eq!(target.reason.as_deref(), Some("BackoffLimitExceeded"));
        assert!(condition(&plan, "Failed").is_none(), "c is still stopping");
        let job = with_status(job(limit_one), |s| *s = plan.status.clone());
        let plan = super::plan(&job, &pods[..2], now(), true);
        let failed = condition(&plan, "Failed").expect("terminal condition");
        assert_eq!(failed.reason.as_deref(), Some("BackoffLimitExceeded"));
        assert_eq!(
            failed.message.as_deref(),
            Some("Job has reached the specified backoff limit")
        );
        assert_eq!(plan.status.completion_time, None);
        assert_eq!(plan.status.failed, Some(2));
    }

    #[test]
    fn failure_backoff_doubles_and_resets_after_a_success() {
        let failed = [pod("a", "Failed", 50), pod("b", "Failed", 5)];
        // Two failures: 20 s from the last one.
        assert_eq!(
            failure_backoff(&[], &failed, now()),
            Some(Duration::from_secs(15))
        );
        // A success after the first failure: only the second counts, 10 s.
        let succeeded = [pod("s", "Succeeded", 20)];
        assert_eq!(
            failure_backoff(&succeeded, &failed, now()),
            Some(Duration::from_secs(5))
        );
        let many: Vec<_> = (0..20)
            .map(|i| pod(&format!("f{i}"), "Failed", 1))
            .collect();
        assert_eq!(
            failure_backoff(&[], &many, now()),
            Some(Duration::from_secs(599))
        );
        assert_eq!(failure_backoff(&succeeded, &[], now()), None);
    }

    #[test]
    fn restarts_count_toward_the_limit_with_restart_policy_on_failure() {
        let on_failure = |spec: &mut JobSpec| {
            spec.backoff_limit = Some(2);
            spec.template.spec.as_mut().unwrap().restart_policy = Some("OnFailure".into());
        };
        let mut restarted = (*pod("a", "Running", 0)).clone();
        restarted
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .restart_count = 2;
        let plan = plan(&job(on_failure), &[Arc::new(restarted)], now(), true);
        let target = condition(&plan, "FailureTarget").expect("failure");
        assert_eq!(target.reason.as_deref(), Some("BackoffLimitExceeded"));
    }

    #[test]
    fn the_active_deadline_fails_the_job_and_is_waited_for() {
        let deadline = |spec: &mut JobSpec| spec.active_deadline_seconds = Some(60);
        let running = [pod("a", "Running", 0)];
        let started = with_status(job(deadline), |s| s.start_time = Some(at(20)));
        let plan = plan(&started, &running, now(), true);
        assert_eq!(plan.requeue, Some(Duration::from_secs(40)));
        assert!(condition(&plan, "FailureTarget").is_none());
        let late = with_status(job(deadline), |s| s.start_time = Some(at(61)));
        let plan = super::plan(&late, &running, now(), true);
        assert_eq!(names(&plan.delete), ["a"]);
        let target = condition(&plan, "FailureTarget").expect("deadline");
        assert_eq!(target.reason.as_deref(), Some("DeadlineExceeded"));
        let late = with_status(late, |s| *s = plan.status.clone());
        let plan = super::plan(&late, &[], now(), true);
        let failed = condition(&plan, "Failed").expect("terminal");
        assert_eq!(failed.reason.as_deref(), Some("DeadlineExceeded"));
    }

    #[test]
    fn suspending_deletes_running_pods_and_resuming_restarts_the_clock() {
        let suspend = |spec: &mut JobSpec| spec.suspend = Some(true);
        let running = [pod("a", "Running", 0)];
        let started = with_status(job(suspend), |s| s.start_time = Some(at(500)));
        let plan = plan(&started, &running, now(), true);
        assert_eq!(names(&plan.delete), ["a"]);
        assert!(plan.create.is_empty());
        let suspended = condition(&plan, "Suspended").expect("suspended");
        assert_eq!(
            (suspended.status.as_str(), suspended.reason.as_deref()),
            ("True", Some("JobSuspended"))
        );
        let resumed_job = with_status(job(|_| {}), |s| *s = plan.status.clone());
        let plan = super::plan(&resumed_job, &[], now(), true);
        let resumed = condition(&plan, "Suspended").expect("resumed");
        assert_eq!(
            (resumed.status.as_str(), resumed.reason.as_deref()),
            ("False", Some("JobResumed"))
        );
        assert_eq!(plan.status.start_time, Some(Time(now())));
        assert_eq!(plan.create.len(), 2);
        // A Job created suspended gets no start time and no condition False.
        let plan = super::plan(&job(suspend), &[], now(), true);
        assert_eq!(plan.status.start_time, None);
    }

    #[test]
    fn scaling_down_deletes_pending_and_newer_pods_first() {
        let one = |spec: &mut JobSpec| spec.parallelism = Some(1);
        let mut pending = (*pod("pending", "Pending", 0)).clone();
        pending.spec.as_mut().unwrap().node_name = None;
        let pods = [pod("old", "Running", 0), Arc::new(pending)];
        let plan = plan(&job(one), &pods, now(), true);
        assert_eq!(names(&plan.delete), ["pending"]);
    }

    #[test]
    fn terminating_pods_are_replaced_unless_the_policy_is_failed() {
        let mut terminating = (*pod("t", "Running", 0)).clone();
        terminating.metadata.deletion_timestamp = Some(at(1));
        let pods = [Arc::new(terminating)];
        let plan = plan(&job(|_| {}), &pods, now(), true);
        assert_eq!(plan.create.len(), 2);
        assert_eq!(plan.status.terminating, Some(1));
        let failed_only = |spec: &mut JobSpec| spec.pod_replacement_policy = Some("Failed".into());
        let plan = super::plan(&job(failed_only), &pods, now(), true);
        assert_eq!(plan.create.len(), 1);
    }

    #[test]
    fn indexed_jobs_run_each_missing_index_once() {
        let indexed = |spec: &mut JobSpec| {
            spec.completion_mode = Some("Indexed".into());
            spec.completions = Some(5);
            spec.parallelism = Some(3);
        };
        let pods = [
            indexed_pod("zero", "Succeeded", 0),
            indexed_pod("two", "Running", 2),
            indexed_pod("two-again", "Running", 2),
            indexed_pod("zero-again", "Running", 0),
        ];
        let plan = plan(&job(indexed), &pods, now(), true);
        assert_eq!(names(&plan.delete), ["two-again", "zero-again"]);
        assert_eq!(plan.create, vec![Some(1), Some(3)]);
        assert_eq!(plan.status.completed_indexes.as_deref(), Some("0"));
        assert_eq!(plan.status.succeeded, Some(1));
        // Completed indexes survive their pods.
        let job = with_status(job(indexed), |s| {
            s.completed_indexes = Some("0-3".into());
        });
        let plan = super::plan(&job, &[indexed_pod("four", "Succeeded", 4)], now(), true);
        assert_eq!(plan.status.completed_indexes.as_deref(), Some("0-4"));
        assert!(condition(&plan, "Complete").is_some());
    }

    #[test]
    fn completed_indexes_print_and_parse_as_upstream() {
        let indexes: BTreeSet<i64> = [1, 3, 4, 5, 7, 9, 10].into();
        assert_eq!(format_indexes(&indexes), "1,3-5,7,9,10");
        assert_eq!(parse_indexes("1,3-5,7,9,10"), indexes);
        assert_eq!(format_indexes(&BTreeSet::new()), "");
        assert!(parse_indexes("").is_empty());
    }

    #[test]
    fn indexed_pods_carry_their_index() {
        let indexed_job = job(|spec| spec.completion_mode = Some("Indexed".into()));
        let pod = pod_for(&indexed_job, Some(2)).unwrap();
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("pi-2-"));
        assert_eq!(
            pod.annotations()
                .get(COMPLETION_INDEX_ANNOTATION)
                .map(String::as_str),
            Some("2")
        );
        assert_eq!(
            pod.labels()
                .get(COMPLETION_INDEX_ANNOTATION)
                .map(String::as_str),
            Some("2")
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("pi-2"));
        let env = &spec.containers[0].env.as_ref().unwrap()[0];
        assert_eq!(env.name, "JOB_COMPLETION_INDEX");
        assert_eq!(
            env.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        );
        let owner = &pod.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("Job", Some(true)));
        let plain = pod_for(&job(|_| {}), None).unwrap();
        assert_eq!(plain.metadata.generate_name.as_deref(), Some("pi-"));
        assert_eq!(
            plain.labels().get("job-name").map(String::as_str),
            Some("pi")
        );
    }

    #[test]
    fn finished_jobs_are_left_alone_until_their_ttl_runs_out() {
        let ttl = |spec: &mut JobSpec| spec.ttl_seconds_after_finished = Some(30);
        let finished = |completed_ago| {
            with_status(job(ttl), |s| {
                s.completion_time = Some(at(completed_ago));
                s.conditions = Some(vec![JobCondition {
                    type_: "Complete".into(),
                    status: "True".into(),
                    ..JobCondition::default()
                }]);
            })
        };
        let pods = [pod("a", "Running", 0)];
        let plan = plan(&finished(10), &pods, now(), true);
        assert!(plan.create.is_empty() && plan.delete.is_empty() && !plan.delete_job);
        assert_eq!(plan.requeue, Some(Duration::from_secs(20)));
        assert!(super::plan(&finished(31), &pods, now(), true).delete_job);
    }

    #[test]
    fn an_unchanged_job_plans_an_unchanged_status() {
        let pods = [pod("a", "Running", 0), pod("b", "Running", 0)];
        let first = plan(&job(|_| {}), &pods, now(), true);
        let job = with_status(job(|_| {}), |s| *s = first.status.clone());
        let later = now() + SignedDuration::from_secs(5);
        let second = super::plan(&job, &pods, later, true);
        assert_eq!(second.status, first.status);
        assert!(second.create.is_empty());
    }
}
