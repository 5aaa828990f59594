// C++ tests of the ops, through the dispatcher exactly as Python calls them (no Python involved).
#include "fastload.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace {

int failures = 0;

#define EXPECT(cond)                                                      \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

bool throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

void test_alloc() {
  auto a = op("fsdp_fastload::alloc").typed<at::Tensor(int64_t, at::Device, bool)>();
  for (int64_t n : {int64_t(0), int64_t(100), int64_t(5) << 20}) {
    at::Tensor t = a.call(n, at::Device("cpu"), false);
    EXPECT(t.numel() == n && t.scalar_type() == at::kByte && t.is_contiguous());
    if (n) {
      t.fill_(7);
      EXPECT(t.sum().item<int64_t>() == 7 * n);
    }
  }
  EXPECT(throws([&] { a.call(-1, at::Device("cpu"), false); }));
}

void test_carve_and_poison() {
  at::Tensor flat = fsdp_fastload::alloc(1024, at::Device("cpu"), false);
  auto carve = op("fsdp_fastload::carve").typed<std::vector<at::Tensor>(const at::Tensor&, at::IntArrayRef)>();
  auto poison = op("fsdp_fastload::poison_").typed<void(at::Tensor&, int64_t)>();
  poison.call(flat, 0xFF);
  // float32 [2,3] at 0, bf16 [4] at 64, int64 [] at 128, transposed float32 [3,2] at 256, empty at 512
  std::vector<int64_t> spec = {6, 0, 2, 2, 3, 3, 1,  11, 64, 1, 4, 1,  4, 128, 0,
                               6, 256, 2, 3, 2, 1, 3,  6, 512, 2, 0, 5, 5, 1};
  auto views = carve.call(flat, spec);
  EXPECT(views.size() == 5);
  EXPECT(views[0].scalar_type() == at::kFloat && views[0].sizes() == at::IntArrayRef({2, 3}));
  EXPECT(views[0].isnan().all().item<bool>());
  EXPECT(views[1].scalar_type() == at::kBFloat16 && views[1].isnan().all().item<bool>());
  EXPECT(views[2].dim() == 0 && views[2].item<int64_t>() == -1);
  EXPECT(views[3].stride(0) == 1 && views[3].stride(1) == 3 && views[3].storage_offset() == 64);
  EXPECT(views[4].numel() == 0);
  views[2].fill_(0x0102030405060708LL);  // aliasing: the write lands at bytes 128..136 of flat
  EXPECT(flat[128].item<uint8_t>() == 0x08 && flat[135].item<uint8_t>() == 0x01);
  EXPECT(flat[127].item<uint8_t>() == 0xFF && flat[136].item<uint8_t>() == 0xFF);
  // misaligned, out of bounds, unknown dtype, truncated spec
  EXPECT(throws([&] { carve.call(flat, std::vector<int64_t>{6, 2, 1, 1, 1}); }));
  EXPECT(throws([&] { carve.call(flat, std::vector<int64_t>{6, 1020, 1, 2, 1}); }));
  EXPECT(throws([&] { carve.call(flat, std::vector<int64_t>{99, 0, 0}); }));
  EXPECT(throws([&] { carve.call(flat, std::vector<int64_t>{6, 0, 2, 1}); }));
  EXPECT(throws([&] { poison.call(flat, 256); }));
}

