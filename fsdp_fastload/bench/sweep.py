"""The scaling sweep: plain synthetic modules (no transformers), src-model flow, vs the floor.

(a) tensor count at fixed total bytes (always including 1 tensor: the per-tensor overhead is the
    ratio to it), (b) total bytes at a fixed count. Every (point, method) runs in fresh processes;
    the floor (one flat broadcast of the same bytes) is run once per distinct byte total.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .models import SYNTH_ITEMSIZE
from .runner import Job, first_error, stats

GOAL = 1.5  # many tiny tensors vs one tensor of the same bytes


@dataclass(frozen=True)
class Point:
    """``count`` float32 tensors, ``nbytes`` in all (``nbytes`` a multiple of 4 * ``count``)."""

    count: int
    nbytes: int

    def __post_init__(self):
        if self.count < 1 or self.nbytes < SYNTH_ITEMSIZE * self.count \
                or self.nbytes % (SYNTH_ITEMSIZE * self.count):
            raise ValueError(f"sweep point: {self.nbytes} bytes do not split into {self.count} float32 "
                             f"tensors of equal size. Pick a total that is a multiple of "
                             f"{SYNTH_ITEMSIZE * self.count} (decimal sizes such as 64M or 1G work for "
                             "counts that are powers of ten up to 1M).")

    @property
    def model(self) -> dict:
        return {"kind": "synthetic", "count": self.count, "numel": self.nbytes // SYNTH_ITEMSIZE // self.count}


@dataclass
class Plan:
    by_count: list[Point]  # (a)
    by_bytes: list[Point]  # (b)
    methods: list[str]  # "floor" first


def plan(counts: list[int], fixed_bytes: int, sizes: list[int], fixed_count: int,
         methods: list[str]) -> Plan:
    """The sweep's points; 1 tensor is added to (a) as its reference, the floor to the methods."""
    return Plan(by_count=[Point(c, fixed_bytes) for c in sorted(set(counts) | {1})] if counts else [],
                by_bytes=[Point(fixed_count, s) for s in sorted(set(sizes))],
                methods=["floor"] + [m for m in methods if m != "floor"])


def _floor_key(nbytes: int) -> tuple:
    return ("floor", nbytes)


def _key(method: str, p: Point) -> tuple:
    return _floor_key(p.nbytes) if method == "floor" else (method, p.count, p.nbytes)


def jobs(sp: Plan) -> list[Job]:
    """One job per distinct (method, point); the floor's model is 1 tensor (it only needs the bytes)."""
    out: dict[tuple, Job] = {}
    for p in sp.by_count + sp.by_bytes:
        for m in sp.methods:
            q = Point(1, p.nbytes) if m == "floor" else p
            key = _key(m, p)
            if key not in out:
                out[key] = Job(key=key, label=_label(m, q), method=m, model=q.model)
    return list(out.values())


def _label(method: str, p: Point) -> str:
    count = "" if method == "floor" else f"{p.count:>6} tensors "
    return f"[sweep] {method:<6} {count}{fmt_bytes(p.nbytes)}"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """"64M" -> 64_000_000; decimal K/M/G suffixes (so totals split evenly into 10^k tensors)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (expected e.g. 64M, 1G, 1000000)") from None


def _ratio(a: dict | None, b: dict | None) -> str:
    return "–" if a is None or b is None or b["median"] <= 0 else f"{a['median'] / b['median']:.2f}×"


def _cell(st: dict | None, rs: list, spread: bool = True) -> str:
    """Median (and range, failed runs), or the first error."""
    if st is None:
        return f"ERROR: {first_error(rs)}"
    if not spread:
        return f"{st['median']:.3f}"
    extra = f"; {st['failed']} failed" if st["failed"] else ""
    return f"{st['median']:.3f} ({st['lo']:.3f}–{st['hi']:.3f}{extra})"


def tables(sp: Plan, results: dict[tuple, list]) -> str:
    """The sweep's markdown: (a), its goal line, (b)."""
    st = {k: stats(v) for k, v in results.items()}
    others = sp.methods[1:]
    parts = []
    if sp.by_count:
        total = fmt_bytes(sp.by_count[0].nbytes)
        parts += [f"#### (a) tensor count at {total} in all", "", _table(sp.by_count, others, st, results, True),
                  "", _goal(sp.by_count, others, st), ""]
    if sp.by_bytes:
        parts += [f"#### (b) total bytes at {sp.by_bytes[0].count:,} tensors", "",
                  _table(sp.by_bytes, others, st, results, False), ""]
    return "\n".join(parts)


