//! Weight loading errors on real (tiny) diffusers files: each names the file and the key.

mod common;

use burn::tensor::DType;
use dragonedit::model::folder::{MemorySource, ModelSource, layout};
use dragonedit::weights::safetensors::{self, StoredDtype};
use dragonedit::{Error, StableDiffusion};

/// All files of the tiny model, in memory.
fn tiny_files() -> Vec<(String, Vec<u8>)> {
    let root = common::tiny_model_dir();
    let mut files = Vec::new();
    for path in [
        layout::UNET_CONFIG,
        layout::VAE_CONFIG,
        layout::TEXT_CONFIG,
        layout::SCHEDULER_CONFIG,
        layout::VOCAB,
        layout::MERGES,
        layout::UNET_WEIGHTS[0],
        layout::VAE_WEIGHTS[0],
        layout::TEXT_WEIGHTS[0],
    ] {
        files.push((
            path.to_string(),
            std::fs::read(root.join(path)).expect("fixture"),
        ));
    }
    files
}

fn source(files: Vec<(String, Vec<u8>)>) -> MemorySource {
    let mut s = MemorySource::default();
    for (p, b) in files {
        s.insert(p, b);
    }
    s
}

fn load(mut s: MemorySource) -> Result<StableDiffusion, Error> {
    StableDiffusion::load(&mut s, &dragonedit::device::cpu(), DType::F32, &mut |_| {
        true
    })
}

/// Rewrites a safetensors file, letting `edit` rename or drop entries and appending `extra`.
fn rewrite(
    bytes: &[u8],
    edit: impl Fn(&str) -> Option<String>,
    extra: &[(&str, StoredDtype, Vec<usize>, Vec<u8>)],
) -> Vec<u8> {
    let n = safetensors::header_len(bytes, bytes.len() as u64).expect("header") as usize;
    let header = safetensors::parse_header(&bytes[8..8 + n], bytes.len() as u64).expect("parse");
    let owned: Vec<(String, StoredDtype, Vec<usize>, Vec<u8>)> = header
        .tensors
        .iter()
        .filter_map(|(k, e)| {
            edit(k).map(|name| {
                let data = bytes[e.offset as usize..(e.offset + e.len) as usize].to_vec();
                (name, e.dtype, e.shape.clone(), data)
            })
        })
        .collect();
    let mut all: Vec<(&str, StoredDtype, Vec<usize>, Vec<u8>)> = owned
        .iter()
        .map(|(k, d, s, b)| (k.as_str(), *d, s.clone(), b.clone()))
        .collect();
    all.extend(extra.iter().cloned());
    safetensors::serialize(&all)
}

fn with_file(path: &str, f: impl Fn(Vec<u8>) -> Vec<u8>) -> MemorySource {
    source(
        tiny_files()
            .into_iter()
            .map(|(p, b)| if p == path { (p, f(b)) } else { (p, b) })
            .collect(),
    )
}

fn message(r: Result<StableDiffusion, Error>) -> String {
    match r {
        Ok(_) => panic!("loading should have failed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_tiny_model_loads_from_memory() {
    assert!(load(source(tiny_files())).is_ok());
}

#[test]
fn truncated_weights_name_the_file_and_tensor() {
    let unet = layout::UNET_WEIGHTS[0];
    let msg = message(load(with_file(unet, |b| b[..b.len() - 100].to_vec())));
    assert!(msg.contains(unet) && msg.contains("truncated"), "{msg}");
    let msg = message(load(with_file(unet, |b| b[..4].to_vec())));
    assert!(msg.contains(unet) && msg.contains("too short"), "{msg}");
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let vae = layout::VAE_WEIGHTS[0];
    let key = "decoder.conv_in.weight";
    let msg = message(load(with_file(vae, |b| {
        rewrite(&b, |k| (k != key).then(|| k.to_string()), &[])
    })));
    assert!(
        msg.contains(vae) && msg.contains(key) && msg.contains("missing"),
        "{msg}"
    );

    let stray = [(
        "decoder.extra_head.weight",
        StoredDtype::F32,
        vec![1],
        vec![0; 4],
    )];
    let msg = message(load(with_file(vae, |b| {
        rewrite(&b, |k| Some(k.to_string()), &stray)
    })));
    assert!(
        msg.contains("decoder.extra_head.weight") && msg.contains("unexpected"),
        "{msg}"
    );
}

#[test]
fn legacy_vae_attention_names_load() {
    let vae = layout::VAE_WEIGHTS[0];
    let s = with_file(vae, |b| {
        rewrite(
            &b,
            |k| Some(dragonedit::model::vae::legacy_vae_key(k).unwrap_or_else(|| k.to_string())),
            &[],
        )
    });
    assert!(load(s).is_ok());
}

#[test]
fn a_config_that_disagrees_with_the_weights_gives_the_shape() {
    let s = with_file(layout::TEXT_CONFIG, |b| {
        String::from_utf8(b)
            .expect("utf8")
            .replace("\"intermediate_size\": 64", "\"intermediate_size\": 48")
            .into_bytes()
    });
    let msg = message(load(s));
    assert!(
        msg.contains("fc1.weight") && msg.contains("[48, 32]"),
        "{msg}"
    );
}

#[test]
fn a_missing_weight_file_is_named() {
    let mut files = tiny_files();
    files.retain(|(p, _)| p != layout::UNET_WEIGHTS[0]);
    let msg = message(load(source(files)));
    assert!(
        msg.contains("unet/diffusion_pytorch_model") && msg.contains("not found"),
        "{msg}"
    );
    let s = source(tiny_files());
    assert!(s.has(layout::VOCAB));
}

/// Records the largest single read, to show weights stream one tensor at a time.
struct CountingSource {
    bytes: Vec<u8>,
    largest_read: std::rc::Rc<std::cell::Cell<usize>>,
}

impl dragonedit::weights::ByteSource for CountingSource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = offset as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        self.largest_read
            .set(self.largest_read.get().max(buf.len()));
        Ok(())
    }
}

#[test]
fn the_unet_streams_one_tensor_at_a_time() {
    use dragonedit::model::config::UnetConfig;
    use dragonedit::model::unet::Unet;
    use dragonedit::weights::{Loader, SafetensorsReader};

    let root = common::tiny_model_dir();
    let bytes = std::fs::read(root.join(layout::UNET_WEIGHTS[0])).expect("fixture");
    let file_len = bytes.len();
    let largest_read = std::rc::Rc::new(std::cell::Cell::new(0));
    let source = CountingSource {
        bytes,
        largest_read: largest_read.clone(),
    };
    let mut reader = SafetensorsReader::open("unet", source).expect("header");
    let largest_tensor = reader
        .header()
        .tensors
        .values()
        .map(|t| t.len as usize)
        .max()
        .expect("tensors");
    let config = UnetConfig::parse(
        "unet/config.json",
        &std::fs::read_to_string(root.join(layout::UNET_CONFIG)).expect("config"),
    )
    .expect("config parses");
    let device = dragonedit::device::cpu();
    let mut w = Loader::new(&mut reader, &device, DType::F32);
    Unet::load(&config, &mut w).expect("loads");
    w.finish(&[]).expect("every tensor used");
    // No read is larger than the largest tensor (or the header), far below the whole file.
    assert!(largest_read.get() <= largest_tensor.max(200_000));
    assert!(largest_read.get() * 10 < file_len);
}
