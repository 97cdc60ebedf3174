#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (the `device` tool): environment, GPU tests (tests/gpu, incl. the
# DeepSpeed Ulysses test_sp_gpu.py), the attention-kernel benchmark (L = 8K..128K; full/intra_doc/anchor x varlen
# K/V gather vs gather-free LSE merge), the training-step benchmark (~1.1B Llama, bf16, gather and merge), the
# chunked vs stock loss (SmolLM2-135M widths, 30 layers, bf16, L = 16K..128K: peak memory and step time), the
# FlexAttention kernel_options variants, then a summary. Installs nothing and needs no network; the project runs
# from the checkout (PYTHONPATH=$PWD). Every stage has its own `timeout` inside a global budget (stages run in
# order of importance; the last ones get what is left), and logs go to $OUT even when a stage fails. At most
# 8 files land in $OUT:
#
#   env.txt (incl. carried-wheel install)  pytest_gpu.log  attention_cuda.json (varlen and flex rows)
#   attention_cuda.log  train_step_cuda.json (the merge run under "merge_run")  loss_memory_cuda.json
#   train_step_cuda.log (train step and loss stages)  summary.txt
#
# Usage (device machine, repository root):   bash scripts/gpu_check.sh
# CPU dry run with tiny sizes (checks the script end to end here):
#   bash scripts/gpu_check.sh --dry-run        (or GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh)
# Knobs: OUT (default ./gpu_check_out), PYTHON (default: the first of python, python3, .venv/bin/python that
# imports torch), GPU_CHECK_BUDGET_S (total seconds, default 530); per stage GPU_PYTEST_S, GPU_ATT_S, GPU_TRAIN_S,
# GPU_TRAIN_MERGE_S, GPU_LOSS_S, GPU_FLEX_S, GPU_FLEX_INTRA_S (seconds), GPU_PYTEST_ARGS (default tests/gpu),
# GPU_ATT_LENGTHS (default 8192,16384,32768,65536,131072), GPU_FLEX_LENGTHS (default 65536,8192), GPU_TRAIN_LENGTHS
# (default "65536 32768 8192"), GPU_TRAIN_MERGE_LENGTHS (default "65536 8192"), GPU_TRAIN_EXTRA (more train_step
# flags), GPU_LOSS_LENGTHS (default "16384 32768 65536 131072"), GPU_LOSS_OVERHEAD_L (default 16384; 0 = off).
set -u -o pipefail

DRY="${GPU_CHECK_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
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

BUDGET="${GPU_CHECK_BUDGET_S:-530}"
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

