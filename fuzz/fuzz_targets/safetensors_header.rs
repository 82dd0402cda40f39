//! Fuzzes the safetensors header parser: any bytes must give a header or an error, never a
//! panic, and an accepted header must describe ranges inside the file that do not overlap.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../src/weights/safetensors.rs"]
mod safetensors;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file_len = data.len() as u64;
    let Ok(n) = safetensors::header_len(data, file_len) else {
        return;
    };
    let json = &data[8..8 + n as usize];
    if let Ok(header) = safetensors::parse_header(json, file_len) {
        let mut ranges: Vec<(u64, u64)> = header
            .tensors
            .values()
            .map(|t| (t.offset, t.offset + t.len))
            .collect();
        ranges.sort_unstable();
        for r in &ranges {
            assert!(r.0 >= header.data_start && r.1 <= file_len);
        }
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
    }
});
