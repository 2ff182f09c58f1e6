//! Keeps the maps equal to the desired frontends. Every change is incremental and
//! make-before-break, in an order a concurrent reader (the programs) always finds
//! consistent:
//!
//! - a new frontend's backends and slots are written before its service entry (slot 0),
//!   which makes it visible; a removed frontend's service entry goes first;
//! - a backend replacing a removed one is written, then its slot is overwritten in place;
//!   extra backends get new slots before `count` grows; surplus slots are filled from the
//!   end before `count` shrinks, and only then are the cut slots and the removed backends
//!   deleted;
//! - unchanged backends keep their id and slot, so nothing about them moves.
//!
//! The programmer adopts what the maps hold when it starts (the maps are the only state),
//! so a restarted agent that computes the same desired state writes nothing.

use std::collections::{HashMap, HashSet};

use aya::maps::{MapError, PerCpuValues};
use skiff_ebpf::lb::{
    BACKEND_STATS_MAP, BACKENDS_MAP, Lb4Backend, Lb4FrontendName, Lb4Key, Lb4ReverseNat,
    Lb4Service, LbBackendStats, NAMES_MAP, REVNAT_MAP, SERVICES_MAP, SVC_AFFINITY, SVC_EXTERNAL_IP,
    SVC_LOCAL, SVC_NODEPORT,
};

use super::LbError;
use super::datapath::{Datapath, Maps};
use super::desired::{Backend, Frontend, FrontendKey, FrontendKind, Proto, Scope};

/// Below this many new frontends, batch writes are not worth their bookkeeping.
const BULK_MIN: usize = 16;

/// A Service, `(namespace, name)`.
pub type ServiceName = (String, String);

/// What one apply changed, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_added: usize,
    pub frontends_removed: usize,
    pub frontends_changed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Map updates and deletions issued.
    pub map_writes: usize,
}

impl ApplyStats {
    pub fn is_noop(&self) -> bool {
        self.map_writes == 0
    }

    fn add(&mut self, other: ApplyStats) {
        self.frontends_added += other.frontends_added;
        self.frontends_removed += other.frontends_removed;
        self.frontends_changed += other.frontends_changed;
        self.backends_added += other.backends_added;
        self.backends_removed += other.backends_removed;
        self.map_writes += other.map_writes;
    }
}

/// One programmed backend slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    backend_id: u32,
    /// `None` when the adopted slot pointed at a missing backend: rewritten on next apply.
    backend: Option<Lb4Backend>,
}

/// A frontend as the maps hold it.
#[derive(Clone, Debug)]
struct Programmed {
    rev_nat_index: u16,
    entry: Lb4Service,
    name: String,
    owner: ServiceName,
    slots: Vec<Slot>,
}

/// Hands out small integer ids, lowest free first after reuse.
#[derive(Debug)]
struct Ids {
    next: u32,
    limit: u32,
    free: Vec<u32>,
    used: HashSet<u32>,
}

impl Ids {
    /// Ids `1..limit`.
    fn new(limit: u32) -> Self {
        Self {
            next: 1,
            limit,
            free: Vec::new(),
            used: HashSet::new(),
        }
    }

    fn mark_used(&mut self, id: u32) {
        self.used.insert(id);
        self.next = self.next.max(id + 1);
    }

    fn allocate(&mut self) -> Option<u32> {
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.next < self.limit => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.used.insert(id);
        Some(id)
    }

    fn release(&mut self, id: u32) {
        if self.used.remove(&id) {
            self.free.push(id);
        }
    }

    /// After adoption: every id below `next` that is not used is free.
    fn collect_free(&mut self) {
        self.free = (1..self.next)
            .rev()
            .filter(|id| !self.used.contains(id))
            .collect();
    }
}

pub struct Programmer {
    maps: Maps,
    frontends: HashMap<FrontendKey, Programmed>,
    by_service: HashMap<ServiceName, Vec<FrontendKey>>,
    backend_ids: Ids,
    rev_nat_ids: Ids,
    /// Possible CPUs: the length of a per-CPU value.
    n_cpus: usize,
}

impl Programmer {
    /// Takes the datapath's maps and reads back what they hold.
    pub fn new(mut datapath: Datapath) -> Result<Self, LbError> {
        let maps = datapath
            .take_maps()
            .ok_or_else(|| LbError::Datapath("the datapath's maps were already taken".into()))?;
        Self::adopt(maps)
    }

    /// The frontends programmed now, by key.
    pub fn frontend_keys(&self) -> impl Iterator<Item = &FrontendKey> {
        self.frontends.keys()
    }

