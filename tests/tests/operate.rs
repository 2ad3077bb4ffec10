//! Operating it: the compose file and the dashboard are valid (checked statically: no Docker
//! here), every service exposes its documented metric families and exports one order's journey as
//! traces, `/readyz` follows the broker connection, and the stages scale horizontally through
//! `kill -9` of a replica of each stage.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use orderflow_tests::*;
use serde_json::{Value, json};

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Applies YAML merge keys (`<<: *anchor`), as docker compose does, to a parsed document.
fn resolve_merges(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            let mut merged = Vec::new();
            for (k, v) in map {
                if k == "<<" {
                    match resolve_merges(v) {
                        Value::Array(items) => merged.extend(items),
                        other => merged.push(other),
                    }
                } else {
                    out.insert(k, resolve_merges(v));
                }
            }
            for source in merged {
                if let Value::Object(m) = source {
                    for (k, v) in m {
                        out.entry(k).or_insert(v);
                    }
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(resolve_merges).collect()),
        other => other,
    }
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo("docker-compose.yml")).expect("docker-compose.yml");
    resolve_merges(serde_yaml_ng::from_str(&text).expect("docker-compose.yml is YAML"))
}

#[test]
fn the_compose_file_satisfies_the_compose_spec() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("tests/data/compose-spec.json")).expect("schema"))
            .expect("json");
    let validator = jsonschema::validator_for(&schema).expect("the compose spec compiles");
    let doc = compose();
    let errors: Vec<String> = validator.iter_errors(&doc).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "docker-compose.yml violates the compose spec:\n{}", errors.join("\n"));
}

#[test]
fn the_compose_stack_is_operable_and_scalable() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");
    for (name, s) in services {
        for dep in s["depends_on"].as_object().map(|d| d.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
            assert!(services.contains_key(&dep), "{name} depends on unknown service {dep}");
        }
    }
    for stage in ["fetcher", "transformer", "writer"] {
        let s = &services[stage];
        assert!(s.get("container_name").is_none(), "{stage} must not pin a container name (breaks --scale)");
        assert!(s.get("ports").is_none(), "{stage} must not publish host ports (breaks --scale)");
        assert!(s["healthcheck"]["test"].to_string().contains("/readyz"), "{stage} healthcheck uses /readyz");
        assert_eq!(s["restart"], "unless-stopped", "{stage} restarts");
        assert_eq!(s["depends_on"]["rabbitmq"]["condition"], "service_healthy", "{stage} waits for a healthy broker");
        let url = s["environment"]["AMQP_URL"].as_str().unwrap_or("");
        assert!(
            url.starts_with(&format!("amqp://{stage}@")),
            "{stage} connects as its own least-privilege user: {url}"
        );
        assert!(
            s["environment"]["AMQP_PASSWORD"].as_str().is_some_and(|p| p.contains("_AMQP_PASSWORD")),
            "{stage}'s password is passed verbatim in AMQP_PASSWORD, not inside the URL"
        );
        assert_eq!(s["environment"]["ORDERFLOW_DECLARE_TOPOLOGY"], "false");
    }
    assert!(services["rabbitmq"]["image"].as_str().is_some_and(|i| i.contains("management")));
    assert!(
        services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
            .as_str()
            .is_some_and(|u| u.contains("RABBITMQ_USER"))
    );
    assert_eq!(services["jaeger"]["profiles"], json!(["tracing"]));
    for file in [
        "deploy/rabbitmq/setup.sh",
        "deploy/prometheus/prometheus.yml",
        "deploy/grafana/dashboards/orderflow.json",
        ".env.example",
        "Dockerfile",
        ".dockerignore",
    ] {
        assert!(repo(file).exists(), "{file} is missing");
    }
    let prometheus: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml")).expect("prometheus.yml"),
    )
    .expect("yaml");
    let names = prometheus["scrape_configs"][0]["dns_sd_configs"][0]["names"].to_string();
    for stage in ["fetcher", "transformer", "writer"] {
        assert!(names.contains(stage), "Prometheus discovers every {stage} replica by DNS");
    }
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage build");
    assert!(dockerfile.contains("USER nonroot"), "runs as a non-root user");
}

