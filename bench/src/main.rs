//! `trellis-bench`: Trellis's published figures, each printed next to the
//! physical limit measured in the same run on the same machine, and their
//! ratio. One subcommand per figure; `--smoke` makes each a few seconds
//! (CI runs them all that way through `bench/smoke.sh`). Every load stays on
//! loopback (127.0.0.0/8) and is bounded in count and time. BENCHMARKS.md
//! at the top of the repository holds the latest full figures and the
//! command for each.
mod alloc_count;
mod api;
mod cluster;
mod commands;
mod fastdevice;
mod handshake;
mod idle;
mod ota;
mod routed;
mod scale;
mod util;
mod webhooks;
mod wire;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[global_allocator]
static ALLOC: alloc_count::Counting = alloc_count::Counting;

#[derive(Parser, Debug)]
#[command(
    name = "trellis-bench",
    about = "Trellis benchmarks: figure, limit, ratio"
)]
struct Cli {
    /// Tiny sizes and a few seconds per figure (CI); overrides the sizes.
    #[arg(long, global = true)]
    smoke: bool,
    /// The `trellis` binary to run as services (default: beside this one).
    #[arg(long, global = true, env = "TRELLIS_BIN")]
    trellis_bin: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Handshakes/s through gateway + keyvault vs the RSA-2048 decrypt+sign limit.
    Handshake(handshake::Args),
    /// Idle sessions on one gateway: bytes per session and keepalive CPU.
    Idle(idle::Args),
    /// Function call routed through another gateway via Redis, vs raw Redis.
    Routed(routed::Args),
    /// A signed image to many devices at once vs raw AES-128-CBC on one core.
    Ota(ota::Args),
    /// Allocations per wire operation (timings: cargo bench -p trellis-wire).
    Wire(wire::Args),
    /// The application API: REST calls next to gRPC, SSE fan-out.
    Api(api::Args),
    /// Signed commands: the device's check vs raw RSA-PSS verification, and
    /// a routed signed call next to an unsigned one.
    Commands(commands::Args),
    /// 1-3 gateways behind HAProxy and 1-2 keyvaults: CPU per handshake
    /// and per call in each setup.
    Scale(scale::Args),
    /// Webhook deliveries per second to a local receiver.
    Webhooks(webhooks::Args),
    /// Every figure in turn, with the defaults (or --smoke).
    All,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let bin = cli.trellis_bin.clone();
    let smoke = cli.smoke;
    match cli.command {
        Cmd::Handshake(a) => handshake::run(&pick(smoke, a, handshake::Args::smoke()), bin).await,
        Cmd::Idle(a) => idle::run(&pick(smoke, a, idle::Args::smoke()), bin).await,
        Cmd::Routed(a) => routed::run(&pick(smoke, a, routed::Args::smoke()), bin).await,
        Cmd::Ota(a) => ota::run(&pick(smoke, a, ota::Args::smoke()), bin).await,
        Cmd::Wire(a) => wire::run(&pick(smoke, a, wire::Args::smoke())),
        Cmd::Api(a) => api::run(&pick(smoke, a, api::Args::smoke()), bin).await,
        Cmd::Commands(a) => commands::run(&pick(smoke, a, commands::Args::smoke()), bin).await,
        Cmd::Scale(a) => scale::run(&pick(smoke, a, scale::Args::smoke()), bin).await,
        Cmd::Webhooks(a) => webhooks::run(&pick(smoke, a, webhooks::Args::smoke())).await,
        Cmd::All => {
            wire::run(&pick(
                smoke,
                wire::Args { iterations: 20_000 },
                wire::Args::smoke(),
            ))?;
            handshake::run(
                &smoke_or(
                    smoke,
                    handshake::Args::smoke(),
                    handshake::Args {
                        seconds: 10.0,
                        concurrency: 48,
                        limit_seconds: 3.0,
                        device_crypto: handshake::DeviceCrypto::Openssl,
                        identities: 0,
                        until_hello: false,
                        admission: false,
                        gateway_env: Vec::new(),
                        auth: false,
                    },
                ),
                bin.clone(),
            )
            .await?;
            // The reconnect pattern against a gateway as shipped: the
            // figure that matters is its failure count, which must be 0.
            handshake::run(
                &smoke_or(
                    smoke,
                    handshake::Args::reconnect_smoke(),
                    handshake::Args {
                        seconds: 15.0,
                        ..handshake::Args::reconnect_smoke()
                    },
                ),
                bin.clone(),
            )
            .await?;
            routed::run(
                &smoke_or(
                    smoke,
                    routed::Args::smoke(),
                    routed::Args {
                        rate: 1000.0,
                        seconds: 10.0,
                        devices: 8,
                        runs: 5,
                        auth: false,
                    },
                ),
                bin.clone(),
            )
            .await?;
            scale::run(
                &smoke_or(smoke, scale::Args::smoke(), scale::Args::full()),
                bin.clone(),
            )
            .await?;
            ota::run(
                &smoke_or(
                    smoke,
                    ota::Args::smoke(),
                    ota::Args {
                        devices: 1000,
                        image_kib: 1024,
                        concurrency: 48,
                        timeout: 600.0,
                        aes_seconds: 2.0,
                        chunk_size: 512,
                    },
                ),
                bin.clone(),
            )
            .await?;
            idle::run(
                &smoke_or(
                    smoke,
                    idle::Args::smoke(),
                    idle::Args {
                        sessions: vec![10_000, 50_000, 100_000],
                        window: 30.0,
                        keepalive: 15,
                        concurrency: 48,
                        hold: 0.0,
                    },
                ),
                bin,
            )
            .await?;
            webhooks::run(&smoke_or(
                smoke,
                webhooks::Args::smoke(),
                webhooks::Args {
                    events: 5000,
                    integrations: 8,
                },
            ))
            .await
        }
    }
}

/// The smoke sizes under --smoke, else what was asked.
fn pick<T>(smoke: bool, asked: T, smoke_args: T) -> T {
    if smoke { smoke_args } else { asked }
}

/// For `all`: the smoke sizes under --smoke, else the full ones.
fn smoke_or<T>(smoke: bool, smoke_args: T, full: T) -> T {
    if smoke { smoke_args } else { full }
}
