//! Import: stream a JSONL, CSV or Parquet file into a new dataset version.
//!
//! A source yields raw records (a JSON object per JSONL line; a `{column: value}` object per
//! CSV or Parquet row) and a [`RecordFormatter`] turns each into an [`Example`]. The default,
//! [`AutoDetect`], detects the format from the first non-empty record (OpenAI chat,
//! prompt/completion, Alpaca, ShareGPT) and requires every later record to match it;
//! [`ColumnMapping`] maps named CSV/Parquet columns; the host plugs its WebAssembly formatter
//! in through the same trait. Canonical lines go straight to the version's temporary file
//! while they are hashed, so memory does not grow with the file, and a failure anywhere
//! leaves no version behind.
//!
//! JSONL lines are read through a bounded reader: a line longer than
//! [`ImportOptions::max_line_bytes`] fails after at most that many bytes are buffered. A UTF-8
//! byte-order mark and CRLF line endings are accepted transparently.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Location, Problem, RecordError, Result, Unit, json_type_name};
use crate::example::{Example, Message, Role};
use crate::store::{DatasetRole, Manifest, Operation, Datasets};
use lathe_util::hex;

/// The default cap on one JSONL line (or one physical CSV line).
pub const DEFAULT_MAX_LINE_BYTES: usize = 8 << 20;

/// The container of a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Jsonl,
    Csv,
    Parquet,
}

impl SourceKind {
    /// From the file extension: `.csv`, `.parquet`/`.pq`, anything else is JSONL.
    pub fn from_path(path: &Path) -> SourceKind {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("csv") => SourceKind::Csv,
            Some("parquet" | "pq") => SourceKind::Parquet,
            _ => SourceKind::Jsonl,
        }
    }
}

/// The record format of a source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Format {
    /// `{"messages": [{"role", "content"}, ...]}`
    OpenAiChat,
    /// `{"prompt", "completion"}`
    PromptCompletion,
    /// `{"instruction", "input"?, "output", "system"?}`
    Alpaca,
    /// `{"conversations": [{"from": human|gpt|system, "value"}]}`
    ShareGpt,
    /// CSV/Parquet columns named by a [`FieldMapping`].
    Columns,
    /// A formatter plugin, by name.
    Plugin(String),
}

impl Format {
    pub fn as_str(&self) -> &str {
        match self {
            Format::OpenAiChat => "openai_chat",
            Format::PromptCompletion => "prompt_completion",
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
            Format::Columns => "columns",
            Format::Plugin(name) => name,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Plugin(name) => write!(f, "plugin:{name}"),
            other => f.write_str(other.as_str()),
        }
    }
}

impl From<Format> for String {
    fn from(f: Format) -> String {
        f.to_string()
    }
}

impl TryFrom<String> for Format {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Format, String> {
        Ok(match s.as_str() {
            "openai_chat" => Format::OpenAiChat,
            "prompt_completion" => Format::PromptCompletion,
            "alpaca" => Format::Alpaca,
            "sharegpt" => Format::ShareGpt,
            "columns" => Format::Columns,
            other => match other.strip_prefix("plugin:") {
                Some(name) => Format::Plugin(name.to_string()),
                None => return Err(format!("unknown format {other:?}")),
            },
        })
    }
}

/// Which CSV/Parquet columns hold what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldMapping {
    /// The user's prompt text.
    pub prompt: String,
    /// The assistant's answer (the training target).
    pub completion: String,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
}

impl FieldMapping {
    pub fn new(prompt: impl Into<String>, completion: impl Into<String>) -> Self {
        FieldMapping { prompt: prompt.into(), completion: completion.into(), system: None, label: None }
    }

    pub fn with_system(mut self, column: impl Into<String>) -> Self {
        self.system = Some(column.into());
        self
    }

