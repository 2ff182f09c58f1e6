//! The agent's Events (core/v1 `Event`), filled in as the kubelet fills them, so that
//! `kubectl describe pod` and `kubectl get events` tell what the node did.
//!
//! Recording never waits on the API server: [`EventRecorder::record`] puts the event on a
//! bounded channel and returns; one background task posts them in order. When the channel
//! is full the event is dropped and counted, so a slow API server never holds back a pod
//! worker. The task folds an event identical to one it posted recently (same object,
//! type, reason and message) into that one, raising its `count` and `lastTimestamp`, as
//! client-go's event correlator does.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;

use crate::pods::model::Kind;

/// The component the kubelet reports its events as.
pub const COMPONENT: &str = "kubelet";
/// How many events may wait for the API server before new ones are dropped.
const QUEUE: usize = 1000;
/// Identical events this close together are folded into one (client-go's aggregation
/// window).
const AGGREGATE_WINDOW: Duration = Duration::from_secs(600);
/// How many recently posted events the aggregation remembers (client-go's cache size).
const AGGREGATE_ENTRIES: usize = 4096;

/// An event's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Records events for one node; cheap to clone, never blocks.
#[derive(Clone)]
pub struct EventRecorder {
    shared: Arc<Shared>,
}

struct Shared {
    /// The node's name: the events' `source.host` and `reportingInstance`.
    host: String,
    queue: mpsc::Sender<Event>,
    dropped: AtomicU64,
    /// The last name suffix given out, so two events of one object in the same
    /// nanosecond still get distinct names.
    last_nanos: AtomicI64,
}

impl EventRecorder {
    /// A recorder whose events a background task posts through `client`.
    pub fn start(client: kube::Client, host: &str) -> Self {
        let (recorder, events) = Self::channel(host, QUEUE);
        tokio::spawn(post_events(client, events));
        recorder
    }

    /// A recorder whose events arrive on the returned receiver (the seam `start` posts
    /// from; tests read it). Events are dropped while `capacity` of them wait.
    pub fn channel(host: &str, capacity: usize) -> (Self, mpsc::Receiver<Event>) {
        let (queue, events) = mpsc::channel(capacity.max(1));
        let recorder = Self {
            shared: Arc::new(Shared {
                host: host.to_string(),
                queue,
                dropped: AtomicU64::new(0),
                last_nanos: AtomicI64::new(0),
            }),
        };
        (recorder, events)
    }

    /// A recorder that records nothing (tests that do not look at events).
    pub fn discard() -> Self {
        Self::channel("", 1).0
    }

    /// The node this recorder reports from.
    pub fn host(&self) -> &str {
        &self.shared.host
    }

    /// How many events were dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Records an event about `object`.
    pub fn record(
        &self,
        object: ObjectReference,
        event_type: EventType,
        reason: &str,
        message: impl Into<String>,
    ) {
        let now = Timestamp::now();
        let nanos = self.unique_nanos(now);
        let event = new_event(
            object,
            &self.shared.host,
            event_type,
            reason,
            message.into(),
            now,
            nanos,
        );
        match self.shared.queue.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped == 1 || dropped.is_multiple_of(100) {
                    tracing::warn!(
                        dropped,
                        reason = event.reason.as_deref().unwrap_or_default(),
                        "event queue full: events are being dropped"
                    );
                }
            }
            // Nobody posts events (agent stopping, or a recorder that discards).
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Records an event about a pod.
    pub fn pod(&self, pod: &Pod, event_type: EventType, reason: &str, message: impl Into<String>) {
        self.record(pod_reference(pod), event_type, reason, message);
    }

    /// Records an event about one container of a pod.
    pub fn container(
        &self,
        pod: &Pod,
        kind: Kind,
        container: &str,
        event_type: EventType,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.record(
            container_reference(pod, kind, container),
            event_type,
            reason,
            message,
        );
    }

    /// Records an event about this recorder's node.
    pub fn node(&self, event_type: EventType, reason: &str, message: impl Into<String>) {
        self.record(
            node_reference(&self.shared.host),
            event_type,
            reason,
            message,
        );
    }

    /// `now` in nanoseconds, moved past the last value given out.
    fn unique_nanos(&self, now: Timestamp) -> i64 {
        let nanos = i64::try_from(now.as_nanosecond()).unwrap_or(i64::MAX);
        let previous = self
            .shared
            .last_nanos
            .fetch_max(nanos, Ordering::Relaxed)
            .max(0);
        if nanos > previous {
            nanos
        } else {
            // Taken, or the clock went back: one past the last one, atomically.
            self.shared.last_nanos.fetch_add(1, Ordering::Relaxed) + 1
        }
    }
}

/// The reference to a pod, as `GetReference` makes it.
pub fn pod_reference(pod: &Pod) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Pod".to_string()),
        namespace: Some(
            pod.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_string()),
        ),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone(),
        field_path: None,
    }
}

