{{/* What only the edge chart decides. */}}

{{/* site.yaml: the values' site, with what the chart decides (paths, broker, HTTP) set over it. */}}
{{- define "medsplit.siteConfig" -}}
{{- $site := deepCopy (default dict .Values.site.config) -}}
{{- $_ := set $site "site_id" (required "site.siteId is required (medsplit provision --helm writes it)" .Values.site.siteId) -}}
{{- $_ := set $site "job_id" (required "site.jobId is required (medsplit provision --helm writes it)" .Values.site.jobId) -}}
{{- $tls := dict "ca_file" "/etc/medsplit/tls/ca.pem" "cert_file" "/etc/medsplit/tls/cert.pem" "key_file" "/etc/medsplit/tls/key.pem" -}}
{{- $url := .Values.site.brokerUrl -}}
{{- if and (not $url) .Values.hospitalBroker.enabled -}}
{{- $url = printf "mqtts://%s.%s.svc:%v" (include "medsplit.hospitalBrokerName" .) .Release.Namespace .Values.hospitalBroker.port -}}
{{- end -}}
{{- $url = required "site.brokerUrl is required: mqtts://HOST:PORT as this hospital reaches the broker" $url -}}
{{- $_ := set $site "broker" (merge (dict "url" $url "tls" $tls) (default dict $site.broker)) -}}
{{- if .Values.site.sealing -}}
{{- $_ := set $site "sealing" (dict "key_file" "/etc/medsplit/tls/seal.key" "ca_file" "/etc/medsplit/tls/ca.pem") -}}
{{- end -}}
{{- $data := deepCopy .Values.data.config -}}
{{- if has (default "dicom" $data.source) (list "dicom" "images" "volumes") -}}
{{- $_ := set $data "folder" "/data" -}}
{{- if eq $data.source "volumes" -}}
{{- $_ := set $data "cache_dir" "/var/lib/medsplit/volume-cache" -}}
{{- end -}}
{{- else if eq $data.source "csv" -}}
{{- $_ := set $data "path" (printf "/data/%s" (required "data.config.path is required for a CSV table (relative to the data folder)" $data.path)) -}}
{{- else if eq $data.source "dicomweb" -}}
{{- $_ := set $data "labels" (printf "/data/%s" (required "data.config.labels is required for a PACS: its labels table (relative to the data folder)" $data.labels)) -}}
{{- $_ := set $data "cache_dir" "/var/lib/medsplit/pacs-cache" -}}
{{- $_ := set $data "auth" (merge (include "medsplit.pacsAuth" . | fromYaml) (default dict $data.auth)) -}}
{{- end -}}
{{- $_ := set $site "data" $data -}}
{{- $_ := set $site "device" (ternary "cuda" "cpu" .Values.gpu.enabled) -}}
{{- $_ := set $site "state" (dict "dir" "/var/lib/medsplit/state") -}}
{{- $http := dict "host" "0.0.0.0" "port" .Values.httpPort "ready_cert_days" .Values.readyCertDays -}}
{{- $_ := set $site "http" (merge $http (include "medsplit.httpSecurityConfig" . | fromYaml)) -}}
{{- toYaml $site -}}
{{- end -}}

{{/* The PACS credentials' files, from the keys data.pacs says its Secret holds. */}}
{{- define "medsplit.pacsAuth" -}}
{{- $pacs := .Values.data.pacs -}}
{{- if and (or $pacs.token $pacs.password $pacs.clientCertificate $pacs.ca) (not $pacs.existingSecret) -}}
{{- fail "data.pacs.existingSecret is required: the Secret holding the PACS credentials named in data.pacs" -}}
{{- end -}}
{{- if $pacs.token }}
token_file: /etc/medsplit/pacs/token
{{- end }}
{{- if $pacs.password }}
password_file: /etc/medsplit/pacs/password
{{- end }}
{{- if $pacs.clientCertificate }}
cert_file: /etc/medsplit/pacs/tls.crt
key_file: /etc/medsplit/pacs/tls.key
{{- end }}
{{- if $pacs.ca }}
ca_file: /etc/medsplit/pacs/ca.crt
{{- end }}
{{- end -}}

{{/* The hospital broker's resources and Service: one name every job's release can reach. */}}
{{- define "medsplit.hospitalBrokerName" -}}
{{- default (printf "%s-hospital-broker" (include "medsplit.fullname" .)) .Values.hospitalBroker.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
