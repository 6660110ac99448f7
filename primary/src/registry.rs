//! The standbys this primary knows, like replication slots: the one owner
//! of their records and of the file that keeps them across restarts.
//!
//! Sessions claim a record by name and get a [`SessionGuard`] whose drop
//! marks the standby disconnected, so no exit path of a session can leave
//! a standby "connected" forever. Retention reads the records and hands
//! back its decisions through [`StandbyRegistry::decide`]; nobody else
//! writes them.
//!
//! Names are the key. A name belongs to one standby at a time: a second
//! session under a name that is connected is refused, naming the peer that
//! holds it. A reconnect under a known name with a different base (another
//! machine reusing the name, or the same machine after a start-over) takes
//! the slot over; that is logged with the previous base and position, and
//! the slot keeps holding logs from the older of the two positions until
//! the new holder acknowledges, so a takeover never releases logs silently.
//!
//! The file fails closed: when it cannot be read at start, the registry
//! remembers why, retention removes nothing, the file is not overwritten
//! (that would forget offline standbys), and every retention pass tries to
//! read it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tandem_shared::durable::{ControlFile, ControlFileError};
use tandem_shared::wire::StandbyInfo;
use tandem_shared::LogPosition;
use tokio::sync::watch;

const STANDBYS_FILE: &str = "standbys";
const FORMAT_VERSION: u32 = 1;

/// What the primary knows of a standby. Kept in the state directory so a
/// restarted primary still holds back the logs an offline standby needs,
/// like a replication slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StandbyRecord {
    pub peer: String,
    #[serde(skip)]
    pub connected: bool,
    pub base_id: String,
    pub acked: LogPosition,
    pub last_contact_unix_ms: u64,
    /// Dropped for holding back more log than the cap allows: its logs are
    /// no longer kept, and it will need a new base.
    #[serde(default)]
    pub dropped: bool,
    /// End of the log archived by the standby's continuous archive; `None`
    /// when it has none registered.
    #[serde(default)]
    pub archived: Option<LogPosition>,
    /// The archive fell behind by more than the cap: files below this were
    /// removed without waiting for it (0: never).
    #[serde(default)]
    pub archive_released_below: u32,
    /// Log bytes kept only for this standby.
    #[serde(skip)]
    pub held_back_bytes: u64,
    /// Of those, bytes kept only because its archive lacks them.
    #[serde(skip)]
    pub held_for_archive_bytes: u64,
    /// What this standby acknowledged as fsynced in its current session;
    /// `None` before its first ack. Unlike `acked` (which a session's start
    /// or a takeover also sets, for retention), only an ack sets it, so a
    /// commit waiter never counts a position the standby did not fsync.
    #[serde(skip)]
    pub session_acked: Option<LogPosition>,
}

impl StandbyRecord {
    /// First log file this standby still needs on the primary: the one its
    /// acknowledged position is in, or an earlier one its archive lacks.
    pub fn needs_from(&self) -> u32 {
        match self.archived {
            Some(a) => self.acked.file.min(a.file.max(self.archive_released_below)),
            None => self.acked.file,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "a standby named {name:?} is already connected to this primary (from {peer}); \
         standby names must be unique: give this one another --name"
    )]
    NameInUse { name: String, peer: String },
    #[error(
        "the known standbys cannot be read ({0}); retention removes nothing until the file is repaired or removed"
    )]
    Unreadable(String),
    #[error("saving the known standbys: {0}")]
    Store(#[from] ControlFileError),
}

/// The last Hello of a standby, in memory only: for the status, so an
/// operator sees a fenced or refused standby (a refused new standby has
/// no record).
#[derive(Debug, Clone, Default)]
struct LastHello {
    peer: String,
    epoch: u64,
    /// Why it was refused; empty when accepted.
    refused: String,
}

struct Records {
    map: BTreeMap<String, StandbyRecord>,
    hellos: BTreeMap<String, LastHello>,
    /// Why the standbys file could not be read; `None` once it could.
    unreadable: Option<String>,
}

pub struct StandbyRegistry {
    path: PathBuf,
    records: Mutex<Records>,
    /// The connected standbys' durable acks, republished on every ack,
    /// connect and disconnect: commit waiters wake on it (see `wait`).
    durable: watch::Sender<DurableAcks>,
}

