//! The Mercury demo: the seed's app on the embedded SQLite source.
//!
//! In: a data folder. Out: an SQLite database with the Mercury schema of SPEC.md and seed
//! data, the config that streams it (also written next to it as `changecast.toml`, so
//! `changecast serve --config` runs the same thing), a simulator that writes changes from
//! its own connection like an application would, and the activity page at `/`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::response::Html;
use axum::routing::get;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// The demo's tables.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS businesses (
    _id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner JSON NOT NULL            -- {\"_id\": ..., \"name\": ...}, read as a nested document
);
CREATE TABLE IF NOT EXISTS users (
    _id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    business_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inventory_items (
    _id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owned_by TEXT NOT NULL,
    quantity_in_stock INTEGER NOT NULL,
    reorder_point INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    _id TEXT PRIMARY KEY,
    creator_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    status TEXT NOT NULL
);
";

/// The demo's config. `{db}`, `{listen}` and `{secret}` are filled in by [`config_toml`].
const CONFIG_TEMPLATE: &str = r#"# Written by `changecast demo`: the Mercury app on the embedded SQLite source.
[server]
listen = "{listen}"

[source]
type = "sqlite"
path = "{db}"

[history]
path = "{history}"

[auth]
jwt_secret = "{secret}"
# As in the seed: the token's `user_id` claim holds an email; the user is looked up by it.
user = { claim = "user_id", lookup = "users", where = { email = "$claim" }, pick = "_id" }

[[route]]
name = "orders"
collection = "orders"
on = ["insert", "update", "delete"]
to = { lookup = "businesses", where = { _id = "$creator_id" }, pick = "owner._id" }

[[route]]
name = "inventory"
collection = "inventory_items"
on = ["insert", "update", "delete"]
to = { lookup = "businesses", where = { _id = "$owned_by" }, pick = "owner._id" }

# Fires when stock crosses the reorder point, not on every update while it is low.
[[alert]]
name = "stock_low"
collection = "inventory_items"
when = "doc.quantity_in_stock <= doc.reorder_point"
to = { lookup = "businesses", where = { _id = "$owned_by" }, pick = "owner._id" }
message = "Stock low: {{ doc.name }} has {{ doc.quantity_in_stock }} left. Restock to keep issuing orders."
"#;

/// The demo config for a database at `db`.
pub fn config_toml(db: &Path, listen: &str, secret: &str) -> String {
    let escape = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    CONFIG_TEMPLATE
        .replace("{db}", &escape(&db.display().to_string()))
        .replace(
            "{history}",
            &escape(&db.with_file_name("history.db").display().to_string()),
        )
        .replace("{listen}", &escape(listen))
        .replace("{secret}", &escape(secret))
}

/// The demo config of cluster node `name` on the NATS server at `nats`: the same as
/// [`config_toml`] but for its own history file and the `[cluster]` block.
pub fn cluster_config_toml(
    db: &Path,
    listen: &str,
    secret: &str,
    nats: &str,
    name: &str,
) -> String {
    let escape = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let history = db.with_file_name(format!("history-{name}.db"));
    let single = db.with_file_name("history.db");
    let mut text = config_toml(db, listen, secret).replace(
        &escape(&single.display().to_string()),
        &escape(&history.display().to_string()),
    );
    text.push_str(&format!(
        "\n[cluster]\nnats = \"{}\"\nname = \"{}\"\n",
        escape(nats),
        escape(name)
    ));
    text
}

/// One demo business with its owner and staff.
struct Business {
    id: &'static str,
    name: &'static str,
    domain: &'static str,
    owner: (&'static str, &'static str),
    staff: (&'static str, &'static str),
    items: [(&'static str, i64, i64); 3],
}

const BUSINESSES: [Business; 3] = [
    Business {
        id: "b1",
        name: "Kano Grains",
        domain: "kanograins.example",
        owner: ("u1", "Amina Bello"),
        staff: ("u4", "Musa Idris"),
        items: [("Rice", 14, 5), ("Millet", 9, 4), ("Sorghum", 11, 4)],
    },
    Business {
        id: "b2",
        name: "Lagos Fresh",
        domain: "lagosfresh.example",
        owner: ("u2", "Tunde Okafor"),
        staff: ("u5", "Ngozi Eze"),
        items: [("Tomatoes", 20, 8), ("Peppers", 12, 5), ("Onions", 16, 6)],
    },
    Business {
        id: "b3",
        name: "Abuja Mart",
        domain: "abujamart.example",
        owner: ("u3", "Chioma Nwosu"),
        staff: ("u6", "Yusuf Garba"),
        items: [("Garri", 18, 6), ("Beans", 10, 4), ("Palm oil", 8, 3)],
    },
];

/// A demo user as the page and the start-up banner show it.
#[derive(Debug, Clone, Serialize)]
pub struct DemoUser {
    pub user: String,
    pub name: String,
    pub email: String,
    pub business: String,
    pub token: String,
}

fn email(name: &str, domain: &str) -> String {
    let first = name
        .split_whitespace()
        .next()
        .unwrap_or(name)
        .to_lowercase();
    format!("{first}@{domain}")
}

/// Writes the generated config; it holds the JWT secret, so only its owner may read it
/// (0600 on Unix, also when it replaces an earlier one).
pub fn write_config(path: &Path, text: &str) -> std::io::Result<()> {
    crate::hub::store::create_private(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::write(path, text)
}

/// Creates the schema and, if the database is new, the seed data.
pub fn create_database(path: &Path) -> rusqlite::Result<()> {
    // Private like every file the demo writes (SQLite gives -wal/-shm the same mode).
    crate::hub::store::create_private(path).map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("cannot create {}: {e}", path.display())),
        )
    })?;
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(SCHEMA)?;
    let seeded: Option<String> = conn
        .query_row("SELECT _id FROM businesses LIMIT 1", [], |r| r.get(0))
        .optional()?;
    if seeded.is_some() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for (bi, b) in BUSINESSES.iter().enumerate() {
        let owner = serde_json::json!({"_id": b.owner.0, "name": b.owner.1}).to_string();
        tx.execute(
            "INSERT INTO businesses VALUES (?1, ?2, ?3)",
            params![b.id, b.name, owner],
        )?;
        for (id, name) in [b.owner, b.staff] {
            tx.execute(
                "INSERT INTO users VALUES (?1, ?2, ?3, ?4)",
                params![id, email(name, b.domain), name, b.id],
            )?;
        }
        for (ii, (name, qty, reorder)) in b.items.iter().enumerate() {
            let id = format!("i{}", bi * 3 + ii + 1);
            tx.execute(
                "INSERT INTO inventory_items VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, name, b.id, qty, reorder],
            )?;
        }
    }
    tx.commit()
}

