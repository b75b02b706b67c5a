//! The packs that ship with Lathe, and the blank one `lathe pack new` starts from. Each is a
//! source folder this code writes: `pack.toml`, suites, a README with the baseline measured
//! on SmolLM2, and data generated here from a fixed seed, so the same Lathe always builds
//! the same bytes (and the same sha256) wherever it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lathe_sandbox::Runtime;

use lathe_data::{Example, Message, Role};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::error::{JobError, Result};
use crate::eval::{Gate, PluginRef, PromptTemplate, Suite};

/// A pack source this binary can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// A minimal pack to edit: one exact-match suite, three items.
    Blank,
    /// Invoices to JSON: field-level scoring and schema validation.
    InvoiceExtraction,
    /// Support tickets to one of five queues: accuracy and macro-F1.
    SupportTriage,
    /// Questions answered from a given passage: ROUGE-L, and an LLM judge's rubric.
    GroundedQa,
}

impl Template {
    /// The packs a server offers in its catalogue.
    pub const SHIPPED: [Template; 3] = [Template::InvoiceExtraction, Template::SupportTriage, Template::GroundedQa];

    pub fn name(self) -> &'static str {
        match self {
            Self::Blank => "blank",
            Self::InvoiceExtraction => "invoice-extraction",
            Self::SupportTriage => "support-triage",
            Self::GroundedQa => "grounded-qa",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        [Self::Blank, Self::InvoiceExtraction, Self::SupportTriage, Self::GroundedQa].into_iter().find(|t| t.name() == name).ok_or_else(|| {
            JobError::Invalid(format!("no pack template `{name}`; there are blank, {}", Self::SHIPPED.map(Self::name).join(", ")))
        })
    }

    /// Writes the source folder into `dir` (which must not exist yet) under the pack name
    /// `name` (the template's own name when None).
    pub fn write(self, dir: &Path, name: Option<&str>) -> Result<()> {
        if dir.exists() {
            return Err(JobError::Invalid(format!("{} exists already; choose a new folder", dir.display())));
        }
        for (rel, bytes) in self.files(name)? {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| JobError::io(parent, e))?;
            }
            std::fs::write(&path, bytes).map_err(|e| JobError::io(&path, e))?;
        }
        Ok(())
    }

    /// Builds this template's pack as it ships (`lathe pack new --template` then `lathe pack
    /// build` give the same bytes).
    pub fn build(self, runtime: &Runtime) -> Result<Vec<u8>> {
        let files: BTreeMap<PathBuf, Vec<u8>> = self.files(None)?.into_iter().map(|(p, b)| (PathBuf::from(p), b)).collect();
        let read = |rel: &Path| files.get(rel).cloned().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound));
        super::Pack::build_with(&read, Path::new(self.name()), runtime)
    }

    /// The source folder's files, relative path → bytes.
    pub fn files(self, name: Option<&str>) -> Result<Vec<(String, Vec<u8>)>> {
        let name = name.unwrap_or(self.name());
        super::check_name("pack", name)?;
        let (description, plugins, suites, heldout, fewshot, readme) = match self {
            Self::Blank => blank(),
            Self::InvoiceExtraction => invoice_extraction(),
            Self::SupportTriage => support_triage(),
            Self::GroundedQa => grounded_qa(),
        };
        let toml = format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\ndescription = \"{description}\"\nlicense = \"Apache-2.0\"\n\
             suites = [{suite_files}]\n\n\
             # Every plugin a suite uses, with what it asks of the host: the memory of one\n\
             # instance and the time of one call. `component = \"plugins/x.wasm\"` carries your own.\n\
             {plugins}\n\
             [heldout]\nfile = \"data/heldout.jsonl\"\nprovenance = \"{hp}\"\n\n\
             [fewshot]\nfile = \"data/fewshot.jsonl\"\nprovenance = \"{fp}\"\n{verdicts}",
            suite_files = suites.iter().map(|s| format!("\"suites/{}.json\"", s.name)).collect::<Vec<_>>().join(", "),
            hp = heldout.1,
            fp = fewshot.1,
            verdicts = match self.verdicts() {
                Some((_, provenance)) => format!("\n[verdicts]\nfile = \"data/verdicts.jsonl\"\nprovenance = \"{provenance}\"\n"),
                None => String::new(),
            },
        );
        let lines = |xs: &[Example]| xs.iter().map(|e| e.to_canonical() + "\n").collect::<String>().into_bytes();
        let mut files = vec![
            ("pack.toml".into(), toml.into_bytes()),
            ("data/heldout.jsonl".into(), lines(&heldout.0)),
            ("data/fewshot.jsonl".into(), lines(&fewshot.0)),
            ("README.md".into(), readme.replace("__NAME__", name).into_bytes()),
        ];
        for suite in &suites {
            files.push((format!("suites/{}.json", suite.name), (serde_json::to_string_pretty(suite).expect("suites serialise") + "\n").into_bytes()));
        }
        if let Some((lines, _)) = self.verdicts() {
            files.push(("data/verdicts.jsonl".into(), lines.as_bytes().to_vec()));
        }
        Ok(files)
    }

    /// The judge's verdicts cached when the pack's judged baseline was measured, and how.
    fn verdicts(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::GroundedQa => Some((
                include_str!("shipped/grounded-qa-verdicts.jsonl"),
                "cached by `lathe eval baseline --suite grounded-qa-judged` on SmolLM2-135M-Instruct Q4_1 (greedy, 8-bit sampled tokens), judged by `lathe serve` (smollm2-135m-instruct at http://127.0.0.1:8080/v1, seed 7)",
            )),
            _ => None,
        }
    }
}

