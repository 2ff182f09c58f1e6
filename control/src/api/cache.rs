//! The watch cache: every stored object decoded once, shared by all watches and lists.
//!
//! As kube-apiserver's watch cache does, one store watch feeds everything. Each store
//! event is parsed once into a [`CachedObject`]: the stored bytes (shared with the store,
//! not copied), where `metadata` opens in them, and the labels and selectable fields a
//! selector looks at. The previous state of a changed object is the one the cache already
//! holds, so a deletion parses nothing. The wire line of a watch event is written at most
//! once per event and type ([`Dispatch`]) however many clients watch; watchers filter on
//! the pre-parsed fields and only do work of their own when they must (a representation
//! other than plain JSON, such as the Table of `kubectl get -w`).
//!
//! Per resource the cache keeps the current objects (lists and initial watch events are
//! served from them once the cache has caught up with the store) and a window of recent
//! events (watches that resume from a version replay from it; older versions get 410).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::encoding::{event_line, metadata_offset, write_object};
use super::registry::{RESOURCES, ResourceInfo};
use super::selectors::{FieldSelector, LabelSelector, field_value};
use super::status::ApiError;
use crate::store::{Event, EventKind, KeyValue, Revision, Store, StoreError, WatchStream};

/// The key prefix under which the API server keeps every object.
const REGISTRY_PREFIX: &str = "/registry/";

/// Events a watcher may have waiting; one that falls further behind is ended, and its
/// client resumes from the last version it saw, as with kube-apiserver.
const WATCHER_QUEUE: usize = 8192;

/// How long a read that must be consistent waits for the cache to catch up with the store.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(3);

/// The labels and the selectable fields of one object, in one allocation of text.
struct Selectable {
    /// The field values (in [`selectable_fields`] order), then label keys and values.
    text: Box<str>,
    /// Where each of those ends in `text`.
    ends: Box<[u32]>,
    n_fields: usize,
}

/// `metadata.name`, `metadata.namespace`, then the resource's own field selectors.
fn field_index(info: &ResourceInfo, field: &str) -> Option<usize> {
    match field {
        "metadata.name" => Some(0),
        "metadata.namespace" => Some(1),
        _ => info
            .field_selectors
            .iter()
            .position(|f| *f == field)
            .map(|i| i + 2),
    }
}

fn selectable_fields(info: &ResourceInfo) -> impl Iterator<Item = &str> {
    ["metadata.name", "metadata.namespace"]
        .into_iter()
        .chain(info.field_selectors.iter().copied())
}

impl Selectable {
    fn of(info: &ResourceInfo, object: &Value) -> Self {
        let mut text = String::new();
        let mut ends = Vec::new();
        for field in selectable_fields(info) {
            text.push_str(&field_value(object, field));
            ends.push(text.len() as u32);
        }
        let n_fields = ends.len();
        if let Some(labels) = object["metadata"]["labels"].as_object() {
            for (key, value) in labels {
                let Some(value) = value.as_str() else {
                    continue;
                };
                text.push_str(key);
                ends.push(text.len() as u32);
                text.push_str(value);
                ends.push(text.len() as u32);
            }
        }
        Self {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
            n_fields,
        }
    }

    fn part(&self, index: usize) -> &str {
        let start = if index == 0 {
            0
        } else {
            self.ends[index - 1] as usize
        };
        &self.text[start..self.ends[index] as usize]
    }

    fn label(&self, key: &str) -> Option<&str> {
        (self.n_fields..self.ends.len())
            .step_by(2)
            .find(|i| self.part(*i) == key)
            .map(|i| self.part(i + 1))
    }
}

/// A stored object as the cache holds it.
pub(crate) struct CachedObject {
    /// The stored JSON, without `resourceVersion`.
    raw: Bytes,
    /// Where `metadata` opens in `raw` ([`metadata_offset`]).
    metadata_at: Option<usize>,
    /// The store revision of the write that made this state: its `resourceVersion`.
    pub revision: Revision,
    selectable: Selectable,
}

impl CachedObject {
    fn from_stored(info: &ResourceInfo, kv: &KeyValue) -> Result<Self, String> {
        let mut object: Value = serde_json::from_slice(&kv.value)
            .map_err(|e| format!("decode stored object {}: {e}", kv.key))?;
        let selectable = Selectable::of(info, &object);
        // Values are stored without a version; one that has it (written by hand, say) is
        // stored again without, so that the spliced version is the only one.
        let had_version = object["metadata"]
            .as_object_mut()
            .is_some_and(|metadata| metadata.remove("resourceVersion").is_some());
        let raw = if had_version {
            Bytes::from(serde_json::to_vec(&object).unwrap_or_default())
        } else {
            kv.value.clone()
        };
        Ok(Self {
            metadata_at: metadata_offset(&raw),
            raw,
            revision: kv.mod_revision,
            selectable,
        })
    }

