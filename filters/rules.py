"""Selection rules over stored scores (DataComp-style "score, then select").

Rules are strings, applied in order; a dropped row records the first rule it failed. A rule
may name any score column or any column of the input's metadata (``raw/NNNNN.parquet``:
LAION's ``punsafe``, ``pwatermark``, ``similarity``; DataComp's ``clip_l14_similarity_score``).

    clip_score >= 0.28            comparison with a number (>=, >, <=, <, ==, !=)
    language in [en, de]          membership (also: not in [...]); strings unquoted or quoted
    top 30% by clip_score         the top fraction of every scored row of the WHOLE dataset (all
    bottom 10% by nsfw_score      shards), turned into an exact threshold first, as DataComp does
                                  (:func:`resolve_fractions`; the other rules do not change it)
    not duplicate                 drop rows that duplicate a kept row (any kind)
    not duplicate(exact)          ... of one kind: exact, near or semantic

A row whose value is missing (null, or NaN) fails a comparison, a membership test and a
top/bottom rule; NaN values never count towards a top/bottom fraction's threshold.
``parse`` checks every rule, column and column type before any work starts: a malformed
rule is a :class:`RuleError` naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class RuleError(ValueError):
    """A rule cannot be parsed or names a score that does not exist."""


_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"  # what float() takes, minus nan/inf
_CMP = re.compile(rf"^\s*(\w+)\s*(>=|<=|==|!=|>|<)\s*({_NUM})\s*$")
_IN = re.compile(r"^\s*(\w+)\s+(not\s+in|in)\s*\[([^\[\]]*)\]\s*$")
_TOP = re.compile(rf"^\s*(top|bottom)\s+({_NUM})\s*%\s+by\s+(\w+)\s*$")
_DUP = re.compile(r"^\s*not\s+duplicate(?:\((exact|near|semantic)\))?\s*$")
_OPS = {">=": pc.greater_equal, "<=": pc.less_equal, "==": pc.equal, "!=": pc.not_equal,
        ">": pc.greater, "<": pc.less}


@dataclass(frozen=True)
class Rule:
    text: str
    kind: str  # cmp, in, top, dup
    column: str
    op: str = ""
    value: object = None

    def columns(self) -> list[str]:
        return ["duplicate_of", "duplicate_kind"] if self.kind == "dup" else [self.column]

    def mask(self, table: pa.Table) -> np.ndarray:
        """True where the row passes."""
        if self.kind == "dup":
            dup = pc.is_valid(table["duplicate_of"])
            if self.value:
                dup = pc.and_(dup, pc.equal(table["duplicate_kind"], self.value))
            return ~np.asarray(dup.to_numpy(zero_copy_only=False), dtype=bool)
        col = table[self.column]
        if pa.types.is_null(col.type):  # a column this shard does not have (another input's metadata): missing
            return np.zeros(table.num_rows, dtype=bool)
        if self.kind == "cmp":
            result = _OPS[self.op](col, self.value)
        elif self.kind == "in":
            result = pc.is_in(col, pa.array(self.value, type=col.type))
            if self.op == "not in":
                result = pc.invert(result)
            result = pc.and_(result, pc.is_valid(col))
        else:  # top/bottom: a threshold computed by the caller over the whole dataset
            result = (pc.greater_equal if self.op == "top" else pc.less_equal)(col, self.value)
        if self.kind != "in" and pa.types.is_floating(col.type):  # NaN fails (IEEE makes NaN != x true)
            result = pc.and_(result, pc.invert(pc.is_nan(col)))
        return np.asarray(pc.fill_null(result, False).to_numpy(zero_copy_only=False), dtype=bool)


FORMS = ("'SCORE >= NUMBER' (also >, <=, <, ==, !=), 'SCORE in [a, b]', 'SCORE not in [a, b]', "
         "'top N% by SCORE', 'bottom N% by SCORE', 'not duplicate', 'not duplicate(exact|near|semantic)'")


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _values(text: str, raw: str, field: pa.Field) -> list:
    """The items of ``[a, b]`` as the column's type (strings unquoted or quoted)."""
    items = [x.strip().strip("'\"") for x in raw.split(",")]
    items = [x for x in items if x]
    if not items:
        raise RuleError(f"rule {text!r}: the list is empty")
    if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
        return items
    if not _numeric(field.type):
        raise RuleError(f"rule {text!r}: score {field.name!r} is {field.type}; membership needs numbers or text")
    try:
        return [float(x) if pa.types.is_floating(field.type) else int(x) for x in items]
    except ValueError:
        raise RuleError(f"rule {text!r}: score {field.name!r} holds numbers, and {items} are not all "
                        f"{'numbers' if pa.types.is_floating(field.type) else 'integers'}") from None


