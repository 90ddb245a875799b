"""The recaption stage with tiny captioners built from configs, saved locally and loaded by
path through the auto classes: a LLaVA chat VLM (the default captioner's shape: it reads
the prompt and the alt-text hint) and a prefix-only BLIP; the OpenAI-compatible backend
against a loopback server that serves the same model and records what it received."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config, tapir_cmd
from PIL import Image

from pipeline import shards
from pipeline.schemas import kept_digest
from pipeline.synthweb import WebServer, build_world, write_selection_summary
from recaption.clean import degenerate

FAST = ["recaption.token_counter=words", "recaption.min_words=1", "recaption.max_new_tokens=16"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from recaption.tiny import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    from recaption.tiny import save_tiny_chat_vlm

    return save_tiny_chat_vlm(tmp_path_factory.mktemp("chat") / "tiny-chat")


def _commit_selection(cfg, sid, keys, keep):
    staging = shards.new_staging(cfg.selection_dir, sid)
    pq.write_table(pa.table({"key": keys, "keep": keep, "reason": [None if k else "rule" for k in keep]}),
                   staging / f"{shards.shard_name(sid)}.parquet")
    shards.commit(staging, cfg.selection_dir, sid, [f"{shards.shard_name(sid)}.parquet"],  # the record select writes
                  {"count": len(keys), "rows": len(keys), "kept": sum(keep),
                   "kept_digest": kept_digest(k for k, kp in zip(keys, keep) if kp)})
    done = [pq.read_table(cfg.selection_dir / f"{shards.shard_name(i)}.parquet")["keep"].to_pylist()
            for i in sorted(shards.done_shards(cfg.selection_dir))]
    write_selection_summary(Path(cfg.output), sum(map(len, done)), sum(map(sum, done)))  # as `tapir select` does


@pytest.fixture(scope="module")
def selected(local_ray, tmp_path_factory):
    """A downloaded run (12 synthetic scenes, 2 shards) with a selection that drops 2 rows."""
    from pipeline.download import download

    tmp = tmp_path_factory.mktemp("recap")
    world = build_world(12, seed=21, noisy=False)
    with WebServer(world) as server:
        urls = world.write_url_list(str(tmp / "urls.parquet"), server.base_url)
        cfg = make_config(tmp / "run", urls, "download.samples_per_shard=6")
        download(cfg)
    dropped = set()
    for sid in sorted(shards.done_shards(cfg.raw_dir)):
        keys = pq.read_table(cfg.raw_dir / f"{shards.shard_name(sid)}.parquet")["key"].to_pylist()
        dropped.add(keys[0])
        _commit_selection(cfg, sid, keys, [i != 0 for i in range(len(keys))])
    return cfg, dropped


def _config(selected_cfg, out, *overrides, copy_selection=False):
    """A run in ``out`` reading ``selected_cfg``'s raw/ (and selection/, copied when a test changes it)."""
    from pipeline.config import load_config

    data = selected_cfg.model_dump()
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("raw", "selection"):
        src = Path(selected_cfg.output) / folder
        if not (out / folder).exists():
            shutil.copytree(src, out / folder) if copy_selection and folder == "selection" else \
                os.symlink(src, out / folder)
    data["output"] = str(out)
    return load_config(None, list(overrides), base=data)


def _captions(cfg):
    return {r["key"]: r for sid in sorted(shards.done_shards(cfg.captions_dir))
            for r in pq.read_table(cfg.captions_dir / f"{shards.shard_name(sid)}.parquet").to_pylist()}


def test_captions_for_kept_rows_with_provenance(selected, tiny_chat, tmp_path):
    from pipeline.recaption import recaption

    base, dropped = selected
    cfg = _config(base, tmp_path, f"recaption.model={tiny_chat}", *FAST)
    funnel = recaption(cfg)
    rows = _captions(cfg)
    assert len(rows) == 10 and not dropped & set(rows)  # only kept rows are captioned
    assert funnel["rows_in"] == 10 and funnel["captioned"] + funnel["failed"] + funnel.get("partial", 0) == 10
    for r in rows.values():
        assert r["model"] == tiny_chat and r["backend"] == "transformers"
        assert (r["prompt_descriptive"], r["prompt_short"]) == ("descriptive@1", "short@1")
        assert r["alt_text"] and r["created_at"]
        for kind in ("descriptive", "short"):
            assert (r[f"{kind}_status"] == "ok") == (r[kind] is not None)
            if r[kind] is not None:
                assert degenerate(r[kind], "", 1) is None  # nothing junk is stored
        if r["status"] == "ok":
            assert set(json.loads(r["generation"])) == {"descriptive", "short"}
        else:
            assert r["reason"] and (r["descriptive"] is None or r["short"] is None)
    assert any(r["status"] == "ok" for r in rows.values()), "the tiny model should caption something"
    # the report: funnel with failure reasons, caption lengths before/after, the caption grid
    from pipeline.report import report

    full, path = report(cfg.output)
    assert full["recaption"]["captioned"] == funnel["captioned"]
    assert sum(full["recaption"]["failed_by_reason"].values()) >= funnel["failed"]
    for png in ("hist_caption_lengths.png", "captions.png"):
        assert Image.open(path.parent / png).size[0] > 100
    assert "captions.png" in (path.parent / "index.html").read_text()


