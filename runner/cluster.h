// grokit cluster: the multi-host bootstrap and command channel (`grokit run --hosts
// leader:port --host-rank K`). One process per host; no GPU is involved here.
//
// Protocol. The leader (host rank 0) binds a ZeroMQ ROUTER on every interface at the
// port; each follower connects a DEALER to leader:port. ZeroMQ reconnects until the
// leader is there, so followers may start first. Every message is one frame: an 8-byte
// header ("GKCL", u16 protocol version, u8 kind, u8 0) and a little-endian body.
//   1. follower -> leader  HELLO    host rank, host count, TP, first rank, rank count,
//                                   model id, version, settings.
//   2. The leader collects H-1 hellos (join_timeout) and checks each as it arrives:
//      same protocol, version, host count, model id, settings and TP as its own; host rank in
//      [1, H) and not seen before; ranks inside [0, TP) and overlapping no other host's.
//      With all hellos in, the hosts' ranks must cover [0, TP).
//   3. leader -> follower  WELCOME  the roster (every host's ranks) and the payload (the
//                                   NCCL unique id), or REFUSE with the reason, sent to
//                                   every follower seen; both sides then return an error.
//                                   (A REFUSE after the welcome: the leader gave up.)
//   4. follower -> leader  ACK #0   the welcome is taken; the leader's join returns when
//                                   every follower has acked (message_timeout).
//   5. leader -> follower  COMMAND #1, #2, ... in order; each follower ACKs each one, in
//                                   order, with ok or a failure message.
//   6. leader -> follower  BYE      on close(); the follower answers BYE-ACK.
// While it waits, the leader sends PING to followers that owe it an ack, every
// `heartbeat`; a follower whose connection is gone fails the wait at once. A follower
// watches its connection (a socket monitor) and fails on a disconnect. ZeroMQ heartbeats
// (every `heartbeat`, dead after 10 of them) drop connections to hosts that vanish.
// Any lost connection is final: messages may have been lost with it.
//
// One thread uses a Cluster. Nothing throws; errors name the host and the address.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/common.h"
#include "runner/runner.h"

namespace grokit::runner {

// A timeout that never expires.
inline constexpr std::chrono::milliseconds kWaitForever{-1};

struct ClusterOptions {
  std::string leader;      // "host:port" or "[v6addr]:port"; the leader binds the port on
                           // every interface (port 0 on the leader: any free port)
  int host_rank = 0;       // 0: the leader
  int hosts = 1;
  std::chrono::milliseconds join_timeout{120000};     // for every follower to appear
  std::chrono::milliseconds message_timeout{120000};  // per message or ack
  std::chrono::milliseconds heartbeat{1000};          // probes and ZeroMQ heartbeats
  std::chrono::milliseconds close_timeout{2000};      // close(): BYE acks, flushing
};

// What a host says about itself when it joins.
struct HostHello {
  std::string model_id;    // opaque: the converted model's identity
  int tp = 1;              // tensor-parallel degree of the model
  int first_rank = 0;      // this host drives ranks [first_rank, first_rank + rank_count)
  int rank_count = 1;
  std::string version;     // the grokit version; must match everywhere
  std::string settings;    // opaque: the engine settings that shape each step's work (how a
                           // prompt is cut into forward steps); must match everywhere
};

struct JoinResult {
  std::vector<uint8_t> payload;   // the leader's payload (the NCCL unique id)
  std::vector<HostHello> hosts;   // indexed by host rank
};

// A command as a follower receives it.
struct ClusterCommand {
  uint64_t seq = 0;               // 1, 2, 3, ...
  std::vector<uint8_t> bytes;
};

class Cluster {
 public:
  // The leader binds its port; a follower connects (and returns before the leader is up).
  static Result<std::unique_ptr<Cluster>> open(const ClusterOptions& options);
  ~Cluster();  // linger 0: returns at once, sends nothing
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  bool is_leader() const;
  int host_rank() const;
  int hosts() const;
  int port() const;  // the port bound (leader) or connected to (follower)

  // Runs steps 1-4 above. The leader passes the payload (at most 64 KiB); followers pass
  // nothing and get it back.
  Result<JoinResult> join(const HostHello& self, std::span<const uint8_t> payload = {});

  // Leader: sends a command to every follower; returns its sequence number. Does not
  // wait, so the leader can take its own part in the step before wait().
  Result<uint64_t> send(std::span<const uint8_t> bytes);
  // Leader: waits until every follower has acked every command up to `seq`. A failure
  // acked by a follower is returned (naming the host and its message) and the channel
  // stays usable; a timeout or a lost follower breaks the cluster for good.
  Status wait(uint64_t seq);
  Status wait(uint64_t seq, std::chrono::milliseconds timeout);
  Status broadcast(std::span<const uint8_t> bytes);  // send + wait

  // Follower: the next command, in order. Ack each one before receiving the next. A
  // timeout is an error but the channel stays usable; BYE or a lost leader is final.
  Result<ClusterCommand> receive();
  Result<ClusterCommand> receive(std::chrono::milliseconds timeout);  // or kWaitForever
  Status ack(uint64_t seq, const Status& outcome);

  // Orderly close. Leader: BYE to every follower, then waits up to close_timeout for
  // their BYE-ACKs (or for their connections to close). Follower: flushes its last acks
  // (up to close_timeout). Idempotent; later calls of anything else fail.
  Status close();

  struct Impl;

 private:
  explicit Cluster(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------
// Commands of the device engine, as the leader sends them. Encoding (little-endian):
//   u8 kind, then  kOpenSequence: i64 capacity, i32 slot (the slot the leader got)
//                  kCloseSequence: i32 slot
//                  kStep: u32 rows, each: i32 slot, u8 logits (0 none, 1 last, 2 all),
//                         u32 n, n x i32 tokens
//                  kShutdown: nothing
//                  kLoaded: nothing (the leader has its shards; each follower acks once
//                           it has its own)
//                  kStartCollectives: nothing (every host has loaded: NCCL may start)
// decode_command treats its input as hostile: every count is checked against the bytes
// that remain, and errors name the byte offset.
enum class CommandKind : uint8_t { kOpenSequence = 1, kCloseSequence = 2, kStep = 3, kShutdown = 4, kLoaded = 5,
                                  kStartCollectives = 6 };

struct CommandRow {
  int32_t slot = 0;
  StepRow::Logits logits = StepRow::Logits::kLast;
  std::vector<int32_t> tokens;
};

struct EngineCommand {
  CommandKind kind = CommandKind::kShutdown;
  int64_t capacity = 0;          // kOpenSequence
  int32_t slot = 0;              // kOpenSequence, kCloseSequence
  std::vector<CommandRow> rows;  // kStep
  // The rows as Engine::step takes them (views into `rows`).
  std::vector<StepRow> step_rows() const;
};

std::vector<uint8_t> encode_open_sequence(int64_t capacity, int32_t slot);
std::vector<uint8_t> encode_close_sequence(int32_t slot);
std::vector<uint8_t> encode_step(std::span<const StepRow> rows);
std::vector<uint8_t> encode_shutdown();
std::vector<uint8_t> encode_loaded();
std::vector<uint8_t> encode_start_collectives();
Result<EngineCommand> decode_command(std::span<const uint8_t> bytes);

}  // namespace grokit::runner
