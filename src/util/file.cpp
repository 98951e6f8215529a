#include "util/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "util/error.h"

namespace headroom {

namespace {

const char* kind_of(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  return "a special file";
}

std::string size_text(uint64_t bytes) {
  if (bytes >= (uint64_t{1} << 20) && bytes % (uint64_t{1} << 20) == 0) return fmt::format("{} MiB", bytes >> 20);
  if (bytes >= (uint64_t{1} << 10) && bytes % (uint64_t{1} << 10) == 0) return fmt::format("{} KiB", bytes >> 10);
  return fmt::format("{} bytes", bytes);
}

}  // namespace

uint64_t check_regular_file(const std::string& path, const char* what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail("{}: cannot open {}: {}", path, what, std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail("{}: the {} is {}, not a regular file", path, what, kind_of(st.st_mode));
  return static_cast<uint64_t>(st.st_size);
}

std::string read_text_file(const std::string& path, const char* what, size_t max_bytes) {
  check_regular_file(path, what);
  // O_NONBLOCK: should the path have been swapped for a FIFO since the check, open does not wait for a writer.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open {}: {}", path, what, std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: the {} is not a regular file", path, what);
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    ::close(fd);
    fail("{}: the {} is {} bytes, more than the {} limit", path, what, st.st_size, size_text(max_bytes));
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  for (;;) {
    // Once the buffer is full, one more read must find the end of the file (else it grew since fstat).
    char extra;
    const bool full = got == out.size();
    ssize_t n = full ? ::read(fd, &extra, 1) : ::read(fd, out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      fail("{}: cannot read {}: {}", path, what, std::strerror(e));
    }
    if (n == 0) break;
    if (full) {
      ::close(fd);
      fail("{}: the {} grew while it was being read", path, what);
    }
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(got);
  return out;
}

}  // namespace headroom
