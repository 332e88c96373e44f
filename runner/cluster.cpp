// The multi-host bootstrap and command channel over ZeroMQ (see cluster.h for the
// protocol). cppzmq throws zmq::error_t; every public entry point catches it.
#include "runner/cluster.h"

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <iterator>
#include <optional>

namespace grokit::runner {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr char kMagic[4] = {'G', 'K', 'C', 'L'};
constexpr uint16_t kProtocol = 2;  // 2: HELLO carries the settings
constexpr size_t kHeaderBytes = 8;
constexpr size_t kMaxPayload = 64 * 1024;
constexpr size_t kMaxText = 4096;                     // model id, version, reasons
constexpr int64_t kMaxToLeader = 1 << 20;             // hellos and acks
constexpr int64_t kMaxToFollower = int64_t{256} << 20;
constexpr uint64_t kMaxCommand = (uint64_t{256} << 20) - 64;
constexpr const char* kMonitorEndpoint = "inproc://grokit-cluster-monitor";

enum class Kind : uint8_t { kHello = 1, kWelcome, kRefuse, kCommand, kAck, kPing, kBye, kByeAck };

std::string duration_text(milliseconds t) {
  if (t.count() < 0) return "ever";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g s", static_cast<double>(t.count()) / 1000.0);
  return buf;
}

std::string ranks_text(int first, int count) { return str_cat("[", first, ", ", first + count, ")"); }

std::string host_list(const std::vector<int>& hosts) {
  std::string s;
  for (size_t i = 0; i < hosts.size(); ++i) s += (i ? ", " : "") + std::to_string(hosts[i]);
  return s;
}

// A deadline that may be "never".
class Deadline {
 public:
  explicit Deadline(milliseconds t) : forever_(t.count() < 0), at_(Clock::now() + (forever_ ? milliseconds(0) : t)) {}
  bool expired() const { return !forever_ && Clock::now() >= at_; }
  // Time left, rounded up, capped at `cap` (cap < 0: no cap); -1 for forever uncapped.
  milliseconds left(milliseconds cap = milliseconds(-1)) const {
    if (forever_) return cap;
    auto d = std::chrono::ceil<milliseconds>(at_ - Clock::now());
    if (d.count() < 0) d = milliseconds(0);
    return cap.count() >= 0 ? std::min(d, cap) : d;
  }

 private:
  bool forever_;
  Clock::time_point at_;
};

// ---------------------------------------------------------------------------------
// Little-endian encoding; the Reader treats its input as hostile.
class Writer {
 public:
  Writer() = default;
  explicit Writer(Kind kind) {
    buf_.reserve(64);
    for (char c : kMagic) put<uint8_t>(static_cast<uint8_t>(c));
    put<uint16_t>(kProtocol);
    put<uint8_t>(static_cast<uint8_t>(kind));
    put<uint8_t>(0);
  }
  template <class T>
  void put(T v) {
    size_t at = buf_.size();
    buf_.resize(at + sizeof(T));
    store_le<T>(buf_.data() + at, v);
  }
  void bytes(std::span<const uint8_t> b) {
    GROKIT_CHECK(b.size() <= UINT32_MAX);
    put<uint32_t>(static_cast<uint32_t>(b.size()));
    buf_.insert(buf_.end(), b.begin(), b.end());
  }
  void text(std::string_view s) { bytes({reinterpret_cast<const uint8_t*>(s.data()), s.size()}); }
  std::vector<uint8_t> take() { return std::move(buf_); }

 private:
  std::vector<uint8_t> buf_;
};

class Reader {
 public:
  Reader(std::span<const uint8_t> data, std::string what, size_t start = 0)
      : data_(data), what_(std::move(what)), pos_(start) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return data_.size() - pos_; }

  template <class T>
  Status get(T* v, const char* field) {
    if (remaining() < sizeof(T))
      return make_error(what_, ": ", field, " at byte ", pos_, " needs ", sizeof(T), " bytes, ", remaining(),
                        " remain");
    *v = load_le<T>(data_.data() + pos_);
    pos_ += sizeof(T);
    return {};
  }
  Status bytes(std::vector<uint8_t>* out, const char* field, size_t max) {
    size_t at = pos_;
    uint32_t n = 0;
    GROKIT_TRY(get(&n, field));
    if (n > max) return make_error(what_, ": ", field, " at byte ", at, " is ", n, " bytes; at most ", max);
    if (n > remaining())
      return make_error(what_, ": ", field, " at byte ", at, " is ", n, " bytes but ", remaining(), " remain");
    out->assign(data_.begin() + static_cast<ptrdiff_t>(pos_), data_.begin() + static_cast<ptrdiff_t>(pos_ + n));
    pos_ += n;
    return {};
  }
  Status text(std::string* out, const char* field, size_t max = kMaxText) {
    std::vector<uint8_t> b;
    GROKIT_TRY(bytes(&b, field, max));
    out->assign(b.begin(), b.end());
    return {};
  }
  Status finish() const {
    if (remaining())
      return make_error(what_, ": ", remaining(), " unexpected bytes at byte ", pos_, " (the message ends there)");
    return {};
  }
  Error error(size_t at, const std::string& msg) const { return make_error(what_, ": ", msg, " at byte ", at); }

 private:
  std::span<const uint8_t> data_;
  std::string what_;
  size_t pos_;
};

// The header: nullopt when the message is not ours at all.
struct Header {
  uint16_t protocol;
  Kind kind;
};
std::optional<Header> read_header(std::span<const uint8_t> m) {
  if (m.size() < kHeaderBytes || std::memcmp(m.data(), kMagic, 4) != 0) return std::nullopt;
  return Header{load_le<uint16_t>(m.data() + 4), static_cast<Kind>(m[6])};
}

struct Hello {
  int host_rank = 0;
  int hosts = 0;
  HostHello self;
};

