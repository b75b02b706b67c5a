use lathe_store::{Db, NewFile, NewPlugin, StoreError};
use serde_json::json;

use crate::team_and_project;

on_both_backends!(
    projects_belong_to_one_team,
    files_round_trip,
    plugins_round_trip,
    suites_keep_history
);

async fn projects_belong_to_one_team(db: &Db) {
    let (a, project) = team_and_project(db, "team-a").await;
    let b = db.create_team("team-b").await.unwrap();

    assert_eq!(db.project(&a.id, &project.id).await.unwrap(), project);
    // Another team's project does not exist, as far as that team can tell.
    match db.project(&b.id, &project.id).await {
        Err(StoreError::NotFound {
            what: "project",
            id,
        }) => assert_eq!(id, project.id),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(db.projects(&b.id).await.unwrap().is_empty());

    // Names are unique within a team, not across teams.
    match db.create_project(&a.id, "support-bot", "again").await {
        Err(StoreError::Conflict(msg)) => {
            assert!(msg.contains("support-bot") && msg.contains(&a.id), "{msg}")
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    let theirs = db.create_project(&b.id, "support-bot", "").await.unwrap();
    db.create_project(&a.id, "another", "").await.unwrap();
    let names: Vec<String> = db
        .projects(&a.id)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["another", "support-bot"]);
    assert_eq!(db.projects(&b.id).await.unwrap(), [theirs]);

    assert!(matches!(
        db.create_project("team_missing", "x", "").await,
        Err(StoreError::NotFound { what: "team", .. })
    ));
}

fn new_file(name: &str, sha: char) -> NewFile {
    NewFile {
        filename: name.into(),
        purpose: "fine-tune".into(),
        bytes: 1234,
        sha256: sha.to_string().repeat(64),
    }
}

async fn files_round_trip(db: &Db) {
    let (_, project) = team_and_project(db, "files").await;
    let (_, other) = team_and_project(db, "files-other").await;
    let train = db
        .add_file(&project.id, new_file("train.jsonl", 'a'))
        .await
        .unwrap();
    assert!(train.id.starts_with("file_"), "{}", train.id);
    assert_eq!(
        (
            train.filename.as_str(),
            train.bytes,
            train.project_id.as_str()
        ),
        ("train.jsonl", 1234, project.id.as_str())
    );
    let held_out = db
        .add_file(&project.id, new_file("held-out.jsonl", 'b'))
        .await
        .unwrap();

    assert_eq!(
        db.files(&project.id).await.unwrap(),
        [train.clone(), held_out.clone()]
    );
    assert_eq!(db.file(&project.id, &train.id).await.unwrap(), train);
    assert!(matches!(
        db.file(&other.id, &train.id).await,
        Err(StoreError::NotFound { what: "file", .. })
    ));
    assert!(matches!(
        db.delete_file(&other.id, &train.id).await,
        Err(StoreError::NotFound { .. })
    ));

    assert_eq!(db.delete_file(&project.id, &train.id).await.unwrap(), train);
    assert!(matches!(
        db.file(&project.id, &train.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(db.files(&project.id).await.unwrap(), [held_out]);

    assert!(matches!(
        db.add_file("proj_missing", new_file("x", 'c')).await,
        Err(StoreError::NotFound {
            what: "project",
            ..
        })
    ));
}

fn plugin(name: &str, version: &str, sha: char) -> NewPlugin {
    NewPlugin {
        name: name.into(),
        kind: "scorer".into(),
        version: version.into(),
        sha256: sha.to_string().repeat(64),
        size: 4096,
        config_schema: json!({"type": "object", "properties": {"threshold": {"type": "number"}}}),
    }
}

async fn plugins_round_trip(db: &Db) {
    let (_, project) = team_and_project(db, "plugins").await;
    let v1 = db
        .add_plugin(&project.id, plugin("exact-match", "0.1.0", 'a'))
        .await
        .unwrap();
    assert_eq!(
        (
            v1.name.as_str(),
            v1.kind.as_str(),
            v1.version.as_str(),
            v1.size
        ),
        ("exact-match", "scorer", "0.1.0", 4096)
    );
    assert_eq!(
        v1.config_schema["properties"]["threshold"]["type"],
        "number"
    );

    // The same component again is the same row.
    let again = db
        .add_plugin(&project.id, plugin("exact-match", "0.1.0", 'a'))
        .await
        .unwrap();
    assert_eq!(again, v1);
    assert_eq!(db.plugins(&project.id).await.unwrap().len(), 1);

    // A new version: the name now means the newest, the sha still the old one.
    let v2 = db
        .add_plugin(&project.id, plugin("exact-match", "0.2.0", 'b'))
        .await
        .unwrap();
    let json = db
        .add_plugin(&project.id, plugin("json-schema", "1.0.0", 'c'))
        .await
        .unwrap();
    assert_eq!(db.plugin(&project.id, "exact-match").await.unwrap(), v2);
    assert_eq!(db.plugin(&project.id, &v1.sha256).await.unwrap(), v1);
    assert_eq!(
        db.plugins(&project.id).await.unwrap(),
        [v2, v1.clone(), json]
    );

    // Per project.
    let (_, other) = team_and_project(db, "plugins-other").await;
    assert!(db.plugins(&other.id).await.unwrap().is_empty());
    assert!(matches!(
        db.plugin(&other.id, "exact-match").await,
        Err(StoreError::NotFound { what: "plugin", .. })
    ));
    let theirs = db
        .add_plugin(&other.id, plugin("exact-match", "0.1.0", 'a'))
        .await
        .unwrap();
    assert_eq!(theirs.project_id, other.id);
}

async fn suites_keep_history(db: &Db) {
    let (_, project) = team_and_project(db, "suites").await;
    let first = db
        .put_suite(
            &project.id,
            "tickets",
            json!({"scorers": ["exact-match"], "target": 0.8}),
        )
        .await
        .unwrap();
    let second = db
        .put_suite(
            &project.id,
            "tickets",
            json!({"scorers": ["exact-match", "f1"], "target": 0.85}),
        )
        .await
        .unwrap();
    let other = db
        .put_suite(&project.id, "regression", json!({"pack": "general"}))
        .await
        .unwrap();
    assert_eq!((first.version, second.version, other.version), (1, 2, 1));

    assert_eq!(db.suite(&project.id, "tickets").await.unwrap(), second);
    assert_eq!(
        db.suite(&project.id, "tickets").await.unwrap().definition["target"],
        0.85
    );
    assert_eq!(
        db.suite_version(&project.id, "tickets", 1).await.unwrap(),
        first
    );
    assert_eq!(db.suites(&project.id).await.unwrap(), [other, second]);

    assert!(matches!(
        db.suite(&project.id, "nope").await,
        Err(StoreError::NotFound {
            what: "eval suite",
            ..
        })
    ));
    assert!(matches!(
        db.suite_version(&project.id, "tickets", 3).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        db.put_suite("proj_missing", "x", json!({})).await,
        Err(StoreError::NotFound {
            what: "project",
            ..
        })
    ));
}