    /// Appends the object's JSON as a client sees it at `revision`.
    pub(crate) fn write_json(&self, revision: Revision, out: &mut Vec<u8>) {
        write_object(&self.raw, self.metadata_at, revision, out);
    }

    pub(crate) fn json_len(&self) -> usize {
        self.raw.len() + 40
    }

    /// The object as a JSON value, at `revision`, for the representations that need one.
    pub(crate) fn to_value(&self, revision: Revision) -> Result<Value, ApiError> {
        let mut out = Vec::with_capacity(self.json_len());
        self.write_json(revision, &mut out);
        serde_json::from_slice(&out)
            .map_err(|e| ApiError::internal(format!("decode cached object: {e}")))
    }

    /// This object's line in a watch stream, as an event of `kind` at `revision`.
    pub(crate) fn line(&self, kind: WatchKind, revision: Revision) -> Bytes {
        event_line(kind.as_str(), &self.raw, self.metadata_at, revision)
    }
}

/// A parsed selector pair, matched against what the cache extracted from each object.
#[derive(Default)]
pub(crate) struct Filter {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub(crate) fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    pub(crate) fn matches(&self, info: &ResourceInfo, object: &CachedObject) -> bool {
        let selectable = &object.selectable;
        self.labels.matches_labels(|key| selectable.label(key))
            && self.fields.matches_with(|field| {
                field_index(info, field).map_or("", |index| selectable.part(index))
            })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WatchKind {
    Added,
    Modified,
    Deleted,
}

impl WatchKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WatchKind::Added => "ADDED",
            WatchKind::Modified => "MODIFIED",
            WatchKind::Deleted => "DELETED",
        }
    }
}

/// One change, as the cache saw it.
pub(crate) struct CachedEvent {
    pub revision: Revision,
    pub key: Arc<str>,
    pub kind: EventKind,
    /// After a put, the new state; after a deletion, the last state.
    pub object: Arc<CachedObject>,
    /// Before a put, the state it replaced, if there was one.
    pub prev: Option<Arc<CachedObject>>,
}

impl CachedEvent {
    /// What a watcher with `filter` sees of this event, if anything: objects moving into
    /// the selection are ADDED, out of it DELETED (with their previous state).
    pub(crate) fn seen_through(&self, info: &ResourceInfo, filter: &Filter) -> Option<WatchKind> {
        if filter.is_empty() {
            return Some(self.natural_kind());
        }
        match self.kind {
            EventKind::Delete => filter
                .matches(info, &self.object)
                .then_some(WatchKind::Deleted),
            EventKind::Put => {
                let before = self.prev.as_ref().is_some_and(|p| filter.matches(info, p));
                match (before, filter.matches(info, &self.object)) {
                    (true, true) => Some(WatchKind::Modified),
                    (false, true) => Some(WatchKind::Added),
                    (true, false) => Some(WatchKind::Deleted),
                    (false, false) => None,
                }
            }
        }
    }

    /// The type of this event for a watcher that sees everything.
    fn natural_kind(&self) -> WatchKind {
        match (self.kind, &self.prev) {
            (EventKind::Delete, _) => WatchKind::Deleted,
            (EventKind::Put, None) => WatchKind::Added,
            (EventKind::Put, Some(_)) => WatchKind::Modified,
        }
    }

    /// The object an event of `kind` carries: a put seen as DELETED carries the state the
    /// object left the selection with.
    pub(crate) fn object_for(&self, kind: WatchKind) -> &CachedObject {
        match (kind, self.kind, &self.prev) {
            (WatchKind::Deleted, EventKind::Put, Some(prev)) => prev,
            _ => &self.object,
        }
    }
}

/// An event on its way to the live watchers, with its wire lines written once each.
pub(crate) struct Dispatch {
    pub event: Arc<CachedEvent>,
    lines: [OnceLock<Bytes>; 3],
}

impl Dispatch {
    pub(crate) fn new(event: Arc<CachedEvent>) -> Self {
        Self {
            event,
            lines: Default::default(),
        }
    }

