// Tests of the in-process communicator (runner/runner.h, make_local_communicators): one
// std::thread per rank for 1, 2, 3, 4 and 8 ranks; all-reduce equal to the pairwise tree
// over ranks in rank order (the kernels' tree_sum) bit for bit, with values where the
// order matters, all-gather in rank order,
// broadcast from every root, hundreds of mixed collectives in a row, and the same bits
// on every run. A watchdog turns a deadlock into a failure with a message (threads stuck
// in a collective cannot be joined, so it aborts the process).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/ops.h"
#include "runner/device_layer.h"
#include "runner/runner.h"

namespace grokit::runner {
namespace {

using namespace std::chrono_literals;

const int kRankCounts[] = {1, 2, 3, 4, 8};

// Runs body(comm) on one thread per rank and waits for all of them. Bodies must not use
// ASSERT_* (a rank that leaves early would strand the others in a collective).
void run_ranks(int ranks, const std::function<void(Communicator&)>& body, std::chrono::seconds limit = 60s) {
  auto comms = make_local_communicators(ranks);
  ASSERT_EQ(comms.size(), static_cast<size_t>(ranks));
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      body(*comms[static_cast<size_t>(r)]);
      std::lock_guard<std::mutex> lock(mu);
      ++done;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, limit, [&] { return done == ranks; })) {
      std::fprintf(stderr, "test_comm: %d of %d ranks still inside a collective after %lld s: deadlock\n",
                   ranks - done, ranks, static_cast<long long>(limit.count()));
      std::fflush(stderr);
      std::abort();
    }
  }
  for (auto& t : threads) t.join();
}

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Rank r's value for element i: drawn from values whose fp32 sum depends on the order
// (2^24 + 1 + 1 - 2^24 is 0 left to right, 2 otherwise).
float value(int r, size_t i, uint64_t salt) {
  static const float kValues[] = {16777216.0f, -16777216.0f, 1.0f, -1.0f, 0.5f, 3.0f, 1e-3f, 33554432.0f, -0.375f, 7.0f};
  return kValues[mix(salt * 1000003ull + static_cast<uint64_t>(r) * 7919ull + i) % 10];
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

constexpr uint32_t kGuard = 0x7fbadbadu;  // a NaN pattern after each buffer: must stay

TEST(LocalCommunicator, RanksAndSizes) {
  for (int N : kRankCounts) {
    auto comms = make_local_communicators(N);
    ASSERT_EQ(comms.size(), static_cast<size_t>(N));
    for (int r = 0; r < N; ++r) {
      EXPECT_EQ(comms[static_cast<size_t>(r)]->rank(), r);
      EXPECT_EQ(comms[static_cast<size_t>(r)]->size(), N);
    }
  }
}

// The pairwise tree over ranks, written out independently of kernels::tree_sum: adjacent
// values added level by level, an odd last one carried up.
template <class F>
float tree_of(int N, F&& v) {
  std::vector<float> level;
  for (int r = 0; r < N; ++r) level.push_back(v(r));
  while (level.size() > 1) {
    std::vector<float> next;
    for (size_t i = 0; i + 1 < level.size(); i += 2) next.push_back(level[i] + level[i + 1]);
    if (level.size() % 2 != 0) next.push_back(level.back());
    level = std::move(next);
  }
  return level[0];
}

// All-reduce of n elements over N ranks; returns rank 0's result (for run-to-run checks).
std::vector<uint32_t> check_all_reduce(int N, size_t n, uint64_t salt) {
  std::vector<float> want(n);
  size_t order_matters = 0;
  for (size_t i = 0; i < n; ++i) {
    float s = tree_of(N, [&](int r) { return value(r, i, salt); });
    want[i] = s;
    float rev = value(N - 1, i, salt);
    for (int r = N - 2; r >= 0; --r) rev += value(r, i, salt);
    order_matters += bits(rev) != bits(s) ? 1 : 0;
  }
  if (N >= 3 && n >= 1000) {
    EXPECT_GT(order_matters, n / 100) << "the values do not make the order matter";
  }
  std::vector<std::vector<float>> bufs(static_cast<size_t>(N), std::vector<float>(n + 3));
  for (int r = 0; r < N; ++r) {
    auto& b = bufs[static_cast<size_t>(r)];
    for (size_t i = 0; i < n; ++i) b[i] = value(r, i, salt);
    for (size_t i = n; i < n + 3; ++i) std::memcpy(&b[i], &kGuard, 4);
  }
  run_ranks(N, [&](Communicator& c) { c.all_reduce_sum(bufs[static_cast<size_t>(c.rank())].data(), n); });
  for (int r = 0; r < N; ++r) {
    const auto& b = bufs[static_cast<size_t>(r)];
    size_t wrong = 0, first = 0;
    for (size_t i = 0; i < n; ++i) {
      if (bits(b[i]) != bits(want[i]) && wrong++ == 0) first = i;
    }
    EXPECT_EQ(wrong, 0u) << "N " << N << ", n " << n << ", rank " << r << ": first wrong element " << first
                         << " = " << b[first] << ", want " << want[first];
    for (size_t i = n; i < n + 3; ++i) EXPECT_EQ(bits(b[i]), kGuard) << "N " << N << ", n " << n << ": written past n";
  }
  std::vector<uint32_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = bits(bufs[0][i]);
  return out;
}

TEST(LocalCommunicator, AllReduceIsTheRankOrderTree) {
  for (int N : kRankCounts) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{1000}, size_t{100003}}) {
      check_all_reduce(N, n, 1);
    }
  }
}

