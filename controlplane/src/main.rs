//! `gateway`: the API gateway binary. Parses the command line and hands over to the control
//! plane, which loads the config, starts the data-plane workers and handles signals.

use controlplane::cli::{self, Command, SYNOPSIS, USAGE};

fn main() {
    let code = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            0
        }
        Ok(Command::Version) => {
            println!("gateway {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Check(path)) => controlplane::check(&path),
        Ok(Command::Run(args)) => controlplane::run(args),
        Err(e) => {
            eprintln!("gateway: {e}\n{SYNOPSIS}");
            controlplane::EXIT_INVALID
        }
    };
    std::process::exit(code);
}
