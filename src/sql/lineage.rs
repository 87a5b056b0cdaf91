//! Lineage of the values a statement reads, for the read policy: for each result
//! column, the protected columns it is computed from; the protected columns its
//! conditions test; the protected columns whose values it stores somewhere else on the
//! server; and what a COPY … TO STDOUT sends.
//!
//! It is an over-approximation by design: when a name could refer to a protected
//! column it counts as one, and a construct it does not know counts as computed from
//! every protected column it mentions. It never decides what a role gets (the read
//! guard does) and never puts a value of the statement into anything it returns.
//! It never refuses either: what it cannot follow it reports (`Unsupported`, a run of
//! columns of unknown length, everything a construct mentions).
//!
//! Rules, in short:
//! - a value is computed from every column and whole-row reference in it: function
//!   arguments, operators, casts, CASE, subqueries (their result columns), window
//!   PARTITION BY/ORDER BY, aggregate ORDER BY/FILTER/WITHIN GROUP, and whatever a
//!   construct not modelled here contains;
//! - an unqualified name is looked up in the innermost FROM list that has a column of
//!   that name (the union over its items), then outwards; a name that is no column
//!   but an item's alias is the whole row; a relation name matches every schema's
//!   relation of that name unless qualified (search_path is unknown);
//! - conditions and orderings anywhere count as filters; AND, OR and NOT are judged
//!   operand by operand.
//!
//! The allow-list (values that reveal nothing about the protected values): `count(*)`,
//! `count(x)` and `count(ALL x)` with `x` a plain column or a whole row (not
//! `count(DISTINCT x)`, which counts distinct values), and `x IS NULL` / `x IS NOT
//! NULL` (neither a source nor a filter).

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    visit_relations, AccessExpr, Assignment, AssignmentTarget, BinaryOperator, CloseCursor,
    CopyLegacyOption, CopyOption, CopySource, CopyTarget, Cte, Delete, Distinct,
    DuplicateTreatment, Expr, FromTable, Function, FunctionArg, FunctionArgExpr,
    FunctionArgumentClause, FunctionArguments, GroupByExpr, Ident, Insert, NamedWindowDefinition,
    NamedWindowExpr, ObjectName, ObjectNamePart, OnConflictAction, OnInsert, OrderBy, OrderByExpr,
    OrderByKind, Query, Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement,
    TableAlias, TableAliasColumnDef, TableFactor, TableObject, TableWithJoins, UnaryOperator,
    Update, UpdateTableFromKind, UtilityOption, Value, Visit, Visitor, WindowSpec, WindowType,
    With,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Span, Token, TokenWithSpan, Tokenizer};

use super::{copy_data_format, name_parts, normalise, CopyDirection};
use crate::policy::ColumnId;
use crate::wire::copy_out::CopyOutFormat;

/// Protected columns a value is computed from (empty: it reveals nothing protected).
pub type Sources = BTreeSet<ColumnId>;

/// One live column of a relation with protected columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// As the catalog spells it.
    pub name: String,
    /// The protected columns it holds or is computed from: one for a protected column
    /// (or a partition's, child's or view's copy of one), several for a computed view
    /// column, none for a plain column.
    pub sources: Sources,
    /// A generated column: COPY without a column list leaves it out.
    pub generated: bool,
}

/// A relation with protected columns (policy table, partition, inheritance child, view
/// or materialized view showing protected columns), with every live column in
/// attribute order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedRelation {
    pub schema: String,
    pub name: String,
    pub is_view: bool,
    pub columns: Vec<RelationColumn>,
}

/// What the analysis knows: the relations with protected columns, by `relname`
/// (several when schemas share a name).
pub struct Knowledge<'a> {
    pub relations: &'a HashMap<String, Vec<Arc<ProtectedRelation>>>,
}

/// One result column, or a run of them whose length the analysis cannot tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputColumn {
    /// Exactly one result column, computed from (or copying) these protected columns.
    One(Sources),
    /// Any number of result columns (a wildcard over a relation pgveil does not know,
    /// a table function without a column list), each computed from at most these.
    Many(Sources),
}

impl OutputColumn {
    /// The protected columns it (each column of the run) is computed from.
    pub fn sources(&self) -> &Sources {
        match self {
            OutputColumn::One(sources) | OutputColumn::Many(sources) => sources,
        }
    }
}

/// What one statement does, as far as the read policy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementKind {
    /// A statement whose result (if any) is described by `outputs`: SELECT, VALUES,
    /// TABLE, INSERT/UPDATE/DELETE (with RETURNING), and statements that return nothing.
    Plain,
    /// `DECLARE name CURSOR FOR query`: `outputs` are the cursor's columns, which later
    /// FETCHes return. The name is normalised like an identifier (unquoted: lower case).
    Declare { cursor: String },
    /// `FETCH`/`MOVE … FROM name`: the rows are the cursor's.
    Fetch { cursor: String },
    /// `CLOSE name` (`None`: CLOSE ALL).
    Close { cursor: Option<String> },
    /// `PREPARE name AS statement`: the prepared statement's own lineage.
    Prepare {
        name: String,
        statement: Box<StatementLineage>,
    },
    /// `EXECUTE name`: the rows are the prepared statement's.
    Execute { name: String },
    /// `DEALLOCATE name` (`None`: DEALLOCATE ALL).
    Deallocate { name: Option<String> },
    /// A statement that reads or writes rows of a relation with protected columns in a
    /// way this analysis does not follow (MERGE, and any statement kind not modelled
    /// that names one). `relation`: the first such relation named, `schema.name`.
    Unsupported { relation: String },
}

impl CopyOut {
    /// Every protected column the COPY sends something computed from.
    pub fn sources(&self) -> Sources {
        self.columns
            .iter()
            .flat_map(|column| column.sources().iter().copied())
            .collect()
    }
}

/// A COPY … TO STDOUT: the format of its data and its columns, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOut {
    /// For each column, the protected column it holds unchanged (a column of the table
    /// COPY names, which then gets that column's own treatment like a selected column);
    /// `None`: computed, or not known to be a plain copy.
    pub copies: Vec<Option<ColumnId>>,
    /// `Err`: options pgveil cannot read the data under (the reason, for the message).
    pub format: Result<CopyOutFormat, &'static str>,
    pub columns: Vec<OutputColumn>,
}

/// The lineage of one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementLineage {
    pub kind: StatementKind,
    /// The result columns in order (SELECT list with wildcards expanded, RETURNING
    /// list, a DECLAREd cursor's query); empty when it returns no rows.
    pub outputs: Vec<OutputColumn>,
    /// Protected columns tested by conditions anywhere in the statement (subqueries
    /// included): WHERE, JOIN ON/USING, HAVING, ORDER BY, GROUP BY, DISTINCT ON, window
    /// PARTITION BY/ORDER BY, the conditions of CASE, the FILTER of aggregates. `col IS
    /// [NOT] NULL` does not count.
    pub filters: Sources,
    /// Protected columns whose values (or values computed from them) the statement
    /// stores in another place on the server or writes to a server file or program:
    /// CREATE TABLE … AS, SELECT … INTO, CREATE MATERIALIZED VIEW, INSERT … SELECT,
    /// values written by INSERT/UPDATE (a column written back into itself does not
    /// count), COPY … TO a file or program.
    pub stored: Sources,
    /// A COPY … TO STDOUT (of a table, a column list or a query).
    pub copy_out: Option<CopyOut>,
}

/// Why a statement could not be analysed (for logs at debug level: it may quote the
/// text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unparseable(pub String);

/// The lineage of every statement of `sql`, in order. `Err` when the text does not
/// parse (see [`super::parse`]).
pub fn analyse(sql: &str, knowledge: &Knowledge) -> Result<Vec<StatementLineage>, Unparseable> {
    // `U&"p\0068one"` is `phone` to PostgreSQL, but the parser keeps the escapes: names
    // spelled so cannot be resolved.
    if sql
        .as_bytes()
        .windows(3)
        .any(|w| w[0].eq_ignore_ascii_case(&b'u') && w[1] == b'&' && w[2] == b'"')
    {
        return Err(Unparseable("a Unicode-escaped identifier (U&\"…\")".into()));
    }
    match super::parse(sql) {
        Ok(statements) => Ok(statements
            .iter()
            .map(|statement| lineage(statement, knowledge))
            .collect()),
        Err(reason) => piecewise(sql, knowledge).ok_or(Unparseable(reason)),
    }
}

/// The text again, one statement at a time, for what sqlparser cannot parse but
/// PostgreSQL runs: `MOVE …` and the FETCH forms without FROM/IN (`FETCH c`, `FETCH
/// NEXT c`), whose cursor name is always the last word. Every other statement must
/// parse on its own. `None` when something still does not parse.
fn piecewise(sql: &str, knowledge: &Knowledge) -> Option<Vec<StatementLineage>> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    let offsets = super::Offsets::new(sql);
    let mut pieces: Vec<Vec<&TokenWithSpan>> = vec![Vec::new()];
    for token in &tokens {
        match &token.token {
            Token::SemiColon => pieces.push(Vec::new()),
            Token::Whitespace(_) | Token::EOF => {}
            _ => pieces.last_mut()?.push(token),
        }
    }
    let relation_names: crate::sqltext::NameSet =
        knowledge.relations.keys().map(String::as_str).collect();
    let mut result = Vec::new();
    // Statements recovered by looking at them one at a time.
    let mut cursor_statements = 0;
    for piece in pieces.iter().filter(|p| !p.is_empty()) {
        let first = piece.first()?;
        let is_cursor_move = matches!(
            &first.token,
            Token::Word(w) if w.quote_style.is_none()
                && (w.value.eq_ignore_ascii_case("move") || w.value.eq_ignore_ascii_case("fetch"))
        );
        if is_cursor_move {
            let Token::Word(last) = &piece.last()?.token else {
                return None;
            };
            if piece.len() < 2 {
                return None;
            }
            let ident = Ident {
                value: last.value.clone(),
                quote_style: last.quote_style,
                span: Span::empty(),
            };
            cursor_statements += 1;
            result.push(bare(StatementKind::Fetch {
                cursor: normalise(&ident),
            }));
            continue;
        }
        let start = offsets.offset(first.span.start)?;
        let end = offsets.offset(piece.last()?.span.end)?;
        let text = sql.get(start..end)?;
        match super::parse(text) {
            Ok(statements) => {
                for statement in statements {
                    result.push(lineage(&statement, knowledge));
                }
            }
            // A statement the parser does not know that names no relation with
            // protected columns (`ALTER VIEW v RENAME TO w`, `VACUUM orders`) passes
            // unanalysed; one that names one makes the whole text unanalysable.
            Err(_) if !crate::sqltext::names_any(text.as_bytes(), &relation_names) => {
                cursor_statements += 1;
                result.push(bare(StatementKind::Plain));
            }
            Err(_) => return None,
        }
    }
    // Nothing gained: the failure was elsewhere.
    (cursor_statements > 0).then_some(result)
}

