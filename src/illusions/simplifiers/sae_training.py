"""The SAELens side of the ``sae`` and ``transcoder`` simplifiers: train a dictionary with SAELens'
``SAETrainer`` (:func:`train_dictionary`), refuse one too wide for the device's memory first
(:func:`check_dictionary_fits`), and load one SAELens saved (:func:`load_saved`, :func:`saved_metadata`).

The only module that imports ``sae_lens``, and only inside its functions. The maths, the training
recipe and the loading rules are in :mod:`illusions.simplifiers.sae`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from illusions.errors import IllusionsError
from illusions.simplifiers.sae_hooks import ARCHITECTURES, RUNTIME_NORMALIZE
from illusions.weights import check_finite

# SAELens architectures that --sae-from reads, and the activation each one uses.
SAVED_SAES = {"standard": "standard", "topk": "topk", "jumprelu": "jumprelu"}
SAVED_TRANSCODERS = {"transcoder": "standard", "skip_transcoder": "standard",
                     "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}


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
    """SAELens training SAE class ``base`` turned into a transcoder trainee (:mod:`illusions.simplifiers.sae`)."""
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
    from sae_lens.constants import SAE_WEIGHTS_FILENAME

    directory = Path(path)
    saved_metadata(path)  # a missing or unreadable cfg.json is one clear error
    try:
        lens = LensSAE.load_from_disk(directory, device="cpu", dtype="float32")
    except Exception as exc:  # noqa: BLE001 - SAELens raises many kinds (KeyError, ValueError, safetensors, ...)
        # One line: a state-dict mismatch's message spans several (one per missing or misshapen tensor).
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise IllusionsError(f"sae_from {path}: SAELens could not load it ({detail[:300]})") from None
    # A NaN weight would turn every reconstruction into NaN and the metrics into plausible chance-level numbers.
    check_finite(directory / SAE_WEIGHTS_FILENAME, dict(lens.named_parameters()), what="a dictionary")
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
