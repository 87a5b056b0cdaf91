//! One database's catalog as the policy needs it: which (table OID, attribute number)
//! pairs are protected columns, which view columns are derived from them, which
//! relations exist at all, and which protected columns rules may return.
//!
//! A policy table's protection extends to every table that inherits from it or is a
//! partition of it, at any depth, column by column by name (a child's attribute numbers
//! differ from its parent's). A snapshot is built for one policy and never changes; a
//! refresh builds a new one. Loading only reads system catalogs with the `catalog`
//! login. A column whose origin cannot be worked out precisely is attributed to every
//! protected column it might come from, never to none, and one view pgveil cannot
//! analyse must never stop the whole catalog from loading.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tokio_postgres::types::FromSql;
use tokio_postgres::{Client, Row};
use tracing::warn;

use super::lineage::{view_lineage, ColumnLineage, ColumnRef};
use super::rules;
use super::CatalogError;
use crate::policy::file::EncryptMode;
use crate::policy::{ColumnId, Diagnostic, Policy};
use crate::sql::encryption::{is_utf8_encoding, Content, EncryptedRelation, RelationColumn};
use crate::sql::lineage::{ProtectedRelation, RelationColumn as LineageColumn};
use crate::sqltext::{NameSet, NameSetPair, CURSOR_WORDS};
use rustc_hash::{FxHashMap, FxHashSet};

/// Where a result column's values come from, as far as the policy is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnSource {
    /// A protected column itself (in its policy table or in a partition or inheritance
    /// child of it), or a view column that copies it unchanged.
    Protected(ColumnId),
    /// A view column computed from these protected columns (sorted, no duplicates).
    Derived(Vec<ColumnId>),
}

/// A policy table the database does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingTable {
    pub table: String,
    pub missing_columns: Vec<String>,
}

#[derive(Debug, Default)]
pub struct CatalogSnapshot {
    pub database: String,
    columns: FxHashMap<(u32, i16), ColumnSource>,
    /// Every relation a RowDescription can name that existed when the snapshot was
    /// taken.
    known_relations: FxHashSet<u32>,
    /// The views and materialized views among them: what they return can be redefined
    /// under the same OID.
    views: FxHashSet<u32>,
    /// Protected columns that rules returning rows read (sorted, no duplicates).
    rule_sources: Vec<ColumnId>,
    /// Names (`relname`, as the catalog spells them) of the relations with protected
    /// columns: policy tables, their partitions and children, views showing them;
    /// paired with the [`CURSOR_WORDS`], which the read guard looks for in the same pass.
    protected_names: NameSetPair,
    /// Relations with encrypted columns (tables, partitions, children, views showing
    /// them) by `relname`, for the analysis of statements.
    encrypted_relations: HashMap<String, Vec<Arc<EncryptedRelation>>>,
    encrypted_names: NameSet,
    /// Relations with protected columns by `relname`, for the lineage analysis.
    lineage_relations: HashMap<String, Vec<Arc<ProtectedRelation>>>,
    /// Protected tables or columns the database lacks.
    pub missing: Vec<MissingTable>,
    /// Column types of protected columns: `format_type` text, for `policy check`.
    pub column_types: HashMap<ColumnId, String>,
}

/// What the catalog says about one result column.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Protected(&'a ColumnSource),
    /// A column of a relation that holds nothing protected.
    Unprotected,
    /// A relation created after the snapshot (or in a transaction not committed yet).
    UnknownRelation,
}

/// Relation kinds (`pg_class.relkind`) whose OID a RowDescription can carry: what a
/// query can read from (`FROM` or `RETURNING`): tables, partitioned tables, views,
/// materialized views, foreign tables and sequences. Indexes, partitioned indexes and
/// composite types cannot be read from. TOAST tables can (by superusers only) but are
/// left out on purpose: their chunks hold protected values raw, so a result from one
/// stays unknown and is refused to roles that may not see everything.
const READABLE_RELKINDS: &str = "('r', 'p', 'v', 'm', 'f', 'S')";

