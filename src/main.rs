//! The `pgveil` command line: parses arguments, loads the configuration and starts the
//! proxy. The only place where errors become `anyhow` messages for a human.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing::{level_filters::LevelFilter, warn};

use pgveil::catalog::connect::CatalogLogin;
use pgveil::catalog::snapshot::CatalogSnapshot;
use pgveil::config::Config;
use pgveil::policy::Policy;

/// Transparent PostgreSQL proxy. Applications connect to pgveil instead of PostgreSQL;
/// pgveil returns plaintext, a mask, NULL or an error for each protected column,
/// according to the caller's role in a YAML policy.
#[derive(Parser)]
#[command(name = "pgveil", version, long_about = None)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (or set PGVEIL_LOG).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: applications connect to `listen`, pgveil connects to `upstream`.
    #[command(
        after_help = "Examples:\n  pgveil run --config /etc/pgveil/pgveil.yaml\n  pgveil run --listen 127.0.0.1:6432 --upstream db.internal:5432\n\nSIGTERM or SIGINT: stop accepting, let open sessions finish for limits.shutdown_grace_seconds, then exit."
    )]
    Run(RunArgs),
    /// Try pgveil with nothing set up: a throwaway PostgreSQL with a demo CRM, a demo
    /// policy and pgveil in front; prints one psql line per role. Ctrl-C removes it all.
    #[command(
        after_help = "Example:\n  pgveil demo            # then paste one of the printed psql lines"
    )]
    Demo {
        /// Port pgveil listens on (127.0.0.1).
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Keep the demo folder (data directory, config, policy) after exit.
        #[arg(long)]
        keep: bool,
    },
    /// Check a policy file, or show what it gives one role.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Create a keyring of encryption keys, or rotate its active key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Encrypt the plaintext values already stored in a protected table, in place.
    ///
    /// Reads the table in batches of --batch rows, each batch its own transaction, and
    /// encrypts every plaintext value of its `encrypt:` columns under the active key.
    /// Columns whose type cannot hold ciphertext are first widened to text (one ALTER
    /// TABLE, which rewrites the table under an exclusive lock); a column that is not
    /// text-like needs its `type:` in the policy first, so clients keep seeing its type.
    /// Values already encrypted, under any key, are skipped: an interrupted run is
    /// continued by running it again. Connects with the config's `catalog` login, which
    /// needs UPDATE on the table, and ownership of it to widen columns.
    #[command(
        after_help = "Example:\n  pgveil encrypt --config /etc/pgveil/pgveil.yaml --table public.customers --batch 5000\n\nRunning pgveil instances notice widened columns by themselves: at once with the event\ntrigger of sql/pgveil-ddl-notify.sql, otherwise at their next catalog refresh (within\n60 s); no restart is needed. Until its values are encrypted, pgveil answers a plaintext\nvalue of an encrypted column with XX001. A report (rows, values encrypted and skipped,\nNULLs, batches, rows/s) is printed at the end; a value that cannot be encrypted or a\nciphertext that does not decrypt stops the run with exit 1 and one line naming the\ntable, column and row, never the value."
    )]
    Encrypt(MigrateArgs),
    /// Re-encrypt values stored under older keys with the keyring's active key.
    ///
    /// Reads the table like `pgveil encrypt` and moves every envelope that names an older
    /// key to the active one; values already under it are skipped. Plaintext values are
    /// not encrypted here: they are counted and make the command exit 1, pointing to
    /// `pgveil encrypt`.
    #[command(
        after_help = "Example:\n  pgveil keys rotate --keyring /etc/pgveil/keyring.yaml\n  # restart every pgveil that uses the keyring, then:\n  pgveil reencrypt --config /etc/pgveil/pgveil.yaml --table public.customers\n\nRestart pgveil with the rotated keyring first: a pgveil still holding the old keyring\ncannot read values moved to the new key. Once every table with encrypted columns has\nbeen re-encrypted, older keys may be removed from the keyring."
    )]
    Reencrypt(MigrateArgs),
    /// Work with audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// pgveil config: its `policy`, `keyring` (or PGVEIL_KEYRING) and `catalog` login.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// The protected table, as the policy names it (a bare name means public.NAME).
    #[arg(long, value_name = "SCHEMA.TABLE")]
    table: String,
    /// Database to connect to [default: catalog.database of the config].
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// Rows per batch (one transaction each); a table without a primary key is read in
    /// ranges of pages holding about that many rows.
    #[arg(long, value_name = "N", default_value_t = pgveil::migrate::DEFAULT_BATCH,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch: u64,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new keyring with one fresh random key, k1, active.
    ///
    /// The file is created with mode 0600 and holds the keys in plain base64: keep it out of version control
    /// and backups of the database, and keep a safe copy: data encrypted under a lost key
    /// cannot be read by anyone.
    #[command(
        after_help = "Example:\n  pgveil keys generate --out /etc/pgveil/keyring.yaml\n\nThen set `keyring: /etc/pgveil/keyring.yaml` in the pgveil config (or put the file's\ncontents in PGVEIL_KEYRING)."
    )]
    Generate {
        /// Where to write the keyring (YAML). It must not exist yet, unless --force.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace an existing file. Its keys are gone for good, and so is every value
        /// encrypted under them.
        #[arg(long)]
        force: bool,
    },
    /// Add a fresh random key to a keyring and make it active; older keys stay for reading.
    ///
    /// The new key gets the next free id (k2, k3, ...). The older keys stay, so values encrypted under them still decrypt;
    /// `pgveil reencrypt` moves stored values to the new key. The file is replaced in one
    /// step (mode 0600, same owner); comments in it are not kept.
    #[command(
        after_help = "Example:\n  pgveil keys rotate --keyring /etc/pgveil/keyring.yaml\n\nEvery pgveil using the keyring encrypts with the new key once it has loaded the file\nagain (restart it); until then it keeps the old active key. Rotating also changes\nthe output of the `hash` mask, which is keyed from the active key."
    )]
    Rotate {
        /// The keyring file to rotate (PGVEIL_KEYRING is not used here).
        #[arg(long, value_name = "FILE")]
        keyring: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit log: exit 0 with the record count when it is
    /// intact, exit 1 naming the first record that was edited, removed or reordered.
    /// After log rotation the chain continues from file to file: give them oldest first.
    #[command(
        after_help = "Examples:\n  pgveil audit verify /var/log/pgveil/audit.jsonl\n  pgveil audit verify audit.jsonl.2 audit.jsonl.1 audit.jsonl\n  pgveil audit verify --partial audit.jsonl   # the older files are gone"
    )]
    Verify {
        /// Audit log files (JSON lines), oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The first file may continue a chain whose start is gone (rotated away);
        /// prints the seq and prev_hash it starts from. Records removed before its
        /// first one cannot be noticed.
        #[arg(long)]
        partial: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy; with --config, also against the live database: tables and
    /// columns exist and their types fit. Exit 1 with FILE:LINE:COL: message per error.
    #[command(
        after_help = "Examples:\n  pgveil policy check policies/crm.yaml\n  pgveil policy check policies/crm.yaml --config /etc/pgveil/pgveil.yaml --database crm"
    )]
    Check {
        /// Policy file (YAML).
        file: PathBuf,
        /// pgveil config whose `catalog` login is used to read the database.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Database to check against [default: catalog.database of the config].
        #[arg(long, value_name = "NAME", requires = "config")]
        database: Option<String>,
    },
    /// Print the effective table × column → action matrix of one role.
    #[command(after_help = "Example:\n  pgveil policy explain policies/crm.yaml --role support")]
    Explain {
        /// Policy file (YAML).
        file: PathBuf,
        /// Role name as written in the policy (or `default`).
        #[arg(long, value_name = "ROLE")]
        role: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file (YAML) [default: config/pgveil.yaml if it exists, else built-in
    /// defaults]
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address applications connect to, e.g. 127.0.0.1:6432 (overrides `listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// PostgreSQL server as HOST:PORT (overrides `upstream.host` and `upstream.port`).
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<String>,
    /// Policy file (overrides `policy`).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Address of the HTTP admin endpoint (overrides `admin`).
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// Event-loop threads running sessions: 0 = one per core (overrides `workers`).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

const DEFAULT_CONFIG: &str = "config/pgveil.yaml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Demo { port, keep } => pgveil::demo::run(pgveil::demo::DemoOptions {
            listen_port: port,
            keep,
        })
        .map_err(anyhow::Error::from),
        Command::Policy(PolicyCommand::Check {
            file,
            config,
            database,
        }) => policy_check(&file, config.as_deref(), database),
        Command::Policy(PolicyCommand::Explain { file, role }) => policy_explain(&file, &role),
        Command::Keys(KeysCommand::Generate { out, force }) => keys_generate(&out, force),
        Command::Keys(KeysCommand::Rotate { keyring }) => keys_rotate(&keyring),
        Command::Audit(AuditCommand::Verify { files, partial }) => audit_verify(&files, partial),
        Command::Encrypt(args) => migrate(pgveil::migrate::Mode::Encrypt, args),
        Command::Reencrypt(args) => migrate(pgveil::migrate::Mode::Reencrypt, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<Reported>() => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("pgveil: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(flag: Option<&str>) {
    let wanted = flag
        .map(str::to_string)
        .or_else(|| std::env::var("PGVEIL_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let level = wanted.parse::<LevelFilter>().unwrap_or_else(|_| {
        eprintln!("pgveil: unknown log level {wanted:?}; using info");
        LevelFilter::INFO
    });
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn load_config(args: &RunArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG))?
        }
        None => {
            warn!("no --config given and {DEFAULT_CONFIG} not found; using built-in defaults");
            Config::default()
        }
    };
    if let Some(listen) = &args.listen {
        config.listen = listen
            .parse()
            .with_context(|| format!("--listen: expected ADDR:PORT, got {listen:?}"))?;
    }
    if let Some(upstream) = &args.upstream {
        config.set_upstream(upstream)?;
    }
    if let Some(policy) = &args.policy {
        config.policy = Some(policy.clone());
    }
    if let Some(admin) = &args.admin {
        config.admin = Some(
            admin
                .parse()
                .with_context(|| format!("--admin: expected ADDR:PORT, got {admin:?}"))?,
        );
    }
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    config.validate("config")?;
    Ok(config)
}

fn run(args: RunArgs) -> Result<()> {
    let config = load_config(&args)?;
    pgveil::server::run(config)?;
    Ok(())
}

fn keys_generate(out: &std::path::Path, force: bool) -> Result<()> {
    use pgveil::protect::keyring::{Keyring, KeyringError, WriteMode};
    let keyring = Keyring::generate()?;
    let mode = if force {
        WriteMode::Replace
    } else {
        WriteMode::CreateNew
    };
    match keyring.write_file(out, mode) {
        Ok(()) => {}
        Err(error @ KeyringError::Exists { .. }) => {
            bail!("{error}; pass --force to replace it")
        }
        Err(error) => return Err(error.into()),
    }
    println!(
        "{}: new keyring written (mode 0600); active key {}",
        out.display(),
        keyring.active_id()
    );
    Ok(())
}

fn keys_rotate(path: &std::path::Path) -> Result<()> {
    use pgveil::protect::keyring::{Keyring, WriteMode};
    let mut keyring = Keyring::load(path)?;
    let old_ids: Vec<String> = keyring.key_ids().iter().map(|id| id.to_string()).collect();
    let new_id = keyring.rotate()?;
    keyring.write_file(path, WriteMode::Replace)?;
    println!(
        "{}: key {new_id} added and active; the older keys ({}) stay for reading values \
         encrypted under them, and `pgveil reencrypt` moves stored values to {new_id}",
        path.display(),
        old_ids.join(", ")
    );
    Ok(())
}

fn audit_verify(files: &[PathBuf], partial: bool) -> Result<()> {
    use pgveil::observe::audit::ChainVerifier;
    let mut chain = if partial {
        ChainVerifier::from_anywhere()
    } else {
        ChainVerifier::from_genesis()
    };
    let mut total = 0;
    for file in files {
        let opened = std::fs::File::open(file)
            .with_context(|| format!("cannot open audit log {}", file.display()))?;
        match chain.check(std::io::BufReader::new(opened)) {
            Ok(count) => total += count,
            Err(broken) => {
                eprintln!("pgveil: {}: {broken}", file.display());
                return Err(Reported.into());
            }
        }
    }
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    println!("{}: {total} records, hash chain intact", names.join(", "));
    if let Some((seq, prev_hash)) = chain.started_at() {
        println!("the chain starts at seq {seq} after prev_hash {prev_hash}: match it against the last record of the file before");
    }
    Ok(())
}

fn migrate(mode: pgveil::migrate::Mode, args: MigrateArgs) -> Result<()> {
    use pgveil::migrate::{self, MigrateError, Options, Progress};
    use std::io::Write as _;
    let command = mode.command();
    let config = Config::load(&args.config).map_err(|error| {
        eprintln!("pgveil {command}: {error}");
        anyhow::Error::new(Reported)
    })?;
    let options = Options {
        mode,
        table: args.table,
        database: args.database,
        batch: args.batch,
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut drawn = false;
    let mut draw = |progress: Progress| {
        if !terminal {
            return;
        }
        let seconds = progress.elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            progress.rows as f64 / seconds
        } else {
            0.0
        };
        let percent = progress
            .rows
            .saturating_mul(100)
            .checked_div(progress.estimated_rows)
            .map_or(100, |p| p.min(100));
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "\r{}: {} / ~{} rows ({percent}%), {rate:.0} rows/s    ",
            options.table, progress.rows, progress.estimated_rows
        );
        let _ = stderr.flush();
        drawn = true;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(migrate::run(&config, &options, &mut draw));
    if drawn {
        eprintln!();
    }
    match result {
        Ok(report) => {
            println!("{report}");
            if mode == migrate::Mode::Reencrypt && report.plaintext > 0 {
                eprintln!(
                    "pgveil reencrypt: {}: {} plaintext values were found and not encrypted; run `pgveil encrypt --config {} --table {}` first",
                    report.table,
                    report.plaintext,
                    args.config.display(),
                    report.table
                );
                return Err(Reported.into());
            }
            Ok(())
        }
        Err(MigrateError::Policy(error)) => {
            eprintln!("{error}");
            Err(Reported.into())
        }
        Err(error) => {
            eprintln!("pgveil {command}: {error}");
            Err(Reported.into())
        }
    }
}

/// Exit code 1 with every problem already printed.
struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("policy check failed")
    }
}
impl std::fmt::Debug for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("policy check failed")
    }
}
impl std::error::Error for Reported {}

/// The policy, or every problem printed as `FILE:LINE:COL: message`.
fn load_policy(file: &std::path::Path) -> Result<Policy> {
    Policy::load(file).map_err(|error| {
        eprintln!("{error}");
        anyhow::Error::new(Reported)
    })
}

fn policy_check(
    file: &std::path::Path,
    config: Option<&std::path::Path>,
    database: Option<String>,
) -> Result<()> {
    let policy = load_policy(file)?;
    println!("{}: ok: {}", file.display(), policy.summary());
    let Some(config_path) = config else {
        return Ok(());
    };
    let config = Config::load(config_path)?;
    let login = CatalogLogin::from_config(&config)?;
    let database = database
        .or_else(|| login.database.clone())
        .context("no database to check against: give --database or set catalog.database")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let snapshot = runtime.block_on(async {
        let client = login.connect(&database).await?;
        CatalogSnapshot::load(&client, &database, &policy).await
    })?;
    let problems = snapshot.problems(&policy);
    if problems.is_empty() {
        println!(
            "{}: ok against database {database}: {} protected result columns (views, partitions and inheritance children included)",
            file.display(),
            snapshot.protected_column_count()
        );
        return Ok(());
    }
    for problem in &problems {
        eprintln!(
            "{}:{}:{}: {}",
            file.display(),
            problem.line,
            problem.column,
            problem.message
        );
    }
    Err(Reported.into())
}

fn policy_explain(file: &std::path::Path, role: &str) -> Result<()> {
    let policy = load_policy(file)?;
    let Some(id) = policy.role_by_name(role) else {
        bail!(
            "{}: no role {role:?} (roles: {})",
            file.display(),
            policy
                .roles
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    print!("{}", policy.explain(id));
    Ok(())
}
