//! Hooks on the decoder self-attention keys and values: the editing engine records them during
//! inversion (the memory bank) and replaces or extends them while editing (ALGORITHM.md §2.2, §6).

use burn::tensor::Tensor;

/// One decoder self-attention layer: `up_blocks.{block}.attentions.{attention}
/// .transformer_blocks.{layer}.attn1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DecoderAttention {
    pub block: usize,
    pub attention: usize,
    pub layer: usize,
}

/// Sees (and may replace) the projected K and V, `[B, tokens, C]` before the head split, of every
/// decoder self-attention layer.
pub trait KvHook {
    /// Called once at the start of every UNet pass, before any layer.
    fn begin_pass(&mut self) {}

    /// The K/V that the layer's queries attend to; by default its own.
    fn self_attention_kv(
        &mut self,
        _layer: DecoderAttention,
        key: Tensor<3>,
        value: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        (key, value)
    }

    /// The self-attention core's output `[B, tokens, C]` for queries `q` and the layer's own
    /// K/V. `core` attends (any rows, any number of keys). By default every row attends to
    /// [`self_attention_kv`](Self::self_attention_kv)'s K/V in one call; a hook whose rows need
    /// different numbers of keys (one pass that computes the memory bank and uses it) splits
    /// the batch here.
    fn self_attention(
        &mut self,
        layer: DecoderAttention,
        q: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        core: &mut dyn FnMut(Tensor<3>, Tensor<3>, Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        let (key, value) = self.self_attention_kv(layer, key, value);
        core(q, key, value)
    }
}

/// Leaves keys and values as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl KvHook for NoHook {}
