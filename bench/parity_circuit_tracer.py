"""Parity and speed of cltrace's attribution graphs against circuit-tracer 0.5.0.

Run with cltrace's virtualenv from the repository root:

    nice .venv/bin/python bench/parity_circuit_tracer.py            # every case, both prompts
    nice .venv/bin/python bench/parity_circuit_tracer.py --cases smollm2-plt --prompts short

For each case (model x transcoder kind) and prompt it

1. makes sure circuit-tracer's own virtualenv exists (.cache/ct-venv; created with the pinned
   recipe when missing: torch 2.13.0 CPU, circuit-tracer 0.5.0, nnsight 0.6.1);
2. builds a random transcoder with a fixed seed (PLT: one per layer; CLT: cross-layer),
   thresholds calibrated on the prompts so that about --active features per layer fire per
   token, and writes it in circuit-tracer's on-disk format (config.yaml + safetensors);
3. runs circuit-tracer (bench/ct_runner.py, in its venv) and cltrace (this script with
   --cltrace-job, in cltrace's venv), each in its own process, on the same model directory,
   transcoder files and token ids (BOS first, so neither tool adds one);
4. aligns the nodes — features by (layer, pos, feature), errors by (layer, pos), tokens by
   pos, logits by token id — and reports max |A_ct - A_cltrace| / max |A_ct| over the common
   nodes (goal <= 1e-4), both `attribute` wall times, both peak RSS (VmHWM of each process),
   and the speed ratio. A table is printed and bench/results/parity.json written.

The transcoders are random, so the graphs mean nothing; they are exactly as hard to compute
as trained ones of the same width and activity. See bench/README_parity.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CT_VENV = REPO / ".cache" / "ct-venv"
WORK = REPO / ".cache" / "parity"
CT_PIP_STEPS = (["torch==2.13.0"], ["circuit-tracer==0.5.0", "nnsight==0.6.1"])

PROMPTS = {
    # about 10 tokens with BOS
    "short": "The Eiffel Tower is located in the city of",
    # about 40 tokens with BOS
    "long": (
        "Fact: the currency of the country whose capital is Tokyo is the yen. The opposite "
        "of hot is cold, and Dallas is a city in the state of Texas, whose capital is the "
        "city of"
    ),
}

# name -> (bundled model, transcoder kind, features per layer)
CASES = {
    "smollm2-plt": ("smollm2-135m", "plt", 2048),
    "smollm2-clt": ("smollm2-135m", "clt", 1024),
    "gemma-plt": ("gemma-3-270m", "plt", 4096),
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- environments


def ct_python() -> Path:
    return CT_VENV / "bin" / "python"


def ensure_ct_venv() -> Path:
    """circuit-tracer's virtualenv, created with the pinned recipe if it is missing."""
    py = ct_python()
    if py.exists():
        ok = (
            subprocess.run([str(py), "-c", "import circuit_tracer, nnsight"], capture_output=True).returncode
            == 0
        )
        if ok:
            return py
    log(
        f"circuit-tracer's virtualenv is missing or incomplete: creating {CT_VENV}\n"
        "  (python -m venv; pip install torch==2.13.0; pip install circuit-tracer==0.5.0 "
        "nnsight==0.6.1 -- a few minutes; torch is pinned because an unpinned one pulls a "
        "multi-GB CUDA build, nnsight because 0.8 breaks circuit-tracer 0.5.0)"
    )
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CT_VENV)], check=True)
    for pkgs in CT_PIP_STEPS:
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs])
        if r.returncode != 0:
            raise SystemExit(
                f"could not install {' '.join(pkgs)} into {CT_VENV}; "
                f"delete that folder and retry, or install them by hand"
            )
    return py


