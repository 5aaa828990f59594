"""The architecture sweep (`scripts/zoo_check.py`) as a test: ~160 transformers architectures (its own
table and `zoo_more.py`), nearly all absent from the other tests (encoder-decoders with shared embeddings,
ALiBi, Mamba/Mamba2/RWKV/hybrids, Conv1D, vision, detection, audio, dual-tower CLIP, LLaVA, weight-norm
parametrizations, renamed checkpoint keys, MoE experts that transformers fuses on load, parameters
transformers does not save, buffers an ancestor's initializer sets, empty parameters), on 2 gloo ranks:
both flows, and FSDP2 shards from the checkpoint directory; every tensor (full tensors of the shards),
the tie groups and the forward output bit for bit against `from_pretrained`. Only the cases the sweep
lists in `REFUSED` may be refused, with the error named there."""
import os

SCRIPTS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "scripts"))


def test_architecture_sweep(capsys, monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)  # spawned ranks import zoo_check by name (sys.path travels)
    import zoo_check

    rc = zoo_check.main([])
    out = capsys.readouterr().out
    assert rc == 0 and "0 failing case(s)" in out, out
    assert "cannot build here" not in out, out
