use super::*;
use crate::wire::copy_rows::{decode_row, CopyRowReader, LineKind};

type Error = CopyOutError<String>;
type Values = Vec<Vec<Option<Vec<u8>>>>;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Pushes `chunks`, finishes, and returns everything the rewriter handed back.
fn run(
    rewriter: &mut CopyOutRewriter,
    chunks: &[&[u8]],
    field: &mut FieldCallback<'_, String>,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend(rewriter.push(chunk, field)?);
    }
    rewriter.finish().map_err(|error| match error {
        CopyOutError::Malformed { row, problem } => CopyOutError::Malformed { row, problem },
        CopyOutError::Field { error, .. } => match error {},
    })?;
    Ok(out)
}

fn rewrite(
    format: CopyOutFormat,
    width: usize,
    positions: &[usize],
    chunks: &[&[u8]],
    field: &mut FieldCallback<'_, String>,
) -> Result<Vec<u8>, Error> {
    run(
        &mut CopyOutRewriter::new(format, width, positions.to_vec()),
        chunks,
        field,
    )
}

/// A callback that records what it saw and replaces every value with `f(value)`.
fn replacing<'a>(
    seen: &'a mut Vec<(usize, Option<Vec<u8>>)>,
    f: impl Fn(Option<&[u8]>) -> FieldChange + 'a,
) -> impl FnMut(usize, Option<&[u8]>) -> Result<FieldChange, String> + 'a {
    move |position, value| {
        seen.push((position, value.map(<[u8]>::to_vec)));
        Ok(f(value))
    }
}

fn keep(_: usize, _: Option<&[u8]>) -> Result<FieldChange, String> {
    Ok(FieldChange::Keep)
}

fn replace(value: &[u8]) -> FieldChange {
    FieldChange::Replace(Some(value.to_vec()))
}

fn some(value: &[u8]) -> Option<Vec<u8>> {
    Some(value.to_vec())
}

