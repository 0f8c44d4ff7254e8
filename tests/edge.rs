//! The public edge's access policy over real sockets: `allow`/`deny` on the
//! client address (IPv4 and IPv6, through a trusted proxy, spoofed from an
//! untrusted peer), `rate_limit` exact within one token with a correct
//! `Retry-After`, a group's `max_requests_per_second`, and `basic_auth`
//! with bcrypt and argon2 users. Every refusal has its exact status, its
//! record and metric, and reaches no upstream; a reload that changes a
//! policy applies to the next request on a connection that stays open.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A running tunnel: server (with its config file), one client, the upstream.
struct Edge {
    server: TestServer,
    _client: TestClient,
    up: Upstream,
    file: ConfigFile,
}

async fn edge(server_extra: &str, after_group: &str, rules: &str) -> Edge {
    let toml = demo_server_toml(server_extra, after_group, rules);
    let file = ConfigFile::new(&toml);
    let up = Upstream::start("web").await;
    let server = start_server(&toml, Some(file.path.clone())).await;
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    Edge { server, _client: client, up, file }
}

impl Edge {
    fn upstream_requests(&self) -> usize {
        self.up.seen.requests.load(Ordering::SeqCst)
    }

    /// The last recorded request to `path`.
    fn record(&self, path: &str) -> tunnel_lib::introspection::RequestInfo {
        let all = self.server.shared.requests.since(0);
        all.iter().rev().find(|r| r.path == path).cloned().expect("a record of the request")
    }
}

/// GET `path` with `headers`, on a pooled connection.
async fn get_with(edge: &Edge, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = Request::get(edge.server.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&http_client(), req.body(empty()).unwrap()).await
}

