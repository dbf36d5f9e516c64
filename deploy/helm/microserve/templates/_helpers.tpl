{{/* The chart's name, at most 63 characters (a DNS label). */}}
{{- define "microserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's resources are called this. */}}
{{- define "microserve.fullname" -}}
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

{{- define "microserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "microserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "microserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "microserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "microserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "microserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A StatefulSet when every pod keeps a cache claim of its own, else a Deployment. */}}
{{- define "microserve.workloadKind" -}}
{{- if eq .Values.cache.type "perPod" }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* The grace period: the preStop pause, the drain, and room to exit, in whole seconds. */}}
{{- define "microserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (ceil .Values.microserve.drainTimeout) (int .Values.terminationGraceExtraSeconds) }}
{{- end }}

{{- define "microserve.apiKeySecretName" -}}
{{- default (printf "%s-api-keys" (include "microserve.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "microserve.cacheClaimName" -}}
{{- default (printf "%s-cache" (include "microserve.fullname" .)) .Values.cache.pvc.existingClaim }}
{{- end }}

{{- define "microserve.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* The Prometheus query both autoscalers act on: requests waiting, summed over this release's pods. */}}
{{- define "microserve.kedaQuery" -}}
{{- if .Values.keda.query }}
{{- .Values.keda.query }}
{{- else }}
{{- printf "sum(%s{namespace=\"%s\",service=\"%s\"})" .Values.autoscaling.metric .Release.Namespace (include "microserve.fullname" .) }}
{{- end }}
{{- end }}
