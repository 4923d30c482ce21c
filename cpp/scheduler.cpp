#include "scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace trtc {

using Status = Request::Status;

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kEndId: return "end_id";
    case FinishReason::kStopWords: return "stop_words";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    default: return nullptr;
  }
}

static void require_positive(const char* name, int value) {
  if (value < 1) throw std::invalid_argument(std::string(name) + " is " + std::to_string(value) + "; it must be >= 1");
}

Scheduler::Scheduler(int num_blocks, int tokens_per_block, int max_batch_size, int max_num_tokens, int max_seq_len,
                     bool enable_prefix_reuse, int hash_bits)
    : blocks_(num_blocks, tokens_per_block, enable_prefix_reuse, hash_bits),  // validates its own arguments
      tokens_per_block_(tokens_per_block),
      max_batch_size_(max_batch_size),
      max_num_tokens_(max_num_tokens),
      max_seq_len_(max_seq_len) {
  require_positive("max_batch_size", max_batch_size);
  require_positive("max_num_tokens", max_num_tokens);
  require_positive("max_seq_len", max_seq_len);
}

void Scheduler::add_request(int64_t id, std::vector<Token> prompt, int max_new_tokens, int64_t end_id,
                            std::vector<std::vector<Token>> stop_words, bool reuse_prefix, uint64_t salt) {
  const std::string rid = "request " + std::to_string(id) + ": ";
  const int n = static_cast<int>(prompt.size());
  const int64_t pool_tokens = int64_t(blocks_.num_blocks()) * tokens_per_block_;
  if (n == 0) throw std::invalid_argument(rid + "prompt is empty; pass at least one token id");
  if (requests_.count(id))
    throw std::invalid_argument(rid + "request_id " + std::to_string(id) +
                                " is already in use (not yet popped); pop() it or use a new id");
  if (max_new_tokens < 1)
    throw std::invalid_argument(rid + "max_new_tokens is " + std::to_string(max_new_tokens) + "; it must be >= 1");
  if (n >= max_seq_len_)
    throw std::invalid_argument(rid + "prompt has " + std::to_string(n) + " tokens but the engine's max_seq_len is " +
                                std::to_string(max_seq_len_) + "; rebuild with a larger --max_seq_len");
  if (n + 1 > pool_tokens)
    throw std::invalid_argument(rid + "prompt has " + std::to_string(n) + " tokens but the KV-cache pool holds only " +
                                std::to_string(pool_tokens) + " (" + std::to_string(blocks_.num_blocks()) +
                                " blocks of " + std::to_string(tokens_per_block_) +
                                "); give the KV cache more memory or shorten the prompt");
  for (size_t i = 0; i < stop_words.size(); ++i)
    if (stop_words[i].empty())
      throw std::invalid_argument(rid + "stop_words[" + std::to_string(i) + "] is empty; drop it");
  auto r = std::make_unique<Request>();
  r->id = id;
  r->num_prompt_tokens = n;
  // Clip so prompt + generated <= max_seq_len, and so the request alone always fits the pool: it feeds at
  // most n + max_new_tokens - 1 tokens (the last generated token is never fed).
  r->max_new_tokens = static_cast<int>(std::min<int64_t>({max_new_tokens, max_seq_len_ - n, pool_tokens - n + 1}));
  r->tokens = std::move(prompt);
  r->end_id = end_id;
  r->stop_words = std::move(stop_words);
  r->reuse_prefix = reuse_prefix;
  r->salt = salt;
  waiting_.push_back(r.get());
  requests_.emplace(id, std::move(r));
}

bool Scheduler::cancel(int64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end() || it->second->status == Status::kFinished) return false;
  Request* r = it->second.get();
  if (r->status == Status::kWaiting) {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r));
  } else {
    blocks_.release(id);
    running_.erase(std::find(running_.begin(), running_.end(), r));
  }
  r->status = Status::kFinished;
  r->finish_reason = FinishReason::kCancelled;
  cancelled_.push_back(id);
  return true;
}

