use super::*;

const POLICY: &str = r#"
version: 1
levels:
  L3: { default: mask }
roles:
  billing: { members: [billing_svc] }
tables:
  public.customers:
    columns:
      id_card: { level: L3, encrypt: deterministic, mask: full }
      phone: { level: L3, encrypt: randomized, mask: full }
      balance: { level: L3, encrypt: deterministic, type: numeric, mask: full }
  public.orders:
    columns:
      id_card: { level: L3, encrypt: deterministic, mask: full }
"#;

struct Fixture {
    policy: Policy,
    relations: HashMap<String, Vec<Arc<EncryptedRelation>>>,
}

fn column(name: &str, content: Content) -> RelationColumn {
    RelationColumn {
        name: name.into(),
        content,
        has_default: false,
        generated: false,
    }
}

fn fixture() -> Fixture {
    let policy = Policy::parse(POLICY, "policy.yaml").unwrap();
    let id = |table: &str, name: &str| {
        policy
            .columns
            .iter()
            .position(|c| c.name == name && policy.tables[c.table].name == table)
            .unwrap()
    };
    let customers = EncryptedRelation {
        schema: "public".into(),
        name: "customers".into(),
        is_view: false,
        columns: vec![
            column("id", Content::Plain),
            column("name", Content::Plain),
            column("id_card", Content::Encrypted(id("customers", "id_card"))),
            column("phone", Content::Encrypted(id("customers", "phone"))),
            column("balance", Content::Encrypted(id("customers", "balance"))),
            RelationColumn {
                name: "created".into(),
                content: Content::Plain,
                has_default: true,
                generated: false,
            },
            RelationColumn {
                name: "label".into(),
                content: Content::Plain,
                has_default: true,
                generated: true,
            },
        ],
    };
    let orders = EncryptedRelation {
        schema: "public".into(),
        name: "orders".into(),
        is_view: false,
        columns: vec![
            column("id", Content::Plain),
            column("id_card", Content::Encrypted(id("orders", "id_card"))),
        ],
    };
    let view = EncryptedRelation {
        schema: "public".into(),
        name: "customer_view".into(),
        is_view: true,
        columns: vec![
            column("id_card", Content::Encrypted(id("customers", "id_card"))),
            column(
                "shout",
                Content::ComputedFromEncrypted(id("customers", "phone")),
            ),
        ],
    };
    let mut relations = HashMap::new();
    for relation in [customers, orders, view] {
        relations
            .entry(relation.name.clone())
            .or_insert_with(Vec::new)
            .push(Arc::new(relation));
    }
    Fixture { policy, relations }
}

fn run(sql: &str, single_key: bool) -> Checked<Analysis> {
    let fixture = fixture();
    let knowledge = Knowledge {
        policy: &fixture.policy,
        relations: &fixture.relations,
        single_key,
    };
    analyse(sql, &knowledge)
}

fn ok(sql: &str) -> Analysis {
    match run(sql, true) {
        Ok(analysis) => analysis,
        Err(refusal) => panic!("{sql}: refused: {}", refusal.message),
    }
}

fn refused(sql: &str) -> Box<Refusal> {
    match run(sql, true) {
        Ok(analysis) => panic!("{sql}: passed: {analysis:?}"),
        Err(refusal) => refusal,
    }
}

/// The texts the edits replace.
fn edited<'a>(sql: &'a str, analysis: &Analysis) -> Vec<&'a str> {
    let mut texts: Vec<(usize, &str)> = analysis
        .edits
        .iter()
        .map(|edit| match edit {
            Edit::Write { range, .. }
            | Edit::ListItem { range, .. }
            | Edit::Comparison { range, .. } => (range.start, &sql[range.clone()]),
        })
        .collect();
    texts.sort();
    texts.into_iter().map(|(_, t)| t).collect()
}

