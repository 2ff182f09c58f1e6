//! A pod's status as the kubelet reports it: phase (getPhase), conditions, podIP(s),
//! hostIP, startTime, qosClass and one containerStatus per container. Pure.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::model::{ContainerRecord, Kind, RunState, Waiting, is_sidecar, latest, previous};

/// What the worker knows beyond the container records.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub pod_ips: Vec<String>,
    pub host_ip: Option<String>,
    pub start_time: Option<Timestamp>,
    /// Why a container that has no running instance is waiting (image pulls, back-off...).
    pub waiting: BTreeMap<String, Waiting>,
    /// Containers whose readiness probe passes (or that have none and run).
    pub ready: BTreeSet<String>,
    /// Containers whose startup probe passed (or that have none and run).
    pub started: BTreeSet<String>,
    /// The sandbox (namespaces, network) is up.
    pub sandbox_ready: bool,
    /// The pod has been told to stop (deletion or a terminal phase).
    pub terminating: bool,
    pub qos_class: String,
}

fn time(timestamp: &Timestamp) -> String {
    timestamp
        .round(jiff::Unit::Second)
        .unwrap_or(*timestamp)
        .to_string()
}

fn state_json(record: &ContainerRecord) -> Value {
    let container_id = format!("containerd://{}", record.id);
    match &record.state {
        RunState::Created => json!({"waiting": {"reason": "ContainerCreating"}}),
        RunState::Running { started_at } => json!({"running": {"startedAt": time(started_at)}}),
        RunState::Exited {
            exit_code,
            reason,
            started_at,
            finished_at,
        } => {
            let mut terminated = json!({
                "exitCode": exit_code,
                "reason": reason,
                "finishedAt": time(finished_at),
                "containerID": container_id,
            });
            if let Some(started) = started_at {
                terminated["startedAt"] = json!(time(started));
            }
            json!({"terminated": terminated})
        }
    }
}

/// The containerStatus of one container (of `kind`; `sidecar` for a restartable init
/// container, which reports `started` and `ready` as an app container does).
fn container_status(
    name: &str,
    image: &str,
    kind: Kind,
    sidecar: bool,
    records: &[ContainerRecord],
    observed: &Observed,
) -> Value {
    let newest = latest(records, name, kind);
    let waiting = observed.waiting.get(name);
    let mut status = json!({
        "name": name,
        "image": image,
        "imageID": "",
        "ready": false,
        "restartCount": newest.map_or(0, |record| record.attempt),
        "started": false,
    });
    let mut last_state = json!({});
    match (newest, waiting) {
        // A waiting reason (back-off, pull error) describes the next instance; the newest
        // one becomes the last state.
        (Some(record), Some(waiting)) if !record.is_running() => {
            status["state"] =
                json!({"waiting": {"reason": waiting.reason, "message": waiting.message}});
            last_state = state_json(record);
            status["imageID"] = json!(record.image_id);
            status["containerID"] = json!(format!("containerd://{}", record.id));
        }
        (Some(record), _) => {
            status["state"] = state_json(record);
            status["imageID"] = json!(record.image_id);
            status["containerID"] = json!(format!("containerd://{}", record.id));
            if let Some(old) = previous(records, name, kind) {
                last_state = state_json(old);
            }
            let running = matches!(record.state, RunState::Running { .. });
            if kind == Kind::Init && !sidecar {
                // A regular init container has no probes: started while it runs, ready
                // once it has succeeded (the kubelet's prober manager).
                status["started"] = json!(running);
                status["ready"] = json!(record.exit_code() == Some(0));
            } else {
                let started = running && observed.started.contains(name);
                status["started"] = json!(started);
                status["ready"] =
                    json!(started && observed.ready.contains(name) && !observed.terminating);
            }
        }
        (None, Some(waiting)) => {
            status["state"] =
                json!({"waiting": {"reason": waiting.reason, "message": waiting.message}});
        }
        (None, None) => {
            status["state"] = json!({"waiting": {"reason": "PodInitializing"}});
            if kind == Kind::Init || observed.sandbox_ready {
                status["state"] = json!({"waiting": {"reason": "ContainerCreating"}});
            }
        }
    }
    status["lastState"] = last_state;
    status
}