void test_read_ranges() {
  char path[] = "/tmp/fsdp_fastload_cpp_XXXXXX";
  int fd = mkstemp(path);
  EXPECT(fd >= 0);
  std::string data(3 << 20, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 31 % 251);
  EXPECT(write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size()));
  close(fd);
  auto rr = op("fsdp_fastload::read_ranges")
                .typed<std::string(const std::string&, at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, int64_t, at::IntArrayRef, int64_t)>();
  at::Tensor dst = at::zeros({int64_t(2) << 20}, at::kByte);
  EXPECT(rr.call(path, dst, {10, int64_t(1) << 20}, {0, 100}, {50, int64_t(1) << 20}, 3, {}, -1).empty());
  auto* d = dst.data_ptr<uint8_t>();
  EXPECT(d[0] == static_cast<uint8_t>(data[10]) && d[49] == static_cast<uint8_t>(data[59]));
  EXPECT(d[100] == static_cast<uint8_t>(data[1 << 20]) && d[99 + (1 << 20)] == static_cast<uint8_t>(data[(2 << 20) - 1]));
  EXPECT(!rr.call(path, dst, {int64_t(3) << 20}, {0}, {1}, 1, {}, -1).empty());       // past EOF
  EXPECT(!rr.call(path, dst, {0}, {int64_t(2) << 20}, {1}, 1, {}, -1).empty());       // past dst
  EXPECT(!rr.call(path, dst, {-1}, {0}, {1}, 1, {}, -1).empty());                     // negative
  EXPECT(!rr.call("/nonexistent/file", dst, {0}, {0}, {1}, 1, {}, -1).empty());

  // Edges: exact fits succeed and touch nothing else; one byte over, overflowing sums, mismatched
  // lists, a strided destination or a directory return their error (read_ranges never throws) before any
  // byte is written.
  const int64_t kMax = std::numeric_limits<int64_t>::max();
  const int64_t size = static_cast<int64_t>(data.size());
  at::Tensor small = at::full({52}, 0xCD, at::kByte);
  auto* s = small.data_ptr<uint8_t>();
  EXPECT(rr.call(path, small, {size - 50}, {1}, {50}, 2, {}, -1).empty());  // the file's last 50 bytes
  EXPECT(s[0] == 0xCD && s[51] == 0xCD);
  EXPECT(std::memcmp(s + 1, data.data() + size - 50, 50) == 0);
  EXPECT(rr.call(path, small, {size}, {52}, {0}, 1, {}, -1).empty());  // empty range at both ends: allowed, writes nothing
  at::Tensor before = small.clone();
  EXPECT(!rr.call(path, small, {0}, {1}, {52}, 1, {}, -1).empty());             // one byte past dst
  EXPECT(!rr.call(path, small, {size - 49}, {0}, {50}, 1, {}, -1).empty());     // one byte past EOF
  EXPECT(!rr.call(path, small, {0}, {kMax}, {2}, 1, {}, -1).empty());           // d + len overflows
  EXPECT(!rr.call(path, small, {kMax}, {0}, {2}, 1, {}, -1).empty());           // fo + len overflows
  EXPECT(!rr.call(path, small, {0}, {0}, {kMax}, 1, {}, -1).empty());
  EXPECT(!rr.call(path, small, {0, 0}, {0}, {1, 1}, 1, {}, -1).empty());        // lists differ
  EXPECT(!rr.call(path, small, {0, 0}, {0, 10}, {10, 43}, 1, {}, -1).empty());  // 2nd range bad
  EXPECT(!rr.call("/tmp", small, {0}, {0}, {0}, 1, {}, -1).empty());            // a directory
  at::Tensor strided = at::zeros({8}, at::kByte).slice(0, 0, 8, 2);
  EXPECT(!rr.call(path, strided, {0}, {0}, {1}, 1, {}, -1).empty());
  EXPECT(at::equal(small, before));  // nothing written by any refused call

  // Ranges bigger than one 8 MiB chunk, split across threads, into a non-byte dtype.
  std::string big(9 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 % 253);
  fd = open(path, O_WRONLY | O_TRUNC);
  EXPECT(fd >= 0 && write(fd, big.data(), big.size()) == static_cast<ssize_t>(big.size()));
  close(fd);
  at::Tensor wide = at::empty({int64_t(big.size() / 4) - 1}, at::kFloat);
  EXPECT(rr.call(path, wide, {7}, {0}, {int64_t(big.size()) - 8}, 4, {}, -1).empty());
  EXPECT(std::memcmp(wide.data_ptr(), big.data() + 7, big.size() - 8) == 0);

  // `expect`: the file as it was when its layout was read. The same file reads; another inode,
  // size or modification time returns the error and writes nothing; a malformed stamp is refused.
  struct stat st {};
  EXPECT(stat(path, &st) == 0);
  const int64_t mtime = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  const std::vector<int64_t> same{int64_t(st.st_dev), int64_t(st.st_ino), int64_t(st.st_size), mtime};
  at::Tensor four = at::full({4}, 0xCD, at::kByte);
  EXPECT(rr.call(path, four, {0}, {0}, {4}, 1, same, -1).empty());
  EXPECT(std::memcmp(four.data_ptr(), big.data(), 4) == 0);
  four.fill_(0xCD);
  for (size_t k = 0; k < same.size(); ++k) {
    std::vector<int64_t> other = same;
    other[k] += 1;
    const std::string got = rr.call(path, four, {0}, {0}, {4}, 1, other, -1);
    EXPECT(got.find("changed since its layout was read") != std::string::npos);
    EXPECT(got.find(path) != std::string::npos);
  }
  EXPECT(!rr.call(path, four, {0}, {0}, {4}, 1, {1, 2, 3}, -1).empty());
  EXPECT(at::equal(four, at::full({4}, 0xCD, at::kByte)));

  // `fd`: the caller's open file is read (and left open), whatever its name now holds; `path` only
  // names it in errors. A name replaced since still reads the open file's bytes.
  const int held = open(path, O_RDONLY);
  EXPECT(held >= 0);
  EXPECT(unlink(path) == 0);  // the name gone: only the open file is left
  EXPECT(rr.call("/nonexistent/name", four, {4}, {0}, {4}, 2, same, held).empty());
  EXPECT(std::memcmp(four.data_ptr(), big.data() + 4, 4) == 0);
  EXPECT(fcntl(held, F_GETFD) != -1);  // still open
  const std::string past = rr.call("shown.bin", four, {int64_t(big.size())}, {0}, {1}, 1, same, held);
  EXPECT(past.find("past the end of shown.bin") != std::string::npos);
  close(held);
  EXPECT(!rr.call(path, four, {0}, {0}, {4}, 1, {}, held).empty());  // a closed descriptor: its error
}

}  // namespace

