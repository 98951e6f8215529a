// headroom: command-line entry point. Each subcommand lives in its own cmd_*.cpp.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/common.h"
#include "util/error.h"

int main(int argc, char** argv) {
  CLI::App app{"headroom: a long-context LLM inference engine with head-aware paged KV memory"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "headroom 0.1.0");
  headroom::cli::register_inspect(app);
  headroom::cli::register_tokenize(app);
  headroom::cli::register_run(app);
  headroom::cli::register_bench(app);
  headroom::cli::register_synth(app);
  headroom::cli::register_profile(app);
  headroom::cli::register_eval(app);
#ifdef HEADROOM_HAVE_SERVER
  headroom::cli::register_serve(app);
#endif
  // llama.cpp's -ctk / -ctv / -np and vLLM's -tp: CLI11 cannot declare a multi-letter short flag (and "-ctk" would parse as
  // "-c tk"), so they are rewritten to the long names before parsing.
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-ctk") a = "--cache-type-k";
    else if (a == "-ctv") a = "--cache-type-v";
    else if (a.rfind("-ctk=", 0) == 0) a = "--cache-type-k=" + a.substr(5);
    else if (a.rfind("-ctv=", 0) == 0) a = "--cache-type-v=" + a.substr(5);
    else if (a == "-tp") a = "--tensor-parallel";
    else if (a.rfind("-tp=", 0) == 0) a = "--tensor-parallel=" + a.substr(4);
    else if (a == "-np") a = "--parallel";
    else if (a.rfind("-np=", 0) == 0) a = "--parallel=" + a.substr(4);
    args.push_back(a);
  }
  std::reverse(args.begin(), args.end());  // CLI11 takes the arguments in reverse order
  try {
    app.parse(args);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "error: %s (see --help)\n", e.what());
    return 2;
  } catch (const headroom::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
