//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mlxserver");

/// A fresh home folder for one test.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        Home { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.path().join("config.toml"), text).expect("write config");
    }

    /// The binary with this home and a clean environment (no MLXSERVER_* leaking in).
    pub fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        for (key, _) in std::env::vars() {
            if key.starts_with("MLXSERVER_") && key != "MLXSERVER_TEST_MODELS" {
                command.env_remove(key);
            }
        }
        command.env("MLXSERVER_HOME", self.path()).env("RUST_LOG", "warn").env("NO_COLOR", "1");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).stdin(Stdio::null()).output().expect("run mlxserver")
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Waits until `condition` holds, or panics after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > timeout {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `mlxserver serve` process, killed if the test ends without stopping it.
pub struct ServerProcess {
    pub child: Child,
    pub port: u16,
}

impl ServerProcess {
    pub fn start(home: &Home, extra: &[&str]) -> ServerProcess {
        let port = free_port();
        let port_text = port.to_string();
        let mut args = vec!["serve", "--port", port_text.as_str()];
        args.extend_from_slice(extra);
        let child = home.command().args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn serve");
        let server = ServerProcess { child, port };
        wait_for("the server to listen", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn target_dir() -> PathBuf {
    // tests run with the cwd at the crate root; keep artifacts next to the build output.
    let exe = PathBuf::from(BIN);
    exe.parent().map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir)
}
