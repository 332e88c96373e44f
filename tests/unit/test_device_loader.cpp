// Tests of the device loader (runner/device_loader.h), staged and mapped, on the host
// backend, whose device memory is host memory: every byte lands, with one reader thread or
// several, at any chunk (window) size, with tensors of every size; checksums name the
// tensor they fail; a short file, overlapping tensors and one outside the load are named.
// The mapped load's registrations are counted: every window registered is unregistered,
// a few at a time, also when a registration fails.
#include <gtest/gtest.h>
#include <xxhash.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/common.h"
#include "kernels/ops.h"
#include "runner/device_loader.h"
#include "tests/unit/temp_dir.h"

namespace grokit::runner {
namespace {

const GrokitOps* ops() { return grokit_host_ops(); }

class DeviceLoader : public ::testing::TestWithParam<LoadSource> {
 protected:
  static LoadSource source() { return GetParam(); }
};

struct File {
  testing::TempDir dir{"loader"};
  std::string path = dir.file("shard.bin");
  std::vector<uint8_t> bytes;
  explicit File(size_t n) : bytes(n) {
    std::mt19937_64 rng(n);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    auto f = OutputFile::open(path, OutputFile::Mode::kCreateExclusive);
    EXPECT_TRUE(f.ok());
    EXPECT_TRUE(f->pwrite_all(0, bytes.data(), bytes.size()).ok());
    EXPECT_TRUE(f->close().ok());
  }
  // A range of a load that starts at byte `base` of the file (offsets relative to it).
  HashedRange range(const char* name, uint64_t offset, uint64_t size, uint64_t base = 0) const {
    return {name, offset, size, XXH3_64bits(bytes.data() + base + offset, size)};
  }
};

TEST_P(DeviceLoader, EveryByteLandsWithAnyReadersAndChunks) {
  const File f(3 * 1000 * 1000 + 123);
  const uint64_t offset = 4096 + 7, bytes = f.bytes.size() - offset - 99;
  // Ranges that start and end inside chunks, span several, and one of a single byte.
  const std::vector<HashedRange> ranges = {f.range("a", 0, 1000, offset), f.range("b", 1000, 1499000, offset),
                                           f.range("c", 1500000, 1, offset),
                                           f.range("d", 1600000, bytes - 1600000, offset)};
  for (unsigned readers : {1u, 2u, 3u, 8u}) {
    for (size_t staging : {size_t{65536}, size_t{1} << 20, size_t{64} << 20}) {
      SCOPED_TRACE(::testing::Message() << readers << " readers, staging " << staging);
      std::vector<uint8_t> device(bytes, 0xee);
      LoadStats st;
      Status s = load_file_to_device(ops(), nullptr, f.path, offset, bytes, device.data(), ranges, nullptr, &st,
                                     staging, readers, source());
      ASSERT_TRUE(s.ok()) << s.error().message;
      EXPECT_EQ(0, std::memcmp(device.data(), f.bytes.data() + offset, bytes));
      EXPECT_EQ(st.bytes, bytes);
      EXPECT_GE(st.readers, 1u);
      EXPECT_LE(st.readers, readers);
    }
  }
}

// Many small tensors with gaps between them (packed several to a job), large ones (a
// job each, read chunk by chunk by one reader) and empty ones: every byte lands, every
// checksum is checked (a wrong one anywhere is found and named).
TEST_P(DeviceLoader, ManyTensorsOfEverySize) {
  const File f(5 << 20);
  std::mt19937_64 rng(7);
  std::vector<HashedRange> ranges;
  uint64_t at = 0;
  for (int i = 0; at < f.bytes.size(); ++i) {
    at += rng() % 3 == 0 ? rng() % 5000 : 0;  // a gap, sometimes
    const uint64_t size = i % 17 == 5 ? 0 : i % 23 == 7 ? 300000 + rng() % 700000 : 1 + rng() % 20000;
    if (at + size > f.bytes.size()) break;
    ranges.push_back(f.range(("t" + std::to_string(i)).c_str(), at, size));
    at += size;
  }
  ASSERT_GT(ranges.size(), 100u);
  std::shuffle(ranges.begin(), ranges.end(), rng);  // the loader sorts them
  for (unsigned readers : {1u, 3u, 8u}) {
    for (size_t staging : {size_t{4096}, size_t{65536}, size_t{1} << 20}) {
      SCOPED_TRACE(::testing::Message() << readers << " readers, staging " << staging);
      std::vector<uint8_t> device(f.bytes.size(), 0xee);
      Status s = load_file_to_device(ops(), nullptr, f.path, 0, f.bytes.size(), device.data(), ranges, nullptr,
                                     nullptr, staging, readers, source());
      ASSERT_TRUE(s.ok()) << s.error().message;
      EXPECT_EQ(0, std::memcmp(device.data(), f.bytes.data(), f.bytes.size()));
      for (size_t bad : {size_t{0}, ranges.size() / 2, ranges.size() - 1}) {
        if (ranges[bad].size == 0) continue;
        std::vector<HashedRange> wrong = ranges;
        wrong[bad].xxh3 ^= 1 << 20;
        s = load_file_to_device(ops(), nullptr, f.path, 0, f.bytes.size(), device.data(), wrong, nullptr, nullptr,
                                staging, readers, source());
        ASSERT_FALSE(s.ok());
        EXPECT_NE(s.error().message.find("tensor '" + ranges[bad].name + "'"), std::string::npos)
            << s.error().message;
      }
    }
  }
}

TEST_P(DeviceLoader, OverlappingOrEmptyButCorruptRangesAreErrors) {
  const File f(1 << 16);
  std::vector<uint8_t> device(1 << 16);
  Status s = load_file_to_device(ops(), nullptr, f.path, 0, 1 << 16, device.data(),
                                 {f.range("x", 0, 5000), f.range("y", 4096, 100)}, nullptr, nullptr, 4096, 2, source());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("tensor 'y' overlaps tensor 'x'"), std::string::npos) << s.error().message;
  s = load_file_to_device(ops(), nullptr, f.path, 0, 1 << 16, device.data(), {{"empty", 100, 0, 12345}}, nullptr,
                          nullptr, 4096, 2, source());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("tensor 'empty' is empty"), std::string::npos) << s.error().message;
}

