//! The safetensors container: an 8-byte little-endian header length, a JSON header mapping each
//! tensor name to its dtype, shape and byte range, then the raw little-endian tensor bytes.
//!
//! Only the header is parsed up front; tensor bytes are read one tensor at a time by the caller,
//! so a 1.7 GB UNet never has to sit whole in memory (wasm32 has 4 GiB at most).

use std::collections::BTreeMap;

use crate::error::WeightProblem;

/// Headers above this are refused: real SD 1.5 headers are about 100 KB, and the
/// reference implementation uses the same bound.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types that can appear in a safetensors file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StoredDtype {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "F64" => Self::F64,
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I16" => Self::I16,
            "I8" => Self::I8,
            "U8" => Self::U8,
            "BOOL" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The name used in the file.
    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "F64",
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I16 => "I16",
            Self::I8 => "I8",
            Self::U8 => "U8",
            Self::Bool => "BOOL",
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl TensorEntry {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed header: every tensor's location, plus where the data section starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Absolute offset of the data section (8 + header length).
    pub data_start: u64,
    /// Bytes the data section needs (the largest end offset).
    pub data_len: u64,
}

/// Reads the header length from the first 8 bytes, checking it against the file size.
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<u64, WeightProblem> {
    let Some(bytes) = prefix.get(..8) else {
        return Err(WeightProblem::TooShort { len: file_len });
    };
    let mut le = [0u8; 8];
    le.copy_from_slice(bytes);
    let n = u64::from_le_bytes(le);
    if n > MAX_HEADER_BYTES {
        return Err(WeightProblem::HeaderTooLarge(n));
    }
    if n.saturating_add(8) > file_len {
        return Err(WeightProblem::HeaderTooLong {
            header_len: n,
            file_len,
        });
    }
    Ok(n)
}

/// Parses the JSON header (the bytes after the 8-byte length) and validates every entry:
/// known dtype, byte length equal to the shape's size, ranges inside the file and not
/// overlapping. `file_len` is the whole file's size in bytes.
pub fn parse_header(json: &[u8], file_len: u64) -> Result<Header, WeightProblem> {
    let malformed = |m: String| WeightProblem::MalformedHeader(m);
    let data_start = 8 + json.len() as u64;
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| malformed(format!("not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(malformed("the header is not a JSON object".into()));
    };
    let available = file_len.saturating_sub(data_start);
    let mut tensors = BTreeMap::new();
    for (key, entry) in map {
        if key == "__metadata__" {
            continue;
        }
        let parsed = parse_entry(&key, &entry, data_start)?;
        let end = parsed.offset - data_start + parsed.len;
        if end > available {
            return Err(WeightProblem::Truncated {
                key,
                end,
                available,
            });
        }
        tensors.insert(key, parsed);
    }
    let mut ranges: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(k, t)| (t.offset, t.offset + t.len, k.as_str()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(malformed(format!(
                "tensors `{}` and `{}` overlap",
                pair[0].2, pair[1].2
            )));
        }
    }
    let data_len = ranges.last().map_or(0, |r| r.1 - data_start);
    Ok(Header {
        tensors,
        data_start,
        data_len,
    })
}

fn parse_entry(
    key: &str,
    entry: &serde_json::Value,
    data_start: u64,
) -> Result<TensorEntry, WeightProblem> {
    let malformed = |m: &str| WeightProblem::MalformedHeader(format!("tensor `{key}`: {m}"));
    let obj = entry
        .as_object()
        .ok_or_else(|| malformed("entry is not an object"))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| malformed("missing dtype"))?;
    let dtype = StoredDtype::parse(dtype_name).ok_or_else(|| WeightProblem::UnsupportedDtype {
        key: key.to_string(),
        dtype: dtype_name.to_string(),
    })?;
    let shape = obj
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| malformed("missing shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| malformed("shape is not a list of non-negative integers"))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .ok_or_else(|| malformed("data_offsets is not a pair"))?;
    let (Some(begin), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
        return Err(malformed("data_offsets are not non-negative integers"));
    };
    if end < begin {
        return Err(malformed("data_offsets end before they begin"));
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| malformed("shape is too large"))?;
    if end - begin != expected {
        return Err(malformed(&format!(
            "{} bytes for shape {shape:?} of {}, expected {expected}",
            end - begin,
            dtype.name()
        )));
    }
    let offset = data_start
        .checked_add(begin)
        .ok_or_else(|| malformed("offset overflows"))?;
    Ok(TensorEntry {
        dtype,
        shape,
        offset,
        len: end - begin,
    })
}

