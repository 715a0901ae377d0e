"""Synthetic fundus photographs with diabetic-retinopathy lesions drawn at their physical sizes.

The embedded default data set of ``retina_scale``: no real DR data set can be fetched by the project's
machines, so this module draws one. Every photo is graded by the International Clinical DR scale
(0 no DR, 1 microaneurysms only, 2 moderate, 3 severe by the 4-2-1 rule, 4 proliferative) from the lesions
that were actually drawn, and every lesion is recorded (kind, position, size in pixels and micrometres).

Two kinds of background, so that a model cannot memorise one retina:

* ``real``: scikit-image's one real human fundus photograph (``skimage.data.retina()``, a left eye) under
  random geometric (rotation, scale, shift, up/down flip) and photometric (channel gains, gamma) variation;
* ``procedural``: a drawn fundus: orange-red pigment with choroidal texture, vignetting and an illumination
  gradient; an optic disc of about 1/7 of the field diameter with a pale cup; a darker macula about two
  disc-diameters temporal to the disc; a branching vessel tree leaving the disc, veins wider and darker than
  arteries, the temporal arcades curving around the macula.

Geometry: the photo is drawn in the frame of a right eye (disc on the right of the image, as a fundus
camera shows a right eye) and mirrored for left eyes. ``size`` is the diameter of the fundus disc in
pixels and the 45-degree field is taken as 12 mm across, so one pixel is ``12000 / size`` micrometres.

Microaneurysm contrast and profile are calibrated against the real green-channel detail
``skimage.data.microaneurysms()`` (see :func:`measure_dark_spot` and :data:`MA_GREEN_DEPTH`): a 2-D Gaussian
dip with a relative depth of 0.41-0.65 in the green channel, the range measured on its two microaneurysms.
Lesions are drawn by area-integrating a supersampled patch, so a lesion smaller than a pixel darkens that
pixel by the fraction of light it really removes; nothing is tuned to favour any resolution.

Example:

>>> from retina_scale.data.synthetic import render_fundus
>>> image, lesions = render_fundus(0, grade=1, size=256, eye="left")
>>> image.shape, image.dtype
((256, 256, 3), dtype('uint8'))
>>> all(rec["kind"] == "microaneurysm" for rec in lesions)
True

The package, by role (each module imports only the ones before it):

* :mod:`~retina_scale.data.synthetic.plan`: priors, patients, grades, label noise; lesion kinds, sizes, grading rule;
* :mod:`~retina_scale.data.synthetic.drawing`: small drawing helpers;
* :mod:`~retina_scale.data.synthetic.anatomy`: the backgrounds: disc, fovea, vessels;
* :mod:`~retina_scale.data.synthetic.lesions`: microaneurysms, haemorrhages, exudates, ... and which a grade gets;
* :mod:`~retina_scale.data.synthetic.calibration`: the microaneurysm calibration against the real detail;
* :mod:`~retina_scale.data.synthetic.camera`: optics, noise, framing, JPEG;
* :mod:`~retina_scale.data.synthetic.render`: one photo (:func:`render_fundus`);
* :mod:`~retina_scale.data.synthetic.writer`: the data set on disk (:func:`generate_dataset`).

It imports only NumPy, OpenCV and scikit-image (TensorFlow is never imported).
"""

from retina_scale.data.synthetic.anatomy import FIELD_MM, Anatomy
from retina_scale.data.synthetic.calibration import (MA_CENTRES_IN_REFERENCE, measure_dark_spot,
                                                     reference_microaneurysms)
from retina_scale.data.synthetic.lesions import MA_GREEN_DEPTH, LesionPainter, draw_lesions
from retina_scale.data.synthetic.plan import (INTRARETINAL_HAEMORRHAGES, LESION_KINDS, LESION_SIZE_UM, PRIORS,
                                              PROLIFERATIVE, QUADRANTS, ImageSpec, fellow_eye_kernel,
                                              grade_from_lesions, parse_prior, plan_dataset, validate_count,
                                              validate_size)
from retina_scale.data.synthetic.render import render_fundus
from retina_scale.data.synthetic.writer import IMAGE_COLUMNS, LESION_COLUMNS, generate_dataset

__all__ = [
    "FIELD_MM", "Anatomy", "MA_CENTRES_IN_REFERENCE", "measure_dark_spot", "reference_microaneurysms",
    "MA_GREEN_DEPTH", "LesionPainter", "draw_lesions", "INTRARETINAL_HAEMORRHAGES", "LESION_KINDS",
    "LESION_SIZE_UM", "PRIORS", "PROLIFERATIVE", "QUADRANTS", "ImageSpec", "fellow_eye_kernel",
    "grade_from_lesions", "parse_prior", "plan_dataset", "validate_count", "validate_size", "render_fundus",
    "IMAGE_COLUMNS", "LESION_COLUMNS", "generate_dataset",
]
