"""The C++ ops against their pure-PyTorch fallbacks (the spec): same views, same bytes, same errors."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from fsdp_fastload import ops

needs_ext = pytest.mark.skipif(not ops.extension_available(), reason="fsdp_fastload._C not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def test_extension_required_in_ci():
    # CI proves the compiled path, not only the fallback.
    if os.environ.get("FSDP_FASTLOAD_REQUIRE_EXTENSION") == "1":
        assert ops.extension_available(), ops._state["reason"]


def _spec():
    """Views of every dtype, contiguous and strided, 0-dim and empty, at aligned offsets."""
    dtypes, offsets, shapes, strides = [], [], [], []
    off = 0
    for i, dt in enumerate(ops._DTYPES):
        for shape, stride in [((3, 5), None), ((), None), ((0, 4), None), ((4, 3), (1, 4))]:
            dtypes.append(dt)
            offsets.append(off)
            shapes.append(shape)
            strides.append(stride if stride is not None else ops.contiguous_strides(shape))
            off += 128
    return ops.encode_spec(dtypes, offsets, shapes, strides), off


def _describe(views):
    return [(v.dtype, tuple(v.shape), v.stride(), v.storage_offset()) for v in views]


def _fill_through(views):
    # Write a distinct byte pattern through each view (as raw bytes of its dtype).
    for i, v in enumerate(views):
        if v.numel():
            raw = torch.arange(v.numel() * v.element_size(), dtype=torch.int64, device=v.device)
            raw = ((raw * 7 + i) % 251).to(torch.uint8).view(v.dtype).view(v.shape if v.dim() else ())
            v.copy_(raw) if v.is_contiguous() else v.t().copy_(raw.reshape(v.t().shape))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_carve_matches_fallback(device):
    spec, nbytes = _spec()
    flat_c, flat_r = ops.alloc(nbytes, device), ops._alloc_ref(nbytes, torch.device(device))
    ops.poison_(flat_c, 0x5A)
    ops._poison_ref(flat_r, 0x5A)
    vc, vr = ops.carve(flat_c, spec), ops._carve_ref(flat_r, spec)
    assert _describe(vc) == _describe(vr)
    assert [v.dtype for v in vc[::4]] == list(ops._DTYPES)  # codes agree between C++ and Python
    for v in vc:
        assert v.untyped_storage().data_ptr() == flat_c.untyped_storage().data_ptr()
    _fill_through(vc)
    _fill_through(vr)
    assert torch.equal(flat_c, flat_r)  # the writes landed at the same bytes
    assert (flat_c != 0x5A).any()


@needs_ext
def test_carve_respects_flat_storage_offset():
    flat = ops.alloc(4096, "cpu")
    ops.poison_(flat, 0)
    sub = flat[64:]
    spec = ops.encode_spec([torch.float32], [8], [(4,)])
    (vc,), (vr,) = ops.carve(sub, spec), ops._carve_ref(sub, spec)
    assert _describe([vc]) == _describe([vr]) and vc.storage_offset() == 18
    vc.fill_(1.0)
    assert torch.equal(flat[72:88].view(torch.float32), torch.ones(4))
    with pytest.raises(RuntimeError, match="not aligned"):
        ops.carve(flat[1:], spec)


BAD_SPECS = [
    ([6, 2, 1, 4, 1], "not aligned"),            # float32 at byte 2
    ([6, 4000, 1, 100, 1], "outside the buffer"),  # past the end
    ([99, 0, 0], "unknown dtype code"),
    ([6, 0, 2, 1], "truncated|bad ndim"),
    ([6, 0, 1, -1, 1], "negative"),
]


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
@pytest.mark.parametrize("spec,msg", BAD_SPECS)
def test_carve_rejects_bad_specs(impl, spec, msg):
    if impl == "compiled" and not ops.extension_available():
        pytest.skip("fsdp_fastload._C not built")
    fn = ops.carve if impl == "compiled" else ops._carve_ref
    flat = ops.alloc(4096, "cpu")
    with pytest.raises(RuntimeError, match=msg):
        fn(flat, spec)
    with pytest.raises(RuntimeError, match="1-D contiguous uint8"):
        fn(torch.zeros(16, dtype=torch.float32), [6, 0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_poison_matches_fallback(device):
    a = ops.alloc(3 << 20, device)
    b = ops._alloc_ref(3 << 20, torch.device(device))
    ops.poison_(a)
    ops._poison_ref(b)
    assert torch.equal(a, b) and bool((a == 255).all())
    f32, bf16, i64 = ops.carve(a, ops.encode_spec([torch.float32, torch.bfloat16, torch.int64], [0, 64, 128], [(4,), (4,), (2,)]))
    assert f32.isnan().all() and bf16.isnan().all() and (i64 == -1).all()
    with pytest.raises(RuntimeError, match="must be a byte"):
        ops.poison_(a, 300)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
def test_alloc_touches_no_memory(impl):
    if impl == "compiled" and not ops.extension_available():
        pytest.skip("fsdp_fastload._C not built")
    fn = ops.alloc if impl == "compiled" else (lambda n, d: ops._alloc_ref(n, torch.device(d)))
    before = _rss()
    buf = fn(4 << 30, "cpu")
    grown = _rss() - before
    assert buf.numel() == 4 << 30
    assert grown < 64 << 20, f"alloc of 4 GiB grew RSS by {grown >> 20} MiB"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        other = fn(4 << 30, "cpu")
    names = {e.name for e in prof.events()}
    assert any("alloc" in n or "empty" in n for n in names), names  # the profiler saw the call
    assert not any(n in names for n in ("aten::fill_", "aten::zero_", "aten::zeros", "aten::copy_")), names
    del other
    buf[: 1 << 20].fill_(1)  # the memory is real and writable
    assert int(buf[: 1 << 20].sum()) == 1 << 20
    del buf


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_alloc_shape_and_device(device):
    for n in (0, 1, 12345, 5 << 20):
        t = ops.alloc(n, device)
        assert t.shape == (n,) and t.dtype == torch.uint8 and t.device.type == device
    with pytest.raises(RuntimeError, match=">= 0"):
        ops.alloc(-1, device)


@needs_cuda
@needs_ext
def test_alloc_pinned():
    t = ops.alloc(1 << 20, "cpu", pin_memory=True)
    assert t.is_pinned()


def test_carve_100k_views_vs_python(capsys):
    n = 100_000
    shapes = [(4, 2)] * n
    spec = ops.encode_spec([torch.float32] * n, [i * 64 for i in range(n)], shapes)
    flat = ops.alloc(n * 64, "cpu")
    t0 = time.perf_counter()
    views = ops.carve(flat, spec)
    t_ext = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ops._carve_ref(flat, spec)
    t_py = time.perf_counter() - t0
    assert len(views) == len(ref) == n
    assert _describe(views[-3:]) == _describe(ref[-3:])
    with capsys.disabled():
        print(f"\ncarve of {n} views: compiled {t_ext * 1e3:.1f} ms, Python {t_py * 1e3:.1f} ms, "
              f"ratio {t_py / max(t_ext, 1e-9):.1f}x (extension={ops.extension_available()})")


def _file(tmp_path, n=3 << 20):
    data = (torch.arange(n, dtype=torch.int64) * 31 % 251).to(torch.uint8)
    p = tmp_path / "data.bin"
    p.write_bytes(data.numpy().tobytes())
    return str(p), data


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
def test_read_ranges(impl, tmp_path):
    if impl == "compiled" and not ops.extension_available():
        pytest.skip("fsdp_fastload._C not built")
    fn = ops.read_ranges if impl == "compiled" else (lambda *a, num_threads=4: ops._read_ranges_ref(*a, num_threads))
    path, data = _file(tmp_path)
    dst = torch.zeros(2 << 20, dtype=torch.uint8)
    fo, do, ln = [10, 1 << 20, 0], [0, 100, (1 << 20) + 200], [50, 1 << 20, 0]
    fn(path, dst, fo, do, ln, num_threads=3)
    expect = torch.zeros_like(dst)
    for f, d, n in zip(fo, do, ln):
        expect[d:d + n] = data[f:f + n]
    assert torch.equal(dst, expect)
    fdst = torch.zeros(8, dtype=torch.float32)  # any dtype: bytes are bytes
    fn(path, fdst, [0], [4], [16], num_threads=1)
    assert torch.equal(fdst.view(torch.uint8)[4:20], data[:16])
    for args, msg in [(([3 << 20], [0], [1]), "past the end"), (([0], [2 << 20], [1]), "outside the destination"),
                      (([-1], [0], [1]), "negative"), (([0, 1], [0], [1]), "differ in length")]:
        with pytest.raises(RuntimeError, match=msg):
            fn(path, dst, *args, num_threads=2)
    with pytest.raises((RuntimeError, OSError)):
        fn(str(tmp_path / "missing.bin"), dst, [0], [0], [1], num_threads=1)


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
def test_read_ranges_checks_the_file_is_the_one_expected(impl, tmp_path, monkeypatch):
    """`expect` (the file's stamp when its layout was read): the same file reads; another inode, size
    or modification time is an error naming the file, with nothing written; so is a file replaced
    under the same name, and (fallback, where the read can be paused) one written while it is read."""
    if impl == "compiled" and not ops.extension_available():
        pytest.skip("fsdp_fastload._C not built")
    fn = ops.read_ranges if impl == "compiled" else (
        lambda *a, num_threads=4, expect=None, fd=-1: ops._read_ranges_ref(*a, num_threads, list(expect or ()), fd))
    path, data = _file(tmp_path)
    stamp = ops.stamp_of(os.stat(path))
    held = os.open(path, os.O_RDONLY)  # read through this descriptor below, whatever the name holds by then
    dst = torch.full((16,), 7, dtype=torch.uint8)
    fn(path, dst, [3], [0], [16], expect=stamp)
    assert torch.equal(dst, data[3:19])
    changed = rf"^fsdp_fastload read_ranges: {re.escape(path)} changed since its layout was read \("
    for k in range(4):
        other = list(stamp)
        other[k] += 1
        dst.fill_(7)
        with pytest.raises(RuntimeError, match=changed) as e:
            fn(path, dst, [3], [0], [16], expect=other)
        assert str(e.value) == ops._changed(path, "since its layout was read")  # the same words either way
        assert (dst == 7).all()
    with pytest.raises(RuntimeError, match="expect must be empty or"):
        fn(path, dst, [3], [0], [16], expect=stamp[:3])
    (tmp_path / "new.bin").write_bytes(bytes(reversed(data.numpy().tobytes())))
    os.replace(tmp_path / "new.bin", path)  # same name, same size, a new inode
    with pytest.raises(RuntimeError, match=changed):
        fn(path, dst, [3], [0], [16], expect=stamp)
    assert (dst == 7).all()
    # `fd`: the file opened before reads the bytes it held (the name's new file is not looked at)
    fn("/nonexistent/name", dst, [3], [0], [16], expect=stamp, fd=held)
    assert torch.equal(dst, data[3:19])
    os.fstat(held)  # left open
    with pytest.raises(RuntimeError, match=r"past the end of shown\.bin"):
        fn("shown.bin", dst, [data.numel()], [0], [1], fd=held)
    os.close(held)
    if impl == "fallback":
        real = ops._read_into

        def written_meanwhile(f, *args):
            real(f, *args)
            os.utime(path, ns=(0, 10**9))
        monkeypatch.setattr(ops, "_read_into", written_meanwhile)
        with pytest.raises(RuntimeError, match=rf"^fsdp_fastload read_ranges: {re.escape(path)} changed while "
                           "it was read"):
            fn(path, dst, [3], [0], [16], expect=ops.stamp_of(os.stat(path)))


@needs_ext
def test_opcheck():
    flat = ops.alloc(4096, "cpu")
    ops.poison_(flat, 0)
    spec = ops.encode_spec([torch.float32, torch.bfloat16, torch.int64], [0, 64, 128], [(2, 3), (4,), ()])
    no_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    lib = torch.ops.fsdp_fastload
    # alloc returns uninitialized memory: the full suite (which compares outputs) runs on 0 bytes.
    torch.library.opcheck(lib.alloc.default, (0, torch.device("cpu"), False))
    torch.library.opcheck(lib.alloc.default, (1 << 22, torch.device("cpu"), False), test_utils=no_aot)
    # carve returns views of its input; functionalization (AOT dispatch) rejects aliasing custom ops.
    torch.library.opcheck(lib.carve.default, (flat, spec), test_utils=no_aot)
    torch.library.opcheck(lib.poison_.default, (flat, 7))


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=needs_ext), "fallback"])
@pytest.mark.parametrize("device", DEVICES)
def test_carve_owned_pieces_have_storages_of_their_own(impl, device):
    """carve_owned: carve's views (same dtypes, shapes, strides, bytes in the buffer), each with a
    storage of its own (offset 0, exactly its bytes, disjoint): torch.save of several dtypes, pickle
    and resize_ see one tensor, as after one allocation per tensor."""
    import io
    import pickle

    fn = ops.carve_owned if impl == "compiled" else ops._carve_owned_ref
    if impl == "fallback" and device != "cpu":
        pytest.skip("the fallback makes views off CPU")
    spec, nbytes = _spec()
    flat = ops.alloc(nbytes, device)
    ops.poison_(flat, 0x5A)
    views, owned = ops._carve_ref(flat, spec), fn(flat, spec)
    assert [(v.dtype, tuple(v.shape), v.stride()) for v in owned] == [(v.dtype, tuple(v.shape), v.stride()) for v in views]
    for v, o in zip(views, owned):
        extent = v.numel() and (sum((n - 1) * s for n, s in zip(v.shape, v.stride())) + 1) * v.element_size()
        assert o.storage_offset() == 0 and o.untyped_storage().nbytes() == extent
        assert o.data_ptr() == (v.data_ptr() if extent else 0)  # over the buffer; empty: no memory
    _fill_through(owned)
    assert torch.equal(flat.cpu(), _filled(nbytes, spec, device).cpu())  # every byte went into the buffer
    saved = {str(i): o for i, o in enumerate(owned) if o.dtype not in (torch.uint16, torch.uint32, torch.uint64)}
    buf = io.BytesIO()
    torch.save(saved, buf)
    assert buf.tell() < nbytes + 64 * len(saved) + 8192  # each tensor's bytes once, not the buffer per dtype
    buf.seek(0)
    back = torch.load(buf)
    raw = lambda t: t.contiguous().reshape(-1).view(torch.uint8).cpu()  # noqa: E731  (NaN != NaN)
    assert all(torch.equal(raw(back[k]), raw(v)) and back[k].stride() == v.stride() for k, v in saved.items())
    assert len(pickle.dumps(owned[0].cpu())) < 1024
    if impl == "compiled":  # resizable, as torch.empty's: growing moves it, its neighbour stays
        before = owned[1].clone()
        owned[0].resize_(1000).fill_(0)
        assert torch.equal(owned[1], before) and owned[0].data_ptr() != views[0].data_ptr()


def _filled(nbytes, spec, device):
    flat = ops.alloc(nbytes, device)
    ops.poison_(flat, 0x5A)
    _fill_through(ops._carve_ref(flat, spec))
    return flat


@needs_ext
def test_carve_owned_returns_a_dead_pieces_pages():
    """On CPU a piece that dies while others keep the buffer gives its whole pages back (they read as
    zeros); the last piece to die frees the buffer whole."""
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    flat = ops.alloc(8 * page, "cpu")
    ops.poison_(flat, 0x11)
    a, b, c = ops.carve_owned(flat, ops.encode_spec([torch.uint8] * 3, [0, page, 5 * page], [(page,), (3 * page,), (page,)]))
    start = b.data_ptr()
    first, last = -(-start // page) * page, (start + 3 * page) // page * page
    del flat, b
    assert last - first >= 2 * page and not any(ctypes.string_at(first, last - first))
    assert bool((a == 0x11).all()) and bool((c == 0x11).all())


@needs_ext
def test_carve_owned_opcheck():
    flat = ops.alloc(4096, "cpu")
    spec = ops.encode_spec([torch.float32, torch.bfloat16, torch.int64], [0, 64, 128], [(2, 3), (4,), ()])
    torch.library.opcheck(torch.ops.fsdp_fastload.carve_owned.default, (flat, spec),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_lean_import():
    code = (
        "import torch, fsdp_fastload, sys\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(fsdp_fastload.extension_available())\n"
        "assert not torch.cuda.is_initialized()\n"
        "from fsdp_fastload import ops\n"
        "t = ops.alloc(256, 'cpu'); ops.poison_(t)\n"
        "v, = ops.carve(t, ops.encode_spec([torch.float32], [64], [(4,)]))\n"
        "assert v.isnan().all()\n"
    )
    env = dict(os.environ, FSDP_FASTLOAD_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    env.pop("FSDP_FASTLOAD_DISABLE_EXTENSION")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ops.extension_available())


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
@pytest.mark.parametrize("device", DEVICES)
def test_copy_ranges(impl, device):
    if impl == "compiled" and not ops.extension_available():
        pytest.skip("fsdp_fastload._C not built")
    fn = ops.copy_ranges if impl == "compiled" else ops._copy_ranges_ref
    srcs = [torch.arange(100, dtype=torch.float32, device=device),
            torch.nn.Parameter(torch.arange(12, dtype=torch.bfloat16, device=device).view(3, 4)),
            torch.arange(7, dtype=torch.int64)[2:],  # a view with a storage offset
            torch.empty(0, device=device)]
    dst = torch.zeros(1024, dtype=torch.uint8, device=device)
    so, do, ln = [8, 2, 8, 0], [0, 500, 1000, 3], [392, 20, 16, 0]
    fn(dst, srcs, so, do, ln)
    expect = torch.zeros(1024, dtype=torch.uint8)
    for s, a, d, n in zip(srcs, so, do, ln):
        expect[d:d + n] = s.detach().cpu().reshape(-1).view(torch.uint8)[a:a + n]
    assert torch.equal(dst.cpu(), expect)
    for args, msg in [(([srcs[0]], [0], [1020], [8]), "outside the destination"),
                      (([srcs[0]], [396], [0], [8]), "outside its source"),
                      (([srcs[0]], [-1], [0], [1]), "negative"),
                      (([srcs[0]], [0, 1], [0], [1]), "differ in length"),
                      (([srcs[1].detach().t()], [0], [0], [2]), "not contiguous")]:
        with pytest.raises(RuntimeError, match=msg):
            fn(dst, *args)


@needs_ext
@pytest.mark.parametrize("pinned", [False, pytest.param(True, marks=needs_cuda)])
def test_copy_ranges_large_pack(pinned):
    """A pack over 4 MiB into a pinned staging buffer runs on torch's intra-op threads in 1 MiB
    pieces: every byte lands where one memcpy per range puts it (ranges long and short, unaligned,
    a range split across pieces)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 256, (9 << 20,), dtype=torch.uint8, generator=g)
    small = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (1, 333, 4096, 70_001)]
    srcs = [big, *small, big]
    so = [3, 0, 5, 100, 1, (1 << 20) + 7]
    ln = [(5 << 20) + 11, 1, 300, 3000, 70_000, (3 << 20) + 5]
    do, off = [], 17
    for n in ln:
        do.append(off)
        off += n + 13
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        dst = ops.alloc(off, "cpu", pin_memory=pinned)
        ops.poison_(dst, 0xA5)
        ops.copy_ranges(dst, srcs, so, do, ln)
    finally:
        torch.set_num_threads(threads)
    expect = torch.full((off,), 0xA5, dtype=torch.uint8)
    for s, a, d, n in zip(srcs, so, do, ln):
        expect[d:d + n] = s[a:a + n]
    assert torch.equal(dst, expect)


