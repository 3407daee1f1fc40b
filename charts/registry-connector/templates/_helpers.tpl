{{/* The chart name, shortened to fit a DNS label. */}}
{{- define "registry-connector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of the release's objects: the release name when it already contains the
chart name (so release "registry-connector" gives "registry-connector", like deploy/),
else "<release>-<chart>". Suffixes like "-leader-election" are added to it, hence 40.
*/}}
{{- define "registry-connector.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "registry-connector.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "registry-connector.labels" -}}
helm.sh/chart: {{ include "registry-connector.chart" . }}
{{ include "registry-connector.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the pods; never change them on upgrade (selectors are immutable). */}}
{{- define "registry-connector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "registry-connector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "registry-connector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "registry-connector.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "registry-connector.syncNamespace" -}}
{{- default .Release.Namespace .Values.syncNamespace }}
{{- end }}

{{- define "registry-connector.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
