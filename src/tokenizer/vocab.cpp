// Loading and validating tokenizer.ggml.* (see vocab.h). Follows llama_vocab::impl::load in llama.cpp's
// src/llama-vocab.cpp where it matters for tokenization; differences are commented.
#include "tokenizer/vocab.h"

#include <algorithm>
#include <cctype>

#include "util/error.h"
#include "util/escape.h"

namespace headroom::tok {

namespace {

const gguf::Value* find_array(const gguf::File& f, std::string_view key) {
  const gguf::Value* v = f.find(key);
  if (v && v->type != gguf::ValueType::ARRAY)
    fail("{}: metadata '{}' must be an array, found {}", f.path(), key, gguf::value_type_name(v->type));
  return v;
}

uint32_t attr_of_type(int64_t type) {
  switch (type) {
    case kUnknown:
      return kAttrUnknown;
    case kUnused:
      return kAttrUnused;
    case kNormal:
      return kAttrNormal;
    case kControl:
      return kAttrControl;
    case kUserDefined:
      return kAttrUserDefined;
    case kByte:
      return kAttrByte;
    default:
      return kAttrUndefined;  // as llama.cpp: unknown types are "undefined" and print nothing
  }
}

// A special token id from metadata: missing -> the default; -1 (or 0xFFFFFFFF as uint32, which some
// converters write for "none") -> none; any other value out of range is an error. (llama.cpp only warns and
// keeps the default; a bad id here most likely means a broken file, so we refuse it.)
int32_t read_id(const gguf::File& f, std::string_view key, int32_t def, int32_t n) {
  if (def >= n) def = -1;  // llama.cpp disables default ids that fall outside a small vocab
  const gguf::Value* v = f.find(key);
  if (!v) return def;
  if (!v->is_int())
    fail("{}: metadata '{}' must be an integer, found {}", f.path(), key, gguf::value_type_name(v->type));
  int64_t id;
  if (v->type == gguf::ValueType::UINT64 || v->type == gguf::ValueType::UINT32) {
    if (v->u == 0xFFFFFFFFull || v->u == ~0ull) return -1;
    if (v->u >= static_cast<uint64_t>(n))
      fail("{}: {} = {} is out of range (vocab has {} tokens)", f.path(), key, v->u, n);
    id = static_cast<int64_t>(v->u);
  } else {
    id = v->as_int();
  }
  if (id == -1) return -1;
  if (id < 0 || id >= n) fail("{}: {} = {} is out of range (vocab has {} tokens)", f.path(), key, id, n);
  return static_cast<int32_t>(id);
}

bool contains_ci(std::string s, std::string_view what) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s.find(what) != std::string::npos;
}

}  // namespace

