"""Training stages under a multi-process launch (torchrun, 2 processes on the CPU, gloo), on the tiny model:
every process runs the stage, the main one alone writes the run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from constitutional.cli import main
from constitutional.config import load_config
from constitutional.records import read_jsonl
from constitutional.stages import critique_revise
from tests.fakes import ScriptedBackend


def _torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "constitutional.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_sft_and_rloo_in_two_processes_write_each_file_once(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = load_config(None, [f"critique_revise.model={tiny_model_dir}", "critique_revise.limit=12"])
    critique_revise.run(config, tmp_path, backend=ScriptedBackend())
    (tmp_path / "manifest.json").write_text('{"stages": {}}')  # a run directory (the CLI refuses any other)
    done = _torchrun("sft", "--out", str(tmp_path), "--set", f"sft.model={tiny_model_dir}",
                     "--set", "sft.batch_size=2", "--set", "sft.helpful_max_new_tokens=4", "--set", "sft.max_steps=2",
                     "--set", "sft.save_steps=1", "--set", "sft.device=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = [r["id"] for r in read_jsonl(tmp_path / "sft" / "helpful_samples.jsonl")]
    assert ids and len(ids) == len(set(ids))  # generated once, by the main process
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and (tmp_path / "sft" / "model" / "model.safetensors").is_file()
    assert metrics["loss_curve"] and done.stderr.count("[cai] sft: model saved") == 2  # both ran to the end

    pm_dir = tmp_path / "pm" / "model"
    torch.manual_seed(0)
    pm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    pm.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    pm.save_pretrained(pm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(pm_dir)
    done = _torchrun("rl", "--out", str(tmp_path), "--set", "rl.algo=rloo", "--set", "rl.steps=2",
                     "--set", "rl.prompts_per_step=2", "--set", "rl.max_new_tokens=4", "--set", "rl.eval_prompts=2",
                     "--set", "rl.save_steps=1", "--set", "rl.device=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "rl" / "metrics.jsonl")] == [1, 2]  # not once per process
    assert len(read_jsonl(tmp_path / "rl" / "samples.jsonl")) == 2
    # the last step's snapshot is rl/model itself, so only step-1 stays under checkpoints/
    assert sorted(p.name for p in (tmp_path / "rl" / "checkpoints").iterdir()) == ["step-1"]
    assert (tmp_path / "rl" / "model" / "model.safetensors").is_file()


def test_ppo_refuses_several_processes_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["rl", "--out", str(tmp_path), "--set", "rl.algo=ppo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rl.algo ppo runs in one process" in err and "rloo" in err


@pytest.mark.parametrize("rank, written", [("0", True), ("1", False)])
def test_only_the_main_process_writes_json_and_rows(tmp_path, monkeypatch, rank, written):
    from constitutional.records import JsonlAppender, write_json

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    write_json(tmp_path / "a.json", {"x": 1})
    with JsonlAppender(tmp_path / "rows.jsonl") as out:
        out.append({"id": "r1"})
        assert out.done_ids == {"r1"}
    assert (tmp_path / "a.json").exists() == written
    assert (tmp_path / "rows.jsonl").exists() == written
