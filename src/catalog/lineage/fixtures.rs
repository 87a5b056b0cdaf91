//! The `pg_rewrite.ev_action` texts of the views in `tests/fixtures/lineage/schema.sql`,
//! captured from PostgreSQL 15.18, and the OIDs the objects had there.
//!
//! Test data only: it must never be used by the proxy itself.

/// `cust (id 1, name 2, phone 3, email 4)`.
pub const CUST: u32 = 16384;
/// `ord (id 1, cust_id 2, amount 3, note 4)`.
pub const ORD: u32 = 16391;
/// `tree (id 1, parent 2, label 3)`.
pub const TREE: u32 = 16396;
/// The view `v_plain (id 1, full_name 2, phone 3)`, read by `v_on_view`.
pub const V_PLAIN_OID: u32 = 16401;

pub const MV: &str = include_str!("../../../tests/fixtures/lineage/mv.txt");
pub const ODD_VIEW: &str = include_str!("../../../tests/fixtures/lineage/odd_view.txt");
pub const V_CASE: &str = include_str!("../../../tests/fixtures/lineage/v_case.txt");
pub const V_COUNT: &str = include_str!("../../../tests/fixtures/lineage/v_count.txt");
pub const V_CTE: &str = include_str!("../../../tests/fixtures/lineage/v_cte.txt");
pub const V_CTORS: &str = include_str!("../../../tests/fixtures/lineage/v_ctors.txt");
pub const V_EXPRS: &str = include_str!("../../../tests/fixtures/lineage/v_exprs.txt");
pub const V_FULL_USING: &str = include_str!("../../../tests/fixtures/lineage/v_full_using.txt");
pub const V_FUNC: &str = include_str!("../../../tests/fixtures/lineage/v_func.txt");
pub const V_GROUP: &str = include_str!("../../../tests/fixtures/lineage/v_group.txt");
pub const V_JOIN: &str = include_str!("../../../tests/fixtures/lineage/v_join.txt");
pub const V_LATERAL: &str = include_str!("../../../tests/fixtures/lineage/v_lateral.txt");
pub const V_LATERAL_FUNC: &str = include_str!("../../../tests/fixtures/lineage/v_lateral_func.txt");
pub const V_LEFT: &str = include_str!("../../../tests/fixtures/lineage/v_left.txt");
pub const V_NESTED_CTE: &str = include_str!("../../../tests/fixtures/lineage/v_nested_cte.txt");
pub const V_ON_VIEW: &str = include_str!("../../../tests/fixtures/lineage/v_on_view.txt");
pub const V_PLAIN: &str = include_str!("../../../tests/fixtures/lineage/v_plain.txt");
pub const V_RCTE: &str = include_str!("../../../tests/fixtures/lineage/v_rcte.txt");
pub const V_RCTE_CHAIN: &str = include_str!("../../../tests/fixtures/lineage/v_rcte_chain.txt");
pub const V_ROWS: &str = include_str!("../../../tests/fixtures/lineage/v_rows.txt");
pub const V_SCALAR_SUB: &str = include_str!("../../../tests/fixtures/lineage/v_scalar_sub.txt");
pub const V_SETOPS: &str = include_str!("../../../tests/fixtures/lineage/v_setops.txt");
pub const V_SUBLINKS: &str = include_str!("../../../tests/fixtures/lineage/v_sublinks.txt");
pub const V_SUBQ: &str = include_str!("../../../tests/fixtures/lineage/v_subq.txt");
pub const V_SYS: &str = include_str!("../../../tests/fixtures/lineage/v_sys.txt");
pub const V_UNION: &str = include_str!("../../../tests/fixtures/lineage/v_union.txt");
pub const V_USING: &str = include_str!("../../../tests/fixtures/lineage/v_using.txt");
pub const V_WHERE: &str = include_str!("../../../tests/fixtures/lineage/v_where.txt");
pub const V_WHOLEROW: &str = include_str!("../../../tests/fixtures/lineage/v_wholerow.txt");
pub const V_WINDOW: &str = include_str!("../../../tests/fixtures/lineage/v_window.txt");

/// Every fixture with its file name.
pub const ALL: &[(&str, &str)] = &[
    ("mv", MV),
    ("odd_view", ODD_VIEW),
    ("v_case", V_CASE),
    ("v_count", V_COUNT),
    ("v_cte", V_CTE),
    ("v_ctors", V_CTORS),
    ("v_exprs", V_EXPRS),
    ("v_full_using", V_FULL_USING),
    ("v_func", V_FUNC),
    ("v_group", V_GROUP),
    ("v_join", V_JOIN),
    ("v_lateral", V_LATERAL),
    ("v_lateral_func", V_LATERAL_FUNC),
    ("v_left", V_LEFT),
    ("v_nested_cte", V_NESTED_CTE),
    ("v_on_view", V_ON_VIEW),
    ("v_plain", V_PLAIN),
    ("v_rcte", V_RCTE),
    ("v_rcte_chain", V_RCTE_CHAIN),
    ("v_rows", V_ROWS),
    ("v_scalar_sub", V_SCALAR_SUB),
    ("v_setops", V_SETOPS),
    ("v_sublinks", V_SUBLINKS),
    ("v_subq", V_SUBQ),
    ("v_sys", V_SYS),
    ("v_union", V_UNION),
    ("v_using", V_USING),
    ("v_where", V_WHERE),
    ("v_wholerow", V_WHOLEROW),
    ("v_window", V_WINDOW),
];
