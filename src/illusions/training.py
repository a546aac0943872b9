"""The training loop for any task: next-token loss, AdamW, checkpoints, and bit-exact resume.

One call, :func:`train`, does the whole job:

1. build the task's splits and a fresh model (``build_model(model_cfg, seed=train_cfg.seed)``);
2. draw length-grouped batches from the ``train`` split (rows of similar length share a batch, so
   padding stays small) with a numpy Generator seeded from ``train_cfg.seed``;
3. minimise next-token cross-entropy with PAD targets ignored, using AdamW, a linear warmup then
   cosine (or linear) decay to a floor, and gradient-norm clipping;
4. every ``eval_every`` steps, score a fixed subset of every split with
   :func:`illusions.scoring.accuracy_on_split`;
5. every ``checkpoint_every`` steps, on Ctrl-C and at the end, write the run directory atomically;
6. with ``save_every``, every that many steps also save a loadable checkpoint of the weights under
   ``checkpoints/step<k>/`` (config.json + model.safetensors, no optimizer state) for analyses over
   training.

A run directory holds fixed files, none of them pickled:

    config.json            the model config and meta (task meta, recipe, step, accuracies)
    model.safetensors      the weights (``illusions.models.load_model`` reads these two)
    optimizer.safetensors  AdamW state, one tensor per ``<parameter name>.<state key>``
    trainer.json           step, data-order RNG state, schedule, loss/eval history
    checkpoints/step<k>/   (with ``save_every``) the weights at step k, each a checkpoint of its own

Resuming reloads all four and continues with the same batches, learning rates and optimizer state, so
an interrupted and resumed run ends with the same weights as an uninterrupted one (bit-exact for a
fixed thread count on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from illusions.config import Config, read_json
from illusions.errors import IllusionsError
from illusions.io import (
    OutputKind,
    atomic_write_json,
    check_creatable,
    ownership,
    recover_dir,
    staged_dir,
)
from illusions.models import CONFIG_FILE, WEIGHTS_FILE, ModelConfig, check_checkpoint_files

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float, Int
    from torch import Tensor

    from illusions.tasks.base import Split, Task

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"
TRAINER_FORMAT = "illusions-trainer/1"
OPTIMIZER_FORMAT = "illusions-optimizer/1"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, TRAINER_FILE)
TRAINING_RUN = OutputKind("training-run", "a training run", legacy_required=(TRAINER_FILE, CONFIG_FILE, WEIGHTS_FILE),
                          legacy_files=RUN_FILES, legacy_marker=(TRAINER_FILE, "format", TRAINER_FORMAT))

# The evaluation subset depends only on the split's size, never on the training seed, so runs with
# different seeds (and the bundled model's test) are scored on the same rows.
EVAL_SUBSET_SEED = 20240101
# Second seed word of the generator that picks the wall-reaching strings training keeps (wall_keep).
WALL_KEEP_STREAM = 0x57A11

_DECAYS = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Optimiser, schedule, batching, evaluation and checkpointing of one training run.

    Attributes:
        steps: number of optimizer updates.
        batch_size: sequences per update.
        lr: peak learning rate, reached at the end of warmup.
        min_lr_ratio: the learning-rate floor as a fraction of ``lr``, reached at the last step.
        warmup_steps: updates of linear warmup from ``lr / warmup_steps``.
        decay: ``cosine`` or ``linear`` decay from ``lr`` to the floor after warmup.
        weight_decay: AdamW decoupled weight decay, applied to matrices (not biases or norms).
        betas: AdamW moment coefficients.
        eps: AdamW epsilon.
        grad_clip: maximum global gradient norm; 0 disables clipping.
        bucket_width: rows whose lengths fall into the same ``bucket_width``-wide bin share batches.
        log_every: steps between points of the recorded loss curve.
        eval_every: steps between evaluations (0: only at the end).
        eval_rows: rows of each split in the fixed evaluation subset.
        eval_batch_size: sequences per evaluation forward pass.
        checkpoint_every: steps between checkpoints (0: only at the end and on Ctrl-C).
        seed: seeds the model initialisation and the batch order.
        wall_keep: the share of the training strings that reach the training split's deepest nesting
            (Dyck: the depth wall, 10) that training uses; the others are left out, chosen with
            ``seed``. 1.0 (the default, left out of :meth:`to_dict`) uses every string. Needs a task
            that reports depths. Evaluation splits are untouched.
    """

    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    decay: str = "cosine"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0
    bucket_width: int = 8
    log_every: int = 25
    eval_every: int = 500
    eval_rows: int = 256
    eval_batch_size: int = 128
    checkpoint_every: int = 1000
    seed: int = 0
    wall_keep: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.wall_keep == 1.0:  # recipes and checkpoints written before the field read back unchanged
            del out["wall_keep"]
        return out

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "bucket_width", "log_every", "eval_rows", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.decay not in _DECAYS:
            raise ValueError(f"decay must be one of {', '.join(_DECAYS)}, got {self.decay!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not self.eps > 0:
            raise ValueError("weight_decay and grad_clip must be 0 or more and eps positive")
        if not 0 < self.wall_keep <= 1:
            raise ValueError(f"wall_keep must lie in (0, 1], got {self.wall_keep}")
        if len(self.betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the loop reports to a ``progress`` callback after every step.

    Attributes:
        step: updates done so far.
        steps: the step budget.
        loss: training loss of the last step.
        lr: learning rate used by the last step.
        tokens_per_s: non-PAD target tokens per second of training steps so far in this session.
        accuracies: the latest evaluation, split name -> accuracy (empty before the first one).
        event: ``step``, ``eval`` (an evaluation just finished), ``checkpoint`` (the run directory was
            written) or ``step_checkpoint`` (a ``--save-every`` checkpoint was saved).
    """

    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_s: float
    accuracies: Mapping[str, float]
    event: str = "step"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        out_dir: the run directory (a loadable model checkpoint plus optimizer and trainer state).
        step: updates done; equals ``train_cfg.steps`` unless ``interrupted``.
        interrupted: True when Ctrl-C stopped the run (a checkpoint was saved; resume continues it).
        accuracies: split name -> ``{"accuracy", "n_positions"}`` on the **full** non-train splits,
            measured at the end; empty when interrupted.
        subset_accuracies: the same on the fixed evaluation subsets (:func:`eval_subset_rows`).
        history: ``{"loss": [[step, loss, lr], ...], "eval": [{"step", "accuracies", ...}, ...]}``.
        train_tokens: non-PAD target tokens trained on in this session.
        train_seconds: wall time of the training steps in this session (evaluation and I/O excluded).
        wall_seconds: wall time of the whole call.
    """

    out_dir: Path
    step: int
    interrupted: bool
    accuracies: dict[str, dict[str, float]]
    subset_accuracies: dict[str, dict[str, float]]
    history: dict[str, list[Any]]
    train_tokens: int
    train_seconds: float
    wall_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else float("nan")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update number ``step`` (0-based): linear warmup, then decay to the floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return floor + (cfg.lr - floor) * (1.0 - frac)


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, bucket_width: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of batches in which rows of similar length travel together.

    Rows are shuffled, stably sorted by length bucket (``length // bucket_width``), cut into batches
    of ``batch_size`` consecutive rows, and the batches are shuffled; every row appears exactly once.

    Args:
        lengths: ``[n]`` true length of every training row.
        batch_size: rows per batch (the last batch of the epoch may be smaller).
        bucket_width: width of the length bins.
        rng: the generator that decides the order (consumed: two permutations).

    Returns:
        The batches, each an array of row indices.
    """
    perm = rng.permutation(lengths.shape[0])
    perm = perm[np.argsort(lengths[perm] // bucket_width, kind="stable")]
    batches = [perm[i : i + batch_size] for i in range(0, perm.shape[0], batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchStream:
    """Endless length-grouped batches whose position can be saved and restored exactly.

    The state is the generator state at the start of the current epoch plus the batch index within
    it, so resuming regenerates the same epoch and skips to the same batch.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, bucket_width: int, seed: int) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.bucket_width = bucket_width
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.index = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_state = self.rng.bit_generator.state
        self.batches = length_grouped_batches(self.lengths, self.batch_size, self.bucket_width, self.rng)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self.index == len(self.batches):
            self.epoch += 1
            self.index = 0
            self._start_epoch()
        batch = self.batches[self.index]
        self.index += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "rng_state": self.epoch_state}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = dict(state["rng_state"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._start_epoch()


def training_rows(task: Any, split: Any, cfg: TrainConfig) -> np.ndarray:
    """The rows of the train split that training draws its batches from: all of them, or with
    ``cfg.wall_keep < 1`` only that share of the strings reaching the split's deepest nesting (chosen
    with a generator of its own, seeded by ``cfg.seed``), beside every other string."""
    from illusions.tasks.base import DataSupport

    n = len(split)
    if cfg.wall_keep == 1.0:
        return np.arange(n)
    refusal = f"wall_keep needs a task that reports nesting depths; task {task.name!r} does not"
    if not isinstance(task, DataSupport):
        raise IllusionsError(refusal)
    deepest = np.empty(n, dtype=np.int64)
    for start in range(0, n, 8192):
        depths = task.depths(split.tokens[start : start + 8192])  # [rows, pos]
        if depths is None:
            raise IllusionsError(refusal)
        deepest[start : start + 8192] = np.asarray(depths).max(axis=-1)
    wall = deepest.max()
    rng = np.random.default_rng([cfg.seed, WALL_KEEP_STREAM])
    keep = (deepest < wall) | (rng.random(n) < cfg.wall_keep)
    return np.flatnonzero(keep)


def eval_subset_rows(n_rows: int, k: int) -> np.ndarray:
    """The fixed evaluation subset of a split with ``n_rows`` rows: ``min(k, n_rows)`` sorted rows."""
    if k >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(EVAL_SUBSET_SEED).choice(n_rows, size=k, replace=False))


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], pad_id: int
) -> Float[Tensor, ""]:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``, PAD targets ignored."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),  # [batch * (pos - 1), d_vocab]
        tokens[:, 1:].flatten(),  # [batch * (pos - 1)]
        ignore_index=pad_id,
    )


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, list[list[str]]]:
    """AdamW with weight decay on matrices only; also the parameter names of each group, in order."""
    import torch

    decay: list[str] = []
    no_decay: list[str] = []
    for name, p in model.named_parameters():
        # Biases and normalisation gains are vectors; decaying them only fights the fit.
        (decay if p.ndim >= 2 else no_decay).append(name)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=cfg.betas, eps=cfg.eps)
    return opt, [decay, no_decay]


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[list[str]]) -> dict[str, torch.Tensor]:
    """The optimizer's state as a flat ``{"<parameter name>.<state key>": tensor}`` mapping."""
    flat_names = [n for group in names for n in group]
    out = {}
    for index, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{flat_names[index]}.{key}"] = value.detach().cpu().contiguous().clone()
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, names: list[list[str]], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Inverse of :func:`optimizer_tensors`: put saved state back into ``opt``."""
    flat_names = [n for group in names for n in group]
    state: dict[int, dict[str, Any]] = {}
    known = set()
    for index, name in enumerate(flat_names):
        entry = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        known.update(f"{name}.{k}" for k in entry)
        if entry:
            state[index] = entry
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise IllusionsError(f"optimizer state names unknown parameters: {', '.join(unknown[:3])}")
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def evaluate(
    model: torch.nn.Module,
    splits: Mapping[str, Split],
    candidates: np.ndarray | None,
    rows: Mapping[str, np.ndarray | None],
    *,
    batch_size: int = 128,
) -> dict[str, dict[str, float]]:
    """Accuracy at the scored positions of the given rows of each split (all rows where None).

    Args:
        model: the model, switched to eval mode for the call.
        splits: split name -> split.
        candidates: the task's candidate token ids for the restricted argmax.
        rows: split name -> rows to score (None: the whole split); splits not named are skipped.
        batch_size: sequences per forward pass.

    Returns:
        split name -> ``{"accuracy": float, "n_positions": int}``.
    """
    from illusions.scoring import accuracy_on_split

    was_training = model.training
    model.eval()
    try:
        out = {}
        for name, index in rows.items():
            acc, n = accuracy_on_split(model, splits[name], candidates, batch_size=batch_size, rows=index)
            out[name] = {"accuracy": acc, "n_positions": n}
        return out
    finally:
        model.train(was_training)


class _StopFlag:
    """Set by SIGINT while training, so Ctrl-C ends the run between two steps, never inside one.

    While ``raising`` is set (the final evaluation, which only reads the model), SIGINT also raises
    ``KeyboardInterrupt`` at once, so a long evaluation does not make Ctrl-C wait.
    """

    def __init__(self) -> None:
        self.requested = False
        self.raising = False

    @contextlib.contextmanager
    def catching_sigint(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            if self.raising:
                self.raising = False
                raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def is_run_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a training run written by :func:`train`."""
    return (Path(directory) / TRAINER_FILE).is_file()


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Fail before any work unless ``out_dir`` can take a new run (absent or empty) or, with
    ``resume``, holds an intact run of ours; and its location must be writable.

    Files a user added to a run folder are kept: every checkpoint carries them over.

    Raises:
        IllusionsError: naming the folder and what is wrong with it.
    """
    out_dir = Path(out_dir)
    recover_dir(out_dir)  # a run whose checkpoint swap was killed halfway is whole again
    own = ownership(out_dir, TRAINING_RUN)
    if resume:
        if own.state != "ours" or not is_run_dir(out_dir):
            raise IllusionsError(f"cannot resume: {out_dir} holds no training run ({TRAINER_FILE} is missing)")
        check_checkpoint_files(out_dir, RUN_FILES)
        check_creatable(out_dir.parent, target=out_dir)
        return
    if own.state == "file":
        raise IllusionsError(f"{own.not_a_folder(str(out_dir))}; choose another --out")
    if own.state not in ("absent", "empty"):
        what = "a training run" if is_run_dir(out_dir) else "other files"
        raise IllusionsError(
            f"{out_dir} already holds {what}; pass --resume to continue a run or choose another --out"
        )
    check_creatable(out_dir.parent if own.state == "absent" else out_dir, target=out_dir)


def _check_task_fits(task: Task, model_cfg: ModelConfig, train_split: Split) -> None:
    if model_cfg.d_vocab != len(task.vocab):
        raise IllusionsError(
            f"model d_vocab is {model_cfg.d_vocab} but task {task.name!r} has {len(task.vocab)} tokens; "
            f"set d_vocab = {len(task.vocab)} in the recipe's [model]"
        )
    longest = int(train_split.lengths.max())
    if longest > model_cfg.n_ctx:
        raise IllusionsError(
            f"training sequences reach {longest} tokens but the model's n_ctx is {model_cfg.n_ctx}; "
            "raise n_ctx in the recipe's [model]"
        )


# Bytes a parameter takes while training in float32: the weight, its gradient and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def model_parameters(cfg: ModelConfig) -> dict[str, int]:
    """The parameter count of the ``HookedTransformer`` that ``cfg`` builds, by part, from the config
    alone (nothing allocated): embedding and unembedding, positional embedding, the blocks.

    TransformerLens 3.9 builds causal masks lazily at the length of the sequences it runs on and
    caches rotary tables for at most its initial cache size, so neither grows with ``n_ctx`` here.
    """
    d, heads = cfg.d_model, cfg.n_heads * cfg.d_head
    norm = 0 if cfg.normalization in ("none", "LNPre", "RMSPre") else (2 if cfg.normalization == "LN" else 1) * d
    attention = 4 * heads * d + 3 * heads + d + norm
    mlp = 0 if cfg.attn_only else 2 * d * cfg.d_mlp + cfg.d_mlp + d + norm
    if not cfg.attn_only and cfg.act_fn == "solu_ln" and cfg.normalization == "LN":
        mlp += 2 * cfg.d_mlp  # the LayerNorm inside SoLU
    learned_positions = cfg.positional_embedding in ("standard", "shortformer")
    return {
        "the embedding and unembedding (d_vocab x d_model)": 2 * cfg.d_vocab * d + cfg.d_vocab + norm,
        "the positional embedding (n_ctx x d_model)": cfg.n_ctx * d if learned_positions else 0,
        "the blocks (n_layers x (attention + MLP))": cfg.n_layers * (attention + mlp),
    }


def torch_device_type(device: Any) -> str:
    """``cpu``, ``cuda`` or ``mps`` of a device name or ``torch.device``."""
    return str(device).split(":")[0]


def check_model_size(cfg: ModelConfig, device: Any = "cpu") -> None:
    """Refuse a model whose training state cannot fit in ``device``'s memory, before allocating it.

    Training in float32 with AdamW holds :data:`TRAINING_BYTES_PER_PARAMETER` bytes a parameter; the
    bound is the device's whole memory (:func:`illusions.devices.memory_bytes`), so a refused size
    could never train there, while an accepted one may still need less to be running beside it.
    """
    from illusions.devices import gigabytes, memory_bytes

    parts = model_parameters(cfg)
    total = sum(parts.values())
    need, have = total * TRAINING_BYTES_PER_PARAMETER, memory_bytes(device)
    if have is not None and need > have:
        biggest = max(parts, key=lambda k: parts[k])
        where = "this machine" if torch_device_type(device) == "cpu" else f"device {device}"
        raise IllusionsError(
            f"the recipe's model has {total:,} parameters ({parts[biggest]:,} in {biggest}): training it "
            f"needs {gigabytes(need)} ({TRAINING_BYTES_PER_PARAMETER} bytes a parameter: weight, gradient and "
            f"AdamW's two moments) but {where} has {gigabytes(have)}; make the recipe's [model] smaller "
            f"(n_layers {cfg.n_layers}, d_model {cfg.d_model}, n_ctx {cfg.n_ctx}, d_vocab {cfg.d_vocab})"
        )


def read_trainer_state(out_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """The saved trainer state of the run in ``out_dir``, checked against the configs to resume with."""
    path = out_dir / TRAINER_FILE
    state = read_json(path)
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise IllusionsError(f"{path} is not an illusions trainer state (expected format {TRAINER_FORMAT!r})")
    for key, cfg in (("model", model_cfg), ("train", train_cfg)):
        saved = state.get(key, {})
        diff = sorted(k for k, v in cfg.to_dict().items() if saved.get(k) != v)
        if diff:
            raise IllusionsError(
                f"cannot resume {out_dir}: its [{key}] settings differ in {', '.join(diff)}; "
                "resume with the recipe and options the run started with"
            )
    return state


class Trainer:
    """One training run: its state (model, optimizer, data order, step, history, timing) and the
    pieces :func:`train` is made of: :meth:`step`, :meth:`evaluate`, :meth:`checkpoint`, :meth:`finish`.

    Build it with :meth:`start`, which checks the run directory and either starts fresh or restores a
    saved run; :meth:`run` then loops until the budget is spent or Ctrl-C asks it to stop.
    """

    def __init__(self, task: Task, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: Path, *,
                 device: str = "cpu", recipe: Mapping[str, Any] | None = None, save_every: int = 0) -> None:
        from illusions.models import build_model

        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
            raise IllusionsError(f"save_every must be 0 (no step checkpoints) or a positive number of steps, "
                                 f"got {save_every!r}")
        self.save_every = save_every

        self.wall_start = time.perf_counter()
        self.task, self.model_cfg, self.cfg, self.out_dir = task, model_cfg, train_cfg, Path(out_dir)
        self.device, self.recipe = device, recipe
        self.splits = task.splits()
        if "train" not in self.splits:
            raise IllusionsError(f"task {task.name!r} has no 'train' split")
        self.train_split = self.splits["train"]
        _check_task_fits(task, model_cfg, self.train_split)
        self.eval_rows = {name: eval_subset_rows(len(s), train_cfg.eval_rows) for name, s in self.splits.items()}
        self.model = build_model(model_cfg, seed=train_cfg.seed, device=device)
        self.opt, self.names = make_optimizer(self.model, train_cfg)
        # The rows training draws from (all, unless wall_keep leaves some of the deepest out).
        self.train_index = training_rows(task, self.train_split, train_cfg)
        self.stream = BatchStream(self.train_split.lengths[self.train_index], train_cfg.batch_size,
                                  train_cfg.bucket_width, train_cfg.seed)
        self.history: dict[str, list[Any]] = {"loss": [], "eval": []}
        self.step_count = 0
        # Steps since the last loss-curve point, saved so a resumed run records the same curve.
        self.loss_sum, self.loss_n = 0.0, 0
        # Kept apart from the history, which must not depend on the machine's speed.
        self.timing_before: dict[str, Any] = {"train_seconds": 0.0, "train_tokens": 0, "wall_seconds": 0.0,
                                              "threads": None}
        self.train_tokens, self.train_seconds = 0, 0.0
        self.last_saved = -1
        self.latest: dict[str, dict[str, float]] = {}
        self.loss_value, self.lr = float("nan"), lr_at(0, train_cfg)
        self.task_meta = task.meta()
        self.interrupted = False  # set by finish() when Ctrl-C ended the run

    @classmethod
    def start(cls, task: Task, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: Path, *,
              resume: bool = False, device: str = "cpu", recipe: Mapping[str, Any] | None = None,
              save_every: int = 0) -> Trainer:
        """A fresh run in an empty ``out_dir``, or (``resume``) the run saved there, restored."""
        out_dir = Path(out_dir)
        check_out_dir(out_dir, resume)
        saved = read_trainer_state(out_dir, model_cfg, train_cfg) if resume else None
        trainer = cls(task, model_cfg, train_cfg, out_dir, device=device, recipe=recipe, save_every=save_every)
        if saved is not None:
            trainer.restore(saved)
        return trainer

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Load the weights, optimizer state, data order and history of the run in ``out_dir``."""
        from safetensors.torch import load_file

        from illusions import backends

        weights = load_file(str(self.out_dir / WEIGHTS_FILE), device=self.device)
        if backends.uses_bridge():  # the file holds HookedTransformer names (models.save_model)
            from illusions.backends import tl4

            tl4.load_weights(self.model, weights, source=str(self.out_dir / WEIGHTS_FILE))
        else:
            self.model.load_state_dict(weights, strict=True)
        load_optimizer_tensors(self.opt, self.names, load_file(str(self.out_dir / OPTIMIZER_FILE), device=self.device))
        self.stream.restore(saved["data"])
        self.history = saved["history"]
        self.step_count = int(saved["step"])
        self.loss_sum, self.loss_n = float(saved["loss_window"][0]), int(saved["loss_window"][1])
        self.timing_before = dict(saved.get("timing", self.timing_before))
        self.last_saved = self.step_count
        self.latest = dict(self.history["eval"][-1]["accuracies"]) if self.history["eval"] else {}
        self.lr = lr_at(self.step_count, self.cfg)

    @property
    def done(self) -> bool:
        return self.step_count >= self.cfg.steps

    def step(self) -> None:
        """One optimisation step on the next length-grouped batch (and the loss curve's bookkeeping)."""
        import torch

        t0 = time.perf_counter()
        rows = self.train_index[next(self.stream)]
        width = int(self.train_split.lengths[rows].max())
        tokens = torch.as_tensor(self.train_split.tokens[rows, :width], device=self.device).long()  # [batch, pos]
        self.lr = lr_at(self.step_count, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        pad_id = self.task.vocab.pad_id
        loss = next_token_loss(self.model(tokens), tokens, pad_id)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.loss_value = float(loss.item())
        self.train_seconds += time.perf_counter() - t0
        self.train_tokens += int((tokens[:, 1:] != pad_id).sum())
        self.step_count += 1
        self.loss_sum += self.loss_value
        self.loss_n += 1
        if self.step_count % self.cfg.log_every == 0 or self.step_count == self.cfg.steps:
            self.history["loss"].append([self.step_count, self.loss_sum / self.loss_n, self.lr])
            self.loss_sum, self.loss_n = 0.0, 0

    def evaluate(self) -> None:
        """Score the fixed evaluation subsets of every split and record them in the history."""
        self.latest = evaluate(self.model, self.splits, self.task.candidates, self.eval_rows,
                               batch_size=self.cfg.eval_batch_size)
        self.history["eval"].append({"step": self.step_count, "accuracies": self.latest})

    def evaluate_full(self) -> dict[str, dict[str, float]]:
        """Accuracy on the whole of every split but ``train`` (the final checkpoint's figures)."""
        full_rows = {name: None for name in self.splits if name != "train"}
        return evaluate(self.model, self.splits, self.task.candidates, full_rows, batch_size=self.cfg.eval_batch_size)

    def timing(self) -> dict[str, Any]:
        import torch

        return {
            "train_seconds": self.timing_before["train_seconds"] + self.train_seconds,
            "train_tokens": self.timing_before["train_tokens"] + self.train_tokens,
            "wall_seconds": self.timing_before["wall_seconds"] + time.perf_counter() - self.wall_start,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            # TF32 in force (train(allow_tf32=True) on CUDA): recorded, since it changes the weights.
            **({"allow_tf32": True} if str(self.device).startswith("cuda")
               and torch.get_float32_matmul_precision() != "highest" else {}),
        }

    def checkpoint(self, extra_meta: Mapping[str, Any] | None = None) -> None:
        """Write the run directory atomically: model + meta, optimizer state, trainer state."""
        from safetensors.torch import save_file

        from illusions.models import save_model

        step, history = self.step_count, self.history
        meta = {
            "task": self.task_meta,
            "recipe": dict(self.recipe) if self.recipe is not None else None,
            "train": self.cfg.to_dict(),
            "step": step,
            # Finished means trained and finally evaluated (a run stopped in its final evaluation is not).
            "finished": step >= self.cfg.steps and "accuracies" in (extra_meta or {}),
            "accuracies_step": history["eval"][-1]["step"] if history["eval"] else None,
            "subset_accuracies": self.latest,
            "timing": self.timing(),
            **(extra_meta or {}),
        }
        trainer = {
            "format": TRAINER_FORMAT,
            "step": step,
            "model": self.model_cfg.to_dict(),
            "train": self.cfg.to_dict(),
            "data": self.stream.state(),
            "scheduler": {"kind": f"warmup+{self.cfg.decay}", "next_step": step, "next_lr": lr_at(step, self.cfg)},
            "param_names": self.names,
            "loss_window": [self.loss_sum, self.loss_n],
            "history": history,
            "timing": self.timing(),
            # Only runs that save step checkpoints record the interval (a resumed run keeps it).
            **({"save_every": self.save_every} if self.save_every else {}),
        }
        with staged_dir(self.out_dir, kind=TRAINING_RUN) as stage:
            save_model(self.model, stage, meta=meta)
            save_file(optimizer_tensors(self.opt, self.names), str(stage / OPTIMIZER_FILE),
                      metadata={"format": OPTIMIZER_FORMAT, "step": str(step)})
            atomic_write_json(stage / TRAINER_FILE, trainer)
        self.last_saved = step

    def step_checkpoint_dir(self, step: int) -> Path:
        """Where the step checkpoint of ``step`` goes: ``<out>/checkpoints/step<step>/``."""
        from illusions.models import CHECKPOINTS_DIR

        return self.out_dir / CHECKPOINTS_DIR / f"step{step}"

    def save_step(self) -> Path:
        """Save the weights now as a loadable checkpoint (``config.json`` + ``model.safetensors``, no
        optimizer state) in :meth:`step_checkpoint_dir`, atomically.

        The step checkpoints live inside the run directory; before the first one, the run directory
        itself is written (a resumable checkpoint), so that it is a run of ours holding them, which
        every later run checkpoint carries over.
        """
        from illusions.models import save_model

        if self.last_saved < 0:
            self.checkpoint()
        history = self.history
        meta = {
            "task": self.task_meta,
            "recipe": dict(self.recipe) if self.recipe is not None else None,
            "train": self.cfg.to_dict(),
            "step": self.step_count,
            "finished": False,
            "step_checkpoint": {"step": self.step_count, "steps": self.cfg.steps, "save_every": self.save_every},
            "accuracies_step": history["eval"][-1]["step"] if history["eval"] else None,
            "subset_accuracies": self.latest,
        }
        return save_model(self.model, self.step_checkpoint_dir(self.step_count), meta=meta)

    def finish(self, stop: _StopFlag | None = None) -> dict[str, dict[str, float]]:
        """End the run: a finished one is evaluated (subsets and full splits) and checkpointed with
        its full-split accuracies; an interrupted one is checkpointed where it stopped.

        With ``stop`` (the flag :meth:`run` installs), Ctrl-C during the last step or the final
        evaluation ends the run at once: the trained weights are checkpointed, :attr:`interrupted`
        is set, and resuming the run only evaluates it.
        """
        if not self.done or (stop is not None and stop.requested):
            return self._stopped()
        latest, n_evals = self.latest, len(self.history["eval"])
        try:
            if stop is not None:
                stop.raising = True  # the evaluation only reads the model: safe to cut short
            self.evaluate()
            full = self.evaluate_full()
        except KeyboardInterrupt:
            if stop is None:
                raise
            self.latest = latest
            del self.history["eval"][n_evals:]
            return self._stopped()
        finally:
            if stop is not None:
                stop.raising = False
        self.checkpoint({"accuracies": full, "eval_rows": self.cfg.eval_rows})
        return full

    def _stopped(self) -> dict[str, dict[str, float]]:
        self.interrupted = True
        if self.last_saved != self.step_count:
            self.checkpoint()
        return {}

    def progress(self, event: str) -> Progress:
        acc = {k: v["accuracy"] for k, v in self.latest.items()}
        tps = self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0
        return Progress(self.step_count, self.cfg.steps, self.loss_value, self.lr, tps, acc, event)

    def run(self, progress: Callable[[Progress], None] | None = None) -> TrainResult:
        """Step until the budget is spent or Ctrl-C; evaluate and checkpoint on their intervals."""
        report = progress or (lambda _: None)
        cfg = self.cfg
        self.model.train()
        stop = _StopFlag()
        with stop.catching_sigint():
            while not self.done and not stop.requested:
                self.step()
                report(self.progress("step"))
                if cfg.eval_every and self.step_count % cfg.eval_every == 0 and not self.done:
                    self.evaluate()
                    report(self.progress("eval"))
                if self.save_every and self.step_count % self.save_every == 0:
                    self.save_step()
                    report(self.progress("step_checkpoint"))
                if cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0 and not self.done:
                    self.checkpoint()
                    report(self.progress("checkpoint"))
            full = self.finish(stop)
            if not self.interrupted:
                report(self.progress("checkpoint"))
        return TrainResult(
            out_dir=self.out_dir,
            step=self.step_count,
            interrupted=self.interrupted,
            accuracies=full,
            subset_accuracies=self.latest,
            history=self.history,
            train_tokens=self.train_tokens,
            train_seconds=self.train_seconds,
            wall_seconds=time.perf_counter() - self.wall_start,
        )


def train(
    task: Task,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: Callable[[Progress], None] | None = None,
    device: str = "cpu",
    recipe: Mapping[str, Any] | None = None,
    allow_tf32: bool = False,
    save_every: int = 0,
) -> TrainResult:
    """Train a fresh model on ``task`` (or resume the run in ``out_dir``) and checkpoint it there.

    Args:
        task: any :class:`~illusions.tasks.base.Task`; its ``train`` split is trained on and every
            split is evaluated.
        model_cfg: the architecture; ``d_vocab`` must equal the task's vocabulary size.
        train_cfg: optimiser, schedule, batching, evaluation and checkpoint settings.
        out_dir: the run directory; must be absent or empty unless ``resume``.
        resume: continue the run saved in ``out_dir`` (same configs required).
        progress: called after every step (and after each evaluation and checkpoint).
        device: torch device for the model and batches: ``cpu``, ``cuda``, ``cuda:N``, ``mps``,
            ``auto`` or a ``torch.device`` (one that is not there raises :class:`IllusionsError`).
        allow_tf32: let CUDA run float32 matmuls in TF32 (off: the numbers match full float32).
        recipe: JSON data saved in the checkpoint's meta (the resolved recipe that made this run).
        save_every: every this many steps, also save the weights as a loadable checkpoint in
            ``<out_dir>/checkpoints/step<k>/`` (config.json + model.safetensors, no optimizer state),
            for analyses over training (``illusions sweep --over-checkpoints``); 0 saves none.

    Returns:
        A :class:`TrainResult`. On Ctrl-C the run is checkpointed and returned with
        ``interrupted=True`` instead of raising.
    """
    from illusions.devices import matmul_precision, resolve_device

    device = resolve_device(device)
    check_model_size(model_cfg, device)
    with matmul_precision(device, allow_tf32):
        trainer = Trainer.start(task, model_cfg, train_cfg, out_dir, resume=resume, device=str(device),
                                recipe=recipe, save_every=save_every)
        return trainer.run(progress)


def load_history(out_dir: Path) -> dict[str, list[Any]]:
    """The loss curve and evaluation history recorded in a run directory's ``trainer.json``."""
    state = read_json(Path(out_dir) / TRAINER_FILE)
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise IllusionsError(f"{Path(out_dir) / TRAINER_FILE} is not an illusions trainer state")
    return state["history"]

