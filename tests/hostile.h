// Harness for the table-driven hostile-input tests (tests/test_hostile_*.cpp).
//
// Each row runs the headroom binary as a child process (fork + exec, stdin from /dev/null, stdout and
// stderr captured together) under a wall-clock limit, then checks:
//   - it exited (never a signal) with the expected code (1: a user error, 2: a flag CLI11 rejected);
//   - the output holds exactly one line starting with "error: " that matches `pattern` (ECMAScript regex
//     over the harness's own trusted pattern, never over untrusted text of any size);
//   - if max_rss_mb > 0, the child's peak RSS (getrusage via wait4) stayed below it.
// A child still running at the limit is killed and the row fails as a hang.
// check_success_row is the same for input that must work: exit code 0, no error line, some output line
// matching `pattern`, and the same time and memory limits.
#pragma once

#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace headroom::test {

struct HostileRow {
  std::string name;               // what the row is about (printed on failure)
  std::vector<std::string> args;  // argv after the binary
  int code = 1;                   // expected exit code
  std::string pattern;            // regex the single error line must contain (std::regex_search)
  double max_rss_mb = 0;          // 0: not checked
  double time_limit_s = 20;
};

struct ChildResult {
  bool exited = false;   // false: killed by a signal or by the time limit
  int code = -1;         // exit code, or the signal number when !exited
  bool timed_out = false;
  double peak_rss_mb = 0;
  std::string out;
};

inline ChildResult run_child(const std::vector<std::string>& args, double time_limit_s) {
  ChildResult r;
  int pipefd[2];
  if (pipe(pipefd) != 0) return r;
  pid_t pid = fork();
  if (pid == 0) {
    int devnull = open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(pipefd[1], 1);
    dup2(pipefd[1], 2);
    close(pipefd[0]);
    std::vector<char*> argv;
    std::string bin = headroom_bin();
    argv.push_back(bin.data());
    std::vector<std::string> copy = args;
    for (std::string& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  close(pipefd[1]);
  fcntl(pipefd[0], F_SETFL, O_NONBLOCK);
  auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  struct rusage ru {};
  char buf[4096];
  for (;;) {
    ssize_t n;
    while ((n = read(pipefd[0], buf, sizeof buf)) > 0)
      if (r.out.size() < (1u << 20)) r.out.append(buf, size_t(n));
    pid_t w = wait4(pid, &status, WNOHANG, &ru);
    if (w == pid) break;
    double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (el > time_limit_s) {
      kill(pid, SIGKILL);
      wait4(pid, &status, 0, &ru);
      r.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ssize_t n;
  while ((n = read(pipefd[0], buf, sizeof buf)) > 0)
    if (r.out.size() < (1u << 20)) r.out.append(buf, size_t(n));
  close(pipefd[0]);
  r.exited = !r.timed_out && WIFEXITED(status);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? WTERMSIG(status) : -1;
  r.peak_rss_mb = double(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
  return r;
}

// The child's peak RSS stayed below the row's bound (if it has one).
inline void expect_rss_within(const HostileRow& row, const ChildResult& r) {
  if (row.max_rss_mb > 0) {
    EXPECT_LT(r.peak_rss_mb, row.max_rss_mb) << "peak RSS " << r.peak_rss_mb << " MB";
  }
}

inline void check_hostile_row(const HostileRow& row) {
  SCOPED_TRACE(row.name);
  ChildResult r = run_child(row.args, row.time_limit_s);
  ASSERT_FALSE(r.timed_out) << "hung past " << row.time_limit_s << " s; output: " << r.out;
  ASSERT_TRUE(r.exited) << "killed by signal " << r.code << "; output: " << r.out;
  EXPECT_EQ(r.code, row.code) << r.out;
  std::vector<std::string> error_lines;
  size_t lines = 0, start = 0;
  while (start < r.out.size()) {
    size_t end = r.out.find('\n', start);
    if (end == std::string::npos) end = r.out.size();
    std::string line = r.out.substr(start, end - start);
    ++lines;
    if (line.rfind("error: ", 0) == 0) error_lines.push_back(line);
    start = end + 1;
  }
  ASSERT_EQ(error_lines.size(), 1u) << "expected exactly one error line; output: " << r.out;
  EXPECT_TRUE(std::regex_search(error_lines[0], std::regex(row.pattern)))
      << "error line does not match /" << row.pattern << "/: " << error_lines[0];
  expect_rss_within(row, r);
}

inline void check_success_row(const HostileRow& row) {
  SCOPED_TRACE(row.name);
  ChildResult r = run_child(row.args, row.time_limit_s);
  ASSERT_FALSE(r.timed_out) << "hung past " << row.time_limit_s << " s; output: " << r.out;
  ASSERT_TRUE(r.exited) << "killed by signal " << r.code << "; output: " << r.out;
  EXPECT_EQ(r.code, 0) << r.out;
  bool matched = false;
  size_t start = 0;
  const std::regex re(row.pattern);
  while (start < r.out.size()) {
    size_t end = r.out.find('\n', start);
    if (end == std::string::npos) end = r.out.size();
    const std::string line = r.out.substr(start, end - start);
    EXPECT_NE(line.rfind("error: ", 0), 0u) << line;
    // Lines of any length are not searched: the regex runs over short lines only (see the note above).
    if (line.size() <= 4096 && std::regex_search(line, re)) matched = true;
    start = end + 1;
  }
  EXPECT_TRUE(matched) << "no output line matches /" << row.pattern << "/; output: " << r.out;
  expect_rss_within(row, r);
}

}  // namespace headroom::test
