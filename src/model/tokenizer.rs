//! The CLIP byte-level BPE tokenizer, reading `tokenizer/vocab.json` and `merges.txt` from the
//! model folder. Prompts become 77 ids: start token, at most 75 BPE tokens, end token, then
//! the end token again as padding (SD 1.5's `pad_token`).

use std::collections::HashMap;

use regex::Regex;

use crate::error::{Error, Result};

/// Ids per prompt, start and end tokens included (CLIP's context length).
pub const CONTEXT_LENGTH: usize = 77;
const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";
/// CLIP uses the first 48894 merges of the file (49152 - 256 - 2), as `CLIPTokenizer` does.
const MERGES_USED: usize = 49152 - 256 - 2;

/// A loaded tokenizer.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_to_char: [char; 256],
    pattern: Regex,
    start_id: u32,
    end_id: u32,
}

/// GPT-2's reversible byte → printable character table.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    table
}

impl ClipTokenizer {
    /// Builds the tokenizer from the contents of `vocab.json` and `merges.txt`.
    pub fn from_files(vocab_json: &str, merges_txt: &str) -> Result<Self> {
        let err = |file: &str, message: String| Error::ModelFile {
            file: format!("tokenizer/{file}"),
            message,
        };
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab_json)
            .map_err(|e| err("vocab.json", format!("not a token → id map: {e}")))?;
        let mut ranks = HashMap::new();
        for (rank, line) in merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version"))
            .take(MERGES_USED)
            .enumerate()
        {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => {
                    ranks.insert((a.to_string(), b.to_string()), rank);
                }
                _ => {
                    return Err(err(
                        "merges.txt",
                        format!("line {} is not a pair: {line:?}", rank + 2),
                    ));
                }
            }
        }
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| err("vocab.json", format!("has no {token}")))
        };
        let start_id = id(START)?;
        let end_id = id(END)?;
        let pattern = Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| err("pattern", e.to_string()))?;
        Ok(Self {
            vocab,
            ranks,
            byte_to_char: bytes_to_unicode(),
            pattern,
            start_id,
            end_id,
        })
    }

    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    /// Applies the merges to one pre-token, already mapped to byte characters.
    fn bpe(&self, word: &str) -> Vec<String> {
        let chars: Vec<char> = word.chars().collect();
        let Some((&last, init)) = chars.split_last() else {
            return Vec::new();
        };
        let mut parts: Vec<String> = init.iter().map(|c| c.to_string()).collect();
        parts.push(format!("{last}</w>"));
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, at)) = best else { break };
            let (a, b) = (parts[at].clone(), parts[at + 1].clone());
            let mut merged = Vec::with_capacity(parts.len());
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len() && parts[i] == a && parts[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(parts[i].clone());
                    i += 1;
                }
            }
            parts = merged;
        }
        parts
    }

    /// BPE token ids of `text`, without start/end tokens. Text is lower-cased and its runs of
    /// whitespace collapsed, as CLIP's `whitespace_clean` does (ftfy repairs are not applied).
    pub fn tokens(&self, text: &str) -> Vec<u32> {
        let cleaned = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&cleaned) {
            let piece = m.as_str();
            if piece == START || piece == END {
                ids.push(if piece == START {
                    self.start_id
                } else {
                    self.end_id
                });
                continue;
            }
            let mapped: String = piece
                .bytes()
                .map(|b| self.byte_to_char[b as usize])
                .collect();
            for part in self.bpe(&mapped) {
                // Every byte symbol is in the vocabulary, so unknown parts cannot occur with a
                // consistent vocab/merges pair; skip rather than invent an id if they do.
                if let Some(&id) = self.vocab.get(&part) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// The 77 ids SD 1.5 feeds the text encoder: start, up to 75 tokens, end, end padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.start_id];
        ids.extend(self.tokens(text).into_iter().take(CONTEXT_LENGTH - 2));
        ids.push(self.end_id);
        ids.resize(CONTEXT_LENGTH, self.end_id);
        ids
    }
}
