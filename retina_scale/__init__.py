"""retina_scale: multi-scale stepwise training of CNNs for diabetic retinopathy grading.

Implements Li et al., "Multi-scale stepwise training strategy of convolutional neural networks for
diabetic retinopathy severity assessment", IJCNN 2019. Importing this package has no side effects and
does not import TensorFlow; the sub-packages import what they need.
"""

__version__ = "0.1.0"
