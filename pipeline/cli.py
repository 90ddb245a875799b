"""`tapir` command line: parses arguments and calls library functions. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set download.image_size=512")
    p.add_argument("--ray-address", help="run on an existing Ray cluster (also $RAY_ADDRESS)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _trial(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, metavar="N", help="plan at most N input rows in raw/ (a trial run); a later "
                   "run continues after them")
    p.add_argument("--max-shards", type=int, metavar="N", help="plan at most N shards in raw/ (a trial run); a "
                   "later run continues after them")
    p.add_argument("--extend", action="store_true", help="download only rows added to the inputs since the last "
                   "run, as new shards after the existing ones")
    p.add_argument("--shard-digits", type=int, metavar="N", help="digits of raw/ shard names (DataComp: 8)")


def _redo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redo", action="store_true", help="redo the shards whose settings or inputs changed since "
                   "they were made (default: refuse, naming the change)")


def _flag_values(args) -> dict:
    """Flags as {config key: value}, taken literally (never parsed as YAML, unlike --set)."""
    out = {}
    for flag, key in (("url_list", "input.path"), ("output", "output"), ("input_format", "input.format"),
                      ("preset", "input.preset"), ("url_col", "input.url_col"),
                      ("caption_col", "input.caption_col"), ("image_size", "download.image_size"),
                      ("resize_mode", "download.resize_mode"), ("ray_address", "resources.ray_address"),
                      ("limit", "download.limit"), ("max_shards", "download.max_shards"),
                      ("shard_digits", "download.shard_digits")):
        value = getattr(args, flag, None)
        if flag == "caption_col" and value == "none":
            out[key] = None  # a URL-only list
        elif value is not None:
            out[key] = value
    if getattr(args, "allow_loopback", False):
        out["download.fetch.allow_loopback"] = True
    if getattr(args, "extend", False):
        out["download.extend"] = True
    if getattr(args, "redo", False):
        out["redo"] = True
    return out


def _load(args):
    return load_config(args.config, args.overrides, values=_flag_values(args))


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _locked(folder, args):
    """The run folder's lock for this command (rank 0 only under torchrun: the ranks are one command)."""
    from contextlib import nullcontext

    from pipeline.shards import RunLock

    if _rank() != 0:
        return nullcontext()
    return RunLock(folder, "tapir " + " ".join(sys.argv[1:3]))  # a URL's lock is local to this machine


STAGES = {  # name: (help, output folder attribute of RunConfig); pipeline.NAME.NAME(cfg) runs it
    "download": ("download a URL list into RUN/raw/ (img2dataset, hardened)", "raw_dir"),
    "score": ("score RUN/raw/ (or score.input) into RUN/scores/, then dedup", "scores_dir"),
    "select": ("apply select.rules to RUN/scores/ into RUN/selection/ (no model)", "selection_dir"),
    "recaption": ("caption the kept rows into RUN/captions/ (descriptive and short)", "captions_dir"),
    "build": ("write training shards with pre-encoded latents/tokens into RUN/shards/", "shards_dir"),
}


def _run_stage(name: str, cfg) -> int:
    import importlib

    from pipeline.report import format_stage

    funnel = getattr(importlib.import_module(f"pipeline.{name}"), name)(cfg)
    print(format_stage(funnel))
    print(f"{name} output: {getattr(cfg, STAGES[name][1])}")
    return 1 if funnel.get("failed_shards") else 0


def cmd_stage(args) -> int:
    cfg = _load(args)
    with _locked(cfg.output, args):
        return _run_stage(args.command, cfg)


def cmd_run(args) -> int:
    from pipeline.report import format_lineage, report
    from pipeline.select import check_rules

    cfg = _load(args)
    check_rules(cfg)  # a bad rule fails before any download
    _preflight(cfg)  # so does a model that cannot load
    code = 0
    with _locked(cfg.output, args):
        for name in STAGES:
            code |= _run_stage(name, cfg)
            if code:  # a later stage would run on a part of the data: stop, say which stage failed
                print(f"tapir run: stopping after {name}: it did not account for every row or shard; "
                      f"rerun to retry", file=sys.stderr)
                return code
    funnel, path = report(cfg.output)
    print(format_lineage(funnel["lineage"]))
    print(f"report: {path.parent / 'index.html'}")
    return code or (0 if funnel["lineage"]["ok"] else 1)


