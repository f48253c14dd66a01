//! Work bounded before a request reaches its worker: loads of one id at a
//! time, turns to tokenize, prompts refused early, cancels before submit.

use super::tests::{collect, config, req, tiny_engine, tiny_engine_with};
use super::*;

#[test]
fn a_load_in_progress_holds_up_only_loads_of_its_own_id() {
    let (e, d) = tiny_engine_with(config(|c| c.model_cache.max_models = 2));
    let e = Arc::new(e);
    let path = d.path().join("tiny.gguf");
    // A load of "slow" that does not end (a file on a stalled disk).
    let stalled = e.loading.claim("slow");
    let other = {
        let (e, path) = (e.clone(), path.clone());
        std::thread::spawn(move || e.load_model(&path, Some("other".into())))
    };
    let same = {
        let (e, path) = (e.clone(), path.clone());
        std::thread::spawn(move || e.load_model(&path, Some("slow".into())))
    };
    let t = Instant::now();
    while !other.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30), "a load of another id waited for the stalled one");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(other.join().unwrap().unwrap().id, "other");
    std::thread::sleep(Duration::from_millis(50));
    assert!(!same.is_finished(), "a second load of one id waits for the first");
    drop(stalled);
    // maxModels 2: "tiny" (idle, least recent) made room for it.
    assert_eq!(same.join().unwrap().unwrap().id, "slow");
    let mut ids: Vec<String> = e.list_models().into_iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, ["other", "slow"]);
    // Ids with control characters are refused, not a thread-name panic.
    for bad in ["nul\0id", "line\nbreak", &"x".repeat(300)] {
        assert_eq!(e.load_model(&path, Some(bad.into())).unwrap_err().code(), "InvalidParams", "{bad:?}");
    }
}

#[test]
fn a_prompt_far_over_the_token_limit_is_refused_from_its_first_part() {
    let (e, _d) = tiny_engine_with(config(|c| c.limits.max_prompt_tokens = 20));
    // 20 tokens of 8 bytes and a margin: past twice that, the first part
    // decides. Each "word " is about three tokens of the tiny vocabulary.
    let err = e.submit(req(Input::Prompt("word ".repeat(1000)))).err().unwrap().to_string();
    assert!(err.contains("prompt tokens: more than") && err.contains("limits.maxPromptTokens"), "{err}");
    // The same through the chat template, and through a template that
    // would render more than the prompt limit.
    let err = e.submit(req(Input::Messages(vec![ChatMessage::new("user", &"word ".repeat(1000))]))).err().unwrap().to_string();
    assert!(err.contains("prompt tokens: more than"), "{err}");
    // Just over: tokenized whole, and the count is exact.
    let err = e.submit(req(Input::Prompt("word ".repeat(11)))).err().unwrap().to_string();
    assert!(err.contains("prompt tokens: 34 exceeds the limit of 20"), "{err}");
}

#[test]
fn a_request_cancelled_before_submit_returns_stops_waiting_for_its_turn() {
    let (e, _d) = tiny_engine();
    let e = Arc::new(e);
    // Every turn taken, as by long prompts being tokenized.
    let never = AtomicBool::new(false);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let turns: Vec<_> = (0..cores).map(|_| e.prepare_turn(&never).ok().unwrap()).collect();
    let waiting = {
        let e = e.clone();
        std::thread::spawn(move || e.submit(GenerateRequest { request_id: Some("r1".into()), ..req(Input::Prompt("hello".into())) }).map(|_| ()))
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiting.is_finished());
    e.cancel_pending("other");
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiting.is_finished(), "only the named request is cancelled");
    e.cancel_pending("r1");
    assert_eq!(waiting.join().unwrap().unwrap_err().code(), "Cancelled");
    drop(turns);
    assert!(e.pending.lock().unwrap().listed.is_empty());
    // A cancel that came first ("other", above) is waiting for its request.
    let early = GenerateRequest { request_id: Some("other".into()), ..req(Input::Prompt("hello".into())) };
    assert_eq!(e.submit(early.clone()).err().unwrap().code(), "Cancelled");
    // Once only.
    assert!(collect(e.submit(early).unwrap()).2.is_ok());
    assert!(collect(e.submit(req(Input::Prompt("hello".into()))).unwrap()).2.is_ok());
}
