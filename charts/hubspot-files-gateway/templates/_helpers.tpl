{{/*
Names and labels, as `helm create` makes them.
*/}}
{{- define "hubspot-files-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hubspot-files-gateway.fullname" -}}
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

{{- define "hubspot-files-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hubspot-files-gateway.labels" -}}
helm.sh/chart: {{ include "hubspot-files-gateway.chart" . }}
{{ include "hubspot-files-gateway.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "hubspot-files-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hubspot-files-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hubspot-files-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hubspot-files-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hubspot-files-gateway.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/*
The Secret the pods read HubSpot credentials from: the operator's, or the chart's own.
*/}}
{{- define "hubspot-files-gateway.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "hubspot-files-gateway.fullname" . }}
{{- end }}
{{- end }}

{{/*
Where things live inside the container. The config path is the one the image's
command line names; the secret directory is a value so the chart check can point
it at a temporary directory and run `check-config` on the rendered file.
*/}}
{{- define "hubspot-files-gateway.configDir" -}}/etc/hubspot-files-gateway/config{{- end }}
{{- define "hubspot-files-gateway.configPath" -}}{{ include "hubspot-files-gateway.configDir" . }}/gateway.toml{{- end }}
{{- define "hubspot-files-gateway.proxyDir" -}}{{ .Values.proxy.mountPath | trimSuffix "/" }}{{- end }}
{{- define "hubspot-files-gateway.tlsDir" -}}{{ .Values.tls.mountPath | trimSuffix "/" }}{{- end }}

{{/*
The credentials the token mode needs, as a list of {key, file, value}: `key` is the
name in the Secret, `file` the fixed file name under the mounted directory (so the
config never depends on how an operator named the keys), `value` the chart-made value.
*/}}
{{- define "hubspot-files-gateway.secretItems" -}}
{{- $s := .Values.secrets -}}
{{- $mode := (.Values.config.token | default dict).mode | default "oauth" -}}
{{- $items := list -}}
{{- if eq $mode "oauth" -}}
{{- $items = append $items (dict "setting" "client_id_file" "key" $s.keys.clientId "file" "client_id" "value" $s.clientId) -}}
{{- $items = append $items (dict "setting" "client_secret_file" "key" $s.keys.clientSecret "file" "client_secret" "value" $s.clientSecret) -}}
{{- $items = append $items (dict "setting" "refresh_token_file" "key" $s.keys.refreshToken "file" "refresh_token" "value" $s.refreshToken) -}}
{{- else if eq $mode "static" -}}
{{- $items = append $items (dict "setting" "static_token_file" "key" $s.keys.staticToken "file" "static_token" "value" $s.staticToken) -}}
{{- else -}}
{{- fail (printf "config.token.mode must be \"oauth\" or \"static\", not %q" $mode) -}}
{{- end -}}
{{- toJson (dict "items" $items) -}}
{{- end }}

{{/*
A duration of the form the chart can reason about ("20s", "2m") in whole seconds.
*/}}
{{- define "hubspot-files-gateway.seconds" -}}
{{- $d := toString . -}}
{{- if regexMatch "^[0-9]+s$" $d -}}
{{- trimSuffix "s" $d -}}
{{- else if regexMatch "^[0-9]+m$" $d -}}
{{- mul (trimSuffix "m" $d | atoi) 60 -}}
{{- else -}}
{{- fail (printf "config.server.shutdown_grace must be whole seconds or minutes (\"20s\", \"1m\") so the chart can size terminationGracePeriodSeconds; got %q" $d) -}}
{{- end -}}
{{- end }}

{{/*
The port of a listen address ("0.0.0.0:8080", "[::]:9090"): the config is the one
place ports are chosen, and containerPorts follow it.
*/}}
{{- define "hubspot-files-gateway.portOf" -}}
{{- $p := regexFind "[0-9]+$" (toString .) -}}
{{- if not $p -}}{{- fail (printf "cannot read a port from listen address %q" .) -}}{{- end -}}
{{- $p -}}
{{- end }}

{{/*
Replicas that may run at once: the divisor of the account's rate budget (with the cluster
on, of its fallback share: `replicas_hint`).
*/}}
{{- define "hubspot-files-gateway.maxReplicas" -}}
{{- if .Values.autoscaling.enabled -}}{{ .Values.autoscaling.maxReplicas }}{{- else -}}{{ .Values.replicaCount }}{{- end -}}
{{- end }}

{{/*
Seconds the pod needs between SIGTERM-after-preStop and exit, plus the preStop pause.
*/}}
{{- define "hubspot-files-gateway.terminationGrace" -}}
{{- $grace := include "hubspot-files-gateway.seconds" (((.Values.config.server | default dict).shutdown_grace) | default "20s") | atoi -}}
{{- $pause := int .Values.lifecycle.preStopSleepSeconds -}}
{{- $floor := add $grace $pause 1 -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) $floor -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStop pause (%d) + shutdown_grace (%d): Kubernetes would SIGKILL the gateway mid-drain" (int .Values.terminationGracePeriodSeconds) $pause $grace) -}}
{{- end -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add $grace $pause 10 -}}
{{- end -}}
{{- end }}

{{/*
The effective gateway config: the `config:` block plus what the chart owns (secret
file paths, TLS file paths, the rate limit, the `[cluster]` table). Returned as JSON.
*/}}
{{- define "hubspot-files-gateway.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $token := $cfg.token | default dict -}}
{{- range $k, $_ := $token -}}
{{- if and (or (hasSuffix "_file" $k) (hasSuffix "_env" $k)) (ne $k "") -}}
{{- fail (printf "config.token.%s is set by the chart from secrets.*; remove it from config.token" $k) -}}
{{- end -}}
{{- end -}}
{{- $mount := .Values.secrets.mountPath | trimSuffix "/" -}}
{{- range (include "hubspot-files-gateway.secretItems" . | fromJson).items -}}
{{- $_ := set $token .setting (printf "%s/%s" $mount .file) -}}
{{- end -}}
{{- $_ := set $cfg "token" $token -}}
{{- $server := $cfg.server | default dict -}}
{{- if .Values.tls.existingSecret -}}
{{- $dir := include "hubspot-files-gateway.tlsDir" . -}}
{{- $_ := set $server "tls_cert_file" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $server "tls_key_file" (printf "%s/tls.key" $dir) -}}
{{- if .Values.tls.clientCA -}}
{{- $_ := set $server "client_ca_file" (printf "%s/ca.crt" $dir) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- if .Values.proxy.existingSecret -}}
{{- $upstream := $cfg.upstream | default dict -}}
{{- if or (hasKey $upstream "proxy_password_file") (hasKey $upstream "proxy_password_env") -}}
{{- fail "config.upstream.proxy_password_* is set by the chart from proxy.existingSecret; remove it from config.upstream" -}}
{{- end -}}
{{- $_ := set $upstream "proxy_password_file" (printf "%s/password" (include "hubspot-files-gateway.proxyDir" .)) -}}
{{- $_ := set $cfg "upstream" $upstream -}}
{{- end -}}
{{- $budget := .Values.rateLimitBudget -}}
{{- $divisor := include "hubspot-files-gateway.maxReplicas" . | atoi -}}
{{- if gt (float64 $budget.accountRequests) 0.0 -}}
{{- $upstream := $cfg.upstream | default dict -}}
{{- if hasKey $upstream "rate_limit" -}}
{{- fail "set either rateLimitBudget.accountRequests (the chart writes upstream.rate_limit from it) or config.upstream.rate_limit (by hand), not both" -}}
{{- end -}}
{{- $per := floor (divf (mulf (float64 $budget.accountRequests) (float64 $budget.safetyShare)) $divisor) | int -}}
{{- if lt $per 1 -}}
{{- fail (printf "rate budget %v x %v over %d replicas leaves less than 1 request per replica; lower maxReplicas" $budget.accountRequests $budget.safetyShare $divisor) -}}
{{- end -}}
{{- if .Values.cluster.enabled -}}
{{- /* Shared through Redis: the account's budget, whole; the division is only the fallback. */ -}}
{{- $per = floor (mulf (float64 $budget.accountRequests) (float64 $budget.safetyShare)) | int -}}
{{- end -}}
{{- $_ := set $upstream "rate_limit" (dict "requests" $per "per" $budget.per) -}}
{{- $_ := set $cfg "upstream" $upstream -}}
{{- end -}}
{{- if hasKey $cfg "cluster" -}}
{{- fail "config.cluster is written by the chart from the cluster.* values; remove it from config" -}}
{{- end -}}
{{- if .Values.cluster.enabled -}}
{{- $_ := set $cfg "cluster" (include "hubspot-files-gateway.clusterTable" (dict "Values" .Values "replicas" $divisor) | fromJson) -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end }}

{{/*
The gateway's `[cluster]` table from the cluster.* values: the Redis URL and user, the
mounted password and CA files (never a secret value), and `replicas_hint`, the most
replicas that run at once, so each keeps a safe share of the account's budget while Redis
is unreachable. Returned as JSON.
*/}}
{{- define "hubspot-files-gateway.clusterTable" -}}
{{- $c := .Values.cluster -}}
{{- $url := $c.redis.url | default "" | toString -}}
{{- if not (regexMatch "^rediss?://[^@/?#]+(/[0-9]+)?/?$" $url) -}}
{{- fail "cluster.redis.url must be redis://host[:port][/db] or rediss://... with no user, password or query (cluster.enabled is true)" -}}
{{- end -}}
{{- $dir := $c.redis.mountPath | trimSuffix "/" -}}
{{- $t := dict "redis_url" $url "key_prefix" $c.keyPrefix "timeout" $c.timeout "replicas_hint" .replicas -}}
{{- with $c.redis.username }}{{ $_ := set $t "redis_username" . }}{{ end -}}
{{- if $c.redis.existingSecret -}}
{{- $_ := set $t "redis_password_file" (printf "%s/auth/password" $dir) -}}
{{- end -}}
{{- if $c.redis.caSecret -}}
{{- if not (hasPrefix "rediss://" $url) -}}
{{- fail "cluster.redis.caSecret needs a rediss:// (TLS) cluster.redis.url" -}}
{{- end -}}
{{- $_ := set $t "redis_ca_file" (printf "%s/ca/ca.crt" $dir) -}}
{{- end -}}
{{- with $c.leaseTtl }}{{ $_ := set $t "lease_ttl" . }}{{ end -}}
{{- with $c.pollInterval }}{{ $_ := set $t "poll_interval" . }}{{ end -}}
{{- toJson $t -}}
{{- end }}

{{/*
TOML from a map. Helm's toToml prints every number from values as a float
("requests = 90.0"), which the gateway's integer fields reject, so this writes
whole numbers as integers. Tables come after plain keys, arrays of tables last.
*/}}
{{- define "hubspot-files-gateway.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end }}

{{- define "hubspot-files-gateway.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) -}}{{- if kindIs "map" (first .) -}}true{{- end -}}{{- end -}}
{{- end }}

{{- define "hubspot-files-gateway.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}{{ toJson $v }}
{{- else if kindIs "bool" $v -}}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq (float64 (int64 $v)) (float64 $v) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) -}}{{ $v }}
{{- else if kindIs "slice" $v -}}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "hubspot-files-gateway.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" $v -}}{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ include "hubspot-files-gateway.toml.key" $k }} = {{ include "hubspot-files-gateway.toml.value" (get $v $k) }}{{ end }} }
{{- else -}}{{ fail (printf "cannot write %v (%s) as TOML" $v (kindOf $v)) }}
{{- end -}}
{{- end }}

{{- define "hubspot-files-gateway.toml.table" -}}
{{- $t := .table -}}
{{- $prefix := .prefix -}}
{{- $order := .order | default (keys $t | sortAlpha) -}}
{{- range $k := $order }}
{{- $v := get $t $k }}
{{- if and (not (kindIs "invalid" $v)) (not (kindIs "map" $v)) (not (include "hubspot-files-gateway.toml.isTableArray" $v)) }}
{{ include "hubspot-files-gateway.toml.key" $k }} = {{ include "hubspot-files-gateway.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k := $order }}
{{- $v := get $t $k }}
{{- if kindIs "map" $v }}
{{- $path := printf "%s%s" $prefix (include "hubspot-files-gateway.toml.key" $k) }}

[{{ $path }}]
{{- include "hubspot-files-gateway.toml.table" (dict "table" $v "prefix" (printf "%s." $path)) }}
{{- end }}
{{- end }}
{{- range $k := $order }}
{{- $v := get $t $k }}
{{- if include "hubspot-files-gateway.toml.isTableArray" $v }}
{{- $path := printf "%s%s" $prefix (include "hubspot-files-gateway.toml.key" $k) }}
{{- range $e := $v }}

[[{{ $path }}]]
{{- include "hubspot-files-gateway.toml.table" (dict "table" $e "prefix" (printf "%s." $path)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hubspot-files-gateway.toml" -}}
{{- $cfg := include "hubspot-files-gateway.config" . | fromJson -}}
{{- $order := list -}}
{{- range $k := list "server" "upstream" "token" "cache" "auth" }}{{ if hasKey $cfg $k }}{{ $order = append $order $k }}{{ end }}{{ end -}}
{{- range $k := keys $cfg | sortAlpha }}{{ if not (has $k $order) }}{{ $order = append $order $k }}{{ end }}{{ end -}}
# Rendered by the hubspot-files-gateway Helm chart from `config:` in values.yaml.
# Secret values are not here: only paths to the mounted Secret's files.
{{- include "hubspot-files-gateway.toml.table" (dict "table" $cfg "prefix" "" "order" $order) }}
{{- end }}

{{/*
The port of the outbound proxy for the NetworkPolicy: `proxy.port`, else the port of
`config.upstream.proxy` (80 when it names none); empty when no proxy is set.
*/}}
{{- define "hubspot-files-gateway.proxyPort" -}}
{{- $proxy := ((.Values.config | default dict).upstream | default dict).proxy | default "" | toString -}}
{{- if gt (int .Values.proxy.port) 0 -}}
{{- .Values.proxy.port -}}
{{- else if eq $proxy "env" -}}
{{- fail "config.upstream.proxy = \"env\" with networkPolicy.enabled: set proxy.port so the NetworkPolicy can let the gateway reach the proxy" -}}
{{- else if $proxy -}}
{{- $p := regexFind ":[0-9]+$" (trimSuffix "/" $proxy) | trimPrefix ":" -}}
{{- $p | default "80" -}}
{{- end -}}
{{- end }}