// Preempts the most recently admitted running request: its blocks are released (full computed blocks stay
// hashed in the cache) and it goes to the front of the waiting queue to recompute prompt + generated.
void Scheduler::preempt_last_running(ScheduledBatch& batch) {
  Request* victim = running_.back();
  running_.pop_back();
  blocks_.release(victim->id);
  victim->status = Status::kWaiting;
  victim->num_computed = 0;
  victim->draft.clear();
  waiting_.push_front(victim);
  batch.preempted.push_back(victim->id);
  ++num_preemptions_;
}

void Scheduler::add_chunk(ScheduledBatch& batch, Request* r, int num_tokens, int draft_len) {
  const std::vector<int>& table = blocks_.block_table(r->id);
  const int start = r->num_computed, end = start + num_tokens, known = static_cast<int>(r->tokens.size());
  batch.request_ids.push_back(r->id);
  batch.query_lens.push_back(num_tokens);
  batch.context_lens.push_back(end);
  int block = start / tokens_per_block_, offset = start % tokens_per_block_;  // of position p
  for (int p = start; p < end; ++p) {
    batch.input_ids.push_back(p < known ? r->tokens[p] : r->draft[p - known]);
    batch.positions.push_back(p);
    batch.slot_mapping.push_back(table[block] * tokens_per_block_ + offset);
    if (++offset == tokens_per_block_) offset = 0, ++block;
  }
  batch.sample.push_back(end - draft_len == known);
  batch.draft_lens.push_back(draft_len);
  batch.max_blocks = std::max(batch.max_blocks, static_cast<int32_t>(table.size()));
  in_flight_ids_.push_back(r->id);
  in_flight_query_lens_.push_back(num_tokens);
  in_flight_sample_.push_back(batch.sample.back());
  in_flight_draft_lens_.push_back(draft_len);
}

bool Scheduler::rewind(int64_t id, int num_tokens, const std::vector<Token>& tokens) {
  if (in_flight_) throw std::logic_error("rewind() between schedule() and update(); call it after update()");
  auto it = requests_.find(id);
  if (it == requests_.end() || it->second->status == Status::kFinished) return false;
  Request& r = *it->second;
  if (num_tokens < r.num_prompt_tokens || num_tokens > static_cast<int>(r.tokens.size()))
    throw std::invalid_argument("rewind(): request " + std::to_string(id) + " keeps " + std::to_string(num_tokens) +
                                " tokens; it has " + std::to_string(r.tokens.size()) + ", of which " +
                                std::to_string(r.num_prompt_tokens) + " are its prompt");
  r.tokens.resize(num_tokens);
  r.tokens.insert(r.tokens.end(), tokens.begin(), tokens.end());
  r.draft.clear();
  if (r.status == Status::kRunning) {
    r.num_computed = std::min(r.num_computed, num_tokens);
    blocks_.trim(r.id, r.num_computed);
  }
  return true;
}

bool Scheduler::set_draft(int64_t id, std::vector<Token> draft) {
  auto it = requests_.find(id);
  if (it == requests_.end() || it->second->status != Status::kRunning) return false;
  it->second->draft = std::move(draft);
  return true;
}

