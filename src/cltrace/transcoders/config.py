"""Typed configs: `TranscoderConfig` (the architecture, saved beside the weights) and
`TrainConfig` (how a run is trained) with named presets.

Costs of the presets are measured on the 2-core Sapphire Rapids CPU (bf16 AMX); see
bench/bench_train.py and the README's table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from cltrace.errors import CltraceError
from cltrace.models import DEFAULT_MODEL


def _from_dict(cls, data: dict[str, Any], what: str):
    """Build a dataclass from a dict, rejecting unknown keys with a CltraceError."""
    if not isinstance(data, dict):
        raise CltraceError(f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CltraceError(f"{what}: unknown field(s) {unknown}", hint="was it written by a newer cltrace?")
    try:
        return cls(**data)
    except TypeError as err:
        raise CltraceError(f"{what}: {err}") from None


@dataclass
class TranscoderConfig:
    """Architecture of a transcoder; saved as config.json next to the weights."""

    n_layers: int  # L: layers of the language model
    d_model: int  # d: residual width
    n_features: int  # F: features per layer
    kind: Literal["clt", "plt"] = "clt"  # cross-layer or per-layer decoders
    skip: bool = False  # add a linear skip W_skip x_l (skip transcoder)
    activation: Literal["jumprelu", "topk", "batchtopk"] = "jumprelu"
    topk: int | None = None  # k per layer and token (TopK; BatchTopK: on average)
    bandwidth: float = 1.0  # STE rectangle-kernel width ε (normalised scale)
    init_threshold: float = 0.03  # θ at initialisation (normalised scale)
    model_name: str | None = None  # the language model it was trained on
    hook_in: str = "mlp_in"  # what it reads (MLP input, after pre-norm)
    hook_out: str = "mlp_out"  # what it writes (MLP output)

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CltraceError(f"TranscoderConfig.{name} must be a positive int, got {value!r}")
        if self.kind not in ("clt", "plt"):
            raise CltraceError(f"TranscoderConfig.kind must be 'clt' or 'plt', got {self.kind!r}")
        if self.activation not in ("jumprelu", "topk", "batchtopk"):
            raise CltraceError(
                f"TranscoderConfig.activation must be 'jumprelu', 'topk' or 'batchtopk', "
                f"got {self.activation!r}"
            )
        if self.activation != "jumprelu":
            if self.topk is None or not 1 <= self.topk <= self.n_features:
                raise CltraceError(
                    f"activation={self.activation!r} needs 1 <= topk <= n_features, got {self.topk!r}"
                )
        elif self.topk is not None:
            raise CltraceError(
                "topk is set but activation is 'jumprelu'", hint="drop topk or use activation='topk'"
            )
        if not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise CltraceError(f"bandwidth must be a positive number, got {self.bandwidth!r}")
        if not self.init_threshold > 0:
            raise CltraceError(f"init_threshold must be > 0, got {self.init_threshold!r}")

    def n_targets(self, layer: int) -> int:
        """How many layers a feature of `layer` writes to (CLT: L - layer; PLT: 1)."""
        return self.n_layers - layer if self.kind == "clt" else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TranscoderConfig":
        return _from_dict(cls, data, "transcoder config")


PRECISIONS = ("auto", "bf16", "fp32")  # auto = bf16 where AMX/AVX512-bf16/CUDA has it, else fp32


def check_precision(precision: str) -> None:
    """A precision setting (training, fine-tuning) is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise CltraceError(f"precision must be auto, bf16 or fp32, got {precision!r}")


