use std::process::ExitCode;

fn main() -> ExitCode {
    mlxserver::cli::main()
}
