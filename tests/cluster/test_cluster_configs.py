"""The cluster configs in cluster/: structure, GPU requests, the job command lines, and the Ray Data plan they run.

No cluster is started: YAML is validated against Ray's own cluster schema and a KubeRay schema written here;
every `jobs/embed.py` command line goes through the job's real argument parser; the embed plan is built on
the session's local Ray and inspected (not executed) for what each stage asks of the cluster.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from engine.cluster import actor_pool_resources, embed_stage_resources
from engine.pipeline.read import ReadUnit
from engine.pipeline.runner import EmbedConfig
from engine.pipeline.stages import EmbedStage, TokenizeStage
from engine.pipeline.write import FragmentWriter

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAY_UP_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# ---------------------------------------------------------------- the job's own argument parser

def _embed_parser() -> argparse.ArgumentParser:
    """jobs/embed.py's real parser, built without running the job.

    Uses ``build_parser()`` when the module has one; until then main() builds the parser inline, so
    main() is run only up to its ``parse_args`` call, which hands the parser over and stops.
    """
    spec = importlib.util.spec_from_file_location("embed_job", ROOT / "jobs" / "embed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "build_parser"):
        return module.build_parser()

    class Built(Exception):
        pass

    def hand_over(self, args=None, namespace=None):
        raise Built(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", hand_over)
        with pytest.raises(Built) as built:
            module.main([])
    return built.value.args[0]


def _embed_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "jobs/embed.py"], f"not an embed job command: {command!r}"
    return argv[2:]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _embed_parser()
    parser.exit_on_error = False

    def fail(message):
        raise AssertionError(f"jobs/embed.py rejects {argv}: {message}")

    parser.error = fail
    return parser.parse_args(argv)


def _rayjob_entrypoint() -> str:
    return _load("kuberay-rayjob.yaml")["spec"]["entrypoint"]


def _readme_embed_commands() -> list[str]:
    """Every `python jobs/embed.py ...` command in cluster/README.md's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if "jobs/embed.py" in line:
                commands.append(line[line.index("python jobs/embed.py"):].split("#")[0])
    return commands


def test_parser_capture_gives_the_real_parser():
    parser = _embed_parser()
    a = parser.parse_args(["--catalog", "a.parquet", "b.parquet", "--out", "o.lance", "--num-gpus", "0.5"])
    assert a.catalog == ["a.parquet", "b.parquet"] and a.out == "o.lance" and a.num_gpus == 0.5
    with pytest.raises(AssertionError, match="--no-such-flag"):
        _parse(["--catalog", "a", "--out", "o", "--no-such-flag"])


def test_rayjob_entrypoint_parses_with_the_job_flags():
    a = _parse(_embed_argv(_rayjob_entrypoint()))
    assert a.catalog[0].startswith("s3://") and a.out.startswith("s3://") and a.out.endswith(".lance")
    assert a.num_gpus == 1.0
    assert a.resume is True and a.overwrite is False
    assert a.max_failed_fraction == 0.01
    assert a.precision == "auto"


def test_readme_commands_parse_with_the_job_flags():
    commands = _readme_embed_commands()
    assert len(commands) == 2, commands  # the `ray up` submit and the KubeRay submit
    for command in commands:
        a = _parse(_embed_argv(command))
        assert a.num_gpus == 1.0 and a.resume is True, command


def test_readme_knobs_are_real_flags():
    parser_flags = {s for action in _embed_parser()._actions for s in action.option_strings}
    knobs = re.findall(r"^\| `(--[a-z][a-z-]+)", (CLUSTER / "README.md").read_text(), flags=re.M)
    unknown = sorted(set(knobs) - parser_flags)
    assert not unknown, f"cluster/README.md's knobs table documents flags jobs/embed.py does not have: {unknown}"
    assert {"--num-gpus", "--model-actors", "--batch-size", "--precision", "--resume", "--max-failed-fraction"} <= set(knobs)


# ---------------------------------------------------------------- ray up config

