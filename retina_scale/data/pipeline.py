"""tf.data training and evaluation input read from a ``retina-scale prepare`` cache, for one stage size.

What each epoch draws is a pure function of ``(seed, epoch)``: :meth:`CacheInput.epoch_indices` resamples the
images with o_O's class weights ``w_t = r**t * w0 + (1 - r**t) * wf`` (o_O: the team whose Kaggle 2015 DR
solution this project follows), or, without rebalancing, permutes them; and each drawn element's augmentation
uses stateless random ops seeded by ``(seed, epoch, position)``. A run resumed at epoch ``t`` therefore sees
exactly the batches an uninterrupted run would.

Augmentation (:mod:`retina_scale.data.augment`) follows o_O's and runs in tf ops on each batch, never in Python.

Elements are ``(images, labels)``: float32 RGB in [0, 255] of shape ``(batch, size, size, 3)`` (the models
rescale internally) and float32 grades; with ``include_ids=True`` a third item holds the image ids (strings).

For several replicas or workers pass the strategy to :meth:`CacheInput.distribute` (or an
``tf.distribute.InputContext`` to :meth:`CacheInput.dataset`): every input pipeline takes every k-th element
of the epoch's draw before reading any file, and batches at the per-replica size, so the pipelines together
cover the draw exactly once.

Example:

```python
from retina_scale.data.pipeline import CacheInput
train = CacheInput("cache/eyepacs", size=224, split="train", split_file="runs/x/splits.csv")
ds = train.dataset(global_batch_size=64, start_epoch=0, epochs=10)
model.fit(ds, epochs=10, steps_per_epoch=train.steps_per_epoch(64))
```
"""

from __future__ import annotations

import numpy as np

from retina_scale.config import AugmentConfig, ResampleConfig
from retina_scale.data.augment import augment_batch, augment_drawn, draw
from retina_scale.data.cache import read_config, read_manifest
from retina_scale.utils.errors import UserError


def class_weights(epoch: int, config: ResampleConfig = ResampleConfig(), labels=None) -> np.ndarray:
    """``w_t = r**t * w0 + (1 - r**t) * wf`` for epoch ``t`` (``labels`` needed when ``w0="balanced"``), with
    grade 1's weight multiplied by ``config.grade1_boost`` (1 by default: o_O's weights).

    >>> class_weights(0, ResampleConfig(w0=(1, 1, 1, 1, 1), grade1_boost=3)).tolist()
    [1.0, 3.0, 1.0, 1.0, 1.0]
    """
    if epoch < 0:
        raise UserError(f"epoch must be >= 0, got {epoch}")
    if isinstance(config.w0, str):
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=5).astype(np.float64)
        w0 = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
    else:
        w0 = np.asarray(config.w0, np.float64)
    decay = config.r ** epoch
    weights = decay * w0 + (1 - decay) * np.asarray(config.wf, np.float64)
    weights[1] *= config.grade1_boost
    return weights


def draw_epoch(labels: np.ndarray, epoch: int, seed: int, resample: ResampleConfig | None) -> np.ndarray:
    """Indices of the images one epoch visits, in order: a pure function of (labels, epoch, seed, resample)."""
    n = len(labels)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    if resample is None or not resample.enabled:
        return rng.permutation(n)
    w = class_weights(epoch, resample, labels)[np.asarray(labels, np.int64)]
    if w.sum() <= 0:
        raise UserError("every image has class weight 0; check ResampleConfig.w0/wf")
    return rng.choice(n, size=n, replace=True, p=w / w.sum())


