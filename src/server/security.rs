//! The local server's guard, in front of every route: on a loopback bind the `Host` header must
//! name loopback (a DNS-rebinding page reaches us under its own name); state-changing requests
//! from another origin are refused (cross-site form posts and fetches); and with an API key every
//! `/api`, `/v1`, `/sdapi` and `/images` call must carry it.
//!
//! The key is accepted as `Authorization: Bearer KEY` (OpenAI SDKs), `Authorization: Basic` with
//! KEY as the password (A1111 clients' `--api-auth`), or the `zturbo_key` cookie that
//! `POST /api/auth` sets for the browser UI (HttpOnly, SameSite=Strict, holding a token derived
//! from the key rather than the key). Image URLs handed to API clients carry a per-file signature
//! (`?sig=`) so they open without headers, as OpenAI's signed URLs do. Both expire: the cookie
//! after [`COOKIE_TTL`], a signed URL after [`SIGNED_URL_TTL`].
//!
//! Wrong keys are rate-limited per client address ([`KeyAttempts`]): after
//! [`KEY_FAILURE_BURST`] failures one more try is allowed every [`KEY_FAILURE_REFILL`]; meanwhile
//! requests that carry a key are answered 429 with `Retry-After`, without the key being checked.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
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
/// How long the UI's login cookie is valid (the browser is told the same `Max-Age`).
pub const COOKIE_TTL: Duration = Duration::from_secs(7 * 86_400);
/// How long a signed image URL (`?sig=`) opens its image.
pub const SIGNED_URL_TTL: Duration = Duration::from_secs(3600);
/// Wrong keys one client address may send before it is slowed down.
pub const KEY_FAILURE_BURST: u32 = 10;
/// After the burst, one more wrong key per this long.
pub const KEY_FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Client addresses the limiter remembers; beyond it the ones with a full allowance are dropped.
const KEY_ATTEMPTS_TRACKED: usize = 4096;

/// Seconds since the Unix epoch.
fn now_s() -> u64 {
    crate::queue::job::now_ms() / 1000
}

/// Failed key attempts per client address: a bucket of [`KEY_FAILURE_BURST`] tries refilled one
/// per [`KEY_FAILURE_REFILL`]. IPv6 clients are counted per /64 (one host can hold a whole one).
#[derive(Debug, Default)]
pub struct KeyAttempts {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl KeyAttempts {
    fn client(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
            },
            v4 => v4,
        }
    }

    fn refilled(tokens: f64, since: Instant, now: Instant) -> f64 {
        let gained = now.duration_since(since).as_secs_f64() / KEY_FAILURE_REFILL.as_secs_f64();
        (tokens + gained).min(KEY_FAILURE_BURST as f64)
    }

    /// `Some(seconds)` until `ip` may try a key again; `None` when it may now.
    pub fn locked_for(&self, ip: IpAddr) -> Option<u64> {
        let map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let &(tokens, since) = map.get(&Self::client(ip))?;
        let tokens = Self::refilled(tokens, since, Instant::now());
        (tokens < 1.0).then(|| {
            ((1.0 - tokens) * KEY_FAILURE_REFILL.as_secs_f64())
                .ceil()
                .max(1.0) as u64
        })
    }

    /// Counts a wrong key from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= KEY_ATTEMPTS_TRACKED {
            map.retain(|_, (t, since)| Self::refilled(*t, *since, now) < KEY_FAILURE_BURST as f64);
        }
        let entry = map
            .entry(Self::client(ip))
            .or_insert((KEY_FAILURE_BURST as f64, now));
        let tokens = Self::refilled(entry.0, entry.1, now);
        *entry = ((tokens - 1.0).max(0.0), now);
    }
}

/// How the server was told to protect itself; fixed at start-up.
#[derive(Debug, Default)]
pub struct Security {
    /// `--api-key`: required on the API surfaces when set.
    pub api_key: Option<String>,
    /// Bound to a loopback address: the `Host` header must name loopback and this port.
    pub loopback: bool,
    /// The bound port (the one `Host` must carry on a loopback bind).
    pub port: u16,
    /// `--cors-origin`: the one other origin allowed to call the API from a browser.
    pub cors_origin: Option<String>,
    /// Wrong keys per client address.
    pub key_attempts: KeyAttempts,
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

/// `<expiry>.<mac>`: a value valid until `expiry` (Unix seconds), signed with the key.
fn expiring_token(key: &str, purpose: &str, expiry: u64, mac_bytes: usize) -> String {
    let mac = hmac_sha256(key.as_bytes(), format!("{purpose}:{expiry}").as_bytes());
    format!("{expiry}.{}", hex(&mac[..mac_bytes]))
}

/// What a credential the request carries amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Credential {
    /// None at all: not a guess.
    Absent,
    /// One we issued, past its expiry (an old signed URL, last week's cookie): not a guess either.
    Expired,
    /// Something else: a wrong key, a forged or altered token.
    Wrong,
    Valid,
}

