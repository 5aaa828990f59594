"""Layout and packing on src (single process): runs of tensors back to back in CPU memory.

A model mmap-ed from safetensors (what `from_pretrained` gives) has one storage per tensor, the
tensors back to back in the file's mapping. Such a stretch is one run of the layout and goes out as
one piece straight from src's memory; wider gaps split it. Every case is checked byte for byte
against the tensors' own bytes.
"""
import pytest
import torch
from torch import nn

from fsdp_fastload.fill import Packer
from fsdp_fastload.layout import CROSS_GAP, CUDA_ALIGN, _align, plan
from fsdp_fastload.manifest import build_manifest


def _module_over(buf: bytearray, pieces: list[tuple[int, torch.dtype, tuple[int, ...]]]) -> nn.Module:
    """Parameters whose storages are separate but sit at the given byte offsets of `buf`."""
    m = nn.Module()
    for k, (off, dt, shape) in enumerate(pieces):
        n = 1
        for d in shape:
            n *= d
        t = torch.frombuffer(buf, dtype=dt, count=n, offset=off).view(shape)
        m.register_parameter(f"p{k}", nn.Parameter(t, requires_grad=False))
    return m


def _wire_bytes(entries, layout, packer) -> dict[int, bytes]:
    """What src sends for each bucket, via direct_view when one piece, else packed."""
    out = {}
    for a, b in layout.buckets:
        v = packer.direct_view(a, b)
        if v is None:
            v = torch.empty(b - a, dtype=torch.uint8)
            packer.pack(a, b, v)
        out[a] = bytes(v.numpy())
    return out


def _check_sent(entries, layout, sent: dict[int, bytes]) -> None:
    wire = bytearray(layout.wire_total)
    for a, data in sent.items():
        wire[a:a + len(data)] = data
    for i, e in enumerate(entries):
        w = layout.wire[i]
        got = bytes(wire[w:w + e.nbytes])
        assert got == bytes(e.tensor.detach().reshape(-1).view(torch.uint8).numpy()), e.names


def _plan(entries, bucket=1 << 12):
    return plan(entries, bucket_size=bucket, direct_min=bucket // 2, wire=[e.dtype for e in entries],
                sources=[e.tensor for e in entries])


def test_back_to_back_storages_are_one_run_sent_in_place():
    buf = bytearray(torch.randint(0, 256, (1 << 14,), dtype=torch.uint8).numpy().tobytes())
    # back to back, mixed dtypes, in an order unlike registration order
    pieces = [(1024, torch.float32, (4, 8)), (0, torch.bfloat16, (512,)), (1152, torch.int64, (3,)),
              (1176, torch.float16, (7,)), (1190, torch.uint8, (5,))]
    m = _module_over(buf, pieces)
    entries = build_manifest(m)
    assert len({e.tensor.untyped_storage().data_ptr() for e in entries}) == len(entries)
    layout = _plan(entries)
    # one run: wire offsets keep the source's relative addresses
    base = entries[1].tensor.data_ptr() - layout.wire[1]
    assert all(e.tensor.data_ptr() - layout.wire[i] == base for i, e in enumerate(entries))
    packer = Packer([e.tensor for e in entries], layout)
    assert len(layout.buckets) == 1
    a, b = layout.buckets[0]
    view = packer.direct_view(a, b)
    assert view is not None and view.data_ptr() == entries[1].tensor.data_ptr() + a - layout.wire[1]
    _check_sent(entries, layout, _wire_bytes(entries, layout, packer))


def test_wide_gaps_split_runs_and_pack_the_same_bytes():
    buf = bytearray(torch.randint(0, 256, (1 << 15,), dtype=torch.uint8).numpy().tobytes())
    gap = CROSS_GAP + 64
    pieces = [(0, torch.float32, (16,)), (64, torch.float32, (16,)),  # a run of two
              (128 + gap, torch.float32, (16,)), (192 + gap, torch.float32, (16,)),  # another run
              (4096 + 256 + gap, torch.bfloat16, (8,))]  # alone
    m = _module_over(buf, pieces)
    entries = build_manifest(m)
    layout = _plan(entries)
    d = [e.tensor.data_ptr() - layout.wire[i] for i, e in enumerate(entries)]
    assert d[0] == d[1] and d[2] == d[3] and layout.wire[2] - layout.wire[1] < gap  # no gap carried
    packer = Packer([e.tensor for e in entries], layout)
    _check_sent(entries, layout, _wire_bytes(entries, layout, packer))
    # a bucket that straddles two runs is never sent as one raw piece
    wide = (layout.wire[0], layout.wire[3] + entries[3].nbytes)
    assert packer.direct_view(*wide) is None


