//! Renders a job's events in the terminal: steps as headed lines (a top-level step as
//! `== title`, nested ones indented), logs and results on stdout, progress as an indicatif
//! bar on stderr that shows the latest loss, learning rate and tokens/s while training.
//! Ctrl-C asks the running job to stop; a training run keeps its checkpoint.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lathe_jobs::{Event, Level, Sink};

pub struct Terminal {
    state: Mutex<State>,
    cancel: &'static AtomicBool,
}

#[derive(Default)]
struct State {
    /// Open steps, outermost first.
    open: Vec<String>,
    bar: Option<(String, ProgressBar)>,
    /// The latest value of each metric series.
    latest: HashMap<String, f64>,
}

static CANCEL: AtomicBool = AtomicBool::new(false);

impl Terminal {
    pub fn new() -> Self {
        // A second Ctrl-C while the job winds down ends the process at once.
        let _ = ctrlc::set_handler(|| {
            if CANCEL.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping: the job ends at its next checkpoint (Ctrl-C again to quit now)");
        });
        Self { state: Mutex::new(State::default()), cancel: &CANCEL }
    }
}

impl State {
    fn indent(&self) -> String {
        "  ".repeat(self.open.len().saturating_sub(1))
    }

    /// Prints a line above the bar, if one is drawn.
    fn line(&self, text: &str) {
        match &self.bar {
            Some((_, bar)) if !bar.is_hidden() => bar.suspend(|| println!("{text}")),
            _ => println!("{text}"),
        }
    }

    fn end_bar(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Sink for Terminal {
    fn emit(&self, event: Event) {
        let mut s = self.state.lock().expect("terminal lock");
        match event {
            Event::StepStarted { step, title } => {
                s.end_bar();
                let line = if s.open.is_empty() { format!("\n== {title}") } else { format!("{}▸ {title}", s.indent()) };
                s.open.push(step);
                s.line(&line);
            }
            Event::StepFinished { step, summary } => {
                s.end_bar();
                if let Some(i) = s.open.iter().rposition(|o| *o == step) {
                    s.open.truncate(i + 1);
                }
                let line = format!("{}  {summary}", s.indent());
                s.line(&line);
                s.open.pop();
            }
            Event::Progress { step, done, total, unit } => {
                if s.bar.as_ref().is_none_or(|(st, _)| *st != step) {
                    s.end_bar();
                    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                    bar.set_style(
                        ProgressStyle::with_template(&format!("{{prefix}}[{{bar:24}}] {{pos}}/{{len}} {unit} {{msg}} ETA {{eta}}"))
                            .expect("a valid template")
                            .progress_chars("=> "),
                    );
                    bar.set_prefix(format!("{}  ", s.indent()));
                    s.bar = Some((step.clone(), bar));
                }
                let msg = match (s.latest.get("train/loss"), s.latest.get("train/lr"), s.latest.get("train/tokens_per_s")) {
                    (Some(l), Some(lr), Some(t)) if unit == "steps" => format!("loss {l:.4} lr {lr:.2e} {t:.0} tok/s"),
                    _ => String::new(),
                };
                let (_, bar) = s.bar.as_ref().expect("just set");
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(msg);
                if done >= total {
                    s.end_bar();
                }
            }
            Event::Metric { series, x, value } => {
                if series.starts_with("validation/") {
                    let line = format!("{}  step {x}: {series} {value:.4}", s.indent());
                    s.line(&line);
                }
                s.latest.insert(series, value);
            }
            Event::Log { level, message } => {
                let line = match level {
                    Level::Info => format!("{}  {message}", s.indent()),
                    Level::Warn => format!("{}  warning: {message}", s.indent()),
                };
                s.line(&line);
            }
            Event::Artifact { kind, path } => {
                let line = format!("{}  {kind}: {path}", s.indent());
                s.line(&line);
            }
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}
