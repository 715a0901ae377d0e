"""The run's schema: every section of a stepwise run's config, its presets, and the names they accept.

A run is one ``TrainConfig`` (dataclasses, loaded from a preset, a YAML/JSON file or a mapping, then
``key=value`` overrides, by the generic loader ``retina_scale.utils.typed_config``). Unknown keys, wrong
types and out-of-range values are one-line ``ConfigError``s before any work starts (``check_config``).

The name lists used in several places are defined once here, as ``Literal`` types whose values also
feed the command line's choices: ``STRATEGIES``, ``TUNERS``, ``FORMATS``, ``NORMALIZATIONS``,
``SPLIT_NAMES``, ``PRECISIONS``; so are the DR grades, the smallest usable image side and the ladder's stage names and
sizes (``stage_index``: ``"tiny"`` or ``112`` is stage 1, each later stage doubles the size).

Presets: ``quick`` (the default) is a ladder that finishes on a 2-core CPU in minutes, synthetic data
included: thin nets at 112 -> 224 -> 448, with Adam. ``paper`` is Li et al.'s ladder, 112 -> 224 -> 448 -> 896
at full width with the paper's optimiser (Nesterov momentum 0.9, L2 5e-4, MSE on the grade). ``study`` and
``study-full`` are the resolution study's ladders (CPU and GPU).

Example:
    >>> cfg = load_train_config("quick", overrides=["stages.1.epochs=3", "optim.lr=1e-3"])
    >>> [(s.stage, s.epochs) for s in cfg.stages], cfg.optim.lr
    ([('tiny', 10), ('small', 3), ('median', 5)], 0.001)
    >>> stage_index("median"), stage_size(stage_index("median")), stage_name(4)
    (3, 448, 'large')
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import field
from typing import Literal, Optional, Union, get_args

from retina_scale.utils.errors import UserError
from retina_scale.utils.typed_config import ConfigError, load_config

# ----------------------------------------------------------------------------- names used everywhere
GRADES = (0, 1, 2, 3, 4)
"""The International Clinical DR scale: 0 none, 1 mild (microaneurysms only), 2 moderate, 3 severe,
4 proliferative."""
NUM_GRADES = len(GRADES)
MIN_SIDE = 64
"""An image smaller than this on a side cannot hold a gradable fundus (cache and serving graph)."""
MAX_PIXELS = 40_000_000
"""Default pixel limit (width x height, read from the header before decoding) of the cache and the serving
graph: fundus cameras make 5-25 Mpx photos and a 36-Mpx full-frame camera back still fits; a bigger image
(a decompression bomb: a 20000x20000 PNG is 1.4 MB on disk) is refused before it costs any memory."""

StrategyName = Literal["auto", "default", "one_device", "mirrored", "multi_worker"]
TunerName = Literal["random", "bayesian", "hyperband"]
DataFormat = Literal["eyepacs", "aptos", "folders", "csv"]
Normalization = Literal["none", "graham"]
SplitName = Literal["train", "val", "test"]
Selection = Literal["val_kappa_optimized", "val_kappa", "val_loss"]
Precision = Literal["float32", "mixed_bfloat16", "auto"]
HeadPooling = Literal["rms", "max", "attention"]
AuxLoss = Literal["none", "ordinal", "classification"]
STRATEGIES = get_args(StrategyName)
TUNERS = get_args(TunerName)
FORMATS = get_args(DataFormat)
NORMALIZATIONS = get_args(Normalization)
SPLIT_NAMES = get_args(SplitName)
SELECTIONS = get_args(Selection)
PRECISIONS = get_args(Precision)
HEAD_POOLINGS = get_args(HeadPooling)
AUX_LOSSES = get_args(AuxLoss)

# ------------------------------------------------------------------------------- the ladder's rungs
BASE_SIZE = 112
"""Input size of the first stage; each later stage doubles it."""

STAGE_NAMES = ("tiny", "small", "median", "large", "xlarge")
"""Names of stages 1-5; the paper has the first four. Later stages are called ``stage6``, ..."""


def stage_index(stage) -> int:
    """The 1-based stage of a name (``"tiny"``, ``"stage6"``) or an input size (``448``, ``"448"``).

    Raises:
        ValueError: naming the accepted names and sizes.
    """
    accepted = (
        f"accepted: {', '.join(STAGE_NAMES)} (or stage6, stage7, ...), or an input size "
        f"{BASE_SIZE} * 2**k ({', '.join(str(BASE_SIZE * 2**k) for k in range(len(STAGE_NAMES)))}, ...)"
    )
    if isinstance(stage, str):
        key = stage.strip().lower()
        if key in STAGE_NAMES:
            return STAGE_NAMES.index(key) + 1
        if key.startswith("stage") and key[5:].isdigit() and int(key[5:]) >= 1:
            return int(key[5:])
        if not key.isdigit():
            raise UserError(f"unknown stage {stage!r}; {accepted}")
        stage = int(key)
    if isinstance(stage, int) and not isinstance(stage, bool):
        ratio = stage / BASE_SIZE
        if stage >= BASE_SIZE and ratio == int(ratio) and (int(ratio) & (int(ratio) - 1)) == 0:
            return int(math.log2(ratio)) + 1
        raise UserError(f"no stage is designed for input size {stage}; {accepted}")
    raise UserError(f"unknown stage {stage!r}; {accepted}")


def stage_name(index: int) -> str:
    return STAGE_NAMES[index - 1] if index <= len(STAGE_NAMES) else f"stage{index}"


def stage_size(index: int) -> int:
    return BASE_SIZE * 2 ** (index - 1)


# --------------------------------------------------------------------------- data-side sections
@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How to turn a photo into the cached squares.

    Args:
        normalize: ``"none"`` (colours as photographed) or ``"graham"`` (local average colour subtracted).
        mask: set everything outside the disc's circle to black (``"none"``) - Graham's own mask (grey
            outside 90 % of the radius) is always applied with ``"graham"``.
        reduced_decode: allow ``IMREAD_REDUCED_COLOR_*`` decoding when the sizes allow it.
        min_side: smallest accepted image side in pixels.
        max_pixels: largest accepted width x height, checked from the header before decoding (not part of
            :meth:`as_dict`: it refuses images but changes no cached pixel).
    """

    normalize: str = "none"
    mask: bool = True
    reduced_decode: bool = True
    min_side: int = MIN_SIDE
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.min_side < 8:
            raise UserError(f"min_side must be >= 8, got {self.min_side}")
        check_max_pixels(self.max_pixels, self.min_side)

    def as_dict(self) -> dict:
        return {"normalize": self.normalize, "mask": self.mask}


