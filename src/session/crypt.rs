//! The write path of encryption for one session: statements that name a relation with
//! encrypted columns are analysed (`sql::encryption`) and rewritten before the server
//! sees them — literals become ciphertext, Parse parameter types are loosened so the
//! server accepts ciphertext, Bind parameters are encrypted, COPY … FROM STDIN rows get
//! their encrypted fields replaced — and ParameterDescription shows clients the
//! logical types again.
//!
//! Sans-IO, like the rest of the session bookkeeping. It must never forward a value
//! bound for an encrypted column in plaintext: anything it cannot encrypt becomes a
//! refusal, and the caller sends the server a request that fails instead.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::copy_in::{CopyStream, EncryptedField};
use super::state::SessionState;
use crate::engine::Protection;
use crate::observe::metrics::DenyReason;
use crate::policy::{ColumnId, Policy};
use crate::protect::column_crypto::ColumnCrypto;
use crate::sql::encryption::{
    analyse, ascii_safe_encoding, Analysis, CopyIn, Edit, Knowledge, Operand, ParamUse, RefusalKind,
};
use crate::wire::bind::{
    decode_parameter_description, encode_bind, encode_parameter_description, encode_parse, Bind,
};
use crate::wire::frame::encode_frame;
use crate::wire::messages::{
    execute_portal, BindNames, MalformedMessage, Parse, Target, TargetName,
};

/// Why a client request is refused before the server sees it.
#[derive(Debug, Clone)]
pub struct WriteRefusal {
    pub sqlstate: &'static str,
    pub reason: DenyReason,
    pub column: Option<ColumnId>,
    pub message: String,
    pub hint: String,
}

/// What to do with one client message.
#[derive(Debug)]
pub enum ClientAction {
    Forward,
    /// Send these frames instead.
    Replace(Vec<u8>),
    Refuse(Box<WriteRefusal>),
    Drop,
    /// The COPY's data cannot go on: send the server a CopyFail instead (`frame`), and
    /// show the client the refusal in place of the server's error for `request`.
    FailCopy {
        frame: Vec<u8>,
        refusal: Box<WriteRefusal>,
        request: u64,
        statement: Vec<u8>,
    },
}

/// What pgveil did to a prepared statement, for its Binds and Describes.
#[derive(Debug)]
struct StatementPlan {
    /// The policy it was analysed under: under another, it may encrypt too little.
    policy: Arc<Policy>,
    /// Parameters bound for encrypted columns.
    params: Vec<ParamUse>,
    /// Parameters pgveil added (after the client's): for each, the client's parameter
    /// it repeats and the index of the keyring key (in the cipher's order) it is
    /// encrypted under.
    extras: Vec<(u32, usize)>,
    /// How many parameters the client knows of.
    client_params: usize,
    /// A COPY … FROM STDIN into encrypted columns: its rows are rewritten.
    copy: Option<Arc<CopyPlan>>,
    /// The protection (policy and catalog) generation it was analysed under, and what
    /// the analysis found (`None`: nothing to encrypt). Under a newer catalog the text
    /// must analyse the same, or the plan is stale.
    generation: u64,
    analysis: Option<Analysis>,
    /// The client's text when pgveil rewrote it (the session state has the rewrite).
    original: Option<Bytes>,
}

/// A COPY … FROM STDIN into encrypted columns, as prepared.
#[derive(Debug)]
struct CopyPlan {
    copy: CopyIn,
    statement: Vec<u8>,
}

#[derive(Debug)]
pub struct SessionCrypto {
    statements: HashMap<Bytes, Arc<StatementPlan>>,
    /// Portals bound from a COPY … FROM STDIN into encrypted columns.
    copy_portals: HashMap<Bytes, Arc<CopyPlan>>,
    /// The COPY whose data the client is sending, when its rows need rewriting.
    copy: Option<CopyStream>,
    /// The session's `client_encoding`, as the server last reported it.
    client_encoding: String,
}

impl Default for SessionCrypto {
    fn default() -> Self {
        SessionCrypto {
            statements: HashMap::new(),
            copy_portals: HashMap::new(),
            copy: None,
            client_encoding: "UTF8".into(),
        }
    }
}

