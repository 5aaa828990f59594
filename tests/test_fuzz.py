"""Fuzzing the two readers of untrusted bytes (hypothesis, bounded: a few seconds in the normal run).

- `source.parse_header` on random bytes, random JSON-ish headers and mutations of a real file written
  by `safetensors.torch.save_file` only ever returns a consistent plan or raises CheckpointError.
  Where the safetensors library itself accepts a file, we must agree with it: same names, dtypes,
  shapes, and `read_ranges` of each span gives the library's bytes.
- `read_ranges` (compiled op and fallback) with random offsets/lengths/destinations either fills
  exactly the requested bytes with the file's bytes (nothing else in the destination touched) or
  raises RuntimeError with the destination untouched. A crash would take pytest down with it.
"""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fsdp_fastload import ops
from fsdp_fastload.source import SAFETENSORS_DTYPES, CheckpointError, parse_header

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _real_file_bytes() -> bytes:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    return save({"w": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int16),
                 "h": torch.randn(2, 2, generator=g).to(torch.bfloat16), "e": torch.zeros(0, 3)},
                metadata={"format": "pt"})


REAL = _real_file_bytes()


# --------------------------------------------------------------------------------- parse_header

def _check_header(path: str, data: bytes) -> None:
    """parse_header's contract on one file: a consistent plan (checked against the library where it
    reads the file too) or CheckpointError naming the file; nothing else."""
    with open(path, "wb") as f:
        f.write(data)
    try:
        plan = parse_header(path)
    except CheckpointError as e:
        assert path in str(e), str(e)
        plan = None
    lib = _library_view(path)
    if plan is None:
        # We may be stricter than the library only where it reads a dtype we do not know.
        assert lib is None or any(dt not in SAFETENSORS_DTYPES for _, dt, _ in lib.values()), \
            f"the safetensors library reads {sorted(lib)} but parse_header refused the file"
        return
    n = struct.unpack("<Q", data[:8])[0]
    spans = []
    for name, ft in plan.items():
        numel = 1
        for s in ft.shape:
            numel *= s
        assert ft.path == path and ft.nbytes == numel * ft.dtype.itemsize
        assert 8 + n <= ft.offset and ft.offset + ft.nbytes <= len(data), (name, ft, len(data))
        if ft.nbytes:
            spans.append((ft.offset, ft.offset + ft.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"overlapping spans accepted: {spans}"
    if lib is not None:
        assert set(plan) == set(lib)
        for name, (tensor, dt, shape) in lib.items():
            ft = plan[name]
            # (the header's shape, except F4's: the library halves its last dimension, as we do)
            assert (ft.dtype, ft.shape) == (tensor.dtype, shape if dt != "F4" else tuple(tensor.shape)), name
            raw = torch.empty(ft.nbytes, dtype=torch.uint8)
            ops.read_ranges(path, raw, [ft.offset], [0], [ft.nbytes])
            assert raw.numpy().tobytes() == data[ft.offset:ft.offset + ft.nbytes], name
            assert torch.equal(raw, tensor.reshape(-1).view(torch.uint8)), name


def _library_view(path: str):
    """name -> (tensor, safetensors dtype name, shape) as the safetensors library reads it, or None."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (f.get_tensor(k), sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except Exception:  # noqa: BLE001  (the library's own errors: it refused the file)
        return None


@FUZZ
@given(data=st.binary(max_size=200))
def test_parse_header_random_bytes(workdir, data):
    _check_header(str(workdir / "random.safetensors"), data)


@FUZZ
@given(header=st.binary(max_size=200), length_delta=st.integers(-4, 4), tail=st.binary(max_size=32))
def test_parse_header_random_header_bytes(workdir, header, length_delta, tail):
    # A plausible length word, so the random bytes reach the UTF-8/JSON stage.
    n = max(0, len(header) + length_delta)
    _check_header(str(workdir / "rawheader.safetensors"), struct.pack("<Q", n) + header + tail)


_JSON_ATOMS = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=False),
                        st.text(max_size=6))
_ANY_JSON = st.recursive(_JSON_ATOMS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                         max_size=3), max_leaves=6)
_DTYPES = st.one_of(st.sampled_from(list(SAFETENSORS_DTYPES) + ["F12", "f32", "", "F6_E2M3", "F8_E4M3FN"]), _ANY_JSON)
_SMALL = st.integers(-2, 40)


@st.composite
def _entry(draw, data_len: int):
    if draw(st.booleans()):  # consistent: a real dtype, a shape and offsets that agree (maybe inside the data)
        name = draw(st.sampled_from(list(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for s in shape:
            numel *= s
        begin = draw(st.integers(0, data_len + 2))
        nbytes = numel // 2 if name == "F4" else numel * SAFETENSORS_DTYPES[name].itemsize  # (F4: 2 a byte)
        return {"dtype": name, "shape": shape, "data_offsets": [begin, begin + nbytes]}
    entry = {"dtype": draw(_DTYPES), "shape": draw(st.one_of(st.lists(_SMALL, max_size=3), _ANY_JSON)),
             "data_offsets": draw(st.one_of(st.lists(_SMALL, min_size=2, max_size=2), _ANY_JSON))}
    for k in draw(st.lists(st.sampled_from(sorted(entry)), max_size=1, unique=True)):
        del entry[k]  # a missing field
    return entry


@st.composite
def _json_file(draw):
    data_len = draw(st.integers(0, 64))
    names = draw(st.lists(st.text(max_size=5), max_size=4, unique=True))
    header = {n: draw(st.one_of(_entry(data_len), _ANY_JSON)) if draw(st.integers(0, 9)) == 0
              else draw(_entry(data_len)) for n in names}
    if draw(st.booleans()):
        header["__metadata__"] = draw(_ANY_JSON)
    raw = json.dumps(header).encode()
    pad = b" " * draw(st.integers(0, 7))  # safetensors pads headers with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw) + len(pad)) + raw + pad + os.urandom(data_len)


@FUZZ
@given(data=_json_file())
def test_parse_header_random_json_headers(workdir, data):
    _check_header(str(workdir / "json.safetensors"), data)


_MUTATION = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(REAL) - 1), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(REAL))),
    st.tuples(st.just("insert"), st.integers(0, len(REAL)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, len(REAL)), st.integers(1, 16)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
)


def _mutate(data: bytes, mutations) -> bytes:
    for m in mutations:
        if m[0] == "set":
            data = data[:m[1]] + bytes([m[2]]) + data[m[1] + 1:]
        elif m[0] == "cut":
            data = data[:m[1]]
        elif m[0] == "insert":
            data = data[:m[1]] + m[2] + data[m[1]:]
        elif m[0] == "delete":
            data = data[:m[1]] + data[m[1] + m[2]:]
        else:
            data = struct.pack("<Q", m[1]) + data[8:]
    return data


@FUZZ
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_parse_header_mutated_real_file(workdir, mutations):
    _check_header(str(workdir / "mutated.safetensors"), _mutate(REAL, mutations))


def test_parse_header_edge_cases(workdir):
    # Found by the fuzzers above (each used to escape as something other than CheckpointError).
    path = str(workdir / "edge.safetensors")
    for raw, msg in [(b"[" * 100_000 + b"]" * 100_000, "header is not valid JSON"),  # RecursionError
                     (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
                      "header is not valid JSON"),  # ValueError: int string conversion limit
                     (b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
                      r"tensor 'a': unknown dtype \['F32'\]")]:  # TypeError: unhashable list
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
        with pytest.raises(CheckpointError, match=msg):
            parse_header(path)
    assert set(parse_header(_write(path, REAL))) == {"w", "b", "h", "e"}


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


# --------------------------------------------------------------------------------- read_ranges

FILE_SIZE = 4096 + 13
_FILE_BYTES = bytes((i * 131 + 7) % 251 for i in range(FILE_SIZE))
_COORD = st.one_of(st.integers(-3, FILE_SIZE + 8), st.integers(0, 64),
                   st.sampled_from([2**62, 2**63 - 1, FILE_SIZE - 1, FILE_SIZE]))


@st.composite
def _dst_and_ranges(draw):
    """(numel, dtype, ranges): ranges anywhere, or pressed against the end of the destination or file."""
    numel, dtype = draw(st.integers(0, 700)), draw(st.sampled_from([torch.uint8, torch.int16, torch.float32]))
    size, ranges = numel * dtype.itemsize, []
    for kind in draw(st.lists(st.sampled_from(["any", "dst_end", "file_end"]), max_size=6)):
        edge = draw(st.integers(-2, 2))
        if kind == "any":
            ranges.append((draw(_COORD), draw(_COORD), draw(_COORD)))
        elif kind == "dst_end":
            n = draw(st.integers(0, min(size, 64) + 2))
            ranges.append((draw(st.integers(0, FILE_SIZE - n)), size - n + edge, n))
        else:
            n = draw(st.integers(0, 66))
            ranges.append((FILE_SIZE - n + edge, draw(st.integers(0, max(0, size - n))), n))
    return numel, dtype, ranges


def _read_ranges_impl(impl):
    if impl == "compiled":
        if not ops.extension_available():
            pytest.skip("fsdp_fastload._C not built")
        return lambda *a: ops.read_ranges(*a[:5], num_threads=a[5])  # the op's returned error, raised
    return ops._read_ranges_ref


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_dst_and_ranges(), strided=st.integers(0, 9), num_threads=st.integers(-1, 5))
def test_read_ranges_fuzz(workdir, impl, case, strided, num_threads):
    fn = _read_ranges_impl(impl)
    numel, dtype, ranges = case
    path = str(workdir / "ranges.bin")
    if not os.path.exists(path):
        _write(path, _FILE_BYTES)
    raw = torch.full((numel * dtype.itemsize,), 0xAB, dtype=torch.uint8)  # all the memory dst can reach
    dst = raw.view(dtype)
    if strided == 0 and numel >= 2:
        dst = dst[::2]  # not contiguous: refused
    before = raw.clone()
    size = dst.numel() * dst.element_size()
    valid = dst.is_contiguous() and all(
        fo >= 0 and d >= 0 and n >= 0 and d + n <= size and fo + n <= FILE_SIZE for fo, d, n in ranges)
    fo, do, ln = (list(x) for x in zip(*ranges)) if ranges else ([], [], [])
    if not valid:
        with pytest.raises(RuntimeError, match="fsdp_fastload read_ranges: "):
            fn(path, dst, fo, do, ln, num_threads)
        assert torch.equal(raw, before), "a refused call wrote to the destination"
        return
    fn(path, dst, fo, do, ln, num_threads)
    got, want = raw.numpy().tobytes(), bytearray(before.numpy().tobytes())
    written = [0] * size
    for f, d, n in ranges:
        want[d:d + n] = _FILE_BYTES[f:f + n]
        for i in range(d, d + n):
            written[i] += 1
    # Bytes written by two ranges (overlapping destinations) may come from either: compare the rest.
    for i in range(len(got)):
        if i >= size or written[i] <= 1:
            assert got[i] == want[i], f"byte {i}: got {got[i]}, want {want[i]} (ranges {ranges})"


@pytest.mark.parametrize("impl", ["compiled", "fallback"])
def test_read_ranges_refuses_what_is_not_a_file(workdir, impl):
    fn = _read_ranges_impl(impl)
    dst = torch.zeros(4, dtype=torch.uint8)
    for path, msg in [(str(workdir), "is not a regular file"), (str(workdir / "missing"), "missing")]:
        with pytest.raises(RuntimeError, match=msg):
            fn(path, dst, [0], [0], [0], 1)  # even an empty read names the problem
