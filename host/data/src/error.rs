//! The crate's one error type. Every message says what was wrong and where (file, line or
//! row, field), so that a user can open the file and fix it.

use std::fmt;
use std::path::PathBuf;

use crate::store::DatasetRole;

/// Whether a location counts text lines (JSONL) or records (CSV, Parquet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Line,
    Row,
}

/// Where in an input file a record-level problem is: `file line 3, field `messages[1].content``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file's name as the user knows it (the upload's name, not a temporary path).
    pub file: String,
    pub unit: Unit,
    /// 1-based line (JSONL) or data row (CSV: the header is not a row; Parquet).
    pub number: u64,
    /// The field inside the record, as a path (`messages[1].content`, a CSV column name).
    pub field: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit {
            Unit::Line => "line",
            Unit::Row => "row",
        };
        write!(f, "{} {} {}", self.file, unit, self.number)?;
        if let Some(field) = &self.field {
            write!(f, ", field `{field}`")?;
        }
        Ok(())
    }
}

/// What was wrong with one record; [`RecordError`] adds the field and [`DataError::Record`]
/// the file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A required field is absent (or null).
    MissingField,
    /// A column named in the field mapping is not in the file.
    MissingColumn { available: Vec<String> },
    WrongType { expected: &'static str, found: &'static str },
    UnknownRole { role: String, allowed: &'static str },
    /// The last message is the training target and must come from the assistant.
    LastNotAssistant { role: String },
    NoMessages,
    /// The first record matches none of the formats that can be detected.
    UnknownFormat { keys: Vec<String> },
    /// A later record is of a different format than the one detected on the first record.
    FormatMismatch { detected: String, detected_at: u64, found: String },
    /// A formatter plugin rejected the record.
    Formatter { message: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::MissingField => write!(f, "missing field"),
            Problem::MissingColumn { available } => {
                write!(f, "no such column; the file has columns: {}", available.join(", "))
            }
            Problem::WrongType { expected, found } => {
                write!(f, "wrong type: expected {expected}, found {found}")
            }
            Problem::UnknownRole { role, allowed } => {
                write!(f, "unknown role {role:?} (allowed: {allowed})")
            }
            Problem::LastNotAssistant { role } => write!(
                f,
                "the last message must be the assistant's answer (the training target), but it is from {role:?}"
            ),
            Problem::NoMessages => write!(f, "the example has no messages"),
            Problem::UnknownFormat { keys } => write!(
                f,
                "cannot tell the format from the keys [{}]: expected `messages` (OpenAI chat), \
                 `prompt`+`completion`, `instruction`+`output` (Alpaca) or `conversations` (ShareGPT)",
                keys.join(", ")
            ),
            Problem::FormatMismatch { detected, detected_at, found } => write!(
                f,
                "record looks like {found}, but the file was detected as {detected} from its first record (line {detected_at}); every record must have the same format"
            ),
            Problem::Formatter { message } => write!(f, "formatter rejected the record: {message}"),
        }
    }
}

/// A problem with one field of one record, before the importer adds the file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub field: Option<String>,
    pub problem: Problem,
}

impl RecordError {
    pub fn new(field: impl Into<String>, problem: Problem) -> Self {
        RecordError { field: Some(field.into()), problem }
    }

    pub fn whole(problem: Problem) -> Self {
        RecordError { field: None, problem }
    }

    pub fn missing(field: impl Into<String>) -> Self {
        Self::new(field, Problem::MissingField)
    }

    pub fn wrong_type(field: impl Into<String>, expected: &'static str, found: &serde_json::Value) -> Self {
        Self::new(field, Problem::WrongType { expected, found: json_type_name(found) })
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.problem),
            None => write!(f, "{}", self.problem),
        }
    }
}

impl std::error::Error for RecordError {}

/// The JSON type of a value, as a user reads it in an error message.
pub fn json_type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Every error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{file} line {line}: invalid UTF-8 at byte offset {offset} (column {column}); save the file as UTF-8")]
    InvalidUtf8 { file: String, line: u64, column: u64, offset: u64 },

    #[error("{file} line {line}, column {column}: invalid JSON: {message}")]
    InvalidJson { file: String, line: u64, column: u64, message: String },

    #[error("{file} line {line}: line is longer than the limit of {limit} bytes")]
    LineTooLong { file: String, line: u64, limit: usize },

    #[error("{file} row {row} (line {line}): has {found} fields but the header has {expected}")]
    RaggedRow { file: String, row: u64, line: u64, expected: usize, found: usize },

    #[error("{file}: no records (the file is empty or has only blank lines or a header)")]
    NoRecords { file: String },

    #[error("{at}: {problem}")]
    Record { at: Location, problem: Problem },

    #[error("{file} row {row}: CSV error: {message}")]
    Csv { file: String, row: u64, message: String },

    #[error("{file}{}: Parquet error: {message}", row.map(|r| format!(" row {r}")).unwrap_or_default())]
    Parquet { file: String, row: Option<u64>, message: String },

    #[error("dataset version {id} not found")]
    VersionNotFound { id: String },

    #[error("dataset version {id}: expected role {expected}, found {found}")]
    WrongRole { id: String, expected: DatasetRole, found: DatasetRole },

    #[error("{}{}: corrupt dataset version: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    CorruptVersion { path: PathBuf, line: Option<u64>, message: String },

    #[error("no dataset name or version {name:?}")]
    UnknownRef { name: String },

    #[error("invalid dataset name {name:?}: use letters, digits and . _ - / (not starting with . or /)")]
    InvalidRefName { name: String },

    #[error("invalid parameter `{name}`: {message}")]
    InvalidParameter { name: &'static str, message: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    /// The location of a record-level error, if this is one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            DataError::Record { at, .. } => Some(at),
            _ => None,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
