//! The real kubectl against a freshly started skiff-control: the flows a user runs.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use integration::ControlPlane;
use serde_json::Value;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.25
        ports:
        - containerPort: 80
          name: http
      - name: sidecar
        image: busybox:1.36
        command: ["sleep", "3600"]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: http
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
  labels: {app: web}
data:
  mode: fast
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
  namespace: shop
stringData:
  password: hunter2
"#;

fn apply(plane: &ControlPlane, manifest: &str) -> String {
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], manifest);
    assert!(
        output.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json(plane: &ControlPlane, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&plane.kubectl(&all)).expect("kubectl printed JSON")
}

#[test]
fn apply_creates_then_is_unchanged_then_configures() {
    let plane = ControlPlane::start();
    let created = apply(&plane, APP);
    for line in [
        "namespace/shop created",
        "deployment.apps/web created",
        "service/web created",
        "configmap/settings created",
        "secret/creds created",
    ] {
        assert!(created.contains(line), "missing {line:?} in:\n{created}");
    }
    let again = apply(&plane, APP);
    assert_eq!(again.matches("unchanged").count(), 4, "{again}");
    // As with kube-apiserver, a Secret applied with stringData always patches: the server
    // folds stringData into data, so the live object never shows what was applied.
    assert!(again.contains("secret/creds configured"), "{again}");

    let edited = APP
        .replace("replicas: 2", "replicas: 3")
        .replace("nginx:1.25", "nginx:1.26");
    let configured = apply(&plane, &edited);
    assert!(
        configured.contains("deployment.apps/web configured"),
        "{configured}"
    );
    assert!(configured.contains("service/web unchanged"), "{configured}");
    let deployment = json(&plane, &["get", "deployment", "web", "-n", "shop"]);
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.26"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][1]["name"],
        "sidecar"
    );
    assert_eq!(deployment["metadata"]["generation"], 2);

    // Removing a container from the manifest removes it from the object: kubectl's patch
    // must carry the deletion, which needs the merge keys in the OpenAPI schema.
    let without_sidecar = edited.replace(
        "      - name: sidecar\n        image: busybox:1.36\n        command: [\"sleep\", \"3600\"]\n",
        "",
    );
    assert_ne!(without_sidecar, edited);
    apply(&plane, &without_sidecar);
    let deployment = json(&plane, &["get", "deployment", "web", "-n", "shop"]);
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0]["name"], "web");

    // The Secret's stringData is stored as base64 data, as kube-apiserver stores it.
    let secret = json(&plane, &["get", "secret", "creds", "-n", "shop"]);
    assert_eq!(secret["data"]["password"], "aHVudGVyMg==");
    // The Service got a ClusterIP from the service CIDR.
    let service = json(&plane, &["get", "service", "web", "-n", "shop"]);
    assert!(
        service["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .starts_with("10."),
        "{service}"
    );
}

#[test]
fn get_prints_tables_yaml_json_and_jsonpath() {
    let plane = ControlPlane::start();
    apply(&plane, APP);

    let table = plane.kubectl(&["get", "deployments", "-n", "shop"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{table}"
    );
    let wide = plane.kubectl(&["get", "services", "-n", "shop", "-o", "wide"]);
    let header = wide.lines().next().unwrap();
    for column in [
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
        "SELECTOR",
    ] {
        assert!(header.contains(column), "{column} missing in {wide}");
    }
    assert!(
        wide.contains("80/TCP") && wide.contains("app=web"),
        "{wide}"
    );

    let yaml = plane.kubectl(&["get", "configmap", "settings", "-n", "shop", "-o", "yaml"]);
    assert!(
        yaml.contains("mode: fast") && yaml.contains("kind: ConfigMap"),
        "{yaml}"
    );
    let object = json(&plane, &["get", "configmap", "settings", "-n", "shop"]);
    assert_eq!(object["data"]["mode"], "fast");
    assert!(object["metadata"]["uid"].is_string());
    let path = plane.kubectl(&[
        "get",
        "service",
        "web",
        "-n",
        "shop",
        "-o",
        "jsonpath={.spec.ports[0].targetPort}",
    ]);
    assert_eq!(path, "http");

    let selected = plane.kubectl(&[
        "get",
        "all,configmaps",
        "-n",
        "shop",
        "-l",
        "app=web",
        "-o",
        "name",
    ]);
    // The Deployment's ReplicaSet and pods carry the label too once the controllers run;
    // the objects the manifest made must be there and nothing unlabelled may be.
    let names: Vec<&str> = selected.lines().collect();
    for expected in ["configmap/settings", "deployment.apps/web", "service/web"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with("secret/") && !n.starts_with("namespace/")),
        "{names:?}"
    );
    let none = plane.kubectl(&[
        "get",
        "configmaps",
        "-n",
        "shop",
        "-l",
        "app!=web",
        "-o",
        "name",
    ]);
    assert!(!none.contains("settings"), "{none}");

    let everywhere = plane.kubectl(&["get", "namespaces"]);
    for namespace in [
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "shop",
    ] {
        assert!(everywhere.contains(namespace), "{everywhere}");
    }
    let all_namespaces = plane.kubectl(&["get", "services", "--all-namespaces"]);
    assert!(
        all_namespaces
            .lines()
            .next()
            .unwrap()
            .starts_with("NAMESPACE"),
        "{all_namespaces}"
    );
    assert!(all_namespaces.contains("shop"), "{all_namespaces}");
}

