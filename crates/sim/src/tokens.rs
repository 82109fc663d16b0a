//! Token counts without a tokenizer, and prompts as the KV cache sees them.
//!
//! The approximation (documented in the README as well), applied to UTF-8 text:
//! - a run of ASCII letters or digits is one token per 5 bytes, rounded up, and takes the
//!   single space before it with it (" hello" is one token, as in BPE vocabularies);
//! - every other ASCII byte that is not a space (punctuation, newline, tab) is one token;
//!   runs of spaces beyond the one a word takes are one token per 4;
//! - non-ASCII text is one token per 3 bytes of its UTF-8 encoding.
//!
//! English prose comes out near 1.3 tokens per word, close to Llama 3's tokenizer; code and
//! punctuation-heavy text a little higher. The ids are a hash of each piece, so the same
//! text always gives the same ids, and a shared prefix of text gives a shared prefix of ids,
//! which is all prefix caching needs. A client that sends token ids (the completions API
//! accepts `"prompt": [1, 2, 3]`) gets exact counts.

use xxhash_rust::xxh64::xxh64;

/// Appends the approximate token ids of `text` to `out`.
pub fn tokenize_into(text: &str, out: &mut Vec<u32>) {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphanumeric()
            || (c == b' ' && b.get(i + 1).is_some_and(|n| n.is_ascii_alphanumeric()))
        {
            let start = i;
            if c == b' ' {
                i += 1;
            }
            let word = i;
            while i < b.len() && b[i].is_ascii_alphanumeric() {
                i += 1;
            }
            // The leading space rides with the first piece.
            let first = (word + 5).min(i);
            out.push(piece_id(&b[start..first]));
            for piece in b[first..i].chunks(5) {
                out.push(piece_id(piece));
            }
        } else if c == b' ' {
            let start = i;
            while i < b.len()
                && b[i] == b' '
                && !b.get(i + 1).is_some_and(|n| n.is_ascii_alphanumeric())
            {
                i += 1;
            }
            for piece in b[start..i].chunks(4) {
                out.push(piece_id(piece));
            }
        } else if c.is_ascii() {
            out.push(piece_id(&b[i..i + 1]));
            i += 1;
        } else {
            let start = i;
            while i < b.len() && !b[i].is_ascii() {
                i += 1;
            }
            for piece in b[start..i].chunks(3) {
                out.push(piece_id(piece));
            }
        }
    }
}

/// The approximate token ids of `text`.
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut v = Vec::with_capacity(text.len() / 4 + 1);
    tokenize_into(text, &mut v);
    v
}

fn piece_id(piece: &[u8]) -> u32 {
    xxh64(piece, 0x1f6e_9a11) as u32
}

/// A prompt as the engine needs it: its length and the chained hashes of its full blocks.
///
/// Block `i`'s hash covers the ids of blocks `0..=i` (each hash mixes the previous one), as
/// vLLM's prefix caching does, so equal hashes mean equal prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    pub len: u32,
    pub block_hashes: Vec<u64>,
}

impl Prompt {
    /// Hashes `ids` in blocks of `block_size`.
    pub fn from_ids(ids: &[u32], block_size: u32) -> Prompt {
        let bs = block_size.max(1) as usize;
        let mut prev = 0u64;
        let mut buf = Vec::with_capacity(bs * 4);
        let block_hashes = ids
            .chunks_exact(bs)
            .map(|block| {
                buf.clear();
                for id in block {
                    buf.extend_from_slice(&id.to_le_bytes());
                }
                prev = xxh64(&buf, prev);
                prev
            })
            .collect();
        Prompt {
            len: ids.len() as u32,
            block_hashes,
        }
    }

    /// A synthetic prompt of `len` tokens whose first `shared` tokens are the same for every
    /// prompt built with the same `group`, and the rest unique to `unique`. Workloads use this
    /// to make shared-prefix traffic without generating text.
    pub fn synthetic(len: u32, shared: u32, group: u64, unique: u64, block_size: u32) -> Prompt {
        let bs = block_size.max(1);
        let full = len / bs;
        let shared_blocks = shared.min(len) / bs;
        let mut prev = 0u64;
        let block_hashes = (0..full)
            .map(|i| {
                let salt = if i < shared_blocks {
                    group
                } else {
                    unique ^ 0x9e37_79b9_7f4a_7c15
                };
                prev = xxh64(
                    &[salt.to_le_bytes(), (i as u64).to_le_bytes()].concat(),
                    prev,
                );
                prev
            })
            .collect();
        Prompt { len, block_hashes }
    }
}

/// Filler words for generated text; each is one token under [`tokenize`].
pub const WORDS: [&str; 16] = [
    " the", " model", " said", " that", " a", " token", " is", " here", " and", " then", " it",
    " was", " one", " more", " of", " them",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_punctuation() {
        assert_eq!(tokenize("hello world").len(), 2);
        assert_eq!(tokenize("Hello, world!").len(), 4);
        assert_eq!(tokenize("internationalization").len(), 4);
        assert_eq!(tokenize("").len(), 0);
        assert_eq!(tokenize("héllo").len(), 3);
        for w in WORDS {
            assert_eq!(tokenize(w).len(), 1, "{w:?}");
        }
    }

    #[test]
    fn prose_is_near_one_and_a_third_tokens_per_word() {
        let text = "The quick brown fox jumps over the lazy dog, and then it runs away into \
                    the forest where nobody can find it again. Routing matters for latency.";
        let words = text.split_whitespace().count() as f64;
        let ratio = tokenize(text).len() as f64 / words;
        assert!((1.0..1.6).contains(&ratio), "{ratio}");
    }

    #[test]
    fn shared_text_prefix_gives_shared_block_hashes() {
        let sys = "You are a helpful assistant. ".repeat(20);
        let a = tokenize(&(sys.clone() + &"What is the capital of France? ".repeat(8)));
        let b = tokenize(&(sys + &"Write a poem about the sea, please. ".repeat(8)));
        let (pa, pb) = (Prompt::from_ids(&a, 16), Prompt::from_ids(&b, 16));
        let common = pa
            .block_hashes
            .iter()
            .zip(&pb.block_hashes)
            .take_while(|(x, y)| x == y)
            .count();
        assert!(common >= 6, "{common}");
        assert_ne!(pa.block_hashes.last(), pb.block_hashes.last());
    }

    #[test]
    fn synthetic_prompts_share_exactly_the_group_prefix() {
        let a = Prompt::synthetic(1000, 600, 7, 1, 16);
        let b = Prompt::synthetic(1000, 600, 7, 2, 16);
        let c = Prompt::synthetic(1000, 600, 8, 1, 16);
        assert_eq!(a.block_hashes.len(), 62);
        let common = a
            .block_hashes
            .iter()
            .zip(&b.block_hashes)
            .take_while(|(x, y)| x == y)
            .count();
        assert_eq!(common, 37);
        assert_ne!(a.block_hashes[0], c.block_hashes[0]);
    }
}
