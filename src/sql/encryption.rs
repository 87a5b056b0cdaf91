//! What a statement does with encrypted columns, and how its text must change so the
//! database only ever receives ciphertext for them.
//!
//! The analysis walks the AST with the relations in scope and classifies every
//! reference to an encrypted column:
//! - a value written into one (INSERT … VALUES, UPDATE … SET, ON CONFLICT … DO UPDATE)
//!   must be a literal, a parameter, NULL or DEFAULT; the literal is marked for
//!   encryption, the parameter is recorded for the Bind; anything else is refused
//!   (42501), since the server would store what it computed in plaintext;
//! - equality with a literal or parameter (`=`, `<>`, `IN`) on a deterministic column
//!   is marked for encryption of the compared value (under every key of the keyring, so
//!   rows under older keys are still found);
//! - a plain reference in a result column, `IS [NOT] NULL` and `count(col)` pass;
//! - everything else that touches an encrypted column (ORDER BY, ranges, LIKE,
//!   functions, casts, arithmetic, equality on randomized encryption, set operations,
//!   whole-row references) cannot be answered correctly over ciphertext and is refused
//!   (0A000).
//!
//! It never encrypts anything itself (no keys here) and never fails open: a construct it
//! does not know that mentions an encrypted column is refused, not passed.

use std::collections::HashMap;
use std::ops::{ControlFlow, Range};
use std::sync::Arc;

use sqlparser::ast::{
    AssignmentTarget, BinaryOperator, CopyLegacyOption, CopyOption, CopySource, CopyTarget,
    Distinct, Expr, FromTable, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    ObjectName, ObjectNamePart, OnConflictAction, OnInsert, OrderBy, OrderByExpr, OrderByKind,
    Query, Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Spanned, Statement,
    TableFactor, TableObject, TableWithJoins, UnaryOperator, UpdateTableFromKind, Value, Visit,
    Visitor,
};

use super::{copy_data_format, name_parts, normalise, CopyDirection, Offsets};
use crate::policy::file::EncryptMode;
use crate::policy::{ColumnId, Policy};
use crate::wire::copy_out::CopyOutFormat;
use crate::wire::copy_rows::CopyFormat;

/// What a relation column holds, as far as encryption goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Plain,
    /// Ciphertext of this policy column (the column itself, a partition's or child's
    /// column, or a view column that copies it).
    Encrypted(ColumnId),
    /// A view column computed from the ciphertext of this column: meaningless.
    ComputedFromEncrypted(ColumnId),
}

impl Content {
    /// The encrypted column this holds or is computed from.
    fn column(self) -> Option<ColumnId> {
        match self {
            Content::Plain => None,
            Content::Encrypted(id) | Content::ComputedFromEncrypted(id) => Some(id),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RelationColumn {
    /// As the catalog spells it.
    pub name: String,
    pub content: Content,
    pub has_default: bool,
    /// A generated column: COPY without a column list leaves it out.
    pub generated: bool,
}

/// A relation with encrypted columns (or a view showing them), with every live column
/// in attribute order.
#[derive(Debug, Clone)]
pub struct EncryptedRelation {
    pub schema: String,
    pub name: String,
    pub is_view: bool,
    pub columns: Vec<RelationColumn>,
}

impl EncryptedRelation {
    fn column(&self, name: &str) -> Option<&RelationColumn> {
        self.columns.iter().find(|c| c.name == name)
    }

    fn first_encrypted(&self) -> Option<ColumnId> {
        self.columns.iter().find_map(|c| c.content.column())
    }
}

/// What the analysis knows: the policy and the relations with encrypted columns.
pub struct Knowledge<'a> {
    pub policy: &'a Policy,
    /// By `relname`.
    pub relations: &'a HashMap<String, Vec<Arc<EncryptedRelation>>>,
    /// The keyring holds one key: equal plaintexts have one ciphertext per column.
    pub single_key: bool,
}

/// A value compared with a deterministic column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// The literal's content (quotes removed, escapes resolved).
    Literal(String),
    /// `$n`.
    Param(u32),
}

/// One change to the statement text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// The literal at `range` is written into `column`: replace it by its ciphertext.
    Write {
        range: Range<usize>,
        column: ColumnId,
        value: String,
    },
    /// The literal or parameter at `range` stands in a list compared with `column`:
    /// replace it by the comma-separated ciphertexts under every key (for a parameter,
    /// `$n` followed by added parameters).
    ListItem {
        range: Range<usize>,
        column: ColumnId,
        operand: Operand,
    },
    /// `column = operand` (or `<>` when `negated`) at `range`, with the column's own
    /// text at `column_text`: becomes `column [NOT] IN (ciphertexts under every key)`.
    Comparison {
        range: Range<usize>,
        column_text: Range<usize>,
        negated: bool,
        column: ColumnId,
        operand: Operand,
    },
}

/// A parameter whose value belongs to an encrypted column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamUse {
    /// 1-based, as in `$1`.
    pub index: u32,
    pub column: ColumnId,
    /// Compared (encrypted under every key) rather than written (under the active key).
    pub lookup: bool,
}

/// A COPY … FROM STDIN into a relation with encrypted columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyIn {
    /// For each field of a row, the encrypted column it fills.
    pub fields: Vec<Option<ColumnId>>,
    pub format: CopyFormat,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub edits: Vec<Edit>,
    pub params: Vec<ParamUse>,
    pub copy_in: Option<CopyIn>,
    /// The highest `$n` the text uses (0 for none).
    pub highest_param: u32,
}

impl Analysis {
    pub fn changes_nothing(&self) -> bool {
        self.edits.is_empty() && self.params.is_empty() && self.copy_in.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// 0A000: cannot be answered correctly over ciphertext.
    Unsupported,
    /// 42501: would store plaintext in an encrypted column.
    WriteRefused,
    /// 42501: names a relation with encrypted columns but cannot be analysed.
    Unparseable,
}

/// Why a statement is refused. Messages name columns, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub column: Option<ColumnId>,
    pub message: String,
    pub hint: &'static str,
}

impl Refusal {
    pub fn sqlstate(&self) -> &'static str {
        match self.kind {
            RefusalKind::Unsupported => "0A000",
            RefusalKind::WriteRefused | RefusalKind::Unparseable => "42501",
        }
    }
}

type Checked<T> = Result<T, Box<Refusal>>;

/// Analyses every statement of `sql` (already known to name a relation with encrypted
/// columns).
pub fn analyse(sql: &str, knowledge: &Knowledge) -> Checked<Analysis> {
    let statements = super::parse(sql).map_err(|reason| {
        tracing::debug!(%reason, "statement naming an encrypted relation does not parse");
        Box::new(Refusal {
            kind: RefusalKind::Unparseable,
            column: None,
            message: "pgveil: cannot analyse a statement that names a table with encrypted columns"
                .into(),
            hint: "pgveil must understand every statement touching encrypted columns; simplify the statement or split it",
        })
    })?;
    let mut walker = Walker {
        knowledge,
        offsets: Offsets::new(sql),
        analysis: Analysis::default(),
        param_spans: Vec::new(),
    };
    for statement in &statements {
        walker.statement(statement)?;
    }
    walker.check_params(&statements)?;
    if let (Some(copy), true) = (&walker.analysis.copy_in, statements.len() > 1) {
        // The rows that follow belong to one COPY; with several statements pgveil
        // could not be sure which of them the server is reading data for.
        return Err(walker.unsupported(
            copy.fields
                .iter()
                .flatten()
                .next()
                .copied()
                .unwrap_or_default(),
            "COPY … FROM STDIN together with other statements in one query",
        ));
    }
    Ok(walker.analysis)
}

/// A relation or derived table in a FROM list.
#[derive(Debug, Clone)]
struct Entry {
    /// The alias, or the relation's own name.
    alias: String,
    relation: Option<Arc<EncryptedRelation>>,
    /// For derived tables and CTEs: their output columns.
    outputs: Vec<Output>,
}

impl Entry {
    fn column(&self, name: &str) -> Option<Content> {
        match &self.relation {
            Some(relation) => relation.column(name).map(|c| c.content),
            None => self
                .outputs
                .iter()
                .find(|o| o.name == name)
                .map(|o| o.content),
        }
    }

    fn first_encrypted(&self) -> Option<ColumnId> {
        match &self.relation {
            Some(relation) => relation.first_encrypted(),
            None => self.outputs.iter().find_map(|o| o.content.column()),
        }
    }

