//! Expectations, as upstream's controllers keep them: the pods a controller created or
//! deleted and has not yet seen so in its pod cache. Until they show up (or a timeout
//! passes) it does not count pods again, so that a cache lagging behind the API server never
//! makes it create or delete the same pods twice.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::pod::Pod;

use super::runtime::Cache;

/// How long an unobserved creation or deletion is waited for before counting again anyway
/// (upstream's ExpectationsTimeout, 5 minutes).
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(300);

/// What one owner is waiting to see in the pod cache.
#[derive(Default)]
struct Pending {
    /// Names of pods it created and has not yet seen.
    creations: HashSet<String>,
    /// Pods (name, uid) it deleted that the cache still shows as not deleting.
    deletions: HashSet<(String, String)>,
    since: Option<Instant>,
}

/// Pending pod creations and deletions per owner key (`namespace/name`).
#[derive(Default)]
pub struct PodExpectations {
    pending: Mutex<HashMap<String, Pending>>,
}

impl PodExpectations {
    /// Whether `pods` has caught up with what the owner `key` (in `namespace`) last did.
    /// What has been seen is forgotten; so is everything once the timeout has passed.
    pub fn satisfied(&self, key: &str, namespace: &str, pods: &Cache<Pod>) -> bool {
        let mut all = self.pending.lock().expect("expectations lock");
        let Some(pending) = all.get_mut(key) else {
            return true;
        };
        pending
            .creations
            .retain(|name| pods.get(Some(namespace), name).is_none());
        pending.deletions.retain(|(name, uid)| {
            pods.get(Some(namespace), name).is_some_and(|pod| {
                pod.metadata.uid.as_deref() == Some(uid)
                    && pod.metadata.deletion_timestamp.is_none()
            })
        });
        let timed_out = pending
            .since
            .is_some_and(|since| since.elapsed() > EXPECTATION_TIMEOUT);
        if timed_out || (pending.creations.is_empty() && pending.deletions.is_empty()) {
            all.remove(key);
            return true;
        }
        false
    }

    /// Records pods the owner `key` created (by name) and deleted (by name and uid).
    pub fn expect(&self, key: &str, creations: Vec<String>, deletions: Vec<(String, String)>) {
        if creations.is_empty() && deletions.is_empty() {
            return;
        }
        let mut all = self.pending.lock().expect("expectations lock");
        let pending = all.entry(key.to_string()).or_default();
        pending.creations.extend(creations);
        pending.deletions.extend(deletions);
        pending.since = Some(Instant::now());
    }

    /// Forgets the owner `key` (it is gone).
    pub fn forget(&self, key: &str) {
        self.pending.lock().expect("expectations lock").remove(key);
    }
}