#[tokio::test]
async fn addresses_are_allowed_and_denied_through_trusted_proxies_only() {
    const RULES: &str = r#"
[[rules]]
path_prefix = "/denied"
group = "demo"
upstream = "web"
deny = ["127.0.0.0/8"]
[[rules]]
path_prefix = "/v4"
group = "demo"
upstream = "web"
allow = ["10.0.0.0/8"]
deny = ["10.9.0.0/16"]
[[rules]]
path_prefix = "/v6"
group = "demo"
upstream = "web"
allow = ["2001:db8::/32"]
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
"#;
    let e = edge("trusted_proxies = [\"127.0.0.1\"]\nmetrics_listen = \"127.0.0.1:0\"", "", RULES).await;

    // Denied outright: 403, a short reason, nothing upstream.
    let got = get_with(&e, "/denied", &[]).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert!(got.text().contains("127.0.0.1 may not use this route"), "{}", got.text());
    assert_eq!(e.upstream_requests(), 0);
    let rec = e.record("/denied");
    assert_eq!((rec.status, rec.refused.as_str(), rec.remote_addr.as_str()), (403, "address", "127.0.0.1"));

    // Through the trusted proxy (127.0.0.1): the hop it appended counts.
    assert_eq!(get_with(&e, "/v4", &[("x-forwarded-for", "10.1.2.3")]).await.status, StatusCode::OK);
    assert_eq!(e.record("/v4").remote_addr, "10.1.2.3");
    assert_eq!(get_with(&e, "/v4", &[("x-forwarded-for", "10.9.0.1")]).await.status, StatusCode::FORBIDDEN);
    // A client that writes an allowed address left of its own gains nothing.
    let spoofed = get_with(&e, "/v4", &[("x-forwarded-for", "10.1.2.3, 203.0.113.7")]).await;
    assert_eq!(spoofed.status, StatusCode::FORBIDDEN);
    assert_eq!(e.record("/v4").remote_addr, "203.0.113.7");
    // IPv6, the chain split over two lines.
    let ok6 = get_with(&e, "/v6", &[("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "2001:db8::5")]).await;
    assert_eq!(ok6.status, StatusCode::OK);
    // The upstream is told the whole chain, ours appended.
    assert_eq!(ok6.headers["x-seen-x-forwarded-for"], "198.51.100.1, 2001:db8::5, 127.0.0.1");
    assert_eq!(get_with(&e, "/v6", &[("x-forwarded-for", "2001:db9::5")]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(e.upstream_requests(), 2, "only the allowed requests reached the upstream");

    // The refusals are counted by rule and reason.
    let metrics = get(&format!("http://{}/metrics", e.server.metrics)).await.text();
    let line = |rule: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("tunnel_refused_requests_total") && l.contains(&format!("rule=\"{rule}\"")))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
    };
    assert_eq!(line("*/denied").as_deref(), Some("1"), "{metrics}");
    assert_eq!(line("*/v4").as_deref(), Some("2"));
    assert_eq!(line("*/v6").as_deref(), Some("1"));
    assert!(metrics.contains("reason=\"address\""));

    // Without trusted proxies the header is never believed: spoofing from
    // an untrusted peer (here, anyone) gets the peer's own address judged.
    e.file.write(&demo_server_toml("", "", RULES));
    reload(&e).await;
    assert_eq!(get_with(&e, "/v4", &[("x-forwarded-for", "10.1.2.3")]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(e.record("/v4").remote_addr, "127.0.0.1");
    assert_eq!(get_with(&e, "/v6", &[("x-forwarded-for", "2001:db8::5")]).await.status, StatusCode::FORBIDDEN);
}

async fn reload(e: &Edge) {
    let r = tunnel_daemon::server::reload::reload_from_file(&e.server.shared);
    assert!(matches!(r, tunnel_daemon::server::reload::Reload::Applied(_)), "{r:?}");
}

#[tokio::test]
async fn rate_limits_are_exact_within_a_token_and_say_when_to_retry() {
    const RULES: &str = r#"
[[rules]]
path_prefix = "/limited"
group = "demo"
upstream = "web"
rate_limit = { requests = 10, per = "1s", burst = 5 }
[[rules]]
path_prefix = "/keyed"
group = "demo"
upstream = "web"
rate_limit = { requests = 1, per = "1m", burst = 2, by = "X-Api-Key" }
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
"#;
    let e = edge("", "", RULES).await;
    let client = http_client();
    // As fast as one connection goes, for 2 s: the burst, then one request
    // every 100 ms. Bounded by count as well as time.
    // The first request takes the first token: the clock starts at its answer.
    let first = send(&client, Request::get(e.server.url("/limited")).body(empty()).unwrap()).await;
    assert_eq!(first.status, StatusCode::OK);
    let (mut passed, mut refused) = (1u32, 0u32);
    let started = Instant::now();
    let mut retry_after = None;
    for _ in 0..200_000 {
        if started.elapsed() >= Duration::from_secs(2) {
            break;
        }
        let got = send(&client, Request::get(e.server.url("/limited")).body(empty()).unwrap()).await;
        match got.status {
            StatusCode::OK => passed += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                retry_after = got.headers.get("retry-after").cloned();
            }
            other => panic!("unexpected {other}"),
        }
    }
    let elapsed = started.elapsed();
    let expected = 5 + (elapsed.as_millis() / 100) as u32;
    println!("rate limit 10/s burst 5 over {elapsed:?}: {passed} passed (expected {expected}), {refused} refused");
    assert!(passed.abs_diff(expected) <= 1, "{passed} passed, expected {expected} within one");
    assert!(refused > 0, "the limit refused some");
    // A token comes back every 100 ms: retry in (rounded up) a second.
    assert_eq!(retry_after.expect("Retry-After on 429"), "1");
    assert_eq!(e.upstream_requests(), passed as usize, "refused requests reached no upstream");
    let all = e.server.shared.requests.since(0);
    assert!(all.iter().any(|r| r.path == "/limited" && r.status == 429 && r.refused == "rate_limit"));

    // By API key: each key its own bucket, requests without one by address.
    for _ in 0..2 {
        assert_eq!(get_with(&e, "/keyed", &[("x-api-key", "alpha")]).await.status, StatusCode::OK);
    }
    let third = get_with(&e, "/keyed", &[("x-api-key", "alpha")]).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = third.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&wait), "one token a minute: Retry-After {wait}");
    assert_eq!(get_with(&e, "/keyed", &[("x-api-key", "beta")]).await.status, StatusCode::OK);
    assert_eq!(get_with(&e, "/keyed", &[]).await.status, StatusCode::OK);
    // Unlimited rules are untouched.
    assert_eq!(get_with(&e, "/free", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_group_takes_at_most_its_requests_per_second() {
    let rules = "[[rules]]\npath_prefix = \"/\"\ngroup = \"demo\"\nupstream = \"web\"\n";
    let e = edge("", "max_requests_per_second = 5", rules).await;
    let client = http_client();
    let mut statuses = Vec::new();
    let started = Instant::now();
    for _ in 0..12 {
        let got = send(&client, Request::get(e.server.url("/g")).body(empty()).unwrap()).await;
        if got.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(got.headers["retry-after"], "1");
            assert!(got.text().contains("at most 5 requests a second"), "{}", got.text());
        }
        statuses.push(got.status.as_u16());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    // The second's worth at once, and one more for each 200 ms the run took.
    let expected = 5 + (started.elapsed().as_millis() / 200) as usize;
    assert!(ok.abs_diff(expected) <= 1, "{ok} passed, {expected} expected: {statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 12 - ok);
    assert_eq!(e.record("/g").refused, "group_rate");
}

/// An htpasswd file with alice (bcrypt) and bob (argon2id), in `dir`.
fn htpasswd(dir: &Path) -> PathBuf {
    use argon2::PasswordHasher as _;
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let bob = argon.hash_password_with_salt(b"builder", b"0123456789abcdef").unwrap().to_string();
    let alice = bcrypt::hash("wonderland", 4).unwrap();
    let path = dir.join("users.htpasswd");
    std::fs::write(&path, format!("alice:{alice}\nbob:{bob}\n")).unwrap();
    path
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

#[tokio::test]
async fn basic_auth_admits_bcrypt_and_argon2_users_and_nobody_else() {
    let dir = std::env::temp_dir().join(format!("tunnel-edge-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let users = htpasswd(&dir);
    let rules = format!(
        r#"
[[rules]]
path_prefix = "/private"
group = "demo"
upstream = "web"
basic_auth = "{users}"
[[rules]]
path_prefix = "/passed"
group = "demo"
upstream = "web"
basic_auth = "{users}"
pass_auth = true
"#,
        users = users.display()
    );
    let e = edge("", "", &rules).await;

    let none = get_with(&e, "/private", &[]).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.headers["www-authenticate"], "Basic realm=\"*/private\", charset=\"UTF-8\"");
    for (user, password) in [("alice", "Wonderland"), ("bob", "wonderland"), ("carol", "builder")] {
        let got = get_with(&e, "/private", &[("authorization", &basic(user, password))]).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{user}:{password}");
    }
    assert_eq!(get_with(&e, "/private", &[("authorization", "Bearer x")]).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(e.upstream_requests(), 0, "no refused request reached the upstream");
    assert_eq!(e.record("/private").refused, "basic_auth");

    for (user, password) in [("alice", "wonderland"), ("bob", "builder")] {
        // Twice: the second is answered from the verified credentials.
        for _ in 0..2 {
            let got = get_with(&e, "/private", &[("authorization", &basic(user, password))]).await;
            assert_eq!(got.status, StatusCode::OK, "{user}");
            assert!(got.headers.get("x-seen-authorization").is_none(), "credentials stripped before the upstream");
        }
    }
    let passed = get_with(&e, "/passed", &[("authorization", &basic("alice", "wonderland"))]).await;
    assert_eq!(passed.status, StatusCode::OK);
    assert_eq!(passed.headers["x-seen-authorization"], basic("alice", "wonderland").as_str(), "pass_auth");
    assert_eq!(e.upstream_requests(), 5);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_reload_changes_the_policy_for_the_next_request_on_an_open_connection() {
    let open = "[[rules]]\npath_prefix = \"/\"\ngroup = \"demo\"\nupstream = \"web\"\n";
    let closed = format!("{open}deny = [\"127.0.0.1\"]\n");
    let e = edge("", "", open).await;
    // One HTTP/1.1 connection, kept through both reloads.
    let tcp = tokio::net::TcpStream::connect(e.server.http).await.unwrap();
    let (mut conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    let driver = tokio::spawn(driver);
    let status = async |conn: &mut hyper::client::conn::http1::SendRequest<ReqBody>| {
        let req = Request::get("/on-one-connection").header("host", "x").body(empty()).unwrap();
        tokio::time::timeout(WAIT, conn.send_request(req)).await.expect("in time").expect("response").status()
    };
    assert_eq!(status(&mut conn).await, StatusCode::OK);
    e.file.write(&demo_server_toml("", "", &closed));
    reload(&e).await;
    assert_eq!(status(&mut conn).await, StatusCode::FORBIDDEN);
    e.file.write(&demo_server_toml("", "", open));
    reload(&e).await;
    assert_eq!(status(&mut conn).await, StatusCode::OK);
    assert!(!driver.is_finished(), "the connection stayed open");
}

/// A signing key and how its JWK and tokens name it.
struct Signer {
    kid: &'static str,
    alg: jsonwebtoken::Algorithm,
    key: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A fresh ES256 (P-256) or EdDSA (Ed25519) key pair, made by rcgen (ring).
fn signer(kid: &'static str, alg: jsonwebtoken::Algorithm) -> Signer {
    use jsonwebtoken::Algorithm;
    let (pair, jwk) = match alg {
        Algorithm::ES256 => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            // The uncompressed point: 0x04, then x and y.
            let raw = pair.public_key_raw().to_vec();
            let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65])});
            (pair, jwk)
        }
        _ => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let jwk =
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64url(pair.public_key_raw())});
            (pair, jwk)
        }
    };
    let der = pair.serialize_der();
    let key = match alg {
        Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_der(&der),
        _ => jsonwebtoken::EncodingKey::from_ed_der(&der),
    };
    Signer { kid, alg, key, jwk }
}

impl Signer {
    fn token(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.to_string());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn jwt_admits_tokens_its_keys_signed_and_refuses_the_rest() {
    use jsonwebtoken::Algorithm;
    let dir = std::env::temp_dir().join(format!("tunnel-edge-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ec, ed) = (signer("ec-1", Algorithm::ES256), signer("ed-1", Algorithm::EdDSA));
    // Not in the set, yet naming a kid that is.
    let stranger = signer("ec-1", Algorithm::ES256);
    let jwks = dir.join("keys.json");
    std::fs::write(&jwks, serde_json::json!({"keys": [ec.jwk, ed.jwk]}).to_string()).unwrap();
    let rules = format!(
        r#"
[[rules]]
path_prefix = "/api"
group = "demo"
upstream = "web"
jwt = {{ jwks = "{jwks}", issuer = "https://issuer.test", audience = "tunnel" }}
jwt_claims_to_headers = {{ sub = "X-User", roles = "X-Roles" }}
[[rules]]
path_prefix = "/open"
group = "demo"
upstream = "web"
"#,
        jwks = jwks.display()
    );
    let e = edge("", "", &rules).await;
    let now = now_secs();
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::json!({"sub": "alice", "roles": ["ops", "dev"], "iss": "https://issuer.test",
            "aud": "tunnel", "exp": now + 300, "nbf": now - 10});
        f(&mut c);
        c
    };
    let bearer = |t: String| format!("Bearer {t}");

    // Good tokens, either key: admitted; the claims reach the upstream in
    // their headers (a client's own X-User dropped), the token does not.
    for s in [&ec, &ed] {
        let auth = bearer(s.token(&claims(&|_| {})));
        let got = get_with(&e, "/api/me", &[("authorization", &auth), ("x-user", "mallory")]).await;
        assert_eq!(got.status, StatusCode::OK, "{}: {}", s.kid, got.text());
        let users: Vec<_> = got.headers.get_all("x-seen-x-user").iter().collect();
        assert_eq!(users, ["alice"]);
        assert_eq!(got.headers["x-seen-x-roles"], r#"["ops","dev"]"#);
        assert!(got.headers.get("x-seen-authorization").is_none());
    }
    assert_eq!(e.upstream_requests(), 2);
    // `Connection` naming the claim's header does not take it off.
    let auth = bearer(ec.token(&claims(&|_| {})));
    let got = get_with(&e, "/api/me", &[("authorization", &auth), ("connection", "x-user")]).await;
    assert_eq!(got.headers["x-seen-x-user"], "alice");
    // Nor can a client set it on a rule without jwt: only the tunnel does.
    let got = get_with(&e, "/open", &[("x-user", "mallory"), ("x-roles", "admin")]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.headers.get("x-seen-x-user").is_none() && got.headers.get("x-seen-x-roles").is_none());
    assert_eq!(e.upstream_requests(), 4);

    let refused = [
        ("no token", String::new(), "Bearer realm=\"*/api\""),
        ("expired", bearer(ec.token(&claims(&|c| c["exp"] = (now - 120).into()))), "token expired"),
        ("not yet valid", bearer(ec.token(&claims(&|c| c["nbf"] = (now + 600).into()))), "not yet valid"),
        ("wrong issuer", bearer(ed.token(&claims(&|c| c["iss"] = "https://evil.test".into()))), "wrong issuer"),
        ("wrong audience", bearer(ed.token(&claims(&|c| c["aud"] = "other".into()))), "wrong audience"),
        ("no iss", bearer(ec.token(&claims(&|c| _ = c.as_object_mut().unwrap().remove("iss")))), "no iss claim"),
        ("no aud", bearer(ed.token(&claims(&|c| _ = c.as_object_mut().unwrap().remove("aud")))), "no aud claim"),
        (
            "no exp",
            bearer(ec.token(&claims(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }))),
            "no exp claim",
        ),
        ("wrong key", bearer(stranger.token(&claims(&|_| {}))), "bad signature"),
        (
            "alg none",
            bearer(format!(
                "{}.{}.",
                b64url(br#"{"alg":"none","typ":"JWT"}"#),
                b64url(claims(&|_| {}).to_string().as_bytes())
            )),
            "malformed token",
        ),
        ("basic", "Basic YWxpY2U6eA==".to_string(), "Bearer realm"),
    ];
    for (case, auth, want) in refused {
        let headers: Vec<(&str, &str)> = if auth.is_empty() { vec![] } else { vec![("authorization", auth.as_str())] };
        let got = get_with(&e, "/api/me", &headers).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{case}");
        let challenge = got.headers["www-authenticate"].to_str().unwrap().to_string();
        assert!(challenge.contains(want) || got.text().contains(want), "{case}: {challenge} / {}", got.text());
        assert_eq!(e.record("/api/me").refused, "jwt", "{case}");
    }
    assert_eq!(e.upstream_requests(), 4, "no refused token reached the upstream");
    let _ = std::fs::remove_dir_all(dir);
}

/// A request that waits for `100 Continue` is not told to send its body
/// before the tunnel knows a client can take it: with none, it gets 503
/// and never a 100.
#[tokio::test]
async fn expect_continue_is_not_answered_before_a_client_is_found() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rules = "[[rules]]\npath_prefix = \"/\"\ngroup = \"nobody\"\nupstream = \"web\"\n";
    let groups = "[[groups]]\nname = \"nobody\"\ntoken = \"t-nobody\"\n";
    let server = start_server(&demo_server_toml("", groups, rules), None).await;
    let mut tcp = tokio::net::TcpStream::connect(server.http).await.unwrap();
    let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.expect("an answer").unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
}
