//! Test-only stand-in for the policy engine's parser: a loose model of SPEC.md's policy
//! format, so the demo policy and the example policies in `policies/` are checked
//! against the contract before the engine exists. When the engine lands, its own
//! parser and validator should replace this. Never used outside tests.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub version: u32,
    pub levels: BTreeMap<String, Level>,
    pub roles: BTreeMap<String, Role>,
    pub tables: BTreeMap<String, Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Level {
    pub name: String,
    pub default: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub max_rows: Option<u64>,
    #[serde(default)]
    pub export: Option<String>,
    #[serde(default)]
    pub filter_on_protected: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub columns: BTreeMap<String, Column>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub level: String,
    #[serde(default)]
    pub encrypt: Option<String>,
    #[serde(default, rename = "type")]
    pub logical_type: Option<String>,
    #[serde(default)]
    pub mask: Option<String>,
    #[serde(default)]
    pub access: BTreeMap<String, Action>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Action {
    Named(String),
    Mask(MaskOverride),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskOverride {
    pub mask: String,
}

pub fn parse(text: &str) -> Result<Policy, String> {
    serde_saphyr::from_str(text).map_err(|error| error.to_string())
}

const ACTIONS: [&str; 4] = ["allow", "mask", "redact", "deny"];

/// The cross-references SPEC.md makes errors: unknown levels, roles, masks, actions.
pub fn check(policy: &Policy) -> Result<(), String> {
    if policy.version != 1 {
        return Err(format!("version {} (expected 1)", policy.version));
    }
    for (id, level) in &policy.levels {
        if !ACTIONS.contains(&level.default.as_str()) {
            return Err(format!("level {id}: unknown default {:?}", level.default));
        }
        if level.name.trim().is_empty() {
            return Err(format!("level {id}: empty name"));
        }
    }
    for (name, role) in &policy.roles {
        if name != "default" && role.members.is_empty() {
            return Err(format!("role {name}: no members"));
        }
        if role.max_rows == Some(0) {
            return Err(format!(
                "role {name}: max_rows 0 would refuse every protected row"
            ));
        }
        for (key, value) in [
            ("export", &role.export),
            ("filter_on_protected", &role.filter_on_protected),
        ] {
            if let Some(value) = value {
                if value != "allow" && value != "deny" {
                    return Err(format!("role {name}: {key}: {value:?}"));
                }
            }
        }
    }
    for (table, spec) in &policy.tables {
        if table.split('.').count() != 2 {
            return Err(format!("table {table}: expected SCHEMA.TABLE"));
        }
        for (column, spec) in &spec.columns {
            let at = format!("{table}.{column}");
            let level = policy
                .levels
                .get(&spec.level)
                .ok_or_else(|| format!("{at}: unknown level {}", spec.level))?;
            let encrypt = spec.encrypt.as_deref().unwrap_or("none");
            if !["none", "randomized", "deterministic"].contains(&encrypt) {
                return Err(format!("{at}: encrypt {encrypt:?}"));
            }
            // The stored type differs from what clients see only when pgveil encrypts.
            if spec.logical_type.is_some() && encrypt == "none" {
                return Err(format!("{at}: `type` without `encrypt` changes nothing"));
            }
            if let Some(mask) = &spec.mask {
                check_mask(mask).map_err(|error| format!("{at}: {error}"))?;
            }
            let mut uses_column_mask = level.default == "mask";
            for (role, action) in &spec.access {
                if role != "default" && !policy.roles.contains_key(role) {
                    return Err(format!("{at}: access names unknown role {role}"));
                }
                match action {
                    Action::Named(action) if ACTIONS.contains(&action.as_str()) => {
                        uses_column_mask |= action == "mask";
                    }
                    Action::Named(action) => {
                        return Err(format!("{at}: {role}: unknown action {action:?}"));
                    }
                    Action::Mask(MaskOverride { mask }) => {
                        check_mask(mask).map_err(|error| format!("{at}: {role}: {error}"))?;
                    }
                }
            }
            if uses_column_mask && spec.mask.is_none() {
                return Err(format!("{at}: some role gets `mask`, but no mask is set"));
            }
        }
    }
    Ok(())
}

/// The masks SPEC.md lists, with their argument shapes.
fn check_mask(mask: &str) -> Result<(), String> {
    const PLAIN: [&str; 9] = [
        "full",
        "email",
        "cn_mobile",
        "cn_id_card",
        "cn_bank_card",
        "cn_name",
        "cn_address",
        "hash",
        "year",
    ];
    let quoted = r"'(?:[^']|'')*'";
    let shapes = [
        r"^keep\(\s*\d+\s*,\s*\d+\s*(?:,\s*'[^']'\s*)?\)$".to_string(),
        format!(r"^constant\({quoted}\)$"),
        format!(r"^regex\({quoted}\s*,\s*{quoted}\)$"),
    ];
    let fits = PLAIN.contains(&mask)
        || shapes.iter().any(|shape| {
            regex_lite::Regex::new(shape)
                .map(|shape| shape.is_match(mask))
                .unwrap_or(false)
        });
    if fits {
        Ok(())
    } else {
        Err(format!("unknown mask {mask:?}"))
    }
}

/// The column names of `CREATE TABLE name (...)` in `sql` (one column per line).
pub fn create_table_columns(sql: &str, name: &str) -> Option<Vec<String>> {
    let start = sql.find(&format!("CREATE TABLE {name} ("))?;
    let body = &sql[start..];
    let end = body.find("\n);")?;
    Some(
        body[..end]
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().next())
            .filter(|word| {
                !["PRIMARY", "UNIQUE", "CONSTRAINT", "FOREIGN", "CHECK", "--"]
                    .iter()
                    .any(|keyword| word.starts_with(keyword))
            })
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn the_checker_catches_what_spec_md_calls_errors() {
    let good = "version: 1\nlevels:\n  L3: { name: sensitive, default: mask }\nroles:\n  ops: { members: [a] }\ntables:\n  public.t:\n    columns:\n      c: { level: L3, mask: \"keep(3,4)\", access: { ops: { mask: hash } } }\n";
    check(&parse(good).unwrap()).unwrap();
    for (from, to) in [
        ("\"keep(3,4)\"", "stars"),        // unknown mask
        ("ops: { mask", "nobody: { mask"), // unknown role
        ("level: L3", "level: L9"),        // unknown level
        ("{ mask: hash }", "maybe"),       // unknown action
        ("mask: \"keep(3,4)\", ", ""),     // mask needed, none set
    ] {
        let bad = good.replacen(from, to, 1);
        assert!(
            parse(&bad).map_or(true, |policy| check(&policy).is_err()),
            "accepted: {bad}"
        );
    }
    assert!(parse(&good.replace("columns:", "colums:")).is_err());
    // In a flow mapping a comma ends a plain value: unquoted, keep(3,4) is two keys.
    assert!(parse(&good.replace("\"keep(3,4)\"", "keep(3,4)")).is_err());
    assert!(
        parse(&format!("{good}version: 1\n")).is_err(),
        "duplicate key"
    );
    for mask in [
        "keep(1,1,'#')",
        "constant('n/a')",
        "regex('^(\\d{3})\\d+$','$1****')",
    ] {
        check_mask(mask).unwrap();
    }
}
