//! What a pod worker should do next, decided from the pod's spec and what containerd holds
//! (the kubelet's computePodActions): start the next init container or sidecar, start or
//! restart app containers by restartPolicy with the crash-loop back-off, kill unhealthy
//! ones, stop the sidecars of a pod whose app containers are done. Pure.

use std::collections::HashMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;

use super::model::{ContainerRecord, Kind, RunState, Waiting, is_sidecar, latest, sidecars};
use super::pod_ref;
use super::probe::Verdicts;

/// The first restart back-off, doubled after each restart up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Per-container restart back-off, keyed by container name (the kubelet keys it by pod and
/// container too).
#[derive(Debug, Default, Clone)]
pub struct Backoffs {
    entries: HashMap<String, BackoffEntry>,
}

#[derive(Debug, Clone, Copy)]
struct BackoffEntry {
    delay: Duration,
    last: Timestamp,
}

impl Backoffs {
    /// When the container may start again, if it is still backing off at `now`.
    pub fn until(&self, name: &str, now: Timestamp) -> Option<(Timestamp, Duration)> {
        let entry = self.entries.get(name)?;
        let until = entry.last + entry.delay;
        (now < until).then_some((until, entry.delay))
    }

    /// Records a start at `now`: the next restart waits 10 s, then 20 s, 40 s, ... 5 min.
    /// An entry idle for twice the maximum starts over, as the kubelet's does.
    pub fn next(&mut self, name: &str, now: Timestamp) {
        let entry = self
            .entries
            .entry(name.to_string())
            .or_insert(BackoffEntry {
                delay: Duration::ZERO,
                last: now,
            });
        let idle = now.duration_since(entry.last).unsigned_abs();
        entry.delay = if entry.delay.is_zero() || idle > 2 * MAX_BACKOFF {
            INITIAL_BACKOFF
        } else {
            (entry.delay * 2).min(MAX_BACKOFF)
        };
        entry.last = now;
    }

    pub fn forget(&mut self, name: &str) {
        self.entries.remove(name);
    }
}

/// One step of a pod worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create and start a new instance of this container with this restart count.
    Start {
        kind: Kind,
        name: String,
        attempt: u32,
    },
    /// Stop this container instance (grace period from the pod) with this reason.
    Kill {
        id: String,
        name: String,
        reason: String,
    },
}

/// What the worker should do now, and what it tells the API while it waits.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Containers held back (crash-loop back-off), with the waiting state to report.
    pub waiting: Vec<(String, Waiting)>,
    /// When the worker must look again even if nothing else happens.
    pub wake_at: Option<Timestamp>,
    /// The pod has finished for good (restartPolicy says nothing restarts).
    pub terminal: bool,
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// Whether an exited container restarts under `policy` (init containers restart unless
/// the policy is Never, since they must succeed).
pub fn should_restart(policy: &str, kind: Kind, exit_code: i32) -> bool {
    match (policy, kind) {
        ("Never", _) => false,
        (_, Kind::Init) => exit_code != 0,
        ("OnFailure", Kind::App) => exit_code != 0,
        _ => true,
    }
}

