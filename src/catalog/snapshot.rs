//! One database's catalog as the policy needs it: which (table OID, attribute number)
//! pairs are protected columns, which view columns are derived from them, and which
//! relations exist at all.
//!
//! A snapshot is built for one policy and never changes; a refresh builds a new one.
//! Loading only reads system catalogs with the `catalog` login. A column whose origin
//! cannot be worked out precisely is attributed to every protected column it might come
//! from, never to none.

use std::collections::{BTreeSet, HashMap, HashSet};

use tokio_postgres::Client;
use tracing::warn;

use super::lineage::{view_lineage, ColumnLineage, ColumnRef};
use super::CatalogError;
use crate::policy::file::EncryptMode;
use crate::policy::{ColumnId, Diagnostic, Policy};

/// Where a result column's values come from, as far as the policy is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnSource {
    /// A protected column itself, or a view column that copies it unchanged.
    Protected(ColumnId),
    /// A view column computed from these protected columns.
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
    columns: HashMap<(u32, i16), ColumnSource>,
    /// Every relation a RowDescription can name that existed when the snapshot was
    /// taken.
    known_relations: HashSet<u32>,
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

    /// Number of result columns (base and view) that carry protected data.
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
            let ordinal: i32 = row.get(0);
            let oid: u32 = row.get(1);
            let Some(slot) = usize::try_from(ordinal - 1)
                .ok()
                .and_then(|i| table_oids.get_mut(i))
            else {
                continue;
            };
            *slot = Some(oid);
            attributes
                .entry(oid)
                .or_default()
                .push((row.get(2), row.get(3), row.get(4)));
        }
        // All protected attnums of a relation, for whole-row references.
        let mut protected_of: HashMap<u32, Vec<(i16, ColumnId)>> = HashMap::new();
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
                        snapshot
                            .columns
                            .insert((oid, *attnum), ColumnSource::Protected(column));
                        snapshot.column_types.insert(column, type_name.clone());
                        protected_of.entry(oid).or_default().push((*attnum, column));
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
                    "SELECT oid FROM pg_catalog.pg_class WHERE relkind IN {READABLE_RELKINDS}"
                ),
                &[],
            )
            .await
            .map_err(query_failed("relations"))?;
        snapshot.known_relations = relations.iter().map(|row| row.get::<_, u32>(0)).collect();

        let protected_oids: Vec<u32> = protected_of.keys().copied().collect();
        if protected_oids.is_empty() {
            return Ok(snapshot);
        }
        // Views and materialized views that read, directly or through other views, a
        // table with protected columns.
        let views = client
            .query(
                "WITH RECURSIVE dependent(oid) AS ( \
                    SELECT r.ev_class FROM pg_catalog.pg_depend d \
                      JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
                     WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass \
                       AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                       AND d.refobjid = ANY($1::oid[]) AND r.ev_class <> d.refobjid \
                    UNION \
                    SELECT r.ev_class FROM dependent v \
                      JOIN pg_catalog.pg_depend d ON d.refobjid = v.oid \
                       AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                       AND d.classid = 'pg_catalog.pg_rewrite'::regclass \
                      JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid AND r.ev_class <> v.oid) \
                 SELECT r.ev_class, r.ev_action::text FROM pg_catalog.pg_rewrite r \
                   JOIN dependent v ON v.oid = r.ev_class \
                  WHERE r.rulename = '_RETURN'",
                &[&protected_oids],
            )
            .await
            .map_err(query_failed("views"))?;
        let mut lineages: HashMap<u32, Vec<(i16, ColumnLineage)>> = HashMap::new();
        for row in &views {
            let oid: u32 = row.get(0);
            let text: String = row.get(1);
            let lineage = view_lineage(&text).map_err(|error| CatalogError::ViewDefinition {
                view: oid,
                reason: error.to_string(),
            })?;
            lineages.insert(oid, lineage);
        }
        let mut resolver = ViewResolver {
            protected_of: &protected_of,
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
        Ok(snapshot)
    }
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
fn logical_type_matches(logical: &str, stored: &str) -> bool {
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
    protected_of: &'a HashMap<u32, Vec<(i16, ColumnId)>>,
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
        let source = if let Some(columns) = self.protected_of.get(&relation) {
            if attnum == 0 {
                derived(columns.iter().map(|(_, id)| *id))
            } else {
                columns
                    .iter()
                    .find(|(a, _)| *a == attnum)
                    .map(|(_, id)| ColumnSource::Protected(*id))
            }
        } else if let Some(columns) = self.lineages.get(&relation) {
            if depth > MAX_VIEW_DEPTH {
                warn!(
                    view = relation,
                    "views nested too deeply; treating as derived from every protected column"
                );
                derived(self.protected_of.values().flatten().map(|(_, id)| *id))
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
    use super::logical_type_matches;

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
