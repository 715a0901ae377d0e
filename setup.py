"""Install retina_scale: multi-scale stepwise training of CNNs for diabetic retinopathy grading."""
from setuptools import find_packages, setup

setup(
    name="retina_scale",
    version="0.1.0",
    description=(
        "Multi-scale stepwise training of convolutional networks for diabetic retinopathy "
        "grading (Li et al., IJCNN 2019), on Keras 3 and tf.distribute."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["retina_scale", "retina_scale.*"]),
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "keras-tuner>=1.4",
        # TF 2.21 no longer pulls tensorboard in, and keras-tuner fails every trial without it.
        "tensorboard",
        "opencv-python-headless",
        "numpy",
        "pandas",
        "scikit-learn",
        "scikit-image",
        "matplotlib",
        "tqdm",
        "pyyaml",
    ],
    extras_require={"test": ["pytest>=7"], "serving": ["tensorflow-serving-api>=2.16", "grpcio"]},
    entry_points={"console_scripts": ["retina-scale=retina_scale.cli:main"]},
)
