//! The approximate prefix-cache index: which endpoint has probably cached which prompt
//! prefix, learned from where the picker sent earlier requests.
//!
//! Prompts are cut into blocks of `block_size_tokens x 4` bytes and hashed in a chain
//! (`h_i = xxh64(block_i || LE64(h_{i-1}))`, first seed from the model name), so one hash
//! stands for the whole prefix up to its block. Each endpoint remembers at most
//! `lru_capacity_per_endpoint` hashes, least recently used out first, and the whole index at
//! most `max_total_entries`, so memory is bounded whatever the traffic.

use std::collections::VecDeque;

use rustc_hash::FxHashMap as HashMap;

use xxhash_rust::xxh64::{xxh64, Xxh64};

/// Characters per token assumed when turning a token block size into bytes.
pub const CHARS_PER_TOKEN: usize = 4;

/// Settings of the prefix index, from the `prefix-cache-scorer` plugin's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixConfig {
    pub block_size_tokens: usize,
    pub max_blocks: usize,
    pub lru_capacity_per_endpoint: usize,
    /// Bound on entries over all endpoints (each entry costs a few dozen bytes).
    pub max_total_entries: usize,
    /// Use an endpoint's reported `num_gpu_blocks` as its capacity when known.
    pub auto_tune: bool,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            block_size_tokens: 16,
            max_blocks: 256,
            lru_capacity_per_endpoint: 31_250,
            max_total_entries: 4_000_000,
            auto_tune: true,
        }
    }
}

impl PrefixConfig {
    pub fn block_bytes(&self) -> usize {
        (self.block_size_tokens * CHARS_PER_TOKEN).max(1)
    }
}

/// Chained block hashes of a prompt, at most `max_blocks`; a trailing partial block is not
/// hashed (engines only cache full blocks).
pub fn block_hashes(cfg: &PrefixConfig, model: &str, parts: &[&[u8]]) -> Vec<u64> {
    let bs = cfg.block_bytes();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let n = (total / bs).min(cfg.max_blocks);
    let mut out = Vec::with_capacity(n);
    let mut prev = xxh64(model.as_bytes(), 0);
    let mut hasher = Xxh64::new(0);
    let mut filled = 0usize;
    'outer: for part in parts {
        let mut rest: &[u8] = part;
        while !rest.is_empty() {
            let take = (bs - filled).min(rest.len());
            hasher.update(&rest[..take]);
            filled += take;
            rest = &rest[take..];
            if filled == bs {
                hasher.update(&prev.to_le_bytes());
                prev = hasher.digest();
                out.push(prev);
                if out.len() == n {
                    break 'outer;
                }
                hasher.reset(0);
                filled = 0;
            }
        }
    }
    out
}

/// Endpoint key in the index (the endpoint's dense id).
pub type EndpointKey = u32;

#[derive(Debug, Default)]
struct EndpointLru {
    /// Hashes in insertion/refresh order with the tick they were last touched; stale
    /// duplicates (touched again later) are skipped on eviction.
    order: VecDeque<(u64, u64)>,
    /// hash -> tick of last touch.
    live: HashMap<u64, u64>,
}

/// The index itself. Not thread-safe; the director wraps it in a mutex.
#[derive(Debug)]
pub struct PrefixIndex {
    cfg: PrefixConfig,
    /// hash -> endpoints that hold it (few per hash).
    by_hash: HashMap<u64, Vec<EndpointKey>>,
    per_endpoint: HashMap<EndpointKey, EndpointLru>,
    tick: u64,
    entries: usize,
    lookups: u64,
    hit_blocks: u64,
    looked_blocks: u64,
}

/// An endpoint's cache size in index blocks: `server_blocks` of `server_block_tokens`
/// tokens each (vLLM's default block is 16 tokens when the server does not say), held in
/// blocks of `index_block_tokens`.
pub fn index_capacity(
    server_blocks: u64,
    server_block_tokens: Option<u32>,
    index_block_tokens: usize,
) -> usize {
    let tokens = server_blocks.saturating_mul(u64::from(server_block_tokens.unwrap_or(16)));
    usize::try_from(tokens / index_block_tokens.max(1) as u64).unwrap_or(usize::MAX)
}

impl PrefixIndex {
    pub fn new(cfg: PrefixConfig) -> Self {
        PrefixIndex {
            cfg,
            by_hash: HashMap::default(),
            per_endpoint: HashMap::default(),
            tick: 0,
            entries: 0,
            lookups: 0,
            hit_blocks: 0,
            looked_blocks: 0,
        }
    }

    pub fn config(&self) -> &PrefixConfig {
        &self.cfg
    }

