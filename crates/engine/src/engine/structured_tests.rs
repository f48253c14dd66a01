//! Constrained decoding and tool calls through the engine, on the tiny
//! random llama: whatever the weights prefer, the grammar decides what may
//! come out.

use serde_json::{json, Value};

use super::tests::{collect, config, idle, req, speculative_on, tiny_engine, tiny_engine_with, wait_for};
use super::*;
use crate::request::Field;
use crate::text::grammar::Constraint;
use crate::text::output::ReasoningFormat;
use crate::text::tools::ToolChoice;
use crate::text::tools::{Function, Tool, ToolCallDelta};

fn constrained(c: Constraint, max_tokens: i64) -> GenerateRequest {
    GenerateRequest { max_tokens: Some(max_tokens), constraint: Some(c), ..req(Input::Prompt("hello world".into())) }
}

/// Every event of a request: its text, its tool calls, and how it ended.
fn run(e: &Engine, r: GenerateRequest) -> (String, Vec<ToolCallDelta>, Result<Stats, EngineError>) {
    let mut h = e.submit(r).unwrap();
    let (mut text, mut calls) = (String::new(), Vec::<ToolCallDelta>::new());
    while let Some(ev) = h.blocking_recv() {
        match ev {
            Event::Token { text: t, .. } => text.push_str(&t),
            // A call's pieces, joined.
            Event::ToolCall(c) => match calls.get_mut(c.index) {
                Some(call) => {
                    assert_eq!((&call.id, &call.name), (&c.id, &c.name));
                    call.arguments.push_str(&c.arguments);
                }
                None => calls.push(c),
            },
            Event::Done(s) => return (text, calls, Ok(s)),
            Event::Error(err) => return (text, calls, Err(err)),
        }
    }
    panic!("stream ended without Done or Error");
}

const SCHEMA: &str = r#"{"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}
}, "required": ["kind", "ok", "n"], "additionalProperties": false}"#;

#[test]
fn outputs_follow_their_regex_and_schema_alone_and_batched() {
    let (e, _d) = tiny_engine();
    let regex = || constrained(Constraint::Regex("(yes|no)!".into()), 16);
    let schema = || constrained(Constraint::JsonSchema(serde_json::from_str(SCHEMA).unwrap()), 48);
    let (yes, _, stats) = run(&e, regex());
    assert!(yes == "yes!" || yes == "no!", "{yes:?}");
    assert_eq!(stats.unwrap().finish_reason, FinishReason::Stop);
    let (obj, _, stats) = run(&e, schema());
    let v: Value = serde_json::from_str(&obj).unwrap_or_else(|err| panic!("{obj:?}: {err}"));
    assert!(["cat", "dog"].contains(&v["kind"].as_str().unwrap()) && v["ok"].is_boolean(), "{v}");
    assert!((1..=9).contains(&v["n"].as_i64().unwrap()), "{v}");
    // Grammar-forced text ("{\"kind\": \"") counts as generated tokens.
    assert_eq!(stats.unwrap().finish_reason, FinishReason::Stop);
    // Batched with each other and with an unconstrained request: the same outputs.
    let free = collect(e.submit(req(Input::Prompt("hello world".into()))).unwrap()).1;
    let handles: Vec<_> = (0..2).flat_map(|_| [regex(), schema(), req(Input::Prompt("hello world".into()))]).map(|r| e.submit(r).unwrap()).collect();
    let outs: Vec<String> = handles.into_iter().map(|h| collect(h).1).collect();
    assert_eq!(outs, [yes.clone(), obj.clone(), free.clone(), yes, obj, free]);
}

#[test]
fn guesses_are_checked_against_the_grammar() {
    let (plain, _a) = tiny_engine();
    let (spec, _b) = tiny_engine_with(speculative_on());
    for c in [Constraint::JsonObject, Constraint::Regex("(ab|cd)+ end".into())] {
        for seed in [None, Some(3u64)] {
            let mut r = constrained(c.clone(), 24);
            r.sampling.seed = seed;
            r.sampling.temperature = if seed.is_some() { 1.0 } else { 0.0 };
            assert_eq!(run(&plain, r.clone()).0, run(&spec, r).0, "{c:?} {seed:?}");
        }
    }
    let s = wait_for(&spec, idle);
    assert!(s.n_spec_drafted > 0 && s.n_spec_accepted > 0, "{s:?}");
}

