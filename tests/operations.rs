//! Running Strata like production: the docker compose file, the Kubernetes
//! manifests and the monitoring files agree with the server's configuration
//! and metrics (no Docker engine or cluster runs here, so they are parsed
//! and cross-checked); the operator CLI and the Python client example work
//! against the real stack.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use strata_proto::v1::{self, value::Kind};
use strata_server::config::{Config, FileConfig};
use strata_server::metrics::{Kind as MetricKind, METRICS};
use strata_tests::wire::{keyed_row, row, ts, v, write};
use strata_tests::{Env, TEST_VIEWS, client, integration_tests, repo_root, sample, scrape, strata_binary};
use yaml_rust2::{Yaml, YamlLoader};

integration_tests!(
    the_compose_file_matches_the_docker_config_and_the_monitoring_files,
    the_kubernetes_manifests_agree_with_each_other_and_the_server,
    alerts_and_dashboard_use_only_metrics_strata_exports_and_red_metrics_are_live,
    the_cli_looks_up_rows_views_shards_and_health_and_fails_in_one_line,
    the_python_client_example_reads_typed_rows,
);

fn yaml_docs(path: &Path) -> Result<Vec<Yaml>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    YamlLoader::load_from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn yaml(path: &Path) -> Result<Yaml> {
    yaml_docs(path)?.into_iter().next().with_context(|| format!("{} is empty", path.display()))
}

/// A scalar as text (strings, numbers, booleans).
fn text(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(n) => Some(n.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A list of scalars (or a single string) as texts.
fn texts(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(items) => items.iter().filter_map(text).collect(),
        other => text(other).into_iter().collect(),
    }
}

fn keys(y: &Yaml) -> Vec<String> {
    y.as_hash().map(|h| h.keys().filter_map(text).collect()).unwrap_or_default()
}

fn port(addr: &std::net::SocketAddr) -> String {
    addr.port().to_string()
}

/// The value of `name=` in a libpq connection string.
fn conn_field<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    url.split_whitespace().find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
}

/// Seconds in a compose duration ("15s") or a bare number.
fn seconds(text: &str) -> Result<u64> {
    Ok(text.strip_suffix('s').unwrap_or(text).parse()?)
}

