// The bigram merge loop shared by SentencePiece BPE (merge by score) and byte-level BPE (merge by rank), as in
// llama.cpp's llm_tokenizer_spm / llm_tokenizer_bpe: symbols form a linked list over the text; the best queued
// pair is merged if it is still current, and the merged symbol's new neighbour pairs are queued.
#pragma once

#include <cstddef>
#include <cstdint>
#include <queue>
#include <vector>

namespace headroom::tok {

struct MergeSymbol {
  int32_t prev, next;
  size_t offset, n;  // bytes of the text; n == 0 once merged into its left neighbour
};

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
