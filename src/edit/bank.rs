//! The memory bank (ALGORITHM.md §2.2) and its injection into the decoder self-attention while
//! editing (§6).
//!
//! Entry `i` holds, for every decoder self-attention layer, the K and V of the inversion's UNet
//! call at the i-th editing timestep. Because that call's input latent is kept, an entry can be
//! either stored during the inversion or recomputed exactly when it is needed; which one is a
//! setting ([`BankPolicy`]).

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Int, Tensor, TensorData};

use super::mask::Mask;
use super::plan::Injection;
use crate::model::unet::{CaptureKv, DecoderAttention, KvHook, Unet};

/// Whether bank entries are kept from the inversion or recomputed per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankPolicy {
    /// One extra conditional UNet pass per injected step; no storage. At 512 px the stored
    /// bank would take 1.4 GB in f16 per image (2.8 GB in f32), beyond what a browser tab can
    /// spare next to the weights.
    #[default]
    Recompute,
    /// Keep every used entry from the inversion: no extra passes, 27.5 MB per step at 512 px
    /// in f16 per image.
    Store,
}

/// K and V `[B_inv, tokens, C]` of every decoder self-attention layer at one step.
#[derive(Debug, Clone, Default)]
pub struct BankEntry {
    pub layers: BTreeMap<DecoderAttention, (Tensor<3>, Tensor<3>)>,
}

impl BankEntry {
    pub fn from_capture(capture: CaptureKv) -> Self {
        Self {
            layers: capture
                .entries
                .into_iter()
                .map(|(layer, k, v)| (layer, (k, v)))
                .collect(),
        }
    }

    /// Recomputes the entry of a step from the inversion's input latent at that step.
    pub fn recompute(unet: &Unet, latent: Tensor<4>, timestep: f32, context: &Tensor<3>) -> Self {
        let mut capture = CaptureKv::default();
        unet.capture_decoder_kv(latent, timestep, context, &mut capture);
        Self::from_capture(capture)
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.layers
            .values()
            .map(|(k, v)| (k.shape().num_elements() + v.shape().num_elements()) * k.dtype().size())
            .sum()
    }
}

/// Token indices of the masked-replace attention for one token grid.
#[derive(Debug, Clone)]
struct TokenSelection {
    background: Option<Tensor<1, Int>>,
    object: Option<Tensor<1, Int>>,
}

/// Per-token masks of appearance/paste: the base image's background tokens and the reference
/// object's tokens, at every token count the decoder uses.
#[derive(Debug, Clone)]
pub struct TokenMasks {
    base: Mask,
    replace: Mask,
    cache: HashMap<usize, TokenSelection>,
}

impl TokenMasks {
    /// From working-pixel masks of the base object and of the reference object.
    pub fn new(base: Mask, replace: Mask) -> Self {
        Self {
            base,
            replace,
            cache: HashMap::new(),
        }
    }

    /// The token grid of a layer with `tokens` tokens: the working size divided by the cell
    /// `sqrt(H·W / tokens)` (8, 16, 32 px at SD 1.5's three decoder levels).
    fn grid(&self, tokens: usize) -> (usize, usize) {
        let (h, w) = (self.base.h, self.base.w);
        let mut cell = 1;
        while cell <= h.max(w) {
            if h.div_ceil(cell) * w.div_ceil(cell) == tokens {
                return (h.div_ceil(cell), w.div_ceil(cell));
            }
            cell *= 2;
        }
        // Not a power-of-two reduction of the working size: fall back to a square grid.
        let side = (tokens as f64).sqrt().round() as usize;
        (side.max(1), tokens / side.max(1))
    }

    fn selection(&mut self, tokens: usize, device: &burn::tensor::Device) -> TokenSelection {
        if let Some(s) = self.cache.get(&tokens) {
            return s.clone();
        }
        let (gh, gw) = self.grid(tokens);
        let to_tensor = |idx: Vec<usize>| {
            (!idx.is_empty()).then(|| {
                let v: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
                let n = v.len();
                Tensor::<1, Int>::from_ints(TensorData::new(v, [n]), device)
            })
        };
        let selection = TokenSelection {
            background: to_tensor(self.base.nearest(gh, gw).not().indices()),
            object: to_tensor(self.replace.nearest(gh, gw).indices()),
        };
        self.cache.insert(tokens, selection.clone());
        selection
    }
}

/// The KV hook of one editing step: replaces or extends each decoder self-attention's K/V
/// with the bank entry, repeated over the CFG batch.
pub struct BankInjection<'a> {
    pub injection: Injection,
    pub entry: &'a BankEntry,
    pub tokens: Option<&'a mut TokenMasks>,
}

impl KvHook for BankInjection<'_> {
    fn self_attention_kv(
        &mut self,
        layer: DecoderAttention,
        key: Tensor<3>,
        value: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        let Some((bank_k, bank_v)) = self.entry.layers.get(&layer) else {
            return (key, value);
        };
        let batch = key.dims()[0];
        let repeat = |t: Tensor<3>| {
            if t.dims()[0] == batch {
                t
            } else {
                t.narrow(0, 0, 1).repeat_dim(0, batch)
            }
        };
        match self.injection {
            Injection::Replace => (repeat(bank_k.clone()), repeat(bank_v.clone())),
            Injection::Concat => (
                Tensor::cat(vec![key, repeat(bank_k.clone())], 1),
                Tensor::cat(vec![value, repeat(bank_v.clone())], 1),
            ),
            Injection::MaskedReplace => {
                let Some(tokens) = self.tokens.as_deref_mut() else {
                    return (key, value);
                };
                let sel = tokens.selection(key.dims()[1], &key.device());
                let pick = |bank: &Tensor<3>| {
                    let mut parts = Vec::new();
                    if let Some(bg) = &sel.background {
                        parts.push(bank.clone().narrow(0, 0, 1).select(1, bg.clone()));
                    }
                    if let Some(obj) = &sel.object {
                        let row = bank.dims()[0].saturating_sub(1);
                        parts.push(bank.clone().narrow(0, row, 1).select(1, obj.clone()));
                    }
                    parts
                };
                let (ks, vs) = (pick(bank_k), pick(bank_v));
                if ks.is_empty() {
                    // Neither mask reaches this token grid: attention over no keys would be
                    // NaN, so the layer keeps its own K/V.
                    return (key, value);
                }
                (
                    Tensor::cat(ks, 1).repeat_dim(0, batch),
                    Tensor::cat(vs, 1).repeat_dim(0, batch),
                )
            }
        }
    }
}
