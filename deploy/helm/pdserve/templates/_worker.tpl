{{/*
Worker pools. prefill-*.yaml and decode-*.yaml call these with (dict "root" $ "role" ROLE),
so both pools share one definition and differ only in their values.
*/}}

{{/* The worker's command line. */}}
{{- define "pdserve.worker.args" -}}
{{- $root := .root -}}
{{- $pool := index $root.Values .role -}}
{{- $w := $root.Values.workers -}}
- worker
- --role={{ .role }}
- --model={{ $root.Values.model.path }}
- --served-model-name={{ include "pdserve.servedModelName" $root }}
{{- /* Unique per pod: it is also the NIXL engine id the decode side pulls from. */}}
- --worker-id=$(POD_NAME)
{{- /* Not 0.0.0.0: the prefill worker advertises this host to decode workers as its
       NIXL side-channel address, so it must be an address other pods can reach. */}}
- --host=$(POD_IP)
- --port={{ $w.grpcPort }}
- --metrics-port={{ $w.metricsPort }}
- --kv-transport={{ $w.kvTransport }}
- --kv-port={{ $w.kvPort }}
- --kv-lease-s={{ $w.kvLeaseSeconds }}
{{- /* Pods do not share /dev/shm, so grpc KV always crosses the network here; staging it
       in /dev/shm would only spend the engine ranks' shared memory (ADR 0015). */}}
