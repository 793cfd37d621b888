# Source on the GPU host (from the repo root) after the wheelhouse parts are staged
# (../shared/gpu-host/README.md): installs vLLM 0.26.0, unpacks SmolLM2 to ~/smol, and
# puts this checkout on PYTHONPATH as an installed package would be laid out
# (judgeq_vllm + judgeq_vllm.kernels + the vllm.general_plugins entry point).
#   JUDGEQ_GIT_COMMIT=<hash> source benchmarks/gpu_host_env.sh
set -e
[ -d ~/.wheelhouse/site/vllm ] || python3 ~/.wheelhouse/vllm/wheelhouse.py install
[ -f ~/smol/config.json ] || [ ! -d ~/.wheelhouse/smollm2 ] || python3 ~/.wheelhouse/smollm2/wheelhouse.py unpack smollm2 ~/smol
# `vllm serve` imports three pure-Python packages the slim wheelhouse lacks (bundle "serve",
# see benchmarks/README.md): unpacked straight into the site folder
if [ -d ~/.wheelhouse/serve ] && [ ! -d ~/.wheelhouse/site/model_hosting_container_standards ]; then
    python3 ~/.wheelhouse/serve/wheelhouse.py unpack serve /tmp/serve-wheels
    for wheel in /tmp/serve-wheels/*.whl; do python3 -m zipfile -e "$wheel" ~/.wheelhouse/site; done
fi
site=/tmp/judgeq-site
rm -rf "$site" && mkdir -p "$site/judgeq_vllm-0.1.0.dist-info"
cp -r judgeq_vllm "$site/" && cp -r kernels "$site/judgeq_vllm/kernels"
printf 'Metadata-Version: 2.1\nName: judgeq-vllm\nVersion: 0.1.0\n' > "$site/judgeq_vllm-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\njudgeq = judgeq_vllm.vllm_adapter.plugin:register\n' \
    > "$site/judgeq_vllm-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH="$HOME/.wheelhouse/site:$site" PYTHONSAFEPATH=1 VLLM_USE_FLASHINFER_SAMPLER=0
export JUDGEQ_SMOLLM2_DIR="$HOME/smol"
set +e
