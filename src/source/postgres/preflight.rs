//! `changecast check` for a PostgreSQL source: what the config assumes of the database,
//! checked against its catalog.
//!
//! In: a compiled [`Plan`] with a PostgreSQL source. Out: one [`Finding`] per fact (the
//! same lines as MongoDB's `check --connect`). Only reads are sent: `wal_level`, each
//! table's columns, primary key and replica identity (`pg_class`, `pg_attribute`,
//! `pg_index`), the publication and the slot. Nothing is changed: the lines say what
//! `serve` will change (`REPLICA IDENTITY FULL`, the publication, the slot).
//!
//! Errors: the server unreachable, `wal_level` not `logical`, a watched table missing or
//! without a primary key, a column the rules name missing (a close name is suggested), a
//! path into a column that is not `json`/`jsonb`, and with `manage`/`pre_images` =
//! `assume` what is not there. The slot's retained WAL is always a line of its own.

use std::collections::BTreeMap;

use crate::config::{Images, PgManage, PostgresSourceConfig};
use crate::plan::Plan;
use crate::source::mongodb::preflight::{Finding, Uses, did_you_mean, error, ok, warning};

use super::decode::oid;
use super::{
    ConnInfo, TableInfo, describe_pg_error, no_primary_key, publication_tables, read_table,
    slot_state,
};