def test_every_yaml_in_cluster_is_checked():
    assert sorted(p.name for p in CLUSTER.glob("*.y*ml")) == [
        "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "ray-cluster.yaml"]


def test_ray_up_config_matches_rays_own_schema():
    jsonschema.validate(_load("ray-cluster.yaml"), json.loads(RAY_UP_SCHEMA.read_text()))


RAY_UP_SCHEMA_STRICT = {
    "type": "object",
    "required": ["cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                 "docker", "file_mounts", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"],
    "properties": {
        "available_node_types": {
            "type": "object", "minProperties": 3,
            "additionalProperties": {
                "type": "object", "required": ["resources", "node_config"],
                "properties": {"resources": {"type": "object", "required": ["CPU", "GPU"]}},
            },
        },
        "docker": {"type": "object", "required": ["image"]},
    },
}


def test_ray_up_config_shape():
    cfg = _load("ray-cluster.yaml")
    jsonschema.validate(cfg, RAY_UP_SCHEMA_STRICT)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] >= 2  # driver + read/tokenize, never the model
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"]["GPU"] > 0]
    cpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"]["GPU"] == 0]
    assert len(gpu) == 1 and len(cpu) == 1
    assert gpu[0]["min_workers"] == 0 and 1 <= gpu[0]["max_workers"] <= cfg["max_workers"]
    assert gpu[0]["resources"]["GPU"] == 1
    assert cpu[0]["min_workers"] == 0 and cpu[0]["max_workers"] >= 1
    assert sum(t["max_workers"] for t in (*gpu, *cpu)) <= cfg["max_workers"]


def _pip_order(commands: list[str]) -> tuple[str, int, int]:
    torch = next(i for i, c in enumerate(commands) if "pip install" in c and "torch==" in c)
    engine = next(i for i, c in enumerate(commands) if re.search(r"pip install .*~/engine", c))
    return commands[torch], torch, engine


def test_ray_up_installs_the_right_torch_before_the_project():
    cfg = _load("ray-cluster.yaml")
    assert cfg["file_mounts"]["~/engine"] == "."
    head_torch, t, e = _pip_order(cfg["setup_commands"] + cfg["head_setup_commands"])
    assert t < e and "whl/cpu" in head_torch
    for name, node in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        torch_cmd, t, e = _pip_order(cfg["setup_commands"] + node["worker_setup_commands"])
        assert t < e, name
        assert ("whl/cu" in torch_cmd) == (node["resources"]["GPU"] > 0), (name, torch_cmd)


def test_ray_up_turns_token_auth_on_everywhere():
    cfg = _load("ray-cluster.yaml")
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert len(start) == 1 and "RAY_AUTH_MODE=token ray start" in start[0], key
    assert "--head" in cfg["head_start_ray_commands"][-1] and "--dashboard-host=0.0.0.0" in cfg["head_start_ray_commands"][-1]


# ---------------------------------------------------------------- KubeRay

RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # KubeRay: map[string]string
POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {"containers": {
        "type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "image", "resources"],
            "properties": {"resources": {"type": "object", "required": ["requests", "limits"]}},
        }}}}},
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "authOptions", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"const": ray.__version__},
        "authOptions": {"type": "object", "required": ["mode"], "properties": {"mode": {"const": "token"}}},
        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                          "properties": {"rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "minItems": 2, "items": {
            "type": "object", "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
            "properties": {"rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE,
                           "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 1}},
        }},
    },
}
RAY_CLUSTER = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"}, "spec": RAY_CLUSTER_SPEC}}
RAY_JOB = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
    "spec": {"type": "object",
             "required": ["entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "rayClusterSpec"],
             "properties": {"entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                            "shutdownAfterJobFinishes": {"const": True}, "rayClusterSpec": RAY_CLUSTER_SPEC}}}}


def _cluster_specs() -> dict[str, dict]:
    return {"kuberay-raycluster.yaml": _load("kuberay-raycluster.yaml")["spec"],
            "kuberay-rayjob.yaml": _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]}


def test_kuberay_files_match_the_schema():
    jsonschema.validate(_load("kuberay-raycluster.yaml"), RAY_CLUSTER)
    jsonschema.validate(_load("kuberay-rayjob.yaml"), RAY_JOB)


def _gpus(group: dict) -> tuple[int, int, float]:
    """(nvidia.com/gpu request, limit, rayStartParams num-gpus) of a head or worker group."""
    resources = group["template"]["spec"]["containers"][0]["resources"]
    return (resources["requests"].get("nvidia.com/gpu", 0), resources["limits"].get("nvidia.com/gpu", 0),
            float(group["rayStartParams"].get("num-gpus", "0")))


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_gpu_group_requests_match_num_gpus(name):
    spec = _cluster_specs()[name]
    assert _gpus(spec["headGroupSpec"]) == (0, 0, 0.0)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert sorted(groups) == ["cpu", "gpu"]
    assert _gpus(groups["gpu"]) == (1, 1, 1.0)
    assert _gpus(groups["cpu"]) == (0, 0, 0.0)
    for group in groups.values():
        assert group["minReplicas"] == group["replicas"] == 0 and group["maxReplicas"] >= 1
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"]
        assert int(group["rayStartParams"]["num-cpus"]) == int(resources["limits"]["cpu"])
    assert any(t["key"] == "nvidia.com/gpu" for t in groups["gpu"]["template"]["spec"]["tolerations"])


def test_rayjob_gpu_group_can_hold_its_model_actors():
    a = _parse(_embed_argv(_rayjob_entrypoint()))
    cfg = EmbedConfig(catalog=tuple(a.catalog), out=a.out, num_gpus=a.num_gpus, model_actors=a.model_actors,
                      tokenizer_actors=a.tokenizer_actors)
    spec = _cluster_specs()["kuberay-rayjob.yaml"]
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert actor_pool_resources(cfg)["GPU"] == 4.0  # 4 model actors x 1 GPU
    assert gpu["maxReplicas"] * _gpus(gpu)[2] >= actor_pool_resources(cfg)["GPU"]
    cpus = sum(int(g["maxReplicas"]) * float(g["rayStartParams"]["num-cpus"]) for g in spec["workerGroupSpecs"])
    assert cpus + float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]) >= actor_pool_resources(cfg)["CPU"]


def test_rayjob_runtime_env_is_valid():
    env = yaml.safe_load(_load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])
    # working_dir is a path in the submitter pod's image (validated there, not on this machine)
    assert env.pop("working_dir") == "/home/ray/engine"
    assert set(env) <= ray.runtime_env.RuntimeEnv.known_fields
    runtime_env = ray.runtime_env.RuntimeEnv(**env)  # raises on badly typed env_vars
    assert runtime_env["env_vars"] == {"AWS_DEFAULT_REGION": "us-west-2", "PYTHONUNBUFFERED": "1"}


def test_readme_runtime_envs_are_valid():
    blobs = re.findall(r"--runtime-env-json '([^']*)'", (CLUSTER / "README.md").read_text())
    assert len(blobs) == 2
    for blob in blobs:
        env = json.loads(blob)
        assert set(env) <= ray.runtime_env.RuntimeEnv.known_fields and "working_dir" not in env  # --working-dir sets it
        assert ".venv" in env["excludes"]
        ray.runtime_env.RuntimeEnv(**env)


# ---------------------------------------------------------------- what each stage asks for

def test_stage_resources_gpu_only_for_the_model():
    res = embed_stage_resources(EmbedConfig(catalog=("x",), out="o", num_gpus=0.5, model_actors=4, tokenizer_actors=3))
    assert {s: r["num_gpus"] for s, r in res.items()} == {"read": 0.0, "tokenize": 0.0, "model": 0.5, "write": 0.0}
    assert {s: r["num_cpus"] for s, r in res.items()} == {"read": 0.5, "tokenize": 0.25, "model": 1.0, "write": 0.5}
    assert res["model"]["compute"] == ray.data.ActorPoolStrategy(size=4)
    assert res["tokenize"]["compute"] == ray.data.ActorPoolStrategy(size=3)
    assert res["read"]["compute"] == res["write"]["compute"] == ray.data.TaskPoolStrategy()
    assert actor_pool_resources(EmbedConfig(catalog=("x",), out="o", num_gpus=0.5, model_actors=4, tokenizer_actors=3)) == {
        "CPU": 3 * 0.25 + 4 * 1.0, "GPU": 2.0}


