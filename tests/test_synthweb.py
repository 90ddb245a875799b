import io
import urllib.request

from PIL import Image

from pipeline.synthweb import KINDS, WebServer, build_world


def test_world_is_deterministic_and_covers_every_kind():
    a, b = build_world(40, seed=5), build_world(40, seed=5)
    assert a.rows == b.rows
    assert {p: r.body for p, r in a.resources.items()} == {p: r.body for p, r in b.resources.items()}
    assert {r["kind"] for r in a.rows} == {k for k, _, _ in KINDS}
    assert build_world(40, seed=6).rows != a.rows


def test_captions_describe_the_scene():
    row = build_world(10, seed=1).rows[0]
    assert row["alt"] == row["true_caption"] and row["true_caption"].endswith("background.")


def test_duplicates_point_at_their_original():
    w = build_world(60, seed=2)
    for r in w.rows:
        if r["kind"] == "exact_dup":
            assert w.resources[r["path"]].body == w.resources[r["duplicate_of"]].body
        if r["kind"] == "near_dup":
            assert w.resources[r["path"]].body != w.resources[r["duplicate_of"]].body


def test_server_serves_images_and_failures():
    w = build_world(40, seed=5)
    with WebServer(w) as s:
        clean = next(r for r in w.rows if r["kind"] == "clean")
        img = Image.open(io.BytesIO(urllib.request.urlopen(s.base_url + clean["path"], timeout=2).read()))
        assert img.size == (256, 256)
        missing = next(r for r in w.rows if r["kind"] == "http_404")
        try:
            urllib.request.urlopen(s.base_url + missing["path"], timeout=2)
            raise AssertionError("expected a 404")
        except urllib.error.HTTPError as e:
            assert e.code == 404