/// Checks `token` against [`expiring_token`] for this key and purpose.
fn token_state(key: &str, purpose: &str, token: &str, mac_bytes: usize) -> Credential {
    let Some((expiry, _)) = token.split_once('.') else {
        return Credential::Wrong;
    };
    // Canonical digits only, so one token has one spelling.
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Credential::Wrong;
    }
    let Ok(exp) = expiry.parse::<u64>() else {
        return Credential::Wrong;
    };
    let want = expiring_token(key, purpose, exp, mac_bytes);
    match (ct_eq(token.as_bytes(), want.as_bytes()), exp > now_s()) {
        (true, true) => Credential::Valid,
        (true, false) => Credential::Expired,
        (false, _) => Credential::Wrong,
    }
}

#[cfg(test)]
fn token_ok(key: &str, purpose: &str, token: &str, mac_bytes: usize) -> bool {
    token_state(key, purpose, token, mac_bytes) == Credential::Valid
}

impl Security {
    /// The UI cookie's value for `key`, valid until `expiry`: derived, so the cookie never
    /// carries the key, and expiring, so a copied cookie stops working.
    fn cookie_token(key: &str, expiry: u64) -> String {
        expiring_token(key, "zturbo ui cookie v2", expiry, 32)
    }

    /// The signature of `file` valid until `expiry` (`None` without a key).
    pub fn image_sig_until(&self, file: &str, expiry: u64) -> Option<String> {
        let key = self.api_key.as_deref()?;
        Some(expiring_token(
            key,
            &format!("zturbo image v2:{file}"),
            expiry,
            16,
        ))
    }

    /// An image's URL path, signed for [`SIGNED_URL_TTL`] when a key is set.
    pub fn image_path(&self, file: &str) -> String {
        let path = super::images::url(file);
        match self.image_sig_until(file, now_s() + SIGNED_URL_TTL.as_secs()) {
            Some(sig) => format!("{path}?sig={sig}"),
            None => path,
        }
    }

    /// The best credential the request carries: `Valid` if any is; else `Wrong` if any is a
    /// guess (so an expired token cannot shelter a wrong key); else `Expired` or `Absent`.
    fn credential(&self, key: &str, req: &Request) -> Credential {
        let headers = req.headers();
        let mut seen = Vec::new();
        for v in headers.get_all(header::AUTHORIZATION) {
            let Ok(v) = v.to_str() else {
                seen.push(Credential::Wrong);
                continue;
            };
            let v = v.trim();
            let (scheme, cred) = v.split_once(' ').unwrap_or((v, ""));
            let cred = cred.trim();
            let ok = if scheme.eq_ignore_ascii_case("bearer") {
                ct_eq(cred.as_bytes(), key.as_bytes())
            } else if scheme.eq_ignore_ascii_case("basic") {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(cred)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok());
                decoded
                    .as_deref()
                    .and_then(|d| d.split_once(':'))
                    .is_some_and(|(_, pass)| ct_eq(pass.as_bytes(), key.as_bytes()))
            } else {
                false
            };
            seen.push(if ok {
                Credential::Valid
            } else {
                Credential::Wrong
            });
        }
        for v in cookie_values(headers, COOKIE) {
            seen.push(token_state(key, "zturbo ui cookie v2", v, 32));
        }
        // A signed image URL opens that one image until it expires.
        if let Some(file) = req.uri().path().strip_prefix("/images/") {
            if let Some(sig) = query_param(req.uri().query(), "sig") {
                seen.push(token_state(
                    key,
                    &format!("zturbo image v2:{file}"),
                    sig,
                    16,
                ));
            }
        }
        seen.into_iter().max().unwrap_or(Credential::Absent)
    }

    fn authorized(&self, key: &str, req: &Request) -> bool {
        self.credential(key, req) == Credential::Valid
    }

    /// Whether the `Host` header may be trusted as the name the page was loaded from. Not on a
    /// non-loopback bind without a key: there a DNS-rebinding page reaches us under its own
    /// name, and its `Origin` would match its `Host`.
    fn host_trusted(&self) -> bool {
        self.loopback || self.api_key.is_some()
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
        // `null` (sandboxed frames, file: pages) and anything unparsable are foreign; so is any
        // scheme but plain http, the only one this server speaks.
        let Some(("http", authority)) = origin.split_once("://") else {
            return false;
        };
        let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let (o_name, o_port) = split_host_port(authority);
        let (h_name, h_port) = split_host_port(host);
        if o_port.unwrap_or(80) != h_port.unwrap_or(80) {
            return false;
        }
        let same_ip = match (ip_literal(o_name), ip_literal(h_name)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        // On loopback, localhost and 127.0.0.1 are the same server.
        let both_loopback = is_loopback_host(o_name) && is_loopback_host(h_name);
        if !self.host_trusted() {
            // Only an address (or a loopback name) the client really used: never a name the
            // client's DNS may have pointed here.
            return o_port.unwrap_or(80) == self.port && (same_ip || both_loopback);
        }
        o_name.eq_ignore_ascii_case(h_name) || same_ip || (self.loopback && both_loopback)
    }
}

