//! Origins as companies run them: behind nginx with a certificate from the
//! company's own authority (made here with Debian's openssl), trusted from
//! `ca_file`, `SSL_CERT_FILE` or the system's store (installed with
//! `update-ca-certificates` in a mount namespace of the test's own, so the
//! machine's store is untouched); a server certificate renewed while a
//! node downloads; and an origin reachable only through a proxy (Debian's
//! tinyproxy).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::swarm::{free_port, LoopSite};

const NGINX: &str = "/usr/sbin/nginx";

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority in `dir`: `ca.pem`, `ca.key`.
fn authority(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/O=lanup test company/CN=lanup test company's authority",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
    dir.join("ca.pem")
}

/// A server certificate for 127.0.0.1 from the authority in `dir`, as
/// `NAME.pem` and `NAME.key`.
fn issue(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (csr, pem, key) = (
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.key"),
    );
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=origin.lanup.test",
        ],
        dir,
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "7",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    );
    (dir.join(pem), dir.join(key))
}

/// The SHA-256 fingerprint of the certificate a TLS server on `port`
/// presents now.
fn presented(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn fingerprint(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// nginx serving `www` over TLS on `port` with `cert.pem`/`cert.key` in
/// `dir`; `extra` goes into its server block. Stopped with its workers
/// when dropped.
struct TlsOrigin {
    master: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl TlsOrigin {
    fn start(dir: &Path, www: &Path, extra: &str) -> TlsOrigin {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing (apt-get install nginx-light)"
        );
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nuser root;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{ access_log {dir}/access.log; client_body_temp_path {dir}/tmp;\n\
                 server {{ listen 127.0.0.1:{port} ssl; root {www};\n\
                 ssl_certificate {dir}/cert.pem; ssl_certificate_key {dir}/cert.key;\n{extra}\n}} }}\n",
                dir = dir.display(),
                www = www.display()
            ),
        )
        .expect("nginx.conf");
        let master = Command::new(NGINX)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let origin = TlsOrigin {
            master,
            dir: dir.to_owned(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not come up: {}",
                origin.errors()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        origin
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.port)
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn access(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Takes its certificate files again (`nginx -s reload`): new
    /// connections get the new certificate, open ones finish as they were.
    fn reload(&self) {
        let pid = rustix::process::Pid::from_raw(self.master.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.master.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.master.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

/// A company's origin: an authority, a certificate from it, nginx with
/// it, and a publisher key.
struct Company {
    root: PathBuf,
    ca: PathBuf,
    www: PathBuf,
    key: (PathBuf, String),
    origin: TlsOrigin,
}

impl Company {
    fn new(root: &Path, extra: &str) -> Company {
        let pki = root.join("pki");
        let ca = authority(&pki);
        let (pem, key) = issue(&pki, "first");
        let server = root.join("nginx");
        std::fs::create_dir_all(server.join("tmp")).expect("mkdir");
        std::fs::copy(pem, server.join("cert.pem")).expect("cert");
        std::fs::copy(key, server.join("cert.key")).expect("key");
        let www = root.join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        Company {
            root: root.to_owned(),
            ca,
            key: keygen(root, "publisher.key"),
            origin: TlsOrigin::start(&server, &www, extra),
            www,
        }
    }

    fn publish(&self, version: &str, size: usize) -> Published {
        let app = self.root.join(format!("app-{version}"));
        write(
            &app,
            "bin/app",
            &pseudo_random(size, size as u64 + version.len() as u64),
        );
        publish(&app, version, &self.origin.url(), &self.key, &self.www)
    }

    /// `lanup setup` against the origin, with `extra` flags and `env`.
    fn setup(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let config = self.root.join(format!("lanup-{}.toml", free_port()));
        let mut cmd = lanup();
        cmd.args([
            "setup",
            "--origin",
            &self.origin.url(),
            "--trust-publisher",
            &self.key.1,
        ])
        .args(["--site", "tls", "--config", s(&config)])
        .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("lanup setup runs")
    }
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_origin_signed_by_a_private_authority_is_refused_by_name_and_trusted_from_ca_file_ssl_cert_file_or_the_system_store(
) {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Headquarters behind the same nginx: its reports and fleet view are
    // passed to `lanup origin --reports` on loopback.
    let hq_www = tmp.path().join("hq-www");
    std::fs::create_dir_all(&hq_www).expect("mkdir");
    let hq = OriginProc::start_with(&hq_www, &["--reports", s(&tmp.path().join("reports"))]);
    let company = Company::new(
        tmp.path(),
        &format!("location /_lanup/ {{ proxy_pass {}_lanup/; }}", hq.url),
    );
    let v1 = company.publish("1.0", 300_000);

    // Not trusted: setup says exactly why, and what to do.
    let out = company.setup(&[], &[]);
    assert!(!out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("signed by an authority this machine does not trust")
            && said(&out).contains("ca_file"),
        "{}",
        said(&out)
    );

    // ca_file: taken, and written into the configuration.
    let out = company.setup(&["--ca-file", s(&company.ca)], &[]);
    assert!(out.status.success(), "{}", said(&out));
    // SSL_CERT_FILE names the system's store.
    let out = company.setup(&[], &[("SSL_CERT_FILE", s(&company.ca))]);
    assert!(out.status.success(), "SSL_CERT_FILE: {}", said(&out));
    // The system's store, with the authority installed the Debian way, in
    // a mount namespace where /etc/ssl/certs and the local authorities are
    // the test's own.
    let store = tmp.path().join("store");
    let local = tmp.path().join("local");
    std::fs::create_dir_all(&store).expect("mkdir");
    std::fs::create_dir_all(&local).expect("mkdir");
    std::fs::copy(&company.ca, local.join("lanup-test-company.crt")).expect("copy");
    let config = tmp.path().join("system-store.toml");
    let script = format!(
        "set -e; mount --bind '{store}' /etc/ssl/certs; mount --bind '{local}' /usr/local/share/ca-certificates; \
         update-ca-certificates --fresh > /dev/null 2>&1; \
         exec '{lanup}' setup --origin '{url}' --trust-publisher '{key}' --site tls --config '{config}'",
        store = store.display(),
        local = local.display(),
        lanup = lanup_bin().display(),
        url = company.origin.url(),
        key = company.key.1,
        config = config.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("LANUP_LOG", "warn")
        .output()
        .expect("unshare runs");
    assert!(out.status.success(), "the system's store: {}", said(&out));
    assert!(
        std::fs::read_to_string(store.join("ca-certificates.crt"))
            .is_ok_and(|bundle| bundle.contains(&std::fs::read_to_string(&company.ca).expect("ca"))),
        "update-ca-certificates put the authority in the test's store"
    );

    // A node with ca_file stages the release over TLS, and reports to
    // headquarters over TLS; the admin's `lanup fleet` reads it there.
    let mut site = LoopSite::new(tmp.path(), 1);
    let mut cmd = site.command(0, Some(&company.origin.url()), &company.key.1);
    cmd.args(["--ca-file", s(&company.ca)]).args([
        "--report-to",
        &company.origin.url(),
        "--report-interval",
        "1s",
    ]);
    site.start(0, cmd);
    let pending = wait_staged(&[&site.states[0]], "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = lanup()
            .args(["fleet", "--reports", &company.origin.url(), "--json"])
            .env("SSL_CERT_FILE", &company.ca)
            .output()
            .expect("lanup fleet runs");
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let staged = view["sites"].as_array().is_some_and(|sites| {
            sites
                .iter()
                .any(|s| s["site"] == site.site.as_str() && s["nodes"] == 1)
        });
        if staged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no report through nginx: {}\n{}",
            said(&out),
            node_log(&site.states[0])
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(company.origin.access().contains("POST /_lanup/report"));

    // A node without it says why it cannot reach the origin.
    std::fs::create_dir_all(tmp.path().join("blind")).expect("mkdir");
    let mut blind = LoopSite::new(&tmp.path().join("blind"), 1);
    let cmd = blind.command(0, Some(&company.origin.url()), &company.key.1);
    blind.start(0, cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node_log(&blind.states[0]).contains("does not trust") {
        assert!(Instant::now() < deadline, "{}", node_log(&blind.states[0]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = run_ok(&["status", "--state", s(&blind.states[0])]);
    assert!(status.contains("does not trust"), "{status}");
}

#[test]
fn a_server_certificate_renewed_mid_download_is_taken_by_the_next_connection() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 128 KiB/s per connection: a 1.5 MB release takes seconds.
    let company = Company::new(tmp.path(), "limit_rate 128k;");
    let v1 = company.publish("1.0", 1_500_000);
    let mut site = LoopSite::new(tmp.path(), 1);
    let mut cmd = site.command(0, Some(&company.origin.url()), &company.key.1);
    cmd.args(["--ca-file", s(&company.ca)]);
    site.start(0, cmd);
    let state = site.states[0].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node_log(&state).contains("downloading release from the origin") {
        assert!(Instant::now() < deadline, "{}", node_log(&state));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Renewed: a new key and certificate from the same authority, taken
    // by nginx while the download runs.
    let pki = tmp.path().join("pki");
    let (pem, key) = issue(&pki, "renewed");
    std::fs::copy(&pem, company.origin.dir.join("cert.pem")).expect("cert");
    std::fs::copy(&key, company.origin.dir.join("cert.key")).expect("key");
    assert!(
        !staged_ok(&state, "1.0", &v1),
        "1.0 was staged before the renewal: make the download slower"
    );
    company.origin.reload();
    let deadline = Instant::now() + Duration::from_secs(10);
    while presented(company.origin.port) != fingerprint(&pem) {
        assert!(
            Instant::now() < deadline,
            "nginx still presents the first certificate"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pending = wait_staged(&[&state], "1.0", &v1, Duration::from_secs(90));
    assert!(pending.is_empty(), "{}", node_log(&state));
    // The next release comes over new connections, with the renewed
    // certificate.
    let v2 = company.publish("2.0", 200_000);
    run_ok(&["check", "--state", s(&state)]);
    let pending = wait_staged(&[&state], "2.0", &v2, Duration::from_secs(60));
    assert!(pending.is_empty(), "{}", node_log(&state));
    assert!(
        !node_log(&state).contains("certificate"),
        "{}",
        node_log(&state)
    );
}

/// Debian's tinyproxy on `port`, its outgoing connections from 127.0.0.9
/// (the one address the origin lets in), CONNECT allowed to `to`.
struct Tinyproxy {
    proc: std::process::Child,
    log: PathBuf,
}

impl Tinyproxy {
    fn start(dir: &Path, port: u16, to: u16) -> Tinyproxy {
        let tinyproxy = "/usr/bin/tinyproxy";
        assert!(
            Path::new(tinyproxy).exists(),
            "{tinyproxy} is missing (apt-get install tinyproxy)"
        );
        std::fs::create_dir_all(dir).expect("mkdir");
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nBind 127.0.0.9\nTimeout 60\nAllow 127.0.0.1\n\
                 ConnectPort {to}\nMaxClients 16\nLogLevel Connect\nLogFile \"{log}\"\n",
                log = log.display()
            ),
        )
        .expect("tinyproxy.conf");
        let proc = Command::new(tinyproxy)
            .args(["-d", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tinyproxy did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Tinyproxy { proc, log }
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

#[test]
fn an_origin_reachable_only_through_a_proxy_is_reached_through_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The origin lets in only the proxy's address.
    let company = Company::new(tmp.path(), "allow 127.0.0.9; deny all;");
    let v1 = company.publish("1.0", 300_000);
    let port = free_port();
    let proxy = Tinyproxy::start(&tmp.path().join("proxy"), port, company.origin.port);
    let via = format!("http://127.0.0.1:{port}");

    let out = company.setup(&["--ca-file", s(&company.ca)], &[]);
    assert!(
        !out.status.success(),
        "the origin refuses this machine: {}",
        said(&out)
    );
    assert!(said(&out).contains("403"), "{}", said(&out));
    let out = company.setup(&["--ca-file", s(&company.ca), "--proxy", &via], &[]);
    assert!(out.status.success(), "through the proxy: {}", said(&out));
    // HTTPS_PROXY from the environment does as well.
    let out = company.setup(&["--ca-file", s(&company.ca)], &[("HTTPS_PROXY", &via)]);
    assert!(out.status.success(), "HTTPS_PROXY: {}", said(&out));

    let mut site = LoopSite::new(tmp.path(), 1);
    let mut cmd = site.command(0, Some(&company.origin.url()), &company.key.1);
    cmd.args(["--ca-file", s(&company.ca), "--proxy", &via]);
    site.start(0, cmd);
    let pending = wait_staged(&[&site.states[0]], "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    let log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
    assert!(log.contains("CONNECT"), "{log}");
    let access = company.origin.access();
    assert!(
        access
            .lines()
            .any(|l| l.starts_with("127.0.0.9 ") && l.contains(" 200 ")),
        "{access}"
    );
    assert!(
        !access
            .lines()
            .any(|l| l.starts_with("127.0.0.9 ") && l.contains(" 403 ")),
        "{access}"
    );
}
