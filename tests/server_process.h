// A `headroom serve` child on a free loopback port, for tests that talk to it with real clients. The log goes
// to a file; the constructor waits for "listening on", the destructor sends SIGTERM and waits.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace headroom::test {

class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> args, const std::string& name = "server") {
    // The test process's pid in the name: CTest runs test cases as parallel processes, each with its servers.
    log_ = scratch_dir("serve") + "/" + name + "-" + std::to_string(getpid()) + ".log";
    std::ofstream(log_, std::ios::trunc).close();  // before the fork: never read a previous run's port
    pid_ = fork();
    if (pid_ == 0) {
      const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<std::string> all = {headroom_bin(), "serve", "--port", "0"};
      all.insert(all.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (std::string& a : all) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    const std::regex re(R"(listening on http://[0-9.]+:([0-9]+))");
    for (int i = 0; i < 600 && port_ < 0; ++i) {
      std::smatch m;
      const std::string l = log();
      if (std::regex_search(l, m, re)) port_ = std::stoi(m[1]);
      else if (exited()) break;
      else std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  ~ServerProcess() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  int port() const { return port_; }
  std::string log() const {
    std::ifstream f(log_);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }
  // SIGTERM, then the exit code (or -1 if it did not exit within `seconds`).
  int terminate(double seconds = 10) {
    kill(pid_, SIGTERM);
    for (int i = 0; i < int(seconds * 100); ++i) {
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        reaped_ = true;
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return -1;
  }

 private:
  bool exited() {
    int st = 0;
    if (waitpid(pid_, &st, WNOHANG) == pid_) {
      reaped_ = true;
      return true;
    }
    return false;
  }
  pid_t pid_ = -1;
  int port_ = -1;
  bool reaped_ = false;
  std::string log_;
};

}  // namespace headroom::test
