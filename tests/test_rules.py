"""Selection rules under malformed input and NaN scores (issue 11, item 10)."""

import numpy as np
import pyarrow as pa
import pytest

from filters.rules import RuleError, apply, parse, resolve_fractions

SCHEMA = pa.schema([("key", pa.string()), ("clip_score", pa.float32()), ("min_side", pa.int64()),
                    ("language", pa.string()), ("clip_embedding", pa.list_(pa.float16())),
                    ("duplicate_of", pa.string()), ("duplicate_kind", pa.string())])

MALFORMED = [
    # unbalanced
    "language in [en", "language in en]", "language in [[en]", "language in [en]]", "(clip_score >= 0.3",
    # unknown or misspelt operator
    "clip_score => 0.3", "clip_score = 0.3", "clip_score =< 0.3", "clip_score >> 0.3", "clip_score ~ 0.3",
    "clip_score between 0.1 and 0.3", "language is en", "top 30 by clip_score", "top 30% of clip_score",
    "duplicate", "not duplicate(fuzzy)", "not duplicate()",
    # bad numbers
    "clip_score >= 0.3.4", "clip_score >= .", "clip_score >= 1e", "clip_score >= nan", "clip_score >= inf",
    "clip_score >= 0x10", "clip_score >= 3,5", "top .% by clip_score", "top 0..5% by clip_score",
    "top 1e3% by clip_score", "top 0% by clip_score", "top -5% by clip_score", "top abc% by clip_score",
    "min_side in [1.5, 2]", "min_side in [a, b]",
    # empty
    "", "   ", "language in []", "language in [ , ]",
    # wrong types: a rule that is not a string, or a score whose type the rule cannot use
    None, 5, 0.3, ["clip_score >= 0.3"], {"clip_score": 0.3},
    "language >= 0.5", "top 10% by language", "clip_embedding > 0", "clip_embedding in [1]",
    "duplicate_of >= 1", "bottom 5% by key",
    # unknown score
    "clip_scroe >= 0.3", "top 10% by nsfw", ">= 0.3", "top 10% by",
]


@pytest.mark.parametrize("rule", MALFORMED, ids=repr)
def test_malformed_rule_is_a_rule_error_naming_it(rule):
    with pytest.raises(RuleError) as err:
        parse([rule], SCHEMA)
    assert repr(rule) in str(err.value)  # the message names the rule as written


@pytest.mark.parametrize("rules", ["clip_score >= 0.3", None, 3, {"a": 1}], ids=repr)
def test_rules_that_are_not_a_list_are_a_rule_error(rules):
    with pytest.raises(RuleError, match="rules must be a list of strings"):
        parse(rules, SCHEMA)


def test_wellformed_rules_still_parse():
    rules = parse(["clip_score >= -1.5e-2", "clip_score < +.5", "min_side in [64, 128]", "language not in ['de', \"fr\"]",
                   "top 12.5% by clip_score", "bottom 1% by min_side", "not duplicate(near)"], SCHEMA)
    assert [r.kind for r in rules] == ["cmp", "cmp", "in", "in", "top", "top", "dup"]
    assert rules[0].value == -0.015 and rules[2].value == [64, 128] and rules[3].value == ["de", "fr"]


def _table(scores):
    n = len(scores)
    return pa.table({"key": [f"k{i:02d}" for i in range(n)], "clip_score": pa.array(scores, pa.float32()),
                     "min_side": [64] * n, "language": ["en"] * n, "clip_embedding": [None] * n,
                     "duplicate_of": [None] * n, "duplicate_kind": [None] * n}, schema=SCHEMA)


