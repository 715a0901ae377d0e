"""The plan of a synthetic data set, decided before anything is drawn: grade priors, patients and their fellow
eyes, label noise, per-image seeds and backgrounds; and what a photo of each grade holds: the lesion kinds,
their physical sizes and the International Clinical DR grade that the drawn lesions imply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from retina_scale.utils.errors import UserError

PRIORS: dict[str, tuple[float, ...]] = {
    # Table II of the paper this project implements (Li et al., IJCNN 2019; see the README): EyePACS (Kaggle
    # 2015) training-set class frequencies.
    "eyepacs": (0.7348, 0.0696, 0.1507, 0.0248, 0.0201),
    "balanced": (0.2, 0.2, 0.2, 0.2, 0.2),
}

# Physical size ranges (micrometres) of each lesion kind; ``size_um`` in lesions.csv always lies inside.
# For elongated or extended kinds the size is the longest extent.
LESION_SIZE_UM: dict[str, tuple[float, float]] = {
    "microaneurysm": (25.0, 125.0),
    "dot_blot_haemorrhage": (125.0, 1000.0),
    "flame_haemorrhage": (250.0, 1500.0),
    "hard_exudate": (50.0, 500.0),
    "cotton_wool_spot": (250.0, 1000.0),
    "venous_beading": (600.0, 2500.0),
    "irma": (300.0, 1200.0),
    "nvd": (500.0, 2500.0),
    "nve": (500.0, 2500.0),
    "preretinal_haemorrhage": (1000.0, 4000.0),
    "vitreous_haemorrhage": (3000.0, 8000.0),
}
LESION_KINDS = tuple(LESION_SIZE_UM)
INTRARETINAL_HAEMORRHAGES = ("dot_blot_haemorrhage", "flame_haemorrhage")
PROLIFERATIVE = ("nvd", "nve", "preretinal_haemorrhage", "vitreous_haemorrhage")
QUADRANTS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")


def parse_prior(prior: str | Sequence[float]) -> np.ndarray:
    """Turn a prior name (``eyepacs``, ``balanced``) or five comma-separated fractions into probabilities.

    Args:
        prior: a name from :data:`PRIORS`, a string ``"a,b,c,d,e"`` or a sequence of five numbers.

    Returns:
        A float array of five probabilities summing to 1.

    Raises:
        ValueError: unknown name, wrong length, negative values or a sum other than 1 (within 1e-3).
    """
    if isinstance(prior, str):
        text = prior.strip().lower()
        if text in PRIORS:
            return np.asarray(PRIORS[text], float) / sum(PRIORS[text])
        if "," not in text:
            raise UserError(
                f"unknown prior {prior!r}; accepted: {', '.join(PRIORS)} or five comma-separated "
                "fractions a,b,c,d,e summing to 1"
            )
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise UserError(
                f"prior {prior!r} is not five comma-separated numbers; accepted: {', '.join(PRIORS)} "
                "or a,b,c,d,e summing to 1"
            ) from None
    else:
        values = [float(v) for v in prior]
    if len(values) != 5:
        raise UserError(f"prior has {len(values)} values; it needs exactly 5 (grades 0-4) summing to 1")
    arr = np.asarray(values, float)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise UserError(f"prior {values} has negative or non-finite values; each must be in [0, 1]")
    if abs(arr.sum() - 1.0) > 1e-3:
        raise UserError(f"prior {values} sums to {arr.sum():.4f}; the five fractions must sum to 1")
    return arr / arr.sum()


def fellow_eye_kernel(prior: np.ndarray, p_adjacent: float = 0.35, p_far: float = 0.05) -> np.ndarray:
    """Transition matrix from one eye's grade to the fellow eye's grade.

    A Metropolis kernel: propose an adjacent grade with probability ``p_adjacent`` and any other grade with
    probability ``p_far``, accept with ``min(1, prior[j] / prior[i])``. It is reversible with respect to
    ``prior``, so both eyes have the prior as their marginal distribution and the joint is symmetric, while
    most patients have the same or an adjacent grade in both eyes.
    """
    n = len(prior)
    kernel = np.zeros((n, n))
    for i in range(n):
        if prior[i] == 0:
            kernel[i, i] = 1.0
            continue
        adjacent = [j for j in (i - 1, i + 1) if 0 <= j < n]
        far = [j for j in range(n) if abs(j - i) > 1]
        for j in adjacent:
            kernel[i, j] += p_adjacent / 2 * min(1.0, prior[j] / prior[i])
        for j in far:
            kernel[i, j] += p_far / len(far) * min(1.0, prior[j] / prior[i])
        kernel[i, i] = 1.0 - kernel[i].sum()
    return kernel


@dataclass(frozen=True)
class ImageSpec:
    """What one photo of the data set will show (decided before drawing, so workers only draw)."""

    name: str
    patient: int
    eye: str
    true_level: int
    level: int
    seed: int
    background: str


def plan_dataset(
    count: int,
    seed: int = 0,
    prior: str | Sequence[float] = "eyepacs",
    label_noise: float = 0.0,
    real_fraction: float = 0.3,
) -> list[ImageSpec]:
    """Decide patients, eyes, grades, label noise and per-image seeds, without drawing anything.

    Two eyes per patient (``<patient>_left`` then ``<patient>_right``; with an odd count the last patient has
    only a left eye). The first eye's grade is drawn from ``prior``; the fellow eye's from
    :func:`fellow_eye_kernel`, so both marginals are the prior. With probability ``label_noise`` the written
    label moves to an adjacent grade (0 can only move to 1, 4 only to 3); ``true_level`` keeps the drawn one.

    Args:
        count: number of photos (>= 0).
        seed: master seed; the image seeds derive from it and the image index only.
        prior: see :func:`parse_prior`.
        label_noise: probability in [0, 1] that a label is moved to an adjacent grade.
        real_fraction: fraction of photos drawn on the real background.
    """
    validate_count(count)
    probs = parse_prior(prior)
    if not (0.0 <= float(label_noise) <= 1.0):
        raise UserError(f"label noise {label_noise} is outside [0, 1]")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    kernel = fellow_eye_kernel(probs)
    specs: list[ImageSpec] = []
    n_patients = (count + 1) // 2
    image_seeds = np.random.SeedSequence([int(seed), 0x1A6E]).generate_state(max(count, 1), dtype=np.uint32)
    for p in range(n_patients):
        patient = p + 1
        first = int(rng.choice(5, p=probs))
        second = int(rng.choice(5, p=kernel[first]))
        # which eye gets the first draw is random, so neither eye is favoured
        grades = (first, second) if rng.random() < 0.5 else (second, first)
        for eye, grade in zip(("left", "right"), grades):
            index = len(specs)
            noisy = rng.random() < label_noise
            step = 1 if grade == 0 else -1 if grade == 4 else (1 if rng.random() < 0.5 else -1)
            background = "real" if rng.random() < real_fraction else "procedural"
            if index >= count:
                continue
            specs.append(ImageSpec(
                name=f"{patient}_{eye}", patient=patient, eye=eye, true_level=grade,
                level=grade + step if noisy else grade, seed=int(image_seeds[index]), background=background,
            ))
    return specs


def grade_from_lesions(records: Iterable[dict]) -> int:
    """The International Clinical DR grade implied by a list of lesion records.

    4 if any neovascularisation (``nvd``, ``nve``) or pre-retinal / vitreous haemorrhage; else 3 by the
    4-2-1 rule (more than 20 intraretinal haemorrhages in each of the four quadrants, venous beading in two
    or more quadrants, or IRMA in one or more); else 2 if anything besides microaneurysms; else 1 if any
    microaneurysm; else 0.
    """
    records = list(records)
    kinds = {r["kind"] for r in records}
    if kinds & set(PROLIFERATIVE):
        return 4
    haem = {q: 0 for q in QUADRANTS}
    beading = set()
    for r in records:
        if r["kind"] in INTRARETINAL_HAEMORRHAGES:
            haem[r["quadrant"]] += 1
        elif r["kind"] == "venous_beading":
            beading.add(r["quadrant"])
    if all(n > 20 for n in haem.values()) or len(beading) >= 2 or "irma" in kinds:
        return 3
    if kinds - {"microaneurysm"}:
        return 2
    if kinds:
        return 1
    return 0


def validate_count(count) -> int:
    """``count`` as an int: a whole number >= 0 (else a UserError)."""
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise UserError(f"count {count} is invalid; it must be a whole number >= 0")
    return int(count)


def validate_size(size) -> int:
    """``size`` as an int: a fundus diameter of 64 to 4096 px (else a UserError)."""
    if isinstance(size, bool) or int(size) != size or not 64 <= size <= 4096:
        raise UserError(f"size {size} px is invalid; the fundus diameter must be 64 to 4096 px")
    return int(size)
