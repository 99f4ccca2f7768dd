//! `trellis`: one binary that runs any service, all of them (`trellis up`),
//! the operator CLI, and the device fleet simulator.
mod cli;
mod ops;
mod sim;
mod up;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;
use trellis_core::{Config, Shutdown, telemetry};

fn main() -> ExitCode {
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Up(args) => {
            let mut telemetry_config = config.telemetry.clone();
            if args.demo.is_some() && telemetry_config == Default::default() {
                // The demo narrates on stdout; service logs drown it at info.
                telemetry_config.log = "warn".into();
            }
            telemetry::init("trellis", &telemetry_config);
            up::run(config, args).await
        }
        Command::Keyvault => {
            telemetry::init("keyvault", &config.telemetry);
            let (_trigger, shutdown) = Shutdown::on_signals();
            trellis_keyvault::serve(config, shutdown).await
        }
        Command::Gateway => {
            telemetry::init("gateway", &config.telemetry);
            let (_trigger, shutdown) = Shutdown::on_signals();
            trellis_gateway::serve(config, shutdown).await
        }
        Command::Sim(args) => {
            telemetry::init("sim", &config.telemetry);
            sim::run(args).await
        }
        Command::Device(cmd) => ops::device(&cli.endpoints, cmd).await,
        Command::Events(cmd) => ops::events(&cli.endpoints, cmd).await,
        Command::Audit(cmd) => ops::audit(&cli.endpoints, cmd).await,
    }
}