    pub fn service_count(&self) -> usize {
        self.by_service.len()
    }

    fn adopt(maps: Maps) -> Result<Self, LbError> {
        let n_cpus = aya::util::nr_cpus().map_err(|(call, source)| LbError::Io {
            call,
            path: "/sys/devices/system/cpu/possible".into(),
            source,
        })?;
        let mut entries = Vec::new();
        let mut slots = Vec::new();
        for item in maps.services.iter() {
            let (key, value) = item.map_err(|source| map_error(SERVICES_MAP, "read", source))?;
            if key.backend_slot == 0 {
                entries.push((key, value));
            } else {
                slots.push((key, value));
            }
        }
        let mut backends = HashMap::new();
        for item in maps.backends.iter() {
            let (id, backend) = item.map_err(|source| map_error(BACKENDS_MAP, "read", source))?;
            backends.insert(id, backend);
        }
        let mut names = HashMap::new();
        for item in maps.names.iter() {
            let (index, name) = item.map_err(|source| map_error(NAMES_MAP, "read", source))?;
            names.insert(index, name.as_str().to_owned());
        }
        let slot_values: HashMap<Lb4Key, Lb4Service> = slots.iter().copied().collect();

        let mut this = Self {
            backend_ids: Ids::new(maps.sizes.backends),
            rev_nat_ids: Ids::new(u32::from(u16::MAX) + 1),
            maps,
            frontends: HashMap::new(),
            by_service: HashMap::new(),
            n_cpus,
        };
        for (key, entry) in entries {
            let Some(frontend_key) = frontend_key_of(&key) else {
                continue;
            };
            let name = names.get(&entry.rev_nat_index).cloned().unwrap_or_default();
            let owner = owner_of(&name);
            let mut programmed_slots = Vec::with_capacity(usize::from(entry.count));
            for slot in 1..=entry.count {
                let Some(value) = slot_values.get(&key.with_slot(slot)) else {
                    // A hole: the slot is rewritten on the next apply.
                    programmed_slots.push(Slot {
                        backend_id: 0,
                        backend: None,
                    });
                    continue;
                };
                let backend = backends.get(&value.backend_id).copied();
                if backend.is_some() {
                    this.backend_ids.mark_used(value.backend_id);
                }
                programmed_slots.push(Slot {
                    backend_id: value.backend_id,
                    backend,
                });
            }
            this.rev_nat_ids.mark_used(u32::from(entry.rev_nat_index));
            this.by_service
                .entry(owner.clone())
                .or_default()
                .push(frontend_key);
            this.frontends.insert(
                frontend_key,
                Programmed {
                    rev_nat_index: entry.rev_nat_index,
                    entry,
                    name,
                    owner,
                    slots: programmed_slots,
                },
            );
        }
        this.backend_ids.collect_free();
        this.rev_nat_ids.collect_free();
        this.remove_orphans(&slots, &backends, &names)?;
        // A crash between a backend's removal and its counters' reset leaves counts behind.
        for backend_id in this.backend_ids.free.clone() {
            this.zero_counters(backend_id)?;
        }
        Ok(this)
    }

    /// Deletes what no service entry refers to: left by a crash in the middle of a change.
    fn remove_orphans(
        &mut self,
        slots: &[(Lb4Key, Lb4Service)],
        backends: &HashMap<u32, Lb4Backend>,
        names: &HashMap<u16, String>,
    ) -> Result<(), LbError> {
        for (key, _) in slots {
            let live = frontend_key_of(key)
                .and_then(|frontend| self.frontends.get(&frontend))
                .is_some_and(|programmed| key.backend_slot <= programmed.entry.count);
            if !live {
                remove(&mut self.maps.services, SERVICES_MAP, key)?;
            }
        }
        for id in backends.keys() {
            if !self.backend_ids.used.contains(id) {
                remove_backend(&mut self.maps, *id)?;
            }
        }
        for index in names.keys() {
            if !self.rev_nat_ids.used.contains(&u32::from(*index)) {
                remove(&mut self.maps.names, NAMES_MAP, index)?;
                remove(&mut self.maps.revnat, REVNAT_MAP, index)?;
            }
        }
        Ok(())
    }

