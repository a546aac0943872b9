"""``sae`` and ``transcoder``: sparse dictionaries trained with SAELens, spliced in with no error term.

**SAE.** At one hook point, with activations ``x`` in R^d (a residual-stream vector, ``d = d_model``,
or the attention outputs ``hook_z`` of the targeted heads flattened, ``d = len(heads) * d_head``):

    f(x) = sigma((x - b_dec) W_enc + b_enc)         (codes, [d_sae] = width latents)
    x  ->  x_hat = f(x) W_dec + b_dec

with ``sigma`` the architecture's activation: ReLU (``standard``), ReLU of the ``top_k`` largest
pre-activations and 0 elsewhere (``topk``), or ``h * [h > theta]`` with a learned threshold per latent
(``jumprelu``). The proxy replaces ``x`` by ``x_hat`` with **no error term**, so everything downstream
reads the dictionary's reconstruction.

**Transcoder.** For the MLP of layer L, the same encoder reads the MLP's input ``u``
(``blocks.L.ln2.hook_normalized``; ``blocks.L.hook_resid_mid`` in a model without normalization) and
the decoder predicts the MLP's output, which it replaces:

    blocks.L.hook_mlp_out  ->  f(u) W_dec + b_dec,   f(u) = sigma(u W_enc + b_enc)

SAELens 6 ships transcoders for inference only (``Transcoder``, ``SkipTranscoder``,
``JumpReLUTranscoder``, loaded from disk); its trainer always reconstructs its own input. So the
transcoder here is SAELens' training SAE of the chosen architecture with the MLP output as target:
each training batch holds ``[u, y]`` side by side, the encoder reads ``u``, and the MSE (and TopK's
auxiliary loss) compares the decoder's output with ``y``, still inside SAELens' ``SAETrainer``.

**Training** (both): SAELens' ``SAETrainer`` and SAELens' losses (standard: MSE + ``l1`` times the L1
norm of the decoder-norm-weighted codes; topk: MSE + the auxiliary loss that makes dead latents
predict the residual; jumprelu: MSE + ``l1`` times the straight-through L0), Adam, gradient norm
clipped at 1. Data: an iterator over the collected training activations, a fresh permutation per
epoch from a generator seeded by ``seed``, ``sae_batch`` vectors per step for ``sae_steps`` steps;
learning rate ``sae_lr``, constant, then decayed linearly to 0 over the last fifth of the steps. The
weights are initialised by SAELens from ``seed`` (inside a forked RNG, so the caller's global RNG is
left as it was). While training, inputs are scaled to a mean norm of sqrt(d), the scale SAELens'
hyperparameters assume (a transcoder's input and output each by its own factor); afterwards the
scales, and TopK's decoder norms, are folded into the weights, so the saved tensors act on raw
activations.

``sae_from`` loads a dictionary trained elsewhere and saved by SAELens (``cfg.json`` +
``sae_weights.safetensors``, read with ``SAE.load_from_disk``) instead of training one. SAEs:
standard, topk, jumprelu; transcoders: transcoder, skip_transcoder (``+ u W_skip^T``),
jumprelu_transcoder, jumprelu_skip_transcoder. SAELens' run-time input normalisations
(``layer_norm``, ``constant_norm_rescale``) are applied as SAELens applies them.

Every fitted dictionary also records which latents fired on its training activations, for the
per-split latent statistics of :mod:`illusions.analyses.sparse`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusions.errors import IllusionsError
from illusions.simplifiers.base import (
    FittedHook,
    Proxy,
    ResolvedTargets,
    SimplifierConfig,
    Targets,
    check_positive,
    head_rows,
    off_share,
    register_hook_kind,
    replace_heads,
    require,
)
from illusions.simplifiers.resid import resid_heads, resid_hook_names

if TYPE_CHECKING:
    from illusions.backends import LensModel

ARCHITECTURES = ("standard", "topk", "jumprelu")
SITES = ("resid", "z")
# SAELens architectures that --sae-from reads, and the activation each one uses.
SAVED_SAES = {"standard": "standard", "topk": "topk", "jumprelu": "jumprelu"}
SAVED_TRANSCODERS = {"transcoder": "standard", "skip_transcoder": "standard",
                     "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}
# SAELens applies these input normalisations at run time; the others are folded in after training.
RUNTIME_NORMALIZE = ("layer_norm", "constant_norm_rescale")
_LN_EPS = 1e-5  # SAELens' layer_norm epsilon
_CHUNK = 8192  # rows per pass when encoding many vectors (bounds the [rows, d_sae] codes)


def require_sae_lens() -> Any:
    """The ``sae_lens`` module, or one clear error saying how to install it."""
    from illusions import backends

    try:
        import sae_lens
    except ImportError:
        if backends.uses_bridge():  # SAELens 6 requires transformer-lens<4 and fails to import on 4.x
            raise IllusionsError("the sae and transcoder simplifiers need SAELens 6, which does not run on "
                                 "TransformerLens 4 (installed here, illusions[tl4]); use an environment "
                                 "with pip install 'illusions[sae]' (TransformerLens 3.9)") from None
        raise IllusionsError("the sae and transcoder simplifiers need SAELens 6: "
                             "pip install 'illusions[sae]' (sae-lens>=6,<7)") from None
    return sae_lens


# ---------------------------------------------------------------- the fitted hooks


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DictionaryHook(FittedHook):
    """Encode-decode through a sparse dictionary (maths in the module docstring).

    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``;
    ``threshold [d_sae]`` for jumprelu, ``W_skip [d_in, d_out]`` for skip transcoders;
    ``train_active [d_sae]`` (bool): the latents that fired on the fitting activations.
    ``normalize``: ``none`` or one of SAELens' run-time input normalisations.
    """

    hook_name: str
    heads: tuple[int, ...] | None
    architecture: str
    top_k: int
    normalize: str
    subtract_b_dec: bool
    W_enc: Tensor = dataclasses.field(repr=False)
    b_enc: Tensor = dataclasses.field(repr=False)
    W_dec: Tensor = dataclasses.field(repr=False)
    b_dec: Tensor = dataclasses.field(repr=False)
    train_active: Tensor = dataclasses.field(repr=False)
    threshold: Tensor | None = dataclasses.field(default=None, repr=False)
    W_skip: Tensor | None = dataclasses.field(default=None, repr=False)

    # SAEs map normalised outputs back; SAELens' transcoders do not (their output is another space).
    denormalize_output: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise IllusionsError(f"unknown dictionary architecture {self.architecture!r}; "
                                 f"known: {', '.join(ARCHITECTURES)}")
        if self.architecture == "jumprelu" and self.threshold is None:
            raise IllusionsError(f"the jumprelu dictionary at {self.hook_name} has no threshold")
        if self.architecture == "topk" and not 1 <= self.top_k <= self.d_sae:
            raise IllusionsError(f"top_k={self.top_k} must be in 1..{self.d_sae} (the width)")
        if self.normalize not in ("none", *RUNTIME_NORMALIZE):
            raise IllusionsError(f"unknown input normalisation {self.normalize!r}")

    @property
    def width(self) -> int:
        """Width of the vectors read (``d_in``)."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def forward(self, x: Float[Tensor, "... d_in"]) -> tuple[Float[Tensor, "... d_out"], Float[Tensor, "... d_sae"]]:
        """``(output, codes)`` for input vectors ``x``."""
        like = {"device": x.device, "dtype": x.dtype}
        raw = x
        mean = std = scale = None
        if self.normalize == "layer_norm":
            mean = x.mean(-1, keepdim=True)
            x = x - mean
            std = x.std(-1, keepdim=True)
            x = x / (std + _LN_EPS)
        elif self.normalize == "constant_norm_rescale":
            scale = math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True)
            x = x * scale
        b_dec = self.b_dec.to(**like)
        if self.subtract_b_dec:
            x = x - b_dec
        pre = x @ self.W_enc.to(**like) + self.b_enc.to(**like)  # [... d_sae]
        if self.architecture == "standard":
            codes = pre.relu()
        elif self.architecture == "topk":
            values, index = torch.topk(pre, k=self.top_k, dim=-1, sorted=False)
            codes = torch.zeros_like(pre).scatter_(-1, index, values.relu())
        else:
            assert self.threshold is not None
            codes = pre.relu() * (pre > self.threshold.to(**like))
        out = codes @ self.W_dec.to(**like) + b_dec
        if self.W_skip is not None:
            out = out + raw @ self.W_skip.to(**like)
        if self.denormalize_output:
            if std is not None and mean is not None:
                out = out * std + mean
            if scale is not None:
                out = out / scale
        return out, codes

    def flatten(self, collected: Tensor) -> Float[Tensor, "n d_in"]:
        """Collected activations (``collect``'s layout) as the dictionary's input vectors."""
        if self.heads is None:
            return collected
        return collected[:, list(self.heads)].reshape(collected.shape[0], -1)  # [n, heads * d_head]

    @property
    def stat_names(self) -> list[str]:
        """Hook points whose clean activations give the dictionary's input and its target."""
        return [self.hook_name]

    def input_and_target(self, collected: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(input [n, d_in], target [n, d_out])`` from activations collected at :attr:`stat_names`."""
        x = self.flatten(collected[self.hook_name])
        return x, x

    def new_latent_activation(self, codes: Tensor) -> Tensor:
        """The summed activation of the latents that never fired on the fitting data, per vector
        (``sum_{j not in A} f_j(x)``, ``A`` = ``train_active``): 0 on every fitting vector."""
        never = (~self.train_active.to(codes.device)).to(codes.dtype)  # [d_sae]
        return codes @ never

    def dictionary_input(self, activation: Tensor) -> Tensor:
        """The dictionary's input vectors ``[batch, pos, d_in]`` at its hook point (heads flattened)."""
        if self.heads is None:
            return activation
        x = activation[:, :, head_rows(self.heads, activation.shape[2])]  # [batch pos heads d_head]
        return x.reshape(x.shape[0], x.shape[1], -1)


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SAEHook(DictionaryHook):
    """Replace the activation at ``hook_name`` by the SAE's reconstruction.

    With ``heads`` (``hook_z``, ``[batch, pos, head_index, d_head]``) the targeted heads are read
    flattened, ``[batch, pos, len(heads) * d_head]``, and replaced; other heads pass through. With
    ``heads=None`` the whole ``[batch, pos, d]`` vector is.
    """

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        if self.heads is None:
            return self.forward(activation)[0]
        rows = head_rows(self.heads, activation.shape[2])
        x = activation[:, :, rows]  # [batch pos heads d_head]
        batch, pos, heads, d = x.shape
        new = self.forward(x.reshape(batch, pos, heads * d))[0].view(batch, pos, heads, d)
        return replace_heads(activation, rows, new, axis=2)

    def signal_sites(self) -> list[tuple[str, Any]]:
        """Two signals from the activation ``x`` the SAE reads: ``recon_error``, the share of ``x``
        the reconstruction misses, ``|x - x_hat| / |x|``, and ``new_latents``, the summed activation
        of latents never active on the fitting data (:meth:`new_latent_activation`)."""
        return [(self.hook_name, self.signals)]

    def signals(self, activation: Tensor) -> dict[str, Tensor]:
        x = self.dictionary_input(activation)
        out, codes = self.forward(x)
        return {"recon_error": off_share(x, out), "new_latents": self.new_latent_activation(codes)}


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TranscoderHook(DictionaryHook):
    """Replace ``blocks.L.hook_mlp_out`` by the transcoder's prediction from ``input_name``.

    It acts at two hook points, so :attr:`hook_pairs` gives both: one that reads the MLP's input
    and computes the prediction (leaving the input unchanged), and ``hook_name``, which returns it.
    """

    input_name: str = ""

    denormalize_output: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.input_name:
            raise IllusionsError(f"the transcoder at {self.hook_name} names no input hook")
        # The prediction made at the input hook, waiting for the output hook of the same pass.
        object.__setattr__(self, "_pending", {})

    def hook_pairs(self) -> list[tuple[str, Any]]:
        return [(self.input_name, self.read_input), (self.hook_name, self)]

    def signal_sites(self) -> list[tuple[str, Any]]:
        """``new_latents`` at the MLP's input (:meth:`DictionaryHook.new_latent_activation`). The
        reconstruction error needs the MLP's true output, which the signal does not compare with."""
        return [(self.input_name, lambda x: {"new_latents": self.new_latent_activation(self.forward(x)[1])})]

    def read_input(self, activation: Tensor, hook: Any = None) -> Tensor:
        self._pending["out"] = self.forward(activation)[0]
        return activation

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        out = self._pending.pop("out", None)
        if out is None or out.shape != activation.shape:
            raise IllusionsError(f"the transcoder at {self.hook_name} ran without its input hook "
                                 f"{self.input_name} (attach proxy.fwd_hooks, which hold both)")
        return out.to(activation.dtype)

    @property
    def stat_names(self) -> list[str]:
        return [self.input_name, self.hook_name]

    def input_and_target(self, collected: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return collected[self.input_name], collected[self.hook_name]


def encode_all(hook: DictionaryHook, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(output [n, d_out], active [n, d_sae] bool)`` for many input vectors, in chunks."""
    outs, active = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], _CHUNK):
            out, codes = hook.forward(x[start : start + _CHUNK])
            outs.append(out)
            active.append(codes != 0)
    return torch.cat(outs), torch.cat(active)


def _fit_summary(hook: DictionaryHook, x: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
    """The latents that fire on the fitting data, and the fit's reconstruction figures."""
    out, active = encode_all(hook, x)
    out, active, target = out.cpu().double(), active.cpu(), target.cpu().double()  # float64: not on MPS
    err = float((out - target).pow(2).sum())
    var = float((target - target.mean(0)).pow(2).sum())
    fired = active.any(0)
    return fired, {
        "explained_variance": 1.0 - err / var if var > 0 else float("nan"),
        "l0": float(active.sum(1).double().mean()),
        "dead_fraction": float((~fired).double().mean()),
    }


# ---------------------------------------------------------------- training with SAELens


def _batches(data: Tensor, batch: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless batches of ``batch`` rows of ``data``: a fresh permutation per epoch (drawn on the CPU,
    so any device gives the same order), last partial batch dropped (SAETrainer counts samples in
    whole batches)."""
    n = data.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen).to(data.device)
        for start in range(0, n - batch + 1, batch):
            yield data[perm[start : start + batch]]


_TRANSCODER_CLASSES: dict[type, type] = {}


def _transcoder_class(base: type) -> type:
    """SAELens training SAE class ``base`` turned into a transcoder trainee (module docstring)."""
    if base in _TRANSCODER_CLASSES:
        return _TRANSCODER_CLASSES[base]

    class TargetTranscoder(base):  # type: ignore[misc, valid-type]
        """Batches are ``[u, y]``: the encoder reads ``u``, the losses compare the output with ``y``."""

        def __init__(self, cfg: Any, use_error_term: bool = False) -> None:
            super().__init__(cfg, use_error_term)
            self.mse_loss_fn = self._target_mse

        def process_sae_in(self, sae_in: Tensor) -> Tensor:
            return super().process_sae_in(sae_in[..., : self.cfg.d_in])

        def _target_mse(self, preds: Tensor, batch: Tensor) -> Tensor:
            return torch.nn.functional.mse_loss(preds, batch[..., self.cfg.d_in :], reduction="none")

        def calculate_aux_loss(self, step_input: Any, feature_acts: Tensor, hidden_pre: Tensor,
                               sae_out: Tensor) -> Any:
            target = dataclasses.replace(step_input, sae_in=step_input.sae_in[..., self.cfg.d_in :])
            return super().calculate_aux_loss(step_input=target, feature_acts=feature_acts,
                                              hidden_pre=hidden_pre, sae_out=sae_out)

    TargetTranscoder.__name__ = TargetTranscoder.__qualname__ = f"Transcoder{base.__name__}"
    _TRANSCODER_CLASSES[base] = TargetTranscoder
    return TargetTranscoder


def _mean_norm_scale(x: Tensor) -> float:
    """The factor that gives ``x`` a mean norm of sqrt(d) (1 for all-zero data)."""
    mean_norm = float(x.float().norm(dim=-1).mean())
    return math.sqrt(x.shape[-1]) / mean_norm if mean_norm > 0 else 1.0


def dictionary_bytes(d_in: int, width: int, batch: int, n: int) -> int:
    """Bytes that training a ``width``-latent dictionary on ``n`` vectors of ``d_in`` needs at least.

    The encoder and decoder (``2 d_in width + width + d_in`` floats) with their gradients and Adam's
    two moments (16 bytes a parameter); a batch's pre-activations, latents and their gradients
    (``4 batch width`` floats); and the fit summary's record of which latents fired on each fitting
    vector (``n width`` bytes).
    """
    return 16 * (2 * d_in * width + width + d_in) + 16 * batch * width + n * width


def check_dictionary_fits(d_in: int, width: int, batch: int, n: int, device: Any) -> None:
    """Refuse a dictionary too wide to train in ``device``'s memory, before SAELens allocates it (the
    bound is the device's whole memory, :func:`illusions.devices.memory_bytes`)."""
    from illusions.devices import gigabytes, memory_bytes

    have, need = memory_bytes(device), dictionary_bytes(d_in, width, batch, n)
    if have is None or need <= have:
        return
    widest = max(0, (have - 16 * d_in) // (16 * (2 * d_in + 1) + 16 * batch + n))
    where = "this machine" if torch.device(device).type == "cpu" else f"device {device}"
    raise IllusionsError(f"a dictionary of width {width:,} on {n:,} vectors of {d_in} needs {gigabytes(need)} to "
                         f"train, more than the {gigabytes(have)} of {where}; the width can be at most {widest:,} "
                         "here")


def train_dictionary(
    x: Float[Tensor, "n d_in"],
    target: Float[Tensor, "n d_out"] | None,
    *,
    architecture: str,
    width: int,
    top_k: int,
    l1: float,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """Train an SAE (``target is None``) or a transcoder with SAELens' ``SAETrainer``.

    Training runs on the activations' device; the weights come back on the CPU.

    Returns:
        The inference weights on raw activations (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``,
        ``threshold`` or None) and ``architecture``, ``top_k``, ``normalize``, ``subtract_b_dec``.
    """
    require_sae_lens()  # before anything else: a missing SAELens is the first thing to say
    transcoder = target is not None
    d_in = int(x.shape[1])
    if transcoder and int(target.shape[1]) != d_in:
        raise IllusionsError(f"a transcoder needs input and output of one width, got {d_in} and {target.shape[1]}")
    scale_in = _mean_norm_scale(x)
    scale_out = _mean_norm_scale(target) if transcoder else scale_in
    data = x.float() * scale_in
    if transcoder:
        data = torch.cat([data, target.float() * scale_out], dim=1)  # [n, 2 d]: [u, y]
    sae, cfg = _training_sae(architecture, d_in=d_in, width=width, top_k=top_k, l1=l1, transcoder=transcoder,
                             seed=seed)
    sae = sae.to(x.device)
    _train_steps(sae, data, steps=steps, batch=min(batch, int(x.shape[0])), lr=lr, seed=seed)
    with torch.no_grad():
        w_enc = sae.W_enc.detach().float().cpu().clone()
        b_enc = sae.b_enc.detach().float().cpu().clone()
        w_dec = sae.W_dec.detach().float().cpu().clone()
        b_dec = sae.b_dec.detach().float().cpu().clone()
        threshold = sae.threshold.detach().float().cpu().clone() if architecture == "jumprelu" else None
        if architecture == "topk" and cfg.rescale_acts_by_decoder_norm:
            # Training ranks pre-activations scaled by the decoder norms; fold them in (exact).
            norms = w_dec.norm(dim=-1).clamp_min(1e-8)  # [d_sae]
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
        # Trained on (scale_in * u) -> (scale_out * y): fold both scales into the weights.
        w_enc = w_enc * scale_in
        w_dec = w_dec / scale_out
        b_dec = b_dec / scale_out
    return {"W_enc": w_enc.contiguous(), "b_enc": b_enc, "W_dec": w_dec.contiguous(), "b_dec": b_dec,
            "threshold": threshold, "architecture": architecture,
            "top_k": top_k if architecture == "topk" else 0, "normalize": "none",
            "subtract_b_dec": not transcoder}


def _training_sae(
    architecture: str, *, d_in: int, width: int, top_k: int, l1: float, transcoder: bool, seed: int
) -> tuple[Any, Any]:
    """A fresh SAELens training SAE (or transcoder) of ``architecture`` on the CPU, and its config."""
    lens = require_sae_lens()
    common = {"d_in": d_in, "d_sae": width, "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": not transcoder, "normalize_activations": "none"}
    if architecture == "standard":
        cls, cfg = lens.StandardTrainingSAE, lens.StandardTrainingSAEConfig(**common, l1_coefficient=l1)
    elif architecture == "topk":
        cls, cfg = lens.TopKTrainingSAE, lens.TopKTrainingSAEConfig(**common, k=top_k)
    elif architecture == "jumprelu":
        cls, cfg = lens.JumpReLUTrainingSAE, lens.JumpReLUTrainingSAEConfig(**common, l0_coefficient=l1)
    else:
        raise IllusionsError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    if transcoder:
        cls = _transcoder_class(cls)
    # SAELens initialises from torch's global RNG; seed it only inside a fork, so the caller's
    # global RNG state is exactly as it was. Built on the CPU (the same weights on every device),
    # then moved to the activations' device by the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = cls(cfg)
    return sae, cfg


def _train_steps(sae: Any, data: Tensor, *, steps: int, batch: int, lr: float, seed: int) -> None:
    """``steps`` steps of SAELens' ``SAETrainer`` on ``sae`` (on ``data``'s device), batches of ``batch`` rows of
    ``data`` drawn with ``seed``."""
    lens = require_sae_lens()
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    device = data.device
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr,
        lr_scheduler_name="constant", lr_decay_steps=steps // 5, device=str(device),
        dead_feature_window=max(1, steps // 10), feature_sampling_window=steps + 1,
        logger=lens.LoggingConfig(log_to_wandb=False),
    )
    provider = _batches(data, batch, torch.Generator().manual_seed(seed))
    trainer = SAETrainer(trainer_cfg, sae, provider)
    # SAETrainer.fit() draws a tqdm bar on stderr that cannot be switched off, so drive the trainer
    # through the per-step seams SAELens documents for outside coordinators (its MultiSAETrainer
    # does the same). The data are pre-scaled: there is no norm estimate and nothing for the
    # trainer's scaler to fold.
    while trainer.n_training_samples < trainer_cfg.total_training_samples:
        trainer.maybe_reset_sparsity()
        trainer.step(next(provider))
        trainer.n_training_steps += 1
    trainer.set_final_sae_metadata()


# ---------------------------------------------------------------- dictionaries saved by SAELens


def load_saved(path: str, *, transcoder: bool) -> dict[str, Any]:
    """A dictionary saved by SAELens (``cfg.json`` + safetensors) as inference weights.

    Returns the same keys as :func:`train_dictionary`, plus ``W_skip`` (or None), ``lens_architecture``
    and the ``hook_name``, ``hook_name_out`` and ``hook_head_index`` its metadata gives (or None).
    """
    require_sae_lens()
    from sae_lens import SAE as LensSAE

    directory = Path(path)
    saved_metadata(path)  # a missing or unreadable cfg.json is one clear error
    try:
        lens = LensSAE.load_from_disk(directory, device="cpu", dtype="float32")
    except Exception as exc:  # noqa: BLE001 - SAELens raises many kinds (KeyError, ValueError, safetensors, ...)
        # One line: a state-dict mismatch's message spans several (one per missing or misshapen tensor).
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise IllusionsError(f"sae_from {path}: SAELens could not load it ({detail[:300]})") from None
    arch = lens.cfg.architecture()
    known = SAVED_TRANSCODERS if transcoder else SAVED_SAES
    if arch not in known:
        other = "an SAE" if transcoder else "a transcoder"
        hint = f" ({arch} is {other}; use the {'sae' if transcoder else 'transcoder'} simplifier)" if (
            arch in (SAVED_SAES if transcoder else SAVED_TRANSCODERS)) else ""
        raise IllusionsError(f"sae_from {path} holds a {arch!r} dictionary{hint}; this simplifier reads "
                             f"{', '.join(known)}")
    activation = known[arch]
    with torch.no_grad():
        w_enc = lens.W_enc.detach().float().clone()
        b_enc = lens.b_enc.detach().float().clone()
        w_dec = lens.W_dec.detach().float().clone()
        b_dec = lens.b_dec.detach().float().clone()
        threshold = lens.threshold.detach().float().clone() if activation == "jumprelu" else None
        w_skip = lens.W_skip.detach().float().T.contiguous() if "skip" in arch else None  # [d_in, d_out]
        top_k = int(lens.cfg.k) if activation == "topk" else 0
        if activation == "topk" and getattr(lens.cfg, "rescale_acts_by_decoder_norm", False):
            norms = w_dec.norm(dim=-1).clamp_min(1e-8)
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    normalize = lens.cfg.normalize_activations
    meta = lens.cfg.metadata
    return {"W_enc": w_enc.contiguous(), "b_enc": b_enc, "W_dec": w_dec.contiguous(), "b_dec": b_dec,
            "threshold": threshold, "W_skip": w_skip, "architecture": activation, "top_k": top_k,
            "normalize": normalize if normalize in RUNTIME_NORMALIZE else "none",
            "subtract_b_dec": bool(lens.cfg.apply_b_dec_to_input), "lens_architecture": arch,
            "hook_name": meta.get("hook_name"), "hook_name_out": meta.get("hook_name_out"),
            "hook_head_index": meta.get("hook_head_index")}


def saved_metadata(path: str) -> dict[str, Any]:
    """The ``metadata`` table of a saved dictionary's ``cfg.json`` (read as JSON, without SAELens)."""
    from illusions.config import read_json

    cfg_path = Path(path) / "cfg.json"
    if not cfg_path.is_file():
        raise IllusionsError(f"sae_from {path}: no cfg.json there (SAELens saves a dictionary as cfg.json + "
                             "sae_weights.safetensors)")
    data = read_json(cfg_path)
    if not isinstance(data, dict):
        raise IllusionsError(f"{cfg_path} is not a SAELens configuration (expected a JSON object)")
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    # Older SAELens configurations keep the hook names at the top level.
    keys = ("hook_name", "hook_name_out", "hook_head_index", "architecture")
    return {**{k: data[k] for k in keys if k in data}, **meta}


# ---------------------------------------------------------------- the simplifiers


def mlp_input_name(model: LensModel, layer: int) -> str:
    """The MLP's input in block ``layer``: after its LayerNorm when there is one."""
    name = f"blocks.{layer}.ln2.hook_normalized"
    return name if name in model.hook_dict else f"blocks.{layer}.hook_resid_mid"


@dataclasses.dataclass(frozen=True)
class _Dictionary(SimplifierConfig):
    """Options shared by :class:`SAE` and :class:`Transcoder` (see their docstrings)."""

    data_free: ClassVar[bool] = False
    sweep_param: ClassVar[str] = "width"

    width: int = 256
    architecture: str = "topk"
    top_k: int = 16
    l1: float = 1.0
    sae_steps: int = 1000
    sae_batch: int = 1024
    sae_lr: float = 1e-3
    seed: int = 0
    sae_from: str = ""
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("width", "sae_steps", "sae_batch"):
            check_positive(getattr(self, name), name)
        if self.architecture not in ARCHITECTURES:
            raise IllusionsError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        check_positive(self.top_k, "top_k")
        for name in ("l1", "sae_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise IllusionsError(f"{name} must be a number, got {value!r}")
        if self.l1 < 0:
            raise IllusionsError(f"l1 must be at least 0, got {self.l1}")
        if self.sae_lr <= 0:
            raise IllusionsError(f"sae_lr must be positive, got {self.sae_lr}")
        defaults = {f.name: f.default for f in dataclasses.fields(_Dictionary)}
        if self.sae_from:
            given = [f"{k}={getattr(self, k)!r}" for k in ("width", "architecture", "top_k", "l1", "sae_steps",
                                                          "sae_batch", "sae_lr")
                     if getattr(self, k) != defaults[k]]
            if given:
                raise IllusionsError(f"sae_from loads a trained dictionary, whose cfg.json fixes its width and "
                                     f"architecture and which is not trained again; drop {', '.join(given)}")
            self._check_saved_kind()  # fail before any work when there is nothing (fitting) to load
            return
        if self.architecture == "topk":
            check_positive(self.top_k, "top_k", self.width, "the dictionary width")
            if self.l1 != defaults["l1"]:
                raise IllusionsError(f"l1 is the sparsity coefficient of standard and jumprelu; topk's sparsity is "
                                     f"top_k (got l1={self.l1})")
        elif self.top_k != defaults["top_k"]:
            raise IllusionsError(f"top_k applies to the topk architecture, not {self.architecture} "
                                 f"(got top_k={self.top_k}); its sparsity is l1")

    def _check_saved_kind(self) -> None:
        """Refuse a saved dictionary of the other family (an SAE for a transcoder) or of no known kind."""
        arch = saved_metadata(self.sae_from).get("architecture")
        mine, other = ((SAVED_TRANSCODERS, SAVED_SAES) if isinstance(self, Transcoder) else
                       (SAVED_SAES, SAVED_TRANSCODERS))
        if arch in other:
            use = "sae" if isinstance(self, Transcoder) else "transcoder"
            raise IllusionsError(f"sae_from {self.sae_from} holds a {arch!r} dictionary (use the {use} simplifier); "
                                 f"{self.name} reads {', '.join(mine)}")
        if arch is not None and arch not in mine:
            raise IllusionsError(f"sae_from {self.sae_from} holds a {arch!r} dictionary; {self.name} reads "
                                 f"{', '.join(mine)}")

    # Subclasses: where the dictionary acts in each targeted layer.
    def _sites(self, model: LensModel, targets: ResolvedTargets) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _attention_heads(self, model: LensModel, targets: ResolvedTargets) -> tuple[tuple[int, int], ...]:
        """Heads of the first attention layer that reads what the dictionary replaced."""
        after = {layer + 1 for layer in targets.layers}
        return tuple((layer, head) for layer in sorted(after) if layer < model.cfg.n_layers
                     for head in range(model.cfg.n_heads))

    def _params(self, targets: ResolvedTargets, width: int) -> dict[str, Any]:
        raise NotImplementedError

    def hook_names(self, model: LensModel) -> list[str]:
        require_sae_lens()  # before any activation is collected
        targets = self.targets.resolve(model)
        return list(dict.fromkeys(name for site in self._sites(model, targets) for name in site["collect"]))

    def fit(self, model: LensModel, activations: dict[str, Tensor]) -> Proxy:
        targets = self.targets.resolve(model)
        sites = self._sites(model, targets)
        if self.sae_from and len(sites) > 1:
            raise IllusionsError(f"sae_from loads one dictionary, but {len(sites)} layers are targeted; give one layer")
        transcoder = isinstance(self, Transcoder)
        hooks: list[DictionaryHook] = []
        fits: dict[str, dict[str, float]] = {}
        n_fitted = 0
        for site in sites:
            x = site["flatten"](require(activations, site["input"], self.name))  # [n, d_in]
            y = require(activations, site["hook"], self.name) if transcoder else None  # [n, d_out]
            n_fitted = int(x.shape[0])
            if self.sae_from:
                weights = load_saved(self.sae_from, transcoder=transcoder)
                self._check_saved(site, weights, int(x.shape[1]))
            else:
                check_dictionary_fits(int(x.shape[1]), self.width, min(self.sae_batch, n_fitted), n_fitted, x.device)
                weights = train_dictionary(
                    x, y, architecture=self.architecture, width=self.width, top_k=self.top_k, l1=self.l1,
                    steps=self.sae_steps, batch=self.sae_batch, lr=self.sae_lr, seed=self.seed)
            tensors = {k: weights[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
            config = {k: weights[k] for k in ("architecture", "top_k", "normalize", "subtract_b_dec")}
            if transcoder:
                hook: DictionaryHook = TranscoderHook(
                    hook_name=site["hook"], heads=None, input_name=site["input"], **config, **tensors,
                    W_skip=weights.get("W_skip"), train_active=torch.zeros(weights["W_enc"].shape[1], dtype=torch.bool))
            else:
                hook = SAEHook(hook_name=site["hook"], heads=site["heads"], **config, **tensors,
                               train_active=torch.zeros(weights["W_enc"].shape[1], dtype=torch.bool))
            fired, summary = _fit_summary(hook, x, y if transcoder else x)
            hooks.append(dataclasses.replace(hook, train_active=fired))
            fits[site["hook"]] = summary
        widths = {h.d_sae for h in hooks}
        if len(widths) != 1:
            raise IllusionsError(f"the dictionaries of one proxy must have one width, got {sorted(widths)}")
        info: dict[str, Any] = {"n_fitted": n_fitted, "fit": fits, "sae_lens_version": require_sae_lens().__version__}
        if self.sae_from:
            info["loaded_from"] = self.sae_from
            info["architecture"] = hooks[0].architecture
        return Proxy(
            simplifier=self.name,
            sweep_param=self.sweep_param,
            params=self._params(targets, widths.pop()),
            hooks=tuple(hooks),
            attention_heads=self._attention_heads(model, targets),
            info=info,
        )

    def _check_saved(self, site: dict[str, Any], weights: dict[str, Any], width: int) -> None:
        """Refuse a loaded dictionary that was trained on another hook point or shape."""
        where = f"sae_from {self.sae_from}"
        d_in = int(weights["W_enc"].shape[0])
        if d_in != width:
            raise IllusionsError(f"{where} reads {d_in}-wide vectors, but {site['input']} gives {width}-wide ones"
                                 + (" (the flattened targeted heads)" if site["heads"] else ""))
        if int(weights["W_dec"].shape[1]) != int(site["out_width"]):
            raise IllusionsError(f"{where} writes {weights['W_dec'].shape[1]}-wide vectors, but {site['hook']} "
                                 f"is {site['out_width']}-wide")
        trained_on, out = weights.get("hook_name"), weights.get("hook_name_out")
        if isinstance(self, Transcoder):
            if out and out != site["hook"]:
                raise IllusionsError(f"{where} predicts {out}, but this analysis replaces {site['hook']}")
            return  # its input hook was taken from its cfg.json by _sites
        if trained_on and trained_on != site["hook"]:
            raise IllusionsError(f"{where} was trained on {trained_on}, but this analysis replaces {site['hook']} "
                                 "(choose the layer and site it was trained on)")
        head = weights.get("hook_head_index")
        if head is not None and site["heads"] != (int(head),):
            raise IllusionsError(f"{where} was trained on head {head} alone; target that head (heads={head})")


@dataclasses.dataclass(frozen=True)
class SAE(_Dictionary):
    """A sparse autoencoder on the residual stream or on the attention output, per targeted layer.

    Maths, training and loading in the module docstring. Attributes:
        width: latents (dictionary size).
        architecture: ``standard``, ``topk`` or ``jumprelu`` (SAELens' training architectures).
        top_k: active latents per vector (topk only).
        l1: sparsity coefficient (standard: L1; jumprelu: L0; not used by topk).
        sae_steps, sae_batch, sae_lr: optimisation steps, vectors per step, learning rate.
        seed: SAELens' initialisation and the order of the training batches.
        site: ``resid`` (``blocks.L.hook_<targets.resid>``) or ``z`` (``blocks.L.attn.hook_z`` of the
            targeted heads, flattened).
        sae_from: a directory holding a dictionary saved by SAELens, used instead of training one.
        targets: layers, ``resid`` (site resid) and heads (site z).
    """

    name: ClassVar[str] = "sae"
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "heads", "resid")

    site: str = "resid"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.site not in SITES:
            raise IllusionsError(f"site must be one of {', '.join(SITES)}, got {self.site!r}")
        if self.site == "resid" and self.targets.heads not in ((), "all"):
            raise IllusionsError("heads apply to the attention-output site (site z); a residual-stream SAE "
                                 "reads whole vectors")

    def _sites(self, model: LensModel, targets: ResolvedTargets) -> list[dict[str, Any]]:
        if self.site == "resid":
            names = resid_hook_names(model, targets)
            return [{"layer": layer, "hook": name, "input": name, "collect": [name], "heads": None, "flatten": lambda a: a, "out_width": model.cfg.d_model}
                    for layer, name in zip(targets.layers, names, strict=True)]
        heads = targets.heads
        out = []
        for layer in targets.layers:
            name = f"blocks.{layer}.attn.hook_z"
            if name not in model.hook_dict:
                raise IllusionsError(f"this model has no {name}")
            out.append({"layer": layer, "hook": name, "input": name, "collect": [name], "heads": heads, "out_width": len(heads) * model.cfg.d_head,
                        "flatten": lambda a, h=heads: a[:, list(h)].reshape(a.shape[0], -1)})
        return out

    def _attention_heads(self, model: LensModel, targets: ResolvedTargets) -> tuple[tuple[int, int], ...]:
        if self.site == "resid":
            return resid_heads(model, targets)
        return super()._attention_heads(model, targets)

    def _params(self, targets: ResolvedTargets, width: int) -> dict[str, Any]:
        params = {**self.to_dict(), "width": width}
        params["targets"] = ({"layers": list(targets.layers), "resid": targets.resid} if self.site == "resid"
                             else {"layers": list(targets.layers), "heads": list(targets.heads)})
        return params


@dataclasses.dataclass(frozen=True)
class Transcoder(_Dictionary):
    """A sparse transcoder in place of each targeted layer's MLP (module docstring).

    Attributes as for :class:`SAE` (no ``site``; heads and ``resid`` play no part).
    """

    name: ClassVar[str] = "transcoder"
    target_keys: ClassVar[tuple[str, ...]] = ("layers",)

    def _sites(self, model: LensModel, targets: ResolvedTargets) -> list[dict[str, Any]]:
        if model.cfg.attn_only or not model.cfg.d_mlp:
            raise IllusionsError("this model is attention-only: there is no MLP for a transcoder to replace")
        saved = saved_metadata(self.sae_from).get("hook_name") if self.sae_from else None
        out = []
        for layer in targets.layers:
            name, inp = f"blocks.{layer}.hook_mlp_out", mlp_input_name(model, layer)
            if saved and saved != inp:
                # A transcoder trained elsewhere may read another point of the block (e.g. hook_resid_mid).
                if saved not in model.hook_dict or not saved.startswith(f"blocks.{layer}."):
                    raise IllusionsError(f"sae_from {self.sae_from} reads {saved}, which is not a hook of block "
                                         f"{layer} of this model")
                inp = saved
            out.append({"layer": layer, "hook": name, "input": inp, "collect": [inp, name], "heads": None,
                        "flatten": lambda a: a, "out_width": model.cfg.d_model})
        return out

    def _params(self, targets: ResolvedTargets, width: int) -> dict[str, Any]:
        params = {**self.to_dict(), "width": width}
        params["targets"] = {"layers": list(targets.layers)}
        return params