void test_copy_ranges_and_prefault() {
  auto copy = op("fsdp_fastload::copy_ranges")
                  .typed<void(at::Tensor&, at::TensorList, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  auto prefault = op("fsdp_fastload::prefault").typed<bool(const at::Tensor&)>();
  at::Tensor a = at::arange(100, at::kFloat), b = at::arange(7, at::kLong);
  at::Tensor dst = fsdp_fastload::alloc(1024, at::Device("cpu"), false);
  dst.fill_(0);
  copy.call(dst, {a, b}, {4, 8}, {0, 512}, {396, 40});
  EXPECT(at::equal(dst.narrow(0, 0, 396), a.view(at::kByte).narrow(0, 4, 396)));
  EXPECT(at::equal(dst.narrow(0, 512, 40), b.view(at::kByte).narrow(0, 8, 40)));
  EXPECT(dst.narrow(0, 396, 116).sum().item<int64_t>() == 0);
  // Every range is checked before a byte moves: out of the source, out of dst, negative, mismatched.
  at::Tensor before = dst.clone();
  EXPECT(throws([&] { copy.call(dst, {a}, {397}, {0}, {4}); }));
  EXPECT(throws([&] { copy.call(dst, {a}, {0}, {1021}, {4}); }));
  EXPECT(throws([&] { copy.call(dst, {a}, {-1}, {0}, {4}); }));
  EXPECT(throws([&] { copy.call(dst, {a, b}, {0}, {0}, {4}); }));
  EXPECT(throws([&] { copy.call(dst, {a.view({10, 10}).t()}, {0}, {0}, {4}); }));
  EXPECT(throws([&] { copy.call(dst, {a, b}, {0, 0}, {0, INT64_MAX - 2}, {4, 8}); }));
  EXPECT(at::equal(dst, before));
  // prefault never changes a byte (here: bytes written before it runs).
  at::Tensor big = fsdp_fastload::alloc(int64_t(9) << 20, at::Device("cpu"), false);
  big.narrow(0, 0, 1 << 20).fill_(42);
  prefault.call(big);
  EXPECT(big.narrow(0, 0, 1 << 20).eq(42).all().item<bool>());
  EXPECT(!prefault.call(big.narrow(0, 0, 0)));
}

void test_carve_contiguous_spec() {
  auto carve = op("fsdp_fastload::carve").typed<std::vector<at::Tensor>(const at::Tensor&, at::IntArrayRef)>();
  at::Tensor flat = fsdp_fastload::alloc(512, at::Device("cpu"), false);
  // float32 [2,3] contiguous (ndim -3: sizes only), then int64 [] (ndim -1), then bf16 [0,4]
  std::vector<int64_t> spec = {6, 0, -3, 2, 3, 4, 64, -1, 11, 128, -3, 0, 4};
  auto v = carve.call(flat, spec);
  EXPECT(v.size() == 3);
  EXPECT(v[0].sizes() == at::IntArrayRef({2, 3}) && v[0].strides() == at::IntArrayRef({3, 1}));
  EXPECT(v[1].dim() == 0 && v[1].storage_offset() == 8);
  EXPECT(v[2].numel() == 0 && v[2].strides() == at::IntArrayRef({4, 1}));
  EXPECT(throws([&] { carve.call(flat, std::vector<int64_t>{6, 0, -70, 1}); }));
  EXPECT(throws([&] { carve.call(flat, std::vector<int64_t>{6, 0, -3, 2}); }));
}

void test_carve_owned() {
  using Carve = std::vector<at::Tensor>(const at::Tensor&, at::IntArrayRef);
  auto owned = op("fsdp_fastload::carve_owned").typed<Carve>();
  const int64_t page = ::sysconf(_SC_PAGESIZE);
  at::Tensor flat = fsdp_fastload::alloc(8 * page, at::Device("cpu"), false);
  flat.fill_(0x11);
  // float32 [2,3] at 0, a 3-page int64 piece at 1 page, empty bf16 at 4 pages, uint8 [page] at 5 pages
  std::vector<int64_t> spec = {6, 0, -3, 2, 3,  4, page, -2, 3 * page / 8,  11, 4 * page, -2, 0,
                               0, 5 * page, -2, page};
  auto v = owned.call(flat, spec);
  EXPECT(v.size() == 4);
  // each its own storage at offset 0, exactly its bytes, over the buffer's memory
  EXPECT(v[0].storage_offset() == 0 && v[0].storage().nbytes() == 24 && v[0].data_ptr() == flat.data_ptr());
  EXPECT(v[1].storage().nbytes() == size_t(3 * page) &&
         static_cast<char*>(v[1].data_ptr()) == static_cast<char*>(flat.data_ptr()) + page);
  EXPECT(v[2].numel() == 0 && v[2].storage().nbytes() == 0 && v[2].storage().data() == nullptr);
  EXPECT(!v[0].storage().is_alias_of(v[1].storage()));
  // a dead piece's whole pages go back to the kernel (read as zeros) while the buffer lives on
  const auto* bytes = static_cast<const uint8_t*>(flat.data_ptr());
  const auto mid = reinterpret_cast<uintptr_t>(bytes) + page;  // its whole pages: [first, last)
  const auto* first = reinterpret_cast<const uint8_t*>((mid + page - 1) / page * page);
  const auto* last = reinterpret_cast<const uint8_t*>((mid + 3 * page) / page * page);
  v[1] = at::Tensor();
  bool zero = last - first >= 2 * page;
  for (const auto* p = first; p < last; ++p) zero = zero && *p == 0;
  EXPECT(zero);
  EXPECT(first[-1] == 0x11 || first == bytes + page);  // bytes outside its whole pages are kept
  EXPECT(v[3][0].item<uint8_t>() == 0x11 && bytes[23] == 0x11);
  // growing a piece moves it to memory of its own; its neighbour keeps its bytes
  v[0].resize_({64}).fill_(1.0f);
  EXPECT(v[0].data_ptr() != flat.data_ptr() && flat[0].item<uint8_t>() == 0x11);
  // pieces outlive the buffer's last other reference
  flat = at::Tensor();
  EXPECT(v[3].sum().item<int64_t>() == 0x11 * page);
  EXPECT(throws([&] { owned.call(fsdp_fastload::alloc(64, at::Device("cpu"), false), std::vector<int64_t>{6, 2, -2, 1}); }));
}

int main() {
  test_alloc();
  test_carve_and_poison();
  test_read_ranges();
  test_copy_ranges_and_prefault();
  test_carve_contiguous_spec();
  test_carve_owned();
  if (failures) {
    std::fprintf(stderr, "%d C++ check(s) failed\n", failures);
    return 1;
  }
  std::printf("fsdp_fastload C++ ops: all checks passed\n");
  return 0;
}
