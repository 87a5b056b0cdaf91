//! Bad input and faults: malformed frames and startup packets end only their own
//! connection with a clear error; the connection limit answers 53300; an unreachable
//! or vanishing upstream gives 08006; a client that leaves mid-result frees its backend;
//! SIGTERM drains sessions within the grace period.

mod support;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::{
    cluster, eventually, frame, free_port, sqlstate, startup_packet, tags, Proxy, ProxyOptions,
    RawClient, SUPERUSER,
};

/// Reads until the connection closes; the (SQLSTATE, message) of the error sent.
fn closing_error(raw: &mut RawClient) -> (String, String) {
    let messages = raw.read_to_end();
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no ErrorResponse before close: {messages:?}"));
    (
        error.field(b'C').unwrap_or_default(),
        error.field(b'M').unwrap_or_default(),
    )
}

/// Sends `bytes` on a fresh connection and returns the error pgveil answers with; the
/// connection must then be closed.
fn error_for(proxy: &Proxy, bytes: &[u8]) -> (String, String) {
    let mut raw = RawClient::open(proxy.port);
    raw.send(bytes);
    closing_error(&mut raw)
}

async fn still_serves(proxy: &Proxy) {
    let client = proxy.connect(SUPERUSER).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn malformed_startup_packets_end_only_their_connection() {
    let proxy = Proxy::start();
    let survivor = proxy.connect(SUPERUSER).await;

    let (code, message) = error_for(&proxy, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, "08P01");
    assert!(
        message.starts_with("pgveil: invalid startup packet length"),
        "{message}"
    );

    let (code, message) = error_for(&proxy, &[0, 0, 0, 2]);
    assert_eq!(code, "08P01");
    assert!(
        message.contains("invalid startup packet length 2"),
        "{message}"
    );

    let mut unknown_code = 8i32.to_be_bytes().to_vec();
    unknown_code.extend_from_slice(&((1234i32 << 16) | 9999).to_be_bytes());
    let (code, message) = error_for(&proxy, &unknown_code);
    assert_eq!(code, "08P01");
    assert!(
        message.contains("unknown startup request code"),
        "{message}"
    );

    let mut version_two = 9i32.to_be_bytes().to_vec();
    version_two.extend_from_slice(&(2i32 << 16).to_be_bytes());
    version_two.push(0);
    let (code, message) = error_for(&proxy, &version_two);
    assert_eq!(code, "08P01");
    assert!(
        message.contains("unsupported frontend protocol 2.0"),
        "{message}"
    );

    let mut unterminated = startup_packet(&[("user", SUPERUSER)]);
    unterminated.pop();
    let length = (unterminated.len() as i32).to_be_bytes();
    unterminated[..4].copy_from_slice(&length);
    let (code, _) = error_for(&proxy, &unterminated);
    assert_eq!(code, "08P01");

    // The session opened before all this still works, and so do new ones.
    let one: i32 = survivor.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn malformed_frames_after_login_end_the_session_with_an_error() {
    let proxy = Proxy::start();
    let survivor = proxy.connect(SUPERUSER).await;
    for (bad, expected) in [
        (&b"Q\0\0\0\x02"[..], "below 4"),
        (&b"Q\x7f\xff\xff\xff"[..], "over the 1 GiB limit"),
        (&b"P\0\0\0\x08ab"[..], "malformed Parse message"),
        // PostgreSQL's own limit for messages that carry no data.
        (&b"S\0\0\x4e\x24"[..], "over its limit of 10000"),
    ] {
        let mut raw = RawClient::login(proxy.port, SUPERUSER, "malformed");
        let mut bytes = bad.to_vec();
        bytes.extend_from_slice(b"\0\0");
        raw.send(&bytes);
        let (code, message) = closing_error(&mut raw);
        assert_eq!(code, "08P01", "{bad:?}");
        assert!(message.contains(expected), "{message}");
    }
    let one: i32 = survivor.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    still_serves(&proxy).await;
}

#[test]
fn a_startup_packet_sent_byte_by_byte_works() {
    let proxy = Proxy::start();
    let mut raw = RawClient::open(proxy.port);
    for byte in startup_packet(&[("user", SUPERUSER), ("database", "postgres")]) {
        raw.send(&[byte]);
    }
    let messages = raw.read_until(b'Z');
    assert!(tags(&messages).starts_with('R'), "{}", tags(&messages));
}

#[test]
fn newer_protocol_minor_versions_are_negotiated_down_to_3_0() {
    let proxy = Proxy::start();
    let mut packet = startup_packet(&[("user", SUPERUSER), ("_pq_.future_option", "on")]);
    packet[4..8].copy_from_slice(&((3i32 << 16) | 2).to_be_bytes());
    let mut raw = RawClient::open(proxy.port);
    raw.send(&packet);
    let messages = raw.read_until(b'Z');
    assert_eq!(messages[0].tag, b'v', "{}", tags(&messages));
    assert_eq!(&messages[0].body[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&messages[0].body[8..], b"_pq_.future_option\0");
    raw.send(&frame(b'Q', b"SELECT 42\0"));
    let messages = raw.read_until(b'Z');
    assert_eq!(tags(&messages), "TDCZ");
}

#[tokio::test]
async fn the_connection_limit_answers_53300_and_frees_slots() {
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: "limits:\n  max_connections: 2\n".into(),
        ..ProxyOptions::default()
    });
    let first = proxy.connect(SUPERUSER).await;
    let second = proxy.connect(SUPERUSER).await;
    let error = proxy
        .try_connect(SUPERUSER, None)
        .await
        .expect_err("third must fail");
    assert_eq!(sqlstate(&error), "53300");
    assert!(format!("{error:?}").contains("too many clients"));
    // Cancel requests are not sessions and still get through when full.
    let token = first.cancel_token();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();

    drop(second);
    let reconnected = eventually(Duration::from_secs(10), || async {
        proxy.try_connect(SUPERUSER, None).await.is_ok()
    })
    .await;
    assert!(reconnected, "a closed session must free its slot");
    let one: i32 = first.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn an_unreachable_upstream_gives_08006() {
    let proxy = Proxy::start_with(ProxyOptions {
        upstream_port: Some(free_port()),
        ..ProxyOptions::default()
    });
    let error = proxy
        .try_connect(SUPERUSER, None)
        .await
        .expect_err("must fail");
    assert_eq!(sqlstate(&error), "08006");
    let text = format!("{error:?}");
    assert!(
        text.contains("pgveil: cannot connect to upstream database 127.0.0.1:"),
        "{text}"
    );
}

#[tokio::test]
async fn an_upstream_that_hangs_up_gives_08006() {
    // Something listening on the upstream port that accepts and closes at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten().take(4) {
            drop(stream);
        }
    });
    let proxy = Proxy::start_with(ProxyOptions {
        upstream_port: Some(port),
        sslmode: Some("disable".into()),
        ..ProxyOptions::default()
    });
    let error = proxy
        .try_connect(SUPERUSER, None)
        .await
        .expect_err("must fail");
    assert_eq!(sqlstate(&error), "08006");
}

