"""The `lmcore` command line as a user meets it: validation errors name the key, exit code 2."""

from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import ROOT

runner = CliRunner()


def _all_output(result) -> str:
    return result.output + (getattr(result, "stderr", "") or "")


def test_params_prints_resolved_values():
    result = runner.invoke(app, ["params", "--root", str(ROOT), "--set", "pretrain.lr=3e-4"])
    assert result.exit_code == 0, _all_output(result)
    assert "lr: 0.0003" in result.output
    assert "registered_model: lmcore-base" in result.output


def test_unknown_param_key_is_an_error_naming_it():
    result = runner.invoke(app, ["params", "--root", str(ROOT), "--set", "pretrain.lrr=1"])
    assert result.exit_code == 2
    assert "unknown key 'pretrain.lrr' (did you mean 'pretrain.lr'?)" in _all_output(result)


def test_mistyped_value_is_an_error_naming_it():
    result = runner.invoke(app, ["run", "pretrain", "--root", str(ROOT), "--set", "pretrain.max_steps=lots"])
    assert result.exit_code == 2
    assert "key 'pretrain.max_steps'" in _all_output(result)


def test_unknown_stage_is_an_error():
    result = runner.invoke(app, ["run", "finetune", "--root", str(ROOT)])
    assert result.exit_code == 2
    assert "unknown stage 'finetune'" in _all_output(result)
