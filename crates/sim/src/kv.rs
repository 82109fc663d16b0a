//! The paged KV cache with automatic prefix caching, after vLLM V1's block pool.
//!
//! Blocks hold `block_size` tokens. A block that holds a full block of prompt is registered
//! under its chained hash; when its last user lets go it stays in the cache, unreferenced, at
//! the tail of the free queue. Allocation takes blocks from the head of that queue, evicting
//! the cached content of the least recently freed block. A new request that finds its leading
//! blocks' hashes registered takes references on those blocks and skips their prefill.
//! Usage is `1 - free / total`, where free includes cached-but-unreferenced blocks, as vLLM
//! reports `kv_cache_usage_perc`.

use rustc_hash::FxHashMap;

const NIL: u32 = u32::MAX;

/// The block pool of one engine.
#[derive(Debug)]
pub struct BlockPool {
    ref_cnt: Vec<u32>,
    /// Hash of the content a block holds, 0 when none.
    hash: Vec<u64>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    free_len: u32,
    cached: FxHashMap<u64, u32>,
    evictions: u64,
}

/// The result of looking a prompt up in the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hit {
    /// Leading blocks found.
    pub blocks: u32,
    /// How many of those are unreferenced (taking them removes them from the free queue).
    pub unreferenced: u32,
}

impl BlockPool {
    pub fn new(num_blocks: u32) -> BlockPool {
        let n = num_blocks as usize;
        let mut p = BlockPool {
            ref_cnt: vec![0; n],
            hash: vec![0; n],
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: NIL,
            tail: NIL,
            free_len: 0,
            cached: FxHashMap::default(),
            evictions: 0,
        };
        for b in 0..num_blocks {
            p.push_tail(b);
        }
        p
    }

    pub fn num_blocks(&self) -> u32 {
        self.ref_cnt.len() as u32
    }

    /// Blocks with no user (empty or holding evictable cached content).
    pub fn num_free(&self) -> u32 {
        self.free_len
    }

    /// Fraction of blocks in use by requests, 0..=1.
    pub fn usage(&self) -> f64 {
        if self.ref_cnt.is_empty() {
            return 0.0;
        }
        1.0 - self.free_len as f64 / self.ref_cnt.len() as f64
    }

    /// Blocks registered in the prefix cache (referenced or not).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Cached blocks whose content was evicted to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// How many of the leading `hashes` are cached, without touching anything.
    pub fn lookup(&self, hashes: &[u64]) -> Hit {
        let mut hit = Hit::default();
        for h in hashes {
            match self.cached.get(&nonzero(*h)) {
                Some(&b) => {
                    hit.blocks += 1;
                    if self.ref_cnt[b as usize] == 0 {
                        hit.unreferenced += 1;
                    }
                }
                None => break,
            }
        }
        hit
    }

    /// Takes a reference on the cached blocks of `hashes` (all must be cached: call
    /// [`lookup`](Self::lookup) first) and appends them to `out`.
    pub fn touch(&mut self, hashes: &[u64], out: &mut Vec<u32>) {
        for h in hashes {
            let b = self.cached[&nonzero(*h)];
            if self.ref_cnt[b as usize] == 0 {
                self.unlink(b);
            }
            self.ref_cnt[b as usize] += 1;
            out.push(b);
        }
    }

    /// Allocates `n` blocks, evicting cached content from the head of the free queue, and
    /// appends them to `out`. Returns false, allocating nothing, when fewer than `n` are free.
    pub fn allocate(&mut self, n: u32, out: &mut Vec<u32>) -> bool {
        if n > self.free_len {
            return false;
        }
        for _ in 0..n {
            let b = self.head;
            self.unlink(b);
            let h = self.hash[b as usize];
            if h != 0 {
                self.cached.remove(&h);
                self.hash[b as usize] = 0;
                self.evictions += 1;
            }
            self.ref_cnt[b as usize] = 1;
            out.push(b);
        }
        true
    }

    /// Registers full block `block` as holding the content hashed `hash`. When another block
    /// already holds the same content (two requests prefilled it at once), the first stays.
    pub fn cache_block(&mut self, block: u32, hash: u64) {
        let h = nonzero(hash);
        if self.hash[block as usize] != 0 {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(h) {
            e.insert(block);
            self.hash[block as usize] = h;
        }
    }

    /// Releases one reference on each block. The last blocks of a request are queued first,
    /// so they are evicted before its leading blocks, which other requests are likelier to
    /// share (as vLLM does).
    pub fn free(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let rc = &mut self.ref_cnt[b as usize];
            debug_assert!(*rc > 0, "double free of block {b}");
            *rc -= 1;
            if *rc == 0 {
                self.push_tail(b);
            }
        }
    }

    fn push_tail(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.free_len += 1;
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.free_len -= 1;
    }

    /// Checks the free queue against the reference counts (tests and debug builds).
    pub fn check(&self) {
        let mut n = 0;
        let mut b = self.head;
        while b != NIL {
            assert_eq!(
                self.ref_cnt[b as usize], 0,
                "block {b} queued while referenced"
            );
            n += 1;
            b = self.next[b as usize];
        }
        assert_eq!(n, self.free_len);
        let unref = self.ref_cnt.iter().filter(|&&r| r == 0).count() as u32;
        assert_eq!(unref, self.free_len);
        for (&h, &b) in &self.cached {
            assert_eq!(self.hash[b as usize], h);
        }
    }
}

/// Hash 0 marks "no content"; move a real 0 out of the way.
fn nonzero(h: u64) -> u64 {
    if h == 0 {
        1
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_blocks_stay_cached_until_evicted_lru() {
        let mut p = BlockPool::new(4);
        let mut a = Vec::new();
        assert!(p.allocate(2, &mut a));
        p.cache_block(a[0], 10);
        p.cache_block(a[1], 11);
        p.free(&a);
        assert_eq!(p.num_free(), 4);
        assert_eq!(
            p.lookup(&[10, 11, 12]),
            Hit {
                blocks: 2,
                unreferenced: 2
            }
        );
        // Two fresh blocks come from the never-used ones first, then the request's tail.
        let mut b = Vec::new();
        assert!(p.allocate(3, &mut b));
        assert_eq!(
            p.lookup(&[10, 11]),
            Hit {
                blocks: 1,
                unreferenced: 1
            }
        );
        assert_eq!(p.evictions(), 1);
        p.check();
    }

    #[test]
    fn touching_a_cached_block_takes_it_off_the_free_queue() {
        let mut p = BlockPool::new(2);
        let mut a = Vec::new();
        assert!(p.allocate(1, &mut a));
        p.cache_block(a[0], 5);
        p.free(&a);
        let mut b = Vec::new();
        p.touch(&[5], &mut b);
        assert_eq!(b, a);
        assert_eq!(p.num_free(), 1);
        assert!(!p.allocate(2, &mut Vec::new()));
        assert!(p.allocate(1, &mut Vec::new()));
        assert_eq!(p.usage(), 1.0);
        p.check();
    }
}
