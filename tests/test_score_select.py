"""The score and select stages on downloaded shards: real photos, planted duplicates, a
corrupt image, a tiny open_clip model saved locally and loaded like a pretrained one."""

import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_config, tapir_cmd
from PIL import Image, ImageOps
from skimage import data
from test_filters import _jpeg, text_image

from pipeline import shards
from pipeline.synthweb import Resource, WebServer, World, build_world

RULES = ["not duplicate", "junk_alt < 0.8", "top 50% by clip_score"]


def _world() -> World:
    """Real photos (one flipped and recompressed, one copied exactly), a text image, a caption
    per language and synthetic scenes, 8 rows per shard."""
    astronaut = Image.fromarray(data.astronaut())
    photos = {
        "astronaut": (_jpeg(astronaut), "An astronaut in a white suit holding a helmet, flags behind."),
        "astronaut_flip": (_jpeg(ImageOps.mirror(astronaut), 60), "Astronaut portrait."),
        "chelsea": (_jpeg(Image.fromarray(data.chelsea())), "Eine getigerte Katze schaut nach oben."),
        "chelsea_copy": (_jpeg(Image.fromarray(data.chelsea())), "Un chat tigré regarde vers le haut."),
        "coffee": (_jpeg(Image.fromarray(data.coffee())), "IMG_2041.jpg"),
        "sign": (_jpeg(text_image()), "A shop sign announcing a big sale."),
        "rocket": (_jpeg(Image.fromarray(data.rocket())), "A rocket on the launch pad under a blue sky."),
    }
    rows, resources = [], {}
    for i, (name, (body, alt)) in enumerate(photos.items()):
        path = f"/photo/{name}.jpg"
        resources[path] = Resource(body=body)
        rows.append({"path": path, "alt": alt, "true_caption": alt, "kind": name, "fate": "success",
                     "duplicate_of": "", "row_id": i})
    synthetic = build_world(17, seed=11, noisy=False)
    for j, r in enumerate(synthetic.rows):
        resources[r["path"]] = synthetic.resources[r["path"]]
        rows.append(r | {"row_id": 100 + j})
    return World(rows, resources)


@pytest.fixture(scope="module")
def scored(local_ray, tmp_path_factory):
    from filters.clip import save_local_clip
    from pipeline.download import download
    from pipeline.score import score
    from pipeline.select import select

    tmp = tmp_path_factory.mktemp("scored")
    clip = save_local_clip(tmp / "tiny-clip")
    world = _world()
    with WebServer(world) as server:
        urls = world.write_url_list(str(tmp / "urls.parquet"), server.base_url)
        cfg = make_config(tmp / "run", urls, "download.samples_per_shard=8", "download.image_size=128",
                          f"score.clip.model={clip}", "score.clip.pretrained=null", "score.batch_size=5",
                          f"select.rules={json.dumps(RULES)}", "score.dedup.semantic_threshold=0.9999")
        download(cfg)
    # corrupt one downloaded image inside its committed tar, as a broken disk or copy would
    meta = shards.read_metadata(cfg.raw_dir).to_pylist()
    victim = next(r for r in meta if r["kind"] == "rocket")
    name = victim["key"][:5]
    samples = shards.read_tar(cfg.raw_dir / f"{name}.tar")
    samples[victim["key"]]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg any more"
    shards.write_tar(cfg.raw_dir / f"{name}.tar", sorted(samples.items()))
    funnel = score(cfg)
    summary = select(cfg)
    keys = {r["kind"]: r["key"] for r in meta if r["kind"] != "clean"}
    keys |= {f"scene{r['row_id']}": r["key"] for r in meta if r["kind"] == "clean"}
    return cfg, clip, funnel, summary, keys


def _scores(cfg):
    """Every score row of the (tiny) test run by key."""
    from pipeline import storage

    return {r["key"]: r for sid in sorted(shards.done_shards(cfg.scores_dir))
            for r in storage.read_parquet(shards.shard_file(cfg.scores_dir, sid, ".parquet")).to_pylist()}


def test_scores_cover_every_downloaded_image(scored):
    cfg, _, funnel, _, keys = scored
    rows = _scores(cfg)
    assert set(rows) == set(keys.values())
    assert funnel["rows_in"] == len(keys) and funnel["scored"] == len(keys) - 1
    assert len(shards.done_shards(cfg.scores_dir)) == 3


