#include "backend/comm.h"

#include <atomic>
#include <barrier>
#include <vector>

#include "util/error.h"

namespace headroom {

namespace {

struct Shared {
  explicit Shared(int world) : sync(world), bufs(size_t(world)), counts(size_t(world)) {}
  std::barrier<> sync;
  std::atomic<bool> broken{false};  // a rank abandoned the group
  std::vector<float*> bufs;
  std::vector<int64_t> counts;
};

class InProcessComm final : public Communicator {
 public:
  InProcessComm(std::shared_ptr<Shared> s, int rank) : s_(std::move(s)), rank_(rank) {}
  int rank() const override { return rank_; }
  int world() const override { return int(s_->bufs.size()); }

  void all_reduce_sum(Backend& be, float* buf, int64_t count) override {
    const int R = world();
    if (R == 1) return;
    // Device memory is summed in a host copy (a test mode for GPU ranks), host memory in place.
    const bool staged = !be.host_memory();
    if (staged) {
      stage_.resize(size_t(count));
      be.download(stage_.data(), buf, size_t(count) * sizeof(float));  // after the ops that wrote buf
    } else {
      be.synchronize();  // the ops that wrote buf are done
    }
    if (s_->broken) throw GroupLeft("all_reduce: another tensor-parallel rank failed and left the group");
    s_->bufs[size_t(rank_)] = staged ? stage_.data() : buf;
    s_->counts[size_t(rank_)] = count;
    s_->sync.arrive_and_wait();
    if (s_->broken) throw GroupLeft("all_reduce: another tensor-parallel rank failed and left the group");
    for (int r = 1; r < R; ++r)
      if (s_->counts[size_t(r)] != s_->counts[0]) {
        const int64_t c0 = s_->counts[0], cr = s_->counts[size_t(r)];
        s_->sync.arrive_and_wait();  // every rank has read the counts before any leaves
        fail("all_reduce: rank 0 sums {} floats but rank {} sums {}", c0, r, cr);
      }
    // This rank's share of the elements: the sum in rank order, written to every rank's buffer.
    const int64_t i0 = count * rank_ / R, i1 = count * (rank_ + 1) / R;
    float* const* b = s_->bufs.data();
    for (int64_t i = i0; i < i1; ++i) {
      float v = b[0][i];
      for (int r = 1; r < R; ++r) v += b[r][i];
      for (int r = 0; r < R; ++r) b[r][i] = v;
    }
    s_->sync.arrive_and_wait();
    if (staged) be.upload(buf, stage_.data(), size_t(count) * sizeof(float));
  }

  void abandon() override {
    if (left_) return;
    left_ = true;
    s_->broken = true;  // before the drop that may complete the phase the others wait in
    s_->sync.arrive_and_drop();
  }

 private:
  bool left_ = false;
  std::vector<float> stage_;  // this rank's host copy of a device buffer
  std::shared_ptr<Shared> s_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_in_process_group(int world) {
  if (world < 1) fail("a communicator group needs at least one rank, not {}", world);
  auto s = std::make_shared<Shared>(world);
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < world; ++r) out.push_back(std::make_unique<InProcessComm>(s, r));
  return out;
}

}  // namespace headroom
