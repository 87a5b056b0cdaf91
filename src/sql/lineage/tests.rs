use super::*;
use crate::wire::copy_rows::CopyFormat;

// Column ids of the fixture.
const NAME: ColumnId = 1;
const PHONE: ColumnId = 2;
const EMAIL: ColumnId = 3;
const ID_CARD: ColumnId = 4;
const CARD: ColumnId = 5;
const IBAN_BILLING: ColumnId = 6;
const IBAN_ARCHIVE: ColumnId = 7;
const LEAD_PHONE: ColumnId = 8;
const LEAD_MOBILE: ColumnId = 9;
const QUOTED_PHONE: ColumnId = 10;

/// A relation from `schema.name(col, col[1], col[2,3], col[2]*)` (columns separated by
/// a comma and a space): `[ids]` are the
/// column's sources, `*` marks a generated column; `view:` in front makes it a view.
fn relation(description: &str) -> ProtectedRelation {
    let (is_view, description) = match description.strip_prefix("view:") {
        Some(rest) => (true, rest),
        None => (false, description),
    };
    let (qualified, columns) = description.split_once('(').unwrap();
    let (schema, name) = qualified.split_once('.').unwrap();
    let columns = columns
        .strip_suffix(')')
        .unwrap()
        .split(", ")
        .map(|column| {
            let (column, generated) = match column.strip_suffix('*') {
                Some(c) => (c, true),
                None => (column, false),
            };
            let (name, sources) = match column.split_once('[') {
                Some((name, ids)) => (
                    name,
                    ids.strip_suffix(']')
                        .unwrap()
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|id| id.trim().parse().unwrap())
                        .collect(),
                ),
                None => (column, Sources::new()),
            };
            RelationColumn {
                name: name.into(),
                sources,
                generated,
            }
        })
        .collect();
    ProtectedRelation {
        schema: schema.into(),
        name: name.into(),
        is_view,
        columns,
    }
}

fn relations() -> HashMap<String, Vec<Arc<ProtectedRelation>>> {
    let mut map: HashMap<String, Vec<Arc<ProtectedRelation>>> = HashMap::new();
    for description in [
        "public.customers(id, name[1], phone[2], email[3], id_card[4], phone_tail[2]*, note)",
        "public.orders(id, customer_id, card[5], total)",
        "view:public.v_masked(id, contact[2,3], name[1], code[3,4])",
        // Two schemas, same relname, same column names.
        "billing.accounts(id, iban[6], owner[1])",
        "archive.accounts(id, iban[7], owner[1])",
        // Two schemas, same relname, different columns.
        "sales.leads(id, phone[8])",
        "crm.leads(lead_id, mobile[9], note)",
        // A quoted, mixed-case name.
        "public.Customers(id, Phone[10])",
    ] {
        let relation = relation(description);
        map.entry(relation.name.clone())
            .or_default()
            .push(Arc::new(relation));
    }
    map
}

fn analyse_all(sql: &str) -> Vec<StatementLineage> {
    let relations = relations();
    let knowledge = Knowledge {
        relations: &relations,
    };
    analyse(sql, &knowledge).unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

fn one_statement(sql: &str) -> StatementLineage {
    let mut all = analyse_all(sql);
    assert_eq!(all.len(), 1, "{sql}");
    all.remove(0)
}

fn set(ids: &[ColumnId]) -> Sources {
    ids.iter().copied().collect()
}

fn one(ids: &[ColumnId]) -> OutputColumn {
    OutputColumn::One(set(ids))
}

fn many(ids: &[ColumnId]) -> OutputColumn {
    OutputColumn::Many(set(ids))
}

/// The outputs of a single statement.
fn outputs(sql: &str) -> Vec<OutputColumn> {
    one_statement(sql).outputs
}

/// The sources of the single output of a single statement.
fn single(sql: &str) -> Sources {
    match outputs(sql).as_slice() {
        [OutputColumn::One(sources)] => sources.clone(),
        other => panic!("{sql}: {other:?}"),
    }
}

fn filters(sql: &str) -> Sources {
    one_statement(sql).filters
}

fn stored(sql: &str) -> Sources {
    one_statement(sql).stored
}

const CUSTOMERS_STAR: [&[ColumnId]; 7] =
    [&[], &[NAME], &[PHONE], &[EMAIL], &[ID_CARD], &[PHONE], &[]];

fn customers_star() -> Vec<OutputColumn> {
    CUSTOMERS_STAR.iter().map(|ids| one(ids)).collect()
}

// ---- result columns ----------------------------------------------------------

#[test]
fn direct_references_and_aliases() {
    assert_eq!(
        outputs("SELECT id, phone, c.email, public.customers.id_card FROM customers c, customers"),
        vec![one(&[]), one(&[PHONE]), one(&[EMAIL]), one(&[ID_CARD])]
    );
    assert_eq!(
        single("SELECT x.phone AS p FROM customers AS x"),
        set(&[PHONE])
    );
    assert_eq!(single("SELECT note FROM customers"), set(&[]));
    assert_eq!(single("SELECT total FROM orders"), set(&[]));
}

#[test]
fn functions_casts_and_operators() {
    for sql in [
        "SELECT upper(phone) FROM customers",
        "SELECT phone::text FROM customers",
        "SELECT CAST(phone AS varchar(4)) FROM customers",
        "SELECT 'tel: ' || phone FROM customers",
        "SELECT substring(phone from 1 for 3) FROM customers",
        "SELECT substring(phone, 1, 3) FROM customers",
        "SELECT position('1' in phone) FROM customers",
        "SELECT overlay(phone placing 'x' from 1 for 2) FROM customers",
        "SELECT trim(both ' ' from phone) FROM customers",
        "SELECT length(phone) + 1 FROM customers",
        "SELECT -length(phone) FROM customers",
        "SELECT phone COLLATE \"C\" FROM customers",
        "SELECT (string_to_array(phone, '-'))[1] FROM customers",
        "SELECT phone LIKE '1%' FROM customers",
        "SELECT phone IN ('1', '2') FROM customers",
        "SELECT phone BETWEEN '1' AND '2' FROM customers",
        "SELECT phone IS DISTINCT FROM 'x' FROM customers",
        "SELECT coalesce(phone, 'none') FROM customers",
        "SELECT nullif(phone, '') FROM customers",
        "SELECT greatest(phone, 'a'), least('b', 'c') FROM customers",
        "SELECT md5(phone) FROM customers",
        "SELECT pg_catalog.upper(phone) FROM customers",
        "SELECT phone ~ '^1' FROM customers",
    ] {
        let sources = outputs(sql)
            .into_iter()
            .flat_map(|o| match o {
                OutputColumn::One(s) | OutputColumn::Many(s) => s,
            })
            .collect::<Sources>();
        assert_eq!(sources, set(&[PHONE]), "{sql}");
    }
    assert_eq!(
        single("SELECT extract(year from created) FROM customers"),
        set(&[])
    );
    assert_eq!(
        single("SELECT created AT TIME ZONE phone FROM customers"),
        set(&[PHONE])
    );
    assert_eq!(
        outputs("SELECT 1 + $1, 'x', NULL"),
        vec![one(&[]), one(&[]), one(&[])]
    );
}

#[test]
fn aggregates() {
    for (sql, expected) in [
        (
            "SELECT string_agg(phone, ',') FROM customers",
            set(&[PHONE]),
        ),
        ("SELECT array_agg(phone) FROM customers", set(&[PHONE])),
        ("SELECT json_agg(email) FROM customers", set(&[EMAIL])),
        (
            "SELECT jsonb_agg(c) FROM customers c",
            set(&[NAME, PHONE, EMAIL, ID_CARD]),
        ),
        ("SELECT max(phone) FROM customers", set(&[PHONE])),
        (
            "SELECT string_agg(name, ',' ORDER BY phone) FROM customers",
            set(&[NAME, PHONE]),
        ),
        (
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY email) FROM customers",
            set(&[EMAIL]),
        ),
        (
            "SELECT count(*) FILTER (WHERE phone LIKE '1%') FROM customers",
            set(&[PHONE]),
        ),
    ] {
        assert_eq!(single(sql), expected, "{sql}");
    }
    // Ordering inside an aggregate is a filter too.
    assert_eq!(
        filters("SELECT string_agg(name, ',' ORDER BY phone) FROM customers"),
        set(&[PHONE])
    );
    assert_eq!(
        filters("SELECT count(*) FILTER (WHERE phone LIKE '1%') FROM customers"),
        set(&[PHONE])
    );
}

