"""Checks of the deployment files that need neither Docker nor a cluster.

They keep docker-compose.yml, deploy/k8s and deploy/Dockerfile in step with the code:
the environment variable names are the ones the services read, each service's
configuration builds from the environment its container gets, ports line up from
SPECD_LISTEN to container port to Service to probe, and every command names a module or
a `specd` subcommand that exists.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.config import GatewayConfig, ModelServiceConfig, OrchestratorConfig, split_host_port
from services.models import catalog
from services.server import LIVENESS

import tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
K8S = REPO_ROOT / "deploy" / "k8s"
K8S_BASE = K8S / "base"
GPU_OVERLAY = K8S / "overlays" / "gpu"

# Variables the deployment files may set that are not specd's: Python's and pip's own.
FOREIGN_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK",
               "REDISCLI_AUTH"}  # fmt: skip
SERVICE_MODULES = {"verifier_svc", "drafter_svc", "orchestrator"}
LOOPBACK = ("127.", "localhost", "[::1]")


# -- reading the files ----------------------------------------------------------------------


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def yaml_files() -> list[Path]:
    return [COMPOSE, *sorted(K8S.rglob("*.yaml"))]


def compose() -> dict[str, Any]:
    return load_docs(COMPOSE)[0]


def base_objects() -> list[dict[str, Any]]:
    """Every object of the kustomize base, from the files its kustomization lists."""
    listed = load_docs(K8S_BASE / "kustomization.yaml")[0]["resources"]
    return [doc for name in listed for doc in load_docs(K8S_BASE / name)]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def is_specd_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":")[0] == "specd"


def argv_of(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def python_modules(argv: list[str]) -> list[str]:
    """Modules run with `python -m`, in an argv or inside a `sh -c` script."""
    return re.findall(r"python3? -m ([\w.]+)", " ".join(argv))


def service_module(argv: list[str]) -> str | None:
    found = [m for m in python_modules(argv) if m in SERVICE_MODULES]
    return found[0] if found else None


def config_env_names() -> set[str]:
    """The environment variables the services read.

    The quoted names in services/config.py, the services' flags (services/flags.py), and
    names read straight from os.environ in the packages.
    """
    names = set(re.findall(r'"((?:SPECD|REDIS)_[A-Z0-9_]+)"', (REPO_ROOT / "services" / "config.py").read_text()))
    # Every variable a service reads is one of its flags (tests/test_flags.py checks it).
    names |= set(re.findall(r'Setting\("([A-Z][A-Z0-9_]*)"', (REPO_ROOT / "services" / "flags.py").read_text()))
    for package in ("services", "drafter_svc", "verifier_svc", "orchestrator", "gateway", "specd"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            names |= set(re.findall(r'environ(?:\.get\(|\[)\s*"([A-Z][A-Z0-9_]*)"', path.read_text()))
    return names


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment, with ${VAR:-default} replaced by its default."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _INTERPOLATION.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def cpu_count(quantity: str) -> int:
    return math.ceil(int(quantity[:-1]) / 1000) if quantity.endswith("m") else math.ceil(float(quantity))


def k8s_env(container: dict[str, Any], configmaps: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps, then env entries on top."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        ref = entry["valueFrom"]
        if "resourceFieldRef" in ref:
            assert ref["resourceFieldRef"]["resource"] == "requests.cpu", entry
            env[entry["name"]] = str(cpu_count(str(container["resources"]["requests"]["cpu"])))
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[entry["name"]] = configmaps[key["name"]]["data"][key["key"]]
        elif "secretKeyRef" in ref:  # generated by kustomize (secretGenerator): a stand-in value
            assert ref["secretKeyRef"]["name"] in secret_names(), entry
            env[entry["name"]] = "a-secret"
        else:
            raise AssertionError(f"{container['name']}: no test value for {entry}")
    return env


def secret_names() -> set[str]:
    """The Secrets the base's kustomization generates."""
    config = load_docs(K8S_BASE / "kustomization.yaml")[0]
    for generator in config.get("secretGenerator", []):
        for source in generator.get("files", []):
            assert (K8S_BASE / source.split("=")[-1]).is_file(), source
    return {g["name"] for g in config.get("secretGenerator", [])}


