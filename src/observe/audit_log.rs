//! The audit log writer: sessions hand it records through a bounded queue, and one
//! thread of its own appends them to the audit file (or stdout), continuing the hash
//! chain. Sessions never wait for the disk.
//!
//! A record the writer has taken is not dropped while pgveil runs: a write that fails
//! (disk full, permission, a vanished directory) cuts the file back to its last
//! complete record and is retried every second with the file reopened. Meanwhile the
//! log reports itself unwritable, and sessions refuse statements touching protected
//! columns (`audit.on_failure: refuse`) or go on and count them (`continue`). Records
//! the full queue cannot take are counted as lost; they never get a place in the chain,
//! so the file stays verifiable.
//!
//! On start the chain continues from the last record already in the file; after a
//! reopen (SIGHUP, for log rotation) it continues in the new file, so the rotated files
//! verify together, in order (`pgveil audit verify old new`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tracing::{error, info, warn};

use super::audit::{encode, AuditRecord, GENESIS_HASH};
use super::metrics;
use crate::config::{AuditConfig, AuditFailureMode};

/// Records waiting to be written, at most.
const QUEUE_CAPACITY: usize = 16_384;
/// Records written in one go, at most.
const BATCH_RECORDS: usize = 1_024;
/// How soon a failed open or write is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How far back from the end of an existing file its last record is looked for.
const MAX_RECORD_BYTES: u64 = 16 << 20;

#[derive(Debug, Error)]
pub enum AuditLogError {
    #[error("cannot continue the hash chain of audit log {path}: {reason}")]
    Resume { path: String, reason: String },
    #[error("cannot start the audit log writer: {0}")]
    Thread(io::Error),
}

/// Where records go.
#[derive(Debug, Clone)]
enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Stdout => "stdout".into(),
            Target::File(path) => path.display().to_string(),
        }
    }
}

/// What the writer and the sessions share.
struct Status {
    /// Records are getting through: the last open or write succeeded and the queue did
    /// not overflow since.
    writable: AtomicBool,
    /// Why not, when not.
    problem: Mutex<Option<String>>,
    /// Reopen the file before the next write (SIGHUP).
    reopen: AtomicBool,
}

impl Status {
    fn set_problem(&self, problem: Option<String>) {
        let mut current = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        *current = problem;
    }
}

enum Command {
    Record(Box<AuditRecord>),
    /// Answered once everything queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// The handle sessions and the server use.
pub struct AuditLog {
    queue: SyncSender<Command>,
    status: Arc<Status>,
    all_statements: bool,
    on_failure: AuditFailureMode,
    target: String,
}

impl AuditLog {
    /// Opens (or creates) the audit log and starts its writer. A file that cannot be
    /// opened yet is not an error: the log starts unwritable and keeps trying. A file
    /// whose last record cannot be read is: the chain could not continue from it.
    pub fn start(config: &AuditConfig) -> Result<Arc<AuditLog>, AuditLogError> {
        let target = if config.path == "-" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(&config.path))
        };
        let (seq, hash) = match &target {
            Target::Stdout => (0, GENESIS_HASH.to_string()),
            Target::File(path) => resume(path).map_err(|reason| AuditLogError::Resume {
                path: path.display().to_string(),
                reason,
            })?,
        };
        let status = Arc::new(Status {
            writable: AtomicBool::new(false),
            problem: Mutex::new(None),
            reopen: AtomicBool::new(false),
        });
        let (queue, receiver) = mpsc::sync_channel(QUEUE_CAPACITY);
        let mut writer = Writer {
            target: target.clone(),
            output: None,
            good_len: 0,
            seq,
            hash,
            pending: String::new(),
            pending_records: 0,
            pending_chain: None,
            waiting: Vec::new(),
            failing: false,
            status: status.clone(),
        };
        writer.write_pending();
        if seq > 0 {
            info!(path = %target.describe(), seq, "audit log continues its hash chain");
        }
        std::thread::Builder::new()
            .name("pgveil-audit".into())
            .spawn(move || writer.run(receiver))
            .map_err(AuditLogError::Thread)?;
        Ok(Arc::new(AuditLog {
            queue,
            status,
            all_statements: config.all_statements,
            on_failure: config.on_failure,
            target: target.describe(),
        }))
    }

    /// Queues a record; never waits. A record the queue cannot take is counted as lost,
    /// and the log reports itself unwritable until the writer catches up.
    pub fn record(&self, record: AuditRecord) {
        match self.queue.try_send(Command::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                metrics().audit_records_lost_total.inc();
                if self.status.writable.swap(false, Ordering::AcqRel) {
                    warn!(path = %self.target, "audit log queue is full: records are being lost");
                    self.status
                        .set_problem(Some("the audit log's queue is full".into()));
                }
            }
        }
    }

    /// Whether records are getting through.
    pub fn writable(&self) -> bool {
        self.status.writable.load(Ordering::Acquire)
    }

    /// Why records are not getting through, when they are not.
    pub fn problem(&self) -> Option<String> {
        if self.writable() {
            return None;
        }
        let problem = self
            .status
            .problem
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Some(
            problem
                .clone()
                .unwrap_or_else(|| "the audit log cannot be written".into()),
        )
    }

    /// Statements that touch no protected column are recorded too.
    pub fn all_statements(&self) -> bool {
        self.all_statements
    }

    /// Statements touching protected columns must be refused while records cannot be
    /// written.
    pub fn refuses_when_unwritable(&self) -> bool {
        self.on_failure == AuditFailureMode::Refuse
    }

    /// Where the records go, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The file is reopened before the next write (after log rotation).
    pub fn reopen(&self) {
        self.status.reopen.store(true, Ordering::Release);
    }

    /// Waits up to `limit` for every record queued so far to be written; whether they
    /// were.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let (done, wait) = mpsc::channel();
        let mut command = Command::Flush(done);
        // Never block on a full queue: a writer that cannot write would hold exit up.
        loop {
            match self.queue.try_send(command) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    command = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        wait.recv_timeout(left).is_ok()
    }
}