#[test]
fn count_and_is_null_are_allow_listed() {
    for sql in [
        "SELECT count(*) FROM customers",
        "SELECT count(phone) FROM customers",
        "SELECT count(ALL phone) FROM customers",
        "SELECT count(c) FROM customers c",
        "SELECT count(c.*) FROM customers c",
        "SELECT pg_catalog.count(phone) FROM customers",
        "SELECT phone IS NULL FROM customers",
        "SELECT phone IS NOT NULL FROM customers",
        "SELECT CASE WHEN phone IS NULL THEN 'none' ELSE 'some' END FROM customers",
    ] {
        assert_eq!(single(sql), set(&[]), "{sql}");
        assert_eq!(filters(sql), set(&[]), "{sql}");
    }
    // Distinct values are counted: they count.
    assert_eq!(
        single("SELECT count(DISTINCT phone) FROM customers"),
        set(&[PHONE])
    );
    // Not a plain column.
    assert_eq!(
        single("SELECT count(upper(phone)) FROM customers"),
        set(&[PHONE])
    );
    assert_eq!(
        single("SELECT count(NULLIF(phone, '1')) FROM customers"),
        set(&[PHONE])
    );
    // A user function called count in another schema is not the allow-listed one.
    assert_eq!(
        single("SELECT myschema.count(phone) FROM customers"),
        set(&[PHONE])
    );
}

#[test]
fn whole_row_references() {
    let all = set(&[NAME, PHONE, EMAIL, ID_CARD]);
    for sql in [
        "SELECT c FROM customers c",
        "SELECT c::text FROM customers c",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT to_jsonb(c.*) FROM customers c",
        "SELECT to_json(customers) FROM customers",
        "SELECT md5(c::text) FROM customers AS c",
        "SELECT json_build_object('x', c) FROM customers c",
        "SELECT hstore(c) FROM public.customers c",
    ] {
        assert_eq!(single(sql), all, "{sql}");
    }
    // A field of the row is that column.
    assert_eq!(single("SELECT (c).phone FROM customers c"), set(&[PHONE]));
    assert_eq!(single("SELECT (c).id FROM customers c"), set(&[]));
    // A column of the same name wins over the alias.
    assert_eq!(single("SELECT phone FROM customers phone"), set(&[PHONE]));
}

#[test]
fn constructors() {
    for (sql, expected) in [
        (
            "SELECT json_build_object('p', phone, 'e', email) FROM customers",
            set(&[PHONE, EMAIL]),
        ),
        ("SELECT ROW(phone, id) FROM customers", set(&[PHONE])),
        ("SELECT (phone, id) FROM customers", set(&[PHONE])),
        (
            "SELECT ARRAY[phone, email] FROM customers",
            set(&[PHONE, EMAIL]),
        ),
        ("SELECT ARRAY(SELECT phone FROM customers)", set(&[PHONE])),
        ("SELECT to_json(ARRAY[name]) FROM customers", set(&[NAME])),
        (
            "SELECT jsonb_build_array(id_card) FROM customers",
            set(&[ID_CARD]),
        ),
    ] {
        assert_eq!(single(sql), expected, "{sql}");
    }
}

#[test]
fn case_conditions_are_sources_and_filters() {
    let sql = "SELECT CASE WHEN phone LIKE '1%' THEN 1 END FROM customers";
    let lineage = one_statement(sql);
    assert_eq!(lineage.outputs, vec![one(&[PHONE])]);
    assert_eq!(lineage.filters, set(&[PHONE]));
    let sql = "SELECT CASE email WHEN 'x' THEN name ELSE id_card END FROM customers";
    let lineage = one_statement(sql);
    assert_eq!(lineage.outputs, vec![one(&[NAME, EMAIL, ID_CARD])]);
    assert_eq!(lineage.filters, set(&[EMAIL]));
    // Results only: no filter.
    let sql = "SELECT CASE WHEN id > 3 THEN phone ELSE email END FROM customers";
    let lineage = one_statement(sql);
    assert_eq!(lineage.outputs, vec![one(&[PHONE, EMAIL])]);
    assert_eq!(lineage.filters, set(&[]));
    // A CASE nested in a function still has its condition counted.
    assert_eq!(
        filters("SELECT upper(CASE WHEN id_card > 'a' THEN name END) FROM customers"),
        set(&[ID_CARD])
    );
}

#[test]
fn window_functions() {
    let sql = "SELECT row_number() OVER (PARTITION BY email ORDER BY phone) FROM customers";
    let lineage = one_statement(sql);
    assert_eq!(lineage.outputs, vec![one(&[PHONE, EMAIL])]);
    assert_eq!(lineage.filters, set(&[PHONE, EMAIL]));
    let sql = "SELECT rank() OVER w, id FROM customers WINDOW w AS (ORDER BY id_card)";
    let lineage = one_statement(sql);
    assert_eq!(lineage.outputs, vec![one(&[ID_CARD]), one(&[])]);
    assert_eq!(lineage.filters, set(&[ID_CARD]));
    assert_eq!(
        single("SELECT lag(name) OVER (ORDER BY id) FROM customers"),
        set(&[NAME])
    );
}

