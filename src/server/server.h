// `headroom serve`: an OpenAI-compatible HTTP server (cpp-httplib) on the batched engine.
//
// Threads: HTTP workers (cpp-httplib's pool, sized for --parallel plus idle connections) parse and check a
// request, tokenize it and hand a Job to the engine thread, then wait on the job's events and write them
// (SSE chunks, or one JSON body). The engine thread owns the Engine: between steps it admits new jobs, aborts
// the ones whose client went away (each waiting worker checks its socket every few milliseconds), runs one
// step for every running sequence, and pushes the tokens and finishes to the jobs.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/kv_setup.h"
#include "model/model.h"

namespace headroom::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  int n_ctx = 0;          // each sequence's context (0: the model's trained one)
  int parallel = 4;       // sequences running at once
  int max_queue = 64;     // waiting requests beyond this get 503
  KVOptions kv;           // defaults for every request (policy, budget, type, page size, chunk, pool)
  std::map<std::string, std::string> head_maps;  // NAME -> file, loaded at start ("default": --head-map FILE)
  std::string api_key;    // "": no auth
  std::string chat_template;  // NAME (chatml, llama3, llama2, mistral, phi3) or FILE; "": the model's
  std::string model_name;     // the id /v1/models reports (default: the file name)
};

class Server {
 public:
  Server(const Model& m, Backend& be, const ServerOptions& o);
  // Tensor parallel over `ranks` (one backend each; docs/tensor-parallel.md): the KV heads placed by the default
  // setup (contiguous, or by the default head map's bytes); requests naming other maps run on that placement.
  Server(const Model& m, const std::vector<Backend*>& ranks, const ServerOptions& o);
  ~Server();
  // Binds and serves until shutdown(); throws Error (one line) if the address cannot be bound.
  void run();
  // Stops accepting, ends running requests with finish reason "abort" and returns from run(). Callable from
  // any thread (the SIGTERM watcher).
  void shutdown();
  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace headroom::server