#[test]
fn insert_values_mark_literals_and_parameters_of_encrypted_columns() {
    let sql = "INSERT INTO customers (id, name, id_card, phone) VALUES (1, 'Zhang', '110105', $1), (2, 'Li', E'1\\'2', NULL) RETURNING id, phone";
    let analysis = ok(sql);
    assert_eq!(edited(sql, &analysis), ["'110105'", "E'1\\'2'"]);
    let values: Vec<&str> = analysis
        .edits
        .iter()
        .filter_map(|e| match e {
            Edit::Write { value, .. } => Some(value.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["110105", "1'2"]);
    assert_eq!(analysis.params.len(), 1);
    assert_eq!(analysis.params[0].index, 1);
    assert!(!analysis.params[0].lookup);
    assert_eq!(analysis.highest_param, 1);
}

#[test]
fn insert_without_a_column_list_follows_the_table_order() {
    let sql = "INSERT INTO public.customers VALUES (1, 'n', '1', '2', -3.5, DEFAULT)";
    let analysis = ok(sql);
    assert_eq!(edited(sql, &analysis), ["'1'", "'2'", "-3.5"]);
}

#[test]
fn writes_that_are_not_values_are_refused() {
    for sql in [
        "INSERT INTO customers (id_card) SELECT id_card FROM orders",
        "INSERT INTO customers (id_card) VALUES (upper('x'))",
        "INSERT INTO customers (phone) VALUES ('1' || '2')",
        "UPDATE customers SET phone = phone || '1'",
        "UPDATE customers c SET id_card = o.id_card FROM orders o WHERE o.id = c.id",
        "INSERT INTO customer_view (id_card) VALUES ('1')",
        "PREPARE p AS INSERT INTO customers (phone) VALUES ($1)",
        "COPY customers FROM '/tmp/x'",
    ] {
        let refusal = refused(sql);
        assert_eq!(refusal.sqlstate(), "42501", "{sql}");
        assert!(!refusal.message.contains("'"), "{sql}: {}", refusal.message);
    }
}

#[test]
fn update_set_and_on_conflict() {
    let sql = "UPDATE customers SET phone = '138', name = 'x', balance = $2 WHERE id = $1 RETURNING phone";
    let analysis = ok(sql);
    assert_eq!(edited(sql, &analysis), ["'138'"]);
    assert_eq!(analysis.params.len(), 1);
    let sql = "INSERT INTO customers AS c (id, phone) VALUES (1, '5') ON CONFLICT (id) DO UPDATE SET phone = EXCLUDED.phone, id_card = '7' WHERE c.id_card = '9'";
    let analysis = ok(sql);
    assert_eq!(edited(sql, &analysis), ["'5'", "'7'", "'9'"]);
}

#[test]
fn deterministic_equality_is_rewritten_and_randomized_refused() {
    let sql = "SELECT id FROM customers WHERE id_card = '110' AND name = 'x' OR '3' = id_card";
    let analysis = ok(sql);
    assert_eq!(edited(sql, &analysis), ["'110'", "'3'"]);
    assert!(analysis
        .edits
        .iter()
        .all(|e| matches!(e, Edit::ListItem { .. })));
    let sql = "DELETE FROM customers WHERE id_card IN ('1', $1, NULL)";
    let analysis = ok(sql);
    assert_eq!(edited(sql, &analysis), ["'1'"]);
    assert!(analysis.params[0].lookup);
    for sql in [
        "SELECT * FROM customers WHERE phone = '1'",
        "SELECT * FROM customers WHERE phone IN ('1')",
        "UPDATE customers SET name = 'x' WHERE phone = $1",
    ] {
        let refusal = refused(sql);
        assert_eq!(refusal.sqlstate(), "0A000", "{sql}");
        assert!(refusal.hint.contains("deterministic"), "{sql}");
    }
}

#[test]
fn several_keys_turn_equality_into_in_lists() {
    let sql = "SELECT id FROM customers WHERE id_card = $1 OR id_card <> 'x'";
    let analysis = run(sql, false).unwrap();
    let comparisons: Vec<(&str, &str, bool)> = analysis
        .edits
        .iter()
        .filter_map(|e| match e {
            Edit::Comparison {
                range,
                column_text,
                negated,
                ..
            } => Some((&sql[range.clone()], &sql[column_text.clone()], *negated)),
            _ => None,
        })
        .collect();
    assert_eq!(
        comparisons,
        [
            ("id_card = $1", "id_card", false),
            ("id_card <> 'x'", "id_card", true)
        ]
    );
    // Grouping and joins compare ciphertexts, which differ between keys.
    assert!(run(
        "SELECT id_card, count(*) FROM customers GROUP BY id_card",
        false
    )
    .is_err());
    assert!(run(
        "SELECT id_card, count(*) FROM customers GROUP BY id_card",
        true
    )
    .is_ok());
}

#[test]
fn operations_that_ciphertext_cannot_answer_are_refused() {
    for sql in [
        "SELECT * FROM customers ORDER BY phone",
        "SELECT phone FROM customers ORDER BY 1",
        "SELECT phone AS p FROM customers ORDER BY p DESC",
        "SELECT * FROM customers WHERE balance > 10",
        "SELECT * FROM customers WHERE balance BETWEEN 1 AND 2",
        "SELECT * FROM customers WHERE id_card LIKE '11%'",
        "SELECT * FROM customers WHERE id_card ILIKE '11%'",
        "SELECT upper(phone) FROM customers",
        "SELECT balance + 1 FROM customers",
        "SELECT phone::text FROM customers",
        "SELECT coalesce(phone, 'x') FROM customers",
        "SELECT CASE WHEN phone IS NULL THEN 1 ELSE 2 END, CASE id_card WHEN '1' THEN 1 END FROM customers",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT c FROM customers c",
        "SELECT phone FROM customers UNION ALL SELECT id_card FROM orders",
        "SELECT DISTINCT phone FROM customers",
        "SELECT phone, count(*) FROM customers GROUP BY phone",
        "SELECT * FROM customers c JOIN orders o ON o.id_card = c.id_card",
        "SELECT * FROM customers WHERE id_card = upper('x')",
        "SELECT shout FROM customer_view",
        "SELECT (SELECT phone FROM customers LIMIT 1)",
        "SELECT * FROM customers WHERE id IN (SELECT id_card FROM orders)",
        "SELECT max(balance) FROM customers",
        "WITH x AS (SELECT phone AS p FROM customers) SELECT * FROM x ORDER BY p",
        "SELECT * FROM (SELECT phone AS p FROM customers) s WHERE p = '1'",
        "SELECT * FROM customers c, LATERAL (SELECT upper(c.phone)) u",
        "SELECT count(DISTINCT phone) FROM customers",
        "COPY customers TO STDOUT",
        "COPY (SELECT phone FROM customers) TO STDOUT",
        "SELECT array_agg(id_card) FROM customers",
        "SELECT json_build_object('a', c.*) FROM customers c",
    ] {
        let refusal = refused(sql);
        assert_eq!(refusal.sqlstate(), "0A000", "{sql}: {}", refusal.message);
        assert!(refusal.column.is_some(), "{sql}");
    }
}

#[test]
fn reads_that_ciphertext_can_answer_pass() {
    for sql in [
        "SELECT * FROM customers",
        "SELECT c.*, o.id FROM customers c JOIN orders o ON o.id = c.id",
        "SELECT id_card, phone AS p FROM customers WHERE phone IS NOT NULL",
        "SELECT count(*), count(phone) FROM customers WHERE id_card IS NULL",
        "SELECT * FROM customers a JOIN customers b ON a.id_card = b.id_card",
        "SELECT * FROM customers a JOIN customers b USING (id_card)",
        "SELECT id_card FROM customers GROUP BY id_card HAVING count(*) > 1",
        "SELECT name FROM customers ORDER BY name, 1",
        "WITH x AS (SELECT id_card AS k FROM customers) SELECT * FROM x WHERE k = '1'",
        "SELECT * FROM (SELECT id_card FROM customers) s WHERE s.id_card IN ('1', '2')",
        "SELECT * FROM customers WHERE EXISTS (SELECT 1 FROM orders o WHERE o.id_card = '5')",
        "SELECT * FROM customers WHERE id_card IN (SELECT id_card FROM customers WHERE id = 1)",
        "SELECT id_card FROM customer_view WHERE id_card = '1'",
        "SELECT lower(name), id + 1 FROM customers",
        "EXPLAIN SELECT * FROM customers WHERE id_card = '1'",
        "CREATE INDEX ON customers (id_card)",
        "ALTER TABLE customers ADD COLUMN note text",
        "DECLARE c CURSOR FOR SELECT phone FROM customers",
        "SELECT * FROM customers FOR UPDATE",
    ] {
        ok(sql);
    }
    let sql = "SELECT * FROM customers WHERE EXISTS (SELECT 1 FROM orders o WHERE o.id_card = '5')";
    assert_eq!(edited(sql, &ok(sql)), ["'5'"]);
}

#[test]
fn quoted_and_qualified_names_resolve_like_postgresql() {
    let sql = r#"SELECT "ID_CARD" FROM Customers WHERE "id_card" = '1' AND public.customers.id_card = '2'"#;
    let analysis = ok(sql);
    assert_eq!(edited(sql, &analysis), ["'1'", "'2'"]);
    // A quoted upper-case name is another relation.
    assert!(ok(r#"SELECT * FROM "Customers" WHERE phone = '1'"#).changes_nothing());
}

#[test]
fn copy_from_stdin_records_the_encrypted_fields_and_format() {
    let analysis = ok("COPY customers (id, phone, name) FROM STDIN WITH (FORMAT csv, HEADER true)");
    let copy = analysis.copy_in.unwrap();
    assert_eq!(copy.fields.len(), 3);
    assert!(copy.fields[0].is_none() && copy.fields[1].is_some() && copy.fields[2].is_none());
    assert!(matches!(
        copy.format,
        CopyFormat::Csv {
            header: true,
            delimiter: b',',
            ..
        }
    ));
    // Without a column list: every column but the generated one.
    let analysis = ok("COPY customers FROM STDIN");
    assert_eq!(analysis.copy_in.unwrap().fields.len(), 6);
    let analysis = ok("COPY customers (id, phone) FROM STDIN CSV HEADER");
    assert!(matches!(
        analysis.copy_in.unwrap().format,
        CopyFormat::Csv { header: true, .. }
    ));
    let analysis = ok("COPY customers (id, phone) FROM STDIN WITH (HEADER, DELIMITER '|')");
    assert_eq!(
        analysis.copy_in.unwrap().format,
        CopyFormat::Text {
            delimiter: b'|',
            null: b"\\N".to_vec(),
            header: true
        }
    );
    // A column the table lacks keeps its place (the server fails the COPY).
    let analysis = ok("COPY customers (nosuch, phone) FROM STDIN");
    let fields = analysis.copy_in.unwrap().fields;
    assert!(fields[0].is_none() && fields[1].is_some());
    for sql in [
        "COPY customers FROM STDIN WITH (FORMAT binary)",
        "COPY customers FROM STDIN WITH (ENCODING 'SJIS')",
        "COPY customers FROM STDIN WITH (ENCODING 'windows-950')",
        "COPY customers FROM STDIN WITH (FORMAT csv, FORCE_NULL (phone))",
        "COPY customers FROM STDIN WITH (DELIMITER '\\')",
        "SELECT 1; COPY customers (phone) FROM STDIN",
    ] {
        assert_eq!(refused(sql).sqlstate(), "0A000", "{sql}");
    }
    // The parser takes what follows `COPY … FROM STDIN;` for data; the server runs it.
    for sql in [
        "COPY customers FROM STDIN; SELECT 1",
        "COPY other FROM STDIN; UPDATE customers SET phone = '1'",
        "COPY other FROM STDIN;\n\\N",
    ] {
        assert_eq!(refused(sql).sqlstate(), "42501", "{sql}");
    }
    assert!(ok("COPY customers FROM STDIN;\n  ").copy_in.is_some());
    assert!(ok("COPY customers FROM STDIN WITH (ENCODING 'latin1')")
        .copy_in
        .is_some());
}

#[test]
fn encodings_with_ascii_second_bytes_are_told_apart() {
    for name in [
        "SJIS",
        "Shift_JIS_2004",
        "BIG5",
        "GBK",
        "GB18030",
        "UHC",
        "JOHAB",
        "win932",
    ] {
        assert!(!ascii_safe_encoding(name), "{name}");
    }
    for name in [
        "UTF8",
        "utf-8",
        "LATIN1",
        "EUC_JP",
        "SQL_ASCII",
        "WIN1252",
        "KOI8R",
    ] {
        assert!(ascii_safe_encoding(name), "{name}");
    }
}

#[test]
fn a_parameter_used_for_an_encrypted_column_and_elsewhere_is_refused() {
    refused("INSERT INTO customers (id, phone) VALUES ($1, $1)");
    refused("SELECT * FROM customers WHERE id_card = $1 OR name = $1");
    refused("INSERT INTO customers (phone, id_card) VALUES ($1, $1)");
    let analysis = ok("SELECT * FROM customers WHERE id_card = $1 OR id_card = $1");
    assert_eq!(analysis.params.len(), 1);
}

#[test]
fn defaults_of_encrypted_columns_are_refused() {
    let fixture = fixture();
    let mut relations = fixture.relations.clone();
    let mut customers = (*relations["customers"][0]).clone();
    for column in &mut customers.columns {
        if column.name == "phone" {
            column.has_default = true;
        }
    }
    relations.insert("customers".into(), vec![Arc::new(customers)]);
    let knowledge = Knowledge {
        policy: &fixture.policy,
        relations: &relations,
        single_key: true,
    };
    assert!(analyse("INSERT INTO customers (id) VALUES (1)", &knowledge).is_err());
    assert!(analyse(
        "INSERT INTO customers (id, phone) VALUES (1, DEFAULT)",
        &knowledge
    )
    .is_err());
    assert!(analyse(
        "INSERT INTO customers (id, phone) VALUES (1, '1')",
        &knowledge
    )
    .is_ok());
    assert!(analyse(
        "INSERT INTO customers (id, id_card) VALUES (1, DEFAULT)",
        &knowledge
    )
    .is_err());
}

#[test]
fn unparseable_and_unknown_statements_are_refused() {
    assert_eq!(
        refused("SELECT * FROM customers WHERE (").kind,
        RefusalKind::Unparseable
    );
    let refusal = refused("MERGE INTO customers c USING orders o ON c.id = o.id WHEN MATCHED THEN UPDATE SET phone = '1'");
    assert_eq!(refusal.sqlstate(), "42501");
}

#[test]
fn order_by_expressions_do_not_analyse_the_from_list_twice() {
    // The derived table's literal must be marked once: twice would be an overlapping
    // rewrite, and the statement refused.
    let sql = "SELECT s.id FROM (SELECT id, id_card FROM customers WHERE id_card = '1') s ORDER BY s.id + 1";
    let analysis = ok(sql);
    assert_eq!(edited(sql, &analysis), ["'1'"]);
    refused("SELECT id FROM customers c ORDER BY c.balance || ''");
}
