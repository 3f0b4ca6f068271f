//! The local server's guard, in front of every route: on a loopback bind the `Host` header must
//! name loopback (a DNS-rebinding page reaches us under its own name); state-changing requests
//! from another origin are refused (cross-site form posts and fetches); and with an API key every
//! `/api`, `/v1`, `/sdapi` and `/images` call must carry it.
//!
//! The key is accepted as `Authorization: Bearer KEY` (OpenAI SDKs), `Authorization: Basic` with
//! KEY as the password (A1111 clients' `--api-auth`), or the `zturbo_key` cookie that
//! `POST /api/auth` sets for the browser UI (HttpOnly, SameSite=Strict, holding a token derived
//! from the key rather than the key). Image URLs handed to API clients carry a per-file signature
//! (`?sig=`) so they open without headers, as OpenAI's signed URLs do.

use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::error::{ApiError, ApiJson};
use super::{openai, AppState};

/// Cookie the browser UI authenticates with.
pub const COOKIE: &str = "zturbo_key";
/// Days the UI's cookie lives.
const COOKIE_DAYS: u64 = 30;

/// How the server was told to protect itself; fixed at start-up.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// `--api-key`: required on the API surfaces when set.
    pub api_key: Option<String>,
    /// Bound to a loopback address: the `Host` header must name loopback and this port.
    pub loopback: bool,
    /// The bound port (the one `Host` must carry on a loopback bind).
    pub port: u16,
    /// `--cors-origin`: the one other origin allowed to call the API from a browser.
    pub cors_origin: Option<String>,
}

/// Whether `host` (an IP or a name) is a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks a `--cors-origin` value: `scheme://host[:port]`, nothing after it.
pub fn parse_cors_origin(s: &str) -> Result<String, String> {
    let o = s.trim().trim_end_matches('/');
    let Some((scheme, rest)) = o.split_once("://") else {
        return Err(format!(
            "`{s}`: expected an origin such as https://app.example.com"
        ));
    };
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', '?', '#']) {
        return Err(format!(
            "`{s}`: expected an origin such as https://app.example.com (scheme and host, no path)"
        ));
    }
    if HeaderValue::from_str(o).is_err() {
        return Err(format!("`{s}`: not a valid header value"));
    }
    Ok(o.to_ascii_lowercase())
}

/// Checks an `--api-key` value: visible ASCII, no spaces (it travels in headers).
pub fn check_api_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the API key must not be empty".into());
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the API key must be visible ASCII without spaces".into());
    }
    Ok(())
}

impl Security {
    /// The value the UI's cookie holds for `key`: derived, so the cookie never carries the key.
    fn cookie_token(key: &str) -> String {
        hex(&hmac_sha256(key.as_bytes(), b"zturbo ui cookie v1"))
    }

    /// The signature an image URL carries when a key is set (`None` without a key).
    pub fn image_sig(&self, file: &str) -> Option<String> {
        let key = self.api_key.as_deref()?;
        let mac = hmac_sha256(key.as_bytes(), format!("zturbo image v1:{file}").as_bytes());
        Some(hex(&mac[..16]))
    }

    /// An image's URL path, signed when a key is set.
    pub fn image_path(&self, file: &str) -> String {
        let path = super::images::url(file);
        match self.image_sig(file) {
            Some(sig) => format!("{path}?sig={sig}"),
            None => path,
        }
    }

    fn authorized(&self, key: &str, req: &Request) -> bool {
        let headers = req.headers();
        for v in headers.get_all(header::AUTHORIZATION) {
            let Ok(v) = v.to_str() else { continue };
            let v = v.trim();
            let (scheme, cred) = v.split_once(' ').unwrap_or((v, ""));
            let cred = cred.trim();
            if scheme.eq_ignore_ascii_case("bearer") && ct_eq(cred.as_bytes(), key.as_bytes()) {
                return true;
            }
            if scheme.eq_ignore_ascii_case("basic") {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(cred)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok());
                if let Some((_, pass)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
                    if ct_eq(pass.as_bytes(), key.as_bytes()) {
                        return true;
                    }
                }
            }
        }
        let token = Self::cookie_token(key);
        if cookie_values(headers, COOKIE).any(|v| ct_eq(v.as_bytes(), token.as_bytes())) {
            return true;
        }
        // A signed image URL opens that one image.
        if let Some(file) = req.uri().path().strip_prefix("/images/") {
            if let (Some(sig), Some(want)) =
                (query_param(req.uri().query(), "sig"), self.image_sig(file))
            {
                return ct_eq(sig.as_bytes(), want.as_bytes());
            }
        }
        false
    }

    /// `Host` on a loopback bind: a loopback name with the bound port.
    fn host_ok(&self, req: &Request) -> bool {
        if !self.loopback {
            return true;
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let Some(host) = host else { return false };
        let (name, port) = split_host_port(&host);
        let port_ok = match port {
            Some(p) => p == self.port,
            None => self.port == 80,
        };
        port_ok && is_loopback_host(name)
    }

    /// `Origin` of a state-changing request: absent, our own, or the configured CORS origin.
    fn origin_ok(&self, req: &Request) -> bool {
        if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
            return true;
        }
        let headers = req.headers();
        let Some(origin) = headers.get(header::ORIGIN) else {
            // No Origin: not a browser's cross-site request, unless Fetch Metadata says so.
            let site = headers
                .get("sec-fetch-site")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return !site.eq_ignore_ascii_case("cross-site");
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim().to_ascii_lowercase();
        if self.cors_origin.as_deref() == Some(origin.as_str()) {
            return true;
        }
        // `null` (sandboxed frames, file: pages) and anything unparsable are foreign.
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false;
        };
        let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let default_port = if scheme == "https" { 443 } else { 80 };
        let (o_name, o_port) = split_host_port(authority);
        let (h_name, h_port) = split_host_port(host);
        let o_port = o_port.unwrap_or(default_port);
        let h_port = h_port.unwrap_or(default_port);
        if o_port != h_port {
            return false;
        }
        // On loopback, localhost and 127.0.0.1 are the same server.
        o_name.eq_ignore_ascii_case(h_name)
            || (self.loopback && is_loopback_host(o_name) && is_loopback_host(h_name))
    }
}

