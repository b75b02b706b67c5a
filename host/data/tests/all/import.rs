//! Import: every format from real files, and every kind of malformed input.

use std::sync::Arc;

use lathe_data::import::{ImportReport, import_file, import_with};
use lathe_data::{
    DataError, Example, FieldMapping, Format, ImportOptions, Message, Operation, Problem, RecordError, RecordFormatter,
    Role, SourceKind, Unit,
};
use serde_json::{Value, json};

use crate::{Env, sha256_file};

fn import(env: &Env, name: &str, bytes: &[u8]) -> Result<(String, ImportReport), DataError> {
    let p = env.file(name, bytes);
    import_file(&env.store, &p, &ImportOptions::default()).map(|i| (i.manifest.id, i.report))
}

fn record_error(err: DataError) -> (u64, Option<String>, Problem) {
    match err {
        DataError::Record { at, problem } => (at.number, at.field, problem),
        other => panic!("expected a record error, got {other:?}"),
    }
}

#[test]
fn openai_chat_jsonl() {
    let env = Env::new();
    let text = concat!(
        r#"{"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"2+2?"},{"role":"assistant","content":"4"}],"label":"math","id":7}"#,
        "\n\n",
        r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"},{"role":"user","content":"Bye"},{"role":"assistant","content":"Bye!"}],"label":3}"#,
        "\n"
    );
    let p = env.file("chat.jsonl", text);
    let imported = import_file(&env.store, &p, &ImportOptions::default()).unwrap();
    let r = &imported.report;
    assert_eq!(r.format, Format::OpenAiChat);
    assert_eq!(r.container, SourceKind::Jsonl);
    assert_eq!((r.rows, r.blank_lines), (2, 1));
    assert_eq!(r.source_sha256, sha256_file(&p));
    let ex = env.examples(&imported.manifest.id);
    assert_eq!(ex[0].messages.len(), 3);
    assert_eq!(ex[0].messages[0], Message::new(Role::System, "You are terse."));
    assert_eq!(ex[0].label.as_deref(), Some("math"));
    assert_eq!(ex[0].meta.get("id"), Some(&json!(7)));
    assert_eq!(ex[1].target(), "Bye!");
    assert_eq!(ex[1].label.as_deref(), Some("3"));
    match &imported.manifest.operation {
        Operation::Import { source, container, format, source_sha256 } => {
            assert_eq!(source, "chat.jsonl");
            assert_eq!(*container, SourceKind::Jsonl);
            assert_eq!(*format, Format::OpenAiChat);
            assert_eq!(source_sha256, &r.source_sha256);
        }
        other => panic!("unexpected operation {other:?}"),
    }
    // The manifest on disk has the documented shape.
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(env.store.version_dir(&imported.manifest.id).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["operation"]["import"]["format"], "openai_chat");
    assert_eq!(m["role"], "full");
    assert_eq!(m["rows"], 2);
    assert_eq!(m["parent"], Value::Null);
}

#[test]
fn prompt_completion_alpaca_and_sharegpt() {
    let env = Env::new();
    let (id, r) = import(
        &env,
        "pc.jsonl",
        br#"{"prompt":"Capital of France?","completion":"Paris"}
{"prompt":"Capital of Peru?","completion":"Lima","system":"Answer briefly."}
"#,
    )
    .unwrap();
    assert_eq!(r.format, Format::PromptCompletion);
    let ex = env.examples(&id);
    assert_eq!(ex[0], crate::qa("Capital of France?", "Paris"));
    assert_eq!(ex[1], Example::prompt_completion(Some("Answer briefly."), "Capital of Peru?", "Lima"));

    let (id, r) = import(
        &env,
        "alpaca.json",
        br#"{"instruction":"Translate to French","input":"cat","output":"chat"}
{"instruction":"Say hi","input":"","output":"hi","system":"Be kind."}
"#,
    )
    .unwrap();
    assert_eq!(r.format, Format::Alpaca);
    let ex = env.examples(&id);
    assert_eq!(ex[0], crate::qa("Translate to French\n\ncat", "chat"));
    assert_eq!(ex[1], Example::prompt_completion(Some("Be kind."), "Say hi", "hi"));

    let (id, r) = import(
        &env,
        "share.jsonl",
        br#"{"conversations":[{"from":"system","value":"sys"},{"from":"human","value":"q1"},{"from":"gpt","value":"a1"},{"from":"human","value":"q2"},{"from":"gpt","value":"a2"}]}
"#,
    )
    .unwrap();
    assert_eq!(r.format, Format::ShareGpt);
    let ex = env.examples(&id);
    let roles: Vec<Role> = ex[0].messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User, Role::Assistant]);
    assert_eq!(ex[0].target(), "a2");
}

