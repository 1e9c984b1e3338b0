#!/usr/bin/env bash
# Issue 18's GPU measurements as one script that fits 8 minutes on one H100/H200:
#
#   bash bench/gpu_suite.sh              # on the GPU machine (python3 there holds torch)
#   bash bench/gpu_suite.sh --dry-run    # here: the same steps on the CPU with tiny sizes
#   bash bench/gpu_suite.sh --fetch-wheels   # here, once: the wheels the GPU machine lacks
#
# Steps, in the issue's order; each runs under `timeout <cap>`, and the suite goes on after a
# failed or timed-out step (its log keeps what it printed before it was stopped):
#   0 setup            install the carried wheels if pulp/highspy/hydra/omegaconf are missing;
#                      record the GPU, driver, torch, disk and memory
#   1 peak_memory      bench/estimator_accuracy.py: predicted vs max_memory_allocated (and
#                      max_memory_reserved, added by a wrapper below) for 8 plans, per-layer
#                      saved bytes, the precision check
#   2 offload_overlap  the planner's plan at a 30 GiB budget (predicted hidden), step time
#                      with and without its offload, 16K and 32K (target <= 1.05x); inline,
#                      as tests/gpu times it (that test's own preconditions fail: see step 2)
#   3 mfu              bench/throughput.py at 8K: none, full, plan (target >= 40% MFU)
#   4a longest         bench/longest_sequence.py: none, plan, full; coarse (64K-128K)
#   4b longest_cpu     bench/longest_sequence.py: save_on_cpu (32K, 64K; host RAM bounds it)
#   5 checkpoint       bench/checkpoint.py: async checkpoint blocking vs torch.save, 1B
#   6 pytest_gpu       pytest -m "gpu and not slow" tests/gpu (the two slow GPU tests: the
#                      overlap one, step 2's, and the asserting twin of step 1, 6 x 1B runs
#                      that do not fit; deepspeed is not on the machine)
#
# Output, under $OUT (default ./gpu_out): summary.json (every step's exit code, seconds, cap,
# command and headline numbers, rewritten after each step), suite.log (this console) and
# steps.tar.gz (each step's JSON and log, repacked after each step). The step files
# themselves go to $STEP_DIR (default $OUT/steps); on the device tool, which returns at most
# 8 files, point STEP_DIR outside $OUT.
#
# Caps, seconds, on the GPU (sum 470 = 7 min 50 s, the wheel install's 20 included): env
# CAP_<step> overrides one, e.g. CAP_4a=120. A dry run caps every step at DRY_CAP (600).
# Other knobs: PYTHON (default python3; .venv/bin/python in a dry run when present),
# ONLY="1 3" (run only these steps), SITE_DIR (where wheels are installed, /tmp/memplan_site),
# WHEELS (the wheel folder, .whl), PYTEST_GPU_MARK (step 6's marker expression).

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

DRY_RUN=${DRY_RUN:-0}
FETCH=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h | --help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

WHEELS=${WHEELS:-.whl}
# the versions this repo's .venv runs; antlr4 4.9.3 has no wheel on PyPI, so it is built here
WHEEL_PINS=(pulp==3.3.2 highspy==1.16.0 hydra-core==1.3.8 omegaconf==2.3.1)

if [ "$FETCH" = 1 ]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  mkdir -p "$WHEELS"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$WHEELS" "${WHEEL_PINS[@]}" || exit 1
  python3 -m pip wheel --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3 || exit 1
  ls -l "$WHEELS"
  exit 0
fi

if [ "$DRY_RUN" = 1 ]; then
  DEFAULT_PY=python3
  [ -x .venv/bin/python ] && DEFAULT_PY=.venv/bin/python
  PY=${PYTHON:-$DEFAULT_PY}
  DEVICE=cpu
else
  PY=${PYTHON:-python3}
  DEVICE=cuda
fi
OUT=${OUT:-./gpu_out}
STEP_DIR=${STEP_DIR:-$OUT/steps}
SITE_DIR=${SITE_DIR:-/tmp/memplan_site}
ONLY=${ONLY:-}
mkdir -p "$OUT" "$STEP_DIR"
OUT=$(cd "$OUT" && pwd)
STEP_DIR=$(cd "$STEP_DIR" && pwd)
RESULTS="$STEP_DIR/steps.tsv" # name, exit code, seconds, cap: one line per step
: >"$RESULTS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 # a step killed at its cap still leaves what it printed
export WANDB_MODE=offline
exec > >(tee -a "$OUT/suite.log") 2>&1

