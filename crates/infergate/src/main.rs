//! The `infergate` command: thin wiring of the workspace's crates behind subcommands.

mod bench;
mod brain;
mod demo;
mod epp;
mod pool_source;
mod scenario;
mod serve;
mod sim;
mod tls;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "infergate",
    version,
    about = "Inference gateway for self-hosted LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Gateway API Inference Extension endpoint picker (Envoy ext_proc server).
    Epp(Box<epp::EppArgs>),
    /// Run the standalone OpenAI-compatible gateway (simulated replicas when no pool is given).
    Serve(Box<serve::ServeArgs>),
    /// Run simulated vLLM replicas (OpenAI API, vLLM /metrics, injectable faults).
    Sim(Box<sim::SimArgs>),
    /// Load-test OpenAI-compatible servers with a bench-lab workload and write a report.
    Bench(Box<bench::BenchArgs>),
    /// See the gateway at work: a simulated pool under a shared-prefix chat sweep, through
    /// round robin and through `infergate serve`, compared in a table and a chart.
    Demo(demo::DemoArgs),
    /// Print the CustomResourceDefinitions of InferencePool, InferenceObjective,
    /// InferenceModelRewrite and the legacy InferenceModel (`infergate crds | kubectl apply -f -`).
    Crds,
    /// Check configuration files and print what they mean, without serving.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate an EndpointPickerConfig and/or a pool file.
    Check {
        #[arg(long)]
        config_file: Option<std::path::PathBuf>,
        #[arg(long)]
        pool_file: Option<std::path::PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INFERGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Epp(args) => epp::run(*args),
        Command::Sim(args) => sim::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(args) => bench::run(*args),
        Command::Demo(args) => demo::run(args),
        Command::Crds => {
            print!("{}", infergate_k8s::crd::crds_yaml());
            Ok(())
        }
        Command::Config {
            command:
                ConfigCommand::Check {
                    config_file,
                    pool_file,
                },
        } => epp::check(config_file.as_deref(), pool_file.as_deref()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infergate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