    pub fn with_label(mut self, column: impl Into<String>) -> Self {
        self.label = Some(column.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// A JSONL line (or a physical CSV line) longer than this fails the import.
    pub max_line_bytes: usize,
    /// The name used in errors and the manifest (e.g. the uploaded file's name); defaults to
    /// the path's file name.
    pub source_name: Option<String>,
    /// The container; defaults to [`SourceKind::from_path`].
    pub kind: Option<SourceKind>,
    /// For CSV/Parquet: which columns hold what. Without one, the columns are detected like
    /// JSONL keys (`prompt`/`completion`, `instruction`/`output`).
    pub mapping: Option<FieldMapping>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { max_line_bytes: DEFAULT_MAX_LINE_BYTES, source_name: None, kind: None, mapping: None }
    }
}

impl ImportOptions {
    pub fn with_mapping(mapping: FieldMapping) -> Self {
        ImportOptions { mapping: Some(mapping), ..Self::default() }
    }
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportReport {
    pub source: String,
    pub container: SourceKind,
    pub format: Format,
    pub rows: u64,
    /// Blank lines skipped (JSONL).
    pub blank_lines: u64,
    pub source_bytes: u64,
    pub source_sha256: String,
}

#[derive(Debug, Clone)]
pub struct Imported {
    pub manifest: Manifest,
    pub report: ImportReport,
}

/// Turns one raw record (a JSON object, or a CSV/Parquet row as `{column: value}`) into an
/// example. The host implements it over the WebAssembly formatter plugin.
pub trait RecordFormatter {
    fn format(&mut self, record: Value) -> std::result::Result<Example, RecordError>;

    /// The format of the records seen so far (called after the first record).
    fn format_name(&self) -> Format;
}

/// Imports `path` into `store` with the built-in formatters: [`ColumnMapping`] when options
/// carry a mapping (CSV/Parquet), else [`AutoDetect`].
pub fn import_file(store: &Datasets, path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let kind = opts.kind.unwrap_or_else(|| SourceKind::from_path(path));
    match (&opts.mapping, kind) {
        (Some(m), SourceKind::Csv | SourceKind::Parquet) => import_with(store, path, opts, &mut ColumnMapping::new(m.clone())),
        _ => import_with(store, path, opts, &mut AutoDetect::default()),
    }
}

/// Imports `path` into `store`, each record through `formatter`.
pub fn import_with<F: RecordFormatter + ?Sized>(
    store: &Datasets,
    path: &Path,
    opts: &ImportOptions,
    formatter: &mut F,
) -> Result<Imported> {
    let kind = opts.kind.unwrap_or_else(|| SourceKind::from_path(path));
    let file_name = opts
        .source_name
        .clone()
        .unwrap_or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string()));
    let unit = if kind == SourceKind::Jsonl { Unit::Line } else { Unit::Row };
    let mut writer = store.writer()?;
    let mut first_at: Option<u64> = None;

    let mut on_record = |number: u64, record: Value| -> Result<ControlFlow<()>> {
        let first = *first_at.get_or_insert(number);
        let at = |field: Option<String>| Location { file: file_name.clone(), unit, number, field };
        let ex = formatter.format(record).and_then(|ex| ex.validate().map(|()| ex)).map_err(|e| {
            let problem = match e.problem {
                Problem::FormatMismatch { detected, found, .. } => Problem::FormatMismatch { detected, found, detected_at: first },
                p => p,
            };
            DataError::Record { at: at(e.field), problem }
        })?;
        writer.push(&ex).map(|()| ControlFlow::Continue(()))
    };

    let stats = match kind {
        SourceKind::Jsonl => read_jsonl(path, &file_name, opts.max_line_bytes, &mut on_record)?,
        SourceKind::Csv => read_csv(path, &file_name, opts.max_line_bytes, &mut on_record)?,
        SourceKind::Parquet => read_parquet(path, &file_name, &mut on_record)?,
    };
    if writer.rows() == 0 {
        return Err(DataError::NoRecords { file: file_name });
    }
    let report = ImportReport {
        source: file_name.clone(),
        container: kind,
        format: formatter.format_name(),
        rows: writer.rows(),
        blank_lines: stats.blank_lines,
        source_bytes: stats.bytes,
        source_sha256: stats.sha256,
    };
    let operation = Operation::Import {
        source: file_name,
        container: kind,
        format: report.format.clone(),
        source_sha256: report.source_sha256.clone(),
    };
    let summary = serde_json::to_value(&report).expect("reports serialise");
    let manifest = writer.seal()?.commit(store, None, operation, DatasetRole::Full, summary)?;
    Ok(Imported { manifest, report })
}

