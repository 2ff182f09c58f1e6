//! Server-side Table printers: the columns and cells kube-apiserver sends `kubectl get`, kind by kind.
//!
//! kube-apiserver always fills every column, the `-o wide` ones included, and marks those with
//! `priority: 1` so that kubectl drops them unless asked; these printers do the same. Column
//! names, types, formats and descriptions follow kubernetes' `pkg/printers/internalversion`; a
//! description taken from a field is that field's API documentation, word for word, because
//! clients show it in `kubectl explain`-like help.

use std::collections::BTreeSet;

use jiff::Timestamp;
use serde_json::{Map, Value, json};

/// One column of a `meta.k8s.io/v1` Table, as `TableColumnDefinition` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnDefinition {
    pub name: &'static str,
    pub type_: &'static str,
    pub format: &'static str,
    pub description: &'static str,
    /// 0 for the columns `kubectl get` shows, 1 for those only `-o wide` shows.
    pub priority: i32,
}

impl ColumnDefinition {
    /// The column as a `meta.k8s.io/v1` TableColumnDefinition; Go serializes every field, even empty.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "type": self.type_,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        })
    }
}

/// The columns of `kind`'s Table; kinds without a printer get the generic NAME / AGE pair.
pub fn column_definitions(kind: &str) -> &'static [ColumnDefinition] {
    match kind {
        "Namespace" => &NAMESPACE_COLUMNS,
        "Pod" => &POD_COLUMNS,
        "Service" => &SERVICE_COLUMNS,
        "Endpoints" => &ENDPOINTS_COLUMNS,
        "Node" => &NODE_COLUMNS,
        "Event" => &EVENT_COLUMNS,
        "ConfigMap" => &CONFIG_MAP_COLUMNS,
        "Secret" => &SECRET_COLUMNS,
        "ServiceAccount" => &SERVICE_ACCOUNT_COLUMNS,
        "Deployment" => &DEPLOYMENT_COLUMNS,
        "ReplicaSet" => &REPLICA_SET_COLUMNS,
        "DaemonSet" => &DAEMON_SET_COLUMNS,
        "Job" => &JOB_COLUMNS,
        "EndpointSlice" => &ENDPOINT_SLICE_COLUMNS,
        "Lease" => &LEASE_COLUMNS,
        _ => &DEFAULT_COLUMNS,
    }
}

/// The cells of `object`'s row, one per column of `column_definitions(kind)` and in that order.
pub fn row_cells(kind: &str, object: &Value, now: Timestamp) -> Vec<Value> {
    match kind {
        "Namespace" => namespace_cells(object, now),
        "Pod" => pod_cells(object, now),
        "Service" => service_cells(object, now),
        "Endpoints" => endpoints_cells(object, now),
        "Node" => node_cells(object, now),
        "Event" => event_cells(object, now),
        "ConfigMap" => config_map_cells(object, now),
        "Secret" => secret_cells(object, now),
        "ServiceAccount" => service_account_cells(object, now),
        "Deployment" => deployment_cells(object, now),
        "ReplicaSet" => replica_set_cells(object, now),
        "DaemonSet" => daemon_set_cells(object, now),
        "Job" => job_cells(object, now),
        "EndpointSlice" => endpoint_slice_cells(object, now),
        "Lease" => lease_cells(object, now),
        _ => default_cells(object, now),
    }
}

/// apimachinery's `duration.HumanDuration`: about two significant figures ("90s", "5m3s",
/// "3h2m", "2d4h", "400d", "3y20d").
pub fn human_duration(duration: std::time::Duration) -> String {
    human_duration_nanos(i128::try_from(duration.as_nanos()).unwrap_or(i128::MAX))
}

// ---------------------------------------------------------------------------------------------
// Column definitions.
// ---------------------------------------------------------------------------------------------

const NAME_DESCRIPTION: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const CREATION_TIMESTAMP_DESCRIPTION: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";
const CONTAINERS_DESCRIPTION: &str = "Names of each container in the template.";
const IMAGES_DESCRIPTION: &str = "Images referenced by each container in the template.";
const NODE_ADDRESSES_DESCRIPTION: &str = "List of addresses reachable to the node. Queried from cloud provider, if available. More info: https://kubernetes.io/docs/reference/node/node-status/#addresses Note: This field is declared as mergeable, but the merge key is not sufficiently unique, which can cause data corruption when it is merged. Callers should instead use a full-replacement patch. See https://pr.k8s.io/79391 for an example. Consumers should assume that addresses can change during the lifetime of a Node. However, there are some exceptions where this may not be possible, such as Pods that inherit a Node's address in its own status or consumers of the downward API (status.hostIP).";

/// A column `kubectl get` always shows.
const fn column(
    name: &'static str,
    type_: &'static str,
    description: &'static str,
) -> ColumnDefinition {
    ColumnDefinition {
        name,
        type_,
        format: "",
        description,
        priority: 0,
    }
}

/// A column only `kubectl get -o wide` shows.
const fn wide_column(
    name: &'static str,
    type_: &'static str,
    description: &'static str,
) -> ColumnDefinition {
    ColumnDefinition {
        priority: 1,
        ..column(name, type_, description)
    }
}

const NAME_COLUMN: ColumnDefinition = ColumnDefinition {
    format: "name",
    ..column("Name", "string", NAME_DESCRIPTION)
};
const AGE_COLUMN: ColumnDefinition = column("Age", "string", CREATION_TIMESTAMP_DESCRIPTION);

// The generic table is the one a CustomResourceDefinition without printer columns gets; its age
// column is typed "date" there, though the cell is already the human-readable age.
static DEFAULT_COLUMNS: [ColumnDefinition; 2] = [
    NAME_COLUMN,
    column("Age", "date", CREATION_TIMESTAMP_DESCRIPTION),
];

static NAMESPACE_COLUMNS: [ColumnDefinition; 3] = [
    NAME_COLUMN,
    column("Status", "string", "The status of the namespace"),
    AGE_COLUMN,
];

static POD_COLUMNS: [ColumnDefinition; 9] = [
    NAME_COLUMN,
    column(
        "Ready",
        "string",
        "The aggregate readiness state of this pod for accepting traffic.",
    ),
    column(
        "Status",
        "string",
        "The aggregate status of the containers in this pod.",
    ),
    column(
        "Restarts",
        "string",
        "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
    ),
    AGE_COLUMN,
    wide_column(
        "IP",
        "string",
        "podIP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
    ),
    wide_column(
        "Node",
        "string",
        "NodeName indicates in which node this pod is scheduled. If empty, this pod is a candidate for scheduling by the scheduler defined in schedulerName. Once this field is set, the kubelet for this node becomes responsible for the lifecycle of this pod. This field should not be used to express a desire for the pod to be scheduled on a specific node. https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/#nodename",
    ),
    wide_column(
        "Nominated Node",
        "string",
        "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods. This field does not guarantee that the pod will be scheduled on this node. Scheduler may decide to place the pod elsewhere if other nodes become available sooner. Scheduler may also decide to give the resources on this node to a higher priority pod that is created after preemption. As a result, this field may be different than PodSpec.nodeName when the pod is scheduled.",
    ),
    wide_column(
        "Readiness Gates",
        "string",
        "If specified, all readiness gates will be evaluated for pod readiness. A pod is ready when all its containers are ready AND all conditions specified in the readiness gates have status equal to \"True\" More info: https://git.k8s.io/enhancements/keps/sig-network/580-pod-readiness-gates",
    ),
];

static SERVICE_COLUMNS: [ColumnDefinition; 7] = [
    NAME_COLUMN,
    column(
        "Type",
        "string",
        "type determines how the Service is exposed. Defaults to ClusterIP. Valid options are ExternalName, ClusterIP, NodePort, and LoadBalancer. \"ClusterIP\" allocates a cluster-internal IP address for load-balancing to endpoints. Endpoints are determined by the selector or if that is not specified, by manual construction of an Endpoints object or EndpointSlice objects. If clusterIP is \"None\", no virtual IP is allocated and the endpoints are published as a set of endpoints rather than a virtual IP. \"NodePort\" builds on ClusterIP and allocates a port on every node which routes to the same endpoints as the clusterIP. \"LoadBalancer\" builds on NodePort and creates an external load-balancer (if supported in the current cloud) which routes to the same endpoints as the clusterIP. \"ExternalName\" aliases this service to the specified externalName. Several other fields do not apply to ExternalName services. More info: https://kubernetes.io/docs/concepts/services-networking/service/#publishing-services-service-types",
    ),
    column(
        "Cluster-IP",
        "string",
        "clusterIP is the IP address of the service and is usually assigned randomly. If an address is specified manually, is in-range (as per system configuration), and is not in use, it will be allocated to the service; otherwise creation of the service will fail. This field may not be changed through updates unless the type field is also being changed to ExternalName (which requires this field to be blank) or the type field is being changed from ExternalName (in which case this field may optionally be specified, as describe above).  Valid values are \"None\", empty string (\"\"), or a valid IP address. Setting this to \"None\" makes a \"headless service\" (no virtual IP), which is useful when direct endpoint connections are preferred and proxying is not required.  Only applies to types ClusterIP, NodePort, and LoadBalancer. If this field is specified when creating a Service of type ExternalName, creation will fail. This field will be wiped when updating a Service to type ExternalName. More info: https://kubernetes.io/docs/concepts/services-networking/service/#virtual-ips-and-service-proxies",
    ),
    column(
        "External-IP",
        "string",
        "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.  These IPs are not managed by Kubernetes.  The user is responsible for ensuring that traffic arrives at a node with this IP.  A common example is external load-balancers that are not part of the Kubernetes system.",
    ),
    column(
        "Port(s)",
        "string",
        "The list of ports that are exposed by this service. More info: https://kubernetes.io/docs/concepts/services-networking/service/#virtual-ips-and-service-proxies",
    ),
    AGE_COLUMN,
    wide_column(
        "Selector",
        "string",
        "Route service traffic to pods with label keys and values matching this selector. If empty or not present, the service is assumed to have an external process managing its endpoints, which Kubernetes will not modify. Only applies to types ClusterIP, NodePort, and LoadBalancer. Ignored if type is ExternalName. More info: https://kubernetes.io/docs/concepts/services-networking/service/",
    ),
];

static ENDPOINTS_COLUMNS: [ColumnDefinition; 3] = [
    NAME_COLUMN,
    column(
        "Endpoints",
        "string",
        "The set of all endpoints is the union of all subsets. Addresses are placed into subsets according to the IPs they share. A single address with multiple ports, some of which are ready and some of which are not (because they come from different containers) will result in the address being displayed in different subsets for the different ports. No address will appear in both Addresses and NotReadyAddresses in the same subset. Sets of addresses and ports that comprise a service.",
    ),
    AGE_COLUMN,
];

