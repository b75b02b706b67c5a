//! Every web route, as the web module lists them (`lathe_server::web::route_list`, the list
//! the router is built from, so a new page cannot be left out): without a session a page
//! sends the browser to the sign-in page and a form is refused; with another team's session, on the first team's
//! ids, each answers 404, forms included, even with that session's own valid CSRF token;
//! and the pages without ids show nothing of the first team.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::{Server, two_teams};

crate::on_both_backends!(another_teams_session_finds_nothing_on_any_page);

/// Routes anyone may call: signing in, the start page, the static files.
const PUBLIC: [&str; 3] = ["/", "/login", "/static/{*path}"];

async fn another_teams_session_finds_nothing_on_any_page(mut s: Server) {
    let t = two_teams(&mut s).await;
    let project = t.id("{project}");

    // The first team's own workflow checklist: a suite and an import done, the split next,
    // training blocked until there is a baseline.
    let (own, _) = sign_in(&s, &t.a).await;
    let (status, _, home) = send(&s, Request::get(format!("/projects/{project}")).header(header::COOKIE, &own).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let states: Vec<&str> = home.split("<li class=\"").skip(1).filter_map(|li| li.split('"').next()).collect();
    assert_eq!(states, ["done", "done", "next", "blocked", "blocked", "blocked", "blocked"], "{home}");

    let (cookie, csrf) = sign_in(&s, &t.b).await;
    let mut routes = lathe_server::web::route_list();
    // Signing out ends the session the other checks use: last.
    routes.sort_by_key(|(_, path)| *path == "/logout");
    assert!(routes.len() >= 30, "{} web routes", routes.len());
    let mut checked = 0;
    for (method, template) in routes {
        let uri = t.fill(template);
        assert!(!uri.contains('{'), "a placeholder of {template} has no id in this test");
        let method: Method = method.parse().unwrap();
        if PUBLIC.contains(&template) {
            continue;
        }
        // No session: a page sends the browser to sign in, a form is refused, before
        // anything is read or written.
        let (status, headers, _) = send(&s, form_request(&method, &uri, None, "")).await;
        let location = headers.get(header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("");
        let to_login = status.is_redirection() && location.starts_with("/login");
        let refused = if method == Method::GET { to_login } else { status == StatusCode::UNAUTHORIZED };
        assert!(refused, "{method} {uri} without a session: {status} {location}");

        // Another team's session and its own CSRF token, on the first team's ids.
        let (status, _, body) = send(&s, form_request(&method, &uri, Some(&cookie), &csrf)).await;
        if template.contains('{') {
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri} from another team: {body}");
        } else {
            assert!(status.is_success() || status.is_redirection(), "{method} {uri}: {status} {body}");
            for id in &t.owned_ids()[..3] {
                assert!(!body.contains(id), "{method} {uri} shows the other team's {id}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 25, "{checked} routes checked");
}

/// Signs in with a token; returns the session cookie and the CSRF token of its forms.
async fn sign_in(s: &Server, token: &str) -> (String, String) {
    let login = Request::post("/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={token}")))
        .unwrap();
    let (status, headers, _) = send(s, login).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let set = headers.get(header::SET_COOKIE).unwrap().to_str().unwrap();
    let cookie = set.split(';').next().unwrap().to_string();
    let page = Request::get("/projects").header(header::COOKIE, &cookie).body(Body::empty()).unwrap();
    let (_, _, html) = send(s, page).await;
    let at = html.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
    let csrf = html[at..].split('"').next().unwrap().to_string();
    (cookie, csrf)
}

/// A GET, or a POST whose body passes the route's extractor (form fields, or a multipart
/// upload for the upload routes), so the answer is the handler's own.
fn form_request(method: &Method, uri: &str, cookie: Option<&str>, csrf: &str) -> Request<Body> {
    let mut r = Request::builder().method(method.clone()).uri(uri);
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, c);
    }
    if method == Method::GET {
        return r.body(Body::empty()).unwrap();
    }
    if uri.ends_with("/datasets") || uri.ends_with("/plugins") || uri.ends_with("/packs/upload") {
        let b = "lathe-boundary";
        let body = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n{{}}\r\n--{b}--\r\n"
        );
        return r.header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={b}")).body(Body::from(body)).unwrap();
    }
    let body = format!("csrf={csrf}&name=x&role=member&kind=data_stats&version=words&input=%7B%7D&token=x&toml=");
    r.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from(body)).unwrap()
}

async fn send(s: &Server, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let resp = lathe_server::app(s.state.clone()).oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&bytes).into_owned())
}
