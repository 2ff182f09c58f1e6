//! Kubernetes' defaulting: the fields kube-apiserver fills in on create and update, before
//! validation, so that a stored object reads back as it would from a real cluster.
//!
//! The rules follow `pkg/apis/core/v1/defaults.go`, `pkg/apis/apps/v1/defaults.go`, the
//! `+default` markers of `k8s.io/api`, and the few admission plugins and registry strategies
//! whose effects every `kubectl get -o yaml` shows (pod priority and default tolerations,
//! Service IP families, Namespace finalizers).

use serde_json::{Map, Value, json};

/// Fills in the defaults of an object of `kind`. Unknown kinds are left as they are.
pub fn apply_defaults(kind: &str, object: &mut Value) {
    match kind {
        "Namespace" => default_namespace(object),
        "Pod" => default_pod(object),
        "Service" => default_service(object),
        "Endpoints" => default_endpoints(object),
        "Node" => default_node(object),
        "Secret" => set_if_zero(object, "type", json!("Opaque")),
        "Deployment" => default_deployment(object),
        "ReplicaSet" => default_replica_set(object),
        "DaemonSet" => default_daemon_set(object),
        "Job" => default_job(object),
        "EndpointSlice" => default_endpoint_slice(object),
        _ => {}
    }
}

/// Sets `field` unless it holds a value, as Go does for a pointer field left nil.
fn set_if_missing(object: &mut Value, field: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        let current = map.entry(field.to_string()).or_insert(Value::Null);
        if current.is_null() {
            *current = value;
        }
    }
}

/// Sets `field` when it is missing or holds its type's zero value, as Go does for a plain
/// string or integer field, where `""` and `0` cannot be told apart from "not given".
fn set_if_zero(object: &mut Value, field: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        let current = map.entry(field.to_string()).or_insert(Value::Null);
        let is_zero = match current {
            Value::Null => true,
            Value::String(text) => text.is_empty(),
            Value::Number(number) => number.as_f64() == Some(0.0),
            _ => false,
        };
        if is_zero {
            *current = value;
        }
    }
}

/// The object under `field`, created empty when missing so that defaults can go inside it.
fn child_object<'a>(object: &'a mut Value, field: &str) -> &'a mut Value {
    if !object.is_object() {
        *object = json!({});
    }
    let map = object.as_object_mut().expect("made an object above");
    let child = map.entry(field.to_string()).or_insert_with(|| json!({}));
    if !child.is_object() {
        *child = json!({});
    }
    child
}

/// The elements of the array under `field`, or nothing when there is none.
fn elements_mut<'a>(object: &'a mut Value, field: &str) -> impl Iterator<Item = &'a mut Value> {
    object
        .get_mut(field)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

