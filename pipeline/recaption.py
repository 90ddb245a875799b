"""The recaption stage: kept rows -> captions/NNNNN.parquet (descriptive and short captions).

For each shard, the rows ``selection/`` kept are captioned from their ``raw/`` images,
once per caption kind (descriptive, short), with a named, versioned prompt (the alt-text
offered as a hint when configured). Outputs are cleaned (``recaption.clean``); a
degenerate output (empty, a repetition loop, a refusal, the prompt echoed) is retried
with the next sampling setting of ``recaption.retry_sampling`` and, when every attempt
fails, that kind is recorded as failed with its reason: junk is never stored. Each kind
stands on its own: a row whose descriptive caption failed keeps its good short caption
(``descriptive_status``/``short_status``; the row's ``status`` is ok, partial or failed).
Every row carries its provenance: model, backend, prompt id@version, generation
parameters, time. Sampled retries are seeded per row (shard, key, kind, attempt), so a
redone shard gets the same captions.

Before any work the captioner is checked (``recaption.backends.check_loadable``). Shards
commit atomically with a fingerprint of what made them (the output-changing
``recaption.*`` settings, the prompt templates' versions and contents, the digest of the
rows the selection keeps, taken from its shard record, and the raw shard's record); a
rerun captions only shards without a completion record, and refuses shards made
differently (a changed model, prompt or selection) unless ``--redo`` asks to redo just
those. The driver reads shard records only; each actor reads its own shard (local paths
or fsspec URLs, through ``pipeline.storage``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards, storage
from pipeline.config import RunConfig
from pipeline.schemas import CAPTION_KINDS_SYNTHETIC as KINDS, CAPTIONS as SCHEMA, kept_digest

log = logging.getLogger(__name__)


# settings that change speed or transport, not what a caption says: left out of the fingerprint
# (batch_size: batch composition seeds sampled retries, but a caption from another batch size is as valid)
NOT_OUTPUT = ("actors", "concurrency", "timeout", "http_retries", "backoff", "batch_size", "device",
              "api_key_env", "base_url")


def _kept(cfg: RunConfig, shard_id: int) -> pa.Array:
    """The keys a selection shard keeps, in its order."""
    sel = storage.read_parquet(shards.shard_file(cfg.selection_dir, shard_id, ".parquet"), columns=["key", "keep"])
    return sel["key"].filter(pc.fill_null(sel["keep"], False))


def shard_fingerprint(cfg: RunConfig, prompts: dict, shard_id: int) -> dict:
    """What determines a captions shard: recaption settings, prompt templates (ref and a
    digest of their text), the rows the selection keeps in the shard (its record's
    ``kept_digest``, not the record: a rule change that keeps the same rows redoes nothing)
    and the raw shard's record."""
    settings = shards.settings_of(cfg.recaption, "recaption", exclude=NOT_OUTPUT)
    for kind, t in prompts.items():
        text = json.dumps(t.model_dump(), sort_keys=True).encode()
        settings[f"recaption.prompts.{kind}"] = f"{t.ref} sha256:{hashlib.sha256(text).hexdigest()[:16]}"
    name = shards.shard_name(shard_id)
    kept = shards.read_stats(cfg.selection_dir, shard_id).get("kept_digest")
    if kept is None:  # a selection written before records carried the digest
        kept = kept_digest(_kept(cfg, shard_id).to_pylist())
    return shards.fingerprint(settings, {f"selection/{name} (kept rows)": kept,
                                         f"raw/{name}": shards.record_digest(cfg.score_input, shard_id)})


def _reasons(reasons) -> dict:
    """{reason: rows} of a shard's failed caption kinds ("descriptive: empty", ...), for its record
    (the funnel sums the records)."""
    counts = Counter(part.split(" after ")[0] for r in reasons if r for part in r.split("; "))
    return dict(counts.most_common())


def load_prompts(cfg: RunConfig) -> dict:
    from recaption.prompts import load_prompt

    return {kind: load_prompt(getattr(cfg.recaption.prompts, kind)) for kind in KINDS}


def build_captioner(cfg: RunConfig):
    from recaption.backends import OpenAICaptioner, TransformersCaptioner

    r = cfg.recaption
    if r.backend == "openai":
        return OpenAICaptioner(r.base_url, r.model, r.api_key_env, r.concurrency, r.timeout, r.http_retries,
                               r.backoff, r.max_new_tokens)
    return TransformersCaptioner(r.model, r.device, r.precision, r.max_new_tokens)


