{{/*
Names. Kubernetes names are cut to 63 characters; the RayService name to 47 (KubeRay refuses longer
ones: its RayCluster is `<name>-xxxxx` and must stay within 53).
*/}}
{{- define "hybridserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hybridserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hybridserve.rayServiceName" -}}
{{- include "hybridserve.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "hybridserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels. */}}
{{- define "hybridserve.labels" -}}
helm.sh/chart: {{ include "hybridserve.chart" . }}
{{ include "hybridserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hybridserve
{{- end }}

{{- define "hybridserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hybridserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Pod labels and the selector of the chart's Service and PDB. Pods do not carry `app.kubernetes.io/name`:
KubeRay labels them `app.kubernetes.io/name: kuberay` and its `<name>-head-svc` of a RayService selects
on that value, so overriding it would leave that Service without endpoints.
*/}}
{{- define "hybridserve.podSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: hybridserve
{{- end }}

{{- define "hybridserve.podLabels" -}}
helm.sh/chart: {{ include "hybridserve.chart" . }}
{{ include "hybridserve.podSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "hybridserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{- define "hybridserve.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "hybridserve.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* Devices (GPUs on GPU workers, actors on CPU ones) of one model replica. */}}
{{- define "hybridserve.devicesPerReplica" -}}
{{- mul (int .Values.serve.pipelineParallelSize) (int .Values.serve.expertParallelSize) }}
{{- end }}

{{- define "hybridserve.workerSleepSeconds" -}}
{{- if kindIs "invalid" .Values.workerPreStopSleepSeconds }}
{{- int .Values.drainTimeoutSeconds }}
{{- else }}
{{- int .Values.workerPreStopSleepSeconds }}
{{- end }}
{{- end }}

{{/*
Rules across values that values.schema.json cannot express. Each `fail` names the values involved.
*/}}
{{- define "hybridserve.validate" -}}
{{- $name := include "hybridserve.rayServiceName" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayService name %q (from the release name or fullnameOverride) must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter" $name) }}
{{- end }}
{{- $min := int .Values.replicas.min }}
{{- $max := int .Values.replicas.max }}
{{- if gt $min $max }}
{{- fail (printf "replicas.min (%d) must not exceed replicas.max (%d)" $min $max) }}
{{- end }}
{{- $pp := int .Values.serve.pipelineParallelSize }}
{{- $ep := int .Values.serve.expertParallelSize }}
{{- $devices := mul $pp $ep }}
{{- $gpuMin := 0 }}
{{- $gpuMax := 0 }}
{{- $gpuGroups := list }}
{{- range $group, $g := .Values.workerGroups }}
{{- if gt (int $g.minWorkers) (int $g.maxWorkers) }}
{{- fail (printf "workerGroups.%s.minWorkers (%d) must not exceed workerGroups.%s.maxWorkers (%d)" $group (int $g.minWorkers) $group (int $g.maxWorkers)) }}
{{- end }}
{{- $gpus := int $g.gpusPerWorker }}
{{- if gt $gpus 0 }}
{{- $gpuGroups = append $gpuGroups $group }}
{{- if not (or (eq (mod $devices $gpus) 0) (eq (mod $gpus $devices) 0)) }}
{{- fail (printf "serve.pipelineParallelSize x serve.expertParallelSize = %d x %d = %d GPUs per replica must divide workerGroups.%s.gpusPerWorker (%d) or be a multiple of it, so that replicas tile the workers' GPUs" $pp $ep $devices $group $gpus) }}
{{- end }}
{{- $gpuMin = add $gpuMin (mul $gpus (int $g.minWorkers)) }}
{{- $gpuMax = add $gpuMax (mul $gpus (int $g.maxWorkers)) }}
{{- end }}
{{- end }}
{{- if $gpuGroups }}
{{- if lt $gpuMax (mul $max $devices) }}
{{- fail (printf "replicas.max (%d) x %d GPUs per replica (serve.pipelineParallelSize x serve.expertParallelSize) = %d GPUs, but the GPU worker groups (%s) have at most %d (sum of maxWorkers x gpusPerWorker)" $max $devices (mul $max $devices) (join ", " $gpuGroups) $gpuMax) }}
{{- end }}
{{- if lt $gpuMin (mul $min $devices) }}
{{- fail (printf "replicas.min (%d) x %d GPUs per replica (serve.pipelineParallelSize x serve.expertParallelSize) = %d GPUs, but the GPU worker groups (%s) start with %d (sum of minWorkers x gpusPerWorker): a replica's placement group waits only 120 s for Ray's autoscaler, so raise minWorkers" $min $devices (mul $min $devices) (join ", " $gpuGroups) $gpuMin) }}
{{- end }}
{{- end }}
{{- if not .Values.workerGroups }}
{{- fail "workerGroups: at least one worker group is needed (the head runs no model replica: num-cpus 0)" }}
{{- end }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $drain := int .Values.drainTimeoutSeconds }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than drainTimeoutSeconds (%d): Kubernetes kills the head at the end of the grace period, in the middle of `hybridserve drain`" $grace $drain) }}
{{- end }}
{{- $sleep := int (include "hybridserve.workerSleepSeconds" .) }}
{{- if le $grace $sleep }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than workerPreStopSleepSeconds (%d)" $grace $sleep) }}
{{- end }}
{{- $owned := list "host" "port" "grpc_port" "http_server" "replica_num_gpus" "min_replicas" "max_replicas" "target_ongoing_requests" "autoscaling_config" "app_name" "api_key" }}
{{- range $k, $_ := .Values.serve.extraArgs }}
{{- if has ($k | replace "-" "_") $owned }}
{{- fail (printf "serve.extraArgs.%s: set by the chart (use ports, replicas, autoscaling, serve.appName or apiKey instead)" $k) }}
{{- end }}
{{- end }}
{{- if and .Values.probes.grpc.enabled (eq (int .Values.ports.grpc) 0) }}
{{- fail "probes.grpc.enabled needs a gRPC server: ports.grpc is 0" }}
{{- end }}
{{- $src := .Values.model.source }}
{{- if and (eq $src.type "pvc") (not $src.pvc.claimName) }}
{{- fail "model.source.type is pvc: set model.source.pvc.claimName" }}
{{- end }}
{{- if and (eq $src.type "hostPath") (not $src.hostPath.path) }}
{{- fail "model.source.type is hostPath: set model.source.hostPath.path" }}
{{- end }}
{{- if and (eq $src.type "image") (not $src.image.reference) }}
{{- fail "model.source.type is image: set model.source.image.reference" }}
{{- end }}
{{- if eq .Values.upgradeStrategy.type "NewClusterWithIncrementalUpgrade" }}
{{- $o := .Values.upgradeStrategy.clusterUpgradeOptions }}
{{- if not (and $o.gatewayClassName $o.stepSizePercent $o.intervalSeconds) }}
{{- fail "upgradeStrategy.type NewClusterWithIncrementalUpgrade needs upgradeStrategy.clusterUpgradeOptions.gatewayClassName, stepSizePercent and intervalSeconds" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A value, with a decimal number given as a string (`helm --set` keeps decimals as strings) made a number;
as JSON `{"v": ...}` because `include` returns strings.
*/}}
{{- define "hybridserve.number" -}}
{{- if and (kindIs "string" .) (regexMatch "^-?[0-9]*\\.[0-9]+$" .) }}
{{- dict "v" (float64 .) | toJson }}
{{- else }}
{{- dict "v" . | toJson }}
{{- end }}
{{- end }}

{{/*
The Serve application's args: `hybridserve serve` options by their long names with underscores, parsed
by router/cli.py serve_args_from_dict in app_builder. camelCase keys of `serve` become snake_case.
*/}}
{{- define "hybridserve.serveArgs" -}}
{{- $args := dict }}
{{- range $k, $v := .Values.serve }}
{{- if and (ne $k "extraArgs") (ne $k "appName") (not (kindIs "invalid" $v)) (ne (toString $v) "") }}
{{- $_ := set $args (snakecase $k) (ternary (float64 $v) $v (has $k (list "gpuMemoryUtilization" "targetKvCacheUsage"))) }}
{{- end }}
{{- end }}
{{- range $k, $v := .Values.serve.extraArgs }}
{{- $_ := set $args ($k | replace "-" "_") $v }}
{{- end }}
{{- $_ := set $args "app_name" .Values.serve.appName }}
{{- /* At pp x ep = 1 the replica computes itself: on GPU workers it takes one GPU. */}}
{{- $gpuGroups := 0 }}
{{- range $_, $g := .Values.workerGroups }}{{ if and $g (gt (int $g.gpusPerWorker) 0) }}{{ $gpuGroups = add1 $gpuGroups }}{{ end }}{{ end }}
{{- $_ := set $args "replica_num_gpus" (ternary 1.0 0.0 (and (gt $gpuGroups 0) (eq (include "hybridserve.devicesPerReplica" .) "1"))) }}
{{- $_ := set $args "min_replicas" (int .Values.replicas.min) }}
{{- $_ := set $args "max_replicas" (int .Values.replicas.max) }}
{{- if not (kindIs "invalid" .Values.replicas.targetOngoingRequests) }}
{{- $_ := set $args "target_ongoing_requests" (float64 .Values.replicas.targetOngoingRequests) }}
{{- end }}
{{- /* `autoscaling`: hybridserve's own autoscaling options (--autoscaling-policy, --target-kv-cache-usage)
become args; every other key is one of Serve's autoscaling_config fields (--autoscaling-config). */}}
{{- $as := dict }}
{{- $own := dict "policy" "autoscaling_policy" "autoscaling_policy" "autoscaling_policy" "target_kv_cache_usage" "target_kv_cache_usage" }}
{{- range $k, $v := .Values.autoscaling }}
{{- $key := snakecase $k }}
{{- $v = (include "hybridserve.number" $v | fromJson).v }}
{{- if kindIs "invalid" $v }}
{{- else if and (hasKey $own $key) (not (kindIs "map" $v)) }}
{{- $arg := get $own $key }}
{{- if and (hasKey $args $arg) (ne (toString (get $args $arg)) (toString $v)) }}
{{- fail (printf "autoscaling.%s (%v) and serve.%s (%v) disagree: set one of them" $k $v (camelcase $arg | untitle) (get $args $arg)) }}
{{- end }}
{{- $_ := set $args $arg $v }}
{{- else }}
{{- $_ := set $as $key $v }}
{{- end }}
{{- end }}
{{- if $as }}
{{- $_ := set $args "autoscaling_config" $as }}
{{- end }}
{{- /* Serve's proxy listens on every node (KubeRay's serve Service and health checks expect it); the
Ingress's gRPC server listens on all interfaces of the head pod. */}}
{{- $_ := set $args "http_server" "proxy" }}
{{- $_ := set $args "host" "0.0.0.0" }}
{{- $_ := set $args "port" (int .Values.ports.http) }}
{{- $_ := set $args "grpc_port" (int .Values.ports.grpc) }}
{{- toYaml $args }}
{{- end }}

{{/* serveConfigV2: one application, Serve's HTTP proxy on every node with a replica (and the head). */}}
{{- define "hybridserve.serveConfig" -}}
http_options:
  host: 0.0.0.0
  port: {{ int .Values.ports.http }}
proxy_location: EveryNode
applications:
  - name: {{ .Values.serve.appName }}
    route_prefix: /
    import_path: router.serve_app:app_builder
    args:
      {{- include "hybridserve.serveArgs" . | nindent 6 }}
{{- end }}

{{/* Environment of every Ray container. */}}
{{- define "hybridserve.env" -}}
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
- name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
  value: "0"
{{- $secret := include "hybridserve.apiKeySecretName" . }}
{{- if $secret }}
- name: HYBRIDSERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The model volume (pod spec `volumes` entries) and its mount; nothing for source type none. */}}
{{- define "hybridserve.modelVolumes" -}}
{{- $src := .Values.model.source }}
{{- if eq $src.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $src.pvc.claimName }}
    readOnly: true
{{- else if eq $src.type "hostPath" }}
- name: model
  hostPath:
    path: {{ $src.hostPath.path }}
    type: {{ $src.hostPath.type }}
{{- else if and (eq $src.type "image") (eq $src.image.method "volume") }}
- name: model
  image:
    reference: {{ $src.image.reference }}
    pullPolicy: {{ $src.image.pullPolicy }}
{{- else if eq $src.type "image" }}
- name: model
  emptyDir: {{ if $src.image.sizeLimit }}{sizeLimit: {{ $src.image.sizeLimit | quote }}}{{ else }}{}{{ end }}
{{- end }}
{{- end }}

{{- define "hybridserve.modelMounts" -}}
{{- $src := .Values.model.source }}
{{- if ne $src.type "none" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
  {{- if and (eq $src.type "pvc") $src.pvc.subPath }}
  subPath: {{ $src.pvc.subPath }}
  {{- else if and (eq $src.type "image") (eq $src.image.method "volume") (ne (trimPrefix "/" $src.image.path) "") }}
  subPath: {{ trimPrefix "/" $src.image.path }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Init container copying the checkpoint out of the model image (model.source.image.method copy). */}}
{{- define "hybridserve.modelInitContainers" -}}
{{- $src := .Values.model.source }}
{{- if and (eq $src.type "image") (eq $src.image.method "copy") }}
- name: copy-model
  image: {{ $src.image.reference }}
  imagePullPolicy: {{ $src.image.pullPolicy }}
  command: ["cp", "-a", "{{ trimSuffix "/" $src.image.path }}/.", "/hybridserve-model/"]
  volumeMounts:
    - name: model
      mountPath: /hybridserve-model
{{- end }}
{{- end }}

{{/* Pod-level scheduling fields of a group (nodeSelector, tolerations, affinity, pull secrets). */}}
{{- define "hybridserve.podScheduling" -}}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