std::vector<uint8_t> encode_hello(const Hello& h) {
  Writer w(Kind::kHello);
  w.put<uint32_t>(static_cast<uint32_t>(h.host_rank));
  w.put<uint32_t>(static_cast<uint32_t>(h.hosts));
  w.put<uint32_t>(static_cast<uint32_t>(h.self.tp));
  w.put<uint32_t>(static_cast<uint32_t>(h.self.first_rank));
  w.put<uint32_t>(static_cast<uint32_t>(h.self.rank_count));
  w.text(h.self.model_id);
  w.text(h.self.version);
  w.text(h.self.settings);
  return w.take();
}

Result<Hello> decode_hello(std::span<const uint8_t> m) {
  Reader r(m, "hello", kHeaderBytes);
  uint32_t v[5];
  const char* names[5] = {"host rank", "host count", "TP", "first rank", "rank count"};
  for (int i = 0; i < 5; ++i) {
    size_t at = r.pos();
    GROKIT_TRY(r.get(&v[i], names[i]));
    if (v[i] > 1u << 20) return r.error(at, str_cat(names[i], " ", v[i], " is implausible"));
  }
  Hello h;
  h.host_rank = static_cast<int>(v[0]);
  h.hosts = static_cast<int>(v[1]);
  h.self.tp = static_cast<int>(v[2]);
  h.self.first_rank = static_cast<int>(v[3]);
  h.self.rank_count = static_cast<int>(v[4]);
  GROKIT_TRY(r.text(&h.self.model_id, "model id"));
  GROKIT_TRY(r.text(&h.self.version, "version"));
  GROKIT_TRY(r.text(&h.self.settings, "settings"));
  GROKIT_TRY(r.finish());
  return h;
}

std::string text_of(std::span<const uint8_t> m, const char* what) {
  Reader r(m, what, kHeaderBytes);
  std::string s;
  if (!r.text(&s, "text").ok()) return "(unreadable)";
  return s;
}

std::vector<uint8_t> encode_text(Kind kind, std::string_view s) {
  Writer w(kind);
  w.text(s.substr(0, kMaxText));
  return w.take();
}

std::vector<uint8_t> encode_ack(uint64_t seq, const Status& outcome) {
  Writer w(Kind::kAck);
  w.put<uint64_t>(seq);
  w.put<uint8_t>(outcome.ok() ? 1 : 0);
  w.text(outcome.ok() ? std::string_view() : std::string_view(outcome.error().message).substr(0, kMaxText));
  return w.take();
}

// A host's own hello must make sense before it is sent or compared.
Status check_own(const HostHello& h, int host_rank) {
  if (h.tp < 1) return make_error("cluster: host ", host_rank, ": tensor-parallel degree ", h.tp, " is not positive");
  if (h.rank_count < 1) return make_error("cluster: host ", host_rank, ": rank count ", h.rank_count, " is not positive");
  if (h.first_rank < 0 || h.first_rank + static_cast<int64_t>(h.rank_count) > h.tp)
    return make_error("cluster: host ", host_rank, " drives ranks ", ranks_text(h.first_rank, h.rank_count),
                      ", outside [0, ", h.tp, ")");
  if (h.model_id.size() > kMaxText || h.version.size() > kMaxText || h.settings.size() > kMaxText)
    return make_error("cluster: host ", host_rank, ": model id, version or settings longer than ", kMaxText, " bytes");
  return {};
}

struct Address {
  std::string host;
  int port = 0;
  bool ipv6 = false;
};

Result<Address> parse_address(const std::string& s) {
  auto bad = [&](const char* why) { return make_error("cluster: leader address '", s, "': ", why, " (want host:port)"); };
  Address a;
  size_t colon;
  if (!s.empty() && s[0] == '[') {
    size_t close = s.find(']');
    if (close == std::string::npos) return bad("no ']' after the IPv6 address");
    a.host = s.substr(1, close - 1);
    a.ipv6 = true;
    colon = close + 1;
    if (colon >= s.size() || s[colon] != ':') return bad("no ':port' after ']'");
  } else {
    colon = s.rfind(':');
    if (colon == std::string::npos) return bad("no port");
    a.host = s.substr(0, colon);
    if (a.host.find(':') != std::string::npos) return bad("write an IPv6 address in brackets, [addr]:port");
  }
  if (a.host.empty()) return bad("no host");
  std::string port = s.substr(colon + 1);
  if (port.empty() || port.size() > 5 || !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return bad("the port is not a number");
  a.port = std::stoi(port);
  if (a.port > 65535) return bad("the port is above 65535");
  return a;
}

// zmq_poll that counts EINTR as "nothing ready".
void poll_items(zmq_pollitem_t* items, int n, milliseconds t) {
  int r = zmq_poll(items, n, static_cast<long>(t.count()));
  if (r < 0 && zmq_errno() != EINTR) throw zmq::error_t();
}

}  // namespace

// ---------------------------------------------------------------------------------
struct Cluster::Impl {
  enum class State { kOpen, kJoined, kBroken, kClosed };
  struct Peer {
    std::string id;          // ZeroMQ routing id of the connection
    int host_rank = 0;
    HostHello hello;
    uint64_t next_ack = 0;   // the sequence number its next ack must carry
    bool done = false;       // close(): BYE acked or connection gone
  };
  struct Failure {
    int host_rank;
    uint64_t seq;
    std::string message;
  };
  enum class Sent { kOk, kGone, kFull };
  enum class Got { kMessage, kTimeout, kLost };

  ClusterOptions opt;
  Address addr;
  std::string where;  // the leader's address as given
  int port = 0;
  State state = State::kOpen;
  std::string broken;
  // Declared after the context: sockets close before it terminates.
  zmq::context_t ctx{1};
  zmq::socket_t sock;
  zmq::socket_t monitor;
  // Leader.
  std::vector<Peer> peers;
  uint64_t sent = 0;
  std::vector<Failure> failures;
  // Follower.
  uint64_t received = 0, acked = 0;
  bool disconnected = false;