def test_degenerate_output_is_retried_then_recorded_failed(selected, tiny_chat, tmp_path):
    from pipeline.recaption import RecaptionShard

    base, _ = selected
    # two new tokens can never make the three words a caption needs: every attempt is degenerate
    cfg = _config(base, tmp_path, f"recaption.model={tiny_chat}", "recaption.max_new_tokens=2",
                  "recaption.token_counter=words", "recaption.min_words=3")
    cfg.captions_dir.mkdir(parents=True)
    stage = RecaptionShard(cfg.model_dump())
    stage.setup()
    stats = stage(0)
    rows = _captions(cfg)
    attempts = 1 + len(cfg.recaption.retry_sampling)
    assert stats["ok"] == stats["partial"] == 0 and stats["failed"] == len(rows) == 5
    for r in rows.values():
        assert r["status"] == "failed" and r["descriptive"] is None and r["short"] is None
        assert r["descriptive_status"] == r["short_status"] == "failed"
        assert r["descriptive_attempts"] == r["short_attempts"] == attempts
        assert "descriptive: " in r["reason"] and f"after {attempts} attempts" in r["reason"]
        assert r["descriptive_raw"] is not None  # what the model said is kept for inspection


def test_each_caption_kind_stands_on_its_own(selected, tiny_chat, tmp_path):
    """A descriptive caption that fails (a 1-token budget leaves nothing) costs the row
    nothing of its good short caption: status 'partial', the short text kept."""
    from pipeline.recaption import RecaptionShard

    base, _ = selected
    cfg = _config(base, tmp_path, f"recaption.model={tiny_chat}", *FAST, "recaption.token_budget_descriptive=1")
    cfg.captions_dir.mkdir(parents=True)
    stage = RecaptionShard(cfg.model_dump())
    stage.setup()
    stats = stage(0)
    rows = list(_captions(cfg).values())
    assert stats["descriptive_ok"] == 0 and stats["short_ok"] == stats["partial"] > 0
    partial = [r for r in rows if r["status"] == "partial"]
    assert len(partial) == stats["partial"]
    for r in partial:
        assert r["descriptive"] is None and r["descriptive_status"] == "failed"
        assert r["short"] and r["short_status"] == "ok" and degenerate(r["short"], "", 1) is None
        assert r["reason"].startswith("descriptive: empty after")


def test_prompt_and_hint_reach_the_local_chat_model(tiny_chat, images):
    """The tokenized chat input holds the rendered prompt and the alt-text hint, word for word
    (no unknown token), inside the chat template's user turn."""
    import re

    from recaption.backends import TransformersCaptioner
    from recaption.prompts import load_prompt

    cap = TransformersCaptioner(tiny_chat, device="cpu")
    cap.setup()
    assert cap.chat
    template = load_prompt("descriptive-v1")
    alts = ["a large red circle at the top", "two small blue stars at the bottom left"]
    prompts = [template.render(a, True) for a in alts]
    batch = cap.inputs(images[:2], prompts, [template.prefix] * 2)
    assert cap.tokenizer.unk_token_id not in batch["input_ids"].tolist()[0]
    for ids, prompt, alt in zip(batch["input_ids"], prompts, alts):
        decoded = " ".join(cap.tokenizer.decode(ids, skip_special_tokens=False).split())
        words = " ".join(re.findall(r"\w+|[^\w\s]", prompt.lower()))
        assert "<|user|> <image>" in decoded and decoded.endswith("<|end|> <|assistant|>")
        assert words in decoded and " ".join(alt.split()) in decoded
        assert "alt - text" in decoded  # the hint's own words, not only the alt-text
    plain = cap.inputs(images[:1], [template.render(alts[0], False)], [""])
    assert "alt - text" not in cap.tokenizer.decode(plain["input_ids"][0])


