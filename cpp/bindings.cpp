// Python bindings: trtc._core. One crossing per scheduler call; batches come back as numpy arrays.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "block_manager.h"
#include "scheduler.h"

namespace nb = nanobind;
using namespace nb::literals;
using trtc::BlockManager;
using trtc::Scheduler;

namespace {

// Moves `v` to the heap and returns a numpy array that owns it. shape: row-major, product == v.size().
template <typename T, typename PyT = T>
nb::object to_numpy(std::vector<T>&& v, std::initializer_list<size_t> shape) {
  static T empty_storage{};  // numpy wants a non-null pointer even for zero elements
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  T* data = heap->empty() ? &empty_storage : heap->data();
  return nb::cast(nb::ndarray<nb::numpy, PyT>(reinterpret_cast<PyT*>(data), shape, owner));
}

// The Python face of trtc::ScheduledBatch: numpy arrays built once per schedule().
struct PyScheduledBatch {
  nb::object request_ids, query_lens, context_lens, input_ids, positions, slot_mapping, block_tables, sample, draft_lens;
  int64_t num_prefill_tokens, num_decode_tokens;
  std::vector<int64_t> preempted;

  explicit PyScheduledBatch(trtc::ScheduledBatch&& b) {
    const size_t B = b.request_ids.size(), T = b.input_ids.size();
    request_ids = to_numpy(std::move(b.request_ids), {B});
    query_lens = to_numpy(std::move(b.query_lens), {B});
    context_lens = to_numpy(std::move(b.context_lens), {B});
    input_ids = to_numpy(std::move(b.input_ids), {T});
    positions = to_numpy(std::move(b.positions), {T});
    slot_mapping = to_numpy(std::move(b.slot_mapping), {T});
    block_tables = to_numpy(std::move(b.block_tables), {B, static_cast<size_t>(b.max_blocks)});
    sample = to_numpy<uint8_t, bool>(std::move(b.sample), {B});
    draft_lens = to_numpy(std::move(b.draft_lens), {B});
    num_prefill_tokens = b.num_prefill_tokens;
    num_decode_tokens = b.num_decode_tokens;
    preempted = std::move(b.preempted);
  }
};

template <typename T>
std::vector<int64_t> to_vector(const nb::ndarray<const T, nb::ndim<1>, nb::device::cpu>& a) {
  std::vector<int64_t> out(a.shape(0));
  auto view = a.view();
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int64_t>(view(i));
  return out;
}

nb::list outputs_to_list(const std::vector<trtc::StepOutput>& outputs) {
  // Plain strings, not static Python objects: those would be released after the interpreter has
  // ended (Python >= 3.12 frees its allocator then, and the process crashes at exit).
  static const char* const names[] = {"", "end_id", "stop_words", "length", "cancelled"};
  nb::list out;
  for (const trtc::StepOutput& o : outputs) {
    nb::object reason = o.finish_reason == trtc::FinishReason::kNone
                            ? nb::none()
                            : nb::object(nb::str(names[static_cast<int>(o.finish_reason)]));
    out.append(nb::make_tuple(o.request_id, o.token, reason));
  }
  return out;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "trtc runtime core: KV-cache block manager and in-flight-batching scheduler (pure C++).";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const trtc::UnknownRequestError& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });

  nb::class_<BlockManager>(m, "BlockManager", "Paged KV-cache block pool with prefix reuse (see cpp/block_manager.h).")
      .def(nb::init<int, int, bool, int>(), "num_blocks"_a, "tokens_per_block"_a, "enable_prefix_reuse"_a = true,
           "hash_bits"_a = 64)
      .def("admit", &BlockManager::admit, "seq_id"_a, "tokens"_a, "reuse_prefix"_a = true, "salt"_a = uint64_t{0})
      .def("append_slots", &BlockManager::append_slots, "seq_id"_a, "num_tokens"_a)
      .def("cache_full_blocks", &BlockManager::cache_full_blocks, "seq_id"_a, "tokens"_a, "num_computed"_a)
      .def("release", &BlockManager::release, "seq_id"_a)
      .def("has_sequence", &BlockManager::has_sequence, "seq_id"_a)
      .def("block_table", [](const BlockManager& bm, int64_t id) { return bm.block_table(id); }, "seq_id"_a)
      .def("ref_count", &BlockManager::ref_count, "block_id"_a)
      .def("is_hashed", &BlockManager::is_hashed, "block_id"_a)
      .def("hash_block",
           [](const BlockManager& bm, uint64_t parent, const std::vector<trtc::Token>& tokens) {
             if (static_cast<int>(tokens.size()) != bm.tokens_per_block())
               throw std::invalid_argument("hash_block takes exactly tokens_per_block tokens");
             return bm.hash_block(parent, tokens.data());
           },
           "parent_hash"_a, "tokens"_a)
      .def_prop_ro("num_blocks", &BlockManager::num_blocks)
      .def_prop_ro("tokens_per_block", &BlockManager::tokens_per_block)
      .def_prop_ro("num_free_blocks", &BlockManager::num_free_blocks)
      .def_prop_ro("num_cached_blocks", &BlockManager::num_cached_blocks)
      .def_prop_ro("num_used_blocks", &BlockManager::num_used_blocks);

  // A numpy field of ScheduledBatch with its type in the generated stub (trtc/_core.pyi).
