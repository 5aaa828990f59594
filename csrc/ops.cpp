// Kernels and schemas of the fsdp_fastload ops. Schemas are declared once here; kernels are
// registered per backend. The pure-PyTorch fallbacks in fsdp_fastload/ops.py are the spec.
#include "fastload.h"

#include <ATen/Parallel.h>
#include <c10/core/TensorImpl.h>
#include <torch/library.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <string>
#include <system_error>
#include <thread>

namespace fsdp_fastload {

namespace {

constexpr c10::ScalarType kDtypes[] = {
    c10::kByte,          c10::kChar,           c10::kShort,           c10::kInt,
    c10::kLong,          c10::kHalf,           c10::kFloat,           c10::kDouble,
    c10::kComplexFloat,  c10::kComplexDouble,  c10::kBool,            c10::kBFloat16,
    c10::ScalarType::Float8_e5m2, c10::ScalarType::Float8_e4m3fn,
    c10::ScalarType::Float8_e5m2fnuz, c10::ScalarType::Float8_e4m3fnuz,
    c10::kUInt16,        c10::kUInt32,         c10::kUInt64,
    c10::ScalarType::Float8_e8m0fnu, c10::ScalarType::Float4_e2m1fn_x2,
};
constexpr int64_t kNumDtypes = sizeof(kDtypes) / sizeof(kDtypes[0]);

void check_flat(const at::Tensor& flat, const char* op) {
  TORCH_CHECK(flat.scalar_type() == at::kByte && flat.dim() == 1 && flat.is_contiguous(), op,
              ": expected a 1-D contiguous uint8 buffer (got dtype ", flat.scalar_type(), ", ",
              flat.dim(), " dims). Pass the tensor returned by fsdp_fastload alloc.");
}

}  // namespace

c10::ScalarType dtype_from_code(int64_t code) {
  TORCH_CHECK(code >= 0 && code < kNumDtypes, "fsdp_fastload: unknown dtype code ", code,
              " (expected 0..", kNumDtypes - 1, ")");
  return kDtypes[code];
}

int64_t num_dtype_codes() { return kNumDtypes; }

at::Tensor alloc(int64_t nbytes, at::Device device, bool pin_memory) {
  TORCH_CHECK(nbytes >= 0, "fsdp_fastload alloc: nbytes must be >= 0 (got ", nbytes, ")");
  // `empty` through PyTorch's allocators: no fill kernel, and on CPU no page is touched (large
  // blocks are fresh anonymous mappings). CUDA: the caching allocator; pin_memory: the pinned host
  // allocator. (Advising CPU buffers for transparent huge pages was measured 3x slower on the
  // receiver of a gloo broadcast here, because faults then wait for memory compaction.)
  return at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(device).pinned_memory(pin_memory));
}

namespace {

// What an owned piece's storage holds on to: the flat buffer's storage, released with the piece. On
// CPU the piece's whole pages go back to the kernel at once (madvise DONTNEED) while its neighbours
// live on, so a model whose parameters are replaced (wrapped by FSDP1, cast with .half(), an
// embedding resized) does not keep their memory resident; on CUDA the block is freed with the last.
struct Piece {
  c10::Storage base;
  char* start;
  int64_t nbytes;
};

void release_piece(void* ctx) {
  auto* piece = static_cast<Piece*>(ctx);
  static const int64_t page = ::sysconf(_SC_PAGESIZE);
  if (piece->base.device_type() == c10::DeviceType::CPU && piece->nbytes >= page && page > 0 &&
      piece->base.use_count() > 1) {  // others still hold the buffer (the last one frees it whole)
    const auto a = (reinterpret_cast<uintptr_t>(piece->start) + page - 1) / page * page;
    const auto b = (reinterpret_cast<uintptr_t>(piece->start) + piece->nbytes) / page * page;
    if (b > a) ::madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED);
  }
  delete piece;
}

