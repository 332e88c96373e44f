// Tests of the multi-host bootstrap (runner/cluster.h) on 127.0.0.1, no GPU: a leader
// and 1-3 followers as threads, and followers as separate processes (this binary run
// again as ClusterChild.DISABLED_Follower, which a plain run does not list). The payload arrives intact, commands arrive in order
// with acks (also pipelined), failures acked by a follower reach the leader, each kind
// of disagreement is refused with a message naming it on both sides, a missing, hung or
// dead follower and a dead leader end in errors within their timeouts, followers may
// start before the leader, and the command codec rejects hostile bytes with offsets.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <zmq.hpp>

#include "runner/cluster.h"

extern char** environ;

namespace grokit::runner {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------
// Helpers.
::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << text << "\" does not contain \"" << part << "\"";
}
#define EXPECT_HAS(text, part) EXPECT_TRUE(contains((text), (part)))

// A port nothing listens on (the OS picks it; closed again at once).
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ADD_FAILURE() << "cannot find a free port";
    if (fd >= 0) ::close(fd);
    return 0;
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

ClusterOptions options(int port, int host_rank, int hosts) {
  ClusterOptions o;
  o.leader = "127.0.0.1:" + std::to_string(port);
  o.host_rank = host_rank;
  o.hosts = hosts;
  o.join_timeout = 10s;
  o.message_timeout = 10s;
  o.heartbeat = 100ms;
  o.close_timeout = 1s;
  return o;
}

HostHello hello(int tp, int first, int count, std::string model = "model-7f3a", std::string version = "0.1.0") {
  return HostHello{std::move(model), tp, first, count, std::move(version), ""};
}

std::vector<uint8_t> nccl_id() {
  std::vector<uint8_t> id(128);
  for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<uint8_t>(i * 37 + 11);  // every byte value class
  id[0] = 0;
  id[127] = 0xff;
  return id;
}

std::unique_ptr<Cluster> open_or_die(const ClusterOptions& o) {
  auto c = Cluster::open(o);
  EXPECT_TRUE(c.ok()) << c.error().message;
  return c.ok() ? std::move(c).value() : nullptr;
}

// The commands a leader sends in the longer tests: open, steps, close, shutdown.
std::vector<std::vector<uint8_t>> script() {
  std::vector<std::vector<uint8_t>> out;
  out.push_back(encode_open_sequence(4096, 0));
  out.push_back(encode_open_sequence(128, 1));
  for (int i = 0; i < 40; ++i) {
    std::vector<int32_t> a(static_cast<size_t>(1 + i % 7)), b{i, -i, 131071};
    for (size_t k = 0; k < a.size(); ++k) a[k] = static_cast<int32_t>(i * 1000 + k);
    StepRow rows[2] = {{0, a, StepRow::Logits::kLast}, {1, b, i % 2 ? StepRow::Logits::kAll : StepRow::Logits::kNone}};
    out.push_back(encode_step(rows));
  }
  out.push_back(encode_close_sequence(1));
  out.push_back(encode_shutdown());
  return out;
}

// What one follower saw.
struct FollowerLog {
  std::string join_error;  // empty when it joined
  JoinResult joined;
  std::vector<ClusterCommand> commands;
  std::string end;         // "shutdown", or the error that ended its loop
  Clock::duration end_after{};
};