impl CatalogSnapshot {
    pub fn lookup(&self, table_oid: u32, attnum: i16) -> Lookup<'_> {
        if table_oid == 0 {
            return Lookup::Unprotected;
        }
        match self.columns.get(&(table_oid, attnum)) {
            Some(source) => Lookup::Protected(source),
            None if self.known_relations.contains(&table_oid) => Lookup::Unprotected,
            None => Lookup::UnknownRelation,
        }
    }

    /// Whether `oid` was a view or materialized view when the snapshot was taken.
    pub fn is_view(&self, oid: u32) -> bool {
        self.views.contains(&oid)
    }

    /// Protected columns whose values a rule may return, sorted and without duplicates.
    ///
    /// A rule other than a view's `_RETURN` rule whose action is a `SELECT` or has a
    /// `RETURNING` list (`CREATE RULE r AS ON INSERT TO t DO INSTEAD SELECT id_card FROM
    /// customers`) answers an ordinary `INSERT`/`UPDATE`/`DELETE` with rows whose
    /// RowDescription says table OID 0 and attribute number 0, which [`Self::lookup`]
    /// reports as unprotected. Any result column with table OID 0 may therefore carry
    /// the values of these columns: every protected column of every protected relation
    /// (policy tables, their partitions and inheritance children) such a rule reads,
    /// directly or through views. Empty when no such rule exists.
    pub fn reading_rule_sources(&self) -> &[ColumnId] {
        &self.rule_sources
    }

    /// Whether statement text, sent by a client whose `client_encoding` is `encoding`,
    /// may name a relation with protected columns (by name only: a lexical test that
    /// may say yes for a same-named relation in another schema, and says yes for
    /// every text when the names cannot be recognised in that encoding: see
    /// `names_hidden_in`).
    pub fn names_protected_relation(&self, sql: &[u8], encoding: &str) -> bool {
        let names = self.protected_names.first();
        names_hidden_in(names, encoding) || crate::sqltext::names_any(sql, names)
    }

    /// [`Self::names_protected_relation`] and whether the text also holds one of the
    /// [`CURSOR_WORDS`], in one lexical pass.
    pub fn names_protected_relation_or_cursor_word(
        &self,
        sql: &[u8],
        encoding: &str,
    ) -> (bool, bool) {
        let (names_protected, names_word) = self.protected_names.names_either(sql);
        (
            names_protected || names_hidden_in(self.protected_names.first(), encoding),
            names_word,
        )
    }

    /// Whether statement text names a relation with encrypted columns (lexically, like
    /// [`Self::names_protected_relation`]).
    pub fn names_encrypted_relation(&self, sql: &[u8], encoding: &str) -> bool {
        names_hidden_in(&self.encrypted_names, encoding)
            || crate::sqltext::names_any(sql, &self.encrypted_names)
    }

    pub fn encrypted_relations(&self) -> &HashMap<String, Vec<Arc<EncryptedRelation>>> {
        &self.encrypted_relations
    }

    /// Relations with protected columns by `relname` (every live column, in order).
    pub fn lineage_relations(&self) -> &HashMap<String, Vec<Arc<ProtectedRelation>>> {
        &self.lineage_relations
    }

    /// Number of result columns (base, partition, child and view) that carry protected
    /// data.
    pub fn protected_column_count(&self) -> usize {
        self.columns.len()
    }

    /// Reads the catalog of the connected database for `policy`.
    pub async fn load(
        client: &Client,
        database: &str,
        policy: &Policy,
    ) -> Result<CatalogSnapshot, CatalogError> {
        let query_failed = |what: &'static str| {
            move |error: tokio_postgres::Error| CatalogError::Query {
                what,
                reason: error.to_string(),
            }
        };
        let schemas: Vec<&str> = policy.tables.iter().map(|t| t.schema.as_str()).collect();
        let names: Vec<&str> = policy.tables.iter().map(|t| t.name.as_str()).collect();
        let rows = client
            .query(
                "SELECT p.ord::int4, c.oid, a.attnum, a.attname::text, \
                        format_type(a.atttypid, a.atttypmod) \
                   FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS p(nsp, rel, ord) \
                   JOIN pg_catalog.pg_namespace n ON n.nspname = p.nsp \
                   JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = p.rel \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                  WHERE a.attnum > 0 AND NOT a.attisdropped",
                &[&schemas, &names],
            )
            .await
            .map_err(query_failed("protected columns"))?;
        let mut snapshot = CatalogSnapshot {
            database: database.to_string(),
            ..CatalogSnapshot::default()
        };
        // Per protected table: its OID and every column's attnum by name.
        let mut table_oids: Vec<Option<u32>> = vec![None; policy.tables.len()];
        let mut attributes: HashMap<u32, Vec<(i16, String, String)>> = HashMap::new();
        for row in &rows {
            let ordinal: i32 = get(row, 0, "protected columns")?;
            let oid: u32 = get(row, 1, "protected columns")?;
            let Some(slot) = usize::try_from(ordinal - 1)
                .ok()
                .and_then(|i| table_oids.get_mut(i))
            else {
                continue;
            };
            *slot = Some(oid);
            attributes.entry(oid).or_default().push((
                get(row, 2, "protected columns")?,
                get(row, 3, "protected columns")?,
                get(row, 4, "protected columns")?,
            ));
        }
        // Per policy table found: (attnum, name, column) of each protected column.
        let mut explicit: HashMap<u32, Vec<(i16, String, ColumnId)>> = HashMap::new();
        for (index, table) in policy.tables.iter().enumerate() {
            let Some(oid) = table_oids[index] else {
                snapshot.missing.push(MissingTable {
                    table: table.qualified(),
                    missing_columns: Vec::new(),
                });
                continue;
            };
            let columns = attributes.get(&oid).map(Vec::as_slice).unwrap_or(&[]);
            let mut missing_columns = Vec::new();
            for &column in &table.columns {
                let name = &policy.columns[column].name;
                match columns.iter().find(|(_, attname, _)| attname == name) {
                    Some((attnum, _, type_name)) => {
                        snapshot.column_types.insert(column, type_name.clone());
                        explicit
                            .entry(oid)
                            .or_default()
                            .push((*attnum, name.clone(), column));
                    }
                    None => missing_columns.push(name.clone()),
                }
            }
            if !missing_columns.is_empty() {
                snapshot.missing.push(MissingTable {
                    table: table.qualified(),
                    missing_columns,
                });
            }
        }

        let relations = client
            .query(
                &format!(
                    "SELECT oid, relkind IN ('v', 'm'), relname::text FROM pg_catalog.pg_class \
                      WHERE relkind IN {READABLE_RELKINDS}"
                ),
                &[],
            )
            .await
            .map_err(query_failed("relations"))?;
        let mut relation_names: HashMap<u32, String> = HashMap::with_capacity(relations.len());
        for row in &relations {
            let oid = get::<u32>(row, 0, "relations")?;
            relation_names.insert(oid, get(row, 2, "relations")?);
            snapshot.known_relations.insert(oid);
            if get::<bool>(row, 1, "relations")? {
                snapshot.views.insert(oid);
            }
        }

        if explicit.is_empty() {
            return Ok(snapshot);
        }
        let policy_oids: Vec<u32> = explicit.keys().copied().collect();
        // Every partition and inheritance child, at any depth, of a policy table, with
        // the policy tables it descends from and its live columns.
        let rows = client
            .query(
                "WITH RECURSIVE tree(ancestor, relid) AS ( \
                    SELECT i.inhparent, i.inhrelid FROM pg_catalog.pg_inherits i \
                     WHERE i.inhparent = ANY($1::oid[]) \
                    UNION \
                    SELECT t.ancestor, i.inhrelid FROM tree t \
                      JOIN pg_catalog.pg_inherits i ON i.inhparent = t.relid) \
                 SELECT t.relid, t.ancestors, a.attnum, a.attname::text \
                   FROM (SELECT relid, array_agg(ancestor) AS ancestors \
                           FROM tree GROUP BY relid) t \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = t.relid \
                  WHERE a.attnum > 0 AND NOT a.attisdropped",
                &[&policy_oids],
            )
            .await
            .map_err(query_failed("partitions and inheritance children"))?;
        let mut descendants: HashMap<u32, Descendant> = HashMap::new();
        for row in &rows {
            let what = "partitions and inheritance children";
            let oid: u32 = get(row, 0, what)?;
            let descendant = match descendants.entry(oid) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => entry.insert(Descendant {
                    ancestors: get(row, 1, what)?,
                    columns: Vec::new(),
                }),
            };
            descendant
                .columns
                .push((get(row, 2, what)?, get(row, 3, what)?));
        }
        let base = protected_relations(&explicit, &descendants);
        for (&oid, columns) in &base {
            for (&attnum, source) in columns {
                snapshot.columns.insert((oid, attnum), source.clone());
            }
        }

        // Views and materialized views that read, directly or through other views, a
        // relation with protected columns; each with the protected relations it reads.
        // Only `_RETURN` rules make a relation's rows; other rules are looked at below.
        let protected_oids: Vec<u32> = base.keys().copied().collect();
        let rows = client
            .query(
                "WITH RECURSIVE dependent(oid, base) AS ( \
                    SELECT r.ev_class, d.refobjid FROM pg_catalog.pg_depend d \
                      JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
                       AND r.rulename = '_RETURN' \
                     WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass \
                       AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                       AND d.refobjid = ANY($1::oid[]) AND r.ev_class <> d.refobjid \
                    UNION \
                    SELECT r.ev_class, v.base FROM dependent v \
                      JOIN pg_catalog.pg_depend d ON d.refobjid = v.oid \
                       AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                       AND d.classid = 'pg_catalog.pg_rewrite'::regclass \
                      JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
                       AND r.rulename = '_RETURN' AND r.ev_class <> v.oid) \
                 SELECT r.ev_class, r.ev_action::text, v.bases \
                   FROM (SELECT oid, array_agg(DISTINCT base) AS bases \
                           FROM dependent GROUP BY oid) v \
                   JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.oid \
                  WHERE r.rulename = '_RETURN'",
                &[&protected_oids],
            )
            .await
            .map_err(query_failed("views"))?;
        let mut lineages: HashMap<u32, Vec<(i16, ColumnLineage)>> = HashMap::new();
        // Views whose lineage cannot be computed: every column of one is computed from
        // every protected column of every protected relation it reads.
        let mut unanalysable: HashMap<u32, ColumnSource> = HashMap::new();
        // The protected relations each view reads, for rules that read the view.
        let mut view_bases: HashMap<u32, Vec<u32>> = HashMap::new();
        for row in &rows {
            let oid: u32 = get(row, 0, "views")?;
            let text: String = get(row, 1, "views")?;
            let bases: Vec<u32> = get(row, 2, "views")?;
            match view_lineage(&text) {
                Ok(lineage) => {
                    lineages.insert(oid, lineage);
                }
                Err(error) => {
                    warn!(
                        view = oid,
                        reason = %error,
                        "cannot analyse a view's definition; every column of it counts as computed from every protected column it reads"
                    );
                    let sources = derived(bases.iter().flat_map(|b| relation_ids(&base, *b)))
                        .unwrap_or_else(|| everything(&base));
                    unanalysable.insert(oid, sources);
                }
            }
            view_bases.insert(oid, bases);
        }
        if !unanalysable.is_empty() {
            let oids: Vec<u32> = unanalysable.keys().copied().collect();
            let rows = client
                .query(
                    "SELECT attrelid, attnum FROM pg_catalog.pg_attribute \
                      WHERE attrelid = ANY($1::oid[]) AND attnum > 0 AND NOT attisdropped",
                    &[&oids],
                )
                .await
                .map_err(query_failed("columns of views"))?;
            for row in &rows {
                let oid: u32 = get(row, 0, "columns of views")?;
                let attnum: i16 = get(row, 1, "columns of views")?;
                if let Some(source) = unanalysable.get(&oid) {
                    snapshot.columns.insert((oid, attnum), source.clone());
                }
            }
        }
        let mut resolver = ViewResolver {
            base: &base,
            unanalysable: &unanalysable,
            lineages: &lineages,
            resolved: HashMap::new(),
        };
        for (&view, columns) in &lineages {
            for (attnum, _) in columns {
                if let Some(source) = resolver.column(view, *attnum, 0) {
                    snapshot.columns.insert((view, *attnum), source);
                }
            }
        }

        // Rules other than `_RETURN` that read a protected relation or a view of one. A
        // rule's dependency on its own relation counts too: its action can read the
        // relation's rows as OLD.
        let mut read: Vec<u32> = protected_oids;
        read.extend(view_bases.keys().copied());
        let rows = client
            .query(
                "SELECT r.ev_action::text, d.refs \
                   FROM (SELECT objid, array_agg(DISTINCT refobjid) AS refs \
                           FROM pg_catalog.pg_depend \
                          WHERE classid = 'pg_catalog.pg_rewrite'::regclass \
                            AND refclassid = 'pg_catalog.pg_class'::regclass \
                            AND refobjid = ANY($1::oid[]) \
                          GROUP BY objid) d \
                   JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
                  WHERE r.rulename <> '_RETURN'",
                &[&read],
            )
            .await
            .map_err(query_failed("rules"))?;
        let mut rule_sources = BTreeSet::new();
        for row in &rows {
            let text: String = get(row, 0, "rules")?;
            let refs: Vec<u32> = get(row, 1, "rules")?;
            if rules::may_return_rows(&text) {
                rule_sources.extend(read_by_rule(&refs, &base, &view_bases));
            }
        }
        snapshot.rule_sources = rule_sources.into_iter().collect();
        snapshot.protected_names = NameSetPair::new(
            snapshot
                .columns
                .keys()
                .filter_map(|(oid, _)| relation_names.get(oid).cloned())
                .collect(),
            CURSOR_WORDS.into_iter().collect(),
        );
        load_relations(client, &mut snapshot, policy).await?;
        snapshot.encrypted_names = snapshot.encrypted_relations.keys().cloned().collect();
        Ok(snapshot)
    }
}

