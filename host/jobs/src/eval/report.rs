//! Reports: one JSON document, and one self-contained HTML page (inline CSS and SVG
//! charts, no scripts, nothing fetched) that a reviewer can open from disk or an email.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{JobError, Result};
use lathe_engine::train::{EvalRecord, StepRecord};
use serde::{Deserialize, Serialize};

use super::stats::{Comparison, Estimate};
use super::{BaselineTrial, EvalRun, RunComparison};

/// What a run's model was stored as: the weights' format (`Q8_0`, `Q4_1`, `F16`,
/// `safetensors`) and their size on disk, and the adapter's size when it ran through one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    pub format: String,
    pub bytes: u64,
    pub adapter_bytes: Option<u64>,
}

/// One step on the way from the prompted base model to what gets deployed (fine-tuning,
/// then quantizing), and what it changed on the primary metric, paired over the
/// held-out items.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepCost {
    pub step: String,
    /// The labels of the runs before and after the step.
    pub from: String,
    pub to: String,
    pub comparison: Comparison,
}

/// A run as the report lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub label: String,
    pub id: String,
    pub model: String,
    pub adapter: Option<String>,
    pub template: String,
    pub shots: usize,
    pub metrics: std::collections::BTreeMap<String, Estimate>,
    pub passed_gate: Option<bool>,
    pub examples_per_s: f64,
    #[serde(default)]
    pub weights: Option<Weights>,
    /// Plugin name → sha256 of what scored the run.
    #[serde(default)]
    pub plugins: std::collections::BTreeMap<String, String>,
    /// The scorers' set-level values ([`EvalRun::aggregates`]).
    #[serde(default)]
    pub aggregates: std::collections::BTreeMap<String, f64>,
}

impl RunSummary {
    pub fn of(label: &str, run: &EvalRun) -> Self {
        Self {
            label: label.into(),
            id: run.id.clone(),
            model: run.model.clone(),
            adapter: run.adapter.clone(),
            template: run.template.clone(),
            shots: run.shots,
            metrics: run.metrics.clone(),
            passed_gate: run.passed_gate,
            examples_per_s: run.examples_per_s,
            weights: None,
            plugins: run.plugins.clone(),
            aggregates: run.aggregates.clone(),
        }
    }

