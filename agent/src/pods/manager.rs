//! The pod manager: one watch on the pods bound to this node, one worker per pod fed with
//! the pod's latest version, container exits routed to the worker that owns them, and
//! the clean-up of pods that exist on the machine but no longer in the API.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

use super::runtime::PodRuntime;
use super::worker::{self, PodApi, WorkerShared};

/// The pods this agent runs, by UID, for the node API and agentctl.
pub type PodTable = Arc<RwLock<HashMap<String, Arc<Pod>>>>;

/// Writes pod status and final deletions through the API server.
pub struct KubePodApi {
    pub client: kube::Client,
}

impl PodApi for KubePodApi {
    async fn write_status(&self, pod: &Pod, status: Value) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
        Ok(())
    }

    async fn finish_deletion(&self, pod: &Pod) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => Ok(()),
            // Already gone, or replaced by a pod of the same name: nothing left to do.
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

struct WorkerHandle {
    pod: watch::Sender<Option<Arc<Pod>>>,
    wake: Arc<Notify>,
}

/// Runs the pod manager until the watch ends for good.
pub async fn run<R: PodRuntime, A: PodApi>(
    client: kube::Client,
    node_name: &str,
    shared: Arc<WorkerShared<R, A>>,
    table: PodTable,
    mut exits: mpsc::UnboundedReceiver<String>,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut events = watcher::watcher(pods, config).default_backoff().boxed();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let mut running: JoinSet<String> = JoinSet::new();
    // UIDs seen during a (re)list, to find pods deleted while the watch was down.
    let mut listed: HashSet<String> = HashSet::new();
    let mut first_list = true;

    let spawn = |uid: String,
                 pod: Option<Arc<Pod>>,
                 workers: &mut HashMap<String, WorkerHandle>,
                 running: &mut JoinSet<String>| {
        let (sender, receiver) = watch::channel(pod);
        let wake = Arc::new(Notify::new());
        workers.insert(
            uid.clone(),
            WorkerHandle {
                pod: sender,
                wake: wake.clone(),
            },
        );
        let shared = shared.clone();
        running.spawn(async move {
            worker::run(shared, uid.clone(), receiver, wake).await;
            uid
        });
    };

    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { anyhow::bail!("the pod watch ended") };
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::warn!(error = %error, "pod watch");
                        continue;
                    }
                };
                match event {
                    Event::Init => listed.clear(),
                    Event::InitApply(pod) | Event::Apply(pod) => {
                        let Some(uid) = pod.metadata.uid.clone() else { continue };
                        listed.insert(uid.clone());
                        let pod = Arc::new(pod);
                        table.write().expect("pod table lock").insert(uid.clone(), pod.clone());
                        match workers.get(&uid) {
                            Some(handle) => {
                                handle.pod.send_replace(Some(pod));
                            }
                            None => spawn(uid, Some(pod), &mut workers, &mut running),
                        }
                    }
                    Event::Delete(pod) => {
                        let Some(uid) = pod.metadata.uid.clone() else { continue };
                        table.write().expect("pod table lock").remove(&uid);
                        if let Some(handle) = workers.get(&uid) {
                            handle.pod.send_replace(None);
                        }
                    }
                    Event::InitDone => {
                        // Pods that vanished while we were not watching.
                        let gone: Vec<String> = workers.keys().filter(|uid| !listed.contains(*uid)).cloned().collect();
                        for uid in gone {
                            table.write().expect("pod table lock").remove(&uid);
                            if let Some(handle) = workers.get(&uid) {
                                handle.pod.send_replace(None);
                            }
                        }
                        if first_list {
                            first_list = false;
                            // Pods the machine still holds that the API no longer has: a
                            // worker with no pod tears them down.
                            match shared.runtime.known_pods().await {
                                Ok(known) => {
                                    for uid in known {
                                        if !workers.contains_key(&uid) {
                                            tracing::info!(pod = %uid, "cleaning up a pod the API no longer has");
                                            spawn(uid, None, &mut workers, &mut running);
                                        }
                                    }
                                }
                                Err(error) => tracing::warn!(error = %error, "list pods on the machine"),
                            }
                        }
                    }
                }
            }
            Some(uid) = exits.recv() => {
                if let Some(handle) = workers.get(&uid) {
                    handle.wake.notify_one();
                }
            }
            Some(done) = running.join_next() => {
                if let Ok(uid) = done {
                    workers.remove(&uid);
                }
            }
        }
    }
}
