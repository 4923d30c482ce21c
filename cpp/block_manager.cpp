#include "block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace trtc {

BlockManager::BlockManager(int num_blocks, int tokens_per_block, bool enable_prefix_reuse, int hash_bits)
    : num_blocks_(num_blocks), tokens_per_block_(tokens_per_block), enable_prefix_reuse_(enable_prefix_reuse) {
  if (num_blocks < 1) throw std::invalid_argument("num_blocks is " + std::to_string(num_blocks) + "; it must be >= 1");
  if (tokens_per_block < 1)
    throw std::invalid_argument("tokens_per_block is " + std::to_string(tokens_per_block) + "; it must be >= 1");
  if (hash_bits < 1 || hash_bits > 64)
    throw std::invalid_argument("hash_bits is " + std::to_string(hash_bits) + "; it must be in [1, 64]");
  hash_mask_ = hash_bits == 64 ? ~0ULL : (1ULL << hash_bits) - 1;
  ref_count_.assign(num_blocks, 0);
  has_hash_.assign(num_blocks, 0);
  hash_.assign(num_blocks, 0);
  block_tokens_.resize(size_t(num_blocks) * tokens_per_block);
  stamp_.assign(num_blocks, 0);
  parent_.assign(num_blocks, -1);
  parent_stamp_.assign(num_blocks, 0);
  hash_to_block_.reserve(num_blocks);
  for (int b = 0; b < num_blocks; ++b) free_.push_back(b);
  lru_prev_.assign(num_blocks + 1, num_blocks);
  lru_next_.assign(num_blocks + 1, num_blocks);
}

// FNV-1a over the block's tokens seeded with the parent hash, then a murmur3 finaliser.
// py_scheduler.BlockManager.hash_block computes the same value.
uint64_t BlockManager::hash_block(uint64_t parent_hash, const Token* tokens) const {
  uint64_t h = parent_hash ^ 0xcbf29ce484222325ULL;
  for (int i = 0; i < tokens_per_block_; ++i)
    h = (h ^ static_cast<uint32_t>(tokens[i])) * 0x100000001b3ULL;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h & hash_mask_;
}

// True when cached block b holds the K/V of `tokens` following `parent` (-1: b is a sequence's first block, of a
// chain seeded with `salt`).
bool BlockManager::holds(int b, int parent, uint64_t salt, const Token* tokens) const {
  if (parent_[b] != parent || parent_stamp_[b] != (parent < 0 ? salt : stamp_[parent])) return false;
  return std::equal(tokens, tokens + tokens_per_block_, block_tokens_.begin() + size_t(b) * tokens_per_block_);
}

void BlockManager::lru_push_back(int b) {
  int head = num_blocks_, last = lru_prev_[head];
  lru_next_[last] = b;
  lru_prev_[b] = last;
  lru_next_[b] = head;
  lru_prev_[head] = b;
  ++num_cached_;
}

void BlockManager::lru_remove(int b) {
  lru_next_[lru_prev_[b]] = lru_next_[b];
  lru_prev_[lru_next_[b]] = lru_prev_[b];
  --num_cached_;
}

int BlockManager::allocate_block() {
  int b;
  if (!free_.empty()) {
    b = free_.front();
    free_.pop_front();
  } else {  // evict the least recently freed cached block: its K/V is about to be overwritten
    b = lru_next_[num_blocks_];
    lru_remove(b);
    hash_to_block_.erase(hash_[b]);
    has_hash_[b] = 0;
    if (record_events_) events_.push_back({false, hash_[b], 0, {}});
  }
  ref_count_[b] = 1;
  return b;
}

