#include "server/server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <random>
#include <thread>

#include "engine/engine.h"
#include "kv/placement.h"
#include "server/api.h"
#include "server/metrics.h"
#include "util/error.h"
#include "util/file.h"

namespace headroom::server {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

const char* openai_finish(FinishReason r) {
  switch (r) {
    case FinishReason::Eog:
    case FinishReason::Stop: return "stop";
    case FinishReason::Abort: return "abort";
    default: return "length";  // n_predict, the context, the sequence's budget, the pool
  }
}

ChatTemplate template_from(const std::string& spec, const std::string& model_template, bool* fallback) {
  *fallback = false;
  static const std::map<std::string, std::string> by_name = {
      {"chatml", "<|im_start|>"}, {"llama3", "<|start_header_id|> add_generation_prompt"},
      {"llama2", "[INST] <<SYS>>"}, {"mistral", "[INST]"}, {"phi3", "<|user|> <|end|> add_generation_prompt"}};
  if (!spec.empty()) {
    if (auto it = by_name.find(spec); it != by_name.end()) return ChatTemplate::detect(it->second);
    ChatTemplate t = ChatTemplate::detect(read_text_file(spec, "chat template", size_t(1) << 20));
    if (!t.recognised())
      fail("--chat-template {:?}: not a template headroom recognises (names: chatml, llama3, llama2, mistral, phi3)",
           spec);
    return t;
  }
  ChatTemplate t = ChatTemplate::detect(model_template);
  if (!t.recognised()) {
    *fallback = true;
    return ChatTemplate::detect(by_name.at("chatml"));
  }
  return t;
}

}  // namespace

// One HTTP request in the engine. The worker thread and the engine thread meet under `mu`.
struct Job {
  ApiRequest api;
  Request req;
  std::shared_ptr<const KVSetup> setup;
  ResponseHead head;
  int n_prompt = 0;
  double t_submit = 0, t_last = 0;
  std::atomic<bool> cancel{false};
  Sequence* seq = nullptr;       // engine thread only
  std::vector<float> row;        // engine thread: the last logits row (logprobs)
  double row_lse = 0;
  std::vector<std::pair<int32_t, double>> row_top;

  std::mutex mu;
  std::condition_variable cv;
  std::string text;                   // not yet written
  std::vector<TokenLogprob> lps;      // not yet written
  bool done = false;
  FinishReason finish = FinishReason::None;
  int n_gen = 0;
};

struct Server::Impl {
  const Model& m;
  std::vector<Backend*> ranks;
  Backend& be;
  ServerOptions o;
  int n_ctx = 0;
  KVSetup base;
  PoolPlan pool_plan;
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<Runner> runner;
  std::unique_ptr<Engine> engine;
  ChatTemplate tmpl;
  bool template_fallback = false;
  httplib::Server http;
  Metrics metrics;
  int bound_port = -1;
  int64_t created = 0;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<Job>> pending;
  std::vector<std::function<void()>> posted;
  bool stopping = false;
  std::thread engine_thread;
  std::map<int64_t, std::shared_ptr<Job>> active;  // engine thread only (by Request::tag)
  std::atomic<int64_t> running{0}, waiting{0}, open_streams{0};
  std::atomic<int64_t> next_job{1};

  std::mutex setup_mu;
  std::map<std::string, std::shared_ptr<const KVSetup>> setups;