type Parts = (&'static str, String, Vec<Suite>, (Vec<Example>, String), (Vec<Example>, String), String);

fn plugin_toml(builtin: &str, memory_mb: u64, timeout_ms: u64) -> String {
    format!("[[plugins]]\nbuiltin = \"{builtin}\"\nmemory_mb = {memory_mb}\ntimeout_ms = {timeout_ms}\n")
}

fn suite(name: &str, templates: Vec<PromptTemplate>, scorer: &str, validator: Option<PluginRef>, gate: Gate, max_tokens: usize) -> Suite {
    Suite {
        name: name.into(),
        templates,
        scorers: vec![PluginRef::new(scorer, json!({}))],
        validator,
        judge: None,
        gate: Some(gate),
        shots: vec![0, 2],
        max_tokens,
        margin: 0.0,
        batch_size: 8,
    }
}

fn blank() -> Parts {
    let qa = |q: &str, a: &str| Example::prompt_completion(None, q, a);
    let suite = suite(
        "answers",
        vec![PromptTemplate { name: "plain".into(), system: Some("Answer with the answer only.".into()), user: "{{ input }}".into() }],
        "exact-match",
        None,
        Gate { metric: "exact-match".into(), min: 0.8 },
        16,
    );
    (
        "A pack to start from: replace the items, the suite and the plugins with your task's.",
        plugin_toml("exact-match", 16, 500),
        vec![suite],
        (vec![qa("What is 2 + 2?", "4"), qa("What is the capital of France?", "Paris"), qa("What colour is the sky on a clear day?", "blue")], "written by hand".into()),
        (vec![qa("What is 1 + 1?", "2"), qa("What is the capital of Italy?", "Rome")], "written by hand".into()),
        "# __NAME__\n\nA new eval pack. Edit `data/`, `suites/` and `pack.toml`, then `lathe pack build .`\n".into(),
    )
}

fn invoice_extraction() -> Parts {
    let mut suite = crate::invoices::invoice_suite();
    suite.name = "invoice-fields".into();
    let plugins = plugin_toml("json-field-match", 32, 1000) + "\n" + &plugin_toml("json-schema", 32, 1000);
    (
        "Invoices in four layouts and two languages to one JSON object: vendor, number, ISO date, total, currency.",
        plugins,
        vec![suite],
        (crate::invoices::invoice_examples(40, 9101), "generated by lathe_jobs::invoices::invoice_examples(40, seed 9101)".into()),
        (crate::invoices::invoice_examples(16, 9202), "generated by lathe_jobs::invoices::invoice_examples(16, seed 9202)".into()),
        include_str!("shipped/invoice-extraction.md").into(),
    )
}

/// The five queues of the triage pack.
pub const QUEUES: [&str; 5] = ["billing", "bug", "account", "feature_request", "shipping"];

/// A support ticket and its queue, from phrase pools: openings, a queue-specific problem with
/// its details, and closings, so the wording varies while the label stays decidable.
pub fn ticket(rng: &mut StdRng) -> (String, &'static str) {
    const OPEN: [&str; 5] = ["Hi,", "Hello support,", "Good morning.", "Hey team -", "To whom it may concern:"];
    const CLOSE: [&str; 5] = ["Thanks.", "Please help asap!", "Regards, Sam", "Looking forward to your reply.", "Cheers"];
    const PROBLEMS: [(&str, [&str; 4]); 5] = [
        ("billing", ["I was charged twice for my {plan} subscription this month.", "My invoice for {month} shows {amount} but my plan costs less.", "Can I get a refund for the {plan} plan? I cancelled on {month} 3rd.", "The card payment failed and now my account says overdue."]),
        ("bug", ["The {feature} page crashes with error {code} when I click save.", "Since the last update the {feature} export produces an empty file.", "The app freezes on the {feature} screen on my phone.", "I get a blank screen after login when opening {feature}."]),
        ("account", ["I can't log in; the password reset email never arrives.", "Please change the email on my account to a new address.", "How do I add a second admin to our team account?", "My account got locked after too many login attempts."]),
        ("feature_request", ["It would be great if {feature} could export to CSV.", "Could you add dark mode to the {feature} screen?", "Please support keyboard shortcuts in {feature}.", "We would love an API endpoint for {feature}."]),
        ("shipping", ["My order #{order} still hasn't arrived after two weeks.", "The package for order #{order} arrived damaged.", "Can I change the delivery address for order #{order}?", "Tracking for order #{order} has not updated since {month} 2nd."]),
    ];
    const PLANS: [&str; 3] = ["Pro", "Team", "Basic"];
    const MONTHS: [&str; 4] = ["March", "April", "May", "June"];
    const FEATURES: [&str; 5] = ["reports", "dashboard", "calendar", "invoices", "settings"];
    let (queue, lines) = PROBLEMS[rng.random_range(0..PROBLEMS.len())];
    let body = lines[rng.random_range(0..lines.len())]
        .replace("{plan}", PLANS[rng.random_range(0..PLANS.len())])
        .replace("{month}", MONTHS[rng.random_range(0..MONTHS.len())])
        .replace("{amount}", &format!("${}.{:02}", rng.random_range(20..400), rng.random_range(0..100)))
        .replace("{feature}", FEATURES[rng.random_range(0..FEATURES.len())])
        .replace("{code}", &format!("E{}", rng.random_range(100..999)))
        .replace("{order}", &rng.random_range(10_000..99_999).to_string());
    let text = format!("{} {} {}", OPEN[rng.random_range(0..OPEN.len())], body, CLOSE[rng.random_range(0..CLOSE.len())]);
    (text, QUEUES.iter().find(|q| **q == queue).expect("every problem's queue is a queue"))
}

/// `n` examples drawn by `draw` from a generator seeded with `seed`, none with the same
/// input (the last context message) as another or as any example in `avoid`: held-out
/// items and few-shot pools that share no text.
fn distinct_examples(n: usize, seed: u64, avoid: &[Example], mut draw: impl FnMut(&mut StdRng) -> Example) -> Vec<Example> {
    let input = |e: &Example| e.context().last().map(|m| m.content.clone());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: std::collections::BTreeSet<String> = avoid.iter().filter_map(input).collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let example = draw(&mut rng);
        if input(&example).is_some_and(|text| seen.insert(text)) {
            out.push(example);
        }
    }
    out
}