@dataclass
class TrainConfig:
    """How a transcoder is trained. Saved as train_config.json in the run folder."""

    model: str = DEFAULT_MODEL  # language model (name or path)
    kind: Literal["clt", "plt"] = "clt"
    skip: bool = False
    activation: Literal["jumprelu", "topk", "batchtopk"] = "jumprelu"
    topk: int | None = None  # k per token (BatchTopK: k·batch per batch)
    n_features: int = 2048  # F per layer
    tokens: int = 300_000  # training tokens in total (with `minutes`: at most)
    minutes: float | None = None  # wall-time budget of the training loop: the token
    # budget is sized from the measured throughput
    batch_size: int = 1024  # tokens per optimizer step
    lr: float = 2e-4  # AdamW peak learning rate
    lr_warmup_frac: float = 0.01  # linear warm-up, fraction of steps
    lr_decay_frac: float = 0.2  # linear decay to 0 over the last fraction
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    lambda_s: float = 1.0  # sparsity penalty λ_S (final value); in cltrace's
    # normalisation (per token, summed over layers, each
    # target's mean norm √d) 1.0 gave L0 ≈ 77 on a 18×1024
    # PLT of gemma-3-270m, 3.0 gave 26, 2e-4 gave 370
    lambda_s_warmup_frac: float = 0.7  # λ_S ramps linearly from 0 over this fraction
    lambda_p: float = 3e-6  # pre-activation penalty λ_P
    sparsity_c: float = 4.0  # c in tanh(c·||W_dec||·a)
    bandwidth: float = 1.0  # JumpReLU STE width ε (normalised scale)
    init_threshold: float = 0.03
    init_tokens: int = 4096  # tokens used to set norm scalars and b_enc
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 where AMX/CUDA has it
    dead_window_tokens: int = 100_000  # a feature is dead if silent this long
    checkpoint_every: int = 50  # steps between checkpoints (0 = only at the end)
    checkpoint_minutes: float = 0.0  # also a checkpoint when this much wall time passed since
    # the last one (0 = off): a time-sized run checkpoints at the same pace on any CPU
    log_every: int = 10  # steps between metric log lines
    seed: int = 0
    context_len: int = 128  # harvest: tokens per context
    store: str | None = None  # activation store to read (None = harvest on the fly)
    data_repeats: int = 1  # harvest on the fly: every harvested token is trained on this many
    # times, the copies a shuffle buffer apart (the model's forward is ~0.4 of an 18 x 4096
    # CLT step on CPU; 2 halves its cost per trained token, but on an AVX512-bf16 EPYC the run's
    # rate did not rise and held-out NMSE was worse at 12 min: README). A store repeats when small.
    refit_tokens: int = 0  # after training, refit the decoder by least squares
    # on this many further tokens (0 = off; refit.py)
    refit_ridge: float = 1e-3  # ridge, relative to the mean Gram diagonal
    finetune_minutes: float = 0.0  # after training (and the JumpReLU conversion): end-to-end
    # fine-tuning on the replacement model's KL for this many minutes (0 = off; finetune.py)
    finetune_lr: float = 3e-5  # its peak learning rate (decoder; the encoder's is a tenth)
    jumprelu_after_topk: bool = False  # TopK / BatchTopK: end as a JumpReLU transcoder with
    # per-layer thresholds keeping L0 (refit.py), so it
    # can be intervened on; before the refit
    auxk_alpha: float = 0.0  # AuxK dead-feature loss weight α (1/32 in the presets)
    auxk: int | None = None  # k_aux: dead features decoding the residual per token
    # and layer (None: 2·topk, or d_model/2 for JumpReLU)
    centre_targets: bool = False  # b_dec starts at the targets' mean, and each layer's loss
    # weighs 1 / its variance (Transcoder.init_from_sample)
    normalize_decoder: bool = False  # after every step, each feature's decoder to norm 1
    # (its encoder takes the scale; Transcoder.normalize_decoder_)
    balance_rate: float = 0.0  # TopK / BatchTopK load balancing: per step, the selection
    # bias (Transcoder.select_bias, normalised pre-activation units) of features silent for
    # balance_window_tokens rises by this, of features active on more than
    # balance_max_density of the batch falls by it (0 = off)
    balance_window_tokens: int = 4096
    balance_max_density: float = 0.05
    balance_max_bias: float = 1.0  # |selection bias| bound (normalised pre-activation units)
    resample_every_tokens: int = 0  # TopK / BatchTopK: every this many tokens, until
    # resample_until, features silent for dead_window_tokens get a new encoder and
    # decoder aimed at badly reconstructed tokens (resample.py; 0 = off)
    resample_until: float | None = None  # fraction of the steps after which resampling stops
    # (None: where the learning-rate decay begins, 1 - lr_decay_frac)

    def __post_init__(self):
        positive = (
            "n_features",
            "tokens",
            "batch_size",
            "init_tokens",
            "dead_window_tokens",
            "context_len",
            "data_repeats",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CltraceError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.tokens < self.batch_size:
            raise CltraceError(f"tokens ({self.tokens}) must be at least one batch ({self.batch_size})")
        if not self.lr > 0:
            raise CltraceError(f"lr must be > 0, got {self.lr}")
        for name in ("lr_warmup_frac", "lr_decay_frac", "lambda_s_warmup_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CltraceError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr_warmup_frac + self.lr_decay_frac > 1.0:
            raise CltraceError("lr_warmup_frac + lr_decay_frac must be <= 1")
        if self.lambda_s < 0 or self.lambda_p < 0:
            raise CltraceError("lambda_s and lambda_p must be >= 0")
        check_precision(self.precision)
        if self.checkpoint_every < 0 or not self.checkpoint_minutes >= 0:
            raise CltraceError(
                f"checkpoint_every and checkpoint_minutes must be >= 0, got {self.checkpoint_every}, "
                f"{self.checkpoint_minutes}"
            )
        if self.refit_tokens < 0 or not self.refit_ridge > 0:
            raise CltraceError("refit_tokens must be >= 0 and refit_ridge > 0")
        if self.refit_tokens and self.skip:
            raise CltraceError(
                "the least-squares refit does not handle skip transcoders",
                hint="set refit_tokens=0 for --skip",
            )
        if self.jumprelu_after_topk and self.activation == "jumprelu":
            raise CltraceError("jumprelu_after_topk needs activation='topk' or 'batchtopk'")
        if not self.finetune_minutes >= 0 or not self.finetune_lr > 0:
            raise CltraceError(
                f"finetune_minutes must be >= 0 and finetune_lr > 0, got {self.finetune_minutes}, "
                f"{self.finetune_lr}"
            )
        if self.finetune_minutes and self.activation != "jumprelu" and not self.jumprelu_after_topk:
            raise CltraceError(
                "end-to-end fine-tuning needs a JumpReLU transcoder",
                hint="set jumprelu_after_topk for a TopK / BatchTopK run",
            )
        if self.minutes is not None and not self.minutes > 0:
            raise CltraceError(f"minutes must be > 0, got {self.minutes}")
        if self.auxk_alpha < 0 or (self.auxk is not None and self.auxk < 1):
            raise CltraceError("auxk_alpha must be >= 0 and auxk >= 1")
        if self.balance_rate < 0 or self.balance_max_bias <= 0 or not 0 < self.balance_max_density <= 1:
            raise CltraceError(
                "balance_rate must be >= 0, balance_max_bias > 0 and 0 < balance_max_density <= 1, got "
                f"{self.balance_rate}, {self.balance_max_bias}, {self.balance_max_density}"
            )
        if self.resample_every_tokens < 0:
            raise CltraceError(f"resample_every_tokens must be >= 0, got {self.resample_every_tokens}")
        if self.resample_every_tokens and self.activation == "jumprelu":
            raise CltraceError(
                "resample_every_tokens needs activation='topk' or 'batchtopk'",
                hint="set resample_every_tokens=0 for JumpReLU",
            )
        if self.resample_until is not None and not 0.0 <= self.resample_until <= 1.0:
            raise CltraceError(f"resample_until must be in [0, 1], got {self.resample_until}")
        if self.balance_window_tokens < 1:
            raise CltraceError(f"balance_window_tokens must be >= 1, got {self.balance_window_tokens}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise CltraceError("grad_clip must be > 0 or None")

    @property
    def n_steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def tokens_needed(self) -> int:
        """Training tokens plus those the closed-form finishing steps read after them."""
        return (
            self.n_steps * self.batch_size
            + (self.init_tokens if self.jumprelu_after_topk else 0)
            + self.refit_tokens
        )

    def transcoder_config(self, n_layers: int, d_model: int) -> TranscoderConfig:
        return TranscoderConfig(
            n_layers=n_layers,
            d_model=d_model,
            n_features=self.n_features,
            kind=self.kind,
            skip=self.skip,
            activation=self.activation,
            topk=self.topk,
            bandwidth=self.bandwidth,
            init_threshold=self.init_threshold,
            model_name=self.model,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data, "train config")


# Presets. `demo` and `session` are wall-time budgets (`minutes`): the trainer measures its
# throughput in the first steps and sizes the token budget to fit (`tokens` is then a cap), so
# they fit on any CPU: bf16 ones (AMX, AVX512-bf16) reach more tokens than AVX2-only ones
# (fp32; CLTRACE_PRECISION=fp32 stands in for one). Throughput: bench/bench_train.py, README.
# AuxK acts on features silent for dead_window_tokens (20k: these runs see 10^5-10^6 tokens).
#   demo     18 x 1024 TopK CLT (k = 64) + AuxK, 10 minutes of training harvested on the fly
#            (data loading included), then TopK -> JumpReLU; sized so that the whole
#            `cltrace demo` fits 30 minutes on an AVX2-only 2-core CPU.
#   session  18 x 4096 BatchTopK CLT (k = 39: L0 just under 1% of the width) + AuxK + balancing of
#            the selection (balance_rate) + resampling of dead features (to 90% of the steps),
#            38 minutes, then BatchTopK -> JumpReLU, then 7 minutes of end-to-end fine-tuning on
#            the replacement model's KL (finetune.py): 45 minutes of training in all.
# No preset refits the decoder: on an earlier session CLT a 50k-token refit (18,432 regressors
# for the last layer) overfit, held-out NMSE 0.187 -> 0.222; it helps a PLT (1,024 per layer).
#   small    18 x 4096 JumpReLU, 2M tokens: hours on this CPU; minutes on one GPU.
#   paper    18 x 16384, 50M tokens: GPU only.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        model=DEFAULT_MODEL,
        n_features=1024,
        activation="topk",
        topk=64,
        minutes=10.0,
        tokens=2_000_000,
        batch_size=1024,
        lr=2e-3,
        dead_window_tokens=20_000,
        checkpoint_every=20,
        jumprelu_after_topk=True,
        auxk_alpha=1 / 32,
    ),
    "session": dict(
        model=DEFAULT_MODEL,
        n_features=4096,  # 45 min, held-out: 18 x 2048 k = 20 at lr 1e-3 NMSE 0.158, KL 1.79;
        activation="batchtopk",  # 18 x 4096 k = 40 at lr 7e-4 NMSE 0.149, KL 1.69, dead 0.5%
        topk=39,  # 35 min + 10 min fine-tuning (AVX512-bf16): NMSE 0.159, KL 1.32, top-1 44.1%
        minutes=38.0,  # session 12 (AMX, 35 + 10 min, lr 7e-4): NMSE 0.165, KL 1.27, top-1 44.7%
        finetune_minutes=7.0,  # session 13 (AMX, these settings at k = 40): NMSE 0.150, KL 1.15,
        # top-1 46.5%, dead 1.7%. Session 14 (AMX, faster step): k = 40 NMSE 0.146, L0 1.01% (over:
        # fine-tuning moves the encoder), dead 2.0%; k = 39 NMSE 0.146, L0 0.96%, dead 1.8%,
        # top-1 46.4%, KL 1.11
        tokens=5_000_000,
        batch_size=1024,
        lr=1e-3,  # 7e-4 until session 13, chosen before balancing and resampling existed (1e-3 then
        # left 4.0% dead); with them, 1e-3 is 0.006-0.010 lower in training NMSE at every step
        checkpoint_every=0,  # by time instead: a 3 GB checkpoint every 50 steps was 5-9% of the run
        checkpoint_minutes=10.0,
        dead_window_tokens=20_000,
        jumprelu_after_topk=True,
        auxk_alpha=1 / 32,
        balance_rate=0.03,  # dead after 68 steps: 57% without, 10% at 0.03 (L0 kept at k)
        resample_every_tokens=20_000,  # dead after 110 steps: 16.2% without, 7.3% with
        resample_until=0.9,  # into the decay: at 1e-3, features die once resampling stops
        centre_targets=True,  # 200 steps each: NMSE 0.267 -> 0.264, top-1 26.6% -> 30.5%,
        # KL 2.80 -> 2.37, CE recovered 0.586 -> 0.657, dead 5.6% -> 6.0%
    ),
    "small": dict(model=DEFAULT_MODEL, n_features=4096, tokens=2_000_000, batch_size=2048),
    "paper": dict(
        model=DEFAULT_MODEL,
        n_features=16384,
        tokens=50_000_000,
        batch_size=4096,
        dead_window_tokens=10_000_000,
        checkpoint_every=500,
    ),
    "smollm2": dict(
        model="smollm2-135m",
        n_features=1024,
        tokens=50_000,
        batch_size=1024,
        lr=1e-3,
        lambda_s_warmup_frac=0.5,
        dead_window_tokens=20_000,
        checkpoint_every=10,
    ),
}


# settings that only mean something for (Batch)TopK
TOPK_ONLY = ("topk", "jumprelu_after_topk", "resample_every_tokens", "resample_until")


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named preset, with fields overridden (None values ignored)."""
    if name not in PRESETS:
        raise CltraceError(f"unknown preset {name!r}", hint=f"choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    if overrides.get("tokens") is not None and overrides.get("minutes") is None:
        values.pop("minutes", None)  # a token count asked for: no time budget
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("activation", "jumprelu") == "jumprelu":  # a TopK preset switched to JumpReLU:
        for key in TOPK_ONLY:  # drop its TopK-only settings
            if overrides.get(key) is None:
                values.pop(key, None)
    return TrainConfig(**values)


__all__ = ["PRECISIONS", "TranscoderConfig", "TrainConfig", "PRESETS", "check_precision", "preset"]