@pytest.mark.parametrize("bucket", [64, 256, 1 << 12])
def test_long_run_in_buckets(bucket):
    buf = bytearray(torch.randint(0, 256, (1 << 15,), dtype=torch.uint8).numpy().tobytes())
    pieces = [(k * 100, torch.float16, (50,)) for k in range(100)]
    m = _module_over(buf, pieces)
    entries = build_manifest(m)
    layout = _plan(entries, bucket)
    packer = Packer([e.tensor for e in entries], layout)
    assert all(packer.direct_view(a, b) is not None for a, b in layout.buckets)
    _check_sent(entries, layout, _wire_bytes(entries, layout, packer))


@pytest.mark.parametrize("sources", [True, False])
def test_cuda_alignment_puts_every_tensor_where_the_allocator_would(sources):
    """On CUDA kernels choose by their operands' alignment (cuBLASLt up to 256 bytes): every tensor,
    converted and recomputed ones too, starts at a multiple of CUDA_ALIGN, like a tensor the
    caching allocator gives; runs of src's memory keep src's placement only where that holds."""
    buf = bytearray(torch.randint(0, 256, (1 << 15,), dtype=torch.uint8).numpy().tobytes())
    pieces = [(0, torch.float32, (16,)), (64, torch.float32, (16,)),  # back to back, 64 apart
              (1024, torch.bfloat16, (256,)), (1536, torch.bfloat16, (256,)),  # 512 apart
              (4096, torch.int64, (3,))]
    m = _module_over(buf, pieces)
    entries = build_manifest(m)
    wire = [e.dtype for e in entries]
    wire[1] = torch.bfloat16  # sent smaller, converted on arrival
    wire[4] = None  # recomputed locally
    layout = plan(entries, bucket_size=1 << 12, direct_min=1 << 11, wire=wire, align=CUDA_ALIGN,
                  sources=[e.tensor for e in entries] if sources else None)
    assert all(f % CUDA_ALIGN == 0 for f in layout.final), layout.final
    assert all(w % CUDA_ALIGN == 0 for w in layout.wire if w >= 0), layout.wire
    assert layout.main_total <= sum(_align(e.nbytes, CUDA_ALIGN) for e in entries) + CUDA_ALIGN
    # the CPU's alignment keeps the 64-byte run as src has it
    cpu = plan(entries, bucket_size=1 << 12, direct_min=1 << 11, wire=[e.dtype for e in entries],
               sources=[e.tensor for e in entries])
    assert cpu.final[1] - cpu.final[0] == 64