int BlockManager::admit(int64_t seq_id, const std::vector<Token>& tokens, bool reuse_prefix, uint64_t salt) {
  if (has_sequence(seq_id)) throw std::invalid_argument("sequence " + std::to_string(seq_id) + " already holds blocks");
  const int tpb = tokens_per_block_, n = static_cast<int>(tokens.size());
  std::vector<int> matched;
  std::vector<uint64_t> hashes;
  int num_reclaimed = 0;  // matched blocks now sitting in the cached LRU
  if (enable_prefix_reuse_ && reuse_prefix) {
    uint64_t parent = salt;
    for (int i = 0; i < (n - 1) / tpb; ++i) {  // only full blocks strictly before the last token
      uint64_t h = hash_block(parent, &tokens[i * tpb]);
      auto it = hash_to_block_.find(h);
      if (it == hash_to_block_.end() || !holds(it->second, i ? matched.back() : -1, salt, &tokens[i * tpb])) break;
      matched.push_back(it->second);
      hashes.push_back(h);
      num_reclaimed += ref_count_[it->second] == 0;
      parent = h;
    }
  }
  int num_new = (n + tpb - 1) / tpb - static_cast<int>(matched.size());
  if (num_new > num_free_blocks() + num_cached_ - num_reclaimed) return -1;

  SeqBlocks& seq = seqs_[seq_id];
  for (int b : matched) {
    if (ref_count_[b]++ == 0) lru_remove(b);
    seq.table.push_back(b);
  }
  for (int i = 0; i < num_new; ++i) seq.table.push_back(allocate_block());
  seq.hashes = std::move(hashes);
  seq.salt = salt;
  return static_cast<int>(matched.size()) * tpb;
}

bool BlockManager::append_slots(int64_t seq_id, int num_tokens) {
  std::vector<int>& table = seqs_.at(seq_id).table;
  int num_new = (num_tokens + tokens_per_block_ - 1) / tokens_per_block_ - static_cast<int>(table.size());
  if (num_new > num_free_blocks() + num_cached_) return false;
  for (int i = 0; i < num_new; ++i) table.push_back(allocate_block());
  return true;
}

void BlockManager::cache_full_blocks(int64_t seq_id, const std::vector<Token>& tokens, int num_computed) {
  if (!enable_prefix_reuse_) return;
  SeqBlocks& seq = seqs_.at(seq_id);
  const int tpb = tokens_per_block_;
  for (int i = static_cast<int>(seq.hashes.size()); i < num_computed / tpb; ++i) {
    uint64_t h = hash_block(i == 0 ? seq.salt : seq.hashes.back(), &tokens[i * tpb]);
    seq.hashes.push_back(h);
    // Skip when another block already holds this hash (same tokens computed twice, or a collision), or when
    // the parent block is not registered (then this block could never be matched).
    const int b = seq.table[i], parent = i ? seq.table[i - 1] : -1;
    if (hash_to_block_.count(h) || (parent >= 0 && !has_hash_[parent])) continue;
    hash_to_block_.emplace(h, b);
    has_hash_[b] = 1;
    hash_[b] = h;
    stamp_[b] = next_stamp_++;
    parent_[b] = parent;
    parent_stamp_[b] = parent < 0 ? seq.salt : stamp_[parent];
    std::copy_n(tokens.begin() + i * tpb, tpb, block_tokens_.begin() + size_t(b) * tpb);
    if (record_events_)
      events_.push_back({true, h, i == 0 ? 0 : seq.hashes[i - 1],
                         std::vector<Token>(tokens.begin() + i * tpb, tokens.begin() + (i + 1) * tpb)});
  }
}

void BlockManager::record_kv_events(bool on) {
  record_events_ = on;
  if (!on) events_.clear();
}

std::vector<KvEvent> BlockManager::take_kv_events() {
  std::vector<KvEvent> out;
  out.swap(events_);
  return out;
}

void BlockManager::release(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return;
  const std::vector<int>& table = it->second.table;
  for (auto b = table.rbegin(); b != table.rend(); ++b) {  // tail first, so shared prefixes are evicted last
    if (--ref_count_[*b] > 0) continue;
    if (has_hash_[*b])
      lru_push_back(*b);
    else
      free_.push_back(*b);
  }
  seqs_.erase(it);
}

void BlockManager::trim(int64_t seq_id, int num_tokens) {
  std::vector<int>& table = seqs_.at(seq_id).table;
  const size_t keep = (num_tokens + tokens_per_block_ - 1) / tokens_per_block_;
  while (table.size() > keep) {  // tail blocks past the computed tokens: never full, never hashed
    const int b = table.back();
    table.pop_back();
    if (--ref_count_[b] > 0) continue;
    if (has_hash_[b])
      lru_push_back(b);
    else
      free_.push_back(b);
  }
}

const std::vector<int>& BlockManager::block_table(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::out_of_range("sequence " + std::to_string(seq_id) + " holds no blocks");
  return it->second.table;
}

int BlockManager::ref_count(int block_id) const { return ref_count_.at(block_id); }

bool BlockManager::is_hashed(int block_id) const { return has_hash_.at(block_id) != 0; }

}  // namespace trtc
