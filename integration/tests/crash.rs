//! `kill -9` of skiff-control in the middle of a stream of writes: every acknowledged write
//! survives, resource versions keep increasing, and old watches get 410.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::{ControlPlane, SendJson};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let mut plane = ControlPlane::start();
    let client = plane.http();
    let base = format!("{}/api/v1/namespaces/default/configmaps", plane.url);
    let acknowledged: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let mut writers = Vec::new();
    for writer in 0..8 {
        let client = client.clone();
        let base = base.clone();
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{writer}-{i}");
                let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"i": i.to_string()}});
                let Ok(response) = client.post(&base).json(&body).send().await else { return };
                if response.status() != 201 {
                    return;
                }
                let Ok(created) = response.json::<Value>().await else { return };
                let version = created["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
                acknowledged.lock().unwrap().push((name, version));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    plane.kill();
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 50,
        "only {} writes before the kill",
        acknowledged.len()
    );
    let highest = acknowledged.iter().map(|(_, v)| *v).max().unwrap();

    let data_dir = plane.data_dir.clone();
    let restarted = ControlPlane::start_in(&data_dir);
    let client = restarted.http();
    let base = format!("{}/api/v1/namespaces/default/configmaps", restarted.url);
    let list: Value = client.get(&base).send_json().await;
    let stored: std::collections::HashMap<String, i64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let name = item["metadata"]["name"].as_str().unwrap().to_string();
            let version = item["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            (name, version)
        })
        .collect();
    for (name, version) in &acknowledged {
        assert_eq!(
            stored.get(name),
            Some(version),
            "acknowledged write {name} at {version} lost"
        );
    }
    let list_version: i64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(list_version >= highest);

    let next: Value = client
        .post(&base)
        .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "after-restart"}}))
        .send_json()
        .await;
    let next_version: i64 = next["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        next_version > highest,
        "version went backwards: {next_version} <= {highest}"
    );

    // A watch from before the restart cannot be resumed: 410 Gone as an ERROR event.
    let text = client
        .get(format!(
            "{base}?watch=true&resourceVersion={}&timeoutSeconds=1",
            highest - 10
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let event: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
    // A watch from the current version resumes normally.
    let response = client
        .get(format!(
            "{base}?watch=true&resourceVersion={next_version}&timeoutSeconds=1"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}
