//! The agent's image service against a real containerd and a real registry: pulls (and
//! pulls that change nothing), pull policies, the errors a pod would show, archive imports,
//! and a container run from an unpacked image through containerd's native API.
//!
//! Root only: each test starts its own containerd in a private mount namespace
//! (`integration::containerd`) and, when it needs one, its own registry on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use integration::containerd::Containerd;
use integration::oci_image::{BuiltImage, ImageBuilder};
use integration::registry::{Registry, skopeo_copy};
use skiff_agent::containerd::api::snapshots::{
    Kind, ListSnapshotsRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use skiff_agent::containerd::api::{GetImageRequest, InfoRequest, ListContentRequest, ListRequest};
use skiff_agent::containerd::{Client, RUNC_RUNTIME, api};
use skiff_agent::image::{
    Credentials, ImageError, ImageInfo, ImageService, PullPolicy, RegistryConfig,
};

const GREETING: &[u8] = b"hello from layer two\n";

/// The test image: busybox, then a layer with a greeting, Cmd printing it and an Env.
fn test_image() -> ImageBuilder {
    ImageBuilder::busybox()
        .layer(&[("etc/greeting", GREETING)])
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["cat /etc/greeting; echo \"name=$NAME\""])
        .env("NAME=skiff")
        .working_dir("/tmp")
}

struct Setup {
    containerd: Containerd,
    client: Client,
    _scratch: tempfile::TempDir,
    scratch: std::path::PathBuf,
}

async fn setup() -> Setup {
    let containerd = tokio::task::spawn_blocking(Containerd::start)
        .await
        .unwrap();
    let client = Client::connect(&containerd.socket, containerd.namespace())
        .await
        .expect("connect to containerd");
    let scratch = tempfile::Builder::new()
        .prefix("skiff-images-test-")
        .tempdir()
        .unwrap();
    Setup {
        containerd,
        client,
        scratch: scratch.path().to_path_buf(),
        _scratch: scratch,
    }
}

fn images(client: &Client, registry: Option<&Registry>) -> ImageService {
    let config = RegistryConfig {
        plain_http: registry.map(|r| r.address.clone()).into_iter().collect(),
        ..Default::default()
    };
    ImageService::new(client.clone(), config)
}

/// Starts a registry holding the test image as `app:v1`.
fn registry_with_image(scratch: &Path) -> (Registry, BuiltImage) {
    let registry = Registry::start();
    let layout = scratch.join("layout");
    let built = test_image().write_layout(&layout, "v1");
    registry.push_layout(&layout, "v1", "app:v1");
    (registry, built)
}

