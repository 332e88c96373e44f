// TCP collectives for the host backend across processes (socket_collectives.h).
#include "runner/socket_collectives.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kernels/kernels.h"

namespace grokit::runner {
namespace {

constexpr char kMagic[8] = {'G', 'K', 'S', 'O', 'C', 'K', '1', '\0'};
constexpr auto kConnectTimeout = std::chrono::seconds(120);  // peers start and load at their own pace

// The id's bytes.
struct IdLayout {
  char magic[8];
  uint64_t nonce;
  uint16_t port;
  char host[96];
};
static_assert(sizeof(IdLayout) <= sizeof(GrokitNcclId::bytes), "the id must fit GrokitNcclId");

// Every message: the operation, its size, and the sender's rank.
enum Op : uint32_t { kHello = 1, kAllReduce = 2, kAllGather = 3, kBroadcast = 4 };
struct Header {
  uint32_t op;
  int32_t rank;
  uint64_t bytes;
  uint64_t nonce;
};

int fail(const std::string& msg) {
  grokit_host_set_error(msg.c_str());
  return GROKIT_ERR_DEVICE;
}

// Listening sockets made by unique_id in this process, for its rank 0's comm_init.
std::mutex g_mu;
std::map<uint64_t, int>& listeners() {
  static std::map<uint64_t, int> m;
  return m;
}

class SocketComm {
 public:
  SocketComm(int world, int rank, const IdLayout& id, int listen_fd)
      : world_(world), rank_(rank), id_(id), listen_fd_(listen_fd), fds_(static_cast<size_t>(world), -1) {
    // Connections are made in the background: ranks of one process initialise from one
    // thread (group_start/group_end), so comm_init must not wait for its peers.
    setup_ = std::thread([this] { setup(); });
  }
  ~SocketComm() {
    shut_down();
    if (setup_.joinable()) setup_.join();
    for (int fd : fds_)
      if (fd >= 0) ::close(fd);
    if (listen_fd_ >= 0) ::close(listen_fd_);
  }
  // Unblocks every wait, present and future (any thread).
  void shut_down() {
    aborted_ = true;
    std::lock_guard<std::mutex> lock(fd_mu_);
    for (int fd : fds_)
      if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
    if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
  }
  bool failed(std::string* why) const {
    std::lock_guard<std::mutex> lock(err_mu_);
    if (why != nullptr) *why = error_;
    return !error_.empty();
  }

  int all_reduce(const float* send, float* recv, size_t n) {
    if (int rc = ready(); rc != GROKIT_OK) return rc;
    const uint64_t bytes = n * sizeof(float);
    if (rank_ != 0) {
      if (int rc = send_msg(fds_[0], kAllReduce, send, bytes); rc != GROKIT_OK) return rc;
      return recv_msg(fds_[0], kAllReduce, recv, bytes, 0);
    }
    std::vector<std::vector<float>> parts(static_cast<size_t>(world_));
    std::vector<float*> ptr(static_cast<size_t>(world_));
    parts[0].assign(send, send + n);
    for (int r = 1; r < world_; ++r) {
      parts[static_cast<size_t>(r)].resize(n);
      if (int rc = recv_msg(fds_[static_cast<size_t>(r)], kAllReduce, parts[static_cast<size_t>(r)].data(), bytes, r);
          rc != GROKIT_OK)
        return rc;
    }
    // The in-process communicator's sum: kernels::tree_sum over the ranks, in rank order.
    std::vector<float> v(static_cast<size_t>(world_));
    for (size_t i = 0; i < n; ++i) {
      for (int r = 0; r < world_; ++r) v[static_cast<size_t>(r)] = parts[static_cast<size_t>(r)][i];
      recv[i] = kernels::tree_sum(v.data(), world_);
    }
    for (int r = 1; r < world_; ++r)
      if (int rc = send_msg(fds_[static_cast<size_t>(r)], kAllReduce, recv, bytes); rc != GROKIT_OK) return rc;
    return GROKIT_OK;
  }

