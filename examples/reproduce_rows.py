"""The replication's per-row tables: written from a finished results folder, read back by the report.

``export_rows(out, rows_dir, ...)`` writes, from a finished results folder, the tables that hold every number of
the report (gzipped CSV, byte-reproducible):

* ``m0.csv.gz``: every sampled row: ``row_id, source, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens``
  under M0;
* ``arms.csv.gz``: ``repetition, fold, arm, row_id, chosen_logps, rejected_logps`` of every arm's final model on its
  held-out fold;
* ``probe.csv.gz``: ``repetition, fold, arm, t, row_id, chosen_logps, rejected_logps`` of every intermediate M(t)
  on the fold's probe rows;
* ``truthfulqa.csv.gz``: ``repetition, fold, model, index, mc1, mc2`` (M0: repetition and fold -1);
* ``run.json``: the configuration, arms, timings, commands and machine.

``export_rows`` keeps, beside a run's own rows, those of the other (repetition, arm) runs already in ``rows_dir`` from
a run of the same configuration: ``--arms`` adds arms, ``--repetitions`` adds repetitions to the committed ones (run
on another day or machine; each model's machine is recorded). ``load_tables(rows_dir)`` reads the tables back
(as text, one dict per row) for ``reproduce_report.py``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from partitioner.io import atomic_write, read_json, write_json
from sdpo_core.errors import UserError

MODEL_FIELDS = ("repetition", "fold", "arm", "chunks", "optimizer_steps", "train_loss", "reference_source",
                "reference_step", "kl_to_reference", "step_loss", "crossfit_seconds", "train_pairs", "eval_rows",
                "train_seconds", "eval_seconds", "truthfulqa_seconds", "machine")


# ------------------------------------------------------------------------------------------------ the tables
def write_csv_gz(path: Path, header: list[str], rows) -> None:
    """A gzipped CSV with no timestamp in its header (the same rows give the same bytes), written atomically."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.getvalue().encode("utf-8"))
    atomic_write(path, buf.getvalue())


def read_csv_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _r(x: float) -> str:
    return repr(float(x))  # shortest round-trip text of the float


def _previous_rows(rows_dir: Path, out: Path, runs: set) -> dict | None:
    """The tables already in ``rows_dir`` when they come from a run of the same configuration (same identity: the
    same sample, folds, training and evaluation): the rows of the (repetition, arm) pairs not in ``runs`` (this
    run's) are kept beside this run's, so arms or repetitions added later (a run with ``--arms`` or
    ``--repetitions``) join the committed ones. ``None`` when there are none to keep."""
    if not (rows_dir / "run.json").exists():
        return None
    old = read_json(rows_dir / "run.json", "replication run")
    if old["config"]["identity"] != read_json(out / "config.json", "config")["identity"]:
        return None
    # columns 0 and 2: the repetition and the arm / model (M0's TruthfulQA rows: repetition -1, never this run's)
    other = lambda rows: [r for r in rows if (int(r[0]), r[2]) not in runs]  # noqa: E731
    tables = {name: other([list(r.values()) for r in read_csv_gz(rows_dir / f"{name}.csv.gz")])
              for name in ("arms", "probe", "truthfulqa")}
    tables["m0_truthfulqa"] = [r for r in tables["truthfulqa"] if r[2] == "M0"]
    tables["truthfulqa"] = [r for r in tables["truthfulqa"] if r[2] != "M0"]
    tables["run"] = old
    return tables


