"""A lease holder for the kill scenarios: claims one GPU, then streams phase events at random clocks.

    python _holder.py ENDPOINT GPU_INDEX JOB_ID SEED

Prints ``locked`` once its first clock event is sent, then keeps sending (one unit every ~1 ms) until it is
killed, so a kill lands at a random point of the event stream.
"""

from __future__ import annotations

import random
import sys
import time

from envpipe_agent.client import AgentClient


def main(endpoint: str, gpu_index: int, job_id: str, seed: int) -> None:
    rng = random.Random(seed)
    client = AgentClient(endpoint, job_id=job_id, rank=gpu_index)
    gpu = client.hello().gpus[gpu_index]
    client.claim(gpu.uuid)
    clocks = [c for c in gpu.clocks_mhz if c < gpu.max_mhz]  # never the top clock: a lock must be visible
    client.phase("F0", "begin", rng.choice(clocks))
    print("locked", flush=True)
    step = 0
    while True:
        step += 1
        unit = f"{'FB'[step % 2]}{step % 8}"
        client.phase(unit, "begin", rng.choice(clocks))
        client.phase(unit, "end")
        time.sleep(0.001)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
