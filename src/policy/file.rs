//! The policy file as written (SPEC.md "Policy file"): serde structures that keep the
//! line and column of everything a later check may need to point at.
//!
//! Nothing here decides what a role may see; `policy::Policy::compile` turns this into
//! the resolved model after checking it. Maps keep file order, because the first
//! matching role wins. Duplicate keys are rejected by the YAML parser.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A YAML mapping deserialized in file order.
#[derive(Debug)]
pub struct Ordered<K, V>(pub Vec<(K, V)>);

impl<K, V> Default for Ordered<K, V> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for Ordered<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<K, V>(PhantomData<(K, V)>);
        impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<K, V> {
            type Value = Ordered<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Ordered(entries))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Ordered(Vec::new()))
            }
        }
        deserializer.deserialize_map(OrderedVisitor(PhantomData))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub version: Spanned<u32>,
    #[serde(default)]
    pub levels: Option<Ordered<Spanned<String>, LevelSpec>>,
    #[serde(default)]
    pub roles: Ordered<Spanned<String>, RoleSpec>,
    #[serde(default)]
    pub tables: Ordered<Spanned<String>, TableSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub default: Spanned<ActionSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    #[serde(default)]
    pub members: Vec<Spanned<String>>,
    #[serde(default)]
    pub max_rows: Option<u64>,
    #[serde(default)]
    pub export: Option<Permission>,
    #[serde(default)]
    pub filter_on_protected: Option<Permission>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub columns: Ordered<Spanned<String>, ColumnSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncryptMode {
    #[default]
    None,
    Randomized,
    Deterministic,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    pub level: Spanned<String>,
    #[serde(default)]
    pub encrypt: EncryptMode,
    #[serde(default, rename = "type")]
    pub logical_type: Option<Spanned<String>>,
    #[serde(default)]
    pub mask: Option<Spanned<String>>,
    #[serde(default)]
    pub access: Ordered<Spanned<String>, Spanned<ActionSpec>>,
}

/// An action as written: `allow`, `mask`, `redact`, `deny` or `{mask: FN}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionSpec {
    Allow,
    Mask,
    MaskWith(String),
    Redact,
    Deny,
}

impl<'de> Deserialize<'de> for ActionSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ActionVisitor;
        impl<'de> Visitor<'de> for ActionVisitor {
            type Value = ActionSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("allow, mask, redact, deny or {mask: FN}")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<ActionSpec, E> {
                match value {
                    "allow" => Ok(ActionSpec::Allow),
                    "mask" => Ok(ActionSpec::Mask),
                    "redact" => Ok(ActionSpec::Redact),
                    "deny" => Ok(ActionSpec::Deny),
                    other => Err(E::custom(format!(
                        "unknown action `{other}`: expected allow, mask, redact, deny or {{mask: FN}}"
                    ))),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ActionSpec, A::Error> {
                let Some((key, value)) = map.next_entry::<String, String>()? else {
                    return Err(de::Error::custom("expected {mask: FN}"));
                };
                if key != "mask" {
                    return Err(de::Error::custom(format!(
                        "unknown key `{key}`: the only mapping form of an action is {{mask: FN}}"
                    )));
                }
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("expected only {mask: FN}"));
                }
                Ok(ActionSpec::MaskWith(value))
            }
        }
        deserializer.deserialize_any(ActionVisitor)
    }
}
