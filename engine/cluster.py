"""What each embed stage asks of a Ray cluster: per-stage resources and compute strategy, and the actor-pool totals.

Plain functions of ``EmbedConfig`` so cluster sizing (cluster/*.yaml, cluster/README.md) can be checked
without a cluster. ``engine.pipeline.runner._run_dataset`` takes its stage resources from here;
tests/cluster compares them with the Ray Data plan the runner really builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.data import ActorPoolStrategy, TaskPoolStrategy

if TYPE_CHECKING:  # type only: engine.pipeline.runner may import this module
    from engine.pipeline.runner import EmbedConfig

STAGES = ("read", "tokenize", "model", "write")
READ_CPUS = 0.5  # per read task (one input file per task)
TOKENIZE_CPUS = 0.25  # per tokenizer actor
WRITE_CPUS = 0.5  # per writer task: Lance writes are multi-threaded; more concurrent writers on few cores thrash
GPU_MODEL_CPUS = 1.0  # host CPU per GPU model actor (feeds the GPU, runs the batch -> tensor copy)


def embed_stage_resources(cfg: EmbedConfig) -> dict[str, dict]:
    """Stage name -> ``{"num_cpus", "num_gpus", "compute"}``, the ``map_batches`` keyword arguments of that stage.

    Only the model stage ever asks for GPUs (``cfg.num_gpus`` per actor); read and write run as Ray tasks,
    tokenize and model as fixed-size actor pools.
    """
    use_gpu = cfg.num_gpus > 0
    return {
        "read": {"num_cpus": READ_CPUS, "num_gpus": 0.0, "compute": TaskPoolStrategy()},
        "tokenize": {"num_cpus": TOKENIZE_CPUS, "num_gpus": 0.0, "compute": ActorPoolStrategy(size=cfg.tokenizer_actors)},
        "model": {"num_cpus": GPU_MODEL_CPUS if use_gpu else cfg.model_cpus, "num_gpus": float(cfg.num_gpus),
                  "compute": ActorPoolStrategy(size=cfg.model_actors)},
        "write": {"num_cpus": WRITE_CPUS, "num_gpus": 0.0, "compute": TaskPoolStrategy()},
    }


def actor_pool_resources(cfg: EmbedConfig) -> dict[str, float]:
    """``{"CPU", "GPU"}`` held for the whole run by the tokenizer and model actor pools.

    The cluster must offer at least this much (plus one read and one write task's CPUs) or the
    pools never start: e.g. ``--num-gpus 0.5 --model-actors 4`` needs 2 GPUs.
    """
    res = embed_stage_resources(cfg)
    totals = {"CPU": 0.0, "GPU": 0.0}
    for name in ("tokenize", "model"):
        size = res[name]["compute"].min_size
        totals["CPU"] += size * res[name]["num_cpus"]
        totals["GPU"] += size * res[name]["num_gpus"]
    return totals