def parse(texts: list[str], schema: pa.Schema) -> list[Rule]:
    """Parse rules and check their columns (and their types) against the available scores."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise RuleError(f"rules must be a list of strings, got {type(texts).__name__} {texts!r}")
    rules = []
    for text in texts:
        if not isinstance(text, str):
            raise RuleError(f"rule {text!r} is a {type(text).__name__}, not a string; the forms are {FORMS}")
        if not text.strip():
            raise RuleError(f"rule {text!r} is empty; the forms are {FORMS}")
        if m := _CMP.match(text):
            rule = Rule(text, "cmp", m[1], m[2], float(m[3]))
        elif m := _IN.match(text):
            rule = Rule(text, "in", m[1], " ".join(m[2].split()), m[3])
        elif m := _TOP.match(text):
            frac = float(m[2])
            if not 0 < frac <= 100:
                raise RuleError(f"rule {text!r}: the percentage must be in (0, 100]")
            rule = Rule(text, "top", m[3], m[1], frac / 100)
        elif m := _DUP.match(text):
            rule = Rule(text, "dup", "duplicate_of", value=m[1])
        else:
            raise RuleError(f"rule {text!r} is not understood; the forms are {FORMS}")
        for col in rule.columns():
            if col not in schema.names:
                available = ", ".join(n for n in schema.names if n not in ("key", "clip_embedding"))
                raise RuleError(f"rule {text!r} names unknown score {col!r}; available: {available}")
        field = schema.field(rule.column) if rule.kind != "dup" else None
        if rule.kind in ("cmp", "top") and not _numeric(field.type):
            raise RuleError(f"rule {text!r}: score {rule.column!r} is {field.type}, not a number")
        if rule.kind == "in":
            rule = Rule(text, "in", rule.column, rule.op, _values(text, rule.value, field))
        rules.append(rule)
    return rules


# -- top/bottom fractions, exact over many shards: a radix select on mergeable histograms --------
#
# A float64 maps to a uint64 whose unsigned order is the float order (:func:`order_keys`). The
# k-th value is found one 16-bit digit at a time: every shard counts, among its keys that share
# the digits fixed so far, how many fall on each value of the next digit (a sparse histogram of
# at most 65536 bins); the counts are summed, which fixes the next digit. Four rounds fix all 64
# bits, so the threshold is the exact k-th value, the same one a sort of every value would give.
# As soon as at most CANDIDATES keys share the fixed digits, the shards send those keys instead
# and the next round ends the search. Memory: one shard's column in a worker, 65536 counts (or
# CANDIDATES keys) per rule in the driver.

DIGIT_BITS = 16
# Once at most this many keys share the digits fixed so far, the shards send those keys and the
# next round ends the search: 2^20 keys are 8 MiB in the driver, and save the round that a
# narrow score range (CLIP scores share sign, exponent and first mantissa bits) costs otherwise.
CANDIDATES = 1 << 20
_SIGN = np.uint64(1 << 63)


@dataclass(frozen=True)
class Query:
    """One round of the search for one top/bottom rule: count (or, with ``values``, list) the keys
    of ``column`` whose first ``level`` digits are ``prefix``."""

    column: str
    prefix: int = 0
    level: int = 0
    values: bool = False


def order_keys(col) -> np.ndarray:
    """The non-null, non-NaN values of a numeric column as uint64 keys in the same order (NaN takes
    no place: it would sort last and become a threshold)."""
    values = np.asarray(pc.drop_null(col).to_numpy(zero_copy_only=False), dtype=np.float64)
    bits = values[~np.isnan(values)].view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_value(key: int) -> float:
    """The float64 whose :func:`order_keys` key is ``key``."""
    key = np.uint64(key)
    bits = key ^ _SIGN if key & _SIGN else ~key
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def summarize(keys: np.ndarray, query: Query) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """One shard's part of a round: (digits, counts) of the next digit among the keys under the
    prefix (sparse histogram), or, with ``query.values``, those keys sorted."""
    if query.level:
        keys = keys[keys >> np.uint64(64 - DIGIT_BITS * query.level) == np.uint64(query.prefix)]
    if query.values:
        return np.sort(keys)
    digits = (keys >> np.uint64(64 - DIGIT_BITS * (query.level + 1))) & np.uint64((1 << DIGIT_BITS) - 1)
    bins, counts = np.unique(digits.astype(np.int64), return_counts=True)
    return bins, counts.astype(np.int64)


class _Search:
    """The driver's side of the search for one rule: merges the shards' summaries of a round and
    fixes the next digit, until the threshold is known."""

    def __init__(self, rule: Rule):
        self.rule, self.query, self.rank, self.value = rule, Query(rule.column), None, None
        self._reset()

    def _reset(self) -> None:
        self.counts, self.keys = np.zeros(1 << DIGIT_BITS, np.int64), []

    def add(self, part) -> None:
        if self.query.values:
            self.keys.append(part)
        else:
            self.counts[part[0]] += part[1]  # the digits of one summary are unique

    def advance(self) -> None:
        q = self.query
        if q.values:
            self.value = key_value(int(np.sort(np.concatenate(self.keys))[self.rank]))
            return
        counts = self.counts
        if self.rank is None:  # the first round counted every value: the rank of the k-th best
            n = int(counts.sum())
            if n == 0:  # nothing to rank: the rule keeps nothing
                self.value = np.inf if self.rule.op == "top" else -np.inf
                return
            k = max(1, int(np.ceil(self.rule.value * n - 1e-9)))  # ties at the threshold are kept
            self.rank = n - k if self.rule.op == "top" else k - 1  # 0-based, ascending
        below = np.cumsum(counts)
        digit = int(np.searchsorted(below, self.rank, side="right"))
        self.rank -= int(below[digit - 1]) if digit else 0
        prefix, level = (q.prefix << DIGIT_BITS) | digit, q.level + 1
        if level * DIGIT_BITS == 64:
            self.value = key_value(prefix)
        else:
            self.query = Query(q.column, prefix, level, values=bool(counts[digit] <= CANDIDATES))
        self._reset()


def resolve_fractions(rules: list[Rule], run_round) -> list[Rule]:
    """Turn top/bottom fractions into exact thresholds over the whole dataset.

    ``run_round(queries)`` gets ``{rule index: Query}`` and yields, per shard, ``{rule index:
    summarize(order_keys(column of the shard's rows), query)}``; the rows are those a fraction is
    taken of (every scored row: a fraction does not depend on the other rules). A pyarrow table
    may be passed instead, as one shard. Returns the rules with each fraction replaced by its
    threshold (the k-th best value, k = ceil(fraction * n) of the n values that are not null or
    NaN; +-inf when there are none)."""
    if isinstance(run_round, (pa.Table, pa.RecordBatch)):
        table = run_round

        def run_round(queries):
            yield {i: summarize(order_keys(table[q.column]), q) for i, q in queries.items()}

    searches = {i: _Search(r) for i, r in enumerate(rules) if r.kind == "top"}
    while todo := {i: s.query for i, s in searches.items() if s.value is None}:
        for part in run_round(todo):
            for i, summary in part.items():
                searches[i].add(summary)
        for i in todo:
            searches[i].advance()
    return [Rule(r.text, "top", r.column, r.op, searches[i].value) if i in searches else r
            for i, r in enumerate(rules)]


def apply(rules: list[Rule], table: pa.Table, base_reason: list | None = None) -> tuple[np.ndarray, list]:
    """(keep mask, reason per row): the first failed rule's text, or None when kept."""
    reason = list(base_reason) if base_reason is not None else [None] * table.num_rows
    for rule in rules:
        passed = rule.mask(table)
        for i in np.nonzero(~passed)[0]:
            if reason[i] is None:
                reason[i] = rule.text
    keep = np.array([r is None for r in reason], dtype=bool)
    return keep, reason