/// A lineage with nothing but its kind.
fn bare(kind: StatementKind) -> StatementLineage {
    StatementLineage {
        kind,
        outputs: Vec::new(),
        filters: Sources::new(),
        stored: Sources::new(),
        copy_out: None,
    }
}

/// Passes over the CTEs of one WITH RECURSIVE before giving up on precision.
const MAX_ROUNDS: usize = 64;

/// Evaluations of recursive CTE bodies per statement before giving up on precision:
/// nested WITH RECURSIVE would otherwise multiply their rounds.
const ROUND_BUDGET: usize = 256;

/// A result column of a query, with the name outer queries and ORDER BY know it by.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Out {
    /// `None`: a name this analysis does not work out (`?column?` and the like), or a
    /// run of columns.
    name: Option<String>,
    column: OutputColumn,
    /// The protected column it holds unchanged: a select-list item that is a plain
    /// reference to a column of a table in this query's own FROM list (not through a
    /// derived table, CTE or view, where it could be computed). Only COPY uses it.
    copy: Option<ColumnId>,
}

impl Out {
    fn one(name: Option<String>, sources: Sources) -> Out {
        Out {
            name,
            column: OutputColumn::One(sources),
            copy: None,
        }
    }

    fn many(sources: Sources) -> Out {
        Out {
            name: None,
            column: OutputColumn::Many(sources),
            copy: None,
        }
    }

    fn sources(&self) -> &Sources {
        self.column.sources()
    }

    fn is_many(&self) -> bool {
        matches!(self.column, OutputColumn::Many(_))
    }
}

fn all_sources(outputs: &[Out]) -> Sources {
    outputs
        .iter()
        .flat_map(|o| o.sources().iter().copied())
        .collect()
}

/// Column i of a set operation (or of two rounds of a recursive CTE) is computed from
/// column i of either side; when the columns cannot be matched (a run of unknown length,
/// different widths), every column from everything.
fn merge_columns(left: &[Out], right: &[Out]) -> Vec<Out> {
    if left.len() != right.len() || left.iter().chain(right).any(Out::is_many) {
        let mut all = all_sources(left);
        all.extend(all_sources(right));
        return vec![Out::many(all)];
    }
    left.iter()
        .zip(right)
        .map(|(l, r)| {
            let mut sources = l.sources().clone();
            sources.extend(r.sources().iter().copied());
            Out::one(l.name.clone(), sources)
        })
        .collect()
}

/// `outputs` renamed by a column alias list, in order.
fn rename(mut outputs: Vec<Out>, columns: &[TableAliasColumnDef]) -> Vec<Out> {
    for (output, column) in outputs.iter_mut().zip(columns) {
        if output.is_many() {
            // Which columns the rest of the names fall on is unknown.
            break;
        }
        output.name = Some(normalise(&column.name));
    }
    outputs
}

/// A relation, derived table, CTE or table function in a FROM list.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// The alias, or the relation's (function's) own name; empty for a subquery
    /// without an alias.
    alias: String,
    /// The relations in knowledge it may be (schema, name), for `schema.table.column`.
    relations: Vec<(String, String)>,
    /// Columns by name (several of one name: the union).
    columns: Vec<(String, Sources)>,
    /// `Some`: it may have columns not listed in `columns` (unknown relation, a run of
    /// unknown length, a result column whose name is not worked out), each computed
    /// from at most these.
    open: Option<Sources>,
    /// What `*` and `alias.*` expand to.
    expansion: Vec<Out>,
    /// Columns that hold one protected column unchanged, by name: those of a single
    /// table (not a view) in knowledge.
    copies: Vec<(String, ColumnId)>,
}

impl Entry {
    fn column(&self, name: &str) -> Option<Sources> {
        let mut found: Option<Sources> = None;
        for (column, sources) in &self.columns {
            if column == name {
                found
                    .get_or_insert_with(Sources::new)
                    .extend(sources.iter().copied());
            }
        }
        found
    }

    /// A whole-row reference: every column.
    fn whole(&self) -> Sources {
        let mut all = all_sources(&self.expansion);
        for (_, sources) in &self.columns {
            all.extend(sources.iter().copied());
        }
        if let Some(open) = &self.open {
            all.extend(open.iter().copied());
        }
        all
    }

    /// A derived table or CTE with these result columns.
    fn from_outputs(alias: String, outputs: Vec<Out>, columns: &[TableAliasColumnDef]) -> Entry {
        let expansion = rename(outputs, columns);
        let mut entry = Entry {
            alias,
            ..Entry::default()
        };
        let first_many = expansion.iter().position(Out::is_many);
        for out in &expansion {
            match &out.name {
                Some(name) if !out.is_many() => {
                    entry.columns.push((name.clone(), out.sources().clone()))
                }
                _ => entry
                    .open
                    .get_or_insert_with(Sources::new)
                    .extend(out.sources().iter().copied()),
            }
        }
        if let Some(first_many) = first_many {
            // Alias names past a run of unknown length may name any column after it.
            let rest = all_sources(expansion.get(first_many..).unwrap_or_default());
            for column in columns.iter().skip(first_many) {
                entry.columns.push((normalise(&column.name), rest.clone()));
            }
            entry
                .open
                .get_or_insert_with(Sources::new)
                .extend(rest.iter().copied());
        }
        entry.expansion = expansion;
        entry
    }

    /// Relations in knowledge of one name (several: schemas share the name and
    /// search_path is unknown).
    fn relation(
        alias: String,
        candidates: &[Arc<ProtectedRelation>],
        alias_columns: &[TableAliasColumnDef],
    ) -> Entry {
        let renamed: Vec<Vec<(String, Sources)>> = candidates
            .iter()
            .map(|relation| {
                relation
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(index, column)| {
                        let name = alias_columns
                            .get(index)
                            .map(|a| normalise(&a.name))
                            .unwrap_or_else(|| column.name.clone());
                        (name, column.sources.clone())
                    })
                    .collect()
            })
            .collect();
        let same_names = renamed.windows(2).all(|pair| {
            pair[0].len() == pair[1].len() && pair[0].iter().zip(&pair[1]).all(|(a, b)| a.0 == b.0)
        });
        let expansion = match renamed.first() {
            Some(first) if same_names => first
                .iter()
                .enumerate()
                .map(|(index, (name, _))| {
                    let sources = renamed
                        .iter()
                        .filter_map(|columns| columns.get(index))
                        .flat_map(|(_, s)| s.iter().copied())
                        .collect();
                    Out::one(Some(name.clone()), sources)
                })
                .collect(),
            _ => vec![Out::many(
                renamed
                    .iter()
                    .flatten()
                    .flat_map(|(_, s)| s.iter().copied())
                    .collect(),
            )],
        };
        let copies = match candidates {
            [table] if !table.is_view => renamed
                .first()
                .map(|columns| {
                    columns
                        .iter()
                        .filter_map(
                            |(name, sources)| match sources.iter().collect::<Vec<_>>()[..] {
                                [only] => Some((name.clone(), *only)),
                                _ => None,
                            },
                        )
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Entry {
            alias,
            relations: candidates
                .iter()
                .map(|r| (r.schema.clone(), r.name.clone()))
                .collect(),
            columns: renamed.into_iter().flatten().collect(),
            open: None,
            expansion,
            copies,
        }
    }

    /// A relation pgveil knows nothing about: nothing protected in it.
    fn unknown(alias: String, alias_columns: &[TableAliasColumnDef]) -> Entry {
        Entry {
            alias,
            relations: Vec::new(),
            columns: alias_columns
                .iter()
                .map(|c| (normalise(&c.name), Sources::new()))
                .collect(),
            open: Some(Sources::new()),
            expansion: vec![Out::many(Sources::new())],
            copies: Vec::new(),
        }
    }

    /// A table function: every column computed from its arguments.
    fn function(alias: Option<&TableAlias>, name: String, sources: Sources) -> Entry {
        let alias_name = alias.map(|a| normalise(&a.name)).unwrap_or(name);
        let alias_columns = alias.map(|a| a.columns.as_slice()).unwrap_or_default();
        let (columns, expansion) = if alias_columns.is_empty() {
            (
                vec![(alias_name.clone(), sources.clone())],
                vec![Out::many(sources.clone())],
            )
        } else {
            (
                alias_columns
                    .iter()
                    .map(|c| (normalise(&c.name), sources.clone()))
                    .collect(),
                alias_columns
                    .iter()
                    .map(|c| Out::one(Some(normalise(&c.name)), sources.clone()))
                    .collect(),
            )
        };
        Entry {
            alias: alias_name,
            relations: Vec::new(),
            columns,
            // A composite result may have more columns than the alias names.
            open: Some(sources),
            expansion,
            copies: Vec::new(),
        }
    }
}

/// One level of name resolution: a FROM list (with the CTEs and named windows that
/// come with it).
#[derive(Debug, Clone, Default)]
struct Scope {
    entries: Vec<Entry>,
    /// What `*` expands to (JOIN … USING and NATURAL merge columns).
    star: Vec<Out>,
    ctes: Vec<(String, Vec<Out>)>,
    windows: Vec<(String, Sources)>,
}

struct Walker<'k, 'a> {
    knowledge: &'k Knowledge<'a>,
    filters: Sources,
    stored: Sources,
    /// A construct this analysis does not follow names this relation (`schema.name`).
    unsupported: Option<String>,
    /// Evaluations of recursive CTE bodies so far (see [`ROUND_BUDGET`]).
    rounds: usize,
}

/// The lineage of one parsed statement.
fn lineage(statement: &Statement, knowledge: &Knowledge) -> StatementLineage {
    let mut walker = Walker {
        knowledge,
        filters: Sources::new(),
        stored: Sources::new(),
        unsupported: None,
        rounds: 0,
    };
    let mut scopes = Vec::new();
    let mut kind = StatementKind::Plain;
    let mut outputs = Vec::new();
    let mut copy_out = None;
    match statement {
        Statement::Query(query) => outputs = walker.query(query, &mut scopes),
        Statement::Insert(insert) => outputs = walker.insert(insert, &mut scopes),
        Statement::Update(update) => outputs = walker.update(update, &mut scopes),
        Statement::Delete(delete) => outputs = walker.delete(delete, &mut scopes),
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            ..
        } => copy_out = walker.copy(source, *to, target, options, legacy_options, &mut scopes),
        Statement::CreateTable(table) => {
            if let Some(query) = &table.query {
                let outputs = walker.query(query, &mut scopes);
                walker.stored.extend(all_sources(&outputs));
            }
        }
        Statement::CreateView(view) => {
            let outputs = walker.query(&view.query, &mut scopes);
            // A view's lineage is resolved from the catalog when it is read; a
            // materialized view holds the values.
            if view.materialized {
                walker.stored.extend(all_sources(&outputs));
            }
        }
        Statement::Declare { stmts } => match stmts.iter().find(|d| d.for_query.is_some()) {
            Some(declare) => {
                if let Some(query) = &declare.for_query {
                    outputs = walker.query(query, &mut scopes);
                }
                kind = StatementKind::Declare {
                    cursor: declare.names.first().map(normalise).unwrap_or_default(),
                };
            }
            None => walker.other(statement),
        },
        Statement::Fetch { name, .. } => {
            kind = StatementKind::Fetch {
                cursor: normalise(name),
            }
        }
        Statement::Close { cursor } => {
            kind = StatementKind::Close {
                cursor: match cursor {
                    CloseCursor::All => None,
                    CloseCursor::Specific { name } => Some(normalise(name)),
                },
            }
        }
        Statement::Prepare {
            name, statement, ..
        } => {
            let inner = lineage(statement, knowledge);
            // Seen at PREPARE already, so a caller looking at this lineage alone
            // does not miss them.
            walker.filters.extend(inner.filters.iter().copied());
            walker.stored.extend(inner.stored.iter().copied());
            kind = StatementKind::Prepare {
                name: normalise(name),
                statement: Box::new(inner),
            };
        }
        Statement::Execute {
            name: Some(name),
            parameters,
            ..
        } => {
            let mut arguments = Sources::new();
            for parameter in parameters {
                arguments.extend(walker.value(parameter, &mut scopes));
            }
            if arguments.is_empty() {
                kind = StatementKind::Execute {
                    name: name_parts(name).last().cloned().unwrap_or_default(),
                };
            } else {
                // A protected value passed as an argument could end up anywhere in
                // the prepared statement (its result, a table): not followed.
                walker.other(statement);
                if walker.unsupported.is_none() {
                    walker.unsupported = Some(String::from("?"));
                }
            }
        }
        Statement::Deallocate { name, .. } => {
            kind = StatementKind::Deallocate {
                name: (name.quote_style.is_some() || !name.value.eq_ignore_ascii_case("all"))
                    .then(|| normalise(name)),
            }
        }
        Statement::Explain {
            analyze,
            statement,
            options,
            ..
        } => {
            let inner = lineage(statement, knowledge);
            let runs = *analyze || options.iter().flatten().any(is_analyze_option);
            walker.filters.extend(inner.filters.iter().copied());
            if runs {
                walker.stored.extend(inner.stored.iter().copied());
                if let StatementKind::Unsupported { relation } = inner.kind {
                    walker.unsupported = Some(relation);
                }
            }
            // One text column: the plan.
            outputs = vec![Out::one(None, Sources::new())];
        }
        Statement::Set(_)
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::Reset(_)
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. }
        | Statement::NOTIFY { .. }
        | Statement::Discard { .. }
        | Statement::Lock(_)
        | Statement::Analyze(_)
        | Statement::Vacuum(_)
        | Statement::Truncate(_)
        | Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::Comment { .. }
        | Statement::Drop { .. }
        | Statement::AlterTable(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::CreateIndex(_) => {}
        other => walker.other(other),
    }
    if let Some(relation) = walker.unsupported {
        kind = StatementKind::Unsupported { relation };
    }
    StatementLineage {
        kind,
        outputs: outputs.into_iter().map(|o| o.column).collect(),
        filters: walker.filters,
        stored: walker.stored,
        copy_out,
    }
}

/// `ANALYZE` in `EXPLAIN (ANALYZE [true|on|1], …)`: anything but an explicit false.
fn is_analyze_option(option: &UtilityOption) -> bool {
    if !option.name.value.eq_ignore_ascii_case("analyze") {
        return false;
    }
    let off = match &option.arg {
        None => false,
        Some(Expr::Value(value)) => match &value.value {
            Value::Boolean(on) => !on,
            Value::Number(n, _) => n == "0",
            Value::SingleQuotedString(s) => {
                matches!(s.to_lowercase().as_str(), "off" | "false" | "no" | "0")
            }
            _ => false,
        },
        Some(Expr::Identifier(ident)) => {
            matches!(ident.value.to_lowercase().as_str(), "off" | "false" | "no")
        }
        Some(_) => false,
    };
    !off
}

impl Walker<'_, '_> {
    // ---- relations -------------------------------------------------------------

