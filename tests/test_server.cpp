// `headroom serve` against real clients over loopback: the raw protocol (httplib's client, as curl would
// speak it), bad input answered with OpenAI error JSON while the server keeps serving, stalled connections,
// 32 concurrent streams with disconnects (every page back, survivors byte-identical to running alone),
// auth, the queue limit, per-request KV settings and SIGTERM.
#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <netinet/in.h>
#include <sys/socket.h>
#include <fmt/format.h>

#include <atomic>
#include <filesystem>
#include <random>
#include <regex>
#include <thread>

#include "server/api.h"
#include "server_process.h"

namespace headroom::test {
namespace {

using nlohmann::json;
const char* kModelId = "retrieval-14m-q8_0.gguf";

std::vector<std::string> base_args(std::vector<std::string> more = {}) {
  std::vector<std::string> a = {"-m", shared("models/retrieval-14m-q8_0.gguf"), "-c", "1024", "-t", "2"};
  a.insert(a.end(), more.begin(), more.end());
  return a;
}

ServerProcess& shared_server() {
  static ServerProcess s(base_args({"--parallel", "8", "--head-map",
                                    std::string("mapA=") + HEADROOM_SOURCE_DIR + "/docs/retrieval-14m-heads.json"}),
                         "shared");
  return s;
}

httplib::Client client(int port) {
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(60);
  return c;
}

json completion_body(const std::string& prompt, int max_tokens, bool stream = false) {
  return {{"model", kModelId}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}, {"stream", stream}};
}

// Streams a request; returns the concatenated text and the last finish_reason. Stops reading (and so
// disconnects) after `stop_after` chunks if >= 0.
struct StreamResult {
  bool ok = false;
  std::string text, finish;
  int chunks = 0;
  bool done = false;
  json usage;
  std::string why;  // for failure messages
};
StreamResult stream(int port, const std::string& path, const json& body, int stop_after = -1) {
  httplib::Client c = client(port);
  StreamResult r;
  std::string buf;
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    return server::read_sse(buf, d, n, [&](const std::string& data) {
      if (data == "[DONE]") {
        r.done = true;
        return true;
      }
      json j = json::parse(data);
      if (j.contains("usage") && !j["usage"].is_null()) r.usage = j["usage"];
      if (!j["choices"].empty()) {
        const json& ch = j["choices"][0];
        if (ch.contains("text")) r.text += ch["text"].get<std::string>();
        if (ch.contains("delta") && ch["delta"].contains("content")) r.text += ch["delta"]["content"].get<std::string>();
        if (!ch["finish_reason"].is_null()) r.finish = ch["finish_reason"].get<std::string>();
      }
      ++r.chunks;
      return stop_after < 0 || r.chunks < stop_after;
    });
  };
  httplib::Response res;
  httplib::Error err;
  r.ok = c.send(req, res, err) && res.status == 200;
  r.why = fmt::format("status {} error {} body {}", res.status, int(err), res.body.substr(0, 200));
  return r;
}

json metrics_pages(int port) {
  httplib::Client c = client(port);
  auto res = c.Get("/metrics");
  json out = json::object();
  if (!res) return out;
  std::regex re(R"re(headroom_kv_pages_used\{tier="(\w+)",policy="(\w+)"\} (\d+))re");
  for (std::sregex_iterator it(res->body.begin(), res->body.end(), re), end; it != end; ++it)
    out[(*it)[1].str() + "/" + (*it)[2].str()] = std::stoll((*it)[3]);
  std::smatch m;
  if (std::regex_search(res->body, m, std::regex(R"(headroom_sequences_running (\d+))"))) out["running"] = std::stoll(m[1]);
  if (std::regex_search(res->body, m, std::regex(R"re(headroom_kv_pages_free\{tier="device"\} (\d+))re")))
    out["device_free"] = std::stoll(m[1]);
  return out;
}

int64_t pages_in_use(const json& m) {
  int64_t n = 0;
  for (auto& [k, v] : m.items())
    if (k.find('/') != std::string::npos) n += v.get<int64_t>();
  return n;
}