std::vector<at::Tensor> carve_impl(const at::Tensor& flat, at::IntArrayRef spec, bool owned) {
  check_flat(flat, owned ? "fsdp_fastload carve_owned" : "fsdp_fastload carve");
  // Owned pieces on CPU/CUDA: a storage of their own (offset 0, exactly their bytes) over the flat
  // buffer's memory, as if allocated one by one; on meta, views.
  owned = owned && (flat.is_cpu() || flat.is_cuda());
  c10::Allocator* allocator = owned ? c10::GetAllocator(flat.device().type()) : nullptr;
  char* data = owned ? static_cast<char*>(flat.data_ptr()) : nullptr;
  const int64_t nbytes = flat.numel();
  const int64_t base = flat.storage_offset();  // bytes, since flat is uint8
  const auto* ptr = spec.data();
  const int64_t n = static_cast<int64_t>(spec.size());
  std::vector<at::Tensor> out;
  int64_t i = 0;
  while (i < n) {
    TORCH_CHECK(i + 3 <= n, "fsdp_fastload carve: truncated spec at entry ", out.size());
    const c10::ScalarType dtype = dtype_from_code(ptr[i]);
    const int64_t offset = ptr[i + 1];
    // ndim >= 0: sizes then strides follow; ndim < 0: a contiguous view of -ndim - 1 dims, sizes only.
    const bool contiguous = ptr[i + 2] < 0;
    const int64_t ndim = contiguous ? -ptr[i + 2] - 1 : ptr[i + 2];
    const int64_t words = contiguous ? ndim : 2 * ndim;
    TORCH_CHECK(ndim >= 0 && ndim <= 64 && i + 3 + words <= n, "fsdp_fastload carve: bad ndim ",
                ptr[i + 2], " at entry ", out.size());
    at::IntArrayRef sizes(ptr + i + 3, ndim);
    c10::SmallVector<int64_t, 6> contiguous_strides(ndim);
    if (contiguous) {
      int64_t acc = 1;
      for (int64_t d = ndim - 1; d >= 0; --d) {
        contiguous_strides[d] = acc;
        acc *= std::max<int64_t>(sizes[d], 1);
      }
    }
    at::IntArrayRef strides = contiguous ? at::IntArrayRef(contiguous_strides)
                                         : at::IntArrayRef(ptr + i + 3 + ndim, ndim);
    i += 3 + words;
    const int64_t itemsize = static_cast<int64_t>(c10::elementSize(dtype));
    TORCH_CHECK(offset >= 0 && offset % itemsize == 0 && (base + offset) % itemsize == 0,
                "fsdp_fastload carve: view ", out.size(), " (", dtype, ") has byte offset ", offset,
                " not aligned to its itemsize ", itemsize, ". Align offsets with the layout stage.");
    int64_t max_index = 0;
    bool empty = false;
    for (int64_t d = 0; d < ndim; ++d) {
      TORCH_CHECK(sizes[d] >= 0 && strides[d] >= 0, "fsdp_fastload carve: view ", out.size(),
                  " has a negative size or stride");
      if (sizes[d] == 0) empty = true;
      else max_index += (sizes[d] - 1) * strides[d];
    }
    const int64_t extent = empty ? 0 : (max_index + 1) * itemsize;
    TORCH_CHECK(offset + extent <= nbytes, "fsdp_fastload carve: view ", out.size(), " spans bytes [",
                offset, ", ", offset + extent, ") outside the buffer of ", nbytes, " bytes");
    if (owned) {
      // Resizable through the device's allocator, like a storage torch.empty made: growing it moves
      // it to memory of its own instead of writing over its neighbours.
      // An empty piece holds no memory (a null pointer, as torch.empty(0)): no two storages of
      // different dtypes may start at one address (torch.save refuses them), nor keep the buffer.
      c10::DataPtr ptr(nullptr, flat.device());
      if (extent > 0) {
        auto* piece = new Piece{flat.storage(), data + offset, extent};
        ptr = c10::DataPtr(data + offset, piece, &release_piece, flat.device());
      }
      c10::Storage storage(c10::Storage::use_byte_size_t(), extent, std::move(ptr), allocator, true);
      auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), flat.key_set(),
                                                        c10::scalarTypeToTypeMeta(dtype));
      t.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, 0);
      out.push_back(std::move(t));
      continue;
    }
    auto t = at::detail::make_tensor<c10::TensorImpl>(
        c10::Storage(flat.storage()), flat.key_set(), c10::scalarTypeToTypeMeta(dtype));
    t.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, (base + offset) / itemsize);
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace

std::vector<at::Tensor> carve(const at::Tensor& flat, at::IntArrayRef spec) {
  return carve_impl(flat, spec, false);
}

std::vector<at::Tensor> carve_owned(const at::Tensor& flat, at::IntArrayRef spec) {
  return carve_impl(flat, spec, true);
}

