//! The machinery the workload controllers share: watch-fed caches that tell subscribers
//! what changed, a work queue of object keys, and the worker loop that reconciles them.
//!
//! It plays the part of client-go's informers and workqueue. A controller never lists
//! through the API server while reconciling: it reads the caches, which a single watch per
//! kind keeps current, and writes through the API.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Api, Patch, PatchParams};
use kube::core::{Selector, SelectorExt as _};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};

use super::pod::Pod;

/// What a cache tells its subscribers.
#[derive(Debug)]
pub enum Change<K> {
    /// The object was created or modified; this is its new state.
    Applied(Arc<K>),
    /// The object was deleted; this is its last state.
    Deleted(Arc<K>),
    /// The cache was (re)filled from a full list: anything may have changed.
    Resynced,
}

/// A watch-fed, read-only copy of every object of one kind.
pub struct Cache<K: Resource<DynamicType = ()> + 'static> {
    pub store: Store<K>,
    subscribers: Arc<Mutex<Vec<mpsc::UnboundedSender<Change<K>>>>>,
}

impl<K: Resource<DynamicType = ()> + 'static> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            subscribers: self.subscribers.clone(),
        }
    }
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// A cache of what `api` serves, and the task that keeps it current.
    pub fn new(api: Api<K>) -> (Self, impl Future<Output = ()> + Send + 'static) {
        Self::with_transform(api, |_| {})
    }

    /// A cache of what `api` serves, each object trimmed by `transform` as it arrives,
    /// before it is cached or handed to subscribers (client-go's `SetTransform`): the cache
    /// then holds only the fields its readers read. See [`super::pod`].
    pub fn with_transform(
        api: Api<K>,
        transform: fn(&mut K),
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (store, mut writer) = reflector::store::<K>();
        let subscribers: Arc<Mutex<Vec<mpsc::UnboundedSender<Change<K>>>>> = Arc::default();
        let cache = Self {
            store: store.clone(),
            subscribers: subscribers.clone(),
        };
        let task = async move {
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(event) => event.modify(transform),
                    Err(error) => {
                        tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying");
                        continue;
                    }
                };
                writer.apply_watcher_event(&event);
                let change = match event {
                    // The store's own copy, shared: a second copy per event would double
                    // the memory of every object changed while subscribers catch up.
                    watcher::Event::Apply(object) => Change::Applied(
                        store
                            .get(&ObjectRef::from_obj(&object))
                            .unwrap_or_else(|| Arc::new(object)),
                    ),
                    watcher::Event::Delete(object) => Change::Deleted(Arc::new(object)),
                    watcher::Event::InitDone => Change::Resynced,
                    watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                };
                let mut subscribers = subscribers.lock().expect("subscribers lock");
                subscribers.retain(|sender| sender.send(change.clone_change()).is_ok());
            }
        };
        (cache, task)
    }

    /// Every later change, in order.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Change<K>> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .expect("subscribers lock")
            .push(sender);
        receiver
    }

    /// The cached object `namespace/name`.
    pub fn get(&self, namespace: Option<&str>, name: &str) -> Option<Arc<K>> {
        let mut reference = ObjectRef::new(name);
        if let Some(namespace) = namespace {
            reference = reference.within(namespace);
        }
        self.store.get(&reference)
    }

    /// Every cached object in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        self.store
            .state_filter(|object| object.namespace().as_deref() == Some(namespace))
    }

    /// The work-queue key of every cached object.
    pub fn keys(&self) -> Vec<String> {
        self.store
            .state()
            .iter()
            .map(|object| key_of(&**object))
            .collect()
    }

    /// Feeds `queue` with this cache's own keys: a change enqueues the changed object's key,
    /// a resync every cached key. It subscribes now, so no change after this call is missed
    /// even if the returned future is first polled later.
    pub fn feed_own_keys(&self, queue: Arc<Queue>) -> impl Future<Output = ()> + Send + 'static {
        let cache = self.clone();
        feed(
            queue,
            self.subscribe(),
            |object: &K| vec![key_of(object)],
            move || cache.keys(),
        )
    }
}

impl<K> Change<K> {
    fn clone_change(&self) -> Self {
        match self {
            Change::Applied(object) => Change::Applied(object.clone()),
            Change::Deleted(object) => Change::Deleted(object.clone()),
            Change::Resynced => Change::Resynced,
        }
    }
}