    /// Makes the maps hold exactly `frontends`, for every Service.
    pub fn apply_all(&mut self, frontends: Vec<Frontend>) -> Result<ApplyStats, LbError> {
        let mut stats = ApplyStats::default();
        let desired: HashSet<FrontendKey> = frontends.iter().map(|frontend| frontend.key).collect();
        let stale: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|key| !desired.contains(key))
            .copied()
            .collect();
        for key in stale {
            stats.add(self.remove_frontend(&key)?);
        }
        self.by_service.clear();
        for programmed in self.frontends.values() {
            self.by_service.entry(programmed.owner.clone()).or_default();
        }
        // New frontends go in a few batch writes (a node programming every Service at
        // start); what does not fit or fails goes one frontend at a time below, which names
        // what was left out.
        let mut seen = HashSet::with_capacity(frontends.len());
        let (mut new, rest): (Vec<Frontend>, Vec<Frontend>) =
            frontends.into_iter().partition(|frontend| {
                !self.frontends.contains_key(&frontend.key) && seen.insert(frontend.key)
            });
        if new.len() >= BULK_MIN && self.fits(&new) {
            match self.create_bulk(&new) {
                Ok(created) => {
                    stats.add(created);
                    for frontend in new.drain(..) {
                        let owner = (frontend.service.namespace, frontend.service.name);
                        self.by_service.entry(owner).or_default().push(frontend.key);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "batch programming failed; one frontend at a time")
                }
            }
        }
        let mut first_error = None;
        for frontend in new.into_iter().chain(rest) {
            let owner = (
                frontend.service.namespace.clone(),
                frontend.service.name.clone(),
            );
            let key = frontend.key;
            match self.upsert(&frontend) {
                Ok(changed) => {
                    stats.add(changed);
                    self.by_service.entry(owner).or_default().push(key);
                }
                Err(error) => {
                    tracing::error!(%error, "load balancer frontend not programmed");
                    first_error.get_or_insert(error);
                }
            }
        }
        self.by_service.retain(|_, keys| !keys.is_empty());
        match first_error {
            Some(error) => Err(error),
            None => Ok(stats),
        }
    }

    /// Replaces one Service's frontends (none: the Service is gone).
    pub fn apply_service(
        &mut self,
        namespace: &str,
        name: &str,
        frontends: Vec<Frontend>,
    ) -> Result<ApplyStats, LbError> {
        let owner: ServiceName = (namespace.to_owned(), name.to_owned());
        let mut stats = ApplyStats::default();
        let previous = self.by_service.remove(&owner).unwrap_or_default();
        let desired: HashSet<FrontendKey> = frontends.iter().map(|frontend| frontend.key).collect();
        for key in previous.iter().filter(|key| !desired.contains(key)) {
            let owned = self
                .frontends
                .get(key)
                .is_some_and(|programmed| programmed.owner == owner);
            if owned {
                stats.add(self.remove_frontend(key)?);
            }
        }
        let mut keys = Vec::with_capacity(frontends.len());
        let mut first_error = None;
        for frontend in &frontends {
            match self.upsert(frontend) {
                Ok(changed) => {
                    stats.add(changed);
                    keys.push(frontend.key);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if !keys.is_empty() {
            self.by_service.insert(owner, keys);
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(stats),
        }
    }

    fn upsert(&mut self, frontend: &Frontend) -> Result<ApplyStats, LbError> {
        let sizes = self.maps.sizes.clone();
        self.upsert_inner(frontend).map_err(|error| match error {
            LbError::MapFull {
                map,
                frontend,
                flag,
                ..
            } => LbError::MapFull {
                map,
                max_entries: if map == BACKENDS_MAP {
                    sizes.backends
                } else {
                    sizes.services
                },
                frontend,
                flag,
            },
            other => other,
        })
    }

    fn upsert_inner(&mut self, frontend: &Frontend) -> Result<ApplyStats, LbError> {
        let entry_flags = flags_of(frontend);
        let affinity_timeout = frontend.affinity_timeout.unwrap_or(0);
        let name = name_of(frontend);
        if !self.frontends.contains_key(&frontend.key) {
            return self.create(frontend, entry_flags, affinity_timeout, name);
        }
        let mut programmed = self.frontends.remove(&frontend.key).expect("checked above");
        let result = self.update(
            &mut programmed,
            frontend,
            entry_flags,
            affinity_timeout,
            name,
        );
        self.frontends.insert(frontend.key, programmed);
        result
    }

    /// Brings a programmed frontend to `frontend`, in the order the module doc describes.
    fn update(
        &mut self,
        programmed: &mut Programmed,
        frontend: &Frontend,
        entry_flags: u8,
        affinity_timeout: u32,
        name: String,
    ) -> Result<ApplyStats, LbError> {
        let mut stats = ApplyStats::default();
        let base_key = map_key(&frontend.key, 0);
        let proto = frontend.key.proto.number();
        let desired: HashMap<(u32, u16), Lb4Backend> = frontend
            .backends
            .iter()
            .map(|backend| {
                let value = backend_value(backend, proto);
                ((value.address, value.port), value)
            })
            .collect();
        // Keep every slot whose backend is still desired (updating its flags in place);
        // the others are holes, filled by new backends or compacted away.
        let mut holes = Vec::new();
        let mut kept = HashSet::new();
        for (index, slot) in programmed.slots.iter_mut().enumerate() {
            let wanted = slot.backend.and_then(|backend| {
                desired
                    .get(&(backend.address, backend.port))
                    .map(|value| (backend, value))
            });
            match wanted {
                Some((current, value)) if kept.insert((value.address, value.port)) => {
                    if current != *value {
                        insert(
                            &mut self.maps.backends,
                            BACKENDS_MAP,
                            &slot.backend_id,
                            value,
                        )?;
                        slot.backend = Some(*value);
                        stats.map_writes += 1;
                    }
                }
                _ => holes.push(index),
            }
        }
        let mut additions: Vec<Lb4Backend> = frontend
            .backends
            .iter()
            .map(|backend| backend_value(backend, proto))
            .filter(|value| !kept.contains(&(value.address, value.port)))
            .collect();
        additions.dedup();
        let mut removed_ids = Vec::new();
        // 1. New backends take the holes, in place.
        while let (Some(&hole), Some(_)) = (holes.first(), additions.first()) {
            let value = additions.remove(0);
            holes.remove(0);
            let backend_id = self.new_backend(&value, &name, &mut stats)?;
            let slot = &mut programmed.slots[hole];
            let slot_key = base_key.with_slot(slot_number(hole));
            insert(
                &mut self.maps.services,
                SERVICES_MAP,
                &slot_key,
                &Lb4Service {
                    backend_id,
                    ..Lb4Service::default()
                },
            )
            .map_err(|error| full(error, &name))?;
            stats.map_writes += 1;
            if slot.backend.is_some() {
                removed_ids.push(slot.backend_id);
            }
            *slot = Slot {
                backend_id,
                backend: Some(value),
            };
        }
        // 2. More backends than holes: new slots past the end.
        for value in additions {
            let backend_id = self.new_backend(&value, &name, &mut stats)?;
            let slot_key = base_key.with_slot(slot_number(programmed.slots.len()));
            if let Err(error) = insert(
                &mut self.maps.services,
                SERVICES_MAP,
                &slot_key,
                &Lb4Service {
                    backend_id,
                    ..Lb4Service::default()
                },
            ) {
                self.free_backend(backend_id)?;
                return Err(full(error, &name));
            }
            stats.map_writes += 1;
            programmed.slots.push(Slot {
                backend_id,
                backend: Some(value),
            });
        }
        // 3. More holes than backends: move live slots from the end into the holes.
        let old_count = programmed.slots.len();
        for &hole in holes.iter().rev() {
            let slot = programmed.slots[hole];
            if slot.backend.is_some() {
                removed_ids.push(slot.backend_id);
            }
            let last = programmed.slots.len() - 1;
            if hole != last {
                let moved = programmed.slots[last];
                insert(
                    &mut self.maps.services,
                    SERVICES_MAP,
                    &base_key.with_slot(slot_number(hole)),
                    &Lb4Service {
                        backend_id: moved.backend_id,
                        ..Lb4Service::default()
                    },
                )?;
                stats.map_writes += 1;
                programmed.slots[hole] = moved;
            }
            programmed.slots.pop();
        }
        // 4. The service entry: count, flags, affinity.
        let entry = Lb4Service {
            backend_id: 0,
            count: u16::try_from(programmed.slots.len()).map_err(|_| {
                LbError::Datapath(format!("{name}: more than {} backends", u16::MAX))
            })?,
            rev_nat_index: programmed.rev_nat_index,
            affinity_timeout,
            flags: entry_flags,
            pad: [0; 3],
        };
        if entry != programmed.entry {
            insert(&mut self.maps.services, SERVICES_MAP, &base_key, &entry)?;
            stats.map_writes += 1;
            programmed.entry = entry;
        }
        // 5. Only now unreachable: the cut slots and the removed backends.
        for slot in programmed.slots.len()..old_count {
            remove(
                &mut self.maps.services,
                SERVICES_MAP,
                &base_key.with_slot(slot_number(slot)),
            )?;
            stats.map_writes += 1;
        }
        for backend_id in removed_ids {
            self.free_backend(backend_id)?;
            stats.map_writes += 2;
            stats.backends_removed += 1;
        }
        if programmed.name != name {
            let index = programmed.rev_nat_index;
            insert(
                &mut self.maps.names,
                NAMES_MAP,
                &index,
                &Lb4FrontendName::new(&name),
            )?;
            stats.map_writes += 1;
            programmed.owner = owner_of(&name);
            programmed.name = name;
        }
        if stats.map_writes > 0 {
            stats.frontends_changed += 1;
        }
        Ok(stats)
    }

    fn create(
        &mut self,
        frontend: &Frontend,
        flags: u8,
        affinity_timeout: u32,
        name: String,
    ) -> Result<ApplyStats, LbError> {
        let mut stats = ApplyStats {
            frontends_added: 1,
            ..ApplyStats::default()
        };
        let rev_nat_index = self
            .rev_nat_ids
            .allocate()
            .and_then(|id| u16::try_from(id).ok())
            .ok_or_else(|| LbError::Datapath(format!("{name}: all 65535 frontend ids in use")))?;
        let proto = frontend.key.proto.number();
        let base_key = map_key(&frontend.key, 0);
        let mut slots: Vec<Slot> = Vec::with_capacity(frontend.backends.len());
        let result = (|| -> Result<(), LbError> {
            insert(
                &mut self.maps.revnat,
                REVNAT_MAP,
                &rev_nat_index,
                &Lb4ReverseNat::new(frontend.key.address, frontend.key.port),
            )
            .map_err(|error| full(error, &name))?;
            insert(
                &mut self.maps.names,
                NAMES_MAP,
                &rev_nat_index,
                &Lb4FrontendName::new(&name),
            )
            .map_err(|error| full(error, &name))?;
            stats.map_writes += 2;
            for backend in &frontend.backends {
                let value = backend_value(backend, proto);
                if slots.iter().any(|slot| {
                    slot.backend
                        .is_some_and(|b| (b.address, b.port) == (value.address, value.port))
                }) {
                    continue;
                }
                let backend_id = self.new_backend(&value, &name, &mut stats)?;
                slots.push(Slot {
                    backend_id,
                    backend: Some(value),
                });
                insert(
                    &mut self.maps.services,
                    SERVICES_MAP,
                    &base_key.with_slot(slot_number(slots.len() - 1)),
                    &Lb4Service {
                        backend_id,
                        ..Lb4Service::default()
                    },
                )
                .map_err(|error| full(error, &name))?;
                stats.map_writes += 1;
            }
            Ok(())
        })();
        let entry = Lb4Service {
            backend_id: 0,
            count: u16::try_from(slots.len()).unwrap_or(u16::MAX),
            rev_nat_index,
            affinity_timeout,
            flags,
            pad: [0; 3],
        };
        let result = result.and_then(|()| {
            insert(&mut self.maps.services, SERVICES_MAP, &base_key, &entry)
                .map_err(|error| full(error, &name))
        });
        if let Err(error) = result {
            // Nothing half-done: undo what this frontend wrote.
            for (index, slot) in slots.iter().enumerate() {
                let _ = self
                    .maps
                    .services
                    .remove(&base_key.with_slot(slot_number(index)));
                let _ = self.free_backend(slot.backend_id);
            }
            let _ = self.maps.revnat.remove(&rev_nat_index);
            let _ = self.maps.names.remove(&rev_nat_index);
            self.rev_nat_ids.release(u32::from(rev_nat_index));
            return Err(error);
        }
        stats.map_writes += 1;
        self.frontends.insert(
            frontend.key,
            Programmed {
                rev_nat_index,
                entry,
                owner: owner_of(&name),
                name,
                slots,
            },
        );
        Ok(stats)
    }

    /// Whether `frontends` (all new) fit in the maps beside what they hold.
    fn fits(&self, frontends: &[Frontend]) -> bool {
        let held: usize = self
            .frontends
            .values()
            .map(|programmed| 1 + programmed.slots.len())
            .sum();
        let backends: usize = frontends
            .iter()
            .map(|frontend| frontend.backends.len())
            .sum();
        let needed = frontends.len() + backends;
        let free_backend_ids = self.backend_ids.free.len()
            + (self.backend_ids.limit.saturating_sub(self.backend_ids.next)) as usize;
        let free_rev_nat_ids = self.rev_nat_ids.free.len()
            + (self.rev_nat_ids.limit.saturating_sub(self.rev_nat_ids.next)) as usize;
        held + needed <= self.maps.sizes.services as usize
            && backends <= free_backend_ids
            && frontends.len() <= free_rev_nat_ids
    }

    /// Creates many new frontends with one batch write per map, in the same order as
    /// [`Programmer::create`]: backends, slots, reverse-NAT entries and names, and the
    /// service entries last. On failure everything written is removed and the ids freed.
    fn create_bulk(&mut self, frontends: &[Frontend]) -> Result<ApplyStats, LbError> {
        let mut programmed = Vec::with_capacity(frontends.len());
        let mut backend_keys = Vec::new();
        let mut backend_values = Vec::new();
        let mut slot_keys = Vec::new();
        let mut slot_values = Vec::new();
        let mut indexes = Vec::with_capacity(frontends.len());
        let mut revnat_values = Vec::with_capacity(frontends.len());
        let mut name_values = Vec::with_capacity(frontends.len());
        let mut entry_keys = Vec::with_capacity(frontends.len());
        let mut entry_values = Vec::with_capacity(frontends.len());
        for frontend in frontends {
            let name = name_of(frontend);
            let proto = frontend.key.proto.number();
            let base_key = map_key(&frontend.key, 0);
            let Some(rev_nat_index) = self
                .rev_nat_ids
                .allocate()
                .and_then(|id| u16::try_from(id).ok())
            else {
                self.undo_bulk(&backend_keys, &slot_keys, &indexes);
                return Err(LbError::Datapath(
                    "frontend ids ran out during a batch".into(),
                ));
            };
            indexes.push(rev_nat_index);
            let mut slots: Vec<Slot> = Vec::with_capacity(frontend.backends.len());
            for backend in &frontend.backends {
                let value = backend_value(backend, proto);
                if slots.iter().any(|slot| {
                    slot.backend
                        .is_some_and(|b| (b.address, b.port) == (value.address, value.port))
                }) {
                    continue;
                }
                let Some(backend_id) = self.backend_ids.allocate() else {
                    self.undo_bulk(&backend_keys, &slot_keys, &indexes);
                    return Err(LbError::Datapath(
                        "backend ids ran out during a batch".into(),
                    ));
                };
                backend_keys.push(backend_id);
                backend_values.push(value);
                slots.push(Slot {
                    backend_id,
                    backend: Some(value),
                });
                slot_keys.push(base_key.with_slot(slot_number(slots.len() - 1)));
                slot_values.push(Lb4Service {
                    backend_id,
                    ..Lb4Service::default()
                });
            }
            let entry = Lb4Service {
                backend_id: 0,
                count: u16::try_from(slots.len()).unwrap_or(u16::MAX),
                rev_nat_index,
                affinity_timeout: frontend.affinity_timeout.unwrap_or(0),
                flags: flags_of(frontend),
                pad: [0; 3],
            };
            revnat_values.push(Lb4ReverseNat::new(frontend.key.address, frontend.key.port));
            name_values.push(Lb4FrontendName::new(&name));
            entry_keys.push(base_key);
            entry_values.push(entry);
            programmed.push((
                frontend.key,
                Programmed {
                    rev_nat_index,
                    entry,
                    owner: owner_of(&name),
                    name,
                    slots,
                },
            ));
        }
        use std::os::fd::AsFd as _;
        let batch = &self.maps.batch;
        let write = || -> Result<(), (&'static str, std::io::Error)> {
            write_batch(
                BACKENDS_MAP,
                batch.backends.as_fd(),
                &backend_keys,
                &backend_values,
            )?;
            write_batch(
                SERVICES_MAP,
                batch.services.as_fd(),
                &slot_keys,
                &slot_values,
            )?;
            write_batch(REVNAT_MAP, batch.revnat.as_fd(), &indexes, &revnat_values)?;
            write_batch(NAMES_MAP, batch.names.as_fd(), &indexes, &name_values)?;
            // The frontends' own entries last, once everything they point at is there.
            write_batch(
                SERVICES_MAP,
                batch.services.as_fd(),
                &entry_keys,
                &entry_values,
            )
        };
        if let Err((map, source)) = write() {
            for key in &entry_keys {
                let _ = self.maps.services.remove(key);
            }
            self.undo_bulk(&backend_keys, &slot_keys, &indexes);
            return Err(LbError::Io {
                call: "BPF_MAP_UPDATE_BATCH",
                path: map.into(),
                source,
            });
        }
        let stats = ApplyStats {
            frontends_added: programmed.len(),
            backends_added: backend_keys.len(),
            map_writes: backend_keys.len() + slot_keys.len() + 3 * indexes.len(),
            ..ApplyStats::default()
        };
        self.frontends.extend(programmed);
        Ok(stats)
    }

    /// Removes what a failed batch may have written and frees its ids.
    fn undo_bulk(&mut self, backend_ids: &[u32], slot_keys: &[Lb4Key], rev_nat_indexes: &[u16]) {
        for key in slot_keys {
            let _ = self.maps.services.remove(key);
        }
        for &backend_id in backend_ids {
            // A service entry of the batch may have been reachable for a moment.
            let _ = self.free_backend(backend_id);
        }
        for index in rev_nat_indexes {
            let _ = self.maps.revnat.remove(index);
            let _ = self.maps.names.remove(index);
            self.rev_nat_ids.release(u32::from(*index));
        }
    }

    fn new_backend(
        &mut self,
        value: &Lb4Backend,
        name: &str,
        stats: &mut ApplyStats,
    ) -> Result<u32, LbError> {
        let backend_id = self
            .backend_ids
            .allocate()
            .ok_or_else(|| LbError::MapFull {
                map: BACKENDS_MAP,
                max_entries: self.maps.sizes.backends,
                frontend: name.to_owned(),
                flag: "backends",
            })?;
        // Free ids have zeroed counters (see `free_backend`), so a new backend starts at 0.
        let written = insert(&mut self.maps.backends, BACKENDS_MAP, &backend_id, value)
            .map_err(|error| full(error, name));
        if let Err(error) = written {
            self.backend_ids.release(backend_id);
            return Err(error);
        }
        stats.map_writes += 1;
        stats.backends_added += 1;
        Ok(backend_id)
    }

    /// Deletes a backend, zeroes its counters and frees its id: a free id always has zero
    /// counters, so allocation writes nothing but the backend.
    fn free_backend(&mut self, backend_id: u32) -> Result<(), LbError> {
        remove_backend(&mut self.maps, backend_id)?;
        self.zero_counters(backend_id)?;
        self.backend_ids.release(backend_id);
        Ok(())
    }

    fn zero_counters(&mut self, backend_id: u32) -> Result<(), LbError> {
        let zero = PerCpuValues::try_from(vec![LbBackendStats::default(); self.n_cpus]).map_err(
            |source| LbError::Io {
                call: "per-cpu counters of",
                path: BACKENDS_MAP.into(),
                source,
            },
        )?;
        self.maps
            .stats
            .set(backend_id, zero, 0)
            .map_err(|source| map_error(BACKEND_STATS_MAP, "zero counters", source))
    }

    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<ApplyStats, LbError> {
        let Some(programmed) = self.frontends.remove(key) else {
            return Ok(ApplyStats::default());
        };
        let base_key = map_key(key, 0);
        let mut stats = ApplyStats {
            frontends_removed: 1,
            ..ApplyStats::default()
        };
        // The service entry first: from here on no connection picks this frontend.
        remove(&mut self.maps.services, SERVICES_MAP, &base_key)?;
        for (index, slot) in programmed.slots.iter().enumerate() {
            remove(
                &mut self.maps.services,
                SERVICES_MAP,
                &base_key.with_slot(slot_number(index)),
            )?;
            if slot.backend.is_some() {
                self.free_backend(slot.backend_id)?;
                stats.backends_removed += 1;
            }
        }
        remove(&mut self.maps.revnat, REVNAT_MAP, &programmed.rev_nat_index)?;
        remove(&mut self.maps.names, NAMES_MAP, &programmed.rev_nat_index)?;
        self.rev_nat_ids
            .release(u32::from(programmed.rev_nat_index));
        stats.map_writes += 3 + 3 * programmed.slots.len();
        Ok(stats)
    }
}

fn slot_number(index: usize) -> u16 {
    // Slots are bounded by the u16 count checked when they are written.
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}

fn map_key(key: &FrontendKey, slot: u16) -> Lb4Key {
    Lb4Key::new(
        key.address,
        key.port,
        key.proto.number(),
        key.scope.number(),
        slot,
    )
}

fn frontend_key_of(key: &Lb4Key) -> Option<FrontendKey> {
    let proto = match key.proto {
        skiff_ebpf::lb::IPPROTO_TCP => Proto::Tcp,
        skiff_ebpf::lb::IPPROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let scope = match key.scope {
        skiff_ebpf::lb::SCOPE_INTERNAL => Scope::Internal,
        skiff_ebpf::lb::SCOPE_EXTERNAL => Scope::External,
        _ => return None,
    };
    Some(FrontendKey {
        address: key.address(),
        port: key.port(),
        proto,
        scope,
    })
}

fn backend_value(backend: &Backend, proto: u8) -> Lb4Backend {
    let mut flags = 0;
    if backend.terminating {
        flags |= skiff_ebpf::lb::BACKEND_TERMINATING;
    }
    if backend.local {
        flags |= skiff_ebpf::lb::BACKEND_LOCAL;
    }
    Lb4Backend::new(backend.address, backend.port, proto, flags)
}

fn flags_of(frontend: &Frontend) -> u8 {
    let mut flags = 0;
    if frontend.affinity_timeout.is_some() {
        flags |= SVC_AFFINITY;
    }
    match frontend.kind {
        FrontendKind::ClusterIp => {}
        FrontendKind::NodePort => flags |= SVC_NODEPORT,
        FrontendKind::ExternalIp | FrontendKind::LoadBalancer => flags |= SVC_EXTERNAL_IP,
    }
    if frontend.local_only {
        flags |= SVC_LOCAL;
    }
    flags
}

/// `namespace/name[:port] Kind`, the text in `lb4_names`.
pub fn name_of(frontend: &Frontend) -> String {
    let service = &frontend.service;
    let kind = kind_name(frontend.kind);
    if service.port_name.is_empty() {
        format!("{}/{} {kind}", service.namespace, service.name)
    } else {
        format!(
            "{}/{}:{} {kind}",
            service.namespace, service.name, service.port_name
        )
    }
}

pub fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::ExternalIp => "ExternalIP",
        FrontendKind::LoadBalancer => "LoadBalancer",
    }
}

/// The Service a `lb4_names` text belongs to.
pub fn owner_of(name: &str) -> ServiceName {
    let service = name.split(' ').next().unwrap_or_default();
    let service = service.split(':').next().unwrap_or_default();
    let (namespace, name) = service.split_once('/').unwrap_or(("", service));
    (namespace.to_owned(), name.to_owned())
}

fn map_error(map: &'static str, operation: &'static str, source: MapError) -> LbError {
    LbError::Map {
        map,
        operation,
        source: Box::new(source),
    }
}

/// A failed insert that ran out of room becomes [`LbError::MapFull`] naming the frontend.
fn full(error: LbError, frontend: &str) -> LbError {
    match error {
        LbError::Map { map, source, .. } if is_full(&source) => LbError::MapFull {
            map,
            max_entries: 0,
            frontend: frontend.to_owned(),
            flag: if map == BACKENDS_MAP {
                "backends"
            } else {
                "services"
            },
        },
        other => other,
    }
}

fn is_full(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(syscall)
        if syscall.io_error.raw_os_error() == Some(nix::errno::Errno::E2BIG as i32))
}

