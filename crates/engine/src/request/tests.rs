use super::*;
use crate::EngineError;

fn spec(json: &str) -> Result<GenerateRequest, InvalidParam> {
    serde_json::from_str::<RequestSpec>(json).unwrap().resolve(&RequestDefaults::default())
}

#[test]
fn a_spec_resolves_to_a_request_with_the_frontends_defaults() {
    let r = spec(r#"{"model":"m","prompt":{"tokens":[1,2]},"maxTokens":5,"topK":40,"seed":7,"stopTokenIds":[3],"priority":"urgent","timeoutMs":0.5}"#)
        .unwrap();
    assert!(matches!(r.input, Input::Tokens(ref t) if t == &[1, 2]));
    assert_eq!((r.max_tokens, r.sampling.top_k, r.sampling.seed, r.timeout_ms), (Some(5), 40, Some(7), Some(1)));
    assert_eq!((r.stop_token_ids, r.priority), (vec![3], Priority::Urgent));
    let openai = RequestDefaults { temperature: 1.0, max_tokens: Some(16) };
    let r = RequestSpec { model: Some("m".into()), prompt: Some(PromptSpec::Text("a".into())), ..Default::default() }.resolve(&openai).unwrap();
    assert_eq!((r.sampling.temperature, r.max_tokens), (1.0, Some(16)));
    // Seeds over 2^53 stay exact from JSON (OpenAI clients send negative ones as u64).
    let r = spec(r#"{"model":"m","prompt":"a","seed":18446744073709551615}"#).unwrap();
    assert_eq!(r.sampling.seed, Some(u64::MAX));
}

#[test]
fn each_bad_field_is_named_in_the_frontends_words() {
    for (json, field, ours, openai) in [
        (r#"{"model":"m","prompt":"a","topP":2}"#, Field::TopP, "topP must be in (0, 1], got 2", "top_p must be in (0, 1], got 2"),
        (r#"{"model":"m","prompt":"a","maxTokens":2.5}"#, Field::MaxTokens, "maxTokens must be a positive integer, got 2.5", "max_tokens must be a positive integer, got 2.5"),
        (r#"{"model":"m","prompt":"a","maxTokens":0}"#, Field::MaxTokens, "maxTokens must be a positive integer, got 0", "max_tokens must be a positive integer, got 0"),
        (r#"{"model":"m","prompt":{"tokens":[1,-1]}}"#, Field::PromptTokens, "prompt.tokens[1] must be a token id (an integer from 0 to 2^32 - 1), got -1", "prompt[1] must be a token id (an integer from 0 to 2^32 - 1), got -1"),
        (r#"{"model":"m","prompt":"a","stopSequences":[""]}"#, Field::StopSequences, "stop sequences must not be empty strings", "stop sequences must not be empty strings"),
        (r#"{"model":"m"}"#, Field::Prompt, "either prompt or messages is required", "either prompt or messages is required"),
        (r#"{"model":"m","prompt":"a","messages":[]}"#, Field::Prompt, "give either prompt or messages, not both", "give either prompt or messages, not both"),
        (r#"{"model":"m","messages":[]}"#, Field::Messages, "messages must not be empty", "messages must not be empty"),
        (r#"{"model":"m","prompt":"a","priority":"high"}"#, Field::Priority, "priority must be urgent, default or background, got 'high'", "priority must be urgent, default or background, got 'high'"),
        (r#"{"model":"m","prompt":"a","temperature":1e39}"#, Field::Temperature, "temperature must be a finite number, got 1e39", "temperature must be a finite number, got 1e39"),
        (r#"{"model":"m","prompt":"a","seed":-1}"#, Field::Seed, "seed must be an integer from 0 to 2^64 - 1, got -1", "seed must be an integer from 0 to 2^64 - 1, got -1"),
    ] {
        let e = spec(json).unwrap_err();
        assert_eq!((e.field, e.to_string().as_str(), e.message(e.field.openai_name()).as_str()), (field, ours, openai), "{json}");
        assert_eq!(EngineError::from(e).code(), "InvalidParams");
    }
    // NaN cannot come from JSON, only from JavaScript.
    let nan = RequestSpec { model: Some("m".into()), prompt: Some(PromptSpec::Text("a".into())), max_tokens: Some(f64::NAN.into()), ..Default::default() };
    assert_eq!(nan.resolve(&RequestDefaults::default()).unwrap_err().to_string(), "maxTokens must be a positive integer, got NaN");
    assert!(serde_json::from_str::<RequestSpec>(r#"{"max_tokens":1}"#).is_err(), "unknown keys are refused");
}

#[test]
fn validation_rejects_bad_sampling_values() {
    let params = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    };
    for p in [
        params(|p| p.temperature = f32::NAN),
        params(|p| p.temperature = -1.0),
        params(|p| p.top_p = 0.0),
        params(|p| p.top_p = 1.5),
        params(|p| p.min_p = 2.0),
        params(|p| p.repetition_penalty = 0.0),
        params(|p| p.presence_penalty = 5.0),
    ] {
        assert_eq!(EngineError::from(p.validate().unwrap_err()).code(), "InvalidParams", "{p:?}");
    }
    assert!(SamplingParams::default().validate().is_ok());
}

#[test]
fn the_prompt_must_fit_the_context_the_cache_and_the_limits() {
    let fit = |n, ctx, kv| PromptFit { n_prompt_tokens: n, context_length: ctx, kv_positions: kv, max_prompt_tokens: 1000, max_tokens_cap: Some(64) };
    let mut req = GenerateRequest::new("m", Input::Prompt("a".into()));
    assert_eq!(fit(10, 100, 200).max_tokens(&req), Ok(64));
    assert_eq!(fit(90, 100, 200).max_tokens(&req), Ok(10));
    for (f, want) in [(fit(0, 100, 200), "the prompt is empty"), (fit(100, 100, 200), "context holds 100"), (fit(50, 100, 40), "KV cache holds 40"), (fit(1001, 2000, 2000), "limits.maxPromptTokens")] {
        let e = f.max_tokens(&req).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    req.max_tokens = Some(65);
    assert_eq!(fit(10, 100, 200).max_tokens(&req).unwrap_err().message("max_tokens"), "max_tokens 65 exceeds the configured limit streaming.maxTokens = 64");
    req.max_tokens = Some(50);
    let e = fit(60, 100, 200).max_tokens(&req).unwrap_err();
    assert_eq!(e.message("max_tokens"), "the context holds 100 tokens: the prompt's 60 and max_tokens 50 do not fit");
    assert_eq!(PromptFit::check_vocabulary(&[1, 7, 9], 8).unwrap_err().index, Some(2));
    // Without a configured cap, what the context leaves is the default and the limit.
    let open = |n| PromptFit { n_prompt_tokens: n, context_length: 8192, kv_positions: 16384, max_prompt_tokens: 8192, max_tokens_cap: None };
    req.max_tokens = None;
    assert_eq!(open(100).max_tokens(&req), Ok(8092));
    req.max_tokens = Some(5000);
    assert_eq!(open(100).max_tokens(&req), Ok(5000));
    assert!(open(4000).max_tokens(&req).unwrap_err().message("max_tokens").contains("do not fit"));
}

#[test]
fn min_tokens_is_a_whole_number_no_larger_than_max_tokens() {
    let spec = |min: Number, max: Option<Number>| RequestSpec {
        model: Some("m".into()),
        prompt: Some(PromptSpec::Text("a".into())),
        min_tokens: Some(min),
        max_tokens: max,
        ..RequestSpec::default()
    };
    assert_eq!(spec(Number::Int(5), Some(Number::Int(5))).resolve(&RequestDefaults::default()).unwrap().min_tokens, 5);
    let e = spec(Number::Int(6), Some(Number::Int(5))).resolve(&RequestDefaults::default()).unwrap_err();
    assert_eq!(e.message("min_tokens"), "min_tokens must be at most max_tokens (5), got 6");
    let e = spec(Number::Int(-1), None).resolve(&RequestDefaults::default()).unwrap_err();
    assert_eq!(e.field, Field::MinTokens);
}
