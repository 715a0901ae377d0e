"""Preprocess a fundus data set once per scale into a cache the trainer reads.

Decodes every image once (reduced JPEG decoding when the sizes allow), finds and crops the fundus disc,
writes one square JPEG (or PNG) per size, a manifest and a failures.csv. Resumable: a second run skips
finished images and repairs missing or damaged outputs.
"""

from __future__ import annotations

import argparse

from retina_scale.config import FORMATS, MAX_PIXELS, NORMALIZATIONS
from retina_scale.utils.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder holding the images")
    parser.add_argument("--labels", help="labels CSV (default: trainLabels.csv / train.csv in or beside --data)")
    parser.add_argument("--format", choices=FORMATS,
                        help="data-set layout (default: detected)")
    parser.add_argument("--image-col", help="image column of a generic CSV (--format csv)")
    parser.add_argument("--label-col", help="label column of a generic CSV (--format csv)")
    parser.add_argument("--sizes", default="112,224,448,896", help="comma-separated square sizes (default: %(default)s)")
    parser.add_argument("--out", required=True, help="cache folder to write (created if needed)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any image failed")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                        help="colour normalisation: none, or B. Graham's local-average subtraction (default: none)")
    parser.add_argument("--no-mask", dest="mask", action="store_false",
                        help="keep the pixels outside the disc's circle (default: black them out)")
    parser.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                        help="cached files: JPEG quality 95, or lossless PNG (5x larger, slower) (default: jpeg)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help="refuse photos of more pixels than this (width x height, read from the header before "
                             "decoding) (default: %(default)s)")
    parser.add_argument("--verify", action="store_true",
                        help="check every cached file's CRC-32 on resume, not only its size")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    import json

    from retina_scale.config import PreprocessConfig
    from retina_scale.data.cache import parse_sizes, prepare_cache
    from retina_scale.data.sources import read_dataset

    sizes = parse_sizes(args.sizes)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.format == "csv" and not (args.image_col and args.label_col and args.labels):
        raise UserError("--format csv needs --labels, --image-col and --label-col")
    config = PreprocessConfig(normalize=args.normalize, mask=args.mask, max_pixels=args.max_pixels)
    dataset = read_dataset(args.data, labels=args.labels, format=args.format,
                           image_col=args.image_col, label_col=args.label_col)
    result = prepare_cache(dataset, args.out, sizes=sizes, config=config, workers=args.workers,
                           verify=args.verify, progress=args.progress, image_format=args.image_format)
    if result.failures:
        shown = result.failures[:10]
        width = max(len(f.image) for f in shown)
        print("failed images:")
        for f in shown:
            print(f"  {f.image:<{width}}  {f.reason}")
        if len(result.failures) > len(shown):
            print(f"  ... {len(result.failures) - len(shown)} more in {result.out / 'failures.csv'}")
    print(json.dumps({"prepared": result.prepared, "skipped": result.skipped, "failed": result.failed,
                      "cache": str(result.out)}))
    print(result.summary())
    if result.prepared + result.skipped == 0:
        return 1
    if args.strict and result.failed:
        return 1
    return 0