void poison_(at::Tensor& flat, int64_t value) {
  check_flat(flat, "fsdp_fastload poison_");
  TORCH_CHECK(value >= 0 && value <= 255, "fsdp_fastload poison_: value must be a byte (got ", value, ")");
  if (!flat.is_cpu()) {
    flat.fill_(value);
    return;
  }
  auto* p = static_cast<uint8_t*>(flat.data_ptr());
  at::parallel_for(0, flat.numel(), int64_t(1) << 22, [&](int64_t b, int64_t e) {
    std::memset(p + b, static_cast<int>(value), static_cast<size_t>(e - b));
  });
}

// A file's identity and version as the Python side records it (os.stat: st_dev, st_ino, st_size,
// st_mtime_ns; device and inode as signed 64-bit, see ops.stamp_of in Python).
static std::array<int64_t, 4> stamp_of(const struct stat& st) {
  return {static_cast<int64_t>(st.st_dev), static_cast<int64_t>(st.st_ino), static_cast<int64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + static_cast<int64_t>(st.st_mtim.tv_nsec)};
}

static std::string changed(const std::string& path, const char* when) {
  return c10::str("fsdp_fastload read_ranges: ", path, " changed ", when,
                  " (its inode, size or modification time differ): was it written to or replaced during the "
                  "load (a checkpoint saved again)? Where its tensors were located (by its header, or by the "
                  "mapping a model was loaded with), another version's bytes may be now. Load from files that "
                  "nothing writes to while materialize runs.");
}

