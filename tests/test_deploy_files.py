"""deploy/: the systemd units, the container image and the compose file run only commands the project has,
pass only settings it reads, and give each process more time to stop than it takes to drain.

No container engine or systemd runs here, so the files are parsed: YAML with PyYAML, units as INI files,
the Dockerfile line by line. A command is checked down to its target: gunicorn's config file and app
factory, rq's queue names and worker class (found in the source, without importing torch).
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from shared.settings import BACKENDS, Settings
from tests.test_settings_docs import documented, gunicorn_variables, settings_variables

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
ENV_FILE = DEPLOY / "systemd" / "llm.env"
INSTALL_DIR = "/opt/llm-stream-server"
"""Where the units expect the checkout (its `.venv/bin` holds the commands)."""

OUTSIDE_VARIABLES = {"PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES"}
"""Variables the deploy files may set that Python or CUDA read, not the project."""


def project_variables() -> set[str]:
    """What the project reads: `Settings` fields and the gunicorn config's variables, all in the README table."""
    return set(settings_variables()) | set(gunicorn_variables())


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def project_services() -> dict[str, dict]:
    """The compose services that run this project's image (not Redis)."""
    return {name: service for name, service in compose()["services"].items() if service.get("image") != "redis:7"}


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(path)
    return parser


def unit_settings(path: Path) -> dict[str, str]:
    """A unit's `Environment=` assignments."""
    lines = [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith("Environment=")]
    return dict(assignment.split("=", 1) for assignment in lines)


