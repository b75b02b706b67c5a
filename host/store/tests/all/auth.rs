use lathe_store::{Db, MEMBER, OWNER, StoreError};
use sha2::{Digest, Sha256};

use crate::harness::TestDb;

on_both_backends!(
    tokens_are_stored_hashed_and_revocable,
    first_start_creates_one_admin,
    team_names_are_unique,
    web_sessions_end_with_their_token,
    members_hold_tokens_and_a_team_keeps_an_owner
);

fn split_token(token: &str) -> (&str, &str) {
    let rest = token
        .strip_prefix("lathe_")
        .expect("token starts with lathe_");
    rest.split_once('_').expect("token is lathe_<id>_<secret>")
}

async fn tokens_are_stored_hashed_and_revocable(t: &TestDb) {
    let team = t.create_team("research").await.unwrap();
    let (info, token) = t.create_token(&team.id, None, "ci", false).await.unwrap();
    let token_str = token.expose().to_owned();
    let (id, secret) = split_token(&token_str);
    assert_eq!(id, info.id);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{id}"
    );
    assert!(
        secret.len() >= 32 && secret.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{secret}"
    );
    assert!(
        !format!("{token:?}").contains(secret),
        "Debug of a Secret shows it: {token:?}"
    );
    assert_eq!(
        (info.admin, info.last_used_at, info.revoked_at),
        (false, None, None)
    );

    // Only the hash is in the table, nowhere the secret.
    let rows: Vec<(String, String, String, String)> = t
        .raw("SELECT id, team_id, name, secret_sha256 FROM api_tokens")
        .await;
    assert_eq!(rows.len(), 1);
    let (_, _, _, stored_hash) = &rows[0];
    let expected: String = Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(stored_hash, &expected);
    for (a, b, c, d) in &rows {
        for column in [a, b, c, d] {
            assert!(
                !column.contains(secret),
                "secret stored in api_tokens: {column}"
            );
        }
    }
    if let Some(dir) = &t.dir {
        // Not in any byte of the SQLite files either (database, WAL).
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret in a database file"
            );
        }
    }

    // Authenticating records the use.
    let before = t.tokens(&team.id).await.unwrap();
    assert_eq!(before[0].last_used_at, None);
    let who = t
        .authenticate(&token_str)
        .await
        .unwrap()
        .expect("valid token accepted");
    assert_eq!(
        (who.id.as_str(), who.team_id.as_str(), who.admin),
        (info.id.as_str(), team.id.as_str(), false)
    );
    let used_at = who.last_used_at.expect("last_used_at set");
    let listed = t.tokens(&team.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_used_at, Some(used_at));
    // Used again within the minute: no write, the recorded time stands.
    let again = t.authenticate(&token_str).await.unwrap().expect("still valid");
    assert_eq!(again.last_used_at, Some(used_at));
    assert_eq!(t.tokens(&team.id).await.unwrap()[0].last_used_at, Some(used_at));

    // Anything else is refused without an error.
    let wrong_secret = format!("lathe_{id}_{}", "x".repeat(secret.len()));
    let unknown_id = format!("lathe_zzzzzzzzzzzz_{secret}");
    for bad in [
        wrong_secret.as_str(),
        unknown_id.as_str(),
        "",
        "lathe_",
        "bearer",
        &token_str[..token_str.len() - 1],
    ] {
        assert_eq!(t.authenticate(bad).await.unwrap(), None, "accepted {bad:?}");
    }

    // Another team cannot revoke it; its own team can, for good.
    let other = t.create_team("other").await.unwrap();
    assert!(matches!(
        t.revoke_token(&other.id, &info.id).await,
        Err(StoreError::NotFound { what: "token", .. })
    ));
    assert!(t.authenticate(&token_str).await.unwrap().is_some());
    let revoked = t.revoke_token(&team.id, &info.id).await.unwrap();
    let revoked_at = revoked.revoked_at.expect("revoked_at set");
    assert_eq!(t.authenticate(&token_str).await.unwrap(), None);
    assert_eq!(
        t.revoke_token(&team.id, &info.id).await.unwrap().revoked_at,
        Some(revoked_at)
    );
    assert_eq!(
        t.tokens(&team.id).await.unwrap()[0].revoked_at,
        Some(revoked_at)
    );
    assert!(t.tokens(&other.id).await.unwrap().is_empty());

    // A token for a team that does not exist.
    assert!(matches!(
        t.create_token("team_nope", None, "x", false).await,
        Err(StoreError::NotFound { what: "team", .. })
    ));
}

async fn first_start_creates_one_admin(db: &Db) {
    let token = db
        .ensure_admin()
        .await
        .unwrap()
        .expect("fresh database gets an admin token");
    let who = db
        .authenticate(token.expose())
        .await
        .unwrap()
        .expect("admin token works");
    assert!(who.admin);
    let teams = db.teams().await.unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(
        (teams[0].name.as_str(), teams[0].id.as_str()),
        ("admin", who.team_id.as_str())
    );
    assert!(
        db.ensure_admin().await.unwrap().is_none(),
        "second start prints no token"
    );
    assert_eq!(db.tokens(&who.team_id).await.unwrap().len(), 1);
}

