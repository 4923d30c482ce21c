// Paged KV-cache block pool with prefix reuse. Pure logic: no Python, no torch.
#pragma once

#include <cstdint>
#include <deque>
#include <unordered_map>
#include <vector>

namespace trtc {

using Token = int32_t;  // token ids (the model's vocabulary fits int32)

// A change to the set of blocks prefix reuse can find, for a KV-aware router outside the engine (NVIDIA
// Dynamo's): a block registered under `hash` (chained from `parent_hash`, 0 for a first block) holding
// `tokens`, or a registered block evicted.
struct KvEvent {
  bool stored;               // false: removed (its K/V is about to be overwritten)
  uint64_t hash;
  uint64_t parent_hash;      // stored only
  std::vector<Token> tokens; // stored only: the block's tokens_per_block tokens
};

// A pool of `num_blocks` blocks, each holding the K/V of `tokens_per_block` consecutive tokens.
// Every block is in exactly one state:
//   free    ref_count == 0, no hash              queue `free_`, taken first-in first-out
//   used    ref_count  > 0                        in one or more block tables
//   cached  ref_count == 0, hashed full block     LRU list, least recently freed evicted first
// Prefix reuse: a FULL, computed block is registered under hash(parent_hash, its tokens). A new sequence
// that starts with the same tokens shares it (ref_count + 1) instead of recomputing it. The hash only finds
// candidates: a hit is taken only if the block's stored tokens match AND its stored parent is the block just
// matched, in the same registration (stamp). So a hash collision never hands out wrong K/V, even one between
// identical blocks that follow different prefixes.
class BlockManager {
 public:
  // hash_bits < 64 truncates block hashes; it exists so tests can force collisions.
  BlockManager(int num_blocks, int tokens_per_block, bool enable_prefix_reuse = true, int hash_bits = 64);

  // Gives sequence `seq_id` blocks for all of `tokens` (which it will compute): cached full blocks strictly
  // before its last token are shared (unless reuse_prefix is false), the rest are allocated. Returns the number
  // of tokens served from the cache, or -1 (changing nothing) when the pool cannot hold the sequence now.
  // salt: seeds the sequence's hash chain, so that only sequences of the same salt (the same LoRA adapter,
  // 0 for none) share blocks.
  int admit(int64_t seq_id, const std::vector<Token>& tokens, bool reuse_prefix = true, uint64_t salt = 0);
  // Grows the sequence's block table to hold `num_tokens` tokens. False (changing nothing) if blocks run out.
  bool append_slots(int64_t seq_id, int num_tokens);
  // Registers the blocks that are full within the first `num_computed` of `tokens` for prefix reuse.
  void cache_full_blocks(int64_t seq_id, const std::vector<Token>& tokens, int num_computed);
  // Drops the sequence. Its blocks lose one reference each (last block first); a block nobody references
  // goes to the cached LRU if it is hashed, else to the free queue.
  void release(int64_t seq_id);
  // Frees the blocks past the first num_tokens tokens (speculated tokens that were rejected).
  void trim(int64_t seq_id, int num_tokens);

  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int>& block_table(int64_t seq_id) const;  // [num_blocks_of_seq] block ids
  int ref_count(int block_id) const;
  bool is_hashed(int block_id) const;  // registered for prefix reuse: a later sequence may share it

  int num_blocks() const { return num_blocks_; }
  int tokens_per_block() const { return tokens_per_block_; }
  int num_free_blocks() const { return static_cast<int>(free_.size()); }
  int num_cached_blocks() const { return num_cached_; }
  int num_used_blocks() const { return num_blocks_ - num_free_blocks() - num_cached_; }
  uint64_t hash_block(uint64_t parent_hash, const Token* tokens) const;  // over tokens_per_block tokens
  // Events of blocks registered and evicted are kept from the first call with true, until taken.
  void record_kv_events(bool on);
  std::vector<KvEvent> take_kv_events();

 private:
  struct SeqBlocks {
    std::vector<int> table;         // block ids, in token order
    std::vector<uint64_t> hashes;   // chain hashes of the first hashes.size() (full) blocks
    uint64_t salt = 0;              // the chain's seed
  };

  int allocate_block();  // caller checks availability: takes a free block, else evicts the LRU cached one
  void lru_push_back(int b);
  void lru_remove(int b);
  bool holds(int b, int parent, uint64_t salt, const Token* tokens) const;

  int num_blocks_, tokens_per_block_;
  bool enable_prefix_reuse_;
  uint64_t hash_mask_;
  std::vector<int> ref_count_;                    // [num_blocks]
  std::vector<uint8_t> has_hash_;                 // [num_blocks]
  std::vector<uint64_t> hash_;                    // [num_blocks]
  // Per block, valid while it is hashed:
  std::vector<Token> block_tokens_;               // [num_blocks * tokens_per_block]
  std::vector<uint64_t> stamp_;                   // [num_blocks] unique per registration
  std::vector<int> parent_;                       // [num_blocks] previous block of the registering sequence, or -1
  std::vector<uint64_t> parent_stamp_;            // [num_blocks] stamp_ of parent_ at registration
  uint64_t next_stamp_ = 1;
  std::deque<int> free_;
  std::vector<int> lru_prev_, lru_next_;          // [num_blocks + 1]; index num_blocks is the list head
  int num_cached_ = 0;
  std::unordered_map<uint64_t, int> hash_to_block_;
  std::unordered_map<int64_t, SeqBlocks> seqs_;
  bool record_events_ = false;
  std::vector<KvEvent> events_;
};

}  // namespace trtc
