#include "kv/head_map.h"

#include <fstream>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/file.h"
#include "util/json_read.h"

namespace headroom {

using nlohmann::json;

namespace {
constexpr size_t kMaxHeadMapBytes = size_t(16) << 20;

// The "prefill" field of obj (a streaming head or the profile section); window when absent.
PrefillMode prefill_at(const json& obj, const JsonPlace& at) {
  const std::string s = json_string(obj, at, "prefill", "window");
  try {
    return parse_prefill_mode(s);
  } catch (const Error& e) {
    fail("{}: {} \"prefill\": {}", at.file, at.where, e.what());
  }
}
}  // namespace

ModelIdentity ModelIdentity::of(const ModelConfig& c, const gguf::File& f) {
  ModelIdentity id;
  id.arch = c.arch;
  id.n_layer = c.n_layer;
  id.n_head = c.n_head;
  id.n_head_kv = c.n_head_kv;
  id.head_dim = c.head_dim;
  id.n_embd = c.n_embd;
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  for (const gguf::Tensor& t : f.tensors()) {
    mix(t.name.data(), t.name.size());
    mix(&t.type, sizeof t.type);
    mix(t.ne, sizeof t.ne);
  }
  id.tensor_hash = fmt::format("{:016x}", h);
  return id;
}

std::string ModelIdentity::mismatch(const ModelIdentity& o) const {
  if (arch != o.arch) return fmt::format("architecture {} vs {}", o.arch, arch);
  auto shape = [](const ModelIdentity& m) {
    return fmt::format("{} layers x {} KV heads x {} dims (embd {}, {} heads)", m.n_layer, m.n_head_kv, m.head_dim,
                       m.n_embd, m.n_head);
  };
  if (shape(*this) != shape(o)) return fmt::format("shape {} vs {}", shape(o), shape(*this));
  if (tensor_hash != o.tensor_hash) return fmt::format("tensor table hash {} vs {}", o.tensor_hash, tensor_hash);
  return "";
}

HeadMap HeadMap::uniform(const ModelIdentity& id, const PolicySpec& spec) {
  HeadMap m;
  m.model = id;
  m.heads.assign(size_t(id.n_layer) * id.n_head_kv, HeadEntry{spec});
  return m;
}

int HeadMap::count(PolicyKind k) const {
  int n = 0;
  for (const HeadEntry& e : heads) n += e.spec.kind == k;
  return n;
}

std::string HeadMap::to_json() const {
  json j;
  j["format"] = "headroom-head-map-1";
  j["model"] = {{"arch", model.arch}, {"n_layer", model.n_layer}, {"n_head", model.n_head},
                {"n_head_kv", model.n_head_kv}, {"head_dim", model.head_dim}, {"n_embd", model.n_embd},
                {"tensor_hash", model.tensor_hash}};
  j["note"] = note;
  if (profile_window > 0)
    j["profile"] = {{"sinks", profile_sinks}, {"window", profile_window}, {"prefill", prefill_mode_name(profile_prefill)}};
  json hs = json::array();
  for (int l = 0; l < model.n_layer; ++l)
    for (int h = 0; h < model.n_head_kv; ++h) {
      const HeadEntry& e = at(l, h);
      json x = {{"layer", l}, {"kv_head", h}, {"policy", policy_name(e.spec.kind)}};
      policy_descriptor(e.spec.kind).to_json(e.spec, x);
      if (e.retrieval_score >= 0) x["retrieval_score"] = e.retrieval_score;
      if (e.streaming_error >= 0) x["streaming_error"] = e.streaming_error;
      if (e.query_error >= 0) x["query_error"] = e.query_error;
      if (e.ablation >= 0) x["ablation"] = e.ablation;
      if (e.gain >= 0) x["gain"] = e.gain;
      hs.push_back(x);
    }
  j["heads"] = hs;
  return j.dump(1);
}

void HeadMap::save(const std::string& path) const {
  std::ofstream f(path);
  if (!f) fail("{}: cannot open for writing", path);
  f << to_json() << "\n";
  if (!f) fail("{}: write failed", path);
}

HeadMap HeadMap::load(const std::string& path, const ModelIdentity* expect) {
  return parse(read_text_file(path, "head map", kMaxHeadMapBytes), path, expect);
}

HeadMap HeadMap::parse(const std::string& text, const std::string& path, const ModelIdentity* expect) {
  HeadMap m;
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail("{}: invalid head map JSON: {}", path, e.what());
  }
  JsonPlace top{path, "the top level"};
  if (!j.is_object() || json_string(j, top, "format", "") != "headroom-head-map-1")
    fail("{}: not a headroom head map (format field)", path);
  JsonPlace at{path, "model"};
  const json& mj = json_child(j, top, "model", false);
  m.model.arch = json_string(mj, at, "arch");
  m.model.n_layer = int(json_int(mj, at, "n_layer", {1, 4096}));
  m.model.n_head = int(json_int(mj, at, "n_head", {1, 4096}));
  m.model.n_head_kv = int(json_int(mj, at, "n_head_kv", {1, 4096}));
  m.model.head_dim = int(json_int(mj, at, "head_dim", {1, 65536}));
  m.model.n_embd = int(json_int(mj, at, "n_embd", {1, 1 << 20}));
  m.model.tensor_hash = json_string(mj, at, "tensor_hash");
  if (m.model.n_layer * int64_t(m.model.n_head_kv) > 1 << 20)
    fail("{}: model: {} layers x {} KV heads is more than {} heads", path, m.model.n_layer, m.model.n_head_kv, 1 << 20);
  m.note = json_string(j, top, "note", "");
  const NumRange tokens{1, double(kMaxContext)};
  if (j.contains("profile")) {
    JsonPlace pat{path, "profile"};
    const json& pj = json_child(j, top, "profile", false);
    m.profile_sinks = int(json_int(pj, pat, "sinks", {0, double(kMaxContext)}));
    m.profile_window = int(json_int(pj, pat, "window", tokens));
    m.profile_prefill = prefill_at(pj, pat);
  }
  m.heads.assign(size_t(m.model.n_layer) * m.model.n_head_kv, HeadEntry{});
  std::vector<uint8_t> seen(m.heads.size(), 0);
  const json& hs = json_child(j, top, "heads", true);
  for (size_t i = 0; i < hs.size(); ++i) {
    const json& x = hs[i];
    JsonPlace hat{path, fmt::format("heads[{}]", i)};
    const int l = int(json_int(x, hat, "layer", {0, double(m.model.n_layer - 1)}));
    const int h = int(json_int(x, hat, "kv_head", {0, double(m.model.n_head_kv - 1)}));
    if (seen[size_t(l) * m.model.n_head_kv + h]++) fail("{}: {}: duplicate entry for layer {} kv_head {}", path, hat.where, l, h);
    HeadEntry& e = m.at(l, h);
    const std::string policy = json_string(x, hat, "policy");
    try {
      e.spec.kind = parse_policy_kind(policy);
    } catch (const Error& err) {
      fail("{}: {} \"policy\": {}", path, hat.where, err.what());
    }
    policy_descriptor(e.spec.kind).from_json(x, e.spec, hat);  // the kind's own fields, range-checked
    const NumRange score{-1, 1e9};  // -1: not profiled
    e.retrieval_score = json_real(x, hat, "retrieval_score", score, -1.0);
    e.streaming_error = json_real(x, hat, "streaming_error", score, -1.0);
    e.query_error = json_real(x, hat, "query_error", score, -1.0);
    e.ablation = json_real(x, hat, "ablation", score, -1.0);
    e.gain = json_real(x, hat, "gain", score, -1.0);
  }
  for (size_t i = 0; i < seen.size(); ++i)
    if (!seen[i]) fail("{}: no entry for layer {} kv_head {}", path, i / m.model.n_head_kv, i % m.model.n_head_kv);
  if (expect) {
    std::string mm = expect->mismatch(m.model);
    if (!mm.empty()) fail("{}: head map was made for another model: {}", path, mm);
  }
  return m;
}

std::vector<PolicySpec> HeadMap::specs() const {
  std::vector<PolicySpec> out;
  out.reserve(heads.size());
  for (const HeadEntry& e : heads) out.push_back(e.spec);
  return out;
}

}  // namespace headroom
