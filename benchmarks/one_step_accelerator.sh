#!/usr/bin/env bash
# The one-step comparison of `benchmarks/one_step.py` (PD, CD, DMD2, reflow
# and the equal-time control, from one teacher) at a larger size, on one
# GPU in about 5 minutes. Not yet run on a GPU: the sizes below are an
# estimate (benchmarks/RESULTS.md, "One-step generators").
#
# The accelerator machines this project borrows have JAX with CUDA but
# neither TensorFlow nor Keras, and no network. So the run uses the JAX
# backend, Keras and the two compiled or pure-Python packages it lacks as
# carried wheels, and the Fashion-MNIST IDX files read without
# tensorflow-datasets. In two steps:
#
#   bash benchmarks/one_step_accelerator.sh prepare   # here: wheels, data
#   bash benchmarks/one_step_accelerator.sh run       # there, carrying
#                                                     # .whl and .data
#
# With this project's device tool: `run` with command `bash
# benchmarks/one_step_accelerator.sh run`, carry [".whl", ".data"] (33 MB
# with the 4 MB tree, under the 64 MiB limit) and timeout_s 420. `run`
# writes its log to $OUT (or the current folder) as one_step_gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-run}" in
prepare)
    keras_version=$(python3 -c "import keras; print(keras.__version__)")
    mkdir -p .whl .data/fashion-mnist
    grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >>.git/info/exclude
    grep -qx "/.data/" .git/info/exclude || echo "/.data/" >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        "keras==${keras_version}" namex optree importlib_resources
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .data/fashion-mnist/
    du -sh .whl .data
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PWD}" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    # One seed; a 6,000-step teacher at batch 256, 4 rounds of 500 steps,
    # every other method for PD's wall time.
    python3 benchmarks/one_step.py --data-dir .data/fashion-mnist \
        --seeds 1 --base-steps 6000 --round-steps 500 --batch-size 256 \
        --pairs 20000 --samples 5000 2>&1 | tee "${OUT:-.}/one_step_gpu.log"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