#[test]
fn describe_shows_the_object() {
    let plane = ControlPlane::start();
    apply(&plane, APP);
    let described = plane.kubectl(&["describe", "deployment", "web", "-n", "shop"]);
    assert!(
        described.contains("Name:") && described.contains("web"),
        "{described}"
    );
    assert!(described.contains("nginx:1.25"), "{described}");
    let described = plane.kubectl(&["describe", "service", "web", "-n", "shop"]);
    assert!(
        described.contains("Selector:") && described.contains("app=web"),
        "{described}"
    );
}

#[test]
fn patch_with_every_patch_type() {
    let plane = ControlPlane::start();
    apply(&plane, APP);
    plane.kubectl(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "shop",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":5}}"#,
    ]);
    plane.kubectl(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "shop",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/metadata/labels/tier","value":"front"}]"#,
    ]);
    // A strategic merge patch updates one container by name and keeps the other.
    plane.kubectl(&[
        "patch", "deployment", "web", "-n", "shop", "--type", "strategic", "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"busybox:1.37"}]}}}}"#,
    ]);
    let deployment = json(&plane, &["get", "deployment", "web", "-n", "shop"]);
    assert_eq!(deployment["spec"]["replicas"], 5);
    assert_eq!(deployment["metadata"]["labels"]["tier"], "front");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 2, "{containers:?}");
    assert_eq!(containers[0]["image"], "nginx:1.25");
    assert_eq!(containers[1]["image"], "busybox:1.37");

    let failed = plane.kubectl_output(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "shop",
        "--type",
        "json",
        "-p",
        r#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
    ]);
    assert!(!failed.status.success());
}

#[test]
fn label_annotate_and_scale() {
    let plane = ControlPlane::start();
    apply(&plane, APP);
    plane.kubectl(&["label", "configmap", "settings", "-n", "shop", "team=blue"]);
    plane.kubectl(&[
        "annotate",
        "configmap",
        "settings",
        "-n",
        "shop",
        "owner=ops",
    ]);
    let object = json(&plane, &["get", "configmap", "settings", "-n", "shop"]);
    assert_eq!(object["metadata"]["labels"]["team"], "blue");
    assert_eq!(object["metadata"]["annotations"]["owner"], "ops");
    plane.kubectl(&["label", "configmap", "settings", "-n", "shop", "team-"]);
    let object = json(&plane, &["get", "configmap", "settings", "-n", "shop"]);
    assert!(object["metadata"]["labels"].get("team").is_none());
    let relabel =
        plane.kubectl_output(&["label", "configmap", "settings", "-n", "shop", "app=other"]);
    assert!(
        !relabel.status.success(),
        "relabel without --overwrite must fail"
    );

    let scaled = plane.kubectl(&[
        "scale",
        "deployment",
        "web",
        "-n",
        "shop",
        "--replicas",
        "7",
    ]);
    assert!(scaled.contains("deployment.apps/web scaled"), "{scaled}");
    let deployment = json(&plane, &["get", "deployment", "web", "-n", "shop"]);
    assert_eq!(deployment["spec"]["replicas"], 7);
}

