"""The real-cluster manifests (KubeRay, Ray cluster launcher, container image) cannot rot
silently: kinds, versions against pyproject.toml, GPU workers that autoscale, the entry point,
secrets by reference only, services kept private."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S = CLUSTER / "k8s"
ENTRYPOINT = "pipelines/train_zoo.py"


# ------------------------------------------------------------------------------ the pins

@pytest.fixture(scope="module")
def pins() -> dict:
    # A regex, not tomllib: the project supports Python 3.10, which has no tomllib.
    text = (ROOT / "pyproject.toml").read_text()
    ray = re.findall(r"""["']ray(?:\[[^\]]*\])?\s*==\s*([\w.]+)["']""", text)
    assert len(ray) == 1, f"pyproject.toml must pin ray exactly once with ==, found {ray}"
    version = re.search(r"""(?m)^version\s*=\s*["']([^"']+)["']""", text).group(1)
    pins = {"ray": ray[0], "version": version, "python": "py311"}
    makefile = ROOT / "Makefile"
    if makefile.exists():
        m = re.search(r"torch==([\w.+]+)", makefile.read_text())
        pins["torch"] = m.group(1) if m else None
    return pins


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path, kind: str) -> dict:
    docs = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {[d.get('kind') for d in _docs(path)]}"
    return docs[0]


def _containers(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    for g in cluster_spec.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]["spec"]["containers"]


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


# ------------------------------------------------------------------------------- KubeRay