fn refusal(
    sqlstate: &'static str,
    reason: DenyReason,
    column: Option<ColumnId>,
    message: impl Into<String>,
    hint: impl Into<String>,
) -> Box<WriteRefusal> {
    Box::new(WriteRefusal {
        sqlstate,
        reason,
        column,
        message: message.into(),
        hint: hint.into(),
    })
}

fn unusable(protection: &Protection, column: ColumnId) -> Box<WriteRefusal> {
    let reason = protection
        .ciphers
        .unusable
        .get(&column)
        .cloned()
        .unwrap_or_else(|| "it has no cipher".into());
    refusal(
        "42501",
        DenyReason::WriteRefused,
        Some(column),
        format!(
            "pgveil: cannot encrypt values of column {}: {reason}",
            protection.policy.column_label(column)
        ),
        "fix the column or the keyring; pgveil never stores its values in plaintext",
    )
}

fn crypto_of(
    protection: &Protection,
    column: ColumnId,
) -> Result<&Arc<ColumnCrypto>, Box<WriteRefusal>> {
    protection
        .ciphers
        .get(column)
        .ok_or_else(|| unusable(protection, column))
}

pub(super) fn value_refusal(
    protection: &Protection,
    column: ColumnId,
    error: impl std::fmt::Display,
    sqlstate: &'static str,
) -> Box<WriteRefusal> {
    refusal(
        sqlstate,
        DenyReason::WriteRefused,
        Some(column),
        format!(
            "pgveil: value for encrypted column {}: {error}",
            protection.policy.column_label(column)
        ),
        "send a valid value of the column's type",
    )
}

/// The canonical text of a client value for `column`.
fn canonical(
    protection: &Protection,
    column: ColumnId,
    format: i16,
    value: &[u8],
) -> Result<(Arc<ColumnCrypto>, Vec<u8>), Box<WriteRefusal>> {
    let crypto = crypto_of(protection, column)?.clone();
    let canonical = crypto
        .canonical(format, value)
        .map_err(|error| value_refusal(protection, column, &error.message, error.sqlstate))?;
    Ok((crypto, canonical))
}

fn seal(
    protection: &Protection,
    column: ColumnId,
    crypto: &ColumnCrypto,
    canonical: &[u8],
) -> Result<Vec<u8>, Box<WriteRefusal>> {
    crypto
        .seal(canonical)
        .map_err(|error| value_refusal(protection, column, error, "XX000"))
}

fn seal_every(
    protection: &Protection,
    column: ColumnId,
    crypto: &ColumnCrypto,
    canonical: &[u8],
) -> Result<Vec<Vec<u8>>, Box<WriteRefusal>> {
    crypto
        .seal_under_every_key(canonical)
        .map_err(|error| value_refusal(protection, column, error, "XX000"))
}

/// Analyses `sql`; `None` when it names no relation with encrypted columns (as far as
/// can be told in `client_encoding`: see `CatalogSnapshot::names_encrypted_relation`).
fn analysis_of(
    protection: &Protection,
    sql: &[u8],
    client_encoding: &str,
) -> Result<Option<Analysis>, Box<WriteRefusal>> {
    if !protection
        .catalog
        .names_encrypted_relation(sql, client_encoding)
    {
        return Ok(None);
    }
    let Ok(text) = std::str::from_utf8(sql) else {
        return Err(refusal(
            "42501",
            DenyReason::Unparseable,
            None,
            "pgveil: cannot analyse a statement that is not valid UTF-8 and names a table with encrypted columns",
            "send statements touching encrypted columns in UTF-8",
        ));
    };
    let knowledge = Knowledge {
        policy: &protection.policy,
        relations: protection.catalog.encrypted_relations(),
        single_key: protection.ciphers.single_key,
    };
    analyse(text, &knowledge).map(Some).map_err(|refused| {
        let reason = match refused.kind {
            RefusalKind::Unsupported => DenyReason::UnsupportedOnEncrypted,
            RefusalKind::WriteRefused => DenyReason::WriteRefused,
            RefusalKind::Unparseable => DenyReason::Unparseable,
        };
        Box::new(WriteRefusal {
            sqlstate: refused.sqlstate(),
            reason,
            column: refused.column,
            message: refused.message,
            hint: refused.hint.to_string(),
        })
    })
}

