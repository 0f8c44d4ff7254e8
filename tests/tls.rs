//! TLS over loopback with certificates made here (rcgen): the tunnel link
//! with TLS and mTLS, each way a handshake can fail (refused, logged on both
//! sides, nothing registered, retried without flooding the log), certificates
//! re-read on reload, and the HTTPS ingress choosing certificates by SNI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::logs::{clear_logs, log_text, logs};
use common::pki::{Ca, TempDir};
use common::ws::{ws_config, WsUpstream};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use rcgen::ExtendedKeyUsagePurpose;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tunnel_daemon::server::reload::{self, Reload};
use tunnel_lib::config::ServerConfig;
use tunnel_lib::tls::rustls;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------ the tunnel

fn server_toml(tls: &str) -> String {
    format!(
        r#"
[server]
shutdown_grace = "2s"
{tls}
[[groups]]
name = "demo"
token = "t-demo"
heartbeat_interval = "1s"
data_streams = 1
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "5s"
"#
    )
}

fn link_tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> String {
    let mut s = format!("[server.tls]\ncert = {:?}\nkey = {:?}\n", cert, key);
    if let Some(ca) = client_ca {
        s.push_str(&format!("client_ca = {ca:?}\n"));
    }
    s
}

/// A client.toml dialing `scheme`://127.0.0.1:port with `[tls]` lines.
fn client(server: &TestServer, scheme: &str, tls: &str, up: &Upstream) -> String {
    let base = client_toml(server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]);
    let base = base.replace("server = \"http://", &format!("server = \"{scheme}://"));
    // [tls] must come before [upstreams], as TOML tables do.
    base.replace("[upstreams]", &format!("{tls}\n[upstreams]"))
}

fn client_tls(ca: &Path, name: &str, identity: Option<&(PathBuf, PathBuf)>) -> String {
    let mut s = format!("[tls]\nca = {ca:?}\nserver_name = {name:?}\n");
    if let Some((c, k)) = identity {
        s.push_str(&format!("cert = {c:?}\nkey = {k:?}\n"));
    }
    s
}

#[tokio::test]
async fn the_tunnel_works_over_tls_and_mtls() {
    let _serial = SERIAL.lock().await;
    logs();
    let dir = TempDir::new("ok");
    let ca = Ca::new(&dir.0, "ca");
    let (cert, key) = ca.server("server", &["tunnel.test"]);
    let up = Upstream::start("web").await;
    for mtls in [false, true] {
        let identity = ca.client("edge");
        let server_tls = link_tls(&cert, &key, mtls.then(|| ca.cert_path()).as_deref());
        let server = start_server(&server_toml(&server_tls), None).await;
        let tls = client_tls(&ca.cert_path(), "tunnel.test", mtls.then_some(&identity));
        let _client = TestClient::start(&client(&server, "https", &tls, &up));
        server.wait_streams(2).await;
        let got = get(&server.url("/echo")).await;
        assert_eq!(got.status, StatusCode::OK, "mtls={mtls}");
        assert_eq!(got.headers["x-upstream"], "web");
        server.stop().await;
    }
}