    pub fn with_weights(mut self, weights: Option<Weights>) -> Self {
        self.weights = weights;
        self
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub title: String,
    pub suite: String,
    pub primary_metric: String,
    pub gate: Option<super::Gate>,
    pub runs: Vec<RunSummary>,
    pub baseline_trials: Vec<BaselineTrial>,
    pub comparison: Option<RunComparison>,
    /// Each step's cost: base with its best prompt → fine-tune → its quantized variants.
    #[serde(default)]
    pub steps: Vec<StepCost>,
    pub training: Vec<StepRecord>,
    pub training_evals: Vec<EvalRecord>,
    /// Free-form lines (dataset versions, adapter location, the decision).
    pub notes: Vec<String>,
    /// The regression pack's verdict on the fine-tune, when the report ran it.
    #[serde(default)]
    pub forgetting: Option<super::regression::Forgetting>,
}

/// A run's set-level values (macro-F1 and the like) and, where a scorer gave one, its
/// confusion matrix: reference classes down, predictions across.
fn set_metrics_html(r: &RunSummary) -> String {
    let mut h = String::new();
    let scalars: Vec<(&String, &f64)> = r.aggregates.iter().filter(|(k, _)| !k.contains("/confusion/") && !k.contains("/f1/")).collect();
    if scalars.is_empty() {
        return h;
    }
    let _ = write!(h, "<h3>{}: over the set</h3><p>", esc(&r.label));
    for (k, v) in &scalars {
        let _ = write!(h, "{} <b>{:.3}</b> · ", esc(k), v);
    }
    h.truncate(h.len() - " · ".len());
    h.push_str("</p>");
    // `<scorer>/confusion/<reference>/<prediction>` → count
    let cells: Vec<(&str, &str, f64)> = r
        .aggregates
        .iter()
        .filter_map(|(k, v)| {
            let (_, rest) = k.split_once("/confusion/")?;
            let (reference, predicted) = rest.split_once('/')?;
            Some((reference, predicted, *v))
        })
        .collect();
    if cells.is_empty() {
        return h;
    }
    let mut rows: Vec<&str> = cells.iter().map(|c| c.0).collect();
    rows.sort();
    rows.dedup();
    let extra: std::collections::BTreeSet<&str> = cells.iter().map(|c| c.1).filter(|p| !rows.contains(p)).collect();
    let cols: Vec<&str> = rows.iter().copied().chain(extra).collect();
    h.push_str("<table class=\"confusion\"><tr><th>reference ↓ / predicted →</th>");
    for c in &cols {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>");
    for row in &rows {
        let _ = write!(h, "<tr><th>{}</th>", esc(row));
        for col in &cols {
            let n = cells.iter().find(|c| c.0 == *row && c.1 == *col).map_or(0.0, |c| c.2);
            let class = if row == col { " class=\"hit\"" } else { "" };
            let _ = write!(h, "<td{class}>{n}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
    h
}

/// A note for each plugin that scored the runs with different bytes: their numbers are not
/// comparable on that plugin's metric, and the report says so.
pub fn plugin_mismatches(runs: &[RunSummary]) -> Vec<String> {
    let mut names: Vec<&String> = runs.iter().flat_map(|r| r.plugins.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let used: Vec<(&str, &str)> = runs.iter().filter_map(|r| r.plugins.get(name).map(|h| (r.label.as_str(), h.as_str()))).collect();
        if used.windows(2).any(|w| w[0].1 != w[1].1) {
            let list = used.iter().map(|(label, h)| format!("{label} {}", &h[..12.min(h.len())])).collect::<Vec<_>>().join(", ");
            out.push(format!("Warning: plugin `{name}` is not the same component in every run ({list}); the runs were scored differently."));
        }
    }
    out
}

impl Report {
    pub fn write(&self, json_path: &Path, html_path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("reports serialise");
        lathe_util::write_atomic(json_path, json.as_bytes()).map_err(|e| JobError::io(json_path, e))?;
        lathe_util::write_atomic(html_path, self.html().as_bytes()).map_err(|e| JobError::io(html_path, e))
    }

    pub fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{}</style></head><body>",
            esc(&self.title),
            CSS
        );
        let _ = write!(h, "<h1>{}</h1><p class=\"sub\">suite <b>{}</b> · metric <b>{}</b>", esc(&self.title), esc(&self.suite), esc(&self.primary_metric));
        if let Some(g) = &self.gate {
            let _ = write!(h, " · gate {} ≥ {}", esc(&g.metric), g.min);
        }
        h.push_str("</p>");
        if let Some(c) = &self.comparison {
            let v = c.comparison.verdict;
            let d = &c.comparison.difference;
            let _ = write!(
                h,
                "<div class=\"verdict {}\">Verdict: <b>{}</b> — {} changes by {:+.3} (95 % CI {:+.3} … {:+.3}, p = {:.4}, margin {}); {} items better, {} worse, {} tied.</div>",
                match v {
                    super::stats::Verdict::Better => "good",
                    super::stats::Verdict::Worse => "bad",
                    super::stats::Verdict::NoDifference => "flat",
                },
                v.as_str(),
                esc(&c.metric),
                d.mean,
                d.ci_low,
                d.ci_high,
                c.comparison.p_value,
                c.comparison.margin,
                c.comparison.wins,
                c.comparison.losses,
                c.comparison.ties
            );
        }
        for n in &self.notes {
            let _ = write!(h, "<p class=\"note\">{}</p>", esc(n));
        }
        if !self.steps.is_empty() {
            h.push_str(&self.steps_html());
        }
        if let Some(f) = &self.forgetting {
            h.push_str(&forgetting_html(f));
        }

        if !self.runs.is_empty() {
            h.push_str("<h2>Runs</h2>");
            let bars: Vec<(String, Estimate)> = self
                .runs
                .iter()
                .filter_map(|r| r.metrics.get(&self.primary_metric).map(|e| (r.label.clone(), *e)))
                .collect();
            h.push_str(&bar_chart(&bars, self.gate.as_ref().map(|g| g.min)));
            h.push_str("<table><tr><th>run</th><th>model</th><th>adapter</th><th>template</th><th>shots</th>");
            let metric_names: Vec<&String> = self.runs[0].metrics.keys().collect();
            for m in &metric_names {
                let _ = write!(h, "<th>{}</th>", esc(m));
            }
            h.push_str("<th>gate</th><th>examples/s</th><th>weights</th></tr>");
            for r in &self.runs {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
                    esc(&r.label),
                    esc(&r.model),
                    esc(r.adapter.as_deref().unwrap_or("—")),
                    esc(&r.template),
                    r.shots
                );
                for m in &metric_names {
                    match r.metrics.get(*m) {
                        Some(e) => {
                            let _ = write!(h, "<td>{:.3} <span class=\"ci\">[{:.3}, {:.3}]</span></td>", e.mean, e.ci_low, e.ci_high);
                        }
                        None => h.push_str("<td>—</td>"),
                    }
                }
                let gate = match r.passed_gate {
                    Some(true) => "pass",
                    Some(false) => "fail",
                    None => "—",
                };
                let _ = write!(h, "<td>{gate}</td><td>{:.2}</td><td>{}</td></tr>", r.examples_per_s, r.weights.as_ref().map_or("—".into(), weights_text));
            }
            h.push_str("</table>");
            for r in &self.runs {
                h.push_str(&set_metrics_html(r));
            }
        }

        if !self.baseline_trials.is_empty() {
            h.push_str("<h2>Prompt baseline</h2><p>Every template at every shot count on the base model; the best one is the baseline.</p>");
            let bars: Vec<(String, Estimate)> = self
                .baseline_trials
                .iter()
                .map(|t| (format!("{} · {}-shot", t.template, t.shots), t.metric))
                .collect();
            h.push_str(&bar_chart(&bars, self.gate.as_ref().map(|g| g.min)));
        }

        if !self.training.is_empty() {
            h.push_str("<h2>Training</h2>");
            let loss: Vec<(f64, f64)> = self.training.iter().map(|r| (r.step as f64, r.loss)).collect();
            let held: Vec<(f64, f64)> = self
                .training_evals
                .iter()
                .filter_map(|e| e.heldout_loss.map(|l| (e.step as f64, l)))
                .collect();
            h.push_str(&line_chart(&[("train loss", &loss, "#3867d6"), ("held-out loss", &held, "#eb3b5a")]));
            let metric: Vec<(f64, f64)> = self.training_evals.iter().filter_map(|e| e.metric.map(|m| (e.step as f64, m))).collect();
            if !metric.is_empty() {
                h.push_str(&line_chart(&[(&format!("held-out {}", self.primary_metric), &metric, "#20bf6b")]));
            }
        }

        if let Some(c) = &self.comparison {
            let _ = write!(h, "<h2>Per-example changes ({} of {})</h2>", c.diffs.len(), c.comparison.difference.n);
            h.push_str("<table class=\"diff\"><tr><th>#</th><th>input</th><th>reference</th><th>baseline</th><th>fine-tune</th></tr>");
            for d in c.diffs.iter().take(200) {
                let class = if d.candidate_score > d.baseline_score { "up" } else { "down" };
                let reason = |r: &Option<String>| r.as_deref().map(|r| format!("<p class=\"why\">judge: {}</p>", esc(r))).unwrap_or_default();
                let _ = write!(
                    h,
                    "<tr class=\"{class}\"><td>{}</td><td><pre>{}</pre></td><td><pre>{}</pre></td><td><pre>{}</pre><span class=\"score\">{:.2}</span>{}</td><td><pre>{}</pre><span class=\"score\">{:.2}</span>{}</td></tr>",
                    d.index,
                    esc(&d.input),
                    esc(&d.reference),
                    esc(&d.baseline_output),
                    d.baseline_score,
                    reason(&d.baseline_judge),
                    esc(&d.candidate_output),
                    d.candidate_score,
                    reason(&d.candidate_judge)
                );
            }
            h.push_str("</table>");
        }
        h.push_str("</body></html>\n");
        h
    }
}

impl Report {
    /// What each step costs: the primary metric before and after, the paired change with
    /// its interval, whether the result still clears the gate, and what its weights take.
    fn steps_html(&self) -> String {
        let mut h = String::new();
        let _ = write!(h, "<h2>What each step costs</h2><table class=\"steps\"><tr><th>step</th><th>{0} before</th><th>{0} after</th><th>change (95 % CI)</th><th>p</th><th>verdict</th><th>gate after</th><th>weights after</th></tr>", esc(&self.primary_metric));
        let run = |label: &str| self.runs.iter().find(|r| r.label == label);
        let metric = |label: &str| run(label).and_then(|r| r.metrics.get(&self.primary_metric)).map_or("—".into(), |e| format!("{:.3}", e.mean));
        for s in &self.steps {
            let d = &s.comparison.difference;
            let after = run(&s.to);
            let gate = match after.and_then(|r| r.passed_gate) {
                Some(true) => "pass",
                Some(false) => "fail",
                None => "—",
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:+.3} <span class=\"ci\">[{:+.3}, {:+.3}]</span></td><td>{:.4}</td><td>{}</td><td>{gate}</td><td>{}</td></tr>",
                esc(&s.step),
                metric(&s.from),
                metric(&s.to),
                d.mean,
                d.ci_low,
                d.ci_high,
                s.comparison.p_value,
                s.comparison.verdict.as_str(),
                after.and_then(|r| r.weights.as_ref()).map_or("—".into(), weights_text)
            );
        }
        h.push_str("</table>");
        h
    }
}

fn weights_text(w: &Weights) -> String {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    match w.adapter_bytes {
        Some(a) => format!("{} {} + adapter {}", esc(&w.format), mb(w.bytes), mb(a)),
        None => format!("{} {}", esc(&w.format), mb(w.bytes)),
    }
}

/// The regression pack, task by task: base, fine-tune, the change with its interval, and
/// the verdict.
fn forgetting_html(f: &super::regression::Forgetting) -> String {
    let mut h = String::new();
    let (class, verdict) = match f.forgot {
        true => ("bad", "the fine-tune forgot: it is worse on general ability"),
        false => ("good", "no forgetting detected"),
    };
    let _ = write!(h, "<h2>Regression pack</h2><div class=\"verdict {class}\">Forgetting: <b>{verdict}</b></div>");
    h.push_str("<table><tr><th>task</th><th>base</th><th>fine-tune</th><th>change (95 % CI)</th><th>verdict</th></tr>");
    for (task, c) in &f.tasks {
        let score = |m: &std::collections::BTreeMap<String, Estimate>| m.get(task).map_or("—".to_string(), |e| format!("{:.3}", e.mean));
        let d = &c.difference;
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:+.3} <span class=\"ci\">[{:+.3}, {:+.3}]</span></td><td>{}</td></tr>",
            esc(task),
            score(&f.base),
            score(&f.tuned),
            d.mean,
            d.ci_low,
            d.ci_high,
            c.verdict.as_str()
        );
    }
    h.push_str("</table>");
    h
}

