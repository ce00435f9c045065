//! The PostgreSQL test harness itself (tests/common/pg.rs): a real server starts with
//! logical decoding, and a crash plus restart keeps committed rows.

mod common;

use common::pg::PgServer;

#[test]
fn a_started_server_has_logical_wal_and_a_crash_keeps_committed_rows() {
    let mut pg = PgServer::start();
    pg.create_db("h");
    assert_eq!(pg.psql("h", "SHOW wal_level").trim(), "logical");
    pg.psql(
        "h",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)",
    );
    pg.restart();
    assert_eq!(pg.psql("h", "SELECT count(*) FROM t").trim(), "2");
    assert!(
        pg.log_tail(200).contains("not properly shut down"),
        "the restart recovered from a crash:\n{}",
        pg.log_tail(40)
    );
}
