"""One `score_paged` problem for Nsight Compute: Llama-3.1-8B heads, bf16, NHD, block 16.

    ncu --launch-skip 2 --launch-count 2 --set full -k regex:score -o score \\
        python benchmarks/kernels/ncu_score.py BATCH PROMPT_LEN

Three calls (the first two compile and warm up; profile the third's two kernels). ncu
empties the caches before each kernel by default, so the score pass finds none of the
keys that the stats pass read in L2, unlike back-to-back calls.
"""

import sys

import torch

from judgeq_vllm.kernels import score_paged

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, N_SOFT = 32, 8, 128, 16, 32


def main() -> None:
    batch, prompt_len = int(sys.argv[1]), int(sys.argv[2])
    key_len = prompt_len + N_SOFT
    blocks_per_req = -(-key_len // BLOCK_SIZE)
    num_blocks = batch * blocks_per_req
    # NHD: the physical order is [num_blocks, BS, HKV, 2D]; scattered blocks, as in a pool
    cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM, device="cuda",
                        dtype=torch.bfloat16).permute(0, 2, 1, 3)
    block_tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_req).int()
    queries = torch.randn(batch * N_SOFT, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(0, batch * N_SOFT + 1, N_SOFT, device="cuda", dtype=torch.int32)
    key_lens = torch.full((batch,), key_len, device="cuda", dtype=torch.int32)
    candidates = torch.full((batch,), prompt_len, device="cuda", dtype=torch.int32)
    for _ in range(3):
        score_paged(queries, qsl, cache, block_tables, key_lens, candidates, HEAD_DIM ** -0.5,
                    max_num_obs=N_SOFT, max_key_len=key_len, max_num_candidates=prompt_len)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