fn malformed(result: Result<Vec<u8>, Error>) -> (u64, &'static str) {
    match result {
        Err(CopyOutError::Malformed { row, problem }) => (row, problem),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

const WRONG_COUNT: &str = "the row does not have the expected number of fields";

fn text(delimiter: u8, null: &[u8], header: bool) -> CopyOutFormat {
    CopyOutFormat::Rows(CopyFormat::Text {
        delimiter,
        null: null.to_vec(),
        header,
    })
}

fn csv(delimiter: u8, quote: u8, escape: u8, null: &[u8], header: bool) -> CopyOutFormat {
    CopyOutFormat::Rows(CopyFormat::Csv {
        delimiter,
        quote,
        escape,
        null: null.to_vec(),
        header,
    })
}

/// Test-only: a field as PostgreSQL's `CopyAttributeOutText` writes it.
fn server_text_field(out: &mut Vec<u8>, delimiter: u8, null: &[u8], value: Option<&[u8]>) {
    let Some(value) = value else {
        out.extend_from_slice(null);
        return;
    };
    for &c in value {
        if c < 0x20 {
            let letter = match c {
                0x08 => b'b',
                0x0c => b'f',
                b'\n' => b'n',
                b'\r' => b'r',
                b'\t' => b't',
                0x0b => b'v',
                _ if c == delimiter => c,
                _ => {
                    out.push(c);
                    continue;
                }
            };
            out.extend_from_slice(&[b'\\', letter]);
        } else if c == b'\\' || c == delimiter {
            out.extend_from_slice(&[b'\\', c]);
        } else {
            out.push(c);
        }
    }
}

/// Test-only: a field as PostgreSQL's `CopyAttributeOutCSV` writes it.
fn server_csv_field(
    out: &mut Vec<u8>,
    (delimiter, quote, escape, null): (u8, u8, u8, &[u8]),
    value: Option<&[u8]>,
    force_quote: bool,
    single_attr: bool,
) {
    let Some(value) = value else {
        out.extend_from_slice(null);
        return;
    };
    let mut use_quote = force_quote || value == null;
    if !use_quote {
        use_quote = (single_attr && value == b"\\.")
            || value
                .iter()
                .any(|&c| c == delimiter || c == quote || c == b'\n' || c == b'\r');
    }
    if !use_quote {
        out.extend_from_slice(value);
        return;
    }
    out.push(quote);
    for &c in value {
        if c == quote || c == escape {
            out.push(escape);
        }
        out.push(c);
    }
    out.push(quote);
}

/// Test-only: the server's line for one row.
fn server_line(format: &CopyFormat, row: &[Option<Vec<u8>>], force_quote: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, value) in row.iter().enumerate() {
        if index > 0 {
            out.push(format.delimiter());
        }
        match format {
            CopyFormat::Text {
                delimiter, null, ..
            } => server_text_field(&mut out, *delimiter, null, value.as_deref()),
            CopyFormat::Csv {
                delimiter,
                quote,
                escape,
                null,
                ..
            } => server_csv_field(
                &mut out,
                (*delimiter, *quote, *escape, null),
                value.as_deref(),
                force_quote,
                row.len() == 1,
            ),
        }
    }
    out.push(b'\n');
    out
}

/// Reads text or CSV data back as `COPY … FROM` would (the header skipped).
fn read_back(format: &CopyFormat, data: &[u8]) -> Values {
    let mut reader = CopyRowReader::new(format.clone(), 1 << 20);
    let mut rows = Vec::new();
    let mut take = |kind: LineKind, content: &[u8]| {
        if kind == LineKind::Row {
            let fields = decode_row(format, content).unwrap();
            rows.push(fields.iter().map(|v| v.map(<[u8]>::to_vec)).collect());
        }
    };
    for line in reader.push(data).unwrap() {
        take(line.kind, line.content());
    }
    for line in reader.finish().unwrap() {
        take(line.kind, line.content());
    }
    rows
}

#[test]
fn text_escapes_in_kept_and_replaced_fields() {
    let data: &[u8] = b"1\ta\\tb\\\\c\\nd\tx\n2\t\\N\t\\\\N\n";
    let mut seen = Vec::new();
    let out = rewrite(
        CopyOutFormat::Rows(CopyFormat::text()),
        3,
        &[1, 2],
        &[data],
        &mut replacing(&mut seen, |value| match value {
            Some(b"x") => replace(b"tab\there\\back\nline\rcr\x08\x0c\x0b\x01"),
            _ => FieldChange::Keep,
        }),
    )
    .unwrap();
    assert_eq!(
        seen,
        [
            (1, some(b"a\tb\\c\nd")),
            (2, some(b"x")),
            (1, None),
            (2, some(b"\\N")),
        ]
    );
    assert_eq!(
        out,
        b"1\ta\\tb\\\\c\\nd\ttab\\there\\\\back\\nline\\rcr\\b\\f\\v\x01\n2\t\\N\t\\\\N\n"
    );
    // A value replaced by one that looks like the NULL string still reads back as it is.
    let out = rewrite(
        CopyOutFormat::Rows(CopyFormat::text()),
        1,
        &[0],
        &[b"a\n"],
        &mut |_, _| Ok(replace(b"\\N")),
    )
    .unwrap();
    assert_eq!(out, b"\\\\N\n");
}

#[test]
fn text_custom_null_and_delimiter() {
    let format = text(b'|', b"NULL", false);
    // `NULL` raw is NULL; an escaped delimiter is data; `\N` is just N here.
    let data: &[u8] = b"a\\|b|NULL|\\N\n";
    let mut seen = Vec::new();
    let out = rewrite(
        format.clone(),
        3,
        &[0, 1, 2],
        &[data],
        &mut replacing(&mut seen, |value| match value {
            Some(b"a|b") => replace(b"x|y\\z"),
            None => replace(b"was null"),
            _ => FieldChange::Replace(None),
        }),
    )
    .unwrap();
    assert_eq!(seen, [(0, some(b"a|b")), (1, None), (2, some(b"N"))]);
    assert_eq!(out, b"x\\|y\\\\z|was null|NULL\n");
    // A value equal to the custom NULL string is written so it does not read back as NULL
    // (the server would write it as it is).
    let out = rewrite(format.clone(), 1, &[0], &[b"a\n"], &mut |_, _| {
        Ok(replace(b"NULL"))
    })
    .unwrap();
    assert_eq!(out, b"\\116ULL\n");
    let CopyOutFormat::Rows(rows) = &format else {
        unreachable!()
    };
    assert_eq!(read_back(rows, &out), [vec![some(b"NULL")]]);
    // The tab is just data with another delimiter, but still escaped as the server does.
    let out = rewrite(format, 2, &[1], &[b"a\tb|c\n"], &mut |_, _| {
        Ok(replace(b"d\te|"))
    })
    .unwrap();
    assert_eq!(out, b"a\tb|d\\te\\|\n");
}

#[test]
fn csv_quotes_delimiters_newlines_and_nulls() {
    let format = CopyOutFormat::Rows(CopyFormat::csv());
    let data: &[u8] = b"1,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\"\",\n";
    let mut seen = Vec::new();
    let out = rewrite(
        format.clone(),
        6,
        &[1, 2, 3, 4, 5],
        &[data],
        &mut replacing(&mut seen, |_| FieldChange::Keep),
    )
    .unwrap();
    assert_eq!(out, data);
    assert_eq!(
        seen,
        [
            (1, some(b"a,b")),
            (2, some(b"say \"hi\"")),
            (3, some(b"two\nlines")),
            (4, some(b"")),
            (5, None),
        ]
    );
    // Replacements quoted when they must be; the empty string quoted against the NULL.
    let out = rewrite(format.clone(), 6, &[0, 5], &[data], &mut |position, _| {
        Ok(match position {
            0 => replace(b"x\"y,\r\n"),
            _ => replace(b""),
        })
    })
    .unwrap();
    assert_eq!(
        out,
        b"\"x\"\"y,\r\n\",\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\"\",\"\"\n"
    );
    // Plain values stay unquoted; `\.` at the start is quoted.
    let out = rewrite(format, 3, &[0, 1, 2], &[b"a,b,c\n"], &mut |position, _| {
        Ok(match position {
            0 => replace(b"\\."),
            1 => replace(b"plain"),
            _ => replace(b"\\.x"),
        })
    })
    .unwrap();
    assert_eq!(out, b"\"\\.\",plain,\"\\.x\"\n");
    // Another quote and escape: the escape doubles the quote and itself inside quotes.
    let format = csv(b';', b'\'', b'\\', b"\\N", false);
    let mut seen = Vec::new();
    let out = rewrite(
        format,
        3,
        &[0, 1, 2],
        &[b"'it\\'s';\\N;'\\N'\n"],
        &mut replacing(&mut seen, |value| match value {
            None => replace(b"a'b\\c"),
            Some(b"\\N") => FieldChange::Replace(None),
            _ => replace(b"\\N"),
        }),
    )
    .unwrap();
    assert_eq!(seen, [(0, some(b"it's")), (1, None), (2, some(b"\\N"))]);
    assert_eq!(out, b"'\\\\N';'a\\'b\\\\c';\\N\n");
}

#[test]
fn header_lines_pass_untouched() {
    let mut seen = Vec::new();
    let out = rewrite(
        text(b'\t', b"\\N", true),
        2,
        &[0, 1],
        &[b"id\tna\\tme\n", b"1\tx\n"],
        &mut replacing(&mut seen, |_| replace(b"r")),
    )
    .unwrap();
    assert_eq!(out, b"id\tna\\tme\nr\tr\n");
    assert_eq!(seen, [(0, some(b"1")), (1, some(b"x"))]);
    // A CSV header with a quoted line break and a different field count, in pieces.
    let data: &[u8] = b"\"a\nb\",c,d\n1,2\n";
    for cut in 0..=data.len() {
        let (first, second) = data.split_at(cut);
        let mut seen = Vec::new();
        let out = rewrite(
            csv(b',', b'"', b'"', b"", true),
            2,
            &[1],
            &[first, second],
            &mut replacing(&mut seen, |_| replace(b"x,y")),
        )
        .unwrap();
        assert_eq!(out, b"\"a\nb\",c,d\n1,\"x,y\"\n", "cut at {cut}");
        assert_eq!(seen, [(1, some(b"2"))]);
    }
    // The header alone: no rows.
    let out = rewrite(
        csv(b',', b'"', b'"', b"", true),
        2,
        &[1],
        &[b"a,b\n"],
        &mut |_, _| Err("no row".to_string()),
    )
    .unwrap();
    assert_eq!(out, b"a,b\n");
}

/// Protocol 3 has no end-of-data marker in the server's data: a line `\.` (here a NULL
/// with the NULL string `\.`) is a row, and rows may follow it.
#[test]
fn a_backslash_point_line_is_a_row() {
    for format in [
        text(b'\t', b"\\.", false),
        csv(b',', b'"', b'"', b"\\.", false),
    ] {
        let mut seen = Vec::new();
        let out = rewrite(
            format.clone(),
            1,
            &[0],
            &[b"\\.\nx\n"],
            &mut replacing(&mut seen, |value| match value {
                None => replace(b"null"),
                Some(_) => FieldChange::Replace(None),
            }),
        )
        .unwrap();
        assert_eq!(seen, [(0, None), (0, some(b"x"))], "{format:?}");
        assert_eq!(out, b"null\n\\.\n", "{format:?}");
    }
}

#[test]
fn force_quoted_fields_stay_quoted() {
    let data: &[u8] = b"\"1\",\"a\",,\"\"\n";
    let format = CopyOutFormat::Rows(CopyFormat::csv());
    let out = rewrite(format.clone(), 4, &[0, 2, 3], &[data], &mut keep).unwrap();
    assert_eq!(out, data);
    // Replaced: a quoted field stays quoted, the NULL is written unquoted.
    let out = rewrite(format, 4, &[1, 2, 3], &[data], &mut |position, _| {
        Ok(match position {
            1 => replace(b"b"),
            2 => replace(b"now"),
            _ => FieldChange::Replace(None),
        })
    })
    .unwrap();
    assert_eq!(out, b"\"1\",\"b\",now,\n");
}

#[test]
fn replacing_to_and_from_null() {
    let mut seen = Vec::new();
    let out = rewrite(
        CopyOutFormat::Rows(CopyFormat::text()),
        2,
        &[0, 1],
        &[b"\\N\tv\n"],
        &mut replacing(&mut seen, |value| match value {
            None => replace(b"from null"),
            Some(_) => FieldChange::Replace(None),
        }),
    )
    .unwrap();
    assert_eq!(seen, [(0, None), (1, some(b"v"))]);
    assert_eq!(out, b"from null\t\\N\n");
    let out = rewrite(
        csv(b',', b'"', b'"', b"NULL", false),
        2,
        &[0, 1],
        &[b"NULL,\"NULL\"\n"],
        &mut |_, value| {
            Ok(match value {
                None => replace(b"NULL"),
                Some(_) => FieldChange::Replace(None),
            })
        },
    )
    .unwrap();
    assert_eq!(out, b"\"NULL\",NULL\n");
    // Binary.
    let data = binary(&[&[None, Some(b"abc")]]);
    let out = rewrite(
        CopyOutFormat::Binary,
        2,
        &[0, 1],
        &[&data],
        &mut |_, value| {
            Ok(match value {
                None => replace(b"xy"),
                Some(_) => FieldChange::Replace(None),
            })
        },
    )
    .unwrap();
    assert_eq!(out, binary(&[&[Some(b"xy"), None]]));
}

#[test]
fn multibyte_values_stay_intact() {
    let data = "1\tgrüße 日本\t\\N\n".as_bytes();
    let mut seen = Vec::new();
    let out = rewrite(
        CopyOutFormat::Rows(CopyFormat::text()),
        3,
        &[1, 2],
        &[&data[..5], &data[5..]],
        &mut replacing(&mut seen, |value| match value {
            None => replace("ñ\t€".as_bytes()),
            Some(_) => FieldChange::Keep,
        }),
    )
    .unwrap();
    assert_eq!(seen[0], (1, Some("grüße 日本".as_bytes().to_vec())));
    assert_eq!(out, "1\tgrüße 日本\tñ\\t€\n".as_bytes());
    let out = rewrite(
        CopyOutFormat::Rows(CopyFormat::csv()),
        2,
        &[0],
        &["\"é,è\",ü\n".as_bytes()],
        &mut |_, value| {
            Ok(FieldChange::Replace(
                value.map(|v| [v, "✓".as_bytes()].concat()),
            ))
        },
    )
    .unwrap();
    assert_eq!(out, "\"é,è✓\",ü\n".as_bytes());
}

#[test]
fn rows_without_changes_are_copied_verbatim() {
    // Oddities the server would not write but which read the same are kept as they are.
    let data: &[u8] = b"\\x41\t\\101\tb\n\\N\t\t\\z\n";
    let format = CopyOutFormat::Rows(CopyFormat::text());
    assert_eq!(
        rewrite(format.clone(), 3, &[], &[data], &mut keep).unwrap(),
        data
    );
    assert_eq!(
        rewrite(format.clone(), 3, &[0, 1, 2], &[data], &mut keep).unwrap(),
        data
    );
    // Only the replaced field changes.
    let out = rewrite(format, 3, &[0, 1, 2], &[data], &mut |position, value| {
        Ok(if position == 2 && value == Some(b"b") {
            replace(b"c")
        } else {
            FieldChange::Keep
        })
    })
    .unwrap();
    assert_eq!(out, b"\\x41\t\\101\tc\n\\N\t\t\\z\n");
    let csv_data: &[u8] = b"\"a\",b\"\"\n";
    assert_eq!(
        rewrite(
            CopyOutFormat::Rows(CopyFormat::csv()),
            2,
            &[],
            &[csv_data],
            &mut keep
        )
        .unwrap(),
        csv_data
    );
    let bin = binary(&[&[Some(b"a"), None], &[Some(b""), Some(b"xyz")]]);
    assert_eq!(
        rewrite(CopyOutFormat::Binary, 2, &[], &[&bin], &mut keep).unwrap(),
        bin
    );
    assert_eq!(
        rewrite(CopyOutFormat::Binary, 2, &[0, 1], &[&bin], &mut keep).unwrap(),
        bin
    );
}

#[test]
fn wrong_field_counts_are_refused() {
    let format = CopyOutFormat::Rows(CopyFormat::text());
    for positions in [&[][..], &[0]] {
        assert_eq!(
            malformed(rewrite(
                format.clone(),
                2,
                positions,
                &[b"a\tb\nc\n"],
                &mut keep
            )),
            (2, WRONG_COUNT)
        );
        assert_eq!(
            malformed(rewrite(
                format.clone(),
                2,
                positions,
                &[b"a\tb\tc\n"],
                &mut keep
            )),
            (1, WRONG_COUNT)
        );
        // An escaped delimiter is no delimiter.
        assert_eq!(
            malformed(rewrite(
                format.clone(),
                2,
                positions,
                &[b"a\\\tb\n"],
                &mut keep
            )),
            (1, WRONG_COUNT)
        );
        assert_eq!(
            malformed(rewrite(
                CopyOutFormat::Rows(CopyFormat::csv()),
                2,
                positions,
                &[b"1,\"a,b\"\n\"x,y\"\n"],
                &mut keep
            )),
            (2, WRONG_COUNT)
        );
    }
    // A table without columns: empty lines.
    assert_eq!(
        rewrite(format.clone(), 0, &[], &[b"\n\n"], &mut keep).unwrap(),
        b"\n\n"
    );
    assert_eq!(
        malformed(rewrite(format, 0, &[], &[b"\nx\n"], &mut keep)),
        (2, WRONG_COUNT)
    );
    let data = binary(&[&[Some(b"a"), None], &[Some(b"a")]]);
    assert_eq!(
        malformed(rewrite(CopyOutFormat::Binary, 2, &[], &[&data], &mut keep)),
        (2, WRONG_COUNT)
    );
}

#[test]
fn text_and_csv_however_the_data_is_cut() {
    let cases: [(CopyOutFormat, usize, &[u8], &[u8]); 3] = [
        (
            CopyOutFormat::Rows(CopyFormat::text()),
            2,
            b"a\\\\\tb\\tc\n\\N\td\n",
            b"a\\\\\t<b\\tc>\n\\N\t<d>\n",
        ),
        (
            CopyOutFormat::Rows(CopyFormat::csv()),
            2,
            b"\"a\n,\"\"\",b\n,\"\"\n",
            b"\"a\n,\"\"\",<b>\n,\"<>\"\n",
        ),
        (
            csv(b',', b'"', b'\\', b"", false),
            2,
            b"\"a\\\"\n\\\\\",\"\\\\\\\"\"\n",
            b"\"a\\\"\n\\\\\",\"<\\\\\\\">\"\n",
        ),
    ];
    for (format, width, data, expected) in cases {
        let mut callback = |_: usize, value: Option<&[u8]>| {
            Ok(FieldChange::Replace(
                value.map(|v| [&b"<"[..], v, b">"].concat()),
            ))
        };
        let whole = rewrite(format.clone(), width, &[1], &[data], &mut callback).unwrap();
        assert_eq!(whole, expected, "{format:?}");
        for first in 0..=data.len() {
            for second in first..=data.len() {
                let chunks = [&data[..first], &data[first..second], &data[second..]];
                let out = rewrite(format.clone(), width, &[1], &chunks, &mut callback).unwrap();
                assert_eq!(out, expected, "{format:?} cuts {first} {second}");
            }
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        let out = rewrite(format, width, &[1], &bytes, &mut callback).unwrap();
        assert_eq!(out, expected);
    }
}

#[test]
fn partial_rows_come_out_when_complete() {
    let mut rewriter = CopyOutRewriter::new(CopyOutFormat::Rows(CopyFormat::text()), 2, vec![1]);
    let mut callback =
        |_: usize, _: Option<&[u8]>| -> Result<FieldChange, String> { Ok(replace(b"*")) };
    assert_eq!(
        rewriter.push(b"a\tb\nc\t", &mut callback).unwrap(),
        b"a\t*\n"
    );
    assert_eq!(rewriter.push(b"d", &mut callback).unwrap(), b"");
    assert_eq!(
        rewriter.push(b"\ne\tf\n", &mut callback).unwrap(),
        b"c\t*\ne\t*\n"
    );
    assert_eq!(rewriter.rows(), 3);
    rewriter.finish().unwrap();
}

#[test]
fn truncated_data_is_refused_at_finish() {
    let format = CopyOutFormat::Rows(CopyFormat::text());
    let mut rewriter = CopyOutRewriter::new(format.clone(), 2, vec![]);
    assert_eq!(rewriter.push(b"a\tb\na\t", &mut keep).unwrap(), b"a\tb\n");
    assert_eq!(
        rewriter.finish(),
        Err(CopyOutError::Malformed {
            row: 2,
            problem: "the data ends inside a row"
        })
    );
    // Nothing is accepted afterwards.
    assert!(rewriter.push(b"b\n", &mut keep).is_err());
    // An unterminated quoted CSV field.
    assert_eq!(
        malformed(rewrite(
            CopyOutFormat::Rows(CopyFormat::csv()),
            1,
            &[0],
            &[b"\"a\n"],
            &mut keep
        )),
        (1, "the data ends inside a row")
    );
    // Binary: inside a tuple, without the trailer, inside the header.
    let data = binary(&[&[Some(b"abc")]]);
    let without_trailer = &data[..data.len() - 2];
    assert_eq!(
        malformed(rewrite(
            CopyOutFormat::Binary,
            1,
            &[0],
            &[&without_trailer[..without_trailer.len() - 1]],
            &mut keep
        )),
        (1, "the data ends inside a row")
    );
    assert_eq!(
        malformed(rewrite(
            CopyOutFormat::Binary,
            1,
            &[0],
            &[without_trailer],
            &mut keep
        )),
        (2, "the binary data ends without its trailer")
    );
    assert_eq!(
        malformed(rewrite(
            CopyOutFormat::Binary,
            1,
            &[0],
            &[&data[..data.len() - 1]],
            &mut keep
        )),
        (2, "the data ends inside a row")
    );
    for end in [0, 5, 18] {
        assert_eq!(
            malformed(rewrite(
                CopyOutFormat::Binary,
                1,
                &[0],
                &[&data[..end]],
                &mut keep
            )),
            (0, "the binary header is incomplete")
        );
    }
}

#[test]
fn callback_errors_name_row_and_field() {
    let mut rewriter = CopyOutRewriter::new(CopyOutFormat::Rows(CopyFormat::text()), 3, vec![2, 0]);
    let mut out = b"kept".to_vec();
    let mut callback = |position: usize, value: Option<&[u8]>| {
        if value == Some(b"bad") {
            Err(format!("refused at {position}"))
        } else {
            Ok(replace(b"ok"))
        }
    };
    let result = rewriter.push_into(b"a\tb\tc\nd\te\tbad\n", &mut out, &mut callback);
    assert_eq!(
        result,
        Err(CopyOutError::Field {
            row: 2,
            field: 2,
            error: "refused at 2".to_string()
        })
    );
    // The output is left as it was, and the rewriter stays failed.
    assert_eq!(out, b"kept");
    assert_eq!(
        rewriter.push(b"x\ty\tz\n", &mut callback),
        Err(CopyOutError::Malformed {
            row: 2,
            problem: "a field was refused"
        })
    );
    assert!(rewriter.finish().is_err());
    // Binary.
    let data = binary(&[&[Some(b"ok"), Some(b"bad")]]);
    assert_eq!(
        rewrite(CopyOutFormat::Binary, 2, &[1], &[&data], &mut callback),
        Err(CopyOutError::Field {
            row: 1,
            field: 1,
            error: "refused at 1".to_string()
        })
    );
}

#[test]
fn setup_errors() {
    assert_eq!(
        malformed(rewrite(CopyOutFormat::Binary, 2, &[2], &[b""], &mut keep)),
        (0, "a position to rewrite is not below the row width")
    );
    let (row, _) = malformed(rewrite(
        csv(b',', b',', b'"', b"", false),
        1,
        &[],
        &[b"a\n"],
        &mut keep,
    ));
    assert_eq!(row, 0);
}

#[test]
fn rows_longer_than_the_limit_are_refused() {
    let format = CopyOutFormat::Rows(CopyFormat::text());
    let mut rewriter = CopyOutRewriter::with_limit(format.clone(), 1, vec![0], 8);
    assert_eq!(
        rewriter.push(b"12345678\n", &mut keep).unwrap(),
        b"12345678\n"
    );
    assert_eq!(rewriter.push(b"1234", &mut keep).unwrap(), b"");
    assert_eq!(
        rewriter.push(b"56789", &mut keep),
        Err(CopyOutError::Malformed {
            row: 2,
            problem: "a row is longer than 1 GiB"
        })
    );
    // Binary: a declared length beyond the limit fails before its bytes arrive.
    let mut rewriter = CopyOutRewriter::with_limit(CopyOutFormat::Binary, 1, vec![], 64);
    let mut data = binary(&[]);
    data.truncate(data.len() - 2);
    data.extend_from_slice(&1i16.to_be_bytes());
    data.extend_from_slice(&100i32.to_be_bytes());
    assert_eq!(
        rewriter.push(&data, &mut keep),
        Err(CopyOutError::Malformed {
            row: 1,
            problem: "a row is longer than 1 GiB"
        })
    );
}

/// Binary data: the header, the tuples and the trailer.
fn binary(rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
    binary_with(0, b"", rows)
}

fn binary_with(flags: u32, extension: &[u8], rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
    let mut data = BINARY_SIGNATURE.to_vec();
    data.extend_from_slice(&flags.to_be_bytes());
    data.extend_from_slice(&(extension.len() as i32).to_be_bytes());
    data.extend_from_slice(extension);
    for row in rows {
        data.extend_from_slice(&(row.len() as i16).to_be_bytes());
        for value in *row {
            match value {
                None => data.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(value) => {
                    data.extend_from_slice(&(value.len() as i32).to_be_bytes());
                    data.extend_from_slice(value);
                }
            }
        }
    }
    data.extend_from_slice(&(-1i16).to_be_bytes());
    data
}

#[test]
fn binary_however_the_data_is_cut() {
    let data = binary_with(
        0x0000_8001,
        b"ext",
        &[
            &[Some(b"\x00\x00\x00\x01"), Some(b"secret"), None],
            &[Some(b""), None, Some(b"\xff\xfe")],
        ],
    );
    let expected = binary_with(
        0x0000_8001,
        b"ext",
        &[
            &[Some(b"\x00\x00\x00\x01"), Some(b"SECRET!"), None],
            &[Some(b""), Some(b"was null"), Some(b"\xff\xfe")],
        ],
    );
    let mut callback = |_: usize, value: Option<&[u8]>| {
        Ok(FieldChange::Replace(Some(match value {
            None => b"was null".to_vec(),
            Some(value) => [&value.to_ascii_uppercase()[..], b"!"].concat(),
        })))
    };
    let whole = rewrite(CopyOutFormat::Binary, 3, &[1], &[&data], &mut callback).unwrap();
    assert_eq!(whole, expected);
    for first in 0..=data.len() {
        let (a, b) = data.split_at(first);
        let out = rewrite(CopyOutFormat::Binary, 3, &[1], &[a, b], &mut callback).unwrap();
        assert_eq!(out, expected, "cut at {first}");
        for second in first..=data.len() {
            let chunks = [&data[..first], &data[first..second], &data[second..]];
            let out = rewrite(CopyOutFormat::Binary, 3, &[1], &chunks, &mut callback).unwrap();
            assert_eq!(out, expected, "cuts {first} {second}");
        }
    }
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    let out = rewrite(CopyOutFormat::Binary, 3, &[1], &bytes, &mut callback).unwrap();
    assert_eq!(out, expected);
    // As the server cuts it: the header with the first row, the trailer alone.
    let header_and_first = 19 + 3 + 2 + 8 + 10 + 4;
    let mut rewriter = CopyOutRewriter::new(CopyOutFormat::Binary, 3, vec![1]);
    let first = rewriter
        .push(&data[..header_and_first], &mut callback)
        .unwrap();
    assert_eq!(first, expected[..header_and_first + 1]);
    let trailer = data.len() - 2;
    let second = rewriter
        .push(&data[header_and_first..trailer], &mut callback)
        .unwrap();
    assert_eq!(second, expected[header_and_first + 1..expected.len() - 2]);
    assert_eq!(
        rewriter.push(&data[trailer..], &mut callback).unwrap(),
        (-1i16).to_be_bytes()
    );
    rewriter.finish().unwrap();
}

#[test]
fn binary_zero_rows() {
    let data = binary(&[]);
    assert_eq!(data.len(), 21);
    let out = rewrite(CopyOutFormat::Binary, 2, &[0], &[&data], &mut |_, _| {
        Err("no row".to_string())
    })
    .unwrap();
    assert_eq!(out, data);
}

#[test]
fn binary_header_checks() {
    let mut data = binary(&[&[Some(b"a")]]);
    data[6] = b'\r';
    // Found as soon as the signature's bytes are there.
    let mut rewriter = CopyOutRewriter::new(CopyOutFormat::Binary, 1, vec![]);
    assert_eq!(rewriter.push(&data[..3], &mut keep).unwrap(), b"");
    assert_eq!(
        rewriter.push(&data[3..7], &mut keep),
        Err(CopyOutError::Malformed {
            row: 0,
            problem: "not the binary COPY signature"
        })
    );
    assert_eq!(
        malformed(rewrite(
            CopyOutFormat::Binary,
            1,
            &[],
            &[b"a\tb\n"],
            &mut keep
        )),
        (0, "not the binary COPY signature")
    );
    let oids = binary_with(1 << 16, b"", &[]);
    assert_eq!(
        malformed(rewrite(CopyOutFormat::Binary, 1, &[], &[&oids], &mut keep)),
        (0, "the binary data includes OIDs")
    );
    for bit in 17..32 {
        let critical = binary_with(1 << bit, b"", &[]);
        assert_eq!(
            malformed(rewrite(
                CopyOutFormat::Binary,
                1,
                &[],
                &[&critical],
                &mut keep
            )),
            (0, "unknown critical flags in the binary header")
        );
    }
    let ignorable = binary_with(0xffff, b"", &[&[Some(b"a")]]);
    assert_eq!(
        rewrite(CopyOutFormat::Binary, 1, &[0], &[&ignorable], &mut keep).unwrap(),
        ignorable
    );
    let mut negative = binary(&[]);
    negative[15..19].copy_from_slice(&(-1i32).to_be_bytes());
    assert_eq!(
        malformed(rewrite(
            CopyOutFormat::Binary,
            1,
            &[],
            &[&negative],
            &mut keep
        )),
        (0, "negative binary header extension length")
    );
    let mut bad_length = binary(&[&[Some(b"a")]]);
    bad_length[21..25].copy_from_slice(&(-2i32).to_be_bytes());
    assert_eq!(
        malformed(rewrite(
            CopyOutFormat::Binary,
            1,
            &[],
            &[&bad_length],
            &mut keep
        )),
        (1, "negative field length")
    );
}

#[test]
fn nothing_may_follow_the_binary_trailer() {
    let mut data = binary(&[&[Some(b"a")]]);
    data.push(0);
    assert_eq!(
        malformed(rewrite(CopyOutFormat::Binary, 1, &[0], &[&data], &mut keep)),
        (2, "data after the binary trailer")
    );
    let data = binary(&[&[Some(b"a")]]);
    assert_eq!(
        malformed(rewrite(
            CopyOutFormat::Binary,
            1,
            &[0],
            &[&data, b"\xff\xff"],
            &mut keep
        )),
        (2, "data after the binary trailer")
    );
}

#[test]
fn a_hundred_thousand_text_rows() {
    let mut data = Vec::new();
    let mut expected = Vec::new();
    for i in 0..100_000u32 {
        data.extend_from_slice(format!("{i}\tsecret\\t{i}\tplain {i}\n").as_bytes());
        expected.extend_from_slice(format!("{i}\t[secret\\t{i}]\tplain {i}\n").as_bytes());
    }
    let mut rewriter = CopyOutRewriter::new(CopyOutFormat::Rows(CopyFormat::text()), 3, vec![1]);
    let mut callback = |_: usize, value: Option<&[u8]>| -> Result<FieldChange, String> {
        Ok(FieldChange::Replace(
            value.map(|v| [&b"["[..], v, b"]"].concat()),
        ))
    };
    // One row per message, as the server sends them, through one reused buffer.
    let mut out = Vec::with_capacity(expected.len());
    for line in data.split_inclusive(|&b| b == b'\n') {
        rewriter.push_into(line, &mut out, &mut callback).unwrap();
    }
    rewriter.finish().unwrap();
    assert_eq!(rewriter.rows(), 100_000);
    assert!(out == expected);
}

fn random_value(random: &mut Random, alphabet: &[&[u8]]) -> Option<Vec<u8>> {
    if random.below(6) == 0 {
        return None;
    }
    let mut value = Vec::new();
    for _ in 0..random.below(6) {
        if random.below(8) == 0 {
            value.push(1 + random.below(255) as u8);
        } else {
            value.extend_from_slice(alphabet[random.below(alphabet.len())]);
        }
    }
    Some(value)
}

/// Random rows written as the server writes them, every rewritten field replaced by the
/// value it had: the callback sees the values, and the output reads back the same (for
/// text and for CSV without values starting with `\.`, it is the same bytes).
#[test]
fn replacing_values_by_themselves_round_trips() {
    let formats = [
        (CopyFormat::text(), false),
        (
            CopyFormat::Text {
                delimiter: b',',
                null: b"NULL".to_vec(),
                header: true,
            },
            false,
        ),
        (
            CopyFormat::Text {
                delimiter: b'|',
                null: Vec::new(),
                header: false,
            },
            false,
        ),
        (CopyFormat::csv(), false),
        (CopyFormat::csv(), true),
        (
            CopyFormat::Csv {
                delimiter: b';',
                quote: b'\'',
                escape: b'\\',
                null: b"\\N".to_vec(),
                header: true,
            },
            false,
        ),
        (
            CopyFormat::Csv {
                delimiter: b'\t',
                quote: b'"',
                escape: b'"',
                null: b"NULL".to_vec(),
                header: false,
            },
            true,
        ),
    ];
    let alphabet: &[&[u8]] = &[
        b"a",
        b"\\",
        b".",
        b"\\.",
        b"N",
        b"NULL",
        b"\"",
        b"'",
        b",",
        b";",
        b"|",
        b"\t",
        b"\r",
        b"\n",
        b" ",
        "é".as_bytes(),
        "日".as_bytes(),
        b"\x08",
        b"\x0b",
    ];
    let mut random = Random(0x5eed);
    for (format, force_quote) in &formats {
        let null: &[u8] = match format {
            CopyFormat::Text { null, .. } | CopyFormat::Csv { null, .. } => null,
        };
        let header = matches!(
            format,
            CopyFormat::Text { header: true, .. } | CopyFormat::Csv { header: true, .. }
        );
        for _ in 0..400 {
            let width = random.below(4) + 1;
            let mut rows: Values = Vec::new();
            for _ in 0..random.below(6) {
                rows.push(
                    (0..width)
                        .map(|_| loop {
                            let value = random_value(&mut random, alphabet);
                            // The values the server's text format cannot carry: those
                            // equal to the NULL string read back as NULL.
                            if matches!(format, CopyFormat::Text { .. })
                                && value.as_deref() == Some(null)
                            {
                                continue;
                            }
                            break value;
                        })
                        .collect(),
                );
            }
            let mut data = Vec::new();
            if header {
                let names: Vec<Option<Vec<u8>>> = (0..width)
                    .map(|i| some(format!("c,\n{i}").as_bytes()))
                    .collect();
                data.extend(server_line(format, &names, *force_quote));
            }
            for row in &rows {
                data.extend(server_line(format, row, *force_quote));
            }
            let positions: Vec<usize> = (0..width).filter(|_| random.below(2) == 0).collect();
            let mut chunks = Vec::new();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let (chunk, after) = rest.split_at(random.below(rest.len() + 1).max(1));
                chunks.push(chunk);
                rest = after;
            }
            let mut seen = Vec::new();
            let out = rewrite(
                CopyOutFormat::Rows(format.clone()),
                width,
                &positions,
                &chunks,
                &mut replacing(&mut seen, |value| {
                    FieldChange::Replace(value.map(<[u8]>::to_vec))
                }),
            )
            .unwrap_or_else(|e| panic!("{format:?} {data:?}: {e}"));
            let expected_seen: Vec<(usize, Option<Vec<u8>>)> = rows
                .iter()
                .flat_map(|row| positions.iter().map(|&p| (p, row[p].clone())))
                .collect();
            assert_eq!(seen, expected_seen, "{format:?} {data:?}");
            assert_eq!(read_back(format, &out), rows, "{format:?} {out:?}");
            let starts_with_marker = rows
                .iter()
                .flatten()
                .any(|value| value.as_deref().is_some_and(|v| v.starts_with(b"\\.")));
            if matches!(format, CopyFormat::Text { .. }) || !starts_with_marker {
                assert_eq!(out, data, "{format:?}");
            }
            // Kept, the data comes back unchanged.
            let kept = rewrite(
                CopyOutFormat::Rows(format.clone()),
                width,
                &positions,
                &chunks,
                &mut keep,
            )
            .unwrap();
            assert_eq!(kept, data);
        }
    }
}
