"""Where the network looks: Grad-CAM heat maps of a stage or an export on any photos, as PNG overlays
(the photo as the network sees it, the heat map over it, the predicted grade in the title), with a
summary (explain.csv, explain.json) and, on the synthetic benchmark, the lesion hit rates.

--model takes a run folder (with --stage; default its last finished stage), a stage folder
(runs/NAME/stages/2-small), a .keras file, or an export (saved_models/NAME for its newest version, or
NAME/VERSION). An export is never loaded or run: its weights are read as data into the network its
metadata describes.

Photos: --images (a folder, searched recursively, or a CSV listing them), preprocessed by the cache's
own code as the run or export records; or cached images at the model's size: --cache (a run finds its
own) and --split with --splits (a run finds its own splits.csv). A photo that cannot be used gets its
reason in the error column and the run goes on.

Grad-CAM: the gradient of the continuous grade weighs the channels of the stage's last convolution
(--layer to choose another); the map is what raises the predicted grade, scaled to its maximum.

Lesion hit rate (the synthetic benchmark: lesions.csv, from --lesions or found beside the data set):
the share of lesions inside the hottest 5 % (--fraction) of the fundus disc of their photo's heat map;
microaneurysms on photos of true grade 1, haemorrhages and hard exudates on any photo that has them;
chance is 5 %. Intervals: a patient bootstrap (--bootstrap resamples).

Writes OUT/overlays/<photo>.png, OUT/explain.csv and OUT/explain.json (atomically).

Examples:
  retina-scale explain --model runs/quick --stage small --split test --out runs/quick/explain-small
  retina-scale explain --model runs/quick --split test --grades 1 --limit 20 --out explain/mild
  retina-scale explain --model saved_models/retina --images photos/ --out explain/photos
"""

from __future__ import annotations

import json
from pathlib import Path

from retina_scale.config import SPLIT_NAMES
from retina_scale.run_layout import RunLayout, StageLayout
from retina_scale.utils.errors import UserError


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="run folder, stage folder, .keras file or export")
    parser.add_argument("--stage", help="with a run folder: the stage (e.g. tiny, small); default the last finished")
    parser.add_argument("--images", help="a folder of photos (searched recursively) or a CSV listing them")
    parser.add_argument("--cache", help="a cache folder (default: the run's) to read cached images from")
    parser.add_argument("--split", choices=SPLIT_NAMES, help="only this split of --splits (default: the run's)")
    parser.add_argument("--splits", help="a run's splits.csv (with --split)")
    parser.add_argument("--lesions", help="lesions.csv of the synthetic data set (default: found beside the data)")
    parser.add_argument("--grades", help="only photos of these true grades, e.g. 1 or 1,2 (from lesions.csv, "
                                         "else the label)")
    parser.add_argument("--limit", type=int, help="at most this many photos (the first, in order)")
    parser.add_argument("--layer", help="the layer to explain (default: the last convolution, e.g. block4_conv3_lrelu)")
    parser.add_argument("--overlays", type=int, help="write overlays for the first N photos only (default: all)")
    parser.add_argument("--fraction", type=float, default=0.05, help="hot share of the fundus area (default 0.05)")
    parser.add_argument("--bootstrap", type=int, default=200, help="patient bootstrap resamples (default 200)")
    parser.add_argument("--batch-size", type=int, default=8, help="photos per Grad-CAM batch (default 8)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (without the photo rows)")


def resolve_model(path, stage: str | None):
    """``(Explainable, the run's RunLayout or None)`` for any model form; clear errors for a missing stage."""
    from retina_scale.commands.export import choose_stage
    from retina_scale.commands.predict import resolve_export
    from retina_scale.evidence.explain import load_export_model, load_stage

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    if path.is_dir() and RunLayout(path).stages_dir.is_dir():
        chosen, _ = choose_stage(path, stage)
        return load_stage(chosen.dir), RunLayout.from_folder(path)
    if stage:
        raise UserError(f"--stage needs --model to be a run folder (runs/NAME, with stages/); got {path}")
    export = resolve_export(path)
    if export.is_dir() and (export / "saved_model.pb").is_file():
        return load_export_model(export), None
    target = load_stage(path)
    run_root = StageLayout(path if path.is_dir() else path.parent, 0, "").run_root
    return target, RunLayout.from_folder(run_root) if RunLayout(run_root).config.is_file() else None


def _parse_grades(text: str | None) -> set[int] | None:
    if text is None:
        return None
    try:
        grades = {int(g) for g in text.split(",") if g.strip()}
    except ValueError:
        grades = set()
    if not grades or not grades <= set(range(5)):
        raise UserError(f"--grades must be grades 0-4 separated by commas, e.g. 1 or 1,2; got {text!r}")
    return grades