/// An IP address written as a host (`10.0.0.5`, `[::1]`).
fn ip_literal(host: &str) -> Option<IpAddr> {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()
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

/// `host[:port]` → (host, port); IPv6 literals keep their brackets. A port that is not in
/// canonical form (`07860`, `+7860`, empty) leaves the whole text as the host, which then
/// matches no name: one server, one spelling of its port.
fn split_host_port(s: &str) -> (&str, Option<u16>) {
    if s.starts_with('[') {
        return match s.find(']') {
            Some(i) if i + 1 == s.len() => (s, None),
            Some(i) => match s[i + 1..].strip_prefix(':').and_then(canonical_port) {
                Some(port) => (&s[..=i], Some(port)),
                None => (s, None),
            },
            None => (s, None),
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) => match canonical_port(p) {
            Some(port) => (h, Some(port)),
            None => (s, None),
        },
        None => (s, None),
    }
}

/// A port in decimal without sign or leading zeros.
fn canonical_port(p: &str) -> Option<u16> {
    let digits = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if !digits || p.starts_with('0') {
        return None;
    }
    p.parse().ok()
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
        if needs_key(&path) {
            let client = client_ip(req.extensions());
            let credential = sec.credential(key, &req);
            if credential != Credential::Absent {
                if let Some(wait) = sec.key_attempts.locked_for(client) {
                    return too_many_guesses(&path, wait);
                }
            }
            let message = match credential {
                Credential::Valid => return next.run(req).await,
                Credential::Expired => {
                    "this login or signed image URL has expired (logins last 7 days, image URLs 1 \
                     hour): send the API key again (`Authorization: Bearer <key>`)"
                }
                Credential::Wrong => {
                    sec.key_attempts.failed(client);
                    tracing::warn!(%client, %path, "refused: wrong API key");
                    "wrong API key: send `Authorization: Bearer <key>` with the key given to \
                     zturbo serve --api-key"
                }
                Credential::Absent => {
                    "an API key is required: send `Authorization: Bearer <key>` (the key given \
                     to zturbo serve --api-key)"
                }
            };
            return refuse(&path, StatusCode::UNAUTHORIZED, message.into());
        }
    }
    next.run(req).await
}

