import pytest

from alignshield.align import ALIGN_METHODS
from alignshield.config import ConfigError, RunConfig, load_config


def test_defaults_are_the_embedded_preset():
    assert load_config() == load_config(preset="embedded")
    assert load_config().finetune.p == 0.1


def test_overrides_are_typed_and_dotted():
    cfg = load_config(overrides=["finetune.p=0.2", "align.method=none", "finetune.train.learning_rate=3e-5"])
    assert cfg.finetune.p == 0.2 and cfg.align.method == "none"
    assert cfg.finetune.train.learning_rate == 3e-5
    assert cfg.finetune.train.max_steps == 60  # sibling defaults survive a partial override


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("finetune:\n  task: agnews\n  n: 100\n")
    cfg = load_config([f], ["finetune.n=50"])
    assert (cfg.finetune.task, cfg.finetune.n) == ("agnews", 50)


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match="finetune.trian: unknown key; did you mean 'train'"):
        load_config(overrides=["finetune.trian.learning_rate=1"])


@pytest.mark.parametrize("p", [-0.1, 1.01])
def test_p_outside_unit_interval(p):
    with pytest.raises(ConfigError, match=r"finetune.p.*\[0, 1\]"):
        load_config(overrides=[f"finetune.p={p}"])


def test_bad_yaml_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("finetune: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config([f])


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="quick"):
        load_config(preset="nope")


def test_method_params_are_validated_strictly():
    cfg = RunConfig(align={"method": "sft", "params": {"rho": 2}})
    with pytest.raises(ConfigError, match="align.params.rho: unknown key"):
        cfg.align.resolved_params(ALIGN_METHODS)