/// Every metric family each service registers (with per-account and per-tier series created).
fn exported_families() -> HashSet<String> {
    let fetcher = fetcher::metrics::Metrics::new();
    fetcher.track_account("m1");
    fetcher.cursor_lag.with_label_values(&["m1"]).set(0.0);
    // The scheduled audit's gauges exist once an audit of the account has run (none before: a
    // zero would claim an audit that never happened).
    fetcher.audit_missing.with_label_values(&["m1"]).set(0);
    fetcher.audit_last_complete.with_label_values(&["m1"]).set(0.0);
    let transformer = transformer::Metrics::new();
    let writer = writer::metrics::Metrics::new();
    writer.retries.with_label_values(&["1s"]);
    // Every stage registers the ledger's counter when its ledger starts.
    let ledger = prometheus::Registry::new();
    orderflow_shared::ledger::dropped_counter(&ledger);
    let mut names = HashSet::new();
    for registry in [&fetcher.registry, &transformer.registry, &writer.registry, &ledger] {
        for family in registry.gather() {
            names.insert(family.name().to_string());
        }
    }
    names
}

#[test]
fn the_dashboard_only_charts_metrics_the_services_export() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/dashboards/orderflow.json")).expect("dashboard"),
    )
    .expect("dashboard is JSON");
    let families = exported_families();
    let panels = dashboard["panels"].as_array().expect("panels");
    let titles: Vec<String> = panels.iter().map(|p| p["title"].as_str().unwrap_or("").to_lowercase()).collect();
    for wanted in ["throughput", "queue depth", "retries", "dead letters", "cursor lag", "breaker", "write latency"] {
        assert!(titles.iter().any(|t| t.contains(wanted)), "the dashboard needs a {wanted} panel");
    }
    for panel in panels {
        assert_eq!(panel["datasource"]["uid"], "prometheus", "{}", panel["title"]);
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty());
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("orderflow_") {
                    let family = format!("orderflow_{name}");
                    let base = family.trim_end_matches("_bucket").to_string();
                    assert!(
                        families.contains(&family) || families.contains(&base),
                        "{}: {family} is not exported by any service",
                        panel["title"]
                    );
                }
            }
        }
    }
}

#[test]
fn the_readme_documents_every_metric_family() {
    let readme = std::fs::read_to_string(repo("README.md")).expect("README");
    for family in exported_families() {
        assert!(readme.contains(&family), "README.md does not document {family}");
    }
}

