//! The process's Prometheus metrics, with exactly the names, types and labels of
//! SPEC.md, registered once and shared by every thread.
//!
//! Counters on the hot path are resolved to their label set once (when a session or a
//! plan is made) and then only incremented.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric pgveil exposes (SPEC.md), for documents and dashboards to be checked
/// against.
pub const METRIC_NAMES: [&str; 14] = [
    "pgveil_client_connections",
    "pgveil_connections_total",
    "pgveil_queries_total",
    "pgveil_denied_queries_total",
    "pgveil_protected_values_total",
    "pgveil_encrypted_values_total",
    "pgveil_decrypted_values_total",
    "pgveil_decrypt_failures_total",
    "pgveil_query_duration_seconds",
    "pgveil_policy_reloads_total",
    "pgveil_upstream_errors_total",
    "pgveil_audit_records_total",
    "pgveil_audit_records_lost_total",
    "pgveil_audit_write_errors_total",
];

/// Values of the `kind` label of `pgveil_queries_total` and
/// `pgveil_query_duration_seconds`.
pub const QUERY_KINDS: [&str; 6] = ["select", "insert", "update", "delete", "copy", "other"];

/// The `kind` (an index into [`QUERY_KINDS`]) of a statement, from the command tag of
/// its CommandComplete.
pub fn query_kind(tag: &[u8]) -> usize {
    let word = tag.split(|&b| b == b' ').next().unwrap_or_default();
    match word {
        b"SELECT" | b"FETCH" => 0,
        b"INSERT" => 1,
        b"UPDATE" => 2,
        b"DELETE" => 3,
        b"COPY" => 4,
        _ => 5,
    }
}

/// One session's `pgveil_queries_total` counters and duration histograms, resolved for
/// its role once, so that counting a statement is an increment and an observation.
pub struct QueryMeter {
    role: String,
    queries: Vec<IntCounter>,
    durations: Vec<Histogram>,
}

impl Default for QueryMeter {
    fn default() -> Self {
        let histograms = &metrics().query_duration_seconds;
        QueryMeter {
            role: String::new(),
            queries: Vec::new(),
            durations: QUERY_KINDS
                .iter()
                .map(|kind| histograms.with_label_values(&[kind]))
                .collect(),
        }
    }
}

impl QueryMeter {
    /// Counts a completed statement of the session's current `role`.
    pub fn record(&mut self, role: &str, tag: &[u8], elapsed: Duration) {
        if self.queries.is_empty() || self.role != role {
            let counters = &metrics().queries_total;
            self.role = role.to_string();
            self.queries = QUERY_KINDS
                .iter()
                .map(|kind| counters.with_label_values(&[role, kind]))
                .collect();
        }
        let kind = query_kind(tag);
        if let Some(counter) = self.queries.get(kind) {
            counter.inc();
        }
        if let Some(histogram) = self.durations.get(kind) {
            histogram.observe(elapsed.as_secs_f64());
        }
    }
}

/// Why a statement was refused, as the `reason` label of `pgveil_denied_queries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A column whose action for the role is `deny`.
    ColumnDenied,
    /// A value computed from protected columns the role may not see in plaintext.
    DerivedExpression,
    /// COPY … TO, a replication stream, or a copy of protected values into a table or
    /// server file.
    ExportDenied,
    /// A condition on a column the role may not see in plaintext.
    FilterOnProtected,
    /// More rows with protected columns than the role's `max_rows`.
    RowLimit,
    /// pgveil could not work out what the statement reads (a relation its catalog does
    /// not know, a portal it never saw described, DDL not yet committed, …).
    Unparseable,
    /// An operation pgveil cannot apply correctly (a mask on a binary non-text value).
    UnsupportedOnEncrypted,
    /// The audit log cannot be written and `audit.on_failure` is `refuse`.
    AuditUnavailable,
    /// A write would store a value of an encrypted column that pgveil cannot encrypt.
    WriteRefused,
}

