"""One `score_paged` problem for Nsight Compute: bench_kernels.py's, Llama-3.1-8B heads.

    ncu --launch-skip 2 --launch-count 2 --set full -k regex:score -o score \\
        python benchmarks/kernels/ncu_score.py BATCH PROMPT_LEN

Three calls (the first two compile and warm up; profile the third's two kernels). ncu
empties the caches before each kernel by default, so the score pass finds none of the
keys that the stats pass read in L2, unlike back-to-back calls.
"""

import sys

import torch
from bench_kernels import score_problem

from judgeq_vllm.kernels import ScoreConfig


def main() -> None:
    batch, prompt_len = int(sys.argv[1]), int(sys.argv[2])
    run = score_problem(prompt_len, batch, ScoreConfig())
    for _ in range(3):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
