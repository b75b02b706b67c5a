//! `lathe demo`: the workflow end to end on SmolLM2 and a generated invoice-extraction
//! task — eval suite first, data curated and split, the prompted baseline, a LoRA pilot,
//! the comparison with its verdict, and a report.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use lathe_data::curate::{DedupeParams, PiiMode};
use lathe_data::split::SplitParams;
use lathe_data::{ImportOptions, NearDupParams, Store};
use lathe_engine::train::{Schedule, TrainConfig};
use lathe_engine::{Adapter, LoraConfig};
use lathe_jobs::eval::report::{Report, RunSummary};
use lathe_jobs::eval::{self, Plugins, Subject};
use lathe_jobs::{demo, finetune};

use crate::cli::{Compute, DEFAULT_MODEL, DataDir, load};
use crate::train::{ProgressLine, duration, model_sha256};

#[derive(Args)]
pub struct DemoArgs {
    /// A GGUF file or Hugging Face folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Invoices generated for the task.
    #[arg(long, default_value_t = 160)]
    examples: usize,
    /// Held-out items evaluated (the first N of the held-out part).
    #[arg(long, default_value_t = 20)]
    eval_items: usize,
    /// Training epochs of the LoRA pilot.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Optimizer steps of the pilot (0: the whole epochs).
    #[arg(long, default_value_t = 16)]
    max_steps: usize,
    /// Learning rate of the pilot (a short pilot wants more than the 1e-4 default).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Skip the few-shot variants of the baseline (faster).
    #[arg(long)]
    zero_shot_only: bool,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    dir: DataDir,
}

fn stage(n: usize, title: &str) {
    println!("\n== {n}/6 {title}");
}