static NODE_COLUMNS: [ColumnDefinition; 10] = [
    NAME_COLUMN,
    column("Status", "string", "The status of the node"),
    column("Roles", "string", "The roles of the node"),
    AGE_COLUMN,
    column("Version", "string", "Kubelet Version reported by the node."),
    wide_column("Internal-IP", "string", NODE_ADDRESSES_DESCRIPTION),
    wide_column("External-IP", "string", NODE_ADDRESSES_DESCRIPTION),
    wide_column(
        "OS-Image",
        "string",
        "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
    ),
    wide_column(
        "Kernel-Version",
        "string",
        "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
    ),
    wide_column(
        "Container-Runtime",
        "string",
        "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
    ),
];

// Events are the one kind whose name is not the first column: `kubectl get events` leads with
// when it happened, and shows the event's own name only in wide output.
static EVENT_COLUMNS: [ColumnDefinition; 10] = [
    column(
        "Last Seen",
        "string",
        "The time at which the most recent occurrence of this event was recorded.",
    ),
    column(
        "Type",
        "string",
        "Type of this event (Normal, Warning), new types could be added in the future",
    ),
    column(
        "Reason",
        "string",
        "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
    ),
    column("Object", "string", "The object that this event is about."),
    wide_column(
        "Subobject",
        "string",
        "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2]. For example, if the object reference is to a container within a pod, this would take on a value like: \"spec.containers{name}\" (where \"name\" refers to the name of the container that triggered the event) or if no container name is specified \"spec.containers[2]\" (container with index 2 in this pod). This syntax is chosen only to have some well-defined way of referencing a part of an object.",
    ),
    wide_column(
        "Source",
        "string",
        "The component reporting this event. Should be a short machine understandable string.",
    ),
    column(
        "Message",
        "string",
        "A human-readable description of the status of this operation.",
    ),
    wide_column(
        "First Seen",
        "string",
        "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)",
    ),
    wide_column(
        "Count",
        "string",
        "The number of times this event has occurred.",
    ),
    ColumnDefinition {
        priority: 1,
        ..NAME_COLUMN
    },
];

static CONFIG_MAP_COLUMNS: [ColumnDefinition; 3] = [
    NAME_COLUMN,
    column(
        "Data",
        "string",
        "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_' or '.'. Values with non-UTF-8 byte sequences must use the BinaryData field. The keys stored in Data must not overlap with the keys in the BinaryData field, this is enforced during validation process.",
    ),
    AGE_COLUMN,
];

static SECRET_COLUMNS: [ColumnDefinition; 4] = [
    NAME_COLUMN,
    column(
        "Type",
        "string",
        "Used to facilitate programmatic handling of secret data. More info: https://kubernetes.io/docs/concepts/configuration/secret/#secret-types",
    ),
    column(
        "Data",
        "string",
        "Data contains the secret data. Each key must consist of alphanumeric characters, '-', '_' or '.'. The serialized form of the secret data is a base64 encoded string, representing the arbitrary (possibly non-string) data value here. Described in https://tools.ietf.org/html/rfc4648#section-4",
    ),
    AGE_COLUMN,
];

static SERVICE_ACCOUNT_COLUMNS: [ColumnDefinition; 3] = [
    NAME_COLUMN,
    column(
        "Secrets",
        "string",
        "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use. Pods are only limited to this list if this service account has a \"kubernetes.io/enforce-mountable-secrets\" annotation set to \"true\". The \"kubernetes.io/enforce-mountable-secrets\" annotation is deprecated since v1.32. Prefer separate namespaces to isolate access to mounted secrets. This field should not be used to find auto-generated service account token secrets for use outside of pods. Instead, tokens can be requested directly using the TokenRequest API, or service account token secrets can be manually created. More info: https://kubernetes.io/docs/concepts/configuration/secret",
    ),
    AGE_COLUMN,
];

static DEPLOYMENT_COLUMNS: [ColumnDefinition; 8] = [
    NAME_COLUMN,
    column("Ready", "string", "Number of the pod with ready state"),
    column(
        "Up-to-date",
        "string",
        "Total number of non-terminating pods targeted by this deployment that have the desired template spec.",
    ),
    column(
        "Available",
        "string",
        "Total number of available non-terminating pods (ready for at least minReadySeconds) targeted by this deployment.",
    ),
    AGE_COLUMN,
    wide_column("Containers", "string", CONTAINERS_DESCRIPTION),
    wide_column("Images", "string", IMAGES_DESCRIPTION),
    wide_column(
        "Selector",
        "string",
        "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.",
    ),
];

static REPLICA_SET_COLUMNS: [ColumnDefinition; 8] = [
    NAME_COLUMN,
    column(
        "Desired",
        "integer",
        "Replicas is the number of desired pods. This is a pointer to distinguish between explicit zero and unspecified. Defaults to 1. More info: https://kubernetes.io/docs/concepts/workloads/controllers/replicaset",
    ),
    column(
        "Current",
        "integer",
        "Replicas is the most recently observed number of non-terminating pods. More info: https://kubernetes.io/docs/concepts/workloads/controllers/replicaset",
    ),
    column(
        "Ready",
        "integer",
        "The number of non-terminating pods targeted by this ReplicaSet with a Ready Condition.",
    ),
    AGE_COLUMN,
    wide_column("Containers", "string", CONTAINERS_DESCRIPTION),
    wide_column("Images", "string", IMAGES_DESCRIPTION),
    wide_column(
        "Selector",
        "string",
        "Selector is a label query over pods that should match the replica count. If the selector is empty, it is defaulted to the labels present on the pod template. Label keys and values that must match in order to be controlled by this replica set. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors",
    ),
];

static DAEMON_SET_COLUMNS: [ColumnDefinition; 11] = [
    NAME_COLUMN,
    column(
        "Desired",
        "integer",
        "The total number of nodes that should be running the daemon pod (including nodes correctly running the daemon pod). More info: https://kubernetes.io/docs/concepts/workloads/controllers/daemonset/",
    ),
    column(
        "Current",
        "integer",
        "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod. More info: https://kubernetes.io/docs/concepts/workloads/controllers/daemonset/",
    ),
    column(
        "Ready",
        "integer",
        "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready.",
    ),
    column(
        "Up-to-date",
        "integer",
        "The total number of nodes that are running updated daemon pod",
    ),
    column(
        "Available",
        "integer",
        "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available (ready for at least spec.minReadySeconds)",
    ),
    column(
        "Node Selector",
        "string",
        "NodeSelector is a selector which must be true for the pod to fit on a node. Selector which must match a node's labels for the pod to be scheduled on that node. More info: https://kubernetes.io/docs/concepts/configuration/assign-pod-node/",
    ),
    AGE_COLUMN,
    wide_column("Containers", "string", CONTAINERS_DESCRIPTION),
    wide_column("Images", "string", IMAGES_DESCRIPTION),
    wide_column(
        "Selector",
        "string",
        "A label query over pods that are managed by the daemon set. Must match in order to be controlled. If empty, defaulted to labels on Pod template. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors",
    ),
];

static JOB_COLUMNS: [ColumnDefinition; 8] = [
    NAME_COLUMN,
    column("Status", "string", "Status of the job."),
    column(
        "Completions",
        "string",
        "The number of pods which reached phase Succeeded. The value increases monotonically for a given spec. However, it may decrease in reaction to scale down of elastic indexed jobs.",
    ),
    column("Duration", "string", "Time required to complete the job."),
    AGE_COLUMN,
    wide_column("Containers", "string", CONTAINERS_DESCRIPTION),
    wide_column("Images", "string", IMAGES_DESCRIPTION),
    wide_column(
        "Selector",
        "string",
        "A label query over pods that should match the pod count. Normally, the system sets this field for you. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors",
    ),
];

static ENDPOINT_SLICE_COLUMNS: [ColumnDefinition; 5] = [
    NAME_COLUMN,
    column(
        "AddressType",
        "string",
        "addressType specifies the type of address carried by this EndpointSlice. All addresses in this slice must be the same type. This field is immutable after creation. The following address types are currently supported: * IPv4: Represents an IPv4 Address. * IPv6: Represents an IPv6 Address. * FQDN: Represents a Fully Qualified Domain Name.",
    ),
    column(
        "Ports",
        "string",
        "ports specifies the list of network ports exposed by each endpoint in this slice. Each port must have a unique name. When ports is empty, it indicates that there are no defined ports. When a port is defined with a nil port value, it indicates \"all ports\". Each slice may include a maximum of 100 ports.",
    ),
    column(
        "Endpoints",
        "string",
        "endpoints is a list of unique endpoints in this slice. Each slice may include a maximum of 1000 endpoints.",
    ),
    AGE_COLUMN,
];

static LEASE_COLUMNS: [ColumnDefinition; 3] = [
    NAME_COLUMN,
    column(
        "Holder",
        "string",
        "holderIdentity contains the identity of the holder of a current lease. If Coordinated Leader Election is used, the holder identity must be equal to the elected LeaseCandidate.metadata.name field.",
    ),
    AGE_COLUMN,
];

// ---------------------------------------------------------------------------------------------
// Rows, kind by kind.
// ---------------------------------------------------------------------------------------------

fn default_cells(object: &Value, now: Timestamp) -> Vec<Value> {
    vec![json!(object_name(object)), json!(age(object, now))]
}

fn namespace_cells(namespace: &Value, now: Timestamp) -> Vec<Value> {
    vec![
        json!(object_name(namespace)),
        json!(text(namespace, "/status/phase")),
        json!(age(namespace, now)),
    ]
}

/// How kubelet reports a pod that it lost contact with while the pod was being deleted.
const NODE_UNREACHABLE_POD_REASON: &str = "NodeLost";

