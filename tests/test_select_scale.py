"""The select stage at scale: exact top-N% thresholds from per-shard summaries, rules on the
input's metadata columns (LAION's punsafe), per-shard records BUILD plans from, and a run
folder on the loopback S3 server. The run is written by hand (raw metadata and score
shards with their records), so no model or download is needed."""

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline import shards, storage
from pipeline.schemas import kept_digest

SHARDS, ROWS = 4, 60
RULES = ["punsafe < 0.5", "top 30% by clip_score", "bottom 45% by similarity", "junk_alt < 0.9"]


def _columns(seed: int = 0) -> dict:
    """Every row's values over all shards: ties (two decimals), NaN and nulls in the scores, nulls
    in punsafe, a few rows that failed scoring."""
    rng = np.random.default_rng(seed)
    n = SHARDS * ROWS
    clip = np.round(rng.uniform(0.1, 0.4, n), 2).astype(np.float32)
    clip[rng.random(n) < 0.1] = np.nan
    clip_null = rng.random(n) < 0.05
    similarity = np.round(rng.uniform(0.2, 0.4, n), 2)
    similarity[rng.random(n) < 0.05] = np.nan
    punsafe = rng.random(n)
    punsafe_null = rng.random(n) < 0.05
    return {"key": [f"{i // ROWS:05d}{i % ROWS:04d}" for i in range(n)], "clip": clip, "clip_null": clip_null,
            "similarity": similarity, "punsafe": punsafe, "punsafe_null": punsafe_null,
            "junk_alt": np.round(rng.random(n), 1).astype(np.float32), "error": rng.random(n) < 0.04}


def _write_run(cfg, cols: dict) -> None:
    """raw/ (metadata with punsafe and similarity, plus rows that failed to download) and scores/
    shards with the records `tapir score` leaves."""
    from pipeline.score import shard_fingerprint

    for sid in range(SHARDS):
        rows = slice(sid * ROWS, (sid + 1) * ROWS)
        keys = cols["key"][rows]
        failed = [f"{sid:05d}{ROWS + j:04d}" for j in range(3)]  # downloads that failed: in raw/, never scored
        punsafe = pa.array(cols["punsafe"][rows], mask=cols["punsafe_null"][rows])
        raw = pa.table({"key": failed + keys, "url": [f"http://x.test/{k}" for k in failed + keys],
                        "status": ["failed_to_download"] * 3 + ["success"] * ROWS,
                        "punsafe": pa.concat_arrays([pa.array([0.0] * 3), punsafe]),
                        "similarity": pa.concat_arrays([pa.array([1.0] * 3), pa.array(cols["similarity"][rows])])})
        name = shards.shard_name(sid)
        shards.write_parquet(cfg.raw_dir / f"{name}.parquet", raw)
        shards.atomic_write(shards.stats_path(cfg.raw_dir, sid), json.dumps({"count": ROWS + 3}))
        error = cols["error"][rows]
        scores = pa.table({
            "key": keys, "score_error": pa.array(["decode error" if e else None for e in error], pa.string()),
            "clip_score": pa.array(cols["clip"][rows], mask=cols["clip_null"][rows]),
            "junk_alt": cols["junk_alt"][rows]})
        shards.write_parquet(cfg.scores_dir / f"{name}.parquet", scores)
        shards.atomic_write(shards.stats_path(cfg.scores_dir, sid), json.dumps(
            {"count": ROWS, "fingerprint": shard_fingerprint(cfg, sid)}))


def _config(output, rules=RULES):
    from pipeline.config import RunConfig

    return RunConfig(output=str(output), select={"rules": rules})  # the default scorers: basic and clip among them


def _kth(values: np.ndarray, fraction: float, top: bool) -> float:
    """The exact threshold: the k-th best of the values that are not NaN, k = ceil(fraction * n)."""
    values = np.sort(values[~np.isnan(values)].astype(np.float64))
    k = int(np.ceil(fraction * len(values) - 1e-9))
    return float(values[-k] if top else values[k - 1])


def _expected(cols: dict) -> tuple[dict, dict]:
    """{key: reason or None} and the thresholds, from every row's values at once (numpy)."""
    scored = ~cols["error"]
    clip = np.where(cols["clip_null"], np.nan, cols["clip"].astype(np.float64))
    thresholds = {RULES[1]: _kth(clip[scored], 0.30, top=True),
                  RULES[2]: _kth(cols["similarity"][scored], 0.45, top=False)}
    punsafe = np.where(cols["punsafe_null"], np.nan, cols["punsafe"])
    passes = [punsafe < 0.5, clip >= thresholds[RULES[1]], cols["similarity"] <= thresholds[RULES[2]],
              cols["junk_alt"].astype(np.float64) < 0.9]  # NaN compares False: a missing value fails
    out = {}
    for i, key in enumerate(cols["key"]):
        out[key] = "score_error" if cols["error"][i] else next((r for r, p in zip(RULES, passes) if not p[i]), None)
    return out, thresholds


