// What `headroom profile` reports once the scores are measured: the note that says how the map's streaming
// prefill was chosen, the per-head table, and the heat maps of the scores. Pure functions of the map (and the
// prefill choice); the command wires flags to them.
#pragma once

#include <string>
#include <vector>

#include "eval/plot.h"
#include "kv/head_map.h"
#include "profile/profiler.h"

namespace headroom::profile {


// The tail of the map's note on its streaming heads' prefill: as chosen by the probes, or as set by --prefill.
std::string prefill_note(const PrefillChoice& ch);
std::string prefill_note(const std::string& set_by_flag);

// The map's note: the retrieval measurement, assign()'s note, the prefill note.
std::string map_note(const Scores& s, const Options& o, const std::string& assign_note, const std::string& prefill);

// One line per head (layer, KV head, the scores, the policy), under a header line.
std::string head_table(const HeadMap& map);

enum class HeadScore { Retrieval, StreamingError };
// Layers (rows) x KV heads (columns), Viridis from 0 to the largest value (1 when none is above 0).
plot::Heatmap score_heatmap(const HeadMap& map, HeadScore which);

}  // namespace headroom::profile
