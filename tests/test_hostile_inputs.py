"""Malformed and hostile inputs: each row-level case is a counted reject with its reason (rows in = kept + rejected),
each file- or option-level case one line ``sdpo: error: ...`` (exit 2), never a traceback, a rewritten row or a
path opened outside the folder the user named. The table of loading cases is ``ROW_CASES``; the file, folder and
option cases follow it.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from partitioner.data.formats import PreferenceDataError
from partitioner.data.loading import load_preferences_with_rejects
from sdpo_cli.main import main as sdpo

GOOD = [{"prompt": f"Question {i}?", "chosen": f"Right answer {i}.", "rejected": f"Wrong answer {i}."} for i in range(20)]
CONV = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": [{"role": "assistant", "content": f"A{i}."}],
         "rejected": [{"role": "assistant", "content": f"B{i}."}]} for i in range(20)]
HH = [{"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: A{i}.", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: B{i}."}
      for i in range(20)]
IMPLICIT = [{"chosen": f"The answer to {i} is yes.", "rejected": f"The answer to {i} is no."} for i in range(20)]
DEEP = 100_000  # nesting depth that crashes a recursive parser (Arrow's JSON reader segfaults near 30,000)


def _lines(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _zst(data: bytes) -> bytes:
    out = pa.BufferOutputStream()
    with pa.CompressedOutputStream(out, "zstd") as f:
        f.write(data)
    return out.getvalue().to_pybytes()


def _arrow_stream(rows) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _parquet(rows) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def _csv(header: str, rows: list[str]) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


CSV_GOOD = [f'"Question {i}?","Right {i}.","Wrong {i}."' for i in range(20)]

# name: (file name or None for an in-memory list, content, {reason: count}, rows kept)
ROW_CASES = {
    # 1. rows rewritten silently: now rejects with the reason, never another layout
    "null_prompt": ("d.jsonl", _lines([{**GOOD[0], "prompt": None}, *GOOD]), {"missing_field": 1}, 20),
    "number_prompt": ("d.jsonl", _lines([{**GOOD[0], "prompt": 42}, *GOOD]), {"non_text": 1}, 20),
    "float_prompt_last": ("d.jsonl", _lines([*GOOD, {**GOOD[0], "prompt": 4.5}]), {"non_text": 1}, 20),
    "bool_prompt": ("d.jsonl", _lines([*GOOD[:10], {**GOOD[0], "prompt": True}, *GOOD[10:]]), {"non_text": 1}, 20),
    "list_prompt_in_standard": ("d.jsonl", _lines([{**GOOD[0], "prompt": [1, 2]}, *GOOD]), {"non_text": 1}, 20),
    "bytes_prompt_in_memory": (None, [{**GOOD[0], "prompt": b"Question?"}, *GOOD], {"non_text": 1}, 20),
    "null_prompt_in_memory": (None, [*GOOD, {**GOOD[1], "prompt": None}], {"missing_field": 1}, 20),
    "empty_csv_prompt_cell": ("d.csv", _csv("prompt,chosen,rejected", ['," Right.","Wrong."', *CSV_GOOD]),
                              {"missing_field": 1}, 20),
    "hh_transcript_without_assistant": ("d.jsonl", _lines([*HH, {"chosen": "\n\nHuman: Hello?",
                                                                 "rejected": "\n\nHuman: Hi?"}]),
                                        {"no_assistant_turn": 1}, 20),
    "conversation_without_assistant": ("d.jsonl", _lines([
        *({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONV),
        {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}]),
        {"no_assistant_turn": 1}, 20),
    "explicit_row_in_implicit_file": ("d.jsonl", _lines([GOOD[0], *IMPLICIT]), {"mixed_format": 1}, 20),
    "hh_row_in_implicit_file": ("d.jsonl", _lines([*IMPLICIT, HH[0]]), {"mixed_format": 1}, 20),
    "implicit_row_in_hh_file": ("d.jsonl", _lines([IMPLICIT[0], *HH]), {"mixed_format": 1}, 20),
    # 2. a few rows no longer decide for the whole file
    "junk_lines_at_head": ("d.jsonl", _lines([b"garbage", b"<html>", b"{not json", *GOOD]), {"invalid_json": 3}, 20),
    "unknown_objects_at_head": ("d.jsonl", _lines([{"foo": 1}, {"bar": 2}, *GOOD]), {"missing_field": 2}, 20),
    "stray_conversational_row_first": ("d.jsonl", _lines([CONV[0], *GOOD]), {"mixed_format": 1}, 20),
    "stray_sharegpt_row_first": ("d.jsonl", _lines([{"conversations": [{"from": "human", "value": "Hi"}],
                                                     "chosen": {"from": "gpt", "value": "A"},
                                                     "rejected": {"from": "gpt", "value": "B"}}, *GOOD]),
                                 {"mixed_format": 1}, 20),
    "stray_standard_row_in_conversational": ("d.jsonl", _lines([*CONV, GOOD[0]]), {"mixed_format": 1}, 20),
    "bom_jsonl": ("d.jsonl", b"\xef\xbb\xbf" + _lines(GOOD), {}, 20),
    "bom_json_array": ("d.json", b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), {}, 20),
    "bom_csv": ("d.csv", b"\xef\xbb\xbf" + _csv("prompt,chosen,rejected", CSV_GOOD), {}, 20),
    # 3. one bad row no longer refuses or crashes the whole file
    "lone_surrogate": ("d.jsonl", _lines([*GOOD, b'{"prompt": "a\\ud800b", "chosen": "c", "rejected": "d"}']),
                       {"invalid_unicode": 1}, 20),
    "lone_surrogate_pass_through": ("d.jsonl", _lines([b'{"prompt": "a", "chosen": "c", "rejected": "d", '
                                                      b'"note": "\\udfff"}', *GOOD]), {"invalid_unicode": 1}, 20),
    "lone_surrogate_json_array": ("d.json", ("[" + ",".join([*(json.dumps(r) for r in GOOD),
                                                              '{"prompt": "\\ud83d", "chosen": "c", "rejected": "d"}'])
                                             + "]").encode(), {"invalid_unicode": 1}, 20),
    "integer_past_digit_limit": ("d.jsonl", _lines([*GOOD, b'{"prompt": "a", "chosen": "c", "rejected": "d", "n": '
                                                   + b"9" * 5000 + b"}"]), {"value_out_of_range": 1}, 20),
    "integer_past_int64": ("d.jsonl", _lines([*GOOD, {**GOOD[0], "chosen": "x", "n": 2**70}]),
                           {"value_out_of_range": 1}, 20),
    "integer_past_int64_in_memory": (None, [*GOOD, {**GOOD[0], "chosen": "x", "n": 2**64}], {"value_out_of_range": 1},
                                     20),
    "integer_past_digit_limit_json_array": ("d.json", ("[" + json.dumps(GOOD[0])[:-1] + ', "n": ' + "7" * 6000 + "},"
                                                       + ",".join(json.dumps(r) for r in GOOD) + "]").encode(),
                                            {"value_out_of_range": 1}, 20),
    "nested_past_recursion_limit": ("d.jsonl", _lines([*GOOD, b'{"prompt": "a", "chosen": "c", "rejected": "d", '
                                                      b'"x": ' + b"[" * DEEP + b"]" * DEEP + b"}"]),
                                    {"nested_too_deep": 1}, 20),
    "nested_objects_past_recursion_limit": ("d.jsonl", _lines([b'{"x": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP
                                                              + b"}", *GOOD]), {"nested_too_deep": 1}, 20),
    "nested_deep_json_array": ("d.json", ("[" + ",".join([*(json.dumps(r) for r in GOOD),
                                                          '{"x": ' + "[" * DEEP + "]" * DEEP + "}"]) + "]").encode(),
                               {"nested_too_deep": 1}, 20),
    "nested_40_levels": ("d.jsonl", _lines([*GOOD, {**GOOD[0], "chosen": "x", "x": json.loads("[" * 40 + "]" * 40)}]),
                         {"nested_too_deep": 1}, 20),
    "nested_9500_levels_arrow_guard": ("d.jsonl", _lines([b'{"prompt": "a", "chosen": "c", "rejected": "d", "x": '
                                                         + b"[" * 9500 + b"]" * 9500 + b"}", *GOOD]),
                                       {"nested_too_deep": 1}, 20),
    "nested_40_levels_in_memory": (None, [*GOOD, {**GOOD[0], "chosen": "x", "x": json.loads("[" * 40 + "]" * 40)}],
                                   {"nested_too_deep": 1}, 20),
    "invalid_utf8_gz": ("d.jsonl.gz", gzip.compress(_lines([*GOOD, b'{"prompt": "caf\xe9", "chosen": "c", '
                                                                   b'"rejected": "d"}'])), {"invalid_utf8": 1}, 20),
    "csv_row_with_extra_field": ("d.csv", _csv("prompt,chosen,rejected", [*CSV_GOOD, '"a","b","c","d"']),
                                 {"malformed_row": 1}, 20),
    "date_like_text_kept_as_text": ("d.jsonl", _lines([{"prompt": "2021-01-01", "chosen": "2021-01-02 10:00:00",
                                                        "rejected": "x"}, *GOOD]), {}, 21),
    "duplicate_keys_last_wins": ("d.jsonl", _lines([b'{"prompt": "first", "prompt": "second", "chosen": "c", '
                                                   b'"rejected": "d"}', *GOOD]), {}, 21),
    "mixed_number_types_pass_through": ("d.jsonl", _lines([{**r, "score": i if i % 2 else i + 0.5}
                                                           for i, r in enumerate(GOOD)]), {}, 20),
    # compressed inputs of every file type (streamed)
    "gz_jsonl": ("d.jsonl.gz", gzip.compress(_lines(GOOD)), {}, 20),
    "bz2_json_array": ("d.json.bz2", bz2.compress(json.dumps(GOOD).encode()), {}, 20),
    "xz_csv": ("d.csv.xz", lzma.compress(_csv("prompt,chosen,rejected", CSV_GOOD)), {}, 20),
    "zst_arrow_stream": ("d.arrow.zst", _zst(_arrow_stream(GOOD)), {}, 20),
    "gz_parquet": ("d.parquet.gz", gzip.compress(_parquet(GOOD)), {}, 20),
}

# Text each case must keep exactly (row index in the kept rows -> prompt).
KEPT_TEXT = {"date_like_text_kept_as_text": (0, "2021-01-01"), "duplicate_keys_last_wins": (0, "second"),
             "null_prompt": (0, "Question 0?")}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_row_cases_are_counted_rejects(case, tmp_path):
    name, content, reasons, kept = ROW_CASES[case]
    if name is None:
        data = content
    else:
        data = tmp_path / name
        data.write_bytes(content)
    ds, report = load_preferences_with_rejects(data)
    assert report.rows_in == report.rows_kept + report.rows_rejected  # rows in = kept + rejected
    assert report.rows_in == kept + sum(reasons.values())
    assert len(ds) == report.rows_kept == kept
    got = {}
    for r in report.rejects:
        got[r["reason"]] = got.get(r["reason"], 0) + 1
        assert r["detail"]
    assert got == reasons
    if case in KEPT_TEXT:
        i, text = KEPT_TEXT[case]
        assert ds[i]["prompt"] == text


def test_pass_through_types_that_differ_become_json_text(tmp_path):
    rows = [{**r, "meta": i} for i, r in enumerate(GOOD)] + [{**GOOD[0], "chosen": "z", "meta": "text"}]
    ds, report = load_preferences_with_rejects(rows)
    assert report.rows_kept == 21
    assert ds["meta"][:2] == ["0", "1"] and ds["meta"][-1] == '"text"'


def _sdpo(capsys, *args) -> tuple[int, str]:
    code = sdpo([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("sdpo: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    assert len(lines[0]) <= 320


# name: (file name, content, message fragment) for `sdpo inspect FILE`
FILE_CASES = {
    "csv_repeated_header": ("d.csv", _csv("prompt,chosen,chosen,rejected", ['"a","b","c","d"']),
                            "repeats column 'chosen'"),
    "truncated_arrow_stream": ("d.arrow", _arrow_stream(GOOD)[:-200], "truncated"),
    "truncated_gzip": ("d.jsonl.gz", gzip.compress(_lines(GOOD))[:-30], "corrupt or truncated gzip"),
    "not_gzip": ("d.jsonl.gz", b"plain text, not gzip", "corrupt or truncated gzip"),
    "json_array_broken_structure": ("d.json", b'[{"prompt": "a"} {"prompt": "b"}]', "invalid JSON"),
    "unsupported_compressed_suffix": ("d.txt.gz", gzip.compress(b"x"), "unsupported file type"),
    "only_unknown_objects": ("d.jsonl", _lines([{"question": "q", "answer": "a"}] * 3), "no known preference format"),
    # binary content under a text extension: never reaches Arrow's CSV parser (whose errors quote the bytes)
    "png_as_csv": ("d.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8, "binary content"),
    "random_bytes_as_csv": ("d.csv", bytes((i * 97 + 13) % 256 for i in range(4000)), "binary content"),
    "gzip_of_binary_csv": ("d.csv.gz", gzip.compress(b"\x00\x01\x02" * 500), "binary content"),
    # found by tests/test_fuzz.py: Arrow's JSON parser built a list-of-nulls column that failed its own checks
    "lists_of_nulls": ("d.jsonl", b'{"prompt": [], "chosen": [], "rejected": [null, null]}\n',
                       "no known preference format"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_cases_are_one_line_errors(case, tmp_path, capsys):
    name, content, fragment = FILE_CASES[case]
    (tmp_path / name).write_bytes(content)
    code, err = _sdpo(capsys, "inspect", tmp_path / name)
    assert code == 2
    _one_error_line(err, fragment)


def test_damaged_saved_dataset_is_one_line(tmp_path, capsys):
    """A save_to_disk folder whose state.json parses but lacks its keys (datasets raises KeyError)."""
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    (folder / "dataset_info.json").write_text("{}")
    code, err = _sdpo(capsys, "inspect", folder)
    assert code == 2
    _one_error_line(err, "damaged saved dataset")


def _fifo_with_writer(path, data: bytes):
    """A FIFO at ``path`` and a thread that writes ``data`` into it and closes it (its reader sees EOF)."""
    import threading

    os.mkfifo(path)

    def write():
        with open(path, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


@pytest.mark.parametrize("name,data", [
    ("pairs.jsonl", _lines(GOOD)),  # a FIFO with a data suffix
    ("pipe", _lines(GOOD)),  # no suffix: the format told from the first bytes (`<(cat x.jsonl)`)
    ("pipe_gz", gzip.compress(_lines(GOOD))),  # `<(cat x.jsonl.gz)`
    ("pipe_json", json.dumps(GOOD).encode()),
    ("pipe_csv", _csv("prompt,chosen,rejected", [f'"q{i}","a{i}","b{i}"' for i in range(20)])),
])
def test_read_once_inputs_are_read_once(name, data, tmp_path):
    """A FIFO can be opened once: the loader spools it to its work folder (one read to EOF), then detects and
    reads the copy; it never blocks on a second open."""
    writer = _fifo_with_writer(tmp_path / name, data)
    ds, report = load_preferences_with_rejects([str(tmp_path / name)], work_dir=tmp_path / "work")
    writer.join(timeout=60)
    assert not writer.is_alive() and len(ds) == report.rows_in == 20 and report.rows_rejected == 0
    assert set(ds["source"]) == {name.split(".")[0]}


def test_process_substitution_on_the_command_line(repo_root, shared_data, tmp_path):
    """`sdpo inspect <(zcat data.jsonl.gz)` and a compressed stream without a name, as a shell user pipes them."""
    hh = shared_data / "hh_rlhf_harmless" / "test.jsonl.gz"
    sdpo_bin = [sys.executable, "-m", "sdpo_cli.main"]
    cmd = (f"{' '.join(sdpo_bin)} inspect hh=<(zcat {hh} | head -50) && "
           f"{' '.join(sdpo_bin)} inspect <(head -c 100000000 {hh})")
    proc = subprocess.run(["bash", "-c", cmd], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hh                       hh                            50      50" in proc.stdout
    assert "2312" in proc.stdout


def test_permission_denied_is_one_line(tmp_path):
    import shutil

    path = tmp_path / "d.jsonl"
    path.write_bytes(_lines(GOOD))
    path.chmod(0)
    prefix = []
    if os.geteuid() == 0:  # root reads any file: run without the capabilities that bypass permission bits
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    proc = subprocess.run([*prefix, sys.executable, "-m", "sdpo_cli", "inspect", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=os.getcwd())
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, "Permission denied")


def test_symlink_loop_in_input_folder(tmp_path, capsys):
    (tmp_path / "good.jsonl").write_bytes(_lines(GOOD))
    os.symlink(tmp_path / "loop.jsonl", tmp_path / "loop.jsonl")
    code, err = _sdpo(capsys, "inspect", tmp_path)
    assert code == 2
    _one_error_line(err, "symbolic link loop")


def test_output_path_under_a_file(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(_lines(GOOD))
    (tmp_path / "afile").write_text("x")
    code, err = _sdpo(capsys, "partition", tmp_path / "d.jsonl", "--order", "random", "--chunks", "2", "-o",
                      tmp_path / "afile" / "part", "--no-progress")
    assert code == 2
    _one_error_line(err, "Not a directory")


def _partition(capsys, tmp_path, name="part", *extra):
    data = tmp_path / "d.jsonl"
    data.write_bytes(_lines(GOOD * 3 + [{**r, "chosen": r["chosen"] + "!"} for r in GOOD]))
    code, err = _sdpo(capsys, "partition", data, "--order", "random", "--chunks", "4", "-o", tmp_path / name,
                      "--no-progress", *extra)
    assert code == 0, err
    return tmp_path / name


def test_full_disk_while_writing_shards_leaves_no_manifest(tmp_path, capsys, monkeypatch):
    import errno

    from partitioner import io

    part = _partition(capsys, tmp_path)
    assert (part / "manifest.json").exists()
    written = {"bytes": 0}
    real_write = io.HashingSink.write

    def full_disk(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > 3000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(io.HashingSink, "write", full_disk)
    code, err = _sdpo(capsys, "partition", tmp_path / "d.jsonl", "--order", "random", "--chunks", "4", "-o", part,
                      "--no-progress")
    assert code == 2
    _one_error_line(err, "No space left on device")
    assert "no manifest" in err
    assert not (part / "manifest.json").exists()
    assert not [p for p in part.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    code, err = _sdpo(capsys, "verify", part)
    assert code == 1 and "no manifest.json" in err


def test_directory_where_a_shard_should_be(tmp_path, capsys):
    from partitioner.partition.folder import PartitionError, load_partition

    part = _partition(capsys, tmp_path)
    (part / "chunk-001.arrow").unlink()
    (part / "chunk-001.arrow").mkdir()
    code, err = _sdpo(capsys, "verify", part)
    assert code == 1 and "not a regular file" in err and "Traceback" not in err
    with pytest.raises(PartitionError, match="not a regular file"):
        load_partition(part)


# name: (edit of the manifest, message fragment) for `sdpo verify`
MANIFEST_CASES = {
    "chunks_is_text": (lambda m: m.update(chunks="abc"), "chunks must be a list"),
    "rows_is_text": (lambda m: m["chunks"][0].update(rows="5"), "rows must be a non-negative integer"),
    "sha256_is_number": (lambda m: m["chunks"][0].update(sha256=5), "sha256 must be text"),
    "file_is_number": (lambda m: m["chunks"][0].update(file=3), "not a plain file name"),
    "rows_kept_is_null": (lambda m: m.update(rows_kept=None), "rows_kept must be a non-negative integer"),
    "rows_in_is_bool": (lambda m: m.update(rows_in=True), "rows_in must be a non-negative integer"),
    "columns_is_object": (lambda m: m.update(columns={"a": 1}), "columns must be a list"),
    "chunk_is_list": (lambda m: m["chunks"].__setitem__(0, [1]), "chunk 0 must be an object"),
    "parent_path": (lambda m: m["chunks"][0].update(file="../x"), "not a plain file name"),
    "absolute_path": (lambda m: m["chunks"][0].update(file="/etc/hostname"), "not a plain file name"),
    "escaping_path": (lambda m: m["chunks"][0].update(file="../../etc/hostname"), "not a plain file name"),
    "parquet_outside": (lambda m: m["chunks"][0].update(parquet={"file": "../y.parquet", "sha256": "0"}),
                        "not a plain file name"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifests_are_refused_without_opening_outside(case, tmp_path, capsys, monkeypatch):
    from partitioner.partition import folder

    part = _partition(capsys, tmp_path)
    manifest = json.loads((part / "manifest.json").read_text())
    edit, fragment = MANIFEST_CASES[case]
    edit(manifest)
    (part / "manifest.json").write_text(json.dumps(manifest))
    opened = []
    real = folder.sha256_file
    monkeypatch.setattr(folder, "sha256_file", lambda p: opened.append(p) or real(p))
    code, err = _sdpo(capsys, "verify", part)
    assert code == 1 and fragment in err and "Traceback" not in err, err
    assert all(os.path.realpath(p).startswith(os.path.realpath(part) + os.sep) for p in opened)


def test_verify_reports_unlisted_shards(tmp_path, capsys):
    part = _partition(capsys, tmp_path)
    (part / "chunk-009.arrow").write_bytes((part / "chunk-000.arrow").read_bytes())
    code, err = _sdpo(capsys, "verify", part)
    assert code == 1 and "chunk-009.arrow" in err and "not in the manifest" in err


def test_scored_part_that_differs_from_its_checksum_is_refused(tmp_path, capsys):
    from partitioner.data.loading import load_preferences
    from partitioner.data.rejects import write_rejects
    from partitioner.io import write_arrow_stream, write_json, write_marker

    ds = load_preferences(GOOD)
    table = ds.data.table.append_column("difficulty", pa.array([float(i) for i in range(len(ds))]))
    scored = tmp_path / "scored"
    sha = write_arrow_stream(table, scored / "parts" / "part-00000.arrow")
    write_rejects([], scored / "rejects.arrow")
    meta = {"schema_version": 1, "library_version": "test", "model": {"name_or_path": "stand-in"}, "signals": [],
            "difficulty": {"signal": "x", "column": "difficulty", "direction": "higher_is_harder"},
            "rows_in": len(ds), "rows_scored": len(ds), "rows_rejected": 0,
            "parts": [{"file": "parts/part-00000.arrow", "rows": len(ds), "sha256": sha}]}
    write_marker(scored / "_SUCCESS", {"rows_scored": len(ds), "scoring_json_sha256": write_json(
        scored / "scoring.json", meta)})
    code, err = _sdpo(capsys, "partition", scored, "--order", "random", "--chunks", "2", "-o", tmp_path / "p1",
                      "--no-progress")
    assert code == 0, err
    write_arrow_stream(table.slice(1), scored / "parts" / "part-00000.arrow")  # the part changed after scoring
    code, err = _sdpo(capsys, "partition", scored, "--order", "random", "--chunks", "2", "-o", tmp_path / "p2",
                      "--no-progress")
    assert code == 2
    _one_error_line(err, "differs from its checksum")


# name: (YAML text, message fragment, or None when the command must succeed)
CONFIG_CASES = {
    "list_for_an_integer": ("limit_per_source: [1, 2]\n", "expected an integer"),
    "integer_for_a_path": ("rejects: 5\n", "expected text"),
    "mapping_for_a_boolean": ("drop_duplicates: {a: 1}\n", "expected true/false"),
    "word_for_a_boolean": ("drop_duplicates: maybe\n", "expected true/false"),
    "float_for_an_integer": ("limit_per_source: 1.5\n", "expected an integer"),
    "unknown_option": ("limit_per_sauce: 3\n", "unknown option"),
    "not_a_mapping": ("- a\n- b\n", "must be a YAML mapping"),
    "alias_bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi")), "expands to more than"),
    "huge_yaml": ("# " + "x" * (2 << 20) + "\n", "limited to"),
    "broken_yaml": ("a: [1, 2\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_values_are_one_line_errors(case, tmp_path, capsys):
    text, fragment = CONFIG_CASES[case]
    (tmp_path / "d.jsonl").write_bytes(_lines(GOOD))
    (tmp_path / "c.yaml").write_text(text)
    code, err = _sdpo(capsys, "inspect", tmp_path / "d.jsonl", "--config", tmp_path / "c.yaml")
    assert code == 2
    _one_error_line(err, fragment)


@pytest.mark.parametrize("command,flag,value,fragment", [
    ("partition", "--seed", "-1", "seed must be >= 0"),
    ("partition", "--chunks", "0", "chunks must be >= 1"),
    ("partition", "--batch-rows", "0", "batch_rows must be >= 1"),
    ("score", "--batch-tokens", "0", "batch_tokens must be >= 1"),
    ("score", "--max-length", "1", "max_length must be >= 2"),
    ("score", "--seed", "-5", "seed must be >= 0"),
    ("inspect", "--limit-per-source", "0", "limit_per_source must be >= 1"),
    ("train", "--lora-dropout", "1.5", "lora_dropout must be in [0, 1]"),
    ("train", "--score-batch-tokens", "0", "score_batch_tokens must be >= 1"),
])
def test_out_of_range_option_values_are_one_line_errors(command, flag, value, fragment, tmp_path, capsys):
    """Every declared range (``field(metadata={"min": ...})``) is checked where the option is declared, before any
    work: one line, exit 2, never numpy's or torch's traceback."""
    (tmp_path / "d.jsonl").write_bytes(_lines(GOOD))
    args = {"partition": [tmp_path / "d.jsonl", "-o", tmp_path / "p", "--order", "random"],
            "score": [tmp_path / "d.jsonl", "-o", tmp_path / "s"], "inspect": [tmp_path / "d.jsonl"],
            "train": [tmp_path / "nothing", "--output-dir", tmp_path / "r"]}[command]
    code, err = _sdpo(capsys, command, *args, flag, value)
    assert code == 2
    _one_error_line(err, fragment)


@pytest.mark.parametrize("word,kept", [('"false"', 21), ("no", 21), ("'0'", 21), ("true", 20), ('"yes"', 20)])
def test_yaml_boolean_words(word, kept, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(_lines([*GOOD, GOOD[3]]))
    (tmp_path / "c.yaml").write_text(f"drop_duplicates: {word}\n")
    code = sdpo(["inspect", str(tmp_path / "d.jsonl"), "--config", str(tmp_path / "c.yaml"), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["rows_kept"] == kept


def test_load_errors_are_preference_data_errors(tmp_path):
    (tmp_path / "d.csv").write_bytes(_csv("prompt,prompt,chosen,rejected", []))
    with pytest.raises(PreferenceDataError, match="repeats column"):
        load_preferences_with_rejects(tmp_path / "d.csv")


@pytest.mark.parametrize("chosen,rejected", [
    ("The sky is blue.", "The sky is green."), ("Same start and a", "Same start and b"), ("A ", "B"),
    ("abc", "abcdef"), ("x", "y"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
     [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
     [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}]),
])
def test_implicit_prompt_extraction_is_trls(chosen, rejected):
    from trl.data_utils import extract_prompt as trl_extract_prompt

    from partitioner.data.formats import extract_prompt

    theirs = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


def test_blank_text_is_pythons_whitespace():
    from partitioner.data.convert import PY_SPACE

    assert PY_SPACE == "".join(chr(i) for i in range(0x110000) if chr(i).isspace())
