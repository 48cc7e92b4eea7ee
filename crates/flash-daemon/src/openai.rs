//! The OpenAI-compatible HTTP API of the daemon's engines, on its HTTP
//! listener (beside `/metrics` and `/health`):
//!
//! - `GET /v1/models`: the store's models, in OpenAI's list format;
//! - `POST /v1/completions`: `prompt` (a string, a list of one string, a
//!   list of token ids or a list of one such list) sent raw (with the
//!   tokenizer's special tokens);
//! - `POST /v1/chat/completions`: `messages` through the model's chat
//!   template (content as a string or a list of `{"type": "text"}` parts).
//!
//! Both take `model`, `max_tokens` (or `max_completion_tokens`; default 16
//! for completions as OpenAI's, 512 for chat, cut to what the context
//! leaves), `temperature`, `top_p`, `seed`, `stop` (a string or up to 4),
//! `stream` (server-sent events `data: {...}` ending with `data: [DONE]`),
//! `stream_options.include_usage`, and the extensions `top_k` and
//! `repetition_penalty` (Hugging Face's multiplicative penalty, as vLLM
//! accepts it). Sampling fields left out take the model's
//! `generation_config.json` defaults, as `flash run` does.
//! `frequency_penalty` and `presence_penalty` (OpenAI's additive
//! penalties) have no exact equivalent here: 0 is accepted, anything else
//! is refused with 400 and a pointer to `repetition_penalty`. `n` > 1,
//! `best_of` > 1, `logprobs`, `top_logprobs`, `echo`, `suffix`,
//! `logit_bias`, tools and response formats other than text are refused
//! likewise. Fields this API does not know are ignored.
//!
//! # Validation
//! Every field is checked for its type and range as OpenAI's API checks
//! them, before anything runs (`parse_request`): numbers must be numbers
//! (not `"7"`, `true` or `null` where a value is required; JSON has no NaN
//! or infinity, and numbers beyond f64 do not parse), integers integral,
//! `temperature` in [0, 2], `top_p` in (0, 1], penalties in [-2, 2],
//! `repetition_penalty` > 0, `max_tokens` >= 1. Once the prompt is
//! tokenized, `max_tokens` must fit in the model's context after it
//! ([`crate::serve::token_budget`]), and token ids in its vocabulary. The
//! request body is bounded ([`Limits`]: 16 MiB, 413 beyond) and must
//! arrive whole within a time limit (30 s, 408 after).
//!
//! Answers carry `usage` (token counts) and a `flash` object (prompt and
//! generated token ids, `load_s`, `ttft_s`, `tokens_per_s`, `device`, ...),
//! in the last chunk when streaming; the official `openai` client ignores it
//! and `flash run` reads it. Errors use OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}` with OpenAI's codes
//! (`invalid_type`, `decimal_above_max_value`, `missing_required_parameter`,
//! `context_length_exceeded`, `model_not_found`, ...): 400 for a bad
//! request, 404 for a model not in the store, 408 and 413 for bodies too
//! slow or too large, 503 when the tiers have no room for it now or the
//! machine has no memory for it, 500 otherwise.

use crate::serve::{
    EngineHost, GenEvent, GenRequest, MaxTokens, Prompt, Report, ServeError, Started,
};
use crate::server::DaemonHandle;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use flash_engine::{FinishReason, Message, SamplingRequest};
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// Limits on request bodies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Largest body accepted (413 beyond): `FLASH_HTTP_MAX_BODY` bytes,
    /// else 16 MiB.
    pub max_body_bytes: usize,
    /// Time for the whole body to arrive once the headers did (408
    /// after): `FLASH_HTTP_BODY_TIMEOUT` seconds, else 30.
    pub body_timeout: Duration,
}

/// The default [`Limits::max_body_bytes`].
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;
/// The default [`Limits::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

impl Limits {
    /// The defaults, overridden by `FLASH_HTTP_MAX_BODY` (bytes) and
    /// `FLASH_HTTP_BODY_TIMEOUT` (seconds, decimals allowed); a value that
    /// does not parse is reported and ignored.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut l = Limits::default();
        if let Some(v) = var("FLASH_HTTP_MAX_BODY") {
            match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => l.max_body_bytes = n,
                _ => {
                    tracing::warn!(value = %v, "FLASH_HTTP_MAX_BODY is not a positive number of bytes: ignored")
                }
            }
        }
        if let Some(v) = var("FLASH_HTTP_BODY_TIMEOUT") {
            match v.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => {
                    l.body_timeout = Duration::from_secs_f64(s)
                }
                _ => {
                    tracing::warn!(value = %v, "FLASH_HTTP_BODY_TIMEOUT is not a positive number of seconds: ignored")
                }
            }
        }
        l
    }
}

#[derive(Clone)]
struct Api {
    host: EngineHost,
    limits: Limits,
}

/// The routes of the OpenAI API, for [`crate::run`] (limits from the
/// environment, see [`Limits::from_env`]).
pub fn routes(daemon: &DaemonHandle) -> Router {
    router(EngineHost::new(daemon.clone()))
}

/// The routes on a given engine host.
pub fn router(host: EngineHost) -> Router {
    router_with(host, Limits::from_env())
}

/// The routes on a given engine host, with these body limits. Other paths
/// and methods get OpenAI-shaped 404 and 405 answers.
pub fn router_with(host: EngineHost, limits: Limits) -> Router {
    tracing::info!(
        max_body_bytes = limits.max_body_bytes,
        body_timeout_s = limits.body_timeout.as_secs_f64(),
        "OpenAI API limits"
    );
    Router::new()
        .route("/v1/models", get(list_models).fallback(wrong_method))
        .route("/v1/completions", post(completions).fallback(wrong_method))
        .route(
            "/v1/chat/completions",
            post(chat_completions).fallback(wrong_method),
        )
        .fallback(unknown_route)
        .with_state(Api { host, limits })
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// OpenAI's error object for `e`.
fn error_json(e: &ServeError) -> Value {
    json!({"error": {"message": e.to_string(), "type": e.kind(), "param": e.param(), "code": e.code()}})
}

fn error_response(e: &ServeError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &error_json(e))
}