pub fn run(a: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let root = a.dir.path().join("demo");
    std::fs::create_dir_all(&root)?;
    let device = a.compute.setup()?;
    let m = load(&a.model, &device)?;
    let store = Store::open(&root)?;

    stage(1, "the task and its eval suite, before any training");
    let mut suite = demo::invoice_suite();
    if a.zero_shot_only {
        suite.shots = vec![0];
    }
    let suite_path = root.join("suite.json");
    std::fs::write(&suite_path, serde_json::to_string_pretty(&suite)?)?;
    println!(
        "suite `{}`: {} prompt templates, scorer {}, validator json-schema, gate {} ≥ {}  ({})",
        suite.name,
        suite.templates.len(),
        suite.scorers[0].plugin,
        suite.gate.as_ref().map_or("-", |g| g.metric.as_str()),
        suite.gate.as_ref().map_or(0.0, |g| g.min),
        suite_path.display()
    );

    stage(2, "data: import, curate, split");
    let raw = root.join("invoices.jsonl");
    demo::write_jsonl(&raw, &demo::invoice_examples(a.examples, a.seed))?;
    let imported = lathe_data::import_file(&store, &raw, &ImportOptions::default())?;
    println!(
        "imported {} rows ({}) → version {}",
        imported.report.rows,
        imported.report.format.as_str(),
        &imported.manifest.id[..16]
    );
    let deduped = lathe_data::curate::dedupe(&store, &imported.manifest.id, &DedupeParams::near(0.9))?;
    println!("dedupe: {}", deduped.report.summary());
    let scanned = lathe_data::curate::scan_pii(&store, &deduped.manifest.id, PiiMode::Redact)?;
    println!("pii: {}", scanned.report.summary());
    let split = lathe_data::split::split(
        &store,
        &scanned.manifest.id,
        &SplitParams {
            seed: a.seed,
            ..SplitParams::default()
        },
    )?;
    let train_set = lathe_data::TrainingSet::open(&store, &split.train.id)?;
    let held_set = lathe_data::HeldOut::open(&store, &split.heldout.id)?;
    let leak = lathe_data::split::check_leakage(&store, &train_set, &held_set, Some(&NearDupParams::default()))?;
    println!(
        "split: {} train ({}), {} held out ({}); leakage: {} exact, {} near",
        split.report.train_rows,
        &split.train.id[..16],
        split.report.heldout_rows,
        &split.heldout.id[..16],
        leak.exact.len(),
        leak.near.len()
    );
    store.set_ref("invoices.train", &split.train.id)?;
    store.set_ref("invoices.heldout", &split.heldout.id)?;
    let pool = eval::train_items(&store, &split.train.id)?;
    let mut items = eval::heldout_items(&store, &split.heldout.id)?;
    items.truncate(a.eval_items);

    stage(3, "the prompted baseline: every template, zero- and few-shot");
    let runtime = crate::plugin::runtime()?;
    let plugins = Plugins::load(&runtime, &suite)?;
    let base_subject = Subject::base(&m, a.model.display().to_string());
    let baseline = eval::baseline(&base_subject, &suite, &plugins, &pool, &items, Some(split.heldout.id.clone()), &mut crate::eval::trial_progress, &mut |t| {
        println!(
            "  {:<8} {}-shot: {} {:.3} [{:.3}, {:.3}]",
            t.template,
            t.shots,
            suite.primary_metric(),
            t.metric.mean,
            t.metric.ci_low,
            t.metric.ci_high
        )
    })?;
    let best = &baseline.best;
    println!("baseline = `{}` {}-shot: {:.3}", best.template, best.shots, best.primary());
    if best.passed_gate == Some(true) {
        println!("the prompted base model already clears the gate: ship the prompt (the demo trains anyway)");
    }

    stage(4, "LoRA pilot");
    let template = suite.templates.iter().find(|t| t.name == best.template).expect("the baseline's template is in the suite");
    let (train_items, validation) = finetune::validation_split(&pool, 0.1, 8);
    let config = TrainConfig {
        lora: LoraConfig {
            rank: a.rank,
            alpha: 2.0 * a.rank as f64,
            ..LoraConfig::default()
        },
        learning_rate: a.lr,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: 4,
        schedule: Schedule::Cosine,
        warmup_ratio: 0.1,
        seed: a.seed,
        patience: 2,
        ..TrainConfig::default()
    };
    let spec = finetune::Spec {
        model: &m.model,
        tokenizer: &m.tokenizer,
        model_name: a.model.display().to_string(),
        model_sha256: model_sha256(&a.model)?,
        suite: &suite,
        plugins: &plugins,
        template,
        config,
        dataset: split.train.id.clone(),
        metric_items: 0,
    };
    println!(
        "training on {} examples with template `{}` (LoRA r{}, all linear layers, lr {:.0e}, {} epoch(s), at most {} steps of 4); {} kept to watch the loss",
        train_items.len(),
        template.name,
        a.rank,
        a.lr,
        a.epochs,
        a.max_steps,
        validation.len()
    );
    let run_dir = root.join("runs").join(format!("pilot-{}", &split.train.id[..12]));
    let _ = std::fs::remove_dir_all(&run_dir);
    let bar = ProgressLine::new();
    let outcome = finetune::train(&spec, &train_items, &validation, &run_dir, false, &mut |p| bar.show("  ", p), &mut |_, _| {})?;
    let adapter = Adapter::load_peft(&outcome.adapter_dir, &m.model.config, &device)?;

    stage(5, "fine-tune vs baseline on the held-out items");
    let tuned_subject = base_subject.with_adapter(&adapter, outcome.adapter_dir.display().to_string());
    let tuned = eval::run(&tuned_subject, &suite, &plugins, template, &[], &items, Some(split.heldout.id.clone()), &mut |done, total| {
        crate::eval::trial_progress(&template.name, 0, done, total)
    })?;
    println!("fine-tune (0-shot, `{}`):", template.name);
    crate::eval::print_run(&tuned);
    let comparison = eval::compare(best, &tuned, &suite.primary_metric(), suite.margin)?;
    let d = &comparison.comparison.difference;
    println!(
        "verdict: {} — {} {:.3} → {:.3} ({:+.3}, 95 % CI {:+.3} … {:+.3}, p = {:.4})",
        comparison.comparison.verdict.as_str().to_uppercase(),
        suite.primary_metric(),
        best.primary(),
        tuned.primary(),
        d.mean,
        d.ci_low,
        d.ci_high,
        comparison.comparison.p_value
    );

    println!("regression pack (general ability), base vs fine-tune:");
    let forgetting = crate::eval::forgetting_check(&base_subject, &adapter, &outcome.adapter_dir.display().to_string(), 10, 0.0)?;

    stage(6, "report and artifacts");
    let runs_dir = eval::runs_dir(&root);
    std::fs::create_dir_all(&runs_dir)?;
    best.save(&runs_dir.join(format!("{}.json", best.id)))?;
    tuned.save(&runs_dir.join(format!("{}.json", tuned.id)))?;
    let report = Report {
        title: "Invoice fields: LoRA pilot vs prompted SmolLM2".into(),
        suite: suite.name.clone(),
        primary_metric: suite.primary_metric(),
        gate: suite.gate.clone(),
        runs: vec![RunSummary::of("baseline (best prompt)", best), RunSummary::of("LoRA pilot", &tuned)],
        baseline_trials: baseline.tried.clone(),
        comparison: Some(comparison),
        training: outcome.history.clone(),
        training_evals: outcome.evals.clone(),
        notes: vec![
            format!("train version {}, held-out version {}", split.train.id, split.heldout.id),
            format!("adapter (PEFT) in {}", outcome.adapter_dir.display()),
            format!(
                "regression pack: {}",
                forgetting
                    .tasks
                    .iter()
                    .map(|(t, c)| format!("{t} {:+.3} ({})", c.difference.mean, c.verdict.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ],
    };
    let (json, html) = crate::eval::write_report(&report, &root.join("report"))?;
    println!("report:  {}", html.display());
    println!("         {}", json.display());
    println!("adapter: {}", outcome.adapter_dir.display());
    println!("runs:    {}", runs_dir.display());
    println!("done in {}", duration(started.elapsed().as_secs_f64()));
    Ok(())
}
