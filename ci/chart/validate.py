#!/usr/bin/env python3
"""Checks for the Trellis Helm chart, driven by ci/chart/check.sh.

Two modes:

  validate.py static   CHART CI_DIR
      values.yaml documented key by key; values.schema.json is valid draft-07,
      types every value in values.yaml, accepts every value set in
      ci/chart/values/ and refuses every file in ci/chart/values-bad/;
      dashboards parse and use exactly the metrics in dashboards/METRICS.txt.

  validate.py rendered SET_NAME RENDERED.yaml KUBE_VERSIONS CI_DIR
      every rendered manifest against the Kubernetes OpenAPI schemas shipped
      by the kubernetes-validate package (offline, strict: unknown fields are
      errors), CRDs against ci/chart/schemas/, then the chart's own rules
      (security context, probes, env contract, NetworkPolicy model, ...).

Each check prints one line, "PASS: <name>" or "FAIL: <name>: <why>"; the
shell script counts them.
"""
import copy
import json
import os
import re
import sys

import jsonschema
import yaml

RESULTS = []


def report(name, ok, why=""):
    RESULTS.append(ok)
    if ok:
        print(f"PASS: {name}")
    else:
        print(f"FAIL: {name}: {why}")


def check(name, fn):
    """Run fn(); it returns a list of problems (empty: pass)."""
    try:
        problems = fn()
    except Exception as e:  # a crash in a check is a failure, not a stop
        problems = [f"{type(e).__name__}: {e}"]
    report(name, not problems, "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))


# --------------------------------------------------------------- static ----

def deep_merge(base, over):
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def values_documented(values_path):
    """Every key line in values.yaml has a comment on the line right above."""
    problems = []
    lines = open(values_path).read().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z0-9_.\-]+):(\s|$)")
    for n, line in enumerate(lines):
        m = key_re.match(line)
        if not m:
            continue
        # the line right above (a blank line in between does not count)
        if n == 0 or not lines[n - 1].lstrip().startswith("#"):
            problems.append(f"line {n + 1}: key '{m.group(2)}' has no comment above it")
    return problems


def schema_covers(schema, values, path=""):
    """Every leaf of values.yaml is described by a schema property."""
    problems = []
    if not isinstance(values, dict):
        return problems
    props = schema.get("properties", {})
    addl = schema.get("additionalProperties", True)
    for k, v in values.items():
        p = f"{path}.{k}" if path else k
        if k in props:
            sub = props[k]
            if "type" not in sub and "const" not in sub and "enum" not in sub:
                problems.append(f"{p}: no type in the schema")
            if isinstance(v, dict) and sub.get("properties"):
                problems += schema_covers(sub, v, p)
        elif isinstance(addl, dict):
            continue  # a typed map (resources.requests, annotations, ...)
        else:
            problems.append(f"{p}: not in values.schema.json")
    return problems


def static(chart, ci):
    values_path = os.path.join(chart, "values.yaml")
    schema_path = os.path.join(chart, "values.schema.json")
    defaults = yaml.safe_load(open(values_path))
    schema = json.load(open(schema_path))
    v = jsonschema.Draft7Validator

    check("values.yaml: a comment above every key", lambda: values_documented(values_path))
    check("values.schema.json: valid draft-07", lambda: [str(e) for e in [v.check_schema(schema)] if e])
    check("values.schema.json: draft-07 declared, additionalProperties false at the top",
          lambda: ([] if schema.get("$schema", "").startswith("http://json-schema.org/draft-07/")
                   and schema.get("additionalProperties") is False else ["missing"]))
    check("values.schema.json: types every key of values.yaml", lambda: schema_covers(schema, defaults))
    check("values.schema.json: accepts the defaults",
          lambda: [f"{'/'.join(map(str, e.path))}: {e.message}" for e in v(schema).iter_errors(defaults)])

    vdir = os.path.join(ci, "values")
    for f in sorted(os.listdir(vdir)):
        if f.endswith(".yaml"):
            merged = deep_merge(defaults, yaml.safe_load(open(os.path.join(vdir, f))) or {})
            check(f"values.schema.json: accepts values/{f}",
                  lambda m=merged: [f"{'/'.join(map(str, e.path))}: {e.message}" for e in v(schema).iter_errors(m)])
    bdir = os.path.join(ci, "values-bad")
    for f in sorted(os.listdir(bdir)):
        if f.endswith(".yaml"):
            merged = deep_merge(defaults, yaml.safe_load(open(os.path.join(bdir, f))) or {})
            check(f"values.schema.json: refuses values-bad/{f}",
                  lambda m=merged: [] if list(v(schema).iter_errors(m)) else ["accepted"])

    dashboards(chart)