#[tokio::test]
async fn a_terminated_backend_is_reported_and_other_sessions_continue() {
    let proxy = Proxy::start();
    let victim = proxy.connect(SUPERUSER).await;
    let bystander = proxy.connect(SUPERUSER).await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let direct = cluster().direct().await;
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let error = victim.query_one("SELECT 1", &[]).await.unwrap_err();
    // The server's own FATAL reaches the client (or, if the connection dropped first,
    // the client library sees it closed).
    assert!(
        error.code().map(|c| c.code()) == Some("57P01") || error.is_closed(),
        "{error:?}"
    );
    let one: i32 = bystander.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn a_client_gone_mid_result_frees_its_backend() {
    let proxy = Proxy::start();
    let mut raw = RawClient::login(proxy.port, SUPERUSER, "gone-mid-result");
    raw.send(&frame(
        b'Q',
        b"SELECT repeat('x', 1000) FROM generate_series(1, 50000000)\0",
    ));
    // Read a little of the result, then vanish.
    let first = raw.read_message().expect("result starts");
    assert_eq!(first.tag, b'T');
    drop(raw);

    let direct = cluster().direct().await;
    let freed = eventually(Duration::from_secs(20), || async {
        let count: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gone-mid-result'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        count == 0
    })
    .await;
    assert!(freed, "the upstream backend must go when its client does");
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_disconnected_after_the_startup_timeout() {
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: "limits:\n  startup_timeout_seconds: 1\n".into(),
        ..ProxyOptions::default()
    });
    let mut raw = RawClient::open(proxy.port);
    let started = Instant::now();
    let messages = raw.read_to_end();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(messages[0]
        .field(b'M')
        .unwrap_or_default()
        .contains("did not complete within 1 s"));
    still_serves(&proxy).await;
}