TEST_P(DeviceLoader, AChecksumMismatchNamesTheTensor) {
  const File f(2 << 20);
  std::vector<HashedRange> ranges = {f.range("good", 0, 1 << 20), f.range("layer.3.bad", 1 << 20, 1 << 20)};
  ranges[1].xxh3 ^= 1;
  for (unsigned readers : {1u, 4u}) {
    std::vector<uint8_t> device(f.bytes.size());
    Status s = load_file_to_device(ops(), nullptr, f.path, 0, f.bytes.size(), device.data(), ranges, nullptr, nullptr,
                                   size_t{1} << 18, readers, source());
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().message.find("tensor 'layer.3.bad'"), std::string::npos) << s.error().message;
    EXPECT_NE(s.error().message.find("corrupt"), std::string::npos) << s.error().message;
  }
}

TEST_P(DeviceLoader, AShortFileIsNamedWithTheByte) {
  const File f(1 << 20);
  for (unsigned readers : {1u, 3u}) {
    std::vector<uint8_t> device(2 << 20);
    Status s = load_file_to_device(ops(), nullptr, f.path, 0, 2 << 20, device.data(), {}, nullptr, nullptr,
                                   size_t{1} << 16, readers, source());
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().message.find("the file ends at byte 1048576"), std::string::npos) << s.error().message;
  }
  Status s = load_file_to_device(ops(), nullptr, f.dir.file("missing"), 0, 16, nullptr, {}, nullptr, nullptr,
                                 size_t{32} << 20, 1, source());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("cannot open"), std::string::npos) << s.error().message;
}

TEST_P(DeviceLoader, ARangeOutsideTheLoadIsAnError) {
  const File f(1 << 16);
  std::vector<uint8_t> device(1 << 16);
  Status s = load_file_to_device(ops(), nullptr, f.path, 0, 1 << 16, device.data(), {f.range("x", 1 << 15, 1 << 15),
                                                                                     {"past", 1 << 16, 8, 0}},
                                 nullptr, nullptr, size_t{1} << 12, 2, source());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("tensor 'past' lies outside"), std::string::npos) << s.error().message;
}

INSTANTIATE_TEST_SUITE_P(Sources, DeviceLoader, ::testing::Values(LoadSource::kStaged, LoadSource::kMapped),
                         [](const auto& info) { return info.param == LoadSource::kStaged ? "staged" : "mapped"; });

