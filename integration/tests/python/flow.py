"""The user flow once through the official Kubernetes Python client."""
import sys
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config(config_file=sys.argv[1])
core = client.CoreV1Api()
apps = client.AppsV1Api()
ns = "pyflow"

core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
deployment = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="web", labels={"app": "web"}),
    spec=client.V1DeploymentSpec(
        replicas=2,
        selector=client.V1LabelSelector(match_labels={"app": "web"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "web"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx:1.25")]),
        ),
    ),
)
created = apps.create_namespaced_deployment(ns, deployment)
assert created.metadata.uid, created
assert created.spec.template.spec.containers[0].image_pull_policy == "IfNotPresent", created.spec.template.spec.containers[0]

service = client.V1Service(
    metadata=client.V1ObjectMeta(name="web"),
    spec=client.V1ServiceSpec(selector={"app": "web"}, ports=[client.V1ServicePort(port=80)]),
)
created_service = core.create_namespaced_service(ns, service)
assert created_service.spec.cluster_ip, created_service.spec

core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg", labels={"app": "web"}), data={"a": "1"}))
listed = core.list_namespaced_config_map(ns, label_selector="app=web")
assert [c.metadata.name for c in listed.items] == ["cfg"], listed

apps.patch_namespaced_deployment("web", ns, {"spec": {"replicas": 4}})
scaled = apps.read_namespaced_deployment("web", ns)
assert scaled.spec.replicas == 4, scaled.spec

# A watch from the list's version sees the next change.
version = core.list_namespaced_config_map(ns).metadata.resource_version
w = watch.Watch()
core.patch_namespaced_config_map("cfg", ns, {"data": {"a": "2"}})
events = []
for event in w.stream(core.list_namespaced_config_map, ns, resource_version=version, timeout_seconds=5):
    events.append((event["type"], event["object"].data.get("a")))
    w.stop()
assert events == [("MODIFIED", "2")], events

try:
    core.read_namespaced_config_map("missing", ns)
    raise AssertionError("reading a missing object succeeded")
except ApiException as e:
    assert e.status == 404, e

core.delete_namespaced_config_map("cfg", ns)
apps.delete_namespaced_deployment("web", ns)
assert apps.list_namespaced_deployment(ns).items == []
print("python client flow ok")