/// A minimal OTLP/HTTP collector: keeps every span it receives.
async fn fake_collector() -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::{Json, Router, routing::post};
    let spans = Arc::new(Mutex::new(Vec::new()));
    let store = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |Json(body): Json<Value>| {
            let store = store.clone();
            async move {
                for rs in body["resourceSpans"].as_array().cloned().unwrap_or_default() {
                    // Resource attributes come in no set order: service.name by its key.
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .and_then(|a| a.iter().find(|kv| kv["key"] == "service.name"))
                        .map(|kv| kv["value"]["stringValue"].clone())
                        .unwrap_or_default();
                    for ss in rs["scopeSpans"].as_array().cloned().unwrap_or_default() {
                        for mut span in ss["spans"].as_array().cloned().unwrap_or_default() {
                            span["service"] = service.clone();
                            store.lock().unwrap_or_else(|e| e.into_inner()).push(span);
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn attr(span: &Value, key: &str) -> String {
    span["attributes"]
        .as_array()
        .and_then(|a| a.iter().find(|kv| kv["key"] == key))
        .map(|kv| kv["value"]["stringValue"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_expose_their_metrics_and_one_orders_journey_is_traced() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("observe");
    let (collector, spans) = fake_collector().await;
    let mut options = StackOptions::new(&broker_url().await, &ns, &log_dir(&ns));
    options.orders = 500;
    options.env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector), ("FETCH_INTERVAL".into(), "1s".into())];
    let stack = Stack::start(options).await?;
    let outcome = async {
        wait_synced(&stack, Duration::from_secs(90)).await?;
        let documented: [(&str, &[&str]); 3] = [
            (
                "fetcher",
                &[
                    "orderflow_fetch_requests_total",
                    "orderflow_fetch_orders_total",
                    "orderflow_fetch_cursor_lag_seconds",
                    "orderflow_fetch_budget_wait_seconds_total",
                    "orderflow_fetch_token_refreshes_total",
                    "orderflow_fetch_passes_total",
                    "orderflow_broker_reconnects_total",
                ],
            ),
            (
                "transformer",
                &[
                    "orderflow_transform_pages_total",
                    "orderflow_transform_records_total",
                    "orderflow_transform_rejected_total",
                    "orderflow_transform_page_seconds_bucket",
                    "orderflow_broker_reconnects_total",
                ],
            ),
            (
                "writer",
                &[
                    "orderflow_write_requests_total",
                    "orderflow_write_duration_seconds_bucket",
                    "orderflow_write_retries_total",
                    "orderflow_dead_letters_total",
                    "orderflow_write_breaker_state",
                    "orderflow_write_inflight",
                    "orderflow_fetch_to_write_seconds_bucket",
                    "orderflow_broker_reconnects_total",
                ],
            ),
        ];
        for (service, families) in documented {
            let role = match service {
                "fetcher" => Role::Fetcher,
                "transformer" => Role::Transformer,
                _ => Role::Writer,
            };
            let admin = stack.replicas(role)[0].admin.expect("admin");
            let text = reqwest::get(format!("http://{admin}/metrics")).await?.text().await?;
            for family in families {
                assert!(text.lines().any(|l| l.starts_with(family)), "{service} /metrics lacks {family}");
            }
            assert_eq!(reqwest::get(format!("http://{admin}/healthz")).await?.status(), 200);
            assert_eq!(readyz(admin).await, 200, "{service} is ready");
        }
        // One order, three services, one trace.
        let order = stack.written_ids().await?.into_iter().next().expect("a written order");
        let found = wait_for(
            "the order's spans from all three services",
            Duration::from_secs(20),
            Duration::from_millis(300),
            || {
                let all = spans.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let order = order.clone();
                async move {
                    let write = all.iter().find(|s| s["name"] == "write record" && attr(s, "o_id") == order);
                    let transform = all.iter().find(|s| s["name"] == "transform record" && attr(s, "o_id") == order);
                    Ok(match (write, transform) {
                        (Some(w), Some(t)) => {
                            let fetch =
                                all.iter().find(|s| s["name"] == "fetch page" && s["traceId"] == t["traceId"]).cloned();
                            match fetch {
                                Some(f) => Ok((f, t.clone(), w.clone())),
                                None => Err("no fetch span yet".to_string()),
                            }
                        }
                        _ => Err(format!("{} spans so far", all.len())),
                    })
                }
            },
        )
        .await?;
        let (fetch, transform, write) = found;
        assert_eq!(write["traceId"], transform["traceId"], "one trace across the hops");
        assert_eq!(transform["parentSpanId"], fetch["spanId"]);
        assert_eq!(write["parentSpanId"], transform["spanId"]);
        assert!(attr(&fetch, "o_id").split(',').any(|id| id == order), "the fetch span lists the order");
        assert!(!attr(&transform, "io_id").is_empty() && !attr(&write, "io_id").is_empty(), "io_id is an attribute");
        assert_eq!(
            (fetch["service"].as_str(), transform["service"].as_str(), write["service"].as_str()),
            (Some("orderflow-fetcher"), Some("orderflow-transformer"), Some("orderflow-writer"))
        );
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

/// Waits until every admin's `/readyz` answers `code`.
async fn all_readyz(
    admins: &[std::net::SocketAddr],
    code: u16,
    what: &str,
    timeout: Duration,
    every: Duration,
) -> anyhow::Result<()> {
    wait_for(what, timeout, every, || async move {
        let mut codes = Vec::new();
        for a in admins {
            codes.push(readyz(*a).await);
        }
        Ok(if codes.iter().all(|c| *c == code) { Ok(()) } else { Err(format!("{codes:?}")) })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_connection_and_work_resumes_after_it_returns() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("readyz");
    let mut options = StackOptions::new(&broker_url().await, &ns, &log_dir(&ns));
    options.orders = 4000;
    options.rate_per_sec = 10;
    options.rate_per_min = 600;
    options.env = vec![("FETCH_INTERVAL".into(), "1s".into())];
    let stack = Stack::start(options).await?;
    let outcome = async {
        let admins: Vec<std::net::SocketAddr> = stack.procs.iter().filter_map(|p| p.admin).collect();
        assert_eq!(admins.len(), 3);
        all_readyz(&admins, 200, "all ready", Duration::from_secs(30), Duration::from_millis(100)).await?;
        wait_for("some orders written", Duration::from_secs(60), Duration::from_millis(200), || async {
            let n = stack.written_ids().await?.len();
            Ok(if n > 200 { Ok(()) } else { Err(format!("{n}")) })
        })
        .await?;
        {
            let _down = BrokerDown::stop()?;
            all_readyz(&admins, 503, "every service unready", Duration::from_secs(30), Duration::from_millis(100))
                .await?;
        }
        all_readyz(&admins, 200, "every service ready again", Duration::from_secs(60), Duration::from_millis(200))
            .await?;
        for a in &admins {
            assert!(metric(*a, "orderflow_broker_reconnects_total", None).await? >= 1.0, "{a} counted its reconnect");
        }
        wait_synced(&stack, Duration::from_secs(180)).await?;
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_scale_out_and_survive_kill_9_of_a_replica_of_each() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("scale");
    let mut options = StackOptions::new(&broker_url().await, &ns, &log_dir(&ns));
    options.accounts = 6;
    options.orders = 2500;
    options.fetchers = 2;
    options.transformers = 3;
    options.writers = 3;
    options.rate_per_sec = 20;
    options.rate_per_min = 1200;
    options.env = vec![("FETCH_INTERVAL".into(), "1s".into()), ("FETCH_PASS_TIME".into(), "5s".into())];
    options.jst_args =
        ["--churn-modify", "3", "--churn-confirm", "3", "--churn-new", "3", "--churn-late", "1", "--late-max", "5s"]
            .map(String::from)
            .to_vec();
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        wait_for("work in flight", Duration::from_secs(90), Duration::from_millis(200), || async {
            let n = stack.written_ids().await?.len();
            Ok(if n > 2000 { Ok(()) } else { Err(format!("{n} written")) })
        })
        .await?;
        for role in [Role::Fetcher, Role::Transformer, Role::Writer] {
            stack.kill9(role, 0).await?;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        stack.post_json(&format!("{}/admin/churn", stack.jst_url), &json!({})).await?;
        let p = wait_synced(&stack, Duration::from_secs(300)).await?;
        assert!(p.confirmed > 10_000, "{p:?}");
        for (role, family, label) in [
            (Role::Fetcher, "orderflow_fetch_orders_total", None),
            (Role::Transformer, "orderflow_transform_records_total", None),
            (Role::Writer, "orderflow_write_requests_total", Some("written")),
        ] {
            for proc in stack.replicas(role).into_iter().filter(|p| p.index != 0) {
                let did = metric(proc.admin.expect("admin"), family, label).await?;
                assert!(did > 0.0, "{} #{} did no work", role.binary(), proc.index);
            }
        }
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}