async fn team_names_are_unique(db: &Db) {
    db.create_team("ml").await.unwrap();
    match db.create_team("ml").await {
        Err(StoreError::Conflict(msg)) => assert!(msg.contains("`ml`"), "{msg}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A database with a team is not fresh.
    assert!(db.ensure_admin().await.unwrap().is_none());
}

async fn web_sessions_end_with_their_token(t: &TestDb) {
    let team = t.create_team("browsers").await.unwrap();
    let (info, _) = t.create_token(&team.id, None, "laptop", false).await.unwrap();
    let cookie = t.create_session(&info).await.unwrap();
    let session = t.session(cookie.expose()).await.unwrap().expect("a live session");
    assert_eq!((session.team_id.as_str(), session.token_id.as_str(), session.admin), (team.id.as_str(), info.id.as_str(), false));
    assert_eq!(session.csrf.len(), 32);
    // Only the digest is stored: the cookie's value appears nowhere in the table.
    let stored: Vec<(String,)> = t.raw("SELECT secret_sha256 FROM web_sessions").await;
    assert!(stored.iter().all(|(s,)| s != cookie.expose()));
    assert_eq!(t.session("not-a-session").await.unwrap(), None);

    // Two sessions of one token are independent; signing out ends only one.
    let other = t.create_session(&info).await.unwrap();
    assert_ne!(t.session(other.expose()).await.unwrap().unwrap().csrf, session.csrf);
    t.end_session(cookie.expose()).await.unwrap();
    assert_eq!(t.session(cookie.expose()).await.unwrap(), None);
    assert!(t.session(other.expose()).await.unwrap().is_some());

    // Revoking the token ends its sessions.
    t.revoke_token(&team.id, &info.id).await.unwrap();
    assert_eq!(t.session(other.expose()).await.unwrap(), None);
}

async fn members_hold_tokens_and_a_team_keeps_an_owner(t: &TestDb) {
    let team = t.create_team("clinic").await.unwrap();
    let (team_token, _) = t.create_token(&team.id, None, "first", false).await.unwrap();
    assert!(team_token.manages_team(), "a team token acts as an owner");

    let ana = t.create_member(&team.id, "Ana", OWNER).await.unwrap();
    let bo = t.create_member(&team.id, "Bo", MEMBER).await.unwrap();
    match t.create_member(&team.id, "Bo", MEMBER).await {
        Err(StoreError::Conflict(msg)) => assert!(msg.contains("`Bo`"), "{msg}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match t.create_member(&team.id, "Cy", "admin").await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("`admin`"), "{msg}"),
        other => panic!("expected an invalid role, got {other:?}"),
    }
    assert!(matches!(
        t.create_member("team_nope", "Dee", MEMBER).await,
        Err(StoreError::NotFound { what: "team", .. })
    ));

    // Tokens carry their member and role, through authentication and sessions.
    let (_, ana_token) = t.create_token(&team.id, Some(&ana.id), "laptop", false).await.unwrap();
    let (bo_info, bo_token) = t.create_token(&team.id, Some(&bo.id), "laptop", false).await.unwrap();
    let who = t.authenticate(ana_token.expose()).await.unwrap().unwrap();
    assert_eq!((who.member_name.as_deref(), who.role.as_deref(), who.manages_team()), (Some("Ana"), Some(OWNER), true));
    let who = t.authenticate(bo_token.expose()).await.unwrap().unwrap();
    assert_eq!((who.member_id.as_deref(), who.manages_team()), (Some(bo.id.as_str()), false));
    let session = t.create_session(&bo_info).await.unwrap();
    let live = t.session(session.expose()).await.unwrap().unwrap();
    assert_eq!((live.member_id.as_deref(), live.manages_team()), (Some(bo.id.as_str()), false));
    // Another team's member cannot hold this team's token.
    let other = t.create_team("other").await.unwrap();
    assert!(matches!(
        t.create_token(&other.id, Some(&bo.id), "x", false).await,
        Err(StoreError::NotFound { what: "member", .. })
    ));

    // The last owner can be neither demoted nor removed; with a second owner, both work.
    for refused in [t.set_member_role(&team.id, &ana.id, MEMBER).await, t.remove_member(&team.id, &ana.id).await] {
        match refused {
            Err(StoreError::Conflict(msg)) => assert!(msg.contains("last owner"), "{msg}"),
            other => panic!("expected the last owner kept, got {other:?}"),
        }
    }
    assert_eq!(t.set_member_role(&team.id, &bo.id, OWNER).await.unwrap().role, OWNER);
    assert!(t.authenticate(bo_token.expose()).await.unwrap().unwrap().manages_team());
    assert_eq!(t.set_member_role(&team.id, &ana.id, MEMBER).await.unwrap().role, MEMBER);
    assert!(!t.authenticate(ana_token.expose()).await.unwrap().unwrap().manages_team());

    // Removing a member revokes their tokens and ends their sessions; the row stays and
    // the name is free again.
    let removed = t.remove_member(&team.id, &ana.id).await.unwrap();
    assert!(removed.removed_at.is_some());
    assert_eq!(t.authenticate(ana_token.expose()).await.unwrap(), None);
    assert!(matches!(t.remove_member(&team.id, &ana.id).await, Err(StoreError::NotFound { what: "member", .. })));
    assert!(matches!(
        t.create_token(&team.id, Some(&ana.id), "again", false).await,
        Err(StoreError::NotFound { what: "member", .. })
    ));
    let listed = t.members(&team.id).await.unwrap();
    let mut listed: Vec<_> = listed.iter().map(|m| (m.name.as_str(), m.removed_at.is_some())).collect();
    listed.sort(); // made in the same millisecond, they may list in either order
    assert_eq!(listed, [("Ana", true), ("Bo", false)]);
    t.create_member(&team.id, "Ana", MEMBER).await.unwrap();
    assert!(t.members(&other.id).await.unwrap().is_empty());
    // Bo is the last owner now.
    t.remove_member(&team.id, &bo.id).await.unwrap_err();
    assert!(t.session(session.expose()).await.unwrap().is_some());
}