def _photos(args, target, run):
    """The photos to explain and the lesions.csv to use (or None)."""
    from retina_scale.evidence.explain import Photo, cache_photos, file_photos

    if args.images:
        if args.cache or args.split:
            raise UserError("give --images (photo files) or --cache/--split (cached images), not both")
        from retina_scale.commands.predict import list_images

        entries, _ = list_images(args.images)
        listed, photos = [], []
        for path, error in entries:
            if error:  # a folder that cannot be listed: an error row
                photos.append(Photo(str(path), Path(path).stem, _failing(error)))
            else:
                listed.append(path)
        root = Path(args.images) if Path(args.images).is_dir() else Path(args.images).parent
        return file_photos(listed, target.input_size, target.preprocessing) + photos, [root, root.parent]
    cache = Path(args.cache) if args.cache else run.cache if run else None
    if cache is None:
        raise UserError("give --images (photo files), or --cache with cached images (a run's model finds its own)")
    splits = args.splits or (run.splits if run and args.split else None)
    if args.split and not splits:
        raise UserError("--split needs --splits (the splits.csv of the run)")
    from retina_scale.data.cache import read_config

    data_root = (read_config(cache).get("data") or {}).get("root")
    # Caches record their data folder as an absolute path; those made before that fix recorded it as their maker gave
    # it, maybe relative to that process's folder, so a run's own synthetic set is also looked for in the run folder.
    candidates = [Path(data_root)] if data_root else []
    return cache_photos(cache, target.input_size, args.split, splits), candidates + ([run.synthetic] if run else [])


def _failing(reason: str):
    def load():
        raise UserError(reason)

    return load


def _select(photos, lesions, grades, limit):
    """The photos of the chosen true grades (lesions.csv's when known, else the label), at most ``limit``."""
    from retina_scale.evidence.explain import true_grade

    if grades is not None:
        def grade_of(photo):
            if lesions is not None:
                return true_grade(lesions.get(photo.lesion_id, []))
            return None if photo.label is None else int(photo.label)

        photos = [p for p in photos if grade_of(p) in grades]
    return photos[:limit] if limit is not None else photos


def run(args) -> int:
    from retina_scale.evidence.explain import explain, read_lesions

    for name, value, low in (("--limit", args.limit, 1), ("--overlays", args.overlays, 0),
                             ("--bootstrap", args.bootstrap, 0), ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            raise UserError(f"{name} must be >= {low}; got {value}")
    if not 0.0 < args.fraction < 1.0:
        raise UserError(f"--fraction must be between 0 and 1 (exclusive); got {args.fraction}")
    grades = _parse_grades(args.grades)
    target, run_layout = resolve_model(args.model, args.stage)
    photos, lesion_dirs = _photos(args, target, run_layout)
    lesions_csv = Path(args.lesions) if args.lesions else next(
        (d / "lesions.csv" for d in lesion_dirs if (d / "lesions.csv").is_file()), None)
    if lesions_csv is not None and not lesions_csv.is_file():
        raise FileNotFoundError(f"--lesions {lesions_csv} does not exist")
    lesions = read_lesions(lesions_csv) if lesions_csv is not None else None
    photos = _select(photos, lesions, grades, args.limit)
    if not photos:
        raise UserError("no photo to explain" + (f" of true grade {args.grades}" if grades else "")
                        + "; check --images, --cache, --split and --grades")
    summary = explain(target, photos, args.out, layer=args.layer, lesions=lesions, batch_size=args.batch_size,
                      fraction=args.fraction, overlays=args.overlays, n_boot=args.bootstrap, progress=not args.json)
    summary["lesions_csv"] = None if lesions_csv is None else str(lesions_csv)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "photos"}, indent=2))
    else:
        print(format_summary(summary, args.out))
    return 0


def format_summary(summary: dict, out) -> str:
    """What a person reads after the run: counts, where the files are, the hit rates against chance."""
    from retina_scale.run_layout import ExplainLayout
    from retina_scale.utils.tables import text_table

    files = ExplainLayout(out)
    lines = [f"Explained {summary['n_photos']} photos ({summary['n_errors']} with errors) with {summary['model']} "
             f"({summary['input_size']} px), layer {summary['layer']}",
             *(f"Note: {n}" for n in summary["notes"]),
             f"Overlays: {files.overlays}; summary: {files.summary}, {files.table}"]
    rates = summary.get("lesion_hit_rates")
    if rates:
        rows = [(group, _rate(r), str(r["n_lesions"]), str(r["n_photos"]), f"{r['chance']:.3f}")
                for group, r in rates.items()]
        lines += ["", f"Lesion hit rate: lesions inside the hottest {summary['hot_fraction']:.0%} of the fundus area",
                  text_table(("lesion group", "hit rate [95 % CI]", "lesions", "photos", "chance"), rows,
                             right=(2, 3, 4))]
    elif rates is not None:
        lines.append("No lesion of a counted kind on these photos (microaneurysms count on grade-1 photos only).")
    return "\n".join(lines)


def _rate(stat: dict) -> str:
    if stat["value"] is None:
        return "n/a"
    text = f"{stat['value']:.3f}"
    return text + (f" [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]" if stat["ci_low"] is not None else "")
