"""Loading real preference data: layouts detected, counts exact, every bad row accounted for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from partitioner.data.formats import PreferenceDataError
from partitioner.data.loading import load_preferences, load_preferences_with_rejects, pair_content_hash
from partitioner.io import read_arrow_stream
from sdpo_core.columns import ROW_ID, SOURCE

REAL = {
    # file, detected format, rows, exact duplicates within the file
    "orca": ("orca_dpo_pairs/validation.jsonl", "openai", 284, 0),
    "llamafactory_en": ("llamafactory_demo/dpo_en_demo.json", "sharegpt", 300, 5),
    "llamafactory_zh": ("llamafactory_demo/dpo_zh_demo.json", "sharegpt", 300, 11),
    "llamafactory_v1": ("llamafactory_demo/v1_dpo_demo.jsonl", "messages", 10, 0),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_files_detected_and_counted(name, shared_data):
    path, fmt, rows, dups = REAL[name]
    ds, report = load_preferences_with_rejects({name: shared_data / path})
    (src,) = report.sources
    assert (src.format, src.rows_in, src.rows_kept, src.duplicates) == (fmt, rows, rows, dups)
    assert report.rejects == []
    assert len(ds) == rows and set(ds[SOURCE]) == {name}
    assert len(set(ds[ROW_ID])) == rows  # kept duplicates get a -N suffix
    first = ds[0]
    assert first["prompt"][-1]["role"] == "user"
    assert first["chosen"][0]["role"] == "assistant" and first["rejected"][0]["role"] == "assistant"


def test_sharegpt_system_turn_and_multi_turn(shared_data):
    raw = json.loads((shared_data / "llamafactory_demo/dpo_en_demo.json").read_text())
    ds = load_preferences(shared_data / "llamafactory_demo/dpo_en_demo.json")
    with_system = sum(1 for r in raw if r.get("system") or any(t["from"] == "system" for t in r["conversations"]))
    assert sum(1 for p in ds["prompt"] if p[0]["role"] == "system") == with_system
    assert max(len(p) for p in ds["prompt"]) == max(len(r["conversations"]) + (1 if r.get("system") else 0) for r in raw)


def test_openai_rows_keep_text_exactly(shared_data):
    path = shared_data / "orca_dpo_pairs/validation.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    ds = load_preferences(path)
    for r, row in zip(raw[:20], ds.select(range(20))):
        assert row["prompt"] == [{"role": m["role"], "content": m["content"]} for m in r["input"]["messages"]]
        assert row["chosen"][0]["content"] == r["preferred_output"][0]["content"]
        assert row["rejected"][0]["content"] == r["non_preferred_output"][0]["content"]


def test_row_ids_are_content_hashes(shared_data):
    path = shared_data / "orca_dpo_pairs/validation.jsonl"
    a = load_preferences(path)
    b = load_preferences(path).shuffle(seed=1)
    assert sorted(a[ROW_ID]) == sorted(b[ROW_ID])  # position-independent
    r = a[5]
    assert r[ROW_ID] == pair_content_hash(r["prompt"], r["chosen"], r["rejected"])


def test_several_sources_and_in_memory_inputs(shared_data, tmp_path):
    orca = load_preferences(shared_data / "orca_dpo_pairs/validation.jsonl").select(range(10))
    rows = orca.to_list()
    table = pa.Table.from_pylist([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    orca.select_columns(["prompt", "chosen", "rejected"]).save_to_disk(str(tmp_path / "saved"))
    ds, report = load_preferences_with_rejects(
        {
            "dataset": datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
            "polars": pl.from_arrow(table),
            "arrow_table": table,
            "list": [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows],
            "saved": tmp_path / "saved",
        }
    )
    assert [s.rows_kept for s in report.sources] == [10] * 5
    assert sorted(set(ds[SOURCE])) == ["arrow_table", "dataset", "list", "polars", "saved"]
    assert [s.format for s in report.sources] == ["conversational"] * 5
    assert ds.filter(lambda r: r[SOURCE] == "saved")[ROW_ID] == [i + "-4" for i in orca[ROW_ID]]


def test_selected_filtered_and_shuffled_datasets_load_only_their_rows(shared_data):
    """A Dataset after select/filter/shuffle keeps every row behind an indices mapping; only its own rows load."""
    full = load_preferences(shared_data / "orca_dpo_pairs/validation.jsonl")
    for view in (full.select([7, 3, 11]), full.filter(lambda r, i: i % 50 == 0, with_indices=True),
                 full.shuffle(seed=2).select(range(4))):
        loaded = load_preferences(view)
        assert loaded[ROW_ID] == view[ROW_ID]
        assert loaded["chosen"] == view["chosen"]


def test_file_types_roundtrip(tmp_path):
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}.", "score_chosen": 8.0 + i,
         "score_rejected": 2.0}
        for i in range(6)
    ]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as f, ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as f, ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    pl.from_arrow(table).write_csv(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "f.json").write_text(json.dumps(rows))
    ds, report = load_preferences_with_rejects(str(tmp_path / "*"))
    assert [s.source for s in report.sources] == ["a", "b", "c", "d", "e", "f"]
    assert all(s.rows_kept == 6 and s.format == "standard" for s in report.sources)
    assert ds["score_chosen"][:6] == [8.0 + i for i in range(6)]  # pass-through columns
    assert len(set(ds.filter(lambda r: r[SOURCE] == "d")[ROW_ID]) & set(ds.filter(lambda r: r[SOURCE] == "a")[ROW_ID])) == 0


def test_trl_formats_and_other_layouts():
    conv_implicit = [
        {
            "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}],
        }
    ]
    ds = load_preferences(conv_implicit)
    assert ds[0]["prompt"] == [{"role": "user", "content": "Sky?"}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Blue."}]

    std_implicit = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    ds = load_preferences(std_implicit)
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == ("The sky is", " blue.", " green.")

    hh = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Sky?\n\nAssistant: Blue.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Sky?\n\nAssistant: Green."}]
    ds, report = load_preferences_with_rejects(hh)
    assert report.sources[0].format == "hh"
    assert [m["role"] for m in ds[0]["prompt"]] == ["user", "assistant", "user"]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Blue."}]

    se = [{"question": "Sky?", "response_j": "Blue.", "response_k": "Green.", "system": "Be brief."}]
    ds = load_preferences(se, column_mapping={"prompt": "question", "chosen": "response_j", "rejected": "response_k",
                                               "system": "system"})
    assert ds[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}]
    ds = load_preferences(se, column_mapping={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert (ds[0]["prompt"], ds[0]["chosen"]) == ("Sky?", "Blue.")
    assert ds[0]["system"] == "Be brief."  # unmapped columns pass through


# --------------------------------------------------------------------------------------------- bad input
GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
GOOD_CONV = {
    "prompt": [{"role": "user", "content": "What is 2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}

# name: (lines of a jsonl file (str or bytes), expected reject reason)
BAD_ROWS = {
    "invalid_json": (['{"prompt": "a", "chosen": '], "invalid_json"),
    "invalid_utf8": ([b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}'], "invalid_utf8"),
    "array_row": (["[1, 2, 3]"], "not_an_object"),
    "null_chosen": ([json.dumps({**GOOD, "chosen": None})], "missing_field"),
    "missing_rejected": ([json.dumps({"prompt": "a", "chosen": "b"})], "missing_field"),
    "empty_chosen": ([json.dumps({**GOOD, "chosen": ""})], "empty_text"),
    "blank_prompt": ([json.dumps({**GOOD, "prompt": "   \n"})], "empty_text"),
    "number_chosen": ([json.dumps({**GOOD, "chosen": 42})], "non_text"),
    "identical_pair": ([json.dumps({**GOOD, "rejected": "4"})], "identical_pair"),
    "conv_in_standard_file": ([json.dumps(GOOD_CONV)], "mixed_format"),
}
BAD_CONV_ROWS = {
    "no_assistant_turn": ({**GOOD_CONV, "chosen": [{"role": "user", "content": "again?"}]}, "no_assistant_turn"),
    "unknown_role": ({**GOOD_CONV, "prompt": [{"role": "narrator", "content": "Once"}]}, "unknown_role"),
    "message_without_content": ({**GOOD_CONV, "chosen": [{"role": "assistant"}]}, "missing_field"),
    "image_part": ({**GOOD_CONV, "prompt": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]}, "non_text"),
    "empty_message": ({**GOOD_CONV, "rejected": [{"role": "assistant", "content": " "}]}, "empty_text"),
    "prompt_ends_with_assistant": ({**GOOD_CONV, "prompt": GOOD_CONV["prompt"] + GOOD_CONV["chosen"]}, "no_assistant_turn"),
}


def test_in_memory_integer_past_the_digit_limit_is_a_reject():
    """Python refuses str() of an integer past 4300 digits; the reject says its size and shows no original."""
    ds, report = load_preferences_with_rejects([GOOD, {**GOOD, "chosen": "four", "n": 10**5000}])
    (rec,) = report.rejects
    assert len(ds) == 1 and rec["reason"] == "value_out_of_range" and "bits does not fit" in rec["detail"]
    assert rec["original"] == "<not shown: an integer with too many digits>"


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_are_counted_rejects(case, tmp_path):
    lines, reason = BAD_ROWS[case]
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [json.dumps(GOOD), *lines, json.dumps({**GOOD, "chosen": "four"})])
    ds, report = load_preferences_with_rejects(path)
    assert len(ds) == 2 and report.rows_in == 3
    assert [r["reason"] for r in report.rejects] == [reason]
    assert report.rejects[0]["row_index"] == 1 and report.rejects[0]["detail"]


@pytest.mark.parametrize("case", list(BAD_CONV_ROWS))
def test_bad_conversational_rows_are_counted_rejects(case, tmp_path):
    row, reason = BAD_CONV_ROWS[case]
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [json.dumps(GOOD_CONV), json.dumps(row)])
    ds, report = load_preferences_with_rejects(path)
    assert len(ds) == 1
    assert [r["reason"] for r in report.rejects] == [reason]


def test_bad_hh_and_sharegpt_rows():
    hh = [
        {"chosen": "\n\nHuman: Sky?\n\nAssistant: Blue.", "rejected": "\n\nHuman: Sky?\n\nAssistant: Green."},
        {"chosen": "\n\nHuman: Sky?\n\nAssistant: Blue.", "rejected": "\n\nHuman: Sea?\n\nAssistant: Green."},
    ]
    _, report = load_preferences_with_rejects(hh)
    assert [r["reason"] for r in report.rejects] == ["prompt_mismatch"]
    sharegpt = [
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
         "rejected": {"from": "gpt", "value": "Go away"}},
        {"conversations": [{"from": "narrator", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
         "rejected": {"from": "gpt", "value": "Go away"}},
    ]
    _, report = load_preferences_with_rejects(sharegpt)
    assert [r["reason"] for r in report.rejects] == ["unknown_role"]


def test_duplicates_reported_kept_or_dropped(tmp_path):
    rows = [GOOD, GOOD, {**GOOD, "chosen": "four"}]
    ds, report = load_preferences_with_rejects(rows)
    assert len(ds) == 3 and report.sources[0].duplicates == 1 and ds[1][ROW_ID].endswith("-1")
    ds, report = load_preferences_with_rejects(rows, drop_duplicates=True, )
    assert len(ds) == 2 and [r["reason"] for r in report.rejects] == ["duplicate_pair"]
    load_preferences(rows, drop_duplicates=True, rejects_path=tmp_path / "rejects.arrow")
    table = read_arrow_stream(tmp_path / "rejects.arrow")
    assert table.num_rows == 1 and table.column("reason").to_pylist() == ["duplicate_pair"]
    assert json.loads(table.column("original")[0].as_py()) == GOOD
    assert datasets.Dataset.from_file(str(tmp_path / "rejects.arrow")).num_rows == 1


def test_prompt_too_long_is_a_counted_reject(smollm2_tokenizer):
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences

    rows = [GOOD, {**GOOD, "prompt": "word " * 200}]
    ds = load_preferences(rows)
    kept, rejects = tokenize_preferences(ds, smollm2_tokenizer, TokenizeConfig(max_length=64))
    assert len(kept) == 1 and [r["reason"] for r in rejects] == ["prompt_too_long"]


# name: (file name, bytes content or None, expected message fragment)
BAD_FILES = {
    "unknown_layout": ("x.jsonl", b'{"question": "a", "answer": "b"}\n', "no known preference format fits columns"),
    "unsupported_suffix": ("x.txt", b"hello", "unsupported file type"),
    "json_not_utf8": ("x.json", b'[{"prompt": "caf\xe9"}]', "not valid UTF-8"),
    "json_broken": ("x.json", b'[{"prompt": "a",', "invalid JSON"),
    "parquet_broken": ("x.parquet", b"PAR1garbage", "not a readable Parquet file"),
    "arrow_broken": ("x.arrow", b"garbage!", "not a readable Arrow IPC file"),
    "missing_file": ("missing.jsonl", None, "no such file or folder"),
    "empty_folder": ("emptydir", "dir", "folder has no data files"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_give_one_line_errors(case, tmp_path):
    name, content, fragment = BAD_FILES[case]
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(PreferenceDataError, match=fragment) as err:
        load_preferences(path)
    assert "\n" not in str(err.value)


def test_bad_options_and_mixes_give_one_line_errors():
    with pytest.raises(PreferenceDataError, match="unknown format"):
        load_preferences([GOOD], format="alpaca")
    with pytest.raises(PreferenceDataError, match="column mapping keys"):
        load_preferences([GOOD], column_mapping={"question": "prompt"})
    with pytest.raises(PreferenceDataError, match="inputs mix conversational"):
        load_preferences({"a": [GOOD], "b": [GOOD_CONV]})


def _run_cli(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sdpo_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\n')
    for args in (["inspect", str(tmp_path / "bad.jsonl")], ["inspect", "someone/not-a-local-dataset"],
                 ["inspect", str(tmp_path / "nope.csv")]):
        proc = _run_cli(*args)
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if line.startswith("sdpo: error:")]
        assert len(errors) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_inspect_reports_counts(shared_data, tmp_path):
    proc = _run_cli("inspect", f"orca={shared_data / 'orca_dpo_pairs/validation.jsonl'}",
                    f"en={shared_data / 'llamafactory_demo/dpo_en_demo.json'}", "--json",
                    "--rejects", str(tmp_path / "rejects.arrow"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows_in"] == 584 and report["rows_kept"] + report["rows_rejected"] == 584
    assert [s["format"] for s in report["sources"]] == ["openai", "sharegpt"]
    assert (tmp_path / "rejects.arrow").exists()