/// Whether a client whose `client_encoding` is `encoding` may write one of `names` in
/// bytes the name tests do not recognise: names are compared in UTF-8, as the catalog
/// login reads them, and a client in another encoding (SQL_ASCII included) writes a
/// non-ASCII name in other bytes. Its statements must then be analysed whatever names
/// they seem to hold. (ASCII names first: most sets are, and the test is then free.)
fn names_hidden_in(names: &NameSet, encoding: &str) -> bool {
    !names.is_ascii() && !is_utf8_encoding(encoding)
}

/// What a column of a relation holds, given the sources of its protected columns.
fn encryption_content(policy: &Policy, source: Option<&ColumnSource>) -> Content {
    let encrypted = |id: &ColumnId| {
        policy
            .columns
            .get(*id)
            .is_some_and(|c| c.encrypt != EncryptMode::None)
    };
    match source {
        Some(ColumnSource::Protected(id)) if encrypted(id) => Content::Encrypted(*id),
        Some(ColumnSource::Derived(ids)) => match ids.iter().find(|id| encrypted(id)) {
            Some(id) => Content::ComputedFromEncrypted(*id),
            None => Content::Plain,
        },
        _ => Content::Plain,
    }
}

/// Every relation with protected columns (policy tables, partitions, children, views
/// showing them), with all its live columns in order: for the lineage analysis of
/// statements, and (those holding or computed from an encrypted column) for the
/// encryption analysis.
async fn load_relations(
    client: &Client,
    snapshot: &mut CatalogSnapshot,
    policy: &Policy,
) -> Result<(), CatalogError> {
    let oids: BTreeSet<u32> = snapshot.columns.keys().map(|(oid, _)| *oid).collect();
    if oids.is_empty() {
        return Ok(());
    }
    let oids: Vec<u32> = oids.into_iter().collect();
    let what = "columns of relations with protected columns";
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind IN ('v', 'm'), \
                    a.attnum, a.attname::text, a.atthasdef, a.attgenerated <> '' \
               FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
              WHERE c.oid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped \
              ORDER BY c.oid, a.attnum",
            &[&oids],
        )
        .await
        .map_err(|error| CatalogError::Query {
            what,
            reason: error.to_string(),
        })?;
    // (oid, relation for the encryption analysis, relation for the lineage analysis)
    let mut current: Option<(u32, EncryptedRelation, ProtectedRelation)> = None;
    let mut done = Vec::new();
    for row in &rows {
        let oid: u32 = get(row, 0, what)?;
        if current.as_ref().is_none_or(|(o, _, _)| *o != oid) {
            done.extend(current.take());
            let schema: String = get(row, 1, what)?;
            let name: String = get(row, 2, what)?;
            let is_view: bool = get(row, 3, what)?;
            current = Some((
                oid,
                EncryptedRelation {
                    schema: schema.clone(),
                    name: name.clone(),
                    is_view,
                    columns: Vec::new(),
                },
                ProtectedRelation {
                    schema,
                    name,
                    is_view,
                    columns: Vec::new(),
                },
            ));
        }
        let attnum: i16 = get(row, 4, what)?;
        let source = snapshot.columns.get(&(oid, attnum));
        if let Some((_, encrypted, protected)) = current.as_mut() {
            let name: String = get(row, 5, what)?;
            let generated: bool = get(row, 7, what)?;
            encrypted.columns.push(RelationColumn {
                name: name.clone(),
                content: encryption_content(policy, source),
                has_default: get(row, 6, what)?,
                generated,
            });
            protected.columns.push(LineageColumn {
                name,
                sources: match source {
                    Some(ColumnSource::Protected(id)) => [*id].into_iter().collect(),
                    Some(ColumnSource::Derived(ids)) => ids.iter().copied().collect(),
                    None => Default::default(),
                },
                generated,
            });
        }
    }
    done.extend(current);
    for (_, encrypted, protected) in done {
        if encrypted
            .columns
            .iter()
            .any(|column| column.content != Content::Plain)
        {
            snapshot
                .encrypted_relations
                .entry(encrypted.name.clone())
                .or_default()
                .push(Arc::new(encrypted));
        }
        snapshot
            .lineage_relations
            .entry(protected.name.clone())
            .or_default()
            .push(Arc::new(protected));
    }
    Ok(())
}