/// What the connected standbys hold durably, as commit waiters see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurableAcks {
    /// Standbys connected now.
    pub connected: usize,
    /// Their acknowledged durable ends in this session, highest first
    /// (a connected standby that has not acknowledged yet is absent).
    pub durable: Vec<LogPosition>,
}

impl DurableAcks {
    fn of(map: &BTreeMap<String, StandbyRecord>) -> Self {
        let mut durable: Vec<LogPosition> = map
            .values()
            .filter(|r| r.connected)
            .filter_map(|r| r.session_acked)
            .collect();
        durable.sort_unstable_by(|a, b| b.cmp(a));
        Self {
            connected: map.values().filter(|r| r.connected).count(),
            durable,
        }
    }

    /// How many connected standbys hold the log record that starts at
    /// `lsn`: their durable end is strictly beyond it (BDB-NOTES.md §10: a commit
    /// token names where the commit record starts).
    pub fn holding(&self, lsn: LogPosition) -> usize {
        self.durable.iter().take_while(|d| **d > lsn).count()
    }
}

fn load(path: &Path) -> Result<BTreeMap<String, StandbyRecord>, ControlFileError> {
    Ok(ControlFile::load(path, FORMAT_VERSION)?.unwrap_or_default())
}

impl StandbyRegistry {
    /// Loads the records kept in `state_dir`. An unreadable file is not an
    /// error here (the primary still serves), but it blocks retention.
    pub fn open(state_dir: &Path) -> Self {
        let path = state_dir.join(STANDBYS_FILE);
        let (map, unreadable) = match load(&path) {
            Ok(map) => (map, None),
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "RETENTION BLOCKED: cannot read the known standbys; no log file will be removed until \
                     the file is repaired, or removed by an operator who knows no offline standby needs the logs"
                );
                (BTreeMap::new(), Some(e.to_string()))
            }
        };
        Self {
            path,
            records: Mutex::new(Records {
                map,
                hellos: BTreeMap::new(),
                unreadable,
            }),
            durable: watch::channel(DurableAcks::default()).0,
        }
    }

    /// The connected standbys' durable acks, updated as they change.
    pub fn durable_acks(&self) -> watch::Receiver<DurableAcks> {
        self.durable.subscribe()
    }

    /// Republishes the durable acks after a change under the lock; waiters
    /// wake only when what they can see changed.
    fn publish(&self, map: &BTreeMap<String, StandbyRecord>) {
        let now = DurableAcks::of(map);
        self.durable.send_if_modified(|cur| {
            let changed = *cur != now;
            if changed {
                *cur = now;
            }
            changed
        });
    }

    /// The records hold plain data with no invariant a panic could break
    /// half-way, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `name` for a session, or refuses when a session under that
    /// name is still connected.
    pub fn claim(self: &Arc<Self>, name: &str, peer: &str) -> Result<SessionGuard, RegistryError> {
        let mut records = self.lock();
        let created = !records.map.contains_key(name);
        let r = records.map.entry(name.to_owned()).or_default();
        if r.connected {
            return Err(RegistryError::NameInUse {
                name: name.to_owned(),
                peer: r.peer.clone(),
            });
        }
        r.connected = true;
        r.session_acked = None;
        r.peer = peer.to_owned();
        r.last_contact_unix_ms = tandem_shared::now_unix_ms();
        self.publish(&records.map);
        Ok(SessionGuard {
            registry: self.clone(),
            name: name.to_owned(),
            unstarted_new: AtomicBool::new(created),
        })
    }

    pub fn snapshot(&self) -> BTreeMap<String, StandbyRecord> {
        self.lock().map.clone()
    }

    /// Why retention is blocked, if it is.
    pub fn unreadable(&self) -> Option<String> {
        self.lock().unreadable.clone()
    }

    /// Runs `decide` on the records under the lock, so no session changes
    /// them between the decision and its application, then makes the
    /// result durable. Refuses while the file is unreadable (after trying
    /// to read it once more): the caller then removes nothing.
    pub fn decide<T>(
        &self,
        decide: impl FnOnce(&mut BTreeMap<String, StandbyRecord>) -> T,
    ) -> Result<T, RegistryError> {
        let (out, snapshot) = {
            let mut records = self.lock();
            if records.unreadable.is_some() {
                match load(&self.path) {
                    Ok(loaded) => {
                        tracing::warn!("the known standbys can be read again; retention resumes");
                        records.unreadable = None;
                        for (name, r) in loaded {
                            // A standby that connected meanwhile is newer.
                            if !records.map.get(&name).is_some_and(|m| m.connected) {
                                records.map.insert(name, r);
                            }
                        }
                    }
                    Err(e) => {
                        let why = e.to_string();
                        records.unreadable = Some(why.clone());
                        return Err(RegistryError::Unreadable(why));
                    }
                }
            }
            let out = decide(&mut records.map);
            (out, records.map.clone())
        };
        // Durable before anything is removed, so a restarted primary never
        // forgets a standby it removed files for.
        ControlFile::store(&self.path, FORMAT_VERSION, &snapshot)?;
        Ok(out)
    }

    /// Notes a standby's Hello at `epoch` and why it was refused (`None`:
    /// accepted), for the status.
    pub fn hello_seen(&self, name: &str, peer: &str, epoch: u64, refused: Option<&str>) {
        self.lock().hellos.insert(
            name.to_owned(),
            LastHello {
                peer: peer.to_owned(),
                epoch,
                refused: refused.unwrap_or_default().to_owned(),
            },
        );
    }

    /// The records as the status reports them, lag measured against `end`,
    /// and the standbys refused before they got one.
    pub fn status(&self, end: LogPosition, lg_max: u32) -> Vec<StandbyInfo> {
        let records = self.lock();
        let hello = |name: &str| records.hellos.get(name).cloned().unwrap_or_default();
        let unrecorded = records
            .hellos
            .iter()
            .filter(|(name, _)| !records.map.contains_key(*name))
            .map(|(name, h)| StandbyInfo {
                name: name.clone(),
                peer: h.peer.clone(),
                epoch: h.epoch,
                refused: h.refused.clone(),
                ..Default::default()
            });
        records
            .map
            .iter()
            .map(|(name, r)| StandbyInfo {
                name: name.clone(),
                peer: r.peer.clone(),
                connected: r.connected,
                acked: Some(r.acked.into()),
                lag_bytes: r.acked.bytes_until(end, lg_max),
                last_contact_unix_ms: r.last_contact_unix_ms,
                base_id: r.base_id.clone(),
                held_back_bytes: r.held_back_bytes,
                dropped: r.dropped,
                archived: r.archived.map(Into::into),
                held_for_archive_bytes: r.held_for_archive_bytes,
                archive_released_below: r.archive_released_below,
                refused: hello(name).refused,
                epoch: hello(name).epoch,
            })
            .chain(unrecorded)
            .collect()
    }

    /// Makes the records durable now (outside a retention pass). A slot
    /// that exists only in memory is forgotten by a primary killed before
    /// its next retention pass, and the restarted primary would then remove
    /// every log file that standby still needs.
    fn persist(&self) -> Result<(), ControlFileError> {
        let snapshot = {
            let records = self.lock();
            if records.unreadable.is_some() {
                // Never overwrite a file that could not be read.
                return Ok(());
            }
            records.map.clone()
        };
        ControlFile::store(&self.path, FORMAT_VERSION, &snapshot)
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut StandbyRecord)) {
        let mut records = self.lock();
        if let Some(r) = records.map.get_mut(name) {
            f(r);
            self.publish(&records.map);
        }
    }
}