/// Builds a safetensors file in memory (used by tests and by tools that write small models).
pub fn serialize(tensors: &[(&str, StoredDtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape, bytes) in tensors {
        let end = offset + bytes.len() as u64;
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn parse_all(file: &[u8]) -> Result<Header, WeightProblem> {
        let n = header_len(file, file.len() as u64)?;
        parse_header(&file[8..8 + n as usize], file.len() as u64)
    }

    #[test]
    fn round_trips_offsets_and_shapes() {
        let file = serialize(&[
            (
                "a",
                StoredDtype::F32,
                vec![2, 2],
                f32_bytes(&[1., 2., 3., 4.]),
            ),
            ("b", StoredDtype::F16, vec![3], vec![0; 6]),
        ]);
        let h = parse_all(&file).unwrap();
        assert_eq!(h.tensors["a"].shape, vec![2, 2]);
        assert_eq!(h.tensors["a"].offset, h.data_start);
        assert_eq!(h.tensors["b"].offset, h.data_start + 16);
        assert_eq!(h.tensors["b"].len, 6);
        assert_eq!(h.data_len, 22);
    }

    #[test]
    fn truncated_file_names_the_tensor() {
        let file = serialize(&[("w", StoredDtype::F32, vec![4], f32_bytes(&[0.; 4]))]);
        let cut = &file[..file.len() - 3];
        assert_eq!(
            parse_all(cut),
            Err(WeightProblem::Truncated {
                key: "w".into(),
                end: 16,
                available: 13
            })
        );
    }

    #[test]
    fn rejects_short_and_oversized_headers() {
        assert!(matches!(
            header_len(&[1, 2, 3], 3),
            Err(WeightProblem::TooShort { .. })
        ));
        let huge = (MAX_HEADER_BYTES + 1).to_le_bytes();
        assert!(matches!(
            header_len(&huge, 1 << 40),
            Err(WeightProblem::HeaderTooLarge(_))
        ));
        let long = 100u64.to_le_bytes();
        assert!(matches!(
            header_len(&long, 50),
            Err(WeightProblem::HeaderTooLong { .. })
        ));
    }

    #[test]
    fn rejects_inconsistent_entries() {
        let bad_len = br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(matches!(
            parse_header(bad_len, 1000),
            Err(WeightProblem::MalformedHeader(_))
        ));
        let overlap = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(matches!(
            parse_header(overlap, 1000),
            Err(WeightProblem::MalformedHeader(m)) if m.contains("overlap")
        ));
        let dtype = br#"{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#;
        assert!(matches!(
            parse_header(dtype, 1000),
            Err(WeightProblem::UnsupportedDtype { .. })
        ));
        assert!(matches!(
            parse_header(b"[1,2]", 1000),
            Err(WeightProblem::MalformedHeader(_))
        ));
        let overflow =
            br#"{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        assert!(matches!(
            parse_header(overflow, 1000),
            Err(WeightProblem::MalformedHeader(_))
        ));
    }

    #[test]
    fn metadata_is_ignored() {
        let json = br#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[],"data_offsets":[0,2]}}"#;
        let h = parse_header(json, 8 + json.len() as u64 + 2).unwrap();
        assert_eq!(h.tensors.len(), 1);
        assert_eq!(h.tensors["w"].num_elements(), 1);
    }
}
