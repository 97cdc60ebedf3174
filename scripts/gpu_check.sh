#!/usr/bin/env bash
# One-shot GPU check for a lent H100 (the `device` tool): environment, GPU tests, attention-kernel benchmark,
# training-step benchmark (~1.1B Llama, bf16, L = 64K/32K/8K), FlexAttention build/compile/recompile figures,
# then a short summary table. Installs nothing and needs no network; the project runs from the checkout
# (PYTHONPATH=$PWD). Every stage has its own `timeout` inside a global budget, and logs go to $OUT even when
# a stage fails. At most 9 files land in $OUT:
#
#   env.txt  pytest_gpu.log  attention_cuda.json  attention_cuda.log
#   train_step_cuda.json  train_step_cuda.png  train_step_cuda.log  summary.txt  wheels.txt (when wheels were installed)
#
# Usage (device machine, repository root):   bash scripts/gpu_check.sh
# CPU dry run with tiny sizes (checks the script end to end here):
#   bash scripts/gpu_check.sh --dry-run        (or GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh)
# Knobs: OUT (default ./gpu_check_out), PYTHON (default: the first of python, python3, .venv/bin/python that
# imports torch), GPU_CHECK_BUDGET_S (total seconds, default 470); per stage GPU_PYTEST_S, GPU_ATT_S,
# GPU_TRAIN_S (seconds), GPU_PYTEST_ARGS (default tests/gpu), GPU_TRAIN_LENGTHS (default "65536 32768 8192"),
# GPU_TRAIN_EXTRA (more train_step flags, e.g. "--backends varlen flex").
set -u -o pipefail

DRY="${GPU_CHECK_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/anchorcontext_inductor_cache}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

if [[ -z "${PYTHON:-}" ]]; then
  for cand in python python3 .venv/bin/python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PYTHON="$cand"; break; fi
  done
fi
PYTHON="${PYTHON:-python3}"

BUDGET="${GPU_CHECK_BUDGET_S:-470}"
T0=$SECONDS
STATUS=()

# run_stage NAME SECONDS LOGFILE CMD...: run CMD under `timeout`, capped by what is left of the budget
# (10 s are kept for the summary); its output goes to LOGFILE and its status to STATUS.
run_stage() {
  local name="$1" want="$2" log="$3"; shift 3
  local left=$(( BUDGET - (SECONDS - T0) - 10 ))
  local limit=$(( want < left ? want : left ))
  if (( limit < 5 )); then
    echo "[$name] skipped: budget spent" | tee -a "$log"
    STATUS+=("$name: skipped (budget spent)")
    return 0
  fi
  echo "== [$name] (limit ${limit}s, $(( SECONDS - T0 ))s elapsed) $*" | tee -a "$log"
  local s=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local what="ok"
  (( rc == 124 || rc == 137 )) && what="TIMEOUT after ${limit}s"
  (( rc != 0 && rc != 124 && rc != 137 )) && what="FAILED rc=$rc"
  [[ "$1" == "$PYTHON" && "${2:-}" == "-m" && "${3:-}" == "pytest" && $rc == 5 ]] && what="no tests collected"
  STATUS+=("$name: $what ($(( SECONDS - s ))s)")
  echo "== [$name] $what in $(( SECONDS - s ))s" | tee -a "$log"
  tail -n 3 "$log"
  return 0
}

if [[ "$DRY" == "1" ]]; then
  DEVICE=cpu; DTYPE=float32
  ATT_ARGS=(--device cpu --dtype float32 --lengths 256,512 --heads 4 --kv-heads 2 --head-dim 16 --mean-doc 64
            --repeats 2 --warmup 1 --threads 1 --backends sdpa)
  TRAIN_ARGS=(--preset tiny --device cpu --lengths 256 128 --repeats 2 --warmup 1 --threads 1)
  echo "# gpu_check DRY RUN on CPU with tiny sizes (python: $PYTHON)"