    /// Number of (hash, endpoint) entries held.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Fraction of looked-up blocks that matched some endpoint, over the index's life.
    pub fn hit_ratio(&self) -> f64 {
        if self.looked_blocks == 0 {
            0.0
        } else {
            self.hit_blocks as f64 / self.looked_blocks as f64
        }
    }

    /// For each endpoint holding a prefix of `hashes`, how many leading blocks it holds.
    /// Greedy longest prefix: an endpoint counts block `i` only if it held all before it.
    pub fn longest_matches(&mut self, hashes: &[u64]) -> HashMap<EndpointKey, usize> {
        let mut matched: HashMap<EndpointKey, usize> = HashMap::default();
        self.lookups += 1;
        self.looked_blocks += hashes.len() as u64;
        let mut best = 0usize;
        for (i, h) in hashes.iter().enumerate() {
            let Some(holders) = self.by_hash.get(h) else {
                break;
            };
            let mut any = false;
            for &ep in holders {
                if i == 0 {
                    matched.insert(ep, 1);
                    any = true;
                } else if let Some(n) = matched.get_mut(&ep) {
                    if *n == i {
                        *n = i + 1;
                        any = true;
                    }
                }
            }
            if !any {
                break;
            }
            best = i + 1;
        }
        self.hit_blocks += best as u64;
        matched
    }

    /// Record that `endpoint` was sent a prompt with these block hashes. `capacity` is the
    /// endpoint's own cache size in blocks when known (auto-tune), else the configured one.
    pub fn insert(&mut self, endpoint: EndpointKey, hashes: &[u64], capacity: Option<usize>) {
        // Last block first, so the prompt's first block is the most recently used: matching
        // needs a prompt's head (it stops at the first miss), so eviction must take the
        // tail first, as a model server's own cache frees a sequence's last blocks first.
        for &h in hashes.iter().rev() {
            self.tick += 1;
            let tick = self.tick;
            let lru = self.per_endpoint.entry(endpoint).or_default();
            if lru.live.insert(h, tick).is_none() {
                self.by_hash.entry(h).or_default().push(endpoint);
                self.entries += 1;
            }
            lru.order.push_back((h, tick));
            // Compact the order queue when refreshes have left many stale records behind.
            if lru.order.len() > 2 * lru.live.len() + 64 {
                let live = &lru.live;
                lru.order.retain(|(h, t)| live.get(h) == Some(t));
            }
        }
        // Each endpoint may hold its own capacity, or its fair share of the global bound,
        // whichever is smaller; evicting from the endpoint just written keeps this O(1).
        let share = self.cfg.max_total_entries / self.per_endpoint.len().max(1);
        let own = match capacity {
            Some(c) if self.cfg.auto_tune => c.max(1),
            _ => self.cfg.lru_capacity_per_endpoint,
        };
        let cap = own.min(share.max(1));
        if let Some(lru) = self.per_endpoint.get_mut(&endpoint) {
            while lru.live.len() > cap {
                Self::evict_one(&mut self.by_hash, lru, endpoint, &mut self.entries);
            }
        }
        while self.entries > self.cfg.max_total_entries {
            // Rare: the pool grew, so others sit above the new fair share. Trim the largest.
            let Some((&ep, _)) = self.per_endpoint.iter().max_by_key(|(_, l)| l.live.len()) else {
                break;
            };
            let lru = self.per_endpoint.get_mut(&ep).expect("key just found");
            Self::evict_one(&mut self.by_hash, lru, ep, &mut self.entries);
        }
    }

    fn evict_one(
        by_hash: &mut HashMap<u64, Vec<EndpointKey>>,
        lru: &mut EndpointLru,
        endpoint: EndpointKey,
        entries: &mut usize,
    ) {
        while let Some((h, t)) = lru.order.pop_front() {
            if lru.live.get(&h) == Some(&t) {
                lru.live.remove(&h);
                if let Some(v) = by_hash.get_mut(&h) {
                    v.retain(|&e| e != endpoint);
                    if v.is_empty() {
                        by_hash.remove(&h);
                    }
                }
                *entries -= 1;
                return;
            }
        }
    }

    /// Forget an endpoint entirely (it left the pool).
    pub fn remove_endpoint(&mut self, endpoint: EndpointKey) {
        if let Some(lru) = self.per_endpoint.remove(&endpoint) {
            for h in lru.live.keys() {
                if let Some(v) = self.by_hash.get_mut(h) {
                    v.retain(|&e| e != endpoint);
                    if v.is_empty() {
                        self.by_hash.remove(h);
                    }
                }
            }
            self.entries -= lru.live.len();
        }
    }