/// Starts a server and a client that cannot agree; checks both log lines,
/// that nothing registered, and that the client retries quietly.
async fn refused(server_tls: &str, scheme: &str, tls: &str, server_says: &str, client_says: &str) {
    clear_logs();
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml(server_tls), None).await;
    let client = TestClient::start(&client(&server, scheme, tls, &up));
    let mut status = client.status.clone();
    // Each side's own line: the server's from its accept loop, the client's from the client.
    let said = |text: &str, side: &str, needle: &str| {
        text.lines().find(|l| l.contains(side) && l.contains(needle)).map(str::to_string)
    };
    let (server_side, client_side) = ("tunnel_daemon::server", "tunnel_daemon::client");
    let deadline = std::time::Instant::now() + WAIT;
    let (server_line, client_line) = loop {
        let text = log_text();
        if let (Some(s), Some(c)) = (said(&text, server_side, server_says), said(&text, client_side, client_says)) {
            break (s, c);
        }
        assert!(std::time::Instant::now() < deadline, "want {server_says:?} and {client_says:?} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Retries go on (reconnect_max = 1s) without a log line each.
    tokio::time::timeout(WAIT, status.wait_for(|s| s.sessions >= 4)).await.expect("retrying").unwrap();
    assert!(server.shared.registry.streams().is_empty(), "nothing registered");
    let text = log_text();
    let sessions = status.borrow().sessions as usize;
    let warnings = |needle: &str| text.lines().filter(|l| l.contains(" WARN ") && l.contains(needle)).count();
    let (client_lines, server_lines) = (warnings("session failed:"), warnings(server_says));
    assert!(client_lines < sessions, "client: {client_lines} warnings for {sessions} attempts:\n{text}");
    assert_eq!(server_lines, 1, "server: one warning for {sessions} attempts from one peer:\n{text}");
    println!("server: {server_line}\nclient: {client_line}\n");
    client.kill();
    server.stop().await;
}

#[tokio::test]
async fn each_tls_mismatch_is_refused_and_named_on_both_sides() {
    let _serial = SERIAL.lock().await;
    logs();
    let dir = TempDir::new("bad");
    let ca = Ca::new(&dir.0, "ca");
    let other = Ca::new(&dir.0, "other");
    let (cert, key) = ca.server("server", &["tunnel.test"]);
    let (old_cert, old_key) = ca.issue("expired", &["tunnel.test"], ExtendedKeyUsagePurpose::ServerAuth, true);
    let tls_on = link_tls(&cert, &key, None);

    // The client does not trust the server's CA.
    let wrong_ca = client_tls(&other.cert_path(), "tunnel.test", None);
    refused(&tls_on, "https", &wrong_ca, "the client refused our certificate", "UnknownIssuer").await;
    // The server's certificate is not for the name the client dials.
    let wrong_name = client_tls(&ca.cert_path(), "elsewhere.test", None);
    refused(&tls_on, "https", &wrong_name, "the client refused our certificate", "not valid for name").await;
    // The server's certificate has expired.
    let expired = link_tls(&old_cert, &old_key, None);
    let trusting = client_tls(&ca.cert_path(), "tunnel.test", None);
    refused(&expired, "https", &trusting, "it has expired", "certificate expired").await;
    // mTLS required, and the client has no certificate.
    let mtls = link_tls(&cert, &key, Some(&ca.cert_path()));
    refused(&mtls, "https", &trusting, "presented no certificate", "CertificateRequired").await;
    // A plaintext client on the TLS port, and a TLS client on the plaintext port.
    refused(&tls_on, "http", "", "a plaintext client on the TLS port", "the server URL must be https://").await;
    refused("", "https", &trusting, "a TLS client on the plaintext port", "is TLS on there").await;
}

#[tokio::test]
async fn certificates_are_reread_on_reload_without_dropping_clients() {
    let _serial = SERIAL.lock().await;
    logs();
    let dir = TempDir::new("reload");
    let (ca, next_ca) = (Ca::new(&dir.0, "ca"), Ca::new(&dir.0, "next"));
    let (cert, key) = ca.server("server", &["tunnel.test"]);
    let up = Upstream::start("web").await;
    let cfg = ConfigFile::new(&server_toml(&link_tls(&cert, &key, None)));
    let server = start_server(&std::fs::read_to_string(&cfg.path).unwrap(), Some(cfg.path.clone())).await;
    let first = TestClient::start(&client(&server, "https", &client_tls(&ca.cert_path(), "tunnel.test", None), &up));
    server.wait_streams(2).await;
    let sessions = first.status.borrow().sessions;
    // Renewal: new files in place (from another CA), then SIGHUP's reload.
    let (new_cert, new_key) = next_ca.server("renewed", &["tunnel.test"]);
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    assert!(matches!(reload::reload_from_file(&server.shared), Reload::Unchanged | Reload::Applied(_)));
    // A client trusting only the new CA now gets in; the first stays connected.
    let second = client(&server, "https", &client_tls(&next_ca.cert_path(), "tunnel.test", None), &up);
    let second = TestClient::start(&second.replace("client_id = \"edge-1\"", "client_id = \"edge-2\""));
    server.wait_streams(4).await;
    assert_eq!(get(&server.url("/echo")).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.status.borrow().sessions, sessions, "the connected client was not dropped");
    // A broken file on reload is refused and the certificate in force stays.
    std::fs::write(&key, "garbage").unwrap();
    assert!(matches!(reload::reload_from_file(&server.shared), Reload::Refused(e) if e.contains("key")));
    let third = client(&server, "https", &client_tls(&next_ca.cert_path(), "tunnel.test", None), &up);
    let third = TestClient::start(&third.replace("client_id = \"edge-1\"", "client_id = \"edge-3\""));
    server.wait_streams(6).await;
    drop((first, second, third));
    server.stop().await;
}

#[test]
fn server_check_names_bad_tls_files() {
    let dir = TempDir::new("check");
    let ca = Ca::new(&dir.0, "ca");
    let (cert, _) = ca.server("server", &["tunnel.test"]);
    let (_, other_key) = ca.server("other", &["tunnel.test"]);
    let text = server_toml(&link_tls(&cert, &other_key, None));
    let err = ServerConfig::from_str_named(&text, "server.toml").expect_err("mismatched key").to_string();
    assert!(err.starts_with("server.toml:6: server.tls.key: "), "{err}");
    assert!(err.contains("does not belong to the certificate"), "{err}");
    let text = server_toml(&link_tls(&dir.0.join("missing.crt"), &other_key, None));
    let err = ServerConfig::from_str_named(&text, "server.toml").expect_err("missing file").to_string();
    assert!(err.starts_with("server.toml:5: server.tls.cert: "), "{err}");
}

// ------------------------------------------------------------------ HTTPS ingress

fn curl_available() -> bool {
    let found = std::process::Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "curl is required under CI (bench/setup.sh installs it)");
        eprintln!("curl not installed: HTTPS ingress test skipped");
    }
    found
}

