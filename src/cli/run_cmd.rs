//! `mlxserver run NAME [PROMPT]`: chat in the terminal, answers printed as they are generated.
//!
//! With a server running (config host/port, API key) the chat goes through its `/api/chat`,
//! so the model stays loaded between runs; otherwise the model is loaded in this process.
//! Interactive mode has a line editor with history, `"""` blocks, Ollama's slash commands,
//! Ctrl-C to stop an answer and Ctrl-D or `/bye` to leave. With a prompt argument, or a
//! prompt piped on stdin, it answers once and exits, printing only the answer.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rustyline::error::ReadlineError;
use serde_json::{json, Value};

use super::{CliError, CliResult, RunArgs};
use crate::config::Config;
use super::client::{ChatLine, ClientError, ServerClient};
use crate::answer::{AnswerEvent, ApiFamily, ChatMessage, ChatRequest, Options, RagOptions};
use crate::api::ollama_types;
use crate::rag::Source;
use crate::service::Service;
use crate::store::Parameters;
use crate::{msg, t};

fn spinner(message: String) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

/// What one answer reports at its end.
#[derive(Debug, Default, Clone)]
struct Answer {
    text: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    load: Duration,
    prompt_eval: Duration,
    eval: Duration,
    sources: Vec<Source>,
    interrupted: bool,
}

/// Where answers come from.
enum Backend {
    Remote(ServerClient),
    Local(Service),
}

impl Backend {
    /// Sends the conversation and prints the answer as it arrives. Ctrl-C stops it.
    async fn answer(&self, model: &str, messages: &[ChatMessage], parameters: &Parameters, rag: Option<&RagOptions>, think: Option<bool>, out: &mut dyn Write) -> Result<Answer, CliError> {
        let mut answer = Answer::default();
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);
        match self {
            Backend::Remote(client) => {
                let request = ollama_types::ChatRequest {
                    model: model.to_string(),
                    messages: messages.iter().map(|m| ollama_types::Message { role: m.role.clone(), ..ollama_types::Message::assistant(m.content.clone()) }).collect(),
                    stream: Some(true),
                    options: Some(ollama_types::Options::from_parameters(parameters)),
                    rag: rag.map(|rag| serde_json::to_value(rag).unwrap_or_default()),
                    think,
                    ..Default::default()
                };
                let server_error = |e: ClientError| CliError(msg!("run.error.server", reason = e));
                let lines = client.chat(&request).await.map_err(server_error)?;
                futures::pin_mut!(lines);
                loop {
                    let line = tokio::select! {
                        line = lines.next() => line,
                        _ = &mut interrupt => { answer.interrupted = true; break; }
                    };
                    let piece = match line {
                        None => break,
                        Some(Err(error)) => return Err(server_error(error)),
                        Some(Ok(ChatLine::Error { error })) => return Err(CliError(msg!("run.error.server", reason = error))),
                        Some(Ok(ChatLine::Piece(piece))) => piece,
                    };
                    if let Some(thinking) = piece.message.thinking.as_deref().filter(|t| !t.is_empty()) {
                        // Thinking is shown dimmed and kept out of the history.
                        let _ = write!(out, "\x1b[2m{thinking}\x1b[0m");
                    }
                    if !piece.message.content.is_empty() {
                        answer.text.push_str(&piece.message.content);
                        let _ = write!(out, "{}", piece.message.content);
                    }
                    let _ = out.flush();
                    if piece.done {
                        let nanos = |value: Option<u64>| Duration::from_nanos(value.unwrap_or(0));
                        answer.prompt_tokens = piece.metrics.prompt_eval_count.unwrap_or(0);
                        answer.completion_tokens = piece.metrics.eval_count.unwrap_or(0);
                        answer.load = nanos(piece.metrics.load_duration);
                        answer.prompt_eval = nanos(piece.metrics.prompt_eval_duration);
                        answer.eval = nanos(piece.metrics.eval_duration);
                        answer.sources = piece.rag.as_ref().and_then(|rag| serde_json::from_value(rag["sources"].clone()).ok()).unwrap_or_default();
                    }
                }
            }
            Backend::Local(service) => {
                let request = ChatRequest {
                    model: model.to_string(),
                    messages: messages.to_vec(),
                    options: Options::new(ApiFamily::Native, parameters.clone()),
                    rag: rag.cloned(),
                    think,
                    ..Default::default()
                };
                let mut generation = service.chat(request).await.map_err(|e| CliError(e.msg()))?;
                answer.load = generation.load_duration;
                answer.sources = generation.sources.clone().unwrap_or_default();
                loop {
                    let event = tokio::select! {
                        event = generation.next() => event,
                        _ = &mut interrupt => { answer.interrupted = true; break; }
                    };
                    match event {
                        Some(AnswerEvent::Text { text, .. }) => {
                            if !text.is_empty() {
                                answer.text.push_str(&text);
                                let _ = write!(out, "{text}");
                                let _ = out.flush();
                            }
                        }
                        Some(AnswerEvent::Reasoning(text)) if think != Some(false) => {
                            // Thinking is shown dimmed and kept out of the history.
                            let _ = write!(out, "\x1b[2m{text}\x1b[0m");
                            let _ = out.flush();
                        }
                        Some(AnswerEvent::Reasoning(_)) | Some(AnswerEvent::ToolCalls(_)) => {}
                        Some(AnswerEvent::Done(done)) => {
                            answer.prompt_tokens = done.usage.prompt_tokens;
                            answer.completion_tokens = done.usage.completion_tokens;
                            answer.prompt_eval = done.prompt_eval;
                            answer.eval = done.eval;
                            break;
                        }
                        Some(AnswerEvent::Error(error)) => return Err(CliError(error.msg())),
                        None => break,
                    }
                }
            }
        }
        Ok(answer)
    }

    /// The model's details for `/show`.
    async fn show(&self, model: &str) -> Result<Value, CliError> {
        match self {
            Backend::Remote(client) => {
                let shown = client.show(model).await.map_err(|e| CliError(msg!("run.error.server", reason = e)))?;
                Ok(serde_json::to_value(shown).unwrap_or_default())
            }
            Backend::Local(service) => {
                let resolved = service.resolve(model).map_err(|e| CliError(e.msg()))?;
                let modelfile = resolved.effective();
                Ok(json!({
                    "modelfile": modelfile.render(),
                    "parameters": modelfile.parameters.pairs().into_iter().map(|(n, v)| format!("{n} {v}")).collect::<Vec<_>>().join("\n"),
                    "system": modelfile.system,
                    "details": {"format": resolved.base.manifest.format.as_str(), "quantization_level": resolved.base.manifest.quantization},
                    "model_info": {"context_length": resolved.base.context_length(), "mlxserver.base_model": resolved.base.manifest.name},
                }))
            }
        }
    }
}

