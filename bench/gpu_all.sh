#!/usr/bin/env bash
# On a GPU machine: the GPU-marked tests, then every benchmark, logs under $OUT (default /tmp).
# Wheels for packages the machine lacks (pyfarmhash for the test oracles) may be put in .whl/;
# they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" | tail -3
python3 -m bench.feature_ops 2>&1 | tee "$out/feature_ops.log"
python3 -m bench.hashtable 2>&1 | tee "$out/hashtable.log"
python3 -m bench.embedding 2>&1 | tee "$out/embedding.log"
python3 -m bench.embedding_passes 2>&1 | tee "$out/embedding_passes.log"
python3 bench/io.py --threads 1,2,4,8 --repeat 3 2>&1 | tee "$out/io.log" | tail -12
python3 -m bench.e2e_step --sync-debug 2>&1 | tee "$out/e2e_step.log" | tail -16
python3 -m bench.step_host --device cuda --batch-sizes 64 1024 4096 --seq-len 1000 --max-seq-len 2000 2>&1 | tee "$out/step_host.log" | head -8
if [ "$(nvidia-smi --list-gpus | wc -l)" -ge 2 ]; then  # scaling and all-to-all traffic: 2 GPUs
  python3 -m bench.e2e_step --world-size 2 2>&1 | tee "$out/e2e_scaling.log" | tail -8
  python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m bench.sharded_traffic 2>&1 | tee "$out/sharded_traffic.log" | tail -10
fi
