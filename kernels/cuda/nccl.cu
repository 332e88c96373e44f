// GrokitCollectives over NCCL, opened with dlopen("libnccl.so.2") (then "libnccl.so") on
// first use. The few NCCL types and entry points the table needs are declared here, so
// nothing includes nccl.h; where the header is present, static_asserts check them
// against it. Every rank calls from its own thread with its device set (set_device).
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <type_traits>

#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/nccl.h"

#if __has_include(<nccl.h>)
#include <nccl.h>
#define GROKIT_HAVE_NCCL_H 1
#endif

namespace grokit::kernels::cuda {

namespace {

// ---- the NCCL ABI (nccl.h, stable across NCCL 2.x) -------------------------------------
namespace abi {
using Result = int;  // ncclResult_t, a C enum: passed and returned as int
constexpr Result kSuccess = 0;
constexpr Result kInvalidArgument = 4;
constexpr Result kInvalidUsage = 5;
constexpr int kUint8 = 1;    // ncclDataType_t ncclUint8
constexpr int kFloat32 = 7;  // ncclFloat32
constexpr int kSum = 0;      // ncclRedOp_t ncclSum
constexpr size_t kUniqueIdBytes = 128;
struct UniqueId {
  char internal[kUniqueIdBytes];
};
using Comm = struct OpaqueComm*;  // ncclComm_t

using GetUniqueId = Result (*)(UniqueId*);
using CommInitRank = Result (*)(Comm*, int, UniqueId, int);
using CommDestroy = Result (*)(Comm);
using GroupStart = Result (*)();
using GroupEnd = Result (*)();
using AllReduce = Result (*)(const void*, void*, size_t, int, int, Comm, cudaStream_t);
using AllGather = Result (*)(const void*, void*, size_t, int, Comm, cudaStream_t);
using Broadcast = Result (*)(const void*, void*, size_t, int, int, Comm, cudaStream_t);
using GetErrorString = const char* (*)(Result);
using GetVersion = Result (*)(int*);
using CommGetAsyncError = Result (*)(Comm, Result*);
constexpr Result kInProgress = 7;  // ncclInProgress
}  // namespace abi

static_assert(sizeof(GrokitNcclId) == abi::kUniqueIdBytes, "GrokitNcclId carries an ncclUniqueId");

#ifdef GROKIT_HAVE_NCCL_H
static_assert(abi::kSuccess == ncclSuccess && abi::kInvalidArgument == ncclInvalidArgument &&
                  abi::kInvalidUsage == ncclInvalidUsage,
              "ncclResult_t values");
static_assert(abi::kUint8 == ncclUint8 && abi::kFloat32 == ncclFloat32, "ncclDataType_t values");
static_assert(abi::kSum == ncclSum, "ncclRedOp_t values");
static_assert(sizeof(ncclResult_t) == sizeof(int) && sizeof(ncclDataType_t) == sizeof(int) &&
                  sizeof(ncclRedOp_t) == sizeof(int),
              "NCCL enums are int-sized");
static_assert(sizeof(ncclUniqueId) == sizeof(abi::UniqueId) && alignof(ncclUniqueId) == alignof(abi::UniqueId) &&
                  NCCL_UNIQUE_ID_BYTES == abi::kUniqueIdBytes,
              "ncclUniqueId layout");
static_assert(sizeof(ncclComm_t) == sizeof(abi::Comm), "ncclComm_t is a pointer");
// The prototypes mirrored above, with the enums as the header spells them.
static_assert(std::is_same_v<decltype(&ncclGetUniqueId), ncclResult_t (*)(ncclUniqueId*)>);
static_assert(std::is_same_v<decltype(&ncclCommInitRank), ncclResult_t (*)(ncclComm_t*, int, ncclUniqueId, int)>);
static_assert(std::is_same_v<decltype(&ncclCommDestroy), ncclResult_t (*)(ncclComm_t)>);
static_assert(std::is_same_v<decltype(&ncclCommAbort), ncclResult_t (*)(ncclComm_t)>);
static_assert(std::is_same_v<decltype(&ncclGroupStart), ncclResult_t (*)()>);
static_assert(std::is_same_v<decltype(&ncclGroupEnd), ncclResult_t (*)()>);
static_assert(std::is_same_v<decltype(&ncclAllReduce), ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t,
                                                                          ncclRedOp_t, ncclComm_t, cudaStream_t)>);
static_assert(std::is_same_v<decltype(&ncclAllGather),
                             ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t)>);
