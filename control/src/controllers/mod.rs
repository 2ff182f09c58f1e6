//! Controllers that run beside the API server. Each is a level-triggered loop: it looks at
//! the whole state it owns on every relevant change and moves it one step toward the
//! desired state.
//!
//! `namespace` runs inside the server on the store itself. The workload controllers
//! (`replicaset`, `deployment`, `daemonset`, `job`, `endpointslice`, `node_lifecycle`,
//! `garbage_collector`) are API clients: they read watch-fed caches (`runtime`), one watch
//! per kind shared by all of them, and write through the API, so they can also run as
//! their own process. `leader` makes sure only one process runs them at a time.
//!
//! **Architecture invariant:** no controller lists through the API server while
//! reconciling; reads come from the caches, and only writes (and the garbage collector's
//! check that an owner is really gone) reach the server.

pub mod daemonset;
pub mod deployment;
pub mod endpointslice;
pub mod expectations;
pub mod garbage_collector;
pub mod job;
pub mod leader;
pub mod namespace;
pub mod node_lifecycle;
pub mod pod;
pub mod replicaset;
pub mod runtime;

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;

use runtime::Cache;

/// The Lease the workload controllers elect their leader with, in `kube-system`.
pub const CONTROLLERS_LEASE: &str = "skiff-controllers";

/// How the workload controllers run.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// Whether to run them at all (a `serve` whose controllers run as their own processes
    /// sets false).
    pub enabled: bool,
    pub node_lifecycle: node_lifecycle::NodeLifecycleOptions,
    pub leader_election: leader::LeaderElectionConfig,
    /// Workers per controller.
    pub workers: usize,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            node_lifecycle: node_lifecycle::NodeLifecycleOptions::default(),
            leader_election: leader::LeaderElectionConfig::new(CONTROLLERS_LEASE),
            workers: 2,
        }
    }
}

impl WorkloadOptions {
    /// The defaults, overridden by environment variables until `skiff-control` has flags
    /// for them: `SKIFF_CONTROLLERS=off`, and in seconds `SKIFF_NODE_MONITOR_GRACE_PERIOD`,
    /// `SKIFF_DEFAULT_TOLERATION_SECONDS`, `SKIFF_NODE_MONITOR_PERIOD`,
    /// `SKIFF_LEADER_LEASE_DURATION`, `SKIFF_LEADER_RENEW_DEADLINE`,
    /// `SKIFF_LEADER_RETRY_PERIOD`.
    pub fn from_env() -> Self {
        let seconds = |name: &str| {
            let value = std::env::var(name).ok()?;
            match value.parse::<f64>() {
                Ok(seconds) if seconds > 0.0 => Some(Duration::from_secs_f64(seconds)),
                _ => {
                    tracing::warn!(%name, %value, "ignoring: not a positive number of seconds");
                    None
                }
            }
        };
        let mut options = Self::default();
        if std::env::var("SKIFF_CONTROLLERS").is_ok_and(|v| v == "off" || v == "false" || v == "0")
        {
            options.enabled = false;
        }
        let lifecycle = &mut options.node_lifecycle;
        lifecycle.grace_period =
            seconds("SKIFF_NODE_MONITOR_GRACE_PERIOD").unwrap_or(lifecycle.grace_period);
        lifecycle.default_toleration =
            seconds("SKIFF_DEFAULT_TOLERATION_SECONDS").unwrap_or(lifecycle.default_toleration);
        lifecycle.monitor_period =
            seconds("SKIFF_NODE_MONITOR_PERIOD").unwrap_or(lifecycle.monitor_period);
        let election = &mut options.leader_election;
        election.lease_duration =
            seconds("SKIFF_LEADER_LEASE_DURATION").unwrap_or(election.lease_duration);
        election.renew_deadline =
            seconds("SKIFF_LEADER_RENEW_DEADLINE").unwrap_or(election.renew_deadline);
        election.retry_period =
            seconds("SKIFF_LEADER_RETRY_PERIOD").unwrap_or(election.retry_period);
        options
    }
}

