//! Shared helpers of the integration tests: fixture paths, .npy/.npz reading, devices, and the
//! relative-error comparison every parity test uses.

#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;

use burn::tensor::{DType, Device, Tensor, TensorData};
use dragonedit::StableDiffusion;
use dragonedit::edit::{Edit, EditSpec};
use dragonedit::model::folder::DirSource;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_model_dir() -> PathBuf {
    fixtures().join("tiny-sd")
}

/// A little-endian f32 array from a .npy file.
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl Array {
    fn from_npy(bytes: &[u8]) -> Array {
        let npy = npyz::NpyFile::new(bytes).expect("valid .npy");
        let shape = npy.shape().iter().map(|&d| d as usize).collect();
        let values = npy.into_vec::<f32>().expect("f32 .npy");
        Array { shape, values }
    }

    /// Entry `i` of the first axis.
    pub fn index(&self, i: usize) -> Array {
        let inner: usize = self.shape[1..].iter().product();
        Array {
            shape: self.shape[1..].to_vec(),
            values: self.values[i * inner..(i + 1) * inner].to_vec(),
        }
    }

    pub fn tensor<const D: usize>(&self, device: &Device) -> Tensor<D> {
        let shape: [usize; D] = self.shape.clone().try_into().expect("rank matches");
        Tensor::from_data(TensorData::new(self.values.clone(), shape), device)
    }
}

pub fn npy(case: &str, name: &str) -> Array {
    let bytes = std::fs::read(fixtures().join(case).join(name)).expect("fixture exists");
    Array::from_npy(&bytes)
}

pub fn npz(case: &str, file: &str, member: &str) -> Array {
    let f = std::fs::File::open(fixtures().join(case).join(file)).expect("fixture exists");
    let mut zip = zip::ZipArchive::new(f).expect("valid .npz");
    let mut entry = zip
        .by_name(&format!("{member}.npy"))
        .expect("member exists");
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).expect("readable member");
    Array::from_npy(&bytes)
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
}

/// Relative error of `actual` against `expected`: the largest absolute difference divided by
/// the largest magnitude in `expected`. Asserts it is below `tol` and returns it.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], tol: f32) -> f32 {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    assert!(
        actual.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = actual
        .iter()
        .zip(expected)
        .fold(0f32, |m, (a, e)| m.max((a - e).abs()));
    let rel = diff / scale;
    println!("{what}: relative error {rel:.2e} (tolerance {tol:.0e})");
    assert!(
        rel < tol,
        "{what}: relative error {rel:.3e} (max abs diff {diff:.3e}, scale {scale:.3e}) exceeds {tol:.0e}"
    );
    rel
}

pub fn load_tiny(device: &Device) -> StableDiffusion {
    load_tiny_as(device, DType::F32)
}

/// The tiny model computing in `dtype` (F16 is the `--f16` path).
pub fn load_tiny_as(device: &Device, dtype: DType) -> StableDiffusion {
    let mut source = DirSource::new(tiny_model_dir()).expect("tiny model folder");
    StableDiffusion::load(&mut source, device, dtype, &mut |_| true).expect("tiny model loads")
}

/// The wgpu device for parity tests, or `None` (with the reason printed) when this machine has
/// no Vulkan adapter ([`dragonedit::device::test_gpu`]).
pub fn wgpu_device() -> Option<Device> {
    dragonedit::device::test_gpu()
}

/// The move fixture's photo and mask as a 256 px move edit: a 32x32 latent, so 1024-token
/// self-attention in `down_blocks.0`.
pub fn move_edit_256() -> Edit {
    let spec = EditSpec::from_json(
        r#"{"mode": "move", "mask": "mask.png", "from": [40, 64], "to": [72, 72],
            "resolution": 256}"#,
    )
    .expect("spec");
    let read = |name: &str| std::fs::read(fixtures().join("move").join(name));
    let photo = dragonedit::image::decode(&read("image.png").expect("photo")).expect("decodes");
    spec.resolve(photo, None, &mut |name| Ok(read(name).expect("mask")))
        .expect("resolves")
}
