// Communicator: the collective a tensor-parallel step needs (docs/tensor-parallel.md). One object per rank;
// every rank of a group calls the same collectives with the same counts in the same order.
//
// Implementations: the in-process group below (ranks are threads of one process: CPU backends, whose memory
// the host reads directly, or any backend through host copies, a test mode for GPU ranks), and NCCL across
// the GPUs of one host (backend/cuda/nccl_comm.cpp). backend/registry.h picks one (make_comm_group).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "util/error.h"

namespace headroom {

// Thrown by a collective on the ranks that remain after another rank abandoned the group.
class GroupLeft : public Error {
 public:
  using Error::Error;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  // In place: buf (count floats of this rank's backend memory, written by ops of `be` before the call)
  // becomes the element-wise sum over the ranks, the same on every rank.
  virtual void all_reduce_sum(Backend& be, float* buf, int64_t count) = 0;
  // After an error on this rank: it leaves the group, so that the other ranks' collectives stop waiting for
  // it and throw GroupLeft instead (the group cannot be used again).
  virtual void abandon() {}
  // True when all_reduce_sum only enqueues device work (no host synchronisation), so that a backend's graph
  // can record it (NCCL).
  virtual bool capturable() const { return false; }
};

// `world` communicators joined in this process, one per rank thread. The sum of every element is taken in
// rank order, ((r0 + r1) + r2) + ..., by one rank and copied to all, so every rank holds bitwise the same
// value and a run is reproducible. Each rank sums its own share of the elements (between two barriers).
// Host memory (Backend::host_memory) is summed in place; other backends' buffers are downloaded, summed the
// same way and uploaded again (a host synchronisation per call). A count that differs between the ranks throws
// Error on every rank (after the first barrier: no rank is left waiting).
std::vector<std::unique_ptr<Communicator>> make_in_process_group(int world);

}  // namespace headroom
