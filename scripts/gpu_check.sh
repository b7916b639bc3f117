#!/usr/bin/env bash
# GPU smoke check (issue 10): run every registered sampler once on CUDA with its demo model and
# print timings; then the `gpu`-marked tests. Samplers are read from `gensample list`, so samplers
# added later are included automatically.
#
#   scripts/gpu_check.sh                      # fp32, 16 samples each
#   DTYPE=fp16 N=64 scripts/gpu_check.sh      # half-precision networks
#   COMPILE=1 SKIP_TESTS=1 scripts/gpu_check.sh
#
# Env: DEVICE (cuda), DTYPE (fp32|fp16|bf16), N (samples per sampler), COMPILE (1 = --compile),
# OUT (output root; default a temp dir), SKIP_TESTS (1 = skip pytest -m gpu),
# ONLY ("ddim fkc": just these samplers), BENCH (1 = also the MAR-B DiSA and MDLM FHS speed benchmarks),
# SDXL (0 = skip the SDXL run), SDXL_MODEL (an SDXL folder or hub id, e.g. a local copy of
# stabilityai/stable-diffusion-xl-base-1.0; default: SDXL base's UNet config with random weights).
# DEVICE=cpu DTYPE=fp32 SKIP_TESTS=1 gives a CPU dry run of the same loop.
# Exit status: non-zero if any sampler or test failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-fp32}
N=${N:-16}
OUT=${OUT:-$(mktemp -d -t gensample-gpu-check-XXXX)}
mkdir -p "$OUT"
EXTRA=()
[[ "${COMPILE:-0}" == 1 ]] && EXTRA+=(--compile)

if [[ "$DEVICE" == cuda* ]]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "CUDA is not available: nothing to check (DEVICE=cpu gives a CPU dry run)" >&2; exit 1; }
    python -c "import torch; print('torch', torch.__version__, '| device', torch.cuda.get_device_name(0))"
fi

# sampler names: the lines between "Samplers:" and "Zoo models:" of `gensample list`
if [[ -n "${ONLY:-}" ]]; then
    read -r -a SAMPLERS <<<"$ONLY"
else
    mapfile -t SAMPLERS < <(python -m gensample list | awk '/^Samplers:/{s=1; next} /^[^ ]/{s=0} s && NF {print $1}')