async fn leases(client: &Client) -> Vec<String> {
    client
        .leases()
        .list(ListRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .leases
        .into_iter()
        .map(|lease| lease.id)
        .collect()
}

async fn content_labels(
    client: &Client,
    digest: &str,
) -> std::collections::HashMap<String, String> {
    client
        .content()
        .info(InfoRequest {
            digest: digest.to_string(),
        })
        .await
        .unwrap_or_else(|status| panic!("content {digest}: {status:?}"))
        .into_inner()
        .info
        .unwrap()
        .labels
}

async fn snapshot_names(client: &Client) -> Vec<String> {
    let mut stream = client
        .snapshots()
        .list(ListSnapshotsRequest {
            snapshotter: "overlayfs".into(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        names.extend(page.info.into_iter().map(|info| info.name));
    }
    names.sort();
    names
}

async fn content_digests(client: &Client) -> Vec<(String, Option<prost_types::Timestamp>)> {
    let mut stream = client
        .content()
        .list(ListContentRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner();
    let mut digests = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        digests.extend(
            page.info
                .into_iter()
                .map(|info| (info.digest, info.updated_at)),
        );
    }
    digests.sort_by(|a, b| a.0.cmp(&b.0));
    digests
}

/// Creates the container `id` from the image (its env and working directory, `args`, no
/// resources, under the harness's cgroup parent) and its task with stdio to files; returns
/// the task's pid.
#[allow(clippy::too_many_arguments)]
async fn create_task(
    setup: &Setup,
    service: &ImageService,
    info: &ImageInfo,
    id: &str,
    args: Vec<String>,
    mounts: Vec<skiff_agent::containerd::types::Mount>,
    stdout: &Path,
    stderr: &Path,
) -> u32 {
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(args));
    process.set_env(Some(info.config.env.clone()));
    process.set_cwd(info.config.working_dir.clone().into());
    spec.set_process(Some(process));
    spec.set_hostname(Some(id.to_string()));
    let mut root = spec.root().clone().unwrap();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    let mut linux = spec.linux().clone().unwrap();
    linux.set_resources(None);
    linux.set_cgroups_path(Some(
        format!("/{}/{id}", setup.containerd.cgroup_parent()).into(),
    ));
    spec.set_linux(Some(linux));

    let container = api::Container {
        id: id.to_string(),
        image: info.name.clone(),
        runtime: Some(api::container::Runtime {
            name: RUNC_RUNTIME.to_string(),
            options: None,
        }),
        spec: Some(skiff_agent::containerd::runtime_spec_any(&spec).unwrap()),
        snapshotter: service.snapshotter().to_string(),
        snapshot_key: id.to_string(),
        ..Default::default()
    };
    setup
        .client
        .containers()
        .create(api::CreateContainerRequest {
            container: Some(container),
        })
        .await
        .expect("create container");
    let created = setup
        .client
        .tasks()
        .create(api::CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts,
            stdout: format!("file://{}", stdout.display()),
            stderr: format!("file://{}", stderr.display()),
            ..Default::default()
        })
        .await
        .expect("create task")
        .into_inner();
    assert!(created.pid > 0);
    created.pid
}

fn check_info(info: &ImageInfo, name: &str, built: &BuiltImage) {
    assert_eq!(info.name, name);
    assert_eq!(
        info.id, built.config_digest,
        "the image ID is the config digest"
    );
    assert_eq!(info.manifest.digest, built.manifest_digest);
    assert_eq!(info.diff_ids, built.diff_ids);
    assert_eq!(info.chain_id, built.chain_id);
    assert_eq!(info.config.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(info.config.cmd, ["cat /etc/greeting; echo \"name=$NAME\""]);
    assert!(
        info.config.env.contains(&"NAME=skiff".to_string()),
        "{:?}",
        info.config.env
    );
    assert_eq!(info.config.working_dir, "/tmp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_stores_content_record_and_snapshots() {
    let setup = setup().await;
    let (registry, built) = registry_with_image(&setup.scratch);
    let service = images(&setup.client, Some(&registry));
    let name = format!("{}/app:v1", registry.address);

    let started = Instant::now();
    let info = service
        .ensure(&name, PullPolicy::Always)
        .await
        .expect("pull");
    let pull_time = started.elapsed();
    eprintln!(
        "first pull (fetch 2 layers, {} bytes, and unpack): {pull_time:?}",
        info.size
    );
    check_info(&info, &name, &built);
    assert_eq!(
        info.repo_digest,
        format!("{}/app@{}", registry.address, built.manifest_digest)
    );

    // The image record points at the manifest.
    let record = setup
        .client
        .images()
        .get(GetImageRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    let target = record.target.unwrap();
    assert_eq!(target.digest, built.manifest_digest);
    assert_eq!(
        target.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(target.size, built.manifest_size);

    // The manifest's labels keep config and layers; the config's keeps the snapshot.
    let labels = content_labels(&setup.client, &built.manifest_digest).await;
    assert_eq!(
        labels["containerd.io/gc.ref.content.config"],
        built.config_digest
    );
    assert_eq!(
        labels["containerd.io/gc.ref.content.l.0"],
        built.layer_digests[0]
    );
    assert_eq!(
        labels["containerd.io/gc.ref.content.l.1"],
        built.layer_digests[1]
    );
    let labels = content_labels(&setup.client, &built.config_digest).await;
    assert_eq!(
        labels["containerd.io/gc.ref.snapshot.overlayfs"],
        built.chain_id
    );
    for (layer, diff_id) in built.layer_digests.iter().zip(&built.diff_ids) {
        let labels = content_labels(&setup.client, layer).await;
        assert_eq!(&labels["containerd.io/uncompressed"], diff_id);
        let source = format!("containerd.io/distribution.source.{}", registry.address);
        assert_eq!(labels[&source], "app");
    }

    // Both chains are committed snapshots, the top one on the bottom one.
    let stat = |key: String| {
        let client = setup.client.clone();
        async move {
            client
                .snapshots()
                .stat(StatSnapshotRequest {
                    snapshotter: "overlayfs".into(),
                    key,
                })
                .await
                .unwrap()
                .into_inner()
                .info
                .unwrap()
        }
    };
    let top = stat(built.chain_id.clone()).await;
    assert_eq!(top.kind, Kind::Committed as i32);
    assert_eq!(top.parent, built.diff_ids[0]);
    let bottom = stat(built.diff_ids[0].clone()).await;
    assert_eq!(bottom.kind, Kind::Committed as i32);
    assert_eq!(bottom.parent, "");
    assert_eq!(
        snapshot_names(&setup.client).await.len(),
        2,
        "no extraction snapshot is left"
    );
    assert!(
        leases(&setup.client).await.is_empty(),
        "the pull's lease is gone"
    );

    // ctr sees the same image.
    let listed = setup.containerd.ctr(&["images", "ls", "-q"]);
    assert_eq!(listed.trim(), name);

    // A second pull asks the registry and changes nothing.
    let content_before = content_digests(&setup.client).await;
    let started = Instant::now();
    let again = service
        .ensure(&name, PullPolicy::Always)
        .await
        .expect("pull again");
    let again_time = started.elapsed();
    eprintln!("second pull (nothing to do): {again_time:?}");
    assert_eq!(again, info);
    assert_eq!(
        content_digests(&setup.client).await,
        content_before,
        "no blob was written or relabelled"
    );
    assert_eq!(snapshot_names(&setup.client).await.len(), 2);
    assert!(
        leases(&setup.client).await.is_empty(),
        "a no-op pull makes no lease"
    );

    // Snapshots removed behind the agent's back are unpacked again from the content store
    // without the registry. Once the top one is gone, containerd's garbage collector may
    // take the bottom one (no longer anyone's parent) before the test asks: gone is gone.
    for key in [built.chain_id.clone(), built.diff_ids[0].clone()] {
        let removed = setup
            .client
            .snapshots()
            .remove(RemoveSnapshotRequest {
                snapshotter: "overlayfs".into(),
                key: key.clone(),
            })
            .await;
        if let Err(status) = removed {
            assert_eq!(
                status.code(),
                skiff_agent::containerd::Code::NotFound,
                "remove snapshot {key}: {status}"
            );
        }
    }
    assert_eq!(
        snapshot_names(&setup.client).await.len(),
        0,
        "both snapshots are gone"
    );
    drop(registry);
    let started = Instant::now();
    let unpacked = service.get(&name).await.unwrap().expect("image is present");
    eprintln!(
        "unpack of 2 layers from the content store: {:?}",
        started.elapsed()
    );
    assert_eq!(unpacked, info);
    assert_eq!(snapshot_names(&setup.client).await.len(), 2);
    assert!(leases(&setup.client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_policies() {
    let setup = setup().await;
    let (mut registry, built) = registry_with_image(&setup.scratch);
    let service = images(&setup.client, Some(&registry));
    let name = format!("{}/app:v1", registry.address);

    // Never with a missing image is the kubelet's ErrImageNeverPull.
    let error = service.ensure(&name, PullPolicy::Never).await.unwrap_err();
    assert!(matches!(error, ImageError::NeverPull { .. }), "{error:?}");
    assert_eq!(error.kubelet_reason(), "ErrImageNeverPull");
    assert_eq!(
        error.to_string(),
        format!("container image \"{name}\" is not present with pull policy of Never")
    );
    assert!(service.get(&name).await.unwrap().is_none());

    // IfNotPresent pulls what is missing.
    let info = service
        .ensure(&name, PullPolicy::IfNotPresent)
        .await
        .expect("pull");
    check_info(&info, &name, &built);

    // With the registry gone, present images still satisfy IfNotPresent and Never, and
    // Always fails because it must ask the registry.
    registry.kill();
    let present = service
        .ensure(&name, PullPolicy::IfNotPresent)
        .await
        .expect("IfNotPresent");
    assert_eq!(present, info);
    let present = service
        .ensure(&name, PullPolicy::Never)
        .await
        .expect("Never");
    assert_eq!(present, info);
    let error = service.ensure(&name, PullPolicy::Always).await.unwrap_err();
    assert!(matches!(error, ImageError::Unreachable { .. }), "{error:?}");
    assert_eq!(error.kubelet_reason(), "ErrImagePull");

    // The short name resolves the same way the kubelet's does.
    let error = service
        .ensure("app:v1", PullPolicy::Never)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "container image \"docker.io/library/app:v1\" is not present with pull policy of Never"
    );
    let error = service
        .ensure("App:v1", PullPolicy::Always)
        .await
        .unwrap_err();
    assert_eq!(error.kubelet_reason(), "InvalidImageName");

    // A removed record is pulled again (IfNotPresent); the registry is needed for that.
    service.remove(&name).await.unwrap();
    service
        .remove(&name)
        .await
        .expect("removing a missing image is success");
    assert!(service.get(&name).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_errors_carry_the_reason() {
    let setup = setup().await;
    let (registry, _built) = registry_with_image(&setup.scratch);
    let service = images(&setup.client, Some(&registry));

    // A tag the repository does not have.
    let missing = format!("{}/app:nope", registry.address);
    let error = service
        .ensure(&missing, PullPolicy::IfNotPresent)
        .await
        .unwrap_err();
    assert!(matches!(error, ImageError::NotFound { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!("pull {missing}: manifest unknown: manifest unknown (404)")
    );
    assert_eq!(error.kubelet_reason(), "ErrImagePull");

    // A repository the registry does not have.
    let missing = format!("{}/nothing/here:1", registry.address);
    let error = service.pull(&missing).await.unwrap_err();
    assert!(matches!(error, ImageError::NotFound { .. }), "{error:?}");
    eprintln!("missing repository: {error}");
    assert!(
        error.to_string().starts_with(&format!("pull {missing}: ")),
        "{error}"
    );
    assert!(error.to_string().ends_with("(404)"), "{error}");

    // A digest the registry does not have.
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let error = service
        .pull(&format!("{}/app@{digest}", registry.address))
        .await
        .unwrap_err();
    assert!(matches!(error, ImageError::NotFound { .. }), "{error:?}");

    // Nothing is left behind by failed pulls.
    assert!(leases(&setup.client).await.is_empty());
    assert!(snapshot_names(&setup.client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_unauthorized_registries() {
    let setup = setup().await;
    // A loopback port nobody listens on.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let service = ImageService::new(
        setup.client.clone(),
        RegistryConfig {
            plain_http: vec![address.clone()],
            ..Default::default()
        },
    );
    let name = format!("{address}/app:v1");
    let error = service.pull(&name).await.unwrap_err();
    eprintln!("unreachable: {error}");
    match &error {
        ImageError::Unreachable {
            registry, reason, ..
        } => {
            assert_eq!(registry, &address);
            assert!(reason.contains("Connection refused"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(
        error
            .to_string()
            .starts_with(&format!("pull {name}: registry {address} unreachable: "))
    );

    // A registry that wants credentials skiff does not have.
    let registry = Registry::start_with_basic_auth();
    let service = images(&setup.client, Some(&registry));
    let name = format!("{}/app:v1", registry.address);
    let error = service.pull(&name).await.unwrap_err();
    eprintln!("unauthorized: {error}");
    assert!(
        matches!(error, ImageError::Unauthorized { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(&format!("pull {name}: unauthorized: ")),
        "{error}"
    );
    assert!(error.to_string().ends_with("(401)"), "{error}");

    // HTTPS to a plain HTTP registry fails as unreachable (no TLS handshake), not as a hang.
    let service = images(&setup.client, None);
    let error = tokio::time::timeout(Duration::from_secs(30), service.pull(&name))
        .await
        .expect("no hang")
        .unwrap_err();
    eprintln!("https to an http registry: {error}");
    assert_eq!(error.kubelet_reason(), "ErrImagePull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_with_credentials_try_each_until_one_is_let_in() {
    let setup = setup().await;
    let registry = Registry::start_with_user("puller", "s3cret-pw");
    let layout = tempfile::tempdir().expect("temp dir");
    ImageBuilder::busybox().write_layout(layout.path(), "4");
    registry.push_layout_as(layout.path(), "4", "private/app:v4", "puller:s3cret-pw");
    let service = images(&setup.client, Some(&registry));
    let name = registry.reference("private/app:v4");
    let user = |password: &str| Credentials {
        username: "puller".into(),
        password: password.into(),
    };
    // The registry checks the password (Basic auth, as its htpasswd challenge asks).
    let error = service
        .pull_with_credentials(&name, &[user("wrong")])
        .await
        .unwrap_err();
    assert!(
        matches!(error, ImageError::Unauthorized { .. }),
        "{error:?}"
    );
    assert!(error.to_string().ends_with("(401)"), "{error}");
    // As the kubelet does, each matching credential is tried in turn.
    let info = service
        .pull_with_credentials(&name, &[user("wrong"), user("s3cret-pw")])
        .await
        .expect("pull with the second credentials");
    assert!(info.id.starts_with("sha256:"), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_archives() {
    let setup = setup().await;
    let service = images(&setup.client, None);
    let layout = setup.scratch.join("layout");
    let built = test_image().write_layout(&layout, "v1");

    // An OCI archive as skopeo writes it, named by its ref.name annotation.
    let archive = setup.scratch.join("skopeo-oci.tar");
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("oci-archive:{}:localhost/imported:v1", archive.display()),
    );
    let started = Instant::now();
    let imported = service
        .import_archive(&archive, None)
        .await
        .expect("import OCI archive");
    eprintln!(
        "import of an OCI archive (with unpack): {:?}",
        started.elapsed()
    );
    assert_eq!(imported.len(), 1);
    check_info(&imported[0], "localhost/imported:v1", &built);
    assert_eq!(imported[0].target.digest, built.manifest_digest);
    let found = service
        .ensure("localhost/imported:v1", PullPolicy::Never)
        .await
        .expect("imported image is present");
    assert_eq!(found, imported[0]);
    let labels = content_labels(&setup.client, &built.manifest_digest).await;
    assert_eq!(
        labels["containerd.io/gc.ref.content.config"],
        built.config_digest
    );
    assert!(leases(&setup.client).await.is_empty());

    // The archive this crate writes, whose ref.name is a bare tag: a tag of the base name.
    let archive = setup.scratch.join("rust-oci.tar");
    let same = test_image().write_archive(&archive, "v2");
    assert_eq!(same.manifest_digest, built.manifest_digest);
    let imported = service
        .import_archive(&archive, Some("localhost/based"))
        .await
        .expect("import with a base name");
    assert_eq!(imported[0].name, "localhost/based:v2");

    // A Docker archive of the same image: a new manifest, the same layers and snapshots.
    let archive = setup.scratch.join("docker.tar");
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!(
            "docker-archive:{}:localhost/dockerish:v3",
            archive.display()
        ),
    );
    let snapshots_before = snapshot_names(&setup.client).await;
    let imported = service
        .import_archive(&archive, None)
        .await
        .expect("import Docker archive");
    assert_eq!(imported.len(), 1);
    let docker = &imported[0];
    assert_eq!(docker.name, "localhost/dockerish:v3");
    assert_eq!(
        docker.manifest.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(docker.diff_ids, built.diff_ids);
    assert_eq!(docker.chain_id, built.chain_id);
    assert_eq!(
        docker.config.cmd,
        ["cat /etc/greeting; echo \"name=$NAME\""]
    );
    assert_eq!(
        snapshot_names(&setup.client).await,
        snapshots_before,
        "layers were unpacked once"
    );

    // Garbage is refused with the file's name.
    let junk = setup.scratch.join("junk.tar");
    std::fs::write(&junk, b"not a tar at all").unwrap();
    let error = service.import_archive(&junk, None).await.unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with(&format!("import {}: ", junk.display())),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_runs_from_pulled_image() {
    let setup = setup().await;
    let (registry, built) = registry_with_image(&setup.scratch);
    let service = images(&setup.client, Some(&registry));
    let name = format!("{}/app:v1", registry.address);
    let info = service
        .ensure(&name, PullPolicy::IfNotPresent)
        .await
        .expect("pull");

    let id = "greeter";
    let started = Instant::now();
    let mounts = service
        .prepare_rootfs(&info.chain_id, id)
        .await
        .expect("prepare rootfs");
    eprintln!("prepare rootfs: {:?}", started.elapsed());
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].r#type, "overlay");
    let again = service
        .prepare_rootfs(&info.chain_id, id)
        .await
        .expect("prepare again");
    assert_eq!(
        again, mounts,
        "preparing an existing rootfs returns its mounts"
    );

    let stdout = setup.scratch.join("stdout");
    let stderr = setup.scratch.join("stderr");
    let mut args = info.config.entrypoint.clone();
    args.extend(info.config.cmd.clone());
    let started = Instant::now();
    let pid = create_task(&setup, &service, &info, id, args, mounts, &stdout, &stderr).await;
    // runc placed the container in the cgroup2 hierarchy only.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2_path = format!("0::/{}/{id}", setup.containerd.cgroup_parent());
    assert!(cgroup.lines().any(|line| line == v2_path), "{cgroup}");
    let mut tasks = setup.client.tasks();
    let wait = {
        let mut tasks = setup.client.tasks();
        let id = id.to_string();
        // Wait is asked before Start so the exit cannot be missed.
        tokio::spawn(async move {
            tasks
                .wait(api::WaitRequest {
                    container_id: id,
                    exec_id: String::new(),
                })
                .await
        })
    };
    tasks
        .start(api::StartRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        })
        .await
        .expect("start task");
    let exited = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("task exits")
        .unwrap()
        .expect("wait")
        .into_inner();
    eprintln!("task create, start and exit: {:?}", started.elapsed());
    let deleted = tasks
        .delete(api::DeleteTaskRequest {
            container_id: id.to_string(),
        })
        .await
        .expect("delete task")
        .into_inner();
    let output = std::fs::read_to_string(&stdout).unwrap_or_default();
    let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(exited.exit_status, 0, "stdout: {output}\nstderr: {errors}");
    assert_eq!(deleted.exit_status, 0);
    assert_eq!(
        output,
        format!("{}name=skiff\n", String::from_utf8_lossy(GREETING))
    );

    // Clean up: container record, then the rootfs (twice: removing is idempotent).
    setup
        .client
        .containers()
        .delete(api::DeleteContainerRequest { id: id.to_string() })
        .await
        .expect("delete container");
    service.remove_rootfs(id).await.expect("remove rootfs");
    service
        .remove_rootfs(id)
        .await
        .expect("remove a missing rootfs");
    assert_eq!(snapshot_names(&setup.client).await, {
        let mut committed = vec![built.diff_ids[0].clone(), built.chain_id.clone()];
        committed.sort();
        committed
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_cleans_up_running_containers() {
    let setup = setup().await;
    let service = images(&setup.client, None);
    let archive = setup.scratch.join("image.tar");
    test_image().write_archive(&archive, "v1");
    let info = service
        .import_archive(&archive, Some("localhost/sleeper"))
        .await
        .expect("import")
        .remove(0);
    let mounts = service
        .prepare_rootfs(&info.chain_id, "sleeper")
        .await
        .unwrap();
    let stdout = setup.scratch.join("out");
    let args = vec!["sleep".to_string(), "1000".to_string()];
    let pid = create_task(
        &setup, &service, &info, "sleeper", args, mounts, &stdout, &stdout,
    )
    .await;
    setup
        .client
        .tasks()
        .start(api::StartRequest {
            container_id: "sleeper".into(),
            exec_id: String::new(),
        })
        .await
        .unwrap();
    let shims: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let cmdline = String::from_utf8_lossy(&cmdline);
                // The harness finds shims by this argument even outside containerd's
                // mount namespace.
                cmdline.contains("containerd-shim-runc-v2")
                    && cmdline.contains(&format!(
                        "\0-address\0{}\0",
                        setup.containerd.socket.display()
                    ))
            })
        })
        .collect();
    assert_eq!(shims.len(), 1, "one shim for the one container");
    let cgroup = integration::containerd::cgroup2_root()
        .unwrap()
        .join(setup.containerd.cgroup_parent());
    assert!(cgroup.join("sleeper").exists());
    let dir = setup.containerd.dir.clone();

    // Everything goes with the harness: containerd, the shim, the container, its cgroup,
    // the temp dir.
    let Setup { containerd, .. } = setup;
    tokio::task::spawn_blocking(move || drop(containerd))
        .await
        .unwrap();
    for pid in shims.iter().chain([&pid]) {
        assert!(
            !integration::containerd::process_alive(*pid),
            "process {pid} survived: {}",
            std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default(),
        );
    }
    assert!(!cgroup.exists(), "{} survived", cgroup.display());
    assert!(!dir.exists(), "{} survived", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image() {
    let setup = setup().await;
    let (registry, built) = registry_with_image(&setup.scratch);
    let service = images(&setup.client, Some(&registry));
    let name = format!("{}/app:v1", registry.address);
    // As a kubelet with parallel pulls does when several pods start at once: every pull
    // succeeds, content is written once and each layer is committed once.
    let pulls = (0..4).map(|_| service.ensure(&name, PullPolicy::Always));
    let infos = futures::future::join_all(pulls).await;
    for info in infos {
        check_info(&info.expect("concurrent pull"), &name, &built);
    }
    assert_eq!(snapshot_names(&setup.client).await.len(), 2);
    assert!(leases(&setup.client).await.is_empty());
}
