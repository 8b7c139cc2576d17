"""Multi-response layouts expanded into pairs (Curri-DPO, arXiv 2403.07230): detection, pair counts for both
pairings, pair order by rating gap, row accounting with every reject reason, row ids, the command line, and the
curriculum end to end (load -> score rating_gap -> partition easy_to_hard gives the largest gaps first).

The fixtures in tests/data/multi_*.json[l] are hand-written, a few rows each, one per layout (tests/data/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from partitioner.data.formats import PreferenceDataError, detect_row_format
from partitioner.data.loading import LoadConfig, load_preferences, load_preferences_with_rejects, pair_content_hash
from partitioner.data.multi_response import pair_indices
from sdpo_core.columns import ROW_ID

DATA = Path(__file__).resolve().parent / "data"
# file: (layout, rows, pairs with best_vs_rest, pairs with all)
FIXTURES = {
    "multi_ultrafeedback.jsonl": ("ultrafeedback", 3, 8, 13),
    "multi_rated_responses.json": ("rated_responses", 2, 3, 4),
    "multi_chosen_rejected_lists.jsonl": ("chosen_rejected_lists", 2, 5, 5),
}


def _gaps(ds) -> list[float]:
    return [c - r for c, r in zip(ds["score_chosen"], ds["score_rejected"])]


# --------------------------------------------------------------------------------------------- detection, counts
@pytest.mark.parametrize("pairing", ["best_vs_rest", "all"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixtures_detected_and_expanded(name, pairing):
    fmt, rows, best, every = FIXTURES[name]
    ds, report = load_preferences_with_rejects(DATA / name, pairing=pairing)
    (src,) = report.sources
    pairs = best if pairing == "best_vs_rest" else every
    assert (src.format, src.rows_in, src.rows_kept, src.pairs) == (fmt, rows, rows, pairs)
    assert report.rows_in == report.rows_kept + report.rows_rejected and report.rejects == []
    assert len(ds) == report.pairs == pairs
    assert report.as_dict()["sources"][0]["pairs"] == pairs
    # one group per input row, ranks 1..k in output order, deterministic content-hash ids
    groups = {}
    for row in ds:
        groups.setdefault(row["group_id"], []).append(row["pair_rank"])
        assert row[ROW_ID] == pair_content_hash(row["prompt"], row["chosen"], row["rejected"])
    assert len(groups) == rows and all(ranks == list(range(1, len(ranks) + 1)) for ranks in groups.values())
    again = load_preferences(DATA / name, pairing=pairing)
    assert again[ROW_ID] == ds[ROW_ID] and again["group_id"] == ds["group_id"]


def test_layouts_of_rows():
    conv = [{"role": "assistant", "content": "Blue."}]
    assert detect_row_format({"instruction": "Q", "completions": []}) == "ultrafeedback"
    assert detect_row_format({"prompt": "Q", "responses": ["a"], "scores": [1]}) == "rated_responses"
    assert detect_row_format({"prompt": "Q", "chosen": ["a", "b"], "rejected": ["c"]}) == "chosen_rejected_lists"
    assert detect_row_format({"prompt": "Q", "chosen": [conv, conv], "rejected": [conv]}) == "chosen_rejected_lists"
    # a list of message objects is ONE conversational response, not several
    assert detect_row_format({"prompt": [{"role": "user", "content": "Q"}], "chosen": conv, "rejected": conv}) \
        == "conversational"
    # a pair layout with a completions/responses column beside it stays a pair layout
    assert detect_row_format({"prompt": "Q", "chosen": "a", "rejected": "b", "completions": [1]}) == "standard"
    assert detect_row_format({"responses": ["a"], "ratings": [1]}) is None  # no prompt
    ds = load_preferences(DATA / "multi_rated_responses.json")
    assert ds[0]["prompt"][0] == {"role": "system", "content": "Answer in one sentence."}
    assert ds[2]["prompt"] == [{"role": "user", "content": "What is 7 times 8?"}]  # text prompt of a message row
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in ds["chosen"])


# --------------------------------------------------------------------------------------------- pairs and their order
def test_pairs_ordered_by_rating_gap():
    best = load_preferences(DATA / "multi_ultrafeedback.jsonl")
    first = best.filter(lambda r: r["group_id"] == best[0]["group_id"])
    assert _gaps(first) == [7.0, 5.0, 3.0] and first["pair_rank"] == [1, 2, 3]
    assert set(first["chosen"]) == {"Blue: air scatters short (blue) wavelengths of sunlight the most."}
    tied_top = best.filter(lambda r: r["prompt"].startswith("Name a prime"))
    assert sorted(tied_top["chosen"]) == ["11 is prime.", "13, which has no divisors but 1 and itself."]
    assert set(tied_top["rejected"]) == {"12."}  # the tie on top gives no pair; each top response gets its pairs
    fine = best.filter(lambda r: r["prompt"].startswith("Translate"))
    assert fine["score_chosen"] == [4.5] * 3 and _gaps(fine) == [2.75, 1.25, 1.25]  # fine-grained_score fallback
    every = load_preferences(DATA / "multi_ultrafeedback.jsonl", pairing="all")
    for gid in set(every["group_id"]):
        group = every.filter(lambda r: r["group_id"] == gid)
        assert _gaps(group) == sorted(_gaps(group), reverse=True)
    first = every.filter(lambda r: r["group_id"] == best[0]["group_id"])
    assert _gaps(first) == [7.0, 5.0, 4.0, 3.0, 2.0, 2.0] and first["score_chosen"][-2:] == [6.0, 4.0]
    # (chosen, rejected) indices: largest gap first, ties by the higher chosen rating, then input order
    assert pair_indices([1.0, 5.0, 3.0, 3.0], "best_vs_rest") == [(1, 0), (1, 2), (1, 3)]
    assert pair_indices([1.0, 5.0, 3.0, 3.0], "all") == [(1, 0), (1, 2), (1, 3), (2, 0), (3, 0)]


def test_lists_layout_pairs_carry_no_invented_scores():
    ds = load_preferences(DATA / "multi_chosen_rejected_lists.jsonl")
    assert "score_chosen" not in ds.column_names and "score_rejected" not in ds.column_names
    assert ds.filter(lambda r: r["prompt"] == "Is the Earth round?")["rejected"] == [
        "No, it is flat.", "It is a cube.", "Nobody knows."]  # equal ranks: input order


def test_repeated_response_counts_once_and_columns_pass_through():
    row = {"prompt": "Q?", "responses": ["A", "A", "B"], "ratings": [5, 5, 1], "group_id": "mine", "note": 1}
    ds = load_preferences([row], pairing="all")
    assert (ds["chosen"], ds["rejected"]) == (["A"], ["B"])
    assert ds[0]["orig_group_id"] == "mine" and ds[0]["note"] == 1 and ds[0]["group_id"] != "mine"
    uf = load_preferences(DATA / "multi_ultrafeedback.jsonl")
    assert set(uf["orig_source"]) == {"hand_written"} and uf[0]["models"] == ["m1", "m2", "m3", "m4"]


def test_numpy_ratings_are_numbers():
    import numpy as np

    ds = load_preferences([{"prompt": "Q?", "responses": ["A", "B"], "ratings": [np.int64(3), np.float32(1.5)]}])
    assert (ds["score_chosen"], ds["score_rejected"]) == ([3.0], [1.5])


# --------------------------------------------------------------------------------------------- rejects
UF = {"instruction": "Q?", "completions": [{"response": "A", "overall_score": 5}, {"response": "B", "overall_score": 2}]}
RR = {"prompt": "Q?", "responses": ["A", "B"], "ratings": [5, 2]}
CL = {"prompt": "Q?", "chosen": ["A"], "rejected": ["B"]}
MSG = {"role": "assistant", "content": "B"}


def _uf(*completions, **kw):
    return {**UF, "completions": list(completions), **kw}


# name: (a good row of the input's layout, the bad row, its reason)
BAD = {
    "uf_one_completion": (UF, _uf({"response": "A", "overall_score": 5}), "too_few_responses"),
    "uf_no_completions": (UF, _uf(), "too_few_responses"),
    "rr_one_response": (RR, {**RR, "responses": ["A"], "ratings": [5]}, "too_few_responses"),
    "cl_empty_rejected": (CL, {**CL, "rejected": []}, "too_few_responses"),
    "uf_tied": (UF, _uf({"response": "A", "overall_score": 3}, {"response": "B", "overall_score": 3}), "tied_ratings"),
    "rr_tied": (RR, {**RR, "ratings": [4, 4]}, "tied_ratings"),
    "uf_rating_missing": (UF, _uf({"response": "A", "overall_score": 5}, {"response": "B"}), "bad_rating"),
    "uf_rating_null": (UF, _uf({"response": "A", "overall_score": 5}, {"response": "B", "overall_score": None}),
                       "bad_rating"),
    "uf_no_rating_key": (UF, _uf({"response": "A"}, {"response": "B"}), "bad_rating"),
    "uf_rating_text": (UF, _uf({"response": "A", "overall_score": "5"}, {"response": "B", "overall_score": 2}),
                       "bad_rating"),
    "rr_rating_bool": (RR, {**RR, "ratings": [True, False]}, "bad_rating"),
    "rr_rating_nan": (RR, {**RR, "ratings": [float("nan"), 1]}, "bad_rating"),
    "rr_rating_inf": (RR, {**RR, "ratings": [float("inf"), 1]}, "bad_rating"),
    "rr_rating_null": (RR, {**RR, "ratings": [None, 1]}, "bad_rating"),
    "rr_rating_huge_int": (RR, {**RR, "ratings": [10**5000, 1]}, "bad_rating"),  # past str()'s digit limit too
    "rr_length_mismatch": (RR, {**RR, "responses": ["A", "B", "C"]}, "length_mismatch"),
    "uf_empty_response": (UF, _uf({"response": " ", "overall_score": 5}, {"response": "B", "overall_score": 2}),
                          "empty_text"),
    "rr_empty_response": (RR, {**RR, "responses": ["", "B"]}, "empty_text"),
    "rr_empty_message": (RR, {**RR, "responses": [{"role": "assistant", "content": "\n"}, "B"]}, "empty_text"),
    "cl_empty_response": (CL, {**CL, "chosen": ["A", ""]}, "empty_text"),
    "uf_blank_prompt": (UF, {**UF, "instruction": "  "}, "empty_text"),
    "uf_no_response_key": (UF, _uf({"overall_score": 5}, {"response": "B", "overall_score": 2}), "missing_field"),
    "uf_no_prompt": (UF, {"completions": UF["completions"]}, "missing_field"),
    "rr_no_ratings": (RR, {"prompt": "Q?", "responses": ["A", "B"]}, "missing_field"),
    "uf_completions_text": (UF, {**UF, "completions": "A, B"}, "non_text"),
    "rr_response_number": (RR, {**RR, "responses": [1, "B"]}, "non_text"),
    "cl_message_object": (CL, {**CL, "rejected": [[MSG], MSG]}, "non_text"),
    "rr_user_turn": (RR, {**RR, "responses": [{"role": "user", "content": "A"}, "B"]}, "no_assistant_turn"),
    "rr_unknown_role": (RR, {**RR, "responses": [{"role": "narrator", "content": "A"}, "B"]}, "unknown_role"),
    "rr_same_response_two_ratings": (RR, {**RR, "responses": ["A", "A", "B"], "ratings": [5, 3, 1]},
                                     "conflicting_ratings"),
    "cl_chosen_and_rejected": (CL, {**CL, "rejected": ["B", "A"]}, "conflicting_ratings"),
    "uf_pair_row": (UF, {"prompt": "Q?", "chosen": "A", "rejected": "B"}, "mixed_format"),
    "rr_message_row_in_text_input": (RR, {**RR, "prompt": [{"role": "user", "content": "Q?"}]}, "mixed_format"),
    "rr_lone_surrogate": (RR, {**RR, "responses": ["A\ud800", "B"]}, "invalid_unicode"),
    "not_an_object": (CL, ["Q?", "A", "B"], "not_an_object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_row_is_one_counted_reject(case):
    good, bad, reason = BAD[case]
    other = {**good, "instruction" if "instruction" in good else "prompt": "Another?"}
    ds, report = load_preferences_with_rejects([good, bad, other])
    assert (report.rows_in, report.rows_kept, report.rows_rejected, report.pairs_rejected) == (3, 2, 1, 0)
    assert len(ds) == report.pairs == 2
    (rec,) = report.rejects
    assert (rec["reason"], rec["row_index"], rec["stage"]) == (reason, 1, "load") and rec["detail"]
    assert report.sources[0].rejects == {reason: 1}


def test_dropped_pairs_of_kept_rows_are_counted_beside_the_rows():
    a = {"prompt": "Q?", "responses": ["A", "B", "C"], "ratings": [5, 3, 1]}
    b = {"prompt": "Q?", "responses": ["A", "B", "D"], "ratings": [5, 3, 2]}  # shares the pair (A, B) with a
    ds, report = load_preferences_with_rejects([a, b, a], drop_duplicates=True)
    assert (report.rows_in, report.rows_kept, report.rows_rejected) == (3, 2, 1)
    assert (report.pairs, report.pairs_rejected, len(ds)) == (3, 1, 3)
    recs = report.rejects
    assert [(r["row_index"], r["reason"]) for r in recs] == [(1, "duplicate_pair"), (2, "duplicate_pair")]
    assert recs[0]["detail"].startswith("pair 2: ") and json.loads(recs[0]["original"])["chosen"] == "A"
    assert recs[1]["detail"].startswith("all 2 pairs dropped") and json.loads(recs[1]["original"]) == a
    assert report.as_dict()["sources"][0]["pair_reject_reasons"] == {"duplicate_pair": 1}
    kept, report = load_preferences_with_rejects([a, b, a])  # kept with -N suffixes by default
    assert report.sources[0].duplicates == 3 and len(kept) == 6 and len(set(kept[ROW_ID])) == 6


def test_options_and_file_errors():
    with pytest.raises(PreferenceDataError, match="unknown pairing 'pairs'"):
        LoadConfig(pairing="pairs")
    with pytest.raises(PreferenceDataError, match="inputs mix conversational"):
        load_preferences({"a": DATA / "multi_rated_responses.json", "b": DATA / "multi_ultrafeedback.jsonl"})
    ds = load_preferences(DATA / "multi_chosen_rejected_lists.jsonl", format="chosen_rejected_lists")
    assert len(ds) == 5


def _run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sdpo_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_inspect_has_the_pairing_flag():
    path = str(DATA / "multi_ultrafeedback.jsonl")
    proc = _run_cli("inspect", path, "--help")
    assert proc.returncode == 0 and "--pairing" in proc.stdout and "best_vs_rest" in proc.stdout
    proc = _run_cli("inspect", path, "--pairing", "all", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["rows_in"], report["rows_kept"], report["pairs"]) == (3, 3, 13)
    assert report["sources"][0]["format"] == "ultrafeedback"
    proc = _run_cli("inspect", path, "--pairing", "all")
    assert proc.returncode == 0 and "ultrafeedback" in proc.stdout, proc.stderr
    header, *_, total = proc.stdout.splitlines()[:3]  # rows expand to pairs: the table has a pairs column
    assert header.split()[:5] == ["source", "format", "in", "kept", "pairs"]
    assert total.split()[1:5] == ["3", "3", "13", "0"]


# --------------------------------------------------------------------------------------------- the curriculum
def test_curri_dpo_curriculum_end_to_end(tmp_path):
    """load -> score (signal rating_gap, the bundled model) -> partition easy_to_hard on rating_gap: the chunks hold
    the largest rating gaps first; ordering by pair_rank instead gives Curri-DPO's own chunks (rank k in chunk k)."""
    from partitioner import PartitionConfig, ScoringConfig, partition_preferences, read_manifest, score_preferences

    loaded = load_preferences(DATA / "multi_ultrafeedback.jsonl")
    scored = score_preferences(loaded, tmp_path / "scored", ScoringConfig(
        model="bundled", signals="rating_gap", max_length=128, rows_per_part=4, progress=False))
    meta = json.loads((scored / "scoring.json").read_text())
    assert (meta["rows_in"], meta["rows_scored"], meta["rows_rejected"]) == (8, 8, 0)
    part = partition_preferences(scored, tmp_path / "part", PartitionConfig(
        order="easy_to_hard", signal="rating_gap", chunks=3), progress=False)
    chunks = [pl.read_ipc_stream(part / c["file"]) for c in read_manifest(part)["chunks"]]
    gaps = [(c["score_chosen"] - c["score_rejected"]).to_list() for c in chunks]
    assert [len(g) for g in gaps] == [3, 3, 2]
    flat = [g for chunk in gaps for g in chunk]
    assert flat == sorted(flat, reverse=True) and flat[0] == 7.0
    assert all(min(a) >= max(b) for a, b in zip(gaps, gaps[1:]))
    assert [c["rating_gap"].to_list() for c in chunks] == gaps
    ranked = partition_preferences(scored, tmp_path / "ranked", PartitionConfig(
        order="column", column="pair_rank", thresholds=[1.5, 2.5]), progress=False)
    ranks = [pl.read_ipc_stream(ranked / c["file"])["pair_rank"].unique().to_list()
             for c in read_manifest(ranked)["chunks"]]
    assert ranks == [[1], [2], [3]]