/// Whether an app container's status shows it running or terminated (the kubelet's
/// HasAnyRegularContainerStarted): the pod was initialized, even if a sidecar now restarts.
fn any_app_container_started(pod: &Pod, records: &[ContainerRecord], observed: &Observed) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .any(|container| {
            latest(records, &container.name, Kind::App).is_some_and(|record| match record.state {
                RunState::Running { .. } => true,
                RunState::Exited { .. } => !observed.waiting.contains_key(&container.name),
                RunState::Created => false,
            })
        })
}

/// The pod phase, by the kubelet's getPhase rules: regular init containers must have
/// succeeded and sidecars started; a running sidecar keeps the pod Running, a stopped one
/// counts for nothing, so the app containers alone decide Succeeded or Failed.
pub fn phase(pod: &Pod, records: &[ContainerRecord], observed: &Observed) -> &'static str {
    let Some(spec) = pod.spec.as_ref() else {
        return "Pending";
    };
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let (mut pending_init, mut pending_sidecars, mut failed_init) = (0, 0, 0);
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for init in spec.init_containers.iter().flatten() {
        let record = latest(records, &init.name, Kind::Init);
        if is_sidecar(init) {
            match record.map(|r| (&r.state, r.attempt)) {
                Some((RunState::Running { .. }, _)) => {
                    if !observed.started.contains(&init.name) {
                        pending_sidecars += 1;
                    }
                    running += 1;
                }
                // A stopped sidecar (terminated, or waiting to restart) is ignored.
                Some((RunState::Exited { .. }, _)) => {}
                Some((RunState::Created, attempt)) if attempt > 0 => {}
                Some((RunState::Created, _)) | None => pending_sidecars += 1,
            }
            continue;
        }
        match record.map(|r| &r.state) {
            Some(RunState::Exited { exit_code, .. }) => {
                if *exit_code != 0 {
                    failed_init += 1;
                }
            }
            _ => pending_init += 1,
        }
    }
    for container in &spec.containers {
        let record = latest(records, &container.name, Kind::App);
        let held = observed.waiting.contains_key(&container.name);
        match record.map(|r| &r.state) {
            Some(RunState::Running { .. }) => running += 1,
            Some(RunState::Exited { exit_code, .. }) if !held || policy == "Never" => {
                stopped += 1;
                if *exit_code == 0 {
                    succeeded += 1;
                }
            }
            // Waiting to restart after an exit counts as stopped, as the kubelet counts it.
            Some(RunState::Exited { .. }) => stopped += 1,
            Some(RunState::Created) | None => waiting += 1,
        }
    }
    if failed_init > 0 && policy == "Never" {
        "Failed"
    } else if pending_init > 0
        || (pending_sidecars > 0 && !any_app_container_started(pod, records, observed))
        || waiting > 0
    {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        match policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "OnFailure" => "Running",
            _ => "Failed",
        }
    } else {
        "Pending"
    }
}

