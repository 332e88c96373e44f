// The threads of one emulated CUDA block (tests/gpu/test_cuda_emulation.cpp) and their
// barriers, two ways:
//   - fibers (x86-64, the default): the block's threads take turns on the calling thread,
//     each on a stack of its own, switched in user space at every barrier, a warp running
//     ahead of the others as far as the barriers let it (run_block). A barrier costs a few
//     nanoseconds per thread, where std::threads on a 2-core host wait in the kernel for
//     each other (hundreds of threads, futex wake-ups). Deterministic, and a deadlock
//     (threads waiting on barriers the others never reach) aborts with a message.
//   - std::threads (under ThreadSanitizer, or GK_EMU_THREADS=1 at compile time): a race
//     between the block's threads (a missing __syncthreads) is then a data race TSan sees
//     (scripts/test-emulation-tsan.sh).
// A barrier follows std::barrier: arrive_and_drop leaves it for good (an exited CUDA thread
// no longer counts at __syncthreads), and the completion runs once per phase, in the last
// thread to arrive. Fiber mode defines assembly symbols: include this in one translation
// unit.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if !defined(GK_EMU_THREADS)
#if defined(__SANITIZE_THREAD__)
#define GK_EMU_THREADS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define GK_EMU_THREADS 1
#endif
#endif
#endif
#if !defined(GK_EMU_THREADS) && !defined(__x86_64__)
#define GK_EMU_THREADS 1  // the fibers' context switch is x86-64 assembly
#endif
#if !defined(GK_EMU_THREADS)
#define GK_EMU_THREADS 0
#endif

namespace emu {

using Completion = void (*)();

#if GK_EMU_THREADS

class Barrier {
 public:
  Barrier(int count, Completion done) : b_(count, Done{done}) {}
  void arrive_and_wait() { b_.arrive_and_wait(); }
  void arrive_and_drop() { b_.arrive_and_drop(); }

 private:
  struct Done {
    Completion f;
    void operator()() noexcept {
      if (f != nullptr) f();
    }
  };
  std::barrier<Done> b_;
};

#else

class Barrier;
namespace detail {
// Parks the running fiber until b's phase is past `phase`.
void wait(const Barrier* b, uint64_t phase);
}  // namespace detail

class Barrier {
 public:
  Barrier(int count, Completion done) : expected_(count), done_(done) {}
  void arrive_and_wait() {
    const uint64_t phase = phase_;
    if (++arrived_ == expected_) complete();
    else detail::wait(this, phase);
  }
  void arrive_and_drop() {
    if (--expected_ == arrived_) complete();
  }
  uint64_t phase() const { return phase_; }

 private:
  void complete() {
    arrived_ = 0;
    ++phase_;
    if (done_ != nullptr) done_();
  }
  int expected_, arrived_ = 0;
  uint64_t phase_ = 0;
  Completion done_;
};

namespace detail {
struct Fiber {
  void* sp;
  int t;
  bool done;
  const Barrier* waits_on;  // null: runnable
  uint64_t phase;
  bool runnable() const { return !done && (waits_on == nullptr || waits_on->phase() != phase); }
};
inline constexpr size_t kStackBytes = size_t{512} << 10;
inline constexpr int kMaxFibers = 1024;
inline void* g_main_sp = nullptr;
inline Fiber g_fibers[kMaxFibers];
inline int g_current = -1;
inline void (*g_body)(void*, int) = nullptr;
inline void* g_body_ctx = nullptr;
inline unsigned char* g_stacks = nullptr;
}  // namespace detail

#endif

}  // namespace emu

#if !GK_EMU_THREADS
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores its stack pointer in *from and resumes the context saved at `to` (x86-64 System V).
extern "C" void gk_emu_fiber_switch(void** from, void* to);
extern "C" [[noreturn]] void gk_emu_fiber_main(emu::detail::Fiber* f);
asm(R"(
  .pushsection .text
  .globl gk_emu_fiber_switch
  .type gk_emu_fiber_switch, @function
gk_emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gk_emu_fiber_switch, .-gk_emu_fiber_switch
  .type gk_emu_fiber_entry, @function
gk_emu_fiber_entry:
  movq %rbx, %rdi
  call gk_emu_fiber_main@PLT
  ud2
  .size gk_emu_fiber_entry, .-gk_emu_fiber_entry
  .popsection
)");
extern "C" void gk_emu_fiber_entry();