fn print_timings(answer: &Answer) {
    let rate = |count: usize, time: Duration| if time.is_zero() { 0.0 } else { count as f64 / time.as_secs_f64() };
    eprintln!("{}", t!("run.verbose.load", seconds = format!("{:.3}", answer.load.as_secs_f64())));
    eprintln!("{}", t!("run.verbose.prompt", count = answer.prompt_tokens, rate = format!("{:.1}", rate(answer.prompt_tokens, answer.prompt_eval))));
    eprintln!("{}", t!("run.verbose.eval", count = answer.completion_tokens, rate = format!("{:.1}", rate(answer.completion_tokens, answer.eval))));
}

fn print_sources(sources: &[Source]) {
    if sources.is_empty() {
        return;
    }
    println!("{}", t!("run.sources"));
    for source in sources {
        println!("  [{}] {} ({:.2})", source.index, source.source, source.score);
    }
}

struct Session {
    backend: Backend,
    model: String,
    system: Option<String>,
    parameters: Parameters,
    history: Vec<ChatMessage>,
    rag: Option<RagOptions>,
    verbose: bool,
    /// The model's own context length.
    context_length: usize,
    /// The window of a request that sets no num_ctx (`context_length` in the config).
    configured_context: usize,
    /// `/set think` / `/set nothink`: reasoning models think (shown dimmed) or not.
    think: Option<bool>,
}

impl Session {
    fn messages(&self, prompt: &str) -> Vec<ChatMessage> {
        let mut messages = Vec::with_capacity(self.history.len() + 2);
        if let Some(system) = &self.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.extend(self.history.iter().cloned());
        messages.push(ChatMessage::new("user", prompt));
        messages
    }