fn pod_cells(pod: &Value, now: Timestamp) -> Vec<Value> {
    let phase = text(pod, "/status/phase");
    let mut reason = match text(pod, "/status/reason") {
        "" => phase.to_string(),
        status_reason => status_reason.to_string(),
    };
    let conditions = items(pod, "/status/conditions");
    if conditions
        .iter()
        .any(|c| text(c, "/type") == "PodScheduled" && text(c, "/reason") == "SchedulingGated")
    {
        reason = "SchedulingGated".to_string();
    }

    // Sidecars (init containers that restart always) keep running next to the app containers,
    // so they count towards READY and RESTARTS like app containers do.
    let init_containers = items(pod, "/spec/initContainers");
    let sidecar_names: BTreeSet<&str> = init_containers
        .iter()
        .filter(|c| text(c, "/restartPolicy") == "Always")
        .map(|c| text(c, "/name"))
        .collect();
    let n_containers = items(pod, "/spec/containers").len() + sidecar_names.len();
    let mut n_ready = 0usize;
    let mut restarts = 0i64;
    let mut last_restart: Option<Timestamp> = None;
    let mut sidecar_restarts = 0i64;
    let mut last_sidecar_restart: Option<Timestamp> = None;

    let mut initializing = false;
    for (init_idx, container) in items(pod, "/status/initContainerStatuses")
        .iter()
        .enumerate()
    {
        let restart_count = integer(container, "/restartCount");
        let finished_at = timestamp(container, "/lastState/terminated/finishedAt");
        restarts += restart_count;
        keep_later(&mut last_restart, finished_at);
        let is_sidecar = sidecar_names.contains(text(container, "/name"));
        if is_sidecar {
            sidecar_restarts += restart_count;
            keep_later(&mut last_sidecar_restart, finished_at);
        }
        let terminated = present(container, "/state/terminated");
        let waiting_reason = text(container, "/state/waiting/reason");
        if let Some(terminated) = terminated
            && integer(terminated, "/exitCode") == 0
        {
            continue;
        }
        if is_sidecar && container["started"].as_bool() == Some(true) {
            if container["ready"].as_bool() == Some(true) {
                n_ready += 1;
            }
            continue;
        }
        reason = if let Some(terminated) = terminated {
            match text(terminated, "/reason") {
                "" if integer(terminated, "/signal") != 0 => {
                    format!("Init:Signal:{}", integer(terminated, "/signal"))
                }
                "" => format!("Init:ExitCode:{}", integer(terminated, "/exitCode")),
                terminated_reason => format!("Init:{terminated_reason}"),
            }
        } else if !waiting_reason.is_empty() && waiting_reason != "PodInitializing" {
            format!("Init:{waiting_reason}")
        } else {
            format!("Init:{init_idx}/{}", init_containers.len())
        };
        initializing = true;
        break;
    }

    let initialized = conditions
        .iter()
        .find(|c| text(c, "/type") == "Initialized")
        .is_some_and(|c| text(c, "/status") == "True");
    if !initializing || initialized {
        // Restarts of init containers that have finished their work no longer matter once the
        // pod is up; only sidecars and app containers count.
        restarts = sidecar_restarts;
        last_restart = last_sidecar_restart;
        let mut has_running = false;
        for container in items(pod, "/status/containerStatuses").iter().rev() {
            restarts += integer(container, "/restartCount");
            keep_later(
                &mut last_restart,
                timestamp(container, "/lastState/terminated/finishedAt"),
            );
            let waiting_reason = text(container, "/state/waiting/reason");
            let terminated = present(container, "/state/terminated");
            if !waiting_reason.is_empty() {
                reason = waiting_reason.to_string();
            } else if let Some(terminated) = terminated {
                reason = match text(terminated, "/reason") {
                    "" if integer(terminated, "/signal") != 0 => {
                        format!("Signal:{}", integer(terminated, "/signal"))
                    }
                    "" => format!("ExitCode:{}", integer(terminated, "/exitCode")),
                    terminated_reason => terminated_reason.to_string(),
                };
            } else if container["ready"].as_bool() == Some(true)
                && present(container, "/state/running").is_some()
            {
                has_running = true;
                n_ready += 1;
            }
        }
        // A container that completed while another still runs does not make the pod Completed.
        if reason == "Completed" && has_running {
            let pod_ready = conditions
                .iter()
                .any(|c| text(c, "/type") == "Ready" && text(c, "/status") == "True");
            reason = if pod_ready { "Running" } else { "NotReady" }.to_string();
        }
    }

    let deleting = present(pod, "/metadata/deletionTimestamp").is_some();
    if deleting && text(pod, "/status/reason") == NODE_UNREACHABLE_POD_REASON {
        reason = "Unknown".to_string();
    } else if deleting && phase != "Failed" && phase != "Succeeded" {
        reason = "Terminating".to_string();
    }

    let restarts_cell = match last_restart {
        Some(last_restart) if restarts != 0 => {
            format!("{restarts} ({} ago)", since(Some(last_restart), now))
        }
        _ => restarts.to_string(),
    };

    // kube-apiserver converts v1 pods to its internal form, which knows only podIPs; a pod that
    // sets just the legacy podIP gets it copied there.
    let pod_ip = match text(pod, "/status/podIPs/0/ip") {
        "" => text(pod, "/status/podIP"),
        ip => ip,
    };
    let readiness_gates = items(pod, "/spec/readinessGates");
    let readiness_gates_cell = if readiness_gates.is_empty() {
        "<none>".to_string()
    } else {
        let n_true = readiness_gates
            .iter()
            .filter(|gate| {
                let condition_type = text(gate, "/conditionType");
                conditions
                    .iter()
                    .find(|c| text(c, "/type") == condition_type)
                    .is_some_and(|c| text(c, "/status") == "True")
            })
            .count();
        format!("{n_true}/{}", readiness_gates.len())
    };

    vec![
        json!(object_name(pod)),
        json!(format!("{n_ready}/{n_containers}")),
        json!(reason),
        json!(restarts_cell),
        json!(age(pod, now)),
        json!(or_none(pod_ip)),
        json!(or_none(text(pod, "/spec/nodeName"))),
        json!(or_none(text(pod, "/status/nominatedNodeName"))),
        json!(readiness_gates_cell),
    ]
}

fn service_cells(service: &Value, now: Timestamp) -> Vec<Value> {
    // Defaulting copies a lone clusterIP into clusterIPs, which is what upstream reads.
    let cluster_ip = or_none(first_non_empty(
        text(service, "/spec/clusterIPs/0"),
        text(service, "/spec/clusterIP"),
    ));
    let ports: Vec<String> = items(service, "/spec/ports")
        .iter()
        .map(|port| {
            let protocol = match text(port, "/protocol") {
                // Defaulting fills the protocol in before an object is stored.
                "" => "TCP",
                protocol => protocol,
            };
            match integer(port, "/nodePort") {
                node_port if node_port > 0 => {
                    format!("{}:{node_port}/{protocol}", integer(port, "/port"))
                }
                _ => format!("{}/{protocol}", integer(port, "/port")),
            }
        })
        .collect();
    let ports_cell = if ports.is_empty() {
        "<none>".to_string()
    } else {
        ports.join(",")
    };
    vec![
        json!(object_name(service)),
        json!(text(service, "/spec/type")),
        json!(cluster_ip),
        json!(service_external_ip(service)),
        json!(ports_cell),
        json!(age(service, now)),
        json!(format_labels(service.pointer("/spec/selector"))),
    ]
}

fn service_external_ip(service: &Value) -> String {
    let external_ips: Vec<&str> = items(service, "/spec/externalIPs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    match text(service, "/spec/type") {
        "ClusterIP" | "NodePort" if external_ips.is_empty() => "<none>".to_string(),
        "ClusterIP" | "NodePort" => external_ips.join(","),
        "LoadBalancer" => {
            // Upstream clips the load balancer addresses to 16 characters only for narrow
            // output, and the server always prints wide, so they are never clipped here.
            let load_balancer_addresses: BTreeSet<&str> =
                items(service, "/status/loadBalancer/ingress")
                    .iter()
                    .map(|ingress| match text(ingress, "/ip") {
                        "" => text(ingress, "/hostname"),
                        ip => ip,
                    })
                    .filter(|address| !address.is_empty())
                    .collect();
            let mut addresses: Vec<&str> = load_balancer_addresses.into_iter().collect();
            addresses.extend(external_ips);
            if addresses.is_empty() {
                "<pending>".to_string()
            } else {
                addresses.join(",")
            }
        }
        "ExternalName" => text(service, "/spec/externalName").to_string(),
        _ => "<unknown>".to_string(),
    }
}

/// How many entries a list cell names before it says "+ N more...".
const MAX_LISTED: usize = 3;

fn endpoints_cells(endpoints: &Value, now: Timestamp) -> Vec<Value> {
    vec![
        json!(object_name(endpoints)),
        json!(format_endpoints(endpoints)),
        json!(age(endpoints, now)),
    ]
}

fn format_endpoints(endpoints: &Value) -> String {
    let subsets = items(endpoints, "/subsets");
    if subsets.is_empty() {
        return "<none>".to_string();
    }
    let mut listed: Vec<String> = Vec::new();
    let mut n_total = 0usize;
    for subset in subsets {
        let addresses: Vec<&str> = items(subset, "/addresses")
            .iter()
            .map(|address| text(address, "/ip"))
            .collect();
        let ports = items(subset, "/ports");
        // A headless service may have no ports at all; its endpoints are bare addresses.
        if ports.is_empty() {
            n_total += addresses.len();
            listed.extend(
                addresses
                    .iter()
                    .take(MAX_LISTED.saturating_sub(listed.len()))
                    .map(|ip| ip.to_string()),
            );
            continue;
        }
        for port in ports {
            let port_number = integer(port, "/port");
            n_total += addresses.len();
            listed.extend(
                addresses
                    .iter()
                    .take(MAX_LISTED.saturating_sub(listed.len()))
                    .map(|ip| join_host_port(ip, port_number)),
            );
        }
    }
    let joined = listed.join(",");
    if n_total > MAX_LISTED {
        format!("{joined} + {} more...", n_total - MAX_LISTED)
    } else {
        joined
    }
}

/// Go's `net.JoinHostPort`: IPv6 addresses go in brackets.
fn join_host_port(host: &str, port: i64) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn endpoint_slice_cells(slice: &Value, now: Timestamp) -> Vec<Value> {
    let ports: Vec<String> = items(slice, "/ports")
        .iter()
        .map(|port| match port["port"].as_i64() {
            Some(number) => number.to_string(),
            // A port without a number means "all ports"; a name is the next best label.
            None => match port["name"].as_str() {
                Some(name) => name.to_string(),
                None => "*".to_string(),
            },
        })
        .collect();
    let addresses: Vec<String> = items(slice, "/endpoints")
        .iter()
        .flat_map(|endpoint| items(endpoint, "/addresses"))
        .map(|address| address.as_str().unwrap_or("").to_string())
        .collect();
    vec![
        json!(object_name(slice)),
        json!(text(slice, "/addressType")),
        json!(list_with_more(&ports)),
        json!(list_with_more(&addresses)),
        json!(age(slice, now)),
    ]
}

/// The first few entries, "+ N more..." for the rest, and `<unset>` for none.
fn list_with_more(entries: &[String]) -> String {
    let joined = entries[..entries.len().min(MAX_LISTED)].join(",");
    if entries.len() > MAX_LISTED {
        format!("{joined} + {} more...", entries.len() - MAX_LISTED)
    } else if joined.is_empty() {
        "<unset>".to_string()
    } else {
        joined
    }
}

const NODE_ROLE_LABEL_PREFIX: &str = "node-role.kubernetes.io/";
const LEGACY_NODE_ROLE_LABEL: &str = "kubernetes.io/role";