    /// The relations in knowledge a table name may refer to: those of its schema when
    /// qualified, every one of that name otherwise.
    fn candidates(&self, name: &ObjectName) -> Vec<Arc<ProtectedRelation>> {
        let parts = name_parts(name);
        let (schema, relname) = match parts.as_slice() {
            [relname] => (None, relname),
            [schema, relname] | [_, schema, relname] => (Some(schema), relname),
            _ => return Vec::new(),
        };
        self.knowledge
            .relations
            .get(relname)
            .map(|candidates| {
                candidates
                    .iter()
                    .filter(|r| schema.is_none_or(|s| *s == r.schema))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A statement kind (or part of one) this analysis does not follow: unsupported
    /// when it names a relation in knowledge.
    fn other<V: Visit>(&mut self, node: &V) {
        if self.unsupported.is_some() {
            return;
        }
        let mut named = None;
        let _ = visit_relations(node, |name| match self.candidates(name).first() {
            Some(relation) => {
                named = Some(format!("{}.{}", relation.schema, relation.name));
                ControlFlow::Break(())
            }
            None => ControlFlow::Continue(()),
        });
        if named.is_some() {
            self.unsupported = named;
        }
    }

    /// The CTE bound to an unqualified name, innermost first.
    fn cte(scopes: &[Scope], name: &str) -> Option<Vec<Out>> {
        scopes
            .iter()
            .rev()
            .flat_map(|s| s.ctes.iter().rev())
            .find(|(n, _)| n == name)
            .map(|(_, outputs)| outputs.clone())
    }

    // ---- queries ---------------------------------------------------------------

    fn query(&mut self, query: &Query, scopes: &mut Vec<Scope>) -> Vec<Out> {
        let ctes = match &query.with {
            Some(with) => self.with(with, scopes),
            None => Vec::new(),
        };
        scopes.push(Scope {
            ctes,
            ..Scope::default()
        });
        let outputs = self.query_body(query, scopes);
        scopes.pop();
        outputs
    }

    fn with(&mut self, with: &With, scopes: &mut Vec<Scope>) -> Vec<(String, Vec<Out>)> {
        let mut bound: Vec<(String, Vec<Out>)> = Vec::new();
        if !with.recursive {
            for cte in &with.cte_tables {
                scopes.push(Scope {
                    ctes: bound.clone(),
                    ..Scope::default()
                });
                let outputs = self.query(&cte.query, scopes);
                scopes.pop();
                bound.push((
                    normalise(&cte.alias.name),
                    rename(outputs, &cte.alias.columns),
                ));
            }
            return bound;
        }
        // WITH RECURSIVE: a CTE may refer to itself and to the ones after it. Until
        // computed, a CTE is a placeholder with nothing known.
        bound = with
            .cte_tables
            .iter()
            .map(|cte| (normalise(&cte.alias.name), placeholder(cte)))
            .collect();
        for _ in 0..MAX_ROUNDS {
            if self.rounds >= ROUND_BUDGET {
                break;
            }
            let mut changed = false;
            for (index, cte) in with.cte_tables.iter().enumerate() {
                let before = bound.get(index).map(|(_, outputs)| outputs.clone());
                let outputs = self.recursive_cte(index, cte, &mut bound, scopes);
                changed |= before.as_ref() != Some(&outputs);
                if let Some(slot) = bound.get_mut(index) {
                    slot.1 = outputs;
                }
            }
            // A pass the budget cut short may look settled without being so.
            if !changed && self.rounds < ROUND_BUDGET {
                return bound;
            }
        }
        // Cut short (nested recursive CTEs multiply the rounds, so a statement has a
        // budget): every CTE may hold anything the CTEs could read.
        let mut all = Sources::new();
        for cte in &with.cte_tables {
            all.extend(self.everything(&cte.query, scopes));
        }
        for (_, outputs) in bound.iter_mut() {
            *outputs = vec![Out::many(all.clone())];
        }
        // Walked once more with those bindings, for the conditions and writes inside.
        for cte in &with.cte_tables {
            scopes.push(Scope {
                ctes: bound.clone(),
                ..Scope::default()
            });
            let _ = self.query(&cte.query, scopes);
            scopes.pop();
        }
        bound
    }

    /// One CTE of a WITH RECURSIVE: its non-recursive branch, then the whole query
    /// with the CTE bound to what is known so far, column by column, until nothing
    /// changes (or the budget runs out: the caller then gives up on precision).
    fn recursive_cte(
        &mut self,
        index: usize,
        cte: &Cte,
        bound: &mut [(String, Vec<Out>)],
        scopes: &mut Vec<Scope>,
    ) -> Vec<Out> {
        let columns = &cte.alias.columns;
        let mut current = match cte.query.body.as_ref() {
            SetExpr::SetOperation { left, .. } => {
                self.rounds += 1;
                scopes.push(Scope {
                    ctes: bound.to_vec(),
                    ..Scope::default()
                });
                let outputs = self.set_expr(left, scopes);
                scopes.pop();
                rename(outputs, columns)
            }
            _ => placeholder(cte),
        };
        while self.rounds < ROUND_BUDGET {
            self.rounds += 1;
            if let Some(slot) = bound.get_mut(index) {
                slot.1 = current.clone();
            }
            scopes.push(Scope {
                ctes: bound.to_vec(),
                ..Scope::default()
            });
            let outputs = self.query(&cte.query, scopes);
            scopes.pop();
            let merged = merge_columns(&current, &rename(outputs, columns));
            if merged == current {
                return current;
            }
            current = merged;
        }
        current
    }

    /// Everything a query could read: every protected column of the relations it
    /// names and of every row and CTE in scope. The answer when a fixpoint is cut
    /// short.
    fn everything(&self, query: &Query, scopes: &[Scope]) -> Sources {
        let mut all = Sources::new();
        let _ = visit_relations(query, |name| {
            for relation in self.candidates(name) {
                for column in &relation.columns {
                    all.extend(column.sources.iter().copied());
                }
            }
            ControlFlow::<()>::Continue(())
        });
        for scope in scopes {
            for entry in &scope.entries {
                all.extend(entry.whole());
            }
            for (_, outputs) in &scope.ctes {
                all.extend(all_sources(outputs));
            }
        }
        all
    }

    fn query_body(&mut self, query: &Query, scopes: &mut Vec<Scope>) -> Vec<Out> {
        let order_by: &[OrderByExpr] = match &query.order_by {
            Some(OrderBy {
                kind: OrderByKind::Expressions(exprs),
                ..
            }) => exprs,
            _ => &[],
        };
        let outputs = match query.body.as_ref() {
            // ORDER BY expressions see the select's FROM list.
            SetExpr::Select(select) => self.select(select, order_by, scopes),
            body => {
                let outputs = self.set_expr(body, scopes);
                for item in order_by {
                    self.order_item(&item.expr, &outputs, scopes);
                }
                outputs
            }
        };
        if let Some(OrderBy {
            kind: OrderByKind::All(_),
            ..
        }) = &query.order_by
        {
            self.filters.extend(all_sources(&outputs));
        }
        if let Some(limit) = &query.limit_clause {
            let sources = self.scan(limit, None, scopes);
            self.filters.extend(sources);
        }
        if let Some(fetch) = &query.fetch {
            let sources = self.scan(fetch, None, scopes);
            self.filters.extend(sources);
        }
        if !query.pipe_operators.is_empty() {
            let sources = self.scan(&query.pipe_operators, None, scopes);
            self.filters.extend(sources);
        }
        outputs
    }

    fn set_expr(&mut self, body: &SetExpr, scopes: &mut Vec<Scope>) -> Vec<Out> {
        match body {
            SetExpr::Select(select) => self.select(select, &[], scopes),
            SetExpr::Query(query) => self.query(query, scopes),
            SetExpr::SetOperation { left, right, .. } => {
                let left = self.set_expr(left, scopes);
                let right = self.set_expr(right, scopes);
                merge_columns(&left, &right)
            }
            SetExpr::Values(values) => {
                let mut columns: Vec<Sources> = Vec::new();
                for row in &values.rows {
                    for (index, expr) in row.iter().enumerate() {
                        let sources = self.value(expr, scopes);
                        match columns.get_mut(index) {
                            Some(column) => column.extend(sources),
                            None => columns.push(sources),
                        }
                    }
                }
                columns
                    .into_iter()
                    .enumerate()
                    .map(|(index, sources)| Out::one(Some(format!("column{}", index + 1)), sources))
                    .collect()
            }
            SetExpr::Insert(Statement::Insert(insert)) => self.insert(insert, scopes),
            SetExpr::Update(Statement::Update(update)) => self.update(update, scopes),
            SetExpr::Delete(Statement::Delete(delete)) => self.delete(delete, scopes),
            SetExpr::Insert(other)
            | SetExpr::Update(other)
            | SetExpr::Delete(other)
            | SetExpr::Merge(other) => {
                self.other(other);
                Vec::new()
            }
            SetExpr::Table(table) => {
                let parts: Vec<Ident> = table
                    .schema_name
                    .iter()
                    .chain(table.table_name.iter())
                    .map(|n| Ident::new(n.clone()))
                    .collect();
                let name = ObjectName(parts.into_iter().map(ObjectNamePart::Identifier).collect());
                let mut scope = Scope::default();
                let factor = TableFactor::Table {
                    name,
                    alias: None,
                    args: None,
                    with_hints: Vec::new(),
                    version: None,
                    with_ordinality: false,
                    partitions: Vec::new(),
                    json_path: None,
                    sample: None,
                    index_hints: Vec::new(),
                };
                self.table_factor(&factor, &mut scope, scopes)
            }
        }
    }

    /// A SELECT, and the ORDER BY of the query it is the body of.
    fn select(
        &mut self,
        select: &Select,
        order_by: &[OrderByExpr],
        scopes: &mut Vec<Scope>,
    ) -> Vec<Out> {
        let mut scope = Scope::default();
        for table in &select.from {
            self.add_from_item(table, &mut scope, scopes);
        }
        scopes.push(scope);
        let outputs = self.select_in_scope(select, order_by, scopes);
        scopes.pop();
        outputs
    }

    fn select_in_scope(
        &mut self,
        select: &Select,
        order_by: &[OrderByExpr],
        scopes: &mut Vec<Scope>,
    ) -> Vec<Out> {
        // Named windows first: OVER w refers to them.
        for NamedWindowDefinition(name, definition) in &select.named_window {
            let sources = match definition {
                NamedWindowExpr::WindowSpec(spec) => self.window_spec(spec, scopes),
                NamedWindowExpr::NamedWindow(base) => Self::named_window(base, scopes),
            };
            self.filters.extend(sources.iter().copied());
            if let Some(scope) = scopes.last_mut() {
                scope.windows.push((normalise(name), sources));
            }
        }
        let outputs = self.projection(&select.projection, scopes);
        if select.into.is_some() {
            self.stored.extend(all_sources(&outputs));
        }
        for condition in [
            &select.prewhere,
            &select.selection,
            &select.having,
            &select.qualify,
        ]
        .into_iter()
        .flatten()
        {
            self.condition(condition, scopes);
        }
        match &select.group_by {
            GroupByExpr::Expressions(exprs, _) => {
                for expr in exprs {
                    self.group_item(expr, &outputs, scopes);
                }
            }
            GroupByExpr::All(_) => self.filters.extend(all_sources(&outputs)),
        }
        match &select.distinct {
            // DISTINCT compares the values of every result column.
            Some(Distinct::Distinct) => self.filters.extend(all_sources(&outputs)),
            Some(Distinct::On(exprs)) => {
                for expr in exprs {
                    self.order_item(expr, &outputs, scopes);
                }
            }
            Some(Distinct::All) | None => {}
        }
        for expr in select.cluster_by.iter().chain(&select.distribute_by) {
            let sources = self.value(expr, scopes);
            self.filters.extend(sources);
        }
        for item in select.sort_by.iter().chain(order_by) {
            self.order_item(&item.expr, &outputs, scopes);
        }
        if !select.connect_by.is_empty() || !select.lateral_views.is_empty() {
            let mut sources = self.scan(&select.connect_by, None, scopes);
            sources.extend(self.scan(&select.lateral_views, None, scopes));
            self.filters.extend(sources);
        }
        outputs
    }

    /// An ORDER BY (or DISTINCT ON) item: an output position, an output name or an
    /// expression over the FROM list. Counts as a filter.
    fn order_item(&mut self, expr: &Expr, outputs: &[Out], scopes: &mut Vec<Scope>) {
        let sources = self.output_or_value(expr, outputs, scopes);
        self.filters.extend(sources);
    }

    /// A GROUP BY item (grouping sets, ROLLUP and CUBE included).
    fn group_item(&mut self, expr: &Expr, outputs: &[Out], scopes: &mut Vec<Scope>) {
        match expr {
            Expr::GroupingSets(sets) | Expr::Cube(sets) | Expr::Rollup(sets) => {
                for expr in sets.iter().flatten() {
                    self.group_item(expr, outputs, scopes);
                }
            }
            Expr::Tuple(exprs) => {
                for expr in exprs {
                    self.group_item(expr, outputs, scopes);
                }
            }
            other => self.order_item(other, outputs, scopes),
        }
    }

    /// The sources of an item that may name a result column by position or name.
    fn output_or_value(
        &mut self,
        expr: &Expr,
        outputs: &[Out],
        scopes: &mut Vec<Scope>,
    ) -> Sources {
        match expr {
            Expr::Value(value) => match &value.value {
                Value::Number(n, _) => match n.parse::<usize>() {
                    Ok(position) => positional(outputs, position),
                    Err(_) => Sources::new(),
                },
                _ => Sources::new(),
            },
            Expr::Identifier(ident) => {
                let name = normalise(ident);
                let mut by_output: Option<Sources> = None;
                for output in outputs {
                    if output.name.as_deref() == Some(name.as_str()) {
                        by_output
                            .get_or_insert_with(Sources::new)
                            .extend(output.sources().iter().copied());
                    }
                }
                let by_input = self.resolve(&[name], scopes);
                match (by_output, by_input) {
                    // Perhaps a result column whose name is not worked out.
                    (None, None) => all_sources(outputs),
                    (a, b) => a.into_iter().chain(b).flatten().collect(),
                }
            }
            other => self.value(other, scopes),
        }
    }

    fn projection(&mut self, items: &[SelectItem], scopes: &mut Vec<Scope>) -> Vec<Out> {
        let mut outputs = Vec::new();
        for item in items {
            match item {
                SelectItem::UnnamedExpr(expr) => {
                    let sources = self.value(expr, scopes);
                    let mut out = Out::one(column_name(expr), sources);
                    out.copy = Self::copied_column(expr, scopes);
                    outputs.push(out);
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    let sources = self.value(expr, scopes);
                    let mut out = Out::one(Some(normalise(alias)), sources);
                    out.copy = Self::copied_column(expr, scopes);
                    outputs.push(out);
                }
                SelectItem::ExprWithAliases { expr, aliases } => {
                    let sources = self.value(expr, scopes);
                    for alias in aliases {
                        outputs.push(Out::one(Some(normalise(alias)), sources.clone()));
                    }
                }
                SelectItem::Wildcard(_) => {
                    if let Some(scope) = scopes.last() {
                        outputs.extend(scope.star.iter().cloned());
                    }
                }
                SelectItem::QualifiedWildcard(kind, _) => match kind {
                    SelectItemQualifiedWildcardKind::ObjectName(name) => {
                        match Self::entries_named(&name_parts(name), scopes) {
                            Some(entries) => {
                                for entry in entries {
                                    outputs.extend(entry.expansion.iter().cloned());
                                }
                            }
                            None => {
                                let sources = self.whole_row(name, scopes);
                                outputs.push(Out::many(sources));
                            }
                        }
                    }
                    SelectItemQualifiedWildcardKind::Expr(expr) => {
                        let row = match strip_nested(expr) {
                            Expr::Identifier(ident) => {
                                let name = normalise(ident);
                                match self.resolve_column(&name, scopes) {
                                    Some(_) => None,
                                    None => Self::entries_named(&[name], scopes),
                                }
                            }
                            _ => None,
                        };
                        match row {
                            Some(entries) => {
                                for entry in entries {
                                    outputs.extend(entry.expansion.iter().cloned());
                                }
                            }
                            None => {
                                let sources = self.value(expr, scopes);
                                outputs.push(Out::many(sources));
                            }
                        }
                    }
                },
            }
        }
        outputs
    }

    // ---- FROM ------------------------------------------------------------------

    /// One item of a FROM list with its joins: entries go into `scope`, the columns of
    /// `*` onto its star.
    fn add_from_item(
        &mut self,
        table: &TableWithJoins,
        scope: &mut Scope,
        scopes: &mut Vec<Scope>,
    ) {
        let mut star = self.table_factor(&table.relation, scope, scopes);
        for join in &table.joins {
            let right = self.table_factor(&join.relation, scope, scopes);
            use sqlparser::ast::JoinConstraint as C;
            if let sqlparser::ast::JoinOperator::AsOf {
                match_condition, ..
            } = &join.join_operator
            {
                scopes.push(scope.clone());
                self.condition(match_condition, scopes);
                scopes.pop();
            }
            let constraint = super::join_constraint(&join.join_operator);
            match constraint {
                Some(C::On(expr)) => {
                    scopes.push(scope.clone());
                    self.condition(expr, scopes);
                    scopes.pop();
                    star.extend(right);
                }
                Some(C::Using(names)) => {
                    let names: Vec<String> = names
                        .iter()
                        .map(|n| name_parts(n).last().cloned().unwrap_or_default())
                        .collect();
                    for name in &names {
                        let sources = column_of_entries(&scope.entries, name);
                        self.filters.extend(sources);
                    }
                    star = merge_using(star, right, &names, &mut self.filters);
                }
                Some(C::Natural) => {
                    let left_names: Vec<&String> =
                        star.iter().filter_map(|o| o.name.as_ref()).collect();
                    let common: Vec<String> = right
                        .iter()
                        .filter_map(|o| o.name.clone())
                        .filter(|n| left_names.contains(&n))
                        .collect();
                    if star
                        .iter()
                        .chain(&right)
                        .any(|o| o.is_many() || o.name.is_none())
                    {
                        // Which columns are common is unknown: all of them may be.
                        self.filters.extend(all_sources(&star));
                        self.filters.extend(all_sources(&right));
                    }
                    for name in &common {
                        for out in star.iter().chain(&right) {
                            if out.name.as_ref() == Some(name) {
                                self.filters.extend(out.sources().iter().copied());
                            }
                        }
                    }
                    star = merge_using(star, right, &common, &mut self.filters);
                }
                Some(C::None) | None => star.extend(right),
            }
        }
        scope.star.extend(star);
    }

    /// A FROM item: pushes its entries into `scope`, returns what `*` gives for it.
    fn table_factor(
        &mut self,
        factor: &TableFactor,
        scope: &mut Scope,
        scopes: &mut Vec<Scope>,
    ) -> Vec<Out> {
        let entry = match factor {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => {
                let parts = name_parts(name);
                let relname = parts.last().cloned().unwrap_or_default();
                let alias_name = alias
                    .as_ref()
                    .map(|a| normalise(&a.name))
                    .unwrap_or_else(|| relname.clone());
                let alias_columns = alias
                    .as_ref()
                    .map(|a| a.columns.as_slice())
                    .unwrap_or_default();
                // A CTE of that name shadows a table.
                let cte = match parts.len() {
                    1 => Self::cte(scopes, &relname),
                    _ => None,
                };
                match cte {
                    Some(outputs) => Entry::from_outputs(alias_name, outputs, alias_columns),
                    None => {
                        let candidates = self.candidates(name);
                        if candidates.is_empty() {
                            Entry::unknown(alias_name, alias_columns)
                        } else {
                            Entry::relation(alias_name, &candidates, alias_columns)
                        }
                    }
                }
            }
            TableFactor::Table {
                name,
                alias,
                args: Some(args),
                ..
            } => {
                // Functions in FROM see the items before them (implicitly LATERAL).
                scopes.push(scope.clone());
                let mut sources = self.arguments(&args.args, false, scopes);
                if let Some(settings) = &args.settings {
                    sources.extend(self.scan(settings, None, scopes));
                }
                scopes.pop();
                let relname = name_parts(name).last().cloned().unwrap_or_default();
                Entry::function(alias.as_ref(), relname, sources)
            }
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
                ..
            } => {
                let outputs = if *lateral {
                    scopes.push(scope.clone());
                    let outputs = self.query(subquery, scopes);
                    scopes.pop();
                    outputs
                } else {
                    self.query(subquery, scopes)
                };
                let alias_name = alias
                    .as_ref()
                    .map(|a| normalise(&a.name))
                    .unwrap_or_default();
                let alias_columns = alias
                    .as_ref()
                    .map(|a| a.columns.as_slice())
                    .unwrap_or_default();
                Entry::from_outputs(alias_name, outputs, alias_columns)
            }
            TableFactor::Function {
                name, args, alias, ..
            } => {
                scopes.push(scope.clone());
                let sources = self.arguments(args, false, scopes);
                scopes.pop();
                let relname = name_parts(name).last().cloned().unwrap_or_default();
                Entry::function(alias.as_ref(), relname, sources)
            }
            TableFactor::UNNEST {
                alias, array_exprs, ..
            } => {
                scopes.push(scope.clone());
                let mut sources = Sources::new();
                for expr in array_exprs {
                    sources.extend(self.value(expr, scopes));
                }
                scopes.pop();
                Entry::function(alias.as_ref(), "unnest".into(), sources)
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                let mut inner = Scope::default();
                scopes.push(scope.clone());
                self.add_from_item(table_with_joins, &mut inner, scopes);
                scopes.pop();
                match alias {
                    // `(a JOIN b) AS j`: only `j` is visible.
                    Some(alias) => {
                        Entry::from_outputs(normalise(&alias.name), inner.star, &alias.columns)
                    }
                    None => {
                        scope.entries.extend(inner.entries);
                        return inner.star;
                    }
                }
            }
            other => {
                // Table functions of other shapes (JSON_TABLE, XMLTABLE, PIVOT …):
                // every column from everything they mention.
                scopes.push(scope.clone());
                let sources = self.scan(other, None, scopes);
                scopes.pop();
                let alias = match other {
                    TableFactor::TableFunction { alias, .. }
                    | TableFactor::JsonTable { alias, .. }
                    | TableFactor::OpenJsonTable { alias, .. }
                    | TableFactor::Pivot { alias, .. }
                    | TableFactor::Unpivot { alias, .. }
                    | TableFactor::MatchRecognize { alias, .. }
                    | TableFactor::XmlTable { alias, .. }
                    | TableFactor::SemanticView { alias, .. } => alias.as_ref(),
                    _ => None,
                };
                Entry::function(alias, String::new(), sources)
            }
        };
        let star = entry.expansion.clone();
        scope.entries.push(entry);
        star
    }

    // ---- names -----------------------------------------------------------------

    /// The entries a qualifier (`alias` or `schema.table`) names, innermost scope
    /// first; `None` when none does.
    fn entries_named<'s>(parts: &[String], scopes: &'s [Scope]) -> Option<Vec<&'s Entry>> {
        for scope in scopes.iter().rev() {
            let found: Vec<&Entry> = scope
                .entries
                .iter()
                .filter(|e| match parts {
                    [alias] => e.alias == *alias,
                    [.., schema, table] => {
                        e.relations.iter().any(|(s, t)| s == schema && t == table)
                            || (e.alias == *table && e.relations.iter().any(|(s, _)| s == schema))
                    }
                    [] => false,
                })
                .collect();
            if !found.is_empty() {
                return Some(found);
            }
        }
        None
    }