    /// Asks one question; keeps the turn unless it was interrupted.
    async fn ask(&mut self, prompt: &str) -> CliResult {
        let messages = self.messages(prompt);
        let mut stdout = std::io::stdout();
        let answer = self.backend.answer(&self.model, &messages, &self.parameters, self.rag.as_ref(), self.think, &mut stdout).await?;
        if answer.interrupted {
            println!();
            eprintln!("{}", t!("run.interrupted"));
            return Ok(());
        }
        if !answer.text.ends_with('\n') {
            println!();
        }
        print_sources(&answer.sources);
        if self.verbose {
            print_timings(&answer);
        }
        self.history.push(ChatMessage::new("user", prompt));
        self.history.push(ChatMessage::new("assistant", answer.text));
        // Keep the conversation inside the window the server gives this request (the same
        // policy as every API): drop the oldest turns, with a notice.
        let context = crate::answer::prompt::context_window(&self.parameters, self.configured_context, self.context_length);
        let used = answer.prompt_tokens + answer.completion_tokens;
        if used * 4 > context * 3 && self.history.len() > 2 {
            let dropped = self.history.len().min(2);
            self.history.drain(..dropped);
            eprintln!("{}", t!("run.context_trimmed", used = used, context = context));
        }
        Ok(())
    }

    async fn command(&mut self, line: &str) -> Result<bool, CliError> {
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or_default();
        match command {
            "/bye" | "/exit" => return Ok(false),
            "/clear" => {
                self.history.clear();
                println!("{}", t!("run.cleared"));
            }
            "/help" | "/?" => println!("{}", t!("run.help")),
            "/set" => match words.next() {
                Some("parameter") => {
                    let (Some(name), Some(value)) = (words.next(), words.next()) else {
                        println!("{}", t!("run.set.usage"));
                        return Ok(true);
                    };
                    let mut updated = self.parameters.clone();
                    if name == "stop" {
                        updated.stop.clear();
                    }
                    match updated.set(name, value) {
                        Ok(()) => {
                            self.parameters = updated;
                            println!("{}", t!("run.set.parameter", name = name, value = value));
                        }
                        Err(reason) => println!("{}", t!("run.set.invalid", reason = reason)),
                    }
                }
                Some(switch @ ("think" | "nothink")) => {
                    self.think = Some(switch == "think");
                    println!("{}", if switch == "think" { t!("run.set.think") } else { t!("run.set.nothink") });
                }
                Some("system") => {
                    let text = line.splitn(3, char::is_whitespace).nth(2).unwrap_or_default().trim();
                    let text = text.trim_matches('"').to_string();
                    self.system = (!text.is_empty()).then_some(text);
                    println!("{}", t!("run.set.system"));
                }
                _ => println!("{}", t!("run.set.usage")),
            },
            "/show" => {
                let info = self.backend.show(&self.model).await?;
                match words.next() {
                    Some("modelfile") => println!("{}", info["modelfile"].as_str().unwrap_or_default()),
                    Some("parameters") => {
                        let mut parameters = Parameters::default();
                        for line in info["parameters"].as_str().unwrap_or_default().lines() {
                            if let Some((name, value)) = line.split_once(' ') {
                                let _ = parameters.set(name, value.trim_matches('"'));
                            }
                        }
                        parameters.overlay(&self.parameters);
                        for (name, value) in parameters.pairs() {
                            println!("{name} {value}");
                        }
                    }
                    Some("system") => {
                        let system = self.system.clone().or_else(|| info["system"].as_str().map(str::to_string)).unwrap_or_default();
                        println!("{system}");
                    }
                    Some("info") | None => {
                        println!("{}", t!("show.model", name = self.model));
                        println!("  {}", t!("show.base", base = info["model_info"]["mlxserver.base_model"].as_str().unwrap_or_default()));
                        println!("  {}", t!("show.format", format = info["details"]["format"].as_str().unwrap_or_default(), source = info["details"]["format"].as_str().unwrap_or_default()));
                        if let Some(q) = info["details"]["quantization_level"].as_str() {
                            println!("  {}", t!("show.quantization", quantization = q));
                        }
                        println!("  {}", t!("run.show.context", context = self.context_length));
                    }
                    Some(_) => println!("{}", t!("run.show.usage")),
                }
            }
            _ => println!("{}", t!("run.unknown_command", command = command)),
        }
        Ok(true)
    }
}

