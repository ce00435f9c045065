//! Durable history: every routed event, per user, in an SQLite file of changecast's own.
//!
//! In: batches of encoded events with their recipients, and the source position the batch
//! ends at ([`HistoryStore::append`]), committed in ONE transaction — so after a crash at
//! any point the history and the source checkpoint agree: nothing lost, nothing twice.
//! Out: a user's events after an id ([`HistoryStore::replay`]) or their newest ones
//! ([`HistoryStore::latest`], for `?last=N`), the epoch, the floor below
//! which history is incomplete, and the checkpoint to resume the source from.
//!
//! Each event is stored once with its *audience*: the set of its recipients, stored once
//! per distinct set (`audiences`, and `members` to find a user's). An account-wide change
//! to 500 users is one row, not 500, and the next change to the same business reuses the
//! audience (the writer keeps the ids it has seen, up to 4 MiB of them).
//!
//! Retention ([`HistoryStore::prune`]): by age, and by count per user. What is pruned
//! raises a floor (global for age, per user for count), so a client asking for pruned
//! history gets `gap` rather than a silent hole. An event is deleted once it is too old,
//! or below the floor of every member of its audience.
//!
//! Checkpoints ([`Checkpointer`]): SQLite's automatic WAL checkpoint runs inside the commit
//! that crosses 1000 pages and fsyncs twice, so every few hundred batches one delivery
//! waited milliseconds for it (issue 14 item 4). The writer's is off; a thread of the
//! store's own copies committed pages into the file 250 ms ([`Checkpoints`]) after a
//! commit, beside the writer. A commit is as durable either way (in the -wal, which
//! survives `kill -9`); only the -wal's size depends on the checkpoints.
//!
//! Called from blocking threads only (`spawn_blocking`): SQLite calls block.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

/// What [`HistoryStore::prune`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Events deleted.
    pub events: u64,
    /// Users whose floor rose because they had more than `max_per_user` events.
    pub floors_raised: u64,
    /// The global floor after pruning: every event up to it has expired (for the hub to
    /// drop from memory too).
    pub floor: u64,
}

/// How long a connection waits for another's lock (`busy_timeout`) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The history file.
pub struct HistoryStore {
    path: PathBuf,
    /// Stopped (dropped) before the writer's connection closes, which copies what is left.
    checkpointer: Checkpointer,
    /// Shared with the checkpointer, which holds it for a RESTART pass.
    writer: Arc<Mutex<Writer>>,
    readers: Mutex<Vec<Connection>>,
}

/// When the checkpointer copies the -wal into the file.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoints {
    /// How long commits gather before they are copied: 250 ms.
    pub every: Duration,
    /// -wal pages (4 KiB) past which a checkpoint waits for the writer (RESTART), so that
    /// the -wal starts over: bounds the file under sustained load at the price of one
    /// delayed commit per 64 MiB (16,384 pages) written.
    pub wal_limit_pages: i64,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Checkpoints {
            every: Duration::from_millis(250),
            wal_limit_pages: 16_384,
        }
    }
}