/// `n` distinct tickets as examples (user: the ticket; assistant and label: the queue),
/// none of whose text is in `avoid`.
pub fn ticket_examples(n: usize, seed: u64, avoid: &[Example]) -> Vec<Example> {
    distinct_examples(n, seed, avoid, |rng| {
        let (text, queue) = ticket(rng);
        Example::new(vec![Message::new(Role::User, text), Message::new(Role::Assistant, queue)]).with_label(queue)
    })
}

fn support_triage() -> Parts {
    let queues = QUEUES.join(", ");
    let templates = vec![
        PromptTemplate {
            name: "route".into(),
            system: Some(format!("You route customer support tickets. Answer with exactly one queue name from: {queues}.")),
            user: "Ticket: {{ input }}\nQueue:".into(),
        },
        PromptTemplate {
            name: "explained".into(),
            system: None,
            user: format!(
                "Which queue should handle this ticket? billing = charges, refunds, invoices; bug = something broken; account = login, email, admins; feature_request = asks for something new; shipping = orders and deliveries.\nAnswer with one word from: {queues}.\n\n{{{{ input }}}}"
            ),
        },
    ];
    let suite = suite("triage", templates, "classification", None, Gate { metric: "classification".into(), min: 0.8 }, 8);
    let heldout = ticket_examples(60, 7301, &[]);
    let fewshot = ticket_examples(20, 7302, &heldout);
    (
        "Support tickets to one of five queues (billing, bug, account, feature_request, shipping), scored by accuracy with macro-F1 over the set.",
        plugin_toml("classification", 32, 1000),
        vec![suite],
        (heldout, "generated by lathe_jobs::pack::shipped::ticket_examples(60, seed 7301)".into()),
        (fewshot, "generated by lathe_jobs::pack::shipped::ticket_examples(20, seed 7302), none of the held-out texts".into()),
        include_str!("shipped/support-triage.md").into(),
    )
}