async fn the_compose_file_matches_the_docker_config_and_the_monitoring_files(_env: &'static Env) -> Result<()> {
    let root = repo_root();
    let compose = yaml(&root.join("docker-compose.yml"))?;
    let services = &compose["services"];
    let names = keys(services);
    let config = FileConfig::load(&[root.join("config/strata.toml"), root.join("config/docker.toml")])?.validate()?;

    // Redis: six cluster nodes, the configured seeds among them, and a
    // one-shot job that waits for all six before forming the cluster.
    let nodes: Vec<&String> = names
        .iter()
        .filter(|n| texts(&services[n.as_str()]["command"]).contains(&"--cluster-enabled".into()))
        .collect();
    ensure!(nodes.len() == 6, "the compose file should run 6 Redis Cluster nodes, runs {nodes:?}");
    for seed in &config.redis.nodes {
        let (host, seed_port) = seed.rsplit_once(':').context("redis seed")?;
        ensure!(nodes.iter().any(|n| *n == host), "redis seed {seed} is not a cluster node service");
        let command = texts(&services[host]["command"]);
        let at = command.iter().position(|a| a == "--port").context("--port")?;
        ensure!(command[at + 1] == seed_port, "{host} listens on {}, the config says {seed_port}", command[at + 1]);
    }
    let init = &services["redis-cluster-init"];
    for node in &nodes {
        ensure!(
            text(&init["depends_on"][node.as_str()]["condition"]).as_deref() == Some("service_healthy"),
            "redis-cluster-init must wait for {node} to be healthy"
        );
        ensure!(!services[node.as_str()]["healthcheck"].is_badvalue(), "{node} has no healthcheck");
    }
    let script = texts(&init["command"]).join("\n");
    ensure!(script.contains("for n in 1 2 3 4 5 6") && script.contains("--cluster-replicas 1"), "{script}");

    // PostgreSQL: each configured shard is a healthy service Strata waits for.
    let strata = &services["strata"];
    for shard in &config.shards {
        let host = conn_field(&shard.url, "host").context("shard host")?;
        ensure!(names.iter().any(|n| n == host), "shard {} ({host}) is not a compose service", shard.name);
        let service = &services[host];
        ensure!(text(&service["image"]).is_some_and(|i| i.starts_with("postgres:")), "{host} is not PostgreSQL");
        ensure!(conn_field(&shard.url, "port").unwrap_or("5432") == "5432", "{host}: the image listens on 5432");
        ensure!(!service["healthcheck"].is_badvalue(), "{host} has no healthcheck");
        ensure!(text(&strata["depends_on"][host]["condition"]).as_deref() == Some("service_healthy"));
    }

    // Strata: the configuration files the image holds, both ports
    // published, a health check on the gRPC port, time to drain.
    ensure!(
        text(&strata["depends_on"]["redis-cluster-init"]["condition"]).as_deref()
            == Some("service_completed_successfully")
    );
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile"))?;
    ensure!(dockerfile.contains("COPY config /etc/strata"), "the image must hold config/ at /etc/strata");
    let command = texts(&strata["command"]);
    for file in command.iter().filter_map(|a| a.strip_prefix("/etc/strata/")) {
        ensure!(root.join("config").join(file).is_file(), "strata's command names config/{file}, which does not exist");
    }
    ensure!(config.grpc_addr.ip().is_unspecified() && config.metrics_addr.ip().is_unspecified());
    let published = texts(&strata["ports"]);
    let feast = config.feast_http_addr.context("config/docker.toml serves Feast's HTTP API")?;
    for addr in [config.grpc_addr, config.metrics_addr, feast] {
        let mapping = format!("{0}:{0}", port(&addr));
        ensure!(published.contains(&mapping), "strata does not publish {mapping}: {published:?}");
    }
    let health = texts(&strata["healthcheck"]["test"]).join(" ");
    ensure!(health.contains("strata health") && health.contains(&format!(":{}", port(&config.grpc_addr))), "{health}");
    let grace = seconds(&text(&strata["stop_grace_period"]).context("stop_grace_period")?)?;
    ensure!(grace > config.drain_timeout.as_secs(), "stop_grace_period {grace}s must exceed the drain time");

    // Prometheus scrapes Strata's metrics port and loads the alert rules.
    let mounts = |service: &str| -> Result<Vec<(String, String)>> {
        texts(&services[service]["volumes"])
            .iter()
            .map(|v| {
                let mut parts = v.split(':');
                let (host, inside) = (parts.next().context("volume")?, parts.next().context("volume")?);
                ensure!(root.join(host).exists(), "{service} mounts {host}, which does not exist");
                Ok((host.to_owned(), inside.to_owned()))
            })
            .collect()
    };
    let prometheus_mounts = mounts("prometheus")?;
    let prometheus = yaml(&root.join("deploy/prometheus/prometheus.yml"))?;
    let targets = texts(&prometheus["scrape_configs"][0]["static_configs"][0]["targets"]);
    ensure!(targets == [format!("strata:{}", port(&config.metrics_addr))], "prometheus scrapes {targets:?}");
    for rules in texts(&prometheus["rule_files"]) {
        ensure!(prometheus_mounts.iter().any(|(_, inside)| *inside == rules), "{rules} is not mounted");
    }
    ensure!(
        prometheus_mounts.iter().any(|(_, inside)| inside == "/etc/prometheus/prometheus.yml"),
        "prometheus.yml is not mounted where --config.file looks"
    );

    // Grafana: the provisioned data source is that Prometheus, the
    // dashboards folder is where the provider looks, the dashboard uses the
    // data source's uid.
    let grafana_mounts = mounts("grafana")?;
    let inside = |host: &str| grafana_mounts.iter().find(|(h, _)| h == host).map(|(_, i)| i.clone());
    let provisioning = inside("./deploy/grafana/provisioning").context("provisioning not mounted")?;
    ensure!(provisioning == "/etc/grafana/provisioning");
    let dashboards = inside("./deploy/grafana/dashboards").context("dashboards not mounted")?;
    let provider = yaml(&root.join("deploy/grafana/provisioning/dashboards/strata.yml"))?;
    ensure!(text(&provider["providers"][0]["options"]["path"]) == Some(dashboards.clone()));
    let datasource = yaml(&root.join("deploy/grafana/provisioning/datasources/prometheus.yml"))?;
    let datasource = &datasource["datasources"][0];
    ensure!(text(&datasource["url"]).as_deref() == Some("http://prometheus:9090"), "grafana's data source url");
    let uid = text(&datasource["uid"]).context("datasource uid")?;
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("deploy/grafana/dashboards/strata.json"))?)?;
    for panel in dashboard["panels"].as_array().context("panels")? {
        if panel["type"] != "row" {
            ensure!(panel["datasource"]["uid"] == uid.as_str(), "panel {} uses another data source", panel["title"]);
        }
    }
    let home =
        text(&services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).context("home")?;
    ensure!(home == format!("{dashboards}/strata.json"), "grafana's home dashboard {home}");

    // The TLS override: the files it reads are the image's and the mounted
    // folder's, and with the example principals they make a configuration
    // the server accepts, TLS and authentication on.
    let tls = yaml(&root.join("docker-compose.tls.yml"))?;
    let strata = &tls["services"]["strata"];
    let mount = texts(&strata["volumes"]).first().cloned().context("the override mounts deploy/tls")?;
    let (host, inside) = mount.split_once(':').context("volume")?;
    ensure!(host == "./deploy/tls" && root.join("deploy/tls/README.md").is_file(), "mounts {host}");
    let inside = inside.trim_end_matches(":ro");
    let command = texts(&strata["command"]);
    ensure!(command.contains(&format!("{inside}/principals.toml")), "serve reads {command:?}");
    let mut file = FileConfig::load(&[root.join("config/strata.toml"), root.join("config/docker.toml")])?;
    let principals = std::fs::read_to_string(root.join("deploy/k8s/tls/principals.example.toml"))?;
    file.auth = FileConfig::from_toml(&principals)?.auth;
    let env = &strata["environment"];
    file.tls.cert_file = text(&env["STRATA_TLS__CERT_FILE"]).context("cert")?;
    file.tls.key_file = text(&env["STRATA_TLS__KEY_FILE"]).context("key")?;
    file.auth.enabled = text(&env["STRATA_AUTH__ENABLED"]).as_deref() == Some("true");
    let secured = file.validate().context("docker-compose.tls.yml's configuration")?;
    let files = &secured.tls.as_ref().context("TLS on")?.files;
    ensure!(files.cert.starts_with(inside) && files.key.starts_with(inside) && secured.auth.required());
    let check = texts(&strata["healthcheck"]["test"]);
    ensure!(check.iter().any(|a| a.starts_with("https://")), "the health check speaks TLS: {check:?}");
    Ok(())
}

