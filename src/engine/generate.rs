//! Generation state of one sequence: its prompt, cache, sampler, incremental detokenizer and
//! stop-string matcher, and how each new token turns into events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::Sender;

use super::nn::KvCache;
use super::sampling::{log_softmax, Sampler};
use super::constrain::Constraint;
use super::tokenizer::IncrementalDecoder;
use super::{Completion, EngineError, EngineEvent, FinishReason, GenerateRequest, TokenLogprob, TopLogprob};

/// Holds back text that could be the start of a stop string, and cuts at the first stop
/// string found, even when it arrives split across tokens.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds `text`; returns what may be shown now and the stop string reached, if one was.
    pub fn push(&mut self, text: &str) -> (String, Option<String>) {
        self.held.push_str(text);
        let earliest = self.stops.iter().filter_map(|stop| self.held.find(stop.as_str()).map(|at| (at, stop))).min_by_key(|(at, _)| *at);
        if let Some((position, stop)) = earliest {
            let shown = self.held[..position].to_string();
            let stop = stop.clone();
            self.held.clear();
            return (shown, Some(stop));
        }
        // Keep the longest tail that is a prefix of some stop string.
        let mut keep = 0;
        for stop in &self.stops {
            for (boundary, _) in stop.char_indices().skip(1) {
                let prefix = &stop[..boundary];
                if self.held.ends_with(prefix) {
                    keep = keep.max(prefix.len());
                }
            }
        }
        let cut = self.held.len() - keep;
        let shown = self.held[..cut].to_string();
        self.held.drain(..cut);
        (shown, None)
    }

    /// Whatever is still held once generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

pub struct Sequence {
    pub prompt: Vec<u32>,
    pub prefilled: usize,
    pub generated: Vec<u32>,
    pub cache: Vec<KvCache>,
    /// The token sampled last, to be fed on the next step.
    pub next_input: Option<u32>,
    /// Prompt tokens whose cache came from the prefix cache.
    pub cached_tokens: usize,
    sampler: Sampler,
    max_tokens: usize,
    context_limit: usize,
    stop: StopMatcher,
    decoder: IncrementalDecoder,
    events: Sender<EngineEvent>,
    eos_token_ids: Arc<Vec<u32>>,
    logprobs: Option<usize>,
    /// The grammar the output must follow, if the request set one.
    pub constraint: Option<Constraint>,
    started: Instant,
    prefill_time: Duration,
    decode_started: Option<Instant>,
}

pub enum Progress {
    Running,
    Finished,
}

impl Sequence {
    /// The most tokens this sequence may still add.
    pub fn max_new_tokens(&self) -> usize {
        self.max_tokens.saturating_sub(self.generated.len())
    }

    pub fn new(
        request: GenerateRequest,
        cache: Vec<KvCache>,
        decoder: IncrementalDecoder,
        eos_token_ids: Arc<Vec<u32>>,
        model_context: usize,
        events: Sender<EngineEvent>,
    ) -> Result<Sequence, (EngineError, Sender<EngineEvent>)> {
        let context_limit = request.context_length.unwrap_or(model_context).min(model_context).max(1);
        if request.prompt_tokens.is_empty() {
            return Err((EngineError::BadRequest("the prompt is empty".into()), events));
        }
        if request.prompt_tokens.len() >= context_limit {
            return Err((EngineError::ContextOverflow { prompt: request.prompt_tokens.len(), limit: context_limit }, events));
        }
        let room = context_limit - request.prompt_tokens.len();
        let max_tokens = request.max_tokens.unwrap_or(room).min(room);
        Ok(Sequence {
            prompt: request.prompt_tokens,
            prefilled: 0,
            generated: Vec::new(),
            cache,
            next_input: None,
            cached_tokens: 0,
            sampler: Sampler::new(request.sampling),
            max_tokens,
            context_limit,
            stop: StopMatcher::new(request.stop),
            decoder,
            events,
            eos_token_ids,
            logprobs: request.logprobs,
            constraint: None,
            started: Instant::now(),
            prefill_time: Duration::ZERO,
            decode_started: None,
        })
    }

    /// Starts from a cache that already holds the first `length` prompt tokens.
    pub fn reuse_prefix(&mut self, cache: Vec<KvCache>, length: usize) {
        self.cache = cache;
        self.prefilled = length;
        self.cached_tokens = length;
    }

    /// The tokens its cache holds, for the prefix cache.
    pub fn cached_sequence(&self) -> Vec<u32> {
        let held = self.cache.first().map_or(0, |c| c.offset.max(0) as usize);
        self.prompt.iter().chain(self.generated.iter()).take(held).copied().collect()
    }

    pub fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// The client has not read its events: one more token could overflow the channel
    /// (a token may send up to three events), so the sequence pauses.
    pub fn backlogged(&self) -> bool {
        self.events.capacity() < 4
    }

    /// A paused sequence's client has read enough to resume.
    pub fn drained(&self) -> bool {
        self.events.capacity() * 2 >= self.events.max_capacity()
    }

    pub fn prompt_done(&self) -> bool {
        self.prefilled >= self.prompt.len()
    }

    pub fn fail(&self, error: EngineError) {
        let _ = self.events.try_send(EngineEvent::Error(error));
    }

