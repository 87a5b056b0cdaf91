//! Lineage of real PostgreSQL 15 views (see `fixtures`), and of hand-made trees that
//! must fail closed.

use super::fixtures::*;
use super::*;

fn copy(relation: u32, attnum: i16) -> ColumnLineage {
    ColumnLineage::Copy(ColumnRef { relation, attnum })
}

fn computed(sources: &[(u32, i16)]) -> ColumnLineage {
    ColumnLineage::Computed(
        sources
            .iter()
            .map(|&(relation, attnum)| ColumnRef { relation, attnum })
            .collect(),
    )
}

fn lineage(text: &str) -> Vec<(i16, ColumnLineage)> {
    view_lineage(text).unwrap_or_else(|e| panic!("{e}"))
}

/// `text` with `from` replaced once; the fixture must contain it exactly once.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?}");
    text.replacen(from, to, 1)
}

#[test]
fn plain_columns_with_aliases() {
    assert_eq!(
        lineage(V_PLAIN),
        [(1, copy(CUST, 1)), (2, copy(CUST, 2)), (3, copy(CUST, 3))]
    );
}

#[test]
fn a_view_on_a_view_names_the_inner_view() {
    assert_eq!(
        lineage(V_ON_VIEW),
        [(1, copy(V_PLAIN_OID, 2)), (2, copy(V_PLAIN_OID, 3))]
    );
}

#[test]
fn materialized_view() {
    assert_eq!(lineage(MV), [(1, copy(CUST, 2)), (2, copy(CUST, 3))]);
}

#[test]
fn where_clause_does_not_make_columns_derived() {
    assert_eq!(lineage(V_WHERE), [(1, copy(CUST, 1)), (2, copy(CUST, 2))]);
}

#[test]
fn system_column() {
    assert_eq!(lineage(V_SYS), [(1, copy(CUST, -1)), (2, copy(CUST, 2))]);
}

#[test]
fn quoted_names_and_a_table_aliased_old() {
    assert_eq!(
        lineage(ODD_VIEW),
        [(1, copy(CUST, 2)), (2, copy(CUST, 3)), (3, copy(CUST, 4))]
    );
}

#[test]
fn joins() {
    assert_eq!(lineage(V_JOIN), [(1, copy(CUST, 2)), (2, copy(ORD, 3))]);
    assert_eq!(lineage(V_LEFT), [(1, copy(CUST, 2)), (2, copy(ORD, 4))]);
    // USING: the merged column of an inner join is the left input's column.
    assert_eq!(
        lineage(V_USING),
        [(1, copy(CUST, 1)), (2, copy(CUST, 2)), (3, copy(ORD, 4))]
    );
    // FULL JOIN USING: the merged column is COALESCE(left, right).
    assert_eq!(
        lineage(V_FULL_USING),
        [(1, computed(&[(CUST, 1), (ORD, 1)])), (2, copy(CUST, 3))]
    );
}

#[test]
fn subquery_in_from() {
    assert_eq!(
        lineage(V_SUBQ),
        [
            (1, copy(CUST, 2)),
            (2, copy(CUST, 3)),
            (3, computed(&[(CUST, 4)]))
        ]
    );
}

#[test]
fn lateral_subquery_and_outer_reference() {
    // `l.cn` is `c.phone` read from the outer level inside the LATERAL subquery.
    assert_eq!(
        lineage(V_LATERAL),
        [(1, copy(CUST, 2)), (2, copy(ORD, 3)), (3, copy(CUST, 3))]
    );
}

#[test]
fn lateral_function_depends_on_its_arguments() {
    assert_eq!(
        lineage(V_LATERAL_FUNC),
        [(1, copy(CUST, 1)), (2, computed(&[(CUST, 3), (CUST, 4)]))]
    );
}

#[test]
fn function_and_values_in_from_read_no_column() {
    assert_eq!(
        lineage(V_FUNC),
        [(1, computed(&[])), (2, computed(&[])), (3, computed(&[]))]
    );
}

#[test]
fn common_table_expressions() {
    assert_eq!(lineage(V_CTE), [(1, copy(CUST, 3)), (2, copy(CUST, 2))]);
    // The CTE is referenced from a subquery, one level below its owner.
    assert_eq!(lineage(V_NESTED_CTE), [(1, copy(CUST, 3))]);
}

