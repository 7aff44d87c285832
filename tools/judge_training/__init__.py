"""The code behind ``tools/train_judge.py``: it builds, trains and saves the ``embedded`` judge.

families    the kinds of (prompt, answer) pair, their quotas and loss weights, ``Example``
synth       synthetic answers: reformatted, degenerate, prompt echoes, composed refusals
candidates  every candidate pair per family, built from the shipped data sources
dataset     the sources, the split by prompt, the quota draws, the leak checks: ``build_dataset``
metrics     accuracy / AUC / kappa / flag rates, what the judge flags, the threshold choice
train       the classifier (MiniLM + LoRA + linear head), its batches and training loop
evaluate    the held-out evaluation of the trained classifier, printed and returned
export      the saved adapter, head and ``judge.json``, checked by reloading the real judge

``benchmarks/judge_quality.py`` reaches ``dataset`` and ``metrics`` through ``train_judge``.
"""

import importlib
import sys
from pathlib import Path

try:
    importlib.import_module("alignshield.evaluate.judges.embedded")
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
