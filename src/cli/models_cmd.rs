//! Store commands: `pull`, `list`, `ps`, `create`, `show`, `cp`, `rm`. They work on the files
//! directly, so they need no running server; `list` and `ps` also ask a running server which
//! models it has loaded.

use crate::api::ollama_types::{ProcessModel, ProcessResponse};
use super::{CliError, CliResult, CreateArgs, PullArgs, RmArgs, ShowArgs};
use crate::config::{format_bytes, Config};
use crate::engine::ModelKind;
use crate::store::{Entry, Modelfile, Store};
use crate::{msg, t};

fn store(config: &Config) -> Store {
    Store::new(config.models_dir.clone())
}

/// The store for a command that writes to it, with the leftovers of interrupted writers
/// (a pull, copy or quantization that was killed) removed first.
fn store_for_writing(config: &Config) -> Store {
    let store = store(config);
    store.clean_partials();
    store
}

/// Progress bars per file on a terminal; plain status lines otherwise.
struct PullBars {
    bars: indicatif::MultiProgress,
    files: std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
    terminal: bool,
}

impl PullBars {
    fn new() -> Self {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bars = indicatif::MultiProgress::new();
        if !terminal {
            bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        PullBars { bars, files: Default::default(), terminal }
    }

    fn bar(&self, file: &str) -> indicatif::ProgressBar {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files
            .entry(file.to_string())
            .or_insert_with(|| {
                let bar = self.bars.add(indicatif::ProgressBar::new(0));
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{msg:30} {bar:25} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_message(file.to_string());
                bar
            })
            .clone()
    }
}

impl crate::store::pull::PullProgress for PullBars {
    fn status(&self, status: &str) {
        if self.terminal {
            let _ = self.bars.println(t!("pull.status", status = status));
        }
    }
    fn file_started(&self, file: &str, total: u64) {
        self.bar(file).set_length(total);
    }
    fn file_progress(&self, file: &str, completed: u64) {
        let bar = self.bar(file);
        if bar.length().unwrap_or(0) < completed {
            bar.set_length(completed);
        }
        bar.set_position(completed);
    }
    fn file_done(&self, file: &str) {
        self.bar(file).finish();
    }
}

pub fn pull(args: PullArgs) -> CliResult {
    let config = super::load_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| CliError(msg!("serve.error.runtime", reason = error)))?;
    let options = crate::store::pull::PullOptions { name: args.name.clone(), file: args.file.clone(), quantize: args.quantize.map(i32::from), force: args.force };
    let store = store_for_writing(&config);
    let engine = crate::engine::Engine::start(config.engine.clone());
    let bars = PullBars::new();
    println!("{}", t!("pull.started", source = args.source));
    let result = runtime.block_on(crate::store::pull::pull(&store, &engine, &args.source, &options, &bars));
    engine.shutdown();
    let base = result.map_err(|e| CliError(e.msg()))?;
    println!("{}", t!("pull.done", name = base.manifest.name, size = format_bytes(base.manifest.size), format = base.manifest.format.as_str()));
    Ok(())
}

pub fn list() -> CliResult {
    let config = super::load_config()?;
    let entries = store(&config).list().map_err(|e| CliError(e.msg()))?;
    if entries.is_empty() {
        println!("{}", t!("list.empty", dir = config.models_dir.display()));
        return Ok(());
    }
    let mut rows = vec![[t!("list.header.name"), t!("list.header.kind"), t!("list.header.size"), t!("list.header.format"), t!("list.header.base")]];
    for entry in &entries {
        rows.push(match entry {
            Entry::Base(base) => [
                base.manifest.name.clone(),
                match base.manifest.kind {
                    ModelKind::Chat => t!("list.kind.chat"),
                    ModelKind::Embedding => t!("list.kind.embedding"),
                },
                format_bytes(base.manifest.size),
                format!("{}{}", base.manifest.format.as_str(), base.manifest.quantization.as_ref().map(|q| format!(" {q}")).unwrap_or_default()),
                "-".into(),
            ],
            Entry::Personality(personality) => {
                [personality.name.clone(), t!("list.kind.personality"), "-".into(), "-".into(), personality.modelfile.from.clone()]
            }
        });
    }
    print_table(&rows);
    if let Some(loaded) = loaded_models(&config).filter(|loaded| !loaded.models.is_empty()) {
        println!();
        println!("{}", t!("list.loaded"));
        print_loaded(&loaded.models);
    }
    Ok(())
}

