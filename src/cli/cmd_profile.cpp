#include "cli/common.h"
namespace headroom::cli {
void register_profile(CLI::App& app) {}
}  // namespace headroom::cli