/// A session's hold on its standby's record; dropping it marks the standby
/// disconnected.
pub struct SessionGuard {
    registry: Arc<StandbyRegistry>,
    name: String,
    /// The record was created by this claim and no stream has started: a
    /// refused standby (wrong environment, fenced, diverged) must not
    /// leave a slot behind that holds every log file.
    unstarted_new: AtomicBool,
}

impl SessionGuard {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session starts streaming `base_id` from `from`.
    pub fn started(&self, base_id: &str, from: LogPosition) {
        self.unstarted_new.store(false, Ordering::Relaxed);
        self.registry.update(&self.name, |r| {
            if !r.base_id.is_empty() && r.base_id != base_id && !r.dropped {
                tracing::warn!(
                    standby = %self.name, previous_base = %r.base_id, previous_acked = %r.acked, base = %base_id, %from,
                    "this standby name now holds a different base (a start-over, a new base after a gap, or another \
                     machine using the same --name, which must not happen); its slot keeps the older position held \
                     until the new holder acknowledges"
                );
                r.acked = r.acked.min(from);
            } else {
                r.acked = from;
            }
            r.base_id = base_id.to_owned();
            r.dropped = false;
            r.last_contact_unix_ms = tandem_shared::now_unix_ms();
        });
        if let Err(e) = self.registry.persist() {
            tracing::error!(standby = %self.name, error = %e, "cannot record the standby's slot durably; retention keeps it in memory only");
        }
    }