    /// An unqualified column name: the innermost scope with an entry that has it, the
    /// union over all of that scope's entries that do. Entries whose columns are not
    /// all known add what such a column could hold and let the search go on.
    fn resolve_column(&self, name: &str, scopes: &[Scope]) -> Option<Sources> {
        let mut maybe = Sources::new();
        for scope in scopes.iter().rev() {
            let mut found: Option<Sources> = None;
            for entry in &scope.entries {
                match entry.column(name) {
                    Some(sources) => found.get_or_insert_with(Sources::new).extend(sources),
                    None => {
                        if let Some(open) = &entry.open {
                            maybe.extend(open.iter().copied());
                        }
                    }
                }
            }
            if let Some(mut sources) = found {
                sources.extend(maybe);
                return Some(sources);
            }
        }
        None
    }

    /// The protected column a select-list item holds unchanged: a plain reference
    /// (`phone`, `c.phone`) that can only mean a column of one table of the innermost
    /// FROM list that has it (no other entry there has that name or could have it).
    fn copied_column(expr: &Expr, scopes: &[Scope]) -> Option<ColumnId> {
        let (qualifier, name) = match strip_nested(expr) {
            Expr::Identifier(ident) => (None, normalise(ident)),
            Expr::CompoundIdentifier(idents) => match idents.as_slice() {
                [alias, column] => (Some(normalise(alias)), normalise(column)),
                _ => return None,
            },
            _ => return None,
        };
        let scope = scopes.last()?;
        let candidates: Vec<&Entry> = match &qualifier {
            Some(alias) => scope.entries.iter().filter(|e| e.alias == *alias).collect(),
            None => {
                if scope
                    .entries
                    .iter()
                    .any(|e| e.open.is_some() && e.column(&name).is_none())
                {
                    return None;
                }
                scope
                    .entries
                    .iter()
                    .filter(|e| e.column(&name).is_some())
                    .collect()
            }
        };
        let [entry] = candidates.as_slice() else {
            return None;
        };
        let mut copies = entry.copies.iter().filter(|(column, _)| *column == name);
        match (copies.next(), copies.next()) {
            (Some((_, id)), None) => Some(*id),
            _ => None,
        }
    }

