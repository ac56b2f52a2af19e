"""Malformed input, case by case: each one is refused with exit code 2 and one ``cai: error:`` line that names
the problem, without a traceback, and without creating or changing any file (issue 24's table).

Each case builds its inputs in ``tmp/in`` and returns the command line; the harness runs ``cai`` in-process
from ``tmp/work`` and compares every file under ``tmp`` before and after. Run directories are ``tmp/work/...``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from constitutional.cli import main

SERVER = "{{backend: openai, base_urls: ['{url}'], model: tiny, tokenizer: '{tok}', retries: 0, backoff: 0.01{extra}}}"


def free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


class Ctx:
    """Paths and helpers a case uses to build its inputs."""

    def __init__(self, root: Path, tiny: Path):
        self.root, self.tiny = root, tiny
        self.inp = root / "in"
        self.inp.mkdir()

    def file(self, name: str, content: str | bytes) -> str:
        path = self.inp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)

    def run_dir(self, name: str = "run", files: dict | None = None, manifest=None) -> str:
        """A run directory under work/ holding ``files`` (relative path -> text) and, unless None, a manifest."""
        out = self.root / "work" / name
        out.mkdir(parents=True, exist_ok=True)
        for rel, text in (files or {}).items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text) if isinstance(text, str) else (out / rel).write_bytes(text)
        if manifest is not None:
            (out / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        return str(out)

    def new_out(self) -> str:
        return str(self.root / "work" / "new-run")

    def model(self) -> list[str]:
        """Overrides that point every model at the tiny test model (so nothing is built or downloaded)."""
        return ["--set", f"critique_revise.model={self.tiny}", "--set", f"sft.model={self.tiny}"]

    def server(self, url: str | None = None, extra: str = "") -> str:
        return SERVER.format(url=url or free_url(), tok=self.tiny, extra=extra)


REVISION = json.dumps({"id": "rt-1", "prompt": "p", "messages": [{"role": "user", "content": "p"},
                                                                  {"role": "assistant", "content": "a"}]})
COMPARISON = {"id": "c1", "prompt": [{"role": "user", "content": "p"}],
              "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}],
              "p_chosen": 0.8}

TORN = b'\n{"id": "\xe2\x82'  # a line cut off inside a three-byte character (a crash mid-write)


def comparisons(**change) -> str:
    return json.dumps({**COMPARISON, **change}) + "\n"


# (name, build(ctx) -> argv, fragment the error line must contain)
CASES = [
    # ---------------------------------------------------------------- config files
    ("config missing", lambda c: ["run", str(c.inp / "nope.yaml"), "--out", c.new_out()], "no such file"),
    ("config empty", lambda c: ["run", c.file("c.yaml", ""), "--out", c.new_out()], "config is empty"),
    ("config only a comment", lambda c: ["run", c.file("c.yaml", "# nothing\n"), "--out", c.new_out()], "empty"),
    ("config yaml syntax", lambda c: ["run", c.file("c.yaml", "sft:\n  epochs: [1,\n"), "--out", c.new_out()],
     "not valid YAML at line"),
    ("config not utf-8", lambda c: ["run", c.file("c.yaml", b"sft:\n  epochs: \xff\xfe\n"), "--out", c.new_out()],
     "not UTF-8"),
    ("config a list", lambda c: ["run", c.file("c.yaml", "- sft\n"), "--out", c.new_out()], "mapping at the top"),
    ("config a directory", lambda c: ["run", str(c.inp), "--out", c.new_out()], "is a directory"),
    ("config unknown section", lambda c: ["run", c.file("c.yaml", "sfft: {}\n"), "--out", c.new_out()], "'sfft'"),
    ("config unknown key", lambda c: ["run", c.file("c.yaml", "sft:\n  lr: 1\n"), "--out", c.new_out()], "sft.lr"),
    ("config section not a mapping", lambda c: ["run", c.file("c.yaml", "sft: 3\n"), "--out", c.new_out()],
     "'sft'"),
    ("config wrong type", lambda c: ["run", c.file("c.yaml", "critique_revise:\n  rounds: many\n"), "--out",
                                     c.new_out()], "critique_revise.rounds"),
    ("rounds negative", lambda c: ["sft", "--out", c.new_out(), "--set", "critique_revise.rounds=-1"],
     "critique_revise.rounds"),
    ("limit -1", lambda c: ["critique-revise", "--out", c.new_out(), "--set", "critique_revise.limit=-1"],
     "critique_revise.limit"),
    ("helpful_limit -1", lambda c: ["label", "--out", c.new_out(), "--set", "label.helpful_limit=-1"],
     "label.helpful_limit"),
    ("limit 0", lambda c: ["label", "--out", c.new_out(), "--set", "label.limit=0"], "label.limit"),
    ("temperature inf", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                   "critique_revise.temperature=.inf"], "finite"),
    ("temperature nan", lambda c: ["label", "--out", c.new_out(), "--set", "label.temperature=.nan"], "finite"),
    ("learning rate negative", lambda c: ["sft", "--out", c.new_out(), "--set", "sft.learning_rate=-1e-5"],
     "sft.learning_rate"),
    ("learning rate zero", lambda c: ["train-pm", "--out", c.new_out(), "--set", "pm.learning_rate=0"],
     "pm.learning_rate"),
    ("generate_batch_size 0", lambda c: ["sft", "--out", c.new_out(), "--set", "sft.generate_batch_size=0"],
     "sft.generate_batch_size"),
    ("epochs inf", lambda c: ["sft", "--out", c.new_out(), "--set", "sft.epochs=.inf"], "sft.epochs"),
    ("rl steps 0", lambda c: ["rl", "--out", c.new_out(), "--set", "rl.steps=0"], "rl.steps"),
    ("kl_coef negative", lambda c: ["rl", "--out", c.new_out(), "--set", "rl.kl_coef=-0.1"], "rl.kl_coef"),
    ("max_new_tokens 0", lambda c: ["evaluate", "--out", c.new_out(), "--set", "evaluate.max_new_tokens=0"],
     "evaluate.max_new_tokens"),
    ("bootstrap samples negative", lambda c: ["evaluate", "--out", c.new_out(), "--set",
                                              "evaluate.bootstrap_samples=-5"], "evaluate.bootstrap_samples"),
    ("seed not a number", lambda c: ["run", c.file("c.yaml", "seed: abc\n"), "--out", c.new_out()], "seed"),
    ("seed negative", lambda c: ["run", c.file("c.yaml", "seed: -3\n"), "--out", c.new_out()], "seed"),
    ("device tpu", lambda c: ["sft", "--out", c.new_out(), "--set", "sft.device=tpu"], "sft.device"),
    ("set without =", lambda c: ["sft", "--out", c.new_out(), "--set", "sft.epochs"], "section.key=value"),
    ("set unknown key", lambda c: ["sft", "--out", c.new_out(), "--set", "sft.epoch=1"], "sft.epoch"),
    ("set through a value", lambda c: ["sft", "--out", c.new_out(), "--set", "seed.x=1"], "'seed'"),
    ("stages unknown", lambda c: ["run", "configs/smollm2-cpu.yaml", "--out", c.new_out(), "--stages", "sftt"],
     "--stages"),
    ("force unknown", lambda c: ["run", "configs/smollm2-cpu.yaml", "--out", c.new_out(), "--force", "pmm"],
     "--force"),
    ("server spec bad url", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                       "critique_revise.model={backend: openai, base_urls: [ftp://x], model: m}"],
     "base_urls"),
    ("server spec unknown key", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                           "critique_revise.model={backend: openai, base_urls: ['http://x/v1'], "
                                           "model: m, colour: red}"], "colour"),
    ("server for a trained model", lambda c: ["sft", "--out", c.new_out(), "--set",
                                              "sft.model={backend: openai, base_urls: ['http://x/v1'], model: m}"],
     "sft.model"),
    ("api key env not an identifier", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                                 f"critique_revise.model={c.server(extra=', api_key_env: sk-abc')}"],
     "api_key_env"),
    # ---------------------------------------------------------------- constitutions
    ("constitution missing", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                        f"constitution={c.inp / 'nope.yaml'}"], "no such file"),
    ("constitution a directory", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                            f"constitution={c.inp}"], "is a directory"),
    ("constitution not utf-8", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                          "constitution=" + c.file("k.yaml", b"sl_principles: \xff")], "not UTF-8"),
    ("constitution yaml syntax", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                            "constitution=" + c.file("k.yaml", "sl_principles: [\n")],
     "not valid YAML"),
    ("constitution json syntax", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                            "constitution=" + c.file("k.json", "{")], "not valid JSON"),
    ("constitution a list", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                       "constitution=" + c.file("k.yaml", "- a\n")], "k.yaml"),
    ("constitution no sl principles", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                                 "constitution=" + c.file("k.yaml", "feedback_principles:\n  - id: f\n"
                                                                          "    text: Which is kinder?\n")],
     "no sl_principles"),
    ("constitution sl_principles empty", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                                    "constitution=" + c.file("k.yaml", "sl_principles: []\n")],
     "no sl_principles"),
    ("constitution principle missing revision", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                                           "constitution=" + c.file(
                                                               "k.yaml", "sl_principles:\n  - id: a\n"
                                                               "    critique: Is it harmful?\n")], "k.yaml"),
    ("constitution principle longer than the context", lambda c: [
        "critique-revise", "--out", c.new_out(), *c.model(), "--set", "critique_revise.limit=2", "--set",
        "constitution=" + c.file("k.yaml", "sl_principles:\n  - id: a\n    critique_request: "
                                 + "Is it harmful? " * 20000 + "\n    revision_request: Rewrite it.\n")],
     "fits the model's context"),
    ("constitution empty list", lambda c: ["critique-revise", "--out", c.new_out(), "--set", "constitution=[]"],
     "empty list"),
    # ---------------------------------------------------------------- prompt files
    ("prompts missing", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                   f"critique_revise.prompts={c.inp / 'p.jsonl'}"], "no such file"),
    ("prompts unknown built-in", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                            "critique_revise.prompts=red-teem"], "red-teem"),
    ("prompts empty file", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                      "critique_revise.prompts=" + c.file("p.jsonl", "")], "no prompts"),
    ("prompts bad json", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                    "critique_revise.prompts=" + c.file("p.jsonl", "{oops\n")], "not valid JSON"),
    ("prompts row not an object", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                             "critique_revise.prompts=" + c.file("p.jsonl", "[1]\n")],
     "JSON object"),
    ("prompts messages of strings", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                               "critique_revise.prompts=" + c.file("p.jsonl",
                                                                                   '{"messages": ["text"]}\n')],
     "user message"),
    ("prompts no prompt field", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                           "critique_revise.prompts=" + c.file("p.jsonl", '{"text": "hi"}\n')],
     "row 1"),
    ("prompts bad split value", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                           "critique_revise.prompts=" + c.file(
                                               "p.jsonl", '{"prompt": "hi", "split": "dev"}\n')], "split"),
    ("prompts empty split", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                       "critique_revise.prompts=" + c.file(
                                           "p.jsonl", '{"prompt": "hi", "split": "heldout"}\n')],
     "no prompts in the train split"),
    ("prompts not utf-8", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                     "critique_revise.prompts=" + c.file("p.txt", b"caf\xe9 au lait\n")], "not UTF-8"),
    ("prompts csv without prompt column", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                                     "critique_revise.prompts=" + c.file("p.csv", "text\nhi\n")],
     "'prompt' column"),
    ("prompts csv empty prompt", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                            "critique_revise.prompts=" + c.file("p.csv", "prompt\n\"  \"\n")],
     "empty prompt"),
    ("prompts unknown type", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                        "critique_revise.prompts=" + c.file("p.parquet", "x")], "prompt file type"),
    ("prompts duplicate id", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                        "critique_revise.prompts=" + c.file(
                                            "p.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')],
     "duplicate id"),
    ("fewshot file missing", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                        f"critique_revise.fewshot_file={c.inp / 'f.yaml'}"], "f.yaml"),
    ("jailbreak unknown", lambda c: ["evaluate", "--out", c.new_out(), "--set", "evaluate.jailbreaks=[dan-mode]"],
     "dan-mode"),
    ("benchmark unknown", lambda c: ["evaluate", "--out", c.new_out(), "--set", "evaluate.benchmarks=[mmlu]"],
     "mmlu"),
    ("judge directory missing", lambda c: ["evaluate", "--out", c.new_out(), "--set",
                                           f"evaluate.judge={c.inp / 'judge'}"], "evaluate.judge"),
    # ---------------------------------------------------------------- comparison and revision files
    ("sft revisions missing", lambda c: ["sft", "--out", c.new_out(), *c.model(), "--set",
                                         f"sft.revisions={c.inp / 'r.jsonl'}"], "r.jsonl"),
    ("sft revisions bad json", lambda c: ["sft", "--out", c.new_out(), *c.model(), "--set",
                                          "sft.revisions=" + c.file("r.jsonl", REVISION + "\n{\n")], "line 2"),
    ("sft revisions torn utf-8", lambda c: ["sft", "--out", c.new_out(), *c.model(), "--set",
                                            "sft.revisions=" + c.file("r.jsonl", REVISION.encode() + TORN)],
     "not UTF-8"),
    ("sft helpful data missing", lambda c: ["sft", "--out", c.new_out(), *c.model(), "--set",
                                            "sft.revisions=" + c.file("r.jsonl", REVISION), "--set",
                                            f"sft.helpful_data={c.inp / 'h.jsonl'}"], "h.jsonl"),
    ("sft without revisions", lambda c: ["sft", "--out", c.new_out(), *c.model()], "revisions"),
    ("pm comparisons missing", lambda c: ["train-pm", "--out", c.new_out(), "--set",
                                          f"pm.comparisons={c.inp / 'c.jsonl'}"], "c.jsonl"),
    ("pm comparisons p_chosen null", lambda c: ["train-pm", "--out", c.new_out(), "--set",
                                                "pm.comparisons=" + c.file("c.jsonl", comparisons(p_chosen=None))],
     "p_chosen"),
    ("pm comparisons p_chosen 1.5", lambda c: ["train-pm", "--out", c.new_out(), "--set",
                                               "pm.comparisons=" + c.file("c.jsonl", comparisons(p_chosen=1.5))],
     "p_chosen"),
    ("pm comparisons no chosen", lambda c: ["train-pm", "--out", c.new_out(), "--set",
                                            "pm.comparisons=" + c.file("c.jsonl", comparisons(chosen=None))],
     "c.jsonl"),
    ("dpo comparisons torn", lambda c: ["rl", "--out", c.new_out(), "--set", "rl.algo=dpo", "--set",
                                        "rl.comparisons=" + c.file("c.jsonl", comparisons().encode() + TORN)],
     "not UTF-8"),
    # ---------------------------------------------------------------- run directories
    ("out is a file", lambda c: ["critique-revise", "--out", c.file("out.txt", "x")], "is a file"),
    ("out not a run directory", lambda c: ["critique-revise", "--out", c.run_dir(files={"notes.txt": "mine"})],
     "no manifest.json"),
    ("manifest a list", lambda c: ["critique-revise", "--out", c.run_dir(manifest="[]")], "not a cai manifest"),
    ("manifest not json", lambda c: ["critique-revise", "--out", c.run_dir(manifest="{")], "manifest"),
    ("manifest of another tool", lambda c: ["critique-revise", "--out", c.run_dir(manifest={"name": "my-web-app"})],
     "not a cai manifest"),
    ("manifest stages a list", lambda c: ["critique-revise", "--out", c.run_dir(manifest={"stages": []})],
     "not a cai manifest"),
    ("label without sft model", lambda c: ["label", "--out", c.run_dir(manifest={"stages": {}})], "sft"),
    ("rl without pm", lambda c: ["rl", "--out", c.run_dir(manifest={"stages": {}}), "--set", "rl.algo=rloo",
                                 "--set", f"rl.policy={c.tiny}"], "rl.reward_model"),
    ("evaluate without rl-cai", lambda c: ["evaluate", "--out", c.run_dir(manifest={"stages": {}}), *c.model(),
                                           "--set", "evaluate.snapshots=[base, rl-cai]"], "rl-cai"),
    ("report missing", lambda c: ["report", str(c.root / "work" / "nope")], "does not exist"),
    ("report not a run", lambda c: ["report", c.run_dir(files={"a.txt": "x"})], "no stage output"),
    ("report manifest a list", lambda c: ["report", c.run_dir(manifest="[]")], "expected a JSON object"),
    ("report comparison p_chosen null", lambda c: ["report", c.run_dir(
        manifest={"stages": {}}, files={"label/comparisons.jsonl": comparisons(p_chosen=None)})],
     "label/comparisons.jsonl"),
    ("report effect rows wrong shape", lambda c: ["report", c.run_dir(
        manifest={"stages": {}}, files={"evaluate/effect.json": json.dumps({"rows": [{"red_team": 3}]})})],
     "effect.json"),
    # ---------------------------------------------------------------- servers and keys
    ("critique server unreachable", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                               f"critique_revise.model={c.server()}"], "unreachable"),
    ("label feedback server unreachable", lambda c: ["label", "--out", c.new_out(), "--set",
                                                     f"label.policy={c.tiny}", "--set",
                                                     f"label.feedback_model={c.server()}"], "label.feedback_model"),
    ("label falls back to an unreachable critique server", lambda c: [
        "label", "--out", c.new_out(), "--set", f"label.policy={c.tiny}", "--set",
        f"critique_revise.model={c.server()}"], "label.feedback_model"),
    ("direct reward from an unreachable server", lambda c: [
        "rl", "--out", c.new_out(), "--set", f"rl.policy={c.tiny}", "--set", "rl.reward=direct", "--set",
        f"rl.feedback_model={c.server()}"], "rl.feedback_model"),
    ("judge server unreachable", lambda c: ["evaluate", "--out", c.new_out(), "--set",
                                            f"evaluate.judge={c.server()}"], "evaluate.judge"),
    ("api key unset", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                 f"critique_revise.model={c.server(extra=', api_key_env: CAI_TEST_UNSET_KEY')}"],
     "CAI_TEST_UNSET_KEY"),
    ("api key empty", lambda c: ["critique-revise", "--out", c.new_out(), "--set",
                                 f"critique_revise.model={c.server(extra=', api_key_env: CAI_TEST_EMPTY_KEY')}"],
     "is empty"),
    ("api key with a control character", lambda c: [
        "critique-revise", "--out", c.new_out(), "--set",
        f"critique_revise.model={c.server(extra=', api_key_env: CAI_TEST_BROKEN_KEY')}"], "CAI_TEST_BROKEN_KEY"),
    # ---------------------------------------------------------------- other commands
    ("score pm missing", lambda c: ["score", "--pm", str(c.inp / "pm"), "--in", c.file("r.jsonl", "{}\n"),
                                    "--out", c.new_out() + ".jsonl"], "r.jsonl"),
    ("score input missing", lambda c: ["score", "--pm", str(c.inp), "--in", str(c.inp / "nope.jsonl"),
                                       "--out", c.new_out() + ".jsonl"], "nope.jsonl"),
    ("chat model missing", lambda c: ["chat", "--model", str(c.inp / "m"), "--prompt", "hi"], "--model"),
    ("chat temperature negative", lambda c: ["chat", "--model", str(c.tiny), "--prompt", "hi", "--temperature", "-1"],
     "--temperature"),
    ("fetch-model unknown", lambda c: ["fetch-model", "gpt-5"], "gpt-5"),
    ("serve-local missing model", lambda c: ["serve-local", str(c.inp / "missing")], "missing"),
    ("label-eval unknown variant", lambda c: ["label-eval", "--out", c.new_out(), "--variants", "nope"], "nope"),
    ("label-eval limit 0", lambda c: ["label-eval", "--out", c.new_out(), "--limit", "0"], "--limit"),
    ("judge-eval unknown judge", lambda c: ["judge-eval", "--out", c.new_out(), "--judges", "oracle"], "oracle"),
    ("judge-eval unknown split", lambda c: ["judge-eval", "--out", c.new_out(), "--split", "train"], "--split"),
    ("judge-eval unknown set", lambda c: ["judge-eval", "--out", c.new_out(), "--sets", "mmlu"], "mmlu"),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
            if "cache" not in p.relative_to(root).parts}


def test_there_are_at_least_75_cases_with_distinct_names():
    names = [name for name, _, _ in CASES]
    assert len(names) >= 75 and len(set(names)) == len(names)


@pytest.mark.parametrize("name,build,fragment", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_error_line_exit_2_and_writes_nothing(name, build, fragment, tmp_path, tiny_model_dir,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("CAI_TEST_EMPTY_KEY", "")
    monkeypatch.setenv("CAI_TEST_BROKEN_KEY", "sk-abc\x07def")
    monkeypatch.delenv("CAI_TEST_UNSET_KEY", raising=False)
    ctx = Ctx(tmp_path, tiny_model_dir)
    argv = build(ctx)
    (tmp_path / "work").mkdir(exist_ok=True)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repo, for configs/...
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (name, code, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("cai: error: "), (name, lines)
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert fragment in lines[0], (name, fragment, lines[0])
    assert _snapshot(tmp_path) == before, name


# ---------------------------------------------------------------- data loss and secrets (their own tests)


def test_run_never_deletes_a_stage_named_folder_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "label").mkdir(parents=True)
    precious = out / "label" / "notes.txt"
    precious.write_text("a week of my own notes")
    code = main(["run", "configs/smollm2-cpu.yaml", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no manifest.json" in err[0]
    assert precious.read_text() == "a week of my own notes"
    assert sorted(p.name for p in out.rglob("*")) == ["label", "notes.txt"]


def test_a_stage_folder_the_manifest_does_not_list_is_not_removed_on_restart(tmp_path, capsys, tiny_model_dir):
    """A run directory with a manifest, and a folder named like a stage that the manifest never recorded."""
    out = tmp_path / "run"
    (out / "critique_revise").mkdir(parents=True)
    (out / "critique_revise" / "mine.txt").write_text("keep me")
    (out / "manifest.json").write_text(json.dumps({"stages": {}}))
    code = main(["run", "configs/smollm2-cpu.yaml", "--out", str(out), "--stages", "critique_revise", "--force",
                 "critique_revise", "--set", f"critique_revise.model={tiny_model_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "did not create it" in err[-1]
    assert (out / "critique_revise" / "mine.txt").read_text() == "keep me"


def test_two_commands_on_one_run_directory_do_not_run_at_once(tmp_path, capsys):
    import fcntl

    from constitutional.errors import CaiError
    from constitutional.pipeline import run_lock

    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        with pytest.raises(CaiError, match="another cai command is running"):
            with run_lock(out):
                pass
    with (out / ".cai.lock").open("a") as f:  # released afterwards
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_an_api_key_ending_in_carriage_return_is_sent_stripped_and_never_shown(tmp_path, tiny_model_dir, monkeypatch,
                                                                              capsys):
    """A key pasted from a Windows file ends in \\r: before, http.client raised ValueError with the full header,
    which reached the traceback and manifest.json. Now the key is stripped and works; no output holds it."""
    from tests.fake_openai import FakeOpenAIServer

    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("CAI_TEST_KEY", secret + "\r\n")
    out = tmp_path / "run"
    with FakeOpenAIServer(tiny_model_dir) as server:
        model = SERVER.format(url=server.base_url, tok=tiny_model_dir, extra=", api_key_env: CAI_TEST_KEY")
        code = main(["critique-revise", "--out", str(out), "--set", f"critique_revise.model={model}",
                     "--set", "critique_revise.limit=2", "--set", "critique_revise.rounds=1",
                     "--set", "critique_revise.max_new_tokens=4", "--set", "critique_revise.critique_max_new_tokens=4"])
        sent = server.headers[-1]["Authorization"]
    captured = capsys.readouterr()
    assert code == 0 and sent == f"Bearer {secret}"
    for text in (captured.out, captured.err, *(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())):
        assert secret not in text


def test_a_key_that_cannot_be_sent_is_refused_naming_the_variable_not_the_key(tmp_path, monkeypatch, capsys):
    """Even past the checks (a backend built directly), a header the HTTP client refuses never shows the key."""
    from constitutional.backends.openai import HttpPool
    from constitutional.errors import CaiError, redact
    from tests.fake_openai import FakeOpenAIServer

    secret = "sk-inner-\rbroken-key"
    monkeypatch.setenv("CAI_TEST_KEY", secret)
    with FakeOpenAIServer() as server:
        pool = HttpPool([server.base_url], {"Authorization": f"Bearer {secret}"}, retries=0)
        with pytest.raises(CaiError) as err:
            pool.request("GET", "/models")
    assert "sk-inner" not in str(err.value) and "headers" in str(err.value)
    from constitutional.errors import register_secret

    register_secret(secret)
    assert "sk-inner" not in redact(f"ValueError: Invalid header value b'Bearer {secret}'".replace("\r", "\\r"))


def test_a_failed_stage_stores_no_secret_in_the_manifest(tmp_path, monkeypatch):
    """The manifest's ``error`` of a failed stage goes through ``errors.redact``."""
    import constitutional.stages.critique_revise as stage
    from constitutional.config import load_config
    from constitutional.errors import register_secret
    from constitutional.pipeline import run_stages

    secret = "sk-manifest-4c3b2a1"
    register_secret(secret)

    def leak(config, out):
        raise ValueError(f"Invalid header value b'Bearer {secret}'")

    monkeypatch.setattr(stage, "run", leak)
    out = tmp_path / "run"
    with pytest.raises(ValueError):
        run_stages(load_config(None), out, ["critique_revise"], None)
    text = (out / "manifest.json").read_text()
    assert "[secret]" in text and secret not in text