@dataclass
class RecaptionShard:
    """Captions one shard; a plain class (no Ray), run on an actor pool."""

    config: dict
    prompts: dict | None = None  # {kind: PromptTemplate}, read in the driver: a cluster's workers have no configs/

    def setup(self) -> None:
        from recaption.backends import refuse_unhonoured
        from recaption.clean import clip_token_counter, word_count

        self.cfg = RunConfig.model_validate(self.config)
        r = self.cfg.recaption
        self.prompts = self.prompts or load_prompts(self.cfg)
        self.counter = clip_token_counter() if r.token_counter == "clip" else word_count
        self.captioner = build_captioner(self.cfg)
        self.captioner.setup()
        if getattr(self.captioner, "chat", True) is False and r.alt_text_hint:
            refuse_unhonoured(False, r, r.model)  # also when the driver's preflight was skipped

    def _inputs(self, shard_id: int):
        raw = self.cfg.score_input
        keep = set(_kept(self.cfg, shard_id).to_pylist())
        meta = storage.read_parquet(shards.shard_file(raw, shard_id, ".parquet"), columns=["key", "caption"])
        alts = dict(zip(meta["key"].to_pylist(), meta["caption"].to_pylist()))
        members = shards.read_tar(shards.shard_file(raw, shard_id, ".tar"), keys=keep)
        rows = []
        for key in sorted(keep):
            data = next((members.get(key, {}).get(e) for e in ("jpg", "png", "webp") if e in members.get(key, {})),
                        None)
            try:
                image = shards.open_image(data).convert("RGB") if data else None
                err = None if data else "image missing from the tar"
            except Exception as e:  # a corrupt image is the row's reason
                image, err = None, f"decode error: {e}"
            rows.append((key, alts.get(key), image, err))
        return rows

    def _caption_kind(self, kind: str, images, alts, keys, shard_id: int) -> list[dict]:
        """Caption every image with one kind; retry degenerate outputs with the next sampling."""
        from recaption.backends import sampling_seed
        from recaption.clean import clean, degenerate

        r, prompt = self.cfg.recaption, self.prompts[kind]
        budget = r.token_budget_descriptive if kind == "descriptive" else r.token_budget_short
        texts = [prompt.render(a, r.alt_text_hint) for a in alts]
        schedule = [{}] + [dict(s) for s in r.retry_sampling]
        result = [{"text": None, "raw": None, "attempts": 0, "tokens": 0, "reason": None, "params": None}
                  for _ in images]
        todo = list(range(len(images)))
        for attempt, sampling in enumerate(schedule):
            if not todo:
                break
            params = {"max_new_tokens": r.max_new_tokens, "do_sample": False, **sampling}
            for start in range(0, len(todo), r.batch_size):
                idx = todo[start:start + r.batch_size]
                seeds = [sampling_seed(shard_id, keys[i], kind, attempt) for i in idx]
                outs = self.captioner.generate([images[i] for i in idx], [texts[i] for i in idx],
                                               [prompt.prefix] * len(idx), sampling, seeds)
                for i, (raw, tokens, error) in zip(idx, outs):
                    res = result[i]
                    res["attempts"], res["raw"], res["tokens"] = attempt + 1, raw, tokens
                    if error:
                        res["reason"] = error
                        continue
                    text = clean(raw, budget, self.counter)
                    bad = degenerate(text, texts[i], r.min_words)
                    res["reason"] = bad
                    if bad is None:
                        res["text"], res["params"] = text, params
            todo = [i for i in todo if result[i]["text"] is None]
        return result

    def __call__(self, shard_id: int) -> dict:
        start = time.time()
        rows = self._inputs(shard_id)
        ok = [i for i, row in enumerate(rows) if row[2] is not None]
        images, alts, keys = [rows[i][2] for i in ok], [rows[i][1] for i in ok], [rows[i][0] for i in ok]
        per_kind = {kind: self._caption_kind(kind, images, alts, keys, shard_id) if ok else [] for kind in KINDS}
        r = self.cfg.recaption
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        out = []
        position = {i: n for n, i in enumerate(ok)}
        for i, (key, alt, _, err) in enumerate(rows):
            row = {"key": key, "alt_text": alt, "model": r.model, "backend": self.captioner.name,
                   "prompt_descriptive": self.prompts["descriptive"].ref, "prompt_short": self.prompts["short"].ref,
                   "created_at": now}
            reasons, params = [], {}
            for kind in KINDS:
                res = per_kind[kind][position[i]] if i in position else None
                row[kind] = res["text"] if res else None
                row[f"{kind}_raw"] = res["raw"] if res else None
                row[f"{kind}_attempts"] = res["attempts"] if res else 0
                row[f"{kind}_tokens"] = res["tokens"] if res else 0
                row[f"{kind}_status"] = "ok" if res and res["text"] is not None else "failed"
                if res and res["text"] is None:
                    reasons.append(f"{kind}: {res['reason']} after {res['attempts']} attempts")
                if res and res["params"]:
                    params[kind] = res["params"]
            if err:
                reasons.append(err)
            good = sum(row[f"{kind}_status"] == "ok" for kind in KINDS)
            row["status"] = "ok" if good == len(KINDS) else "partial" if good else "failed"
            row["reason"] = "; ".join(reasons) or None
            row["generation"] = json.dumps(params, sort_keys=True)
            out.append(row)
        table = pa.Table.from_pylist(out, schema=SCHEMA)
        name = shards.shard_name(shard_id)
        staging = shards.new_staging(self.cfg.captions_dir, shard_id)
        shards.write_parquet(staging / f"{name}.parquet", table)
        status = [r_["status"] for r_ in out]
        stats = {"count": len(out), "ok": status.count("ok"), "partial": status.count("partial"),
                 "failed": status.count("failed"), **{f"{kind}_ok": sum(r_[f"{kind}_status"] == "ok" for r_ in out)
                                                      for kind in KINDS},
                 "tokens": sum(r_["descriptive_tokens"] + r_["short_tokens"] for r_ in out),
                 "reasons": _reasons(r_["reason"] for r_ in out), "duration": time.time() - start}
        shards.commit(staging, self.cfg.captions_dir, shard_id, [f"{name}.parquet"], stats,
                      fingerprint=shard_fingerprint(self.cfg, self.prompts, shard_id))
        return stats