def host_port(address: str) -> tuple[str, int]:
    host, port = address.removeprefix("dns:///").rsplit(":", 1)
    return host, int(port)


def service_config(module: str, env: dict[str, str]) -> ModelServiceConfig | OrchestratorConfig:
    """The config the service's main would build from `env` (raises ConfigError if it cannot)."""
    if module == "orchestrator":
        return OrchestratorConfig.from_env(env, "127.0.0.1:50050")
    return ModelServiceConfig.from_env(env, "127.0.0.1:50051")


def seconds(duration: str) -> float:
    """A compose duration ("40s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


# -- every file parses ----------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)
        if path != COMPOSE:
            assert {"apiVersion", "kind"} <= doc.keys(), doc


def test_kustomizations_list_what_exists() -> None:
    """Every resource and patch a kustomization names exists, and no base manifest is left out."""
    for path in K8S.rglob("kustomization.yaml"):
        kustomization = load_docs(path)[0]
        for name in kustomization.get("resources", []):
            target = path.parent / name
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {name}"
        for patch in kustomization.get("patches", []):
            assert (path.parent / patch["path"]).is_file(), f"{path}: {patch}"
    listed = set(load_docs(K8S_BASE / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in K8S_BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert present == listed


def test_gpu_patch_merges_into_the_verifier_container() -> None:
    """A strategic merge patch whose container name matched nothing would add a second container."""
    patch = load_docs(GPU_OVERLAY / "verifier-gpu.yaml")[0]
    base = of_kind(base_objects(), "Deployment")[patch["metadata"]["name"]]
    base_names = {c["name"] for c in base["spec"]["template"]["spec"]["containers"]}
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] in base_names
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"SPECD_DEVICE": "cuda", "SPECD_DTYPE": "bfloat16"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert service_module(argv_of(base["spec"]["template"]["spec"]["containers"][0])) == "verifier_svc"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("folder", [K8S, GPU_OVERLAY], ids=["base", "gpu"])
def test_kustomize_builds(folder: Path) -> None:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    deployments = of_kind(list(yaml.safe_load_all(done.stdout)), "Deployment")
    assert set(deployments) == {"redis", "verifier", "drafter", "orchestrator", "gateway"}
    verifier = deployments["verifier"]["spec"]["template"]["spec"]["containers"]
    assert len(verifier) == 1
    has_gpu = "nvidia.com/gpu" in verifier[0]["resources"]["limits"]
    assert has_gpu == (folder == GPU_OVERLAY)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_gpu_verifier_takes_the_cuda_tag_of_the_image_the_base_names(tmp_path: Path) -> None:
    """The overlay swaps only the tag: a registry set in the base's `images:` carries over."""
    shutil.copytree(K8S, tmp_path / "k8s")
    base = tmp_path / "k8s" / "base" / "kustomization.yaml"
    config = load_docs(base)[0]
    config["images"] = [{"name": "specd", "newName": "ghcr.io/team/specd", "newTag": "1.2"}]
    base.write_text(yaml.safe_dump(config))
    done = subprocess.run(["kubectl", "kustomize", str(tmp_path / "k8s" / "overlays" / "gpu")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    images = {
        name: [c["image"] for c in pod_containers(d)]
        for name, d in of_kind(list(yaml.safe_load_all(done.stdout)), "Deployment").items()
    }
    assert images["verifier"][-1] == "ghcr.io/team/specd:cuda"
    assert images["drafter"][-1] == images["orchestrator"][-1] == "ghcr.io/team/specd:1.2"


# -- environment variable names -------------------------------------------------------------


def test_config_names_are_found() -> None:
    """Guards the parser below: a regex that found nothing would let every name pass."""
    assert {
        "SPECD_MODEL", "SPECD_LISTEN", "SPECD_HOME", "SPECD_DTYPE", "SPECD_DEVICE", "SPECD_THREADS",
        "SPECD_MAX_SESSIONS", "SPECD_Q_TOP", "SPECD_MAX_DRAFT", "SPECD_GRACE_SECONDS", "SPECD_VERIFIER",
        "SPECD_DRAFTER", "REDIS_URL", "SPECD_TOKENIZER", "SPECD_STRATEGY", "SPECD_K", "SPECD_MAX_NEW_TOKENS",
        "SPECD_MAX_NEW_TOKENS_LIMIT", "SPECD_SESSION_TTL", "SPECD_RPC_TIMEOUT", "SPECD_LOG_LEVEL",
    } <= config_env_names()  # fmt: skip


def compose_env_names() -> set[str]:
    names = {name for service in compose()["services"].values() for name in compose_env(service)}
    return names | {m.group(1) for m in _INTERPOLATION.finditer(COMPOSE.read_text())}


def k8s_env_names() -> set[str]:
    names: set[str] = set()
    for path in K8S.rglob("*.yaml"):
        for doc in load_docs(path):
            if doc.get("kind") == "ConfigMap":
                names |= set(doc["data"])
            if doc.get("kind") == "Deployment":
                for container in pod_containers(doc):
                    names |= {e["name"] for e in container.get("env", [])}
                    script = " ".join(argv_of(container))
                    names |= set(re.findall(r"\$[({]?([A-Z][A-Z0-9_]*)", script))
    return names


def dockerfile_env_names() -> set[str]:
    return {
        name for word, rest in dockerfile_instructions() if word == "ENV"
        for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest)
    }  # fmt: skip


@pytest.mark.parametrize(
    "where, names",
    [("docker-compose.yml", compose_env_names), ("deploy/k8s", k8s_env_names), ("Dockerfile", dockerfile_env_names)],
)
def test_env_names_are_ones_the_services_read(where: str, names) -> None:
    used = names()
    assert used, f"no environment variables found in {where}"
    unknown = used - config_env_names() - FOREIGN_ENV
    assert not unknown, f"{where} sets {sorted(unknown)}, which no service reads (see services/config.py)"


# -- compose --------------------------------------------------------------------------------


def compose_specd_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if service_module(s.get("command", []))}


