{{/* Names are truncated to 63 chars: DNS-1123 label limit for Service names. */}}
{{- define "dex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dexserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels for one component (gateway | worker | redis). Immutable once deployed. */}}
{{- define "dex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dex.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dex.componentLabels" -}}
{{ include "dex.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dex.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{- define "dex.workerServiceAccountName" -}}
{{- if .Values.worker.serviceAccount.create -}}
{{- default (printf "%s-worker" (include "dex.fullname" .)) .Values.worker.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.worker.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dex.redisHost" -}}
{{- printf "%s-redis" (include "dex.fullname" .) -}}
{{- end -}}

{{/* Secret holding the Redis password (internal) or url/address/password (external). */}}
{{- define "dex.redisSecretName" -}}
{{- if .Values.redis.internal.enabled -}}
{{- default (printf "%s-redis" (include "dex.fullname" .)) .Values.redis.internal.auth.existingSecret -}}
{{- else -}}
{{- required "redis.external.existingSecret is required when redis.internal.enabled=false" .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "dex.redisPasswordKey" -}}
{{- if .Values.redis.internal.enabled -}}
{{- .Values.redis.internal.auth.passwordKey -}}
{{- else -}}
{{- .Values.redis.external.passwordKey -}}
{{- end -}}
{{- end -}}

{{/*
Redis connection env shared by gateway and worker. REDIS_ADDRESS (host:port) is what
KEDA's redis-streams trigger reads through addressFromEnv; REDIS_URL is what the
processes use. Internal mode builds the URL with $(REDIS_PASSWORD) dependent expansion.
*/}}
{{- define "dex.redisEnv" -}}
{{- if .Values.redis.internal.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dex.redisSecretName" . }}
      key: {{ include "dex.redisPasswordKey" . }}
- name: REDIS_ADDRESS
  value: {{ printf "%s:6379" (include "dex.redisHost" .) | quote }}
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "dex.redisHost" .) | quote }}
{{- else }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dex.redisSecretName" . }}
      key: {{ .Values.redis.external.passwordKey }}
      optional: true
- name: REDIS_ADDRESS
  valueFrom:
    secretKeyRef:
      name: {{ include "dex.redisSecretName" . }}
      key: {{ .Values.redis.external.addressKey }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "dex.redisSecretName" . }}
      key: {{ .Values.redis.external.urlKey }}
{{- end }}
- name: DEX_QUEUE_PREFIX
  value: {{ .Values.queue.prefix | quote }}
- name: DEX_RESUME_GRACE_S
  value: {{ .Values.queue.resumeGraceSeconds | quote }}
{{- include "dex.limitsEnv" . }}
{{- end -}}

{{/* Serving limits: one value, the same environment for the gateway and every worker
     (read by dexserve.commands.options, the one definition of the limits). */}}
{{- define "dex.limitsEnv" }}
- name: DEX_MAX_CONTEXT
  value: {{ .Values.serving.maxContext | quote }}
- name: DEX_MAX_NEW_TOKENS
  value: {{ .Values.serving.maxNewTokens | quote }}
{{- end -}}

{{/* Stream and group the workers read: must match dexserve.queue.protocol (tested). */}}
{{- define "dex.requestStream" -}}
{{- printf "%s:requests" .Values.queue.prefix -}}
{{- end -}}
{{- define "dex.consumerGroup" -}}
dex-workers
{{- end -}}

{{- define "dex.otelEnv" -}}
{{- if .root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .root.Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .root.Values.otel.protocol | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "dexserve-%s" .component | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,service.version=%s,deployment.environment=%s,k8s.namespace.name=$(DEX_POD_NAMESPACE),k8s.pod.name=$(DEX_POD_NAME)%s" .root.Release.Namespace .root.Chart.AppVersion .root.Values.otel.environment (ternary (printf ",%s" .root.Values.otel.resourceAttributes) "" (ne .root.Values.otel.resourceAttributes "")) | quote }}
{{- end -}}

{{- define "dex.podEnv" -}}
- name: DEX_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: DEX_POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{- define "dex.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dex.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dex.prometheusAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: "/metrics"
{{- end }}
{{- end -}}

{{/*
The release's one model (values `model`): the same volume, mount and DEX_MODEL_DIR in the
gateway and every worker. Sources follow what vLLM's and KServe's charts offer: an existing
PVC, a hostPath, or an init container that fills an emptyDir (KServe's storage initializer:
copy from a model image or sync from object storage). `shipped`: the model baked into the images.
*/}}
{{- define "dex.modelMountPath" -}}/models{{- end -}}

{{- define "dex.modelDir" -}}
{{- $m := .Values.model -}}
{{- if ne $m.source "shipped" -}}
{{- if $m.subPath -}}{{ printf "%s/%s" (include "dex.modelMountPath" .) (trimSuffix "/" $m.subPath) }}{{- else -}}{{ include "dex.modelMountPath" . }}{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dex.modelEnv" -}}
{{- with include "dex.modelDir" . }}
- name: DEX_MODEL_DIR
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "dex.modelVolumeMounts" -}}
{{- if ne .Values.model.source "shipped" }}
- name: model
  mountPath: {{ include "dex.modelMountPath" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "dex.modelVolumes" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required with model.source=pvc" $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required with model.source=hostPath" $m.hostPath.path }}
    {{- with $m.hostPath.type }}
    type: {{ . }}
    {{- end }}
{{- else if eq $m.source "initContainer" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.initContainer.sizeLimit }}
{{- end }}
{{- end -}}

{{/*
Boundary adapters (values `model.adapters`), workers only: DEX_ADAPTERS is auto, none, or the
adapter file, a relative path resolved under /adapters (its own PVC) or else under /models.
*/}}
{{- define "dex.adaptersEnv" -}}
{{- $a := .Values.model.adapters -}}
{{- $p := $a.path -}}
{{- if or (eq $p "auto") (eq $p "none") (hasPrefix "/" $p) -}}
{{- else if $a.pvc.claimName -}}
{{- $p = printf "/adapters/%s" $p -}}
{{- else if ne .Values.model.source "shipped" -}}
{{- $p = printf "%s/%s" (include "dex.modelMountPath" .) $p -}}
{{- else -}}
{{- fail "model.adapters.path: a relative path needs model.adapters.pvc.claimName or a model volume (model.source other than shipped)" -}}
{{- end }}
- name: DEX_ADAPTERS
  value: {{ $p | quote }}
{{- end -}}

{{- define "dex.adaptersVolumeMounts" -}}
{{- if .Values.model.adapters.pvc.claimName }}
- name: adapters
  mountPath: /adapters
  readOnly: true
{{- end }}
{{- end -}}

{{- define "dex.adaptersVolumes" -}}
{{- with .Values.model.adapters.pvc.claimName }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "dex.modelInitContainers" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "initContainer" }}
- name: model-init
  image: {{ required "model.initContainer.image is required with model.source=initContainer" $m.initContainer.image | quote }}
  {{- with $m.initContainer.command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.initContainer.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - name: DEX_MODEL_DIR
      value: {{ include "dex.modelDir" . | quote }}
    - name: HOME
      value: /tmp
    {{- with $m.initContainer.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $m.initContainer.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "dex.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ include "dex.modelMountPath" . }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/*
Worker engine settings → the environment `dex worker` reads (dexserve.launch.engine_options).
gpu.enabled + placement perExplorer: K explorers, distributed executor, rank k on cuda:k, NCCL.
gpu.enabled + placement shared: one process, all K explorers on cuda:0.
no GPU: cpu with engine.executor / engine.transport (one explorer: one process).
*/}}
{{- define "dex.workerGpuCount" -}}
{{- if eq .Values.worker.gpu.placement "shared" -}}1{{- else -}}{{ .Values.worker.explorers }}{{- end -}}
{{- end -}}

{{- define "dex.workerEngineEnv" -}}
{{- $w := .Values.worker -}}
{{- $e := $w.engine -}}
{{- $device := "cpu" -}}
{{- $executor := $e.executor -}}
{{- $transport := $e.transport -}}
{{- if $w.gpu.enabled -}}
{{- $device = "cuda" -}}
{{- if and (eq $w.gpu.placement "perExplorer") (gt (int $w.explorers) 1) -}}
{{- $executor = "distributed" -}}
{{- $transport = "torch" -}}
{{- else -}}
{{- $executor = "reference" -}}
{{- $transport = "auto" -}}
{{- end -}}
{{- else if le (int $w.explorers) 1 -}}
{{- $executor = "reference" -}}
{{- end }}
- name: DEX_DEVICE
  value: {{ $device | quote }}
- name: DEX_EXECUTOR
  value: {{ $executor | quote }}
- name: DEX_TRANSPORT
  value: {{ $transport | quote }}
- name: DEX_EXPLORERS
  value: {{ $w.explorers | quote }}
- name: DEX_WIDTH
  value: {{ $e.width | quote }}
- name: DEX_MAX_BATCH
  value: {{ $e.maxBatch | quote }}
{{- if $e.kvMemoryGiB }}
- name: DEX_KV_MEMORY
  value: {{ $e.kvMemoryGiB | quote }}
{{- end }}
- name: DEX_DTYPE
  value: {{ $e.dtype | quote }}
{{- if $e.threads }}
- name: DEX_THREADS
  value: {{ $e.threads | quote }}
{{- end }}
{{- if $w.gpu.enabled }}
{{- range $k, $v := $w.gpu.ncclEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}
{{- /* Read-only root filesystem: every cache torch, Triton and Inductor write goes to /tmp. */}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: TRITON_CACHE_DIR
  value: /tmp/.cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/.cache/inductor
{{- end -}}

{{- define "dex.workerArgs" -}}
{{- $e := .Values.worker.engine -}}
{{- $args := list "worker" -}}
{{- if $e.compile }}{{ $args = append $args "--compile" }}{{ end -}}
{{- if not $e.cudaGraphs }}{{ $args = append $args "--no-cuda-graphs" }}{{ end -}}
{{- toJson $args -}}
{{- end -}}
