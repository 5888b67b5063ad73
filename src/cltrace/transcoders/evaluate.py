"""Quality of a trained transcoder.

Activation level, on held-out (MLP input, MLP output) batches, per layer l:
    nmse_l = Σ ||ŷ_l - y_l||² / Σ ||y_l - mean(y_l)||²,   fve_l = 1 - nmse_l
    l0_l   = mean number of active features per token
    dead_l = features never active on these tokens;  dense_l = active on > `dense_frac` of them
    density of a feature = the fraction of tokens it is active on; its median per layer and over
    all features, and the shares of dense and dead features (readable features are rare)
Replacement model, on token sequences: every MLP output (positions ≥ 1; position 0 is the
BOS attention sink the transcoder never saw) replaced by the transcoder's reconstruction:
    top-1 agreement with the real model's next-token argmax, KL(real || replacement), and
    the fraction of CE loss recovered, (CE_zero - CE_repl) / (CE_zero - CE_real), where
    CE_zero zero-ablates every MLP output.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.transcoders.interface import check_transcoder
from cltrace.transcoders.model import Transcoder

if TYPE_CHECKING:
    from cltrace.data.corpus import Split
    from cltrace.models.loading import LoadedModel


@dataclass
class ActivationMetrics:
    n_tokens: int
    nmse: list[float]  # per layer
    fve: list[float]
    l0: list[float]
    dead: list[int]
    dense: list[int]  # features active on > dense_frac of the tokens
    median_density: list[float] = field(default_factory=list)  # per layer (absent in old eval.json)
    median_density_all: float | None = None  # over every feature
    n_features: int | None = None  # per layer
    dense_frac: float = 0.1

    def summary(self) -> dict[str, float]:
        def mean(v):
            return sum(v) / len(v)

        out = {
            "nmse": mean(self.nmse),
            "fve": mean(self.fve),
            "l0": mean(self.l0),
            "dead": sum(self.dead),
            "dense": sum(self.dense),
        }
        if self.n_features:
            total = self.n_features * len(self.nmse)
            out.update(
                dead_share=sum(self.dead) / total,
                dense_share=sum(self.dense) / total,
                median_density=self.median_density_all,
                l0_share=out["l0"] / self.n_features,
            )
        return out


@dataclass
class ReplacementMetrics:
    n_tokens: int
    top1_agreement: float
    kl: float  # nats per token, KL(real || replacement)
    ce_real: float
    ce_replacement: float
    ce_zero_ablation: float
    ce_recovered: float


@torch.no_grad()
def evaluate_activations(
    tc: Transcoder, batches: Iterable, *, max_tokens: int | None = None, dense_frac: float = 0.1
) -> ActivationMetrics:
    """Per-layer reconstruction and sparsity on `batches` of `.mlp_in, .mlp_out` [B, L, d]."""
    L, n_feat = tc.cfg.n_layers, tc.cfg.n_features
    device = next(tc.parameters()).device
    err = torch.zeros(L, dtype=torch.float64)
    sq = torch.zeros(L, dtype=torch.float64)
    total = torch.zeros(L, tc.cfg.d_model, dtype=torch.float64)
    fires = torch.zeros(L, n_feat, dtype=torch.long)
    n = 0
    for batch in batches:
        x, y = batch.mlp_in.to(device).float(), batch.mlp_out.to(device).float()
        if max_tokens is not None:
            x, y = x[: max_tokens - n], y[: max_tokens - n]
        out = tc(x)
        err += (out.recon - y).pow(2).sum((0, 2)).double().cpu()
        sq += y.pow(2).sum((0, 2)).double().cpu()
        total += y.sum(0).double().cpu()
        fires += (out.acts > 0).sum(0).cpu()
        n += x.shape[0]
        if max_tokens is not None and n >= max_tokens:
            break
    if n == 0:
        raise CltraceError("no evaluation tokens", hint="check the held-out store or --tokens")
    var = sq - total.pow(2).sum(1) / n  # Σ ||y - mean(y)||²
    nmse = (err / var.clamp_min(1e-12)).tolist()
    density = fires.double() / n  # [L, F]
    return ActivationMetrics(
        n,
        nmse,
        [1 - v for v in nmse],
        (fires.sum(1) / n).tolist(),
        (fires == 0).sum(1).tolist(),
        (fires > dense_frac * n).sum(1).tolist(),
        density.quantile(0.5, dim=1).tolist(),
        density.quantile(0.5).item(),
        n_feat,
        dense_frac,
    )


def replacement_patch(tc: Transcoder) -> Callable[[int, Tensor, Tensor], Tensor]:
    """fn(layer, mlp_in [B, n, d], mlp_out [B, n, d]) -> reconstruction, for
    `LoadedModel.patch_mlp_outputs`. Layers must come in order 0..L-1 within one forward:
    the closure keeps each layer's activations so later layers receive their CLT decoders'
    contributions. Position 0 keeps the real MLP output."""
    acts: list[Tensor] = []

    @torch.no_grad()
    def fn(layer: int, mlp_in: Tensor, mlp_out: Tensor) -> Tensor:
        if layer == 0:
            acts.clear()
        x = mlp_in.float()
        pre = x @ tc.encoder_weight(layer) + tc.encoder_bias(layer)
        acts.append(tc.activate_layer(pre, layer))
        recon = tc.b_dec[layer].expand_as(x).clone()  # normalised scale
        first = layer if tc.cfg.kind == "plt" else 0
        for src in range(first, layer + 1):
            W = tc.W_dec[src][:, layer - src if tc.cfg.kind == "clt" else 0]  # [F, d], no copy
            recon += acts[src] @ W
        recon /= tc.out_scale[layer]
        skip = tc.skip_weight(layer)  # None unless cfg.skip
        if skip is not None:
            recon += x @ skip
        recon[:, 0] = mlp_out[:, 0].float()
        return recon.to(mlp_out.dtype)

    return fn


def zero_patch(layer: int, mlp_in: Tensor, mlp_out: Tensor) -> Tensor:
    out = torch.zeros_like(mlp_out)
    out[:, 0] = mlp_out[:, 0]
    return out


@torch.no_grad()
def evaluate_replacement(tc: Transcoder, model, token_batches: Iterable[Tensor]) -> ReplacementMetrics:
    """Replacement-model metrics over batches of token ids [B, n] (`model`: a LoadedModel)."""
    check_transcoder(model, tc)
    sums = dict(agree=0.0, kl=0.0, ce_real=0.0, ce_rep=0.0, ce_zero=0.0)
    n = 0
    for tokens in token_batches:
        tokens = tokens.to(model.device)
        real = model.run(tokens).float()
        with model.patch_mlp_outputs(replacement_patch(tc)):
            rep = model.run(tokens).float()
        with model.patch_mlp_outputs(zero_patch):
            zero = model.run(tokens).float()
        real, rep, zero = real[:, 1:-1], rep[:, 1:-1], zero[:, 1:-1]  # positions 1.. predicting next
        labels = tokens[:, 2:]
        logp_real, logp_rep = real.log_softmax(-1), rep.log_softmax(-1)
        sums["agree"] += (real.argmax(-1) == rep.argmax(-1)).sum().item()
        sums["kl"] += (logp_real.exp() * (logp_real - logp_rep)).sum().item()
        for key, logits in (("ce_real", real), ("ce_rep", rep), ("ce_zero", zero)):
            sums[key] += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        n += labels.numel()
    if n == 0:
        raise CltraceError("no token sequences of length >= 3 to evaluate the replacement model on")
    ce = {k: sums[k] / n for k in ("ce_real", "ce_rep", "ce_zero")}
    recovered = (ce["ce_zero"] - ce["ce_rep"]) / max(ce["ce_zero"] - ce["ce_real"], 1e-9)
    return ReplacementMetrics(
        n, sums["agree"] / n, sums["kl"] / n, ce["ce_real"], ce["ce_rep"], ce["ce_zero"], recovered
    )


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def report(act: ActivationMetrics, rep: ReplacementMetrics | None = None) -> str:
    """A plain-text table of the metrics."""
    med = act.median_density or [float("nan")] * len(act.nmse)
    lines = [f"{'layer':>5} {'nmse':>7} {'fve':>7} {'L0':>8} {'dead':>6} {'dense':>6} {'med dens':>9}"]
    for l in range(len(act.nmse)):
        lines.append(
            f"{l:>5} {act.nmse[l]:>7.3f} {act.fve[l]:>7.3f} {act.l0[l]:>8.1f} "
            f"{act.dead[l]:>6} {act.dense[l]:>6} {med[l]:>9.2e}"
        )
    s = act.summary()
    lines.append(
        f"{'all':>5} {s['nmse']:>7.3f} {s['fve']:>7.3f} {s['l0']:>8.1f} "
        f"{s['dead']:>6} {s['dense']:>6} {_or_nan(s.get('median_density')):>9.2e}"
        f"   ({act.n_tokens:,} tokens)"
    )
    if "dead_share" in s:
        lines.append(
            f"features: {s['dead_share']:.1%} dead (never active), {s['dense_share']:.1%} dense "
            f"(active on > {act.dense_frac:.0%} of tokens), median density "
            f"{s['median_density']:.2e}, L0 {s['l0_share']:.2%} of the width"
        )
    if rep is not None:
        lines.append(
            f"replacement model on {rep.n_tokens:,} tokens: top-1 agreement "
            f"{rep.top1_agreement:.3f}, KL {rep.kl:.3f} nats, CE real {rep.ce_real:.3f} / "
            f"replacement {rep.ce_replacement:.3f} / zero-ablated {rep.ce_zero_ablation:.3f}, "
            f"CE loss recovered {rep.ce_recovered:.3f}"
        )
    return "\n".join(lines)


@dataclass
class EvalResult:
    """What `cltrace eval` measures and writes to eval.json."""

    activations: ActivationMetrics
    replacement: ReplacementMetrics | None  # None: not measured

    def to_dict(self) -> dict:
        return {
            "activations": asdict(self.activations),
            "replacement": asdict(self.replacement) if self.replacement else None,
        }


EVAL_CONTEXT_LEN = 128  # tokens per held-out context (BOS included)


def evaluate_on_text(
    tc: Transcoder,
    model: LoadedModel | None,
    *,
    tokens: int = 20_000,
    replacement_tokens: int = 2_000,
    split: Split = "heldout",
    text: list[str] | None = None,
    store: str | Path | None = None,
) -> EvalResult:
    """Activation metrics on `tokens` held-out tokens (read from an activation `store`, else
    harvested from the corpus `split` or the `text` files) and the replacement model's metrics on
    `replacement_tokens` tokens (0: skipped). `model` may be None only with a store and no
    replacement metrics. The model runs in float32: these are the exact model's metrics."""
    from cltrace.activations.harvest import HarvestConfig, iter_activation_batches, iter_contexts
    from cltrace.data.corpus import iter_documents

    if tokens < 1 or replacement_tokens < 0:
        raise CltraceError("--tokens must be positive and --replacement-tokens >= 0")
    hcfg = HarvestConfig(ctx_len=EVAL_CONTEXT_LEN, forward_dtype="float32")
    if store is not None:
        from cltrace.activations.store import ActivationStore

        batches = ActivationStore(store).iter_batches(1024, shuffle=False)
    else:
        assert model is not None, "harvesting needs the model"
        batches = iter_activation_batches(
            model, iter_documents(split, paths=text), hcfg, batch_tokens=1024, max_tokens=tokens
        )
    act = evaluate_activations(tc, batches, max_tokens=tokens)
    if not replacement_tokens:
        return EvalResult(act, None)
    assert model is not None, "the replacement metrics need the model"
    ctxs = iter_contexts(model, iter_documents(split, paths=text), hcfg)
    n_ctx = max(1, replacement_tokens // (hcfg.ctx_len - 2))
    full = [c for c in itertools.islice(ctxs, n_ctx) if len(c) == hcfg.ctx_len]
    token_batches = [torch.tensor(full[i : i + 8]) for i in range(0, len(full), 8)]
    if not token_batches:
        raise CltraceError(
            f"the text holds no full {hcfg.ctx_len}-token context for the replacement metrics",
            hint="give more text, or --replacement-tokens 0",
        )
    return EvalResult(act, evaluate_replacement(tc, model, token_batches))


__all__ = [
    "ActivationMetrics",
    "EvalResult",
    "ReplacementMetrics",
    "evaluate_activations",
    "evaluate_on_text",
    "evaluate_replacement",
    "replacement_patch",
    "zero_patch",
    "report",
]