def check_ray_cluster_spec(spec: dict, pins: dict, where: str) -> None:
    assert str(spec["rayVersion"]) == pins["ray"], f"{where}: rayVersion {spec['rayVersion']} != pyproject ray=={pins['ray']}"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token auth must be on"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling must be on"
    assert "autoscalerOptions" in spec
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head service must stay inside the cluster"
    assert not head.get("enableIngress"), f"{where}: no ingress to the dashboard (job submission = code execution)"
    assert str(head.get("rayStartParams", {}).get("num-cpus")) == "0", f"{where}: keep work off the head"

    expected_image = re.compile(rf"^[^\s:]+/compresszoo:{re.escape(pins['version'])}-ray{re.escape(pins['ray'])}-{pins['python']}-gpu$")
    images = {c["image"] for _, cs in _containers(spec) for c in cs}
    assert len(images) == 1, f"{where}: head and workers must run one image, found {images}"
    image = images.pop()
    assert expected_image.match(image), f"{where}: image {image!r} must be <registry>/compresszoo:{pins['version']}-ray{pins['ray']}-{pins['python']}-gpu"

    gpu_groups = []
    for g in spec["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        if "nvidia.com/gpu" in res.get("limits", {}):
            gpu_groups.append(g)
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1
            assert res.get("requests", {}).get("nvidia.com/gpu") == res["limits"]["nvidia.com/gpu"]
            tolerations = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{where}: GPU nodes are usually tainted"
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    for g in gpu_groups:
        lo, hi, n = g["minReplicas"], g["maxReplicas"], g.get("replicas", g["minReplicas"])
        assert 0 <= lo <= n <= hi and hi > lo, f"{where}: group {g['groupName']} cannot scale ({lo}..{hi}, {n})"


def test_raycluster(pins):
    rc = _one(K8S / "raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(rc["spec"], pins, "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    job = _one(K8S / "rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    return job


def test_rayjob_cluster(rayjob, pins):
    spec = rayjob["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, "the job's GPU cluster must go away with the job"
    check_ray_cluster_spec(spec["rayClusterSpec"], pins, "rayjob.yaml")


def _entrypoint(rayjob: dict) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


def test_rayjob_entrypoint_runs_train_zoo_from_the_image(rayjob):
    argv = _entrypoint(rayjob)
    assert argv[0] in ("python", "python3")
    script = argv[1]
    assert script == ENTRYPOINT or script.endswith("/" + ENTRYPOINT), f"entrypoint runs {script!r}, not {ENTRYPOINT}"
    assert argv[argv.index("--preset") + 1] == "paper"
    if script.startswith("/"):
        # The image must put the repository's pipelines/ exactly there.
        stages = _dockerfile_stages()
        final = stages[-1]
        app = script[: -len(ENTRYPOINT)].rstrip("/")
        assert final["workdir"] == app, f"Dockerfile WORKDIR {final['workdir']} != {app} (entrypoint {script})"
        assert any(src.rstrip("/") == "pipelines" and dst.rstrip("/") in ("pipelines", f"{app}/pipelines")
                   for src, dst in final["copies"]), "Dockerfile must COPY pipelines/ into the WORKDIR"
    if (ROOT / ENTRYPOINT).exists():
        assert (ROOT / ENTRYPOINT).is_file()


def test_rayjob_arguments_are_ones_train_zoo_accepts(rayjob):
    if not (ROOT / ENTRYPOINT).exists():
        pytest.skip(f"{ENTRYPOINT} is not written yet")
    argv = _entrypoint(rayjob)
    env = {"PYTHONPATH": str(ROOT / "platform"), "PATH": "/usr/bin:/bin"}
    helped = subprocess.run([sys.executable, str(ROOT / ENTRYPOINT), "--help"], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    assert helped.returncode == 0, helped.stderr
    for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
        assert flag in helped.stdout, f"rayjob.yaml passes {flag}, which {ENTRYPOINT} --help does not list"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    if overrides:
        code = ("import sys, dataclasses; from compresszoo.config import TrainConfig; "
                "TrainConfig().with_overrides(sys.argv[1:])")
        r = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, f"rayjob.yaml --set {overrides}: {r.stderr.strip().splitlines()[-1:]}"


def test_rayservice_serves_registered_models_with_autoscaling_replicas(pins):
    """cluster/k8s/rayservice.yaml: the cluster rules above (less the GPU group: the codec
    serves on CPUs), and a Serve config that Ray accepts and whose applications build."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from compresszoo.registry_client import parse_ref
    from compresszoo.serving.ray_serve import route_of

    svc = _one(K8S / "rayservice.yaml", "RayService")
    assert svc["apiVersion"] == "ray.io/v1"
    spec = svc["spec"]["rayClusterConfig"]
    assert str(spec["rayVersion"]) == pins["ray"] and spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    images = {c["image"] for _, cs in _containers(spec) for c in cs}
    assert images == {f"REGISTRY/compresszoo:{pins['version']}-ray{pins['ray']}-{pins['python']}-gpu"}, images
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"]), "workers must autoscale"

    config = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    assert config.applications
    for app in config.applications:
        module, _, attr = app.import_path.partition(":")
        builder = getattr(__import__(module, fromlist=[attr]), attr)
        parse_ref(app.args["ref"])
        assert app.route_prefix == route_of(app.args["ref"]), (app.name, app.route_prefix)
        built = call_user_app_builder_with_args_if_necessary(builder, app.args)  # binds; loads nothing
        options = built._bound_deployment._deployment_config.autoscaling_config
        assert 1 <= options.min_replicas < options.max_replicas, (app.name, options)


def test_configmap_holds_no_secret():
    cm = _one(K8S / "config.yaml", "ConfigMap")
    for key in cm.get("data", {}):
        assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key), f"{key} belongs in a Secret"


# ------------------------------------------------------------------------------ Dockerfile

def _dockerfile_stages() -> list[dict]:
    """FROM/ARG/WORKDIR/COPY/RUN of cluster/Dockerfile, with ${ARG} defaults substituted."""
    text = (CLUSTER / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    args: dict[str, str] = {}
    stages: list[dict] = []

    def sub(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)

    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG":
            name, _, default = rest.partition("=")
            if default:
                args[name.strip()] = default.strip()
            if stages:
                stages[-1]["args"][name.strip()] = args.get(name.strip())
        elif instr == "FROM":
            stages.append({"from": sub(rest.split()[0]), "args": {}, "workdir": None, "copies": [], "runs": []})
        elif instr == "WORKDIR":
            stages[-1]["workdir"] = sub(rest)
        elif instr == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            stages[-1]["copies"] += [(src, parts[-1]) for src in parts[:-1]]
        elif instr == "RUN":
            stages[-1]["runs"].append(sub(rest))
    for st in stages:
        st["global_args"] = dict(args)
    return stages


def test_dockerfile_versions_match_pyproject(pins):
    stages = _dockerfile_stages()
    assert stages, "cluster/Dockerfile has no FROM"
    for st in stages:
        assert st["from"] == f"rayproject/ray:{pins['ray']}-{pins['python']}-gpu", st["from"]
    args = stages[-1]["global_args"]
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["COMPRESSZOO_VERSION"] == pins["version"]
    if pins.get("torch"):
        assert args["TORCH_VERSION"] == pins["torch"], "the image's torch differs from the Makefile's"


def test_dockerfile_installs_the_wheel_with_the_compiled_codec(pins):
    stages = _dockerfile_stages()
    build = " ".join(r for st in stages[:-1] for r in st["runs"])
    assert "pip wheel" in build and "--no-build-isolation" in build
    final = " ".join(stages[-1]["runs"])
    assert re.search(rf"compresszoo-{re.escape(pins['version'])}-\S*\.whl", final), "the final stage must install the built wheel"
    assert "compresszoo.ans._rans" in final, "the image build must import the compiled codec"
    assert "ray[default,serve,train,tune]==${RAY_VERSION}" in (CLUSTER / "Dockerfile").read_text()
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert "**/*.so" in ignore, "host-built extensions must not leak into the image"


# --------------------------------------------------------------------------- cluster launcher

@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_yaml_is_valid_for_ray(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws))  # Ray's own schema, as `ray up` applies it


def test_aws_yaml_gpu_workers_and_versions(aws, pins):
    assert aws["provider"]["type"] == "aws"
    assert aws["docker"]["image"] == f"rayproject/ray:{pins['ray']}-{pins['python']}-gpu"
    types = aws["available_node_types"]
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no GPU worker node type"
    assert all(t.get("max_workers", 0) > t.get("min_workers", 0) for t in gpu), "GPU workers must autoscale"
    assert types[aws["head_node_type"]]["resources"].get("CPU") == 0
    setup = " ".join(aws["setup_commands"])
    wheel = re.search(r"compresszoo-([\w.]+)-(cp\d+)-\S+\.whl", setup)
    assert wheel, "setup_commands must install the compresszoo wheel"
    assert wheel.group(1) == pins["version"] and wheel.group(2) == pins["python"].replace("py", "cp")
    assert f"=={pins['ray']}" in setup
    mount_src = next(iter(aws["file_mounts"].values()))
    assert mount_src.rstrip("/").endswith("dist"), "the wheel comes from cluster/build_wheel.sh's dist/"


def test_aws_yaml_keeps_the_dashboard_private_and_auth_on(aws):
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "reach the dashboard through `ray dashboard` (SSH tunnel)"
    for cmds in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    for node in aws["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"], "S3 access through the instance role, not keys"


# ----------------------------------------------------------------------------------- secrets

MANIFESTS = [K8S / "raycluster.yaml", K8S / "rayjob.yaml", K8S / "rayservice.yaml", K8S / "config.yaml",
             CLUSTER / "aws.yaml"]
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_no_literal_secrets_in_manifests(path):
    docs = _docs(path)
    for doc in docs:
        assert doc.get("kind") != "Secret", f"{path.name}: a Secret object in git; create it with kubectl"
        for where, node in _walk(doc):
            if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
                raise AssertionError(f"{path.name}{where}: {node['name']} has a literal value; use valueFrom.secretKeyRef")
            if "valueFrom" in node and SECRET_NAME.search(str(node.get("name", ""))):
                assert "secretKeyRef" in node["valueFrom"], f"{path.name}{where}: take {node['name']} from a Secret"


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".pyc"),
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_aws_credentials_in_cluster_files(path):
    text = path.read_text(errors="replace")
    assert not AWS_KEY_ID.search(text), f"{path}: looks like an AWS access key id"
    for m in AWS_SECRET.finditer(text):
        s = m.group(0)
        # 40 base64 characters with mixed case and digits is an AWS secret key's shape.
        if re.search(r"[a-z]", s) and re.search(r"[A-Z]", s) and re.search(r"\d", s):
            raise AssertionError(f"{path}: {s[:4]}... looks like an AWS secret access key")
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", text)


def test_kubernetes_credentials_come_from_secrets():
    for path in (K8S / "raycluster.yaml", K8S / "rayjob.yaml", K8S / "rayservice.yaml"):
        text = path.read_text()
        assert "secretRef" in text or "secretKeyRef" in text, f"{path.name}: S3/MLflow credentials must come from a Secret"


def test_rayignore_keeps_growing_logs_and_outputs_out_of_the_uploaded_working_dir(tmp_path):
    """Ray's own packaging (what `ray job submit --working-dir .` hashes and uploads) with the
    repository's .rayignore: a log teed into the folder and outputs do not change the package;
    the code does."""
    from ray._private.runtime_env.packaging import get_uri_for_directory

    (tmp_path / ".rayignore").write_text((ROOT / ".rayignore").read_text())
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "train_zoo.py").write_text("print('train')\n")
    before = get_uri_for_directory(str(tmp_path), include_gitignore=True)
    for rel in ("train.log", "logs/ray.txt", "demo/astronaut.czoo", "mlruns/0/meta.yaml", "mlflow.db",
                ".venv/bin/python", "build/lib/x.so", "dist/compresszoo.whl", ".cluster/env.sh", "out.czoo"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("grows while the job is submitted\n")
    assert get_uri_for_directory(str(tmp_path), include_gitignore=True) == before
    (tmp_path / "pipelines" / "train_zoo.py").write_text("print('changed')\n")
    assert get_uri_for_directory(str(tmp_path), include_gitignore=True) != before

