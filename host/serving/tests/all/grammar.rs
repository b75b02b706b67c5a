//! JSON-schema constrained decoding: whatever the model would say, what comes out parses
//! and validates against the schema (checked by the `jsonschema` crate, which the
//! json-schema plugin uses), next to unconstrained requests in the same batch.

use lathe_engine::{FinishReason, SamplingParams};
use lathe_serving::{Request, Scheduler, ServeConfig, ServeError};
use serde_json::{Value, json};

use crate::{chat, collect, prompt, tiny};

/// Every value bounded, so a complete document always fits in the token budget.
fn invoice_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "invoice": { "type": "string", "maxLength": 10 },
            "currency": { "enum": ["EUR", "USD", "GBP"] },
            "paid": { "type": "boolean" },
            "lines": { "type": "array", "items": { "type": "integer", "minimum": 0, "maximum": 99 }, "maxItems": 3 },
            "customer": {
                "type": "object",
                "properties": { "name": { "type": "string", "maxLength": 8 }, "vip": { "type": "boolean" } },
                "required": ["name"],
                "additionalProperties": false
            }
        },
        "required": ["invoice", "currency", "paid", "lines", "customer"],
        "additionalProperties": false
    })
}

fn tags_schema() -> Value {
    json!({ "type": "array", "items": { "enum": ["urgent", "billing", "bug"] }, "minItems": 1, "maxItems": 4 })
}

fn constrained(prompt: Vec<u32>, params: SamplingParams, schema: &Value) -> Request {
    Request {
        prompt,
        params,
        adapter: None,
        logprobs: None,
        json_schema: Some(schema.clone()),
    }
}

fn assert_valid(schema: &Value, text: &str) {
    let doc: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let validator = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{text} fails its schema: {errors:?}");
}

#[test]
fn schema_constrained_answers_from_a_random_model_always_parse_and_validate() {
    // A random model left alone writes noise: every document below is the mask's doing.
    let t = tiny();
    let s = Scheduler::start(t.model.clone(), ServeConfig::default());
    let schemas = [invoice_schema(), tags_schema()];
    let mut streams = Vec::new();
    for i in 0..12u32 {
        let params = SamplingParams { temperature: 1.0, seed: u64::from(i), max_tokens: 200, ..SamplingParams::default() };
        let schema = &schemas[i as usize % 2];
        streams.push((Some(schema), s.submit(constrained(prompt(i, 4 + i as usize), params.clone(), schema)).unwrap()));
        // Unconstrained requests share the batch.
        if i % 3 == 0 {
            streams.push((None, s.submit(crate::request(prompt(i + 50, 6), params, None)).unwrap()));
        }
    }
    let mut free_text_is_not_json = 0;
    for (schema, rx) in streams {
        let out = collect(rx);
        match schema {
            Some(schema) => {
                assert_eq!(out.finish, FinishReason::Stop, "the document ends by itself: {}", out.text);
                assert_valid(schema, &out.text);
                assert_eq!(out.streamed, out.text);
            }
            None => free_text_is_not_json += usize::from(serde_json::from_str::<Value>(&out.text).is_err()),
        }
    }
    assert_eq!(free_text_is_not_json, 4, "without a schema the random model does not write JSON");
}

#[test]
fn a_schema_that_cannot_compile_is_refused_with_the_reason_and_the_scheduler_keeps_serving() {
    let t = tiny();
    let s = Scheduler::start(t.model.clone(), ServeConfig::default());
    let params = SamplingParams { max_tokens: 8, ..SamplingParams::default() };
    for bad in [json!({ "type": "frobnicate" }), json!({ "$ref": "#/$defs/missing" })] {
        match s.submit(constrained(prompt(1, 5), params.clone(), &bad)) {
            Err(ServeError::Schema(e)) => assert!(!e.is_empty()),
            other => panic!("{bad} was accepted: {other:?}"),
        }
    }
    let out = collect(s.submit(constrained(prompt(1, 5), SamplingParams { max_tokens: 200, ..params }, &tags_schema())).unwrap());
    assert_valid(&tags_schema(), &out.text);
}

#[test]
fn smollm2_extracts_an_invoice_into_the_schema() {
    let model = crate::smollm2::smollm2();
    let s = Scheduler::start(model.clone(), ServeConfig::default());
    let note = "Invoice INV-0042 from ACME for Bob (a VIP customer): 3 lines priced 12, 40 and 7 EUR. Already paid.";
    let prompt = chat(&model, &format!("Extract the invoice as JSON.\n\n{note}"));
    let greedy = SamplingParams { max_tokens: 120, ..SamplingParams::default() };
    let free = collect(s.submit(crate::request(prompt.clone(), greedy.clone(), None)).unwrap());
    let schema = invoice_schema();
    let out = collect(s.submit(constrained(prompt.clone(), greedy.clone(), &schema)).unwrap());
    assert_eq!(out.finish, FinishReason::Stop, "{}", out.text);
    assert_valid(&schema, &out.text);
    assert_ne!(free.text, out.text, "the schema changed the answer");
    // Any JSON object (OpenAI's json_object): the mask keeps it JSON, the prompt says what
    // to put in it.
    let object = json!({ "type": "object" });
    let prompt = chat(&model, "What is the capital of France? Answer with a JSON object whose only key is \"capital\".");
    let out = collect(s.submit(constrained(prompt, SamplingParams { max_tokens: 60, ..greedy }, &object)).unwrap());
    assert_eq!(out.finish, FinishReason::Stop, "{}", out.text);
    let doc: Value = serde_json::from_str(&out.text).unwrap();
    assert!(doc.is_object(), "{}", out.text);
    assert!(out.text.contains("Paris"), "{}", out.text);
}