/// Every finding about a PostgreSQL source.
pub async fn check(plan: &Plan, config: &PostgresSourceConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    let conn = match ConnInfo::parse(config) {
        Ok(c) => c,
        Err(e) => {
            out.push(error("source.url", e));
            return out;
        }
    };
    let client = match conn.connect().await {
        Ok(c) => c,
        Err(e) => {
            out.push(error("source.url", e));
            return out;
        }
    };
    out.push(ok(
        "source.url",
        format!("connected to {}", conn.describe()),
    ));
    match client.query_one("SHOW wal_level", &[]).await {
        Ok(r) if r.get::<_, String>(0) == "logical" => {
            out.push(ok("source.url", "wal_level = logical"))
        }
        Ok(r) => out.push(error(
            "source.url",
            format!(
                "wal_level is `{}`: logical replication needs wal_level = logical \
                 (postgresql.conf, then restart the server)",
                r.get::<_, String>(0)
            ),
        )),
        Err(e) => out.push(error("source.url", describe_pg_error(&e))),
    }

    let uses = Uses::of(plan);
    let names: Vec<String> = match client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => {
            out.push(error("source.url", describe_pg_error(&e)));
            return out;
        }
    };
    let mut tables: BTreeMap<String, TableInfo> = BTreeMap::new();
    for (name, path) in &uses.collections {
        match read_table(&client, name).await {
            Ok(Some(t)) => {
                let keys = t.key_columns();
                if keys.is_empty() {
                    out.push(error(path, no_primary_key(name)));
                } else {
                    out.push(ok(
                        path,
                        format!("table `{name}` exists, keyed by {}", keys.join(", ")),
                    ));
                }
                tables.insert(name.clone(), t);
            }
            Ok(None) => out.push(error(
                path,
                match did_you_mean(name, names.iter().map(String::as_str)) {
                    Some(near) => {
                        format!("no table `{name}` in schema public; did you mean `{near}`?")
                    }
                    None => format!(
                        "no table `{name}` in schema public (it has: {})",
                        if names.is_empty() {
                            "no tables".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                },
            )),
            Err(e) => out.push(error(path, describe_pg_error(&e))),
        }
    }
    for f in &uses.fields {
        let Some(table) = tables.get(&f.collection) else {
            continue;
        };
        let Some(column) = f.field.first() else {
            continue;
        };
        match table.columns.iter().find(|c| &c.name == column) {
            None => {
                let near = did_you_mean(column, table.columns.iter().map(|c| c.name.as_str()));
                out.push(error(
                    &f.path,
                    match near {
                        Some(n) => format!(
                            "{}: no column `{column}` in `{}`; did you mean `{n}`?",
                            f.rule, f.collection
                        ),
                        None => format!("{}: no column `{column}` in `{}`", f.rule, f.collection),
                    },
                ));
            }
            Some(c) if f.field.len() > 1 && !matches!(c.type_oid, oid::JSON | oid::JSONB) => {
                out.push(error(
                    &f.path,
                    format!(
                        "{}: `{}` reads into column `{column}` of `{}`, which is {}, not json/jsonb",
                        f.rule,
                        f.field.join("."),
                        f.collection,
                        c.type_name
                    ),
                ))
            }
            Some(_) => {}
        }
    }

    const IMAGES: &str = "source.pre_images";
    for (table, why) in &uses.images {
        let Some(t) = tables.get(table) else {
            continue;
        };
        let why = why.join("; ");
        if t.replica_identity == 'f' {
            out.push(ok(IMAGES, format!("`{table}` has REPLICA IDENTITY FULL")));
            continue;
        }
        out.push(match config.pre_images {
            Images::Ensure => ok(
                IMAGES,
                format!("will set REPLICA IDENTITY FULL on `{table}` at start ({why})"),
            ),
            Images::Assume => error(
                IMAGES,
                format!(
                    "`{table}` does not have REPLICA IDENTITY FULL, and without the old row {why}; \
                     run ALTER TABLE {} REPLICA IDENTITY FULL, or set pre_images = \"ensure\"",
                    super::quote(table)
                ),
            ),
            Images::Off => warning(IMAGES, format!("pre_images = \"off\": {why}")),
        });
    }

    let watched: Vec<String> = plan.watched().into_keys().collect();
    match publication_tables(&client, &config.publication).await {
        Err(e) => out.push(error("source.publication", describe_pg_error(&e))),
        Ok(None) => out.push(match config.manage {
            PgManage::Create => ok(
                "source.publication",
                format!(
                    "publication `{}` will be created for {}",
                    config.publication,
                    watched.join(", ")
                ),
            ),
            PgManage::Assume => error(
                "source.publication",
                format!(
                    "publication `{}` does not exist (manage = \"assume\")",
                    config.publication
                ),
            ),
        }),
        Ok(Some((true, _))) => out.push(ok(
            "source.publication",
            format!("publication `{}` is FOR ALL TABLES", config.publication),
        )),
        Ok(Some((false, have))) => {
            let missing: Vec<&String> = watched.iter().filter(|t| !have.contains(t)).collect();
            out.push(match (missing.is_empty(), config.manage) {
                (true, _) => ok(
                    "source.publication",
                    format!(
                        "publication `{}` has every watched table",
                        config.publication
                    ),
                ),
                (false, PgManage::Create) => ok(
                    "source.publication",
                    format!(
                        "publication `{}` will be set to the watched tables (it lacks {})",
                        config.publication,
                        join(&missing)
                    ),
                ),
                (false, PgManage::Assume) => error(
                    "source.publication",
                    format!(
                        "publication `{}` lacks {} (manage = \"assume\")",
                        config.publication,
                        join(&missing)
                    ),
                ),
            });
        }
    }

    match slot_state(&client, &config.slot).await {
        Err(e) => out.push(error("source.slot", describe_pg_error(&e))),
        Ok(None) => out.push(match config.manage {
            PgManage::Create => ok(
                "source.slot",
                format!("slot `{}` will be created (pgoutput)", config.slot),
            ),
            PgManage::Assume => error(
                "source.slot",
                format!(
                    "slot `{}` does not exist (manage = \"assume\")",
                    config.slot
                ),
            ),
        }),
        Ok(Some(s)) => {
            if s.plugin.as_deref() != Some("pgoutput") {
                out.push(error(
                    "source.slot",
                    format!(
                        "slot `{}` uses plugin `{}`, not pgoutput",
                        config.slot,
                        s.plugin.as_deref().unwrap_or("?")
                    ),
                ));
            }
            if let Some(why) = s.invalid() {
                out.push(match config.manage {
                    PgManage::Create => warning(
                        "source.slot",
                        format!(
                            "slot `{}`: {why}; it will be recreated and clients told `gap`",
                            config.slot
                        ),
                    ),
                    PgManage::Assume => {
                        error("source.slot", format!("slot `{}`: {why}", config.slot))
                    }
                });
            }
            out.push(ok(
                "source.slot",
                format!(
                    "slot `{}` retains {} of WAL{}",
                    config.slot,
                    s.retained_wal
                        .map_or_else(|| "an unknown amount".to_string(), bytes),
                    match s.active_pid {
                        Some(pid) => format!(" (in use by pid {pid})"),
                        None => " (not in use)".to_string(),
                    }
                ),
            ));
        }
    }
    out
}

fn join(names: &[&String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `123 bytes`, `4.0 MiB`.
fn bytes(n: i64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n.unsigned_abs() < 1024 * 1024 {
        format!("{n} bytes")
    } else {
        format!("{n} bytes ({:.1} MiB)", n as f64 / MIB)
    }
}
