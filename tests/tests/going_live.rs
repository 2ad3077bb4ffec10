//! The going-live path, read from the files a user runs (no Docker needed): ports only on
//! 127.0.0.1, healthchecks that keep their start period, the log filter default of the code,
//! every secret required in live mode and listed in .env.example, the setup script's fail-fast
//! rules, and a health probe that ignores proxy variables. What needs containers is in compose.rs.

use std::collections::BTreeSet;

use orderflow_tests::docker::{read_compose, repo};
use serde_json::Value;

fn text(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn user_compose() -> Value {
    read_compose(&repo().join("docker-compose.yml")).expect("docker-compose.yml")
}

/// Every `${NAME...}` variable a file interpolates.
fn variables(text: &str) -> BTreeSet<String> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[test]
fn every_published_port_is_on_127_0_0_1() {
    for file in ["docker-compose.yml", "deploy/cluster/docker-compose.yml"] {
        let doc = read_compose(&repo().join(file)).expect("compose file");
        for (name, service) in doc["services"].as_object().expect("services") {
            for port in service["ports"].as_array().cloned().unwrap_or_default() {
                let port = port.as_str().expect("ports are strings");
                assert!(port.starts_with("127.0.0.1:"), "{file}: {name} publishes {port} beyond this machine");
            }
        }
    }
}

#[test]
fn every_healthcheck_keeps_its_start_period() {
    for file in ["docker-compose.yml", "deploy/cluster/docker-compose.yml"] {
        let doc = read_compose(&repo().join(file)).expect("compose file");
        for (name, service) in doc["services"].as_object().expect("services") {
            let check = &service["healthcheck"];
            if check.is_null() || check["disable"] == true {
                continue;
            }
            assert!(check["start_period"].is_string(), "{file}: {name}'s healthcheck has no start_period");
        }
    }
}

#[test]
fn the_compose_log_filter_default_is_the_codes() {
    let doc = user_compose();
    for stage in ["fetcher", "transformer", "writer"] {
        let rust_log = doc["services"][stage]["environment"]["RUST_LOG"].as_str().expect("RUST_LOG");
        assert_eq!(
            rust_log,
            format!("${{RUST_LOG:-{}}}", orderflow_shared::telemetry::DEFAULT_LOG_FILTER),
            "{stage}: compose's RUST_LOG default differs from the code's"
        );
    }
    assert!(
        text("README.md").contains(&format!("| `RUST_LOG` | `{}` |", orderflow_shared::telemetry::DEFAULT_LOG_FILTER))
    );
}

#[test]
fn going_live_requires_every_secret_and_env_example_lists_them() {
    let live = text("docker-compose.live.yml");
    let example = text(".env.example");
    let required = [
        "RABBITMQ_PASSWORD",
        "FETCHER_AMQP_PASSWORD",
        "TRANSFORMER_AMQP_PASSWORD",
        "WRITER_AMQP_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "JST_BASE_URL",
        "TARGET_URL",
    ];
    for name in required {
        assert!(live.contains(&format!("${{{name}:?")), "docker-compose.live.yml does not require {name}");
    }
    let listed: BTreeSet<String> = example
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect();
    let user = text("docker-compose.yml");
    let secrets: Vec<String> = variables(&user)
        .into_iter()
        .chain(variables(&live))
        .filter(|v| v.contains("PASSWORD") || v.contains("SECRET") || v.contains("TOKEN") || v.contains("AUTH"))
        .collect();
    for name in
        secrets.iter().map(String::as_str).chain(required).chain(["OTEL_EXPORTER_OTLP_ENDPOINT", "COMPOSE_FILE"])
    {
        assert!(listed.contains(name), ".env.example does not list {name}");
    }
    assert!(
        example.contains("COMPOSE_FILE=docker-compose.yml:docker-compose.live.yml"),
        ".env.example turns on the live checks"
    );
    // Passwords are single-quoted, and the file says why.
    for line in example.lines().filter(|l| !l.starts_with('#') && l.contains("PASSWORD=")) {
        let value = line.split_once('=').map(|(_, v)| v).unwrap_or("");
        assert!(value.starts_with('\'') && value.ends_with('\''), ".env.example: {line} is not single-quoted");
    }
    assert!(example.contains(r#"/ ? # @ % " \ $"#), ".env.example explains quoting for / ? # @ % \" \\ $");
}

#[test]
fn stage_passwords_never_travel_inside_a_url() {
    let doc = user_compose();
    for (name, service) in doc["services"].as_object().expect("services") {
        if let Some(url) = service["environment"]["AMQP_URL"].as_str() {
            // The user part, with `${...}` interpolations taken out, has no `:password`.
            let mut userinfo =
                url.trim_start_matches("amqp://").rsplit_once('@').map(|(u, _)| u).unwrap_or("").to_string();
            while let Some(start) = userinfo.find("${") {
                let end = userinfo[start..].find('}').map(|e| start + e + 1).unwrap_or(userinfo.len());
                userinfo.replace_range(start..end, "user");
            }
            assert!(!userinfo.contains(':'), "{name}: AMQP_URL carries a password: {url}");
            assert!(service["environment"]["AMQP_PASSWORD"].is_string(), "{name}: no AMQP_PASSWORD");
        }
    }
}

#[test]
fn the_setup_script_stops_at_once_on_refused_credentials_and_keeps_secrets_off_command_lines() {
    let setup = text("deploy/rabbitmq/setup.sh");
    assert!(setup.contains("401 | 403) refused"), "a refused admin password ends the wait at once");
    assert!(setup.contains("exit 3"));
    assert!(!setup.contains("-u \"$AUTH\"") && !setup.contains("-u \""), "no credentials in curl's arguments");
    assert!(setup.contains("-K \"$TMP/auth\""), "curl reads the credentials from a private file");
    assert!(
        setup.contains("quorum-leaders") && setup.contains("$NS-quorum-leaders"),
        "the policy follows ORDERFLOW_NS"
    );
    assert!(!repo().join("deploy/rabbitmq/definitions.json").exists(), "no fixed-namespace policy file");
}

#[test]
fn the_readme_states_buildkit_and_how_to_run_the_cli_against_the_stack() {
    let readme = text("README.md");
    assert!(readme.contains("BuildKit"));
    assert!(readme.contains("docker compose run --rm cli orderflow dlq stats"));
    let doc = user_compose();
    assert_eq!(doc["services"]["cli"]["profiles"], serde_json::json!(["cli"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_probe_ignores_proxy_variables() -> anyhow::Result<()> {
    orderflow_tests::ensure_binaries();
    let app = axum::Router::new().route("/readyz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    // A proxy that refuses every connection: a probe that used it would fail.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let proxy = format!("http://{dead}");
    let bin = orderflow_lab::stack::default_bin_dir().join("orderflow");
    let status = tokio::process::Command::new(bin)
        .args(["probe", &format!("http://{addr}/readyz")])
        .env("HTTP_PROXY", &proxy)
        .env("http_proxy", &proxy)
        .env("ALL_PROXY", &proxy)
        .env("NO_PROXY", "")
        .status()
        .await?;
    assert!(status.success(), "orderflow probe went through the proxy variables");
    Ok(())
}
