//! The `yiqiao` binary. See `yiqiao --help` and `cli.rs` for commands and exit codes.

fn main() -> std::process::ExitCode {
    yiqiao_gateway::cli::main()
}
