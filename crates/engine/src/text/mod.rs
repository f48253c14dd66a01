//! Text in and out: the tokenizer, chat templates, stop sequences.

pub mod chat;
pub(crate) mod stop;
pub mod tokenizer;