/// Column `index` of a catalog row, or an error naming the query.
fn get<'a, T: FromSql<'a>>(
    row: &'a Row,
    index: usize,
    what: &'static str,
) -> Result<T, CatalogError> {
    row.try_get(index).map_err(|error| CatalogError::Query {
        what,
        reason: error.to_string(),
    })
}

/// A partition or inheritance child (at any depth) of at least one policy table.
#[derive(Debug, Default)]
struct Descendant {
    /// The policy tables it descends from.
    ancestors: Vec<u32>,
    /// Its live columns: attribute number and name.
    columns: Vec<(i16, String)>,
}

/// Relations holding protected data, each with the source of every protected attribute.
type BaseColumns = HashMap<u32, BTreeMap<i16, ColumnSource>>;

/// The protected attributes of policy tables (`explicit`: OID → attnum, name, column)
/// and of their descendants.
///
/// A descendant's column takes the protection of the columns of the same name in the
/// policy tables it descends from. When several apply, the most specific wins: the
/// descendant's own policy entry, else the nearest policy table (one that descends from
/// another overrides it). Policy tables neither of which descends from the other (a
/// child of two protected parents) both count: the column is derived from both, which
/// is the stricter reading.
fn protected_relations(
    explicit: &HashMap<u32, Vec<(i16, String, ColumnId)>>,
    descendants: &HashMap<u32, Descendant>,
) -> BaseColumns {
    let mut base: BaseColumns = explicit
        .iter()
        .filter(|(_, columns)| !columns.is_empty())
        .map(|(&oid, columns)| {
            let sources = columns
                .iter()
                .map(|(attnum, _, id)| (*attnum, ColumnSource::Protected(*id)))
                .collect();
            (oid, sources)
        })
        .collect();
    let descends_from = |table: u32, ancestor: u32| {
        descendants
            .get(&table)
            .is_some_and(|d| d.ancestors.contains(&ancestor))
    };
    for (&oid, descendant) in descendants {
        let own = explicit.get(&oid).map(Vec::as_slice).unwrap_or(&[]);
        for (attnum, name) in &descendant.columns {
            if own.iter().any(|(_, own_name, _)| own_name == name) {
                continue;
            }
            let candidates: Vec<(u32, ColumnId)> = descendant
                .ancestors
                .iter()
                .filter_map(|ancestor| {
                    let columns = explicit.get(ancestor)?;
                    let (_, _, id) = columns.iter().find(|(_, n, _)| n == name)?;
                    Some((*ancestor, *id))
                })
                .collect();
            let nearest = candidates.iter().filter(|(ancestor, _)| {
                !candidates
                    .iter()
                    .any(|(other, _)| other != ancestor && descends_from(*other, *ancestor))
            });
            let ids: BTreeSet<ColumnId> = nearest.map(|(_, id)| *id).collect();
            let source = match ids.len() {
                0 => continue,
                1 => ids.into_iter().next().map(ColumnSource::Protected),
                _ => Some(ColumnSource::Derived(ids.into_iter().collect())),
            };
            if let Some(source) = source {
                base.entry(oid).or_default().insert(*attnum, source);
            }
        }
    }
    base
}