def check_max_pixels(value, min_side: int = MIN_SIDE) -> int:
    """``value`` if it is a valid pixel limit: an integer from ``min_side**2`` to 2**30 (OpenCV's own limit)."""
    if isinstance(value, bool) or not isinstance(value, int) or not min_side * min_side <= value <= 2**30:
        raise UserError(f"max_pixels must be an integer from {min_side * min_side} to {2**30} "
                        f"(width x height; default {MAX_PIXELS}); got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """o_O's augmentation (o_O: the team whose Kaggle 2015 solution this project follows; see
    ``docs/RESULTS.md`` and the README); ``strength`` (0 = none, 1 = o_O) scales zoom, translation and
    colour noise.

    Args:
        strength: multiplier of the zoom's log-range, the translation and the colour noise.
        rotation: random rotation over the full 0-360 degrees.
        flip: random horizontal and vertical flips.
        zoom: largest zoom factor per axis (each axis draws log-uniformly from 1/zoom to zoom).
        translation: largest shift as a fraction of the side (o_O: 40 px at 512).
        color_sigma: standard deviation of the PCA colour coefficients, in units of each axis's standard
            deviation.
    """

    strength: float = 1.0
    rotation: bool = True
    flip: bool = True
    zoom: float = 1.15
    translation: float = 40 / 512
    color_sigma: float = 0.2

    def __post_init__(self):
        if not 0 <= self.strength < math.inf:
            raise UserError(f"strength must be a finite number >= 0 (augmentation strength), got {self.strength}")
        if not 1 <= self.zoom < math.inf:
            raise UserError(f"zoom must be a finite number >= 1 (a factor such as 1.15), got {self.zoom}")
        if not 0 <= self.translation < 0.5:
            raise UserError(f"translation must be a fraction of the side in [0, 0.5), got {self.translation}")
        if not 0 <= self.color_sigma < math.inf:
            raise UserError(f"color_sigma must be a finite number >= 0, got {self.color_sigma}")


# o_O's schedule of class weights.
O_O_R = 0.975
O_O_W0 = (1.36, 14.4, 6.6, 40.2, 49.6)
O_O_WF = (1.0, 2.0, 2.0, 2.0, 2.0)


@dataclasses.dataclass(frozen=True)
class ResampleConfig:
    """o_O's class rebalancing: per-image draw probability proportional to
    ``w_t = r^t w0 + (1 - r^t) wf`` for the image's grade; ``enabled: false`` for a plain shuffle.

    ``w0`` ~ the inverse class frequencies of EyePACS (so epoch 0 is balanced), drifting at rate ``r`` per epoch
    to ``wf``. ``w0="balanced"`` uses the inverse frequencies of the data at hand instead.

    ``grade1_boost`` (ours, not the paper's or o_O's; issue 14): a factor >= 1 multiplying grade 1's (mild DR's)
    weight ``w_t[1]`` at every epoch, so mild-DR photos are drawn more often; 1 (the default) is o_O's schedule
    unchanged. It needs ``enabled: true`` (a plain shuffle has no weights to boost).
    """

    enabled: bool = True
    r: float = O_O_R
    w0: Union[tuple[float, ...], str] = O_O_W0
    wf: tuple[float, ...] = O_O_WF
    grade1_boost: float = 1.0

    def __post_init__(self):
        if not 0 <= self.r <= 1:
            raise UserError(f"r must be in [0, 1], got {self.r}")
        if not 1 <= self.grade1_boost < math.inf:
            raise UserError(f"grade1_boost must be a finite factor >= 1 (1: o_O's weights), got {self.grade1_boost}")
        if self.grade1_boost != 1 and not self.enabled:
            raise UserError(f"grade1_boost {self.grade1_boost:g} needs enabled: true (a plain shuffle draws no "
                            "weights to boost); set grade1_boost: 1 or enabled: true")
        if isinstance(self.w0, str):
            if self.w0 != "balanced":
                raise UserError(f"w0 must be 5 weights or 'balanced', got {self.w0!r}")
        elif not _weights(self.w0):
            raise UserError(f"w0 must be 5 non-negative weights (finite, not all 0) or 'balanced', got {self.w0}")
        if not _weights(self.wf):
            raise UserError(f"wf must be 5 non-negative weights (finite, not all 0), got {self.wf}")


def _weights(values) -> bool:
    """Five finite non-negative class weights, not all zero (a draw needs some weight)."""
    return len(values) == 5 and all(0 <= v < math.inf for v in values) and sum(values) > 0


@dataclasses.dataclass
class StageConfig:
    """One rung of the ladder.

    Args:
        stage: a stage name (tiny, small, median, large, xlarge, stageN) or input size (112, 224, ...).
        epochs: epochs of (fine-)tuning at this stage.
        lr: base learning rate of this stage (None: ``optim.lr``); scaled by the global batch size if
            ``optim.reference_batch_size`` is set.
        augment_strength: augmentation strength at this stage (None: ``augment.strength``).
        max_seconds: a time budget: no new epoch starts once the stage's epochs (training and
            validation) have taken this many seconds (None: run all ``epochs``). The learning-rate
            schedule still follows ``epochs``. The resolution study's from-scratch run uses it to get
            the same wall-clock time as the whole ladder.
    """

    stage: str = "tiny"
    epochs: int = 5
    lr: Optional[float] = None
    augment_strength: Optional[float] = None
    max_seconds: Optional[float] = None


@dataclasses.dataclass
class ModelConfig:
    """The network (``retina_scale.models.RetinaConvNet``): ``width`` multiplies every layer's units;
    ``min_filters`` (0 = off) is a floor on any convolution block's filters after that, e.g. 16: at width
    0.25 the first block has 8, which oneDNN runs at under half the speed of 16 (issue 13).

    ``head_pooling`` pools the last feature map for the head: ``rms`` (the default and the paper's: RMS
    pooling to a 2x2 grid), or, ours, not the paper's (issue 14: RMS over 3x3 windows dilutes one small
    strong activation), ``max`` (max pooling to the same 2x2 grid) or ``attention`` (a learned softmax
    weighting of the positions, one pooled vector). See ``retina_scale.models.convnet``."""

    width: float = 1.0
    dropout: float = 0.5
    leaky_slope: float = 0.01
    l2: float = 5e-4
    # The initial weights' seed; null (the default) follows the run's ``seed``, so ``seed=1,2,3`` are three
    # different networks, not one network shown three data orders.
    seed: Optional[int] = None
    min_filters: int = 0
    head_pooling: HeadPooling = "rms"

    def __post_init__(self):
        if isinstance(self.min_filters, int) and self.min_filters < 0:
            raise ConfigError(f"model.min_filters must be >= 0 (0: no floor); got {self.min_filters}")
        if self.head_pooling not in HEAD_POOLINGS:
            raise ConfigError(f"model.head_pooling must be one of {', '.join(HEAD_POOLINGS)} (rms: the paper's); "
                              f"got {self.head_pooling!r}")


@dataclasses.dataclass
class LossConfig:
    """The training loss: the squared error of the regression output (the paper's MSE on the grade), plus,
    ours, not the paper's (issue 14), ``aux_weight`` times the loss of an auxiliary output ``head_aux``.

    Args:
        aux: ``none`` (the default: the paper's MSE alone, one output), ``ordinal`` (4 logits, one per
            ``grade > k`` for k = 0..3, each a sigmoid cross-entropy; their mean) or ``classification`` (5
            logits, softmax cross-entropy against the grade).
        aux_weight: the auxiliary term's weight (>= 0; ignored with ``aux: none``). 0 trains the extra head's
            weights on nothing, and the loss is exactly the MSE.

    Prediction, thresholds, evaluation, validation loss and exports use the regression output only.
    """

    aux: AuxLoss = "none"
    aux_weight: float = 1.0

    def __post_init__(self):
        if self.aux not in AUX_LOSSES:
            raise ConfigError(f"loss.aux must be one of {', '.join(AUX_LOSSES)} (none: the paper's MSE alone); "
                              f"got {self.aux!r}")


@dataclasses.dataclass
class OptimConfig:
    """Optimiser: SGD with Nesterov momentum (the paper's), or Adam / AdamW.

    ``lr_drop_at`` (fraction of a stage's epochs) and ``lr_drop_factor`` give o_O's step schedule
    (0.003, then 0.0003); ``reference_batch_size`` turns on linear learning-rate scaling.
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 3e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    lr_drop_at: float = 0.8
    lr_drop_factor: float = 0.1
    reference_batch_size: Optional[int] = None
    clipnorm: Optional[float] = None


@dataclasses.dataclass
class DataConfig:
    """Where the images come from.

    Without ``data``, the embedded synthetic data set is made (or reused) under the run folder:
    ``synth_count`` photos with a fundus ``synth_size`` px across, EyePACS's class prior.
    """

    data: Optional[str] = None
    format: Optional[str] = None
    labels: Optional[str] = None
    image_col: Optional[str] = None
    label_col: Optional[str] = None
    cache: Optional[str] = None
    normalize: Normalization = "none"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    synth_count: int = 600
    synth_size: int = 512
    synth_prior: str = "eyepacs"
    synth_seed: int = 0
    workers: int = 0


@dataclasses.dataclass
class NanPolicy:
    """What a non-finite loss does: reload the last good epoch, multiply the lr by ``lr_factor``."""

    max_events: int = 3
    lr_factor: float = 0.5


@dataclasses.dataclass
class SearchDimension:
    """One extra dimension of the learning-rate search (beside the learning rate itself).

    Either a list of ``values`` (a choice) or a range ``min``..``max`` sampled ``linear`` or ``log``.
    ``batch_size`` takes whole numbers (a range then steps by ``step``, default 1).
    """

    values: Optional[list[float]] = None
    min: Optional[float] = None
    max: Optional[float] = None
    sampling: Literal["linear", "log"] = "linear"
    step: Optional[float] = None


SEARCH_EXTRAS = ("weight_decay", "batch_size", "momentum")


@dataclasses.dataclass
class TTAConfig:
    """Test-time augmentation (``retina_scale.data.tta``): each stage's validation and test scores, and its
    export, average the continuous grade over ``draws`` fixed views of each photo (1: off)."""

    draws: int = 1


MAX_TTA_DRAWS = 256
"""The most views ``tta.draws`` (and ``--tta``) accepts."""


@dataclasses.dataclass
class FusionConfig:
    """Both-eye fusion (``retina_scale.training.fusion``, issue 17): an optional stage after the ladder's top stage.
    A small network grades each eye from its own and its fellow eye's features (the top stage's penultimate
    activations, with their spread over the TTA views when ``tta.draws`` > 1) and both eyes' single-eye grades;
    an eye without a usable fellow keeps the single-eye grade.

    Args:
        enabled: train the stage (and export ``predict_patient``).
        hidden: units of the network's one hidden layer.
        epochs: training epochs; the best by ``selection`` on validation is kept, as in a stage.
        lr: Adam's learning rate.
        batch_size: eyes per training batch.
        dropout: dropout after the hidden layer, in [0, 1).
    """

    enabled: bool = False
    hidden: int = 32
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 64
    dropout: float = 0.2


@dataclasses.dataclass
class TuneConfig:
    """Keras Tuner's search of each stage's learning rate (and of any ``extra`` dimension), before the
    stage's fine-tuning.

    Every trial builds the stage's model and loads the stage's transferred initial weights (the same
    for every trial), then trains ``epochs`` epochs on ``data_fraction`` of each epoch's training draw
    with the trial's learning rate (log-uniform in ``lr_min``..``lr_max``) and extra values. It is
    scored by ``objective`` (kappa at optimised cut-offs by default); ties go to the lower validation loss,
    then to the earlier trial. The
    best trial's learning rate, and its values of the ``extra`` dimensions, then drive the stage. The
    search runs when the trainer is given its hook (``retina_scale.training.tuning.search_hook(config)``,
    as ``retina-scale train`` does); ``retina-scale tune`` searches one stage alone.

    Args:
        enabled: search every stage (off in the presets; ``--tune`` / ``--no-tune``).
        tuner: ``random``, ``bayesian`` or ``hyperband`` (Keras Tuner's oracles).
        max_trials: trials per stage (random, bayesian); hyperband's count follows from ``epochs``.
        lr_min: lowest learning rate tried (> 0: sampled on a log scale).
        lr_max: highest learning rate tried.
        epochs: epochs per trial (hyperband: the most epochs of a trial).
        data_fraction: fraction of each training epoch's steps a trial runs, in (0, 1].
        extra: further dimensions by name (``weight_decay``, ``batch_size``, ``momentum``), e.g.
            ``{weight_decay: {min: 1e-6, max: 1e-3, sampling: log}, batch_size: {values: [16, 32]}}``.
            They are searched with the learning rate, and the stage trains with the best trial's values
            (the config's own value for any dimension not searched).
        seed: the oracle's seed for the first stage (>= 1; Keras Tuner reads 0 as "random"); stage i
            uses ``seed + 10007 * (i - 1)``, so stages draw different rates and every worker of a multi-worker
            run draws the same trials.
        objective: what scores a trial (its last epoch): ``val_kappa_optimized`` (kappa at cut-offs
            optimised on validation, as ``selection`` picks epochs), ``val_kappa`` (fixed cut-offs
            0.5/1.5/2.5/3.5: reads 0 for every trial whose scores have not yet spread past a cut-off)
            or ``val_loss`` (lowest wins).
    """

    enabled: bool = False
    tuner: str = "random"
    max_trials: int = 10
    lr_min: float = 1e-5
    lr_max: float = 1e-1
    epochs: int = 1
    data_fraction: float = 0.25
    extra: dict[str, SearchDimension] = field(default_factory=dict)
    seed: int = 1
    objective: Selection = "val_kappa_optimized"


@dataclasses.dataclass
class TrainConfig:
    """A whole stepwise run."""

    name: str = "quick"
    runs_dir: str = "runs"
    export_dir: str = "saved_models"
    model_name: str = "retina"
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig("tiny", 5)])
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    nan: NanPolicy = field(default_factory=NanPolicy)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    global_batch_size: int = 32
    strategy: StrategyName = "auto"
    seed: int = 0
    export: bool = True
    eval_bootstrap: int = 1000
    # Training arithmetic (resolve_precision): float32, mixed_bfloat16 (bf16 compute, float32 weights, loss
    # and exports) or auto (bf16 where the hardware has it natively).
    precision: Precision = "float32"
    # Which epoch of a stage is kept (its best.npz carries over): the highest validation kappa at cut-offs optimised
    # on validation (steady: the fixed 0.5/1.5/2.5/3.5 kappa swings by 0.2 between epochs), the highest kappa at
    # the fixed cut-offs (the behaviour before), or the lowest validation loss.
    selection: Selection = "val_kappa_optimized"
    # Seed Python, numpy, TensorFlow and Keras (dropout included) from `seed` and ask TensorFlow for
    # deterministic kernels, so the same command on the same machine gives the same numbers.
    deterministic: bool = True


def _adam_ladder(name: str, stages, *, width: float, synth_count: int, synth_size: int, **kwargs) -> TrainConfig:
    """A ladder of ``(stage, epochs, lr)`` rungs trained with Adam (the first rung's lr is ``optim.lr``) on
    the synthetic data set, global batch 32."""
    return TrainConfig(
        name=name,
        stages=[StageConfig(stage, epochs, lr=lr) for stage, epochs, lr in stages],
        model=ModelConfig(width=width),
        optim=OptimConfig(name="adam", lr=stages[0][2]),
        data=DataConfig(synth_count=synth_count, synth_size=synth_size),
        global_batch_size=32,
        **kwargs,
    )


def quick_preset() -> TrainConfig:
    """The main job: nets at width 0.5 at 112 -> 224 -> 448 on 3000 synthetic photos (fundus 512 px), about
    6 minutes from nothing on a 2-core CPU (README, "Quick start", for the time and the three seeds' table).

    The budget goes to training and to a test split that can tell the stages apart (450 photos; the old
    600-photo preset's 90 test photos gave 95 % intervals about 0.5 wide, issue 15). Width 0.5 rather than
    0.25: about 1.6x the training time for a higher kappa at every stage (issue 15's measurements).
    It uses Adam rather than the paper's SGD: on 420 training photos, Nesterov SGD at the paper's lr (3e-3,
    also 1e-2) left the validation kappa at 0 for 8 epochs of the tiny stage (constant predictions), while
    Adam at 1e-3 learned (README, "Training"). The paper's SGD needs the paper's 200 epochs per stage.
    """
    return _adam_ladder(
        "quick", [("tiny", 10, 1e-3), ("small", 6, 5e-4), ("median", 5, 3e-4)], width=0.5,
        synth_count=3000, synth_size=512,
        # The search is off: on seeds 1-3 (README, "Learning-rate search") its rates lost to these fixed ones on two
        # seeds and won on one (top stage's test kappa 0.891 against 0.900 on average), for 1.5-2 more minutes. `--tune`
        # runs it with this budget: 3 trials per stage, each one epoch on half the training draw, scored by kappa at
        # optimised cut-offs (tune.objective), around Adam's fine-tuning rates.
        tune=TuneConfig(enabled=False, tuner="random", max_trials=3, lr_min=1e-4, lr_max=3e-3, epochs=1,
                        data_fraction=0.5),
        eval_bootstrap=200,
        # Both-eye fusion after the top stage (issue 17): the export shows the whole product, predict_patient included.
        fusion=FusionConfig(enabled=True),
    )


def paper_preset() -> TrainConfig:
    """Li et al.'s ladder: 112 -> 224 -> 448 -> 896 at full width, Nesterov SGD, L2 5e-4, MSE."""
    return TrainConfig(
        name="paper",
        stages=[StageConfig("tiny", 200, lr=3e-3), StageConfig("small", 200, lr=1e-3),
                StageConfig("median", 200, lr=5e-4), StageConfig("large", 200, lr=3e-4)],
        model=ModelConfig(width=1.0, l2=5e-4),
        optim=OptimConfig(name="sgd", lr=3e-3, momentum=0.9, nesterov=True),
        data=DataConfig(synth_count=6000, synth_size=1024),
        global_batch_size=32,
    )


def study_preset() -> TrainConfig:
    """The resolution study's CPU ladder (``scripts/resolution_study.py``): the paper's four stages,
    112 -> 224 -> 448 -> 896, on a 1024 px synthetic fundus (issue 14, item 1: at 896 px a median
    microaneurysm is about 4 px across, 2 px at 448 px on a 512 px fundus).

    Sized on a 2-core AMD EPYC (AVX-512, no AMX) from a measured training step at 896 px (width 0.5:
    27 img/s fp32, ``benchmarks/train_throughput_896.json``) so that the whole study (ladder, from-scratch
    control for the ladder's time, explain, throughput, report) fits in 2 hours: width 0.5, 6000 synthetic
    photos (3000 patients), 10 / 6 / 5 / 4 epochs, Adam with decreasing per-stage learning rates, no search
    (the study compares resolutions, not learning rates). docs/RESULTS.md has the measured wall time.

    Two departures from the paper's design, both ours and both config options (issue 14, item 2):
    Graham's local-colour normalisation (``data.normalize=graham``, the Kaggle winner's preprocessing; on the
    quick ladder it was the one lever that moved the heat maps onto the microaneurysms), and a class prior
    enriched in mild DR (``data.synth_prior``: 40 / 30 / 15 / 8 / 7 % of grades 0-4 against EyePACS's
    74 / 7 / 15 / 2.5 / 2 %), a fair design for a study of mild DR on 10 times fewer photos than EyePACS.
    On a slower machine shorten it with ``stages.3.epochs=...``, ``data.synth_count=...``, ``model.width=...``.
    """
    config = _adam_ladder("stepwise", [("tiny", 10, 1e-3), ("small", 6, 5e-4), ("median", 5, 3e-4),
                                       ("large", 4, 2e-4)], width=0.5, synth_count=6000, synth_size=1024)
    config.data.normalize = "graham"
    config.data.synth_prior = "0.40,0.30,0.15,0.08,0.07"
    return config


def study_full_preset() -> TrainConfig:
    """The resolution study for a GPU machine (``--full``): the paper's four stages at full width.

    112 -> 224 -> 448 -> 896, width 1, on 10000 synthetic photos with a 1024 px fundus; Adam with
    decreasing per-stage learning rates (the paper's SGD needs its 200 epochs per stage).
    """
    return _adam_ladder("stepwise", [("tiny", 30, 1e-3), ("small", 20, 5e-4), ("median", 15, 3e-4), ("large", 10, 2e-4)],
                        width=1.0, synth_count=10000, synth_size=1024)


PRESETS = {"quick": quick_preset, "paper": paper_preset, "study": study_preset, "study-full": study_full_preset}


def load_train_config(source=None, overrides=()) -> TrainConfig:
    """A preset name, a YAML/JSON file or a mapping, then ``key=value`` overrides; checked.

    Raises:
        ConfigError: an unknown key, a wrong type, or a ladder that cannot run (see ``check_config``).
    """
    if source is None:
        source = "quick"
    if isinstance(source, str) and source in PRESETS:
        source = PRESETS[source]()
    elif isinstance(source, str) and not os.path.splitext(source)[1]:
        raise ConfigError(f"unknown preset {source!r}; accepted: {', '.join(PRESETS)} or a .yaml/.json file")
    config = load_config(TrainConfig, source, overrides)
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """Refuses, before any work, a ladder the architecture cannot run, and any value out of its range."""
    check_values(config)
    if not config.stages:
        raise ConfigError("stages is empty; give at least one stage, e.g. stages=[{stage: tiny, epochs: 5}]")
    sizes = []
    for i, stage in enumerate(config.stages):
        try:
            sizes.append(stage_size(stage_index(stage.stage)))
        except ValueError as exc:
            raise ConfigError(f"stages.{i}.stage: {exc}") from None
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"the ladder's sizes must increase stage by stage; got {sizes}")
    if config.data.synth_size < max(sizes):
        if config.data.data is None:
            raise ConfigError(
                f"data.synth_size ({config.data.synth_size}) must be at least the largest stage size "
                f"({max(sizes)}) so the top stage sees real detail"
            )
    check_tune_config(config.tune, config.global_batch_size)