/// Prints rows as aligned columns (by display width, so Japanese headers line up).
pub fn print_table<const N: usize>(rows: &[[String; N]]) {
    let width = |text: &str| text.chars().map(|c| if c.is_ascii() { 1 } else { 2 }).sum::<usize>();
    let mut widths = [0usize; N];
    for row in rows {
        for (column, cell) in row.iter().enumerate() {
            widths[column] = widths[column].max(width(cell));
        }
    }
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if column + 1 < N {
                line.push_str(&" ".repeat(widths[column] - width(cell) + 2));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub fn create(args: CreateArgs) -> CliResult {
    let config = super::load_config()?;
    let text = std::fs::read_to_string(&args.file).map_err(|e| CliError(msg!("create.error.read", path = args.file.display(), reason = e)))?;
    let modelfile = Modelfile::parse(&text).map_err(|e| CliError(e.msg()))?;
    let personality = store_for_writing(&config).create_personality(&args.name, modelfile).map_err(|e| CliError(e.msg()))?;
    println!("{}", t!("create.done", name = personality.name, base = personality.modelfile.from));
    Ok(())
}

pub fn show(args: ShowArgs) -> CliResult {
    let config = super::load_config()?;
    let resolved = store(&config).resolve(&args.name).map_err(|e| CliError(e.msg()))?;
    let modelfile = resolved.effective();
    if args.modelfile {
        print!("{}", modelfile.render());
        return Ok(());
    }
    if args.parameters {
        for (name, value) in modelfile.parameters.pairs() {
            println!("{name} {value}");
        }
        return Ok(());
    }
    if args.system {
        println!("{}", modelfile.system.unwrap_or_default());
        return Ok(());
    }
    if args.template {
        println!("{}", modelfile.template.unwrap_or_default());
        return Ok(());
    }
    let manifest = &resolved.base.manifest;
    println!("{}", t!("show.model", name = resolved.name));
    println!("  {}", t!("show.base", base = manifest.name));
    println!("  {}", t!("show.kind", kind = match manifest.kind { ModelKind::Chat => t!("list.kind.chat"), ModelKind::Embedding => t!("list.kind.embedding") }));
    println!("  {}", t!("show.format", format = manifest.format.as_str(), source = manifest.source_format.as_str()));
    println!("  {}", t!("show.size", size = format_bytes(manifest.size)));
    if let Some(family) = resolved.base.family() {
        println!("  {}", t!("show.family", family = family));
    }
    if let Some(labels) = resolved.base.cross_encoder_labels() {
        println!("  {}", t!("show.cross_encoder", labels = labels));
    }
    if let Some(count) = resolved.base.parameter_count() {
        println!("  {}", t!("show.parameters_count", count = crate::api::ollama::parameter_size(count)));
    }
    if let Some(context) = resolved.base.context_length() {
        println!("  {}", t!("show.context", context = context));
    }
    if let Some(quantization) = &manifest.quantization {
        println!("  {}", t!("show.quantization", quantization = quantization));
    }
    println!("  {}", t!("show.source", source = manifest.source));
    if let Some(system) = &modelfile.system {
        println!("{}", t!("show.system"));
        for line in system.lines() {
            println!("  {line}");
        }
    }
    let parameters = modelfile.parameters.pairs();
    if !parameters.is_empty() {
        println!("{}", t!("show.parameters"));
        for (name, value) in parameters {
            println!("  {name} {value}");
        }
    }
    Ok(())
}

pub fn cp(source: &str, destination: &str) -> CliResult {
    let config = super::load_config()?;
    store_for_writing(&config).copy(source, destination).map_err(|e| CliError(e.msg()))?;
    println!("{}", t!("cp.done", source = source, destination = destination));
    Ok(())
}

pub fn rm(args: RmArgs) -> CliResult {
    let config = super::load_config()?;
    let store = store_for_writing(&config);
    for name in &args.names {
        store.remove(name, args.force).map_err(|e| CliError(e.msg()))?;
        println!("{}", t!("rm.done", name = name));
    }
    Ok(())
}

/// Models loaded by the running server, from its `/api/ps` (None when no server answers).
fn loaded_models(config: &Config) -> Option<ProcessResponse> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    runtime.block_on(async { super::client::ServerClient::connect(config).await?.ps().await.ok() })
}

fn print_loaded(models: &[ProcessModel]) {
    let mut rows = vec![[t!("list.header.name"), t!("list.header.size"), t!("ps.header.until"), t!("ps.header.state")]];
    for model in models {
        let until = chrono::DateTime::parse_from_rfc3339(&model.expires_at)
            .map(|at| {
                let left = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
                if left.num_days() > 3650 {
                    t!("ps.forever")
                } else {
                    humantime::format_duration(std::time::Duration::from_secs(left.num_seconds().max(0) as u64)).to_string()
                }
            })
            .unwrap_or_default();
        rows.push([
            model.name.trim_end_matches(":latest").to_string(),
            format_bytes(model.size),
            until,
            if model.busy { t!("ps.busy") } else { t!("ps.idle") },
        ]);
    }
    print_table(&rows);
}

pub fn ps() -> CliResult {
    let config = super::load_config()?;
    match loaded_models(&config) {
        None => println!("{}", t!("ps.no_server")),
        Some(loaded) if loaded.models.is_empty() => println!("{}", t!("ps.none_loaded")),
        Some(loaded) => {
            print_loaded(&loaded.models);
            if let Some(memory) = loaded.memory {
                println!("{}", t!("ps.memory", active = format_bytes(memory.active), peak = format_bytes(memory.peak)));
            }
        }
    }
    Ok(())
}

pub fn quantize(args: super::QuantizeArgs) -> CliResult {
    let config = super::load_config()?;
    let store = store_for_writing(&config);
    let bits: i32 = args.bits.parse().map_err(|_| CliError(msg!("quantize.error.bits", bits = args.bits)))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| CliError(msg!("serve.error.runtime", reason = error)))?;
    let engine = crate::engine::Engine::start(config.engine.clone());
    let result = runtime.block_on(crate::store::quantize(&store, &engine, &args.name, bits, args.group_size, args.output.as_deref()));
    engine.shutdown();
    let (before, after) = result.map_err(|e| CliError(e.msg()))?;
    println!(
        "{}",
        t!("quantize.done", name = after.manifest.name, bits = bits, before = format_bytes(before), after = format_bytes(after.manifest.size))
    );
    Ok(())
}