/// The users the demo prints tokens for: the business owners, whom the routes reach.
pub fn demo_users(secret: &[u8], ttl_secs: u64) -> Vec<DemoUser> {
    BUSINESSES
        .iter()
        .map(|b| {
            let email = email(b.owner.1, b.domain);
            let mut claims = serde_json::Map::new();
            claims.insert("user_id".into(), email.clone().into());
            DemoUser {
                user: b.owner.0.into(),
                name: b.owner.1.into(),
                email: email.clone(),
                business: b.name.into(),
                token: crate::auth::mint(secret, &email, ttl_secs, &claims),
            }
        })
        .collect()
}

/// The page at `/`, the client module it loads (`/changecast.js`, built from `clients/js`
/// and committed as `changecast.js` beside this file), and the user list it reads.
/// `users` is called on every request of `/demo/users`, so tokens there are fresh.
pub fn routes(users: impl Fn() -> Vec<DemoUser> + Send + Sync + 'static) -> axum::Router {
    let users = Arc::new(users);
    axum::Router::new()
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route(
            "/changecast.js",
            get(|| async {
                (
                    [
                        (
                            axum::http::header::CONTENT_TYPE,
                            "text/javascript; charset=utf-8",
                        ),
                        (axum::http::header::CACHE_CONTROL, "no-cache"),
                    ],
                    include_str!("changecast.js"),
                )
            }),
        )
        .route(
            "/demo/users",
            get(move || {
                let users = Arc::clone(&users);
                async move { Json(users()) }
            }),
        )
}

