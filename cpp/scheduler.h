// In-flight-batching scheduler over the paged KV cache. Pure logic: no Python, no torch.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "block_manager.h"

namespace trtc {

enum class FinishReason : uint8_t { kNone, kEndId, kStopWords, kLength, kCancelled };
const char* finish_reason_name(FinishReason r);  // nullptr for kNone

struct UnknownRequestError : std::out_of_range {  // surfaces in Python as KeyError
  using std::out_of_range::out_of_range;
};

struct Request {
  enum class Status : uint8_t { kWaiting, kRunning, kFinished };
  int64_t id;
  std::vector<Token> tokens;  // prompt + generated: the tokens "known" for this request
  int num_prompt_tokens;
  int max_new_tokens;          // already clipped to max_seq_len and the pool
  int64_t end_id;
  std::vector<std::vector<Token>> stop_words;
  int num_computed = 0;        // leading tokens whose K/V is in the cache
  bool reuse_prefix = true;    // false: every token is computed (its logits are wanted), none taken from the cache
  std::vector<Token> draft;    // speculated tokens after the last known one, fed with it by the next decode
  uint64_t salt = 0;           // prefix-cache key besides the tokens: the LoRA adapter (0: none)
  Status status = Status::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;
  int num_generated() const { return static_cast<int>(tokens.size()) - num_prompt_tokens; }
};

// What one step runs. B = scheduled requests (decodes first, then prefill chunks), T = sum(query_lens).
struct ScheduledBatch {
  std::vector<int64_t> request_ids;  // [B]
  std::vector<int32_t> query_lens;   // [B] tokens fed this step
  std::vector<int32_t> context_lens; // [B] K/V length after this step
  std::vector<int32_t> input_ids;    // [T]
  std::vector<int32_t> positions;    // [T]
  std::vector<int32_t> slot_mapping; // [T] block_id * tokens_per_block + offset
  std::vector<int32_t> block_tables; // [B, max_blocks] row-major, padded with -1
  int32_t max_blocks = 0;
  std::vector<uint8_t> sample;       // [B] 1 when this chunk ends at the last known token
  std::vector<int32_t> draft_lens;   // [B] draft tokens fed after the last known one (0: none); their logits are wanted
  int64_t num_prefill_tokens = 0, num_decode_tokens = 0;
  std::vector<int64_t> preempted;    // ids preempted by this schedule()
};

struct StepOutput {
  int64_t request_id;
  int64_t token;  // -1 for a cancelled request
  FinishReason finish_reason;
};

class Scheduler {
 public:
  Scheduler(int num_blocks, int tokens_per_block, int max_batch_size, int max_num_tokens, int max_seq_len,
            bool enable_prefix_reuse = true, int hash_bits = 64);
  Scheduler(const Scheduler&) = delete;  // owns its requests
  Scheduler& operator=(const Scheduler&) = delete;

  void add_request(int64_t request_id, std::vector<Token> prompt, int max_new_tokens, int64_t end_id = -1,
                   std::vector<std::vector<Token>> stop_words = {}, bool reuse_prefix = true, uint64_t salt = 0);
  bool cancel(int64_t request_id);
  ScheduledBatch schedule();
  // Speculation: `draft` is fed after the request's last known token by the next schedule() if the request
  // is decoding then (clipped to its max_new_tokens and max_seq_len; dropped when its blocks do not fit).
  // False (and nothing kept) unless the request is running.
  bool set_draft(int64_t request_id, std::vector<Token> draft);
  // A draft model's mirror of a target request: keep its first num_tokens tokens (their K/V too, tail blocks
  // freed), then append `tokens` as known, not yet computed. False unless the request is running or waiting.
  bool rewind(int64_t request_id, int num_tokens, const std::vector<Token>& tokens);
  // sampled: the tokens of each request with sample=1 in the last batch, in batch order; counts[k] of them
  // for the k-th such request, 1 + its accepted draft tokens (counts empty: one each). A request's K/V
  // past its accepted tokens is dropped (tail blocks freed).
  std::vector<StepOutput> update(const std::vector<int64_t>& sampled, const std::vector<int32_t>& counts = {});

  bool has_unfinished() const { return !waiting_.empty() || !running_.empty() || !cancelled_.empty(); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  int num_running() const { return static_cast<int>(running_.size()); }
  std::vector<Token> output_tokens(int64_t request_id) const;
  std::vector<Token> pop(int64_t request_id);
  std::vector<int> block_table(int64_t request_id) const;  // empty unless running
  const BlockManager& block_manager() const { return blocks_; }
  BlockManager& block_manager() { return blocks_; }
  int64_t reused_tokens() const { return reused_tokens_; }
  int64_t num_preemptions() const { return num_preemptions_; }

 private:
  void preempt_last_running(ScheduledBatch& batch);
  void add_chunk(ScheduledBatch& batch, Request* r, int num_tokens, int draft_len = 0);
  FinishReason check_finish(const Request& r, int64_t token) const;
  const Request& find(int64_t request_id) const;

  BlockManager blocks_;
  int tokens_per_block_, max_batch_size_, max_num_tokens_, max_seq_len_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;  // waiting, running, finished-not-popped
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;  // admission order
  std::vector<int64_t> cancelled_; // cancelled since the last update()
  // The batch between schedule() and update().
  bool in_flight_ = false;
  std::vector<int64_t> in_flight_ids_;  // ids, not pointers: a request may be cancelled and popped meanwhile
  std::vector<int32_t> in_flight_query_lens_;
  std::vector<uint8_t> in_flight_sample_;
  std::vector<int32_t> in_flight_draft_lens_;
  int64_t reused_tokens_ = 0, num_preemptions_ = 0;
};

}  // namespace trtc
