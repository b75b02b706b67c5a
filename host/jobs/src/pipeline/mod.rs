//! The workflow's pipelines. Each takes the environment, an owned, serializable spec that
//! names things by id or path, and a sink for its events, and returns a typed outcome.
//! The CLI runs them one per command and renders the events; the server runs them in its
//! workers and stores the events; `lathe demo` chains them.

pub mod data;
pub mod demo;
pub mod eval;
pub mod train;

use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::Result;
use crate::event::Sink;

/// Any pipeline as one job a queue can hold: its kind and its spec, serialised as
/// `{"kind": "train", "spec": {...}}`. Workers run it and store its outcome as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec", rename_all = "snake_case")]
pub enum Job {
    DataImport(data::ImportSpec),
    DataCurate(data::CurateSpec),
    DataSplit(data::SplitSpec),
    DataStats(data::StatsSpec),
    EvalRun(eval::EvalSpec),
    EvalBaseline(eval::BaselineSpec),
    EvalCompare(eval::CompareSpec),
    EvalReport(eval::ReportSpec),
    EvalRegression(eval::RegressionSpec),
    Train(train::TrainSpec),
    FineTune(train::FineTuneSpec),
    Export(train::ExportSpec),
    Demo(demo::DemoSpec),
}

impl Job {
    /// The kind as the queue stores it (`train`, `eval_run`).
    pub fn kind(&self) -> &'static str {
        match self {
            Job::DataImport(_) => "data_import",
            Job::DataCurate(_) => "data_curate",
            Job::DataSplit(_) => "data_split",
            Job::DataStats(_) => "data_stats",
            Job::EvalRun(_) => "eval_run",
            Job::EvalBaseline(_) => "eval_baseline",
            Job::EvalCompare(_) => "eval_compare",
            Job::EvalReport(_) => "eval_report",
            Job::EvalRegression(_) => "eval_regression",
            Job::Train(_) => "train",
            Job::FineTune(_) => "fine_tune",
            Job::Export(_) => "export",
            Job::Demo(_) => "demo",
        }
    }

    /// The folder a training job writes its checkpoints into and resumes from.
    pub fn run_dir(&self) -> Option<&std::path::Path> {
        match self {
            Job::Train(spec) => spec.out.as_deref(),
            Job::FineTune(spec) => Some(&spec.out),
            _ => None,
        }
    }

    /// Runs the pipeline; the outcome as JSON.
    pub fn run(&self, env: &Env, sink: &dyn Sink) -> Result<serde_json::Value> {
        fn json<T: Serialize>(r: Result<T>) -> Result<serde_json::Value> {
            r.map(|o| serde_json::to_value(o).expect("outcomes serialise"))
        }
        match self {
            Job::DataImport(s) => json(data::import(env, s, sink)),
            Job::DataCurate(s) => json(data::curate(env, s, sink)),
            Job::DataSplit(s) => json(data::split(env, s, sink)),
            Job::DataStats(s) => json(data::stats(env, s, sink)),
            Job::EvalRun(s) => json(eval::run(env, s, sink)),
            Job::EvalBaseline(s) => json(eval::baseline(env, s, sink)),
            Job::EvalCompare(s) => json(eval::compare(env, s, sink)),
            Job::EvalReport(s) => json(eval::report(env, s, sink)),
            Job::EvalRegression(s) => json(eval::regression(env, s, sink)),
            Job::Train(s) => json(train::train(env, s, sink)),
            Job::FineTune(s) => json(train::fine_tune(env, s, sink)),
            Job::Export(s) => json(train::export(env, s, sink)),
            Job::Demo(s) => json(demo::run(env, s, sink)),
        }
    }
}