// Joins, then receives, (optionally) handles and acks commands until shutdown or an
// error. on_command's status is what the follower acks.
FollowerLog run_follower(const ClusterOptions& o, const HostHello& h,
                         const std::function<Status(const ClusterCommand&)>& on_command = {},
                         std::chrono::milliseconds receive_timeout = 10s) {
  FollowerLog log;
  auto c = Cluster::open(o);
  if (!c.ok()) {
    log.join_error = c.error().message;
    return log;
  }
  auto j = (*c)->join(h);
  if (!j.ok()) {
    log.join_error = j.error().message;
    return log;
  }
  log.joined = std::move(j).value();
  auto start = Clock::now();
  for (;;) {
    auto cmd = (*c)->receive(receive_timeout);
    if (!cmd.ok()) {
      log.end = cmd.error().message;
      break;
    }
    Status outcome = on_command ? on_command(*cmd) : ok_status();
    log.commands.push_back(*cmd);
    Status a = (*c)->ack(cmd->seq, outcome);
    if (!a.ok()) {
      log.end = a.error().message;
      break;
    }
    auto d = decode_command(cmd->bytes);
    if (d.ok() && d->kind == CommandKind::kShutdown) {
      log.end = "shutdown";
      break;
    }
  }
  log.end_after = Clock::now() - start;
  Status closed = (*c)->close();
  EXPECT_TRUE(closed.ok()) << closed.error().message;
  return log;
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---------------------------------------------------------------------------------
// Join and commands with 1, 2 and 3 followers.
class ClusterSizes : public ::testing::TestWithParam<int> {};

TEST_P(ClusterSizes, PayloadArrivesAndCommandsArriveInOrderWithAcks) {
  const int H = GetParam(), TP = 2 * H;
  auto leader = open_or_die(options(0, 0, H));
  ASSERT_TRUE(leader);
  ASSERT_GT(leader->port(), 0);
  EXPECT_TRUE(leader->is_leader());
  std::vector<FollowerLog> logs(static_cast<size_t>(H - 1));
  std::vector<std::thread> threads;
  for (int k = 1; k < H; ++k)
    threads.emplace_back([&, k] { logs[static_cast<size_t>(k - 1)] = run_follower(options(leader->port(), k, H), hello(TP, 2 * k, 2)); });

  auto joined = leader->join(hello(TP, 0, 2), nccl_id());
  ASSERT_TRUE(joined.ok()) << joined.error().message;
  EXPECT_EQ(joined->payload, nccl_id());
  ASSERT_EQ(joined->hosts.size(), static_cast<size_t>(H));
  auto commands = script();
  // One at a time, then pipelined: three sends before one wait.
  for (size_t i = 0; i + 4 < commands.size(); ++i) {
    Status st = leader->broadcast(commands[i]);
    ASSERT_TRUE(st.ok()) << st.error().message;
  }
  uint64_t last = 0;
  for (size_t i = commands.size() - 4; i < commands.size(); ++i) {
    auto seq = leader->send(commands[i]);
    ASSERT_TRUE(seq.ok()) << seq.error().message;
    EXPECT_EQ(*seq, i + 1);
    last = *seq;
  }
  Status st = leader->wait(last);
  EXPECT_TRUE(st.ok()) << st.error().message;
  st = leader->close();
  EXPECT_TRUE(st.ok()) << st.error().message;
  for (auto& t : threads) t.join();

  for (int k = 1; k < H; ++k) {
    const FollowerLog& log = logs[static_cast<size_t>(k - 1)];
    SCOPED_TRACE("host " + std::to_string(k));
    ASSERT_EQ(log.join_error, "");
    EXPECT_EQ(log.joined.payload, nccl_id());
    ASSERT_EQ(log.joined.hosts.size(), static_cast<size_t>(H));
    for (int q = 0; q < H; ++q) {
      EXPECT_EQ(log.joined.hosts[static_cast<size_t>(q)].first_rank, 2 * q);
      EXPECT_EQ(log.joined.hosts[static_cast<size_t>(q)].rank_count, 2);
      EXPECT_EQ(log.joined.hosts[static_cast<size_t>(q)].tp, TP);
    }
    EXPECT_EQ(log.end, "shutdown");
    ASSERT_EQ(log.commands.size(), commands.size());
    for (size_t i = 0; i < commands.size(); ++i) {
      EXPECT_EQ(log.commands[i].seq, i + 1);
      EXPECT_EQ(log.commands[i].bytes, commands[i]) << "command #" << i + 1;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Hosts, ClusterSizes, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) { return std::to_string(info.param) + "hosts"; });

TEST(Cluster, FollowerFailureReachesTheLeaderAndTheChannelGoesOn) {
  auto leader = open_or_die(options(0, 0, 3));
  ASSERT_TRUE(leader);
  std::vector<FollowerLog> logs(2);
  std::vector<std::thread> threads;
  for (int k = 1; k <= 2; ++k)
    threads.emplace_back([&, k] {
      logs[static_cast<size_t>(k - 1)] = run_follower(options(leader->port(), k, 3), hello(3, k, 1), [k](const ClusterCommand& c) {
        if (c.seq == 2 && k == 2) return Status(make_error("open_sequence: capacity 99999 exceeds 8192"));
        return ok_status();
      });
    });
  ASSERT_TRUE(leader->join(hello(3, 0, 1), nccl_id()).ok());
  EXPECT_TRUE(leader->broadcast(encode_open_sequence(10, 0)).ok());
  Status st = leader->broadcast(encode_open_sequence(99999, 1));
  ASSERT_FALSE(st.ok());
  EXPECT_HAS(st.error().message, "command #2 failed on host 2: open_sequence: capacity 99999 exceeds 8192");
  EXPECT_EQ(st.error().message.find("host 1"), std::string::npos) << st.error().message;
  st = leader->broadcast(encode_close_sequence(0));
  EXPECT_TRUE(st.ok()) << st.error().message;
  EXPECT_TRUE(leader->broadcast(encode_shutdown()).ok());
  EXPECT_TRUE(leader->close().ok());
  for (auto& t : threads) t.join();
  for (auto& log : logs) {
    EXPECT_EQ(log.end, "shutdown");
    EXPECT_EQ(log.commands.size(), 4u);
  }
}

// ---------------------------------------------------------------------------------
// Refusals: the leader's error and every follower's name the disagreement.
struct Joiner {
  int host_rank;
  HostHello hello;
};

void expect_refused(int hosts, const HostHello& leader_hello, const std::vector<Joiner>& joiners,
                    const std::string& needle) {
  auto leader = open_or_die(options(0, 0, hosts));
  ASSERT_TRUE(leader);
  std::vector<FollowerLog> logs(joiners.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < joiners.size(); ++i)
    threads.emplace_back([&, i] { logs[i] = run_follower(options(leader->port(), joiners[i].host_rank, hosts), joiners[i].hello); });
  auto joined = leader->join(leader_hello, nccl_id());
  for (auto& t : threads) t.join();
  ASSERT_FALSE(joined.ok());
  EXPECT_HAS(joined.error().message, "refused the cluster");
  EXPECT_HAS(joined.error().message, needle);
  for (size_t i = 0; i < logs.size(); ++i) {
    SCOPED_TRACE("joiner " + std::to_string(i));
    EXPECT_HAS(logs[i].join_error, "127.0.0.1:" + std::to_string(leader->port()) + " refused the cluster");
    EXPECT_HAS(logs[i].join_error, needle);
  }
  // A refused leader stays refused.
  EXPECT_HAS(leader->send(encode_shutdown()).error().message, needle);
}

TEST(ClusterRefusal, DifferentModelId) {
  expect_refused(2, hello(2, 0, 1), {{1, hello(2, 1, 1, "model-0000")}},
                 "host 1 has model id 'model-0000' but the leader has 'model-7f3a'");
}

TEST(ClusterRefusal, DifferentSettings) {
  HostHello mine = hello(2, 0, 1), theirs = hello(2, 1, 1);
  mine.settings = "prefill_chunk=1024";
  theirs.settings = "prefill_chunk=512";
  expect_refused(2, mine, {{1, theirs}},
                 "host 1 runs with settings 'prefill_chunk=512' but the leader with 'prefill_chunk=1024'");
}

TEST(ClusterRefusal, DuplicateHostRank) {
  expect_refused(3, hello(3, 0, 1), {{1, hello(3, 1, 1)}, {1, hello(3, 2, 1)}},
                 "host rank 1 joined twice (two processes claim it)");
}

TEST(ClusterRefusal, WrongTensorParallelDegree) {
  expect_refused(2, hello(2, 0, 1), {{1, hello(4, 1, 1)}}, "host 1 has tensor-parallel degree 4 but the leader has 2");
}

TEST(ClusterRefusal, RanksDoNotCoverTheGroup) {
  expect_refused(2, hello(4, 0, 2), {{1, hello(4, 2, 1)}}, "no host drives rank 3 of [0, 4)");
  expect_refused(3, hello(8, 0, 2), {{1, hello(8, 2, 2)}, {2, hello(8, 6, 2)}}, "no host drives ranks 4, 5 of [0, 8)");
}

TEST(ClusterRefusal, OverlappingRanks) {
  expect_refused(2, hello(4, 0, 2), {{1, hello(4, 1, 3)}}, "host 1 drives ranks [1, 4), which overlap the leader's [0, 2)");
}

TEST(ClusterRefusal, HostRankOutOfRangeVersionAndHostCount) {
  // A follower that believes in 4 hosts, so host rank 3 passes its own open().
  {
    auto leader = open_or_die(options(0, 0, 2));
    ASSERT_TRUE(leader);
    FollowerLog log;
    std::thread t([&] { log = run_follower(options(leader->port(), 3, 4), hello(2, 1, 1)); });
    auto joined = leader->join(hello(2, 0, 1), nccl_id());
    t.join();
    ASSERT_FALSE(joined.ok());
    EXPECT_HAS(joined.error().message, "host 3 expects 4 hosts but the leader expects 2");
    EXPECT_HAS(log.join_error, "host 3 expects 4 hosts but the leader expects 2");
  }
  expect_refused(2, hello(2, 0, 1), {{1, hello(2, 1, 1, "model-7f3a", "0.2.0")}},
                 "host 1 runs version '0.2.0' but the leader runs '0.1.0'");
}

// ---------------------------------------------------------------------------------
// Timeouts and lost hosts.
TEST(Cluster, MissingFollowerMakesTheLeaderTimeOut) {
  ClusterOptions lo = options(0, 0, 3);
  lo.join_timeout = 500ms;
  auto leader = open_or_die(lo);
  ASSERT_TRUE(leader);
  FollowerLog log;
  std::thread t([&] { log = run_follower(options(leader->port(), 1, 3), hello(3, 1, 1)); });
  auto start = Clock::now();
  auto joined = leader->join(hello(3, 0, 1), nccl_id());
  double took = seconds(Clock::now() - start);
  t.join();
  ASSERT_FALSE(joined.ok());
  EXPECT_HAS(joined.error().message, "host 2 did not join within 0.5 s (joined: 1)");
  EXPECT_GE(took, 0.45);
  EXPECT_LT(took, 5.0);
  EXPECT_HAS(log.join_error, "the leader gave up: host 2 did not join within 0.5 s");
}

TEST(Cluster, FollowerWithoutLeaderTimesOutNamingTheAddress) {
  int port = free_port();
  ClusterOptions o = options(port, 1, 2);
  o.join_timeout = 300ms;
  auto start = Clock::now();
  FollowerLog log = run_follower(o, hello(2, 1, 1));
  EXPECT_LT(seconds(Clock::now() - start), 5.0);
  EXPECT_HAS(log.join_error, "host 1: no welcome from the leader at 127.0.0.1:" + std::to_string(port) +
                                        " within 0.3 s");
}

TEST(Cluster, FollowerStartedBeforeTheLeaderJoins) {
  int port = free_port();
  FollowerLog log;
  std::thread t([&] { log = run_follower(options(port, 1, 2), hello(2, 1, 1)); });
  std::this_thread::sleep_for(400ms);
  auto leader = open_or_die(options(port, 0, 2));
  ASSERT_TRUE(leader);
  EXPECT_EQ(leader->port(), port);
  auto joined = leader->join(hello(2, 0, 1), nccl_id());
  ASSERT_TRUE(joined.ok()) << joined.error().message;
  EXPECT_TRUE(leader->broadcast(encode_shutdown()).ok());
  EXPECT_TRUE(leader->close().ok());
  t.join();
  EXPECT_EQ(log.join_error, "");
  EXPECT_EQ(log.joined.payload, nccl_id());
  EXPECT_EQ(log.end, "shutdown");
}

TEST(Cluster, HungFollowerTimesOutAndBreaksTheCluster) {
  auto leader = open_or_die(options(0, 0, 2));
  ASSERT_TRUE(leader);
  std::atomic<bool> release{false};
  FollowerLog log;
  std::thread t([&] {
    log = run_follower(options(leader->port(), 1, 2), hello(2, 1, 1), [&](const ClusterCommand&) {
      while (!release) std::this_thread::sleep_for(10ms);
      return ok_status();
    });
  });
  ASSERT_TRUE(leader->join(hello(2, 0, 1), nccl_id()).ok());
  auto seq = leader->send(encode_close_sequence(0));
  ASSERT_TRUE(seq.ok());
  auto start = Clock::now();
  Status st = leader->wait(*seq, 300ms);
  double took = seconds(Clock::now() - start);
  ASSERT_FALSE(st.ok());
  EXPECT_HAS(st.error().message, "host 1 did not acknowledge command #1 within 0.3 s");
  EXPECT_GE(took, 0.28);
  EXPECT_LT(took, 3.0);
  EXPECT_HAS(leader->send(encode_shutdown()).error().message, "after an earlier failure");
  release = true;
  Status closed = leader->close();  // BYE carries the reason
  EXPECT_TRUE(closed.ok()) << closed.error().message;
  t.join();
  EXPECT_HAS(log.end, "closed the cluster: cluster: leader: host 1 did not acknowledge command #1");
}

TEST(Cluster, DeadFollowerFailsTheLeaderAtOnce) {
  auto leader = open_or_die(options(0, 0, 2));
  ASSERT_TRUE(leader);
  std::thread t([&] {
    auto c = Cluster::open(options(leader->port(), 1, 2));
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE((*c)->join(hello(2, 1, 1)).ok());
    auto cmd = (*c)->receive();
    ASSERT_TRUE(cmd.ok());
    ASSERT_TRUE((*c)->ack(cmd->seq, ok_status()).ok());
    std::this_thread::sleep_for(100ms);  // let the ack leave
    // Destroyed without close(): the connection just drops, as when a process dies.
  });
  ASSERT_TRUE(leader->join(hello(2, 0, 1), nccl_id()).ok());
  ASSERT_TRUE(leader->broadcast(encode_shutdown()).ok());
  t.join();
  auto start = Clock::now();
  auto seq = leader->send(encode_shutdown());
  Status st = seq.ok() ? leader->wait(*seq, 30s) : Status(seq.take_error());
  ASSERT_FALSE(st.ok());
  EXPECT_HAS(st.error().message, "host 1 lost its connection");
  EXPECT_LT(seconds(Clock::now() - start), 5.0);
}

TEST(Cluster, FollowerWaitingForeverSeesTheLeaderDie) {
  auto leader = open_or_die(options(0, 0, 2));
  ASSERT_TRUE(leader);
  FollowerLog log;
  std::thread t([&] { log = run_follower(options(leader->port(), 1, 2), hello(2, 1, 1), {}, kWaitForever); });
  ASSERT_TRUE(leader->join(hello(2, 0, 1), nccl_id()).ok());
  ASSERT_TRUE(leader->broadcast(encode_close_sequence(3)).ok());
  std::this_thread::sleep_for(100ms);
  leader.reset();  // no close(): as if the process died
  t.join();
  EXPECT_HAS(log.end, "host 1: lost the connection to the leader at 127.0.0.1:");
  EXPECT_EQ(log.commands.size(), 1u);
  EXPECT_LT(seconds(log.end_after), 5.0);
}

TEST(Cluster, FollowerWaitingForeverSeesTheLeaderClose) {
  auto leader = open_or_die(options(0, 0, 2));
  ASSERT_TRUE(leader);
  FollowerLog log;
  std::thread t([&] { log = run_follower(options(leader->port(), 1, 2), hello(2, 1, 1), {}, kWaitForever); });
  ASSERT_TRUE(leader->join(hello(2, 0, 1), nccl_id()).ok());
  Status st = leader->close();
  EXPECT_TRUE(st.ok()) << st.error().message;
  t.join();
  EXPECT_HAS(log.end, "host 1: the leader at 127.0.0.1:");
  EXPECT_HAS(log.end, "closed the cluster");
  EXPECT_TRUE(leader->close().ok());  // idempotent
  EXPECT_HAS(leader->send(encode_shutdown()).error().message, "send after close");
}

TEST(Cluster, LateJoinerIsRefused) {
  auto leader = open_or_die(options(0, 0, 2));
  ASSERT_TRUE(leader);
  FollowerLog first, late;
  std::thread t1([&] { first = run_follower(options(leader->port(), 1, 2), hello(2, 1, 1)); });
  ASSERT_TRUE(leader->join(hello(2, 0, 1), nccl_id()).ok());
  std::atomic<bool> late_done{false};
  std::thread t2([&] {
    late = run_follower(options(leader->port(), 1, 2), hello(2, 1, 1));
    late_done = true;
  });
  // The leader reads its socket while it waits for acks.
  for (int i = 0; i < 200 && !late_done; ++i) {
    ASSERT_TRUE(leader->broadcast(encode_close_sequence(0)).ok());
    std::this_thread::sleep_for(20ms);
  }
  t2.join();
  EXPECT_HAS(late.join_error, "refused the cluster: the cluster of 2 hosts is already formed");
  EXPECT_TRUE(leader->broadcast(encode_shutdown()).ok());
  EXPECT_TRUE(leader->close().ok());
  t1.join();
  EXPECT_EQ(first.end, "shutdown");
}

TEST(Cluster, OptionsAndMisuseAreErrors) {
  auto bad = [](const std::string& leader, int rank, int hosts) {
    ClusterOptions o;
    o.leader = leader;
    o.host_rank = rank;
    o.hosts = hosts;
    auto c = Cluster::open(o);
    return c.ok() ? std::string("ok") : c.error().message;
  };
  EXPECT_HAS(bad("localhost", 1, 2), "no port");
  EXPECT_HAS(bad("localhost:", 1, 2), "the port is not a number");
  EXPECT_HAS(bad(":5000", 1, 2), "no host");
  EXPECT_HAS(bad("h:70000", 1, 2), "above 65535");
  EXPECT_HAS(bad("::1:5000", 1, 2), "in brackets");
  EXPECT_HAS(bad("[::1:5000", 1, 2), "no ']'");
  EXPECT_HAS(bad("127.0.0.1:0", 1, 2), "has port 0");
  EXPECT_HAS(bad("127.0.0.1:5000", 2, 2), "host rank 2 is outside [0, 2)");
  EXPECT_HAS(bad("127.0.0.1:5000", 0, 0), "host count 0 is not positive");

  // A bound port cannot be bound twice.
  auto leader = open_or_die(options(0, 0, 1));
  ASSERT_TRUE(leader);
  EXPECT_HAS(bad("127.0.0.1:" + std::to_string(leader->port()), 0, 2), "cannot bind port");
  // Own hello checked; one host alone must drive every rank.
  EXPECT_HAS(leader->join(hello(2, 1, 2), nccl_id()).error().message, "drives ranks [1, 3), outside [0, 2)");
  EXPECT_HAS(leader->join(hello(2, 0, 1), nccl_id()).error().message, "no host drives rank 1 of [0, 2)");
  auto solo = open_or_die(options(0, 0, 1));
  ASSERT_TRUE(solo);
  auto joined = solo->join(hello(2, 0, 2), nccl_id());
  ASSERT_TRUE(joined.ok()) << joined.error().message;
  EXPECT_EQ(joined->payload, nccl_id());
  EXPECT_TRUE(solo->broadcast(encode_shutdown()).ok());  // no followers: nothing to wait for
  EXPECT_HAS(solo->join(hello(2, 0, 2), nccl_id()).error().message, "join called twice");
  auto follower = open_or_die(options(leader->port(), 1, 2));
  ASSERT_TRUE(follower);
  EXPECT_HAS(follower->receive(10ms).error().message, "receive before join");
  EXPECT_HAS(follower->join(hello(2, 1, 1), nccl_id()).error().message, "only the leader passes a payload");
}

// A raw ZeroMQ peer on the leader's port: stray bytes are ignored, a hello cut short is
// refused naming the byte offset, and an IPv6 or host-name address works like an IPv4 one.
TEST(Cluster, StrayPeersAreIgnoredAndMalformedHellosRefused) {
  for (bool truncated : {false, true}) {
    SCOPED_TRACE(truncated ? "truncated hello" : "stray bytes");
    auto leader = open_or_die(options(0, 0, 2));
    ASSERT_TRUE(leader);
    zmq::context_t ctx(1);
    zmq::socket_t raw(ctx, zmq::socket_type::dealer);
    raw.set(zmq::sockopt::linger, 0);
    raw.connect("tcp://127.0.0.1:" + std::to_string(leader->port()));
    if (!truncated) {
      const uint8_t junk[3] = {1, 2, 3};
      ASSERT_TRUE(raw.send(zmq::const_buffer(junk, 3), zmq::send_flags::none));
    } else {
      // Header (protocol 2, HELLO), host rank 1, host count 2, TP 2, and no more.
      std::vector<uint8_t> m = {'G', 'K', 'C', 'L', 2, 0, 1, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0};
      ASSERT_TRUE(raw.send(zmq::buffer(m), zmq::send_flags::none));
    }
    FollowerLog log;
    std::thread t;
    if (!truncated) {
      std::this_thread::sleep_for(50ms);  // the junk first
      t = std::thread([&] { log = run_follower(options(leader->port(), 1, 2), hello(2, 1, 1)); });
    }
    auto joined = leader->join(hello(2, 0, 1), nccl_id());
    if (!truncated) {
      EXPECT_TRUE(joined.ok()) << joined.error().message;
      EXPECT_TRUE(leader->broadcast(encode_shutdown()).ok());
      EXPECT_TRUE(leader->close().ok());
      t.join();
      EXPECT_EQ(log.end, "shutdown");
      continue;
    }
    ASSERT_FALSE(joined.ok());
    EXPECT_HAS(joined.error().message, "a follower sent a malformed hello: first rank at byte 20 needs 4 bytes, 0 remain");
    zmq::message_t reply;
    raw.set(zmq::sockopt::rcvtimeo, 5000);
    ASSERT_TRUE(raw.recv(reply));
    EXPECT_HAS(reply.to_string(), "malformed hello");
  }
}

TEST(Cluster, Ipv6AndHostNameAddresses) {
  ClusterOptions lo = options(0, 0, 3);
  lo.leader = "[::1]:0";
  auto leader = Cluster::open(lo);
  if (!leader.ok()) GTEST_SKIP() << "no IPv6 here: " << leader.error().message;
  const int port = (*leader)->port();
  std::vector<FollowerLog> logs(2);
  ClusterOptions v6 = options(port, 1, 3), named = options(port, 2, 3);
  v6.leader = "[::1]:" + std::to_string(port);
  named.leader = "localhost:" + std::to_string(port);
  std::thread a([&] { logs[0] = run_follower(v6, hello(3, 1, 1)); });
  std::thread b([&] { logs[1] = run_follower(named, hello(3, 2, 1)); });
  auto joined = (*leader)->join(hello(3, 0, 1), nccl_id());
  EXPECT_TRUE(joined.ok()) << joined.error().message;
  if (joined.ok()) {
    EXPECT_TRUE((*leader)->broadcast(encode_shutdown()).ok());
  }
  EXPECT_TRUE((*leader)->close().ok());
  a.join();
  b.join();
  for (auto& log : logs) {
    EXPECT_EQ(log.join_error, "");
    EXPECT_EQ(log.joined.payload, nccl_id());
  }
}

// ---------------------------------------------------------------------------------
// Followers as separate processes: this binary again, running ClusterChild.DISABLED_Follower.
constexpr const char* kChildEnv = "GROKIT_CLUSTER_CHILD";  // "port host_rank hosts"

pid_t spawn_follower(int port, int host_rank, int hosts) {
  std::string self(4096, '\0');
  ssize_t n = readlink("/proc/self/exe", self.data(), self.size() - 1);
  if (n <= 0) return -1;
  self.resize(static_cast<size_t>(n));
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  env.push_back(std::string(kChildEnv) + "=" + std::to_string(port) + " " + std::to_string(host_rank) + " " +
                std::to_string(hosts));
  std::vector<std::string> args = {self, "--gtest_filter=ClusterChild.DISABLED_Follower",
                                   "--gtest_also_run_disabled_tests", "--gtest_brief=1"};
  std::vector<char*> argv, envp;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), envp.data()) != 0) return -1;
  return pid;
}

