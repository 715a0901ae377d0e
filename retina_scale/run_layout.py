"""Every path of a run folder and of a study folder, in one place.

A stepwise run lives in ``<runs_dir>/<name>/``::

    config.yaml  splits.csv  report.json  report.md
    data/synthetic/  data/synthetic.json  data/cache/   (the embedded data set, without --data)
    stages/1-tiny/   state.json  log.csv  tensorboard/  transfer.{json,txt}  initial.npz
                     last.npz  best.npz  best.keras  evaluation.{json,md}  tuning/
    fusion/          state.json  features.npz  log.csv  fusion.keras  evaluation.{json,md}  (``fusion.enabled``)
    report/          REPORT.md, report.json, figures/  (``retina-scale report``)
    workers/<type>-<id>/   the other workers' copies of a multi-worker run

A resolution study lives in ``<out>/``::

    study.json  throughput.json  REPORT.md  report.json  figures/
    data/synthetic/  data/cache/  runs/stepwise/  runs/scratch/  saved_models/
    explain/<i>-<stage>/   Grad-CAM of each ladder stage on the test split (ExplainLayout)

``retina-scale explain --out OUT`` writes ``OUT/explain.json``, ``OUT/explain.csv`` and ``OUT/overlays/*.png``
(:class:`ExplainLayout`).

Nothing here touches the disk except :meth:`RunLayout.stages`, which lists the stage folders
present, and :meth:`RunLayout.from_folder`, which reads ``config.yaml`` to find a cache kept
outside the run folder.

Example:
    >>> run = RunLayout("runs/quick")
    >>> run.stage(2, "small").best.as_posix()
    'runs/quick/stages/2-small/best.npz'
    >>> run.cache.as_posix()
    'runs/quick/data/cache'
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


class _StageFiles:
    """The files a stage folder and the fusion stage's folder share (``dir``: the folder)."""

    dir: Path

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def log_csv(self) -> Path:
        return self.dir / "log.csv"

    @property
    def evaluation_json(self) -> Path:
        return self.dir / "evaluation.json"

    @property
    def evaluation_md(self) -> Path:
        return self.dir / "evaluation.md"


@dataclasses.dataclass(frozen=True)
class StageLayout(_StageFiles):
    """The files of one stage folder, ``stages/<index>-<name>/``."""

    dir: Path
    index: int
    name: str

    @property
    def tensorboard(self) -> Path:
        return self.dir / "tensorboard"

    @property
    def transfer_json(self) -> Path:
        return self.dir / "transfer.json"

    @property
    def transfer_txt(self) -> Path:
        return self.dir / "transfer.txt"

    @property
    def initial(self) -> Path:
        return self.dir / "initial.npz"

    @property
    def last(self) -> Path:
        return self.dir / "last.npz"

    @property
    def best(self) -> Path:
        return self.dir / "best.npz"

    @property
    def best_keras(self) -> Path:
        return self.dir / "best.keras"

    @property
    def tuning(self) -> Path:
        """The Keras Tuner project of the stage's learning-rate search."""
        return self.dir / "tuning"

    @property
    def search_json(self) -> Path:
        return self.tuning / "search.json"

    @property
    def search_md(self) -> Path:
        return self.tuning / "search.md"

    @property
    def run_root(self) -> Path:
        """The run folder this stage folder belongs to (``<run>/stages/<i>-<name>``)."""
        return self.dir.parent.parent


@dataclasses.dataclass(frozen=True)
class FusionLayout(_StageFiles):
    """The files of the both-eye fusion stage's folder, ``fusion/`` (``retina_scale.training.fusion``).

    >>> FusionLayout(Path("runs/quick/fusion")).features.as_posix()
    'runs/quick/fusion/features.npz'
    """

    dir: Path

    @property
    def features(self) -> Path:
        """The top stage's features and single-eye grades of every cached photo, by split."""
        return self.dir / "features.npz"

    @property
    def model(self) -> Path:
        """The fusion network (Keras format)."""
        return self.dir / "fusion.keras"