fn node_cells(node: &Value, now: Timestamp) -> Vec<Value> {
    // Only the Ready condition speaks for a node's status; the pressure conditions do not.
    let mut status: Vec<&str> = Vec::new();
    if let Some(ready) = items(node, "/status/conditions")
        .iter()
        .rfind(|c| text(c, "/type") == "Ready")
    {
        status.push(if text(ready, "/status") == "True" {
            "Ready"
        } else {
            "NotReady"
        });
    } else {
        status.push("Unknown");
    }
    if node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push("SchedulingDisabled");
    }

    let mut roles: BTreeSet<&str> = BTreeSet::new();
    if let Some(labels) = node.pointer("/metadata/labels").and_then(Value::as_object) {
        for (key, value) in labels {
            if let Some(role) = key.strip_prefix(NODE_ROLE_LABEL_PREFIX)
                && !role.is_empty()
            {
                roles.insert(role);
            } else if key == LEGACY_NODE_ROLE_LABEL
                && let Some(role) = value.as_str()
                && !role.is_empty()
            {
                roles.insert(role);
            }
        }
    }
    let roles_cell = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.into_iter().collect::<Vec<_>>().join(",")
    };

    let node_address = |address_type: &str| {
        items(node, "/status/addresses")
            .iter()
            .find(|address| text(address, "/type") == address_type)
            .map(|address| text(address, "/address"))
            .unwrap_or("<none>")
    };
    let or_unknown = |value: &str| match value {
        "" => "<unknown>".to_string(),
        value => value.to_string(),
    };
    vec![
        json!(object_name(node)),
        json!(status.join(",")),
        json!(roles_cell),
        json!(age(node, now)),
        json!(text(node, "/status/nodeInfo/kubeletVersion")),
        json!(node_address("InternalIP")),
        json!(node_address("ExternalIP")),
        json!(or_unknown(text(node, "/status/nodeInfo/osImage"))),
        json!(or_unknown(text(node, "/status/nodeInfo/kernelVersion"))),
        json!(or_unknown(text(
            node,
            "/status/nodeInfo/containerRuntimeVersion"
        ))),
    ]
}

fn event_cells(event: &Value, now: Timestamp) -> Vec<Value> {
    // Events written through events.k8s.io carry eventTime and series instead of the legacy
    // first/last timestamps and count.
    let first_seen = match timestamp(event, "/firstTimestamp") {
        Some(first) => since(Some(first), now),
        None => since(timestamp(event, "/eventTime"), now),
    };
    let mut last_seen = match timestamp(event, "/lastTimestamp") {
        Some(last) => since(Some(last), now),
        None => first_seen.clone(),
    };
    let mut count = integer(event, "/count");
    if present(event, "/series").is_some() {
        last_seen = since(timestamp(event, "/series/lastObservedTime"), now);
        count = integer(event, "/series/count");
    } else if count == 0 {
        // A singleton event written through the new API has no count.
        count = 1;
    }

    let involved_kind = text(event, "/involvedObject/kind").to_lowercase();
    let object = match text(event, "/involvedObject/name") {
        "" => involved_kind,
        involved_name => format!("{involved_kind}/{involved_name}"),
    };
    let component = first_non_empty(
        text(event, "/source/component"),
        text(event, "/reportingComponent"),
    );
    let instance = first_non_empty(
        text(event, "/source/host"),
        text(event, "/reportingInstance"),
    );
    let source = if instance.is_empty() {
        component.to_string()
    } else {
        format!("{component}, {instance}")
    };

    vec![
        json!(last_seen),
        json!(text(event, "/type")),
        json!(text(event, "/reason")),
        json!(object),
        json!(text(event, "/involvedObject/fieldPath")),
        json!(source),
        json!(text(event, "/message").trim()),
        json!(first_seen),
        json!(count),
        json!(object_name(event)),
    ]
}

fn first_non_empty<'a>(preferred: &'a str, fallback: &'a str) -> &'a str {
    if preferred.is_empty() {
        fallback
    } else {
        preferred
    }
}

fn config_map_cells(config_map: &Value, now: Timestamp) -> Vec<Value> {
    let n_keys = map_len(config_map, "/data") + map_len(config_map, "/binaryData");
    vec![
        json!(object_name(config_map)),
        json!(n_keys),
        json!(age(config_map, now)),
    ]
}

fn secret_cells(secret: &Value, now: Timestamp) -> Vec<Value> {
    vec![
        json!(object_name(secret)),
        json!(text(secret, "/type")),
        json!(map_len(secret, "/data")),
        json!(age(secret, now)),
    ]
}

fn service_account_cells(service_account: &Value, now: Timestamp) -> Vec<Value> {
    vec![
        json!(object_name(service_account)),
        json!(items(service_account, "/secrets").len()),
        json!(age(service_account, now)),
    ]
}

fn deployment_cells(deployment: &Value, now: Timestamp) -> Vec<Value> {
    let (names, images) = container_cells(deployment);
    let selector = match label_selector_string(deployment.pointer("/spec/selector")) {
        Ok(selector) => selector,
        Err(()) => "<invalid>".to_string(),
    };
    vec![
        json!(object_name(deployment)),
        json!(format!(
            "{}/{}",
            integer(deployment, "/status/readyReplicas"),
            desired_replicas(deployment)
        )),
        json!(integer(deployment, "/status/updatedReplicas")),
        json!(integer(deployment, "/status/availableReplicas")),
        json!(age(deployment, now)),
        json!(names),
        json!(images),
        json!(selector),
    ]
}

fn replica_set_cells(replica_set: &Value, now: Timestamp) -> Vec<Value> {
    let (names, images) = container_cells(replica_set);
    vec![
        json!(object_name(replica_set)),
        json!(desired_replicas(replica_set)),
        json!(integer(replica_set, "/status/replicas")),
        json!(integer(replica_set, "/status/readyReplicas")),
        json!(age(replica_set, now)),
        json!(names),
        json!(images),
        json!(format_label_selector(replica_set.pointer("/spec/selector"))),
    ]
}

fn daemon_set_cells(daemon_set: &Value, now: Timestamp) -> Vec<Value> {
    let (names, images) = container_cells(daemon_set);
    vec![
        json!(object_name(daemon_set)),
        json!(integer(daemon_set, "/status/desiredNumberScheduled")),
        json!(integer(daemon_set, "/status/currentNumberScheduled")),
        json!(integer(daemon_set, "/status/numberReady")),
        json!(integer(daemon_set, "/status/updatedNumberScheduled")),
        json!(integer(daemon_set, "/status/numberAvailable")),
        json!(format_labels(
            daemon_set.pointer("/spec/template/spec/nodeSelector")
        )),
        json!(age(daemon_set, now)),
        json!(names),
        json!(images),
        json!(format_label_selector(daemon_set.pointer("/spec/selector"))),
    ]
}

fn job_cells(job: &Value, now: Timestamp) -> Vec<Value> {
    let (names, images) = container_cells(job);
    let succeeded = integer(job, "/status/succeeded");
    let completions = match job.pointer("/spec/completions").and_then(Value::as_i64) {
        Some(completions) => format!("{succeeded}/{completions}"),
        None => match integer(job, "/spec/parallelism") {
            parallelism if parallelism > 1 => format!("{succeeded}/1 of {parallelism}"),
            _ => format!("{succeeded}/1"),
        },
    };
    let started = timestamp(job, "/status/startTime");
    let duration = match (started, timestamp(job, "/status/completionTime")) {
        (None, _) => String::new(),
        (Some(started), None) => since(Some(started), now),
        (Some(started), Some(completed)) => since(Some(started), completed),
    };
    // Upstream's order: a finished Job reads as finished even while it is being deleted.
    let condition = |type_: &str| {
        items(job, "/status/conditions")
            .iter()
            .find(|condition| text(condition, "/type") == type_)
            .is_some_and(|condition| text(condition, "/status") == "True")
    };
    let status = if condition("Complete") {
        "Complete"
    } else if condition("Failed") {
        "Failed"
    } else if present(job, "/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else if condition("Suspended") {
        "Suspended"
    } else if condition("FailureTarget") {
        "FailureTarget"
    } else {
        "Running"
    };
    vec![
        json!(object_name(job)),
        json!(status),
        json!(completions),
        json!(duration),
        json!(age(job, now)),
        json!(names),
        json!(images),
        json!(format_label_selector(job.pointer("/spec/selector"))),
    ]
}

fn lease_cells(lease: &Value, now: Timestamp) -> Vec<Value> {
    vec![
        json!(object_name(lease)),
        json!(text(lease, "/spec/holderIdentity")),
        json!(age(lease, now)),
    ]
}

/// `spec.replicas`, which defaulting sets to 1 when the client leaves it out.
fn desired_replicas(workload: &Value) -> i64 {
    workload
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
}

/// The template's container names and images, each comma-separated in container order.
fn container_cells(workload: &Value) -> (String, String) {
    let containers = items(workload, "/spec/template/spec/containers");
    let names: Vec<&str> = containers.iter().map(|c| text(c, "/name")).collect();
    let images: Vec<&str> = containers.iter().map(|c| text(c, "/image")).collect();
    (names.join(","), images.join(","))
}

// ---------------------------------------------------------------------------------------------
// Labels and selectors, printed as apimachinery's `labels` package prints them.
// ---------------------------------------------------------------------------------------------

/// `labels.FormatLabels`: `k=v` pairs sorted by key, or `<none>`.
fn format_labels(labels: Option<&Value>) -> String {
    let Some(labels) = labels.and_then(Value::as_object) else {
        return "<none>".to_string();
    };
    let mut pairs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str().unwrap_or("")))
        .collect();
    // Sorted by key, not by the joined pair: "a=x" comes before "a.b=y".
    pairs.sort_by_key(|(key, _)| *key);
    let joined: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    if joined.is_empty() {
        "<none>".to_string()
    } else {
        joined.join(",")
    }
}

/// `metav1.FormatLabelSelector`: the selector's string form, `<none>` when it selects by
/// nothing, `<error>` when it cannot be parsed.
fn format_label_selector(selector: Option<&Value>) -> String {
    match label_selector_string(selector) {
        Ok(rendered) if rendered.is_empty() => "<none>".to_string(),
        Ok(rendered) => rendered,
        Err(()) => "<error>".to_string(),
    }
}

/// `metav1.LabelSelectorAsSelector(selector).String()`: requirements sorted by key, `k=v` for
/// matchLabels and `k in (a,b)`, `k notin (a,b)`, `k`, `!k` for matchExpressions.
fn label_selector_string(selector: Option<&Value>) -> Result<String, ()> {
    let Some(selector) = selector.filter(|s| !s.is_null()) else {
        return Ok(String::new());
    };
    let mut requirements: Vec<(&str, String)> = Vec::new();
    if let Some(match_labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (key, value) in match_labels {
            requirements.push((key, format!("{key}={}", value.as_str().unwrap_or(""))));
        }
    }
    for expression in items(selector, "/matchExpressions") {
        let key = text(expression, "/key");
        let mut values: Vec<&str> = items(expression, "/values")
            .iter()
            .map(|v| v.as_str().unwrap_or(""))
            .collect();
        values.sort_unstable();
        let rendered = match text(expression, "/operator") {
            "In" if !values.is_empty() => format!("{key} in ({})", values.join(",")),
            "NotIn" if !values.is_empty() => format!("{key} notin ({})", values.join(",")),
            "Exists" if values.is_empty() => key.to_string(),
            "DoesNotExist" if values.is_empty() => format!("!{key}"),
            _ => return Err(()),
        };
        requirements.push((key, rendered));
    }
    requirements.sort_by_key(|(key, _)| *key);
    Ok(requirements
        .into_iter()
        .map(|(_, rendered)| rendered)
        .collect::<Vec<_>>()
        .join(","))
}

// ---------------------------------------------------------------------------------------------
// Reading Kubernetes JSON.
// ---------------------------------------------------------------------------------------------