TEST(Server, RawProtocol) {
  ServerProcess& s = shared_server();
  ASSERT_GT(s.port(), 0) << s.log();
  httplib::Client c = client(s.port());
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  auto models = c.Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(json::parse(models->body)["data"][0]["id"], kModelId);

  const std::string passkey = "The pass key is 4821930. Remember it. 4821930 is the pass key.\nWhat is the pass key? The pass key is";
  auto r = c.Post("/v1/completions", completion_body(passkey, 10).dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"].get<std::string>().rfind(" 4821930", 0), 0u) << r->body;
  EXPECT_EQ(j["usage"]["completion_tokens"], 10);
  EXPECT_EQ(j["usage"]["total_tokens"], j["usage"]["prompt_tokens"].get<int>() + 10);

  // Streaming gives the same text, then [DONE]; usage comes in the last chunk when asked.
  json sb = completion_body(passkey, 10, true);
  sb["stream_options"] = {{"include_usage", true}};
  StreamResult st = stream(s.port(), "/v1/completions", sb);
  EXPECT_TRUE(st.ok && st.done);
  EXPECT_EQ(st.text, j["choices"][0]["text"].get<std::string>());
  EXPECT_EQ(st.finish, "length");
  EXPECT_EQ(st.usage["completion_tokens"], 10);

  // Chat, with logprobs.
  json chat = {{"model", kModelId}, {"messages", {{{"role", "user"}, {"content", "Hello"}}}}, {"max_tokens", 4},
               {"temperature", 0}, {"logprobs", true}, {"top_logprobs", 2}};
  auto cr = c.Post("/v1/chat/completions", chat.dump(), "application/json");
  ASSERT_TRUE(cr);
  ASSERT_EQ(cr->status, 200) << cr->body;
  json cj = json::parse(cr->body);
  EXPECT_EQ(cj["choices"][0]["message"]["role"], "assistant");
  const json& lp = cj["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(lp.size(), 4u);
  for (const json& t : lp) {
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    ASSERT_EQ(t["top_logprobs"].size(), 2u);
    // Greedy: the chosen token is the most likely one.
    EXPECT_DOUBLE_EQ(t["logprob"].get<double>(), t["top_logprobs"][0]["logprob"].get<double>());
  }
}

TEST(Server, BadInputIsAJsonErrorAndTheServerKeepsServing) {
  ServerProcess& s = shared_server();
  ASSERT_GT(s.port(), 0) << s.log();
  std::string long_prompt;
  for (int i = 0; i < 1500; ++i) long_prompt += "word ";
  const std::string big(9u << 20, 'x');
  struct Row {
    const char* name;
    std::string path, body;
    int status;
    std::string code;  // "" : any
  };
  const std::vector<Row> rows = {
      {"malformed JSON", "/v1/completions", "{\"model\": ", 400, ""},
      {"not an object", "/v1/completions", "[1,2]", 400, ""},
      {"wrong type", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf","prompt":"a","temperature":"hot"})", 400, ""},
      {"missing prompt", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf"})", 400, ""},
      {"missing messages", "/v1/chat/completions", R"({"model":"retrieval-14m-q8_0.gguf"})", 400, ""},
      {"missing model", "/v1/completions", R"({"prompt":"a"})", 400, ""},
      {"unknown model", "/v1/completions", R"({"model":"gpt-9","prompt":"a"})", 404, "model_not_found"},
      {"body over 8 MiB", "/v1/completions", big, 413, ""},
      {"prompt over the context", "/v1/completions", completion_body(long_prompt, 4).dump(), 400, "context_length_exceeded"},
      {"invalid UTF-8", "/v1/completions", "{\"model\":\"retrieval-14m-q8_0.gguf\",\"prompt\":\"a\xC3\x28\"}", 400, ""},
      {"max_tokens 0", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf","prompt":"a","max_tokens":0})", 400, ""},
      {"negative temperature", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf","prompt":"a","temperature":-1})", 400, ""},
      {"n = 2", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf","prompt":"a","n":2})", 400, ""},
      {"bad role", "/v1/chat/completions", R"({"model":"retrieval-14m-q8_0.gguf","messages":[{"role":"robot","content":"a"}]})", 400, ""},
      {"unknown head map", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf","prompt":"a","head_map":"nope"})", 400, ""},
      {"a path as head map", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf","prompt":"a","head_map":"/etc/passwd"})", 400, ""},
      {"unknown kv_policy", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf","prompt":"a","kv_policy":"magic"})", 400, ""},
      {"bad kv_budget", "/v1/completions", R"({"model":"retrieval-14m-q8_0.gguf","prompt":"a","kv_policy":"streaming","kv_budget":"lots"})", 400, ""},
      {"no such route", "/v1/embeddings", R"({"model":"retrieval-14m-q8_0.gguf","input":"a"})", 404, ""},
  };
  httplib::Client c = client(s.port());
  for (const Row& row : rows) {
    SCOPED_TRACE(row.name);
    auto r = c.Post(row.path, row.body, "application/json");
    ASSERT_TRUE(r) << "no answer";
    EXPECT_EQ(r->status, row.status) << r->body.substr(0, 300);
    json j = json::parse(r->body, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << r->body.substr(0, 300);
    ASSERT_TRUE(j.contains("error")) << r->body.substr(0, 300);
    EXPECT_FALSE(j["error"]["message"].get<std::string>().empty());
    if (!row.code.empty()) {
      EXPECT_EQ(j["error"]["code"].get<std::string>(), row.code);
    }
    auto h = c.Get("/health");
    ASSERT_TRUE(h);
    EXPECT_EQ(h->status, 200) << "still serving";
  }
  // Per-request KV settings within the limits work.
  for (const char* extra : {R"("head_map":"mapA")", R"("kv_policy":"streaming","kv_budget":"25%")"}) {
    auto r = c.Post("/v1/completions",
                    std::string(R"({"model":"retrieval-14m-q8_0.gguf","prompt":"Once upon a time","max_tokens":3,)") + extra + "}",
                    "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 200) << extra << ": " << r->body;
  }
}

TEST(Server, StalledConnectionsDoNotHoldUpOthers) {
  ServerProcess& s = shared_server();
  ASSERT_GT(s.port(), 0) << s.log();
  std::vector<int> socks;
  for (int i = 0; i < 16; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(uint16_t(s.port()));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    const std::string half = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"model\":";
    ASSERT_GT(send(fd, half.data(), half.size(), 0), 0);
    socks.push_back(fd);
  }
  const auto t0 = std::chrono::steady_clock::now();
  httplib::Client c = client(s.port());
  auto r = c.Post("/v1/completions", completion_body("Once upon a time", 4).dump(), "application/json");
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int fd : socks) close(fd);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_LT(sec, 3.0) << "answered while 16 connections stall";
}

TEST(Server, ConcurrentStreamsWithDisconnects) {
  ServerProcess& s = shared_server();
  ASSERT_GT(s.port(), 0) << s.log();
  constexpr int kClients = 32;
  std::mt19937 rng(7);
  std::vector<int> stop_after(kClients, -1);
  for (int i = 0; i < kClients / 4; ++i) stop_after[size_t(rng() % kClients)] = int(1 + rng() % 6);
  auto body = [](int i) {
    return completion_body(fmt::format("Story {}: once upon a time, in a town by the sea,", i), 20 + i % 7, true);
  };
  std::vector<StreamResult> got(kClients);
  std::vector<std::thread> th;
  std::atomic<bool> done{false};
  std::vector<json> samples;  // /metrics while the streams run
  std::thread watch([&] {
    while (!done) {
      samples.push_back(metrics_pages(s.port()));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  for (int i = 0; i < kClients; ++i)
    th.emplace_back([&, i] { got[size_t(i)] = stream(s.port(), "/v1/completions", body(i), stop_after[size_t(i)]); });
  for (auto& t : th) t.join();
  done = true;
  watch.join();
  // Every page comes back (the aborted sequences' within a step or so).
  json m;
  for (int i = 0; i < 200; ++i) {
    m = metrics_pages(s.port());
    if (pages_in_use(m) == 0 && m.value("running", 1) == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(pages_in_use(m), 0) << m.dump();
  EXPECT_EQ(m.value("running", -1), 0);
  // While they ran, the pages in use and the free device pages always added up to the pool (the gauges are
  // read in one engine step), and some were in use.
  int64_t most = 0;
  for (const json& x : samples) {
    if (!x.contains("device_free")) continue;
    int64_t device_used = 0;
    for (auto& [k, v] : x.items())
      if (k.rfind("device/", 0) == 0) device_used += v.get<int64_t>();
    EXPECT_EQ(device_used + x["device_free"].get<int64_t>(), m.value("device_free", int64_t(-1))) << x.dump();
    most = std::max(most, pages_in_use(x));
  }
  EXPECT_GT(most, 0) << samples.size() << " samples of /metrics while 32 streams ran";
  // Each survivor's greedy output is byte-identical to the same request alone.
  int survivors = 0;
  for (int i = 0; i < kClients; ++i) {
    if (stop_after[size_t(i)] >= 0) continue;
    ++survivors;
    ASSERT_TRUE(got[size_t(i)].ok && got[size_t(i)].done) << "client " << i << ": " << got[size_t(i)].why;
    StreamResult alone = stream(s.port(), "/v1/completions", body(i));
    EXPECT_EQ(got[size_t(i)].text, alone.text) << "client " << i;
  }
  EXPECT_GE(survivors, kClients / 2);
}

TEST(Server, ApiKey) {
  ServerProcess s(base_args({"--api-key", "sesame"}), "auth");
  ASSERT_GT(s.port(), 0) << s.log();
  httplib::Client c = client(s.port());
  const std::string b = completion_body("a", 1).dump();
  auto none = c.Post("/v1/completions", b, "application/json");
  ASSERT_TRUE(none);
  EXPECT_EQ(none->status, 401);
  EXPECT_EQ(json::parse(none->body)["error"]["code"], "invalid_api_key");
  auto wrong = c.Post("/v1/completions", httplib::Headers{{"Authorization", "Bearer nope"}}, b, "application/json");
  EXPECT_EQ(wrong->status, 401);
  auto right = c.Post("/v1/completions", httplib::Headers{{"Authorization", "Bearer sesame"}}, b, "application/json");
  EXPECT_EQ(right->status, 200) << right->body;
  EXPECT_EQ(c.Get("/health")->status, 200) << "no key needed";
  EXPECT_EQ(c.Get("/metrics")->status, 200) << "no key needed";
  EXPECT_EQ(c.Get("/v1/models")->status, 401);
}

TEST(Server, FullQueueGets503AtOnce) {
  ServerProcess s(base_args({"--parallel", "1", "--max-queue", "1"}), "queue");
  ASSERT_GT(s.port(), 0) << s.log();
  std::atomic<bool> release{false};
  // A runs, B waits; then C finds the queue full.
  std::thread a([&] {
    httplib::Client c = client(s.port());
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = completion_body("Once upon a time", 900, true).dump();
    req.set_header("Content-Type", "application/json");
    req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return !release.load(); };
    httplib::Response res;
    httplib::Error err;
    c.send(req, res, err);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::thread b([&] { stream(s.port(), "/v1/completions", completion_body("b", 900, true), 1); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  httplib::Client c = client(s.port());
  const auto t0 = std::chrono::steady_clock::now();
  auto r = c.Post("/v1/completions", completion_body("c", 2).dump(), "application/json");
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  release = true;
  a.join();
  b.join();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503) << r->body;
  EXPECT_EQ(r->get_header_value("Retry-After"), "1");
  EXPECT_LT(sec, 1.0) << "at once";
}

TEST(Server, SigtermAbortsRunningRequestsAndExitsZero) {
  ServerProcess s(base_args(), "sigterm");
  ASSERT_GT(s.port(), 0) << s.log();
  StreamResult got;
  std::thread t([&] { got = stream(s.port(), "/v1/completions", completion_body("Once upon a time", 900, true)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  const auto t0 = std::chrono::steady_clock::now();
  const int code = s.terminate(10);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t.join();
  EXPECT_EQ(code, 0) << s.log();
  EXPECT_LT(sec, 5.0);
  EXPECT_EQ(got.finish, "abort");
  EXPECT_TRUE(got.done);
  EXPECT_GT(got.chunks, 1);
}

}  // namespace
}  // namespace headroom::test

namespace headroom::test {
namespace {

// The official OpenAI SDK (npm `openai`, installed by scripts/setup.sh into build/npm). Fails, never skips,
// if node or the package is missing.
TEST(ServerClients, OpenAINodeSdk) {
  const std::string npm = HEADROOM_NPM_DIR;
  ASSERT_TRUE(std::filesystem::exists(npm + "/node_modules/openai/package.json"))
      << "the openai npm package is not installed in " << npm << " (scripts/setup.sh installs it)";
  ServerProcess s(base_args(), "sdk");
  ASSERT_GT(s.port(), 0) << s.log();
  const std::string out = scratch_dir("serve") + "/sdk-" + std::to_string(getpid()) + ".out";
  const std::string cmd = fmt::format("NODE_PATH='{}/node_modules' node '{}/tests/clients/openai_sdk.cjs' "
                                      "'http://127.0.0.1:{}/v1' '{}' > '{}' 2>&1",
                                      npm, HEADROOM_SOURCE_DIR, s.port(), kModelId, out);
  const int rc = std::system(cmd.c_str());
  std::ifstream f(out);
  std::stringstream text;
  text << f.rdbuf();
  EXPECT_EQ(rc, 0) << text.str();
  EXPECT_NE(text.str().find("ok"), std::string::npos) << text.str();
}

}  // namespace
}  // namespace headroom::test