TEST(LocalCommunicator, AllReduceGivesTheSameBitsOnEveryRun) {
  for (int N : {3, 8}) {
    const auto first = check_all_reduce(N, 100003, 2);
    for (int run = 0; run < 3; ++run) EXPECT_EQ(check_all_reduce(N, 100003, 2), first) << "N " << N << ", run " << run;
  }
}

uint8_t pattern(int r, size_t j, int salt) { return static_cast<uint8_t>(r * 31 + static_cast<int>(j) * 7 + salt * 13 + 1); }

TEST(LocalCommunicator, AllGatherConcatenatesInRankOrder) {
  for (int N : kRankCounts) {
    for (size_t bytes : {size_t{0}, size_t{1}, size_t{13}, size_t{4096}, size_t{100003}}) {
      std::vector<std::vector<uint8_t>> send(static_cast<size_t>(N)), recv(static_cast<size_t>(N));
      for (int r = 0; r < N; ++r) {
        for (size_t j = 0; j < bytes; ++j) send[static_cast<size_t>(r)].push_back(pattern(r, j, 0));
        send[static_cast<size_t>(r)].push_back(0);  // never empty: no null pointers, even for 0 bytes
        recv[static_cast<size_t>(r)].assign(static_cast<size_t>(N) * bytes + 8, 0xee);
      }
      run_ranks(N, [&](Communicator& c) {
        const auto r = static_cast<size_t>(c.rank());
        c.all_gather(send[r].data(), recv[r].data(), bytes);
      });
      for (int r = 0; r < N; ++r) {
        const auto& got = recv[static_cast<size_t>(r)];
        size_t wrong = 0;
        for (int q = 0; q < N; ++q)
          for (size_t j = 0; j < bytes; ++j) wrong += got[static_cast<size_t>(q) * bytes + j] != pattern(q, j, 0) ? 1 : 0;
        EXPECT_EQ(wrong, 0u) << "N " << N << ", bytes " << bytes << ", rank " << r;
        for (size_t j = static_cast<size_t>(N) * bytes; j < got.size(); ++j)
          EXPECT_EQ(got[j], 0xee) << "N " << N << ", bytes " << bytes << ": written past the end";
        // The send buffers are left as they were.
        for (size_t j = 0; j < bytes; ++j) EXPECT_EQ(send[static_cast<size_t>(r)][j], pattern(r, j, 0));
      }
    }
  }
}

