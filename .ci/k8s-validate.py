"""Validates the rendered Kubernetes manifests of deploy/k8s (no cluster needed).

Input: the kustomize output (a YAML stream) on stdin. What is checked, and nothing more:
 1. every object of a Kubernetes kind validates strictly (unknown fields rejected) against the Kubernetes
    OpenAPI schema of KUBERNETES_VERSION bundled in the `kubernetes-validate` package;
 2. every KEDA object (ScaledObject, TriggerAuthentication) validates strictly against the vendored CRD
    schema subset in deploy/k8s/schemas/ (unknown properties rejected wherever the subset lists properties),
    and each rabbitmq trigger's metadata against the vendored rabbitmq scaler parameters;
 3. cross references and the issue's requirements, as assertions:
    - the ScaledObject targets a Deployment of the render and its authenticationRef a TriggerAuthentication
      of the render; the trigger uses protocol http and mode QueueLength, has an activationValue, and
      0 <= minReplicaCount <= maxReplicaCount;
    - the Service selects the dispatcher pods, and the dispatcher runs at least 2 replicas;
    - the worker container requests and limits nvidia.com/gpu, has a readinessProbe GET /health on the
      port its `--http` flag listens on, and terminationGracePeriodSeconds > FLEET_DRAIN_GRACE + 30 + 10
      (the worker's hard-stop wait and two bounded broker calls after the grace);
    - with --pod-deletion-cost the worker's service account is bound to a Role allowing `patch` on pods,
      and POD_NAME / POD_NAMESPACE come from the downward API.
Not checked: anything only a cluster knows (admission webhooks, KEDA's own validation of the trigger against
the broker, image pulls, the Secrets, which are created outside these manifests).
"""
import copy
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.32.0"
ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "k8s" / "schemas"
KEDA_CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
}
errors = []


def fail(msg):
    errors.append(msg)


def strict(schema):
    """Closes every object schema that lists properties (as kubeconform's -strict does for CRDs)."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def crd_schema(path):
    doc = yaml.safe_load(path.read_text())
    schema = strict(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema["definitions"] = strict(doc.get("definitions", {}))
    return schema


def validate_with(schema, obj, what):
    v = jsonschema.Draft7Validator(schema)
    for e in sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        fail(f"{what}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")


def name(o):
    return f"{o['kind']}/{o['metadata']['name']}"


def main():
    objs = [o for o in yaml.safe_load_all(sys.stdin) if o]
    if not objs:
        fail("the render is empty")
    rabbit = yaml.safe_load((SCHEMAS / "keda-rabbitmq-trigger.yaml").read_text())
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
        key = (o["apiVersion"], o["kind"])
        if key in KEDA_CRDS:
            validate_with(crd_schema(SCHEMAS / KEDA_CRDS[key]), o, name(o))
            for i, t in enumerate(o.get("spec", {}).get("triggers", [])):
                if t.get("type") == "rabbitmq":
                    validate_with(rabbit, t.get("metadata", {}), f"{name(o)} trigger {i} metadata")
            continue
        try:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{name(o)}: {'/'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{name(o)}: no schema for {o['apiVersion']} {o['kind']} in Kubernetes {KUBERNETES_VERSION}")
    requirements(by_kind)
    for e in errors:
        print(f"k8s-validate: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    kinds = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
    print(f"k8s-validate: {len(objs)} objects valid ({kinds}); Kubernetes {KUBERNETES_VERSION} schema, "
          f"vendored KEDA v2 subset, requirements")


def one(by_kind, kind, name_):
    found = [o for o in by_kind.get(kind, []) if o["metadata"]["name"] == name_]
    return found[0] if found else None


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def requirements(by_kind):
    for so in by_kind.get("ScaledObject", []):
        ref = so["spec"]["scaleTargetRef"]
        if ref.get("kind", "Deployment") != "Deployment" or not one(by_kind, "Deployment", ref["name"]):
            fail(f"{name(so)}: scaleTargetRef {ref} is not a Deployment of the render")
        lo, hi = so["spec"].get("minReplicaCount", 0), so["spec"].get("maxReplicaCount", 100)
        if not 0 <= lo <= hi:
            fail(f"{name(so)}: minReplicaCount {lo} / maxReplicaCount {hi}")
        for t in so["spec"]["triggers"]:
            md = t.get("metadata", {})
            if t["type"] != "rabbitmq" or md.get("protocol") != "http" or md.get("mode") != "QueueLength":
                fail(f"{name(so)}: trigger must be rabbitmq, protocol http, mode QueueLength: {t}")
            if "activationValue" not in md:
                fail(f"{name(so)}: trigger has no activationValue (0 <-> 1)")
            auth = t.get("authenticationRef", {}).get("name")
            if not auth or not one(by_kind, "TriggerAuthentication", auth):
                fail(f"{name(so)}: authenticationRef {auth!r} is not a TriggerAuthentication of the render")
    if not by_kind.get("ScaledObject"):
        fail("no ScaledObject")
    disp = one(by_kind, "Deployment", "fleet-dispatcher")
    svc = one(by_kind, "Service", "fleet-dispatcher")
    if not disp or not svc:
        fail("dispatcher Deployment and Service fleet-dispatcher are required")
    else:
        if disp["spec"].get("replicas", 1) < 2:
            fail("the dispatcher must run at least 2 replicas")
        labels = disp["spec"]["template"]["metadata"]["labels"]
        if not all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()):
            fail(f"Service selector {svc['spec']['selector']} does not select the dispatcher pods {labels}")
    worker = one(by_kind, "Deployment", "fleet-worker")
    if not worker:
        fail("worker Deployment fleet-worker is required")
        return
    pod = worker["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "worker")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        if int(res.get(part, {}).get("nvidia.com/gpu", 0)) < 1:
            fail(f"the worker container must have nvidia.com/gpu in resources.{part}")
    args = c.get("args", [])
    if "--http" not in args:
        fail("the worker container must pass --http (the /health and /metrics listener)")
    else:
        port = int(args[args.index("--http") + 1].rsplit(":", 1)[1])
        probe = c.get("readinessProbe", {}).get("httpGet", {})
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
        probe_port = ports.get(probe.get("port"), probe.get("port"))
        if probe.get("path") != "/health" or probe_port != port:
            fail(f"worker readinessProbe must GET /health on port {port}: {probe}")
    env = env_of(c)
    grace = int(env.get("FLEET_DRAIN_GRACE", {}).get("value", 60))
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    if tgp <= grace + 30 + 10:
        fail(f"terminationGracePeriodSeconds {tgp} must exceed FLEET_DRAIN_GRACE {grace} + 30 + 10")
    if "--pod-deletion-cost" in args:
        for var, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
            if env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != path:
                fail(f"--pod-deletion-cost needs {var} from the downward API ({path})")
        sa = pod.get("serviceAccountName", "default")
        roles = [
            one(by_kind, "Role", b["roleRef"]["name"])
            for b in by_kind.get("RoleBinding", [])
            if any(s.get("kind") == "ServiceAccount" and s["name"] == sa for s in b.get("subjects", []))
        ]
        if not any(
            r and any("pods" in rule.get("resources", []) and "patch" in rule.get("verbs", []) for rule in r["rules"])
            for r in roles
        ):
            fail(f"--pod-deletion-cost needs a Role bound to service account {sa} that may patch pods")


main()