/// The key of a namespaced object in a work queue: `namespace/name`.
pub fn key_of<K: Resource>(object: &K) -> String {
    match object.meta().namespace.as_deref() {
        Some(namespace) => format!(
            "{namespace}/{}",
            object.meta().name.as_deref().unwrap_or("")
        ),
        None => object.meta().name.clone().unwrap_or_default(),
    }
}

/// Splits a key back into namespace and name.
pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((namespace, name)) => (Some(namespace), name),
        None => (None, key),
    }
}

/// A deduplicating queue of keys with client-go's workqueue guarantees: a key waits at most
/// once, and a key is never handed to two workers at once (a key added while it is being
/// reconciled is handed out again afterwards).
#[derive(Default)]
pub struct Queue {
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Default)]
struct QueueState {
    waiting: VecDeque<String>,
    queued: HashSet<String>,
    processing: HashSet<String>,
    dirty_while_processing: HashSet<String>,
}

impl Queue {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn add(&self, key: String) {
        let mut state = self.state.lock().expect("queue lock");
        if state.processing.contains(&key) {
            state.dirty_while_processing.insert(key);
            return;
        }
        if state.queued.insert(key.clone()) {
            state.waiting.push_back(key);
            drop(state);
            self.notify.notify_one();
        }
    }

    /// Adds `key` once `delay` has passed.
    pub fn add_after(self: &Arc<Self>, key: String, delay: Duration) {
        let queue = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(queue) = queue.upgrade() {
                queue.add(key);
            }
        });
    }

    /// The next key to reconcile; the caller must call `done` with it afterwards.
    pub async fn next(&self) -> String {
        loop {
            let notified = self.notify.notified();
            {
                let mut state = self.state.lock().expect("queue lock");
                if let Some(key) = state.waiting.pop_front() {
                    state.queued.remove(&key);
                    state.processing.insert(key.clone());
                    if !state.waiting.is_empty() {
                        self.notify.notify_one();
                    }
                    return key;
                }
            }
            notified.await;
        }
    }

    pub fn done(&self, key: &str) {
        let mut state = self.state.lock().expect("queue lock");
        state.processing.remove(key);
        if state.dirty_while_processing.remove(key) {
            drop(state);
            self.add(key.to_string());
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().expect("queue lock").waiting.len()
    }
}

/// Runs `workers` workers that reconcile the keys of `queue` with `reconcile` forever. A
/// reconcile may ask to be called again after a delay (`Ok(Some(delay))`); one that fails is
/// retried with a per-key backoff from 100 ms up to 30 s.
pub async fn run_workers<F, Fut>(
    name: &'static str,
    queue: Arc<Queue>,
    workers: usize,
    reconcile: F,
) where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Option<Duration>>> + Send + 'static,
{
    let failures: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    // A JoinSet aborts its workers when dropped: a controller that loses leadership stops.
    let mut handles = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let queue = queue.clone();
        let reconcile = reconcile.clone();
        let failures = failures.clone();
        handles.spawn(async move {
            loop {
                let key = queue.next().await;
                let result = reconcile(key.clone()).await;
                queue.done(&key);
                match result {
                    Ok(requeue) => {
                        failures.lock().expect("failures lock").remove(&key);
                        if let Some(delay) = requeue {
                            queue.add_after(key, delay);
                        }
                    }
                    Err(error) if is_namespace_terminating(&error) => {
                        tracing::debug!(controller = name, %key, "namespace terminating; not retrying");
                        failures.lock().expect("failures lock").remove(&key);
                    }
                    Err(error) => {
                        let attempts = {
                            let mut failures = failures.lock().expect("failures lock");
                            let attempts = failures.entry(key.clone()).or_default();
                            *attempts = attempts.saturating_add(1);
                            *attempts
                        };
                        let delay = Duration::from_millis(100)
                            .saturating_mul(1 << attempts.min(9))
                            .min(Duration::from_secs(30));
                        let level_is_debug = is_conflict(&error);
                        if level_is_debug {
                            tracing::debug!(controller = name, %key, error = format!("{error:#}"), "reconcile conflict; retrying");
                        } else {
                            tracing::warn!(controller = name, %key, error = format!("{error:#}"), "reconcile failed; retrying");
                        }
                        queue.add_after(key, delay);
                    }
                }
            }
        });
    }
    while handles.join_next().await.is_some() {}
}