/// Every protected column of `relation` (empty when it holds none).
fn relation_ids(base: &BaseColumns, relation: u32) -> Vec<ColumnId> {
    base.get(&relation)
        .map(|columns| columns.values().flat_map(source_ids).collect())
        .unwrap_or_default()
}

/// Every protected column of every protected relation.
fn everything(base: &BaseColumns) -> ColumnSource {
    let ids: BTreeSet<ColumnId> = base
        .values()
        .flat_map(|columns| columns.values().flat_map(source_ids))
        .collect();
    ColumnSource::Derived(ids.into_iter().collect())
}

/// The protected columns a rule that depends on relations `refs` may read: all those of
/// each protected relation among them, and of every protected relation each view among
/// them reads.
fn read_by_rule(
    refs: &[u32],
    base: &BaseColumns,
    view_bases: &HashMap<u32, Vec<u32>>,
) -> BTreeSet<ColumnId> {
    let mut ids = BTreeSet::new();
    for &relation in refs {
        ids.extend(relation_ids(base, relation));
        for &read in view_bases.get(&relation).map(Vec::as_slice).unwrap_or(&[]) {
            ids.extend(relation_ids(base, read));
        }
    }
    ids
}

impl CatalogSnapshot {
    /// What `policy check --config` reports against this database: tables and columns
    /// that do not exist, and column types that do not fit the policy.
    pub fn problems(&self, policy: &Policy) -> Vec<Diagnostic> {
        let mut problems = Vec::new();
        let at = |(line, column): (u64, u64), message: String| Diagnostic {
            line,
            column,
            message,
        };
        for missing in &self.missing {
            let Some(table) = policy
                .tables
                .iter()
                .find(|t| t.qualified() == missing.table)
            else {
                continue;
            };
            if missing.missing_columns.is_empty() {
                problems.push(at(
                    table.location,
                    format!(
                        "table {} does not exist in database {}",
                        missing.table, self.database
                    ),
                ));
            }
            for name in &missing.missing_columns {
                if let Some(&id) = table
                    .columns
                    .iter()
                    .find(|&&id| policy.columns[id].name == *name)
                {
                    problems.push(at(
                        policy.columns[id].location,
                        format!(
                            "column {}.{name} does not exist in database {}",
                            missing.table, self.database
                        ),
                    ));
                }
            }
        }
        for (id, column) in policy.columns.iter().enumerate() {
            let Some(stored) = self.column_types.get(&id) else {
                continue;
            };
            let label = policy.column_label(id);
            if column.encrypt != EncryptMode::None {
                let holds_ciphertext =
                    stored == "text" || stored == "bytea" || stored == "character varying";
                if !holds_ciphertext {
                    problems.push(at(
                        column.location,
                        format!("{label} is {stored}, which cannot hold ciphertext: use text or bytea (`pgveil encrypt` widens it)"),
                    ));
                }
            } else if let Some(logical) = &column.logical_type {
                if !logical_type_matches(logical, stored) {
                    problems.push(at(
                        column.location,
                        format!("{label} is {stored} in the database but `type: {logical}` in the policy"),
                    ));
                }
            }
        }
        problems
    }
}

