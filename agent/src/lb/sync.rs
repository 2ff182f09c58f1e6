//! The load balancer's control loop: watches Services and EndpointSlices, and after every
//! batch of changes recomputes the frontends of just the Services touched and hands them to
//! the [`Programmer`]. Level-triggered: after every complete (re)list the whole desired
//! state is applied, which also removes what the maps hold for Services that no longer
//! exist. No polling: the loop sleeps until the API server sends something.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt as _;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};

use super::desired::{self, NodeContext};
use super::programmer::{Programmer, ServiceName};

/// How long a failed apply waits before the Services it touched are tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One watch event from either stream.
#[allow(
    clippy::large_enum_variant,
    reason = "each event is moved once, from its watcher into the loop"
)]
pub enum Change {
    Service(watcher::Result<Event<Service>>),
    Slice(watcher::Result<Event<EndpointSlice>>),
}

/// Watches Services and EndpointSlices in all namespaces and programs `programmer` until
/// the task is dropped. Never fails: watch errors are retried with backoff, map errors are
/// logged (a full map names the frontend left out) and retried.
pub async fn run(client: kube::Client, node: NodeContext, programmer: Programmer) {
    let services = watcher::watcher(
        kube::Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(Change::Service);
    let slices = watcher::watcher(
        kube::Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(Change::Slice);
    drive(futures::stream::select(services, slices), node, programmer).await;
}

/// What the loop knows of the API: the Services and, per Service, its slices.
#[derive(Default)]
struct Cache {
    services: HashMap<ServiceName, Service>,
    slices: HashMap<ServiceName, HashMap<String, EndpointSlice>>,
    /// `(namespace, slice name)` → the Service it is filed under in `slices`.
    slice_owner: HashMap<(String, String), ServiceName>,
}

impl Cache {
    fn insert_slice(&mut self, slice: EndpointSlice) -> Option<ServiceName> {
        let namespace = slice.namespace().unwrap_or_default();
        let slice_name = slice.name_any();
        let service = (
            namespace.clone(),
            desired::slice_service_name(&slice)?.to_owned(),
        );
        self.slice_owner
            .insert((namespace, slice_name.clone()), service.clone());
        self.slices
            .entry(service.clone())
            .or_default()
            .insert(slice_name, slice);
        Some(service)
    }

    /// Forgets a slice; the Service it belonged to, if any.
    fn remove_slice(&mut self, namespace: &str, slice_name: &str) -> Option<ServiceName> {
        let service = self
            .slice_owner
            .remove(&(namespace.to_owned(), slice_name.to_owned()))?;
        if let Some(slices) = self.slices.get_mut(&service) {
            slices.remove(slice_name);
            if slices.is_empty() {
                self.slices.remove(&service);
            }
        }
        Some(service)
    }
}

impl Cache {
    fn frontends(&self, service: &ServiceName, node: &NodeContext) -> Vec<desired::Frontend> {
        let Some(object) = self.services.get(service) else {
            return Vec::new();
        };
        let slices: Vec<&EndpointSlice> = self
            .slices
            .get(service)
            .map(|slices| slices.values().collect())
            .unwrap_or_default();
        desired::service_frontends(object, &slices, node)
    }

    fn all_frontends(&self, node: &NodeContext) -> Vec<desired::Frontend> {
        self.services
            .keys()
            .flat_map(|service| self.frontends(service, node))
            .collect()
    }
}

/// A watch stream's list in progress: objects seen since `Init`, swapped in at `InitDone`.
struct Relist<K> {
    listing: Option<Vec<K>>,
    listed_once: bool,
}

impl<K> Default for Relist<K> {
    fn default() -> Self {
        Self {
            listing: None,
            listed_once: false,
        }
    }
}

/// The loop over any stream of changes (the watchers in [`run`], a channel in tests).
pub async fn drive<S>(changes: S, node: NodeContext, mut programmer: Programmer)
where
    S: Stream<Item = Change>,
{
    let mut cache = Cache::default();
    let mut services_list: Relist<Service> = Relist::default();
    let mut slices_list: Relist<EndpointSlice> = Relist::default();
    let mut dirty: BTreeSet<ServiceName> = BTreeSet::new();
    let mut full_apply = false;
    let mut retry: Option<tokio::time::Instant> = None;
    let mut changes = std::pin::pin!(changes.ready_chunks(4096));
    loop {
        let batch = match retry {
            Some(deadline) => tokio::select! {
                batch = changes.next() => batch,
                () = tokio::time::sleep_until(deadline) => Some(Vec::new()),
            },
            None => changes.next().await,
        };
        let Some(batch) = batch else {
            return;
        };
        for change in batch {
            match change {
                Change::Service(Ok(event)) => {
                    full_apply |= on_service(event, &mut cache, &mut services_list, &mut dirty);
                }
                Change::Slice(Ok(event)) => {
                    full_apply |= on_slice(event, &mut cache, &mut slices_list, &mut dirty);
                }
                Change::Service(Err(error)) | Change::Slice(Err(error)) => {
                    tracing::warn!(%error, "load balancer watch failed; retried with backoff");
                }
            }
        }
        // Nothing is applied before both first lists are complete, so that frontends of
        // Services not yet seen are never taken for stale.
        if !(services_list.listed_once && slices_list.listed_once) {
            continue;
        }
        let started = Instant::now();
        if full_apply || retry.is_some_and(|deadline| deadline <= tokio::time::Instant::now()) {
            let result = programmer.apply_all(cache.all_frontends(&node));
            full_apply = false;
            dirty.clear();
            retry = None;
            match result {
                Ok(stats) => tracing::info!(
                    services = cache.services.len(),
                    ?stats,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "load balancer maps in step with every Service"
                ),
                Err(error) => {
                    tracing::error!(%error, "load balancer maps not fully programmed; retrying");
                    retry = Some(tokio::time::Instant::now() + RETRY_AFTER);
                }
            }
            continue;
        }
        for service in std::mem::take(&mut dirty) {
            let frontends = cache.frontends(&service, &node);
            match programmer.apply_service(&service.0, &service.1, frontends) {
                Ok(stats) if stats.is_noop() => {}
                Ok(stats) => tracing::debug!(
                    namespace = %service.0,
                    name = %service.1,
                    ?stats,
                    "service programmed"
                ),
                Err(error) => {
                    tracing::error!(namespace = %service.0, name = %service.1, %error, "service not programmed; retrying");
                    retry.get_or_insert(tokio::time::Instant::now() + RETRY_AFTER);
                }
            }
        }
    }
}

fn service_name<K: kube::Resource>(object: &K) -> ServiceName {
    (object.namespace().unwrap_or_default(), object.name_any())
}

/// Applies one Service event to the cache; true when a complete list just arrived.
fn on_service(
    event: Event<Service>,
    cache: &mut Cache,
    relist: &mut Relist<Service>,
    dirty: &mut BTreeSet<ServiceName>,
) -> bool {
    match event {
        Event::Apply(service) => {
            let name = service_name(&service);
            cache.services.insert(name.clone(), service);
            dirty.insert(name);
        }
        Event::Delete(service) => {
            let name = service_name(&service);
            cache.services.remove(&name);
            dirty.insert(name);
        }
        Event::Init => relist.listing = Some(Vec::new()),
        Event::InitApply(service) => relist.listing.get_or_insert_with(Vec::new).push(service),
        Event::InitDone => {
            let listed = relist.listing.take().unwrap_or_default();
            cache.services = listed
                .into_iter()
                .map(|service| (service_name(&service), service))
                .collect();
            relist.listed_once = true;
            return true;
        }
    }
    false
}

/// Applies one EndpointSlice event to the cache; true when a complete list just arrived.
fn on_slice(
    event: Event<EndpointSlice>,
    cache: &mut Cache,
    relist: &mut Relist<EndpointSlice>,
    dirty: &mut BTreeSet<ServiceName>,
) -> bool {
    match event {
        Event::Apply(slice) => {
            // A slice moves between Services only by relabelling: forget where it was.
            let namespace = slice.namespace().unwrap_or_default();
            dirty.extend(cache.remove_slice(&namespace, &slice.name_any()));
            dirty.extend(cache.insert_slice(slice));
        }
        Event::Delete(slice) => {
            let namespace = slice.namespace().unwrap_or_default();
            dirty.extend(cache.remove_slice(&namespace, &slice.name_any()));
        }
        Event::Init => relist.listing = Some(Vec::new()),
        Event::InitApply(slice) => relist.listing.get_or_insert_with(Vec::new).push(slice),
        Event::InitDone => {
            let listed = relist.listing.take().unwrap_or_default();
            cache.slices.clear();
            cache.slice_owner.clear();
            for slice in listed {
                cache.insert_slice(slice);
            }
            relist.listed_once = true;
            return true;
        }
    }
    false
}