def _preflight(cfg) -> None:
    """Every model the stages will load resolves (configs read, weight files found, nothing
    downloaded), checked before the first stage starts: ModelLoadError names the key."""
    from pipeline.build import encoder_infos
    from recaption.backends import check_loadable

    if "clip" in cfg.score.scorers:
        from filters.clip import check_clip

        check_clip(cfg.score.clip.model, cfg.score.clip.pretrained)
    if cfg.score.aesthetic.weights:
        from filters.aesthetic import check_aesthetic

        check_aesthetic(cfg.score.aesthetic.weights, cfg.score.clip.model)
    check_loadable(cfg.recaption)
    encoder_infos(cfg.build)


def _join(args) -> None:
    """`--ray-address` of report and verify (no config): their Ray tasks join that cluster."""
    import os

    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address


def cmd_report(args) -> int:
    from pipeline.report import format_stage, report

    _join(args)
    funnel, path = report(args.run_dir, sample_shards=args.sample_shards)  # a path or URL, as given
    for stage in funnel.values():
        print(format_stage(stage))
    page = path.parent / "index.html"
    print(f"written: {path}" + (f" and {page}" if page.exists() else ""))
    return 0 if funnel["lineage"]["ok"] else 1


def cmd_verify(args) -> int:
    from pipeline.manifest import verify

    _join(args)
    faults, summary = verify(args.shards_dir)  # a path or URL, as given
    for fault in faults[:args.max_faults]:
        print(f"FAULT {fault}")
    if len(faults) > args.max_faults:
        print(f"... and {len(faults) - args.max_faults} more faults")
    if faults:
        print(f"{args.shards_dir}: {len(faults)} fault(s)")
        return 1
    print(f"{args.shards_dir}: ok, {summary['shards']} shards, {summary['samples']} samples, "
          f"{summary['bytes'] / 1e6:.1f} MB, encoders {summary['encoders'] or 'none'}")
    return 0


def _print_summary(summary: dict, run_dir: Path, artefact: str) -> None:
    if summary.get("rank", 0) != 0:
        return
    line = f"trained {summary['steps']} steps ({summary['batches_per_epoch']} batches per epoch per rank)"
    kinds = summary["caption_kinds"]
    if kinds:
        total = sum(kinds.values())
        line += "; captions used: " + ", ".join(f"{k} {n / total:.1%}" for k, n in sorted(kinds.items()))
    print(line)
    if summary["faults"]:
        print(f"{len(summary['faults'])} data fault(s) skipped, e.g. {summary['faults'][0]}")
    print(f"run folder: {run_dir}  (checkpoints/, samples/, tb/, metrics.jsonl)")
    print(f"{artefact}: {summary.get(artefact.split()[-1])}")


def cmd_train_diffusion(args) -> int:
    from training.diffusion import ray_train_diffusion, train_diffusion

    cfg = _load(args)
    with _locked(cfg.diffusion_dir, args):
        if args.ray_workers:
            summary = ray_train_diffusion(cfg, args.resume, args.ray_workers, args.gpu)
        else:
            summary = train_diffusion(cfg, args.resume)
    _print_summary(summary, cfg.diffusion_dir, "diffusers pipeline")
    return 0


def cmd_train_ar(args) -> int:
    from training.ar import ray_train_ar, train_ar

    cfg = _load(args)
    with _locked(cfg.ar_dir, args):
        summary = ray_train_ar(cfg, args.resume, args.ray_workers, args.gpu) if args.ray_workers else \
            train_ar(cfg, args.resume)
    _print_summary(summary, cfg.ar_dir, "exported model")
    return 0


def cmd_train_autoencoder(args) -> int:
    from training.autoencoder import ray_train_autoencoder, train_autoencoder

    cfg = _load(args)
    with _locked(cfg.autoencoder_dir, args):
        summary = ray_train_autoencoder(cfg, args.resume, args.ray_workers, args.gpu) if args.ray_workers else \
            train_autoencoder(cfg, args.resume)
    _print_summary(summary, cfg.autoencoder_dir, "diffusers model")
    if summary.get("latent_statistics"):
        s = summary["latent_statistics"]
        print(f"latent scaling factor {s['scaling_factor']:.4f} (std {s['std']:.4f}, mean {s['mean']:.4f}); "
              f"use it with build.{'vq' if cfg.train_autoencoder.kind == 'vq' else 'vae'}.model: {summary['model']}")
    return 0


def cmd_sample(args) -> int:
    run = Path(args.run_dir)
    kind = json.loads((run / "run.json").read_text()).get("kind", "diffusion") if (run / "run.json").exists() \
        else None
    if kind is None:
        raise FileNotFoundError(f"{run / 'run.json'} not found: not a training run folder")
    if kind == "autoencoder":
        from training.autoencoder import sample_run

        path = sample_run(run, images=args.images, out=args.out, device=args.device)
    else:
        if not args.prompt:
            raise ValueError(f"{run} is a {kind} run: give --prompt (repeatable)")
        if kind == "ar":
            from training.ar import sample_run

            path = sample_run(run, args.prompt, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, out=args.out, device=args.device)
        else:
            from training.sample import sample_run

            path = sample_run(run, args.prompt, steps=args.steps, cfg=args.cfg, seed=args.seed,
                              sampler_name=args.sampler, out=args.out, device=args.device)
    print(f"written: {path}")
    return 0