  bool leader() const { return opt.host_rank == 0; }
  std::string me() const { return leader() ? std::string("leader") : str_cat("host ", opt.host_rank); }

  Error fail(std::string msg) {
    if (state != State::kClosed) {
      state = State::kBroken;
      broken = msg;
    }
    return Error{std::move(msg)};
  }
  Status usable(const char* what) const {
    switch (state) {
      case State::kJoined: return {};
      case State::kOpen: return make_error("cluster: ", me(), ": ", what, " before join");
      case State::kBroken: return make_error("cluster: ", me(), ": ", what, " after an earlier failure: ", broken);
      case State::kClosed:
        if (!broken.empty()) return Error{broken};
        return make_error("cluster: ", me(), ": ", what, " after close");
    }
    return {};
  }

  // -- sockets -------------------------------------------------------------------
  void common_options(zmq::socket_t& s) {
    s.set(zmq::sockopt::linger, 0);
    // No high-water marks: acks bound what is in flight, and a full queue must not
    // stall a probe or a command.
    s.set(zmq::sockopt::sndhwm, 0);
    s.set(zmq::sockopt::rcvhwm, 0);
    s.set(zmq::sockopt::sndtimeo, opt.message_timeout.count() < 0 ? -1 : static_cast<int>(opt.message_timeout.count()));
    if (opt.heartbeat.count() > 0) {
      int hb = static_cast<int>(opt.heartbeat.count());
      s.set(zmq::sockopt::heartbeat_ivl, hb);
      s.set(zmq::sockopt::heartbeat_timeout, 10 * hb);
      s.set(zmq::sockopt::heartbeat_ttl, std::min(10 * hb, 6553500));
    }
    if (addr.ipv6) s.set(zmq::sockopt::ipv6, true);
  }

  Status open_leader() {
    sock = zmq::socket_t(ctx, zmq::socket_type::router);
    common_options(sock);
    sock.set(zmq::sockopt::router_mandatory, true);
    sock.set(zmq::sockopt::maxmsgsize, kMaxToLeader);
    std::string ep = addr.port == 0 ? "tcp://*:*" : str_cat("tcp://*:", addr.port);
    try {
      sock.bind(ep);
    } catch (const zmq::error_t& e) {
      return make_error("cluster: leader: cannot bind port ", addr.port, " on every interface: ", e.what());
    }
    std::string last = sock.get(zmq::sockopt::last_endpoint);
    port = std::atoi(last.substr(last.rfind(':') + 1).c_str());
    where = str_cat(addr.ipv6 ? "[" + addr.host + "]" : addr.host, ":", port);
    return {};
  }

  Status open_follower() {
    if (addr.port == 0) return make_error("cluster: host ", opt.host_rank, ": leader address '", where, "' has port 0");
    sock = zmq::socket_t(ctx, zmq::socket_type::dealer);
    common_options(sock);
    sock.set(zmq::sockopt::maxmsgsize, kMaxToFollower);
    if (zmq_socket_monitor(sock.handle(), kMonitorEndpoint, ZMQ_EVENT_DISCONNECTED) != 0)
      return make_error("cluster: host ", opt.host_rank, ": cannot monitor the socket: ", zmq_strerror(zmq_errno()));
    monitor = zmq::socket_t(ctx, zmq::socket_type::pair);
    monitor.set(zmq::sockopt::linger, 0);
    monitor.connect(kMonitorEndpoint);
    std::string ep = addr.ipv6 ? str_cat("tcp://[", addr.host, "]:", addr.port) : str_cat("tcp://", addr.host, ":", addr.port);
    try {
      sock.connect(ep);
    } catch (const zmq::error_t& e) {
      return make_error("cluster: host ", opt.host_rank, ": cannot connect to the leader at ", where, ": ", e.what());
    }
    port = addr.port;
    return {};
  }

  void teardown(int linger_ms) {
    if (monitor) {
      zmq_socket_monitor(sock.handle(), nullptr, 0);
      monitor.close();
    }
    if (sock) {
      sock.set(zmq::sockopt::linger, linger_ms);
      sock.close();
    }
    ctx.close();  // waits for at most linger_ms to flush
  }

  // -- leader I/O ------------------------------------------------------------------
  // Sends one message to a follower; kGone when its connection is no more.
  Sent send_to(const std::string& id, const std::vector<uint8_t>& body, bool dontwait) {
    auto flags = dontwait ? zmq::send_flags::dontwait : zmq::send_flags::none;
    for (;;) {
      try {
        if (!sock.send(zmq::const_buffer(id.data(), id.size()), flags | zmq::send_flags::sndmore)) return Sent::kFull;
        if (!sock.send(zmq::const_buffer(body.data(), body.size()), flags)) return Sent::kFull;
        return Sent::kOk;
      } catch (const zmq::error_t& e) {
        if (e.num() == EHOSTUNREACH) return Sent::kGone;
        if (e.num() != EINTR) throw;
      }
    }
  }

  // One message from the ROUTER without waiting; false when there is none.
  bool recv_router(std::string* id, std::vector<uint8_t>* body, bool* well_formed) {
    std::vector<zmq::message_t> parts;
    if (!zmq::recv_multipart(sock, std::back_inserter(parts), zmq::recv_flags::dontwait)) return false;
    *well_formed = parts.size() == 2;
    *id = parts.front().to_string();
    auto* p = static_cast<const uint8_t*>(parts.back().data());
    body->assign(p, p + parts.back().size());
    return true;
  }

  void wait_readable(milliseconds t) {
    zmq_pollitem_t item{sock.handle(), 0, ZMQ_POLLIN, 0};
    poll_items(&item, 1, t);
  }

  Peer* peer_of(const std::string& id) {
    for (auto& p : peers)
      if (p.id == id) return &p;
    return nullptr;
  }

  void refuse(const std::vector<std::string>& ids, const std::string& reason) {
    auto msg = encode_text(Kind::kRefuse, reason);
    for (auto& id : ids) send_to(id, msg, true);
  }

