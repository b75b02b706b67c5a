//! The regression pack: a small general-capability set shipped with Lathe, run on a base
//! model and on its fine-tune to catch catastrophic forgetting.
//!
//! - multiple choice, scored by log-likelihood: the choice whose tokens the model finds
//!   most likely after the question (per-token mean, so long choices are not penalised),
//!   as lm-evaluation-harness scores `acc_norm`-style tasks;
//! - short arithmetic, generated with a seed, scored on the first number in the answer;
//! - instruction following, each prompt with a check a program can make (upper case,
//!   a number of items, one word, a given ending).

use crate::error::Result;
use lathe_engine::generate::{continuation_logprob, generate_with};
use lathe_engine::{Message, SamplingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::Subject;
use super::stats::{self, Comparison, Estimate};

/// (question, choices, index of the right one)
const MULTIPLE_CHOICE: &[(&str, &[&str], usize)] = &[
    ("What is the capital of France?", &["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("Which planet is closest to the Sun?", &["Venus", "Mercury", "Mars", "Jupiter"], 1),
    ("Water freezes at what temperature in Celsius?", &["100 degrees", "50 degrees", "0 degrees", "-40 degrees"], 2),
    ("How many days are in a week?", &["five", "six", "seven", "eight"], 2),
    ("Which animal is a mammal?", &["shark", "dolphin", "trout", "octopus"], 1),
    ("What color do you get by mixing blue and yellow?", &["green", "purple", "orange", "red"], 0),
    ("Which is the largest ocean on Earth?", &["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("What do bees make?", &["milk", "honey", "silk", "wax paper"], 1),
    ("Which language is primarily spoken in Brazil?", &["Spanish", "Portuguese", "French", "English"], 1),
    ("How many legs does a spider have?", &["six", "eight", "ten", "four"], 1),
    ("What is the opposite of 'hot'?", &["warm", "cold", "wet", "loud"], 1),
    ("Which gas do plants take in from the air?", &["oxygen", "nitrogen", "carbon dioxide", "helium"], 2),
    ("What is the tallest animal?", &["elephant", "giraffe", "horse", "camel"], 1),
    ("Which month comes after March?", &["February", "May", "April", "June"], 2),
    ("What is H2O commonly called?", &["salt", "water", "sugar", "air"], 1),
    ("Which shape has three sides?", &["square", "circle", "triangle", "hexagon"], 2),
    ("Who wrote 'Romeo and Juliet'?", &["Charles Dickens", "William Shakespeare", "Jane Austen", "Mark Twain"], 1),
    ("What is the freezing point of water in Fahrenheit?", &["0 degrees", "32 degrees", "100 degrees", "212 degrees"], 1),
    ("Which organ pumps blood through the body?", &["lungs", "liver", "heart", "kidneys"], 2),
    ("What is the main ingredient of bread?", &["flour", "rice", "cheese", "fish"], 0),
    ("Which continent is Egypt in?", &["Asia", "Europe", "Africa", "South America"], 2),
    ("How many hours are in a day?", &["12", "24", "36", "60"], 1),
    ("What do you call a baby cat?", &["puppy", "kitten", "calf", "cub"], 1),
    ("Which of these is a fruit?", &["carrot", "potato", "apple", "onion"], 2),
];

/// What an instruction-following answer must satisfy.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// No lower-case letters, at least one letter.
    UpperCase,
    /// Exactly this many comma-separated items.
    CommaItems(usize),
    /// A single word.
    OneWord,
    /// Ends with this text (ignoring trailing whitespace).
    EndsWith(&'static str),
    /// Starts with this text.
    StartsWith(&'static str),
}

const INSTRUCTIONS: &[(&str, Check)] = &[
    ("Reply with the word yes, written in capital letters only.", Check::UpperCase),
    ("Name three colors, separated by commas, and nothing else.", Check::CommaItems(3)),
    ("In one word: what is the color of grass?", Check::OneWord),
    ("Say hello and end your reply with the word 'Goodbye'.", Check::EndsWith("Goodbye")),
    ("List four fruits, separated by commas, with no other text.", Check::CommaItems(4)),
    ("Answer with one word: what animal says 'meow'?", Check::OneWord),
    ("Start your answer with 'Sure:' and then name a country.", Check::StartsWith("Sure:")),
    ("Write the word OK in capital letters and nothing else.", Check::UpperCase),
    ("Name two planets separated by a comma, nothing else.", Check::CommaItems(2)),
    ("In one word, what is frozen water called?", Check::OneWord),
];

fn passes(check: Check, output: &str) -> bool {
    let out = output.trim().trim_end_matches('.');
    match check {
        Check::UpperCase => out.chars().any(char::is_alphabetic) && !out.chars().any(char::is_lowercase),
        Check::CommaItems(n) => {
            // "The three colors are: blue, green, and red." counts: the list after a colon,
            // with a final "and".
            let list = out.rsplit(':').next().unwrap_or(out);
            let items: Vec<&str> = list
                .split(',')
                .map(|i| i.trim().trim_start_matches("and ").trim())
                .filter(|i| !i.is_empty())
                .collect();
            items.len() == n && items.iter().all(|i| i.split_whitespace().count() <= 3)
        }
        Check::OneWord => out.split_whitespace().count() == 1,
        Check::EndsWith(s) => out.trim_end_matches(['!', '.']).ends_with(s),
        Check::StartsWith(s) => out.starts_with(s),
    }
}

/// One item of the pack and how the model did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackItem {
    pub task: String,
    pub prompt: String,
    pub output: String,
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackRun {
    pub model: String,
    pub adapter: Option<String>,
    pub items: Vec<PackItem>,
    /// Task → accuracy with its 95 % interval; `overall` over every item.
    pub tasks: std::collections::BTreeMap<String, Estimate>,
}

impl PackRun {
    fn values(&self, task: &str) -> Vec<f64> {
        self.items.iter().filter(|i| task == "overall" || i.task == task).map(|i| i.score).collect()
    }
}

/// A generated item: task, prompt, and the check its answer must pass.
type Generated = (String, String, Box<dyn Fn(&str) -> bool>);

/// Runs the whole pack: multiple choice, `arithmetic` generated arithmetic items, and the
/// instruction-following prompts.
pub fn run(subject: &Subject<'_>, arithmetic: usize, seed: u64) -> Result<PackRun> {
    let tok = subject.tokenizer;
    let mut items = Vec::new();
    for (q, choices, answer) in MULTIPLE_CHOICE {
        let prompt = tok.encode_chat(&[Message::new("user", format!("{q} Answer with the right option."))], true)?;
        let mut best = (f64::NEG_INFINITY, 0);
        for (i, c) in choices.iter().enumerate() {
            let cont = tok.encode(c, false)?;
            let lp = continuation_logprob(subject.model, subject.adapter, &prompt, &cont) / cont.len().max(1) as f64;
            if lp > best.0 {
                best = (lp, i);
            }
        }
        items.push(PackItem {
            task: "multiple_choice".into(),
            prompt: q.to_string(),
            output: choices[best.1].to_string(),
            score: f64::from(u8::from(best.1 == *answer)),
        });
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let mut gen_items: Vec<Generated> = Vec::new();
    for _ in 0..arithmetic {
        let (a, b) = (rng.random_range(2..50i64), rng.random_range(2..50i64));
        let (text, value) = match rng.random_range(0..3) {
            0 => (format!("What is {a} + {b}?"), a + b),
            1 => (format!("What is {a} - {b}?"), a - b),
            _ => (format!("What is {a} times {b}?"), a * b),
        };
        let prompt = format!("{text} Answer with the number only.");
        gen_items.push(("arithmetic".into(), prompt, Box::new(move |out: &str| last_number(out) == Some(value))));
    }
    for (prompt, check) in INSTRUCTIONS {
        let check = *check;
        gen_items.push(("instruction_following".into(), prompt.to_string(), Box::new(move |out: &str| passes(check, out))));
    }
    let prompts = gen_items
        .iter()
        .map(|(_, p, _)| tok.encode_chat(&[Message::new("user", p.clone())], true))
        .collect::<lathe_engine::Result<Vec<_>>>()?;
    let params = SamplingParams {
        max_tokens: 32,
        ..SamplingParams::default()
    };
    for (chunk_items, chunk_prompts) in gen_items.chunks(8).zip(prompts.chunks(8)) {
        let gens = generate_with(subject.model, subject.adapter, tok, chunk_prompts, &params, &mut |_, _| {})?;
        for ((task, prompt, check), g) in chunk_items.iter().zip(gens) {
            let output = g.text.trim().to_string();
            items.push(PackItem {
                task: task.clone(),
                prompt: prompt.clone(),
                score: f64::from(u8::from(check(&output))),
                output,
            });
        }
    }

    let mut run = PackRun {
        model: subject.model_name.clone(),
        adapter: subject.adapter_name.clone(),
        items,
        tasks: Default::default(),
    };
    for task in ["multiple_choice", "arithmetic", "instruction_following", "overall"] {
        let v = run.values(task);
        run.tasks.insert(task.into(), stats::bootstrap_mean(&v, stats::DEFAULT_RESAMPLES, 5));
    }
    Ok(run)
}

/// The last integer in the answer ("17 + 25 = 42" → 42), as lm-evaluation-harness's
/// flexible extraction takes it.
fn last_number(s: &str) -> Option<i64> {
    let bytes = s.as_bytes();
    let end = bytes.iter().rposition(|b| b.is_ascii_digit())? + 1;
    let start = bytes[..end].iter().rposition(|b| !b.is_ascii_digit()).map_or(0, |p| p + 1);
    let v: i64 = s[start..end].parse().ok()?;
    let neg = start > 0 && bytes[start - 1] == b'-' && (start < 2 || !bytes[start - 2].is_ascii_digit());
    Some(if neg { -v } else { v })
}

/// The forgetting check: the fine-tune against its base, task by task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forgetting {
    /// Task → the fine-tune's change against its base, with its interval and verdict.
    pub tasks: std::collections::BTreeMap<String, Comparison>,
    /// Task → the base model's and the fine-tune's scores.
    #[serde(default)]
    pub base: std::collections::BTreeMap<String, Estimate>,
    #[serde(default)]
    pub tuned: std::collections::BTreeMap<String, Estimate>,
    /// True when any task is significantly worse by more than the margin.
    pub forgot: bool,
}

pub fn compare(base: &PackRun, tuned: &PackRun, margin: f64) -> Forgetting {
    let mut tasks = std::collections::BTreeMap::new();
    for task in base.tasks.keys() {
        let c = stats::compare_paired(&base.values(task), &tuned.values(task), margin, stats::DEFAULT_RESAMPLES, 41);
        tasks.insert(task.clone(), c);
    }
    let forgot = tasks.values().any(|c| c.verdict == stats::Verdict::Worse);
    Forgetting { tasks, base: base.tasks.clone(), tuned: tuned.tasks.clone(), forgot }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_accept_and_reject() {
        assert!(passes(Check::UpperCase, "YES"));
        assert!(!passes(Check::UpperCase, "Yes"));
        assert!(passes(Check::CommaItems(3), "red, green, blue"));
        assert!(!passes(Check::CommaItems(3), "red, green"));
        assert!(passes(Check::CommaItems(3), "The three colors are: blue, green, and red."));
        assert!(!passes(Check::CommaItems(3), "Sure! Here are three colors: red, green, blue and many more words here"));
        assert!(passes(Check::OneWord, "Green."));
        assert!(!passes(Check::OneWord, "It is green"));
        assert!(passes(Check::EndsWith("Goodbye"), "Hello there. Goodbye!"));
        assert!(passes(Check::StartsWith("Sure:"), "Sure: Japan"));
        assert_eq!(last_number("The answer is -12."), Some(-12));
        assert_eq!(last_number("17 + 25 = 42"), Some(42));
        assert_eq!(last_number("30-7"), Some(7));
        assert_eq!(last_number("none"), None);
        for (_, choices, answer) in MULTIPLE_CHOICE {
            assert!(*answer < choices.len());
        }
    }
}
