//! [`RedbHistory`]: the history in one redb file. Each `put_many` is one write transaction
//! committed with `Durability::Immediate` (fsync'd before `commit` returns), so after a crash or
//! `kill -9` the file opens at the last committed batch; nothing half-written is visible.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Builder, Database, DatabaseError, ReadOnlyTable, ReadableDatabase, ReadableTable, StorageError, Table,
    TableDefinition,
};

use crate::alert::Survey;

use super::core::{self, Kv, KvRead, Rules, FORMAT, FORMAT_KEY, T};
use super::outbox::{self, NewNotification, Outbox, OutboxStats, PendingNotification, Queued, Settle};
use super::{Announcement, Epoch, HistoryConfig, HistoryError, HistoryStats, HistoryStore, ObjectHistory, PutOutcome};

/// redb's page cache; its default (1 GiB) is more than a history needs next to the GPU work.
const CACHE_BYTES: usize = 64 << 20;

type Def = TableDefinition<'static, &'static [u8], &'static [u8]>;

pub(super) fn def(t: T) -> Def {
    TableDefinition::new(t.name())
}

/// The history store in one redb file.
pub struct RedbHistory {
    db: Database,
    path: PathBuf,
    rules: Rules,
    moved_aside: Option<PathBuf>,
}

impl std::fmt::Debug for RedbHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbHistory").field("path", &self.path).field("moved_aside", &self.moved_aside).finish()
    }
}

impl RedbHistory {
    /// Opens `config.path`, creating it if missing. A file that is not a readable history store
    /// is an [`HistoryError::Corrupt`] naming it, unless `config.rebuild_corrupt` (then as
    /// [`RedbHistory::open_or_rebuild`]).
    pub fn open(config: &HistoryConfig) -> Result<RedbHistory, HistoryError> {
        if config.rebuild_corrupt {
            return Self::open_or_rebuild(config);
        }
        let rules = Rules::new(config)?;
        let db = open_db(&config.path)?;
        Ok(RedbHistory { db, path: config.path.clone(), rules, moved_aside: None })
    }

    /// Opens `config.path`; if it is corrupt (or not a history store), renames it to
    /// `<path>.corrupt-<unix time>`, logs a warning and starts an empty store in its place.
    /// [`RedbHistory::moved_aside`] then says where the bad file went.
    pub fn open_or_rebuild(config: &HistoryConfig) -> Result<RedbHistory, HistoryError> {
        let rules = Rules::new(config)?;
        let path = &config.path;
        match open_db(path) {
            Ok(db) => Ok(RedbHistory { db, path: path.clone(), rules, moved_aside: None }),
            Err(HistoryError::Corrupt { reason, .. }) => {
                let aside = aside_name(path);
                std::fs::rename(path, &aside).map_err(|source| HistoryError::Io { path: path.clone(), source })?;
                tracing::warn!(
                    path = %path.display(),
                    aside = %aside.display(),
                    %reason,
                    "history file corrupt: moved aside, starting empty"
                );
                let db = open_db(path)?;
                Ok(RedbHistory { db, path: path.clone(), rules, moved_aside: Some(aside) })
            }
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where [`RedbHistory::open_or_rebuild`] moved a corrupt file, if it did.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.moved_aside.as_deref()
    }

    fn storage<E: Into<redb::Error>>(&self) -> impl Fn(E) -> HistoryError + '_ {
        move |e| storage(&self.path, e)
    }
}

fn storage<E: Into<redb::Error>>(path: &Path, e: E) -> HistoryError {
    HistoryError::Storage { path: path.to_owned(), source: Box::new(e.into()) }
}