/// Whether a policy `type:` names the type `format_type` printed.
pub fn logical_type_matches(logical: &str, stored: &str) -> bool {
    // `format_type` puts modifiers in parentheses: `character varying(20)`,
    // `timestamp(3) without time zone`, `numeric(12,2)`.
    let mut base = String::with_capacity(stored.len());
    let mut depth = 0usize;
    for c in stored.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => base.push(c),
            _ => {}
        }
    }
    let base = base.trim();
    let expected = match logical {
        "int2" => "smallint",
        "int4" => "integer",
        "int8" => "bigint",
        "numeric" => "numeric",
        "float8" => "double precision",
        "bool" => "boolean",
        "date" => "date",
        "timestamp" => "timestamp without time zone",
        "timestamptz" => "timestamp with time zone",
        "text" => "text",
        "varchar" => "character varying",
        _ => return false,
    };
    base == expected
}

/// Views on views are at most this deep (PostgreSQL has no limit, but a chain this
/// long is a mistake or an attack, and resolution refuses it).
const MAX_VIEW_DEPTH: usize = 64;

struct ViewResolver<'a> {
    base: &'a BaseColumns,
    unanalysable: &'a HashMap<u32, ColumnSource>,
    lineages: &'a HashMap<u32, Vec<(i16, ColumnLineage)>>,
    resolved: HashMap<(u32, i16), Option<ColumnSource>>,
}