def test_prefix_only_captioner_refuses_the_alt_text_hint(selected, tiny_blip, tiny_chat, tmp_path, caplog):
    """BLIP has no chat template: it reads a prefix, never the prompt or the hint. The hint is
    refused before any work; without it the captioner runs, with a warning that only the
    prefixes are used."""
    from pipeline.config import ConfigError
    from pipeline.recaption import recaption
    from recaption.backends import check_loadable

    base, _ = selected
    cfg = _config(base, tmp_path / "hint", f"recaption.model={tiny_blip}", *FAST)
    assert cfg.recaption.alt_text_hint  # the default
    with pytest.raises(ConfigError, match=r"recaption\.alt_text_hint: .* no chat template"):
        recaption(cfg)
    assert not cfg.captions_dir.exists()  # stopped before any work
    cfg = _config(base, tmp_path / "nohint", f"recaption.model={tiny_blip}", *FAST, "recaption.alt_text_hint=false")
    assert check_loadable(cfg.recaption) is False
    assert "reads only the prompt templates' prefix" in caplog.text
    chat = _config(base, tmp_path / "chat", f"recaption.model={tiny_chat}", *FAST)
    assert check_loadable(chat.recaption) is True


def _copy_shard(cfg, src: int, dst: int):
    """Make shard ``dst`` of ``cfg``'s raw/ and selection/ a copy of shard ``src`` (same images, keys)."""
    for folder in (cfg.raw_dir, cfg.selection_dir):
        a, b = shards.shard_name(src), shards.shard_name(dst)
        files = [p.name.replace(a, b) for p in folder.glob(f"{a}.*")]
        staging = shards.new_staging(folder, dst)
        for name in files:
            shutil.copy(folder / name.replace(b, a), staging / name)
        shards.commit(staging, folder, dst, files, shards.read_stats(folder, src))


def test_sampled_retries_are_seeded_per_row_and_shard(selected, tiny_chat, tmp_path):
    """Greedy output of the random tiny model is a repetition loop, so every row goes on to
    sampled retries: redoing a shard gives the same captions; the same images in another
    shard sample differently."""
    from pipeline.recaption import RecaptionShard

    base, _ = selected
    src = _config(base, tmp_path / "src", f"recaption.model={tiny_chat}", *FAST)
    cfg = _config(base, tmp_path / "run", f"recaption.model={tiny_chat}", *FAST)
    for folder in ("raw", "selection"):  # a private copy: shard 7 is a copy of shard 0
        (tmp_path / "run" / folder).unlink()
        shutil.copytree(Path(src.output) / folder, tmp_path / "run" / folder)
    _copy_shard(cfg, 0, 7)
    cfg.captions_dir.mkdir(parents=True)

    def actor():
        stage = RecaptionShard(cfg.model_dump())
        stage.setup()
        return stage

    def caption(stage, sid):
        stage(sid)
        table = pq.read_table(cfg.captions_dir / f"{shards.shard_name(sid)}.parquet")
        return [(r["key"], r["descriptive_raw"], r["short_raw"], r["descriptive_attempts"]) for r in table.to_pylist()]

    stage = actor()
    first = caption(stage, 0)
    assert all(attempts > 1 for *_, attempts in first), "the test needs sampled retries"
    other = caption(stage, 7)  # other work in between changes no seed
    assert caption(stage, 0) == first
    assert caption(actor(), 0) == first  # nor does a fresh actor
    assert [r[0] for r in other] == [r[0] for r in first]  # same keys, same images
    assert [r[1:3] for r in other] != [r[1:3] for r in first]