// The child's wait status, or -1 when it had not ended within the limit (then killed).
int wait_child(pid_t pid, std::chrono::seconds limit) {
  auto deadline = Clock::now() + limit;
  int status = 0;
  while (Clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) return status;
    std::this_thread::sleep_for(10ms);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

TEST(ClusterChild, DISABLED_Follower) {
  const char* spec = std::getenv(kChildEnv);
  ASSERT_NE(spec, nullptr) << "runs only as a child of ClusterProcesses tests";
  int port = 0, host_rank = 0, hosts = 0;
  ASSERT_EQ(std::sscanf(spec, "%d %d %d", &port, &host_rank, &hosts), 3);
  ClusterOptions o = options(port, host_rank, hosts);
  o.join_timeout = 30s;
  FollowerLog log = run_follower(o, hello(2 * hosts, 2 * host_rank, 2), [](const ClusterCommand& c) {
    auto d = decode_command(c.bytes);
    return d.ok() ? ok_status() : Status(d.take_error());
  });
  ASSERT_EQ(log.join_error, "");
  EXPECT_EQ(log.joined.payload, nccl_id());
  EXPECT_EQ(log.end, "shutdown");
  auto expected = script();
  ASSERT_EQ(log.commands.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(log.commands[i].seq, i + 1);
    EXPECT_EQ(log.commands[i].bytes, expected[i]) << "command #" << i + 1;
  }
}

TEST(ClusterProcesses, FollowersInOtherProcessesStartedFirst) {
  if (std::getenv(kChildEnv) != nullptr) GTEST_SKIP() << "a child run";
  const int H = 3;
  int port = free_port();
  std::vector<pid_t> children;
  for (int k = 1; k < H; ++k) {
    pid_t pid = spawn_follower(port, k, H);
    ASSERT_GT(pid, 0) << "posix_spawn failed";
    children.push_back(pid);
  }
  std::this_thread::sleep_for(300ms);  // the followers connect to nothing yet
  auto leader = open_or_die(options(port, 0, H));
  ASSERT_TRUE(leader);
  auto joined = leader->join(hello(2 * H, 0, 2), nccl_id());
  EXPECT_TRUE(joined.ok()) << joined.error().message;
  if (joined.ok()) {
    for (auto& c : script()) {
      Status st = leader->broadcast(c);
      ASSERT_TRUE(st.ok()) << st.error().message;
    }
    EXPECT_TRUE(leader->close().ok());
  }
  for (pid_t pid : children) {
    int status = wait_child(pid, 60s);
    EXPECT_TRUE(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "follower process " << pid << " ended with wait status " << status;
  }
}

TEST(ClusterProcesses, KilledFollowerProcessFailsTheLeaderAtOnce) {
  if (std::getenv(kChildEnv) != nullptr) GTEST_SKIP() << "a child run";
  auto leader = open_or_die(options(0, 0, 2));
  ASSERT_TRUE(leader);
  pid_t pid = spawn_follower(leader->port(), 1, 2);
  ASSERT_GT(pid, 0);
  auto joined = leader->join(hello(4, 0, 2), nccl_id());
  ASSERT_TRUE(joined.ok()) << joined.error().message;
  auto commands = script();
  ASSERT_TRUE(leader->broadcast(commands[0]).ok());
  kill(pid, SIGKILL);
  int status = wait_child(pid, 10s);
  EXPECT_TRUE(status != -1 && WIFSIGNALED(status));
  auto start = Clock::now();
  auto seq = leader->send(commands[1]);
  Status st = seq.ok() ? leader->wait(*seq, 30s) : Status(seq.take_error());
  ASSERT_FALSE(st.ok());
  EXPECT_HAS(st.error().message, "host 1 lost its connection");
  EXPECT_LT(seconds(Clock::now() - start), 5.0);
}

// ---------------------------------------------------------------------------------
// The engine command codec.
TEST(ClusterCodec, RoundTrips) {
  auto open = decode_command(encode_open_sequence(8192, 5));
  ASSERT_TRUE(open.ok()) << open.error().message;
  EXPECT_EQ(open->kind, CommandKind::kOpenSequence);
  EXPECT_EQ(open->capacity, 8192);
  EXPECT_EQ(open->slot, 5);
  auto close = decode_command(encode_close_sequence(7));
  ASSERT_TRUE(close.ok());
  EXPECT_EQ(close->kind, CommandKind::kCloseSequence);
  EXPECT_EQ(close->slot, 7);
  auto shut = decode_command(encode_shutdown());
  ASSERT_TRUE(shut.ok());
  EXPECT_EQ(shut->kind, CommandKind::kShutdown);
  auto loaded = decode_command(encode_loaded());
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->kind, CommandKind::kLoaded);
  auto start = decode_command(encode_start_collectives());
  ASSERT_TRUE(start.ok());
  EXPECT_EQ(start->kind, CommandKind::kStartCollectives);
  std::vector<uint8_t> loaded_and_more = encode_loaded();
  loaded_and_more.push_back(0);
  EXPECT_FALSE(decode_command(loaded_and_more).ok()) << "kLoaded carries nothing";

  std::vector<int32_t> a{1, 2, 3, -4, INT32_MAX}, b{}, c{131071};
  StepRow rows[3] = {{0, a, StepRow::Logits::kAll}, {9, b, StepRow::Logits::kNone}, {2, c, StepRow::Logits::kLast}};
  auto bytes = encode_step(rows);
  EXPECT_EQ(bytes.size(), 1 + 4 + 3 * 9 + 4 * (5 + 0 + 1));
  auto step = decode_command(bytes);
  ASSERT_TRUE(step.ok()) << step.error().message;
  ASSERT_EQ(step->kind, CommandKind::kStep);
  auto back = step->step_rows();
  ASSERT_EQ(back.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(back[i].slot, rows[i].slot);
    EXPECT_EQ(back[i].logits, rows[i].logits);
    EXPECT_TRUE(std::equal(back[i].tokens.begin(), back[i].tokens.end(), rows[i].tokens.begin(), rows[i].tokens.end()));
  }
  EXPECT_EQ(encode_step(back), bytes);
}

TEST(ClusterCodec, RejectsTruncatedMessagesAtEveryLength) {
  std::vector<int32_t> a{10, 11, 12}, b{20};
  StepRow rows[2] = {{0, a, StepRow::Logits::kLast}, {1, b, StepRow::Logits::kAll}};
  for (const auto& full : {encode_step(rows), encode_open_sequence(100, 2), encode_close_sequence(3)}) {
    for (size_t n = 0; n < full.size(); ++n) {
      auto d = decode_command(std::span<const uint8_t>(full.data(), n));
      ASSERT_FALSE(d.ok()) << "prefix of " << n << " bytes accepted";
      EXPECT_HAS(d.error().message, "at byte") << d.error().message;
    }
  }
  // The second row's token count: 1 kind + 4 rows + (9 + 12) row 0 + 4 slot + 1 mode = byte 31.
  auto full = encode_step(rows);
  auto d = decode_command(std::span<const uint8_t>(full.data(), full.size() - 2));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().message, "engine command: token count 1 needs 4 bytes but 2 remain at byte 31");
  d = decode_command(std::span<const uint8_t>(full.data(), 3));
  EXPECT_EQ(d.error().message, "engine command: row count at byte 1 needs 4 bytes, 2 remain");
}

