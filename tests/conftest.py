"""Shared fixtures: paths to the repo and the real data, the real SmolLM2 tokenizer, a tiny random Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

try:  # fuzz tests (tests/test_fuzz.py): a fixed number of examples in CI, more with --hypothesis-profile=long
    from hypothesis import HealthCheck, settings

    _SLOW_OK = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    settings.register_profile("ci", max_examples=40, **_SLOW_OK)
    settings.register_profile("long", max_examples=1000, **_SLOW_OK)
    settings.load_profile("ci")
except ImportError:
    pass


AUTO_LINEAR_KERNELS = ("onednn", "torch")
KERNEL_SITE = REPO_ROOT / "tests" / "kernel_site"


def pytest_addoption(parser):
    parser.addoption(
        "--auto-linear-kernel", choices=("measure", *AUTO_LINEAR_KERNELS), default="measure",
        help="What linear_kernel='auto' picks in the test process and every subprocess it starts: this host's "
             "measurement (default), or forced to oneDNN (what AVX-512 hosts measure) or torch/MKL (what some "
             "AVX2-only hosts measure), to run the suite as another host would.")


def pytest_configure(config):
    forced = config.getoption("--auto-linear-kernel")
    if forced != "measure":
        # this process, for the whole session (module- and session-scoped fixtures score too) ...
        import scorers.onednn as onednn

        onednn.onednn_is_faster = lambda *a, **kw: forced == "onednn"
        # ... and every subprocess: tests/kernel_site/sitecustomize.py applies the same choice
        os.environ["SDPO_TESTS_AUTO_LINEAR_KERNEL"] = forced
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(KERNEL_SITE), os.environ.get("PYTHONPATH")) if p)


def _force_auto_linear_kernel(monkeypatch, choice: str, subprocesses: bool = False) -> None:
    """``linear_kernel="auto"`` picks ``choice`` in this process and, with ``subprocesses``, in every Python
    subprocess started while ``monkeypatch`` holds (tests/kernel_site/sitecustomize.py, as pytest_configure does)."""
    import scorers.onednn as onednn

    monkeypatch.setattr(onednn, "onednn_is_faster", lambda *a, **kw: choice == "onednn")
    if subprocesses:
        monkeypatch.setenv("SDPO_TESTS_AUTO_LINEAR_KERNEL", choice)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(KERNEL_SITE), os.environ.get("PYTHONPATH"))
                                                         if p))


@pytest.fixture(params=AUTO_LINEAR_KERNELS)
def each_auto_linear_kernel(request, monkeypatch) -> str:
    """Runs a kernel-dependent test once per outcome of linear_kernel='auto' (oneDNN, torch/MKL) whatever this host
    measures, so CI checks the choice every other host may make."""
    _force_auto_linear_kernel(monkeypatch, request.param)
    return request.param


def subprocess_env(**extra) -> dict:
    """The environment of a Python subprocess of a test: this checkout first on PYTHONPATH, the forced kernel site
    (``--auto-linear-kernel``) kept."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data(repo_root, tmp_path_factory) -> Path:
    """``../shared/data`` beside the checkout; without it, the package's bundled copies of orca_dpo_pairs and
    dpo_en_demo laid out the same way (tests of the other sources then fail, naming the missing file). In CI the
    folder must be there: its absence fails the run instead of narrowing it."""
    path = repo_root.parent / "shared" / "data"
    if path.is_dir():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"real data folder {path} is missing: CI runs with ../shared beside the checkout")
    bundled = repo_root / "partitioner" / "bundled"
    fallback = tmp_path_factory.mktemp("bundled-data")
    for target, source in (("orca_dpo_pairs/validation.jsonl", "orca_dpo_pairs.jsonl"),
                           ("llamafactory_demo/dpo_en_demo.json", "llamafactory_dpo_en_demo.json")):
        (fallback / target).parent.mkdir(parents=True, exist_ok=True)
        (fallback / target).symlink_to(bundled / source)
    return fallback


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from scorers.models import load_tokenizer

    return load_tokenizer("bundled")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random LlamaForCausalLM (hidden 64, 2 layers, 2 heads) with the real SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = smollm2_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def real_pairs(shared_data: Path, n_orca: int = 8, n_llamafactory: int = 8):
    """A small real multi-source conversational set (orca + llamafactory en), loaded by the project's loader."""
    import datasets

    from partitioner.data.loading import load_preferences

    orca = shared_data / "orca_dpo_pairs" / "validation.jsonl"
    lf = shared_data / "llamafactory_demo" / "dpo_en_demo.json"
    parts = [load_preferences([str(orca)]).select(range(n_orca)), load_preferences([str(lf)]).select(range(n_llamafactory))]
    return datasets.concatenate_datasets(parts)