fn object_name(object: &Value) -> &str {
    text(object, "/metadata/name")
}

/// The string at `pointer`, or "" as Go's zero value when it is absent.
fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The integer at `pointer`, or 0 as Go's zero value when it is absent.
fn integer(value: &Value, pointer: &str) -> i64 {
    value.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// The array at `pointer`, or an empty one.
fn items<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn map_len(value: &Value, pointer: &str) -> usize {
    value
        .pointer(pointer)
        .and_then(Value::as_object)
        .map_or(0, Map::len)
}

/// The value at `pointer` unless it is absent or null, as a Go pointer field would be nil.
fn present<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    value.pointer(pointer).filter(|v| !v.is_null())
}

fn or_none(value: &str) -> &str {
    if value.is_empty() { "<none>" } else { value }
}

/// Seconds from the Unix epoch to 0001-01-01T00:00:00Z, Go's zero `time.Time`.
const GO_ZERO_TIME_SECONDS: i64 = -62_135_596_800;

/// The RFC 3339 timestamp at `pointer`; absent, unparseable and Go's zero time all count as
/// unset, as `metav1.Time.IsZero` would say.
fn timestamp(value: &Value, pointer: &str) -> Option<Timestamp> {
    let parsed: Timestamp = value.pointer(pointer)?.as_str()?.parse().ok()?;
    (parsed.as_second() != GO_ZERO_TIME_SECONDS || parsed.subsec_nanosecond() != 0)
        .then_some(parsed)
}

fn keep_later(latest: &mut Option<Timestamp>, candidate: Option<Timestamp>) {
    if let Some(candidate) = candidate
        && latest.is_none_or(|current| current < candidate)
    {
        *latest = Some(candidate);
    }
}

fn age(object: &Value, now: Timestamp) -> String {
    since(timestamp(object, "/metadata/creationTimestamp"), now)
}

/// `translateTimestampSince`: how long ago `moment` was, or `<unknown>` when it is unset.
fn since(moment: Option<Timestamp>, now: Timestamp) -> String {
    match moment {
        Some(moment) => human_duration_nanos(now.duration_since(moment).as_nanos()),
        None => "<unknown>".to_string(),
    }
}

