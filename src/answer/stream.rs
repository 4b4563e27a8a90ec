//! The one answer stream: engine events become typed answer events here, once, for every
//! front end — text, reasoning (`<think>…</think>` of reasoning models), tool calls (held
//! back until they are whole), log-probabilities as text, the finish with its reason and
//! usage, and errors. Each API family only folds these events into its wire format.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt};

use super::error::{Result, ServiceError};
use crate::engine::tools::{self, ToolCall, ToolSpec};
use crate::engine::{EngineError, EngineEvent, TokenLogprob};
use crate::rag::Source;

/// A generated token's log-probability as the APIs report it: the token as text and its
/// likeliest alternatives as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

impl Logprob {
    /// `text` is what the token added to the answer; it is empty while a multi-byte
    /// character is incomplete, and then the token's own decoding stands in.
    pub fn of(tokenizer: &tokenizers::Tokenizer, text: &str, logprob: &TokenLogprob) -> Logprob {
        let token_text = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
        Logprob {
            token: if text.is_empty() { token_text(logprob.token) } else { text.to_string() },
            logprob: logprob.logprob,
            top: logprob.top.iter().map(|top| (token_text(top.token), top.logprob)).collect(),
        }
    }
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop string, or a finished structured answer.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The answer is one or more tool calls.
    ToolCalls,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens read from the prefix cache.
    pub cached_tokens: usize,
}

/// The end of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    /// The stop string that ended the answer, if one did.
    pub stop_sequence: Option<String>,
    pub usage: Usage,
    pub prompt_eval: Duration,
    pub eval: Duration,
    /// The generated token ids (Ollama's `context` continues from them).
    pub tokens: Vec<u32>,
}

#[derive(Debug)]
pub enum AnswerEvent {
    /// Text of the answer; empty when only a log-probability is reported (while a character
    /// or a possible tool call is incomplete).
    Text { text: String, logprob: Option<Logprob> },
    /// Text of the model's reasoning (between `<think>` and `</think>`).
    Reasoning(String),
    /// Calls the answer makes, each whole.
    ToolCalls(Vec<ToolCall>),
    /// The last event of an answer that completed.
    Done(Finish),
    /// The last event of an answer that failed after it started.
    Error(ServiceError),
}

pub type AnswerEvents = Pin<Box<dyn Stream<Item = AnswerEvent> + Send>>;

/// An answer in progress. Dropping it cancels the generation behind it.
pub struct Answer {
    pub model: String,
    pub created: SystemTime,
    pub started: Instant,
    pub load_duration: Duration,
    /// The prompt as token ids (Ollama's `context` starts with them).
    pub prompt_tokens: Vec<u32>,
    /// Chunks retrieved for this answer; `None` when the request did not ask for retrieval.
    pub sources: Option<Vec<Source>>,
    events: AnswerEvents,
}

/// A whole answer, for non-streaming responses.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    pub text: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
    pub logprobs: Vec<Logprob>,
    pub finish: Finish,
}

impl Answer {
    pub fn new(model: String, load_duration: Duration, prompt_tokens: Vec<u32>, sources: Option<Vec<Source>>, events: AnswerEvents) -> Answer {
        Answer { model, created: SystemTime::now(), started: Instant::now(), load_duration, prompt_tokens, sources, events }
    }

    /// Sets when the request began (load and retrieval time count in durations).
    pub fn started_at(mut self, started: Instant) -> Answer {
        self.started = started;
        self
    }

    /// The next event; `None` after `Done` or `Error`.
    pub async fn next(&mut self) -> Option<AnswerEvent> {
        self.events.next().await
    }

    /// Runs to the end and gathers the answer.
    pub async fn collect(mut self) -> Result<Collected> {
        let (mut text, mut reasoning, mut tool_calls, mut logprobs) = (String::new(), String::new(), Vec::new(), Vec::new());
        while let Some(event) = self.next().await {
            match event {
                AnswerEvent::Text { text: piece, logprob } => {
                    text.push_str(&piece);
                    logprobs.extend(logprob);
                }
                AnswerEvent::Reasoning(piece) => reasoning.push_str(&piece),
                AnswerEvent::ToolCalls(calls) => tool_calls.extend(calls),
                AnswerEvent::Done(finish) => return Ok(Collected { text, reasoning, tool_calls, logprobs, finish }),
                AnswerEvent::Error(error) => return Err(error),
            }
        }
        Err(ServiceError::Engine(EngineError::Stopped))
    }
}

/// How the engine's events of one generation become answer events.
pub struct Shaping {
    /// Turns token ids of log-probabilities into text.
    pub tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    /// Tools the model was offered: calls to them are held back and parsed.
    pub tools: Vec<ToolSpec>,
    /// The template knows `<think>`: reasoning is separated from the answer.
    pub reasoning: bool,
    /// The prompt ends inside an open `<think>` (the template opened it).
    pub starts_thinking: bool,
}

