//! Lathe's datasets: import, immutable content-addressed versions, curation and the
//! held-out split. Knows nothing of burn, WebAssembly, HTTP or SQL: the host plugs its
//! formatter and validator plugins in through [`RecordFormatter`] and [`OutputValidator`].
//!
//! ```no_run
//! use lathe_data::{Datasets, import_file, ImportOptions, curate, split};
//! # fn main() -> lathe_data::Result<()> {
//! let store = Datasets::open("/var/lib/lathe")?;
//! let v = import_file(&store, "tickets.jsonl".as_ref(), &ImportOptions::default())?;
//! let d = curate::dedupe(&store, &v.manifest.id, &curate::DedupeParams::default())?;
//! let s = split::split(&store, &d.manifest.id, &split::SplitParams::default())?;
//! let train = lathe_data::TrainingSet::open(&store, &s.train.id)?;
//! # Ok(()) }
//! ```

pub mod bench;
pub mod curate;
pub mod error;
pub mod example;
pub mod import;
pub mod pii;
pub mod split;
pub mod store;
pub mod text;
mod util;

pub use curate::{OutputValidator, TokenCounter};
pub use error::{DataError, Location, Problem, RecordError, Result, Unit};
pub use example::{Example, Message, Role};
pub use import::{FieldMapping, Format, ImportOptions, Preview, RecordFormatter, SourceKind, import_file, import_with, preview};
pub use store::{DatasetRole, HeldOut, Manifest, Operation, Datasets, TrainingSet, Version};
pub use text::NearDupParams;