def test_fingerprint_covers_dtensor_placements():
    """Ranks whose DTensor placements differ must not agree: the fingerprint covers each entry's
    placement (kept as codes into a table of the distinct ones), in order."""
    from fsdp_fastload.manifest import fingerprint

    entries = build_manifest(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    row = (("Shard(dim=0)",), (2,), (0, 1))
    col = (("Shard(dim=1)",), (2,), (0, 1))

    def fp(places):
        for e, p in zip(entries, places):
            e.placement = p
        return fingerprint(entries, (0,))

    base = fp([row, row, row, row])
    assert fp([row, row, row, row]) == base
    assert fp([row, col, row, row]) != base
    assert fp([row, row, row, None]) != base
    assert fp([col, row, row, row]) != fp([row, col, row, row])
    assert fp([None] * 4) != base


def test_packer_pieces_send_the_same_bytes_as_slices():
    """A packer given (byte offset, count) pieces of whole tensors packs exactly what one given the
    slices themselves packs (the FSDP2 shard packers' addressing)."""
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(10, 3, generator=g), torch.randn(7, generator=g).to(torch.bfloat16),
            torch.randn(4, 4, generator=g)]
    starts, counts = [6, 4, 8], [12, 3, 8]  # elements
    slices = [t.reshape(-1)[s:s + n] for t, s, n in zip(full, starts, counts)]
    m = nn.Module()
    for k, s in enumerate(slices):
        m.register_buffer(f"b{k}", torch.empty_like(s))
    entries = build_manifest(m)
    layout = plan(entries, bucket_size=64, direct_min=1 << 20)
    by_slice = Packer(slices, layout)
    by_piece = Packer(full, layout, pieces=([s * t.element_size() for s, t in zip(starts, full)], counts))
    for a, b in layout.buckets:
        want, got = torch.full((b - a,), 7, dtype=torch.uint8), torch.full((b - a,), 7, dtype=torch.uint8)
        by_slice.pack(a, b, want)
        by_piece.pack(a, b, got)
        assert torch.equal(got, want), (a, b)
    for step in (None, 50, 77):  # the layout's buckets, then ranges cutting pieces at both ends
        wire = torch.zeros(layout.wire_total, dtype=torch.uint8)
        cuts = layout.buckets if step is None else [(a, min(a + step, layout.wire_total))
                                                    for a in range(0, layout.wire_total, step)]
        for a, b in cuts:
            by_piece.pack(a, b, wire[a:b])
        for i, s in enumerate(slices):
            w = layout.wire[i]
            assert torch.equal(wire[w:w + s.nbytes], s.reshape(-1).view(torch.uint8)), (step, entries[i].names)


@pytest.mark.parametrize("files", ["one", "two"])
@pytest.mark.parametrize("pieces", ["apart", "back_to_back"])
def test_file_pieces_pack_the_bytes_of_their_slices(tmp_path, files, pieces):
    """Pieces of a checkpoint's tensors (src's FSDP2 shard packers reading a rank's shards) pack,
    bucket by bucket, exactly the bytes of the slices they stand for: pieces of one file, each its
    own run, are read with one call per bucket; pieces of two files, or pieces back to back in the
    file and in the bucket (one run), go the general way; ranges that cut pieces at both ends too."""
    from safetensors.torch import save_file

    from fsdp_fastload.source import parse_header

    g = torch.Generator().manual_seed(1)
    full = {f"t{k}": torch.randn(n, generator=g).to(dt) for k, (n, dt) in
            enumerate([(40, torch.float32), (33, torch.float32), (64, torch.float32), (9, torch.float32),
                       (50, torch.float32)])}
    names = list(full)
    if files == "one":
        save_file(full, str(tmp_path / "a.safetensors"))
        ft = parse_header(str(tmp_path / "a.safetensors"))
    else:
        half = {k: full[k] for k in names[::2]}
        save_file(half, str(tmp_path / "a.safetensors"))
        save_file({k: v for k, v in full.items() if k not in half}, str(tmp_path / "b.safetensors"))
        ft = {**parse_header(str(tmp_path / "a.safetensors")), **parse_header(str(tmp_path / "b.safetensors"))}
    if pieces == "apart":  # a middle piece of each: never back to back
        starts, counts = [3, 5, 10, 1, 7], [30, 20, 40, 5, 33]
    else:  # each tensor's tail then the next one's head: back to back in the file
        starts, counts = [20, 0, 0, 0, 0], [20, 33, 64, 9, 25]
    slices = [full[n][s:s + c] for n, s, c in zip(names, starts, counts)]
    m = nn.Module()
    for k, sl in enumerate(slices):
        m.register_buffer(f"b{k}", torch.empty_like(sl))
    entries = build_manifest(m)
    layout = plan(entries, bucket_size=1 << 20, direct_min=1 << 20, align=1)
    by_piece = Packer([ft[n] for n in names], layout, pieces=([s * 4 for s in starts], counts))
    # the layout's one bucket, then ranges cutting pieces at both ends (the packer takes any range)
    for step in (layout.wire_total, 50, 77, 201):
        wire = torch.full((layout.wire_total,), 7, dtype=torch.uint8)
        for a in range(0, layout.wire_total, step):
            b = min(a + step, layout.wire_total)
            by_piece.pack(a, b, wire[a:b])
        for i, sl in enumerate(slices):
            w = layout.wire[i]
            assert torch.equal(wire[w:w + sl.nbytes], sl.view(torch.uint8)), (step, entries[i].names)