/// The first records of a source, read before importing it: what the importer would
/// detect, and for CSV/Parquet the columns and a suggested mapping, so that a person can
/// check or change them first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    pub container: SourceKind,
    /// The format detected from the first record's keys (`None`: a mapping is needed).
    pub format: Option<Format>,
    /// The keys or columns seen, sorted.
    pub columns: Vec<String>,
    /// A guess at which columns hold what, when no format is detected.
    pub mapping: Option<FieldMapping>,
    pub records: Vec<Value>,
}

/// Reads the first `limit` records of `path` (JSONL, CSV or Parquet by its extension, or
/// `kind`) without importing anything.
pub fn preview(path: &Path, source_name: &str, kind: Option<SourceKind>, limit: usize) -> Result<Preview> {
    let kind = kind.unwrap_or_else(|| SourceKind::from_path(path));
    let mut records = Vec::new();
    let mut on_record = |_: u64, record: Value| -> Result<ControlFlow<()>> {
        records.push(record);
        Ok(if records.len() >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
    };
    match kind {
        SourceKind::Jsonl => read_jsonl(path, source_name, DEFAULT_MAX_LINE_BYTES, &mut on_record)?,
        SourceKind::Csv => read_csv(path, source_name, DEFAULT_MAX_LINE_BYTES, &mut on_record)?,
        SourceKind::Parquet => read_parquet(path, source_name, &mut on_record)?,
    };
    let columns: Vec<String> = records
        .iter()
        .flat_map(|r| r.as_object().into_iter().flat_map(|o| o.keys().cloned()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let format = records.first().and_then(Value::as_object).and_then(AutoDetect::detect);
    let mapping = if format.is_none() { suggest_mapping(&columns) } else { None };
    Ok(Preview { container: kind, format, columns, mapping, records })
}

/// Columns named like a prompt and a completion (`question`/`answer`, `input`/`output`, …).
fn suggest_mapping(columns: &[String]) -> Option<FieldMapping> {
    let find = |names: &[&str]| columns.iter().find(|c| names.contains(&c.to_lowercase().as_str())).cloned();
    let prompt = find(&["prompt", "question", "input", "text", "query", "instruction", "source"])?;
    let completion = find(&["completion", "answer", "output", "response", "target", "summary"])?;
    Some(FieldMapping { prompt, completion, system: find(&["system", "system_prompt"]), label: find(&["label", "category", "class"]) })
}

struct SourceStats {
    bytes: u64,
    sha256: String,
    blank_lines: u64,
}

/// Called with each record and its line or row number; `Break` stops reading (a preview).
type OnRecord<'a> = dyn FnMut(u64, Value) -> Result<ControlFlow<()>> + 'a;

// ---------------------------------------------------------------------------------------
// JSONL

/// Reads lines of at most `cap` bytes without ever buffering more than that.
pub struct BoundedLines<R> {
    inner: R,
    buf: Vec<u8>,
    cap: usize,
    line: u64,
    offset: u64,
    hasher: Sha256,
}

/// One line: its 1-based number, the byte offset of its first byte, and its bytes without
/// the line ending (and without a leading byte-order mark on line 1).
pub struct Line<'a> {
    pub number: u64,
    pub offset: u64,
    pub bytes: &'a [u8],
}

/// Why [`BoundedLines`] stopped.
#[derive(Debug)]
pub enum LineError {
    TooLong { line: u64 },
    Io(io::Error),
}

impl<R: BufRead> BoundedLines<R> {
    pub fn new(inner: R, cap: usize) -> Self {
        BoundedLines { inner, buf: Vec::new(), cap, line: 0, offset: 0, hasher: Sha256::new() }
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// The sha256 of everything read (meaningful once the input is exhausted).
    pub fn sha256(self) -> String {
        hex(&self.hasher.finalize())
    }

    pub fn next_line(&mut self) -> std::result::Result<Option<Line<'_>>, LineError> {
        self.buf.clear();
        let start = self.offset;
        let mut saw_newline = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LineError::Io(e)),
            };
            if avail.is_empty() {
                break;
            }
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            // The line's content excludes "\n" and a "\r" before it; allow one extra byte
            // for that "\r".
            if self.buf.len() + take > self.cap + 1 {
                return Err(LineError::TooLong { line: self.line + 1 });
            }
            self.buf.extend_from_slice(&avail[..take]);
            let consumed = if done { take + 1 } else { take };
            self.hasher.update(&avail[..consumed]);
            self.inner.consume(consumed);
            self.offset += consumed as u64;
            if done {
                saw_newline = true;
                break;
            }
        }
        if !saw_newline && self.buf.is_empty() {
            return Ok(None);
        }
        self.line += 1;
        let mut bytes: &[u8] = &self.buf;
        let mut offset = start;
        if let Some(rest) = bytes.strip_suffix(b"\r") {
            bytes = rest;
        }
        if bytes.len() > self.cap {
            return Err(LineError::TooLong { line: self.line });
        }
        if self.line == 1
            && let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF")
        {
            bytes = rest;
            offset += 3;
        }
        Ok(Some(Line { number: self.line, offset, bytes }))
    }
}

