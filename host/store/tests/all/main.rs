//! Integration tests of lathe-store, one binary (see STYLE.md). Every database scenario is an
//! `async fn(&Db)` (or `&TestDb` when it reads tables behind the store's back) and runs on
//! both backends: `<module>::sqlite::<scenario>` and `<module>::postgres::<scenario>`.

mod harness;

/// Runs each listed scenario of the calling module on SQLite and on PostgreSQL, each on a
/// fresh database of its own.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let t = crate::harness::TestDb::sqlite().await;
                    super::$scenario(&t).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let t = crate::harness::TestDb::postgres().await;
                    super::$scenario(&t).await;
                }
            )*
        }
    };
}

mod artifacts;
mod auth;
mod concurrency;
mod deployments;
mod jobs;
mod packs;
mod projects;
mod s3;
mod s3_server;

use lathe_store::{Db, Project, Team};

/// A team with one project, the starting point of most scenarios.
pub async fn team_and_project(db: &Db, team: &str) -> (Team, Project) {
    let team = db.create_team(team).await.unwrap();
    let project = db
        .create_project(&team.id, "support-bot", "answers tickets")
        .await
        .unwrap();
    (team, project)
}
