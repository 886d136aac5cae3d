"""`kustomize build` for the subset of kustomize that guardstream's manifests use, in Python.

The tests render `deploy/k8s/overlays/*` with this module instead of the `kustomize` binary,
which cannot be downloaded here; the script form prints what `kustomize build` would:

```
python deploy/kustomize.py deploy/k8s/overlays/prod > prod.yaml
render(Path("deploy/k8s/overlays/prod")) -> list[dict]     # the library form
```

Supported `kustomization.yaml` keys, and nothing else: any other key is an error that names it,
so a manifest can't silently depend on behaviour this renderer lacks (the real kustomize would
apply it; the tests here would not see it).

| key            | what it does here                                                            |
| -------------- | ---------------------------------------------------------------------------- |
| apiVersion     | `kustomize.config.k8s.io/v1beta1` (optional, as in kustomize)                |
| kind           | `Kustomization` (optional)                                                   |
| resources      | YAML files (multi-document allowed) or directories holding a kustomization,  |
|                | rendered recursively; output order = listed order                            |
| patches        | only `- path: file.yaml`, a strategic-merge patch (see `merge_patch`)        |
| namespace      | metadata.namespace of every namespaced resource (cluster-scoped kinds kept); |
|                | a Namespace object is renamed to it, as kustomize does                       |
| commonLabels   | metadata.labels of every resource, and selectors: see below                  |
| replicas       | `{name, count}`: spec.replicas of the Deployment/StatefulSet named `name`    |
| images         | `{name, newName, newTag, digest}`: `image:` of containers and initContainers |

commonLabels reach exactly these fields besides metadata.labels (kustomize's own field specs for
them): Service spec.selector; Deployment, StatefulSet, DaemonSet and ReplicaSet
spec.selector.matchLabels and spec.template.metadata.labels; StatefulSet
spec.volumeClaimTemplates[].metadata.labels (all these created when absent); PodDisruptionBudget
spec.selector.matchLabels and NetworkPolicy spec.podSelector.matchLabels (only when present).
Custom kinds (a ServiceMonitor's selector, say) get metadata.labels only, as with kustomize.

Transformations run in kustomize's order: the resources (each sub-kustomization fully built
first), then patches, namespace, commonLabels, replicas, images.

Where this is stricter than kustomize (kustomize would not fail): an `images` or `replicas` entry
that matches nothing, a `$`-directive other than `$patch: delete` on a list item, commonLabels
on a Job or CronJob (whose selector handling is not implemented), `namespace` over a RoleBinding
or ClusterRoleBinding with ServiceAccount subjects (kustomize rewrites those by rules not
emulated here), and a patch file with more than one document.

Known difference that cannot fail: lists are merged by `name` (real strategic merge uses
per-field keys, e.g. `mountPath` for volumeMounts, `containerPort` for ports). Output order is
the input order; `kubectl kustomize` sorts by kind. tests/test_deploy.py compares this renderer's
output with `kubectl kustomize`'s where kubectl is installed.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "commonLabels",
        "images",
        "replicas",
        "patches",
    }
)
API_VERSION = "kustomize.config.k8s.io/v1beta1"

# Built-in kinds that live outside namespaces. kustomize learns scope from the OpenAPI schema and
# treats unknown (custom) kinds as namespaced; this list does the same for what it names.
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "APIService",
        "CertificateSigningRequest",
        "ClusterRole",
        "ClusterRoleBinding",
        "ComponentStatus",
        "CSIDriver",
        "CSINode",
        "CustomResourceDefinition",
        "FlowSchema",
        "IngressClass",
        "MutatingAdmissionPolicy",
        "MutatingAdmissionPolicyBinding",
        "MutatingWebhookConfiguration",
        "Namespace",
        "Node",
        "PersistentVolume",
        "PriorityClass",
        "PriorityLevelConfiguration",
        "RuntimeClass",
        "StorageClass",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ValidatingWebhookConfiguration",
        "VolumeAttachment",
    }
)

# Where commonLabels go besides metadata.labels: (kinds, path, create-if-missing). kustomize's
# own field specs create the Service selector and the workload selector/template labels (a
# Service without a selector gets one: a known kustomize surprise, kept so output matches) but
# only extend a PodDisruptionBudget's or NetworkPolicy's selector that already exists (an empty
# podSelector selects every pod; adding labels to it would narrow the policy).
_WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})
_SELECTOR_FIELDS: tuple[tuple[frozenset[str], tuple[str, ...], bool], ...] = (
    (frozenset({"Service"}), ("spec", "selector"), True),
    (_WORKLOADS, ("spec", "selector", "matchLabels"), True),
    (_WORKLOADS, ("spec", "template", "metadata", "labels"), True),
    (frozenset({"PodDisruptionBudget"}), ("spec", "selector", "matchLabels"), False),
    (frozenset({"NetworkPolicy"}), ("spec", "podSelector", "matchLabels"), False),
)
# Kinds with pod templates whose selector fields kustomize also labels but this module does not.
_UNLABELLED_TEMPLATE_KINDS = frozenset({"Job", "CronJob"})

_BINDING_KINDS = frozenset({"RoleBinding", "ClusterRoleBinding"})
REPLICA_KINDS = frozenset({"Deployment", "StatefulSet"})
IMAGE_ENTRY_KEYS = frozenset({"name", "newName", "newTag", "digest"})


class KustomizeError(Exception):
    """A kustomization this renderer refuses: unsupported, malformed, or ambiguous."""


def render(directory: Path) -> list[Resource]:
    """Build the kustomization in `directory`: its resources, transformed, in input order."""
    return _render(directory.resolve(), ())


def _render(directory: Path, stack: tuple[Path, ...]) -> list[Resource]:
    if directory in stack:
        chain = " -> ".join(str(d) for d in (*stack, directory))
        raise KustomizeError(f"kustomization cycle: {chain}")
    kustomization_file = find_kustomization(directory)
    kustomization = _load_kustomization(kustomization_file)
    where = str(kustomization_file)

    resources: list[Resource] = []
    for entry in _list_of(kustomization, "resources", str, where):
        resources.extend(_load_resource_entry(directory, entry, (*stack, directory), where))
    check_unique(resources, where)

    for entry in _list_of(kustomization, "patches", dict, where):
        resources = apply_patch(resources, _load_patch(directory, entry, where), where)
    if "namespace" in kustomization:
        namespace = kustomization["namespace"]
        if not isinstance(namespace, str) or not namespace:
            raise KustomizeError(f"{where}: namespace must be a non-empty string")
        resources = [set_namespace(r, namespace) for r in resources]
    if "commonLabels" in kustomization:
        labels = _string_map(kustomization["commonLabels"], f"{where}: commonLabels")
        resources = [add_common_labels(r, labels) for r in resources]
    for entry in _list_of(kustomization, "replicas", dict, where):
        resources = set_replicas(resources, entry, where)
    for entry in _list_of(kustomization, "images", dict, where):
        resources = set_images(resources, entry, where)

    # The namespace transform can make two resources collide (same name, two namespaces before).
    check_unique(resources, where)
    return resources


def find_kustomization(directory: Path) -> Path:
    """The one kustomization file of `directory` (kustomize accepts three spellings)."""
    found = [directory / name for name in KUSTOMIZATION_FILES if (directory / name).is_file()]
    if not found:
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    if len(found) > 1:
        raise KustomizeError(f"{directory}: more than one kustomization file: {found}")
    return found[0]


def _load_kustomization(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KustomizeError(f"{path}: a kustomization must be a mapping")
    unknown = sorted(set(data) - SUPPORTED_KEYS)
    if unknown:
        raise KustomizeError(
            f"{path}: unsupported kustomization key(s) {unknown}; "
            f"deploy/kustomize.py supports only {sorted(SUPPORTED_KEYS)}"
        )
    if data.get("apiVersion", API_VERSION) != API_VERSION:
        raise KustomizeError(f"{path}: apiVersion must be {API_VERSION}")
    if data.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind must be Kustomization")
    return data


def _list_of(data: dict[str, Any], key: str, item_type: type, where: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, item_type) for item in value):
        raise KustomizeError(f"{where}: {key} must be a list of {item_type.__name__}")
    return value


def _string_map(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise KustomizeError(f"{where} must map strings to strings (quote numbers and booleans)")
    return dict(value)


def _inside(directory: Path, relative: str, where: str) -> Path:
    """A file path of the kustomization, refused outside its directory as kustomize refuses it
    (its default load restrictor): only directories (kustomizations) may be reached with `..`."""
    if "://" in relative or relative.startswith("git@"):
        raise KustomizeError(f"{where}: remote resources are not supported: {relative}")
    path = (directory / relative).resolve()
    if path.is_file() and not path.is_relative_to(directory):
        raise KustomizeError(f"{where}: file {relative} is outside the kustomization directory")
    return path


def _load_resource_entry(
    directory: Path, entry: str, stack: tuple[Path, ...], where: str
) -> list[Resource]:
    path = _inside(directory, entry, where)
    if path.is_dir():
        return _render(path, stack)
    if not path.is_file():
        raise KustomizeError(f"{where}: resource {entry} does not exist")
    return load_documents(path)


def load_documents(path: Path) -> list[Resource]:
    """Every non-empty document of a YAML file, each checked to be a Kubernetes object."""
    with path.open(encoding="utf-8") as stream:
        documents = [d for d in yaml.safe_load_all(stream) if d is not None]
    for index, document in enumerate(documents):
        _check_object(document, f"{path} (document {index + 1})")
    return documents


def _check_object(document: object, where: str) -> None:
    if not isinstance(document, dict):
        raise KustomizeError(f"{where}: not a mapping")
    for key in ("apiVersion", "kind"):
        if not isinstance(document.get(key), str) or not document[key]:
            raise KustomizeError(f"{where}: missing {key}")
    if document["kind"].endswith("List") and "items" in document:
        raise KustomizeError(f"{where}: List objects are not supported; write the items out")
    metadata = document.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        raise KustomizeError(f"{where}: missing metadata.name")


def identity(resource: Resource) -> tuple[str, str, str]:
    """(kind, namespace, name): what must be unique in a build."""
    metadata = resource["metadata"]
    return resource["kind"], metadata.get("namespace") or "", metadata["name"]


def check_unique(resources: Iterable[Resource], where: str) -> None:
    seen: set[tuple[str, str, str]] = set()
    for resource in resources:
        key = identity(resource)
        if key in seen:
            kind, namespace, name = key
            raise KustomizeError(
                f"{where}: duplicate resource {kind} {namespace or '(no namespace)'}/{name}"
            )
        seen.add(key)


# --- patches -------------------------------------------------------------------------------------


def _load_patch(directory: Path, entry: dict[str, Any], where: str) -> Resource:
    if set(entry) != {"path"} or not isinstance(entry["path"], str):
        # Inline `patch:`, `target:` selectors and `options:` change what is patched and how;
        # refusing them keeps every patch a plain file matched by its own name.
        raise KustomizeError(
            f"{where}: only `- path: file.yaml` patches are supported, got keys {sorted(entry)}"
        )
    path = _inside(directory, entry["path"], where)
    if not path.is_file():
        raise KustomizeError(f"{where}: patch {entry['path']} does not exist")
    documents = load_documents(path)
    if len(documents) != 1:
        raise KustomizeError(f"{path}: a patch file must hold exactly one document")
    return documents[0]


def apply_patch(resources: list[Resource], patch: Resource, where: str) -> list[Resource]:
    """Merge `patch` into the one resource with its apiVersion, kind and name (and namespace,
    if the patch gives one); no match or several matches is an error."""
    metadata = patch["metadata"]
    wanted_namespace = metadata.get("namespace")

    def matches(resource: Resource) -> bool:
        return (
            resource["apiVersion"] == patch["apiVersion"]
            and resource["kind"] == patch["kind"]
            and resource["metadata"]["name"] == metadata["name"]
            and (
                wanted_namespace is None
                or resource["metadata"].get("namespace") == wanted_namespace
            )
        )

    hits = [i for i, r in enumerate(resources) if matches(r)]
    described = f"{patch['apiVersion']} {patch['kind']} {metadata['name']}"
    if len(hits) != 1:
        found = "nothing" if not hits else f"{len(hits)} resources"
        raise KustomizeError(f"{where}: patch for {described} matches {found}")
    result = list(resources)
    result[hits[0]] = merge_patch(resources[hits[0]], patch)
    return result


def merge_patch(target: Resource, patch: Resource) -> Resource:
    """Strategic merge, the subset used here; returns a new dict, the inputs are not changed.

    - maps merge recursively; a key whose patch value is null is deleted;
    - a list of maps that all have a `name` (containers, env, ports, volumes, volumeMounts...)
      merges item by item on `name`, and an item `{name: x, $patch: delete}` removes `x`; as in
      kustomize, the result lists the patch's items first (in the patch's order), then the
      target's items that the patch does not name;
    - any other list, and any scalar, is replaced by the patch's value.
    """
    merged = copy.deepcopy(target)
    for key, value in patch.items():
        _refuse_directive(key)
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_patch(merged[key], value)
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = _merge_list(merged[key], value)
        else:
            merged[key] = _fresh(value)
    return merged


def _refuse_directive(key: str) -> None:
    # $patch: replace/merge on maps, $retainKeys, $setElementOrder/..., $deleteFromPrimitiveList
    # change merge semantics in ways this subset does not implement; failing beats ignoring them.
    if key.startswith("$"):
        raise KustomizeError(f"strategic-merge directive {key} is not supported here")


def _fresh(value: Any) -> Any:
    """A patch value placed where the target has nothing to merge into: nulls dropped and
    directives refused, as a merge into an empty map would."""
    if isinstance(value, dict):
        return merge_patch({}, value)
    if isinstance(value, list):
        return [_fresh(item) for item in value]
    return value


def _is_named_list(items: list[Any]) -> bool:
    return all(isinstance(item, dict) and "name" in item for item in items)


def _merge_list(target: list[Any], patch: list[Any]) -> list[Any]:
    if not (patch and _is_named_list(patch) and _is_named_list(target)):
        if any(isinstance(item, dict) and "$patch" in item for item in patch):
            raise KustomizeError("$patch: delete is supported only in lists of named items")
        return _fresh(patch)  # type: ignore[no-any-return]
    # kustomize's order (kyaml merges with ListIncreaseDirection=Prepend): the patch's items
    # first, in the patch's order, then the target's items the patch does not name.
    by_name = {item["name"]: item for item in target}
    merged: list[Any] = []
    for item in patch:
        directive = item.get("$patch")
        if directive is not None:
            if directive != "delete" or set(item) != {"name", "$patch"}:
                raise KustomizeError(
                    f"list item {item['name']}: only `{{name: ..., $patch: delete}}` is supported"
                )
        elif item["name"] in by_name:
            merged.append(merge_patch(by_name[item["name"]], item))
        else:
            merged.append(_fresh(item))
    named = {item["name"] for item in patch}
    merged.extend(copy.deepcopy(item) for item in target if item["name"] not in named)
    return merged


# --- namespace and labels ------------------------------------------------------------------------


def set_namespace(resource: Resource, namespace: str) -> Resource:
    """metadata.namespace of a namespaced resource (overriding any it had), as kustomize does;
    a Namespace object is renamed to `namespace` (kustomize does that too, so two of them
    collide)."""
    kind = resource["kind"]
    if kind in _BINDING_KINDS and any(
        subject.get("kind") == "ServiceAccount" for subject in resource.get("subjects") or []
    ):
        # kustomize rewrites such subjects by rules that depend on the ServiceAccounts in the
        # build; not emulated, so refused.
        raise KustomizeError(
            f"{kind} {resource['metadata']['name']}: ServiceAccount subjects under `namespace` "
            "are not supported by deploy/kustomize.py"
        )
    if kind == "Namespace":
        result = copy.deepcopy(resource)
        result["metadata"]["name"] = namespace
        return result
    if kind in CLUSTER_SCOPED_KINDS:
        return resource
    result = copy.deepcopy(resource)
    result["metadata"]["namespace"] = namespace
    return result


def add_common_labels(resource: Resource, labels: dict[str, str]) -> Resource:
    """`labels` on metadata.labels and on the selector fields of `_SELECTOR_FIELDS`."""
    kind = resource["kind"]
    if kind in _UNLABELLED_TEMPLATE_KINDS:
        raise KustomizeError(
            f"commonLabels on a {kind} is not supported by deploy/kustomize.py "
            "(kustomize would also label its selector and pod template)"
        )
    result = copy.deepcopy(resource)
    _add_labels_at(result, ("metadata", "labels"), labels, create=True)
    for kinds, path, create in _SELECTOR_FIELDS:
        if kind in kinds:
            _add_labels_at(result, path, labels, create=create)
    if kind == "StatefulSet":
        # kustomize labels each PersistentVolumeClaim template too.
        for template in result.get("spec", {}).get("volumeClaimTemplates") or []:
            _add_labels_at(template, ("metadata", "labels"), labels, create=True)
    return result


def _add_labels_at(
    node: dict[str, Any], path: Sequence[str], labels: dict[str, str], *, create: bool
) -> None:
    for key in path:
        child = node.get(key)
        if child is None:
            if not create:
                return
            child = node[key] = {}
        if not isinstance(child, dict):
            raise KustomizeError(f"cannot add labels at {'.'.join(path)}: not a mapping")
        node = child
    node.update(labels)


# --- replicas and images -------------------------------------------------------------------------


def set_replicas(resources: list[Resource], entry: dict[str, Any], where: str) -> list[Resource]:
    """spec.replicas of the Deployments/StatefulSets named `entry["name"]`; none is an error."""
    name, count = entry.get("name"), entry.get("count")
    if set(entry) != {"name", "count"} or not isinstance(name, str):
        raise KustomizeError(f"{where}: a replicas entry is {{name, count}}, got {entry}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise KustomizeError(f"{where}: replicas count for {name} must be an integer >= 0")

    def matches(resource: Resource) -> bool:
        return resource["kind"] in REPLICA_KINDS and resource["metadata"]["name"] == name

    def apply(resource: Resource) -> Resource:
        result = copy.deepcopy(resource)
        result.setdefault("spec", {})["replicas"] = count
        return result

    return _transform_matching(resources, matches, apply, f"{where}: replicas entry {name}")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a `:` after the last `/` starts the tag
    (an earlier one is a registry port: `registry:5000/app`)."""
    reference, _, digest = image.partition("@")
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon + 1 :], digest or None
    return reference, None, digest or None


