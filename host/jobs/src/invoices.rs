//! The demo task, made by the code with a seed: invoices in assorted layouts, date and
//! number formats and languages, to be turned into one normalised JSON object
//! (`vendor`, `invoice_number`, `date` as YYYY-MM-DD, `total` as a number, `currency` as
//! an ISO code). Prompting a small base model gets some fields; the normalisation is what
//! a fine-tune learns.

use std::io::Write;
use std::path::Path;

use crate::error::{JobError, Result};
use lathe_data::{Example, Message, Role};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::eval::{Gate, PluginRef, PromptTemplate, Suite};

const VENDORS: &[&str] = &[
    "Acme Tools GmbH",
    "Nordwind Logistics AB",
    "Blue Harbor Foods Ltd",
    "Sierra Print & Copy",
    "Kestrel Software Inc.",
    "Müller Baustoffe KG",
    "Orchid Dental Supplies",
    "Pinecrest Consulting LLC",
    "Rivera Plumbing Co.",
    "Tanaka Electronics KK",
    "Atlas Office Furniture",
    "Greenleaf Catering SARL",
    "Vega Solar Systems",
    "Harbourview Dental Lab",
    "Copperfield Legal LLP",
    "Lumen Lighting BV",
];

/// (ISO code, symbol)
const CURRENCIES: &[(&str, &str)] = &[("EUR", "€"), ("USD", "$"), ("GBP", "£"), ("CHF", "CHF "), ("SEK", "SEK ")];

const MONTHS: [&str; 12] = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December",
];

/// One generated invoice: its text and the normalised fields.
pub struct Invoice {
    pub text: String,
    pub fields: serde_json::Value,
}

fn amount_text(cents: u64, style: usize) -> String {
    let (whole, frac) = (cents / 100, cents % 100);
    let group = |sep: char| {
        let digits = whole.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(sep);
            }
            out.push(c);
        }
        out
    };
    match style {
        0 => format!("{},{frac:02}", group('.')),
        1 => format!("{}.{frac:02}", group(',')),
        _ => format!("{whole}.{frac:02}"),
    }
}

pub fn invoice(rng: &mut StdRng) -> Invoice {
    let vendor = VENDORS[rng.random_range(0..VENDORS.len())];
    let (code, symbol) = CURRENCIES[rng.random_range(0..CURRENCIES.len())];
    let year = rng.random_range(2021..=2025);
    let month = rng.random_range(1..=12u32);
    let day = rng.random_range(1..=28u32);
    let number = match rng.random_range(0..3) {
        0 => format!("INV-{year}-{:04}", rng.random_range(1..10_000)),
        1 => format!("{}", rng.random_range(10_000..99_999)),
        _ => format!("{}{}-{:03}", (b'A' + rng.random_range(0..26u8)) as char, (b'A' + rng.random_range(0..26u8)) as char, rng.random_range(1..1000)),
    };
    let cents: u64 = rng.random_range(1_500..2_500_000);
    let iso = format!("{year}-{month:02}-{day:02}");
    let date = match rng.random_range(0..4) {
        0 => iso.clone(),
        1 => format!("{day:02}.{month:02}.{year}"),
        2 => format!("{} {day}, {year}", MONTHS[month as usize - 1]),
        _ => format!("{day} {} {year}", &MONTHS[month as usize - 1][..3]),
    };
    let amount = amount_text(cents, rng.random_range(0..3));
    let text = match rng.random_range(0..4) {
        0 => format!("INVOICE\nFrom: {vendor}\nInvoice no.: {number}\nDate: {date}\nAmount due: {amount} {code}"),
        1 => format!("{vendor} - Invoice #{number}, issued {date}. Please pay {symbol}{amount} within 30 days."),
        2 => format!("Rechnung {number}\n{vendor}\nDatum: {date}\nGesamtbetrag: {amount} {code}"),
        _ => format!("Bill from {vendor} (ref {number}) dated {date}: total {code} {amount}."),
    };
    let total = (cents as f64) / 100.0;
    Invoice {
        text,
        fields: json!({"vendor": vendor, "invoice_number": number, "date": iso, "total": total, "currency": code}),
    }
}

/// `n` invoices as chat examples (user: the invoice, assistant: the JSON).
pub fn invoice_examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let inv = invoice(&mut rng);
            Example::new(vec![
                Message::new(Role::User, inv.text),
                Message::new(Role::Assistant, inv.fields.to_string()),
            ])
        })
        .collect()
}

/// Writes examples as OpenAI-style chat JSONL (the format `lathe data import` reads).
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    lathe_util::write_atomic_with(path, |f| {
        let mut f = std::io::BufWriter::new(f);
        for e in examples {
            let messages: Vec<serde_json::Value> = e
                .messages
                .iter()
                .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                .collect();
            writeln!(f, "{}", json!({ "messages": messages }))?;
        }
        f.flush()
    })
    .map_err(|e| JobError::io(path, e))
}

/// The JSON Schema every answer must satisfy.
pub fn invoice_schema() -> serde_json::Value {
    json!({
        "type": "object",
        "required": ["vendor", "invoice_number", "date", "total", "currency"],
        "properties": {
            "vendor": {"type": "string"},
            "invoice_number": {"type": "string"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "total": {"type": "number"},
            "currency": {"type": "string", "enum": ["EUR", "USD", "GBP", "CHF", "SEK"]}
        },
        "additionalProperties": false
    })
}

/// The invoice eval suite: two prompt templates, field-level scoring, schema validation,
/// and the gate the fine-tune must clear.
pub fn invoice_suite() -> Suite {
    Suite {
        name: "invoice-fields".into(),
        templates: vec![
            PromptTemplate {
                name: "extract".into(),
                system: None,
                user: "Extract the vendor, invoice_number, date (YYYY-MM-DD), total (a number) and currency (ISO code) from this invoice. Answer with one JSON object only.\n\n{{ input }}".into(),
            },
            PromptTemplate {
                name: "schema".into(),
                system: Some("You are an accounting assistant. You answer with strict JSON and nothing else.".into()),
                user: "Return {\"vendor\": ..., \"invoice_number\": ..., \"date\": \"YYYY-MM-DD\", \"total\": <number>, \"currency\": \"<ISO code>\"} for this invoice:\n{{ input }}".into(),
            },
        ],
        scorers: vec![PluginRef::new("json-field-match", json!({}))],
        validator: Some(PluginRef::new("json-schema", json!({ "schema": invoice_schema() }))),
        judge: None,
        gate: Some(Gate {
            metric: "json-field-match".into(),
            min: 0.8,
        }),
        shots: vec![0, 2],
        max_tokens: 72,
        margin: 0.0,
        batch_size: 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoices_are_reproducible_and_the_answer_is_in_the_text() {
        let a = invoice_examples(50, 3);
        let b = invoice_examples(50, 3);
        assert_eq!(a, b);
        assert_ne!(a, invoice_examples(50, 4));
        for e in &a {
            let v: serde_json::Value = serde_json::from_str(e.target()).unwrap();
            let text = &e.messages[0].content;
            assert!(text.contains(v["vendor"].as_str().unwrap()));
            assert!(text.contains(v["invoice_number"].as_str().unwrap()));
            assert!(v["total"].as_f64().unwrap() > 0.0);
        }
        assert_eq!(amount_text(128_450, 0), "1.284,50");
        assert_eq!(amount_text(128_450, 1), "1,284.50");
        assert_eq!(amount_text(99, 2), "0.99");
    }
}
