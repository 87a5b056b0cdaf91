//! The live protection state every session reads: the current policy together with the
//! catalog snapshot of each database, role memberships, reloads and refreshes.
//!
//! A session asks for the [`Protection`] of its database at each statement; a policy
//! and the catalog it was resolved against are always published together, so a session
//! never applies a new policy to an old catalog. A policy that fails to load or to
//! resolve never replaces the running one. Nothing here touches client traffic.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, info, warn};

use crate::catalog::connect::CatalogLogin;
use crate::catalog::snapshot::CatalogSnapshot;
use crate::catalog::CatalogError;
use crate::config::Config;
use crate::policy::{Policy, PolicyError};
use crate::protect::column_crypto::Ciphers;
use crate::protect::keyring::{Keyring, KeyringError};
use crate::protect::mask::HashKey;
use crate::sql::lineage::{self, StatementLineage, Unparseable};
use crate::sql::plan_cache::PlanCache;

/// How long a login's role memberships are trusted before they are read again.
pub const MEMBERSHIP_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error("{0}")]
    Unusable(String),
}

/// A policy with the catalog of one database, resolved against each other.
#[derive(Debug)]
pub struct Protection {
    pub policy: Arc<Policy>,
    pub catalog: Arc<CatalogSnapshot>,
    pub hash_key: Option<Arc<HashKey>>,
    /// The ciphers of the policy's encrypted columns, for this catalog.
    pub ciphers: Arc<Ciphers>,
    /// Increases with every snapshot published, across databases.
    pub generation: u64,
    /// The database's schema-change count when this catalog was read (see
    /// [`ProtectionHandle::schema_changed`]).
    pub changes_seen: u64,
    /// Lineage analyses of statement texts under this policy and catalog, shared by
    /// the database's sessions.
    pub plans: Mutex<PlanCache<LineageAnalysis>>,
}

/// The lineage of every statement of one text, or why it could not be analysed.
pub type LineageAnalysis = Result<Vec<StatementLineage>, Unparseable>;

impl Protection {
    /// The lineage of `text` under this policy and catalog, from the cache when it was
    /// analysed before.
    pub fn lineage(&self, text: &[u8]) -> Arc<LineageAnalysis> {
        let cached = self
            .plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(text);
        if let Some(analysis) = cached {
            return analysis;
        }
        let analysis = Arc::new(match std::str::from_utf8(text) {
            Ok(sql) => lineage::analyse(
                sql,
                &lineage::Knowledge {
                    relations: self.catalog.lineage_relations(),
                },
            ),
            Err(_) => Err(Unparseable("the statement is not valid UTF-8".into())),
        });
        // A rough size: the vectors of sources dominate.
        let size = match analysis.as_ref() {
            Ok(statements) => statements
                .iter()
                .map(|s| 128 + 48 * (s.outputs.len() + s.filters.len() + s.stored.len()))
                .sum(),
            Err(_) => 64,
        };
        self.plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(text, analysis.clone(), size);
        analysis
    }
}

/// A login's role memberships and when they were read.
type CachedMemberships = (Instant, Arc<HashSet<String>>);

#[derive(Default)]
struct DatabaseSlot {
    current: RwLock<Option<Arc<Protection>>>,
    /// The generation of `current` (0 before the first), readable without the lock:
    /// sessions compare it on every row of results they stream.
    generation: AtomicU64,
    /// One load at a time per database; others wait and reuse its result.
    loading: tokio::sync::Mutex<()>,
    /// Counts the moments the schema may have changed (DDL committed through pgveil).
    /// A catalog read before the latest one is stale.
    changes: AtomicU64,
    /// When the last catalog read failed, so that a broken catalog login is not retried
    /// by every statement of every session.
    failed_at: Mutex<Option<Instant>>,
    /// A task listens for [`SCHEMA_CHANGE_CHANNEL`] notifications of this database.
    watched: std::sync::atomic::AtomicBool,
}

/// The channel pgveil's event trigger (`sql/pgveil-ddl-notify.sql`) notifies after DDL
/// anywhere in a database: around pgveil, in functions, in DO blocks.
pub const SCHEMA_CHANGE_CHANNEL: &str = "pgveil_ddl";

/// Notifications arriving within this interval of one another count as one change.
const NOTIFICATION_COALESCING: Duration = Duration::from_millis(100);

/// How long a lost schema-change listener waits before it connects again.
const RELISTEN_AFTER: Duration = Duration::from_secs(5);

impl DatabaseSlot {
    fn publish(&self, protection: Arc<Protection>) {
        let generation = protection.generation;
        write(&self.current, Some(protection));
        self.generation.store(generation, Ordering::Release);
    }
}

/// How long after a failed catalog read pgveil answers from that failure instead of
/// trying again.
const RETRY_FAILED_LOAD_AFTER: Duration = Duration::from_secs(2);

