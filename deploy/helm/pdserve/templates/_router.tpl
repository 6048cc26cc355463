{{/* The router's command line and configuration file. */}}

{{/* --prefill/--decode flags naming each StatefulSet pod by its stable DNS name. */}}
{{- define "pdserve.router.staticWorkers" -}}
{{- $root := .root -}}
{{- $name := include "pdserve.componentName" (dict "root" $root "component" .role) -}}
{{- range $i := until (int (index $root.Values .role).replicas) }}
- --{{ $.role }}={{ $name }}-{{ $i }}.{{ $name }}.{{ $root.Release.Namespace }}.svc.{{ $root.Values.clusterDomain }}:{{ $root.Values.workers.grpcPort }}
{{- end }}
{{- end -}}

{{- define "pdserve.router.args" -}}
{{- $r := .Values.router -}}
- router
- --model={{ .Values.model.path }}
- --served-model-name={{ include "pdserve.servedModelName" . }}
{{- if include "pdserve.kubernetesDiscovery" . }}
{{- /* Contract for the router's Kubernetes discovery: it reads the
       discovery section of router.yaml (namespace, label selectors, port). */}}
- --discovery=kubernetes
- --config=/etc/pdserve/router.yaml
{{- else }}
{{- include "pdserve.router.staticWorkers" (dict "root" . "role" "prefill") }}
{{- include "pdserve.router.staticWorkers" (dict "root" . "role" "decode") }}
{{- end }}
- --http-host=0.0.0.0
- --http-port={{ $r.httpPort }}
- --grpc-host=0.0.0.0
- --grpc-port={{ $r.grpcPort }}
- --log-level={{ $r.logLevel }}
{{- include "pdserve.tlsArgs" . }}
{{- range $r.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* router.yaml: how the router finds workers, plus the routing configuration. */}}
{{- define "pdserve.router.config" -}}
{{- $pools := dict -}}
{{- range $role := list "prefill" "decode" -}}
{{- $selector := printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,pdserve.io/role=%s" (include "pdserve.name" $) $.Release.Name $role -}}
{{- $_ := set $pools $role (dict "labelSelector" $selector) -}}
{{- end -}}
{{- $discovery := dict "mode" .Values.router.discovery "namespace" .Release.Namespace "workerPort" .Values.workers.grpcPort "pools" $pools -}}
{{- toYaml (merge (dict "discovery" $discovery) (deepCopy .Values.router.config)) -}}
{{- end -}}
