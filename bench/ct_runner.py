"""Run circuit-tracer 0.5.0 on one job; executed by circuit-tracer's OWN virtualenv.

This script never imports cltrace. bench/parity_circuit_tracer.py writes a job JSON and runs

    .cache/ct-venv/bin/python bench/ct_runner.py JOB.json

The job names a transformers model directory (written by transformers 5.x), a transcoder
directory in circuit-tracer's on-disk format (config.yaml + safetensors), the token ids of
each prompt (BOS already first, so circuit-tracer adds nothing) and the attribution settings.
For each prompt it writes into the job's out_dir:

    <tag>.safetensors   adjacency [n, n] (row = target, col = source), active_features
                        [n_active, 3] (layer, pos, feature), activation_values,
                        selected_features, logit_token_ids, logit_probabilities,
                        input_tokens, last_logits (the model's logits at the last position)
    <tag>.json          timings, peak RSS, counts, versions

circuit-tracer pulls transformers 4.57, which cannot read two things a 5.x directory holds:
`rope_parameters` in config.json (it silently falls back to rope_theta = 10000, which is
wrong for SmolLM2's 100000) and `tokenizer_class: TokenizersBackend`. So the model is loaded
from a "view" folder: symlinks to the weights and tokenizer.json, plus a config.json with the
4.x RoPE keys added and a tokenizer_config.json naming PreTrainedTokenizerFast. The weights
and the tokenizer itself are untouched.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process image in MiB (VmHWM).

    Not getrusage(RUSAGE_SELF).ru_maxrss: on Linux that keeps the high-water mark of the
    process image before execve, i.e. of the (possibly large) parent that spawned us.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_model_view(model_dir: Path, view: Path) -> Path:
    """A folder transformers 4.57 reads the same way transformers 5.x reads model_dir."""
    view.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name in ("config.json", "tokenizer_config.json"):
            continue
        link = view / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f.resolve())

    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:  # one RoPE for every layer (Llama, Qwen)
            cfg.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                cfg.setdefault("rope_scaling", rope)
        else:  # per layer type (Gemma 3: full_attention / sliding_attention)
            full = rope.get("full_attention", {})
            local = rope.get("sliding_attention", {})
            if "rope_theta" in full:
                cfg.setdefault("rope_theta", full["rope_theta"])
            if "rope_theta" in local:
                cfg.setdefault("rope_local_base_freq", local["rope_theta"])
            if full.get("rope_type", "default") != "default":
                cfg.setdefault("rope_scaling", full)
    (view / "config.json").write_text(json.dumps(cfg, indent=1))

    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("backend", "is_local", "local_files_only"):
        tcfg.pop(k, None)
    (view / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
    return view


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(int(job.get("threads", 2)))
    import circuit_tracer
    import transformers
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
    from safetensors.torch import save_file

    dtype = getattr(torch, job.get("dtype", "float32"))
    device = torch.device("cpu")
    view = make_model_view(Path(job["model_dir"]), Path(job["view_dir"]))

    t0 = time.perf_counter()
    # An absolute folder path with config.yaml is read as a local transcoder directory.
    transcoders, _ = load_transcoder_from_hub(
        str(Path(job["transcoder_dir"]).resolve()),
        device=device,
        dtype=dtype,
        lazy_encoder=bool(job.get("lazy_encoder", False)),
        lazy_decoder=bool(job.get("lazy_decoder", True)),
    )
    model = ReplacementModel.from_pretrained_and_transcoders(
        str(view), transcoders, backend="nnsight", device=device, dtype=dtype
    )
    load_s = time.perf_counter() - t0
    rss_after_load = rss_mib()

    results = []
    for p in job["prompts"]:
        ids = torch.tensor(p["ids"], dtype=torch.long)
        seen = model.ensure_tokenized(ids).cpu()
        if seen.tolist() != p["ids"]:
            raise SystemExit(
                f"circuit-tracer changed the token ids of {p['tag']}: "
                f"{p['ids']} -> {seen.tolist()} (first id must be a special token)"
            )

        with torch.no_grad():
            last_logits = model.get_activations(ids)[0][0, -1].float().cpu()

        rss_before = rss_mib()
        t0 = time.perf_counter()
        graph = attribute(
            ids,
            model,
            max_n_logits=int(job["max_n_logits"]),
            desired_logit_prob=float(job["desired_logit_prob"]),
            batch_size=int(job["batch_size"]),
            max_feature_nodes=p.get("max_feature_nodes"),
            verbose=False,
        )
        attr_s = time.perf_counter() - t0

        tensors = {
            "adjacency": graph.adjacency_matrix.float().contiguous(),
            "active_features": graph.active_features.long().contiguous(),
            "activation_values": graph.activation_values.float().contiguous(),
            "selected_features": graph.selected_features.long().contiguous(),
            "logit_token_ids": graph.logit_token_ids.long().cpu().contiguous(),
            "logit_probabilities": graph.logit_probabilities.float().cpu().contiguous(),
            "input_tokens": graph.input_tokens.long().cpu().contiguous(),
            "last_logits": last_logits.contiguous(),
        }
        save_file(tensors, str(out_dir / f"{p['tag']}.safetensors"))
        meta = {
            "tool": "circuit-tracer",
            "tag": p["tag"],
            "n_tokens": len(p["ids"]),
            "n_active_features": int(graph.active_features.shape[0]),
            "n_selected_features": int(graph.selected_features.shape[0]),
            "n_nodes": int(graph.adjacency_matrix.shape[0]),
            "n_logits": int(len(graph.logit_token_ids)),
            "attribute_s": attr_s,
            "load_s": load_s,
            "rss_before_attribute_mib": rss_before,
            "rss_after_load_mib": rss_after_load,
            "peak_rss_mib": peak_rss_mib(),
            "max_feature_nodes": p.get("max_feature_nodes"),
            "batch_size": int(job["batch_size"]),
        }
        (out_dir / f"{p['tag']}.json").write_text(json.dumps(meta, indent=1))
        results.append(meta)
        print(
            f"[ct] {p['tag']}: {meta['n_active_features']} active, {meta['n_nodes']} nodes, "
            f"attribute {attr_s:.2f} s, peak RSS {meta['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        del graph, tensors

    summary = {
        "versions": {
            "circuit_tracer": circuit_tracer.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "total_s": time.perf_counter() - t_start,
        "peak_rss_mib": peak_rss_mib(),
        "prompts": results,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