    /// The JSON line of this event as `kind`.
    pub(crate) fn line(&self, kind: WatchKind) -> Bytes {
        self.lines[kind as usize]
            .get_or_init(|| self.event.object_for(kind).line(kind, self.event.revision))
            .clone()
    }
}

struct WatcherSlot {
    /// The key prefix the watcher follows (its namespace, or the whole resource).
    prefix: Box<str>,
    sender: mpsc::Sender<Arc<Dispatch>>,
}

/// What the cache holds for one resource.
#[derive(Default)]
struct ResourceCache {
    objects: BTreeMap<Arc<str>, Arc<CachedObject>>,
    /// Recent events, oldest first.
    history: VecDeque<Arc<CachedEvent>>,
    /// Every event after this revision is in `history`.
    history_start: Revision,
    /// The revision `objects` is current at.
    revision: Revision,
    watchers: Vec<WatcherSlot>,
}

/// Where a new watch starts.
pub(crate) enum WatchStart {
    /// From the current state: its objects that pass the filter, then what follows.
    Snapshot,
    /// From the current state, without its objects.
    Now,
    /// From every event after this revision.
    After(Revision),
}

/// A watch registered with the cache.
pub(crate) struct Registration {
    /// For a snapshot start: the objects that pass the filter.
    pub initial: Vec<Arc<CachedObject>>,
    /// For a start from a revision: the events after it that the window still holds.
    pub replay: Vec<Arc<CachedEvent>>,
    /// The revision the watch starts after.
    pub start: Revision,
    /// The events from then on, as they happen; it ends when the watcher fell behind.
    pub live: mpsc::Receiver<Arc<Dispatch>>,
}

/// One page of a list served from the cache.
pub(crate) struct ListPage {
    pub items: Vec<Arc<CachedObject>>,
    pub revision: Revision,
    /// The key of the last item when more matching objects may follow it.
    pub continue_after: Option<Arc<str>>,
}

pub(crate) struct WatchCache {
    resources: Box<[Mutex<ResourceCache>]>,
    /// Index in `resources` (and in [`RESOURCES`]) by key prefix.
    by_prefix: HashMap<String, usize>,
    /// The revision of the last store event the cache has applied.
    revision: watch::Sender<Revision>,
    history_limit: usize,
}

fn resource_index(info: &ResourceInfo) -> usize {
    RESOURCES
        .iter()
        .position(|r| std::ptr::eq(r, info))
        .expect("resource infos come from the registry")
}

/// The resource part of a store key: `/registry/{group}/{resource}/`.
fn resource_prefix(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(REGISTRY_PREFIX)?;
    let group_end = rest.find('/')?;
    let resource_end = group_end + 1 + rest[group_end + 1..].find('/')?;
    Some(&key[..REGISTRY_PREFIX.len() + resource_end + 1])
}