/// Seeds `queue` with every key of `primary`, then returns [`run_workers`] reconciling them
/// with `reconcile(controller, key)`. The seeding happens at the call, not when the future
/// is first polled: call it once the caches are ready, so that the first pass over every
/// object sees full caches, and before the feeds are polled, so the seeded keys come first.
pub fn seed_and_run_workers<K, C, R, Fut>(
    name: &'static str,
    queue: Arc<Queue>,
    primary: &Cache<K>,
    workers: usize,
    controller: Arc<C>,
    reconcile: R,
) -> impl Future<Output = ()> + use<K, C, R, Fut>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    C: Send + Sync + 'static,
    R: Fn(Arc<C>, String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Option<Duration>>> + Send + 'static,
{
    for key in primary.keys() {
        queue.add(key);
    }
    run_workers(name, queue, workers, move |key| {
        reconcile(controller.clone(), key)
    })
}

/// Whether an error is an optimistic-concurrency conflict (retried quietly).
pub fn is_conflict(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<kube::Error>(),
            Some(kube::Error::Api(response)) if response.code == 409
        )
    })
}

/// Whether an error is the API server refusing new objects in a namespace that is being
/// deleted or is gone: nothing to retry, the namespace controller is emptying it (and the
/// caches will soon show the owner gone).
pub fn is_namespace_terminating(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<kube::Error>(),
            Some(kube::Error::Api(response))
                if (response.code == 403 && response.message.contains("being terminated"))
                    || (response.code == 404 && response.message.starts_with("namespaces "))
        )
    })
}

/// Whether an error is a 404 from the API server.
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(response) if response.code == 404)
}

/// Whether a label selector selects `labels`. An empty or invalid selector selects nothing,
/// as for ReplicaSets and Services upstream.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let empty = selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty);
    if empty {
        return false;
    }
    Selector::try_from(selector.clone()).is_ok_and(|selector| selector.matches(labels))
}

/// Whether a map selector (a Service's or a nodeSelector) selects `labels`.
pub fn map_selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// The controller ownerReference of an object, if any.
pub fn controller_of<K: Resource>(object: &K) -> Option<&OwnerReference> {
    object
        .meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|reference| reference.controller == Some(true))
}

/// A controller ownerReference pointing at `owner`.
pub fn controller_reference<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.meta().name.clone().unwrap_or_default(),
        uid: owner.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Feeds a queue from a cache: every change to an object enqueues the keys `keys_of` maps
/// it to; a resync enqueues every key `all_keys` returns.
pub async fn feed<K, F, A>(
    queue: Arc<Queue>,
    mut changes: mpsc::UnboundedReceiver<Change<K>>,
    keys_of: F,
    all_keys: A,
) where
    K: Send + Sync + 'static,
    F: Fn(&K) -> Vec<String> + Send + 'static,
    A: Fn() -> Vec<String> + Send + 'static,
{
    while let Some(change) = changes.recv().await {
        match change {
            Change::Applied(object) | Change::Deleted(object) => {
                for key in keys_of(&object) {
                    queue.add(key);
                }
            }
            Change::Resynced => {
                for key in all_keys() {
                    queue.add(key);
                }
            }
        }
    }
}

/// Runs rounds of `calls` doubling from `initial_batch` as upstream's slowStartBatch does
/// (from 1),
/// stopping after the first round with a failure. Returns how many calls succeeded and the
/// first error.
pub async fn slow_start_batch<T, Fut>(
    count: usize,
    initial_batch: usize,
    mut call: impl FnMut(usize) -> Fut,
) -> (usize, Option<anyhow::Error>)
where
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut done = 0;
    let mut batch = initial_batch.max(1);
    while done < count {
        let size = batch.min(count - done);
        let results = futures::future::join_all((done..done + size).map(&mut call)).await;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(_) => done += 1,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if first_error.is_some() {
            return (done, first_error);
        }
        batch = size * 2;
    }
    (done, None)
}