fn insert<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &'static str,
    key: &K,
    value: &V,
) -> Result<(), LbError> {
    map.insert(key, value, 0)
        .map_err(|source| map_error(name, "update", source))
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), LbError> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(syscall))
            if syscall.io_error.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) =>
        {
            Ok(())
        }
        Err(source) => Err(map_error(name, "delete", source)),
    }
}

fn remove_backend(maps: &mut Maps, backend_id: u32) -> Result<(), LbError> {
    remove(&mut maps.backends, BACKENDS_MAP, &backend_id)
}

/// One `BPF_MAP_UPDATE_BATCH` of `keys` and `values` into the map `name` (for the error).
fn write_batch<K: aya::Pod, V: aya::Pod>(
    name: &'static str,
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (&'static str, std::io::Error)> {
    skiff_ebpf::sys::map_update_batch(map, keys, values).map_err(|(_, source)| (name, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reuse_released_ones_and_stop_at_the_limit() {
        let mut ids = Ids::new(4);
        assert_eq!(
            (ids.allocate(), ids.allocate(), ids.allocate()),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(ids.allocate(), None);
        ids.release(2);
        assert_eq!(ids.allocate(), Some(2));
        let mut adopted = Ids::new(10);
        adopted.mark_used(5);
        adopted.mark_used(2);
        adopted.collect_free();
        assert_eq!(adopted.allocate(), Some(1));
        assert_eq!(adopted.allocate(), Some(3));
        assert_eq!(adopted.allocate(), Some(4));
        assert_eq!(adopted.allocate(), Some(6));
    }

    #[test]
    fn names_carry_the_owner() {
        assert_eq!(
            owner_of("default/web:http ClusterIP"),
            ("default".into(), "web".into())
        );
        assert_eq!(
            owner_of("kube-system/dns NodePort"),
            ("kube-system".into(), "dns".into())
        );
    }
}