    /// A rebase moved the standby to a new base mid-session.
    pub fn rebased(&self, base_id: &str) {
        self.registry
            .update(&self.name, |r| r.base_id = base_id.to_owned());
    }

    /// The session resumed where the standby's Hello proved it holds a
    /// promotable base up to `at`: for commit waiters, as good as an ack
    /// (none is sent for it).
    pub fn holds(&self, at: LogPosition) {
        self.registry.update(&self.name, |r| {
            r.session_acked = r.session_acked.max(Some(at));
        });
    }

    /// An ack: `at` is fsynced on the standby; `promotable`: a promotion of
    /// the standby now would hold it (false while its first base is still
    /// being copied, or a replacement base is staged beside its mirror).
    /// Only promotable acks count for commit waiters.
    pub fn acked(&self, at: LogPosition, archived: Option<LogPosition>, promotable: bool) {
        self.registry.update(&self.name, |r| {
            r.acked = at;
            if promotable {
                r.session_acked = Some(at);
            }
            r.archived = archived;
            r.last_contact_unix_ms = tandem_shared::now_unix_ms();
        });
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.unstarted_new.load(Ordering::Relaxed) {
            let mut records = self.registry.lock();
            records.map.remove(&self.name);
            self.registry.publish(&records.map);
        } else {
            self.registry.update(&self.name, |r| {
                r.connected = false;
                r.session_acked = None;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_needs_the_log_from_what_it_or_its_archive_lacks() {
        let mut r = StandbyRecord {
            acked: LogPosition::new(9, 100),
            ..Default::default()
        };
        assert_eq!(r.needs_from(), 9);
        r.archived = Some(LogPosition::new(4, 28));
        assert_eq!(r.needs_from(), 4);
        // Released past the cap: the archive no longer holds files below 7.
        r.archive_released_below = 7;
        assert_eq!(r.needs_from(), 7);
        // An archive ahead of the standby never extends what it needs.
        r.archived = Some(LogPosition::new(12, 0));
        assert_eq!(r.needs_from(), 9);
    }

    #[test]
    fn waiters_see_only_what_connected_standbys_acked_in_their_session() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(StandbyRegistry::open(dir.path()));
        let acks = reg.durable_acks();
        let at = LogPosition::new(3, 500);
        let east = reg.claim("east", "a").unwrap();
        // Where a stream starts is not something the standby fsynced here.
        east.started("base-1", LogPosition::new(3, 900));
        assert_eq!(acks.borrow().connected, 1);
        assert_eq!(acks.borrow().holding(at), 0);
        east.acked(LogPosition::new(3, 600), None, true);
        let west = reg.claim("west", "b").unwrap();
        west.started("base-1", LogPosition::new(1, 0));
        // Its base copy is not complete: fsynced log it cannot be promoted
        // to holds nothing for a waiter.
        west.acked(LogPosition::new(3, 450), None, false);
        assert_eq!(acks.borrow().holding(LogPosition::new(1, 0)), 1);
        west.acked(LogPosition::new(3, 400), None, true);
        assert_eq!(acks.borrow().holding(LogPosition::new(1, 0)), 2);
        assert_eq!(acks.borrow().connected, 2);
        assert_eq!(acks.borrow().holding(at), 1);
        west.acked(LogPosition::new(4, 28), None, true);
        assert_eq!(acks.borrow().holding(at), 2);
        assert_eq!(acks.borrow().durable[0], LogPosition::new(4, 28));
        // Gone: what it acknowledged no longer counts, nor after it returns.
        drop(west);
        assert_eq!(acks.borrow().holding(at), 1);
        let west = reg.claim("west", "b").unwrap();
        west.started("base-1", LogPosition::new(4, 28));
        assert_eq!(acks.borrow().connected, 2);
        assert_eq!(acks.borrow().holding(at), 1);
        // Unless it resumed there with a complete base (its Hello proved
        // what it holds; it sends no ack for that).
        west.holds(LogPosition::new(4, 28));
        assert_eq!(acks.borrow().holding(at), 2);
        drop(east);
        drop(west);
        assert_eq!(*acks.borrow(), DurableAcks::default());
    }

    #[test]
    fn a_name_is_held_by_one_session_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(StandbyRegistry::open(dir.path()));
        let first = reg.claim("east", "10.0.0.1:5000").unwrap();
        first.started("base-1", LogPosition::new(1, 0));
        let err = reg.claim("east", "10.0.0.2:6000").err().unwrap();
        assert!(err.to_string().contains("10.0.0.1:5000"), "{err}");
        drop(first);
        assert!(!reg.snapshot()["east"].connected);
        let _second = reg.claim("east", "10.0.0.2:6000").unwrap();
        assert!(reg.snapshot()["east"].connected);
    }

    #[test]
    fn a_standby_refused_before_its_stream_started_leaves_no_slot() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(StandbyRegistry::open(dir.path()));
        drop(reg.claim("wrong-env", "a").unwrap());
        assert!(reg.snapshot().is_empty());
        // A known standby refused later keeps its slot.
        let g = reg.claim("east", "a").unwrap();
        g.started("base-1", LogPosition::new(4, 0));
        drop(g);
        drop(reg.claim("east", "a").unwrap());
        assert_eq!(reg.snapshot()["east"].acked, LogPosition::new(4, 0));
    }

    #[test]
    fn a_refused_standby_shows_in_the_status_until_it_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(StandbyRegistry::open(dir.path()));
        let end = LogPosition::new(1, 0);
        // Refused before it got a slot: shown all the same.
        drop(reg.claim("b", "peer-b").unwrap());
        reg.hello_seen("b", "peer-b", 2, Some("FENCED: test"));
        let st = reg.status(end, 0);
        assert_eq!(st.len(), 1);
        assert_eq!((st[0].epoch, st[0].refused.as_str()), (2, "FENCED: test"));
        // Accepted later: the refusal is gone, the record is there.
        let g = reg.claim("b", "peer-b").unwrap();
        g.started("base", end);
        reg.hello_seen("b", "peer-b", 2, None);
        let st = reg.status(end, 0);
        assert_eq!(st.len(), 1);
        assert!(st[0].connected && st[0].refused.is_empty(), "{st:?}");
    }