#[test]
fn bad_constraints_are_refused_by_field_and_the_engine_serves_on() {
    let (e, _d) = tiny_engine();
    for (c, field) in [
        (Constraint::Regex("(".into()), Field::Regex),
        (Constraint::Lark("start: nothing_defined".into()), Field::Grammar),
        (Constraint::JsonSchema(json!({"type": "string", "minLength": 5, "maxLength": 2})), Field::ResponseFormat),
    ] {
        match e.submit(constrained(c.clone(), 8)) {
            Err(EngineError::InvalidParam(p)) => assert_eq!(p.field, field, "{c:?}: {p}"),
            other => panic!("{c:?}: {:?}", other.map(|_| ())),
        }
    }
    assert!(run(&e, constrained(Constraint::Regex("[a-z]{3}".into()), 8)).2.is_ok());
}

fn weather() -> Tool {
    let params = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]});
    Tool { kind: "function".into(), function: Function { name: "get_weather".into(), description: Some("Weather in a city".into()), parameters: Some(params), strict: None } }
}

#[test]
fn a_required_tool_call_comes_out_as_a_call_with_valid_arguments() {
    let (e, _d) = tiny_engine();
    let r = GenerateRequest {
        max_tokens: Some(128),
        tools: vec![weather()],
        tool_choice: ToolChoice::Required,
        parallel_tool_calls: false,
        // A prompt, not messages: the fallback's description of the tools
        // would not fit the tiny model's context.
        ..req(Input::Prompt("Weather in Paris?".into()))
    };
    let (text, calls, stats) = run(&e, r);
    assert_eq!(stats.unwrap().finish_reason, FinishReason::ToolCalls, "{text:?}");
    assert_eq!(text, "");
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].index, calls[0].name.as_str()), (0, "get_weather"));
    let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
    assert!(args["city"].as_str().is_some_and(|c| c.chars().count() <= 12), "{args}");
    // `none` offers no tools: plain text, no parsing.
    let r = GenerateRequest { tools: vec![weather()], tool_choice: ToolChoice::None, ..req(Input::Messages(vec![ChatMessage::new("user", "hi")])) };
    let (_, calls, stats) = run(&e, r);
    assert!(calls.is_empty() && stats.is_ok());
}

