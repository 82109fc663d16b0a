//! `infergate demo`: the built-in scenario docs/scenarios/demo.yaml (compiled in), run in
//! real time through round robin and through `infergate serve`, with a verdict per stage.

use std::path::PathBuf;

use clap::Args;

use crate::scenario::{self, Scenario};

/// The demo's scenario; the file in docs/ is the same text, so `infergate bench scenario
/// docs/scenarios/demo.yaml` runs the same thing.
const DEMO_YAML: &str = include_str!("../../../docs/scenarios/demo.yaml");

/// Flags of `infergate demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory for report.json, report.md, ttft-p90.svg and run.json (created if missing).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Run on the virtual clock instead (a few seconds; no processes, no sockets).
    #[arg(long = "virtual")]
    pub virtual_clock: bool,
    /// Print the built-in scenario and exit.
    #[arg(long)]
    pub print_scenario: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.print_scenario {
        print!("{DEMO_YAML}");
        return Ok(());
    }
    let scn = Scenario::from_yaml(DEMO_YAML, "built-in demo scenario")?;
    eprintln!(
        "infergate demo: {} simulated {} replicas, {} QPS stages of {} s each, first through \
         client-side round robin, then through `infergate serve` (about 90 s in all)",
        scn.replicas,
        scn.profile,
        scn.qps.len(),
        scn.stage_seconds
    );
    let outcome = scenario::run_scenario(&scn, args.virtual_clock, &args.out)?;
    let verdicts = scenario::verdicts(&outcome.rows);
    if !verdicts.is_empty() {
        println!();
        println!("Verdict (p90 time to first token, against round robin):");
        for v in verdicts {
            println!("  {v}");
        }
    }
    for r in outcome.routers.iter().filter(|r| r.status != "ran") {
        println!(
            "  {} skipped: {}",
            r.router,
            r.reason.as_deref().unwrap_or("?")
        );
    }
    println!();
    println!(
        "Chart: {}  Table: {}  Data: {}  ({:.0} s)",
        args.out.join("ttft-p90.svg").display(),
        args.out.join("report.md").display(),
        args.out.join("report.json").display(),
        outcome.wall_seconds
    );
    Ok(())
}