fn read_jsonl(path: &Path, file: &str, cap: usize, on_record: &mut OnRecord<'_>) -> Result<SourceStats> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut lines = BoundedLines::new(BufReader::with_capacity(1 << 16, f), cap);
    let mut blank_lines = 0;
    loop {
        let line = match lines.next_line() {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(LineError::TooLong { line }) => return Err(DataError::LineTooLong { file: file.to_string(), line, limit: cap }),
            Err(LineError::Io(e)) => return Err(DataError::io(path, e)),
        };
        let text = std::str::from_utf8(line.bytes).map_err(|e| DataError::InvalidUtf8 {
            file: file.to_string(),
            line: line.number,
            column: e.valid_up_to() as u64 + 1,
            offset: line.offset + e.valid_up_to() as u64,
        })?;
        if text.trim().is_empty() {
            blank_lines += 1;
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| DataError::InvalidJson {
            file: file.to_string(),
            line: line.number,
            column: e.column() as u64,
            message: json_error_message(&e),
        })?;
        let number = line.number;
        if on_record(number, value)?.is_break() {
            break;
        }
    }
    let bytes = lines.bytes_read();
    Ok(SourceStats { bytes, sha256: lines.sha256(), blank_lines })
}

/// serde_json's message without its " at line 1 column 7" suffix (the line is ours).
fn json_error_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

// ---------------------------------------------------------------------------------------
// CSV

/// Why the checked source reader stopped; carried through csv's io::Error.
#[derive(Debug, Clone)]
enum SourceFault {
    TooLong { line: u64 },
    InvalidUtf8 { line: u64, column: u64, offset: u64 },
}

impl fmt::Display for SourceFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for SourceFault {}

/// A reader that strips a leading byte-order mark, hashes every byte, counts lines, caps
/// line length and validates UTF-8 across chunk boundaries, so that errors carry exact
/// lines and byte offsets whatever parser reads through it.
struct CheckedReader<R> {
    inner: R,
    hasher: Sha256,
    offset: u64,
    line: u64,
    /// Bytes since the last newline.
    run: usize,
    cap: usize,
    /// An incomplete UTF-8 sequence at the end of the previous chunk.
    pending: Vec<u8>,
    fault: Option<SourceFault>,
}

impl<R: BufRead> CheckedReader<R> {
    fn new(mut inner: R, cap: usize) -> io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut offset = 0;
        if inner.fill_buf()?.starts_with(b"\xEF\xBB\xBF") {
            hasher.update(b"\xEF\xBB\xBF");
            inner.consume(3);
            offset = 3;
        }
        Ok(CheckedReader { inner, hasher, offset, line: 1, run: 0, cap, pending: Vec::new(), fault: None })
    }

    fn fail(&mut self, fault: SourceFault) -> io::Error {
        self.fault = Some(fault.clone());
        io::Error::other(fault)
    }

    /// Line and column (1-based) of byte `i` of `data`, given the state before `data`.
    fn position_in(&self, data: &[u8], i: usize) -> (u64, u64) {
        let before = &data[..i];
        match before.iter().rposition(|&b| b == b'\n') {
            Some(nl) => (self.line + before.iter().filter(|&&b| b == b'\n').count() as u64, (i - nl) as u64),
            None => (self.line, (self.run + i + 1) as u64),
        }
    }
}

