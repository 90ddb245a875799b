"""Reading URL lists lazily, and planning download shards from them (no download, no Ray)."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shards
from pipeline.config import InputConfig, load_config
from pipeline.download import jobs, prepare
from pipeline.input_plan import planned_ids, rows_path
from pipeline.inputs import InputError, input_files, read_file
from pipeline.synthweb import write_table

ROWS = pa.table({"URL": ["http://a/1.jpg", "http://a/2.jpg"], "TEXT": ["one", "two"], "similarity": [0.3, 0.4]})


def _read(cfg: InputConfig) -> pa.Table:
    """Every normalised row of an input section (small tests only: the stage never does this)."""
    tables = [t for path, fmt in input_files(cfg) for t in read_file(path, fmt, cfg)]
    return pa.concat_tables(tables) if tables else pa.table({})


def _write(path, table: pa.Table) -> str:
    """``table`` as the file ``path`` names, compressed when it ends in .gz, .bz2 or .zst."""
    path = str(path)
    codec = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}.get(os.path.splitext(path)[1])
    if not codec:
        write_table(table, path)
        return path
    plain = path.rsplit(".", 1)[0]
    write_table(table, plain)
    with open(plain, "rb") as src, pa.CompressedOutputStream(path, codec) as dst:
        dst.write(src.read())
    os.unlink(plain)
    return path


@pytest.mark.parametrize("name", ["urls.parquet", "urls.csv", "urls.tsv", "urls.jsonl",
                                  "urls.csv.gz", "urls.tsv.bz2", "urls.jsonl.zst"])
def test_formats_compressed_and_extra_columns(tmp_path, name):
    src = _write(tmp_path / name, ROWS)
    t = _read(InputConfig(path=src, preset="laion"))
    assert t.column_names == ["url", "caption", "similarity"]
    assert t["caption"].to_pylist() == ["one", "two"] and t["similarity"].to_pylist() == [0.3, 0.4]


def test_folders_globs_and_lists_of_paths(tmp_path):
    for sub in ("in", "more"):
        (tmp_path / sub).mkdir()
        _write(tmp_path / sub / "a.parquet", ROWS)
        _write(tmp_path / sub / "b.csv.gz", ROWS)
        (tmp_path / sub / "notes.md").write_text("not a list")
    assert _read(InputConfig(path=str(tmp_path / "in"), preset="laion")).num_rows == 4
    assert _read(InputConfig(path=str(tmp_path / "*" / "*.csv.gz"), preset="laion")).num_rows == 4
    both = InputConfig(path=[str(tmp_path / "in"), str(tmp_path / "more" / "a.parquet")], preset="laion")
    assert [os.path.basename(f) for f, _ in input_files(both)] == ["a.parquet", "b.csv.gz", "a.parquet"]
    with pytest.raises(InputError, match="matches no file"):
        input_files(InputConfig(path=str(tmp_path / "*.nothing")))


def test_reading_from_a_row_on_skips_row_groups(tmp_path):
    table = pa.table({"url": [f"http://a/{i}.jpg" for i in range(50)], "caption": [str(i) for i in range(50)]})
    pq.write_table(table, tmp_path / "u.parquet", row_group_size=8)
    _write(tmp_path / "u.csv.gz", table)
    for name in ("u.parquet", "u.csv.gz"):
        cfg = InputConfig(path=str(tmp_path / name))
        batches = list(read_file(str(tmp_path / name), input_files(cfg)[0][1], cfg, start=21, batch_rows=7))
        assert max(b.num_rows for b in batches) <= 7
        assert pa.concat_tables(batches)["caption"].to_pylist() == [str(i) for i in range(21, 50)]


def test_cc3m_headerless_tsv(tmp_path):
    src = tmp_path / "Train_GCC-training.tsv"
    src.write_text("a dog on a beach\thttp://a/1.jpg\nactor attends the premiere\thttp://a/2.jpg\n")
    t = _read(InputConfig(path=str(src), preset="cc3m"))
    assert t["url"].to_pylist() == ["http://a/1.jpg", "http://a/2.jpg"]
    assert t["caption"].to_pylist()[0] == "a dog on a beach"


def test_datacomp_columns_kept_under_a_prefix(tmp_path):
    """Columns the download writes itself (DataComp's sha256, a key, sizes) are kept as input_<name>."""
    src = tmp_path / "dc.parquet"
    pq.write_table(pa.table({"uid": ["u1"], "url": ["http://a/1.jpg"], "text": ["t"], "sha256": ["ab" * 32],
                             "original_width": [640], "key": ["k"], "source": ["crawl"]}), src)
    assert _read(InputConfig(path=str(src), preset="datacomp")).to_pylist() == [
        {"url": "http://a/1.jpg", "caption": "t", "uid": "u1", "input_sha256": "ab" * 32,
         "input_original_width": 640, "input_key": "k", "input_source": "crawl"}]


def test_missing_column_names_file_and_column(tmp_path):
    src = _write(tmp_path / "urls.parquet", ROWS)
    with pytest.raises(InputError, match=r"urls.parquet has no column 'url'.*columns: URL, TEXT"):
        _read(InputConfig(path=src))
    with pytest.raises(InputError, match="no column 'nope' named in input.extra_cols"):
        _read(InputConfig(path=src, preset="laion", extra_cols=["nope"]))


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read parquet input .*broken.parquet"):
        _read(InputConfig(path=str(bad), preset="laion"))
    with pytest.raises(InputError, match="does not exist"):
        input_files(InputConfig(path=str(tmp_path / "nope.csv")))
    weird = tmp_path / "urls.xlsx"
    weird.write_text("x")
    with pytest.raises(InputError, match="set input.format"):
        input_files(InputConfig(path=str(weird)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        input_files(InputConfig(path=str(tmp_path / "empty")))


def test_url_only_lists(tmp_path):
    """`caption_col: null` means a URL-only list; a .txt list is one URL per line (commas and all)."""
    src = tmp_path / "urls.csv"
    src.write_text("url\nhttp://a/1.jpg\nhttp://a/2.jpg\n")
    assert _read(InputConfig(path=str(src), caption_col=None)).to_pylist() == [
        {"url": "http://a/1.jpg", "caption": None}, {"url": "http://a/2.jpg", "caption": None}]
    with pytest.raises(InputError, match="has no column 'caption'"):  # unset: the caption column is expected
        _read(InputConfig(path=str(src)))
    txt = tmp_path / "urls.txt"
    txt.write_text('http://a/1.jpg\nhttp://a/x,y.jpg?q="2"\n\n')
    assert _read(InputConfig(path=str(txt), preset="laion")).to_pylist() == [
        {"url": "http://a/1.jpg", "caption": None}, {"url": 'http://a/x,y.jpg?q="2"', "caption": None}]


def _cfg(tmp_path, inputs, *overrides):
    base = {"output": str(tmp_path / "run"), "input": inputs}
    return load_config(None, ["download.samples_per_shard=3", *overrides], base=base)


def _plan(cfg) -> list[int]:
    """Plan (as the stage does, without downloading); the shard ids handed out."""
    return [job[0] for job in jobs(cfg, prepare(cfg))]


def _done(cfg, ids):
    """Mark planned shards as downloaded: a completion record, as the stage commits it."""
    from pipeline.download import download_settings, shard_fingerprint
    from pipeline.input_plan import read_record

    for sid in ids:
        fp = shard_fingerprint(download_settings(cfg), sid, read_record(cfg.raw_dir, sid, 5)["digest"], 5)
        shards.atomic_write(shards.stats_path(cfg.raw_dir, sid), json.dumps({"count": 0, "fingerprint": fp}))


def _urls(n, start=0):
    return pa.table({"url": [f"http://a/{i}.jpg" for i in range(start, start + n)],
                     "caption": [f"c{i}" for i in range(start, start + n)]})


@pytest.mark.parametrize("name,text", [("urls.txt", ""), ("urls.csv", ""), ("urls.csv", "url,caption\n"),
                                       ("urls.jsonl", "")])
def test_an_empty_list_says_so(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=f"input {tmp_path / name} holds no rows"):
        _plan(_cfg(tmp_path, {"path": str(tmp_path / name)}))
    assert not list((tmp_path / "run" / "raw" / "_input").glob("0*"))


def test_shards_never_span_two_inputs_and_ids_run_on(tmp_path):
    pq.write_table(_urls(4), tmp_path / "a.parquet")
    _write(tmp_path / "b.csv.gz", _urls(5, start=100))
    cfg = _cfg(tmp_path, [{"name": "laion", "path": str(tmp_path / "a.parquet")},
                          {"name": "cc", "path": str(tmp_path / "b.csv.gz")}])
    assert _plan(cfg) == [0, 1, 2, 3]
    plans = [pq.read_table(rows_path(cfg.raw_dir, sid, 5)) for sid in range(4)]
    assert [t["source"].to_pylist() for t in plans] == [["laion"] * 3, ["laion"], ["cc"] * 3, ["cc"] * 2]
    assert plans[3]["url"].to_pylist() == ["http://a/103.jpg", "http://a/104.jpg"]
    info = json.loads((cfg.raw_dir / "_input" / "input.json").read_text())
    assert info["complete"] and info["rows"] == 9 and info["next_shard"] == 4
    assert _plan(cfg) == [0, 1, 2, 3]  # planned, not downloaded: handed out again, from the same rows files
    _done(cfg, range(4))
    assert _plan(cfg) == []


def test_trial_runs_continue_where_they_stopped_and_read_only_from_there(tmp_path):
    """--max-shards / --limit stop the plan; the next run continues from the cursor without
    reading the files before it, and the shards equal those of one whole plan."""
    for i in range(3):
        pq.write_table(_urls(4, start=10 * i), tmp_path / f"{i}.parquet", row_group_size=2)
    cfg = _cfg(tmp_path, {"path": str(tmp_path / "*.parquet")})
    assert _plan(_cfg(tmp_path, cfg.input.model_dump(), "download.max_shards=2")) == [0, 1]
    _done(cfg, [0, 1])
    assert _plan(_cfg(tmp_path, cfg.input.model_dump(), "download.limit=7")) == [2]  # 7 rows: 3 + 3 + 1
    _done(cfg, [2])
    first = tmp_path / "0.parquet"
    st = first.stat()
    first.write_bytes(b"x" * st.st_size)  # same size and time: the plan's fingerprint still matches
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _plan(cfg) == [3, 4]  # rows 7..11; 0.parquet (rows 0..3) is never read again
    got = [pq.read_table(rows_path(cfg.raw_dir, s, 5))["url"].to_pylist() for s in planned_ids(cfg.raw_dir)]
    assert [len(g) for g in got] == [3, 3, 1, 3, 2]
    assert sum(got, []) == [f"http://a/{10 * f + i}.jpg" for f in range(3) for i in range(4)]


def test_a_changed_input_is_refused_and_extend_plans_only_new_rows(tmp_path):
    pq.write_table(_urls(4), tmp_path / "a.parquet")
    cfg = _cfg(tmp_path, {"path": str(tmp_path / "*.parquet")})
    assert _plan(cfg) == [0, 1]
    _done(cfg, [0, 1])
    pq.write_table(_urls(6), tmp_path / "a.parquet")  # two rows appended
    pq.write_table(_urls(2, start=50), tmp_path / "b.parquet")  # a new file
    with pytest.raises(shards.StageChanged, match="another input.*--extend"):
        _plan(cfg)
    ext = _cfg(tmp_path, cfg.input.model_dump(), "download.extend=true")
    assert _plan(ext) == [2, 3]
    got = [pq.read_table(rows_path(cfg.raw_dir, s, 5))["url"].to_pylist() for s in (2, 3)]
    assert got == [["http://a/4.jpg", "http://a/5.jpg", "http://a/50.jpg"], ["http://a/51.jpg"]]
    _done(cfg, [2, 3])
    assert _plan(ext) == []  # extended: the same inputs again plan nothing
    pq.write_table(_urls(1), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="a.parquet has 1 rows, fewer than the 6 planned before"):
        _plan(ext)


def test_source_fingerprint_names_files_and_resolved_columns(tmp_path):
    from pipeline.inputs import source_fingerprint

    src = tmp_path / "urls.parquet"
    write_table(ROWS, str(src))
    fp = source_fingerprint(InputConfig(path=str(src), preset="laion"))
    assert fp["settings"]["input.url_col"] == "URL" and fp["settings"]["input.caption_col"] == "TEXT"
    assert list(fp["upstream"]) == [str(src.resolve())]
    assert source_fingerprint(InputConfig(path=str(src), preset="laion", caption_col=None))["hash"] != fp["hash"]
    write_table(ROWS.slice(0, 1), str(src))
    assert source_fingerprint(InputConfig(path=str(src), preset="laion"))["hash"] != fp["hash"]


def test_rules_may_name_input_columns_before_any_download(tmp_path):
    """`tapir run` checks rules before downloading: columns of the input (punsafe) are known from
    its first rows, reserved names as input_<name>; a column nobody has still fails."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from filters.rules import RuleError
    from pipeline import inputs, select
    from pipeline.config import load_config

    pcsv.write_csv(pa.table({"URL": ["http://a/1.jpg"], "TEXT": ["x"], "punsafe": [0.1], "sha256": ["ab"]}),
                   tmp_path / "l.csv")
    base = [f"output={tmp_path / 'run'}", f"input.path={tmp_path / 'l.csv'}", "input.preset=laion"]
    schema = inputs.metadata_schema(load_config(None, base))
    assert schema.field("punsafe").type == pa.float64() and "input_sha256" in schema.names and "source" in schema.names
    select.check_rules(load_config(None, base + ["select.rules=['punsafe < 0.5', 'input_sha256 not in [ab]']"]))
    with pytest.raises(RuleError, match="pwatermark"):
        select.check_rules(load_config(None, base + ["select.rules=['pwatermark < 0.5']"]))