    /// What a (possibly qualified) name refers to; `None`: nothing in scope.
    fn resolve(&self, parts: &[String], scopes: &[Scope]) -> Option<Sources> {
        match parts {
            [] => None,
            [name] => {
                if let Some(sources) = self.resolve_column(name, scopes) {
                    return Some(sources);
                }
                // Not a column: a whole-row reference to an entry of that name.
                let open = scopes
                    .iter()
                    .flat_map(|s| s.entries.iter())
                    .filter_map(|e| e.open.as_ref())
                    .fold(None, |acc: Option<Sources>, open| {
                        let mut acc = acc.unwrap_or_default();
                        acc.extend(open.iter().copied());
                        Some(acc)
                    });
                match Self::entries_named(std::slice::from_ref(name), scopes) {
                    Some(entries) => {
                        let mut sources = open.unwrap_or_default();
                        for entry in entries {
                            sources.extend(entry.whole());
                        }
                        Some(sources)
                    }
                    None => open,
                }
            }
            [first, second, rest @ ..] => {
                // schema.table.column
                if let (Some(column), false) = (rest.first(), rest.is_empty()) {
                    if let Some(entries) =
                        Self::entries_named(&[first.clone(), second.clone()], scopes)
                    {
                        return Some(columns_of(&entries, column));
                    }
                }
                // alias.column (.field …)
                if let Some(entries) = Self::entries_named(std::slice::from_ref(first), scopes) {
                    return Some(columns_of(&entries, second));
                }
                // column.field: a field of a composite column (or of a whole row).
                self.resolve(std::slice::from_ref(first), scopes)
            }
        }
    }