pub fn run(args: RunArgs) -> CliResult {
    let config = super::load_config()?;
    let stdin_prompt = if args.prompt.is_none() && !std::io::stdin().is_terminal() {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| CliError(msg!("run.error.stdin", reason = e)))?;
        Some(text)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| CliError(msg!("serve.error.runtime", reason = error)))?;
    runtime.block_on(async move {
        let backend = match ServerClient::connect(&config).await {
            Some(client) => Backend::Remote(client),
            None => {
                eprintln!("{}", t!("run.in_process"));
                Backend::Local(Service::start(config.clone()))
            }
        };
        let rag = if args.rag {
            Some(RagOptions { collection: args.collection.clone(), embedding_model: args.embedding_model.clone().or_else(|| config.rag.default_embedding_model.clone()), ..Default::default() })
        } else {
            None
        };
        let context_length = crate::store::Store::new(config.models_dir.clone())
            .resolve(&args.name)
            .ok()
            .and_then(|r| r.base.context_length())
            .unwrap_or(4096);
        let mut session = Session { backend, model: args.name.clone(), system: args.system.clone(), parameters: Parameters::default(), history: Vec::new(), rag, verbose: args.verbose, context_length, configured_context: config.context_length, think: None };
        let outcome = match args.prompt.clone().or(stdin_prompt) {
            Some(prompt) => one_shot(&mut session, &prompt).await,
            None => interactive(&mut session, &config).await,
        };
        if let Backend::Local(service) = &session.backend {
            service.shutdown().await;
        }
        outcome
    })
}

async fn one_shot(session: &mut Session, prompt: &str) -> CliResult {
    if prompt.trim().is_empty() {
        return Err(CliError(msg!("run.error.empty_prompt")));
    }
    session.ask(prompt.trim_end()).await
}

/// Loads the model before the first question, with a spinner.
async fn warm_up(session: &Session) -> CliResult {
    let bar = spinner(t!("run.loading", name = session.model));
    let outcome = match &session.backend {
        Backend::Remote(client) => client.load(&session.model).await.map_err(|e| CliError(msg!("run.error.server", reason = e))),
        Backend::Local(service) => match service.resolve(&session.model) {
            Ok(resolved) => service.lease(&resolved, None).await.map(drop).map_err(|e| CliError(e.msg())),
            Err(error) => Err(CliError(error.msg())),
        },
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    outcome
}

async fn interactive(session: &mut Session, config: &Config) -> CliResult {
    warm_up(session).await?;
    let mut editor = rustyline::DefaultEditor::new().map_err(|e| CliError(msg!("run.error.editor", reason = e)))?;
    let history = config.home.join("history.txt");
    let _ = editor.load_history(&history);
    println!("{}", t!("run.welcome"));
    loop {
        let line = match editor.readline(">>> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                println!("{}", t!("run.ctrl_c_hint"));
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(error) => return Err(CliError(msg!("run.error.editor", reason = error))),
        };
        let mut text = line.clone();
        if let Some(rest) = line.trim_start().strip_prefix("\"\"\"") {
            // A block runs until a line ending with """.
            let mut block = vec![rest.to_string()];
            if !rest.trim_end().ends_with("\"\"\"") || rest.trim().is_empty() {
                loop {
                    match editor.readline("... ") {
                        Ok(next) => {
                            if let Some(end) = next.trim_end().strip_suffix("\"\"\"") {
                                block.push(end.to_string());
                                break;
                            }
                            block.push(next);
                        }
                        Err(ReadlineError::Interrupted) => {
                            block.clear();
                            break;
                        }
                        Err(_) => break,
                    }
                }
            } else if let Some(only) = block.pop() {
                block.push(only.trim_end().trim_end_matches("\"\"\"").to_string());
            }
            text = block.join("\n").trim().to_string();
        }
        let trimmed = text.trim();
        if trimmed.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line.as_str());
        if trimmed.starts_with('/') && !trimmed.contains('\n') {
            if !session.command(trimmed).await? {
                break;
            }
            continue;
        }
        if let Err(error) = session.ask(trimmed).await {
            eprintln!("{}", t!("cli.error.line", message = error.0.localized()));
        }
    }
    let _ = editor.save_history(&history);
    Ok(())
}