#[test]
fn recursive_cte_is_computed_over_what_each_column_reaches() {
    // id: tree.id in both arms; path: tree.label, and itself; depth: constants and
    // itself. The join condition on r.id = t.parent is not a source.
    assert_eq!(
        lineage(V_RCTE),
        [
            (1, computed(&[(TREE, 1)])),
            (2, computed(&[(TREE, 3)])),
            (3, computed(&[]))
        ]
    );
    // a <- b <- c <- tree.label over three rounds; c is never a copy.
    assert_eq!(
        lineage(V_RCTE_CHAIN),
        [
            (1, computed(&[(TREE, 3)])),
            (2, computed(&[(TREE, 3)])),
            (3, computed(&[(TREE, 3)]))
        ]
    );
}

#[test]
fn set_operations_union_every_arm() {
    assert_eq!(
        lineage(V_UNION),
        [
            (1, computed(&[(CUST, 1), (ORD, 2)])),
            (2, computed(&[(CUST, 2), (ORD, 4)]))
        ]
    );
    // (cust.name INTERSECT ord.note) EXCEPT tree.label
    assert_eq!(
        lineage(V_SETOPS),
        [(1, computed(&[(CUST, 2), (ORD, 4), (TREE, 3)]))]
    );
}

#[test]
fn sublinks_count_everything_in_the_subquery() {
    // The scalar subquery's WHERE columns count too (the chosen over-approximation).
    assert_eq!(
        lineage(V_SCALAR_SUB),
        [
            (1, copy(CUST, 2)),
            (2, computed(&[(CUST, 1), (ORD, 2), (ORD, 3)]))
        ]
    );
    assert_eq!(
        lineage(V_SUBLINKS),
        [
            (1, computed(&[(CUST, 2), (ORD, 4)])),
            (2, computed(&[(CUST, 3), (ORD, 4)])),
            (3, computed(&[(TREE, 3)]))
        ]
    );
}

#[test]
fn expressions() {
    // upper(name), name || phone, name::varchar (a RelabelType), 42, a string constant
    // full of characters the text format escapes.
    assert_eq!(
        lineage(V_EXPRS),
        [
            (1, computed(&[(CUST, 2)])),
            (2, computed(&[(CUST, 2), (CUST, 3)])),
            (3, computed(&[(CUST, 2)])),
            (4, computed(&[])),
            (5, computed(&[]))
        ]
    );
    assert_eq!(
        lineage(V_CASE),
        [
            (1, computed(&[(CUST, 2), (CUST, 3), (CUST, 4)])),
            (2, computed(&[(CUST, 3), (CUST, 4)]))
        ]
    );
    assert_eq!(
        lineage(V_CTORS),
        [
            (1, computed(&[(CUST, 2), (CUST, 3)])),
            (2, computed(&[(CUST, 3), (CUST, 4)]))
        ]
    );
}

#[test]
fn aggregates_and_windows() {
    assert_eq!(
        lineage(V_COUNT),
        [(1, computed(&[])), (2, computed(&[(CUST, 3)]))]
    );
    // The aggregate's ORDER BY argument counts; GROUP BY alone does not.
    assert_eq!(
        lineage(V_GROUP),
        [
            (1, copy(CUST, 3)),
            (2, computed(&[])),
            (3, computed(&[(CUST, 2), (CUST, 4)]))
        ]
    );
    // Window PARTITION BY / ORDER BY are not sources, like WHERE.
    assert_eq!(
        lineage(V_WINDOW),
        [
            (1, copy(CUST, 2)),
            (2, computed(&[])),
            (3, computed(&[(CUST, 1)]))
        ]
    );
}

#[test]
fn whole_row_references() {
    // `c`, `row_to_json(c)`, then `c.*` expanded to its columns.
    assert_eq!(
        lineage(V_WHOLEROW),
        [
            (1, computed(&[(CUST, 0)])),
            (2, computed(&[(CUST, 0)])),
            (3, copy(CUST, 1)),
            (4, copy(CUST, 2)),
            (5, copy(CUST, 3)),
            (6, copy(CUST, 4))
        ]
    );
}

