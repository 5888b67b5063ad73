"""Time and peak memory of `attribute` by prompt length and number of feature targets.

    nice .venv/bin/python bench/bench_attribution.py                       # default grid
    nice .venv/bin/python bench/bench_attribution.py --lengths 14 --max-feature-nodes all
    nice .venv/bin/python bench/bench_attribution.py --random-model      # no bundled weights

The model is the bundled gemma-3-270m (or, with --random-model or when it is missing, a
random-weight model of the same shape: speed does not depend on the weights). The
transcoder is random (per-layer by default, as circuit-tracer's reference measurement) with
thresholds calibrated on text so that about --active features per layer fire per token:
it is exactly as hard to attribute as a trained one of the same width and activity.

Prompts are the first N tokens (BOS included) of a fixed paragraph. For each (length,
max_feature_nodes) the script reports the active features, the feature targets visited,
wall time and CPU time of `attribute`, the peak resident memory of the process during the
call (VmHWM, reset before each case via /proc/self/clear_refs) and its increase over the
memory held before the call. The machine is shared: compare numbers taken in one run.
Reference point (ENVIRONMENT.md): circuit-tracer 0.5.0 on this CPU, gemma-3-270m, random
18 x 4096 PLT, a 14-token prompt with 5,087 active features: 20.0 s, 2.3 GiB peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from cltrace.models import DEFAULT_MODEL

TEXT = (
    "Fact: the currency of the country whose capital is Tokyo is the yen. The opposite of "
    "hot is cold, and Dallas is a city in the state of Texas, whose capital is the city of "
    "Austin. Michael Jordan plays the sport of basketball. The Eiffel Tower is located in "
    "the city of Paris, in France. "
) * 8


def rss_peak_bytes() -> tuple[int, int]:
    """(VmHWM, VmRSS) of this process in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, kb = line.split()[:2]
                values[key] = int(kb) * 1024
    return values["VmHWM:"], values["VmRSS:"]


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def random_model_like_gemma():
    """gemma-3-270m's shape with random weights (and a word-level tokenizer)."""
    import transformers as tf

    from cltrace.models.loading import from_pretrained_objects

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        query_pre_attn_scalar=256,
        max_position_embeddings=32768,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    return from_pretrained_objects(model, tiny_tokenizer(), name="gemma-3-270m-shape-random")


def load(args):
    from cltrace.models import bundled
    from cltrace.models.loading import load_model

    if not args.random_model and bundled.model_status(args.model) != "package missing":
        return load_model(args.model)
    return random_model_like_gemma()


def prompt_tokens(lm, n: int, random_ids: bool) -> torch.Tensor:
    if random_ids:  # the random model's tokenizer knows few words
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, lm.vocab_size, (n,), generator=g)
        ids[0] = lm.bos_token_id
        return ids
    ids = lm.tokenize(TEXT)[0]
    if ids.numel() < n:
        raise SystemExit(f"the benchmark text has only {ids.numel()} tokens")
    return ids[:n]


def make_transcoder(lm, kind: str, n_features: int, active: float, random_ids: bool):
    from cltrace.transcoders.config import TranscoderConfig
    from cltrace.transcoders.model import Transcoder

    torch.manual_seed(0)
    tc = Transcoder(
        TranscoderConfig(n_layers=lm.n_layers, d_model=lm.d_model, n_features=n_features, kind=kind)
    )
    if random_ids:
        g = torch.Generator().manual_seed(2)
        toks = torch.randint(3, lm.vocab_size, (64, 16), generator=g)
        toks[:, 0] = lm.bos_token_id
    else:
        toks = lm.tokenize(TEXT)[0][None, :512]
    cap = lm.capture(toks)
    x = cap.mlp_in[:, 1:].reshape(-1, lm.n_layers, lm.d_model)
    y = cap.mlp_out[:, 1:].reshape(-1, lm.n_layers, lm.d_model)
    tc.init_from_sample(x, y, fire_frac=active / n_features)
    return tc.requires_grad_(False)


def run_case(lm, tc, tokens, max_nodes, args) -> dict:
    from cltrace.attribution.graph import AttributionConfig, attribute

    cfg = AttributionConfig(
        max_feature_nodes=max_nodes,
        batch_size=args.batch_size,
        progress=False,
        backward_dtype="bfloat16" if args.bf16 else "float32",
        edge_dtype="bfloat16" if args.bf16 else "float32",
    )
    reset_peak()
    base = rss_peak_bytes()[1]
    wall, cpu = time.perf_counter(), time.process_time()
    graph = attribute(lm, tc, tokens, cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = rss_peak_bytes()[0]
    return dict(
        n=int(tokens.numel()),
        max_nodes=max_nodes,
        active=graph.stats["n_active"],
        visited=graph.n_features,
        wall=wall,
        cpu=cpu,
        peak=peak,
        extra=peak - base,
        batch=graph.stats["batch_size"],
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--random-model", action="store_true", help="random weights, same shape")
    p.add_argument("--kind", default="plt", choices=["plt", "clt"])
    p.add_argument("--features", type=int, default=4096, help="features per layer")
    p.add_argument("--active", type=float, default=13.0, help="target active features per token per layer")
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 40, 160])
    p.add_argument(
        "--max-feature-nodes",
        nargs="+",
        default=["1024", "4096"],
        help="values to try; 'all' = every active feature",
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 backward and edge read-out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args)
    random_ids = lm.name.endswith("random")
    tc = make_transcoder(lm, args.kind, args.features, args.active, random_ids)
    print(
        f"model {lm.name}, {args.kind} {lm.n_layers} x {args.features}, ~{args.active:g} active "
        f"per token per layer, {torch.get_num_threads()} threads, "
        f"{'bf16' if args.bf16 else 'fp32'}",
        flush=True,
    )
    header = (
        f"{'tokens':>6} {'max_nodes':>9} {'active':>7} {'visited':>7} {'batch':>5} "
        f"{'wall s':>7} {'cpu s':>7} {'ms/node':>7} {'peak GiB':>8} {'+GiB':>6}"
    )
    print(header, flush=True)
    for n in args.lengths:
        tokens = prompt_tokens(lm, n, random_ids)
        for spec in args.max_feature_nodes:
            max_nodes = None if spec == "all" else int(spec)
            r = run_case(lm, tc, tokens, max_nodes, args)
            print(
                f"{r['n']:>6} {spec:>9} {r['active']:>7} {r['visited']:>7} {r['batch']:>5} "
                f"{r['wall']:>7.2f} {r['cpu']:>7.2f} {1000 * r['wall'] / max(r['visited'], 1):>7.2f} "
                f"{r['peak'] / 2**30:>8.2f} {r['extra'] / 2**30:>6.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
