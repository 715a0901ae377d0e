"""One synthetic photo: a background, the lesions of its grade, the camera."""

from __future__ import annotations

import numpy as np

from retina_scale.config import GRADES
from retina_scale.data.synthetic.anatomy import procedural_background, real_background
from retina_scale.data.synthetic.camera import add_sensor_noise, apply_optics, frame_eyepacs
from retina_scale.data.synthetic.lesions import draw_lesions
from retina_scale.data.synthetic.plan import validate_size
from retina_scale.utils.errors import UserError


def render_fundus(
    rng_or_seed,
    grade: int,
    size: int = 1024,
    eye: str = "right",
    background: str = "procedural",
    framing: str | None = None,
    return_meta: bool = False,
):
    """Draw one synthetic fundus photograph of a given DR grade.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or an integer seed.
        grade: International Clinical DR grade, 0-4; the lesions drawn satisfy the clinical rules of that
            grade (:func:`~retina_scale.data.synthetic.plan.grade_from_lesions` of the records returns ``grade``).
        size: diameter of the fundus disc in pixels (64-4096); the field is 12 mm across.
        eye: ``"right"`` (disc on the right of the image) or ``"left"`` (mirror geometry).
        background: ``"procedural"`` or ``"real"`` (``skimage.data.retina()`` under random variation).
        framing: ``None`` (square photo, the fundus disc fills it) or ``"eyepacs"`` (wider-than-tall canvas,
            off-centre fundus, some photos darker, blurrier or notched).
        return_meta: also return a dict with the anatomy (disc, fovea, field centre, scale).

    Returns:
        ``(image, lesions)``: an ``(H, W, 3)`` uint8 RGB array and a list of dicts with keys
        ``kind, x, y, size_px, size_um, quadrant, depth, cluster`` (pixel coordinates in the returned image);
        with ``return_meta`` a third item, the anatomy dict.

    Example:

    >>> from retina_scale.data.synthetic import grade_from_lesions
    >>> img, lesions = render_fundus(3, grade=4, size=128)
    >>> grade_from_lesions(lesions)
    4
    """
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(int(rng_or_seed))
    size = validate_size(size)
    if grade not in GRADES:
        raise UserError(f"grade {grade!r} is invalid; accepted: 0, 1, 2, 3, 4")
    if eye not in ("left", "right"):
        raise UserError(f"eye {eye!r} is invalid; accepted: left, right")
    if background not in ("procedural", "real"):
        raise UserError(f"background {background!r} is invalid; accepted: procedural, real")
    if framing not in (None, "none", "eyepacs"):
        raise UserError(f"framing {framing!r} is invalid; accepted: none, eyepacs")
    if background == "real":
        img, anat = real_background(rng, size)
    else:
        img, anat = procedural_background(rng, size)
    with np.errstate(over="ignore"):  # logistic edges: exp overflows to inf far outside, giving alpha 0
        records = draw_lesions(rng, img, anat, grade)
    img = apply_optics(rng, img, anat)
    meta = dict(width=size, height=size, field_diameter_px=size, um_per_px=anat.um_per_px,
                field_x=anat.centre[0], field_y=anat.centre[1], disc_x=anat.disc[0], disc_y=anat.disc[1],
                disc_diameter_px=anat.disc_diameter, fovea_x=anat.fovea[0], fovea_y=anat.fovea[1])
    if eye == "left":
        img = img[:, ::-1]
        for rec in records:
            rec["x"] = size - 1 - rec["x"]
        for k in ("field_x", "disc_x", "fovea_x"):
            meta[k] = size - 1 - meta[k]
    out = add_sensor_noise(rng, np.ascontiguousarray(img))
    if framing == "eyepacs":
        out = frame_eyepacs(rng, out, records, meta)
    if return_meta:
        return out, records, meta
    return out, records
