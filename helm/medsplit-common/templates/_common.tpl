{{/* Names, labels, images, probes: after Bitnami's common chart, shared by every medsplit chart
     through this library chart (a dependency of each). */}}
{{- define "medsplit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "medsplit.fullname" -}}
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

{{- define "medsplit.labels" -}}
app.kubernetes.io/name: {{ include "medsplit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medsplit
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (aggregator, mosquitto, agent). */}}
{{- define "medsplit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medsplit.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* registry/repository:tag or @digest; global.imageRegistry wins (air-gapped mirrors). */}}
{{- define "medsplit.image" -}}
{{- $registry := default .image.registry .global.imageRegistry -}}
{{- $ref := ternary (printf "@%s" .image.digest) (printf ":%s" .image.tag) (not (empty .image.digest)) -}}
{{- if $registry -}}
{{- printf "%s/%s%s" $registry .image.repository $ref -}}
{{- else -}}
{{- printf "%s%s" .image.repository $ref -}}
{{- end -}}
{{- end -}}

{{- define "medsplit.imagePullSecrets" -}}
{{- $secrets := concat (default list .Values.global.imagePullSecrets) (default list .Values.imagePullSecrets) -}}
{{- if $secrets }}
imagePullSecrets:
{{- range $secrets }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A probe from values: enabled, then the standard fields. */}}
{{- define "medsplit.probe" -}}
{{- omit . "enabled" | toYaml -}}
{{- end -}}

{{/* The securityContext from values without the chart's own "enabled" switch. */}}
{{- define "medsplit.securityContext" -}}
{{- omit . "enabled" | toYaml -}}
{{- end -}}

{{- define "medsplit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "medsplit.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A PodDisruptionBudget's limit: maxUnavailable 1 unless one of the two is set. */}}
{{- define "medsplit.pdbLimit" -}}
{{- if .minAvailable }}
minAvailable: {{ .minAvailable }}
{{- else }}
maxUnavailable: {{ default 1 .maxUnavailable }}
{{- end }}
{{- end -}}