#[test]
fn delete_by_name_label_and_file() {
    let plane = ControlPlane::start();
    apply(&plane, APP);
    for name in ["a", "b", "c"] {
        plane.kubectl(&[
            "create",
            "configmap",
            name,
            "-n",
            "shop",
            "--from-literal=k=v",
        ]);
    }
    plane.kubectl(&["label", "configmap", "a", "b", "-n", "shop", "batch=1"]);
    let deleted = plane.kubectl(&["delete", "configmaps", "-n", "shop", "-l", "batch=1"]);
    assert!(
        deleted.contains("configmap \"a\" deleted") && deleted.contains("configmap \"b\" deleted"),
        "{deleted}"
    );
    plane.kubectl(&["delete", "configmap", "c", "-n", "shop"]);
    let left = plane.kubectl(&["get", "configmaps", "-n", "shop", "-o", "name"]);
    assert_eq!(left.trim(), "configmap/settings");

    let output = plane.kubectl_stdin(
        &["delete", "-f", "-"],
        &APP.replace(
            "kind: Namespace\nmetadata:\n  name: shop\n---",
            "kind: Namespace\nmetadata:\n  name: keep\n---",
        ),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("deployment.apps \"web\" deleted"),
        "{stdout}"
    );
    let missing = plane.kubectl_output(&["get", "deployment", "web", "-n", "shop"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("\"web\" not found"),
        "{stderr}"
    );
}

#[test]
fn watch_sees_added_modified_and_deleted() {
    let plane = ControlPlane::start();
    let mut watcher = plane
        .kubectl_command()
        .args([
            "get",
            "configmaps",
            "-n",
            "default",
            "--watch-only",
            "--output-watch-events",
            "--no-headers",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl get -w");
    let stdout = watcher.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    // Give the watch a moment to be established before the first write.
    std::thread::sleep(Duration::from_millis(1500));
    plane.kubectl(&["create", "configmap", "watched", "--from-literal=a=1"]);
    plane.kubectl(&["label", "configmap", "watched", "x=y"]);
    plane.kubectl(&["delete", "configmap", "watched"]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 3 && Instant::now() < deadline {
        if let Ok(line) = receiver.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    let kinds: Vec<&str> = seen
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"], "{seen:?}");
    assert!(
        seen.iter()
            .all(|l| l.split_whitespace().nth(1) == Some("watched")),
        "{seen:?}"
    );
}

#[test]
fn invalid_manifests_name_the_field() {
    let plane = ControlPlane::start();
    let missing_image =
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n  - name: app\n";
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], missing_image);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("The Pod \"bad\" is invalid")
            && stderr.contains("spec.containers[0].image: Required value"),
        "{stderr}"
    );

    let bad_name = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Bad_Name\n";
    let output = plane.kubectl_stdin(&["create", "-f", "-"], bad_name);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("metadata.name: Invalid value: \"Bad_Name\""),
        "{stderr}"
    );

    let unknown_field =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: typo\ndatta:\n  a: b\n";
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], unknown_field);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown field \"datta\""), "{stderr}");

    let no_namespace =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: lost\n  namespace: nowhere\n";
    let output = plane.kubectl_stdin(&["apply", "-f", "-"], no_namespace);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("namespaces \"nowhere\" not found"),
        "{stderr}"
    );
    // Nothing was half-written.
    let missing = plane.kubectl_output(&["get", "pod", "bad"]);
    assert!(!missing.status.success());
}

#[test]
fn deleting_a_namespace_removes_its_contents() {
    let plane = ControlPlane::start();
    apply(&plane, APP);
    let deleted = plane.kubectl(&["delete", "namespace", "shop", "--timeout=30s"]);
    assert!(deleted.contains("namespace \"shop\" deleted"), "{deleted}");
    let gone = plane.kubectl_output(&["get", "namespace", "shop"]);
    assert!(
        !gone.status.success(),
        "namespace still there after kubectl delete waited"
    );
    let left = plane.kubectl(&[
        "get",
        "deployments,services,configmaps,secrets",
        "-A",
        "-o",
        "name",
    ]);
    assert!(left.trim().is_empty(), "objects left behind: {left}");
    // The freed ClusterIP can be used again: nothing leaked in the allocator.
    let recreated = plane.kubectl_stdin(&["apply", "-f", "-"], APP);
    assert!(
        recreated.status.success(),
        "{}",
        String::from_utf8_lossy(&recreated.stderr)
    );
}