/// The client's address (the accept loop records it); unspecified where there is none (tests).
fn client_ip(ext: &axum::http::Extensions) -> IpAddr {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// 429 for a client that sent too many wrong keys, in its surface's shape.
fn too_many_guesses(path: &str, wait_s: u64) -> Response {
    let message = format!(
        "too many wrong API keys from this address; try again in {wait_s} s \
         ({KEY_FAILURE_BURST} wrong keys are allowed, then one every {} s)",
        KEY_FAILURE_REFILL.as_secs()
    );
    let mut res = super::surface_error(path, StatusCode::TOO_MANY_REQUESTS, message);
    if let Ok(v) = HeaderValue::from_str(&wait_s.to_string()) {
        res.headers_mut().insert(header::RETRY_AFTER, v);
    }
    res
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
    ext: axum::http::Extensions,
    ApiJson(req): ApiJson<AuthRequest>,
) -> Result<Response, Response> {
    let Some(key) = s.security.api_key.as_deref() else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let client = client_ip(&ext);
    if let Some(wait) = s.security.key_attempts.locked_for(client) {
        return Err(too_many_guesses("/api/auth", wait));
    }
    if !ct_eq(req.key.trim().as_bytes(), key.as_bytes()) {
        s.security.key_attempts.failed(client);
        tracing::warn!(%client, "refused: wrong API key at /api/auth");
        return Err(
            ApiError::new(StatusCode::UNAUTHORIZED, Some("key"), "wrong API key").into_response(),
        );
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        Security::cookie_token(key, now_s() + COOKIE_TTL.as_secs()),
        COOKIE_TTL.as_secs()
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
    fn ports_must_be_spelled_canonically() {
        for host in [
            "127.0.0.1:07860",
            "127.0.0.1:+7860",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "[::1]:07860",
            "[::1]x",
        ] {
            assert_eq!(split_host_port(host), (host, None), "{host}");
            assert!(!is_loopback_host(split_host_port(host).0), "{host}");
        }
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("localhost:80"), ("localhost", Some(80)));
    }

    #[test]
    fn tokens_expire_and_name_their_purpose() {
        let now = now_s();
        let t = expiring_token("k", "p", now + 60, 16);
        assert!(token_ok("k", "p", &t, 16));
        assert!(!token_ok("k", "other", &t, 16), "bound to its purpose");
        assert!(!token_ok("k2", "p", &t, 16), "bound to the key");
        let old = expiring_token("k", "p", now - 1, 16);
        assert!(!token_ok("k", "p", &old, 16), "expired");
        // Moving the expiry breaks the MAC; a leading zero is another spelling, refused.
        let (_, mac) = t.split_once('.').unwrap();
        assert!(!token_ok("k", "p", &format!("{}.{mac}", now + 3600), 16));
        assert!(!token_ok("k", "p", &format!("0{t}"), 16));
        assert!(!token_ok("k", "p", "garbage", 16));
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn signed_urls_and_cookies_stop_working_when_they_expire() {
        let sec = Security {
            api_key: Some("s3cret-key".into()),
            ..Default::default()
        };
        let key = "s3cret-key";
        let file = "0123456789abcdef-1.png";
        let now = now_s();
        let fresh = sec.image_sig_until(file, now + 60).unwrap();
        let stale = sec.image_sig_until(file, now - 1).unwrap();
        let path = format!("/images/{file}");
        assert!(sec.authorized(key, &request(&format!("{path}?sig={fresh}"), &[])));
        assert!(!sec.authorized(key, &request(&format!("{path}?sig={stale}"), &[])));
        // The URLs handed out are valid for the documented hour, no longer.
        let handed = sec.image_path(file);
        let exp: u64 = handed
            .split("sig=")
            .nth(1)
            .unwrap()
            .split('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (now + SIGNED_URL_TTL.as_secs()..=now + SIGNED_URL_TTL.as_secs() + 2).contains(&exp)
        );

        let cookie = |exp: u64| format!("{COOKIE}={}", Security::cookie_token(key, exp));
        assert!(sec.authorized(key, &request("/api/jobs", &[("cookie", &cookie(now + 60))])));
        assert!(!sec.authorized(key, &request("/api/jobs", &[("cookie", &cookie(now - 1))])));
    }

    #[test]
    fn expired_credentials_are_not_counted_as_guesses() {
        let sec = Security {
            api_key: Some("s3cret-key".into()),
            ..Default::default()
        };
        let key = "s3cret-key";
        let now = now_s();
        let file = "0123456789abcdef-1.png";
        let old_url = format!(
            "/images/{file}?sig={}",
            sec.image_sig_until(file, now - 10).unwrap()
        );
        let old_cookie = format!("{COOKIE}={}", Security::cookie_token(key, now - 10));
        assert_eq!(
            sec.credential(key, &request(&old_url, &[])),
            Credential::Expired
        );
        assert_eq!(
            sec.credential(key, &request("/api/jobs", &[("cookie", &old_cookie)])),
            Credential::Expired
        );
        // An expired token does not shelter a wrong key sent with it.
        assert_eq!(
            sec.credential(
                key,
                &request(
                    "/api/jobs",
                    &[("cookie", &old_cookie), ("authorization", "Bearer guess")]
                )
            ),
            Credential::Wrong
        );
        let forged = format!("/images/{file}?sig={}.{}", now + 60, "0".repeat(32));
        assert_eq!(
            sec.credential(key, &request(&forged, &[])),
            Credential::Wrong
        );
        assert_eq!(
            sec.credential(key, &request("/api/jobs", &[])),
            Credential::Absent
        );
    }

    #[test]
    fn wrong_keys_are_limited_per_address() {
        let limiter = KeyAttempts::default();
        let a: IpAddr = "10.0.0.7".parse().unwrap();
        let b: IpAddr = "10.0.0.8".parse().unwrap();
        for _ in 0..KEY_FAILURE_BURST {
            assert_eq!(limiter.locked_for(a), None);
            limiter.failed(a);
        }
        let wait = limiter.locked_for(a).expect("locked after the burst");
        assert!((1..=KEY_FAILURE_REFILL.as_secs()).contains(&wait), "{wait}");
        assert_eq!(
            limiter.locked_for(b),
            None,
            "another address is not affected"
        );
        // IPv6: one /64 is one client; IPv4-mapped addresses are their IPv4 address.
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..KEY_FAILURE_BURST {
            limiter.failed(v6a);
        }
        assert!(limiter.locked_for(v6b).is_some());
        assert!(limiter
            .locked_for("2001:db8:1:3::1".parse().unwrap())
            .is_none());
        assert!(limiter
            .locked_for("::ffff:10.0.0.7".parse().unwrap())
            .is_some());
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
