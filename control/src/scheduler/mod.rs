//! The scheduler: binds unscheduled pods to nodes that fit them.
//!
//! One task owns all scheduling state. It reads two watches (all nodes, all pods) into the
//! [`cache::Cache`], keeps the pods waiting for a node in queues, decides for each with a
//! [`select::Selector`], counts the pod on its node at once (assume-on-bind), and sends the
//! `pods/binding` request from a separate task, up to [`MAX_BINDS_IN_FLIGHT`] at a time,
//! so a slow answer never holds up the next decision. No decision lists anything from the
//! API server.
//!
//! A pod that fits nowhere gets `PodScheduled=False` and a `FailedScheduling` event with
//! upstream's message, and waits until a node or pod changes in a way that may make room;
//! then it is retried after its backoff (1 s doubling to 10 s per attempt), as upstream's
//! scheduling queue does. Those writes wait in a queue of pod keys ([`Reports`]) drained by
//! [`MAX_REPORTS_IN_FLIGHT`] workers, so a burst of unschedulable pods costs a small entry
//! per pod rather than a parked request task per pod.

pub mod cache;
pub mod filters;
pub mod quantity;
pub mod scores;
pub mod select;
pub mod watched;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, watcher};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::controllers::runtime::{Queue, run_workers};
use cache::{Cache, Change, NodeInfo, PodInfo, PodKey};
use select::{Decision, Selector};
use watched::WatchedPod;

/// Binding requests sent and not yet answered, at most.
pub const MAX_BINDS_IN_FLIGHT: usize = 256;
/// Decisions made between two looks at the watches, at most.
const DECISIONS_PER_TURN: usize = 64;
/// Status patches and events for unschedulable pods in flight, at most (the workers that
/// drain [`Reports`]).
const MAX_REPORTS_IN_FLIGHT: usize = 16;
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs the scheduler only while this process holds the `kube-system/skiff-scheduler`
/// Lease, so that of several control planes exactly one schedules; a standby takes over
/// when the leader's Lease expires.
pub async fn run_with_leader_election(client: kube::Client) -> anyhow::Result<()> {
    let election = crate::controllers::leader::LeaderElectionConfig::new("skiff-scheduler");
    crate::controllers::leader::run_while_leader(client.clone(), election, || run(client.clone()))
        .await
}

/// Runs the scheduler against the API server behind `client` until a watch ends.
pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let mut node_events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    // Pods are decoded into the scheduler's slim form: most pod events are status writes
    // whose contents the scheduler never reads.
    let mut pod_events = watcher(
        Api::<WatchedPod>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let (done_sender, mut done_receiver) = mpsc::unbounded_channel();
    let reports = Reports::default();
    // Dropped with this future: a scheduler that loses its Lease stops reporting too.
    let mut background = tokio::task::JoinSet::new();
    background.spawn(reports.clone().run(client.clone()));
    let mut scheduler = Scheduler::new(client, done_sender, reports);
    tracing::info!("scheduler started");
    let mut load = Load::new();
    loop {
        let backoff_deadline = scheduler.next_backoff_deadline();
        let turn = tokio::select! {
            event = node_events.next() => match event {
                Some(Ok(event)) => Turn::Node(event),
                Some(Err(error)) => {
                    tracing::warn!(%error, "node watch failed; retrying");
                    continue;
                }
                None => anyhow::bail!("the node watch ended"),
            },
            event = pod_events.next() => match event {
                Some(Ok(event)) => Turn::Pod(event),
                Some(Err(error)) => {
                    tracing::warn!(%error, "pod watch failed; retrying");
                    continue;
                }
                None => anyhow::bail!("the pod watch ended"),
            },
            Some(done) = done_receiver.recv() => Turn::BindDone(done),
            () = tokio::time::sleep_until(backoff_deadline.unwrap_or_else(Instant::now)),
                if backoff_deadline.is_some() => Turn::Backoff,
            () = std::future::ready(()), if scheduler.can_schedule() => Turn::Schedule,
        };
        let started = Instant::now();
        match turn {
            Turn::Node(event) => scheduler.on_node_event(event),
            Turn::Pod(event) => scheduler.on_pod_event(event),
            Turn::BindDone(done) => scheduler.on_bind_done(done),
            Turn::Backoff => scheduler.flush_backoff(),
            Turn::Schedule => scheduler.schedule_some(),
        }
        load.handled(started.elapsed(), &scheduler);
    }
}

