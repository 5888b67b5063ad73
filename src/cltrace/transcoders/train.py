"""Training loop: batches of (MLP input, MLP output) -> a trained transcoder.

`Trainer.fit(batches)` consumes any iterable of objects with `.mlp_in, .mlp_out: [B, L, d]`
(an `ActivationBatch` from the harvest or a store, or synthetic data). Per step:

    loss = Transcoder.loss(x, y, λ_S(step), λ_P)        bf16 autocast where the hardware has it
    clip global grad norm; AdamW (fused where available); LR warm-up, constant, linear decay

λ_S ramps linearly from 0 over `lambda_s_warmup_frac` of the steps. With `auxk_alpha` > 0, the
features dead for `dead_window_tokens` get the AuxK loss (Transcoder.aux_loss); with
`resample_every_tokens` > 0 they are re-initialised towards badly reconstructed tokens
(resample.py), and with `balance_rate` > 0 the selection is load-balanced (`_balance`).

Wall-time budgets (`minutes`): the loop times its steps (data loading included) and re-sizes
the step budget so that the steps, the finishing steps and the final save end within the
budget; `tokens` is then an upper bound. Once the learning-rate decay has begun the budget can
only shrink (a machine that slows down mid-run gets a steeper decay that still ends at 0, not
a run cut off at a high learning rate). A step that would overrun the budget is not started.
The first batches (up to `init_tokens`) set the normalisation scalars and b_enc
(`Transcoder.init_from_sample`) and are then trained on as usual.

Checkpoints (`RUN/ckpt-{step}/`, see checkpoint.py) hold weights, AdamW state, RNG state,
the data position (steps taken = batches consumed) and the dead-feature clock; the pointer
file `RUN/checkpoint.json` is replaced atomically after a checkpoint is complete, so a
kill -9 at any moment leaves a usable one. `fit(..., resume=True)` reloads it and skips the
batches already consumed, so the run follows the same trajectory as an uninterrupted one
(given the same, deterministic batch stream).
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cltrace import hardware
from cltrace.errors import CltraceError
from cltrace.hardware import cpu_has_fast_bf16, forced_fp32
from cltrace.progress import progress
from cltrace.transcoders.checkpoint import atomic_write_json, load_checkpoint, read_json, save_checkpoint
from cltrace.transcoders.config import TrainConfig
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.resample import resample_dead

POINTER = "checkpoint.json"
# settings of the closed-form steps after training: they may change on --resume (the
# trajectory does not depend on them), e.g. to redo the finishing of a finished run
FINISHING_FIELDS = frozenset(
    {"refit_tokens", "refit_ridge", "jumprelu_after_topk", "finetune_minutes", "finetune_lr"}
)
# how often a run checkpoints and logs: may change on --resume too (no effect on the trajectory)
PACING_FIELDS = frozenset({"checkpoint_every", "checkpoint_minutes", "log_every"})


class StepMetrics(NamedTuple):
    step: int
    tokens: int  # tokens seen after this step
    loss: float
    mse: float  # Σ_l ||ŷ-y||² per token, normalised scale
    nmse: float  # Σ ||ŷ-y||² / Σ ||y - mean(y)||² over all layers
    l0: float  # active features per token per layer
    sparsity: float
    preact: float
    lr: float
    lambda_s: float
    aux: float = 0.0  # AuxK term


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32)."""
    if precision == "fp32" or (precision == "auto" and forced_fp32()):
        return None
    if precision == "bf16" or device.type == "cuda" or cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def _adamw(params: list[nn.Parameter], cfg: TrainConfig, fused: bool | None) -> torch.optim.AdamW:
    """AdamW with the config's hyper-parameters (fused=None: torch's default implementation)."""
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, fused=fused
    )


