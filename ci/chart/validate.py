#!/usr/bin/env python3
"""Checks for the Trellis Helm chart, driven by ci/chart/check.sh.

Two modes:

  validate.py static   CHART CI_DIR
      values.yaml documented key by key; values.schema.json is valid draft-07,
      types every value in values.yaml, accepts every value set in
      ci/chart/values/ and refuses every file in ci/chart/values-bad/; the
      README's values table is the one values.yaml gives; dashboards parse
      and use exactly the metrics in dashboards/METRICS.txt.

  validate.py readme-table CHART
      prints the README's values table, from values.yaml (comments,
      defaults) and values.schema.json (types): paste it over the old one.

  validate.py rendered SET_NAME RENDERED.yaml KUBE_VERSIONS CI_DIR
      every rendered manifest against the Kubernetes OpenAPI schemas shipped
      by the kubernetes-validate package (offline, strict: unknown fields are
      errors), CRDs against ci/chart/schemas/, then the chart's own rules
      (security context, probes, env contract, NetworkPolicy model, mutual
      TLS and tokens, ...).

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


def values_docs(values_path):
    """Each key path of values.yaml -> its comment (from the last "# --" line
    of the comment block right above it, continuation lines joined)."""
    lines = open(values_path).read().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z0-9_.\-]+):(\s|$)")
    docs, stack = {}, []
    for n, line in enumerate(lines):
        m = key_re.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        block = []
        j = n - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.insert(0, lines[j].strip())
            j -= 1
        starts = [i for i, x in enumerate(block) if x.startswith("# --")]
        text = " ".join(x.lstrip("#").strip() for x in block[starts[-1] if starts else 0:])
        docs[".".join(k for _, k in stack)] = re.sub(r"^-- ", "", text)
    return docs


def readme_table(chart):
    """The README's values table rows: every key of values.yaml in order,
    objects expanded (but `resources`, shown whole), type from the schema."""
    values = yaml.safe_load(open(os.path.join(chart, "values.yaml")))
    schema = json.load(open(os.path.join(chart, "values.schema.json")))
    docs = values_docs(os.path.join(chart, "values.yaml"))
    rows = []

    def typ(sub):
        t = sub.get("type", "")
        return "/".join(t) if isinstance(t, list) else t

    def walk(v, sch, path):
        for k, val in v.items():
            p = f"{path}.{k}" if path else k
            sub = sch.get("properties", {}).get(k, {})
            if isinstance(val, dict) and val and k != "resources":
                rows.append(f"| `{p}` | {typ(sub)} |  | {docs.get(p, '')} |")
                walk(val, sub, p)
            else:
                rows.append(f"| `{p}` | {typ(sub)} | `{json.dumps(val)}` | {docs.get(p, '')} |")

    walk(values, schema, "")
    return rows


def readme_in_step(chart):
    lines = open(os.path.join(chart, "README.md")).read().splitlines()
    try:
        start = next(i for i, x in enumerate(lines) if x.startswith("| key | type | default |")) + 2
    except StopIteration:
        return ["README.md has no values table (| key | type | default | ...)"]
    have = []
    for x in lines[start:]:
        if not x.startswith("| `"):
            break
        have.append(x)
    want = readme_table(chart)
    problems = []
    for i, (h, w) in enumerate(zip(have, want)):
        if h != w:
            problems.append(f"row {i + 1}: README has {h[:90]!r}, values.yaml gives {w[:90]!r}")
            break
    if len(have) != len(want):
        problems.append(f"README has {len(have)} rows, values.yaml gives {len(want)}")
    if problems:
        problems.append("regenerate: ci/chart/validate.py readme-table charts/trellis")
    return problems


def static(chart, ci):
    values_path = os.path.join(chart, "values.yaml")
    schema_path = os.path.join(chart, "values.schema.json")
    defaults = yaml.safe_load(open(values_path))
    schema = json.load(open(schema_path))
    v = jsonschema.Draft7Validator

    check("values.yaml: a comment above every key", lambda: values_documented(values_path))
    check("README.md: the values table is values.yaml's (keys, types, defaults, comments, in order)",
          lambda: readme_in_step(chart))
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
    "TRELLIS_REDIS__USERNAME", "TRELLIS_REDIS__PASSWORD_FILE",
    "TRELLIS_KEYVAULT__LISTEN", "TRELLIS_KEYVAULT__MASTER_KEY", "TRELLIS_KEYVAULT__MASTER_KEY_FILE",
    "TRELLIS_KEYVAULT__WORKERS", "TRELLIS_KEYVAULT__QUEUE_DEPTH",
    "TRELLIS_GATEWAY__ID", "TRELLIS_GATEWAY__DEVICE_LISTEN", "TRELLIS_GATEWAY__GRPC_LISTEN",
    "TRELLIS_GATEWAY__KEYVAULT_URL", "TRELLIS_GATEWAY__OTA_URL", "TRELLIS_GATEWAY__HANDSHAKE_CONCURRENCY", "TRELLIS_GATEWAY__HANDSHAKE_RATE",
    "TRELLIS_GATEWAY__HANDSHAKE_BURST",
    "TRELLIS_SIGNER__LISTEN", "TRELLIS_SIGNER__KEYVAULT_URL", "TRELLIS_SIGNER__MAX_IMAGE_BYTES",
    "TRELLIS_OTA__LISTEN", "TRELLIS_OTA__GATEWAY_URL", "TRELLIS_OTA__SIGNER_URL", "TRELLIS_OTA__TICK_MS",
    "TRELLIS_OTA__LEASE_MS",
    "TRELLIS_API__LISTEN", "TRELLIS_API__GATEWAY_URL", "TRELLIS_API__KEYVAULT_URL", "TRELLIS_API__SIGNER_URL",
    "TRELLIS_API__OTA_URL",
    "TRELLIS_AUTH__MODE", "TRELLIS_TLS__MODE", "TRELLIS_TLS__DIR", "TRELLIS_TLS__CA_FILE", "TRELLIS_TLS__CERT_FILE",
    "TRELLIS_TLS__KEY_FILE", "TRELLIS_TELEMETRY__OTLP_ENDPOINT", "TRELLIS_TELEMETRY__LOG", "TRELLIS_TELEMETRY__ADMIN_LISTEN",
    "TRELLIS_TELEMETRY__ENVIRONMENT",
}
COMPONENTS = {"gateway": 7200, "keyvault": 7100, "signer": 7300, "ota": 7400}
# The application API (`trellis api`, services/api): plain HTTP, no gRPC port.
API_PORT = 8080
# Certificate roles (crates/core/src/tls.rs): the services' and the operator's.
ROLES = list(COMPONENTS) + ["operator"]
ROLE_URI = "spiffe://trellis/role/{}"
# Who holds a certificate (its app.kubernetes.io/component) -> the role it
# names: each role's own, and the api's own certificate of role operator
# (services/api/src/grpc.rs: ServiceTls::load(config, Role::Operator)).
CERT_ROLE = {**{r: r for r in ROLES}, "api": "operator"}
# The services the URL variables point at.
API_URLS = {
    "TRELLIS_API__GATEWAY_URL": "gateway", "TRELLIS_API__KEYVAULT_URL": "keyvault",
    "TRELLIS_API__SIGNER_URL": "signer", "TRELLIS_API__OTA_URL": "ota",
}
URL_TARGETS = {
    "TRELLIS_GATEWAY__KEYVAULT_URL": "keyvault", "TRELLIS_GATEWAY__OTA_URL": "ota",
    "TRELLIS_SIGNER__KEYVAULT_URL": "keyvault",
    "TRELLIS_OTA__GATEWAY_URL": "gateway", "TRELLIS_OTA__SIGNER_URL": "signer",
    **API_URLS,
}
TLS_FILES = {"TRELLIS_TLS__CA_FILE": "ca.crt", "TRELLIS_TLS__CERT_FILE": "tls.crt", "TRELLIS_TLS__KEY_FILE": "tls.key"}
OWN_CA = {"own_ca": True}

# What each value set must produce, beyond the rules every set obeys.
EXPECT = {
    "defaults": {"hpa": True, "servicemonitor": False, "master_secret": True, "redis_secret": True,
                 "dashboards": 5, "test_pod": True, "netpol": 5,
                 "tls": "mutual", "auth": "tokens", "cert_manager": OWN_CA, "token_secret": "trellis-test-token"},
    "api-off": {"hpa": True, "servicemonitor": False, "master_secret": True, "redis_secret": True,
                "dashboards": 5, "test_pod": True, "netpol": 4, "api": False,
                "tls": "mutual", "auth": "tokens", "cert_manager": OWN_CA, "token_secret": "trellis-test-token"},
    "two-region": {"hpa": True, "servicemonitor": True, "master_secret": True, "redis_secret": True,
                   "dashboards": 5, "datasources": True, "test_pod": True, "netpol": 5,
                   "tls": "mutual", "auth": "tokens", "token_secret": "trellis-test-token",
                   "api_external": "LoadBalancer", "api_port": 443, "api_from": [{"namespaceSelector": {"matchLabels": {
                       "kubernetes.io/metadata.name": "ingress-nginx"}}}],
                   "cert_manager": {"issuer": {"name": "company-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
                                    "cluster_domain": "eu-west.cluster.internal", "duration": "720h"},
                   "env": {"TRELLIS_REGION": "eu-west",
                           "TRELLIS_REDIS__SENTINELS": "sentinel-0.sentinel:26379,sentinel-1.sentinel:26379,sentinel-2.sentinel:26379",
                           "TRELLIS_REDIS__SENTINEL_MASTER": "trellis",
                           "TRELLIS_TELEMETRY__OTLP_ENDPOINT": "http://otel-collector.monitoring:4317"}},
    "existing-secret": {"hpa": True, "servicemonitor": False, "master_secret": False, "redis_secret": False,
                        "dashboards": 5, "test_pod": True, "netpol": 5,
                        "master_key_secret_name": "trellis-master-key",
                        "tls": "mutual", "auth": "tokens", "token_secret": "trellis-smoke-token",
                        "tls_secrets": {r: f"trellis-tls-{r}" for r in CERT_ROLE}},
    "autoscaling-off": {"hpa": False, "servicemonitor": False, "master_secret": True, "redis_secret": True,
                        "dashboards": 0, "test_pod": False, "netpol": 5, "gateway_replicas": 3,
                        "api_hpa": False, "api_replicas": 3, "api_external": "NodePort",
                        "tls": "mutual", "auth": "tokens", "cert_manager": OWN_CA},
    "redis-acl": {"hpa": True, "servicemonitor": False, "master_secret": True, "redis_secret": True,
                  "dashboards": 5, "test_pod": True, "netpol": 5,
                  "tls": "mutual", "auth": "tokens", "cert_manager": OWN_CA, "token_secret": "trellis-test-token",
                  "redis_acl": "trellis-redis-acl"},
    "security-off": {"hpa": True, "servicemonitor": False, "master_secret": True, "redis_secret": True,
                     "dashboards": 5, "test_pod": True, "netpol": 5, "tls": "off", "auth": "off"},
}


def load_docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]


def kube_schemas(docs, versions, ci, set_name):
    import kubernetes_validate
    crd_schemas = {
        ("monitoring.coreos.com/v1", "ServiceMonitor"):
            json.load(open(os.path.join(ci, "schemas", "servicemonitor-monitoring-v1.json"))),
        ("cert-manager.io/v1", "Certificate"):
            json.load(open(os.path.join(ci, "schemas", "certificate-cert-manager-v1.json"))),
        ("cert-manager.io/v1", "Issuer"):
            json.load(open(os.path.join(ci, "schemas", "issuer-cert-manager-v1.json"))),
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
    api_on = exp.get("api", True)
    want_deps = set(COMPONENTS) | ({"api"} if api_on else set())

    def deployments():
        p = []
        if set(deps) != want_deps:
            p.append(f"Deployments for {sorted(deps)}, want {sorted(want_deps)}")
        for comp, d in deps.items():
            spec = d["spec"]["template"]["spec"]
            c = spec["containers"][0]
            n = name_of(d)
            if c.get("args") != [comp]:
                p.append(f"{n}: args {c.get('args')}, want ['{comp}']")
            if spec.get("enableServiceLinks") is not False:
                p.append(f"{n}: enableServiceLinks must be false (figment refuses TRELLIS_*_SERVICE_HOST)")
            ports = {x["name"]: x["containerPort"] for x in c["ports"]}
            want_ports = {"http": API_PORT, "admin": 9100} if comp == "api" else None
            if want_ports and ports != want_ports:
                p.append(f"{n}: ports {ports}, want {want_ports}")
            elif not want_ports and (ports.get("admin") != 9100 or ports.get("grpc") != COMPONENTS[comp]):
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
            # Every service, the api too (webhooks), talks to Redis.
            need = ("TRELLIS_REGION", "TRELLIS_TELEMETRY__ADMIN_LISTEN", "TRELLIS_REDIS__URL")
            for k in need:
                if k not in env:
                    p.append(f"{n}: no {k}")
            if env.get("TRELLIS_TELEMETRY__ADMIN_LISTEN", {}).get("value") != "0.0.0.0:9100":
                p.append(f"{n}: admin not on 0.0.0.0:9100")
            listen = {"gateway": "TRELLIS_GATEWAY__GRPC_LISTEN", "keyvault": "TRELLIS_KEYVAULT__LISTEN",
                      "signer": "TRELLIS_SIGNER__LISTEN", "ota": "TRELLIS_OTA__LISTEN", "api": "TRELLIS_API__LISTEN"}[comp]
            if env.get(listen, {}).get("value") != f"0.0.0.0:{API_PORT if comp == 'api' else COMPONENTS[comp]}":
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

    def redis_acl():
        """redis.acl: each service connects as its own ACL user with its own
        password file, from a read-only 0400 mount of only its own key of
        the Secret (a gateway pod never holds keyvault's password); without
        redis.acl, none of it is rendered."""
        p = []
        want_secret = exp.get("redis_acl")
        for comp, d in deps.items():
            spec = d["spec"]["template"]["spec"]
            c = spec["containers"][0]
            env = env_map(c)
            n = name_of(d)
            acl_vols = [v for v in spec.get("volumes", [])
                        if any(i.get("key", "").endswith(".password") for i in v.get("secret", {}).get("items", []))
                        or (want_secret and v.get("secret", {}).get("secretName") == want_secret)]
            if not want_secret:
                leaked = [k for k in ("TRELLIS_REDIS__USERNAME", "TRELLIS_REDIS__PASSWORD_FILE") if k in env]
                if leaked or acl_vols:
                    p.append(f"{n}: Redis ACL settings although redis.acl is off ({leaked}, {[v['name'] for v in acl_vols]})")
                continue
            user = env.get("TRELLIS_REDIS__USERNAME", {}).get("value")
            if user != f"trellis-{comp}":
                p.append(f"{n}: TRELLIS_REDIS__USERNAME={user!r}, want 'trellis-{comp}'")
            path = env.get("TRELLIS_REDIS__PASSWORD_FILE", {}).get("value", "")
            if not path.endswith(f"/{comp}.password"):
                p.append(f"{n}: TRELLIS_REDIS__PASSWORD_FILE={path!r}, want .../{comp}.password")
            if len(acl_vols) != 1:
                p.append(f"{n}: {len(acl_vols)} volumes from the Redis ACL Secret, want 1")
                continue
            v = acl_vols[0]
            sec = v["secret"]
            if sec.get("secretName") != want_secret:
                p.append(f"{n}: Redis password from Secret {sec.get('secretName')}, want {want_secret}")
            keys = [i["key"] for i in sec.get("items", [])]
            if keys != [f"{comp}.password"]:
                p.append(f"{n}: mounts Redis ACL Secret keys {keys}, want only {comp}.password")
            modes = {sec.get("defaultMode")} | {i["mode"] for i in sec.get("items", []) if "mode" in i}
            if modes != {0o400}:
                p.append(f"{n}: Redis password file mode {sorted(oct(m or 0o644) for m in modes)}, want 0400")
            mounts = [m for m in c.get("volumeMounts", []) if m["name"] == v["name"]]
            if len(mounts) != 1 or mounts[0].get("readOnly") is not True:
                p.append(f"{n}: Redis password volume not mounted once, read-only")
            elif path != f"{mounts[0]['mountPath']}/{comp}.password" or sec["items"][0].get("path") != f"{comp}.password":
                p.append(f"{n}: TRELLIS_REDIS__PASSWORD_FILE {path!r} is not the mounted {comp}.password")
            others = [x["name"] for x in spec.get("volumes", []) if x is not v and x.get("secret", {}).get("secretName") == want_secret]
            if others:
                p.append(f"{n}: more volumes from {want_secret}: {others}")
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
        api_svcs = [x for x in svcs if component_of(x) == "api"]
        if not api_on:
            if api_svcs:
                p.append(f"api Services although api.enabled is false: {[name_of(x) for x in api_svcs]}")
        else:
            inner = [x for x in api_svcs if name_of(x).endswith("-api")]
            outer = [x for x in api_svcs if name_of(x).endswith("-api-external")]
            if len(inner) != 1:
                p.append(f"no single ClusterIP Service for the api ({[name_of(x) for x in api_svcs]})")
            else:
                sp = inner[0]["spec"]
                ports = {x["name"]: (x["port"], x["targetPort"]) for x in sp["ports"]}
                want = {"http": (exp.get("api_port", API_PORT), "http"), "admin": (9100, "admin")}
                if sp.get("type") != "ClusterIP" or ports != want:
                    p.append(f"{name_of(inner[0])}: {sp.get('type')} {ports}, want ClusterIP {want}")
            ext = exp.get("api_external")
            if bool(outer) != bool(ext):
                p.append(f"api external Service present: {bool(outer)}, want {bool(ext)}")
            for x in outer:
                sp = x["spec"]
                if sp.get("type") != ext:
                    p.append(f"{name_of(x)}: type {sp.get('type')}, want {ext}")
                if [(y["name"], y["port"], y["targetPort"]) for y in sp["ports"]] != [("http", exp.get("api_port", API_PORT), "http")]:
                    p.append(f"{name_of(x)}: ports {sp['ports']}, want the HTTP port only (never admin)")
            dep = deps.get("api")
            for x in api_svcs:
                labels = dep["spec"]["template"]["metadata"]["labels"] if dep else {}
                if any(labels.get(k) != v for k, v in x["spec"]["selector"].items()):
                    p.append(f"{name_of(x)}: selector matches no api pod")
        for x in svcs:
            if len(name_of(x)) > 63:
                p.append(f"Service name too long: {name_of(x)}")
        return p

    def hpa_pdb():
        p = []
        h = by_kind(docs, "HorizontalPodAutoscaler")
        want_hpa = ({"gateway"} if exp.get("hpa", True) else set()) | \
            ({"api"} if api_on and exp.get("api_hpa", True) else set())
        if {component_of(x) for x in h} != want_hpa or len(h) != len(want_hpa):
            p.append(f"HPAs for {sorted(component_of(x) for x in h)}, want {sorted(want_hpa)}")
        for x in h:
            comp = component_of(x)
            target = x["spec"]["scaleTargetRef"]
            if comp not in deps or target["kind"] != "Deployment" or target["name"] != name_of(deps[comp]):
                p.append(f"{name_of(x)}: targets {target}, not the {comp} Deployment")
            elif "replicas" in deps[comp]["spec"]:
                p.append(f"{comp}: replicas set although the HPA owns it")
        if api_on and "api_replicas" in exp and deps.get("api", {}).get("spec", {}).get("replicas") != exp["api_replicas"]:
            p.append(f"api: replicas {deps.get('api', {}).get('spec', {}).get('replicas')}, want {exp['api_replicas']}")
        pdbs = by_kind(docs, "PodDisruptionBudget")
        if {component_of(x) for x in pdbs} != want_deps:
            p.append(f"PDBs for {sorted(component_of(x) for x in pdbs)}, want {sorted(want_deps)}")
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
        name_label = deps["gateway"]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for comp, np in nps.items():
            if np["spec"].get("policyTypes") != ["Ingress"]:
                p.append(f"{comp}: policyTypes {np['spec'].get('policyTypes')}")
            for rule in np["spec"].get("ingress", []):
                ports = [x["port"] for x in rule.get("ports", [])]
                if "from" not in rule:
                    if (comp, ports) not in (("gateway", ["device"]), ("api", ["http"])):
                        p.append(f"{comp}: a rule open to everyone on {ports}")
                    continue
                for peer in rule["from"]:
                    sel = peer.get("podSelector", {}).get("matchLabels", {})
                    if comp == "keyvault":
                        if set(peer) != {"podSelector"} or sel.get("app.kubernetes.io/instance") != release or \
                                sel.get("app.kubernetes.io/component") not in ("gateway", "signer", "smoke-test") + (("api",) if api_on else ()):
                            if ports != ["admin"]:
                                p.append(f"keyvault: grpc reachable from {peer}")
                    elif set(peer) == {"podSelector"} and sel.get("app.kubernetes.io/instance") not in (release, None):
                        p.append(f"{comp}: peer from another release {peer}")
        gw_open = [r for r in nps["gateway"]["spec"]["ingress"] if "from" not in r]
        if not gw_open:
            p.append("gateway: device port not open to the world")
        if bool(nps.get("api")) != api_on:
            p.append(f"api NetworkPolicy present: {bool(nps.get('api'))}, want {api_on}")
        if api_on and "api" in nps:
            rules_ = nps["api"]["spec"]["ingress"]
            http = [r for r in rules_ if [x["port"] for x in r.get("ports", [])] == ["http"]]
            want_from = exp.get("api_from")
            if len(http) != 1 or http[0].get("from") != want_from:
                p.append(f"api: HTTP rule {http}, want from {want_from or 'anywhere'}")
            # The api reaches keyvault; the other gRPC ports admit every pod of the release.
            kv_peers = [peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                        for r in nps["keyvault"]["spec"]["ingress"] for peer in r.get("from", [])]
            if "api" not in kv_peers:
                p.append("keyvault: the api may not reach it")
            for comp in ("gateway", "signer", "ota"):
                if not any(peer.get("podSelector", {}).get("matchLabels") ==
                           {"app.kubernetes.io/name": name_label, "app.kubernetes.io/instance": release}
                           for r in nps[comp]["spec"]["ingress"] for peer in r.get("from", [])
                           if [x["port"] for x in r.get("ports", [])] == ["grpc"]):
                    p.append(f"{comp}: the api (a pod of this release) may not reach its gRPC port")
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

    def security():
        """Mutual TLS and tokens: each service runs with its own role's
        certificate, every certificate names its role and its Service, the
        URLs between services name hosts the certificates carry, and the
        helm test Pod calls with the operator certificate and its token."""
        p = []
        mode, auth = exp.get("tls", "mutual"), exp.get("auth", "tokens")
        cm = exp.get("cert_manager")
        svcs = {name_of(x): x for x in by_kind(docs, "Service")}
        certs = by_kind(docs, "Certificate")
        issuers = {name_of(x): x for x in by_kind(docs, "Issuer")}
        # Keyed by holder (the Certificate's component): the five roles' own,
        # and the api's, which names the role operator.
        role_cert = {}
        for c in certs:
            uris = c["spec"].get("uris", [])
            roles = [u[len(ROLE_URI.format("")):] for u in uris if u.startswith(ROLE_URI.format(""))]
            if c["spec"].get("isCA"):
                if uris:
                    p.append(f"CA Certificate {name_of(c)} names a role")
                continue
            holder = component_of(c)
            if holder not in CERT_ROLE:
                p.append(f"Certificate {name_of(c)}: held by {holder!r}, not a service or the operator")
                continue
            if uris != [ROLE_URI.format(CERT_ROLE[holder])]:
                p.append(f"Certificate {name_of(c)} ({holder}): uris {uris}, want exactly [{ROLE_URI.format(CERT_ROLE[holder])}]")
                continue
            if holder in role_cert:
                p.append(f"two Certificates for {holder}")
            role_cert[holder] = c

        def secret_of(role):
            if cm:
                c = role_cert.get(role)
                return c["spec"]["secretName"] if c else None
            return exp.get("tls_secrets", {}).get(role)

        def tls_mount(spec, c, who, role):
            """The TLS_FILES variables of container c point into a read-only
            mount of role's Secret, with the keys cert-manager writes."""
            env = env_map(c)
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            q = []
            dirs = set()
            for var, key in TLS_FILES.items():
                path = env.get(var, {}).get("value", "")
                if not path.endswith("/" + key):
                    q.append(f"{who}: {var}={path!r}, want .../{key}")
                dirs.add(path.rsplit("/", 1)[0])
            mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] in dirs]
            if len(dirs) != 1 or len(mounts) != 1:
                return q + [f"{who}: the TLS files are not on one mount ({sorted(dirs)})"]
            m = mounts[0]
            if m.get("readOnly") is not True:
                q.append(f"{who}: TLS mount not read-only")
            sec = vols.get(m["name"], {}).get("secret")
            if not sec:
                return q + [f"{who}: TLS mount {m['name']} is not a Secret volume"]
            want = secret_of(role)
            if not want or sec.get("secretName") != want:
                q.append(f"{who}: TLS from Secret {sec.get('secretName')}, want role {role}'s ({want})")
            items = {i["key"]: i["path"] for i in sec.get("items", [])} or {k: k for k in TLS_FILES.values()}
            if items != {k: k for k in TLS_FILES.values()}:
                q.append(f"{who}: Secret items {items}, want ca.crt, tls.crt, tls.key as themselves")
            if sec.get("defaultMode") not in (0o400, 0o440):
                q.append(f"{who}: TLS files mode {oct(sec.get('defaultMode') or 0o644)}, want 0400 or 0440")
            return q

        for comp, d in deps.items():
            spec = d["spec"]["template"]["spec"]
            c = spec["containers"][0]
            env = env_map(c)
            n = name_of(d)
            if env.get("TRELLIS_AUTH__MODE", {}).get("value") != auth:
                p.append(f"{n}: TRELLIS_AUTH__MODE={env.get('TRELLIS_AUTH__MODE', {}).get('value')!r}, want {auth!r}")
            if env.get("TRELLIS_TLS__MODE", {}).get("value") != mode:
                p.append(f"{n}: TRELLIS_TLS__MODE={env.get('TRELLIS_TLS__MODE', {}).get('value')!r}, want {mode!r}")
            if mode == "mutual":
                p += tls_mount(spec, c, n, comp)
            elif any(k in env for k in TLS_FILES) or any("secret" in v and v["name"] == "tls" for v in spec["volumes"]):
                p.append(f"{n}: TLS files although tls.mode is off")
            for var, target in URL_TARGETS.items():
                if var not in env:
                    continue
                m = re.fullmatch(r"(https?)://([^:/]+):(\d+)", env[var].get("value", ""))
                if not m:
                    p.append(f"{n}: {var}={env[var].get('value')!r} is not scheme://host:port")
                    continue
                scheme, host, port = m.group(1), m.group(2), int(m.group(3))
                if scheme != ("https" if mode == "mutual" else "http"):
                    p.append(f"{n}: {var} is {scheme} with tls.mode {mode}")
                if host not in svcs or component_of(svcs[host]) != target or port != COMPONENTS[target]:
                    p.append(f"{n}: {var} host {host}:{port} is not the {target} Service's gRPC port")
                c_target = role_cert.get(target)
                if cm and mode == "mutual" and c_target and host not in c_target["spec"].get("dnsNames", []):
                    p.append(f"{n}: {var} host {host} is not in the {target} certificate's dnsNames")

        # The certificates themselves.
        if mode != "mutual" or not cm:
            if certs or issuers:
                p.append(f"cert-manager resources although {'tls.mode is off' if mode != 'mutual' else 'cert-manager is off'}")
            return p
        want_holders = ROLES + (["api"] if api_on else [])
        if set(role_cert) != set(want_holders):
            p.append(f"Certificates for {sorted(role_cert)}, want {want_holders}")
        domain = cm.get("cluster_domain", "cluster.local")
        secrets = [c["spec"]["secretName"] for c in role_cert.values()]
        if len(set(secrets)) != len(secrets):
            p.append(f"role Certificates share a Secret: {secrets}")
        issuer_refs = set()
        for role, c in role_cert.items():
            sp, n = c["spec"], f"Certificate {name_of(c)}"
            if role == "api":
                # A client certificate only: the api serves plain HTTP.
                if sorted(sp.get("usages", [])) != ["client auth", "digital signature"]:
                    p.append(f"{n}: usages {sp.get('usages')}, want client auth and digital signature only")
                if sp.get("dnsNames") or sp.get("ipAddresses"):
                    p.append(f"{n}: DNS names or IPs on a client-only certificate")
            else:
                missing = {"server auth", "client auth", "digital signature"} - set(sp.get("usages", []))
                if missing:
                    p.append(f"{n}: usages lack {sorted(missing)}")
            if "duration" in cm and sp.get("duration") != cm["duration"]:
                p.append(f"{n}: duration {sp.get('duration')}, want {cm['duration']}")
            issuer_refs.add(json.dumps(sp["issuerRef"], sort_keys=True))
            if CERT_ROLE[role] == "operator":
                continue
            svc = [x for x in svcs.values() if component_of(x) == role and x["spec"].get("type") == "ClusterIP"]
            if len(svc) != 1:
                p.append(f"{n}: no single ClusterIP Service for {role}")
                continue
            name, ns = name_of(svc[0]), svc[0]["metadata"]["namespace"]
            want = [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{domain}"]
            lacking = [w for w in want if w not in sp.get("dnsNames", [])]
            if lacking:
                p.append(f"{n}: dnsNames lack {lacking}")
            if "127.0.0.1" not in sp.get("ipAddresses", []):
                p.append(f"{n}: no 127.0.0.1 (kubectl port-forward, the CLI inside the pod)")
        if len(issuer_refs) != 1:
            p.append(f"role Certificates have different issuers (one CA for all): {sorted(issuer_refs)}")
        ref = json.loads(next(iter(issuer_refs))) if issuer_refs else {}
        if cm.get("own_ca"):
            ca_issuer = issuers.get(ref.get("name"))
            if ref.get("kind") != "Issuer" or not ca_issuer or "ca" not in ca_issuer["spec"]:
                p.append(f"role Certificates are issued by {ref}, not the chart's CA Issuer")
            else:
                ca_secret = ca_issuer["spec"]["ca"]["secretName"]
                ca_cert = [c for c in certs if c["spec"].get("isCA") and c["spec"]["secretName"] == ca_secret]
                if len(ca_cert) != 1:
                    p.append(f"no CA Certificate writes {ca_secret}")
                else:
                    root = issuers.get(ca_cert[0]["spec"]["issuerRef"]["name"], {})
                    if "selfSigned" not in root.get("spec", {}):
                        p.append("the CA Certificate is not issued by the chart's self-signed Issuer")
                    if ca_secret in secrets:
                        p.append("a role Certificate writes the CA's Secret")
        else:
            want = cm.get("issuer", {})
            if ref != want:
                p.append(f"role Certificates are issued by {ref}, want {want}")
            if issuers:
                p.append(f"Issuers rendered although issuerRef.name is set: {sorted(issuers)}")
        return p

    def api():
        """The application API (`trellis api`): with api.enabled its Deployment
        calls the four services at the very URLs the other Deployments use
        (in-cluster Service names, https with mutual TLS), mounts its own
        certificate (role operator) and no other Secret, and has its Service,
        HPA, PDB and NetworkPolicy; with api.enabled false none of it, nor
        its certificate, nor a keyvault rule for it, is rendered."""
        p = []
        mode = exp.get("tls", "mutual")
        mine = [d for d in docs if component_of(d) == "api"]
        if not api_on:
            if mine:
                p.append(f"rendered although api.enabled is false: {[d['kind'] + '/' + name_of(d) for d in mine]}")
            text = yaml.safe_dump_all(docs)
            if "TRELLIS_API__" in text or "-api-tls" in text:
                p.append("TRELLIS_API__* or the api's certificate Secret rendered although api.enabled is false")
            return p
        kinds = sorted({d["kind"] for d in mine})
        want_kinds = {"Deployment", "Service", "PodDisruptionBudget"} | \
            ({"HorizontalPodAutoscaler"} if exp.get("api_hpa", True) else set()) | \
            ({"NetworkPolicy"} if exp.get("netpol", 5) else set()) | \
            ({"Certificate"} if mode == "mutual" and exp.get("cert_manager") else set())
        if set(kinds) != want_kinds:
            p.append(f"api resources {kinds}, want {sorted(want_kinds)}")
        d = deps.get("api")
        if not d:
            return p + ["no api Deployment"]
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = env_map(c)
        if c.get("args") != ["api"]:
            p.append(f"api: args {c.get('args')}, want ['api'] (trellis api)")
        # The same URL the other services use for each target.
        used_by_others = {"keyvault": ("gateway", "TRELLIS_GATEWAY__KEYVAULT_URL"),
                          "ota": ("gateway", "TRELLIS_GATEWAY__OTA_URL"),
                          "gateway": ("ota", "TRELLIS_OTA__GATEWAY_URL"),
                          "signer": ("ota", "TRELLIS_OTA__SIGNER_URL")}
        scheme = "https" if mode == "mutual" else "http"
        svcs = {name_of(x): x for x in by_kind(docs, "Service")}
        for var, target in API_URLS.items():
            got = env.get(var, {}).get("value")
            other, other_var = used_by_others[target]
            theirs = env_map(deps[other]["spec"]["template"]["spec"]["containers"][0]).get(other_var, {}).get("value") \
                if other in deps else None
            m = re.fullmatch(r"(https?)://([^:/]+):(\d+)", got or "")
            if not m:
                p.append(f"api: {var}={got!r}, want {scheme}://<the {target} Service>:{COMPONENTS[target]}")
                continue
            if m.group(1) != scheme or m.group(2) not in svcs or component_of(svcs[m.group(2)]) != target \
                    or int(m.group(3)) != COMPONENTS[target]:
                p.append(f"api: {var}={got!r} is not {scheme}:// the {target} Service's gRPC port")
            if got != theirs:
                p.append(f"api: {var}={got!r}, but {other} uses {other_var}={theirs!r}")
        # Its own certificate and its own Redis credentials (webhooks; checked
        # by redis_acl) and no other Secret: no master key, no other role's
        # certificate (not even the operator's, the test Pod's).
        acl_secret = exp.get("redis_acl")
        secret_vols = [v for v in spec.get("volumes", []) if ("secret" in v or "projected" in v)
                       and not (acl_secret and v.get("secret", {}).get("secretName") == acl_secret)]
        secret_env = [e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
                      and not e["name"].startswith("TRELLIS_REDIS__")]
        if secret_env:
            p.append(f"api: env from Secrets {secret_env}")
        if mode == "mutual":
            if exp.get("cert_manager"):
                certs = {component_of(x): x["spec"]["secretName"] for x in by_kind(docs, "Certificate")
                         if not x["spec"].get("isCA")}
            else:
                certs = exp.get("tls_secrets", {})
            own = certs.get("api")
            names = [v.get("secret", {}).get("secretName") for v in secret_vols]
            if not own or names != [own]:
                p.append(f"api: Secret volumes {names}, want only its own certificate's ({own})")
            others = {h: n for h, n in certs.items() if h != "api" and n == own}
            if others:
                p.append(f"api: its certificate Secret {own} is also {sorted(others)}'s")
        elif secret_vols:
            p.append(f"api: Secret volumes {[v['name'] for v in secret_vols]} although tls.mode is off")
        return p

    def test_pod_security():
        p = []
        pods = [x for x in by_kind(docs, "Pod") if x["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
        mode, auth = exp.get("tls", "mutual"), exp.get("auth", "tokens")
        for x in pods:
            spec = x["spec"]
            c = spec["containers"][0]
            env = env_map(c)
            # services/trellis/tests/chart.rs: only config keys and the CLI's URL variables.
            unknown = [k for k in env if k.startswith("TRELLIS_") and k not in KNOWN_ENV]
            if unknown:
                p.append(f"test Pod: env the binary's configuration does not have: {unknown}")
            if env.get("TRELLIS_TLS__MODE", {}).get("value") != mode:
                p.append(f"test Pod: TRELLIS_TLS__MODE is not {mode!r}")
            if mode == "mutual":
                if exp.get("cert_manager"):
                    ops = [c2 for c2 in by_kind(docs, "Certificate")
                           if c2["spec"].get("uris") == [ROLE_URI.format("operator")] and component_of(c2) == "operator"]
                    want = ops[0]["spec"]["secretName"] if ops else None
                else:
                    want = exp.get("tls_secrets", {}).get("operator")
                vols = {v["name"]: v for v in spec.get("volumes", [])}
                secs = [vols.get(m["name"], {}).get("secret", {}).get("secretName") for m in c.get("volumeMounts", [])]
                if want not in secs:
                    p.append(f"test Pod: no mount of the operator certificate's Secret {want} (has {secs})")
                for var, key in TLS_FILES.items():
                    if not env.get(var, {}).get("value", "").endswith("/" + key):
                        p.append(f"test Pod: {var} does not name {key}")
            for a in c["args"]:
                m = re.fullmatch(r"--(keyvault|gateway)-url=(https?)://.*", a)
                if m and m.group(2) != ("https" if mode == "mutual" else "http"):
                    p.append(f"test Pod: {a} with tls.mode {mode}")
            token_vols = [v for v in spec.get("volumes", [])
                          if any(i.get("key") == "token" for i in v.get("secret", {}).get("items", []))]
            if auth == "tokens":
                # The CLI reads $XDG_CONFIG_HOME/trellis/token (access_cli.rs login_file).
                home = env.get("XDG_CONFIG_HOME", {}).get("value")
                if len(token_vols) != 1 or not home:
                    p.append("test Pod: no token Secret mounted where the CLI looks ($XDG_CONFIG_HOME/trellis/token)")
                    continue
                v = token_vols[0]
                if v["secret"]["secretName"] != exp.get("token_secret"):
                    p.append(f"test Pod: token from Secret {v['secret']['secretName']}, want {exp.get('token_secret')}")
                path = [i["path"] for i in v["secret"]["items"] if i["key"] == "token"][0]
                mnt = [m for m in c["volumeMounts"] if m["name"] == v["name"]]
                if not mnt or f"{mnt[0]['mountPath']}/{path}" != f"{home}/trellis/token":
                    p.append(f"test Pod: token file is not at {home}/trellis/token")
                if any("token" in a.lower() for a in c["args"]) or "TRELLIS_TOKEN" in env:
                    p.append("test Pod: token on the command line or in the environment")
            elif token_vols or "XDG_CONFIG_HOME" in env:
                p.append("test Pod: a token although auth.mode is off")
        return p

    check(f"{set_name}: Deployments (args, probes, securityContext, env contract)", deployments)
    check(f"{set_name}: mutual TLS and tokens (role certificates, Secrets, DNS names, URLs)", security)
    check(f"{set_name}: the api (in-cluster URLs, only its own certificate, Service, HPA, PDB, NetworkPolicy; "
          f"{'on' if api_on else 'off: none of it'})", api)
    check(f"{set_name}: helm test Pod calls with the operator certificate and its token", test_pod_security)
    check(f"{set_name}: Redis ACL (own user, own password file, only its own Secret key)", redis_acl)
    check(f"{set_name}: Secrets (master key, Redis URLs)", secrets)
    check(f"{set_name}: Services (device LoadBalancer, ClusterIP gRPC + admin)", services)
    check(f"{set_name}: HPA and PodDisruptionBudgets", hpa_pdb)
    check(f"{set_name}: NetworkPolicy model", netpol)
    check(f"{set_name}: ServiceMonitor, dashboards, data sources, helm test Pod", extras)


def main():
    mode = sys.argv[1]
    if mode == "static":
        static(sys.argv[2], sys.argv[3])
    elif mode == "readme-table":
        print("\n".join(readme_table(sys.argv[2])))
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