#[test]
fn wildcards_expand_in_order() {
    assert_eq!(outputs("SELECT * FROM customers"), customers_star());
    let mut expected = customers_star();
    expected.push(one(&[PHONE]));
    expected.push(one(&[]));
    assert_eq!(
        outputs("SELECT *, upper(phone), 1 FROM customers"),
        expected
    );
    let mut expected = vec![one(&[]), one(&[]), one(&[CARD]), one(&[])];
    expected.extend(customers_star());
    expected.push(one(&[NAME]));
    assert_eq!(
        outputs(
            "SELECT o.*, c.*, lower(c.name) FROM orders o JOIN customers c ON c.id = o.customer_id"
        ),
        expected
    );
    // A view's computed columns.
    assert_eq!(
        outputs("SELECT * FROM v_masked"),
        vec![
            one(&[]),
            one(&[PHONE, EMAIL]),
            one(&[NAME]),
            one(&[EMAIL, ID_CARD])
        ]
    );
    // Unknown relations: a run of unknown length without sources.
    assert_eq!(
        outputs("SELECT *, phone FROM unknown_table u, customers c"),
        {
            let mut expected = vec![many(&[])];
            expected.extend(customers_star());
            expected.push(one(&[PHONE]));
            expected
        }
    );
    assert_eq!(outputs("SELECT u.* FROM unknown_table u"), vec![many(&[])]);
}

#[test]
fn names_are_normalised() {
    // Unquoted folds to lower case.
    assert_eq!(single("SELECT PHONE FROM CUSTOMERS"), set(&[PHONE]));
    assert_eq!(single("SELECT \"phone\" FROM \"customers\""), set(&[PHONE]));
    // Quoted keeps its case: "Customers" is another relation.
    assert_eq!(
        single("SELECT \"Phone\" FROM \"Customers\""),
        set(&[QUOTED_PHONE])
    );
    assert_eq!(single("SELECT phone FROM \"Customers\""), set(&[]));
    assert_eq!(single("SELECT \"PHONE\" FROM customers"), set(&[]));
    // Schema-qualified.
    assert_eq!(single("SELECT phone FROM public.customers"), set(&[PHONE]));
    assert_eq!(single("SELECT phone FROM other.customers"), set(&[]));
    assert_eq!(
        single("SELECT phone FROM db.public.customers"),
        set(&[PHONE])
    );
}

#[test]
fn schemas_sharing_a_name() {
    // Unqualified: either; same columns, so the expansion is exact.
    assert_eq!(
        outputs("SELECT * FROM accounts"),
        vec![one(&[]), one(&[IBAN_BILLING, IBAN_ARCHIVE]), one(&[NAME])]
    );
    assert_eq!(
        single("SELECT iban FROM accounts"),
        set(&[IBAN_BILLING, IBAN_ARCHIVE])
    );
    assert_eq!(
        single("SELECT iban FROM billing.accounts"),
        set(&[IBAN_BILLING])
    );
    assert_eq!(
        single("SELECT a.iban FROM archive.accounts a"),
        set(&[IBAN_ARCHIVE])
    );
    assert_eq!(
        single("SELECT billing.accounts.iban FROM billing.accounts"),
        set(&[IBAN_BILLING])
    );
    // Different columns: a run of unknown length.
    assert_eq!(
        outputs("SELECT * FROM leads"),
        vec![many(&[LEAD_PHONE, LEAD_MOBILE])]
    );
    assert_eq!(single("SELECT phone FROM leads"), set(&[LEAD_PHONE]));
    assert_eq!(single("SELECT mobile FROM leads"), set(&[LEAD_MOBILE]));
    assert_eq!(
        outputs("SELECT * FROM crm.leads"),
        vec![one(&[]), one(&[LEAD_MOBILE]), one(&[])]
    );
    assert_eq!(
        single("SELECT l FROM leads l"),
        set(&[LEAD_PHONE, LEAD_MOBILE])
    );
}

#[test]
fn column_aliases_rename_in_order() {
    assert_eq!(single("SELECT b FROM customers AS x(a, b)"), set(&[NAME]));
    assert_eq!(
        single("SELECT x.c FROM customers AS x(a, b, c)"),
        set(&[PHONE])
    );
    assert_eq!(
        single("SELECT p FROM (SELECT id, phone FROM customers) AS d(i, p)"),
        set(&[PHONE])
    );
}

#[test]
fn set_operations() {
    assert_eq!(
        outputs("SELECT phone, id FROM customers UNION SELECT email, id_card FROM customers"),
        vec![one(&[PHONE, EMAIL]), one(&[ID_CARD])]
    );
    assert_eq!(
        outputs("SELECT name FROM customers INTERSECT SELECT 'x' EXCEPT ALL SELECT id_card FROM customers"),
        vec![one(&[NAME, ID_CARD])]
    );
    assert_eq!(
        outputs("(SELECT phone FROM customers UNION ALL SELECT email FROM customers) UNION SELECT name FROM customers"),
        vec![one(&[NAME, PHONE, EMAIL])]
    );
    // A run of unknown length on either side: everything together.
    assert_eq!(
        outputs("SELECT * FROM unknown_table UNION SELECT phone, email FROM customers"),
        vec![many(&[PHONE, EMAIL])]
    );
    assert_eq!(
        outputs("SELECT phone FROM customers UNION SELECT * FROM leads"),
        vec![many(&[PHONE, LEAD_PHONE, LEAD_MOBILE])]
    );
    // ORDER BY a position of a set operation.
    assert_eq!(
        filters("SELECT id, phone FROM customers UNION SELECT id, email FROM customers ORDER BY 2"),
        set(&[PHONE, EMAIL])
    );
}

#[test]
fn values_lists() {
    assert_eq!(
        outputs("VALUES (1, 'a'), (2, 'b')"),
        vec![one(&[]), one(&[])]
    );
    assert_eq!(
        outputs("SELECT * FROM (VALUES ((SELECT phone FROM customers LIMIT 1), 1), ('x', 2)) AS v(a, b)"),
        vec![one(&[PHONE]), one(&[])]
    );
}

#[test]
fn subqueries() {
    // Scalar subquery.
    assert_eq!(
        single("SELECT (SELECT max(phone) FROM customers)"),
        set(&[PHONE])
    );
    // Correlated: the inner `phone` is the outer row's.
    assert_eq!(
        single("SELECT (SELECT o.total FROM orders o WHERE o.customer_id = c.id AND phone > '1') FROM customers c"),
        set(&[])
    );
    assert_eq!(
        single("SELECT (SELECT phone FROM orders o WHERE o.customer_id = c.id) FROM customers c"),
        set(&[PHONE])
    );
    // The inner scope wins when it has the column.
    assert_eq!(
        single("SELECT (SELECT card FROM orders WHERE customer_id = id LIMIT 1) FROM customers"),
        set(&[CARD])
    );
    // IN (subquery): both sides.
    assert_eq!(
        single("SELECT name IN (SELECT phone FROM customers) FROM customers"),
        set(&[NAME, PHONE])
    );
    // EXISTS: no value, but its conditions filter.
    let lineage =
        one_statement("SELECT EXISTS (SELECT 1 FROM customers WHERE email LIKE '%@x') AS e");
    assert_eq!(lineage.outputs, vec![one(&[])]);
    assert_eq!(lineage.filters, set(&[EMAIL]));
    // Derived tables.
    assert_eq!(
        outputs("SELECT d.p, d.n FROM (SELECT phone AS p, upper(name) AS n FROM customers) d"),
        vec![one(&[PHONE]), one(&[NAME])]
    );
    assert_eq!(
        outputs("SELECT * FROM (SELECT upper(phone), email || 'x' FROM customers) d"),
        vec![one(&[PHONE]), one(&[EMAIL])]
    );
    // A derived column whose name is not worked out is still found.
    assert_eq!(
        single("SELECT d.\"?column?\" FROM (SELECT email || 'x' FROM customers) d"),
        set(&[EMAIL])
    );
    assert_eq!(
        single("SELECT d.upper FROM (SELECT upper(phone) FROM customers) d"),
        set(&[PHONE])
    );
}

