"""The recaption stage: kept rows -> captions/NNNNN.parquet (descriptive and short captions).

For each shard, the rows ``selection/`` kept are captioned from their ``raw/`` images,
once per caption kind (descriptive, short), with a named, versioned prompt (the alt-text
offered as a hint when configured). Outputs are cleaned (``recaption.clean``); a
degenerate output (empty, a repetition loop, a refusal, the prompt echoed) is retried
with the next sampling setting of ``recaption.retry_sampling`` and, when every attempt
fails, the row is recorded as failed with its reason: junk is never stored. Every row
carries its provenance: model, backend, prompt id@version, generation parameters, time.
Shards commit atomically; a rerun captions only shards without a completion record.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.config import RunConfig

log = logging.getLogger(__name__)

KINDS = ("descriptive", "short")
SCHEMA = pa.schema([
    ("key", pa.string()), ("alt_text", pa.string()),
    ("descriptive", pa.string()), ("short", pa.string()),
    ("status", pa.string()), ("reason", pa.string()),
    ("descriptive_raw", pa.string()), ("short_raw", pa.string()),
    ("descriptive_attempts", pa.int32()), ("short_attempts", pa.int32()),
    ("descriptive_tokens", pa.int32()), ("short_tokens", pa.int32()),
    ("model", pa.string()), ("backend", pa.string()),
    ("prompt_descriptive", pa.string()), ("prompt_short", pa.string()),
    ("generation", pa.string()), ("created_at", pa.string()),
])


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

    def setup(self) -> None:
        from recaption.clean import clip_token_counter, word_count
        from recaption.prompts import load_prompt

        self.cfg = RunConfig.model_validate(self.config)
        r = self.cfg.recaption
        self.prompts = {kind: load_prompt(getattr(r.prompts, kind)) for kind in KINDS}
        self.counter = clip_token_counter() if r.token_counter == "clip" else word_count
        self.captioner = build_captioner(self.cfg)
        self.captioner.setup()

    def _inputs(self, shard_id: int):
        from PIL import Image

        name = shards.shard_name(shard_id)
        sel = pq.read_table(self.cfg.selection_dir / f"{name}.parquet")
        keep = set(sel.filter(pc.equal(sel["keep"], True))["key"].to_pylist())
        meta = pq.read_table(self.cfg.raw_dir / f"{name}.parquet", columns=["key", "caption"])
        alts = dict(zip(meta["key"].to_pylist(), meta["caption"].to_pylist()))
        members = shards.read_tar(self.cfg.raw_dir / f"{name}.tar")
        rows = []
        for key in sorted(keep):
            data = next((members.get(key, {}).get(e) for e in ("jpg", "png", "webp") if e in members.get(key, {})),
                        None)
            try:
                image = Image.open(io.BytesIO(data)).convert("RGB") if data else None
                err = None if data else "image missing from the tar"
            except Exception as e:  # a corrupt image is the row's reason
                image, err = None, f"decode error: {e}"
            rows.append((key, alts.get(key), image, err))
        return rows

    def _caption_kind(self, kind: str, images, alts) -> list[dict]:
        """Caption every image with one kind; retry degenerate outputs with the next sampling."""
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
                outs = self.captioner.generate([images[i] for i in idx], [texts[i] for i in idx],
                                               [prompt.prefix] * len(idx), sampling)
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
        import torch

        start = time.time()
        torch.manual_seed(shard_id)  # sampled retries repeat exactly when a shard is redone
        rows = self._inputs(shard_id)
        ok = [i for i, row in enumerate(rows) if row[2] is not None]
        images, alts = [rows[i][2] for i in ok], [rows[i][1] for i in ok]
        per_kind = {kind: self._caption_kind(kind, images, alts) if ok else [] for kind in KINDS}
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
                if res and res["text"] is None:
                    reasons.append(f"{kind}: {res['reason']} after {res['attempts']} attempts")
                if res and res["params"]:
                    params[kind] = res["params"]
            if err:
                reasons.append(err)
            row["status"] = "ok" if not reasons else "failed"
            row["reason"] = "; ".join(reasons) or None
            row["generation"] = json.dumps(params, sort_keys=True)
            out.append(row)
        table = pa.Table.from_pylist(out, schema=SCHEMA)
        name = shards.shard_name(shard_id)
        staging = shards.new_staging(self.cfg.captions_dir, shard_id)
        shards.write_parquet(staging / f"{name}.parquet", table)
        failed = [r_["reason"] for r_ in out if r_["status"] == "failed"]
        stats = {"count": len(out), "ok": len(out) - len(failed), "failed": len(failed),
                 "tokens": sum(r_["descriptive_tokens"] + r_["short_tokens"] for r_ in out),
                 "duration": time.time() - start}
        shards.commit(staging, self.cfg.captions_dir, shard_id, [f"{name}.parquet"], stats)
        return stats


def recaption(cfg: RunConfig) -> dict:
    """Run the recaption stage over every selected shard; return its funnel."""
    from pipeline import ray_backend
    from pipeline.report import recaption_funnel

    ray_backend.quiet_env()
    sel, out = cfg.selection_dir, cfg.captions_dir
    available = shards.done_shards(sel)
    if not available:
        raise FileNotFoundError(f"no selection in {sel}; run `tapir select` first")
    out.mkdir(parents=True, exist_ok=True)
    shards.clear_staging(out)
    todo = sorted(available - shards.done_shards(out))
    ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
    local = cfg.recaption.backend == "transformers"
    gpus = cfg.resources.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if local and ray_backend.cluster_gpus() >= 1 else 0.0
    actors = cfg.recaption.actors or (int(ray_backend.cluster_gpus() / gpus) if gpus else
                                      max(1, int(ray_backend.cluster_cpus() / cfg.resources.cpus_per_actor)))
    rows = {sid: shards.read_stats(sel, sid).get("kept", 1) for sid in todo}
    failures = {}
    for sid, result, _ in ray_backend.run_actor_pool(
            RecaptionShard(cfg.model_dump()), todo, desc="recaption", actors=actors,
            num_cpus=cfg.resources.cpus_per_actor, num_gpus=gpus, weight=lambda s: rows[s], unit="img"):
        if isinstance(result, Exception):
            failures[sid] = result
            log.error("recaptioning shard %s failed: %s (rerun to retry it)", sid, result)
    funnel = recaption_funnel(Path(cfg.output))
    if failures:
        funnel["failed_shards"] = {str(k): str(v)[:500] for k, v in failures.items()}
    return funnel
