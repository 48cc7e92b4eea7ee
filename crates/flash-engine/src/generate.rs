//! The generation loop: prefill the prompt, then sample and decode one token
//! at a time, streaming text as it becomes final; stops on an end-of-sequence
//! id, a stop string, `max_tokens`, a full context, or when the callback asks.

use crate::backend::Backend;
use crate::error::{try_reserve, EngineError};
use crate::sampling::{Sampler, SamplingParams};
use crate::text::{StreamDecoder, TextTokenizer};
use crate::Result;
use std::time::Instant;

/// What to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// Most tokens to generate (0: none, only the prefill runs).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before any of these texts; the returned text ends
    /// just before it.
    pub stop_strings: Vec<String>,
    /// Ids that end generation (usually [`crate::ModelConfig::eos_token_ids`]).
    /// They are not part of the output.
    pub eos_token_ids: Vec<u32>,
    /// Keep the logits of the prompt's last position (before any sampling
    /// transform) in [`Generation::prompt_logits`].
    pub keep_prompt_logits: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id was sampled.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` generated, or the context is full.
    Length,
    /// The callback returned `false`.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids, without the end-of-sequence id that stopped it.
    pub token_ids: Vec<u32>,
    /// Text of `token_ids` (special tokens skipped), cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    /// Logits at the prompt's last position, when asked for.
    pub prompt_logits: Option<Vec<f32>>,
    /// Seconds of the prompt's forward pass.
    pub prefill_s: f64,
    /// Seconds from the call to the first sampled token (prefill included).
    pub ttft_s: f64,
    /// Seconds from the first sampled token to the last.
    pub decode_s: f64,
    /// Seed of the sampler (to repeat a run).
    pub seed: u64,
}

impl Generation {
    /// Decode speed: tokens after the first per second of `decode_s`; with
    /// a single token, 1 / `ttft_s`; 0 with none.
    pub fn tokens_per_s(&self) -> f64 {
        let n = self.token_ids.len() + usize::from(self.finish_reason == FinishReason::Eos);
        match n {
            0 => 0.0,
            1 => 1.0 / self.ttft_s.max(1e-9),
            n => (n - 1) as f64 / self.decode_s.max(1e-9),
        }
    }

    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_token_ids.len() as f64 / self.prefill_s.max(1e-9)
    }
}

/// Holds back streamed text that could still become a stop string.
struct StopScanner {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
    /// Appends `piece`; returns the text that is now safe to emit and
    /// whether a stop string was found (the text is then cut before it).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.text.truncate(at);
            let out = self.text[self.emitted.min(at)..].to_string();
            self.emitted = at;
            return (out, true);
        }
        // The longest suffix that is a proper prefix of a stop string waits.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.text.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let safe = self.text.len() - hold;
        let out = if safe > self.emitted {
            self.text[self.emitted..safe].to_string()
        } else {
            String::new()
        };
        self.emitted = self.emitted.max(safe);
        (out, false)
    }

    /// The rest once generation ends without a stop string.
    fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

/// Generates from `prompt` (token ids) on `backend`, starting at position 0
/// (the cache is rewound). `on_text` receives each piece of final text as
/// it comes; returning `false` stops generation
/// ([`FinishReason::Cancelled`]).
pub fn generate(
    backend: &mut dyn Backend,
    tok: &TextTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    generate_cancellable(backend, tok, prompt, opts, on_text, &mut || false)
}

/// [`generate`], also stopped ([`FinishReason::Cancelled`]) as soon as
/// `cancelled` returns true: it is asked before the prefill and before each
/// decode step, so a reader that went away stops generation within one
/// token even while no text is streamed (held back for a stop string, or
/// special tokens). The buffers of the loop are sized from the room the
/// context leaves, never from `max_tokens` alone, and allocated fallibly.
pub fn generate_cancellable(
    backend: &mut dyn Backend,
    tok: &TextTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
    cancelled: &mut dyn FnMut() -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(EngineError::Invalid(
            "the prompt is empty (no tokens to start from)".into(),
        ));
    }
    opts.sampling.validate().map_err(EngineError::Invalid)?;
    let start = Instant::now();
    let mut sampler = Sampler::new(opts.sampling.clone());
    // At most the context's room is generated, whatever `max_tokens` says.
    let room = backend.max_seq_len().saturating_sub(prompt.len());
    let most = opts.max_tokens.min(room.saturating_add(1));
    let mut history = Vec::new();
    try_reserve(
        &mut history,
        prompt.len().saturating_add(most),
        true,
        "the token history",
    )?;
    history.extend_from_slice(prompt);
    let mut generated: Vec<u32> = Vec::new();
    try_reserve(&mut generated, most, true, "the generated tokens")?;
    if cancelled() {
        return Ok(Generation {
            prompt_token_ids: prompt.to_vec(),
            token_ids: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Cancelled,
            prompt_logits: None,
            prefill_s: 0.0,
            ttft_s: 0.0,
            decode_s: 0.0,
            seed: sampler.seed(),
        });
    }
    let mut decoder = StreamDecoder::new();
    let mut scanner = StopScanner {
        stops: opts.stop_strings.clone(),
        text: String::new(),
        emitted: 0,
    };

    let logits = backend.forward(prompt, 0)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let prompt_logits = opts.keep_prompt_logits.then(|| logits.to_vec());
    let mut ttft_s = prefill_s;
    let mut first_at = Instant::now();
    let mut finish = FinishReason::Length;
    if opts.max_tokens > 0 {
        let mut next = sampler.sample(logits, &history);
        ttft_s = start.elapsed().as_secs_f64();
        first_at = Instant::now();
        loop {
            if opts.eos_token_ids.contains(&next) {
                finish = FinishReason::Eos;
                break;
            }
            generated.push(next);
            history.push(next);
            let piece = decoder.step(tok, &generated)?;
            let (out, stopped) = scanner.push(&piece);
            if !out.is_empty() && !on_text(&out) {
                finish = FinishReason::Cancelled;
                break;
            }
            if stopped {
                finish = FinishReason::Stop;
                break;
            }
            let pos = backend.position();
            if generated.len() >= opts.max_tokens || pos >= backend.max_seq_len() {
                break;
            }
            if cancelled() {
                finish = FinishReason::Cancelled;
                break;
            }
            let logits = backend.forward(&[next], pos)?;
            next = sampler.sample(logits, &history);
        }
    }
    let decode_s = first_at.elapsed().as_secs_f64();
    if matches!(finish, FinishReason::Eos | FinishReason::Length) {
        // Text the stream decoder still held (an incomplete character at
        // the very end): the final decode of every id settles it.
        let full = tok.decode(&generated, true)?;
        let mut out = String::new();
        let mut stopped = false;
        if full.len() > scanner.text.len() && full.starts_with(&scanner.text) {
            let rest = full[scanner.text.len()..].to_string();
            (out, stopped) = scanner.push(&rest);
        }
        if stopped {
            finish = FinishReason::Stop;
        } else {
            out.push_str(&scanner.finish());
        }
        if !out.is_empty() {
            on_text(&out);
        }
    }
    Ok(Generation {
        prompt_token_ids: prompt.to_vec(),
        token_ids: generated,
        text: scanner.text,
        finish_reason: finish,
        prompt_logits,
        prefill_s,
        ttft_s,
        decode_s: if opts.max_tokens > 0 { decode_s } else { 0.0 },
        seed: sampler.seed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CpuModel, CpuOptions};

    fn tiny(max_seq_len: Option<usize>) -> (tempfile::TempDir, CpuModel, TextTokenizer) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let spec = flash_synth::spec(flash_synth::Arch::Qwen3, "tiny").unwrap();
        flash_synth::synth(&spec, &dir, &Default::default()).unwrap();
        let opts = CpuOptions { max_seq_len };
        let m = CpuModel::load(&dir, &Default::default(), &opts).unwrap().0;
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        (tmp, m, tok)
    }

    #[test]
    fn astronomical_max_tokens_stop_at_the_context() {
        // Sizing buffers from max_tokens alone once aborted the process
        // ("memory allocation of 4000000000064 bytes failed").
        let (_tmp, mut m, tok) = tiny(Some(24));
        let opts = GenerateOptions {
            max_tokens: 1_000_000_000_000,
            ..Default::default()
        };
        let g = generate(&mut m, &tok, &[5, 6, 7, 8], &opts, &mut |_| true).unwrap();
        assert_eq!(g.finish_reason, FinishReason::Length);
        // 20 positions are left; the last sampled token needs none.
        assert_eq!(g.token_ids.len(), 21);
    }

    #[test]
    fn cancellation_stops_within_a_token_without_text() {
        let (_tmp, mut m, tok) = tiny(None);
        let opts = GenerateOptions {
            max_tokens: 200,
            ..Default::default()
        };
        let full = generate(&mut m, &tok, &[5, 6, 7], &opts, &mut |_| true).unwrap();
        assert_eq!(full.token_ids.len(), 200, "{:?}", full.finish_reason);
        // The callback never sees text (as when it is held back), yet
        // asking to cancel stops generation at the next step.
        let mut asked = 0;
        let g = generate_cancellable(&mut m, &tok, &[5, 6, 7], &opts, &mut |_| true, &mut || {
            asked += 1;
            asked > 5
        })
        .unwrap();
        assert_eq!(g.finish_reason, FinishReason::Cancelled);
        assert_eq!(g.token_ids.len(), 5);
        assert_eq!(g.token_ids[..], full.token_ids[..5]);
        // Cancelled before the prefill: nothing runs.
        let g = generate_cancellable(&mut m, &tok, &[5, 6, 7], &opts, &mut |_| true, &mut || true)
            .unwrap();
        assert_eq!(g.finish_reason, FinishReason::Cancelled);
        assert!(g.token_ids.is_empty());
    }

    fn scan(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let mut s = StopScanner {
            stops: stops.iter().map(|s| s.to_string()).collect(),
            text: String::new(),
            emitted: 0,
        };
        let mut outs = Vec::new();
        for p in pieces {
            let (o, stop) = s.push(p);
            outs.push(o);
            if stop {
                return (outs, s.text, true);
            }
        }
        let rest = s.finish();
        outs.push(rest);
        (outs, s.text, false)
    }

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let (outs, text, stopped) = scan(&["END"], &["hello ", "wor", "ld E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(text, "hello world ");
        assert_eq!(outs.concat(), "hello world ");
        // "E" and "EN" were held back, never emitted then retracted.
        assert_eq!(outs[2], "ld ");
        assert_eq!(outs[3], "");

        let (outs, text, stopped) = scan(&["END"], &["a E", "x"]);
        assert!(!stopped);
        assert_eq!(text, "a Ex");
        assert_eq!(outs.concat(), "a Ex");

        let (outs, text, stopped) = scan(&["\n\n", "###"], &["line", "\n", "\nnext"]);
        assert!(stopped);
        assert_eq!(text, "line");
        assert_eq!(outs.concat(), "line");
    }
}
