// C++ tests of the ops, through the dispatcher exactly as Python calls them (no Python involved).
#include "fastload.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
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
                .typed<void(const std::string&, at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, int64_t)>();
  at::Tensor dst = at::zeros({int64_t(2) << 20}, at::kByte);
  rr.call(path, dst, {10, int64_t(1) << 20}, {0, 100}, {50, int64_t(1) << 20}, 3);
  auto* d = dst.data_ptr<uint8_t>();
  EXPECT(d[0] == static_cast<uint8_t>(data[10]) && d[49] == static_cast<uint8_t>(data[59]));
  EXPECT(d[100] == static_cast<uint8_t>(data[1 << 20]) && d[99 + (1 << 20)] == static_cast<uint8_t>(data[(2 << 20) - 1]));
  EXPECT(throws([&] { rr.call(path, dst, {int64_t(3) << 20}, {0}, {1}, 1); }));       // past EOF
  EXPECT(throws([&] { rr.call(path, dst, {0}, {int64_t(2) << 20}, {1}, 1); }));       // past dst
  EXPECT(throws([&] { rr.call(path, dst, {-1}, {0}, {1}, 1); }));                     // negative
  EXPECT(throws([&] { rr.call("/nonexistent/file", dst, {0}, {0}, {1}, 1); }));
  unlink(path);
}

}  // namespace

int main() {
  test_alloc();
  test_carve_and_poison();
  test_read_ranges();
  if (failures) {
    std::fprintf(stderr, "%d C++ check(s) failed\n", failures);
    return 1;
  }
  std::printf("fsdp_fastload C++ ops: all checks passed\n");
  return 0;
}