/// Constrained sequences preempted when blocks run out keep their grammar
/// state (only their cache is recomputed) and give their solo outputs.
#[test]
fn preempted_constrained_sequences_resume_where_their_grammar_was() {
    // Each runs to max_tokens (none can end sooner): ~65 positions, 5 blocks
    // of 16. The cache has 7, so one sequence growing while the other three
    // hold their first block must preempt, however the readers are timed.
    let cs = [
        Constraint::JsonSchema(json!({"type": "array", "items": {"type": "integer"}, "minItems": 60})),
        Constraint::Regex("([a-z]+ ){60}".into()),
        Constraint::JsonSchema(json!({"type": "array", "items": {"enum": ["ab", "cd"]}, "minItems": 60})),
        Constraint::Regex("[0-9, ]{100}".into()),
    ];
    let (solo_e, _a) = tiny_engine();
    let solo: Vec<String> = cs.iter().map(|c| run(&solo_e, constrained(c.clone(), 60)).0).collect();
    // A stream buffer of 2: no sequence gets ahead while the others are
    // still being submitted (each compiles its grammar first), so all four
    // are admitted before any grows past its first block.
    let (e, _b) = tiny_engine_with(config(|c| {
        c.kv_cache.block_size = 16;
        c.kv_cache.memory_mib = (7 * 16 * 256) as f64 / 1048576.0;
        c.scheduler.stream_buffer = 2;
    }));
    assert_eq!(e.stats().kv_blocks_total, 7);
    let handles: Vec<_> = cs.iter().map(|c| e.submit(constrained(c.clone(), 60)).unwrap()).collect();
    let outs: Vec<_> = std::thread::scope(|scope| {
        let readers: Vec<_> = handles.into_iter().map(|h| scope.spawn(move || collect(h))).collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for ((ids, text, stats), want) in outs.into_iter().zip(&solo) {
        assert_eq!((&text, ids.len(), stats.unwrap().finish_reason), (want, 60, FinishReason::Length));
    }
    let s = wait_for(&e, idle);
    assert!(s.n_preemptions > 0, "{s:?}");
}

/// The grammar runs in the worker, above the backend: the `mlx` backend
/// gives the `cpu` backend's constrained outputs' shape (valid, complete).
#[test]
fn constraints_hold_on_the_mlx_backend() {
    if !mlx_serving_mlx::available() {
        assert!(std::env::var_os("MLX_REQUIRED").is_none(), "MLX_REQUIRED: {:?}", mlx_serving_mlx::unavailable_reason());
        return;
    }
    let (_cpu, d) = tiny_engine();
    let e = Engine::with_config(RuntimeConfig::default());
    let options = ModelOptions { backend: crate::backend::BackendKind::Mlx, ..Default::default() };
    e.load_model_with(d.path().join("tiny.gguf"), None, options).unwrap();
    let (yes, _, stats) = run(&e, constrained(Constraint::Regex("(yes|no)!".into()), 16));
    assert!(yes == "yes!" || yes == "no!", "{yes:?}");
    assert_eq!(stats.unwrap().finish_reason, FinishReason::Stop);
    let (obj, _, _) = run(&e, constrained(Constraint::JsonSchema(serde_json::from_str(SCHEMA).unwrap()), 48));
    let v: Value = serde_json::from_str(&obj).unwrap_or_else(|err| panic!("{obj:?}: {err}"));
    assert!(v["ok"].is_boolean(), "{v}");
}

/// `<think>` blocks go to the events' `reasoning` (a grammar makes the tiny
/// model write one), or stay in the text when asked.
#[test]
fn think_blocks_go_to_reasoning_unless_kept_inline() {
    let (e, _d) = tiny_engine();
    let write = |format| {
        let g = Constraint::Lark("start: \"<think>\" /[a-z]{4}/ \"</think>\" /[a-z]{4}/".into());
        let r = GenerateRequest { reasoning_format: format, ..constrained(g, 40) };
        let mut h = e.submit(r).unwrap();
        let (mut text, mut reasoning) = (String::new(), String::new());
        while let Some(ev) = h.blocking_recv() {
            match ev {
                Event::Token { text: t, reasoning: r, .. } => {
                    text.push_str(&t);
                    reasoning.push_str(&r);
                }
                Event::Done(_) => break,
                other => panic!("{other:?}"),
            }
        }
        (text, reasoning)
    };
    let (text, reasoning) = write(ReasoningFormat::Parsed);
    assert_eq!((text.len(), reasoning.len()), (4, 4), "{text:?} {reasoning:?}");
    let (inline, none) = write(ReasoningFormat::Inline);
    assert_eq!(inline, format!("<think>{reasoning}</think>{text}"));
    assert_eq!(none, "");
    // Auto: a raw prompt that opened no block is left alone.
    assert_eq!(write(ReasoningFormat::Auto).0, inline);
}

const MISTRAL_TEMPLATE: &str = "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | tojson }}{% else %}{{ m.content }}{% endif %}{% endfor %}";

/// The tiny llama with Mistral's call token (`[TOOL_CALLS]`, a control token,
/// id 1) and a template that writes it, loaded with `options`.
fn tiny_mistral(options: ModelOptions) -> (Engine, tempfile::TempDir, ModelInfo) {
    tiny_with_template(MISTRAL_TEMPLATE, false, options)
}

/// `tiny_mistral` with `template`, and with `[ARGS]` as one more control
/// token (its id the vocabulary's last) where `args`.
fn tiny_with_template(template: &str, args: bool, options: ModelOptions) -> (Engine, tempfile::TempDir, ModelInfo) {
    use crate::formats::gguf::MetaValue;
    let mut md = crate::text::tokenizer::tests::tiny_tokenizer_metadata();
    for (k, v) in md.iter_mut() {
        match (*k, v) {
            ("tokenizer.ggml.tokens", MetaValue::Array(tokens)) => {
                tokens[1] = MetaValue::Str("[TOOL_CALLS]".into());
                if args {
                    tokens.push(MetaValue::Str("[ARGS]".into()));
                }
            }
            ("tokenizer.ggml.token_type", MetaValue::Array(types)) if args => types.push(MetaValue::I32(3)),
            ("tokenizer.ggml.bos_token_id", v) => *v = MetaValue::U32(0),
            ("tokenizer.chat_template", v) => *v = MetaValue::Str(template.into()),
            _ => {}
        }
    }
    let n_vocab = md.iter().find(|(k, _)| *k == "tokenizer.ggml.tokens").unwrap().1.as_array().unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let bytes = crate::models::llama::tests::tiny_llama_gguf(&crate::models::llama::tests::TinyLlama { vocab: n_vocab, dim: 64, n_layers: 2 }, md);
    std::fs::write(dir.path().join("tiny.gguf"), bytes).unwrap();
    let e = Engine::with_config(RuntimeConfig::default());
    let info = e.load_model_with(dir.path().join("tiny.gguf"), None, options).unwrap();
    (e, dir, info)
}

#[test]
fn mistral_models_write_and_read_calls_in_their_own_format() {
    use crate::text::tools::CallFormat;
    let (e, _d, info) = tiny_mistral(ModelOptions::default());
    assert_eq!(info.tool_call_format, CallFormat::Mistral(1));
    let ask = |choice: ToolChoice, bias: Vec<(u32, f32)>| {
        let mut r = GenerateRequest { max_tokens: Some(128), tools: vec![weather()], tool_choice: choice, parallel_tool_calls: false, ..req(Input::Prompt("Weather in Paris?".into())) };
        r.sampling.logit_bias = bias;
        run(&e, r)
    };
    // `required`: the control token by id, then a list of one call.
    // `auto`: the model writes the control token (pushed by a bias here),
    // which the parser sees as text, and the rest follows the tools' grammar.
    for (choice, bias) in [(ToolChoice::Required, vec![]), (ToolChoice::Auto, vec![(1, 100.0)])] {
        let (text, calls, stats) = ask(choice.clone(), bias);
        assert_eq!(stats.unwrap().finish_reason, FinishReason::ToolCalls, "{choice:?}: {text:?}");
        assert_eq!((text.as_str(), calls.len(), calls[0].name.as_str()), ("", 1, "get_weather"), "{choice:?}");
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert!(args["city"].is_string(), "{args}");
    }
    // Named explicitly: the same; Hermes on request; an unknown name refused.
    let (_, _, info) = tiny_mistral(ModelOptions { tool_call_format: Some("mistral".into()), ..Default::default() });
    assert_eq!(info.tool_call_format, CallFormat::Mistral(1));
    let (_, _, info) = tiny_mistral(ModelOptions { tool_call_format: Some("hermes".into()), ..Default::default() });
    assert_eq!(info.tool_call_format, CallFormat::Hermes);
    let (e, d) = tiny_engine();
    let err = e.load_model_with(d.path().join("tiny.gguf"), Some("other".into()), ModelOptions { tool_call_format: Some("mistral".into()), ..Default::default() });
    assert!(matches!(&err, Err(EngineError::InvalidParams(m)) if m.contains("no [TOOL_CALLS]")), "{err:?}");
}

/// Tools with closed argument objects, so that random weights cannot write
/// keys until `max_tokens`.
fn closed_tools() -> Vec<Tool> {
    let mut city = weather();
    city.function.parameters.as_mut().unwrap()["additionalProperties"] = json!(false);
    let no_args = json!({"type": "object", "properties": {}, "additionalProperties": false});
    let time = Tool { function: Function { name: "get_time".into(), parameters: Some(no_args), ..weather().function }, ..weather() };
    vec![city, time]
}

/// One call of a closed tool, checked: its name and arguments.
fn check_call(what: &str, (text, calls, stats): (String, Vec<ToolCallDelta>, Result<Stats, EngineError>)) -> ToolCallDelta {
    assert_eq!(stats.unwrap().finish_reason, FinishReason::ToolCalls, "{what}: {text:?} {calls:?}");
    assert!(text.is_empty() && calls.len() == 1, "{what}: {text:?} {calls:?}");
    let args: Value = serde_json::from_str(&calls[0].arguments).unwrap_or_else(|e| panic!("{what}: {calls:?}: {e}"));
    match calls[0].name.as_str() {
        "get_weather" => assert!(args["city"].is_string(), "{args}"),
        "get_time" => assert_eq!(args, json!({})),
        other => panic!("{other}"),
    }
    calls[0].clone()
}

#[test]
fn llama3_models_call_with_one_bare_object_naming_parameters() {
    use crate::text::tools::CallFormat;
    let template = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}{% endfor %}{# tool results: ipython #}";
    let (e, _d, info) = tiny_with_template(template, false, ModelOptions::default());
    assert_eq!(info.tool_call_format, CallFormat::Llama3);
    for (choice, parallel) in [(ToolChoice::Required, true), (ToolChoice::Named("get_time".into()), false)] {
        let r = GenerateRequest { max_tokens: Some(160), tools: closed_tools(), tool_choice: choice.clone(), parallel_tool_calls: parallel, ..req(Input::Prompt("Weather in Paris?".into())) };
        let call = check_call(&format!("{choice:?}"), run(&e, r));
        if let ToolChoice::Named(n) = &choice {
            assert_eq!(&call.name, n);
        }
    }
}

#[test]
fn mistral_v11_models_write_a_name_then_args_for_each_call() {
    use crate::text::tools::CallFormat;
    let template = "{% for m in messages %}{% for c in m.tool_calls or [] %}[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}{% endfor %}{{ m.content }}{% endfor %}";
    let (e, _d, info) = tiny_with_template(template, true, ModelOptions::default());
    let args = info.vocab_size as u32 - 1;
    assert_eq!(info.tool_call_format, CallFormat::MistralV11 { calls: 1, args });
    // `required` and named: the grammar writes the control tokens; `auto`:
    // the model writes `[TOOL_CALLS]` itself (a bias here), and the rest of
    // the call follows the tools' grammar.
    for (choice, bias) in [(ToolChoice::Required, vec![]), (ToolChoice::Auto, vec![(1, 100.0)]), (ToolChoice::Named("get_time".into()), vec![])] {
        let mut r = GenerateRequest { max_tokens: Some(160), tools: closed_tools(), tool_choice: choice.clone(), parallel_tool_calls: false, ..req(Input::Prompt("Weather in Paris?".into())) };
        r.sampling.logit_bias = bias;
        let call = check_call(&format!("{choice:?}"), run(&e, r));
        if let ToolChoice::Named(n) = &choice {
            assert_eq!(&call.name, n);
        }
    }
    // The list format when the template writes no `[ARGS]`; asked for by name; refused without the token.
    let (_, _, info) = tiny_with_template(MISTRAL_TEMPLATE, true, ModelOptions::default());
    assert_eq!(info.tool_call_format, CallFormat::Mistral(1));
    let (_, _, info) = tiny_with_template(MISTRAL_TEMPLATE, true, ModelOptions { tool_call_format: Some("mistral-v11".into()), ..Default::default() });
    assert_eq!(info.tool_call_format, CallFormat::MistralV11 { calls: 1, args });
    let (e, d, _) = tiny_mistral(ModelOptions::default());
    let err = e.load_model_with(d.path().join("tiny.gguf"), Some("v11".into()), ModelOptions { tool_call_format: Some("mistral-v11".into()), ..Default::default() });
    assert!(matches!(&err, Err(EngineError::InvalidParams(m)) if m.contains("no [ARGS]")), "{err:?}");
}