/// A passage about a made-up organisation, a question on one of its facts, and the answer
/// as the passage words it: the facts exist nowhere else, so the answer must come from the
/// passage.
pub fn grounded_item(rng: &mut StdRng) -> (String, String, String) {
    const FIRST: [&str; 8] = ["Vel", "Oru", "Kast", "Mira", "Dorn", "Sela", "Tyr", "Bren"];
    const SECOND: [&str; 8] = ["mont", "vale", "hollow", "wick", "stead", "ford", "mere", "ridge"];
    const KINDS: [&str; 5] = ["cooperative", "observatory", "ferry company", "seed bank", "orchestra"];
    const CITIES: [&str; 6] = ["Lisbon", "Tallinn", "Osaka", "Quito", "Perth", "Tromsø"];
    const PRODUCTS: [&str; 6] = ["hand-built telescopes", "rye bread", "night ferries", "heirloom bean seeds", "chamber concerts", "wool blankets"];
    const FOUNDERS: [&str; 6] = ["Ada Lindqvist", "Tomás Ferreira", "Keiko Arai", "Nia Okafor", "Pavel Horák", "Lena Marsh"];
    let name = format!("{}{}", FIRST[rng.random_range(0..FIRST.len())], SECOND[rng.random_range(0..SECOND.len())]);
    let kind = KINDS[rng.random_range(0..KINDS.len())];
    let city = CITIES[rng.random_range(0..CITIES.len())];
    let year = rng.random_range(1890..2015);
    let founder = FOUNDERS[rng.random_range(0..FOUNDERS.len())];
    let product = PRODUCTS[rng.random_range(0..PRODUCTS.len())];
    let staff = rng.random_range(12..900);
    let passage = format!(
        "The {name} {kind} was founded in {year} by {founder} in {city}. Today it employs {staff} people and is best known for its {product}."
    );
    let (question, answer) = match rng.random_range(0..5) {
        0 => (format!("In which year was the {name} {kind} founded?"), year.to_string()),
        1 => (format!("Who founded the {name} {kind}?"), founder.to_string()),
        2 => (format!("In which city was the {name} {kind} founded?"), city.to_string()),
        3 => (format!("How many people does the {name} {kind} employ?"), staff.to_string()),
        _ => (format!("What is the {name} {kind} best known for?"), format!("its {product}")),
    };
    (passage, question, answer)
}