class _Folder:
    """A folder's layout: ``root`` is a ``Path`` whatever it was given as."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))


class _WithData(_Folder):
    """The data folder of a run or a study: the synthetic data set and (by default) the cache."""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def synthetic(self) -> Path:
        return synthetic_dir(self.data_dir)


@dataclasses.dataclass(frozen=True)
class RunLayout(_WithData):
    """The paths of one run folder.

    Args:
        root: the run folder, ``<runs_dir>/<name>``.
        cache_dir: the data cache when the config names one (``data.cache``); else ``data/cache``
            inside the run folder.
    """

    root: Path
    cache_dir: Path | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    @classmethod
    def of(cls, config) -> "RunLayout":
        """The layout of the run a ``TrainConfig`` describes (the chief's folder)."""
        cache = config.data.cache
        return cls(Path(config.runs_dir) / config.name, Path(cache) if cache else None)

    @classmethod
    def from_folder(cls, root) -> "RunLayout":
        """The layout of an existing run folder; its ``config.yaml`` says where the cache is."""
        import yaml

        root = Path(root)
        config_file = root / "config.yaml"
        cache = None
        if config_file.is_file():
            data = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("data") or {}
            cache = data.get("cache") or None
        return cls(root, Path(cache) if cache else None)

    # ---------------------------------------------------------------------------------- files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits.csv"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_dir(self) -> Path:
        """Where ``retina-scale report`` writes REPORT.md and its figures for a plain run."""
        return self.root / "report"

    # ----------------------------------------------------------------------------------- data
    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.data_dir / "cache"

    # --------------------------------------------------------------------------------- stages
    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def stage(self, index: int, name: str) -> StageLayout:
        return StageLayout(self.stages_dir / f"{index}-{name}", index, name)

    def stages(self) -> list[StageLayout]:
        """The stage folders present, by index (``stages/<i>-<name>/``; anything else is ignored)."""
        found = []
        if self.stages_dir.is_dir():
            for folder in self.stages_dir.iterdir():
                index, _, name = folder.name.partition("-")
                if folder.is_dir() and index.isdigit() and name:
                    found.append(StageLayout(folder, int(index), name))
        return sorted(found, key=lambda s: s.index)

    @property
    def fusion(self) -> FusionLayout:
        """The both-eye fusion stage's folder (``fusion.enabled``)."""
        return FusionLayout(self.root / "fusion")

    def worker(self, task_type: str, task_id: int) -> "RunLayout":
        """A non-chief worker's own copy of the run, beside the chief's."""
        return RunLayout(self.root / "workers" / f"{task_type}-{task_id}", self.cache_dir)


def synthetic_dir(data_dir) -> Path:
    """Where the embedded synthetic data set is made inside a data folder (a run's or a study's)."""
    return Path(data_dir) / "synthetic"


def synthetic_stamp(data_dir) -> Path:
    """The record of the settings the synthetic data set in ``data_dir`` was made with."""
    return Path(data_dir) / "synthetic.json"


@dataclasses.dataclass(frozen=True)
class StudyLayout(_WithData):
    """The paths of a resolution study's folder (``scripts/resolution_study.py``)."""

    root: Path

    @property
    def timings(self) -> Path:
        return self.root / "study.json"

    @property
    def throughput(self) -> Path:
        return ReportLayout(self.root).throughput  # a study folder is its own report folder

    @property
    def cache(self) -> Path:
        return self.data_dir / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def export_dir(self) -> Path:
        return self.root / "saved_models"

    @property
    def ladder(self) -> RunLayout:
        return RunLayout(self.runs_dir / "stepwise", self.cache)

    @property
    def scratch(self) -> RunLayout:
        return RunLayout(self.runs_dir / "scratch", self.cache)

    def is_study(self) -> bool:
        """True when the folder holds a finished study's ladder."""
        return self.ladder.report_json.exists()

    def explain(self, stage: StageLayout) -> "ExplainLayout":
        """Where the study keeps the Grad-CAM maps and lesion hit rates of one ladder stage."""
        return ExplainLayout(self.root / "explain" / stage.dir.name)


@dataclasses.dataclass(frozen=True)
class ReportLayout(_Folder):
    """The files ``retina_scale.evidence.report.write_report`` writes into its output folder: a run's ``report/``
    (:attr:`RunLayout.report_dir`) or a study folder (which is its own report folder)."""

    root: Path

    @property
    def markdown(self) -> Path:
        return self.root / "REPORT.md"

    @property
    def summary(self) -> Path:
        return self.root / "report.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def throughput(self) -> Path:
        """Where ``retina-scale report --measure`` writes: where a study keeps its measurement."""
        return self.root / "throughput.json"

    @property
    def stage_panel(self) -> Path:
        """A study's figure of one grade-1 test photo's heat map at every stage (drawn by its explain step)."""
        return self.figures / "grade1_by_stage.png"


@dataclasses.dataclass(frozen=True)
class ExplainLayout(_Folder):
    """The files ``retina-scale explain`` (``retina_scale.evidence.explain``) writes into its output folder.

    >>> ExplainLayout("out").overlay("10_left").as_posix()
    'out/overlays/10_left.png'
    """

    root: Path

    @property
    def summary(self) -> Path:
        """The model, the settings, one record per photo and the lesion hit rates, for machines."""
        return self.root / "explain.json"

    @property
    def table(self) -> Path:
        """One row per photo: score, grade, error, lesion hits."""
        return self.root / "explain.csv"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    def overlay(self, key: str) -> Path:
        """The overlay PNG of one photo; ``key`` is a file-name-safe id (``retina_scale.data.cache.cache_key``)."""
        return self.overlays / f"{key}.png"