/// Runs the workload controllers (ReplicaSet, Deployment, DaemonSet, Job, EndpointSlice, node
/// lifecycle, garbage collector) against the API server behind `client`, while this
/// process holds the `kube-system/skiff-controllers` Lease, with options from the
/// environment ([`WorkloadOptions::from_env`]).
pub async fn run_workloads(client: kube::Client) -> anyhow::Result<()> {
    run_workloads_with(client, WorkloadOptions::from_env()).await
}

pub async fn run_workloads_with(
    client: kube::Client,
    options: WorkloadOptions,
) -> anyhow::Result<()> {
    if !options.enabled {
        tracing::info!("workload controllers disabled");
        return Ok(());
    }
    let election = options.leader_election.clone();
    leader::run_while_leader(client.clone(), election, || {
        run_controllers(client.clone(), options.clone())
    })
    .await
}

/// The controllers themselves, without leader election.
async fn run_controllers(client: kube::Client, options: WorkloadOptions) -> anyhow::Result<()> {
    let workers = options.workers;
    let (pods, pods_task) = Cache::<pod::Pod>::with_transform(Api::all(client.clone()), pod::slim);
    let (replicasets, replicasets_task) = Cache::<ReplicaSet>::new(Api::all(client.clone()));
    let (deployments, deployments_task) = Cache::<Deployment>::new(Api::all(client.clone()));
    let (daemonsets, daemonsets_task) = Cache::<DaemonSet>::new(Api::all(client.clone()));
    let (jobs, jobs_task) = Cache::<Job>::new(Api::all(client.clone()));
    let (nodes, nodes_task) = Cache::<Node>::new(Api::all(client.clone()));
    let (leases, leases_task) = Cache::<Lease>::new(Api::namespaced(
        client.clone(),
        node_lifecycle::NODE_LEASE_NAMESPACE,
    ));
    let (services, services_task) = Cache::<Service>::new(Api::all(client.clone()));
    let (slices, slices_task) = Cache::<EndpointSlice>::new(Api::all(client.clone()));
    let (endpoints, endpoints_task) = Cache::<Endpoints>::new(Api::all(client.clone()));

    let replicaset_controller =
        replicaset::ReplicaSetController::new(client.clone(), replicasets.clone(), pods.clone());
    let deployment_controller = deployment::DeploymentController::new(
        client.clone(),
        deployments.clone(),
        replicasets.clone(),
        pods.clone(),
    );
    let daemonset_controller = daemonset::DaemonSetController::new(
        client.clone(),
        daemonsets.clone(),
        nodes.clone(),
        pods.clone(),
    );
    let job_controller = job::JobController::new(client.clone(), jobs.clone(), pods.clone());
    let endpointslice_controller = endpointslice::EndpointSliceController::new(
        client.clone(),
        services.clone(),
        pods.clone(),
        slices.clone(),
        endpoints.clone(),
    );
    let node_lifecycle_controller = node_lifecycle::NodeLifecycleController::new(
        client.clone(),
        nodes.clone(),
        leases.clone(),
        pods.clone(),
        options.node_lifecycle.clone(),
    );
    let mut sources = garbage_collector::Sources::default();
    sources.add(&pods);
    sources.add(&replicasets);
    sources.add(&deployments);
    sources.add(&daemonsets);
    sources.add(&jobs);
    sources.add(&services);
    sources.add(&slices);
    let garbage_collector = garbage_collector::GarbageCollector::new(client.clone());

    let caches = async {
        tokio::join!(
            pods_task,
            replicasets_task,
            deployments_task,
            daemonsets_task,
            jobs_task,
            nodes_task,
            leases_task,
            services_task,
            slices_task,
            endpoints_task,
        )
    };
    let controllers = async {
        tokio::join!(
            replicaset_controller.run(workers),
            deployment_controller.run(workers),
            daemonset_controller.run(workers),
            job_controller.run(workers),
            endpointslice_controller.run(workers),
            node_lifecycle_controller.run(),
            garbage_collector.run(sources, workers),
        )
    };
    tokio::join!(caches, controllers);
    anyhow::bail!("the controllers' watches ended")
}
