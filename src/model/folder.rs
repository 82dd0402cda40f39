//! Where the files of a diffusers model folder come from: a directory on disk natively, or
//! buffers handed over by the browser shell. Only this module knows the folder layout.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::weights::{SafetensorsReader, TensorRead};

/// Paths inside a diffusers SD 1.5 folder.
pub mod layout {
    pub const UNET_CONFIG: &str = "unet/config.json";
    pub const VAE_CONFIG: &str = "vae/config.json";
    pub const TEXT_CONFIG: &str = "text_encoder/config.json";
    pub const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
    pub const VOCAB: &str = "tokenizer/vocab.json";
    pub const MERGES: &str = "tokenizer/merges.txt";
    /// Weight files in order of preference (full precision first, then the fp16 variant).
    pub const UNET_WEIGHTS: &[&str] = &[
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ];
    pub const VAE_WEIGHTS: &[&str] = &[
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ];
    pub const TEXT_WEIGHTS: &[&str] = &[
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
    ];
}

/// A model folder: small text files are read whole, weight files tensor by tensor.
pub trait ModelSource {
    /// True when the folder has `path`.
    fn has(&self, path: &str) -> bool;
    /// The whole contents of a small text file.
    fn read_text(&mut self, path: &str) -> Result<String>;
    /// A reader over a weight file.
    fn open_weights(&mut self, path: &str) -> Result<Box<dyn TensorRead>>;

    /// Opens the first weight file of `candidates` that exists.
    fn open_first(&mut self, candidates: &[&str]) -> Result<Box<dyn TensorRead>> {
        match candidates.iter().find(|p| self.has(p)) {
            Some(path) => self.open_weights(path),
            None => Err(Error::ModelFile {
                file: candidates.join(" or "),
                message: "not found in the model folder".into(),
            }),
        }
    }
}

/// A diffusers folder on disk.
#[cfg(not(target_family = "wasm"))]
pub struct DirSource {
    root: std::path::PathBuf,
}

#[cfg(not(target_family = "wasm"))]
impl DirSource {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(Error::ModelFile {
                file: root.display().to_string(),
                message: "is not a directory (expected a diffusers model folder with unet/, vae/, text_encoder/, tokenizer/)".into(),
            });
        }
        Ok(Self { root })
    }
}

#[cfg(not(target_family = "wasm"))]
impl ModelSource for DirSource {
    fn has(&self, path: &str) -> bool {
        self.root.join(path).is_file()
    }

    fn read_text(&mut self, path: &str) -> Result<String> {
        let full = self.root.join(path);
        std::fs::read_to_string(&full).map_err(|source| Error::Io { path: full, source })
    }

    fn open_weights(&mut self, path: &str) -> Result<Box<dyn TensorRead>> {
        let full = self.root.join(path);
        let file = crate::weights::FileSource::open(&full).map_err(|source| Error::Io {
            path: full.clone(),
            source,
        })?;
        Ok(Box::new(SafetensorsReader::open(path, file)?))
    }
}

/// Files held in memory, keyed by their path in the folder (tests, and the browser shell for
/// small files).
#[derive(Default)]
pub struct MemorySource {
    files: HashMap<String, Vec<u8>>,
}

impl MemorySource {
    pub fn insert(&mut self, path: impl Into<String>, bytes: Vec<u8>) {
        self.files.insert(path.into(), bytes);
    }
}

impl ModelSource for MemorySource {
    fn has(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    fn read_text(&mut self, path: &str) -> Result<String> {
        let bytes = self.files.get(path).ok_or_else(|| Error::ModelFile {
            file: path.into(),
            message: "not found in the model folder".into(),
        })?;
        String::from_utf8(bytes.clone()).map_err(|_| Error::ModelFile {
            file: path.into(),
            message: "is not UTF-8 text".into(),
        })
    }

    fn open_weights(&mut self, path: &str) -> Result<Box<dyn TensorRead>> {
        let bytes = self.files.remove(path).ok_or_else(|| Error::ModelFile {
            file: path.into(),
            message: "not found in the model folder".into(),
        })?;
        Ok(Box::new(SafetensorsReader::open(path, bytes)?))
    }
}