  Impl(const Model& model, const std::vector<Backend*>& rank_backends, const ServerOptions& opt)
      : m(model), ranks(rank_backends), be(*rank_backends.at(0)), o(opt) {
    const ModelConfig& c = m.config();
    n_ctx = o.n_ctx > 0 ? o.n_ctx : c.n_ctx_train;
    if (o.parallel < 1) fail("--parallel {} is out of range (at least 1)", o.parallel);
    if (o.max_queue < 0) fail("--max-queue {} is out of range (at least 0)", o.max_queue);
    if (o.model_name.empty()) o.model_name = "headroom";
    for (const auto& [name, path] : o.head_maps) {
      KVOptions k = o.kv;
      k.policy = "auto";
      k.head_map = path;
      plan_kv(m, k, n_ctx);  // checks the map against the model now: never at a client's request
    }
    if (auto it = o.head_maps.find("default"); it != o.head_maps.end()) {
      o.kv.head_map = it->second;
      if (o.kv.policy == "full") o.kv.policy = "auto";
    }
    base = plan_kv(m, o.kv, n_ctx);
    // One pool for every request's policy: it keeps every kind of metadata.
    KVSetup pool_setup = base;
    pool_setup.layout.page_minmax = pool_setup.layout.slot_scores = true;
    pool_plan = plan_pool(pool_setup, o.parallel, o.kv.kv_pool, be.free_memory());
    pool_plan.layout.host_pages = std::max(pool_plan.layout.host_pages, std::min(INT32_MAX / 4, pool_plan.layout.device_pages * 2));
    if (ranks.size() == 1) {
      pool = std::make_unique<PagePool>(be, pool_plan.layout);
      runner = std::make_unique<Runner>(m, be, o.kv.chunk + o.parallel);
    } else {  // tensor parallel: the placement of the default setup, the pool split by it (as EngineStack does)
      KVLayout& l = pool_plan.layout;
      const TPPlan tp = place_heads(c, base.specs, int(ranks.size()), base.per_head, n_ctx, l.page_size, o.kv.chunk,
                                    kv_row_bytes(l.type, l.head_dim));
      std::vector<int32_t> dev, host;
      split_pool_pages(tp, base.specs, n_ctx, l.page_size, o.kv.chunk, l.device_pages, l.host_pages, dev, host);
      l.device_pages = l.host_pages = 0;
      for (size_t r = 0; r < ranks.size(); ++r) {
        l.device_pages += dev[r];
        l.host_pages += host[r];
      }
      for (const std::string& line : tp.describe()) std::fprintf(stderr, "%s\n", line.c_str());
      pool = std::make_unique<PagePool>(ranks, l, tp.rank_of, dev, host);
      runner = std::make_unique<Runner>(m, ranks, tp, o.kv.chunk + o.parallel);
    }
    EngineOptions eo;
    eo.parallel = o.parallel;
    eo.chunk = o.kv.chunk;
    engine = std::make_unique<Engine>(*runner, *pool, eo);
    tmpl = template_from(o.chat_template, m.file().get_str("tokenizer.chat_template", ""), &template_fallback);
    created = int64_t(std::time(nullptr));
    wire_engine();
    wire_http();
  }

  // ---- the engine thread ----------------------------------------------------------------------------------
  std::shared_ptr<Job> job_of(const Sequence& s) {
    auto it = active.find(s.req.tag);
    return it == active.end() ? nullptr : it->second;
  }