def test_stage_resources_on_cpu():
    cfg = EmbedConfig(catalog=("x",), out="o", model_actors=2, model_cpus=1.5)
    res = embed_stage_resources(cfg)
    assert res["model"]["num_gpus"] == 0.0 and res["model"]["num_cpus"] == 1.5
    assert actor_pool_resources(cfg) == {"CPU": 0.25 + 2 * 1.5, "GPU": 0.0}


STAGE_OF = {ReadUnit: "read", TokenizeStage: "tokenize", EmbedStage: "model", FragmentWriter: "write"}


def _planned_stages(ds: ray.data.Dataset) -> dict[str, object]:
    """Stage name -> its MapBatches logical operator. Ray offers no public accessor for the logical plan."""
    from ray.data._internal.logical.operators.map_operator import MapBatches

    ops = [op for op in ds._logical_plan.dag.post_order_iter() if isinstance(op, MapBatches)]
    return {STAGE_OF[op.fn if isinstance(op.fn, type) else type(op.fn)]: op for op in ops}


@pytest.fixture
def captured_plan(ray_session, sample_table, tmp_path, monkeypatch):
    """Run the RayJob's entrypoint through jobs/embed.py on local files; capture the dataset instead of executing it."""
    captured = []

    def capture(self, *args, **kwargs):
        captured.append(self)
        return iter(())  # nothing runs: every unit stays uncommitted and the job reports failure

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", capture)
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "wait_for_min_actors_s", 10)  # if the plan ever ran here, fail instead of waiting for a GPU

    def plan_for(entrypoint: str):
        argv = _embed_argv(entrypoint)
        catalog = tmp_path / f"cat{len(captured)}.parquet"
        pq.write_table(sample_table.slice(0, 100), catalog)
        argv[argv.index("--catalog") + 1] = str(catalog)
        argv[argv.index("--out") + 1] = str(tmp_path / f"out{len(captured)}.lance")
        spec = importlib.util.spec_from_file_location("embed_job", ROOT / "jobs" / "embed.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit, match="embed job failed"):
            module.main(argv)
        assert len(captured) == 1, "the runner no longer consumes its dataset with iter_batches; update this test"
        return captured.pop(), _parse(argv)

    return plan_for


def test_rayjob_plan_puts_the_gpu_on_the_model_stage_only(captured_plan):
    ds, a = captured_plan(_rayjob_entrypoint())
    ops = _planned_stages(ds)
    assert list(ops) == ["read", "tokenize", "model", "write"]
    assert {s: op.ray_remote_args.get("num_gpus", 0) for s, op in ops.items()} == {
        "read": 0, "tokenize": 0, "model": 1.0, "write": 0}
    assert ops["model"].compute == ray.data.ActorPoolStrategy(size=4)
    assert ops["model"].ray_remote_args["num_cpus"] == 1
    assert ops["model"].fn_constructor_kwargs["use_gpu"] is True
    assert ops["tokenize"].compute == ray.data.ActorPoolStrategy(size=8)
    assert ops["model"].batch_size == ops["tokenize"].batch_size == 4096


@pytest.mark.parametrize("extra", [[], ["--num-gpus", "0", "--model-actors", "2"], ["--num-gpus", "0.5"]])
def test_plan_matches_embed_stage_resources(captured_plan, extra):
    ds, a = captured_plan(_rayjob_entrypoint() + " " + shlex.join(extra))
    cfg = EmbedConfig(catalog=tuple(a.catalog), out=a.out, num_gpus=a.num_gpus, model_actors=a.model_actors,
                      tokenizer_actors=a.tokenizer_actors)
    expected = embed_stage_resources(cfg)
    for stage, op in _planned_stages(ds).items():
        got = {"num_cpus": op.ray_remote_args.get("num_cpus"), "num_gpus": op.ray_remote_args.get("num_gpus", 0.0),
               "compute": op.compute}
        assert got == expected[stage], stage
