//! `mlxserver rag add-docs | status | clear`: the document index, worked on directly (the
//! embedding model runs in this process).

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

use super::{CliError, CliResult, RagAddArgs, RagCommand};
use crate::config::{format_bytes, Config};
use crate::rag::ingest::{self, IngestOptions, Progress};
use crate::service::Service;
use crate::{msg, t};

pub fn run(command: RagCommand) -> CliResult {
    let config = super::load_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| CliError(msg!("serve.error.runtime", reason = error)))?;
    runtime.block_on(async move {
        match command {
            RagCommand::AddDocs(args) => add_docs(config, args).await,
            RagCommand::Status => status(config).await,
            RagCommand::Clear { collection, yes } => clear(config, &collection, yes).await,
        }
    })
}

struct Bar(Mutex<Option<ProgressBar>>);

impl Progress for Bar {
    fn start(&self, files: usize) {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(files as u64);
            // The chunk count goes in the prefix, indicatif's ETA (from the files' rate) in {eta}.
            let words = t!("rag.progress", chunks = "{prefix}", eta = "{eta}");
            let template = format!("{{bar:30}} {{pos}}/{{len}} {words}  {{wide_msg}}");
            bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
            bar.set_prefix("0");
            if let Ok(mut slot) = self.0.lock() {
                *slot = Some(bar);
            }
        }
    }

    fn chunks(&self, embedded: usize) {
        if let Ok(slot) = self.0.lock() {
            if let Some(bar) = slot.as_ref() {
                bar.set_prefix(embedded.to_string());
            }
        }
    }

    fn file(&self, path: &Path) {
        if let Ok(slot) = self.0.lock() {
            if let Some(bar) = slot.as_ref() {
                bar.set_message(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
                bar.inc(1);
            }
        }
    }
}

async fn add_docs(config: Config, args: RagAddArgs) -> CliResult {
    let model = args
        .model
        .clone()
        .or_else(|| config.rag.default_embedding_model.clone())
        .ok_or_else(|| CliError(msg!("rag.error.no_model")))?;
    let service = Service::start(config);
    let outcome = async {
        let rag = service.rag().await.map_err(|e| CliError(e.msg()))?;
        let options = IngestOptions { collection: args.collection.clone(), model, chunk_size: args.chunk_size, overlap: args.overlap };
        println!("{}", t!("rag.adding", dir = args.dir.display(), collection = args.collection));
        let bar = Bar(Mutex::new(None));
        let report = ingest::add_folder(rag, &service, &args.dir, &options, &bar).await.map_err(|e| CliError(e.msg()))?;
        if let Ok(slot) = bar.0.lock() {
            if let Some(bar) = slot.as_ref() {
                bar.finish_and_clear();
            }
        }
        println!(
            "{}",
            t!(
                "rag.added",
                files = report.files_added,
                chunks = report.chunks_added,
                unchanged = report.files_unchanged,
                removed = report.files_removed,
                skipped = report.skipped,
                seconds = format!("{:.1}", report.elapsed.as_secs_f64())
            )
        );
        Ok(())
    }
    .await;
    service.shutdown().await;
    outcome
}

async fn status(config: Config) -> CliResult {
    let rag = crate::rag::Rag::open(&config.rag.uri).await.map_err(|e| CliError(e.msg()))?;
    let collections = rag.status().await.map_err(|e| CliError(e.msg()))?;
    if collections.is_empty() {
        println!("{}", t!("rag.status.empty", uri = config.rag.uri));
        return Ok(());
    }
    let mut rows = vec![[
        t!("rag.status.collection"),
        t!("rag.status.model"),
        t!("rag.status.dimension"),
        t!("rag.status.files"),
        t!("rag.status.chunks"),
        t!("rag.status.size"),
    ]];
    for collection in collections {
        rows.push([
            collection.name,
            collection.embedding_model,
            collection.dimension.to_string(),
            collection.files.to_string(),
            collection.chunks.to_string(),
            collection.size_bytes.map(format_bytes).unwrap_or_else(|| "-".into()),
        ]);
    }
    super::models_cmd::print_table(&rows);
    Ok(())
}

async fn clear(config: Config, collection: &str, yes: bool) -> CliResult {
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError(msg!("rag.clear.needs_yes")));
        }
        let confirmed = inquire::Confirm::new(&t!("rag.clear.confirm", collection = collection)).with_default(false).prompt().unwrap_or(false);
        if !confirmed {
            println!("{}", t!("rag.clear.kept"));
            return Ok(());
        }
    }
    let rag = crate::rag::Rag::open(&config.rag.uri).await.map_err(|e| CliError(e.msg()))?;
    if rag.clear(collection).await.map_err(|e| CliError(e.msg()))? {
        println!("{}", t!("rag.clear.done", collection = collection));
    } else {
        println!("{}", t!("rag.clear.missing", collection = collection));
    }
    Ok(())
}
