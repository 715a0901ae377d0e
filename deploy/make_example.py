"""Writes the README's REST example: request.json for a photo (and a file that is not a photo) and the response
TF Serving gives, computed here by calling the loaded SavedModel's predict_images signature (docker cannot run on
the machine where the README was written). The JSON encoding follows TF Serving's row format: one object per
instance, NaN written as NaN.

    python deploy/make_example.py --model saved_models/retina/1 --images photo.jpeg not_a_photo.txt --out request.json
"""

import argparse
import base64
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--out", default="request.json")
    args = parser.parse_args(argv)
    photos = [Path(p).read_bytes() for p in args.images]
    request = {"signature_name": "predict_images",
               "instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in photos]}
    import tensorflow as tf

    from retina_scale.serving.export import load_export
    from retina_scale.utils.fileio import write_text

    write_text(args.out, json.dumps(request))

    predict, _ = load_export(args.model, signature="predict_images")
    out = {k: v.numpy().tolist() for k, v in predict(images=tf.constant(photos)).items()}
    rows = []
    for i in range(len(photos)):
        row = {k: out[k][i] for k in sorted(out)}
        row["error"] = row["error"].decode("utf-8")
        rows.append(row)
    json.dump({"predictions": rows}, sys.stdout, indent=4)
    print()


if __name__ == "__main__":
    main()
