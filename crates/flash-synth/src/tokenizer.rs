//! A small byte-level BPE tokenizer in the `tokenizers` JSON format, with the
//! special tokens and chat template of each family.
//!
//! Ids: the 256 byte tokens first (in GPT-2's byte-to-unicode order, as Qwen
//! and Llama 3 have them), then the merges, then the added tokens. Every id is
//! below [`vocab_size`], which is also the vocabulary of the `tiny` presets.

use crate::spec::Arch;
use serde_json::{json, Map, Value};

/// Merges in rank order, written in the byte-level alphabet (`Ġ` is a space).
/// Each part is a byte or the result of an earlier merge.
const MERGES: [(&str, &str); 59] = [
    ("Ġ", "t"),
    ("Ġ", "a"),
    ("h", "e"),
    ("i", "n"),
    ("r", "e"),
    ("o", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("Ġ", "s"),
    ("a", "t"),
    ("Ġ", "w"),
    ("Ġ", "o"),
    ("e", "n"),
    ("Ġ", "c"),
    ("i", "t"),
    ("i", "s"),
    ("a", "n"),
    ("o", "r"),
    ("e", "s"),
    ("Ġ", "b"),
    ("e", "d"),
    ("Ġ", "f"),
    ("in", "g"),
    ("Ġ", "p"),
    ("o", "u"),
    ("Ġa", "n"),
    ("a", "l"),
    ("a", "r"),
    ("Ġt", "o"),
    ("Ġ", "m"),
    ("Ġo", "f"),
    ("Ġ", "in"),
    ("Ġ", "d"),
    ("Ġ", "h"),
    ("Ġan", "d"),
    ("l", "l"),
    ("H", "e"),
    ("He", "ll"),
    ("Hell", "o"),
    ("Ġw", "or"),
    ("Ġwor", "l"),
    ("Ġworl", "d"),
    ("Ġ", "l"),
    ("l", "e"),
    ("Ġ", "e"),
    ("i", "c"),
    ("Ġ", "re"),
    ("o", "m"),
    ("Ġ", "n"),
    ("Ġ", "g"),
    ("s", "t"),
    ("l", "y"),
    ("Ġ", "T"),
    ("Ġ", "I"),
    ("Ġ", "is"),
    ("Ġ", "it"),
    ("u", "s"),
    ("v", "e"),
    ("Ġ", "H"),
];

/// `(content, special)` of the added tokens, in id order after the merges.
fn added(arch: Arch) -> &'static [(&'static str, bool)] {
    match arch {
        Arch::Qwen3 => &[
            ("<|endoftext|>", true),
            ("<|im_start|>", true),
            ("<|im_end|>", true),
            ("<think>", false),
            ("</think>", false),
        ],
        Arch::Llama => &[
            ("<|begin_of_text|>", true),
            ("<|end_of_text|>", true),
            ("<|start_header_id|>", true),
            ("<|end_header_id|>", true),
            ("<|eot_id|>", true),
        ],
    }
}

const BASE: u32 = 256 + MERGES.len() as u32;

/// Tokens of the tokenizer, added tokens included (320 for both families).
pub fn vocab_size(arch: Arch) -> u64 {
    u64::from(BASE) + added(arch).len() as u64
}

/// The id of an added token, if the family has it.
pub fn token_id(arch: Arch, content: &str) -> Option<u32> {
    added(arch)
        .iter()
        .position(|(c, _)| *c == content)
        .map(|i| BASE + i as u32)
}

/// Special token ids as `config.json` and `generation_config.json` name them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: u32,
    /// `eos_token_id` of `config.json` (one id for Qwen3; Llama 3 Instruct
    /// lists its end-of-text and end-of-turn tokens).
    pub config_eos: Vec<u32>,
    /// `eos_token_id` of `generation_config.json`.
    pub generation_eos: Vec<u32>,
    /// The padding token, where the family names one.
    pub pad: Option<u32>,
}

pub fn special_ids(arch: Arch) -> SpecialIds {
    let id = |c: &str| token_id(arch, c).expect("a token of the family");
    match arch {
        Arch::Qwen3 => SpecialIds {
            bos: id("<|endoftext|>"),
            config_eos: vec![id("<|im_end|>")],
            generation_eos: vec![id("<|im_end|>"), id("<|endoftext|>")],
            pad: Some(id("<|endoftext|>")),
        },
        Arch::Llama => SpecialIds {
            bos: id("<|begin_of_text|>"),
            config_eos: vec![id("<|end_of_text|>"), id("<|eot_id|>")],
            generation_eos: vec![id("<|end_of_text|>"), id("<|eot_id|>")],
            pad: None,
        },
    }
}

