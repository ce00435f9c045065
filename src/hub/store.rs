//! Durable history: every routed event, per user, in an SQLite file of changecast's own.
//!
//! In: batches of encoded events with their recipients, and the source position the batch
//! ends at ([`HistoryStore::append`]), committed in ONE transaction — so after a crash at
//! any point the history and the source checkpoint agree: nothing lost, nothing twice.
//! Out: a user's events after an id ([`HistoryStore::replay`]), the epoch, the floor below
//! which history is incomplete, and the checkpoint to resume the source from.
//!
//! Retention ([`HistoryStore::prune`]): by age, and by count per user. What is pruned
//! raises a floor (global for age, per user for count), so a client asking for pruned
//! history gets `gap` rather than a silent hole.
//!
//! Called from blocking threads only (`spawn_blocking`): SQLite calls block.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::Frame;
use crate::change::{Position, UserId};

/// Replays larger than this are answered with `gap`: refetching state is cheaper.
pub const MAX_REPLAY: usize = 50_000;

/// One event to append.
pub struct Record<'a> {
    pub seq: u64,
    pub json: &'a str,
    pub recipients: &'a [UserId],
}

/// What [`HistoryStore::prune`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    pub deliveries: u64,
}

/// The history file.
pub struct HistoryStore {
    path: PathBuf,
    /// The one writer connection; readers open their own.
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opened history: the store and what it remembers.
pub struct Opened {
    pub store: Arc<HistoryStore>,
    pub epoch: String,
    /// Highest event sequence number stored.
    pub head: u64,
    /// Resuming needs `since >= floor` (history lost or pruned below it).
    pub floor: u64,
    /// Where the source was when the last batch was stored.
    pub checkpoint: Option<Position>,
}

impl HistoryStore {
    /// Opens (or creates) the history at `path`. A new file gets a new epoch.
    pub fn open(path: &Path, new_epoch: impl FnOnce() -> String) -> rusqlite::Result<Opened> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a commit survives a process crash (kill -9); only a power
        // loss can take the last commits, and then the source checkpoint goes with them.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
             CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, json TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS deliveries (
                 user TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (user, seq)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS user_floors (user TEXT PRIMARY KEY, floor INTEGER NOT NULL) WITHOUT ROWID;",
        )?;
        let get = |key: &str| -> rusqlite::Result<Option<Vec<u8>>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let epoch = match get("epoch")? {
            Some(e) => String::from_utf8_lossy(&e).into_owned(),
            None => {
                let e = new_epoch();
                conn.execute("INSERT INTO meta VALUES ('epoch', ?1)", [e.as_bytes()])?;
                e
            }
        };
        let floor = get("floor")?
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let checkpoint = get("checkpoint")?.map(Position);
        let head: u64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
            r.get::<_, i64>(0)
        })? as u64;
        // The floor and head may come from meta alone when every event has been pruned.
        let head = head.max(
            get("head")?
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        );
        let store = HistoryStore {
            path: path.to_owned(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
        };
        Ok(Opened {
            store: Arc::new(store),
            epoch,
            head,
            floor,
            checkpoint,
        })
    }

    /// Appends events and records `checkpoint` (when the events came from the source), in
    /// one transaction.
    pub fn append(
        &self,
        records: &[Record<'_>],
        checkpoint: Option<&Position>,
    ) -> rusqlite::Result<()> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let at = now_secs();
            let mut ev =
                tx.prepare_cached("INSERT INTO events (seq, at, json) VALUES (?1, ?2, ?3)")?;
            let mut del =
                tx.prepare_cached("INSERT INTO deliveries (user, seq) VALUES (?1, ?2)")?;
            for r in records {
                ev.execute(params![r.seq as i64, at, r.json])?;
                for user in r.recipients {
                    del.execute(params![&**user, r.seq as i64])?;
                }
            }
            if let Some(last) = records.last() {
                tx.execute(
                    "INSERT INTO meta VALUES ('head', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [last.seq.to_string().as_bytes()],
                )?;
            }
            if let Some(checkpoint) = checkpoint {
                tx.execute(
                    "INSERT INTO meta VALUES ('checkpoint', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [&checkpoint.0],
                )?;
            }
        }
        tx.commit()
    }

    /// Records that resuming from before `floor` is incomplete (the source lost history).
    pub fn set_floor(&self, floor: u64) -> rusqlite::Result<()> {
        lock(&self.writer).execute(
            "INSERT INTO meta VALUES ('floor', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [floor.to_string().as_bytes()],
        )?;
        Ok(())
    }

    fn reader(&self) -> rusqlite::Result<Connection> {
        if let Some(c) = lock(&self.readers).pop() {
            return Ok(c);
        }
        let c =
            Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        c.busy_timeout(Duration::from_secs(5))?;
        Ok(c)
    }

    /// `user`'s events with `after < seq <= upto`, oldest first; `None` when history does
    /// not reach back to `after` (pruned, or lost: `floor` is the global floor) or the
    /// replay would be larger than [`MAX_REPLAY`].
    pub fn replay(
        &self,
        user: &str,
        after: u64,
        upto: u64,
        floor: u64,
        epoch: &str,
    ) -> rusqlite::Result<Option<Vec<Arc<Frame>>>> {
        let conn = self.reader()?;
        let result = (|| {
            let user_floor: u64 = conn
                .query_row(
                    "SELECT floor FROM user_floors WHERE user = ?1",
                    [user],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .unwrap_or(0) as u64;
            if after < floor.max(user_floor) {
                return Ok(None);
            }
            let mut stmt = conn.prepare_cached(
                "SELECT e.seq, e.json FROM deliveries d JOIN events e ON e.seq = d.seq \
                 WHERE d.user = ?1 AND d.seq > ?2 AND d.seq <= ?3 ORDER BY d.seq LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![user, after as i64, upto as i64, (MAX_REPLAY + 1) as i64],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)),
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, json) = row?;
                out.push(Arc::new(Frame::new(format!("{epoch}-{seq}"), seq, json)));
            }
            if out.len() > MAX_REPLAY {
                return Ok(None);
            }
            Ok(Some(out))
        })();
        lock(&self.readers).push(conn);
        result
    }

    /// Drops events older than `max_age` and, per user, all but the newest `max_per_user`
    /// deliveries; raises the floors accordingly.
    pub fn prune(&self, max_age: Duration, max_per_user: usize) -> rusqlite::Result<Pruned> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut pruned = Pruned::default();
        let cutoff = now_secs() - max_age.as_secs() as i64;
        let old: Option<i64> =
            tx.query_row("SELECT MAX(seq) FROM events WHERE at < ?1", [cutoff], |r| {
                r.get(0)
            })?;
        if let Some(x) = old {
            pruned.deliveries += tx.execute("DELETE FROM deliveries WHERE seq <= ?1", [x])? as u64;
            pruned.events += tx.execute("DELETE FROM events WHERE seq <= ?1", [x])? as u64;
            // A client that saw event x has everything after it.
            let floor: u64 = tx
                .query_row("SELECT value FROM meta WHERE key = 'floor'", [], |r| {
                    r.get::<_, Vec<u8>>(0)
                })
                .optional()?
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if (x as u64) > floor {
                tx.execute(
                    "INSERT INTO meta VALUES ('floor', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [x.to_string().as_bytes()],
                )?;
            }
        }
        let crowded: Vec<String> = tx
            .prepare("SELECT user FROM deliveries GROUP BY user HAVING COUNT(*) > ?1")?
            .query_map([max_per_user as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for user in crowded {
            let cut: i64 = tx.query_row(
                "SELECT seq FROM deliveries WHERE user = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2",
                params![user, max_per_user as i64],
                |r| r.get(0),
            )?;
            pruned.deliveries += tx.execute(
                "DELETE FROM deliveries WHERE user = ?1 AND seq <= ?2",
                params![user, cut],
            )? as u64;
            tx.execute(
                "INSERT INTO user_floors VALUES (?1, ?2) ON CONFLICT(user) DO UPDATE SET floor = max(floor, excluded.floor)",
                params![user, cut],
            )?;
        }
        // Events nobody can replay any more.
        pruned.events += tx.execute(
            "DELETE FROM events WHERE seq < (SELECT COALESCE(MIN(seq), 9223372036854775807) FROM deliveries)",
            [],
        )? as u64;
        tx.commit()?;
        Ok(pruned)
    }

    /// Events stored (for metrics).
    pub fn len(&self) -> rusqlite::Result<u64> {
        let conn = lock(&self.writer);
        conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
    }

    pub fn is_empty(&self) -> rusqlite::Result<bool> {
        self.len().map(|n| n == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Opened {
        HistoryStore::open(&dir.join("history.db"), || "e1".into()).unwrap()
    }

    fn users(list: &[&str]) -> Vec<UserId> {
        list.iter().map(|s| UserId::from(*s)).collect()
    }

    #[test]
    fn append_replay_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path());
        assert_eq!((h.epoch.as_str(), h.head, h.floor), ("e1", 0, 0));
        let u1 = users(&["u1"]);
        let both = users(&["u1", "u2"]);
        h.store
            .append(
                &[
                    Record {
                        seq: 1,
                        json: "{\"n\":1}",
                        recipients: &u1,
                    },
                    Record {
                        seq: 2,
                        json: "{\"n\":2}",
                        recipients: &both,
                    },
                ],
                Some(&Position::from_seq(10)),
            )
            .unwrap();
        let r = h.store.replay("u1", 0, 2, 0, "e1").unwrap().unwrap();
        let ids: Vec<&str> = r.iter().map(|f| &*f.id).collect();
        assert_eq!(ids, vec!["e1-1", "e1-2"]);
        assert_eq!(
            h.store.replay("u2", 0, 2, 0, "e1").unwrap().unwrap().len(),
            1
        );
        assert_eq!(
            h.store.replay("u1", 1, 2, 0, "e1").unwrap().unwrap().len(),
            1
        );
        assert_eq!(
            h.store.replay("u1", 0, 1, 0, "e1").unwrap().unwrap().len(),
            1,
            "upto bounds it"
        );
        drop(h);
        let again = HistoryStore::open(&dir.path().join("history.db"), || {
            panic!("the epoch is kept")
        })
        .unwrap();
        assert_eq!(again.epoch, "e1");
        assert_eq!(again.head, 2);
        assert_eq!(again.checkpoint, Some(Position::from_seq(10)));
    }

    #[test]
    fn pruning_by_count_raises_the_users_floor() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path());
        let u1 = users(&["u1"]);
        let records: Vec<Record> = (1..=5)
            .map(|seq| Record {
                seq,
                json: "{}",
                recipients: &u1,
            })
            .collect();
        h.store
            .append(&records, Some(&Position::from_seq(5)))
            .unwrap();
        let p = h.store.prune(Duration::from_secs(3600), 2).unwrap();
        assert_eq!(p.deliveries, 3);
        assert!(
            h.store.replay("u1", 2, 5, 0, "e1").unwrap().is_none(),
            "seq 3 is gone"
        );
        assert_eq!(
            h.store.replay("u1", 3, 5, 0, "e1").unwrap().unwrap().len(),
            2
        );
    }

    #[test]
    fn pruning_by_age_raises_the_global_floor() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path());
        let u1 = users(&["u1"]);
        h.store
            .append(
                &[Record {
                    seq: 1,
                    json: "{}",
                    recipients: &u1,
                }],
                Some(&Position::from_seq(1)),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let p = h.store.prune(Duration::ZERO, 100).unwrap();
        assert_eq!(
            p,
            Pruned {
                events: 1,
                deliveries: 1
            }
        );
        drop(h);
        let again = open(dir.path());
        assert_eq!(
            again.floor, 1,
            "a client that saw seq 1 is complete; older is not"
        );
        assert_eq!(again.head, 1, "the head survives pruning: ids never repeat");
    }

    #[test]
    fn lost_history_floor_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path());
        h.store.set_floor(7).unwrap();
        drop(h);
        assert_eq!(open(dir.path()).floor, 7);
    }
}
