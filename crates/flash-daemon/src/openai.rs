//! The OpenAI-compatible HTTP API of the daemon's engines, on its HTTP
//! listener (beside `/metrics` and `/health`):
//!
//! - `GET /v1/models`: the store's models, in OpenAI's list format;
//! - `POST /v1/completions`: `prompt` (a string, a list of one string, or
//!   a list of token ids) sent raw (with the tokenizer's special tokens);
//! - `POST /v1/chat/completions`: `messages` through the model's chat
//!   template (content as a string or a list of `{"type": "text"}` parts).
//!
//! Both take `model`, `max_tokens` (or `max_completion_tokens`; default 16
//! for completions as OpenAI's, 512 for chat), `temperature`, `top_p`,
//! `seed`, `stop` (a string or a list), `stream` (server-sent events
//! `data: {...}` ending with `data: [DONE]`), `stream_options.include_usage`,
//! and the extensions `top_k` and `repetition_penalty` (Hugging Face's
//! multiplicative penalty, as vLLM accepts it). Sampling fields left out
//! take the model's `generation_config.json` defaults, as `flash run` does.
//! `frequency_penalty` and `presence_penalty` (OpenAI's additive
//! penalties) have no exact equivalent here: 0 is accepted, anything else
//! is refused with 400 and a pointer to `repetition_penalty`. `n` > 1,
//! `logprobs`, `echo` and `best_of` are refused likewise.
//!
//! Answers carry `usage` (token counts) and a `flash` object (prompt and
//! generated token ids, `load_s`, `ttft_s`, `tokens_per_s`, `device`, ...),
//! in the last chunk when streaming; the official `openai` client ignores it
//! and `flash run` reads it. Errors use OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request,
//! 404 for a model not in the store, 503 when the tiers have no room for it
//! now, 500 otherwise.

use crate::serve::{
    EngineHost, GenEvent, GenRequest, Prompt, Report, SamplingRequest, ServeError, Started,
};
use crate::server::DaemonHandle;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use flash_engine::{FinishReason, Message};
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// The routes of the OpenAI API, for [`crate::run`].
pub fn routes(daemon: &DaemonHandle) -> Router {
    router(EngineHost::new(daemon.clone()))
}

/// The routes on a given engine host.
pub fn router(host: EngineHost) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(host)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error_response(e: &ServeError) -> Response {
    let (kind, code) = match e {
        ServeError::BadRequest(_) => ("invalid_request_error", Value::Null),
        ServeError::NotFound(_) => ("invalid_request_error", json!("model_not_found")),
        ServeError::NoRoom(_) => ("server_error", json!("no_room")),
        ServeError::Internal(_) => ("server_error", Value::Null),
    };
    let param = match e {
        ServeError::NotFound(_) => json!("model"),
        _ => Value::Null,
    };
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        status,
        &json!({"error": {"message": e.to_string(), "type": kind, "param": param, "code": code}}),
    )
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

async fn list_models(State(host): State<EngineHost>) -> Response {
    let h = host.clone();
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
// Request parsing
// ---------------------------------------------------------------------------

fn bad(msg: impl Into<String>) -> ServeError {
    ServeError::BadRequest(msg.into())
}

fn opt_f32(o: &Map<String, Value>, key: &str) -> Result<Option<f32>, ServeError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| bad(format!("{key} must be a number, not {v}"))),
    }
}

fn opt_u64(o: &Map<String, Value>, key: &str) -> Result<Option<u64>, ServeError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            if let Some(n) = v.as_u64() {
                return Ok(Some(n));
            }
            // Clients may send integers as floats (16.0).
            match v.as_f64() {
                Some(x) if x >= 0.0 && x.fract() == 0.0 && x < u64::MAX as f64 => {
                    Ok(Some(x as u64))
                }
                _ => Err(bad(format!(
                    "{key} must be a non-negative integer, not {v}"
                ))),
            }
        }
    }
}

fn opt_bool(o: &Map<String, Value>, key: &str) -> Result<bool, ServeError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(bad(format!("{key} must be true or false, not {v}"))),
    }
}

