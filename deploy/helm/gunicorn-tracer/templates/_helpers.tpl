{{/* The name of every object: the chart's, as the plain manifests have it. */}}
{{- define "tracer.name" -}}
{{- .Chart.Name -}}
{{- end -}}

{{/* Labels on every object and the pod selector (kept to the one label the
plain manifests select on: a DaemonSet's selector cannot change later). */}}
{{- define "tracer.labels" -}}
app.kubernetes.io/name: {{ include "tracer.name" . }}
{{- end -}}

{{- define "tracer.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* What the Pod/ServiceMonitor scrape: keep the tracer's worker labels
(namespace, pod, container are the worker's, not the tracer pod's) and add
the node. */}}
{{- define "tracer.relabelings" -}}
relabelings:
  - sourceLabels: [__meta_kubernetes_pod_node_name]
    targetLabel: node
{{- end -}}