/// Copies committed -wal pages into the history file on a thread and connection of its
/// own, so that no commit (and no delivery behind it) waits for the copy and its fsyncs.
/// Woken by the writer's commits; idle while nothing is written; stopped and joined when
/// dropped.
struct Checkpointer {
    signal: Arc<CheckpointSignal>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct CheckpointSignal {
    state: Mutex<CheckpointState>,
    wake: Condvar,
}

#[derive(Default)]
struct CheckpointState {
    /// Commits not yet checkpointed.
    dirty: bool,
    stop: bool,
}

impl Checkpointer {
    /// Starts the thread, on its own read-write connection to `path`. Without one (the
    /// thread or the connection could not be made), checkpoints stay in the writer's
    /// commits, as SQLite does by default: slower, never wrong.
    fn start(path: &Path, when: Checkpoints, writer: &Arc<Mutex<Writer>>) -> Checkpointer {
        let signal = Arc::new(CheckpointSignal::default());
        let thread = Connection::open(path)
            .and_then(|conn| {
                conn.busy_timeout(BUSY_TIMEOUT)?;
                Ok(conn)
            })
            .map_err(|e| e.to_string())
            .and_then(|conn| {
                let (signal, writer) = (Arc::clone(&signal), Arc::clone(writer));
                std::thread::Builder::new()
                    .name("history-checkpoint".into())
                    .spawn(move || checkpoint_loop(&conn, &signal, &writer, when))
                    .map_err(|e| e.to_string())
            });
        let thread = match thread {
            Ok(t) => lock(writer)
                .conn
                .pragma_update(None, "wal_autocheckpoint", 0)
                .map(|()| t)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let thread = thread
            .inspect_err(|e| {
                tracing::warn!(error = %e, "history: no checkpoint thread; commits checkpoint the -wal themselves");
            })
            .ok();
        Checkpointer { signal, thread }
    }

    /// Called after each commit: cheap (an uncontended lock), wakes the thread once per
    /// gathering period.
    fn committed(&self) {
        let mut state = lock(&self.signal.state);
        if !state.dirty {
            state.dirty = true;
            self.signal.wake.notify_one();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        lock(&self.signal.state).stop = true;
        self.signal.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The checkpointer's thread: after a commit, waits `every` for more, then copies what the
/// -wal holds into the file (PASSIVE: never waits for the writer or readers).
fn checkpoint_loop(
    conn: &Connection,
    signal: &CheckpointSignal,
    writer: &Mutex<Writer>,
    when: Checkpoints,
) {
    let mut failing = false;
    loop {
        {
            let state = lock(&signal.state);
            let state = signal
                .wake
                .wait_while(state, |s| !s.dirty && !s.stop)
                .unwrap_or_else(|p| p.into_inner());
            if state.stop {
                return;
            }
            let (mut state, _) = signal
                .wake
                .wait_timeout_while(state, when.every, |s| !s.stop)
                .unwrap_or_else(|p| p.into_inner());
            if state.stop {
                return;
            }
            state.dirty = false;
        }
        // A -wal starts over only when a writer finds it all copied; commits arriving
        // during every pass would grow it without end, so past the limit one pass holds
        // the writer off (SQLite's own wait for it, a busy handler, loses to a writer
        // that commits back to back).
        let result = checkpoint(conn, "PASSIVE").and_then(|log| {
            if log > when.wal_limit_pages {
                let _writer = lock(writer);
                checkpoint(conn, "RESTART").map(|_| ())
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => failing = false,
            Err(e) => {
                metrics::counter!("changecast_history_checkpoint_failures_total").increment(1);
                if !failing {
                    // Nothing is lost: the -wal keeps every commit; it only grows.
                    tracing::warn!(error = %e, "history: checkpointing the -wal failed; retrying after the next commit");
                }
                failing = true;
            }
        }
    }
}

/// Runs `PRAGMA wal_checkpoint(mode)`: the pages the -wal held.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<i64> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(1))
}

/// The one writer connection (readers open their own), and the audience ids it has
/// stored, by [`audience_key`].
struct Writer {
    conn: Connection,
    audiences: AudienceIds,
}

/// Audience ids kept in memory, bounded by the bytes of their keys: past
/// [`AUDIENCE_CACHE_BYTES`] the map starts over (and refills from the file). A count bound
/// (4096) made a per-user route with more users than that miss on most events, and each
/// miss is a query inside the transaction that delivery waits for (issue 14 item 4).
#[derive(Default)]
struct AudienceIds {
    ids: HashMap<Box<str>, i64>,
    /// Bytes of the keys held.
    bytes: usize,
}

/// About 100,000 one-user audiences, or 1,000 of 500 users.
const AUDIENCE_CACHE_BYTES: usize = 4 << 20;

impl AudienceIds {
    fn get(&self, key: &str) -> Option<i64> {
        self.ids.get(key).copied()
    }

    fn insert(&mut self, key: String, id: i64) {
        // Each entry also costs its map slot and box: counted as 32 bytes.
        let cost = key.len() + 32;
        if self.bytes + cost > AUDIENCE_CACHE_BYTES {
            self.clear();
        }
        self.bytes += cost;
        self.ids.insert(key.into_boxed_str(), id);
    }

    fn clear(&mut self) {
        self.ids.clear();
        self.bytes = 0;
    }
}

/// The text an audience is stored under: its sorted, distinct ids as a JSON array, which
/// cannot be ambiguous whatever characters ids contain.
fn audience_key(users: &[UserId]) -> String {
    serde_json::to_string(&users.iter().map(|u| &**u).collect::<Vec<&str>>()).unwrap_or_default()
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
    CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, json TEXT NOT NULL,
        audience INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS events_by_audience ON events (audience, seq);
    CREATE TABLE IF NOT EXISTS audiences (id INTEGER PRIMARY KEY, users TEXT NOT NULL UNIQUE);
    CREATE TABLE IF NOT EXISTS members (
        user TEXT NOT NULL, audience INTEGER NOT NULL, PRIMARY KEY (user, audience)) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS members_by_audience ON members (audience);
    CREATE TABLE IF NOT EXISTS user_floors (user TEXT PRIMARY KEY, floor INTEGER NOT NULL) WITHOUT ROWID;";

fn meta_u64(conn: &Connection, key: &str) -> rusqlite::Result<Option<u64>> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .optional()?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok()))
}

/// The upsert of one `meta` value (prepared once per connection: it runs in every append).
const SET_META: &str =
    "INSERT INTO meta VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value";

fn set_meta_u64(conn: &Connection, key: &str, value: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(SET_META)?
        .execute(params![key, value.to_string().as_bytes()])?;
    Ok(())
}

/// A history file from before audiences kept a row per recipient (`deliveries`). Its
/// events are dropped and the floor is raised to its head: clients resuming from before
/// get `gap`, while the epoch, the sequence and the source checkpoint carry on.
fn migrate_from_deliveries(conn: &mut Connection) -> rusqlite::Result<()> {
    let old: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'deliveries')",
        [],
        |r| r.get(0),
    )?;
    if !old {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let last: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
    let head = (last as u64).max(meta_u64(&tx, "head")?.unwrap_or(0));
    set_meta_u64(&tx, "head", head)?;
    set_meta_u64(&tx, "floor", head.max(meta_u64(&tx, "floor")?.unwrap_or(0)))?;
    tx.execute_batch("DROP TABLE deliveries; DROP TABLE events;")?;
    tx.commit()?;
    tracing::warn!(
        head,
        "history: converted a history file of an older changecast; events up to {head} were dropped (clients resuming from before get `gap`)"
    );
    Ok(())
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

/// Creates an empty file only its owner can read and write (0600 on Unix) if there is none
/// at `path`, so that SQLite opens it instead of creating it with the umask's mode; SQLite
/// gives the -wal and -shm files the main file's mode. An existing file that others may
/// read (one written by an earlier changecast, which created it 0644) is made private
/// too, with its -wal and -shm, and a warning says so.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => make_private(path),
        Err(e) => Err(e),
    }
}

#[cfg(unix)]
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = vec![path.to_path_buf()];
    for ext in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(ext);
        files.push(name.into());
    }
    for file in files {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue; // no -wal / -shm yet
        };
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
            tracing::warn!(file = %file.display(), "made private (0600): it holds every event");
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn make_private(_: &Path) -> std::io::Result<()> {
    Ok(())
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
        HistoryStore::open_with(path, new_epoch, Checkpoints::default())
    }