def test_corrupt_image_gets_a_reason_not_a_crash(scored):
    cfg, _, funnel, summary, keys = scored
    row = _scores(cfg)[keys["rocket"]]
    assert row["score_error"].startswith("decode error") and row["clip_score"] is None
    assert funnel["failed_by_reason"] == {"decode error": 1}
    sel = {r["key"]: r for r in pq.read_table(cfg.selection_dir / f"{keys['rocket'][:5]}.parquet").to_pylist()}
    assert sel[keys["rocket"]]["keep"] is False and sel[keys["rocket"]]["reason"].startswith("score_error")


def test_basic_language_and_ocr_scores(scored):
    cfg, _, _, _, keys = scored
    rows = _scores(cfg)
    astro, cat = rows[keys["astronaut"]], rows[keys["chelsea"]]
    # the sizes of the photos as served, not of the copies downloaded at image_size 128 (keep_ratio)
    assert (astro["width"], astro["height"], astro["min_side"]) == (512, 512, 512)
    assert (cat["width"], cat["height"], cat["aspect_ratio"]) == (451, 300, pytest.approx(451 / 300))
    stored = shards.read_tar(cfg.raw_dir / f"{keys['chelsea'][:5]}.tar")[keys["chelsea"]]["jpg"]
    assert Image.open(io.BytesIO(stored)).size == (192, 128)
    raw = shards.read_tar(cfg.raw_dir / f"{keys['astronaut'][:5]}.tar")
    assert astro["file_size"] == len(raw[keys["astronaut"]]["jpg"])
    assert rows[keys["coffee"]]["junk_alt"] == 1.0 and astro["junk_alt"] == 0.0
    assert (astro["language"], cat["language"], rows[keys["chelsea_copy"]]["language"]) == ("en", "de", "fr")
    assert rows[keys["sign"]]["text_boxes"] >= 1 and astro["text_boxes"] == 0
    assert all(0 <= r["nsfw_score"] < 0.5 for r in rows.values() if r["score_error"] is None)


def test_planted_duplicates_are_found(scored):
    cfg, _, _, _, keys = scored
    dedup = _duplicates(cfg)
    pair = sorted([keys["chelsea"], keys["chelsea_copy"]])
    kinds = {dedup[k]["duplicate_kind"] for k in pair}
    assert kinds == {None, "exact"} and {dedup[k]["duplicate_of"] for k in pair} - {None} <= set(pair)
    flip = [keys["astronaut"], keys["astronaut_flip"]]
    assert {dedup[k]["duplicate_kind"] for k in flip} == {None, "near"}
    unique = [k for kind, k in keys.items() if kind in ("sign", "coffee")]
    assert all(dedup[k]["duplicate_of"] is None for k in unique)


