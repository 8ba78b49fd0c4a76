#!/usr/bin/env bash
# Downloads, on a machine with PyPI, the wheels the GPU suite's anchors need on a device without network:
# fla 0.6 (the GLA kernel anchor), MEGABYTE-pytorch (the generation anchor), gguf + accelerate (the .gguf
# reader) and their pure-Python needs that the device image lacks. They land in .whl/ (git-ignored); a device
# call names .whl in its carry list, and benchmarks/gpu_suite.sh installs them into /tmp/site.
#   bash benchmarks/fetch_wheels.sh
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in flash-linear-attention==0.6.0 fla-core==0.6.0 MEGABYTE-pytorch==0.3.6 einops==0.8.2 beartype==0.23.1 \
           gguf==0.19.0 accelerate==1.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -l .whl