/// Decides the next actions from what containerd holds and what the probes say
/// (`probes.started` gates the init container after a sidecar, `probes.unhealthy` names
/// containers whose liveness or startup probe failed and that must be killed to restart).
///
/// Init containers run in order: a regular one must exit 0 before the next starts, a
/// sidecar (`restartPolicy: Always`) must have started. Once an app container has run, the
/// pod is initialized for good: regular init containers are not run again, and a sidecar
/// that restarts holds nothing back. Sidecars restart whatever the pod's restartPolicy,
/// until every app container has finished for good; then they are stopped, last declared
/// first, and the pod completes.
pub fn plan(
    pod: &Pod,
    records: &[ContainerRecord],
    backoffs: &Backoffs,
    probes: &Verdicts,
    now: Timestamp,
) -> Plan {
    let mut plan = Plan::default();
    let Some(spec) = pod.spec.as_ref() else {
        return plan;
    };
    let policy = restart_policy(pod);

    // Starts an instance unless the container is backing off.
    let start =
        |plan: &mut Plan, kind: Kind, name: &str, attempt: u32| match backoffs.until(name, now) {
            Some((until, delay)) => hold(plan, name, until, delay, pod),
            None => plan.actions.push(Action::Start {
                kind,
                name: name.to_string(),
                attempt,
            }),
        };
    let kill_unhealthy = |plan: &mut Plan, record: &ContainerRecord| {
        if probes.unhealthy.contains(&record.name) {
            plan.actions.push(Action::Kill {
                id: record.id.clone(),
                name: record.name.clone(),
                // A container that has not started failed its startup probe.
                reason: format!(
                    "Container {} failed {} probe, will be restarted",
                    record.name,
                    if probes.started.contains(&record.name) {
                        "liveness"
                    } else {
                        "startup"
                    }
                ),
            });
        }
    };

    // Decides about a regular init container's or an app container's latest instance.
    let consider = |plan: &mut Plan, kind: Kind, name: &str| -> Step {
        let record = latest(records, name, kind);
        // The attempt to start next, if the container must (re)start.
        let next_attempt = match record {
            None => 0,
            Some(record) => match &record.state {
                RunState::Created | RunState::Running { .. } => {
                    kill_unhealthy(plan, record);
                    return Step::Busy;
                }
                RunState::Exited { exit_code, .. } => {
                    if !should_restart(policy, kind, *exit_code) {
                        return if *exit_code == 0 {
                            Step::Done
                        } else {
                            Step::Failed
                        };
                    }
                    record.attempt + 1
                }
            },
        };
        start(plan, kind, name, next_attempt);
        Step::Busy
    };

    // Every app container has finished for good: nothing starts again, and the sidecars
    // still running are stopped so that the pod completes.
    let finished_for_good = |name: &str| {
        latest(records, name, Kind::App)
            .and_then(ContainerRecord::exit_code)
            .is_some_and(|code| !should_restart(policy, Kind::App, code))
    };
    if !spec.containers.is_empty() && spec.containers.iter().all(|c| finished_for_good(&c.name)) {
        stop_sidecars(&mut plan, pod, records);
        plan.terminal = true;
        return plan;
    }

    // The kubelet's podHasInitialized: an app container created or running means every
    // init container ran before.
    let initialized = spec.containers.iter().any(|container| {
        latest(records, &container.name, Kind::App).is_some_and(ContainerRecord::is_running)
    });
    for init in spec.init_containers.iter().flatten() {
        let name = init.name.as_str();
        if is_sidecar(init) {
            let record = latest(records, name, Kind::Init);
            let started = match record {
                None => {
                    start(&mut plan, Kind::Init, name, 0);
                    false
                }
                Some(record) => match &record.state {
                    RunState::Created | RunState::Running { .. } => {
                        kill_unhealthy(&mut plan, record);
                        matches!(record.state, RunState::Running { .. })
                            && probes.started.contains(name)
                    }
                    // A sidecar restarts whatever its exit code and the pod's policy.
                    RunState::Exited { .. } => {
                        start(&mut plan, Kind::Init, name, record.attempt + 1);
                        false
                    }
                },
            };
            if !started && !initialized {
                return plan;
            }
            continue;
        }
        if initialized {
            continue;
        }
        match consider(&mut plan, Kind::Init, name) {
            Step::Done => continue,
            Step::Failed => {
                // The pod fails: whatever of it runs (sidecars started before) stops.
                stop_sidecars(&mut plan, pod, records);
                plan.terminal = true;
                return plan;
            }
            Step::Busy => return plan,
        }
    }
    for container in &spec.containers {
        consider(&mut plan, Kind::App, &container.name);
    }
    plan
}

/// Stops the running sidecars of a pod that is done, one at a time and last declared
/// first, as the kubelet orders a pod's termination: the next one is stopped on the pass
/// after this one has exited.
fn stop_sidecars(plan: &mut Plan, pod: &Pod, records: &[ContainerRecord]) {
    let running = sidecars(pod)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find_map(|sidecar| {
            latest(records, &sidecar.name, Kind::Init).filter(|record| record.is_running())
        });
    if let Some(record) = running {
        plan.actions.push(Action::Kill {
            id: record.id.clone(),
            name: record.name.clone(),
            reason: format!("Stopping container {}", record.name),
        });
    }
}

enum Step {
    Done,
    Failed,
    Busy,
}

