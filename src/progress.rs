//! Progress reports and cancellation: long work calls a callback with (phase, step, total);
//! the callback returns `false` to cancel, and the work stops at its next step.

/// What the engine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    LoadingWeights,
    EncodingPrompt,
    EncodingImage,
    Inverting,
    Sampling,
    Editing,
    Decoding,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::LoadingWeights => "loading weights",
            Self::EncodingPrompt => "encoding prompt",
            Self::EncodingImage => "encoding image",
            Self::Inverting => "inverting",
            Self::Sampling => "sampling",
            Self::Editing => "editing",
            Self::Decoding => "decoding",
        })
    }
}

/// One progress report: `step` of `total` in `phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub step: usize,
    pub total: usize,
}

/// The callback type: return `false` to cancel.
pub type ProgressFn<'a> = dyn FnMut(Progress) -> bool + 'a;

/// A callback that never cancels and ignores reports.
pub fn ignore_progress(_: Progress) -> bool {
    true
}
