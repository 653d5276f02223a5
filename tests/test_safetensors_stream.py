"""model.safetensors streamed from DCP shards tensor by tensor (engine/safetensors_stream.py): what it writes is
what save_pretrained writes (names, tied weights, dtypes), transformers loads it, and it never holds the
model twice. The shards here are real DCP checkpoints of one process; 2-rank shards are tests/test_fsdp.py's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tui_trainer.engine.safetensors_stream import write_model_weights
from tui_trainer.engine.sharded_checkpoint import is_sharded_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpt2_config(**extra: int):  # tied lm_head = wte, as our own gpt2 runs have it
    from transformers import GPT2Config

    return GPT2Config(**{"vocab_size": 300, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, **extra})


def sharded_dir(path: Path, model: Any, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A dir holding `model`'s weights (or `state`) as DCP shards (keys "model.<name>", as our checkpoints
    save them) and its config.json."""
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True)
    dcp.save({"model": model.state_dict() if state is None else state}, checkpoint_id=path, no_dist=True)
    model.config.save_pretrained(path)
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_streamed_weights_are_what_save_pretrained_writes_and_transformers_loads_them(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt2_config()).eval()
    shards = sharded_dir(tmp_path / "shards", model)
    write_model_weights(shards, shards / "model.safetensors", DTYPES[dtype])
    reference = tmp_path / "reference"
    model.to(DTYPES[dtype]).save_pretrained(reference)

    got, want = tensors(shards / "model.safetensors"), tensors(reference / "model.safetensors")
    assert "lm_head.weight" not in got and "transformer.wte.weight" in got  # tied: stored once, as HF does
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    loaded = AutoModelForCausalLM.from_pretrained(shards, dtype=DTYPES[dtype]).eval()
    batch = torch.arange(40).view(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch).logits, model(input_ids=batch).logits, rtol=0, atol=0)


def test_every_family_streams_with_its_own_names_and_untied_heads(tmp_path, family_dirs):
    from transformers import AutoModelForCausalLM

    for name, source in family_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(source).eval()
        shards = sharded_dir(tmp_path / name, model)
        write_model_weights(shards, shards / "model.safetensors")
        got, want = tensors(shards / "model.safetensors"), tensors(source / "model.safetensors")
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_a_sharded_checkpoint_with_hf_weights_beside_its_shards_is_still_read_as_sharded(tmp_path):
    from transformers import AutoModelForCausalLM

    shards = sharded_dir(tmp_path / "ckpt", AutoModelForCausalLM.from_config(gpt2_config()))
    write_model_weights(shards, shards / "model.safetensors")
    assert is_sharded_checkpoint(shards)  # resuming reads the shards (and the AdamW state beside them)


# The export's peak memory, measured in a fresh process: its high-water mark of resident memory is reset
# (/proc/self/clear_refs, "5") right before the export, after everything it imports is imported (one
# export of a tiny checkpoint first), so what it reports is what the export itself held at its peak.
_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from tui_trainer.engine import safetensors_stream, sharded_checkpoint

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def peak(run):
        open("/proc/self/clear_refs", "w").write("5")
        before = rss("VmRSS")
        run()
        return rss("VmHWM") - before

    tiny, big, out = (Path(p) for p in sys.argv[1:4])
    safetensors_stream.write_model_weights(tiny, out / "warm.safetensors")

    def whole():  # the model loaded whole, as export did before it streamed
        global model
        model = sharded_checkpoint.load_model(big)

    streamed = peak(lambda: safetensors_stream.write_model_weights(big, out / "model.safetensors"))
    print(json.dumps({"streamed": streamed, "whole": peak(whole)}))
    """
)


@pytest.mark.slow  # a fresh process importing torch and transformers, a 70 MB model read twice
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_streaming_holds_one_tensor_at_a_time_never_the_whole_model(tmp_path):
    from transformers import AutoModelForCausalLM

    # ~70 MB of fp32 weights in 2.4 MB pieces and smaller (and a 0.5 MB embedding); random values drawn
    # directly (transformers' own init of this size takes seconds)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gpt2_config(n_embd=384, n_layer=10, n_head=4))
    torch.manual_seed(0)
    state = {name: torch.rand(t.shape) for name, t in model.state_dict().items()}
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    largest = max(t.numel() * t.element_size() for t in state.values())
    big = sharded_dir(tmp_path / "big", model, state)
    tiny = sharded_dir(tmp_path / "tiny", AutoModelForCausalLM.from_config(gpt2_config()))
    run = [sys.executable, "-c", _MEASURE, str(tiny), str(big), str(tmp_path)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    peak = json.loads(result.stdout.strip().splitlines()[-1])
    # the control: holding the model whole is seen as at least its size
    assert peak["whole"] > 0.9 * model_bytes, (peak, model_bytes)
    # streaming: a few copies of the largest tensor (read buffer, the tensor, its cast), never the model
    assert peak["streamed"] < 0.25 * model_bytes, (peak, model_bytes, largest)


def mixtral_config():  # its experts are merged into one tensor per layer when transformers saves them
    from transformers import AutoConfig

    sizes = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
    return AutoConfig.for_model("mixtral", **sizes, **heads, num_local_experts=2, num_experts_per_tok=1)


def test_a_family_whose_weights_transformers_merges_exports_through_the_whole_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from tui_trainer.engine.export import _write_model
    from tui_trainer.engine.models import meta_model
    from tui_trainer.engine.safetensors_stream import Unstreamable, saved_names

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mixtral_config()).eval()
    shards = sharded_dir(tmp_path / "shards", model)
    with pytest.raises(Unstreamable, match="MixtralForCausalLM"):
        saved_names(meta_model(shards))
    out = tmp_path / "out"
    out.mkdir()
    _write_model(shards, out, torch.float32)  # export's way: loaded whole, saved by save_pretrained
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = torch.arange(20).view(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch).logits, model(input_ids=batch).logits, rtol=0, atol=0)


def test_hf_weights_for_such_a_family_are_refused_in_one_line_before_a_run_is_written(tmp_path, tiny, capsys):
    from tui_trainer.cli import main

    root = tmp_path / "runs"
    args = ["train", "--run", "mx", "--headless", "--runs-dir", str(root)]
    for item in [*tiny(model__arch="mixtral"), "train.parallel=fsdp", "checkpoint.hf_weights=true"]:
        args += ["--set", item]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tui-trainer: error: checkpoint.hf_weights: MixtralForCausalLM"), err
    assert "Traceback" not in "\n".join(err)
    assert not root.exists() or not any(root.iterdir())
