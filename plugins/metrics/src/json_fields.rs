//! Field-by-field comparison of JSON objects, for structured extraction tasks.

use serde_json::Value;

use crate::Score;

/// Every leaf of `v` as (JSON pointer, value): objects recurse, arrays and scalars are
/// leaves (an array is compared whole).
pub fn leaves(v: &Value) -> Vec<(String, &Value)> {
    fn walk<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, child) in map {
                    let key = k.replace('~', "~0").replace('/', "~1");
                    walk(child, format!("{path}/{key}"), out);
                }
            }
            _ => out.push((path, v)),
        }
    }
    let mut out = Vec::new();
    walk(v, String::new(), &mut out);
    out
}

/// Scalars compare with light normalisation: strings trimmed and case-folded when
/// `ignore_case`, numbers by value (so `3` equals `3.0`).
fn same(a: &Value, b: &Value, ignore_case: bool) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => {
            if ignore_case { x.trim().to_lowercase() == y.trim().to_lowercase() } else { x.trim() == y.trim() }
        }
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Each leaf of the reference scores 1 when the prediction has an equal value at the same
/// path; the value is their mean. An unparsable prediction scores 0 on every field; an
/// unparsable reference is the caller's error.
pub fn field_match(prediction: &str, reference: &str, fields: Option<&[String]>, ignore_case: bool) -> Result<Score, String> {
    let reference: Value =
        serde_json::from_str(reference).map_err(|e| format!("the reference is not valid JSON: {e}"))?;
    let prediction: Option<Value> = serde_json::from_str(prediction).ok();
    let mut details = Vec::new();
    for (path, want) in leaves(&reference) {
        if let Some(only) = fields
            && !only.iter().any(|f| *f == path || f.trim_start_matches('/') == path.trim_start_matches('/'))
        {
            continue;
        }
        let got = prediction.as_ref().and_then(|p| p.pointer(&path));
        let ok = got.is_some_and(|g| same(g, want, ignore_case));
        details.push((path, if ok { 1.0 } else { 0.0 }));
    }
    let value = if details.is_empty() {
        if prediction.is_some() { 1.0 } else { 0.0 }
    } else {
        details.iter().map(|d| d.1).sum::<f64>() / details.len() as f64
    };
    Ok(Score { value, details })
}

/// The value of [`field_match`] without its details: walks both objects together instead
/// of building a JSON pointer per field (the batch path).
pub fn field_match_value(prediction: &str, reference: &str, ignore_case: bool) -> Result<f64, String> {
    fn walk(r: &Value, p: Option<&Value>, ignore_case: bool, hits: &mut usize, total: &mut usize) {
        match r {
            Value::Object(map) if !map.is_empty() => {
                for (k, child) in map {
                    walk(child, p.and_then(|p| p.get(k)), ignore_case, hits, total);
                }
            }
            _ => {
                *total += 1;
                if p.is_some_and(|p| same(p, r, ignore_case)) {
                    *hits += 1;
                }
            }
        }
    }
    let reference: Value =
        serde_json::from_str(reference).map_err(|e| format!("the reference is not valid JSON: {e}"))?;
    let prediction: Option<Value> = serde_json::from_str(prediction).ok();
    let (mut hits, mut total) = (0, 0);
    walk(&reference, prediction.as_ref(), ignore_case, &mut hits, &mut total);
    Ok(if total == 0 { f64::from(u8::from(prediction.is_some())) } else { hits as f64 / total as f64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_score_one_by_one() {
        let r = r#"{"vendor": "ACME GmbH", "total": 12.5, "address": {"city": "Köln", "zip": "50667"}}"#;
        let p = r#"{"vendor": " ACME GmbH", "total": 12.50, "address": {"city": "Koeln", "zip": "50667"}, "extra": 1}"#;
        let s = field_match(p, r, None, false).unwrap();
        assert_eq!(s.value, 0.75);
        let city = s.details.iter().find(|d| d.0 == "/address/city").unwrap();
        assert_eq!(city.1, 0.0);
        let only = vec!["total".to_string(), "/vendor".to_string()];
        assert_eq!(field_match(p, r, Some(&only), false).unwrap().value, 1.0);
    }

    #[test]
    fn the_value_path_agrees_with_the_detailed_one() {
        let r = r#"{"vendor": "ACME", "total": 12.5, "address": {"city": "Köln", "zip": "50667"}, "tags": [1]}"#;
        for p in [r, r#"{"vendor": "acme", "total": 12.50, "address": {"city": "Köln"}}"#, "nope", "{}", "[]"] {
            for ic in [false, true] {
                assert_eq!(field_match_value(p, r, ic).unwrap(), field_match(p, r, None, ic).unwrap().value, "{p}");
            }
        }
        assert!(field_match_value("{}", "x", false).is_err());
    }

    #[test]
    fn invalid_or_missing_predictions_score_zero() {
        let r = r#"{"a": 1, "b": [1, 2]}"#;
        let s = field_match("not json {", r, None, false).unwrap();
        assert_eq!(s.value, 0.0);
        assert_eq!(s.details.len(), 2);
        assert_eq!(field_match(r#"{"a": 1}"#, r, None, false).unwrap().value, 0.5);
        assert_eq!(field_match(r#"{"a": 1, "b": [2, 1]}"#, r, None, false).unwrap().value, 0.5);
        assert!(field_match("{}", "nope", None, false).unwrap_err().contains("reference is not valid JSON"));
        assert_eq!(field_match(r#"{"Name": "ÅSA"}"#, r#"{"Name": "åsa"}"#, None, true).unwrap().value, 1.0);
    }
}