/// The documents of every file the kustomization lists, by kind.
fn manifests() -> Result<Vec<Yaml>> {
    let dir = repo_root().join("deploy/k8s");
    let kustomization = yaml(&dir.join("kustomization.yaml"))?;
    let listed = texts(&kustomization["resources"]);
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    ensure!(sorted == on_disk, "kustomization lists {listed:?}, the folder holds {on_disk:?}");
    let mut docs = Vec::new();
    for file in listed {
        docs.extend(yaml_docs(&dir.join(file))?);
    }
    Ok(docs)
}

fn find<'a>(docs: &'a [Yaml], kind: &str) -> Result<&'a Yaml> {
    let found: Vec<&Yaml> = docs.iter().filter(|d| text(&d["kind"]).as_deref() == Some(kind)).collect();
    ensure!(found.len() == 1, "expected one {kind}, found {}", found.len());
    Ok(found[0])
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    selector.as_hash().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k.as_str().unwrap_or("")] == *v))
}

async fn the_kubernetes_manifests_agree_with_each_other_and_the_server(_env: &'static Env) -> Result<()> {
    let docs = manifests()?;
    let configmap = find(&docs, "ConfigMap")?;
    let deployment = find(&docs, "Deployment")?;
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    let container = &pod["spec"]["containers"][0];

    // The configuration in the ConfigMap is one the server accepts.
    let toml = text(&configmap["data"]["strata.toml"]).context("strata.toml in the ConfigMap")?;
    let config: Config = FileConfig::from_toml(&toml)?.validate().context("the ConfigMap's strata.toml")?;
    ensure!(config.grpc_addr.ip().is_unspecified(), "in a pod, Strata must listen on 0.0.0.0");
    let args = texts(&container["args"]);
    let mount = text(&container["volumeMounts"][0]["mountPath"]).context("config mount")?;
    ensure!(args.contains(&format!("{mount}/strata.toml")), "serve reads {args:?}, the ConfigMap is at {mount}");
    ensure!(
        text(&pod["spec"]["volumes"][0]["configMap"]["name"]) == text(&configmap["metadata"]["name"]),
        "the pod mounts another ConfigMap"
    );

    // Ports, probes and the drain.
    let container_port = |name: &str| -> Option<i64> {
        container["ports"].as_vec()?.iter().find(|p| p["name"].as_str() == Some(name))?["containerPort"].as_i64()
    };
    ensure!(container_port("grpc") == Some(i64::from(config.grpc_addr.port())));
    ensure!(container_port("metrics") == Some(i64::from(config.metrics_addr.port())));
    let feast = config.feast_http_addr.context("the ConfigMap serves Feast's HTTP API")?;
    ensure!(container_port("feast-http") == Some(i64::from(feast.port())), "feast-http container port");
    let annotations = &pod["metadata"]["annotations"];
    ensure!(text(&annotations["prometheus.io/port"]) == Some(port(&config.metrics_addr)), "scrape annotation port");
    for (probe, service) in [("startupProbe", "liveness"), ("livenessProbe", "liveness"), ("readinessProbe", "")] {
        let grpc = &container[probe]["grpc"];
        ensure!(grpc["port"].as_i64() == Some(i64::from(config.grpc_addr.port())), "{probe} probes another port");
        ensure!(grpc["service"].as_str() == Some(service), "{probe} asks health service {:?}", grpc["service"]);
    }
    let pre_stop = texts(&container["lifecycle"]["preStop"]["exec"]["command"]);
    ensure!(pre_stop.first().map(String::as_str) == Some("sleep"), "preStop: {pre_stop:?}");
    let pre_stop: u64 = pre_stop[1].parse()?;
    let grace = pod["spec"]["terminationGracePeriodSeconds"].as_i64().context("grace period")?.unsigned_abs();
    ensure!(
        grace > pre_stop + config.drain_timeout.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + drain {}s",
        config.drain_timeout.as_secs()
    );
    ensure!(!container["resources"]["requests"]["cpu"].is_badvalue(), "no CPU request (the HPA needs one)");
    let memory = text(&container["resources"]["limits"]["memory"]).context("memory limit")?;
    let memory: u64 = memory.strip_suffix("Mi").context("memory in Mi")?.parse::<u64>()? << 20;
    ensure!(memory > config.l1_max_bytes, "the memory limit must leave room beyond L1's {} bytes", config.l1_max_bytes);

    // The Services, the autoscaler and the disruption budget point at the pods.
    let name = text(&deployment["metadata"]["name"]).context("deployment name")?;
    let services: Vec<&Yaml> = docs.iter().filter(|d| d["kind"].as_str() == Some("Service")).collect();
    ensure!(!services.is_empty());
    for service in services {
        ensure!(selects(&service["spec"]["selector"], labels), "a Service selects other pods");
        for p in service["spec"]["ports"].as_vec().context("service ports")? {
            let target = text(&p["targetPort"]).context("targetPort")?;
            ensure!(container_port(&target).is_some(), "a Service targets port {target}, which the pod does not name");
        }
    }
    let hpa = find(&docs, "HorizontalPodAutoscaler")?;
    ensure!(text(&hpa["spec"]["scaleTargetRef"]["name"]) == Some(name.clone()));
    let metrics = hpa["spec"]["metrics"].as_vec().context("hpa metrics")?;
    ensure!(metrics.iter().any(|m| m["resource"]["name"].as_str() == Some("cpu")), "no CPU target");
    ensure!(
        metrics.iter().any(|m| m["pods"]["metric"]["name"].as_str() == Some("strata_grpc_requests_per_second")),
        "no requests-per-second target"
    );
    ensure!(hpa["spec"]["minReplicas"].as_i64() >= Some(2), "fewer than 2 replicas cannot survive a disruption");
    let pdb = find(&docs, "PodDisruptionBudget")?;
    ensure!(selects(&pdb["spec"]["selector"]["matchLabels"], labels), "the PodDisruptionBudget selects other pods");
    ensure!(selects(&deployment["spec"]["selector"]["matchLabels"], labels));

    // The TLS overlay: its patch, the example principals and the base
    // ConfigMap make a configuration the server accepts, with TLS and
    // authentication on, and its probes use the metrics port's plaintext
    // /live and /ready (kubelet's gRPC probes cannot speak TLS).
    let overlay = repo_root().join("deploy/k8s/tls");
    let kustomization = yaml(&overlay.join("kustomization.yaml"))?;
    ensure!(texts(&kustomization["resources"]) == ["../"], "the overlay builds on the base");
    let patch = yaml(&overlay.join("deployment-patch.yaml"))?;
    let patched = &patch["spec"]["template"]["spec"];
    let container = &patched["containers"][0];
    let args = texts(&container["args"]);
    let principals_mount = container["volumeMounts"]
        .as_vec()
        .and_then(|m| m.iter().find(|m| m["name"].as_str() == Some("principals")))
        .and_then(|m| text(&m["mountPath"]))
        .context("principals mount")?;
    ensure!(args.contains(&format!("{principals_mount}/principals.toml")), "serve reads {args:?}");
    let mut file = FileConfig::from_toml(&format!(
        "{toml}\n{}",
        std::fs::read_to_string(overlay.join("principals.example.toml"))?
    ))?;
    for variable in container["env"].as_vec().context("env")? {
        let (name, value) = (text(&variable["name"]).context("name")?, text(&variable["value"]).context("value")?);
        match name.as_str() {
            "STRATA_TLS__CERT_FILE" => file.tls.cert_file = value,
            "STRATA_TLS__KEY_FILE" => file.tls.key_file = value,
            "STRATA_AUTH__ENABLED" => file.auth.enabled = value == "true",
            other => bail!("the overlay sets {other}, which this test does not know"),
        }
    }
    let secured = file.validate().context("the TLS overlay's configuration")?;
    ensure!(secured.tls.is_some() && secured.auth.required(), "the overlay turns TLS and authentication on");
    let secret_mount = |volume: &str| -> Result<String> {
        let mount = container["volumeMounts"]
            .as_vec()
            .and_then(|m| m.iter().find(|m| m["name"].as_str() == Some(volume)))
            .and_then(|m| text(&m["mountPath"]))
            .context("mount")?;
        let secret = patched["volumes"]
            .as_vec()
            .and_then(|v| v.iter().find(|v| v["name"].as_str() == Some(volume)))
            .and_then(|v| text(&v["secret"]["secretName"]));
        ensure!(secret.is_some(), "volume {volume} is no Secret");
        Ok(mount)
    };
    let tls_mount = secret_mount("tls")?;
    secret_mount("principals")?;
    let tls = secured.tls.as_ref().context("tls")?;
    ensure!(tls.files.cert.starts_with(&tls_mount) && tls.files.key.starts_with(&tls_mount), "certificate paths");
    for (probe, path) in [("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let get = &container[probe]["httpGet"];
        ensure!(
            text(&get["port"]).as_deref() == Some("metrics") && text(&get["path"]).as_deref() == Some(path),
            "{probe}"
        );
    }
    ensure!(!secured.tls.as_ref().is_some_and(|t| t.metrics), "the probes' port stays plaintext");
    Ok(())
}

/// `strata_…` names in `text`, with histogram series suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("strata_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        names.insert(base.to_owned());
    }
    names
}

