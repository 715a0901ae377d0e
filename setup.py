"""Install retina_scale: multi-scale stepwise training of CNNs for diabetic retinopathy grading."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="retina_scale",
    version="0.1.0",
    description=(
        "Multi-scale stepwise training of convolutional networks for diabetic retinopathy "
        "grading (Li et al., IJCNN 2019), on Keras 3 and tf.distribute."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["retina_scale", "retina_scale.*"]),
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        # The distributed search's chief serves its oracle through Keras Tuner's private gRPC servicer
        # (keras_tuner.src.*: the one place is the end of retina_scale/training/tuning.py); it is the
        # same from 1.4.7 (the release whose 20 s end-of-search poll that code shortens) to 1.4.8, the
        # version tested. A private API may change in any minor release, hence <1.5.
        "keras-tuner>=1.4.7,<1.5",
        # Imported directly by that server; keras-tuner 1.4.7 does not require it.
        "grpcio",
        # TF 2.21 no longer pulls tensorboard in, and keras-tuner fails every trial without it.
        "tensorboard",
        "opencv-python-headless",
        "numpy",
        "pandas",
        # Keras Tuner's bayesian tuner (tune.tuner=bayesian) needs both; scipy also fits the synthetic
        # data's microaneurysm calibration.
        "scikit-learn",
        "scipy",
        "scikit-image",
        "matplotlib",
        "tqdm",
        "pyyaml",
    ],
    extras_require={"test": ["pytest>=7"], "serving": ["tensorflow-serving-api>=2.16", "grpcio"]},
    entry_points={"console_scripts": ["retina-scale=retina_scale.cli:main"]},
)
