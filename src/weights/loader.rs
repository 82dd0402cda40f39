//! Turns named tensors of a weight file into device tensors for the model modules, checking
//! each shape against the config and, at the end, that nothing in the file went unused.

use std::collections::BTreeSet;

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::reader::{HostTensor, SafetensorsReader};
use super::source::ByteSource;
use crate::error::{Error, Result, WeightProblem};

/// Anything that yields tensors by name (a safetensors file, or a test double).
pub trait TensorRead {
    fn label(&self) -> &str;
    fn keys(&self) -> Vec<String>;
    fn contains(&self, key: &str) -> bool;
    fn read(&mut self, key: &str) -> Result<HostTensor>;
    /// Reads `key`, which the model expects with `shape` (a source that makes its tensors up,
    /// such as random weights for benchmarks, needs to know it).
    fn read_shaped(&mut self, key: &str, _shape: &[usize]) -> Result<HostTensor> {
        self.read(key)
    }
}

impl<S: ByteSource> TensorRead for SafetensorsReader<S> {
    fn label(&self) -> &str {
        SafetensorsReader::label(self)
    }

    fn keys(&self) -> Vec<String> {
        self.header().tensors.keys().cloned().collect()
    }

    fn contains(&self, key: &str) -> bool {
        self.entry(key).is_some()
    }

    fn read(&mut self, key: &str) -> Result<HostTensor> {
        self.read_f32(key)
    }
}

/// Maps a diffusers key to the older spelling some published checkpoints still use.
pub type KeyAlias = fn(&str) -> Option<String>;

/// Loads the tensors of one weight file onto a device, one at a time.
pub struct Loader<'a> {
    reader: &'a mut dyn TensorRead,
    device: Device,
    dtype: DType,
    alias: Option<KeyAlias>,
    taken: BTreeSet<String>,
}

impl<'a> Loader<'a> {
    /// `dtype` is the compute dtype (F32, or F16 where the device has it).
    pub fn new(reader: &'a mut dyn TensorRead, device: &Device, dtype: DType) -> Self {
        Self {
            reader,
            device: device.clone(),
            dtype,
            alias: None,
            taken: BTreeSet::new(),
        }
    }

    /// Also accept keys under a legacy name when the diffusers name is absent.
    pub fn with_alias(mut self, alias: KeyAlias) -> Self {
        self.alias = Some(alias);
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn error(&self, problem: WeightProblem) -> Error {
        Error::Weights {
            file: self.reader.label().to_string(),
            problem,
        }
    }

    fn resolve(&self, key: &str) -> Result<String> {
        if self.reader.contains(key) {
            return Ok(key.to_string());
        }
        if let Some(old) = self.alias.and_then(|a| a(key))
            && self.reader.contains(&old)
        {
            return Ok(old);
        }
        Err(self.error(WeightProblem::Missing { key: key.into() }))
    }

    /// Reads `key` on the host, checking its shape.
    pub fn host(&mut self, key: &str, shape: &[usize]) -> Result<HostTensor> {
        let stored = self.resolve(key)?;
        let t = self.reader.read_shaped(&stored, shape)?;
        if t.shape != shape {
            return Err(self.error(WeightProblem::WrongShape {
                key: stored,
                expected: shape.to_vec(),
                found: t.shape,
            }));
        }
        self.taken.insert(stored);
        Ok(t)
    }

    /// The compute dtype every loaded tensor gets.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn upload<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        // The dtype must be named here: `from_data` alone converts to the device's default
        // (f32), which would silently undo `--f16`.
        let (device, dtype) = (&self.device, self.dtype);
        crate::device::persistent(device, TensorData::new(values, shape), |data| {
            Tensor::from_data(data, (device, dtype))
        })
    }

    /// Loads `key`, which must have exactly `shape`.
    pub fn tensor<const D: usize>(&mut self, key: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let t = self.host(key, &shape)?;
        Ok(self.upload(t.values, shape))
    }

    /// Loads the table `key` of `shape` `[n, d]` as blocks of at most `rows` rows each: a table
    /// larger than one GPU buffer (SD 1.5's token embedding is 145 MiB in f32, past WebGPU's
    /// default binding size of 128 MiB).
    pub fn row_blocks(
        &mut self,
        key: &str,
        [n, d]: [usize; 2],
        rows: usize,
    ) -> Result<Vec<Tensor<2>>> {
        let t = self.host(key, &[n, d])?;
        Ok(t.values
            .chunks(rows.max(1) * d.max(1))
            .map(|block| self.upload(block.to_vec(), [block.len() / d.max(1), d]))
            .collect())
    }

    /// Loads a PyTorch linear weight stored `[out, in]`, transposed to the `[in, out]` layout
    /// burn's `linear` multiplies with.
    pub fn linear_weight(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Tensor<2>> {
        let t = self.host(key, &[d_out, d_in])?;
        let mut transposed = vec![0f32; t.values.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                transposed[i * d_out + o] = t.values[o * d_in + i];
            }
        }
        Ok(self.upload(transposed, [d_in, d_out]))
    }

    /// Checks that every tensor in the file was used, except keys matching `ignored`
    /// (buffers such as CLIP's `position_ids` that carry no weights).
    pub fn finish(self, ignored: &[&str]) -> Result<()> {
        let unused: Vec<String> = self
            .reader
            .keys()
            .into_iter()
            .filter(|k| !self.taken.contains(k) && !ignored.iter().any(|i| k.ends_with(i)))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
        let more = unused.len().saturating_sub(shown.len());
        let keys = if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        };
        Err(self.error(WeightProblem::Unexpected { keys }))
    }
}
