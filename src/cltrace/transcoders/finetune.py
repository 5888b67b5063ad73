"""End-to-end fine-tuning: the replacement model's next-token distribution as the objective.

MSE training weighs every layer's reconstruction error alike, but the replacement model
(every MLP output replaced by the transcoder's; `evaluate.py`) compounds them, and an error
along a direction the later layers read costs more than one they ignore. This stage runs the
language model with every MLP output (positions ≥ 1) replaced, differentiably, and minimises

    KL(p_real || p_replacement)                     nats per predicted position, averaged over
                                                    `positions` random positions per context
    + β · (1/L) Σ_t NMSE_t                          β = `mse_weight`

where NMSE_t is, with `mse_on="replacement"` (the default), ||ỹ̂_t - ỹ_t||² / ||ỹ_t||² on
the replacement run's own MLP inputs against the real MLP's output there (target detached;
no extra pass), and with `mse_on="real"`, `cltrace eval`'s normalised MSE on the clean run's
MLP inputs and outputs (over the batch's centred variance; the first `mse_contexts` contexts;
a second transcoder pass, ~25% slower). On the session CLT (README) neither held the
held-out NMSE in 10 minutes: 0.154 -> 0.159 (replacement, β = 1), 0.161 (β = 3), 0.157
(real, β = 1), while KL fell 1.80 -> 1.32, 1.46 and 1.36.

The parameters are the encoder, decoder and decoder bias (skip weights too), with the JumpReLU thresholds
frozen: a feature is active where pre > θ (no straight-through gradient), and gradients reach
the encoder through the active pairs' values. L0 and density move only as far as the encoder
does; `train_encoder=False` keeps the features exactly as they were (decoder only).
Gradients flow back through the frozen language model, so an error at layer 3 is charged for
what it does at the logits (end-to-end SAE training, fine-tuning variant).

Within one forward, at layer l's MLP (normalised scale, N = tokens at positions ≥ 1):
    pre_l   = x̃_l · W_enc_l + b_enc_l                       [N, F]
    pairs   = {(n, i): pre_l[n, i] > θ_l,i}
    pending[t] += Σ_pairs pre_l[n, i] · W_dec_{l→t}[i]    for every target t ≥ l (one sparse
                                                          decode of [N, T·d]: the numba kernels'
                                                          PairsDecode on a CPU, SparseDecode else)
    ŷ_l     = (pending[l] + b_dec_l (+ x̃_l W_skip_l)) / s_out_l
The clean run (no gradients) gives p_real at the same positions (`logits_to_keep`, so the
unembedding, most of a small model's FLOPs, runs on the sampled positions only).

The budget is wall time (`minutes`); the learning rate decays linearly to 0 over the last
`decay_frac` of it. Where the device has fast bf16 (`precision`), the encoder's product runs
in bf16 (as MSE training's autocast); the language model runs in its loaded dtype; the rest is
float32. bench/bench_finetune.py times the step.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from cltrace import hardware
from cltrace.errors import CltraceError
from cltrace.progress import progress
from cltrace.transcoders import kernels
from cltrace.transcoders.config import check_precision
from cltrace.transcoders.interface import check_transcoder
from cltrace.transcoders.kernel_step import PairsDecode, mask_pairs
from cltrace.transcoders.model import SparseDecode, Transcoder
from cltrace.transcoders.train import global_norm, resolve_precision, step_clipped

if TYPE_CHECKING:
    from cltrace.models.loading import LoadedModel


@dataclass
class FinetuneConfig:
    """How the end-to-end fine-tuning runs (saved in the run's finetune.json)."""

    minutes: float = 10.0  # wall-time budget of the loop
    max_steps: int | None = None  # stop earlier after this many steps (tests, benchmarks)
    lr: float = 3e-5  # peak learning rate (Adam) of the decoder and decoder bias
    encoder_lr_scale: float = 0.1  # the encoder's learning rate, relative: an Adam step moves every
    # encoder weight by about lr, which shifts a pre-activation by ~lr·Σ|x̃| (~0.05 at lr 1e-4 on
    # gemma-3-270m, thresholds ~0.5-1), so the full rate turns features on in bulk
    warmup_steps: int = 10  # linear warm-up of the learning rate
    decay_frac: float = 0.3  # linear decay to 0 over this last fraction of the budget
    batch_contexts: int = 8  # contexts per step (each step updates every decoder row: larger
    # batches spread that cost over more tokens)
    context_len: int = 128  # tokens per context, BOS included
    positions: int = 32  # predicted positions per context that enter the KL
    mse_weight: float = 1.0  # β: weight of the mean normalised MSE over layers
    mse_on: Literal["real", "replacement"] = "replacement"  # the MLP inputs of the MSE term: the
    # real run's (as `cltrace eval` measures it, centred variance) or the replacement run's own
    mse_contexts: int = 4  # with mse_on="real": contexts of the batch that enter the MSE term
    train_encoder: bool = True  # False: decoder (and decoder bias) only, features unchanged
    max_grad_norm: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # the encoder's product: bf16 where the
    # device has fast bf16 (as MSE training's autocast), else float32; the rest is float32
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise CltraceError(f"fine-tuning needs a positive budget in minutes, got {self.minutes}")
        if self.context_len < 3 or self.positions < 1 or self.batch_contexts < 1:
            raise CltraceError("fine-tuning needs context_len >= 3, positions >= 1, batch_contexts >= 1")
        if not self.lr > 0 or self.encoder_lr_scale < 0 or self.mse_weight < 0:
            raise CltraceError(
                f"fine-tuning needs lr > 0, encoder_lr_scale >= 0 and mse_weight >= 0, got {self.lr}, "
                f"{self.encoder_lr_scale}, {self.mse_weight}"
            )
        if not 0 <= self.decay_frac <= 1 or self.warmup_steps < 0 or self.mse_contexts < 1:
            raise CltraceError("fine-tuning needs 0 <= decay_frac <= 1, warmup_steps >= 0, mse_contexts >= 1")
        check_precision(self.precision)
        if self.mse_on not in ("real", "replacement"):
            raise CltraceError(f"mse_on must be 'real' or 'replacement', got {self.mse_on!r}")


@dataclass
class FinetuneStep:
    step: int
    tokens: int
    kl: float  # nats per sampled position
    nmse: float  # mean over layers, the loss term (inputs as cfg.mse_on says)
    lr: float


@dataclass
class FinetuneResult:
    steps: int
    tokens: int
    seconds: float
    history: list[FinetuneStep] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class ReplacementForward:
    """The differentiable MLP patch of one replacement-model forward (for
    `LoadedModel.patch_mlp_outputs`): layers arrive in order 0..L-1; position 0 keeps the real
    MLP output. After the forward, `nmse` holds each layer's normalised MSE (a tensor with
    gradients)."""

    def __init__(
        self, tc: Transcoder, *, train_encoder: bool = True, centred: bool = False, bf16_encoder: bool = False
    ):
        self.tc = tc
        self.train_encoder = train_encoder
        # the encoder's product in bfloat16 (float32 out; as MSE training runs it under bf16
        # autocast): the fine-tuning step's largest float32 matmuls where the CPU has fast bf16
        self.bf16_encoder = bf16_encoder
        # the decode by the numba kernels (kernel_step.PairsDecode) on a CPU, else SparseDecode
        self.kernels = tc.W_enc.device.type == "cpu" and tc.use_kernels and kernels.available()
        self.centred = centred  # normalise by the batch's centred variance (as `cltrace eval`), not ||y||²
        self.pending: list[Tensor | None] = []
        self.nmse: list[Tensor] = []
        self.layers: list[tuple[Tensor, ...]] = []  # W_enc, b_enc, b_dec (, W_skip) per layer

    def __call__(self, layer: int, mlp_in: Tensor, mlp_out: Tensor) -> Tensor:
        tc = self.tc
        L, d = tc.cfg.n_layers, tc.cfg.d_model
        if layer == 0:
            self.pending = [None] * L
            self.nmse = []
            # per-layer views taken once per forward: indexing the stacked [L, ...] parameters
            # per layer would make each layer's backward zero-fill and add a full-size gradient
            # (18 x 188 MB per step for W_enc at 18 x 4096); unbind's backward stacks them once
            self.layers = [tc.W_enc.unbind(0), tc.b_enc.unbind(0), tc.b_dec.unbind(0)]
            if tc.W_skip is not None:
                self.layers.append(tc.W_skip.unbind(0))
        W_enc, b_enc, b_dec = (p[layer] for p in self.layers[:3])
        B, n, _ = mlp_in.shape
        xn = mlp_in[:, 1:].reshape(-1, d).float() * tc.in_scale[layer]  # [N, d]
        N = xn.shape[0]
        if self.bf16_encoder:
            pre = (xn.to(torch.bfloat16) @ W_enc.to(torch.bfloat16)).float() + b_enc  # [N, F]
        else:
            pre = xn @ W_enc + b_enc  # [N, F]
        theta = tc.log_threshold[layer].detach().exp()
        active = pre.detach() > theta
        W = tc.W_dec[layer]  # [F, T, d]
        T = W.shape[1]
        if self.kernels:
            sel = mask_pairs(active)  # feature-major
            values = (pre if self.train_encoder else pre.detach())[sel.tok, sel.feat]
            out = PairsDecode.apply(values, W, sel, N, tc._grad_pool, ("finetune", layer))  # [N, T·d]
        else:
            tok, feat = active.nonzero(as_tuple=True)  # token-major
            values = pre[tok, feat] if self.train_encoder else pre.detach()[tok, feat]
            out = SparseDecode.apply(values, W.view(W.shape[0], -1), tok, feat, N, False)  # [N, T·d]
        # targets layer..layer+T-1 (a PLT: its own layer only); unbind, not slices: its
        # backward stacks the targets' gradients once instead of zero-filling [N, T·d] per slice
        for j, part in enumerate(out.view(N, T, d).unbind(1)):
            t = layer + j
            self.pending[t] = part if self.pending[t] is None else self.pending[t] + part
        own = self.pending[layer]
        assert own is not None, "layers must arrive in order 0..L-1"
        recon = own + b_dec  # normalised scale
        if tc.W_skip is not None:
            recon = recon + xn @ self.layers[3][layer]
        target = mlp_out[:, 1:].reshape(-1, d).detach().float() * tc.out_scale[layer]
        scale = (target - target.mean(0)) if self.centred else target
        self.nmse.append(
            (recon - target).pow(2).sum(-1).mean() / scale.pow(2).sum(-1).mean().clamp_min(1e-12)
        )
        raw = (recon / tc.out_scale[layer]).view(B, n - 1, d).to(mlp_out.dtype)
        return torch.cat([mlp_out[:, :1], raw], dim=1)


def _logits_at(model: LoadedModel, tokens: Tensor, positions: Tensor) -> Tensor:
    """Logits [B, P, V] at `positions` (sorted [P] indices), the unembedding on those only
    where the model's forward takes `logits_to_keep`."""
    forward = model.model.forward
    if "logits_to_keep" in inspect.signature(forward).parameters:
        return model.model(input_ids=tokens, use_cache=False, logits_to_keep=positions).logits
    return model.model(input_ids=tokens, use_cache=False).logits[:, positions]


class _RowwiseKL(torch.autograd.Function):
    """Σ_rows KL(softmax(real) || softmax(rep)) over [R, V] logits, a few rows at a time.

    The plain formula makes ~10 float32 passes over [R, V] (R = 256 sampled positions, V =
    262,144 for Gemma: 268 MB each). Here each chunk of rows (≤ `chunk_bytes` of float32) is
    read, converted and reduced while it is in cache, and the backward recomputes the chunk's
    softmaxes instead of keeping [R, V] float32 tensors: d/d rep = softmax(rep) -
    softmax(real), per row. bench/bench_finetune.py: 4% off a fine-tuning step (Sapphire
    Rapids; a profile that recorded shapes had overstated the KL's share)."""

    @staticmethod
    def forward(ctx, real: Tensor, rep: Tensor, rows: int) -> Tensor:  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=rep.device)
        for r, q in zip(real.split(rows), rep.split(rows)):
            logp = r.float().log_softmax(-1)
            total += (logp.exp() * (logp - q.float().log_softmax(-1))).sum()
        ctx.save_for_backward(real, rep)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        real, rep = ctx.saved_tensors
        out = torch.empty_like(rep)
        for r, q, o in zip(real.split(ctx.rows), rep.split(ctx.rows), out.split(ctx.rows)):
            o.copy_((q.float().softmax(-1) - r.float().softmax(-1)) * grad)
        return None, out, None


