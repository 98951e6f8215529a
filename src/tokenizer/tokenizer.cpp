// Tokenizer::from_gguf: picks the tokenizer kind and llama.cpp's defaults for it, then builds it.
#include "tokenizer/tokenizer.h"

#include "tokenizer/bpe.h"
#include "tokenizer/spm.h"
#include "tokenizer/vocab.h"
#include "util/error.h"

namespace headroom {

std::unique_ptr<Tokenizer> Tokenizer::from_gguf(const gguf::File& f) {
  const gguf::Value* model_v = f.find("tokenizer.ggml.model");
  if (!model_v) fail("{}: tokenizer.ggml.model is missing (no tokenizer in this file)", f.path());
  const std::string model = f.get_str("tokenizer.ggml.model");

  if (model == "llama") {
    // llama.cpp's SPM defaults: BOS 1, EOS 2, UNK 0, add BOS, prefix a space.
    tok::Vocab v = tok::Vocab::load(f, model, /*default_add_bos=*/true, 1, 2, 0);
    v.add_space_prefix = f.get_bool("tokenizer.ggml.add_space_prefix", true);
    return std::make_unique<tok::SpmTokenizer>(std::move(v));
  }
  if (model == "gpt2") {
    const std::string pre = f.get_str("tokenizer.ggml.pre", "");
    const tok::PreTokenizerInfo info = tok::pretokenizer_info(pre);  // throws for an unknown pre
    const gguf::Value* merges = f.find("tokenizer.ggml.merges");
    if (!merges) fail("{}: tokenizer.ggml.merges is missing (needed by a gpt2 tokenizer)", f.path());
    // llama.cpp's BPE defaults: BOS = EOS = 11 (disabled when out of range), no UNK; add BOS only for the
    // families that default to it (llama3). tokenizer.ggml.add_space_prefix is ignored: byte-level BPE
    // never prefixes a space.
    tok::Vocab v = tok::Vocab::load(f, model, info.add_bos, 11, 11, -1);
    v.pre = pre;
    try {
      return std::make_unique<tok::BpeTokenizer>(std::move(v), *merges, info);
    } catch (const Error& e) {
      fail("{}: {}", f.path(), e.what());
    }
  }
  fail(
      "{}: unsupported tokenizer model '{}' (tokenizer.ggml.model); headroom supports 'llama' (SentencePiece) "
      "and 'gpt2' (byte-level BPE)",
      f.path(), model);
}

}  // namespace headroom