/// The reference to a container of a pod, as the kubelet's `GenerateContainerRef` makes it:
/// the pod's, with `fieldPath` `spec.containers{name}` or `spec.initContainers{name}`.
pub fn container_reference(pod: &Pod, kind: Kind, container: &str) -> ObjectReference {
    let list = match kind {
        Kind::Init => "initContainers",
        Kind::App => "containers",
    };
    ObjectReference {
        field_path: Some(format!("spec.{list}{{{container}}}")),
        ..pod_reference(pod)
    }
}

/// The reference to a node, as the kubelet makes it: the name doubles as the UID, and the
/// namespace is empty (the event itself goes to `default`).
pub fn node_reference(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Node".to_string()),
        name: Some(node.to_string()),
        uid: Some(node.to_string()),
        ..ObjectReference::default()
    }
}

/// An event's name, as client-go makes it: the object's name and the time in
/// nanoseconds, in hex.
pub fn event_name(object_name: &str, nanos: i64) -> String {
    format!("{object_name}.{nanos:x}")
}

/// A new event (count 1) about `object`, reported by the kubelet on `host`. `nanos` makes
/// its name.
pub fn new_event(
    object: ObjectReference,
    host: &str,
    event_type: EventType,
    reason: &str,
    message: String,
    now: Timestamp,
    nanos: i64,
) -> Event {
    let namespace = object
        .namespace
        .clone()
        .filter(|namespace| !namespace.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let name = event_name(object.name.as_deref().unwrap_or_default(), nanos);
    // Events carry second precision, as `metav1.Now()` serializes.
    let now = now.round(jiff::Unit::Second).unwrap_or(now);
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            ..ObjectMeta::default()
        },
        involved_object: object,
        reason: Some(reason.to_string()),
        message: Some(message),
        type_: Some(event_type.as_str().to_string()),
        source: Some(EventSource {
            component: Some(COMPONENT.to_string()),
            host: Some(host.to_string()),
        }),
        reporting_component: Some(COMPONENT.to_string()),
        reporting_instance: Some(host.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Event::default()
    }
}

/// What identifies "the same event" for aggregation (client-go's `getEventKey`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EventKey {
    namespace: String,
    kind: String,
    name: String,
    uid: String,
    field_path: String,
    event_type: String,
    reason: String,
    message: String,
}

impl EventKey {
    fn of(event: &Event) -> Self {
        let object = &event.involved_object;
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        Self {
            namespace: text(&event.metadata.namespace),
            kind: text(&object.kind),
            name: text(&object.name),
            uid: text(&object.uid),
            field_path: text(&object.field_path),
            event_type: text(&event.type_),
            reason: text(&event.reason),
            message: text(&event.message),
        }
    }
}

/// An event posted recently.
#[derive(Debug, Clone)]
struct Posted {
    name: String,
    count: i32,
    at: Instant,
}

/// How to post an event: create it, or raise the count of the identical one posted
/// recently.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Create,
    Increment { name: String, count: i32 },
}

/// The recently posted events, to fold repeats into them.
#[derive(Debug, Default)]
struct Aggregator {
    posted: HashMap<EventKey, Posted>,
}

impl Aggregator {
    fn decide(&self, event: &Event, now: Instant) -> Write {
        match self.posted.get(&EventKey::of(event)) {
            Some(posted) if now.duration_since(posted.at) < AGGREGATE_WINDOW => Write::Increment {
                name: posted.name.clone(),
                count: posted.count + 1,
            },
            _ => Write::Create,
        }
    }

    /// Remembers that `name` now stands for `event` with `count`.
    fn posted(&mut self, event: &Event, name: String, count: i32, now: Instant) {
        if self.posted.len() >= AGGREGATE_ENTRIES {
            self.posted
                .retain(|_, posted| now.duration_since(posted.at) < AGGREGATE_WINDOW);
            if self.posted.len() >= AGGREGATE_ENTRIES {
                self.posted.clear();
            }
        }
        self.posted.insert(
            EventKey::of(event),
            Posted {
                name,
                count,
                at: now,
            },
        );
    }
}

