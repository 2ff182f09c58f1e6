//! The embedded store: every object in memory for reads, one redb file for durability.
//!
//! Reads are served from an in-memory `BTreeMap` under a read lock. Writes go to a single
//! writer thread that batches whatever requests are waiting into one redb transaction (group
//! commit: one fsync for the batch), applies them to memory only after the commit is
//! durable, fans the events out to watchers, and only then acknowledges. A reader therefore
//! never sees a write that a crash could lose.
//!
//! The file holds only live keys plus the current revision, so its size follows the data,
//! not the write history. Watch history is an in-memory window of recent events; a watch
//! that starts before the window, or from before a restart, gets `Compacted` (410 Gone).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, RwLock, mpsc as std_mpsc};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{Event, EventKind, KeyValue, ListPage, Revision, Store, StoreError, WatchStream};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";

/// redb's page cache. Reads are served from memory, so it only holds the pages a write
/// batch touches and the tree's branch pages; the file's other pages are in the kernel's
/// page cache. 16 MB filled up with 20 000 objects and was a tenth of the server's memory.
const REDB_CACHE_BYTES: usize = 4 * 1024 * 1024;

/// How many writes one transaction takes at most; bounds the latency of the batch's first
/// writer.
const MAX_BATCH: usize = 1024;

/// Room in a watcher's queue beyond its backlog; a watcher that falls further behind is
/// closed and must restart from its last revision. The API server's watch cache is the
/// one watcher that sees every write, so this is a few seconds of writes at full load
/// (the queue's memory grows only with what is waiting).
const WATCH_QUEUE: usize = 1 << 16;

#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How many recent events are kept for watches that start in the past.
    pub history_events: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            history_events: 10_000,
        }
    }
}

pub struct EmbeddedStore {
    shared: Arc<Shared>,
    writes: std_mpsc::Sender<WriteRequest>,
}

struct Shared {
    state: RwLock<State>,
}

struct State {
    objects: BTreeMap<String, KeyValue>,
    revision: Revision,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Watches must start at or after this revision.
    compacted: Revision,
    watchers: Vec<Watcher>,
}

struct Watcher {
    prefix: String,
    sender: mpsc::Sender<Arc<Event>>,
}

enum WriteOp {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Option<Revision>,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
}