TEST(LocalCommunicator, BroadcastFromEveryRoot) {
  for (int N : kRankCounts) {
    for (int root = 0; root < N; ++root) {
      for (size_t bytes : {size_t{0}, size_t{5}, size_t{1000}, size_t{65537}}) {
        std::vector<std::vector<uint8_t>> data(static_cast<size_t>(N));
        for (int r = 0; r < N; ++r) {
          for (size_t j = 0; j < bytes; ++j) data[static_cast<size_t>(r)].push_back(pattern(r, j, 1));
          data[static_cast<size_t>(r)].push_back(0xee);  // guard
        }
        run_ranks(N, [&](Communicator& c) { c.broadcast(data[static_cast<size_t>(c.rank())].data(), bytes, root); });
        for (int r = 0; r < N; ++r) {
          const auto& d = data[static_cast<size_t>(r)];
          size_t wrong = 0;
          for (size_t j = 0; j < bytes; ++j) wrong += d[j] != pattern(root, j, 1) ? 1 : 0;
          EXPECT_EQ(wrong, 0u) << "N " << N << ", root " << root << ", bytes " << bytes << ", rank " << r;
          EXPECT_EQ(d[bytes], 0xee) << "written past the end";
        }
      }
    }
  }
}

// Hundreds of collectives of every kind and size in a row, each checked on every rank;
// returns a digest of everything the ranks received (for run-to-run comparison).
uint64_t mixed_collectives(int N, int iterations, std::atomic<int>& errors) {
  std::vector<uint64_t> digests(static_cast<size_t>(N), 0);
  run_ranks(N, [&](Communicator& c) {
    const int r = c.rank();
    uint64_t digest = 0;
    auto fold = [&](const void* p, size_t n) {
      const auto* b = static_cast<const uint8_t*>(p);
      for (size_t i = 0; i < n; ++i) digest = mix(digest ^ b[i]);
    };
    for (int it = 0; it < iterations; ++it) {
      switch (it % 4) {
        case 0: {  // all-reduce, sizes 0 .. 600 (some not divisible by N)
          const size_t n = static_cast<size_t>((it * 37) % 601);
          std::vector<float> v(n);
          for (size_t i = 0; i < n; ++i) v[i] = value(r, i, static_cast<uint64_t>(it));
          c.all_reduce_sum(v.data(), n);
          for (size_t i = 0; i < n; ++i) {
            float s = tree_of(N, [&](int q) { return value(q, i, static_cast<uint64_t>(it)); });
            if (bits(s) != bits(v[i])) ++errors;
          }
          fold(v.data(), n * 4);
          break;
        }
        case 1: {  // all-gather, 0 .. 18 bytes per rank
          const size_t bytes = static_cast<size_t>(it % 19);
          std::vector<uint8_t> send(bytes + 1), recv(static_cast<size_t>(N) * bytes + 1);  // + 1: never null
          for (size_t j = 0; j < bytes; ++j) send[j] = pattern(r, j, it);
          c.all_gather(send.data(), recv.data(), bytes);
          for (int q = 0; q < N; ++q)
            for (size_t j = 0; j < bytes; ++j)
              if (recv[static_cast<size_t>(q) * bytes + j] != pattern(q, j, it)) ++errors;
          fold(recv.data(), recv.size() - 1);
          break;
        }
        case 2: {  // broadcast from a root that moves
          const int root = (it / 4) % N;
          const size_t bytes = static_cast<size_t>(it % 23 + 1);
          std::vector<uint8_t> d(bytes);
          for (size_t j = 0; j < bytes; ++j) d[j] = pattern(r, j, it);
          c.broadcast(d.data(), bytes, root);
          for (size_t j = 0; j < bytes; ++j)
            if (d[j] != pattern(root, j, it)) ++errors;
          fold(d.data(), bytes);
          break;
        }
        default:
          c.barrier();
          break;
      }
    }
    digests[static_cast<size_t>(r)] = digest;
  });
  for (int r = 1; r < N; ++r) EXPECT_EQ(digests[static_cast<size_t>(r)], digests[0]) << "rank " << r << " received other data";
  return digests[0];
}

TEST(LocalCommunicator, HundredsOfCollectivesInARow) {
  for (int N : kRankCounts) {
    // Fewer for 8 ranks: more threads than this machine may have cores, and the
    // communicator's barrier spins before it sleeps.
    const int iterations = N <= 4 ? 400 : 160;
    std::atomic<int> errors{0};
    const uint64_t first = mixed_collectives(N, iterations, errors);
    EXPECT_EQ(errors.load(), 0) << "N " << N;
    const uint64_t second = mixed_collectives(N, iterations, errors);
    EXPECT_EQ(errors.load(), 0) << "N " << N;
    EXPECT_EQ(first, second) << "N " << N << ": different results on a second run";
  }
}