def export_rows(out: Path, rows_dir: Path, cfg, data: dict, machine: dict) -> None:
    """The per-row tables and ``run.json`` of results folder ``out`` into ``rows_dir`` (merged with the other arms'
    rows already there from the same configuration: see :func:`_previous_rows`)."""
    rows_dir.mkdir(parents=True, exist_ok=True)
    m0 = data["m0"]
    runs = {(rep, arm) for rep in cfg.repetitions for arm in cfg.arms}
    previous = _previous_rows(rows_dir, out, runs)
    if previous is not None and sorted(r["row_id"] for r in read_csv_gz(rows_dir / "m0.csv.gz")) != sorted(m0["row_id"]):
        raise UserError(f"{rows_dir} holds another sample's rows under the same configuration; use another rows_dir")
    if previous is None:  # else M0's rows stay the ones there (the same sample, scored by the first run)
        write_csv_gz(rows_dir / "m0.csv.gz", ["row_id", "source", "chosen_logps", "rejected_logps", "chosen_tokens",
                                          "rejected_tokens"],
                     ([r, s, _r(c), _r(j), ct, jt] for r, s, c, j, ct, jt in zip(
                         m0["row_id"], m0["source"], m0["chosen_logps"], m0["rejected_logps"], m0["chosen_tokens"],
                         m0["rejected_tokens"])))
    results = [read_json(p, "result") for p in sorted((out / "results").glob("rep*/fold*/*.json"))]
    order = {arm: i for i, arm in enumerate(cfg.arms)}
    results = [r for r in results if r["arm"] in order and r["repetition"] in cfg.repetitions]
    results.sort(key=lambda r: (r["repetition"], r["fold"], order[r["arm"]]))
    m0_of = {rid: (c, j) for rid, c, j in zip(m0["row_id"], m0["chosen_logps"], m0["rejected_logps"])}
    arms_rows, probe_rows, tqa_rows = [], [], []
    for r in results:
        key = [r["repetition"], r["fold"], r["arm"]]
        arms_rows += [key + [rid, _r(c), _r(j)] for rid, c, j in zip(r["row_id"], r["chosen_logps"],
                                                                      r["rejected_logps"])]
        final = dict(zip(r["row_id"], zip(r["chosen_logps"], r["rejected_logps"])))
        steps = len(r["chunks"])
        for t in range(steps + 1):
            for i, rid in enumerate(r["probe_row_id"]):
                if t == 0:
                    c, j = m0_of[rid]
                elif t == steps:
                    c, j = final[rid]
                else:
                    c, j = r["probe_scores"][t - 1]["chosen_logps"][i], r["probe_scores"][t - 1]["rejected_logps"][i]
                probe_rows.append(key + [t, rid, _r(c), _r(j)])
        tqa_rows += [key + [q["index"], _r(q["mc1"]), _r(q["mc2"])] for q in r["truthfulqa"]]
    tqa_rows = [[-1, -1, "M0", q["index"], _r(q["mc1"]), _r(q["mc2"])] for q in data["m0_truthfulqa"]] + tqa_rows
    if previous is not None:
        tqa_rows = previous["m0_truthfulqa"] + previous["truthfulqa"] + tqa_rows[len(data["m0_truthfulqa"]):]
        arms_rows, probe_rows = previous["arms"] + arms_rows, previous["probe"] + probe_rows
    write_csv_gz(rows_dir / "arms.csv.gz", ["repetition", "fold", "arm", "row_id", "chosen_logps", "rejected_logps"],
                 arms_rows)
    write_csv_gz(rows_dir / "probe.csv.gz", ["repetition", "fold", "arm", "t", "row_id", "chosen_logps",
                                             "rejected_logps"], probe_rows)
    write_csv_gz(rows_dir / "truthfulqa.csv.gz", ["repetition", "fold", "model", "index", "mc1", "mc2"], tqa_rows)
    invocations = []
    log = out / "invocations.jsonl"
    if log.exists():
        invocations = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]
    m0_tqa = out / "m0_truthfulqa.json"
    config = read_json(out / "config.json", "config")
    models = [{key: r[key] for key in MODEL_FIELDS if key in r} for r in results]
    if previous is not None:
        old = previous["run"]
        config["arms"] = {**{a: v for a, v in old["config"]["arms"].items() if a not in cfg.arms}, **config["arms"]}
        config["repetitions"] = sorted(set(old["config"]["repetitions"]) | set(config["repetitions"]))
        kept = [m for m in old["models"] if (m["repetition"], m["arm"]) not in runs]
        order = {arm: i for i, arm in enumerate(config["arms"])}
        models = sorted(kept + models, key=lambda m: (m["repetition"], m["fold"], order[m["arm"]]))
        invocations = old.get("invocations", []) + invocations
        machine = {"first_run": old.get("machine"), "added_runs": machine}
    write_json(rows_dir / "run.json", {
        "config": config,
        "sample": {src: len(ids) for src, ids in data["sample"].items()},
        "truthfulqa_questions": len(data["questions"]),
        "models": models,
        **({key: previous["run"].get(key) for key in ("m0_scoring_seconds", "m0_truthfulqa_seconds")}
           if previous is not None else {
            "m0_scoring_seconds": data["m0_scoring_seconds"],
            "m0_truthfulqa_seconds": read_json(m0_tqa, "M0 TruthfulQA")["seconds"] if m0_tqa.exists() else None}),
        "invocations": invocations,
        "commands": sorted({r["command"] for r in results} | set((previous or {}).get("run", {}).get("commands", []))),
        "machine": machine,
    })


def load_tables(rows_dir: Path) -> dict:
    need = ["m0.csv.gz", "arms.csv.gz", "probe.csv.gz", "truthfulqa.csv.gz", "run.json"]
    missing = [n for n in need if not (rows_dir / n).exists()]
    if missing:
        raise UserError(f"{rows_dir} lacks {', '.join(missing)}; run the replication first")
    run = read_json(rows_dir / "run.json", "replication run")
    return {"run": run, "m0": read_csv_gz(rows_dir / "m0.csv.gz"), "arms": read_csv_gz(rows_dir / "arms.csv.gz"),
            "probe": read_csv_gz(rows_dir / "probe.csv.gz"), "tqa": read_csv_gz(rows_dir / "truthfulqa.csv.gz")}