def test_nan_never_takes_a_top_place():
    nan = float("nan")
    scores = [nan, 0.1, nan, 0.2, 0.3, nan, 0.4, 0.5, 0.6, 0.7, nan]  # 7 real scores, 4 NaN
    table = _table(scores)
    rules = resolve_fractions(parse(["top 30% by clip_score"], SCHEMA), table)
    assert rules[0].value == pytest.approx(0.5)  # ceil(0.3 * 7) = 3 best of the 7 real scores: 0.7, 0.6, 0.5
    keep, reason = apply(rules, table)
    assert [s for s, k in zip(scores, keep) if k] == pytest.approx([0.5, 0.6, 0.7])
    assert all(reason[i] == "top 30% by clip_score" for i, s in enumerate(scores) if np.isnan(s))
    rules = resolve_fractions(parse(["bottom 30% by clip_score"], SCHEMA), table)
    keep, _ = apply(rules, table)
    assert [s for s, k in zip(scores, keep) if k] == pytest.approx([0.1, 0.2, 0.3])


def test_nan_fails_every_comparison():
    table = _table([float("nan"), 0.5])
    for rule in ("clip_score >= 0", "clip_score < 1", "clip_score != 0.3", "clip_score == 0.5"):
        keep, reason = apply(parse([rule], SCHEMA), table)
        assert not keep[0] and reason[0] == rule, rule


def test_all_nan_top_rule_keeps_nothing():
    table = _table([float("nan")] * 3)
    keep, _ = apply(resolve_fractions(parse(["top 50% by clip_score"], SCHEMA), table), table)
    assert not keep.any()


def test_column_a_shard_lacks_fails_every_rule():
    """A metadata column one input of a mixed run does not have reaches that shard's rules as an
    all-null column: every rule on it fails, a top fraction ranks nothing there."""
    schema = pa.schema([("key", pa.string()), ("punsafe", pa.float64()), ("source", pa.string())])
    table = pa.table({"key": ["a", "b"], "punsafe": pa.nulls(2), "source": pa.nulls(2)})
    for rule in ("punsafe < 0.5", "punsafe != 1", "source in [laion]", "source not in [laion]", "top 50% by punsafe"):
        keep, reason = apply(resolve_fractions(parse([rule], schema), table), table)
        assert not keep.any() and reason == [rule, rule], rule


@pytest.mark.parametrize("case", ["ulps", "mixed"])
def test_threshold_from_shard_summaries_is_the_exact_kth_value(case, monkeypatch):
    """resolve_fractions over per-shard summaries (the radix select select runs as Ray tasks) gives
    numpy's k-th value of all shards' values together: here with 70k values that differ only in
    their last bits (every round of the search, no early end), and with ties, signed zeros,
    infinities, NaN and nulls."""
    from filters import rules as rules_module
    from filters.rules import order_keys, summarize

    monkeypatch.setattr(rules_module, "CANDIDATES", 1 << 16)  # fewer than the 70k values: no early end
    rng = np.random.default_rng(1)
    if case == "ulps":
        values = np.repeat(1.0 + np.arange(35_000) * 2.0**-52, 2)  # 70k values, all in one top-48-bit prefix
    else:
        values = rng.choice([0.0, -0.0, np.inf, -np.inf, 0.25, 0.5, 1e-300, -3.0, np.nan], size=5000)
        values[:2000] = np.round(rng.normal(size=2000), 1)
    rng.shuffle(values)
    parts = [pa.table({"x": pa.array(p, mask=rng.random(len(p)) < 0.02)}) for p in np.array_split(values, 7)]
    schema = pa.schema([("x", pa.float64())])
    rounds = []

    def run_round(queries):
        rounds.append(queries)
        for part in parts:
            yield {i: summarize(order_keys(part["x"]), q) for i, q in queries.items()}

    every = np.concatenate([p["x"].to_numpy(zero_copy_only=False) for p in parts])
    every = np.sort(every[~np.isnan(every)])
    for frac in (0.1, 30, 50, 99.9):
        rules = resolve_fractions(parse([f"top {frac}% by x", f"bottom {frac}% by x"], schema), run_round)
        k = max(1, int(np.ceil(frac / 100 * len(every) - 1e-9)))
        assert rules[0].value == every[-k] and rules[1].value == every[k - 1], frac
    assert len(rounds) <= 4 * 4  # at most four rounds a fraction, both rules of a run in the same rounds
