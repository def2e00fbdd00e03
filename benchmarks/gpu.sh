#!/usr/bin/env bash
# Run benchmarks/gpu.py on a GPU machine whose image lacks the transformers version vtprune needs.
#
# The machine (one H200: torch 2.11, transformers 5.17, no downloads) gets the carried wheels installed into a
# temporary folder put first on PYTHONPATH; vtprune itself runs from the working tree. Only transformers is carried:
# the image's huggingface_hub 1.33, tokenizers 0.23.2, safetensors 0.8, regex, typer, rich and matplotlib meet what
# transformers 5.23 and vtprune require (checked with pip download + the wheels' METADATA).
#
# Here, once (13 MB, ignored by git through benchmarks/wheels/.gitignore):
#   python -m pip download --no-deps --only-binary=:all: -d benchmarks/wheels transformers==5.23.0
# There, through the device tool: run(command="bash benchmarks/gpu.sh --out $OUT", carry=["benchmarks/wheels"])
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash benchmarks/gpu.sh [--wheels DIR] [--python PY] [--dry-run] [--help] [gpu.py options ...]

  --wheels DIR   folder of carried wheels (default: benchmarks/wheels); installed with
                 pip install --no-index --no-deps --target <temp dir>, which goes first on PYTHONPATH
  --python PY    interpreter (default: $PYTHON or python3, the image's torch environment)
  --dry-run      check the wheels and the interpreter, print the commands and gpu.py's plan; measure nothing
  --help         this text, then gpu.py's options

Every other option goes to benchmarks/gpu.py (e.g. --out "$OUT", --quick, --budget 400).
Writes gpu.json, gpu.md, gpu.png (and gpu.log, this run's output) into --out (default gpu-out).
EOF
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="$root/benchmarks/wheels"
python="${PYTHON:-python3}"
dry=0
help=0
out="gpu-out"
pass=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --dry-run) dry=1; pass+=("--dry-run"); shift ;;
        -h|--help) help=1; shift ;;
        --out) out="$2"; pass+=("--out" "$2"); shift 2 ;;
        *) pass+=("$1"); shift ;;
    esac
done

cd "$root"
if [[ $help -eq 1 ]]; then
    usage
    echo
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" benchmarks/gpu.py --help || true
    exit 0
fi

mkdir -p "$out"
log="$out/gpu.log"
echo "gpu.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), root $root, python $python" | tee "$log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu \
    --format=csv 2>&1 | tee -a "$log" || echo "gpu.sh: no nvidia-smi" | tee -a "$log"

shopt -s nullglob
found=("$wheels"/*.whl)
shopt -u nullglob
site=""
if [[ ${#found[@]} -eq 0 ]]; then
    echo "gpu.sh: no wheels in $wheels: using the interpreter's own transformers (vtprune needs >= 5.23)" | tee -a "$log"
else
    echo "gpu.sh: wheels: $(cd "$wheels" && ls ./*.whl | xargs -n1 basename | tr '\n' ' ')" | tee -a "$log"
    if [[ $dry -eq 1 ]]; then
        echo "gpu.sh: would run: $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target <temp> ${found[*]}" | tee -a "$log"
    else
        site="$(mktemp -d /tmp/vtprune-site.XXXXXX)"
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${found[@]}" 2>&1 | tee -a "$log"
    fi
fi
export PYTHONPATH="${site:+$site:}$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# versions first: a wrong transformers must fail here, in one clear line, not deep inside a model build
if ! "$python" - <<'EOF' 2>&1 | tee -a "$log"; then
import importlib.metadata as metadata
import sys

names = ("torch", "transformers", "triton", "huggingface_hub", "tokenizers", "safetensors", "regex", "matplotlib", "rich", "typer")
versions = {}
for name in names:
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = "missing"
print("gpu.sh: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
import transformers

major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
if (major, minor) < (5, 23):
    print(f"gpu.sh: transformers {transformers.__version__} is imported (from {transformers.__file__}); vtprune needs "
          ">= 5.23: carry its wheel in --wheels (see the header of benchmarks/gpu.sh)")
    sys.exit(1)
import torch

print(f"gpu.sh: torch sees CUDA: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
EOF
    if [[ $dry -eq 0 ]]; then
        exit 1
    fi
    echo "gpu.sh: (dry run: going on to print the plan)" | tee -a "$log"
fi

echo "gpu.sh: $python benchmarks/gpu.py ${pass[*]}" | tee -a "$log"
set +e
"$python" benchmarks/gpu.py "${pass[@]}" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e
[[ -n "$site" ]] && rm -rf "$site"
exit "$status"