Vocab Vocab::load(const gguf::File& f, const std::string& model, bool default_add_bos, int32_t default_bos,
                  int32_t default_eos, int32_t default_unk) {
  Vocab v;
  v.model = model;

  const gguf::Value* tokens = find_array(f, "tokenizer.ggml.tokens");
  if (!tokens) fail("{}: tokenizer.ggml.tokens is missing (no vocabulary in this file)", f.path());
  if (tokens->elem_type != gguf::ValueType::STRING)
    fail("{}: tokenizer.ggml.tokens must be an array of strings, found {}", f.path(),
         gguf::value_type_name(tokens->elem_type));
  if (tokens->size() == 0) fail("{}: tokenizer.ggml.tokens is empty", f.path());
  if (tokens->size() > static_cast<uint64_t>(INT32_MAX))
    fail("{}: tokenizer.ggml.tokens has too many entries ({})", f.path(), tokens->size());
  const auto n = static_cast<int32_t>(tokens->size());

  const gguf::Value* scores = find_array(f, "tokenizer.ggml.scores");
  if (scores) {
    if (!(scores->elem_type == gguf::ValueType::FLOAT32 || scores->elem_type == gguf::ValueType::FLOAT64 ||
          scores->elem_type == gguf::ValueType::INT32))
      fail("{}: tokenizer.ggml.scores must be an array of floats, found {}", f.path(),
           gguf::value_type_name(scores->elem_type));
    if (scores->size() != tokens->size())
      fail("{}: tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {}", f.path(), scores->size(),
           n);
  }
  const gguf::Value* types = find_array(f, "tokenizer.ggml.token_type");
  if (types) {
    if (types->elem_type != gguf::ValueType::INT32 && types->elem_type != gguf::ValueType::UINT32)
      fail("{}: tokenizer.ggml.token_type must be an array of int32, found {}", f.path(),
           gguf::value_type_name(types->elem_type));
    if (types->size() != tokens->size())
      fail("{}: tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}", f.path(), types->size(),
           n);
  }

  v.pieces.resize(n);
  v.scores.assign(n, 0.0f);
  v.attrs.assign(n, kAttrNormal);
  v.ids.reserve(static_cast<size_t>(n) * 2);
  for (int32_t i = 0; i < n; ++i) {
    std::string word(tokens->str_at(i));
    if (word.empty()) word = "[EMPTY_" + std::to_string(i) + "]";  // as llama.cpp
    auto [it, inserted] = v.ids.emplace(word, i);
    if (!inserted)
      fail("{}: duplicate token in vocabulary: '{}' has ids {} and {}", f.path(), escape_control(word), it->second, i);
    v.pieces[i] = std::move(word);
    if (scores) v.scores[i] = static_cast<float>(scores->float_at(i));  // f32, f64 or i32 (checked above)
    if (types) v.attrs[i] = attr_of_type(types->int_at(i));              // i32 or u32 (checked above)
  }

  v.bos = read_id(f, "tokenizer.ggml.bos_token_id", default_bos, n);
  v.eos = read_id(f, "tokenizer.ggml.eos_token_id", default_eos, n);
  v.unk = read_id(f, "tokenizer.ggml.unknown_token_id", default_unk, n);
  v.pad = read_id(f, "tokenizer.ggml.padding_token_id", -1, n);
  v.eot = read_id(f, "tokenizer.ggml.eot_token_id", -1, n);
  v.eom = read_id(f, "tokenizer.ggml.eom_token_id", -1, n);
  read_id(f, "tokenizer.ggml.seperator_token_id", -1, n);  // checked only
  v.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", default_add_bos);
  v.add_eos = f.get_bool("tokenizer.ggml.add_eos_token", false);
  v.chat_template = f.get_str("tokenizer.chat_template", "");
  if (v.add_bos && v.bos < 0) fail("{}: tokenizer.ggml.add_bos_token is true, but there is no BOS token", f.path());
  if (v.add_eos && v.eos < 0) fail("{}: tokenizer.ggml.add_eos_token is true, but there is no EOS token", f.path());

  // End-of-generation tokens, found by text as llama.cpp does (tokens that look like control tokens become
  // control tokens, so that they are not printed and not matched in text unless parse_special).
  static const char* const kEotTexts[] = {
      "<|eot_id|>",        "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
      "<|end_of_text|>",   "<EOT>",      "_<EOT>",  "[EOT]",         "<｜end▁of▁sentence｜>" /* DeepSeek */,
      "<end_of_utterance>"};
  static const char* const kEogTexts[] = {"<|eom_id|>", "</s>", "[EOS]", "<eos>"};
  static const char* const kFimEogTexts[] = {"<|fim_pad|>",   "<fim-pad>",  "<fim_pad>", "<PAD>",      "<|fim_repo|>",
                                             "<|repo_name|>", "<fim-repo>", "<REPO>",    "<reponame>", "<|file_sep|>"};
  v.eog.assign(n, 0);
  auto mark_eog = [&](const char* text, bool make_control) {
    int32_t id = v.find(text);
    if (id < 0) return;
    v.eog[id] = 1;
    if (make_control) v.attrs[id] |= kAttrControl;
  };
  for (const char* t : kEotTexts) {
    int32_t id = v.find(t);
    if (id >= 0 && v.eot < 0) v.eot = id;
    mark_eog(t, true);
  }
  for (const char* t : kEogTexts) mark_eog(t, true);
  for (const char* t : kFimEogTexts) mark_eog(t, true);
  for (int32_t id : {v.eos, v.eot, v.eom})
    if (id >= 0) v.eog[id] = 1;

  // llama.cpp: phi-3 files mark their special tokens rstrip (the HF tokenizer eats the whitespace after
  // them), except <unk>, <s> and <|endoftext|>; </s> is rstrip too.
  const std::string name = f.get_str("general.name", "");
  const bool phi3 = contains_ci(name, "phi-3") || contains_ci(name, "phi3");

  for (int32_t id = 0; id < n; ++id)
    if (v.attrs[id] & (kAttrControl | kAttrUserDefined | kAttrUnknown)) v.specials.push_back(id);
  std::stable_sort(v.specials.begin(), v.specials.end(),
                   [&](int32_t a, int32_t b) { return v.pieces[a].size() > v.pieces[b].size(); });
  if (phi3) {
    for (int32_t id : v.specials) v.attrs[id] |= kAttrRstrip;
    if (int32_t id = v.find("</s>"); id >= 0) v.attrs[id] |= kAttrRstrip;
    for (const char* t : {"<unk>", "<s>", "<|endoftext|>"})
      if (int32_t id = v.find(t); id >= 0) v.attrs[id] &= ~kAttrRstrip;
  }
  return v;
}

}  // namespace headroom::tok
