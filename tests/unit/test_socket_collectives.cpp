// runner/socket_collectives.h: the TCP collectives of the host backend across hosts, with
// one thread per rank on localhost. All-reduce gives kernels::tree_sum over the ranks in
// rank order (the in-process communicator's bits), all-gather concatenates in rank order,
// broadcast works from every root, a rank running another collective is refused with a
// message, and aborting a communicator releases a rank waiting in it.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/ops.h"
#include "runner/socket_collectives.h"

namespace grokit::runner {
namespace {

const GrokitCollectives& table() { return *socket_collectives(); }

// Makes `world` communicators over one id (rank 0 in this process, as the leader does).
std::vector<void*> make_group(int world) {
  GrokitNcclId id{};
  EXPECT_EQ(table().unique_id(&id), GROKIT_OK) << grokit_host_ops()->error_message();
  EXPECT_TRUE(socket_id_set_host(&id, "127.0.0.1").ok());
  std::vector<void*> comms(static_cast<size_t>(world), nullptr);
  for (int r = 0; r < world; ++r)
    EXPECT_EQ(table().comm_init(&comms[static_cast<size_t>(r)], world, &id, r), GROKIT_OK)
        << grokit_host_ops()->error_message();
  return comms;
}

// body(rank, comm) -> error message ("" = ok), on one thread per rank.
std::vector<std::string> run_ranks(const std::vector<void*>& comms, const std::function<std::string(int, void*)>& body) {
  std::vector<std::string> out(comms.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < comms.size(); ++r)
    threads.emplace_back([&, r] { out[r] = body(static_cast<int>(r), comms[r]); });
  for (auto& t : threads) t.join();
  return out;
}

std::string rc_message(int rc) { return rc == GROKIT_OK ? "" : grokit_host_ops()->error_message(); }

TEST(SocketCollectives, AllReduceIsTheRankOrderTree) {
  for (int world : {1, 2, 3, 5}) {
    auto comms = make_group(world);
    const size_t n = 1001;
    // Values whose sum depends on the order: large and small of both signs.
    auto value = [](int r, size_t i) {
      return static_cast<float>((r % 2 ? -1.0 : 1.0) * (1e7 * ((i + r) % 3)) + 0.37 * static_cast<double>(i) + r);
    };
    std::vector<std::vector<float>> got(static_cast<size_t>(world), std::vector<float>(n));
    auto errors = run_ranks(comms, [&](int r, void* c) {
      std::vector<float> x(n);
      for (size_t i = 0; i < n; ++i) x[i] = value(r, i);
      return rc_message(table().all_reduce_sum(x.data(), got[static_cast<size_t>(r)].data(), n, c, nullptr));
    });
    for (int r = 0; r < world; ++r) ASSERT_EQ(errors[static_cast<size_t>(r)], "") << "world " << world << ", rank " << r;
    std::vector<float> v(static_cast<size_t>(world));
    for (size_t i = 0; i < n; ++i) {
      for (int r = 0; r < world; ++r) v[static_cast<size_t>(r)] = value(r, i);
      const float want = kernels::tree_sum(v.data(), world);
      for (int r = 0; r < world; ++r)
        ASSERT_EQ(std::memcmp(&got[static_cast<size_t>(r)][i], &want, sizeof want), 0)
            << "world " << world << ", rank " << r << ", element " << i;
    }
    for (void* c : comms) EXPECT_EQ(table().comm_destroy(c), GROKIT_OK);
  }
}

TEST(SocketCollectives, AllGatherAndBroadcastFromEveryRoot) {
  const int world = 4;
  auto comms = make_group(world);
  const size_t bytes = 37;
  std::vector<std::vector<uint8_t>> gathered(world, std::vector<uint8_t>(bytes * world));
  std::vector<std::vector<uint8_t>> cast(world, std::vector<uint8_t>(bytes * world));
  auto errors = run_ranks(comms, [&](int r, void* c) {
    std::vector<uint8_t> mine(bytes);
    for (size_t i = 0; i < bytes; ++i) mine[i] = static_cast<uint8_t>(r * 50 + i);
    if (int rc = table().all_gather(mine.data(), gathered[static_cast<size_t>(r)].data(), bytes, c, nullptr)) return rc_message(rc);
    for (int root = 0; root < world; ++root) {
      uint8_t* d = cast[static_cast<size_t>(r)].data() + static_cast<size_t>(root) * bytes;
      if (r == root) std::memcpy(d, mine.data(), bytes);
      if (int rc = table().broadcast(d, bytes, root, c, nullptr)) return rc_message(rc);
    }
    return std::string();
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(errors[static_cast<size_t>(r)], "");
    for (int q = 0; q < world; ++q)
      for (size_t i = 0; i < bytes; ++i) {
        const uint8_t want = static_cast<uint8_t>(q * 50 + i);
        ASSERT_EQ(gathered[static_cast<size_t>(r)][q * bytes + i], want) << "gather: rank " << r << " from " << q;
        ASSERT_EQ(cast[static_cast<size_t>(r)][q * bytes + i], want) << "broadcast: rank " << r << " from root " << q;
      }
  }
  for (void* c : comms) EXPECT_EQ(table().comm_destroy(c), GROKIT_OK);
}

TEST(SocketCollectives, ARankRunningAnotherCollectiveIsRefused) {
  auto comms = make_group(2);
  auto errors = run_ranks(comms, [&](int r, void* c) {
    std::vector<float> x(r == 0 ? 10 : 11, 1.0f), y(x.size());
    return rc_message(table().all_reduce_sum(x.data(), y.data(), x.size(), c, nullptr));
  });
  EXPECT_NE(errors[0].find("rank 1 ran another collective"), std::string::npos) << errors[0];
  int failed = 0;
  char why[256] = {0};
  ASSERT_EQ(table().comm_async_error(comms[0], &failed, why, sizeof why), GROKIT_OK);
  EXPECT_EQ(failed, 1);
  EXPECT_NE(std::string(why).find("another collective"), std::string::npos) << why;
  // Rank 1 waits for a reply that will not come: aborting rank 0 closes its side.
  for (void* c : comms) EXPECT_EQ(table().comm_abort(c), GROKIT_OK);
}

TEST(SocketCollectives, AbortReleasesARankWaitingInACollective) {
  auto comms = make_group(2);
  std::string err;
  const auto t0 = std::chrono::steady_clock::now();
  std::thread waiter([&] {  // rank 1 alone: rank 0 never joins the all-reduce
    std::vector<float> x(8, 1.0f), y(8);
    err = rc_message(table().all_reduce_sum(x.data(), y.data(), x.size(), comms[1], nullptr));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(table().comm_abort(comms[1]), GROKIT_OK);
  waiter.join();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  EXPECT_NE(err, "");
  EXPECT_EQ(table().comm_abort(comms[0]), GROKIT_OK);
}

TEST(SocketCollectives, IdsAreChecked) {
  GrokitNcclId junk{};
  void* c = nullptr;
  EXPECT_NE(table().comm_init(&c, 2, &junk, 1), GROKIT_OK);
  EXPECT_NE(std::string(grokit_host_ops()->error_message()).find("not a socket collectives id"), std::string::npos);
  EXPECT_FALSE(socket_id_set_host(&junk, "127.0.0.1").ok());
  GrokitNcclId id{};
  ASSERT_EQ(table().unique_id(&id), GROKIT_OK);
  EXPECT_FALSE(socket_id_set_host(&id, "").ok());
  EXPECT_FALSE(socket_id_set_host(&id, std::string(200, 'h')).ok());
  EXPECT_NE(table().comm_init(&c, 2, &id, 2), GROKIT_OK) << "rank 2 of 2";
  // Rank 0 takes the listener its process made; destroying it while it waits for its
  // peers stops the wait.
  ASSERT_EQ(table().comm_init(&c, 2, &id, 0), GROKIT_OK);
  EXPECT_EQ(table().comm_destroy(c), GROKIT_OK);
  EXPECT_NE(table().comm_init(&c, 2, &id, 0), GROKIT_OK) << "a second rank 0 for the same id";
}

}  // namespace
}  // namespace grokit::runner
