//! `pgveil demo` end to end: it starts, each printed psql line works and shows that
//! role's view of the data, and Ctrl-C removes everything it created.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::free_port;

fn psql(line: &str, sql: &str) -> String {
    let output = Command::new("psql")
        .args(["-X", "-At", line, "-c", sql])
        .output()
        .expect("run psql");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_demo_serves_each_role_and_cleans_up_on_ctrl_c() {
    let port = free_port();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["demo", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgveil demo");
    let stdout = demo.stdout.take().expect("stdout");
    let mut banner = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("banner line");
        let done = line.contains("Ctrl-C stops");
        banner.push(line);
        if done {
            break;
        }
    }
    let connection = |user: &str| {
        let line = banner
            .iter()
            .find(|l| l.contains(&format!("user={user} ")))
            .unwrap_or_else(|| panic!("no psql line for {user}: {banner:#?}"));
        line[line.find("\"").unwrap() + 1..line.rfind('"').unwrap()].to_string()
    };
    let dir = banner
        .iter()
        .find_map(|l| l.strip_prefix("Files (deleted on exit): "))
        .and_then(|l| l.split("/pgveil.yaml").next())
        .map(std::path::PathBuf::from)
        .expect("demo folder in the banner");
    // pgveil listens once the banner is out; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let query = "SELECT phone FROM customers ORDER BY id LIMIT 1";
    let billing = psql(&connection("billing_svc"), query);
    let support = psql(&connection("alice"), query);
    assert!(
        billing.trim().len() == 11 && billing.trim().chars().all(|c| c.is_ascii_digit()),
        "{billing}"
    );
    assert_eq!(
        support.trim(),
        format!("{}****{}", &billing.trim()[..3], &billing.trim()[7..])
    );
    let guest = psql(
        &connection("guest"),
        "SELECT id_card FROM customers LIMIT 1",
    );
    assert!(
        guest.contains("permission denied for column public.customers.id_card (role default)"),
        "{guest}"
    );

    // The three statements are in the demo's audit log, and its chain verifies.
    let audit = dir.join("audit.jsonl");
    assert!(
        banner.iter().any(|l| l.contains("pgveil audit verify")),
        "{banner:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let verified = loop {
        let output = Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .args(["audit", "verify"])
            .arg(&audit)
            .output()
            .expect("run audit verify");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if text.contains("3 records, hash chain intact") || Instant::now() > deadline {
            break text + &String::from_utf8_lossy(&output.stderr);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        verified.contains("3 records, hash chain intact"),
        "{verified}"
    );

    // SAFETY: signalling our own child.
    unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.try_wait().expect("wait demo") {
            break status;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "demo exited with {status}");
    assert!(!dir.exists(), "demo folder {} left behind", dir.display());
}
