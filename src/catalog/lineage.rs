//! Column lineage of views: for each output column of a view (or materialized view),
//! which columns of the relations it reads its value comes from.
//!
//! PostgreSQL's RowDescription names a view column by the view's OID and attribute
//! number, so the masking rule of the base column behind it has to be found here, from
//! the view's stored query tree (`pg_rewrite.ev_action` of its `_RETURN` rule, parsed by
//! [`super::node_tree`]). A column that passes a base column through unchanged is a
//! [`ColumnLineage::Copy`]; anything else is [`ColumnLineage::Computed`] from the
//! columns that flow into it.
//!
//! This module must never report fewer sources than the value really depends on: what
//! it cannot follow precisely (an unknown kind of range-table entry, a reference that
//! points nowhere, a node of unexpected shape, a tree too deep or too costly to walk)
//! makes that column depend on every whole relation the view mentions. Filtering and
//! grouping (WHERE, JOIN ... ON, GROUP BY, window PARTITION BY / ORDER BY) do not count
//! as sources: only the expressions that compute a value do, and a sub-query inside such
//! an expression counts whole, its own WHERE included. It only interprets text; it does
//! no I/O and never panics on input.

use std::collections::{BTreeSet, HashMap};

use thiserror::Error;

use super::node_tree::{self, Node, ParseError, MAX_DEPTH};

/// One column of one relation, as PostgreSQL's catalogs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnRef {
    /// The relation's OID (`pg_class.oid`); it may be a view, which the caller resolves
    /// in turn.
    pub relation: u32,
    /// The attribute number; 0 stands for the whole row, i.e. every column of the
    /// relation. Negative numbers are system columns (`ctid`, `xmin`...).
    pub attnum: i16,
}

/// Where a view column's values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnLineage {
    /// The value is that column's value, unchanged (possibly NULL, as on the nullable
    /// side of an outer join).
    Copy(ColumnRef),
    /// The value is computed from these columns: sorted, without duplicates. Empty means
    /// it depends on no relation column (a constant, `count(*)`...).
    Computed(Vec<ColumnRef>),
}

