//! The CLIP ViT-L/14 text tower of SD 1.5 (`CLIPTextModel`): token + position embeddings,
//! pre-norm transformer layers with a causal mask and quick-GELU, then the final layer norm.
//! Its last hidden state is the UNet's cross-attention context.

use burn::tensor::{DType, Int, Tensor, TensorData, activation::sigmoid, module::embedding};

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

/// The text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    config: ClipConfig,
    token_embedding: Tensor<2>,
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
        let token_embedding = w.tensor(
            "text_model.embeddings.token_embedding.weight",
            [config.vocab_size, d],
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

    /// Encodes rows of token ids (each `max_position_embeddings` long) into the last hidden
    /// state `[B, 77, D]`.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>> {
        let seq = self.config.max_position_embeddings;
        let batch = ids.len();
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
        let device = self.token_embedding.device();
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| i64::from(t)).collect();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(flat, [batch, seq]), &device);
        let d = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let mut x = embedding(self.token_embedding.clone(), idx)
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
