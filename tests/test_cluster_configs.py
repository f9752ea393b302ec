"""The cluster/ files parse and say what the README claims (no cloud, no Kubernetes needed)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from freeshap_ray.cli import build_parser
from freeshap_ray.config import load_config

from .doc_commands import doc_command

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_entrypoint(cmd: str | list[str], python: str):
    """A `PYTHON -m freeshap_ray run CONFIG --set ...` command (``python`` names the head's Python, so
    the head's PATH does not matter) whose config resolves with those overrides."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
    assert argv[:4] == [python, "-m", "freeshap_ray", "run"], argv
    args = build_parser().parse_args(argv[3:])
    config = args.config
    if config.startswith("/app/freeshap_ray/"):  # the image's copy of this repository
        config = str(REPO / config.removeprefix("/app/freeshap_ray/"))
    overrides = [o.replace("$OUTPUT", "s3://bucket/run").replace('"', "") for o in args.overrides]
    cfg = load_config(config, overrides)
    assert cfg.kernel.num_gpus_per_actor >= 1 and cfg.kernel.num_actors >= 1
    return cfg


def _entrypoint(path: Path) -> list[str]:
    """The entrypoint (after `--`) of the `ray job submit` command quoted in ``path``."""
    argv = doc_command(path, "ray job submit")
    return argv[argv.index("--") + 1:]


def test_autoscaler_config_is_valid_for_ray():
    cfg = _load("autoscaler-aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t.get("resources", {}).get("GPU")]
    assert head and gpu and gpu[0]["max_workers"] >= 1
    setup = " ".join(cfg["setup_commands"])
    assert "bootstrap.sh install" in setup and "~/freeshap_ray" in cfg["file_mounts"]
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        text = " ".join(cmds)  # every node runs the bootstrap's venv: started with its own `ray`
        assert "$HOME/freeshap_ray/.venv/bin/ray start" in text and "RAY_AUTH_MODE=token" in text
        assert "FREESHAP_RAY_CACHE" in text
    # The documented job names that venv's Python by absolute path (the head's PATH is not relied on).
    venv_python = f"/home/{cfg['auth']['ssh_user']}/freeshap_ray/.venv/bin/python"
    _check_entrypoint(_entrypoint(CLUSTER / "autoscaler-aws.yaml"), venv_python)
    assert "ray stop" not in (CLUSTER / "autoscaler-aws.yaml").read_text()
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # pragma: no cover - Ray internals moved
        pytest.skip("ray.autoscaler._private.util not available")
    validate_config(prepare_config(cfg))  # Ray's own cluster-config JSON schema


def test_rayjob_manifest():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cfg = _check_entrypoint(spec["entrypoint"], "python")  # the image's Python (first on the image's PATH)
    assert cfg.output.startswith("s3://")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["FREESHAP_RAY_CACHE"].startswith("/shared")
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and any(p["containerPort"] == 8265 for p in head["ports"])
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and worker["image"] == head["image"]
    assert cfg.kernel.num_actors * cfg.kernel.num_gpus_per_actor <= gpus * group["maxReplicas"]
    assert all(any(m["mountPath"] == "/shared" for m in c["volumeMounts"]) for c in (head, worker))
    assert "FROM rayproject/ray:" + cluster["rayVersion"] in (CLUSTER / "Dockerfile").read_text()


def test_runtime_env_and_submit_script():
    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "." and ".venv/" in env["excludes"] and "outputs/" in env["excludes"]
    assert "FREESHAP_RAY_CACHE" in env["env_vars"]
    script = (CLUSTER / "submit_example.sh").read_text()
    assert subprocess.run(["bash", "-n", str(CLUSTER / "submit_example.sh")]).returncode == 0
    assert "ray stop" not in script and "RAY_AUTH_MODE" in script
    assert ': "${HEAD_PYTHON:?' in script  # required: no guess of the head's Python
    _check_entrypoint(_entrypoint(CLUSTER / "submit_example.sh"), "$HEAD_PYTHON")
    assert (REPO / ".rayignore").is_file() and ".venv/" in (REPO / ".rayignore").read_text()


def test_documented_submit_commands_name_the_head_python():
    """README and cluster/README: the entrypoint is the head's Python with -m freeshap_ray, never a bare
    `freeshap-ray` (not on the job's PATH when the head was started without activating the venv)."""
    _check_entrypoint(_entrypoint(REPO / "README.md"), "$PWD/.venv/bin/python")
    _check_entrypoint(_entrypoint(CLUSTER / "README.md"), "$HEAD_PYTHON")
    assert doc_command(REPO / "README.md", ".venv/bin/ray start --head")[:3] == [".venv/bin/ray", "start", "--head"]
    for path in (REPO / "README.md", *CLUSTER.iterdir()):
        text = path.read_text(encoding="utf-8")
        assert "-- freeshap-ray" not in text and "entrypoint: >-\n    freeshap-ray" not in text, path
