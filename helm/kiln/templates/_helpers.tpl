{{/* The release's full name, at most 63 characters. */}}
{{- define "kiln.fullname" -}}
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

{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "dispatcher"). */}}
{{- define "kiln.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "kiln.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kiln.secretName" -}}
{{- default (printf "%s-auth" (include "kiln.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "kiln.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The dispatcher's URL as runners and the observer reach it, inside the cluster. */}}
{{- define "kiln.dispatcherURL" -}}
{{- printf "%s://%s.%s.svc:%v" (ternary "https" "http" .Values.tls.enabled) (include "kiln.fullname" .) .Release.Namespace .Values.service.port -}}
{{- end -}}

{{/* Checks on values the schema cannot express. */}}
{{- define "kiln.validate" -}}
{{- if and (gt (int .Values.dispatcher.replicas) 1) (not .Values.dispatcher.database.existingSecret) -}}
{{- fail "dispatcher.replicas above 1 needs dispatcher.database.existingSecret: several dispatchers share the farm through PostgreSQL (with SQLite there is one)" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- if and .Values.observer.enabled (not .Values.observer.repos) -}}
{{- fail "observer.enabled needs at least one repository in observer.repos" -}}
{{- end -}}
{{- end -}}

{{/* Client settings shared by runners and the observer: the dispatcher's URL and TLS. */}}
{{- define "kiln.clientEnv" -}}
- name: KILN_DISPATCHER
  value: {{ include "kiln.dispatcherURL" . | quote }}
{{- if and .Values.tls.enabled .Values.tls.caFromSecret }}
- name: KILN_TLS_CA
  value: /etc/kiln/tls/ca.crt
{{- end }}
{{- end -}}