def kl_divergence(real_logits: Tensor, rep_logits: Tensor, *, chunk_bytes: int = 1 << 21) -> Tensor:
    """Mean over positions of KL(softmax(real) || softmax(rep)): [..., V] -> scalar (float32).
    Gradients reach `rep_logits` only (`real_logits` is the clean run's, a constant). On a GPU
    the rows go in one chunk; on a CPU in chunks of ≤ chunk_bytes of float32 (cache-sized)."""
    V = rep_logits.shape[-1]
    real, rep = real_logits.detach().reshape(-1, V), rep_logits.reshape(-1, V)
    rows = real.shape[0] if rep.device.type == "cuda" else max(1, chunk_bytes // (4 * V))
    return _RowwiseKL.apply(real, rep, rows) / max(real.shape[0], 1)


def finetune_params(tc: Transcoder, cfg: FinetuneConfig) -> list[dict]:
    """Adam parameter groups: the decoder side at cfg.lr, the encoder at a fraction of it."""
    decoder = [*tc.W_dec, tc.b_dec] + ([tc.W_skip] if tc.W_skip is not None else [])
    groups = [dict(params=decoder, lr_scale=1.0)]
    if cfg.train_encoder:
        groups.append(dict(params=[tc.W_enc, tc.b_enc], lr_scale=cfg.encoder_lr_scale))
    return groups


def lr_at(cfg: FinetuneConfig, step: int, elapsed: float) -> float:
    """Warm-up over the first steps, linear decay to 0 over the budget's last decay_frac."""
    budget = cfg.minutes * 60
    decay = min(1.0, max(0.0, (1 - elapsed / budget) / cfg.decay_frac)) if cfg.decay_frac else 1.0
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1)) * decay