# seconds per step on the GPU; a dry run gives each DRY_CAP
declare -A CAP=(
  [0i]=20 [0]=15 [1]=80 [2]=45 [3]=35 [4a]=110 [4b]=40 [5]=75 [6]=50
)
cap_of() {
  local var="CAP_$1"
  if [ -n "${!var:-}" ]; then echo "${!var}"
  elif [ "$DRY_RUN" = 1 ]; then echo "${DRY_CAP:-600}"
  else echo "${CAP[$1]}"; fi
}

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

# run_step ID NAME COMMAND...: run under its cap, log to $STEP_DIR/NAME.log, record, repack
run_step() {
  local id=$1 name=$2
  shift 2
  wanted "$id" || return 0
  local cap log start end seconds rc
  cap=$(cap_of "$id")
  log="$STEP_DIR/$name.log"
  echo
  echo "== step $id $name (cap ${cap}s) $(date -u +%H:%M:%S)"
  echo "   $*"
  printf '%s\n' "$*" >"$log.cmd"
  start=$(date +%s.%N)
  timeout --kill-after=5 "$cap" "$@" >"$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$cap" "$id" >>"$RESULTS"
  tail -n 30 "$log" | cut -c1-220
  local verdict="exit $rc"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="TIMED OUT at ${cap}s (exit $rc)"; fi
  echo "-- step $id $name: $verdict in ${seconds}s"
  write_summary
}

