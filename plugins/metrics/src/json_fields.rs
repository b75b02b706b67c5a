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