ScheduledBatch Scheduler::schedule() {
  if (in_flight_) throw std::logic_error("schedule() called twice; call update() once after every schedule()");
  in_flight_ = true;
  in_flight_ids_.clear();
  in_flight_query_lens_.clear();
  in_flight_sample_.clear();
  in_flight_draft_lens_.clear();
  ScheduledBatch batch;
  const size_t max_rows = std::min<size_t>(running_.size() + waiting_.size(), max_batch_size_);
  batch.request_ids.reserve(max_rows);
  batch.query_lens.reserve(max_rows);
  batch.context_lens.reserve(max_rows);
  batch.sample.reserve(max_rows);
  batch.draft_lens.reserve(max_rows);
  batch.input_ids.reserve(max_num_tokens_);
  batch.positions.reserve(max_num_tokens_);
  batch.slot_mapping.reserve(max_num_tokens_);
  int budget = max_num_tokens_;

  // 1. Decodes (one known token not yet computed), in admission order, each with its draft where the budget
  // and the blocks allow. Preempt from the back when blocks run out. A decode with a draft is a chunk of
  // 1 + k tokens over its cached prefix: it goes after the plain decodes (query_len 1), as prefill chunks do.
  std::vector<Request*> speculating;
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Request* r = running_[i];
    if (r->tokens.size() - r->num_computed != 1) continue;
    std::vector<Token> draft = std::move(r->draft);
    r->draft.clear();
    // The last generated token is never fed: drafts stop one short of max_new_tokens and of max_seq_len.
    const int room = std::min(r->max_new_tokens - r->num_generated(), max_seq_len_ - static_cast<int>(r->tokens.size())) - 1;
    const int k = std::max(0, std::min({static_cast<int>(draft.size()), room, budget - 1}));
    if (k > 0 && blocks_.append_slots(r->id, r->num_computed + 1 + k)) {
      r->draft.assign(draft.begin(), draft.begin() + k);
      speculating.push_back(r);
      budget -= 1 + k;
      continue;
    }
    bool preempted_itself = false;
    while (!preempted_itself && !blocks_.append_slots(r->id, r->num_computed + 1)) {
      preempted_itself = running_.back() == r;
      preempt_last_running(batch);
    }
    if (preempted_itself) break;  // r was the last running request
    add_chunk(batch, r, 1);
    --budget;
  }
  batch.num_decode_tokens = static_cast<int64_t>(batch.request_ids.size());
  for (Request* r : speculating) {
    // A request preempted after its slots were appended is waiting again, its draft dropped.
    if (r->status != Status::kRunning) continue;
    const int k = static_cast<int>(r->draft.size());
    add_chunk(batch, r, 1 + k, k);
  }

  // 2. Chunked prefills already running continue (their blocks were allocated at admission).
  for (Request* r : running_) {
    if (budget == 0) break;
    int remaining = static_cast<int>(r->tokens.size()) - r->num_computed;
    if (remaining <= 1) continue;
    int chunk = std::min(remaining, budget);
    // A prompt's blocks were allocated at admission; tokens appended since (rewind()) may need more.
    if (!blocks_.append_slots(r->id, r->num_computed + chunk)) continue;
    add_chunk(batch, r, chunk);
    budget -= chunk;
  }

  // 3. Waiting requests, first come first served; stop at the first that does not fit.
  while (!waiting_.empty() && budget > 0 && static_cast<int>(running_.size()) < max_batch_size_) {
    Request* r = waiting_.front();
    int reused = blocks_.admit(r->id, r->tokens, r->reuse_prefix, r->salt);
    if (reused < 0) break;
    waiting_.pop_front();
    running_.push_back(r);
    r->status = Status::kRunning;
    r->num_computed = reused;
    reused_tokens_ += reused;
    int chunk = std::min(static_cast<int>(r->tokens.size()) - reused, budget);
    add_chunk(batch, r, chunk);
    budget -= chunk;
  }
  batch.num_prefill_tokens = max_num_tokens_ - budget - batch.num_decode_tokens;

  // Block tables, padded to the longest in the batch (no table changes once its request is scheduled).
  const size_t width = batch.max_blocks;
  batch.block_tables.assign(batch.request_ids.size() * width, -1);
  for (size_t row = 0; row < batch.request_ids.size(); ++row) {
    const std::vector<int>& table = blocks_.block_table(batch.request_ids[row]);
    std::copy(table.begin(), table.end(), batch.block_tables.begin() + row * width);
  }
  return batch;
}

FinishReason Scheduler::check_finish(const Request& r, int64_t token) const {
  if (token == r.end_id) return FinishReason::kEndId;
  const int num_generated = r.num_generated();
  for (const std::vector<Token>& stop : r.stop_words) {
    const int k = static_cast<int>(stop.size());
    if (k <= num_generated && std::equal(stop.begin(), stop.end(), r.tokens.end() - k)) return FinishReason::kStopWords;
  }
  if (num_generated >= r.max_new_tokens) return FinishReason::kLength;
  return FinishReason::kNone;
}