    /// A whole row named by `alias.*` (or `schema.table.*`).
    fn whole_row(&self, name: &ObjectName, scopes: &[Scope]) -> Sources {
        let parts = name_parts(name);
        match Self::entries_named(&parts, scopes) {
            Some(entries) => entries.iter().flat_map(|e| e.whole()).collect(),
            None => self.resolve(&parts, scopes).unwrap_or_default(),
        }
    }

    /// `*` as a function argument: every row of the innermost FROM list.
    fn every_row(scopes: &[Scope]) -> Sources {
        scopes
            .last()
            .map(|s| s.entries.iter().flat_map(Entry::whole).collect())
            .unwrap_or_default()
    }

    fn named_window(name: &Ident, scopes: &[Scope]) -> Sources {
        let name = normalise(name);
        scopes
            .iter()
            .rev()
            .flat_map(|s| s.windows.iter())
            .find(|(n, _)| *n == name)
            .map(|(_, sources)| sources.clone())
            .unwrap_or_default()
    }

    // ---- expressions -----------------------------------------------------------

    /// The protected columns a value is computed from.
    fn value(&mut self, expr: &Expr, scopes: &mut Vec<Scope>) -> Sources {
        match expr {
            Expr::Identifier(ident) => self
                .resolve(&[normalise(ident)], scopes)
                .unwrap_or_default(),
            Expr::CompoundIdentifier(idents) => {
                let parts: Vec<String> = idents.iter().map(normalise).collect();
                self.resolve(&parts, scopes).unwrap_or_default()
            }
            Expr::Wildcard(_) => Self::every_row(scopes),
            Expr::QualifiedWildcard(name, _) => self.whole_row(name, scopes),
            Expr::Value(_) => Sources::new(),
            Expr::Nested(inner) => self.value(inner, scopes),
            // Allow-list: whether a value is NULL reveals nothing about it.
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
                // Still walked: a subquery in it has conditions of its own.
                let _ = self.value(inner, scopes);
                Sources::new()
            }
            Expr::BinaryOp { left, right, .. } => {
                let mut sources = self.value(left, scopes);
                sources.extend(self.value(right, scopes));
                sources
            }
            Expr::UnaryOp { expr: inner, .. } => self.value(inner, scopes),
            Expr::Cast {
                expr: inner,
                format,
                ..
            } => {
                let mut sources = self.value(inner, scopes);
                if let Some(format) = format {
                    sources.extend(self.scan(format, None, scopes));
                }
                sources
            }
            Expr::Function(function) => self.function(function, scopes),
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                let mut sources = Sources::new();
                if let Some(operand) = operand {
                    // `CASE x WHEN v …` tests x = v.
                    let tested = self.value(operand, scopes);
                    self.filters.extend(tested.iter().copied());
                    sources.extend(tested);
                }
                for when in conditions {
                    if operand.is_some() {
                        let tested = self.value(&when.condition, scopes);
                        self.filters.extend(tested.iter().copied());
                        sources.extend(tested);
                    } else {
                        sources.extend(self.condition(&when.condition, scopes));
                    }
                    sources.extend(self.value(&when.result, scopes));
                }
                if let Some(result) = else_result {
                    sources.extend(self.value(result, scopes));
                }
                sources
            }
            Expr::Exists { subquery, .. } => {
                // Its conditions count (as filters, in the walk); its values do not.
                let _ = self.query(subquery, scopes);
                Sources::new()
            }
            Expr::Subquery(query) => all_sources(&self.query(query, scopes)),
            Expr::InSubquery {
                expr: inner,
                subquery,
                ..
            } => {
                let mut sources = self.value(inner, scopes);
                sources.extend(all_sources(&self.query(subquery, scopes)));
                sources
            }
            Expr::InList {
                expr: inner, list, ..
            } => {
                let mut sources = self.value(inner, scopes);
                for item in list {
                    sources.extend(self.value(item, scopes));
                }
                sources
            }
            Expr::Between {
                expr: inner,
                low,
                high,
                ..
            } => {
                let mut sources = self.value(inner, scopes);
                sources.extend(self.value(low, scopes));
                sources.extend(self.value(high, scopes));
                sources
            }
            Expr::Like {
                expr: inner,
                pattern,
                escape_char,
                ..
            }
            | Expr::ILike {
                expr: inner,
                pattern,
                escape_char,
                ..
            }
            | Expr::SimilarTo {
                expr: inner,
                pattern,
                escape_char,
                ..
            } => {
                let mut sources = self.value(inner, scopes);
                sources.extend(self.value(pattern, scopes));
                if let Some(escape) = escape_char {
                    sources.extend(self.value(escape, scopes));
                }
                sources
            }
            Expr::IsDistinctFrom(left, right) | Expr::IsNotDistinctFrom(left, right) => {
                let mut sources = self.value(left, scopes);
                sources.extend(self.value(right, scopes));
                sources
            }
            Expr::CompoundFieldAccess { root, access_chain } => {
                self.field_access(root, access_chain, scopes)
            }
            // Anything else: everything it contains.
            other => self.scan(other, Some(other), scopes),
        }
    }

    /// `(x).f[…]…`: a field of a whole row is that column; anything else, everything
    /// mentioned.
    fn field_access(
        &mut self,
        root: &Expr,
        access_chain: &[AccessExpr],
        scopes: &mut Vec<Scope>,
    ) -> Sources {
        let field = match (strip_nested(root), access_chain.first()) {
            (Expr::Identifier(row), Some(AccessExpr::Dot(Expr::Identifier(field)))) => {
                let row = normalise(row);
                match self.resolve_column(&row, scopes) {
                    // A composite column: all of it.
                    Some(_) => None,
                    None => Self::entries_named(std::slice::from_ref(&row), scopes)
                        .map(|entries| columns_of(&entries, &normalise(field))),
                }
            }
            _ => None,
        };
        let mut sources = match field {
            Some(sources) => sources,
            None => self.value(root, scopes),
        };
        for access in access_chain {
            match access {
                // Field names are not values.
                AccessExpr::Dot(Expr::Identifier(_)) => {}
                other => sources.extend(self.scan(other, None, scopes)),
            }
        }
        sources
    }

    /// Arguments of a function (or a table function): each argument's sources, except
    /// for `count` without DISTINCT over a plain column or a whole row (allow-listed).
    fn arguments(
        &mut self,
        args: &[FunctionArg],
        is_count: bool,
        scopes: &mut Vec<Scope>,
    ) -> Sources {
        let mut sources = Sources::new();
        for arg in args {
            let arg_expr = match arg {
                FunctionArg::Named { arg, .. }
                | FunctionArg::ExprNamed { arg, .. }
                | FunctionArg::Unnamed(arg) => arg,
            };
            let arg_sources = match arg_expr {
                FunctionArgExpr::Expr(expr) => {
                    let value = self.value(expr, scopes);
                    if is_count && is_plain_reference(expr) {
                        Sources::new()
                    } else {
                        value
                    }
                }
                FunctionArgExpr::QualifiedWildcard(_) | FunctionArgExpr::Wildcard if is_count => {
                    Sources::new()
                }
                FunctionArgExpr::QualifiedWildcard(name) => self.whole_row(name, scopes),
                FunctionArgExpr::Wildcard | FunctionArgExpr::WildcardWithOptions(_) => {
                    Self::every_row(scopes)
                }
            };
            sources.extend(arg_sources);
        }
        sources
    }

    fn function(&mut self, function: &Function, scopes: &mut Vec<Scope>) -> Sources {
        let name = name_parts(&function.name);
        let is_count = name.last().is_some_and(|n| n == "count")
            && (name.len() == 1 || name.first().is_some_and(|s| s == "pg_catalog"));
        let mut sources = Sources::new();
        match &function.args {
            FunctionArguments::List(list) => {
                // count(DISTINCT x) counts distinct values: they count.
                let distinct = list.duplicate_treatment == Some(DuplicateTreatment::Distinct);
                sources.extend(self.arguments(&list.args, is_count && !distinct, scopes));
                for clause in &list.clauses {
                    match clause {
                        FunctionArgumentClause::OrderBy(items) => {
                            for item in items {
                                let ordered = self.value(&item.expr, scopes);
                                self.filters.extend(ordered.iter().copied());
                                sources.extend(ordered);
                            }
                        }
                        FunctionArgumentClause::Where(condition) => {
                            sources.extend(self.condition(condition, scopes));
                        }
                        other => sources.extend(self.scan(other, None, scopes)),
                    }
                }
            }
            FunctionArguments::Subquery(query) => {
                sources.extend(all_sources(&self.query(query, scopes)));
            }
            FunctionArguments::None => {}
        }
        if !matches!(function.parameters, FunctionArguments::None) {
            sources.extend(self.scan(&function.parameters, None, scopes));
        }
        if let Some(filter) = &function.filter {
            sources.extend(self.condition(filter, scopes));
        }
        if let Some(over) = &function.over {
            // The partition and order of a window show in its results.
            let window = match over {
                WindowType::WindowSpec(spec) => self.window_spec(spec, scopes),
                WindowType::NamedWindow(name) => Self::named_window(name, scopes),
            };
            self.filters.extend(window.iter().copied());
            sources.extend(window);
        }
        for item in &function.within_group {
            let ordered = self.value(&item.expr, scopes);
            self.filters.extend(ordered.iter().copied());
            sources.extend(ordered);
        }
        sources
    }

    fn window_spec(&mut self, spec: &WindowSpec, scopes: &mut Vec<Scope>) -> Sources {
        let mut sources = spec
            .window_name
            .as_ref()
            .map(|name| Self::named_window(name, scopes))
            .unwrap_or_default();
        for expr in &spec.partition_by {
            sources.extend(self.value(expr, scopes));
        }
        for item in &spec.order_by {
            sources.extend(self.value(&item.expr, scopes));
        }
        if let Some(frame) = &spec.window_frame {
            sources.extend(self.scan(frame, None, scopes));
        }
        sources
    }

    /// A condition (WHERE, ON, HAVING, FILTER, CASE WHEN …): its sources count as
    /// filters, except `x IS [NOT] NULL`; AND, OR and NOT are judged operand by
    /// operand. Returns what it counted.
    fn condition(&mut self, expr: &Expr, scopes: &mut Vec<Scope>) -> Sources {
        match expr {
            Expr::Nested(inner) => self.condition(inner, scopes),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And | BinaryOperator::Or,
                right,
            } => {
                let mut sources = self.condition(left, scopes);
                sources.extend(self.condition(right, scopes));
                sources
            }
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr: inner,
            } => self.condition(inner, scopes),
            other => {
                let sources = self.value(other, scopes);
                self.filters.extend(sources.iter().copied());
                sources
            }
        }
    }

    /// Any syntax not modelled: the union of everything inside it, each expression and
    /// query walked in full. `root`: `node` itself when it is an expression.
    fn scan<V: Visit>(
        &mut self,
        node: &V,
        root: Option<&Expr>,
        scopes: &mut Vec<Scope>,
    ) -> Sources {
        let mut finder = Children {
            root: root.map(std::ptr::from_ref),
            inside_expr: None,
            inside_query: None,
            exprs: Vec::new(),
            queries: Vec::new(),
        };
        let _ = node.visit(&mut finder);
        let mut sources = Sources::new();
        for expr in &finder.exprs {
            sources.extend(self.value(expr, scopes));
        }
        for query in &finder.queries {
            sources.extend(all_sources(&self.query(query, scopes)));
        }
        sources
    }

    // ---- writes ----------------------------------------------------------------

    /// What a write into `column` of the target relation stores elsewhere: only what
    /// every candidate relation would already hold in that column is not a leak.
    fn target_column(candidates: &[Arc<ProtectedRelation>], column: &str) -> Sources {
        intersection(candidates.iter().map(|relation| {
            relation
                .columns
                .iter()
                .filter(|c| c.name == column)
                .flat_map(|c| c.sources.iter().copied())
                .collect()
        }))
    }

    fn target_position(candidates: &[Arc<ProtectedRelation>], index: usize) -> Sources {
        intersection(candidates.iter().map(|relation| {
            relation
                .columns
                .get(index)
                .map(|c| c.sources.clone())
                .unwrap_or_default()
        }))
    }

    fn insert(&mut self, insert: &Insert, scopes: &mut Vec<Scope>) -> Vec<Out> {
        let TableObject::TableName(name) = &insert.table else {
            self.other(insert);
            let sources = self.scan(insert, None, scopes);
            self.stored.extend(sources);
            return Vec::new();
        };
        let candidates = self.candidates(name);
        let columns: Vec<String> = insert
            .columns
            .iter()
            .map(|c| name_parts(c).last().cloned().unwrap_or_default())
            .collect();
        // The sources of the value written into each target position.
        let mut written: Vec<Sources> = Vec::new();
        let mut spread = None;
        if let Some(source) = &insert.source {
            let outputs = self.query(source, scopes);
            if outputs.iter().any(Out::is_many) {
                let all = all_sources(&outputs);
                self.stored.extend(all.iter().copied());
                spread = Some(all);
            } else {
                for (index, output) in outputs.iter().enumerate() {
                    let target = match columns.get(index) {
                        Some(column) => Self::target_column(&candidates, column),
                        None if columns.is_empty() => Self::target_position(&candidates, index),
                        // More values than columns: the server refuses.
                        None => Sources::new(),
                    };
                    self.stored
                        .extend(output.sources().difference(&target).copied());
                    written.push(output.sources().clone());
                }
            }
        }
        for assignment in &insert.assignments {
            // MySQL's INSERT … SET: like UPDATE.
            let sources = self.value(&assignment.value, scopes);
            self.stored.extend(sources);
        }
        let alias = insert
            .table_alias
            .as_ref()
            .map(|a| normalise(&a.alias))
            .unwrap_or_else(|| name_parts(name).last().cloned().unwrap_or_default());
        let target = if candidates.is_empty() {
            Entry::unknown(alias, &[])
        } else {
            Entry::relation(alias, &candidates, &[])
        };
        match &insert.on {
            Some(OnInsert::OnConflict(conflict)) => {
                if let OnConflictAction::DoUpdate(update) = &conflict.action {
                    // EXCLUDED.c is the value the INSERT meant to write into c.
                    let target_names: Vec<String> = if columns.is_empty() {
                        candidates
                            .first()
                            .map(|r| r.columns.iter().map(|c| c.name.clone()).collect())
                            .unwrap_or_default()
                    } else {
                        columns.clone()
                    };
                    let mut excluded = Entry {
                        alias: "excluded".into(),
                        ..Entry::default()
                    };
                    for (index, sources) in written.iter().enumerate() {
                        match target_names.get(index) {
                            Some(name) => excluded.columns.push((name.clone(), sources.clone())),
                            None => excluded
                                .open
                                .get_or_insert_with(Sources::new)
                                .extend(sources.iter().copied()),
                        }
                    }
                    let uncertain = candidates.len() != 1 && columns.is_empty();
                    if let Some(all) = spread.clone() {
                        excluded.open.get_or_insert_with(Sources::new).extend(all);
                    }
                    if uncertain || candidates.is_empty() {
                        let all: Sources = written.iter().flatten().copied().collect();
                        excluded.open.get_or_insert_with(Sources::new).extend(all);
                    }
                    excluded.expansion = vec![Out::many(excluded.whole())];
                    scopes.push(Scope {
                        entries: vec![target.clone(), excluded],
                        ..Scope::default()
                    });
                    self.assignments(&update.assignments, &candidates, scopes);
                    if let Some(selection) = &update.selection {
                        self.condition(selection, scopes);
                    }
                    scopes.pop();
                }
            }
            Some(OnInsert::DuplicateKeyUpdate(assignments)) => {
                scopes.push(Scope {
                    entries: vec![target.clone()],
                    ..Scope::default()
                });
                self.assignments(assignments, &candidates, scopes);
                scopes.pop();
            }
            Some(other) => {
                let sources = self.scan(other, None, scopes);
                self.stored.extend(sources);
            }
            None => {}
        }
        match &insert.returning {
            Some(returning) => {
                let star = target.expansion.clone();
                scopes.push(Scope {
                    entries: vec![target],
                    star,
                    ..Scope::default()
                });
                let outputs = self.projection(returning, scopes);
                scopes.pop();
                outputs
            }
            None => Vec::new(),
        }
    }

    /// SET assignments of an UPDATE (or ON CONFLICT DO UPDATE) on `candidates`, with
    /// the statement's scope pushed.
    fn assignments(
        &mut self,
        assignments: &[Assignment],
        candidates: &[Arc<ProtectedRelation>],
        scopes: &mut Vec<Scope>,
    ) {
        for assignment in assignments {
            match &assignment.target {
                AssignmentTarget::ColumnName(name) => {
                    let column = name_parts(name).last().cloned().unwrap_or_default();
                    let sources = self.value(&assignment.value, scopes);
                    let target = Self::target_column(candidates, &column);
                    self.stored.extend(sources.difference(&target).copied());
                }
                AssignmentTarget::Tuple(names) => {
                    let columns: Vec<String> = names
                        .iter()
                        .map(|n| name_parts(n).last().cloned().unwrap_or_default())
                        .collect();
                    let values: Option<Vec<Sources>> = match strip_nested(&assignment.value) {
                        Expr::Tuple(items) if items.len() == columns.len() => {
                            Some(items.iter().map(|item| self.value(item, scopes)).collect())
                        }
                        Expr::Subquery(query) => {
                            let outputs = self.query(query, scopes);
                            if outputs.len() == columns.len() && !outputs.iter().any(Out::is_many) {
                                Some(outputs.iter().map(|o| o.sources().clone()).collect())
                            } else {
                                self.stored.extend(all_sources(&outputs));
                                None
                            }
                        }
                        other => {
                            // Not matched position by position: everything counts.
                            let sources = self.value(other, scopes);
                            self.stored.extend(sources);
                            None
                        }
                    };
                    for (column, sources) in columns.iter().zip(values.iter().flatten()) {
                        let target = Self::target_column(candidates, column);
                        self.stored.extend(sources.difference(&target).copied());
                    }
                }
            }
        }
    }

    fn update(&mut self, update: &Update, scopes: &mut Vec<Scope>) -> Vec<Out> {
        let mut scope = Scope::default();
        self.add_from_item(&update.table, &mut scope, scopes);
        let candidates = match &update.table.relation {
            TableFactor::Table { name, .. } => self.candidates(name),
            _ => Vec::new(),
        };
        if let Some(
            UpdateTableFromKind::BeforeSet(tables) | UpdateTableFromKind::AfterSet(tables),
        ) = &update.from
        {
            for table in tables {
                self.add_from_item(table, &mut scope, scopes);
            }
        }
        scopes.push(scope);
        self.assignments(&update.assignments, &candidates, scopes);
        if let Some(selection) = &update.selection {
            self.condition(selection, scopes);
        }
        for item in &update.order_by {
            let sources = self.value(&item.expr, scopes);
            self.filters.extend(sources);
        }
        if let Some(limit) = &update.limit {
            let sources = self.value(limit, scopes);
            self.filters.extend(sources);
        }
        let outputs = match &update.returning {
            Some(returning) => self.projection(returning, scopes),
            None => Vec::new(),
        };
        scopes.pop();
        outputs
    }

    fn delete(&mut self, delete: &Delete, scopes: &mut Vec<Scope>) -> Vec<Out> {
        let mut scope = Scope::default();
        let tables = match &delete.from {
            FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables) => tables,
        };
        for table in tables.iter().chain(delete.using.iter().flatten()) {
            self.add_from_item(table, &mut scope, scopes);
        }
        scopes.push(scope);
        if let Some(selection) = &delete.selection {
            self.condition(selection, scopes);
        }
        for item in &delete.order_by {
            let sources = self.value(&item.expr, scopes);
            self.filters.extend(sources);
        }
        if let Some(limit) = &delete.limit {
            let sources = self.value(limit, scopes);
            self.filters.extend(sources);
        }
        let outputs = match &delete.returning {
            Some(returning) => self.projection(returning, scopes),
            None => Vec::new(),
        };
        scopes.pop();
        outputs
    }

    /// COPY … TO: a server file or program stores what it copies; STDOUT is described.
    /// COPY … FROM is not this module's business (it reads nothing).
    fn copy(
        &mut self,
        source: &CopySource,
        to: bool,
        target: &CopyTarget,
        options: &[CopyOption],
        legacy_options: &[CopyLegacyOption],
        scopes: &mut Vec<Scope>,
    ) -> Option<CopyOut> {
        if !to {
            return None;
        }
        // Only the columns of a table named by COPY are known to be plain copies: a
        // query's result columns may be computed (a mask of a computed value could
        // reveal what the column's own mask hides).
        let mut copies = Vec::new();
        let columns: Vec<OutputColumn> = match source {
            CopySource::Query(query) => {
                let outputs = self.query(query, scopes);
                copies = outputs.iter().map(|o| o.copy).collect();
                outputs.into_iter().map(|o| o.column).collect()
            }
            CopySource::Table {
                table_name,
                columns,
            } => {
                let candidates = self.candidates(table_name);
                if candidates.is_empty() {
                    if columns.is_empty() {
                        vec![OutputColumn::Many(Sources::new())]
                    } else {
                        columns
                            .iter()
                            .map(|_| OutputColumn::One(Sources::new()))
                            .collect()
                    }
                } else if columns.is_empty() {
                    if let [table] = candidates.as_slice() {
                        if !table.is_view {
                            copies = table
                                .columns
                                .iter()
                                .filter(|c| !c.generated)
                                .map(single_source)
                                .collect();
                        }
                    }
                    copied_columns(&candidates)
                } else {
                    if let [table] = candidates.as_slice() {
                        if !table.is_view {
                            copies = columns
                                .iter()
                                .map(|column| {
                                    let name = normalise(column);
                                    table
                                        .columns
                                        .iter()
                                        .find(|c| c.name == name)
                                        .and_then(single_source)
                                })
                                .collect();
                        }
                    }
                    columns
                        .iter()
                        .map(|column| {
                            let name = normalise(column);
                            OutputColumn::One(
                                candidates
                                    .iter()
                                    .flat_map(|r| r.columns.iter())
                                    .filter(|c| c.name == name)
                                    .flat_map(|c| c.sources.iter().copied())
                                    .collect(),
                            )
                        })
                        .collect()
                }
            }
        };
        match target {
            CopyTarget::Stdout => {
                copies.resize(columns.len(), None);
                Some(CopyOut {
                    format: copy_data_format(options, legacy_options, CopyDirection::To),
                    columns,
                    copies,
                })
            }
            CopyTarget::File { .. } | CopyTarget::Program { .. } => {
                for column in &columns {
                    self.stored.extend(column.sources().iter().copied());
                }
                None
            }
            CopyTarget::Stdin => None,
        }
    }
}