/// curl over HTTPS with `--resolve`: (status, http version, body, headers).
async fn curl(port: u16, host: &str, ca: &Path, http: &str) -> (String, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", http, "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(["-D", "-", "-w", "\nversion=%{http_version}"])
        .arg(format!("https://{host}:{port}/echo"));
    // curl is bounded by --max-time; off the runtime, so the server keeps running.
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn https_ingress_picks_the_certificate_by_server_name() {
    let _serial = SERIAL.lock().await;
    if !curl_available() {
        return;
    }
    let dir = TempDir::new("https");
    let (a, b) = (Ca::new(&dir.0, "a"), Ca::new(&dir.0, "b"));
    let (a_cert, a_key) = a.server("wild", &["*.a.test", "a.test"]);
    let (b_cert, b_key) = b.server("b", &["b.test"]);
    let https = format!(
        "https_listen = \"127.0.0.1:0\"\n[[certificates]]\nhosts = [\"*.a.test\", \"a.test\"]\ncert = {a_cert:?}\nkey = {a_key:?}\n[[certificates]]\nhosts = [\"b.test\"]\ncert = {b_cert:?}\nkey = {b_key:?}\n"
    );
    // [[certificates]] is a top-level table array: after [server]'s keys, before [[groups]].
    let toml = server_toml("").replace("shutdown_grace = \"2s\"\n", &format!("shutdown_grace = \"2s\"\n{https}"));
    let up = Upstream::start("web").await;
    let server = start_server(&toml, None).await;
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(2).await;
    let port = server.https.port();
    // Each name verifies only against its own certificate's CA: the right one was served.
    for (host, ca) in [("app.a.test", a.cert_path()), ("a.test", a.cert_path()), ("b.test", b.cert_path())] {
        for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let (out, err) = curl(port, host, &ca, flag).await;
            assert!(out.contains(&format!("version={version}")), "{host} {flag}: {out} {err}");
            let lower = out.to_ascii_lowercase();
            assert!(lower.contains("x-seen-x-forwarded-proto: https"), "{host} {flag}: {out}");
            assert!(lower.contains(&format!("x-seen-host: {host}:{port}")), "{host} {flag}: {out}");
        }
    }
    let (out, err) = curl(port, "b.test", &a.cert_path(), "--http2").await;
    assert!(!out.contains("version=2"), "b.test must not verify with a's CA: {out}");
    assert!(err.contains("certificate"), "{err}");
    // A name no entry lists gets the first certificate (the default).
    let (out, err) = curl(port, "other.test", &a.cert_path(), "--http2").await;
    assert!(!out.contains("version=2"), "the default certificate is not valid for other.test");
    assert!(err.contains("certificate") || err.contains("subject name"), "refused for its name: {err}");
    server.stop().await;
}

