//! The dashboard's HTTP routes:
//!
//! - `GET /`, `/dashboard.js`, `/dashboard.css`: the page (static, built in);
//! - `GET /api/overview`: the latest overview as JSON (read from memory:
//!   the poller reads the broker, not the requests);
//! - `POST /api/redrive` with `{"dlq_topic": "...", "max": N}` (`max`
//!   optional): moves dead letters back; 403 unless `--allow-redrive`.
//!
//! Errors are JSON `{"error": "..."}` with a status saying whose fault it
//! is. Every response forbids framing and inline code from elsewhere
//! (Content-Security-Policy), and on the loopback only requests naming the
//! loopback in `Host` are answered.

use super::listen::{is_loopback_host, same_origin};
use super::Dashboard;
use crate::exit::Exit;
use crate::output::CliError;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");

/// Scripts and styles from the dashboard only; no frames, forms or
/// plugins. User data reaches the page as JSON put into the DOM as text,
/// so even a bug there could not run a script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The routes over a running dashboard.
pub(crate) fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }),
        )
        .route(
            "/dashboard.css",
            get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }),
        )
        .route("/api/overview", get(overview))
        .route("/api/redrive", post(redrive))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page") })
        .layer(middleware::from_fn_with_state(dashboard.clone(), guard))
        .with_state(dashboard)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A JSON error.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// The HTTP status of a failed command: the caller's fault (4xx), the
/// broker's availability (503) or ours (500).
pub(crate) fn status_of(exit: Exit) -> StatusCode {
    match exit {
        Exit::Usage | Exit::Invalid => StatusCode::BAD_REQUEST,
        Exit::NotFound => StatusCode::NOT_FOUND,
        Exit::Conflict | Exit::Locked => StatusCode::CONFLICT,
        Exit::Unsupported => StatusCode::NOT_IMPLEMENTED,
        Exit::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Exit::Denied => StatusCode::BAD_GATEWAY,
        Exit::Failure | Exit::Corrupt | Exit::Io => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Refuse requests for another host name (a rebinding page) when serving
/// the loopback, and set the security headers on every response.
async fn guard(State(dashboard): State<Arc<Dashboard>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let mut response = if dashboard.loopback_only && !is_loopback_host(host) {
        error(
            StatusCode::FORBIDDEN,
            "this dashboard answers only requests to localhost, 127.0.0.1 or [::1]",
        )
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn overview(State(dashboard): State<Arc<Dashboard>>) -> Response {
    let json = dashboard.latest.borrow().clone();
    (
        [(header::CONTENT_TYPE, "application/json")],
        json.as_str().to_owned(),
    )
        .into_response()
}

/// `POST /api/redrive`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    dlq_topic: String,
    #[serde(default)]
    max: Option<usize>,
}

/// Parse and check a redrive request: allowed, from the page's own origin,
/// JSON (a cross-site form cannot send that without the browser asking
/// first), and well-formed.
fn redrive_request(
    allow_redrive: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<RedriveRequest, Response> {
    if !allow_redrive {
        return Err(error(
            StatusCode::FORBIDDEN,
            "this dashboard is read-only: start it with --allow-redrive to redrive from the page",
        ));
    }
    let get = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if !same_origin(get(header::ORIGIN), get(header::HOST)) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "a redrive must come from the dashboard's own page (Origin differs from Host)",
        ));
    }
    let json = get(header::CONTENT_TYPE)
        .and_then(|c| c.split(';').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the request as Content-Type: application/json",
        ));
    }
    let request: RedriveRequest = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"dlq_topic\": \"...\", \"max\": N}} (max optional): {e}"),
        )
    })?;
    if request.dlq_topic.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "dlq_topic is empty"));
    }
    Ok(request)
}

async fn redrive(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match redrive_request(dashboard.allow_redrive, &headers, &body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    match dashboard.redrive(&request.dlq_topic, request.max).await {
        Ok(moved) => axum::Json(json!({
            "dlq_topic": request.dlq_topic,
            "redriven": moved,
        }))
        .into_response(),
        Err(CliError::Failed { message, exit }) => error(status_of(exit), message),
        Err(CliError::BrokenPipe) => error(StatusCode::INTERNAL_SERVER_ERROR, "broken pipe"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(items: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in items {
            h.insert(name.clone(), HeaderValue::from_static(value));
        }
        h
    }

    fn status(r: Result<RedriveRequest, Response>) -> StatusCode {
        match r {
            Ok(_) => StatusCode::OK,
            Err(response) => response.status(),
        }
    }

    #[test]
    fn redrive_requests_are_checked_before_anything_moves() {
        let json = headers(&[
            (header::CONTENT_TYPE, "application/json"),
            (header::HOST, "127.0.0.1:7878"),
            (header::ORIGIN, "http://127.0.0.1:7878"),
        ]);
        let body = br#"{"dlq_topic":"mail.sender.dlq"}"#;
        // Read-only: 403 whatever the request.
        assert_eq!(
            status(redrive_request(false, &json, body)),
            StatusCode::FORBIDDEN
        );
        let ok = redrive_request(true, &json, body).unwrap();
        assert_eq!((ok.dlq_topic.as_str(), ok.max), ("mail.sender.dlq", None));
        let ok = redrive_request(true, &json, br#"{"dlq_topic":"d","max":3}"#).unwrap();
        assert_eq!(ok.max, Some(3));
        // Another site's page.
        let cross = headers(&[
            (header::CONTENT_TYPE, "application/json"),
            (header::HOST, "127.0.0.1:7878"),
            (header::ORIGIN, "http://evil.example"),
        ]);
        assert_eq!(
            status(redrive_request(true, &cross, body)),
            StatusCode::FORBIDDEN
        );
        // A form post (no preflight) is not JSON.
        let form = headers(&[
            (header::CONTENT_TYPE, "text/plain"),
            (header::HOST, "127.0.0.1:7878"),
        ]);
        assert_eq!(
            status(redrive_request(true, &form, body)),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        // Bad bodies: 400, never a panic.
        for bad in [
            &b"not json"[..],
            br#"{"dlq_topic": 5}"#,
            br#"{"dlq_topic":"x","max":-1}"#,
            br#"{"dlq_topic":"x","extra":1}"#,
            br#"{"dlq_topic":""}"#,
            b"",
            &[0xff, 0xfe],
        ] {
            assert_eq!(
                status(redrive_request(true, &json, bad)),
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn failures_map_to_whose_fault_it_is() {
        assert_eq!(status_of(Exit::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(status_of(Exit::Invalid), StatusCode::BAD_REQUEST);
        assert_eq!(status_of(Exit::Locked), StatusCode::CONFLICT);
        assert_eq!(
            status_of(Exit::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status_of(Exit::Failure), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