/// The answer events of a stream of engine events (which ends after `Done` or `Error`).
pub fn answer_events<S>(engine_events: S, shaping: Shaping) -> impl Stream<Item = AnswerEvent> + Send + 'static
where
    S: Stream<Item = EngineEvent> + Send + 'static,
{
    async_stream::stream! {
        futures::pin_mut!(engine_events);
        let mut holder = tools::CallHolder::new(!shaping.tools.is_empty());
        let mut thinking = ThinkSplitter::new(shaping.reasoning, shaping.starts_thinking);
        while let Some(event) = engine_events.next().await {
            match event {
                EngineEvent::Token { text, logprob, .. } => {
                    let logprob = match (&shaping.tokenizer, logprob) {
                        (Some(tokenizer), Some(logprob)) => Some(Logprob::of(tokenizer, &text, &logprob)),
                        _ => None,
                    };
                    let mut shown = String::new();
                    for segment in thinking.push(&text) {
                        match segment {
                            Segment::Reasoning(reasoning) => yield AnswerEvent::Reasoning(reasoning),
                            Segment::Text(text) => shown.push_str(&holder.push(text)),
                        }
                    }
                    if !shown.is_empty() || logprob.is_some() {
                        yield AnswerEvent::Text { text: shown, logprob };
                    }
                }
                EngineEvent::Done(completion) => {
                    let mut shown = String::new();
                    for segment in thinking.finish() {
                        match segment {
                            Segment::Reasoning(reasoning) => yield AnswerEvent::Reasoning(reasoning),
                            Segment::Text(text) => shown.push_str(&holder.push(text)),
                        }
                    }
                    let held = holder.finish();
                    let mut reason = match completion.finish_reason {
                        crate::engine::FinishReason::Stop => FinishReason::Stop,
                        crate::engine::FinishReason::Length => FinishReason::Length,
                    };
                    match tools::parse_offered_calls(&held, &shaping.tools) {
                        Some((content, calls)) => {
                            shown.push_str(&content);
                            if !shown.is_empty() {
                                yield AnswerEvent::Text { text: std::mem::take(&mut shown), logprob: None };
                            }
                            yield AnswerEvent::ToolCalls(calls);
                            reason = FinishReason::ToolCalls;
                        }
                        None => {
                            shown.push_str(&held);
                            if !shown.is_empty() {
                                yield AnswerEvent::Text { text: shown, logprob: None };
                            }
                        }
                    }
                    yield AnswerEvent::Done(Finish {
                        reason,
                        stop_sequence: completion.stop_sequence,
                        usage: Usage { prompt_tokens: completion.prompt_tokens, completion_tokens: completion.completion_tokens, cached_tokens: completion.cached_tokens },
                        prompt_eval: completion.prompt_eval,
                        eval: completion.eval,
                        tokens: completion.tokens,
                    });
                    return;
                }
                EngineEvent::Error(error) => {
                    yield AnswerEvent::Error(ServiceError::Engine(error));
                    return;
                }
            }
        }
        yield AnswerEvent::Error(ServiceError::Engine(EngineError::Stopped));
    }
}

/// A piece of answer text, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Reasoning(String),
    Text(String),
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Splits streamed text into reasoning and answer at `<think>` / `</think>`, even when a tag
/// arrives split across tokens. Disabled, everything is answer text.
pub struct ThinkSplitter {
    enabled: bool,
    inside: bool,
    /// The answer after `</think>` starts without the blank lines models put there.
    trim_next: bool,
    held: String,
}

impl ThinkSplitter {
    pub fn new(enabled: bool, starts_inside: bool) -> ThinkSplitter {
        ThinkSplitter { enabled, inside: enabled && starts_inside, trim_next: false, held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> Vec<Segment> {
        if !self.enabled {
            return if text.is_empty() { Vec::new() } else { vec![Segment::Text(text.to_string())] };
        }
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            let tag = if self.inside { THINK_CLOSE } else { THINK_OPEN };
            if let Some(position) = self.held.find(tag) {
                let before: String = self.held.drain(..position).collect();
                self.held.drain(..tag.len());
                self.emit(&mut out, before);
                self.inside = !self.inside;
                self.trim_next = !self.inside;
                continue;
            }
            // Keep a tail that may be the start of the tag.
            let keep = (1..tag.len()).rev().find(|&n| self.held.ends_with(&tag[..n])).unwrap_or(0);
            let cut = self.held.len() - keep;
            let before: String = self.held.drain(..cut).collect();
            self.emit(&mut out, before);
            return out;
        }
    }

    pub fn finish(&mut self) -> Vec<Segment> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.held);
        self.emit(&mut out, rest);
        out
    }

    fn emit(&mut self, out: &mut Vec<Segment>, mut text: String) {
        if self.inside {
            if !text.is_empty() {
                out.push(Segment::Reasoning(text));
            }
            return;
        }
        if self.trim_next {
            text = text.trim_start().to_string();
            if text.is_empty() {
                return;
            }
            self.trim_next = false;
        }
        if !text.is_empty() {
            out.push(Segment::Text(text));
        }
    }
}

