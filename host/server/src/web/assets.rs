//! `/static/…`: the stylesheet, the page script and the vendored libraries, embedded in the
//! binary. Their names carry no version, so they are revalidated (`no-cache` with an
//! `ETag` from the build) rather than cached forever.

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Pages;

macro_rules! assets {
    ($($name:literal => $mime:literal),* $(,)?) => {
        &[$(($name, $mime, include_bytes!(concat!("../../../../web/static/", $name)).as_slice())),*]
    };
}

const ASSETS: &[(&str, &str, &[u8])] = assets!(
    "lathe.css" => "text/css; charset=utf-8",
    "lathe.js" => "text/javascript; charset=utf-8",
    "vendor/htmx.min.js" => "text/javascript; charset=utf-8",
    "vendor/uPlot.iife.min.js" => "text/javascript; charset=utf-8",
    "vendor/uPlot.min.css" => "text/css; charset=utf-8",
);

pub fn routes(pages: Pages) -> Pages {
    pages
        .get("/static/{*path}", asset)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    let Some((_, mime, bytes)) = ASSETS.iter().find(|(name, _, _)| *name == path) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let etag = format!("\"{}\"", &lathe_util::sha256_hex(bytes)[..16]);
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    ([(header::CONTENT_TYPE, *mime), (header::CACHE_CONTROL, "no-cache"), (header::ETAG, etag.as_str())], *bytes).into_response()
}
