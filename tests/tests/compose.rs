//! The compose stack, run for real: the user's docker-compose.yml (plus docker-compose.live.yml, as a
//! .env made from .env.example adds it) with only the images swapped for locally built ones and the
//! ports moved to free ones on 127.0.0.1; Grafana left out (it cannot be built here: the dashboard's
//! queries are run against the real Prometheus instead) and Jaeger replaced by a stand-in OTLP
//! collector. Passwords hold `/ ? # @ % " \ $` and a space, single-quoted in the env file as
//! .env.example says. Skipped, saying why, when no Docker engine or Compose tool answers.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::Context;
use orderflow_shared::{amqp::soft_error, settings::BrokerArgs};
use orderflow_tests::{docker, docker::Project, wait_for};
use serde_json::{Value, json};

const NS: &str = "shop-a.live";
const ADMIN_PASSWORD: &str = r#"a/?#@%"\$b 1"#;
const FETCHER_PASSWORD: &str = r#"f/?#@%"\$ 2"#;
const TRANSFORMER_PASSWORD: &str = r#"t/?#@%"\$ 3"#;
const WRITER_PASSWORD: &str = r#"w/?#@%"\$ 4"#;

/// The env file of the run: live mode (every secret set), the simulators as source and target.
fn env_file(admin_password: &str) -> String {
    format!(
        "ORDERFLOW_NS={NS}\n\
         RABBITMQ_USER=orderflow\n\
         RABBITMQ_PASSWORD='{admin_password}'\n\
         FETCHER_AMQP_PASSWORD='{FETCHER_PASSWORD}'\n\
         TRANSFORMER_AMQP_PASSWORD='{TRANSFORMER_PASSWORD}'\n\
         WRITER_AMQP_PASSWORD='{WRITER_PASSWORD}'\n\
         GRAFANA_ADMIN_PASSWORD='not-started-here'\n\
         JST_BASE_URL=http://jst-sim:8081\n\
         TARGET_URL=http://target-sim:8082/data/write\n\
         JST_SIM_ORDERS=3000\n\
         JST_RATE_PER_SEC=20\n\
         JST_RATE_PER_MIN=1200\n\
         FETCH_INTERVAL=2s\n\
         RETRY_TIERS=1s,5s\n\
         OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318\n"
    )
}

/// Which test image stands in for a service's official image.
fn stand_in(service: &str, image: &str) -> Option<&'static str> {
    match (service, image.split(':').next().unwrap_or(image)) {
        (_, "rabbitmq") => Some("rabbitmq"),
        (_, "curlimages/curl") => Some("curl"),
        (_, "prom/prometheus") => Some("prometheus"),
        (_, "jaegertracing/all-in-one") => Some("collector"),
        _ => None,
    }
}

async fn access_refused(result: Result<(), lapin::Error>, what: &str) -> anyhow::Result<()> {
    match result {
        Err(e) if soft_error(&e) == Some(lapin::protocol::AMQPSoftError::ACCESSREFUSED) => Ok(()),
        Err(e) => anyhow::bail!("{what}: expected ACCESS_REFUSED, got {e}"),
        Ok(()) => anyhow::bail!("{what}: expected ACCESS_REFUSED, but the broker allowed it"),
    }
}

async fn declare(conn: &lapin::Connection, queue: &str) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    let opts = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(queue.into(), opts, Default::default()).await.map(|_| ())
}

async fn get(conn: &lapin::Connection, queue: &str) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack: false }).await.map(|_| ())
}

/// Each stage's broker user is refused what it must not do.
async fn least_privilege(amqp: &str) -> anyhow::Result<()> {
    let connect = |user: &str, password: &str| {
        let args = BrokerArgs {
            amqp_url: format!("amqp://{user}@{amqp}/%2f"),
            amqp_password: Some(password.to_string().into()),
            amqp_ca_file: None,
            ns: NS.into(),
            declare_topology: false,
            amqp_confirm_timeout: orderflow_shared::amqp::publisher::DEFAULT_CONFIRM_TIMEOUT,
        };
        async move { orderflow_shared::amqp::connect(&args, "orderflow-test-privileges").await }
    };
    let transformer = connect("transformer", TRANSFORMER_PASSWORD).await?;
    access_refused(declare(&transformer, &format!("{NS}.sneaky")).await, "transformer declares a queue").await?;
    access_refused(get(&transformer, &format!("{NS}.fetch.default.job")).await, "transformer reads the fetch job")
        .await?;
    access_refused(get(&transformer, &format!("{NS}.records")).await, "transformer reads records").await?;
    let writer = connect("writer", WRITER_PASSWORD).await?;
    access_refused(declare(&writer, &format!("{NS}.sneaky")).await, "writer declares a queue").await?;
    access_refused(get(&writer, &format!("{NS}.pages")).await, "writer reads pages").await?;
    let fetcher = connect("fetcher", FETCHER_PASSWORD).await?;
    access_refused(get(&fetcher, &format!("{NS}.records")).await, "fetcher reads records").await?;
    access_refused(declare(&fetcher, &format!("{NS}.records.sneaky")).await, "fetcher declares outside fetch.*")
        .await?;
    for c in [transformer, writer, fetcher] {
        orderflow_shared::amqp::connect::close(&c).await;
    }
    Ok(())
}

