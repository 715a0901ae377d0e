"""One training path for every tf.distribute strategy.

``model.fit`` fails under ``MultiWorkerMirroredStrategy`` in Keras 3.15 (keras-team/keras#20585: the
per-replica reduction of scalar logs), so rather than keep ``fit`` for one machine and a second loop
for many, this module has a single custom loop that serves the default strategy, ``MirroredStrategy``
and ``MultiWorkerMirroredStrategy`` alike:

- the training step runs under ``strategy.run``: per-example losses are averaged over the *global*
  batch (``tf.nn.compute_average_loss``) and the Keras optimizer all-reduces (sums) the gradients, so
  one step on N replicas equals one step on one device with the same global batch;
- input comes from ``strategy.distribute_datasets_from_function``: each input pipeline reads its own
  shard of the examples (``input_context.input_pipeline_id``) and batches at the per-replica size;
- evaluation pads every shard to the same number of steps with zero-weight examples, so that all
  replicas of all workers run the same number of steps (an uneven last batch would hang the
  collective ops of a multi-worker run) and predictions are gathered back to every worker.

The loss is the squared error of the grade (the paper's MSE), per example, plus, for a model with an
auxiliary head (``loss.aux``, issue 14; the model then returns ``[grade, aux logits]``), ``loss.aux_weight``
times that head's per-example loss (:func:`per_example_loss`); evaluation reads the grade alone.

This module is TensorFlow code (distribution belongs here); the models stay ``keras.ops``-only.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from retina_scale.config import NUM_GRADES, STRATEGIES, LossConfig
from retina_scale.utils.errors import UserError


def per_example_loss(outputs, labels, aux: str = "none", aux_weight: float = 0.0):
    """The training loss of each example, float32 ``(batch,)``: ``(grade - label)**2``, plus ``aux_weight``
    times the auxiliary head's loss when ``aux`` is not ``none`` (``outputs`` is then ``[grade, aux logits]``):

    - ``ordinal``: 4 logits, the mean over k = 0..3 of the sigmoid cross-entropy of logit k against
      ``label > k``;
    - ``classification``: 5 logits, the softmax cross-entropy against the grade (the label rounded, in 0..4).

    With ``aux_weight`` 0 the value is the squared error exactly (the auxiliary term is finite, times 0).
    """
    import tensorflow as tf

    labels = tf.cast(tf.reshape(labels, [-1]), tf.float32)
    if aux == "none":
        return tf.square(tf.cast(tf.reshape(outputs, [-1]), tf.float32) - labels)
    grade, logits = outputs[0], tf.cast(outputs[1], tf.float32)
    squared = tf.square(tf.cast(tf.reshape(grade, [-1]), tf.float32) - labels)
    if aux == "ordinal":
        cuts = tf.range(NUM_GRADES - 1, dtype=tf.float32) + 0.5  # label > k, for whole grades k = 0..3
        targets = tf.cast(labels[:, None] > cuts[None, :], tf.float32)
        term = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits), axis=-1)
    elif aux == "classification":
        classes = tf.cast(tf.clip_by_value(tf.round(labels), 0, NUM_GRADES - 1), tf.int32)
        term = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=classes, logits=logits)
    else:
        raise UserError(f"unknown auxiliary loss {aux!r}; accepted: none, ordinal, classification")
    return squared + float(aux_weight) * term


def choose_strategy(name: str = "auto"):
    """Returns the ``tf.distribute.Strategy`` for this machine.

    ``auto``: ``TF_CONFIG`` names a cluster -> ``MultiWorkerMirroredStrategy``; several GPUs ->
    ``MirroredStrategy``; otherwise the default strategy. ``default`` / ``one_device`` /
    ``mirrored`` / ``multi_worker`` force one.

    Raises:
        ValueError: for an unknown name, or ``multi_worker`` without a valid ``TF_CONFIG``.
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}")
    if name == "auto":
        if _tf_config_cluster():
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if not _tf_config_cluster():
        raise UserError(
            "strategy 'multi_worker' needs TF_CONFIG with a cluster and this process's task, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def _tf_config_cluster() -> dict:
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"TF_CONFIG is not valid JSON: {exc}") from None
    return config.get("cluster") or {}


def strategy_name(strategy) -> str:
    """The name users know (``MultiWorkerMirroredStrategy``, not its class ``CollectiveAllReduceStrategy``)."""
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "MirroredStrategy"
    if isinstance(strategy, tf.distribute.OneDeviceStrategy):
        return "OneDeviceStrategy"
    return "default"