/// What one turn of the loop handles.
#[expect(
    clippy::large_enum_variant,
    reason = "one Turn lives at a time, moved once; boxing would allocate per event"
)]
enum Turn {
    Node(watcher::Event<Node>),
    Pod(watcher::Event<WatchedPod>),
    BindDone(BindDone),
    Backoff,
    Schedule,
}

/// Logged every 10 s while there is work: decisions per second and the share of wall time
/// the task spends handling events and deciding (watch decoding not included), which says
/// whether the scheduler or the API server holds binding back.
struct Load {
    window_start: Instant,
    handling: Duration,
    decisions_at_start: u64,
}

impl Load {
    fn new() -> Self {
        Self {
            window_start: Instant::now(),
            handling: Duration::ZERO,
            decisions_at_start: 0,
        }
    }

    fn handled(&mut self, took: Duration, scheduler: &Scheduler) {
        self.handling += took;
        let window = self.window_start.elapsed();
        if window < Duration::from_secs(10) {
            return;
        }
        let decided = scheduler.decisions - self.decisions_at_start;
        if decided > 0 || !scheduler.active.is_empty() {
            tracing::info!(
                decisions_per_second = (decided as f64 / window.as_secs_f64()).round(),
                handling_percent =
                    (100.0 * self.handling.as_secs_f64() / window.as_secs_f64()).round(),
                active = scheduler.active.len(),
                unschedulable = scheduler.unschedulable.len(),
                binds_in_flight = scheduler.binds_in_flight,
                "scheduler load"
            );
        }
        self.window_start = Instant::now();
        self.handling = Duration::ZERO;
        self.decisions_at_start = scheduler.decisions;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// In the active queue, to be decided.
    Active,
    /// Failed or unschedulable; in the backoff heap until its backoff is over.
    Backoff,
    /// Fits nowhere; waits for a change in the cluster.
    Unschedulable,
    /// Assumed on a node; its binding request is in flight.
    Binding,
}

/// A pod this scheduler has to place.
struct PendingPod {
    info: PodInfo,
    waiting: Waiting,
    attempts: u32,
    last_attempt: Option<Instant>,
    /// The unschedulable message last written to the pod, so retries that fail the same
    /// way do not write it again. Shared with every pod that failed the same way.
    reported: Option<Arc<str>>,
}

/// The answer to one binding request.
struct BindDone {
    key: PodKey,
    uid: String,
    node: String,
    result: Result<(), kube::Error>,
}

struct Scheduler {
    client: kube::Client,
    cache: Cache,
    selector: Selector,
    pending: HashMap<PodKey, PendingPod>,
    active: VecDeque<PodKey>,
    backoff: BinaryHeap<Reverse<(Instant, PodKey)>>,
    unschedulable: HashSet<PodKey>,
    binds_in_flight: usize,
    /// Decisions made so far, for the load log.
    decisions: u64,
    done_sender: mpsc::UnboundedSender<BindDone>,
    reports: Reports,
    /// The last unschedulable message, shared by the pods that get the same one.
    last_message: Option<Arc<str>>,
    /// Keys seen since a watch (re)started its initial list, to drop what vanished.
    relisted_pods: Option<HashSet<PodKey>>,
    relisted_nodes: Option<HashSet<String>>,
    pods_synced: bool,
    nodes_synced: bool,
}

impl Scheduler {
    fn new(
        client: kube::Client,
        done_sender: mpsc::UnboundedSender<BindDone>,
        reports: Reports,
    ) -> Self {
        Self {
            client,
            cache: Cache::default(),
            selector: Selector::new(rand::random()),
            pending: HashMap::new(),
            active: VecDeque::new(),
            backoff: BinaryHeap::new(),
            unschedulable: HashSet::new(),
            binds_in_flight: 0,
            decisions: 0,
            done_sender,
            reports,
            last_message: None,
            relisted_pods: None,
            relisted_nodes: None,
            pods_synced: false,
            nodes_synced: false,
        }
    }

