{{/* What only the aggregator's chart decides. */}}
{{- define "medsplit.brokerUrl" -}}
{{- if .Values.aggregator.brokerUrl -}}
{{- .Values.aggregator.brokerUrl -}}
{{- else -}}
{{- printf "mqtts://%s-mosquitto.%s.svc:%v" (include "medsplit.fullname" .) .Release.Namespace .Values.mosquitto.service.port -}}
{{- end -}}
{{- end -}}

{{/* job.yaml: the values' job, with what the chart decides (paths, broker, HTTP) set over it. */}}
{{- define "medsplit.jobConfig" -}}
{{- $job := deepCopy (default dict .Values.job.config) -}}
{{- $_ := set $job "job_id" (required "job.jobId is required (medsplit provision --helm writes it)" .Values.job.jobId) -}}
{{- $_ := set $job "sites" (required "job.sites is required (medsplit provision --helm writes it)" .Values.job.sites) -}}
{{- $tls := dict "ca_file" "/etc/medsplit/tls/ca.pem" "cert_file" "/etc/medsplit/tls/cert.pem" "key_file" "/etc/medsplit/tls/key.pem" -}}
{{- $_ := set $job "broker" (merge (dict "url" (include "medsplit.brokerUrl" .) "tls" $tls) (default dict $job.broker)) -}}
{{- $_ := set $job "state" (dict "run_dir" "/var/lib/medsplit/run") -}}
{{- $_ := set $job "checkpoint" (merge (dict "dir" "/var/lib/medsplit/checkpoints") (default dict $job.checkpoint)) -}}
{{- $security := dict "revocations_file" "/etc/medsplit/revocations/revocations.json" -}}
{{- if .Values.job.roster -}}
{{- $_ := set $security "roster_file" "/etc/medsplit/revocations/roster.json" -}}
{{- end -}}
{{- $_ := set $job "security" (merge $security (default dict $job.security)) -}}
{{- $http := dict "host" "0.0.0.0" "port" .Values.aggregator.httpPort "ready_cert_days" .Values.aggregator.readyCertDays -}}
{{- $_ := set $job "http" (merge $http (include "medsplit.httpSecurityConfig" . | fromYaml)) -}}
{{- toYaml $job -}}
{{- end -}}
