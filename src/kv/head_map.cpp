#include "kv/head_map.h"

#include <fstream>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/file.h"

namespace headroom {

using nlohmann::json;

namespace {
constexpr size_t kMaxHeadMapBytes = size_t(16) << 20;
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
      switch (e.spec.kind) {
        case PolicyKind::Full: break;
        case PolicyKind::Streaming:
          x["sinks"] = e.spec.sinks;
          x["window"] = e.spec.window;
          if (e.spec.prefill != PrefillMode::Window) x["prefill"] = prefill_mode_name(e.spec.prefill);
          break;
        case PolicyKind::TopK: x["topk_pages"] = e.spec.topk_pages; x["recent_pages"] = e.spec.recent_pages; break;
        case PolicyKind::Evict: x["budget"] = e.spec.budget; x["sinks"] = e.spec.sinks; x["window"] = e.spec.window; break;
      }
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
  const std::string text = read_text_file(path, "head map", kMaxHeadMapBytes);
  HeadMap m;
  try {
    json j = json::parse(text);
    if (j.value("format", "") != "headroom-head-map-1") fail("not a headroom head map (format field)");
    const json& mj = j.at("model");
    m.model.arch = mj.at("arch").get<std::string>();
    m.model.n_layer = mj.at("n_layer").get<int>();
    m.model.n_head = mj.at("n_head").get<int>();
    m.model.n_head_kv = mj.at("n_head_kv").get<int>();
    m.model.head_dim = mj.at("head_dim").get<int>();
    m.model.n_embd = mj.at("n_embd").get<int>();
    m.model.tensor_hash = mj.at("tensor_hash").get<std::string>();
    m.note = j.value("note", "");
    if (j.contains("profile")) {
      m.profile_sinks = j["profile"].at("sinks").get<int>();
      m.profile_window = j["profile"].at("window").get<int>();
      m.profile_prefill = parse_prefill_mode(j["profile"].value("prefill", std::string("window")));
    }
    if (m.model.n_layer <= 0 || m.model.n_head_kv <= 0 || m.model.n_layer * int64_t(m.model.n_head_kv) > 1 << 20)
      fail("bad model shape");
    m.heads.assign(size_t(m.model.n_layer) * m.model.n_head_kv, HeadEntry{});
    std::vector<uint8_t> seen(m.heads.size(), 0);
    for (const json& x : j.at("heads")) {
      int l = x.at("layer").get<int>(), h = x.at("kv_head").get<int>();
      if (l < 0 || l >= m.model.n_layer || h < 0 || h >= m.model.n_head_kv)
        fail("head entry (layer {}, kv_head {}) out of range", l, h);
      HeadEntry& e = m.at(l, h);
      if (seen[size_t(l) * m.model.n_head_kv + h]++) fail("duplicate entry for layer {} kv_head {}", l, h);
      e.spec.kind = parse_policy_kind(x.at("policy").get<std::string>());
      e.spec.sinks = x.value("sinks", e.spec.sinks);
      e.spec.window = x.value("window", e.spec.window);
      e.spec.topk_pages = x.value("topk_pages", e.spec.topk_pages);
      e.spec.recent_pages = x.value("recent_pages", e.spec.recent_pages);
      e.spec.budget = x.value("budget", e.spec.budget);
      e.spec.prefill = parse_prefill_mode(x.value("prefill", std::string("window")));
      if (e.spec.sinks < 0 || e.spec.window < 1 || e.spec.topk_pages < 1 || e.spec.recent_pages < 1 || e.spec.budget < 1)
        fail("bad policy parameters for layer {} kv_head {}", l, h);
      e.retrieval_score = x.value("retrieval_score", -1.0);
      e.streaming_error = x.value("streaming_error", -1.0);
      e.query_error = x.value("query_error", -1.0);
      e.ablation = x.value("ablation", -1.0);
      e.gain = x.value("gain", -1.0);
    }
    for (size_t i = 0; i < seen.size(); ++i)
      if (!seen[i]) fail("no entry for layer {} kv_head {}", i / m.model.n_head_kv, i % m.model.n_head_kv);
  } catch (const json::exception& e) {
    fail("{}: invalid head map JSON: {}", path, e.what());
  } catch (const Error& e) {
    if (std::string(e.what()).rfind(path, 0) == 0) throw;
    fail("{}: {}", path, e.what());
  }
  if (expect) {
    std::string mm = expect->mismatch(m.model);
    if (!mm.empty()) fail("{}: head map was made for another model: {}", path, mm);
  }
  return m;
}

}  // namespace headroom
