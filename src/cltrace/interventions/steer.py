"""Interventions on transcoder features, applied to the real model (METHOD.md §6).

A feature (l, i) of a CLT writes `a · W_dec_{l→l'}` to the MLP output of every layer l' ≥ l.
To set, scale or shift it, we run the real model and, at each affected layer l', add

    Δa · W_dec_{l→l'}      with  Δa = new(a) - a,

to the true MLP output, where `a` is computed on the fly from the transcoder's encoding of
the *current* MLP input at layer l. Upstream interventions therefore change the `a` that
downstream interventions start from, and every other part of the model (attention, norms,
the real MLPs) reacts normally. Setting a feature to its own value is a no-op; setting every
feature to 0 leaves each MLP output at `error + b_dec` (tests check both).

Constrained patching (`constrain_until=l_end`): from the first intervened layer l to l_end,
MLP outputs are clamped to their values on the clean run, features keep their clean
activations, and only the intervened features' decoder writes Δa · W_dec_{l→l'} (l' ≤ l_end)
are added; after l_end the real model runs on.

Positions are prompt positions (negative ones count from the prompt's end); `None` means
every prompt position. During greedy generation each step re-runs the whole sequence (no KV
cache) with the interventions at their prompt positions; `steer_generated=True` also applies
position-less (`None`) interventions to the generated tokens.

Only JumpReLU transcoders are supported here (a feature's activation is computed alone from
its encoder row and threshold, without the whole layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.models.loading import LoadedModel
from cltrace.transcoders.interface import TranscoderLike, device_dtype

Mode = Literal["set", "scale", "add"]
FeatureRef = tuple[int, int]  # (layer, feature index)


@dataclass(frozen=True)
class Intervention:
    """Change one feature's activation: `set` to value, `scale` by value, or `add` value.

    Attributes:
        layer: the feature's (source) layer.
        feature: its index within the layer.
        positions: prompt positions (negative: from the end); None: every prompt position.
        mode: "set" | "scale" | "add".
        value: the new value, factor or shift.
    """

    layer: int
    feature: int
    positions: tuple[int, ...] | None = None
    mode: Mode = "set"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("set", "scale", "add"):
            raise ValueError(f"mode must be set, scale or add, not {self.mode!r}")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    def describe(self) -> str:
        where = "" if self.positions is None else "@" + ",".join(map(str, self.positions))
        op = {"set": "=", "scale": "×", "add": "+="}[self.mode]
        return f"L{self.layer}:{self.feature}{where} {op} {self.value:g}"


def apply_mode(mode: Mode, value: float, a: Tensor) -> Tensor:
    """The new activation for original activation(s) `a`."""
    if mode == "set":
        return torch.full_like(a, value)
    if mode == "scale":
        return a * value
    return a + value


@dataclass(frozen=True)
class TokenProb:
    token_id: int
    token: str
    prob: float
    logit: float


@dataclass
class Result:
    """Next-token distribution (and optional continuation) before and after an intervention.

    logits_before / logits_after: [vocab] at the prompt's last position.
    """

    prompt: str
    interventions: list[Intervention]
    before: list[TokenProb]
    after: list[TokenProb]
    logits_before: Float[Tensor, " vocab"]
    logits_after: Float[Tensor, " vocab"]
    continuation_before: str | None = None
    continuation_after: str | None = None

    def prob(self, token_id: int, after: bool = True) -> float:
        logits = self.logits_after if after else self.logits_before
        return float(torch.softmax(logits.float(), -1)[token_id])

    def to_dict(self) -> dict:
        """The viewer's intervention result (viewer/backend.py), plus the interventions."""
        row = lambda t: {"token": t.token, "token_id": t.token_id, "prob": t.prob, "logit": t.logit}  # noqa: E731
        return {
            "prompt": self.prompt,
            "interventions": [i.describe() for i in self.interventions],
            "before": [row(t) for t in self.before],
            "after": [row(t) for t in self.after],
            "continuation_before": self.continuation_before,
            "continuation": self.continuation_after,
        }

    def table(self) -> str:
        """Before/after top tokens side by side, with each token's probability on the other side."""
        lines = [f"prompt: {self.prompt!r}"]
        lines += [f"intervention: {i.describe()}" for i in self.interventions[:20]]
        if len(self.interventions) > 20:
            lines.append(f"... and {len(self.interventions) - 20} more")
        p_before, p_after = (
            torch.softmax(self.logits_before.float(), -1),
            torch.softmax(self.logits_after.float(), -1),
        )
        lines.append(f"{'before':<34}  {'after':<34}")
        for b, a in zip(self.before, self.after):
            left = f"{b.token!r:<16} {b.prob:6.3f} → {float(p_after[b.token_id]):6.3f}"
            right = f"{a.token!r:<16} {a.prob:6.3f} (was {float(p_before[a.token_id]):.3f})"
            lines.append(f"{left:<34}  {right:<34}")
        if self.continuation_before is not None:
            lines += [
                f"continuation before: {self.continuation_before!r}",
                f"continuation after:  {self.continuation_after!r}",
            ]
        return "\n".join(lines)