async fn alerts_and_dashboard_use_only_metrics_strata_exports_and_red_metrics_are_live(
    env: &'static Env,
) -> Result<()> {
    let root = repo_root();
    let alerts = yaml(&root.join("deploy/prometheus/alerts.yml"))?;
    let mut used = BTreeSet::new();
    let mut alert_names = BTreeSet::new();
    let mut exprs = Vec::new();
    for rule in alerts["groups"][0]["rules"].as_vec().context("rules")? {
        let name = text(&rule["alert"]).context("alert name")?;
        exprs.push((name.clone(), text(&rule["expr"]).context("expr")?));
        alert_names.insert(name);
        ensure!(rule["for"].as_str().is_some() && rule["annotations"]["summary"].as_str().is_some());
    }
    // The alerts the issue asks for: latency, errors, hit ratio, a shard's breaker.
    for wanted in
        ["StrataGetFeaturesLatencyHigh", "StrataErrorRatioHigh", "StrataHitRatioLow", "StrataShardBreakerOpen"]
    {
        ensure!(alert_names.contains(wanted), "no {wanted} alert");
    }
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/dashboards/strata.json"))?;
    let panels: serde_json::Value = serde_json::from_str(&dashboard)?;
    for panel in panels["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("a target without expr")?;
            exprs.push((format!("panel {}", panel["title"]), expr.to_owned()));
        }
    }
    // Every query parses as PromQL (no Prometheus runs here to say so).
    for (whose, expr) in &exprs {
        if let Err(error) = promql_parser::parser::parse(expr) {
            bail!("{whose}: {expr:?} is not PromQL: {error}");
        }
        used.extend(metric_names(expr));
    }
    ensure!(exprs.len() > 20, "only {} queries found", exprs.len());
    let prometheus_adapter_rule = std::fs::read_to_string(root.join("deploy/k8s/hpa.yaml"))?;
    used.extend(metric_names(&prometheus_adapter_rule).into_iter().filter(|n| n != "strata_grpc_requests_per_second"));
    for name in &used {
        let metric = METRICS.iter().find(|m| m.name == name.as_str());
        ensure!(metric.is_some(), "deploy/ uses {name}, which Strata does not export");
    }
    for histogram in METRICS.iter().filter(|m| m.kind == MetricKind::Histogram) {
        if used.contains(histogram.name) {
            ensure!(
                dashboard.contains(&format!("{}_bucket", histogram.name)),
                "{} is used but not as buckets",
                histogram.name
            );
        }
    }

    // Live: RED per method with status codes, sub-millisecond buckets, the
    // state the monitor samples; never an entity key as a label.
    let _only = env.exclusive().await;
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let key = "ops-entity-4d2c91";
    c.write_features(write("ops", vec![row(key, ts(1, 0), vec![("n", v(Kind::Int64Value(1)))])])).await?;
    for _ in 0..3 {
        c.get_features(strata_tests::wire::get("ops", &[key], &[])).await?;
    }
    // A key nobody wrote: a miss in both caches, so a lease is taken.
    c.get_features(strata_tests::wire::get("ops", &["ops-never-written"], &[])).await?;
    let missing = c.get_features(strata_tests::wire::get("no_such_view", &[key], &[])).await;
    let started = tokio::time::Instant::now();
    let page = loop {
        let page = scrape(&server).await?;
        if page.contains("strata_pool_connections{") {
            break page;
        }
        ensure!(started.elapsed() < Duration::from_secs(10), "the monitor never sampled the pools");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(sample(&page, "strata_grpc_requests_total", &[("method", "GetFeatures"), ("code", "OK")]) >= 3.0);
    ensure!(missing.is_err_and(|e| e.code() == tonic::Code::InvalidArgument), "an unknown view is INVALID_ARGUMENT");
    ensure!(
        sample(&page, "strata_grpc_requests_total", &[("method", "GetFeatures"), ("code", "INVALID_ARGUMENT")]) >= 1.0
    );
    ensure!(
        page.contains("strata_grpc_request_duration_seconds_bucket{method=\"GetFeatures\",le=\"0.0001\"}"),
        "no 100 µs bucket for GetFeatures"
    );
    ensure!(sample(&page, "strata_redis_duration_seconds_count", &[("op", "get_or_lease")]) >= 1.0);
    ensure!(sample(&page, "strata_shard_query_duration_seconds_count", &[]) >= 1.0);
    ensure!(sample(&page, "strata_cache_hits_total", &[("tier", "l1"), ("view", "ops")]) >= 1.0);
    // Freshness: the age of each value served, in buckets of seconds to a
    // week (the row was written at 1970-01-01T00:00:01Z).
    ensure!(sample(&page, "strata_served_age_seconds_count", &[("view", "ops")]) >= 3.0);
    ensure!(sample(&page, "strata_served_age_seconds_sum", &[("view", "ops")]) > 3.0 * 1.7e9);
    ensure!(
        page.contains("strata_served_age_seconds_bucket{view=\"ops\",le=\"604800\"}"),
        "no one-week bucket for the age of served values"
    );
    ensure!(sample(&page, "strata_build_info", &[("version", env!("CARGO_PKG_VERSION"))]) == 1.0);
    ensure!(sample(&page, "strata_ready", &[]) == 1.0);
    ensure!(page.contains("strata_l1_entries ") && page.contains("strata_l1_bytes "));
    for shard in ["shard-0", "shard-1"] {
        ensure!(sample(&page, "strata_pool_max_connections", &[("shard", shard)]) > 0.0, "no pool size for {shard}");
        ensure!(page.contains(&format!("strata_breaker_state{{dependency=\"postgres:{shard}\"}}")));
    }
    ensure!(!page.contains(key), "an entity key appears in /metrics");
    server.shutdown().await;
    Ok(())
}