/// The writer thread's state.
struct Writer {
    target: Target,
    output: Option<File>,
    /// Length of the file before the batch being written (regular files).
    good_len: u64,
    /// The chain as written: last `seq` and `hash`.
    seq: u64,
    hash: String,
    /// Encoded records not yet written, and the chain once they are.
    pending: String,
    pending_records: u64,
    pending_chain: Option<(u64, String)>,
    /// Flushes to answer once `pending` is written.
    waiting: Vec<mpsc::Sender<()>>,
    /// The last attempt failed.
    failing: bool,
    status: Arc<Status>,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Command>) {
        loop {
            if self.failing {
                // Keep the batch that failed; what arrives meanwhile waits in the queue.
                std::thread::sleep(RETRY_EVERY);
            } else {
                match receiver.recv() {
                    Ok(command) => self.take(command),
                    Err(_) => return,
                }
            }
            let mut disconnected = false;
            while self.pending_records < BATCH_RECORDS as u64 {
                match receiver.try_recv() {
                    Ok(command) => self.take(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.write_pending();
            if disconnected {
                return;
            }
        }
    }

    /// Adds a record to the batch, with its place in the chain.
    fn take(&mut self, command: Command) {
        match command {
            Command::Flush(done) => self.waiting.push(done),
            Command::Record(record) => {
                let (seq, prev) = match &self.pending_chain {
                    Some((seq, hash)) => (*seq, hash.clone()),
                    None => (self.seq, self.hash.clone()),
                };
                match encode(seq + 1, &record, &prev) {
                    Ok((line, hash)) => {
                        self.pending.push_str(&line);
                        self.pending.push('\n');
                        self.pending_records += 1;
                        self.pending_chain = Some((seq + 1, hash));
                    }
                    Err(problem) => {
                        error!(%problem, "cannot encode an audit record");
                        metrics().audit_records_lost_total.inc();
                    }
                }
            }
        }
    }

    /// Writes the batch (and opens the file first when needed).
    fn write_pending(&mut self) {
        if self.status.reopen.swap(false, Ordering::AcqRel) {
            self.output = None;
        }
        if let Err(problem) = self.write_batch() {
            metrics().audit_write_errors_total.inc();
            if !self.failing {
                error!(path = %self.target.describe(), %problem, "cannot write the audit log; retrying every second");
            }
            self.failing = true;
            self.status.writable.store(false, Ordering::Release);
            self.status.set_problem(Some(format!(
                "cannot write audit log {}: {problem}",
                self.target.describe()
            )));
            return;
        }
        if self.failing {
            info!(path = %self.target.describe(), "the audit log can be written again");
        }
        self.failing = false;
        if let Some((seq, hash)) = self.pending_chain.take() {
            metrics().audit_records_total.inc_by(self.pending_records);
            self.seq = seq;
            self.hash = hash;
        }
        self.pending.clear();
        self.pending_records = 0;
        self.status.set_problem(None);
        self.status.writable.store(true, Ordering::Release);
        for done in self.waiting.drain(..) {
            let _ = done.send(());
        }
    }

    fn write_batch(&mut self) -> io::Result<()> {
        let path = match &self.target {
            Target::Stdout => {
                if self.pending.is_empty() {
                    return Ok(());
                }
                let mut stdout = io::stdout().lock();
                stdout.write_all(self.pending.as_bytes())?;
                return stdout.flush();
            }
            Target::File(path) => path.clone(),
        };
        if self.output.is_none() {
            self.output = Some(open_append(&path)?);
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(file) = self.output.as_mut() else {
            return Err(io::Error::other("audit log not open"));
        };
        // Taken before every batch: the file may have been truncated (copytruncate).
        self.good_len = file.metadata()?.len();
        let regular = file.metadata().is_ok_and(|m| m.is_file());
        let written = file
            .write_all(self.pending.as_bytes())
            .and_then(|()| file.flush())
            // Written means on disk: a record must survive a power cut.
            .and_then(|()| if regular { file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => Ok(()),
            Err(problem) => {
                // Cut a partly written batch off, so the file ends with a complete
                // record when the retry appends it again.
                if regular {
                    let _ = file.set_len(self.good_len);
                }
                self.output = None;
                Err(problem)
            }
        }
    }
}

/// Opens the audit file for appending, creating it readable by its owner only.
fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// The `seq` and `hash` of the last record in an existing file; `(0, genesis)` for a
/// missing or empty file, or one that is not a regular file (a device, a pipe).
fn resume(path: &Path) -> Result<(u64, String), String> {
    let genesis = (0, GENESIS_HASH.to_string());
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(genesis),
        // Unreachable (a directory in the path is missing or forbidden): the writer
        // reports it when it tries to open the file.
        Err(_) => return Ok(genesis),
    };
    if !metadata.is_file() || metadata.len() == 0 {
        return Ok(genesis);
    }
    let mut file = File::open(path).map_err(|error| error.to_string())?;
    let len = metadata.len();
    let start = len.saturating_sub(MAX_RECORD_BYTES);
    file.seek(SeekFrom::Start(start))
        .map_err(|error| error.to_string())?;
    let mut tail = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut tail)
        .map_err(|error| error.to_string())?;
    let Some(body) = tail.strip_suffix(b"\n") else {
        return Err(
            "its last line is incomplete (pgveil stopped while writing it?); \
                    check the file with `pgveil audit verify`, then move it aside"
                .into(),
        );
    };
    let line_start = body
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    if line_start == 0 && start > 0 {
        return Err(format!(
            "its last line is longer than {MAX_RECORD_BYTES} bytes"
        ));
    }
    let last: serde_json::Value = serde_json::from_slice(&body[line_start..])
        .map_err(|error| format!("its last line is not an audit record: {error}"))?;
    match (
        last.get("seq").and_then(serde_json::Value::as_u64),
        last.get("hash").and_then(serde_json::Value::as_str),
    ) {
        (Some(seq), Some(hash)) => Ok((seq, hash.to_string())),
        _ => Err("its last line lacks seq or hash".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::audit::{sample_record, verify};

    fn record(n: u64) -> AuditRecord {
        sample_record(&format!("SELECT phone FROM t{n}"), n)
    }

    fn config(path: &Path) -> AuditConfig {
        AuditConfig {
            path: path.display().to_string(),
            all_statements: false,
            on_failure: AuditFailureMode::Refuse,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgveil-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn verified(paths: &[&Path]) -> u64 {
        let mut text = Vec::new();
        for path in paths {
            text.extend(std::fs::read(path).unwrap());
        }
        verify(&text[..]).unwrap()
    }

    #[test]
    fn records_are_chained_and_a_restart_continues_the_chain() {
        let dir = temp_dir("restart");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::start(&config(&path)).unwrap();
        assert!(log.writable());
        for n in 1..=3 {
            log.record(record(n));
        }
        assert!(log.flush(Duration::from_secs(5)));
        drop(log);
        let log = AuditLog::start(&config(&path)).unwrap();
        log.record(record(4));
        assert!(log.flush(Duration::from_secs(5)));
        assert_eq!(verified(&[&path]), 4);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().last().unwrap().starts_with("{\"seq\":4,"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_rotated_file_continues_the_chain_in_the_new_one() {
        let dir = temp_dir("rotate");
        let path = dir.join("audit.jsonl");
        let rotated = dir.join("audit.jsonl.1");
        let log = AuditLog::start(&config(&path)).unwrap();
        log.record(record(1));
        log.record(record(2));
        assert!(log.flush(Duration::from_secs(5)));
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.record(record(3));
        assert!(log.flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(verified(&[&rotated, &path]), 3);
    }

    #[test]
    fn an_unwritable_log_says_so_and_recovers_without_losing_records() {
        let dir = temp_dir("recover");
        let missing = dir.join("not-yet");
        let path = missing.join("audit.jsonl");
        let log = AuditLog::start(&config(&path)).unwrap();
        assert!(!log.writable());
        assert!(log.problem().unwrap().contains("not-yet"));
        log.record(record(1));
        assert!(!log.flush(Duration::from_millis(300)));
        std::fs::create_dir_all(&missing).unwrap();
        assert!(log.flush(Duration::from_secs(5)));
        assert!(log.writable());
        assert_eq!(verified(&[&path]), 1);
    }

    #[test]
    fn a_file_ending_in_a_broken_record_is_not_continued() {
        let dir = temp_dir("broken");
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, "{\"seq\":1,\"hash\":\"ab").unwrap();
        let error = AuditLog::start(&config(&path)).err().unwrap();
        assert!(error.to_string().contains("incomplete"), "{error}");
        std::fs::write(&path, "not json\n").unwrap();
        assert!(AuditLog::start(&config(&path)).is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_full_disk_makes_the_log_unwritable() {
        let log = AuditLog::start(&config(Path::new("/dev/full"))).unwrap();
        assert!(log.writable(), "opening /dev/full succeeds");
        log.record(record(1));
        assert!(!log.flush(Duration::from_millis(500)));
        assert!(!log.writable());
        assert!(log.problem().unwrap().contains("/dev/full"));
    }
}