/// Posts every event the recorders queue, until they are all dropped.
async fn post_events(client: kube::Client, mut events: mpsc::Receiver<Event>) {
    let mut aggregator = Aggregator::default();
    while let Some(event) = events.recv().await {
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
        let now = Instant::now();
        if let Write::Increment { name, count } = aggregator.decide(&event, now) {
            let patch = json!({"count": count, "lastTimestamp": event.last_timestamp});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    aggregator.posted(&event, name, count, now);
                    continue;
                }
                // Gone (expired or deleted): post it anew.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    tracing::warn!(event = %name, error = %error, "update event");
                    continue;
                }
            }
        }
        let name = event.metadata.name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => aggregator.posted(&event, name, 1, now),
            Err(error) => tracing::warn!(
                event = %format!("{namespace}/{name}"),
                reason = event.reason.as_deref().unwrap_or_default(),
                error = %error,
                "post event"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::model::fixtures;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn container_events_name_the_container_by_field_path() {
        let pod = fixtures::pod("Always", &["setup"], &["app"]);
        let now = Timestamp::new(1_700_000_000, 123_456_789).unwrap();
        let nanos = now.as_nanosecond() as i64;
        let event = new_event(
            container_reference(&pod, Kind::App, "app"),
            "node-1",
            EventType::Normal,
            "Started",
            "Started container app".into(),
            now,
            nanos,
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["metadata"]["name"], "web.17979cfe3d85cd15");
        assert_eq!(json["metadata"]["namespace"], "default");
        assert_eq!(
            json["involvedObject"],
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": "default",
                "name": "web",
                "uid": "u1",
                "fieldPath": "spec.containers{app}",
            })
        );
        assert_eq!(json["reason"], "Started");
        assert_eq!(json["message"], "Started container app");
        assert_eq!(json["type"], "Normal");
        assert_eq!(
            json["source"],
            json!({"component": "kubelet", "host": "node-1"})
        );
        assert_eq!(json["reportingComponent"], "kubelet");
        assert_eq!(json["reportingInstance"], "node-1");
        assert_eq!(json["firstTimestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(json["lastTimestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(json["count"], 1);
        assert!(json.get("eventTime").is_none());

        let init = container_reference(&pod, Kind::Init, "setup");
        assert_eq!(
            init.field_path.as_deref(),
            Some("spec.initContainers{setup}")
        );
    }

    #[test]
    fn event_names_have_sixteen_hex_digits_of_the_time() {
        let nanos = at(1_750_000_000).as_nanosecond() as i64;
        let name = event_name("web", nanos);
        let (object, suffix) = name.split_once('.').unwrap();
        assert_eq!(object, "web");
        assert_eq!(suffix.len(), 16);
        assert_eq!(i64::from_str_radix(suffix, 16).unwrap(), nanos);
    }

    #[test]
    fn node_events_go_to_default_with_the_name_as_uid() {
        let event = new_event(
            node_reference("node-1"),
            "node-1",
            EventType::Warning,
            "CgroupControllersUnavailable",
            "no cpu".into(),
            at(1_750_000_000),
            1,
        );
        assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(event.metadata.name.as_deref(), Some("node-1.1"));
        let object = &event.involved_object;
        assert_eq!(object.kind.as_deref(), Some("Node"));
        assert_eq!(object.uid.as_deref(), Some("node-1"));
        assert_eq!(object.namespace, None);
        assert_eq!(event.type_.as_deref(), Some("Warning"));
    }

    #[tokio::test]
    async fn events_queue_without_waiting_and_overflow_is_dropped_and_counted() {
        let pod = fixtures::pod("Always", &[], &["app"]);
        let (recorder, mut events) = EventRecorder::channel("node-1", 2);
        for n in 0..5 {
            recorder.pod(&pod, EventType::Normal, "Test", format!("event {n}"));
        }
        assert_eq!(recorder.dropped(), 3);
        let first = events.recv().await.unwrap();
        let second = events.recv().await.unwrap();
        assert_eq!(first.message.as_deref(), Some("event 0"));
        assert_eq!(second.message.as_deref(), Some("event 1"));
        // Two events in a row of one object never share a name.
        assert_ne!(first.metadata.name, second.metadata.name);

        // A recorder nobody reads from records into the void.
        let discard = EventRecorder::discard();
        discard.node(EventType::Normal, "Starting", "Starting kubelet.");
    }

    #[test]
    fn identical_events_are_folded_within_the_window() {
        let pod = fixtures::pod("Always", &[], &["app"]);
        let event = |message: &str| {
            new_event(
                container_reference(&pod, Kind::App, "app"),
                "node-1",
                EventType::Warning,
                "Unhealthy",
                message.to_string(),
                at(1_750_000_000),
                7,
            )
        };
        let mut aggregator = Aggregator::default();
        let start = Instant::now();
        let failed = event("Liveness probe failed: HTTP probe failed with statuscode: 500");
        assert_eq!(aggregator.decide(&failed, start), Write::Create);
        aggregator.posted(&failed, "web.7".into(), 1, start);
        let later = start + Duration::from_secs(10);
        assert_eq!(
            aggregator.decide(&failed, later),
            Write::Increment {
                name: "web.7".into(),
                count: 2
            }
        );
        // Another message is another event.
        let other = event("Readiness probe failed: connection refused");
        assert_eq!(aggregator.decide(&other, later), Write::Create);
        // Past the window the next one starts anew.
        let much_later = start + AGGREGATE_WINDOW + Duration::from_secs(1);
        assert_eq!(aggregator.decide(&failed, much_later), Write::Create);
    }
}