def join_image(name: str, tag: str | None, digest: str | None) -> str:
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def set_images(resources: list[Resource], entry: dict[str, Any], where: str) -> list[Resource]:
    """Rewrite the images named `entry["name"]` (tag and digest ignored when comparing).

    As in kustomize: `newTag` replaces the tag and drops a digest, `digest` replaces the digest
    and drops a tag, both give `name:tag@digest`, neither keeps what was there; `newName`
    replaces the name."""
    unknown = set(entry) - IMAGE_ENTRY_KEYS
    if unknown or not all(isinstance(v, str) and v for v in entry.values()):
        raise KustomizeError(f"{where}: an images entry is {sorted(IMAGE_ENTRY_KEYS)}: {entry}")
    if "name" not in entry:
        raise KustomizeError(f"{where}: images entry without name: {entry}")
    wanted: str = entry["name"]

    def rewrite(image: str) -> str:
        name, tag, digest = split_image(image)
        if "newTag" in entry or "digest" in entry:
            tag, digest = entry.get("newTag"), entry.get("digest")
        return join_image(entry.get("newName", name), tag, digest)

    def matches(resource: Resource) -> bool:
        return any(
            isinstance(c.get("image"), str) and split_image(c["image"])[0] == wanted
            for c in _containers(resource)
        )

    def apply(resource: Resource) -> Resource:
        result = copy.deepcopy(resource)
        for container in _containers(result):
            image = container.get("image")
            if isinstance(image, str) and split_image(image)[0] == wanted:
                container["image"] = rewrite(image)
        return result

    return _transform_matching(resources, matches, apply, f"{where}: images entry {wanted}")