fn plain_error(status: StatusCode, message: String) -> Response {
    json_response(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}}),
    )
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    plain_error(
        StatusCode::NOT_FOUND,
        format!(
            "Invalid URL ({method} {}): this server has /v1/models, /v1/completions and \
             /v1/chat/completions",
            clip(uri.path(), 200)
        ),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    let allowed = if uri.path() == "/v1/models" {
        "GET"
    } else {
        "POST"
    };
    let mut r = plain_error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "Invalid method {method} for {}: use {allowed}",
            clip(uri.path(), 200)
        ),
    );
    if let Ok(v) = header::HeaderValue::from_str(allowed) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:04x}",
        now(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

async fn list_models(State(api): State<Api>) -> Response {
    let h = api.host.clone();
    let models = match tokio::task::spawn_blocking(move || h.models()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return error_response(&e),
        Err(e) => return error_response(&ServeError::Internal(e.to_string())),
    };
    let data: Vec<Value> = models
        .into_iter()
        .map(|(id, created)| json!({"id": id, "object": "model", "created": created, "owned_by": "flashtensors"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

// ---------------------------------------------------------------------------
// The request body
// ---------------------------------------------------------------------------

/// Reads the whole body: at most `limits.max_body_bytes` (a larger
/// `Content-Length` is refused before reading), all of it within
/// `limits.body_timeout`.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limits: &Limits,
) -> Result<Vec<u8>, ServeError> {
    let max = limits.max_body_bytes;
    let too_large = |what: String| {
        ServeError::TooLarge(format!(
            "the request body is {what}, more than this server's limit of {max} bytes \
             (FLASH_HTTP_MAX_BODY)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(n) = declared {
        if n > max as u64 {
            return Err(too_large(format!("{n} bytes")));
        }
    }
    let read = async {
        let mut stream = body.into_data_stream();
        // Grown as bytes arrive (not reserved from `Content-Length`: a
        // client that declares 16 MiB and sends nothing holds nothing).
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| ServeError::bad(format!("the request body could not be read: {e}")))?;
            if buf.len() + chunk.len() > max {
                return Err(too_large(format!("over {max} bytes")));
            }
            buf.try_reserve(chunk.len()).map_err(|_| {
                ServeError::OutOfMemory(format!(
                    "no memory for a request body of {} bytes",
                    buf.len() + chunk.len()
                ))
            })?;
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(ServeError::Timeout(format!(
            "the request body did not arrive within {} s (FLASH_HTTP_BODY_TIMEOUT)",
            limits.body_timeout.as_secs_f64()
        ))),
    }
}

// ---------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------

/// At most this many characters of a value are quoted back in a message.
const QUOTE_MAX: usize = 80;
/// Most stop sequences (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// Longest stop sequence, in bytes (the stop scanner's work per token grows
/// with its square).
const MAX_STOP_BYTES: usize = 1024;

/// `s` cut to `max` characters (with an ellipsis when cut).
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A value as quoted back in a message: JSON text, cut short.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => clip(s, QUOTE_MAX),
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(_) => "an object".into(),
        v => clip(&v.to_string(), QUOTE_MAX),
    }
}

/// OpenAI's name of a value's type.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid_type(param: &str, expected: &str, got: &Value) -> ServeError {
    ServeError::invalid(
        param,
        Some("invalid_type"),
        format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            type_name(got)
        ),
    )
}

fn missing(param: &str) -> ServeError {
    ServeError::invalid(
        param,
        Some("missing_required_parameter"),
        format!("Missing required parameter: '{param}'."),
    )
}

fn unsupported_parameter(param: &str, why: &str) -> ServeError {
    ServeError::invalid(
        param,
        Some("unsupported_parameter"),
        format!("Unsupported parameter: '{param}' {why}"),
    )
}

fn unsupported_value(param: &str, why: String) -> ServeError {
    ServeError::invalid(
        param,
        Some("unsupported_value"),
        format!("Unsupported value: '{param}' {why}"),
    )
}

/// `Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 7 instead.`
fn out_of_range(param: &str, integer: bool, above: bool, bound: &str, got: &Value) -> ServeError {
    let kind = if integer { "integer" } else { "decimal" };
    let (side, code) = match (integer, above) {
        (true, true) => ("above maximum", "integer_above_max_value"),
        (true, false) => ("below minimum", "integer_below_min_value"),
        (false, true) => ("above maximum", "decimal_above_max_value"),
        (false, false) => ("below minimum", "decimal_below_min_value"),
    };
    ServeError::invalid(
        param,
        Some(code),
        format!(
            "Invalid '{param}': {kind} {side} value. Expected a value {bound}, but got {} instead.",
            show(got)
        ),
    )
}

/// A present, non-null field.
fn field<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

fn number(param: &str, v: &Value) -> Result<f64, ServeError> {
    match v {
        // JSON numbers are finite (serde_json refuses NaN, Infinity and
        // numbers beyond f64's range); checked anyway.
        Value::Number(n) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| invalid_type(param, "a finite number", v)),
        _ => Err(invalid_type(param, "a number", v)),
    }
}

/// An integer (integral decimals such as `16.0` too), saturated to i128.
fn integer(param: &str, v: &Value) -> Result<i128, ServeError> {
    let Value::Number(n) = v else {
        return Err(invalid_type(param, "an integer", v));
    };
    if let Some(i) = n.as_i64() {
        return Ok(i128::from(i));
    }
    if let Some(u) = n.as_u64() {
        return Ok(i128::from(u));
    }
    match n.as_f64() {
        // `as` saturates: 1e300 is "above any maximum", as it should be.
        Some(x) if x.is_finite() && x.fract() == 0.0 => Ok(x as i128),
        _ => Err(invalid_type(param, "an integer", v)),
    }
}

fn boolean(param: &str, v: &Value) -> Result<bool, ServeError> {
    v.as_bool()
        .ok_or_else(|| invalid_type(param, "a boolean", v))
}

fn opt_number(
    o: &Map<String, Value>,
    key: &str,
    min: Option<(f64, bool)>,
    max: f64,
) -> Result<Option<f64>, ServeError> {
    let Some(v) = field(o, key) else {
        return Ok(None);
    };
    let x = number(key, v)?;
    if let Some((lo, inclusive)) = min {
        if x < lo || (!inclusive && x == lo) {
            let bound = if inclusive {
                format!(">= {lo}")
            } else {
                format!("> {lo}")
            };
            return Err(out_of_range(key, false, false, &bound, v));
        }
    }
    if x > max {
        return Err(out_of_range(key, false, true, &format!("<= {max}"), v));
    }
    Ok(Some(x))
}

fn opt_integer(o: &Map<String, Value>, key: &str, min: i128) -> Result<Option<i128>, ServeError> {
    let Some(v) = field(o, key) else {
        return Ok(None);
    };
    let n = integer(key, v)?;
    if n < min {
        return Err(out_of_range(key, true, false, &format!(">= {min}"), v));
    }
    Ok(Some(n))
}