TEST(ClusterCodec, RejectsOversizedAndBadFields) {
  std::vector<int32_t> a{10, 11, 12};
  StepRow rows[1] = {{0, a, StepRow::Logits::kLast}};
  auto step = encode_step(rows);

  auto trailing = step;
  trailing.push_back(0);
  EXPECT_EQ(decode_command(trailing).error().message,
            "engine command: 1 unexpected bytes at byte 26 (the message ends there)");
  auto extra = encode_shutdown();
  extra.push_back(4);
  EXPECT_HAS(decode_command(extra).error().message, "1 unexpected bytes at byte 1");

  auto huge_rows = step;
  store_le<uint32_t>(huge_rows.data() + 1, 0xffffffffu);
  EXPECT_EQ(decode_command(huge_rows).error().message,
            "engine command: row count 4294967295 needs at least 38654705655 bytes but 21 remain at byte 1");
  auto huge_tokens = step;
  store_le<uint32_t>(huge_tokens.data() + 10, 1u << 30);
  EXPECT_EQ(decode_command(huge_tokens).error().message,
            "engine command: token count 1073741824 needs 4294967296 bytes but 12 remain at byte 10");
  auto more_tokens = step;
  store_le<uint32_t>(more_tokens.data() + 10, 4);
  EXPECT_HAS(decode_command(more_tokens).error().message, "token count 4 needs 16 bytes but 12 remain at byte 10");

  auto bad_mode = step;
  bad_mode[9] = 3;
  EXPECT_EQ(decode_command(bad_mode).error().message, "engine command: logits mode 3 is not 0, 1 or 2 at byte 9");
  auto bad_slot = step;
  store_le<int32_t>(bad_slot.data() + 5, -1);
  EXPECT_EQ(decode_command(bad_slot).error().message, "engine command: slot -1 is negative at byte 5");
  EXPECT_EQ(decode_command(encode_open_sequence(0, 1)).error().message,
            "engine command: capacity 0 is not positive at byte 1");
  std::vector<uint8_t> unknown{9};
  EXPECT_EQ(decode_command(unknown).error().message, "engine command: unknown kind 9 at byte 0");
  EXPECT_EQ(decode_command({}).error().message, "engine command: kind at byte 0 needs 1 bytes, 0 remain");
}

}  // namespace
}  // namespace grokit::runner
