{{/*
Object names are fixed by the deployment guide (r3e-tee-service, tee-config, tee-attestation-keys),
so the chart holds one release per namespace.
*/}}

{{- define "r3e.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object that are never part of a selector */}}
{{- define "r3e.metaLabels" -}}
helm.sh/chart: {{ include "r3e.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: r3e-faas
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of objects that belong to no single component */}}
{{- define "r3e.labels" -}}
{{ include "r3e.metaLabels" . }}
app.kubernetes.io/name: r3e-tee
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: dict "root" $ "component" "service" ["provider" "sgx"] */}}
{{- define "r3e.selectorLabels" -}}
app: r3e-tee
app.kubernetes.io/name: r3e-tee
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .provider }}
tee.r3e.io/provider: {{ . }}
{{- end }}
{{- end }}

{{/* All labels of one component's objects and pods */}}
{{- define "r3e.componentLabels" -}}
{{ include "r3e.metaLabels" .root }}
{{ include "r3e.selectorLabels" . }}
{{- end }}

{{- define "r3e.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ default "r3e-tee" .Values.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.serviceAccount.name }}
{{- end -}}
{{- end }}

{{/* image reference: dict "root" $ "override" <image override or nil> "suffix" "-sgx" */}}
{{- define "r3e.image" -}}
{{- $img := .root.Values.image -}}
{{- $o := default dict .override -}}
{{- $repo := default $img.repository $o.repository -}}
{{- $tag := "" -}}
{{- if $o.tag -}}
{{- $tag = $o.tag -}}
{{- else -}}
{{- $tag = printf "%s%s" (default .root.Chart.AppVersion $img.tag) (default "" .suffix) -}}
{{- end -}}
{{- $digest := "" -}}
{{- if $o.digest -}}
{{- $digest = $o.digest -}}
{{- else if and $img.digest (not .suffix) -}}
{{- $digest = $img.digest -}}
{{- end -}}
{{- if $digest -}}
{{ printf "%s@%s" $repo $digest }}
{{- else -}}
{{ printf "%s:%s" $repo $tag }}
{{- end -}}
{{- end }}

{{/* The worker image tag suffix per provider: the sgx and nitro build targets of deploy/Dockerfile */}}
{{- define "r3e.workerImageSuffix" -}}
{{- if eq . "sgx" }}-sgx{{ else if eq . "nitro" }}-nitro{{ end -}}
{{- end }}

{{- define "r3e.enabledProviders" -}}
{{- $out := list -}}
{{- range $name := list "sgx" "nitro" "simulation" -}}
{{- if (index $.Values.tee.providers $name).enabled -}}
{{- $out = append $out $name -}}
{{- end -}}
{{- end -}}
{{- join "," $out -}}
{{- end }}

{{/* Pod security context shared by every TEE pod */}}
{{- define "r3e.podSecurityContext" -}}
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container security context of the service and the attestation service */}}
{{- define "r3e.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/* Environment shared by every TEE container: secrets referenced by tee-config.yaml */}}
{{- define "r3e.commonEnv" -}}
- name: R3E_TEE_CONFIG
  value: /etc/r3e-tee/tee-config.yaml
- name: R3E_TEE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.tee.auth.existingSecret }}
      key: {{ .Values.tee.auth.secretKey }}
{{- if .Values.tee.store.external.enabled }}
- name: R3E_TEE_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.tee.store.external.existingSecret }}
      key: {{ .Values.tee.store.external.secretKey }}
{{- end }}
{{- $sgx := .Values.tee.providers.sgx }}
{{- if and $sgx.enabled $sgx.attestation.apiKeySecret.name }}
- name: SGX_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $sgx.attestation.apiKeySecret.name }}
      key: {{ $sgx.attestation.apiKeySecret.key }}
{{- end }}
{{- end }}

{{/* Volumes of the service and the attestation service */}}
{{- define "r3e.apiVolumes" -}}
- name: config
  configMap:
    name: tee-config
- name: admin-token
  secret:
    secretName: {{ .Values.tee.auth.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.tee.auth.secretKey }}
        path: token
{{- if eq .Values.tee.keys.kekProvider "file" }}
- name: kek
  secret:
    secretName: {{ .Values.tee.keys.file.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.tee.keys.file.secretKey }}
        path: kek.key
{{- else }}
- name: pkcs11-pin
  secret:
    secretName: {{ .Values.tee.keys.pkcs11.pinSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.tee.keys.pkcs11.pinSecret.key }}
        path: pin
{{- end }}
{{- $p := .Values.tee.providers }}
{{- if or $p.sgx.enabled $p.nitro.enabled }}
- name: attestation-keys
  secret:
    secretName: {{ .Values.tee.attestationKeys.secretName }}
    defaultMode: 0440
    items:
      {{- if $p.sgx.enabled }}
      - key: sgx-key.pem
        path: sgx-key.pem
      {{- end }}
      {{- if $p.nitro.enabled }}
      - key: nitro-key.pem
        path: nitro-key.pem
      {{- end }}
{{- end }}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- end }}

