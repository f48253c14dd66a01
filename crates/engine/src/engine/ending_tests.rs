//! How an output ends: stop sequences, stop token ids, and `min_tokens`
//! holding both off.

use super::tests::{collect, req, tiny_engine};
use super::*;

#[test]
fn stop_sequences_are_not_emitted() {
    let (e, _d) = tiny_engine();
    let seeded = |seed| {
        let mut r = req(Input::Prompt("hello".into()));
        r.max_tokens = Some(32);
        r.sampling = SamplingParams { temperature: 1.5, seed: Some(seed), ..Default::default() };
        r
    };
    // A random model may end at once; take the first seed that talks.
    let (seed, chars, k) = (0..100)
        .find_map(|seed| {
            let (_, text, _) = collect(e.submit(seeded(seed)).unwrap());
            let chars: Vec<char> = text.chars().collect();
            // The first character that did not occur before it.
            let k = (1..chars.len()).find(|&k| !chars[..k].contains(&chars[k]))?;
            Some((seed, chars, k))
        })
        .expect("no seed gave a usable output");
    // The same seeded run with that character as a stop sequence ends right before it.
    let mut r = seeded(seed);
    r.stop_sequences = vec![chars[k].to_string()];
    let (_, text2, res) = collect(e.submit(r).unwrap());
    assert_eq!(res.unwrap().finish_reason, FinishReason::Stop);
    assert_eq!(text2, chars[..k].iter().collect::<String>());
}

#[test]
fn min_tokens_holds_off_every_ending_until_that_many_tokens() {
    let (e, _d) = tiny_engine();
    let greedy = |f: &dyn Fn(&mut GenerateRequest)| {
        let mut r = req(Input::Prompt("hello".into()));
        r.max_tokens = Some(12);
        f(&mut r);
        collect(e.submit(r).unwrap())
    };
    let (ids, text, _) = greedy(&|_| {});
    assert!(!ids.is_empty() && !text.is_empty());
    // The first greedy token as a stop token id ends the output at once...
    let (none, _, res) = greedy(&|r| r.stop_token_ids = vec![ids[0]]);
    assert_eq!((none.len(), res.unwrap().finish_reason), (0, FinishReason::Stop));
    // ...unless min_tokens bans it: then 4 tokens come first, none of them it.
    let (held, _, _) = greedy(&|r| {
        r.stop_token_ids = vec![ids[0]];
        r.min_tokens = 4;
    });
    assert!(held.len() >= 4 && !held[..4].contains(&ids[0]), "{held:?}");
    // A stop sequence in the first min_tokens tokens does not end the output either.
    let first: String = text.chars().take(1).collect();
    let (_, cut, _) = greedy(&|r| r.stop_sequences = vec![first.clone()]);
    assert_eq!(cut, "");
    let (n, _, res) = greedy(&|r| {
        r.stop_sequences = vec![first.clone()];
        r.min_tokens = ids.len();
    });
    assert!(n.len() >= ids.len(), "{n:?} {res:?}");
}
