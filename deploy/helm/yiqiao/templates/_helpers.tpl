{{/* Chart name, truncated to 63 characters (DNS label). */}}
{{- define "yiqiao.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name. */}}
{{- define "yiqiao.fullname" -}}
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

{{- define "yiqiao.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "yiqiao.selectorLabels" -}}
app.kubernetes.io/name: {{ include "yiqiao.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "yiqiao.labels" -}}
helm.sh/chart: {{ include "yiqiao.chart" . }}
{{ include "yiqiao.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: yiqiao
{{- end -}}

{{/* image reference: repository@digest or repository:tag (tag defaults to appVersion). */}}
{{- define "yiqiao.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Can more than one gateway pod run at once? */}}
{{- define "yiqiao.multiReplica" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled -}}true{{- end -}}
{{- end -}}

{{/* Refuse configurations that would run replicas that disagree. */}}
{{- define "yiqiao.validate" -}}
{{- if include "yiqiao.multiReplica" . -}}
{{- if not .Values.database.existingSecret -}}
{{- fail "more than one replica (replicaCount > 1 or autoscaling.enabled) needs PostgreSQL: set database.existingSecret (embedded SQLite is per pod)" -}}
{{- end -}}
{{- if not (or .Values.redis.url .Values.redis.existingSecret) -}}
{{- fail "more than one replica (replicaCount > 1 or autoscaling.enabled) needs Redis: set redis.url or redis.existingSecret" -}}
{{- end -}}
{{- if .Values.persistence.enabled -}}
{{- fail "persistence.enabled (SQLite on a PVC) is for a single replica: set replicaCount: 1 and autoscaling.enabled: false" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.migration.enabled (not .Values.database.existingSecret) -}}
{{- fail "migration.enabled runs against PostgreSQL: set database.existingSecret, or for SQLite set migration.enabled: false (the single pod then migrates at start)" -}}
{{- end -}}
{{- end -}}

{{/* The database URL from its Secret (gateway pods and the migration Job). */}}
{{- define "yiqiao.databaseEnv" -}}
{{- if .Values.database.existingSecret }}
- name: YIQIAO_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- end }}
{{- end -}}

{{/* Environment of the gateway pods (secrets by reference only). */}}
{{- define "yiqiao.env" -}}
- name: YIQIAO_CONFIG
  value: /etc/yiqiao/yiqiao.toml
- name: YIQIAO_DATA_DIR
  value: /var/lib/yiqiao
{{- include "yiqiao.databaseEnv" . }}
{{- if .Values.redis.existingSecret }}
- name: YIQIAO_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.urlKey }}
{{- else if .Values.redis.url }}
- name: YIQIAO_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- if .Values.adminToken.existingSecret }}
- name: YIQIAO_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.adminToken.existingSecret }}
      key: {{ .Values.adminToken.key }}
{{- end }}
{{- end -}}

{{/* The gateway configuration file (non-secret settings only). */}}
{{- define "yiqiao.configToml" -}}
# Rendered by the yiqiao Helm chart. Secrets (database URL, Redis URL, admin token) come from
# Kubernetes Secrets through YIQIAO_* environment variables, never from this file.
listen = "0.0.0.0:{{ .Values.containerPort | int }}"
data_dir = "/var/lib/yiqiao"
public_url = {{ .Values.config.publicUrl | quote }}

[database]
pool_size = {{ .Values.database.poolSize | int }}
acquire_timeout_ms = {{ .Values.database.acquireTimeoutMs | int }}
connect_timeout_ms = {{ .Values.database.connectTimeoutMs | int }}
statement_timeout_ms = {{ .Values.database.statementTimeoutMs | int }}
{{- if .Values.migration.enabled }}
# The pre-install/pre-upgrade hook Job runs `yiqiao migrate`; replicas must not race it.
migrate_on_start = false
{{- else }}
migrate_on_start = true
{{- end }}

[redis]
timeout_ms = {{ .Values.redis.timeoutMs | int }}

[http]
max_body_bytes = {{ .Values.config.http.maxBodyBytes | int }}
workers = {{ .Values.config.http.workers | int }}
shutdown_timeout_secs = {{ .Values.config.http.shutdownTimeoutSecs | int }}
keep_alive_secs = {{ .Values.config.http.keepAliveSecs | int }}

[log]
format = {{ .Values.config.log.format | quote }}
level = {{ .Values.config.log.level | quote }}
{{- end -}}
