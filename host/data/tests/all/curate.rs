//! Curation operations on constructed cases with known answers.

use lathe_data::curate::{
    self, DedupeParams, ExactDuplicate, NearCluster, PiiHit, PiiMode, ValidateMode, ValidationFailure,
};
use lathe_data::pii::PiiKind;
use lathe_data::text::{Shingles, jaccard, normalize};
use lathe_data::{DatasetRole, Example, Message, Operation, Role};

use crate::{Env, qa};

fn write(env: &Env, examples: &[Example]) -> String {
    env.store.write_examples(examples, None, Operation::Create { note: "test".into() }, DatasetRole::Full).unwrap().id
}

const LYON: &str = "The delivery of order 1234 was delayed because the warehouse in Lyon ran out of packing boxes during the busy holiday week.";
const LYON_NEAR: &str = "The delivery of order 1234 was delayed because the warehouse in Lyon ran out of packing boxes during the busy holiday weeks!";
const RESET: &str = "Please reset my password; the link you sent yesterday expired before I could use it.";
const RESET_FAR: &str = "Please reset my password, I forgot it after the holidays and cannot log in at all now.";
const INVOICE: &str = "My invoice shows a duplicate charge for the premium subscription in March.";

fn dedupe_fixture() -> Vec<Example> {
    vec![
        qa(LYON, "Sorry for the delay."),
        qa(RESET, "Here is a new link."),
        qa(INVOICE, "We refunded the duplicate charge."),
        qa(LYON_NEAR, "Sorry for the delay."),
        qa(RESET_FAR, "Use the forgot-password page."),
        qa("  please RESET my password; the link you sent   yesterday expired before I could use it. ", "here is a NEW link."),
        qa(RESET, "Here is a new link.").with_label("account"),
    ]
}

#[test]
fn fixture_premises_hold() {
    let s = Shingles::Chars(5);
    let near = jaccard(&normalize(LYON), &normalize(LYON_NEAR), s);
    assert!(near > 0.9, "planted near duplicate has Jaccard {near}");
    let far = jaccard(&normalize(RESET), &normalize(RESET_FAR), s);
    assert!(far < 0.5, "planted non-duplicate has Jaccard {far}");
}

#[test]
fn exact_dedupe_after_normalisation() {
    let env = Env::new();
    let id = write(&env, &dedupe_fixture());
    let out = curate::dedupe(&env.store, &id, &DedupeParams::exact_only()).unwrap();
    assert!(out.changed);
    // 5 normalises to 1; 6 has a label, so it is a different example.
    assert_eq!(out.report.exact, vec![ExactDuplicate { dropped: 5, kept: 1 }]);
    assert_eq!((out.report.input_rows, out.report.output_rows, out.report.near_dropped), (7, 6, 0));
    assert_eq!(out.manifest.parent.as_deref(), Some(id.as_str()));
    assert_eq!(out.manifest.rows, 6);
    assert_eq!(out.manifest.summary["exact_dropped"], 1);
    let kept = env.examples(&out.manifest.id);
    assert_eq!(kept.len(), 6);
    assert!(!kept.iter().any(|e| e.messages[0].content.starts_with("  please")));

    // Nothing left to drop: the same version comes back.
    let again = curate::dedupe(&env.store, &out.manifest.id, &DedupeParams::exact_only()).unwrap();
    assert!(!again.changed);
    assert_eq!(again.manifest.id, out.manifest.id);
}

#[test]
fn near_dedupe_clusters_keep_the_first() {
    let env = Env::new();
    let id = write(&env, &dedupe_fixture());
    let out = curate::dedupe(&env.store, &id, &DedupeParams::default()).unwrap();
    assert_eq!(out.report.exact, vec![ExactDuplicate { dropped: 5, kept: 1 }]);
    // 3 is a near duplicate of 0; 6 has the same messages as 1 (label aside).
    let clusters: Vec<(usize, Vec<usize>)> =
        out.report.near_clusters.iter().map(|c: &NearCluster| (c.kept, c.dropped.iter().map(|m| m.index).collect())).collect();
    assert_eq!(clusters, vec![(0, vec![3]), (1, vec![6])]);
    let sim = out.report.near_clusters[0].dropped[0].similarity;
    assert!((0.8..1.0).contains(&sim), "{sim}");
    assert_eq!(out.report.near_clusters[1].dropped[0].similarity, 1.0);
    assert_eq!(out.report.output_rows, 4);
    let kept: Vec<String> = env.examples(&out.manifest.id).into_iter().map(|e| e.messages[0].content.clone()).collect();
    assert_eq!(kept, [LYON, RESET, INVOICE, RESET_FAR]);

    // A threshold above the pair's similarity keeps it.
    let strict = curate::dedupe(&env.store, &id, &DedupeParams::near(0.99)).unwrap();
    let kept: Vec<usize> = strict.report.near_clusters.iter().map(|c| c.kept).collect();
    assert_eq!(kept, vec![1]);
    assert_eq!(strict.report.output_rows, 5);
}