impl<R: BufRead> Read for CheckedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(f) = self.fault.clone() {
            return Err(io::Error::other(f));
        }
        let n = self.inner.read(buf)?;
        let data = &buf[..n];
        if n == 0 {
            if !self.pending.is_empty() {
                let (line, column) = (self.line, (self.run + 1 - self.pending.len()) as u64);
                let offset = self.offset - self.pending.len() as u64;
                return Err(self.fail(SourceFault::InvalidUtf8 { line, column, offset }));
            }
            return Ok(0);
        }
        // UTF-8, continuing any sequence split at the previous chunk's end.
        let joined;
        let (check, shift): (&[u8], usize) = if self.pending.is_empty() {
            (data, 0)
        } else {
            joined = [self.pending.as_slice(), data].concat();
            (&joined, self.pending.len())
        };
        match std::str::from_utf8(check) {
            Ok(_) => self.pending.clear(),
            Err(e) if e.error_len().is_none() => self.pending = check[e.valid_up_to()..].to_vec(),
            Err(e) => {
                let bad = e.valid_up_to();
                let offset = self.offset - shift as u64 + bad as u64;
                let (line, column) = if bad >= shift {
                    self.position_in(data, bad - shift)
                } else {
                    (self.line, (self.run + 1 + bad - shift) as u64)
                };
                return Err(self.fail(SourceFault::InvalidUtf8 { line, column, offset }));
            }
        }
        // Line lengths.
        let mut seg_start = 0;
        for (i, &b) in data.iter().enumerate() {
            if b == b'\n' {
                if self.run + (i - seg_start) > self.cap + 1 {
                    let line = self.line;
                    return Err(self.fail(SourceFault::TooLong { line }));
                }
                self.line += 1;
                self.run = 0;
                seg_start = i + 1;
            }
        }
        self.run += n - seg_start;
        if self.run > self.cap + 1 {
            let line = self.line;
            return Err(self.fail(SourceFault::TooLong { line }));
        }
        self.hasher.update(data);
        self.offset += n as u64;
        Ok(n)
    }
}

fn csv_error(e: csv::Error, path: &Path, file: &str, cap: usize, row: u64) -> DataError {
    if let csv::ErrorKind::Io(io) = e.kind()
        && let Some(fault) = io.get_ref().and_then(|inner| inner.downcast_ref::<SourceFault>())
    {
        return match fault.clone() {
            SourceFault::TooLong { line } => DataError::LineTooLong { file: file.to_string(), line, limit: cap },
            SourceFault::InvalidUtf8 { line, column, offset } => {
                DataError::InvalidUtf8 { file: file.to_string(), line, column, offset }
            }
        };
    }
    match e.into_kind() {
        csv::ErrorKind::Io(io) => DataError::io(path, io),
        other => DataError::Csv { file: file.to_string(), row, message: format!("{other:?}") },
    }
}

fn read_csv(path: &Path, file: &str, cap: usize, on_record: &mut OnRecord<'_>) -> Result<SourceStats> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let checked = CheckedReader::new(BufReader::with_capacity(1 << 16, f), cap).map_err(|e| DataError::io(path, e))?;
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(checked);
    let headers: Vec<String> = rdr
        .byte_headers()
        .map_err(|e| csv_error(e, path, file, cap, 0))?
        .iter()
        // The checked reader has validated UTF-8 already.
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .collect();
    let mut record = csv::ByteRecord::new();
    let mut row = 0u64;
    loop {
        match rdr.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_error(e, path, file, cap, row + 1)),
        }
        row += 1;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        if record.len() != headers.len() {
            return Err(DataError::RaggedRow {
                file: file.to_string(),
                row,
                line,
                expected: headers.len(),
                found: record.len(),
            });
        }
        let mut obj = Map::with_capacity(headers.len());
        for (h, v) in headers.iter().zip(record.iter()) {
            obj.insert(h.clone(), Value::String(String::from_utf8_lossy(v).into_owned()));
        }
        if on_record(row, Value::Object(obj))?.is_break() {
            break;
        }
    }
    let checked = rdr.into_inner();
    if headers.is_empty() && row == 0 {
        return Err(DataError::NoRecords { file: file.to_string() });
    }
    Ok(SourceStats { bytes: checked.offset, sha256: hex(&checked.hasher.finalize()), blank_lines: 0 })
}