def resolve_model_dir(name: str, overrides: dict[str, str]) -> Path:
    """A transformers directory (written by transformers 5.x) for a bundled model.

    Preference: --model-dir NAME=PATH; cltrace's own cache (created on demand through
    cltrace.models.bundled); a directory under .cache/parity/models/NAME.
    """
    if name in overrides:
        return Path(overrides[name]).resolve()
    from cltrace.models import bundled

    try:
        path = Path(bundled.ensure_model_dir(name))
        if (path / "config.json").exists():
            return path
    except Exception as err:  # the cache may not be buildable here
        log(f"note: cltrace's model cache for {name} is not available ({type(err).__name__}: {err})")
    fallback = WORK / "models" / name
    if (fallback / "config.json").exists():
        log(f"note: using {fallback}")
        return fallback
    raise SystemExit(f"no model directory for {name}: pass --model-dir {name}=PATH")


# --------------------------------------------------------------------------- transcoders


def _gap_midpoint(z_sorted, rank: int, window: int = 25) -> float:
    """A threshold near sorted value `rank` in the middle of the widest nearby gap, so no
    calibration pre-activation lies within float error of it (both tools must agree on
    which features fire)."""
    import torch

    lo, hi = max(1, rank - window), min(z_sorted.numel() - 1, rank + window)
    gaps = z_sorted[lo : hi + 1] - z_sorted[lo - 1 : hi]
    j = int(torch.argmax(gaps)) + lo
    return float((z_sorted[j] + z_sorted[j - 1]) / 2)