TEST(LocalCommunicator, BarrierOrdersWritesAcrossRanks) {
  // Each rank writes its slot, meets the barrier, then reads every slot: all visible.
  for (int N : kRankCounts) {
    std::vector<int> slots(static_cast<size_t>(N), -1);
    std::atomic<int> errors{0};
    run_ranks(N, [&](Communicator& c) {
      for (int round = 0; round < 50; ++round) {
        slots[static_cast<size_t>(c.rank())] = round * 100 + c.rank();
        c.barrier();
        for (int q = 0; q < N; ++q)
          if (slots[static_cast<size_t>(q)] != round * 100 + q) ++errors;
        c.barrier();  // nobody writes the next round before everyone has read
      }
    });
    EXPECT_EQ(errors.load(), 0) << "N " << N;
  }
}

// A rank that fails never arrives: abort() must release the ranks already waiting in a
// collective (asleep, past the spin) and every collective after it.
TEST(LocalCommunicator, AbortReleasesRanksWaitingForAFailedOne) {
  auto comms = make_local_communicators(3);
  std::atomic<int> returned{0};
  std::vector<std::thread> waiting;
  for (int r = 0; r < 2; ++r) {
    waiting.emplace_back([&, r] {
      std::vector<float> data(64, 1.0f);
      comms[static_cast<size_t>(r)]->all_reduce_sum(data.data(), data.size());
      comms[static_cast<size_t>(r)]->barrier();
      returned.fetch_add(1);
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // both asleep in the barrier
  EXPECT_EQ(returned.load(), 0) << "ranks went on without the third";
  EXPECT_FALSE(comms[0]->aborted());
  comms[2]->abort();  // rank 2 failed
  for (auto& t : waiting) t.join();
  EXPECT_EQ(returned.load(), 2);
  EXPECT_TRUE(comms[0]->aborted());
  EXPECT_TRUE(comms[1]->aborted());
  std::vector<uint8_t> out(3);
  uint8_t mine = 7;
  comms[0]->all_gather(&mine, out.data(), 1);  // returns at once
  comms[1]->broadcast(&mine, 1, 0);
}

// ---------------------------------------------------------------------------------
// The NCCL device communicator's abort, over a fake collectives table (no GPU): the
// abort must not hold the calling rank thread while NCCL waits (for the graphs that
// captured the communicator to go), and nothing may use the communicator after it.
namespace fake_nccl {
std::atomic<int> reduces{0}, gathers{0}, destroys{0}, aborts{0};
std::atomic<bool> graphs_gone{false};
int all_reduce_sum(const float*, float*, size_t, void*, GrokitStream) { return reduces.fetch_add(1), GROKIT_OK; }
int all_gather(const void*, void*, size_t, void*, GrokitStream) { return gathers.fetch_add(1), GROKIT_OK; }
int comm_destroy(void*) { return destroys.fetch_add(1), GROKIT_OK; }
int comm_abort(void*) {
  // As NCCL >= 2.26 does: returns once the graphs are gone (here also after 2 s, so that
  // an abort made on the rank's own thread fails the test instead of hanging it).
  const auto t0 = std::chrono::steady_clock::now();
  while (!graphs_gone.load() && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2))
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return aborts.fetch_add(1), GROKIT_OK;
}
// NCCL's async error: set by the test (a peer host failed); polls counted.
std::atomic<bool> peer_failed{false};
std::atomic<int> polls{0};
int comm_async_error(void*, int* failed, char* why, size_t len) {
  polls.fetch_add(1);
  *failed = peer_failed.load() ? 1 : 0;
  std::snprintf(why, len, "%s", *failed != 0 ? "remote process exited or there was a network error" : "");
  return GROKIT_OK;
}
GrokitCollectives table() {
  GrokitCollectives c{};
  c.abi_version = GROKIT_OPS_ABI_VERSION;
  c.all_reduce_sum = all_reduce_sum;
  c.all_gather = all_gather;
  c.comm_destroy = comm_destroy;
  c.comm_abort = comm_abort;
  return c;
}
}  // namespace fake_nccl

TEST(NcclDeviceComm, AbortDoesNotHoldTheRankAndStopsEveryLaterCollective) {
  namespace f = fake_nccl;
  const GrokitCollectives table = f::table();
  int token = 0;  // stands for the ncclComm_t
  {
    auto comm = make_nccl_comm(grokit_host_ops(), &table, &token, nullptr);
    std::vector<float> data(16, 1.0f);
    ASSERT_TRUE(comm->all_reduce_sum(data.data(), data.size()).ok());
    ASSERT_TRUE(comm->all_gather(data.data(), data.data(), 4).ok());
    EXPECT_EQ(f::reduces.load(), 1);
    EXPECT_EQ(f::gathers.load(), 1);
    EXPECT_FALSE(comm->aborted());
    const auto t0 = std::chrono::steady_clock::now();
    comm->abort();  // NCCL's abort is still waiting: this returns anyway
    comm->abort();  // once is enough
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
    EXPECT_TRUE(comm->aborted());
    Status s = comm->all_reduce_sum(data.data(), data.size());
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().message.find("aborted"), std::string::npos) << s.error().message;
    EXPECT_FALSE(comm->all_gather(data.data(), data.data(), 4).ok());
    EXPECT_EQ(f::reduces.load(), 1) << "a collective reached NCCL after the abort";
    EXPECT_EQ(f::gathers.load(), 1);
    EXPECT_EQ(f::aborts.load(), 0);
    f::graphs_gone = true;  // the engine destroyed the graphs
  }  // the communicator's end waits for the abort: no destroy after it
  EXPECT_EQ(f::aborts.load(), 1);
  EXPECT_EQ(f::destroys.load(), 0);
  { auto comm = make_nccl_comm(grokit_host_ops(), &table, &token, nullptr); }
  EXPECT_EQ(f::destroys.load(), 1) << "a communicator that was not aborted is destroyed";
}

// A peer on another host fails: this rank's collectives would wait for it for ever.
// The watchdog sees NCCL's async error, aborts the communicator (off the rank's thread)
// and says why; a communicator that saw no error is destroyed, not aborted.
TEST(NcclDeviceComm, WatchdogAbortsOnAPeersFailureAndSaysWhy) {
  namespace f = fake_nccl;
  GrokitCollectives table = f::table();
  table.comm_async_error = f::comm_async_error;
  int token = 0;
  f::graphs_gone = false;
  f::peer_failed = false;
  const int aborts0 = f::aborts.load(), destroys0 = f::destroys.load();
  {
    auto comm = make_nccl_comm(grokit_host_ops(), &table, &token, nullptr);
    std::this_thread::sleep_for(std::chrono::milliseconds(350));
    EXPECT_GE(f::polls.load(), 2) << "the watchdog does not poll";
    EXPECT_FALSE(comm->aborted());
    f::peer_failed = true;
    const auto t0 = std::chrono::steady_clock::now();
    while (!comm->aborted() && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(3))
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_TRUE(comm->aborted()) << "the watchdog did not abort within 3 s";
    EXPECT_NE(comm->abort_reason().find("remote process exited"), std::string::npos) << comm->abort_reason();
    std::vector<float> data(4, 1.0f);
    Status s = comm->all_reduce_sum(data.data(), data.size());
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().message.find("remote process exited"), std::string::npos) << s.error().message;
    const int polls = f::polls.load();
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    EXPECT_EQ(f::polls.load(), polls) << "NCCL asked about a communicator being aborted";
    comm->abort();  // the engine's abort after the failed step: once is enough
    f::graphs_gone = true;
  }
  EXPECT_EQ(f::aborts.load(), aborts0 + 1);
  EXPECT_EQ(f::destroys.load(), destroys0);
  f::peer_failed = false;
  { auto comm = make_nccl_comm(grokit_host_ops(), &table, &token, nullptr); }
  EXPECT_EQ(f::aborts.load(), aborts0 + 1);
  EXPECT_EQ(f::destroys.load(), destroys0 + 1) << "a communicator that saw no error is destroyed";
}

}  // namespace
}  // namespace grokit::runner