def test_a_bug_traceback_is_printed_with_the_key_redacted(monkeypatch, capsys):
    import constitutional.cli as cli
    from constitutional.errors import register_secret

    secret = "sk-traceback-77aa"
    register_secret(secret)

    def boom(args):
        raise RuntimeError(f"bad header Bearer {secret}")

    monkeypatch.setattr(cli, "_cmd_report", boom)
    assert main(["report", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and secret not in err and "[secret]" in err


def test_a_spreadsheet_csv_with_a_byte_order_mark_is_read(tmp_path):
    from constitutional.prompt_sources import load_prompts

    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffprompt,split\nHow do I bake bread?,train\n".encode())
    rows = load_prompts(str(path), "train")
    assert [r.prompt for r in rows] == ["How do I bake bread?"]


def test_report_leaves_out_a_symlinked_image_and_sets_a_content_security_policy(tmp_path):
    from constitutional.report import build_report

    run = tmp_path / "run"
    (run / "evaluate").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\n" + b"private pixels")
    os.symlink(outside, run / "evaluate" / "elo.png")
    html = build_report(run)
    import base64

    assert base64.b64encode(outside.read_bytes()).decode()[:16] not in html
    import html as markup
    import re

    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', html)
    assert policy and markup.unescape(policy.group(1)).startswith("default-src 'none'; img-src data:")


def test_report_writes_through_no_planted_symlink(tmp_path):
    """A run directory someone sent may hold report.html.tmp or report.html as symlinks to your files."""
    from constitutional.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    victim = tmp_path / "authorized_keys"
    victim.write_text("my key\n")
    os.symlink(victim, run / "report.html.tmp")
    os.symlink(victim, run / "report.html")
    path = write_report(run)
    assert victim.read_text() == "my key\n"
    assert not path.is_symlink() and "<!DOCTYPE html>" in path.read_text()


def test_legitimate_edge_values_are_still_accepted():
    from constitutional.config import load_config

    config = load_config(None, ["rl.eval_prompts=0", "critique_revise.fewshot=0", "rl.kl_coef=0",
                                "label.temperature=0", "sft.device=cuda:1", "critique_revise.follows_candidates=0"])
    assert config.rl.eval_prompts == 0 and config.sft.device == "cuda:1"


def test_a_directory_holding_only_a_leftover_lock_is_a_new_run_directory(tmp_path):
    from constitutional.pipeline import read_previous_stages

    (tmp_path / ".cai.lock").write_text("")
    assert read_previous_stages(tmp_path) == {}