// ---------------------------------------------------------------------------------------
// Parquet

fn read_parquet(path: &Path, file: &str, on_record: &mut OnRecord<'_>) -> Result<SourceStats> {
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let (bytes, sha256) = hash_file(path)?;
    if bytes == 0 {
        return Err(DataError::NoRecords { file: file.to_string() });
    }
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let perr = |row: Option<u64>, e: parquet::errors::ParquetError| DataError::Parquet {
        file: file.to_string(),
        row,
        message: e.to_string(),
    };
    let reader = SerializedFileReader::new(f).map_err(|e| perr(None, e))?;
    let rows = reader.get_row_iter(None).map_err(|e| perr(None, e))?;
    for (i, row) in rows.enumerate() {
        let number = i as u64 + 1;
        let row = row.map_err(|e| perr(Some(number), e))?;
        let obj: Map<String, Value> = row.get_column_iter().map(|(k, v)| (k.clone(), parquet_value(v))).collect();
        if on_record(number, Value::Object(obj))?.is_break() {
            break;
        }
    }
    Ok(SourceStats { bytes, sha256, blank_lines: 0 })
}

fn parquet_value(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(n) => Value::from(*n),
        F::Short(n) => Value::from(*n),
        F::Int(n) => Value::from(*n),
        F::Long(n) => Value::from(*n),
        F::UByte(n) => Value::from(*n),
        F::UShort(n) => Value::from(*n),
        F::UInt(n) => Value::from(*n),
        F::ULong(n) => Value::from(*n),
        F::Float16(n) => float_value(f64::from(*n)),
        F::Float(n) => float_value(*n as f64),
        F::Double(n) => float_value(*n),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Null,
        },
        F::Date(n) | F::TimeMillis(n) => Value::from(*n),
        F::TimeMicros(n) | F::TimestampMillis(n) | F::TimestampMicros(n) => Value::from(*n),
        F::Decimal(_) => Value::String(f.to_string()),
        F::Group(row) => Value::Object(row.get_column_iter().map(|(k, v)| (k.clone(), parquet_value(v))).collect()),
        F::ListInternal(list) => Value::Array(list.elements().iter().map(parquet_value).collect()),
        F::MapInternal(map) => Value::Array(
            map.entries().iter().map(|(k, v)| Value::Array(vec![parquet_value(k), parquet_value(v)])).collect(),
        ),
    }
}

fn float_value(x: f64) -> Value {
    serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&h.finalize())))
}

// ---------------------------------------------------------------------------------------
// Formatters

/// Detects the format from the first record's keys and parses every record with it.
#[derive(Debug, Default)]
pub struct AutoDetect {
    detected: Option<Format>,
}

impl AutoDetect {
    /// The format whose marker key the record has, if any.
    pub fn detect(record: &Map<String, Value>) -> Option<Format> {
        if record.contains_key("messages") {
            Some(Format::OpenAiChat)
        } else if record.contains_key("conversations") {
            Some(Format::ShareGpt)
        } else if record.contains_key("instruction") {
            Some(Format::Alpaca)
        } else if record.contains_key("prompt") {
            Some(Format::PromptCompletion)
        } else {
            None
        }
    }
}

