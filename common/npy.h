// NumPy .npy files (format versions 1.0 and 2.0): a validating reader that memory-maps
// the data, and a streaming writer for outputs larger than memory (a [B, 8192, 131072]
// float32 logits file is 4 GiB per row). Only little-endian C-order arrays of the dtypes
// grokit exchanges are accepted: '<f4', '<i4', '<i8', '<u2' (bf16 bits), '|i1', '|u1'.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/common.h"

namespace grokit::npy {

struct Header {
  std::string descr;            // e.g. "<f4"
  std::vector<int64_t> shape;
  uint64_t data_offset = 0;     // where the array data starts in the file
  uint64_t element_size = 0;
  uint64_t element_count() const;
};

// Parses and checks the header of an .npy file held in [data, data + size): magic,
// version, header length, the dict (descr, fortran_order False, shape), and that the
// data the shape needs is present (trailing bytes are an error too).
Result<Header> parse_header(const uint8_t* data, uint64_t size, const std::string& file);

// A memory-mapped .npy file.
class Array {
 public:
  static Result<Array> open(const std::string& path);
  // Checks dtype and rank ("expected <f4 with 3 dimensions / actual <i4 [2, 5]").
  Status expect(std::string_view descr, size_t ndim) const;
  const Header& header() const { return header_; }
  const std::vector<int64_t>& shape() const { return header_.shape; }
  template <class T>
  const T* data() const { return reinterpret_cast<const T*>(file_.data() + header_.data_offset); }
  const std::string& path() const { return file_.path(); }
  const MappedFile& file() const { return file_; }  // for madvise hints while streaming

 private:
  MappedFile file_;
  Header header_;
};

// Writes an .npy file in order, without holding it in memory. Data goes to
// <path>.tmp; finish() checks that exactly the shape's bytes were written, fsyncs and
// renames, so an interrupted writer never leaves a file that looks complete.
class Writer {
 public:
  // Refuses an existing path unless overwrite is set.
  static Result<Writer> create(const std::string& path, std::string_view descr, std::span<const int64_t> shape,
                               bool overwrite);
  // An unfinished writer removes its <path>.tmp when destroyed.
  ~Writer();
  Writer(Writer&& o) noexcept;
  Writer& operator=(Writer&& o) noexcept;
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  Status write(const void* data, size_t bytes);
  Status finish();
  uint64_t bytes_expected() const { return expected_; }
  uint64_t bytes_written() const { return written_; }

 private:
  Writer() = default;
  void discard();  // closes and removes the tmp file of an unfinished writer
  std::string path_, tmp_;
  OutputFile file_;
  uint64_t data_offset_ = 0, expected_ = 0, written_ = 0;
  bool finished_ = false;
  bool overwrite_ = false;
};

// Writes a whole small array at once (through Writer).
Status write_array(const std::string& path, std::string_view descr, std::span<const int64_t> shape, const void* data,
                   bool overwrite);

}  // namespace grokit::npy