/// Whether a pod's Ready condition is True.
pub fn pod_is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// When a pod became Ready, if it is.
pub fn ready_since(pod: &Pod) -> Option<jiff::Timestamp> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready")?;
    if ready.status != "True" {
        return None;
    }
    Some(
        ready
            .last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(|| jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Whether a pod counts as available after `min_ready_seconds`, and if not yet but Ready,
/// how long until it does.
pub fn pod_availability(
    pod: &Pod,
    min_ready_seconds: i32,
    now: jiff::Timestamp,
) -> (bool, Option<Duration>) {
    let Some(since) = ready_since(pod) else {
        return (false, None);
    };
    if min_ready_seconds <= 0 {
        return (true, None);
    }
    let available_at = since + jiff::SignedDuration::from_secs(i64::from(min_ready_seconds));
    if available_at <= now {
        (true, None)
    } else {
        let wait = (available_at - now).get_seconds().max(0) as u64;
        (false, Some(Duration::from_secs(wait + 1)))
    }
}

/// Whether a pod is still running or may run (not terminal, not being deleted).
pub fn pod_is_active(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Makes `owner` the controller of an orphan. Returns false if the object was gone or
/// changed under us (it is looked at again on its next event).
pub async fn adopt<K, O>(api: &Api<K>, object: &K, owner: &O) -> anyhow::Result<bool>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    O: Resource<DynamicType = ()>,
{
    let patch = serde_json::json!({"metadata": {
        "ownerReferences": [controller_reference(owner)],
        "uid": object.meta().uid,
    }});
    match api
        .patch(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(error) if is_not_found(&error) => Ok(false),
        Err(kube::Error::Api(response)) if response.code == 409 || response.code == 422 => {
            Ok(false)
        }
        Err(error) => {
            Err(anyhow::Error::new(error).context(format!("adopt {}", object.name_any())))
        }
    }
}

/// Removes the ownerReference `owner_uid` from an object its controller no longer selects.
pub async fn release<K>(api: &Api<K>, object: &K, owner_uid: &str) -> anyhow::Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let patch = serde_json::json!({"metadata": {
        "ownerReferences": [{"$patch": "delete", "uid": owner_uid}],
        "uid": object.meta().uid,
    }});
    match api
        .patch(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if is_not_found(&error) => Ok(()),
        Err(error) => {
            Err(anyhow::Error::new(error).context(format!("release {}", object.name_any())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_deduplicates_and_defers_keys_being_processed() {
        let queue = Queue::new();
        queue.add("a".into());
        queue.add("a".into());
        queue.add("b".into());
        assert_eq!(queue.len(), 2);
        let first = queue.next().await;
        assert_eq!(first, "a");
        queue.add("a".into());
        assert_eq!(queue.len(), 1, "a is being processed: it waits for done");
        queue.done("a");
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.next().await, "b");
        assert_eq!(queue.next().await, "a");
    }

    #[tokio::test]
    async fn seeding_enqueues_every_key_of_the_primary_cache_at_the_call() {
        use k8s_openapi::api::core::v1::ConfigMap;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

        let (store, mut writer) = reflector::store::<ConfigMap>();
        for name in ["a", "b"] {
            writer.apply_watcher_event(&watcher::Event::Apply(ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("default".into()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            }));
        }
        let cache = Cache {
            store,
            subscribers: Arc::default(),
        };
        let mut keys = cache.keys();
        keys.sort();
        assert_eq!(keys, ["default/a", "default/b"]);

        let queue = Queue::new();
        // Never polled: the keys must be queued by the call itself.
        let _workers = seed_and_run_workers(
            "test",
            queue.clone(),
            &cache,
            1,
            Arc::new(()),
            |_, _| async { anyhow::Ok(None) },
        );
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn empty_selectors_select_nothing() {
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert!(!selector_matches(&LabelSelector::default(), &labels));
        let selector = LabelSelector {
            match_labels: Some(labels.clone()),
            ..Default::default()
        };
        assert!(selector_matches(&selector, &labels));
        assert!(!selector_matches(&selector, &BTreeMap::new()));
    }

    #[tokio::test]
    async fn slow_start_stops_at_the_first_failing_round() {
        let (done, error) = slow_start_batch(10, 1, |i| async move {
            if i == 4 {
                anyhow::bail!("fail {i}")
            }
            Ok(())
        })
        .await;
        // Rounds of 1, 2, 4: the third round holds index 4 and fails; its others succeed.
        assert_eq!(done, 6);
        assert!(error.is_some());
    }
}
