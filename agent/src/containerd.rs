//! The agent's connection to containerd: one gRPC channel over containerd's Unix socket and
//! the service clients, each of which stamps every request with the agent's containerd
//! namespace (and, inside a lease, the lease) as containerd's own Go client does.
//!
//! The generated API (`containerd-client`, protos of containerd's `api/`) is re-exported as
//! [`api`] and [`types`], so the rest of the agent and its tests need no other path to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// gRPC status codes, for callers that tell a missing object from a failure.
pub use containerd_client::tonic::Code;
use containerd_client::tonic::metadata::AsciiMetadataValue;
use containerd_client::tonic::service::Interceptor;
use containerd_client::tonic::service::interceptor::InterceptedService;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{self, Status};

pub use containerd_client::services::v1 as api;
pub use containerd_client::types;

/// The containerd namespace skiff keeps its images, containers and tasks in.
pub const DEFAULT_NAMESPACE: &str = "skiff";

/// Where a packaged containerd listens.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

/// The gRPC metadata key containerd reads the namespace of a request from.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// The gRPC metadata key containerd reads the lease of a request from: every content blob
/// and snapshot a request creates is then held by that lease until it is deleted.
const LEASE_HEADER: &str = "containerd-lease";

/// The largest gRPC message accepted from containerd; containerd's own send limit.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// The type URL containerd registers for an OCI runtime spec carried in a `google.protobuf.Any`.
pub const RUNTIME_SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// The runc shim, containerd's default runtime.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to containerd at {}: {}", socket.display(), error_chain(source))]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("invalid containerd {what} {value:?}: not a valid gRPC metadata value")]
    InvalidMetadata { what: &'static str, value: String },
    #[error("containerd {call}: {}", status_text(status))]
    Call {
        call: &'static str,
        status: Box<Status>,
    },
    #[error("encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

impl Error {
    /// The gRPC code of a failed call; `None` for errors that never reached containerd.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }

    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(Code::AlreadyExists)
    }
}

/// Turns a failed gRPC call into an [`Error`] naming the call, for `map_err`:
/// `client.images().get(request).await.map_err(call_error("Images.Get"))?`.
pub fn call_error(call: &'static str) -> impl FnOnce(Status) -> Error {
    move |status| Error::Call {
        call,
        status: Box::new(status),
    }
}

fn status_text(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    }
}

/// An error and its sources, joined with ": ", as the agent prints errors.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Adds the namespace, and the lease if any, to every request of a service client.
#[derive(Clone, Debug)]
pub struct RequestMetadata {
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Interceptor for RequestMetadata {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(NAMESPACE_HEADER, self.namespace.clone());
        if let Some(lease) = &self.lease {
            metadata.insert(LEASE_HEADER, lease.clone());
        }
        Ok(request)
    }
}

/// The transport every service client of a [`Client`] runs over.
pub type Service = InterceptedService<Channel, RequestMetadata>;

/// A connection to containerd bound to one namespace. Cloning is cheap and shares the channel.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    namespace: Arc<str>,
    lease: Option<Arc<str>>,
    metadata: RequestMetadata,
}

macro_rules! service_clients {
    ($($name:ident => $($client:ident)::+;)*) => {
        $(
            pub fn $name(&self) -> $($client)::+<Service> {
                $($client)::+::<Channel>::with_interceptor(self.channel.clone(), self.metadata.clone())
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
            }
        )*
    };
}

impl Client {
    /// Connects to the containerd socket at `socket` and binds the client to `namespace`.
    pub async fn connect(socket: impl AsRef<Path>, namespace: &str) -> Result<Self, Error> {
        let socket = socket.as_ref();
        let channel =
            containerd_client::connect(socket)
                .await
                .map_err(|source| Error::Connect {
                    socket: socket.to_path_buf(),
                    source,
                })?;
        Self::from_channel(channel, namespace)
    }