@dataclass
class _LayerPlan:
    """The interventions of one source layer, with their feature rows gathered once.

    feats [k] unique feature ids; w_enc [d, k]; b_enc, theta [k]; w_dec [k, T, d];
    ops: (mode, value, positions, slots [j] into feats).
    """

    feats: Tensor
    w_enc: Tensor
    b_enc: Tensor
    theta: Tensor
    w_dec: Tensor
    ops: list[tuple[Mode, float, tuple[int, ...] | None, Tensor]] = field(default_factory=list)

    def activations(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos k"]:
        """JumpReLU activations of the planned features from MLP input x."""
        pre = x.to(self.w_enc.dtype) @ self.w_enc + self.b_enc
        return pre * (pre > self.theta)


def resolve_positions(
    positions: tuple[int, ...] | None, prompt_len: int, seq_len: int, steer_generated: bool
) -> list[int]:
    """Absolute positions for one forward of a `seq_len` sequence whose prompt is `prompt_len`."""
    if positions is None:
        return list(range(seq_len if steer_generated else prompt_len))
    out = [p + prompt_len if p < 0 else p for p in positions]
    bad = [p for p in out if not 0 <= p < prompt_len]
    if bad:
        raise ValueError(f"positions {positions} fall outside the {prompt_len}-token prompt")
    return out


class Steerer:
    """A model and its transcoder, ready to run prompts with feature interventions."""

    def __init__(self, model: LoadedModel, transcoder: TranscoderLike):
        self.model = model
        self.tc = transcoder
        if transcoder.cfg.activation != "jumprelu":
            raise CltraceError(
                "interventions support JumpReLU transcoders only",
                "a TopK feature's activation depends on the whole layer; train with activation='jumprelu'",
            )
        self.tc_device, self.tc_dtype = device_dtype(transcoder)
        self._acts_cache: dict[str, Tensor] = {}  # prompt -> activations (prompt_activations)

    # -- features of a prompt --------------------------------------------------------------
    def tokens(self, prompt: str) -> Int[Tensor, "1 pos"]:
        return self.model.tokenize(prompt)

    def activations(self, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "pos layer features"]:
        """Every feature's activation at every position of a clean run."""
        x = self.model.capture(tokens).mlp_in[0].to(self.tc_device, self.tc_dtype)  # [n, L, d]
        with torch.no_grad():
            return self.tc.activate(self.tc.encode(x))

    # -- planning --------------------------------------------------------------------------
    def check(self, interventions: Sequence[Intervention]) -> None:
        """CltraceError naming the valid range when a layer or feature index does not exist."""
        n_layers = self.model.n_layers
        for iv in interventions:
            if not 0 <= iv.layer < n_layers:
                raise CltraceError(
                    f"layer {iv.layer} is out of range: layers are 0-{n_layers - 1}",
                    "feature ids read layer:feature, e.g. 3:1022",
                )
            n_features = int(self.tc.encoder_bias(iv.layer).shape[0])
            if not 0 <= iv.feature < n_features:
                raise CltraceError(
                    f"feature {iv.feature} is out of range: layer {iv.layer} has features 0-{n_features - 1}",
                    "feature ids read layer:feature, e.g. 3:1022",
                )

    def plan(self, interventions: Sequence[Intervention]) -> dict[int, _LayerPlan]:
        """Group interventions by layer; ops sharing (mode, value, positions) act together."""
        self.check(interventions)
        by_layer: dict[int, list[Intervention]] = {}
        for iv in interventions:
            by_layer.setdefault(iv.layer, []).append(iv)
        plans = {}
        with torch.no_grad():
            for layer, ivs in by_layer.items():
                feats = sorted({iv.feature for iv in ivs})
                slot = {f: j for j, f in enumerate(feats)}
                idx = torch.tensor(feats, dtype=torch.long, device=self.tc_device)
                plan = _LayerPlan(
                    feats=idx,
                    w_enc=self.tc.encoder_weight(layer)[:, idx],
                    b_enc=self.tc.encoder_bias(layer)[idx],
                    theta=self.tc.threshold(layer)[idx],
                    w_dec=self.tc.decoder_weight(layer)[idx],
                )
                groups: dict[tuple, list[int]] = {}
                for iv in ivs:  # keep the given order between groups
                    groups.setdefault((iv.mode, iv.value, iv.positions), []).append(slot[iv.feature])
                plan.ops = [
                    (m, v, p, torch.tensor(s, device=self.tc_device)) for (m, v, p), s in groups.items()
                ]
                plans[layer] = plan
        return plans

    # -- running ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(
        self,
        interventions: Sequence[Intervention],
        tokens: Int[Tensor, "1 pos"],
        *,
        prompt_len: int | None = None,
        constrain_until: int | None = None,
        steer_generated: bool = False,
    ) -> Iterator[None]:
        """Within the block, forwards of `tokens` run with the interventions applied."""
        plans = self.plan(interventions)
        prompt_len = tokens.shape[1] if prompt_len is None else prompt_len
        clean = self.model.capture(tokens) if constrain_until is not None and plans else None
        first = min(plans) if plans else 0
        pending: dict[int, Tensor] = {}

        def patch(layer: int, mlp_in: Tensor, mlp_out: Tensor) -> Tensor:
            constrained = constrain_until is not None and first <= layer <= constrain_until
            clamp = clean if constrained else None  # the clean run this layer is held to
            if layer == 0:
                pending.clear()
            if layer in plans:
                x = clamp.mlp_in[:, :, layer] if clamp is not None else mlp_in
                self._push(plans[layer], layer, x, pending, prompt_len, steer_generated)
            out = clamp.mlp_out[:, :, layer].to(mlp_out.dtype) if clamp is not None else mlp_out
            delta = pending.pop(layer, None)
            # (a delta exists only with plans, and then clean is None exactly when constrain_until is)
            if delta is not None and (constrain_until is None or layer <= constrain_until):
                out = out + delta.to(out.device, out.dtype)
            return out

        with torch.no_grad(), self.model.patch_mlp_outputs(patch):
            yield

    def _push(
        self,
        plan: _LayerPlan,
        layer: int,
        x: Tensor,
        pending: dict[int, Tensor],
        prompt_len: int,
        steer_generated: bool,
    ) -> None:
        """Compute Δa for one layer's planned features and queue Δa · W_dec for its targets."""
        a = plan.activations(x.to(self.tc_device))  # [B, n, k]
        new = a.clone()
        for mode, value, positions, slots in plan.ops:
            pos = torch.tensor(
                resolve_positions(positions, prompt_len, a.shape[1], steer_generated),
                dtype=torch.long,
                device=a.device,
            )
            sel = (slice(None), pos[:, None], slots[None, :])
            new[sel] = apply_mode(mode, value, new[sel])
        writes = torch.einsum("bnk,ktd->bntd", new - a, plan.w_dec)  # [B, n, T, d]
        for t in range(writes.shape[2]):
            target = layer + t
            pending[target] = pending.get(target, 0) + writes[:, :, t]

    def logits(
        self,
        tokens: Int[Tensor, "1 pos"],
        interventions: Sequence[Intervention] = (),
        *,
        prompt_len: int | None = None,
        constrain_until: int | None = None,
        steer_generated: bool = False,
    ) -> Float[Tensor, "1 pos vocab"]:
        """Logits of one forward with the interventions applied."""
        with self.applied(
            interventions,
            tokens,
            prompt_len=prompt_len,
            constrain_until=constrain_until,
            steer_generated=steer_generated,
        ):
            return self.model.run(tokens)

    def generate(
        self,
        tokens: Int[Tensor, "1 pos"],
        n: int,
        interventions: Sequence[Intervention] = (),
        *,
        constrain_until: int | None = None,
        steer_generated: bool = False,
    ) -> list[int]:
        """Greedy continuation of `n` tokens (stops at EOS), re-running the sequence each step."""
        prompt_len, out = tokens.shape[1], []
        eos = getattr(self.model.tokenizer, "eos_token_id", None)
        for _ in range(n):
            logits = self.logits(
                tokens,
                interventions,
                prompt_len=prompt_len,
                constrain_until=constrain_until,
                steer_generated=steer_generated,
            )
            nxt = int(logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            tokens = torch.cat([tokens, tokens.new_tensor([[nxt]])], dim=1)
        return out

    def top_tokens(self, logits: Float[Tensor, " vocab"], k: int) -> list[TokenProb]:
        probs = torch.softmax(logits.float(), -1)
        p, idx = probs.topk(k)
        names = self.model.token_strings(idx.tolist())
        return [TokenProb(int(i), s, float(q), float(logits[i])) for i, s, q in zip(idx, names, p)]

    def run(
        self,
        prompt: str,
        interventions: Sequence[Intervention],
        *,
        top_k: int = 10,
        generate: int = 0,
        constrain_until: int | None = None,
        steer_generated: bool = False,
    ) -> Result:
        """Top next tokens before and after the interventions (and greedy continuations)."""
        tokens = self.tokens(prompt)
        with torch.no_grad():
            before = self.model.run(tokens)[0, -1]
        after = self.logits(
            tokens, interventions, constrain_until=constrain_until, steer_generated=steer_generated
        )[0, -1]
        result = Result(
            prompt,
            list(interventions),
            self.top_tokens(before, top_k),
            self.top_tokens(after, top_k),
            before,
            after,
        )
        if generate > 0:
            result.continuation_before = self.model.decode(self.generate(tokens, generate))
            result.continuation_after = self.model.decode(
                self.generate(
                    tokens,
                    generate,
                    interventions,
                    constrain_until=constrain_until,
                    steer_generated=steer_generated,
                )
            )
        return result

    # -- swap ------------------------------------------------------------------------------
    def swap_interventions(
        self,
        prompt: str,
        source_prompt: str,
        *,
        suppress: Sequence[FeatureRef] | None = None,
        inject: Sequence[FeatureRef] | None = None,
        suppress_factor: float = 0.0,
        inject_scale: float = 1.0,
        where: Literal["last", "same"] = "last",
        n_auto: int = 10,
    ) -> list[Intervention]:
        """Interventions that replace prompt A's concept by prompt B's.

        `suppress` features are scaled by `suppress_factor` (0: ablate, -1: invert) at every
        position of A. `inject` features are set to `inject_scale` × their activation on B:
        at B's last position written to A's last position (`where="last"`), or position by
        position (`where="same"`, positions both prompts have). Left as None, each list is
        chosen automatically: the `n_auto` strongest features active on one prompt and
        nowhere on the other (see `distinctive_features`).
        """
        acts_a, acts_b = self.prompt_activations(prompt), self.prompt_activations(source_prompt)
        if suppress is None:
            suppress = distinctive_features(acts_a[1:], acts_b[1:], n_auto)
        if inject is None:
            inject = distinctive_features(acts_b[-1:] if where == "last" else acts_b[1:], acts_a[1:], n_auto)
        out = [Intervention(l, i, None, "scale", suppress_factor) for l, i in suppress]
        if where == "last":
            out += [
                Intervention(l, i, (-1,), "set", inject_scale * float(acts_b[-1, l, i])) for l, i in inject
            ]
        else:
            n = min(acts_a.shape[0], acts_b.shape[0])
            out += [
                Intervention(l, i, (p,), "set", inject_scale * float(acts_b[p, l, i]))
                for l, i in inject
                for p in range(1, n)
            ]
        return out

    def swap(
        self, prompt: str, source_prompt: str, *, top_k: int = 10, generate: int = 0, **kwargs
    ) -> Result:
        """`run` with `swap_interventions(prompt, source_prompt, **kwargs)`."""
        ivs = self.swap_interventions(prompt, source_prompt, **kwargs)
        return self.run(prompt, ivs, top_k=top_k, generate=generate)

    def swap_sweep(
        self,
        prompt: str,
        source_prompt: str,
        target_id: int,
        *,
        n_autos: Sequence[int] = (10, 30, 100),
        scales: Sequence[float] = (1.0, 2.0, 4.0),
        wheres: Sequence[Literal["last", "same"]] = ("last", "same"),
    ) -> list[SwapTrial]:
        """Every automatic swap on the grid n_auto × inject_scale × where, scored by the
        probability of `target_id` (the other prompt's answer) after the swap; best first.
        `where="same"` is skipped when the prompts differ in length."""
        n_a, n_b = self.prompt_activations(prompt).shape[0], self.prompt_activations(source_prompt).shape[0]
        tokens = self.tokens(prompt)
        trials = []
        for where in wheres:
            if where == "same" and n_a != n_b:
                continue
            for n_auto in n_autos:
                for scale in scales:
                    ivs = self.swap_interventions(
                        prompt, source_prompt, n_auto=n_auto, inject_scale=scale, where=where
                    )
                    probs = torch.softmax(self.logits(tokens, ivs)[0, -1].float(), -1)
                    top = int(probs.argmax())
                    trials.append(
                        SwapTrial(
                            n_auto,
                            scale,
                            where,
                            len(ivs),
                            float(probs[target_id]),
                            top,
                            self.model.decode([top]),
                            ivs,
                        )
                    )
        return sorted(trials, key=lambda t: -t.p_target)

    def prompt_activations(self, prompt: str) -> Float[Tensor, "pos layer features"]:
        """`activations` of a prompt, remembered for the last few prompts."""
        cache = self._acts_cache
        if prompt not in cache:
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            cache[prompt] = self.activations(self.tokens(prompt))
        return cache[prompt]


@dataclass
class SwapTrial:
    """One point of `Steerer.swap_sweep`."""

    n_auto: int
    inject_scale: float
    where: str
    n_interventions: int
    p_target: float  # probability of the other prompt's answer after the swap
    top_id: int  # the top next token after the swap
    top: str
    interventions: list[Intervention]


def distinctive_features(
    acts: Float[Tensor, "pos layer features"], other: Float[Tensor, "pos layer features"], n: int
) -> list[FeatureRef]:
    """The `n` features with the largest max activation over `acts` that never fire in `other`."""
    peak = acts.amax(0).clone()  # [L, F]
    peak[other.amax(0) > 0] = 0
    vals, idx = peak.flatten().topk(min(n, peak.numel()))
    F = peak.shape[1]
    return [(int(i) // F, int(i) % F) for v, i in zip(vals, idx) if v > 0]