fn default_namespace(namespace: &mut Value) {
    // kube-apiserver labels every named namespace with its own name so that namespace
    // selectors can pick namespaces by name.
    if let Some(name) = namespace["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
    {
        let name = name.to_string();
        let labels = child_object(child_object(namespace, "metadata"), "labels");
        labels["kubernetes.io/metadata.name"] = json!(name);
    }
    // The namespace strategy adds the `kubernetes` finalizer on create and keeps it over
    // later writes; once deletion has begun the namespace controller removes it, and
    // adding it back would keep the namespace from ever going away.
    if namespace["metadata"]["deletionTimestamp"].is_null() {
        let spec = child_object(namespace, "spec");
        let finalizers = spec
            .as_object_mut()
            .expect("child_object returns an object")
            .entry("finalizers")
            .or_insert_with(|| json!([]));
        if let Some(list) = finalizers.as_array_mut()
            && !list.iter().any(|f| f == "kubernetes")
        {
            list.push(json!("kubernetes"));
        }
        set_if_zero(child_object(namespace, "status"), "phase", json!("Active"));
    }
}

/// Defaults shared by a Pod's spec and the pod templates of Deployments, ReplicaSets and
/// DaemonSets (`SetDefaults_PodSpec` and the defaults of everything a pod spec contains).
fn default_pod_spec(spec: &mut Value) {
    set_if_zero(spec, "dnsPolicy", json!("ClusterFirst"));
    set_if_zero(spec, "restartPolicy", json!("Always"));
    set_if_missing(spec, "securityContext", json!({}));
    set_if_missing(spec, "terminationGracePeriodSeconds", json!(30));
    set_if_zero(spec, "schedulerName", json!("default-scheduler"));
    // The v1 conversion keeps the deprecated `serviceAccount` in step with
    // `serviceAccountName`, taking the old field only when the new one is empty.
    let account_name = spec["serviceAccountName"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let deprecated_name = spec["serviceAccount"].as_str().unwrap_or("").to_string();
    if account_name.is_empty() && !deprecated_name.is_empty() {
        spec["serviceAccountName"] = json!(deprecated_name);
    } else if !account_name.is_empty() {
        spec["serviceAccount"] = json!(account_name);
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for container in elements_mut(spec, list) {
            default_container(container);
        }
    }
    for volume in elements_mut(spec, "volumes") {
        default_volume(volume);
    }
}

fn default_container(container: &mut Value) {
    let image = container["image"].as_str().unwrap_or("");
    let pull_policy = if image_tag(image) == Some("latest") {
        "Always"
    } else {
        "IfNotPresent"
    };
    set_if_zero(container, "imagePullPolicy", json!(pull_policy));
    set_if_zero(
        container,
        "terminationMessagePath",
        json!("/dev/termination-log"),
    );
    set_if_zero(container, "terminationMessagePolicy", json!("File"));
    // Go always writes the resource requirements struct, so an empty one reads back as `{}`.
    set_if_missing(container, "resources", json!({}));
    for port in elements_mut(container, "ports") {
        set_if_zero(port, "protocol", json!("TCP"));
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(probe) = container.get_mut(probe).filter(|p| p.is_object()) {
            set_if_zero(probe, "timeoutSeconds", json!(1));
            set_if_zero(probe, "periodSeconds", json!(10));
            set_if_zero(probe, "successThreshold", json!(1));
            set_if_zero(probe, "failureThreshold", json!(3));
            default_handler(probe);
        }
    }
    if let Some(lifecycle) = container.get_mut("lifecycle").filter(|l| l.is_object()) {
        for hook in ["postStart", "preStop"] {
            if let Some(handler) = lifecycle.get_mut(hook).filter(|h| h.is_object()) {
                default_handler(handler);
            }
        }
    }
    for variable in elements_mut(container, "env") {
        if let Some(field_ref) = variable
            .get_mut("valueFrom")
            .and_then(|from| from.get_mut("fieldRef"))
            .filter(|r| r.is_object())
        {
            set_if_zero(field_ref, "apiVersion", json!("v1"));
        }
    }
}

/// Defaults of the actions a probe or lifecycle hook can take.
fn default_handler(handler: &mut Value) {
    if let Some(http_get) = handler.get_mut("httpGet").filter(|h| h.is_object()) {
        set_if_zero(http_get, "path", json!("/"));
        set_if_zero(http_get, "scheme", json!("HTTP"));
    }
    if let Some(grpc) = handler.get_mut("grpc").filter(|g| g.is_object()) {
        set_if_missing(grpc, "service", json!(""));
    }
}

/// The tag an image reference names, as the kubelet's image parser reads it: `latest` when
/// neither a tag nor a digest is given, nothing when only a digest is.
fn image_tag(image: &str) -> Option<&str> {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    // A colon before the last slash belongs to a registry host's port, not to a tag.
    let last_component_start = name.rfind('/').map_or(0, |slash| slash + 1);
    match name[last_component_start..].split_once(':') {
        Some((_, tag)) => Some(tag),
        None if digest.is_some() => None,
        None => Some("latest"),
    }
}

/// Every kind of volume source a pod volume can name; a volume naming none is an emptyDir.
const VOLUME_SOURCES: &[&str] = &[
    "emptyDir",
    "hostPath",
    "gitRepo",
    "gcePersistentDisk",
    "awsElasticBlockStore",
    "secret",
    "nfs",
    "iscsi",
    "glusterfs",
    "flocker",
    "persistentVolumeClaim",
    "rbd",
    "cinder",
    "cephfs",
    "quobyte",
    "downwardAPI",
    "fc",
    "flexVolume",
    "configMap",
    "azureFile",
    "vsphereVolume",
    "photonPersistentDisk",
    "portworxVolume",
    "azureDisk",
    "storageos",
    "projected",
    "scaleIO",
    "csi",
    "ephemeral",
    "image",
];

/// The mode of files in secret, configMap, downwardAPI and projected volumes: 0644.
const DEFAULT_FILE_MODE: i64 = 0o644;

fn default_volume(volume: &mut Value) {
    if !VOLUME_SOURCES
        .iter()
        .any(|source| !volume[*source].is_null())
    {
        volume["emptyDir"] = json!({});
    }
    for source in ["secret", "configMap", "downwardAPI", "projected"] {
        if let Some(source) = volume.get_mut(source).filter(|s| s.is_object()) {
            set_if_missing(source, "defaultMode", json!(DEFAULT_FILE_MODE));
        }
    }
    if let Some(host_path) = volume.get_mut("hostPath").filter(|h| h.is_object()) {
        set_if_missing(host_path, "type", json!(""));
    }
    if let Some(downward_api) = volume.get_mut("downwardAPI") {
        default_downward_api_items(downward_api);
    }
    if let Some(projected) = volume.get_mut("projected") {
        for source in elements_mut(projected, "sources") {
            if let Some(token) = source
                .get_mut("serviceAccountToken")
                .filter(|t| t.is_object())
            {
                set_if_missing(token, "expirationSeconds", json!(3600));
            }
            if let Some(downward_api) = source.get_mut("downwardAPI") {
                default_downward_api_items(downward_api);
            }
        }
    }
}

fn default_downward_api_items(downward_api: &mut Value) {
    for item in elements_mut(downward_api, "items") {
        if let Some(field_ref) = item.get_mut("fieldRef").filter(|r| r.is_object()) {
            set_if_zero(field_ref, "apiVersion", json!("v1"));
        }
    }
}

/// The pod taints the DefaultTolerationSeconds admission plugin tolerates for five
/// minutes, so that a pod is evicted from a failed node only after that grace.
const DEFAULT_TOLERATED_TAINTS: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// The priorities of the built-in PriorityClasses; any other class is left to admission.
fn priority_of_class(class: &str) -> Option<i64> {
    match class {
        "" => Some(0),
        "system-cluster-critical" => Some(2_000_000_000),
        "system-node-critical" => Some(2_000_001_000),
        _ => None,
    }
}

fn default_pod(pod: &mut Value) {
    let spec = child_object(pod, "spec");
    default_pod_spec(spec);
    // What follows applies to Pods only, not to pod templates (`SetDefaults_Pod` and the
    // Priority and DefaultTolerationSeconds admission plugins).
    set_if_missing(spec, "enableServiceLinks", json!(true));
    for list in ["containers", "initContainers"] {
        for container in elements_mut(spec, list) {
            default_requests_to_limits(container);
        }
    }
    if spec["hostNetwork"] == json!(true) {
        for list in ["containers", "initContainers"] {
            for container in elements_mut(spec, list) {
                for port in elements_mut(container, "ports") {
                    let container_port = port["containerPort"].clone();
                    if container_port.is_number() {
                        set_if_zero(port, "hostPort", container_port);
                    }
                }
            }
        }
    }
    let class = spec["priorityClassName"].as_str().unwrap_or("");
    if let Some(priority) = priority_of_class(class) {
        set_if_missing(spec, "priority", json!(priority));
        set_if_zero(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    }
    default_tolerations(spec);
}

/// A container that gives limits but no requests for a resource requests its limit.
fn default_requests_to_limits(container: &mut Value) {
    let Some(limits) = container["resources"]["limits"].as_object().cloned() else {
        return;
    };
    let requests = child_object(child_object(container, "resources"), "requests");
    for (resource, limit) in limits {
        set_if_missing(requests, &resource, limit);
    }
}

fn default_tolerations(spec: &mut Value) {
    let tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    let tolerates = |taint: &str| {
        tolerations.iter().any(|toleration| {
            let key = toleration["key"].as_str().unwrap_or("");
            let effect = toleration["effect"].as_str().unwrap_or("");
            (key == taint || key.is_empty()) && (effect == "NoExecute" || effect.is_empty())
        })
    };
    let missing: Vec<&str> = DEFAULT_TOLERATED_TAINTS
        .into_iter()
        .filter(|taint| !tolerates(taint))
        .collect();
    if missing.is_empty() {
        return;
    }
    let mut all = tolerations.clone();
    for taint in missing {
        all.push(json!({
            "key": taint,
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 300,
        }));
    }
    spec["tolerations"] = Value::Array(all);
}

/// Whether traffic can reach the Service from outside the cluster, which is when an external
/// traffic policy applies (`service.ExternallyAccessible`).
fn externally_accessible(spec: &Value) -> bool {
    match spec["type"].as_str().unwrap_or("") {
        "LoadBalancer" | "NodePort" => true,
        "ClusterIP" => spec["externalIPs"]
            .as_array()
            .is_some_and(|ips| !ips.is_empty()),
        _ => false,
    }
}

fn default_service(service: &mut Value) {
    let spec = child_object(service, "spec");
    set_if_zero(spec, "sessionAffinity", json!("None"));
    match spec["sessionAffinity"].as_str() {
        Some("None") => {
            if let Some(map) = spec.as_object_mut() {
                map.remove("sessionAffinityConfig");
            }
        }
        Some("ClientIP")
            if spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"].is_null() =>
        {
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 10800}});
        }
        _ => {}
    }
    set_if_zero(spec, "type", json!("ClusterIP"));
    for port in elements_mut(spec, "ports") {
        set_if_zero(port, "protocol", json!("TCP"));
        let port_number = port["port"].clone();
        if port_number.is_number() {
            set_if_zero(port, "targetPort", port_number);
        }
    }
    let service_type = spec["type"].as_str().unwrap_or("").to_string();
    if externally_accessible(spec) {
        set_if_zero(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if matches!(
        service_type.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer"
    ) {
        set_if_missing(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    if service_type == "LoadBalancer" {
        set_if_missing(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if service_type != "ExternalName" {
        default_service_ip_fields(spec);
    }
}

/// The cluster IP and IP family fields, as the Service strategy and allocator settle them
/// before validation on a single-stack IPv4 cluster.
fn default_service_ip_fields(spec: &mut Value) {
    // A client that sets only the singular clusterIP gets the plural list derived from it.
    let cluster_ip = spec["clusterIP"].as_str().unwrap_or("").to_string();
    let has_cluster_ips = spec["clusterIPs"]
        .as_array()
        .is_some_and(|ips| !ips.is_empty());
    if !cluster_ip.is_empty() && !has_cluster_ips {
        spec["clusterIPs"] = json!([cluster_ip]);
    }
    // A headless Service without a selector is filled by hand and may list addresses of
    // both families, so it defaults to dual stack even on a single-stack cluster.
    let headless_without_selector =
        cluster_ip == "None" && spec["selector"].as_object().is_none_or(Map::is_empty);
    let policy = if headless_without_selector {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    set_if_missing(spec, "ipFamilyPolicy", json!(policy));
    let has_families = spec["ipFamilies"].as_array().is_some_and(|f| !f.is_empty());
    if !has_families {
        let mut families: Vec<Value> = spec["clusterIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .take_while(|ip| *ip != "None")
            .map(|ip| json!(if ip.contains(':') { "IPv6" } else { "IPv4" }))
            .collect();
        if families.is_empty() {
            families.push(json!("IPv4"));
        }
        spec["ipFamilies"] = Value::Array(families);
    }
    if headless_without_selector
        && spec["ipFamilyPolicy"] != "SingleStack"
        && let Some(families) = spec["ipFamilies"].as_array_mut()
        && families.len() == 1
    {
        let other = if families[0] == "IPv6" {
            "IPv4"
        } else {
            "IPv6"
        };
        families.push(json!(other));
    }
}

fn default_endpoints(endpoints: &mut Value) {
    for subset in elements_mut(endpoints, "subsets") {
        for port in elements_mut(subset, "ports") {
            set_if_zero(port, "protocol", json!("TCP"));
        }
    }
}

fn default_endpoint_slice(slice: &mut Value) {
    for port in elements_mut(slice, "ports") {
        set_if_missing(port, "name", json!(""));
        set_if_missing(port, "protocol", json!("TCP"));
    }
}

fn default_node(node: &mut Value) {
    // A node that reports capacity but not what it can allocate can allocate it all.
    let capacity = node["status"]["capacity"].clone();
    if capacity.is_object() {
        set_if_missing(child_object(node, "status"), "allocatable", capacity);
    }
}

/// Defaults of a workload's pod template, shared by all workload kinds.
fn default_pod_template(spec: &mut Value) {
    let template = child_object(spec, "template");
    default_pod_spec(child_object(template, "spec"));
}

fn default_deployment(deployment: &mut Value) {
    let spec = child_object(deployment, "spec");
    set_if_missing(spec, "replicas", json!(1));
    let strategy = child_object(spec, "strategy");
    set_if_zero(strategy, "type", json!("RollingUpdate"));
    if strategy["type"] == "RollingUpdate" {
        let rolling_update = child_object(strategy, "rollingUpdate");
        set_if_missing(rolling_update, "maxUnavailable", json!("25%"));
        set_if_missing(rolling_update, "maxSurge", json!("25%"));
    }
    set_if_missing(spec, "revisionHistoryLimit", json!(10));
    set_if_missing(spec, "progressDeadlineSeconds", json!(600));
    default_pod_template(spec);
}

fn default_replica_set(replica_set: &mut Value) {
    let spec = child_object(replica_set, "spec");
    set_if_missing(spec, "replicas", json!(1));
    default_pod_template(spec);
}

fn default_daemon_set(daemon_set: &mut Value) {
    let spec = child_object(daemon_set, "spec");
    let strategy = child_object(spec, "updateStrategy");
    set_if_zero(strategy, "type", json!("RollingUpdate"));
    if strategy["type"] == "RollingUpdate" {
        let rolling_update = child_object(strategy, "rollingUpdate");
        set_if_missing(rolling_update, "maxUnavailable", json!(1));
        set_if_missing(rolling_update, "maxSurge", json!(0));
    }
    set_if_missing(spec, "revisionHistoryLimit", json!(10));
    default_pod_template(spec);
}

/// `SetDefaults_Job` of `pkg/apis/batch/v1/defaults.go`. The selector and the labels that go
/// with it need the Job's name and uid, so they are made later ([`generate_job_selector`]).
fn default_job(job: &mut Value) {
    let spec = child_object(job, "spec");
    // A Job that names neither runs one pod to one success.
    if spec["completions"].is_null() && spec["parallelism"].is_null() {
        spec["completions"] = json!(1);
        spec["parallelism"] = json!(1);
    }
    set_if_missing(spec, "parallelism", json!(1));
    let backoff_limit = if spec["backoffLimitPerIndex"].is_null() {
        json!(6)
    } else {
        json!(i32::MAX)
    };
    set_if_missing(spec, "backoffLimit", backoff_limit);
    set_if_missing(spec, "completionMode", json!("NonIndexed"));
    set_if_missing(spec, "suspend", json!(false));
    if spec["podFailurePolicy"].is_object() {
        for rule in elements_mut(&mut spec["podFailurePolicy"], "rules") {
            for pattern in elements_mut(rule, "onPodConditions") {
                set_if_zero(pattern, "status", json!("True"));
            }
        }
    }
    let replacement = if spec["podFailurePolicy"].is_null() {
        "TerminatingOrFailed"
    } else {
        "Failed"
    };
    set_if_missing(spec, "podReplacementPolicy", json!(replacement));
    default_pod_template(spec);
}

/// The label a Job's generated selector selects: the Job's uid.
pub const JOB_CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
/// The label carrying the Job's name on its pods.
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
/// The labels of the same meaning from before Kubernetes 1.27, still added.
const LEGACY_JOB_CONTROLLER_UID_LABEL: &str = "controller-uid";
const LEGACY_JOB_NAME_LABEL: &str = "job-name";

/// The Job registry's `generateSelector`, on create once the Job has its name and uid:
/// unless `spec.manualSelector` is true, the pod template is labelled with the Job's name and
/// uid and `spec.selector` selects the uid, so that the Job's pods are its own whatever other
/// labels they share. A label the client already set is kept (validation refuses it if it
/// is wrong). The Job's own labels, when it has none, are its template's, as the defaulting
/// of a stored Job gives every Job a client reads back.
pub fn generate_job_selector(job: &mut Value) {
    if job["spec"]["manualSelector"] == Value::Bool(true) {
        return;
    }
    let name = job["metadata"]["name"].as_str().unwrap_or("").to_string();
    let uid = job["metadata"]["uid"].as_str().unwrap_or("").to_string();
    let spec = child_object(job, "spec");
    let template = child_object(spec, "template");
    let labels = child_object(child_object(template, "metadata"), "labels");
    for (label, value) in [
        (LEGACY_JOB_NAME_LABEL, &name),
        (JOB_NAME_LABEL, &name),
        (LEGACY_JOB_CONTROLLER_UID_LABEL, &uid),
        (JOB_CONTROLLER_UID_LABEL, &uid),
    ] {
        set_if_missing(labels, label, json!(value));
    }
    let template_labels = labels.clone();
    let match_labels = child_object(child_object(spec, "selector"), "matchLabels");
    set_if_missing(match_labels, JOB_CONTROLLER_UID_LABEL, json!(uid));
    let metadata = child_object(job, "metadata");
    if metadata["labels"].as_object().is_none_or(Map::is_empty) {
        metadata["labels"] = template_labels;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaulted(kind: &str, mut object: Value) -> Value {
        apply_defaults(kind, &mut object);
        object
    }

    fn minimal_pod_spec() -> Value {
        json!({"containers": [{"name": "web", "image": "nginx:1.27"}]})
    }

    #[test]
    fn pod_spec_gets_the_fields_kubectl_shows() {
        let pod = defaulted(
            "Pod",
            json!({"metadata": {"name": "web"}, "spec": minimal_pod_spec()}),
        );
        let spec = &pod["spec"];
        assert_eq!(spec["restartPolicy"], "Always");
        assert_eq!(spec["dnsPolicy"], "ClusterFirst");
        assert_eq!(spec["terminationGracePeriodSeconds"], 30);
        assert_eq!(spec["schedulerName"], "default-scheduler");
        assert_eq!(spec["securityContext"], json!({}));
        assert_eq!(spec["enableServiceLinks"], true);
        assert_eq!(spec["priority"], 0);
        assert_eq!(spec["preemptionPolicy"], "PreemptLowerPriority");
        let container = &spec["containers"][0];
        assert_eq!(container["imagePullPolicy"], "IfNotPresent");
        assert_eq!(container["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(container["terminationMessagePolicy"], "File");
        assert_eq!(container["resources"], json!({}));
    }

    #[test]
    fn explicit_values_are_kept() {
        let pod = defaulted(
            "Pod",
            json!({"spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
                "enableServiceLinks": false,
                "containers": [{"name": "a", "image": "busybox", "imagePullPolicy": "Never"}],
            }}),
        );
        assert_eq!(pod["spec"]["restartPolicy"], "Never");
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 0);
        assert_eq!(pod["spec"]["enableServiceLinks"], false);
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Never");
    }

    #[test]
    fn image_pull_policy_follows_the_tag() {
        for (image, policy) in [
            ("nginx", "Always"),
            ("nginx:latest", "Always"),
            ("registry.local:5000/team/nginx", "Always"),
            ("registry.local:5000/team/nginx:1.2", "IfNotPresent"),
            ("nginx@sha256:abcd", "IfNotPresent"),
            ("nginx:latest@sha256:abcd", "Always"),
            ("nginx:1.27", "IfNotPresent"),
        ] {
            let pod = defaulted(
                "Pod",
                json!({"spec": {"containers": [{"name": "a", "image": image}]}}),
            );
            assert_eq!(
                pod["spec"]["containers"][0]["imagePullPolicy"], policy,
                "{image}"
            );
        }
    }

    #[test]
    fn ports_probes_and_hooks_are_defaulted() {
        let pod = defaulted(
            "Pod",
            json!({"spec": {"containers": [{
                "name": "a",
                "image": "nginx",
                "ports": [{"containerPort": 80}],
                "livenessProbe": {"httpGet": {"port": 80}},
                "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 5},
                "startupProbe": {"grpc": {"port": 9000}},
                "lifecycle": {"preStop": {"httpGet": {"port": 80, "path": "/quit"}}},
                "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
            }]}}),
        );
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["ports"][0]["protocol"], "TCP");
        assert_eq!(
            container["livenessProbe"],
            json!({"httpGet": {"port": 80, "path": "/", "scheme": "HTTP"},
                   "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3})
        );
        assert_eq!(container["readinessProbe"]["periodSeconds"], 5);
        assert_eq!(container["startupProbe"]["grpc"]["service"], "");
        assert_eq!(
            container["lifecycle"]["preStop"]["httpGet"],
            json!({"port": 80, "path": "/quit", "scheme": "HTTP"})
        );
        assert_eq!(
            container["env"][0]["valueFrom"]["fieldRef"]["apiVersion"],
            "v1"
        );
    }

    #[test]
    fn volumes_are_defaulted() {
        let pod = defaulted(
            "Pod",
            json!({"spec": {"containers": [], "volumes": [
                {"name": "scratch"},
                {"name": "config", "configMap": {"name": "app"}},
                {"name": "creds", "secret": {"secretName": "app", "defaultMode": 256}},
                {"name": "host", "hostPath": {"path": "/var/log"}},
                {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
            ]}}),
        );
        let volumes = &pod["spec"]["volumes"];
        assert_eq!(volumes[0]["emptyDir"], json!({}));
        assert_eq!(volumes[1]["configMap"]["defaultMode"], 420);
        assert_eq!(volumes[2]["secret"]["defaultMode"], 256);
        assert_eq!(volumes[3]["hostPath"]["type"], "");
        assert_eq!(volumes[4]["projected"]["defaultMode"], 420);
        assert_eq!(
            volumes[4]["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
            3600
        );
    }

    #[test]
    fn pods_tolerate_unready_and_unreachable_nodes_for_five_minutes() {
        let pod = defaulted("Pod", json!({"spec": minimal_pod_spec()}));
        assert_eq!(
            pod["spec"]["tolerations"],
            json!([
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ])
        );
        // Defaulting twice, as an update does, adds nothing more.
        let again = defaulted("Pod", pod.clone());
        assert_eq!(again, pod);
        // A toleration of every taint covers both.
        let tolerant = defaulted(
            "Pod",
            json!({"spec": {"containers": [], "tolerations": [{"operator": "Exists"}]}}),
        );
        assert_eq!(
            tolerant["spec"]["tolerations"],
            json!([{"operator": "Exists"}])
        );
    }

    #[test]
    fn pod_requests_default_to_limits_and_host_network_ports_to_host_ports() {
        let pod = defaulted(
            "Pod",
            json!({"spec": {"hostNetwork": true, "containers": [{
                "name": "a", "image": "nginx",
                "ports": [{"containerPort": 8080}],
                "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "100m"}},
            }]}}),
        );
        let container = &pod["spec"]["containers"][0];
        assert_eq!(
            container["resources"]["requests"],
            json!({"cpu": "100m", "memory": "128Mi"})
        );
        assert_eq!(container["ports"][0]["hostPort"], 8080);
    }

    #[test]
    fn service_account_fields_stay_in_step() {
        let pod = defaulted(
            "Pod",
            json!({"spec": {"containers": [], "serviceAccount": "builder"}}),
        );
        assert_eq!(pod["spec"]["serviceAccountName"], "builder");
        let pod = defaulted(
            "Pod",
            json!({"spec": {"containers": [], "serviceAccountName": "runner"}}),
        );
        assert_eq!(pod["spec"]["serviceAccount"], "runner");
    }

    #[test]
    fn workload_templates_share_the_pod_spec_defaults_but_not_the_pod_only_ones() {
        for kind in ["Deployment", "ReplicaSet", "DaemonSet"] {
            let workload = defaulted(
                kind,
                json!({"spec": {"template": {"spec": minimal_pod_spec()}}}),
            );
            let spec = &workload["spec"]["template"]["spec"];
            assert_eq!(spec["restartPolicy"], "Always", "{kind}");
            assert_eq!(
                spec["containers"][0]["imagePullPolicy"], "IfNotPresent",
                "{kind}"
            );
            assert!(spec["enableServiceLinks"].is_null(), "{kind}");
            assert!(spec["tolerations"].is_null(), "{kind}");
            assert!(spec["priority"].is_null(), "{kind}");
        }
    }

    #[test]
    fn deployment_defaults() {
        let deployment = defaulted(
            "Deployment",
            json!({"spec": {"template": {"spec": minimal_pod_spec()}}}),
        );
        let spec = &deployment["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(
            spec["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        );
        assert_eq!(spec["revisionHistoryLimit"], 10);
        assert_eq!(spec["progressDeadlineSeconds"], 600);
        let recreate = defaulted(
            "Deployment",
            json!({"spec": {"replicas": 0, "strategy": {"type": "Recreate"}}}),
        );
        assert_eq!(recreate["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(recreate["spec"]["replicas"], 0);
    }

    #[test]
    fn replica_set_and_daemon_set_defaults() {
        let replica_set = defaulted("ReplicaSet", json!({"spec": {}}));
        assert_eq!(replica_set["spec"]["replicas"], 1);
        let daemon_set = defaulted("DaemonSet", json!({"spec": {}}));
        assert_eq!(
            daemon_set["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
        );
        assert_eq!(daemon_set["spec"]["revisionHistoryLimit"], 10);
    }

    #[test]
    fn cluster_ip_service_defaults() {
        let service = defaulted(
            "Service",
            json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 80}, {"port": 443, "targetPort": "https"}]}}),
        );
        let spec = &service["spec"];
        assert_eq!(spec["type"], "ClusterIP");
        assert_eq!(spec["sessionAffinity"], "None");
        assert_eq!(
            spec["ports"][0],
            json!({"port": 80, "protocol": "TCP", "targetPort": 80})
        );
        assert_eq!(spec["ports"][1]["targetPort"], "https");
        assert_eq!(spec["internalTrafficPolicy"], "Cluster");
        assert_eq!(spec["ipFamilyPolicy"], "SingleStack");
        assert_eq!(spec["ipFamilies"], json!(["IPv4"]));
        assert!(spec["externalTrafficPolicy"].is_null());
        assert!(spec["allocateLoadBalancerNodePorts"].is_null());
    }

    #[test]
    fn externally_reachable_services_get_an_external_traffic_policy() {
        let node_port = defaulted(
            "Service",
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}}),
        );
        assert_eq!(node_port["spec"]["externalTrafficPolicy"], "Cluster");
        let balancer = defaulted(
            "Service",
            json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}),
        );
        assert_eq!(balancer["spec"]["externalTrafficPolicy"], "Cluster");
        assert_eq!(balancer["spec"]["allocateLoadBalancerNodePorts"], true);
        let external = defaulted(
            "Service",
            json!({"spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
        );
        assert!(external["spec"]["ipFamilyPolicy"].is_null());
        assert!(external["spec"]["ipFamilies"].is_null());
        assert!(external["spec"]["internalTrafficPolicy"].is_null());
    }

    #[test]
    fn service_cluster_ips_follow_cluster_ip_and_headless_services_without_selector_are_dual() {
        let fixed = defaulted(
            "Service",
            json!({"spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}}),
        );
        assert_eq!(fixed["spec"]["clusterIPs"], json!(["10.96.0.20"]));
        let headless = defaulted(
            "Service",
            json!({"spec": {"clusterIP": "None", "selector": {"app": "db"}}}),
        );
        assert_eq!(headless["spec"]["ipFamilyPolicy"], "SingleStack");
        assert_eq!(headless["spec"]["ipFamilies"], json!(["IPv4"]));
        let manual = defaulted("Service", json!({"spec": {"clusterIP": "None"}}));
        assert_eq!(manual["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(manual["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
    }

    #[test]
    fn client_ip_affinity_gets_a_timeout_and_none_drops_the_config() {
        let sticky = defaulted("Service", json!({"spec": {"sessionAffinity": "ClientIP"}}));
        assert_eq!(
            sticky["spec"]["sessionAffinityConfig"],
            json!({"clientIP": {"timeoutSeconds": 10800}})
        );
        let plain = defaulted(
            "Service",
            json!({"spec": {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}}),
        );
        assert!(plain["spec"].get("sessionAffinityConfig").is_none());
    }

    #[test]
    fn namespace_defaults() {
        let namespace = defaulted("Namespace", json!({"metadata": {"name": "team"}}));
        assert_eq!(
            namespace["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "team"
        );
        assert_eq!(namespace["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(namespace["status"]["phase"], "Active");
        // A namespace being deleted keeps the finalizers the namespace controller left.
        let terminating = defaulted(
            "Namespace",
            json!({"metadata": {"name": "team", "deletionTimestamp": "2024-01-01T00:00:00Z"},
                   "spec": {"finalizers": []}, "status": {"phase": "Terminating"}}),
        );
        assert_eq!(terminating["spec"]["finalizers"], json!([]));
        assert_eq!(terminating["status"]["phase"], "Terminating");
    }

    #[test]
    fn secret_endpoints_slice_and_node_defaults() {
        assert_eq!(defaulted("Secret", json!({"data": {}}))["type"], "Opaque");
        assert_eq!(
            defaulted("Secret", json!({"type": "kubernetes.io/tls"}))["type"],
            "kubernetes.io/tls"
        );
        let endpoints = defaulted("Endpoints", json!({"subsets": [{"ports": [{"port": 80}]}]}));
        assert_eq!(endpoints["subsets"][0]["ports"][0]["protocol"], "TCP");
        let slice = defaulted(
            "EndpointSlice",
            json!({"addressType": "IPv4", "ports": [{"port": 80}]}),
        );
        assert_eq!(
            slice["ports"][0],
            json!({"port": 80, "name": "", "protocol": "TCP"})
        );
        let node = defaulted("Node", json!({"status": {"capacity": {"cpu": "4"}}}));
        assert_eq!(node["status"]["allocatable"], json!({"cpu": "4"}));
    }

    #[test]
    fn unknown_kinds_are_untouched() {
        let object = json!({"metadata": {"name": "x"}, "spec": {}});
        assert_eq!(defaulted("Widget", object.clone()), object);
    }

    #[test]
    fn job_defaults_follow_set_defaults_job() {
        let job = defaulted(
            "Job",
            json!({"spec": {"template": {"spec": minimal_pod_spec()}}}),
        );
        let spec = &job["spec"];
        assert_eq!(spec["completions"], 1);
        assert_eq!(spec["parallelism"], 1);
        assert_eq!(spec["backoffLimit"], 6);
        assert_eq!(spec["completionMode"], "NonIndexed");
        assert_eq!(spec["suspend"], false);
        assert_eq!(spec["podReplacementPolicy"], "TerminatingOrFailed");
        assert!(spec["podFailurePolicy"].is_null());
        assert!(spec["manualSelector"].is_null());
        assert_eq!(spec["template"]["spec"]["dnsPolicy"], "ClusterFirst");
        // Only parallelism given: completions stay unset (any one success ends the Job).
        let job = defaulted("Job", json!({"spec": {"parallelism": 3}}));
        assert!(job["spec"]["completions"].is_null());
        assert_eq!(job["spec"]["parallelism"], 3);
        // Only completions given: one pod at a time.
        let job = defaulted("Job", json!({"spec": {"completions": 4}}));
        assert_eq!(job["spec"]["parallelism"], 1);
        let job = defaulted(
            "Job",
            json!({"spec": {"backoffLimitPerIndex": 1, "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}}}),
        );
        assert_eq!(job["spec"]["backoffLimit"], i32::MAX);
        assert_eq!(job["spec"]["podReplacementPolicy"], "Failed");
        assert_eq!(
            job["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"][0]["status"],
            "True"
        );
    }

    #[test]
    fn job_selector_is_generated_from_the_uid() {
        let mut job = json!({
            "metadata": {"name": "pi", "uid": "1234"},
            "spec": {"template": {"metadata": {"labels": {"app": "pi"}}}},
        });
        generate_job_selector(&mut job);
        assert_eq!(
            job["spec"]["selector"],
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": "1234"}})
        );
        let labels = json!({
            "app": "pi",
            "batch.kubernetes.io/controller-uid": "1234",
            "batch.kubernetes.io/job-name": "pi",
            "controller-uid": "1234",
            "job-name": "pi",
        });
        assert_eq!(job["spec"]["template"]["metadata"]["labels"], labels);
        assert_eq!(job["metadata"]["labels"], labels);
        // Labels of its own stay the Job's; a manual selector is left alone.
        let mut job = json!({
            "metadata": {"name": "pi", "uid": "1234", "labels": {"team": "a"}},
            "spec": {"template": {}},
        });
        generate_job_selector(&mut job);
        assert_eq!(job["metadata"]["labels"], json!({"team": "a"}));
        let mut manual =
            json!({"metadata": {"name": "pi", "uid": "1234"}, "spec": {"manualSelector": true}});
        generate_job_selector(&mut manual);
        assert!(manual["spec"]["selector"].is_null());
    }
}
