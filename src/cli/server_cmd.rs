//! `mlxserver serve [--detach]` and `mlxserver stop`, with the pid file that ties them together.

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{CliError, CliResult, ServeArgs};
use crate::api::AppState;
use crate::config::{self, Config};
use crate::{msg, server, t};

/// What the pid file records about a running server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PidFile {
    pub pid: u32,
    pub address: String,
    pub url: String,
}

impl PidFile {
    pub fn read(path: &Path) -> Option<PidFile> {
        let text = fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok().or_else(|| {
            // A bare number, as the Python mlxserver wrote it.
            text.trim().parse().ok().map(|pid| PidFile { pid, address: String::new(), url: String::new() })
        })
    }
}

/// Whether `pid` is a live process (zombies count as gone: a stopped server whose parent has
/// not reaped it yet is no longer serving).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else { return false };
    if pid_t <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(pid_t, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(true),
        Err(_) => true,
    }
}

fn apply_flags(config: &mut Config, args: &ServeArgs) -> Result<(), CliError> {
    if let Some(host) = &args.host {
        config.set("host", host)?;
    }
    if let Some(port) = args.port {
        config.set("port", &port.to_string())?;
    }
    if let Some(key) = &args.api_key {
        config.set("api_key", key)?;
    }
    if let Some(dir) = &args.models_dir {
        config.models_dir = dir.clone();
    }
    Ok(())
}

fn init_tracing(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

pub fn serve(args: ServeArgs) -> CliResult {
    let mut config = super::load_config()?;
    apply_flags(&mut config, &args)?;
    let pid_path = config.pid_path();
    if let Some(existing) = PidFile::read(&pid_path) {
        if process_alive(existing.pid) && existing.pid != std::process::id() {
            return Err(CliError(msg!("serve.error.already_running", pid = existing.pid, url = existing.url)));
        }
        let _ = fs::remove_file(&pid_path);
    }
    if args.detach {
        return detach(&config, &args);
    }
    init_tracing(args.log_level.as_deref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| CliError(msg!("serve.error.runtime", reason = error)))?;
    runtime.block_on(serve_foreground(config))
}

async fn serve_foreground(config: Config) -> CliResult {
    let address = format!("{}:{}", config.host, config.port);
    let listener = match tokio::net::TcpListener::bind(&address).await {
        Ok(listener) => listener,
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(CliError(msg!("serve.error.port_in_use", address = address)));
        }
        Err(error) => return Err(CliError(msg!("serve.error.bind", address = address, reason = error))),
    };
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or(address);
    let pid_path = config.pid_path();
    let record = PidFile { pid: std::process::id(), address: local.clone(), url: config.server_url() };
    let record_json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    config::write_atomic(&pid_path, &record_json)
        .map_err(|error| CliError(msg!("serve.error.pid_file", path = pid_path.display(), reason = error)))?;
    if config.api_key.is_none() && !is_loopback(&config.host) {
        tracing::warn!(host = %config.host, "listening beyond this machine without an API key");
    }
    eprintln!("{}", t!("server.listening", address = local));
    let drain = config.shutdown_timeout;
    let state = AppState::new(config);
    let outcome = server::run(listener, state.clone(), server::shutdown_signal(), drain).await;
    state.service.shutdown().await;
    // Remove the pid file only if it is still ours.
    if PidFile::read(&pid_path).is_some_and(|current| current.pid == std::process::id()) {
        let _ = fs::remove_file(&pid_path);
    }
    eprintln!("{}", t!("server.stopped"));
    outcome.map_err(|error| CliError(msg!("serve.error.io", reason = error)))
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1") || host.starts_with("127.")
}

/// Starts `serve` again as a background process in its own session, then waits until it
/// answers (or reports why it could not start).
fn detach(config: &Config, args: &ServeArgs) -> CliResult {
    let exe = std::env::current_exe().map_err(|error| CliError(msg!("serve.error.spawn", reason = error)))?;
    fs::create_dir_all(&config.home).map_err(|error| CliError(msg!("serve.error.spawn", reason = error)))?;
    let log_path = config.log_path();
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|error| CliError(msg!("serve.error.log_file", path = log_path.display(), reason = error)))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_err = log.try_clone().map_err(|error| CliError(msg!("serve.error.spawn", reason = error)))?;
    let mut command = Command::new(exe);
    command.arg("--lang").arg(crate::i18n::language().code()).arg("serve");
    if let Some(host) = &args.host {
        command.arg("--host").arg(host);
    }
    if let Some(port) = args.port {
        command.arg("--port").arg(port.to_string());
    }
    if let Some(key) = &args.api_key {
        command.arg("--api-key").arg(key);
    }
    if let Some(dir) = &args.models_dir {
        command.arg("--models-dir").arg(dir);
    }
    if let Some(level) = &args.log_level {
        command.arg("--log-level").arg(level);
    }
    command.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log_err));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe; it detaches the server from this terminal so
        // closing it (SIGHUP) does not stop the server.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let mut child = command.spawn().map_err(|error| CliError(msg!("serve.error.spawn", reason = error)))?;
    let address = format!("{}:{}", connect_host(&config.host), config.port);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(_status)) = child.try_wait() {
            let reason = last_log_line(&log_path, log_start).unwrap_or_default();
            return Err(CliError(msg!("serve.error.detached_failed", reason = reason, log = log_path.display())));
        }
        let ours = PidFile::read(&config.pid_path()).is_some_and(|record| record.pid == child.id());
        if ours && TcpStream::connect_timeout(&address.parse().unwrap_or_else(|_| ([127, 0, 0, 1], config.port).into()), Duration::from_millis(200)).is_ok() {
            println!("{}", t!("serve.detached", pid = child.id(), url = config.server_url(), log = log_path.display()));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(CliError(msg!("serve.error.detached_timeout", log = log_path.display())))
}

fn connect_host(host: &str) -> &str {
    match host {
        "0.0.0.0" | "" | "localhost" => "127.0.0.1",
        "::" => "::1",
        other => other,
    }
}

fn last_log_line(path: &Path, from: u64) -> Option<String> {
    let bytes = fs::read(path).ok()?;
    let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).lines().rev().find(|line| !line.trim().is_empty()).map(str::to_string)
}

pub fn stop() -> CliResult {
    let config = super::load_config()?;
    let pid_path = config.pid_path();
    let Some(record) = PidFile::read(&pid_path) else {
        println!("{}", t!("stop.not_running"));
        return Ok(());
    };
    if !process_alive(record.pid) {
        let _ = fs::remove_file(&pid_path);
        println!("{}", t!("stop.stale", pid = record.pid));
        return Ok(());
    }
    let pid = libc::pid_t::try_from(record.pid).map_err(|_| CliError(msg!("stop.error.signal", pid = record.pid, reason = "pid out of range")))?;
    // SAFETY: sending SIGTERM to a pid we read from our own pid file.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let reason = std::io::Error::last_os_error();
        return Err(CliError(msg!("stop.error.signal", pid = record.pid, reason = reason)));
    }
    println!("{}", t!("stop.stopping", pid = record.pid));
    let deadline = config.shutdown_timeout + Duration::from_secs(10);
    let started = Instant::now();
    while process_alive(record.pid) {
        if started.elapsed() > deadline {
            // SAFETY: as above; the server ignored SIGTERM past its own drain deadline.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = fs::remove_file(&pid_path);
            println!("{}", t!("stop.killed", pid = record.pid));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if PidFile::read(&pid_path).is_some_and(|current| current.pid == record.pid) {
        let _ = fs::remove_file(&pid_path);
    }
    println!("{}", t!("stop.stopped"));
    Ok(())
}