    /// Endpoint keys present in the index (for garbage collection of departed endpoints).
    pub fn endpoints(&self) -> Vec<EndpointKey> {
        self.per_endpoint.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PrefixConfig {
        PrefixConfig {
            block_size_tokens: 1,
            max_blocks: 256,
            lru_capacity_per_endpoint: 100,
            max_total_entries: 1000,
            auto_tune: true,
        }
    }

    #[test]
    fn auto_tune_uses_the_endpoints_own_cache_size() {
        let mut idx = PrefixIndex::new(cfg());
        idx.insert(1, &[1, 2, 3, 4, 5], Some(3));
        assert_eq!(idx.len(), 3);
        let mut fixed = PrefixIndex::new(PrefixConfig {
            auto_tune: false,
            ..cfg()
        });
        fixed.insert(1, &[1, 2, 3, 4, 5], Some(3));
        assert_eq!(fixed.len(), 5);
    }

    #[test]
    fn hashes_chain_over_part_boundaries_and_drop_partial_block() {
        let c = cfg();
        let a = block_hashes(&c, "m", &[b"abcdefgh", b"ij"]);
        let b = block_hashes(&c, "m", &[b"abcd", b"efghij"]);
        assert_eq!(a.len(), 2);
        assert_eq!(a, b);
        assert_ne!(block_hashes(&c, "other", &[b"abcdefgh"]), a[..2].to_vec());
    }

    #[test]
    fn same_block_after_different_prefix_hashes_differently() {
        let c = cfg();
        let a = block_hashes(&c, "m", &[b"aaaazzzz"]);
        let b = block_hashes(&c, "m", &[b"bbbbzzzz"]);
        assert_ne!(a[1], b[1]);
    }

    #[test]
    fn max_blocks_truncates() {
        let c = PrefixConfig {
            max_blocks: 3,
            ..cfg()
        };
        assert_eq!(block_hashes(&c, "m", &[&[b'x'; 400]]).len(), 3);
    }

    #[test]
    fn longest_match_is_greedy_prefix() {
        let c = cfg();
        let mut idx = PrefixIndex::new(c);
        let long = block_hashes(&c, "m", &[b"0123456789abcdef"]);
        idx.insert(1, &long[..2], None);
        idx.insert(2, &long, None);
        // Endpoint 3 holds block 2 only (from some other path); it must not count.
        idx.insert(3, &long[2..3], None);
        let m = idx.longest_matches(&long);
        assert_eq!(m.get(&1), Some(&2));
        assert_eq!(m.get(&2), Some(&4));
        assert_eq!(m.get(&3), None);
    }

    #[test]
    fn per_endpoint_capacity_evicts_least_recently_used() {
        let c = PrefixConfig {
            lru_capacity_per_endpoint: 4,
            ..cfg()
        };
        let mut idx = PrefixIndex::new(c);
        idx.insert(1, &[1, 2, 3, 4], None); // aged tail first: 4 is the oldest
        idx.insert(1, &[3], None); // refresh 3
        idx.insert(1, &[5], None); // evicts 4, the prompt's tail
        assert_eq!(idx.len(), 4);
        assert!(idx.longest_matches(&[4]).is_empty());
        assert_eq!(idx.longest_matches(&[1, 2, 3, 4]).get(&1), Some(&3));
        idx.insert(1, &[6], None); // evicts 2 (1 and 3 are newer)
        assert_eq!(idx.longest_matches(&[1, 2, 3]).get(&1), Some(&1));
    }

    #[test]
    fn capacity_is_converted_to_index_blocks() {
        // 1,000 vLLM blocks of 16 tokens hold 250 index blocks of 64 tokens.
        assert_eq!(index_capacity(1_000, Some(16), 64), 250);
        assert_eq!(index_capacity(1_000, Some(32), 16), 2_000);
        assert_eq!(index_capacity(1_000, None, 16), 1_000);
        assert_eq!(index_capacity(u64::MAX, Some(u32::MAX), 0), usize::MAX);
    }

    #[test]
    fn total_bound_holds() {
        let c = PrefixConfig {
            max_total_entries: 10,
            ..cfg()
        };
        let mut idx = PrefixIndex::new(c);
        for ep in 0..5 {
            idx.insert(
                ep,
                &(0..8u64).map(|h| h + 100 * ep as u64).collect::<Vec<_>>(),
                None,
            );
            assert!(idx.len() <= 10);
        }
    }

    #[test]
    fn removing_an_endpoint_forgets_it() {
        let mut idx = PrefixIndex::new(cfg());
        idx.insert(1, &[7, 8], None);
        idx.insert(2, &[7], None);
        idx.remove_endpoint(1);
        assert_eq!(idx.len(), 1);
        let m = idx.longest_matches(&[7, 8]);
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(&2), Some(&1));
    }
}
