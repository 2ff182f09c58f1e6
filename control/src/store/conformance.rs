//! The behavior every store backend must show; each backend's tests run it.

use bytes::Bytes;
use std::collections::HashSet;

use super::{EventKind, Store, StoreError};

pub async fn run_all<S: Store>(store: &S) {
    create_get_update_delete(store).await;
    list_prefix_and_paging(store).await;
    watch_from_revision(store).await;
    compaction_answers_compacted(store).await;
}

async fn create_get_update_delete<S: Store>(store: &S) {
    let r1 = store
        .create("/crud/a", Bytes::from_static(b"v1"))
        .await
        .unwrap();
    assert!(matches!(
        store.create("/crud/a", Bytes::from_static(b"again")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let kv = store.get("/crud/a").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r1));
    assert_eq!(&kv.value[..], b"v1");

    let r2 = store
        .update("/crud/a", Bytes::from_static(b"v2"), Some(r1))
        .await
        .unwrap();
    assert!(r2 > r1);
    match store
        .update("/crud/a", Bytes::from_static(b"stale"), Some(r1))
        .await
    {
        Err(StoreError::Conflict {
            expected, current, ..
        }) => assert_eq!((expected, current), (r1, r2)),
        other => panic!("stale update gave {other:?}"),
    }
    assert!(matches!(
        store.update("/crud/missing", Bytes::new(), None).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete("/crud/a", Some(r1)).await,
        Err(StoreError::Conflict { .. })
    ));
    let deleted = store.delete("/crud/a", Some(r2)).await.unwrap();
    assert!(deleted.mod_revision > r2);
    assert_eq!(deleted.create_revision, r1);
    assert!(store.get("/crud/a").await.unwrap().is_none());
    assert!(matches!(
        store.delete("/crud/a", None).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store.current_revision().await.unwrap(),
        deleted.mod_revision
    );
}

async fn list_prefix_and_paging<S: Store>(store: &S) {
    for name in ["c", "a", "b", "d"] {
        store
            .create(&format!("/list/x/{name}"), Bytes::from(name))
            .await
            .unwrap();
    }
    store.create("/list/y/a", Bytes::new()).await.unwrap();
    store.create("/list/xx", Bytes::new()).await.unwrap();

    let all = store.list("/list/x/", None, None).await.unwrap();
    let keys: Vec<_> = all.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/list/x/a", "/list/x/b", "/list/x/c", "/list/x/d"]);
    assert!(!all.more);

    let page1 = store.list("/list/x/", None, Some(3)).await.unwrap();
    assert_eq!(page1.items.len(), 3);
    assert!(page1.more);
    let last = page1.items.last().unwrap().key.clone();
    let page2 = store.list("/list/x/", Some(&last), Some(3)).await.unwrap();
    let keys: Vec<_> = page2.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/list/x/d"]);
    assert!(!page2.more);
}

async fn watch_from_revision<S: Store>(store: &S) {
    let start = store.current_revision().await.unwrap();
    let r1 = store
        .create("/watch/a", Bytes::from_static(b"1"))
        .await
        .unwrap();
    // A watch that starts in the past replays from there, then follows live writes.
    let mut watch = store.watch("/watch/", start).await.unwrap();
    store.create("/other/a", Bytes::new()).await.unwrap();
    store
        .update("/watch/a", Bytes::from_static(b"2"), Some(r1))
        .await
        .unwrap();
    store.delete("/watch/a", None).await.unwrap();

    let created = watch.next().await.unwrap();
    assert_eq!((created.kind, created.revision()), (EventKind::Put, r1));
    assert!(created.prev.is_none());
    let updated = watch.next().await.unwrap();
    assert_eq!(updated.kind, EventKind::Put);
    assert_eq!(&updated.prev.as_ref().unwrap().value[..], b"1");
    let deleted = watch.next().await.unwrap();
    assert_eq!(deleted.kind, EventKind::Delete);
    assert_eq!(&deleted.kv.value[..], b"2");
    assert!(deleted.revision() > updated.revision());

    // Concurrent writers: every write is seen once, in strictly increasing revision order.
    let mut watch = store
        .watch("/watch/many/", store.current_revision().await.unwrap())
        .await
        .unwrap();
    let writes = (0..50).map(|i| store.create_key(i));
    let revisions: HashSet<_> = futures::future::join_all(writes)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(revisions.len(), 50);
    let mut last = 0;
    for _ in 0..50 {
        let event = watch.next().await.unwrap();
        assert!(event.revision() > last);
        assert!(revisions.contains(&event.revision()));
        last = event.revision();
    }
}

async fn compaction_answers_compacted<S: Store>(store: &S) {
    let before = store.current_revision().await.unwrap();
    store.create("/compact/a", Bytes::new()).await.unwrap();
    let now = store.current_revision().await.unwrap();
    store.compact(now).await.unwrap();
    assert!(matches!(
        store.watch("/compact/", before).await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(store.watch("/compact/", now).await.is_ok());
}

trait CreateKey {
    fn create_key(&self, i: usize) -> impl Future<Output = Result<i64, StoreError>>;
}

impl<S: Store> CreateKey for S {
    fn create_key(&self, i: usize) -> impl Future<Output = Result<i64, StoreError>> {
        let key = format!("/watch/many/{i:03}");
        async move { self.create(&key, Bytes::new()).await }
    }
}