  int all_gather(const void* send, void* recv, size_t bytes) {
    if (int rc = ready(); rc != GROKIT_OK) return rc;
    auto* out = static_cast<uint8_t*>(recv);
    const uint64_t all = static_cast<uint64_t>(bytes) * static_cast<uint64_t>(world_);
    if (rank_ != 0) {
      if (int rc = send_msg(fds_[0], kAllGather, send, bytes); rc != GROKIT_OK) return rc;
      return recv_msg(fds_[0], kAllGather, out, all, 0);
    }
    if (out != send) std::memmove(out, send, bytes);
    for (int r = 1; r < world_; ++r)
      if (int rc = recv_msg(fds_[static_cast<size_t>(r)], kAllGather, out + static_cast<size_t>(r) * bytes, bytes, r);
          rc != GROKIT_OK)
        return rc;
    for (int r = 1; r < world_; ++r)
      if (int rc = send_msg(fds_[static_cast<size_t>(r)], kAllGather, out, all); rc != GROKIT_OK) return rc;
    return GROKIT_OK;
  }

  int broadcast(void* data, size_t bytes, int root) {
    if (root < 0 || root >= world_) return fail(str_cat("socket broadcast: root ", root, " of ", world_, " ranks"));
    if (int rc = ready(); rc != GROKIT_OK) return rc;
    if (rank_ != 0) {
      if (rank_ == root) return send_msg(fds_[0], kBroadcast, data, bytes);
      return recv_msg(fds_[0], kBroadcast, data, bytes, 0);
    }
    if (root != 0)
      if (int rc = recv_msg(fds_[static_cast<size_t>(root)], kBroadcast, data, bytes, root); rc != GROKIT_OK) return rc;
    for (int r = 1; r < world_; ++r)
      if (r != root)
        if (int rc = send_msg(fds_[static_cast<size_t>(r)], kBroadcast, data, bytes); rc != GROKIT_OK) return rc;
    return GROKIT_OK;
  }

 private:
  void record(const std::string& why) {
    std::lock_guard<std::mutex> lock(err_mu_);
    if (error_.empty()) error_ = why;
  }
  // A failed collective breaks the group: its connections close, so that the peers
  // waiting on this rank fail too instead of waiting for ever.
  int error_code(const std::string& why) {
    record(why);
    shut_down();
    return fail(str_cat("socket collectives, rank ", rank_, ": ", why));
  }

  // Waits for the connections.
  int ready() {
    std::unique_lock<std::mutex> lock(ready_mu_);
    ready_cv_.wait(lock, [&] { return setup_done_; });
    std::string why;
    if (failed(&why)) return fail(str_cat("socket collectives, rank ", rank_, ": ", why));
    if (aborted_) return fail(str_cat("socket collectives, rank ", rank_, ": aborted"));
    return GROKIT_OK;
  }
  void finish_setup(const std::string& why) {
    if (!why.empty()) record(why);
    std::lock_guard<std::mutex> lock(ready_mu_);
    setup_done_ = true;
    ready_cv_.notify_all();
  }

  void setup() {
    if (world_ == 1) return finish_setup("");
    if (rank_ == 0) return finish_setup(accept_peers());
    finish_setup(connect_to_root());
  }