def _selection(cfg) -> dict:
    return {r["key"]: r for sid in sorted(shards.done_shards(cfg.selection_dir))
            for r in storage.read_parquet(cfg.selection_dir / f"{shards.shard_name(sid)}.parquet").to_pylist()}


@pytest.fixture(scope="module")
def selected(local_ray, tmp_path_factory):
    from pipeline.select import select

    cfg = _config(tmp_path_factory.mktemp("select") / "run")
    for folder in (cfg.raw_dir, cfg.scores_dir):
        folder.mkdir(parents=True)
    cols = _columns()
    _write_run(cfg, cols)
    return cfg, cols, select(cfg)


def test_top_fraction_equals_the_exact_quantile(selected):
    """Thresholds from per-shard histograms equal numpy's k-th value over all rows together (ties at
    the threshold kept, NaN and null never counted, rows that failed scoring not ranked)."""
    cfg, cols, funnel = selected
    expect, thresholds = _expected(cols)
    summary = json.loads((cfg.selection_dir / "_summary.json").read_text())
    got = {r["rule"]: r["threshold"] for r in summary["rules"] if "threshold" in r}
    assert got == thresholds  # exact, not approximately
    ties = np.sum(np.where(cols["clip_null"], np.nan, cols["clip"]) == np.float32(thresholds[RULES[1]]))
    assert ties >= 2  # the data has ties at the threshold, and they are kept (see the reasons below)
    sel = _selection(cfg)
    assert set(sel) == set(cols["key"])
    for key, row in sel.items():
        reason = "score_error" if (row["reason"] or "").startswith("score_error") else row["reason"]
        assert reason == expect[key], key
        assert row["keep"] == (expect[key] is None)
    assert funnel["kept"] == sum(v is None for v in expect.values()) > 0


def test_rule_on_a_metadata_column(selected):
    """punsafe lives in raw/NNNNN.parquet only: a rule on it keeps the rows below the bound and drops
    the others, null punsafe included, with the rule as their reason."""
    cfg, cols, _ = selected
    sel = _selection(cfg)
    dropped = {k for k, r in sel.items() if r["reason"] == RULES[0]}
    unsafe = {k for k, p, null, err in zip(cols["key"], cols["punsafe"], cols["punsafe_null"], cols["error"])
              if not err and (null or p >= 0.5)}
    assert dropped == unsafe and len(unsafe) > 10
    assert all(p < 0.5 for k, p, null in zip(cols["key"], cols["punsafe"], cols["punsafe_null"])
               if sel[k]["keep"] and not null)


def test_records_carry_counts_and_kept_digest(selected):
    """Each selection shard's record holds rows, kept, the digest of its kept keys and its reasons;
    the summary is their sum (BUILD plans from the records without reading keys)."""
    cfg, _, _ = selected
    sel = _selection(cfg)
    summary = json.loads((cfg.selection_dir / "_summary.json").read_text())
    rows = kept = 0
    for sid in range(SHARDS):
        record = shards.read_stats(cfg.selection_dir, sid)
        mine = [r for k, r in sel.items() if k.startswith(shards.shard_name(sid))]
        assert record["rows"] == len(mine) == ROWS
        assert record["kept"] == sum(r["keep"] for r in mine)
        assert record["kept_digest"] == kept_digest(r["key"] for r in mine if r["keep"])
        assert sum(record["dropped_by"].values()) == ROWS - record["kept"]
        rows, kept = rows + record["rows"], kept + record["kept"]
    assert (summary["rows"], summary["kept"]) == (rows, kept)


def test_unknown_metadata_column_fails_before_any_work(selected, tmp_path):
    from filters.rules import RuleError
    from pipeline.select import check_rules

    cfg, _, _ = selected
    check_rules(cfg)  # punsafe and similarity: the raw shards' columns
    bad = cfg.model_copy(update={"select": cfg.select.model_copy(update={"rules": ["punsfe < 0.5"]})})
    with pytest.raises(RuleError, match="names unknown score 'punsfe'.*punsafe"):
        check_rules(bad)


def test_select_with_the_run_on_s3(selected, s3):
    """The same run on the loopback S3 server: the same selection, records and summary."""
    from pipeline.select import check_selection, select

    local_cfg, cols, _ = selected
    cfg = _config(f"{s3}/run")
    _write_run(cfg, cols)
    select(cfg)
    assert _selection(cfg) == _selection(local_cfg)
    for sid in range(SHARDS):
        a, b = shards.read_stats(cfg.selection_dir, sid), shards.read_stats(local_cfg.selection_dir, sid)
        assert a["kept_digest"] == b["kept_digest"] and a["kept"] == b["kept"]
    assert check_selection(cfg)["kept"] == check_selection(local_cfg)["kept"]
