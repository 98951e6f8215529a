// libFuzzer target: arbitrary bytes through a SentencePiece vocab (llama-spm) and two byte-level BPE vocabs
// (gpt-2, qwen2), with special-token parsing off and on, then decoded whole and streamed.
// Checks, besides "no crash, no sanitizer report":
//  - every id is inside the vocab;
//  - streaming (StreamDecoder) gives exactly decode();
//  - without special-token parsing, decode(encode(s)) == s with invalid UTF-8 replaced by U+FFFD (and, for
//    SPM, U+2581 read as the space it stands for).
// Vocab files are found under $HEADROOM_SHARED_DIR (default "../shared", i.e. run from the repo root).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"
#include "util/error.h"

using namespace headroom;

namespace {

const std::vector<std::unique_ptr<Tokenizer>>& tokenizers() {
  static const std::vector<std::unique_ptr<Tokenizer>> toks = [] {
    const char* env = std::getenv("HEADROOM_SHARED_DIR");
    const std::string dir = std::string(env ? env : "../shared") + "/testdata/vocab/ggml-vocab-";
    std::vector<std::unique_ptr<Tokenizer>> v;
    for (const char* name : {"llama-spm", "gpt-2", "qwen2"}) {
      try {
        auto f = gguf::File::open(dir + name + ".gguf");
        v.push_back(Tokenizer::from_gguf(*f));
      } catch (const Error& e) {
        std::fprintf(stderr, "fuzz_tokenizer: cannot load %s: %s (set HEADROOM_SHARED_DIR)\n", name, e.what());
        std::abort();
      }
    }
    return v;
  }();
  return toks;
}

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_tokenizer: check failed: %s\n", what);
    std::abort();
  }
}

// What decode(encode(s, parse_special=false)) must give back.
std::string expected_round_trip(const Tokenizer& tok, std::string_view text) {
  std::string s = tok::utf8_sanitize(text);
  if (tok.model_kind() != "llama") return s;
  std::string out;  // SPM writes spaces as U+2581, so a U+2581 in the input comes back as a space
  for (size_t i = 0; i < s.size();) {
    if (s.compare(i, 3, "\xE2\x96\x81") == 0) {
      out += ' ';
      i += 3;
    } else {
      out += s[i++];
    }
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (const auto& tok : tokenizers()) {
    for (bool parse_special : {false, true}) {
      const std::vector<int32_t> ids = tok->encode(text, tok->add_bos(), parse_special);
      for (int32_t id : ids) check(id >= 0 && id < tok->n_vocab(), "id out of range");

      const std::string dec = tok->decode(ids, parse_special);
      StreamDecoder sd(*tok, parse_special);
      std::string streamed;
      for (int32_t id : ids) streamed += sd.push(id);
      streamed += sd.flush();
      check(streamed == dec, "streamed output differs from decode()");

      if (!parse_special) check(dec == expected_round_trip(*tok, text), "decode(encode(s)) != s");
    }
  }
  return 0;
}