/// The TLS examples in config/ are valid once their certificate files exist.
#[test]
fn tls_example_configs_check_with_real_files() {
    let dir = TempDir::new("examples");
    let ca = Ca::new(&dir.0, "ca");
    ca.server("server", &["tunnel.example"]);
    ca.server("example", &["*.tunnel.example", "tunnel.example"]);
    ca.issue("edge-1", &["edge-1"], ExtendedKeyUsagePurpose::ClientAuth, false);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let local = |file: &str| {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        text.replace("/etc/tunnel/", &format!("{}/", dir.0.display()))
    };
    let server = ServerConfig::from_str_named(&local("server-tls.toml"), "server-tls.toml").unwrap();
    let link = server.server.tls.as_ref().expect("TLS on the link");
    assert!(link.client_ca.is_some(), "the example shows mTLS");
    assert!(server.ingress_tls().unwrap().is_some(), "and HTTPS ingress");
    let client =
        tunnel_lib::config::ClientConfig::from_str_named(&local("client-tls.toml"), "client-tls.toml").unwrap();
    assert!(client.tls.as_ref().is_some_and(|t| t.cert.is_some()));
}

/// Over HTTPS as over HTTP: a WebSocket upgrades (HTTP/1.1 by ALPN), routed
/// by a host rule that ignores the port.
#[tokio::test]
async fn websocket_over_https_routed_by_host() {
    let _serial = SERIAL.lock().await;
    let dir = TempDir::new("wss");
    let ca = Ca::new(&dir.0, "ca");
    let (cert, key) = ca.server("site", &["*.a.test"]);
    let (ws, web) = (WsUpstream::start().await, Upstream::start("web").await);
    let toml = format!(
        r#"
[server]
shutdown_grace = "2s"
https_listen = "127.0.0.1:0"
[[certificates]]
hosts = ["*.a.test"]
cert = {cert:?}
key = {key:?}
[[groups]]
name = "demo"
token = "t-demo"
heartbeat_interval = "1s"
data_streams = 1
[[rules]]
host = "chat.a.test"
group = "demo"
upstream = "ws"
[[rules]]
group = "demo"
upstream = "web"
"#
    );
    let server = start_server(&toml, None).await;
    let upstreams = [("ws", ws.url()), ("web", web.url())];
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &upstreams));
    server.wait_streams(2).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in tunnel_lib::tls::read_certs(&ca.cert_path()).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(tunnel_lib::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("chat.a.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    // Only the ws upstream answers 101: the handshake succeeding shows the host rule matched.
    let url = format!("wss://chat.a.test:{}/live", server.https.port());
    let (mut socket, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async_with_config(url, tls, Some(ws_config())))
            .await
            .expect("handshake in time")
            .unwrap();
    socket.send(Message::text("over tls")).await.unwrap();
    let echo = tokio::time::timeout(WAIT, socket.next()).await.expect("echo in time").unwrap().unwrap();
    assert_eq!(echo, Message::text("over tls"));
    let rec = server.shared.registry.streams().iter().map(|s| s.upgraded).sum::<usize>();
    assert_eq!(rec, 1, "counted as an upgraded connection");
    drop(socket);
    server.stop().await;
}
