"""``cai run``: the stages in order, skipping what is done, redoing what changed.

Each stage's **settings** are the config fields it reads (its own section, the seed, the
constitution, the fields of other sections it uses) plus the content hash of every input file
they name (constitution, prompt, few-shot and data files). A stage's **key** chains its settings
with the key of the stage before it, so a change anywhere reaches every later stage. The first
stage's chain starts from the package version and a hash of the data shipped in the package (the
built-in constitutions, prompt sets, few-shot and eval files, which a config names only by name), so
an upgrade that changes any of them redoes the run:

* a finished stage whose key is unchanged is skipped (a second ``cai run`` takes about a second);
* a stage whose only changes are its "free" settings (``limit``, ``steps``, ``batch_size``,
  ``device``, ...: those a stage can take up where it stopped, see each module's ``FREE_SETTINGS``),
  or that was interrupted, resumes in place;
* any other change (its own settings, or anything upstream) removes the stage's directory and
  runs it afresh, and the same follows for every stage after it;
* ``--force STAGE`` reruns that stage and every later one from scratch.

``manifest.json`` keeps, per stage, the status, key, wall time and summary; it is first written
only after the config and every input file have been checked (``validate_inputs``), so a bad
input leaves no run directory behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from constitutional import __version__, progress
from constitutional.backends import as_server_spec
from constitutional.backends.openai import check_reachable, read_api_key
from constitutional.config import STAGES, PipelineConfig
from constitutional.constitution import load_constitution
from constitutional.distributed import is_main, wait_for_everyone
from constitutional.errors import CaiError, redact
from constitutional.evaluation.jailbreaks import check_names
from constitutional.evaluation.snapshots import resolve_snapshots
from constitutional.feedback import load_label_fewshot
from constitutional.models import check_model_spec
from constitutional.progress import log
from constitutional.prompt_sources import load_prompts
from constitutional.prompts import load_fewshot
from constitutional.records import load_comparisons, write_json
from constitutional.stages.rl import check_processes, check_reward_model
from constitutional.stages.sft import load_chat_file, load_revision_chats

# stage name in configs -> (CLI subcommand, module, directory in the run)
STAGE_MODULES = {
    "critique_revise": ("critique-revise", "constitutional.stages.critique_revise", "critique_revise"),
    "sft": ("sft", "constitutional.stages.sft", "sft"),
    "label": ("label", "constitutional.stages.label", "label"),
    "pm": ("train-pm", "constitutional.stages.pm", "pm"),
    "rl": ("rl", "constitutional.stages.rl", "rl"),
    "evaluate": ("evaluate", "constitutional.stages.evaluate", "evaluate"),
}


def stages_needed(config: PipelineConfig) -> list[str]:
    """The stages ``cai run`` runs by default: all of them, but the PM only when something uses it
    (RL with ``reward: pm`` and PPO or RLOO)."""
    uses_pm = config.rl.algo in ("ppo", "rloo") and config.rl.reward == "pm"
    return [s for s in STAGES if s != "pm" or uses_pm]


def stage_settings(config: PipelineConfig, stage: str) -> dict:
    """Every config field ``stage`` reads, as plain data."""
    c = config
    reads: dict = {"seed": c.seed, "constitution": c.constitution, stage: asdict(getattr(c, stage))}
    scoring = {k: v for k, v in asdict(c.label).items() if k.startswith("contrast") or k == "feedback_model"}
    if stage == "critique_revise":
        cr = c.critique_revise
        if cr.candidates > 1 or cr.initial_candidates > 1 or cr.follows_candidates > 0:
            reads["label"] = scoring
    elif stage == "sft":
        reads["critique_revise.model"] = c.critique_revise.model
        if c.sft.helpful_candidates > 1:
            reads["label"] = scoring
    elif stage == "label":
        reads["critique_revise.model"] = c.critique_revise.model
    elif stage == "rl":
        reads["critique_revise.model"] = c.critique_revise.model
        reads["label"] = scoring
    elif stage == "evaluate":
        reads["evaluation_data"] = packaged_data_digest(only=EVALUATION_DATA)
        reads["label"] = asdict(c.label)
        reads["critique_revise.model"] = c.critique_revise.model
        reads["sft.model"] = c.sft.model
    return reads


def file_hashes(settings) -> dict[str, str]:
    """SHA-256 of every existing file named by a string anywhere in ``settings``."""
    found: dict[str, str] = {}

    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, str) and ("/" in value or "." in value) and len(value) < 4096:
            path = Path(value).expanduser()
            try:
                if path.is_file():
                    found[value] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                pass

    walk(settings)
    return found


# Data only the evaluation reads (the verdict rubric, the graded answers, jailbreak framings): a change
# there reruns the evaluation, not the training stages.
EVALUATION_DATA = "verdicts"


def packaged_data_digest(root: Path | None = None, only: str | None = None) -> str:
    """SHA-256 of every file under the package's ``data/`` folder (names and contents), or under ``root``.

    The evaluation-only folder (``EVALUATION_DATA``) is left out, unless ``only`` names it: then only it counts.
    """
    if root is None:
        root = Path(str(resources.files("constitutional") / "data"))
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and (p.relative_to(root).parts[0] == only if only else
                            p.relative_to(root).parts[0] != EVALUATION_DATA)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(config: PipelineConfig) -> dict[str, dict]:
    """Per stage (all of them, in order): its ``key`` (chained), ``strict`` (settings less the free
    ones) and ``upstream`` (the key of the stage before). A stage the config does not need (the PM
    when nothing uses it) gets a key but does not pass it on."""

    out = {}
    needed = stages_needed(config)
    upstream = _digest({"version": __version__, "data": packaged_data_digest()})
    for stage in STAGES:
        settings = stage_settings(config, stage)
        module = importlib.import_module(STAGE_MODULES[stage][1])
        free = getattr(module, "FREE_SETTINGS", set())
        own = settings[stage]
        strict = {**settings, stage: {k: v for k, v in own.items() if k not in free}}
        files = file_hashes(settings)
        key = _digest({"settings": settings, "files": files, "upstream": upstream})
        out[stage] = {"key": key, "strict": _digest({"strict": strict, "files": files}), "upstream": upstream}
        if stage in needed:
            upstream = key
    return out


def validate_inputs(config: PipelineConfig, stages: list[str]) -> None:
    """Check the constitution and every prompt, few-shot and data file the stages will read,
    so that bad input stops the run before any directory, manifest or model exists."""

    constitution = load_constitution(config.constitution)
    c = config
    if "critique_revise" in stages:
        constitution.require_sl()
        check_model(c.critique_revise.model, "critique_revise.model")
        load_prompts(c.critique_revise.prompts, c.critique_revise.split, c.critique_revise.limit)
        load_fewshot(c.critique_revise.fewshot_file)
    if "sft" in stages:
        if c.sft.helpful_data:
            load_chat_file(Path(c.sft.helpful_data))
        else:
            load_prompts(c.sft.helpful_prompts, "train")
        if c.sft.revisions:
            load_revision_chats(Path(c.sft.revisions))
    if "label" in stages:
        feedback_spec = c.feedback_model
        if "sft" not in stages or as_server_spec(feedback_spec) is not None:  # may be this run's sft/model
            check_model(feedback_spec, "label.feedback_model")

        load_prompts(c.label.prompts, c.label.split, c.label.limit)
        if c.label.helpful_prompts:
            load_prompts(c.label.helpful_prompts, c.label.split, c.label.helpful_limit)
        if c.label.method == "multiple_choice":
            load_label_fewshot(c.label.fewshot_file)
    if "pm" in stages:
        for path in (c.pm.comparisons, c.pm.helpful_data):
            if path:
                load_comparisons(Path(path))
    if "rl" in stages:
        reward_spec = c.direct_feedback_model
        if c.rl.reward == "direct" and as_server_spec(reward_spec) is not None:
            check_model(reward_spec, "rl.feedback_model")
        load_prompts(c.rl.prompts, "train", c.rl.limit)
        if c.rl.helpful_prompts:
            load_prompts(c.rl.helpful_prompts, "train")
        if c.rl.algo == "dpo" and c.rl.comparisons:
            load_comparisons(Path(c.rl.comparisons))
    if "evaluate" in stages:
        load_prompts(c.evaluate.red_team_prompts, "heldout", c.evaluate.limit)
        load_prompts(c.evaluate.helpful_prompts, "heldout", c.evaluate.limit)
        for name, spec in c.evaluate.extra_models.items():
            check_model_spec(spec, f"evaluate.extra_models.{name}")
        check_judge(c.evaluate.judge)
        if c.evaluate.jailbreaks:
            check_names(c.evaluate.jailbreaks)
        for name in c.evaluate.benchmarks:
            load_prompts(name, "all", c.evaluate.limit)
        if c.evaluate.snapshots is not None and not c.evaluate.snapshots and not c.evaluate.extra_models:
            raise CaiError("evaluate: the config names no snapshots to evaluate (set evaluate.snapshots or "
                           "evaluate.extra_models)")


def check_upstream(config: PipelineConfig, out: Path, stages: list[str]) -> None:
    """The outputs of earlier stages that ``stages`` read from the run directory ``out`` and that this command
    does not make itself (``cai label`` alone needs ``sft/model``): checked before anything is written."""

    c = config
    if "sft" in stages and "critique_revise" not in stages and not c.sft.revisions:
        load_revision_chats(out / "critique_revise" / "revisions.jsonl")
    if "label" in stages and "sft" not in stages:  # with sft, the policy is the model it is about to write
        check_model(c.run_models(out).label_policy, "label.policy")
    if "pm" in stages:
        if "label" not in stages and not c.pm.comparisons:
            load_comparisons(out / "label" / "comparisons.jsonl")
        if "sft" not in stages:
            check_model_spec(c.run_models(out).pm_base, "pm.base")
    if "rl" in stages:
        check_processes(c.rl)
        if "sft" not in stages:
            check_model_spec(c.run_models(out).rl_policy, "rl.policy")
        if "pm" not in stages:
            check_reward_model(c.rl, Path(c.run_models(out).reward_model))
        if c.rl.algo == "dpo" and "label" not in stages and not c.rl.comparisons:
            load_comparisons(out / "label" / "comparisons.jsonl")
    if "evaluate" in stages and not {"sft", "rl"} & set(stages):
        resolve_snapshots(config, out)


def check_judge(spec) -> None:
    """``evaluate.judge``: the rules, a model directory that exists, or a server that answers."""
    if spec != "rules":
        check_model(spec, "evaluate.judge")


def check_model(spec, key: str) -> None:
    """A model the run will load: a server that answers, with its API key variable set and sendable,
    or a model directory that exists (``models.check_model_spec``). Loads nothing."""

    server = as_server_spec(spec)
    if server is not None:
        read_api_key(server)
        check_reachable(server, key)
    elif spec is not None:
        check_model_spec(spec, key)


def _fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def run_stages(config: PipelineConfig, out: Path, stages: list[str], config_path, force: str | None = None,
               versions: dict | None = None, skip_done: bool = True, dry_run: bool = False) -> dict:
    """Run ``stages`` in order into ``out``, keeping ``manifest.json`` up to date; return the manifest.

    ``skip_done=False`` (a single-stage command such as ``cai sft``) always runs the stage, in place:
    it resumes what is there, and the stage itself refuses output made with other settings.
    ``dry_run`` checks the config and every input, prints what each stage would do and writes nothing.
    """
    validate_inputs(config, stages)
    previous = read_previous_stages(out)
    check_upstream(config, out, stages)
    if dry_run:
        return _dry_run(config, out, stages, force, skip_done, previous)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        try:
            previous = read_previous_stages(out)  # again, under the lock: another run may have just finished
            return _run_locked(config, out, stages, config_path, force, versions, skip_done, previous)
        except CaiError:
            if created and is_main():  # only the command holding the lock tidies what it made
                _remove_if_untouched(out)
            raise


def _remove_if_untouched(out: Path) -> None:
    """Remove a run directory this command created when a stage refused its input before writing a row:
    it holds nothing but the manifest, the lock, a stage's settings.json and empty directories, so a bad
    input leaves nothing behind (and no row of any run is lost)."""
    def bookkeeping(p: Path) -> bool:
        return p.is_dir() or (p.parent == out and p.name in ("manifest.json", ".cai.lock")) or (
            p.parent.parent == out and p.name == "settings.json")

    if all(bookkeeping(p) for p in out.rglob("*")):
        shutil.rmtree(out)


def read_previous_stages(out: Path) -> dict:
    """The ``stages`` of ``out/manifest.json``, or {} for a new or empty directory.

    Refuses (``CaiError``) what is not a run directory of this tool: ``out`` naming a file, a non-empty
    directory without a manifest, a manifest that is not a JSON object. The tool writes and removes only
    inside its own run directories, so a directory that happens to hold a ``label/`` is never touched.
    """
    if out.exists() and not out.is_dir():
        raise CaiError(f"--out {out}: is a file, not a run directory")
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        if out.is_dir() and any(p.name != ".cai.lock" for p in out.iterdir()) and is_main():  # others: rank 0 writes
            raise CaiError(f"--out {out}: the directory is not empty and has no manifest.json, so it is not a run "
                           f"directory of cai; give a new or empty directory (nothing was written)")
        return {}
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaiError(f"{manifest_path}: not a readable cai manifest ({type(e).__name__}); move the run directory "
                       f"aside or repair the file") from None
    stages = manifest.get("stages") if isinstance(manifest, dict) else None  # another tool's manifest.json: refused
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise CaiError(f"{manifest_path}: not a cai manifest (expected an object with a 'stages' mapping)")
    return stages


@contextmanager
def run_lock(out: Path):
    """Hold ``out/.cai.lock`` for the run, so two runs on one directory never write the same rows twice.

    Under ``accelerate launch`` only the main process takes it (the others follow its lead)."""
    if not is_main():
        yield
        return
    with (out / ".cai.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CaiError(f"--out {out}: another cai command is running in this directory; wait for it to "
                           f"finish or give another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_locked(config: PipelineConfig, out: Path, stages: list[str], config_path, force: str | None,
                versions: dict | None, skip_done: bool, previous: dict) -> dict:

    manifest_path = out / "manifest.json"
    manifest = {"config": config.to_dict(), "config_file": str(config_path) if config_path else None,
                "versions": versions or {}, "stages": dict(previous)}
    keys = plan(config)
    forced = set(STAGES[STAGES.index(force):]) if force else set()
    run_start = time.time()
    say = log if skip_done else (lambda message: None)  # a single-stage command speaks for itself
    for index, stage in enumerate(stages, 1):
        module = importlib.import_module(STAGE_MODULES[stage][1])
        stage_dir = out / STAGE_MODULES[stage][2]
        entry = previous.get(stage) or {}
        k = keys[stage]
        label = f"[{index}/{len(stages)}] {stage}"
        decision = _decide(stage, entry, k, forced, skip_done, stage_dir.exists())
        if decision == "skip":
            say(f"{label}: unchanged since the last run, skipped")
            continue
        if decision.startswith("restart") and stage not in previous:
            raise CaiError(f"{stage_dir}: would be removed to run {stage} afresh, but this run's manifest.json "
                           f"did not create it; move it aside (cai never deletes what it did not write)")
        if decision.startswith("restart"):
            say(f"{label}: {decision.split(': ', 1)[1]}: starting it again (removing {stage_dir})")
            if is_main():  # several processes (accelerate launch): one removes, all wait for it
                shutil.rmtree(stage_dir)
            wait_for_everyone()
        elif decision == "resume":
            say(f"{label}: resuming where it stopped")
        say(f"{label}: started (run elapsed {_fmt_seconds(time.time() - run_start)})")
        new = {"status": "running", "started": datetime.now(UTC).isoformat(timespec="seconds"), **k}
        manifest["stages"][stage] = new
        write_json(manifest_path, manifest)
        start = time.time()
        if skip_done:
            progress.set_stage(index, len(stages), stage)
        try:
            summary = module.run(config, out)
        except KeyboardInterrupt:
            new.update(status="interrupted", seconds=round(time.time() - start, 2))
            write_json(manifest_path, manifest)
            raise
        except BaseException as e:
            new.update(status="failed", seconds=round(time.time() - start, 2),
                       error=redact(str(e).splitlines()[0]) if str(e) else type(e).__name__)
            write_json(manifest_path, manifest)
            raise
        finally:
            progress.set_stage(None)
        new.update(status="done", seconds=round(time.time() - start, 2), summary=summary)
        write_json(manifest_path, manifest)
        where = f": {Path(summary['output']).resolve()}" if "output" in summary else ""
        say(f"{label}: done in {_fmt_seconds(time.time() - start)}{where}")
    return manifest


def _decide(stage: str, entry: dict, k: dict, forced: set, skip_done: bool, exists: bool) -> str:
    """What ``run_stages`` does with a stage: skip, resume, restart (with why) or run.

    A finished stage is skipped only while its directory is there: one removed by hand is run again."""
    if (skip_done and stage not in forced and entry.get("status") == "done" and entry.get("key") == k["key"]
            and exists):
        return "skip"
    resumable = not skip_done or (stage not in forced and entry.get("upstream") == k["upstream"]
                                  and entry.get("strict") == k["strict"])
    if exists and not resumable:
        if stage in forced:
            return "restart: forced"
        return "restart: inputs changed" if entry.get("upstream") != k["upstream"] else "restart: settings changed"
    return "resume" if exists else "run"


def _dry_run(config: PipelineConfig, out: Path, stages: list[str], force: str | None, skip_done: bool,
             previous: dict) -> dict:
    keys = plan(config)
    forced = set(STAGES[STAGES.index(force):]) if force else set()
    decisions = {}
    for index, stage in enumerate(stages, 1):
        exists = (out / STAGE_MODULES[stage][2]).exists()
        decisions[stage] = _decide(stage, previous.get(stage) or {}, keys[stage], forced, skip_done, exists)
        print(f"[{index}/{len(stages)}] {stage}: would {decisions[stage]}")
    print(f"dry run: config and inputs are valid; nothing was written to {out}")
    return {"stages": decisions}
