//! Mapping a rewritten model name back to the one the client asked for, in a relayed body
//! (DESIGN.md 4.1: the response names the model the client asked for).
//!
//! The same rule as the picker's, [`map_model_back`] in `core`: every JSON `"model"` value
//! equal to the served name is replaced. SSE bodies are mapped line by line
//! as lines complete (a name split across chunks is still found); JSON bodies are held
//! whole up to a bound, then mapped chunk by chunk past it (best effort).

use bytes::Bytes;
use infergate_core::rewrite::map_model_back;

/// JSON bodies held whole for mapping up to this size.
const MAX_HELD: usize = 4 << 20;

pub struct Rename {
    from: String,
    to: String,
    sse: bool,
    held: Vec<u8>,
    overflow: bool,
}

impl Rename {
    /// Maps `"model": "<served>"` back to `"model": "<asked>"`.
    pub fn new(served: &str, asked: &str, sse: bool) -> Rename {
        Rename {
            from: served.to_owned(),
            to: asked.to_owned(),
            sse,
            held: Vec::new(),
            overflow: false,
        }
    }

    /// The bytes ready to send after `chunk`; empty while they are held back.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.sse {
            self.held.extend_from_slice(chunk);
            let cut = self
                .held
                .iter()
                .rposition(|&c| c == b'\n')
                .map_or(0, |p| p + 1);
            let ready: Vec<u8> = self.held.drain(..cut).collect();
            return self.map(&ready);
        }
        if self.overflow {
            return self.map(chunk);
        }
        self.held.extend_from_slice(chunk);
        if self.held.len() <= MAX_HELD {
            return Bytes::new();
        }
        self.overflow = true;
        let all = std::mem::take(&mut self.held);
        self.map(&all)
    }

    /// Whatever is still held, at the end of the body.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.held);
        self.map(&rest)
    }

    fn map(&self, body: &[u8]) -> Bytes {
        if body.is_empty() {
            return Bytes::new();
        }
        Bytes::from(map_model_back(body, &self.from, &self.to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_names_split_across_chunks_are_mapped_when_the_line_completes() {
        let mut r = Rename::new("v2", "public", true);
        let mut out = Vec::new();
        for part in [
            &b"data: {\"model\":\"v"[..],
            b"2\"}\n\ndata: {\"mod",
            b"el\": \"v2\"}\n\n",
        ] {
            out.extend_from_slice(&r.push(part));
        }
        out.extend_from_slice(&r.finish());
        assert_eq!(
            out,
            b"data: {\"model\":\"public\"}\n\ndata: {\"model\": \"public\"}\n\n".to_vec()
        );
    }

    #[test]
    fn json_is_held_to_the_end_and_other_values_are_left_alone() {
        let mut r = Rename::new("v2", "public", false);
        assert!(r.push(br#"{"model":"v2","x":"model","#).is_empty());
        assert!(r.push(br#""y":{"model":"v22"}}"#).is_empty());
        assert_eq!(
            &r.finish()[..],
            br#"{"model":"public","x":"model","y":{"model":"v22"}}"#
        );
    }
}