def is_chief(strategy) -> bool:
    """True on the one worker that writes checkpoints, logs and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                    "chief" not in resolver.cluster_spec().as_dict())


class DistributedTrainer:
    """Trains and evaluates one Keras model under a strategy with one shared step.

    The model and optimizer must be created inside ``strategy.scope()``.

    Args:
        model: a Keras model with one regression output ``(batch, 1)``, or, with ``loss.aux``, the outputs
            ``[grade, aux logits]`` of a ``RetinaConvNet`` built with the same ``aux``.
        optimizer: a Keras optimizer created under the same strategy.
        strategy: the ``tf.distribute.Strategy``.
        global_batch_size: examples per step over all replicas of all workers; must be a multiple
            of ``strategy.num_replicas_in_sync``.
        loss: the run's ``LossConfig`` (None: the squared error of the grade alone, the paper's).

    Example (ten steps on random 112 px images; ``tests/training/distributed_worker.py`` runs the same
    under each strategy)::

        import keras
        import numpy as np
        import tensorflow as tf

        from retina_scale.models.convnet import build_model

        images = np.random.default_rng(0).uniform(0, 255, (64, 112, 112, 3)).astype("float32")
        labels = np.arange(64, dtype="float32") % 5

        def make_examples():  # every (image, label) once; the trainer shards, repeats and batches
            return tf.data.Dataset.from_tensor_slices((images, labels))

        strategy = choose_strategy("auto")
        with strategy.scope():
            model = build_model("tiny", width=0.25)
            optimizer = keras.optimizers.SGD(3e-3, momentum=0.9, nesterov=True)
        trainer = DistributedTrainer(model, optimizer, strategy, global_batch_size=32)
        loss = trainer.train_steps(trainer.distribute_training(make_examples), steps=10)
    """

    def __init__(self, model, optimizer, strategy, global_batch_size: int, loss: LossConfig | None = None):
        import tensorflow as tf

        from retina_scale.models.convnet import grade_output

        replicas = strategy.num_replicas_in_sync
        if global_batch_size < 1 or global_batch_size % replicas:
            raise UserError(
                f"global batch size {global_batch_size} must be a positive multiple of the "
                f"{replicas} replica(s) in sync"
            )
        loss = loss or LossConfig()
        if getattr(model, "aux", "none") != loss.aux:
            raise UserError(f"the model's auxiliary head is {getattr(model, 'aux', 'none')!r} but loss.aux is "
                            f"{loss.aux!r}; build the model with aux={loss.aux!r}")
        aux, aux_weight = loss.aux, loss.aux_weight
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.global_batch_size = int(global_batch_size)
        self.per_replica_batch_size = self.global_batch_size // replicas
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        # The optimizer's state as built (zero moments, step 0): reset_optimizer puts it back.
        self._optimizer_start = [(v, np.array(v.numpy())) for v in optimizer.variables]

        def replica_step(images, labels, weights=None, keys=None):
            if weights is None:  # (images, labels): every example counts once
                weights = tf.ones_like(labels, tf.float32)
            with tf.GradientTape() as tape:
                # The loss in float32 whatever the model computes in (a mixed-precision policy's bf16).
                per_example = (per_example_loss(model(images, training=True), labels, aux, aux_weight)
                               * tf.cast(weights, tf.float32))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
                if model.losses:
                    penalties = [tf.cast(penalty, tf.float32) for penalty in model.losses]
                    loss += tf.nn.scale_regularization_loss(tf.add_n(penalties))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return loss

        def replica_predict(images, labels, weights, keys):
            predictions = tf.cast(tf.reshape(grade_output(model(images, training=False)), [-1]), tf.float32)
            return predictions, tf.cast(labels, tf.float32), tf.cast(weights, tf.float32), tf.cast(keys, tf.int64)

        @tf.function
        def train_step(iterator):
            losses = strategy.run(replica_step, args=tuple(next(iterator)))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

        @tf.function
        def predict_step(iterator):
            outputs = strategy.run(replica_predict, args=tuple(next(iterator)))
            return tuple(strategy.gather(t, axis=0) for t in outputs)

        self._train_step = train_step
        self._predict_step = predict_step

    # -- reuse -------------------------------------------------------------------------------------
    def reset_optimizer(self, learning_rate: float | None = None) -> None:
        """Puts the optimizer back as it was built (moments zero, step count 0) and sets its learning
        rate (a variable): a new run on the same trainer, without building (and tracing) a new one."""
        for variable, value in self._optimizer_start:
            variable.assign(value)
        if learning_rate is not None:
            self.optimizer.learning_rate.assign(float(learning_rate))

    def tracing_counts(self) -> dict:
        """How many times each step function has been traced (1 each once used; more means retracing)."""
        return {"train_step": self._train_step.experimental_get_tracing_count(),
                "predict_step": self._predict_step.experimental_get_tracing_count()}

    # -- input -------------------------------------------------------------------------------------
    def distribute_training(self, make_examples, *, shuffle_buffer: int = 0, seed: int = 0):
        """An iterator over per-replica training batches, repeated forever.

        Args:
            make_examples: ``fn(input_context) -> tf.data.Dataset`` of unbatched ``(image, label)``
                or ``(image, label, weight)`` examples for that input pipeline's shard, or
                ``fn() -> Dataset`` of all examples, which is then sharded by example here.
        """
        import tensorflow as tf

        def dataset_fn(input_context):
            ds = _call_with_context(make_examples, input_context)
            ds = _with_weights(ds).repeat()
            if shuffle_buffer:
                ds = ds.shuffle(shuffle_buffer, seed=seed + input_context.input_pipeline_id)
            return ds.batch(self.per_replica_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

        return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

    def distribute_evaluation(self, make_examples, num_examples: int):
        """Per-replica evaluation batches: every pipeline padded to the same number of steps.

        ``make_examples`` is as for ``distribute_training``; its examples may carry a fourth
        element, an int64 key (e.g. the image's index), which ``predict`` hands back so results can
        be matched to images whatever order the replicas gathered them in.

        Returns:
            ``(iterator, steps)``.
        """
        dataset, steps = self.evaluation_dataset(make_examples, num_examples)
        return iter(dataset), steps

    def evaluation_dataset(self, make_examples, num_examples: int):
        """``distribute_evaluation``'s distributed dataset, to iterate again for every evaluation (each
        ``iter()`` of it is one pass) rather than build again: ``(dataset, steps)``."""
        import tensorflow as tf

        steps = max(1, math.ceil(num_examples / self.global_batch_size))

        def dataset_fn(input_context):
            replicas_here = self.strategy.num_replicas_in_sync // input_context.num_input_pipelines
            per_pipeline = steps * self.per_replica_batch_size * replicas_here
            ds = _with_keys(_with_weights(_call_with_context(make_examples, input_context)))
            specs = ds.element_spec
            if all(spec.shape.is_fully_defined() for spec in specs):
                blank = tuple(tf.zeros(spec.shape, spec.dtype) for spec in specs)
            else:
                blank = tuple(tf.zeros_like(t) for t in next(iter(ds.take(1))))
            pad = tf.data.Dataset.from_tensors(blank).repeat()
            return ds.concatenate(pad).take(per_pipeline).batch(self.per_replica_batch_size, drop_remainder=True)

        return self.strategy.distribute_datasets_from_function(dataset_fn), steps

    # -- steps -------------------------------------------------------------------------------------
    def train_steps(self, iterator, steps: int, progbar=None) -> float:
        """Runs ``steps`` training steps; returns the mean loss (NaN or inf passed through)."""
        total = 0.0
        for step in range(steps):
            loss = float(self._train_step(iterator))
            total += loss
            if progbar is not None:
                progbar.update(step + 1, values=[("loss", loss)])
            if not math.isfinite(loss):
                return loss
        return total / max(1, steps)

    def predict(self, iterator, steps: int, with_keys: bool = False):
        """Runs ``steps`` evaluation steps; returns ``(labels, predictions)`` NumPy arrays of the
        real (non-padding) examples, identical on every worker, plus their keys if ``with_keys``
        (sorted by key then, so the order does not depend on the number of replicas)."""
        labels, predictions, keys = [], [], []
        for _ in range(steps):
            p, y, w, k = (t.numpy() for t in self._predict_step(iterator))
            keep = w > 0
            labels.append(y[keep])
            predictions.append(p[keep])
            keys.append(k[keep])
        labels, predictions, keys = np.concatenate(labels), np.concatenate(predictions), np.concatenate(keys)
        if not with_keys:
            return labels, predictions
        order = np.argsort(keys, kind="stable")
        return labels[order], predictions[order], keys[order]


def _call_with_context(make_examples, input_context):
    import inspect

    if inspect.signature(make_examples).parameters:
        return make_examples(input_context)
    return make_examples().shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


def _with_weights(ds):
    import tensorflow as tf

    if len(ds.element_spec) >= 3:
        return ds
    return ds.map(lambda image, label: (image, label, tf.constant(1.0)))


def _with_keys(ds):
    import tensorflow as tf

    if len(ds.element_spec) == 4:
        return ds
    return ds.map(lambda image, label, weight: (image, label, weight, tf.constant(-1, tf.int64)))