#[test]
fn csv_with_mapping_quotes_and_extra_columns() {
    let env = Env::new();
    let p = env.file(
        "tickets.csv",
        "id,question,answer,sys,topic\n\
         1,\"Where is my order, please?\",\"It ships \"\"today\"\".\",,shipping\n\
         2,\"Two\nlines\",Fine,Be brief.,billing\n",
    );
    let opts =
        ImportOptions::with_mapping(FieldMapping::new("question", "answer").with_system("sys").with_label("topic"));
    let imported = import_file(&env.store, &p, &opts).unwrap();
    assert_eq!(imported.report.format, Format::Columns);
    assert_eq!(imported.report.container, SourceKind::Csv);
    assert_eq!(imported.report.rows, 2);
    let ex = env.examples(&imported.manifest.id);
    assert_eq!(ex[0].messages, crate::qa("Where is my order, please?", "It ships \"today\".").messages);
    assert_eq!(ex[0].label.as_deref(), Some("shipping"));
    assert_eq!(ex[0].meta.get("id"), Some(&json!("1")));
    assert_eq!(ex[1].messages[0], Message::new(Role::System, "Be brief."));
    assert_eq!(ex[1].messages[1].content, "Two\nlines");

    // Without a mapping, CSV columns are detected like JSONL keys.
    let p = env.file("pc.csv", "prompt,completion\nq,a\n");
    let imported = import_file(&env.store, &p, &ImportOptions::default()).unwrap();
    assert_eq!(imported.report.format, Format::PromptCompletion);
    assert_eq!(env.examples(&imported.manifest.id)[0], crate::qa("q", "a"));
}

#[test]
fn csv_mapping_names_a_missing_column() {
    let env = Env::new();
    let p = env.file("t.csv", "question,reply\nq,a\n");
    let err = import_file(&env.store, &p, &ImportOptions::with_mapping(FieldMapping::new("question", "answer"))).unwrap_err();
    let msg = err.to_string();
    let (row, field, problem) = record_error(err);
    assert_eq!((row, field.as_deref()), (1, Some("answer")));
    assert_eq!(problem, Problem::MissingColumn { available: vec!["question".into(), "reply".into()] });
    assert!(msg.contains("t.csv row 1, field `answer`"), "{msg}");
    env.assert_empty();
}

