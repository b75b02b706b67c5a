use lathe_store::{Backend, NewPlugin, PackInstall, StoreError};
use serde_json::json;

use crate::harness::TestDb;
use crate::team_and_project;

on_both_backends!(a_pack_installs_whole_or_not_at_all);

fn plugin(name: &str, kind: &str, sha: char) -> NewPlugin {
    NewPlugin { name: name.into(), kind: kind.into(), version: "1.0.0".into(), sha256: sha.to_string().repeat(64), size: 1000, config_schema: json!({}) }
}

fn pack(version: &str) -> PackInstall {
    PackInstall {
        name: "triage".into(),
        version: version.into(),
        sha256: version.repeat(32),
        plugins: vec![plugin("classification", "scorer", 'a'), plugin("json-schema", "validator", 'b')],
        suites: vec![("route".into(), json!({"name": "route", "pack": version})), ("explained".into(), json!({"name": "explained", "pack": version}))],
        installed: json!({"datasets": ["packs/triage/heldout"]}),
    }
}

/// A failure at the install's last write (the record, refused here by a trigger as a full
/// disk or a lost connection would refuse it) leaves none of the pack's plugins or suites
/// behind; with the fault gone the same install succeeds, and an upgrade adds suite
/// versions without duplicating plugins.
async fn a_pack_installs_whole_or_not_at_all(t: &TestDb) {
    let (_, project) = team_and_project(t, "team-a").await;
    let refuse = match t.backend() {
        Backend::Sqlite => "CREATE TRIGGER refuse_install BEFORE INSERT ON project_packs BEGIN SELECT RAISE(ABORT, 'no space left on device'); END;",
        Backend::Postgres => {
            "CREATE FUNCTION refuse_install() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'no space left on device'; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER refuse_install BEFORE INSERT ON project_packs FOR EACH ROW EXECUTE FUNCTION refuse_install();"
        }
    };
    t.exec(refuse).await;
    let err = t.install_pack(&project.id, &pack("01")).await.unwrap_err();
    assert!(err.to_string().contains("no space left on device"), "{err}");
    assert!(t.plugins(&project.id).await.unwrap().is_empty(), "no plugin of the failed install is listed");
    assert!(t.suites(&project.id).await.unwrap().is_empty(), "no suite of the failed install is listed");
    assert!(t.project_packs(&project.id).await.unwrap().is_empty());

    t.exec(match t.backend() {
        Backend::Sqlite => "DROP TRIGGER refuse_install;",
        Backend::Postgres => "DROP TRIGGER refuse_install ON project_packs; DROP FUNCTION refuse_install();",
    })
    .await;
    let row = t.install_pack(&project.id, &pack("01")).await.unwrap();
    assert_eq!((row.name.as_str(), row.version.as_str()), ("triage", "01"));
    assert_eq!(t.plugins(&project.id).await.unwrap().len(), 2);
    let suites = t.suites(&project.id).await.unwrap();
    assert_eq!(suites.iter().map(|s| (s.name.as_str(), s.version)).collect::<Vec<_>>(), [("explained", 1), ("route", 1)]);
    assert_eq!(t.project_packs(&project.id).await.unwrap(), [row]);

    // The upgrade: the same plugins (kept once), the suites' next versions, the new record.
    let upgraded = t.install_pack(&project.id, &pack("02")).await.unwrap();
    assert_eq!(t.plugins(&project.id).await.unwrap().len(), 2);
    let suites = t.suites(&project.id).await.unwrap();
    assert_eq!(suites.iter().map(|s| (s.version, s.definition["pack"].as_str().unwrap())).collect::<Vec<_>>(), [(2, "02"), (2, "02")]);
    assert_eq!(t.project_packs(&project.id).await.unwrap(), [upgraded]);

    match t.install_pack("no-such-project", &pack("01")).await {
        Err(StoreError::NotFound { what: "project", .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}
