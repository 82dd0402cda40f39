//! Incremental SHA-256 for verifying downloads as they stream in: WebCrypto's `digest` only
//! takes a whole buffer, and a 1.7 GB UNet does not fit in one (WEIGHTS.md).

use sha2::{Digest, Sha256};
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
#[derive(Default)]
pub struct Sha256Stream {
    hasher: Sha256,
}

#[wasm_bindgen]
impl Sha256Stream {
    #[wasm_bindgen(constructor)]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    /// The lowercase hex digest; the stream starts over afterwards.
    pub fn finish(&mut self) -> String {
        let digest = std::mem::take(&mut self.hasher).finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}
