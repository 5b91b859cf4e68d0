{{/*
Helpers of the pipeline subchart. Most take a dict:
  root  the chart's top-level context ($)
  name  the pipeline's key in .Values.pipelines
  p     the pipeline's values
Shared settings come from .Values.global (dig, so the subchart also renders on its own).
*/}}

{{- define "pipeline.transportMode" -}}
{{- dig "transportMode" "kafka" .Values.global -}}
{{- end -}}

{{- define "pipeline.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cdc-platform
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* <release>-<pipeline>: prefix of every object of one pipeline. */}}
{{- define "pipeline.fullname" -}}
{{- printf "%s-%s" .root.Release.Name .name -}}
{{- end -}}

{{- define "pipeline.pipelineLabels" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
cdc.baselyne.io/pipeline: {{ .name }}
{{- end -}}

{{- define "pipeline.ingestSelectorLabels" -}}
app.kubernetes.io/name: cdc-ingest
app.kubernetes.io/component: ingest
{{ include "pipeline.pipelineLabels" . }}
{{- end -}}

{{- define "pipeline.captureSelectorLabels" -}}
app.kubernetes.io/name: cdc-capture
app.kubernetes.io/component: capture
{{ include "pipeline.pipelineLabels" . }}
{{- end -}}

{{/* dict root name sinkId */}}
{{- define "pipeline.sinkSelectorLabels" -}}
app.kubernetes.io/name: cdc-sink
app.kubernetes.io/component: sink
{{ include "pipeline.pipelineLabels" . }}
cdc.baselyne.io/sink: {{ .sinkId }}
{{- end -}}

{{/* Name of a sink's Deployment and Service. dict root name sinkId */}}
{{- define "pipeline.sinkName" -}}
{{- printf "%s-sink-%s" (include "pipeline.fullname" .) .sinkId -}}
{{- end -}}

{{- define "pipeline.pipelineId" -}}
{{- dig "pipeline_id" .name .p.pipeline -}}
{{- end -}}

{{/* The enabled sinks of a pipeline, as JSON: {"sinks": [ ... ]}. */}}
{{- define "pipeline.enabledSinks" -}}
{{- $out := list -}}
{{- range $s := .p.pipeline.sinks -}}
{{- if ne (toString (dig "enabled" true $s)) "false" -}}
{{- $out = append $out $s -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "sinks" $out) -}}
{{- end -}}

{{/* pipeline.yaml: the values verbatim, pipeline_id defaulting to the pipeline's key. */}}
{{- define "pipeline.pipelineYaml" -}}
{{- $cfg := deepCopy .p.pipeline -}}
{{- $_ := set $cfg "pipeline_id" (include "pipeline.pipelineId" .) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Name the Bitnami chart gives its objects (common.names.fullname). dict root name */}}
{{- define "pipeline.bitnamiFullname" -}}
{{- if contains .name .root.Release.Name -}}
{{- .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .root.Release.Name .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pipeline.kafkaBootstrap" -}}
{{- $external := dig "kafka" "externalBootstrapServers" "" .Values.global -}}
{{- if $external -}}
{{- $external -}}
{{- else -}}
{{- printf "%s:9092" (include "pipeline.bitnamiFullname" (dict "root" . "name" "kafka")) -}}
{{- end -}}
{{- end -}}

{{- define "pipeline.schemaRegistryUrl" -}}
{{- $external := dig "schemaRegistry" "externalUrl" "" .Values.global -}}
{{- if $external -}}
{{- $external -}}
{{- else -}}
{{- printf "http://%s:8081" (include "pipeline.bitnamiFullname" (dict "root" . "name" "schema-registry")) -}}
{{- end -}}
{{- end -}}

{{- define "pipeline.connectUrl" -}}
{{- $external := dig "kafka" "connectUrl" "" .Values.global -}}
{{- if $external -}}
{{- $external -}}
{{- else -}}
{{- printf "http://%s-connect:8083" .Release.Name -}}
{{- end -}}
{{- end -}}

{{- define "pipeline.otlpEndpoint" -}}
{{- $explicit := dig "tracing" "otlpEndpoint" "" .Values.global -}}
{{- if $explicit -}}
{{- $explicit -}}
{{- else if dig "tracing" "jaeger" "enabled" false .Values.global -}}
{{- printf "http://%s-jaeger:4317" .Release.Name -}}
{{- end -}}
{{- end -}}

{{/* Kafka SASL mechanism -> platform.yaml kafka.auth_mechanism. */}}
{{- define "pipeline.authMechanism" -}}
{{- $m := . -}}
{{- if eq $m "AWS_MSK_IAM" -}}sasl_iam
{{- else if eq $m "OAUTHBEARER" -}}sasl_oauthbearer
{{- else if eq $m "PLAIN" -}}sasl_plain
{{- else if eq $m "SCRAM-SHA-256" -}}sasl_scram_sha_256
{{- else if eq $m "SCRAM-SHA-512" -}}sasl_scram_sha_512
{{- end -}}
{{- end -}}

{{- define "pipeline.usesSaslPassword" -}}
{{- if has (dig "kafka" "sasl" "mechanism" "" .Values.global) (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512") -}}true{{- end -}}
{{- end -}}

{{/*
platform.yaml of one pipeline: generated from global (transport, endpoints, health port),
then defaults.platform, then the pipeline's own `platform` fragment (later wins).
*/}}
{{- define "pipeline.platformYaml" -}}
{{- $root := .root -}}
{{- $g := $root.Values.global -}}
{{- $mode := include "pipeline.transportMode" $root -}}
{{- $base := dict "transport_mode" $mode "health_port" ($root.Values.ports.health | int) "health_enabled" true -}}
{{- /* SIGTERM to exit within the pod's grace period, 10 s to spare (docs/operations.md). */ -}}
{{- $_ := set $base "shutdown_timeout_seconds" (max 2 (sub ($root.Values.terminationGracePeriodSeconds | int) 10)) -}}
{{- if eq $mode "kafka" -}}
{{- $k := dict "bootstrap_servers" (include "pipeline.kafkaBootstrap" $root) "schema_registry_url" (include "pipeline.schemaRegistryUrl" $root) "group_id" (printf "cdc-%s" (include "pipeline.pipelineId" .)) "topic_num_partitions" (dig "kafka" "topicNumPartitions" 1 $g | int) "topic_replication_factor" (dig "kafka" "topicReplicationFactor" 1 $g | int) -}}
{{- $protocol := dig "kafka" "securityProtocol" "PLAINTEXT" $g -}}
{{- if ne $protocol "PLAINTEXT" -}}
{{- $_ := set $k "security_protocol" $protocol -}}
{{- end -}}
{{- $mechanism := dig "kafka" "sasl" "mechanism" "" $g -}}
{{- if $mechanism -}}
{{- $_ := set $k "auth_mechanism" (include "pipeline.authMechanism" $mechanism) -}}
{{- end -}}
{{- if include "pipeline.usesSaslPassword" $root -}}
{{- $_ := set $k "sasl_username" "${CDC_KAFKA_SASL_USERNAME}" -}}
{{- $_ := set $k "sasl_password" "${CDC_KAFKA_SASL_PASSWORD}" -}}
{{- end -}}
{{- if dig "schemaRegistry" "basicAuthSecret" "" $g -}}
{{- $_ := set $k "schema_registry_username" "${CDC_SCHEMA_REGISTRY_USERNAME}" -}}
{{- $_ := set $k "schema_registry_password" "${CDC_SCHEMA_REGISTRY_PASSWORD}" -}}
{{- end -}}
{{- with dig "kafka" "awsRegion" "" $g -}}
{{- $_ := set $k "aws_region" . -}}
{{- end -}}
{{- with dig "kafka" "gcpProjectId" "" $g -}}
{{- $_ := set $k "gcp_project_id" . -}}
{{- end -}}
{{- $_ := set $base "kafka" $k -}}
{{- $_ := set $base "connector" (dict "connect_url" (include "pipeline.connectUrl" $root)) -}}
{{- end -}}
{{- $tls := fromJson (include "pipeline.grpcTls" .) -}}
{{- if $tls.enabled -}}
{{- $t := dict "enabled" true "cert_file" "/etc/cdc/tls/tls.crt" "key_file" "/etc/cdc/tls/tls.key" "ca_file" "/etc/cdc/tls/ca.crt" "require_client_cert" ($tls.requireClientCert | default false) -}}
{{- with $tls.serverName -}}
{{- $_ := set $t "server_name" . -}}
{{- end -}}
{{- $_ := set $base "grpc_tls" $t -}}
{{- end -}}
{{- $merged := mergeOverwrite $base (deepCopy ($root.Values.defaults.platform | default dict)) (deepCopy (.p.platform | default dict)) -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* Resources: explicit `resources`, else the preset named by `size`. dict root p part */}}
{{- define "pipeline.resources" -}}
{{- $part := .part | default dict -}}
{{- if $part.resources -}}
{{- toYaml $part.resources -}}
{{- else -}}
{{- $size := $part.size | default .p.size | default .root.Values.defaults.size -}}
{{- $preset := index .root.Values.resourcePresets $size -}}
{{- if not $preset -}}
{{- fail (printf "resource preset %q is not defined in resourcePresets" $size) -}}
{{- end -}}
{{- toYaml $preset -}}
{{- end -}}
{{- end -}}

{{/* Secret names for envFrom: defaults + pipeline + part (ingest or sink), deduplicated. */}}
{{- define "pipeline.secretRefs" -}}
{{- $refs := concat (.root.Values.defaults.secretRefs | default list) (.p.secretRefs | default list) ((.part | default dict).secretRefs | default list) | uniq -}}
{{- toJson (dict "refs" $refs) -}}
{{- end -}}

{{/* Port of a URL: explicit, else 443 for https and 80 for http. */}}
{{- define "pipeline.urlPort" -}}
{{- $u := urlParse . -}}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $u.host) -}}
{{- if $port -}}{{ $port }}{{- else if eq $u.scheme "https" -}}443{{- else -}}80{{- end -}}
{{- end -}}

{{- define "pipeline.defaultSourcePort" -}}
{{- $ports := dict "postgres" 5432 "mysql" 3306 "mongodb" 27017 "sqlserver" 1433 -}}
{{- index $ports . | default 5432 -}}
{{- end -}}

{{/*
Config keys whose values must be ${VAR} references (secrets go in Kubernetes Secrets, the
ConfigMap only names them). Prints the offending paths separated by ";".
dict value path
*/}}
{{- define "pipeline.literalSecrets" -}}
{{- $v := .value -}}
{{- $path := .path -}}
{{- if kindIs "map" $v -}}
{{- range $k, $x := $v -}}
{{- $here := printf "%s.%s" $path $k -}}
{{- if kindIs "string" $x -}}
{{- $isRef := regexMatch "^\\$\\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\\}$" $x -}}
{{- if and $x (not $isRef) (regexMatch "(?i)(password|passwd|secret|token|api_?key|private_?key|access_?key(_id)?|credentials?)$" $k) -}}
{{- $here }};
{{- else if regexMatch "://[^/@:\\s]+:[^@/\\s$]+@" $x -}}
{{- $here }};
{{- end -}}
{{- else if or (kindIs "map" $x) (kindIs "slice" $x) -}}
{{- include "pipeline.literalSecrets" (dict "value" $x "path" $here) -}}
{{- end -}}
{{- end -}}
{{- else if kindIs "slice" $v -}}
{{- range $i, $x := $v -}}
{{- if or (kindIs "map" $x) (kindIs "slice" $x) -}}
{{- include "pipeline.literalSecrets" (dict "value" $x "path" (printf "%s[%d]" $path $i)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by ingest and sink containers. dict root name p serviceName extra */}}
{{- define "pipeline.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: CDC_LISTEN_HOST
  value: "0.0.0.0"
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=cdc-platform,cdc.pipeline_id=%s,k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)" (include "pipeline.pipelineId" .) | quote }}
{{- with include "pipeline.otlpEndpoint" .root }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .root.Values.defaults.env }}
{{ toYaml . }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* grpcTls of a pipeline: the chart's defaults, then pipelines.<name>.grpcTls, as JSON.
dict root p */}}
{{- define "pipeline.grpcTls" -}}
{{- toJson (mergeOverwrite (deepCopy (.root.Values.grpcTls | default dict)) (deepCopy (.p.grpcTls | default dict))) -}}
{{- end -}}

{{/* Volumes shared by ingest and sink pods. dict root name p */}}
{{- define "pipeline.volumes" -}}
- name: config
  configMap:
    name: {{ include "pipeline.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- $tls := fromJson (include "pipeline.grpcTls" .) }}
{{- if $tls.enabled }}
- name: grpc-tls
  secret:
    secretName: {{ $tls.secretName | quote }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "pipeline.volumeMounts" -}}
- name: config
  mountPath: /config
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if (fromJson (include "pipeline.grpcTls" .)).enabled }}
- name: grpc-tls
  mountPath: /etc/cdc/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod scheduling fields from an ingest/sink part. */}}
{{- define "pipeline.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "pipeline.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create -}}
{{- include "pipeline.fullname" . -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* Checksum of a pipeline's config files, so a config change restarts its pods. */}}
{{- define "pipeline.configChecksum" -}}
{{- printf "%s\n---\n%s" (include "pipeline.pipelineYaml" .) (include "pipeline.platformYaml" .) | sha256sum -}}
{{- end -}}