static_assert(std::is_same_v<decltype(&ncclBroadcast), ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t, int,
                                                                          ncclComm_t, cudaStream_t)>);
static_assert(std::is_same_v<decltype(&ncclGetErrorString), const char* (*)(ncclResult_t)>);
static_assert(std::is_same_v<decltype(&ncclGetVersion), ncclResult_t (*)(int*)>);
static_assert(std::is_same_v<decltype(&ncclCommGetAsyncError), ncclResult_t (*)(ncclComm_t, ncclResult_t*)>);
static_assert(abi::kInProgress == ncclInProgress, "ncclResult_t values");
#endif

// ---- loading ---------------------------------------------------------------------------
struct Api {
  abi::GetUniqueId get_unique_id = nullptr;
  abi::CommInitRank comm_init_rank = nullptr;
  abi::CommDestroy comm_destroy = nullptr;
  abi::CommDestroy comm_abort = nullptr;  // same prototype
  abi::GroupStart group_start = nullptr;
  abi::GroupEnd group_end = nullptr;
  abi::AllReduce all_reduce = nullptr;
  abi::AllGather all_gather = nullptr;
  abi::Broadcast broadcast = nullptr;
  abi::GetErrorString get_error_string = nullptr;
  abi::CommGetAsyncError comm_get_async_error = nullptr;
  int version = 0;  // ncclGetVersion's code, 0 when unknown
  const char* library = nullptr;
  bool ok = false;
  char why[512] = {0};  // what failed, or what was loaded
};

template <class F>
bool resolve(void* lib, const char* name, F* out, Api& api) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  if (*out != nullptr) return true;
  std::snprintf(api.why, sizeof api.why, "%s has no symbol %s (not NCCL 2?)", api.library, name);
  return false;
}

// NCCL_VERSION(X, Y, Z): X * 1000 + Y * 100 + Z up to 2.8, X * 10000 + Y * 100 + Z after.
void describe_version(int code, int* major, int* minor, int* patch) {
  if (code >= 10000) {
    *major = code / 10000;
    *minor = code / 100 % 100;
  } else {
    *major = code / 1000;
    *minor = code / 100 % 10;
  }
  *patch = code % 100;
}

Api open_nccl() {
  Api api;
  static const char* const kNames[] = {"libnccl.so.2", "libnccl.so"};
  void* lib = nullptr;
  char errors[384] = {0};
  for (const char* name : kNames) {
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib != nullptr) {
      api.library = name;
      break;
    }
    const char* e = dlerror();
    size_t used = std::strlen(errors);
    std::snprintf(errors + used, sizeof errors - used, "%s%s", used > 0 ? "; " : "", e != nullptr ? e : name);
  }
  if (lib == nullptr) {
    std::snprintf(api.why, sizeof api.why, "NCCL is not installed or not on the library path (%s)", errors);
    return api;
  }
  // The library stays loaded for the life of the process: communicators may outlive any
  // caller.
  if (!resolve(lib, "ncclGetUniqueId", &api.get_unique_id, api) ||
      !resolve(lib, "ncclCommInitRank", &api.comm_init_rank, api) ||
      !resolve(lib, "ncclCommDestroy", &api.comm_destroy, api) ||
      !resolve(lib, "ncclCommAbort", &api.comm_abort, api) ||
      !resolve(lib, "ncclGroupStart", &api.group_start, api) || !resolve(lib, "ncclGroupEnd", &api.group_end, api) ||
      !resolve(lib, "ncclAllReduce", &api.all_reduce, api) || !resolve(lib, "ncclAllGather", &api.all_gather, api) ||
      !resolve(lib, "ncclBroadcast", &api.broadcast, api) ||
      !resolve(lib, "ncclGetErrorString", &api.get_error_string, api) ||
      !resolve(lib, "ncclCommGetAsyncError", &api.comm_get_async_error, api))
    return api;
  auto get_version = reinterpret_cast<abi::GetVersion>(dlsym(lib, "ncclGetVersion"));
  int code = 0;
  if (get_version != nullptr && get_version(&code) == abi::kSuccess) api.version = code;
  if (api.version > 0) {
    int major = 0, minor = 0, patch = 0;
    describe_version(api.version, &major, &minor, &patch);
    std::snprintf(api.why, sizeof api.why, "NCCL %d.%d.%d (%s)", major, minor, patch, api.library);
  } else {
    std::snprintf(api.why, sizeof api.why, "NCCL (%s)", api.library);
  }
  api.ok = true;
  return api;
}