def cmd_demo(args) -> int:
    from pipeline.demo import demo

    values = {k: v for k, v in _flag_values(args).items() if k != "output"}
    return demo(Path(args.output), rows=args.rows, config=CONFIGS / "demo.yaml", overrides=args.overrides,
                values=values)


def cmd_world_models(args) -> int:
    from training.world import build

    only = [x.strip() for x in args.only.split(",")] if args.only else None
    index = build(Path(args.output), rows=args.rows, clip_epochs=args.clip_epochs, only=only, seed=args.seed,
                  captioner_images=args.captioner_images, captioner_epochs=args.captioner_epochs)
    print(json.dumps(index, indent=2))
    print(f"written: {Path(args.output) / 'world-models.json'}")
    return 0


def cmd_experiment(args) -> int:
    from training.closed_loop import closed_loop

    seeds = tuple(int(x) for x in args.seeds.split(","))
    closed_loop(Path(args.output), rows=args.rows, seeds=seeds, steps=args.steps, keep=args.keep,
                prompts=args.prompts, arms=args.arms, models_folder=Path(args.models) if args.models else None,
                overrides=args.overrides)
    return 0


def cmd_config(args) -> int:
    from pipeline.config import reference

    if args.reference:
        print("| key | default | description |\n| --- | --- | --- |")
        for key, default, desc in reference():
            print(f"| `{key}` | {f'`{default}`' if default else ''} | {desc} |")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.model_dump(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapir", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help=STAGES["download"][0])
    p.add_argument("config", nargs="?", help="run config YAML (or give --url-list and --output)")
    p.add_argument("--url-list", help="URL list file or folder (parquet, csv, tsv, jsonl)")
    p.add_argument("--output", help="run folder")
    p.add_argument("--input-format", choices=["auto", "parquet", "csv", "tsv", "jsonl", "txt"])
    p.add_argument("--preset", choices=["laion", "cc3m", "datacomp"], help="input column preset")
    p.add_argument("--url-col")
    p.add_argument("--caption-col", help="alt-text column; 'none' for a URL-only list")
    p.add_argument("--image-size", type=int)
    p.add_argument("--resize-mode", choices=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"])
    p.add_argument("--allow-loopback", action="store_true", help="allow 127.0.0.1/::1 (tests and demos)")
    _trial(p)
    _common(p)
    _redo(p)
    p.set_defaults(func=cmd_stage)

    for name in ("score", "select", "recaption", "build"):
        p = sub.add_parser(name, help=STAGES[name][0])
        p.add_argument("config")
        _common(p)
        _redo(p)
        p.set_defaults(func=cmd_stage)

    trainers = {"train-diffusion": ("train a text-conditioned DiT on RUN/shards' latents (train_diffusion section)",
                                    cmd_train_diffusion),
                "train-ar": ("train an autoregressive transformer on RUN/shards' VQ tokens (train_ar section)",
                             cmd_train_ar),
                "train-autoencoder": ("train a VQ or KL autoencoder on images (train_autoencoder section)",
                                      cmd_train_autoencoder)}
    for name, (text, func) in trainers.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("config")
        p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
        p.add_argument("--ray-workers", type=int, default=0, metavar="N",
                       help="train on N Ray Train workers (on --ray-address, else a local Ray); "
                       "default: this process, or the processes torchrun started")
        p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
        _common(p)
        p.set_defaults(func=func)

    p = sub.add_parser("sample", help="sample a grid PNG from a training run (diffusion, AR: prompts; "
                       "autoencoder: originals beside reconstructions)")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable: one image each)")
    p.add_argument("--steps", type=int, help="diffusion: sampling steps (default: the run's sample.steps)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler"], help="diffusion; default: the run's")
    p.add_argument("--temperature", type=float, help="AR: softmax temperature (0: greedy; default: the run's)")
    p.add_argument("--top-k", type=int, help="AR: sample among the k most likely codes")
    p.add_argument("--top-p", type=float, help="AR: nucleus mass")
    p.add_argument("--images", type=int, default=8, help="autoencoder: images reconstructed")
    p.add_argument("--out", help="PNG path (default RUN/samples/...)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample, verbose=False)

    p = sub.add_parser("run", help="run every stage of a config, then the report")
    p.add_argument("config")
    _trial(p)
    _common(p)
    _redo(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="print and write the funnel of a run folder")
    p.add_argument("run_dir", help="run folder (a path or URL)")
    p.add_argument("--sample-shards", type=int, default=8, metavar="N", help="shards the plots and grids draw "
                   "on (the funnel counts every shard)")
    p.add_argument("--ray-address", help="run its tasks on an existing Ray cluster (also $RAY_ADDRESS)")
    p.set_defaults(func=cmd_report, verbose=False)

    p = sub.add_parser("verify", help="check every shard of a shards folder against its manifest")
    p.add_argument("shards_dir", help="shards folder (a path or URL)")
    p.add_argument("--max-faults", type=int, default=50, help="faults printed at most (all are counted)")
    p.add_argument("--ray-address", help="run its tasks on an existing Ray cluster (also $RAY_ADDRESS)")
    p.set_defaults(func=cmd_verify, verbose=False)

    p = sub.add_parser("demo", help="build a synthetic web, serve it on loopback, run the pipeline on it")
    p.add_argument("--output", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--rows", type=int, default=300, help="rows in the synthetic web")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("world-models", help="train the synthetic world's models with Tapir's own tools: a CLIP "
                       "(open_clip_train on shards Tapir downloads), a captioner fine-tuned on a few hundred "
                       "detailed captions, the attribute classifier and a KL autoencoder (tapir train-autoencoder)")
    p.add_argument("--output", default="models/world", help="folder (default models/world, the committed ones)")
    p.add_argument("--rows", type=int, default=20000, help="synthetic pairs the CLIP trains on (clean) and the "
                   "captioner first learns alt-texts from (a noisy web)")
    p.add_argument("--clip-epochs", type=int, default=12, help="open_clip_train epochs")
    p.add_argument("--only", help="comma-separated subset of: clip, captioner, attributes, autoencoder (the "
                   "captioner needs the CLIP, the autoencoder's fidelity is judged by the attribute classifier)")
    p.add_argument("--captioner-images", type=int, default=400, help="images with ground-truth captions the "
                   "captioner is fine-tuned on")
    p.add_argument("--captioner-epochs", type=int, default=20, help="epochs over those images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_world_models, verbose=False)

    p = sub.add_parser("experiment", help="experiments on the synthetic world, run end to end by Tapir's stages")
    p.add_argument("name", choices=["closed-loop"], help="closed-loop: one noisy web; the same generator trained "
                   "on (a) everything with alt-text, (b) CLIP-filtered and deduplicated, (c) filtered and "
                   "recaptioned 95/5, (d) recaptioned unfiltered; judged on held-out prompts")
    p.add_argument("--output", default="runs/closed-loop", help="folder (resumes what is done there)")
    p.add_argument("--rows", type=int, default=6000, help="rows of the noisy web")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (each arm once per seed)")
    p.add_argument("--steps", type=int, default=2400, help="train-diffusion steps of every arm")
    p.add_argument("--keep", type=int, default=60, help="arms (b), (c): rows that are not duplicates and in the "
                   "top N%% by CLIP score (of every scored row)")
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts each run is judged on")
    p.add_argument("--arms", default="abcd", help="subset of the arms, e.g. 'bc'")
    p.add_argument("--models", help="world models folder (default: the committed models/world)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of configs/closed-loop.yaml (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("config", help="validate a config and print it resolved, or print the reference")
    p.add_argument("config", nargs="?")
    p.add_argument("--reference", action="store_true", help="print every key with default and description")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.set_defaults(func=cmd_config, verbose=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    if os.environ.get("TAPIR_KILL_AFTER_COMMITS"):  # tests' kill hook (pipeline.shards): Ray workers inherit it
        os.environ.setdefault("TAPIR_KILL_PGID", str(os.getpgid(0)))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"tapir: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from pipeline.shards import RunLocked

        if isinstance(e, RunLocked):
            print(f"tapir: {e}", file=sys.stderr)
            return 3
        raise
    except FileExistsError as e:
        print(f"tapir: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        from filters.rules import RuleError
        from pipeline.build import BuildError
        from pipeline.inputs import InputError
        from pipeline.config import ModelLoadError
        from pipeline.manifest import FingerprintMismatch
        from pipeline.shards import StageChanged, UnsafeTar

        if isinstance(e, (InputError, RuleError, FileNotFoundError, BuildError, FingerprintMismatch, ModelLoadError,
                          StageChanged, UnsafeTar)) or \
                args.command in ("train-diffusion", "sample"):
            print(f"tapir: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