def _table(points: list[Point], others: list[str], st: dict, results: dict, by_count: bool) -> str:
    head = ["tensors", "bytes each"] if by_count else ["total", "tensors"]
    head.append("floor s")
    ref = _reference(others)
    for m in others:
        one_of = "" if ref[m] == m else f" of {ref[m]}"  # a bound is read against the loader
        head += [f"{m} s (range)", f"{m} ×floor"] + ([f"{m} ×1 tensor{one_of}"] if by_count else [])
    head += ["receiver peak RSS growth MB (" + " / ".join(["floor"] + others) + ")", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    one = points[0] if by_count else None
    for p in points:
        floor = st.get(_floor_key(p.nbytes))
        row = ([f"{p.count:,}", fmt_bytes(p.nbytes // p.count)] if by_count
               else [fmt_bytes(p.nbytes), f"{p.count:,}"])
        row.append(_cell(floor, results.get(_floor_key(p.nbytes), []), spread=False))
        for m in others:
            s = st.get(_key(m, p))
            row += [_cell(s, results.get(_key(m, p), [])), _ratio(s, floor)]
            if by_count:
                row.append(_ratio(s, st.get(_key(ref[m], one))))
        rss = [st.get(_key(m, p)) for m in ["floor"] + others]
        row.append(" / ".join("–" if s is None else f"{s['rss'] / 1e6:.0f}" for s in rss))
        row.append("/".join(s["params"] for s in rss[1:] if s is not None) or "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _reference(methods: list[str]) -> dict[str, str]:
    """Per method, whose 1-tensor time its ×1 tensor ratio uses: its own, or for a `*_bound` row
    (per-tensor work alone, not a loader: its own 1-tensor time is ~0) the first loader's."""
    loaders = [m for m in methods if not m.endswith("_bound")]
    return {m: m if m in loaders or not loaders else loaders[0] for m in methods}


def _goal(points: list[Point], others: list[str], st: dict) -> str:
    """The headline: the most tensors vs one tensor of the same bytes, per method."""
    one, most = points[0], points[-1]
    refs = _reference(others)
    out = []
    for m in others:
        a, b, ref = st.get(_key(m, most)), st.get(_key(refs[m], one)), refs[m]
        if a is None or b is None or most is one:
            continue
        r = a["median"] / b["median"]
        if ref == m:
            out.append(f"{m}: {most.count:,} tensors take {r:.2f}× the time of 1 tensor of the same "
                       f"{fmt_bytes(most.nbytes)} (goal ≤ {GOAL}×: {'met' if r <= GOAL else 'NOT met'}).")
        else:  # a bound: what the per-tensor work alone costs, against the loader's 1-tensor time
            out.append(f"{m} alone at {most.count:,} tensors takes {r:.2f}× the time of {ref} for 1 "
                       f"tensor of the same {fmt_bytes(most.nbytes)}: no loader that does at least this "
                       f"meets {GOAL}× there.")
    return "\n".join(out)


def plot(sp: Plan, results: dict[tuple, list], path: Path) -> str | None:
    """sweep.png (seconds vs count, seconds vs bytes); None, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the [bench] extra): no plot"
    st = {k: stats(v) for k, v in results.items()}
    panels = [(pts, by) for pts, by in ((sp.by_count, True), (sp.by_bytes, False)) if pts]
    if not panels:
        return "no sweep points: no plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (pts, by_count) in zip(axes[0], panels):
        xs = [p.count if by_count else p.nbytes / 1e6 for p in pts]
        for m in sp.methods:
            ys = [st.get(_key(m, p)) for p in pts]
            ax.plot([x for x, y in zip(xs, ys) if y], [y["median"] for y in ys if y], "o-", label=m)
        ref = sp.methods[1] if len(sp.methods) > 1 else None
        one = st.get(_key(ref, pts[0])) if (by_count and ref) else None
        if one is not None:
            ax.axhline(GOAL * one["median"], ls="--", c="gray", label=f"goal: {GOAL}× {ref} at 1 tensor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{p.count:,}" if by_count else fmt_bytes(p.nbytes) for p in pts])
        ax.minorticks_off()
        ax.set_xlabel("tensors" if by_count else "total bytes")
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"(a) {fmt_bytes(pts[0].nbytes)} in all" if by_count else f"(b) {pts[0].count:,} tensors")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