/// A session's view of its database's published protection.
pub struct ProtectionHandle(Arc<DatabaseSlot>);

impl ProtectionHandle {
    pub fn current(&self) -> Option<Arc<Protection>> {
        read(&self.0.current)
    }

    /// The generation of the protection published now.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// The schema may have changed (DDL was committed): every session of the database
    /// waits for a catalog read after this moment before its next statement.
    pub fn schema_changed(&self) {
        self.0.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// How many schema changes the database has had so far; a catalog whose
    /// `changes_seen` is lower was read before the latest.
    pub fn changes(&self) -> u64 {
        self.0.changes.load(Ordering::Acquire)
    }
}

pub struct Engine {
    login: CatalogLogin,
    policy_path: PathBuf,
    policy: RwLock<Arc<Policy>>,
    hash_key: Option<Arc<HashKey>>,
    keyring: Option<Arc<Keyring>>,
    databases: Mutex<HashMap<String, Arc<DatabaseSlot>>>,
    memberships: Mutex<HashMap<String, CachedMemberships>>,
    membership_epoch: AtomicU64,
    generation: AtomicU64,
    /// Serialises policy reloads.
    reloading: tokio::sync::Mutex<()>,
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read()
        .unwrap_or_else(|poison| poison.into_inner())
        .clone()
}

fn write<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|poison| poison.into_inner()) = value;
}

/// Checks that `policy` can be enforced with `hash_key`, or says why not.
fn enforceable(
    policy: &Policy,
    hash_key: Option<&Arc<HashKey>>,
    keyring: Option<&Arc<Keyring>>,
) -> Result<(), EngineError> {
    if policy.encrypts() && keyring.is_none() {
        return Err(EngineError::Unusable(
            "the policy encrypts columns (`encrypt:`), which needs a keyring: set `keyring` \
             in the config or PGVEIL_KEYRING (`pgveil keys generate` makes one)"
                .into(),
        ));
    }
    if policy.needs_hash_key() && hash_key.is_none() {
        return Err(EngineError::Unusable(
            "the policy uses the `hash` mask, which needs a keyring: set `keyring` in the \
             config or PGVEIL_KEYRING"
                .into(),
        ));
    }
    Ok(())
}

