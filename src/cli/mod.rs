//! The `mlxserver` command line: clap definitions and dispatch.
//!
//! Every line printed here comes from the i18n catalogs (`t!`). Errors print as one line in
//! the chosen language and the process exits non-zero; panics are turned into that same
//! one-line form by the hook set in [`run`].

pub mod client;
mod config_cmd;
mod models_cmd;
mod rag_cmd;
mod run_cmd;
mod server_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{self, Config};
use crate::i18n::{self, Lang, Msg};
use crate::{msg, t};

/// A local AI model server on MLX.
#[derive(Debug, Parser)]
#[command(name = "mlxserver", version, about, disable_help_subcommand = true)]
pub struct Cli {
    /// Language of messages (en or ja); overrides `language` in the config.
    #[arg(long, global = true, value_name = "LANG")]
    pub lang: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show or change the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Start the server (in the foreground unless --detach).
    Serve(ServeArgs),
    /// Stop a running server.
    Stop,
    /// Download a model from Hugging Face (or register a local GGUF file or folder).
    Pull(PullArgs),
    /// List models, personalities and loaded models.
    #[command(alias = "ls")]
    List,
    /// List the models loaded by the running server.
    Ps,
    /// Create a personality from a Modelfile.
    Create(CreateArgs),
    /// Show a model or personality.
    Show(ShowArgs),
    /// Copy a model or personality.
    Cp { source: String, destination: String },
    /// Remove models or personalities.
    Rm(RmArgs),
    /// Quantize a model to 2, 4 or 8 bits.
    Quantize(QuantizeArgs),
    /// Chat with a model in the terminal.
    Run(RunArgs),
    /// Manage the document index used for retrieval-augmented generation.
    #[command(subcommand)]
    Rag(RagCommand),
    /// Print the OpenAPI document of the server.
    #[command(hide = true)]
    Openapi,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Interactive set-up: language, model folder, host, port, API key.
    Setup,
    /// Print the effective configuration (API key masked).
    Show,
    /// Set one key, e.g. `config set port 8080`.
    Set { key: String, value: String },
    /// Print the path of the configuration file.
    Path,
}

#[derive(Debug, Args, Default, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on.
    #[arg(long)]
    pub port: Option<u16>,
    /// Require this API key.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Folder of the model store.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Run in the background and return once the server answers.
    #[arg(long)]
    pub detach: bool,
    /// Log level (error, warn, info, debug, trace); RUST_LOG takes precedence.
    #[arg(long)]
    pub log_level: Option<String>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// `owner/repo[:revision]`, a path to a .gguf file, or a path to a model folder.
    pub source: String,
    /// Name to register the model under.
    #[arg(long)]
    pub name: Option<String>,
    /// Which GGUF file of the repository to take.
    #[arg(long)]
    pub file: Option<String>,
    /// Quantize while converting (4 or 8 bits).
    #[arg(long)]
    pub quantize: Option<u8>,
    /// Replace a model of the same name that came from another source.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub name: String,
    /// The Modelfile.
    #[arg(short = 'f', long = "file", default_value = "Modelfile")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub name: String,
    #[arg(long)]
    pub modelfile: bool,
    #[arg(long)]
    pub parameters: bool,
    #[arg(long)]
    pub system: bool,
    #[arg(long)]
    pub template: bool,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Remove a base model even if personalities use it.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    pub name: String,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["2", "4", "8"]))]
    pub bits: String,
    #[arg(long, default_value_t = 64, value_parser = clap::builder::PossibleValuesParser::new(["32", "64", "128"]).map(|v| v.parse::<i32>().unwrap_or(64)))]
    pub group_size: i32,
    /// Name of the new model (default NAME-<bits>bit).
    #[arg(long)]
    pub output: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model or personality.
    pub name: String,
    /// Ask one question and exit.
    pub prompt: Option<String>,
    /// Answer from the RAG index.
    #[arg(long)]
    pub rag: bool,
    /// Embedding model of the RAG index.
    #[arg(long)]
    pub embedding_model: Option<String>,
    /// RAG collection.
    #[arg(long)]
    pub collection: Option<String>,
    /// System prompt for this chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Print timings after each answer.
    #[arg(long)]
    pub verbose: bool,
}