impl ViewResolver<'_> {
    /// The protected source of `relation.attnum` (attnum 0: every column), or `None`
    /// when nothing protected flows into it.
    fn column(&mut self, relation: u32, attnum: i16, depth: usize) -> Option<ColumnSource> {
        if let Some(done) = self.resolved.get(&(relation, attnum)) {
            return done.clone();
        }
        let source = if let Some(columns) = self.base.get(&relation) {
            if attnum == 0 {
                derived(columns.values().flat_map(source_ids))
            } else {
                columns.get(&attnum).cloned()
            }
        } else if let Some(source) = self.unanalysable.get(&relation) {
            // Whatever column of it is read, it may carry any of these.
            Some(source.clone())
        } else if let Some(columns) = self.lineages.get(&relation) {
            if depth > MAX_VIEW_DEPTH {
                warn!(
                    view = relation,
                    "views nested too deeply; treating as derived from every protected column"
                );
                Some(everything(self.base))
            } else if attnum == 0 {
                let attnums: Vec<i16> = columns.iter().map(|(a, _)| *a).collect();
                let mut all = BTreeSet::new();
                for a in attnums {
                    if let Some(source) = self.column(relation, a, depth + 1) {
                        all.extend(source_ids(&source));
                    }
                }
                derived(all)
            } else {
                match columns
                    .iter()
                    .find(|(a, _)| *a == attnum)
                    .map(|(_, l)| l.clone())
                {
                    None => None,
                    Some(ColumnLineage::Copy(ColumnRef { relation, attnum })) => {
                        self.column(relation, attnum, depth + 1)
                    }
                    Some(ColumnLineage::Computed(sources)) => {
                        let mut all = BTreeSet::new();
                        for ColumnRef { relation, attnum } in sources {
                            if let Some(source) = self.column(relation, attnum, depth + 1) {
                                all.extend(source_ids(&source));
                            }
                        }
                        derived(all)
                    }
                }
            }
        } else {
            None
        };
        self.resolved.insert((relation, attnum), source.clone());
        source
    }
}

fn source_ids(source: &ColumnSource) -> Vec<ColumnId> {
    match source {
        ColumnSource::Protected(id) => vec![*id],
        ColumnSource::Derived(ids) => ids.clone(),
    }
}