#[test]
fn lateral_and_table_functions() {
    assert_eq!(
        outputs("SELECT l.x FROM customers c, LATERAL (SELECT c.phone AS x) l"),
        vec![one(&[PHONE])]
    );
    assert_eq!(
        outputs("SELECT l.* FROM customers c CROSS JOIN LATERAL (SELECT upper(email), id FROM orders) l"),
        vec![one(&[EMAIL]), one(&[])]
    );
    // Table functions over protected input.
    assert_eq!(
        outputs("SELECT j.key, j.value FROM customers c, jsonb_each(to_jsonb(c)) j"),
        vec![
            one(&[NAME, PHONE, EMAIL, ID_CARD]),
            one(&[NAME, PHONE, EMAIL, ID_CARD])
        ]
    );
    assert_eq!(
        outputs("SELECT j.* FROM customers c, jsonb_each(to_jsonb(c)) j"),
        vec![many(&[NAME, PHONE, EMAIL, ID_CARD])]
    );
    assert_eq!(
        outputs("SELECT u FROM customers, unnest(array[phone]) u"),
        vec![one(&[PHONE])]
    );
    assert_eq!(
        outputs("SELECT * FROM customers c, LATERAL unnest(array[c.email, 'x']) AS u(e)"),
        {
            let mut expected = customers_star();
            expected.push(one(&[EMAIL]));
            expected
        }
    );
    assert_eq!(
        outputs(
            "SELECT x.a, x.b FROM customers c, json_to_recordset(json_agg(c)) AS x(a int, b text)"
        ),
        vec![
            one(&[NAME, PHONE, EMAIL, ID_CARD]),
            one(&[NAME, PHONE, EMAIL, ID_CARD])
        ]
    );
    assert_eq!(
        outputs("SELECT * FROM generate_series(1, 3) g"),
        vec![many(&[])]
    );
    assert_eq!(
        outputs("SELECT * FROM generate_series(1, 3) g(n)"),
        vec![one(&[])]
    );
}

#[test]
fn ctes() {
    assert_eq!(
        outputs("WITH p AS (SELECT phone, id FROM customers) SELECT p.phone, id FROM p"),
        vec![one(&[PHONE]), one(&[])]
    );
    assert_eq!(
        outputs("WITH p(a, b) AS (SELECT id, email FROM customers) SELECT * FROM p"),
        vec![one(&[]), one(&[EMAIL])]
    );
    // A CTE shadows a table of its name.
    assert_eq!(
        outputs("WITH customers AS (SELECT 1 AS phone) SELECT phone FROM customers"),
        vec![one(&[])]
    );
    // …but not a qualified name.
    assert_eq!(
        outputs("WITH customers AS (SELECT 1 AS phone) SELECT phone FROM public.customers"),
        vec![one(&[PHONE])]
    );
    // CTEs see earlier ones; subqueries see the CTEs of their query.
    assert_eq!(
        outputs("WITH a AS (SELECT email FROM customers), b AS (SELECT upper(email) AS e FROM a) SELECT (SELECT e FROM b)"),
        vec![one(&[EMAIL])]
    );
    // Filters inside a CTE count.
    assert_eq!(
        filters("WITH a AS (SELECT id FROM customers WHERE phone = '1') SELECT * FROM a"),
        set(&[PHONE])
    );
}

#[test]
fn recursive_ctes() {
    // A source reached only through the recursive branch propagates.
    let sql = "WITH RECURSIVE t(n, v) AS (
                   SELECT 1, 'x'
                   UNION ALL
                   SELECT n + 1, (SELECT phone FROM customers LIMIT 1) FROM t WHERE n < 3
               ) SELECT v FROM t";
    assert_eq!(single(sql), set(&[PHONE]));
    // It moves from column to column round after round.
    let sql = "WITH RECURSIVE t(a, b, c) AS (
                   SELECT email, 'x', 'y' FROM customers
                   UNION
                   SELECT 'z', a, b FROM t
               ) SELECT c FROM t";
    assert_eq!(single(sql), set(&[EMAIL]));
    let sql = "WITH RECURSIVE t AS (
                   SELECT id, name FROM customers
                   UNION ALL
                   SELECT t.id + 1, t.name || c.phone FROM t JOIN customers c ON c.id = t.id
               ) SELECT * FROM t";
    assert_eq!(outputs(sql), vec![one(&[]), one(&[NAME, PHONE])]);
    // Later CTEs may be referred to in WITH RECURSIVE.
    let sql = "WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT id_card FROM customers) SELECT * FROM a";
    let sources: Sources = outputs(sql)
        .into_iter()
        .flat_map(|o| match o {
            OutputColumn::One(s) | OutputColumn::Many(s) => s,
        })
        .collect();
    assert_eq!(sources, set(&[ID_CARD]));
}

#[test]
fn joins() {
    let lineage =
        one_statement("SELECT o.total FROM orders o JOIN customers c ON c.phone = o.card");
    assert_eq!(lineage.outputs, vec![one(&[])]);
    assert_eq!(lineage.filters, set(&[PHONE, CARD]));
    // USING merges the column and moves it first.
    let sql = "SELECT * FROM customers JOIN v_masked USING (name)";
    let lineage = one_statement(sql);
    assert_eq!(lineage.filters, set(&[NAME]));
    assert_eq!(
        lineage.outputs,
        vec![
            one(&[NAME]),
            one(&[]),
            one(&[PHONE]),
            one(&[EMAIL]),
            one(&[ID_CARD]),
            one(&[PHONE]),
            one(&[]),
            one(&[]),
            one(&[PHONE, EMAIL]),
            one(&[EMAIL, ID_CARD]),
        ]
    );
    // NATURAL: the common columns (id, name) are compared and merged.
    let lineage = one_statement("SELECT * FROM customers NATURAL JOIN v_masked");
    assert_eq!(lineage.filters, set(&[NAME]));
    assert_eq!(lineage.outputs.len(), 9);
    assert_eq!(lineage.outputs[1], one(&[NAME]));
    // Unknown columns on a side: all of them may be common.
    let lineage = one_statement("SELECT 1 FROM customers NATURAL JOIN unknown_table");
    assert_eq!(lineage.filters, set(&[NAME, PHONE, EMAIL, ID_CARD]));
    // Parenthesised joins with an alias.
    assert_eq!(
        single("SELECT j.card FROM (orders o JOIN customers c ON o.customer_id = c.id) AS j"),
        set(&[CARD])
    );
}