def recaption(cfg: RunConfig) -> dict:
    """Run the recaption stage over every selected shard; return its funnel."""
    from pipeline import ray_backend
    from pipeline.report import recaption_funnel
    from pipeline.select import check_selection
    from recaption.backends import check_loadable

    check_loadable(cfg.recaption)  # a captioner that cannot load stops here, before Ray or any shard
    ray_backend.quiet_env()
    sel, out = cfg.selection_dir, cfg.captions_dir
    available = shards.done_shards(sel)
    if not available:
        raise FileNotFoundError(f"no selection in {sel}; run `tapir select` first")
    summary = check_selection(cfg)  # a whole selection, made with these rules from the current scores
    out.mkdir(parents=True, exist_ok=True)
    shards.clear_staging(out)
    prompts = load_prompts(cfg)
    redone = shards.stale_shards(out, lambda sid: shard_fingerprint(cfg, prompts, sid), redo=cfg.redo,
                                 stage="recaption")
    for sid in redone:  # stale captions never stay where build could read them
        shards.shard_file(out, sid, ".parquet").unlink(missing_ok=True)
    if redone:
        log.info("redoing %d captions shards made with other settings or inputs", len(redone))
    shards.prune_failures(out, available)  # failure records of shards no longer selected
    todo = sorted(available - shards.done_shards(out))
    ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
    # an openai-backend actor only sends HTTP requests: it never reserves a GPU
    resources = ray_backend.actor_resources(cfg.resources.recaption, http_only=cfg.recaption.backend == "openai",
                                            actors=cfg.recaption.actors)
    rows = {sid: shards.read_stats(sel, sid).get("kept", 1) for sid in todo}
    failures = {}
    metrics = ray_backend.StageMetrics(out, "recaption", summarize=lambda s: {
        "rows": s["count"], "ok": s["ok"] + s["partial"], "errors": s["reasons"]})
    for sid, result, _ in ray_backend.run_actor_pool(
            RecaptionShard(cfg.model_dump(), prompts), todo, desc="recaption", weight=lambda s: rows[s], unit="img",
            metrics=metrics, **resources):
        if isinstance(result, Exception):
            failures[sid] = result
            shards.record_failure(out, sid, "recaption", f"{type(result).__name__}: {result}")
            log.error("recaptioning shard %s failed: %s (rerun to retry it)", sid, result)
    funnel = recaption_funnel(cfg.output) if shards.done_shards(out) else {
        "stage": "recaption", "rows_in": 0, "captioned": 0, "failed": 0, "failed_by_reason": {}, "shards": 0}
    failed = shards.failed_shards(out)
    if failed:
        funnel["failed_shards"] = {str(k): str(v)[:500] for k, v in sorted(failed.items())}
    if summary.get("unscored_shards"):  # a hole upstream: every later stage says so and exits non-zero
        funnel.setdefault("failed_shards", {}).update(
            {f"score/{k}": v for k, v in summary["unscored_shards"].items()})
    return funnel