@needs_ext
def test_copy_ranges_opcheck():
    dst = ops.alloc(256, "cpu")
    ops.poison_(dst, 0)
    srcs = [torch.arange(10, dtype=torch.float32), torch.ones(3, dtype=torch.bfloat16)]
    torch.library.opcheck(torch.ops.fsdp_fastload.copy_ranges.default, (dst, srcs, [4, 0], [0, 64], [36, 6]))


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
def test_prefault_keeps_bytes_written_concurrently(impl):
    # prefault runs on another thread while data lands in the buffer: it must never change a byte.
    if impl == "compiled" and not ops.extension_available():
        pytest.skip("fsdp_fastload._C not built")
    import threading

    fn = ops.prefault if impl == "compiled" else ops._prefault_ref
    flat = ops.alloc(96 << 20, "cpu")
    pattern = (torch.arange(1 << 20, dtype=torch.int64) * 2654435761 % 251).to(torch.uint8)
    flat[:1 << 20].copy_(pattern)  # written before
    result = []
    t = threading.Thread(target=lambda: result.append(fn(flat)))
    t.start()
    for k in range(1, 96):  # written during
        flat[k << 20:(k + 1) << 20].copy_(pattern)
    t.join()
    assert result and isinstance(result[0], bool)
    assert torch.equal(flat.view(96, 1 << 20), pattern.expand(96, -1))
    assert fn(flat[:0]) is False and fn(flat[1:1000]) in (True, False)  # empty / sub-page ranges