/// The statement text with every edit applied; parameters pgveil adds are numbered
/// from `next_param` and recorded in `extras`.
fn rewrite(
    protection: &Protection,
    sql: &str,
    analysis: &Analysis,
    next_param: &mut u32,
    extras: &mut Vec<(u32, usize)>,
) -> Result<String, Box<WriteRefusal>> {
    let mut replacements = Vec::with_capacity(analysis.edits.len());
    let lookup_items = |column: ColumnId,
                        operand: &Operand,
                        next_param: &mut u32,
                        extras: &mut Vec<(u32, usize)>|
     -> Result<String, Box<WriteRefusal>> {
        match operand {
            Operand::Literal(value) => {
                let (crypto, canonical) = canonical(protection, column, 0, value.as_bytes())?;
                let envelopes = seal_every(protection, column, &crypto, &canonical)?;
                Ok(envelopes
                    .iter()
                    .map(|e| crypto.literal(e))
                    .collect::<Vec<_>>()
                    .join(", "))
            }
            Operand::Param(index) => {
                let crypto = crypto_of(protection, column)?;
                let keys = crypto.cipher.key_ids().count();
                let mut items = vec![format!("${index}")];
                for key in 1..keys {
                    items.push(format!("${}", *next_param));
                    extras.push((*index, key));
                    *next_param += 1;
                }
                Ok(items.join(", "))
            }
        }
    };
    for edit in &analysis.edits {
        match edit {
            Edit::Write {
                range,
                column,
                value,
            } => {
                let (crypto, canonical) = canonical(protection, *column, 0, value.as_bytes())?;
                let envelope = seal(protection, *column, &crypto, &canonical)?;
                replacements.push((range.clone(), crypto.literal(&envelope)));
            }
            Edit::ListItem {
                range,
                column,
                operand,
            } => {
                let items = lookup_items(*column, operand, next_param, extras)?;
                replacements.push((range.clone(), items));
            }
            Edit::Comparison {
                range,
                column_text,
                negated,
                column,
                operand,
            } => {
                let items = lookup_items(*column, operand, next_param, extras)?;
                let column_text = sql.get(column_text.clone()).unwrap_or_default();
                let not = if *negated { " NOT" } else { "" };
                replacements.push((range.clone(), format!("{column_text}{not} IN ({items})")));
            }
        }
    }
    crate::sql::splice(sql, replacements).map_err(|problem| {
        refusal(
            "42501",
            DenyReason::Unparseable,
            None,
            format!("pgveil: cannot rewrite a statement that names a table with encrypted columns ({problem})"),
            "simplify the statement",
        )
    })
}

impl SessionCrypto {
    /// Checks and rewrites a client message.
    pub fn on_client_message(
        &mut self,
        protection: &Protection,
        state: &SessionState,
        tag: u8,
        body: &[u8],
    ) -> Result<ClientAction, MalformedMessage> {
        if self.copy.is_some() && !matches!(tag, b'd' | b'c' | b'f' | b'H' | b'S') {
            // The COPY ended before its data did (it failed at the server, which then
            // ignores the rest): what follows is not its data.
            self.copy = None;
        }
        Ok(match tag {
            b'Q' => self.on_query(protection, state, body),
            b'P' => self.on_parse(protection, body)?,
            b'B' => self.on_bind(protection, state, body)?,
            b'E' => {
                let portal = execute_portal(body)?;
                match self.copy_portals.get(portal).cloned() {
                    Some(plan) => {
                        match self.begin_copy(protection, state, &plan.copy, &plan.statement) {
                            Ok(()) => ClientAction::Forward,
                            Err(refused) => ClientAction::Refuse(refused),
                        }
                    }
                    None => ClientAction::Forward,
                }
            }
            b'C' => {
                let target = TargetName::decode("Close", body)?;
                match target.target {
                    Target::Statement => self.statements.remove(target.name),
                    Target::Portal => {
                        self.copy_portals.remove(target.name);
                        None
                    }
                };
                ClientAction::Forward
            }
            b'd' => self.on_copy_data(protection, body),
            b'c' => self.on_copy_done(protection),
            b'f' => match self.copy.take() {
                // pgveil already failed it.
                Some(stream) if stream.failed => ClientAction::Drop,
                _ => ClientAction::Forward,
            },
            _ => ClientAction::Forward,
        })
    }