write_summary() {
  tar -czf "$OUT/steps.tar.gz.part" -C "$STEP_DIR" . && mv "$OUT/steps.tar.gz.part" "$OUT/steps.tar.gz"
  "$PY" - "$RESULTS" "$STEP_DIR" "$OUT/summary.json" "$DRY_RUN" <<'PY' || echo "summary.json: not written"
"""summary.json from steps.tsv and each step's JSON (headline numbers; no torch import)."""
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

results, step_dir, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
GIB = 2**30


def load(name):
    path = step_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def junit(name):
    path = step_dir / f"{name}.xml"
    if not path.exists():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def peak_memory(data):
    rows = []
    for r in data["cases"]:
        row = {"case": r["case"], "plan": r["policy"],
               "predicted_gib": round(r["predicted_peak_bytes"] / GIB, 3)}
        if "failure" in r:
            row["failure"] = r["failure"]
        else:
            reserved = r.get("measured_reserved_peak_bytes")
            row |= {"allocated_gib": round(r["measured_peak_bytes"] / GIB, 3),
                    "reserved_gib": round(reserved / GIB, 3) if reserved else None,
                    "peak_error": round(r["peak_error"], 4),
                    "layer_device_max_abs_error": r["layer_max_abs_error"]["device_bytes"]}
        rows.append(row)
    return {"device": data["environment"]["device"], "torch": data["environment"]["torch"],
            "cases": rows}


def overlap(data):
    keys = ("seq_len", "offloading_layers", "predicted_exposed_transfer_seconds", "ratio",
            "with_offload_s", "without_s", "skipped", "plan")
    return {"device": data["environment"]["device"],
            "rows": [{k: r[k] for k in keys if k in r} for r in data["rows"]]}


def mfu(data):
    return {"device": data["environment"]["device"], "rows": [
        {"length": r["length"], "policy": r["policy"], "failure": r["failure"]} if "failure" in r
        else {"length": r["length"], "policy": r["policy"], "mfu": round(r["mfu"], 4),
              "tokens_per_second": round(r["tokens_per_second"])} for r in data["rows"]]}


def longest(data):
    return {p: {"longest": (r["longest"] or {}).get("seq_len"),
                "tried": {t["seq_len"]: t["why"] or "ok" for t in r["tried"]}}
            for p, r in data["results"].items()}


def checkpoint(data):
    return {k: data[k] for k in ("device", "state_gib", "first_async_blocked_seconds",
                                  "blocked_seconds_per_checkpoint",
                                  "wall_cost_seconds_per_checkpoint")}


HEADLINES = {"1_peak_memory": peak_memory, "2_offload_overlap": overlap, "3_mfu": mfu, "4a_longest": longest,
             "4b_longest_save_on_cpu": longest, "5_checkpoint": checkpoint}
steps = []
for line in results.read_text().splitlines():
    name, rc, seconds, cap, step = line.split("\t")
    entry = {"step": step, "name": name, "exit_code": int(rc), "seconds": float(seconds),
             "cap_seconds": int(cap), "timed_out": rc in ("124", "137"),
             "command": (step_dir / f"{name}.log.cmd").read_text().strip(),
             "files": sorted(p.name for p in step_dir.glob(f"{name}.*"))}
    try:
        if name in HEADLINES and load(name) is not None:
            entry["headline"] = HEADLINES[name](load(name))
        elif name == "6_pytest_gpu":
            entry["headline"] = {"pytest": junit(name)}
    except Exception as exc:  # a partial or odd JSON must not lose the summary
        entry["headline_error"] = repr(exc)
    steps.append(entry)
summary = {"suite": "bench/gpu_suite.sh", "dry_run": dry == "1",
           "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "total_seconds": round(sum(s["seconds"] for s in steps), 1), "steps": steps}
out.write_text(json.dumps(summary, indent=2) + "\n")
PY
}

# ---- step 0: the environment (and the carried wheels when the machine lacks them) -------
setup_env() {
  echo "date: $(date -u)"
  echo "python: $PY ($("$PY" --version 2>&1))"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" || return 1
  if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
  fi
  df -h /tmp . || true
  free -g || true
  nproc
  "$PY" -c "import pulp, highspy, hydra, omegaconf; print('planner deps importable')"
}
if ! "$PY" -c "import pulp, highspy, hydra, omegaconf" 2>/dev/null; then # every step needs them
  echo "installing the carried wheels from $WHEELS into $SITE_DIR"
  ONLY_SET=$ONLY ONLY=""
  run_step 0i 0_install "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE_DIR" "$WHEELS"/*.whl
  ONLY=$ONLY_SET
fi
export PYTHONPATH="$PYTHONPATH:$SITE_DIR" # after the repo, so the carried copies never shadow it
export -f setup_env
export PY DEVICE
run_step 0 0_env bash -c setup_env

# ---- the steps' sizes: the GPU's, or tiny ones for the CPU dry run ------------------------
if [ "$DRY_RUN" = 1 ]; then
  # scaled-down models (--scale auto on the CPU), 2 layers; a 12 MiB budget (instead of
  # 30 GiB) makes the planner recompute at 256 tokens; 9 MiB makes none fail at 96 tokens
  BUDGET=0.012
  PEAK_CASES=(llama3_2_1b:2:128:none llama3_2_1b:2:128:planner llama3_2_1b:2:128:full
    llama3_2_1b:2:256:none llama3_2_1b:2:256:planner llama3_2_1b:2:256:full
    llama2_7b:1:192:planner llama2_7b:1:192:none)
  PEAK_EXTRA=(--precision-seq-len 64)
  SIZE=(--layers 2)
  MFU_LEN=64
  LONG=(--start 64 --quantum 32 --max-seq-len 96 --budget-bytes 9437184)
  LONG_CPU=(--start 32 --quantum 32 --max-seq-len 64)
  CKPT=(--hidden 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 --vocab 512 --seq-len 32
    --every 2)
else
  # llama3_2_1b at 8K and 32K: keep / the planner at a 30 GiB budget / full recomputation;
  # 7B width with 4 layers at 16K: the planner and keep. The budget override only moves the
  # planner's cases (the forced ones' predictions do not depend on it).
  BUDGET=30
  PEAK_CASES=(llama3_2_1b:0:8192:none llama3_2_1b:0:8192:planner llama3_2_1b:0:8192:full
    llama3_2_1b:0:32768:none llama3_2_1b:0:32768:planner llama3_2_1b:0:32768:full
    llama2_7b:4:16384:planner llama2_7b:4:16384:none)
  PEAK_EXTRA=()
  SIZE=()
  MFU_LEN=8192
  # H200, 1B, predicted: none fits up to ~100K, plan to ~130 GiB at 128K (recompute and
  # offload), full ~600K (a step there takes minutes), so 64K-128K only: none's limit
  # (64K, 128K, then 96K) and plan/full training past it (64K, 128K). save_on_cpu apart:
  # its copies take host RAM (75 GiB at 64K, 113 GiB at 96K of 128 GiB)
  LONG=(--start 65536 --quantum 32768 --max-seq-len 131072)
  LONG_CPU=(--start 32768 --quantum 32768 --max-seq-len 65536)
  CKPT=(--model llama3_2_1b --seq-len 2048 --every 5) # state 14 GiB: one round of each kind
fi
CASE_ARGS=()
for c in "${PEAK_CASES[@]}"; do CASE_ARGS+=(--case "$c"); done

# ---- step 1: peak memory, predicted vs allocated and reserved ------------------------------
# estimator_accuracy.py records max_memory_allocated; max_memory_reserved over the same
# steps (peak stats reset after the first) is read right after each case by this wrapper.
PEAK_WRAPPER='
import sys, torch
sys.path.insert(0, "bench")
import estimator_accuracy as ea
run_case = ea.run_case
def with_reserved(case, cfg, info, steps, seed):
    row = run_case(case, cfg, info, steps, seed)
    cuda = info.device.type == "cuda"
    row["measured_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(info.device) if cuda else None
    return row
ea.run_case = with_reserved
sys.exit(ea.main(sys.argv[1:]))
'
run_step 1 1_peak_memory "$PY" -c "$PEAK_WRAPPER" --device "$DEVICE" --steps 2 \
  --override "cluster.gpu_memory_gib=$BUDGET" "${CASE_ARGS[@]}" "${PEAK_EXTRA[@]}" \
  --out "$STEP_DIR/1_peak_memory.json"

# ---- step 2: offload overlap --------------------------------------------------------------
# No bench measures it on a GPU (bench/policy_speed.py runs on the CPU only). tests/gpu's
# test_offload_the_planner_calls_hidden_costs_at_most_5_percent does, but its preconditions
# fail on the planner as it is (checked on the CPU: at 8K the 30 GiB plan offloads nothing;
# at 32K its predicted exposed transfer is 8.7e-7 s, not 0.0), so it would time nothing.
# This runs the same measurement (the test's model, step and median) and records the
# planner's prediction beside it instead of asserting on it: the planner's plan at the
# budget, step time with its offload and with the offloaded tokens kept on the device.
# argv: device, out, budget GiB, steps (first warms up), layers (0: preset), fallback, lengths
OVERLAP_PY='
import dataclasses, statistics, sys, time
import torch
from framework.components.loss import chunked_cross_entropy
from framework.components.model import build_model, materialize
from framework.measure.accuracy import forced_plan
from framework.measure.bench import bench_overrides, scaled, write_json
from framework.measure.device import describe_device, environment, resolve_device
from launch.compose import compose_config
from offload import apply_activation_plan
from planner.make import make_plan

device_name, out, budget, steps, layers, fallback, *lengths = sys.argv[1:]
info = describe_device(resolve_device(device_name), 64 * 2**20, None)
device, cuda = info.device, info.device.type == "cuda"

def sync():
    if cuda:
        torch.cuda.synchronize()  # host-device sync point: the step is timed on the host clock

def median_step_seconds(model, tokens, targets):
    times = []
    for _ in range(int(steps)):
        sync()
        start = time.perf_counter()
        loss = chunked_cross_entropy(model(tokens), model.output_weight(), targets, 4096)
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
        for param in model.parameters():
            param.grad = None
    return statistics.median(times[1:])  # the first warms up

rows = []
for seq in map(int, lengths):
    extra = [f"cluster.gpu_memory_gib={budget}"]
    cfg = scaled(compose_config(bench_overrides("llama3_2_1b", int(layers) or None, seq, info, extra)), "auto", device)
    plan = make_plan(cfg)
    offloading = sum(1 for p in plan.layers if p.offload_fraction or p.anchor_offload_fraction)
    row = {"seq_len": seq, "budget_gib": float(budget), "offloading_layers": offloading,
           "predicted_exposed_transfer_seconds": plan.time.exposed_transfer_seconds,
           "predicted_step_seconds": plan.time.step_seconds}
    if not offloading and fallback == "offload":  # dry run: the CPU planner prefers recompute
        plan, row["plan"] = forced_plan(cfg, "offload"), "forced offload (dry run)"
        offloading = sum(1 for p in plan.layers if p.offload_fraction or p.anchor_offload_fraction)
        row["offloading_layers"] = offloading
    elif not offloading:
        rows.append(row | {"skipped": "the plan offloads nothing"})
        print(rows[-1], flush=True)
        continue
    model = materialize(build_model(cfg.model), device, 0)
    model.to(torch.bfloat16 if cuda else torch.float32)
    model.rope_inv_freq = model.rope_inv_freq.float()
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=generator).to(device)
    tokens, targets = data[:, :-1], data[:, 1:]
    # the same plan with the offloaded tokens kept on the device (same recomputation)
    kept = [dataclasses.replace(p, offload_fraction=0.0, anchor_offload_fraction=0.0)
            for p in plan.layers]
    runtime = apply_activation_plan(model.layers.values(), kept)
    without = median_step_seconds(model, tokens, targets)
    runtime.remove()
    runtime = apply_activation_plan(model.layers.values(), plan.layers)
    offloaded = median_step_seconds(model, tokens, targets)
    host = sum(s.host_bytes for s in runtime.layer_stats().values())
    runtime.remove()
    row |= {"with_offload_s": offloaded, "without_s": without, "ratio": offloaded / without,
            "host_bytes": host, "target_ratio": 1.05}
    rows.append(row)
    print(f"seq {seq}: {offloaded:.4f} s with offload, {without:.4f} s without "
          f"({offloaded / without:.3f}x, target <= 1.05x; {offloading} layers offload, "
          f"predicted exposed {plan.time.exposed_transfer_seconds:.2e} s)", flush=True)
    del model, runtime
    if cuda:
        torch.cuda.empty_cache()
write_json(out, {"environment": environment(info), "rows": rows})
'
if [ "$DRY_RUN" = 1 ]; then OVERLAP_ARGS=(0.012 4 2 offload 256); else OVERLAP_ARGS=(30 6 0 none 16384 32768); fi
run_step 2 2_offload_overlap "$PY" -c "$OVERLAP_PY" "$DEVICE" "$STEP_DIR/2_offload_overlap.json" \
  "${OVERLAP_ARGS[@]}"

# ---- step 3: MFU of llama3_2_1b at 8K --------------------------------------------------------
run_step 3 3_mfu "$PY" bench/throughput.py --device "$DEVICE" "${SIZE[@]}" --lengths "$MFU_LEN" \
  --policy none --policy full --policy plan --steps 3 --out "$STEP_DIR/3_mfu.json"

# ---- step 4: longest trainable sequence, coarse, 2 steps per length --------------------------
run_step 4a 4a_longest "$PY" bench/longest_sequence.py --device "$DEVICE" "${SIZE[@]}" \
  --policy none --policy plan --policy full "${LONG[@]}" --steps 2 \
  --out "$STEP_DIR/4a_longest.json"
run_step 4b 4b_longest_save_on_cpu "$PY" bench/longest_sequence.py --device "$DEVICE" \
  "${SIZE[@]}" --policy save_on_cpu "${LONG_CPU[@]}" --steps 2 \
  --out "$STEP_DIR/4b_longest_save_on_cpu.json"

# ---- step 5: async checkpoint blocking vs torch.save ----------------------------------------
run_step 5 5_checkpoint "$PY" bench/checkpoint.py --device "$DEVICE" "${CKPT[@]}" --rounds 1 \
  --out "$STEP_DIR/5_checkpoint.json"

# ---- step 6: the GPU tests ------------------------------------------------------------------
run_step 6 6_pytest_gpu "$PY" -m pytest tests/gpu -m "${PYTEST_GPU_MARK:-gpu and not slow}" \
  -k "not deepspeed" -v -rA -p no:cacheprovider --junitxml="$STEP_DIR/6_pytest_gpu.xml"

echo
echo "== summary ($OUT/summary.json)"
"$PY" - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for step in s["steps"]:
    flag = "TIMED OUT" if step["timed_out"] else f"exit {step['exit_code']}"
    print(f"  {step['step']:>3} {step['name']:<24} {flag:<10} {step['seconds']:>7.1f} s"
          f" (cap {step['cap_seconds']} s)")
    head = step.get("headline")
    if head and step["name"] == "1_peak_memory":
        for c in head["cases"]:
            print(f"        {c['case']:<28} {c['plan'][:24]:<24} pred {c['predicted_gib']} GiB "
                  + (c.get("failure") or f"alloc {c['allocated_gib']} reserved "
                     f"{c['reserved_gib']} err {c['peak_error']:+.2%}"))
    elif head:
        print("        " + json.dumps(head, separators=(",", ":"))[:700])
print(f"  total {s['total_seconds']} s")
PY
