//! Bad requests get the Kubernetes `Status` a client expects, and leave nothing behind.

use integration::{ControlPlane, SendJson};
use serde_json::{Value, json};

async fn status(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("send request");
    let code = response.status().as_u16();
    let body: Value = response.json().await.expect("a Status body");
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["code"], code, "{body}");
    (code, body)
}

#[tokio::test]
async fn errors_are_statuses_with_the_right_code_and_reason() {
    let plane = ControlPlane::start();
    let client = plane.http();
    let configmaps = format!("{}/api/v1/namespaces/default/configmaps", plane.url);

    let (code, body) = status(
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&plane.ca_pem).unwrap())
            .build()
            .unwrap()
            .get(&configmaps),
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (401, Some("Unauthorized")));

    let (code, body) = status(
        client
            .post(&configmaps)
            .header("Content-Type", "application/json")
            .body("{\"metadata\": {\"name\": "),
    )
    .await;
    assert_eq!(code, 400);
    assert!(body["message"].as_str().unwrap().contains("EOF"), "{body}");

    let (code, body) = status(
        client
            .post(format!(
                "{}/api/v1/namespaces/nowhere/configmaps",
                plane.url
            ))
            .json(&json!({"metadata": {"name": "a"}})),
    )
    .await;
    assert_eq!(
        (code, body["message"].as_str()),
        (404, Some("namespaces \"nowhere\" not found"))
    );

    let created = client
        .post(&configmaps)
        .json(&json!({"metadata": {"name": "a"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let (code, body) = status(
        client
            .post(&configmaps)
            .json(&json!({"metadata": {"name": "a"}})),
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
    assert_eq!(body["details"]["name"], "a");

    let (code, body) = status(
        client
            .post(&configmaps)
            .json(&json!({"metadata": {"name": "Not_Valid"}})),
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!(
        body["details"]["causes"][0]["field"], "metadata.name",
        "{body}"
    );

    // The server answers before reading all of an oversized body and the connection cannot
    // be reused after that, so this request gets a client of its own.
    let huge = "x".repeat(4 * 1024 * 1024);
    let (code, body) = status(
        plane
            .http()
            .post(&configmaps)
            .json(&json!({"metadata": {"name": "huge"}, "data": {"k": huge}})),
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (413, Some("RequestEntityTooLarge"))
    );

    let (code, _) = status(
        client
            .post(&configmaps)
            .header("Content-Type", "application/vnd.kubernetes.protobuf")
            .body(vec![0x6b, 0x38, 0x73, 0x00]),
    )
    .await;
    assert_eq!(code, 415);

    let (code, body) = status(client.get(format!("{configmaps}/missing"))).await;
    assert_eq!(
        (code, body["message"].as_str()),
        (404, Some("configmaps \"missing\" not found"))
    );

    let (code, body) = status(client.get(format!("{configmaps}?labelSelector=a%20in%20b"))).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) =
        status(client.get(format!("{configmaps}?fieldSelector=spec.bogus%3D1"))).await;
    assert_eq!(
        (code, body["message"].as_str()),
        (400, Some("field label not supported: spec.bogus"))
    );

    // Only the one good object exists: no error left anything behind.
    let list: Value = client.get(&configmaps).send_json().await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a"]);
}

#[tokio::test]
async fn services_get_addresses_and_conflicts_are_clear() {
    let plane = ControlPlane::start();
    let client = plane.http();
    let services = format!("{}/api/v1/namespaces/default/services", plane.url);
    let service = |name: &str, spec: Value| json!({"metadata": {"name": name}, "spec": spec});
    let created: Value = client
        .post(&services)
        .json(&service(
            "web",
            json!({"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80}]}),
        ))
        .send_json()
        .await;
    let node_port = created["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    assert!((30000..=32767).contains(&node_port), "{created}");
    let cluster_ip = created["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(cluster_ip.starts_with("10."), "{created}");

    let (code, body) = status(client.post(&services).json(&service(
        "clash",
        json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": node_port}]}),
    )))
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("provided port is already allocated"),
        "{body}"
    );
    let (code, body) = status(client.post(&services).json(&service(
        "clash",
        json!({"clusterIP": cluster_ip, "ports": [{"port": 80}]}),
    )))
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("provided IP is already allocated"),
        "{body}"
    );

    // Deleting the Service frees its port and address for the next one.
    let deleted = client
        .delete(format!("{services}/web"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let reused = client
        .post(&services)
        .json(&service("again", json!({"type": "NodePort", "clusterIP": cluster_ip, "ports": [{"port": 80, "nodePort": node_port}]})))
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), 201, "{}", reused.text().await.unwrap());
}
