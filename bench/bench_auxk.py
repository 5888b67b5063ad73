"""What the AuxK dead-feature loss costs per training step, in one run: the kernel path with
AuxK's pairs decoded in the main pass (`Transcoder._kernel_loss`, now), the same step without
AuxK, and the code before that change (commit 70c20d9: AuxK decoded in a second kernel pass
with every (token, dead feature) pair of the top k_aux, zeros included), read with `git show`.

Synthetic activations at gemma-3-270m shapes (18 layers, d = 640), batch 1,024, BatchTopK CLT
with k = 1% of F, bf16 autocast where the CPU has it, full steps (loss, backward, clipping,
fused AdamW). A share of each layer's features (--dead, default 2%: the session run's
in-training range is 0.2-6%) is marked dead; k_aux = 2k as in the trainer. A dead feature's
encoder bias is lowered so that --positive of its pre-activations are > 0 (default 5%: a real
dead feature is silent because its pre-activation is mostly negative; 0.5 is a random
feature). Two warm-up steps, then the mean of --steps.

    .venv/bin/python bench/bench_auxk.py [--sizes 2048 4096] [--dead 0.02] [--positive 0.05] [--steps 3]

Throughput on a shared machine is noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from git_module import model_at
from train_step import time_steps

from cltrace.hardware import enable_huge_pages, keep_freed_memory
from cltrace.transcoders.config import TranscoderConfig
from cltrace.transcoders.model import Transcoder
from cltrace.transcoders.train import resolve_precision

warnings.filterwarnings("ignore")
L, D, BATCH = 18, 640, 1024
BEFORE = "70c20d9"


@torch.no_grad()
def silence(tc, x, dead, positive: float) -> None:
    """Lower the dead features' encoder bias so that `positive` of their pre-activations on x
    are > 0."""
    pre = tc._encode(tc._normalise(x, tc.in_scale))  # [L, N, F]
    cut = torch.quantile(pre.transpose(1, 2).float(), 1 - positive, dim=-1)  # [L, F]
    tc.b_enc.sub_(torch.where(dead, cut, torch.zeros_like(cut)))


def main() -> None:
    enable_huge_pages()  # as the CLI does (THP_MEM_ALLOC_ENABLE=0 to time without)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="features per layer")
    p.add_argument("--dead", type=float, default=0.02, help="share of each layer's features marked dead")
    p.add_argument("--positive", type=float, default=0.05, help="dead features: share > 0")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    keep_freed_memory()
    autocast = resolve_precision("auto", torch.device("cpu"))
    before = model_at(BEFORE)
    precision = autocast or "fp32"
    print(
        f"CLT, batch {BATCH}, k = 1% of F, {args.dead:.1%} of features dead ({args.positive:.0%} of their "
        f"pre-activations > 0), k_aux = 2k, {precision}"
    )
    print("| F per layer | no AuxK | AuxK, merged (now) | AuxK, before | before / now |")
    print("|---|---|---|---|---|")
    for F in args.sizes:
        k = max(1, F // 100)
        cfg = TranscoderConfig(
            n_layers=L, d_model=D, n_features=F, kind="clt", activation="batchtopk", topk=k
        )
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(BATCH, L, D, generator=g), torch.randn(BATCH, L, D, generator=g)
        dead = torch.rand(L, F, generator=g) < args.dead
        rows = []
        for cls, dead_arg in [  # no AuxK, now, before
            (Transcoder, None),
            (Transcoder, dead),
            (None if before is None else before.Transcoder, dead),
        ]:
            if cls is None:
                rows.append(None)
                continue
            torch.manual_seed(0)
            tc = cls(cfg)
            tc.init_from_sample(x, y)
            silence(tc, x, dead, args.positive)
            seconds, out = time_steps(
                tc, x, y, args.steps, autocast, lr=1e-6, dead=dead_arg, auxk=2 * k, auxk_alpha=1 / 32
            )
            rows.append((seconds, float(out.aux)))
            del tc
        none, now, old = rows
        assert none is not None and now is not None
        cells = [f"{BATCH / none[0]:,.0f} tok/s", f"{BATCH / now[0]:,.0f} tok/s"]
        if old is not None:
            cells += [f"{BATCH / old[0]:,.0f} tok/s", f"{old[0] / now[0]:.2f}×"]
            assert abs(old[1] - now[1]) <= 1e-2 * max(abs(old[1]), 1e-9), (old[1], now[1])  # same AuxK term
        else:
            cells += ["–", "–"]
        print(f"| {F} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