{{- define "r3e.apiVolumeMounts" -}}
- name: config
  mountPath: /etc/r3e-tee/tee-config.yaml
  subPath: tee-config.yaml
  readOnly: true
- name: admin-token
  mountPath: /etc/r3e-tee/admin
  readOnly: true
{{- if eq .Values.tee.keys.kekProvider "file" }}
- name: kek
  mountPath: /etc/r3e-tee/kek
  readOnly: true
{{- else }}
- name: pkcs11-pin
  mountPath: /etc/r3e-tee/pkcs11
  readOnly: true
{{- end }}
{{- if or .Values.tee.providers.sgx.enabled .Values.tee.providers.nitro.enabled }}
- name: attestation-keys
  mountPath: /etc/r3e-tee/keys
  readOnly: true
{{- end }}
- name: data
  mountPath: /var/lib/r3e-tee
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* HTTP probes on the named port "http" */}}
{{- define "r3e.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  initialDelaySeconds: {{ .probes.liveness.initialDelaySeconds }}
  periodSeconds: {{ .probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .probes.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ .port }}
  initialDelaySeconds: {{ .probes.readiness.initialDelaySeconds }}
  periodSeconds: {{ .probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .probes.readiness.failureThreshold }}
{{- end }}

{{/* Checks the schema cannot express */}}
{{- define "r3e.validate" -}}
{{- $t := .Values.tee -}}
{{- if and (gt (int $t.service.replicas) 1) (not $t.store.external.enabled) -}}
{{- fail "tee.service.replicas > 1 needs tee.store.external.enabled=true: the embedded SQLite database belongs to one pod" -}}
{{- end -}}
{{- if and $t.attestationService.enabled (gt (int $t.attestationService.replicas) 1) (not $t.store.external.enabled) -}}
{{- fail "tee.attestationService.replicas > 1 needs tee.store.external.enabled=true: nonces are single-use across replicas only through a shared store" -}}
{{- end -}}
{{- if and $t.service.persistence.enabled $t.store.external.enabled -}}
{{- fail "tee.service.persistence.enabled is for the embedded SQLite database; with tee.store.external.enabled it has nothing to keep" -}}
{{- end -}}
{{- if $t.attestationKeys.create -}}
{{- if and $t.providers.sgx.enabled (not $t.attestationKeys.sgxKey) -}}
{{- fail "tee.attestationKeys.create=true with the sgx provider needs tee.attestationKeys.sgxKey (a PEM private key)" -}}
{{- end -}}
{{- if and $t.providers.nitro.enabled (not $t.attestationKeys.nitroKey) -}}
{{- fail "tee.attestationKeys.create=true with the nitro provider needs tee.attestationKeys.nitroKey (a PEM private key)" -}}
{{- end -}}
{{- end -}}
{{- range $name := list "sgx" "nitro" "simulation" -}}
{{- $p := index $t.providers $name -}}
{{- if and $p.enabled $p.autoscaling.enabled (gt (int $p.autoscaling.minReplicas) (int $p.autoscaling.maxReplicas)) -}}
{{- fail (printf "tee.providers.%s.autoscaling.minReplicas must not exceed maxReplicas" $name) -}}
{{- end -}}
{{- end -}}
{{- if and $t.providers.simulation.enabled (not $t.attestation.allowSimulation) -}}
{{- fail "tee.providers.simulation.enabled=true needs tee.attestation.allowSimulation=true (UNSAFE outside development): simulated evidence is rejected otherwise" -}}
{{- end -}}
{{- end }}

{{/* The providers list of tee-config.yaml: only enabled providers appear (dict "root" $ "secrets" bool) */}}
{{- define "r3e.providersConfig" -}}
{{- $p := .root.Values.tee.providers -}}
{{- $secrets := .secrets -}}
{{- if not (include "r3e.enabledProviders" .root) -}}
providers: []
{{- else -}}
providers:
{{- if $p.sgx.enabled }}
  - name: sgx
    enabled: true
    attestation:
      service: {{ $p.sgx.attestation.service | quote }}
      {{- if and $secrets $p.sgx.attestation.apiKeySecret.name }}
      apiKey: "${SGX_API_KEY}"
      {{- end }}
      {{- if $secrets }}
      keyFile: /etc/r3e-tee/keys/sgx-key.pem
      {{- end }}
    {{- with $p.sgx.options }}
    options:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- if $p.nitro.enabled }}
  - name: nitro
    enabled: true
    attestation:
      service: {{ $p.nitro.attestation.service | quote }}
      {{- if $secrets }}
      keyFile: /etc/r3e-tee/keys/nitro-key.pem
      {{- end }}
    {{- with $p.nitro.options }}
    options:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- if $p.simulation.enabled }}
  - name: simulation
    enabled: true
    {{- with $p.simulation.options }}
    options:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- end -}}
{{- end }}
