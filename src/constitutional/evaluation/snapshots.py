"""Which models an evaluation compares: the run's snapshots and any outside models.

A run's snapshots, in training order:

* ``base``: the helpful model the run started from (``evaluate.base_model``, else ``sft.model``,
  else ``critique_revise.model``);
* ``sl-cai``: the SL-CAI model, ``sft/model`` (RL step 0 in the against-step plot);
* ``rl-step-N``: each RL checkpoint ``rl/checkpoints/step-N`` (the ``rl-checkpoints`` kind),
  except the one holding the same weights as the final model;
* ``rl-cai``: the final RL policy, ``rl/model``.

Everything here only looks at files, so a bad snapshot list fails before any model loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from constitutional.errors import CaiError
from constitutional.models import EMBEDDED, check_model_spec

SNAPSHOT_KINDS = ("base", "sl-cai", "rl-checkpoints", "rl-cai")


@dataclass(frozen=True)
class Snapshot:
    name: str
    spec: str  # a model spec for models.resolve_model / backends.load_backend
    step: int | None = None  # RL step: 0 for sl-cai, N for rl-step-N and rl-cai, None otherwise


def rl_final_step(out_dir: Path) -> int | None:
    """The last RL step the run finished (from rl/summary.json, else rl/metrics.jsonl), or None."""
    summary = out_dir / "rl" / "summary.json"
    if summary.is_file():
        try:
            steps = json.loads(summary.read_text()).get("steps")
            if isinstance(steps, int):
                return steps
        except json.JSONDecodeError:
            pass
    metrics = out_dir / "rl" / "metrics.jsonl"
    if metrics.is_file():
        steps = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return max(steps, default=None)
    return None


def rl_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete ``rl/checkpoints/step-N``, in step order."""
    found = []
    for d in (out_dir / "rl" / "checkpoints").glob("step-*"):
        if d.name[5:].isdigit() and (d / "config.json").is_file():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def resolve_snapshots(config, out_dir: str | Path) -> list[Snapshot]:
    """The snapshots ``config.evaluate`` names, checked against the run directory.

    ``evaluate.snapshots: null`` takes every run snapshot that exists (the base always does);
    an explicit list must name existing ones. Raises :class:`CaiError` for a missing directory
    or when nothing is left to evaluate.
    """

    cfg = config.evaluate
    out_dir = Path(out_dir)
    explicit = cfg.snapshots is not None
    kinds = list(cfg.snapshots) if explicit else list(SNAPSHOT_KINDS)
    snapshots: list[Snapshot] = []
    final_step = rl_final_step(out_dir)

    def need(path: Path, kind: str, hint: str) -> bool:
        if (path / "config.json").is_file():
            return True
        if explicit:
            what = "does not exist" if not path.exists() else "has no config.json"
            raise CaiError(f"evaluate.snapshots: {kind}: model directory {path} {what} ({hint})")
        return False

    for kind in SNAPSHOT_KINDS:  # always in training order, whatever order the list gives
        if kind not in kinds:
            continue
        if kind == "base":
            spec = config.run_models(out_dir).base_snapshot
            check_model_spec(spec, "evaluate.base_model")
            snapshots.append(Snapshot("base", spec, None))
        elif kind == "sl-cai":
            path = out_dir / "sft" / "model"
            if need(path, kind, "run `cai sft` first"):
                snapshots.append(Snapshot("sl-cai", str(path), 0))
        elif kind == "rl-checkpoints":
            found = rl_checkpoints(out_dir)
            if explicit and not found:
                raise CaiError(f"evaluate.snapshots: rl-checkpoints: no checkpoint in {out_dir / 'rl' / 'checkpoints'} "
                               f"(run `cai rl` first)")
            final_kept = "rl-cai" in kinds and (out_dir / "rl" / "model" / "config.json").is_file()
            for step, path in found:
                if final_kept and step == final_step:
                    continue  # the same weights as rl/model
                snapshots.append(Snapshot(f"rl-step-{step}", str(path), step))
        elif kind == "rl-cai":
            path = out_dir / "rl" / "model"
            if need(path, kind, "run `cai rl` first"):
                snapshots.append(Snapshot("rl-cai", str(path), final_step))
    for name, spec in cfg.extra_models.items():
        check_model_spec(spec, f"evaluate.extra_models.{name}")
        snapshots.append(Snapshot(name, spec, None))
    if not snapshots:
        raise CaiError("evaluate: the config names no snapshots to evaluate (set evaluate.snapshots or "
                       "evaluate.extra_models)")
    return snapshots


def fingerprint(spec: str, samples: int = 16, block: int = 1 << 16) -> str:
    """A cheap identity of a model's weights, so cached responses of a snapshot are dropped when
    its weights change (say, RL was rerun) and kept when a run directory is copied or moved.

    It hashes each weights file's size, its safetensors header and ``samples`` blocks of ``block``
    bytes spread evenly through it, plus ``config.json``: no path and no modification time, and a
    few MB read whatever the model's size. Training changes nearly every weight, so a sampled
    block tells a retrained model apart.
    """


    path = Path(spec).expanduser()
    if spec in EMBEDDED or not path.is_dir():
        return f"spec:{spec}"
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        if not f.is_file():
            continue
        size = f.stat().st_size
        digest.update(f"{f.name}:{size};".encode())
        with f.open("rb") as fh:
            # the safetensors header: an 8-byte length, then JSON of names, shapes and offsets
            head = fh.read(8)
            header = int.from_bytes(head, "little") + 8 if f.suffix == ".safetensors" and len(head) == 8 else size
            offsets = [0] + [max(0, (size - block) * (i + 1) // samples) for i in range(samples)]
            spans = [(0, min(header, size))] + [(o, block) for o in offsets]
            for offset, length in spans:
                fh.seek(offset)
                digest.update(fh.read(length))
    return f"sha256:{digest.hexdigest()}"