def pod_specs(resource: Resource) -> list[dict[str, Any]]:
    """The pod specs inside a resource: a Pod's spec, a workload's or Job's template, a
    CronJob's job template; custom kinds have none."""
    spec = resource.get("spec")
    if not isinstance(spec, dict):
        return []
    kind = resource["kind"]
    if kind == "Pod":
        return [spec]
    if kind == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    elif kind not in {*_WORKLOADS, "Job"}:
        return []
    template_spec = spec.get("template", {}).get("spec")
    return [template_spec] if isinstance(template_spec, dict) else []


def _containers(resource: Resource) -> list[dict[str, Any]]:
    return [
        container
        for spec in pod_specs(resource)
        for key in ("initContainers", "containers")
        for container in spec.get(key) or []
        if isinstance(container, dict)
    ]


def _transform_matching(
    resources: list[Resource],
    matches: Callable[[Resource], bool],
    apply: Callable[[Resource], Resource],
    described: str,
) -> list[Resource]:
    # An entry that matches nothing is almost always a typo in an overlay (the base renamed
    # something); kustomize ignores it, this fails so the overlay gets fixed.
    if not any(matches(r) for r in resources):
        raise KustomizeError(f"{described} matches no resource")
    return [apply(r) if matches(r) else r for r in resources]


# --- script --------------------------------------------------------------------------------------


def to_yaml(resources: Sequence[Resource]) -> str:
    """Multi-document YAML, keys in the order the manifests wrote them."""
    return yaml.safe_dump_all(resources, sort_keys=False, explicit_start=False, width=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path, help="a directory holding a kustomization.yaml")
    args = parser.parse_args(argv)
    try:
        resources = render(args.directory)
    except (KustomizeError, OSError, yaml.YAMLError) as exc:
        print(f"kustomize.py: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(resources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
