//! Passthrough through pgveil with tokio-postgres: extended protocol, binary results,
//! pipelining, COPY both ways, cancel, LISTEN/NOTIFY, errors mid-pipeline, and explicit
//! Parse/Bind/Describe/Execute pipelines driven by hand.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use support::{cluster, cstr, frame, sqlstate, tags, Proxy, RawClient, SUPERUSER};
use tokio_postgres::AsyncMessage;

#[tokio::test]
async fn extended_protocol_with_parameters_and_binary_results() {
    let proxy = Proxy::start();
    let client = proxy.connect(SUPERUSER).await;
    let row = client
        .query_one(
            "SELECT $1::int4 + 1 AS a, $2::text AS b, $3::bytea AS c, $4::float8 AS d, \
             $5::bool AS e, $6::int8[] AS f",
            &[
                &41i32,
                &"naïve 名字",
                &vec![0u8, 255, 1, 254],
                &2.5f64,
                &true,
                &vec![1i64, i64::MAX],
            ],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>("a"), 42);
    assert_eq!(row.get::<_, &str>("b"), "naïve 名字");
    assert_eq!(row.get::<_, Vec<u8>>("c"), vec![0u8, 255, 1, 254]);
    assert_eq!(row.get::<_, f64>("d"), 2.5);
    assert!(row.get::<_, bool>("e"));
    assert_eq!(row.get::<_, Vec<i64>>("f"), vec![1, i64::MAX]);

    // A named prepared statement used many times, then closed (dropped).
    let statement = client.prepare("SELECT $1::int8 * 2").await.unwrap();
    for n in 0..50i64 {
        let doubled: i64 = client.query_one(&statement, &[&n]).await.unwrap().get(0);
        assert_eq!(doubled, n * 2);
    }
    drop(statement);
    let after: i32 = client.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(after, 7);
}

#[tokio::test]
async fn pipelined_queries_keep_their_order_and_an_error_does_not_leak_into_the_next() {
    let proxy = Proxy::start();
    let client = proxy.connect(SUPERUSER).await;
    let statement = client.prepare("SELECT $1::int4").await.unwrap();
    // tokio-postgres pipelines requests that are polled concurrently.
    let good = (0..20).map(|i| {
        let client = &client;
        let statement = &statement;
        async move {
            client
                .query_one(statement, &[&i])
                .await
                .map(|row| row.get::<_, i32>(0))
        }
    });
    let results = futures_util::future::join_all(good).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), i as i32);
    }

    let (first, failing, after) = tokio::join!(
        client.query_one("SELECT 1::int4", &[]),
        client.query_one("SELECT 1 / 0", &[]),
        client.query_one("SELECT 3::int4", &[]),
    );
    assert_eq!(first.unwrap().get::<_, i32>(0), 1);
    assert_eq!(sqlstate(&failing.unwrap_err()), "22012");
    assert_eq!(after.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test]