/// Whether a rendered prompt leaves the model inside an open `<think>` block.
pub fn prompt_opens_thinking(prompt: &str) -> bool {
    match (prompt.rfind(THINK_OPEN), prompt.rfind(THINK_CLOSE)) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

/// An answer made of given events, for tests of front ends and for answers that need no
/// model (none today outside tests).
pub fn scripted(model: &str, events: Vec<AnswerEvent>) -> Answer {
    Answer::new(model.to_string(), Duration::ZERO, Vec::new(), None, Box::pin(futures::stream::iter(events)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Completion;

    fn split_all(splitter: &mut ThinkSplitter, pieces: &[&str]) -> (String, String) {
        let (mut reasoning, mut text) = (String::new(), String::new());
        let mut segments: Vec<Segment> = pieces.iter().flat_map(|p| splitter.push(p)).collect();
        segments.extend(splitter.finish());
        for segment in segments {
            match segment {
                Segment::Reasoning(r) => reasoning.push_str(&r),
                Segment::Text(t) => text.push_str(&t),
            }
        }
        (reasoning, text)
    }

    #[test]
    fn thinking_is_separated_even_when_tags_are_split() {
        let mut splitter = ThinkSplitter::new(true, false);
        let (reasoning, text) = split_all(&mut splitter, &["<th", "ink>Let me", " see.</th", "ink>\n\nIt is ", "42."]);
        assert_eq!((reasoning.as_str(), text.as_str()), ("Let me see.", "It is 42."));
        // The template opened the block already.
        let mut splitter = ThinkSplitter::new(true, true);
        assert_eq!(split_all(&mut splitter, &["hmm</think>ok"]), ("hmm".to_string(), "ok".to_string()));
        // A model without thinking passes text through, tags and all.
        let mut splitter = ThinkSplitter::new(false, false);
        assert_eq!(split_all(&mut splitter, &["<think>x</think>y"]), (String::new(), "<think>x</think>y".to_string()));
        assert!(prompt_opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!prompt_opens_thinking("<think>\n\n</think>\n\n"));
    }

    fn done(reason: crate::engine::FinishReason) -> EngineEvent {
        EngineEvent::Done(Completion {
            finish_reason: reason,
            prompt_tokens: 3,
            completion_tokens: 5,
            prompt_eval: Duration::ZERO,
            eval: Duration::ZERO,
            tokens: vec![1, 2, 3, 4, 5],
            cached_tokens: 0,
            stop_sequence: None,
        })
    }

    fn token(text: &str) -> EngineEvent {
        EngineEvent::Token { text: text.to_string(), token: 1, logprob: None }
    }

    async fn collect(events: Vec<EngineEvent>, shaping: Shaping) -> Collected {
        let answer = Answer::new("m".into(), Duration::ZERO, Vec::new(), None, Box::pin(answer_events(futures::stream::iter(events), shaping)));
        answer.collect().await.unwrap()
    }

    #[tokio::test]
    async fn a_call_after_some_text_is_held_back_and_parsed() {
        let tools = vec![ToolSpec { name: "weather".into(), description: None, parameters: serde_json::json!({"type": "object"}) }];
        let events = vec![token("Let me check.\n<tool"), token("_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}"), token("\n</tool_call>"), done(crate::engine::FinishReason::Stop)];
        let collected = collect(events, Shaping { tokenizer: None, tools, reasoning: false, starts_thinking: false }).await;
        assert_eq!(collected.text.trim(), "Let me check.");
        assert_eq!(collected.tool_calls.len(), 1);
        assert_eq!(collected.tool_calls[0].arguments, serde_json::json!({"city": "Paris"}));
        assert_eq!(collected.finish.reason, FinishReason::ToolCalls);
    }

    #[tokio::test]
    async fn plain_text_reasoning_and_length() {
        let events = vec![token("<think>why"), token("</think>Because."), done(crate::engine::FinishReason::Length)];
        let collected = collect(events, Shaping { tokenizer: None, tools: Vec::new(), reasoning: true, starts_thinking: false }).await;
        assert_eq!((collected.reasoning.as_str(), collected.text.as_str()), ("why", "Because."));
        assert_eq!(collected.finish.reason, FinishReason::Length);
        assert_eq!(collected.finish.usage, Usage { prompt_tokens: 3, completion_tokens: 5, cached_tokens: 0 });
    }

    #[tokio::test]
    async fn an_engine_error_ends_the_answer() {
        let events = vec![token("a"), EngineEvent::Error(EngineError::Stopped)];
        let answer = Answer::new("m".into(), Duration::ZERO, Vec::new(), None, Box::pin(answer_events(futures::stream::iter(events), Shaping { tokenizer: None, tools: Vec::new(), reasoning: false, starts_thinking: false })));
        assert!(answer.collect().await.is_err());
    }
}