  // Checks a follower's hello against the leader's; the reason on disagreement.
  std::optional<std::string> disagreement(const Hello& h, const HostHello& mine,
                                          const std::vector<std::optional<Peer>>& table) const {
    const int H = opt.hosts, K = h.host_rank;
    if (h.self.version != mine.version)
      return str_cat("host ", K, " runs version '", h.self.version, "' but the leader runs '", mine.version, "'");
    if (h.hosts != H) return str_cat("host ", K, " expects ", h.hosts, " hosts but the leader expects ", H);
    if (K == 0) return std::string("a follower claims host rank 0, the leader's");
    if (K >= H) return str_cat("host rank ", K, " is outside [1, ", H, ") for ", H, " hosts");
    if (h.self.model_id != mine.model_id)
      return str_cat("host ", K, " has model id '", h.self.model_id, "' but the leader has '", mine.model_id, "'");
    if (h.self.tp != mine.tp)
      return str_cat("host ", K, " has tensor-parallel degree ", h.self.tp, " but the leader has ", mine.tp);
    if (h.self.settings != mine.settings)
      return str_cat("host ", K, " runs with settings '", h.self.settings, "' but the leader with '", mine.settings,
                     "'");
    const auto& s = h.self;
    if (s.rank_count < 1 || s.first_rank + s.rank_count > s.tp)
      return str_cat("host ", K, " drives ranks ", ranks_text(s.first_rank, s.rank_count), ", outside [0, ", s.tp, ")");
    for (size_t k = 0; k < table.size(); ++k) {
      if (!table[k] || static_cast<int>(k) == K) continue;
      const auto& o = table[k]->hello;
      if (s.first_rank < o.first_rank + o.rank_count && o.first_rank < s.first_rank + s.rank_count)
        return str_cat("host ", K, " drives ranks ", ranks_text(s.first_rank, s.rank_count), ", which overlap ",
                       k == 0 ? std::string("the leader's") : str_cat("host ", k, "'s"), " ",
                       ranks_text(o.first_rank, o.rank_count));
    }
    return std::nullopt;
  }

  Result<JoinResult> leader_join(const HostHello& mine, std::span<const uint8_t> payload) {
    if (payload.size() > kMaxPayload)
      return make_error("cluster: leader: the payload is ", payload.size(), " bytes; at most ", kMaxPayload);
    const int H = opt.hosts;
    std::vector<std::optional<Peer>> table(static_cast<size_t>(H));
    table[0] = Peer{"", 0, mine, 0, false};
    std::vector<std::string> seen;  // every follower that said hello, for refusals
    int joined = 0, ignored = 0;
    auto refuse_all = [&](const std::string& reason) {
      refuse(seen, reason);
      return fail(str_cat("cluster: leader at ", where, ": refused the cluster: ", reason));
    };
    Deadline deadline(opt.join_timeout);
    while (joined < H - 1) {
      std::string id;
      std::vector<uint8_t> body;
      bool well_formed = false;
      if (!recv_router(&id, &body, &well_formed)) {
        if (deadline.expired()) {
          std::vector<int> missing, present;
          for (int k = 1; k < H; ++k) (table[static_cast<size_t>(k)] ? present : missing).push_back(k);
          std::string reason = str_cat(missing.size() == 1 ? "host " : "hosts ", host_list(missing),
                                       " did not join within ", duration_text(opt.join_timeout), " (joined: ",
                                       present.empty() ? "none" : host_list(present), ")");
          if (ignored) reason += str_cat("; ", ignored, " stray messages were ignored");
          refuse(seen, "the leader gave up: " + reason);
          return fail(str_cat("cluster: leader at ", where, ": ", reason));
        }
        wait_readable(deadline.left());
        continue;
      }
      auto header = well_formed ? read_header(body) : std::nullopt;
      if (!header || header->kind != Kind::kHello) {
        if (!header || header->protocol == kProtocol) {
          ++ignored;
          continue;
        }
      }
      seen.push_back(id);
      if (header->protocol != kProtocol)
        return refuse_all(str_cat("a follower speaks cluster protocol ", header->protocol, "; the leader speaks ", kProtocol));
      auto hello = decode_hello(body);
      if (!hello.ok()) return refuse_all("a follower sent a malformed " + hello.error().message);
      auto& slot = table[static_cast<size_t>(std::min(hello->host_rank, H - 1))];
      if (hello->host_rank >= 1 && hello->host_rank < H && slot) {
        // A second hello for a host rank: fine if the first process is gone (restarted).
        if (send_to(slot->id, Writer(Kind::kPing).take(), true) != Sent::kGone)
          return refuse_all(str_cat("host rank ", hello->host_rank, " joined twice (two processes claim it)"));
        seen.erase(std::find(seen.begin(), seen.end(), slot->id));
        slot.reset();
        --joined;
      }
      if (auto why = disagreement(*hello, mine, table)) return refuse_all(*why);
      slot = Peer{id, hello->host_rank, hello->self, 0, false};
      ++joined;
    }
    // Every rank of [0, TP) must have a host.
    std::vector<int> owner(static_cast<size_t>(mine.tp), -1);
    for (auto& p : table)
      for (int r = 0; r < p->hello.rank_count; ++r) owner[static_cast<size_t>(p->hello.first_rank + r)] = p->host_rank;
    std::vector<int> uncovered;
    for (int r = 0; r < mine.tp; ++r)
      if (owner[static_cast<size_t>(r)] < 0) uncovered.push_back(r);
    if (!uncovered.empty())
      return refuse_all(str_cat("no host drives ", uncovered.size() == 1 ? "rank " : "ranks ", host_list(uncovered),
                                " of [0, ", mine.tp, ")"));

    Writer w(Kind::kWelcome);
    w.put<uint32_t>(static_cast<uint32_t>(H));
    for (auto& p : table) {
      w.put<uint32_t>(static_cast<uint32_t>(p->hello.first_rank));
      w.put<uint32_t>(static_cast<uint32_t>(p->hello.rank_count));
    }
    w.bytes(payload);
    auto welcome = w.take();
    peers.clear();
    for (int k = 1; k < H; ++k) peers.push_back(*table[static_cast<size_t>(k)]);
    for (auto& p : peers) {
      Sent s = send_to(p.id, welcome, false);
      if (s != Sent::kOk)
        return refuse_all(str_cat("host ", p.host_rank, s == Sent::kGone ? " disconnected after its hello"
                                                                         : " did not take the welcome in time"));
    }
    state = State::kJoined;
    GROKIT_TRY(wait_acks(0, opt.message_timeout));
    JoinResult out;
    out.payload.assign(payload.begin(), payload.end());
    for (auto& p : table) out.hosts.push_back(p->hello);
    return out;
  }

