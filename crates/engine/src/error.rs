//! The engine's one error type. Each variant maps to one stable code that the
//! TypeScript binding exposes as `EngineClientError.code`.

use thiserror::Error;

use crate::request::InvalidParam;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    #[error("invalid params: {0}")]
    InvalidParams(String),
    /// A request field that breaks a rule (`request.rs`).
    #[error("invalid params: {0}")]
    InvalidParam(InvalidParam),
    #[error("cannot load model {path}: {reason}")]
    ModelLoad { path: String, reason: String },
    #[error("model not loaded: {0}")]
    ModelNotLoaded(String),
    #[error("generation failed: {0}")]
    Generation(String),
    /// The output reached a point its grammar cannot continue from.
    #[error("grammar error: {0}")]
    Grammar(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("request timed out after {0} ms")]
    Timeout(u64),
    #[error("request cancelled")]
    Cancelled,
    #[error("engine overloaded: {0}")]
    Overloaded(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// The stable code of the TypeScript contract.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::InvalidParams(_) | EngineError::InvalidParam(_) => "InvalidParams",
            EngineError::ModelLoad { .. } => "ModelLoadError",
            EngineError::ModelNotLoaded(_) => "ModelNotLoaded",
            EngineError::Generation(_) => "GenerationError",
            EngineError::Grammar(_) => "GrammarError",
            EngineError::Tokenizer(_) => "TokenizerError",
            EngineError::Timeout(_) => "Timeout",
            EngineError::Cancelled => "Cancelled",
            EngineError::Overloaded(_) => "Overloaded",
            EngineError::Internal(_) => "InternalError",
        }
    }
}

impl From<InvalidParam> for EngineError {
    fn from(e: InvalidParam) -> Self {
        EngineError::InvalidParam(e)
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
