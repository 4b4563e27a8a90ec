//! Reuse of key/value caches across requests that share a prompt prefix (a chat growing turn
//! by turn, a long system prompt). Finished sequences leave their caches here; a new sequence
//! starts from the entry with the longest common prefix and reads only the rest of its
//! prompt. MLX arrays are values, so an entry shared with a running sequence is never
//! changed by it. Bounded by bytes, least recently used first out.

use super::nn::KvCache;
use super::ModelId;

/// Shorter common prefixes are not worth a lookup's bookkeeping.
const MIN_REUSE: usize = 8;

struct Entry {
    model: ModelId,
    tokens: Vec<u32>,
    cache: Vec<KvCache>,
    bytes: u64,
    last_used: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixStats {
    pub hits: u64,
    pub misses: u64,
    pub reused_tokens: u64,
    pub bytes: u64,
    pub entries: usize,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    capacity: u64,
    clock: u64,
    stats: PrefixStats,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(capacity: u64) -> Self {
        PrefixCache { entries: Vec::new(), capacity, clock: 0, stats: PrefixStats::default() }
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats { bytes: self.entries.iter().map(|e| e.bytes).sum(), entries: self.entries.len(), ..self.stats }
    }

    /// A cache holding the longest stored prefix of `prompt` (at most all but its last
    /// token, which must be read to get the next logits), and that prefix's length.
    pub fn lookup(&mut self, model: ModelId, prompt: &[u32]) -> Option<(Vec<KvCache>, usize)> {
        if self.capacity == 0 {
            return None;
        }
        self.clock += 1;
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.model == model)
            .map(|e| {
                let length = common_prefix(&e.tokens, prompt).min(limit);
                (length, e)
            })
            .max_by_key(|(length, _)| *length);
        match best {
            Some((length, entry)) if length >= MIN_REUSE => {
                entry.last_used = self.clock;
                let mut cache = entry.cache.clone();
                for layer in &mut cache {
                    layer.truncate(length as i32);
                }
                self.stats.hits += 1;
                self.stats.reused_tokens += length as u64;
                Some((cache, length))
            }
            _ => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Keeps the cache of a finished sequence (`tokens` are exactly what it holds).
    pub fn insert(&mut self, model: ModelId, tokens: Vec<u32>, cache: Vec<KvCache>) {
        if self.capacity == 0 || tokens.len() < MIN_REUSE {
            return;
        }
        let bytes: u64 = cache.iter().map(|c| c.nbytes() as u64).sum();
        if bytes > self.capacity {
            return;
        }
        self.clock += 1;
        // An entry that this one extends (the previous turn of the same chat) is replaced.
        self.entries.retain(|e| !(e.model == model && tokens.starts_with(&e.tokens)));
        if self.entries.iter().any(|e| e.model == model && e.tokens.starts_with(&tokens)) {
            return;
        }
        self.entries.push(Entry { model, tokens, cache, bytes, last_used: self.clock });
        while self.entries.iter().map(|e| e.bytes).sum::<u64>() > self.capacity {
            let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else { break };
            self.entries.swap_remove(oldest);
        }
    }

    pub fn remove_model(&mut self, model: ModelId) {
        self.entries.retain(|e| e.model != model);
    }
}
