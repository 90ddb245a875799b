"""Selection rules over stored scores (DataComp-style "score, then select").

Rules are strings, applied in order; a dropped row records the first rule it failed.

    clip_score >= 0.28            comparison with a number (>=, >, <=, <, ==, !=)
    language in [en, de]          membership (also: not in [...]); strings unquoted or quoted
    top 30% by clip_score         the top fraction over the WHOLE dataset (all shards), turned
    bottom 10% by nsfw_score      into a threshold first, as DataComp does
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


def resolve_fractions(rules: list[Rule], table: pa.Table) -> list[Rule]:
    """Turn top/bottom fractions into thresholds over the whole table."""
    out = []
    for rule in rules:
        if rule.kind == "top":
            values = table[rule.column].drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
            values = values[~np.isnan(values)]  # NaN takes no place: it would sort last and become the threshold
            if len(values) == 0:
                threshold = np.inf if rule.op == "top" else -np.inf
            else:  # the k-th best value, k = ceil(fraction * n): ties at the threshold are kept
                k = max(1, int(np.ceil(rule.value * len(values) - 1e-9)))
                ordered = np.sort(values)
                threshold = float(ordered[-k] if rule.op == "top" else ordered[k - 1])
            rule = Rule(rule.text, "top", rule.column, rule.op, threshold)
        out.append(rule)
    return out


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