else
  DEVICE=cuda; DTYPE=bfloat16
  # Llama-3.2-1B-like attention shape (32 heads, 8 KV heads, head dim 64), realistic lognormal documents.
  ATT_ARGS=(--device cuda --dtype bfloat16 --lengths 8192,65536 --heads 32 --kv-heads 8 --head-dim 64
            --mean-doc 1024 --repeats 5 --warmup 2)
  # Longest first: the 64K figures are the goal; 8K is the first to go if the budget runs out.
  TRAIN_ARGS=(--preset gpu-1b --device cuda --lengths ${GPU_TRAIN_LENGTHS:-65536 32768 8192} --repeats 2 --warmup 1
              ${GPU_TRAIN_EXTRA:-})
fi

# ------------------------------------------------------------------------------- 0. carried wheels
# The device image has no network and no DeepSpeed (needed by tests/gpu/test_sp_gpu.py). Wheels carried in
# .whl/ (the device tool's carry=[".whl"]; build them with `make gpu-wheels`) are installed into a private
# --target dir, each only when its module is not importable already (never shadowing the image's packages).
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/anchorcontext_site"
  mkdir -p "$SITE"
  MISSING=$("$PYTHON" -c '
import importlib.util, os, sys
for path in sys.argv[1:]:
    if importlib.util.find_spec(os.path.basename(path).split("-")[0]) is None:
        print(path)
' .whl/*.whl)
  if [[ -n "$MISSING" ]]; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $MISSING >"$OUT/wheels.txt" 2>&1
    echo "# rc=$? installed into $SITE: $(for w in $MISSING; do basename "$w"; done | tr '\n' ' ')" >>"$OUT/wheels.txt"
    export PYTHONPATH="$PYTHONPATH:$SITE"
  fi
fi

# ---------------------------------------------------------------------------------------------- 1. env
{
  echo "# gpu_check $(date -u +%FT%TZ) dry_run=$DRY python=$PYTHON pwd=$PWD"
  command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi || echo "nvidia-smi: not available"
} >"$OUT/env.txt" 2>&1
run_stage env 40 "$OUT/env.txt" "$PYTHON" - <<'EOF'
import importlib, os, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "capability", f"{p.major}.{p.minor}",
          "bf16", torch.cuda.is_bf16_supported())