#[test]
fn near_dedupe_at_scale_finds_planted_pairs_only() {
    // 400 distinct generated sentences, 25 of them with a planted near copy appended.
    let env = Env::new();
    let words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"];
    let sentence = |i: usize| -> String {
        let mut x = i as u64 * 0x9E37_79B9 + 17;
        (0..14)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                words[(x % words.len() as u64) as usize]
            })
            .collect::<Vec<_>>()
            .join(" ")
            + &format!(" #{i}")
    };
    let mut examples: Vec<Example> = (0..400).map(|i| qa(&sentence(i), "ok")).collect();
    for k in 0..25 {
        let i = k * 16;
        examples.push(qa(&format!("{}.", sentence(i)), "ok"));
    }
    let id = write(&env, &examples);
    let out = curate::dedupe(&env.store, &id, &DedupeParams::default()).unwrap();
    let mut found: Vec<(usize, usize)> =
        out.report.near_clusters.iter().flat_map(|c| c.dropped.iter().map(move |m| (c.kept, m.index))).collect();
    found.sort();
    let expected: Vec<(usize, usize)> = (0..25).map(|k| (k * 16, 400 + k)).collect();
    assert_eq!(found, expected);
    assert_eq!(out.report.output_rows, 400);
}

fn pii_fixture() -> Vec<Example> {
    vec![
        qa("My email is jane@example.com", "Noted."),
        qa("Card 4111 1111 1111 1111, SSN 123-45-6789", "Thanks"),
        qa("Order 4111 1111 1111 1112, SSN 000-12-3456, IBAN DE89 3704 0044 0532 0130 01, id 1234567890", "ok"),
        qa("Server at 10.0.0.1 and fe80::1ff:fe23:4567:890a", "Call me at +1 415 555 2671 or (212) 555-0187"),
        qa("hello", "world, pay to GB82 WEST 1234 5698 7654 32"),
        qa("nothing here", "at all"),
    ]
}

#[test]
fn pii_report_lists_spans_without_changing_the_version() {
    let env = Env::new();
    let id = write(&env, &pii_fixture());
    let out = curate::scan_pii(&env.store, &id, PiiMode::Report).unwrap();
    assert!(!out.changed);
    assert_eq!(out.manifest.id, id);
    let hit = |example, field: &str, kind, start, end| PiiHit { example, field: field.into(), kind, start, end };
    assert_eq!(out.report.hits, vec![
        hit(0, "messages[0].content", PiiKind::Email, 12, 28),
        hit(1, "messages[0].content", PiiKind::Card, 5, 24),
        hit(1, "messages[0].content", PiiKind::Ssn, 30, 41),
        hit(3, "messages[0].content", PiiKind::Ip, 10, 18),
        hit(3, "messages[0].content", PiiKind::Ip, 23, 47),
        hit(3, "messages[1].content", PiiKind::Phone, 11, 26),
        hit(3, "messages[1].content", PiiKind::Phone, 30, 44),
        hit(4, "messages[1].content", PiiKind::Iban, 14, 41),
    ]);
    assert_eq!(out.report.rows_with_pii, 4);
    assert_eq!(out.report.counts.get(&PiiKind::Ip), Some(&2));
    assert_eq!(out.report.counts.get(&PiiKind::Phone), Some(&2));
    assert_eq!(env.entries(), vec![id]);
}