// The host backend's registrations follow CUDA's rules, so the loader's bookkeeping is
// tested against them: page-aligned, no overlap, unregister only what is registered.
TEST(HostRegister, RefusesWhatCudaRefuses) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<uint8_t> mem(8 * page);
  auto* base = reinterpret_cast<uint8_t*>(align_up(reinterpret_cast<uintptr_t>(mem.data()), page));
  EXPECT_EQ(ops()->host_register(base + 1, page), GROKIT_ERR_INVALID);
  EXPECT_EQ(ops()->host_register(base, page + 1), GROKIT_ERR_INVALID);
  ASSERT_EQ(ops()->host_register(base + page, 2 * page), GROKIT_OK);
  EXPECT_EQ(ops()->host_register(base, 2 * page), GROKIT_ERR_INVALID);         // overlaps from below
  EXPECT_EQ(ops()->host_register(base + 2 * page, page), GROKIT_ERR_INVALID);  // inside
  EXPECT_NE(std::string(ops()->error_message()).find("overlap"), std::string::npos) << ops()->error_message();
  EXPECT_EQ(ops()->host_register(base, page), GROKIT_OK);  // just below
  EXPECT_EQ(ops()->host_register(base + 3 * page, page), GROKIT_OK);  // just above
  EXPECT_EQ(ops()->host_unregister(base + 2 * page), GROKIT_ERR_INVALID);  // not a start
  for (size_t p : {size_t{0}, size_t{1}, size_t{3}}) EXPECT_EQ(ops()->host_unregister(base + p * page), GROKIT_OK);
  EXPECT_EQ(ops()->host_unregister(base), GROKIT_ERR_INVALID);  // twice
}

// The host backend with its registrations counted, and the n-th one refused.
struct Counted {
  static inline std::atomic<int> registered{0}, live{0}, most_live{0}, refuse_at{-1};
  static inline std::atomic<size_t> largest{0};
  static int reg(void* p, size_t n) {
    if (registered.fetch_add(1) == refuse_at.load()) {
      grokit_host_set_error("refused on purpose");
      return GROKIT_ERR_UNSUPPORTED;
    }
    const int rc = grokit_host_ops()->host_register(p, n);
    if (rc != GROKIT_OK) return rc;
    most_live.store(std::max(most_live.load(), ++live));
    largest.store(std::max(largest.load(), n));
    return rc;
  }
  static int unreg(void* p) {
    const int rc = grokit_host_ops()->host_unregister(p);
    if (rc == GROKIT_OK) --live;
    return rc;
  }
  static const GrokitOps* table() {
    static const GrokitOps t = [] {
      GrokitOps o = *grokit_host_ops();
      o.host_register = reg;
      o.host_unregister = unreg;
      return o;
    }();
    registered = 0, live = 0, most_live = 0, refuse_at = -1, largest = 0;
    return &t;
  }
};

TEST(MappedLoad, RegistersAFewWindowsAtATimeAndUnregistersEach) {
  const File f(5 * 1000 * 1000 + 17);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const uint64_t offset = 3 * page + 5, bytes = f.bytes.size() - offset - 3;
  const std::vector<HashedRange> ranges = {f.range("a", 0, 12345, offset), f.range("b", 20000, bytes - 20000, offset)};
  for (size_t window : {size_t{1}, page, size_t{100000}, size_t{1} << 20, size_t{64} << 20}) {
    SCOPED_TRACE(::testing::Message() << "window " << window);
    const GrokitOps* o = Counted::table();
    std::vector<uint8_t> device(bytes, 0xee);
    LoadStats st;
    Status s = load_file_to_device(o, nullptr, f.path, offset, bytes, device.data(), ranges, nullptr, &st, window, 3,
                                   LoadSource::kMapped);
    ASSERT_TRUE(s.ok()) << s.error().message;
    EXPECT_EQ(0, std::memcmp(device.data(), f.bytes.data() + offset, bytes));
    const uint64_t w = align_up(std::max<uint64_t>(window, page), page);
    EXPECT_EQ(static_cast<uint64_t>(Counted::registered.load()), (bytes + offset % page + w - 1) / w);
    EXPECT_EQ(Counted::live.load(), 0);
    EXPECT_LE(Counted::most_live.load(), 3);
    EXPECT_LE(Counted::largest.load(), w);
    EXPECT_EQ(st.bytes, bytes);
  }
}

TEST(MappedLoad, ARefusedRegistrationIsAnErrorAndLeavesNoneBehind) {
  const File f(1 << 20);
  for (int refuse : {0, 5}) {
    const GrokitOps* o = Counted::table();
    Counted::refuse_at = refuse;
    std::vector<uint8_t> device(f.bytes.size());
    Status s = load_file_to_device(o, nullptr, f.path, 0, f.bytes.size(), device.data(), {f.range("x", 0, 1 << 20)},
                                   nullptr, nullptr, 65536, 2, LoadSource::kMapped);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().message.find("cannot register 64.00 KiB of its mapping at byte " + std::to_string(refuse * 65536)),
              std::string::npos)
        << s.error().message;
    EXPECT_NE(s.error().message.find("(unsupported here): refused on purpose"), std::string::npos) << s.error().message;
    EXPECT_EQ(Counted::live.load(), 0);
  }
}

}  // namespace
}  // namespace grokit::runner