def element_plan(n_images: int, global_batch_size: int, seed: int, draw=None, start_epoch: int = 0,
                 epochs: int = 1, pipelines: int = 1, pipeline_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Which images one input pipeline reads, in order, and each element's augmentation seed; no tf involved.

    Args:
        n_images: images in the split.
        global_batch_size: batch size summed over all replicas; a training epoch is cut to whole global batches.
        seed: the input's seed (the first half of every element's seed).
        draw: training: ``draw(epoch)`` -> the indices the epoch visits (:meth:`CacheInput.epoch_indices`);
            ``None``: evaluation, every image once in order.
        start_epoch, epochs: the epochs the plan holds, back to back.
        pipelines, pipeline_id: this pipeline keeps the elements at positions ``pipeline_id``,
            ``pipeline_id + pipelines``, ... of each epoch, so the pipelines together read each position once.

    Returns:
        ``(index, seeds)``: int64 image indices ``[N]`` and int64 seeds ``[N, 2]`` =
        ``(seed, epoch * 2**31 + position in the epoch)``: a pure function of (seed, epoch, position).
    """
    gb = int(global_batch_size)
    if draw is not None:
        per_epoch = (n_images // gb) * gb
        if per_epoch % pipelines:
            raise UserError(f"global batch size {gb} must be a multiple of the {pipelines} input pipelines")
        chosen = range(start_epoch, start_epoch + epochs)
        index = np.concatenate([np.asarray(draw(e))[:per_epoch] for e in chosen])
        epoch_of = np.repeat(np.arange(start_epoch, start_epoch + epochs, dtype=np.int64), per_epoch)
        position = np.tile(np.arange(per_epoch, dtype=np.int64), epochs)
    else:
        index = np.arange(n_images)
        epoch_of = np.zeros(n_images, np.int64)
        position = np.arange(n_images, dtype=np.int64)
    keep = (position % pipelines) == pipeline_id
    index, epoch_of, position = index[keep], epoch_of[keep], position[keep]
    seeds = np.stack([np.full_like(position, seed), epoch_of * (1 << 31) + position], axis=1)
    return index.astype(np.int64), seeds.astype(np.int64)


class CacheInput:
    """Training or evaluation input for one stage size of a cache.

    Args:
        cache_dir: folder written by ``retina-scale prepare``.
        size: stage size (must be in the cache).
        split: keep only this split (``train``/``val``/``test``) of ``split_file``.
        split_file: a file written by :func:`retina_scale.data.sources.write_splits`.
        augment: augmentation for training, ``None`` for none.
        resample: class rebalancing for training, ``None`` for a plain shuffle.
        seed: seeds draws and augmentation.
        in_memory: decode every image once and keep them in RAM (``True``), read and decode each drawn image
            (``False``), or ``"auto"``: in RAM when the decoded images take at most ``memory_budget`` bytes.
            Same elements either way; in RAM saves the per-sample decode (most of the input's cost at
            112 and 224 px).
        memory_budget: bytes of decoded images ``"auto"`` may hold (default 2 GiB; EyePACS' 35k training
            images take 1.3 GB at 112 px, 5.3 GB at 224).
    """

    def __init__(self, cache_dir, size: int, split: str | None = None, split_file=None,
                 augment: AugmentConfig | None = AugmentConfig(), resample: ResampleConfig | None = ResampleConfig(),
                 seed: int = 0, in_memory: bool | str = "auto", memory_budget: int = 2 << 30, jit: bool = True):
        self.cache_dir = cache_dir
        self.size = int(size)
        df = read_manifest(cache_dir, self.size)
        if split is not None:
            if split_file is None:
                raise UserError("split needs split_file (the splits.csv of the run)")
            from retina_scale.data.sources import read_splits

            splits = read_splits(split_file)
            df = df[[splits.get(i) == split for i in df["image"]]].reset_index(drop=True)
        if len(df) == 0:
            raise UserError(f"no images of size {size}{' in split ' + split if split else ''} in cache {cache_dir}")
        self.image_ids = df["image"].astype(str).to_numpy()
        self.paths = df["path"].to_numpy()
        raw = df["label"].astype(str).to_numpy()
        self.labels = np.array([float(x) if x not in ("", "nan") else np.nan for x in raw], np.float32)
        config = read_config(cache_dir)
        self.graham = config.get("preprocess", {}).get("normalize") == "graham"
        self.image_format = config.get("image_format", "png")
        pca = config.get("color_pca") or {"eigenvalues": [0, 0, 0], "eigenvectors": np.eye(3).tolist()}
        self.pca_vectors = np.asarray(pca["eigenvectors"], np.float32)
        self.pca_std = np.sqrt(np.maximum(np.asarray(pca["eigenvalues"], np.float32), 0))
        self.augment = augment
        self.resample = resample
        self.seed = int(seed)
        if resample is not None and np.isnan(self.labels).any():
            raise UserError("class resampling needs labels, but some images of the cache are unlabelled")
        if in_memory not in (True, False, "auto"):
            raise UserError(f"in_memory must be True, False or 'auto', got {in_memory!r}")
        self.in_memory = bool(in_memory is True or (in_memory == "auto" and len(self) * self.size**2 * 3 <= memory_budget))
        self._memory = None
        self.jit = jit

    def _load_all(self) -> np.ndarray:
        """Every image of the split, decoded once, by the same TensorFlow decoder as the file-reading path."""
        if self._memory is None:
            import tensorflow as tf

            out = np.empty((len(self), self.size, self.size, 3), np.uint8)
            ds = tf.data.Dataset.from_tensor_slices(self.paths).map(
                lambda p: tf.cast(self._decode(p), tf.uint8), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            i = 0
            for batch in ds.batch(256):
                out[i : i + len(batch)] = batch.numpy()
                i += len(batch)
            self._memory = out
        return self._memory

    def __len__(self) -> int:
        return len(self.paths)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The indices epoch ``epoch`` draws, in order (pure function of seed and epoch)."""
        labels = None if self.resample is None else self.labels.astype(np.int64)
        return draw_epoch(labels if labels is not None else np.zeros(len(self)), epoch, self.seed, self.resample)

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """Training batches per epoch (the draw is cut to a whole number of global batches)."""
        steps = len(self) // int(global_batch_size)
        if steps == 0:
            raise UserError(f"global batch size {global_batch_size} exceeds the {len(self)} images of the split")
        return steps

    # ------------------------------------------------------------------------------------------- tf.data

    def _decode(self, path):
        import tensorflow as tf

        data = tf.io.read_file(path)
        img = tf.io.decode_png(data, channels=3) if self.image_format == "png" else tf.io.decode_jpeg(data, channels=3)
        img = tf.ensure_shape(img, (self.size, self.size, 3))
        return tf.cast(img, tf.float32)

    def _augment_options(self) -> dict:
        return dict(fill=128.0 if self.graham else 0.0, mask_fraction=0.9 if self.graham else 1.0, jit=self.jit)

    def augment_batch(self, images, seeds):
        """Augment a batch (float32 ``[B, S, S, 3]``) with per-element stateless ``seeds`` (int64 ``[B, 2]``):
        what :meth:`dataset` yields for elements with those seeds."""
        return augment_batch(images, seeds, self.augment, self.pca_vectors, self.pca_std, **self._augment_options())

    def dataset(self, global_batch_size: int, training: bool = True, start_epoch: int = 0, epochs: int = 1,
                input_context=None, include_ids: bool = False):
        """A batched ``tf.data.Dataset``.

        Args:
            global_batch_size: batch size summed over all replicas.
            training: draw (resample/shuffle), augment and drop the last partial batch; else every image once
                in manifest order, unaugmented.
            start_epoch: first epoch drawn (a resumed run passes the epoch it resumes at).
            epochs: how many epochs the dataset holds, back to back.
            input_context: a ``tf.distribute.InputContext``: this pipeline keeps every
                ``num_input_pipelines``-th element and batches at the per-replica size.
            include_ids: yield ``(images, labels, ids)``.
        """
        gb = int(global_batch_size)
        if gb < 1:
            raise UserError(f"global batch size must be >= 1, got {global_batch_size}")
        if training:
            self.steps_per_epoch(gb)  # refuses a global batch larger than the split
        pipelines, pipeline_id = (1, 0) if input_context is None else (input_context.num_input_pipelines,
                                                                        input_context.input_pipeline_id)
        index, seeds = element_plan(len(self), gb, self.seed, draw=self.epoch_indices if training else None,
                                    start_epoch=start_epoch, epochs=epochs, pipelines=pipelines,
                                    pipeline_id=pipeline_id)
        batch = gb if input_context is None else input_context.get_per_replica_batch_size(gb)
        return self._batches(index, seeds, batch, training, include_ids)

    def _batches(self, index: np.ndarray, seeds: np.ndarray, batch: int, training: bool, include_ids: bool):
        """The tf.data graph over a plan of :func:`element_plan`: read (or gather from memory), batch, augment."""
        import tensorflow as tf

        paths = tf.constant(self.paths)
        labels = tf.constant(self.labels)
        ids = tf.constant(self.image_ids)
        augment = training and self.augment is not None
        ds = tf.data.Dataset.from_tensor_slices((index, seeds))

        memory = tf.constant(self._load_all()) if self.in_memory else None

        def load(i, seed):
            image = tf.cast(tf.gather(memory, i), tf.float32) if memory is not None else self._decode(tf.gather(paths, i))
            element = {"image": image, "label": tf.gather(labels, i), "id": tf.gather(ids, i)}
            if augment:  # each element's draw here, in the parallel map, rather than in a loop over the batch
                element["uniforms"], element["normals"] = draw(seed)
            return element

        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        def finish(b):
            images = b["image"]
            if augment:
                images = augment_drawn(images, b["uniforms"], b["normals"], self.augment, self.pca_vectors,
                                       self.pca_std, **self._augment_options())
            if include_ids:
                return images, b["label"], b["id"]
            return images, b["label"]

        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        options = tf.data.Options()
        # Sharding is done by element_plan, before any file is read.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        options.deterministic = True
        # One thread per input op: on a small CPU, parallelism inside ops only steals cores from the model.
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
        return ds.prefetch(tf.data.AUTOTUNE)

    def distribute(self, strategy, global_batch_size: int, **kwargs):
        """The dataset distributed over ``strategy``'s replicas and workers (one input pipeline per worker)."""
        return strategy.distribute_datasets_from_function(
            lambda ctx: self.dataset(global_batch_size, input_context=ctx, **kwargs))