fi
if [[ ${#SAMPLERS[@]} -eq 0 ]]; then
    echo "no samplers found in 'gensample list'" >&2
    exit 1
fi

printf '%-16s %-6s %10s %10s %8s  %s\n' sampler status total_s sample_s nfe note
failed=0
for s in "${SAMPLERS[@]}"; do
    dir="$OUT/$s"
    log="$OUT/$s.log"
    t0=$(date +%s.%N)
    n=$N
    python -m gensample run --sampler "$s" -n "$n" --device "$DEVICE" --dtype "$DTYPE" "${EXTRA[@]}" \
        -o "$dir" --overwrite >"$log" 2>&1
    rc=$?
    group=$(sed -n 's/.*must be a multiple of the group size \([0-9]*\).*/\1/p' "$log" | head -n 1)
    if [[ $rc -eq 2 && -n "$group" ]]; then  # particle-group samplers (FKC): round N up to whole groups
        n=$(( (N + group - 1) / group * group ))
        python -m gensample run --sampler "$s" -n "$n" --device "$DEVICE" --dtype "$DTYPE" "${EXTRA[@]}" \
            -o "$dir" --overwrite >"$log" 2>&1
        rc=$?
    fi
    t1=$(date +%s.%N)
    total=$(python -c "print(f'{$t1 - $t0:.2f}')")
    if [[ $rc -eq 0 ]]; then
        read -r wall nfe < <(python -c "import json; r = json.load(open('$dir/run.json')); print(f\"{r['wall_time_s']:.3f} {r.get('nfe')}\")")
        printf '%-16s %-6s %10s %10s %8s  %s\n' "$s" ok "$total" "$wall" "$nfe" "$(python -c "import json; print(json.load(open('$dir/run.json'))['model'])") n=$n"
    else
        failed=$((failed + 1))
        printf '%-16s %-6s %10s %10s %8s  %s\n' "$s" FAIL "$total" - - "exit $rc: $(tail -n 1 "$log")"
    fi
done
echo "outputs and logs: $OUT"

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    python -m pytest -q -m gpu tests/test_gpu.py || failed=$((failed + 1))
fi

# SDXL at SDXL_DTYPE (default fp16): the UNet and text encoders in half precision, the VAE decode
# in float32 (force_upcast; SDXL's VAE overflows in fp16). A real model (SDXL_MODEL) should give
# images; the random-weight one checks shapes, dtypes and finiteness. Then the SDXL gpu tests.
if [[ "${SDXL:-1}" != 0 && "$DEVICE" == cuda* ]]; then
    SDXL_DTYPE=${SDXL_DTYPE:-fp16}
    model=${SDXL_MODEL:-}
    if [[ -z "$model" ]]; then
        model="$OUT/sdxl-random"
        python -c "import sys; sys.path.insert(0, 'tests'); from sdxl_models import real_size_sdxl_pipeline; \
real_size_sdxl_pipeline('$OUT').save_pretrained('$model')" || failed=$((failed + 1))
    fi
    for args in "--sampler ddim" "--sampler ts-ddim" "--sampler fkc --particles 2 --fkc-target cfg"; do
        name="sdxl-${args//[^a-z-]/_}"
        t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        python -m gensample run $args --model "$model" --prompt "a photo of a cat on a red sofa" \
            --negative-prompt "blurry" --guidance-scale 5 --steps 20 -n 2 --device "$DEVICE" --dtype "$SDXL_DTYPE" \
            -o "$OUT/$name" --overwrite >"$OUT/$name.log" 2>&1
        rc=$?
        total=$(python -c "print(f'{$(date +%s.%N) - $t0:.2f}')")
        if [[ $rc -eq 0 ]] && python -c "import numpy as np, sys; z = np.load('$OUT/$name/samples.npz'); \
sys.exit(0 if z['images'].dtype == np.float32 and np.isfinite(z['images']).all() else 1)"; then
            printf '%-16s %-6s %10s  %s\n' "$name" ok "$total" "$model $SDXL_DTYPE"
        else
            failed=$((failed + 1))
            printf '%-16s %-6s %10s  %s\n' "$name" FAIL "$total" "exit $rc: $(tail -n 1 "$OUT/$name.log")"
        fi
    done
    if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
        python -m pytest -q -m gpu tests/test_sdxl.py || failed=$((failed + 1))
    fi
fi

# Flow-matching pipelines (tiny random SD3 and Flux, tests/flow_models.py): the flow methods and their
# compositions on the device (the loops on the VP twin, every draw on its generator's device).
if [[ "${FLOW:-1}" != 0 && "$DEVICE" == cuda* ]]; then
    for fam in sd3 flux; do
        model="$OUT/$fam-tiny"
        python -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from flow_models import save_flow_pipeline; \
save_flow_pipeline(Path('$model'), '$fam')" || failed=$((failed + 1))
        for args in "--sampler euler" "--sampler ts-ddim" \
                    "--sampler fkc --particles 2 --fkc-target cfg --guidance-scale 3 --negative-prompt blurry --time-shift --data-var 0.5" \
                    "--sampler fkc --particles 2 --fkc-target anneal --beta 2 --proposal ddpm"; do
            name="$fam-${args//[^a-z0-9-]/_}"
            t0=$(date +%s.%N)
            # shellcheck disable=SC2086
            python -m gensample run $args --model "$model" --prompt "a red cat" --height 16 --width 16 --steps 8 -n 2 \
                --device "$DEVICE" -o "$OUT/$name" --overwrite >"$OUT/$name.log" 2>&1
            rc=$?
            total=$(python -c "print(f'{$(date +%s.%N) - $t0:.2f}')")
            if [[ $rc -eq 0 ]] && python -c "import numpy as np, sys; z = np.load('$OUT/$name/samples.npz'); \
sys.exit(0 if np.isfinite(z['images']).all() else 1)"; then
                printf '%-16s %-6s %10s  %s\n' "${name:0:40}" ok "$total" "$model"
            else
                failed=$((failed + 1))
                printf '%-16s %-6s %10s  %s\n' "${name:0:40}" FAIL "$total" "exit $rc: $(tail -n 1 "$OUT/$name.log")"
            fi
        done
    done
fi

# The papers' speed claims at their real shapes (random weights; speed does not depend on them).
# BENCH=1 runs them; each prints its ratios and writes a result file with provenance to $OUT.
if [[ "${BENCH:-0}" == 1 && "$DEVICE" == cuda* ]]; then
    python benchmarks/bench_disa_mar.py --device cuda --batch 64 --ar-steps 64 --repeats 3 \
        --out "$OUT/disa_mar_b_cuda.json" || failed=$((failed + 1))
    python benchmarks/bench_fhs_mdlm.py --device cuda --batch 16 --repeats 3 \
        --out "$OUT/bench_fhs_mdlm_gpu.json" || failed=$((failed + 1))
fi
exit $((failed > 0))
