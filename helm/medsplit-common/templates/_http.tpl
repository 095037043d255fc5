{{/* The guarded HTTP port every medsplit process serves (medsplit/http_guard.py), from one
     values block, `httpSecurity`:
       tlsSecret: a kubernetes.io/tls Secret (tls.crt, tls.key; ca.crt with client certificates)
       clientCertificates: a client certificate signed by ca.crt opens the page, /status, /metrics
       tokenSecret: a Secret whose "token" key opens them too (Authorization: Bearer ...)
     The probes (/healthz, /readyz) stay open: the kubelet shows neither. */}}

{{/* The process config's `http` fields that point at the mounted files. */}}
{{- define "medsplit.httpSecurityConfig" -}}
{{- $s := .Values.httpSecurity -}}
{{- $http := dict -}}
{{- if $s.tlsSecret -}}
{{- $_ := set $http "tls_cert" "/etc/medsplit/http-tls/tls.crt" -}}
{{- $_ := set $http "tls_key" "/etc/medsplit/http-tls/tls.key" -}}
{{- if $s.clientCertificates -}}
{{- $_ := set $http "tls_client_ca" "/etc/medsplit/http-tls/ca.crt" -}}
{{- end -}}
{{- else if $s.clientCertificates -}}
{{- fail "httpSecurity.clientCertificates needs httpSecurity.tlsSecret: client certificates need TLS" -}}
{{- end -}}
{{- if $s.tokenSecret -}}
{{- $_ := set $http "token_file" "/etc/medsplit/http-token/token" -}}
{{- end -}}
{{- toYaml $http -}}
{{- end -}}

{{/* The container's mounts of those Secrets (a list of volumeMounts, maybe empty). */}}
{{- define "medsplit.httpSecurityMounts" -}}
{{- if .Values.httpSecurity.tlsSecret }}
- {name: http-tls, mountPath: /etc/medsplit/http-tls, readOnly: true}
{{- end }}
{{- if .Values.httpSecurity.tokenSecret }}
- {name: http-token, mountPath: /etc/medsplit/http-token, readOnly: true}
{{- end }}
{{- end -}}

{{- define "medsplit.httpSecurityVolumes" -}}
{{- if .Values.httpSecurity.tlsSecret }}
- name: http-tls
  secret: {secretName: {{ .Values.httpSecurity.tlsSecret }}, defaultMode: 0440}
{{- end }}
{{- if .Values.httpSecurity.tokenSecret }}
- name: http-token
  secret:
    secretName: {{ .Values.httpSecurity.tokenSecret }}
    defaultMode: 0440
    items: [{key: token, path: token}]
{{- end }}
{{- end -}}

{{/* `medsplit probe` (the image's HEALTHCHECK) asks HTTPS when the port speaks it. */}}
{{- define "medsplit.httpSecurityEnv" -}}
{{- if .Values.httpSecurity.tlsSecret }}
- name: MEDSPLIT_HTTP__TLS_CERT
  value: /etc/medsplit/http-tls/tls.crt
{{- end }}
{{- end -}}

{{/* A probe from values, over HTTPS when the port speaks it (the kubelet checks no
     certificate): (dict "probe" PROBE "https" BOOL). */}}
{{- define "medsplit.httpProbe" -}}
{{- $probe := omit .probe "enabled" -}}
{{- if and .https $probe.httpGet -}}
{{- $_ := set $probe "httpGet" (merge (dict "scheme" "HTTPS") $probe.httpGet) -}}
{{- end -}}
{{- toYaml $probe -}}
{{- end -}}

{{/* A ServiceMonitor endpoint's scheme and credentials: HTTPS checked against the Secret's
     ca.crt, and the bearer token from the token Secret. */}}
{{- define "medsplit.scrapeSecurity" -}}
{{- $s := .Values.httpSecurity -}}
{{- if $s.tlsSecret }}
scheme: https
tlsConfig:
  ca: {secret: {name: {{ $s.tlsSecret }}, key: ca.crt}}
  serverName: {{ include "medsplit.fullname" . }}
{{- end }}
{{- if $s.tokenSecret }}
authorization:
  type: Bearer
  credentials: {name: {{ $s.tokenSecret }}, key: token}
{{- end }}
{{- end -}}
