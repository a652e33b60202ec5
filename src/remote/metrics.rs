//! A server's Prometheus `/metrics` (parsed with prometheus-parse) read into the few numbers
//! tokentop shows: requests running and waiting, token counters, KV cache use, and the TTFT
//! and inter-token latency histograms. llama-server (`llamacpp:` prefix, needs `--metrics`),
//! vLLM (`vllm:`) and SGLang (`sglang:`) name them differently.

use super::Kind;
use prometheus_parse::{Scrape, Value};

/// A cumulative histogram: (upper bound, count of observations at or below it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Observations counted (the `+Inf` bucket, else the largest).
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// The q-quantile (0..1) as Prometheus' `histogram_quantile` estimates it: linear inside
    /// the bucket that holds it; the largest finite bound when it falls in `+Inf`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, c) in &self.buckets {
            if c >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let in_bucket = c - prev.1;
                let frac = if in_bucket > 0.0 {
                    (rank - prev.1) / in_bucket
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, c);
        }
        Some(prev.0)
    }

    /// The observations made since `older` (bucket by bucket), for percentiles over the
    /// last interval rather than since the server started; None when the server restarted.
    pub fn since(&self, older: &Histogram) -> Option<Histogram> {
        if older.buckets.len() != self.buckets.len() {
            return None;
        }
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (a, b) in self.buckets.iter().zip(&older.buckets) {
            if a.0 != b.0 || a.1 < b.1 {
                return None;
            }
            buckets.push((a.0, a.1 - b.1));
        }
        Some(Histogram { buckets })
    }

    fn add(&mut self, other: &[(f64, f64)]) {
        if self.buckets.is_empty() {
            self.buckets = other.to_vec();
        } else if self.buckets.len() == other.len() {
            for (a, b) in self.buckets.iter_mut().zip(other) {
                a.1 += b.1;
            }
        }
    }
}

/// What one scrape of `/metrics` says. Values are summed over label sets (engines, models).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub kind: Option<Kind>,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    /// Prompt tokens processed since the server started (counter).
    pub prompt_tokens: Option<f64>,
    /// Tokens generated since the server started (counter).
    pub generation_tokens: Option<f64>,
    /// KV cache in use, 0 to 1.
    pub kv_usage: Option<f64>,
    pub ttft: Option<Histogram>,
    pub itl: Option<Histogram>,
    /// `model_name` labels seen (vLLM, SGLang's `name`).
    pub models: Vec<String>,
}

/// Parses Prometheus text exposition.
pub fn parse(text: &str) -> std::io::Result<Metrics> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(colons_out(l))))?;
    let mut m = Metrics::default();
    for s in &scrape.samples {
        let Some((prefix, name)) = s.metric.split_once(COLON) else {
            continue;
        };
        let kind = match prefix {
            "llamacpp" => Kind::LlamaServer,
            "vllm" => Kind::Vllm,
            "sglang" => Kind::Sglang,
            _ => continue,
        };
        m.kind.get_or_insert(kind);
        for label in ["model_name", "name"] {
            if let Some(v) = s.labels.get(label) {
                if !m.models.iter().any(|x| x == v) {
                    m.models.push(v.to_string());
                }
            }
        }
        let value = match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            _ => None,
        };
        let add = |slot: &mut Option<f64>| {
            if let Some(v) = value {
                *slot = Some(slot.unwrap_or(0.0) + v);
            }
        };
        match name {
            "requests_processing" | "num_requests_running" | "num_running_reqs" => {
                add(&mut m.running)
            }
            "requests_deferred" | "num_requests_waiting" | "num_queue_reqs" => add(&mut m.waiting),
            "prompt_tokens_total" => add(&mut m.prompt_tokens),
            "tokens_predicted_total" | "generation_tokens_total" => add(&mut m.generation_tokens),
            // The newer vLLM name wins over the deprecated one when both are there.
            "kv_cache_usage_ratio" | "kv_cache_usage_perc" | "token_usage" => m.kv_usage = value,
            "gpu_cache_usage_perc" => {
                m.kv_usage = m.kv_usage.or(value);
            }
            "time_to_first_token_seconds" => hist(&mut m.ttft, &s.value),
            "inter_token_latency_seconds" => hist(&mut m.itl, &s.value),
            "time_per_output_token_seconds" if m.itl.is_none() => hist(&mut m.itl, &s.value),
            _ => {}
        }
    }
    Ok(m)
}

/// Stands for ':' in metric names while prometheus-parse reads them: its name pattern is
/// `\w+`, which the colons of every server's names (`vllm:…`, `llamacpp:…`) do not match,
/// so those lines would be skipped. Names never hold this sequence.
const COLON: &str = "__colon__";

/// The line with the colons of its metric name (sample, HELP or TYPE) replaced by [`COLON`].
fn colons_out(line: &str) -> String {
    let (head, rest) = if let Some(r) = line
        .strip_prefix("# HELP ")
        .or_else(|| line.strip_prefix("# TYPE "))
    {
        (&line[..7], r)
    } else if line.starts_with('#') {
        return line.to_string();
    } else {
        ("", line)
    };
    let end = rest
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(rest.len());
    format!("{head}{}{}", rest[..end].replace(':', COLON), &rest[end..])
}

fn hist(slot: &mut Option<Histogram>, v: &Value) {
    if let Value::Histogram(b) = v {
        let mut buckets: Vec<(f64, f64)> = b.iter().map(|h| (h.less_than, h.count)).collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        slot.get_or_insert_with(Histogram::default).add(&buckets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_a_bucket() {
        let h = Histogram {
            buckets: vec![(0.1, 0.0), (0.2, 10.0), (f64::INFINITY, 10.0)],
        };
        assert!((h.quantile(0.5).unwrap() - 0.15).abs() < 1e-9);
        assert!((h.quantile(1.0).unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(Histogram::default().quantile(0.5), None);
        let older = Histogram {
            buckets: vec![(0.1, 0.0), (0.2, 4.0), (f64::INFINITY, 4.0)],
        };
        assert_eq!(h.since(&older).unwrap().count(), 6.0);
        assert_eq!(older.since(&h), None);
    }
}