    fn all_outputs(&self) -> Vec<Output> {
        match &self.relation {
            Some(relation) => relation
                .columns
                .iter()
                .map(|c| Output {
                    name: c.name.clone(),
                    content: c.content,
                })
                .collect(),
            None => self.outputs.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Output {
    name: String,
    content: Content,
}

#[derive(Debug, Default, Clone)]
struct Scope {
    entries: Vec<Entry>,
    ctes: Vec<(String, Vec<Output>)>,
}

/// What an identifier refers to.
enum Resolved {
    Column(Content),
    /// A whole row of a relation with encrypted columns.
    WholeRow(ColumnId),
}

/// A value standing where an encrypted column is compared or written.
enum Term {
    Literal(String, Range<usize>),
    Param(u32, Range<usize>),
    Null,
    Default,
    Column(ColumnId, Range<usize>),
    Other(Content),
}

struct Walker<'k, 'a> {
    knowledge: &'k Knowledge<'a>,
    offsets: Offsets<'a>,
    analysis: Analysis,
    /// Spans of parameters consumed as encrypted values, per index.
    param_spans: Vec<(u32, Range<usize>)>,
}

fn is_comparison(op: &BinaryOperator) -> bool {
    matches!(
        op,
        BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
            | BinaryOperator::Spaceship
    )
}

const HINT_READ: &str = "encrypted columns can be selected, tested for NULL, counted, and (with `encrypt: deterministic`) compared for equality with a value; do other work on the decrypted values in the application";
const HINT_WRITE: &str = "write a literal, a parameter, NULL or DEFAULT into an encrypted column, so pgveil can encrypt it";

impl Walker<'_, '_> {
    fn label(&self, column: ColumnId) -> String {
        self.knowledge.policy.column_label(column)
    }

    fn mode(&self, column: ColumnId) -> EncryptMode {
        self.knowledge
            .policy
            .columns
            .get(column)
            .map(|c| c.encrypt)
            .unwrap_or(EncryptMode::Randomized)
    }

    fn unsupported(&self, column: ColumnId, what: &str) -> Box<Refusal> {
        Box::new(Refusal {
            kind: RefusalKind::Unsupported,
            column: Some(column),
            message: format!(
                "pgveil: {what} on encrypted column {} cannot be answered correctly over ciphertext",
                self.label(column)
            ),
            hint: HINT_READ,
        })
    }

    fn write_refused(&self, column: ColumnId, what: &str) -> Box<Refusal> {
        Box::new(Refusal {
            kind: RefusalKind::WriteRefused,
            column: Some(column),
            message: format!(
                "pgveil: {what} into encrypted column {} would store it in plaintext",
                self.label(column)
            ),
            hint: HINT_WRITE,
        })
    }

    fn range(&self, span: sqlparser::tokenizer::Span) -> Checked<Range<usize>> {
        self.offsets.range(span).ok_or_else(|| {
            Box::new(Refusal {
                kind: RefusalKind::Unparseable,
                column: None,
                message: "pgveil: cannot locate a value in a statement that names a table with encrypted columns".into(),
                hint: "simplify the statement",
            })
        })
    }

    // ---- relations -------------------------------------------------------------

    /// The relation with encrypted columns a table name refers to, if any.
    fn relation(&self, name: &ObjectName) -> Checked<Option<Arc<EncryptedRelation>>> {
        let parts = name_parts(name);
        let (schema, relname) = match parts.as_slice() {
            [relname] => (None, relname),
            [schema, relname] => (Some(schema), relname),
            [_, schema, relname] => (Some(schema), relname),
            _ => return Ok(None),
        };
        let Some(candidates) = self.knowledge.relations.get(relname) else {
            return Ok(None);
        };
        let mut found = candidates
            .iter()
            .filter(|r| schema.is_none_or(|s| *s == r.schema));
        let first = found.next().cloned();
        if let (Some(first), Some(_)) = (&first, found.next()) {
            // Same name in several schemas: which one search_path picks is unknown.
            return Err(Box::new(Refusal {
                kind: RefusalKind::Unsupported,
                column: first.first_encrypted(),
                message: format!(
                    "pgveil: \"{}\" names tables with encrypted columns in several schemas",
                    first.name
                ),
                hint: "qualify the table name with its schema",
            }));
        }
        Ok(first)
    }

    fn statement(&mut self, statement: &Statement) -> Checked<()> {
        let mut scopes = Vec::new();
        match statement {
            Statement::Query(query) => {
                self.query(query, &mut scopes)?;
            }
            Statement::Insert(insert) => self.insert(insert, &mut scopes)?,
            Statement::Update(update) => self.update(update, &mut scopes)?,
            Statement::Delete(delete) => {
                let mut scope = Scope::default();
                let tables = match &delete.from {
                    FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables) => {
                        tables
                    }
                };
                for table in tables.iter().chain(delete.using.iter().flatten()) {
                    self.add_from_item(table, &mut scope, &mut scopes)?;
                }
                scopes.push(scope);
                if let Some(selection) = &delete.selection {
                    self.condition(selection, &mut scopes)?;
                }
                if let Some(returning) = &delete.returning {
                    self.projection(returning, &mut scopes)?;
                }
            }
            Statement::Copy {
                source,
                to,
                target,
                options,
                legacy_options,
                ..
            } => self.copy(source, *to, target, options, legacy_options, &mut scopes)?,
            Statement::Explain { statement, .. } => self.statement(statement)?,
            Statement::Prepare { statement, .. } => {
                let before = self.analysis.params.len();
                self.statement(statement)?;
                if let Some(param) = self.analysis.params.get(before) {
                    return Err(Box::new(Refusal {
                        kind: RefusalKind::WriteRefused,
                        column: Some(param.column),
                        message: format!(
                            "pgveil: a parameter of SQL PREPARE would reach encrypted column {} in plaintext at EXECUTE",
                            self.label(param.column)
                        ),
                        hint: "use the extended protocol's prepared statements (your driver's prepare), which pgveil encrypts",
                    }));
                }
            }
            Statement::CreateView(view) => {
                self.query(&view.query, &mut scopes)?;
            }
            Statement::CreateTable(table) => {
                if let Some(query) = &table.query {
                    self.query(query, &mut scopes)?;
                }
            }
            Statement::Declare { stmts } => {
                for declare in stmts {
                    if let Some(query) = &declare.for_query {
                        self.query(query, &mut scopes)?;
                    }
                }
            }
            other => self.other_statement(other)?,
        }
        Ok(())
    }

    /// A statement kind not analysed above: DDL and session commands pass; anything that
    /// can read or write rows of a relation with encrypted columns is refused.
    fn other_statement(&mut self, statement: &Statement) -> Checked<()> {
        let passes = matches!(
            statement,
            Statement::AlterTable(_)
                | Statement::AlterIndex { .. }
                | Statement::AlterView { .. }
                | Statement::CreateIndex(_)
                | Statement::Drop { .. }
                | Statement::Truncate(_)
                | Statement::Grant(_)
                | Statement::Revoke(_)
                | Statement::Comment { .. }
                | Statement::Analyze(_)
                | Statement::Vacuum(_)
                | Statement::Lock(_)
                | Statement::StartTransaction { .. }
                | Statement::Commit { .. }
                | Statement::Rollback { .. }
                | Statement::Savepoint { .. }
                | Statement::ReleaseSavepoint { .. }
                | Statement::Set(_)
                | Statement::ShowVariable { .. }
                | Statement::Fetch { .. }
                | Statement::Close { .. }
                | Statement::Deallocate { .. }
                | Statement::Discard { .. }
                | Statement::LISTEN { .. }
                | Statement::UNLISTEN { .. }
                | Statement::NOTIFY { .. }
        );
        if passes {
            return Ok(());
        }
        // Does it mention a relation with encrypted columns at all?
        let mut named = None;
        let _ = sqlparser::ast::visit_relations(statement, |name| {
            if let Ok(Some(relation)) = self.relation(name) {
                named = Some(relation);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        match named {
            None => Ok(()),
            Some(relation) => Err(Box::new(Refusal {
                kind: RefusalKind::WriteRefused,
                column: None,
                message: format!(
                    "pgveil: this kind of statement on {}.{}, which has encrypted columns, is not supported",
                    relation.schema, relation.name
                ),
                hint: "use SELECT, INSERT … VALUES, UPDATE, DELETE or COPY … FROM STDIN through pgveil",
            })),
        }
    }

    // ---- queries ---------------------------------------------------------------

    /// Analyses a query; returns its output columns.
    fn query(&mut self, query: &Query, scopes: &mut Vec<Scope>) -> Checked<Vec<Output>> {
        let mut ctes = Vec::new();
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                // A CTE sees the ones before it (and, recursive, itself: its own
                // outputs are not known yet, so a recursive reference is plain; its
                // UNION is refused below if it carries ciphertext).
                scopes.push(Scope {
                    entries: Vec::new(),
                    ctes: ctes.clone(),
                });
                let result = self.query(&cte.query, scopes);
                scopes.pop();
                let mut outputs = result?;
                for (output, column) in outputs.iter_mut().zip(&cte.alias.columns) {
                    output.name = normalise(&column.name);
                }
                ctes.push((normalise(&cte.alias.name), outputs));
            }
        }
        scopes.push(Scope {
            entries: Vec::new(),
            ctes,
        });
        let result = self.query_body(query, scopes);
        scopes.pop();
        result
    }

    fn query_body(&mut self, query: &Query, scopes: &mut Vec<Scope>) -> Checked<Vec<Output>> {
        let order_by: &[OrderByExpr] = match &query.order_by {
            Some(OrderBy {
                kind: OrderByKind::Expressions(exprs),
                ..
            }) => exprs,
            _ => &[],
        };
        let outputs = match query.body.as_ref() {
            // ORDER BY expressions see the select's FROM list.
            SetExpr::Select(select) => self.select(select, order_by, scopes)?,
            body => {
                let outputs = self.set_expr(body, scopes)?;
                for item in order_by {
                    self.order_item(&item.expr, &outputs, scopes)?;
                }
                outputs
            }
        };
        if let Some(limit) = &query.limit_clause {
            self.scan(limit, scopes)?;
        }
        Ok(outputs)
    }

    /// An ORDER BY item of a query: an output position, an output name or an
    /// expression.
    fn order_item(
        &mut self,
        expr: &Expr,
        outputs: &[Output],
        scopes: &mut Vec<Scope>,
    ) -> Checked<()> {
        let from_output = match expr {
            Expr::Value(value) => match &value.value {
                Value::Number(n, _) => n
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| i.checked_sub(1))
                    .and_then(|i| outputs.get(i))
                    .map(|o| o.content),
                _ => None,
            },
            Expr::Identifier(ident) => outputs
                .iter()
                .find(|o| o.name == normalise(ident))
                .map(|o| o.content),
            _ => None,
        };
        let content = match from_output {
            Some(content) => content,
            None => self.value(expr, scopes)?,
        };
        match content {
            Content::Plain => Ok(()),
            Content::Encrypted(id) | Content::ComputedFromEncrypted(id) => {
                Err(self.unsupported(id, "ORDER BY"))
            }
        }
    }

    fn set_expr(&mut self, body: &SetExpr, scopes: &mut Vec<Scope>) -> Checked<Vec<Output>> {
        match body {
            SetExpr::Select(select) => self.select(select, &[], scopes),
            SetExpr::Query(query) => self.query(query, scopes),
            SetExpr::SetOperation { left, right, .. } => {
                let left = self.set_expr(left, scopes)?;
                let right = self.set_expr(right, scopes)?;
                if let Some(id) = left.iter().chain(&right).find_map(|o| o.content.column()) {
                    return Err(self.unsupported(id, "UNION, INTERSECT or EXCEPT"));
                }
                Ok(left)
            }
            SetExpr::Values(values) => {
                for row in &values.rows {
                    for expr in row.iter() {
                        self.value_not_encrypted(expr, scopes, "a VALUES list")?;
                    }
                }
                Ok(Vec::new())
            }
            SetExpr::Table(table) => {
                let name = ObjectName(
                    table
                        .schema_name
                        .iter()
                        .chain(table.table_name.iter())
                        .map(|n| ObjectNamePart::Identifier(Ident::new(n.clone())))
                        .collect(),
                );
                Ok(match self.relation(&name)? {
                    Some(relation) => Entry {
                        alias: relation.name.clone(),
                        relation: Some(relation),
                        outputs: Vec::new(),
                    }
                    .all_outputs(),
                    None => Vec::new(),
                })
            }
            other => {
                self.scan(other, scopes)?;
                Ok(Vec::new())
            }
        }
    }

    fn scope_of_from(
        &mut self,
        from: &[TableWithJoins],
        scopes: &mut Vec<Scope>,
    ) -> Checked<Scope> {
        let mut scope = Scope::default();
        for table in from {
            self.add_from_item(table, &mut scope, scopes)?;
        }
        Ok(scope)
    }

    /// A SELECT and the ORDER BY of the query it is the body of.
    fn select(
        &mut self,
        select: &Select,
        order_by: &[OrderByExpr],
        scopes: &mut Vec<Scope>,
    ) -> Checked<Vec<Output>> {
        let scope = self.scope_of_from(&select.from, scopes)?;
        scopes.push(scope);
        let result = self.select_in_scope(select, scopes).and_then(|outputs| {
            for item in order_by {
                self.order_item(&item.expr, &outputs, scopes)?;
            }
            Ok(outputs)
        });
        scopes.pop();
        result
    }

    fn select_in_scope(
        &mut self,
        select: &Select,
        scopes: &mut Vec<Scope>,
    ) -> Checked<Vec<Output>> {
        let outputs = self.projection(&select.projection, scopes)?;
        if let Some(selection) = &select.selection {
            self.condition(selection, scopes)?;
        }
        if let Some(having) = &select.having {
            self.condition(having, scopes)?;
        }
        match &select.group_by {
            GroupByExpr::Expressions(exprs, _) => {
                for expr in exprs {
                    let content = match expr {
                        Expr::Value(value) => match &value.value {
                            Value::Number(n, _) => n
                                .parse::<usize>()
                                .ok()
                                .and_then(|i| i.checked_sub(1))
                                .and_then(|i| outputs.get(i))
                                .map(|o| o.content)
                                .unwrap_or(Content::Plain),
                            _ => Content::Plain,
                        },
                        _ => self.value(expr, scopes)?,
                    };
                    self.grouping(content, "GROUP BY")?;
                }
            }
            GroupByExpr::All(_) => {
                for output in &outputs {
                    self.grouping(output.content, "GROUP BY ALL")?;
                }
            }
        }
        match &select.distinct {
            Some(Distinct::Distinct) => {
                for output in &outputs {
                    self.grouping(output.content, "DISTINCT")?;
                }
            }
            Some(Distinct::On(exprs)) => {
                for expr in exprs {
                    let content = self.value(expr, scopes)?;
                    self.grouping(content, "DISTINCT ON")?;
                }
            }
            Some(Distinct::All) | None => {}
        }
        if !select.named_window.is_empty() || select.qualify.is_some() {
            for window in &select.named_window {
                self.scan(window, scopes)?;
            }
            if let Some(qualify) = &select.qualify {
                self.scan(qualify, scopes)?;
            }
        }
        Ok(outputs)
    }

    /// Grouping compares values: right over deterministic ciphertext under one key only.
    fn grouping(&self, content: Content, what: &str) -> Checked<()> {
        match content {
            Content::Plain => Ok(()),
            Content::Encrypted(id)
                if self.mode(id) == EncryptMode::Deterministic && self.knowledge.single_key =>
            {
                Ok(())
            }
            Content::Encrypted(id) if self.mode(id) == EncryptMode::Deterministic => {
                Err(self.rotation_pending(id, what))
            }
            Content::Encrypted(id) | Content::ComputedFromEncrypted(id) => {
                Err(self.unsupported(id, what))
            }
        }
    }

    fn rotation_pending(&self, column: ColumnId, what: &str) -> Box<Refusal> {
        Box::new(Refusal {
            kind: RefusalKind::Unsupported,
            column: Some(column),
            message: format!(
                "pgveil: {what} on encrypted column {} compares ciphertexts, which differ between the keys of the keyring",
                self.label(column)
            ),
            hint: "run `pgveil reencrypt` on the tables and remove the retired keys from the keyring",
        })
    }

    fn projection(
        &mut self,
        items: &[SelectItem],
        scopes: &mut Vec<Scope>,
    ) -> Checked<Vec<Output>> {
        let mut outputs = Vec::new();
        for item in items {
            match item {
                SelectItem::UnnamedExpr(expr) => {
                    let content = self.output_value(expr, scopes)?;
                    let name = match expr {
                        Expr::Identifier(ident) => normalise(ident),
                        Expr::CompoundIdentifier(idents) => {
                            idents.last().map(normalise).unwrap_or_default()
                        }
                        _ => String::new(),
                    };
                    outputs.push(Output { name, content });
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    let content = self.output_value(expr, scopes)?;
                    outputs.push(Output {
                        name: normalise(alias),
                        content,
                    });
                }
                SelectItem::Wildcard(_) => {
                    if let Some(scope) = scopes.last() {
                        for entry in &scope.entries {
                            outputs.extend(entry.all_outputs());
                        }
                    }
                }
                SelectItem::QualifiedWildcard(kind, _) => match kind {
                    SelectItemQualifiedWildcardKind::ObjectName(name) => {
                        let parts = name_parts(name);
                        let alias = parts.last().cloned().unwrap_or_default();
                        let entry = scopes
                            .iter()
                            .rev()
                            .flat_map(|s| s.entries.iter())
                            .find(|e| e.alias == alias)
                            .cloned();
                        if let Some(entry) = entry {
                            outputs.extend(entry.all_outputs());
                        }
                    }
                    SelectItemQualifiedWildcardKind::Expr(expr) => {
                        self.scan(expr, scopes)?;
                    }
                },
                other => {
                    self.scan(other, scopes)?;
                }
            }
        }
        Ok(outputs)
    }

    /// A result column: a plain reference to an encrypted column passes (pgveil
    /// decrypts it in the result); anything computed from one is refused.
    fn output_value(&mut self, expr: &Expr, scopes: &mut Vec<Scope>) -> Checked<Content> {
        match expr {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => match self.resolve(expr, scopes) {
                Some(Resolved::Column(Content::ComputedFromEncrypted(id))) => {
                    Err(self.unsupported(id, "a view column computed"))
                }
                Some(Resolved::Column(content)) => Ok(content),
                Some(Resolved::WholeRow(id)) => Err(self.unsupported(id, "a whole-row reference")),
                None => Ok(Content::Plain),
            },
            Expr::Nested(inner) => self.output_value(inner, scopes),
            _ => {
                self.value_not_encrypted(expr, scopes, "an expression")?;
                Ok(Content::Plain)
            }
        }
    }

    fn add_from_item(
        &mut self,
        table: &TableWithJoins,
        scope: &mut Scope,
        scopes: &mut Vec<Scope>,
    ) -> Checked<()> {
        self.table_factor(&table.relation, scope, scopes)?;
        for join in &table.joins {
            self.table_factor(&join.relation, scope, scopes)?;
            let constraint = super::join_constraint(&join.join_operator);
            use sqlparser::ast::JoinConstraint as C;
            match constraint {
                Some(C::On(expr)) => {
                    scopes.push(scope.clone());
                    let result = self.condition(expr, scopes);
                    scopes.pop();
                    result?;
                }
                Some(C::Using(names)) => {
                    for name in names {
                        let column = name_parts(name).last().cloned().unwrap_or_default();
                        let encrypted =
                            scope.entries.iter().find_map(|e| match e.column(&column) {
                                Some(Content::Encrypted(id))
                                | Some(Content::ComputedFromEncrypted(id)) => Some(id),
                                _ => None,
                            });
                        if let Some(id) = encrypted {
                            self.equal_columns(id, id, "JOIN … USING")?;
                        }
                    }
                }
                Some(C::Natural) => {
                    if let Some(id) = scope.entries.iter().find_map(Entry::first_encrypted) {
                        return Err(self.unsupported(id, "NATURAL JOIN"));
                    }
                }
                Some(C::None) | None => {}
            }
        }
        Ok(())
    }

    fn table_factor(
        &mut self,
        factor: &TableFactor,
        scope: &mut Scope,
        scopes: &mut Vec<Scope>,
    ) -> Checked<()> {
        match factor {
            TableFactor::Table { name, alias, .. } => {
                let parts = name_parts(name);
                let relname = parts.last().cloned().unwrap_or_default();
                let alias_name = alias.as_ref().map(|a| normalise(&a.name));
                // A CTE of that name shadows a table.
                if parts.len() == 1 {
                    let cte = scopes
                        .iter()
                        .rev()
                        .chain(std::iter::once(&*scope))
                        .flat_map(|s| s.ctes.iter())
                        .find(|(n, _)| *n == relname)
                        .map(|(_, outputs)| outputs.clone());
                    if let Some(outputs) = cte {
                        scope.entries.push(Entry {
                            alias: alias_name.unwrap_or(relname),
                            relation: None,
                            outputs: rename(outputs, alias.as_ref()),
                        });
                        return Ok(());
                    }
                }
                if let Some(relation) = self.relation(name)? {
                    let relation = match alias.as_ref().filter(|a| !a.columns.is_empty()) {
                        // Column aliases rename the relation's columns in order.
                        Some(alias) => {
                            let mut renamed = (*relation).clone();
                            for (column, new) in renamed.columns.iter_mut().zip(&alias.columns) {
                                column.name = normalise(&new.name);
                            }
                            Arc::new(renamed)
                        }
                        None => relation,
                    };
                    scope.entries.push(Entry {
                        alias: alias_name.unwrap_or(relname),
                        relation: Some(relation),
                        outputs: Vec::new(),
                    });
                }
                Ok(())
            }
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
                ..
            } => {
                let outputs = if *lateral {
                    scopes.push(scope.clone());
                    let result = self.query(subquery, scopes);
                    scopes.pop();
                    result?
                } else {
                    self.query(subquery, scopes)?
                };
                if let Some(alias) = alias {
                    scope.entries.push(Entry {
                        alias: normalise(&alias.name),
                        relation: None,
                        outputs: rename(outputs, Some(alias)),
                    });
                }
                Ok(())
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.add_from_item(table_with_joins, scope, scopes),
            other => {
                // Table functions, UNNEST and the like: their arguments may see the
                // relations before them.
                scopes.push(scope.clone());
                let result = self.scan(other, scopes);
                scopes.pop();
                result
            }
        }
    }

    // ---- expressions -----------------------------------------------------------

    /// What an identifier refers to in the scopes (innermost first); `None`: not a
    /// column of a relation with encrypted columns.
    fn resolve(&self, expr: &Expr, scopes: &[Scope]) -> Option<Resolved> {
        let names: Vec<String> = match expr {
            Expr::Identifier(ident) => vec![normalise(ident)],
            Expr::CompoundIdentifier(idents) => idents.iter().map(normalise).collect(),
            _ => return None,
        };
        match names.as_slice() {
            [column] => {
                for scope in scopes.iter().rev() {
                    if let Some(content) = scope.entries.iter().find_map(|e| e.column(column)) {
                        return Some(Resolved::Column(content));
                    }
                    if let Some(id) = scope
                        .entries
                        .iter()
                        .find(|e| e.alias == *column)
                        .and_then(Entry::first_encrypted)
                    {
                        return Some(Resolved::WholeRow(id));
                    }
                }
                None
            }
            [qualifier, column] => {
                for scope in scopes.iter().rev() {
                    if let Some(entry) = scope.entries.iter().find(|e| e.alias == *qualifier) {
                        return entry.column(column).map(Resolved::Column);
                    }
                }
                None
            }
            [schema, table, column] => {
                for scope in scopes.iter().rev() {
                    if let Some(entry) = scope.entries.iter().find(|e| {
                        e.relation
                            .as_ref()
                            .is_some_and(|r| r.schema == *schema && r.name == *table)
                    }) {
                        return entry.column(column).map(Resolved::Column);
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// Classifies a value in a comparison or a write.
    fn term(&mut self, expr: &Expr, scopes: &mut Vec<Scope>) -> Checked<Term> {
        Ok(match expr {
            Expr::Value(value) => {
                let range = self.range(value.span)?;
                match &value.value {
                    Value::Null => Term::Null,
                    Value::Placeholder(text) => match placeholder_index(text) {
                        Some(index) => Term::Param(index, range),
                        None => Term::Other(Content::Plain),
                    },
                    other => match literal_text(other) {
                        Some(text) => Term::Literal(text, range),
                        None => Term::Other(Content::Plain),
                    },
                }
            }
            Expr::UnaryOp {
                op: op @ (UnaryOperator::Minus | UnaryOperator::Plus),
                expr: inner,
            } => match inner.as_ref() {
                Expr::Value(value) if matches!(value.value, Value::Number(..)) => {
                    // The operator's own position is not in the AST: widen the number's
                    // range back over the sign (and any blanks before the number).
                    let number = self.range(value.span)?;
                    let text = self.offsets.text.as_bytes();
                    let mut start = number.start;
                    while start > 0 && text[start - 1].is_ascii_whitespace() {
                        start -= 1;
                    }
                    if start == 0 || !matches!(text[start - 1], b'-' | b'+') {
                        return Ok(Term::Other(Content::Plain));
                    }
                    let range = start - 1..number.end;
                    let Value::Number(number, _) = &value.value else {
                        return Ok(Term::Other(Content::Plain));
                    };
                    let sign = if *op == UnaryOperator::Minus { "-" } else { "" };
                    Term::Literal(format!("{sign}{number}"), range)
                }
                _ => Term::Other(self.value(expr, scopes)?),
            },
            Expr::TypedString(typed) => {
                let range = self.range(expr.span())?;
                match literal_text(&typed.value.value) {
                    Some(text) => Term::Literal(text, range),
                    None => Term::Other(Content::Plain),
                }
            }
            Expr::Identifier(ident)
                if ident.quote_style.is_none() && ident.value.eq_ignore_ascii_case("default") =>
            {
                Term::Default
            }
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => match self.resolve(expr, scopes) {
                Some(Resolved::Column(Content::Encrypted(id))) => {
                    Term::Column(id, self.range(expr.span())?)
                }
                Some(Resolved::Column(Content::ComputedFromEncrypted(id))) => {
                    return Err(self.unsupported(id, "a view column computed"))
                }
                Some(Resolved::WholeRow(id)) => {
                    return Err(self.unsupported(id, "a whole-row reference"))
                }
                Some(Resolved::Column(Content::Plain)) | None => Term::Other(Content::Plain),
            },
            other => Term::Other(self.value(other, scopes)?),
        })
    }

    /// A value that must not involve an encrypted column.
    fn value_not_encrypted(
        &mut self,
        expr: &Expr,
        scopes: &mut Vec<Scope>,
        what: &str,
    ) -> Checked<()> {
        match self.value(expr, scopes)? {
            Content::Plain => Ok(()),
            Content::Encrypted(id) | Content::ComputedFromEncrypted(id) => {
                Err(self.unsupported(id, what))
            }
        }
    }

    /// Checks an expression used as a value; returns `Encrypted` only for a plain
    /// reference to an encrypted column (the caller decides whether that is fine).
    fn value(&mut self, expr: &Expr, scopes: &mut Vec<Scope>) -> Checked<Content> {
        match expr {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => match self.resolve(expr, scopes) {
                Some(Resolved::Column(Content::ComputedFromEncrypted(id))) => {
                    Err(self.unsupported(id, "a view column computed"))
                }
                Some(Resolved::Column(content)) => Ok(content),
                Some(Resolved::WholeRow(id)) => Err(self.unsupported(id, "a whole-row reference")),
                None => Ok(Content::Plain),
            },
            Expr::Nested(inner) => self.value(inner, scopes),
            Expr::Value(_) | Expr::TypedString(_) => Ok(Content::Plain),
            Expr::BinaryOp { op, .. }
                if is_comparison(op) || matches!(op, BinaryOperator::And | BinaryOperator::Or) =>
            {
                self.condition(expr, scopes)?;
                Ok(Content::Plain)
            }
            Expr::BinaryOp { left, op, right } => {
                for side in [left, right] {
                    match self.value(side, scopes)? {
                        Content::Plain => {}
                        Content::Encrypted(id) | Content::ComputedFromEncrypted(id) => {
                            return Err(self.unsupported(id, &format!("operator {op}")))
                        }
                    }
                }
                Ok(Content::Plain)
            }
            Expr::UnaryOp { op, expr: inner } => {
                if *op == UnaryOperator::Not {
                    self.condition(inner, scopes)?;
                } else {
                    self.value_not_encrypted(inner, scopes, &format!("operator {op}"))?;
                }
                Ok(Content::Plain)
            }
            Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::InList { .. }
            | Expr::InSubquery { .. }
            | Expr::Exists { .. }
            | Expr::Between { .. }
            | Expr::Like { .. }
            | Expr::ILike { .. }
            | Expr::SimilarTo { .. }
            | Expr::IsDistinctFrom(..)
            | Expr::IsNotDistinctFrom(..) => {
                self.condition(expr, scopes)?;
                Ok(Content::Plain)
            }
            Expr::Cast { expr: inner, .. } => {
                self.value_not_encrypted(inner, scopes, "a cast")?;
                Ok(Content::Plain)
            }
            Expr::Subquery(query) => {
                let outputs = self.query(query, scopes)?;
                if let Some(id) = outputs.iter().find_map(|o| o.content.column()) {
                    return Err(self.unsupported(id, "a scalar subquery"));
                }
                Ok(Content::Plain)
            }
            Expr::Function(function) => {
                let name = name_parts(&function.name);
                let is_count = name.last().is_some_and(|n| n == "count")
                    && (name.len() == 1 || name.first().is_some_and(|s| s == "pg_catalog"));
                if let FunctionArguments::List(list) = &function.args {
                    let distinct = list.duplicate_treatment
                        == Some(sqlparser::ast::DuplicateTreatment::Distinct);
                    for arg in &list.args {
                        let arg_expr = match arg {
                            FunctionArg::Named { arg, .. }
                            | FunctionArg::ExprNamed { arg, .. }
                            | FunctionArg::Unnamed(arg) => arg,
                        };
                        match arg_expr {
                            FunctionArgExpr::Expr(e) => match self.value(e, scopes)? {
                                Content::Plain => {}
                                Content::Encrypted(id) if is_count => {
                                    if distinct {
                                        self.grouping(Content::Encrypted(id), "count(DISTINCT …)")?;
                                    }
                                }
                                Content::Encrypted(id) | Content::ComputedFromEncrypted(id) => {
                                    let function_name = name.join(".");
                                    return Err(self
                                        .unsupported(id, &format!("function {function_name}()")));
                                }
                            },
                            FunctionArgExpr::QualifiedWildcard(qualifier) => {
                                let alias =
                                    name_parts(qualifier).last().cloned().unwrap_or_default();
                                if let Some(id) = scopes
                                    .iter()
                                    .rev()
                                    .flat_map(|s| s.entries.iter())
                                    .find(|e| e.alias == alias)
                                    .and_then(Entry::first_encrypted)
                                {
                                    return Err(self.unsupported(id, "a whole-row reference"));
                                }
                            }
                            FunctionArgExpr::Wildcard | FunctionArgExpr::WildcardWithOptions(_) => {
                                if !is_count {
                                    self.scan(arg_expr, scopes)?;
                                }
                            }
                        }
                    }
                    for clause in &list.clauses {
                        self.scan(clause, scopes)?;
                    }
                } else {
                    self.scan(&function.args, scopes)?;
                }
                if let Some(filter) = &function.filter {
                    self.condition(filter, scopes)?;
                }
                if let Some(over) = &function.over {
                    self.scan(over, scopes)?;
                }
                for item in &function.within_group {
                    self.scan(item, scopes)?;
                }
                self.scan(&function.parameters, scopes)?;
                Ok(Content::Plain)
            }
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                if let Some(operand) = operand {
                    self.value_not_encrypted(operand, scopes, "CASE")?;
                }
                for when in conditions {
                    if operand.is_some() {
                        self.value_not_encrypted(&when.condition, scopes, "CASE")?;
                    } else {
                        self.condition(&when.condition, scopes)?;
                    }
                    self.value_not_encrypted(&when.result, scopes, "CASE")?;
                }
                if let Some(result) = else_result {
                    self.value_not_encrypted(result, scopes, "CASE")?;
                }
                Ok(Content::Plain)
            }
            other => {
                self.scan(other, scopes)?;
                Ok(Content::Plain)
            }
        }
    }

    /// A boolean condition (WHERE, ON, HAVING, FILTER, CASE WHEN).
    fn condition(&mut self, expr: &Expr, scopes: &mut Vec<Scope>) -> Checked<()> {
        match expr {
            Expr::Nested(inner) => self.condition(inner, scopes),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And | BinaryOperator::Or,
                right,
            } => {
                self.condition(left, scopes)?;
                self.condition(right, scopes)
            }
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr: inner,
            } => self.condition(inner, scopes),
            Expr::BinaryOp { left, op, right } if is_comparison(op) => {
                self.comparison(expr, left, op, right, scopes)
            }
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => match self.value(inner, scopes)? {
                Content::ComputedFromEncrypted(id) => Err(self.unsupported(id, "IS NULL")),
                _ => Ok(()),
            },
            Expr::IsDistinctFrom(left, right) | Expr::IsNotDistinctFrom(left, right) => {
                let left = self.term(left, scopes)?;
                let right = self.term(right, scopes)?;
                for term in [&left, &right] {
                    if let Term::Column(id, _) | Term::Other(Content::Encrypted(id)) = term {
                        return Err(self.unsupported(*id, "IS DISTINCT FROM"));
                    }
                }
                Ok(())
            }
            Expr::InList {
                expr: target,
                list,
                negated: _,
            } => match self.term(target, scopes)? {
                Term::Column(id, _) => {
                    self.require_deterministic(id, "IN")?;
                    for item in list {
                        match self.term(item, scopes)? {
                            Term::Literal(text, range) => {
                                self.analysis.edits.push(Edit::ListItem {
                                    range,
                                    column: id,
                                    operand: Operand::Literal(text),
                                })
                            }
                            Term::Param(index, range) => {
                                self.lookup_param(index, id, range.clone());
                                if !self.knowledge.single_key {
                                    self.analysis.edits.push(Edit::ListItem {
                                        range,
                                        column: id,
                                        operand: Operand::Param(index),
                                    });
                                }
                            }
                            Term::Null => {}
                            Term::Column(other, _) => self.equal_columns(id, other, "IN")?,
                            Term::Default | Term::Other(_) => {
                                return Err(self.unsupported(id, "IN with a computed value"))
                            }
                        }
                    }
                    Ok(())
                }
                Term::Other(Content::Encrypted(id)) => Err(self.unsupported(id, "IN")),
                _ => {
                    for item in list {
                        self.value_not_encrypted(item, scopes, "IN")?;
                    }
                    Ok(())
                }
            },
            Expr::InSubquery {
                expr: target,
                subquery,
                ..
            } => {
                let target = self.term(target, scopes)?;
                let outputs = self.query(subquery, scopes)?;
                let inner = outputs.first().map(|o| o.content).unwrap_or(Content::Plain);
                match (target, inner) {
                    (Term::Column(a, _), Content::Encrypted(b)) => {
                        self.equal_columns(a, b, "IN (subquery)")
                    }
                    (Term::Column(id, _), _) | (_, Content::Encrypted(id)) => {
                        Err(self.unsupported(id, "IN (subquery) against another value"))
                    }
                    (Term::Other(Content::Encrypted(id)), _)
                    | (_, Content::ComputedFromEncrypted(id)) => {
                        Err(self.unsupported(id, "IN (subquery)"))
                    }
                    _ => Ok(()),
                }
            }
            Expr::Exists { subquery, .. } => {
                self.query(subquery, scopes)?;
                Ok(())
            }
            Expr::Between {
                expr: target,
                low,
                high,
                ..
            } => {
                for e in [target, low, high] {
                    self.value_not_encrypted(e, scopes, "a range comparison (BETWEEN)")?;
                }
                Ok(())
            }
            Expr::Like {
                expr: target,
                pattern,
                ..
            }
            | Expr::ILike {
                expr: target,
                pattern,
                ..
            }
            | Expr::SimilarTo {
                expr: target,
                pattern,
                ..
            } => {
                self.value_not_encrypted(target, scopes, "LIKE")?;
                self.value_not_encrypted(pattern, scopes, "LIKE")
            }
            other => match self.value(other, scopes)? {
                Content::Plain => Ok(()),
                Content::Encrypted(id) | Content::ComputedFromEncrypted(id) => {
                    Err(self.unsupported(id, "a condition"))
                }
            },
        }
    }

    fn require_deterministic(&self, column: ColumnId, what: &str) -> Checked<()> {
        if self.mode(column) == EncryptMode::Deterministic {
            return Ok(());
        }
        Err(Box::new(Refusal {
            kind: RefusalKind::Unsupported,
            column: Some(column),
            message: format!(
                "pgveil: {what} on column {}, which uses randomized encryption, cannot find equal values",
                self.label(column)
            ),
            hint: "equality search needs `encrypt: deterministic` on the column in the pgveil policy",
        }))
    }

    /// Two encrypted columns compared for equality: right only for deterministic
    /// ciphertext of the same column (keys are per column) under one key.
    fn equal_columns(&self, a: ColumnId, b: ColumnId, what: &str) -> Checked<()> {
        self.require_deterministic(a, what)?;
        self.require_deterministic(b, what)?;
        if a != b {
            return Err(Box::new(Refusal {
                kind: RefusalKind::Unsupported,
                column: Some(a),
                message: format!(
                    "pgveil: {what} compares encrypted columns {} and {}, whose keys differ",
                    self.label(a),
                    self.label(b)
                ),
                hint:
                    "compare an encrypted column with a value, or with the same column (self-joins)",
            }));
        }
        if !self.knowledge.single_key {
            return Err(self.rotation_pending(a, what));
        }
        Ok(())
    }

    fn lookup_param(&mut self, index: u32, column: ColumnId, range: Range<usize>) {
        self.analysis.params.push(ParamUse {
            index,
            column,
            lookup: true,
        });
        self.param_spans.push((index, range));
    }

    fn comparison(
        &mut self,
        whole: &Expr,
        left: &Expr,
        op: &BinaryOperator,
        right: &Expr,
        scopes: &mut Vec<Scope>,
    ) -> Checked<()> {
        let left_term = self.term(left, scopes)?;
        let right_term = self.term(right, scopes)?;
        let equality = matches!(op, BinaryOperator::Eq | BinaryOperator::NotEq);
        let (column, column_range, other) = match (left_term, right_term) {
            (Term::Column(a, _), Term::Column(b, _)) => {
                if !equality {
                    return Err(self.unsupported(a, "a range comparison"));
                }
                return self.equal_columns(a, b, "equality");
            }
            (Term::Column(id, range), other) | (other, Term::Column(id, range)) => {
                (id, range, other)
            }
            (Term::Other(Content::Encrypted(id)), _) | (_, Term::Other(Content::Encrypted(id))) => {
                return Err(self.unsupported(id, "a comparison"))
            }
            _ => return Ok(()),
        };
        if !equality {
            return Err(self.unsupported(column, "a range comparison"));
        }
        let negated = *op == BinaryOperator::NotEq;
        match other {
            Term::Null => Ok(()),
            Term::Literal(text, range) => {
                self.require_deterministic(column, "equality")?;
                if self.knowledge.single_key {
                    self.analysis.edits.push(Edit::ListItem {
                        range,
                        column,
                        operand: Operand::Literal(text),
                    });
                } else {
                    let whole_range = self.range(whole.span())?;
                    self.analysis.edits.push(Edit::Comparison {
                        range: whole_range,
                        column_text: column_range,
                        negated,
                        column,
                        operand: Operand::Literal(text),
                    });
                }
                Ok(())
            }
            Term::Param(index, range) => {
                self.require_deterministic(column, "equality")?;
                self.lookup_param(index, column, range);
                if !self.knowledge.single_key {
                    let whole_range = self.range(whole.span())?;
                    self.analysis.edits.push(Edit::Comparison {
                        range: whole_range,
                        column_text: column_range,
                        negated,
                        column,
                        operand: Operand::Param(index),
                    });
                }
                Ok(())
            }
            Term::Default | Term::Other(_) | Term::Column(..) => {
                Err(self.unsupported(column, "a comparison with a computed value"))
            }
        }
    }

    /// Any syntax not handled above: refused if it mentions an encrypted column; the
    /// queries inside it are analysed in full.
    fn scan<V: Visit>(&mut self, node: &V, scopes: &mut Vec<Scope>) -> Checked<()> {
        let mut finder = ReferenceFinder {
            depth: 0,
            references: Vec::new(),
            queries: Vec::new(),
        };
        let _ = node.visit(&mut finder);
        for expr in &finder.references {
            match self.resolve(expr, scopes) {
                Some(Resolved::Column(Content::Encrypted(id)))
                | Some(Resolved::Column(Content::ComputedFromEncrypted(id))) => {
                    return Err(self.unsupported(id, "this expression"))
                }
                Some(Resolved::WholeRow(id)) => {
                    return Err(self.unsupported(id, "a whole-row reference"))
                }
                _ => {}
            }
        }
        for query in &finder.queries {
            let outputs = self.query(query, scopes)?;
            if let Some(id) = outputs.iter().find_map(|o| o.content.column()) {
                return Err(self.unsupported(id, "a subquery inside an expression"));
            }
        }
        Ok(())
    }

    // ---- writes ----------------------------------------------------------------

    /// A value written into encrypted column `column`.
    fn write_value(
        &mut self,
        expr: &Expr,
        column: ColumnId,
        has_default: bool,
        scopes: &mut Vec<Scope>,
    ) -> Checked<()> {
        let simple = matches!(
            expr,
            Expr::Value(_)
                | Expr::TypedString(_)
                | Expr::Identifier(_)
                | Expr::CompoundIdentifier(_)
        ) || matches!(expr, Expr::UnaryOp { expr: inner, .. } if matches!(inner.as_ref(), Expr::Value(_)));
        if !simple {
            return Err(self.write_refused(column, "a computed value"));
        }
        match self.term(expr, scopes)? {
            Term::Literal(value, range) => {
                self.analysis.edits.push(Edit::Write {
                    range,
                    column,
                    value,
                });
                Ok(())
            }
            Term::Param(index, range) => {
                self.analysis.params.push(ParamUse {
                    index,
                    column,
                    lookup: false,
                });
                self.param_spans.push((index, range));
                Ok(())
            }
            Term::Null => Ok(()),
            Term::Default if !has_default => Ok(()),
            Term::Default => Err(self.write_refused(column, "the column's DEFAULT expression")),
            Term::Column(..) | Term::Other(_) => {
                Err(self.write_refused(column, "a computed value"))
            }
        }
    }

    fn insert(&mut self, insert: &sqlparser::ast::Insert, scopes: &mut Vec<Scope>) -> Checked<()> {
        let TableObject::TableName(name) = &insert.table else {
            return self.scan(insert, scopes);
        };
        let Some(relation) = self.relation(name)? else {
            // Writes into a relation without encrypted columns: its source may still
            // read encrypted ones (copying ciphertext is not decrypting).
            if let Some(source) = &insert.source {
                self.query(source, scopes)?;
            }
            if let Some(returning) = &insert.returning {
                self.projection(returning, scopes)?;
            }
            return Ok(());
        };
        if relation.is_view {
            if let Some(id) = relation.first_encrypted() {
                return Err(self.write_refused(id, "a write through a view"));
            }
        }
        // The relation's columns the statement's values go to, in order.
        let targets: Vec<Option<&RelationColumn>> = if insert.columns.is_empty() {
            relation.columns.iter().map(Some).collect()
        } else {
            insert
                .columns
                .iter()
                .map(|c| relation.column(name_parts(c).last().map(String::as_str).unwrap_or("")))
                .collect()
        };
        // Encrypted columns left to their defaults.
        for column in &relation.columns {
            let Content::Encrypted(id) = column.content else {
                continue;
            };
            let named = targets.iter().flatten().any(|t| t.name == column.name);
            let defaulted = !named || insert.source.is_none();
            if defaulted && column.has_default {
                return Err(self.write_refused(id, "the column's DEFAULT expression"));
            }
        }
        let alias = insert
            .table_alias
            .as_ref()
            .map(|a| normalise(&a.alias))
            .unwrap_or_else(|| relation.name.clone());
        if let Some(source) = &insert.source {
            let values = match source.body.as_ref() {
                SetExpr::Values(values) if source.with.is_none() => Some(values),
                _ => None,
            };
            match values {
                Some(values) => {
                    for row in &values.rows {
                        for (index, expr) in row.iter().enumerate() {
                            match targets.get(index).copied().flatten() {
                                Some(RelationColumn {
                                    content: Content::Encrypted(id),
                                    has_default,
                                    ..
                                }) => self.write_value(expr, *id, *has_default, scopes)?,
                                _ => self.value_not_encrypted(expr, scopes, "a value")?,
                            }
                        }
                    }
                }
                None => {
                    if let Some(id) = targets.iter().flatten().find_map(|t| match t.content {
                        Content::Encrypted(id) => Some(id),
                        _ => None,
                    }) {
                        return Err(self.write_refused(id, "INSERT … SELECT"));
                    }
                    self.query(source, scopes)?;
                }
            }
        }
        let target_entry = Entry {
            alias,
            relation: Some(relation.clone()),
            outputs: Vec::new(),
        };
        if let Some(OnInsert::OnConflict(conflict)) = &insert.on {
            if let OnConflictAction::DoUpdate(update) = &conflict.action {
                let excluded = Entry {
                    alias: "excluded".into(),
                    relation: Some(relation.clone()),
                    outputs: Vec::new(),
                };
                scopes.push(Scope {
                    entries: vec![target_entry.clone(), excluded],
                    ctes: Vec::new(),
                });
                let result = self
                    .assignments(&update.assignments, &relation, scopes)
                    .and_then(|()| match &update.selection {
                        Some(selection) => self.condition(selection, scopes),
                        None => Ok(()),
                    });
                scopes.pop();
                result?;
            }
        }
        if let Some(returning) = &insert.returning {
            scopes.push(Scope {
                entries: vec![target_entry],
                ctes: Vec::new(),
            });
            let result = self.projection(returning, scopes);
            scopes.pop();
            result?;
        }
        Ok(())
    }

    fn assignments(
        &mut self,
        assignments: &[sqlparser::ast::Assignment],
        relation: &EncryptedRelation,
        scopes: &mut Vec<Scope>,
    ) -> Checked<()> {
        for assignment in assignments {
            match &assignment.target {
                AssignmentTarget::ColumnName(name) => {
                    let column = name_parts(name).last().cloned().unwrap_or_default();
                    match relation.column(&column) {
                        Some(RelationColumn {
                            content: Content::Encrypted(id),
                            has_default,
                            ..
                        }) => {
                            let (id, has_default) = (*id, *has_default);
                            // `SET col = EXCLUDED.col` moves the ciphertext of the same
                            // column: nothing to encrypt.
                            if matches!(
                                assignment.value,
                                Expr::Identifier(_) | Expr::CompoundIdentifier(_)
                            ) {
                                if let Term::Column(source, _) =
                                    self.term(&assignment.value, scopes)?
                                {
                                    if source == id {
                                        continue;
                                    }
                                }
                            }
                            self.write_value(&assignment.value, id, has_default, scopes)?;
                        }
                        Some(RelationColumn {
                            content: Content::ComputedFromEncrypted(id),
                            ..
                        }) => return Err(self.write_refused(*id, "a write through a view")),
                        _ => self.value_not_encrypted(&assignment.value, scopes, "a value")?,
                    }
                }
                AssignmentTarget::Tuple(names) => {
                    for name in names {
                        let column = name_parts(name).last().cloned().unwrap_or_default();
                        if let Some(RelationColumn {
                            content: Content::Encrypted(id) | Content::ComputedFromEncrypted(id),
                            ..
                        }) = relation.column(&column)
                        {
                            return Err(self.write_refused(*id, "a multiple-column assignment"));
                        }
                    }
                    self.value_not_encrypted(&assignment.value, scopes, "a value")?;
                }
            }
        }
        Ok(())
    }

    fn update(&mut self, update: &sqlparser::ast::Update, scopes: &mut Vec<Scope>) -> Checked<()> {
        let mut scope = Scope::default();
        self.add_from_item(&update.table, &mut scope, scopes)?;
        let target = scope.entries.first().and_then(|e| e.relation.clone());
        if let Some(
            UpdateTableFromKind::BeforeSet(tables) | UpdateTableFromKind::AfterSet(tables),
        ) = &update.from
        {
            for table in tables {
                self.add_from_item(table, &mut scope, scopes)?;
            }
        }
        scopes.push(scope);
        let result = (|| {
            match &target {
                Some(relation) => {
                    if relation.is_view {
                        if let Some(id) = relation.first_encrypted() {
                            return Err(self.write_refused(id, "a write through a view"));
                        }
                    }
                    self.assignments(&update.assignments, relation, scopes)?;
                }
                None => {
                    for assignment in &update.assignments {
                        self.value_not_encrypted(&assignment.value, scopes, "a value")?;
                    }
                }
            }
            if let Some(selection) = &update.selection {
                self.condition(selection, scopes)?;
            }
            if let Some(returning) = &update.returning {
                self.projection(returning, scopes)?;
            }
            Ok(())
        })();
        scopes.pop();
        result
    }

    fn copy(
        &mut self,
        source: &CopySource,
        to: bool,
        target: &CopyTarget,
        options: &[CopyOption],
        legacy_options: &[CopyLegacyOption],
        scopes: &mut Vec<Scope>,
    ) -> Checked<()> {
        let (relation, columns) = match source {
            CopySource::Query(query) => {
                let outputs = self.query(query, scopes)?;
                if let Some(id) = outputs.iter().find_map(|o| o.content.column()) {
                    return Err(self.copy_out_refused(id));
                }
                return Ok(());
            }
            CopySource::Table {
                table_name,
                columns,
            } => match self.relation(table_name)? {
                Some(relation) => (relation, columns),
                None => return Ok(()),
            },
        };
        let fields: Vec<Option<&RelationColumn>> = if columns.is_empty() {
            relation
                .columns
                .iter()
                .filter(|c| !c.generated)
                .map(Some)
                .collect()
        } else {
            // A column the relation lacks fails the COPY at the server, which then
            // ignores the data; it keeps its place so the fields stay aligned.
            columns
                .iter()
                .map(|c| relation.column(&normalise(c)))
                .collect()
        };
        let encrypted = fields.iter().flatten().find_map(|c| c.content.column());
        let Some(first) = encrypted else {
            return Ok(());
        };
        if to {
            return Err(self.copy_out_refused(first));
        }
        if relation.is_view {
            return Err(self.write_refused(first, "COPY through a view"));
        }
        if !matches!(target, CopyTarget::Stdin) {
            return Err(self.write_refused(first, "COPY FROM a server file or program"));
        }
        for column in &relation.columns {
            if let Content::Encrypted(id) = column.content {
                if column.has_default && !fields.iter().flatten().any(|f| f.name == column.name) {
                    return Err(self.write_refused(id, "the column's DEFAULT expression"));
                }
            }
        }
        let format = copy_format(options, legacy_options)
            .map_err(|what| self.unsupported(first, &format!("COPY FROM STDIN with {what}")))?;
        self.analysis.copy_in = Some(CopyIn {
            fields: fields
                .iter()
                .map(|c| match c.map(|c| c.content) {
                    Some(Content::Encrypted(id)) => Some(id),
                    _ => None,
                })
                .collect(),
            format,
        });
        Ok(())
    }

    fn copy_out_refused(&self, column: ColumnId) -> Box<Refusal> {
        Box::new(Refusal {
            kind: RefusalKind::Unsupported,
            column: Some(column),
            message: format!(
                "pgveil: COPY … TO of encrypted column {} is not supported",
                self.label(column)
            ),
            hint: "read the rows with SELECT, which pgveil decrypts",
        })
    }

    /// Every `$n` consumed as an encrypted value must be used only that way, for one
    /// column: elsewhere the server would see its ciphertext, or the wrong one.
    fn check_params(&mut self, statements: &[Statement]) -> Checked<()> {
        let mut all = PlaceholderFinder::default();
        for statement in statements {
            let _ = statement.visit(&mut all);
        }
        self.analysis.highest_param = all.found.iter().map(|(i, _)| *i).max().unwrap_or(0);
        let mut uses: HashMap<u32, (ColumnId, bool)> = HashMap::new();
        for param in &self.analysis.params {
            match uses.get(&param.index) {
                Some(&(column, lookup)) if column != param.column || lookup != param.lookup => {
                    return Err(Box::new(Refusal {
                        kind: RefusalKind::Unsupported,
                        column: Some(param.column),
                        message: format!(
                            "pgveil: parameter ${} is used for {} and elsewhere; each use needs its own encryption",
                            param.index,
                            self.label(param.column)
                        ),
                        hint: "pass the value in separate parameters",
                    }))
                }
                _ => {
                    uses.insert(param.index, (param.column, param.lookup));
                }
            }
        }
        for (index, span) in &all.found {
            let Some(&(column, _)) = uses.get(index) else {
                continue;
            };
            let Some(range) = self.offsets.range(*span) else {
                return Err(self.unsupported(column, "a parameter"));
            };
            if !self
                .param_spans
                .iter()
                .any(|(i, r)| i == index && *r == range)
            {
                return Err(Box::new(Refusal {
                    kind: RefusalKind::Unsupported,
                    column: Some(column),
                    message: format!(
                        "pgveil: parameter ${index} is used for {} and elsewhere; each use needs its own encryption",
                        self.label(column)
                    ),
                    hint: "pass the value in separate parameters",
                }));
            }
        }
        // One entry per parameter.
        let mut seen = std::collections::HashSet::new();
        self.analysis.params.retain(|p| seen.insert(p.index));
        Ok(())
    }
}

fn rename(mut outputs: Vec<Output>, alias: Option<&sqlparser::ast::TableAlias>) -> Vec<Output> {
    if let Some(alias) = alias {
        for (output, column) in outputs.iter_mut().zip(&alias.columns) {
            output.name = normalise(&column.name);
        }
    }
    outputs
}

fn placeholder_index(text: &str) -> Option<u32> {
    text.strip_prefix('$')?.parse().ok().filter(|&n| n > 0)
}

/// The text a literal stands for, or `None` for kinds that are not values.
fn literal_text(value: &Value) -> Option<String> {
    match value {
        Value::Number(n, _) => Some(n.clone()),
        Value::SingleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::UnicodeStringLiteral(s)
        | Value::NationalStringLiteral(s) => Some(s.clone()),
        Value::DollarQuotedString(s) => Some(s.value.clone()),
        Value::Boolean(b) => Some(if *b { "true" } else { "false" }.into()),
        _ => None,
    }
}

/// Builds the COPY … FROM data format from its options; `Err` names what is not
/// supported (binary data and FORCE options included).
fn copy_format(
    options: &[CopyOption],
    legacy: &[CopyLegacyOption],
) -> Result<CopyFormat, &'static str> {
    match copy_data_format(options, legacy, CopyDirection::From)? {
        CopyOutFormat::Rows(format) => Ok(format),
        CopyOutFormat::Binary => Err("FORMAT binary"),
    }
}

/// Whether every byte below 0x80 in text of the encoding `name` is that ASCII
/// character, so that delimiters, quotes, backslashes and line ends are found in the
/// bytes. Not so in SJIS, BIG5, GBK, GB18030, UHC and JOHAB, whose second bytes can be
/// ASCII. Names are compared as PostgreSQL does: letters and digits only, any case. An
/// unknown name fails the statement at the server.
pub fn ascii_safe_encoding(name: &str) -> bool {
    !matches!(
        encoding_key(name).as_str(),
        "sjis"
            | "shiftjis"
            | "mskanji"
            | "win932"
            | "windows932"
            | "shiftjis2004"
            | "big5"
            | "win950"
            | "windows950"
            | "gbk"
            | "win936"
            | "windows936"
            | "gb18030"
            | "uhc"
            | "win949"
            | "windows949"
            | "johab"
    )
}

/// Whether the encoding `name` (compared as in [`ascii_safe_encoding`]) is UTF-8.
pub fn is_utf8_encoding(name: &str) -> bool {
    matches!(encoding_key(name).as_str(), "utf8" | "unicode")
}

/// An encoding name as PostgreSQL compares it: its letters and digits, lower-cased.
fn encoding_key(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Collects identifiers outside nested queries, and the nested queries themselves.
struct ReferenceFinder {
    depth: usize,
    references: Vec<Expr>,
    queries: Vec<Query>,
}

impl Visitor for ReferenceFinder {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if self.depth == 0 {
            self.queries.push(query.clone());
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if self.depth == 0
            && matches!(
                expr,
                Expr::Identifier(_) | Expr::CompoundIdentifier(_) | Expr::QualifiedWildcard(..)
            )
        {
            let reference = match expr {
                // `c.*` inside an expression: the whole row of `c`.
                Expr::QualifiedWildcard(name, _) => Expr::Identifier(Ident::new(
                    name_parts(name).last().cloned().unwrap_or_default(),
                )),
                other => other.clone(),
            };
            self.references.push(reference);
        }
        ControlFlow::Continue(())
    }
}

/// Every `$n` placeholder with its position.
#[derive(Default)]
struct PlaceholderFinder {
    found: Vec<(u32, sqlparser::tokenizer::Span)>,
}

impl Visitor for PlaceholderFinder {
    type Break = ();

    fn pre_visit_value(&mut self, value: &sqlparser::ast::ValueWithSpan) -> ControlFlow<()> {
        if let Value::Placeholder(text) = &value.value {
            if let Some(index) = placeholder_index(text) {
                self.found.push((index, value.span));
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests;