EXPECTED_DASHBOARDS = ["fleet-overview", "gateways", "keyvault", "ota-rollouts", "regions"]
HISTOGRAMS = {"trellis_handshake_duration_seconds", "trellis_keyvault_private_op_duration_seconds",
              "trellis_routed_command_duration_seconds"}


def dashboards(chart):
    ddir = os.path.join(chart, "dashboards")
    metrics = [m.strip() for m in open(os.path.join(ddir, "METRICS.txt")) if m.strip()]
    used = set()
    uids = {}

    def one(name):
        problems = []
        d = json.load(open(os.path.join(ddir, name + ".json")))
        if d.get("uid") in uids:
            problems.append(f"uid {d.get('uid')} also in {uids[d['uid']]}")
        uids[d.get("uid")] = name
        if not d.get("title") or not d.get("panels"):
            problems.append("no title or no panels")
        text = json.dumps(d)
        for m in set(re.findall(r"\btrellis_[a-z_]+", text)):
            base = re.sub(r"_(bucket|count|sum)$", "", m)
            if base in metrics:
                used.add(base)
            elif m in metrics:
                used.add(m)
            else:
                problems.append(f"unknown metric {m}")
        ids = [p["id"] for p in d["panels"]]
        if len(ids) != len(set(ids)):
            problems.append("duplicate panel ids")
        for p in d["panels"]:
            if p["type"] not in ("timeseries", "heatmap"):
                continue  # exemplars show on graphs only
            for t in p.get("targets", []):
                expr = t.get("expr", "")
                if "_bucket" in expr and not t.get("exemplar"):
                    problems.append(f"panel '{p['title']}': histogram query without exemplars")
        return problems

    for name in EXPECTED_DASHBOARDS:
        check(f"dashboard {name}.json: parses, known metrics, exemplars on histograms", lambda n=name: one(n))
    check("dashboards: every metric in METRICS.txt is on a dashboard",
          lambda: [f"{m} unused" for m in metrics if m not in used])
    check("dashboards: a Tempo trace link (${__data.fields.traceID}) on a dashboard",
          lambda: [] if any("${__data.fields.traceID}" in open(os.path.join(ddir, n + ".json")).read()
                            for n in EXPECTED_DASHBOARDS) else ["none"])


# ------------------------------------------------------------- rendered ----

# Every TRELLIS_* variable the binary reads (crates/core/src/config.rs plus
# the Redis/Sentinel keys of the durable-records work); it refuses others.
KNOWN_ENV = {
    "TRELLIS_REGION", "TRELLIS_DATA_DIR",
    "TRELLIS_REDIS__URL", "TRELLIS_REDIS__DURABLE_URL", "TRELLIS_REDIS__SENTINEL_MASTER", "TRELLIS_REDIS__SENTINELS",
    "TRELLIS_KEYVAULT__LISTEN", "TRELLIS_KEYVAULT__MASTER_KEY", "TRELLIS_KEYVAULT__MASTER_KEY_FILE",
    "TRELLIS_KEYVAULT__WORKERS", "TRELLIS_KEYVAULT__QUEUE_DEPTH",
    "TRELLIS_GATEWAY__ID", "TRELLIS_GATEWAY__DEVICE_LISTEN", "TRELLIS_GATEWAY__GRPC_LISTEN",
    "TRELLIS_GATEWAY__KEYVAULT_URL", "TRELLIS_GATEWAY__OTA_URL", "TRELLIS_GATEWAY__HANDSHAKE_CONCURRENCY", "TRELLIS_GATEWAY__HANDSHAKE_RATE",
    "TRELLIS_GATEWAY__HANDSHAKE_BURST",
    "TRELLIS_SIGNER__LISTEN", "TRELLIS_SIGNER__KEYVAULT_URL", "TRELLIS_SIGNER__MAX_IMAGE_BYTES",
    "TRELLIS_OTA__LISTEN", "TRELLIS_OTA__GATEWAY_URL", "TRELLIS_OTA__SIGNER_URL", "TRELLIS_OTA__TICK_MS",
    "TRELLIS_OTA__LEASE_MS",
    "TRELLIS_AUTH__MODE", "TRELLIS_TELEMETRY__OTLP_ENDPOINT", "TRELLIS_TELEMETRY__LOG", "TRELLIS_TELEMETRY__ADMIN_LISTEN",
    "TRELLIS_TELEMETRY__ENVIRONMENT",
}
COMPONENTS = {"gateway": 7200, "keyvault": 7100, "signer": 7300, "ota": 7400}