- --no-kv-shared-memory
- --tensor-parallel-size={{ $pool.tensorParallelSize }}
- --pipeline-parallel-size={{ $pool.pipelineParallelSize }}
{{- if $pool.multiNode.enabled }}
{{- /* This worker is node 0 of its LeaderWorkerSet group; LWS sets LWS_LEADER_ADDRESS. */}}
- --nnodes={{ $pool.multiNode.nodesPerReplica }}
- --distributed-executor-backend={{ $pool.multiNode.backend }}
{{- if eq $pool.multiNode.backend "mp" }}
- --master-addr=$(LWS_LEADER_ADDRESS)
- --master-port={{ $pool.multiNode.port }}
{{- end }}
{{- end }}
- --max-model-len={{ $root.Values.model.maxModelLen }}
- --dtype={{ $root.Values.model.dtype }}
- --log-level={{ $w.logLevel }}
{{- include "pdserve.tlsArgs" $root }}
{{- if $root.Values.tls.enabled }}
- --health-port={{ $w.healthPort }}
{{- end }}
{{- range $pool.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Resources of one worker pod: the pool's, plus TP x PP GPUs when GPUs are on (divided
among the nodes of a multi-node group). */}}
{{- define "pdserve.worker.resources" -}}
{{- $root := .root -}}
{{- $pool := index $root.Values .role -}}
{{- $res := deepCopy (default dict $pool.resources) -}}
{{- if $root.Values.workers.gpu.enabled -}}
{{- $gpus := mul (int $pool.tensorParallelSize) (int $pool.pipelineParallelSize) -}}
{{- if $pool.multiNode.enabled -}}
{{- $gpus = div $gpus (int $pool.multiNode.nodesPerReplica) -}}
{{- end -}}
{{- $limits := default dict $res.limits -}}
{{- $_ := set $limits $root.Values.workers.gpu.resourceName $gpus -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* The pod template of a pool's workers (of a multi-node group's leader: the pdserve
worker that owns the engine and registers with the router). */}}
{{- define "pdserve.worker.podTemplate" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $pool := index $root.Values $role -}}
{{- $w := $root.Values.workers -}}
metadata:
  labels:
    {{- include "pdserve.labels" (dict "root" $root "component" $role) | nindent 4 }}
    pdserve.io/role: {{ $role }}
    {{- with $pool.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $pool.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  # Workers never call the Kubernetes API.
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: worker
      image: {{ include "pdserve.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if and $pool.multiNode.enabled (eq $pool.multiNode.backend "ray") }}
      # The Ray head of this group; the other pods join it, then vLLM places its ranks.
      command:
        - /bin/sh
        - -c
        - ray start --head --port={{ $pool.multiNode.port }} && exec pdserve "$@"
        - pdserve
      {{- else }}
      command: [pdserve]
      {{- end }}
      args:
        {{- include "pdserve.worker.args" . | nindent 8 }}
      env:
        {{- include "pdserve.commonEnv" $root | nindent 8 }}
        {{- with $pool.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $w.grpcPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $w.metricsPort }}
          protocol: TCP
        - name: kv
          containerPort: {{ $w.kvPort }}
          protocol: TCP
        {{- if $root.Values.tls.enabled }}
        - name: health
          containerPort: {{ $w.healthPort }}
          protocol: TCP
        {{- end }}
      {{- /* With mTLS the Worker API port wants a client certificate the kubelet
             lacks: probe the plaintext health-only port, which mirrors its status. */}}
      {{- $probePort := ternary $w.healthPort $w.grpcPort $root.Values.tls.enabled }}
      # The gRPC server opens only after the engine has loaded, and the standard
      # grpc.health.v1 service turns NOT_SERVING when the worker starts draining.
      startupProbe:
        grpc:
          port: {{ $probePort }}
        periodSeconds: {{ $w.startupProbe.periodSeconds }}
        failureThreshold: {{ $w.startupProbe.failureThreshold }}
      readinessProbe:
        grpc:
          port: {{ $probePort }}
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 2
      livenessProbe:
        grpc:
          port: {{ $probePort }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      {{- if gt (int $w.preStopSleepSeconds) 0 }}
      lifecycle:
        # Let the router and endpoints see the pod leave before SIGTERM starts the drain.
        preStop:
          exec:
            command: [sleep, {{ $w.preStopSleepSeconds | quote }}]
      {{- end }}
      resources:
        {{- include "pdserve.worker.resources" . | nindent 8 }}
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "pdserve.commonVolumeMounts" $root | nindent 8 }}
        - name: dshm
          mountPath: /dev/shm
  volumes:
    {{- include "pdserve.commonVolumes" $root | nindent 4 }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $w.shmSize }}
  {{- with $pool.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pool.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pool.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* The pool's workload: a StatefulSet for a static worker list (stable pod DNS names
the router's flags can name), a Deployment when the router discovers pods itself. */}}
{{- define "pdserve.worker.workload" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $pool := index $root.Values $role -}}
{{- $w := $root.Values.workers -}}
{{- $name := include "pdserve.componentName" (dict "root" $root "component" $role) -}}
{{- $k8s := include "pdserve.kubernetesDiscovery" $root -}}
{{- include "pdserve.validate" $root -}}
{{- if $pool.multiNode.enabled -}}
{{- include "pdserve.worker.leaderWorkerSet" . -}}
{{- else -}}
apiVersion: apps/v1
kind: {{ if $k8s }}Deployment{{ else }}StatefulSet{{ end }}
metadata:
  name: {{ $name }}
  labels:
    {{- include "pdserve.labels" (dict "root" $root "component" $role) | nindent 4 }}
spec:
  {{- if not (include "pdserve.worker.autoscaled" .) }}
  replicas: {{ $pool.replicas }}
  {{- end }}
  {{- if not $k8s }}
  serviceName: {{ $name }}
  # Workers are independent: start and replace them all at once, not one by one.
  podManagementPolicy: Parallel
  {{- end }}
  selector:
    matchLabels:
      {{- include "pdserve.selectorLabels" (dict "root" $root "component" $role) | nindent 6 }}
  template:
    {{- include "pdserve.worker.podTemplate" . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* Headless Service of a pool: per-pod DNS names for the StatefulSet and the target the
ServiceMonitor scrapes. Not-ready pods stay listed: the router health-checks workers itself
and Prometheus should see a worker that is still loading. */}}
{{- define "pdserve.worker.service" -}}
{{- $root := .root -}}
{{- $w := $root.Values.workers -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "pdserve.componentName" (dict "root" $root "component" .role) }}
  labels:
    {{- include "pdserve.labels" (dict "root" $root "component" .role) | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "pdserve.selectorLabels" (dict "root" $root "component" .role) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $w.grpcPort }}
      targetPort: grpc
      protocol: TCP
    - name: metrics
      port: {{ $w.metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- end -}}

{{- define "pdserve.worker.hpa" -}}
{{- $root := .root -}}
{{- $pool := index $root.Values .role -}}
{{- if $pool.autoscaling.enabled -}}
{{- include "pdserve.validate" $root -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "pdserve.componentName" (dict "root" $root "component" .role) }}
  labels:
    {{- include "pdserve.labels" (dict "root" $root "component" .role) | nindent 4 }}
spec:
  scaleTargetRef:
    {{- include "pdserve.worker.scaleTarget" . | nindent 4 }}
    name: {{ include "pdserve.componentName" (dict "root" $root "component" .role) }}
  minReplicas: {{ $pool.autoscaling.minReplicas }}
  maxReplicas: {{ $pool.autoscaling.maxReplicas }}
  metrics:
    {{- toYaml $pool.autoscaling.metrics | nindent 4 }}
  {{- with $pool.autoscaling.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/* A PodDisruptionBudget for one component. Call with (dict "root" $ "component" C). */}}
{{- define "pdserve.pdb" -}}
{{- $values := index .root.Values .component -}}
{{- if $values.podDisruptionBudget.enabled -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "pdserve.componentName" . }}
  labels:
    {{- include "pdserve.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "pdserve.selectorLabels" . | nindent 6 }}
{{- end -}}
{{- end -}}
