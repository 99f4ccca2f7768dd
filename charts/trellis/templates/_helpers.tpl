{{/*
Names, labels and the shared pod template for every Trellis service.
*/}}

{{- define "trellis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<chart>", or just "<release>" when the release name
already contains the chart name. Kept to 50 characters so that
"<fullname>-gateway-devices" still fits in 63.
*/}}
{{- define "trellis.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "trellis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "trellis.labels" -}}
helm.sh/chart: {{ include "trellis.chart" . }}
app.kubernetes.io/name: {{ include "trellis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trellis
trellis.dev/region: {{ .Values.region | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the whole release (every component). */}}
{{- define "trellis.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "trellis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "trellis.selectorLabels" -}}
{{ include "trellis.releaseSelectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "trellis.componentLabels" -}}
{{ include "trellis.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "trellis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trellis.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "trellis.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end }}

{{/*
In-cluster gRPC URLs of the services: the short Service name, which is one of
the dnsNames of that service's certificate (trellis.serviceDnsNames), so the
caller's TLS check of the host name holds. https with tls.mode mutual.
*/}}
{{- define "trellis.grpcScheme" -}}
{{- if eq .Values.tls.mode "mutual" }}https{{ else }}http{{ end }}
{{- end }}
{{- define "trellis.keyvaultUrl" -}}
{{ include "trellis.grpcScheme" . }}://{{ include "trellis.fullname" . }}-keyvault:7100
{{- end }}
{{- define "trellis.gatewayUrl" -}}
{{ include "trellis.grpcScheme" . }}://{{ include "trellis.fullname" . }}-gateway:7200
{{- end }}
{{- define "trellis.signerUrl" -}}
{{ include "trellis.grpcScheme" . }}://{{ include "trellis.fullname" . }}-signer:7300
{{- end }}
{{- define "trellis.otaUrl" -}}
{{ include "trellis.grpcScheme" . }}://{{ include "trellis.fullname" . }}-ota:7400
{{- end }}

{{/* Where every pod finds its role's certificate (ca.crt, tls.crt, tls.key). */}}
{{- define "trellis.tlsMountPath" -}}
/etc/trellis/tls
{{- end }}

{{/*
The Secret holding one role's certificate: (dict "root" $ "role" "gateway").
cert-manager writes <fullname>-<role>-tls; otherwise tls.existingSecrets.<role>.
*/}}
{{- define "trellis.tlsSecretName" -}}
{{- if .root.Values.tls.certManager.enabled -}}
{{ include "trellis.fullname" .root }}-{{ .role }}-tls
{{- else -}}
{{ index .root.Values.tls.existingSecrets .role }}
{{- end -}}
{{- end }}

{{/*
DNS names a service's certificate must carry: its ClusterIP Service in
every form a client may write (short, namespaced, .svc, fully qualified),
and localhost (with 127.0.0.1 as an IP SAN: kubectl port-forward and the
CLI run inside the pod). (dict "root" $ "component" "keyvault"), one per line.
*/}}
{{- define "trellis.serviceDnsNames" -}}
{{- $svc := printf "%s-%s" (include "trellis.fullname" .root) .component -}}
{{- $ns := .root.Release.Namespace -}}
{{ $svc }}
{{ $svc }}.{{ $ns }}
{{ $svc }}.{{ $ns }}.svc
{{ $svc }}.{{ $ns }}.svc.{{ .root.Values.tls.clusterDomain }}
localhost
{{- end }}

{{/*
Values the schema refuses too (kept here for --skip-schema-validation and
for a message that says what to set).
*/}}
{{- define "trellis.validateSecurity" -}}
{{- $tls := .Values.tls -}}
{{- if eq $tls.mode "mutual" -}}
{{- if $tls.certManager.enabled -}}
{{- range $role, $name := $tls.existingSecrets }}
{{- if $name }}
{{- fail (printf "tls.existingSecrets.%s is set but tls.certManager.enabled is true: use one or the other (one CA for every role)" $role) }}
{{- end }}
{{- end }}
{{- else -}}
{{- $need := list "keyvault" "gateway" "signer" "ota" -}}
{{- if .Values.tests.enabled }}{{ $need = append $need "operator" }}{{ end -}}
{{- if .Values.api.enabled }}{{ $need = append $need "api" }}{{ end -}}
{{- range $role := $need }}
{{- if not (index $tls.existingSecrets $role) }}
{{- if eq $role "api" }}
{{- fail "tls.mode is mutual but no certificate for the api (it calls the services with a certificate of role operator): set tls.certManager.enabled=true (cert-manager) or tls.existingSecrets.api to a Secret with ca.crt, tls.crt and tls.key of its own (`trellis certs issue --role operator --out DIR`), or api.enabled=false, or tls.mode=off" }}
{{- end }}
{{- fail (printf "tls.mode is mutual but no certificate for role %s: set tls.certManager.enabled=true (cert-manager) or tls.existingSecrets.%s to a Secret with ca.crt, tls.crt and tls.key (`trellis certs issue --role %s`), or tls.mode=off" $role $role $role) }}
{{- end }}
{{- end }}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "tokens") (ne $tls.mode "mutual") -}}
{{- fail "auth.mode tokens needs tls.mode mutual: the services are known to each other by their certificates (the chart does not hand out service tokens); set tls.mode=mutual, or auth.mode=off as well" }}
{{- end -}}
{{- end }}

{{/* The Secret (key token) the helm test Pod's API token comes from. */}}
{{- define "trellis.testTokenSecretName" -}}
{{- default (printf "%s-test-token" (include "trellis.fullname" .)) .Values.auth.existingTokenSecret }}
{{- end }}

{{- define "trellis.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else }}
{{- include "trellis.fullname" . }}-redis
{{- end }}
{{- end }}

{{/*
Redis ACL users (redis.acl): each service connects as trellis-<service>
(the names `trellis redis acl` prints) with the password in its own key,
<service>.password, of redis.acl.existingSecret, mounted here.
*/}}
{{- define "trellis.redisPasswordDir" -}}
/var/run/trellis/redis
{{- end }}

{{/*
The Secret with the services' Redis passwords; the chart refuses to render
without it when redis.acl.enabled, and refuses chart-made URLs that name a
user or password (the binary puts redis.username and the password only into
URLs that carry no credentials, so the ACL user would silently not be used).
*/}}
{{- define "trellis.redisAclSecretName" -}}
{{- if not .Values.redis.existingSecret }}
{{- range $key, $url := dict "redis.url" .Values.redis.url "redis.durableUrl" .Values.redis.durableUrl }}
{{- if regexMatch "^[^:/]+://[^/?#]*@" $url }}
{{- fail (printf "redis.acl.enabled is true but %s names a user or password (user:password@): the service would connect with those instead of its ACL user; remove them from the URL (the password comes from redis.acl.existingSecret)" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- required "redis.acl.enabled is true but redis.acl.existingSecret is empty: make the users and their passwords (trellis redis acl --passwords redis-passwords > users.acl, load users.acl into Redis), store the passwords as a Secret with keys keyvault.password, gateway.password, signer.password, ota.password and api.password (kubectl create secret generic trellis-redis-acl --from-file=redis-passwords/) and set redis.acl.existingSecret=trellis-redis-acl; or set redis.acl.enabled=false" .Values.redis.acl.existingSecret }}
{{- end }}

{{- define "trellis.masterKeySecretName" -}}
{{- if .Values.keyvault.masterKey.existingSecret }}
{{- .Values.keyvault.masterKey.existingSecret }}
{{- else }}
{{- include "trellis.fullname" . }}-master-key
{{- end }}
{{- end }}

{{/*
Environment every service reads (figment: TRELLIS_ prefix, "__" between
sections). The binary refuses unknown TRELLIS_* keys, so only documented ones
are set here, and pods run with enableServiceLinks: false (Kubernetes would
otherwise inject TRELLIS_KEYVAULT_SERVICE_HOST and friends for a release
named "trellis"). (dict "root" $ "redis" bool): the Redis settings only for
the services that use Redis (all of them; the api since webhooks).
*/}}
{{- define "trellis.commonEnv" -}}
{{- $redis := .redis -}}
{{- with .root -}}
- name: TRELLIS_REGION
  value: {{ .Values.region | quote }}
- name: TRELLIS_DATA_DIR
  value: /var/lib/trellis
{{- if $redis }}
- name: TRELLIS_REDIS__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "trellis.redisSecretName" . }}
      key: {{ if .Values.redis.existingSecret }}{{ .Values.redis.urlKey }}{{ else }}redis-url{{ end }}
{{- if or .Values.redis.existingSecret .Values.redis.durableUrl }}
- name: TRELLIS_REDIS__DURABLE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "trellis.redisSecretName" . }}
      key: {{ if .Values.redis.existingSecret }}{{ .Values.redis.durableUrlKey }}{{ else }}redis-durable-url{{ end }}
      optional: true
{{- end }}
{{- if .Values.redis.sentinel.enabled }}
- name: TRELLIS_REDIS__SENTINEL_MASTER
  value: {{ .Values.redis.sentinel.masterName | quote }}
- name: TRELLIS_REDIS__SENTINELS
  value: {{ join "," .Values.redis.sentinel.addresses | quote }}
{{- end }}
{{- end }}
{{- with .Values.telemetry.otlpEndpoint }}
- name: TRELLIS_TELEMETRY__OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: TRELLIS_AUTH__MODE
  value: {{ .Values.auth.mode | quote }}
- name: TRELLIS_TLS__MODE
  value: {{ .Values.tls.mode | quote }}
{{- if eq .Values.tls.mode "mutual" }}
- name: TRELLIS_TLS__CA_FILE
  value: {{ include "trellis.tlsMountPath" . }}/ca.crt
- name: TRELLIS_TLS__CERT_FILE
  value: {{ include "trellis.tlsMountPath" . }}/tls.crt
- name: TRELLIS_TLS__KEY_FILE
  value: {{ include "trellis.tlsMountPath" . }}/tls.key
{{- end }}
- name: TRELLIS_TELEMETRY__LOG
  value: {{ .Values.telemetry.log | quote }}
- name: TRELLIS_TELEMETRY__ADMIN_LISTEN
  value: "0.0.0.0:9100"
- name: TRELLIS_TELEMETRY__ENVIRONMENT
  value: {{ .Values.telemetry.environment | quote }}
{{- end }}
{{- end }}

{{/*
One Deployment. Called with (dict "root" $ "component" "gateway"
"values" .Values.gateway "env" <yaml list string> "ports" <yaml list string>
"volumes" <yaml> "volumeMounts" <yaml> "noReplicas" bool "noRedis" bool).
noRedis: a service that never talks to Redis gets no Redis URL, user,
password file or Secret checksum (none does now: the api keeps webhooks in
Redis).
*/}}
{{- define "trellis.deployment" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $sel := dict "root" $root "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "trellis.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "trellis.componentLabels" $sel | nindent 4 }}
spec:
  {{- if not .noReplicas }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  selector:
    matchLabels:
      {{- include "trellis.selectorLabels" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "trellis.componentLabels" $sel | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or (not .noRedis) $v.podAnnotations }}
      annotations:
        {{- if not .noRedis }}
        checksum/redis: {{ include (print $root.Template.BasePath "/secret-redis.yaml") $root | sha256sum | trunc 16 }}
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "trellis.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.automountServiceAccountToken }}
      # The binary's configuration refuses unknown TRELLIS_* variables; Service
      # links would add TRELLIS_<SVC>_SERVICE_HOST for a release named trellis.
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "trellis.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: [{{ .component | quote }}]
          ports:
            {{- .ports | nindent 12 }}
            - name: admin
              containerPort: 9100
              protocol: TCP
          env:
            {{- include "trellis.commonEnv" (dict "root" $root "redis" (not .noRedis)) | nindent 12 }}
            {{- if and $root.Values.redis.acl.enabled (not .noRedis) }}
            - name: TRELLIS_REDIS__USERNAME
              value: {{ printf "trellis-%s" .component | quote }}
            - name: TRELLIS_REDIS__PASSWORD_FILE
              value: {{ printf "%s/%s.password" (include "trellis.redisPasswordDir" $root) .component | quote }}
            {{- end }}
            {{- .env | nindent 12 }}
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            httpGet:
              path: /healthz
              port: admin
            periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
            failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: admin
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: admin
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: /var/lib/trellis
            - name: tmp
              mountPath: /tmp
            {{- if eq $root.Values.tls.mode "mutual" }}
            - name: tls
              mountPath: {{ include "trellis.tlsMountPath" $root }}
              readOnly: true
            {{- end }}
            {{- if and $root.Values.redis.acl.enabled (not .noRedis) }}
            - name: redis-password
              mountPath: {{ include "trellis.redisPasswordDir" $root }}
              readOnly: true
            {{- end }}
            {{- with .volumeMounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: data
          emptyDir:
            sizeLimit: 256Mi
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- if eq $root.Values.tls.mode "mutual" }}
        # This service's own certificate (its role is the URI SAN) and the CA;
        # readable by the pod's group (fsGroup), nobody else.
        - name: tls
          secret:
            secretName: {{ include "trellis.tlsSecretName" (dict "root" $root "role" .component) }}
            defaultMode: 0440
            items:
              - key: ca.crt
                path: ca.crt
              - key: tls.crt
                path: tls.crt
              - key: tls.key
                path: tls.key
        {{- end }}
        {{- if and $root.Values.redis.acl.enabled (not .noRedis) }}
        # This service's Redis ACL password and no other service's (items):
        # a gateway pod never holds keyvault's. Mode 0400; the kubelet adds
        # group read for fsGroup, the trellis user's group.
        - name: redis-password
          secret:
            secretName: {{ include "trellis.redisAclSecretName" $root }}
            defaultMode: 0400
            items:
              - key: {{ .component }}.password
                path: {{ .component }}.password
        {{- end }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- range . }}
        - {{- toYaml (omit . "labelSelector") | nindent 10 }}
          labelSelector:
            {{- if .labelSelector }}
            {{- toYaml .labelSelector | nindent 12 }}
            {{- else }}
            matchLabels:
              {{- include "trellis.selectorLabels" $sel | nindent 14 }}
            {{- end }}
        {{- end }}
      {{- end }}
{{- end }}

{{/* One PodDisruptionBudget: (dict "root" $ "component" "x" "values" .Values.x). */}}
{{- define "trellis.pdb" -}}
{{- $sel := dict "root" .root "component" .component -}}
{{- if .values.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "trellis.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "trellis.componentLabels" $sel | nindent 4 }}
spec:
  {{- if ne (toString .values.pdb.minAvailable) "" }}
  minAvailable: {{ .values.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .values.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "trellis.selectorLabels" $sel | nindent 6 }}
{{- end }}
{{- end }}

{{/* One ClusterIP Service: (dict "root" $ "component" "x" "port" 7100), its
gRPC port named grpc; "portName" "http" "appProtocol" "http" for the api. */}}
{{- define "trellis.service" -}}
{{- $sel := dict "root" .root "component" .component }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "trellis.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "trellis.componentLabels" $sel | nindent 4 }}
    trellis.dev/scrape: "true"
spec:
  type: ClusterIP
  selector:
    {{- include "trellis.selectorLabels" $sel | nindent 4 }}
  ports:
    - name: {{ default "grpc" .portName }}
      port: {{ .port }}
      targetPort: {{ default "grpc" .portName }}
      protocol: TCP
      appProtocol: {{ default "grpc" .appProtocol }}
    - name: admin
      port: 9100
      targetPort: admin
      protocol: TCP
      appProtocol: http
{{- end }}