/// Every query of the Grafana dashboard, run against the stack's Prometheus, returns data.
async fn dashboard_queries_return_data(prometheus: &str) -> anyhow::Result<usize> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        docker::repo().join("deploy/grafana/dashboards/orderflow.json"),
    )?)?;
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            exprs.push((
                panel["title"].as_str().unwrap_or("").to_string(),
                target["expr"].as_str().context("expr")?.to_string(),
            ));
        }
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).no_proxy().build()?;
    wait_for("every dashboard query to return data", Duration::from_secs(90), Duration::from_secs(2), || {
        let (client, exprs) = (client.clone(), exprs.clone());
        async move {
            let mut empty = Vec::new();
            for (title, expr) in &exprs {
                let answer: Value = client
                    .get(format!("http://{prometheus}/api/v1/query"))
                    .query(&[("query", expr.as_str())])
                    .send()
                    .await?
                    .json()
                    .await?;
                anyhow::ensure!(answer["status"] == "success", "{title}: {expr}: {answer}");
                if answer["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                    empty.push(format!("{title}: {expr}"));
                }
            }
            Ok(if empty.is_empty() { Ok(exprs.len()) } else { Err(format!("no data yet for {empty:?}")) })
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_comes_up_syncs_scales_and_keeps_each_stage_to_its_rights() -> anyhow::Result<()> {
    let docker = match docker::Docker::available().await {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED the compose test: {why}");
            return Ok(());
        }
    };
    let _docker = docker::lock()?;
    // Longer than other tests: the first one builds the test images from Debian packages.
    let _heavy = orderflow_tests::heavy_for(std::time::Duration::from_secs(45 * 60)).await;
    let started = Instant::now();
    let repo = docker::repo();

    // Going live with a secret unset: compose refuses, naming it.
    let mut project = Project::new(&docker, "compose", &repo)?;
    let partial = project.dir.join("partial.env");
    std::fs::write(
        &partial,
        env_file(ADMIN_PASSWORD).replace(&format!("WRITER_AMQP_PASSWORD='{WRITER_PASSWORD}'\n"), ""),
    )?;
    let (base, live) = (repo.join("docker-compose.yml"), repo.join("docker-compose.live.yml"));
    let mut args: Vec<&str> = vec!["--project-directory", repo.to_str().context("repo")?];
    args.extend(["--env-file", partial.to_str().context("path")?]);
    args.extend(["-f", base.to_str().context("path")?, "-f", live.to_str().context("path")?, "config"]);
    let refused = docker.compose(&args, Duration::from_secs(60)).await?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("WRITER_AMQP_PASSWORD"), "compose did not refuse: {stderr}");

    // The test variant of the user's files.
    let images = docker::test_images().await?;
    let user = docker::read_compose(&repo.join("docker-compose.yml"))?;
    project.add_generated("docker-compose.yml", &docker::test_variant(&user, &images, stand_in, &["grafana"])?)?;
    let mut live = docker::read_compose(&repo.join("docker-compose.live.yml"))?;
    live["services"].as_object_mut().context("services")?.remove("grafana");
    project.add_generated("docker-compose.live.yml", &live)?;
    project.profiles = vec!["tracing".into()];
    std::fs::write(&project.env_file, env_file(ADMIN_PASSWORD))?;

    let t = Instant::now();
    let up = project.compose(&["up", "-d"], Duration::from_secs(400)).await?;
    if !up.status.success() {
        anyhow::bail!(
            "compose up failed: {}\n--- logs ---\n{}",
            String::from_utf8_lossy(&up.stderr),
            project.logs().await
        );
    }
    for one_shot in ["rabbitmq-setup", "topology"] {
        let id = project.containers(one_shot).await?.into_iter().next().context(one_shot)?;
        let state = project.inspect(&id).await?["State"].clone();
        assert_eq!(state["ExitCode"], 0, "{one_shot} exit: {state}");
    }
    for stage in ["fetcher", "transformer", "writer", "jst-sim", "target-sim"] {
        project.wait_healthy(stage, 1, Duration::from_secs(120)).await?;
    }
    eprintln!("stack up and healthy in {:.1}s", t.elapsed().as_secs_f64());

    let jst = project.published("jst-sim", 8081).await?;
    let target = project.published("target-sim", 8082).await?;
    let amqp = project.published("rabbitmq", 5672).await?;
    let management = project.published("rabbitmq", 15672).await?;
    let prometheus = project.published("prometheus", 9090).await?;
    let collector = project.published("jaeger", 16686).await?;

    // A sync with churn: every Confirmed order written.
    let t = Instant::now();
    docker::post_json(&format!("http://{jst}/admin/limits?account=m1"), &json!({"per_sec": 20, "per_min": 1200}))
        .await?;
    let churn = json!({"modify_per_sec": 5, "confirm_per_sec": 5, "new_per_sec": 5, "cancel_per_sec": 1,
                       "late_per_sec": 1, "late_max_secs": 5});
    docker::post_json(&format!("http://{jst}/admin/churn"), &churn).await?;
    tokio::time::sleep(Duration::from_secs(15)).await; // churn while the backfill pages
    docker::post_json(&format!("http://{jst}/admin/churn"), &json!({})).await?;
    let confirmed = docker::wait_all_written(&jst, &target, Duration::from_secs(240)).await?;
    eprintln!("{confirmed} Confirmed orders written in {:.1}s", t.elapsed().as_secs_f64());

    // Scale out; Prometheus finds every replica by DNS and every dashboard query has data.
    let t = Instant::now();
    project
        .compose_ok(
            &["up", "-d", "--no-recreate", "--scale", "transformer=3", "--scale", "writer=4"],
            Duration::from_secs(300),
        )
        .await?;
    project.wait_healthy("transformer", 3, Duration::from_secs(120)).await?;
    project.wait_healthy("writer", 4, Duration::from_secs(120)).await?;
    let wanted: BTreeMap<&str, usize> = [("fetcher", 1), ("transformer", 3), ("writer", 4)].into();
    wait_for("Prometheus to scrape every replica", Duration::from_secs(90), Duration::from_secs(2), || async {
        let targets = docker::get_json(&format!("http://{prometheus}/api/v1/targets"), None).await?;
        let mut up: BTreeMap<String, usize> = BTreeMap::new();
        let mut other = Vec::new();
        for t in targets["data"]["activeTargets"].as_array().context("activeTargets")? {
            if t["health"] == "up" {
                let key = t["labels"]["service"].as_str().or(t["labels"]["job"].as_str()).unwrap_or("?");
                *up.entry(key.to_string()).or_default() += 1;
            } else {
                other.push(format!("{} {}", t["scrapeUrl"], t["health"]));
            }
        }
        let ok =
            wanted.iter().all(|(s, n)| up.get(*s) == Some(n)) && up.get("rabbitmq") == Some(&1) && other.is_empty();
        Ok(if ok { Ok(()) } else { Err(format!("up {up:?}, not up {other:?}")) })
    })
    .await?;
    let queries = dashboard_queries_return_data(&prometheus).await?;
    eprintln!("scaled, 8 replicas scraped, {queries} dashboard queries with data in {:.1}s", t.elapsed().as_secs_f64());

    // Replicas are named by their container hostname: metrics, connection names, fetch status.
    let mut hostnames = BTreeMap::new();
    for stage in ["fetcher", "transformer", "writer"] {
        for id in project.containers(stage).await? {
            let host = project.inspect(&id).await?["Config"]["Hostname"].as_str().context("hostname")?.to_string();
            hostnames.insert(host, stage);
        }
    }
    assert_eq!(hostnames.len(), 8, "{hostnames:?}");
    let info =
        docker::get_json(&format!("http://{prometheus}/api/v1/query?query=orderflow_replica_info"), None).await?;
    let replicas: BTreeSet<String> = info["data"]["result"]
        .as_array()
        .context("result")?
        .iter()
        .filter_map(|r| r["metric"]["replica"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        replicas,
        hostnames.keys().cloned().collect::<BTreeSet<_>>(),
        "orderflow_replica_info names the containers"
    );
    let auth = Some(("orderflow", ADMIN_PASSWORD));
    let connections = docker::get_json(&format!("http://{management}/api/connections"), auth).await?;
    let names: Vec<String> = connections
        .as_array()
        .context("connections")?
        .iter()
        .filter_map(|c| c["client_properties"]["connection_name"].as_str().map(str::to_string))
        .collect();
    for (host, stage) in &hostnames {
        let wanted = format!("orderflow-{stage}@{NS}#{host}");
        assert!(names.contains(&wanted), "no connection named {wanted}: {names:?}");
    }

    // The queue-leader policy follows ORDERFLOW_NS.
    let records = docker::get_json(&format!("http://{management}/api/queues/%2F/{NS}.records"), auth).await?;
    assert_eq!(records["policy"], format!("{NS}-quorum-leaders"), "{records}");
    assert_eq!(records["type"], "quorum");

    // Spans from all three stages reach the collector.
    wait_for("spans from every stage", Duration::from_secs(60), Duration::from_secs(1), || async {
        let spans = docker::get_json(&format!("http://{collector}/spans"), None).await?;
        let services: BTreeSet<String> = spans
            .as_array()
            .context("spans")?
            .iter()
            .filter_map(|s| s["service"].as_str().map(str::to_string))
            .collect();
        let all =
            ["orderflow-fetcher", "orderflow-transformer", "orderflow-writer"].iter().all(|s| services.contains(*s));
        Ok(if all { Ok(()) } else { Err(format!("{services:?}")) })
    })
    .await?;

    // Least privilege, with the stages' own passwords, through the published port.
    least_privilege(&amqp).await?;

    // The operator CLI against the stack.
    let cli = project.compose(&["run", "--rm", "cli", "orderflow", "dlq", "stats"], Duration::from_secs(120)).await?;
    assert!(
        cli.status.success(),
        "docker compose run --rm cli orderflow dlq stats: {}{}",
        String::from_utf8_lossy(&cli.stdout),
        String::from_utf8_lossy(&cli.stderr)
    );

    // The ledger, written by the three stages as their least-privilege users: one order's trace
    // from the CLI shows it fetched, transformed and written.
    let truth = docker::get_json(&format!("http://{jst}/admin/truth?ids_only=true"), None).await?;
    let id = truth["accounts"][0]["confirmed_ids"][0].to_string();
    let trace = project.compose(&["run", "--rm", "cli", "orderflow", "trace", &id], Duration::from_secs(120)).await?;
    let said = format!("{}{}", String::from_utf8_lossy(&trace.stdout), String::from_utf8_lossy(&trace.stderr));
    assert!(trace.status.success(), "orderflow trace {id}: {said}");
    for kind in ["fetched", "transformed", "written"] {
        assert!(said.contains(kind), "orderflow trace {id} shows {kind}: {said}");
    }

    // rabbitmq-setup after the admin password changed in .env: stops at once and says what to do.
    let changed = project.dir.join("changed.env");
    std::fs::write(&changed, env_file("a-new-password"))?;
    let t = Instant::now();
    let setup = project
        .compose_with_env(&changed, &["run", "--rm", "--no-deps", "rabbitmq-setup"], Duration::from_secs(120))
        .await?;
    let took = t.elapsed();
    let said = format!("{}{}", String::from_utf8_lossy(&setup.stdout), String::from_utf8_lossy(&setup.stderr));
    assert_eq!(setup.status.code(), Some(3), "{said}");
    assert!(said.contains("401") && said.contains("change_password") && said.contains("down -v"), "{said}");
    assert!(!said.contains("a-new-password"), "the password is not printed: {said}");
    assert!(took < Duration::from_secs(30), "setup gave up after {took:?}, not at once");

    // No secret in any log.
    let logs = project.logs().await;
    for secret in [ADMIN_PASSWORD, FETCHER_PASSWORD, TRANSFORMER_PASSWORD, WRITER_PASSWORD] {
        assert!(!logs.contains(secret), "a password appears in the logs");
    }
    eprintln!("compose test passed in {:.1}s", started.elapsed().as_secs_f64());
    drop(project);
    Ok(())
}

/// `orderflow demo` on a machine without a broker: it starts RabbitMQ in Docker and says so, or
/// (no Docker, or no registry to pull from, as here) prints the one command that gets a broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_without_a_broker_starts_one_in_docker_or_prints_the_command_that_gets_one() -> anyhow::Result<()> {
    orderflow_tests::ensure_binaries();
    let _docker = docker::lock()?;
    // A local port nothing listens on stands for "no broker on this machine".
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let bin = orderflow_lab::stack::default_bin_dir().join("orderflow");
    let t = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(bin)
            .args(["demo", "--orders", "300", "--timeout", "300"])
            .env("AMQP_URL", format!("amqp://guest:guest@{closed}/%2f"))
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("starting one in Docker"), "{said}");
    if out.status.success() {
        assert!(said.contains("RabbitMQ is running in Docker") && said.contains("synced"), "{said}");
    } else {
        assert!(said.contains(orderflow_lab::demo_broker::GET_A_BROKER), "{said}");
    }
    eprintln!("demo without a broker ({:.1}s): {}", t.elapsed().as_secs_f64(), said.lines().last().unwrap_or(""));
    Ok(())
}
