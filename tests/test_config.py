from pathlib import Path

import pytest

from constitutional.cli import main
from constitutional.config import load_config
from constitutional.errors import CaiError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)
    config = load_config(ROOT / "configs" / "smollm2-cpu.yaml")
    assert config.critique_revise.limit >= 32 and config.critique_revise.rounds >= 1
    # the demo's recipe: selection with openings, RLCD pairs, DPO (no PM)
    assert config.critique_revise.follows_candidates >= 1 and config.label.method == "rlcd"
    assert config.rl.algo == "dpo"


def test_overrides_are_parsed_as_yaml_and_type_checked():
    config = load_config(None, ["critique_revise.rounds=3", "critique_revise.temperature=1",
                                "critique_revise.limit=null", "constitution=[a.json, b.json]"])
    assert config.critique_revise.rounds == 3
    assert config.critique_revise.temperature == 1.0
    assert config.critique_revise.limit is None
    assert config.constitution == ["a.json", "b.json"]
    assert load_config(None, ["sft.learning_rate=1e-5"]).sft.learning_rate == 1e-5  # YAML 1.1 reads a str


@pytest.mark.parametrize("overrides, fragment", [
    (["critique_revise.roundz=3"], "'critique_revise.roundz': unknown"),
    (["critique_revise.rounds=two"], "'critique_revise.rounds': expected int, got 'two'"),
    (["critique_revise.rounds=true"], "'critique_revise.rounds': expected int"),
    (["critique_revise.rounds=0"], "'critique_revise.rounds': must be at least 1"),
    (["critique_revise=3"], "'critique_revise': expected a mapping"),
    (["nonsense.epochs=1"], "'nonsense': unknown"),
    (["critique_revise.rounds"], "expected section.key=value"),
])
def test_config_errors_name_the_key(overrides, fragment):
    with pytest.raises(CaiError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)


def test_bad_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("critique_revise:\n  rounds: 2\n  temprature: 0.5\n")
    with pytest.raises(CaiError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "critique_revise.temprature" in str(err.value)


def test_cli_config_error_exit_2_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("critique_revise:\n  rounds: many\n")
    code = main(["run", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "critique_revise.rounds" in err
    assert main(["run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--stages", "sftt"]) == 2


SERVER = "{backend: openai, base_urls: ['http://127.0.0.1:8000/v1'], model: m"


def test_generation_and_labelling_models_take_a_server_spec():
    from constitutional.config import ServerSpec

    config = load_config(None, [f"critique_revise.model={SERVER}, max_in_flight: 8}}",
                                f"label.feedback_model={SERVER}}}"])
    assert config.critique_revise.model == ServerSpec(base_urls=["http://127.0.0.1:8000/v1"], model="m",
                                                      max_in_flight=8)
    assert isinstance(config.label.feedback_model, ServerSpec) and config.label.policy is None


@pytest.mark.parametrize("override, fragment", [
    (f"critique_revise.model={SERVER}, bogus: 1}}", "'critique_revise.model.bogus': unknown (known: api_key_env,"),
    (f"label.policy={SERVER}, retries: many}}", "'label.policy.retries': expected int, got 'many'"),
    (f"label.feedback_model={SERVER}, backend: ollama}}", "'label.feedback_model.backend': must be openai"),
    ("critique_revise.model={backend: openai, base_urls: [localhost:8000], model: m}",
     "'critique_revise.model.base_urls': 'localhost:8000' is not an http:// or https:// URL"),
    (f"critique_revise.model={SERVER}, api_key_env: sk-123}}", "'critique_revise.model.api_key_env': must be the name"),
    (f"sft.model={SERVER}}}", "'sft.model': a model server cannot be used here"),
    (f"rl.reward_model={SERVER}}}", "'rl.reward_model': a model server cannot be used here"),
])
def test_server_spec_errors_name_the_inner_key(override, fragment):
    with pytest.raises(CaiError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_every_null_model_is_resolved_in_one_place(tmp_path):
    runs = load_config(None, []).run_models(tmp_path)
    assert runs.helpful == runs.sft_base == runs.feedback == runs.direct_feedback == runs.base_snapshot
    assert runs.stage1_feedback == runs.sft_scorer == runs.helpful
    assert runs.evaluate_pm == runs.reward_model
    assert runs.label_policy == runs.pm_base == runs.rl_policy == str(tmp_path / "sft" / "model")
    assert runs.reward_model == str(tmp_path / "pm" / "model")
    set_ = load_config(None, ["sft.model=/m/sft", "label.feedback_model=/m/judge", "rl.feedback_model=/m/direct",
                              "label.policy=/m/policy", "rl.reward_model=/m/pm"]).run_models(tmp_path)
    assert (set_.sft_base, set_.base_snapshot, set_.feedback) == ("/m/sft", "/m/sft", "/m/judge")
    assert (set_.direct_feedback, set_.label_policy, set_.reward_model) == ("/m/direct", "/m/policy", "/m/pm")
    assert set_.rl_policy == str(tmp_path / "sft" / "model")  # still this run's SL-CAI model
    assert set_.sft_scorer == "/m/judge" and set_.stage1_feedback == set_.helpful
    # with no label.feedback_model, SFT's helpful answers are scored by the model SFT trains
    assert load_config(None, ["sft.model=/m/sft"]).run_models(tmp_path).sft_scorer == "/m/sft"
