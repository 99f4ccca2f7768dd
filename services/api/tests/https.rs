//! HTTPS on the API listener (`api.tls_cert_file`, `api.tls_key_file`): a
//! client that trusts the certificate gets Particle's answers; plain HTTP
//! on that port gets none.
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use trellis_core::Shutdown;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_when_given_a_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert_file = dir.path().join("api.crt");
    let key_file = dir.path().join("api.key");
    std::fs::write(&cert_file, made.cert.pem())?;
    std::fs::write(&key_file, made.signing_key.serialize_pem())?;

    let mut config = trellis_core::Config::default();
    config.tls.mode = trellis_core::config::TlsMode::Off;
    config.api.tls_cert_file = Some(cert_file.clone());
    config.api.tls_key_file = Some(key_file.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (trigger, shutdown) = Shutdown::new();
    let server = tokio::spawn(trellis_api::serve_with_listener(config, listener, shutdown));

    // No token: Particle's 400, over TLS (no service is called for it).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone())?;
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(b"GET /v1/devices HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut reply)).await??;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("invalid_request"), "{reply}");

    // The console's session cookie is Secure over HTTPS (sign-out sets the
    // clearing cookie without calling any service).
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(
        b"DELETE /v1/trellis/session HTTP/1.1\r\nHost: localhost\r\nX-Trellis-Console: 1\r\n\
          Connection: close\r\n\r\n",
    )
    .await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut reply)).await??;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let cookie = reply
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_default();
    assert!(cookie.contains("trellis_console=;"), "{reply}");
    assert!(cookie.contains("; HttpOnly; SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("; Secure"), "{cookie}");

    // Plain HTTP on the HTTPS port: no HTTP answer.
    let mut plain = TcpStream::connect(addr).await?;
    plain
        .write_all(b"GET /v1/devices HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut got)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "{got:?}"
    );

    // Only one of the two files: refused at start.
    let mut half = trellis_core::Config::default();
    half.tls.mode = trellis_core::config::TlsMode::Off;
    half.api.tls_cert_file = Some(cert_file);
    let err = trellis_api::serve_with_listener(
        half,
        TcpListener::bind("127.0.0.1:0").await?,
        Shutdown::never(),
    )
    .await
    .expect_err("half a TLS configuration must be refused");
    assert!(err.to_string().contains("tls_key_file"), "{err}");

    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(10), server).await???;
    Ok(())
}