  std::string accept_peers() {
    const auto deadline = std::chrono::steady_clock::now() + kConnectTimeout;
    int joined = 0;
    while (joined < world_ - 1) {
      if (aborted_) return "aborted while the ranks connected";
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return str_cat(world_ - 1 - joined, " ranks did not connect within ", kConnectTimeout.count(), " s");
      pollfd p{listen_fd_, POLLIN, 0};
      const int pr = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 200)));
      if (pr < 0 && errno != EINTR) return str_cat("poll: ", std::strerror(errno));
      if (pr <= 0) continue;
      const int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        return str_cat("accept: ", std::strerror(errno));
      }
      tune(fd);
      Header h{};
      if (!read_all(fd, &h, sizeof h) || h.op != kHello || h.nonce != id_.nonce) {
        ::close(fd);  // not one of ours (a stray connection, another group)
        continue;
      }
      if (h.rank <= 0 || h.rank >= world_ || fds_[static_cast<size_t>(h.rank)] >= 0) {
        ::close(fd);
        return str_cat("a peer introduced itself as rank ", h.rank, " (world ", world_, ", or twice)");
      }
      std::lock_guard<std::mutex> lock(fd_mu_);
      fds_[static_cast<size_t>(h.rank)] = fd;
      ++joined;
    }
    return "";
  }

  std::string connect_to_root() {
    const std::string host(id_.host, strnlen(id_.host, sizeof id_.host));
    if (host.empty()) return "the id names no host (socket_id_set_host was not called)";
    const auto deadline = std::chrono::steady_clock::now() + kConnectTimeout;
    std::string last = "no attempt";
    while (std::chrono::steady_clock::now() < deadline) {
      if (aborted_) return "aborted while connecting";
      addrinfo hints{};
      hints.ai_family = AF_INET;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* res = nullptr;
      const std::string port = std::to_string(id_.port);
      if (int g = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); g != 0) {
        last = str_cat("cannot resolve ", host, ": ", gai_strerror(g));
      } else {
        const int fd = ::socket(res->ai_family, res->ai_socktype, res->ai_protocol);
        if (fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
          ::freeaddrinfo(res);
          tune(fd);
          const Header h{kHello, rank_, 0, id_.nonce};
          if (!write_all(fd, &h, sizeof h)) {
            ::close(fd);
            return str_cat("cannot introduce this rank to rank 0 at ", host, ":", id_.port);
          }
          std::lock_guard<std::mutex> lock(fd_mu_);
          fds_[0] = fd;
          if (aborted_) ::shutdown(fd, SHUT_RDWR);
          return "";
        }
        last = str_cat("connect to ", host, ":", id_.port, ": ", std::strerror(errno));
        if (fd >= 0) ::close(fd);
        ::freeaddrinfo(res);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return str_cat("rank 0 not reachable within ", kConnectTimeout.count(), " s (", last, ")");
  }

  static void tune(int fd) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  static bool write_all(int fd, const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    while (n > 0) {
      const ssize_t w = ::send(fd, b, n, MSG_NOSIGNAL);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      b += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }
  static bool read_all(int fd, void* p, size_t n) {
    auto* b = static_cast<uint8_t*>(p);
    while (n > 0) {
      const ssize_t r = ::recv(fd, b, n, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      b += r;
      n -= static_cast<size_t>(r);
    }
    return true;
  }

  int send_msg(int fd, Op op, const void* data, uint64_t bytes) {
    const Header h{op, rank_, bytes, id_.nonce};
    if (!write_all(fd, &h, sizeof h) || !write_all(fd, data, bytes))
      return error_code(aborted_ ? "aborted" : "a peer closed its connection (a host failed?)");
    return GROKIT_OK;
  }
  // Receives a message of `bytes` for `op` from `from`, refusing any other.
  int recv_msg(int fd, Op op, void* data, uint64_t bytes, int from) {
    Header h{};
    if (!read_all(fd, &h, sizeof h)) return error_code(aborted_ ? "aborted" : str_cat("rank ", from, " closed its connection (a host failed?)"));
    if (h.op != op || h.bytes != bytes || h.rank != from || h.nonce != id_.nonce)
      return error_code(str_cat("rank ", from, " ran another collective (op ", h.op, ", ", h.bytes, " bytes, as rank ", h.rank,
                                ") than this one (op ", static_cast<uint32_t>(op), ", ", bytes, " bytes)"));
    if (!read_all(fd, data, bytes)) return error_code(str_cat("rank ", from, " closed its connection mid-message"));
    return GROKIT_OK;
  }

  const int world_, rank_;
  const IdLayout id_;
  int listen_fd_;
  std::vector<int> fds_;
  std::mutex fd_mu_;
  std::atomic<bool> aborted_{false};
  mutable std::mutex err_mu_;
  std::string error_;
  std::mutex ready_mu_;
  std::condition_variable ready_cv_;
  bool setup_done_ = false;
  std::thread setup_;
};

SocketComm* as_comm(void* c) { return static_cast<SocketComm*>(c); }

int available(char* why, size_t len) {
  if (why != nullptr && len > 0) why[0] = '\0';
  return 1;
}

int unique_id(GrokitNcclId* id) {
  if (id == nullptr) return fail("socket unique_id: id is NULL");
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return fail(str_cat("socket unique_id: socket: ", std::strerror(errno)));
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;
  socklen_t alen = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 256) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &alen) != 0) {
    const int e = errno;
    ::close(fd);
    return fail(str_cat("socket unique_id: cannot listen: ", std::strerror(e)));
  }
  IdLayout l{};
  std::memcpy(l.magic, kMagic, sizeof kMagic);
  l.nonce = std::random_device{}() * 0x100000001ull ^ static_cast<uint64_t>(
                                                          std::chrono::steady_clock::now().time_since_epoch().count());
  l.port = ntohs(a.sin_port);
  std::memset(id->bytes, 0, sizeof id->bytes);
  std::memcpy(id->bytes, &l, sizeof l);
  std::lock_guard<std::mutex> lock(g_mu);
  listeners()[l.nonce] = fd;
  return GROKIT_OK;
}