    /// Takes the logits of the last position (after the prompt or a decode step), picks the
    /// next token and reports it.
    pub fn accept_logits(&mut self, logits: &mut [f32]) -> Progress {
        if self.decode_started.is_none() {
            self.prefill_time = self.started.elapsed();
            self.decode_started = Some(Instant::now());
        }
        if let Some(constraint) = &mut self.constraint {
            if let Err(error) = constraint.mask(logits) {
                self.fail(error);
                return Progress::Finished;
            }
        }
        let chosen_logprob = self.logprobs.map(|top| logprobs_of(logits, top));
        let mut history = Vec::with_capacity(self.prompt.len() + self.generated.len());
        history.extend_from_slice(&self.prompt);
        history.extend_from_slice(&self.generated);
        let token = self.sampler.sample(logits, &history);
        let logprob = chosen_logprob.map(|(top, all)| TokenLogprob { token, logprob: all[token as usize], top });
        self.accept_token(token, logprob)
    }

    /// Whether the next token is the argmax of the logits and nothing else needs them: then
    /// the device may pick it (no host copy of the logits) while the host is still busy.
    pub fn greedy_on_device(&self) -> bool {
        let params = self.sampler.params();
        params.temperature <= 0.0 && !params.has_penalties() && self.constraint.is_none() && self.logprobs.is_none()
    }

    /// Takes the next token (sampled on the host or picked on the device) and reports it.
    pub fn accept_token(&mut self, token: u32, logprob: Option<TokenLogprob>) -> Progress {
        if self.decode_started.is_none() {
            self.prefill_time = self.started.elapsed();
            self.decode_started = Some(Instant::now());
        }
        if self.eos_token_ids.contains(&token) {
            return self.finish(FinishReason::Stop, None);
        }
        self.generated.push(token);
        let grammar_complete = match self.constraint.as_mut().map(|c| c.advance(token)) {
            Some(Err(error)) => {
                self.fail(error);
                return Progress::Finished;
            }
            Some(Ok(complete)) => complete,
            None => false,
        };
        let text = match self.decoder.push(token) {
            Ok(text) => text,
            Err(error) => {
                self.fail(error);
                return Progress::Finished;
            }
        };
        let (shown, stopped) = self.stop.push(&text);
        let _ = self.events.try_send(EngineEvent::Token { text: shown, token, logprob });
        if let Some(stop) = stopped {
            return self.finish(FinishReason::Stop, Some(stop));
        }
        if grammar_complete {
            return self.finish(FinishReason::Stop, None);
        }
        if self.generated.len() >= self.max_tokens || self.prompt.len() + self.generated.len() >= self.context_limit {
            return self.finish(FinishReason::Length, None);
        }
        self.next_input = Some(token);
        Progress::Running
    }

    fn finish(&mut self, reason: FinishReason, mut stop_sequence: Option<String>) -> Progress {
        if stop_sequence.is_none() {
            let rest = self.decoder.flush().unwrap_or_default();
            let (mut shown, stopped) = self.stop.push(&rest);
            if stopped.is_none() {
                shown.push_str(&self.stop.finish());
            }
            stop_sequence = stopped;
            if !shown.is_empty() {
                let _ = self.events.try_send(EngineEvent::Token { text: shown, token: u32::MAX, logprob: None });
            }
        }
        let eval = self.decode_started.map(|start| start.elapsed()).unwrap_or_default();
        let _ = self.events.try_send(EngineEvent::Done(Completion {
            finish_reason: reason,
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated.len(),
            prompt_eval: self.prefill_time,
            eval,
            tokens: self.generated.clone(),
            cached_tokens: self.cached_tokens,
            stop_sequence,
        }));
        Progress::Finished
    }
}

/// The top `top` alternatives and the full log-probabilities of a step.
fn logprobs_of(logits: &[f32], top: usize) -> (Vec<TopLogprob>, Vec<f32>) {
    let all = log_softmax(logits);
    let mut order: Vec<u32> = (0..all.len() as u32).collect();
    let top = top.min(order.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |a, b| all[*b as usize].total_cmp(&all[*a as usize]));
        order.truncate(top);
        order.sort_unstable_by(|a, b| all[*b as usize].total_cmp(&all[*a as usize]));
    } else {
        order.clear();
    }
    // Tokens a grammar ruled out (-inf) are not alternatives.
    (order.into_iter().map(|token| TopLogprob { token, logprob: all[token as usize] }).filter(|top| top.logprob.is_finite()).collect(), all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_pieces() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("hello E"), ("hello ".to_string(), None));
        assert_eq!(matcher.push("N"), (String::new(), None));
        assert_eq!(matcher.push("D and more"), (String::new(), Some("END".to_string())));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_match() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("E"), (String::new(), None));
        assert_eq!(matcher.push("X"), ("EX".to_string(), None));
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn multibyte_stop_strings() {
        let mut matcher = StopMatcher::new(vec!["です。".into()]);
        assert_eq!(matcher.push("東京で"), ("東京".to_string(), None));
        assert_eq!(matcher.push("す。次"), (String::new(), Some("です。".to_string())));
    }

    #[test]
    fn earliest_stop_wins() {
        let mut matcher = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(matcher.push("xxab"), ("xx".to_string(), Some("a".to_string())));
    }
}
