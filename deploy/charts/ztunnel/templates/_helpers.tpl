{{/* Labels every object of the chart carries. */}}
{{- define "ztunnel.labels" -}}
app.kubernetes.io/name: ztunnel
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The daemon's image reference. */}}
{{- define "ztunnel.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Fails the render when a value cannot work. */}}
{{- define "ztunnel.validate" -}}
{{- if not (has .Values.ca.mode (list "file" "service")) -}}
{{- fail (printf "ca.mode must be file or service, not %q" .Values.ca.mode) -}}
{{- end -}}
{{- if or (kindIs "string" .Values.drainTimeout) (lt (int .Values.drainTimeout) 0) -}}
{{- fail "drainTimeout is a number of seconds (30, not \"30s\")" -}}
{{- end -}}
{{- if .Values.cni.enabled -}}
{{- range $k := list "binDir" "confDir" -}}
{{- if not (isAbs (get $.Values.cni $k)) -}}
{{- fail (printf "cni.%s must be an absolute path on the node, not %q" $k (get $.Values.cni $k)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not (isAbs .Values.handover.hostPath) -}}
{{- fail (printf "handover.hostPath must be an absolute path on the node, not %q" .Values.handover.hostPath) -}}
{{- end -}}
{{- end -}}
