//! API errors, answered as Kubernetes `Status` objects with the code and reason clients
//! switch on.

use serde_json::{Value, json};

use super::registry::ResourceInfo;
use crate::store::StoreError;

/// One field problem, reported in `details.causes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

fn qualified_resource(info: &ResourceInfo) -> String {
    if info.group.is_empty() {
        info.resource.to_string()
    } else {
        format!("{}.{}", info.resource, info.group)
    }
}

fn details(info: &ResourceInfo, name: &str) -> Value {
    let mut details = json!({"name": name, "kind": info.resource});
    if !info.group.is_empty() {
        details["group"] = json!(info.group);
    }
    details
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn not_found_path(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub fn not_found(info: &ResourceInfo, name: &str) -> Self {
        Self {
            details: Some(details(info, name)),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", qualified_resource(info)),
            )
        }
    }

    pub fn namespace_not_found(namespace: &str) -> Self {
        Self {
            details: Some(json!({"name": namespace, "kind": "namespaces"})),
            ..Self::new(
                404,
                "NotFound",
                format!("namespaces \"{namespace}\" not found"),
            )
        }
    }

    pub fn already_exists(info: &ResourceInfo, name: &str) -> Self {
        Self {
            details: Some(details(info, name)),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", qualified_resource(info)),
            )
        }
    }

    pub fn conflict(info: &ResourceInfo, name: &str, why: &str) -> Self {
        Self {
            details: Some(details(info, name)),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": {why}",
                    qualified_resource(info)
                ),
            )
        }
    }

    pub fn stale(info: &ResourceInfo, name: &str) -> Self {
        Self::conflict(
            info,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn invalid(info: &ResourceInfo, name: &str, causes: &[Cause]) -> Self {
        let listed: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let summary = if listed.len() == 1 {
            listed[0].clone()
        } else {
            format!("[{}]", listed.join(", "))
        };
        let mut details = json!({
            "name": name,
            "kind": info.kind,
            "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>(),
        });
        if !info.group.is_empty() {
            details["group"] = json!(info.group);
        }
        Self {
            details: Some(details),
            ..Self::new(
                422,
                "Invalid",
                format!("{} \"{name}\" is invalid: {summary}", info.kind),
            )
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "RequestEntityTooLarge", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    pub fn not_acceptable(message: impl Into<String>) -> Self {
        Self::new(406, "NotAcceptable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message)
    }

    /// 504, as kube-apiserver answers a read at a version its cache has not reached.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "Timeout", message)
    }

    /// Maps a store failure on `info`/`name` to the status a client expects.
    pub fn from_store(error: StoreError, info: &ResourceInfo, name: &str) -> Self {
        match error {
            StoreError::NotFound { .. } => Self::not_found(info, name),
            StoreError::AlreadyExists { .. } => Self::already_exists(info, name),
            StoreError::Conflict { .. } => Self::stale(info, name),
            StoreError::Compacted {
                requested,
                compacted,
            } => Self::gone(format!(
                "too old resource version: {requested} ({compacted})"
            )),
            StoreError::Closed => Self::unavailable("the store is shutting down"),
            StoreError::Backend(message) => Self::internal(message),
        }
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// A `Status` that reports success, as kube-apiserver answers some deletes.
pub fn success_status(info: &ResourceInfo, name: &str, uid: Option<&str>) -> Value {
    let mut details = details(info, name);
    if let Some(uid) = uid {
        details["uid"] = json!(uid);
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::registry::lookup;

    #[test]
    fn invalid_names_every_field() {
        let pods = lookup("", "v1", "pods").unwrap();
        let causes = [
            Cause {
                reason: "FieldValueRequired",
                field: "spec.containers[0].image".into(),
                message: "Required value".into(),
            },
            Cause {
                reason: "FieldValueRequired",
                field: "spec.containers[1].image".into(),
                message: "Required value".into(),
            },
        ];
        let status = ApiError::invalid(pods, "web", &causes).to_status();
        assert_eq!(status["code"], 422);
        assert_eq!(
            status["message"],
            "Pod \"web\" is invalid: [spec.containers[0].image: Required value, spec.containers[1].image: Required value]"
        );
        assert_eq!(
            status["details"]["causes"][1]["field"],
            "spec.containers[1].image"
        );
    }

    #[test]
    fn not_found_qualifies_grouped_resources() {
        let deployments = lookup("apps", "v1", "deployments").unwrap();
        assert_eq!(
            ApiError::not_found(deployments, "web").message,
            "deployments.apps \"web\" not found"
        );
    }
}