impl DenyReason {
    pub fn label(self) -> &'static str {
        match self {
            DenyReason::ColumnDenied => "column_denied",
            DenyReason::DerivedExpression => "derived_expression",
            DenyReason::ExportDenied => "export_denied",
            DenyReason::FilterOnProtected => "filter_on_protected",
            DenyReason::RowLimit => "row_limit",
            DenyReason::Unparseable => "unparseable",
            DenyReason::UnsupportedOnEncrypted => "unsupported_on_encrypted",
            DenyReason::WriteRefused => "write_refused",
            DenyReason::AuditUnavailable => "audit_unavailable",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub client_connections: IntGauge,
    pub connections_total: IntCounter,
    pub queries_total: IntCounterVec,
    pub denied_queries_total: IntCounterVec,
    pub protected_values_total: IntCounterVec,
    pub encrypted_values_total: IntCounter,
    pub decrypted_values_total: IntCounter,
    pub decrypt_failures_total: IntCounterVec,
    pub query_duration_seconds: HistogramVec,
    pub policy_reloads_total: IntCounterVec,
    pub upstream_errors_total: IntCounter,
    pub audit_records_total: IntCounter,
    pub audit_records_lost_total: IntCounter,
    pub audit_write_errors_total: IntCounter,
}

/// The metrics of this process.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        // Registration fails only for a duplicate or malformed name, which these fixed
        // names are not; a failure would show as a metric missing from /metrics.
        fn register<C: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            collector: C,
        ) -> C {
            if let Err(error) = registry.register(Box::new(collector.clone())) {
                tracing::error!(%error, "metric registration failed");
            }
            collector
        }
        let counter = |name: &str, help: &str| {
            register(
                &registry,
                IntCounter::new(name, help).unwrap_or_else(|_| unreachable_metric(name)),
            )
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels)
                    .unwrap_or_else(|_| unreachable_metric(name)),
            )
        };
        let client_connections = register(
            &registry,
            IntGauge::new("pgveil_client_connections", "Client sessions open now")
                .unwrap_or_else(|_| unreachable_metric("pgveil_client_connections")),
        );
        let query_duration_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "pgveil_query_duration_seconds",
                    "Time from a statement's request to its completion, as seen by pgveil",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
                &["kind"],
            )
            .unwrap_or_else(|_| unreachable_metric("pgveil_query_duration_seconds")),
        );
        Metrics {
            client_connections,
            connections_total: counter("pgveil_connections_total", "Client connections accepted"),
            queries_total: counter_vec(
                "pgveil_queries_total",
                "Statements completed, by policy role and kind",
                &["role", "kind"],
            ),
            denied_queries_total: counter_vec(
                "pgveil_denied_queries_total",
                "Statements pgveil refused, by policy role, reason and table",
                &["role", "reason", "table"],
            ),
            protected_values_total: counter_vec(
                "pgveil_protected_values_total",
                "Values of protected columns served, by policy role, table, column and action",
                &["role", "table", "column", "action"],
            ),
            encrypted_values_total: counter(
                "pgveil_encrypted_values_total",
                "Values pgveil encrypted",
            ),
            decrypted_values_total: counter(
                "pgveil_decrypted_values_total",
                "Values pgveil decrypted",
            ),
            decrypt_failures_total: counter_vec(
                "pgveil_decrypt_failures_total",
                "Ciphertexts that failed authentication or named an unknown key",
                &["table", "column"],
            ),
            query_duration_seconds,
            policy_reloads_total: counter_vec(
                "pgveil_policy_reloads_total",
                "Policy reloads, by result",
                &["result"],
            ),
            upstream_errors_total: counter(
                "pgveil_upstream_errors_total",
                "Sessions that failed because of the upstream server (unreachable, TLS, lost, invalid messages)",
            ),
            audit_records_total: counter(
                "pgveil_audit_records_total",
                "Audit records written to the audit log",
            ),
            audit_records_lost_total: counter(
                "pgveil_audit_records_lost_total",
                "Audit records dropped because the audit log's queue was full (the writer could not keep up or could not write)",
            ),
            audit_write_errors_total: counter(
                "pgveil_audit_write_errors_total",
                "Failed attempts to open or write the audit log (each is retried)",
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "cannot encode metrics");
        }
        out
    }

    /// Counts a refusal.
    pub fn denied(&self, role: &str, reason: DenyReason, table: &str) {
        self.denied_queries_total
            .with_label_values(&[role, reason.label(), table])
            .inc();
    }
}

/// Metric names and options above are constants that construction cannot reject.
fn unreachable_metric(name: &str) -> ! {
    panic!("metric {name} has an invalid definition")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tags_give_the_query_kind() {
        let kind = |tag: &[u8]| QUERY_KINDS[query_kind(tag)];
        assert_eq!(kind(b"SELECT 3"), "select");
        assert_eq!(kind(b"FETCH 1"), "select");
        assert_eq!(kind(b"INSERT 0 1"), "insert");
        assert_eq!(kind(b"UPDATE 2"), "update");
        assert_eq!(kind(b"DELETE 0"), "delete");
        assert_eq!(kind(b"COPY 5"), "copy");
        assert_eq!(kind(b"CREATE TABLE"), "other");
        assert_eq!(kind(b""), "other");
    }

    #[test]
    fn every_metric_of_the_spec_is_exposed() {
        let metrics = metrics();
        metrics.denied("default", DenyReason::ColumnDenied, "public.customers");
        metrics
            .policy_reloads_total
            .with_label_values(&["ok"])
            .inc();
        metrics
            .queries_total
            .with_label_values(&["default", "select"])
            .inc();
        metrics
            .protected_values_total
            .with_label_values(&["default", "public.customers", "phone", "mask"])
            .inc();
        metrics
            .decrypt_failures_total
            .with_label_values(&["public.customers", "phone"])
            .inc();
        metrics
            .query_duration_seconds
            .with_label_values(&["select"])
            .observe(0.001);
        let text = String::from_utf8(metrics.render()).unwrap();
        for name in METRIC_NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        for (name, kind) in [
            ("pgveil_client_connections", "gauge"),
            ("pgveil_connections_total", "counter"),
            ("pgveil_queries_total", "counter"),
            ("pgveil_denied_queries_total", "counter"),
            ("pgveil_protected_values_total", "counter"),
            ("pgveil_encrypted_values_total", "counter"),
            ("pgveil_decrypted_values_total", "counter"),
            ("pgveil_decrypt_failures_total", "counter"),
            ("pgveil_query_duration_seconds", "histogram"),
            ("pgveil_policy_reloads_total", "counter"),
            ("pgveil_upstream_errors_total", "counter"),
            ("pgveil_audit_records_total", "counter"),
            ("pgveil_audit_records_lost_total", "counter"),
            ("pgveil_audit_write_errors_total", "counter"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind} missing:\n{text}"
            );
        }
        assert!(text.contains(
            "pgveil_denied_queries_total{reason=\"column_denied\",role=\"default\",table=\"public.customers\"}"
        ));
    }
}