for mod in ("transformers", "accelerate", "flash_attn", "triton", "matplotlib", "pytest", "deepspeed"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(mod, "NOT importable:", type(e).__name__, str(e)[:120])
try:
    from torch.nn.attention.varlen import varlen_attn
    print("torch.nn.attention.varlen.varlen_attn: available")
except Exception as e:  # noqa: BLE001
    print("torch.nn.attention.varlen.varlen_attn: NOT available:", type(e).__name__, e)
try:
    import torch.nn.attention.flex_attention  # noqa: F401
    print("flex_attention: importable")
except Exception as e:  # noqa: BLE001
    print("flex_attention: NOT importable:", e)
import anchorcontext
from anchorcontext.attention.dispatch import resolve_backend
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("anchorcontext", anchorcontext.__version__, "from", os.path.dirname(anchorcontext.__file__))
print("backend auto on", dev, "->", resolve_backend("auto", dev))
EOF

# -------------------------------------------------------------------------------------------- 2. tests
run_stage pytest_gpu "${GPU_PYTEST_S:-110}" "$OUT/pytest_gpu.log" "$PYTHON" -m pytest -q --no-header -p no:cacheprovider \
  ${GPU_PYTEST_ARGS:-tests/gpu}

# ------------------------------------------------------------------------------- 3. attention kernels
run_stage attention "${GPU_ATT_S:-90}" "$OUT/attention_cuda.log" "$PYTHON" benchmarks/attention.py "${ATT_ARGS[@]}" \
  --out "$OUT/attention_cuda.json"

# --------------------------------------------------------------------------------- 4. training step
run_stage train_step "${GPU_TRAIN_S:-270}" "$OUT/train_step_cuda.log" "$PYTHON" benchmarks/train_step.py "${TRAIN_ARGS[@]}" \
  --out "$OUT/train_step_cuda.json" --png "$OUT/train_step_cuda.png"

# ------------------------------------------------------------------------------------------ 5. summary
{
  echo "# gpu_check summary ($(( SECONDS - T0 ))s of ${BUDGET}s budget, dry_run=$DRY, device=$DEVICE, dtype=$DTYPE)"
  for s in "${STATUS[@]}"; do echo "stage $s"; done
  echo "pytest: $(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/pytest_gpu.log" | tail -n 1)"
  timeout 20 "$PYTHON" - "$OUT" <<'EOF'
import json, sys, traceback
from pathlib import Path

out = Path(sys.argv[1])


def f(x, spec):
    return "-" if x is None else format(x, spec)


def section(fn):  # one broken section (a renamed field, a partial file) must not hide the others
    try:
        fn()
    except Exception:  # noqa: BLE001
        print("(summary section failed)\n" + traceback.format_exc(limit=2))


def env():
    p = out / "env.txt"
    for line in (p.read_text(errors="replace").splitlines() if p.exists() else []):
        if line.startswith(("device ", "torch ", "torch.nn.attention.varlen", "flash_attn", "backend auto")):
            print(line)


def attention():
    p = out / "attention_cuda.json"
    if not p.exists():
        print("\nattention kernel: no results")
        return
    a = json.loads(p.read_text())
    print("\nattention kernel (anchor vs full causal SDPA, same row):")
    print(f"{'L':>6} {'backend':8} {'pass':7} {'full ms':>8} {'anchor ms':>9} {'speedup':>7} {'limit':>6} {'frac':>6}")
    for r in a.get("results", []):
        print(f"{r.get('L', 0):6d} {str(r.get('backend')):8} {str(r.get('pass', '')):7} {f(r.get('full_ms'), '8.2f')} "
              f"{f(r.get('anchor_ms'), '9.2f')} {f(r.get('speedup'), '7.2f')} {f(r.get('flop_limit'), '6.2f')} "
              f"{f(r.get('fraction_of_limit'), '6.1%')}")


def train():
    p = out / "train_step_cuda.json"
    if not p.exists():
        print("\ntraining step: no results")
        return
    t = json.loads(p.read_text())
    mr = t.get("matmul_rate") or {}
    c = t["config"]
    print(f"\ntraining step ({c['n_params'] / 1e6:.0f}M params, {c['dtype']}, grad_ckpt={c['grad_ckpt']}; "
          f"dense matmul {f(mr.get('tflops'), '.3g')} TFLOP/s):")
    print(f"{'L':>6} {'backend':8} {'mode':9} {'step s':>7} {'tok/s':>8} {'x stock':>7} {'limit':>6} "
          f"{'frac':>5} {'peak GiB':>8} {'TFLOP/s':>7} {'%mm':>4}")
    for r in t.get("results", []):
        if not r.get("step_s"):
            print(f"{r['L']:6d} {r['backend']:8} {r['mode']:9} ERROR {r.get('error')}")
            continue
        peak = None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**30
        print(f"{r['L']:6d} {r['backend']:8} {r['mode']:9} {r['step_s']:7.3f} {r['tokens_per_s']:8.0f} "
              f"{f(r.get('speedup_vs_stock'), '7.2f')} {r['step_flop_ratio']:6.2f} "
              f"{f(r.get('fraction_of_limit_vs_stock'), '5.0%')} {f(peak, '8.1f')} "
              f"{f(r.get('achieved_tflops'), '7.1f')} {f(r.get('fraction_of_matmul_rate'), '4.0%')}")
    for fx in t.get("flex", []):
        parts = [f"{m}: build/step {fx[m + '_build_fraction_of_step']:.1%}, compile~{fx[m + '_compile_s_est']:.1f}s"
                 for m in ("full", "intra_doc", "anchor") if m + "_build_fraction_of_step" in fx]
        print(f"flex L={fx['L']}: BlockMask build {fx['block_mask_build_s'] * 1e3:.1f} ms; " + "; ".join(parts)
              + f"; graphs compiled while layouts changed at fixed L: {fx['dynamo_graphs_compiled_during_timed_steps']}")


for fn in (env, attention, train):
    section(fn)
EOF
} 2>&1 | tee "$OUT/summary.txt"
ls -la "$OUT"
exit 0