/// Runs the `strata` binary; its exit status, stdout and stderr.
async fn strata(args: &[&str], envs: &[(&str, String)]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(strata_binary()?)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("NO_COLOR", "1")
        .output()
        .await?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

async fn the_cli_looks_up_rows_views_shards_and_health_and_fails_in_one_line(env: &'static Env) -> Result<()> {
    let _only = env.exclusive().await;
    let server = env.server().await?;
    let addr = format!("http://{}", server.grpc_addr());
    let mut c = client(&server).await?;
    let keys: Vec<String> = (0..40).map(|i| format!("cli:{i}")).collect();
    let rows =
        keys.iter().enumerate().map(|(i, k)| row(k, ts(1_700_000_000, 0), vec![("n", v(Kind::Int64Value(i as i64)))]));
    c.write_features(write("cli", rows.collect())).await?;

    // get: a table by default, JSON on request.
    let (ok, table, _) = strata(&["get", "--addr", &addr, "cli", "cli:7", "cli:missing"], &[]).await?;
    ensure!(ok, "strata get failed");
    let lines: Vec<&str> = table.lines().collect();
    ensure!(
        lines.len() == 3 && lines[0].split_whitespace().eq(["entity_key", "status", "source", "event_time", "n"]),
        "{table}"
    );
    ensure!(lines[1].split_whitespace().eq(["cli:7", "FOUND", "L2", "2023-11-14T22:13:20Z", "7"]), "{table}");
    ensure!(lines[2].split_whitespace().eq(["cli:missing", "NOT_FOUND", "L3", "-", "null"]), "{table}");
    let (ok, json, _) = strata(&["get", "--addr", &addr, "--json", "cli", "cli:7"], &[]).await?;
    ensure!(ok);
    let json: serde_json::Value = serde_json::from_str(&json)?;
    ensure!(json["rows"][0]["features"]["n"] == 7 && json["rows"][0]["status"] == "FOUND", "{json}");

    // get --service: join keys typed by the registry, one line per entity row.
    let (ok, table, err) =
        strata(&["get", "--addr", &addr, "--service", "t_ranker", "uid=8008", "sku=a,b"], &[]).await?;
    ensure!(ok, "strata get --service failed: {err}");
    let lines: Vec<&str> = table.lines().collect();
    ensure!(lines.len() == 3 && lines[0].split_whitespace().eq(["uid", "sku", "note", "clicks", "score"]), "{table}");
    ensure!(
        lines[2].split_whitespace().eq(["8008", "b", "ENTITY_NOT_FOUND", "ENTITY_NOT_FOUND", "ENTITY_NOT_FOUND"]),
        "{table}"
    );
    let (ok, _, err) = strata(&["get", "--addr", &addr, "--service", "t_ranker", "uid=x", "sku=a"], &[]).await?;
    ensure!(!ok && err.contains("uid is an int64 join key"), "a join key of the wrong type: {err}");

    // views: the registry.
    let (ok, views, _) = strata(&["views", "--addr", &addr], &[]).await?;
    ensure!(ok && views.lines().any(|l| l.starts_with("cli ") && l.contains("n:int64")), "{views}");
    let (ok, views, _) = strata(&["views", "--addr", &addr, "--json"], &[]).await?;
    let views: serde_json::Value = serde_json::from_str(&views)?;
    ensure!(ok && views.as_array().is_some_and(|v| v.iter().any(|v| v["name"] == "typed")), "{views}");

    // shards: counted on every shard; the stack's addresses come from
    // environment variables, overriding the file.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("strata.toml");
    let shipped = std::fs::read_to_string(repo_root().join("config/strata.toml"))?;
    std::fs::write(&file, format!("{shipped}\n{TEST_VIEWS}"))?;
    let shards: Vec<String> =
        env.config()?.postgres.shards.iter().map(|s| format!("{{name=\"{}\",url=\"{}\"}}", s.name, s.url)).collect();
    let envs = [
        ("STRATA_POSTGRES__SHARDS", format!("[{}]", shards.join(","))),
        ("STRATA_REDIS__NODES", format!("[\"{}\"]", env.redis_nodes().join("\",\""))),
    ];
    let file = file.to_str().context("path")?;
    let (ok, out, err) = strata(&["shards", "-c", file, "--view", "cli", "--json"], &envs).await?;
    ensure!(ok, "strata shards failed: {err}");
    let counted: serde_json::Value = serde_json::from_str(&out)?;
    let expected: Vec<usize> =
        (0..2).map(|i| keys.iter().filter(|k| strata_shard_router::shard_for(k, 2) == i).count()).collect();
    ensure!(counted[0]["rows"] == 40, "{counted}");
    ensure!(
        counted[0]["shards"]["shard-0"] == expected[0] && counted[0]["shards"]["shard-1"] == expected[1],
        "{counted}"
    );
    let (ok, table, _) = strata(&["shards", "-c", file, "--view", "cli"], &envs).await?;
    let line: Vec<&str> = table.lines().nth(1).context("a row for the view")?.split_whitespace().collect();
    let spread = expected.iter().max().copied().unwrap_or(0) as f64 / 20.0;
    ensure!(ok && line[..2] == ["cli", "40"], "{table}");
    ensure!(line.last().and_then(|r| r.parse::<f64>().ok()) == Some((spread * 1000.0).round() / 1000.0), "{table}");
    ensure!(table.lines().next().is_some_and(|h| h.contains("shard-0") && h.ends_with("max/mean")), "{table}");

    // health: SERVING and exit 0; a server that is not there, one line and non-zero.
    let (ok, out, _) = strata(&["health", "--addr", &addr], &[]).await?;
    ensure!(ok && out.trim() == "SERVING", "{out}");
    let (ok, out, _) = strata(&["health", "--addr", &addr, "--service", "liveness"], &[]).await?;
    ensure!(ok && out.trim() == "SERVING", "{out}");
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    for args in [
        vec!["health", "--addr", &format!("http://{closed}")],
        vec!["get", "--addr", addr.as_str(), "no_such_view", "k"],
        vec!["shards", "-c", "/nonexistent.toml"],
    ] {
        let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
        let (ok, out, err) = strata(&args, &[]).await?;
        ensure!(!ok && out.is_empty(), "{args:?} should fail");
        ensure!(err.lines().count() == 1 && err.starts_with("error: "), "{args:?}: not one line: {err}");
    }
    let (_, _, err) = strata(&["get", "--addr", &addr, "no_such_view", "k"], &[]).await?;
    ensure!(
        err.starts_with("error: INVALID_ARGUMENT: ") && err.contains("no_such_view"),
        "the error names the view: {err}"
    );
    // Variables of the prefix that name no setting (the CLI's STRATA_ADDR)
    // are not the configuration's business.
    let unrelated = [("STRATA_ADDR", addr.clone()), ("STRATA_SOMETHING", "1".to_owned())];
    let (ok, _, err) = strata(
        &["shards", "-c", file],
        &[envs[0].clone(), envs[1].clone(), unrelated[0].clone(), unrelated[1].clone()],
    )
    .await?;
    ensure!(ok, "STRATA_ADDR must not stop a command that reads the configuration: {err}");
    // A bad value in the environment is refused, naming the setting.
    let bad = [("STRATA_SERVER__MAX_IN_FLIGHT", "0".to_owned())];
    let (ok, _, err) = strata(&["shards", "-c", file], &[envs[0].clone(), envs[1].clone(), bad[0].clone()]).await?;
    ensure!(!ok && err.contains("server.max_in_flight"), "{err}");
    server.shutdown().await;
    Ok(())
}

async fn the_python_client_example_reads_typed_rows(env: &'static Env) -> Result<()> {
    let _only = env.exclusive().await;
    let server = env.server().await?;
    let mut c = client(&server).await?;
    c.write_features(write(
        "typed",
        vec![row(
            "py:1",
            ts(1_700_000_000, 500_000_000),
            vec![
                ("i", v(Kind::Int64Value(-42))),
                ("d", v(Kind::DoubleValue(0.25))),
                ("s", v(Kind::StringValue("grüße".into()))),
                ("b", v(Kind::BoolValue(true))),
                ("emb", v(Kind::FloatListValue(v1::FloatList { values: vec![0.5, -1.5] }))),
                ("ids", v(Kind::Int64ListValue(v1::Int64List { values: vec![1, 2, 3] }))),
                ("i32", v(Kind::Int32Value(7))),
                ("f", v(Kind::FloatValue(0.5))),
                ("at", v(Kind::TimestampValue(ts(1_700_000_000, 250_000_000)))),
            ],
        )],
    ))
    .await?;
    let script = repo_root().join("examples/python/strata_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(server.grpc_addr().to_string())
        .args(["typed", "py:1", "py:absent"])
        .output()
        .await
        .context("python3")?;
    if !out.status.success() {
        bail!(
            "the Python example failed (scripts/install-deps installs grpcio): {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let rows: Vec<serde_json::Value> =
        String::from_utf8(out.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    ensure!(rows.len() == 2, "{rows:?}");
    let found = &rows[0];
    ensure!(found["entity_key"] == "py:1" && found["status"] == "FOUND", "{found}");
    ensure!(found["event_time"] == "2023-11-14T22:13:20.500Z", "{found}");
    let f = &found["features"];
    ensure!(f["i"] == -42 && f["d"] == 0.25 && f["s"] == "grüße" && f["b"] == true, "{f}");
    ensure!(f["emb"] == serde_json::json!([0.5, -1.5]) && f["ids"] == serde_json::json!([1, 2, 3]), "{f}");
    ensure!(f["i32"] == 7 && f["f"] == 0.5 && f["at"] == "2023-11-14T22:13:20.250000Z", "{f}");
    ensure!(f["raw"].is_null(), "an unset feature is null: {f}");
    ensure!(rows[1]["status"] == "NOT_FOUND", "{}", rows[1]);

    // Many views in one call, by feature service, with an int64 and a
    // string join key.
    let keyed = |view: &str, join_keys: Vec<(&str, v1::Value)>, features: Vec<(&str, v1::Value)>| {
        write(view, vec![keyed_row(join_keys, ts(1, 0), features)])
    };
    let uid = || ("uid", v(Kind::Int64Value(7_007)));
    c.write_features(keyed("mv_user", vec![uid()], vec![("score", v(Kind::DoubleValue(0.5)))])).await?;
    let sku = ("sku", v(Kind::StringValue("a".into())));
    c.write_features(keyed("mv_pair", vec![uid(), sku], vec![("clicks", v(Kind::Int64Value(3)))])).await?;
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(server.grpc_addr().to_string())
        .args(["--service", "t_ranker", "uid=7007", "sku=a,b"])
        .output()
        .await
        .context("python3")?;
    ensure!(
        out.status.success(),
        "the Python example's service lookup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> =
        String::from_utf8(out.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    ensure!(rows.len() == 2, "{rows:?}");
    ensure!(rows[0]["features"] == serde_json::json!({"note": null, "clicks": 3, "score": 0.5}), "{}", rows[0]);
    ensure!(rows[0]["statuses"]["note"] == "NULL_VALUE" && rows[0]["statuses"]["clicks"] == "PRESENT", "{}", rows[0]);
    ensure!(
        rows[1]["statuses"]["clicks"] == "ENTITY_NOT_FOUND" && rows[1]["statuses"]["score"] == "PRESENT",
        "{}",
        rows[1]
    );
    server.shutdown().await;
    Ok(())
}
