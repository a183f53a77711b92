"""params.yaml and every shipped profile validate; bad keys and types are errors naming the key."""

from pathlib import Path

import pytest
import yaml

from lmcore.config import ParamsError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_params_validate(path):
    params = load_params(path)
    assert params.pretrain.model.n_embd % params.pretrain.model.n_head == 0
    assert params.collect.sources


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_unknown_key_is_named_with_a_hint(tmp_path):
    data = base()
    data["pretrain"]["learning_rate"] = 0.1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(path) in str(err.value)
    assert "unknown key 'pretrain.learning_rate'" in str(err.value)


def test_unknown_nested_key_suggests_the_close_one():
    data = base()
    data["pretrain"].setdefault("model", {})["n_embed"] = 64
    with pytest.raises(ParamsError, match=r"unknown key 'pretrain.model.n_embed' \(did you mean 'pretrain.model.n_embd'\?\)"):
        params_from_dict(data)


def test_unknown_section_is_named():
    data = base()
    data["pretrian"] = {"lr": 1}
    with pytest.raises(ParamsError, match="unknown key 'pretrian'"):
        params_from_dict(data)


@pytest.mark.parametrize(
    "key, value",
    [("pretrain.max_steps", "many"), ("pretrain.lr", "fast"), ("preprocess.split", "sentence"), ("pretrain.model.bias", "maybe")],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ParamsError, match=f"key '{key}'"):
        params_from_dict(base(), overrides=[f"{key}={value}"])


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "LMCORE_JUDGE_API_KEY", "GROQ_API_KEY", "SERVICE_API_TOKEN", "HF_TOKEN"])
def test_judge_api_key_env_takes_the_name_of_an_api_key(name):
    assert params_from_dict(base(), overrides=[f"judge.api_key_env={name}"]).judge.api_key_env == name


@pytest.mark.parametrize(
    "name", ["HOME", "PATH", "MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GITHUB_TOKEN",
             "openai_api_key", "API_KEY", "_API_KEY", "OPENAI_API_KEY_FILE", "X_API_KEY;rm"],
)
def test_judge_api_key_env_refuses_other_variables(name):
    """Its value goes to the judge URL as a bearer token: a params file must not be able to send any variable there."""
    with pytest.raises(ParamsError, match="key 'judge.api_key_env': .*not the name of an API key variable"):
        params_from_dict(base(), overrides=[f"judge.api_key_env={name}"])


def test_overrides_apply_and_yaml_floats_parse():
    params = params_from_dict(base(), overrides=["pretrain.lr=3e-4", "pretrain.max_steps=7", "evaluate.top_k=null"])
    assert params.pretrain.lr == pytest.approx(3e-4)
    assert params.pretrain.max_steps == 7
    assert params.evaluate.top_k is None


def test_override_of_unknown_key_is_an_error():
    with pytest.raises(ParamsError, match="unknown key 'pretrain.lrr'"):
        params_from_dict(base(), overrides=["pretrain.lrr=1"])
    with pytest.raises(ParamsError, match="not of the form key=value"):
        params_from_dict(base(), overrides=["pretrain.lr"])


def test_cross_field_rules():
    with pytest.raises(ParamsError, match="divisible"):
        params_from_dict(base(), overrides=["pretrain.model.n_head=3"])
    data = base()
    del data["collect"]["sources"][0]["sha256"]
    with pytest.raises(ParamsError, match="needs its 'sha256'"):
        params_from_dict(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_fingerprint_is_stable_and_sensitive():
    a, b = params_from_dict(base()), params_from_dict(base())
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != params_from_dict(base(), overrides=["pretrain.lr=0.1"]).fingerprint()


def test_finetune_sections_validate_and_name_bad_keys():
    params = params_from_dict(base())
    assert params.finetune_classifier.delimiter == "\t" and params.finetune_classifier.labels == ["ham", "spam"]
    assert params.dpo.source.sha256 and params.finetune_instruct.template == "auto"
    with pytest.raises(ParamsError, match=r"unknown key 'finetune_instruct.lora.rnk' \(did you mean 'finetune_instruct.lora.rank'\?\)"):
        params_from_dict(base(), overrides=["finetune_instruct.lora.rnk=4"])
    with pytest.raises(ParamsError, match=r"finetune_classifier.*the rest is the test split"):
        params_from_dict(base(), overrides=["finetune_classifier.train_fraction=0.95"])
    with pytest.raises(ParamsError, match=r"labels must be unique"):
        params_from_dict(base(), overrides=["finetune_classifier.labels=[a, a]"])
    with pytest.raises(ParamsError, match=r"key 'finetune_instruct.template'"):
        params_from_dict(base(), overrides=["finetune_instruct.template=chatml"])
    with pytest.raises(ParamsError, match=r"key 'dpo.on_bad'"):
        params_from_dict(base(), overrides=["dpo.on_bad=ignore"])


def test_instruct_eval_names_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(ParamsError, match=r"instruct_eval.*unknown task 'ifevel'; generative tasks: ifeval, gsm8k"):
        load_params(ROOT / "params.yaml", overrides=["instruct_eval.tasks=[ifevel]"])
    with pytest.raises(ParamsError, match=r"primary_metric 'gsm8k.exact_match_strict_match' is not a metric of the configured "
                                          r"tasks; allowed: ifeval.prompt_level_strict_acc, .*ifeval.inst_level_loose_acc"):
        load_params(ROOT / "params.yaml", overrides=["instruct_eval.tasks=[ifeval]", "instruct_eval.primary_metric=gsm8k.exact_match_strict_match"])
    with pytest.raises(ParamsError, match=r"did you mean 'ifeval.prompt_level_loose_acc'"):
        load_params(ROOT / "params.yaml", overrides=["instruct_eval.primary_metric=ifeval.prompt_level_loose"])
    with pytest.raises(ParamsError, match=r"limit 600 is larger than ifeval's 541 items; at most 541, or null for all"):
        load_params(ROOT / "params.yaml", overrides=["instruct_eval.limit=600"])
    # on the command line: one line naming the key, exit status 2
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["params", "--params", str(ROOT / "params.yaml"), "--set", "instruct_eval.tasks=[mmlu]"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "instruct_eval" in lines[0] and "unknown task 'mmlu'; generative tasks: ifeval, gsm8k" in lines[0]