#[derive(Debug, Subcommand)]
pub enum RagCommand {
    /// Index the documents of a folder.
    AddDocs(RagAddArgs),
    /// Show the collections of the index.
    Status,
    /// Delete a collection.
    Clear {
        #[arg(long, default_value = "default")]
        collection: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct RagAddArgs {
    pub dir: PathBuf,
    /// Embedding model.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value = "default")]
    pub collection: String,
    /// Chunk size in tokens.
    #[arg(long, default_value_t = 256)]
    pub chunk_size: usize,
    /// Overlap between chunks in tokens.
    #[arg(long, default_value_t = 32)]
    pub overlap: usize,
}

/// An error the CLI reports as one line.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.0)]
pub struct CliError(pub Msg);

impl From<config::ConfigError> for CliError {
    fn from(error: config::ConfigError) -> Self {
        CliError(error.msg())
    }
}

pub type CliResult = Result<(), CliError>;

/// Parses the language flag or falls back to the configured one.
fn choose_language(flag: Option<&str>, configured: Lang) -> Result<Lang, CliError> {
    match flag {
        Some(code) => code
            .parse()
            .map_err(|value: String| CliError(msg!("cli.error.bad_language", value = value))),
        None => Ok(configured),
    }
}

/// Loads the configuration, reporting a migration from the legacy JSON file.
pub(crate) fn load_config() -> Result<Config, CliError> {
    let (config, report) = config::load()?;
    if let Some(legacy) = report.migrated_from {
        eprintln!("{}", t!("config.migrated", path = legacy.display(), target = config.config_path().display()));
    }
    Ok(config)
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let detail = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(%detail, %location, "internal error");
        eprintln!("{}", t!("cli.error.internal", detail = detail));
    }));
}

/// The language to speak before arguments are parsed: `--lang` on the command line, else the
/// configured one.
fn early_language() -> Lang {
    let args: Vec<String> = std::env::args().collect();
    let flag = args.iter().enumerate().find_map(|(index, arg)| {
        arg.strip_prefix("--lang=").map(str::to_string).or_else(|| (arg == "--lang").then(|| args.get(index + 1).cloned()).flatten())
    });
    if let Some(lang) = flag.and_then(|code| code.parse().ok()) {
        return lang;
    }
    if let Some(lang) = std::env::var("MLXSERVER_LANGUAGE").ok().and_then(|code| code.parse().ok()) {
        return lang;
    }
    config::home_dir().ok().and_then(|home| config::peek_language(&home)).unwrap_or_default()
}

/// Replaces the help texts of `command` and its subcommands with catalog entries named
/// `help.<path>` (`help.serve`, `help.serve.port`), so `--help` speaks the user's language.
pub fn localize(mut command: clap::Command, path: &str) -> clap::Command {
    let lang = i18n::language();
    let about_key = if path.is_empty() { "help.mlxserver".to_string() } else { format!("help.{path}") };
    command = command.about(i18n::render(lang, &about_key, &[]));
    let arg_ids: Vec<String> = command
        .get_arguments()
        .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version"))
        .map(|arg| arg.get_id().to_string())
        .collect();
    for id in arg_ids {
        let key = if path.is_empty() { format!("help.arg.{id}") } else { format!("help.{path}.{id}") };
        let text = i18n::render(lang, &key, &[]);
        command = command.mut_arg(id.as_str(), |arg| arg.help(text));
    }
    let names: Vec<String> = command.get_subcommands().map(|sub| sub.get_name().to_string()).collect();
    for name in names {
        let sub_path = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
        command = command.mut_subcommand(name.as_str(), |sub| localize(sub, &sub_path));
    }
    command
}

/// The entry point of the binary: parse (with localized help), run, exit code.
pub fn main() -> ExitCode {
    crate::engine::device::reexec_with_better_blas();
    i18n::set_language(early_language());
    let command = localize(Cli::command(), "");
    let matches = match command.try_get_matches() {
        Ok(matches) => matches,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match Cli::from_arg_matches(&matches) {
        Ok(cli) => run(cli),
        Err(error) => {
            let _ = error.print();
            ExitCode::from(2)
        }
    }
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    install_panic_hook();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", t!("cli.error.line", message = error.0.localized()));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> CliResult {
    if let Command::Openapi = cli.command {
        println!("{}", crate::api::docs::openapi_json());
        return Ok(());
    }
    if let Some(code) = cli.lang.as_deref() {
        i18n::set_language(choose_language(Some(code), i18n::language())?);
    }
    match cli.command {
        Command::Config(command) => config_cmd::run(command),
        Command::Serve(args) => server_cmd::serve(args),
        Command::Stop => server_cmd::stop(),
        Command::Openapi => Ok(()),
        Command::Pull(args) => models_cmd::pull(args),
        Command::List => models_cmd::list(),
        Command::Create(args) => models_cmd::create(args),
        Command::Show(args) => models_cmd::show(args),
        Command::Cp { source, destination } => models_cmd::cp(&source, &destination),
        Command::Rm(args) => models_cmd::rm(args),
        Command::Run(args) => run_cmd::run(args),
        Command::Rag(command) => rag_cmd::run(command),
        Command::Ps => models_cmd::ps(),
        Command::Quantize(args) => models_cmd::quantize(args),
    }
}