# ------------------------------------------------------------------------- every value's range
MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
"""An export's model name: one folder name (TF Serving's ``--model_name``), as ``serving.export`` checks it."""
SYNTH_PRIORS = ("eyepacs", "balanced")
"""The named class priors of the synthetic data set (``data.synthetic.plan.PRIORS``), besides ``a,b,c,d,e``."""
MAX_WIDTH = 16.0
"""The widest net accepted (``model.width``): 16 times the paper's filters is already ~250 times its weights."""
_SEED = ("an integer in [0, 2**31 - 1]", lambda v: 0 <= v < 2**31)

# Every number of a run and the values it accepts: key -> (the range as the error says it, the test).
# A null value (an Optional field left unset) is not checked; NaN and infinity fail every range.
VALUE_RANGES = {
    "stages.*.epochs": (">= 1", lambda v: v >= 1),
    "stages.*.lr": ("> 0", lambda v: v > 0),
    "stages.*.augment_strength": (">= 0 (or null for augment.strength)", lambda v: v >= 0),
    "stages.*.max_seconds": ("> 0 (or null for no limit)", lambda v: v > 0),
    "model.width": (f"in (0, {MAX_WIDTH:g}]", lambda v: 0 < v <= MAX_WIDTH),
    "model.dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "model.leaky_slope": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "model.l2": (">= 0", lambda v: v >= 0),
    "model.seed": _SEED,
    "model.min_filters": ("in [0, 4096] (0: no floor)", lambda v: 0 <= v <= 4096),
    "loss.aux_weight": (">= 0 (0: the MSE alone)", lambda v: v >= 0),
    "optim.lr": ("> 0", lambda v: v > 0),
    "optim.momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.weight_decay": (">= 0", lambda v: v >= 0),
    "optim.lr_drop_at": ("in [0, 1] (a fraction of the stage's epochs)", lambda v: 0 <= v <= 1),
    "optim.lr_drop_factor": ("in (0, 1] (1: no drop)", lambda v: 0 < v <= 1),
    "optim.reference_batch_size": (">= 1 (or null for no scaling)", lambda v: v >= 1),
    "optim.clipnorm": ("> 0 (or null for no clipping)", lambda v: v > 0),
    "data.val_fraction": ("in (0, 1)", lambda v: 0 < v < 1),
    "data.test_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "data.split_seed": _SEED,
    "data.synth_count": (">= 1", lambda v: v >= 1),
    "data.synth_size": ("in [64, 4096] pixels", lambda v: 64 <= v <= 4096),
    "data.synth_seed": _SEED,
    "data.workers": (">= 0 (0: every core)", lambda v: v >= 0),
    "nan.max_events": (">= 0", lambda v: v >= 0),
    "nan.lr_factor": ("in (0, 1)", lambda v: 0 < v < 1),
    "global_batch_size": (">= 1", lambda v: v >= 1),
    "seed": _SEED,
    "eval_bootstrap": (">= 0 (0: no intervals)", lambda v: v >= 0),
    "tta.draws": (f"a whole number from 1 to {MAX_TTA_DRAWS} (1: no test-time augmentation)",
                  lambda v: 1 <= v <= MAX_TTA_DRAWS),
    "fusion.hidden": ("in [1, 4096]", lambda v: 1 <= v <= 4096),
    "fusion.epochs": ("in [1, 10000]", lambda v: 1 <= v <= 10000),
    "fusion.lr": ("> 0", lambda v: v > 0),
    "fusion.batch_size": (">= 1", lambda v: v >= 1),
    "fusion.dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
}