def test_compose_services_build_their_config_and_listen_where_checked() -> None:
    services = compose()["services"]
    specd = compose_specd_services()
    assert {service_module(s["command"]) for s in specd.values()} == SERVICE_MODULES
    for name, service in specd.items():
        module = service_module(service["command"])
        config = service_config(module, compose_env(service))
        host, port = host_port(config.listen)
        assert not host.startswith(LOOPBACK), f"{name} listens on {config.listen}: unreachable from other containers"
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{port}", name
        assert python_modules(service["healthcheck"]["test"]) == ["services.healthcheck"]
        if module == "orchestrator":
            for address, wanted in ((config.verifier, "verifier_svc"), (config.drafter, "drafter_svc")):
                peer, peer_port = host_port(address)
                assert service_module(services[peer]["command"]) == wanted, address
                assert host_port(service_config(wanted, compose_env(services[peer])).listen)[1] == peer_port
            redis_host, redis_port = host_port(config.redis_url.split("//")[1].split("/")[0])
            assert services[redis_host]["image"].startswith("redis:") and redis_port == 6379
            assert services[name]["ports"] == [f"{port}:{port}"]


def test_compose_start_order() -> None:
    services = compose()["services"]
    for name in ("verifier", "drafter"):
        assert services[name]["depends_on"] == {"models": {"condition": "service_completed_successfully"}}
    waits = services["orchestrator"]["depends_on"]
    assert waits == {n: {"condition": "service_healthy"} for n in ("redis", "verifier", "drafter")}
    for name in waits:
        assert "healthcheck" in services[name], f"{name} is waited on as healthy but has no healthcheck"


def test_compose_drafter_can_have_replicas() -> None:
    drafter = compose()["services"]["drafter"]
    assert "replicas" in drafter["deploy"]
    assert "container_name" not in drafter and "ports" not in drafter, "replicas would clash on a name or port"