// Returns "" or what went wrong: it never throws (see fastload.h).
std::string read_ranges(const std::string& path, at::Tensor& dst, at::IntArrayRef file_offsets,
                        at::IntArrayRef dst_offsets, at::IntArrayRef lengths, int64_t num_threads,
                        at::IntArrayRef expect, int64_t fd_in) {
  if (!(dst.is_cpu() && dst.is_contiguous()))
    return "fsdp_fastload read_ranges: destination must be a contiguous CPU tensor";
  const int64_t n = static_cast<int64_t>(lengths.size());
  if (static_cast<int64_t>(file_offsets.size()) != n || static_cast<int64_t>(dst_offsets.size()) != n)
    return "fsdp_fastload read_ranges: file_offsets, dst_offsets and lengths differ in length";
  const int64_t dst_bytes = dst.numel() * static_cast<int64_t>(dst.element_size());
  // The caller's open file (its header was read from it: a name replaced since does not matter, and
  // a file system whose inode numbers change between lookups neither), else `path` opened here.
  if (fd_in > std::numeric_limits<int>::max()) return "fsdp_fastload read_ranges: fd out of range";
  const int fd = fd_in >= 0 ? static_cast<int>(fd_in) : ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return c10::str("fsdp_fastload read_ranges: cannot open ", path, ": ", std::strerror(errno));
  struct Closer { int fd; ~Closer() { if (fd >= 0) ::close(fd); } } closer{fd_in >= 0 ? -1 : fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    return c10::str("fsdp_fastload read_ranges: cannot stat ", path, ": ", std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    return c10::str("fsdp_fastload read_ranges: ", path, " is not a regular file. Pass the path of a safetensors file.");
  if (!(expect.empty() || expect.size() == 4))
    return "fsdp_fastload read_ranges: expect must be empty or [device, inode, size, mtime_ns]";
  const auto opened = stamp_of(st);
  if (!expect.empty() && !std::equal(opened.begin(), opened.end(), expect.begin()))
    return changed(path, "since its layout was read");
  const int64_t file_size = static_cast<int64_t>(st.st_size);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t fo = file_offsets[i], d = dst_offsets[i], len = lengths[i];
    if (!(fo >= 0 && d >= 0 && len >= 0))
      return c10::str("fsdp_fastload read_ranges: range ", i, " has a negative offset or length");
    if (!(len <= dst_bytes && d <= dst_bytes - len))
      return c10::str("fsdp_fastload read_ranges: range ", i, " writes bytes [", d, ", ", uint64_t(d) + uint64_t(len),
                 ") outside the destination of ", dst_bytes, " bytes");
    if (!(len <= file_size && fo <= file_size - len))
      return c10::str("fsdp_fastload read_ranges: range ", i, " reads bytes [", fo, ", ", uint64_t(fo) + uint64_t(len),
                 ") past the end of ", path, " (", file_size, " bytes). The file is truncated or its header lies.");
  }
#ifdef POSIX_FADV_SEQUENTIAL
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
  // Split the work into chunks of at most 8 MiB so threads share large ranges evenly.
  constexpr int64_t kChunk = int64_t(8) << 20;
  std::vector<std::array<int64_t, 3>> chunks;  // file offset, dst offset, length
  for (int64_t i = 0; i < n; ++i)
    for (int64_t o = 0; o < lengths[i]; o += kChunk)
      chunks.push_back({file_offsets[i] + o, dst_offsets[i] + o, std::min(kChunk, lengths[i] - o)});
  auto* base = static_cast<char*>(dst.data_ptr());
  std::atomic<size_t> next{0};
  std::atomic<int> err{0};
  std::atomic<bool> short_read{false};
  auto work = [&]() {
    for (size_t c = next++; c < chunks.size() && err == 0 && !short_read; c = next++) {
      int64_t fo = chunks[c][0], d = chunks[c][1], left = chunks[c][2];
      while (left > 0) {
        ssize_t r = ::pread(fd, base + d, static_cast<size_t>(left), static_cast<off_t>(fo));
        if (r < 0) {
          if (errno == EINTR) continue;
          err = errno;
          return;
        }
        if (r == 0) {
          short_read = true;
          return;
        }
        fo += r; d += r; left -= r;
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, chunks.size()));
  {
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < threads; ++t) {
      try {
        pool.emplace_back(work);
      } catch (const std::system_error&) {  // no thread to be had: the ones started (and this one) do it
        break;
      }
    }
    work();
    for (auto& th : pool) th.join();
  }
  if (err != 0) return c10::str("fsdp_fastload read_ranges: reading ", path, " failed: ", std::strerror(err.load()));
  if (short_read) return c10::str("fsdp_fastload read_ranges: ", path, " ended early (was it truncated while reading?)");
  // Written while being read (saved again in place: same inode, new bytes): what was read may mix
  // two versions. Its modification time (or size) moved since the open.
  struct stat after {};
  if (::fstat(fd, &after) != 0 || stamp_of(after) != opened) return changed(path, "while it was read");
  return "";
}

bool prefault(const at::Tensor& flat) {
  check_flat(flat, "fsdp_fastload prefault");
  if (!flat.is_cpu() || flat.numel() == 0) return false;
  // MADV_POPULATE_WRITE (Linux >= 5.14): fault the pages in writable, as a write would, but
  // without writing: bytes already stored (by a concurrent receive) are untouched, so this can
  // run on another thread ahead of the data. Older kernels refuse it: then it is a no-op.
  constexpr int kPopulateWrite = 23;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  uintptr_t a = reinterpret_cast<uintptr_t>(flat.const_data_ptr());
  uintptr_t b = a + static_cast<uintptr_t>(flat.numel());
  a = (a + page - 1) & ~(page - 1);
  b &= ~(page - 1);
  constexpr uintptr_t kChunk = uintptr_t(1) << 20;  // short holds of the mmap lock: allocations go on
  for (uintptr_t p = a; p < b; p += kChunk) {
    if (::madvise(reinterpret_cast<void*>(p), std::min(kChunk, b - p), kPopulateWrite) != 0) return false;
  }
  return true;
}

constexpr int64_t kParallelCopyMin = int64_t(4) << 20;  // bytes: smaller packs stay on one thread
constexpr int64_t kCopyChunk = int64_t(1) << 20;

void copy_ranges(at::Tensor& dst, at::TensorList srcs, at::IntArrayRef src_offsets,
                 at::IntArrayRef dst_offsets, at::IntArrayRef lengths) {
  check_flat(dst, "fsdp_fastload copy_ranges");
  const int64_t n = static_cast<int64_t>(srcs.size());
  TORCH_CHECK(static_cast<int64_t>(src_offsets.size()) == n &&
                  static_cast<int64_t>(dst_offsets.size()) == n &&
                  static_cast<int64_t>(lengths.size()) == n,
              "fsdp_fastload copy_ranges: srcs, src_offsets, dst_offsets and lengths differ in length");
  const int64_t dst_bytes = dst.numel();
  bool all_cpu = dst.is_cpu();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& s = srcs[i];
    const int64_t so = src_offsets[i], d = dst_offsets[i], len = lengths[i];
    TORCH_CHECK(s.is_contiguous(), "fsdp_fastload copy_ranges: source ", i, " is not contiguous");
    const int64_t s_bytes = s.numel() * static_cast<int64_t>(s.element_size());
    TORCH_CHECK(so >= 0 && d >= 0 && len >= 0, "fsdp_fastload copy_ranges: range ", i,
                " has a negative offset or length");
    TORCH_CHECK(len <= s_bytes && so <= s_bytes - len, "fsdp_fastload copy_ranges: range ", i,
                " reads bytes [", so, ", ", so + len, ") outside its source of ", s_bytes, " bytes");
    TORCH_CHECK(len <= dst_bytes && d <= dst_bytes - len, "fsdp_fastload copy_ranges: range ", i,
                " writes bytes [", d, ", ", uint64_t(d) + uint64_t(len), ") outside the destination of ",
                dst_bytes, " bytes");
    all_cpu = all_cpu && s.is_cpu();
  }
  if (all_cpu) {  // plain memcpy, no per-range dispatch
    auto* out = static_cast<char*>(dst.data_ptr());
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += lengths[i];
    // Threads only for staging (pinned) buffers: elsewhere the copy shares the cores with the
    // collective's own threads (on a 2-core VM two threads copied slower than one).
    if (total < kParallelCopyMin || at::get_num_threads() < 2 || at::in_parallel_region() ||
        !dst.is_pinned()) {
      for (int64_t i = 0; i < n; ++i) {
        if (lengths[i] == 0) continue;
        const auto* in = static_cast<const char*>(srcs[i].const_data_ptr());
        std::memcpy(out + dst_offsets[i], in + src_offsets[i], static_cast<size_t>(lengths[i]));
      }
      return;
    }
    // A large pack into a pinned staging buffer (src's host -> GPU path: one core copies ~6-10 GB/s,
    // the host->device link takes ~50) on torch's intra-op threads, in pieces of at most kCopyChunk.
    struct Piece {
      char* d;
      const char* s;
      size_t n;
    };
    std::vector<Piece> pieces;
    pieces.reserve(static_cast<size_t>(n + total / kCopyChunk + 1));
    for (int64_t i = 0; i < n; ++i) {
      const auto* in = static_cast<const char*>(srcs[i].const_data_ptr()) + src_offsets[i];
      for (int64_t o = 0; o < lengths[i]; o += kCopyChunk) {
        pieces.push_back({out + dst_offsets[i] + o, in + o,
                          static_cast<size_t>(std::min(kCopyChunk, lengths[i] - o))});
      }
    }
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) std::memcpy(pieces[k].d, pieces[k].s, pieces[k].n);
    });
    return;
  }
  // Some tensor lives on a device: byte views and ATen copies (stream-ordered on CUDA).
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] == 0) continue;
    at::Tensor s = srcs[i].reshape({-1}).view(at::kByte);
    dst.narrow(0, dst_offsets[i], lengths[i]).copy_(s.narrow(0, src_offsets[i], lengths[i]), true);
  }
}