def test_resume_after_kill_gives_same_captions(selected, tiny_chat, tmp_path):
    """Killed after its first committed shard (at a deterministic point), the resumed run
    gives the same captions as an uninterrupted one, sampled retries included."""
    from pipeline.recaption import recaption

    base, _ = selected
    args = [f"recaption.model={tiny_chat}", *FAST, "recaption.actors=1", "recaption.batch_size=2"]
    reference = _config(base, tmp_path / "ref", *args)
    recaption(reference)
    killed = _config(base, tmp_path / "killed", *args)
    path = tmp_path / "recap.yaml"
    path.write_text(killed.model_dump_json())
    proc = subprocess.run(tapir_cmd("recaption", path), capture_output=True, text=True, timeout=300,
                          start_new_session=True, env={**os.environ, "TAPIR_KILL_AFTER_COMMITS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(shards.done_shards(killed.captions_dir)) == 1
    resumed = subprocess.run(tapir_cmd("recaption", path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = _captions(reference), _captions(killed)
    assert ref.keys() == got.keys()
    assert any(r["descriptive_attempts"] > 1 for r in ref.values())
    for key in ref:
        for col in ("descriptive", "short", "status", "reason", "descriptive_raw", "short_raw"):
            assert ref[key][col] == got[key][col], (key, col)


@pytest.fixture(scope="module")
def images():
    world = build_world(4, seed=5, noisy=False)
    import io

    return [Image.open(io.BytesIO(world.resources[r["path"]].body)).convert("RGB") for r in world.rows]


def test_openai_backend_matches_local_model(tiny_chat, images):
    from recaption.backends import OpenAICaptioner, TransformersCaptioner
    from recaption.server import CaptionServer

    local = TransformersCaptioner(tiny_chat, device="cpu", max_new_tokens=12)
    local.setup()
    prompts = [f"describe image {i}" for i in range(4)]
    expected = local.generate(images, prompts, [""] * 4, {})
    with CaptionServer(tiny_chat) as server:
        client = OpenAICaptioner(server.base_url, "tiny", concurrency=2, timeout=120, retries=0, max_new_tokens=12)
        client.setup()
        got = client.generate(images, prompts, [""] * 4, {}, seeds=[11, 12, 13, 14])
    assert [t for t, _, _ in got] == [t for t, _, _ in expected]
    assert all(err is None for _, _, err in got)
    received = sorted(server.received, key=lambda r: r["seed"])
    assert [(r["prompt"], r["seed"], r["max_tokens"]) for r in received] == [(p, 11 + i, 12)
                                                                           for i, p in enumerate(prompts)]


@pytest.mark.parametrize("fault,expect_ok", [
    ({"fail_first": 2}, True),    # 503 twice, then answers: retried with backoff
    ({"drop_first": 1}, True),    # connection dropped without an answer: retried
    ({"fail_first": 10}, False),  # keeps failing: the rows record the server's error
    ({"delay": 4.0}, False),      # slower than the client's deadline on every attempt
])
def test_openai_backend_faults(tiny_chat, images, fault, expect_ok):
    import time

    from recaption.backends import OpenAICaptioner
    from recaption.server import CaptionServer

    with CaptionServer(tiny_chat, **fault) as server:
        # a generous deadline where an answer is expected (a loaded machine is slow), a short one where not
        client = OpenAICaptioner(server.base_url, "tiny", concurrency=1, timeout=120 if expect_ok else 1.5,
                                 retries=2, backoff=0.05, max_new_tokens=8)
        client.setup()
        started = time.perf_counter()
        [(text, _, error)] = client.generate(images[:1], ["describe"], [""], {})
        elapsed = time.perf_counter() - started
    if expect_ok:
        assert error is None and text is not None
    else:
        assert text is None and error.startswith("server: gave up after 3 attempts")
        assert elapsed < 15


def test_recaption_stage_over_openai_backend(selected, tiny_chat, tmp_path):
    """Each row's rendered prompt, alt-text hint included, reaches the server, with a seed
    per row, kind and attempt (the same on a redo)."""
    from pipeline.recaption import load_prompts, recaption
    from recaption.backends import sampling_seed
    from recaption.server import CaptionServer

    base, _ = selected
    with CaptionServer(tiny_chat, fail_first=1) as server:
        cfg = _config(base, tmp_path, "recaption.backend=openai", f"recaption.base_url={server.base_url}",
                      "recaption.model=tiny-chat", *FAST, "recaption.backoff=0.05", "recaption.actors=1")
        funnel = recaption(cfg)
    rows = _captions(cfg)
    assert len(rows) == 10 and funnel["rows_in"] == 10
    assert all(r["backend"] == "openai" and r["model"] == "tiny-chat" for r in rows.values())
    assert any(r["status"] == "ok" for r in rows.values())
    prompts = load_prompts(cfg)
    received = {(r["prompt"], r["seed"]) for r in server.received}
    for key, r in rows.items():
        sid = int(key[:5])
        for kind in ("descriptive", "short"):
            rendered = prompts[kind].render(r["alt_text"], True)
            assert r["alt_text"] in rendered and prompts[kind].text in rendered
            for attempt in range(r[f"{kind}_attempts"]):
                assert (rendered, sampling_seed(sid, key, kind, attempt)) in received, (key, kind, attempt)


@pytest.mark.parametrize("model,reason", [
    ("Salesforce/blip-image-captionning-large", "HF_HUB_OFFLINE"),  # misspelt, not cached, no network
    ("/nonexistent/captioner", ""),                           # a bad path
    ("WEIGHTLESS", "no weights found"),                        # a folder with a config but no weights
    ("TEXTONLY", "not an image-text-to-text model"),          # a model the captioner cannot be
])
def test_unloadable_captioner_stops_before_work(selected, tiny_chat, tmp_path, model, reason):
    from pipeline.config import ModelLoadError
    from pipeline.recaption import recaption

    if model == "WEIGHTLESS":
        model = str(tmp_path / "weightless")
        shutil.copytree(tiny_chat, model, ignore=shutil.ignore_patterns("*.safetensors"))
    if model == "TEXTONLY":
        from transformers import BertConfig

        model = str(tmp_path / "bert")
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(model)
    base, _ = selected
    cfg = _config(base, tmp_path / "run", f"recaption.model={model}", *FAST)
    with pytest.raises(ModelLoadError) as err:
        recaption(cfg)
    assert err.value.key == "recaption.model" and err.value.model == model
    assert str(err.value).startswith(f"cannot load {model} (recaption.model): ")
    assert reason.lower() in err.value.reason.lower() and "\n" not in str(err.value)
    assert not cfg.captions_dir.exists()  # nothing started


def test_unloadable_captioner_cli_says_one_line(selected, tmp_path):
    base, _ = selected
    cfg = _config(base, tmp_path / "run", "recaption.model=/nonexistent/captioner", *FAST)
    path = tmp_path / "recap.yaml"
    path.write_text(cfg.model_dump_json())
    proc = subprocess.run(tapir_cmd("recaption", path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tapir: ")]
    assert lines and lines[-1].startswith("tapir: cannot load /nonexistent/captioner (recaption.model): ")
    assert "Traceback" not in proc.stderr and not cfg.captions_dir.exists()


@pytest.mark.parametrize("url,ok", [
    ("https://api.example.com/v1", True), ("http://127.0.0.1:8000/v1", True), ("http://127.8.9.10/v1", True),
    ("http://localhost:8000/v1", True), ("http://[::1]:8000/v1", True), ("http://[::ffff:127.0.0.1]/v1", True),
    ("http://api.example.com/v1", False), ("http://10.0.0.5:8000/v1", False), ("http://0.0.0.0:8000/v1", False),
    ("ftp://127.0.0.1/v1", False), ("https://user:pw@api.example.com/v1", False), ("http://127.0.0.1:99999/v1", False),
])
def test_openai_base_url_rules(url, ok):
    """The API key travels only over https, or over http to a loopback host; checked without a request."""
    from pipeline.config import ModelLoadError, RecaptionConfig
    from recaption.backends import OpenAICaptioner, check_loadable

    r = RecaptionConfig(backend="openai", base_url=url, model="m")
    if ok:
        assert check_loadable(r) is True
        OpenAICaptioner(url, "m")
    else:
        with pytest.raises(ModelLoadError, match=r"\(recaption\.base_url\)"):
            check_loadable(r)
        with pytest.raises(ValueError):
            OpenAICaptioner(url, "m")


def test_changed_settings_or_selection_refused_or_redone(selected, tiny_chat, tmp_path):
    """A captions shard records what made it: a changed prompt setting or a changed selection
    is refused, naming the change; with redo only the affected shards are redone, and newly
    kept rows get captions."""
    from pipeline.recaption import recaption
    from pipeline.shards import StageChanged

    base, _ = selected
    args = [f"recaption.model={tiny_chat}", *FAST, "recaption.retry_sampling=[]"]
    cfg = _config(base, tmp_path, *args, copy_selection=True)
    recaption(cfg)
    records = {sid: shards.stats_path(cfg.captions_dir, sid).read_bytes() for sid in (0, 1)}
    assert json.loads(records[0])["fingerprint"]["settings"]["recaption.model"] == tiny_chat
    recaption(cfg)  # unchanged: nothing to do
    changed = _config(base, tmp_path, *args, "recaption.alt_text_hint=false")
    with pytest.raises(StageChanged, match="recaption.alt_text_hint was True, now False"):
        recaption(changed)
    # the selection of shard 1 changes: its first row, dropped before, is now kept
    keys = pq.read_table(cfg.selection_dir / "00001.parquet")["key"].to_pylist()
    _commit_selection(cfg, 1, keys, [True] * len(keys))
    with pytest.raises(StageChanged, match="its input selection/00001 \\(kept rows\\) changed since"):
        recaption(cfg)
    cfg = _config(base, tmp_path, *args, "redo=true")
    recaption(cfg)
    assert shards.stats_path(cfg.captions_dir, 0).read_bytes() == records[0]  # untouched
    assert shards.stats_path(cfg.captions_dir, 1).read_bytes() != records[1]
    assert keys[0] in _captions(cfg)