def finetune(
    tc: Transcoder,
    model: LoadedModel,
    contexts: Iterable[list[int]],
    cfg: FinetuneConfig,
    *,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
) -> FinetuneResult:
    """Fine-tune `tc` in place on `contexts` (token-id lists of cfg.context_len; shorter ones are
    skipped) for cfg.minutes of wall time (or cfg.max_steps). Needs a JumpReLU transcoder."""
    if tc.cfg.activation != "jumprelu":
        raise CltraceError(
            f"end-to-end fine-tuning needs a JumpReLU transcoder, this one is {tc.cfg.activation}",
            hint="TopK and BatchTopK runs become JumpReLU at the end of training (jumprelu_after_topk)",
        )
    check_transcoder(model, tc)
    device = tc.b_dec.device
    groups = finetune_params(tc, cfg)
    params = [p for g in groups for p in g["params"]]
    for p in tc.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if device.type == "cpu":
        hardware.keep_freed_memory()  # steps reuse their gigabyte gradient buffers
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))
    gen = torch.Generator().manual_seed(cfg.seed)
    n_pred = cfg.context_len - 2  # positions 1..n-2 predict a next token the model saw
    P = min(cfg.positions, n_pred)
    full = (c for c in contexts if len(c) == cfg.context_len)
    batches = iter(lambda: list(itertools.islice(full, cfg.batch_contexts)), [])
    budget = cfg.minutes * 60
    history: list[FinetuneStep] = []
    bf16 = resolve_precision(cfg.precision, device) == torch.bfloat16
    patch = ReplacementForward(tc, train_encoder=cfg.train_encoder, bf16_encoder=bf16)
    on_real = ReplacementForward(tc, train_encoder=cfg.train_encoder, centred=True, bf16_encoder=bf16)
    tokens = step = 0
    bar = progress(total=None if cfg.max_steps is None else cfg.max_steps, desc="fine-tune (KL)", unit="step")
    t0 = clock()
    per_step = 0.0
    try:
        for batch in batches:
            elapsed = clock() - t0
            if elapsed + per_step > budget or (cfg.max_steps is not None and step >= cfg.max_steps):
                break
            ids = torch.tensor(batch, device=device)
            positions = 1 + torch.randperm(n_pred, generator=gen)[:P].sort().values.to(device)
            lr = lr_at(cfg, step, elapsed)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            ins: dict[int, Tensor] = {}
            outs: dict[int, Tensor] = {}
            keep = model.mlp_hooks(ins.__setitem__, outs.__setitem__) if cfg.mse_on == "real" else []
            with torch.no_grad(), model.hooks(keep):
                real = _logits_at(model, ids, positions)
            with model.patch_mlp_outputs(patch):
                rep = _logits_at(model, ids, positions)
            kl = kl_divergence(real, rep)
            if cfg.mse_on == "real":  # the real run's MLP inputs: the error `cltrace eval` measures
                m = cfg.mse_contexts
                for layer in range(tc.cfg.n_layers):
                    on_real(layer, ins[layer][:m], outs[layer][:m])
                nmse = torch.stack(on_real.nmse).mean()
            else:
                nmse = torch.stack(patch.nmse).mean()
            loss = kl + cfg.mse_weight * nmse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = global_norm([p.grad for p in params if p.grad is not None])
            step_clipped(opt, tc, norm, cfg.max_grad_norm)
            for fwd in (patch, on_real):  # drop the step's graph
                fwd.pending, fwd.nmse, fwd.layers = [], [], []
            step += 1
            tokens += ids.numel()
            per_step = (clock() - t0) / step
            history.append(FinetuneStep(step, tokens, kl.item(), nmse.item(), lr))
            bar.update(1)
            bar.set_postfix(
                kl=f"{kl.item():.3f}", nmse=f"{nmse.item():.3f}", tok_s=f"{tokens / (clock() - t0):.0f}"
            )
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
    seconds = clock() - t0
    if not step:
        raise CltraceError(
            f"no full {cfg.context_len}-token context to fine-tune on",
            hint="give more text or a shorter context",
        )
    first = history[: max(1, len(history) // 10)]
    last = history[-max(1, len(history) // 10) :]
    mean = lambda hs, key: sum(getattr(h, key) for h in hs) / len(hs)  # noqa: E731
    log(
        f"fine-tuned (KL) {step} steps, {tokens:,} tokens in {seconds / 60:.1f} min "
        f"({tokens / seconds:,.0f} tokens/s): training KL {mean(first, 'kl'):.3f} -> {mean(last, 'kl'):.3f}, "
        f"NMSE {mean(first, 'nmse'):.3f} -> {mean(last, 'nmse'):.3f} (first and last tenth of the steps)"
    )
    return FinetuneResult(step, tokens, seconds, history)


def corpus_contexts(
    model: LoadedModel, cfg: FinetuneConfig, split: str = "train", text: list[str] | None = None
) -> Iterator[list[int]]:
    """Packed contexts of cfg.context_len tokens from the corpus `split`, or from the user's
    `text` files, folders or JSONL."""
    from cltrace.activations.harvest import HarvestConfig, iter_contexts
    from cltrace.data.corpus import iter_documents

    hcfg = HarvestConfig(ctx_len=cfg.context_len, seed=cfg.seed)
    documents = iter_documents(split, paths=text)  # pyright: ignore[reportArgumentType]
    return iter_contexts(model, documents, hcfg)


__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneStep",
    "ReplacementForward",
    "corpus_contexts",
    "finetune",
    "finetune_params",
    "lr_at",
    "kl_divergence",
]