  // Reads what followers sent, without waiting: acks, BYE-acks, late hellos.
  Status drain() {
    std::string id;
    std::vector<uint8_t> body;
    bool well_formed = false;
    while (recv_router(&id, &body, &well_formed)) {
      auto header = well_formed ? read_header(body) : std::nullopt;
      if (!header || header->protocol != kProtocol) continue;
      Peer* p = peer_of(id);
      if (!p) {
        if (header->kind == Kind::kHello)
          send_to(id, encode_text(Kind::kRefuse, str_cat("the cluster of ", opt.hosts, " hosts is already formed")), true);
        continue;
      }
      if (header->kind == Kind::kByeAck) {
        p->done = true;
      } else if (header->kind == Kind::kAck) {
        Reader r(body, str_cat("ack from host ", p->host_rank), kHeaderBytes);
        uint64_t seq = 0;
        uint8_t ok = 0;
        std::string message;
        Status st = r.get(&seq, "sequence number");
        if (st.ok()) st = r.get(&ok, "outcome");
        if (st.ok()) st = r.text(&message, "message");
        if (st.ok()) st = r.finish();
        if (!st.ok()) return fail("cluster: leader: " + st.error().message);
        if (seq != p->next_ack)
          return fail(str_cat("cluster: leader: host ", p->host_rank, " acknowledged #", seq, " while #", p->next_ack,
                              " was due"));
        ++p->next_ack;
        if (!ok) failures.push_back({p->host_rank, seq, message});
      }
    }
    return {};
  }

  static std::string what_seq(uint64_t seq) { return seq == 0 ? "the welcome" : str_cat("command #", seq); }

  Status wait_acks(uint64_t seq, milliseconds timeout) {
    Deadline deadline(timeout);
    auto next_probe = Clock::now() + opt.heartbeat;
    for (;;) {
      GROKIT_TRY(drain());
      std::vector<Peer*> pending;
      for (auto& p : peers)
        if (p.next_ack <= seq) pending.push_back(&p);
      if (pending.empty()) break;
      if (opt.heartbeat.count() > 0 && Clock::now() >= next_probe) {
        for (Peer* p : pending)
          if (send_to(p->id, Writer(Kind::kPing).take(), true) == Sent::kGone)
            return fail(str_cat("cluster: leader: host ", p->host_rank, " lost its connection while ", what_seq(seq),
                                " was outstanding"));
        next_probe = Clock::now() + opt.heartbeat;
      }
      if (deadline.expired()) {
        std::vector<int> late;
        for (Peer* p : pending) late.push_back(p->host_rank);
        return fail(str_cat("cluster: leader: ", late.size() == 1 ? "host " : "hosts ", host_list(late),
                            " did not acknowledge ", what_seq(seq), " within ", duration_text(timeout)));
      }
      milliseconds cap = opt.heartbeat.count() > 0
                             ? std::max(milliseconds(1), std::chrono::ceil<milliseconds>(next_probe - Clock::now()))
                             : milliseconds(-1);
      wait_readable(deadline.left(cap));
    }
    std::string msg;
    auto it = std::stable_partition(failures.begin(), failures.end(), [&](const Failure& f) { return f.seq > seq; });
    for (auto f = it; f != failures.end(); ++f)
      msg += str_cat(msg.empty() ? "" : "; ", what_seq(f->seq), " failed on host ", f->host_rank, ": ", f->message);
    failures.erase(it, failures.end());
    if (!msg.empty()) return make_error("cluster: leader: ", msg);
    return {};
  }

  // -- follower I/O ----------------------------------------------------------------
  Status send_to_leader(const std::vector<uint8_t>& body, bool dontwait) {
    for (;;) {
      try {
        if (!sock.send(zmq::const_buffer(body.data(), body.size()), dontwait ? zmq::send_flags::dontwait : zmq::send_flags::none))
          return make_error("cluster: host ", opt.host_rank, ": the leader at ", where, " did not take a message within ",
                            duration_text(opt.message_timeout));
        return {};
      } catch (const zmq::error_t& e) {
        if (e.num() != EINTR) throw;
      }
    }
  }

  void read_monitor() {
    zmq::message_t ev;
    while (monitor.recv(ev, zmq::recv_flags::dontwait)) {
      if (ev.size() >= 6 && load_le<uint16_t>(ev.data()) == ZMQ_EVENT_DISCONNECTED) disconnected = true;
      while (ev.more() && monitor.recv(ev, zmq::recv_flags::dontwait)) {
      }
    }
  }