fn hold(plan: &mut Plan, name: &str, until: Timestamp, delay: Duration, pod: &Pod) {
    plan.waiting.push((
        name.to_string(),
        Waiting {
            reason: "CrashLoopBackOff".to_string(),
            message: format!(
                "back-off {}s restarting failed container={name} pod={}",
                delay.as_secs(),
                pod_ref(pod)
            ),
        },
    ));
    plan.wake_at = Some(plan.wake_at.map_or(until, |at| at.min(until)));
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    use crate::pods::model::fixtures::{self, pod, with_sidecars};

    fn exited(name: &str, kind: Kind, attempt: u32, code: i32) -> ContainerRecord {
        fixtures::record(name, kind, attempt, fixtures::exited(code))
    }

    fn running(name: &str, kind: Kind, attempt: u32) -> ContainerRecord {
        fixtures::record(name, kind, attempt, fixtures::running())
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_000_000).unwrap()
    }

    #[test]
    fn init_containers_run_one_at_a_time_in_order() {
        let pod = pod("Always", &["a", "b"], &["app"]);
        let backoffs = Backoffs::default();
        let none = Verdicts::default();
        let first = plan(&pod, &[], &backoffs, &none, now());
        assert_eq!(
            first.actions,
            [Action::Start {
                kind: Kind::Init,
                name: "a".into(),
                attempt: 0
            }]
        );
        let waiting = plan(
            &pod,
            &[running("a", Kind::Init, 0)],
            &backoffs,
            &none,
            now(),
        );
        assert!(waiting.actions.is_empty());
        let second = plan(
            &pod,
            &[exited("a", Kind::Init, 0, 0)],
            &backoffs,
            &none,
            now(),
        );
        assert_eq!(
            second.actions,
            [Action::Start {
                kind: Kind::Init,
                name: "b".into(),
                attempt: 0
            }]
        );
        let apps = plan(
            &pod,
            &[exited("a", Kind::Init, 0, 0), exited("b", Kind::Init, 0, 0)],
            &backoffs,
            &none,
            now(),
        );
        assert_eq!(
            apps.actions,
            [Action::Start {
                kind: Kind::App,
                name: "app".into(),
                attempt: 0
            }]
        );
    }

    #[test]
    fn a_failed_init_container_fails_the_pod_under_never() {
        let pod = pod("Never", &["a"], &["app"]);
        let plan =
            plan_with_no_backoffs(&pod, &[exited("a", Kind::Init, 0, 1)], &Verdicts::default());
        assert!(plan.terminal && plan.actions.is_empty());
    }

    #[test]
    fn restart_policy_decides_what_restarts() {
        assert!(should_restart("Always", Kind::App, 0));
        assert!(should_restart("OnFailure", Kind::App, 1));
        assert!(!should_restart("OnFailure", Kind::App, 0));
        assert!(!should_restart("Never", Kind::App, 1));
        assert!(should_restart("Always", Kind::Init, 1));
        assert!(!should_restart("Always", Kind::Init, 0));
        let pod = pod("OnFailure", &[], &["ok", "bad"]);
        let plan = plan_with_no_backoffs(
            &pod,
            &[
                exited("ok", Kind::App, 0, 0),
                exited("bad", Kind::App, 2, 1),
            ],
            &Verdicts::default(),
        );
        assert_eq!(
            plan.actions,
            [Action::Start {
                kind: Kind::App,
                name: "bad".into(),
                attempt: 3
            }]
        );
        assert!(!plan.terminal);
    }

    #[test]
    fn crash_loops_back_off_ten_seconds_doubling_to_five_minutes() {
        let pod = pod("Always", &[], &["app"]);
        let mut backoffs = Backoffs::default();
        let none = Verdicts::default();
        let mut at = now();
        // The first restart is immediate; each later one waits twice as long.
        let mut expected = [10u64, 20, 40, 80, 160, 300, 300].into_iter();
        for (attempt, round) in (0..8).enumerate() {
            let attempt = attempt as u32;
            let records = [exited("app", Kind::App, attempt, 1)];
            let result = plan(&pod, &records, &backoffs, &none, at);
            if round > 0 {
                let delay = expected.next().unwrap();
                assert!(result.actions.is_empty(), "round {round} waits");
                let (_, waiting) = &result.waiting[0];
                assert_eq!(waiting.reason, "CrashLoopBackOff");
                assert!(
                    waiting.message.starts_with(&format!(
                        "back-off {delay}s restarting failed container=app pod=web_default(u1)"
                    )),
                    "{}",
                    waiting.message
                );
                at = result.wake_at.unwrap();
            }
            let result = plan(&pod, &records, &backoffs, &none, at);
            assert_eq!(result.actions.len(), 1, "round {round} restarts");
            backoffs.next("app", at);
        }
    }

    #[test]
    fn unhealthy_running_containers_are_killed() {
        let pod = pod("Always", &[], &["app"]);
        let unhealthy = Verdicts {
            unhealthy: BTreeSet::from(["app".to_string()]),
            ..Default::default()
        };
        let records = [running("app", Kind::App, 0)];
        let result = plan_with_no_backoffs(&pod, &records, &unhealthy);
        assert_eq!(
            result.actions,
            [Action::Kill {
                id: "app-0".into(),
                name: "app".into(),
                reason: "Container app failed startup probe, will be restarted".into(),
            }]
        );
        let started = Verdicts {
            started: BTreeSet::from(["app".to_string()]),
            ..unhealthy
        };
        let result = plan_with_no_backoffs(&pod, &records, &started);
        assert!(
            matches!(&result.actions[..], [Action::Kill { reason, .. }]
                if reason == "Container app failed liveness probe, will be restarted"),
            "{result:?}"
        );
    }

    /// The plan at [`now`] with no container backing off.
    fn plan_with_no_backoffs(pod: &Pod, records: &[ContainerRecord], probes: &Verdicts) -> Plan {
        plan(pod, records, &Backoffs::default(), probes, now())
    }

    fn start(kind: Kind, name: &str, attempt: u32) -> Action {
        Action::Start {
            kind,
            name: name.into(),
            attempt,
        }
    }

    /// Verdicts in which `started` have started (their startup probe passed, or they run
    /// without one).
    fn started(names: &[&str]) -> Verdicts {
        Verdicts {
            started: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_container_after_a_sidecar_waits_until_the_sidecar_has_started() {
        let pod = with_sidecars(pod("Always", &["proxy", "setup"], &["app"]), &["proxy"]);
        let backoffs = Backoffs::default();
        let first = plan(&pod, &[], &backoffs, &started(&[]), now());
        assert_eq!(first.actions, [start(Kind::Init, "proxy", 0)]);
        // Running, but its startup probe has not passed yet: nothing else starts.
        let proxy = running("proxy", Kind::Init, 0);
        let held = plan(
            &pod,
            std::slice::from_ref(&proxy),
            &backoffs,
            &started(&[]),
            now(),
        );
        assert!(held.actions.is_empty() && !held.terminal, "{held:?}");
        let next = plan(
            &pod,
            std::slice::from_ref(&proxy),
            &backoffs,
            &started(&["proxy"]),
            now(),
        );
        assert_eq!(next.actions, [start(Kind::Init, "setup", 0)]);
        // The regular init container still runs to completion before the app starts, and
        // the sidecar keeps running beside it.
        let setup_done = exited("setup", Kind::Init, 0, 0);
        let apps = plan(
            &pod,
            &[proxy.clone(), setup_done.clone()],
            &backoffs,
            &started(&["proxy"]),
            now(),
        );
        assert_eq!(apps.actions, [start(Kind::App, "app", 0)]);
        let steady = plan(
            &pod,
            &[proxy, setup_done, running("app", Kind::App, 0)],
            &backoffs,
            &started(&["proxy", "app"]),
            now(),
        );
        assert!(steady.actions.is_empty(), "{steady:?}");
    }

    #[test]
    fn sidecars_restart_with_back_off_whatever_the_pod_policy() {
        for policy in ["Never", "OnFailure", "Always"] {
            let pod = with_sidecars(pod(policy, &["proxy"], &["app"]), &["proxy"]);
            let mut backoffs = Backoffs::default();
            let app = running("app", Kind::App, 0);
            for code in [0, 1] {
                let records = [exited("proxy", Kind::Init, 0, code), app.clone()];
                let result = plan(&pod, &records, &backoffs, &started(&["app"]), now());
                assert_eq!(
                    result.actions,
                    [start(Kind::Init, "proxy", 1)],
                    "{policy} exit {code}"
                );
            }
            // The second restart backs off as an app container's would.
            backoffs.next("proxy", now());
            let records = [exited("proxy", Kind::Init, 1, 1), app.clone()];
            let result = plan(&pod, &records, &backoffs, &started(&["app"]), now());
            assert!(result.actions.is_empty(), "{policy}: {result:?}");
            assert_eq!(result.waiting[0].0, "proxy");
            assert_eq!(result.waiting[0].1.reason, "CrashLoopBackOff");
            assert_eq!(result.wake_at, Some(now() + INITIAL_BACKOFF));
        }
    }

    #[test]
    fn a_restarting_sidecar_holds_nothing_back_once_the_pod_is_initialized() {
        let pod = with_sidecars(pod("Always", &["proxy", "setup"], &["app"]), &["proxy"]);
        let records = [
            exited("proxy", Kind::Init, 0, 1),
            exited("setup", Kind::Init, 0, 0),
            running("app", Kind::App, 0),
        ];
        let result = plan_with_no_backoffs(&pod, &records, &started(&["app"]));
        // The regular init container is not run again; the app container keeps running.
        assert_eq!(result.actions, [start(Kind::Init, "proxy", 1)]);
        // An unhealthy sidecar is killed to restart, as an app container is.
        let unhealthy = Verdicts {
            unhealthy: BTreeSet::from(["proxy".to_string()]),
            ..started(&["proxy", "app"])
        };
        let records = [
            running("proxy", Kind::Init, 1),
            exited("setup", Kind::Init, 0, 0),
            running("app", Kind::App, 0),
        ];
        let result = plan_with_no_backoffs(&pod, &records, &unhealthy);
        assert!(
            matches!(&result.actions[..], [Action::Kill { id, .. }] if id == "proxy-1"),
            "{result:?}"
        );
    }

    #[test]
    fn finished_app_containers_complete_the_pod_and_stop_sidecars_last_declared_first() {
        for policy in ["Never", "OnFailure"] {
            let pod = with_sidecars(
                pod(policy, &["logs", "proxy"], &["app"]),
                &["logs", "proxy"],
            );
            let both = started(&["logs", "proxy"]);
            let app_done = exited("app", Kind::App, 0, 0);
            let records = [
                running("logs", Kind::Init, 0),
                running("proxy", Kind::Init, 0),
                app_done.clone(),
            ];
            let result = plan_with_no_backoffs(&pod, &records, &both);
            assert!(result.terminal, "{policy}");
            assert_eq!(
                result.actions,
                [Action::Kill {
                    id: "proxy-0".into(),
                    name: "proxy".into(),
                    reason: "Stopping container proxy".into(),
                }],
                "{policy}"
            );
            // The last one stopped: the one before goes next, and nothing restarts.
            let records = [
                running("logs", Kind::Init, 0),
                exited("proxy", Kind::Init, 0, 143),
                app_done.clone(),
            ];
            let result = plan_with_no_backoffs(&pod, &records, &both);
            assert!(
                matches!(&result.actions[..], [Action::Kill { id, .. }] if id == "logs-0"),
                "{policy}: {result:?}"
            );
            let records = [
                exited("logs", Kind::Init, 0, 143),
                exited("proxy", Kind::Init, 0, 143),
                app_done,
            ];
            let result = plan_with_no_backoffs(&pod, &records, &both);
            assert!(result.terminal && result.actions.is_empty(), "{policy}");
        }
        // Under Always the app container restarts and the sidecar keeps running.
        let pod = with_sidecars(pod("Always", &["proxy"], &["app"]), &["proxy"]);
        let records = [
            running("proxy", Kind::Init, 0),
            exited("app", Kind::App, 0, 0),
        ];
        let result = plan_with_no_backoffs(&pod, &records, &started(&["proxy"]));
        assert_eq!(result.actions, [start(Kind::App, "app", 1)]);
        assert!(!result.terminal);
    }

    #[test]
    fn a_failed_init_container_under_never_stops_the_sidecars_started_before() {
        let pod = with_sidecars(pod("Never", &["proxy", "setup"], &["app"]), &["proxy"]);
        let records = [
            running("proxy", Kind::Init, 0),
            exited("setup", Kind::Init, 0, 1),
        ];
        let result = plan_with_no_backoffs(&pod, &records, &started(&["proxy"]));
        assert!(result.terminal);
        assert!(
            matches!(&result.actions[..], [Action::Kill { id, .. }] if id == "proxy-0"),
            "{result:?}"
        );
    }
}