/// `<path>.corrupt-<unix time>`, with a counter added if that exists already.
fn aside_name(path: &Path) -> PathBuf {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let base = format!("{}.corrupt-{secs}", path.display());
    let mut aside = PathBuf::from(&base);
    let mut n = 1;
    while aside.exists() {
        aside = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    aside
}

/// Opens or creates the file, verifying every page's checksum (a file damaged outside redb is
/// reported, not trusted), then checks or writes the layout entry and creates the tables.
fn open_db(path: &Path) -> Result<Database, HistoryError> {
    let corrupt = |reason: String| HistoryError::Corrupt { path: path.to_owned(), reason };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| HistoryError::Io { path: path.to_owned(), source })?;
    }
    if path.is_dir() {
        // Not damage to rebuild from: someone's folder is in the way.
        let source = std::io::Error::other("a directory, not a file");
        return Err(HistoryError::Io { path: path.to_owned(), source });
    }
    // redb reports damage as errors, but a file it never wrote can still trip an assertion.
    let opened = catch_unwind(AssertUnwindSafe(|| {
        let mut b = Builder::new();
        b.set_cache_size(CACHE_BYTES).set_check_integrity_on_open(true);
        b.create(path)
    }));
    let db = match opened {
        Err(_) => return Err(corrupt("redb panicked reading it".into())),
        Ok(Ok(db)) => db,
        Ok(Err(e)) => {
            return Err(match e {
                DatabaseError::DatabaseAlreadyOpen => HistoryError::Locked { path: path.to_owned() },
                DatabaseError::Storage(StorageError::Io(source))
                    if !matches!(
                        source.kind(),
                        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    HistoryError::Io { path: path.to_owned(), source }
                }
                DatabaseError::Storage(s) => corrupt(s.to_string()),
                DatabaseError::UpgradeRequired(v) => {
                    corrupt(format!("redb file format {v}, older than this redb reads"))
                }
                DatabaseError::RepairAborted => corrupt("redb could not repair it".into()),
                other => storage(path, other),
            })
        }
    };
    let txn = db.begin_write().map_err(|e| storage(path, e))?;
    {
        let mut meta = txn.open_table(def(T::Meta)).map_err(|e| match e {
            redb::TableError::TableTypeMismatch { .. } => corrupt(format!("{e}")),
            e => storage(path, e),
        })?;
        let format = meta.get(FORMAT_KEY).map_err(|e| storage(path, e))?.map(|g| g.value().to_vec());
        match format {
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(corrupt(format!("history layout {f:?}, this blink reads {FORMAT:?}"))),
            None => {
                // A fresh file, or a redb file of something else: refuse one with other tables.
                let others: Vec<String> = txn
                    .list_tables()
                    .map_err(|e| storage(path, e))?
                    .map(|h| redb::TableHandle::name(&h).to_owned())
                    .filter(|n| n != T::Meta.name())
                    .collect();
                if !others.is_empty() {
                    return Err(corrupt(format!("a redb file with other tables ({})", others.join(", "))));
                }
                meta.insert(FORMAT_KEY, &FORMAT[..]).map_err(|e| storage(path, e))?;
            }
        }
    }
    for t in T::ALL {
        txn.open_table(def(t)).map_err(|e| corrupt(format!("table {}: {e}", t.name())))?;
    }
    txn.commit().map_err(|e| storage(path, e))?;
    Ok(db)
}

/// The tables of one write transaction.
struct WriteTables<'txn> {
    path: &'txn Path,
    t: Vec<Table<'txn, &'static [u8], &'static [u8]>>,
}

/// The tables of one read transaction.
struct ReadTables<'a> {
    path: &'a Path,
    t: Vec<ReadOnlyTable<&'static [u8], &'static [u8]>>,
}

fn get<Tb: ReadableTable<&'static [u8], &'static [u8]>>(
    path: &Path,
    table: &Tb,
    key: &[u8],
) -> Result<Option<Vec<u8>>, HistoryError> {
    Ok(table.get(key).map_err(|e| storage(path, e))?.map(|g| g.value().to_vec()))
}

fn keys<Tb: ReadableTable<&'static [u8], &'static [u8]>>(
    path: &Path,
    table: &Tb,
    lo: &[u8],
    hi: &[u8],
) -> Result<Vec<Vec<u8>>, HistoryError> {
    if lo >= hi {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in table.range(lo..hi).map_err(|e| storage(path, e))? {
        let (k, _) = item.map_err(|e| storage(path, e))?;
        out.push(k.value().to_vec());
    }
    Ok(out)
}

fn first_key<Tb: ReadableTable<&'static [u8], &'static [u8]>>(
    path: &Path,
    table: &Tb,
) -> Result<Option<Vec<u8>>, HistoryError> {
    Ok(table.first().map_err(|e| storage(path, e))?.map(|(k, _)| k.value().to_vec()))
}

/// Reads go through the same three helpers for the write and the read transaction's tables.
macro_rules! kv_read {
    ($tables:ident) => {
        impl KvRead for $tables<'_> {
            fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, HistoryError> {
                get(self.path, &self.t[t as usize], key)
            }
            fn keys(&self, t: T, lo: &[u8], hi: &[u8]) -> Result<Vec<Vec<u8>>, HistoryError> {
                keys(self.path, &self.t[t as usize], lo, hi)
            }
            fn first_key(&self, t: T) -> Result<Option<Vec<u8>>, HistoryError> {
                first_key(self.path, &self.t[t as usize])
            }
        }
    };
}
kv_read!(WriteTables);
kv_read!(ReadTables);