def test_contiguous_start_matches_torch_on_every_box():
    """A shard box is sent as one byte range of the full source exactly when it is one contiguous
    run of it (whole tensor, rows, part of a row), at the element torch's own view starts at."""
    import itertools

    from fsdp_fastload.shard import _contiguous_start

    for full in [(4,), (3, 5), (2, 3, 4), (1, 6), (4, 1), (2, 1, 3)]:
        t = torch.arange(torch.Size(full).numel()).reshape(full)
        ranges = [[(o, n) for o in range(f + 1) for n in range(f - o + 1)] for f in full]
        for box in itertools.product(*ranges):
            v = t
            for d, (o, n) in enumerate(box):
                v = v.narrow(d, o, n)
            got = _contiguous_start(full, tuple(n for _, n in box), tuple(o for o, _ in box))
            flat = v.reshape(-1)
            if not flat.numel():
                assert got == 0, (full, box)
                continue
            lo = int(flat[0])
            run = torch.equal(flat, torch.arange(lo, lo + flat.numel()))
            assert got == (lo if run else None), (full, box, got)


@pytest.mark.parametrize("window", [1, 3, 1000])
def test_windowed_packer_sends_what_one_packer_sends(tmp_path, monkeypatch, window):
    """src's packer made window by window (WindowedPacker) sends every bucket byte for byte as one
    packer over all tensors does, and finds the same buckets to send in place: runs across storages
    (kept whole across windows), file ranges, tensors converted to their wire dtype and strided ones,
    entries straddling buckets and windows."""
    from fsdp_fastload.fill import WindowedPacker, make_packer
    from fsdp_fastload.source import FileTensor

    monkeypatch.setattr(WindowedPacker, "WINDOW", window)
    buf = bytearray(torch.randint(0, 256, (1 << 15,), dtype=torch.uint8).numpy().tobytes())
    m = _module_over(buf, [(k * 200, torch.float16, (100,)) for k in range(40)])  # one long run
    path = tmp_path / "raw.bin"
    raw = torch.randint(0, 256, (1 << 14,), dtype=torch.uint8)
    path.write_bytes(raw.numpy().tobytes())
    torch.manual_seed(0)
    extra = nn.Module()
    for k in range(30):
        extra.register_buffer(f"f{k}", raw[k * 300:k * 300 + 296].view(torch.float32).clone())  # values of the file
        extra.register_buffer(f"c{k}", torch.randn(37))  # fp32, sent as bf16
        extra.register_buffer(f"s{k}", torch.randn(9, 5).t())  # strided
    m.extra = extra
    entries = build_manifest(m)
    sources, wire = [], []
    for e in entries:
        name = e.names[0].split(".")[-1]
        if name.startswith("f"):
            k = int(name[1:])
            sources.append(FileTensor(str(path), k * 300, 296, torch.float32, (74,)))
        else:
            sources.append(e.tensor)
        wire.append(torch.bfloat16 if name.startswith("c") else e.dtype)
    for bucket in (256, 1 << 12):
        layout = plan(entries, bucket_size=bucket, direct_min=bucket // 2, wire=wire, sources=sources)
        assert len(layout.buckets) > 3
        one = Packer(sources, layout)
        windowed = make_packer(sources, layout, numels=[e.numel for e in entries])
        assert isinstance(windowed, WindowedPacker) == (window < len(sources))  # (few tensors: one packer)
        assert not isinstance(windowed, WindowedPacker) or len(windowed.windows) > 2
        for a, b in layout.buckets:
            want, got = one.direct_view(a, b), windowed.direct_view(a, b)
            assert (want is None) == (got is None), (bucket, a, b)
            if want is None:
                want, got = (torch.full((b - a,), 7, dtype=torch.uint8) for _ in range(2))  # (gaps: 7 in both)
                one.pack(a, b, want)
                windowed.pack(a, b, got)
            assert torch.equal(want, got), (bucket, a, b)
            assert windowed.describe(a, b) == one.describe(a, b)
