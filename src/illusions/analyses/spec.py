"""The analysis spec: every option of an analysis run, validated in one place.

:class:`AnalysisSpec` is what the ``analyze`` / ``sweep`` commands, analysis recipes
(``analyses/*.toml``, read by :func:`load_analysis_recipe`) and the Python API build; nothing
downstream re-checks or re-defaults an option. A spec builds its configured simplifiers once, when it
is made (:attr:`AnalysisSpec.simplifiers`, by :func:`build_simplifiers`); :data:`SWEEPS` lists the
swept parameters with their spec fields and flags. This module imports nothing heavy, so the CLI can read the spec's defaults
at import time; torch arrives only when a simplifier is built.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from illusions import registry
from illusions.config import Config
from illusions.errors import IllusionsError, InvalidOption

# Breakdowns of every metric (``--by``): the scored positions' meta columns a task may provide.
BREAKDOWNS = ("key_depth", "depth", "distance", "length", "category")
# The task whose splits are the spec's ``data`` (illusions.tasks.custom); its breakdowns may also
# name the data's own meta columns, checked when the data is read.
CUSTOM_TASK = "custom"



@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parameter that simplifiers sweep, and everything that names it: the simplifier field
    (a class's ``sweep_param``), the spec field that holds its values, and the two CLI flags.

    Attributes:
        param: the simplifier's field (``rank``); a fitted proxy carries it as ``sweep_param``.
        field: the :class:`AnalysisSpec` field holding its values (``ranks``).
        flag: ``analyze``'s option, one value (``--rank``).
        sweep_flag: ``sweep``'s option, comma-separated values (``--ranks``).
        what: what one value is, for help text (``rank``).
        plural: what several values are (``ranks``).
        methods: the simplifiers that sweep it (``tests/test_spec.py`` checks this against the registry).
        example: a typical sweep (``1,2,4,8,16``).
    """

    param: str
    field: str
    flag: str
    sweep_flag: str
    what: str
    plural: str
    methods: tuple[str, ...]
    example: str


# Every swept parameter, the one list of them: the spec's fields, its checks, build_simplifiers and
# the CLI's options all read it.
SWEEPS = (
    Sweep("rank", "ranks", "--rank", "--ranks", "rank", "ranks", ("svd", "resid-svd", "weight-svd"), "1,2,4,8,16"),
    Sweep("k", "clusters", "--clusters", "--clusters", "number of clusters k", "cluster counts k",
          ("kmeans", "resid-kmeans"), "2,4,8,16,32,64"),
    Sweep("width", "widths", "--width", "--widths", "dictionary size (latents)", "dictionary sizes",
          ("sae", "transcoder"), "64,128,256"),
)
# The spec field that holds the values of each simplifier's swept parameter (``sweep_param``).
SWEEP_FIELDS = {s.param: s.field for s in SWEEPS}
SWEPT_FIELDS = tuple(SWEEP_FIELDS.values())
# The options of the sparse dictionaries (sae, transcoder). They are left out of the spec's JSON while
# they hold their defaults under a simplifier that does not take them, so the runs of every other
# method record the same spec as before these fields existed (and earlier runs still count as current).
SPARSE_FIELDS = ("site", "architecture", "top_k", "l1", "sae_steps", "sae_from")
# The options of the circuit simplifier, left out of the spec's JSON like SPARSE_FIELDS.
CIRCUIT_FIELDS = ("keep", "ablation", "find_circuit")
# Spec fields passed to a simplifier that has a field of the same name; ``seed`` is also the
# evaluation sampling seed, so it is never refused.
SIMPLIFIER_FIELDS = ("centered", "basis", "seed", *SPARSE_FIELDS, *CIRCUIT_FIELDS)
# The most bootstrap resamples: beyond this the ends of a 95% interval move by less than the
# resampling noise of a percentile (sqrt(0.025 * 0.975 / n_boot), 0.05 percentile points here), while
# the resampling weights take n_boot x sequences x 8 bytes.
MAX_N_BOOT = 100_000
# Spec fields that become the simplifier's Targets (spec name -> Targets key).
TARGET_FIELDS = {"layers": "layers", "heads": "heads", "target": "qk", "resid": "resid"}


