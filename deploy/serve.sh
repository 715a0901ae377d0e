#!/bin/sh
# Starts the official TensorFlow Serving image on this machine's loopback interface only:
# REST on 127.0.0.1:8501, gRPC on 127.0.0.1:8500. Run from the repository root (saved_models/ and
# deploy/models.config are mounted read-only). To listen on every interface, drop the "127.0.0.1:"
# prefixes - and put authentication in front: TF Serving has none.
# Pin TF_SERVING_TAG to a release at least as new as the "tensorflow_version" in the export's metadata.json.
set -eu
TF_SERVING_TAG="${TF_SERVING_TAG:-latest}"
exec docker run --rm --name retina-serving \
  -p 127.0.0.1:8501:8501 -p 127.0.0.1:8500:8500 \
  -v "$PWD/saved_models:/models:ro" \
  -v "$PWD/deploy/models.config:/config/models.config:ro" \
  "tensorflow/serving:${TF_SERVING_TAG}" \
  --model_config_file=/config/models.config \
  --model_config_file_poll_wait_seconds=60