def test_compose_prepares_the_models_it_serves() -> None:
    services = compose()["services"]
    command = services["models"]["command"]
    assert command[:3] == ["specd", "models", "prepare"]
    prepared = {arg for arg in command[3:] if not arg.startswith("--")}
    # The verifier's volume is read-only: its int8 weights are written here.
    assert command[command.index("--int8") + 1] == compose_env(services["verifier"])["SPECD_MODEL"]
    served = {compose_env(services[n])["SPECD_MODEL"] for n in ("verifier", "drafter")}
    assert served <= prepared <= set(catalog().names)
    assert compose_env(services["orchestrator"])["SPECD_TOKENIZER"] == compose_env(services["verifier"])["SPECD_MODEL"]


def test_compose_stop_grace_exceeds_service_grace() -> None:
    for name, service in compose_specd_services().items():
        grace = service_config(service_module(service["command"]), compose_env(service)).grace_seconds
        assert seconds(service["stop_grace_period"]) > grace, name


# -- kubernetes -----------------------------------------------------------------------------


def specd_deployments() -> dict[str, tuple[dict[str, Any], dict[str, Any], str]]:
    """name -> (Deployment, its service container, the module it runs)."""
    found = {}
    for name, deployment in of_kind(base_objects(), "Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            module = service_module(argv_of(container))
            if module:
                found[name] = (deployment, container, module)
    return found


def test_every_service_module_has_a_deployment() -> None:
    assert {module for _, _, module in specd_deployments().values()} == SERVICE_MODULES


def test_deployment_selectors_match_their_pods() -> None:
    for name, deployment in of_kind(base_objects(), "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


def test_services_route_to_container_ports() -> None:
    """Each Service selects one Deployment; its ports and that Deployment's ports are the same set."""
    deployments = of_kind(base_objects(), "Deployment")
    for name, service in of_kind(base_objects(), "Service").items():
        selector = service["spec"]["selector"].items()
        selected = [d for d in deployments.values() if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"service {name} selects {len(selected)} deployments"
        ports = [p for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        by_name = {p["name"]: p["containerPort"] for p in ports if "name" in p}
        targets = {by_name.get(p.get("targetPort"), p.get("targetPort", p["port"])) for p in service["spec"]["ports"]}
        assert targets == {p["containerPort"] for p in ports}, f"service {name}"


def test_listen_ports_probes_and_peers_line_up() -> None:
    objects = base_objects()
    configmaps = of_kind(objects, "ConfigMap")
    services = of_kind(objects, "Service")
    deployments = specd_deployments()
    module_port = {}
    for name, (_, container, module) in deployments.items():
        config = service_config(module, k8s_env(container, configmaps))
        host, port = host_port(config.listen)
        assert not host.startswith(LOOPBACK), f"{name} listens on {config.listen}: unreachable for kubelet and peers"
        assert [p["containerPort"] for p in container["ports"]] == [port], name
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": ""}, f"{name} {probe}"
        assert container["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS}, name
        module_port[module] = (name, port)
    orchestrator = next(c for _, c, m in deployments.values() if m == "orchestrator")
    config = service_config("orchestrator", k8s_env(orchestrator, configmaps))
    for address, module in ((config.verifier, "verifier_svc"), (config.drafter, "drafter_svc")):
        host, port = host_port(address)
        service_ports = {p["port"] for p in services[host]["spec"]["ports"]}
        assert port in service_ports and module_port[module] == (host, port), address
    redis_host, redis_port = host_port(config.redis_url.split("//")[1].split("/")[0])
    assert redis_port in {p["port"] for p in services[redis_host]["spec"]["ports"]}


def test_references_resolve() -> None:
    """ConfigMaps, claims and volumes that pods name exist."""
    objects = base_objects()
    configmaps = of_kind(objects, "ConfigMap")
    claims = of_kind(objects, "PersistentVolumeClaim")
    for name, deployment in of_kind(objects, "Deployment").items():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in pod_containers(deployment):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, name
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{container['name']}: {mount['name']}"


def test_drafter_autoscales_on_cpu() -> None:
    objects = base_objects()
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler").values()
    target = of_kind(objects, "Deployment")[hpa["spec"]["scaleTargetRef"]["name"]]
    (container,) = target["spec"]["template"]["spec"]["containers"]
    assert service_module(argv_of(container)) == "drafter_svc"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container["resources"]["requests"], "CPU utilisation is measured against the request"


def test_model_services_prepare_their_model_first() -> None:
    configmaps = of_kind(base_objects(), "ConfigMap")
    models = {}
    for name, (deployment, container, module) in specd_deployments().items():
        if module == "orchestrator":
            continue
        model = k8s_env(container, configmaps)["SPECD_MODEL"]
        prepares = [argv_of(c) for c in deployment["spec"]["template"]["spec"].get("initContainers", [])]
        # The verifier's torch runtime loads int8 weights, written by its initContainer.
        expected = ["specd", "models", "prepare", *(["--int8"] if module == "verifier_svc" else []), model]
        assert expected in prepares, name
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert k8s_env(container, configmaps)["SPECD_HOME"] in mounts, name
        models[module] = model
    orchestrator = next(c for _, c, m in specd_deployments().values() if m == "orchestrator")
    assert k8s_env(orchestrator, configmaps)["SPECD_TOKENIZER"] == models["verifier_svc"]


def test_termination_grace_exceeds_service_grace() -> None:
    configmaps = of_kind(base_objects(), "ConfigMap")
    for name, (deployment, container, module) in specd_deployments().items():
        grace = service_config(module, k8s_env(container, configmaps)).grace_seconds
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pause + grace, name


def test_orchestrator_has_two_replicas() -> None:
    (deployment, _, _) = next(v for v in specd_deployments().values() if v[2] == "orchestrator")
    assert deployment["spec"]["replicas"] == 2


# -- commands -------------------------------------------------------------------------------


def specd_argvs() -> list[list[str]]:
    """Every command run in the specd image, by compose or by Kubernetes."""
    argvs = [s.get("command", []) for s in compose()["services"].values() if is_specd_image(s.get("image", ""))]
    argvs += [s["healthcheck"]["test"][1:] for s in compose()["services"].values() if "healthcheck" in s]
    for path in K8S.rglob("*.yaml"):
        for doc in load_docs(path):
            if doc.get("kind") == "Deployment":
                argvs += [argv_of(c) for c in pod_containers(doc) if is_specd_image(c.get("image", "specd"))]
    return [a for a in argvs if a]


def test_python_modules_exist() -> None:
    modules = {m for argv in specd_argvs() for m in python_modules(argv)}
    assert SERVICE_MODULES | {"services.healthcheck"} <= modules
    for module in modules:
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"python -m {module}: no such module"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def test_specd_commands_parse() -> None:
    from specd.cli import build_parser

    assert "specd" in pyproject()["project"]["scripts"]
    commands = [argv for argv in specd_argvs() if argv[0] == "specd"]
    assert commands
    for argv in commands:
        args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown subcommand
        if argv[1:3] == ["models", "prepare"]:
            named = [*args.names, *args.int8]
            assert named and set(named) <= set(catalog().names), argv


# -- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile() -> None:
    steps = list(dockerfile_instructions())
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms[0].split()[0] == "python:3.11-slim"
    stages = {rest.split()[-1] for rest in froms if " AS " in rest.upper()}
    assert "models" in stages
    runs = [rest for word, rest in steps if word == "RUN"]
    torch_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch=="))
    torch_step = next(i for i, r in enumerate(runs) if "--index-url" in r and torch_pin in r)
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install .*(-r |\s\.(\s|$))", r))
    assert torch_step < project_step, "torch must come from its own index before the project pulls PyPI's build"
    assert any("specd models prepare" in r for r in runs)
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert "SPECD_HOME=/models" in " ".join(rest for word, rest in steps if word == "ENV")
    assert "--help" in [rest for word, rest in steps if word == "CMD"][-1]


def test_dockerfile_copies_every_package() -> None:
    """A package added to pyproject but not copied would be missing from the image."""
    copied = set()
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied.add(source.rstrip("/"))
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in include} <= copied


def test_k8s_model_services_are_pools_that_survive_a_drain() -> None:
    """The orchestrator resolves headless Services (every ready pod a replica), each
    replicated component spreads over nodes and keeps a disruption budget, and the session
    store keeps its append-only file on a volume that outlives the pod."""
    objects = base_objects()
    services, budgets = of_kind(objects, "Service"), of_kind(objects, "PodDisruptionBudget")
    deployments = of_kind(objects, "Deployment")
    config = service_config("orchestrator", k8s_env(specd_deployments()["orchestrator"][1], of_kind(objects, "ConfigMap")))
    for address, name in ((config.verifier, "verifier"), (config.drafter, "drafter")):
        assert address.startswith("dns:///"), address
        assert services[name]["spec"]["clusterIP"] == "None", name
    for name in ("verifier", "drafter", "orchestrator"):
        labels = deployments[name]["spec"]["selector"]["matchLabels"]
        assert budgets[name]["spec"]["selector"]["matchLabels"] == labels, name
        spread = deployments[name]["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert spread[0]["labelSelector"]["matchLabels"] == labels, name
    redis = deployments["redis"]["spec"]["template"]["spec"]
    assert "--appendonly" in redis["containers"][0]["args"]
    claim = next(v for v in redis["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert claim in of_kind(objects, "PersistentVolumeClaim")


def test_compose_orchestrator_resolves_every_replica() -> None:
    services = compose()["services"]
    env = compose_env(services["orchestrator"])
    for name, peer in (("SPECD_VERIFIER", "verifier"), ("SPECD_DRAFTER", "drafter")):
        assert env[name].startswith(f"dns:///{peer}:"), env[name]
        assert "container_name" not in services[peer] and "ports" not in services[peer], peer


# -- the HTTP gateway and the metrics endpoints ----------------------------------------------


def test_compose_gateway_reaches_the_orchestrator_and_is_published() -> None:
    services = compose()["services"]
    gateway = services["gateway"]
    assert python_modules(gateway["command"]) == ["gateway"]
    config = GatewayConfig.from_env(compose_env(gateway))
    host, port = split_host_port(config.listen, "SPECD_HTTP_LISTEN")
    assert not host.startswith(LOOPBACK) and gateway["ports"] == [f"{port}:{port}"]
    assert gateway["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/health"
    peer, peer_port = host_port(config.orchestrator)
    orchestrator = service_config("orchestrator", compose_env(services[peer]))
    assert service_module(services[peer]["command"]) == "orchestrator" and host_port(orchestrator.listen)[1] == peer_port
    assert config.model_name == compose_env(services[peer])["SPECD_TOKENIZER"]
    assert gateway["depends_on"] == {"orchestrator": {"condition": "service_healthy"}}


def test_k8s_gateway_reaches_the_orchestrator_and_probes_its_port() -> None:
    objects = base_objects()
    configmaps = of_kind(objects, "ConfigMap")
    deployment = of_kind(objects, "Deployment")["gateway"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = k8s_env(container, configmaps)
    config = GatewayConfig.from_env(env)
    host, port = split_host_port(config.listen, "SPECD_HTTP_LISTEN")
    assert not host.startswith(LOOPBACK) and [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    peer, peer_port = host_port(config.orchestrator)
    assert peer_port in {p["port"] for p in of_kind(objects, "Service")[peer]["spec"]["ports"]}
    assert config.model_name == env["SPECD_TOKENIZER"]


def test_every_process_serves_metrics_where_prometheus_looks() -> None:
    configmaps = of_kind(base_objects(), "ConfigMap")
    for name, deployment in of_kind(base_objects(), "Deployment").items():
        if name == "redis":
            continue
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        _, port = split_host_port(k8s_env(container, configmaps)["SPECD_METRICS_LISTEN"], "SPECD_METRICS_LISTEN")
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port), name
    for name, service in compose()["services"].items():
        if python_modules(service.get("command", [])) and name != "models":
            assert compose_env(service)["SPECD_METRICS_LISTEN"].startswith("0.0.0.0:"), name


def defined_metrics() -> set[str]:
    """The metric names the code registers (with the suffixes Prometheus adds to them)."""
    names = set()
    for package in ("services", "orchestrator", "gateway"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            names |= set(re.findall(r'"(specd:[a-z0-9_]+)"', path.read_text()))
    return names


def test_the_dashboard_queries_metrics_that_exist() -> None:
    import json

    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "specd.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 15
    defined = defined_metrics()
    assert {"specd:spec_decode_num_drafts", "specd:rpc_duration_seconds", "specd:http_requests"} <= defined
    for expr in exprs:
        for name in re.findall(r"specd:[a-z0-9_]+", expr):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert name in defined or base in defined, f"the dashboard queries {name}, which nothing exports"


def test_network_policies_let_only_orchestrators_reach_model_services_and_redis() -> None:
    objects = base_objects()
    policies = of_kind(objects, "NetworkPolicy")
    configmaps = of_kind(objects, "ConfigMap")

    def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
        selector = policy["spec"]["podSelector"]
        if not selector.get("matchLabels", {}).items() <= labels.items():
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))

    for name, deployment in of_kind(objects, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies.values() if selects(p, labels)]
        assert mine, f"no NetworkPolicy selects {name}"
        if name in ("verifier", "drafter", "redis"):
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            port = container["ports"][0]["containerPort"]
            rules = [r for p in mine for r in p["spec"]["ingress"] if port in {x["port"] for x in r["ports"]}]
            assert rules and all(
                f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "orchestrator"
                for r in rules for f in r["from"]
            ), f"{name}:{port} is reachable by more than orchestrators"  # fmt: skip
            if name != "redis":
                _, listen = split_host_port(k8s_env(container, configmaps)["SPECD_LISTEN"], "SPECD_LISTEN")
                assert listen == port


def test_every_pod_meets_the_restricted_pod_security_profile() -> None:
    """Non-root, the runtime's default seccomp filter, no privilege escalation, no capabilities:
    what a namespace labelled pod-security.kubernetes.io/enforce=restricted admits."""
    for name, deployment in of_kind(base_objects(), "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod_containers(deployment):
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{name}/{container['name']}"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{container['name']}"


def test_redis_requires_the_password_the_orchestrators_send() -> None:
    services = compose()["services"]
    command = services["redis"]["command"]
    password = command[command.index("--requirepass") + 1]
    assert password.startswith("${REDIS_PASSWORD") and compose_env(services["orchestrator"])["REDIS_PASSWORD"]
    assert services["orchestrator"]["environment"]["REDIS_PASSWORD"] == password
    deployments = of_kind(base_objects(), "Deployment")
    redis_container = deployments["redis"]["spec"]["template"]["spec"]["containers"][0]
    assert "$(REDIS_PASSWORD)" in redis_container["args"]

    def secret_of(container: dict[str, Any], name: str) -> dict[str, str]:
        return next(e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == name)

    orchestrator = deployments["orchestrator"]["spec"]["template"]["spec"]["containers"][0]
    assert secret_of(orchestrator, "REDIS_PASSWORD") == secret_of(redis_container, "REDIS_PASSWORD")
    assert secret_of(redis_container, "REDIS_PASSWORD")["name"] in secret_names()


@pytest.mark.parametrize("rendered", [False, True], ids=["files", "kustomize"])
def test_manifests_validate_against_the_kubernetes_schema(rendered: bool) -> None:
    """Every object, strict (no unknown field), against Kubernetes 1.33's OpenAPI schema."""
    import kubernetes_validate

    if rendered:
        if shutil.which("kubectl") is None:
            pytest.skip("kubectl not installed")
        objects = []
        for folder in (K8S, GPU_OVERLAY):
            done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            objects += [d for d in yaml.safe_load_all(done.stdout) if d]
    else:
        objects = base_objects()
    assert len(objects) >= 15
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, "1.33", strict=True)
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {err.message} at {list(err.path)}") from None


def test_public_api_replicas_prefer_different_nodes() -> None:
    for name in ("orchestrator", "gateway"):
        pod = of_kind(base_objects(), "Deployment")[name]["spec"]["template"]
        (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), name
