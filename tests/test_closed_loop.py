"""The closed-loop experiment (issue 13, part 3): its table and, end to end at toy size, the run."""

from __future__ import annotations

import json

import pytest

from training import closed_loop


def _result(colour: float, clip: float) -> dict:
    acc = {k: 0.5 for k in closed_loop.ATTRS} | {"colour": colour}
    return {"accuracy": acc, "mean_accuracy": sum(acc.values()) / 6, "clip_score": clip, "frechet_clip": 0.1,
            "chance": {k: 0.25 for k in closed_loop.ATTRS}}


def test_table_gives_mean_and_range_over_seeds_per_arm_with_the_ceiling_and_chance():
    data = {"sets": {"all": {"rows": 100, "true_alt_text": 0.7}, "filtered": {"rows": 55, "true_alt_text": 0.9}}}
    results = {"a": {0: _result(0.2, 20.0), 1: _result(0.4, 22.0)}, "c": {0: _result(0.9, 30.0), 1: _result(0.8, 31.0)}}
    reference = {"accuracy": {k: 1.0 for k in closed_loop.ATTRS}, "mean_accuracy": 1.0, "clip_score": 33.0}
    summary = closed_loop.summarise(results, data, reference, [0, 1])
    assert summary["a"]["mean"]["colour"] == pytest.approx(0.3) and summary["a"]["range"]["colour"] == [0.2, 0.4]
    assert summary["c"]["train_rows"] == 55 and summary["c"]["captions"] == {"descriptive": 0.95, "alt_text": 0.05}
    text = closed_loop.table(summary, reference, {k: 0.25 for k in closed_loop.ATTRS})
    lines = text.splitlines()
    assert len(lines) == 2 + 2 + 2  # head, rule, two arms, ceiling, chance
    assert lines[2].startswith("| (a) everything downloaded, alt-text | 100 | 0.70 | 0.300 (0.200-0.400) |")
    assert "| 21.00 (20.00-22.00) |" in lines[2] and lines[3].startswith("| (c) filtered")
    assert lines[4].startswith("| true images (ceiling)") and lines[5].startswith("| chance")


@pytest.mark.slow
def test_closed_loop_runs_every_arm_end_to_end_and_resumes(tmp_path):
    """Toy size (150 rows, 4 steps a run): every stage runs for real on a loopback web; the
    filtered set is a strict subset with more true alt-texts; each arm's run trained on its
    caption kinds; the report holds the grid; a rerun redoes nothing, a changed setting redoes
    what it made."""
    sets = ["--set=train_diffusion.data.batch_size=8", "--set=train_diffusion.data.shuffle_buffer=16",
            "--set=recaption.batch_size=16", "--set=build.samples_per_shard=50"]
    overrides = [s.removeprefix("--set=") for s in sets]
    out = closed_loop.closed_loop(tmp_path / "x", rows=150, seeds=(0,), steps=4, keep=60, prompts=8,
                                  overrides=overrides)
    data = out["data"]["sets"]
    assert 0 < data["filtered"]["rows"] < data["all"]["rows"] <= 150
    assert data["filtered"]["true_alt_text"] > data["all"]["true_alt_text"]
    for arm, (_, probs, _, _) in closed_loop.ARMS.items():
        run = tmp_path / "x" / "runs" / f"{arm}-seed0"
        summary = json.loads((run / "rank-0.json").read_text())
        assert summary["steps"] == 4 and set(summary["caption_kinds"]) - {"dropped"} <= set(probs), \
            summary["caption_kinds"]
        result = json.loads((run / "result.json").read_text())
        assert set(result["accuracy"]) == set(closed_loop.ATTRS) and result["prompts"] == 8
    assert (tmp_path / "x" / "report" / "grid-seed0.png").exists()
    assert "(d) everything downloaded, recaptioned" in (tmp_path / "x" / "table.md").read_text()
    stamp = (tmp_path / "x" / "runs" / "a-seed0" / "result.json").stat().st_mtime_ns
    again = closed_loop.closed_loop(tmp_path / "x", rows=150, seeds=(0,), steps=4, keep=60, prompts=8,
                                    overrides=overrides)
    assert again["table"] == out["table"]
    assert (tmp_path / "x" / "runs" / "a-seed0" / "result.json").stat().st_mtime_ns == stamp
    # a training setting changed: the arm retrains on the same data; a data setting: both are redone
    data_json = tmp_path / "x" / "data" / "data.json"
    made, data_stamp = json.loads(data_json.read_text())["made_by"], data_json.stat().st_mtime_ns
    closed_loop.closed_loop(tmp_path / "x", rows=150, seeds=(0,), steps=4, keep=60, prompts=8, arms="a",
                            overrides=overrides + ["train_diffusion.optim.lr=0.002"])
    run = json.loads((tmp_path / "x" / "runs" / "a-seed0" / "run.json").read_text())
    assert run["config"]["train_diffusion"]["optim"]["lr"] == 0.002 and data_json.stat().st_mtime_ns == data_stamp
    assert (tmp_path / "x" / "runs" / "a-seed0" / "result.json").stat().st_mtime_ns != stamp
    closed_loop.closed_loop(tmp_path / "x", rows=150, seeds=(0,), steps=4, keep=60, prompts=8, arms="a",
                            overrides=overrides + ["score.dedup.semantic_threshold=0.98"])
    assert json.loads(data_json.read_text())["made_by"] != made