std::vector<StepOutput> Scheduler::update(const std::vector<int64_t>& sampled, const std::vector<int32_t>& counts) {
  if (!in_flight_) throw std::logic_error("update() called without schedule(); call it once after every schedule()");
  const size_t num_sample = std::count(in_flight_sample_.begin(), in_flight_sample_.end(), 1);
  size_t expected = num_sample;
  if (!counts.empty()) {
    if (counts.size() != num_sample)
      throw std::invalid_argument("update() got " + std::to_string(counts.size()) + " counts but the batch has " +
                                  std::to_string(num_sample) + " requests with sample=True; pass one count per such "
                                  "request, in batch order");
    expected = 0;
    for (size_t i = 0, k = 0; i < in_flight_ids_.size(); ++i) {
      if (!in_flight_sample_[i]) continue;
      if (counts[k] < 1 || counts[k] > 1 + in_flight_draft_lens_[i])
        throw std::invalid_argument("update(): request " + std::to_string(in_flight_ids_[i]) + " got " +
                                    std::to_string(counts[k]) + " tokens; it takes 1 to 1 + its " +
                                    std::to_string(in_flight_draft_lens_[i]) + " draft tokens");
      expected += counts[k++];
    }
  }
  if (sampled.size() != expected)
    throw std::invalid_argument("update() got " + std::to_string(sampled.size()) + " tokens but the batch has " +
                                std::to_string(num_sample) + " requests with sample=True" +
                                (counts.empty() ? "" : " taking " + std::to_string(expected)) +
                                "; pass their tokens in batch order");
  in_flight_ = false;
  std::vector<StepOutput> outputs;
  outputs.reserve(expected + cancelled_.size());
  bool any_finished = false;
  for (size_t i = 0, k = 0, t = 0; i < in_flight_ids_.size(); ++i) {
    const bool sample = in_flight_sample_[i];
    const int n = sample ? (counts.empty() ? 1 : counts[k]) : 0;
    const size_t first = t;
    t += n;
    k += sample;
    auto it = requests_.find(in_flight_ids_[i]);
    if (it == requests_.end() || it->second->status != Status::kRunning) continue;  // cancelled meanwhile
    Request& r = *it->second;
    const int draft_len = in_flight_draft_lens_[i];
    // The fed tokens' K/V is kept up to the last accepted draft token; the rejected ones' is dropped.
    r.num_computed += in_flight_query_lens_[i] - draft_len + std::max(n - 1, 0);
    r.draft.clear();
    FinishReason reason = FinishReason::kNone;
    for (int j = 0; j < n && reason == FinishReason::kNone; ++j) {
      const int64_t token = sampled[first + j];
      r.tokens.push_back(static_cast<Token>(token));
      reason = check_finish(r, token);
      outputs.push_back({r.id, token, reason});
    }
    // Tokens after one that finished the request are dropped, and so is their K/V.
    r.num_computed = std::min(r.num_computed, static_cast<int>(r.tokens.size()) - (sample ? 1 : 0));
    blocks_.cache_full_blocks(r.id, r.tokens, r.num_computed);
    if (reason != FinishReason::kNone) {
      blocks_.release(r.id);
      r.status = Status::kFinished;
      r.finish_reason = reason;
      any_finished = true;
    } else if (draft_len > 0) {
      blocks_.trim(r.id, r.num_computed);
    }
  }
  if (any_finished)
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const Request* r) { return r->status == Status::kFinished; }),
                   running_.end());
  for (int64_t id : cancelled_) outputs.push_back({id, -1, FinishReason::kCancelled});
  cancelled_.clear();
  return outputs;
}

const Request& Scheduler::find(int64_t id) const {
  auto it = requests_.find(id);
  if (it == requests_.end()) throw UnknownRequestError("unknown request_id " + std::to_string(id));
  return *it->second;
}

std::vector<Token> Scheduler::output_tokens(int64_t id) const {
  const Request& r = find(id);
  return std::vector<Token>(r.tokens.begin() + r.num_prompt_tokens, r.tokens.end());
}

std::vector<Token> Scheduler::pop(int64_t id) {
  if (find(id).status != Status::kFinished)
    throw std::invalid_argument("request " + std::to_string(id) + " has not finished; cancel() it before pop()");
  std::vector<Token> out = output_tokens(id);
  requests_.erase(id);
  return out;
}

std::vector<int> Scheduler::block_table(int64_t id) const {
  if (!blocks_.has_sequence(id)) return {};
  return blocks_.block_table(id);
}

}  // namespace trtc