// Multi-threaded: the blocking waits below must not starve the task that sends the
// client's Terminate when it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_open_sessions_finish() {
    let mut proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: "limits:\n  shutdown_grace_seconds: 30\n".into(),
        ..ProxyOptions::default()
    });
    let client = proxy.connect(SUPERUSER).await;
    proxy.signal(libc::SIGTERM);
    let refused = eventually(Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", proxy.port)).is_err()
    })
    .await;
    assert!(refused, "no new connections after SIGTERM");
    // The open session keeps working during the grace period.
    for i in 0..5i32 {
        let value: i32 = client
            .query_one("SELECT $1::int4", &[&i])
            .await
            .unwrap()
            .get(0);
        assert_eq!(value, i);
    }
    assert!(
        proxy.wait_exit(Duration::from_millis(300)).is_none(),
        "must wait for the session"
    );
    drop(client);
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("exits once the session ends");
    assert!(status.success(), "{status}");
}

#[test]
fn sessions_still_open_after_the_grace_period_are_told_and_closed() {
    let mut proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: "limits:\n  shutdown_grace_seconds: 1\n".into(),
        ..ProxyOptions::default()
    });
    let mut idle = RawClient::login(proxy.port, SUPERUSER, "idle-at-shutdown");
    let started = Instant::now();
    proxy.signal(libc::SIGINT);
    let messages = idle.read_to_end();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let goodbye = messages.last().expect("a goodbye message");
    assert_eq!(
        goodbye.field(b'C').as_deref(),
        Some("57P01"),
        "{messages:?}"
    );
    assert!(goodbye
        .field(b'M')
        .unwrap_or_default()
        .contains("proxy is shutting down"));
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the grace period");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn an_upstream_lost_mid_session_gives_08006() {
    // SIGKILL of a real backend would make the shared cluster restart every session, so
    // this fault comes from a peer that logs the client in (trust) like PostgreSQL and
    // then drops the connection at the first query without a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let Ok((mut socket, _)) = listener.accept() else {
            return;
        };
        let mut length = [0u8; 4];
        socket.read_exact(&mut length).unwrap();
        let mut startup = vec![0u8; i32::from_be_bytes(length) as usize - 4];
        socket.read_exact(&mut startup).unwrap();
        let mut hello = frame(b'R', &0i32.to_be_bytes());
        hello.extend(frame(b'K', &[0, 0, 0, 42, 1, 2, 3, 4]));
        hello.extend(frame(b'Z', b"I"));
        socket.write_all(&hello).unwrap();
        let mut query = [0u8; 5];
        let _ = socket.read(&mut query);
        drop(socket);
    });
    let proxy = Proxy::start_with(ProxyOptions {
        upstream_port: Some(port),
        sslmode: Some("disable".into()),
        ..ProxyOptions::default()
    });
    let client = proxy.connect(SUPERUSER).await;
    let error = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&error), "08006");
    // Closed (FIN) or reset (RST, as here when the query was unread): either way the
    // client learns it was the upstream.
    let text = format!("{error:?}");
    assert!(
        text.contains("pgveil: upstream database closed the connection unexpectedly")
            || text.contains("pgveil: connection to upstream database lost"),
        "{text}"
    );
}

fn copy_in(raw: &mut RawClient, table: &str) {
    cluster().psql_ok(
        SUPERUSER,
        &format!("DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v text)"),
    );
    raw.send(&frame(
        b'Q',
        format!("COPY {table} FROM STDIN\0").as_bytes(),
    ));
    let messages = raw.read_until(b'G');
    assert_eq!(tags(&messages), "G");
}