  // The next message from the leader; kLost once the connection dropped and nothing
  // it delivered is left.
  Got next(const Deadline& deadline, std::vector<uint8_t>* body) {
    for (;;) {
      zmq::message_t m;
      if (sock.recv(m, zmq::recv_flags::dontwait)) {
        auto* p = static_cast<const uint8_t*>(m.data());
        body->assign(p, p + m.size());
        return Got::kMessage;
      }
      if (disconnected) {
        zmq_pollitem_t item{sock.handle(), 0, ZMQ_POLLIN, 0};
        poll_items(&item, 1, milliseconds(100));  // a last look for what came before the drop
        if (sock.recv(m, zmq::recv_flags::dontwait)) {
          auto* p = static_cast<const uint8_t*>(m.data());
          body->assign(p, p + m.size());
          return Got::kMessage;
        }
        return Got::kLost;
      }
      if (deadline.expired()) return Got::kTimeout;
      zmq_pollitem_t items[2] = {{sock.handle(), 0, ZMQ_POLLIN, 0}, {monitor.handle(), 0, ZMQ_POLLIN, 0}};
      poll_items(items, 2, deadline.left());
      if (items[1].revents & ZMQ_POLLIN) read_monitor();
    }
  }

  Result<JoinResult> follower_join(const HostHello& mine) {
    Hello h{opt.host_rank, opt.hosts, mine};
    GROKIT_TRY(send_to_leader(encode_hello(h), false));
    Deadline deadline(opt.join_timeout);
    for (;;) {
      std::vector<uint8_t> body;
      Got got = next(deadline, &body);
      if (got == Got::kTimeout)
        return fail(str_cat("cluster: host ", opt.host_rank, ": no welcome from the leader at ", where, " within ",
                            duration_text(opt.join_timeout), " (is the leader running, and is that its address?)"));
      if (got == Got::kLost)
        return fail(str_cat("cluster: host ", opt.host_rank, ": lost the connection to the leader at ", where,
                            " while joining"));
      auto header = read_header(body);
      if (!header) continue;
      if (header->protocol != kProtocol)
        return fail(str_cat("cluster: host ", opt.host_rank, ": the leader at ", where, " speaks cluster protocol ",
                            header->protocol, "; this host speaks ", kProtocol));
      if (header->kind == Kind::kRefuse)
        return fail(str_cat("cluster: host ", opt.host_rank, ": the leader at ", where, " refused the cluster: ",
                            text_of(body, "refusal")));
      if (header->kind != Kind::kWelcome) continue;  // PINGs
      auto joined = decode_welcome(body, mine);
      if (!joined.ok()) {
        (void)send_to_leader(encode_ack(0, joined.error()), true);
        return fail(joined.error().message);
      }
      GROKIT_TRY(send_to_leader(encode_ack(0, ok_status()), false));
      state = State::kJoined;
      return joined;
    }
  }

  Result<JoinResult> decode_welcome(std::span<const uint8_t> body, const HostHello& mine) {
    std::string what = str_cat("cluster: host ", opt.host_rank, ": welcome from the leader at ", where);
    Reader r(body, what, kHeaderBytes);
    uint32_t n = 0;
    GROKIT_TRY(r.get(&n, "host count"));
    if (static_cast<int64_t>(n) != opt.hosts)
      return make_error(what, ": ", n, " hosts where this host expects ", opt.hosts);
    JoinResult out;
    for (uint32_t k = 0; k < n; ++k) {
      uint32_t first = 0, count = 0;
      GROKIT_TRY(r.get(&first, "first rank"));
      GROKIT_TRY(r.get(&count, "rank count"));
      if (count < 1 || static_cast<uint64_t>(first) + count > static_cast<uint64_t>(mine.tp))
        return r.error(r.pos() - 8, str_cat("host ", k, " ranks ", ranks_text(static_cast<int>(first), static_cast<int>(count)),
                                            " outside [0, ", mine.tp, ")"));
      HostHello hh = mine;
      hh.first_rank = static_cast<int>(first);
      hh.rank_count = static_cast<int>(count);
      out.hosts.push_back(std::move(hh));
    }
    const auto& self = out.hosts[static_cast<size_t>(opt.host_rank)];
    if (self.first_rank != mine.first_rank || self.rank_count != mine.rank_count)
      return make_error(what, ": gives this host ranks ", ranks_text(self.first_rank, self.rank_count), ", not ",
                        ranks_text(mine.first_rank, mine.rank_count));
    GROKIT_TRY(r.bytes(&out.payload, "payload", kMaxPayload));
    GROKIT_TRY(r.finish());
    return out;
  }

  Result<ClusterCommand> receive(milliseconds timeout) {
    GROKIT_TRY(usable("receive"));
    GROKIT_CHECK_MSG(acked == received, str_cat("cluster: command #", received, " must be acked before the next receive"));
    Deadline deadline(timeout);
    for (;;) {
      std::vector<uint8_t> body;
      Got got = next(deadline, &body);
      if (got == Got::kTimeout)
        return make_error("cluster: host ", opt.host_rank, ": no command from the leader at ", where, " within ",
                          duration_text(timeout));
      if (got == Got::kLost)
        return fail(str_cat("cluster: host ", opt.host_rank, ": lost the connection to the leader at ", where));
      auto header = read_header(body);
      if (!header || header->protocol != kProtocol) continue;
      if (header->kind == Kind::kCommand) {
        Reader r(body, str_cat("cluster: host ", opt.host_rank, ": command from the leader"), kHeaderBytes);
        ClusterCommand c;
        Status st = r.get(&c.seq, "sequence number");
        if (st.ok()) st = r.bytes(&c.bytes, "command", kMaxCommand);
        if (st.ok()) st = r.finish();
        if (!st.ok()) return fail(st.error().message);
        if (c.seq != received + 1)
          return fail(str_cat("cluster: host ", opt.host_rank, ": command #", c.seq, " arrived while #", received + 1,
                              " was due"));
        received = c.seq;
        return c;
      }
      if (header->kind == Kind::kRefuse)  // the leader failed after its welcome
        return fail(str_cat("cluster: host ", opt.host_rank, ": the leader at ", where, " refused the cluster: ",
                            text_of(body, "refusal")));
      if (header->kind == Kind::kBye) {
        std::string reason = text_of(body, "bye");
        (void)send_to_leader(Writer(Kind::kByeAck).take(), true);
        state = State::kClosed;
        broken = str_cat("cluster: host ", opt.host_rank, ": the leader at ", where, " closed the cluster",
                         reason.empty() ? "" : ": ", reason);
        return Error{broken};
      }
    }
  }