    /// Whether client CopyData must be inspected: a COPY into encrypted columns is
    /// sending its rows.
    pub fn rewrites_copy_data(&self) -> bool {
        self.copy.is_some()
    }

    /// The session's `client_encoding`, as the server last reported it.
    pub fn client_encoding(&self) -> &str {
        &self.client_encoding
    }

    /// Follows ParameterStatus messages for `client_encoding`.
    pub fn client_encoding_reported(&mut self, encoding: &str) {
        self.client_encoding = encoding.to_string();
    }

    /// Starts rewriting the rows of a COPY that is about to be sent (its Query or
    /// Execute).
    fn begin_copy(
        &mut self,
        protection: &Protection,
        state: &SessionState,
        copy: &CopyIn,
        statement: &[u8],
    ) -> Result<(), Box<WriteRefusal>> {
        let first = copy.fields.iter().flatten().next().copied();
        if state.executions_pending() {
            // An earlier statement could still change client_encoding, or fail and
            // leave pgveil unsure which COPY the data belongs to.
            return Err(refusal(
                "0A000",
                DenyReason::WriteRefused,
                first,
                "pgveil: a COPY … FROM STDIN into encrypted columns must wait for the answers to earlier statements",
                "send the COPY once the statements before it have completed",
            ));
        }
        let fields = copy
            .fields
            .iter()
            .map(|field| match field {
                Some(column) => {
                    crypto_of(protection, *column).map(|crypto| Some((*column, crypto.clone())))
                }
                None => Ok(None),
            })
            .collect::<Result<Vec<EncryptedField>, _>>()?;
        self.copy = Some(CopyStream::new(
            state.executions_sent(),
            statement.to_vec(),
            fields,
            copy.format.clone(),
        ));
        Ok(())
    }

    fn on_copy_data(&mut self, protection: &Protection, body: &[u8]) -> ClientAction {
        let Some(stream) = self.copy.as_mut() else {
            return ClientAction::Forward;
        };
        if stream.failed {
            return ClientAction::Drop;
        }
        match stream.data(protection, body) {
            Ok(rows) if rows.is_empty() => ClientAction::Drop,
            Ok(rows) => {
                let mut frame = Vec::with_capacity(rows.len() + 5);
                encode_frame(&mut frame, b'd', &rows);
                ClientAction::Replace(frame)
            }
            Err(refused) => fail_copy(stream, refused),
        }
    }

    fn on_copy_done(&mut self, protection: &Protection) -> ClientAction {
        let Some(mut stream) = self.copy.take() else {
            return ClientAction::Forward;
        };
        if stream.failed {
            return ClientAction::Drop;
        }
        match stream.done(protection) {
            Ok(rows) => {
                let mut frames = Vec::with_capacity(rows.len() + 10);
                if !rows.is_empty() {
                    encode_frame(&mut frames, b'd', &rows);
                }
                encode_frame(&mut frames, b'c', b"");
                ClientAction::Replace(frames)
            }
            Err(refused) => fail_copy(&mut stream, refused),
        }
    }

    /// The statement's analysis; a refusal when the session's `client_encoding` lets
    /// ASCII bytes stand inside characters, where pgveil could misread the text.
    fn analysed(
        &self,
        protection: &Protection,
        sql: &[u8],
    ) -> Result<Option<Analysis>, Box<WriteRefusal>> {
        let analysis = analysis_of(protection, sql, &self.client_encoding)?;
        if analysis.is_some() && !ascii_safe_encoding(&self.client_encoding) {
            return Err(refusal(
                "0A000",
                DenyReason::WriteRefused,
                None,
                format!(
                    "pgveil: statements touching encrypted columns are not supported with client_encoding {}",
                    self.client_encoding
                ),
                "use client_encoding UTF8 (or another encoding whose multibyte characters contain no ASCII bytes)",
            ));
        }
        Ok(analysis)
    }