impl Engine {
    /// Loads the policy and keyring named by `config`; catalogs load on first use.
    pub fn new(config: &Config) -> Result<Engine, EngineError> {
        let policy_path = config
            .policy
            .clone()
            .ok_or_else(|| EngineError::Unusable("no policy configured".into()))?;
        let policy = Policy::load(&policy_path)?;
        let keyring = Keyring::from_env_or_file(config.keyring.as_deref())?.map(Arc::new);
        let hash_key = keyring
            .as_deref()
            .and_then(Keyring::mask_hash_key)
            .map(Arc::new);
        enforceable(&policy, hash_key.as_ref(), keyring.as_ref())?;
        let login = CatalogLogin::from_config(config)?;
        Ok(Engine {
            login,
            policy_path,
            policy: RwLock::new(Arc::new(policy)),
            hash_key,
            keyring,
            databases: Mutex::new(HashMap::new()),
            memberships: Mutex::new(HashMap::new()),
            membership_epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    pub fn policy_path(&self) -> &std::path::Path {
        &self.policy_path
    }

    pub fn policy(&self) -> Arc<Policy> {
        read(&self.policy)
    }

    /// Whether sessions can be protected now: with a fixed `catalog.database`, its
    /// catalog has been loaded; otherwise catalogs load per database on first use.
    pub fn readiness(&self) -> Result<(), String> {
        match &self.login.database {
            Some(database) if self.current(database).is_none() => Err(format!(
                "the catalog of database {database} is not loaded yet"
            )),
            _ => Ok(()),
        }
    }

    /// The database pgveil reads the catalog of for a client connected to `database`.
    pub fn catalog_database<'a>(&'a self, database: &'a str) -> &'a str {
        self.login.database.as_deref().unwrap_or(database)
    }

    fn slot(&self, database: &str) -> Arc<DatabaseSlot> {
        let mut databases = self
            .databases
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        databases.entry(database.to_string()).or_default().clone()
    }

    /// Where the protection of `database` is published, for sessions to read at every
    /// statement without looking the database up again.
    pub fn handle(&self, database: &str) -> ProtectionHandle {
        ProtectionHandle(self.slot(self.catalog_database(database)))
    }

    /// The protection currently published for `database`, without waiting.
    pub fn current(&self, database: &str) -> Option<Arc<Protection>> {
        let database = self.catalog_database(database);
        let databases = self
            .databases
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let slot = databases.get(database)?;
        read(&slot.current)
    }

    /// The protection of `database`, loading its catalog on first use.
    pub async fn protection(&self, database: &str) -> Result<Arc<Protection>, EngineError> {
        if let Some(current) = self.current(database) {
            return Ok(current);
        }
        self.refresh(database, 0, 0).await
    }

    /// A protection for `database` built after generation `newer_than` from a catalog
    /// read after at least `changes_needed` schema changes: waits for a refresh already
    /// running, or runs one. Asking only for the changes known when a request arrived
    /// (not for the latest) keeps a stream of schema changes from starving it.
    pub async fn refresh(
        &self,
        database: &str,
        newer_than: u64,
        changes_needed: u64,
    ) -> Result<Arc<Protection>, EngineError> {
        let database = self.catalog_database(database).to_string();
        let slot = self.slot(&database);
        let _loading = slot.loading.lock().await;
        if let Some(current) = read(&slot.current) {
            if current.generation > newer_than && current.changes_seen >= changes_needed {
                return Ok(current);
            }
        }
        let recent_failure = slot
            .failed_at
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .is_some_and(|at| at.elapsed() < RETRY_FAILED_LOAD_AFTER);
        if recent_failure {
            return Err(EngineError::Unusable(format!(
                "the catalog of database {database} could not be read a moment ago; retrying shortly"
            )));
        }
        let policy = self.policy();
        let built = self.build(&database, &slot, policy).await;
        *slot
            .failed_at
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = built.is_err().then(Instant::now);
        let protection = built?;
        slot.publish(protection.clone());
        Ok(protection)
    }

    /// Reads `database`'s catalog for `policy`. Callers hold the slot's `loading` lock,
    /// so what is published last was also read last.
    async fn build(
        &self,
        database: &str,
        slot: &DatabaseSlot,
        policy: Arc<Policy>,
    ) -> Result<Arc<Protection>, EngineError> {
        // Read before the catalog: a change counted after this point makes the result
        // stale, even if the read below already saw it.
        let changes_seen = slot.changes.load(Ordering::Acquire);
        let client = self.login.connect(database).await?;
        let catalog = CatalogSnapshot::load(&client, database, &policy).await?;
        if !catalog.missing.is_empty() {
            let missing = describe_missing(&catalog);
            if self.login.database.is_some() {
                return Err(EngineError::Unusable(format!(
                    "{}: {missing} in database {database}",
                    self.policy_path.display()
                )));
            }
            warn!(%database, "policy names what this database lacks: {missing}");
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        info!(
            %database,
            generation,
            protected_columns = catalog.protected_column_count(),
            "catalog loaded"
        );
        let ciphers = Ciphers::build(&policy, &catalog.column_types, self.keyring.as_deref());
        for (column, reason) in &ciphers.unusable {
            warn!(%database, column = %policy.column_label(*column), %reason, "encrypted column cannot be written");
        }
        Ok(Arc::new(Protection {
            policy,
            catalog: Arc::new(catalog),
            hash_key: self.hash_key.clone(),
            ciphers: Arc::new(ciphers),
            generation,
            changes_seen,
            plans: Mutex::new(PlanCache::default()),
        }))
    }

    /// Loads the catalog of the configured database at start-up, so a policy naming a
    /// table that does not exist stops pgveil before it serves anyone.
    pub async fn check_startup(&self) -> Result<(), EngineError> {
        if let Some(database) = self.login.database.clone() {
            self.refresh(&database, 0, 0).await?;
        }
        Ok(())
    }

    /// Rebuilds every loaded database's catalog (after DDL elsewhere, on a timer).
    pub async fn refresh_all(&self) {
        for (database, _) in self.slots() {
            let newest = self.generation.load(Ordering::Acquire);
            if let Err(error) = self.refresh(&database, newest, 0).await {
                warn!(%database, %error, "catalog refresh failed; keeping the previous catalog");
            }
        }
    }

    /// Every database with a slot, and the slot, taken out of the map's lock.
    fn slots(&self) -> Vec<(String, Arc<DatabaseSlot>)> {
        self.databases
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .iter()
            .map(|(name, slot)| (name.clone(), slot.clone()))
            .collect()
    }

    /// Starts a schema-change listener for every database with a catalog that has none
    /// yet. Called periodically from the runtime that should run the listeners.
    pub fn watch_schema_changes(self: &Arc<Self>) {
        let slots = self.slots();
        for (database, slot) in slots {
            if read(&slot.current).is_none() || slot.watched.swap(true, Ordering::AcqRel) {
                continue;
            }
            let engine = self.clone();
            tokio::spawn(async move { engine.listen_for_schema_changes(database, slot).await });
        }
    }

    /// Counts a schema change for every notification from pgveil's event trigger.
    /// Without the trigger installed nothing arrives, and DDL made around pgveil is
    /// noticed by the periodic refresh instead.
    async fn listen_for_schema_changes(&self, database: String, slot: Arc<DatabaseSlot>) {
        let handle = ProtectionHandle(slot);
        loop {
            match self.login.listen(&database, SCHEMA_CHANGE_CHANNEL).await {
                Ok((client, mut notifications)) => {
                    let trigger = client
                        .query_opt(
                            "SELECT 1 FROM pg_catalog.pg_event_trigger \
                              WHERE evtname = 'pgveil_ddl_notify' AND evtenabled <> 'D'",
                            &[],
                        )
                        .await;
                    match trigger {
                        Ok(Some(_)) => {
                            info!(%database, "listening for schema changes from the pgveil_ddl_notify event trigger")
                        }
                        _ => info!(
                            %database,
                            "no pgveil_ddl_notify event trigger: DDL made around pgveil is noticed by the periodic catalog refresh (install sql/pgveil-ddl-notify.sql to notice it at once)"
                        ),
                    }
                    // Changes made while nobody listened are not known: count one.
                    handle.schema_changed();
                    while notifications.recv().await.is_some() {
                        debug!(%database, "schema change notified");
                        handle.schema_changed();
                        // Any login may NOTIFY this channel: a burst, or a flood, counts
                        // as at most one more change per interval, so it cannot force
                        // more catalog reads than that.
                        tokio::time::sleep(NOTIFICATION_COALESCING).await;
                        let mut more = false;
                        while notifications.try_recv().is_ok() {
                            more = true;
                        }
                        if more {
                            handle.schema_changed();
                        }
                    }
                    warn!(%database, "schema-change listener lost its connection; reconnecting");
                    drop(client);
                }
                Err(error) => {
                    warn!(%database, %error, "cannot listen for schema changes; retrying")
                }
            }
            tokio::time::sleep(RELISTEN_AFTER).await;
        }
    }

    /// Reads the policy file again and, when it is valid and resolves against every
    /// loaded catalog, makes it the running policy. Otherwise the running policy stays.
    pub async fn reload_policy(&self) -> Result<(), EngineError> {
        let _reloading = self.reloading.lock().await;
        let policy = Arc::new(Policy::load(&self.policy_path)?);
        enforceable(&policy, self.hash_key.as_ref(), self.keyring.as_ref())?;
        let slots = self.slots();
        // Each database's loading lock is held from its read to the publication of
        // all of them, so no refresh can publish a fresher catalog in between that
        // this reload would then overwrite.
        let mut built = Vec::new();
        for (database, slot) in &slots {
            let loading = slot.loading.lock().await;
            let protection = self.build(database, slot, policy.clone()).await?;
            built.push((slot, protection, loading));
        }
        write(&self.policy, policy);
        for (slot, protection, _loading) in built {
            slot.publish(protection);
        }
        info!(policy = %self.policy_path.display(), "policy reloaded");
        Ok(())
    }

    /// The PostgreSQL roles `user` is a member of (itself included), cached for
    /// [`MEMBERSHIP_TTL`].
    pub async fn memberships(
        &self,
        database: &str,
        user: &str,
    ) -> Result<Arc<HashSet<String>>, EngineError> {
        {
            let cache = self
                .memberships
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if let Some((read_at, roles)) = cache.get(user) {
                if read_at.elapsed() < MEMBERSHIP_TTL {
                    return Ok(roles.clone());
                }
            }
        }
        let database = self.catalog_database(database).to_string();
        let client = self.login.connect(&database).await?;
        let rows = client
            .query(
                "SELECT rolname::text FROM pg_catalog.pg_roles \
                  WHERE pg_catalog.pg_has_role($1::text::name, oid, 'MEMBER')",
                &[&user],
            )
            .await
            .map_err(|error| CatalogError::Query {
                what: "role memberships",
                reason: error.to_string(),
            })?;
        let roles: Arc<HashSet<String>> = Arc::new(rows.iter().map(|row| row.get(0)).collect());
        let mut cache = self
            .memberships
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        cache.insert(user.to_string(), (Instant::now(), roles.clone()));
        Ok(roles)
    }

    /// Forgets cached memberships (after GRANT/REVOKE or role DDL passed through);
    /// sessions read theirs again before their next statement.
    pub fn forget_memberships(&self) {
        self.memberships
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clear();
        self.membership_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts [`Engine::forget_memberships`] calls.
    pub fn membership_epoch(&self) -> u64 {
        self.membership_epoch.load(Ordering::Acquire)
    }
}

fn describe_missing(catalog: &CatalogSnapshot) -> String {
    catalog
        .missing
        .iter()
        .map(|missing| {
            if missing.missing_columns.is_empty() {
                format!("table {} does not exist", missing.table)
            } else {
                format!(
                    "table {} has no column {}",
                    missing.table,
                    missing.missing_columns.join(", ")
                )
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}