inline void emu::detail::wait(const Barrier* b, uint64_t phase) {
  Fiber& f = g_fibers[g_current];
  f.waits_on = b;
  f.phase = phase;
  gk_emu_fiber_switch(&f.sp, g_main_sp);
  f.waits_on = nullptr;
}

extern "C" [[gnu::used]] inline void gk_emu_fiber_main(emu::detail::Fiber* f) {
  emu::detail::g_body(emu::detail::g_body_ctx, f->t);
  f->done = true;
  void* dead = nullptr;
  gk_emu_fiber_switch(&dead, emu::detail::g_main_sp);
  std::abort();  // a finished fiber is never resumed
}

namespace emu {

// Runs body(t) for t = 0 .. T-1 as one block's threads, as fibers, and returns when all
// have returned; set_thread(t) runs each time thread t gets the turn.
template <class Body, class SetThread>
void run_block(int T, bool descending, Body& body, SetThread& set_thread) {
  using namespace detail;
  if (T < 1 || T > kMaxFibers) std::abort();
  if (g_stacks == nullptr) {  // once: every stack with a guard page below it
    void* p = mmap(nullptr, kStackBytes * kMaxFibers, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) std::abort();
    g_stacks = static_cast<unsigned char*>(p);
    for (int i = 0; i < kMaxFibers; ++i)
      if (mprotect(g_stacks + static_cast<size_t>(i) * kStackBytes, 4096, PROT_NONE) != 0) std::abort();
  }
  g_body = [](void* ctx, int t) { (*static_cast<Body*>(ctx))(t); };
  g_body_ctx = &body;
  for (int t = 0; t < T; ++t) {
    // The frame gk_emu_fiber_switch pops: MXCSR and x87 control word (their defaults),
    // r15, r14, r13, r12, rbx (the fiber), rbp, and the return into gk_emu_fiber_entry,
    // which leaves the stack pointer 16-byte aligned at the top.
    auto* top = reinterpret_cast<uint64_t*>(g_stacks + static_cast<size_t>(t + 1) * kStackBytes);
    uint64_t* sp = top - 8;
    sp[0] = 0x1F80u | uint64_t{0x037F} << 32;
    sp[1] = sp[2] = sp[3] = sp[4] = 0;
    sp[5] = reinterpret_cast<uint64_t>(&g_fibers[t]);
    sp[6] = 0;
    sp[7] = reinterpret_cast<uint64_t>(&gk_emu_fiber_entry);
    g_fibers[t] = Fiber{sp, t, false, nullptr, 0};
  }
  // Warps in turn, lowest first (or highest: `descending`): a warp runs, its lanes
  // round-robin, until each waits on a barrier others must reach (__syncthreads), then the
  // first warp in that order that can go on gets the turn. So a warp runs ahead of the
  // others as far as the barriers allow, and a missing __syncthreads lets it overwrite or
  // read what the others have not yet read or written.
  const int warps = (T + 31) / 32;
  for (;;) {
    bool ran = false;
    for (int i = 0; i < warps && !ran; ++i) {
      const int w = descending ? warps - 1 - i : i;
      for (bool again = true; again;) {
        again = false;
        for (int t = w * 32; t < std::min(T, w * 32 + 32); ++t) {
          if (!g_fibers[t].runnable()) continue;
          g_current = t;
          set_thread(t);
          gk_emu_fiber_switch(&g_main_sp, g_fibers[t].sp);
          again = ran = true;
        }
      }
    }
    if (!ran) break;
  }
  g_current = -1;
  for (int t = 0; t < T; ++t)
    if (!g_fibers[t].done) {
      std::fprintf(stderr, "emulated kernel: deadlock: thread %d (and maybe others) waits on a barrier the rest of the block never reaches\n", t);
      std::abort();
    }
}

}  // namespace emu
#endif
