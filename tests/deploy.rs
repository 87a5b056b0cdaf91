//! The files in `deploy/` agree with pgveil: the example config loads, and every metric
//! the dashboard and the alert rules query is one pgveil exposes. (`promtool check
//! config`/`check rules` validate the Prometheus files themselves in CI.)

use std::path::{Path, PathBuf};

use pgveil::observe::metrics::METRIC_NAMES;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Every `pgveil_…` metric name in `text`, with histogram series suffixes removed.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("pgveil_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_count", "_sum"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if base == "pgveil_query_duration_seconds" {
                    name = base;
                }
            }
        }
        names.push(name.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboard_and_alerts_only_query_metrics_pgveil_exposes() {
    for file in ["grafana/dashboards/pgveil.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(deploy(file)).expect(file);
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} queries no pgveil metric");
        for name in names {
            assert!(
                METRIC_NAMES.contains(&name.as_str()),
                "{file} queries {name}, which pgveil does not expose"
            );
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/dashboards/pgveil.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "pgveil");
    for needed in [
        "pgveil_denied_queries_total",
        "pgveil_protected_values_total",
        "pgveil_client_connections",
        "pgveil_query_duration_seconds",
    ] {
        assert!(
            dashboard.to_string().contains(needed),
            "the dashboard lacks {needed}"
        );
    }
}

#[test]
fn the_compose_stack_config_loads() {
    let config = pgveil::config::Config::load(&deploy("pgveil/pgveil.yaml"))
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(config.upstream.host, "postgres");
    assert!(config.admin.is_some());
    assert_eq!(
        config.catalog.as_ref().map(|c| c.database.as_deref()),
        Some(Some("crm"))
    );
}