  Status ack(uint64_t seq, const Status& outcome) {
    GROKIT_TRY(usable("ack"));
    GROKIT_CHECK_MSG(seq == acked + 1 && seq <= received,
                     str_cat("cluster: ack of #", seq, " out of order (last acked #", acked, ", received #", received, ")"));
    Status st = send_to_leader(encode_ack(seq, outcome), false);
    if (!st.ok()) return fail(st.error().message);
    acked = seq;
    return {};
  }

  // -- close -----------------------------------------------------------------------
  Status close() {
    if (state == State::kClosed && !sock) return {};
    Status result;
    if (leader() && !peers.empty()) {
      auto bye = encode_text(Kind::kBye, state == State::kBroken ? broken : std::string());
      for (auto& p : peers) p.done = send_to(p.id, bye, true) == Sent::kGone;
      Deadline deadline(opt.close_timeout);
      for (;;) {
        Status st = drain();
        (void)st;  // a protocol error while closing changes nothing
        std::vector<int> left;
        for (auto& p : peers) {
          if (!p.done && send_to(p.id, Writer(Kind::kPing).take(), true) == Sent::kGone) p.done = true;
          if (!p.done) left.push_back(p.host_rank);
        }
        if (left.empty()) break;
        if (deadline.expired()) {
          result = make_error("cluster: leader: ", left.size() == 1 ? "host " : "hosts ", host_list(left),
                              " did not acknowledge the close within ", duration_text(opt.close_timeout));
          break;
        }
        wait_readable(deadline.left(milliseconds(20)));
      }
    }
    bool flush = !leader() && state != State::kOpen;
    state = State::kClosed;
    teardown(flush ? static_cast<int>(std::max<int64_t>(0, opt.close_timeout.count())) : 0);
    return result;
  }
};

// ---------------------------------------------------------------------------------
namespace {
// cppzmq reports failures by throwing; no exception leaves this file.
template <class F>
auto guarded(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const zmq::error_t& e) {
    return make_error("cluster: ", what, ": ZeroMQ: ", e.what());
  }
}
}  // namespace