fn opt_bool(o: &Map<String, Value>, key: &str) -> Result<bool, ServeError> {
    field(o, key).map_or(Ok(false), |v| boolean(key, v))
}

/// What both endpoints share.
#[derive(Debug)]
struct Common {
    model: String,
    max_tokens: MaxTokens,
    sampling: SamplingRequest,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn model_field(o: &Map<String, Value>) -> Result<String, ServeError> {
    match field(o, "model") {
        None => Err(missing("model")),
        Some(Value::String(s)) if s.is_empty() => Err(ServeError::invalid(
            "model",
            Some("invalid_value"),
            "Invalid 'model': empty string. Expected a store name ORG/NAME (see GET /v1/models).",
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(invalid_type("model", "a string", v)),
    }
}

fn max_tokens_field(o: &Map<String, Value>, kind: Kind) -> Result<MaxTokens, ServeError> {
    let mut out = None;
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = opt_integer(o, key, 1)? {
            let n = u64::try_from(n).map_err(|_| {
                out_of_range(
                    key,
                    true,
                    true,
                    &format!("<= {}", u64::MAX),
                    field(o, key).unwrap_or(&Value::Null),
                )
            })?;
            // `max_tokens` wins when both are given.
            out.get_or_insert(MaxTokens::Requested { n, param: key });
        }
    }
    let default = if kind == Kind::Chat { 512 } else { 16 };
    Ok(out.unwrap_or(MaxTokens::Default(default)))
}

fn stop_field(o: &Map<String, Value>) -> Result<Vec<String>, ServeError> {
    let check = |param: &str, s: &str| {
        if s.len() > MAX_STOP_BYTES {
            return Err(ServeError::invalid(
                param,
                Some("string_above_max_length"),
                format!(
                    "Invalid '{param}': string too long. Expected a string with maximum length \
                     {MAX_STOP_BYTES} bytes, but got a string with length {} instead.",
                    s.len()
                ),
            ));
        }
        Ok(s.to_string())
    };
    match field(o, "stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![check("stop", s)?]),
        Some(Value::Array(a)) => {
            if a.len() > MAX_STOPS {
                return Err(ServeError::invalid(
                    "stop",
                    Some("array_above_max_length"),
                    format!(
                        "Invalid 'stop': array too long. Expected an array with maximum length \
                         {MAX_STOPS}, but got an array with length {} instead.",
                        a.len()
                    ),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| {
                    let param = format!("stop[{i}]");
                    match v {
                        Value::String(s) => check(&param, s),
                        v => Err(invalid_type(&param, "a string", v)),
                    }
                })
                .collect()
        }
        Some(v) => Err(invalid_type("stop", "a string or an array of strings", v)),
    }
}

/// Fields refused because this server does not do what they ask (null,
/// false, 0 and empty values ask for nothing and pass).
fn unsupported_fields(o: &Map<String, Value>, kind: Kind) -> Result<(), ServeError> {
    for key in ["frequency_penalty", "presence_penalty"] {
        if let Some(x) = opt_number(o, key, Some((-2.0, true)), 2.0)? {
            if x != 0.0 {
                return Err(unsupported_value(
                    key,
                    format!(
                        "{x}: OpenAI's additive penalties are not supported; use \
                         repetition_penalty (Hugging Face's multiplicative penalty, e.g. 1.1)"
                    ),
                ));
            }
        }
    }
    if let Some(n) = opt_integer(o, "n", 1)? {
        if n != 1 {
            return Err(unsupported_value(
                "n",
                format!("{n}: only one choice per request (n = 1) is supported"),
            ));
        }
    }
    if let Some(b) = opt_integer(o, "best_of", 1)? {
        if b != 1 {
            return Err(unsupported_value(
                "best_of",
                format!("{b}: only best_of = 1 is supported"),
            ));
        }
    }
    match field(o, "logprobs") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) | Some(Value::Number(_)) => {
            return Err(unsupported_parameter(
                "logprobs",
                "is not supported by this server (no log probabilities are returned).",
            ))
        }
        Some(v) => {
            let expected = match kind {
                Kind::Chat => "a boolean",
                Kind::Completion => "an integer",
            };
            return Err(invalid_type("logprobs", expected, v));
        }
    }
    if let Some(k) = opt_integer(o, "top_logprobs", 0)? {
        if k != 0 {
            return Err(unsupported_parameter(
                "top_logprobs",
                "is not supported by this server (no log probabilities are returned).",
            ));
        }
    }
    if opt_bool(o, "echo")? {
        return Err(unsupported_parameter(
            "echo",
            "is not supported by this server.",
        ));
    }
    match field(o, "suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(_)) => {
            return Err(unsupported_parameter(
                "suffix",
                "is not supported by this server (no insertion).",
            ))
        }
        Some(v) => return Err(invalid_type("suffix", "a string", v)),
    }
    match field(o, "logit_bias") {
        None => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(Value::Object(_)) => {
            return Err(unsupported_parameter(
                "logit_bias",
                "is not supported by this server.",
            ))
        }
        Some(v) => return Err(invalid_type("logit_bias", "an object", v)),
    }
    for key in ["tools", "functions"] {
        match field(o, key) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::Array(_)) => {
                return Err(unsupported_parameter(
                    key,
                    "is not supported by this server (no tool calls).",
                ))
            }
            Some(v) => return Err(invalid_type(key, "an array", v)),
        }
    }
    match field(o, "response_format") {
        None => {}
        Some(Value::Object(f)) => match field(f, "type") {
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) => {
                return Err(unsupported_value(
                    "response_format.type",
                    format!(
                        "{:?}: only \"text\" is supported by this server.",
                        clip(t, QUOTE_MAX)
                    ),
                ))
            }
            Some(v) => return Err(invalid_type("response_format.type", "a string", v)),
            None => return Err(missing("response_format.type")),
        },
        Some(v) => return Err(invalid_type("response_format", "an object", v)),
    }
    if let Some(v) = field(o, "user") {
        if !v.is_string() {
            return Err(invalid_type("user", "a string", v));
        }
    }
    Ok(())
}