impl RecordFormatter for AutoDetect {
    fn format(&mut self, record: Value) -> std::result::Result<Example, RecordError> {
        let Value::Object(mut obj) = record else {
            return Err(RecordError::whole(Problem::WrongType { expected: "a JSON object", found: json_type_name(&record) }));
        };
        let found = Self::detect(&obj);
        let format = match (&self.detected, found) {
            (None, Some(f)) => {
                self.detected = Some(f.clone());
                f
            }
            (None, None) => {
                // Sorted: serde_json's map keeps document order in builds where another
                // crate (llguidance) turns on `preserve_order`.
                let mut keys: Vec<String> = obj.keys().cloned().collect();
                keys.sort();
                return Err(RecordError::whole(Problem::UnknownFormat { keys }));
            }
            (Some(d), Some(f)) if *d != f => {
                return Err(RecordError::whole(Problem::FormatMismatch {
                    detected: d.to_string(),
                    detected_at: 0,
                    found: f.to_string(),
                }));
            }
            (Some(d), _) => d.clone(),
        };
        let mut ex = match format {
            Format::OpenAiChat => openai_chat(&mut obj)?,
            Format::ShareGpt => sharegpt(&mut obj)?,
            Format::Alpaca => alpaca(&mut obj)?,
            _ => prompt_completion(&mut obj)?,
        };
        ex.label = take_label(&mut obj, "label")?;
        ex.meta = into_meta(obj);
        Ok(ex)
    }

    fn format_name(&self) -> Format {
        self.detected.clone().unwrap_or(Format::OpenAiChat)
    }
}

/// Maps named columns of a CSV/Parquet row to an example. Unmapped columns go to `meta`.
#[derive(Debug, Clone)]
pub struct ColumnMapping {
    mapping: FieldMapping,
}

impl ColumnMapping {
    pub fn new(mapping: FieldMapping) -> Self {
        ColumnMapping { mapping }
    }
}

impl RecordFormatter for ColumnMapping {
    fn format(&mut self, record: Value) -> std::result::Result<Example, RecordError> {
        let Value::Object(mut obj) = record else {
            return Err(RecordError::whole(Problem::WrongType { expected: "a row", found: json_type_name(&record) }));
        };
        let m = &self.mapping;
        for col in [Some(&m.prompt), Some(&m.completion), m.system.as_ref(), m.label.as_ref()].into_iter().flatten() {
            if !obj.contains_key(col) {
                return Err(RecordError::new(
                    col.clone(),
                    Problem::MissingColumn { available: obj.keys().cloned().collect() },
                ));
            }
        }
        let system = match &m.system {
            Some(c) => optional_string(&mut obj, c)?,
            None => None,
        };
        let prompt = required_string(&mut obj, &m.prompt)?;
        let completion = required_string(&mut obj, &m.completion)?;
        let label = match &m.label {
            Some(c) => take_label(&mut obj, c)?,
            None => None,
        };
        let mut ex = Example::prompt_completion(system.as_deref(), &prompt, &completion);
        ex.label = label;
        ex.meta = into_meta(obj);
        Ok(ex)
    }

    fn format_name(&self) -> Format {
        Format::Columns
    }
}

fn required_string(obj: &mut Map<String, Value>, key: &str) -> std::result::Result<String, RecordError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Err(RecordError::missing(key)),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(RecordError::wrong_type(key, "a string", &other)),
    }
}

/// A string field that may be absent, null or empty (all meaning "none").
fn optional_string(obj: &mut Map<String, Value>, key: &str) -> std::result::Result<Option<String>, RecordError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(RecordError::wrong_type(key, "a string", &other)),
    }
}

/// A label may be a string, a number or a boolean; it is kept as text.
fn take_label(obj: &mut Map<String, Value>, key: &str) -> std::result::Result<Option<String>, RecordError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(other) => Err(RecordError::wrong_type(key, "a string, number or boolean", &other)),
    }
}

/// The record's remaining keys; a `meta` object is merged in rather than nested.
fn into_meta(mut obj: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Object(inner)) = obj.get("meta").cloned() {
        obj.remove("meta");
        for (k, v) in inner {
            obj.entry(k).or_insert(v);
        }
    }
    obj
}

