//! The library's error type: every failure a user can act on names what went wrong and where.

use std::path::PathBuf;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A weight file could not be read, or is not what its name claims.
    #[error("weight file {file}: {problem}")]
    Weights {
        file: String,
        problem: WeightProblem,
    },

    /// A config.json or tokenizer file is missing or malformed.
    #[error("model file {file}: {message}")]
    ModelFile { file: String, message: String },

    /// An input image cannot be used.
    #[error("image: {0}")]
    Image(String),

    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The GPU could not be used (no adapter, out of memory).
    #[error("GPU: {0}")]
    Device(String),

    /// The GPU device was lost (a driver reset, a GPU removed or put to sleep, the browser
    /// taking it back): nothing more runs on it, so the engine has to start again with a new
    /// one. The browser editor does that itself.
    #[error(
        "the GPU device was lost ({0}); nothing more can run on it until the engine starts again"
    )]
    DeviceLost(String),

    /// The edit spec cannot be run as written.
    #[error("edit spec: {0}")]
    Spec(String),

    /// A caller passed values that do not fit together.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The run was cancelled through its progress callback.
    #[error("cancelled")]
    Cancelled,
}

/// What is wrong with one weight file; the key is named wherever one is involved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WeightProblem {
    #[error("file is {len} bytes, too short for a safetensors header (truncated download?)")]
    TooShort { len: u64 },
    #[error(
        "header length {header_len} is larger than the file ({file_len} bytes): truncated or not a safetensors file"
    )]
    HeaderTooLong { header_len: u64, file_len: u64 },
    #[error("header length {0} exceeds the 100 MB limit: not a safetensors file")]
    HeaderTooLarge(u64),
    #[error("malformed header: {0}")]
    MalformedHeader(String),
    #[error("tensor `{key}` has unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype { key: String, dtype: String },
    #[error(
        "tensor `{key}`: data runs to byte {end} but the file has {available} data bytes (truncated download?)"
    )]
    Truncated {
        key: String,
        end: u64,
        available: u64,
    },
    #[error("tensor `{key}` is missing")]
    Missing { key: String },
    #[error("unexpected tensors not used by the model: {keys}")]
    Unexpected { keys: String },
    #[error("tensor `{key}` has shape {found:?}, the model config expects {expected:?}")]
    WrongShape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{key}` contains non-finite values")]
    NonFinite { key: String },
    #[error("read failed: {0}")]
    Read(String),
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
