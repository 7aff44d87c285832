"""Field help: ``alignshield explain`` and ``alignshield config --schema`` carry the configs' attribute docstrings."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from alignshield.align import ALIGN_METHODS
from alignshield.cli import app
from alignshield.config import FinetuneConfig, RunConfig, load_config, stable_hash
from alignshield.stages import resolve, stage_dirs

# a config whose resolution does not depend on this machine's hardware (model.dtype=auto would)
PINNED = ["model.dtype=float32", "model.device=cpu"]


def explain(*args: str):
    return CliRunner().invoke(app, ["explain", *args])


def flat(result) -> str:
    """The output on one line: errors go through rich, which wraps at the terminal width."""
    return " ".join(result.output.split())


def test_docstrings_are_field_descriptions():
    assert "harmful" in FinetuneConfig.model_fields["p"].description
    assert "perturbation" in ALIGN_METHODS.get("vaccine").Params.model_fields["rho"].description


def test_descriptions_change_no_hash():
    # descriptions are schema, not data: no dump (what is hashed and saved) carries them
    cfg = resolve(load_config(overrides=PINNED))
    assert RunConfig.model_fields["seed"].description
    dumped = cfg.model_dump(mode="json")
    description = RunConfig.model_fields["seed"].description
    assert description not in json.dumps(dumped)
    assert stable_hash(RunConfig(**dumped).model_dump(mode="json")) == stable_hash(dumped)
    assert stage_dirs(RunConfig(**dumped)) == stage_dirs(cfg)


def test_explain_top_level_field():
    result = explain("seed", "seed=7")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "seed"
    assert "type:    int" in result.output
    assert "default: 7   (the field's own default: 42)" in result.output
    assert "random stream" in result.output


def test_explain_nested_field_with_resolved_value():
    result = explain("finetune.p", "finetune.p=0.3")
    assert result.exit_code == 0, result.output
    assert "type:    float" in result.output and "default: 0.3" in result.output
    assert "Harmful fraction of the fine-tuning data" in result.output
    deep = explain("finetune.train.max_steps")  # redeclared in FinetuneTrain with its own default
    assert deep.exit_code == 0, deep.output
    assert "int | None, > 0" in deep.output and "default: 60" in deep.output and "overrides ``epochs``" in deep.output


def test_explain_method_param_of_the_configured_method():
    result = explain("align.params.rho", "align.method=vaccine")
    assert result.exit_code == 0, result.output
    assert "align.params.rho (a parameter of align method 'vaccine')" in result.output
    assert "type:    float, > 0" in result.output and "default: 2.0" in result.output
    assert "Global L2 norm of the perturbation" in result.output
    changed = explain("align.params.rho", "align.method=vaccine", "align.params.rho=5")
    assert "default: 5.0   (the field's own default: 2.0)" in changed.output
    # the default method (sft) has no rho
    plain = explain("align.params.rho")
    assert plain.exit_code == 2 and "align method 'sft' has no parameters" in flat(plain)


def test_explain_section_lists_fields():
    result = explain("finetune.train")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("finetune.train (FinetuneTrain)")
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ") and line.split()}
    assert "learning_rate" in rows and "0.0001" in rows["learning_rate"] and "Peak learning rate" in rows["learning_rate"]
    assert "Optimizer steps between resumable checkpoints." in rows["checkpoint_every"]
    params = explain("align.params", "align.method=vaccine")
    assert params.exit_code == 0, params.output
    assert "parameters of align method 'vaccine'" in params.output
    assert any(line.split()[:1] == ["refresh_every"] for line in params.output.splitlines())


def test_explain_judge_options():
    section = explain("evaluate.judge_options.embedded", "evaluate.judge_options.embedded.batch_size=8")
    assert section.exit_code == 0, section.output
    assert section.output.startswith("evaluate.judge_options.embedded (parameters of judge 'embedded': EmbeddedParams)")
    rows = {line.split()[0]: line for line in section.output.splitlines() if line.startswith("  ") and line.split()}
    assert "8" in rows["batch_size"].split() and "Harmful probability" in rows["threshold"]
    field = explain("evaluate.judge_options.embedded.threshold")
    assert field.exit_code == 0, field.output
    assert "evaluate.judge_options.embedded.threshold (a parameter of judge 'embedded')" in field.output
    assert "type:    float | None, >= 0 and <= 1" in field.output and "default: null" in field.output
    unset = explain("evaluate.judge_options.hf-classifier")  # its required options unset: the fields' own defaults
    assert unset.exit_code == 0 and "(required)" in unset.output
    typo = explain("evaluate.judge_options.embedded.treshold")
    assert typo.exit_code == 2 and "(a parameter of judge 'embedded'); did you mean 'threshold'?" in flat(typo)
    assert explain("evaluate.judge_options.nojudge").exit_code == 2


def test_explain_unknown_field_suggests():
    result = explain("finetune.trian.learning_rate")
    assert result.exit_code == 2
    assert "unknown config field finetune.trian; did you mean 'train'?" in flat(result)
    param = explain("align.params.rhoo", "align.method=vaccine")
    assert param.exit_code == 2
    assert "align.params.rhoo (a parameter of align method 'vaccine'); did you mean 'rho'?" in flat(param)
    leaf = explain("finetune.p.x")
    assert leaf.exit_code == 2 and "finetune.p is a float, not a section" in flat(leaf)


def test_config_schema_is_json_with_descriptions():
    result = CliRunner().invoke(app, ["config", "--schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    p = schema["$defs"]["FinetuneConfig"]["properties"]["p"]
    assert p["description"] == FinetuneConfig.model_fields["p"].description
    assert "Harmful fraction" in p["description"]
    assert CliRunner().invoke(app, ["config", "--schema", "finetune.p=0.2"]).exit_code == 2
