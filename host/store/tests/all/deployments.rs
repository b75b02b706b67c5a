use lathe_store::{Db, NewDeployment, NewJob, StoreError};
use serde_json::json;

use crate::team_and_project;

on_both_backends!(deploys_and_rollbacks_keep_the_whole_history);

async fn deploys_and_rollbacks_keep_the_whole_history(db: &Db) {
    let (_, project) = team_and_project(db, "deploys").await;
    let (_, other) = team_and_project(db, "deploys-other").await;
    let job = |kind: &str| NewJob {
        id: None,
        project_id: project.id.clone(),
        kind: kind.into(),
        spec: json!({}),
        priority: 0,
        max_attempts: 1,
        plugins: Default::default(),
        needs: Default::default(),
    };
    let (train1, train2, eval) = (db.enqueue(job("train")).await.unwrap(), db.enqueue(job("train")).await.unwrap(), db.enqueue(job("eval_run")).await.unwrap());
    let new = |job_id: Option<&str>| NewDeployment {
        project_id: project.id.clone(),
        name: "prod".into(),
        model: "smollm2".into(),
        job_id: job_id.map(str::to_string),
        eval_job_id: Some(eval.id.clone()),
        forced: false,
        created_by: Some("tok_1".into()),
    };

    assert!(matches!(db.deployment(&project.id, "prod").await, Err(StoreError::NotFound { .. })));
    let base = db.deploy(&new(None)).await.unwrap();
    assert_eq!((base.seq, base.replaces.as_deref(), base.action.as_str()), (1, None, "deploy"));
    let v1 = db.deploy(&new(Some(&train1.id))).await.unwrap();
    let v2 = db.deploy(&new(Some(&train2.id))).await.unwrap();
    assert_eq!(v2.replaces.as_deref(), Some(v1.id.as_str()));
    assert_eq!(db.deployment(&project.id, "prod").await.unwrap(), v2);

    // One rollback serves v1 again; the next goes one further back, to the base.
    let back = db.rollback(&project.id, "prod", Some("tok_2")).await.unwrap();
    assert_eq!((back.job_id.as_deref(), back.action.as_str(), back.seq), (Some(train1.id.as_str()), "rollback", 4));
    let back = db.rollback(&project.id, "prod", None).await.unwrap();
    assert_eq!((back.job_id, back.seq), (None, 5));
    assert!(matches!(db.rollback(&project.id, "prod", None).await, Err(StoreError::Conflict(m)) if m.contains("no earlier version")));

    let history = db.deployment_history(&project.id, "prod").await.unwrap();
    assert_eq!(history.iter().map(|d| d.seq).collect::<Vec<_>>(), [5, 4, 3, 2, 1]);
    let staging = db.deploy(&NewDeployment { name: "staging".into(), ..new(Some(&train2.id)) }).await.unwrap();
    let current = db.deployments(&project.id).await.unwrap();
    assert_eq!(current.iter().map(|d| (d.name.as_str(), d.seq)).collect::<Vec<_>>(), [("prod", 5), ("staging", 1)]);
    assert_eq!(current[1], staging);

    // Names are checked; another project sees none of it; a job must exist.
    assert!(matches!(db.deploy(&NewDeployment { name: "Prod!".into(), ..new(None) }).await, Err(StoreError::Invalid(_))));
    assert!(db.deployments(&other.id).await.unwrap().is_empty());
    assert!(matches!(db.deployment(&other.id, "prod").await, Err(StoreError::NotFound { .. })));
    assert!(matches!(db.deploy(&new(Some("job_missing"))).await, Err(StoreError::NotFound { .. })));
}
