"""CPU per engine step of vLLM's Ray stat logger: buffered (serve/engine_metrics.py) vs every value at once.

Not part of the package and not over HTTP (benchmarks/ otherwise is): it runs vLLM's own
RayPrometheusStatLogger classes in-process against a real local Ray, feeding each logger the
stats of a decode step with 16 or 64 running requests (one generated token each, one request
finishing every 128 steps), on a running event loop, and reads process CPU time per `record()`.

    .venv/bin/python benchmarks/results/metrics_flush/step_cost.py .bench/home/registry/raygate/tiny-chat/versions/1
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time


def _config(model_path: str):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_path, max_model_len=2048).create_engine_config()


def _step(running: int, step: int):
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

    sched = SchedulerStats(num_running_reqs=running, kv_cache_usage=0.1)
    it = IterationStats()
    it.num_generation_tokens = running
    it.inter_token_latencies_iter = [0.007] * running
    if step % 128 == 0:
        it.finished_requests = [
            FinishedRequestStats(
                finish_reason=FinishReason.LENGTH, e2e_latency=1.0, num_prompt_tokens=8, num_generation_tokens=128,
                max_tokens_param=128, queued_time=0.01, prefill_time=0.01, inference_time=1.0, decode_time=0.9,
                mean_time_per_output_token=0.007,
            )
        ]
    return sched, it


async def _measure(logger, running: int, steps: int) -> float:
    stats = [_step(running, i) for i in range(steps)]
    start = time.process_time()
    for i, (sched, it) in enumerate(stats):
        logger.record(sched, it, None, 0)
        if i % 64 == 0:
            await asyncio.sleep(0)  # lets the buffer's flush timer run, as between engine steps
    logger.log()  # vLLM's periodic log: the buffered logger flushes what it holds, inside the timing
    return (time.process_time() - start) / steps * 1e6


async def main(model_path: str, steps: int = 3000, rounds: int = 5) -> None:
    import ray

    from serve.engine_metrics import buffered_ray_stat_logger

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    config = _config(model_path)
    loggers = {flush: buffered_ray_stat_logger(flush)(config, [0]) for flush in (1.0, 0.0)}
    print("| running requests | every value at once (flush 0) us/step | buffered 1 s us/step | ratio |")
    print("|---|---|---|---|")
    for running in (16, 64):
        figures: dict[float, list[float]] = {1.0: [], 0.0: []}
        for _ in range(rounds):  # interleaved, so drift hits both
            for flush, logger in loggers.items():
                figures[flush].append(await _measure(logger, running, steps))
        unbuffered, buffered = statistics.median(figures[0.0]), statistics.median(figures[1.0])
        print(f"| {running} | {unbuffered:.1f} | {buffered:.1f} | {buffered / unbuffered:.2f} |")
    ray.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
