//! The REST API end to end: a team uploads data and a plugin, defines a suite (checked),
//! runs the workflow's jobs through a worker, follows events, cancels, downloads.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use lathe_store::NewPlugin;
use serde_json::{Value, json};

use crate::{Server, team_with_project, words_jsonl, words_suite};

crate::on_both_backends!(the_workflow_runs_through_the_api, tokens_and_limits_are_enforced, members_and_their_roles, jobs_pin_their_plugins, packs_install_and_upgrade, jobs_wait_for_a_worker_that_fits);

async fn the_workflow_runs_through_the_api(mut s: Server) {
    let (token, project) = team_with_project(&s, "acme").await;
    let t = Some(token.as_str());
    let base = format!("/api/v1/projects/{project}");

    // A job queued before any worker runs is cancelled at once (and retried below).
    let split = json!({"kind": "data_split", "version": "words", "heldout": 0.2, "name": "words"});
    let (status, queued) = s.call(Method::POST, &format!("{base}/jobs"), t, Some(split)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let (status, cancelled) = s.call(Method::POST, &format!("{base}/jobs/{}/cancel", queued["id"].as_str().unwrap()), t, None).await;
    assert_eq!((status, cancelled["state"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    let cancelled_id = cancelled["id"].as_str().unwrap().to_string();
    s.start_worker();

    // Data: upload, import (format detected), split.
    let (status, file) = s.upload(&format!("{base}/files"), &token, None, "../../etc/words.jsonl", &words_jsonl(40)).await;
    assert_eq!(status, StatusCode::CREATED, "{file}");
    assert_eq!(file["bytes"], words_jsonl(40).len());
    let imported = s.run_job(&project, &token, json!({"kind": "data_import", "file_id": file["id"], "name": "words"})).await;
    assert_eq!(imported["outcome"]["report"]["rows"], 40, "{imported}");
    assert_eq!(imported["outcome"]["report"]["source"], "../../etc/words.jsonl", "the user's name is metadata only");

    // A CSV upload: the preview shows its columns and a mapping guessed from their names;
    // the import reads it as CSV (the stored upload has no extension, its name has).
    let csv = b"question,answer,category\nsay the cat,the cat,animals\nsay the dog,the dog,animals\n";
    let (_, file) = s.upload(&format!("{base}/files"), &token, None, "pets.csv", csv).await;
    let (status, preview) = s.call(Method::GET, &format!("{base}/files/{}/preview", file["id"].as_str().unwrap()), t, None).await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!((preview["container"].as_str(), &preview["format"]), (Some("csv"), &serde_json::Value::Null), "{preview}");
    assert_eq!(preview["columns"], json!(["answer", "category", "question"]));
    assert_eq!(preview["mapping"], json!({"prompt": "question", "completion": "answer", "system": null, "label": "category"}));
    assert_eq!(preview["records"].as_array().unwrap().len(), 2);
    let pets = s.run_job(&project, &token, json!({"kind": "data_import", "file_id": file["id"], "mapping": preview["mapping"]})).await;
    assert_eq!((pets["outcome"]["report"]["container"].as_str(), pets["outcome"]["report"]["rows"].as_u64()), (Some("csv"), Some(2)), "{pets}");
    // The cancelled split, retried now that its data is there: the same job runs.
    let (status, retried) = s.call(Method::POST, &format!("{base}/jobs/{cancelled_id}/retry"), t, None).await;
    assert_eq!((status, retried["state"].as_str(), retried["max_attempts"].as_i64()), (StatusCode::OK, Some("queued"), Some(1)), "{retried}");
    let split = s.wait(&project, &cancelled_id, &token).await;
    assert_eq!(split["state"], "succeeded", "{split}");
    let (status, again) = s.call(Method::POST, &format!("{base}/jobs/{cancelled_id}/retry"), t, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    let (status, versions) = s.call(Method::GET, &format!("{base}/datasets"), t, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(versions["data"].as_array().unwrap().len(), 4, "words, its two parts, and pets: {versions}");
    let (_, held) = s.call(Method::GET, &format!("{base}/datasets/words.heldout"), t, None).await;
    assert_eq!(held["manifest"]["role"], "heldout");
    assert_eq!(held["lineage"].as_array().unwrap().len(), 2, "{held}");
    let (_, examples) = s.call(Method::GET, &format!("{base}/datasets/words.train/examples?limit=3"), t, None).await;
    assert_eq!(examples["data"].as_array().unwrap().len(), 3, "{examples}");

    // Plugins: an upload goes through the sandbox's checks; a bad one gets its reason.
    let (status, refused) = s.send(raw_post(&format!("{base}/plugins"), &token, b"not wasm at all".to_vec())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("plugin refused"), "{refused}");
    let scorer = lathe_sandbox::builtin("token-f1").unwrap().to_vec();
    let (status, plugin) = s.send(raw_post(&format!("{base}/plugins"), &token, scorer.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{plugin}");
    assert_eq!(plugin["plugin"]["sha256"], lathe_util::sha256_hex(&scorer));
    assert_eq!(plugin["info"]["world"], "lathe:plugin/scorer@0.1.0");
    let (status, tried) = s
        .call(Method::POST, &format!("{base}/plugins/token-f1/try"), t, Some(json!({"input": {"prediction": "the cat", "reference": "the cat"}})))
        .await;
    assert_eq!(status, StatusCode::OK, "{tried}");
    assert_eq!(tried["scores"][0]["score"], 1.0);

    // Suites are checked against the project's plugins when saved.
    let (status, bad) = s.call(Method::PUT, &format!("{base}/suites/words"), t, Some(words_suite("accuracy"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad["error"]["message"].as_str().unwrap().contains("`exact-match`"), "{bad}");
    let (status, saved) = s.call(Method::PUT, &format!("{base}/suites/words"), t, Some(words_suite("exact-match"))).await;
    assert_eq!(status, StatusCode::OK, "{saved}");

    // The project's settings file: the defaults its training jobs start from, checked first.
    let put_settings = |text: &'static str| {
        Request::builder()
            .method(Method::PUT)
            .uri(format!("{base}/settings"))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(text))
            .unwrap()
    };
    let (status, bad) = s.send(put_settings("[train]\nrnk = 4\n")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert!(bad["error"]["message"].as_str().unwrap().contains("`rnk`"), "{bad}");
    let (status, saved) = s.send(put_settings("[train]\nrank = 4\nmax_steps = 3\n")).await;
    assert_eq!((status, saved["train"]["rank"].as_u64()), (StatusCode::OK, Some(4)), "{saved}");
    let (_, settings) = s.call(Method::GET, &format!("{base}/settings"), t, None).await;
    assert_eq!((settings["train"]["max_steps"].as_u64(), settings["train"]["alpha"].as_f64()), (Some(3), Some(32.0)), "{settings}");

    // Baseline, training, evaluation of the adapter.
    let baseline = s.run_job(&project, &token, json!({"kind": "eval_baseline", "model": "tiny", "suite": "words", "data": "words.heldout", "train": "words.train", "limit": 4})).await;
    let baseline_run = baseline["outcome"]["baseline"]["best"]["id"].as_str().unwrap().to_string();
    let (status, unknown_model) = s.call(Method::POST, &format!("{base}/jobs"), t, Some(json!({"kind": "train", "model": "gpt-9", "suite": "words", "data": "words.train"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(unknown_model["error"]["message"].as_str().unwrap().contains("`tiny`"), "{unknown_model}");
    let trained = s
        .run_job(&project, &token, json!({"kind": "train", "model": "tiny", "suite": "words", "data": "words.train", "settings": {"learning_rate": 1e-3, "metric_items": 0}}))
        .await;
    let train_id = trained["id"].as_str().unwrap().to_string();
    let (_, events) = s.call(Method::GET, &format!("{base}/jobs/{train_id}/events"), t, None).await;
    let events = events["data"].as_array().unwrap().clone();
    let losses = events.iter().filter(|e| e["kind"] == "metric" && e["data"]["series"] == "train/loss").count();
    assert_eq!(losses, 3, "{events:?}");
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    // The server's paths are not the team's to know: the job and its log name the model
    // by its name and the adapter relative to the data folder.
    let data_dir = s.state.config.data_dir.display().to_string();
    assert!(trained.to_string().contains("projects/") && !trained.to_string().contains(&data_dir), "{trained}");
    assert_eq!(trained["spec"]["model"], "tiny", "{trained}");
    assert!(!Value::Array(events.clone()).to_string().contains(&data_dir), "{events:?}");

    // The event stream resumes after Last-Event-ID and ends with the job.
    let last = *seqs.last().unwrap();
    let req = Request::builder()
        .uri(format!("{base}/jobs/{train_id}/events/stream"))
        .header("authorization", format!("Bearer {token}"))
        .header("last-event-id", (last - 2).to_string())
        .body(Body::empty())
        .unwrap();
    let (status, stream) = s.send(req).await;
    assert_eq!(status, StatusCode::OK);
    let text = stream.as_str().unwrap();
    let ids: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert_eq!(ids, vec![(last - 1).to_string(), last.to_string()], "{text}");
    assert!(text.contains("event: end"), "{text}");

    let evaluated = s
        .run_job(&project, &token, json!({"kind": "eval_run", "model": "tiny", "adapter_job": train_id, "suite": "words", "data": "words.heldout", "limit": 4}))
        .await;
    let run_id = evaluated["outcome"]["run"]["id"].as_str().unwrap();
    let (status, run) = s.call(Method::GET, &format!("{base}/runs/{run_id}"), t, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(run["items"].as_array().unwrap().len(), 4);
    // The report with the regression pack: the verdict and the forgetting check in one.
    let report = s
        .run_job(&project, &token, json!({"kind": "eval_report", "baseline": baseline_run, "candidate": run_id, "forgetting": {"arithmetic": 3}}))
        .await;
    let report_id = report["id"].as_str().unwrap();
    let (status, html) = s.call(Method::GET, &format!("{base}/jobs/{report_id}/artifacts/report.html"), t, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.as_str().unwrap().contains("<svg"));
    assert!(html.as_str().unwrap().contains("Regression pack"));
    let (_, json) = s.call(Method::GET, &format!("{base}/jobs/{report_id}/artifacts/report.json"), t, None).await;
    assert!(!json.to_string().contains(&data_dir) && !html.as_str().unwrap().contains(&data_dir), "the report names no server path");
    let (_, run) = s.call(Method::GET, &format!("{base}/runs/{run_id}"), t, None).await;
    assert!(!run.to_string().contains(&data_dir), "{run}");
    let forgetting = &json["forgetting"];
    let tasks = forgetting["tasks"].as_object().unwrap();
    assert!(!tasks.is_empty() && forgetting["forgot"].is_boolean(), "{forgetting}");
    for task in tasks.keys() {
        assert!(forgetting["base"][task]["mean"].is_f64() && forgetting["tuned"][task]["mean"].is_f64(), "{task}: {forgetting}");
    }
    // A report whose candidate has no adapter cannot check for forgetting, and says why.
    let (status, refused) = s.call(Method::POST, &format!("{base}/jobs"), t, Some(json!({"kind": "eval_report", "baseline": baseline_run, "candidate": baseline_run, "forgetting": {}}))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let failed = s.wait(&project, refused["id"].as_str().unwrap(), &token).await;
    assert!(failed["error"].as_str().unwrap_or("").contains("has no adapter"), "{failed}");
    let regression = s.run_job(&project, &token, json!({"kind": "eval_regression", "model": "tiny", "adapter_job": train_id, "arithmetic": 3})).await;
    assert!(regression["outcome"]["tasks"].as_object().is_some_and(|t| !t.is_empty()), "{regression}");
    let (status, _) = s.call(Method::GET, &format!("{base}/runs/..%2F..%2Fetc"), t, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "run ids are never paths");

    deploy_and_roll_back(&s, &project, &token, &train_id).await;

    // The adapter downloads; an export job writes a merged GGUF.
    let (status, adapter) = s.send(get(&format!("{base}/jobs/{train_id}/artifacts/adapter_config.json"), &token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(adapter["r"], 4, "{adapter}");
    s.run_job(&project, &token, json!({"kind": "export", "train_job": train_id, "format": "gguf-f16"})).await;

    // Metrics count what happened.
    let (_, metrics) = s.call(Method::GET, "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("lathe_jobs{state=\"succeeded\"} 10"), "{metrics}");
    assert!(metrics.contains("lathe_jobs{state=\"cancelled\"} 0"), "the cancelled job was retried: {metrics}");
    assert!(metrics.contains("lathe_jobs{state=\"failed\"} 1"), "{metrics}");
    assert!(metrics.contains("lathe_job_duration_seconds_count 11"), "{metrics}");
    assert!(metrics.contains("vllm:request_success_total{finished_reason=\"length\",model_name=\"tiny\"}"), "{metrics}");

    quantized_variant(&s, &project, &token, &train_id).await;
}

/// A quantized variant: the merged fine-tune exported as int8 passes the gate itself
/// before it is deployed, serves through its alias as a model of its own, and the report
/// shows what each step cost.
async fn quantized_variant(s: &Server, project: &str, token: &str, train_id: &str) {
    let t = Some(token);
    let (base, deployments) = (format!("/api/v1/projects/{project}"), format!("/api/v1/projects/{project}/deployments"));
    let export = s.run_job(project, token, json!({"kind": "export", "train_job": train_id, "format": "gguf-q8_0"})).await;
    let export_id = export["id"].as_str().unwrap();
    let (status, refused) = s.call(Method::POST, &deployments, t, Some(json!({"name": "int8", "job_id": export_id}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains(&format!("`export_job: {export_id}`")), "{refused}");
    // An export is evaluated as a model of its own, not as a base with an adapter.
    let both = json!({"kind": "eval_run", "model": "tiny", "export_job": export_id, "suite": "words-lenient", "data": "words.heldout"});
    assert_eq!(s.call(Method::POST, &format!("{base}/jobs"), t, Some(both)).await.0, StatusCode::BAD_REQUEST);
    let not_export = json!({"kind": "eval_run", "export_job": train_id, "suite": "words-lenient", "data": "words.heldout"});
    let (status, body) = s.call(Method::POST, &format!("{base}/jobs"), t, Some(not_export)).await;
    assert!(status == StatusCode::BAD_REQUEST && body.to_string().contains("not a succeeded export job"), "{body}");

    let whole = |extra: Value| {
        let mut spec = json!({"kind": "eval_run", "suite": "words-lenient", "data": "words.heldout"});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        spec
    };
    let prompted = s.run_job(project, token, whole(json!({"model": "tiny"}))).await;
    let tuned = s.run_job(project, token, whole(json!({"model": "tiny", "adapter_job": train_id}))).await;
    let int8 = s.run_job(project, token, whole(json!({"export_job": export_id}))).await;
    assert_eq!(int8["outcome"]["run"]["passed_gate"], true, "{int8}");
    assert!(int8["outcome"]["run"]["adapter"].is_null(), "{int8}");

    let (status, v) = s.call(Method::POST, &deployments, t, Some(json!({"name": "int8", "job_id": export_id}))).await;
    assert_eq!((status, v["eval_job_id"].as_str()), (StatusCode::CREATED, int8["id"].as_str()), "{v}");
    let (_, got) = s.call(Method::GET, &format!("{deployments}/int8"), t, None).await;
    let version = &got["current"]["version"];
    assert_eq!((version["export_format"].as_str(), version["adapter_job"].as_str()), (Some("gguf-q8_0"), Some(train_id)), "{version}");
    assert_eq!(version["dataset"].as_str().map(str::len), Some(64), "the lineage is the training's: {version}");
    assert!(!version.to_string().contains(&s.state.config.data_dir.display().to_string()), "{version}");

    // The alias and the export's own id answer alike, from the export's own scheduler.
    let ask = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "say the cat 3"}], "temperature": 0, "max_tokens": 12});
    let (status, via_alias) = s.call(Method::POST, "/v1/chat/completions", t, Some(ask("invoices/int8"))).await;
    assert_eq!(status, StatusCode::OK, "{via_alias}");
    let ft = format!("ft:tiny:invoices:{export_id}");
    let (status, via_ft) = s.call(Method::POST, "/v1/chat/completions", t, Some(ask(&ft))).await;
    assert_eq!(status, StatusCode::OK, "{via_ft}");
    assert_eq!(via_alias["choices"][0]["message"], via_ft["choices"][0]["message"]);
    assert_eq!(via_alias["choices"][0]["validation"]["plugin"], "json-schema", "the gate's validator checks the variant too: {via_alias}");
    let (_, metrics) = s.call(Method::GET, "/metrics", None, None).await;
    assert!(metrics.as_str().unwrap().contains(&format!("model_name=\"{ft}\"")), "{metrics}");

    // The report: base with its prompt → fine-tune → int8, each step's cost paired.
    let run = |job: &Value| job["outcome"]["run"]["id"].as_str().unwrap().to_string();
    let report = s
        .run_job(project, token, json!({"kind": "eval_report", "baseline": run(&prompted), "candidate": run(&tuned), "variants": [run(&int8)]}))
        .await;
    let (_, json) = s.call(Method::GET, &format!("{base}/jobs/{}/artifacts/report.json", report["id"].as_str().unwrap()), t, None).await;
    let steps: Vec<&str> = json["steps"].as_array().unwrap().iter().map(|x| x["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["fine-tune", "quantize to int8 (Q8_0)"], "{json}");
    let runs = json["runs"].as_array().unwrap();
    assert_eq!((runs[2]["label"].as_str(), runs[2]["weights"]["format"].as_str()), (Some("candidate int8 (Q8_0)"), Some("Q8_0")), "{json}");
    assert!(runs[1]["weights"]["adapter_bytes"].as_u64().is_some_and(|b| b > 0), "{json}");
    let (_, html) = s.call(Method::GET, &format!("{base}/jobs/{}/artifacts/report.html", report["id"].as_str().unwrap()), t, None).await;
    assert!(html.as_str().unwrap().contains("What each step costs"), "{html}");
}

async fn tokens_and_limits_are_enforced(s: Server) {
    let (token, project) = team_with_project(&s, "acme").await;
    assert_eq!(s.call(Method::GET, "/api/v1/projects", None, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(s.call(Method::GET, "/api/v1/projects", Some("lathe_nope_nope"), None).await.0, StatusCode::UNAUTHORIZED);

    // A second token, listed by id without its secret, revoked.
    let (status, made) = s.call(Method::POST, "/api/v1/tokens", Some(&token), Some(json!({"name": "ci"}))).await;
    assert_eq!(status, StatusCode::CREATED);
    let ci = made["token"].as_str().unwrap().to_string();
    assert!(ci.starts_with("lathe_"));
    assert_eq!(s.call(Method::GET, "/api/v1/projects", Some(&ci), None).await.0, StatusCode::OK);
    let (_, list) = s.call(Method::GET, "/api/v1/tokens", Some(&token), None).await;
    assert!(!list.to_string().contains(&ci[ci.rfind('_').unwrap() + 1..]), "secrets are never listed");
    let used = list["data"].as_array().unwrap().iter().find(|t| t["name"] == "ci").unwrap().clone();
    assert!(used["last_used_at"].is_i64(), "{used}");
    let (status, _) = s.call(Method::DELETE, &format!("/api/v1/tokens/{}", used["id"].as_str().unwrap()), Some(&token), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(s.call(Method::GET, "/api/v1/projects", Some(&ci), None).await.0, StatusCode::UNAUTHORIZED);

    // Only an admin token makes teams.
    let (status, _) = s.call(Method::POST, "/api/v1/teams", Some(&token), Some(json!({"name": "evil"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Uploads over the limit are refused with the limit, and nothing is listed.
    let (status, big) = s.upload(&format!("/api/v1/projects/{project}/files"), &token, None, "big.jsonl", &vec![b'x'; 2 << 20]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{big}");
    let (_, files) = s.call(Method::GET, &format!("/api/v1/projects/{project}/files"), Some(&token), None).await;
    assert_eq!(files["data"].as_array().unwrap().len(), 0);
    // A duplicate project name is a conflict.
    let (status, _) = s.call(Method::POST, "/api/v1/projects", Some(&token), Some(json!({"name": "invoices"}))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A malformed job request says what is wrong.
    let (status, bad) = s.call(Method::POST, &format!("/api/v1/projects/{project}/jobs"), Some(&token), Some(json!({"kind": "train", "modle": "tiny"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad["error"]["message"].as_str().unwrap().contains("modle"), "{bad}");
}

async fn members_and_their_roles(s: Server) {
    let (team, _) = team_with_project(&s, "clinic").await;
    let s = &s;
    let call = |method: Method, uri: String, token: &str, body: Option<serde_json::Value>| {
        let token = token.to_string();
        async move { s.call(method, &uri, Some(&token), body).await }
    };
    // The team's first token adds an owner and a member; each gets a first token, once.
    let (status, ana) = call(Method::POST, "/api/v1/members".into(), &team, Some(json!({"name": "Ana", "role": "owner"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{ana}");
    let (status, bo) = call(Method::POST, "/api/v1/members".into(), &team, Some(json!({"name": "Bo"}))).await;
    assert_eq!((status, bo["member"]["role"].as_str()), (StatusCode::CREATED, Some("member")), "{bo}");
    let (ana_id, ana_token) = (ana["member"]["id"].as_str().unwrap(), ana["token"].as_str().unwrap());
    let (bo_id, bo_token) = (bo["member"]["id"].as_str().unwrap(), bo["token"].as_str().unwrap());
    let (status, bad) = call(Method::POST, "/api/v1/members".into(), &team, Some(json!({"name": "Cy", "role": "root"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad["error"]["message"].as_str().unwrap().contains("role `root`"), "{bad}");
    let (status, _) = call(Method::POST, "/api/v1/members".into(), &team, Some(json!({"name": "Bo"}))).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // A member works in the team's projects but manages neither members nor others' tokens.
    assert_eq!(call(Method::GET, "/api/v1/projects".into(), bo_token, None).await.0, StatusCode::OK);
    let (status, refused) = call(Method::POST, "/api/v1/members".into(), bo_token, Some(json!({"name": "Eve", "role": "owner"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("owners"), "{refused}");
    assert_eq!(call(Method::PATCH, format!("/api/v1/members/{bo_id}"), bo_token, Some(json!({"role": "owner"}))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(call(Method::DELETE, format!("/api/v1/members/{ana_id}"), bo_token, None).await.0, StatusCode::FORBIDDEN);
    let (_, tokens) = call(Method::GET, "/api/v1/tokens".into(), bo_token, None).await;
    let team_token_id = tokens["data"].as_array().unwrap().iter().find(|t| t["member_id"].is_null()).unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(call(Method::DELETE, format!("/api/v1/tokens/{team_token_id}"), bo_token, None).await.0, StatusCode::FORBIDDEN);
    // A token Bo makes is Bo's, and Bo may revoke it.
    let (status, laptop) = call(Method::POST, "/api/v1/tokens".into(), bo_token, Some(json!({"name": "laptop"}))).await;
    assert_eq!((status, laptop["info"]["member_name"].as_str()), (StatusCode::CREATED, Some("Bo")), "{laptop}");
    let laptop_id = laptop["info"]["id"].as_str().unwrap();
    assert_eq!(call(Method::DELETE, format!("/api/v1/tokens/{laptop_id}"), bo_token, None).await.0, StatusCode::NO_CONTENT);

    // An owner's token manages; the last owner is kept.
    let (status, promoted) = call(Method::PATCH, format!("/api/v1/members/{bo_id}"), ana_token, Some(json!({"role": "owner"}))).await;
    assert_eq!((status, promoted["role"].as_str()), (StatusCode::OK, Some("owner")), "{promoted}");
    assert_eq!(call(Method::PATCH, format!("/api/v1/members/{ana_id}"), bo_token, Some(json!({"role": "member"}))).await.0, StatusCode::OK);
    let (status, kept) = call(Method::DELETE, format!("/api/v1/members/{bo_id}"), &team, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{kept}");
    assert!(kept["error"]["message"].as_str().unwrap().contains("last owner"), "{kept}");

    // Removing a member revokes their tokens.
    assert_eq!(call(Method::DELETE, format!("/api/v1/members/{ana_id}"), bo_token, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(Method::GET, "/api/v1/projects".into(), ana_token, None).await.0, StatusCode::UNAUTHORIZED);
    let (_, members) = call(Method::GET, "/api/v1/members".into(), &team, None).await;
    let mut listed: Vec<_> = members["data"].as_array().unwrap().iter().map(|m| (m["name"].as_str().unwrap(), m["removed_at"].is_i64())).collect();
    listed.sort();
    assert_eq!(listed, [("Ana", true), ("Bo", false)]);
}

async fn jobs_pin_their_plugins(s: Server) {
    let (token, project) = team_with_project(&s, "pins").await;
    let base = format!("/api/v1/projects/{project}");
    let first = lathe_sandbox::builtin("token-f1").unwrap().to_vec();
    let (status, _) = s.send(raw_post(&format!("{base}/plugins"), &token, first.clone())).await;
    assert_eq!(status, StatusCode::CREATED);
    let jobs = format!("{base}/jobs");
    let queue = || s.call(Method::POST, &jobs, Some(&token), Some(json!({"kind": "data_split", "version": "words"})));
    let (_, early) = queue().await;
    assert_eq!(early["plugins"], json!({"token-f1": lathe_util::sha256_hex(&first)}), "{early}");

    // A newer upload of the same name: new jobs pin it, the queued one keeps its hash.
    let newer = lathe_sandbox::builtin("exact-match").unwrap();
    let sha = s.state.artifacts.put_bytes(newer).unwrap();
    let plugin = NewPlugin { name: "token-f1".into(), kind: "scorer".into(), version: "0.2.0".into(), sha256: sha.clone(), size: newer.len() as i64, config_schema: json!({}) };
    s.state.db.add_plugin(&project, plugin).await.unwrap();
    assert_eq!(s.state.plugin_pins(&project).await.unwrap()["token-f1"], sha, "the newest upload of a name");
    let (_, late) = queue().await;
    assert_eq!(late["plugins"]["token-f1"], sha.as_str(), "{late}");
    let (_, early_now) = s.call(Method::GET, &format!("{base}/jobs/{}", early["id"].as_str().unwrap()), Some(&token), None).await;
    assert_eq!(early_now["plugins"], early["plugins"]);
}

/// A pack into the team's catalogue and a project: its plugins, pinned suites and data; a
/// new version of it installs over the old with the diff; a version is immutable.
async fn packs_install_and_upgrade(s: Server) {
    let (token, project) = team_with_project(&s, "packs").await;
    let rt = lathe_sandbox::Runtime::new(lathe_sandbox::RuntimeConfig { cache_dir: lathe_jobs::env::default_plugin_cache(), ..Default::default() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    lathe_jobs::pack::shipped::Template::Blank.write(&src, Some("quiz")).unwrap();
    let v1 = lathe_jobs::pack::Pack::build(&src, &rt).unwrap();
    let (status, described) = s.send(raw_post("/api/v1/packs", &token, v1.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{described}");
    assert_eq!(described["origin"], "uploaded");
    assert_eq!(described["asks"]["network"], false);
    let sha1 = lathe_util::sha256_hex(&v1);
    let (_, catalogue) = s.call(Method::GET, "/api/v1/packs", Some(&token), None).await;
    let origins: Vec<(&str, &str)> = catalogue["data"].as_array().unwrap().iter().map(|p| (p["name"].as_str().unwrap(), p["origin"].as_str().unwrap())).collect();
    for want in [("invoice-extraction", "shipped"), ("support-triage", "shipped"), ("grounded-qa", "shipped"), ("quiz", "uploaded")] {
        assert!(origins.contains(&want), "{origins:?}");
    }

    let base = format!("/api/v1/projects/{project}");
    let (status, out) = s.call(Method::POST, &format!("{base}/packs"), Some(&token), Some(json!({"sha256": sha1}))).await;
    assert_eq!(status, StatusCode::CREATED, "{out}");
    assert_eq!(out["diff"], Value::Null);
    let (_, suite) = s.call(Method::GET, &format!("{base}/suites/answers"), Some(&token), None).await;
    let scorer = &suite["definition"]["scorers"][0];
    assert_eq!(scorer["plugin"], "exact-match");
    assert_eq!(scorer["limits"], json!({"memory_mb": 16, "timeout_ms": 500}), "{suite}");
    let (_, plugins) = s.call(Method::GET, &format!("{base}/plugins"), Some(&token), None).await;
    assert!(plugins["data"].as_array().unwrap().iter().any(|p| p["sha256"] == scorer["sha256"]), "{plugins}");
    let (_, datasets) = s.call(Method::GET, &format!("{base}/datasets"), Some(&token), None).await;
    assert!(datasets.to_string().contains("packs/quiz/heldout"), "{datasets}");

    // Version 1.1.0 changes one held-out item: the diff says so, before and on install.
    let heldout = src.join("data/heldout.jsonl");
    std::fs::write(&heldout, std::fs::read_to_string(&heldout).unwrap().replace("Paris", "Paris, France")).unwrap();
    let toml = src.join("pack.toml");
    std::fs::write(&toml, std::fs::read_to_string(&toml).unwrap().replace("1.0.0", "1.1.0")).unwrap();
    let v2 = lathe_jobs::pack::Pack::build(&src, &rt).unwrap();
    let sha2 = lathe_util::sha256_hex(&v2);
    assert_eq!(s.send(raw_post("/api/v1/packs", &token, v2)).await.0, StatusCode::CREATED);
    let (status, preview) = s.call(Method::GET, &format!("{base}/packs/quiz/diff?to={sha2}"), Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(preview["data"]["changed"][0]["name"], "heldout");
    let (_, out) = s.call(Method::POST, &format!("{base}/packs"), Some(&token), Some(json!({"sha256": sha2}))).await;
    assert_eq!(out["diff"], preview, "{out}");
    let (_, installed) = s.call(Method::GET, &format!("{base}/packs"), Some(&token), None).await;
    assert_eq!(installed["data"].as_array().unwrap().len(), 1);
    assert_eq!(installed["data"][0]["version"], "1.1.0");

    // Other bytes under a name and version already taken: refused.
    std::fs::write(&toml, std::fs::read_to_string(&toml).unwrap().replace("A pack to start from", "Another pack")).unwrap();
    let (status, body) = s.send(raw_post("/api/v1/packs", &token, lathe_jobs::pack::Pack::build(&src, &rt).unwrap())).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains("immutable"), "{body}");
}

fn raw_post(uri: &str, token: &str, body: Vec<u8>) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/wasm")
        .body(Body::from(body))
        .unwrap()
}

fn get(uri: &str, token: &str) -> Request<Body> {
    Request::builder().uri(uri).header("authorization", format!("Bearer {token}")).body(Body::empty()).unwrap()
}

/// Deploy aliases: the gate decides what may be deployed, the alias serves through the
/// inference API, and a rollback serves the previous version again while a stream that
/// started before it finishes on the version it started with.
async fn deploy_and_roll_back(s: &Server, project: &str, token: &str, train_id: &str) {
    let t = Some(token);
    let deployments = format!("/api/v1/projects/{project}/deployments");
    let (status, base_v) = s.call(Method::POST, &deployments, t, Some(json!({"name": "prod", "model": "tiny"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{base_v}");
    assert_eq!(base_v["model_id"], "invoices/prod");

    // Not without an eval run of the whole held-out set whose gate passed.
    let (status, refused) = s.call(Method::POST, &deployments, t, Some(json!({"name": "prod", "job_id": train_id}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("has not passed its suite's gate"), "{refused}");
    let mut lenient = words_suite("exact-match");
    lenient["name"] = json!("words-lenient");
    lenient["gate"]["min"] = json!(0.0);
    // Its validator checks every answer the alias gives.
    let word = json!({"type": "object", "properties": {"word": {"enum": ["cat", "dog"]}}, "required": ["word"], "additionalProperties": false});
    lenient["validator"] = json!({"plugin": "json-schema", "config": {"schema": word}});
    assert_eq!(s.call(Method::PUT, &format!("/api/v1/projects/{project}/suites/words-lenient"), t, Some(lenient)).await.0, StatusCode::OK);
    let eval = s.run_job(project, token, json!({"kind": "eval_run", "model": "tiny", "adapter_job": train_id, "suite": "words-lenient", "data": "words.heldout"})).await;
    assert_eq!(eval["outcome"]["run"]["passed_gate"], true, "{eval}");
    let (status, v2) = s.call(Method::POST, &deployments, t, Some(json!({"name": "prod", "job_id": train_id}))).await;
    assert_eq!(status, StatusCode::CREATED, "{v2}");
    assert_eq!((v2["eval_job_id"].as_str(), v2["forced"].as_bool()), (eval["id"].as_str(), Some(false)), "{v2}");
    // The registry's view of the version: what it is made of.
    let (_, prod) = s.call(Method::GET, &format!("{deployments}/prod"), t, None).await;
    let v = &prod["current"]["version"];
    assert_eq!((v["adapter_job"].as_str(), v["eval_job"].as_str(), v["passed_gate"].as_bool()), (Some(train_id), eval["id"].as_str(), Some(true)), "{prod}");
    for key in ["base_model_sha256", "dataset", "chat_template_sha256", "tokenizer_template_sha256"] {
        assert_eq!(v[key].as_str().map(str::len), Some(64), "{key}: {v}");
    }
    assert_eq!((v["eval_suite"].as_str(), v["eval_data"].as_str()), (Some("words-lenient"), Some("words.heldout")), "{v}");
    assert!(v["training_plugins"].is_object() && v["eval_plugins"].is_object(), "{v}");
    let (status, forced) = s.call(Method::POST, &deployments, t, Some(json!({"name": "canary", "job_id": train_id, "force": true}))).await;
    assert_eq!(status, StatusCode::CREATED, "{forced}");

    // The alias serves the adapter: what the fine-tune's own id gives.
    let chat = |model: &str, stream: bool| {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "say the cat 3"}], "temperature": 0, "max_tokens": 40, "stream": stream});
        Request::builder()
            .method(Method::POST)
            .uri("/v1/chat/completions")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let content = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let (status, via_alias) = s.send(chat("invoices/prod", false)).await;
    assert_eq!(status, StatusCode::OK, "{via_alias}");
    let (_, via_ft) = s.send(chat(&format!("ft:tiny:invoices:{train_id}"), false)).await;
    let (_, via_base) = s.send(chat("tiny", false)).await;
    assert_eq!(content(&via_alias), content(&via_ft));
    assert_ne!(content(&via_alias), content(&via_base), "the adapter changes the answer");
    // The deployment's validator checked the answer (the tiny model writes no JSON by
    // itself); under the schema as response_format, the answer passes it.
    let validation = &via_alias["choices"][0]["validation"];
    assert_eq!((validation["plugin"].as_str(), validation["valid"].as_bool()), (Some("json-schema"), Some(false)), "{via_alias}");
    assert!(!validation["violations"].as_array().unwrap().is_empty(), "{validation}");
    assert!(via_ft["choices"][0].get("validation").is_none(), "only a deployment has a validator: {via_ft}");
    let constrained = json!({"model": "invoices/prod", "messages": [{"role": "user", "content": "say the cat 3"}], "temperature": 0.7, "seed": 4, "max_tokens": 40,
        "response_format": {"type": "json_schema", "json_schema": {"name": "word", "schema": word}}});
    let (status, valid) = s.call(Method::POST, "/v1/chat/completions", t, Some(constrained)).await;
    assert_eq!(status, StatusCode::OK, "{valid}");
    assert_eq!(valid["choices"][0]["validation"]["valid"], true, "{valid}");
    assert!(["{\"word\": \"cat\"}", "{\"word\": \"dog\"}"].contains(&content(&valid).as_str()), "{valid}");
    let bad = json!({"model": "invoices/prod", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}}});
    let (status, refused) = s.call(Method::POST, "/v1/chat/completions", t, Some(bad)).await;
    assert_eq!((status, refused["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("response_format")), "{refused}");
    let (_, models) = s.call_in(Method::GET, "/v1/models", t, Some(project), None).await;
    assert!(models.to_string().contains("invoices/prod"), "{models}");

    // Roll back while a stream through the alias is open: it finishes on the adapter.
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let resp = lathe_server::app(s.state.clone()).oneshot(chat("invoices/prod", true)).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let (status, back) = s.call(Method::POST, &format!("{deployments}/prod/rollback"), t, None).await;
    assert_eq!((status, back["job_id"].is_null(), back["action"].as_str()), (StatusCode::OK, true, Some("rollback")), "{back}");
    let rest = body.collect().await.unwrap().to_bytes();
    let sse = format!("{}{}", String::from_utf8_lossy(&first), String::from_utf8_lossy(&rest));
    let streamed: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(streamed, content(&via_ft), "{sse}");
    assert!(sse.contains(r#""validation":{"#), "the finishing chunk carries the validation: {sse}");
    let (_, after) = s.send(chat("invoices/prod", false)).await;
    assert_eq!(content(&after), content(&via_base), "after the rollback the alias serves the base");

    let (_, history) = s.call(Method::GET, &format!("{deployments}/prod"), t, None).await;
    let actions: Vec<&str> = history["history"].as_array().unwrap().iter().map(|d| d["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["rollback", "deploy", "deploy"], "{history}");
    let (status, none) = s.call(Method::POST, &format!("{deployments}/prod/rollback"), t, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{none}");
    let (_, list) = s.call(Method::GET, &deployments, t, None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
}

/// A job that needs a GPU or more memory than the worker announced waits in the queue while
/// a later job that fits runs; the workers route lists the worker with what it announced
/// and the job it runs; needs it cannot meet by construction are refused with their name.
async fn jobs_wait_for_a_worker_that_fits(mut s: Server) {
    let (token, project) = team_with_project(&s, "fits").await;
    let jobs = format!("/api/v1/projects/{project}/jobs");
    let (status, gpu) = submit_needing(&s, &jobs, &token, json!({"device": "cuda", "memory_mb": 40000})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{gpu}");
    assert_eq!((gpu["needs_device"].as_str(), gpu["needs_memory_mb"].as_i64()), (Some("cuda"), Some(40000)), "{gpu}");
    let (_, huge) = submit_needing(&s, &jobs, &token, json!({"memory_mb": 1_000_000_000})).await;
    let (_, cpu) = submit_needing(&s, &jobs, &token, json!({"device": "cpu"})).await;

    s.start_worker();
    // The CPU job, queued last, runs (and fails: there is no such version) while the two
    // ahead of it wait.
    let done = s.wait(&project, cpu["id"].as_str().unwrap(), &token).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["worker"], "test-worker");
    for waiting in [&gpu, &huge] {
        let (_, now) = s.call(Method::GET, &format!("{jobs}/{}", waiting["id"].as_str().unwrap()), Some(&token), None).await;
        assert_eq!((now["state"].as_str(), now["attempts"].as_i64()), (Some("queued"), Some(0)), "{now}");
    }

    let (status, workers) = s.call(Method::GET, "/api/v1/workers", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{workers}");
    let w = workers["data"].as_array().unwrap().iter().find(|w| w["id"] == "test-worker").cloned().unwrap_or_else(|| panic!("{workers}"));
    assert_eq!(w["device"], "cpu", "{w}");
    assert!(w["memory_mb"].as_i64().unwrap() > 0, "the host's memory: {w}");
    assert!(w["seen_at"].as_i64() >= w["started_at"].as_i64(), "{w}");

    for (needs, names) in [
        (json!({"device": "tpu"}), "needs.device `tpu`: expected one of cpu, cuda, wgpu"),
        (json!({"memory_mb": -5}), "needs.memory_mb is -5"),
        (json!({"gpus": 1}), "needs: unknown field `gpus`"),
    ] {
        let (status, body) = submit_needing(&s, &jobs, &token, needs).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.to_string().contains(names), "{body}");
    }
}

/// A job that fails at once (no such version), queued with `needs`.
async fn submit_needing(s: &Server, jobs: &str, token: &str, needs: Value) -> (StatusCode, Value) {
    s.call(Method::POST, jobs, Some(token), Some(json!({"kind": "data_split", "version": "nope", "needs": needs}))).await
}

/// PostgreSQL stopped for a second and started again while a training job runs: the
/// worker keeps the job's events while the database is away and carries on, so the job
/// ends in its first attempt with every event, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_a_running_job_loses_nothing() {
    let db = crate::harness::TestDb::postgres().await;
    let mut s = Server::start(&db.url).await;
    let (token, project) = team_with_project(&s, "restart").await;
    let t = Some(token.as_str());
    let base = format!("/api/v1/projects/{project}");
    s.start_worker();
    let (_, file) = s.upload(&format!("{base}/files"), &token, None, "words.jsonl", &words_jsonl(40)).await;
    s.run_job(&project, &token, json!({"kind": "data_import", "file_id": file["id"], "name": "words"})).await;
    s.run_job(&project, &token, json!({"kind": "data_split", "version": "words", "heldout": 0.2, "name": "words"})).await;
    let (status, _) = s.call(Method::PUT, &format!("{base}/suites/words"), t, Some(words_suite("exact-match"))).await;
    assert_eq!(status, StatusCode::OK);
    let epochs = 40;
    let settings = json!({"learning_rate": 1e-3, "metric_items": 0, "epochs": epochs, "patience": 0});
    let (status, job) = s.call(Method::POST, &format!("{base}/jobs"), t, Some(json!({"kind": "train", "model": "tiny", "suite": "words", "data": "words.train", "settings": settings}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    // Once it is training (its first loss is written), the database goes away for a second.
    loop {
        let (_, events) = s.call(Method::GET, &format!("{base}/jobs/{id}/events"), t, None).await;
        if events["data"].as_array().unwrap().iter().any(|e| e["data"]["series"] == "train/loss") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let restarted = tokio::task::spawn_blocking(move || {
        db.restart_postgres(std::time::Duration::from_secs(1));
        (db, std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64)
    });
    let (_db, back_at) = restarted.await.unwrap();

    let done = s.wait(&project, &id, &token).await;
    assert_eq!(done["state"], "succeeded", "{}", done["error"]);
    assert_eq!(done["attempts"], 1, "carried on, not retried");
    assert!(done["finished_at"].as_i64().unwrap() > back_at, "the job was still running when the database came back");
    let (_, events) = s.call(Method::GET, &format!("{base}/jobs/{id}/events"), t, None).await;
    let events = events["data"].as_array().unwrap();
    // The training loss at every logged step, none missing: the steps run 1, 2, 3 … (or
    // by a constant stride) to the last.
    let steps: Vec<f64> = events.iter().filter(|e| e["kind"] == "metric" && e["data"]["series"] == "train/loss").map(|e| e["data"]["x"].as_f64().unwrap()).collect();
    assert!(steps.len() >= epochs, "{} losses for {epochs} epochs", steps.len());
    let stride = steps[0];
    assert!(steps.iter().enumerate().all(|(i, x)| *x == stride * (i + 1) as f64), "a loss is missing: {steps:?}");
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
}