    fn on_query(
        &mut self,
        protection: &Protection,
        state: &SessionState,
        body: &[u8],
    ) -> ClientAction {
        let sql = body.strip_suffix(b"\0").unwrap_or(body);
        let analysis = match self.analysed(protection, sql) {
            Ok(None) => return ClientAction::Forward,
            Ok(Some(analysis)) => analysis,
            Err(refused) => return ClientAction::Refuse(refused),
        };
        if let Some(param) = analysis.params.first() {
            // A simple Query has no parameters: the server will fail it anyway.
            return ClientAction::Refuse(refusal(
                "42P02",
                DenyReason::WriteRefused,
                Some(param.column),
                format!("pgveil: there is no parameter ${}", param.index),
                "parameters need the extended protocol",
            ));
        }
        if let Some(copy) = &analysis.copy_in {
            // A COPY is a statement of its own (see `analyse`): nothing to rewrite.
            return match self.begin_copy(protection, state, copy, sql) {
                Ok(()) => ClientAction::Forward,
                Err(refused) => ClientAction::Refuse(refused),
            };
        }
        if analysis.edits.is_empty() {
            return ClientAction::Forward;
        }
        // Checked above.
        let text = std::str::from_utf8(sql).unwrap_or_default();
        let mut next_param = analysis.highest_param + 1;
        let mut extras = Vec::new();
        match rewrite(protection, text, &analysis, &mut next_param, &mut extras) {
            Ok(rewritten) => {
                let mut body = rewritten.into_bytes();
                body.push(0);
                let mut frame = Vec::with_capacity(body.len() + 5);
                crate::wire::frame::encode_frame(&mut frame, b'Q', &body);
                ClientAction::Replace(frame)
            }
            Err(refused) => ClientAction::Refuse(refused),
        }
    }

    fn on_parse(
        &mut self,
        protection: &Protection,
        body: &[u8],
    ) -> Result<ClientAction, MalformedMessage> {
        let parse = Parse::decode(body)?;
        let name = Bytes::copy_from_slice(parse.statement);
        let analysis = match self.analysed(protection, parse.query) {
            Ok(None) => {
                // Nothing to encrypt under this policy; remembered so a Bind after a
                // policy change knows to look again.
                self.statements.insert(
                    name,
                    Arc::new(StatementPlan {
                        policy: protection.policy.clone(),
                        params: Vec::new(),
                        extras: Vec::new(),
                        client_params: 0,
                        copy: None,
                        generation: protection.generation,
                        analysis: None,
                        original: None,
                    }),
                );
                return Ok(ClientAction::Forward);
            }
            Ok(Some(analysis)) => analysis,
            Err(refused) => {
                self.statements.remove(&name);
                return Ok(ClientAction::Refuse(refused));
            }
        };
        if let Some(copy) = &analysis.copy_in {
            // Its columns must have ciphers now, not only when it runs.
            for column in copy.fields.iter().flatten() {
                if let Err(refused) = crypto_of(protection, *column) {
                    self.statements.remove(&name);
                    return Ok(ClientAction::Refuse(refused));
                }
            }
        }
        let client_params = (analysis.highest_param as usize).max(parse.parameter_types.len());
        let mut next_param = client_params as u32 + 1;
        let mut extras = Vec::new();
        let text = std::str::from_utf8(parse.query).unwrap_or_default();
        let rewritten = if analysis.edits.is_empty() {
            None
        } else {
            match rewrite(protection, text, &analysis, &mut next_param, &mut extras) {
                Ok(rewritten) => Some(rewritten),
                Err(refused) => {
                    self.statements.remove(&name);
                    return Ok(ClientAction::Refuse(refused));
                }
            }
        };
        let plan = StatementPlan {
            policy: protection.policy.clone(),
            params: analysis.params.clone(),
            extras,
            client_params,
            copy: analysis.copy_in.clone().map(|copy| {
                Arc::new(CopyPlan {
                    copy,
                    statement: parse.query.to_vec(),
                })
            }),
            generation: protection.generation,
            analysis: Some(analysis.clone()),
            original: Some(Bytes::copy_from_slice(parse.query)),
        };
        // The server infers the type of an encrypted parameter from its column (text
        // or bytea); the type the client declared is the logical one.
        let mut types = parse.parameter_types.clone();
        let declared_encrypted = plan
            .params
            .iter()
            .any(|p| types.get(p.index as usize - 1).is_some_and(|&t| t != 0));
        if !plan.extras.is_empty() {
            types.resize(next_param as usize - 1, 0);
        }
        for param in &plan.params {
            if let Some(slot) = types.get_mut(param.index as usize - 1) {
                *slot = 0;
            }
        }
        let changed = rewritten.is_some() || declared_encrypted || !plan.extras.is_empty();
        let query = rewritten
            .map(String::into_bytes)
            .unwrap_or_else(|| parse.query.to_vec());
        self.statements.insert(name, Arc::new(plan));
        Ok(if changed {
            ClientAction::Replace(encode_parse(parse.statement, &query, &types))
        } else {
            ClientAction::Forward
        })
    }

