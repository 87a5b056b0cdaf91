//! Authentication relayed through pgveil: trust, cleartext, MD5 and SCRAM-SHA-256 logins
//! (pg_hba demands each), wrong passwords, TLS from clients, TLS to the upstream per
//! sslmode, and SCRAM-SHA-256-PLUS never offered across pgveil's two TLS sessions.

mod support;

use support::{
    cluster, sqlstate, Proxy, ProxyOptions, CLEARTEXT_USER, MD5_USER, PASSWORD, SCRAM_USER,
    SUPERUSER,
};

async fn whoami(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn md5_scram_and_cleartext_logins_are_relayed() {
    for sslmode in ["disable", "require"] {
        let proxy = Proxy::start_with(ProxyOptions {
            sslmode: Some(sslmode.into()),
            ..ProxyOptions::default()
        });
        for user in [MD5_USER, SCRAM_USER, CLEARTEXT_USER] {
            let client = proxy.connect_with_password(user, PASSWORD).await;
            assert_eq!(whoami(&client).await, user, "sslmode {sslmode}");
        }
        let trusted = proxy.connect(SUPERUSER).await;
        assert_eq!(whoami(&trusted).await, SUPERUSER);
    }
}

#[tokio::test]
async fn wrong_passwords_are_refused_by_the_server() {
    let proxy = Proxy::start();
    for user in [MD5_USER, SCRAM_USER, CLEARTEXT_USER] {
        let error = proxy
            .try_connect(user, Some("wrong"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
        assert_eq!(sqlstate(&error), "28P01", "{user}");
    }
    // The proxy keeps serving.
    let client = proxy.connect_with_password(SCRAM_USER, PASSWORD).await;
    assert_eq!(whoami(&client).await, SCRAM_USER);
}

#[test]
fn psql_logs_in_with_scram_and_md5_passwords() {
    let proxy = Proxy::start();
    for user in [SCRAM_USER, MD5_USER] {
        let output = proxy.psql_env(
            user,
            ["-c", "SELECT current_user"],
            &[("PGPASSWORD", PASSWORD)],
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{user}\n"));
    }
    // Without a password psql fails cleanly (no prompt: stdin is not a terminal).
    let output = proxy.psql(SCRAM_USER, ["-w", "-c", "SELECT 1"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("password"));
}

#[test]
fn clients_can_use_tls_to_pgveil() {
    let proxy = Proxy::start_with(ProxyOptions {
        tls: true,
        sslmode: Some("disable".into()),
        ..ProxyOptions::default()
    });
    let ca = cluster().ca.display().to_string();
    let output = proxy.psql_env(
        SCRAM_USER,
        ["-c", "SELECT current_user"],
        &[
            ("PGPASSWORD", PASSWORD),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", &ca),
            ("PGHOST", "localhost"),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{SCRAM_USER}\n")
    );

    // Without TLS configured, pgveil answers SSLRequest with N.
    let plain = Proxy::start();
    let output = plain.psql_env(SUPERUSER, ["-c", "SELECT 1"], &[("PGSSLMODE", "require")]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not support SSL"));
}

#[test]
fn scram_plus_is_never_offered_across_two_tls_sessions() {
    let proxy = Proxy::start_with(ProxyOptions {
        tls: true,
        sslmode: Some("require".into()),
        ..ProxyOptions::default()
    });
    let env = |binding: &'static str| {
        vec![
            ("PGPASSWORD", PASSWORD),
            ("PGSSLMODE", "require"),
            ("PGCHANNELBINDING", binding),
        ]
    };
    // A client that insists on channel binding cannot get it through pgveil.
    let output = proxy.psql_env(SCRAM_USER, ["-c", "SELECT 1"], &env("require"));
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("channel binding"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // With libpq's default (prefer) the client would claim the server refused channel
    // binding; pgveil says clearly why that cannot work.
    let output = proxy.psql_env(SCRAM_USER, ["-c", "SELECT 1"], &env("prefer"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pgveil: SCRAM channel binding cannot span two TLS sessions"),
        "{stderr}"
    );
    assert!(stderr.contains("channel_binding=disable"), "{stderr}");
    // Without channel binding SCRAM works over both TLS sessions.
    let output = proxy.psql_env(SCRAM_USER, ["-c", "SELECT current_user"], &env("disable"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{SCRAM_USER}\n")
    );
}

/// Whether the server sees the proxy's upstream connection as TLS.
async fn upstream_uses_tls(proxy: &Proxy) -> bool {
    proxy
        .connect(SUPERUSER)
        .await
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn upstream_tls_follows_sslmode() {
    let proxy = Proxy::start_with(ProxyOptions {
        sslmode: Some("verify-full".into()),
        upstream_ca: Some(cluster().ca.clone()),
        ..ProxyOptions::default()
    });
    assert!(upstream_uses_tls(&proxy).await, "verify-full must encrypt");

    let proxy = Proxy::start_with(ProxyOptions {
        sslmode: Some("disable".into()),
        ..ProxyOptions::default()
    });
    assert!(!upstream_uses_tls(&proxy).await, "disable must not use TLS");

    // verify-full with a CA that did not sign the server certificate is refused.
    let other_ca = proxy.dir.join("other-ca.pem");
    let key = proxy.dir.join("other-ca.key");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(status.status.success());
    let proxy = Proxy::start_with(ProxyOptions {
        sslmode: Some("verify-full".into()),
        upstream_ca: Some(other_ca),
        ..ProxyOptions::default()
    });
    let error = proxy
        .try_connect(SUPERUSER, None)
        .await
        .expect_err("must fail");
    assert_eq!(sqlstate(&error), "08006");
    assert!(
        format!("{error:?}").contains("TLS handshake failed"),
        "{error:?}"
    );
}
