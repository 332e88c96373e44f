// common: run_in_order, the ordered producer/consumer pipeline that quantize writes its
// payloads with; same_file, which the commands use to refuse an output over an input;
// read_small_file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "common/common.h"
#include "temp_dir.h"

namespace grokit {
namespace {

// Sleeps a few microseconds, differently per item, so that items finish out of order.
void jitter(size_t i, unsigned seed) {
  std::mt19937 rng(static_cast<unsigned>(i) * 7919u + seed);
  std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
}

TEST(RunInOrder, ConsumesEveryItemInOrderFromItsOwnSlot) {
  for (unsigned threads : {1u, 2u, 3u, 5u}) {
    ThreadPool pool(threads);
    for (size_t slots : {1u, 2u, 3u, 8u}) {
      for (size_t n : {0u, 1u, 7u, 40u}) {
        SCOPED_TRACE(::testing::Message() << threads << " threads, " << slots << " slots, " << n << " items");
        std::vector<std::atomic<int64_t>> held(slots);  // the item a slot holds, -1 free
        for (auto& h : held) h = -1;
        std::atomic<int> consumers{0}, in_slots{0}, max_in_slots{0};
        std::vector<size_t> order;
        bool overwrote = false, overlapped = false, wrong_item = false;
        Status st = run_in_order(
            pool, n, slots,
            [&](size_t i, size_t slot) {
              if (slot != i % slots) wrong_item = true;
              int64_t expected = -1;
              if (!held[slot].compare_exchange_strong(expected, static_cast<int64_t>(i))) overwrote = true;
              const int now = ++in_slots;
              for (int m = max_in_slots.load(); now > m && !max_in_slots.compare_exchange_weak(m, now);) {
              }
              jitter(i, threads);
            },
            [&](size_t i, size_t slot) {
              if (++consumers != 1) overlapped = true;
              if (held[slot].load() != static_cast<int64_t>(i)) wrong_item = true;
              order.push_back(i);
              held[slot] = -1;
              --in_slots;
              --consumers;
              return Status{};
            });
        ASSERT_TRUE(st.ok()) << st.error().message;
        ASSERT_EQ(order.size(), n);
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(order[i], i);
        EXPECT_FALSE(overwrote) << "an item was produced into a slot not yet consumed";
        EXPECT_FALSE(overlapped) << "two consumes ran at once";
        EXPECT_FALSE(wrong_item);
        EXPECT_LE(max_in_slots.load(), static_cast<int>(slots));
      }
    }
  }
}

TEST(RunInOrder, StopsAtTheFirstFailedConsume) {
  for (unsigned threads : {1u, 3u}) {
    ThreadPool pool(threads);
    const size_t n = 200, slots = 4, fail_at = 37;
    std::atomic<size_t> produced{0};
    std::vector<size_t> consumed;
    Status st = run_in_order(
        pool, n, slots,
        [&](size_t i, size_t) {
          ++produced;
          jitter(i, 1);
        },
        [&](size_t i, size_t) -> Status {
          consumed.push_back(i);
          if (i == fail_at) {
            // Late, so that the next items are ready by then: they must not be consumed.
            std::this_thread::sleep_for(std::chrono::milliseconds(threads > 1 ? 20 : 0));
            return make_error("item ", i, ": no space");
          }
          return {};
        });
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().message, "item 37: no space");
    ASSERT_EQ(consumed.size(), fail_at + 1);
    EXPECT_EQ(consumed.back(), fail_at);
    // Nothing past the slots that were in flight when it failed.
    EXPECT_LE(produced.load(), fail_at + 1 + slots);
  }
}

TEST(SameFile, SeesThroughLinksAndTellsFilesApart) {
  testing::TempDir d("same_file");
  ASSERT_TRUE(make_directory(d.file("model")).ok());
  ASSERT_TRUE(write_file_atomic(d.file("model/a"), "a").ok());
  ASSERT_TRUE(write_file_atomic(d.file("model/b"), "a").ok());  // same bytes, another file
  ASSERT_EQ(::symlink("model", d.file("alias").c_str()), 0);
  ASSERT_EQ(::link(d.file("model/a").c_str(), d.file("hard").c_str()), 0);
  EXPECT_TRUE(same_file(d.file("model"), d.file("model")));
  EXPECT_TRUE(same_file(d.file("model"), d.file("alias")));
  EXPECT_TRUE(same_file(d.file("model"), d.file("model/../model/.")));
  EXPECT_TRUE(same_file(d.file("alias/a"), d.file("model/a")));
  EXPECT_TRUE(same_file(d.file("hard"), d.file("model/a")));
  EXPECT_FALSE(same_file(d.file("model/a"), d.file("model/b")));
  EXPECT_FALSE(same_file(d.file("model"), d.file("model/a")));
  EXPECT_FALSE(same_file(d.file("model/missing"), d.file("model/missing")));  // neither exists
  EXPECT_FALSE(same_file(d.file("model/a"), d.file("model/missing")));
}

TEST(ReadSmallFile, ReadsToTheEndWhateverStatSaysAndKeepsItsLimit) {
  testing::TempDir d("read_small_file");
  ASSERT_TRUE(write_file_atomic(d.file("f"), std::string(10000, 'x')).ok());
  auto whole = read_small_file(d.file("f"), 10000);
  ASSERT_TRUE(whole.ok()) << whole.error().message;
  EXPECT_EQ(*whole, std::string(10000, 'x'));
  auto over = read_small_file(d.file("f"), 9999);
  ASSERT_FALSE(over.ok());
  EXPECT_NE(over.error().message.find("more than the limit of 9999"), std::string::npos) << over.error().message;
  // /proc files have a size of 0 to stat, and content to read.
  auto meminfo = read_small_file("/proc/meminfo", 1 << 16);
  ASSERT_TRUE(meminfo.ok()) << meminfo.error().message;
  EXPECT_NE(meminfo->find("MemTotal:"), std::string::npos);
  auto capped = read_small_file("/proc/meminfo", 16);
  ASSERT_FALSE(capped.ok());
  EXPECT_NE(capped.error().message.find("/proc/meminfo: more than the limit of 16 bytes"), std::string::npos)
      << capped.error().message;
  EXPECT_FALSE(read_small_file(d.file("missing"), 100).ok());
  // MemAvailable, read from there: positive, and no more than the physical memory.
  const uint64_t available = meminfo_available_bytes();
  EXPECT_GT(available, 0u);
  EXPECT_LE(available, static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE)));
}

}  // namespace
}  // namespace grokit