def _values_at(config, key: str):
    """``(full key, value)`` for a key of ``VALUE_RANGES`` (``stages.*.lr``: one per stage)."""
    head, _, rest = key.partition(".")
    if head == "stages":
        field_name = rest.partition(".")[2]
        return [(f"stages.{i}.{field_name}", getattr(stage, field_name)) for i, stage in enumerate(config.stages)]
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return [(key, node)]


def check_values(config: TrainConfig) -> None:
    """Checks every value of a run against its accepted range and every name against its rule; each
    failure is a one-line ``ConfigError`` naming the key and what it accepts (``VALUE_RANGES``).

    >>> check_values(dataclasses.replace(quick_preset(), optim=OptimConfig(lr_drop_factor=-1)))
    Traceback (most recent call last):
    ...
    retina_scale.utils.typed_config.ConfigError: optim.lr_drop_factor must be in (0, 1] (1: no drop); got -1
    """
    for pattern, (accepted, ok) in VALUE_RANGES.items():
        for key, value in _values_at(config, pattern):
            if value is None:
                continue
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number {accepted}; got {value}")
            if not ok(value):
                raise ConfigError(f"{key} must be {accepted}; got {value:g}")
    if config.data.val_fraction + config.data.test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction must be < 1 (the rest trains); got "
                          f"{config.data.val_fraction:g} + {config.data.test_fraction:g}")
    _check_names(config)