/// The protected column a table column holds, when it holds exactly one.
fn single_source(column: &RelationColumn) -> Option<ColumnId> {
    match column.sources.iter().collect::<Vec<_>>().as_slice() {
        [only] => Some(**only),
        _ => None,
    }
}

/// The columns COPY without a column list sends: every non-generated column.
fn copied_columns(candidates: &[Arc<ProtectedRelation>]) -> Vec<OutputColumn> {
    let lists: Vec<Vec<&RelationColumn>> = candidates
        .iter()
        .map(|r| r.columns.iter().filter(|c| !c.generated).collect())
        .collect();
    let same = lists.windows(2).all(|pair| {
        pair[0].len() == pair[1].len()
            && pair[0].iter().zip(&pair[1]).all(|(a, b)| a.name == b.name)
    });
    match lists.first() {
        Some(first) if same => (0..first.len())
            .map(|index| {
                OutputColumn::One(
                    lists
                        .iter()
                        .filter_map(|l| l.get(index))
                        .flat_map(|c| c.sources.iter().copied())
                        .collect(),
                )
            })
            .collect(),
        _ => vec![OutputColumn::Many(
            lists
                .iter()
                .flatten()
                .flat_map(|c| c.sources.iter().copied())
                .collect(),
        )],
    }
}