fn write_parquet(path: &std::path::Path) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let schema = Arc::new(
        parse_message_type(
            "message schema {
                REQUIRED BYTE_ARRAY question (UTF8);
                REQUIRED BYTE_ARRAY answer (UTF8);
                OPTIONAL BYTE_ARRAY topic (UTF8);
                OPTIONAL INT32 score;
            }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    let strings = |v: &[&str]| v.iter().map(|s| ByteArray::from(*s)).collect::<Vec<_>>();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>().write_batch(&strings(&["q1", "q2", "q3"]), None, None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>().write_batch(&strings(&["a1", "a2", "a3"]), None, None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>().write_batch(&strings(&["x", "y"]), Some(&[1, 0, 1]), None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int32Type>().write_batch(&[5, 9, 1], Some(&[1, 1, 1]), None).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_with_mapping() {
    let env = Env::new();
    let p = env.dir.path().join("data.parquet");
    write_parquet(&p);
    let opts = ImportOptions::with_mapping(FieldMapping::new("question", "answer").with_label("topic"));
    let imported = import_file(&env.store, &p, &opts).unwrap();
    assert_eq!(imported.report.container, SourceKind::Parquet);
    assert_eq!(imported.report.rows, 3);
    assert_eq!(imported.report.source_sha256, sha256_file(&p));
    let ex = env.examples(&imported.manifest.id);
    assert_eq!(ex[0].messages, crate::qa("q1", "a1").messages);
    assert_eq!(ex[0].label.as_deref(), Some("x"));
    assert_eq!(ex[1].label, None);
    assert_eq!(ex[2].label.as_deref(), Some("y"));
    assert_eq!(ex[2].meta.get("score"), Some(&json!(1)));

    // A numeric column mapped as the prompt is a type error naming row and column.
    let opts = ImportOptions::with_mapping(FieldMapping::new("score", "answer"));
    let (row, field, problem) = record_error(import_file(&env.store, &p, &opts).unwrap_err());
    assert_eq!((row, field.as_deref()), (1, Some("score")));
    assert_eq!(problem, Problem::WrongType { expected: "a string", found: "a number" });
}

#[test]
fn bom_and_crlf_are_transparent() {
    let env = Env::new();
    let clean = "{\"prompt\":\"p\",\"completion\":\"c\"}\n{\"prompt\":\"q\",\"completion\":\"d\"}\n";
    let (a, _) = import(&env, "a.jsonl", clean.as_bytes()).unwrap();
    let dos = format!("\u{feff}{}", clean.replace('\n', "\r\n"));
    let (b, r) = import(&env, "b.jsonl", dos.as_bytes()).unwrap();
    assert_eq!(a, b, "same content, same version");
    assert_eq!(r.rows, 2);
    assert_eq!(env.entries().len(), 1);

    let (c, _) = import(&env, "a.csv", b"prompt,completion\np,c\nq,d\n").unwrap();
    let (d, _) = import(&env, "b.csv", b"\xEF\xBB\xBFprompt,completion\r\np,c\r\nq,d\r\n").unwrap();
    assert_eq!(c, d);
    assert_eq!(a, c, "the same examples from CSV and JSONL are the same version");
}

#[test]
fn invalid_utf8_names_line_and_offset() {
    let env = Env::new();
    let mut bytes = b"{\"prompt\":\"p\",\"completion\":\"c\"}\n".to_vec();
    let line2_start = bytes.len();
    bytes.extend_from_slice(b"{\"prompt\":\"ab\xFF\",\"completion\":\"c\"}\n");
    let err = import(&env, "bad.jsonl", &bytes).unwrap_err();
    match &err {
        DataError::InvalidUtf8 { file, line, column, offset } => {
            assert_eq!((file.as_str(), *line, *column), ("bad.jsonl", 2, 14));
            assert_eq!(*offset, line2_start as u64 + 13);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().starts_with("bad.jsonl line 2: invalid UTF-8 at byte offset"), "{err}");
    env.assert_empty();

    // The same in CSV, found by the checked reader.
    let err = import(&env, "bad.csv", b"prompt,completion\nok,fine\nab\xFF,c\n").unwrap_err();
    match err {
        DataError::InvalidUtf8 { line, column, offset, .. } => assert_eq!((line, column, offset), (3, 3, 28)),
        other => panic!("{other:?}"),
    }
    env.assert_empty();
}

#[test]
fn invalid_json_names_line_and_column() {
    let env = Env::new();
    let err = import(&env, "j.jsonl", b"{\"prompt\":\"p\",\"completion\":\"c\"}\n\n{\"prompt\": \"p\" \"completion\":1}\n").unwrap_err();
    match &err {
        DataError::InvalidJson { line, column, message, .. } => {
            assert_eq!((*line, *column), (3, 16));
            assert!(message.contains("expected `,` or `}`"), "{message}");
            assert!(!message.contains("at line"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    env.assert_empty();
}

#[test]
fn record_errors_name_line_and_field() {
    let env = Env::new();
    let good = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#;
    let cases: Vec<(String, u64, &str, Problem)> = vec![
        (
            format!("{good}\n{}", r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":42}]}"#),
            2,
            "messages[1].content",
            Problem::WrongType { expected: "a string", found: "a number" },
        ),
        (
            r#"{"messages":[{"role":"user","content":"q"},{"role":"robot","content":"a"}]}"#.into(),
            1,
            "messages[1].role",
            Problem::UnknownRole { role: "robot".into(), allowed: Role::ALLOWED },
        ),
        (
            r#"{"messages":[{"role":"assistant","content":"a"},{"role":"user","content":"q"}]}"#.into(),
            1,
            "messages[1].role",
            Problem::LastNotAssistant { role: "user".into() },
        ),
        (r#"{"messages":[{"role":"user"}]}"#.into(), 1, "messages[0].content", Problem::MissingField),
        (r#"{"messages":{"role":"user"}}"#.into(), 1, "messages", Problem::WrongType { expected: "an array", found: "an object" }),
        (r#"{"instruction":"do"}"#.into(), 1, "output", Problem::MissingField),
        (r#"{"prompt":"p","completion":["a"]}"#.into(), 1, "completion", Problem::WrongType { expected: "a string", found: "an array" }),
        (
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"alien","value":"a"}]}"#.into(),
            1,
            "conversations[1].from",
            Problem::UnknownRole { role: "alien".into(), allowed: "human, gpt, system" },
        ),
        (
            r#"{"conversations":[{"from":"gpt","value":"a"},{"from":"human","value":"q"}]}"#.into(),
            1,
            "conversations[1].from",
            Problem::LastNotAssistant { role: "human".into() },
        ),
    ];
    for (text, line, field, problem) in cases {
        let err = import(&env, "r.jsonl", text.as_bytes()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("r.jsonl line {line}, field `{field}`")), "{msg}");
        let got = record_error(err);
        assert_eq!(got, (line, Some(field.to_string()), problem), "{text}");
        env.assert_empty();
    }
}

#[test]
fn format_is_detected_once_and_enforced() {
    let env = Env::new();
    let text = "\n{\"prompt\":\"p\",\"completion\":\"c\"}\n{\"instruction\":\"i\",\"output\":\"o\"}\n";
    let (line, field, problem) = record_error(import(&env, "mixed.jsonl", text.as_bytes()).unwrap_err());
    assert_eq!((line, field), (3, None));
    assert_eq!(
        problem,
        Problem::FormatMismatch { detected: "prompt_completion".into(), detected_at: 2, found: "alpaca".into() }
    );
    let (line, _, problem) = record_error(import(&env, "unknown.jsonl", b"{\"question\":\"q\",\"answer\":\"a\"}\n").unwrap_err());
    assert_eq!(line, 1);
    assert_eq!(problem, Problem::UnknownFormat { keys: vec!["answer".into(), "question".into()] });
    let (_, _, problem) = record_error(import(&env, "array.jsonl", b"[1,2]\n").unwrap_err());
    assert_eq!(problem, Problem::WrongType { expected: "a JSON object", found: "an array" });
    env.assert_empty();
}

#[test]
fn empty_inputs_have_no_records() {
    let env = Env::new();
    for (name, bytes) in [
        ("empty.jsonl", &b""[..]),
        ("blank.jsonl", b"\n  \r\n\t\n"),
        ("bom.jsonl", b"\xEF\xBB\xBF"),
        ("empty.csv", b""),
        ("header.csv", b"prompt,completion\r\n"),
        ("empty.parquet", b""),
    ] {
        let err = import(&env, name, bytes).unwrap_err();
        assert!(matches!(&err, DataError::NoRecords { file } if file == name), "{name}: {err:?}");
        assert!(err.to_string().contains("no records"));
        env.assert_empty();
    }
}

#[test]
fn ragged_csv_row() {
    let env = Env::new();
    let err = import(&env, "r.csv", b"prompt,completion,label\np,c,x\np,c\n").unwrap_err();
    match &err {
        DataError::RaggedRow { row, line, expected, found, .. } => assert_eq!((*row, *line, *expected, *found), (2, 3, 3, 2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.to_string(), "r.csv row 2 (line 3): has 2 fields but the header has 3");
    env.assert_empty();
}

#[test]
fn ten_megabyte_line_fails_without_reading_it_whole() {
    let env = Env::new();
    let mut bytes = b"{\"prompt\":\"p\",\"completion\":\"c\"}\n{\"prompt\":\"".to_vec();
    bytes.resize(bytes.len() + 10_000_000, b'x');
    bytes.extend_from_slice(b"\",\"completion\":\"c\"}\n");
    let err = import(&env, "big.jsonl", &bytes).unwrap_err();
    match &err {
        DataError::LineTooLong { line, limit, .. } => assert_eq!((*line, *limit), (2, 8 << 20)),
        other => panic!("{other:?}"),
    }
    env.assert_empty();

    // The cap is configurable, and applies to CSV lines too.
    let p = env.file("long.csv", format!("prompt,completion\n{},c\n", "y".repeat(300)));
    let opts = ImportOptions { max_line_bytes: 100, ..ImportOptions::default() };
    let err = import_file(&env.store, &p, &opts).unwrap_err();
    assert!(matches!(err, DataError::LineTooLong { line: 2, limit: 100, .. }), "{err:?}");
    let p = env.file("long.jsonl", format!("{{\"prompt\":\"{}\",\"completion\":\"c\"}}\n", "y".repeat(300)));
    let err = import_file(&env.store, &p, &opts).unwrap_err();
    assert!(matches!(err, DataError::LineTooLong { line: 1, limit: 100, .. }), "{err:?}");
    env.assert_empty();
}

#[test]
fn bounded_lines_never_buffer_past_the_cap() {
    use lathe_data::import::{BoundedLines, LineError};
    // A reader that counts what was pulled from it.
    struct Counting<'a>(&'a [u8], usize);
    impl std::io::Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len() - self.1);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }
    let data = vec![b'z'; 10_000_000];
    let mut counting = Counting(&data, 0);
    let mut lines = BoundedLines::new(std::io::BufReader::with_capacity(4096, &mut counting), 1 << 20);
    assert!(matches!(lines.next_line(), Err(LineError::TooLong { line: 1 })));
    drop(lines);
    assert!(counting.1 <= (1 << 20) + 8192, "read {} bytes", counting.1);
}

/// A formatter the way the host plugs in its WebAssembly plugin: raw record in, example out.
struct QaPlugin;

impl RecordFormatter for QaPlugin {
    fn format(&mut self, record: Value) -> Result<Example, RecordError> {
        let q = record.get("q").and_then(Value::as_str).ok_or_else(|| RecordError::missing("q"))?;
        let a = record
            .get("a")
            .and_then(Value::as_str)
            .ok_or_else(|| RecordError::new("a", Problem::Formatter { message: "needs an answer".into() }))?;
        Ok(crate::qa(q, a))
    }

    fn format_name(&self) -> Format {
        Format::Plugin("qa-formatter".into())
    }
}

#[test]
fn formatter_plugin_hook() {
    let env = Env::new();
    let p = env.file("qa.jsonl", "{\"q\":\"one\",\"a\":\"1\"}\n{\"q\":\"two\",\"a\":\"2\"}\n");
    let imported = import_with(&env.store, &p, &ImportOptions::default(), &mut QaPlugin).unwrap();
    assert_eq!(imported.report.format, Format::Plugin("qa-formatter".into()));
    assert_eq!(imported.manifest.operation, Operation::Import {
        source: "qa.jsonl".into(),
        container: SourceKind::Jsonl,
        format: Format::Plugin("qa-formatter".into()),
        source_sha256: sha256_file(&p),
    });
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(env.store.version_dir(&imported.manifest.id).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["operation"]["import"]["format"], "plugin:qa-formatter");
    assert_eq!(env.examples(&imported.manifest.id)[1], crate::qa("two", "2"));

    // CSV rows reach the plugin as {column: value} objects.
    let p = env.file("qa.csv", "q,a\nthree,3\n");
    let imported = import_with(&env.store, &p, &ImportOptions::default(), &mut QaPlugin).unwrap();
    assert_eq!(env.examples(&imported.manifest.id)[0], crate::qa("three", "3"));

    let p = env.file("bad.jsonl", "{\"q\":\"one\",\"a\":\"1\"}\n{\"q\":\"two\"}\n");
    let err = import_with(&env.store, &p, &ImportOptions::default(), &mut QaPlugin).unwrap_err();
    assert_eq!(err.to_string(), "bad.jsonl line 2, field `a`: formatter rejected the record: needs an answer");
    assert_eq!(err.location().map(|l| (l.unit, l.number)), Some((Unit::Line, 2)));
}

#[test]
fn canonical_content_is_independent_of_source_formatting() {
    let env = Env::new();
    let (a, _) = import(&env, "a.jsonl", br#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"meta":{"b":1,"a":2}}"#).unwrap();
    let (b, _) = import(&env, "b.jsonl", br#"{ "meta" : {"a":2, "b":1}, "messages" : [ {"content":"q","role":"user"}, {"content":"a","role":"assistant"} ] }"#).unwrap();
    assert_eq!(a, b);
    let data = std::fs::read_to_string(env.store.version_dir(&a).join("data.jsonl")).unwrap();
    assert_eq!(data, "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}],\"meta\":{\"a\":2,\"b\":1}}\n");
}

#[test]
fn corrupt_parquet_is_a_clear_error() {
    let env = Env::new();
    let err = import(&env, "broken.parquet", b"PAR1 this is not really parquet").unwrap_err();
    match &err {
        DataError::Parquet { file, row: None, .. } => assert_eq!(file, "broken.parquet"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().starts_with("broken.parquet: Parquet error:"), "{err}");
    env.assert_empty();
}