fn derived(ids: impl IntoIterator<Item = ColumnId>) -> Option<ColumnSource> {
    let ids: BTreeSet<ColumnId> = ids.into_iter().collect();
    (!ids.is_empty()).then(|| ColumnSource::Derived(ids.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Policy tables: `customers` (OID 10: phone 2 → column 0, id_card 3 → column 1),
    /// `people` (OID 20: phone 2 → column 2) and `vip` (OID 13, a partition of
    /// `customers` with its own entry: id_card 1 → column 3).
    fn explicit() -> HashMap<u32, Vec<(i16, String, ColumnId)>> {
        let entry = |columns: &[(i16, &str, ColumnId)]| {
            columns
                .iter()
                .map(|&(attnum, name, id)| (attnum, name.to_string(), id))
                .collect::<Vec<_>>()
        };
        HashMap::from([
            (10, entry(&[(2, "phone", 0), (3, "id_card", 1)])),
            (20, entry(&[(2, "phone", 2)])),
            (13, entry(&[(1, "id_card", 3)])),
        ])
    }

    fn descendant(ancestors: &[u32], columns: &[(i16, &str)]) -> Descendant {
        Descendant {
            ancestors: ancestors.to_vec(),
            columns: columns
                .iter()
                .map(|&(attnum, name)| (attnum, name.to_string()))
                .collect(),
        }
    }

    fn descendants() -> HashMap<u32, Descendant> {
        HashMap::from([
            // A partition with its columns in another order.
            (
                11,
                descendant(&[10], &[(1, "id_card"), (4, "phone"), (5, "id")]),
            ),
            // A sub-partition, under a partition that is not in the policy.
            (12, descendant(&[10], &[(7, "phone"), (8, "id_card")])),
            // The partition with its own entry, and one of its own partitions.
            (13, descendant(&[10], &[(1, "id_card"), (2, "phone")])),
            (14, descendant(&[10, 13], &[(3, "phone"), (4, "id_card")])),
            // A child of two protected parents, both with a `phone`.
            (30, descendant(&[10, 20], &[(1, "phone"), (2, "id_card")])),
        ])
    }

    #[test]
    fn descendants_take_their_ancestors_protection_by_column_name() {
        let base = protected_relations(&explicit(), &descendants());
        let protected = |id| Some(ColumnSource::Protected(id));
        let at = |oid: u32, attnum: i16| base.get(&oid).and_then(|c| c.get(&attnum)).cloned();
        assert_eq!(at(10, 2), protected(0));
        assert_eq!(at(10, 3), protected(1));
        assert_eq!(at(11, 1), protected(1));
        assert_eq!(at(11, 4), protected(0));
        assert_eq!(at(11, 5), None);
        assert_eq!(at(12, 7), protected(0));
        assert_eq!(at(12, 8), protected(1));
        assert_eq!(base.get(&11).map(BTreeMap::len), Some(2));
    }

    #[test]
    fn the_most_specific_policy_entry_wins() {
        let base = protected_relations(&explicit(), &descendants());
        let at = |oid: u32, attnum: i16| base.get(&oid).and_then(|c| c.get(&attnum)).cloned();
        // vip's own entry for id_card; the parent's for the phone it does not list.
        assert_eq!(at(13, 1), Some(ColumnSource::Protected(3)));
        assert_eq!(at(13, 2), Some(ColumnSource::Protected(0)));
        // Below vip, vip's entry is nearer than customers'.
        assert_eq!(at(14, 4), Some(ColumnSource::Protected(3)));
        assert_eq!(at(14, 3), Some(ColumnSource::Protected(0)));
        // Two unrelated parents: derived from both.
        assert_eq!(at(30, 1), Some(ColumnSource::Derived(vec![0, 2])));
        assert_eq!(at(30, 2), Some(ColumnSource::Protected(1)));
    }

    #[test]
    fn rules_read_protected_relations_and_what_views_read() {
        let base = protected_relations(&explicit(), &descendants());
        let views = HashMap::from([(40, vec![20]), (41, vec![11, 13])]);
        let ids = |refs: &[u32]| {
            read_by_rule(refs, &base, &views)
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&[99]), Vec::<ColumnId>::new());
        assert_eq!(ids(&[20, 99]), [2]);
        assert_eq!(ids(&[12]), [0, 1]);
        assert_eq!(ids(&[40]), [2]);
        assert_eq!(ids(&[41]), [0, 1, 3]);
    }

    #[test]
    fn views_over_partitions_resolve_to_the_partition_columns() {
        let base = protected_relations(&explicit(), &descendants());
        // View 52 copies the partition 11's phone and computes from its whole row.
        let lineages = HashMap::from([(
            52,
            vec![
                (
                    1,
                    ColumnLineage::Copy(ColumnRef {
                        relation: 11,
                        attnum: 4,
                    }),
                ),
                (
                    2,
                    ColumnLineage::Computed(vec![ColumnRef {
                        relation: 11,
                        attnum: 0,
                    }]),
                ),
            ],
        )]);
        let mut resolver = ViewResolver {
            base: &base,
            unanalysable: &HashMap::new(),
            lineages: &lineages,
            resolved: HashMap::new(),
        };
        assert_eq!(resolver.column(52, 1, 0), Some(ColumnSource::Protected(0)));
        assert_eq!(
            resolver.column(52, 2, 0),
            Some(ColumnSource::Derived(vec![0, 1]))
        );
    }

    #[test]
    fn views_over_a_view_that_cannot_be_analysed_inherit_its_fallback() {
        let base = protected_relations(&explicit(), &descendants());
        // View 50 could not be analysed; 51 copies its column 1 and computes a column
        // from its column 2; 52 copies the partition 11's phone.
        let fallback = ColumnSource::Derived(vec![0, 1]);
        let unanalysable = HashMap::from([(50, fallback.clone())]);
        let lineages = HashMap::from([
            (
                51,
                vec![
                    (
                        1,
                        ColumnLineage::Copy(ColumnRef {
                            relation: 50,
                            attnum: 1,
                        }),
                    ),
                    (
                        2,
                        ColumnLineage::Computed(vec![ColumnRef {
                            relation: 50,
                            attnum: 2,
                        }]),
                    ),
                    (3, ColumnLineage::Computed(vec![])),
                ],
            ),
            (
                52,
                vec![(
                    1,
                    ColumnLineage::Copy(ColumnRef {
                        relation: 11,
                        attnum: 4,
                    }),
                )],
            ),
        ]);
        let mut resolver = ViewResolver {
            base: &base,
            unanalysable: &unanalysable,
            lineages: &lineages,
            resolved: HashMap::new(),
        };
        assert_eq!(resolver.column(51, 1, 0), Some(fallback.clone()));
        assert_eq!(resolver.column(51, 2, 0), Some(fallback.clone()));
        assert_eq!(resolver.column(51, 3, 0), None);
        assert_eq!(resolver.column(51, 0, 0), Some(fallback));
        assert_eq!(resolver.column(52, 1, 0), Some(ColumnSource::Protected(0)));
        assert_eq!(
            resolver.column(11, 0, 0),
            Some(ColumnSource::Derived(vec![0, 1]))
        );
    }

    #[test]
    fn logical_types_match_format_type_output() {
        assert!(logical_type_matches("varchar", "character varying(20)"));
        assert!(logical_type_matches(
            "timestamp",
            "timestamp(3) without time zone"
        ));
        assert!(logical_type_matches("numeric", "numeric(12,2)"));
        assert!(logical_type_matches("int8", "bigint"));
        assert!(!logical_type_matches("int4", "bigint"));
        assert!(!logical_type_matches("text", "bytea"));
    }
}