def _check_names(config: TrainConfig) -> None:
    """The run's names and folders: what becomes a path, an export's name or a choice of a list."""
    import re

    name = config.name
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name.encode("utf-8")) > 255:
        raise ConfigError(f"name must be a plain folder name (no '/', not '.' or '..', at most 255 bytes); got "
                          f"{name[:80]!r}")
    if not re.fullmatch(MODEL_NAME_PATTERN, config.model_name) or len(config.model_name) > 255:
        raise ConfigError(f"model_name must be one folder name of letters, digits, '.', '_' or '-' not starting "
                          f"with '.', '_' or '-'; got {config.model_name[:80]!r}")
    for key in ("runs_dir", "export_dir", "data.data", "data.labels", "data.cache", "data.image_col",
                "data.label_col"):
        value = _values_at(config, key)[0][1]
        if value is not None and (not value.strip() or "\0" in value):
            raise ConfigError(f"{key} must be a non-empty string without NUL bytes (or null); got {value[:80]!r}")
    if config.data.format is not None and config.data.format not in FORMATS:
        raise ConfigError(f"data.format: unknown format {config.data.format!r}; accepted: {', '.join(FORMATS)} "
                          "(or null to detect it)")
    prior = config.data.synth_prior
    if prior.strip().lower() not in SYNTH_PRIORS and not _is_prior(prior):
        raise ConfigError(f"data.synth_prior must be {' or '.join(SYNTH_PRIORS)} or five fractions a,b,c,d,e "
                          f"summing to 1; got {prior[:80]!r}")