fn openai_chat(obj: &mut Map<String, Value>) -> std::result::Result<Example, RecordError> {
    let list = match obj.remove("messages") {
        None | Some(Value::Null) => return Err(RecordError::missing("messages")),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(RecordError::wrong_type("messages", "an array", &other)),
    };
    let mut messages = Vec::with_capacity(list.len());
    let mut last_role = String::new();
    for (i, m) in list.into_iter().enumerate() {
        let Value::Object(mut m) = m else {
            return Err(RecordError::wrong_type(format!("messages[{i}]"), "an object", &m));
        };
        let role = match m.remove("role") {
            None | Some(Value::Null) => return Err(RecordError::missing(format!("messages[{i}].role"))),
            Some(Value::String(s)) => s,
            Some(other) => return Err(RecordError::wrong_type(format!("messages[{i}].role"), "a string", &other)),
        };
        let content = match m.remove("content") {
            None | Some(Value::Null) => return Err(RecordError::missing(format!("messages[{i}].content"))),
            Some(Value::String(s)) => s,
            Some(other) => return Err(RecordError::wrong_type(format!("messages[{i}].content"), "a string", &other)),
        };
        let Some(r) = Role::parse(&role) else {
            return Err(RecordError::new(
                format!("messages[{i}].role"),
                Problem::UnknownRole { role, allowed: Role::ALLOWED },
            ));
        };
        last_role = role;
        messages.push(Message { role: r, content });
    }
    match messages.last() {
        Some(m) if m.role != Role::Assistant => Err(RecordError::new(
            format!("messages[{}].role", messages.len() - 1),
            Problem::LastNotAssistant { role: last_role },
        )),
        None => Err(RecordError::new("messages", Problem::NoMessages)),
        Some(_) => Ok(Example::new(messages)),
    }
}

fn sharegpt(obj: &mut Map<String, Value>) -> std::result::Result<Example, RecordError> {
    let list = match obj.remove("conversations") {
        None | Some(Value::Null) => return Err(RecordError::missing("conversations")),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(RecordError::wrong_type("conversations", "an array", &other)),
    };
    let mut messages = Vec::with_capacity(list.len() + 1);
    if let Some(system) = optional_string(obj, "system")? {
        messages.push(Message::new(Role::System, system));
    }
    let mut last_from = String::new();
    let mut last_index = 0;
    for (i, m) in list.into_iter().enumerate() {
        let Value::Object(mut m) = m else {
            return Err(RecordError::wrong_type(format!("conversations[{i}]"), "an object", &m));
        };
        let from = match m.remove("from") {
            None | Some(Value::Null) => return Err(RecordError::missing(format!("conversations[{i}].from"))),
            Some(Value::String(s)) => s,
            Some(other) => return Err(RecordError::wrong_type(format!("conversations[{i}].from"), "a string", &other)),
        };
        let value = match m.remove("value") {
            None | Some(Value::Null) => return Err(RecordError::missing(format!("conversations[{i}].value"))),
            Some(Value::String(s)) => s,
            Some(other) => return Err(RecordError::wrong_type(format!("conversations[{i}].value"), "a string", &other)),
        };
        let role = match from.as_str() {
            "human" | "user" => Role::User,
            "gpt" | "assistant" => Role::Assistant,
            "system" => Role::System,
            _ => {
                return Err(RecordError::new(
                    format!("conversations[{i}].from"),
                    Problem::UnknownRole { role: from, allowed: "human, gpt, system" },
                ));
            }
        };
        last_from = from;
        last_index = i;
        messages.push(Message::new(role, value));
    }
    if last_from.is_empty() {
        return Err(RecordError::new("conversations", Problem::NoMessages));
    }
    if messages.last().is_some_and(|m| m.role != Role::Assistant) {
        return Err(RecordError::new(
            format!("conversations[{last_index}].from"),
            Problem::LastNotAssistant { role: last_from },
        ));
    }
    Ok(Example::new(messages))
}

fn alpaca(obj: &mut Map<String, Value>) -> std::result::Result<Example, RecordError> {
    let instruction = required_string(obj, "instruction")?;
    let input = optional_string(obj, "input")?;
    let output = required_string(obj, "output")?;
    let system = optional_string(obj, "system")?;
    let prompt = match input {
        Some(input) => format!("{instruction}\n\n{input}"),
        None => instruction,
    };
    Ok(Example::prompt_completion(system.as_deref(), &prompt, &output))
}

fn prompt_completion(obj: &mut Map<String, Value>) -> std::result::Result<Example, RecordError> {
    let prompt = required_string(obj, "prompt")?;
    let completion = required_string(obj, "completion")?;
    let system = optional_string(obj, "system")?;
    Ok(Example::prompt_completion(system.as_deref(), &prompt, &completion))
}