    fn on_bind(
        &mut self,
        protection: &Protection,
        state: &SessionState,
        body: &[u8],
    ) -> Result<ClientAction, MalformedMessage> {
        let names = BindNames::decode(body)?;
        // The portal is this Bind's from now on.
        self.copy_portals.remove(names.portal);
        let plan = match self.statements.get(names.statement) {
            Some(plan) if plan.generation == protection.generation => plan.clone(),
            // The same policy over a newer catalog: a relation may have become one with
            // encrypted columns (a partition attached to an encrypted table) or changed
            // its columns. The plan stands only if the text analyses the same now.
            Some(plan) if Arc::ptr_eq(&plan.policy, &protection.policy) => {
                let query = match &plan.original {
                    Some(original) => original.clone(),
                    None => state
                        .statement(names.statement)
                        .map(|s| s.query.clone())
                        .unwrap_or_default(),
                };
                match self.analysed(protection, &query) {
                    Ok(analysis) if analysis == plan.analysis => {
                        let current = Arc::new(StatementPlan {
                            policy: plan.policy.clone(),
                            params: plan.params.clone(),
                            extras: plan.extras.clone(),
                            client_params: plan.client_params,
                            copy: plan.copy.clone(),
                            generation: protection.generation,
                            analysis,
                            original: plan.original.clone(),
                        });
                        self.statements
                            .insert(Bytes::copy_from_slice(names.statement), current.clone());
                        current
                    }
                    _ => {
                        return Ok(ClientAction::Refuse(refusal(
                            "0A000",
                            DenyReason::WriteRefused,
                            None,
                            "pgveil: the tables this prepared statement names changed since it was prepared (encrypted columns differ)",
                            "prepare the statement again, so pgveil encrypts its parameters for the tables as they are now",
                        )))
                    }
                }
            }
            // Prepared before the running policy: it may now bind values of columns
            // that were not encrypted then. (A statement made with SQL PREPARE is
            // analysed at its PREPARE, which refuses encrypted parameters.)
            _ => {
                let prepared = state.statement(names.statement);
                if prepared.is_some_and(|s| {
                    protection
                        .catalog
                        .names_encrypted_relation(&s.query, &self.client_encoding)
                }) {
                    return Ok(ClientAction::Refuse(refusal(
                        "0A000",
                        DenyReason::WriteRefused,
                        None,
                        "pgveil: this prepared statement names a table with encrypted columns and was prepared under an earlier policy",
                        "prepare the statement again, so pgveil encrypts its parameters under the running policy",
                    )));
                }
                return Ok(ClientAction::Forward);
            }
        };
        if let Some(copy) = &plan.copy {
            self.copy_portals
                .insert(Bytes::copy_from_slice(names.portal), copy.clone());
        }
        if plan.params.is_empty() && plan.extras.is_empty() {
            return Ok(ClientAction::Forward);
        }
        let bind = Bind::decode(body)?;
        let mut parameters: Vec<(i16, Option<Vec<u8>>)> =
            Vec::with_capacity(bind.parameters.len() + plan.extras.len());
        // Per lookup parameter: its envelopes under every key.
        let mut lookups: HashMap<u32, Vec<Vec<u8>>> = HashMap::new();
        for (index, value) in bind.parameters.iter().enumerate() {
            let format = bind.parameter_format(index);
            let number = index as u32 + 1;
            let Some(param) = plan.params.iter().find(|p| p.index == number) else {
                parameters.push((format, value.map(<[u8]>::to_vec)));
                continue;
            };
            let Some(value) = value else {
                parameters.push((0, None));
                continue;
            };
            let (crypto, canonical) = match canonical(protection, param.column, format, value) {
                Ok(found) => found,
                Err(refused) => return Ok(ClientAction::Refuse(refused)),
            };
            let envelope = if param.lookup {
                let envelopes = match seal_every(protection, param.column, &crypto, &canonical) {
                    Ok(envelopes) => envelopes,
                    Err(refused) => return Ok(ClientAction::Refuse(refused)),
                };
                let first = envelopes.first().cloned().unwrap_or_default();
                lookups.insert(number, envelopes);
                first
            } else {
                match seal(protection, param.column, &crypto, &canonical) {
                    Ok(envelope) => envelope,
                    Err(refused) => return Ok(ClientAction::Refuse(refused)),
                }
            };
            let (format, stored) = crypto.parameter(envelope);
            parameters.push((format, Some(stored)));
        }
        for (source, key) in &plan.extras {
            let column = plan
                .params
                .iter()
                .find(|p| p.index == *source)
                .map(|p| p.column);
            let envelope = lookups.get(source).and_then(|e| e.get(*key)).cloned();
            match (column, envelope) {
                (Some(column), Some(envelope)) => {
                    let crypto = match crypto_of(protection, column) {
                        Ok(crypto) => crypto,
                        Err(refused) => return Ok(ClientAction::Refuse(refused)),
                    };
                    let (format, stored) = crypto.parameter(envelope);
                    parameters.push((format, Some(stored)));
                }
                // The client's parameter was NULL (or missing: the server will say).
                _ => parameters.push((0, None)),
            }
        }
        let borrowed: Vec<(i16, Option<&[u8]>)> = parameters
            .iter()
            .map(|(format, value)| (*format, value.as_deref()))
            .collect();
        Ok(ClientAction::Replace(encode_bind(
            bind.portal,
            bind.statement,
            &borrowed,
            &bind.result_formats,
        )))
    }