/// Writes application-like changes at `rate` per second from its own connection until
/// `stop` is set: orders created, paid and deleted; stock sold and restocked.
pub fn simulate(path: &Path, rate: u32, stop: Arc<AtomicBool>) -> rusqlite::Result<()> {
    if rate == 0 {
        return Ok(());
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let pause = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next_order: u64 = conn.query_row(
        "SELECT COALESCE(MAX(CAST(substr(_id, 2) AS INTEGER)), 0) + 1 FROM orders",
        [],
        |r| r.get(0),
    )?;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = step(&conn, &mut next_order) {
            tracing::warn!(error = %e, "demo simulator: write failed");
        }
        std::thread::sleep(pause);
    }
    Ok(())
}

fn step(conn: &Connection, next_order: &mut u64) -> rusqlite::Result<()> {
    let open_orders: i64 = conn.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?;
    match fastrand::u8(0..10) {
        // New order for a random item.
        0..=2 if open_orders < 40 => {
            let (item, business): (String, String) = conn.query_row(
                "SELECT _id, owned_by FROM inventory_items ORDER BY random() LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let id = format!("o{next_order}");
            *next_order += 1;
            conn.execute(
                "INSERT INTO orders VALUES (?1, ?2, ?3, ?4, 'pending')",
                params![id, business, item, fastrand::i64(1..=5)],
            )?;
        }
        // Pay a pending order; stock goes down by its quantity.
        3..=4 => {
            let order: Option<(String, String, i64)> = conn
                .query_row(
                    "SELECT _id, item_id, quantity FROM orders WHERE status = 'pending' ORDER BY random() LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((id, item, qty)) = order {
                conn.execute("UPDATE orders SET status = 'paid' WHERE _id = ?1", [&id])?;
                conn.execute(
                    "UPDATE inventory_items SET quantity_in_stock = max(quantity_in_stock - ?2, 0) WHERE _id = ?1",
                    params![item, qty],
                )?;
            }
        }
        // Archive (delete) a paid order.
        5..=6 => {
            conn.execute(
                "DELETE FROM orders WHERE _id = (SELECT _id FROM orders WHERE status = 'paid' ORDER BY random() LIMIT 1)",
                [],
            )?;
        }
        // Restock an item that is at or below its reorder point.
        7 => {
            conn.execute(
                "UPDATE inventory_items SET quantity_in_stock = quantity_in_stock + ?1 \
                 WHERE _id = (SELECT _id FROM inventory_items WHERE quantity_in_stock <= reorder_point ORDER BY random() LIMIT 1)",
                [fastrand::i64(10..=25)],
            )?;
        }
        // Walk-in sale of one unit.
        _ => {
            conn.execute(
                "UPDATE inventory_items SET quantity_in_stock = quantity_in_stock - 1 \
                 WHERE _id = (SELECT _id FROM inventory_items WHERE quantity_in_stock > 0 ORDER BY random() LIMIT 1)",
                [],
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_seeded_once_and_the_config_compiles_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("mercury.db");
        create_database(&db).unwrap();
        create_database(&db).unwrap();
        let conn = Connection::open(&db).unwrap();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM businesses", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
        let config = crate::config::Config::parse(&config_toml(&db, "127.0.0.1:0", "s")).unwrap();
        let plan = crate::plan::Plan::compile(&config).unwrap();
        assert_eq!(plan.routes.len(), 2);
        assert_eq!(plan.alerts.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn demo_files_are_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("mercury.db");
        create_database(&db).unwrap();
        let config = dir.path().join("changecast.toml");
        write_config(&config, "secret").unwrap();
        // Written again over a file that exists with a wider mode: still private.
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_config(&config, "secret 2").unwrap();
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "secret 2");
        for path in [&db, &config] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", path.display());
        }
    }

    #[test]
    fn simulator_writes_changes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("mercury.db");
        create_database(&db).unwrap();
        let conn = Connection::open(&db).unwrap();
        let mut next = 1;
        for _ in 0..50 {
            step(&conn, &mut next).unwrap();
        }
        let total: i64 = conn.total_changes() as i64;
        assert!(total > 0);
    }

    #[test]
    fn demo_users_get_tokens_for_their_email() {
        let users = demo_users(b"s", 60);
        assert_eq!(users.len(), 3);
        assert_eq!(users[0].email, "amina@kanograins.example");
        assert!(!users[0].token.is_empty());
    }
}
