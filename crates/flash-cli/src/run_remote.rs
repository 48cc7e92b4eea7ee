//! `flash run` through the daemon: the request goes to the daemon's
//! OpenAI-compatible HTTP API (`/v1/chat/completions`, or `/v1/completions`
//! with `--raw`) as a stream of server-sent events, and the text is printed
//! as it comes. A daemon is started first when none runs (like ollama).
//!
//! This process stays light on purpose: it never loads the model nor
//! touches CUDA (no context is created here), so when the model is resident
//! in the daemon, the time to the first token is the daemon's. The timings
//! and `--json` fields come from the daemon's report (the `flash` object of
//! the last event), except `ttft_s`, which is measured here **from this
//! process's start** (its start time in `/proc/self/stat`, 10 ms ticks,
//! plus a monotonic clock from the moment it was read).

use crate::args::{RunArgs, StartArgs};
use crate::clock::ProcessClock;
use crate::ctx::{model_name, Ctx};
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use flash_client::{Client, StatusReply};
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The default HTTP address of a daemon that `flash run` starts (`flash
/// start`'s); when taken, any free port on the loopback.
const DEFAULT_HTTP: &str = "127.0.0.1:7777";

/// Whether `flash run` goes through the daemon: not with `--no-daemon`,
/// `--logits` (the daemon does not return logits), `--device cpu`, or a
/// model folder (the daemon serves store models).
pub fn wanted(a: &RunArgs) -> bool {
    !a.no_daemon
        && !a.logits
        && a.device == "auto"
        && !Path::new(&a.model).is_dir()
        && model_name(&a.model).is_ok()
}

/// `flash start`'s defaults, with `http` as the listener.
fn start_args(http: &str) -> Result<StartArgs> {
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        start: StartArgs,
    }
    Ok(Defaults::try_parse_from(["flash-start", "--http", http])?.start)
}

/// The running daemon's status, starting one when none answers.
fn daemon(home: &Path, quiet: bool) -> Result<StatusReply> {
    if let Ok(c) = Client::connect(home) {
        if let Ok(s) = c.status() {
            return Ok(s);
        }
    }
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let http = if std::net::TcpListener::bind(DEFAULT_HTTP).is_ok() {
        DEFAULT_HTTP
    } else {
        "127.0.0.1:0"
    };
    if !quiet {
        eprintln!("starting the flash daemon (flash stop ends it)");
    }
    match crate::daemon::spawn(home, 0, &start_args(http)?) {
        Ok(s) => Ok(s),
        Err(e) => {
            // Another `flash run` may have started it at the same time.
            std::thread::sleep(Duration::from_millis(200));
            Client::connect(home)
                .ok()
                .and_then(|c| c.status().ok())
                .ok_or(e)
        }
    }
}

/// The request body for the daemon.
fn body(a: &RunArgs, prompt: &str, model: &str) -> Value {
    let mut o = Map::new();
    o.insert("model".into(), json!(model));
    if a.raw {
        o.insert("prompt".into(), json!(prompt));
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        o.insert("messages".into(), json!(messages));
    }
    o.insert("max_tokens".into(), json!(a.max_tokens));
    o.insert("stream".into(), json!(true));
    if let Some(t) = a.temperature {
        o.insert("temperature".into(), json!(t));
    }
    if let Some(p) = a.top_p {
        o.insert("top_p".into(), json!(p));
    }
    if let Some(k) = a.top_k {
        o.insert("top_k".into(), json!(k));
    }
    if let Some(r) = a.repetition_penalty {
        o.insert("repetition_penalty".into(), json!(r));
    }
    if let Some(s) = a.seed {
        o.insert("seed".into(), json!(s));
    }
    if !a.stop.is_empty() {
        o.insert("stop".into(), json!(a.stop));
    }
    Value::Object(o)
}

fn error_message(v: &Value) -> Option<String> {
    let e = v.get("error")?;
    Some(
        e.get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string()),
    )
}

/// Runs `a` through the daemon. `started` is an instant taken early in the
/// process (used only where `/proc` is missing).
pub fn run(ctx: &Ctx, a: &RunArgs, prompt: &str, started: Instant) -> Result<ExitCode> {
    let clock = ProcessClock::new(started);
    let home = ctx.home();
    let model = model_name(&a.model)?.to_string();
    let status = daemon(&home, ctx.quiet)?;
    let url = endpoint(&home, &status, a.raw)?;
    let mut reader = send(&url, &body(a, prompt, &model))?;
    let mut stdout = std::io::stdout().lock();
    let Some(answer) = read_answer(&mut reader, &mut stdout, !a.json, &clock)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let r = answer
        .report
        .ok_or_else(|| anyhow!("the daemon's answer ended without its report"))?;
    // No text at all (an end-of-sequence first): the first token came with
    // the report.
    let ttft_s = answer.ttft.unwrap_or_else(|| clock.now());
    if a.json {
        let v = json_report(&model, &status.http, &answer.text, &r, ttft_s);
        println!("{}", serde_json::to_string(&v)?);
    } else {
        let _ = writeln!(stdout);
    }
    if !ctx.quiet {
        print_summary(&r, ttft_s, &status.http);
    }
    Ok(ExitCode::SUCCESS)
}

