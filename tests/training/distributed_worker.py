"""Subprocess body for the distribution tests: train a thin tiny net for a few steps and save the
weights by layer name (a ``save_checkpoint`` file without optimizer state). Run as
``python distributed_worker.py OUT.npz STRATEGY LOGICAL_CPUS``.

Logical CPU devices must be configured before TensorFlow initialises, hence a fresh process.
"""

import sys

import numpy as np


def main(out, strategy_name, logical_cpus):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if logical_cpus > 1:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)

    import keras

    from retina_scale.models.convnet import build_model
    from retina_scale.training.checkpoint import save_checkpoint
    from retina_scale.training.distribute import DistributedTrainer, choose_strategy

    strategy = choose_strategy(strategy_name)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (64, 56, 56, 3)).astype("float32")
    labels = rng.integers(0, 5, 64).astype("float32")

    def make_examples():
        return tf.data.Dataset.from_tensor_slices((images, labels))

    with strategy.scope():
        model = build_model("tiny", width=0.125, seed=1, dropout=0.0, l2=5e-4)
        optimizer = keras.optimizers.SGD(1e-3, momentum=0.9, nesterov=True)
    trainer = DistributedTrainer(model, optimizer, strategy, global_batch_size=8)
    losses = [trainer.train_steps(trainer.distribute_training(make_examples), steps=4)]
    eval_images, eval_labels = images[:61], labels[:61]

    def make_eval_examples():
        return tf.data.Dataset.from_tensor_slices((eval_images, eval_labels))

    iterator, steps = trainer.distribute_evaluation(make_eval_examples, num_examples=61)
    y, p = trainer.predict(iterator, steps)
    save_checkpoint(model, None, out)
    np.savez(out.replace(".npz", ".eval.npz"), labels=y, predictions=p, losses=np.array(losses),
             replicas=strategy.num_replicas_in_sync)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