fn intersection(mut sets: impl Iterator<Item = Sources>) -> Sources {
    let Some(first) = sets.next() else {
        return Sources::new();
    };
    sets.fold(first, |acc, set| acc.intersection(&set).copied().collect())
}

/// The sources of result column `position` (1-based); when a run of unknown length
/// comes first (or the position is out of range), of any.
fn positional(outputs: &[Out], position: usize) -> Sources {
    let Some(index) = position.checked_sub(1) else {
        return all_sources(outputs);
    };
    for (i, output) in outputs.iter().enumerate() {
        if output.is_many() {
            return all_sources(outputs);
        }
        if i == index {
            return output.sources().clone();
        }
    }
    all_sources(outputs)
}

/// Sources of the columns of `entries` named `name` (or of what they may hold).
fn columns_of(entries: &[&Entry], name: &str) -> Sources {
    let mut sources = Sources::new();
    for entry in entries {
        match entry.column(name) {
            Some(found) => sources.extend(found),
            None => {
                if let Some(open) = &entry.open {
                    sources.extend(open.iter().copied());
                }
            }
        }
    }
    sources
}

fn column_of_entries(entries: &[Entry], name: &str) -> Sources {
    let refs: Vec<&Entry> = entries.iter().collect();
    columns_of(&refs, name)
}

/// The star of `left JOIN right USING (names)`: the merged columns first, then the
/// rest of each side. Filters get everything when the columns cannot be matched.
fn merge_using(
    left: Vec<Out>,
    right: Vec<Out>,
    names: &[String],
    filters: &mut Sources,
) -> Vec<Out> {
    if names.is_empty() {
        let mut star = left;
        star.extend(right);
        return star;
    }
    if left
        .iter()
        .chain(&right)
        .any(|o| o.is_many() || o.name.is_none())
    {
        let mut all = all_sources(&left);
        all.extend(all_sources(&right));
        filters.extend(all.iter().copied());
        return vec![Out::many(all)];
    }
    let mut merged = Vec::new();
    let mut left_rest = left;
    let mut right_rest = right;
    for name in names {
        let mut sources = Sources::new();
        for side in [&mut left_rest, &mut right_rest] {
            if let Some(index) = side.iter().position(|o| o.name.as_ref() == Some(name)) {
                sources.extend(side.remove(index).sources().iter().copied());
            }
        }
        merged.push(Out::one(Some(name.clone()), sources));
    }
    merged.extend(left_rest);
    merged.extend(right_rest);
    merged
}

/// The placeholder of a recursive CTE not computed yet: nothing known.
fn placeholder(cte: &Cte) -> Vec<Out> {
    if cte.alias.columns.is_empty() {
        vec![Out::many(Sources::new())]
    } else {
        cte.alias
            .columns
            .iter()
            .map(|c| Out::one(Some(normalise(&c.name)), Sources::new()))
            .collect()
    }
}

fn strip_nested(expr: &Expr) -> &Expr {
    match expr {
        Expr::Nested(inner) => strip_nested(inner),
        other => other,
    }
}

/// A column reference or whole-row reference as it stands (`count(col)`).
fn is_plain_reference(expr: &Expr) -> bool {
    matches!(
        strip_nested(expr),
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) | Expr::QualifiedWildcard(..)
    )
}

/// The name PostgreSQL gives a result column without an alias, where it is certain:
/// a column's name, a function's name, `case`; `None` otherwise.
fn column_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(ident) => Some(normalise(ident)),
        Expr::CompoundIdentifier(idents) => idents.last().map(normalise),
        Expr::Function(function) => name_parts(&function.name).last().cloned(),
        Expr::Cast { expr: inner, .. } | Expr::Nested(inner) => column_name(inner),
        Expr::Case { .. } => Some("case".into()),
        Expr::CompoundFieldAccess { access_chain, .. } => match access_chain.last() {
            Some(AccessExpr::Dot(Expr::Identifier(field))) => Some(normalise(field)),
            _ => None,
        },
        _ => None,
    }
}

/// Collects the outermost expressions and queries inside a node (not the node
/// itself), each to be walked on its own.
struct Children {
    root: Option<*const Expr>,
    inside_expr: Option<*const Expr>,
    inside_query: Option<*const Query>,
    exprs: Vec<Expr>,
    queries: Vec<Query>,
}

impl Children {
    fn outside(&self) -> bool {
        self.inside_expr.is_none() && self.inside_query.is_none()
    }
}

impl Visitor for Children {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if self.outside() {
            self.queries.push(query.clone());
            self.inside_query = Some(std::ptr::from_ref(query));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if self.inside_query == Some(std::ptr::from_ref(query)) {
            self.inside_query = None;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        let pointer = std::ptr::from_ref(expr);
        if self.outside() && self.root != Some(pointer) {
            self.exprs.push(expr.clone());
            self.inside_expr = Some(pointer);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if self.inside_expr == Some(std::ptr::from_ref(expr)) {
            self.inside_expr = None;
        }
        ControlFlow::Continue(())
    }
}

/// The sources of each column of a result with `field_count` columns whose lineage is
/// `outputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldSources {
    /// Column by column.
    Exact(Vec<Sources>),
    /// The columns could not be matched one to one (several runs of unknown length, or
    /// a count that does not add up): every column may be computed from these.
    Any(Sources),
}

/// Matches `outputs` to the `field_count` columns of a RowDescription: exact when the
/// counts add up (at most one [`OutputColumn::Many`], which takes what the others leave).
pub fn field_sources(outputs: &[OutputColumn], field_count: usize) -> FieldSources {
    let fixed = outputs
        .iter()
        .filter(|o| matches!(o, OutputColumn::One(_)))
        .count();
    let runs = outputs.len() - fixed;
    let all: Sources = outputs
        .iter()
        .flat_map(|o| o.sources().iter().copied())
        .collect();
    match runs {
        0 if field_count == fixed => {
            FieldSources::Exact(outputs.iter().map(|o| o.sources().clone()).collect())
        }
        1 if field_count >= fixed => {
            let spread = field_count - fixed;
            let mut fields = Vec::with_capacity(field_count);
            for output in outputs {
                match output {
                    OutputColumn::One(sources) => fields.push(sources.clone()),
                    OutputColumn::Many(sources) => {
                        fields.extend(std::iter::repeat_n(sources.clone(), spread))
                    }
                }
            }
            FieldSources::Exact(fields)
        }
        // Nothing protected anywhere: where the runs split does not matter.
        _ if all.is_empty() => FieldSources::Exact(vec![Sources::new(); field_count]),
        _ => FieldSources::Any(all),
    }
}

#[cfg(test)]
mod tests;