TORCH_LIBRARY(fsdp_fastload, m) {
  m.def("alloc(int nbytes, Device device, bool pin_memory=False) -> Tensor");
  m.def("carve(Tensor(a -> *) flat, int[] spec) -> Tensor(a)[]");
  // The same pieces, each with a storage of its own over the buffer's memory (no storage aliasing).
  m.def("carve_owned(Tensor flat, int[] spec) -> Tensor[]");
  m.def("poison_(Tensor(a!) flat, int value=255) -> ()");
  m.def("prefault(Tensor flat) -> bool");
  m.def("copy_ranges(Tensor(a!) dst, Tensor[] srcs, int[] src_offsets, int[] dst_offsets, int[] lengths) -> ()");
  // Returns "" or the error: a failure at run time (a file truncated or changed after its header was
  // read, an I/O error) comes back as text, raised in Python, never thrown through the dispatcher.
  m.def("read_ranges(str path, Tensor(a!) dst, int[] file_offsets, int[] dst_offsets, int[] lengths, int num_threads=4, int[] expect=[], int fd=-1) -> str");
}

TORCH_LIBRARY_IMPL(fsdp_fastload, CompositeExplicitAutograd, m) {
  m.impl("alloc", &alloc);
}

TORCH_LIBRARY_IMPL(fsdp_fastload, CPU, m) {
  m.impl("carve", &carve);
  m.impl("carve_owned", &carve_owned);
  m.impl("poison_", &poison_);
  m.impl("read_ranges", &read_ranges);
  m.impl("copy_ranges", &copy_ranges);
  m.impl("prefault", &prefault);
}

// Carving, poisoning and copying need no device code: the same C++ kernels serve CUDA tensors
// (poison_ dispatches to ATen's fill on non-CPU devices).
TORCH_LIBRARY_IMPL(fsdp_fastload, CUDA, m) {
  m.impl("carve", &carve);
  m.impl("carve_owned", &carve_owned);
  m.impl("copy_ranges", &copy_ranges);
  m.impl("poison_", &poison_);
}

}  // namespace fsdp_fastload
