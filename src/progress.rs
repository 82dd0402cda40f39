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

/// Reports `step` of `total` in `phase`; `Err(Cancelled)` when the callback says stop.
pub(crate) fn report(
    progress: &mut ProgressFn<'_>,
    phase: Phase,
    step: usize,
    total: usize,
) -> crate::error::Result<()> {
    if progress(Progress { phase, step, total }) {
        Ok(())
    } else {
        Err(crate::error::Error::Cancelled)
    }
}

/// Reports a finished step. In the browser it first waits for the GPU to finish the work queued
/// for `latest`: otherwise all steps would be queued at once and report done in a millisecond,
/// and the page's event loop (the cancel button) would get no turn until the end. Natively the
/// queue is left to run ahead, as before.
pub(crate) async fn step_done(
    progress: &mut ProgressFn<'_>,
    phase: Phase,
    step: usize,
    total: usize,
    latest: &burn::tensor::Tensor<4>,
) -> crate::error::Result<()> {
    if cfg!(target_family = "wasm") {
        crate::device::read_back(latest.clone().slice([0..1, 0..1, 0..1, 0..1])).await?;
    }
    report(progress, phase, step, total)
}