@dataclasses.dataclass(frozen=True)
class AnalysisSpec(Config):
    """Everything that determines an analysis run, checked once, here.

    The CLI, analysis recipes and the Python API all build this object and nothing else re-checks or
    re-defaults its options: ``__post_init__`` rejects unknown names, values out of range and
    parameters the chosen simplifier does not take (each as an :class:`InvalidOption` naming the
    parameter), and normalises the rest (``max_seqs`` 0 or None means every sequence; a split named
    twice is evaluated once).

    ``ranks`` / ``clusters`` / ``widths`` hold the values of the simplifier's swept parameter (its
    ``sweep_param``: ``rank`` for svd-like methods, ``k`` for k-means ones, ``width`` for sparse
    dictionaries; one row of :data:`SWEEPS` each): one value for
    ``analyze``, several for a sweep, none for the method's default. An empty ``model`` means the
    bundled reference model of ``task``. ``layers`` empty means the last layer, a negative layer counts
    from the end (``-1``: the last; :meth:`resolve_layers` turns it into the index, before the run);
    ``heads`` empty means
    every head of the targeted layers. ``per_head`` makes one proxy per (layer, head) of those, each
    simplifying that head alone, all evaluated in one run (the clean model still runs once per
    split); their labels end in ``@L<layer>H<head>``. ``model`` is a folder (an illusions checkpoint
    or a Hugging Face model folder) or, when no folder of that name exists, a bundled model's name
    (``dyck``, ``dyck:seed1``; see :func:`illusions.bundled.resolve_model`).

    Task ``custom`` analyses data you bring (:mod:`illusions.tasks.custom`): ``data`` is its
    directory of JSONL splits, ``model`` (required) an illusions checkpoint or a Hugging Face model
    folder, ``candidates`` optionally a file of the token ids predictions range over. Every meta
    column of the data is broken down; ``breakdowns`` may name one to insist that it exists.
    ``window`` (default 0: the model's context) and ``stride`` (default 0: the window's text tokens,
    windows side by side) say how a ``text`` line longer than the window is cut
    (:mod:`illusions.tasks.custom`).

    ``checkpoints`` (instead of ``model``) is a training run saved with ``--save-every`` (or its
    ``checkpoints/`` folder): the analysis runs once per step checkpoint
    (:mod:`illusions.analyses.checkpoints`).

    ``widths`` holds the dictionary sizes of ``sae`` / ``transcoder`` (their ``sweep_param`` is
    ``width``); ``site`` (``resid`` or ``z``, sae only), ``architecture`` (standard, topk or
    jumprelu), ``top_k``, ``l1``, ``sae_steps`` and ``sae_from`` (a dictionary saved by SAELens) are
    their options, with their defaults.

    ``match`` names the meta columns of the matched in-distribution control (default ``length``: the
    length-matched control every run has); any other list adds a control matched on every one of those
    columns, e.g. ``("length", "distance", "key_depth")`` (:mod:`illusions.analyses.summary`).

    ``keep`` (component names such as ``L1H0``, ``mlp0``, or ``all`` / ``none``), ``ablation``
    (``mean``, ``resample`` or ``zero``) and ``find_circuit`` (0, or the agreement a greedy circuit
    search keeps on the fitting data) are the options of ``circuit``
    (:mod:`illusions.simplifiers.circuit`).
    """

    task: str = "dyck"
    model: str = ""
    simplifier: str = "svd"
    ranks: tuple[int, ...] = ()
    clusters: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    target: str = "qk"
    resid: str = "resid_pre"
    centered: bool = True
    basis: str = "separate"
    fit_split: str = "train"
    fit_n: int = 1000
    splits: tuple[str, ...] = ()
    max_seqs: int | None = 500
    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 64
    # Padded tokens per evaluation batch at most (rows x width; faithfulness.TOKEN_BUDGET), and never
    # more than 2**27 logits over the vocabulary (faithfulness.batch_tokens).
    token_budget: int = 16384
    breakdowns: tuple[str, ...] = BREAKDOWNS
    per_head: bool = False
    data: str = ""
    candidates: str = ""
    # custom: text lines longer than ``window`` tokens (0: the model's context) are cut into windows
    # ``stride`` tokens apart (0: side by side); illusions.tasks.custom states the rule.
    window: int = 0
    stride: int = 0
    checkpoints: str = ""
    widths: tuple[int, ...] = ()
    site: str = "resid"
    architecture: str = "topk"
    top_k: int = 16
    l1: float = 1.0
    sae_steps: int = 1000
    sae_from: str = ""
    match: tuple[str, ...] = ("length",)
    keep: tuple[str, ...] = ()
    ablation: str = "mean"
    find_circuit: float = 0.0

    def __post_init__(self) -> None:
        for name in (*SWEPT_FIELDS, "layers", "heads", "splits", "breakdowns", "match", "keep"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif not isinstance(value, tuple):
                raise InvalidOption(name, f"must be a list, got {value!r}")
        for name, table in (("task", registry.TASKS), ("simplifier", registry.SIMPLIFIERS)):
            if getattr(self, name) not in table:
                raise InvalidOption(name, f"unknown {name} {getattr(self, name)!r}; known {name}s: "
                                    f"{', '.join(sorted(table))}", whole=True)
        for name in SWEPT_FIELDS:
            _check_ints(name, getattr(self, name), low=1)
        for name in ("layers", "heads"):
            # A negative layer counts from the end (-1: the last), resolved by resolve_layers.
            _check_ints(name, getattr(self, name), low=None if name == "layers" else 0)
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise InvalidOption(name, f"lists a value twice: {list(getattr(self, name))}")
        for name, low in (("fit_n", 1), ("seed", 0), ("n_boot", 10), ("batch_size", 1), ("token_budget", 1)):
            _check_ints(name, (getattr(self, name),), low=low)
        if self.n_boot > MAX_N_BOOT:
            raise InvalidOption("n_boot", f"must be at most {MAX_N_BOOT:,} (more resamples do not sharpen a 95% "
                                f"interval), got {self.n_boot:,}")
        if self.max_seqs is not None:
            _check_ints("max_seqs", (self.max_seqs,), low=0)
            if self.max_seqs == 0:
                object.__setattr__(self, "max_seqs", None)
        object.__setattr__(self, "splits", tuple(dict.fromkeys(self.splits)))
        custom = self.task == CUSTOM_TASK
        if custom and not self.data:
            raise InvalidOption("data", "is required for task 'custom': a directory of JSONL splits (train.jsonl "
                                "and one NAME.jsonl per split to evaluate)")
        if custom and not self.model:
            raise InvalidOption("model", "is required for task 'custom': an illusions checkpoint or a Hugging Face "
                                "model folder")
        if self.checkpoints:
            self._check_checkpoints(custom)
        for name in ("window", "stride"):
            _check_ints(name, (getattr(self, name),), low=0)
            if name == "window" and self.window == 1:
                raise InvalidOption(name, "must be at least 2 (a window of one token predicts nothing), or 0 for "
                                    "the model's context")
        for name in ("data", "candidates", "window", "stride"):
            if getattr(self, name) and not custom:
                raise InvalidOption(name, f"is only for task 'custom' (task {self.task!r} makes its own splits)")
        unknown = [b for b in self.breakdowns if b not in BREAKDOWNS and not (custom and b.isidentifier())]
        if unknown:
            raise InvalidOption("breakdowns", f"has unknown value(s) {', '.join(unknown)}; known: {', '.join(BREAKDOWNS)}")
        self._check_match(custom)
        from illusions.simplifiers.base import targets_read

        cls = registry.get_simplifier(self.simplifier)
        swept_field = SWEEP_FIELDS.get(cls.sweep_param)
        for name in SWEPT_FIELDS:
            if getattr(self, name) and name != swept_field:
                takes = f"its swept parameter is {cls.sweep_param}" if cls.sweep_param else "it sweeps nothing"
                raise InvalidOption(name, f"does not apply to {self.simplifier} ({takes})")
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        default = {f.name: f.default for f in dataclasses.fields(self)}
        for name in SIMPLIFIER_FIELDS:
            if name not in fields and name != "seed" and getattr(self, name) != default[name]:
                raise InvalidOption(name, f"does not apply to {self.simplifier}")
        for name, key in TARGET_FIELDS.items():
            if key not in cls.target_keys and getattr(self, name) != default[name]:
                raise InvalidOption(name, f"does not apply to {self.simplifier} ({targets_read(cls.target_keys)})")
        if self.per_head and "heads" not in cls.target_keys:
            # Checked here: per_head_simplifiers would otherwise place heads on it once the model loads.
            raise InvalidOption("per_head", f"does not apply to {self.simplifier}: it has no heads to place a proxy "
                                f"on ({targets_read(cls.target_keys)})")
        try:
            _ = self.simplifiers  # built once, here: the method's own range checks, before any model is loaded
        except InvalidOption as exc:
            # A simplifier names its own parameter (top_k, width): the spec field that sets it, so the
            # CLI can name the flag the user typed (--k, --width).
            field = SWEEP_FIELDS.get(exc.option, exc.option)
            if exc.whole or field not in default:
                raise InvalidOption(swept_field or "simplifier", str(exc), whole=True) from None
            raise InvalidOption(field, exc.detail) from None
        except IllusionsError as exc:
            raise InvalidOption(swept_field or "simplifier", str(exc), whole=True) from None

    def _check_match(self, custom: bool) -> None:
        """``match``: one or more meta column names, none twice (custom data: any identifier, checked
        against the data's columns when it is read)."""
        if not self.match:
            raise InvalidOption("match", "needs at least one meta column (default: length)")
        if any(not isinstance(m, str) for m in self.match):
            raise InvalidOption("match", f"must be meta column names, got {list(self.match)!r}")
        if len(set(self.match)) != len(self.match):
            raise InvalidOption("match", f"lists a column twice: {', '.join(self.match)}")
        unknown = [m for m in self.match if m not in BREAKDOWNS and not (custom and m.isidentifier())]
        if unknown:
            raise InvalidOption("match", f"has unknown column(s) {', '.join(unknown)}; known: {', '.join(BREAKDOWNS)}")

    def _check_checkpoints(self, custom: bool) -> None:
        from illusions.models import CHECKPOINTS_DIR, list_checkpoints

        if self.model:
            raise InvalidOption("checkpoints", "cannot be combined with model: each checkpoint is the model analysed")
        if custom:
            raise InvalidOption("checkpoints", "is not for task 'custom' (pass each model folder as model instead)")
        if not Path(self.checkpoints).is_dir():
            raise InvalidOption("checkpoints", f"{self.checkpoints} is not a directory (expected a training run "
                                "saved with --save-every, or its checkpoints/ folder)")
        if not list_checkpoints(self.checkpoints):
            raise InvalidOption("checkpoints", f"{self.checkpoints} holds no step checkpoints ({CHECKPOINTS_DIR}/"
                                "step<k>/ folders with config.json and model.safetensors, as `illusions train "
                                "--save-every N` writes)")

    def to_dict(self) -> dict[str, Any]:
        """JSON data of the spec; ``checkpoints`` only when set, ``widths`` and the sparse dictionary
        options (:data:`SPARSE_FIELDS`) and the circuit's (:data:`CIRCUIT_FIELDS`) only when set or taken by
        the simplifier, so runs of one model
        and of the other methods record the same spec as before these fields existed (and earlier runs
        still count as current); ``match`` likewise only when it is not the default."""
        out = super().to_dict()
        if not self.checkpoints:
            del out["checkpoints"]
        if self.match == ("length",):  # the default control: recorded as before the field existed
            del out["match"]
        for name in ("window", "stride"):  # custom data's windows: recorded only when given
            if not getattr(self, name):
                del out[name]
        fields = {f.name for f in dataclasses.fields(registry.get_simplifier(self.simplifier))}
        default = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("widths", *SPARSE_FIELDS, *CIRCUIT_FIELDS):
            taken = name in fields or (name == "widths" and "width" in fields)
            if not taken and getattr(self, name) == default[name]:
                del out[name]
        return out

    @functools.cached_property
    def simplifiers(self) -> tuple[Any, ...]:
        """The configured simplifiers, one per swept value (one with the method's default when none
        is given), built once when the spec is made (:func:`build_simplifiers`). A per-head spec's are
        placed on each head by :func:`per_head_simplifiers` once the model's shape is known."""
        return tuple(build_simplifiers(self))

    def resolve_layers(self, n_layers: int) -> AnalysisSpec:
        """This spec with its layers as indices of a model of ``n_layers`` blocks: a negative layer
        counts from the end (``-1``: the last), so runs, names and ``config.json`` record the index the
        analysis used. The spec itself when every layer is already an index.

        Raises:
            InvalidOption: a layer outside ``-n_layers..n_layers-1`` (naming the valid range), or one
                layer given twice (``-1`` and its index).
        """
        n = int(n_layers)
        bad = [layer for layer in self.layers if not -n <= layer < n]
        if bad:
            raise InvalidOption("layers", f"layer {bad[0]} does not exist; this model has {n} layer"
                                f"{'s' if n != 1 else ''}: 0..{n - 1}, or -{n}..-1 counting from the end", whole=True)
        if all(layer >= 0 for layer in self.layers):
            return self
        resolved = tuple(sorted(layer + n if layer < 0 else layer for layer in self.layers))
        if len(set(resolved)) != len(resolved):
            twice = next(layer for layer in resolved if resolved.count(layer) > 1)
            raise InvalidOption("layers", f"layers {', '.join(map(str, self.layers))} name layer {twice} twice on "
                                f"this model of {n} layers (-1 is layer {n - 1}); give each layer once", whole=True)
        return self.replace(layers=resolved)

    def sweep_values(self) -> tuple[str, tuple[int, ...]]:
        """The swept parameter's name (the simplifier's ``sweep_param``) and the values given."""
        param = registry.get_simplifier(self.simplifier).sweep_param
        field = SWEEP_FIELDS.get(param)
        return (param, getattr(self, field)) if field and getattr(self, field) else (param, ())

    def default_name(self) -> str:
        param, values = self.sweep_values()
        tag = "" if not values else f"-{param}{'_'.join(str(v) for v in values)}"
        layer = "" if not self.layers else "-L" + "_".join(str(x) for x in self.layers)
        over = "-checkpoints" if self.checkpoints else ""
        return f"{self.task}-{self.simplifier}{tag}{layer}{over}"


def _check_ints(name: str, values: tuple[Any, ...], *, low: int | None) -> None:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidOption(name, f"must be {'an integer' if len(values) == 1 else 'integers'}, got {value!r}")
        if low is not None and value < low:
            raise InvalidOption(name, f"must be at least {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class AnalysisRecipe:
    """An analysis recipe (``analyses/*.toml``): a name, what it shows, and its spec.

    The file holds top-level ``name``, ``description`` and ``claim`` strings, an optional
    ``over_training`` boolean and an ``[analysis]`` table of :class:`AnalysisSpec` fields; unknown keys
    are refused, naming the file. ``over_training = true`` asks ``illusions reproduce`` to run the
    analysis on every step checkpoint shipped for a bundled family (``assets/checkpoints/``) instead
    of on its final models.
    """

    name: str
    description: str
    claim: str
    spec: AnalysisSpec
    source: str
    over_training: bool = False


def load_analysis_recipe(path: Path | str) -> AnalysisRecipe:
    """Read an analysis recipe; a missing file, bad TOML or unknown key is one clear error."""
    from illusions.config import read_toml

    path = Path(path)
    data = read_toml(path)
    unknown = sorted(set(data) - {"name", "description", "claim", "over_training", "analysis"})
    if unknown:
        raise IllusionsError(f"unknown key(s) {', '.join(unknown)} in {path}; expected name, description, "
                             "claim, over_training and an [analysis] table")
    over_training = data.get("over_training", False)
    if not isinstance(over_training, bool):
        raise IllusionsError(f"over_training in {path} must be true or false, got {over_training!r}")
    if "analysis" not in data:
        raise IllusionsError(f"recipe {path} has no [analysis] table")
    try:
        spec = AnalysisSpec.from_dict(data["analysis"], source=str(path))
    except InvalidOption as exc:
        raise IllusionsError(f"{exc} in {path}") from None
    texts = {k: data.get(k, "") for k in ("name", "description", "claim")}
    for key, value in texts.items():
        if not isinstance(value, str):
            raise IllusionsError(f"{key} in {path} must be a string")
    if over_training and (spec.model or spec.checkpoints):
        raise IllusionsError(f"recipe {path} sets over_training, which runs on the shipped step checkpoints; "
                             "it cannot also name a model or checkpoints")
    from illusions.io import check_name

    # The name becomes a folder (runs/<name>, <out>/<name>/seed<N>): one plain path component.
    name = (check_name(texts["name"], f"name in {path}") if texts["name"]
            else check_name(path.stem, f"recipe {path} has no name, and its file name"))
    return AnalysisRecipe(name, texts["description"], texts["claim"], spec, str(path), over_training)


def build_simplifiers(spec: AnalysisSpec) -> list[Any]:
    """One configured simplifier per swept value (one with the method's default when none is given).

    Each gets the spec fields it has (``centered``, ``basis``, ``seed``, the sparse dictionary
    options), the target keys it reads (its ``target_keys``) and, under its ``sweep_param``, one value
    of the spec field that :data:`SWEEPS` names for it. A spec holds the result as
    :attr:`AnalysisSpec.simplifiers` (built once, when it is made); call that instead.
    """
    cls = registry.get_simplifier(spec.simplifier)
    fields = {f.name for f in dataclasses.fields(cls)}
    common = {name: getattr(spec, name) for name in SIMPLIFIER_FIELDS if name in fields}
    targets = {key: getattr(spec, name) for name, key in TARGET_FIELDS.items()
               if key in cls.target_keys and key not in ("layers", "heads")}
    place = {"layers": spec.layers, "heads": spec.heads if "heads" in cls.target_keys else ()}
    field = SWEEP_FIELDS.get(cls.sweep_param)
    swept = [{cls.sweep_param: v} for v in getattr(spec, field)] if field else []
    return [registry.make_simplifier(spec.simplifier, **v, **common, **place, **targets) for v in swept or [{}]]


def per_head_simplifiers(spec: AnalysisSpec, n_layers: int, n_heads: int) -> list[Any]:
    """The spec's simplifiers for a model of ``n_layers`` blocks of ``n_heads`` heads: with
    ``spec.per_head``, each placed on one (layer, head) of the targeted layers (default the last) and
    heads (default all), per swept value; otherwise :attr:`AnalysisSpec.simplifiers` as they are."""
    if not spec.per_head:
        return list(spec.simplifiers)
    from illusions.simplifiers.base import Targets

    where = Targets(layers=spec.layers, heads=spec.heads).resolve_shape(n_layers, n_heads)
    return [dataclasses.replace(s, targets=dataclasses.replace(s.targets, layers=(layer,), heads=(head,)))
            for s in spec.simplifiers for layer in where.layers for head in where.heads]