def make_optimizer(tc: Transcoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in tc.parameters() if p.requires_grad]
    try:
        return _adamw(params, cfg, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW not built for this device
        return _adamw(params, cfg, fused=None)


def lr_at(cfg: TrainConfig, step: int, n_steps: int | None = None) -> float:
    """Linear warm-up, constant, linear decay to 0 over the last lr_decay_frac of the
    `n_steps` (default: the config's) steps."""
    n = cfg.n_steps if n_steps is None else n_steps
    warm, decay = cfg.lr_warmup_frac * n, cfg.lr_decay_frac * n
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    if decay and step >= n - decay:
        return cfg.lr * max(0.0, (n - step) / decay)
    return cfg.lr


def lambda_s_at(cfg: TrainConfig, step: int, n_steps: int | None = None) -> float:
    ramp = cfg.lambda_s_warmup_frac * (cfg.n_steps if n_steps is None else n_steps)
    return cfg.lambda_s * (min(1.0, step / ramp) if ramp else 1.0)


def global_norm(tensors: list[Tensor], chunk: int = 1 << 20) -> Tensor:
    """The 2-norm of all `tensors` together (float32). On CPU as sums of BLAS dot products over
    1M-element chunks: 63 ms against vector_norm's 110 ms over the 496M gradients of an
    18 x 4096 CLT (Sapphire Rapids, 2 threads), and closer to the float64 value (vector_norm
    of each tensor was 0.2% off there, the chunked sum within 1e-7). Elsewhere vector_norm."""
    if not tensors:
        return torch.zeros(())
    if tensors[0].device.type != "cpu":
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        flat = t.detach().float().reshape(-1)
        for c in flat.split(chunk):
            total += torch.dot(c, c)
    return total.sqrt().float()


def clip_gradients(optimizer: torch.optim.Optimizer, tc: nn.Module, scale: Tensor) -> None:
    """Multiply every gradient by `scale` before the next optimizer step. A fused AdamW does
    it as it reads the gradients (its grad_scale divisor, the protocol of torch's GradScaler):
    no separate pass over them, 52 ms of an 18 x 4096 CLT's step (Sapphire Rapids, 2 cores),
    same update to float32 rounding. Call `unscaled` after the step."""
    if optimizer.defaults.get("fused"):
        optimizer.grad_scale = (1 / scale).reshape(()).float()  # pyright: ignore[reportAttributeAccessIssue]
        return
    # torch's stubs do not re-export the foreach kernels (clip_grad_norm_ uses the same one)
    torch._foreach_mul_(  # pyright: ignore[reportPrivateImportUsage]
        [p.grad for p in tc.parameters() if p.grad is not None], scale
    )


def unscaled(optimizer: torch.optim.Optimizer) -> None:
    """Drop a grad_scale left by `clip_gradients` once the step used it."""
    if getattr(optimizer, "grad_scale", None) is not None:
        optimizer.grad_scale = None  # pyright: ignore[reportAttributeAccessIssue]


def step_clipped(
    optimizer: torch.optim.Optimizer, tc: nn.Module, norm: Tensor | None, max_norm: float | None
) -> None:
    """One optimizer step, the gradients (global norm `norm`) scaled down to `max_norm` first
    where they exceed it (`clip_gradients`; no pass when under the limit or max_norm is None)."""
    if max_norm is not None and norm is not None and bool(norm > max_norm):
        clip_gradients(optimizer, tc, max_norm / (norm + 1e-6))
    optimizer.step()
    unscaled(optimizer)


class Distributed:
    """What the trainer needs from a parallel setup (see distributed.py); the default is
    one process: nothing to reduce."""

    rank = 0
    is_main = True
    data_parallel = 1  # ranks that split each batch between them

    def sum_over_batch(self, counts: Tensor) -> Tensor:  # per-feature counts over the global batch
        return counts

    def shard(self, tc: Transcoder) -> Transcoder:  # this rank's part of a full transcoder
        return tc

    def local_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x, y

    def reduce_partial(self, recon: Tensor) -> Tensor:  # sum of feature shards' decodes
        return recon

    def sync_grads(self, tc: Transcoder) -> None:
        pass

    def grad_norm(self, tc: Transcoder) -> Tensor:
        return global_norm([p.grad for p in tc.parameters() if p.grad is not None])

    def sum_features(self, value: Tensor) -> Tensor:  # sum a per-feature-shard scalar
        return value

    def checkpoint_dir(self, run_dir: Path, step: int) -> Path:
        return run_dir / f"ckpt-{step:08d}"

    def barrier(self) -> None:
        pass

    def full_transcoder(self, tc: Transcoder) -> Transcoder | None:
        return tc


@dataclass
class TrainResult:
    transcoder: Transcoder
    history: list[StepMetrics]
    dead: int  # features dead at the end
    tokens_per_s: float
    tokens: int = 0  # training tokens seen
    seconds: float = 0.0  # wall time of fit() in this process (with a budget: of the whole run)


class Trainer:
    """Trains `tc` with `cfg`; writes checkpoints and metrics into `run_dir` when given."""

    def __init__(
        self,
        tc: Transcoder,
        cfg: TrainConfig,
        run_dir: str | Path | None = None,
        dist: Distributed | None = None,
        log: Callable[[str], None] = print,
    ):
        self.tc, self.cfg, self.dist = tc, cfg, dist or Distributed()
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.device = next(tc.parameters()).device
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.optimizer = make_optimizer(tc, cfg)
        self.step = 0
        self.tokens = 0
        self.initialised = False
        L, n_feat = tc.cfg.n_layers, tc.cfg.n_features
        self.last_active = torch.zeros(L, n_feat, dtype=torch.long, device=self.device)
        self.n_dead = 0
        self.n_resampled = 0  # features resampled so far (resample.py)
        self.n_steps = cfg.n_steps  # the step budget (re-sized under a wall-time budget)
        self.elapsed_before = 0.0  # seconds of earlier processes of this run (resume)
        self.save_seconds = 0.0  # duration of the last checkpoint save
        self.saved_step = -1  # step of the last checkpoint (this process)
        self.t_saved = time.perf_counter()  # when it was written (or the trainer made)
        self._t_fit = time.perf_counter()  # when fit() began
        self.log = log if self.dist.is_main else (lambda _msg: None)

    # ---- one step ----

    def train_step(self, x: Tensor, y: Tensor) -> StepMetrics:
        cfg, tc = self.cfg, self.tc
        # stored activations may be bf16; the master copy of the math is float32
        x, y = self.dist.local_batch(x.to(self.device, torch.float32), y.to(self.device, torch.float32))
        lr, lam = lr_at(cfg, self.step, self.n_steps), lambda_s_at(cfg, self.step, self.n_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        ):
            out = tc.loss(
                x,
                y,
                lambda_s=lam,
                lambda_p=cfg.lambda_p,
                c=cfg.sparsity_c,
                reduce=self.dist.reduce_partial,
                dead=self._aux_dead(),
                auxk=self.aux_k,
                auxk_alpha=cfg.auxk_alpha,
            )
        out.loss.backward()
        self.dist.sync_grads(tc)
        norm = self.dist.grad_norm(tc) if cfg.grad_clip is not None else None
        step_clipped(self.optimizer, tc, norm, cfg.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.normalize_decoder:
            tc.normalize_decoder_()
        self.step += 1
        self.tokens += x.shape[0]
        # data-parallel ranks agree on which features fired, so their dead-feature clocks and
        # selection biases stay identical
        counts = self.dist.sum_over_batch(out.counts)
        metrics = self._metrics(out, x.shape[0], lr, lam, counts)  # (updates last_active)
        if cfg.balance_rate and tc.cfg.activation != "jumprelu":
            self._balance(counts, x.shape[0] * self.dist.data_parallel)
        if self._resample_due(x.shape[0]):
            self._resample(x, out)
        return metrics

    def _resample_due(self, n_tokens: int) -> bool:
        """A resampling round when this step crossed a multiple of resample_every_tokens,
        before `resample_until` of the steps (default: the learning-rate decay; the last
        features settle without new ones)."""
        every = self.cfg.resample_every_tokens
        if not every or self.tc.cfg.activation == "jumprelu":
            return False
        if self.dist.data_parallel > 1:  # ranks hold different tokens: they would diverge
            return False
        crossed = self.tokens // every > (self.tokens - n_tokens) // every
        until = self.cfg.resample_until
        return crossed and self.step < self.n_steps * (1 - self.cfg.lr_decay_frac if until is None else until)

    @torch.no_grad()
    def _resample(self, x: Tensor, out) -> None:
        """Resample the dead features (resample.py) on this step's batch; they restart their
        dead-feature clock and selection bias."""
        dead = self.dead_features()
        if not bool(dead.any()):
            return
        gen = torch.Generator(device=x.device).manual_seed(self.cfg.seed * 1_000_003 + self.step)
        xn = self.tc._normalise(x, self.tc.in_scale)
        result = resample_dead(self.tc, self.optimizer, dead, xn, out.target - out.recon, gen)
        self.last_active[result.resampled] = self.tokens
        self.tc.select_bias[result.resampled] = 0.0
        self.n_resampled += result.total
        self.log(f"step {self.step}: resampled {result.total} dead features; per layer {result.per_layer}")

    @torch.no_grad()
    def _balance(self, counts: Tensor, n_tokens: int) -> None:
        """Load balancing of the selection, without a loss (as in auxiliary-loss-free MoE
        routing): starved features' selection bias rises, too dense features' falls."""
        cfg = self.cfg
        starved = (self.tokens - self.last_active) >= cfg.balance_window_tokens
        dense = counts > cfg.balance_max_density * n_tokens
        self.tc.select_bias.add_(cfg.balance_rate * (starved.float() - dense.float()))
        # bounded: a feature that is never positive gains nothing from more, and would end
        # with a threshold of ~0 after the JumpReLU conversion
        self.tc.select_bias.clamp_(-cfg.balance_max_bias, cfg.balance_max_bias)

    @property
    def aux_k(self) -> int:
        """k_aux of the AuxK loss: the config's, else 2·topk, else d_model / 2 (sparsify's)."""
        if self.cfg.auxk is not None:
            return self.cfg.auxk
        return 2 * self.cfg.topk if self.cfg.topk else self.tc.cfg.d_model // 2

    def _aux_dead(self) -> Tensor | None:
        return self.dead_features() if self.cfg.auxk_alpha else None

    @torch.no_grad()
    def _metrics(self, out, n_tokens: int, lr: float, lam: float, counts: Tensor) -> StepMetrics:
        fired = counts > 0  # [L, F], over the global batch
        self.last_active[fired] = self.tokens
        var = (out.target - out.target.mean(dim=1, keepdim=True)).pow(2).sum()
        err = (out.recon - out.target).pow(2).sum()
        l0 = self.dist.sum_features(out.counts.sum().float()) / (n_tokens * self.tc.cfg.n_layers)
        spars = self.dist.sum_features(out.sparsity.detach().float())
        preact = self.dist.sum_features(out.preact.detach().float())
        aux = out.aux.item()
        loss = (
            out.mse.item()
            + lam * spars.item()
            + self.cfg.lambda_p * preact.item()
            + self.cfg.auxk_alpha * aux
        )
        return StepMetrics(
            self.step,
            self.tokens,
            loss,
            out.mse.item(),
            (err / var).item(),
            l0.item(),
            spars.item(),
            preact.item(),
            lr,
            lam,
            aux,
        )

    def dead_features(self) -> Tensor:
        """[L, F] bool: silent for the last dead_window_tokens (only once that many were seen)."""
        if self.tokens < self.cfg.dead_window_tokens:
            return torch.zeros_like(self.last_active, dtype=torch.bool)
        return self.tokens - self.last_active >= self.cfg.dead_window_tokens

    def _report_dead(self) -> None:
        dead = self.dead_features()
        n = int(self.dist.sum_features(dead.sum()).item())
        if n > self.n_dead:
            per_layer = self.dist.sum_features(dead.sum(1))
            self.log(
                f"step {self.step}: {n} dead features (never active in the last "
                f"{self.cfg.dead_window_tokens:,} tokens); per layer {per_layer.tolist()}"
            )
        self.n_dead = n

    # ---- the loop ----

    def fit(self, batches: Iterable, *, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        t_start = self._t_fit = self.t_saved = time.perf_counter()
        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # metrics may come before a checkpoint
        if cfg.resample_every_tokens and self.dist.data_parallel > 1:
            self.log("note: resampling of dead features runs without data parallelism only; skipped")
        if self.device.type == "cpu":
            hardware.keep_freed_memory()  # steps reuse their freed buffers (no page faults)
        it: Iterator = iter(batches)
        if resume and self._resume():
            for _ in itertools.islice(it, self.step):  # data position: skip consumed batches
                pass
        if not self.initialised:
            it = self._init_from(it)
        history: list[StepMetrics] = []
        bar = progress(
            total=self.n_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=None if self.dist.is_main else True,
        )
        t0, tokens0, step0 = time.perf_counter(), self.tokens, self.step
        try:
            while self.step < self.n_steps:  # fetch no batch beyond the budget: the
                if not self._time_left(t_start, t0, step0, bar):  # finishing steps read the next ones
                    break
                batch = next(it, None)
                if batch is None:
                    break
                m = self.train_step(batch.mlp_in, batch.mlp_out)
                history.append(m)
                rate = (self.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{m.loss:.3g}",
                    nmse=f"{m.nmse:.3f}",
                    l0=f"{m.l0:.1f}",
                    tok_s=f"{rate:.0f}",
                    refresh=False,
                )
                if self.step % cfg.log_every == 0 or self.step == self.n_steps:
                    self._log_metrics(m, rate)
                if self._checkpoint_due():
                    self.save_checkpoint()
        except KeyboardInterrupt:  # Ctrl-C: keep the steps since the last checkpoint
            self._checkpoint_on_interrupt()
            raise
        finally:
            bar.close()
        if self.step < self.n_steps:
            self.log(f"note: the data ran out after {self.step} of {self.n_steps} steps")
        if self.step and self.saved_step != self.step:
            self.save_checkpoint()
        rate = (self.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
        if self.tokens == tokens0 and self.elapsed_before:  # resumed with nothing left to train:
            rate = self.tokens / self.elapsed_before  # the earlier processes' rate, not 0
        if self.step >= self.n_steps and (cfg.refit_tokens or cfg.jumprelu_after_topk):
            self._finish(it)
        self._save_final()
        seconds = self.elapsed_before + time.perf_counter() - t_start
        if cfg.minutes is not None:
            self.log(
                f"wall-time budget {cfg.minutes:g} min: trained {self.step} steps, "
                f"{self.tokens:,} tokens "
                f"({self.tc.cfg.n_layers} x {self.tc.cfg.n_features} {self.tc.cfg.kind.upper()}) "
                f"in {seconds / 60:.1f} min at {rate:,.0f} tokens/s"
            )
        return TrainResult(self.tc, history, self.n_dead, rate, self.tokens, seconds)

    def _time_left(self, t_start: float, t0: float, step0: int, bar) -> bool:
        """Under a wall-time budget: re-size the step budget from the measured step time (only
        down once the learning-rate decay has begun) and say whether one more step fits."""
        if self.cfg.minutes is None or self.step == step0:
            return True
        now = time.perf_counter()
        budget = self.cfg.minutes * 60 - self.elapsed_before - (now - t_start)
        per_step = (now - t0) / (self.step - step0)
        # the finishing steps read about init_tokens and encode them; the final save ~ a checkpoint
        reserve = (
            per_step * (1 + self.cfg.init_tokens / self.cfg.batch_size * self.cfg.jumprelu_after_topk)
            + self.save_seconds
        )
        fit = self.step + int(max(0.0, budget - reserve) // per_step)
        decaying = self.step >= self.n_steps * (1 - self.cfg.lr_decay_frac)
        # before the decay the budget follows the measured rate both ways; during it, it only
        # shrinks (the machine slowed down), which steepens the decay so that it still ends at 0
        self.n_steps = max(self.step, min(self.n_steps if decaying else self.cfg.n_steps, fit))
        bar.total = self.n_steps
        if budget - reserve >= per_step:
            return True
        if self.step < self.n_steps:
            self.log(
                f"note: the wall-time budget leaves no time for step {self.step + 1}; ending at "
                f"{self.step} of {self.n_steps} planned steps"
            )
            self.n_steps = self.step
        return False

    def _finish(self, it: Iterator) -> None:
        """Closed-form steps on the next batches (refit.py): TopK -> JumpReLU, then the
        least-squares decoder. Single-process training only."""
        from cltrace.transcoders.refit import refit_decoder, topk_to_jumprelu

        if type(self.dist) is not Distributed:
            self.log("note: the closed-form finishing steps run in single-process training only; skipped")
            return
        if self.cfg.jumprelu_after_topk and self.tc.cfg.activation != "jumprelu":
            sample = _take_tokens(it, self.cfg.init_tokens)
            if not sample:
                self.log("note: no data left to turn TopK into JumpReLU; the transcoder stays TopK")
                return
            x = torch.cat([b.mlp_in for b in sample])[: self.cfg.init_tokens]
            theta = topk_to_jumprelu(self.tc, x)
            self.log(
                f"TopK -> JumpReLU on {x.shape[0]:,} tokens: per-layer thresholds "
                + ", ".join(f"{t:.3g}" for t in theta)
            )
        first = next(it, None) if self.cfg.refit_tokens else None
        if self.cfg.refit_tokens and first is None:
            self.log("note: no data left for the decoder refit; skipped")
        elif self.cfg.refit_tokens:
            it = itertools.chain([first], it)
            n = refit_decoder(self.tc, it, max_tokens=self.cfg.refit_tokens, ridge=self.cfg.refit_ridge)
            self.log(f"decoder refit by least squares on {n:,} tokens")

    def _init_from(self, it: Iterator) -> Iterator:
        """Peek at batches until init_tokens, initialise from them, hand them back."""
        seen = _take_tokens(it, self.cfg.init_tokens)
        if not seen:
            raise CltraceError("no training data: the batch stream is empty")
        x = torch.cat([b.mlp_in for b in seen])[: self.cfg.init_tokens].to(self.device)
        y = torch.cat([b.mlp_out for b in seen])[: self.cfg.init_tokens].to(self.device)
        self.tc.init_from_sample(x, y, centre_targets=self.cfg.centre_targets)
        self.initialised = True
        return itertools.chain(seen, it)

    def _log_metrics(self, m: StepMetrics, rate: float) -> None:
        self._report_dead()
        if self.run_dir is None or not self.dist.is_main:
            return
        record = dict(m._asdict(), tokens_per_s=rate, dead=self.n_dead)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # ---- checkpoints ----

    def _checkpoint_due(self) -> bool:
        """Every checkpoint_every steps, and checkpoint_minutes after the last checkpoint."""
        every, minutes = self.cfg.checkpoint_every, self.cfg.checkpoint_minutes
        if every and self.step % every == 0:
            return True
        return bool(minutes) and time.perf_counter() - self.t_saved >= 60 * minutes

    def save_checkpoint(self) -> None:
        self.saved_step, self.t_saved = self.step, time.perf_counter()
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        directory = self.dist.checkpoint_dir(self.run_dir, self.step)
        state = dict(
            step=self.step,
            tokens=self.tokens,
            train_config=self.cfg.to_dict(),
            data_position=dict(batches=self.step, tokens=self.tokens),
            n_dead=self.n_dead,
            n_resampled=self.n_resampled,
            n_steps=self.n_steps,
            elapsed_s=self.elapsed_before + time.perf_counter() - self._t_fit,
        )
        save_checkpoint(
            directory,
            self.tc,
            self.optimizer,
            state,
            extra={"last_active": self.last_active.cpu(), "select_bias": self.tc.select_bias.cpu()},
        )
        self.dist.barrier()  # every shard is complete
        if self.dist.is_main:
            old = _pointer(self.run_dir)
            atomic_write_json({"step": self.step, "dir": f"ckpt-{self.step:08d}"}, self.run_dir / POINTER)
            if old is not None and old != self.step:
                shutil.rmtree(self.run_dir / f"ckpt-{old:08d}", ignore_errors=True)
        self.save_seconds = time.perf_counter() - t

    def _checkpoint_on_interrupt(self) -> None:
        """A checkpoint at the current step (single-process runs: other ranks may never reach
        the checkpoint's barrier), so that `--resume` continues from where Ctrl-C stopped."""
        if self.run_dir is None or not self.step or type(self.dist) is not Distributed:
            return
        if _pointer(self.run_dir) != self.step:
            self.save_checkpoint()
        self.log(f"interrupted: checkpoint saved at step {self.step}; rerun with --resume to continue")

    def _resume(self) -> bool:
        """Load the latest complete checkpoint; False when there is none."""
        run_dir = self.run_dir
        step = None if run_dir is None else _pointer(run_dir)
        if run_dir is None or step is None:
            self.log("no checkpoint to resume from: starting fresh")
            return False
        directory = self.dist.checkpoint_dir(run_dir, step)
        state, extra = load_checkpoint(directory, self.tc, self.optimizer)
        saved = TrainConfig.from_dict(state["train_config"])
        diff = {
            k: (v, getattr(self.cfg, k))
            for k, v in saved.to_dict().items()
            if getattr(self.cfg, k) != v and k not in FINISHING_FIELDS | PACING_FIELDS
        }
        if diff:
            raise CltraceError(
                f"{directory}: the checkpoint was trained with other settings {diff}",
                hint="resume with the same options, or choose a new --out",
            )
        self.step, self.tokens, self.n_dead = state["step"], state["tokens"], state["n_dead"]
        self.saved_step = self.step  # the checkpoint just loaded: not rewritten in place
        self.n_steps = state.get("n_steps", self.cfg.n_steps)
        self.n_resampled = state.get("n_resampled", 0)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.last_active = extra["last_active"].to(self.device)
        if "select_bias" in extra:
            self.tc.select_bias.copy_(extra["select_bias"])
        self.initialised = True
        self.log(f"resumed from step {self.step} ({self.tokens:,} tokens)")
        return True

    def _save_final(self) -> None:
        full = self.dist.full_transcoder(self.tc)
        if self.run_dir is None or full is None:
            return
        full.save(self.run_dir / "transcoder")
        atomic_write_json(self.cfg.to_dict(), self.run_dir / "train_config.json")


def _take_tokens(it: Iterator, n_tokens: int) -> list:
    """The next batches of `it` until they hold at least `n_tokens` tokens (fewer if it ends)."""
    taken, n = [], 0
    while n < n_tokens:
        batch = next(it, None)
        if batch is None:
            break
        taken.append(batch)
        n += batch.mlp_in.shape[0]
    return taken


def _pointer(run_dir: Path) -> int | None:
    path = run_dir / POINTER
    if not path.exists():
        return None
    return int(read_json(path)["step"])


def train(
    cfg: TrainConfig,
    batches: Iterable,
    n_layers: int,
    d_model: int,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    dist: Distributed | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Build a transcoder for (n_layers, d_model) from `cfg` and train it on `batches`
    (under `dist`, this rank's shard of it; every rank iterates the same global batches)."""
    dist = dist or Distributed()
    torch.manual_seed(cfg.seed)
    tc = dist.shard(Transcoder(cfg.transcoder_config(n_layers, d_model)).to(device))
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(tc, cfg, run_dir, dist=dist, log=log).fit(batches, resume=resume)


__all__ = [
    "Trainer",
    "TrainResult",
    "StepMetrics",
    "Distributed",
    "train",
    "lr_at",
    "lambda_s_at",
    "synthetic_batches",
    "SyntheticBatch",
    "resolve_precision",
    "make_optimizer",
]


class SyntheticBatch(NamedTuple):
    mlp_in: Tensor  # [B, L, d]
    mlp_out: Tensor  # [B, L, d]


def synthetic_batches(
    n_layers: int,
    d_model: int,
    batch_size: int,
    n_batches: int | None = None,
    n_teacher: int = 64,
    active: int = 4,
    seed: int = 0,
) -> Iterator[SyntheticBatch]:
    """A sparse linear teacher: x_l = codes_l · D_l + noise, y_t = Σ_{l ≤ t} codes_l · E_{l→t},
    with `active` of `n_teacher` codes on per token and layer. Deterministic in `seed`;
    a CLT with >= n_teacher features per layer can fit it almost exactly."""
    gen = torch.Generator().manual_seed(seed)
    L, d = n_layers, d_model
    D = torch.randn(L, n_teacher, d, generator=gen) / d**0.5 * 4
    E = torch.randn(L, n_teacher, L, d, generator=gen) / (d * L) ** 0.5 * 4
    E = E * torch.triu(torch.ones(L, L))[:, None, :, None]  # l -> t only for t >= l
    for _ in itertools.count() if n_batches is None else range(n_batches):
        scores = torch.rand(batch_size, L, n_teacher, generator=gen)
        keep = scores >= scores.topk(active, dim=-1).values[..., -1:]
        codes = keep * (1 + torch.rand(batch_size, L, n_teacher, generator=gen))
        x = torch.einsum("blk,lkd->bld", codes, D) + 0.01 * torch.randn(batch_size, L, d, generator=gen)
        y = torch.einsum("blk,lktd->btd", codes, E)
        yield SyntheticBatch(x, y)