/// The pod's full status, ready to be written to the `status` subresource.
pub fn pod_status(
    pod: &Pod,
    records: &[ContainerRecord],
    observed: &Observed,
    now: Timestamp,
) -> Value {
    let spec = pod.spec.as_ref();
    let phase = phase(pod, records, observed);
    let init_containers = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let init_statuses: Vec<Value> = init_containers
        .iter()
        .map(|c| {
            container_status(
                &c.name,
                c.image.as_deref().unwrap_or_default(),
                Kind::Init,
                is_sidecar(c),
                records,
                observed,
            )
        })
        .collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|c| {
            container_status(
                &c.name,
                c.image.as_deref().unwrap_or_default(),
                Kind::App,
                false,
                records,
                observed,
            )
        })
        .collect();

    // Regular init containers must have succeeded, sidecars must have started.
    let incomplete_init: Vec<&str> = init_containers
        .iter()
        .zip(&init_statuses)
        .filter(|(c, status)| {
            if is_sidecar(c) {
                status["started"] != true
            } else {
                !matches!(
                    latest(records, &c.name, Kind::Init).map(|r| &r.state),
                    Some(RunState::Exited { exit_code: 0, .. })
                )
            }
        })
        .map(|(c, _)| c.name.as_str())
        .collect();
    // Sidecars count toward the pod's readiness, listed before the app containers.
    let unready: Vec<&str> = init_containers
        .iter()
        .zip(&init_statuses)
        .filter(|(c, _)| is_sidecar(c))
        .map(|(_, status)| status)
        .chain(&statuses)
        .filter(|s| s["ready"] != true)
        .filter_map(|s| s["name"].as_str())
        .collect();
    let finished = matches!(phase, "Succeeded" | "Failed");
    let now_text = time(&now);
    let condition = |kind: &str, ok: bool, reason: &str, message: String| {
        let mut condition = json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": now_text});
        if !ok {
            condition["reason"] = json!(reason);
            if !message.is_empty() {
                condition["message"] = json!(message);
            }
        }
        condition
    };
    let list = |names: &[&str]| format!("[{}]", names.join(" "));
    let (ready_reason, ready_message) = if finished {
        ("PodCompleted", String::new())
    } else {
        (
            "ContainersNotReady",
            format!("containers with unready status: {}", list(&unready)),
        )
    };
    let initialized = incomplete_init.is_empty()
        || phase == "Succeeded"
        || any_app_container_started(pod, records, observed);
    let mut conditions = vec![
        condition(
            "PodReadyToStartContainers",
            observed.sandbox_ready,
            "",
            String::new(),
        ),
        condition(
            "Initialized",
            initialized,
            if finished {
                "PodCompleted"
            } else {
                "ContainersNotInitialized"
            },
            if finished {
                String::new()
            } else {
                format!(
                    "containers with incomplete status: {}",
                    list(&incomplete_init)
                )
            },
        ),
        condition(
            "Ready",
            unready.is_empty() && !finished,
            ready_reason,
            ready_message.clone(),
        ),
        condition(
            "ContainersReady",
            unready.is_empty() && !finished,
            ready_reason,
            ready_message,
        ),
    ];
    // The scheduler's condition is kept as it wrote it.
    if let Some(scheduled) = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "PodScheduled"))
    {
        conditions.push(serde_json::to_value(scheduled).unwrap_or(Value::Null));
    } else {
        conditions.push(condition("PodScheduled", true, "", String::new()));
    }
    // Conditions keep their transition time while their status holds.
    if let Some(old) = pod.status.as_ref().and_then(|s| s.conditions.as_ref()) {
        for condition in &mut conditions {
            if let Some(previous) = old
                .iter()
                .find(|c| Some(c.type_.as_str()) == condition["type"].as_str())
                && Some(previous.status.as_str()) == condition["status"].as_str()
                && let Some(time) = &previous.last_transition_time
            {
                condition["lastTransitionTime"] = json!(time.0.to_string());
            }
        }
    }

    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "containerStatuses": statuses,
        "qosClass": observed.qos_class,
    });
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] = json!(init_statuses);
    }
    if let Some(host_ip) = &observed.host_ip {
        status["hostIP"] = json!(host_ip);
        status["hostIPs"] = json!([{"ip": host_ip}]);
    }
    if let Some(first) = observed.pod_ips.first() {
        status["podIP"] = json!(first);
        status["podIPs"] = json!(
            observed
                .pod_ips
                .iter()
                .map(|ip| json!({"ip": ip}))
                .collect::<Vec<_>>()
        );
    }
    if let Some(start) = &observed.start_time {
        status["startTime"] = json!(time(start));
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pods::model::fixtures::{exited, pod, record, running, with_sidecars};

    fn condition(status: &Value, kind: &str) -> Value {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap()
            .clone()
    }

    #[test]
    fn phases_follow_the_kubelet() {
        let observed = Observed::default();
        let always = pod("Always", &["init"], &["app"]);
        assert_eq!(phase(&always, &[], &observed), "Pending");
        let init_done = record("init", Kind::Init, 0, exited(0));
        assert_eq!(
            phase(&always, std::slice::from_ref(&init_done), &observed),
            "Pending"
        );
        let app = record("app", Kind::App, 0, running());
        assert_eq!(
            phase(&always, &[init_done.clone(), app], &observed),
            "Running"
        );
        let crashed = record("app", Kind::App, 3, exited(1));
        assert_eq!(
            phase(&always, &[init_done.clone(), crashed.clone()], &observed),
            "Running"
        );
        let never = pod("Never", &[], &["app"]);
        assert_eq!(
            phase(&never, std::slice::from_ref(&crashed), &observed),
            "Failed"
        );
        assert_eq!(
            phase(&never, &[record("app", Kind::App, 0, exited(0))], &observed),
            "Succeeded"
        );
        let on_failure = pod("OnFailure", &[], &["app"]);
        assert_eq!(phase(&on_failure, &[crashed], &observed), "Running");
        let never_init = pod("Never", &["init"], &["app"]);
        assert_eq!(
            phase(
                &never_init,
                &[record("init", Kind::Init, 0, exited(2))],
                &observed
            ),
            "Failed"
        );
    }

    #[test]
    fn crash_loop_shows_waiting_with_the_last_termination() {
        let pod = pod("Always", &[], &["app"]);
        let mut observed = Observed {
            sandbox_ready: true,
            ..Default::default()
        };
        observed.waiting.insert(
            "app".into(),
            Waiting {
                reason: "CrashLoopBackOff".into(),
                message: "back-off 10s".into(),
            },
        );
        let records = [record("app", Kind::App, 2, exited(1))];
        let status = pod_status(&pod, &records, &observed, Timestamp::UNIX_EPOCH);
        let container = &status["containerStatuses"][0];
        assert_eq!(container["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(container["lastState"]["terminated"]["exitCode"], 1);
        assert_eq!(container["restartCount"], 2);
        assert_eq!(container["ready"], false);
        assert_eq!(status["phase"], "Running");
    }

    #[test]
    fn ready_conditions_follow_the_containers() {
        let pod = pod("Always", &[], &["app"]);
        let mut observed = Observed {
            sandbox_ready: true,
            pod_ips: vec!["10.1.0.5".into()],
            host_ip: Some("192.0.2.1".into()),
            ..Default::default()
        };
        let records = [record("app", Kind::App, 0, running())];
        let status = pod_status(&pod, &records, &observed, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&status, "Ready")["status"], "False");
        assert_eq!(
            condition(&status, "Ready")["message"],
            "containers with unready status: [app]"
        );
        observed.ready.insert("app".into());
        observed.started.insert("app".into());
        let status = pod_status(&pod, &records, &observed, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&status, "Ready")["status"], "True");
        assert_eq!(condition(&status, "ContainersReady")["status"], "True");
        assert_eq!(condition(&status, "Initialized")["status"], "True");
        assert_eq!(status["podIP"], "10.1.0.5");
        assert_eq!(
            status["containerStatuses"][0]["containerID"],
            "containerd://app-0"
        );
        let decoded: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(status).unwrap();
        assert_eq!(decoded.phase.as_deref(), Some("Running"));
    }

    #[test]
    fn a_running_sidecar_keeps_the_pod_running_and_a_stopped_one_counts_for_nothing() {
        let started = Observed {
            started: ["proxy".to_string()].into(),
            ..Default::default()
        };
        for (policy, app_exit, done) in [
            ("Never", 0, "Succeeded"),
            ("Never", 1, "Failed"),
            ("OnFailure", 0, "Succeeded"),
        ] {
            let pod = with_sidecars(pod(policy, &["proxy"], &["app"]), &["proxy"]);
            let app = record("app", Kind::App, 0, exited(app_exit));
            let proxy = record("proxy", Kind::Init, 0, running());
            assert_eq!(
                phase(&pod, &[proxy, app.clone()], &started),
                "Running",
                "{policy}"
            );
            // Stopped by the agent (SIGTERM): its exit code does not fail the pod.
            let stopped = record("proxy", Kind::Init, 0, exited(143));
            assert_eq!(phase(&pod, &[stopped, app], &started), done, "{policy}");
        }
    }

    #[test]
    fn the_pod_is_pending_until_its_sidecars_have_started() {
        let pod = with_sidecars(pod("Always", &["proxy", "setup"], &["app"]), &["proxy"]);
        let proxy = record("proxy", Kind::Init, 0, running());
        let mut observed = Observed {
            sandbox_ready: true,
            ..Default::default()
        };
        assert_eq!(
            phase(&pod, std::slice::from_ref(&proxy), &observed),
            "Pending"
        );
        let status = pod_status(
            &pod,
            std::slice::from_ref(&proxy),
            &observed,
            Timestamp::UNIX_EPOCH,
        );
        let initialized = condition(&status, "Initialized");
        assert_eq!(initialized["status"], "False");
        assert_eq!(
            initialized["message"],
            "containers with incomplete status: [proxy setup]"
        );
        assert_eq!(status["initContainerStatuses"][0]["started"], false);

        // Started (its startup probe passed) and ready; the regular one has succeeded.
        observed.started.insert("proxy".into());
        observed.ready.insert("proxy".into());
        let setup = record("setup", Kind::Init, 0, exited(0));
        let records = [proxy.clone(), setup.clone()];
        let status = pod_status(&pod, &records, &observed, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&status, "Initialized")["status"], "True");
        assert_eq!(status["phase"], "Pending", "the app container waits");
        let sidecar = &status["initContainerStatuses"][0];
        assert_eq!(sidecar["started"], true);
        assert_eq!(sidecar["ready"], true);
        assert!(sidecar["state"]["running"].is_object(), "{sidecar:#}");
        assert_eq!(status["initContainerStatuses"][1]["ready"], true);
        assert_eq!(status["initContainerStatuses"][1]["started"], false);

        // Once the app container ran, a restarting sidecar does not make the pod pending
        // or uninitialized again.
        let records = [
            record("proxy", Kind::Init, 1, exited(1)),
            record("proxy", Kind::Init, 0, exited(1)),
            setup,
            record("app", Kind::App, 0, running()),
        ];
        observed.started = ["app".to_string()].into();
        observed.waiting.insert(
            "proxy".into(),
            Waiting {
                reason: "CrashLoopBackOff".into(),
                message: "back-off 10s".into(),
            },
        );
        let status = pod_status(&pod, &records, &observed, Timestamp::UNIX_EPOCH);
        assert_eq!(status["phase"], "Running");
        assert_eq!(condition(&status, "Initialized")["status"], "True");
        let sidecar = &status["initContainerStatuses"][0];
        assert_eq!(sidecar["restartCount"], 1);
        assert_eq!(sidecar["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(sidecar["lastState"]["terminated"]["exitCode"], 1);
    }

    #[test]
    fn sidecar_readiness_counts_toward_the_pod_ready_condition() {
        let pod = with_sidecars(pod("Always", &["proxy"], &["app"]), &["proxy"]);
        let records = [
            record("proxy", Kind::Init, 0, running()),
            record("app", Kind::App, 0, running()),
        ];
        let mut observed = Observed {
            sandbox_ready: true,
            started: ["proxy".to_string(), "app".to_string()].into(),
            ready: ["app".to_string()].into(),
            ..Default::default()
        };
        let status = pod_status(&pod, &records, &observed, Timestamp::UNIX_EPOCH);
        for kind in ["Ready", "ContainersReady"] {
            let condition = condition(&status, kind);
            assert_eq!(condition["status"], "False");
            assert_eq!(
                condition["message"],
                "containers with unready status: [proxy]"
            );
        }
        observed.ready.insert("proxy".into());
        let status = pod_status(&pod, &records, &observed, Timestamp::UNIX_EPOCH);
        assert_eq!(condition(&status, "Ready")["status"], "True");
        let decoded: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(status).unwrap();
        assert!(decoded.init_container_statuses.unwrap()[0].ready);
    }
}