fn common(o: &Map<String, Value>, kind: Kind) -> Result<Common, ServeError> {
    let model = model_field(o)?;
    let max_tokens = max_tokens_field(o, kind)?;
    unsupported_fields(o, kind)?;
    let stop = stop_field(o)?;
    let temperature = opt_number(o, "temperature", Some((0.0, true)), 2.0)?;
    let top_p = opt_number(o, "top_p", Some((0.0, false)), 1.0)?;
    let repetition_penalty = opt_number(o, "repetition_penalty", Some((0.0, false)), f64::MAX)?;
    // vLLM's convention: -1 (and 0) mean no top-k.
    let top_k =
        opt_integer(o, "top_k", -1)?.map(|k| usize::try_from(k.max(0)).unwrap_or(usize::MAX));
    let seed = match field(o, "seed") {
        None => None,
        Some(v) => {
            let s = integer("seed", v)?;
            if s < i128::from(i64::MIN) {
                return Err(out_of_range(
                    "seed",
                    true,
                    false,
                    &format!(">= {}", i64::MIN),
                    v,
                ));
            }
            if s > i128::from(u64::MAX) {
                return Err(out_of_range(
                    "seed",
                    true,
                    true,
                    &format!("<= {}", u64::MAX),
                    v,
                ));
            }
            // OpenAI's seed may be negative; any integer names one stream.
            Some(if s < 0 { s as i64 as u64 } else { s as u64 })
        }
    };
    let stream = opt_bool(o, "stream")?;
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => {
            if !stream {
                return Err(ServeError::invalid(
                    "stream_options",
                    Some("invalid_value"),
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                ));
            }
            match field(so, "include_usage") {
                None => false,
                Some(v) => boolean("stream_options.include_usage", v)?,
            }
        }
        Some(v) => return Err(invalid_type("stream_options", "an object", v)),
    };
    Ok(Common {
        model,
        max_tokens,
        sampling: SamplingRequest {
            temperature: temperature.map(|t| t as f32),
            // A positive f64 too small for f32 would round to 0, and one too
            // large to infinity, which both fields refuse: keep them in f32's
            // positive range.
            top_p: top_p.map(|p| (p as f32).max(f32::MIN_POSITIVE)),
            top_k,
            repetition_penalty: repetition_penalty
                .map(|r| (r as f32).clamp(f32::MIN_POSITIVE, f32::MAX)),
            seed,
        },
        stop,
        stream,
        include_usage,
    })
}

fn body_object(body: &[u8]) -> Result<Map<String, Value>, ServeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ServeError::bad(
            "The request body is empty: the API expects a JSON object \
             (Content-Type: application/json).",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(v) => Err(ServeError::bad(format!(
            "The request body must be a JSON object, but it is {}.",
            type_name(&v)
        ))),
        Err(e) => Err(ServeError::bad(format!(
            "We could not parse the JSON body of your request ({e}). The API expects a JSON \
             object (Content-Type: application/json)."
        ))),
    }
}

/// A list of token ids (`param` names it in errors); ids above u32 are
/// outside every vocabulary (the model's own size is checked later).
fn token_ids(param: &str, a: &[Value]) -> Result<Vec<u32>, ServeError> {
    let mut ids = Vec::new();
    ids.try_reserve_exact(a.len())
        .map_err(|_| ServeError::OutOfMemory(format!("no memory for {} token ids", a.len())))?;
    for (i, v) in a.iter().enumerate() {
        let p = format!("{param}[{i}]");
        let t = integer(&p, v)?;
        let id = u32::try_from(t).map_err(|_| {
            ServeError::invalid(
                &p,
                Some("invalid_value"),
                format!(
                    "Invalid '{p}': token id {} is outside the vocabulary.",
                    show(v)
                ),
            )
        })?;
        ids.push(id);
    }
    Ok(ids)
}

fn completion_prompt(o: &Map<String, Value>) -> Result<Prompt, ServeError> {
    let one_prompt = |n: usize| {
        unsupported_value(
            "prompt",
            format!("has {n} prompts: one prompt per request is supported (n = 1)"),
        )
    };
    let empty = || {
        ServeError::invalid(
            "prompt",
            Some("empty_array"),
            "Invalid 'prompt': empty array. Expected an array with minimum length 1, but got an \
             empty array instead.",
        )
    };
    match field(o, "prompt") {
        None => Err(missing("prompt")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) => match a.first() {
            None => Err(empty()),
            Some(Value::String(_)) => {
                if let Some((i, v)) = a.iter().enumerate().find(|(_, v)| !v.is_string()) {
                    return Err(invalid_type(&format!("prompt[{i}]"), "a string", v));
                }
                match a.as_slice() {
                    [Value::String(s)] => Ok(Prompt::Text(s.clone())),
                    _ => Err(one_prompt(a.len())),
                }
            }
            Some(Value::Number(_)) => Ok(Prompt::Tokens(token_ids("prompt", a)?)),
            Some(Value::Array(inner)) => {
                if a.len() > 1 {
                    return Err(one_prompt(a.len()));
                }
                if inner.is_empty() {
                    return Err(empty());
                }
                Ok(Prompt::Tokens(token_ids("prompt[0]", inner)?))
            }
            Some(v) => Err(invalid_type(
                "prompt[0]",
                "a string, a token id or an array of token ids",
                v,
            )),
        },
        Some(v) => Err(invalid_type(
            "prompt",
            "a string, an array of strings or an array of token ids",
            v,
        )),
    }
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn chat_messages(o: &Map<String, Value>) -> Result<Prompt, ServeError> {
    let list = match field(o, "messages") {
        None => return Err(missing("messages")),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(invalid_type("messages", "an array", v)),
    };
    if list.is_empty() {
        return Err(ServeError::invalid(
            "messages",
            Some("empty_array"),
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got \
             an empty array instead.",
        ));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(list.len())
        .map_err(|_| ServeError::OutOfMemory(format!("no memory for {} messages", list.len())))?;
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(invalid_type(&format!("messages[{i}]"), "an object", m));
        };
        let role = match field(m, "role") {
            None => return Err(missing(&format!("messages[{i}].role"))),
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
            Some(Value::String(r)) => {
                return Err(ServeError::invalid(
                    format!("messages[{i}].role"),
                    Some("invalid_value"),
                    format!(
                        "Invalid value: '{}'. Supported values are: 'system', 'developer', \
                         'user', 'assistant', 'tool' and 'function'.",
                        clip(r, QUOTE_MAX)
                    ),
                ))
            }
            Some(v) => return Err(invalid_type(&format!("messages[{i}].role"), "a string", v)),
        };
        if let Some(v) = field(m, "name") {
            if !v.is_string() {
                return Err(invalid_type(&format!("messages[{i}].name"), "a string", v));
            }
        }
        // OpenAI's newer name for the system role.
        let role = if role == "developer" { "system" } else { role };
        let content = match field(m, "content") {
            Some(Value::String(s)) => s.clone(),
            // An assistant turn may have no content (tool calls).
            None if role == "assistant" => String::new(),
            None => return Err(missing(&format!("messages[{i}].content"))),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    let param = format!("messages[{i}].content[{j}]");
                    let Value::Object(p) = p else {
                        return Err(invalid_type(&param, "an object", p));
                    };
                    match field(p, "type") {
                        Some(Value::String(t)) if t == "text" => match field(p, "text") {
                            Some(Value::String(t)) => s.push_str(t),
                            Some(v) => {
                                return Err(invalid_type(&format!("{param}.text"), "a string", v))
                            }
                            None => return Err(missing(&format!("{param}.text"))),
                        },
                        Some(Value::String(t)) => {
                            return Err(unsupported_value(
                                &format!("{param}.type"),
                                format!(
                                    "{:?}: only text content parts are supported by this server.",
                                    clip(t, QUOTE_MAX)
                                ),
                            ))
                        }
                        Some(v) => {
                            return Err(invalid_type(&format!("{param}.type"), "a string", v))
                        }
                        None => return Err(missing(&format!("{param}.type"))),
                    }
                }
                s
            }
            Some(v) => {
                return Err(invalid_type(
                    &format!("messages[{i}].content"),
                    "a string or an array of content parts",
                    v,
                ))
            }
        };
        out.push(Message::new(role, &content));
    }
    Ok(Prompt::Chat(out))
}