#[test]
fn pii_redact_and_drop() {
    let env = Env::new();
    let id = write(&env, &pii_fixture());
    let out = curate::scan_pii(&env.store, &id, PiiMode::Redact).unwrap();
    assert!(out.changed);
    assert_eq!(out.manifest.operation, Operation::Pii { mode: PiiMode::Redact });
    let ex = env.examples(&out.manifest.id);
    assert_eq!(ex[0].messages[0].content, "My email is [EMAIL]");
    assert_eq!(ex[1].messages[0].content, "Card [CARD], SSN [SSN]");
    assert_eq!(ex[2], pii_fixture()[2], "near misses are left alone");
    assert_eq!(ex[3].messages[0].content, "Server at [IP] and [IP]");
    assert_eq!(ex[3].messages[1].content, "Call me at [PHONE] or [PHONE]");
    assert_eq!(ex[4].target(), "world, pay to [IBAN]");
    // Redacted text scans clean.
    assert!(!curate::scan_pii(&env.store, &out.manifest.id, PiiMode::Redact).unwrap().changed);

    let out = curate::scan_pii(&env.store, &id, PiiMode::Drop).unwrap();
    let kept: Vec<Example> = env.examples(&out.manifest.id);
    assert_eq!(kept, vec![pii_fixture()[2].clone(), pii_fixture()[5].clone()]);
    assert_eq!(out.report.output_rows, 2);
}

#[test]
fn output_validator_report_and_drop() {
    let env = Env::new();
    let id = write(&env, &[qa("a", r#"{"answer": 1}"#), qa("b", "not json"), qa("c", r#"{"x": 2}"#)]);
    let validator = |out: &str| -> Result<(), Vec<String>> {
        let v: serde_json::Value = serde_json::from_str(out).map_err(|e| vec![format!("not JSON: {e}")])?;
        if v.get("answer").is_none() { Err(vec!["missing key `answer`".into()]) } else { Ok(()) }
    };
    let out = curate::validate_outputs(&env.store, &id, &validator, "json-answer", ValidateMode::Report).unwrap();
    assert!(!out.changed);
    assert_eq!((out.report.checked, out.report.passed), (3, 1));
    assert_eq!(out.report.failures[1], ValidationFailure { example: 2, violations: vec!["missing key `answer`".into()] });
    assert_eq!(out.report.failures[0].example, 1);
    assert!(out.report.failures[0].violations[0].starts_with("not JSON"));

    let out = curate::validate_outputs(&env.store, &id, &validator, "json-answer", ValidateMode::Drop).unwrap();
    assert!(out.changed);
    assert_eq!(env.examples(&out.manifest.id), vec![qa("a", r#"{"answer": 1}"#)]);
    assert_eq!(out.manifest.operation, Operation::Validate { validator: "json-answer".into(), mode: ValidateMode::Drop });
}

#[test]
fn statistics_of_a_known_set() {
    let env = Env::new();
    let examples = vec![
        qa("abcd", "xy").with_label("A"),
        qa("é", "x y z").with_label("A"),
        Example::new(vec![
            Message::new(Role::System, "s"),
            Message::new(Role::User, "uu"),
            Message::new(Role::Assistant, "a"),
        ]),
        qa("ABCD ", "xy").with_label("A"),
        qa("mail me: x@y.org", "ok").with_label("B"),
    ];
    let id = write(&env, &examples);
    let words = |t: &str| t.split_whitespace().count();
    let s = curate::statistics(&env.store, &id, Some(&words)).unwrap();
    assert_eq!(s.rows, 5);
    assert_eq!((s.messages_per_example.min, s.messages_per_example.max), (2, 3));
    // Prompt chars: 4, 1, 3, 5, 16 → sorted 1 3 4 5 16.
    assert_eq!((s.chars.prompt.min, s.chars.prompt.p50, s.chars.prompt.p95, s.chars.prompt.max), (1, 4, 16, 16));
    assert!((s.chars.prompt.mean - 29.0 / 5.0).abs() < 1e-9);
    // Completion tokens: 1, 3, 1, 1, 1.
    let t = s.tokens.unwrap();
    assert_eq!((t.completion.min, t.completion.p50, t.completion.max), (1, 1, 3));
    assert_eq!(t.total.max, 4);
    assert_eq!(s.labels.get("A"), Some(&3));
    assert_eq!(s.labels.get("B"), Some(&1));
    assert_eq!(s.unlabelled, 1);
    assert_eq!(s.exact_duplicates, 1);
    assert_eq!((s.rows_with_pii, s.pii.get(&PiiKind::Email)), (1, Some(&1)));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["pii"]["email"], 1);
    assert!(curate::statistics(&env.store, &id, None).unwrap().tokens.is_none());
}
