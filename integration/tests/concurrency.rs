//! Optimistic concurrency through the real HTTPS API: read-modify-write races on one object.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use integration::{ControlPlane, SendJson};
use serde_json::{Value, json};

const CLIENTS: usize = 20;
const UPDATES_PER_CLIENT: usize = 10;

/// Twenty clients each add ten increments to a counter with GET then PUT-with-version.
/// Every stale PUT must get 409, exactly one PUT may win per version read, and no
/// increment may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_updates_conflict_and_no_update_is_lost() {
    let plane = ControlPlane::start();
    let client = plane.http();
    let base = format!("{}/api/v1/namespaces/default/configmaps", plane.url);
    let created = client
        .post(&base)
        .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "counter"}, "data": {"n": "0"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);

    // Which versions were read by a winning PUT; a version may appear only once.
    let winners: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let conflicts = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        let client = client.clone();
        let url = format!("{base}/counter");
        let winners = winners.clone();
        let conflicts = conflicts.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < UPDATES_PER_CLIENT {
                let mut current: Value = client.get(&url).send_json().await;
                let version = current["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let n: usize = current["data"]["n"].as_str().unwrap().parse().unwrap();
                current["data"]["n"] = json!((n + 1).to_string());
                current["data"][format!("client-{client_index}")] = json!(done.to_string());
                let response = client.put(&url).json(&current).send().await.unwrap();
                match response.status().as_u16() {
                    200 => {
                        let body: Value = response.json().await.unwrap();
                        let new_version: i64 = body["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        assert!(new_version > version.parse::<i64>().unwrap());
                        *winners.lock().unwrap().entry(version).or_default() += 1;
                        done += 1;
                    }
                    409 => {
                        let status: Value = response.json().await.unwrap();
                        assert_eq!(status["reason"], "Conflict", "{status}");
                        assert!(
                            status["message"]
                                .as_str()
                                .unwrap()
                                .contains("the object has been modified")
                        );
                        *conflicts.lock().unwrap() += 1;
                    }
                    other => panic!(
                        "unexpected status {other}: {}",
                        response.text().await.unwrap()
                    ),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let winners = winners.lock().unwrap().clone();
    assert!(
        winners.values().all(|&count| count == 1),
        "a version had two winners: {winners:?}"
    );
    assert_eq!(winners.len(), CLIENTS * UPDATES_PER_CLIENT);
    let last: Value = client.get(format!("{base}/counter")).send_json().await;
    assert_eq!(
        last["data"]["n"],
        json!((CLIENTS * UPDATES_PER_CLIENT).to_string())
    );
    assert!(
        *conflicts.lock().unwrap() > 0,
        "twenty racing clients never conflicted"
    );
}

/// Patches that name no resourceVersion are not preconditioned: racing ones are retried by
/// the server and all land, as kube-apiserver lands them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_patches_without_a_version_all_land() {
    let plane = ControlPlane::start();
    let client = plane.http();
    let base = format!("{}/api/v1/namespaces/default/configmaps", plane.url);
    let created = client
        .post(&base)
        .json(&json!({"metadata": {"name": "shared"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = client.clone();
        let url = format!("{base}/shared");
        tasks.push(tokio::spawn(async move {
            let response = client
                .patch(&url)
                .header("Content-Type", "application/merge-patch+json")
                .body(json!({"data": {format!("k{i}"): "v"}}).to_string())
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let last = client.get(format!("{base}/shared")).send_json().await;
    assert_eq!(last["data"].as_object().unwrap().len(), 40, "{last}");

    // A patch that names a stale version is refused.
    let stale = client
        .patch(format!("{base}/shared"))
        .header("Content-Type", "application/merge-patch+json")
        .body(json!({"metadata": {"resourceVersion": "1"}, "data": {"x": "y"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 409);
}