  void wire_engine() {
    engine->on_logits = [this](Sequence& s, std::span<const float> row) {
      auto job = job_of(s);
      if (!job || !job->api.logprobs) return;
      job->row.assign(row.begin(), row.end());
      double mx = -INFINITY;
      for (float x : row) mx = std::max(mx, double(x));
      double sum = 0;
      for (float x : row) sum += std::exp(double(x) - mx);
      job->row_lse = mx + std::log(sum);
      job->row_top.clear();
      const int k = std::max(1, job->api.top_logprobs);
      std::vector<int32_t> ids(row.size());
      for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i);
      std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) { return row[size_t(a)] > row[size_t(b)]; });
      for (int i = 0; i < job->api.top_logprobs; ++i)
        job->row_top.emplace_back(ids[size_t(i)], double(row[size_t(ids[size_t(i)])]) - job->row_lse);
    };
    engine->on_token = [this](Sequence& s, int32_t id) {
      auto job = job_of(s);
      if (!job) return;
      const double t = now_s();
      if (s.n_generated == 1) metrics.first_token(t - job->t_submit);
      else metrics.inter_token(t - job->t_last);
      job->t_last = t;
      if (!job->api.logprobs) return;
      const Tokenizer& tok = m.tokenizer();
      TokenLogprob lp{tok.token_to_piece(id), double(job->row[size_t(id)]) - job->row_lse, {}};
      for (const auto& [alt, l] : job->row_top) lp.top.emplace_back(tok.token_to_piece(alt), l);
      std::lock_guard lk(job->mu);
      job->lps.push_back(std::move(lp));
    };
    engine->on_text = [this](Sequence& s, std::string_view piece) {
      auto job = job_of(s);
      if (!job) return;
      {
        std::lock_guard lk(job->mu);
        job->text.append(piece);
      }
      job->cv.notify_all();
    };
    engine->on_finish = [this](Sequence& s) {
      auto job = job_of(s);
      if (!job) return;
      metrics.tokens(s.n_prompt, s.n_generated);
      {
        std::lock_guard lk(job->mu);
        job->done = true;
        job->finish = s.finish;
        job->n_gen = s.n_generated;
      }
      job->cv.notify_all();
      job->seq = nullptr;
      active.erase(s.req.tag);
    };
  }

  static void end_job(Job& job, FinishReason why) {
    {
      std::lock_guard lk(job.mu);
      job.done = true;
      job.finish = why;
    }
    job.cv.notify_all();
  }

  void engine_loop() {
    for (;;) {
      std::deque<std::shared_ptr<Job>> incoming;
      std::vector<std::function<void()>> fns;
      bool stop = false;
      {
        std::unique_lock lk(mu);
        if (pending.empty() && posted.empty() && !stopping && engine->scheduler().idle())
          cv.wait_for(lk, std::chrono::milliseconds(100));
        incoming.swap(pending);
        fns.swap(posted);
        stop = stopping;
      }
      for (auto& f : fns) f();
      for (auto& job : incoming) {
        if (stop) {
          end_job(*job, FinishReason::Abort);
          continue;
        }
        try {
          job->req.tag = next_job++;
          active[job->req.tag] = job;
          job->seq = &engine->add(job->req);
        } catch (const Error& e) {
          active.erase(job->req.tag);
          end_job(*job, FinishReason::Abort);
        }
      }
      // Aborts: clients that went away, or everyone when stopping.
      std::vector<std::shared_ptr<Job>> gone;
      for (auto& [tag, job] : active)
        if (stop || job->cancel.load()) gone.push_back(job);
      for (auto& job : gone)
        if (job->seq) engine->abort(*job->seq);
      if (stop && active.empty()) break;
      if (!engine->scheduler().idle()) {
        try {
          engine->step();
        } catch (const std::exception& e) {
          std::fprintf(stderr, "error: engine step failed: %s; ending every running request\n", e.what());
          std::vector<std::shared_ptr<Job>> all;
          for (auto& [tag, job] : active) all.push_back(job);
          for (auto& job : all)
            if (job->seq) engine->abort(*job->seq);
        }
      }
      running = int64_t(engine->running());
      waiting = int64_t(engine->waiting());
    }
    running = waiting = 0;
  }

  // Runs f on the engine thread between steps and waits for it.
  bool on_engine(std::function<void()> f) {
    auto done = std::make_shared<std::promise<void>>();
    std::future<void> fut = done->get_future();
    {
      std::lock_guard lk(mu);
      if (stopping) return false;
      posted.push_back([f = std::move(f), done] {
        f();
        done->set_value();
      });
    }
    cv.notify_all();
    return fut.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  }

  EngineGauges gauges() {
    EngineGauges g;
    constexpr PolicyKind kinds[] = {PolicyKind::Full, PolicyKind::Streaming, PolicyKind::TopK, PolicyKind::Evict};
    int64_t used[2][std::size(kinds)] = {};  // [tier: device, host][policy]
    on_engine([&] {  // (the engine waits meanwhile: counts per head, a page at a time only in the host tier's use)
      g.running = int64_t(engine->running());
      g.waiting = int64_t(engine->waiting());
      const bool any_host = pool->host_pages() > 0;
      for (auto& [tag, job] : active) {
        if (!job->seq) continue;
        const KVCache& kv = *job->seq->kv;
        for (int l = 0; l < kv.n_layer(); ++l)
          for (int h = 0; h < kv.n_head_kv(); ++h) {
            const size_t k = size_t(kv.policy(l, h).spec().kind);
            const PageList& pages = kv.head(l, h).pages;
            int64_t on_host = 0;
            if (any_host)
              for (int32_t id : pages) on_host += pool->on_host(id);
            used[0][k] += int64_t(pages.size()) - on_host;
            used[1][k] += on_host;
          }
      }
      g.device_free = pool->device_free();
      g.host_free = pool->host_capacity() - pool->host_pages();
    });
    for (PolicyKind kind : kinds) {
      g.pages_used[{"device", policy_name(kind)}] = used[0][size_t(kind)];
      g.pages_used[{"host", policy_name(kind)}] = used[1][size_t(kind)];
    }
    return g;
  }

  // ---- HTTP -----------------------------------------------------------------------------------------------
  static void send_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    res.set_content(error_json(e), "application/json");
  }

  bool authorized(const httplib::Request& req, httplib::Response& res) {
    if (o.api_key.empty()) return true;
    if (req.get_header_value("Authorization") == "Bearer " + o.api_key) return true;
    send_error(res, ApiError(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY')",
                             "invalid_api_key"));
    return false;
  }

  std::shared_ptr<const KVSetup> setup_for(const ApiRequest& a) {
    if (a.kv_policy.empty() && a.kv_budget.empty() && a.head_map.empty())
      return std::shared_ptr<const KVSetup>(std::shared_ptr<void>(), &base);
    const std::string key = a.kv_policy + "\x1f" + a.kv_budget + "\x1f" + a.head_map;
    std::lock_guard lk(setup_mu);
    if (auto it = setups.find(key); it != setups.end()) return it->second;
    KVOptions k = o.kv;
    if (!a.head_map.empty()) {
      auto it = o.head_maps.find(a.head_map);
      if (it == o.head_maps.end()) {
        std::string names;
        for (const auto& [n, p] : o.head_maps) names += (names.empty() ? "" : ", ") + n;
        throw ApiError(400, fmt::format("'head_map': no head map named '{}' was loaded (loaded: {})", a.head_map,
                                        names.empty() ? "none" : names), "", "head_map");
      }
      k.head_map = it->second;
      k.policy = "auto";
    }
    if (!a.kv_policy.empty()) {
      if (a.head_map.empty()) k.head_map.clear();
      k.policy = a.kv_policy;
    }
    if (!a.kv_budget.empty()) k.budget = a.kv_budget;
    KVSetup s;
    try {
      s = plan_kv(m, k, n_ctx);
    } catch (const Error& e) {
      throw ApiError(400, std::string("KV settings: ") + e.what(), "", a.kv_budget.empty() ? "kv_policy" : "kv_budget");
    }
    if (s.capacity_pages > base.capacity_pages)
      throw ApiError(400, fmt::format("'kv_budget': {} pages per sequence is above the server's {}", s.capacity_pages,
                                      base.capacity_pages), "", "kv_budget");
    auto p = std::make_shared<const KVSetup>(std::move(s));
    if (setups.size() < 256) setups[key] = p;
    return p;
  }

  std::vector<int32_t> tokenize(const ApiRequest& a) {
    const Tokenizer& tok = m.tokenizer();
    if (!a.chat) return tok.encode(a.prompt, tok.add_bos());
    const std::string bos = tok.bos() >= 0 ? tok.token_to_piece(tok.bos(), true) : "";
    std::string text;
    try {
      text = tmpl.apply(a.messages, true, bos);
    } catch (const Error& e) {
      throw ApiError(400, std::string("'messages': ") + e.what(), "", "messages");
    }
    const bool add_bos = !(tok.bos() >= 0 && !bos.empty() && text.rfind(bos, 0) == 0) && tok.add_bos();
    return tok.encode(text, add_bos, /*parse_special=*/true);
  }

  void handle_generate(const httplib::Request& req, httplib::Response& res, bool chat) {
    if (!authorized(req, res)) return;
    auto job = std::make_shared<Job>();
    try {
      job->api = parse_request(req.body, chat);
      if (job->api.model != o.model_name)
        throw ApiError(404, fmt::format("The model '{}' does not exist (this server has '{}')", job->api.model,
                                        o.model_name), "model_not_found", "model");
      std::vector<int32_t> ids = tokenize(job->api);
      if (ids.empty()) throw ApiError(400, "the prompt is empty", "", chat ? "messages" : "prompt");
      if (int64_t(ids.size()) >= n_ctx)
        throw ApiError(400, fmt::format("This model's maximum context length is {} tokens; the prompt has {} (and "
                                        "needs room for at least one more)", n_ctx, ids.size()),
                       "context_length_exceeded", chat ? "messages" : "prompt");
      job->setup = setup_for(job->api);
      if (const int64_t least = prompt_min_pages(job->setup->specs, int64_t(ids.size()), pool->page_size());
          least > pool->device_capacity())
        throw ApiError(400, fmt::format("the prompt needs at least {} KV pages, more than the pool's {} (--kv-pool)",
                                        least, pool->device_capacity()), "kv_pool_exceeded", "prompt");
      if (waiting.load() + int64_t(pending_size()) >= o.max_queue) {
        res.set_header("Retry-After", "1");
        throw ApiError(503, fmt::format("the server is busy: {} requests are waiting (--max-queue); retry later",
                                        o.max_queue), "server_busy", "", "server_error");
      }
      job->n_prompt = int(ids.size());
      Request& r = job->req;
      r.prompt = std::move(ids);
      r.sampling = job->api.sampling;
      if (!job->api.seeded) r.sampling.seed = std::random_device{}();
      const int room = n_ctx - job->n_prompt;
      r.n_predict = job->api.max_tokens ? std::min(*job->api.max_tokens, room) : room;
      r.n_ctx = n_ctx;
      r.stop = job->api.stop;
      r.ignore_eos = job->api.ignore_eos;
      r.specs = &job->setup->specs;
      r.max_device_pages = job->setup->capacity_pages;
      r.sampling.validate();
    } catch (const ApiError& e) {
      return send_error(res, e);
    } catch (const Error& e) {
      return send_error(res, ApiError(400, e.what()));
    }
    job->head.chat = chat;
    job->head.model = o.model_name;
    job->head.created = int64_t(std::time(nullptr));
    job->head.id = fmt::format("{}-{}", chat ? "chatcmpl" : "cmpl", next_job.load());
    job->t_submit = now_s();
    {
      std::lock_guard lk(mu);
      if (stopping) return send_error(res, ApiError(503, "the server is shutting down", "", "", "server_error"));
      pending.push_back(job);
    }
    cv.notify_all();
    ++open_streams;
    auto cancel = [this, job] {
      job->cancel = true;
      cv.notify_all();
    };
    auto releaser = [this, cancel](bool ok) {
      if (!ok) cancel();
      --open_streams;
    };
    const bool stream = job->api.stream;
    res.set_chunked_content_provider(
        stream ? "text/event-stream" : "application/json",
        [job, cancel, stream](size_t, httplib::DataSink& sink) {
          bool first = true;
          std::string all;
          std::vector<TokenLogprob> all_lps;
          for (;;) {
            std::string text;
            std::vector<TokenLogprob> lps;
            bool done;
            {
              std::unique_lock lk(job->mu);
              job->cv.wait_for(lk, std::chrono::milliseconds(10),
                               [&] { return !job->text.empty() || !job->lps.empty() || job->done; });
              text.swap(job->text);
              lps.swap(job->lps);
              done = job->done;
            }
            const std::vector<TokenLogprob>* lp = job->api.logprobs ? &lps : nullptr;
            if (stream && (!text.empty() || !lps.empty())) {
              const std::string c = chunk_sse(job->head, text, nullptr, first, lp);
              if (!sink.write(c.data(), c.size())) return cancel(), false;
              first = false;
            } else if (!stream) {
              all += text;
              all_lps.insert(all_lps.end(), std::make_move_iterator(lps.begin()), std::make_move_iterator(lps.end()));
            }
            if (done) {
              std::string out;
              const char* why = openai_finish(job->finish);
              if (stream) {
                out = chunk_sse(job->head, "", why, first, nullptr);
                if (job->api.include_usage) out += usage_sse(job->head, job->n_prompt, job->n_gen);
                out += "data: [DONE]\n\n";
              } else {
                out = response_json(job->head, all, why, job->api.logprobs ? &all_lps : nullptr, job->n_prompt, job->n_gen);
              }
              if (!sink.write(out.data(), out.size())) return cancel(), false;
              sink.done();
              return true;
            }
            if (text.empty() && !sink.is_writable()) return cancel(), false;  // the client went away
          }
        },
        releaser);
  }

  size_t pending_size() {
    std::lock_guard lk(mu);
    return pending.size();
  }

  void wire_http() {
    http.new_task_queue = [n = o.parallel + 32] { return new httplib::ThreadPool(size_t(n)); };
    http.set_payload_max_length(size_t(8) << 20);
    http.set_read_timeout(10);
    http.set_write_timeout(10);
    http.set_keep_alive_timeout(5);
    http.set_logger([this](const httplib::Request&, const httplib::Response& res) { metrics.request(res.status); });
    http.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      const int s = res.status;
      std::string msg = fmt::format("HTTP status {}", s);
      if (s == 413) msg = "the request body is over 8 MiB";
      else if (s == 404) msg = "no such route (try /v1/chat/completions, /v1/completions, /v1/models)";
      else if (s == 405) msg = "method not allowed";
      res.set_content(error_json(ApiError(s, msg, s == 404 ? "not_found" : "")), "application/json");
    });
    http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "internal error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      res.status = 500;
      res.set_content(error_json(ApiError(500, what, "", "", "server_error")), "application/json");
    });
    http.Post("/v1/completions", [this](const httplib::Request& q, httplib::Response& r) { handle_generate(q, r, false); });
    http.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& r) { handle_generate(q, r, true); });
    http.Get("/v1/models", [this](const httplib::Request& q, httplib::Response& r) {
      if (!authorized(q, r)) return;
      nlohmann::json j = {{"object", "list"},
                          {"data", nlohmann::json::array({{{"id", o.model_name}, {"object", "model"},
                                                           {"created", created}, {"owned_by", "headroom"}}})}};
      r.set_content(j.dump(), "application/json");
    });
    http.Get("/health", [](const httplib::Request&, httplib::Response& r) {
      r.set_content(R"({"status":"ok"})", "application/json");
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& r) {
      r.set_content(metrics.render(gauges()), "text/plain; version=0.0.4");
    });
  }

  void run() {
    // cpp-httplib listens with a backlog of 5 (compiled into Debian's library): a burst of clients would have
    // connections dropped. Keep the socket and listen again with a real backlog once it is bound.
    int listen_fd = -1;
    http.set_socket_options([&listen_fd](socket_t sock) {
      httplib::default_socket_options(sock);
      listen_fd = int(sock);
    });
    if (o.port == 0) {
      bound_port = http.bind_to_any_port(o.host);
    } else {
      bound_port = http.bind_to_port(o.host, o.port) ? o.port : -1;
    }
    if (bound_port < 0) fail("cannot listen on {}:{} (in use, or not an address of this machine)", o.host, o.port);
    if (listen_fd >= 0) ::listen(listen_fd, 1024);
    engine_thread = std::thread([this] { engine_loop(); });
    std::fprintf(stderr, "%s\n%s\n", base.summary.c_str(), pool_plan.summary.c_str());
    if (template_fallback)
      std::fprintf(stderr, "notice: the model has no chat template headroom recognises; chat uses ChatML\n");
    std::fprintf(stderr, "listening on http://%s:%d (%d sequences at once, context %d tokens each)\n", o.host.c_str(),
                 bound_port, o.parallel, n_ctx);
    std::fflush(stderr);
    http.listen_after_bind();
    if (engine_thread.joinable()) engine_thread.join();
  }

  void shutdown() {
    {
      std::lock_guard lk(mu);
      if (stopping) return;
      stopping = true;
    }
    cv.notify_all();
    // Running requests end with finish reason "abort"; give their workers a moment to write it.
    if (engine_thread.joinable()) engine_thread.join();
    for (int i = 0; i < 200 && open_streams.load() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    http.stop();
  }
};

Server::Server(const Model& m, Backend& be, const ServerOptions& o)
    : impl_(std::make_unique<Impl>(m, std::vector<Backend*>{&be}, o)) {}
Server::Server(const Model& m, const std::vector<Backend*>& ranks, const ServerOptions& o)
    : impl_(std::make_unique<Impl>(m, ranks, o)) {}
Server::~Server() = default;
void Server::run() { impl_->run(); }
void Server::shutdown() { impl_->shutdown(); }
int Server::port() const { return impl_->bound_port; }

}  // namespace headroom::server