# What each value set must produce, beyond the rules every set obeys.
EXPECT = {
    "defaults": {"hpa": True, "servicemonitor": False, "master_secret": True, "redis_secret": True,
                 "dashboards": 5, "test_pod": True, "netpol": 4},
    "two-region": {"hpa": True, "servicemonitor": True, "master_secret": True, "redis_secret": True,
                   "dashboards": 5, "datasources": True, "test_pod": True, "netpol": 4,
                   "env": {"TRELLIS_REGION": "eu-west",
                           "TRELLIS_REDIS__SENTINELS": "sentinel-0.sentinel:26379,sentinel-1.sentinel:26379,sentinel-2.sentinel:26379",
                           "TRELLIS_REDIS__SENTINEL_MASTER": "trellis",
                           "TRELLIS_TELEMETRY__OTLP_ENDPOINT": "http://otel-collector.monitoring:4317"}},
    "existing-secret": {"hpa": True, "servicemonitor": False, "master_secret": False, "redis_secret": False,
                        "dashboards": 5, "test_pod": True, "netpol": 4,
                        "master_key_secret_name": "trellis-master-key"},
    "autoscaling-off": {"hpa": False, "servicemonitor": False, "master_secret": True, "redis_secret": True,
                        "dashboards": 0, "test_pod": False, "netpol": 4, "gateway_replicas": 3},
}


def load_docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]