impl Kv for WriteTables<'_> {
    fn put(&mut self, t: T, key: &[u8], value: &[u8]) -> Result<(), HistoryError> {
        self.t[t as usize].insert(key, value).map_err(|e| storage(self.path, e))?;
        Ok(())
    }
    fn del(&mut self, t: T, key: &[u8]) -> Result<(), HistoryError> {
        self.t[t as usize].remove(key).map_err(|e| storage(self.path, e))?;
        Ok(())
    }
}

impl RedbHistory {
    fn read<R>(&self, f: impl FnOnce(&ReadTables<'_>) -> Result<R, HistoryError>) -> Result<R, HistoryError> {
        let txn = self.db.begin_read().map_err(self.storage())?;
        let t =
            T::ALL.iter().map(|t| txn.open_table(def(*t))).collect::<Result<Vec<_>, _>>().map_err(self.storage())?;
        f(&ReadTables { path: &self.path, t })
    }
}

impl RedbHistory {
    /// `f` on the tables of one write transaction, committed (durably) when it returns `Ok`.
    fn write<R>(&self, f: impl FnOnce(&mut WriteTables<'_>) -> Result<R, HistoryError>) -> Result<R, HistoryError> {
        let txn = self.db.begin_write().map_err(self.storage())?;
        let out = {
            let t = T::ALL
                .iter()
                .map(|t| txn.open_table(def(*t)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.storage())?;
            let mut tables = WriteTables { path: &self.path, t };
            f(&mut tables)?
        };
        txn.commit().map_err(self.storage())?;
        Ok(out)
    }
}

impl Outbox for RedbHistory {
    fn queue_notifications(&self, items: &[NewNotification]) -> Result<Vec<Queued>, HistoryError> {
        self.write(|t| outbox::queue(t, items))
    }

    fn due_notifications(&self, now_ms: u64, limit: usize) -> Result<Vec<PendingNotification>, HistoryError> {
        self.read(|t| outbox::due(t, now_ms, limit))
    }

    fn next_due_after(&self, after_ms: u64) -> Result<Option<u64>, HistoryError> {
        self.read(|t| outbox::next_due_after(t, after_ms))
    }

    fn settle_notifications(&self, list: &[(PendingNotification, Settle)]) -> Result<(), HistoryError> {
        self.write(|t| outbox::settle(t, list))
    }

    fn outbox_stats(&self) -> Result<OutboxStats, HistoryError> {
        self.read(|t| outbox::stats(t))
    }

    fn forget_notified_before(&self, before_ms: u64, limit: usize) -> Result<u64, HistoryError> {
        self.write(|t| outbox::forget_before(t, before_ms, limit))
    }
}

impl super::ReplayLog for RedbHistory {
    fn append_detections(&self, items: &[(u64, Vec<u8>)], keep: usize) -> Result<(), HistoryError> {
        self.write(|t| super::replay::append(t, items, keep))
    }

    fn recent_detections(&self, n: usize) -> Result<Vec<(u64, Vec<u8>)>, HistoryError> {
        self.read(|t| super::replay::recent(t, n))
    }

    fn reserved_sequence(&self) -> Result<u64, HistoryError> {
        self.read(|t| super::replay::reserved(t))
    }

    fn reserve_sequence(&self, upto: u64) -> Result<(), HistoryError> {
        self.write(|t| super::replay::reserve(t, upto))
    }
}

impl HistoryStore for RedbHistory {
    fn outbox(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn Outbox>> {
        Some(self)
    }

    fn replay_log(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn super::ReplayLog>> {
        Some(self)
    }

    fn put_many(&self, epochs: &[Epoch]) -> Result<Vec<PutOutcome>, HistoryError> {
        // An error inside drops the uncommitted transaction, which aborts it: all or nothing.
        self.write(|t| core::put_batch(t, &self.rules, epochs))
    }

    fn find(&self, survey: Survey, object_id: &str, ra: f64, dec: f64) -> Result<Option<String>, HistoryError> {
        self.read(|t| core::find(t, &self.rules, survey, object_id, ra, dec))
    }

    fn object(&self, key: &str) -> Result<Option<ObjectHistory>, HistoryError> {
        self.read(|t| core::object(t, key))
    }

    fn stats(&self) -> Result<HistoryStats, HistoryError> {
        self.read(|t| core::stats(t))
    }

    fn announcements(&self, object: &str) -> Result<Vec<Announcement>, HistoryError> {
        self.read(|t| core::announcements(t, object))
    }

    fn record_announcements(&self, list: &[(String, Announcement)]) -> Result<(), HistoryError> {
        self.write(|t| core::record_announcements(t, list))
    }
}
