//! The web console: a static page and its bundle (built from `console/` by `console/build.mjs`,
//! committed under `services/gateway/console/`, embedded here so that `cargo build` needs no
//! node), served at fixed paths. No catch-all: any other path stays 404. The assets hold no
//! data, so they need no key; the page calls the JSON API with the key the user enters.

use axum::{
    Router,
    http::{HeaderName, HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/console.js");
const STYLE: &str = include_str!("../../console/console.css");

/// Shown with the basemap: the default tiles are OpenStreetMap's, whose licence requires it.
pub const TILE_ATTRIBUTION: &str = "© OpenStreetMap contributors";

/// The page may load tiles from any host (`CONSOLE_TILE_URL`), everything else from the
/// gateway only; no framing (clickjacking).
const CSP: &str = "default-src 'self'; img-src * data: blob:; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// `index.html` and the config are revalidated on every load; the script and the style are
/// named by `?v=<content hash>` in the page, so they can be cached for good.
const NO_CACHE: &str = "no-cache";
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The console's routes; `tile_url` is `CONSOLE_TILE_URL`.
pub fn router(tile_url: &str) -> Router {
    let config = format!(
        "{}\n",
        json!({ "tileUrl": tile_url, "attribution": TILE_ATTRIBUTION })
    );
    Router::new()
        .route(
            "/",
            get(|| async {
                let mut response = asset(INDEX, "text/html; charset=utf-8", NO_CACHE);
                response.headers_mut().insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(CSP),
                );
                response.headers_mut().insert(
                    HeaderName::from_static("referrer-policy"),
                    HeaderValue::from_static("no-referrer"),
                );
                response
            }),
        )
        .route(
            "/console.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8", IMMUTABLE) }),
        )
        .route(
            "/console.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8", IMMUTABLE) }),
        )
        .route(
            "/console/config.json",
            get(move || async move { asset(config, "application/json", NO_CACHE) }),
        )
}

fn asset(body: impl Into<String>, content_type: &'static str, cache: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, cache),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body.into(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt as _;

    use super::*;

    async fn get(path: &str) -> Response {
        router("https://tiles.example/{z}/{x}/{y}.png")
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("infallible")
    }

    async fn text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    fn header_of(response: &Response, name: header::HeaderName) -> &str {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn page_and_assets_have_their_types_and_cache_rules() {
        let page = get("/").await;
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            header_of(&page, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header_of(&page, header::CACHE_CONTROL), "no-cache");
        assert!(header_of(&page, header::CONTENT_SECURITY_POLICY).contains("frame-ancestors"));
        let html = text(page).await;
        // The page names the bundle by content hash (what makes caching it for good safe).
        assert!(html.contains("/console.js?v="), "{html}");
        assert!(!html.contains("__JS_HASH__"));
        for (path, kind) in [
            ("/console.js", "text/javascript"),
            ("/console.css", "text/css"),
        ] {
            let response = get(path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert!(header_of(&response, header::CONTENT_TYPE).starts_with(kind));
            assert_eq!(header_of(&response, header::CACHE_CONTROL), IMMUTABLE);
            assert!(!text(response).await.is_empty());
        }
    }

    #[tokio::test]
    async fn config_carries_the_tile_url_and_attribution() {
        let response = get("/console/config.json").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header_of(&response, header::CONTENT_TYPE),
            "application/json"
        );
        let config: serde_json::Value = serde_json::from_str(&text(response).await).expect("json");
        assert_eq!(config["tileUrl"], "https://tiles.example/{z}/{x}/{y}.png");
        assert_eq!(config["attribution"], TILE_ATTRIBUTION);
    }

    #[tokio::test]
    async fn other_paths_stay_not_found() {
        for path in [
            "/index.html",
            "/console",
            "/console/",
            "/console.js/x",
            "/x.js",
        ] {
            assert_eq!(get(path).await.status(), StatusCode::NOT_FOUND, "{path}");
        }
    }
}