#[test]
fn whole_rows_of_subqueries_joins_ctes_and_lateral_values() {
    // row_to_json of a subquery, of a join (every column of both sides) and of a CTE;
    // then the two columns of a LATERAL VALUES list, each from its own cells.
    assert_eq!(
        lineage(V_ROWS),
        [
            (1, computed(&[(CUST, 2), (CUST, 3)])),
            (
                2,
                computed(&[
                    (CUST, 1),
                    (CUST, 2),
                    (CUST, 3),
                    (CUST, 4),
                    (TREE, 1),
                    (TREE, 2),
                    (TREE, 3)
                ])
            ),
            (3, computed(&[(CUST, 4)])),
            (4, computed(&[(CUST, 3), (CUST, 4)])),
            (5, computed(&[]))
        ]
    );
}

#[test]
fn unknown_range_entry_kind_fails_closed() {
    let text = edit(
        V_PLAIN,
        ":rtekind 0 :relid 16384",
        ":rtekind 9 :relid 16384",
    );
    let all = computed(&[(CUST, 0)]);
    assert_eq!(
        lineage(&text),
        [(1, all.clone()), (2, all.clone()), (3, all)]
    );
}

#[test]
fn var_outside_the_range_table_fails_closed() {
    // The view itself (the `old`/`new` placeholders) is not among the sources.
    let text = edit(V_PLAIN, ":varno 3 :varattno 2", ":varno 7 :varattno 2");
    assert_eq!(
        lineage(&text),
        [
            (1, copy(CUST, 1)),
            (2, computed(&[(CUST, 0)])),
            (3, copy(CUST, 3))
        ]
    );
    let text = edit(
        V_LATERAL,
        ":varattno 3 :vartype 25 :vartypmod -1 :varcollid 100 :varlevelsup 1",
        ":varattno 3 :vartype 25 :vartypmod -1 :varcollid 100 :varlevelsup 2",
    );
    assert_eq!(lineage(&text)[2], (3, computed(&[(CUST, 0), (ORD, 0)])));
}

#[test]
fn unexpected_shapes_fail_closed() {
    let all = computed(&[(CUST, 0)]);
    let text = edit(
        V_PLAIN,
        "{VAR :varno 3 :varattno 3",
        "{VAR :varno 3 :varattnum 3",
    );
    assert_eq!(lineage(&text)[2], (3, all.clone()));
    let text = edit(
        V_PLAIN,
        "{VAR :varno 3 :varattno 3",
        "{PLACEHOLDERVAR :varno 3",
    );
    // An unknown node is walked for VARs; with none inside, it reads nothing.
    assert_eq!(lineage(&text)[2], (3, computed(&[])));
    // A table aliased "old" in FROM is a real source, unlike the view's placeholders.
    let text = edit(ODD_VIEW, ":varno 3 :varattno 3", ":varno 9 :varattno 3");
    assert_eq!(lineage(&text)[1], (2, all.clone()));
    // A CTE name that matches nothing.
    let text = edit(
        V_CTE,
        ":ctename x :ctelevelsup 0",
        ":ctename y :ctelevelsup 0",
    );
    assert_eq!(lineage(&text), [(1, all.clone()), (2, all)]);
}

#[test]
fn references_to_the_view_itself_fail_closed() {
    // Entry 1 is the materialized view's own `old` placeholder.
    let text = edit(MV, ":varno 3 :varattno 2", ":varno 1 :varattno 2");
    assert_eq!(
        lineage(&text),
        [(1, computed(&[(CUST, 0)])), (2, copy(CUST, 3))]
    );
}

#[test]
fn unreadable_text_is_an_error() {
    assert!(matches!(
        view_lineage("({QUERY :commandType 1"),
        Err(LineageError::Parse(ParseError::UnexpectedEnd))
    ));
    for text in [
        "<>",
        "{QUERY :targetList <>}",
        "({QUERY :commandType 1})",
        "({QUERY :targetList <>} {QUERY :targetList <>})",
        "({QUERY :targetList (1)})",
        "({QUERY :targetList ({TARGETENTRY :expr <> :resno 0 :resjunk false})})",
        "({QUERY :rtable ({RANGETBLENTRY :rtekind 0 :relid x}) :targetList <>})",
    ] {
        assert!(
            matches!(view_lineage(text), Err(LineageError::Shape(_))),
            "{text}"
        );
    }
}

/// A one-column query over `rtable` whose only output is `expr`.
fn query(rtable: &str, expr: &str) -> String {
    format!(
        "({{QUERY :commandType 1 :cteList <> :rtable ({rtable}) :setOperations <> \
         :targetList ({{TARGETENTRY :expr {expr} :resno 1 :resjunk false}})}})"
    )
}