Cluster::Cluster(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Cluster::~Cluster() {
  if (!impl_) return;
  try {
    impl_->teardown(0);
  } catch (const zmq::error_t&) {
  }
}

Result<std::unique_ptr<Cluster>> Cluster::open(const ClusterOptions& options) {
  if (options.hosts < 1) return make_error("cluster: host count ", options.hosts, " is not positive");
  if (options.host_rank < 0 || options.host_rank >= options.hosts)
    return make_error("cluster: host rank ", options.host_rank, " is outside [0, ", options.hosts, ")");
  GROKIT_ASSIGN_OR_RETURN(Address addr, parse_address(options.leader));
  return guarded("open", [&]() -> Result<std::unique_ptr<Cluster>> {
    auto impl = std::make_unique<Impl>();
    impl->opt = options;
    impl->addr = addr;
    impl->where = options.leader;
    GROKIT_TRY(impl->leader() ? impl->open_leader() : impl->open_follower());
    return std::unique_ptr<Cluster>(new Cluster(std::move(impl)));
  });
}

bool Cluster::is_leader() const { return impl_->leader(); }
int Cluster::host_rank() const { return impl_->opt.host_rank; }
int Cluster::hosts() const { return impl_->opt.hosts; }
int Cluster::port() const { return impl_->port; }

Result<JoinResult> Cluster::join(const HostHello& self, std::span<const uint8_t> payload) {
  Impl& m = *impl_;
  if (m.state != Impl::State::kOpen) return make_error("cluster: ", m.me(), ": join called twice");
  GROKIT_TRY(check_own(self, m.opt.host_rank));
  if (!m.leader() && !payload.empty())
    return make_error("cluster: host ", m.opt.host_rank, ": only the leader passes a payload to join");
  return guarded("join", [&]() -> Result<JoinResult> {
    return m.leader() ? m.leader_join(self, payload) : m.follower_join(self);
  });
}

Result<uint64_t> Cluster::send(std::span<const uint8_t> bytes) {
  Impl& m = *impl_;
  GROKIT_CHECK_MSG(m.leader(), "Cluster::send is the leader's");
  GROKIT_TRY(m.usable("send"));
  if (bytes.size() > kMaxCommand)
    return make_error("cluster: leader: a command of ", bytes.size(), " bytes; at most ", kMaxCommand);
  return guarded("send", [&]() -> Result<uint64_t> {
    uint64_t seq = m.sent + 1;
    Writer w(Kind::kCommand);
    w.put<uint64_t>(seq);
    w.bytes(bytes);
    auto body = w.take();
    for (auto& p : m.peers) {
      Impl::Sent s = m.send_to(p.id, body, false);
      if (s == Impl::Sent::kGone)
        return m.fail(str_cat("cluster: leader: host ", p.host_rank, " lost its connection before command #", seq));
      if (s == Impl::Sent::kFull)
        return m.fail(str_cat("cluster: leader: host ", p.host_rank, " did not take command #", seq, " within ",
                              duration_text(m.opt.message_timeout)));
    }
    m.sent = seq;
    return seq;
  });
}

Status Cluster::wait(uint64_t seq) { return wait(seq, impl_->opt.message_timeout); }

Status Cluster::wait(uint64_t seq, std::chrono::milliseconds timeout) {
  Impl& m = *impl_;
  GROKIT_CHECK_MSG(m.leader(), "Cluster::wait is the leader's");
  GROKIT_TRY(m.usable("wait"));
  GROKIT_CHECK_MSG(seq <= m.sent, str_cat("cluster: wait for #", seq, " but only #", m.sent, " was sent"));
  return guarded("wait", [&]() -> Status { return m.wait_acks(seq, timeout); });
}

Status Cluster::broadcast(std::span<const uint8_t> bytes) {
  GROKIT_ASSIGN_OR_RETURN(uint64_t seq, send(bytes));
  return wait(seq);
}

Result<ClusterCommand> Cluster::receive() { return receive(impl_->opt.message_timeout); }

Result<ClusterCommand> Cluster::receive(std::chrono::milliseconds timeout) {
  GROKIT_CHECK_MSG(!impl_->leader(), "Cluster::receive is a follower's");
  return guarded("receive", [&]() -> Result<ClusterCommand> { return impl_->receive(timeout); });
}

Status Cluster::ack(uint64_t seq, const Status& outcome) {
  GROKIT_CHECK_MSG(!impl_->leader(), "Cluster::ack is a follower's");
  return guarded("ack", [&]() -> Status { return impl_->ack(seq, outcome); });
}

Status Cluster::close() {
  return guarded("close", [&]() -> Status { return impl_->close(); });
}

// ---------------------------------------------------------------------------------
// Engine commands.
std::vector<StepRow> EngineCommand::step_rows() const {
  std::vector<StepRow> out;
  out.reserve(rows.size());
  for (auto& r : rows) out.push_back(StepRow{r.slot, std::span<const int32_t>(r.tokens), r.logits});
  return out;
}

std::vector<uint8_t> encode_open_sequence(int64_t capacity, int32_t slot) {
  Writer w;
  w.put<uint8_t>(static_cast<uint8_t>(CommandKind::kOpenSequence));
  w.put<int64_t>(capacity);
  w.put<int32_t>(slot);
  return w.take();
}

std::vector<uint8_t> encode_close_sequence(int32_t slot) {
  Writer w;
  w.put<uint8_t>(static_cast<uint8_t>(CommandKind::kCloseSequence));
  w.put<int32_t>(slot);
  return w.take();
}

std::vector<uint8_t> encode_step(std::span<const StepRow> rows) {
  GROKIT_CHECK(rows.size() <= UINT32_MAX);
  Writer w;
  w.put<uint8_t>(static_cast<uint8_t>(CommandKind::kStep));
  w.put<uint32_t>(static_cast<uint32_t>(rows.size()));
  for (auto& r : rows) {
    GROKIT_CHECK(r.tokens.size() <= UINT32_MAX);
    w.put<int32_t>(r.slot);
    w.put<uint8_t>(static_cast<uint8_t>(r.logits));
    w.put<uint32_t>(static_cast<uint32_t>(r.tokens.size()));
    for (int32_t t : r.tokens) w.put<int32_t>(t);
  }
  return w.take();
}

std::vector<uint8_t> encode_shutdown() { return {static_cast<uint8_t>(CommandKind::kShutdown)}; }
std::vector<uint8_t> encode_loaded() { return {static_cast<uint8_t>(CommandKind::kLoaded)}; }
std::vector<uint8_t> encode_start_collectives() { return {static_cast<uint8_t>(CommandKind::kStartCollectives)}; }

Result<EngineCommand> decode_command(std::span<const uint8_t> bytes) {
  Reader r(bytes, "engine command");
  EngineCommand c;
  uint8_t kind = 0;
  GROKIT_TRY(r.get(&kind, "kind"));
  auto slot_of = [&](int32_t* slot) -> Status {
    size_t at = r.pos();
    GROKIT_TRY(r.get(slot, "slot"));
    if (*slot < 0) return r.error(at, str_cat("slot ", *slot, " is negative"));
    return {};
  };
  switch (static_cast<CommandKind>(kind)) {
    case CommandKind::kOpenSequence: {
      c.kind = CommandKind::kOpenSequence;
      size_t at = r.pos();
      GROKIT_TRY(r.get(&c.capacity, "capacity"));
      if (c.capacity < 1) return r.error(at, str_cat("capacity ", c.capacity, " is not positive"));
      GROKIT_TRY(slot_of(&c.slot));
      break;
    }
    case CommandKind::kCloseSequence:
      c.kind = CommandKind::kCloseSequence;
      GROKIT_TRY(slot_of(&c.slot));
      break;
    case CommandKind::kStep: {
      c.kind = CommandKind::kStep;
      size_t at = r.pos();
      uint32_t n = 0;
      GROKIT_TRY(r.get(&n, "row count"));
      constexpr size_t kRowMin = 4 + 1 + 4;
      if (n > r.remaining() / kRowMin)
        return r.error(at, str_cat("row count ", n, " needs at least ", uint64_t{n} * kRowMin, " bytes but ",
                                   r.remaining(), " remain"));
      c.rows.resize(n);
      for (auto& row : c.rows) {
        GROKIT_TRY(slot_of(&row.slot));
        size_t lat = r.pos();
        uint8_t mode = 0;
        GROKIT_TRY(r.get(&mode, "logits mode"));
        if (mode > 2) return r.error(lat, str_cat("logits mode ", int{mode}, " is not 0, 1 or 2"));
        row.logits = static_cast<StepRow::Logits>(mode);
        size_t tat = r.pos();
        uint32_t t = 0;
        GROKIT_TRY(r.get(&t, "token count"));
        if (t > r.remaining() / 4)
          return r.error(tat, str_cat("token count ", t, " needs ", uint64_t{t} * 4, " bytes but ", r.remaining(),
                                      " remain"));
        row.tokens.resize(t);
        for (auto& tok : row.tokens) GROKIT_TRY(r.get(&tok, "token"));
      }
      break;
    }
    case CommandKind::kShutdown:
      c.kind = CommandKind::kShutdown;
      break;
    case CommandKind::kLoaded:
      c.kind = CommandKind::kLoaded;
      break;
    case CommandKind::kStartCollectives:
      c.kind = CommandKind::kStartCollectives;
      break;
    default:
      return r.error(0, str_cat("unknown kind ", int{kind}));
  }
  GROKIT_TRY(r.finish());
  return c;
}

}  // namespace grokit::runner
