//! The store: revisioned key-value storage that the API server keeps every object in.
//!
//! The API server talks only to the [`Store`] trait. A revision is a cluster-wide counter
//! that every write increments, exactly as etcd's revision does, so that an etcd backend
//! fits behind the same trait without changing a caller. The API server reports a key's
//! `mod_revision` as the object's `resourceVersion`.
//!
//! **Architecture invariant:** the store knows nothing of HTTP, Kubernetes kinds or JSON;
//! keys and values are opaque to it.

#[cfg(test)]
pub(crate) mod conformance;
pub mod embedded;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

/// A store revision; strictly increasing, starting at 1 for an empty store.
pub type Revision = i64;

/// One key as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// The revision of the write that created the key.
    pub create_revision: Revision,
    /// The revision of the last write to the key (for a deletion event: the deletion's).
    pub mod_revision: Revision,
}

/// What a write did, as a watcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change to one key.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// For a put: the new value. For a delete: the last value, with the deletion revision.
    pub kv: KeyValue,
    /// The value before this change, if there was one.
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub items: Vec<KeyValue>,
    /// The store revision the page was read at.
    pub revision: Revision,
    /// Whether keys remain after the last item of this page.
    pub more: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    #[error("key {key} is at revision {current}, not {expected}")]
    Conflict {
        key: String,
        expected: Revision,
        current: Revision,
    },
    #[error("revision {requested} has been compacted; the oldest available is {compacted}")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("store backend: {0}")]
    Backend(String),
    #[error("store is shutting down")]
    Closed,
}

/// A stream of events in revision order. It ends (returns `None`) when the store closes the
/// watch, for example because the watcher fell too far behind; the caller then restarts from
/// the last revision it saw, as a Kubernetes client does.
pub struct WatchStream {
    pub(crate) receiver: mpsc::Receiver<Arc<Event>>,
}

impl WatchStream {
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        self.receiver.recv().await
    }
}

/// The storage contract of the API server.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Keys starting with `prefix`, in key order, strictly after `start_after` when given, at
    /// most `limit` of them when given.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListPage, StoreError>;

    /// Creates `key`; fails with `AlreadyExists` if it is present. Returns the new revision.
    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError>;

    /// Replaces `key`'s value if its `mod_revision` is `expected` (or unconditionally for
    /// `None`). Returns the new revision.
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError>;

    /// Deletes `key` if its `mod_revision` is `expected` (or unconditionally for `None`).
    /// Returns the deleted key with the deletion's revision as `mod_revision`.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue, StoreError>;

    /// Every change to keys under `prefix` with a revision greater than `after`.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError>;

    /// The revision of the last write.
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Forgets history up to and including `revision`; watches from before it get
    /// `Compacted`.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
}
