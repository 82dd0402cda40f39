//! Reads tensors out of a safetensors file one at a time, converting them to f32 on the host.

use half::{bf16, f16};

use super::safetensors::{self, Header, StoredDtype, TensorEntry};
use super::source::ByteSource;
use crate::error::{Error, Result, WeightProblem};

/// A safetensors file whose header has been parsed; tensor bytes stay in the source until asked for.
pub struct SafetensorsReader<S> {
    label: String,
    source: S,
    header: Header,
}

/// One tensor read from a file, as f32 in row-major order.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl<S: ByteSource> SafetensorsReader<S> {
    /// Parses the header of `source`; `label` names the file in every error.
    pub fn open(label: impl Into<String>, mut source: S) -> Result<Self> {
        let label = label.into();
        let err = |problem| Error::Weights {
            file: label.clone(),
            problem,
        };
        let file_len = source.len();
        let mut prefix = [0u8; 8];
        let prefix_len = usize::try_from(file_len.min(8)).unwrap_or(8);
        source
            .read_exact_at(0, &mut prefix[..prefix_len])
            .map_err(|e| err(WeightProblem::Read(e.to_string())))?;
        let n = safetensors::header_len(&prefix[..prefix_len], file_len).map_err(err)?;
        // header_len() bounds n by MAX_HEADER_BYTES, so it fits in memory.
        let mut json = vec![0u8; n as usize];
        source
            .read_exact_at(8, &mut json)
            .map_err(|e| err(WeightProblem::Read(e.to_string())))?;
        let header = safetensors::parse_header(&json, file_len).map_err(err)?;
        Ok(Self {
            label,
            source,
            header,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn entry(&self, key: &str) -> Option<&TensorEntry> {
        self.header.tensors.get(key)
    }

    fn error(&self, problem: WeightProblem) -> Error {
        Error::Weights {
            file: self.label.clone(),
            problem,
        }
    }

    /// Reads one floating-point tensor and converts it to f32. Non-finite values are refused:
    /// they only appear in corrupt files and would turn every image into NaN.
    pub fn read_f32(&mut self, key: &str) -> Result<HostTensor> {
        let entry = self
            .entry(key)
            .cloned()
            .ok_or_else(|| self.error(WeightProblem::Missing { key: key.into() }))?;
        let len = usize::try_from(entry.len)
            .map_err(|_| self.error(WeightProblem::Read(format!("`{key}` is too large"))))?;
        let mut bytes = vec![0u8; len];
        self.source
            .read_exact_at(entry.offset, &mut bytes)
            .map_err(|e| self.error(WeightProblem::Read(format!("`{key}`: {e}"))))?;
        let values: Vec<f32> = match entry.dtype {
            StoredDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            StoredDtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            StoredDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(self.error(WeightProblem::UnsupportedDtype {
                    key: key.into(),
                    dtype: other.name().into(),
                }));
            }
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(self.error(WeightProblem::NonFinite { key: key.into() }));
        }
        Ok(HostTensor {
            shape: entry.shape,
            values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_half_and_bfloat_to_f32() {
        let h: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        let b: Vec<u8> = [0.25f32, 8.0]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let file = safetensors::serialize(&[
            ("h", StoredDtype::F16, vec![2], h),
            ("b", StoredDtype::BF16, vec![1, 2], b),
            ("i", StoredDtype::I64, vec![1], vec![0; 8]),
        ]);
        let mut r = SafetensorsReader::open("test.safetensors", file).unwrap();
        assert_eq!(r.read_f32("h").unwrap().values, vec![1.5, -2.0]);
        let b = r.read_f32("b").unwrap();
        assert_eq!((b.shape, b.values), (vec![1, 2], vec![0.25, 8.0]));
        let err = r.read_f32("i").unwrap_err().to_string();
        assert!(err.contains("test.safetensors") && err.contains("`i`") && err.contains("I64"));
        let err = r.read_f32("nope").unwrap_err().to_string();
        assert!(err.contains("`nope` is missing"), "{err}");
    }

    #[test]
    fn refuses_nan_weights() {
        let bytes = f32::NAN.to_le_bytes().to_vec();
        let file = safetensors::serialize(&[("w", StoredDtype::F32, vec![1], bytes)]);
        let mut r = SafetensorsReader::open("x", file).unwrap();
        assert!(matches!(
            r.read_f32("w"),
            Err(Error::Weights {
                problem: WeightProblem::NonFinite { .. },
                ..
            })
        ));
    }
}
