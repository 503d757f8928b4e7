//! `GET /` (§11.4): the dashboard, a few static files built into the binary. Nothing is fetched from any
//! other origin (it works on an air-gapped network), and the Content-Security-Policy allows scripts,
//! styles and connections from this origin only, with no inline script or style: together with the
//! front end rendering every user-supplied string as text, that makes script injection structurally
//! hard, not just avoided. The page uses the public API with an admin token the user pastes; it holds no
//! privilege of its own, so serving it needs no credential.
//!
//! Caching: every file carries a strong `ETag` (a hash of its bytes) and `Cache-Control: no-cache`, so
//! browsers keep a copy and revalidate it with a cheap `304` — an upgraded server is picked up at once,
//! without hashed file names and the build step they would need.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The policy every dashboard response carries.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:literal) => {
        Asset {
            name: $name,
            content_type: $type,
            bytes: include_bytes!(concat!("../../dashboard/", $name)),
        }
    };
}

/// Every file of the dashboard; `index.html` is served at `/`, the others under `/dashboard/`.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("dom.js", "text/javascript; charset=utf-8"),
    asset!("chart.js", "text/javascript; charset=utf-8"),
    asset!("format.js", "text/javascript; charset=utf-8"),
    asset!("views.js", "text/javascript; charset=utf-8"),
    asset!("work.js", "text/javascript; charset=utf-8"),
    asset!("sessions.js", "text/javascript; charset=utf-8"),
];

/// The strong validator of each asset, computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let digest = Sha256::digest(a.bytes);
                format!("\"{}\"", crate::credentials::hex(&digest[..12]))
            })
            .collect()
    })
}

/// Total size of the dashboard's files, for the test that keeps it small.
pub fn total_bytes() -> usize {
    ASSETS.iter().map(|a| a.bytes.len()).sum()
}

/// `GET /`.
pub async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /dashboard/{file}`.
pub async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    if name == "index.html" {
        return ApiError::not_found("no such file").into_response();
    }
    serve(&name, &headers)
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.name == name) else {
        return ApiError::not_found(format!("the dashboard has no file {name}")).into_response();
    };
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.bytes).into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_str(etag).expect("hex etag"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_stays_small() {
        assert!(total_bytes() < 300 * 1024, "{} bytes", total_bytes());
    }

    #[test]
    fn every_module_the_page_imports_is_served() {
        for asset in ASSETS
            .iter()
            .filter(|a| a.name.ends_with(".js") || a.name.ends_with(".html"))
        {
            let text = std::str::from_utf8(asset.bytes).expect("utf-8");
            for quoted in text
                .split(['"', '\''])
                .filter(|s| s.starts_with("./") || s.starts_with("/dashboard/"))
            {
                let name = quoted
                    .trim_start_matches("./")
                    .trim_start_matches("/dashboard/");
                if name.contains(' ') || name.is_empty() {
                    continue;
                }
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{} refers to {quoted}, which is not served",
                    asset.name
                );
            }
        }
    }
}
