//! Redis over TLS: `trellis up` with a `rediss://` URL, the installation's
//! CA and a client certificate, against a real redis-server that requires
//! TLS and client certificates, runs the whole demo (provisioning,
//! handshakes, a routed call, a signed rollout). Without the CA it stops
//! at once and says why.
mod common;

use common::{UpAddrs, command_without_trellis_env, free_port};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// redis-server with only a TLS port, its certificate from `tls` (the
/// keyvault role's: signed by the CA, valid for 127.0.0.1), client
/// certificates of the same CA required.
fn start_tls_redis(dir: &std::path::Path, tls: &std::path::Path) -> TlsRedis {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--tls-cert-file")
        .arg(tls.join("keyvault.crt"))
        .arg("--tls-key-file")
        .arg(tls.join("keyvault.key"))
        .arg("--tls-ca-cert-file")
        .arg(tls.join("ca.crt"))
        .args(["--tls-auth-clients", "yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis-server TLS port never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsRedis { child, port }
}

fn trellis(dir: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = command_without_trellis_env();
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("RUST_LOG")
        .current_dir(dir);
    // Bounded: a hang is a failure with the output so far.
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run trellis");
    let pid = child.id();
    let guard = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(240));
        // Ends only the process this test started, by its PID.
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let out = child.wait_with_output().expect("wait for trellis");
    drop(guard);
    out
}

#[test]
fn trellis_up_runs_the_demo_over_tls_redis_and_refuses_an_unknown_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    let out = trellis(dir.path(), &["certs", "init", "--dir", "tls"], &[]);
    assert!(out.status.success(), "certs init: {out:?}");
    let redis = start_tls_redis(dir.path(), &tls);
    let url = format!("rediss://127.0.0.1:{}/", redis.port);

    let addrs = UpAddrs::new();
    let mut env = addrs.env();
    env.push(("TRELLIS_REDIS__URL", url.clone()));
    env.push(("TRELLIS_TLS__DIR", tls.display().to_string()));
    // Without the CA: the system's roots do not know the server.
    let out = trellis(dir.path(), &["up"], &env);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "trellis up with an untrusted Redis: {said}"
    );
    assert!(
        said.contains("cannot reach redis at rediss://127.0.0.1"),
        "{said}"
    );

    env.push((
        "TRELLIS_REDIS__TLS_CA_FILE",
        tls.join("ca.crt").display().to_string(),
    ));
    env.push((
        "TRELLIS_REDIS__TLS_CERT_FILE",
        tls.join("operator.crt").display().to_string(),
    ));
    env.push((
        "TRELLIS_REDIS__TLS_KEY_FILE",
        tls.join("operator.key").display().to_string(),
    ));
    let out = trellis(
        dir.path(),
        &["up", "--demo", "2", "--exit-after-demo"],
        &env,
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "trellis up --demo over TLS Redis: {said}"
    );
    assert!(said.contains("demo: done"), "{said}");
    assert!(said.contains("returned 5"), "{said}");
}