const RELATION: &str = "{RANGETBLENTRY :rtekind 0 :relid 100 :relkind r :inFromCl true}";

fn var(varno: usize, attno: i16) -> String {
    format!("{{VAR :varno {varno} :varattno {attno} :varlevelsup 0}}")
}

#[test]
fn join_alias_cycle_fails_closed_within_the_budget() {
    // A join whose alias refers to itself twice: without the step budget, following it
    // would branch exponentially.
    let join = format!(
        "{{RANGETBLENTRY :rtekind 2 :joinaliasvars ({{COALESCEEXPR :args ({} {})}})}}",
        var(2, 1),
        var(2, 1)
    );
    let text = query(&format!("{RELATION} {join}"), &var(2, 1));
    assert_eq!(lineage(&text), [(1, computed(&[(100, 0)]))]);
}

#[test]
fn branching_join_aliases_exhaust_the_budget_and_fail_closed() {
    // Entry k is a join whose column is COALESCE of entry k - 1's column, twice: 2^100
    // paths, each ending at a real column and none too deep. Only the step budget stops
    // this.
    let joins: Vec<String> = (2..=100)
        .map(|k| {
            format!(
                "{{RANGETBLENTRY :rtekind 2 :joinaliasvars ({{COALESCEEXPR :args ({} {})}})}}",
                var(k - 1, 1),
                var(k - 1, 1)
            )
        })
        .collect();
    let text = query(&format!("{RELATION} {}", joins.join(" ")), &var(100, 1));
    let started = std::time::Instant::now();
    assert_eq!(lineage(&text), [(1, computed(&[(100, 0)]))]);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn long_join_alias_chains_are_bounded() {
    // Entry k (k >= 2) is a join whose only column is column 1 of entry k - 1.
    let chain = |length: usize| {
        let joins: Vec<String> = (2..=length)
            .map(|k| {
                format!(
                    "{{RANGETBLENTRY :rtekind 2 :joinaliasvars ({})}}",
                    var(k - 1, 1)
                )
            })
            .collect();
        query(&format!("{RELATION} {}", joins.join(" ")), &var(length, 1))
    };
    assert_eq!(lineage(&chain(200)), [(1, copy(100, 1))]);
    // Longer than the depth bound: fails closed instead of exhausting the stack.
    assert_eq!(lineage(&chain(5000)), [(1, computed(&[(100, 0)]))]);
}

#[test]
fn deep_expressions_stay_within_the_stack() {
    // As deep as the parser allows: the list, QUERY, target list, TARGETENTRY, two
    // levels per function call, and the VAR.
    let calls = (node_tree::MAX_DEPTH - 5) / 2;
    let expr = format!(
        "{}{}{}",
        "{FUNCEXPR :args (".repeat(calls),
        var(1, 2),
        ")}".repeat(calls)
    );
    assert_eq!(
        lineage(&query(RELATION, &expr)),
        [(1, computed(&[(100, 2)]))]
    );
}

#[test]
fn self_referencing_non_recursive_cte_fails_closed() {
    // A CTE that claims not to be recursive but reads itself.
    let cte_ref = "{RANGETBLENTRY :rtekind 6 :ctename c :ctelevelsup 1}";
    let inner = query(cte_ref, &var(1, 1));
    let inner = inner.trim_start_matches('(').trim_end_matches(')');
    let text = format!(
        "({{QUERY :commandType 1 :setOperations <> \
         :cteList ({{COMMONTABLEEXPR :ctename c :cterecursive false :ctequery {inner}}}) \
         :rtable ({RELATION} {}) \
         :targetList ({{TARGETENTRY :expr {} :resno 1 :resjunk false}})}})",
        cte_ref.replace(":ctelevelsup 1", ":ctelevelsup 0"),
        var(2, 1)
    );
    assert_eq!(lineage(&text), [(1, computed(&[(100, 0)]))]);
}

#[test]
fn the_deepest_walks_fit_in_a_small_stack() {
    // Half the 2 MiB that spawned threads (tokio's workers among them) get by default;
    // a debug build needs about 0.6 KiB per level of the depth bound.
    let worker = std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(|| {
            deep_expressions_stay_within_the_stack();
            long_join_alias_chains_are_bounded();
            join_alias_cycle_fails_closed_within_the_budget();
            branching_join_aliases_exhaust_the_budget_and_fail_closed();
        });
    assert!(worker.map(|handle| handle.join().is_ok()).unwrap_or(false));
}
