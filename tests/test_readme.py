"""Every command the README shows is run here, so the README cannot drift from the code.

Commands are read from the README's ```bash blocks. ``cai`` commands run through ``cli.main`` in a
scratch copy of the repository's ``configs/`` beside a small run directory ``runs/demo`` made of
tiny random models, so paths such as ``runs/demo/rl/model`` exist: commands that would train or
generate for minutes on the embedded model run with ``--dry-run`` (config, inputs and plan checked,
nothing written); quick ones (``report``, ``chat --prompt``, ``score``) run for real. ``make``
targets must exist in the Makefile (``make -n``); shell helpers (``echo``) run in the scratch
directory. A few commands are run elsewhere, as listed in ``RUN_ELSEWHERE``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import build_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Commands the README shows that this test does not run, and what does run them.
RUN_ELSEWHERE = {
    ".venv/bin/python bench/": "make bench (the benchmark scripts; BENCHMARKS.md has their results)",
    ".venv/bin/python -m pytest": "make test",
    "accelerate launch": "needs GPUs (README, Scaling out); test_distributed.py runs it on 2 CPU processes",
    "python -m vllm": "the vLLM server, started by cai serve-local and tests/test_server.py",
    "vllm serve": "the vLLM server on a GPU machine",
    ".venv/bin/cai serve-local": "a server in the foreground; tests/test_server.py builds and starts the same one",
}
# cai subcommands that run for real here (fast on tiny models); the others get --dry-run
RUN_FOR_REAL = {"report", "chat", "score", "fetch-model", "judge-eval"}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, continuation lines joined, comments dropped."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working directory with configs/ and a small runs/demo made of tiny models."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", root / "configs")
    demo = root / "runs" / "demo"
    tiny = build_tiny_llama(demo / "sft" / "model")
    shutil.copytree(tiny, demo / "rl" / "model")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    pm = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    pm.config.pad_token_id = tokenizer.pad_token_id
    pm.save_pretrained(demo / "pm" / "model")
    tokenizer.save_pretrained(demo / "pm" / "model")
    (demo / "pm" / "metrics.json").write_text(json.dumps({"reward_mean": 0.0, "reward_std": 1.0}))
    (demo / "manifest.json").write_text(json.dumps({"config": {}, "versions": {}, "stages": {}}))
    chat = [{"role": "user", "content": "How do I pick a lock?"},
            {"role": "assistant", "content": "I can help if it is your own lock: call a locksmith."}]
    (demo / "critique_revise").mkdir()
    (demo / "critique_revise" / "revisions.jsonl").write_text(
        "".join(json.dumps({"id": f"rt-{i}", "prompt": chat[0]["content"], "messages": chat, "rounds": []}) + "\n"
                for i in range(4)))
    (demo / "label").mkdir()
    (demo / "label" / "comparisons.jsonl").write_text(
        "".join(json.dumps({"id": f"rt-{i}", "prompt": chat[:1], "chosen": chat[1:],
                            "rejected": [{"role": "assistant", "content": "Sure, here is how."}], "p_chosen": 0.8})
                + "\n" for i in range(4)))
    return root


def _elsewhere(command: str) -> str | None:
    return next((why for prefix, why in RUN_ELSEWHERE.items() if command.startswith(prefix)), None)


def test_the_readme_shows_commands():
    commands = readme_commands()
    assert len(commands) >= 10
    assert any(c.startswith("make demo") for c in commands) and any(".venv/bin/cai run" in c for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, scratch, monkeypatch, capsys):
    from constitutional.cli import main

    if _elsewhere(command):
        pytest.skip(f"run by {_elsewhere(command)}")
    monkeypatch.chdir(scratch)
    words = shlex.split(command)
    if words[0] == "make":
        result = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), *words[1:]], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return
    if words[0] in ("echo", "cat", "ls"):
        subprocess.run(command, shell=True, check=True, cwd=scratch)
        return
    assert words[0] in (".venv/bin/cai", "cai"), f"the README shows a command this test does not know: {command}"
    argv = words[1:]
    if argv[0] not in RUN_FOR_REAL:
        argv.append("--dry-run")
    if argv[0] == "chat":
        argv += ["--max-new-tokens", "4", "--device", "cpu"]
        if "--prompt" not in argv:  # interactive: one turn, then /quit
            import io

            monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/quit\n"))
    if argv[0] == "fetch-model":
        pytest.skip("builds the embedded model: run by make demo and by the integration tests")
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"{command}\n{captured.err}"
