// fsdp_fastload C++ ops: one uninitialized allocation, all views carved in one call,
// a debugging poison fill, and a GIL-free multi-threaded file range reader.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace fsdp_fastload {

// Codes used on the wire between Python and C++ for view dtypes (see fsdp_fastload/ops.py _DTYPES).
c10::ScalarType dtype_from_code(int64_t code);
int64_t num_dtype_codes();

// One uninitialized byte buffer of `nbytes` on `device`, through PyTorch's allocators (CUDA: the
// caching allocator; pin_memory: the pinned host allocator). No fill kernel, no page touched.
at::Tensor alloc(int64_t nbytes, at::Device device, bool pin_memory);

// All views described by `spec` over the 1-D uint8 tensor `flat`, in one call.
// spec is a flat int list: per view [dtype_code, byte_offset, ndim, sizes..., strides...].
std::vector<at::Tensor> carve(const at::Tensor& flat, at::IntArrayRef spec);

// The same pieces, each a tensor with a storage of its own (storage offset 0, exactly its bytes,
// resizable through the device's allocator) over the memory of `flat`, which stays allocated while
// any piece lives; on CPU a dead piece's whole pages are returned to the kernel at once. What a
// loaded model's tensors are: torch.save, pickle, deepcopy and resize_ see one tensor's bytes, as
// after one allocation per tensor. On meta: views.
std::vector<at::Tensor> carve_owned(const at::Tensor& flat, at::IntArrayRef spec);

// Fill every byte of the 1-D contiguous uint8 tensor `flat` with `value` (0..255).
// 0xFF reads as NaN in every IEEE float dtype (fp64/32/16, bf16, fp8) and -1 in signed ints.
void poison_(at::Tensor& flat, int64_t value);

// Read byte ranges of the file at `path` into the contiguous CPU tensor `dst` (its bytes),
// range i: file_offsets[i] .. +lengths[i] -> dst bytes dst_offsets[i] .. +lengths[i].
// Uses `num_threads` threads with pread (no GIL held); validates every range first. Never throws:
// returns "" on success, else what went wrong (bad arguments, a file that cannot be opened, is
// shorter than a range, or fails to read), which the Python wrapper raises. A read error is the
// one failure of these ops that happens at run time whatever the caller checked (a checkpoint
// truncated after its header was read), so it is kept off C++ exceptions (on one GPU image every
// error the extension raised crashed the process: a static libstdc++ of its own; setup.py now links
// torch's shared one, README, Limitations).
// `expect`: empty, or the file's [st_dev, st_ino, st_size, st_mtime_ns] when its layout was read (its
// header parsed, its mapping checked); a file that is not that one any more (replaced, saved again in
// place) returns an error instead of bytes that belong to another version. A file whose modification
// time or size moves while it is read returns an error too. `fd` >= 0: read the caller's open file
// (not closed here; `path` then only names it in errors), else open `path`.
std::string read_ranges(const std::string& path, at::Tensor& dst, at::IntArrayRef file_offsets,
                 at::IntArrayRef dst_offsets, at::IntArrayRef lengths, int64_t num_threads,
                 at::IntArrayRef expect, int64_t fd);

// Fault the pages of the CPU buffer `flat` in (writable) without writing them, so a receive into
// it runs at the speed of already-touched memory. Safe while another thread writes into it. False
// where the kernel lacks MADV_POPULATE_WRITE (then nothing happened) or for non-CPU tensors.
bool prefault(const at::Tensor& flat);

// Copy byte ranges of several contiguous tensors into the flat uint8 `dst`: range i copies
// lengths[i] bytes starting at byte src_offsets[i] of srcs[i] to dst bytes dst_offsets[i]...
// One call per bucket replaces a Python loop of per-tensor copies (memcpy on CPU; ATen copies
// when a tensor lives on a device). Every range is validated first.
void copy_ranges(at::Tensor& dst, at::TensorList srcs, at::IntArrayRef src_offsets,
                 at::IntArrayRef dst_offsets, at::IntArrayRef lengths);

}  // namespace fsdp_fastload
