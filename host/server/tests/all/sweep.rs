//! Every route the OpenAPI document lists, called with another team's token on the first
//! team's ids: each answers 404 (or, for the team's own lists, without the other team's
//! data). Every route also refuses a request without a token. The routes come from the
//! document, which is generated from the router, so a new route cannot skip the check.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::json;

use crate::{Server, two_teams};

crate::on_both_backends!(another_teams_token_finds_nothing_on_any_route);

async fn another_teams_token_finds_nothing_on_any_route(mut s: Server) {
    let t = two_teams(&mut s).await;

    let (status, doc) = s.call(Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 30, "{} paths", paths.len());
    let mut checked = 0;
    for (template, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            // No token: refused before anything is read.
            let uri = t.fill(template);
            let (status, body) = s.send(request(&method, &uri, None, None, t.id("{job}"))).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri} without a token: {body}");

            // Another team's token on the first team's ids.
            let (status, body) = s.send(request(&method, &uri, Some(&t.b), Some(&t.b_project), t.id("{job}"))).await;
            let has_id = template.contains('{');
            if uri.ends_with("completions") {
                // Alpha's fine-tune by the id the fine-tuning API gives it (both teams
                // have a project named `invoices`): as if it did not exist.
                assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri} with another team's fine-tune: {body}");
                assert_eq!(body["error"]["code"], "model_not_found", "{body}");
            } else if has_id {
                assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri} with another team's token: {body}");
            } else {
                // The caller's own lists: nothing of the first team in them.
                let text = body.to_string();
                for id in t.owned_ids() {
                    assert!(!text.contains(id), "{method} {uri} shows another team's {id}: {text}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 35, "{checked} routes checked");
}

/// A request whose body passes each route's extractor, so the answer is the route's own.
/// The completion routes name alpha's `job` as a fine-tuned model.
fn request(method: &Method, uri: &str, token: Option<&str>, project: Option<&str>, job: &str) -> Request<Body> {
    let mut r = Request::builder().method(method.clone()).uri(uri);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    if let Some(p) = project {
        r = r.header("openai-project", p);
    }
    if uri.ends_with("/files") && method == Method::POST {
        let boundary = "b";
        let body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n{{}}\r\n--{boundary}--\r\n");
        return r.header("content-type", format!("multipart/form-data; boundary={boundary}")).body(Body::from(body)).unwrap();
    }
    if method == Method::GET || method == Method::DELETE {
        return r.body(Body::empty()).unwrap();
    }
    let body = if uri.ends_with("completions") {
        let model = format!("ft:tiny:invoices:{job}");
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 2})
    } else if uri.ends_with("/try") {
        json!({"input": {}})
    } else if uri.contains("/members/") {
        json!({"role": "member"})
    } else if uri.ends_with("/packs") && uri.contains("/projects/") {
        json!({"sha256": "0".repeat(64)})
    } else {
        json!({"name": "x"})
    };
    r.header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}