/// Why a view's lineage cannot be given at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LineageError {
    #[error("cannot parse the view's query tree: {0}")]
    Parse(#[from] ParseError),
    #[error("the view's query tree is not as expected: {0}")]
    Shape(&'static str),
}

/// PostgreSQL's `RTEKind` values in 15 (`parsenodes.h`), which `:rtekind` carries.
mod rte_kind {
    pub const RELATION: i64 = 0;
    pub const SUBQUERY: i64 = 1;
    pub const JOIN: i64 = 2;
    pub const FUNCTION: i64 = 3;
    pub const TABLEFUNC: i64 = 4;
    pub const VALUES: i64 = 5;
    pub const CTE: i64 = 6;
}

/// `CMD_SELECT` in PostgreSQL's `CmdType`; a view's queries are all SELECTs.
const CMD_SELECT: i64 = 1;

/// Most steps (resolutions and nodes visited) one view may cost. Real views need a few
/// thousand; the bound keeps hostile trees whose references branch and loop (a join
/// alias that refers to itself twice) from taking exponential time. Running out fails
/// closed.
const STEP_BUDGET: usize = 1_000_000;

/// The lineage of each output column of a view: `(attnum, lineage)` in target-list
/// order, one per non-junk target entry of the view's query (its `resno` is the view
/// column's attribute number).
///
/// `ev_action` is the text of `pg_rewrite.ev_action` for the view's `_RETURN` rule, as
/// PostgreSQL 15 writes it. Text that is not a node tree, or not a list holding one
/// query with a target list, is an error; anything that parses but cannot be followed is
/// answered conservatively (see the module documentation).
pub fn view_lineage(ev_action: &str) -> Result<Vec<(i16, ColumnLineage)>, LineageError> {
    let tree = node_tree::parse(ev_action)?;
    let query = match tree.as_list() {
        Some([query]) if query.is_struct("QUERY") => query,
        _ => return Err(LineageError::Shape("ev_action is not a list of one query")),
    };
    let everything = all_relations(query)?;
    let targets = query
        .field("targetList")
        .and_then(Node::as_list)
        .ok_or(LineageError::Shape("the view's query has no target list"))?;
    let mut resolver = Resolver::new();
    let scopes = [query];
    let mut columns = Vec::with_capacity(targets.len());
    for entry in targets {
        if !entry.is_struct("TARGETENTRY") {
            return Err(LineageError::Shape(
                "a target list item is not a TARGETENTRY",
            ));
        }
        let junk = entry
            .field("resjunk")
            .and_then(Node::as_bool)
            .ok_or(LineageError::Shape("a target entry has no resjunk flag"))?;
        if junk {
            continue;
        }
        let resno = entry
            .field("resno")
            .and_then(Node::as_int)
            .and_then(|n| i16::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or(LineageError::Shape("a target entry has no valid resno"))?;
        // Through `query_column` rather than the entry's expression, so that a set
        // operation's output is taken from every arm (its target list names only the
        // first).
        let derived = resolver.query_column(&scopes, resno, 0);
        columns.push((resno, derived.into_lineage(&everything)));
    }
    Ok(columns)
}

/// Every relation the view's tree names anywhere, as whole-row references: the
/// fail-closed answer for a column that cannot be followed.
///
/// The two placeholder entries PostgreSQL 15 puts first in a view's range table (`old`
/// and `new`, both the view itself, not in FROM) are left out: they are never read, and
/// naming the view as its own source would send a caller that resolves views on views in
/// a loop.
fn all_relations(query: &Node) -> Result<Vec<ColumnRef>, LineageError> {
    let placeholders: Vec<*const Node> = query
        .field("rtable")
        .and_then(Node::as_list)
        .unwrap_or_default()
        .iter()
        .take(2)
        .filter(|rte| is_view_placeholder(rte))
        .map(std::ptr::from_ref)
        .collect();
    let mut found = BTreeSet::new();
    // An explicit stack, not recursion: the walk must not depend on the tree's depth.
    let mut pending = vec![query];
    while let Some(node) = pending.pop() {
        match node {
            Node::Struct { name, fields } => {
                if name == "RANGETBLENTRY" && !placeholders.contains(&std::ptr::from_ref(node)) {
                    // Any entry with a relation OID counts, whatever its kind claims to
                    // be: an entry this module does not understand may still read it.
                    match node.field("relid") {
                        None | Some(Node::Null) => {}
                        Some(relid) => match relid.as_int().and_then(|n| u32::try_from(n).ok()) {
                            Some(0) => {}
                            Some(relation) => {
                                found.insert(ColumnRef {
                                    relation,
                                    attnum: 0,
                                });
                            }
                            None => {
                                return Err(LineageError::Shape(
                                    "a range-table entry has an invalid relid",
                                ))
                            }
                        },
                    }
                }
                pending.extend(fields.iter().map(|(_, value)| value));
            }
            Node::List(items) => pending.extend(items),
            _ => {}
        }
    }
    Ok(found.into_iter().collect())
}

fn is_view_placeholder(rte: &Node) -> bool {
    let alias = rte
        .field("alias")
        .and_then(|alias| alias.field("aliasname"))
        .and_then(Node::as_str);
    rte.field("rtekind").and_then(Node::as_int) == Some(rte_kind::RELATION)
        && rte.field("inFromCl").and_then(Node::as_bool) == Some(false)
        && matches!(rte.field("relkind").and_then(Node::as_str), Some("v" | "m"))
        && matches!(alias, Some("old" | "new"))
}

/// What one expression or column is derived from, while the analysis runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Derived {
    /// Exactly this column's value.
    Copy(ColumnRef),
    /// Computed from these columns.
    Computed(BTreeSet<ColumnRef>),
    /// Could not be followed: every relation of the view, whole.
    Unknown,
}

impl Derived {
    fn nothing() -> Self {
        Derived::Computed(BTreeSet::new())
    }

    fn into_computed(self) -> Self {
        match self {
            Derived::Copy(column) => Derived::Computed(BTreeSet::from([column])),
            other => other,
        }
    }

    /// Adds `other`'s sources; the result is never a copy, because it mixes values.
    fn absorb(&mut self, other: Derived) {
        let mine = std::mem::replace(self, Derived::Unknown).into_computed();
        *self = match (mine, other.into_computed()) {
            (Derived::Computed(mut sources), Derived::Computed(more)) => {
                sources.extend(more);
                Derived::Computed(sources)
            }
            _ => Derived::Unknown,
        };
    }

    fn into_lineage(self, everything: &[ColumnRef]) -> ColumnLineage {
        match self {
            Derived::Copy(column) => ColumnLineage::Copy(column),
            Derived::Computed(sources) => ColumnLineage::Computed(sources.into_iter().collect()),
            Derived::Unknown => ColumnLineage::Computed(everything.to_vec()),
        }
    }
}

/// Follows references through a view's query tree.
///
/// `scopes` is the chain of queries from the view's top query down to the one whose
/// expressions are being read (the last); a VAR with `varlevelsup` n belongs to the
/// query n places from the end. `depth` counts nested calls (every call passes one more
/// to its callees) and is bounded by [`MAX_DEPTH`], so that the Rust stack stays
/// bounded whatever the tree says: hops through joins and CTEs are not bounded by the
/// tree's own depth, and a hostile tree can make them loop.
struct Resolver {
    steps_left: usize,
    /// The current approximation of each recursive CTE being solved, by the address of
    /// its COMMONTABLEEXPR node: what a self-reference reads.
    solving: HashMap<*const Node, Vec<Derived>>,
    /// The solved columns of recursive CTEs, by the same key, kept only when they were
    /// solved outside any other CTE's solving (and so depend on no approximation).
    solved: HashMap<*const Node, Vec<Derived>>,
}

impl Resolver {
    fn new() -> Self {
        Resolver {
            steps_left: STEP_BUDGET,
            solving: HashMap::new(),
            solved: HashMap::new(),
        }
    }

    /// Takes one step; false when the walk must stop here and fail closed.
    fn step(&mut self, depth: usize) -> bool {
        if depth > MAX_DEPTH || self.steps_left == 0 {
            return false;
        }
        self.steps_left -= 1;
        true
    }

    /// Output column `attno` (0: the whole row) of the last query in `scopes`.
    fn query_column(&mut self, scopes: &[&Node], attno: i16, depth: usize) -> Derived {
        if !self.step(depth) {
            return Derived::Unknown;
        }
        let Some(&query) = scopes.last() else {
            return Derived::Unknown;
        };
        if !query.is_struct("QUERY")
            || query.field("commandType").and_then(Node::as_int) != Some(CMD_SELECT)
        {
            return Derived::Unknown;
        }
        match query.field("setOperations") {
            Some(Node::Null) => {}
            Some(operations) => {
                return self.set_operation_column(scopes, operations, attno, depth + 1)
            }
            None => return Derived::Unknown,
        }
        let Some(targets) = query.field("targetList").and_then(Node::as_list) else {
            return Derived::Unknown;
        };
        let mut outputs = targets
            .iter()
            .filter(|entry| entry.field("resjunk").and_then(Node::as_bool) == Some(false));
        if attno == 0 {
            let mut row = Derived::nothing();
            for entry in outputs {
                row.absorb(self.entry(scopes, entry, depth + 1));
            }
            return row;
        }
        match outputs
            .find(|entry| entry.field("resno").and_then(Node::as_int) == Some(attno.into()))
        {
            Some(entry) => self.entry(scopes, entry, depth + 1),
            None => Derived::Unknown,
        }
    }

    fn entry<'a>(&mut self, scopes: &[&'a Node], entry: &'a Node, depth: usize) -> Derived {
        match entry.field("expr") {
            Some(expr) => self.expression(scopes, expr, depth + 1),
            None => Derived::Unknown,
        }
    }

    /// Column `attno` of a set operation: the union of that column in every arm, never a
    /// copy, since each row comes from one arm or another.
    fn set_operation_column<'a>(
        &mut self,
        scopes: &[&'a Node],
        operation: &'a Node,
        attno: i16,
        depth: usize,
    ) -> Derived {
        if !self.step(depth) {
            return Derived::Unknown;
        }
        match operation.struct_name() {
            Some("SETOPERATIONSTMT") => {
                let mut sources = Derived::nothing();
                for side in ["larg", "rarg"] {
                    let arm = match operation.field(side) {
                        Some(arm) => self.set_operation_column(scopes, arm, attno, depth + 1),
                        None => Derived::Unknown,
                    };
                    sources.absorb(arm);
                }
                sources
            }
            Some("RANGETBLREF") => match operation.field("rtindex").and_then(Node::as_int) {
                Some(rtindex) => self
                    .range_column(scopes, rtindex, attno, depth + 1)
                    .into_computed(),
                None => Derived::Unknown,
            },
            _ => Derived::Unknown,
        }
    }

    /// An expression of the last query in `scopes`: a plain VAR keeps what it refers to
    /// (possibly a copy); anything else is computed from every VAR inside it.
    fn expression<'a>(&mut self, scopes: &[&'a Node], expr: &'a Node, depth: usize) -> Derived {
        if expr.is_struct("VAR") {
            return self.var(scopes, expr, depth + 1);
        }
        let mut sources = Derived::nothing();
        self.collect(scopes, expr, &mut sources, depth + 1);
        sources
    }

    /// Adds the sources of every VAR in `node` to `sources`. A sub-query (a SubLink's
    /// `subselect`, or anything else that holds a QUERY) opens a new scope and counts
    /// every VAR anywhere in it: target list, WHERE, join conditions, GROUP BY, HAVING,
    /// ORDER BY, LIMIT and its own FROM items. That is more than the value strictly
    /// needs, and chosen because it cannot miss a column whatever kind of sub-link
    /// (EXISTS, IN, scalar, ARRAY) it is.
    fn collect<'a>(
        &mut self,
        scopes: &[&'a Node],
        node: &'a Node,
        sources: &mut Derived,
        depth: usize,
    ) {
        if *sources == Derived::Unknown {
            // Nothing can widen it further.
            return;
        }
        if !self.step(depth) {
            *sources = Derived::Unknown;
            return;
        }
        match node {
            Node::Struct { name, .. } if name == "VAR" => {
                let var = self.var(scopes, node, depth + 1);
                sources.absorb(var);
            }
            Node::Struct { name, fields } if name == "QUERY" => {
                let mut inner = scopes.to_vec();
                inner.push(node);
                for (_, value) in fields {
                    self.collect(&inner, value, sources, depth + 1);
                }
            }
            Node::Struct { fields, .. } => {
                for (_, value) in fields {
                    self.collect(scopes, value, sources, depth + 1);
                }
            }
            Node::List(items) => {
                for item in items {
                    self.collect(scopes, item, sources, depth + 1);
                }
            }
            _ => {}
        }
    }

    fn var<'a>(&mut self, scopes: &[&'a Node], var: &'a Node, depth: usize) -> Derived {
        if !self.step(depth) {
            return Derived::Unknown;
        }
        let int = |name| var.field(name).and_then(Node::as_int);
        let (Some(varno), Some(attno), Some(levels_up)) =
            (int("varno"), int("varattno"), int("varlevelsup"))
        else {
            return Derived::Unknown;
        };
        let Ok(attno) = i16::try_from(attno) else {
            return Derived::Unknown;
        };
        match query_level(scopes, levels_up) {
            Some(level) => self.range_column(&scopes[..=level], varno, attno, depth + 1),
            None => Derived::Unknown,
        }
    }

    /// Column `attno` (0: the whole row) of range-table entry `rtindex` (1-based) of the
    /// last query in `scopes`.
    fn range_column(
        &mut self,
        scopes: &[&Node],
        rtindex: i64,
        attno: i16,
        depth: usize,
    ) -> Derived {
        if !self.step(depth) {
            return Derived::Unknown;
        }
        let entry = scopes
            .last()
            .and_then(|query| query.field("rtable"))
            .and_then(Node::as_list)
            .zip(usize::try_from(rtindex).ok().and_then(|n| n.checked_sub(1)))
            .and_then(|(rtable, index)| rtable.get(index));
        let Some(entry) = entry.filter(|entry| entry.is_struct("RANGETBLENTRY")) else {
            return Derived::Unknown;
        };
        if scopes.len() == 1 && rtindex <= 2 && is_view_placeholder(entry) {
            // Nothing reads the view's own placeholders; a reference to one would make
            // the view its own source.
            return Derived::Unknown;
        }
        let Some(kind) = entry.field("rtekind").and_then(Node::as_int) else {
            return Derived::Unknown;
        };
        match kind {
            rte_kind::RELATION => {
                let relid = entry.field("relid").and_then(Node::as_int);
                match relid.and_then(|n| u32::try_from(n).ok()) {
                    Some(relation) if attno == 0 => {
                        Derived::Computed(BTreeSet::from([ColumnRef {
                            relation,
                            attnum: 0,
                        }]))
                    }
                    Some(relation) => Derived::Copy(ColumnRef {
                        relation,
                        attnum: attno,
                    }),
                    None => Derived::Unknown,
                }
            }
            rte_kind::SUBQUERY => match entry.field("subquery") {
                Some(subquery) => {
                    let mut inner = scopes.to_vec();
                    inner.push(subquery);
                    self.query_column(&inner, attno, depth + 1)
                }
                None => Derived::Unknown,
            },
            rte_kind::JOIN => {
                let Some(aliases) = entry.field("joinaliasvars").and_then(Node::as_list) else {
                    return Derived::Unknown;
                };
                if attno == 0 {
                    let mut row = Derived::nothing();
                    for alias in aliases {
                        row.absorb(self.join_alias(scopes, alias, depth + 1));
                    }
                    return row;
                }
                match usize::try_from(attno).ok().and_then(|n| aliases.get(n - 1)) {
                    Some(alias) => self.join_alias(scopes, alias, depth + 1),
                    None => Derived::Unknown,
                }
            }
            // A function's output depends on its arguments, which may read columns of
            // earlier FROM items (LATERAL); with none, it depends on no column.
            rte_kind::FUNCTION => self.computed_from(scopes, entry.field("functions"), depth + 1),
            rte_kind::TABLEFUNC => self.computed_from(scopes, entry.field("tablefunc"), depth + 1),
            rte_kind::VALUES => {
                let Some(rows) = entry.field("values_lists").and_then(Node::as_list) else {
                    return Derived::Unknown;
                };
                if attno == 0 {
                    return self.computed_from(scopes, entry.field("values_lists"), depth + 1);
                }
                let mut column = Derived::nothing();
                for row in rows {
                    let cell = row
                        .as_list()
                        .zip(usize::try_from(attno).ok())
                        .and_then(|(cells, n)| cells.get(n - 1));
                    match cell {
                        Some(cell) => self.collect(scopes, cell, &mut column, depth + 1),
                        None => return Derived::Unknown,
                    }
                }
                column
            }
            rte_kind::CTE => self.cte_column(scopes, entry, attno, depth + 1),
            // Named tuplestores and empty FROM clauses have no columns a view can read;
            // anything else is unknown to this module.
            _ => Derived::Unknown,
        }
    }

    fn join_alias<'a>(&mut self, scopes: &[&'a Node], alias: &'a Node, depth: usize) -> Derived {
        if alias.is_null() {
            // The alias of a dropped column: nothing can refer to it.
            return Derived::Unknown;
        }
        self.expression(scopes, alias, depth + 1)
    }

    fn computed_from<'a>(
        &mut self,
        scopes: &[&'a Node],
        node: Option<&'a Node>,
        depth: usize,
    ) -> Derived {
        match node {
            Some(node) => {
                let mut sources = Derived::nothing();
                self.collect(scopes, node, &mut sources, depth + 1);
                sources
            }
            None => Derived::Unknown,
        }
    }

    /// Column `attno` of a CTE reference: the CTE's query column, found by name in the
    /// query `ctelevelsup` levels up. A recursive CTE is solved as a whole (see
    /// `solve_recursive`) and is never a copy.
    fn cte_column<'a>(
        &mut self,
        scopes: &[&'a Node],
        entry: &'a Node,
        attno: i16,
        depth: usize,
    ) -> Derived {
        if !self.step(depth) {
            return Derived::Unknown;
        }
        let name = entry.field("ctename").and_then(Node::as_str);
        let levels_up = entry.field("ctelevelsup").and_then(Node::as_int);
        let (Some(name), Some(level)) = (name, levels_up.and_then(|n| query_level(scopes, n)))
        else {
            return Derived::Unknown;
        };
        let cte = scopes[level]
            .field("cteList")
            .and_then(Node::as_list)
            .unwrap_or_default()
            .iter()
            .find(|cte| {
                cte.is_struct("COMMONTABLEEXPR")
                    && cte.field("ctename").and_then(Node::as_str) == Some(name)
            });
        let Some(cte) = cte else {
            return Derived::Unknown;
        };
        let (Some(query), Some(recursive)) = (
            cte.field("ctequery"),
            cte.field("cterecursive").and_then(Node::as_bool),
        ) else {
            return Derived::Unknown;
        };
        let mut inner = scopes[..=level].to_vec();
        inner.push(query);
        let key = std::ptr::from_ref(cte);
        if let Some(columns) = self.solving.get(&key).or_else(|| self.solved.get(&key)) {
            return pick_column(columns, attno);
        }
        if !recursive {
            return self.query_column(&inner, attno, depth + 1);
        }
        let columns = self.solve_recursive(key, &inner, depth + 1);
        let column = pick_column(&columns, attno);
        if self.solving.is_empty() {
            self.solved.insert(key, columns);
        }
        column
    }

    /// The sources of every column of a recursive CTE, by fixed-point iteration: start
    /// from "no sources", let self-references read the current approximation, and
    /// repeat until nothing changes. Sources only grow, and a column's sources arrive
    /// through chains of at most one step per column, so `columns + 1` rounds settle it
    /// and one more confirms; not settling by then fails closed.
    fn solve_recursive(
        &mut self,
        key: *const Node,
        scopes: &[&Node],
        depth: usize,
    ) -> Vec<Derived> {
        let count = scopes
            .last()
            .and_then(|query| query.field("targetList"))
            .and_then(Node::as_list)
            .map_or(0, |targets| {
                targets
                    .iter()
                    .filter(|entry| entry.field("resjunk").and_then(Node::as_bool) == Some(false))
                    .count()
            });
        let Ok(last) = i16::try_from(count) else {
            return vec![Derived::Unknown; count];
        };
        self.solving.insert(key, vec![Derived::nothing(); count]);
        let mut settled = false;
        for _ in 0..count + 2 {
            let next: Vec<Derived> = (1..=last)
                .map(|attno| self.query_column(scopes, attno, depth + 1).into_computed())
                .collect();
            let previous = self.solving.insert(key, next);
            if previous.as_ref() == self.solving.get(&key) {
                settled = true;
                break;
            }
        }
        let columns = self.solving.remove(&key).unwrap_or_default();
        if settled {
            columns
        } else {
            vec![Derived::Unknown; count]
        }
    }
}

/// Index in `scopes` of the query `levels_up` levels above the last one.
fn query_level(scopes: &[&Node], levels_up: i64) -> Option<usize> {
    let levels_up = usize::try_from(levels_up).ok()?;
    scopes.len().checked_sub(levels_up.checked_add(1)?)
}

/// Column `attno` (0: all of them) of a solved CTE, as a computed value.
fn pick_column(columns: &[Derived], attno: i16) -> Derived {
    if attno == 0 {
        let mut row = Derived::nothing();
        for column in columns {
            row.absorb(column.clone());
        }
        return row;
    }
    usize::try_from(attno)
        .ok()
        .and_then(|n| columns.get(n - 1))
        .cloned()
        .unwrap_or(Derived::Unknown)
        .into_computed()
}

#[cfg(test)]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests;
