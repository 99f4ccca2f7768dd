//! `trellis up`: every service in one process, the embedded default. Like
//! Tempo's single-binary mode it is a list of services, not a second
//! implementation of them: it fills in loopback addresses and a local Redis
//! where microservices mode takes them from configuration.
use crate::cli::UpArgs;
use crate::{demo_ota, ops, sim};
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use trellis_core::admin::ReadinessCheck;
use trellis_core::local_redis::{Admin, LocalRedis, RedisData};
use trellis_core::redis_conn::acl::{self, RedisUser};

/// The local Redis's administrator (`default` user) password, in `data_dir`.
pub const REDIS_ADMIN_PASSWORD_FILE: &str = "redis-admin.password";

/// The administrator password kept in `path` (0600), made on first start.
fn admin_password(path: &std::path::Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let password = text.trim();
        if !password.is_empty() {
            return Ok(password.to_string());
        }
    }
    let password = acl::new_password();
    trellis_auth::setup::write_token_file(path, &password)?;
    Ok(password)
}
use trellis_core::{Config, Shutdown};
use trellis_proto::v1::{CallFunctionRequest, GetVariableRequest};
use trellis_wire::DeviceId;

/// Mutual TLS between the services, by default on one machine too: a
/// development CA and a certificate per role in `tls.dir` (default
/// `data_dir/tls`), made on first start and renewed when close to expiry.
fn bootstrap_tls(config: &Config) -> anyhow::Result<()> {
    use trellis_core::config::TlsMode;
    use trellis_core::tls::{Role, ServiceTls};
    if config.tls.mode == TlsMode::Off {
        println!("tls: OFF (tls.mode = \"off\"): the services talk plaintext gRPC");
        ops::load_operator_tls(config);
        return Ok(());
    }
    // One process, several services: one cert_file cannot fit them all.
    trellis_core::tls::check_shared_process(config)?;
    let dir = trellis_core::tls::dir(config);
    let issued = if config.tls.ca_file.is_none() {
        trellis_auth::pki::ensure_dev_pki(&dir).with_context(|| {
            format!(
                "cannot make the development certificates in {}",
                dir.display()
            )
        })?
    } else {
        Vec::new()
    };
    println!(
        "tls: mutual TLS between services; CA and role certificates in {}{}",
        dir.display(),
        if issued.is_empty() {
            String::new()
        } else {
            format!(
                " (issued now: {})",
                issued
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    ops::load_operator_tls(config);
    // Fail here, with the file named, rather than in one service later.
    for role in Role::ALL {
        ServiceTls::load(config, role)?;
    }
    Ok(())
}

/// Secure by default on one machine too: the first owner's token and the
/// services' credential, kept in `data_dir` (0600) and reused while they
/// are live. The CLI on this machine finds the owner token there.
async fn bootstrap_access(config: &Config) -> anyhow::Result<()> {
    use trellis_auth::setup::{Bootstrap, bootstrap_token};
    if config.auth.mode == trellis_core::config::AuthMode::Off {
        println!("auth: OFF (auth.mode = \"off\"): every service answers every caller");
        return Ok(());
    }
    let mut durable = trellis_core::redis_conn::connect_durable(&config.redis).await?;
    let owner_path = config.data_dir.join(crate::access_cli::OWNER_TOKEN_FILE);
    let (owner, made) = bootstrap_token(&mut durable, &owner_path, Bootstrap::FirstOwner).await?;
    // Over mutual TLS a service is its certificate; on plaintext it needs
    // a token.
    if config.tls.mode == trellis_core::config::TlsMode::Off {
        let (services, _) = bootstrap_token(
            &mut durable,
            &config.data_dir.join("services.token"),
            Bootstrap::Services,
        )
        .await?;
        trellis_core::telemetry::set_service_credential(Some(&services))
            .map_err(anyhow::Error::msg)?;
    }
    // The demo's operator calls, unless `--token` or a login chose another.
    if !trellis_core::telemetry::has_operator_credential() {
        trellis_core::telemetry::set_operator_credential(Some(&owner))
            .map_err(anyhow::Error::msg)?;
    }
    println!(
        "auth: tokens required; {} first owner token in {} (mode 0600; the CLI on this machine uses it, or `trellis login --token $(cat {})`)",
        if made { "made the" } else { "the" },
        owner_path.display(),
        owner_path.display()
    );
    Ok(())
}

pub async fn run(mut config: Config, args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let local_redis = match &config.redis.url {
        Some(url) => {
            println!(
                "redis: {} (configured; every service connects with this URL's user)",
                trellis_core::redis_conn::redact_url(url)
            );
            None
        }
        None => {
            let dir = config.data_dir.join("redis");
            let password_file = config.data_dir.join(REDIS_ADMIN_PASSWORD_FILE);
            let admin = admin_password(&password_file)?;
            let server =
                LocalRedis::start_with_users(RedisData::Persistent(&dir), Admin::Password(&admin))?;
            println!(
                "redis: started redis-server on 127.0.0.1:{} (data in {}); each service is its own ACL user with only its keys; administrator: REDISCLI_AUTH=$(cat {}) redis-cli -p {}",
                server.port(),
                dir.display(),
                password_file.display(),
                server.port()
            );
            config.redis.url = Some(server.url());
            Some(server)
        }
    };
    // Each service's configuration: the shared one, with the service's own
    // Redis user when this process started the Redis.
    let service_config = |config: &Config, user: RedisUser| {
        let mut c = config.clone();
        if let Some(server) = &local_redis {
            c.redis.url = Some(server.url_for(user));
        }
        c
    };
    if config.keyvault.master_key.is_none() && config.keyvault.master_key_file.is_none() {
        let path = trellis_keyvault::ensure_dev_master_key(&config.data_dir)?;
        println!(
            "keyvault: no master key configured; using the DEVELOPMENT key {} (production: set keyvault.master_key_file)",
            path.display()
        );
        config.keyvault.master_key_file = Some(path);
    }

    bootstrap_tls(&config)?;
    bootstrap_access(&config).await?;

    let (trigger, shutdown) = Shutdown::on_signals();
    let kv_listener = TcpListener::bind(&config.keyvault.listen)
        .await
        .with_context(|| format!("keyvault cannot listen on {}", config.keyvault.listen))?;
    let kv_addr = kv_listener.local_addr()?;
    config.gateway.keyvault_url = url_of(kv_addr);
    let keyvault = tokio::spawn(trellis_keyvault::serve_with_listener(
        service_config(&config, RedisUser::Keyvault),
        kv_listener,
        shutdown.clone(),
    ));
    println!("keyvault: gRPC on {kv_addr}");
    let checks = vec![
        ReadinessCheck::redis(config.redis.url.clone().unwrap_or_default()),
        ReadinessCheck::tcp("keyvault", kv_addr.to_string()),
    ];
    if let Some(addr) = crate::admin::spawn(&config, checks, shutdown.clone()).await? {
        println!("admin: http://{addr}/metrics, /healthz, /readyz");
    }

    // Signer and OTA scheduler: bound now so the gateways know where the
    // scheduler is before their first device says Hello.
    let signer_listener = TcpListener::bind(&config.signer.listen)
        .await
        .with_context(|| format!("signer cannot listen on {}", config.signer.listen))?;
    let signer_addr = signer_listener.local_addr()?;
    let ota_listener = TcpListener::bind(&config.ota.listen)
        .await
        .with_context(|| format!("ota cannot listen on {}", config.ota.listen))?;
    let ota_addr = ota_listener.local_addr()?;
    config.signer.keyvault_url = url_of(kv_addr);
    config.ota.signer_url = url_of(signer_addr);
    config.gateway.ota_url = url_of(ota_addr);

    let gateway_count = args
        .gateways
        .unwrap_or(if args.demo.is_some() { 2 } else { 1 })
        .max(1);
    let mut gateways = Vec::new();
    let mut device_addrs = Vec::new();
    let mut grpc_addrs = Vec::new();
    for n in 0..gateway_count {
        let mut gw_config = service_config(&config, RedisUser::Gateway);
        if gw_config.gateway.id.is_empty() {
            gw_config.gateway.id = format!("gw-{}", n + 1);
        } else if gateway_count > 1 {
            gw_config.gateway.id = format!("{}-{}", gw_config.gateway.id, n + 1);
        }
        let devices = bind_gateway(&config.gateway.device_listen, n, "devices").await?;
        let grpc = bind_gateway(&config.gateway.grpc_listen, n, "gRPC").await?;
        println!(
            "gateway {}: devices on {}, gRPC on {}",
            gw_config.gateway.id,
            devices.local_addr()?,
            grpc.local_addr()?
        );
        device_addrs.push(devices.local_addr()?);
        grpc_addrs.push(grpc.local_addr()?);
        gateways.push(tokio::spawn(trellis_gateway::serve_with_listeners(
            gw_config,
            devices,
            grpc,
            shutdown.clone(),
        )));
    }
    // The scheduler delivers through any gateway; the first will do.
    let first_grpc = grpc_addrs.first().context("no gateway")?;
    config.ota.gateway_url = url_of(*first_grpc);
    let signer = tokio::spawn(trellis_signer::serve_with_listener(
        service_config(&config, RedisUser::Signer),
        signer_listener,
        shutdown.clone(),
    ));
    println!("signer: gRPC on {signer_addr}");
    let ota = tokio::spawn(trellis_ota::serve_with_listener(
        service_config(&config, RedisUser::Ota),
        ota_listener,
        shutdown.clone(),
    ));
    println!("ota: gRPC on {ota_addr}");
    // The application API (Particle-compatible REST): it calls the others
    // with each request's own token.
    let api = {
        // Its own Redis user: webhook integrations and queues, reading events.
        let mut api_config = service_config(&config, RedisUser::Api);
        api_config.api.gateway_url = url_of(*first_grpc);
        api_config.api.keyvault_url = url_of(kv_addr);
        api_config.api.signer_url = url_of(signer_addr);
        api_config.api.ota_url = url_of(ota_addr);
        let listener = TcpListener::bind(&config.api.listen)
            .await
            .with_context(|| format!("api cannot listen on {}", config.api.listen))?;
        println!("api: http://{}", listener.local_addr()?);
        tokio::spawn(trellis_api::serve_with_listener(
            api_config,
            listener,
            shutdown.clone(),
        ))
    };
    println!("trellis is up. Ctrl-C stops it.");

    if let Some(n) = args.demo {
        let demo = demo(
            &config,
            n,
            &device_addrs,
            &grpc_addrs,
            DemoServices {
                keyvault: kv_addr,
                signer: signer_addr,
                ota: ota_addr,
            },
            shutdown.clone(),
        );
        let result = demo.await;
        if let Err(e) = &result {
            eprintln!("demo failed: {e:#}");
        }
        if args.exit_after_demo {
            trigger.trigger();
            result?;
        }
    }

    let mut services: Vec<(String, tokio::task::JoinHandle<anyhow::Result<()>>)> = gateways
        .into_iter()
        .enumerate()
        .map(|(n, g)| (format!("gateway {}", n + 1), g))
        .collect();
    services.push(("signer".into(), signer));
    services.push(("ota".into(), ota));
    services.push(("api".into(), api));
    services.push(("keyvault".into(), keyvault));
    // A service that stops on its own takes the others down with it:
    // `trellis up` must never look up with a piece missing.
    let mut wait = shutdown.clone();
    let stopped_early = tokio::select! {
        _ = wait.wait() => None,
        (result, index, _) = futures::future::select_all(services.iter_mut().map(|(_, task)| task)) => {
            Some((index, result))
        }
    };
    let mut failure = None;
    if let Some((index, result)) = stopped_early {
        let name = services[index].0.clone();
        let why = match result {
            Ok(Ok(())) => "it ended without an error".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => format!("it panicked: {e}"),
        };
        eprintln!("{name} stopped: {why}; stopping the others");
        failure = Some(anyhow::anyhow!("{name} stopped: {why}"));
        services.remove(index);
        trigger.trigger();
    }
    println!("shutting down");
    for (name, task) in services {
        if let Ok(Err(e)) = task.await {
            eprintln!("{name}: {e:#}");
        }
    }
    drop(trigger);
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(())
}

/// The URL the other services call a listener at: a wildcard listen
/// address is reached on loopback, which the development certificates name.
fn url_of(addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{addr}")
}

/// Gateway `n`'s listener: the configured address with the port moved up
/// by `n`. The first gateway's port is what devices are told, so it must be
/// free; a later gateway whose port is taken (by anything else on the
/// machine) gets one from the operating system instead, and says so.
async fn bind_gateway(configured: &str, n: usize, what: &str) -> anyhow::Result<TcpListener> {
    let addr = offset_port(configured, n)?;
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if n > 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
            let mut any = addr;
            any.set_port(0);
            let l = TcpListener::bind(any)
                .await
                .with_context(|| format!("gateway cannot listen for {what} on {any}"))?;
            println!(
                "gateway {}: {addr} is in use; {what} on {} instead",
                n + 1,
                l.local_addr()?
            );
            Ok(l)
        }
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("gateway cannot listen for {what} on {addr}")))
        }
    }
}

