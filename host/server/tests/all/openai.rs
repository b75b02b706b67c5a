//! The OpenAI-compatible files and fine-tuning API, in the shapes the `openai` clients
//! read (the official Python client itself drives a real server in tests/e2e).

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::{Server, team_with_project, words_jsonl, words_suite};

crate::on_both_backends!(a_fine_tuning_job_runs_through_the_openai_api);

async fn a_fine_tuning_job_runs_through_the_openai_api(mut s: Server) {
    s.start_worker();
    let (token, project) = team_with_project(&s, "acme").await;
    let (t, p) = (Some(token.as_str()), Some(project.as_str()));

    let (status, file) = s.upload("/v1/files", &token, p, "train.jsonl", &words_jsonl(30)).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    assert_eq!((file["object"].as_str(), file["purpose"].as_str()), (Some("file"), Some("fine-tune")));
    let (_, files) = s.call_in(Method::GET, "/v1/files", t, p, None).await;
    assert_eq!(files["object"], "list");
    assert_eq!(files["data"][0]["id"], file["id"]);

    // The workflow holds: no fine-tune before the project has an eval suite.
    let create = json!({"model": "tiny", "training_file": file["id"], "hyperparameters": {"n_epochs": 1},
                        "rank": 4, "max_steps": 2, "learning_rate": 1e-3, "metric_items": 0});
    let (status, refused) = s.call_in(Method::POST, "/v1/fine_tuning/jobs", t, p, Some(create.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"]["type"], "invalid_request_error");
    assert!(refused["error"]["message"].as_str().unwrap().contains("no eval suite"), "{refused}");
    let (status, _) = s.call(Method::PUT, &format!("/api/v1/projects/{project}/suites/words"), t, Some(words_suite("exact-match"))).await;
    assert_eq!(status, StatusCode::OK);

    let (status, job) = s.call_in(Method::POST, "/v1/fine_tuning/jobs", t, p, Some(create)).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!((job["object"].as_str(), job["status"].as_str(), job["model"].as_str()), (Some("fine_tuning.job"), Some("queued"), Some("tiny")));
    assert_eq!(job["hyperparameters"]["n_epochs"], 1);
    let id = job["id"].as_str().unwrap().to_string();
    let mut done = job;
    for _ in 0..600 {
        let (_, j) = s.call_in(Method::GET, &format!("/v1/fine_tuning/jobs/{id}"), t, p, None).await;
        done = j;
        if ["succeeded", "failed", "cancelled"].contains(&done["status"].as_str().unwrap()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["fine_tuned_model"], format!("ft:tiny:invoices:{id}"));
    assert!(done["trained_tokens"].as_i64().unwrap() > 0, "{done}");

    let (_, events) = s.call_in(Method::GET, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100"), t, p, None).await;
    let data = events["data"].as_array().unwrap();
    assert_eq!(data[0]["message"], "The job has successfully completed", "newest first: {events}");
    let metrics: Vec<_> = data.iter().filter(|e| e["type"] == "metrics").collect();
    assert_eq!(metrics.len(), 2, "{events}");
    assert_eq!(metrics[0]["data"]["step"], 2);
    assert!(data.iter().all(|e| e["object"] == "fine_tuning.job.event"));

    let (_, ckpts) = s.call_in(Method::GET, &format!("/v1/fine_tuning/jobs/{id}/checkpoints"), t, p, None).await;
    let c = ckpts["data"].as_array().unwrap();
    assert!(!c.is_empty(), "{ckpts}");
    assert_eq!(c[0]["object"], "fine_tuning.job.checkpoint");
    assert_eq!(c[0]["step_number"], 2);
    assert!(c[0]["metrics"]["train_loss"].is_f64(), "{ckpts}");

    let (_, list) = s.call_in(Method::GET, "/v1/fine_tuning/jobs?limit=1", t, p, None).await;
    assert_eq!((list["object"].as_str(), list["data"][0]["id"].as_str(), list["has_more"].as_bool()), (Some("list"), Some(id.as_str()), Some(false)));
    let (_, models) = s.call_in(Method::GET, "/v1/models", t, p, None).await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"tiny") && ids.contains(&done["fine_tuned_model"].as_str().unwrap()), "{models}");

    // Cancelling a finished job leaves it as it is.
    let (status, same) = s.call_in(Method::POST, &format!("/v1/fine_tuning/jobs/{id}/cancel"), t, p, None).await;
    assert_eq!((status, same["status"].as_str()), (StatusCode::OK, Some("succeeded")));

    // `needs` (extra_body in the client), as on the native API: a job that needs a GPU waits
    // for one, and the test's CPU worker leaves it queued; a device no worker can be is refused.
    let gpu = json!({"model": "tiny", "training_file": file["id"], "needs": {"device": "cuda", "memory_mb": 40000}});
    let (status, queued) = s.call_in(Method::POST, "/v1/fine_tuning/jobs", t, p, Some(gpu)).await;
    assert_eq!(status, StatusCode::OK, "{queued}");
    let qid = queued["id"].as_str().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, row) = s.call(Method::GET, &format!("/api/v1/projects/{project}/jobs/{qid}"), t, None).await;
    assert_eq!((row["state"].as_str(), row["needs_device"].as_str(), row["needs_memory_mb"].as_i64()), (Some("queued"), Some("cuda"), Some(40000)), "{row}");
    let tpu = json!({"model": "tiny", "training_file": file["id"], "needs": {"device": "tpu"}});
    let (status, refused) = s.call_in(Method::POST, "/v1/fine_tuning/jobs", t, p, Some(tpu)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("needs.device `tpu`"), "{refused}");
}
