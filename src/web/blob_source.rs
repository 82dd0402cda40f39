//! Model files held by the browser as Blobs (the IndexedDB cache hands out Blobs built from its
//! chunks). Weight files are read slice by slice with `FileReaderSync`, which only exists in
//! workers: the engine runs in one, and a 1.7 GB UNet is never copied into wasm memory whole.

use std::collections::HashMap;
use std::io;

use wasm_bindgen::JsCast;
use web_sys::{Blob, FileReaderSync};

use crate::error::{Error, Result};
use crate::model::folder::ModelSource;
use crate::weights::{ByteSource, SafetensorsReader, TensorRead};

/// One Blob read at arbitrary offsets.
pub struct BlobSource {
    blob: Blob,
    reader: FileReaderSync,
}

impl BlobSource {
    pub fn new(blob: Blob) -> Result<Self> {
        let reader = FileReaderSync::new().map_err(|e| {
            Error::Device(format!(
                "FileReaderSync is unavailable ({e:?}); the engine must run in a Web Worker"
            ))
        })?;
        Ok(Self { blob, reader })
    }
}

fn js_io(e: wasm_bindgen::JsValue) -> io::Error {
    io::Error::other(format!("{e:?}"))
}

impl ByteSource for BlobSource {
    fn len(&self) -> u64 {
        self.blob.size() as u64
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let slice = self
            .blob
            .slice_with_f64_and_f64(offset as f64, end as f64)
            .map_err(js_io)?;
        let bytes = self.reader.read_as_array_buffer(&slice).map_err(js_io)?;
        let view = js_sys::Uint8Array::new(&bytes);
        if view.length() as usize != buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        view.copy_to(buf);
        Ok(())
    }
}

/// A model folder whose files are Blobs keyed by their path in the folder.
pub struct BlobFolder {
    files: HashMap<String, Blob>,
}

impl BlobFolder {
    /// From a JS `Map` of path → Blob.
    pub fn from_map(map: &js_sys::Map) -> Result<Self> {
        let mut files = HashMap::new();
        let mut bad = None;
        map.for_each(
            &mut |value, key| match (key.as_string(), value.dyn_into::<Blob>()) {
                (Some(path), Ok(blob)) => {
                    files.insert(path, blob);
                }
                (key, _) => bad = Some(key.unwrap_or_default()),
            },
        );
        if let Some(key) = bad {
            return Err(Error::InvalidInput(format!(
                "model file {key:?} is not a Blob keyed by its path"
            )));
        }
        Ok(Self { files })
    }

    fn blob(&self, path: &str) -> Result<Blob> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| Error::ModelFile {
                file: path.into(),
                message: "is not in the browser's model cache; download the model again".into(),
            })
    }
}

impl ModelSource for BlobFolder {
    fn has(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    fn read_text(&mut self, path: &str) -> Result<String> {
        let mut source = BlobSource::new(self.blob(path)?)?;
        let mut bytes = vec![0u8; source.len() as usize];
        source
            .read_exact_at(0, &mut bytes)
            .map_err(|e| Error::ModelFile {
                file: path.into(),
                message: format!("cannot be read from the cache: {e}"),
            })?;
        String::from_utf8(bytes).map_err(|_| Error::ModelFile {
            file: path.into(),
            message: "is not UTF-8 text".into(),
        })
    }

    fn open_weights(&mut self, path: &str) -> Result<Box<dyn TensorRead>> {
        let source = BlobSource::new(self.blob(path)?)?;
        Ok(Box::new(SafetensorsReader::open(path, source)?))
    }
}