/// `n` distinct grounded questions as examples (user: passage and question; assistant: the
/// answer), none of whose text is in `avoid`.
pub fn grounded_examples(n: usize, seed: u64, avoid: &[Example]) -> Vec<Example> {
    distinct_examples(n, seed, avoid, |rng| {
        let (passage, question, answer) = grounded_item(rng);
        Example::new(vec![Message::new(Role::User, format!("Passage: {passage}\nQuestion: {question}")), Message::new(Role::Assistant, answer)])
    })
}

/// The judge's rubric: grounded in the passage, and the reference's fact.
const GROUNDED_RUBRIC: &str = "You grade an answer to a question about a passage.\n\n{{ input }}\n\nReference answer: {{ reference }}\nAnswer to grade: {{ output }}\n\nGive {{ max }} if the answer states the reference's fact and nothing the passage does not support, {{ min }} if it is wrong or unsupported, and a value between for a partly right answer. Reply in JSON: {\"score\": <number>, \"reason\": \"<one short sentence>\"}.";

/// The verdict's shape, sent as the judge's structured-output schema: a score in the
/// rubric's range first, then a short reason.
fn verdict_format(min: u32, max: u32) -> serde_json::Value {
    json!({"type": "json_schema", "json_schema": {"name": "verdict", "schema": {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": min, "maximum": max}, "reason": {"type": "string", "maxLength": 100}},
        "required": ["score", "reason"],
        "additionalProperties": false,
    }}})
}

fn grounded_qa() -> Parts {
    let templates = vec![
        PromptTemplate {
            name: "answer".into(),
            system: Some("Answer the question from the passage only, in as few words as possible.".into()),
            user: "{{ input }}".into(),
        },
        PromptTemplate { name: "quote".into(), system: None, user: "{{ input }}\nAnswer with the words of the passage, nothing else.".into() },
    ];
    let plain = suite("grounded-qa", templates.clone(), "rouge-l", None, Gate { metric: "rouge-l".into(), min: 0.7 }, 16);
    let mut judged = suite("grounded-qa-judged", templates, "rouge-l", None, Gate { metric: "judge".into(), min: 0.7 }, 16);
    judged.judge = Some(crate::eval::judge::JudgeSpec {
        plugin: "llm-judge".into(),
        sha256: None,
        limits: None,
        config: json!({"rubric": GROUNDED_RUBRIC, "min": 1, "max": 5}),
        model: crate::eval::judge::JudgeModel::OpenAi {
            base_url: "http://127.0.0.1:8080/v1".into(),
            model: "smollm2-135m-instruct".into(),
            api_key_env: Some("LATHE_JUDGE_API_KEY".into()),
        },
        seed: 7,
        max_tokens: 64,
        response_format: Some(verdict_format(1, 5)),
    });
    let heldout = grounded_examples(40, 5501, &[]);
    let fewshot = grounded_examples(12, 5502, &heldout);
    (
        "Questions answered from a short passage about a made-up organisation, so the answer can only come from the passage: ROUGE-L, and an LLM judge's rubric.",
        plugin_toml("rouge-l", 32, 1000) + "\n" + &plugin_toml("llm-judge", 32, 1000),
        vec![plain, judged],
        (heldout, "generated by lathe_jobs::pack::shipped::grounded_examples(40, seed 5501)".into()),
        (fewshot, "generated by lathe_jobs::pack::shipped::grounded_examples(12, seed 5502), none of the held-out questions".into()),
        include_str!("shipped/grounded-qa.md").into(),
    )
}