/// A request body of `kind`, validated: what to generate, or the 400 (or
/// other error) that says what is wrong with it.
fn parse_request(body: &[u8], kind: Kind) -> Result<(Common, Prompt), ServeError> {
    let o = body_object(body)?;
    let c = common(&o, kind)?;
    let prompt = match kind {
        Kind::Completion => completion_prompt(&o)?,
        Kind::Chat => chat_messages(&o)?,
    };
    Ok((c, prompt))
}

// ---------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage(started: &Started, r: &Report) -> Value {
    let p = started.prompt_token_ids.len();
    let c = r.token_ids.len();
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// The `flash` extension object: what `flash run` prints.
fn flash_report(started: &Started, r: &Report) -> Value {
    json!({
        "device": started.device,
        "prompt_token_ids": started.prompt_token_ids,
        "token_ids": r.token_ids,
        "finish_reason": r.finish_reason.as_str(),
        "load_s": r.load_s,
        "resident_s": r.resident_s,
        "engine_s": r.engine_s,
        "served_from": r.served_from,
        "queue_s": r.queue_s,
        "ttft_s": r.ttft_s,
        "prefill_s": r.prefill_s,
        "decode_s": r.decode_s,
        "tokens_per_s": r.tokens_per_s,
        "seed": r.seed,
    })
}

async fn completions(State(api): State<Api>, req: Request) -> Response {
    handle(api, req, Kind::Completion).await
}

async fn chat_completions(State(api): State<Api>, req: Request) -> Response {
    handle(api, req, Kind::Chat).await
}

async fn handle(api: Api, req: Request, kind: Kind) -> Response {
    let (parts, body) = req.into_parts();
    let body = match read_body(&parts.headers, body, &api.limits).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(error = %e, "request body refused");
            return error_response(&e);
        }
    };
    // A multi-megabyte body parses in tens of milliseconds: off the reactor.
    let parsed = if body.len() > 1 << 20 {
        tokio::task::spawn_blocking(move || parse_request(&body, kind))
            .await
            .unwrap_or_else(|e| Err(ServeError::Internal(format!("parsing failed: {e}"))))
    } else {
        parse_request(&body, kind)
    };
    let (c, prompt) = match parsed {
        Ok(x) => x,
        Err(e) => return error_response(&e),
    };
    let host = api.host;
    let req = GenRequest {
        model: c.model.clone(),
        prompt,
        max_tokens: c.max_tokens,
        sampling: c.sampling.clone(),
        stop: c.stop.clone(),
    };
    let mut rx = host.submit(req);
    // Errors before the first event (unknown model, no room, a bad prompt)
    // get their status code, streaming or not.
    let started = match rx.recv().await {
        Some(GenEvent::Started(s)) => s,
        Some(GenEvent::Error(e)) => return error_response(&e),
        Some(_) | None => {
            return error_response(&ServeError::Internal(
                "the engine ended without an answer".into(),
            ))
        }
    };
    let id = request_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    if c.stream {
        stream_answer(rx, started, id, kind, c.include_usage).into_response()
    } else {
        whole_answer(rx, started, id, kind).await
    }
}

async fn whole_answer(
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    started: Started,
    id: String,
    kind: Kind,
) -> Response {
    let mut report = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Text(_) | GenEvent::Started(_) => {}
            GenEvent::Done(r) => report = Some(r),
            GenEvent::Error(e) => return error_response(&e),
        }
    }
    let Some(r) = report else {
        return error_response(&ServeError::Internal(
            "the engine ended without a report".into(),
        ));
    };
    let finish = finish_str(r.finish_reason);
    let choice = match kind {
        Kind::Completion => {
            json!({"index": 0, "text": r.text, "logprobs": null, "finish_reason": finish})
        }
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": null,
            "finish_reason": finish,
        }),
    };
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    json_response(
        StatusCode::OK,
        &json!({
            "id": id,
            "object": object,
            "created": now(),
            "model": started.model,
            "choices": [choice],
            "usage": usage(&started, &r),
            "flash": flash_report(&started, &r),
        }),
    )
}