const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}\
h1{margin-bottom:.2rem}.sub{color:#666;margin-top:0}table{border-collapse:collapse;width:100%;margin:1rem 0}\
td,th{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}th{background:#f4f4f4}\
.ci{color:#888;font-size:12px}.verdict{padding:.8rem 1rem;border-radius:6px;margin:1rem 0}\
.good{background:#e3f6e8}.bad{background:#fbe4e4}.flat{background:#f1f1f1}.note{color:#444}\
pre{white-space:pre-wrap;margin:0;font-size:12px;max-width:280px}tr.up td:last-child{background:#eef9f0}\
tr.down td:last-child{background:#fdf0f0}.score{font-weight:bold;font-size:12px}.why{color:#555;font-size:12px;margin:.2rem 0 0}svg{display:block;margin:.5rem 0}";

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Horizontal bars on [0, 1] with 95 % interval whiskers and an optional gate line.
fn bar_chart(bars: &[(String, Estimate)], gate: Option<f64>) -> String {
    let (label_w, plot_w, row_h) = (260.0, 560.0, 26.0);
    let height = row_h * bars.len() as f64 + 24.0;
    let top = bars.iter().map(|(_, e)| e.ci_high.max(e.mean)).fold(1.0f64, f64::max);
    let x = |v: f64| label_w + plot_w * (v / top).clamp(0.0, 1.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" role=\"img\">", label_w + plot_w + 60.0);
    for (i, (label, e)) in bars.iter().enumerate() {
        let y = row_h * i as f64 + 4.0;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"12\">{}</text><rect x=\"{label_w}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"#4b7bec\"/>\
<line x1=\"{}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#222\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{:.3}</text>",
            label_w - 6.0,
            y + 15.0,
            esc(label),
            x(e.mean) - label_w,
            row_h - 8.0,
            x(e.ci_low),
            x(e.ci_high),
            y + 9.0,
            y + 9.0,
            x(e.ci_high.max(e.mean)) + 4.0,
            y + 15.0,
            e.mean
        );
    }
    if let Some(g) = gate {
        let _ = write!(
            s,
            "<line x1=\"{0}\" x2=\"{0}\" y1=\"0\" y2=\"{1}\" stroke=\"#eb3b5a\" stroke-dasharray=\"4 3\"/><text x=\"{0}\" y=\"{2}\" font-size=\"11\" fill=\"#eb3b5a\">gate {3}</text>",
            x(g),
            height - 14.0,
            height - 2.0,
            g
        );
    }
    s.push_str("</svg>");
    s
}

/// A named line: (name, points, color).
type Series<'a> = (&'a str, &'a [(f64, f64)], &'a str);

/// Lines over steps, each series scaled to the shared y range.
fn line_chart(series: &[Series<'_>]) -> String {
    let (w, h, pad) = (820.0, 220.0, 40.0);
    let pts = series.iter().flat_map(|(_, p, _)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return String::new();
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| pad + (w - 2.0 * pad) * (x - x0) / (x1 - x0);
    let py = |y: f64| h - pad + -(h - 2.0 * pad) * (y - y0) / (y1 - y0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\">");
    let _ = write!(
        s,
        "<line x1=\"{pad}\" x2=\"{pad}\" y1=\"{pad}\" y2=\"{0}\" stroke=\"#999\"/><line x1=\"{pad}\" x2=\"{1}\" y1=\"{0}\" y2=\"{0}\" stroke=\"#999\"/>\
<text x=\"4\" y=\"{pad}\" font-size=\"11\">{y1:.3}</text><text x=\"4\" y=\"{0}\" font-size=\"11\">{y0:.3}</text><text x=\"{1}\" y=\"{2}\" font-size=\"11\" text-anchor=\"end\">step {x1}</text>",
        h - pad,
        w - pad,
        h - pad + 16.0
    );
    for (k, (name, points, color)) in series.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let path: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.6\" points=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{color}\">{}</text>",
            path.join(" "),
            pad + 10.0 + 160.0 * k as f64,
            pad - 10.0,
            esc(name)
        );
        if points.len() < 40 {
            for &(x, y) in *points {
                let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{color}\"/>", px(x), py(y));
            }
        }
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_self_contained_and_escaped() {
        let e = Estimate { mean: 0.5, ci_low: 0.4, ci_high: 0.6, n: 10 };
        let r = Report {
            title: "t <script>".into(),
            suite: "s".into(),
            primary_metric: "m".into(),
            baseline_trials: vec![BaselineTrial { template: "a&b".into(), shots: 0, metric: e }],
            training: vec![
                StepRecord { step: 1, epoch: 0, loss: 2.0, lr: 1e-4, grad_norm: 1.0, tokens: 10 },
                StepRecord { step: 2, epoch: 0, loss: 1.0, lr: 1e-4, grad_norm: 1.0, tokens: 10 },
            ],
            ..Report::default()
        };
        let html = r.html();
        assert!(!html.contains("<script"), "user text is escaped and the page has no scripts");
        assert!(html.contains("t &lt;script&gt;"));
        assert!(html.contains("a&amp;b · 0-shot"));
        assert!(html.contains("<polyline"));
        assert!(!html.contains("http://") || html.matches("http://").count() == html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count(), "nothing is fetched");
    }

    fn summary(label: &str, plugins: &[(&str, &str)], aggregates: &[(&str, f64)]) -> RunSummary {
        RunSummary {
            label: label.into(),
            id: label.into(),
            model: "m".into(),
            adapter: None,
            template: "t".into(),
            shots: 0,
            metrics: Default::default(),
            passed_gate: None,
            examples_per_s: 1.0,
            weights: None,
            plugins: plugins.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            aggregates: aggregates.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn a_classification_run_shows_macro_f1_and_its_confusion_matrix() {
        let r = summary(
            "baseline",
            &[],
            &[("classification/macro_f1", 0.5), ("classification/confusion/bug/bug", 3.0), ("classification/confusion/bug/(other)", 1.0), ("classification/confusion/billing/bug", 2.0)],
        );
        let html = set_metrics_html(&r);
        assert!(html.contains("classification/macro_f1 <b>0.500</b>"), "{html}");
        assert!(html.contains("<th>reference ↓ / predicted →</th><th>billing</th><th>bug</th><th>(other)</th>"), "{html}");
        assert!(html.contains("<tr><th>billing</th><td class=\"hit\">0</td><td>2</td><td>0</td></tr>"), "{html}");
        assert!(html.contains("<tr><th>bug</th><td>0</td><td class=\"hit\">3</td><td>1</td></tr>"), "{html}");
    }

    #[test]
    fn runs_scored_by_different_components_are_named_in_a_warning() {
        let same = [summary("baseline", &[("exact-match", "aaaa")], &[]), summary("candidate", &[("exact-match", "aaaa")], &[])];
        assert!(plugin_mismatches(&same).is_empty());
        let differ = [summary("baseline", &[("exact-match", "aaaa")], &[]), summary("candidate", &[("exact-match", "bbbb")], &[])];
        let notes = plugin_mismatches(&differ);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("`exact-match`") && notes[0].contains("baseline aaaa") && notes[0].contains("candidate bbbb"), "{}", notes[0]);
    }
}