/// What both endpoints share.
struct Common {
    model: String,
    max_tokens: usize,
    sampling: SamplingRequest,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn common(o: &Map<String, Value>, default_max: usize) -> Result<Common, ServeError> {
    let model = match o.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(v) => return Err(bad(format!("model must be a model name, not {v}"))),
        None => return Err(bad("model is required (a store name, see GET /v1/models)")),
    };
    let max_tokens = match opt_u64(o, "max_tokens")? {
        Some(n) => Some(n),
        None => opt_u64(o, "max_completion_tokens")?,
    }
    .map_or(default_max, |n| n as usize);
    for key in ["frequency_penalty", "presence_penalty"] {
        if let Some(x) = opt_f32(o, key)? {
            if x != 0.0 {
                return Err(bad(format!(
                    "{key} (OpenAI's additive penalty) is not supported: use repetition_penalty \
                     (Hugging Face's multiplicative penalty, e.g. 1.1)"
                )));
            }
        }
    }
    if let Some(n) = opt_u64(o, "n")? {
        if n != 1 {
            return Err(bad(format!("n = {n}: only one choice per request (n = 1)")));
        }
    }
    if let Some(b) = opt_u64(o, "best_of")? {
        if b > 1 {
            return Err(bad("best_of > 1 is not supported"));
        }
    }
    match o.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => return Err(bad("logprobs are not supported")),
    }
    if opt_bool(o, "echo")? {
        return Err(bad("echo is not supported"));
    }
    let stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("stop must be strings, not {v}")))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(bad(format!("stop must be a string or a list, not {v}"))),
    };
    let top_k = match o.get("top_k") {
        // vLLM's convention: -1 means off.
        Some(v) if v.as_i64() == Some(-1) => Some(0),
        _ => opt_u64(o, "top_k")?.map(|k| k as usize),
    };
    let temperature = opt_f32(o, "temperature")?;
    if let Some(t) = temperature {
        if !(0.0..=100.0).contains(&t) {
            return Err(bad(format!(
                "temperature {t} must be in [0, 100] (0 = greedy)"
            )));
        }
    }
    let sampling = SamplingRequest {
        temperature,
        top_p: opt_f32(o, "top_p")?,
        top_k,
        repetition_penalty: opt_f32(o, "repetition_penalty")?,
        seed: match o.get("seed") {
            // OpenAI's seed may be negative; any integer names one stream.
            Some(v) if v.as_i64().is_some_and(|s| s < 0) => v.as_i64().map(|s| s as u64),
            _ => opt_u64(o, "seed")?,
        },
    };
    let include_usage = match o.get("stream_options") {
        Some(Value::Object(so)) => opt_bool(so, "include_usage")?,
        _ => false,
    };
    Ok(Common {
        model,
        max_tokens,
        sampling,
        stop,
        stream: opt_bool(o, "stream")?,
        include_usage,
    })
}

fn body_object(body: &Bytes) -> Result<Map<String, Value>, ServeError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad("the request body must be a JSON object")),
        Err(e) => Err(bad(format!("the request body is not JSON: {e}"))),
    }
}

fn completion_prompt(o: &Map<String, Value>) -> Result<Prompt, ServeError> {
    match o.get("prompt") {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => Ok(Prompt::Tokens(
            a.iter()
                .filter_map(Value::as_u64)
                .map(|t| t as u32)
                .collect(),
        )),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_array() => {
            let inner = Map::from_iter([("prompt".to_string(), a[0].clone())]);
            completion_prompt(&inner)
        }
        Some(Value::Array(_)) => Err(bad(
            "prompt must be a string, a list of one string or a list of token ids (one prompt per request)",
        )),
        Some(v) => Err(bad(format!("prompt must be a string, not {v}"))),
        None => Err(bad("prompt is required")),
    }
}

fn chat_messages(o: &Map<String, Value>) -> Result<Prompt, ServeError> {
    let Some(Value::Array(list)) = o.get("messages") else {
        return Err(bad("messages is required (a list of {role, content})"));
    };
    if list.is_empty() {
        return Err(bad("messages is empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("messages[{i}].role is required")))?;
        // OpenAI's newer name for the system role.
        let role = if role == "developer" { "system" } else { role };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => String::new(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => s.push_str(t),
                        _ => {
                            return Err(bad(format!(
                                "messages[{i}].content: only text parts are supported"
                            )))
                        }
                    }
                }
                s
            }
            Some(v) => return Err(bad(format!("messages[{i}].content must be text, not {v}"))),
        };
        out.push(Message::new(role, &content));
    }
    Ok(Prompt::Chat(out))
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

async fn completions(State(host): State<EngineHost>, body: Bytes) -> Response {
    handle(host, body, Kind::Completion).await
}

async fn chat_completions(State(host): State<EngineHost>, body: Bytes) -> Response {
    handle(host, body, Kind::Chat).await
}

async fn handle(host: EngineHost, body: Bytes, kind: Kind) -> Response {
    let parsed = body_object(&body).and_then(|o| {
        let c = common(&o, if kind == Kind::Chat { 512 } else { 16 })?;
        let prompt = match kind {
            Kind::Completion => completion_prompt(&o)?,
            Kind::Chat => chat_messages(&o)?,
        };
        Ok((c, prompt))
    });
    let (c, prompt) = match parsed {
        Ok(x) => x,
        Err(e) => return error_response(&e),
    };
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
        while let Some(ev) = rx.recv().await {
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
                    let err = json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": null}});
                    let _ = tx.send(Ok(Event::default().data(err.to_string())));
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
