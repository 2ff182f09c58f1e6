//! What a pod worker should do next, decided from the pod's spec and what containerd holds
//! (the kubelet's computePodActions): start the next init container, start or restart app
//! containers by restartPolicy with the crash-loop back-off, kill unhealthy ones. Pure.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;

use super::model::{ContainerRecord, Kind, RunState, Waiting, latest};

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

fn pod_ref(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// Decides the next actions. `unhealthy` names containers whose liveness (or startup)
/// probe failed and that must be killed to restart.
pub fn plan(
    pod: &Pod,
    records: &[ContainerRecord],
    backoffs: &mut Backoffs,
    unhealthy: &BTreeSet<String>,
    now: Timestamp,
) -> Plan {
    let mut plan = Plan::default();
    let Some(spec) = pod.spec.as_ref() else {
        return plan;
    };
    let policy = restart_policy(pod);

    // Decides about one container's latest instance; returns whether it is done (exited
    // for good with success for init containers).
    let consider = |plan: &mut Plan, kind: Kind, name: &str| -> Step {
        let record = latest(records, name, kind);
        // The attempt to start next, if the container must (re)start.
        let next_attempt = match record {
            None => 0,
            Some(record) => match &record.state {
                RunState::Created | RunState::Running { .. } => {
                    if unhealthy.contains(name) {
                        plan.actions.push(Action::Kill {
                            id: record.id.clone(),
                            name: name.to_string(),
                            reason: format!(
                                "Container {name} failed liveness probe, will be restarted"
                            ),
                        });
                    }
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
        match backoffs.until(name, now) {
            Some((until, delay)) => hold(plan, name, until, delay, pod),
            None => plan.actions.push(Action::Start {
                kind,
                name: name.to_string(),
                attempt: next_attempt,
            }),
        }
        Step::Busy
    };

    for init in spec.init_containers.iter().flatten() {
        match consider(&mut plan, Kind::Init, &init.name) {
            Step::Done => continue,
            Step::Failed => {
                plan.terminal = true;
                return plan;
            }
            Step::Busy => return plan,
        }
    }
    let mut finished = 0;
    for container in &spec.containers {
        if matches!(
            consider(&mut plan, Kind::App, &container.name),
            Step::Done | Step::Failed
        ) {
            finished += 1;
        }
    }
    plan.terminal = finished == spec.containers.len();
    plan
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
    use super::*;

    use crate::pods::model::fixtures::{self, pod};

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
        let mut backoffs = Backoffs::default();
        let none = BTreeSet::new();
        let first = plan(&pod, &[], &mut backoffs, &none, now());
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
            &mut backoffs,
            &none,
            now(),
        );
        assert!(waiting.actions.is_empty());
        let second = plan(
            &pod,
            &[exited("a", Kind::Init, 0, 0)],
            &mut backoffs,
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
            &mut backoffs,
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
        let plan = plan(
            &pod,
            &[exited("a", Kind::Init, 0, 1)],
            &mut Backoffs::default(),
            &BTreeSet::new(),
            now(),
        );
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
        let plan = plan(
            &pod,
            &[
                exited("ok", Kind::App, 0, 0),
                exited("bad", Kind::App, 2, 1),
            ],
            &mut Backoffs::default(),
            &BTreeSet::new(),
            now(),
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
        let none = BTreeSet::new();
        let mut at = now();
        // The first restart is immediate; each later one waits twice as long.
        let mut expected = [10u64, 20, 40, 80, 160, 300, 300].into_iter();
        for (attempt, round) in (0..8).enumerate() {
            let attempt = attempt as u32;
            let records = [exited("app", Kind::App, attempt, 1)];
            let result = plan(&pod, &records, &mut backoffs, &none, at);
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
            let result = plan(&pod, &records, &mut backoffs, &none, at);
            assert_eq!(result.actions.len(), 1, "round {round} restarts");
            backoffs.next("app", at);
        }
    }

    #[test]
    fn unhealthy_running_containers_are_killed() {
        let pod = pod("Always", &[], &["app"]);
        let unhealthy = BTreeSet::from(["app".to_string()]);
        let plan = plan(
            &pod,
            &[running("app", Kind::App, 0)],
            &mut Backoffs::default(),
            &unhealthy,
            now(),
        );
        assert!(matches!(&plan.actions[0], Action::Kill { id, .. } if id == "app-0"));
    }
}
