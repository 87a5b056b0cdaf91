//! Which rewrite rules (other than a view's `_RETURN` rule) can send rows to the client.
//!
//! A rule such as `ON INSERT TO t DO INSTEAD SELECT id_card FROM customers` turns an
//! `INSERT` into a query whose rows reach the client with table OID 0 in their
//! RowDescription, so the catalog has to know which protected columns such rules read.
//! Only a rule action that is a `SELECT` or has a `RETURNING` list returns rows; rules
//! whose actions only write (`DO ALSO INSERT INTO audit ...`), do nothing or notify do
//! not. This module reads the rule's stored action (`pg_rewrite.ev_action`) to tell the
//! two apart; it must never answer "returns no rows" for a text it cannot read in full
//! (unparsable, too deep, of an unexpected shape). It only interprets text: no I/O, no
//! panics on input.

use super::node_tree::{self, Node};

/// PostgreSQL's `CmdType` values (`nodes.h`, version 15) that a rule action can have.
mod cmd {
    pub const UPDATE: i64 = 2;
    pub const INSERT: i64 = 3;
    pub const DELETE: i64 = 4;
    pub const UTILITY: i64 = 6;
    pub const NOTHING: i64 = 7;
}

/// Whether a rule whose `pg_rewrite.ev_action` text is `ev_action` may return rows to
/// the client. `true` when unsure.
pub fn may_return_rows(ev_action: &str) -> bool {
    let Ok(tree) = node_tree::parse(ev_action) else {
        return true;
    };
    let Some(actions) = tree.as_list() else {
        return true;
    };
    actions.iter().any(action_may_return_rows)
}

fn action_may_return_rows(action: &Node) -> bool {
    if !action.is_struct("QUERY") {
        return true;
    }
    match action.field("commandType").and_then(Node::as_int) {
        Some(cmd::UPDATE | cmd::INSERT | cmd::DELETE) => {
            // `<>` is an empty RETURNING list; anything else (or no field) may return.
            !matches!(
                action.field("returningList").and_then(Node::as_list),
                Some([])
            )
        }
        Some(cmd::NOTHING) => false,
        // NOTIFY is the only utility statement a rule may hold; it returns nothing.
        Some(cmd::UTILITY) => !action
            .field("utilityStmt")
            .is_some_and(|stmt| stmt.is_struct("NOTIFYSTMT")),
        // SELECT, and anything this module does not know.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::may_return_rows;

    /// `ev_action` of rules on `rt (id int)`, captured from PostgreSQL 15 (see
    /// `tests/fixtures/rules/schema.sql`).
    const SELECT: &str = include_str!("../../tests/fixtures/rules/r_select.txt");
    const INSERT: &str = include_str!("../../tests/fixtures/rules/r_insert.txt");
    const NOTHING: &str = include_str!("../../tests/fixtures/rules/r_nothing.txt");
    const NOTIFY: &str = include_str!("../../tests/fixtures/rules/r_notify.txt");
    const RETURNING: &str = include_str!("../../tests/fixtures/rules/r_returning.txt");
    const TWO_ACTIONS: &str = include_str!("../../tests/fixtures/rules/r_two_actions.txt");

    #[test]
    fn select_and_returning_actions_return_rows() {
        assert!(may_return_rows(SELECT));
        assert!(may_return_rows(RETURNING));
        // An INSERT, then a SELECT.
        assert!(may_return_rows(TWO_ACTIONS));
    }

    #[test]
    fn writes_nothing_and_notify_return_no_rows() {
        assert!(!may_return_rows(INSERT));
        assert!(!may_return_rows(NOTHING));
        assert!(!may_return_rows(NOTIFY));
    }

    #[test]
    fn what_cannot_be_read_may_return_rows() {
        assert!(may_return_rows(""));
        assert!(may_return_rows("not a node tree"));
        assert!(may_return_rows("{QUERY :commandType 3}"));
        assert!(may_return_rows("({QUERY :commandType 3})"));
        assert!(may_return_rows(
            "({QUERY :commandType 0 :returningList <>})"
        ));
        assert!(may_return_rows("({QUERY :returningList <>})"));
        assert!(may_return_rows(
            "({SELECT :commandType 3 :returningList <>})"
        ));
        assert!(may_return_rows(
            "({QUERY :commandType 6 :utilityStmt {COPYSTMT} :returningList <>})"
        ));
        assert!(may_return_rows(
            "({QUERY :commandType 3 :returningList ({TARGETENTRY})})"
        ));
        let deep = format!("{}{}", "(".repeat(2000), ")".repeat(2000));
        assert!(may_return_rows(&deep));
        // A truncated copy of a rule that only writes.
        assert!(may_return_rows(&INSERT[..INSERT.len() / 2]));
    }
}
