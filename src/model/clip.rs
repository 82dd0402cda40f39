//! The CLIP ViT-L/14 text tower of SD 1.5 (`CLIPTextModel`): token + position embeddings,
//! pre-norm transformer layers with a causal mask and quick-GELU, then the final layer norm.
//! Its last hidden state is the UNet's cross-attention context.

use burn::tensor::{DType, Int, Tensor, TensorData, activation::sigmoid};

use super::attention::AttentionPlan;
use super::config::ClipConfig;
use super::nn::{LayerNorm, Linear, to_dtype};
use crate::error::{Error, Result};
use crate::weights::Loader;

#[derive(Debug, Clone)]
struct ClipLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Rows of the token embedding per GPU buffer: 24 MiB of SD 1.5's in f32, well within
/// WebGPU's default binding size of 128 MiB, which the whole table (145 MiB) is not.
pub const TOKEN_BLOCK_ROWS: usize = 8192;

/// The text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    config: ClipConfig,
    /// The token embedding in blocks of [`TOKEN_BLOCK_ROWS`] rows, so that no buffer holds the
    /// whole table.
    token_embedding: Vec<Tensor<2>>,
    position_embedding: Tensor<2>,
    layers: Vec<ClipLayer>,
    final_norm: LayerNorm,
    attention: AttentionPlan,
}

impl ClipTextEncoder {
    /// Builds the encoder from `text_encoder/model.safetensors` keys (`text_model.*`).
    pub fn load(config: &ClipConfig, w: &mut Loader) -> Result<Self> {
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let token_embedding = w.row_blocks(
            "text_model.embeddings.token_embedding.weight",
            [config.vocab_size, d],
            TOKEN_BLOCK_ROWS,
        )?;
        let position_embedding = w.tensor(
            "text_model.embeddings.position_embedding.weight",
            [config.max_position_embeddings, d],
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("text_model.encoder.layers.{i}");
                Ok(ClipLayer {
                    norm1: LayerNorm::load(w, &format!("{p}.layer_norm1"), d, eps)?,
                    q: Linear::load(w, &format!("{p}.self_attn.q_proj"), d, d, true)?,
                    k: Linear::load(w, &format!("{p}.self_attn.k_proj"), d, d, true)?,
                    v: Linear::load(w, &format!("{p}.self_attn.v_proj"), d, d, true)?,
                    out: Linear::load(w, &format!("{p}.self_attn.out_proj"), d, d, true)?,
                    norm2: LayerNorm::load(w, &format!("{p}.layer_norm2"), d, eps)?,
                    fc1: Linear::load(
                        w,
                        &format!("{p}.mlp.fc1"),
                        d,
                        config.intermediate_size,
                        true,
                    )?,
                    fc2: Linear::load(
                        w,
                        &format!("{p}.mlp.fc2"),
                        config.intermediate_size,
                        d,
                        true,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::load(w, "text_model.final_layer_norm", d, eps)?;
        Ok(Self {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            attention: AttentionPlan::default(),
        })
    }

    /// Buffers in the file that carry no weights.
    pub const IGNORED_KEYS: &'static [&'static str] = &["embeddings.position_ids"];

    fn activation(&self, x: Tensor<3>) -> Tensor<3> {
        if self.config.hidden_act == "quick_gelu" {
            x.clone() * sigmoid(x * 1.702)
        } else {
            burn::tensor::activation::gelu(x)
        }
    }

    /// The token embedding's rows for `ids` (in the vocabulary), in order: `[N, D]`. Each
    /// block gives the rows it holds, and one more selection puts them back in order.
    fn embed_tokens(&self, ids: impl Iterator<Item = u32>) -> Tensor<2> {
        let device = self.position_embedding.device();
        let index = |values: Vec<i64>| {
            let n = values.len();
            Tensor::<1, Int>::from_data(TensorData::new(values, [n]), &device)
        };
        let ids: Vec<usize> = ids.map(|t| t as usize).collect();
        let mut parts = Vec::new();
        // Where each token's row lands in the blocks' concatenated rows.
        let mut landed = vec![0i64; ids.len()];
        let mut next = 0i64;
        for (b, block) in self.token_embedding.iter().enumerate() {
            let first = b * TOKEN_BLOCK_ROWS;
            let mut rows = Vec::new();
            for (i, &id) in ids.iter().enumerate() {
                if id / TOKEN_BLOCK_ROWS == b {
                    rows.push((id - first) as i64);
                    landed[i] = next;
                    next += 1;
                }
            }
            if !rows.is_empty() {
                parts.push(block.clone().select(0, index(rows)));
            }
        }
        Tensor::cat(parts, 0).select(0, index(landed))
    }

    /// Encodes rows of token ids (each `max_position_embeddings` long) into the last hidden
    /// state `[B, 77, D]`.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>> {
        let seq = self.config.max_position_embeddings;
        let batch = ids.len();
        if batch == 0 {
            return Err(Error::InvalidInput("no token rows to encode".into()));
        }
        if ids.iter().any(|row| row.len() != seq) {
            return Err(Error::InvalidInput(format!(
                "every token row must have {seq} ids"
            )));
        }
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let d = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let mut x = self
            .embed_tokens(ids.iter().flatten().copied())
            .reshape([batch, seq, d])
            + self.position_embedding.clone().unsqueeze_dim(0);
        let split = |t: Tensor<3>| t.reshape([batch, seq, heads, d / heads]).swap_dims(1, 2);
        for layer in &self.layers {
            let h = layer.norm1.forward(x.clone());
            let attn = self.attention.attend(
                split(layer.q.forward(h.clone())),
                split(layer.k.forward(h.clone())),
                split(layer.v.forward(h)),
                true,
            );
            let attn = attn.swap_dims(1, 2).reshape([batch, seq, d]);
            x = x + layer.out.forward(attn);
            let h = layer.norm2.forward(x.clone());
            x = x + layer.fc2.forward(self.activation(layer.fc1.forward(h)));
        }
        Ok(to_dtype(self.final_norm.forward(x), DType::F32))
    }
}
