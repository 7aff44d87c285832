"""Methods from other packages: the ``alignshield.methods`` entry-point group (registry.load_plugins)."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest

from alignshield import registry

PLUGIN = textwrap.dedent('''
    from alignshield.align import ALIGN_METHODS
    from alignshield.config import MethodParams
    from alignshield.train import Trainer


    class Params(MethodParams):
        scale: float = 1.0


    @ALIGN_METHODS.register("demo-align")
    class DemoAlign(Trainer):
        """Plain SFT with its loss scaled: a defence defined outside alignshield."""

        Params = Params

        def compute_loss(self, model, batch):
            return super().compute_loss(model, batch) * self.params.scale
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "demo_plugin.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint(name="demo", value="demo_plugin", group=registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [point] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield
    from alignshield.align import ALIGN_METHODS

    ALIGN_METHODS._entries.pop("demo-align", None)
    sys.modules.pop("demo_plugin", None)


def test_a_plugin_method_registers_validates_and_trains(plugin, make_cfg):
    from alignshield import stages
    from alignshield.align import ALIGN_METHODS
    from alignshield.config import ConfigError

    assert "demo-align" in ALIGN_METHODS.names()
    with pytest.raises(ConfigError, match="scale"):
        stages.validate(make_cfg("align.method=demo-align", "align.params.scale=oops"))
    out = stages.align(make_cfg("align.method=demo-align", "align.params.scale=0.5"))
    assert (out / "adapter").exists()


def test_a_broken_plugin_is_named(tmp_path, monkeypatch):
    point = importlib.metadata.EntryPoint(name="broken", value="no_such_module_xyz", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [point] if kw.get("group") == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    from alignshield.align import ALIGN_METHODS

    with pytest.raises(registry.PluginError, match="'broken' = 'no_such_module_xyz'"):
        ALIGN_METHODS.get("sft")