#define TRTC_ARRAY_FIELD(name, dtype, doc)                                                        \
  def_prop_ro(#name, [](const PyScheduledBatch& b) { return b.name; },                             \
              nb::for_getter(nb::sig("def " #name "(self, /) -> numpy.typing.NDArray[numpy." dtype "]")), \
              nb::for_getter(doc))
  nb::class_<PyScheduledBatch>(m, "ScheduledBatch",
                               "One step's batch: B requests, decodes first, then prefill chunks; T = sum(query_lens) "
                               "tokens. Arrays are numpy, own their memory and stay valid after the next schedule().")
      .TRTC_ARRAY_FIELD(request_ids, "int64", "[B] the scheduled requests")
      .TRTC_ARRAY_FIELD(query_lens, "int32", "[B] tokens fed this step (1 for a decode, a chunk for a prefill)")
      .TRTC_ARRAY_FIELD(context_lens, "int32", "[B] K/V length after this step: tokens already cached + query_len")
      .TRTC_ARRAY_FIELD(input_ids, "int32", "[T] the requests' fed tokens, concatenated in batch order")
      .TRTC_ARRAY_FIELD(positions, "int32", "[T] absolute position of each fed token")
      .TRTC_ARRAY_FIELD(slot_mapping, "int32",
                        "[T] block_id * tokens_per_block + offset: where each fed token's K/V is written")
      .TRTC_ARRAY_FIELD(block_tables, "int32", "[B, max_blocks_in_batch] block ids per request, padded with -1")
      .TRTC_ARRAY_FIELD(sample, "bool", "[B] this chunk reaches the last known token: the request yields a token")
      .TRTC_ARRAY_FIELD(draft_lens, "int32", "[B] draft tokens fed after the last known token (0: none); each "
                        "fed token from the last known one on wants its logits (1 + draft_len rows)")
      .def_ro("num_prefill_tokens", &PyScheduledBatch::num_prefill_tokens)
      .def_ro("num_decode_tokens", &PyScheduledBatch::num_decode_tokens,
              "the first num_decode_tokens requests are the decodes")
      .def_ro("preempted", &PyScheduledBatch::preempted, "requests preempted by this schedule()")
      .def("__len__", [](const PyScheduledBatch& b) { return nb::len(b.request_ids); })
      .def("__repr__", [](const PyScheduledBatch& b) {
        return "ScheduledBatch(batch_size=" + std::to_string(nb::len(b.request_ids)) +
               ", num_decode_tokens=" + std::to_string(b.num_decode_tokens) +
               ", num_prefill_tokens=" + std::to_string(b.num_prefill_tokens) +
               ", preempted=" + std::to_string(b.preempted.size()) + ")";
      });
#undef TRTC_ARRAY_FIELD

  nb::class_<Scheduler>(
      m, "Scheduler",
      "In-flight batching over the paged KV cache. One executor step crosses into C++ twice, with batched "
      "data: batch = schedule(); run the model and sample a token for each request with batch.sample set; "
      "update(tokens) -> (request_id, token, finish_reason | None) per sampled request.\n\n"
      "num_blocks x tokens_per_block is the KV-cache pool; max_num_tokens is the token budget per step (tokens "
      "fed), max_batch_size the requests per step. hash_bits truncates block hashes (a test hook only).")
      .def(nb::init<int, int, int, int, int, bool, int>(), "num_blocks"_a, "tokens_per_block"_a, "max_batch_size"_a,
           "max_num_tokens"_a, "max_seq_len"_a, "enable_prefix_reuse"_a = true, nb::kw_only(), "hash_bits"_a = 64)
      .def("add_request", &Scheduler::add_request, "request_id"_a, "prompt"_a, "max_new_tokens"_a, "end_id"_a = -1,
           "stop_words"_a = std::vector<std::vector<trtc::Token>>{}, "reuse_prefix"_a = true, "salt"_a = uint64_t{0},
           "Queue a request (first come, first served); reuse_prefix=False computes every prompt token (none "
           "taken from cached blocks; its own full blocks are still cached for others). salt keys its blocks in the "
           "prefix cache besides their tokens (a LoRA adapter: only requests of the same salt share blocks; 0 for "
           "none). ValueError for an empty prompt, a duplicate id, "
           "max_new_tokens < 1, a prompt of max_seq_len tokens or more, a prompt that could never fit the pool, an "
           "empty stop word. max_new_tokens is clipped so that prompt + generated <= max_seq_len and the request "
           "alone always fits the pool (it then finishes with \"length\").")
      .def("cancel", &Scheduler::cancel, "request_id"_a,
           "True if the request was waiting or running: its blocks are freed at once and the next update() "
           "reports (request_id, -1, \"cancelled\"). A request cancelled between schedule() and update() is "
           "skipped by update().")
      .def("schedule", [](Scheduler& s) { return PyScheduledBatch(s.schedule()); },
           "One step: (1) running decodes in admission order, preempting the most recently admitted running "
           "request when a block is missing (its full computed blocks stay cached; it re-queues at the front and "
           "later recomputes prompt + generated); (2) running chunked prefills continue; (3) waiting requests are "
           "admitted first come first served while batch slots, token budget and blocks allow. A new request "
           "reuses cached full blocks of a matching prefix.")
      .def("rewind", &Scheduler::rewind, "request_id"_a, "num_tokens"_a, "tokens"_a,
           "A draft model's mirror of a target request: keep its first num_tokens tokens (and their K/V: tail "
           "blocks freed), then append `tokens` as known tokens to compute. False unless running or waiting.")
      .def("set_draft", &Scheduler::set_draft, "request_id"_a, "draft"_a,
           "Speculation: the next schedule() feeds `draft` after the request's last known token if it is decoding "
           "then (clipped to its max_new_tokens, max_seq_len and the step's token budget; dropped when its blocks "
           "do not fit). False, and nothing kept, unless the request is running.")
      .def("update", [](Scheduler& s, nb::ndarray<const int64_t, nb::ndim<1>, nb::device::cpu> t,
                        const std::vector<int32_t>& counts) { return outputs_to_list(s.update(to_vector(t), counts)); },
           "tokens"_a, "counts"_a = std::vector<int32_t>{})
      .def("update", [](Scheduler& s, nb::ndarray<const int32_t, nb::ndim<1>, nb::device::cpu> t,
                        const std::vector<int32_t>& counts) { return outputs_to_list(s.update(to_vector(t), counts)); },
           "tokens"_a, "counts"_a = std::vector<int32_t>{})
      .def("update", [](Scheduler& s, const std::vector<int64_t>& t, const std::vector<int32_t>& counts) {
             return outputs_to_list(s.update(t, counts));
           }, "tokens"_a, "counts"_a = std::vector<int32_t>{},
           nb::sig("def update(self, tokens: collections.abc.Sequence[int], counts: collections.abc.Sequence[int] = []) "
                   "-> list[tuple[int, int, str | None]]"),
           "Call exactly once after every schedule(). tokens: one per request with sample set, in batch order "
           "(a list, or a numpy / CPU torch int array); with counts, counts[k] tokens for the k-th such request: 1 "
           "+ the draft tokens it accepted (its K/V past them is dropped). Returns one tuple per token in batch order, then "
           "one (request_id, -1, \"cancelled\") per request cancelled since the last update(). finish_reason is "
           "\"end_id\" (token == end_id, included), \"stop_words\" (the generated tokens end with a stop word, "
           "included) or \"length\". Finished requests free their blocks (full hashed blocks stay cached).")
      .def("has_unfinished", &Scheduler::has_unfinished,
           "True while requests wait or run, or a cancellation is still to be reported by update().")
      .def("num_waiting", &Scheduler::num_waiting)
      .def("num_running", &Scheduler::num_running)
      .def("output_tokens", &Scheduler::output_tokens, "request_id"_a,
           "Tokens generated so far; kept after the request finishes until pop(request_id).")
      .def("pop", &Scheduler::pop, "request_id"_a)
      .def("block_table", &Scheduler::block_table, "request_id"_a, "The request's block ids; empty unless running.")
      .def("record_kv_events", [](Scheduler& s, bool on) { s.block_manager().record_kv_events(on); }, "on"_a = true,
           "Keep an event for every block registered for prefix reuse and every registered block evicted, until "
           "take_kv_events(); off drops those kept.")
      .def("take_kv_events", [](Scheduler& s) {
             nb::list out;
             for (const trtc::KvEvent& e : s.block_manager().take_kv_events()) {
               // Signed 64-bit hashes, as routers that keep them in an i64 take them.
               const int64_t hash = static_cast<int64_t>(e.hash), parent = static_cast<int64_t>(e.parent_hash);
               if (e.stored)
                 out.append(nb::make_tuple(true, hash, e.parent_hash ? nb::cast(parent) : nb::none(), e.tokens));
               else
                 out.append(nb::make_tuple(false, hash, nb::none(), nb::list()));
             }
             return out;
           }, nb::sig("def take_kv_events(self) -> list[tuple[bool, int, int | None, list[int]]]"),
           "The events since the last call, in order: (True, hash, parent hash or None for a first block, its "
           "tokens) for a block registered, (False, hash, None, []) for one evicted. Hashes are signed 64-bit.")
      .def("stats", [](const Scheduler& s) {
        const BlockManager& bm = s.block_manager();
        nb::dict d;
        d["num_blocks"] = bm.num_blocks();
        d["free_blocks"] = bm.num_free_blocks();
        d["used_blocks"] = bm.num_used_blocks();
        d["cached_blocks"] = bm.num_cached_blocks();
        d["reused_tokens"] = s.reused_tokens();
        d["num_preemptions"] = s.num_preemptions();
        return d;
      }, nb::sig("def stats(self) -> dict[str, int]"),
      "num_blocks, free_blocks, used_blocks, cached_blocks (the three always sum to num_blocks), reused_tokens "
      "(tokens served from cached blocks), num_preemptions.");
}