/// `host:port` with the port moved up by `n` (port 0 stays 0).
fn offset_port(addr: &str, n: usize) -> anyhow::Result<SocketAddr> {
    let mut a: SocketAddr = addr
        .parse()
        .with_context(|| format!("{addr:?} is not an address host:port"))?;
    if a.port() != 0 {
        let port = usize::from(a.port()) + n;
        a.set_port(u16::try_from(port).context("port out of range")?);
    }
    Ok(a)
}

/// Provisions N devices, runs them against the first gateway, and sends a
/// function call and a variable read through the LAST gateway, so the
/// request crosses gateways through Redis.
struct DemoServices {
    keyvault: SocketAddr,
    signer: SocketAddr,
    ota: SocketAddr,
}

async fn demo(
    config: &Config,
    n: usize,
    device_addrs: &[SocketAddr],
    grpc_addrs: &[SocketAddr],
    services: DemoServices,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    const PRODUCT: u32 = 1;
    let dir = config.data_dir.join("demo-devices");
    let mut kv = connect_keyvault(services.keyvault).await?;
    // The devices are provisioned trusting the customer's offline key and
    // the cloud release key, both required.
    let mut signer = demo_ota::signer_client(&url_of(services.signer)).await?;
    let customer = demo_ota::customer_key(&config.data_dir).await?;
    demo_ota::provision_trust(&mut kv, &mut signer, &customer, PRODUCT, &dir).await?;
    let existing = trellis_device::identity::load_fleet(&dir, Some(n), None).unwrap_or_default();
    if existing.len() < n {
        let ids: Vec<DeviceId> = (existing.len()..n)
            .map(|_| DeviceId(rand::random()))
            .collect();
        println!(
            "demo: provisioning {} devices into {}",
            ids.len(),
            dir.display()
        );
        ops::provision(&mut kv, 1, ids, &dir).await?;
    }
    let identities = trellis_device::identity::load_fleet(&dir, Some(n), None)?;
    let ids: Vec<String> = identities.iter().map(|i| i.device_id.to_string()).collect();
    let first = device_addrs.first().context("no gateway")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sim_args = crate::cli::SimArgs {
        devices: n,
        keys: dir.clone(),
        gateway: vec![first.to_string()],
        cloud_key: None,
        product: 1,
        firmware_version: 1,
        firmware_image: None,
        event_interval: 5,
        keepalive: config.gateway.keepalive_secs.max(1),
        home_return_secs: 0,
        // Demo devices support key rotation: `trellis keys rotate cloud`
        // and `trellis device rotate-key` work on them.
        key_rotation: true,
        duration: 0,
        smoke: false,
    };
    let fleet_config = sim::sim_config(&sim_args)?;
    trellis_device::sim::run_fleet(
        identities,
        fleet_config,
        sim_args.gateway.clone(),
        sim::shutdown_token(shutdown.clone()),
        tx,
    );
    tokio::spawn(async move {
        while let Some(report) = rx.recv().await {
            sim::print_report(&report);
        }
    });

    // Wait until every demo device is in session, then call across gateways.
    let last_grpc = grpc_addrs.last().context("no gateway")?;
    let mut gw = ops::gateway_client(&url_of(*last_grpc)).await?;
    let started = std::time::Instant::now();
    loop {
        let online = gw
            .list_devices(trellis_proto::v1::ListDeviceStatesRequest {
                product_id: 0,
                online_only: true,
            })
            .await
            .map(|r| {
                r.into_inner()
                    .devices
                    .iter()
                    .filter(|d| ids.contains(&d.device_id))
                    .count()
            })
            .unwrap_or(0);
        if online >= n {
            println!(
                "demo: all {n} devices in session after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        if started.elapsed() > Duration::from_secs(60 + n as u64) {
            anyhow::bail!("only {online} of {n} demo devices came online");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let target = ids.first().context("no demo device")?.clone();
    let via = grpc_addrs.len();
    let r = gw
        .call_function(CallFunctionRequest {
            device_id: target.clone(),
            function: "add".into(),
            argument: "2,3".into(),
            timeout_ms: 0,
            signed_command: Vec::new(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("demo call failed: {}", e.message()))?
        .into_inner();
    println!(
        "demo: operator called add(2,3) on {target} through gateway {} of {via} (the device is on gateway 1): returned {}",
        r.gateway_id, r.return_value
    );
    let v = gw
        .get_variable(GetVariableRequest {
            device_id: target.clone(),
            name: "temp".into(),
            timeout_ms: 0,
        })
        .await
        .map_err(|e| anyhow::anyhow!("demo variable read failed: {}", e.message()))?
        .into_inner();
    println!(
        "demo: variable temp on {target} = {}",
        ops::format_value(&v)
    );
    // Show one event arriving.
    let mut events = gw
        .stream_events(trellis_proto::v1::StreamEventsRequest {
            device_id: String::new(),
            prefix: String::new(),
            from_start: true,
        })
        .await
        .map_err(|e| anyhow::anyhow!("demo events failed: {}", e.message()))?
        .into_inner();
    if let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(15), events.message()).await {
        println!(
            "demo: event {} from {}: {}",
            e.name,
            e.device_id,
            String::from_utf8_lossy(&e.data)
        );
    }
    // Finally a signed firmware update, in two stages.
    let release_id =
        demo_ota::signed_release(&mut signer, &customer, PRODUCT, 2, demo_ota::demo_image(2))
            .await?;
    println!(
        "demo: release {release_id} signed by the customer's offline key and the cloud release key"
    );
    let mut ota = demo_ota::ota_client(&url_of(services.ota)).await?;
    let status = demo_ota::two_stage_rollout(
        &mut ota,
        &release_id,
        PRODUCT,
        ids.clone(),
        Duration::from_secs(120 + n as u64),
    )
    .await?;
    println!(
        "demo: rollout {} complete: every device reconnected running release {release_id}",
        status.rollout_id
    );
    println!("demo: done");
    Ok(())
}

async fn connect_keyvault(
    addr: SocketAddr,
) -> anyhow::Result<
    trellis_proto::v1::key_vault_client::KeyVaultClient<trellis_core::telemetry::TracedChannel>,
> {
    let url = url_of(addr);
    for _ in 0..50 {
        if let Ok(c) = ops::keyvault_client(&url).await {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ops::keyvault_client(&url).await
}

#[cfg(test)]
mod tests {
    use super::url_of;

    #[test]
    fn wildcard_listeners_are_called_on_loopback() {
        assert_eq!(
            url_of("0.0.0.0:7100".parse().unwrap()),
            "http://127.0.0.1:7100"
        );
        assert_eq!(url_of("[::]:7100".parse().unwrap()), "http://[::1]:7100");
        assert_eq!(
            url_of("10.1.2.3:7100".parse().unwrap()),
            "http://10.1.2.3:7100"
        );
    }
}
