{{/*
Multi-node pools: an engine whose TP x PP ranks span several nodes runs as one
LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) group per replica. The leader is the pdserve
worker (node 0: it owns the engine, serves the Worker API and is what the router finds);
the other nodesPerReplica - 1 pods only host engine ranks and join the leader, as headless
vLLM processes (backend mp) or Ray nodes (backend ray). LWS sets LWS_LEADER_ADDRESS and
LWS_WORKER_INDEX in every pod of a group and recreates the whole group when one pod fails.
*/}}

{{- define "pdserve.worker.leaderWorkerSet" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $pool := index $root.Values $role -}}
{{- $name := include "pdserve.componentName" (dict "root" $root "component" $role) -}}
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
metadata:
  name: {{ $name }}
  labels:
    {{- include "pdserve.labels" (dict "root" $root "component" $role) | nindent 4 }}
spec:
  {{- if not (include "pdserve.worker.autoscaled" .) }}
  replicas: {{ $pool.replicas }}
  {{- end }}
  # Followers start once the leader pod exists (its address is in their environment).
  startupPolicy: LeaderCreated
  rolloutStrategy:
    type: RollingUpdate
    rollingUpdateConfiguration:
      maxUnavailable: 1
      maxSurge: 0
  {{- /* The pool's headless Service has this name already: LWS then creates none, and
         leader pods keep the DNS names <name>-<i>.<name> that static discovery lists. */}}
  leaderWorkerTemplate:
    size: {{ $pool.multiNode.nodesPerReplica }}
    restartPolicy: RecreateGroupOnPodRestart
    leaderTemplate:
      {{- include "pdserve.worker.podTemplate" . | nindent 6 }}
    workerTemplate:
      {{- include "pdserve.worker.followerPodTemplate" . | nindent 6 }}
{{- end -}}

{{/* A follower pod: engine ranks only. It has no pdserve.io/role label, so the router's
Kubernetes discovery (which selects on it) sees only leaders. */}}
{{- define "pdserve.worker.followerPodTemplate" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $pool := index $root.Values $role -}}
{{- $w := $root.Values.workers -}}
{{- $mn := $pool.multiNode -}}
metadata:
  labels:
    {{- include "pdserve.labels" (dict "root" $root "component" $role) | nindent 4 }}
    pdserve.io/group-member: {{ $role }}
    {{- with $pool.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $pool.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
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
    - name: engine-ranks
      image: {{ include "pdserve.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if eq $mn.backend "ray" }}
      command: [ray]
      args:
        - start
        - --address=$(LWS_LEADER_ADDRESS):{{ $mn.port }}
        - --block
      {{- else }}
      command: [vllm]
      args:
        - serve
        - {{ $root.Values.model.path }}
        - --headless
        - --nnodes={{ $mn.nodesPerReplica }}
        - --node-rank=$(LWS_WORKER_INDEX)
        - --master-addr=$(LWS_LEADER_ADDRESS)
        - --master-port={{ $mn.port }}
        - --distributed-executor-backend=mp
        - --tensor-parallel-size={{ $pool.tensorParallelSize }}
        - --pipeline-parallel-size={{ $pool.pipelineParallelSize }}
        - --max-model-len={{ $root.Values.model.maxModelLen }}
        - --dtype={{ $root.Values.model.dtype }}
        - {{ printf "--kv-transfer-config=%s" (include "pdserve.worker.followerKvConfig" .) | quote }}
      {{- end }}
      env:
        {{- include "pdserve.commonEnv" $root | nindent 8 }}
        # This group's index: the leader pod, whose name is the NIXL engine id, is <name>-<index>.
        - name: GROUP_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['leaderworkerset.sigs.k8s.io/group-index']
        # pdserve's vLLM fixes (kv_transfer/vllm_patches.py, a vLLM plugin in the image) are
        # active only where this is set; `pdserve worker` sets it for the leader's ranks.
        - name: PDSERVE_VLLM_PATCHES
          value: "1"
        # The NIXL side channel of this node's ranks (kvPort + local rank), as on the leader.
        - name: VLLM_NIXL_SIDE_CHANNEL_HOST
          value: $(POD_IP)
        - name: VLLM_NIXL_SIDE_CHANNEL_PORT
          value: {{ $w.kvPort | quote }}
        {{- with $pool.env }}
        {{- toYaml . | nindent 8 }}
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

{{/* vLLM's KVTransferConfig of a follower's ranks: the leader's engine config, i.e.
kv_transfer.nixl.NixlTransport.engine_kv_config for the leader's worker id (a unit test
compares the two). The prefill engine holds read-pending blocks 15 s past the lease:
kv_transfer.base CONSUMER_GRACE_S + PRODUCER_HOLD_MARGIN_S. */}}
{{- define "pdserve.worker.followerKvConfig" -}}
{{- $root := .root -}}
{{- $name := include "pdserve.componentName" (dict "root" $root "component" .role) -}}
{{- $w := $root.Values.workers -}}
{{- $extra := dict "kv_lease_duration" (add (int $w.kvLeaseSeconds) 15) -}}
{{- $config := dict "kv_connector" "NixlConnector" "kv_role" "kv_both" "kv_buffer_device" "cpu" "engine_id" (printf "%s-$(GROUP_INDEX)" $name) "kv_load_failure_policy" "fail" "kv_connector_extra_config" $extra -}}
{{- toJson $config -}}
{{- end -}}

{{/* What an HPA or a KEDA ScaledObject scales: the pool's Deployment, or its
LeaderWorkerSet (which has a scale subresource counting groups). */}}
{{- define "pdserve.worker.scaleTarget" -}}
{{- $pool := index .root.Values .role -}}
{{- if $pool.multiNode.enabled -}}
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
{{- else -}}
apiVersion: apps/v1
kind: Deployment
{{- end -}}
{{- end -}}

{{/* Non-empty when an HPA or a KEDA ScaledObject owns the pool's replica count. */}}
{{- define "pdserve.worker.autoscaled" -}}
{{- $pool := index .root.Values .role -}}
{{- if or $pool.autoscaling.enabled $pool.keda.enabled -}}true{{- end -}}
{{- end -}}
