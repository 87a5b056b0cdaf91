//! The policy: which role sees which protected column how (SPEC.md "Policy file").
//!
//! `Policy::load` reads and checks a policy file, reporting every problem as
//! `FILE:LINE:COL: message`; a policy that loads is fully resolved: every role has one
//! action per protected column, so the hot path only indexes a table. This module never
//! looks at values and never talks to the database; the catalog maps result columns to
//! the protected columns named here.

pub mod file;

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde_saphyr::{Location, Spanned};
use thiserror::Error;

use crate::protect::mask::Mask;
use file::{ActionSpec, EncryptMode, Permission, PolicyFile};

/// The role of logins that match no role of the policy.
pub const DEFAULT_ROLE: &str = "default";

/// Logical types a column may declare with `type:` (the types clients see for
/// encrypted columns).
pub const LOGICAL_TYPES: &[&str] = &[
    "int2",
    "int4",
    "int8",
    "numeric",
    "float8",
    "bool",
    "date",
    "timestamp",
    "timestamptz",
    "text",
    "varchar",
];

/// One problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// A policy that cannot be used.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("{path}: cannot read policy file: {error}")]
    Read { path: String, error: std::io::Error },
    /// Every problem, one `FILE:LINE:COL: message` per line.
    #[error("{}", render(path, problems))]
    Invalid {
        path: String,
        problems: Vec<Diagnostic>,
    },
}

