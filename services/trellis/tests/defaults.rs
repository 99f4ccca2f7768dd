//! `trellis up` exactly as the README tells a new user to run it: from a
//! fresh working directory, with no `TRELLIS_*` variable but the listen
//! addresses (so tests can run side by side), i.e. with the default,
//! relative data directory. A device provisioned and simulated there must
//! answer a call, and everything `trellis up` keeps must land under
//! `./trellis-data` of that directory.
mod common;

use common::{Proc, UpAddrs, command_without_trellis_env};
use std::time::{Duration, Instant};

fn cli(dir: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    command_without_trellis_env()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("RUST_LOG")
        .current_dir(dir)
        .output()
        .expect("run trellis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trellis_up_with_the_defaults_serves_a_device_from_a_fresh_directory() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let addrs = UpAddrs::new();
    let mut up = addrs.up_with_defaults(dir.path()).await?;
    let (keyvault, devices, grpc) = (&addrs.keyvault, &addrs.devices, &addrs.grpc);

    // Everything it keeps is under ./trellis-data of its working directory.
    let data = dir.path().join("trellis-data");
    let log = std::fs::read_to_string(data.join("redis/redis.log"))?;
    assert!(log.contains("Ready to accept connections"), "{log}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("master.key"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "development master key mode {mode:o}");
        let mode = std::fs::metadata(data.join("redis-admin.password"))?
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "Redis administrator password mode {mode:o}"
        );
    }
    // Its Redis has a user per service, password hashes only, and no open
    // `default`: a client without the password is refused.
    let acl = std::fs::read_to_string(data.join("redis/users.acl"))?;
    for user in [
        "trellis-keyvault",
        "trellis-gateway",
        "trellis-signer",
        "trellis-ota",
        "trellis-api",
    ] {
        assert!(
            acl.contains(&format!("user {user} on #")),
            "{user} in {acl}"
        );
    }
    let admin = std::fs::read_to_string(data.join("redis-admin.password"))?;
    assert!(!acl.contains(admin.trim()), "the ACL file holds a password");
    assert!(!acl.contains("nopass"), "an open user in {acl}");
    let said = up.output();
    let port: u16 = said
        .split("redis: started redis-server on 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no Redis port in what trellis up said:\n{said}"));
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET trellis:cloudkey:v1\r\n")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert!(reply.starts_with("-NOAUTH"), "unauthenticated GET: {reply}");
    }

    let urls = [
        ("TRELLIS_KEYVAULT_URL", format!("http://{keyvault}")),
        ("TRELLIS_GATEWAY_URL", format!("http://{grpc}")),
    ];
    let out = cli(
        dir.path(),
        &[
            "device",
            "provision",
            "--product",
            "1",
            "--count",
            "1",
            "--out",
            "keys",
        ],
        &urls,
    );
    assert!(out.status.success(), "provision: {out:?}");
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(id.len(), 24, "not a device id: {id:?}");

    let _sim = Proc::spawn_with_defaults(
        "sim",
        dir.path(),
        &[
            "sim",
            "--keys",
            "keys",
            "--devices",
            "1",
            "--gateway",
            devices,
            "--event-interval",
            "0",
            "--duration",
            "120",
        ],
        &urls,
    );

    // The call goes through as soon as the device is in session.
    let started = Instant::now();
    let answer = loop {
        let out = cli(dir.path(), &["device", "call", &id, "add", "2,3"], &urls);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no answer within 60 s: {}\ntrellis up said:\n{}",
            String::from_utf8_lossy(&out.stderr),
            up.output()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(answer, "5");
    up.terminate(Duration::from_secs(15));
    // What reaches the operator's terminal at the default level is ours:
    // no dependency's info lines.
    let said = up.output();
    assert!(
        !said.to_lowercase().contains("meter provider"),
        "a dependency's INFO line reached the terminal:\n{said}"
    );
    Ok(())
}

/// A data directory the local Redis cannot use is named in the error
/// (a redis-server that dies at start is reported with its own output:
/// `trellis_core::local_redis`'s unit test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_data_directory_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A data directory whose `redis` is a file: redis-server cannot use it.
    std::fs::create_dir_all(dir.path().join("trellis-data"))?;
    std::fs::write(dir.path().join("trellis-data/redis"), "not a directory")?;
    let out = cli(dir.path(), &["up"], &[]);
    assert!(!out.status.success(), "trellis up started: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("trellis-data/redis"),
        "the error should name the directory: {stderr}"
    );
    Ok(())
}
