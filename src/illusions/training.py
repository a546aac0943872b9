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

The configs, the run directory's files and the checks made before training live in
:mod:`illusions.training_setup`; the batches and evaluation subsets in :mod:`illusions.training_batches`.
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

from illusions.errors import IllusionsError
from illusions.io import atomic_write_json, staged_dir
from illusions.models import WEIGHTS_FILE, ModelConfig

# The run's configs, files and checks, and its batches, live in modules of their own; their names
# are re-exported here, where callers have always imported them from.
from illusions.training_batches import EVAL_SUBSET_SEED as EVAL_SUBSET_SEED
from illusions.training_batches import WALL_KEEP_STREAM as WALL_KEEP_STREAM
from illusions.training_batches import BatchStream, eval_subset_rows, training_rows
from illusions.training_batches import length_grouped_batches as length_grouped_batches
from illusions.training_setup import (
    OPTIMIZER_FILE,
    OPTIMIZER_FORMAT,
    TRAINER_FILE,
    TRAINER_FORMAT,
    TRAINING_RUN,
    TrainConfig,
    check_model_size,
    check_out_dir,
    check_task_fits,
    read_trainer_state,
)
from illusions.training_setup import RUN_FILES as RUN_FILES
from illusions.training_setup import is_run_dir as is_run_dir
from illusions.training_setup import load_history as load_history

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float, Int
    from torch import Tensor

    from illusions.tasks.base import Split, Task


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
        subset_accuracies: the same on the fixed evaluation subsets (:func:`~illusions.training_batches.eval_subset_rows`).
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
        check_task_fits(task, model_cfg, self.train_split)
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