// ---- filters -----------------------------------------------------------------

#[test]
fn filters_everywhere() {
    for (sql, expected) in [
        ("SELECT id FROM customers WHERE phone = '1'", set(&[PHONE])),
        ("SELECT id FROM customers WHERE phone IS NULL", set(&[])),
        ("SELECT id FROM customers WHERE phone IS NOT NULL AND NOT (email IS NULL)", set(&[])),
        ("SELECT id FROM customers WHERE phone IS NULL OR email > 'a'", set(&[EMAIL])),
        ("SELECT id FROM customers WHERE upper(phone) IS NULL", set(&[])),
        ("SELECT id FROM customers WHERE (phone LIKE '1%') IS NULL", set(&[])),
        ("SELECT count(*) FROM customers GROUP BY email HAVING max(phone) > '1'", set(&[PHONE, EMAIL])),
        ("SELECT id FROM customers ORDER BY phone", set(&[PHONE])),
        ("SELECT id, phone FROM customers ORDER BY 2", set(&[PHONE])),
        ("SELECT id, phone AS p FROM customers ORDER BY p DESC", set(&[PHONE])),
        ("SELECT id, upper(email) FROM customers ORDER BY upper", set(&[EMAIL])),
        ("SELECT email, count(*) FROM customers GROUP BY 1", set(&[EMAIL])),
        ("SELECT email AS e, count(*) FROM customers GROUP BY e", set(&[EMAIL])),
        ("SELECT count(*) FROM customers GROUP BY ROLLUP (name, (phone))", set(&[NAME, PHONE])),
        ("SELECT count(*) FROM customers GROUP BY GROUPING SETS ((email), ())", set(&[EMAIL])),
        ("SELECT count(*) FROM customers GROUP BY CUBE (id_card)", set(&[ID_CARD])),
        ("SELECT DISTINCT ON (email) id FROM customers", set(&[EMAIL])),
        ("SELECT DISTINCT id, upper(name) FROM customers", set(&[NAME])),
        ("SELECT DISTINCT id FROM customers", set(&[])),
        ("SELECT id FROM customers WHERE id IN (SELECT customer_id FROM orders WHERE card = '4')", set(&[CARD])),
        ("SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.card = c.phone)", set(&[PHONE, CARD])),
        ("SELECT id FROM customers WHERE id_card IN (SELECT card FROM orders)", set(&[ID_CARD, CARD])),
        ("SELECT id FROM customers LIMIT (SELECT count(DISTINCT phone) FROM customers)", set(&[PHONE])),
        ("SELECT id FROM customers OFFSET (SELECT length(max(email)) FROM customers)", set(&[EMAIL])),
        ("SELECT id FROM customers WHERE CASE WHEN phone > '1' THEN true END", set(&[PHONE])),
        ("SELECT id FROM customers WHERE NOT phone ILIKE 'x%'", set(&[PHONE])),
        ("SELECT id FROM customers WHERE phone SIMILAR TO '1%'", set(&[PHONE])),
        ("SELECT id FROM customers WHERE $1 = $2", set(&[])),
    ] {
        assert_eq!(filters(sql), expected, "{sql}");
    }
}

#[test]
fn filters_in_dml() {
    assert_eq!(
        filters("UPDATE customers SET note = 'x' WHERE phone = $1"),
        set(&[PHONE])
    );
    assert_eq!(
        filters("DELETE FROM customers WHERE email LIKE '%x'"),
        set(&[EMAIL])
    );
    assert_eq!(
        filters(
            "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id AND c.id_card = 'x'"
        ),
        set(&[ID_CARD])
    );
    assert_eq!(
        filters("INSERT INTO orders (id, card) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET total = 1 WHERE orders.card = 'y'"),
        set(&[CARD])
    );
    assert_eq!(
        filters("INSERT INTO orders (id) SELECT id FROM customers WHERE phone = '1'"),
        set(&[PHONE])
    );
}

// ---- stored ------------------------------------------------------------------

#[test]
fn stores() {
    for (sql, expected) in [
        ("CREATE TABLE copy AS SELECT id, phone FROM customers", set(&[PHONE])),
        ("CREATE TABLE copy AS SELECT * FROM customers", set(&[NAME, PHONE, EMAIL, ID_CARD])),
        ("CREATE TEMP TABLE copy AS SELECT * FROM leads", set(&[LEAD_PHONE, LEAD_MOBILE])),
        ("SELECT id, upper(email) INTO copy FROM customers", set(&[EMAIL])),
        ("CREATE MATERIALIZED VIEW mv AS SELECT name FROM customers", set(&[NAME])),
        ("CREATE VIEW v AS SELECT name FROM customers WHERE phone = '1'", set(&[])),
        ("INSERT INTO log (v) SELECT phone FROM customers", set(&[PHONE])),
        ("INSERT INTO log SELECT * FROM customers", set(&[NAME, PHONE, EMAIL, ID_CARD])),
        ("INSERT INTO log SELECT * FROM unknown_table", set(&[])),
        ("INSERT INTO log VALUES ((SELECT email FROM customers LIMIT 1))", set(&[EMAIL])),
        // Into the same column of the same protected table: not a leak.
        ("INSERT INTO customers (phone) SELECT phone FROM customers", set(&[])),
        ("INSERT INTO customers (name, phone) SELECT phone, phone FROM customers", set(&[PHONE])),
        // Without a column list: the relation's columns in order.
        ("INSERT INTO customers SELECT * FROM customers", set(&[])),
        ("INSERT INTO orders SELECT id, id, phone FROM customers", set(&[PHONE])),
        ("INSERT INTO customers (id, name) VALUES (1, 'x'), (2, $1)", set(&[])),
        ("UPDATE customers SET name = phone", set(&[PHONE])),
        ("UPDATE customers SET phone = phone, note = 'x'", set(&[])),
        ("UPDATE customers SET note = upper(email) WHERE id = 1", set(&[EMAIL])),
        ("UPDATE orders o SET total = length(c.phone) FROM customers c WHERE c.id = o.customer_id", set(&[PHONE])),
        ("UPDATE customers SET (note, phone) = (email, phone)", set(&[EMAIL])),
        ("UPDATE customers SET (note, name) = (SELECT card, 'x' FROM orders LIMIT 1)", set(&[CARD])),
        ("UPDATE unknown_table SET a = (SELECT phone FROM customers LIMIT 1)", set(&[PHONE])),
        (
            "INSERT INTO orders (id, card) SELECT id, id_card FROM customers ON CONFLICT (id) DO UPDATE SET total = length(EXCLUDED.card)",
            set(&[ID_CARD]),
        ),
        (
            "INSERT INTO orders (id, total) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET card = EXCLUDED.card",
            set(&[]),
        ),
        // The INSERT writes phone into phone; the update moves it into note.
        (
            "INSERT INTO customers (id, phone) SELECT id, phone FROM customers ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.phone",
            set(&[PHONE]),
        ),
        (
            "INSERT INTO customers (id, phone) SELECT id, phone FROM customers ON CONFLICT (id) DO UPDATE SET phone = EXCLUDED.phone",
            set(&[]),
        ),
        (
            "INSERT INTO customers AS c (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET note = c.email",
            set(&[EMAIL]),
        ),
        ("COPY customers TO '/tmp/x'", set(&[NAME, PHONE, EMAIL, ID_CARD])),
        ("COPY customers (id, email) TO PROGRAM 'cat'", set(&[EMAIL])),
        ("COPY (SELECT upper(phone) FROM customers) TO '/tmp/x' WITH (FORMAT csv)", set(&[PHONE])),
        ("COPY customers FROM '/tmp/x'", set(&[])),
        ("SELECT phone FROM customers", set(&[])),
    ] {
        assert_eq!(stored(sql), expected, "{sql}");
    }
}