    /// Decisions wait for both initial lists, so no pod is judged against a partial cluster.
    fn can_schedule(&self) -> bool {
        self.pods_synced
            && self.nodes_synced
            && !self.active.is_empty()
            && self.binds_in_flight < MAX_BINDS_IN_FLIGHT
    }

    fn next_backoff_deadline(&self) -> Option<Instant> {
        self.backoff.peek().map(|Reverse((when, _))| *when)
    }

    fn on_node_event(&mut self, event: watcher::Event<Node>) {
        match event {
            watcher::Event::Init => self.relisted_nodes = Some(HashSet::new()),
            watcher::Event::InitApply(node) | watcher::Event::Apply(node) => {
                let info = NodeInfo::from_node(&node);
                if let Some(seen) = &mut self.relisted_nodes {
                    seen.insert(info.name.clone());
                }
                if self.cache.apply_node(info) == Change::MayHelp {
                    self.retry_unschedulable();
                }
            }
            watcher::Event::Delete(node) => {
                self.cache
                    .remove_node(node.metadata.name.as_deref().unwrap_or_default());
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relisted_nodes.take() {
                    self.cache.retain_nodes(&seen);
                }
                self.nodes_synced = true;
                tracing::info!(nodes = self.cache.node_count(), "scheduler: nodes listed");
            }
        }
    }

    fn on_pod_event(&mut self, event: watcher::Event<WatchedPod>) {
        match event {
            watcher::Event::Init => self.relisted_pods = Some(HashSet::new()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let info = PodInfo::from_pod(&pod);
                if let Some(seen) = &mut self.relisted_pods {
                    seen.insert(info.key());
                }
                self.on_pod(info);
            }
            watcher::Event::Delete(pod) => {
                let info = PodInfo::from_pod(&pod);
                let key = info.key();
                if self
                    .pending
                    .get(&key)
                    .is_some_and(|p| p.info.uid == info.uid)
                {
                    self.pending.remove(&key);
                    self.unschedulable.remove(&key);
                    self.reports.forget(&key);
                }
                if self.cache.holds(&key, &info.uid)
                    && self.cache.remove_pod(&key) == Change::MayHelp
                {
                    self.retry_unschedulable();
                }
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relisted_pods.take() {
                    self.cache.retain_pods(&seen);
                    let reports = &self.reports;
                    self.pending.retain(|key, pending| {
                        let keep = pending.waiting == Waiting::Binding || seen.contains(key);
                        if !keep {
                            reports.forget(key);
                        }
                        keep
                    });
                }
                self.pods_synced = true;
            }
        }
    }

    fn on_pod(&mut self, info: PodInfo) {
        let key = info.key();
        let change = self.cache.apply_pod(&info);
        if info.wants_scheduling() {
            // A binding in flight: the watch has not caught up with it yet.
            if self.cache.holds(&key, &info.uid) {
                return;
            }
            match self.pending.get_mut(&key) {
                Some(pending) if pending.info.uid == info.uid => {
                    if pending.info != info {
                        // The spec changed (a toleration added, say): worth a new try now.
                        pending.info = info;
                        if pending.waiting == Waiting::Unschedulable {
                            self.unschedulable.remove(&key);
                            pending.waiting = Waiting::Active;
                            self.active.push_back(key);
                        }
                    }
                }
                _ => {
                    self.unschedulable.remove(&key);
                    self.pending.insert(
                        key.clone(),
                        PendingPod {
                            info,
                            waiting: Waiting::Active,
                            attempts: 0,
                            last_attempt: None,
                            reported: None,
                        },
                    );
                    self.active.push_back(key);
                }
            }
        } else if self
            .pending
            .get(&key)
            .is_some_and(|p| p.info.uid == info.uid)
        {
            // Bound (by us or anyone), deleted, finished or handed to another scheduler.
            self.pending.remove(&key);
            self.unschedulable.remove(&key);
            self.reports.forget(&key);
        }
        if change == Change::MayHelp {
            self.retry_unschedulable();
        }
    }