/// The URL of the daemon's endpoint for this request; an error naming the
/// way out when the daemon has no HTTP listener.
fn endpoint(home: &Path, status: &StatusReply, raw: bool) -> Result<String> {
    if status.http.is_empty() {
        bail!(
            "the flash daemon on {} has no HTTP listener (started with --http off): restart it \
             with --http ADDR, or run in this process with --no-daemon",
            home.display()
        );
    }
    let path = if raw {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    Ok(format!("http://{}{path}", status.http))
}

/// The daemon's answer as it streams in.
type Answer = BufReader<ureq::BodyReader<'static>>;

/// Posts `body` to `url`; the answer's stream, or the daemon's refusal as an
/// error.
fn send(url: &str, body: &Value) -> Result<Answer> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_connect(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let resp = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .with_context(|| format!("cannot reach the flash daemon at {url}"))?;
    let code = resp.status().as_u16();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    if code != 200 {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut text);
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| error_message(&v))
            .unwrap_or(text);
        bail!("the flash daemon refused the request (HTTP {code}): {msg}");
    }
    Ok(reader)
}

/// What the event stream carried.
struct Streamed {
    text: String,
    /// Seconds from the process's start to the first piece of text.
    ttft: Option<f64>,
    /// The daemon's report (the `flash` object of the last event).
    report: Option<Value>,
}

/// Reads the server-sent events to `[DONE]` or the end, writing each piece
/// of text to `stdout` as it comes when `stream`. `None` when stdout was
/// closed (`| head`): the run ends quietly.
fn read_answer(
    reader: &mut Answer,
    stdout: &mut std::io::StdoutLock,
    stream: bool,
    clock: &ProcessClock,
) -> Result<Option<Streamed>> {
    let mut text = String::new();
    let mut ttft: Option<f64> = None;
    let mut report: Option<Value> = None;
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .context("reading the daemon's answer")?;
        if n == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data:") else {
            continue;
        };
        let data = data.trim_start();
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)
            .with_context(|| format!("the daemon sent an event that is not JSON: {data}"))?;
        if let Some(msg) = error_message(&v) {
            bail!("the flash daemon failed: {msg}");
        }
        if let Some(f) = v.get("flash") {
            report = Some(f.clone());
        }
        let choice = &v["choices"][0];
        let piece = choice["delta"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str())
            .unwrap_or_default();
        if piece.is_empty() {
            continue;
        }
        ttft.get_or_insert_with(|| clock.now());
        text.push_str(piece);
        if stream {
            if let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                // A closed pipe (`| head`) ends it quietly; the daemon stops
                // generating when this connection closes.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(None);
                }
                return Err(e).context("cannot write to stdout");
            }
        }
    }
    Ok(Some(Streamed { text, ttft, report }))
}

/// A number of the daemon's report, 0 when absent.
fn number(r: &Value, k: &str) -> f64 {
    r[k].as_f64().unwrap_or(0.0)
}

/// `--json`'s line: the daemon's report, with the text and this process's
/// time to the first token.
fn json_report(model: &str, http: &str, text: &str, r: &Value, ttft_s: f64) -> Value {
    let f = |k: &str| number(r, k);
    let device = r["device"].as_str().unwrap_or("?").to_string();
    let finish = r["finish_reason"].as_str().unwrap_or("?").to_string();
    json!({
        "model": model,
        "device": device,
        "engine": if device == "cpu" { "cpu-f32" } else { "gpu-bf16" },
        "via": "daemon",
        "daemon_http": http,
        "prompt_token_ids": r["prompt_token_ids"],
        "token_ids": r["token_ids"],
        "text": text,
        "finish_reason": finish,
        "load_s": f("load_s"),
        "resident_s": f("resident_s"),
        "engine_s": f("engine_s"),
        "served_from": r["served_from"],
        "queue_s": f("queue_s"),
        "ttft_s": ttft_s,
        "daemon_ttft_s": f("ttft_s"),
        "prefill_s": f("prefill_s"),
        "decode_s": f("decode_s"),
        "tokens_per_s": f("tokens_per_s"),
        "sampling": {"seed": r["seed"]},
    })
}

/// The one line of timings on stderr.
fn print_summary(r: &Value, ttft_s: f64, http: &str) {
    let f = |k: &str| number(r, k);
    let device = r["device"].as_str().unwrap_or("?");
    let finish = r["finish_reason"].as_str().unwrap_or("?");
    let prompt_tokens = r["prompt_token_ids"].as_array().map_or(0, Vec::len);
    let tokens = r["token_ids"].as_array().map_or(0, Vec::len);
    eprintln!(
        "load {:.2}s (from {}) · prompt {prompt_tokens} tokens, TTFT {ttft_s:.3}s from process start \
         ({:.3}s in the daemon) · {tokens} tokens at {:.1} tokens/s · {device} ({finish}) · daemon {}",
        f("load_s"),
        r["served_from"].as_str().unwrap_or("?"),
        f("ttft_s"),
        f("tokens_per_s"),
        http,
    );
}