async fn portals_with_row_limits_inside_a_transaction() {
    let proxy = Proxy::start();
    let mut client = proxy.connect(SUPERUSER).await;
    let transaction = client.transaction().await.unwrap();
    let statement = transaction
        .prepare("SELECT g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let portal = transaction.bind(&statement, &[]).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let rows = transaction.query_portal(&portal, 3).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|row| row.get::<_, i32>(0)));
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    transaction.commit().await.unwrap();
}

#[tokio::test]
async fn copy_in_and_out_through_the_proxy() {
    let proxy = Proxy::start();
    let client = proxy.connect(SUPERUSER).await;
    client
        .batch_execute("DROP TABLE IF EXISTS copy_rt; CREATE TABLE copy_rt (id int, note text)")
        .await
        .unwrap();
    // Several megabytes, so the stream crosses many reads and writes.
    let mut data = String::new();
    for i in 0..100_000 {
        data.push_str(&format!("{i}\tnote {i} ünïcode 名\n"));
    }
    let sink = client.copy_in("COPY copy_rt FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(7919) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 100_000);

    let stream = client
        .copy_out("COPY (SELECT * FROM copy_rt ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(out, data.as_bytes());

    // A failing COPY leaves the session usable.
    let sink = client.copy_in("COPY copy_rt FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let error = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&error), "22P02");
    let count: i64 = client
        .query_one("SELECT count(*) FROM copy_rt", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 100_000);
}

#[tokio::test]
async fn cancel_reaches_the_backend_that_owns_the_key() {
    let proxy = Proxy::start();
    let client = proxy.connect(SUPERUSER).await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let result = client.query_one("SELECT pg_sleep(30)", &[]).await;
        (result.map(|_| ()), started.elapsed(), client)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (result, elapsed, client) = sleeper.await.unwrap();
    assert_eq!(sqlstate(&result.unwrap_err()), "57014");
    assert!(elapsed < Duration::from_secs(20), "cancel took {elapsed:?}");
    // The session survives its cancelled query.
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn a_cancel_request_with_an_unknown_key_does_nothing() {
    let proxy = Proxy::start();
    let client = proxy.connect(SUPERUSER).await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The right process id with a wrong secret must not cancel anything.
    let mut raw = RawClient::open(proxy.port);
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&((1234i32 << 16) | 5678).to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&[9, 9, 9, 9]);
    raw.send(&packet);
    assert!(raw.closed_within(Duration::from_secs(5)));
    let slept = client.query_one("SELECT pg_sleep(1)::text", &[]).await;
    assert!(slept.is_ok(), "{slept:?}");
}

#[tokio::test]
async fn listen_notify_reaches_the_listener() {
    let proxy = Proxy::start();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port)
        .user(SUPERUSER)
        .dbname("postgres");
    let (listener, mut connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let (sender, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(notification) = message {
                let _ = sender.send((
                    notification.channel().to_string(),
                    notification.payload().to_string(),
                ));
            }
        }
    });
    listener
        .batch_execute("LISTEN pgveil_channel")
        .await
        .unwrap();

    let notifier = proxy.connect(SUPERUSER).await;
    notifier
        .batch_execute("NOTIFY pgveil_channel, 'hello 世界'")
        .await
        .unwrap();
    let received = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("notification in time")
        .expect("notification");
    assert_eq!(
        received,
        ("pgveil_channel".to_string(), "hello 世界".to_string())
    );
}

#[tokio::test]
async fn notices_and_parameter_status_pass_through() {
    let proxy = Proxy::start();
    let client = proxy.connect(SUPERUSER).await;
    // A NOTICE does not disturb the result that follows it.
    let value: String = client
        .query_one(
            "SELECT current_setting('application_name') FROM (SELECT 1) x \
             WHERE pg_catalog.set_config('client_min_messages', 'notice', false) IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, "pgveil-tests");
    client
        .batch_execute(
            "DO $$ BEGIN RAISE NOTICE 'a notice'; END $$; SET application_name = 'renamed'",
        )
        .await
        .unwrap();
    let renamed: String = client
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(renamed, "renamed");
}

/// Parse/Bind/Describe/Execute for three statements before one Sync; the second fails,
/// so the server skips the third and answers the Sync; then a new batch works.
#[test]
fn one_sync_pipeline_with_an_error_in_the_middle() {
    let proxy = Proxy::start();
    let mut raw = RawClient::login(proxy.port, SUPERUSER, "raw-pipeline");
    let mut batch = Vec::new();
    for (name, sql) in [
        ("s1", "SELECT 1"),
        ("s2", "SELECT 1 / (random() * 0)::int"),
        ("s3", "SELECT 3"),
    ] {
        let mut parse = cstr(name);
        parse.extend_from_slice(&cstr(sql));
        parse.extend_from_slice(&0i16.to_be_bytes());
        batch.extend(frame(b'P', &parse));
        let mut bind = cstr("");
        bind.extend_from_slice(&cstr(name));
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        batch.extend(frame(b'B', &bind));
        let mut describe = vec![b'P'];
        describe.extend_from_slice(&cstr(""));
        batch.extend(frame(b'D', &describe));
        let mut execute = cstr("");
        execute.extend_from_slice(&0i32.to_be_bytes());
        batch.extend(frame(b'E', &execute));
    }
    batch.extend(frame(b'S', b""));
    raw.send(&batch);
    let messages = raw.read_until(b'Z');
    assert_eq!(tags(&messages), "12TDC12TE Z".replace(' ', ""));
    let error = &messages[messages.len() - 2];
    assert_eq!(error.field(b'C').as_deref(), Some("22012"));

    // The statement prepared before the error exists; the next batch works.
    let mut bind = cstr("");
    bind.extend_from_slice(&cstr("s1"));
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut execute = cstr("");
    execute.extend_from_slice(&0i32.to_be_bytes());
    let mut next = frame(b'B', &bind);
    next.extend(frame(b'E', &execute));
    next.extend(frame(b'S', b""));
    raw.send(&next);
    let messages = raw.read_until(b'Z');
    assert_eq!(tags(&messages), "2DCZ");
    assert_eq!(messages[1].body, b"\0\x01\0\0\0\x011");
}

#[test]
fn flush_close_function_call_and_unknown_messages_are_forwarded() {
    let proxy = Proxy::start();
    let mut raw = RawClient::login(proxy.port, SUPERUSER, "raw-misc");

    // Parse + Flush: the answer arrives without a Sync.
    let mut parse = cstr("named");
    parse.extend_from_slice(&cstr("SELECT 'x'"));
    parse.extend_from_slice(&0i16.to_be_bytes());
    let mut request = frame(b'P', &parse);
    request.extend(frame(b'H', b""));
    raw.send(&request);
    assert_eq!(raw.read_message().map(|m| m.tag), Some(b'1'));

    // Close the statement, then Sync.
    let mut close = vec![b'S'];
    close.extend_from_slice(&cstr("named"));
    let mut request = frame(b'C', &close);
    request.extend(frame(b'S', b""));
    raw.send(&request);
    assert_eq!(tags(&raw.read_until(b'Z')), "3Z");

    // FunctionCall: int4pl(40, 2) in text format.
    let oid: i32 = cluster()
        .psql_ok(SUPERUSER, "SELECT 'int4pl'::regproc::oid")
        .trim()
        .parse()
        .unwrap();
    let mut call = oid.to_be_bytes().to_vec();
    call.extend_from_slice(&1i16.to_be_bytes());
    call.extend_from_slice(&0i16.to_be_bytes());
    call.extend_from_slice(&2i16.to_be_bytes());
    for argument in [&b"40"[..], b"2"] {
        call.extend_from_slice(&(argument.len() as i32).to_be_bytes());
        call.extend_from_slice(argument);
    }
    call.extend_from_slice(&0i16.to_be_bytes());
    raw.send(&frame(b'F', &call));
    let messages = raw.read_until(b'Z');
    assert_eq!(tags(&messages), "VZ");
    assert_eq!(messages[0].body, b"\0\0\0\x0242");

    // An unknown message type reaches the server, which refuses it itself.
    raw.send(&frame(b'Y', b"whatever"));
    let messages = raw.read_to_end();
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .expect("error from server");
    assert_eq!(error.field(b'C').as_deref(), Some("08P01"));
    assert!(
        error
            .field(b'M')
            .unwrap_or_default()
            .contains("invalid frontend message type 89"),
        "{:?}",
        error.field(b'M')
    );
}

async fn many_concurrent_sessions(proxy: &Proxy) {
    let tasks = (0..16).map(|n| {
        let port = proxy.port;
        tokio::spawn(async move {
            let client = support::Proxy::connect_port(port).await;
            for i in 0..50i32 {
                let value: i32 = client
                    .query_one("SELECT $1::int4 + $2::int4", &[&n, &i])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(value, n + i);
            }
        })
    });
    for task in futures_util::future::join_all(tasks).await {
        task.unwrap();
    }
}

#[tokio::test]
async fn sessions_are_independent_under_concurrency() {
    many_concurrent_sessions(&Proxy::start()).await;
}

#[tokio::test]
async fn a_single_event_loop_serves_concurrent_sessions() {
    let proxy = Proxy::start_with(support::ProxyOptions {
        extra_yaml: "workers: 1\n".into(),
        ..support::ProxyOptions::default()
    });
    many_concurrent_sessions(&proxy).await;
}

#[tokio::test]
async fn every_startup_parameter_reaches_the_server() {
    let proxy = Proxy::start();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port)
        .user(SUPERUSER)
        .dbname("template1")
        .application_name("startup-params")
        .options("-c statement_timeout=4321 -c search_path=pg_catalog");
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT current_database()::text, current_setting('application_name'), \
             current_setting('statement_timeout'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "template1");
    assert_eq!(row.get::<_, &str>(1), "startup-params");
    assert_eq!(row.get::<_, &str>(2), "4321ms");
    assert_eq!(row.get::<_, &str>(3), "pg_catalog");
}