fn stream_answer(
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    started: Started,
    id: String,
    kind: Kind,
    include_usage: bool,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let created = now();
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    let model = started.model.clone();
    let chunk = move |choice: Value, extra: Option<(&str, Value)>| {
        let mut v = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) },
        });
        if let (Some((k, x)), Some(o)) = (extra, v.as_object_mut()) {
            o.insert(k.to_string(), x);
        }
        Event::default().data(v.to_string())
    };
    let (tx, out) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let piece = |text: &str| match kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null})
            }
            Kind::Chat => {
                json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
            }
        };
        if kind == Kind::Chat {
            let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            if tx.send(Ok(chunk(first, None))).is_err() {
                return;
            }
        }
        loop {
            // The client going away (the response body dropped) ends this
            // task even while the engine sends nothing, and dropping `rx`
            // cancels generation at its next token.
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = tx.closed() => return,
            };
            let Some(ev) = ev else { break };
            let event = match ev {
                GenEvent::Started(_) => continue,
                GenEvent::Text(t) => chunk(piece(&t), None),
                GenEvent::Done(r) => {
                    let finish = finish_str(r.finish_reason);
                    let last = match kind {
                        Kind::Completion => {
                            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish})
                        }
                        Kind::Chat => {
                            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})
                        }
                    };
                    let _ = tx.send(Ok(chunk(last, Some(("flash", flash_report(&started, &r))))));
                    if include_usage {
                        let _ =
                            tx.send(Ok(chunk(Value::Null, Some(("usage", usage(&started, &r))))));
                    }
                    break;
                }
                GenEvent::Error(e) => {
                    // Mid-stream: the status line is sent; OpenAI's clients
                    // raise on an `error` object in the stream.
                    let _ = tx.send(Ok(Event::default().data(error_json(&e).to_string())));
                    break;
                }
            };
            if tx.send(Ok(event)).is_err() {
                // The client went away: dropping `rx` cancels generation.
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
    });
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;

    fn parse(kind: Kind, body: &str) -> Result<(Common, Prompt), ServeError> {
        parse_request(body.as_bytes(), kind)
    }

    /// The status, param and code of the error `body` gets.
    fn refusal(kind: Kind, body: &str) -> (u16, Option<String>, Option<&'static str>, String) {
        match parse(kind, body) {
            Ok(_) => panic!("accepted: {body}"),
            Err(e) => (
                e.status(),
                e.param().map(str::to_string),
                e.code(),
                e.to_string(),
            ),
        }
    }

    const CHAT: &str = r#""model": "o/m", "messages": [{"role": "user", "content": "hi"}]"#;
    const COMP: &str = r#""model": "o/m", "prompt": "hi""#;

    #[test]
    fn good_requests_parse_with_their_values() {
        let (c, p) = parse(
            Kind::Completion,
            &format!(
                r#"{{{COMP}, "max_tokens": 16.0, "temperature": 0.5, "top_p": 1, "top_k": -1,
                "seed": -3, "stop": ["a", "b"], "stream": true,
                "stream_options": {{"include_usage": true}}, "n": 1, "logprobs": null,
                "frequency_penalty": 0, "repetition_penalty": 1.1, "unknown_field": [1, {{}}],
                "user": "me", "logit_bias": {{}}, "suffix": ""}}"#
            ),
        )
        .unwrap();
        assert_eq!(c.model, "o/m");
        assert_eq!(
            c.max_tokens,
            MaxTokens::Requested {
                n: 16,
                param: "max_tokens"
            }
        );
        assert_eq!(c.sampling.temperature, Some(0.5));
        assert_eq!(c.sampling.top_p, Some(1.0));
        assert_eq!(c.sampling.top_k, Some(0));
        assert_eq!(c.sampling.seed, Some(-3i64 as u64));
        assert_eq!(c.sampling.repetition_penalty, Some(1.1));
        assert_eq!(c.stop, ["a", "b"]);
        assert!(c.stream && c.include_usage);
        assert!(matches!(p, Prompt::Text(t) if t == "hi"));

        // Defaults: 16 for completions, 512 for chat (cut to the context later).
        let (c, _) = parse(Kind::Completion, &format!("{{{COMP}}}")).unwrap();
        assert_eq!(c.max_tokens, MaxTokens::Default(16));
        assert!(!c.stream);
        let (c, p) = parse(
            Kind::Chat,
            r#"{"model": "o/m", "max_completion_tokens": 9, "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null}, {"role": "user", "content": "c", "name": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.max_tokens,
            MaxTokens::Requested {
                n: 9,
                param: "max_completion_tokens"
            }
        );
        let Prompt::Chat(m) = p else {
            panic!("not a chat")
        };
        assert_eq!(m[0], Message::new("system", "ab"));
        assert_eq!(m[1], Message::new("assistant", ""));
        assert_eq!(m[2], Message::new("user", "c"));

        for (prompt, want) in [
            ("[1, 2, 3]", vec![1u32, 2, 3]),
            ("[[7, 4294967295]]", vec![7, u32::MAX]),
        ] {
            let body = format!(r#"{{"model": "o/m", "prompt": {prompt}}}"#);
            let (_, p) = parse(Kind::Completion, &body).unwrap();
            assert!(matches!(&p, Prompt::Tokens(t) if *t == want), "{p:?}");
        }
        let (_, p) = parse(Kind::Completion, r#"{"model": "o/m", "prompt": ["x"]}"#).unwrap();
        assert!(matches!(p, Prompt::Text(t) if t == "x"));

        // Valid values beyond f32's range stay valid for the engine.
        let (c, _) = parse(
            Kind::Completion,
            &format!(r#"{{{COMP}, "top_p": 5e-324, "repetition_penalty": 1e308}}"#),
        )
        .unwrap();
        assert_eq!(c.sampling.top_p, Some(f32::MIN_POSITIVE));
        assert_eq!(c.sampling.repetition_penalty, Some(f32::MAX));
        assert_eq!(c.sampling.resolve(&Default::default()).validate(), Ok(()));
    }

    #[test]
    fn bad_requests_name_the_field_and_openai_code() {
        let cases: &[(Kind, String, &str, &str)] = &[
            (Kind::Chat, format!(r#"{{{CHAT}, "top_p": 7}}"#), "top_p", "decimal_above_max_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "top_p": 0}}"#), "top_p", "decimal_below_min_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "top_p": "7"}}"#), "top_p", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "temperature": 2.01}}"#), "temperature", "decimal_above_max_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "temperature": false}}"#), "temperature", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "max_tokens": 0}}"#), "max_tokens", "integer_below_min_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "max_tokens": 2.5}}"#), "max_tokens", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "max_tokens": "7"}}"#), "max_tokens", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "max_tokens": 1000000000000000000000000}}"#), "max_tokens", "integer_above_max_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "max_completion_tokens": -1}}"#), "max_completion_tokens", "integer_below_min_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "n": 2}}"#), "n", "unsupported_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "n": 0}}"#), "n", "integer_below_min_value"),
            (Kind::Completion, format!(r#"{{{COMP}, "best_of": 3}}"#), "best_of", "unsupported_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "stop": ["a","b","c","d","e"]}}"#), "stop", "array_above_max_length"),
            (Kind::Chat, format!(r#"{{{CHAT}, "stop": [null]}}"#), "stop[0]", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "stop": {{}}}}"#), "stop", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "seed": 1.5}}"#), "seed", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "seed": 1e30}}"#), "seed", "integer_above_max_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "stream": 1}}"#), "stream", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "stream_options": {{"include_usage": true}}}}"#), "stream_options", "invalid_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "stream": true, "stream_options": {{"include_usage": "y"}}}}"#), "stream_options.include_usage", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "logprobs": true}}"#), "logprobs", "unsupported_parameter"),
            (Kind::Completion, format!(r#"{{{COMP}, "logprobs": 2}}"#), "logprobs", "unsupported_parameter"),
            (Kind::Chat, format!(r#"{{{CHAT}, "logprobs": "x"}}"#), "logprobs", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "top_logprobs": 3}}"#), "top_logprobs", "unsupported_parameter"),
            (Kind::Completion, format!(r#"{{{COMP}, "echo": true}}"#), "echo", "unsupported_parameter"),
            (Kind::Completion, format!(r#"{{{COMP}, "suffix": "x"}}"#), "suffix", "unsupported_parameter"),
            (Kind::Chat, format!(r#"{{{CHAT}, "logit_bias": {{"1": 5}}}}"#), "logit_bias", "unsupported_parameter"),
            (Kind::Chat, format!(r#"{{{CHAT}, "frequency_penalty": -2.5}}"#), "frequency_penalty", "decimal_below_min_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "presence_penalty": 1}}"#), "presence_penalty", "unsupported_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "repetition_penalty": 0}}"#), "repetition_penalty", "decimal_below_min_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "top_k": -2}}"#), "top_k", "integer_below_min_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "top_k": null, "user": 5}}"#), "user", "invalid_type"),
            (Kind::Chat, format!(r#"{{{CHAT}, "response_format": {{"type": "json_schema"}}}}"#), "response_format.type", "unsupported_value"),
            (Kind::Chat, format!(r#"{{{CHAT}, "tools": [{{}}]}}"#), "tools", "unsupported_parameter"),
            (Kind::Chat, r#"{"messages": []}"#.into(), "model", "missing_required_parameter"),
            (Kind::Chat, r#"{"model": ["o/m"], "messages": []}"#.into(), "model", "invalid_type"),
            (Kind::Chat, r#"{"model": "o/m", "messages": []}"#.into(), "messages", "empty_array"),
            (Kind::Chat, r#"{"model": "o/m"}"#.into(), "messages", "missing_required_parameter"),
            (Kind::Chat, r#"{"model": "o/m", "messages": [1]}"#.into(), "messages[0]", "invalid_type"),
            (Kind::Chat, r#"{"model": "o/m", "messages": [{"role": "x", "content": ""}]}"#.into(), "messages[0].role", "invalid_value"),
            (Kind::Chat, r#"{"model": "o/m", "messages": [{"role": "user"}]}"#.into(), "messages[0].content", "missing_required_parameter"),
            (Kind::Chat, r#"{"model": "o/m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}"#.into(), "messages[0].content[0].type", "unsupported_value"),
            (Kind::Chat, r#"{"model": "o/m", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}"#.into(), "messages[0].content[0].text", "invalid_type"),
            (Kind::Completion, r#"{"model": "o/m"}"#.into(), "prompt", "missing_required_parameter"),
            (Kind::Completion, r#"{"model": "o/m", "prompt": []}"#.into(), "prompt", "empty_array"),
            (Kind::Completion, r#"{"model": "o/m", "prompt": ["a", "b"]}"#.into(), "prompt", "unsupported_value"),
            (Kind::Completion, r#"{"model": "o/m", "prompt": ["a", 1]}"#.into(), "prompt[1]", "invalid_type"),
            (Kind::Completion, r#"{"model": "o/m", "prompt": [1, -1]}"#.into(), "prompt[1]", "invalid_value"),
            (Kind::Completion, r#"{"model": "o/m", "prompt": [1, 4294967296]}"#.into(), "prompt[1]", "invalid_value"),
            (Kind::Completion, r#"{"model": "o/m", "prompt": [1, "a"]}"#.into(), "prompt[1]", "invalid_type"),
            (Kind::Completion, r#"{"model": "o/m", "prompt": [[1], [2]]}"#.into(), "prompt", "unsupported_value"),
            (Kind::Completion, r#"{"model": "o/m", "prompt": true}"#.into(), "prompt", "invalid_type"),
        ];
        for (kind, body, param, code) in cases {
            let (status, p, c, msg) = refusal(*kind, body);
            assert_eq!(status, 400, "{body}: {msg}");
            assert_eq!(p.as_deref(), Some(*param), "{body}: {msg}");
            assert_eq!(c, Some(*code), "{body}: {msg}");
        }
        // OpenAI's wording.
        let (_, _, _, msg) = refusal(Kind::Chat, &format!(r#"{{{CHAT}, "top_p": 7}}"#));
        assert_eq!(
            msg,
            "Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 7 instead."
        );
        let (_, _, _, msg) = refusal(Kind::Chat, &format!(r#"{{{CHAT}, "max_tokens": "7"}}"#));
        assert_eq!(
            msg,
            "Invalid type for 'max_tokens': expected an integer, but got a string instead."
        );
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_400() {
        let deep = format!(
            r#"{{"model": "o/m", "prompt": {}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        for body in [
            "",
            "  \n",
            "{",
            "[1]",
            "\"x\"",
            r#"{"model": "o/m", "prompt": "x", "temperature": NaN}"#,
            r#"{"model": "o/m", "prompt": "x", "temperature": -Infinity}"#,
            r#"{"model": "o/m", "prompt": "x", "max_tokens": 1e400}"#,
            r#"{"model": "o/m", "prompt": "\ud800"}"#,
            &deep,
        ] {
            let e = parse(Kind::Completion, body).unwrap_err();
            assert_eq!(e.status(), 400, "{body:.40}");
            assert!(e.to_string().contains("JSON"), "{e}");
            assert!(e.to_string().len() < 400, "{e}");
        }
        // Long values are never quoted whole.
        let long = "x".repeat(1_000_000);
        let e = parse(
            Kind::Chat,
            &format!(r#"{{{CHAT}, "messages": [{{"role": "{long}", "content": ""}}]}}"#),
        )
        .unwrap_err();
        assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
    }

    /// A seeded generator for the mutation test (splitmix64).
    struct Mix(u64);

    impl Mix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Values a hostile or careless client sends in place of a field's own.
    fn hostile(rng: &mut Mix) -> Value {
        let deep = (0..60).fold(json!(1), |v, _| json!([v]));
        let pool = [
            Value::Null,
            json!(true),
            json!(-1),
            json!(0),
            json!(1),
            json!(2.5),
            json!(1e308),
            json!(-1e308),
            json!(5e-324),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(4294967296u64),
            json!(""),
            json!("x".repeat(70_000)),
            json!("../../etc/passwd"),
            json!("\u{0}"),
            json!([]),
            json!([[]]),
            json!([1, -1, 4294967296u64]),
            json!(["a", 1, null]),
            json!({}),
            json!({"type": "text"}),
            json!({"type": "json_object"}),
            json!([{"role": "user"}]),
            json!([{"role": "tool", "content": [{"type": "image_url"}]}]),
            json!([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
            deep,
        ];
        pool[rng.below(pool.len())].clone()
    }

    /// Every parameter name the API reads, and some it does not.
    const PARAMS: &[&str] = &[
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "top_logprobs",
        "echo",
        "best_of",
        "response_format",
        "user",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "suffix",
        "tools",
        "tool_choice",
        "",
        "__proto__",
    ];

    /// Thousands of valid requests with one to three fields replaced,
    /// removed or added, and as many with their bytes damaged: none may
    /// panic; each refusal is an OpenAI error object with a status a client
    /// can act on and a short message; each request accepted has sampling
    /// values the engine accepts too, so no request fails later for a
    /// parameter it should have been refused for here.
    #[test]
    fn mutated_requests_are_refused_cleanly_or_valid() {
        let bases: [(Kind, Value); 3] = [
            (
                Kind::Chat,
                json!({"model": "o/m", "messages": [{"role": "system", "content": "s"},
                       {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "stream": true,
                       "stream_options": {"include_usage": true}, "stop": ["x"], "seed": 1}),
            ),
            (
                Kind::Completion,
                json!({"model": "o/m", "prompt": "hi", "max_tokens": 4, "top_k": 5,
                       "repetition_penalty": 1.1}),
            ),
            (
                Kind::Completion,
                json!({"model": "o/m", "prompt": [[1, 2, 3]], "stop": "y"}),
            ),
        ];
        let mut rng = Mix(12);
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..6000 {
            let (kind, base) = &bases[round % bases.len()];
            let mut v = base.clone();
            let body = if round % 2 == 0 {
                let o = v.as_object_mut().unwrap();
                for _ in 0..1 + rng.below(3) {
                    let key = PARAMS[rng.below(PARAMS.len())];
                    match rng.below(4) {
                        0 => {
                            o.remove(key);
                        }
                        _ => {
                            o.insert(key.to_string(), hostile(&mut rng));
                        }
                    }
                }
                v.to_string().into_bytes()
            } else {
                let mut b = v.to_string().into_bytes();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len());
                    match rng.below(3) {
                        0 => b[at] = b"{}[]\":,-0e9.tfn \\"[rng.below(17)],
                        1 => {
                            b.remove(at);
                        }
                        _ => b.insert(at, rng.next() as u8),
                    }
                }
                b
            };
            match parse_request(&body, *kind) {
                Ok((c, _prompt)) => {
                    accepted += 1;
                    let params = c.sampling.resolve(&Default::default());
                    assert_eq!(
                        params.validate(),
                        Ok(()),
                        "accepted, then the engine refuses it: {}",
                        String::from_utf8_lossy(&body)
                    );
                    assert!(!c.model.is_empty());
                }
                Err(e) => {
                    refused += 1;
                    assert!(
                        matches!(e.status(), 400 | 404 | 413 | 503),
                        "status {} for {e}",
                        e.status()
                    );
                    let msg = e.to_string();
                    assert!(!msg.is_empty() && msg.len() < 1000, "{} bytes", msg.len());
                    let j = error_json(&e);
                    let err = &j["error"];
                    assert!(err["message"].is_string() && err["type"].is_string(), "{j}");
                    assert!(
                        err.get("param").is_some() && err.get("code").is_some(),
                        "{j}"
                    );
                }
            }
        }
        // Both outcomes were exercised, each many times.
        assert!(
            accepted > 500 && refused > 3000,
            "{accepted} accepted, {refused} refused"
        );
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn limits(bytes: usize, ms: u64) -> Limits {
        Limits {
            max_body_bytes: bytes,
            body_timeout: Duration::from_millis(ms),
        }
    }

    #[test]
    fn bodies_are_bounded_in_size_and_time() {
        rt().block_on(async {
            let none = HeaderMap::new();
            let chunks = |n: usize| {
                Body::from_stream(tokio_stream::iter(
                    (0..n).map(|_| Ok::<_, Infallible>(Bytes::from_static(b"0123456789"))),
                ))
            };
            // Within the limit, streamed in chunks.
            let b = read_body(&none, chunks(10), &limits(100, 5000))
                .await
                .unwrap();
            assert_eq!(b.len(), 100);
            // One byte over, without a Content-Length: 413 while reading.
            let e = read_body(&none, chunks(11), &limits(100, 5000))
                .await
                .unwrap_err();
            assert_eq!(e.status(), 413, "{e}");
            assert_eq!(e.code(), Some("request_too_large"));
            // A declared length over the limit is refused before reading.
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_LENGTH, "101".parse().unwrap());
            let e = read_body(&h, Body::empty(), &limits(100, 5000))
                .await
                .unwrap_err();
            assert_eq!(e.status(), 413);
            assert!(e.to_string().contains("101 bytes"), "{e}");
            // A body that never ends: 408 after the timeout.
            let stalled = Body::from_stream(
                tokio_stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"{"))])
                    .chain(tokio_stream::pending()),
            );
            let t = std::time::Instant::now();
            let e = read_body(&none, stalled, &limits(100, 200))
                .await
                .unwrap_err();
            assert_eq!(e.status(), 408, "{e}");
            assert_eq!(e.code(), Some("request_timeout"));
            assert!(t.elapsed() >= Duration::from_millis(200));
            assert!(t.elapsed() < Duration::from_secs(5));
        });
    }

    #[test]
    fn limits_come_from_the_environment() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Limits::from_vars(vars(&[])), Limits::default());
        let l = Limits::from_vars(vars(&[
            ("FLASH_HTTP_MAX_BODY", "1024"),
            ("FLASH_HTTP_BODY_TIMEOUT", "0.5"),
        ]));
        assert_eq!(l.max_body_bytes, 1024);
        assert_eq!(l.body_timeout, Duration::from_millis(500));
        // Values that do not parse are ignored.
        let l = Limits::from_vars(vars(&[
            ("FLASH_HTTP_MAX_BODY", "lots"),
            ("FLASH_HTTP_BODY_TIMEOUT", "NaN"),
        ]));
        assert_eq!(l, Limits::default());
    }
}
