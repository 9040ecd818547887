#!/usr/bin/env bash
# Run HERE (where pip reaches the package index), before a session's device calls: downloads into
# .whl/ (git-ignored) the wheels that `ldmq bench gpu` needs and the device image lacks or has in
# other versions (see /work/.library/device/KINDS.md), at the versions of this checkout's venv.
# The device machine runs Python 3.12 on x86-64 and reaches no index; tools/device/bench-gpu.sh
# installs these there. Name `.whl` in the run's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}

# ldmq's import closure for the bench (worker.jobs.sample → shared → settings, storage, DB models)
# minus what the device image already holds (torch, numpy, pillow, safetensors, tokenizers, …).
PACKAGES=(
  diffusers huggingface_hub hf-xet httpx2 httpcore2 truststore transformers typer importlib_metadata
  pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions
  sqlalchemy greenlet boto3 botocore s3transfer jmespath
)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$name")
  pins+=("$name==$version")
done

rm -rf .whl && mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls .whl
du -sh .whl
