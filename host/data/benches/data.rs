//! `cargo bench -p lathe-data`: generates a synthetic JSONL file (ROWS, default 100 000) and
//! times import, statistics, dedupe, PII scan and split through `lathe_data::bench::run`,
//! printing the report as JSON. The same entry point backs `lathe bench data`.

fn main() {
    let rows: u64 = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temporary folder");
    let source = dir.path().join("bench.jsonl");
    lathe_data::bench::generate_jsonl(&source, rows, 42).expect("generate");
    let report = lathe_data::bench::run(&dir.path().join("store"), &source, &lathe_data::ImportOptions::default())
        .expect("bench run");
    println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
}