    /// Something changed that may make room: unschedulable pods go back to the queue once
    /// their backoff is over.
    fn retry_unschedulable(&mut self) {
        if self.unschedulable.is_empty() {
            return;
        }
        let now = Instant::now();
        for key in std::mem::take(&mut self.unschedulable) {
            let Some(pending) = self.pending.get_mut(&key) else {
                continue;
            };
            if pending.waiting != Waiting::Unschedulable {
                continue;
            }
            let due = pending
                .last_attempt
                .map_or(now, |last| last + backoff_for(pending.attempts));
            if due <= now {
                pending.waiting = Waiting::Active;
                self.active.push_back(key);
            } else {
                pending.waiting = Waiting::Backoff;
                self.backoff.push(Reverse((due, key)));
            }
        }
    }

    fn flush_backoff(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((due, _))) = self.backoff.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((_, key))) = self.backoff.pop() else {
                break;
            };
            if let Some(pending) = self.pending.get_mut(&key)
                && pending.waiting == Waiting::Backoff
            {
                pending.waiting = Waiting::Active;
                self.active.push_back(key);
            }
        }
    }

    /// Decides for up to [`DECISIONS_PER_TURN`] queued pods.
    fn schedule_some(&mut self) {
        let mut decided = 0;
        while decided < DECISIONS_PER_TURN && self.binds_in_flight < MAX_BINDS_IN_FLIGHT {
            let Some(key) = self.active.pop_front() else {
                break;
            };
            let Some(pending) = self.pending.get_mut(&key) else {
                continue;
            };
            if pending.waiting != Waiting::Active {
                continue;
            }
            decided += 1;
            self.decisions += 1;
            pending.attempts += 1;
            pending.last_attempt = Some(Instant::now());
            match self.selector.decide(&self.cache, &pending.info) {
                Decision::Node(node_idx) => {
                    let node = self.cache.nodes()[node_idx].name.clone();
                    self.cache.assume(&pending.info, &node);
                    pending.waiting = Waiting::Binding;
                    self.binds_in_flight += 1;
                    tokio::spawn(bind(
                        self.client.clone(),
                        key,
                        pending.info.uid.clone(),
                        node,
                        self.done_sender.clone(),
                    ));
                }
                Decision::Unschedulable(message) => {
                    pending.waiting = Waiting::Unschedulable;
                    tracing::debug!(pod = %key, %message, "unschedulable");
                    if pending.reported.as_deref() != Some(message.as_str()) {
                        // Pods failing in a burst mostly fail the same way: one copy of
                        // the message for all of them.
                        let message = match &self.last_message {
                            Some(last) if **last == *message => last.clone(),
                            _ => Arc::<str>::from(message),
                        };
                        self.last_message = Some(message.clone());
                        pending.reported = Some(message.clone());
                        self.reports
                            .add(key.clone(), pending.info.uid.clone(), message);
                    }
                    self.unschedulable.insert(key);
                }
            }
        }
    }

    fn on_bind_done(&mut self, done: BindDone) {
        self.binds_in_flight -= 1;
        let ours = self
            .pending
            .get(&done.key)
            .is_some_and(|p| p.info.uid == done.uid && p.waiting == Waiting::Binding);
        let error = match done.result {
            Ok(()) => {
                if ours {
                    self.pending.remove(&done.key);
                }
                return;
            }
            Err(error) => error,
        };
        self.cache.forget(&done.key, &done.uid);
        // "already assigned" or "being deleted": the watch brings the pod's real state.
        let settled = matches!(&error, kube::Error::Api(status)
            if status.code == 404
                || (status.code == 409
                    && (status.message.contains("already assigned")
                        || status.message.contains("being deleted"))));
        if settled {
            tracing::debug!(pod = %done.key, node = %done.node, %error, "binding refused");
            if ours {
                self.pending.remove(&done.key);
            }
            return;
        }
        tracing::warn!(pod = %done.key, node = %done.node, %error, "binding failed; retrying");
        if let Some(pending) = self.pending.get_mut(&done.key)
            && ours
        {
            pending.waiting = Waiting::Backoff;
            let due = Instant::now() + backoff_for(pending.attempts);
            self.backoff.push(Reverse((due, done.key)));
        }
    }
}