    #[test]
    fn a_takeover_keeps_the_older_position_held() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(StandbyRegistry::open(dir.path()));
        let g = reg.claim("east", "a").unwrap();
        g.started("base-1", LogPosition::new(3, 0));
        g.acked(LogPosition::new(5, 100), None, true);
        drop(g);
        let g = reg.claim("east", "b").unwrap();
        g.started("base-2", LogPosition::new(9, 0));
        assert_eq!(reg.snapshot()["east"].acked, LogPosition::new(5, 100));
        g.acked(LogPosition::new(9, 200), None, true);
        assert_eq!(reg.snapshot()["east"].acked, LogPosition::new(9, 200));
    }

    #[test]
    fn an_unreadable_file_blocks_decisions_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STANDBYS_FILE);
        std::fs::write(&path, b"garbage").unwrap();
        let reg = Arc::new(StandbyRegistry::open(dir.path()));
        assert!(reg.unreadable().is_some());
        let g = reg.claim("east", "a").unwrap();
        g.started("base-1", LogPosition::new(1, 0));
        assert!(matches!(
            reg.decide(|_| ()),
            Err(RegistryError::Unreadable(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"garbage");
        // Repaired (here: removed by the operator): decisions resume.
        std::fs::remove_file(&path).unwrap();
        reg.decide(|_| ()).unwrap();
        assert!(reg.unreadable().is_none());
        assert!(reg.snapshot()["east"].connected);
    }
}
