//! The playground (issue 13): a page to try a prompt and watch it render, served at
//! `GET /{owner}/{app}/playground` with its script at `…/playground/app.js`.
//!
//! Both files are static and embedded in the binary (`include_str!`), so there is no build step and no
//! file to deploy. The page carries no data: it builds its form from `/openapi.json` and talks to the
//! queue API like any other client (submit, the status stream, the result), sending the API key the user
//! types as `Authorization: Key …`. So the page itself needs no key, and nothing on it is rendered from a
//! request on the server side.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

/// The page; its form is filled in by [`SCRIPT`].
pub const PAGE: &str = include_str!("playground/index.html");
/// The page's script (plain ES2020, no modules, no dependencies).
pub const SCRIPT: &str = include_str!("playground/app.js");

/// The page allows its own script and inline style, images from anywhere (presigned S3 URLs live on
/// another origin), fetches to any origin (`response_url` follows `--public-url`), and no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src * data: blob:; connect-src *; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

pub async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use crate::http::{router, AppState, HttpConfig};
    use crate::metrics::Metrics;
    use crate::submit::testing::MemoryBus;

    /// A router with API keys configured, under a non-default owner/app.
    fn app() -> axum::Router {
        let bus = Arc::new(MemoryBus::default());
        let (_ready, rx) = tokio::sync::watch::channel(true);
        let cfg = HttpConfig {
            owner: "acme".into(),
            app: "paint".into(),
            api_keys: vec!["k".into()],
            ..HttpConfig::default()
        };
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        router(AppState::new(cfg, bus.registry.clone(), bus, metrics, rx))
    }

    async fn get(uri: &str) -> (StatusCode, String, String) {
        let req = Request::get(uri).body(Body::empty()).expect("request");
        let resp = app().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, ct, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn page_and_script_are_served_without_a_key_under_the_app_path() {
        let (status, ct, body) = get("/acme/paint/playground").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct, "text/html; charset=utf-8");
        assert!(
            body.contains(r#"<script src="playground/app.js">"#),
            "{body}"
        );
        let (status, ct, body) = get("/acme/paint/playground/app.js").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct, "text/javascript; charset=utf-8");
        assert!(body.contains("/openapi.json"));
        // The API itself still wants the key the page asks for.
        let (status, _, _) = get("/openapi.json").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = get("/local/sana/playground").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