// Loaded once, on first use, by whichever thread comes first (thread-safe static init).
const Api& nccl() {
  static const Api api = open_nccl();
  return api;
}

// GROKIT_OK, or the error named after the call; null when NCCL cannot be loaded.
const Api* loaded(const char* what) {
  const Api& api = nccl();
  if (api.ok) return &api;
  set_error(GROKIT_ERR_UNSUPPORTED, "%s: %s", what, api.why);
  return nullptr;
}

int check(const Api& api, abi::Result r, const char* what) {
  if (r == abi::kSuccess) return GROKIT_OK;
  const char* s = api.get_error_string != nullptr ? api.get_error_string(r) : nullptr;
  const int code = r == abi::kInvalidArgument || r == abi::kInvalidUsage ? GROKIT_ERR_INVALID : GROKIT_ERR_DEVICE;
  return set_error(code, "%s: %s (NCCL error %d)", what, s != nullptr ? s : "unknown error", r);
}

// ---- the table -------------------------------------------------------------------------
int available(char* why, size_t len) {
  const Api& api = nccl();
  if (why != nullptr && len > 0) std::snprintf(why, len, "%s", api.why);
  return api.ok ? 1 : 0;
}

int unique_id(GrokitNcclId* id) {
  const Api* api = loaded("nccl unique_id");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  if (id == nullptr) return set_error(GROKIT_ERR_INVALID, "nccl unique_id: null id");
  abi::UniqueId u{};
  if (int rc = check(*api, api->get_unique_id(&u), "ncclGetUniqueId"); rc != GROKIT_OK) return rc;
  std::memcpy(id->bytes, u.internal, sizeof u.internal);
  return GROKIT_OK;
}

int comm_init(void** comm, int world, const GrokitNcclId* id, int rank) {
  const Api* api = loaded("nccl comm_init");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  if (comm == nullptr || id == nullptr) return set_error(GROKIT_ERR_INVALID, "nccl comm_init: null comm or id");
  if (world < 1 || rank < 0 || rank >= world)
    return set_error(GROKIT_ERR_INVALID, "nccl comm_init: rank %d of world %d", rank, world);
  *comm = nullptr;
  abi::UniqueId u;
  std::memcpy(u.internal, id->bytes, sizeof u.internal);
  abi::Comm c = nullptr;
  if (int rc = check(*api, api->comm_init_rank(&c, world, u, rank), "ncclCommInitRank"); rc != GROKIT_OK) return rc;
  *comm = c;
  return GROKIT_OK;
}

int comm_destroy(void* comm) {
  if (comm == nullptr) return GROKIT_OK;
  const Api* api = loaded("nccl comm_destroy");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  return check(*api, api->comm_destroy(static_cast<abi::Comm>(comm)), "ncclCommDestroy");
}

int comm_abort(void* comm) {
  if (comm == nullptr) return GROKIT_OK;
  const Api* api = loaded("nccl comm_abort");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  return check(*api, api->comm_abort(static_cast<abi::Comm>(comm)), "ncclCommAbort");
}

