//! The memory bank (ALGORITHM.md §2.2) and its injection into the decoder self-attention while
//! editing (§6).
//!
//! Entry `i` holds, for every decoder self-attention layer, the K and V of the inversion's UNet
//! call at the i-th editing timestep. Because that call's input latent is kept, an entry can be
//! either stored during the inversion or recomputed exactly when it is needed, inside the UNet
//! pass that uses it; which one is a setting ([`BankPolicy`]).

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Int, Tensor, TensorData};

use super::mask::Mask;
use super::plan::Injection;
use crate::model::unet::{DecoderAttention, KvHook};

/// Whether bank entries are kept from the inversion or recomputed per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankPolicy {
    /// No storage: each injected step's UNet pass carries the inversion's latent of that step
    /// as extra batch rows, whose K/V the CFG pair attends to. At 512 px the stored bank would
    /// take 1.4 GB in f16 per image (2.8 GB in f32), beyond what a browser tab can spare next
    /// to the weights.
    #[default]
    Recompute,
    /// Keep every used entry from the inversion: no extra batch rows, 27.5 MB per step at
    /// 512 px in f16 per image.
    Store,
}

/// K and V `[B_inv, tokens, C]` of every decoder self-attention layer at one step.
#[derive(Debug, Clone, Default)]
pub struct BankEntry {
    pub layers: BTreeMap<DecoderAttention, (Tensor<3>, Tensor<3>)>,
}

impl BankEntry {
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

/// The K/V that the editing rows (`key`, `value`, `[B, tokens, C]`) attend to, given the bank's
/// K/V of the same layer (`[B_inv, tokens, C]`): the bank's, or their own extended with it,
/// repeated over the CFG batch.
fn injected(
    injection: Injection,
    tokens: Option<&mut TokenMasks>,
    (bank_k, bank_v): (&Tensor<3>, &Tensor<3>),
    key: Tensor<3>,
    value: Tensor<3>,
) -> (Tensor<3>, Tensor<3>) {
    let batch = key.dims()[0];
    let repeat = |t: Tensor<3>| {
        if t.dims()[0] == batch {
            t
        } else {
            t.narrow(0, 0, 1).repeat_dim(0, batch)
        }
    };
    match injection {
        Injection::Replace => (repeat(bank_k.clone()), repeat(bank_v.clone())),
        Injection::Concat => (
            Tensor::cat(vec![key, repeat(bank_k.clone())], 1),
            Tensor::cat(vec![value, repeat(bank_v.clone())], 1),
        ),
        Injection::MaskedReplace => {
            let Some(tokens) = tokens else {
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

/// The KV hook of one editing step with a stored bank entry: replaces or extends each decoder
/// self-attention's K/V with the entry's.
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
        match self.entry.layers.get(&layer) {
            Some((k, v)) => injected(
                self.injection,
                self.tokens.as_deref_mut(),
                (k, v),
                key,
                value,
            ),
            None => (key, value),
        }
    }
}

/// The KV hook of one editing step whose bank entry is recomputed in the same UNet pass: the
/// batch's first `bank_rows` rows are the inversion's latents at this step (with the inversion's
/// text), which attend to their own K/V exactly as in the inversion; the rows after them are the
/// CFG pair, which attend to the bank rows' K/V of the same layer. One batch-3 (or 4) pass
/// instead of a batch-1 pass for the entry and a batch-2 pass for the pair.
pub struct SharedPassInjection<'a> {
    pub injection: Injection,
    pub bank_rows: usize,
    pub tokens: Option<&'a mut TokenMasks>,
    /// Device bytes of the bank K/V seen in the last pass: what a stored entry would hold.
    pub bank_bytes: usize,
}

impl KvHook for SharedPassInjection<'_> {
    fn begin_pass(&mut self) {
        self.bank_bytes = 0;
    }

    fn self_attention(
        &mut self,
        _layer: DecoderAttention,
        q: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        core: &mut dyn FnMut(Tensor<3>, Tensor<3>, Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        let (b, n) = (self.bank_rows, q.dims()[0].saturating_sub(self.bank_rows));
        if b == 0 || n == 0 {
            return core(q, key, value);
        }
        let rows = |t: &Tensor<3>, from: usize, count: usize| t.clone().narrow(0, from, count);
        let (bank_k, bank_v) = (rows(&key, 0, b), rows(&value, 0, b));
        self.bank_bytes +=
            (bank_k.shape().num_elements() + bank_v.shape().num_elements()) * key.dtype().size();
        let (k, v) = injected(
            self.injection,
            self.tokens.as_deref_mut(),
            (&bank_k, &bank_v),
            rows(&key, b, n),
            rows(&value, b, n),
        );
        let own = core(rows(&q, 0, b), bank_k.clone(), bank_v.clone());
        let edited = core(rows(&q, b, n), k, v);
        Tensor::cat(vec![own, edited], 0)
    }
}
