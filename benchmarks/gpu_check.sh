#!/usr/bin/env bash
# The GPU check of issue 18 (benchmarks/gpu_check.py) as one command on a bare GPU machine that has
# PyTorch, transformers, PEFT and pyarrow but not Ray, TRL or DeepSpeed. ama_ray.config needs
# pydantic, which comes along as wheels in benchmarks/.gpu_wheels (git-ignored; fetch them here
# once with `bash benchmarks/gpu_check.sh --fetch-wheels`, then carry that folder to the machine).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine: < 5 min; gpu_check.json into $OUT
#   bash benchmarks/gpu_check.sh --cpu      # the CPU fallback, anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/.gpu_wheels
PY=${PYTHON:-python}
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    version=$($PY -c "import pydantic; print(pydantic.VERSION)")
    for cp in 310 311 312 313; do
        $PY -m pip download -q "pydantic==$version" --only-binary=:all: --python-version "$cp" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS"
    done
    ls "$WHEELS"
    exit 0
fi
if ! $PY -c "import pydantic" 2>/dev/null; then
    site=$(mktemp -d)
    $PY -m pip install -q --no-index --find-links "$WHEELS" --target "$site" pydantic
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
exec timeout 300 $PY benchmarks/gpu_check.py "$@"
