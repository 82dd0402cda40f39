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

    fn self_attention_kv(
        &mut self,
        layer: DecoderAttention,
        key: Tensor<3>,
        value: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>);
}

/// Leaves keys and values as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl KvHook for NoHook {
    fn self_attention_kv(
        &mut self,
        _: DecoderAttention,
        key: Tensor<3>,
        value: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        (key, value)
    }
}

/// Records every decoder self-attention K/V of one forward pass, in call order.
#[derive(Debug, Default)]
pub struct CaptureKv {
    pub entries: Vec<(DecoderAttention, Tensor<3>, Tensor<3>)>,
}

impl KvHook for CaptureKv {
    fn self_attention_kv(
        &mut self,
        layer: DecoderAttention,
        key: Tensor<3>,
        value: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        self.entries.push((layer, key.clone(), value.clone()));
        (key, value)
    }
}
