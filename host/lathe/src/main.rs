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
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