/// Upstream's per-pod backoff: 1 s, doubling per attempt, at most 10 s.
fn backoff_for(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    (INITIAL_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

async fn bind(
    client: kube::Client,
    key: PodKey,
    uid: String,
    node: String,
    done: mpsc::UnboundedSender<BindDone>,
) {
    let (namespace, name) = key.split_once('/').unwrap_or(("", &key));
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let result = pods
        .create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
        .map(drop);
    let _ = done.send(BindDone {
        key,
        uid,
        node,
        result,
    });
}

/// Unschedulable pods waiting for their status write and event: a deduplicating queue of
/// pod keys, and beside it the latest message for each, so a pod that fails again before
/// its report went out is reported once, with its latest message, and a pod that goes away
/// first is not reported at all.
#[derive(Clone, Default)]
struct Reports {
    queue: Arc<Queue>,
    waiting: Arc<Mutex<HashMap<PodKey, Report>>>,
}

/// What to write about one pod.
struct Report {
    uid: String,
    message: Arc<str>,
}

impl Reports {
    fn add(&self, key: PodKey, uid: String, message: Arc<str>) {
        self.waiting
            .lock()
            .expect("reports lock")
            .insert(key.clone(), Report { uid, message });
        self.queue.add(key);
    }

    fn forget(&self, key: &str) {
        self.waiting.lock().expect("reports lock").remove(key);
    }

    /// Writes the queued reports, [`MAX_REPORTS_IN_FLIGHT`] at a time, forever.
    async fn run(self, client: kube::Client) {
        let waiting = self.waiting.clone();
        run_workers(
            "scheduler-reports",
            self.queue,
            MAX_REPORTS_IN_FLIGHT,
            move |key| {
                let report = waiting.lock().expect("reports lock").remove(&key);
                let client = client.clone();
                async move {
                    if let Some(report) = report {
                        report_unschedulable(client, &key, report).await;
                    }
                    Ok(None)
                }
            },
        )
        .await;
    }
}

/// Writes `PodScheduled=False` with the report's message to the pod and records a
/// `FailedScheduling` event, as upstream's scheduler does for a pod that fits nowhere.
async fn report_unschedulable(client: kube::Client, key: &str, report: Report) {
    let (namespace, name) = key.split_once('/').unwrap_or(("", key));
    let Report { uid, message } = report;
    let now = jiff::Timestamp::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"status": {"conditions": [{
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": &*message,
        "lastProbeTime": null,
        "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    }]}});
    if let Err(error) = pods
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
    {
        tracing::warn!(pod = %key, %error, "write PodScheduled=False");
    }
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid),
            ..ObjectReference::default()
        },
        reason: Some("FailedScheduling".into()),
        message: Some(message.to_string()),
        type_: Some("Warning".into()),
        action: Some("Scheduling".into()),
        source: Some(EventSource {
            component: Some(cache::DEFAULT_SCHEDULER.into()),
            host: None,
        }),
        reporting_component: Some(cache::DEFAULT_SCHEDULER.into()),
        reporting_instance: Some(cache::DEFAULT_SCHEDULER.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Event::default()
    };
    let events: Api<Event> = Api::namespaced(client, namespace);
    if let Err(error) = events.create(&PostParams::default(), &event).await {
        tracing::warn!(pod = %key, %error, "record FailedScheduling event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_ten_seconds() {
        assert_eq!(backoff_for(1), Duration::from_secs(1));
        assert_eq!(backoff_for(2), Duration::from_secs(2));
        assert_eq!(backoff_for(4), Duration::from_secs(8));
        assert_eq!(backoff_for(5), Duration::from_secs(10));
        assert_eq!(backoff_for(100), Duration::from_secs(10));
    }
}
