//! `trellis`: one binary that runs any service, all of them (`trellis up`),
//! the operator CLI, and the device fleet simulator.
mod access_cli;
mod admin;
mod certs_cli;
mod cli;
mod command_cli;
mod demo_ota;
mod firmware_cli;
mod ops;
mod redis_cli;
mod rollout_cli;
mod sim;
mod up;
mod webhook_cli;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;
use trellis_core::admin::ReadinessCheck;
use trellis_core::config::TelemetryConfig;
use trellis_core::{Config, Shutdown, telemetry};

fn main() -> ExitCode {
    // Before any thread exists (crates/core/src/heap.rs).
    trellis_core::heap::limit_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Spawned, not polled by `block_on` itself: `block_on` polls on this
    // (main) thread, outside the worker pool, so every device accepted by
    // a gateway was a wake-up of this thread and then a cross-thread
    // wake-up of a worker for the session it spawned. Measured: the main
    // thread was 9.5 % of the gateway's CPU samples during a handshake run.
    match runtime.block_on(async { tokio::spawn(run(cli)).await }) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    // `rediss://` URLs of every service in this process use these.
    trellis_core::redis_conn::init_tls(&config.redis)?;
    // What operator requests (CLI, simulator provisioning) carry.
    let token = access_cli::find_token(cli.token.as_deref(), &config.data_dir);
    telemetry::set_operator_credential(token.as_deref()).map_err(anyhow::Error::msg)?;
    if !matches!(cli.command, Command::Up(_)) {
        // `trellis up` makes the certificates first, then loads them.
        ops::load_operator_tls(&config);
    }
    match cli.command {
        Command::Certs(cmd) => certs_cli::run(&config, cmd),
        Command::Redis(cmd) => redis_cli::run(cmd),
        Command::Up(args) => {
            if args.demo.is_some() && config.telemetry.log == TelemetryConfig::default().log {
                // The demo narrates on stdout; service logs drown it at info.
                config.telemetry.log = "warn".into();
            }
            let _telemetry = telemetry::init("up", &config);
            up::run(config, args).await
        }
        Command::Keyvault(cli::KeyvaultArgs {
            action: Some(cli::KeyvaultAction::Rewrap { new_master_key }),
        }) => ops::rewrap(&config, &new_master_key).await,
        Command::Keyvault(cli::KeyvaultArgs { action: None }) => {
            let _telemetry = telemetry::init("keyvault", &config);
            let (_trigger, shutdown) = Shutdown::on_signals();
            let redis = config.redis.url.clone().unwrap_or_default();
            admin::spawn(
                &config,
                vec![ReadinessCheck::redis(redis)],
                shutdown.clone(),
            )
            .await?;
            trellis_keyvault::serve(config, shutdown).await
        }
        Command::Gateway => {
            let _telemetry = telemetry::init("gateway", &config);
            let (_trigger, shutdown) = Shutdown::on_signals();
            let checks = vec![
                ReadinessCheck::redis(config.redis.url.clone().unwrap_or_default()),
                ReadinessCheck::tcp("keyvault", admin::authority(&config.gateway.keyvault_url)),
            ];
            admin::spawn(&config, checks, shutdown.clone()).await?;
            trellis_gateway::serve(config, shutdown).await
        }
        Command::Signer => {
            let _telemetry = telemetry::init("signer", &config);
            let (_trigger, shutdown) = Shutdown::on_signals();
            let checks = vec![
                ReadinessCheck::redis(config.redis.url.clone().unwrap_or_default()),
                ReadinessCheck::tcp("keyvault", admin::authority(&config.signer.keyvault_url)),
            ];
            admin::spawn(&config, checks, shutdown.clone()).await?;
            trellis_signer::serve(config, shutdown).await
        }
        Command::Ota => {
            let _telemetry = telemetry::init("ota", &config);
            let (_trigger, shutdown) = Shutdown::on_signals();
            let checks = vec![
                ReadinessCheck::redis(config.redis.url.clone().unwrap_or_default()),
                ReadinessCheck::tcp("gateway", admin::authority(&config.ota.gateway_url)),
            ];
            admin::spawn(&config, checks, shutdown.clone()).await?;
            trellis_ota::serve(config, shutdown).await
        }
        Command::Api => {
            let _telemetry = telemetry::init("api", &config);
            let (_trigger, shutdown) = Shutdown::on_signals();
            let checks = vec![
                ReadinessCheck::tcp("gateway", admin::authority(&config.api.gateway_url)),
                ReadinessCheck::tcp("keyvault", admin::authority(&config.api.keyvault_url)),
            ];
            admin::spawn(&config, checks, shutdown.clone()).await?;
            trellis_api::serve(config, shutdown).await
        }
        Command::Sim(args) => {
            let _telemetry = telemetry::init("sim", &config);
            if args.smoke {
                return sim::smoke(args, &cli.endpoints).await;
            }
            sim::run(args).await
        }
        command => {
            // Operator commands: quiet logs, one trace per command.
            if config.telemetry.log == TelemetryConfig::default().log {
                config.telemetry.log = "warn".into();
            }
            let telemetry = telemetry::init("cli", &config);
            let span = tracing::info_span!("cli.command", command = command.name());
            let result = {
                use tracing::Instrument;
                let trace_id = span.in_scope(telemetry::current_trace_id);
                if cli.trace {
                    eprintln!("trace id: {trace_id}");
                }
                match command {
                    Command::Rollout(cmd) => {
                        rollout_cli::run(&cli.endpoints, cmd).instrument(span).await
                    }
                    Command::Webhook(cmd) => {
                        webhook_cli::run(&cli.endpoints.api_url, token.clone(), cmd)
                            .instrument(span)
                            .await
                    }
                    Command::Firmware(cmd) => {
                        firmware_cli::firmware(&cli.endpoints, cmd)
                            .instrument(span)
                            .await
                    }
                    Command::Release(cmd) => {
                        firmware_cli::release(&cli.endpoints, cmd)
                            .instrument(span)
                            .await
                    }
                    Command::SignedCommands(cmd) => span.in_scope(|| command_cli::run(cmd)),
                    Command::Policy(cmd) => {
                        firmware_cli::policy(&cli.endpoints, cmd)
                            .instrument(span)
                            .await
                    }
                    Command::Login { token } => {
                        access_cli::login(&cli.endpoints, &token)
                            .instrument(span)
                            .await
                    }
                    Command::Whoami => access_cli::whoami(&cli.endpoints).instrument(span).await,
                    Command::Org(cmd) => {
                        access_cli::org(&cli.endpoints, cmd).instrument(span).await
                    }
                    Command::Product(cmd) => {
                        access_cli::product(&cli.endpoints, cmd)
                            .instrument(span)
                            .await
                    }
                    Command::User(cmd) => {
                        access_cli::user(&cli.endpoints, cmd).instrument(span).await
                    }
                    Command::Token(cmd) => {
                        access_cli::token(&cli.endpoints, &config, cmd)
                            .instrument(span)
                            .await
                    }
                    command => ops::run(&cli.endpoints, command).instrument(span).await,
                }
            };
            telemetry.flush();
            result
        }
    }
}