    /// Binds an existing channel to `namespace`.
    pub fn from_channel(channel: Channel, namespace: &str) -> Result<Self, Error> {
        let metadata = RequestMetadata {
            namespace: metadata_value("namespace", namespace)?,
            lease: None,
        };
        Ok(Self {
            channel,
            namespace: namespace.into(),
            lease: None,
            metadata,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The lease this client's requests carry, if any.
    pub fn lease(&self) -> Option<&str> {
        self.lease.as_deref()
    }

    /// A client on the same channel whose requests carry `lease_id`: whatever they create
    /// (content, snapshots) is kept from the garbage collector while the lease lives.
    pub fn with_lease(&self, lease_id: &str) -> Result<Self, Error> {
        let mut client = self.clone();
        client.metadata.lease = Some(metadata_value("lease", lease_id)?);
        client.lease = Some(lease_id.into());
        Ok(client)
    }

    /// The same connection without a lease.
    pub fn without_lease(&self) -> Self {
        let mut client = self.clone();
        client.metadata.lease = None;
        client.lease = None;
        client
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    service_clients! {
        containers => api::containers_client::ContainersClient;
        content => api::content_client::ContentClient;
        diff => api::diff_client::DiffClient;
        events => api::events_client::EventsClient;
        images => api::images_client::ImagesClient;
        introspection => api::introspection_client::IntrospectionClient;
        leases => api::leases_client::LeasesClient;
        namespaces => api::namespaces_client::NamespacesClient;
        snapshots => api::snapshots::snapshots_client::SnapshotsClient;
        tasks => api::tasks_client::TasksClient;
        version => api::version_client::VersionClient;
    }

    /// containerd's version string (`Version.Version`), a cheap liveness probe.
    pub async fn server_version(&self) -> Result<String, Error> {
        let response = self
            .version()
            .version(())
            .await
            .map_err(call_error("Version.Version"))?;
        Ok(response.into_inner().version)
    }

    /// Creates a lease that expires on its own after `expire_after` (in case the agent dies
    /// before deleting it) and returns its id.
    pub async fn create_lease(
        &self,
        id: &str,
        expire_after: std::time::Duration,
    ) -> Result<String, Error> {
        let expire = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::try_from(expire_after).unwrap_or_default())
            .unwrap_or(jiff::Timestamp::MAX)
            .round(jiff::Unit::Second)
            .unwrap_or(jiff::Timestamp::MAX);
        let request = api::CreateRequest {
            id: id.to_string(),
            labels: [("containerd.io/gc.expire".to_string(), expire.to_string())].into(),
        };
        let lease = self
            .leases()
            .create(request)
            .await
            .map_err(call_error("Leases.Create"))?
            .into_inner()
            .lease
            .map(|lease| lease.id)
            .unwrap_or_else(|| id.to_string());
        Ok(lease)
    }

    /// Deletes a lease; what it held becomes collectable unless something else refers to it.
    /// A lease that is already gone is success.
    pub async fn delete_lease(&self, id: &str) -> Result<(), Error> {
        let request = api::DeleteRequest {
            id: id.to_string(),
            sync: false,
        };
        match self.leases().delete(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(call_error("Leases.Delete")(status)),
        }
    }
}

fn metadata_value(what: &'static str, value: &str) -> Result<AsciiMetadataValue, Error> {
    value.parse().map_err(|_| Error::InvalidMetadata {
        what,
        value: value.to_string(),
    })
}

/// An OCI runtime spec as the `Any` containerd stores in a container record
/// (`Container.spec`): the spec's JSON under containerd's type URL.
pub fn runtime_spec_any(spec: &oci_spec::runtime::Spec) -> Result<prost_types::Any, Error> {
    let value = serde_json::to_vec(spec).map_err(|error| Error::Encode {
        what: "OCI runtime spec",
        reason: error.to_string(),
    })?;
    Ok(prost_types::Any {
        type_url: RUNTIME_SPEC_TYPE_URL.to_string(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interceptor_sets_namespace_and_lease() {
        let mut metadata = RequestMetadata {
            namespace: "skiff".parse().unwrap(),
            lease: Some("pull-1".parse().unwrap()),
        };
        let request = metadata.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get(NAMESPACE_HEADER).unwrap(), "skiff");
        assert_eq!(request.metadata().get(LEASE_HEADER).unwrap(), "pull-1");
    }

    #[test]
    fn call_errors_name_the_call() {
        let error = call_error("Images.Get")(Status::not_found("image \"x\": not found"));
        assert!(error.is_not_found());
        assert_eq!(
            error.to_string(),
            "containerd Images.Get: image \"x\": not found"
        );
    }

    #[tokio::test]
    async fn connect_errors_name_the_socket() {
        let error = Client::connect("/nonexistent/containerd.sock", DEFAULT_NAMESPACE)
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("connect to containerd at /nonexistent/containerd.sock: "),
            "{text}"
        );
        assert!(text.contains("No such file or directory"), "{text}");
    }

    #[test]
    fn spec_any_uses_containerd_type_url() {
        let any = runtime_spec_any(&oci_spec::runtime::Spec::default()).unwrap();
        assert_eq!(any.type_url, RUNTIME_SPEC_TYPE_URL);
        let value: serde_json::Value = serde_json::from_slice(&any.value).unwrap();
        assert_eq!(value["root"]["path"], "rootfs");
    }
}
