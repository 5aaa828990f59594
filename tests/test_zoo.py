"""The architecture sweep (`scripts/zoo_check.py`) as a test: 24 transformers architectures, all but
Mixtral absent from the other tests (encoder-decoders with shared embeddings, ALiBi, Mamba, Conv1D, vision,
audio, dual-tower CLIP, LLaVA, weight-norm parametrizations, renamed checkpoint keys, MoE experts that
transformers fuses on load: refused with a clear error), on 2 gloo ranks: both flows, and FSDP2 shards from
the checkpoint directory (where `fully_shard` accepts the model); every tensor (full tensors of the
shards), the tie groups and the forward output bit for bit against `from_pretrained`."""
import os

SCRIPTS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "scripts"))


def test_architecture_sweep(capsys, monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)  # spawned ranks import zoo_check by name (sys.path travels)
    import zoo_check

    rc = zoo_check.main([])
    out = capsys.readouterr().out
    assert rc == 0 and "0 failing case(s)" in out, out
    assert "cannot build here" not in out, out