def build_transcoder(
    case: str,
    model_dir: Path,
    prompt_ids: dict[str, list[int]],
    n_features: int,
    active: float,
    seed: int,
    out: Path,
) -> Path:
    """Random transcoder in circuit-tracer's format, calibrated on the prompts. Cached."""
    import torch
    from safetensors.torch import save_file

    _, kind, _ = CASES[case]
    key = json.dumps([case, str(model_dir), sorted(prompt_ids.items()), n_features, active, seed])
    out = out / f"{case}-F{n_features}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (out / "config.yaml").exists():
        return out
    from cltrace.models.loading import load_model_dir

    t0 = time.perf_counter()
    lm = load_model_dir(model_dir, name=str(model_dir))
    xs, ys = [], []
    for ids in prompt_ids.values():
        cap = lm.capture(torch.tensor([ids]))
        xs.append(cap.mlp_in[0, 1:])  # [n-1, L, d]; position 0 (BOS) is zeroed by both tools
        ys.append(cap.mlp_out[0, 1:])
    X = torch.cat(xs).transpose(0, 1).contiguous().double()  # [L, N, d]
    Y = torch.cat(ys).transpose(0, 1).contiguous().double()
    L, N, d = X.shape
    model_arch = lm.model.config.architectures[0] if lm.model.config.architectures else "?"
    del lm

    g = torch.Generator().manual_seed(seed)
    F_ = n_features
    p = active / F_
    W_enc = torch.randn(L, F_, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    pre = torch.einsum("lnd,lfd->lnf", X, W_enc)  # [L, N, F]
    s = pre.std(dim=1).clamp_min(1e-6)  # [L, F]
    b_enc = 0.1 * s * torch.randn(L, F_, generator=g, dtype=torch.float64)
    pre = pre + b_enc[:, None]
    theta = torch.empty(L, F_, dtype=torch.float64)
    for l in range(L):
        z = (pre[l] / s[l]).flatten().sort().values
        rank = int(round((1 - p) * z.numel()))
        theta[l] = _gap_midpoint(z, rank) * s[l]
    if not bool((theta > 0).all()):
        raise SystemExit(f"{case}: a calibrated threshold is <= 0; use a smaller --active")
    acts = pre * (pre > theta[:, None])  # [L, N, F]

    # Decoders: random directions, scaled per target layer so the reconstruction has the
    # norm of the real MLP output (the error nodes then carry about as much as the features).
    T = [(L - l) if kind == "clt" else 1 for l in range(L)]
    W_dec = [torch.randn(F_, T[l], d, generator=g, dtype=torch.float64) / math.sqrt(d) for l in range(L)]
    recon = torch.zeros(L, N, d, dtype=torch.float64)
    for l in range(L):
        recon[l : l + T[l]] += torch.einsum("nf,ftd->tnd", acts[l], W_dec[l])
    target_norm = Y.norm(dim=-1).mean(1)
    scale = target_norm / recon.norm(dim=-1).mean(1).clamp_min(1e-12)  # per target layer
    for l in range(L):
        W_dec[l] *= scale[l : l + T[l]][None, :, None]
    b_dec = 0.5 * Y.mean(1)  # [L, d]

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    f32 = lambda t: t.float().contiguous()  # noqa: E731
    if kind == "plt":
        for l in range(L):
            save_file(
                {
                    "W_enc": f32(W_enc[l]),
                    "W_dec": f32(W_dec[l][:, 0]),
                    "b_enc": f32(b_enc[l]),
                    "b_dec": f32(b_dec[l]),
                    "activation_function.threshold": f32(theta[l]),
                },
                str(tmp / f"layer_{l}.safetensors"),
            )
        model_kind = "transcoder_set"
    else:
        for l in range(L):
            save_file(
                {
                    f"W_enc_{l}": f32(W_enc[l]),
                    f"b_enc_{l}": f32(b_enc[l]),
                    f"b_dec_{l}": f32(b_dec[l]),
                    f"threshold_{l}": f32(theta[l]),
                },
                str(tmp / f"W_enc_{l}.safetensors"),
            )
            save_file({f"W_dec_{l}": f32(W_dec[l])}, str(tmp / f"W_dec_{l}.safetensors"))
        model_kind = "cross_layer_transcoder"
    # mlp.hook_in = output of the pre-MLP norm (what the MLP reads);
    # hook_mlp_out = what the MLP block adds to the residual (Gemma: after post_feedforward_layernorm).
    (tmp / "config.yaml").write_text(
        f"model_kind: {model_kind}\n"
        f"feature_input_hook: mlp.hook_in\n"
        f"feature_output_hook: hook_mlp_out\n"
        f"scan: cltrace-parity/{out.name}\n"
    )
    meta = {
        "case": case,
        "kind": kind,
        "model_dir": str(model_dir),
        "architecture": model_arch,
        "n_layers": L,
        "d_model": d,
        "n_features": F_,
        "seed": seed,
        "target_active_per_layer_token": active,
        "calibration_active_per_layer_token": float((acts > 0).sum() / (L * N)),
        "calibration_tokens": N,
    }
    (tmp / "parity_meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    log(
        f"  built {kind.upper()} {L}x{F_} in {time.perf_counter() - t0:.1f} s "
        f"({meta['calibration_active_per_layer_token']:.1f} active / layer / token) -> {out}"
    )
    return out


# --------------------------------------------------------------------------- cltrace side


def load_cltrace_transcoder(tc_dir: Path):
    """cltrace's reader of circuit-tracer's format when present, else a local conversion."""
    try:
        from cltrace.transcoders import interop  # type: ignore
    except ImportError:
        interop = None
    if interop is not None:
        for fn in (
            "load_circuit_tracer",
            "load_circuit_tracer_transcoder",
            "from_circuit_tracer",
            "load_circuit_tracer_dir",
            "read_circuit_tracer",
            "load",
        ):
            if hasattr(interop, fn):
                return getattr(interop, fn)(tc_dir), f"cltrace.transcoders.interop.{fn}"
    return _convert_ct_transcoder(tc_dir), "bench fallback converter"


def _convert_ct_transcoder(tc_dir: Path):
    """Build a cltrace Transcoder from circuit-tracer files (used only until interop exists)."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from cltrace.transcoders.config import TranscoderConfig
    from cltrace.transcoders.model import Transcoder

    cfg = yaml.safe_load((tc_dir / "config.yaml").read_text())
    if cfg["model_kind"] == "transcoder_set":
        layers = [
            load_file(str(p))
            for p in sorted(tc_dir.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
        ]
        W_enc = [t["W_enc"] for t in layers]
        b_enc = [t["b_enc"] for t in layers]
        thr = [t["activation_function.threshold"] for t in layers]
        b_dec = [t["b_dec"] for t in layers]
        W_dec = [t["W_dec"][:, None, :] for t in layers]
        kind = "plt"
    else:
        L = len(list(tc_dir.glob("W_enc_*.safetensors")))
        enc = [load_file(str(tc_dir / f"W_enc_{l}.safetensors")) for l in range(L)]
        W_enc = [e[f"W_enc_{l}"] for l, e in enumerate(enc)]
        b_enc = [e[f"b_enc_{l}"] for l, e in enumerate(enc)]
        thr = [e[f"threshold_{l}"] for l, e in enumerate(enc)]
        b_dec = [e[f"b_dec_{l}"] for l, e in enumerate(enc)]
        W_dec = [load_file(str(tc_dir / f"W_dec_{l}.safetensors"))[f"W_dec_{l}"] for l in range(L)]
        kind = "clt"
    L = len(W_enc)
    F_, d = W_enc[0].shape
    tc = Transcoder(TranscoderConfig(n_layers=L, d_model=d, n_features=F_, kind=kind))
    with torch.no_grad():
        tc.W_enc.copy_(torch.stack([w.T for w in W_enc]))
        tc.b_enc.copy_(torch.stack(b_enc))
        tc.log_threshold.copy_(torch.stack(thr).log())
        tc.b_dec.copy_(torch.stack(b_dec))
        for l in range(L):
            tc.W_dec[l].copy_(W_dec[l])
    return tc.eval().requires_grad_(False)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_cltrace_job(job_path: str) -> None:
    """--cltrace-job: the cltrace half of one comparison (its own process, like ct_runner)."""
    job = json.loads(Path(job_path).read_text())
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(int(job.get("threads", 2)))
    from cltrace.attribution.graph import AttributionConfig, attribute
    from cltrace.models.loading import load_model_dir

    t0 = time.perf_counter()
    lm = load_model_dir(Path(job["model_dir"]), name=job.get("model_name", job["model_dir"]))
    tc, loader = load_cltrace_transcoder(Path(job["transcoder_dir"]))
    load_s = time.perf_counter() - t0
    for p in job["prompts"]:
        ids = torch.tensor(p["ids"], dtype=torch.long)
        bos_override = None
        if (
            job.get("zero_special_first")
            and lm.bos_token_id != p["ids"][0]
            and p["ids"][0] in set(lm.tokenizer.all_special_ids)
        ):
            # circuit-tracer zeroes position 0 whenever its token is special; cltrace's
            # zero_bos only when it is lm.bos_token_id. Make cltrace see it as BOS.
            bos_override = p["ids"][0]
            lm.__class__ = type(
                "ParityLoadedModel", (type(lm),), {"bos_token_id": property(lambda self, b=bos_override: b)}
            )
        with torch.no_grad():
            last_logits = lm.run(ids[None])[0, -1].float().cpu()
        cfg = AttributionConfig(
            max_n_logits=int(job["max_n_logits"]),
            desired_logit_prob=float(job["desired_logit_prob"]),
            max_feature_nodes=p.get("max_feature_nodes"),
            batch_size=job.get("batch_size"),
            progress=False,
        )
        rss_before = rss_mib()
        t0 = time.perf_counter()
        graph = attribute(lm, tc, ids, cfg)
        attr_s = time.perf_counter() - t0
        tensors = {
            "adjacency": graph.adjacency.float().contiguous(),
            "active_features": graph.active_features.long().contiguous(),
            "activation_values": graph.activation_values.float().contiguous(),
            "selected_features": graph.selected_features.long().contiguous(),
            "logit_token_ids": graph.logit_tokens.long().contiguous(),
            "logit_probabilities": graph.logit_probabilities.float().contiguous(),
            "input_tokens": graph.input_tokens.long().contiguous(),
            "last_logits": last_logits.contiguous(),
        }
        save_file(tensors, str(out_dir / f"{p['tag']}.safetensors"))
        meta = {
            "tool": "cltrace",
            "tag": p["tag"],
            "n_tokens": len(p["ids"]),
            "n_active_features": int(graph.active_features.shape[0]),
            "n_selected_features": int(graph.selected_features.shape[0]),
            "n_nodes": int(graph.adjacency.shape[0]),
            "n_logits": int(graph.n_logits),
            "attribute_s": attr_s,
            "load_s": load_s,
            "transcoder_loader": loader,
            "rss_before_attribute_mib": rss_before,
            "peak_rss_mib": vm_hwm_mib(),
            "max_feature_nodes": p.get("max_feature_nodes"),
            "bos_override": bos_override,
            "batch_size": graph.stats.get("batch_size", job.get("batch_size")),
            "total_s": time.perf_counter() - t_start,
        }
        (out_dir / f"{p['tag']}.json").write_text(json.dumps(meta, indent=1))
        print(
            f"[cltrace] {p['tag']}: {meta['n_active_features']} active, {meta['n_nodes']} nodes, "
            f"attribute {attr_s:.2f} s, peak RSS {meta['peak_rss_mib']:.0f} MiB",
            flush=True,
        )


# --------------------------------------------------------------------------- comparison


def _node_keys(t: dict) -> tuple[list, int, int]:
    """Keys of every node in adjacency order, plus n_layers*n_pos and n_pos."""
    feats = t["active_features"][t["selected_features"]].tolist()
    n_pos = int(t["input_tokens"].numel())
    n_sel = len(feats)
    n_nodes = int(t["adjacency"].shape[0])
    n_log = int(t["logit_token_ids"].numel())
    n_err = n_nodes - n_sel - n_pos - n_log
    n_layers = n_err // n_pos
    keys = [("f", *f) for f in feats]
    keys += [("e", l, p) for l in range(n_layers) for p in range(n_pos)]
    keys += [("t", p) for p in range(n_pos)]
    keys += [("l", int(tok)) for tok in t["logit_token_ids"].tolist()]
    return keys, n_err, n_pos


def compare(ct_file: Path, cl_file: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(ct_file)), load_file(str(cl_file))
    ka, _, _ = _node_keys(a)
    kb, _, _ = _node_keys(b)
    ib = {k: i for i, k in enumerate(kb)}
    common = [(i, ib[k]) for i, k in enumerate(ka) if k in ib]
    ia = torch.tensor([c[0] for c in common])
    jb = torch.tensor([c[1] for c in common])
    A = a["adjacency"][ia][:, ia].double()
    B = b["adjacency"][jb][:, jb].double()
    scale = float(A.abs().max())
    diff = (A - B).abs()
    kinds = [ka[i][0] for i in ia.tolist()]
    rows_f = torch.tensor([k == "f" for k in kinds])
    rows_l = torch.tensor([k == "l" for k in kinds])

    def rel_cols(mask):
        return float(diff[:, mask].max()) / scale if bool(mask.any()) and scale > 0 else 0.0

    def rel(mask):
        return float(diff[mask].max()) / scale if bool(mask.any()) and scale > 0 else 0.0

    cols = {k: torch.tensor([c == k for c in kinds]) for k in "fetl"}
    by_source = {name: rel_cols(cols[k]) for name, k in (("feature", "f"), ("error", "e"), ("token", "t"))}
    non_token = ~cols["t"]
    tok_a, tok_b = A[:, cols["t"]], B[:, cols["t"]]
    big = tok_a.abs() > 1e-3 * max(float(tok_a.abs().max()), 1e-30)
    ratio = (tok_b[big] / tok_a[big]) if bool(big.any()) else None
    act_a = {tuple(f): v for f, v in zip(a["active_features"].tolist(), a["activation_values"].tolist())}
    act_b = {tuple(f): v for f, v in zip(b["active_features"].tolist(), b["activation_values"].tolist())}
    both = act_a.keys() & act_b.keys()
    act_rel = max((abs(act_a[k] - act_b[k]) / max(abs(act_a[k]), 1e-12) for k in both), default=0.0)
    sel_a = {k for k in ka if k[0] == "f"}
    sel_b = {k for k in kb if k[0] == "f"}
    la, lb = a["last_logits"].double(), b["last_logits"].double()
    return {
        "max_abs_diff_rel": float(diff.max()) / scale if scale > 0 else 0.0,
        "max_abs_diff_rel_non_token_sources": rel_cols(non_token),
        "max_abs_diff_rel_by_source": by_source,
        # circuit-tracer reads token edges against the raw embedding row, not the residual
        # the model adds (Gemma scales embeddings by sqrt(d)): then this ratio is sqrt(d).
        "token_edge_ratio_cltrace_over_ct": (
            None if ratio is None else [float(ratio.min()), float(ratio.median()), float(ratio.max())]
        ),
        "max_abs_diff_rel_feature_rows": rel(rows_f),
        "max_abs_diff_rel_logit_rows": rel(rows_l),
        "max_abs_edge": scale,
        "n_common_nodes": len(common),
        "n_nodes_ct": len(ka),
        "n_nodes_cltrace": len(kb),
        "active_features_ct": len(act_a),
        "active_features_cltrace": len(act_b),
        "active_sets_equal": act_a.keys() == act_b.keys(),
        "activation_max_rel_diff": act_rel,
        "selected_ct": len(sel_a),
        "selected_cltrace": len(sel_b),
        "selected_common": len(sel_a & sel_b),
        "logit_tokens_ct": a["logit_token_ids"].tolist(),
        "logit_tokens_cltrace": b["logit_token_ids"].tolist(),
        "same_input_tokens": a["input_tokens"].tolist() == b["input_tokens"].tolist(),
        "model_logits_max_abs_diff": float((la - lb).abs().max()) if la.shape == lb.shape else None,
        "model_logits_scale": float(la.abs().max()),
    }


# --------------------------------------------------------------------------- driver


def run_side(cmd: list[str], job: dict, job_path: Path, timeout: float) -> tuple[bool, float, str]:
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job, indent=1))
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(job["threads"]),
        MKL_NUM_THREADS=str(job["threads"]),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            [*cmd, str(job_path)], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO)
        )
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    tail = (r.stdout + r.stderr).strip().splitlines()
    if r.returncode != 0:
        return False, wall, "\n".join(tail[-25:])
    return True, wall, "\n".join(l for l in tail if l.startswith("["))


def cltrace_ready() -> str | None:
    """None when cltrace's attribute() can be imported, else why not."""
    try:
        from cltrace.attribution.graph import AttributionConfig, attribute  # noqa: F401
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    ap.add_argument("--prompts", default="short,long", help=f"comma list of {list(PROMPTS)}")
    ap.add_argument(
        "--active", type=float, default=25.0, help="target active features per layer per token (calibration)"
    )
    ap.add_argument("--features", type=int, default=None, help="features per layer (all cases)")
    ap.add_argument(
        "--max-feature-nodes-short",
        type=int,
        default=512,
        help="feature targets for the short prompt (0: every active feature)",
    )
    ap.add_argument(
        "--max-feature-nodes-long",
        type=int,
        default=512,
        help="feature targets for the long prompt (0: every active feature)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--skip-ct", action="store_true", help="reuse circuit-tracer results on disk")
    ap.add_argument("--skip-cltrace", action="store_true", help="run only circuit-tracer")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse both tools' results on disk where present (re-compare only)",
    )
    ap.add_argument(
        "--zero-special-first",
        action="store_true",
        help="make cltrace zero position 0 whenever its token is a special token, as "
        "circuit-tracer does (cltrace's zero_bos only zeroes lm.bos_token_id)",
    )
    ap.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="use this transformers directory for a bundled model name",
    )
    ap.add_argument("--out", default=str(BENCH / "results" / "parity.json"))
    ap.add_argument("--cltrace-job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.cltrace_job:
        run_cltrace_job(args.cltrace_job)
        return 0

    os.chdir(REPO)  # cltrace's cache folder (.cache/cltrace) is found from the checkout
    overrides = dict(kv.split("=", 1) for kv in args.model_dir)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; known: {list(CASES)}")
    for p in prompts:
        if p not in PROMPTS:
            raise SystemExit(f"unknown prompt {p!r}; known: {list(PROMPTS)}")

    ct_py = ensure_ct_venv()
    why_not = None if args.skip_cltrace else cltrace_ready()
    if why_not:
        log(f"note: cltrace's attribute() is not importable ({why_not}); running circuit-tracer only")

    rows = []
    for case in cases:
        model_name, kind, n_feat = CASES[case]
        n_feat = args.features or n_feat
        model_dir = resolve_model_dir(model_name, overrides)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        bos = tok.bos_token_id
        prompt_ids = {}
        for p in PROMPTS:  # every prompt, so the calibration does not depend on --prompts
            ids = list(tok(PROMPTS[p], add_special_tokens=False)["input_ids"])
            prompt_ids[p] = ([bos] if bos is not None else []) + ids
        log(
            f"== {case}: {model_dir} ({kind}, {n_feat} features/layer); "
            + ", ".join(f"{p}: {len(prompt_ids[p])} tokens" for p in prompts)
        )
        tc_dir = build_transcoder(
            case, model_dir, prompt_ids, n_feat, args.active, args.seed, WORK / "transcoders"
        )
        for p in prompts:
            mfn = args.max_feature_nodes_short if p == "short" else args.max_feature_nodes_long
            mfn = mfn or None
            tag = f"{case}-{p}"
            run_dir = WORK / "runs" / tc_dir.name
            common = {
                "model_dir": str(model_dir),
                "model_name": model_name,
                "transcoder_dir": str(tc_dir),
                "max_n_logits": 10,
                "desired_logit_prob": 0.95,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "zero_special_first": args.zero_special_first,
                "prompts": [{"tag": tag, "ids": prompt_ids[p], "max_feature_nodes": mfn}],
            }
            row = {
                "case": case,
                "prompt": p,
                "model": model_name,
                "kind": kind,
                "n_features_per_layer": n_feat,
                "n_tokens": len(prompt_ids[p]),
                "max_feature_nodes": mfn,
                "batch_size": args.batch_size,
                "transcoder_dir": str(tc_dir),
            }
            ct_out, cl_out = run_dir / "ct", run_dir / "cltrace"
            if not ((args.skip_ct or args.reuse) and (ct_out / f"{tag}.json").exists()):
                job = dict(common, out_dir=str(ct_out), view_dir=str(WORK / "ct-model-view" / model_name))
                ok, wall, msg = run_side(
                    [str(ct_py), str(BENCH / "ct_runner.py")],
                    job,
                    run_dir / f"{tag}.ct-job.json",
                    args.timeout,
                )
                log(msg)
                if not ok:
                    row["ct_error"] = msg
                    rows.append(row)
                    continue
                row["ct_process_wall_s"] = wall
            else:
                row["ct_process_wall_s"] = None  # reused from disk
            ct_meta = json.loads((ct_out / f"{tag}.json").read_text())
            row.update(
                {
                    "ct_attribute_s": ct_meta["attribute_s"],
                    "ct_peak_rss_mib": ct_meta["peak_rss_mib"],
                    "ct_load_s": ct_meta["load_s"],
                    "n_active": ct_meta["n_active_features"],
                    "ct_n_nodes": ct_meta["n_nodes"],
                }
            )
            if not why_not and not args.skip_cltrace:
                job = dict(common, out_dir=str(cl_out))
                if args.reuse and (cl_out / f"{tag}.json").exists():
                    ok, wall, msg = True, None, ""
                else:
                    ok, wall, msg = run_side(
                        [sys.executable, str(Path(__file__).resolve()), "--cltrace-job"],
                        job,
                        run_dir / f"{tag}.cltrace-job.json",
                        args.timeout,
                    )
                    log(msg)
                if ok:
                    cl_meta = json.loads((cl_out / f"{tag}.json").read_text())
                    row.update(
                        {
                            "cltrace_attribute_s": cl_meta["attribute_s"],
                            "cltrace_peak_rss_mib": cl_meta["peak_rss_mib"],
                            "cltrace_load_s": cl_meta["load_s"],
                            "cltrace_process_wall_s": wall,
                            "cltrace_transcoder_loader": cl_meta["transcoder_loader"],
                            "cltrace_batch_size": cl_meta["batch_size"],
                            "cltrace_bos_override": cl_meta.get("bos_override"),
                        }
                    )
                    row["speedup"] = row["ct_attribute_s"] / max(cl_meta["attribute_s"], 1e-9)
                    row.update(compare(ct_out / f"{tag}.safetensors", cl_out / f"{tag}.safetensors"))
                else:
                    row["cltrace_error"] = msg
            rows.append(row)

    # ---- table
    head = (
        f"{'case':<12} {'prompt':<6} {'tok':>3} {'active':>6} {'nodes':>6} {'ct s':>7} "
        f"{'cltrace s':>9} {'speedup':>7} {'ct MiB':>7} {'cl MiB':>7} {'max|dA|/max|A|':>15} "
        f"{'excl. tokens':>12} ok"
    )
    log("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        rel = r.get("max_abs_diff_rel")
        rel_nt = r.get("max_abs_diff_rel_non_token_sources")
        ratio = r.get("token_edge_ratio_cltrace_over_ct")
        ok = "-"
        if rel is not None:
            same = bool(r.get("active_sets_equal")) and r.get("logit_tokens_ct") == r.get(
                "logit_tokens_cltrace"
            )
            ok = "yes" if rel <= 1e-4 and same else "NO"
            if ok == "NO" and same and rel_nt <= 1e-4 and ratio and ratio[2] - ratio[0] < 1e-3 * ratio[1]:
                ok = f"yes (tokens x{ratio[1]:.3f})"
        log(
            f"{r['case']:<12} {r['prompt']:<6} {r['n_tokens']:>3} {r.get('n_active', 0):>6} "
            f"{r.get('ct_n_nodes', 0):>6} {fmt(r.get('ct_attribute_s')):>7} "
            f"{fmt(r.get('cltrace_attribute_s')):>9} {fmt(r.get('speedup'), '.2f'):>7} "
            f"{fmt(r.get('ct_peak_rss_mib'), '.0f'):>7} {fmt(r.get('cltrace_peak_rss_mib'), '.0f'):>7} "
            f"{fmt(rel, '.2e'):>15} {fmt(r.get('max_abs_diff_rel_non_token_sources'), '.2e'):>12} {ok}"
        )
        for k in ("ct_error", "cltrace_error"):
            if k in r:
                log(f"    {k}: {r[k].splitlines()[-1] if r[k] else ''}")

    import platform

    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ct_ver = subprocess.run(
        [
            str(ct_py),
            "-c",
            "import circuit_tracer, nnsight, transformers, torch;"
            "print(circuit_tracer.__version__, nnsight.__version__, "
            "transformers.__version__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    report = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
        "versions": {
            "cltrace_torch": torch.__version__,
            "circuit_tracer": dict(zip(["circuit_tracer", "nnsight", "transformers", "torch"], ct_ver)),
        },
        "settings": {
            "zero_special_first": args.zero_special_first,
            "active_target": args.active,
            "seed": args.seed,
            "max_n_logits": 10,
            "desired_logit_prob": 0.95,
            "batch_size": args.batch_size,
            "prompts": {p: PROMPTS[p] for p in prompts},
        },
        "goal_max_abs_diff_rel": 1e-4,
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=1))
    log(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
