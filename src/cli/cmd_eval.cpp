#include "cli/common.h"
namespace headroom::cli {
void register_eval(CLI::App& app) {}
}  // namespace headroom::cli
