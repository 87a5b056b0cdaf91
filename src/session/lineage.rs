//! What the read guard knows of where a session's result columns come from: the
//! lineage of each statement it sent that names a relation with protected columns (or
//! makes or runs a cursor or prepared statement), analysed when the Query or Parse is
//! sent and kept until its results come back; and the session's SQL cursors and
//! prepared statements by name, since a FETCH or EXECUTE returns their rows. Sans-IO.
//!
//! It never decides what a role gets (the guard does), and keeps statement texts only
//! to analyse them again under a newer policy or catalog, never values taken apart.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::engine::{LineageAnalysis, Protection};
use crate::sql::lineage::{StatementKind, StatementLineage};

/// Most cursors and prepared statements remembered by name.
const MAX_NAMES: usize = 4096;

/// One statement of an analysed text.
#[derive(Debug, Clone)]
pub struct StatementRef {
    text: Arc<[u8]>,
    index: usize,
    /// The statement a PREPARE at `index` prepares, rather than the PREPARE itself.
    prepared: bool,
    generation: u64,
    /// `None`: the text could not be analysed.
    lineage: Option<Arc<StatementLineage>>,
}

impl StatementRef {
    pub fn new(
        text: Arc<[u8]>,
        analysis: &LineageAnalysis,
        index: usize,
        generation: u64,
    ) -> StatementRef {
        let lineage = analysis
            .as_ref()
            .ok()
            .and_then(|statements| statements.get(index))
            .map(|statement| Arc::new(statement.clone()));
        StatementRef {
            text,
            index,
            prepared: false,
            generation,
            lineage,
        }
    }

    /// The cursor it declares, when it is a DECLARE.
    pub fn declared_cursor(&self) -> Option<&str> {
        match &self.lineage.as_deref()?.kind {
            StatementKind::Declare { cursor } => Some(cursor),
            _ => None,
        }
    }

    /// The statement it PREPAREs, when it is a PREPARE.
    fn prepared_statement(&self) -> Option<StatementRef> {
        match &self.lineage.as_deref()?.kind {
            StatementKind::Prepare { statement, .. } => Some(StatementRef {
                prepared: true,
                lineage: Some(Arc::new((**statement).clone())),
                ..self.clone()
            }),
            _ => None,
        }
    }

    /// The lineage under `protection`: analysed again from the text when the policy or
    /// catalog changed since (column ids and relations may differ). `None`: the text
    /// cannot be analysed.
    pub fn current(&self, protection: &Protection) -> Option<Arc<StatementLineage>> {
        if self.generation == protection.generation {
            return self.lineage.clone();
        }
        let analysis = protection.lineage(&self.text);
        let statement = analysis.as_ref().as_ref().ok()?.get(self.index)?;
        Some(Arc::new(match (&statement.kind, self.prepared) {
            (StatementKind::Prepare { statement, .. }, true) => (**statement).clone(),
            (_, true) => return None,
            _ => statement.clone(),
        }))
    }
}

/// Where the columns of one result come from.
#[derive(Debug, Clone)]
pub enum Computed {
    /// The statement names no relation with protected columns: a column the server
    /// reports as computed reveals nothing protected.
    Nothing,
    Known(Arc<StatementLineage>),
    /// Rows of a cursor or prepared statement pgveil did not see made, or of a text it
    /// could not analyse: what this says.
    Unknown(String),
}

/// An analysed simple Query: the executing requests sent before it, its text, the
/// analysis, and the protection generation it was made under.
type SentQuery = (u64, Arc<[u8]>, Arc<LineageAnalysis>, u64);

/// The session's analysed statements, cursors and prepared statements.
#[derive(Debug, Default)]
pub struct SessionLineage {
    /// Simple Queries analysed, by the executing requests sent before each.
    queries: VecDeque<SentQuery>,
    /// The Query being answered and how many of its statements have ended.
    answering: Option<(u64, usize)>,
    cursors: HashMap<String, StatementRef>,
    prepared: HashMap<String, StatementRef>,
}

impl SessionLineage {
    /// A simple Query was analysed and sent: its statements run in order.
    pub fn query_sent(
        &mut self,
        sent_after: u64,
        text: Arc<[u8]>,
        analysis: Arc<LineageAnalysis>,
        generation: u64,
    ) {
        if let Ok(statements) = analysis.as_ref() {
            for index in 0..statements.len() {
                self.statement_runs(&StatementRef::new(
                    text.clone(),
                    &analysis,
                    index,
                    generation,
                ));
            }
        }
        self.queries
            .push_back((sent_after, text, analysis, generation));
    }