fn render(path: &str, problems: &[Diagnostic]) -> String {
    problems
        .iter()
        .map(|p| format!("{path}:{}:{}: {}", p.line, p.column, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a role gets for a protected column.
#[derive(Debug, Clone)]
pub enum Action {
    /// The plaintext.
    Allow,
    /// The value through this mask.
    Mask(Mask),
    /// SQL NULL.
    Redact,
    /// The statement fails with 42501.
    Deny,
}

impl Action {
    /// How strict the action is; a value computed from several columns gets the
    /// strictest of their actions.
    pub fn strictness(&self) -> u8 {
        match self {
            Action::Allow => 0,
            Action::Mask(_) => 1,
            Action::Redact => 2,
            Action::Deny => 3,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Mask(_) => "mask",
            Action::Redact => "redact",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Mask(mask) => write!(f, "mask {mask}"),
            other => f.write_str(other.name()),
        }
    }
}

/// Index of a role in [`Policy::roles`].
pub type RoleId = usize;
/// Index of a column in [`Policy::columns`].
pub type ColumnId = usize;

#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    /// Login users or PostgreSQL roles; a login matches when it is, or is a member of,
    /// one of them.
    pub members: Vec<String>,
    pub max_rows: Option<u64>,
    pub export: Permission,
    pub filter_on_protected: Option<Permission>,
}

#[derive(Debug, Clone)]
pub struct ProtectedTable {
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnId>,
    /// Line and column of the table's key in the policy file.
    pub location: (u64, u64),
}

impl ProtectedTable {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

#[derive(Debug, Clone)]
pub struct ProtectedColumn {
    pub table: usize,
    pub name: String,
    pub level: String,
    pub encrypt: EncryptMode,
    pub logical_type: Option<String>,
    pub mask: Mask,
    /// Line and column of the column's key in the policy file.
    pub location: (u64, u64),
}

#[derive(Debug, Clone)]
pub struct Level {
    pub id: String,
    pub name: Option<String>,
    pub default: ActionSpec,
}

/// A checked, fully resolved policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub levels: Vec<Level>,
    /// In file order; the last one is `default` when the file does not define it.
    pub roles: Vec<Role>,
    pub tables: Vec<ProtectedTable>,
    pub columns: Vec<ProtectedColumn>,
    /// `actions[role][column]`.
    actions: Vec<Vec<Action>>,
    /// Roles whose every action is `allow`: their results need no shaping.
    unrestricted: Vec<bool>,
}

fn at(location: &Location, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        line: location.line(),
        column: location.column(),
        message: message.into(),
    }
}

fn default_levels() -> Vec<Level> {
    let level = |id: &str, name: &str, default| Level {
        id: id.to_string(),
        name: Some(name.to_string()),
        default,
    };
    vec![
        level("L4", "extremely sensitive", ActionSpec::Deny),
        level("L3", "sensitive", ActionSpec::Mask),
        level("L2", "relatively sensitive", ActionSpec::Mask),
        level("L1", "low", ActionSpec::Allow),
    ]
}

impl Policy {
    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Read {
            path: shown.clone(),
            error,
        })?;
        Policy::parse(&text, &shown)
    }

    /// Parses and checks policy YAML; `shown` names the source in errors.
    pub fn parse(text: &str, shown: &str) -> Result<Policy, PolicyError> {
        let invalid = |problems| PolicyError::Invalid {
            path: shown.to_string(),
            problems,
        };
        let parsed: PolicyFile = serde_saphyr::from_str(text).map_err(|error| {
            let (line, column) = error
                .location()
                .map(|location| (location.line(), location.column()))
                .unwrap_or((0, 0));
            let mut message = crate::config::parser_message(&error.to_string());
            if message.contains("unknown field `") && message.contains(")`") {
                // `{ mask: keep(3,4) }`: in a flow mapping the comma ends the scalar.
                message.push_str(
                    " (a mask with arguments inside { } must be quoted: mask: \"keep(3,4)\")",
                );
            }
            invalid(vec![Diagnostic {
                line,
                column,
                message,
            }])
        })?;
        Policy::compile(parsed).map_err(invalid)
    }

    fn compile(file: PolicyFile) -> Result<Policy, Vec<Diagnostic>> {
        let mut problems = Vec::new();
        if file.version.value != 1 {
            problems.push(at(
                &file.version.referenced,
                format!(
                    "unsupported policy version {}: this pgveil reads version 1",
                    file.version.value
                ),
            ));
        }
        let levels = match file.levels {
            None => default_levels(),
            Some(levels) => levels
                .0
                .into_iter()
                .map(|(id, spec)| {
                    if let ActionSpec::MaskWith(mask) = &spec.default.value {
                        if let Err(error) = Mask::parse(mask) {
                            problems.push(at(&spec.default.referenced, error.to_string()));
                        }
                    }
                    Level {
                        id: id.value,
                        name: spec.name,
                        default: spec.default.value,
                    }
                })
                .collect(),
        };

        let mut roles: Vec<Role> = file
            .roles
            .0
            .into_iter()
            .map(|(name, spec)| Role {
                name: name.value,
                members: spec.members.into_iter().map(|m| m.value).collect(),
                max_rows: spec.max_rows,
                export: spec.export.unwrap_or(Permission::Allow),
                filter_on_protected: spec.filter_on_protected,
            })
            .collect();
        if !roles.iter().any(|role| role.name == DEFAULT_ROLE) {
            roles.push(Role {
                name: DEFAULT_ROLE.to_string(),
                members: Vec::new(),
                max_rows: None,
                export: Permission::Allow,
                filter_on_protected: None,
            });
        }

        let mut tables = Vec::new();
        let mut columns = Vec::new();
        let mut column_access = Vec::new();
        for (table_name, spec) in file.tables.0 {
            let (schema, name) = match table_name.value.split_once('.') {
                Some((schema, name)) if !schema.is_empty() && !name.is_empty() => {
                    (schema.to_string(), name.to_string())
                }
                Some(_) => {
                    problems.push(at(
                        &table_name.referenced,
                        format!("table `{}`: expected SCHEMA.TABLE", table_name.value),
                    ));
                    continue;
                }
                None => ("public".to_string(), table_name.value.clone()),
            };
            if tables
                .iter()
                .any(|t: &ProtectedTable| t.schema == schema && t.name == name)
            {
                problems.push(at(
                    &table_name.referenced,
                    format!("table {schema}.{name} is listed twice"),
                ));
                continue;
            }
            let table_index = tables.len();
            let mut ids = Vec::new();
            for (column_name, column) in spec.columns.0 {
                if !levels.iter().any(|level| level.id == column.level.value) {
                    problems.push(at(
                        &column.level.referenced,
                        format!(
                            "unknown level `{}` (levels: {})",
                            column.level.value,
                            levels
                                .iter()
                                .map(|l| l.id.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                if let Some(logical) = &column.logical_type {
                    if !LOGICAL_TYPES.contains(&logical.value.as_str()) {
                        problems.push(at(
                            &logical.referenced,
                            format!(
                                "unsupported type `{}` (supported: {})",
                                logical.value,
                                LOGICAL_TYPES.join(", ")
                            ),
                        ));
                    }
                }
                let mask = match &column.mask {
                    None => Mask::Full,
                    Some(spec) => Mask::parse(&spec.value).unwrap_or_else(|error| {
                        problems.push(at(&spec.referenced, error.to_string()));
                        Mask::Full
                    }),
                };
                for (role, action) in &column.access.0 {
                    if !roles.iter().any(|r| r.name == role.value) {
                        problems.push(at(
                            &role.referenced,
                            format!(
                                "unknown role `{}` in access of {schema}.{name}.{} (roles: {})",
                                role.value,
                                column_name.value,
                                roles
                                    .iter()
                                    .map(|r| r.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    if let ActionSpec::MaskWith(spec) = &action.value {
                        if let Err(error) = Mask::parse(spec) {
                            problems.push(at(&action.referenced, error.to_string()));
                        }
                    }
                }
                ids.push(columns.len());
                column_access.push(
                    column
                        .access
                        .0
                        .into_iter()
                        .map(|(role, action)| (role.value, action.value))
                        .collect::<Vec<_>>(),
                );
                columns.push(ProtectedColumn {
                    location: location_of(&column_name),
                    table: table_index,
                    name: column_name.value,
                    level: column.level.value,
                    encrypt: column.encrypt,
                    logical_type: column.logical_type.map(|t| t.value),
                    mask,
                });
            }
            tables.push(ProtectedTable {
                schema,
                name,
                columns: ids,
                location: location_of(&table_name),
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let resolve = |spec: &ActionSpec, column: &ProtectedColumn| match spec {
            ActionSpec::Allow => Action::Allow,
            ActionSpec::Mask => Action::Mask(column.mask.clone()),
            // Checked above: every mask named in the file parses.
            ActionSpec::MaskWith(mask) => Action::Mask(Mask::parse(mask).unwrap_or(Mask::Full)),
            ActionSpec::Redact => Action::Redact,
            ActionSpec::Deny => Action::Deny,
        };
        let actions: Vec<Vec<Action>> = roles
            .iter()
            .map(|role| {
                columns
                    .iter()
                    .zip(&column_access)
                    .map(|(column, access)| {
                        let spec = access
                            .iter()
                            .find(|(name, _)| *name == role.name)
                            .map(|(_, spec)| spec)
                            .or_else(|| {
                                levels
                                    .iter()
                                    .find(|level| level.id == column.level)
                                    .map(|level| &level.default)
                            })
                            .unwrap_or(&ActionSpec::Deny);
                        resolve(spec, column)
                    })
                    .collect()
            })
            .collect();
        // Nothing to check for a role that may see everything in plaintext, without a
        // row limit, and may export.
        let unrestricted = actions
            .iter()
            .zip(&roles)
            .map(|(row, role)| {
                row.iter().all(|action| matches!(action, Action::Allow))
                    && role.max_rows.is_none()
                    && role.export == Permission::Allow
            })
            .collect();
        Ok(Policy {
            levels,
            roles,
            tables,
            columns,
            actions,
            unrestricted,
        })
    }

    /// The role of a login: the first role (file order) one of whose members is the
    /// login itself or a role it belongs to; otherwise `default`.
    pub fn role_for(&self, user: &str, memberships: &HashSet<String>) -> RoleId {
        self.roles
            .iter()
            .position(|role| {
                role.members
                    .iter()
                    .any(|member| member == user || memberships.contains(member))
            })
            .or_else(|| self.roles.iter().position(|r| r.name == DEFAULT_ROLE))
            .unwrap_or(self.roles.len().saturating_sub(1))
    }

    pub fn action(&self, role: RoleId, column: ColumnId) -> &Action {
        &self.actions[role][column]
    }

    /// Whether pgveil has nothing to check for the role: it may see every protected
    /// column in plaintext, has no `max_rows` and may export.
    pub fn is_unrestricted(&self, role: RoleId) -> bool {
        self.unrestricted.get(role).copied().unwrap_or(false)
    }

    /// Whether the role may not use `column` in a condition (WHERE, JOIN, ORDER BY…):
    /// the column is not encrypted, the role may not see it in plaintext, and the role's
    /// `filter_on_protected` is `deny`, or unset while the column's level is other than
    /// `L1` or `L2` (conditions reveal values one guess at a time; the low levels are
    /// left usable for lookups by default).
    pub fn filter_refused(&self, role: RoleId, column: ColumnId) -> bool {
        let Some(spec) = self.columns.get(column) else {
            return true;
        };
        if spec.encrypt != EncryptMode::None || matches!(self.action(role, column), Action::Allow) {
            return false;
        }
        match self.roles.get(role).and_then(|r| r.filter_on_protected) {
            Some(Permission::Allow) => false,
            Some(Permission::Deny) => true,
            None => {
                !(spec.level.eq_ignore_ascii_case("L1") || spec.level.eq_ignore_ascii_case("L2"))
            }
        }
    }

    /// The role's `max_rows`.
    pub fn max_rows(&self, role: RoleId) -> Option<u64> {
        self.roles.get(role).and_then(|r| r.max_rows)
    }

    /// Whether the role may COPY protected columns out (`export: allow`).
    pub fn may_export(&self, role: RoleId) -> bool {
        self.roles
            .get(role)
            .is_none_or(|r| r.export == Permission::Allow)
    }

    pub fn role_name(&self, role: RoleId) -> &str {
        self.roles
            .get(role)
            .map_or(DEFAULT_ROLE, |r| r.name.as_str())
    }

    pub fn role_by_name(&self, name: &str) -> Option<RoleId> {
        self.roles.iter().position(|role| role.name == name)
    }

    /// `schema.table.column` of a protected column, as messages name it.
    /// `schema.table` of a protected column.
    pub fn table_label(&self, column: ColumnId) -> String {
        self.tables[self.columns[column].table].qualified()
    }

    pub fn column_label(&self, column: ColumnId) -> String {
        let column = &self.columns[column];
        format!("{}.{}", self.tables[column.table].qualified(), column.name)
    }

    /// Whether any mask needs the keyring's hash key.
    pub fn needs_hash_key(&self) -> bool {
        self.actions
            .iter()
            .flatten()
            .any(|action| matches!(action, Action::Mask(mask) if mask.needs_hash_key()))
    }

    /// Whether any column asks for encryption.
    pub fn encrypts(&self) -> bool {
        self.columns.iter().any(|c| c.encrypt != EncryptMode::None)
    }

    /// The effective table × column → action matrix of one role, as text.
    pub fn explain(&self, role: RoleId) -> String {
        let mut out = String::new();
        let role_spec = &self.roles[role];
        out.push_str(&format!("role {}", role_spec.name));
        if !role_spec.members.is_empty() {
            out.push_str(&format!(" (members: {})", role_spec.members.join(", ")));
        }
        out.push('\n');
        if let Some(max_rows) = role_spec.max_rows {
            out.push_str(&format!("  max_rows: {max_rows}\n"));
        }
        out.push_str(&format!(
            "  export: {}\n",
            match role_spec.export {
                Permission::Allow => "allow",
                Permission::Deny => "deny",
            }
        ));
        out.push_str(&format!(
            "  filter_on_protected: {}\n",
            match role_spec.filter_on_protected {
                Some(Permission::Allow) => "allow",
                Some(Permission::Deny) => "deny",
                None => "default (deny on columns it may not see in plaintext, except levels L1 and L2)",
            }
        ));
        let width = self
            .columns
            .iter()
            .enumerate()
            .map(|(id, _)| self.column_label(id).len())
            .max()
            .unwrap_or(0);
        for table in &self.tables {
            for &column in &table.columns {
                let spec = &self.columns[column];
                out.push_str(&format!(
                    "  {:width$}  {:<3}  {}\n",
                    self.column_label(column),
                    spec.level,
                    self.action(role, column),
                ));
            }
        }
        out
    }

    /// One line per table for `policy check`.
    pub fn summary(&self) -> String {
        format!(
            "{} levels, {} roles ({}), {} tables, {} protected columns",
            self.levels.len(),
            self.roles.len(),
            self.roles
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.tables.len(),
            self.columns.len()
        )
    }
}

/// Where a spanned value was written, for diagnostics built outside this module.
pub fn location_of<T>(spanned: &Spanned<T>) -> (u64, u64) {
    (spanned.referenced.line(), spanned.referenced.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"
version: 1
levels:
  L4: { name: extremely sensitive, default: deny }
  L3: { name: sensitive,           default: mask }
  L2: { name: relatively sensitive, default: mask }
  L1: { name: low,                 default: allow }
roles:
  billing: { members: [billing_svc] }
  support: { members: [alice, crm_support], max_rows: 200 }
  analyst: { members: [bi_reader], max_rows: 100, export: deny }
tables:
  public.customers:
    columns:
      id_card:
        level: L4
        type: text
        mask: cn_id_card
        access:
          billing: allow
          support: mask
      phone: { level: L3, mask: "keep(3,4)", access: { billing: allow } }
      email: { level: L3, mask: email, access: { analyst: { mask: hash } } }
      name:  { level: L2, mask: cn_name }
"#;

    fn problems(text: &str) -> Vec<String> {
        match Policy::parse(text, "p.yaml") {
            Ok(_) => panic!("policy unexpectedly valid"),
            Err(PolicyError::Invalid { problems, .. }) => problems
                .into_iter()
                .map(|p| format!("{}:{}: {}", p.line, p.column, p.message))
                .collect(),
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn filters_row_limits_and_exports_per_role() {
        let policy = Policy::parse(SPEC_EXAMPLE, "p.yaml").unwrap();
        let role = |name: &str| policy.role_by_name(name).unwrap();
        let phone = column(&policy, "public.customers.phone");
        let name = column(&policy, "public.customers.name");
        // billing sees phone in plaintext: its conditions are its own business.
        assert!(!policy.filter_refused(role("billing"), phone));
        // Masked L3: refused by default; masked L2: allowed by default.
        assert!(policy.filter_refused(role("support"), phone));
        assert!(!policy.filter_refused(role("support"), name));
        assert_eq!(policy.max_rows(role("analyst")), Some(100));
        assert!(!policy.may_export(role("analyst")));
        assert!(policy.may_export(role("support")));
        // A row limit or export rule leaves a role something to check.
        assert!(!policy.is_unrestricted(role("support")));
        let explained = policy.explain(role("analyst"));
        assert!(
            explained.contains("filter_on_protected: default"),
            "{explained}"
        );

        let allowing = Policy::parse(
            "version: 1\nroles:\n  snoop: { members: [x], filter_on_protected: allow }\n  strict: { members: [y], filter_on_protected: deny }\ntables:\n  public.t:\n    columns:\n      a: { level: L3 }\n      b: { level: L2 }\n",
            "p.yaml",
        )
        .unwrap();
        let a = column(&allowing, "public.t.a");
        let b = column(&allowing, "public.t.b");
        let snoop = allowing.role_by_name("snoop").unwrap();
        let strict = allowing.role_by_name("strict").unwrap();
        assert!(!allowing.filter_refused(snoop, a));
        assert!(allowing.filter_refused(strict, b));
    }

    fn column(policy: &Policy, label: &str) -> ColumnId {
        (0..policy.columns.len())
            .find(|&id| policy.column_label(id) == label)
            .unwrap()
    }

    #[test]
    fn the_spec_example_resolves_per_role() {
        let policy = Policy::parse(SPEC_EXAMPLE, "p.yaml").unwrap();
        let names: Vec<_> = policy.roles.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["billing", "support", "analyst", "default"]);
        let id_card = column(&policy, "public.customers.id_card");
        let phone = column(&policy, "public.customers.phone");
        let email = column(&policy, "public.customers.email");
        let name = column(&policy, "public.customers.name");
        let billing = policy.role_by_name("billing").unwrap();
        let support = policy.role_by_name("support").unwrap();
        let analyst = policy.role_by_name("analyst").unwrap();
        let default = policy.role_by_name("default").unwrap();
        assert_eq!(policy.action(billing, id_card).to_string(), "allow");
        assert_eq!(
            policy.action(support, id_card).to_string(),
            "mask cn_id_card"
        );
        assert_eq!(policy.action(analyst, id_card).to_string(), "deny");
        assert_eq!(policy.action(default, phone).to_string(), "mask keep(3,4)");
        assert_eq!(policy.action(billing, phone).to_string(), "allow");
        assert_eq!(policy.action(analyst, email).to_string(), "mask hash");
        assert_eq!(policy.action(billing, name).to_string(), "mask cn_name");
        assert!(policy.needs_hash_key());
        assert!(!policy.is_unrestricted(billing));
        assert_eq!(policy.roles[analyst].max_rows, Some(100));
        assert_eq!(policy.roles[analyst].export, Permission::Deny);
    }

    #[test]
    fn first_matching_role_wins_then_default() {
        let policy = Policy::parse(SPEC_EXAMPLE, "p.yaml").unwrap();
        let none = HashSet::new();
        let role = |user: &str, member_of: &[&str]| {
            let set: HashSet<String> = member_of.iter().map(|s| s.to_string()).collect();
            policy.role_name(policy.role_for(user, &set)).to_string()
        };
        assert_eq!(role("billing_svc", &[]), "billing");
        assert_eq!(role("bob", &["crm_support"]), "support");
        assert_eq!(role("bob", &["bi_reader", "billing_svc"]), "billing");
        assert_eq!(
            policy.role_name(policy.role_for("mallory", &none)),
            "default"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_location() {
        let text = "version: 1\nroles:\n  billing: { members: [b] }\ntables:\n  public.t:\n    columns:\n      a: { level: L9 }\n      b: { level: L3, mask: nosuch }\n      c: { level: L3, access: { auditor: allow } }\n      d: { level: L3, access: { billing: { mask: keep(x) } } }\n      e: { level: L3, type: money }\n";
        let found = problems(text);
        assert_eq!(found.len(), 5, "{found:?}");
        assert!(found[0].starts_with("7:") && found[0].contains("unknown level `L9`"));
        assert!(found[1].starts_with("8:") && found[1].contains("nosuch"));
        assert!(found[2].starts_with("9:") && found[2].contains("unknown role `auditor`"));
        assert!(found[3].starts_with("10:") && found[3].contains("keep"));
        assert!(found[4].starts_with("11:") && found[4].contains("unsupported type `money`"));
    }

    #[test]
    fn unknown_and_duplicate_keys_are_errors() {
        let found = problems(
            "version: 1\ntables:\n  public.t:\n    columns:\n      a: { level: L3, colour: red }\n",
        );
        assert!(
            found[0].starts_with("5:") && found[0].contains("colour"),
            "{found:?}"
        );
        let found = problems("version: 1\nroles:\n  a: {}\n  a: {}\n");
        assert!(found[0].starts_with("4:"), "{found:?}");
        let found = problems("version: 1\nroles:\n  a: { members: [x], export: maybe }\n");
        assert!(found[0].contains("maybe"), "{found:?}");
        let found = problems("version: 2\n");
        assert!(
            found[0].contains("unsupported policy version 2"),
            "{found:?}"
        );
        let found = problems("version: 1\ntables:\n  public.t:\n    columns:\n      a: { level: L3, access: { default: permit } }\n");
        assert!(found[0].contains("unknown action `permit`"), "{found:?}");
    }

    #[test]
    fn an_unquoted_mask_with_arguments_in_a_flow_mapping_gets_a_hint() {
        let found = problems(
            "version: 1\ntables:\n  t:\n    columns:\n      a: { level: L3, mask: keep(3,4) }\n",
        );
        assert!(found[0].contains("must be quoted"), "{found:?}");
    }

    #[test]
    fn level_defaults_apply_without_overrides() {
        let policy = Policy::parse(
            "version: 1\ntables:\n  t:\n    columns:\n      a: { level: L1 }\n      b: { level: L4 }\n      c: { level: L2 }\n",
            "p.yaml",
        )
        .unwrap();
        let default = policy.role_by_name("default").unwrap();
        assert_eq!(policy.tables[0].qualified(), "public.t");
        assert_eq!(policy.action(default, 0).to_string(), "allow");
        assert_eq!(policy.action(default, 1).to_string(), "deny");
        assert_eq!(policy.action(default, 2).to_string(), "mask full");
        assert!(!policy.needs_hash_key());
        let explained = policy.explain(default);
        assert!(explained.contains("public.t.b"), "{explained}");
    }
}
