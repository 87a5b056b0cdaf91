//! Passthrough through pgveil with `psql`: simple protocol, several statements in one
//! query, `\copy` both ways, large results, and bytes that are not valid UTF-8.

mod support;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use support::{cluster, Proxy, SUPERUSER};

fn stdout_ok(output: &std::process::Output) -> Vec<u8> {
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout.clone()
}

#[test]
fn several_statements_in_one_query_message() {
    let proxy = Proxy::start();
    // psql -c sends the whole string as one Query message.
    let output = proxy.psql(
        SUPERUSER,
        [
            "-c",
            "SELECT 1 AS a; SELECT 'two' AS b; SELECT 3 WHERE false",
        ],
    );
    assert_eq!(String::from_utf8(stdout_ok(&output)).unwrap(), "1\ntwo\n");

    // An error in the middle stops the rest, and the next query runs.
    let output = proxy.psql(
        SUPERUSER,
        [
            "-c",
            "SELECT 1; SELECT * FROM no_such_table; SELECT 3",
            "-c",
            "SELECT 4",
        ],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no_such_table"));
    let output = proxy.psql(SUPERUSER, ["-c", "SELECT 4"]);
    assert_eq!(String::from_utf8(stdout_ok(&output)).unwrap(), "4\n");
}

#[test]
fn transactions_and_a_large_result() {
    let proxy = Proxy::start();
    let output = proxy.psql(
        SUPERUSER,
        [
            "-c",
            "DROP TABLE IF EXISTS simple_tx; CREATE TABLE simple_tx (n int)",
            "-c",
            "BEGIN; INSERT INTO simple_tx VALUES (1); ROLLBACK",
            "-c",
            "BEGIN; INSERT INTO simple_tx VALUES (2); COMMIT",
            "-c",
            "SELECT string_agg(n::text, ',') FROM simple_tx",
        ],
    );
    assert_eq!(String::from_utf8(stdout_ok(&output)).unwrap(), "2\n");

    let output = proxy.psql(
        SUPERUSER,
        [
            "-c",
            "SELECT repeat('x', 1000) || g FROM generate_series(1, 20000) g",
        ],
    );
    let stdout = stdout_ok(&output);
    let lines: Vec<&[u8]> = stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 20000);
    assert_eq!(
        lines[19999],
        format!("{}20000", "x".repeat(1000)).as_bytes()
    );
}

#[test]
fn backslash_copy_both_ways() {
    let proxy = Proxy::start();
    let dir = proxy.dir.clone();
    let input = dir.join("in.csv");
    let mut csv = String::from("id,name\n");
    for i in 0..5000 {
        csv.push_str(&format!("{i},\"name, {i} 张三\"\n"));
    }
    std::fs::write(&input, &csv).unwrap();
    let output_file = dir.join("out.csv");
    let output = proxy.psql(
        SUPERUSER,
        [
            "-c".to_string(),
            "DROP TABLE IF EXISTS simple_copy; CREATE TABLE simple_copy (id int, name text)"
                .to_string(),
            "-c".to_string(),
            format!("\\copy simple_copy FROM '{}' WITH (FORMAT csv, HEADER true)", input.display()),
            "-c".to_string(),
            format!(
                "\\copy (SELECT * FROM simple_copy ORDER BY id) TO '{}' WITH (FORMAT csv, HEADER true)",
                output_file.display()
            ),
            "-c".to_string(),
            "SELECT count(*) FROM simple_copy".to_string(),
        ],
    );
    stdout_ok(&output);
    assert_eq!(std::fs::read_to_string(&output_file).unwrap(), csv);
    assert_eq!(
        cluster().psql_ok(SUPERUSER, "SELECT count(*), max(name) FROM simple_copy"),
        "5000|name, 999 张三\n"
    );
}

#[test]
fn bytes_that_are_not_utf8_round_trip_unchanged() {
    let proxy = Proxy::start();
    let database = "bytes_db";
    cluster().psql_ok(SUPERUSER, &format!("DROP DATABASE IF EXISTS {database}"));
    cluster().psql_ok(
        SUPERUSER,
        &format!("CREATE DATABASE {database} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
    );
    // Latin-1 and broken sequences in SQL text, identifiers, values and results.
    let mut sql = b"CREATE TABLE caf\xe9 (v text); INSERT INTO caf\xe9 VALUES ('\xff\xfe\x80 na\xefve'); SELECT v, octet_length(v) FROM caf\xe9".to_vec();
    let output = std::process::Command::new(cluster().bin.join("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={database}",
            proxy.port
        ))
        .arg("-c")
        .arg(OsString::from_vec(std::mem::take(&mut sql)))
        .env("PGCLIENTENCODING", "SQL_ASCII")
        .output()
        .unwrap();
    assert_eq!(stdout_ok(&output), b"\xff\xfe\x80 na\xefve|9\n".to_vec());
}
