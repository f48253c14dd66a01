//! Text in and out: the tokenizer, chat templates, stop sequences.

pub mod chat;
pub mod grammar;
pub mod output;
pub(crate) mod stop;
pub mod tokenizer;
pub mod tools;