#[test]
fn data_modifying_ctes() {
    let lineage = one_statement(
        "WITH moved AS (DELETE FROM customers WHERE id < 10 RETURNING id, phone)
         INSERT INTO archive_customers SELECT * FROM moved",
    );
    assert_eq!(lineage.stored, set(&[PHONE]));
    let lineage = one_statement(
        "WITH u AS (UPDATE customers SET note = email RETURNING name) SELECT * FROM u",
    );
    assert_eq!(lineage.outputs, vec![one(&[NAME])]);
    assert_eq!(lineage.stored, set(&[EMAIL]));
}

#[test]
fn returning_lists() {
    assert_eq!(
        outputs("INSERT INTO customers (id, name) VALUES (1, 'x') RETURNING id, upper(phone)"),
        vec![one(&[]), one(&[PHONE])]
    );
    assert_eq!(
        outputs("UPDATE customers SET note = 'x' RETURNING *"),
        customers_star()
    );
    assert_eq!(
        outputs("UPDATE orders o SET total = 1 FROM customers c WHERE c.id = o.customer_id RETURNING c.email, o.card"),
        vec![one(&[EMAIL]), one(&[CARD])]
    );
    assert_eq!(
        outputs(
            "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id RETURNING c.id_card"
        ),
        vec![one(&[ID_CARD])]
    );
    assert_eq!(
        outputs("DELETE FROM customers AS x RETURNING x"),
        vec![one(&[NAME, PHONE, EMAIL, ID_CARD])]
    );
    assert_eq!(outputs("DELETE FROM customers"), vec![]);
}

// ---- COPY … TO STDOUT ----------------------------------------------------------

fn copy_out(sql: &str) -> CopyOut {
    let lineage = one_statement(sql);
    assert_eq!(lineage.kind, StatementKind::Plain, "{sql}");
    lineage.copy_out.unwrap_or_else(|| panic!("{sql}"))
}

#[test]
fn copy_to_stdout_columns() {
    // Generated columns are left out.
    let copy = copy_out("COPY customers TO STDOUT");
    assert_eq!(copy.format, Ok(CopyOutFormat::Rows(CopyFormat::text())));
    assert_eq!(
        copy.columns,
        vec![
            one(&[]),
            one(&[NAME]),
            one(&[PHONE]),
            one(&[EMAIL]),
            one(&[ID_CARD]),
            one(&[])
        ]
    );
    assert_eq!(
        copy_out("COPY customers (phone) TO STDOUT").columns,
        vec![one(&[PHONE])]
    );
    assert_eq!(
        copy_out("COPY public.customers (note, \"email\", nope) TO STDOUT").columns,
        vec![one(&[]), one(&[EMAIL]), one(&[])]
    );
    assert_eq!(
        copy_out("COPY unknown_table TO STDOUT").columns,
        vec![many(&[])]
    );
    assert_eq!(
        copy_out("COPY leads TO STDOUT").columns,
        vec![many(&[LEAD_PHONE, LEAD_MOBILE])]
    );
    let copy =
        copy_out("COPY (SELECT upper(phone) FROM customers) TO STDOUT WITH (FORMAT csv, HEADER)");
    assert_eq!(copy.columns, vec![one(&[PHONE])]);
    assert_eq!(
        copy.format,
        Ok(CopyOutFormat::Rows(CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'"',
            null: Vec::new(),
            header: true,
        }))
    );
    assert_eq!(copy.copies, vec![None]);
    // Which columns are plain copies of a protected column (they get its own mask).
    for (sql, expected) in [
        (
            "COPY customers (id, phone, email) TO STDOUT",
            vec![None, Some(PHONE), Some(EMAIL)],
        ),
        (
            "COPY (SELECT c.id, c.phone AS p, name, phone || '' FROM customers c WHERE id > 1) TO STDOUT",
            vec![None, Some(PHONE), Some(NAME), None],
        ),
        // Through a view, or a table whose name two schemas share: not known.
        ("COPY (SELECT contact FROM v_masked) TO STDOUT", vec![None]),
        ("COPY (SELECT iban FROM accounts) TO STDOUT", vec![None]),
        // Through a derived table or CTE by name: not followed.
        (
            "COPY (SELECT d.phone FROM (SELECT phone FROM customers) d) TO STDOUT",
            vec![None],
        ),
        (
            "COPY (WITH t AS (SELECT upper(phone) AS phone FROM customers) SELECT phone FROM t) TO STDOUT",
            vec![None],
        ),
        // A name another entry of the FROM list could also hold.
        (
            "COPY (SELECT phone FROM customers, unknown_table) TO STDOUT",
            vec![None],
        ),
        (
            "COPY (SELECT phone FROM customers UNION SELECT 'x') TO STDOUT",
            vec![None],
        ),
    ] {
        assert_eq!(copy_out(sql).copies, expected, "{sql}");
    }
    // COPY … TO STDOUT stores nothing.
    assert_eq!(stored("COPY customers TO STDOUT"), set(&[]));
    // COPY … FROM: not this module's business.
    let lineage = one_statement("COPY customers FROM STDIN");
    assert_eq!(lineage, bare(StatementKind::Plain));
}