    /// [`HistoryStore::open`], checkpointing `when` says.
    pub fn open_with(
        path: &Path,
        new_epoch: impl FnOnce() -> String,
        when: Checkpoints,
    ) -> rusqlite::Result<Opened> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(dir);
        }
        // Every event is in this file: private from the start (issue 11).
        create_private(path).map_err(|e| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("cannot create {}: {e}", path.display())),
            )
        })?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a commit survives a process crash (kill -9); only a power
        // loss can take the last commits, and then the source checkpoint goes with them.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);")?;
        migrate_from_deliveries(&mut conn)?;
        conn.execute_batch(SCHEMA)?;
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
        let floor = meta_u64(&conn, "floor")?.unwrap_or(0);
        let checkpoint = get("checkpoint")?.map(Position);
        let head: u64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
            r.get::<_, i64>(0)
        })? as u64;
        // The floor and head may come from meta alone when every event has been pruned.
        let head = head.max(meta_u64(&conn, "head")?.unwrap_or(0));
        let writer = Arc::new(Mutex::new(Writer {
            conn,
            audiences: AudienceIds::default(),
        }));
        let checkpointer = Checkpointer::start(path, when, &writer);
        let store = HistoryStore {
            path: path.to_owned(),
            checkpointer,
            writer,
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
        let mut writer = lock(&self.writer);
        let Writer { conn, audiences } = &mut *writer;
        let result = append(conn, audiences, records, checkpoint);
        match result {
            Ok(()) => self.checkpointer.committed(),
            // Ids of audiences inserted by the rolled-back transaction do not exist.
            Err(_) => audiences.clear(),
        }
        result
    }

    /// Records that resuming from before `floor` is incomplete (the source lost history).
    pub fn set_floor(&self, floor: u64) -> rusqlite::Result<()> {
        set_meta_u64(&lock(&self.writer).conn, "floor", floor)?;
        self.checkpointer.committed();
        Ok(())
    }

    fn reader(&self) -> rusqlite::Result<Connection> {
        if let Some(c) = lock(&self.readers).pop() {
            return Ok(c);
        }
        let c =
            Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        c.busy_timeout(BUSY_TIMEOUT)?;
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
                "SELECT seq, json FROM events \
                 WHERE audience IN (SELECT audience FROM members WHERE user = ?1) \
                 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4",
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

    /// `user`'s newest `n` events with `seq <= upto`, oldest first: the ones retention kept
    /// for them (above their own floor). Fewer when there are fewer.
    pub fn latest(
        &self,
        user: &str,
        n: usize,
        upto: u64,
        epoch: &str,
    ) -> rusqlite::Result<Vec<Arc<Frame>>> {
        let conn = self.reader()?;
        let result = (|| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, json FROM events \
                 WHERE audience IN (SELECT audience FROM members WHERE user = ?1) \
                 AND seq <= ?2 \
                 AND seq > COALESCE((SELECT floor FROM user_floors WHERE user = ?1), 0) \
                 ORDER BY seq DESC LIMIT ?3",
            )?;
            let limit = i64::try_from(n).unwrap_or(i64::MAX);
            let rows = stmt.query_map(params![user, upto as i64, limit], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, json) = row?;
                out.push(Arc::new(Frame::new(format!("{epoch}-{seq}"), seq, json)));
            }
            out.reverse();
            Ok(out)
        })();
        lock(&self.readers).push(conn);
        result
    }

    /// The stored event `seq`: its JSON and its audience (sorted user ids); `None` when the
    /// history does not hold it (pruned, or never stored).
    pub fn event(&self, seq: u64) -> rusqlite::Result<Option<(String, Vec<String>)>> {
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(None);
        };
        let conn = self.reader()?;
        let found = conn
            .query_row(
                "SELECT e.json, a.users FROM events e JOIN audiences a ON a.id = e.audience \
                 WHERE e.seq = ?1",
                [seq],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional();
        lock(&self.readers).push(conn);
        Ok(found?.map(|(json, users)| (json, serde_json::from_str(&users).unwrap_or_default())))
    }

    /// Drops events older than `max_age`; raises the floor of every user with more than
    /// `max_per_user` events to their oldest one kept; drops events below the floors of
    /// all their recipients, and audiences without events.
    pub fn prune(&self, max_age: Duration, max_per_user: usize) -> rusqlite::Result<Pruned> {
        let mut writer = lock(&self.writer);
        let Writer { conn, audiences } = &mut *writer;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut pruned = Pruned::default();
        let cutoff = now_secs() - max_age.as_secs() as i64;
        let old: Option<i64> =
            tx.query_row("SELECT MAX(seq) FROM events WHERE at < ?1", [cutoff], |r| {
                r.get(0)
            })?;
        pruned.floor = meta_u64(&tx, "floor")?.unwrap_or(0);
        if let Some(x) = old {
            pruned.events += tx.execute("DELETE FROM events WHERE seq <= ?1", [x])? as u64;
            // A client that saw event x has everything after it.
            if (x as u64) > pruned.floor {
                pruned.floor = x as u64;
                set_meta_u64(&tx, "floor", pruned.floor)?;
            }
        }
        // Users with more than `max_per_user` events: each audience's events are counted
        // once, not once per member.
        let crowded: Vec<String> = tx
            .prepare(
                "SELECT m.user FROM members m JOIN \
                 (SELECT audience, COUNT(*) AS n FROM events GROUP BY audience) c \
                 ON c.audience = m.audience GROUP BY m.user HAVING SUM(c.n) > ?1",
            )?
            .query_map([max_per_user as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        // A user's floor is their (max_per_user + 1)-th newest event: it is among the newest
        // max_per_user + 1 of one of their audiences, which are read once per audience.
        {
            let mut newest: HashMap<i64, Vec<i64>> = HashMap::new();
            let mut audiences_of = tx.prepare("SELECT audience FROM members WHERE user = ?1")?;
            let mut newest_of = tx
                .prepare("SELECT seq FROM events WHERE audience = ?1 ORDER BY seq DESC LIMIT ?2")?;
            for user in crowded {
                let mut seqs = Vec::new();
                for audience in audiences_of.query_map([&user], |r| r.get::<_, i64>(0))? {
                    let audience = audience?;
                    let top = match newest.entry(audience) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => e.insert(
                            newest_of
                                .query_map(params![audience, max_per_user as i64 + 1], |r| {
                                    r.get(0)
                                })?
                                .collect::<Result<Vec<i64>, _>>()?,
                        ),
                    };
                    seqs.extend_from_slice(top);
                }
                seqs.sort_unstable_by(|a, b| b.cmp(a));
                let Some(&cut) = seqs.get(max_per_user) else {
                    continue; // counted above, so not reached
                };
                pruned.floors_raised += tx.execute(
                    "INSERT INTO user_floors VALUES (?1, ?2) \
                     ON CONFLICT(user) DO UPDATE SET floor = excluded.floor WHERE excluded.floor > floor",
                    params![user, cut],
                )? as u64;
            }
        }
        // Events none of their recipients can replay any more.
        let dead: Vec<(i64, i64)> = tx
            .prepare(
                "SELECT m.audience, MIN(COALESCE(f.floor, 0)) AS below FROM members m \
                 LEFT JOIN user_floors f ON f.user = m.user GROUP BY m.audience HAVING below > 0",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (audience, below) in dead {
            pruned.events += tx.execute(
                "DELETE FROM events WHERE audience = ?1 AND seq <= ?2",
                params![audience, below],
            )? as u64;
        }
        let emptied = tx.execute(
            "DELETE FROM audiences WHERE id NOT IN (SELECT DISTINCT audience FROM events)",
            [],
        )?;
        if emptied > 0 {
            tx.execute(
                "DELETE FROM members WHERE audience NOT IN (SELECT id FROM audiences)",
                [],
            )?;
        }
        tx.commit()?;
        self.checkpointer.committed();
        if emptied > 0 {
            audiences.clear();
        }
        Ok(pruned)
    }

    /// Events stored (for metrics).
    pub fn len(&self) -> rusqlite::Result<u64> {
        let writer = lock(&self.writer);
        writer
            .conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
    }

    pub fn is_empty(&self) -> rusqlite::Result<bool> {
        self.len().map(|n| n == 0)
    }
}

/// [`HistoryStore::append`]'s transaction.
fn append(
    conn: &mut Connection,
    audiences: &mut AudienceIds,
    records: &[Record<'_>],
    checkpoint: Option<&Position>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let at = now_secs();
        let mut ev = tx.prepare_cached(
            "INSERT INTO events (seq, at, json, audience) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for r in records {
            let key = audience_key(r.recipients);
            let audience = match audiences.get(&key) {
                Some(id) => id,
                None => {
                    let id = audience_id(&tx, &key, r.recipients)?;
                    audiences.insert(key, id);
                    id
                }
            };
            ev.execute(params![r.seq as i64, at, r.json, audience])?;
        }
        if let Some(last) = records.last() {
            set_meta_u64(&tx, "head", last.seq)?;
        }
        if let Some(checkpoint) = checkpoint {
            tx.prepare_cached(SET_META)?
                .execute(params!["checkpoint", &checkpoint.0])?;
        }
    }
    tx.commit()
}

/// The id of the audience `users` (stored under `key`), adding it when new.
fn audience_id(conn: &Connection, key: &str, users: &[UserId]) -> rusqlite::Result<i64> {
    let found = conn
        .prepare_cached("SELECT id FROM audiences WHERE users = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    if let Some(id) = found {
        return Ok(id);
    }
    conn.prepare_cached("INSERT INTO audiences (users) VALUES (?1)")?
        .execute([key])?;
    let id = conn.last_insert_rowid();
    let mut member =
        conn.prepare_cached("INSERT OR IGNORE INTO members (user, audience) VALUES (?1, ?2)")?;
    for user in users {
        member.execute(params![&**user, id])?;
    }
    Ok(id)
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

    /// Each of `names` in `dir` is readable and writable by its owner only.
    #[cfg(unix)]
    fn assert_private(dir: &Path, names: &[&str]) {
        use std::os::unix::fs::PermissionsExt;
        for name in names {
            let mode = std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
        }
    }

    /// Issue 11 item 14: the history holds every event; only its owner may read it. The
    /// -wal and -shm files take the main file's mode (SQLite copies it).
    #[cfg(unix)]
    #[test]
    fn history_files_are_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path());
        let u1 = users(&["u1"]);
        let rec = Record {
            seq: 1,
            json: "{}",
            recipients: &u1,
        };
        h.store.append(&[rec], None).unwrap();
        assert_private(
            dir.path(),
            &["history.db", "history.db-wal", "history.db-shm"],
        );
    }

    #[test]
    fn an_existing_history_readable_by_others_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.db");
        for name in ["history.db", "history.db-wal"] {
            let file = dir.path().join(name);
            std::fs::write(&file, b"").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        create_private(&path).unwrap();
        assert_private(dir.path(), &["history.db", "history.db-wal"]);
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
        assert_eq!(
            p,
            Pruned {
                events: 3,
                floors_raised: 1,
                floor: 0
            },
            "u1's floor is seq 3, and nobody else can replay 1..=3"
        );
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
                floors_raised: 0,
                floor: 1
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

    fn count(dir: &Path, table: &str) -> i64 {
        Connection::open(dir.join("history.db"))
            .unwrap()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn an_audience_is_stored_once_and_events_stay_while_one_member_can_replay_them() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path());
        let team = users(&["u1", "u2", "u3"]);
        let u1 = users(&["u1"]);
        // u1 hears about everything; u2 and u3 only about the team's events 3..=5.
        let records: Vec<Record> = (1..=7)
            .map(|seq| Record {
                seq,
                json: "{}",
                recipients: if (3..=5).contains(&seq) { &team } else { &u1 },
            })
            .collect();
        h.store.append(&records, None).unwrap();
        assert_eq!(count(dir.path(), "audiences"), 2);
        assert_eq!(count(dir.path(), "members"), 4);
        let seqs = |user, after| -> Option<Vec<u64>> {
            h.store
                .replay(user, after, 10, 0, "e1")
                .unwrap()
                .map(|r| r.iter().map(|f| f.seq).collect())
        };
        assert_eq!(seqs("u1", 0), Some(vec![1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(seqs("u2", 0), Some(vec![3, 4, 5]));

        // u1 keeps 3: its floor rises to 4; its own 1 and 2 go, while u2 and u3 can still
        // replay the team's 3..=5.
        let p = h.store.prune(Duration::from_secs(3600), 3).unwrap();
        assert_eq!(
            p,
            Pruned {
                events: 2,
                floors_raised: 1,
                floor: 0
            }
        );
        assert_eq!(seqs("u1", 3), None, "u1 gets gap below its floor");
        assert_eq!(seqs("u1", 4), Some(vec![5, 6, 7]));
        assert_eq!(seqs("u3", 0), Some(vec![3, 4, 5]));

        // Everyone keeps 0: every event is below all its recipients' floors, and the
        // audiences go with them.
        h.store.prune(Duration::from_secs(3600), 0).unwrap();
        assert_eq!(count(dir.path(), "events"), 0);
        assert_eq!(count(dir.path(), "audiences"), 0);
        assert_eq!(count(dir.path(), "members"), 0);
        // A new event for the team stores the audience again; u2 resumes after its floor.
        h.store
            .append(
                &[Record {
                    seq: 8,
                    json: "{}",
                    recipients: &team,
                }],
                None,
            )
            .unwrap();
        assert_eq!(count(dir.path(), "audiences"), 1);
        assert_eq!(seqs("u2", 4), None);
        assert_eq!(seqs("u2", 5), Some(vec![8]));
    }

    #[test]
    fn a_history_file_with_a_row_per_delivery_is_converted_keeping_the_epoch_and_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("history.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB);
                 CREATE TABLE events (seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, json TEXT NOT NULL);
                 CREATE TABLE deliveries (user TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (user, seq)) WITHOUT ROWID;
                 CREATE TABLE user_floors (user TEXT PRIMARY KEY, floor INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT INTO meta VALUES ('epoch', CAST('old' AS BLOB)), ('checkpoint', x'0102');
                 INSERT INTO events VALUES (1, 0, '{}'), (2, 0, '{}');
                 INSERT INTO deliveries VALUES ('u1', 1), ('u1', 2);",
            )
            .unwrap();
        }
        let h = HistoryStore::open(&dir.path().join("history.db"), || panic!("kept")).unwrap();
        assert_eq!(h.epoch, "old");
        assert_eq!(
            (h.head, h.floor),
            (2, 2),
            "older ids get gap, new ones follow"
        );
        assert_eq!(h.checkpoint, Some(Position(vec![1, 2])));
        assert!(
            h.store
                .replay("u1", 0, 2, h.floor, "old")
                .unwrap()
                .is_none()
        );
        let u1 = users(&["u1"]);
        h.store
            .append(
                &[Record {
                    seq: 3,
                    json: "{}",
                    recipients: &u1,
                }],
                None,
            )
            .unwrap();
        let r = h.store.replay("u1", 2, 3, h.floor, "old").unwrap().unwrap();
        assert_eq!(r.len(), 1);
    }

    /// Appends 3,000 events of 2 KB (over 1,500 -wal pages: SQLite's own checkpoint would
    /// run inside the commit past 1,000) in 30 transactions.
    fn append_many(h: &Opened) {
        let u1 = users(&["u1"]);
        let json = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
        for batch in 0..30u64 {
            let records: Vec<Record> = (1..=100)
                .map(|i| Record {
                    seq: batch * 100 + i,
                    json: &json,
                    recipients: &u1,
                })
                .collect();
            h.store
                .append(&records, Some(&Position::from_seq(batch)))
                .unwrap();
        }
    }

    /// A store in `dir` with epoch `e1` and these checkpoint settings.
    fn with_checkpoints(dir: &Path, checkpoints: Checkpoints) -> Opened {
        HistoryStore::open_with(&dir.join("history.db"), || "e1".into(), checkpoints).unwrap()
    }

    fn file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("history.db")).unwrap().len()
    }

    /// Issue 14 item 4: a commit never copies the -wal into the file itself (that copy
    /// fsyncs twice, and the delivery waits behind it). With the checkpointer held off for
    /// an hour, the file stays as it was however much is committed.
    #[test]
    fn commits_leave_checkpointing_to_the_checkpointer() {
        let dir = tempfile::tempdir().unwrap();
        let h = with_checkpoints(
            dir.path(),
            Checkpoints {
                every: Duration::from_secs(3600),
                ..Checkpoints::default()
            },
        );
        let before = file_len(dir.path());
        append_many(&h);
        assert_eq!(file_len(dir.path()), before, "no commit checkpointed");
        assert_eq!(
            h.store
                .replay("u1", 0, 3000, 0, "e1")
                .unwrap()
                .unwrap()
                .len(),
            3000
        );
    }

    /// ...and the checkpointer does copy them, soon after, with no further commit.
    #[test]
    fn the_checkpointer_copies_commits_into_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let h = with_checkpoints(
            dir.path(),
            Checkpoints {
                every: Duration::from_millis(10),
                ..Checkpoints::default()
            },
        );
        append_many(&h);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while file_len(dir.path()) < 3000 * 2000 {
            assert!(
                std::time::Instant::now() < deadline,
                "not checkpointed within 10 s: {} bytes",
                file_len(dir.path())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(h);
        let again = open(dir.path());
        assert_eq!(
            (again.head, again.checkpoint),
            (3000, Some(Position::from_seq(29)))
        );
    }

    /// Commits that never pause leave no moment with the whole -wal copied, so it would
    /// never start over; past the limit one checkpoint holds the writer off and it does.
    /// Each commit here adds about 8 KiB of -wal frames, so the file grows with every
    /// commit until the -wal starts over; from then on commits overwrite it from the start
    /// and its length stays put. Commits go on (without pause, up to 30 s: the checkpointer
    /// is a thread, and on a busy machine it may wait for a core) until the length has
    /// stayed put for 200 commits.
    #[test]
    fn the_wal_starts_over_under_commits_that_never_pause() {
        let dir = tempfile::tempdir().unwrap();
        let h = with_checkpoints(
            dir.path(),
            Checkpoints {
                every: Duration::from_millis(5),
                wal_limit_pages: 64,
            },
        );
        let wal_len = || {
            std::fs::metadata(dir.path().join("history.db-wal"))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let u1 = users(&["u1"]);
        let json = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut seq, mut len, mut unchanged) = (0u64, 0, 0);
        while unchanged < 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "the -wal never started over: {len} bytes after {seq} commits"
            );
            seq += 1;
            h.store
                .append(
                    &[Record {
                        seq,
                        json: &json,
                        recipients: &u1,
                    }],
                    Some(&Position::from_seq(seq)),
                )
                .unwrap();
            let now = wal_len();
            if now == len {
                unchanged += 1;
            } else {
                (len, unchanged) = (now, 0);
            }
        }
        assert_eq!(
            h.store
                .replay("u1", 0, seq, 0, "e1")
                .unwrap()
                .unwrap()
                .len() as u64,
            seq
        );
    }

    /// Issue 14 item 4: a per-user route to more users than the old 4,096-entry bound
    /// keeps every audience id in memory (a miss is a query in the commit delivery waits
    /// for), and the ids stay right.
    #[test]
    fn audience_ids_of_thousands_of_users_stay_cached() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path());
        let each: Vec<Vec<UserId>> = (0..5001).map(|i| users(&[&format!("u{i}")])).collect();
        let records: Vec<Record> = each
            .iter()
            .enumerate()
            .map(|(i, to)| Record {
                seq: i as u64 + 1,
                json: "{}",
                recipients: to,
            })
            .collect();
        h.store.append(&records, None).unwrap();
        assert_eq!(lock(&h.store.writer).audiences.ids.len(), 5001);
        h.store
            .append(
                &[Record {
                    seq: 5002,
                    json: "{}",
                    recipients: &each[7],
                }],
                None,
            )
            .unwrap();
        assert_eq!(count(dir.path(), "audiences"), 5001, "u7's audience reused");
        let seqs: Vec<u64> = h
            .store
            .replay("u7", 0, 5002, 0, "e1")
            .unwrap()
            .unwrap()
            .iter()
            .map(|f| f.seq)
            .collect();
        assert_eq!(seqs, vec![8, 5002]);
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
