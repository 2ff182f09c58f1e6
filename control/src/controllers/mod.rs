//! Controllers that run beside the API server. Each is a level-triggered loop: it looks at
//! the whole state it owns on every relevant change and moves it one step toward the
//! desired state.
//!
//! `namespace` runs inside the server on the store itself. The workload controllers
//! (`replicaset`, `deployment`, ...) are API clients: they read watch-fed caches
//! (`runtime`) and write through the API, so they can also run as their own process.

pub mod deployment;
pub mod endpointslice;
pub mod garbage_collector;
pub mod namespace;
pub mod replicaset;
pub mod runtime;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;

use runtime::Cache;

/// Runs the workload controllers (ReplicaSet, Deployment, DaemonSet, EndpointSlice, node
/// lifecycle, garbage collector) against the API server behind `client` until one fails.
pub async fn run_workloads(client: kube::Client) -> anyhow::Result<()> {
    let (pods, pods_task) = Cache::<Pod>::new(Api::all(client.clone()));
    let (replicasets, replicasets_task) = Cache::<ReplicaSet>::new(Api::all(client.clone()));
    let replicaset_controller =
        replicaset::ReplicaSetController::new(client.clone(), replicasets.clone(), pods.clone());
    let (deployments, deployments_task) = Cache::<Deployment>::new(Api::all(client.clone()));
    let deployment_controller = deployment::DeploymentController::new(
        client.clone(),
        deployments.clone(),
        replicasets.clone(),
        pods.clone(),
    );
    let (services, services_task) = Cache::<Service>::new(Api::all(client.clone()));
    let (slices, slices_task) = Cache::<EndpointSlice>::new(Api::all(client.clone()));
    let (endpoints, endpoints_task) = Cache::<Endpoints>::new(Api::all(client.clone()));
    let endpointslice_controller = endpointslice::EndpointSliceController::new(
        client.clone(),
        services.clone(),
        pods.clone(),
        slices.clone(),
        endpoints.clone(),
    );
    let mut sources = garbage_collector::Sources::default();
    sources.add(&pods);
    sources.add(&replicasets);
    sources.add(&deployments);
    sources.add(&services);
    sources.add(&slices);
    let garbage_collector = garbage_collector::GarbageCollector::new(client.clone());
    tokio::join!(
        garbage_collector.run(sources, 2),
        services_task,
        slices_task,
        endpoints_task,
        endpointslice_controller.run(2),
        pods_task,
        replicasets_task,
        deployments_task,
        replicaset_controller.run(2),
        deployment_controller.run(2),
    );
    anyhow::bail!("the controllers' watches ended")
}
