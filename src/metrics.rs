//! Prometheus metrics: counters and histograms recorded as requests run, rendered in the
//! text exposition format at `/metrics` together with gauges read at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms.
const TTFT_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const TOKEN_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    /// The series of one label value (`model="x"`).
    fn render_labelled(&self, name: &str, label: &str, out: &mut String) {
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{label},le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{label}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{label}}} {}", self.count);
    }
}

/// Token counts and latencies of one model.
#[derive(Debug)]
struct ModelSeries {
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Histogram,
    token_latency: Histogram,
}

impl Default for ModelSeries {
    fn default() -> Self {
        ModelSeries { prompt_tokens: 0, completion_tokens: 0, ttft: Histogram::new(TTFT_BUCKETS), token_latency: Histogram::new(TOKEN_BUCKETS) }
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    models: BTreeMap<String, ModelSeries>,
}

/// The server's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Arc::new(Mutex::new(Inner { requests: BTreeMap::new(), models: BTreeMap::new() })),
        }
    }
}

/// Values read when `/metrics` is scraped.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub loaded_models: usize,
    pub queue_depth: usize,
    /// Answers being generated or waiting for a place in the engine's batch.
    pub answers_in_flight: usize,
    pub memory_bytes: u64,
    /// The most MLX has held at once since start.
    pub peak_memory_bytes: u64,
    /// Freed buffers MLX keeps for reuse.
    pub cache_memory_bytes: u64,
    /// Resident set size of the server process.
    pub resident_bytes: u64,
    pub prefix_hits: u64,
    pub prefix_misses: u64,
    pub prefix_reused_tokens: u64,
    pub prefix_bytes: u64,
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn request(&self, method: &str, route: &str, status: u16) {
        *self.lock().requests.entry((method.to_string(), route.to_string(), status)).or_default() += 1;
    }

    /// One finished generation of `model`: its token counts, time to first token, and
    /// decode time.
    pub fn generation(&self, model: &str, prompt_tokens: usize, completion_tokens: usize, ttft: Option<Duration>, eval: Duration) {
        let mut inner = self.lock();
        let series = inner.models.entry(model.to_string()).or_default();
        series.prompt_tokens += prompt_tokens as u64;
        series.completion_tokens += completion_tokens as u64;
        if let Some(ttft) = ttft {
            series.ttft.observe(ttft.as_secs_f64());
        }
        if completion_tokens > 1 {
            series.token_latency.observe(eval.as_secs_f64() / (completion_tokens - 1) as f64);
        }
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let inner = self.lock();
        let mut out = String::new();
        out.push_str("# HELP mlxserver_requests_total HTTP requests by method, route and status.\n# TYPE mlxserver_requests_total counter\n");
        for ((method, route, status), count) in &inner.requests {
            let _ = writeln!(out, "mlxserver_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {count}", escape(method), escape(route));
        }
        // Totals over every model, then one labelled series per model.
        let total = |pick: fn(&ModelSeries) -> u64| inner.models.values().map(pick).sum::<u64>();
        out.push_str("# HELP mlxserver_prompt_tokens_total Prompt tokens read.\n# TYPE mlxserver_prompt_tokens_total counter\n");
        let _ = writeln!(out, "mlxserver_prompt_tokens_total {}", total(|s| s.prompt_tokens));
        out.push_str("# HELP mlxserver_completion_tokens_total Tokens generated.\n# TYPE mlxserver_completion_tokens_total counter\n");
        let _ = writeln!(out, "mlxserver_completion_tokens_total {}", total(|s| s.completion_tokens));
        out.push_str("# HELP mlxserver_model_prompt_tokens_total Prompt tokens read, by model.\n# TYPE mlxserver_model_prompt_tokens_total counter\n");
        for (model, series) in &inner.models {
            let _ = writeln!(out, "mlxserver_model_prompt_tokens_total{{model=\"{}\"}} {}", escape(model), series.prompt_tokens);
        }
        out.push_str("# HELP mlxserver_model_completion_tokens_total Tokens generated, by model.\n# TYPE mlxserver_model_completion_tokens_total counter\n");
        for (model, series) in &inner.models {
            let _ = writeln!(out, "mlxserver_model_completion_tokens_total{{model=\"{}\"}} {}", escape(model), series.completion_tokens);
        }
        out.push_str("# HELP mlxserver_time_to_first_token_seconds Time from request to first token, by model.\n# TYPE mlxserver_time_to_first_token_seconds histogram\n");
        for (model, series) in &inner.models {
            series.ttft.render_labelled("mlxserver_time_to_first_token_seconds", &format!("model=\"{}\"", escape(model)), &mut out);
        }
        out.push_str("# HELP mlxserver_time_per_output_token_seconds Average decode time per token of a generation, by model.\n# TYPE mlxserver_time_per_output_token_seconds histogram\n");
        for (model, series) in &inner.models {
            series.token_latency.render_labelled("mlxserver_time_per_output_token_seconds", &format!("model=\"{}\"", escape(model)), &mut out);
        }
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge(&mut out, "mlxserver_loaded_models", "Models loaded now.", gauges.loaded_models as u64);
        gauge(&mut out, "mlxserver_queue_depth", "Requests waiting for a model.", gauges.queue_depth as u64);
        gauge(&mut out, "mlxserver_answers_in_flight", "Answers being generated or waiting for a place in the engine's batch.", gauges.answers_in_flight as u64);
        gauge(&mut out, "mlxserver_memory_bytes", "Bytes held by loaded models and caches.", gauges.memory_bytes);
        gauge(&mut out, "mlxserver_peak_memory_bytes", "Most bytes MLX held at once since start.", gauges.peak_memory_bytes);
        gauge(&mut out, "mlxserver_cache_memory_bytes", "Freed buffers MLX keeps for reuse.", gauges.cache_memory_bytes);
        gauge(&mut out, "mlxserver_resident_bytes", "Resident set size of the server process.", gauges.resident_bytes);
        gauge(&mut out, "mlxserver_prefix_cache_bytes", "Bytes held by the prefix cache.", gauges.prefix_bytes);
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter(&mut out, "mlxserver_prefix_cache_hits_total", "Prompts that reused a cached prefix.", gauges.prefix_hits);
        counter(&mut out, "mlxserver_prefix_cache_misses_total", "Prompts that found no cached prefix.", gauges.prefix_misses);
        counter(&mut out, "mlxserver_prefix_cache_reused_tokens_total", "Prompt tokens read from the prefix cache.", gauges.prefix_reused_tokens);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let metrics = Metrics::default();
        metrics.request("POST", "/api/chat", 200);
        metrics.request("POST", "/api/chat", 200);
        metrics.generation("smol", 10, 5, Some(Duration::from_millis(300)), Duration::from_millis(400));
        let text = metrics.render(&Gauges { loaded_models: 1, ..Default::default() });
        assert!(text.contains("mlxserver_requests_total{method=\"POST\",route=\"/api/chat\",status=\"200\"} 2"));
        assert!(text.contains("mlxserver_time_to_first_token_seconds_bucket{model=\"smol\",le=\"0.5\"} 1"));
        assert!(text.contains("mlxserver_time_to_first_token_seconds_bucket{model=\"smol\",le=\"0.25\"} 0"));
        assert!(text.contains("mlxserver_model_completion_tokens_total{model=\"smol\"} 5"));
        assert!(text.contains("mlxserver_loaded_models 1"));
        assert!(text.contains("mlxserver_completion_tokens_total 5"));
    }
}

/// The process's resident set size (Linux; 0 where /proc is missing).
pub fn resident_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = status.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_size).unwrap_or(4096)
}
