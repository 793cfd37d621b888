"""SmolLM2 with 4 KV heads: the test model of tensor parallelism (docs/tensor-parallel-design.md §5).

SmolLM2-135M has 9 query and 3 KV heads, which 2 ranks cannot split. The padded model adds
a KV head that copies KV head 0 and three query heads that copy query heads 0-2 (the
group of KV head 0), and gives those query heads zero output-projection columns: it
computes SmolLM2's function exactly (the extra heads add zeros), and its KV head 3 must be
scored, and keep, what KV head 0 does. 2 ranks hold 2 KV and 6 query heads each, the
grouping (3 query heads per KV head) as in SmolLM2.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def pad_kv_heads(source: str | Path, target: str | Path) -> Path:
    """Writes the padded checkpoint of the SmolLM2 folder ``source`` into ``target``."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    head_dim, num_q_heads, num_kv_heads = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    group = num_q_heads // num_kv_heads
    weights = {}
    for name, weight in load_file(source / "model.safetensors").items():
        if name.endswith("self_attn.q_proj.weight"):
            weight = torch.cat([weight, weight[: group * head_dim]])
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            weight = torch.cat([weight, weight[:head_dim]])
        elif name.endswith("self_attn.o_proj.weight"):
            weight = torch.cat([weight, weight.new_zeros(weight.shape[0], group * head_dim)], dim=1)
        weights[name] = weight.contiguous()
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    config["num_attention_heads"], config["num_key_value_heads"] = num_q_heads + group, num_kv_heads + 1
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for path in source.iterdir():
        if path.is_file() and path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, target / path.name)
    return target
