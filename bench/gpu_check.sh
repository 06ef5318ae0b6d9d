#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU host (the device tool) or any CUDA machine with torch
# and Triton installed: the kernel tests compiled (not interpreted), the CUDA tier test, the engine
# on CUDA against transformers per mode (bench/gpu_engine.py), then bench/kernels.py.
#
#   bash bench/gpu_check.sh OUTDIR [TOKENIZER_DIR]
#
# TOKENIZER_DIR: SmolLM2's tokenizer.json + tokenizer_config.json (default .gpu/, copied there from
# ~/.cache/pdcluster/tokenizers/<key>/ on a machine that has run the engine). Wheels in .whl/ (gguf,
# deflate: what the engine imports beyond a stock CUDA torch image) are installed to /tmp/site first.
# The package is imported through a symlink tree (/tmp/pkg/pdcluster -> this checkout's folders),
# run from /tmp, so the checkout root (whose kernels/ would shadow Hugging Face's) is never on sys.path.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR [TOKENIZER_DIR]}
R=$(cd "$(dirname "$0")/.." && pwd)
TOK=${2:-$R/.gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls "$R"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$R"/.whl/*.whl
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/pdcluster
for f in "$R"/pdcluster/*; do ln -s "$f" /tmp/pkg/pdcluster/; done
for d in engine kernels router prefill_worker decode_worker kv_transfer deploy bench sim; do ln -s "$R/$d" /tmp/pkg/pdcluster/$d; done
export PYTHONPATH=/tmp/pkg:/tmp/site
cd /tmp
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0
step() {  # step NAME SECONDS CMD...: run with a time bound, keep its log, remember a failure
  local name=$1 secs=$2; shift 2
  echo "== $name"; timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
  local s=${PIPESTATUS[0]}; echo "== $name: exit $s"; [ "$s" = 0 ] || rc=1
}
PYT=(python3 -m pytest -q -p no:cacheprovider --rootdir "$R" -c "$R/pyproject.toml")
step kernel-tests 180 "${PYT[@]}" "$R/tests/kernels"
step tiers-cuda 40 "${PYT[@]}" "$R/tests/unit/test_kv_tiers.py" -k cuda
step gpu-engine 240 python3 -m pdcluster.bench.gpu_engine --tokenizer "$TOK" --out "$OUT/gpu-engine.json"
step bench-kernels 90 python3 -m pdcluster.bench.kernels
step bench-kernels-smollm2 40 python3 -m pdcluster.bench.kernels --heads 9 --kv-heads 3 --head-dim 64 --hidden 576
exit $rc