@needs_ext
def test_carve_contiguous_spec_matches_explicit_strides():
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.uint8]
    shapes = [(3, 5), (7,), (), (0, 4), (2, 3, 4)]
    offsets = [0, 64, 128, 192, 256]
    short = ops.encode_spec(dtypes, offsets, shapes)
    full = ops.encode_spec(dtypes, offsets, shapes, [ops.contiguous_strides(s) for s in shapes])
    assert len(short) < len(full)
    flat = ops.alloc(512, "cpu")
    for impl in (ops.carve, ops._carve_ref):
        assert _describe(impl(flat, short)) == _describe(ops._carve_ref(flat, full))
    with pytest.raises(RuntimeError, match="bad ndim"):
        ops.carve(flat, [6, 0, -70, 1])


@needs_ext
def test_error_messages_are_whole(tmp_path):
    """The extension's messages come out whole, numbers and all. A second C++ runtime in the process
    (an extension linked with its own static libstdc++) cut each one at its first number, or crashed."""
    flat = ops.alloc(4096, "cpu")
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 10)
    cases = [(lambda: ops.alloc(-1, "cpu"), "fsdp_fastload alloc: nbytes must be >= 0 (got -1)"),
             (lambda: ops.carve(flat, [99, 0, 0]), f"fsdp_fastload: unknown dtype code 99 (expected 0..{len(ops._DTYPES) - 1})"),
             (lambda: ops.poison_(flat, 300), "fsdp_fastload poison_: value must be a byte (got 300)"),
             (lambda: ops.read_ranges(path, flat, [4], [0], [8]),
              f"fsdp_fastload read_ranges: range 0 reads bytes [4, 12) past the end of {path} (10 bytes). "
              "The file is truncated or its header lies.")]
    for call, whole in cases:
        with pytest.raises(RuntimeError) as info:
            call()
        assert str(info.value).splitlines()[0] == whole