    /// A statement is sent to run (a Query's, or an Execute's portal's): note the
    /// cursors and prepared statements it makes or drops.
    pub fn statement_runs(&mut self, statement: &StatementRef) {
        let Some(lineage) = statement.lineage.as_deref() else {
            return;
        };
        if self.cursors.len() + self.prepared.len() >= MAX_NAMES {
            // Forgotten names make their FETCH or EXECUTE unknown: refused, not passed.
            self.cursors.clear();
            self.prepared.clear();
        }
        match &lineage.kind {
            StatementKind::Declare { cursor } => {
                self.cursors.insert(cursor.clone(), statement.clone());
            }
            StatementKind::Close {
                cursor: Some(cursor),
            } => {
                self.cursors.remove(cursor);
            }
            StatementKind::Close { cursor: None } => self.cursors.clear(),
            StatementKind::Prepare { name, .. } => {
                if let Some(prepared) = statement.prepared_statement() {
                    self.prepared.insert(name.clone(), prepared);
                }
            }
            StatementKind::Deallocate { name: Some(name) } => {
                self.prepared.remove(name);
            }
            StatementKind::Deallocate { name: None } => self.prepared.clear(),
            _ => {}
        }
    }

    /// `DISCARD ALL` or the like dropped every cursor and prepared statement.
    pub fn forget_all(&mut self) {
        self.cursors.clear();
        self.prepared.clear();
    }

    /// The statement of the simple Query sent after `sent_after` executing requests
    /// that the server answers now; `None` when that Query was not analysed.
    pub fn answering_query(&mut self, sent_after: u64) -> Option<StatementRef> {
        while self
            .queries
            .front()
            .is_some_and(|(sent, ..)| *sent < sent_after)
        {
            self.queries.pop_front();
        }
        let (sent, text, analysis, generation) = self.queries.front()?;
        if *sent != sent_after {
            return None;
        }
        let index = match self.answering {
            Some((query, ended)) if query == sent_after => ended,
            _ => 0,
        };
        Some(StatementRef::new(
            text.clone(),
            analysis,
            index,
            *generation,
        ))
    }

    /// A statement of the simple Query sent after `sent_after` requests ended
    /// (CommandComplete or EmptyQueryResponse): the next result is the next one's.
    pub fn query_statement_ended(&mut self, sent_after: u64) {
        self.answering = match self.answering {
            Some((query, ended)) if query == sent_after => Some((query, ended + 1)),
            _ => Some((sent_after, 1)),
        };
    }

    /// Where the rows of `statement` come from: its own lineage, or the cursor's or
    /// prepared statement's it runs.
    pub fn computed(&self, statement: &StatementRef, protection: &Protection) -> Computed {
        let Some(lineage) = statement.current(protection) else {
            return Computed::Unknown("a statement pgveil cannot analyse".into());
        };
        let target = match &lineage.kind {
            StatementKind::Fetch { cursor } => match self.cursors.get(cursor) {
                Some(declared) => declared.current(protection),
                None => {
                    return Computed::Unknown(format!(
                        "cursor \"{cursor}\", which pgveil did not see declared"
                    ))
                }
            },
            StatementKind::Execute { name } => match self.prepared.get(name) {
                Some(prepared) => prepared.current(protection),
                None => {
                    return Computed::Unknown(format!(
                        "prepared statement \"{name}\", which pgveil did not see prepared"
                    ))
                }
            },
            _ => return Computed::Known(lineage),
        };
        match target {
            Some(lineage) => Computed::Known(lineage),
            None => {
                Computed::Unknown("a cursor or prepared statement pgveil cannot analyse".into())
            }
        }
    }

    /// Whether SQL PREPARE made any statement still known.
    #[inline]
    pub fn has_sql_prepared(&self) -> bool {
        !self.prepared.is_empty()
    }

    /// The statement SQL PREPARE made under `name` (protocol Bind can run it).
    pub fn sql_prepared(&self, name: &[u8]) -> Option<StatementRef> {
        std::str::from_utf8(name)
            .ok()
            .and_then(|name| self.prepared.get(name))
            .cloned()
    }

    /// Where the rows of SQL cursor `name` come from, when a protocol Execute runs it
    /// as a portal.
    pub fn cursor(&self, name: &str, protection: &Protection) -> Computed {
        match self
            .cursors
            .get(name)
            .map(|declared| declared.current(protection))
        {
            Some(Some(lineage)) => Computed::Known(lineage),
            Some(None) => {
                Computed::Unknown(format!("cursor \"{name}\", which pgveil cannot analyse"))
            }
            None => Computed::Unknown(format!(
                "portal \"{name}\", which pgveil did not see declared or bound"
            )),
        }
    }

    /// The cursor a statement fetches from, for row limits across FETCHes.
    pub fn fetched_cursor(statement: &StatementRef) -> Option<&str> {
        match &statement.lineage.as_deref()?.kind {
            StatementKind::Fetch { cursor } => Some(cursor),
            _ => None,
        }
    }
}