def env_file_settings(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def defines(dotted: str, name: str) -> bool:
    """Whether module `dotted` of the project defines or imports `name` (read from its source)."""
    spec = importlib.util.find_spec(dotted)
    assert spec is not None and spec.origin, f"no module {dotted!r} in the project"
    tree = ast.parse(Path(spec.origin).read_text())
    names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    names |= {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              for alias in node.names}
    return name in names


def check_command(argv: list[str]) -> None:
    """`argv` is one of the project's two commands, with a target that exists."""
    program = Path(argv[0]).name
    assert argv[0] == program or argv[0] == f"{INSTALL_DIR}/.venv/bin/{program}", argv
    if program == "gunicorn":
        config = argv[argv.index("-c") + 1]
        assert (ROOT / config).is_file(), f"gunicorn config {config} does not exist"
        module, factory = argv[-1].removesuffix("()").split(":")
        assert defines(module, factory), f"{argv[-1]} names no app factory of the project"
    elif program == "rq":
        assert argv[1] == "worker", argv
        queues = argv[2:argv.index("-w")]
        assert queues and set(queues) <= set(BACKENDS), f"unknown queues {queues}"
        module, _, worker_class = argv[argv.index("-w") + 1].rpartition(".")
        assert defines(module, worker_class), f"{module}.{worker_class} is not a worker class of the project"
        assert "REDIS_URL" in argv[argv.index("--url") + 1], "the worker's Redis is not REDIS_URL"
    else:
        raise AssertionError(f"{argv[0]} is not a command of the project")


def all_commands() -> dict[str, list[str]]:
    """Every command line the deploy files run, by where it is written."""
    found = {f"compose {name}": service["command"] for name, service in project_services().items()}
    found.update({f"{path.name}": shlex.split(unit(path)["Service"]["ExecStart"]) for path in UNITS})
    found.update({f"Dockerfile {kind}": json.loads(args) for kind, args in dockerfile_instructions()
                  if kind in ("CMD", "ENTRYPOINT")})
    return found


@pytest.mark.parametrize("where", sorted(all_commands()))
def test_every_command_exists_in_the_project(where):
    check_command(all_commands()[where])


def test_every_pool_has_a_worker_in_each_kind_of_deployment():
    commands = all_commands().values()
    for pool in BACKENDS:
        workers = [argv for argv in commands if Path(argv[0]).name == "rq" and pool in argv]
        assert len(workers) >= 2, f"the {pool!r} pool has no worker in compose or systemd: {workers}"


def test_every_setting_passed_is_one_the_project_reads():
    allowed = project_variables() | OUTSIDE_VARIABLES
    passed = {"llm.env": set(env_file_settings(ENV_FILE))}
    for name, service in project_services().items():
        passed[f"compose {name}"] = set(service.get("environment", {}))
    for path in UNITS:
        passed[path.name] = set(unit_settings(path))
    passed["Dockerfile ENV"] = {name for kind, args in dockerfile_instructions() if kind == "ENV"
                                for name in re.findall(r"(\w+)=", args)} - {"PATH"}
    passed["compose ${...}"] = set(re.findall(r"\$\{(\w+):-", (DEPLOY / "compose.yaml").read_text()))
    unknown = {where: sorted(names - allowed) for where, names in passed.items() if names - allowed}
    assert not unknown, f"settings nothing in the project reads: {unknown}"
    assert project_variables() <= set(documented())


def test_every_unit_reads_the_redis_url_from_the_environment_file():
    assert "REDIS_URL" in env_file_settings(ENV_FILE)
    for path in UNITS:
        service = unit(path)["Service"]
        assert Path(service["EnvironmentFile"]).name == ENV_FILE.name, path.name
        assert Path(service["WorkingDirectory"]) == Path(INSTALL_DIR)


def test_each_gpu_worker_sees_its_own_device():
    assert unit_settings(DEPLOY / "systemd" / "llm-gpu@.service")["CUDA_VISIBLE_DEVICES"] == "%i"
    devices = [service["deploy"]["resources"]["reservations"]["devices"]
               for service in project_services().values() if "gpu" in service["command"]]
    assert len(devices) >= 2
    assert all(device["capabilities"] == ["gpu"] for reserved in devices for device in reserved)
    ids = [device_id for reserved in devices for device in reserved for device_id in device["device_ids"]]
    assert len(ids) == len(set(ids)), f"two GPU workers share a device: {ids}"


def test_redis_keeps_an_append_only_file():
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def seconds(value: str) -> int:
    return int(value.removesuffix("s"))


def test_every_process_gets_more_time_to_stop_than_it_takes():
    graceful = int(gunicorn_variables()["GUNICORN_GRACEFUL_TIMEOUT"])
    drain = Settings().drain_s
    stops = {path.name: int(unit(path)["Service"]["TimeoutStopSec"]) for path in UNITS}
    stops.update({name: seconds(service["stop_grace_period"]) for name, service in project_services().items()})
    for where, allowed in stops.items():
        needed = graceful if "api" in where else drain
        assert allowed > needed, f"{where} is killed after {allowed} s, before its {needed} s to stop"


def load_gunicorn_config(monkeypatch, **env: str) -> dict:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    namespace: dict = {}
    exec(compile((DEPLOY / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)  # noqa: S102
    return namespace


def test_gunicorn_takes_its_sizes_from_the_environment_and_is_threaded(monkeypatch):
    config = load_gunicorn_config(monkeypatch, WEB_CONCURRENCY="3", GUNICORN_THREADS="96", PORT="9001",
                                  GUNICORN_TIMEOUT="700", GUNICORN_GRACEFUL_TIMEOUT="20")
    assert (config["workers"], config["threads"], config["bind"]) == (3, 96, "0.0.0.0:9001")
    assert (config["timeout"], config["graceful_timeout"]) == (700, 20)
    assert config["timeout"] > Settings().job_timeout_s  # a long blocking /generate is never cut
    assert is_threaded(config["worker_class"])
    assert callable(config["post_worker_init"]) and callable(config["worker_int"])


def is_threaded(worker_class: str) -> bool:
    """gunicorn's gthread worker, or a subclass of it (a sync worker would cut streams at its timeout)."""
    from gunicorn.util import load_class
    from gunicorn.workers.gthread import ThreadWorker

    return issubclass(load_class(worker_class, default="gthread", section="gunicorn.workers"), ThreadWorker)
