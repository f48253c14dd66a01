//! Paged KV cache: one pool of fixed-size blocks per model, shared by all of
//! its sequences, with automatic prefix caching.
//!
//! A sequence owns a block table (block ids in position order). Full blocks
//! are keyed by a hash of every token up to their end (and an optional salt),
//! so a later prompt that starts the same way reuses them instead of
//! recomputing them. A block whose last user leaves keeps its contents and
//! its key, and waits in LRU order until it is either hit again or its
//! memory is needed for a new block.
//!
//! Only full blocks are shared and nothing ever writes into a full block, so
//! sharing needs no copy-on-write.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

pub type BlockId = u32;

/// Storage of every block's keys and values: `[block][layer][k|v]`, keys
/// `[kv_dim][slot]` (transposed, so attention reads a head's keys as panels
/// of consecutive positions) and values `[slot][kv_dim]`, f16 like
/// llama.cpp's default cache;
/// or, for a backend that keeps the cache in its own memory, that backend's
/// store (same blocks, same tables).
pub struct KvStore {
    n_layers: usize,
    kv_dim: usize,
    block_size: usize,
    n_blocks: usize,
    /// f16 bits. Allocated zeroed (`calloc`), so pages the pool never
    /// touches cost no memory. Empty when `device` holds the cache.
    data: Vec<u16>,
    device: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl KvStore {
    pub fn new(n_layers: usize, kv_dim: usize, block_size: usize, n_blocks: usize) -> Self {
        KvStore { n_layers, kv_dim, block_size, n_blocks, data: vec![0u16; n_blocks * n_layers * 2 * block_size * kv_dim], device: None }
    }

    /// A store whose blocks live in a backend's memory (`device`); `write`
    /// and `block` are then the backend's business.
    pub fn on_device(n_layers: usize, kv_dim: usize, block_size: usize, n_blocks: usize, device: Box<dyn std::any::Any + Send + Sync>) -> Self {
        KvStore { n_layers, kv_dim, block_size, n_blocks, data: Vec::new(), device: Some(device) }
    }

    pub fn device_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.device.as_mut()?.downcast_mut()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    fn block_stride(&self) -> usize {
        self.n_layers * 2 * self.block_size * self.kv_dim
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_stride() * 2
    }

    /// Index of the first key element of `layer` in `block`.
    fn base(&self, block: BlockId, layer: usize) -> usize {
        (block as usize * self.n_layers + layer) * 2 * self.block_size * self.kv_dim
    }

    /// Stores the keys and values of position `pos` of the sequence whose
    /// block table is `table`.
    pub fn write(&mut self, layer: usize, table: &[BlockId], pos: usize, k: &[f32], v: &[f32]) {
        let (bs, d) = (self.block_size, self.kv_dim);
        let (base, slot) = (self.base(table[pos / bs], layer), pos % bs);
        let data = self.data.reinterpret_cast_mut::<f16>();
        for (i, &x) in k.iter().enumerate() {
            data[base + i * bs + slot] = f16::from_f32(x);
        }
        data[base + (bs + slot) * d..][..d].convert_from_f32_slice(v);
    }

    /// Keys (`[kv_dim][slot]`) and values (`[slot][kv_dim]`) of `layer` in
    /// one block.
    pub fn block(&self, layer: usize, block: BlockId) -> (&[f16], &[f16]) {
        let n = self.block_size * self.kv_dim;
        let base = self.base(block, layer);
        let data = self.data.reinterpret_cast::<f16>();
        (&data[base..base + n], &data[base + n..base + 2 * n])
    }
}

/// Allocation, reference counts and the prefix cache's index over a `KvStore`.
pub struct BlockPool {
    block_size: usize,
    refs: Vec<u32>,
    /// The prefix key a full block is registered under.
    key_of: Vec<Option<u64>>,
    by_key: HashMap<u64, BlockId>,
    /// Blocks holding nothing worth keeping; popped from the end.
    free: Vec<BlockId>,
    /// Unreferenced blocks that keep a cached prefix: release tick -> block.
    evictable: BTreeMap<u64, BlockId>,
    tick_of: Vec<u64>,
    tick: u64,
    /// Blocks ever handed out: `0..high_water` (free blocks are reused last
    /// in, first out, so memory is touched from the bottom up).
    high_water: usize,
    /// Keys come from a per-pool random hasher: nobody outside the process
    /// can craft two prompts whose blocks collide.
    hasher: RandomState,
    pub prefix_caching: bool,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub queries: u64,
    pub hits: u64,
}

impl BlockPool {
    pub fn new(n_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        BlockPool {
            block_size,
            refs: vec![0; n_blocks],
            key_of: vec![None; n_blocks],
            by_key: HashMap::new(),
            free: (0..n_blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            tick_of: vec![0; n_blocks],
            tick: 0,
            high_water: 0,
            hasher: RandomState::new(),
            prefix_caching,
            queries: 0,
            hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a new allocation can take (free, or cached and unreferenced).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by some sequence.
    pub fn used(&self) -> usize {
        self.n_blocks() - self.available()
    }

    /// Unreferenced blocks kept for their cached prefix.
    pub fn cached(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks whose memory has been written at least once: what the pool
    /// costs in resident memory (it grows to the whole pool as the prefix
    /// cache fills, then stays).
    pub fn touched(&self) -> usize {
        self.high_water
    }

    /// The key of the block that ends a prefix: chains the previous block's
    /// key (or the salt, for the first block) with this block's tokens.
    pub fn key(&self, prev: u64, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        prev.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// The chain's starting value for a salt (tenants with different salts
    /// never share blocks).
    pub fn salt_key(&self, salt: Option<&str>) -> u64 {
        salt.map_or(0, |s| self.hasher.hash_one(s))
    }

    /// A fresh block with one reference, evicting the least recently released
    /// cached block when nothing is free.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(k) = self.key_of[b as usize].take() {
                    self.by_key.remove(&k);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        self.high_water = self.high_water.max(b as usize + 1);
        Some(b)
    }

    /// Takes a reference to the cached block with this key, if any.
    pub fn lookup(&mut self, key: u64) -> Option<BlockId> {
        if !self.prefix_caching {
            return None;
        }
        let b = *self.by_key.get(&key)?;
        if self.refs[b as usize] == 0 {
            self.evictable.remove(&self.tick_of[b as usize]);
        }
        self.refs[b as usize] += 1;
        Some(b)
    }

    /// Makes a full block findable by its prefix key. A block with the same
    /// key already cached (computed concurrently) wins; this one stays private.
    pub fn register(&mut self, block: BlockId, key: u64) {
        if self.prefix_caching && self.key_of[block as usize].is_none() && !self.by_key.contains_key(&key) {
            self.by_key.insert(key, block);
            self.key_of[block as usize] = Some(key);
        }
    }

    pub fn release(&mut self, block: BlockId) {
        let r = &mut self.refs[block as usize];
        debug_assert!(*r > 0, "block {block} released more often than taken");
        *r -= 1;
        if *r == 0 {
            if self.key_of[block as usize].is_some() {
                self.tick += 1;
                self.tick_of[block as usize] = self.tick;
                self.evictable.insert(self.tick, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Forgets every cached prefix (blocks in use keep their contents).
    pub fn clear_prefix_cache(&mut self) {
        for (_, b) in std::mem::take(&mut self.evictable) {
            self.free.push(b);
        }
        for k in self.key_of.iter_mut() {
            *k = None;
        }
        self.by_key.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_round_trips_positions_through_block_tables() {
        let mut s = KvStore::new(2, 4, 2, 3);
        assert_eq!(s.n_blocks(), 3);
        let table = [2, 0];
        for pos in 0..4 {
            let k: Vec<f32> = (0..4).map(|i| (pos * 10 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            s.write(1, &table, pos, &k, &v);
        }
        // Block 0 holds positions 2 and 3: keys by dimension, values by slot.
        let (k, v) = s.block(1, 0);
        assert_eq!(k.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), [20.0, 30.0, 21.0, 31.0, 22.0, 32.0, 23.0, 33.0]);
        assert_eq!(v.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), [-20.0, -21.0, -22.0, -23.0, -30.0, -31.0, -32.0, -33.0]);
        let (k, _) = s.block(1, 2);
        assert_eq!(k[0].to_f32(), 0.0);
        assert_eq!(k[1].to_f32(), 10.0);
        // Layer 0 untouched.
        assert!(s.block(0, 2).0.iter().all(|x| x.to_f32() == 0.0));
    }

    #[test]
    fn allocation_release_and_prefix_reuse() {
        let mut p = BlockPool::new(3, 4, true);
        let k1 = p.key(p.salt_key(None), &[1, 2, 3, 4]);
        let a = p.allocate().unwrap();
        p.register(a, k1);
        let b = p.allocate().unwrap();
        assert_eq!((p.used(), p.available()), (2, 1));
        // A second sequence hits the first block while it is in use.
        assert_eq!(p.lookup(k1), Some(a));
        p.release(a);
        p.release(a);
        p.release(b);
        // `a` stays cached, `b` (never registered) is free again.
        assert_eq!((p.used(), p.cached(), p.available()), (0, 1, 3));
        assert_eq!(p.lookup(k1), Some(a));
        assert_eq!(p.used(), 1);
        p.release(a);
        // Exhausting the free blocks evicts the cached one last.
        let got: Vec<_> = (0..3).map(|_| p.allocate().unwrap()).collect();
        assert!(got.contains(&a));
        assert_eq!(p.allocate(), None);
        assert_eq!(p.lookup(k1), None, "an evicted block must not be found");
    }

    #[test]
    fn salts_and_chaining_separate_keys() {
        let p = BlockPool::new(1, 2, true);
        let (s0, s1) = (p.salt_key(None), p.salt_key(Some("tenant")));
        assert_ne!(p.key(s0, &[1, 2]), p.key(s1, &[1, 2]));
        let first = p.key(s0, &[1, 2]);
        assert_ne!(p.key(first, &[3, 4]), p.key(s0, &[3, 4]));
        assert_eq!(p.key(first, &[3, 4]), p.key(p.key(s0, &[1, 2]), &[3, 4]));
    }

    #[test]
    fn disabled_prefix_caching_never_hits() {
        let mut p = BlockPool::new(2, 2, false);
        let a = p.allocate().unwrap();
        p.register(a, 7);
        p.release(a);
        assert_eq!(p.lookup(7), None);
        assert_eq!(p.available(), 2);
    }
}
