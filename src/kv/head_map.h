// HeadMap: a policy (and its parameters and profile scores) for every (layer, KV head) of one model, stored
// as JSON. It records the model's identity (arch, shape and a hash of the tensor table) so that a map made
// for another model is refused with one line naming the mismatch.
#pragma once

#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "kv/policy.h"
#include "model/config.h"

namespace headroom {

struct ModelIdentity {
  std::string arch;
  int n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_embd = 0;
  std::string tensor_hash;  // FNV-1a 64 of every tensor's name, type and shape, as hex
  static ModelIdentity of(const ModelConfig& c, const gguf::File& f);
  // Empty if equal, else one line naming the first difference.
  std::string mismatch(const ModelIdentity& other) const;
};

struct HeadEntry {
  PolicySpec spec;
  double retrieval_score = -1;  // -1: not profiled
  double streaming_error = -1;
  double ablation = -1;         // answer log-prob drop (nats) with only this head streaming
  double gain = -1;             // answer log-prob gain of making it full next to the top head
  double query_error = -1;      // streaming error at the question/answer rows of retrieval probes
};

struct HeadMap {
  ModelIdentity model;
  std::string note;                // how it was made (profile target, etc.)
  int profile_sinks = 0, profile_window = 0;  // the profiler's minimum streaming shape (0: not profiled)
  PrefillMode profile_prefill = PrefillMode::Window;  // the streaming heads' prefill the profiler chose
  std::vector<HeadEntry> heads;    // [layer * n_head_kv + kv_head]

  int n_layer() const { return model.n_layer; }
  int n_head_kv() const { return model.n_head_kv; }
  HeadEntry& at(int layer, int h) { return heads[size_t(layer) * model.n_head_kv + h]; }
  const HeadEntry& at(int layer, int h) const { return heads[size_t(layer) * model.n_head_kv + h]; }

  static HeadMap uniform(const ModelIdentity& id, const PolicySpec& spec);
  // Throws Error: unreadable file, bad JSON, or (if `expect` is given) a map made for another model.
  static HeadMap load(const std::string& path, const ModelIdentity* expect);
  // The same from the JSON text; `path` names it in messages. Every field is type- and range-checked.
  static HeadMap parse(const std::string& text, const std::string& path, const ModelIdentity* expect);
  void save(const std::string& path) const;
  std::string to_json() const;
  int count(PolicyKind k) const;
  std::vector<PolicySpec> specs() const;  // every head's spec, [layer * n_head_kv + kv_head]
};

}  // namespace headroom
