//! List paging, selectors and watch semantics through the raw HTTPS API, as client-go and
//! kube-rs rely on them.

use std::time::Duration;

use futures::StreamExt;
use integration::{ControlPlane, SendJson};
use serde_json::{Value, json};

async fn create_configmap(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    labels: Value,
) -> Value {
    let response = client
        .post(base)
        .json(&json!({"metadata": {"name": name, "labels": labels}, "data": {"k": name}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

/// Reads newline-delimited watch events until `count` arrived or the stream ends.
async fn watch_events(response: reqwest::Response, count: usize) -> Vec<Value> {
    let mut stream = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut events = Vec::new();
    while events.len() < count {
        let chunk = match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            _ => break,
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            events.push(serde_json::from_slice(&line).unwrap());
        }
    }
    events
}

#[tokio::test]
async fn list_pages_with_limit_and_continue() {
    let plane = ControlPlane::start();
    let client = plane.http();
    let base = format!("{}/api/v1/namespaces/default/configmaps", plane.url);
    for i in 0..7 {
        create_configmap(
            &client,
            &base,
            &format!("cm-{i}"),
            json!({"parity": (i % 2).to_string()}),
        )
        .await;
    }
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let url = format!("{base}?limit=3&continue={token}");
        let page: Value = client.get(&url).send_json().await;
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            names.push(item["metadata"]["name"].as_str().unwrap().to_string());
        }
        match page["metadata"]["continue"].as_str() {
            Some(next) if !next.is_empty() => token = next.to_string(),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, (0..7).map(|i| format!("cm-{i}")).collect::<Vec<_>>());

    // The limit counts matching objects, not scanned ones.
    let odd: Value = client
        .get(format!("{base}?labelSelector=parity%3D1&limit=2"))
        .send_json()
        .await;
    let odd_names: Vec<&str> = odd["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(odd_names, ["cm-1", "cm-3"]);
    assert!(odd["metadata"]["continue"].is_string());

    let by_name: Value = client
        .get(format!("{base}?fieldSelector=metadata.name%3Dcm-4"))
        .send_json()
        .await;
    assert_eq!(by_name["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn watch_replays_from_a_version_and_follows_selector_transitions() {
    let plane = ControlPlane::start();
    let client = plane.http();
    let base = format!("{}/api/v1/namespaces/default/configmaps", plane.url);
    let first = create_configmap(&client, &base, "a", json!({"app": "web"})).await;
    let version = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // Writes after `version`: a new match, a label change out of the selector, a delete.
    create_configmap(&client, &base, "b", json!({"app": "web"})).await;
    let patch = |name: &str, labels: Value| {
        client
            .patch(format!("{base}/{name}"))
            .header("Content-Type", "application/merge-patch+json")
            .body(json!({"metadata": {"labels": labels}}).to_string())
            .send()
    };
    assert_eq!(
        patch("a", json!({"app": "db"})).await.unwrap().status(),
        200
    );
    assert_eq!(
        client
            .delete(format!("{base}/b"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let response = client
        .get(format!(
            "{base}?watch=1&resourceVersion={version}&labelSelector=app%3Dweb&timeoutSeconds=5"
        ))
        .send()
        .await
        .unwrap();
    let events = watch_events(response, 3).await;
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let expected = [("ADDED", "b"), ("DELETED", "a"), ("DELETED", "b")];
    assert_eq!(
        summary,
        expected.map(|(t, n)| (t.to_string(), n.to_string()))
    );
    let versions: Vec<i64> = events
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
}

#[tokio::test]
async fn watch_list_sends_initial_events_then_a_bookmark() {
    let plane = ControlPlane::start();
    let client = plane.http();
    let base = format!("{}/api/v1/namespaces/default/configmaps", plane.url);
    create_configmap(&client, &base, "one", json!({})).await;
    create_configmap(&client, &base, "two", json!({})).await;
    let response = client
        .get(format!(
            "{base}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=5"
        ))
        .send()
        .await
        .unwrap();
    let events = watch_events(response, 3).await;
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[1]["type"], "ADDED");
    assert_eq!(events[2]["type"], "BOOKMARK");
    assert_eq!(
        events[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(events[2]["object"]["kind"], "ConfigMap");
}