int comm_async_error(void* comm, int* failed, char* why, size_t len) {
  if (failed == nullptr) return set_error(GROKIT_ERR_INVALID, "nccl comm_async_error: null failed");
  *failed = 0;
  if (why != nullptr && len > 0) why[0] = '\0';
  if (comm == nullptr) return set_error(GROKIT_ERR_INVALID, "nccl comm_async_error: null comm");
  const Api* api = loaded("nccl comm_async_error");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  abi::Result state = abi::kSuccess;
  if (int rc = check(*api, api->comm_get_async_error(static_cast<abi::Comm>(comm), &state), "ncclCommGetAsyncError");
      rc != GROKIT_OK)
    return rc;
  if (state != abi::kSuccess && state != abi::kInProgress) {
    *failed = 1;
    if (why != nullptr && len > 0) std::snprintf(why, len, "%s (NCCL error %d)", api->get_error_string(state), state);
  }
  return GROKIT_OK;
}

int group_start() {
  const Api* api = loaded("nccl group_start");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  return check(*api, api->group_start(), "ncclGroupStart");
}

int group_end() {
  const Api* api = loaded("nccl group_end");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  return check(*api, api->group_end(), "ncclGroupEnd");
}

// n == 0 is a no-op on every rank alike (all ranks pass the same n).
int all_reduce_sum(const float* send, float* recv, size_t n, void* comm, GrokitStream stream) {
  const Api* api = loaded("nccl all_reduce_sum");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  if (n == 0) return GROKIT_OK;
  if (send == nullptr || recv == nullptr || comm == nullptr)
    return set_error(GROKIT_ERR_INVALID, "nccl all_reduce_sum: null send, recv or comm");
  return check(*api,
               api->all_reduce(send, recv, n, abi::kFloat32, abi::kSum, static_cast<abi::Comm>(comm), as_stream(stream)),
               "ncclAllReduce");
}

// recv gets every rank's `bytes` in rank order (world * bytes).
int all_gather(const void* send, void* recv, size_t bytes, void* comm, GrokitStream stream) {
  const Api* api = loaded("nccl all_gather");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  if (bytes == 0) return GROKIT_OK;
  if (send == nullptr || recv == nullptr || comm == nullptr)
    return set_error(GROKIT_ERR_INVALID, "nccl all_gather: null send, recv or comm");
  return check(*api, api->all_gather(send, recv, bytes, abi::kUint8, static_cast<abi::Comm>(comm), as_stream(stream)),
               "ncclAllGather");
}

// In place: root's `data` lands in every rank's `data`.
int broadcast(void* data, size_t bytes, int root, void* comm, GrokitStream stream) {
  const Api* api = loaded("nccl broadcast");
  if (api == nullptr) return GROKIT_ERR_UNSUPPORTED;
  if (root < 0) return set_error(GROKIT_ERR_INVALID, "nccl broadcast: root = %d", root);
  if (bytes == 0) return GROKIT_OK;
  if (data == nullptr || comm == nullptr) return set_error(GROKIT_ERR_INVALID, "nccl broadcast: null data or comm");
  return check(*api,
               api->broadcast(data, data, bytes, abi::kUint8, root, static_cast<abi::Comm>(comm), as_stream(stream)),
               "ncclBroadcast");
}

GrokitCollectives make_table() {
  GrokitCollectives t{};
  t.abi_version = GROKIT_OPS_ABI_VERSION;
  t.available = available;
  t.unique_id = unique_id;
  t.comm_init = comm_init;
  t.comm_destroy = comm_destroy;
  t.comm_abort = comm_abort;
  t.comm_async_error = comm_async_error;
  t.group_start = group_start;
  t.group_end = group_end;
  t.all_reduce_sum = all_reduce_sum;
  t.all_gather = all_gather;
  t.broadcast = broadcast;
  return t;
}

}  // namespace

const GrokitCollectives* grokit_cuda_collectives_table() {
  static const GrokitCollectives table = make_table();
  return &table;
}

}  // namespace grokit::kernels::cuda
