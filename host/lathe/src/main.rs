//! `lathe`: the command line. Thin: parse arguments, set up threads and the device, call
//! the libraries.

mod bench;
mod cli;
mod data;
mod demo;
mod eval;
mod pack;
mod plugin;
mod render;
mod serve;
mod train;

use clap::Parser;

fn main() {
    end_quietly_when_stdout_closes();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A command whose reader has gone (`lathe generate ... | head -c 40`) ends at its next
/// printed line with status 0, as `rg` does, and says nothing: Rust ignores SIGPIPE, so
/// `println!` to the closed pipe panics instead, and the panic message would be all the
/// user saw. Every other panic goes to the default hook.
fn end_quietly_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied()).unwrap_or("");
        // std's print macros panic with "failed printing to stdout: Broken pipe (os error 32)".
        if message.starts_with("failed printing to stdout") && message.to_ascii_lowercase().contains("broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}
