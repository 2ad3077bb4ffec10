//! Harness for the tests that run containers (the compose stack, the RabbitMQ cluster): whether a
//! Docker engine and a Compose tool answer, the locally built test images, a compose project made
//! from a user's compose file with only images and ports swapped, and its cleanup — `down -v`, in
//! a Drop guard, so containers, networks and volumes go even when a test fails. Tests that use
//! Docker hold [`lock`], so they run one at a time across test processes too.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap_or_else(|_| PathBuf::from(".."))
}

/// Runs a command with a timeout (the child is killed when it runs over), capturing its output.
pub async fn run(program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true).stdin(std::process::Stdio::null());
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(output) => output.with_context(|| format!("cannot run {program}")),
        Err(_) => anyhow::bail!("{program} {} did not finish within {timeout:?}", args.join(" ")),
    }
}

/// `run`, failing unless the command exits 0; returns its stdout.
pub async fn run_ok(program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let out = run(program, args, timeout).await?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Compose tool: `docker compose` (v2) when the plugin is there, else `docker-compose` (1.x).
#[derive(Debug, Clone)]
pub struct Docker {
    pub compose: Vec<String>,
}

impl Docker {
    /// A Docker engine and a Compose tool, or why not (the test then prints it and passes).
    pub async fn available() -> Result<Docker, String> {
        orderflow_shared::init_process(); // the TLS provider reqwest needs, before any HTTP client
        match run("docker", &["info", "--format", "{{.ServerVersion}}"], Duration::from_secs(20)).await {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Err(format!("no Docker engine answers: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            Err(e) => return Err(format!("no Docker engine answers: {e:#}")),
        }
        let v2 = run("docker", &["compose", "version"], Duration::from_secs(20)).await;
        if v2.is_ok_and(|o| o.status.success()) {
            return Ok(Docker { compose: vec!["docker".into(), "compose".into()] });
        }
        let v1 = run("docker-compose", &["version"], Duration::from_secs(20)).await;
        if v1.is_ok_and(|o| o.status.success()) {
            return Ok(Docker { compose: vec!["docker-compose".into()] });
        }
        Err("a Docker engine answers but neither `docker compose` nor `docker-compose` is installed".into())
    }

    /// Runs the Compose tool with `args`.
    pub async fn compose(&self, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let mut all: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        run(&self.compose[0], &all, timeout).await
    }
}

/// Held by every test that runs containers: one at a time, across test binaries too (a file lock).
pub struct DockerLock {
    _file: std::fs::File,
}

pub fn lock() -> anyhow::Result<DockerLock> {
    let path = std::env::temp_dir().join("orderflow-tests-docker.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(DockerLock { _file: file })
}

/// The test images by role (`rabbitmq`, `prometheus`, `curl`, `collector`, `haproxy`,
/// `orderflow`, `sims`), built by `deploy/test-images/build` from Debian packages and this build's
/// binaries; cached by content hash, so only the first run (or changed binaries) builds.
pub async fn test_images() -> anyhow::Result<BTreeMap<String, String>> {
    crate::ensure_binaries();
    let bin_dir = orderflow_lab::stack::default_bin_dir();
    let script = repo().join("deploy/test-images/build");
    let start = Instant::now();
    let out = run(
        "bash",
        &[script.to_str().context("script path")?, bin_dir.to_str().context("bin dir")?],
        Duration::from_secs(900),
    )
    .await?;
    anyhow::ensure!(
        out.status.success(),
        "deploy/test-images/build failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let images: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    eprintln!("test images ready in {:.1}s: {images:?}", start.elapsed().as_secs_f64());
    Ok(images)
}

/// Applies YAML merge keys (`<<: *anchor`), as Compose does, to a parsed document.
pub fn resolve_merges(value: Value) -> Value {
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

/// Reads a compose file (merge keys applied).
pub fn read_compose(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value = serde_yaml_ng::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    Ok(resolve_merges(doc))
}

/// The test variant of a user's compose file: each service's image replaced by the local test image
/// `image_for(service, official image)` returns (a service built from the Dockerfile, i.e. with
/// `build`, gets `orderflow`, or `sims` when it builds that target), every published port moved to
/// a free port on 127.0.0.1 (same container port), and the services in `leave_out` removed.
/// Nothing else changes.
pub fn test_variant(
    doc: &Value,
    images: &BTreeMap<String, String>,
    image_for: impl Fn(&str, &str) -> Option<&'static str>,
    leave_out: &[&str],
) -> anyhow::Result<Value> {
    let mut doc = doc.clone();
    let services = doc["services"].as_object_mut().context("services")?;
    for name in leave_out {
        services.remove(*name);
    }
    for (name, service) in services.iter_mut() {
        let s = service.as_object_mut().context("a service")?;
        let role = if let Some(build) = s.remove("build") {
            if build["target"] == "sims" { "sims" } else { "orderflow" }
        } else {
            let official = s.get("image").and_then(Value::as_str).unwrap_or_default().to_string();
            image_for(name, &official).with_context(|| format!("no test image stands in for {name} ({official})"))?
        };
        let image = images.get(role).with_context(|| format!("no {role} test image"))?;
        s.insert("image".into(), Value::String(image.clone()));
        if let Some(ports) = s.get_mut("ports").and_then(Value::as_array_mut) {
            for port in ports.iter_mut() {
                let text = port.as_str().context("ports are written as strings")?;
                let container = text.rsplit(':').next().unwrap_or(text);
                *port = Value::String(format!("127.0.0.1::{container}"));
            }
        }
    }
    Ok(doc)
}

/// A compose project of a test: started from files written in its own directory, removed with
/// `down -v` (and a forced removal of anything left with its label) when dropped.
pub struct Project {
    pub docker: Docker,
    pub name: String,
    pub dir: PathBuf,
    /// Compose files, in order (`-f`).
    pub files: Vec<PathBuf>,
    pub env_file: PathBuf,
    /// Relative paths in the files resolve from here (the user's files' directory).
    pub project_dir: PathBuf,
    pub profiles: Vec<String>,
}

impl Project {
    /// A project named `oftest-<what>-<pid>` whose files live in a fresh directory.
    pub fn new(docker: &Docker, what: &str, project_dir: &Path) -> anyhow::Result<Project> {
        remove_leftovers();
        let name = format!("oftest-{what}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("orderflow-tests/{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Project {
            docker: docker.clone(),
            name,
            env_file: dir.join("test.env"),
            dir,
            files: Vec::new(),
            project_dir: project_dir.to_path_buf(),
            profiles: Vec::new(),
        })
    }

    /// Writes a generated compose file into the project's directory and adds it to the files. It
    /// is written as JSON (a subset of YAML): no YAML re-serialisation can turn `"no"` into `no`.
    pub fn add_generated(&mut self, file_name: &str, doc: &Value) -> anyhow::Result<()> {
        let path = self.dir.join(file_name);
        std::fs::write(&path, serde_json::to_string_pretty(doc)?)?;
        self.files.push(path);
        Ok(())
    }

    /// The compose arguments naming the project, its files, env file and profiles.
    pub fn base_args(&self, env_file: &Path) -> Vec<String> {
        let mut args = vec!["--project-name".to_string(), self.name.clone()];
        args.extend(["--project-directory".to_string(), self.project_dir.display().to_string()]);
        args.extend(["--env-file".to_string(), env_file.display().to_string()]);
        for f in &self.files {
            args.extend(["-f".to_string(), f.display().to_string()]);
        }
        for p in &self.profiles {
            args.extend(["--profile".to_string(), p.clone()]);
        }
        args
    }

    /// Runs `compose <project args> <args>` with the project's env file.
    pub async fn compose(&self, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        self.compose_with_env(&self.env_file, args, timeout).await
    }

    pub async fn compose_with_env(&self, env_file: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let base = self.base_args(env_file);
        let mut all: Vec<&str> = base.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        self.docker.compose(&all, timeout).await
    }

    /// `compose`, failing unless it exits 0 (with its output in the error).
    pub async fn compose_ok(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let out = self.compose(args, timeout).await?;
        anyhow::ensure!(
            out.status.success(),
            "compose {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Ids of the service's containers (running or not), by the labels every Compose version sets.
    pub async fn containers(&self, service: &str) -> anyhow::Result<Vec<String>> {
        let project = format!("label=com.docker.compose.project={}", self.name);
        let svc = format!("label=com.docker.compose.service={service}");
        let out =
            run_ok("docker", &["ps", "-a", "-q", "--filter", &project, "--filter", &svc], Duration::from_secs(30))
                .await?;
        Ok(out.lines().map(str::to_string).filter(|l| !l.is_empty()).collect())
    }

    /// `docker inspect` of one container.
    pub async fn inspect(&self, id: &str) -> anyhow::Result<Value> {
        let out = run_ok("docker", &["inspect", id], Duration::from_secs(30)).await?;
        let all: Value = serde_json::from_str(&out)?;
        Ok(all[0].clone())
    }

    /// The host address (127.0.0.1:port) a container port of the service's first container is published on.
    pub async fn published(&self, service: &str, port: u16) -> anyhow::Result<String> {
        let id =
            self.containers(service).await?.into_iter().next().with_context(|| format!("no {service} container"))?;
        let info = self.inspect(&id).await?;
        let binding = &info["NetworkSettings"]["Ports"][format!("{port}/tcp")][0];
        let host_port = binding["HostPort"].as_str().with_context(|| format!("{service}:{port} is not published"))?;
        anyhow::ensure!(binding["HostIp"] == "127.0.0.1", "{service}:{port} is published beyond 127.0.0.1: {binding}");
        Ok(format!("127.0.0.1:{host_port}"))
    }

    /// Waits until every container of `service` reports `healthy` (at least `count` of them).
    pub async fn wait_healthy(&self, service: &str, count: usize, timeout: Duration) -> anyhow::Result<()> {
        crate::wait_for(&format!("{count} healthy {service}"), timeout, Duration::from_millis(500), || async {
            let ids = self.containers(service).await?;
            let mut states = Vec::new();
            for id in &ids {
                let info = self.inspect(id).await?;
                states.push(info["State"]["Health"]["Status"].as_str().unwrap_or("none").to_string());
            }
            let healthy = states.iter().filter(|s| *s == "healthy").count();
            Ok(if ids.len() >= count && healthy == ids.len() { Ok(()) } else { Err(format!("{states:?}")) })
        })
        .await
    }

    /// The logs of every container of the project (for failures and secret checks).
    pub async fn logs(&self) -> String {
        match self.compose(&["logs", "--no-color"], Duration::from_secs(60)).await {
            Ok(out) => format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            Err(e) => format!("(no logs: {e:#})"),
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let base = self.base_args(&self.env_file);
        let mut args: Vec<&str> = self.docker.compose[1..].iter().map(String::as_str).collect();
        args.extend(base.iter().map(String::as_str));
        args.extend(["down", "-v", "--remove-orphans", "--timeout", "5"]);
        let _ = std::process::Command::new(&self.docker.compose[0])
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        remove_project(&self.name);
    }
}

/// Force-removes containers, networks and volumes labelled with a compose project.
fn remove_project(name: &str) {
    let label = format!("label=com.docker.compose.project={name}");
    let ids = |args: &[&str]| -> Vec<String> {
        std::process::Command::new("docker")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect())
            .unwrap_or_default()
    };
    let quiet = |args: Vec<String>| {
        let _ = std::process::Command::new("docker")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    };
    let containers = ids(&["ps", "-a", "-q", "--filter", &label]);
    if !containers.is_empty() {
        quiet([vec!["rm".into(), "-f".into(), "-v".into()], containers].concat());
    }
    let networks = ids(&["network", "ls", "-q", "--filter", &label]);
    if !networks.is_empty() {
        quiet([vec!["network".into(), "rm".into()], networks].concat());
    }
    let volumes = ids(&["volume", "ls", "-q", "--filter", &label]);
    if !volumes.is_empty() {
        quiet([vec!["volume".into(), "rm".into(), "-f".into()], volumes].concat());
    }
}

/// Removes what an earlier, killed test run left behind (projects named `oftest-*`).
fn remove_leftovers() {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=com.docker.compose.project",
            "--format",
            "{{.Label \"com.docker.compose.project\"}}",
        ])
        .output();
    let Ok(out) = out else { return };
    let mut names: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("oftest-")).map(str::to_string).collect();
    names.sort();
    names.dedup();
    for name in names {
        remove_project(&name);
    }
}

/// GET a JSON document over HTTP (optionally with basic auth), with a timeout.
pub async fn get_json(url: &str, auth: Option<(&str, &str)>) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).no_proxy().build()?;
    let mut req = client.get(url);
    if let Some((user, password)) = auth {
        req = req.basic_auth(user, Some(password));
    }
    let resp = req.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    anyhow::ensure!(status.is_success(), "GET {url}: {status}: {}", text.chars().take(300).collect::<String>());
    Ok(serde_json::from_str(&text)?)
}

/// POST a JSON body, with a timeout.
pub async fn post_json(url: &str, body: &Value) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).no_proxy().build()?;
    let resp = client.post(url).json(body).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    anyhow::ensure!(status.is_success(), "POST {url}: {status}: {text}");
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Every Confirmed order of jst-sim at `jst` (ids) and every record in target-sim at `target`.
pub async fn sync_state(jst: &str, target: &str) -> anyhow::Result<(usize, usize)> {
    let truth = get_json(&format!("http://{jst}/admin/truth?ids_only=true"), None).await?;
    let mut confirmed = std::collections::HashSet::new();
    for account in truth["accounts"].as_array().context("truth accounts")? {
        for id in account["confirmed_ids"].as_array().context("confirmed ids")? {
            confirmed.insert(id.to_string().trim_matches('"').to_string());
        }
    }
    let records = get_json(&format!("http://{target}/admin/records?ids_only=true"), None).await?;
    let written: std::collections::HashSet<String> =
        records["ids"].as_array().context("ids")?.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
    let missing = confirmed.iter().filter(|id| !written.contains(*id)).count();
    Ok((confirmed.len(), missing))
}

/// Waits until every order jst-sim reports Confirmed is in target-sim (twice in a row).
pub async fn wait_all_written(jst: &str, target: &str, timeout: Duration) -> anyhow::Result<usize> {
    let start = Instant::now();
    let mut streak = 0;
    let mut last = String::new();
    while start.elapsed() < timeout {
        match sync_state(jst, target).await {
            Ok((confirmed, 0)) if confirmed > 0 => {
                streak += 1;
                if streak >= 2 {
                    return Ok(confirmed);
                }
            }
            Ok((confirmed, missing)) => {
                streak = 0;
                last = format!("{missing} of {confirmed} Confirmed orders not written");
            }
            Err(e) => {
                streak = 0;
                last = format!("{e:#}");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("not every Confirmed order was written within {timeout:?}: {last}")
}