/// GPT-2's reversible map from bytes to printable characters, in its order:
/// the printable bytes keep their code point, the rest go to 256, 257, ...
fn byte_chars() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut out: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    for (next, b) in (256u32..).zip((0..=255u8).filter(|&b| !printable(b))) {
        out.push((b, char::from_u32(next).expect("below the surrogates")));
    }
    out
}

/// Syllables of the filler words (64, so three of them name 262,144 words).
const SYLLABLES: [&str; 64] = [
    "ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "va", "de", "zo", "fi", "gu", "be", "ra",
    "no", "sa", "ti", "mo", "le", "ki", "du", "pe", "ha", "ju", "wo", "xe", "yi", "ba", "co", "di",
    "fe", "ga", "hi", "jo", "ku", "la", "me", "nu", "pi", "qua", "ro", "se", "tu", "vi", "we",
    "ya", "zu", "an", "el", "in", "or", "um", "ar", "es", "is", "on", "ur", "al", "en", "it", "ol",
    "us", "ay",
];

/// A word for filler id `id`: a space and two or three syllables, unique per
/// id, never one of the byte or merge tokens (those are at most two
/// characters and have no syllable pairs after a space marker).
fn filler_word(id: u64) -> String {
    let n = SYLLABLES.len() as u64;
    let mut w = String::from("\u{120}"); // 'Ġ': a leading space, byte-level
    w.push_str(SYLLABLES[(id % n) as usize]);
    w.push_str(SYLLABLES[(id / n % n) as usize]);
    if id >= n * n {
        w.push_str(SYLLABLES[(id / (n * n) % n) as usize]);
    }
    w
}

/// The BPE vocabulary (without added tokens): token -> id. Ids from
/// [`vocab_size`] up to `model_vocab` (the model's embedding rows) are
/// filler words, so that text decoded from any id a random model picks is
/// readable (nonsense) words rather than nothing. No merge produces them, so
/// encoding is unchanged... except with `ignore_merges` (Llama), where a
/// pre-tokenized word equal to a filler word maps to it, as it would with a
/// real vocabulary.
fn bpe_vocab(arch: Arch, model_vocab: u64) -> Map<String, Value> {
    let mut vocab = Map::new();
    for (id, (_, c)) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(id));
    }
    for (rank, (a, b)) in MERGES.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(256 + rank));
    }
    let start = vocab_size(arch);
    for id in start..model_vocab {
        vocab.insert(filler_word(id - start), json!(id));
    }
    vocab
}

fn added_token(id: u32, content: &str, special: bool) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

