"""What a training run is set up from and leaves behind, and the checks made before it starts.

- :class:`TrainConfig`, a recipe's ``[train]`` table;
- the run directory's files (``trainer.json``, ``optimizer.safetensors`` beside the model's two) and
  their formats, :func:`read_trainer_state` and :func:`load_history` that read them back;
- the checks :func:`illusions.training.train` makes before any work: the output folder
  (:func:`check_out_dir`), the task against the model (:func:`check_task_fits`) and the model's size
  against the device's memory (:func:`check_model_size`).

The loop itself is :mod:`illusions.training`; the batches it draws, :mod:`illusions.training_batches`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.config import Config, read_json
from illusions.errors import IllusionsError
from illusions.io import OutputKind, check_creatable, ownership, recover_dir
from illusions.models import CONFIG_FILE, WEIGHTS_FILE, ModelConfig, check_checkpoint_files

if TYPE_CHECKING:
    from illusions.tasks.base import Split, Task

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"
TRAINER_FORMAT = "illusions-trainer/1"
OPTIMIZER_FORMAT = "illusions-optimizer/1"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, TRAINER_FILE)
TRAINING_RUN = OutputKind("training-run", "a training run", legacy_required=(TRAINER_FILE, CONFIG_FILE, WEIGHTS_FILE),
                          legacy_files=RUN_FILES, legacy_marker=(TRAINER_FILE, "format", TRAINER_FORMAT))

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


def is_run_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a training run written by :func:`illusions.training.train`."""
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


def check_task_fits(task: Task, model_cfg: ModelConfig, train_split: Split) -> None:
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


def check_model_size(cfg: ModelConfig, device: Any = "cpu") -> None:
    """Refuse a recipe's model whose training state cannot fit in ``device``'s memory, before allocating
    it: :func:`illusions.weights.check_model_size` with the training state counted (float32 weights,
    gradients and AdamW's two moments)."""
    from illusions.weights import check_model_size as check_size

    check_size(cfg, what="the recipe's model", training=True, device=device,
               remedy="make the recipe's [model] smaller")


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


def load_history(out_dir: Path) -> dict[str, list[Any]]:
    """The loss curve and evaluation history recorded in a run directory's ``trainer.json``."""
    state = read_json(Path(out_dir) / TRAINER_FILE)
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise IllusionsError(f"{Path(out_dir) / TRAINER_FILE} is not an illusions trainer state")
    return state["history"]