impl WatchCache {
    /// Fills a cache from `store` and keeps it following the store from a task.
    /// `history_limit` is how many events each resource keeps for watches that resume.
    pub(crate) async fn start(
        store: Arc<dyn Store>,
        history_limit: usize,
    ) -> Result<Arc<Self>, StoreError> {
        let cache = Arc::new(Self {
            resources: RESOURCES.iter().map(|_| Mutex::default()).collect(),
            by_prefix: RESOURCES
                .iter()
                .enumerate()
                .map(|(index, info)| (info.key_prefix(), index))
                .collect(),
            revision: watch::Sender::new(0),
            history_limit: history_limit.max(1),
        });
        let stream = cache.fill(store.as_ref()).await?;
        tokio::spawn(cache.clone().follow(store, stream));
        Ok(cache)
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, ResourceCache> {
        self.resources[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces everything with the store's current state, ends every watch (their
    /// clients resume, or relist on 410), and returns the store watch that follows it.
    async fn fill(&self, store: &dyn Store) -> Result<WatchStream, StoreError> {
        let page = store.list(REGISTRY_PREFIX, None, None).await?;
        let stream = store.watch(REGISTRY_PREFIX, page.revision).await?;
        let mut filled: Vec<ResourceCache> = RESOURCES
            .iter()
            .map(|_| ResourceCache {
                history_start: page.revision,
                revision: page.revision,
                ..ResourceCache::default()
            })
            .collect();
        for kv in &page.items {
            let Some(index) = resource_prefix(&kv.key).and_then(|p| self.by_prefix.get(p)) else {
                continue;
            };
            match CachedObject::from_stored(&RESOURCES[*index], kv) {
                Ok(object) => {
                    filled[*index]
                        .objects
                        .insert(Arc::from(kv.key.as_str()), Arc::new(object));
                }
                Err(error) => tracing::error!(%error, "watch cache skips an object"),
            }
        }
        for (index, resource) in filled.into_iter().enumerate() {
            // Dropping the old watcher slots ends those watches.
            *self.lock(index) = resource;
        }
        self.revision.send_replace(page.revision);
        Ok(stream)
    }

    /// Applies store events until the store closes; refills when the store ends the
    /// watch (the cache fell too far behind).
    async fn follow(self: Arc<Self>, store: Arc<dyn Store>, mut stream: WatchStream) {
        loop {
            while let Some(event) = stream.next().await {
                self.apply(&event);
            }
            tracing::warn!("the watch cache lost its store watch; refilling");
            stream = loop {
                match self.fill(store.as_ref()).await {
                    Ok(stream) => break stream,
                    Err(StoreError::Closed) => return,
                    Err(error) => {
                        tracing::error!(%error, "refill the watch cache");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
        }
    }

    fn apply(&self, event: &Event) {
        let revision = event.revision();
        let Some(index) = resource_prefix(&event.kv.key)
            .and_then(|prefix| self.by_prefix.get(prefix))
            .copied()
        else {
            self.revision.send_replace(revision);
            return;
        };
        let info = &RESOURCES[index];
        // The one parse of this event, outside the lock.
        let put = match event.kind {
            EventKind::Put => match CachedObject::from_stored(info, &event.kv) {
                Ok(object) => Some(Arc::new(object)),
                Err(error) => {
                    tracing::error!(%error, "watch cache skips an event");
                    self.revision.send_replace(revision);
                    return;
                }
            },
            EventKind::Delete => None,
        };
        let mut resource = self.lock(index);
        let key: Arc<str> = match resource.objects.get_key_value(event.kv.key.as_str()) {
            Some((key, _)) => key.clone(),
            None => Arc::from(event.kv.key.as_str()),
        };
        let cached = match put {
            Some(object) => {
                let prev = resource.objects.insert(key.clone(), object.clone());
                CachedEvent {
                    revision,
                    key,
                    kind: EventKind::Put,
                    object,
                    prev,
                }
            }
            None => {
                let last = match resource.objects.remove(&key) {
                    Some(last) => last,
                    None => match CachedObject::from_stored(info, &event.kv) {
                        Ok(object) => Arc::new(object),
                        Err(error) => {
                            tracing::error!(%error, "watch cache skips an event");
                            drop(resource);
                            self.revision.send_replace(revision);
                            return;
                        }
                    },
                };
                CachedEvent {
                    revision,
                    key,
                    kind: EventKind::Delete,
                    object: last,
                    prev: None,
                }
            }
        };
        let cached = Arc::new(cached);
        resource.history.push_back(cached.clone());
        while resource.history.len() > self.history_limit {
            if let Some(oldest) = resource.history.pop_front() {
                resource.history_start = oldest.revision;
            }
        }
        resource.revision = revision;
        if !resource.watchers.is_empty() {
            let dispatch = Arc::new(Dispatch::new(cached.clone()));
            resource.watchers.retain(|watcher| {
                if !cached.key.starts_with(&*watcher.prefix) {
                    return !watcher.sender.is_closed();
                }
                match watcher.sender.try_send(dispatch.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(
                            resource = info.resource,
                            "a watcher fell {WATCHER_QUEUE} events behind; ending its watch"
                        );
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
        drop(resource);
        // Published after the watchers got the event, so that a watcher with nothing
        // queued may report this revision as its progress.
        self.revision.send_replace(revision);
    }

    /// The revision of the last store event the cache has applied.
    pub(crate) fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Waits until the cache has applied every write up to `revision`, for reads that
    /// must be as new as the store; gives up after a few seconds, as kube-apiserver does.
    pub(crate) async fn wait_for(&self, revision: Revision) -> Result<(), ApiError> {
        let mut receiver = self.revision.subscribe();
        let caught_up = tokio::time::timeout(
            CATCH_UP_TIMEOUT,
            receiver.wait_for(|applied| *applied >= revision),
        )
        .await;
        match caught_up {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ApiError::timeout(format!(
                "Too large resource version: {revision}, current: {}",
                self.revision()
            ))),
        }
    }

    /// Up to `limit` objects under `prefix` that pass `filter`, in key order, after
    /// `start_after` when given.
    pub(crate) fn list(
        &self,
        info: &'static ResourceInfo,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
        filter: &Filter,
    ) -> ListPage {
        let resource = self.lock(resource_index(info));
        let revision = resource.revision.max(self.revision());
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let limit = limit.unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last_key = None;
        let mut continue_after = None;
        for (key, object) in resource
            .objects
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
        {
            if !filter.matches(info, object) {
                continue;
            }
            if items.len() == limit {
                continue_after = last_key.map(Arc::clone);
                break;
            }
            items.push(object.clone());
            last_key = Some(key);
        }
        ListPage {
            items,
            revision,
            continue_after,
        }
    }

    /// Registers a watch of the keys under `prefix`, or says how old the window is.
    pub(crate) fn watch(
        &self,
        info: &'static ResourceInfo,
        prefix: &str,
        start: WatchStart,
        filter: &Filter,
    ) -> Result<Registration, StoreError> {
        let mut resource = self.lock(resource_index(info));
        let (initial, replay, start) = match start {
            WatchStart::Snapshot => {
                let initial = resource
                    .objects
                    .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                    .take_while(|(key, _)| key.starts_with(prefix))
                    .filter(|(_, object)| filter.matches(info, object))
                    .map(|(_, object)| object.clone())
                    .collect();
                (initial, Vec::new(), resource.revision.max(self.revision()))
            }
            WatchStart::Now => (
                Vec::new(),
                Vec::new(),
                resource.revision.max(self.revision()),
            ),
            WatchStart::After(after) => {
                if after < resource.history_start {
                    return Err(StoreError::Compacted {
                        requested: after,
                        compacted: resource.history_start,
                    });
                }
                let replay = resource
                    .history
                    .iter()
                    .filter(|e| e.revision > after && e.key.starts_with(prefix))
                    .cloned()
                    .collect();
                (Vec::new(), replay, after)
            }
        };
        let (sender, live) = mpsc::channel(WATCHER_QUEUE);
        resource.watchers.push(WatcherSlot {
            prefix: prefix.into(),
            sender,
        });
        Ok(Registration {
            initial,
            replay,
            start,
            live,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::registry;
    use serde_json::json;

    fn pods() -> &'static ResourceInfo {
        registry::lookup("", "v1", "pods").unwrap()
    }

    fn cached(value: Value, revision: Revision) -> Arc<CachedObject> {
        let kv = KeyValue {
            key: "/registry/core/pods/default/a".into(),
            value: Bytes::from(serde_json::to_vec(&value).unwrap()),
            create_revision: 1,
            mod_revision: revision,
        };
        Arc::new(CachedObject::from_stored(pods(), &kv).unwrap())
    }

    fn pod(labels: Value, node: &str) -> Value {
        json!({"metadata": {"name": "a", "namespace": "default", "labels": labels}, "spec": {"nodeName": node}})
    }

    fn filter(labels: &str, fields: &str) -> Filter {
        Filter {
            labels: LabelSelector::parse(labels).unwrap(),
            fields: FieldSelector::parse(fields, pods().field_selectors).unwrap(),
        }
    }

    fn put(prev: Option<Arc<CachedObject>>, object: Arc<CachedObject>) -> CachedEvent {
        CachedEvent {
            revision: object.revision,
            key: Arc::from("/registry/core/pods/default/a"),
            kind: EventKind::Put,
            object,
            prev,
        }
    }

    #[test]
    fn selectors_match_the_extracted_labels_and_fields() {
        let object = cached(pod(json!({"app": "web", "tier": "a"}), "n1"), 3);
        for (labels, fields, expected) in [
            ("", "", true),
            ("app=web", "spec.nodeName=n1", true),
            ("app=web,tier!=a", "", false),
            ("", "spec.nodeName!=", true),
            ("", "status.phase=Running", false),
            ("", "metadata.name=a,metadata.namespace=default", true),
            ("missing", "", false),
        ] {
            assert_eq!(
                filter(labels, fields).matches(pods(), &object),
                expected,
                "{labels} {fields}"
            );
        }
    }

    #[test]
    fn objects_moving_across_the_selector_are_added_and_deleted() {
        let info = pods();
        let f = filter("app=web", "");
        let v2 = cached(pod(json!({"app": "web"}), ""), 2);
        let v3 = cached(pod(json!({"app": "web", "x": "y"}), ""), 3);
        let v4 = cached(pod(json!({"app": "api"}), ""), 4);
        let v5 = cached(pod(json!({"app": "web"}), ""), 5);
        let v6 = cached(pod(json!({"app": "db"}), ""), 6);
        assert_eq!(
            put(None, v2.clone()).seen_through(info, &f),
            Some(WatchKind::Added)
        );
        assert_eq!(
            put(Some(v2), v3.clone()).seen_through(info, &f),
            Some(WatchKind::Modified)
        );
        let leaving = put(Some(v3.clone()), v4.clone());
        assert_eq!(leaving.seen_through(info, &f), Some(WatchKind::Deleted));
        // The DELETED event carries the state that matched, at the event's version.
        let line = Dispatch::new(Arc::new(leaving)).line(WatchKind::Deleted);
        let event: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(event["type"], "DELETED");
        assert_eq!(event["object"]["metadata"]["labels"]["x"], "y");
        assert_eq!(event["object"]["metadata"]["resourceVersion"], "4");
        assert_eq!(
            put(Some(v4.clone()), v5.clone()).seen_through(info, &f),
            Some(WatchKind::Added)
        );
        assert_eq!(put(Some(v4), v6).seen_through(info, &f), None);
        let deleted = CachedEvent {
            revision: 7,
            key: Arc::from("/registry/core/pods/default/a"),
            kind: EventKind::Delete,
            object: v5,
            prev: None,
        };
        assert_eq!(deleted.seen_through(info, &f), Some(WatchKind::Deleted));
        assert_eq!(deleted.seen_through(info, &filter("app=db", "")), None);
    }

    #[test]
    fn store_keys_name_their_resource() {
        assert_eq!(
            resource_prefix("/registry/core/pods/default/a"),
            Some("/registry/core/pods/")
        );
        assert_eq!(
            resource_prefix("/registry/core/namespaces/a"),
            Some("/registry/core/namespaces/")
        );
        assert_eq!(resource_prefix("/registry/core"), None);
        assert_eq!(resource_prefix("/other/x/y/z"), None);
    }

    #[tokio::test]
    async fn the_cache_follows_the_store_and_replays_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::embedded::EmbeddedStore::open(
                &dir.path().join("store.redb"),
                Default::default(),
            )
            .unwrap(),
        );
        let key = |name: &str| format!("/registry/core/pods/default/{name}");
        let body = |name: &str, app: &str| {
            Bytes::from(serde_json::to_vec(&json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": app}}})).unwrap())
        };
        let first = store.create(&key("a"), body("a", "web")).await.unwrap();
        let cache = WatchCache::start(store.clone(), 3).await.unwrap();
        let info = pods();
        let prefix = info.list_prefix(Some("default"));
        let everything = Filter::default();
        let mut watch = cache
            .watch(info, &prefix, WatchStart::After(first), &everything)
            .unwrap();
        let second = store.create(&key("b"), body("b", "api")).await.unwrap();
        let dispatch = watch.live.recv().await.unwrap();
        assert_eq!(dispatch.event.revision, second);
        let line: Value = serde_json::from_slice(&dispatch.line(WatchKind::Added)).unwrap();
        assert_eq!(line["object"]["metadata"]["name"], "b");
        assert_eq!(
            line["object"]["metadata"]["resourceVersion"],
            second.to_string()
        );

        cache.wait_for(second).await.unwrap();
        let page = cache.list(info, &prefix, None, Some(1), &everything);
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.continue_after.as_deref(), Some(key("a").as_str()));
        let web = filter("app=web", "");
        assert_eq!(cache.list(info, &prefix, None, None, &web).items.len(), 1);

        for name in ["c", "d", "e"] {
            store.create(&key(name), body(name, "web")).await.unwrap();
        }
        let last = store.delete(&key("a"), None).await.unwrap().mod_revision;
        cache.wait_for(last).await.unwrap();
        // Three events fit the window: the creates of d and e, and the deletion of a.
        assert!(matches!(
            cache.watch(info, &prefix, WatchStart::After(second), &everything),
            Err(StoreError::Compacted { .. })
        ));
        let resumed = cache
            .watch(info, &prefix, WatchStart::After(last - 3), &everything)
            .unwrap();
        let replayed: Vec<&str> = resumed.replay.iter().map(|e| &*e.key).collect();
        assert_eq!(replayed, [key("d"), key("e"), key("a")]);
        assert_eq!(resumed.replay[2].kind, EventKind::Delete);
        let snapshot = cache
            .watch(info, &prefix, WatchStart::Snapshot, &web)
            .unwrap();
        assert_eq!(snapshot.start, last);
        assert_eq!(snapshot.initial.len(), 3);
    }
}
