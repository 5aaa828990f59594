"""`python -m fsdp_fastload demo|bench`: run the main job, or the side-by-side benchmark."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fsdp_fastload {demo,bench} [options]\n"
              "  demo   load a small transformers model onto 2 local ranks and verify it (--help)\n"
              "  bench  the side-by-side benchmark against the peers (--help)")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo
        return demo(rest)
    if cmd == "bench":
        from .bench import main as bench
        return bench(rest)
    print(f"unknown command {cmd!r}; use demo or bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