def test_clip_score_is_the_open_clip_cosine(scored):
    import torch

    from filters.clip import load_clip

    cfg, clip, _, _, keys = scored
    row = _scores(cfg)[keys["astronaut"]]
    model, preprocess, tokenizer = load_clip(clip)
    raw = shards.read_tar(cfg.raw_dir / f"{keys['astronaut'][:5]}.tar")[keys["astronaut"]]
    with torch.no_grad():
        img = model.encode_image(preprocess(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"))[None])
        txt = model.encode_text(tokenizer([raw["txt"].decode()]))
    img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    assert row["clip_score"] == pytest.approx(float((img * txt).sum()), abs=1e-5)
    assert np.allclose(np.asarray(row["clip_embedding"], np.float32), img[0].numpy(), atol=2e-3)
    assert len(row["clip_embedding"]) == 64


def _duplicates(cfg) -> dict:
    """{key: duplicate row} of the run's duplicate groups (read per score shard)."""
    from pipeline import dedup

    return {r["key"]: r for sid in shards.done_shards(cfg.scores_dir) for r in dedup.read(cfg, sid).to_pylist()}


def test_selection_top_fraction_across_shards(scored):
    cfg, _, _, summary, _ = scored
    scores = _scores(cfg)
    dedup = _duplicates(cfg)
    sel = {r["key"]: r for sid in shards.done_shards(cfg.selection_dir)
           for r in pq.read_table(cfg.selection_dir / f"{shards.shard_name(sid)}.parquet").to_pylist()}
    assert set(sel) == set(scores)
    valid = sorted(r["clip_score"] for r in scores.values() if r["clip_score"] is not None)
    threshold = summary["rules"][2]["threshold"]
    assert threshold == pytest.approx(valid[-int(np.ceil(len(valid) / 2))])  # over all shards together
    for key, r in sel.items():
        s = scores[key]
        expect = ("score_error" if s["score_error"] else "not duplicate" if dedup.get(key, {}).get("duplicate_of")
                  else "junk_alt < 0.8" if s["junk_alt"] >= 0.8
                  else "top 50% by clip_score" if s["clip_score"] < threshold else None)
        assert (r["reason"] or None if not r["reason"] or not r["reason"].startswith("score_error")
                else "score_error") == expect, (key, r, s)
        assert r["keep"] == (expect is None)
    kept_shards = {k[:5] for k, r in sel.items() if r["keep"]}
    assert len(kept_shards) >= 2


def test_reselect_with_changed_rule_loads_no_model(scored, tmp_path):
    cfg, _, _, _, _ = scored
    code = """
import json, sys, time
from pipeline.config import RunConfig
from pipeline.select import select
cfg = RunConfig.model_validate(json.loads(sys.argv[1]))
t = time.perf_counter(); summary = select(cfg); elapsed = time.perf_counter() - t
heavy = sorted(m for m in ("torch", "open_clip", "onnxruntime", "transformers") if m in sys.modules)
print(json.dumps({"heavy": heavy, "kept": summary["kept"], "seconds": elapsed}))
"""
    import shutil

    shutil.copytree(cfg.scores_dir, tmp_path / "scores")  # the shared run's selection stays as it is
    changed = cfg.model_copy(update={"output": str(tmp_path),
                                     "select": cfg.select.model_copy(update={"rules": ["junk_alt < 0.8"]})})
    proc = subprocess.run([sys.executable, "-c", code, changed.model_dump_json()], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [] and out["seconds"] < 60  # Ray tasks per shard, started in that process
    scores = _scores(cfg)
    assert out["kept"] == sum(1 for r in scores.values() if r["score_error"] is None and r["junk_alt"] < 0.8)


def test_unknown_rule_fails_before_any_work(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output: {tmp_path / 'run'}\ninput: {{path: nowhere.parquet}}\n"
                   f"select: {{rules: ['clip_scroe >= 0.3']}}\n")
    proc = subprocess.run(tapir_cmd("run", cfg), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "names unknown score 'clip_scroe'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_kill_and_resume_score_gives_same_scores(scored, tmp_path):
    cfg, _, _, _, _ = scored
    out = tmp_path / "rescore"
    conf = cfg.model_copy(update={"output": str(out)})
    conf.score.input = str(cfg.raw_dir)
    conf.score.actors = 1
    path = tmp_path / "score.yaml"
    path.write_text(conf.model_dump_json())  # JSON is YAML
    # killed (driver and Ray workers, SIGKILL) the moment any folder holds two committed parts or shards
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe: no orphan can hold it open
        proc = subprocess.run(tapir_cmd("score", path), stdout=subprocess.DEVNULL, stderr=log, timeout=300,
                              start_new_session=True, env=os.environ | {"TAPIR_KILL_AFTER_COMMITS": "2"})
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert list(conf.scores_dir.glob("**/*_stats.json")) and len(shards.done_shards(conf.scores_dir)) < 3
    resumed = subprocess.run(tapir_cmd("score", path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for sid in range(3):
        name = f"{shards.shard_name(sid)}.parquet"
        assert pq.read_table(conf.scores_dir / name).equals(pq.read_table(cfg.scores_dir / name)), name
    from pipeline import dedup

    for sid in range(3):
        assert dedup.read(conf, sid).equals(dedup.read(cfg, sid)), sid


def test_report_has_plots_grid_and_html(scored):
    from pipeline.report import report

    cfg, _, _, _, _ = scored
    funnel, path = report(cfg.output)
    out = path.parent
    assert {"download", "score", "select"} <= set(funnel)
    assert funnel["select"]["kept"] + funnel["select"]["dropped"] == funnel["score"]["rows_in"]
    for png in ("hist_clip_score.png", "hist_min_side.png", "hist_caption_chars.png", "samples.png"):
        assert Image.open(out / png).size[0] > 100
    page = (out / "index.html").read_text()
    assert "samples.png" in page and "not duplicate" in page


# -- issue 11: fingerprints, stale parts and dedup, whole selections, failures on record -----------------------


def _changed(cfg, **changes):
    """A validated copy of ``cfg`` with dotted keys changed (``score__dedup__near=False``)."""
    from pipeline.config import RunConfig

    data = cfg.model_dump()
    for key, value in changes.items():
        *path, last = key.split("__")
        node = data
        for part in path:
            node = node[part]
        node[last] = value
    return RunConfig.model_validate(data)


def _copy_run(cfg, tmp_path, *, selection=False, **changes):
    """The scored run's scores (and selection) copied into a run of its own that reads the same raw/."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(cfg.scores_dir, out / "scores")
    if selection:
        shutil.copytree(cfg.selection_dir, out / "selection")
    return _changed(cfg, output=str(out), score__input=str(cfg.raw_dir), **changes)


def _records(folder):
    return {sid: shards.stats_path(folder, sid).read_bytes() for sid in shards.done_shards(folder)}


def test_score_refuses_a_changed_clip_model_but_not_a_changed_batch_size(scored, tmp_path):
    from filters.clip import save_local_clip
    from pipeline.score import score

    cfg, _, _, _, _ = scored
    conf = _copy_run(cfg, tmp_path, score__batch_size=3, score__actors=2)
    before = _records(conf.scores_dir)
    score(conf)  # speed settings are not part of what a shard is
    assert _records(conf.scores_dir) == before
    other = _changed(conf, score__clip__model=save_local_clip(tmp_path / "other-clip", seed=1))
    with pytest.raises(shards.StageChanged, match=r"score: .*3 shards .*score\.clip\.model was 'local-dir:.*--redo"):
        score(other)
    assert _records(conf.scores_dir) == before  # refused before touching anything


def test_stale_parts_are_redone_and_redo_rescores(scored, tmp_path):
    """A part left by a killed run with other scorers is redone, never merged; a finished run
    with other scorers is refused, then redone whole with redo."""
    from pipeline.score import ScoreShard, part_dir, score

    cfg, _, _, _, _ = scored
    basic = _basic(cfg, tmp_path / "run", cfg.raw_dir)
    stage = ScoreShard(basic.model_dump(), "cpu", ["basic"])  # what a run killed after one part leaves
    stage.setup()
    stage(1)
    assert shards.done_shards(part_dir(basic, "cpu")) == {1}
    both = _changed(basic, score__scorers=["basic", "phash"])
    funnel = score(both)
    assert funnel["shards"] == 3 and not funnel.get("failed_shards")
    for sid in range(3):
        assert "phash" in pq.read_schema(both.scores_dir / f"{shards.shard_name(sid)}.parquet").names, sid
    with pytest.raises(shards.StageChanged, match=r"score\.scorers was \['basic', 'phash'\], now \['basic'\]"):
        score(basic)
    score(_changed(basic, redo=True))
    for sid in range(3):
        assert "phash" not in pq.read_schema(basic.scores_dir / f"{shards.shard_name(sid)}.parquet").names, sid
        assert shards.read_stats(basic.scores_dir, sid)["fingerprint"]["settings"]["score.scorers"] == ["basic"]
    from pipeline import dedup

    assert dedup.summary(basic)["fingerprint"]["hash"] == dedup.fingerprint(basic)["hash"]  # from the redone shards


def test_stale_dedup_is_recomputed_and_select_refuses_it(scored, tmp_path):
    from pipeline.score import score
    from pipeline.select import select

    cfg, _, _, _, keys = scored
    conf = _copy_run(cfg, tmp_path, score__dedup__near=False)
    with pytest.raises(shards.StageChanged, match=r"_dedup\S* do(es)? not match the scores: "
                                                  r"score\.dedup\.near was True, now False"):
        select(conf)
    score(conf)  # all shards are done: only the duplicate groups are redone, with the new setting
    dedup = _duplicates(conf)
    assert {dedup[keys[k]]["duplicate_kind"] for k in ("astronaut", "astronaut_flip")} == {None}
    assert {dedup[keys[k]]["duplicate_kind"] for k in ("chelsea", "chelsea_copy")} == {None, "exact"}
    select(conf)
    # a score shard redone after dedup (here: its record rewritten) makes dedup stale again
    record = shards.read_stats(conf.scores_dir, 1)
    shards.atomic_write(shards.stats_path(conf.scores_dir, 1), json.dumps(record | {"duration": 1.0}))
    with pytest.raises(shards.StageChanged, match=r"_dedup\S* do(es)? not match the scores: its input scores "):
        select(conf)
    score(conf)
    select(conf)


def test_select_writes_a_whole_selection(scored, tmp_path):
    """A select killed after its first shard leaves no summary: later stages refuse the mix."""
    from pipeline.select import check_selection, select

    cfg, _, _, _, _ = scored
    conf = _copy_run(cfg, tmp_path, selection=True)
    select(conf)
    assert check_selection(conf)["kept"] == json.loads((cfg.selection_dir / "_summary.json").read_text())["kept"]
    records = _records(conf.selection_dir)
    select(conf)  # the same selection again: every record byte for byte (later stages redo nothing)
    assert _records(conf.selection_dir) == records
    other = _changed(conf, select__rules=["junk_alt < 0.8"])
    with pytest.raises(shards.StageChanged, match=r"selected differently: select\.rules was"):
        check_selection(other)
    path = tmp_path / "other.yaml"
    path.write_text(other.model_dump_json())
    with open(tmp_path / "killed.log", "w") as log:  # the folder holds 3 records: killed after the first new one
        proc = subprocess.run(tapir_cmd("select", path), stdout=subprocess.DEVNULL, stderr=log, timeout=300,
                              start_new_session=True, env=os.environ | {"TAPIR_KILL_AFTER_COMMITS": "1"})
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert _records(conf.selection_dir) != records  # one shard is new, the others old
    assert not (conf.selection_dir / "_summary.json").exists()
    for c in (conf, other):
        with pytest.raises(shards.StageChanged, match="no complete selection .* run `tapir select`"):
            check_selection(c)
    select(other)
    assert check_selection(other)["rules"] == [{"rule": "junk_alt < 0.8"}]
    with pytest.raises(shards.StageChanged, match="select.rules was"):
        check_selection(conf)


def _basic(cfg, output, raw):
    """The basic scorer alone (cheap CPU tasks), exact dedup only."""
    return _changed(cfg, output=str(output), score__input=str(raw), score__scorers=["basic"],
                    score__dedup__near=False, score__dedup__semantic=False,
                    select__rules=["not duplicate", "min_side >= 8"])


def test_failed_score_shard_is_recorded_and_select_reports_it(scored, tmp_path):
    import shutil

    from pipeline.score import score
    from pipeline.select import select

    cfg, _, _, _, _ = scored
    raw = tmp_path / "raw"
    shutil.copytree(cfg.raw_dir, raw)
    (raw / "00001.tar").write_bytes(b"this is not a tar file" * 100)  # a shard that cannot be read
    conf = _basic(cfg, tmp_path / "run", raw)
    funnel = score(conf)
    assert set(funnel["failed_shards"]) == {"1"} and "ReadError" in funnel["failed_shards"]["1"]
    assert set(shards.failed_shards(conf.scores_dir)) == {1}  # on disk, with its reason
    assert "ReadError" in shards.failed_shards(conf.scores_dir)[1]
    from pipeline import dedup

    assert shards.done_shards(conf.scores_dir) == {0, 2} and dedup.staleness(conf) is None
    funnel = select(conf)  # selects the rest, lists the hole, and exits non-zero (failed_shards)
    assert set(funnel["failed_shards"]) == {"1"} and "ReadError" in funnel["failed_shards"]["1"]
    from pipeline.select import check_selection

    assert set(check_selection(conf)["unscored_shards"]) == {"1"}
    assert shards.done_shards(conf.selection_dir) == {0, 2}


def test_no_scorable_shard_is_a_failure_not_a_stopiteration(scored, tmp_path):
    import shutil

    from pipeline import dedup
    from pipeline.score import score

    cfg, _, _, _, _ = scored
    raw = tmp_path / "raw"
    shutil.copytree(cfg.raw_dir, raw)
    for tar in raw.glob("*.tar"):
        tar.write_bytes(b"\0" * 10)
    conf = _basic(cfg, tmp_path / "run", raw)
    funnel = score(conf)
    assert set(funnel["failed_shards"]) == {"0", "1", "2"} and funnel["shards"] == 0
    assert dedup.summary(conf) is None
    with pytest.raises(FileNotFoundError, match="no scored shards in .* to find duplicates in"):
        dedup.run(conf)


def test_cpu_scorer_thread_error_fails_the_stage(scored, tmp_path, monkeypatch):
    """The CPU scorers' loop runs on a thread: an error there (here: the Ray cluster lost
    after the first shard) must fail the command, not end the thread and leave shards unscored."""
    from pipeline import ray_backend
    from pipeline.score import score

    cfg, _, _, _, _ = scored
    real = ray_backend.run_tasks

    def lost_after_one(*args, **kwargs):
        results = real(*args, **kwargs)
        yield next(results)
        results.close()
        raise ConnectionError("lost the connection to the Ray cluster")

    monkeypatch.setattr(ray_backend, "run_tasks", lost_after_one)
    with pytest.raises(RuntimeError, match="CPU scorers stopped: ConnectionError: lost the connection"):
        score(_basic(cfg, tmp_path / "run", cfg.raw_dir))


def test_score_fingerprint_holds_what_changes_the_scores_only():
    from pipeline.config import load_config
    from pipeline.score import shard_settings

    cfg = load_config(None, ["output=/tmp/unused", "input.path=unused.parquet", "score.batch_size=7",
                             "score.actors=3", "score.clip.device=cpu"])
    assert shard_settings(cfg.score) == {
        "score.scorers": ["basic", "language", "phash", "clip", "nsfw", "ocr"],
        "score.clip.model": "ViT-B-32", "score.clip.pretrained": "laion2b_s34b_b79k", "score.clip.precision": "auto",
        "score.ocr_max_side": 512, "score.ocr_min_confidence": 0.8}
    cfg = load_config(None, ["output=/tmp/unused", "input.path=unused.parquet", "score.scorers=[basic]",
                             "score.dedup.near=false", "score.dedup.semantic=false"])
    assert shard_settings(cfg.score) == {"score.scorers": ["basic"]}  # dedup settings belong to scores/_dedup/


def test_score_on_s3_reads_8_digit_shards_and_writes_there(local_ray, s3, tmp_path):
    """Input and output on the loopback S3 server; the input named as DataComp names its shards
    (00000000.tar): the scores hold every row, with the original sizes, and a rerun does nothing."""
    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.score import score
    from pipeline.synthweb import write_curated_run

    write_curated_run(tmp_path / "src", 6, per_shard=3, faults=False, drop_every=None)
    raw = f"{s3}/datacomp/shards"
    for f in (tmp_path / "src" / "raw").iterdir():
        sid, rest = f.name[:5], f.name[5:]
        storage.upload(f, f"{raw}/{int(sid):08d}{rest}")
    cfg = load_config(None, [f"output={s3}/run", "input.path=unused.parquet", f"score.input={raw}",
                             "score.scorers=[basic]", "score.dedup.near=false", "score.dedup.semantic=false"])
    funnel = score(cfg)
    assert funnel["shards"] == 2 and funnel["rows_in"] == 6 and not funnel.get("failed_shards")
    for sid in (0, 1):
        table = storage.read_parquet(shards.shard_file(cfg.scores_dir, sid, ".parquet"))
        meta = storage.read_parquet(f"{raw}/{sid:08d}.parquet").sort_by("key")
        assert table["key"].to_pylist() == meta["key"].to_pylist()
        assert table["width"].to_pylist() == meta["original_width"].to_pylist()  # 2x the stored image's
    assert not list(storage.path(cfg.scores_dir).glob("_parts/*/*.parquet"))  # parts merged and removed
    records = {sid: shards.stats_path(cfg.scores_dir, sid).read_bytes() for sid in (0, 1)}
    score(cfg)
    assert records == {sid: shards.stats_path(cfg.scores_dir, sid).read_bytes() for sid in (0, 1)}
