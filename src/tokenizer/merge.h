// What SentencePiece BPE (merge by score) and byte-level BPE (merge by rank) share, as in llama.cpp's
// llm_tokenizer_spm / llm_tokenizer_bpe: the symbols (one per UTF-8 character, a linked list over the text), the
// queue of candidate pairs, and the merge loop: the best queued pair is merged if it is still current, and the
// merged symbol's new neighbour pairs are queued.
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <queue>
#include <string_view>
#include <vector>

#include "tokenizer/utf8.h"

namespace headroom::tok {

struct MergeSymbol {
  int32_t prev, next;
  size_t offset, n;  // bytes of the text; n == 0 once merged into its left neighbour
};

// One symbol per UTF-8 character of `text` (a truncated character at the end is one symbol), linked in order.
inline std::vector<MergeSymbol> utf8_symbols(std::string_view text) {
  std::vector<MergeSymbol> syms;
  syms.reserve(text.size());
  for (size_t off = 0; off < text.size();) {
    const size_t n = std::min(utf8_lead_len(static_cast<uint8_t>(text[off])), text.size() - off);
    const auto idx = static_cast<int32_t>(syms.size());
    syms.push_back({idx - 1, off + n == text.size() ? -1 : idx + 1, off, n});
    off += n;
  }
  return syms;
}

// A candidate pair: symbols left and right, the key it is ranked by (a merge rank or a token score), and the
// bytes of the merged text (to recognise a pair made stale by another merge).
template <typename Key>
struct MergeBigram {
  int32_t left, right;
  Key key;
  size_t size;
};

// Priority queue order: the pair whose key is Better comes first; among equal keys the leftmost pair.
template <typename Key, typename Better>
struct MergeOrder {
  bool operator()(const MergeBigram<Key>& l, const MergeBigram<Key>& r) const {
    return Better()(r.key, l.key) || (l.key == r.key && l.left > r.left);
  }
};
template <typename Key, typename Better>
using MergeQueue = std::priority_queue<MergeBigram<Key>, std::vector<MergeBigram<Key>>, MergeOrder<Key, Better>>;

// Bigram needs fields left, right and size (bytes of the merged text, to recognise a pair made stale by another
// merge); try_add(left, right) queues the pair if it is a candidate (left or right may be -1).
template <typename Bigram, typename Order, typename TryAdd>
void merge_symbols(std::vector<MergeSymbol>& syms, std::priority_queue<Bigram, std::vector<Bigram>, Order>& queue,
                   TryAdd&& try_add) {
  for (int32_t i = 1; i < static_cast<int32_t>(syms.size()); ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    MergeSymbol& l = syms[b.left];
    MergeSymbol& r = syms[b.right];
    // Sizes only grow, so a changed neighbour shows as a different total (or as a merged-away symbol); this
    // is the same test as llama.cpp's comparison of the texts.
    if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }
}

}  // namespace headroom::tok
