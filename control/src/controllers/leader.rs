//! Leader election through a `coordination.k8s.io/v1` Lease, in the manner of client-go's
//! leaderelection: of all the processes that call [`run_while_leader`] with the same Lease,
//! one runs its task; the others wait and take over once the leader's Lease has gone
//! unrenewed for its duration.
//!
//! Expiry is judged on this process's clock from when it last saw the Lease record change,
//! never by comparing another process's `renewTime` with our clock, so clock skew between
//! machines cannot make two leaders. A leader that cannot renew within the renew deadline
//! stops its task (dropping it) before its Lease can expire for the others.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

use super::runtime::is_not_found;

/// The process's stop request, shared by every election in it: set by [`request_stop`]
/// (on SIGTERM), after which leaders release their Leases and every election returns.
fn stop_channel() -> &'static tokio::sync::watch::Sender<bool> {
    static STOP: std::sync::OnceLock<tokio::sync::watch::Sender<bool>> = std::sync::OnceLock::new();
    STOP.get_or_init(|| tokio::sync::watch::channel(false).0)
}

/// Asks every election of this process to stop: a leader stops its task and releases its
/// Lease (holder cleared, duration 1 s, as client-go's ReleaseOnCancel does), so a standby
/// takes over at its next retry instead of waiting out the Lease.
pub fn request_stop() {
    stop_channel().send_replace(true);
}

async fn stopped() {
    let mut receiver = stop_channel().subscribe();
    // The sender lives in a static, so `wait_for` only ends when the value turns true.
    let _ = receiver.wait_for(|stop| *stop).await;
}

#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    /// Who we are in `holderIdentity`; unique per process.
    pub identity: String,
    /// How long a Lease holds without renewal (upstream's default 15 s).
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up (10 s).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew (2 s).
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// The defaults of kube-controller-manager for the Lease `kube-system/{lease_name}`,
    /// with this process's identity.
    pub fn new(lease_name: &str) -> Self {
        Self {
            namespace: "kube-system".into(),
            lease_name: lease_name.into(),
            identity: process_identity().to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The host name and a random suffix, the same for every election of this process, so a
/// process that restarts its controllers keeps its Lease instead of waiting out its own.
pub fn process_identity() -> &'static str {
    static IDENTITY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IDENTITY.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "skiff".into());
        format!("{host}_{}", uuid::Uuid::new_v4())
    })
}

/// The part of a Lease record whose change shows the holder is alive.
#[derive(Clone, PartialEq, Debug)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<String>,
    transitions: Option<i32>,
}

struct Elector {
    api: Api<Lease>,
    config: LeaderElectionConfig,
    observed: Option<(Observed, Instant)>,
}

impl Elector {
    fn observe(&mut self, lease: &Lease) -> Instant {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = Observed {
            holder: spec.holder_identity,
            renew_time: spec.renew_time.map(|t| t.0.to_string()),
            transitions: spec.lease_transitions,
        };
        match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                let now = Instant::now();
                self.observed = Some((record, now));
                now
            }
        }
    }

    fn spec(&self, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
            acquire_time: acquire_time.or_else(|| Some(MicroTime(jiff::Timestamp::now()))),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to take or keep the Lease; Ok(true) when we hold it afterwards.
    async fn try_acquire_or_renew(&mut self) -> anyhow::Result<bool> {
        let name = self.config.lease_name.clone();
        let current = match self.api.get(&name).await {
            Ok(lease) => lease,
            Err(error) if is_not_found(&error) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None, 0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(created) => {
                        self.observe(&created);
                        Ok(true)
                    }
                    Err(kube::Error::Api(response)) if response.code == 409 => Ok(false),
                    Err(error) => Err(error).context(format!("create lease {name}")),
                };
            }
            Err(error) => return Err(error).context(format!("get lease {name}")),
        };
        let observed_at = self.observe(&current);
        let spec = current.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.config.identity.as_str());
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        let held_by_other = spec
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty())
            && !ours;
        if held_by_other && observed_at.elapsed() < duration {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquire_time = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut updated = current.clone();
        updated.spec = Some(self.spec(acquire_time, transitions));
        // The replace carries the resourceVersion we read: of two candidates racing for an
        // expired Lease, one gets a conflict.
        match self
            .api
            .replace(&name, &PostParams::default(), &updated)
            .await
        {
            Ok(written) => {
                if !ours {
                    tracing::info!(identity = %self.config.identity, lease = %name, "became leader");
                }
                self.observe(&written);
                Ok(true)
            }
            Err(kube::Error::Api(response)) if response.code == 409 => Ok(false),
            Err(error) => Err(error).context(format!("update lease {name}")),
        }
    }

    /// Gives the Lease up if we hold it, so that a standby need not wait for it to expire.
    /// A renewal dropped mid-flight may still land first: on a conflict the Lease is read
    /// again.
    async fn release(&mut self) -> anyhow::Result<()> {
        let name = self.config.lease_name.clone();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut lease = self
                .api
                .get(&name)
                .await
                .context(format!("get lease {name}"))?;
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
            lease.spec = Some(spec);
            match self
                .api
                .replace(&name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => {
                    tracing::info!(identity = %self.config.identity, lease = %name, "released the lease");
                    return Ok(());
                }
                Err(kube::Error::Api(response)) if response.code == 409 && attempts < 5 => {}
                Err(error) => return Err(error).context(format!("release lease {name}")),
            }
        }
    }
}

/// Runs `task` only while holding the Lease, as many times as leadership is won, until the
/// task itself returns or the process asks to stop ([`request_stop`]: the task is dropped
/// and the Lease released). Losing the Lease drops the running task (and so cancels it);
/// the caller's task must not leave spawned work behind that outlives its future.
pub async fn run_while_leader<F, Fut>(
    client: Client,
    config: LeaderElectionConfig,
    task: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut elector = Elector {
        api: Api::namespaced(client, &config.namespace),
        config,
        observed: None,
    };
    loop {
        // Wait to become leader.
        loop {
            match elector.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "leader election attempt failed"
                ),
            }
            tokio::select! {
                () = tokio::time::sleep(elector.config.retry_period) => {}
                () = stopped() => return Ok(()),
            }
        }
        tracing::info!(identity = %elector.config.identity, lease = %elector.config.lease_name, "leading");
        let renewing = async {
            let mut last_renewal = Instant::now();
            loop {
                tokio::time::sleep(elector.config.retry_period).await;
                match elector.try_acquire_or_renew().await {
                    Ok(true) => last_renewal = Instant::now(),
                    Ok(false) => return "another process holds the lease",
                    Err(error) => {
                        tracing::warn!(error = format!("{error:#}"), "lease renewal failed");
                        if last_renewal.elapsed() > elector.config.renew_deadline {
                            return "could not renew the lease within the renew deadline";
                        }
                    }
                }
            }
        };
        tokio::select! {
            result = task() => return result,
            reason = renewing => {
                tracing::warn!(%reason, "lost leadership: stopping");
            }
            () = stopped() => {
                if let Err(error) = elector.release().await {
                    tracing::warn!(error = format!("{error:#}"), "lease not released; it expires");
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_identity_per_process() {
        let a = LeaderElectionConfig::new("skiff-controllers");
        let b = LeaderElectionConfig::new("skiff-scheduler");
        assert_eq!(a.identity, b.identity);
        assert!(a.identity.contains('_'));
        assert_eq!(a.namespace, "kube-system");
        assert!(a.renew_deadline < a.lease_duration);
    }
}