def kube_schemas(docs, versions, ci, set_name):
    import kubernetes_validate
    crd_schemas = {
        ("monitoring.coreos.com/v1", "ServiceMonitor"):
            json.load(open(os.path.join(ci, "schemas", "servicemonitor-monitoring-v1.json"))),
    }
    for version in versions:
        def run(version=version):
            problems = []
            for d in docs:
                key = (d.get("apiVersion"), d.get("kind"))
                name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
                if key in crd_schemas:
                    errs = list(jsonschema.Draft7Validator(crd_schemas[key]).iter_errors(d))
                    problems += [f"{name}: {e.message}" for e in errs]
                    continue
                try:
                    kubernetes_validate.validate(d, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    where = "/".join(str(p) for p in e.path)
                    problems.append(f"{name}: {where}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError:
                    problems.append(f"{name}: no schema for {key} in Kubernetes {version}")
            return problems
        check(f"{set_name}: {len(docs)} manifests valid against Kubernetes {version} schemas (strict, offline)", run)


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def name_of(d):
    return d["metadata"]["name"]


def component_of(d):
    return d["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def env_map(container):
    return {e["name"]: e for e in container.get("env", [])}


def rules(docs, set_name):
    exp = EXPECT.get(set_name, {})
    deps = {component_of(d): d for d in by_kind(docs, "Deployment")}

    def deployments():
        p = []
        if set(deps) != set(COMPONENTS):
            p.append(f"Deployments for {sorted(deps)}, want {sorted(COMPONENTS)}")
        for comp, d in deps.items():
            spec = d["spec"]["template"]["spec"]
            c = spec["containers"][0]
            n = name_of(d)
            if c.get("args") != [comp]:
                p.append(f"{n}: args {c.get('args')}, want ['{comp}']")
            if spec.get("enableServiceLinks") is not False:
                p.append(f"{n}: enableServiceLinks must be false (figment refuses TRELLIS_*_SERVICE_HOST)")
            ports = {x["name"]: x["containerPort"] for x in c["ports"]}
            if ports.get("admin") != 9100 or ports.get("grpc") != COMPONENTS[comp]:
                p.append(f"{n}: ports {ports}")
            if comp == "gateway" and ports.get("device") != 5683:
                p.append(f"{n}: no device port 5683")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                g = c.get(probe, {}).get("httpGet", {})
                if g.get("path") != path or g.get("port") not in ("admin", 9100):
                    p.append(f"{n}: {probe} is {g}, want GET {path} on 9100")
            sc, psc = c.get("securityContext", {}), spec.get("securityContext", {})
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                p.append(f"{n}: not runAsNonRoot")
            if sc.get("readOnlyRootFilesystem") is not True:
                p.append(f"{n}: root filesystem not read-only")
            if sc.get("allowPrivilegeEscalation") is not False:
                p.append(f"{n}: allowPrivilegeEscalation not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                p.append(f"{n}: capabilities not dropped")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                p.append(f"{n}: seccomp {seccomp}")
            if not c.get("resources", {}).get("requests"):
                p.append(f"{n}: no resource requests")
            env = env_map(c)
            unknown = [k for k in env if k.startswith("TRELLIS_") and k not in KNOWN_ENV]
            if unknown:
                p.append(f"{n}: env the binary does not read: {unknown}")
            for k in ("TRELLIS_REGION", "TRELLIS_REDIS__URL", "TRELLIS_TELEMETRY__ADMIN_LISTEN"):
                if k not in env:
                    p.append(f"{n}: no {k}")
            if env.get("TRELLIS_TELEMETRY__ADMIN_LISTEN", {}).get("value") != "0.0.0.0:9100":
                p.append(f"{n}: admin not on 0.0.0.0:9100")
            listen = {"gateway": "TRELLIS_GATEWAY__GRPC_LISTEN", "keyvault": "TRELLIS_KEYVAULT__LISTEN",
                      "signer": "TRELLIS_SIGNER__LISTEN", "ota": "TRELLIS_OTA__LISTEN"}[comp]
            if env.get(listen, {}).get("value") != f"0.0.0.0:{COMPONENTS[comp]}":
                p.append(f"{n}: {listen} is {env.get(listen)}")
            for k, want in exp.get("env", {}).items():
                if env.get(k, {}).get("value") != want:
                    p.append(f"{n}: {k}={env.get(k, {}).get('value')!r}, want {want!r}")
            labels = d["spec"]["template"]["metadata"]["labels"]
            for k, v in d["spec"]["selector"]["matchLabels"].items():
                if labels.get(k) != v:
                    p.append(f"{n}: selector {k}={v} does not match the pod labels")
        gw = deps.get("gateway")
        if gw:
            c = gw["spec"]["template"]["spec"]["containers"][0]
            env = env_map(c)
            if env.get("TRELLIS_GATEWAY__ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
                p.append("gateway: TRELLIS_GATEWAY__ID is not the pod name (downward API)")
            if not env.get("TRELLIS_GATEWAY__KEYVAULT_URL", {}).get("value", "").endswith("-keyvault:7100"):
                p.append("gateway: TRELLIS_GATEWAY__KEYVAULT_URL does not point at the keyvault Service")
            if env.get("TRELLIS_GATEWAY__DEVICE_LISTEN", {}).get("value") != "0.0.0.0:5683":
                p.append("gateway: TRELLIS_GATEWAY__DEVICE_LISTEN")
            if exp.get("hpa") and "replicas" in gw["spec"]:
                p.append("gateway: replicas set although the HPA owns it")
            if "gateway_replicas" in exp and gw["spec"].get("replicas") != exp["gateway_replicas"]:
                p.append(f"gateway: replicas {gw['spec'].get('replicas')}")
        kv = deps.get("keyvault")
        if kv:
            spec = kv["spec"]["template"]["spec"]
            env = env_map(spec["containers"][0])
            f = env.get("TRELLIS_KEYVAULT__MASTER_KEY_FILE", {}).get("value", "")
            mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
            vols = {v["name"]: v for v in spec["volumes"]}
            if "master-key" not in mounts or not f.startswith(mounts["master-key"]["mountPath"] + "/"):
                p.append(f"keyvault: master key file {f!r} is not on the master-key mount")
            sname = vols.get("master-key", {}).get("secret", {}).get("secretName")
            want = exp.get("master_key_secret_name")
            if want and sname != want:
                p.append(f"keyvault: master key from Secret {sname}, want {want}")
            if "TRELLIS_KEYVAULT__MASTER_KEY" in env:
                p.append("keyvault: master key in a plain env var")
        return p

    def secrets():
        p = []
        names = {name_of(d): d for d in by_kind(docs, "Secret")}
        mk = [n for n in names if n.endswith("-master-key")]
        if bool(mk) != exp.get("master_secret", True):
            p.append(f"master-key Secret present: {bool(mk)}")
        for n in mk:
            s = names[n]
            if s["metadata"].get("annotations", {}).get("helm.sh/resource-policy") != "keep":
                p.append(f"{n}: not kept on uninstall")
            import base64
            for k, val in s.get("data", {}).items():
                if not re.fullmatch(r"[0-9a-fA-F]{64}", base64.b64decode(val).decode()):
                    p.append(f"{n}/{k}: not 64 hex characters")
        rs = [n for n in names if n.endswith("-redis")]
        if bool(rs) != exp.get("redis_secret", True):
            p.append(f"redis Secret present: {bool(rs)}")
        # every Secret a Deployment refers to is rendered or is the named existing one
        return p

    def services():
        p = []
        svcs = by_kind(docs, "Service")
        dev = [s for s in svcs if name_of(s).endswith("-gateway-devices")]
        if len(dev) != 1:
            return ["no device Service"]
        s = dev[0]["spec"]
        if s.get("type") not in ("LoadBalancer", "NodePort"):
            p.append(f"device Service type {s.get('type')}")
        if set_name != "autoscaling-off" and s.get("type") != "LoadBalancer":
            p.append("device Service is not a LoadBalancer")
        if s.get("externalTrafficPolicy") != "Local":
            p.append("device Service externalTrafficPolicy is not Local")
        if [x["port"] for x in s["ports"]] != [5683]:
            p.append(f"device Service ports {s['ports']}")
        for comp, port in COMPONENTS.items():
            m = [x for x in svcs if name_of(x).endswith(f"-{comp}")]
            if len(m) != 1:
                p.append(f"no ClusterIP Service for {comp}")
                continue
            sp = m[0]["spec"]
            ports = {x["name"]: x["port"] for x in sp["ports"]}
            if sp.get("type") != "ClusterIP" or ports != {"grpc": port, "admin": 9100}:
                p.append(f"{name_of(m[0])}: {sp.get('type')} {ports}")
            dep = deps.get(comp)
            if dep:
                labels = dep["spec"]["template"]["metadata"]["labels"]
                if any(labels.get(k) != v for k, v in sp["selector"].items()):
                    p.append(f"{name_of(m[0])}: selector matches no {comp} pod")
        for x in svcs:
            if len(name_of(x)) > 63:
                p.append(f"Service name too long: {name_of(x)}")
        return p

    def hpa_pdb():
        p = []
        h = by_kind(docs, "HorizontalPodAutoscaler")
        if bool(h) != exp.get("hpa", True):
            p.append(f"HPA present: {bool(h)}")
        for x in h:
            if not x["spec"]["scaleTargetRef"]["name"].endswith("-gateway"):
                p.append("HPA does not target the gateways")
        pdbs = by_kind(docs, "PodDisruptionBudget")
        if {component_of(x) for x in pdbs} != set(COMPONENTS):
            p.append(f"PDBs for {sorted(component_of(x) for x in pdbs)}")
        for x in pdbs:
            dep = deps.get(component_of(x))
            labels = dep["spec"]["template"]["metadata"]["labels"] if dep else {}
            if any(labels.get(k) != v for k, v in x["spec"]["selector"]["matchLabels"].items()):
                p.append(f"{name_of(x)}: selector matches no pod")
        return p

    def netpol():
        p = []
        nps = {component_of(x): x for x in by_kind(docs, "NetworkPolicy")}
        if len(nps) != exp.get("netpol", 4):
            return [f"{len(nps)} NetworkPolicies"]
        if not nps:
            return p
        release = deps["gateway"]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"]
        for comp, np in nps.items():
            if np["spec"].get("policyTypes") != ["Ingress"]:
                p.append(f"{comp}: policyTypes {np['spec'].get('policyTypes')}")
            for rule in np["spec"].get("ingress", []):
                ports = [x["port"] for x in rule.get("ports", [])]
                if "from" not in rule:
                    if comp != "gateway" or ports != ["device"]:
                        p.append(f"{comp}: a rule open to everyone on {ports}")
                    continue
                for peer in rule["from"]:
                    sel = peer.get("podSelector", {}).get("matchLabels", {})
                    if comp == "keyvault":
                        if set(peer) != {"podSelector"} or sel.get("app.kubernetes.io/instance") != release or \
                                sel.get("app.kubernetes.io/component") not in ("gateway", "signer", "smoke-test"):
                            if ports != ["admin"]:
                                p.append(f"keyvault: grpc reachable from {peer}")
                    elif set(peer) == {"podSelector"} and sel.get("app.kubernetes.io/instance") not in (release, None):
                        p.append(f"{comp}: peer from another release {peer}")
        gw_open = [r for r in nps["gateway"]["spec"]["ingress"] if "from" not in r]
        if not gw_open:
            p.append("gateway: device port not open to the world")
        return p

    def extras():
        p = []
        sm = by_kind(docs, "ServiceMonitor")
        if bool(sm) != exp.get("servicemonitor", False):
            p.append(f"ServiceMonitor present: {bool(sm)}")
        cms = by_kind(docs, "ConfigMap")
        dash = [c for c in cms if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
        if len(dash) != exp.get("dashboards", 5):
            p.append(f"{len(dash)} dashboard ConfigMaps, want {exp.get('dashboards', 5)}")
        for c in dash:
            for k, v in c["data"].items():
                d = json.loads(v)
                if not d.get("uid"):
                    p.append(f"{name_of(c)}/{k}: no uid")
        ds = [c for c in cms if c["metadata"].get("labels", {}).get("grafana_datasource") == "1"]
        if bool(ds) != exp.get("datasources", False):
            p.append(f"datasource ConfigMap present: {bool(ds)}")
        for c in ds:
            conf = yaml.safe_load(list(c["data"].values())[0])
            prom = [x for x in conf["datasources"] if x["type"] == "prometheus"][0]
            if not prom["jsonData"].get("exemplarTraceIdDestinations"):
                p.append("Prometheus data source has no exemplar link to Tempo")
        pods = [x for x in by_kind(docs, "Pod")
                if x["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
        if bool(pods) != exp.get("test_pod", True):
            p.append(f"helm test Pod present: {bool(pods)}")
        for x in pods:
            args = x["spec"]["containers"][0]["args"]
            if args[:2] != ["sim", "--smoke"] or "--devices=1" not in args:
                p.append(f"test Pod args {args}")
            if not any(a.startswith("--gateway=") and a.endswith("-gateway-devices:5683") for a in args):
                p.append("test Pod does not dial the device Service")
            if x["spec"]["containers"][0]["securityContext"].get("readOnlyRootFilesystem") is not True:
                p.append("test Pod root filesystem not read-only")
        return p

    check(f"{set_name}: Deployments (args, probes, securityContext, env contract)", deployments)
    check(f"{set_name}: Secrets (master key, Redis URLs)", secrets)
    check(f"{set_name}: Services (device LoadBalancer, ClusterIP gRPC + admin)", services)
    check(f"{set_name}: HPA and PodDisruptionBudgets", hpa_pdb)
    check(f"{set_name}: NetworkPolicy model", netpol)
    check(f"{set_name}: ServiceMonitor, dashboards, data sources, helm test Pod", extras)


def main():
    mode = sys.argv[1]
    if mode == "static":
        static(sys.argv[2], sys.argv[3])
    elif mode == "rendered":
        set_name, path, versions, ci = sys.argv[2], sys.argv[3], sys.argv[4].split(","), sys.argv[5]
        docs = load_docs(path)
        kinds = sum(1 for line in open(path) if line.startswith("kind:"))
        check(f"{set_name}: every rendered document parses on its own ({kinds} kinds, {len(docs)} documents)",
              lambda: [] if kinds == len(docs) else ["documents glued together (a missing newline before ---?)"])
        kube_schemas(docs, versions, ci, set_name)
        rules(docs, set_name)
    else:
        sys.exit(f"unknown mode {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