#[test]
fn copy_to_stdout_formats() {
    for sql in [
        "COPY customers TO STDOUT (FORMAT binary)",
        "COPY customers TO STDOUT WITH (FORMAT BINARY)",
        "COPY customers TO STDOUT BINARY",
    ] {
        assert_eq!(copy_out(sql).format, Ok(CopyOutFormat::Binary), "{sql}");
    }
    assert_eq!(
        copy_out("COPY customers TO STDOUT (FORMAT csv, FORCE_QUOTE (phone))").format,
        Ok(CopyOutFormat::Rows(CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'"',
            null: Vec::new(),
            header: false,
        }))
    );
    assert_eq!(
        copy_out("COPY customers TO STDOUT (DELIMITER '|', NULL 'nil')").format,
        Ok(CopyOutFormat::Rows(CopyFormat::Text {
            delimiter: b'|',
            null: b"nil".to_vec(),
            header: false,
        }))
    );
    assert_eq!(
        copy_out("COPY customers TO STDOUT (ENCODING 'UTF8')").format,
        Ok(CopyOutFormat::Rows(CopyFormat::text()))
    );
    for sql in [
        "COPY customers TO STDOUT (ENCODING 'SJIS')",
        "COPY customers TO STDOUT (FORMAT binary, HEADER)",
        "COPY customers TO STDOUT (FORMAT binary, DELIMITER ',')",
        "COPY customers TO STDOUT (FORCE_QUOTE (phone))",
        "COPY customers TO STDOUT (FORMAT csv, FORCE_NOT_NULL (phone))",
        "COPY customers TO STDOUT (FORMAT json)",
    ] {
        assert!(copy_out(sql).format.is_err(), "{sql}");
    }
}

#[test]
fn copy_from_format_is_unchanged() {
    // COPY … FROM still refuses what it always refused.
    for (options, legacy, reason) in [
        (
            "COPY t FROM STDIN (FORMAT binary)",
            false,
            "a binary or unknown FORMAT",
        ),
        ("COPY t FROM STDIN BINARY", true, "FORMAT binary"),
        (
            "COPY t FROM STDIN (FORMAT csv, FORCE_QUOTE (a))",
            false,
            "FORCE options",
        ),
    ] {
        let statements = super::super::parse(options).unwrap();
        let Statement::Copy {
            options,
            legacy_options,
            ..
        } = &statements[0]
        else {
            panic!()
        };
        let _ = legacy;
        assert_eq!(
            copy_data_format(options, legacy_options, CopyDirection::From),
            Err(reason)
        );
    }
}

// ---- statement kinds ---------------------------------------------------------

#[test]
fn cursors() {
    let lineage = one_statement(
        "DECLARE \"Cur\" CURSOR WITH HOLD FOR SELECT phone FROM customers WHERE email = 'x'",
    );
    assert_eq!(
        lineage.kind,
        StatementKind::Declare {
            cursor: "Cur".into()
        }
    );
    assert_eq!(lineage.outputs, vec![one(&[PHONE])]);
    assert_eq!(lineage.filters, set(&[EMAIL]));
    for (sql, cursor) in [
        ("FETCH NEXT FROM cur", "cur"),
        ("FETCH 10 FROM Cur", "cur"),
        ("FETCH ALL IN \"Cur\"", "Cur"),
        ("FETCH cur", "cur"),
        ("FETCH FORWARD 5 cur", "cur"),
        ("MOVE NEXT FROM cur", "cur"),
        ("MOVE cur", "cur"),
        ("move absolute 3 in \"Cur\"", "Cur"),
    ] {
        assert_eq!(
            one_statement(sql).kind,
            StatementKind::Fetch {
                cursor: cursor.into()
            },
            "{sql}"
        );
    }
    assert_eq!(
        one_statement("CLOSE cur").kind,
        StatementKind::Close {
            cursor: Some("cur".into())
        }
    );
    assert_eq!(
        one_statement("CLOSE ALL").kind,
        StatementKind::Close { cursor: None }
    );
    // MOVE next to other statements.
    let all = analyse_all("MOVE cur; SELECT phone FROM customers");
    assert_eq!(
        all[0].kind,
        StatementKind::Fetch {
            cursor: "cur".into()
        }
    );
    assert_eq!(all[1].outputs, vec![one(&[PHONE])]);
}

#[test]
fn prepared_statements() {
    let lineage =
        one_statement("PREPARE p (int) AS SELECT upper(phone) FROM customers WHERE email = $1");
    let StatementKind::Prepare { name, statement } = &lineage.kind else {
        panic!("{lineage:?}")
    };
    assert_eq!(name, "p");
    assert_eq!(statement.outputs, vec![one(&[PHONE])]);
    assert_eq!(statement.filters, set(&[EMAIL]));
    assert!(lineage.outputs.is_empty());
    assert_eq!(lineage.filters, set(&[EMAIL]));
    let lineage = one_statement("PREPARE q AS INSERT INTO log SELECT name FROM customers");
    assert_eq!(lineage.stored, set(&[NAME]));
    assert_eq!(
        one_statement("EXECUTE P (1, 'x')").kind,
        StatementKind::Execute { name: "p".into() }
    );
    // A protected value passed to a prepared statement is not followed.
    assert_eq!(
        one_statement("EXECUTE p ((SELECT phone FROM customers LIMIT 1))").kind,
        StatementKind::Unsupported {
            relation: "public.customers".into()
        }
    );
    assert_eq!(
        one_statement("DEALLOCATE p").kind,
        StatementKind::Deallocate {
            name: Some("p".into())
        }
    );
    assert_eq!(
        one_statement("DEALLOCATE PREPARE \"P\"").kind,
        StatementKind::Deallocate {
            name: Some("P".into())
        }
    );
    assert_eq!(
        one_statement("DEALLOCATE ALL").kind,
        StatementKind::Deallocate { name: None }
    );
}

#[test]
fn explain() {
    let lineage = one_statement("EXPLAIN SELECT phone FROM customers WHERE email = 'x'");
    assert_eq!(lineage.kind, StatementKind::Plain);
    assert_eq!(lineage.outputs, vec![one(&[])]);
    assert_eq!(lineage.filters, set(&[EMAIL]));
    assert_eq!(
        stored("EXPLAIN CREATE TABLE t AS SELECT phone FROM customers"),
        set(&[])
    );
    for sql in [
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT phone FROM customers",
        "EXPLAIN (ANALYZE, BUFFERS) CREATE TABLE t AS SELECT phone FROM customers",
        "EXPLAIN (ANALYZE true) INSERT INTO t SELECT phone FROM customers",
    ] {
        assert_eq!(stored(sql), set(&[PHONE]), "{sql}");
    }
    assert_eq!(
        stored("EXPLAIN (ANALYZE false) INSERT INTO t SELECT phone FROM customers"),
        set(&[])
    );
}

#[test]
fn plain_statements() {
    for sql in [
        "SET search_path = public",
        "SHOW search_path",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT s",
        "RELEASE SAVEPOINT s",
        "LISTEN ch",
        "NOTIFY ch, 'x'",
        "UNLISTEN *",
        "DISCARD ALL",
        "LOCK TABLE customers",
        "ANALYZE customers",
        "VACUUM customers",
        "TRUNCATE customers",
        "GRANT SELECT ON customers TO bob",
        "REVOKE SELECT ON customers FROM bob",
        "COMMENT ON TABLE customers IS 'x'",
        "DROP TABLE customers",
        "ALTER TABLE customers ADD COLUMN x int",
        "CREATE INDEX i ON customers (phone)",
        "CREATE TABLE t (a int)",
    ] {
        assert_eq!(one_statement(sql), bare(StatementKind::Plain), "{sql}");
    }
}

