"""infra/ files checked by the libraries that consume them (the Prefect server check of the job
template is in test_flows.py, where a server runs)."""

import json

import pytest
import yaml
from conftest import ROOT

INFRA = ROOT / "infra"


class _Response:
    def __init__(self, doc):
        self.data = json.dumps(doc)


def k8s(doc, kind=None):
    """Deserialize with the Kubernetes client's models, which reject missing required fields."""
    from kubernetes import client

    return client.ApiClient().deserialize(_Response(doc), f"V1{kind or doc['kind']}")


def test_worker_manifest_is_valid_kubernetes():
    docs = list(yaml.safe_load_all((INFRA / "k8s/worker.yaml").read_text()))
    objects = {(d["kind"], k8s(d).metadata.name) for d in docs}
    assert ("Deployment", "tuneoff-gpu-worker") in objects and ("Role", "tuneoff-worker") in objects
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["prefect", "worker", "start"]
    # secrets by reference only
    assert all("valueFrom" in e or e["name"] == "PREFECT_SERVER_ANALYTICS_ENABLED"
               or e["name"].startswith("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_") for e in container["env"])
    with pytest.raises(ValueError, match="name"):
        k8s({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
             "spec": {"selector": {}, "template": {"spec": {"containers": [{"image": "x"}]}}}})


def test_jobs_get_the_prefect_api_key_by_reference():
    """Without these the Kubernetes worker copies PREFECT_API_KEY into every Job manifest in plain text."""
    docs = list(yaml.safe_load_all((INFRA / "k8s/worker.yaml").read_text()))
    worker = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in worker["env"]}
    key = env["PREFECT_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME"]["value"] == key["name"]
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_KEY"]["value"] == key["key"]


def test_job_template_renders_to_a_valid_gpu_job():
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "k8s/gpu-pool-job-template.json").read_text())
    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update(name="bakeoff-unit-abc", command="prefect flow-run execute", labels={"team": "ml"}, env={})
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    spec = k8s(job, "Job").spec.template.spec
    (container,) = spec.containers
    assert container.resources.requests["nvidia.com/gpu"] == "1" and spec.tolerations[0].key == "nvidia.com/gpu"
    assert spec.node_selector == props["node_selector"]["default"]
    env = {e.name: e for e in container.env}
    assert env["WANDB_API_KEY"].value_from.secret_key_ref.name == "tuneoff-wandb" and env["WANDB_API_KEY"].value is None
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"].value == "reschedule"
    # checkpoints on a volume every unit's pod mounts: a preempted unit resumes on the next node
    (mount,) = container.volume_mounts
    assert env["TUNEOFF_CHECKPOINTS"].value == mount.mount_path
    assert (spec.volumes[0].name, spec.volumes[0].persistent_volume_claim.claim_name) == (mount.name, "tuneoff-checkpoints")


def test_a_units_job_variables_reach_its_pod():
    """The pool's template rendered as the worker renders it: its defaults, then the deployment's
    variables (flows/deploy.py), then the flow run's (flows/hardware.py), each overriding per key."""
    from prefect.utilities.templating import apply_values

    from flows.hardware import job_variables
    from tuneoff.core.params import read_params

    data = read_params(ROOT / "params.yaml")
    data["dispatch"]["hardware"]["full"].update(gpu="NVIDIA A100-SXM4-80GB", gpu_count=2, memory="200Gi",
                                                node_selector={"cloud.google.com/gke-spot": "true"})
    template = json.loads((INFRA / "k8s/gpu-pool-job-template.json").read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values |= {"name": "bakeoff-unit-abc", "labels": {}, "env": {}, "command": "prefect flow-run execute"}
    values |= job_variables("full", ["extraction"], data)
    spec = k8s(apply_values(template["job_configuration"]["job_manifest"], values), "Job").spec.template.spec
    assert spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "cloud.google.com/gke-spot": "true"}
    resources = spec.containers[0].resources
    assert resources.requests["nvidia.com/gpu"] == resources.limits["nvidia.com/gpu"] == "2"
    assert resources.requests["memory"] == resources.limits["memory"] == "200Gi"
    assert resources.requests["cpu"] == "8"  # what the unit does not set stays the pool's


@pytest.mark.parametrize("name, kind", [("fsdp.yaml", "FSDP"), ("deepspeed-zero3.yaml", "DEEPSPEED"), ("ddp.yaml", "MULTI_GPU")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(INFRA / "accelerate" / name))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"


def test_every_declared_dependency_is_installed():
    """A declared dependency that is missing fails here, instead of its tests skipping silently
    (bitsandbytes: every QLoRA test needs it)."""
    from importlib.metadata import PackageNotFoundError, version

    import tomllib
    from packaging.requirements import Requirement

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    missing = []
    for spec in declared["dependencies"] + declared["optional-dependencies"]["dev"]:
        requirement = Requirement(spec)
        try:
            if not requirement.specifier.contains(version(requirement.name), prereleases=True):
                missing.append(f"{spec} (installed: {version(requirement.name)})")
        except PackageNotFoundError:
            missing.append(spec)
    assert not missing, f"declared in pyproject.toml but not installed: {missing}"