def _is_prior(text: str) -> bool:
    """``a,b,c,d,e``: five finite non-negative fractions summing to 1 (within 1e-3, as the synthetic set reads it)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        return False
    return len(values) == 5 and all(0 <= v < math.inf for v in values) and abs(sum(values) - 1) <= 1e-3


def check_tune_config(tune: TuneConfig, global_batch_size: int | None = None) -> None:
    """Refuses, before any trial, a search space or budget that cannot run (one-line ConfigError)."""
    if tune.tuner not in TUNERS:
        raise ConfigError(f"tune.tuner: unknown tuner {tune.tuner!r}; accepted: {', '.join(TUNERS)}")
    if not tune.lr_min > 0 or not tune.lr_max > 0:
        raise ConfigError(f"tune.lr_min and tune.lr_max must be > 0 for log sampling; got "
                          f"lr_min={tune.lr_min}, lr_max={tune.lr_max}")
    if not math.isfinite(tune.lr_min) or not math.isfinite(tune.lr_max):
        raise ConfigError(f"tune.lr_min and tune.lr_max must be finite numbers; got lr_min={tune.lr_min}, "
                          f"lr_max={tune.lr_max}")
    if tune.lr_min >= tune.lr_max:
        raise ConfigError(f"tune.lr_min must be < tune.lr_max; got lr_min={tune.lr_min} >= lr_max={tune.lr_max}")
    if tune.max_trials < 1:
        raise ConfigError(f"tune.max_trials must be >= 1; got {tune.max_trials}")
    if tune.epochs < 1:
        raise ConfigError(f"tune.epochs must be >= 1; got {tune.epochs}")
    if not 0 < tune.data_fraction <= 1:
        raise ConfigError(f"tune.data_fraction must be in (0, 1]; got {tune.data_fraction}")
    if tune.seed < 1:
        raise ConfigError(f"tune.seed must be >= 1 (Keras Tuner reads 0 as 'random'); got {tune.seed}")
    for name, dim in tune.extra.items():
        where = f"tune.extra.{name}"
        if name not in SEARCH_EXTRAS:
            raise ConfigError(f"{where}: unknown search dimension {name!r}; accepted: {', '.join(SEARCH_EXTRAS)}")
        if dim.values is not None:
            if dim.min is not None or dim.max is not None:
                raise ConfigError(f"{where}: give either values or min/max, not both")
            if not dim.values:
                raise ConfigError(f"{where}.values is empty; give at least one value")
            values = dim.values
        else:
            if dim.min is None or dim.max is None:
                raise ConfigError(f"{where}: give values: [...] or both min and max")
            if dim.min >= dim.max:
                raise ConfigError(f"{where}: min must be < max; got min={dim.min} >= max={dim.max}")
            if dim.sampling == "log" and not dim.min > 0:
                raise ConfigError(f"{where}: min must be > 0 for log sampling; got min={dim.min}")
            if dim.step is not None and not dim.step > 0:
                raise ConfigError(f"{where}.step must be > 0; got {dim.step}")
            values = [dim.min, dim.max]
        if not all(math.isfinite(v) for v in [*values, *([dim.step] if dim.step is not None else [])]):
            raise ConfigError(f"{where}: values must be finite numbers; got {values}")
        if name == "batch_size":
            if any(v != int(v) or v < 1 for v in values) or (dim.step is not None and dim.step != int(dim.step)):
                raise ConfigError(f"{where}: batch sizes must be whole numbers >= 1; got {values}")
        elif any(v < 0 for v in values):
            raise ConfigError(f"{where}: values must be >= 0; got {values}")


def resolve_precision(precision: str, cpu_flags=(), gpus=()) -> str:
    """The Keras dtype policy of a run's ``precision``: ``auto`` is ``mixed_bfloat16`` where the device that
    computes has native bf16 (``retina_scale.utils.hardware.bf16_capable``: the GPUs' compute capabilities
    ``gpus`` if any, else the CPU's ``cpu_flags``), else ``float32``; the other names are themselves.

        >>> resolve_precision("auto", {"avx512f", "avx512_bf16"}), resolve_precision("auto", {"avx2"})
        ('mixed_bfloat16', 'float32')
        >>> resolve_precision("auto", {"amx_bf16"}, gpus=[(7, 0)]), resolve_precision("float32", {"amx_bf16"})
        ('float32', 'float32')

    Raises:
        ConfigError: an unknown name (naming the accepted ones).
    """
    from retina_scale.utils.hardware import bf16_capable

    if precision not in PRECISIONS:
        raise ConfigError(f"precision: unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if bf16_capable(cpu_flags, gpus) else "float32"