fn resident_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn syncs_during_copy_in_cost_no_memory_and_keep_the_session_in_step() {
    let proxy = Proxy::start();
    let mut raw = RawClient::login(proxy.port, SUPERUSER, "sync-flood");
    copy_in(&mut raw, "sync_flood");
    let before = resident_kib(proxy.pid());
    // 4 million Syncs (20 MB): the server ignores them during COPY IN, so must pgveil.
    let syncs = frame(b'S', b"").repeat(100_000);
    for _ in 0..40 {
        raw.send(&syncs);
    }
    raw.send(&frame(b'd', b"row\n"));
    raw.send(&frame(b'c', b""));
    let messages = raw.read_until(b'Z');
    assert_eq!(tags(&messages), "CZ");
    let grown = resident_kib(proxy.pid()).saturating_sub(before);
    assert!(grown < 32 * 1024, "pgveil grew by {grown} KiB");
    // Still in step: the next query gets exactly its own answer.
    raw.send(&frame(b'Q', b"SELECT count(*) FROM sync_flood\0"));
    let messages = raw.read_until(b'Z');
    assert_eq!(tags(&messages), "TDCZ");
    assert_eq!(messages[1].body, b"\0\x01\0\0\0\x011");
}

#[test]
fn a_query_sent_during_copy_in_ends_the_session() {
    let proxy = Proxy::start();
    let mut raw = RawClient::login(proxy.port, SUPERUSER, "query-in-copy");
    copy_in(&mut raw, "query_in_copy");
    raw.send(&frame(b'Q', b"SELECT 1\0"));
    let (code, message) = closing_error(&mut raw);
    assert_eq!(code, "08P01");
    assert!(message.contains("sent during COPY FROM STDIN"), "{message}");
}

#[test]
fn a_huge_password_message_is_refused_before_it_is_buffered() {
    let proxy = Proxy::start();
    let mut raw = RawClient::open(proxy.port);
    raw.send(&startup_packet(&[
        ("user", support::MD5_USER),
        ("database", "postgres"),
    ]));
    let request = raw.read_message().expect("authentication request");
    assert_eq!(request.tag, b'R');
    // Claims 1 GiB; pgveil must refuse on the header, not wait for the bytes.
    raw.send(b"p\x40\0\0\0");
    let (code, message) = closing_error(&mut raw);
    assert_eq!(code, "08P01");
    assert!(message.contains("over its limit of 65536"), "{message}");
}

#[test]
fn one_deadline_covers_negotiation_and_authentication() {
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: "limits:\n  startup_timeout_seconds: 2\n".into(),
        ..ProxyOptions::default()
    });
    let mut raw = RawClient::open(proxy.port);
    std::thread::sleep(Duration::from_millis(1300));
    raw.send(&startup_packet(&[
        ("user", support::MD5_USER),
        ("database", "postgres"),
    ]));
    let request = raw.read_message().expect("authentication request");
    assert_eq!(request.tag, b'R');
    std::thread::sleep(Duration::from_millis(1300));
    // Each phase took less than the limit, both together more.
    raw.send(&frame(b'p', b"md5whatever\0"));
    let (_, message) = closing_error(&mut raw);
    assert!(message.contains("did not complete within 2 s"), "{message}");
}

#[test]
fn connections_that_never_start_are_bounded_too() {
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: "limits:\n  max_connections: 2\n".into(),
        ..ProxyOptions::default()
    });
    // The harness's own "is it listening" probes must be gone first, or one of them
    // still holds a starting slot when the idle connections arrive.
    std::thread::sleep(Duration::from_millis(500));
    let idle: Vec<RawClient> = (0..2).map(|_| RawClient::open(proxy.port)).collect();
    // Time for the worker to register both (longer on a loaded machine).
    std::thread::sleep(Duration::from_millis(500));
    let mut third = RawClient::open(proxy.port);
    assert!(
        third.closed_within(Duration::from_secs(5)),
        "must be closed at once"
    );
    drop(idle);
    let ok = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        let mut client = RawClient::open(proxy.port);
        client.send(&startup_packet(&[
            ("user", SUPERUSER),
            ("database", "postgres"),
        ]));
        client.read_message().is_some_and(|m| m.tag == b'R')
    });
    assert!(ok, "slots come back when idle connections close");
}

#[test]
fn a_client_that_half_closes_still_gets_its_answers() {
    let proxy = Proxy::start();
    let mut raw = RawClient::login(proxy.port, SUPERUSER, "half-close");
    raw.send(&frame(b'Q', b"SELECT 42\0"));
    raw.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let messages = raw.read_to_end();
    assert_eq!(tags(&messages), "TDCZ");
    assert_eq!(messages[1].body, b"\0\x01\0\0\0\x0242");
}