struct WriteRequest {
    op: WriteOp,
    reply: oneshot::Sender<Result<Arc<Event>, StoreError>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path` and starts its writer thread.
    pub fn open(path: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        // Reads are served from memory, so redb's page cache only needs to help writes.
        let database = redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path)
            .map_err(|e| backend(format!("open {}", path.display()), e))?;
        let (objects, revision) = load(&database)?;
        let state = State {
            objects,
            revision,
            history: VecDeque::new(),
            history_limit: options.history_events.max(1),
            compacted: revision,
            watchers: Vec::new(),
        };
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
        });
        let (writes, requests) = std_mpsc::channel();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(database, writer_shared, requests))
            .map_err(|e| backend("spawn store writer thread".into(), e))?;
        Ok(Self { shared, writes })
    }

    async fn write(&self, op: WriteOp) -> Result<Arc<Event>, StoreError> {
        let (reply, response) = oneshot::channel();
        self.writes
            .send(WriteRequest { op, reply })
            .map_err(|_| StoreError::Closed)?;
        response.await.map_err(|_| StoreError::Closed)?
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn backend(context: String, error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{context}: {error}"))
}

fn load(database: &redb::Database) -> Result<(BTreeMap<String, KeyValue>, Revision), StoreError> {
    // Make sure both tables exist so that a fresh file reads like an empty store.
    let txn = database
        .begin_write()
        .map_err(|e| backend("begin write".into(), e))?;
    txn.open_table(OBJECTS)
        .map_err(|e| backend("open objects table".into(), e))?;
    txn.open_table(META)
        .map_err(|e| backend("open meta table".into(), e))?;
    txn.commit().map_err(|e| backend("commit".into(), e))?;

    let txn = database
        .begin_read()
        .map_err(|e| backend("begin read".into(), e))?;
    let meta = txn
        .open_table(META)
        .map_err(|e| backend("open meta table".into(), e))?;
    let revision = meta
        .get(META_REVISION)
        .map_err(|e| backend("read revision".into(), e))?
        .map(|v| v.value())
        .unwrap_or(1);
    let table = txn
        .open_table(OBJECTS)
        .map_err(|e| backend("open objects table".into(), e))?;
    let mut objects = BTreeMap::new();
    for entry in table
        .iter()
        .map_err(|e| backend("scan objects".into(), e))?
    {
        let (key, value) = entry.map_err(|e| backend("scan objects".into(), e))?;
        let key = key.value().to_string();
        let kv = decode_record(&key, value.value())?;
        objects.insert(key, kv);
    }
    Ok((objects, revision))
}

/// A record is the create revision and mod revision (little-endian i64 each), then the value.
fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut record = Vec::with_capacity(16 + kv.value.len());
    record.extend_from_slice(&kv.create_revision.to_le_bytes());
    record.extend_from_slice(&kv.mod_revision.to_le_bytes());
    record.extend_from_slice(&kv.value);
    record
}

fn decode_record(key: &str, record: &[u8]) -> Result<KeyValue, StoreError> {
    if record.len() < 16 {
        return Err(StoreError::Backend(format!(
            "record for {key} is {} bytes, shorter than its 16-byte header",
            record.len()
        )));
    }
    let (header, value) = record.split_at(16);
    let revision = |bytes: &[u8]| {
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        i64::from_le_bytes(array)
    };
    Ok(KeyValue {
        key: key.to_string(),
        value: Bytes::copy_from_slice(value),
        create_revision: revision(&header[..8]),
        mod_revision: revision(&header[8..]),
    })
}

fn writer_loop(
    database: redb::Database,
    shared: Arc<Shared>,
    requests: std_mpsc::Receiver<WriteRequest>,
) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        commit_batch(&database, &shared, batch);
    }
}

/// Decides every request of the batch against the committed state plus the batch's own
/// earlier writes, persists the accepted ones in one transaction, then publishes them.
fn commit_batch(database: &redb::Database, shared: &Shared, batch: Vec<WriteRequest>) {
    let mut outcomes: Vec<Result<Arc<Event>, StoreError>> = Vec::with_capacity(batch.len());
    let mut events: Vec<Arc<Event>> = Vec::new();
    let starting_revision;
    {
        let state = shared.state.read().unwrap_or_else(|e| e.into_inner());
        starting_revision = state.revision;
        let mut overlay: HashMap<&str, Option<KeyValue>> = HashMap::new();
        let mut revision = state.revision;
        for request in &batch {
            let key = match &request.op {
                WriteOp::Create { key, .. }
                | WriteOp::Update { key, .. }
                | WriteOp::Delete { key, .. } => key.as_str(),
            };
            let current = match overlay.get(key) {
                Some(value) => value.clone(),
                None => state.objects.get(key).cloned(),
            };
            match decide(&request.op, current, revision + 1) {
                Ok(event) => {
                    revision += 1;
                    let after = match event.kind {
                        EventKind::Put => Some(event.kv.clone()),
                        EventKind::Delete => None,
                    };
                    overlay.insert(key, after);
                    let event = Arc::new(event);
                    events.push(event.clone());
                    outcomes.push(Ok(event));
                }
                Err(error) => outcomes.push(Err(error)),
            }
        }
    }

    if !events.is_empty()
        && let Err(error) = persist(database, &events)
    {
        tracing::error!(%error, "store commit failed");
        for request in batch {
            let _ = request
                .reply
                .send(Err(StoreError::Backend(error.to_string())));
        }
        return;
    }

    {
        let mut state = shared.state.write().unwrap_or_else(|e| e.into_inner());
        debug_assert_eq!(state.revision, starting_revision);
        for event in &events {
            match event.kind {
                EventKind::Put => {
                    state.objects.insert(event.kv.key.clone(), event.kv.clone());
                }
                EventKind::Delete => {
                    state.objects.remove(&event.kv.key);
                }
            }
            state.revision = event.revision();
            state.history.push_back(event.clone());
        }
        while state.history.len() > state.history_limit {
            if let Some(oldest) = state.history.pop_front() {
                state.compacted = state.compacted.max(oldest.revision());
            }
        }
        if !events.is_empty() {
            state.watchers.retain(|watcher| {
                for event in &events {
                    if !event.kv.key.starts_with(&watcher.prefix) {
                        continue;
                    }
                    // A full queue means the watcher cannot keep up: dropping the sender
                    // ends its stream, and it resumes from its last revision.
                    if watcher.sender.try_send(event.clone()).is_err() {
                        return false;
                    }
                }
                !watcher.sender.is_closed()
            });
        }
    }

    for (request, outcome) in batch.into_iter().zip(outcomes) {
        let _ = request.reply.send(outcome);
    }
}

fn decide(
    op: &WriteOp,
    current: Option<KeyValue>,
    revision: Revision,
) -> Result<Event, StoreError> {
    let check = |key: &str, current: &Option<KeyValue>, expected: Option<Revision>| {
        let Some(existing) = current else {
            return Err(StoreError::NotFound {
                key: key.to_string(),
            });
        };
        match expected {
            Some(expected) if expected != existing.mod_revision => Err(StoreError::Conflict {
                key: key.to_string(),
                expected,
                current: existing.mod_revision,
            }),
            _ => Ok(()),
        }
    };
    match op {
        WriteOp::Create { key, value } => {
            if current.is_some() {
                return Err(StoreError::AlreadyExists { key: key.clone() });
            }
            Ok(Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: revision,
                    mod_revision: revision,
                },
                prev: None,
            })
        }
        WriteOp::Update {
            key,
            value,
            expected,
        } => {
            check(key, &current, *expected)?;
            let create_revision = current.as_ref().map_or(revision, |c| c.create_revision);
            Ok(Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision,
                    mod_revision: revision,
                },
                prev: current,
            })
        }
        WriteOp::Delete { key, expected } => {
            check(key, &current, *expected)?;
            let previous = current.clone().expect("checked above");
            Ok(Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    mod_revision: revision,
                    ..previous
                },
                prev: current,
            })
        }
    }
}

fn persist(database: &redb::Database, events: &[Arc<Event>]) -> Result<(), StoreError> {
    let txn = database
        .begin_write()
        .map_err(|e| backend("begin write".into(), e))?;
    {
        let mut table = txn
            .open_table(OBJECTS)
            .map_err(|e| backend("open objects table".into(), e))?;
        for event in events {
            match event.kind {
                EventKind::Put => {
                    table
                        .insert(event.kv.key.as_str(), encode_record(&event.kv).as_slice())
                        .map_err(|e| backend(format!("write {}", event.kv.key), e))?;
                }
                EventKind::Delete => {
                    table
                        .remove(event.kv.key.as_str())
                        .map_err(|e| backend(format!("delete {}", event.kv.key), e))?;
                }
            }
        }
        let mut meta = txn
            .open_table(META)
            .map_err(|e| backend("open meta table".into(), e))?;
        let last = events.last().map_or(0, |e| e.revision());
        meta.insert(META_REVISION, last)
            .map_err(|e| backend("write revision".into(), e))?;
    }
    // redb's default durability fsyncs on commit: the batch is durable when this returns.
    txn.commit().map_err(|e| backend("commit".into(), e))
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.read().objects.get(key).cloned())
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListPage, StoreError> {
        let state = self.read();
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let limit = limit.unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut more = false;
        for (key, kv) in state
            .objects
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
        {
            if items.len() == limit {
                more = true;
                break;
            }
            debug_assert!(key.starts_with(prefix));
            items.push(kv.clone());
        }
        Ok(ListPage {
            items,
            revision: state.revision,
            more,
        })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        let op = WriteOp::Create {
            key: key.to_string(),
            value,
        };
        Ok(self.write(op).await?.revision())
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let op = WriteOp::Update {
            key: key.to_string(),
            value,
            expected,
        };
        Ok(self.write(op).await?.revision())
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue, StoreError> {
        let op = WriteOp::Delete {
            key: key.to_string(),
            expected,
        };
        Ok(self.write(op).await?.kv.clone())
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
        if after < state.compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted: state.compacted,
            });
        }
        let backlog: Vec<Arc<Event>> = state
            .history
            .iter()
            .filter(|e| e.revision() > after && e.kv.key.starts_with(prefix))
            .cloned()
            .collect();
        let (sender, receiver) = mpsc::channel(backlog.len() + WATCH_QUEUE);
        for event in backlog {
            // Cannot fail: the queue was sized for the backlog.
            let _ = sender.try_send(event);
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_string(),
            sender,
        });
        Ok(WatchStream { receiver })
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.read().revision)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
        while state
            .history
            .front()
            .is_some_and(|e| e.revision() <= revision)
        {
            state.history.pop_front();
        }
        state.compacted = state.compacted.max(revision.min(state.revision));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
        EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions::default()).unwrap()
    }

    #[tokio::test]
    async fn passes_the_store_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        conformance::run_all(&open(&dir)).await;
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let last = {
            let store = open(&dir);
            store.create("/a", Bytes::from_static(b"1")).await.unwrap();
            let rev = store.create("/b", Bytes::from_static(b"2")).await.unwrap();
            store.delete("/a", None).await.unwrap();
            store
                .update("/b", Bytes::from_static(b"3"), Some(rev))
                .await
                .unwrap()
        };
        // The writer thread of the first store still owns the file until it notices its
        // channel closed; give it a moment.
        let store = loop {
            match EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions::default()) {
                Ok(store) => break store,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        assert_eq!(store.current_revision().await.unwrap(), last);
        assert!(store.get("/a").await.unwrap().is_none());
        let b = store.get("/b").await.unwrap().unwrap();
        assert_eq!(&b.value[..], b"3");
        assert_eq!(b.mod_revision, last);
        // History does not survive a restart: a watch from before it is compacted.
        assert!(matches!(
            store.watch("/", last - 1).await,
            Err(StoreError::Compacted { .. })
        ));
        let next = store.create("/c", Bytes::from_static(b"4")).await.unwrap();
        assert_eq!(next, last + 1);
    }

    #[tokio::test]
    async fn history_window_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(
            &dir.path().join("store.redb"),
            EmbeddedOptions { history_events: 3 },
        )
        .unwrap();
        let first = store.create("/k0", Bytes::new()).await.unwrap();
        for i in 1..6 {
            store.create(&format!("/k{i}"), Bytes::new()).await.unwrap();
        }
        assert!(matches!(
            store.watch("/", first).await,
            Err(StoreError::Compacted { .. })
        ));
        let mut watch = store.watch("/", first + 2).await.unwrap();
        assert_eq!(watch.next().await.unwrap().kv.key, "/k3");
    }
}