#[test]
fn unsupported_statements() {
    assert_eq!(
        one_statement("MERGE INTO log l USING customers c ON l.id = c.id WHEN NOT MATCHED THEN INSERT VALUES (c.phone)").kind,
        StatementKind::Unsupported {
            relation: "public.customers".into()
        }
    );
    assert_eq!(
        one_statement("MERGE INTO a USING b ON a.id = b.id WHEN MATCHED THEN DELETE").kind,
        StatementKind::Plain
    );
    assert_eq!(
        one_statement("CALL f((SELECT phone FROM unknown_table))").kind,
        StatementKind::Plain
    );
    assert_eq!(
        one_statement("CALL f((SELECT iban FROM billing.accounts))").kind,
        StatementKind::Unsupported {
            relation: "billing.accounts".into()
        }
    );
    assert_eq!(one_statement("CALL f(1)").kind, StatementKind::Plain);
    assert_eq!(
        one_statement(
            "EXPLAIN ANALYZE MERGE INTO orders o USING t ON o.id = t.id WHEN MATCHED THEN DELETE"
        )
        .kind,
        StatementKind::Unsupported {
            relation: "public.orders".into()
        }
    );
}

#[test]
fn multiple_statements_comments_and_errors() {
    let all =
        analyse_all("SELECT phone FROM customers; UPDATE customers SET name = email; SELECT 1");
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].outputs, vec![one(&[PHONE])]);
    assert_eq!(all[1].stored, set(&[EMAIL]));
    assert_eq!(all[2].outputs, vec![one(&[])]);
    assert_eq!(
        single("SELECT/**/upper(phone)--x\nFROM customers"),
        set(&[PHONE])
    );
    assert_eq!(
        single("\n\tSELECT\n  upper( \"phone\" )\r\n  FROM /* c */ customers ;  "),
        set(&[PHONE])
    );
    let relations = relations();
    let knowledge = Knowledge {
        relations: &relations,
    };
    assert!(analyse("SELEC phone FROM customers", &knowledge).is_err());
    assert!(analyse("MOVE cur; SELEC phone FROM customers", &knowledge).is_err());
    // What does not parse but names no protected relation passes, one statement at a
    // time.
    let kinds: Vec<StatementKind> = analyse("MOVE cur; CLUSTER plain_log", &knowledge)
        .unwrap()
        .into_iter()
        .map(|statement| statement.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            StatementKind::Fetch {
                cursor: "cur".into()
            },
            StatementKind::Plain
        ]
    );
    assert_eq!(analyse("", &knowledge), Ok(vec![]));
}

// ---- field_sources -------------------------------------------------------------

#[test]
fn field_sources_without_runs() {
    let outputs = vec![one(&[PHONE]), one(&[])];
    assert_eq!(
        field_sources(&outputs, 2),
        FieldSources::Exact(vec![set(&[PHONE]), set(&[])])
    );
    assert_eq!(field_sources(&outputs, 3), FieldSources::Any(set(&[PHONE])));
    assert_eq!(field_sources(&outputs, 1), FieldSources::Any(set(&[PHONE])));
    assert_eq!(field_sources(&[], 0), FieldSources::Exact(vec![]));
}

#[test]
fn field_sources_with_one_run() {
    let outputs = vec![one(&[PHONE]), many(&[EMAIL]), one(&[NAME])];
    assert_eq!(
        field_sources(&outputs, 4),
        FieldSources::Exact(vec![
            set(&[PHONE]),
            set(&[EMAIL]),
            set(&[EMAIL]),
            set(&[NAME])
        ])
    );
    // The run may be empty.
    assert_eq!(
        field_sources(&outputs, 2),
        FieldSources::Exact(vec![set(&[PHONE]), set(&[NAME])])
    );
    assert_eq!(
        field_sources(&outputs, 1),
        FieldSources::Any(set(&[NAME, PHONE, EMAIL]))
    );
    assert_eq!(
        field_sources(&[one(&[PHONE]), many(&[])], 1),
        FieldSources::Exact(vec![set(&[PHONE])])
    );
    assert_eq!(
        field_sources(&[many(&[ID_CARD])], 3),
        FieldSources::Exact(vec![set(&[ID_CARD]); 3])
    );
}

#[test]
fn field_sources_with_several_runs() {
    assert_eq!(
        field_sources(&[many(&[PHONE]), one(&[]), many(&[])], 5),
        FieldSources::Any(set(&[PHONE]))
    );
    let unprotected = field_sources(&[many(&[]), one(&[]), many(&[])], 4);
    assert!(
        unprotected == FieldSources::Exact(vec![Sources::new(); 4])
            || unprotected == FieldSources::Any(Sources::new())
    );
}

#[test]
fn field_sources_from_analysis() {
    let lineage = one_statement("SELECT *, upper(phone) FROM unknown_table, customers");
    let mut expected = vec![set(&[]), set(&[])];
    expected.extend(CUSTOMERS_STAR.iter().map(|ids| set(ids)));
    expected.push(set(&[PHONE]));
    assert_eq!(
        field_sources(&lineage.outputs, 10),
        FieldSources::Exact(expected)
    );
}

#[test]
fn nested_recursive_ctes_are_cut_short_safely() {
    // Each level nests another WITH RECURSIVE in its recursive branch; without a
    // budget the rounds would multiply level by level (3^6 > the budget here; deeper
    // nesting overflows the parser's stack in debug builds first).
    let mut inner = String::from("SELECT phone AS v FROM customers");
    for level in 0..6 {
        inner = format!(
            "WITH RECURSIVE r{level}(v) AS (SELECT 'x' UNION SELECT x.v FROM r{level}, ({inner}) x) SELECT v FROM r{level}"
        );
    }
    let started = std::time::Instant::now();
    // Cut short: everything the relations named could give, never less.
    assert_eq!(single(&inner), set(&[NAME, PHONE, EMAIL, ID_CARD]));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // Filters deep inside still count.
    let sql = inner.replace("FROM customers", "FROM customers WHERE email > 'a'");
    assert_eq!(filters(&sql), set(&[EMAIL]));
}

#[test]
fn deep_nesting_stays_within_the_stack() {
    // As deep as sqlparser itself parses on a test thread's stack in a debug build
    // (one more level and the parser overflows first).
    let mut expr = String::from("phone");
    for _ in 0..16 {
        expr = format!("upper(({expr}))");
    }
    assert_eq!(
        single(&format!("SELECT {expr} FROM customers")),
        set(&[PHONE])
    );
    let mut query = String::from("SELECT email FROM customers");
    for _ in 0..6 {
        query = format!("SELECT (SELECT * FROM ({query}) d) AS email");
    }
    assert_eq!(single(&query), set(&[EMAIL]));
}
