import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.inputs import InputError, normalise
from pipeline.synthweb import write_table

ROWS = pa.table({"URL": ["http://a/1.jpg", "http://a/2.jpg"], "TEXT": ["one", "two"], "similarity": [0.3, 0.4]})


@pytest.mark.parametrize("ext", ["parquet", "csv", "tsv", "jsonl"])
def test_formats_and_extra_columns(tmp_path, ext):
    src = tmp_path / f"urls.{ext}"
    write_table(ROWS, str(src))
    summary = normalise(InputConfig(path=str(src), preset="laion"), tmp_path / "out" / "input.parquet")
    t = pq.read_table(tmp_path / "out" / "input.parquet")
    assert summary["rows"] == 2
    assert t.column_names == ["url", "caption", "similarity"]
    assert t["caption"].to_pylist() == ["one", "two"]


def test_folder_of_files(tmp_path):
    (tmp_path / "in").mkdir()
    write_table(ROWS, str(tmp_path / "in" / "a.parquet"))
    write_table(ROWS, str(tmp_path / "in" / "b.parquet"))
    assert normalise(InputConfig(path=str(tmp_path / "in"), preset="laion"), tmp_path / "n.parquet")["rows"] == 4


def test_cc3m_headerless_tsv(tmp_path):
    src = tmp_path / "Train_GCC-training.tsv"
    src.write_text("a dog on a beach\thttp://a/1.jpg\nactor attends the premiere\thttp://a/2.jpg\n")
    normalise(InputConfig(path=str(src), preset="cc3m"), tmp_path / "n.parquet")
    t = pq.read_table(tmp_path / "n.parquet")
    assert t["url"].to_pylist() == ["http://a/1.jpg", "http://a/2.jpg"]
    assert t["caption"].to_pylist()[0] == "a dog on a beach"


def test_datacomp_preset_keeps_uid(tmp_path):
    src = tmp_path / "dc.parquet"
    pq.write_table(pa.table({"uid": ["u1"], "url": ["http://a/1.jpg"], "text": ["t"]}), src)
    normalise(InputConfig(path=str(src), preset="datacomp"), tmp_path / "n.parquet")
    assert pq.read_table(tmp_path / "n.parquet").to_pylist() == [{"url": "http://a/1.jpg", "caption": "t", "uid": "u1"}]


def test_missing_column_names_file_and_column(tmp_path):
    src = tmp_path / "urls.parquet"
    write_table(ROWS, str(src))
    with pytest.raises(InputError, match=r"urls.parquet has no column 'url'.*columns: URL, TEXT"):
        normalise(InputConfig(path=str(src)), tmp_path / "n.parquet")
    with pytest.raises(InputError, match="no column 'nope' named in input.extra_cols"):
        normalise(InputConfig(path=str(src), preset="laion", extra_cols=["nope"]), tmp_path / "n.parquet")


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read parquet input .*broken.parquet"):
        normalise(InputConfig(path=str(bad), preset="laion"), tmp_path / "n.parquet")
    with pytest.raises(InputError, match="does not exist"):
        normalise(InputConfig(path=str(tmp_path / "nope.csv")), tmp_path / "n.parquet")
    weird = tmp_path / "urls.xlsx"
    weird.write_text("x")
    with pytest.raises(InputError, match="set input.format"):
        normalise(InputConfig(path=str(weird)), tmp_path / "n.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        normalise(InputConfig(path=str(tmp_path / "empty")), tmp_path / "n.parquet")


def test_url_only_lists(tmp_path):
    """`caption_col: null` means a URL-only list; a .txt list is one URL per line (commas and all)."""
    src = tmp_path / "urls.csv"
    src.write_text("url\nhttp://a/1.jpg\nhttp://a/2.jpg\n")
    normalise(InputConfig(path=str(src), caption_col=None), tmp_path / "n.parquet")
    assert pq.read_table(tmp_path / "n.parquet").to_pylist() == [
        {"url": "http://a/1.jpg", "caption": None}, {"url": "http://a/2.jpg", "caption": None}]
    with pytest.raises(InputError, match="has no column 'caption'"):  # unset: the caption column is expected
        normalise(InputConfig(path=str(src)), tmp_path / "n.parquet")
    txt = tmp_path / "urls.txt"
    txt.write_text('http://a/1.jpg\nhttp://a/x,y.jpg?q="2"\n\n')
    normalise(InputConfig(path=str(txt), preset="laion"), tmp_path / "n.parquet")
    assert pq.read_table(tmp_path / "n.parquet").to_pylist() == [
        {"url": "http://a/1.jpg", "caption": None}, {"url": 'http://a/x,y.jpg?q="2"', "caption": None}]


@pytest.mark.parametrize("name,text", [("urls.txt", ""), ("urls.csv", ""), ("urls.csv", "url,caption\n"),
                                       ("urls.jsonl", "")])
def test_an_empty_list_says_so(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=f"input {tmp_path / name} holds no rows"):
        normalise(InputConfig(path=str(tmp_path / name)), tmp_path / "n.parquet")
    assert not (tmp_path / "n.parquet").exists()


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
