{{/* Names, labels and small shared pieces. Worker templates are in _worker.tpl. */}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
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

{{/*
Name of one component's objects. 52 characters at most: a StatefulSet's pods carry a
controller-revision-hash label of "<name>-<10 characters>", and labels stop at 63.
The release part is cut, never the component, so names stay distinct.
Call with (dict "root" $ "component" "router").
*/}}
{{- define "pdserve.componentName" -}}
{{- $prefix := include "pdserve.fullname" .root | trunc (int (sub 51 (len .component))) | trimSuffix "-" -}}
{{- printf "%s-%s" $prefix .component -}}
{{- end -}}

{{- define "pdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component. Call with (dict "root" $ "component" "decode"). */}}
{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects. Same arguments as pdserve.selectorLabels. */}}
{{- define "pdserve.labels" -}}
helm.sh/chart: {{ include "pdserve.chart" .root }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/part-of: pdserve
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* Labels of objects that belong to the release as a whole. */}}
{{- define "pdserve.releaseLabels" -}}
helm.sh/chart: {{ include "pdserve.chart" . }}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: pdserve
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- printf "%s:%s-%s" .Values.image.repository $tag .Values.image.flavor -}}
{{- end -}}

{{- define "pdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pdserve.componentName" (dict "root" . "component" "router")) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The model id clients use: servedName, or the model folder's name. */}}
{{- define "pdserve.servedModelName" -}}
{{- default (base .Values.model.path) .Values.model.servedName -}}
{{- end -}}

{{/* True (non-empty) when the router finds workers through the Kubernetes API. */}}
{{- define "pdserve.kubernetesDiscovery" -}}
{{- if eq .Values.router.discovery "kubernetes" }}true{{ end -}}
{{- end -}}

{{/* Volumes every pdserve pod mounts: the model and, optionally, TLS material. */}}
{{- define "pdserve.commonVolumes" -}}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "pdserve.commonVolumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* --tls-* flags for the router and workers: the mounted Secret's files. */}}
{{- define "pdserve.tlsArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert={{ .Values.tls.mountPath }}/tls.crt
- --tls-key={{ .Values.tls.mountPath }}/tls.key
- --tls-ca={{ .Values.tls.mountPath }}/ca.crt
{{- with .Values.tls.serverName }}
- --tls-server-name={{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Environment every pdserve container gets. */}}
{{- define "pdserve.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end -}}

{{/* Checks that the schema cannot express. Included by every workload template. */}}
{{- define "pdserve.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled=true needs tls.secretName (a Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- range $role := list "prefill" "decode" -}}
{{- $pool := index $.Values $role -}}
{{- if and (include "pdserve.worker.autoscaled" (dict "root" $ "role" $role)) (not (include "pdserve.kubernetesDiscovery" $)) -}}
{{- fail (printf "%s.%s needs router.discovery=kubernetes: a static worker list is fixed at install time and cannot follow the autoscaler" $role (ternary "keda" "autoscaling" $pool.keda.enabled)) -}}
{{- end -}}
{{- if $pool.multiNode.enabled -}}
{{- if ne $.Values.workers.kvTransport "nixl" -}}
{{- fail (printf "%s.multiNode needs workers.kvTransport=nixl (the ranks on follower nodes run plain vLLM with the NIXL connector)" $role) -}}
{{- end -}}
{{- $ranks := mul (int $pool.tensorParallelSize) (int $pool.pipelineParallelSize) -}}
{{- if mod $ranks (int $pool.multiNode.nodesPerReplica) -}}
{{- fail (printf "%s.multiNode.nodesPerReplica=%d must divide tensorParallelSize x pipelineParallelSize = %d (each node runs the same number of ranks)" $role (int $pool.multiNode.nodesPerReplica) $ranks) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.workers.kvTransport "nixl") (gt (int .Values.prefill.pipelineParallelSize) 1) -}}
{{- fail "prefill.pipelineParallelSize > 1 does not work with workers.kvTransport=nixl (pull mode needs equal KV layers per rank); use PP=1 for prefill" -}}
{{- end -}}
{{- end -}}
