{{/*
Helpers of the platform subchart. Shared settings are read from .Values.global with `dig`
so the subchart also renders on its own (helm template charts/platform).
*/}}

{{- define "platform.transportMode" -}}
{{- dig "transportMode" "kafka" .Values.global -}}
{{- end -}}

{{- define "platform.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cdc-platform
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Kafka Connect is rendered only for the kafka transport. */}}
{{- define "platform.connectEnabled" -}}
{{- if and (eq (include "platform.transportMode" .) "kafka") .Values.kafkaConnect.enabled -}}true{{- end -}}
{{- end -}}

{{- define "platform.connectName" -}}
{{- printf "%s-connect" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "platform.connectSelectorLabels" -}}
app.kubernetes.io/name: kafka-connect
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: kafka-connect
{{- end -}}

{{- define "platform.connectGroupId" -}}
{{- default (include "platform.connectName" .) .Values.kafkaConnect.groupId -}}
{{- end -}}

{{/* Name the Bitnami chart gives its objects (common.names.fullname). */}}
{{- define "platform.bitnamiFullname" -}}
{{- if contains .name .root.Release.Name -}}
{{- .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .root.Release.Name .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "platform.kafkaBootstrap" -}}
{{- $external := dig "kafka" "externalBootstrapServers" "" .Values.global -}}
{{- if $external -}}
{{- $external -}}
{{- else -}}
{{- printf "%s:9092" (include "platform.bitnamiFullname" (dict "root" . "name" "kafka")) -}}
{{- end -}}
{{- end -}}

{{- define "platform.schemaRegistryUrl" -}}
{{- $external := dig "schemaRegistry" "externalUrl" "" .Values.global -}}
{{- if $external -}}
{{- $external -}}
{{- else -}}
{{- printf "http://%s:8081" (include "platform.bitnamiFullname" (dict "root" . "name" "schema-registry")) -}}
{{- end -}}
{{- end -}}

{{- define "platform.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Kafka Connect property name -> the cp image's environment variable name. */}}
{{- define "platform.connectEnvName" -}}
{{- printf "CONNECT_%s" (. | replace "_" "___" | replace "-" "__" | replace "." "_" | upper) -}}
{{- end -}}

{{- define "platform.jaegerName" -}}
{{- printf "%s-jaeger" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "platform.jaegerSelectorLabels" -}}
app.kubernetes.io/name: jaeger
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: tracing
{{- end -}}
