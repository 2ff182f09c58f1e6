//! Namespace deletion: empties a namespace marked for deletion, then removes it.
//!
//! `DELETE namespaces/{name}` only marks the namespace Terminating. This loop deletes every
//! object in it through the API server's own delete path (so pods get their grace period
//! and Services give back their addresses), and once nothing is left, removes the
//! namespace itself. It is driven by the store's watch: any change under a terminating
//! namespace wakes it, so a pod that finishes its grace period later completes the deletion.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::api::ApiServer;
use crate::api::registry::{self, RESOURCES};

/// The namespace a store key belongs to, for namespaced resources.
fn namespace_of_key(key: &str) -> Option<(&str, &str)> {
    // /registry/{group}/{resource}/{namespace}/{name}
    let mut parts = key.strip_prefix("/registry/")?.split('/');
    let _group = parts.next()?;
    let resource = parts.next()?;
    let namespace = parts.next()?;
    parts.next()?;
    Some((resource, namespace))
}

/// Runs until the store closes.
pub async fn run(api: Arc<ApiServer>) {
    loop {
        if let Err(error) = run_once(&api).await {
            tracing::warn!(%error, "namespace controller restarting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn run_once(api: &Arc<ApiServer>) -> anyhow::Result<()> {
    let namespaces = registry::lookup("", "v1", "namespaces").expect("namespaces are registered");
    let store = api.store();
    let revision = store.current_revision().await?;
    let mut watch = store.watch("/registry/", revision).await?;
    let mut terminating = BTreeSet::new();
    let page = store.list(&namespaces.key_prefix(), None, None).await?;
    for kv in &page.items {
        let object: Value = serde_json::from_slice(&kv.value)?;
        if object["metadata"]["deletionTimestamp"].is_string() {
            terminating.insert(
                object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    for namespace in terminating.clone() {
        if finalize(api, &namespace).await? {
            terminating.remove(&namespace);
        }
    }
    while let Some(event) = watch.next().await {
        let key = &event.kv.key;
        let touched = if let Some(name) = key.strip_prefix(&namespaces.key_prefix()) {
            let object: Value = serde_json::from_slice(&event.kv.value)?;
            let marked = object["metadata"]["deletionTimestamp"].is_string();
            if marked && event.kind == crate::store::EventKind::Put {
                terminating.insert(name.to_string());
                Some(name.to_string())
            } else {
                terminating.remove(name);
                None
            }
        } else {
            namespace_of_key(key)
                .map(|(_, namespace)| namespace.to_string())
                .filter(|namespace| terminating.contains(namespace))
        };
        if let Some(namespace) = touched
            && finalize(api, &namespace).await?
        {
            terminating.remove(&namespace);
        }
    }
    Ok(())
}

/// Deletes what is left in `namespace`; removes the namespace when it is empty. Returns
/// whether the namespace is gone.
async fn finalize(api: &Arc<ApiServer>, namespace: &str) -> anyhow::Result<bool> {
    let store = api.store();
    let mut remaining = 0;
    for info in RESOURCES.iter().filter(|r| r.namespaced) {
        let page = store
            .list(&info.list_prefix(Some(namespace)), None, None)
            .await?;
        for kv in &page.items {
            remaining += 1;
            let object: Value = serde_json::from_slice(&kv.value)?;
            if object["metadata"]["deletionTimestamp"].is_string() {
                continue;
            }
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            if let Err(error) = api.delete_internal(info, Some(namespace), name).await
                && error.code != 404
            {
                tracing::warn!(%namespace, %name, resource = info.resource, %error, "delete during namespace deletion");
            }
        }
    }
    // Objects whose deletion completed synchronously are gone now; count again.
    if remaining > 0 {
        remaining = 0;
        for info in RESOURCES.iter().filter(|r| r.namespaced) {
            remaining += store
                .list(&info.list_prefix(Some(namespace)), None, Some(1))
                .await?
                .items
                .len();
        }
    }
    if remaining > 0 {
        return Ok(false);
    }
    let namespaces = registry::lookup("", "v1", "namespaces").expect("namespaces are registered");
    match store
        .delete(&namespaces.object_key(None, namespace), None)
        .await
    {
        Ok(_) | Err(crate::store::StoreError::NotFound { .. }) => {
            tracing::info!(%namespace, "namespace deleted");
            Ok(true)
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_namespace() {
        assert_eq!(
            namespace_of_key("/registry/core/pods/shop/web"),
            Some(("pods", "shop"))
        );
        assert_eq!(namespace_of_key("/registry/core/nodes/n1"), None);
    }
}