/// Paths that need the key when one is set; the page, its assets and `/openapi.json` do not.
fn needs_key(path: &str) -> bool {
    const PROTECTED: [&str; 4] = ["/api", "/v1", "/sdapi", "/images"];
    if path == "/api/auth" {
        return false;
    }
    PROTECTED
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

/// `host[:port]` → (host, port); IPv6 literals keep their brackets.
fn split_host_port(s: &str) -> (&str, Option<u16>) {
    if s.starts_with('[') {
        return match s.find(']') {
            Some(i) => {
                let port = s[i + 1..].strip_prefix(':').and_then(|p| p.parse().ok());
                (&s[..=i], port)
            }
            None => (s, None),
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (s, None),
        },
        None => (s, None),
    }
}

fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v.trim())
        })
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Constant-time equality (the length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A refusal in the error shape of the surface the path belongs to.
fn refuse(path: &str, status: StatusCode, message: String) -> Response {
    let mut res =
        if status == StatusCode::UNAUTHORIZED && (path == "/v1" || path.starts_with("/v1/")) {
            openai::error(status, None, Some("invalid_api_key"), message).into_response()
        } else {
            super::surface_error(path, status, message)
        };
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"zturbo\""),
        );
    }
    res
}

/// The middleware: Host, then Origin, then the key.
pub async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let sec = &s.security;
    let path = req.uri().path().to_string();
    if !sec.host_ok(&req) {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
            .to_string();
        tracing::warn!(%host, %path, "refused: Host is not this loopback server");
        return refuse(
            &path,
            StatusCode::FORBIDDEN,
            format!(
                "this server listens on loopback and answers only to localhost, 127.0.0.1 or [::1] \
                 on port {} (Host was `{host}`)",
                sec.port
            ),
        );
    }
    if !sec.origin_ok(&req) {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(cross-site)")
            .to_string();
        tracing::warn!(%origin, %path, method = %req.method(), "refused: cross-origin request");
        return refuse(
            &path,
            StatusCode::FORBIDDEN,
            format!(
                "cross-origin {} from {origin} refused (allow one origin with --cors-origin)",
                req.method()
            ),
        );
    }
    if let Some(key) = sec.api_key.as_deref() {
        if needs_key(&path) && !sec.authorized(key, &req) {
            return refuse(
                &path,
                StatusCode::UNAUTHORIZED,
                "an API key is required: send `Authorization: Bearer <key>` (the key given to \
                 zturbo serve --api-key)"
                    .into(),
            );
        }
    }
    next.run(req).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRequest {
    pub key: String,
}

/// `POST /api/auth {key}`: checks the key and sets the UI's cookie (204); 401 for a wrong key.
/// Without a key configured there is nothing to log into: 204, no cookie.
pub async fn auth(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<AuthRequest>,
) -> Result<Response, ApiError> {
    let Some(key) = s.security.api_key.as_deref() else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    if !ct_eq(req.key.trim().as_bytes(), key.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            Some("key"),
            "wrong API key",
        ));
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        Security::cookie_token(key),
        COOKIE_DAYS * 86_400
    );
    let mut res = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(res)
}

/// `GET /api/auth`: whether this client is authorized (`{required, authorized}`), so the UI can
/// ask for the key before anything fails.
pub async fn auth_status(State(s): State<AppState>, req: Request<Body>) -> Response {
    let required = s.security.api_key.is_some();
    let authorized = match s.security.api_key.as_deref() {
        Some(key) => s.security.authorized(key, &req),
        None => true,
    };
    axum::Json(serde_json::json!({ "required": required, "authorized": authorized }))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hosts_and_origins_parse() {
        assert_eq!(split_host_port("127.0.0.1:7860"), ("127.0.0.1", Some(7860)));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_host_port("localhost"), ("localhost", None));
        assert!(is_loopback_host("[::1]") && is_loopback_host("LOCALHOST"));
        assert!(is_loopback_host("127.0.0.2") && !is_loopback_host("0.0.0.0"));
        assert!(!is_loopback_host("evil.example"));
        assert_eq!(
            parse_cors_origin("https://App.example.com/").unwrap(),
            "https://app.example.com"
        );
        assert!(parse_cors_origin("app.example.com").is_err());
        assert!(parse_cors_origin("https://a.example/path").is_err());
        assert!(check_api_key("with space").is_err() && check_api_key("").is_err());
    }

    #[test]
    fn protected_paths() {
        for p in [
            "/api/jobs",
            "/v1/models",
            "/sdapi/v1/txt2img",
            "/images/x.png",
            "/api",
        ] {
            assert!(needs_key(p), "{p}");
        }
        for p in [
            "/",
            "/app.js",
            "/openapi.json",
            "/api/auth",
            "/apix",
            "/v10",
        ] {
            assert!(!needs_key(p), "{p}");
        }
    }
}
