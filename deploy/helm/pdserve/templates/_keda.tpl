{{/* An optional KEDA ScaledObject per pool (instead of the HPA; the schema refuses both):
KEDA queries Prometheus itself, so no metrics adapter is needed, and the triggers can use
the router's latency histograms (TTFT for prefill, inter-token latency for decode).
Queries are templates: {{ .Release.Namespace }} and the like work in them. */}}
{{- define "pdserve.worker.scaledObject" -}}
{{- $root := .root -}}
{{- $pool := index $root.Values .role -}}
{{- if $pool.keda.enabled -}}
{{- include "pdserve.validate" $root -}}
{{- $k := $pool.keda -}}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "pdserve.componentName" (dict "root" $root "component" .role) }}
  labels:
    {{- include "pdserve.labels" (dict "root" $root "component" .role) | nindent 4 }}
spec:
  scaleTargetRef:
    {{- include "pdserve.worker.scaleTarget" . | nindent 4 }}
    name: {{ include "pdserve.componentName" (dict "root" $root "component" .role) }}
  minReplicaCount: {{ $k.minReplicaCount }}
  maxReplicaCount: {{ $k.maxReplicaCount }}
  pollingInterval: {{ $k.pollingInterval }}
  cooldownPeriod: {{ $k.cooldownPeriod }}
  {{- with $k.behavior }}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        {{- toYaml . | nindent 8 }}
  {{- end }}
  triggers:
    {{- range $k.triggers }}
    - type: prometheus
      name: {{ .name }}
      metricType: {{ .metricType }}
      metadata:
        serverAddress: {{ $root.Values.keda.prometheusAddress }}
        query: {{ tpl .query $root | quote }}
        threshold: {{ .threshold | quote }}
    {{- end }}
{{- end -}}
{{- end -}}