/// `HumanDuration` on a signed duration, since a timestamp slightly in the future (clock skew
/// between servers) must print "0s" and one far in the future `<invalid>`.
fn human_duration_nanos(nanos: i128) -> String {
    const SECOND: i128 = 1_000_000_000;
    const MINUTE: i128 = 60 * SECOND;
    const HOUR: i128 = 60 * MINUTE;
    const DAY_HOURS: i128 = 24;
    const YEAR_HOURS: i128 = 365 * DAY_HOURS;

    // Integer division truncates towards zero as Go's int(d.Seconds()) does, so up to two
    // seconds in the future still reads as now.
    let seconds = nanos / SECOND;
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    if seconds < 0 {
        return "0s".to_string();
    }
    if seconds < 2 * 60 {
        return format!("{seconds}s");
    }
    let minutes = nanos / MINUTE;
    if minutes < 10 {
        return match seconds % 60 {
            0 => format!("{minutes}m"),
            rest => format!("{minutes}m{rest}s"),
        };
    }
    if minutes < 3 * 60 {
        return format!("{minutes}m");
    }
    let hours = nanos / HOUR;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            rest => format!("{hours}h{rest}m"),
        };
    }
    if hours < 2 * DAY_HOURS {
        return format!("{hours}h");
    }
    if hours < 8 * DAY_HOURS {
        return match hours % DAY_HOURS {
            0 => format!("{}d", hours / DAY_HOURS),
            rest => format!("{}d{rest}h", hours / DAY_HOURS),
        };
    }
    if hours < 2 * YEAR_HOURS {
        return format!("{}d", hours / DAY_HOURS);
    }
    if hours < 8 * YEAR_HOURS {
        return match (hours / DAY_HOURS) % 365 {
            0 => format!("{}y", hours / YEAR_HOURS),
            rest => format!("{}y{rest}d", hours / YEAR_HOURS),
        };
    }
    format!("{}y", hours / YEAR_HOURS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COVERED_KINDS: [&str; 15] = [
        "Namespace",
        "Pod",
        "Service",
        "Endpoints",
        "Node",
        "Event",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "Deployment",
        "ReplicaSet",
        "DaemonSet",
        "Job",
        "EndpointSlice",
        "Lease",
    ];

    fn now() -> Timestamp {
        "2026-11-23T08:00:00Z".parse().unwrap()
    }

    /// An RFC 3339 timestamp `seconds_ago` before `now()`.
    fn ago(seconds_ago: i64) -> String {
        now()
            .checked_sub(jiff::SignedDuration::from_secs(seconds_ago))
            .unwrap()
            .to_string()
    }

    fn names(kind: &str) -> Vec<&'static str> {
        column_definitions(kind).iter().map(|c| c.name).collect()
    }

    fn wide_names(kind: &str) -> Vec<&'static str> {
        column_definitions(kind)
            .iter()
            .filter(|c| c.priority == 1)
            .map(|c| c.name)
            .collect()
    }

    fn cells(kind: &str, object: Value) -> Vec<Value> {
        let row = row_cells(kind, &object, now());
        assert_eq!(row.len(), column_definitions(kind).len(), "{kind}: {row:?}");
        row
    }

    fn pod(status: Value) -> Value {
        json!({
            "metadata": {"name": "web", "creationTimestamp": ago(300)},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]},
            "status": status,
        })
    }

    /// The READY, STATUS and RESTARTS cells of a pod.
    fn pod_summary(object: Value) -> (String, String, String) {
        let row = cells("Pod", object);
        (
            row[1].as_str().unwrap().to_string(),
            row[2].as_str().unwrap().to_string(),
            row[3].as_str().unwrap().to_string(),
        )
    }

    fn summary(ready: &str, status: &str, restarts: &str) -> (String, String, String) {
        (ready.to_string(), status.to_string(), restarts.to_string())
    }

    #[test]
    fn human_duration_matches_apimachinery_at_every_boundary() {
        let cases: [(u64, &str); 28] = [
            (0, "0s"),
            (1, "1s"),
            (119, "119s"),
            (120, "2m"),
            (121, "2m1s"),
            (9 * 60 + 59, "9m59s"),
            (10 * 60, "10m"),
            (10 * 60 + 59, "10m"),
            (179 * 60 + 59, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 2 * 60 + 30, "3h2m"),
            (7 * 3600 + 59 * 60, "7h59m"),
            (8 * 3600, "8h"),
            (8 * 3600 + 59 * 60, "8h"),
            (47 * 3600 + 59 * 60, "47h"),
            (48 * 3600, "2d"),
            (52 * 3600, "2d4h"),
            (7 * 86400 + 23 * 3600, "7d23h"),
            (8 * 86400, "8d"),
            (8 * 86400 + 23 * 3600, "8d"),
            (729 * 86400, "729d"),
            (730 * 86400, "2y"),
            (750 * 86400, "2y20d"),
            (3 * 365 * 86400, "3y"),
            (8 * 365 * 86400 - 1, "7y364d"),
            (8 * 365 * 86400, "8y"),
            (20 * 365 * 86400 + 100 * 86400, "20y"),
            (59, "59s"),
        ];
        for (seconds, expected) in cases {
            assert_eq!(
                human_duration(std::time::Duration::from_secs(seconds)),
                expected,
                "{seconds}s"
            );
        }
        assert_eq!(
            human_duration(std::time::Duration::from_millis(119_999)),
            "119s"
        );
    }

    #[test]
    fn slightly_future_timestamps_read_as_now_and_far_future_ones_as_invalid() {
        let in_future = |seconds: i64| {
            let moment = now()
                .checked_add(jiff::SignedDuration::from_millis(seconds))
                .unwrap();
            since(Some(moment), now())
        };
        assert_eq!(in_future(500), "0s");
        assert_eq!(in_future(1_999), "0s");
        assert_eq!(in_future(2_000), "<invalid>");
        assert_eq!(since(None, now()), "<unknown>");
    }

    #[test]
    fn column_json_is_a_table_column_definition() {
        assert_eq!(
            column_definitions("Pod")[5].to_json(),
            json!({
                "name": "IP",
                "type": "string",
                "format": "",
                "description": "podIP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
                "priority": 1,
            })
        );
        assert_eq!(column_definitions("Pod")[0].to_json()["format"], "name");
        assert_eq!(column_definitions("Pod")[0].to_json()["priority"], 0);
    }

    #[test]
    fn every_kind_leads_with_its_name_and_fills_every_column() {
        for kind in COVERED_KINDS.iter().chain(&["Role", ""]) {
            let columns = column_definitions(kind);
            let name_column = columns.iter().find(|c| c.name == "Name").unwrap();
            assert_eq!(name_column.format, "name", "{kind}");
            assert_eq!(name_column.description, NAME_DESCRIPTION, "{kind}");
            if *kind != "Event" {
                assert_eq!(columns[0].name, "Name", "{kind}");
                assert_eq!(columns[0].priority, 0, "{kind}");
            }
            for column in columns {
                assert!(!column.description.is_empty(), "{kind} {}", column.name);
                assert!(
                    ["string", "integer", "date"].contains(&column.type_),
                    "{kind} {}",
                    column.name
                );
                if column.name != "Name" {
                    assert_eq!(column.format, "", "{kind} {}", column.name);
                }
            }
            // An object with nothing in it still gets a full row, as Go's zero values would.
            cells(kind, json!({}));
            cells(
                kind,
                json!({"metadata": {"name": "x"}, "spec": null, "status": null}),
            );
        }
    }

    #[test]
    fn columns_match_kube_apiserver_including_wide_ones() {
        assert_eq!(names("Namespace"), ["Name", "Status", "Age"]);
        assert_eq!(
            names("Pod"),
            [
                "Name",
                "Ready",
                "Status",
                "Restarts",
                "Age",
                "IP",
                "Node",
                "Nominated Node",
                "Readiness Gates"
            ]
        );
        assert_eq!(
            wide_names("Pod"),
            ["IP", "Node", "Nominated Node", "Readiness Gates"]
        );
        assert_eq!(
            names("Service"),
            [
                "Name",
                "Type",
                "Cluster-IP",
                "External-IP",
                "Port(s)",
                "Age",
                "Selector"
            ]
        );
        assert_eq!(wide_names("Service"), ["Selector"]);
        assert_eq!(names("Endpoints"), ["Name", "Endpoints", "Age"]);
        assert_eq!(
            names("Node"),
            [
                "Name",
                "Status",
                "Roles",
                "Age",
                "Version",
                "Internal-IP",
                "External-IP",
                "OS-Image",
                "Kernel-Version",
                "Container-Runtime"
            ]
        );
        assert_eq!(
            wide_names("Node"),
            [
                "Internal-IP",
                "External-IP",
                "OS-Image",
                "Kernel-Version",
                "Container-Runtime"
            ]
        );
        assert_eq!(
            names("Event"),
            [
                "Last Seen",
                "Type",
                "Reason",
                "Object",
                "Subobject",
                "Source",
                "Message",
                "First Seen",
                "Count",
                "Name"
            ]
        );
        assert_eq!(
            wide_names("Event"),
            ["Subobject", "Source", "First Seen", "Count", "Name"]
        );
        assert_eq!(names("ConfigMap"), ["Name", "Data", "Age"]);
        assert_eq!(names("Secret"), ["Name", "Type", "Data", "Age"]);
        assert_eq!(names("ServiceAccount"), ["Name", "Secrets", "Age"]);
        assert_eq!(
            names("Deployment"),
            [
                "Name",
                "Ready",
                "Up-to-date",
                "Available",
                "Age",
                "Containers",
                "Images",
                "Selector"
            ]
        );
        assert_eq!(
            wide_names("Deployment"),
            ["Containers", "Images", "Selector"]
        );
        assert_eq!(
            names("ReplicaSet"),
            [
                "Name",
                "Desired",
                "Current",
                "Ready",
                "Age",
                "Containers",
                "Images",
                "Selector"
            ]
        );
        assert_eq!(
            wide_names("ReplicaSet"),
            ["Containers", "Images", "Selector"]
        );
        assert_eq!(
            names("DaemonSet"),
            [
                "Name",
                "Desired",
                "Current",
                "Ready",
                "Up-to-date",
                "Available",
                "Node Selector",
                "Age",
                "Containers",
                "Images",
                "Selector"
            ]
        );
        assert_eq!(
            wide_names("DaemonSet"),
            ["Containers", "Images", "Selector"]
        );
        assert_eq!(
            names("EndpointSlice"),
            ["Name", "AddressType", "Ports", "Endpoints", "Age"]
        );
        assert_eq!(names("Lease"), ["Name", "Holder", "Age"]);
        for kind in [
            "Namespace",
            "Endpoints",
            "ConfigMap",
            "Secret",
            "ServiceAccount",
        ] {
            assert!(wide_names(kind).is_empty(), "{kind}");
        }
        assert!(wide_names("EndpointSlice").is_empty());
        assert!(wide_names("Lease").is_empty());
    }

    #[test]
    fn column_types_follow_upstream() {
        let types = |kind: &str| -> Vec<&str> {
            column_definitions(kind).iter().map(|c| c.type_).collect()
        };
        // Restarts became a string when it grew the "(5m ago)" suffix.
        assert_eq!(types("Pod")[3], "string");
        assert_eq!(types("ReplicaSet")[1..4], ["integer"; 3]);
        assert_eq!(types("DaemonSet")[1..6], ["integer"; 5]);
        assert_eq!(types("Deployment")[1..4], ["string"; 3]);
        assert_eq!(
            column_definitions("Pod")[4].description,
            CREATION_TIMESTAMP_DESCRIPTION
        );
        assert!(CREATION_TIMESTAMP_DESCRIPTION.starts_with("CreationTimestamp is a timestamp"));
    }

    #[test]
    fn unknown_kinds_get_name_and_age() {
        let columns = column_definitions("ClusterRole");
        assert_eq!(names("ClusterRole"), ["Name", "Age"]);
        assert_eq!(columns[1].description, CREATION_TIMESTAMP_DESCRIPTION);
        assert_eq!(columns[1].priority, 0);
        assert_eq!(
            cells(
                "ClusterRole",
                json!({"metadata": {"name": "admin", "creationTimestamp": ago(3 * 86400)}})
            ),
            [json!("admin"), json!("3d")]
        );
        assert_eq!(
            cells("ClusterRole", json!({"metadata": {"name": "admin"}})),
            [json!("admin"), json!("<unknown>")]
        );
    }

    #[test]
    fn missing_and_zero_timestamps_print_unknown() {
        let row = cells("Namespace", json!({"metadata": {"name": "a"}}));
        assert_eq!(row[2], "<unknown>");
        let row = cells(
            "Namespace",
            json!({"metadata": {"name": "a", "creationTimestamp": null}}),
        );
        assert_eq!(row[2], "<unknown>");
        let row = cells(
            "Namespace",
            json!({"metadata": {"name": "a", "creationTimestamp": "0001-01-01T00:00:00Z"}}),
        );
        assert_eq!(row[2], "<unknown>");
    }

    #[test]
    fn namespace_row() {
        assert_eq!(
            cells(
                "Namespace",
                json!({
                    "metadata": {"name": "kube-system", "creationTimestamp": ago(4 * 3600 + 5 * 60)},
                    "status": {"phase": "Active"},
                })
            ),
            [json!("kube-system"), json!("Active"), json!("4h5m")]
        );
    }

    #[test]
    fn running_pod_with_wide_cells() {
        let mut object = pod(json!({
            "phase": "Running",
            "podIP": "10.0.0.9",
            "podIPs": [{"ip": "10.0.0.9"}, {"ip": "fd00::9"}],
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "example.com/gate", "status": "True"},
            ],
            "containerStatuses": [
                {"name": "app", "ready": true, "restartCount": 0, "state": {"running": {"startedAt": ago(290)}}},
            ],
        }));
        object["spec"]["nodeName"] = json!("node-1");
        object["spec"]["readinessGates"] = json!([
            {"conditionType": "example.com/gate"},
            {"conditionType": "example.com/other"},
        ]);
        assert_eq!(
            cells("Pod", object),
            [
                json!("web"),
                json!("1/1"),
                json!("Running"),
                json!("0"),
                json!("5m"),
                json!("10.0.0.9"),
                json!("node-1"),
                json!("<none>"),
                json!("1/2"),
            ]
        );
    }

    #[test]
    fn pending_pod_prints_none_in_wide_cells() {
        let mut object = pod(json!({"phase": "Pending"}));
        object["status"]["nominatedNodeName"] = json!("node-2");
        let row = cells("Pod", object);
        assert_eq!(
            row[1..],
            [
                json!("0/1"),
                json!("Pending"),
                json!("0"),
                json!("5m"),
                json!("<none>"),
                json!("<none>"),
                json!("node-2"),
                json!("<none>"),
            ]
        );
    }

    #[test]
    fn pod_ip_falls_back_to_the_legacy_field() {
        let row = cells("Pod", pod(json!({"phase": "Running", "podIP": "10.0.0.7"})));
        assert_eq!(row[5], "10.0.0.7");
    }

    #[test]
    fn waiting_containers_give_their_reason() {
        let waiting = |reason: &str| {
            pod(json!({
                "phase": "Pending",
                "containerStatuses": [
                    {"name": "app", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": reason}}},
                ],
            }))
        };
        assert_eq!(
            pod_summary(waiting("ContainerCreating")),
            summary("0/1", "ContainerCreating", "0")
        );
        assert_eq!(
            pod_summary(waiting("ImagePullBackOff")),
            summary("0/1", "ImagePullBackOff", "0")
        );
    }

    #[test]
    fn crash_looping_pod_shows_when_it_last_restarted() {
        let object = pod(json!({
            "phase": "Running",
            "containerStatuses": [{
                "name": "app",
                "ready": false,
                "restartCount": 5,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": ago(5 * 60)}},
            }],
        }));
        assert_eq!(
            pod_summary(object),
            summary("0/1", "CrashLoopBackOff", "5 (5m ago)")
        );
    }

    #[test]
    fn restarts_without_a_known_time_print_just_the_count() {
        let object = pod(json!({
            "phase": "Running",
            "containerStatuses": [
                {"name": "app", "ready": true, "restartCount": 2, "state": {"running": {}}},
            ],
        }));
        assert_eq!(pod_summary(object), summary("1/1", "Running", "2"));
    }

    #[test]
    fn restarts_sum_over_containers_and_take_the_latest_time() {
        let mut object = pod(json!({
            "phase": "Running",
            "containerStatuses": [
                {"name": "app", "ready": true, "restartCount": 1, "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 1, "finishedAt": ago(3600)}}},
                {"name": "log", "ready": true, "restartCount": 2, "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 1, "finishedAt": ago(90)}}},
            ],
        }));
        object["spec"]["containers"] = json!([{"name": "app"}, {"name": "log"}]);
        assert_eq!(
            pod_summary(object),
            summary("2/2", "Running", "3 (90s ago)")
        );
    }

    #[test]
    fn completed_and_failed_pods() {
        let finished = |phase: &str, terminated: Value| {
            pod(json!({
                "phase": phase,
                "containerStatuses": [
                    {"name": "app", "ready": false, "restartCount": 0, "state": {"terminated": terminated}},
                ],
            }))
        };
        assert_eq!(
            pod_summary(finished(
                "Succeeded",
                json!({"exitCode": 0, "reason": "Completed"})
            )),
            summary("0/1", "Completed", "0")
        );
        assert_eq!(
            pod_summary(finished(
                "Failed",
                json!({"exitCode": 1, "reason": "Error"})
            )),
            summary("0/1", "Error", "0")
        );
        assert_eq!(
            pod_summary(finished("Failed", json!({"exitCode": 2}))),
            summary("0/1", "ExitCode:2", "0")
        );
        assert_eq!(
            pod_summary(finished("Failed", json!({"exitCode": 137, "signal": 9}))),
            summary("0/1", "Signal:9", "0")
        );
    }

    #[test]
    fn a_completed_container_next_to_a_running_one_keeps_the_pod_running() {
        let with_ready_condition = |ready: &str| {
            let mut object = pod(json!({
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": ready}],
                "containerStatuses": [
                    {"name": "app", "ready": true, "restartCount": 0, "state": {"running": {}}},
                    {"name": "job", "ready": false, "restartCount": 0,
                     "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
                ],
            }));
            object["spec"]["containers"] = json!([{"name": "app"}, {"name": "job"}]);
            object
        };
        assert_eq!(
            pod_summary(with_ready_condition("True")),
            summary("1/2", "Running", "0")
        );
        assert_eq!(
            pod_summary(with_ready_condition("False")),
            summary("1/2", "NotReady", "0")
        );
    }

    #[test]
    fn deleted_pods_are_terminating_unless_finished_or_lost() {
        let deleted = |status: Value| {
            let mut object = pod(status);
            object["metadata"]["deletionTimestamp"] = json!(ago(10));
            object
        };
        assert_eq!(
            pod_summary(deleted(json!({
                "phase": "Running",
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "state": {"running": {}}}],
            }))),
            summary("1/1", "Terminating", "0")
        );
        assert_eq!(
            pod_summary(deleted(json!({
                "phase": "Succeeded",
                "containerStatuses": [{"name": "app", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
            }))),
            summary("0/1", "Completed", "0")
        );
        assert_eq!(
            pod_summary(deleted(json!({"phase": "Running", "reason": "NodeLost"}))),
            summary("0/1", "Unknown", "0")
        );
    }

    #[test]
    fn pod_status_reason_and_scheduling_gates_override_the_phase() {
        assert_eq!(
            pod_summary(pod(json!({"phase": "Failed", "reason": "Evicted"}))),
            summary("0/1", "Evicted", "0")
        );
        assert_eq!(
            pod_summary(pod(json!({
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}],
            }))),
            summary("0/1", "SchedulingGated", "0")
        );
    }

    fn pod_with_init(init_statuses: Value) -> Value {
        let mut object = pod(json!({
            "phase": "Pending",
            "initContainerStatuses": init_statuses,
            "containerStatuses": [
                {"name": "app", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}},
            ],
        }));
        object["spec"]["initContainers"] = json!([{"name": "setup"}, {"name": "migrate"}]);
        object
    }

    #[test]
    fn init_containers_report_progress_and_failures() {
        let done = json!({"name": "setup", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}});
        assert_eq!(
            pod_summary(pod_with_init(json!([
                {"name": "setup", "ready": false, "restartCount": 0, "state": {"running": {}}},
                {"name": "migrate", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}},
            ]))),
            summary("0/1", "Init:0/2", "0")
        );
        assert_eq!(
            pod_summary(pod_with_init(json!([
                done,
                {"name": "migrate", "ready": false, "restartCount": 0, "state": {"running": {}}},
            ]))),
            summary("0/1", "Init:1/2", "0")
        );
        assert_eq!(
            pod_summary(pod_with_init(json!([
                done,
                {"name": "migrate", "ready": false, "restartCount": 3,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"exitCode": 1, "finishedAt": ago(60)}}},
            ]))),
            summary("0/1", "Init:CrashLoopBackOff", "3 (60s ago)")
        );
        assert_eq!(
            pod_summary(pod_with_init(json!([
                {"name": "setup", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 1, "reason": "Error"}}},
            ]))),
            summary("0/1", "Init:Error", "0")
        );
        assert_eq!(
            pod_summary(pod_with_init(json!([
                {"name": "setup", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 3}}},
            ]))),
            summary("0/1", "Init:ExitCode:3", "0")
        );
        assert_eq!(
            pod_summary(pod_with_init(json!([
                {"name": "setup", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 137, "signal": 9}}},
            ]))),
            summary("0/1", "Init:Signal:9", "0")
        );
    }

    #[test]
    fn finished_init_containers_leave_the_app_containers_to_speak() {
        let mut object = pod_with_init(json!([
            {"name": "setup", "ready": false, "restartCount": 4,
             "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
            {"name": "migrate", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
        ]));
        object["status"]["phase"] = json!("Running");
        object["status"]["containerStatuses"] = json!([
            {"name": "app", "ready": true, "restartCount": 0, "state": {"running": {}}},
        ]);
        assert_eq!(pod_summary(object), summary("1/1", "Running", "0"));
    }

    #[test]
    fn sidecars_count_as_containers() {
        let mut object = pod(json!({
            "phase": "Running",
            "conditions": [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"}],
            "initContainerStatuses": [
                {"name": "proxy", "ready": true, "started": true, "restartCount": 1,
                 "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 1, "finishedAt": ago(120)}}},
            ],
            "containerStatuses": [
                {"name": "app", "ready": true, "restartCount": 0, "state": {"running": {}}},
            ],
        }));
        object["spec"]["initContainers"] = json!([{"name": "proxy", "restartPolicy": "Always"}]);
        assert_eq!(pod_summary(object), summary("2/2", "Running", "1 (2m ago)"));
    }

    #[test]
    fn a_sidecar_that_has_not_started_holds_initialization() {
        let mut object = pod(json!({
            "phase": "Pending",
            "initContainerStatuses": [
                {"name": "proxy", "ready": false, "started": false, "restartCount": 0,
                 "state": {"running": {}}},
            ],
        }));
        object["spec"]["initContainers"] = json!([{"name": "proxy", "restartPolicy": "Always"}]);
        assert_eq!(pod_summary(object), summary("0/2", "Init:0/1", "0"));
    }

    fn service(spec: Value, status: Value) -> Value {
        json!({
            "metadata": {"name": "web", "creationTimestamp": ago(45)},
            "spec": spec,
            "status": status,
        })
    }

    #[test]
    fn cluster_ip_service_row() {
        assert_eq!(
            cells(
                "Service",
                service(
                    json!({
                        "type": "ClusterIP",
                        "clusterIP": "10.96.0.10",
                        "clusterIPs": ["10.96.0.10"],
                        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
                        "selector": {"k8s-app": "kube-dns", "app": "dns"},
                    }),
                    json!({})
                )
            ),
            [
                json!("web"),
                json!("ClusterIP"),
                json!("10.96.0.10"),
                json!("<none>"),
                json!("53/UDP,53/TCP"),
                json!("45s"),
                json!("app=dns,k8s-app=kube-dns"),
            ]
        );
    }

    #[test]
    fn service_external_ips_and_ports_by_type() {
        let row = cells(
            "Service",
            service(
                json!({"type": "NodePort", "clusterIPs": ["10.96.1.1"], "externalIPs": ["1.2.3.4"],
                       "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}),
                json!({}),
            ),
        );
        assert_eq!(row[3..5], [json!("1.2.3.4"), json!("80:30080/TCP")]);
        assert_eq!(row[6], "<none>");

        let row = cells(
            "Service",
            service(
                json!({"type": "LoadBalancer", "clusterIPs": ["10.96.1.2"], "ports": [{"port": 443}]}),
                json!({}),
            ),
        );
        assert_eq!(row[3..5], [json!("<pending>"), json!("443/TCP")]);

        let row = cells(
            "Service",
            service(
                json!({"type": "LoadBalancer", "clusterIPs": ["10.96.1.2"], "externalIPs": ["9.9.9.9"]}),
                json!({"loadBalancer": {"ingress": [
                    {"ip": "203.0.113.7"}, {"hostname": "a-very-long-load-balancer.example.com"}, {"ip": "203.0.113.7"},
                ]}}),
            ),
        );
        assert_eq!(
            row[3..5],
            [
                json!("203.0.113.7,a-very-long-load-balancer.example.com,9.9.9.9"),
                json!("<none>")
            ]
        );

        let row = cells(
            "Service",
            service(
                json!({"type": "ExternalName", "externalName": "db.example.com"}),
                json!({}),
            ),
        );
        assert_eq!(row[2..4], [json!("<none>"), json!("db.example.com")]);

        let row = cells(
            "Service",
            service(
                json!({"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"]}),
                json!({}),
            ),
        );
        assert_eq!(row[2], "None");

        let row = cells(
            "Service",
            service(
                json!({"type": "ClusterIP", "clusterIP": "10.96.3.3"}),
                json!({}),
            ),
        );
        assert_eq!(row[2], "10.96.3.3");
    }

    fn endpoints(subsets: Value) -> Value {
        json!({"metadata": {"name": "web", "creationTimestamp": ago(7200)}, "subsets": subsets})
    }

    #[test]
    fn endpoints_rows() {
        assert_eq!(
            cells("Endpoints", endpoints(json!([]))),
            // Ages under three hours are still counted in minutes.
            [json!("web"), json!("<none>"), json!("120m")]
        );
        assert_eq!(
            cells("Endpoints", json!({"metadata": {"name": "web"}}))[1],
            "<none>"
        );
        let row = cells(
            "Endpoints",
            endpoints(json!([{
                "addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
                "ports": [{"port": 8080}],
            }])),
        );
        assert_eq!(row[1], "10.0.0.1:8080,10.0.0.2:8080");

        let row = cells(
            "Endpoints",
            endpoints(json!([
                {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}, {"port": 443}]},
                {"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 80}]},
            ])),
        );
        assert_eq!(row[1], "10.0.0.1:80,10.0.0.2:80,10.0.0.1:443 + 2 more...");

        let row = cells(
            "Endpoints",
            endpoints(json!([{"addresses": [{"ip": "fd00::1"}, {"ip": "10.0.0.5"}]}])),
        );
        assert_eq!(row[1], "fd00::1,10.0.0.5");

        let row = cells(
            "Endpoints",
            endpoints(json!([{"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 53}]}])),
        );
        assert_eq!(row[1], "[fd00::1]:53");

        // Only not-ready addresses: upstream prints nothing rather than <none>.
        let row = cells(
            "Endpoints",
            endpoints(
                json!([{"notReadyAddresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]),
            ),
        );
        assert_eq!(row[1], "");
    }

    fn node(conditions: Value) -> Value {
        json!({
            "metadata": {"name": "node-1", "creationTimestamp": ago(10 * 86400)},
            "spec": {},
            "status": {
                "conditions": conditions,
                "addresses": [
                    {"type": "Hostname", "address": "node-1"},
                    {"type": "InternalIP", "address": "192.168.1.10"},
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.34.0",
                    "osImage": "Debian GNU/Linux 12 (bookworm)",
                    "kernelVersion": "6.1.0-18-amd64",
                    "containerRuntimeVersion": "containerd://2.0.0",
                },
            },
        })
    }

    #[test]
    fn ready_node_row_with_wide_cells() {
        let mut object = node(json!([
            {"type": "MemoryPressure", "status": "False"},
            {"type": "Ready", "status": "True"},
        ]));
        object["metadata"]["labels"] = json!({
            "node-role.kubernetes.io/control-plane": "",
            "node-role.kubernetes.io/": "",
            "kubernetes.io/role": "master",
            "kubernetes.io/hostname": "node-1",
        });
        assert_eq!(
            cells("Node", object),
            [
                json!("node-1"),
                json!("Ready"),
                json!("control-plane,master"),
                json!("10d"),
                json!("v1.34.0"),
                json!("192.168.1.10"),
                json!("<none>"),
                json!("Debian GNU/Linux 12 (bookworm)"),
                json!("6.1.0-18-amd64"),
                json!("containerd://2.0.0"),
            ]
        );
    }

    #[test]
    fn node_status_variants() {
        let status = |object: Value| cells("Node", object)[1].clone();
        assert_eq!(
            status(node(json!([{"type": "Ready", "status": "False"}]))),
            "NotReady"
        );
        assert_eq!(
            status(node(json!([{"type": "Ready", "status": "Unknown"}]))),
            "NotReady"
        );
        assert_eq!(status(node(json!([]))), "Unknown");
        let mut cordoned = node(json!([{"type": "Ready", "status": "True"}]));
        cordoned["spec"]["unschedulable"] = json!(true);
        assert_eq!(status(cordoned), "Ready,SchedulingDisabled");

        let row = cells("Node", json!({"metadata": {"name": "bare"}}));
        assert_eq!(
            row[1..],
            [
                json!("Unknown"),
                json!("<none>"),
                json!("<unknown>"),
                json!(""),
                json!("<none>"),
                json!("<none>"),
                json!("<unknown>"),
                json!("<unknown>"),
                json!("<unknown>"),
            ]
        );
    }

    #[test]
    fn legacy_event_row() {
        let event = json!({
            "metadata": {"name": "web.17a8", "creationTimestamp": ago(600)},
            "involvedObject": {"kind": "Pod", "name": "web", "fieldPath": "spec.containers{app}"},
            "reason": "Pulled",
            "message": "Successfully pulled image \"nginx\"\n",
            "source": {"component": "kubelet", "host": "node-1"},
            "firstTimestamp": ago(600),
            "lastTimestamp": ago(30),
            "count": 4,
            "type": "Normal",
        });
        assert_eq!(
            cells("Event", event),
            [
                json!("30s"),
                json!("Normal"),
                json!("Pulled"),
                json!("pod/web"),
                json!("spec.containers{app}"),
                json!("kubelet, node-1"),
                json!("Successfully pulled image \"nginx\""),
                json!("10m"),
                json!(4),
                json!("web.17a8"),
            ]
        );
    }

    #[test]
    fn new_api_events_use_event_time_series_and_reporting_fields() {
        let singleton = json!({
            "metadata": {"name": "e1"},
            "involvedObject": {"kind": "Node"},
            "eventTime": "2026-11-23T07:58:00.000000Z",
            "reportingComponent": "skiff-scheduler",
            "type": "Warning",
            "reason": "FailedScheduling",
            "message": "0/1 nodes are available",
        });
        let row = cells("Event", singleton.clone());
        assert_eq!(row[0], "2m");
        assert_eq!(row[3], "node");
        assert_eq!(row[5], "skiff-scheduler");
        assert_eq!(row[7], "2m");
        assert_eq!(row[8], 1);

        let mut repeated = singleton;
        repeated["series"] = json!({"count": 7, "lastObservedTime": "2026-11-23T07:59:50.000000Z"});
        repeated["reportingInstance"] = json!("control-1");
        let row = cells("Event", repeated);
        assert_eq!(row[0], "10s");
        assert_eq!(row[5], "skiff-scheduler, control-1");
        assert_eq!(row[7], "2m");
        assert_eq!(row[8], 7);

        let row = cells("Event", json!({"metadata": {"name": "e2"}}));
        assert_eq!(row[0], "<unknown>");
        assert_eq!(row[7], "<unknown>");
    }

    #[test]
    fn config_map_secret_and_service_account_rows() {
        assert_eq!(
            cells(
                "ConfigMap",
                json!({
                    "metadata": {"name": "kube-root-ca.crt", "creationTimestamp": ago(86400)},
                    "data": {"ca.crt": "..."},
                    "binaryData": {"blob": "AAEC", "more": "AQID"},
                })
            ),
            [json!("kube-root-ca.crt"), json!(3), json!("24h")]
        );
        assert_eq!(
            cells(
                "Secret",
                json!({
                    "metadata": {"name": "tls", "creationTimestamp": ago(59)},
                    "type": "kubernetes.io/tls",
                    "data": {"tls.crt": "", "tls.key": ""},
                })
            ),
            [
                json!("tls"),
                json!("kubernetes.io/tls"),
                json!(2),
                json!("59s")
            ]
        );
        assert_eq!(
            cells(
                "ServiceAccount",
                json!({
                    "metadata": {"name": "default", "creationTimestamp": ago(400 * 86400)},
                    "secrets": [{"name": "default-token"}],
                })
            ),
            [json!("default"), json!(1), json!("400d")]
        );
        assert_eq!(
            cells("ServiceAccount", json!({"metadata": {"name": "bare"}}))[1],
            0
        );
    }

    fn workload(spec: Value, status: Value) -> Value {
        json!({
            "metadata": {"name": "web", "creationTimestamp": ago(3 * 3600 + 120)},
            "spec": spec,
            "status": status,
        })
    }

    fn pod_template() -> Value {
        json!({"spec": {"containers": [
            {"name": "app", "image": "nginx:1.27"},
            {"name": "log", "image": "busybox"},
        ]}})
    }

    #[test]
    fn deployment_row() {
        let object = workload(
            json!({
                "replicas": 3,
                "selector": {
                    "matchLabels": {"app": "web"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "edge"]}],
                },
                "template": pod_template(),
            }),
            json!({"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}),
        );
        assert_eq!(
            cells("Deployment", object),
            [
                json!("web"),
                json!("2/3"),
                json!(3),
                json!(2),
                json!("3h2m"),
                json!("app,log"),
                json!("nginx:1.27,busybox"),
                json!("app=web,tier in (edge,front)"),
            ]
        );
        let row = cells("Deployment", workload(json!({"replicas": 0}), json!({})));
        assert_eq!(
            row[1..],
            [
                json!("0/0"),
                json!(0),
                json!(0),
                json!("3h2m"),
                json!(""),
                json!(""),
                json!(""),
            ]
        );
        let bad_selector = workload(
            json!({"selector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}),
            json!({}),
        );
        assert_eq!(cells("Deployment", bad_selector)[7], "<invalid>");
    }

    #[test]
    fn replica_set_row() {
        let object = workload(
            json!({"replicas": 2, "selector": {"matchLabels": {"app": "web", "pod-template-hash": "5d9c"}},
                   "template": pod_template()}),
            json!({"replicas": 2, "readyReplicas": 1}),
        );
        assert_eq!(
            cells("ReplicaSet", object),
            [
                json!("web"),
                json!(2),
                json!(2),
                json!(1),
                json!("3h2m"),
                json!("app,log"),
                json!("nginx:1.27,busybox"),
                json!("app=web,pod-template-hash=5d9c"),
            ]
        );
        let row = cells("ReplicaSet", workload(json!({}), json!({})));
        assert_eq!(row[1], 1);
        assert_eq!(row[7], "<none>");
    }

    #[test]
    fn job_columns_and_rows_follow_print_job() {
        assert_eq!(
            names("Job"),
            [
                "Name",
                "Status",
                "Completions",
                "Duration",
                "Age",
                "Containers",
                "Images",
                "Selector"
            ]
        );
        assert_eq!(wide_names("Job"), ["Containers", "Images", "Selector"]);
        let complete = workload(
            json!({
                "completions": 3,
                "parallelism": 2,
                "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "1234"}},
                "template": pod_template(),
            }),
            json!({
                "succeeded": 3,
                "startTime": ago(100),
                "completionTime": ago(40),
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True"},
                    {"type": "Complete", "status": "True"},
                ],
            }),
        );
        assert_eq!(
            cells("Job", complete),
            [
                json!("web"),
                json!("Complete"),
                json!("3/3"),
                json!("60s"),
                json!("3h2m"),
                json!("app,log"),
                json!("nginx:1.27,busybox"),
                json!("batch.kubernetes.io/controller-uid=1234"),
            ]
        );
        let running = workload(
            json!({"parallelism": 4}),
            json!({"succeeded": 1, "startTime": ago(30)}),
        );
        assert_eq!(
            cells("Job", running)[1..4],
            [json!("Running"), json!("1/1 of 4"), json!("30s")]
        );
        let failed = workload(
            json!({"completions": 1}),
            json!({"conditions": [
                {"type": "FailureTarget", "status": "True"},
                {"type": "Failed", "status": "True"},
            ]}),
        );
        assert_eq!(
            cells("Job", failed)[1..4],
            [json!("Failed"), json!("0/1"), json!("")]
        );
        let suspended = workload(
            json!({"completions": 2, "parallelism": 1}),
            json!({"conditions": [{"type": "Suspended", "status": "True"}]}),
        );
        assert_eq!(cells("Job", suspended)[1], json!("Suspended"));
        let resumed = workload(
            json!({}),
            json!({"conditions": [{"type": "Suspended", "status": "False"}]}),
        );
        assert_eq!(
            cells("Job", resumed)[1..3],
            [json!("Running"), json!("0/1")]
        );
    }

    #[test]
    fn daemon_set_row() {
        let mut template = pod_template();
        template["spec"]["nodeSelector"] = json!({"kubernetes.io/os": "linux"});
        let object = workload(
            json!({"selector": {"matchExpressions": [
                {"key": "k8s-app", "operator": "Exists"},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "env", "operator": "NotIn", "values": ["test"]},
            ]}, "template": template}),
            json!({"desiredNumberScheduled": 3, "currentNumberScheduled": 3, "numberReady": 2,
                   "updatedNumberScheduled": 1, "numberAvailable": 2}),
        );
        assert_eq!(
            cells("DaemonSet", object),
            [
                json!("web"),
                json!(3),
                json!(3),
                json!(2),
                json!(1),
                json!(2),
                json!("kubernetes.io/os=linux"),
                json!("3h2m"),
                json!("app,log"),
                json!("nginx:1.27,busybox"),
                json!("!canary,env notin (test),k8s-app"),
            ]
        );
        let row = cells("DaemonSet", workload(json!({"selector": {}}), json!({})));
        assert_eq!(row[6], "<none>");
        assert_eq!(row[10], "<none>");
        let row = cells(
            "DaemonSet",
            workload(
                json!({"selector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}}),
                json!({}),
            ),
        );
        assert_eq!(row[10], "<error>");
    }

    #[test]
    fn endpoint_slice_rows() {
        let object = json!({
            "metadata": {"name": "web-abc12", "creationTimestamp": ago(600)},
            "addressType": "IPv4",
            "ports": [{"port": 80}, {"port": 443}, {"name": "metrics", "port": null}, {"port": 9090}],
            "endpoints": [
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
            ],
        });
        assert_eq!(
            cells("EndpointSlice", object),
            [
                json!("web-abc12"),
                json!("IPv4"),
                json!("80,443,metrics + 1 more..."),
                json!("10.0.0.1,10.0.0.2"),
                json!("10m"),
            ]
        );
        let object = json!({
            "metadata": {"name": "empty"},
            "addressType": "IPv6",
            "ports": [{}],
            "endpoints": [],
        });
        let row = cells("EndpointSlice", object);
        assert_eq!(row[2..4], [json!("*"), json!("<unset>")]);
        let row = cells("EndpointSlice", json!({"metadata": {"name": "bare"}}));
        assert_eq!(row[2..4], [json!("<unset>"), json!("<unset>")]);
        let many: Vec<Value> = (1..=5)
            .map(|i| json!({"addresses": [format!("10.0.1.{i}")]}))
            .collect();
        let row = cells(
            "EndpointSlice",
            json!({"metadata": {"name": "many"}, "endpoints": many}),
        );
        assert_eq!(row[3], "10.0.1.1,10.0.1.2,10.0.1.3 + 2 more...");
    }

    #[test]
    fn lease_row() {
        assert_eq!(
            cells(
                "Lease",
                json!({
                    "metadata": {"name": "kube-scheduler", "creationTimestamp": ago(90)},
                    "spec": {"holderIdentity": "control-1_1234"},
                })
            ),
            [
                json!("kube-scheduler"),
                json!("control-1_1234"),
                json!("90s")
            ]
        );
        assert_eq!(
            cells("Lease", json!({"metadata": {"name": "free"}, "spec": {}}))[1],
            ""
        );
    }

    #[test]
    fn labels_sort_by_key_not_by_pair() {
        assert_eq!(
            format_labels(Some(&json!({"a.b": "y", "a": "x", "b": ""}))),
            "a=x,a.b=y,b="
        );
        assert_eq!(format_labels(Some(&json!({}))), "<none>");
        assert_eq!(format_labels(None), "<none>");
        assert_eq!(
            label_selector_string(Some(&json!({"matchLabels": {"a.b": "y", "a": "x"}}))),
            Ok("a=x,a.b=y".to_string())
        );
        assert_eq!(label_selector_string(Some(&Value::Null)), Ok(String::new()));
    }
}