int comm_init(void** comm, int world, const GrokitNcclId* id, int rank) {
  if (comm == nullptr || id == nullptr) return fail("socket comm_init: NULL comm or id");
  if (world < 1 || rank < 0 || rank >= world) return fail(str_cat("socket comm_init: rank ", rank, " of ", world));
  IdLayout l;
  std::memcpy(&l, id->bytes, sizeof l);
  if (std::memcmp(l.magic, kMagic, sizeof kMagic) != 0) return fail("socket comm_init: not a socket collectives id");
  int listen_fd = -1;
  if (rank == 0 && world > 1) {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = listeners().find(l.nonce);
    if (it == listeners().end())
      return fail("socket comm_init: rank 0 must run in the process that made the id (unique_id)");
    listen_fd = it->second;
    listeners().erase(it);
  }
  *comm = new SocketComm(world, rank, l, listen_fd);
  return GROKIT_OK;
}

int comm_destroy(void* comm) {
  delete as_comm(comm);
  return GROKIT_OK;
}
// Aborted communicators stay allocated until the process ends: the rank that was
// waiting in one may still be on its way out of the call when another thread aborts it.
std::vector<std::unique_ptr<SocketComm>>& graveyard() {
  static std::vector<std::unique_ptr<SocketComm>> g;
  return g;
}
int comm_abort(void* comm) {
  if (comm == nullptr) return GROKIT_OK;
  as_comm(comm)->shut_down();
  std::lock_guard<std::mutex> lock(g_mu);
  graveyard().emplace_back(as_comm(comm));
  return GROKIT_OK;
}
int group_start() { return GROKIT_OK; }
int group_end() { return GROKIT_OK; }

int all_reduce_sum(const float* send, float* recv, size_t n, void* comm, GrokitStream) {
  if (comm == nullptr || (n > 0 && (send == nullptr || recv == nullptr))) return fail("socket all_reduce_sum: NULL argument");
  return as_comm(comm)->all_reduce(send, recv, n);
}
int all_gather(const void* send, void* recv, size_t bytes, void* comm, GrokitStream) {
  if (comm == nullptr || (bytes > 0 && (send == nullptr || recv == nullptr))) return fail("socket all_gather: NULL argument");
  return as_comm(comm)->all_gather(send, recv, bytes);
}
int broadcast(void* data, size_t bytes, int root, void* comm, GrokitStream) {
  if (comm == nullptr || (bytes > 0 && data == nullptr)) return fail("socket broadcast: NULL argument");
  return as_comm(comm)->broadcast(data, bytes, root);
}
int comm_async_error(void* comm, int* failed, char* why, size_t len) {
  if (comm == nullptr || failed == nullptr) return fail("socket comm_async_error: NULL argument");
  std::string w;
  *failed = as_comm(comm)->failed(&w) ? 1 : 0;
  if (why != nullptr && len > 0) std::snprintf(why, len, "%s", w.c_str());
  return GROKIT_OK;
}

const GrokitCollectives kTable = [] {
  GrokitCollectives t{};
  t.abi_version = GROKIT_OPS_ABI_VERSION;
  t.available = available;
  t.unique_id = unique_id;
  t.comm_init = comm_init;
  t.comm_destroy = comm_destroy;
  t.group_start = group_start;
  t.group_end = group_end;
  t.all_reduce_sum = all_reduce_sum;
  t.all_gather = all_gather;
  t.broadcast = broadcast;
  t.comm_abort = comm_abort;
  t.comm_async_error = comm_async_error;
  return t;
}();

}  // namespace

const GrokitCollectives* socket_collectives() { return &kTable; }

Status socket_id_set_host(GrokitNcclId* id, const std::string& host) {
  IdLayout l;
  std::memcpy(&l, id->bytes, sizeof l);
  if (std::memcmp(l.magic, kMagic, sizeof kMagic) != 0) return make_error("not a socket collectives id");
  if (host.empty() || host.size() >= sizeof l.host) return make_error("host name '", host, "' is empty or too long");
  std::memset(l.host, 0, sizeof l.host);
  std::memcpy(l.host, host.data(), host.size());
  std::memcpy(id->bytes, &l, sizeof l);
  return {};
}

}  // namespace grokit::runner
