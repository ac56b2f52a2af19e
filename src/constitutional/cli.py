"""``cai``: one subcommand per stage, plus ``run`` for the whole pipeline.

    cai run configs/smollm2-cpu.yaml --out runs/demo [--stages critique_revise] [--set k=v ...]
    cai critique-revise [--config CONFIG] --out DIR [--set critique_revise.rounds=3 ...]
    cai sft [--config CONFIG] --out DIR [--set sft.lora=true ...]
    cai label [--config CONFIG] --out DIR [--set label.method=multiple_choice ...]
    cai label-eval [--config CONFIG] --out DIR [--variants contrast-mean,mc-fewshot-both] [--limit N]
    cai train-pm [--config CONFIG] --out DIR
    cai score --pm DIR --in rows.jsonl --out scored.jsonl
    cai fetch-model [smollm2-135m-instruct]
    cai serve-local [MODEL | RUN_DIR] [--port 8000]   (vLLM's CPU build, in its own env in the cache)

Bad input (a malformed constitution, a missing file, a wrong config key) prints one line,
``cai: error: ...``, and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from constitutional import __version__
from constitutional.config import STAGES, PipelineConfig, load_config
from constitutional.errors import CaiError
from constitutional.records import write_json

# stage name in configs -> (CLI subcommand, module)
STAGE_MODULES = {
    "critique_revise": ("critique-revise", "constitutional.stages.critique_revise"),
    "sft": ("sft", "constitutional.stages.sft"),
    "label": ("label", "constitutional.stages.label"),
    "pm": ("train-pm", "constitutional.stages.pm"),
    "rl": ("rl", "constitutional.stages.rl"),
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CaiError as e:
        print(f"cai: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cai: interrupted; rows written so far are kept, rerun to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="Constitutional AI, stage by stage.")
    parser.add_argument("--version", action="version", version=f"constitutional {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline's stages in order and write manifest.json")
    p.add_argument("config", help="pipeline YAML (e.g. configs/smollm2-cpu.yaml)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. critique_revise.rounds=3")
    p.set_defaults(func=_cmd_run)

    for stage, (command, module) in STAGE_MODULES.items():
        doc = importlib.import_module(module).__doc__.strip().splitlines()[0]
        p = sub.add_parser(command, help=doc, description=doc)
        p.add_argument("--config", help="pipeline YAML (default: built-in defaults)")
        p.add_argument("--out", required=True, help="run directory")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a config field, e.g. {stage}.limit=8")
        p.set_defaults(func=_cmd_stage, stage=stage)

    p = sub.add_parser("label-eval", help="accuracy, calibration and position bias of each labelling method")
    p.add_argument("--config", help="pipeline YAML (default: built-in defaults)")
    p.add_argument("--out", required=True, help="run directory (results go to label_eval/results.json)")
    p.add_argument("--variants", help="comma-separated subset (default: all): mc-zeroshot-one, mc-zeroshot-both, "
                   "mc-fewshot-one, mc-fewshot-both, cot, contrast-mean, contrast-sum")
    p.add_argument("--limit", type=int, help="use only the first N pairs of each eval set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. label.feedback_model=path/to/model")
    p.set_defaults(func=_cmd_label_eval)

    p = sub.add_parser("score", help="score prompt/response rows with a trained preference model")
    p.add_argument("--pm", required=True, help="preference model directory (e.g. runs/demo/pm/model)")
    p.add_argument("--in", dest="input", required=True, help="JSONL rows with 'prompt' and 'response'")
    p.add_argument("--out", required=True, help="JSONL written with a 'score' added to each row")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("fetch-model", help="download and convert an embedded model into the cache")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.set_defaults(func=_cmd_fetch_model)

    p = sub.add_parser("serve-local", help="serve a model on this machine with vLLM's CPU build (an OpenAI-compatible "
                       "server; its environment is built once into the cache)")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct",
                   help="embedded model name, model directory, or run directory (serves rl/model, else sft/model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--kv-cache-gib", type=float, default=2, help="KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--build-only", action="store_true", help="build the vLLM environment, print its python, exit")
    p.set_defaults(func=_cmd_serve_local)
    return parser


def _cmd_stage(args) -> int:
    config = load_config(args.config, args.set)
    _run_stages(config, Path(args.out), [args.stage], args.config)
    return 0


def _cmd_run(args) -> int:
    config = load_config(args.config, args.set)
    stages = list(STAGES)
    if args.stages:
        stages = [s.strip().replace("-", "_") for s in args.stages.split(",") if s.strip()]
        for s in stages:
            if s not in STAGES:
                raise CaiError(f"--stages: unknown stage {s!r} (stages: {', '.join(STAGES)})")
    out = Path(args.out)
    _run_stages(config, out, stages, args.config)
    print(f"results: {out.resolve()}")
    return 0


def _cmd_label_eval(args) -> int:
    from constitutional.stages import label_eval

    config = load_config(args.config, args.set)
    variants = None
    if args.variants:
        known = [v.name for v in label_eval.VARIANTS]
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in variants:
            if v not in known:
                raise CaiError(f"--variants: unknown variant {v!r} (known: {', '.join(known)})")
    if args.limit is not None and args.limit < 1:
        raise CaiError("--limit must be at least 1")
    label_eval.run(config, Path(args.out), variants, args.limit)
    return 0


def _cmd_score(args) -> int:
    from constitutional.records import iter_jsonl
    from constitutional.stages.pm import PreferenceModel

    rows = list(iter_jsonl(args.input))
    for lineno, row in enumerate(rows, 1):
        if "prompt" not in row or not isinstance(row.get("response"), str):
            raise CaiError(f"{args.input}: line {lineno}: needs 'prompt' (string or messages) and 'response' (string)")
    pm = PreferenceModel(args.pm, device=args.device)
    scores = pm.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for row, score in zip(rows, scores, strict=True):
            f.write(json.dumps({**row, "score": score}, ensure_ascii=False) + "\n")
    print(f"scored {len(rows)} rows into {args.out}")
    return 0


def _cmd_fetch_model(args) -> int:
    from constitutional.models import EMBEDDED, embedded_model_dir

    if args.name not in EMBEDDED:
        raise CaiError(f"fetch-model: unknown embedded model {args.name!r} (known: {', '.join(EMBEDDED)})")
    print(embedded_model_dir(args.name))
    return 0


def _cmd_serve_local(args) -> int:
    from constitutional.serve import serve_foreground

    return serve_foreground(args.model, args.host, args.port, args.kv_cache_gib, args.build_only)


def _run_stages(config: PipelineConfig, out: Path, stages: list[str], config_path) -> None:
    """Run stages in order, keeping ``out/manifest.json`` up to date after each one."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = {
        "config": config.to_dict(),
        "config_file": str(config_path) if config_path else None,
        "versions": _versions(),
        "stages": {},
    }
    if manifest_path.exists():  # keep the record of stages run before
        try:
            manifest["stages"] = json.loads(manifest_path.read_text()).get("stages", {})
        except (json.JSONDecodeError, AttributeError):
            pass
    for stage in stages:
        module = importlib.import_module(STAGE_MODULES[stage][1])
        entry = {"status": "running", "started": datetime.now(UTC).isoformat(timespec="seconds")}
        manifest["stages"][stage] = entry
        write_json(manifest_path, manifest)
        start = time.time()
        try:
            summary = module.run(config, out)
        except BaseException as e:
            entry.update(status="failed", seconds=round(time.time() - start, 2),
                         error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            write_json(manifest_path, manifest)
            raise
        entry.update(status="done", seconds=round(time.time() - start, 2), summary=summary)
        write_json(manifest_path, manifest)
        if "output" in summary:
            print(f"{stage}: {Path(summary['output']).resolve()}")


def _versions() -> dict:
    versions = {"python": platform.python_version(), "constitutional": __version__}
    for name in ("torch", "transformers", "trl", "peft", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


if __name__ == "__main__":
    sys.exit(main())