TMPD="${TMPDIR:-/tmp}/anchorcontext_gpu_check"  # files that stay on the machine (the 8-file limit)
mkdir -p "$TMPD" && rm -f "$TMPD"/*.json "$TMPD"/*.png "$TMPD"/wheels.txt
if [[ "$DRY" == "1" ]]; then
  DEVICE=cpu; DTYPE=float32
  SHAPE=(--device cpu --dtype float32 --heads 4 --kv-heads 2 --head-dim 16 --mean-doc 64 --repeats 1 --warmup 0
         --threads 1)
  ATT_ARGS=("${SHAPE[@]}" --lengths 256,512 --masks full,intra_doc,anchor --backends sdpa)
  FLEX_ARGS=("${SHAPE[@]}" --no-memory)
  GPU_FLEX_LENGTHS=256
  TRAIN_ARGS=(--preset tiny --device cpu --lengths 256 128 --repeats 2 --warmup 1 --threads 1)
  TRAIN_MERGE_ARGS=()
  LOSS_ARGS=(--preset cpu --layers 1 --lengths 512 --loss-chunk-tokens 128 --overhead 256 --overhead-repeats 1
             --threads 1 --time-cap-s 120)
  echo "# gpu_check DRY RUN on CPU with tiny sizes (python: $PYTHON)"
else
  DEVICE=cuda; DTYPE=bfloat16
  # Llama-3.2-1B-like attention shape (32 heads, 8 KV heads, head dim 64), lognormal documents of mean 1K tokens.
  SHAPE=(--device cuda --dtype bfloat16 --heads 32 --kv-heads 8 --head-dim 64 --mean-doc 1024 --repeats 3 --warmup 1)
  ATT_ARGS=("${SHAPE[@]}" --lengths "${GPU_ATT_LENGTHS:-8192,16384,32768,65536,131072}" --masks full,intra_doc,anchor
            --backends varlen,varlen_merge)
  FLEX_ARGS=("${SHAPE[@]}" --no-memory)
  # Longest first: the 64K figures are the goal; 8K is the first to go if the budget runs out.
  TRAIN_ARGS=(--preset gpu-1b --device cuda --lengths ${GPU_TRAIN_LENGTHS:-65536 32768 8192} --repeats 2 --warmup 1
              --backends varlen --masks anchor intra_doc ${GPU_TRAIN_EXTRA:-})
  TRAIN_MERGE_ARGS=(--preset gpu-1b --device cuda --lengths ${GPU_TRAIN_MERGE_LENGTHS:-65536 8192} --repeats 2
                    --warmup 1 --backends varlen --masks anchor --stock false --matmul_rate false --flex_check false)
  # SmolLM2-135M widths, 30 layers, bf16, 8 documents per row; each (L, loss) in its own process, shortest first (a
  # loss that runs out of memory is not tried longer); the JSON is rewritten after every row
  LOSS_ARGS=(--preset cuda --lengths ${GPU_LOSS_LENGTHS:-16384 32768 65536 131072}
             --overhead "${GPU_LOSS_OVERHEAD_L:-16384}" --overhead-repeats 4 --time-cap-s 120)
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
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $MISSING >"$TMPD/wheels.txt" 2>&1
    echo "# rc=$? installed into $SITE: $(for w in $MISSING; do basename "$w"; done | tr '\n' ' ')" >>"$TMPD/wheels.txt"
    export PYTHONPATH="$PYTHONPATH:$SITE"
  fi
fi

# ---------------------------------------------------------------------------------------------- 1. env
{
  echo "# gpu_check $(date -u +%FT%TZ) dry_run=$DRY python=$PYTHON pwd=$PWD"
  if [[ -f "$TMPD/wheels.txt" ]]; then echo "# carried wheels:"; cat "$TMPD/wheels.txt"; fi
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
    import torch.nn.attention.varlen as tv
    from anchorcontext.attention import varlen_merge
    dev0 = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("torch varlen selector could pick cuDNN unpinned:", varlen_merge.torch_varlen_cudnn_possible(dev0),
          "| has _select_backend:", hasattr(tv, "_select_backend"))
except Exception as e:  # noqa: BLE001
    print("torch varlen selector: not inspected:", type(e).__name__, e)
try:
    import typing
    import torch.nn.attention.flex_attention as fa
    print("flex_attention: importable; kernel BACKEND choices:",
          typing.get_args(getattr(fa, "_Backend", None)) or "none (no BACKEND option)")
except Exception as e:  # noqa: BLE001
    print("flex_attention: NOT importable:", e)
import anchorcontext
from anchorcontext.attention.dispatch import resolve_backend
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("anchorcontext", anchorcontext.__version__, "from", os.path.dirname(anchorcontext.__file__))
print("backend auto on", dev, "->", resolve_backend("auto", dev))
EOF

# -------------------------------------------------------------------------------------------- 2. tests
run_stage pytest_gpu "${GPU_PYTEST_S:-200}" "$OUT/pytest_gpu.log" "$PYTHON" -m pytest -q --no-header -p no:cacheprovider \
  -rs --durations=15 ${GPU_PYTEST_ARGS:-tests/gpu}

# ------------------------------------------------------------------ 3. attention kernels: varlen gather vs merge
run_stage attention "${GPU_ATT_S:-70}" "$OUT/attention_cuda.log" "$PYTHON" benchmarks/attention.py "${ATT_ARGS[@]}" \
  --out "$OUT/attention_cuda.json"

# ---------------------------------------------------------------------------------------- 4. training step
run_stage train_step "${GPU_TRAIN_S:-120}" "$OUT/train_step_cuda.log" "$PYTHON" benchmarks/train_step.py \
  "${TRAIN_ARGS[@]}" --out "$OUT/train_step_cuda.json" --png "$TMPD/train_step_cuda.png"
if (( ${#TRAIN_MERGE_ARGS[@]} )); then
  export ANCHORCONTEXT_VARLEN_IMPL=merge
  run_stage train_step_merge "${GPU_TRAIN_MERGE_S:-45}" "$OUT/train_step_cuda.log" "$PYTHON" benchmarks/train_step.py \
    "${TRAIN_MERGE_ARGS[@]}" --out "$TMPD/train_step_merge_cuda.json" --png "$TMPD/train_step_merge_cuda.png"
  unset ANCHORCONTEXT_VARLEN_IMPL
  # the 8-file limit: the merge run goes into train_step_cuda.json, under "merge_run"
  "$PYTHON" - "$OUT/train_step_cuda.json" "$TMPD/train_step_merge_cuda.json" >>"$OUT/train_step_cuda.log" 2>&1 <<'EOF'
import json, sys
from pathlib import Path

main, merge = Path(sys.argv[1]), Path(sys.argv[2])
if merge.exists():
    doc = json.loads(main.read_text()) if main.exists() else {"results": []}
    doc["merge_run"] = json.loads(merge.read_text())
    main.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"# merge run folded into {main} (key merge_run)")
EOF
else
  STATUS+=("train_step_merge: skipped (dry run: no varlen kernel on CPU)")
fi

# ------------------------------------- 5. chunked vs stock loss: peak memory and step time by row length (issue 22)
run_stage loss_memory "${GPU_LOSS_S:-150}" "$OUT/train_step_cuda.log" "$PYTHON" benchmarks/loss_memory.py \
  "${LOSS_ARGS[@]}" --out "$OUT/loss_memory_cuda.json"

# ------------------------------------------------ 6. FlexAttention kernel_options variants (compile-heavy: last)
# anchor: default, LSE merge on the intra_doc mask, ROWS_GUARANTEED_SAFE, 64x64 blocks, FA4 (BACKEND=FLASH);
# intra_doc: default, BLOCKS_ARE_CONTIGUOUS
# one process per length (a stage cut by the budget loses only its own length), 64K first: the goal length
FLEX_JSONS=()
for FL in $(echo "${GPU_FLEX_LENGTHS:-65536,8192}" | tr ',' ' '); do
  run_stage "flex_anchor_$FL" "${GPU_FLEX_S:-100}" "$OUT/attention_cuda.log" "$PYTHON" benchmarks/attention.py \
    "${FLEX_ARGS[@]}" --lengths "$FL" --masks anchor --backends flex,flex_merge,flex_safe,flex_b64,flex_fa4 \
    --out "$TMPD/attention_flex_anchor_$FL.json"
  FLEX_JSONS+=("$TMPD/attention_flex_anchor_$FL.json")
done
run_stage flex_intra_doc "${GPU_FLEX_INTRA_S:-60}" "$OUT/attention_cuda.log" "$PYTHON" benchmarks/attention.py \
  "${FLEX_ARGS[@]}" --lengths "${GPU_FLEX_LENGTHS:-65536,8192}" --masks intra_doc --backends flex,flex_contig \
  --out "$TMPD/attention_flex_intra_doc.json"
# one attention JSON: the flex rows join the varlen ones (each run's own config is kept under "runs")
"$PYTHON" scripts/merge_bench_json.py "$OUT/attention_cuda.json" "${FLEX_JSONS[@]}" \
  "$TMPD/attention_flex_intra_doc.json" >>"$OUT/attention_cuda.log" 2>&1

# ------------------------------------------------------------------------------------------ 7. summary
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
        if line.startswith(("device ", "torch ", "torch.nn.attention.varlen", "torch varlen", "flash_attn",
                            "flex_attention", "backend auto", "# rc=")):
            print(line)


def attention():
    p = out / "attention_cuda.json"
    if not p.exists():
        print("\nattention kernel: no results")
        return
    a = json.loads(p.read_text())
    rows = a.get("results", [])
    print("\nattention kernel (the backend with each mask vs full causal SDPA on the same row; limit = FLOP ratio):")
    print(f"{'L':>6} {'mask':9} {'backend':12} {'pass':7} {'full ms':>8} {'mask ms':>9} {'speedup':>7} {'limit':>6} "
          f"{'frac':>6} {'1st call s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r.get('L', 0):6d} {str(r.get('mask')):9} {str(r.get('backend')):12} ERROR {r['error'][:150]}")
            continue
        print(f"{r.get('L', 0):6d} {str(r.get('mask', 'anchor')):9} {str(r.get('backend')):12} {str(r.get('pass', '')):7} "
              f"{f(r.get('full_ms'), '8.2f')} {f(r.get('anchor_ms'), '9.2f')} {f(r.get('speedup'), '7.2f')} "
              f"{f(r.get('flop_limit'), '6.2f')} {f(r.get('fraction_of_limit'), '6.1%')} {f(r.get('first_call_s'), '10.1f')}")
    ms = {(r["L"], r.get("mask"), r["backend"]): r["anchor_ms"] for r in rows if "error" not in r}
    pairs = sorted((L, m) for (L, m, b) in ms if b == "varlen" and (L, m, "varlen_merge") in ms)
    if pairs:
        print("\nvarlen: K/V gather vs gather-free merge (ms, fwd+bwd; < 1 = merge faster):")
        for L, m in pairs:
            g, mg = ms[(L, m, "varlen")], ms[(L, m, "varlen_merge")]
            print(f"{L:6d} {m:9} gather {g:8.2f} merge {mg:8.2f} merge/gather {mg / g:5.2f}")
    anchors = {(L, b): v for (L, m, b), v in ms.items() if m == "anchor"}
    intra = {(L, b): v for (L, m, b), v in ms.items() if m == "intra_doc"}
    common = sorted(set(anchors) & set(intra))
    if common:
        print("\nanchor vs intra_doc on the same backend (goal: within 5%):")
        for L, b in common:
            print(f"{L:6d} {b:12} anchor/intra_doc {anchors[(L, b)] / intra[(L, b)]:5.3f}")


def train(name="train_step_cuda.json", label="", key=None):
    p = out / name
    t = json.loads(p.read_text()) if p.exists() else {}
    t = t.get(key) if key else t
    if not t or "config" not in t:
        print(f"\ntraining step{label}: no results")
        return
    mr = t.get("matmul_rate") or {}
    c = t["config"]
    print(f"\ntraining step{label} ({c['n_params'] / 1e6:.0f}M params, {c['dtype']}, grad_ckpt={c['grad_ckpt']}; "
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


def loss_memory():
    p = out / "loss_memory_cuda.json"
    if not p.exists():
        print("\nchunked vs stock loss: no results")
        return
    d = json.loads(p.read_text())
    print("\nchunked vs stock loss (SmolLM2-135M widths; peak = max allocated in the step; step = fwd + bwd):")
    print(f"{'L':>6} {'layers':>6} {'loss':8} {'status':>14} {'peak GiB':>8} {'planned':>8} {'step s':>7}")
    for r in d.get("results", []):
        c = r["config"]
        peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**30
        print(f"{c['L']:6d} {c['layers']:6d} {c['loss']:8} {r['status'][:14]:>14} {f(peak, '8.2f')} "
              f"{r['planned_bytes'] / 2**30:8.2f} {f(r.get('step_s'), '7.3f')}")
    for o in d.get("overhead", []):
        if o.get("status") == "ok":
            print(f"overhead at L={o['config']['L']}: chunked / stock step time {o['median_ratio']:.3f} (median of "
                  f"{len(o['round_ratios'])} rounds; goal <= 1.05)")
        else:
            print(f"overhead at L={o['config']['L']}: {o.get('status')} {str(o.get('error'))[-200:]}")


for fn in (env, attention, train,
           lambda: train(label=" with ANCHORCONTEXT_VARLEN_IMPL=merge (x stock: not run here)", key="merge_run"),
           loss_memory):
    section(fn)
EOF
} 2>&1 | tee "$OUT/summary.txt"
ls -la "$OUT"
exit 0
