//! What a running pipeline tells the world: one [`Event`] type sent to a [`Sink`]. The CLI
//! renders events as lines and progress bars; the server stores them in the job's event
//! table and streams them to browsers. A sink also carries the cancel flag, which
//! pipelines check between units of work.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{JobError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    Warn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A named step of a pipeline began (`data.import`, `baseline`, `train`).
    StepStarted { step: String, title: String },
    /// The step ended; `summary` is one line a person reads.
    StepFinished { step: String, summary: String },
    /// `done` of `total` units (`items`, `steps`) of the current step.
    Progress { step: String, done: u64, total: u64, unit: String },
    /// One point of a curve: `series` (`train/loss`, `train/lr`, `train/tokens_per_s`,
    /// `validation/<metric>`) at `x` (an optimizer step).
    Metric { series: String, x: u64, value: f64 },
    Log { level: Level, message: String },
    /// A file the pipeline wrote and keeps (`adapter`, `report`, `run`, `dataset`).
    Artifact { kind: String, path: String },
}

/// Where events go.
pub trait Sink: Send + Sync {
    fn emit(&self, event: Event);

    /// Whether the job was asked to stop. Pipelines check between units of work (a batch,
    /// an optimizer step) and end with [`JobError::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }

    /// A training checkpoint folder was just completed. A sink that keeps checkpoints
    /// beyond this machine (the server's worker, with an object store) stores it before
    /// returning, so that a job resumed elsewhere continues from it; an error stops the
    /// run. Nothing to do by default: the checkpoint stays in the run folder.
    fn checkpoint(&self, _dir: &std::path::Path) -> std::result::Result<(), String> {
        Ok(())
    }
}

impl dyn Sink + '_ {
    pub fn started(&self, step: &str, title: impl Into<String>) {
        self.emit(Event::StepStarted { step: step.into(), title: title.into() });
    }

    pub fn finished(&self, step: &str, summary: impl Into<String>) {
        self.emit(Event::StepFinished { step: step.into(), summary: summary.into() });
    }

    pub fn progress(&self, step: &str, done: usize, total: usize, unit: &str) {
        self.emit(Event::Progress { step: step.into(), done: done as u64, total: total as u64, unit: unit.into() });
    }

    pub fn metric(&self, series: &str, x: usize, value: f64) {
        self.emit(Event::Metric { series: series.into(), x: x as u64, value });
    }

    pub fn info(&self, message: impl Into<String>) {
        self.emit(Event::Log { level: Level::Info, message: message.into() });
    }

    pub fn warn(&self, message: impl Into<String>) {
        self.emit(Event::Log { level: Level::Warn, message: message.into() });
    }

    pub fn artifact(&self, kind: &str, path: &std::path::Path) {
        self.emit(Event::Artifact { kind: kind.into(), path: path.display().to_string() });
    }

    /// `Err(Cancelled)` once the job was asked to stop.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.cancelled() { Err(JobError::Cancelled) } else { Ok(()) }
    }
}

/// Drops every event (benchmarks, nested runs whose progress nobody reads).
pub struct NullSink;

impl Sink for NullSink {
    fn emit(&self, _: Event) {}
}

/// Keeps every event in memory, with a cancel switch: for tests and for callers that
/// read the events after the job.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    cancel: AtomicBool,
}

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("recorder lock").clone()
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

impl Sink for Recorder {
    fn emit(&self, event: Event) {
        self.events.lock().expect("recorder lock").push(event);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}