    /// A ParameterDescription answering a Describe of `statement`: the logical types
    /// of encrypted parameters, and only the parameters the client knows of.
    pub fn parameter_description(
        &self,
        protection: &Protection,
        statement: &[u8],
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, MalformedMessage> {
        let Some(plan) = self.statements.get(statement) else {
            return Ok(None);
        };
        if plan.params.is_empty() && plan.extras.is_empty() {
            return Ok(None);
        }
        let mut types = decode_parameter_description(body)?;
        for param in &plan.params {
            if let (Some(slot), Some(crypto)) = (
                types.get_mut(param.index as usize - 1),
                protection.ciphers.get(param.column),
            ) {
                *slot = crypto.logical.oid();
            }
        }
        types.truncate(plan.client_params);
        Ok(Some(encode_parameter_description(&types)))
    }
}

/// Fails the COPY `stream`: the server gets a CopyFail, and the client's further data
/// for it is dropped.
fn fail_copy(stream: &mut CopyStream, refusal: Box<WriteRefusal>) -> ClientAction {
    stream.failed = true;
    let mut frame = Vec::new();
    encode_frame(&mut frame, b'f', b"pgveil refused the COPY data\0");
    ClientAction::FailCopy {
        frame,
        refusal,
        request: stream.request,
        statement: stream.statement.clone(),
    }
}
