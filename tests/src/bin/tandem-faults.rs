//! `tandem-faults`: the fault campaign (see `tandem_tests::faults`). Runs a
//! primary, standbys and a real BDB workload, injects random faults round
//! after round, checks Tandem's promises after each, prints a table and
//! exits 1 on any violation. Build the binaries first (`scripts/faults`
//! does).

use std::process::ExitCode;

use tandem_tests::faults::{self, Config};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem-faults: {e:#}");
            return ExitCode::from(2);
        }
    };
    faults::stop_on_signals();
    match faults::run(cfg) {
        Ok(report) => {
            print!("{}", faults::render(&report));
            if report.violations.is_empty() && report.error.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("tandem-faults: {e:#}");
            ExitCode::FAILURE
        }
    }
}
