"""Load a causal LM (bundled name or local transformers directory) and capture its MLPs.

`LoadedModel` is what every later stage receives: the transformers model, its tokenizer,
its family adapter, and three operations built on hooks that are always removed:

- `capture(tokens)`: one forward, every layer's MLP input and output;
- `patch_mlp_outputs(fn)`: replace each layer's MLP output during a forward;
- `hooks(...)`: install arbitrary forward hooks for the duration of a `with` block.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from cltrace.errors import CltraceError
from cltrace.models.adapters import FamilyAdapter, adapter_for, adapter_for_type

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: fn(layer, mlp_in [B, n, d], mlp_out [B, n, d]) -> new mlp_out [B, n, d]
MlpPatch = Callable[[int, Tensor, Tensor], Tensor]


class Captured(NamedTuple):
    """Every layer's MLP input and output for a batch of token sequences."""

    mlp_in: Float[Tensor, "batch pos layer d_model"]
    mlp_out: Float[Tensor, "batch pos layer d_model"]
    logits: Float[Tensor, "batch pos vocab"] | None


@dataclass
class LoadedModel:
    """A causal LM ready for cltrace: eval mode, parameters frozen."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: FamilyAdapter
    blocks: list[nn.Module] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self.blocks = self.adapter.blocks(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.adapter.unembed(self.model).weight.shape[0])

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config.get_text_config()
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @functools.cached_property
    def bos_token_id(self) -> int | None:
        """The token that starts every sequence, or None for models trained without one.

        Decided by the tokenizer's own behaviour (Gemma adds <bos>; SmolLM2's tokenizer adds
        nothing and the model degrades if its <|im_start|> is forced in front)."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        ids = list(self.tokenizer("a")["input_ids"])
        return bos if bos is not None and ids and ids[0] == bos else None

    def tokenize(self, text: str) -> Int[Tensor, "1 pos"]:
        """Token ids of `text`, with BOS prepended where the model's tokenizer adds one."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def decode(self, ids) -> str:
        return str(self.tokenizer.decode(ids))

    def token_strings(self, ids) -> list[str]:
        """One readable string per token id (decoded individually)."""
        return [str(self.tokenizer.decode([int(i)])) for i in ids]

    @contextlib.contextmanager
    def hooks(
        self,
        forward_hooks: Sequence[tuple[nn.Module, Callable]] = (),
        pre_hooks: Sequence[tuple[nn.Module, Callable]] = (),
    ) -> Iterator[None]:
        """Install forward (and pre-forward) hooks for the `with` block; always removed."""
        handles = []
        try:
            for module, hook in forward_hooks:
                handles.append(module.register_forward_hook(hook))
            for module, hook in pre_hooks:
                handles.append(module.register_forward_pre_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()

    def run(self, tokens: Int[Tensor, "batch pos"], *, with_logits: bool = True):
        """Forward pass; with_logits=False skips the unembedding (most of Gemma's cost)."""
        if with_logits:
            return self.model(input_ids=tokens, use_cache=False).logits
        return self.model.base_model(input_ids=tokens, use_cache=False)

    def capture(
        self, tokens: Int[Tensor, "batch pos"], *, with_logits: bool = False, layers: list[int] | None = None
    ) -> Captured:
        """One forward pass recording the MLP input and output of every layer (or `layers`)."""
        layers = list(range(self.n_layers)) if layers is None else layers
        ins: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}

        def keep(store: dict[int, Tensor], layer: int):
            def hook(_module, _inputs, output):
                store[layer] = output.detach()

            return hook

        fwd = [(self.adapter.mlp_in_module(self.blocks[l]), keep(ins, l)) for l in layers]
        fwd += [(self.adapter.mlp_out_module(self.blocks[l]), keep(outs, l)) for l in layers]
        with torch.no_grad(), self.hooks(fwd):
            result = self.run(tokens, with_logits=with_logits)
        logits = result if with_logits else None
        stack = lambda store: torch.stack([store[l] for l in layers], dim=2)  # noqa: E731
        return Captured(stack(ins), stack(outs), logits)

    def mlp_hooks(
        self, on_in: Callable[[int, Tensor], None], on_out: Callable[[int, Tensor], Tensor | None]
    ) -> list[tuple[nn.Module, Callable]]:
        """Forward hooks for every layer, for `hooks(...)`: on_in(layer, mlp_in) sees each MLP
        input; on_out(layer, mlp_out) sees each MLP output and may return a replacement."""

        def seen(layer: int):
            return lambda _m, _i, output: on_in(layer, output)

        def replaced(layer: int):
            return lambda _m, _i, output: on_out(layer, output)

        return [(self.adapter.mlp_in_module(b), seen(l)) for l, b in enumerate(self.blocks)] + [
            (self.adapter.mlp_out_module(b), replaced(l)) for l, b in enumerate(self.blocks)
        ]

    @contextlib.contextmanager
    def patch_mlp_outputs(self, fn: MlpPatch) -> Iterator[None]:
        """Within the block, each layer's MLP output is replaced by fn(layer, mlp_in, mlp_out).

        Layers are visited in order within one forward, so `fn` may keep state across
        layers (a CLT closure accumulates each layer's feature activations).
        """
        current_in: dict[int, Tensor] = {}
        fwd = self.mlp_hooks(current_in.__setitem__, lambda layer, out: fn(layer, current_in.pop(layer), out))
        with self.hooks(fwd):
            yield


def load_model(
    name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a bundled model by name (e.g. "gemma-3-270m") or any local transformers directory.

    Attention runs in the eager implementation so that later stages can freeze patterns.
    """
    from cltrace.models import bundled

    if name_or_path in bundled.BUNDLED:
        path = bundled.ensure_model_dir(name_or_path)
        name = name_or_path
    else:
        path = Path(name_or_path).expanduser()
        name = str(path)
        if not path.exists():
            raise CltraceError(
                f"no model called {name_or_path!r}: it is neither a bundled model nor a folder",
                f"bundled models: {', '.join(bundled.BUNDLED)}; or pass --model PATH to a "
                "transformers model directory (with config.json)",
            )
        if not (path / "config.json").exists():
            raise CltraceError(
                f"{path} has no config.json, so it is not a transformers model directory",
                "pass the folder that save_pretrained() wrote",
            )
    return load_model_dir(path, name=name, device=device, dtype=dtype)


def load_model_dir(
    path: Path, *, name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load model + tokenizer from a transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # cltrace shows its own progress

    adapter_for_type(config_model_type(path))  # before transformers, which may not know it
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise CltraceError(
            f"could not load the model in {path}: {err}",
            "check that the folder is complete (config, weights, tokenizer)",
        ) from err
    model.to(device)  # pyright: ignore[reportArgumentType]  (transformers' stub types `to` oddly)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, adapter=adapter_for(model))


def from_pretrained_objects(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "in-memory"
) -> LoadedModel:
    """Wrap an already-built transformers model (tests build tiny random ones)."""
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, adapter=adapter_for(model))


def config_model_type(path: Path) -> str | None:
    """`model_type` from a transformers folder's config.json (None when it has none)."""
    config = Path(path) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CltraceError(
            f"cannot read {config}: {err}", "pass the folder that save_pretrained() wrote"
        ) from err
    return data.get("model_type") if isinstance(data, dict) else None
