//! What a second edit of the same photo reuses from the first: its inversion and its guided
//! steps' reference features, under a digest of everything they depend on.

use image::RgbImage;
use sha2::{Digest, Sha256};

use super::bank::{BankEntry, BankPolicy};
use super::guidance::ReferenceFeatures;
use super::plan::EditPlan;
use super::spec::Edit;
use burn::tensor::Tensor;

/// The inversion of one photo (and reference image): what a second edit of the same inputs
/// can reuse.
#[derive(Clone)]
pub struct Inversion {
    /// `steps + 1` latents `[B, 4, h, w]`.
    pub latents: Vec<Tensor<4>>,
    /// Inversion text context `[B, 77, C]`.
    pub context: Tensor<3>,
    /// Stored bank entries by editing step, when the policy stores them.
    pub bank: Option<Vec<Option<BankEntry>>>,
}

/// The last inversion and a digest of everything it depends on, so that a second edit of the
/// same photo with the same prompts and settings skips its inversion passes (in the reference
/// timings, 2.0 s of an 8.9 s edit), and the guided steps' reference features, which depend
/// on nothing else either (ALGORITHM.md §11: one truncated UNet pass per guided step). The
/// owner keeps one per loaded model and clears it when the model changes.
#[derive(Default)]
pub struct InversionCache {
    entry: Option<Kept>,
    hits: usize,
    feature_hits: usize,
    /// The most device bytes of reference features kept (none: no limit). Guided steps past
    /// it compute their features again in a later edit: the browser keeps to a budget, and
    /// an edit that no other edit follows keeps none.
    feature_budget: Option<usize>,
}

/// An inversion as one edit samples from it, with the reference features the edits of it
/// share.
pub(super) struct Source<'a> {
    pub(super) inversion: &'a Inversion,
    features: &'a mut Vec<Option<ReferenceFeatures>>,
    /// Bytes of features computed now that may still be kept for a later edit.
    budget: usize,
    hits: &'a mut usize,
}

impl Source<'_> {
    /// Editing step `step`'s reference features: an earlier edit's, or `compute`'s (kept).
    pub(super) fn reference_features(
        &mut self,
        step: usize,
        compute: impl FnOnce() -> ReferenceFeatures,
    ) -> ReferenceFeatures {
        if let Some(Some(kept)) = self.features.get(step) {
            *self.hits += 1;
            return kept.clone();
        }
        let computed = compute();
        let bytes = computed.bytes();
        if bytes <= self.budget {
            self.budget -= bytes;
            if self.features.len() <= step {
                self.features.resize(step + 1, None);
            }
            self.features[step] = Some(computed.clone());
        }
        computed
    }
}

/// What one inversion's edits share.
pub(super) struct Kept {
    key: [u8; 32],
    inversion: Inversion,
    /// The reference features of each editing step that computed them.
    features: Vec<Option<ReferenceFeatures>>,
}

impl InversionCache {
    /// A cache that keeps at most `bytes` of reference features (a 512 px guided step's are
    /// 7.9 MB in f16, twice that where the edit has a reference image).
    pub fn with_feature_budget(bytes: usize) -> Self {
        Self {
            feature_budget: Some(bytes),
            ..Self::default()
        }
    }

    /// Changes the budget for later edits and drops the kept features that no longer fit it,
    /// keeping the earliest steps that do (the order an edit keeps them in), so that an
    /// embedder can take device memory back without losing the inversion.
    pub fn set_feature_budget(&mut self, bytes: usize) {
        self.feature_budget = Some(bytes);
        if let Some(kept) = &mut self.entry {
            let mut left = bytes;
            for slot in &mut kept.features {
                match slot {
                    Some(f) if f.bytes() <= left => left -= f.bytes(),
                    _ => *slot = None,
                }
            }
        }
    }

    /// Forgets the kept inversion and features (and the device memory they hold).
    pub fn clear(&mut self) {
        self.entry = None;
    }

    /// How many edits reused the kept inversion.
    pub fn hits(&self) -> usize {
        self.hits
    }

    /// How many guided steps took their reference features from an earlier edit.
    pub fn feature_hits(&self) -> usize {
        self.feature_hits
    }

    /// Device bytes of the kept reference features.
    pub fn feature_bytes(&self) -> usize {
        self.entry.as_ref().map_or(0, Kept::feature_bytes)
    }

    /// The kept inversion if it was made from the inputs `key` digests (counted as a hit);
    /// otherwise none, and what was kept is forgotten, so that its device memory is free
    /// before the new inversion takes its own.
    pub(super) fn take_matching(&mut self, key: &[u8; 32]) -> Option<Kept> {
        match self.entry.take() {
            Some(kept) if kept.key == *key => {
                self.hits += 1;
                Some(kept)
            }
            _ => None,
        }
    }

    /// Keeps `kept` for the next edit, and lends it to this one with what is left of the
    /// feature budget.
    pub(super) fn keep(&mut self, kept: Kept) -> Source<'_> {
        let budget = self
            .feature_budget
            .map_or(usize::MAX, |b| b.saturating_sub(kept.feature_bytes()));
        let Kept {
            inversion,
            features,
            ..
        } = self.entry.insert(kept);
        Source {
            inversion,
            features,
            budget,
            hits: &mut self.feature_hits,
        }
    }
}

impl Kept {
    /// A fresh inversion, with no features yet.
    pub(super) fn new(key: [u8; 32], inversion: Inversion) -> Self {
        Self {
            key,
            inversion,
            features: Vec::new(),
        }
    }

    fn feature_bytes(&self) -> usize {
        self.features
            .iter()
            .flatten()
            .map(ReferenceFeatures::bytes)
            .sum()
    }
}

/// What an inversion depends on: the input images (before resizing), the working size, the
/// reference image's scale, the inversion prompts, the step count, and which bank entries are
/// recorded. The model is the cache owner's business.
pub(super) fn inversion_key(edit: &Edit, plan: &EditPlan, bank: BankPolicy) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut image = |img: &RgbImage| {
        h.update(img.width().to_le_bytes());
        h.update(img.height().to_le_bytes());
        h.update(img.as_raw());
    };
    image(&edit.image);
    if plan.inversion_batch() == 2
        && let Some(reference) = &edit.reference
    {
        image(reference);
    }
    let (wh, ww) = plan.spaces.working;
    for n in [wh, ww, plan.steps] {
        h.update((n as u64).to_le_bytes());
    }
    h.update(plan.reference_scale.to_le_bytes());
    let prompts: &[&str] = if plan.inversion_batch() == 2 {
        &[&edit.prompt, &edit.reference_prompt]
    } else {
        &[&edit.prompt]
    };
    for p in prompts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.update([u8::from(bank == BankPolicy::Store)]);
    if bank == BankPolicy::Store {
        let wanted: Vec<u8> = (0..plan.steps).map(|i| u8::from(plan.injects(i))).collect();
        h.update(wanted);
    }
    h.finalize().into()
}
