"""render_profile_job: the same Job as k8s/jobs/profile-job.yaml, valid under strict schema
validation for every spec it accepts, and InvalidArgument naming the field for bad specs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from idealrt.clients import k8s
from idealrt.clients.k8s import ProfileJobSpec, parse_quantity, render_profile_job
from idealrt.core.errors import InvalidArgument

Doc = dict[str, Any]


def spec(**overrides: Any) -> ProfileJobSpec:
    return ProfileJobSpec(**{"name": "idealrt-profile-example", "model": "gpt2", **overrides})


def pod(job: Doc) -> Doc:
    return job["spec"]["template"]["spec"]


def test_all_is_what_the_module_exports() -> None:
    for name in k8s.__all__:
        assert getattr(k8s, name) is not None
    public = {n for n in vars(k8s) if not n.startswith("_")}
    assert (
        {
            "ProfileJobSpec",
            "render_profile_job",
            "launch_profile_job",
            "watch_profile_job",
            "JobOutcome",
            "map_api_error",
        }
        <= set(k8s.__all__)
        <= public
    )


def test_render_is_the_yaml_template(job_template: Doc) -> None:
    """The YAML under k8s/jobs/ and the renderer cannot drift apart."""
    assert render_profile_job(spec()) == job_template


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "four-gpus": {"gpus": 4, "device": "cuda:3", "cpu": "32", "memory": "256Gi"},
    "amd": {
        "gpu_resource": "amd.com/gpu",
        "node_selector": {"amd.com/gpu.present": "true"},
        "tolerations": ({"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    },
    "tensorrt-bf16": {
        "backend": "tensorrt",
        "dtype": "bf16",
        "model": "llama-2-7b",
        "prompt_tokens": (1, 2048),
        "output_tokens": (1, 128),
        "profile_args": ("--until-ci=1%", "--budget=30m"),
    },
    "elsewhere": {
        "namespace": "team-a",
        "image": "registry.example/idealrt:0.1.0-gpu",
        "store": "idealrt-store.idealrt.svc:50051",
        "metrics": "idealrt-metrics.idealrt.svc:50054",
        "backoff_limit": 0,
        "ttl_after_finished_s": 0,
        "image_pull_policy": "Always",
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_jobs_validate_strictly(
    variant: str, k8s_version: str, validate: Callable[[Doc, str], str]
) -> None:
    validate(render_profile_job(spec(**VARIANTS[variant])), k8s_version)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_jobs_keep_the_scheduling_guarantees(variant: str) -> None:
    s = spec(**VARIANTS[variant])
    job = render_profile_job(s)
    p = pod(job)
    for c in [*p["initContainers"], *p["containers"]]:
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]  # Guaranteed
    serving = p["initContainers"][0]
    assert serving["name"] == "serving"
    assert serving["resources"]["limits"][s.gpu_resource] == s.gpus
    assert serving["resources"]["limits"]["cpu"] == s.cpu
    (term,) = p["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert (
        term["labelSelector"]["matchLabels"].items()
        <= job["spec"]["template"]["metadata"]["labels"].items()
    )
    assert p["restartPolicy"] == "Never"
    assert job["metadata"]["namespace"] == s.namespace
    args = p["containers"][0]["args"]
    assert f"--model={s.model}" in args and f"--device={s.device}" in args
    assert args[-1] == "--json"
    assert all(a in args for a in s.profile_args)


def test_renders_do_not_share_mutable_state() -> None:
    s = spec()
    first = render_profile_job(s)
    pod(first)["nodeSelector"]["x"] = "y"
    pod(first)["tolerations"][0]["key"] = "changed"
    pod(first)["initContainers"][0]["resources"]["requests"]["cpu"] = "99"
    again = render_profile_job(s)
    assert "x" not in pod(again)["nodeSelector"]
    assert pod(again)["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod(again)["initContainers"][0]["resources"]["limits"]["cpu"] == "4"
    assert s.node_selector == {"nvidia.com/gpu.present": "true"}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"name": "Profile_GPT2"}, "name"),
    ({"name": "-gpt2"}, "name"),
    ({"name": "a" * 64}, "name"),
    ({"name": ""}, "name"),
    ({"namespace": "Idealrt"}, "namespace"),
    ({"image": ""}, "image"),
    ({"image": "idealrt latest"}, "image"),
    ({"model": " "}, "model"),
    ({"backend": "vllm"}, "backend"),
    ({"dtype": "int8"}, "dtype"),
    ({"gpus": 0}, "gpus"),
    ({"gpus": 0.5}, "gpus"),
    ({"gpus": 1.0}, "gpus"),
    ({"gpus": True}, "gpus"),
    ({"gpus": "1"}, "gpus"),
    ({"device": "cpu"}, "device"),
    ({"device": "cuda:1"}, "device"),
    ({"device": "cuda:4", "gpus": 4}, "device"),
    ({"gpu_resource": "gpu"}, "gpu_resource"),
    ({"gpu_resource": "kubernetes.io/gpu"}, "gpu_resource"),
    ({"gpu_resource": "NVIDIA.com/gpu"}, "gpu_resource"),
    ({"prompt_tokens": ()}, "prompt_tokens"),
    ({"prompt_tokens": (0, 64)}, "prompt_tokens"),
    ({"output_tokens": (1, -8)}, "output_tokens"),
    ({"repeats": 0}, "repeats"),
    ({"warmups": -1}, "warmups"),
    ({"backoff_limit": -1}, "backoff_limit"),
    ({"active_deadline_s": 0}, "active_deadline_s"),
    ({"ttl_after_finished_s": -1}, "ttl_after_finished_s"),
    ({"cpu": "0"}, "cpu"),
    ({"cpu": "four"}, "cpu"),
    ({"cpu": "-1"}, "cpu"),
    ({"cpu": "0.0001"}, "cpu"),
    ({"memory": "16GB"}, "memory"),
    ({"memory": "500m"}, "memory"),
    ({"memory": "2048m"}, "memory"),  # 2 bytes: a typo for Mi, not a small amount
    ({"memory": ""}, "memory"),
    ({"profiler_cpu": "1 "}, "profiler_cpu"),
    ({"profiler_memory": "0"}, "profiler_memory"),
    ({"client_cpu": "1.5.0"}, "client_cpu"),
    ({"client_memory": "1gi"}, "client_memory"),
    ({"store": "idealrt-store"}, "store"),
    ({"metrics": "idealrt-metrics:0"}, "metrics"),
    ({"metrics": ":50054"}, "metrics"),
    ({"profile_args": ("--model=other",)}, "profile_args"),
    ({"profile_args": ("--json",)}, "profile_args"),
    ({"profile_args": ("-v",)}, "profile_args"),
    ({"tolerations": ({"keyy": "nvidia.com/gpu"},)}, "tolerations"),
    ({"node_selector": {"gpu": True}}, "node_selector"),
    ({"image_pull_policy": "always"}, "image_pull_policy"),
    ({"profile_namespace": "Team_A"}, "profile_namespace"),
    ({"profile_namespace": ""}, "profile_namespace"),
    ({"tls_secret": ""}, "tls_secret"),
    ({"token_secret": "idealrt/profiler-token"}, "token_secret"),
    ({"profile_args": ("--namespace=other",)}, "profile_args"),
]


@pytest.mark.parametrize(("overrides", "field"), BAD, ids=[f"{f}={o[f]!r}"[:40] for o, f in BAD])
def test_bad_specs_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        render_profile_job(spec(**overrides))
    assert err.value.field == field
    assert err.value.reason == f"{field.upper()}_INVALID"


@pytest.mark.parametrize(
    "overrides",
    [
        {"cpu": "1.5"},
        {"cpu": "2500m"},
        {"cpu": "1e1"},
        {"memory": "0.5Gi"},
        {"memory": "1e9"},
        {"memory": "64M"},
        {"gpus": 2, "device": "cuda:1"},
        {"gpu_resource": "nvidia.com/mig-1g.10gb"},
        {"name": "a" * 63},
        {"warmups": 0},
    ],
)
def test_good_specs_render(overrides: dict[str, Any]) -> None:
    job = render_profile_job(spec(**overrides))
    assert job["kind"] == "Job"


def test_spec_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec().gpus = 2  # type: ignore[misc,unused-ignore]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", Decimal(4)),
        ("500m", Decimal("0.5")),
        ("1.5", Decimal("1.5")),
        (".5", Decimal("0.5")),
        ("16Gi", Decimal(16 * 2**30)),
        ("512Mi", Decimal(512 * 2**20)),
        ("2k", Decimal(2000)),
        ("1e3", Decimal(1000)),
        ("1E-3", Decimal("0.001")),
        ("64M", Decimal(64 * 10**6)),
        ("100u", Decimal("0.0001")),
        ("1Ei", Decimal(2**60)),
        ("1E", Decimal(10**18)),
    ],
)
def test_parse_quantity(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text", ["", "Gi", "1.2.3", "-1", "+1", "1 Gi", "1gi", "1GB", "1e", "0x10", "1Kii"]
)
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)
