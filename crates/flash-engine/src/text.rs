//! Text in and out: the model's `tokenizer.json` (through the `tokenizers`
//! crate) and its chat template (Jinja, from `tokenizer_config.json` or
//! `chat_template.jinja`, rendered with minijinja the way `transformers`'
//! `apply_chat_template` renders it).

use crate::error::EngineError;
use crate::Result;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The tokenizer and chat template of a model folder.
pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Other named special tokens of `tokenizer_config.json` (pad, unk),
    /// passed to the template as Hugging Face does.
    extra_tokens: Vec<(String, String)>,
}

/// `"<s>"` or `{"content": "<s>", ...}` (both appear in `tokenizer_config.json`).
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Reads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`
    /// and `dir/chat_template.jinja` (which wins over the config's template).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::config(
                &path,
                "missing: the model folder has no tokenizer.json",
            ));
        }
        let tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::config(&path, format!("cannot read the tokenizer: {e}")))?;
        let cpath = dir.join("tokenizer_config.json");
        let cfg: Value = if cpath.is_file() {
            let text = std::fs::read_to_string(&cpath).map_err(|source| EngineError::Io {
                path: cpath.clone(),
                source,
            })?;
            serde_json::from_str(&text)
                .map_err(|e| EngineError::config(&cpath, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let mut template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jpath = dir.join("chat_template.jinja");
        if jpath.is_file() {
            template = Some(
                std::fs::read_to_string(&jpath).map_err(|source| EngineError::Io {
                    path: jpath.clone(),
                    source,
                })?,
            );
        }
        let extra_tokens = ["pad_token", "unk_token"]
            .iter()
            .filter_map(|k| token_str(cfg.get(*k)).map(|v| (k.to_string(), v)))
            .collect();
        Ok(TextTokenizer {
            tok,
            template,
            bos_token: token_str(cfg.get("bos_token")),
            eos_token: token_str(cfg.get("eos_token")),
            extra_tokens,
        })
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's
    /// post-processor (Llama 3 prepends BOS), as `Tokenizer.encode(text)`
    /// does by default; a rendered chat template already holds its special
    /// tokens, so it is encoded without (as `apply_chat_template` does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tok
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer(format!("cannot decode: {e}")))
    }

    /// The id of a token's text, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// Renders the chat template for `messages` (`add_generation_prompt`
    /// true: the text ends with the assistant's header).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.template.as_deref().ok_or_else(|| {
            EngineError::Template(
                "the model has no chat template (tokenizer_config.json has no chat_template); \
                 pass the prompt raw"
                    .into(),
            )
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
            &self.extra_tokens,
        )
    }
}

/// Renders a Hugging Face chat template (Jinja) with the variables
/// `transformers` passes: `messages`, `add_generation_prompt`, `bos_token`,
/// `eos_token` (and other special tokens), `raise_exception`,
/// `strftime_now`; `trim_blocks` and `lstrip_blocks` on, Python string
/// methods (`.strip()`, `.startswith()`...) through minijinja's pycompat.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    extra_tokens: &[(String, String)],
) -> Result<String> {
    use minijinja::{Environment, Error, ErrorKind};
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> String {
        strftime_now(&fmt)
    });
    env.add_template("chat", template)
        .map_err(|e| EngineError::Template(format!("cannot parse: {e:#}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| EngineError::Template(e.to_string()))?;
    let mut ctx = serde_json::Map::new();
    ctx.insert(
        "messages".into(),
        serde_json::to_value(messages).map_err(|e| EngineError::Template(e.to_string()))?,
    );
    ctx.insert(
        "add_generation_prompt".into(),
        Value::Bool(add_generation_prompt),
    );
    for (k, v) in extra_tokens {
        ctx.insert(k.clone(), Value::String(v.clone()));
    }
    // Hugging Face passes these even when unset (as empty strings would
    // change templates that test `bos_token is defined`, unset ones stay out).
    if let Some(b) = bos_token {
        ctx.insert("bos_token".into(), Value::String(b.into()));
    }
    if let Some(e) = eos_token {
        ctx.insert("eos_token".into(), Value::String(e.into()));
    }
    tmpl.render(Value::Object(ctx))
        .map_err(|e| EngineError::Template(format!("cannot render: {e:#}")))
}

/// The current UTC date in a small subset of `strftime` (`%d %b %B %Y %m
/// %H %M %S %%`), enough for the date line of Llama 3 templates.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let tod = secs.rem_euclid(86_400);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Turns a growing list of token ids into text pieces, emitting only text
/// that is complete (no half UTF-8 character) and stable (later tokens do
/// not change it), without decoding the whole list each time.
pub struct StreamDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// The new text after `ids` grew (call after every push).
    pub fn step(&mut self, tok: &TextTokenizer, ids: &[u32]) -> Result<String> {
        let prefix = tok.decode(&ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    /// The constructs real templates (Qwen3, Llama 3.1) use: namespaces,
    /// reversed slices, `is string`, Python string methods, undefined
    /// `tools`, `strftime_now`.
    #[test]
    fn template_python_constructs() {
        let t = r#"{%- set ns = namespace(last_user=-1) %}
{%- for m in messages[::-1] %}
    {%- set i = (messages|length - 1) - loop.index0 %}
    {%- if ns.last_user < 0 and m.role == "user" and not m.content.startswith('<tool') %}
        {%- set ns.last_user = i %}
    {%- endif %}
{%- endfor %}
{%- if tools %}TOOLS{% endif %}
{%- for m in messages %}
    {%- if m.content is string %}{% set c = m.content %}{% else %}{% set c = '' %}{% endif %}
    {%- if '</think>' in c %}
        {%- set c = c.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '<' + m.role + '>' + c.strip() + ('*' if loop.index0 == ns.last_user else '') + '\n' }}
{%- endfor %}
{{- strftime_now('%Y')|length }}"#;
        let msgs = [
            Message::new("system", "S"),
            Message::new("user", "hi"),
            Message::new("assistant", "<think>x</think>\n\nans"),
            Message::new("user", " q "),
            Message::new("user", "<tool_response>r</tool_response>"),
        ];
        let out = render_chat_template(t, &msgs, true, None, None, &[]).unwrap();
        assert_eq!(
            out,
            "<system>S\n<user>hi\n<assistant>ans\n<user>q*\n<user><tool_response>r</tool_response>\n4"
        );
    }

    #[test]
    fn template_conventions() {
        let t = "{% for m in messages %}{{ bos_token }}{{ m['role'] }}:{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
        let msgs = [Message::new("user", "  hi  ")];
        let out = render_chat_template(t, &msgs, true, Some("<s>"), None, &[]).unwrap();
        assert_eq!(out, "<s>user:hi\nA:");
        let t = "{{ raise_exception('no system role') }}";
        let err = render_chat_template(t, &msgs, true, None, None, &[]).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
        let t = "{{ messages | tojson }}";
        let out = render_chat_template(t, &msgs, false, None, None, &[]).unwrap();
        assert!(out.contains("\"role\""), "{out}");
    }
}