/// Qwen2/Qwen3's pre-tokenizer split (digits one by one).
pub const QWEN3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's pre-tokenizer split (digits in groups of up to three).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.json`: the family's real normalizer, pre-tokenizer (regex
/// split, then byte-level), post-processor and decoder around the small BPE.
/// The split regex has a look-ahead, as the real files do: the Rust
/// `tokenizers` crate needs its `onig` (default) or `fancy-regex` feature.
/// `model_vocab`: the model's vocabulary size (embedding rows); ids past
/// the tokenizer's own tokens get filler words.
pub fn tokenizer_json(arch: Arch, model_vocab: u64) -> Value {
    let added_tokens: Vec<Value> = added(arch)
        .iter()
        .enumerate()
        .map(|(i, (c, s))| added_token(BASE + i as u32, c, *s))
        .collect();
    let split = |pattern: &str| {
        json!({
            "type": "Split",
            "pattern": {"Regex": pattern},
            "behavior": "Isolated",
            "invert": false,
        })
    };
    let (normalizer, pre_tokenizer, post_processor, decoder) = match arch {
        Arch::Qwen3 => {
            let byte_level = json!({
                "type": "ByteLevel",
                "add_prefix_space": false,
                "trim_offsets": false,
                "use_regex": false,
            });
            (
                json!({"type": "NFC"}),
                json!({
                    "type": "Sequence",
                    "pretokenizers": [split(QWEN3_SPLIT), byte_level],
                }),
                byte_level.clone(),
                byte_level,
            )
        }
        Arch::Llama => {
            let bos = "<|begin_of_text|>";
            let bos_id = token_id(arch, bos).expect("Llama has a BOS");
            let pre = json!({
                "type": "Sequence",
                "pretokenizers": [
                    split(LLAMA3_SPLIT),
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
                ],
            });
            let post = json!({
                "type": "Sequence",
                "processors": [
                    {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                    {
                        "type": "TemplateProcessing",
                        "single": [
                            {"SpecialToken": {"id": bos, "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}},
                        ],
                        "pair": [
                            {"SpecialToken": {"id": bos, "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": bos, "type_id": 1}},
                            {"Sequence": {"id": "B", "type_id": 1}},
                        ],
                        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
                    },
                ],
            });
            let decoder = json!({
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": true,
                "use_regex": true,
            });
            (Value::Null, pre, post, decoder)
        }
    };
    let merges: Vec<String> = MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": arch == Arch::Llama,
            "vocab": bpe_vocab(arch, model_vocab),
            "merges": merges,
        },
    })
}

/// ChatML, as Qwen3's template renders it without tools: one
/// `<|im_start|>role\ncontent<|im_end|>\n` per message, then the assistant
/// header; `enable_thinking=false` adds an empty think block.
pub const QWEN3_CHAT_TEMPLATE: &str = r#"{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"#;

/// The Llama 3 Instruct template: BOS, then
/// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` per message.
pub const LLAMA3_CHAT_TEMPLATE: &str = r#"{%- set loop_messages = messages %}
{%- for message in loop_messages %}
    {%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}
    {%- if loop.index0 == 0 %}
        {%- set content = bos_token + content %}
    {%- endif %}
    {{- content }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

/// `tokenizer_config.json`, shaped like the reference model's.
pub fn tokenizer_config_json(arch: Arch, model_max_length: u64) -> Value {
    let mut decoder = Map::new();
    for (i, (c, s)) in added(arch).iter().enumerate() {
        let id = BASE + i as u32;
        let mut t = added_token(id, c, *s);
        if let Some(o) = t.as_object_mut() {
            o.remove("id");
        }
        decoder.insert(id.to_string(), t);
    }
    match arch {
        Arch::Qwen3 => json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": null,
            "chat_template": QWEN3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": false,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": null,
        }),
        Arch::Llama => json!({
            "added_tokens_decoder": decoder,
            "bos_token": "<|begin_of_text|>",
            "chat_template": LLAMA3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": true,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn filler_words_fill_the_model_vocabulary_once_each() {
        for (arch, n) in [(Arch::Qwen3, 151_936u64), (Arch::Llama, 128_256)] {
            let vocab = bpe_vocab(arch, n);
            let start = vocab_size(arch);
            // Every id past the tokenizer's own appears exactly once.
            let ids: HashSet<u64> = vocab.values().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(vocab.len() as u64, u64::from(BASE) + (n - start));
            assert!((start..n).all(|i| ids.contains(&i)));
            assert!(vocab.keys().filter(|k| k.starts_with('\u{120}')).count() as u64 >= n - start);
        }
    }

    #[test]
    fn vocab_is_dense_and_merges_are_valid() {
        let vocab = bpe_vocab(Arch::Qwen3, 0);
        assert_eq!(vocab.len() as u32, BASE);
        let ids: HashSet<u64> = vocab.values().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(ids.len() as u32, BASE, "ids are unique");
        assert!(ids.iter().all(|&i| i < u64::from(BASE)));
        let mut known: HashSet<String> = byte_chars().iter().map(|(_, c)| c.to_string()).collect();
        assert_eq!(known.len(), 256);
        for (a, b) in MERGES {
            assert!(known.contains(a) && known.contains(b), "merge {a} {b}");
            assert!(known.insert(format!("{a}{b}")), "merge {a} {b} made twice");
        }
        for arch in Arch::ALL {
            assert_eq!(vocab_size(arch), 320);
            let ids = special_ids(arch);
            assert!(ids
                .config_eos
                .iter()
                .all(|&e| u64::from(e) < vocab_size(arch)));
        }
    }

    #[test]
    fn byte_map_matches_gpt2() {
        let m = byte_chars();
        assert_eq!(m[0], (b'!', '!'));
        let space = m.iter().find(|(b, _)| *b == b' ').unwrap().1;
        assert_eq!(space, 'Ġ');
        let newline = m.iter().find(|(b, _)| *b == b'\n').unwrap().1;
        assert_eq!(newline, 'Ċ');
    }
}
