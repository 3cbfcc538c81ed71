"""deploy/kubernetes: what `kubectl kustomize` renders for each overlay, checked against Kubernetes'
schemas (kubernetes-validate, offline), the service's own settings, a running service, and a real
Prometheus evaluating the prometheus-adapter rule the HorizontalPodAutoscaler depends on."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from service.core.settings import Layout, ServiceConfig
from testkit.metrics import metric_samples
from testkit.prometheus import JOB, PROMETHEUS, PROMTOOL, Prometheus
from testkit.replicas import slow_upload
from testkit.images import shapes
from testkit.server import ROOT, free_port, serve_command, start_server, wait_until_ready
from testkit.wait import wait_until

KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"  # the kubectl here; the schemas ship in kubernetes-validate
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (kustomize renders the manifests)")
SHUTDOWN_MARGIN_S = 10  # bentoml's processes exit once drained (deploy/kubernetes/base/deployment.yaml)


def render(overlay: str) -> dict[str, dict]:
    """The overlay as `kubectl kustomize` builds it, by kind."""
    result = subprocess.run([KUBECTL, "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert len({o["kind"] for o in objects}) == len(objects), "one object of each kind"
    return {o["kind"]: o for o in objects}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, dict[str, dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl not installed (kustomize renders the manifests)")
    return request.param, render(request.param)


def container(objects: dict[str, dict]) -> dict:
    (main,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return main


def pod_env(objects: dict[str, dict]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(objects)["env"]}


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load((KUBERNETES / "base" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    return rule


def adapter_query(rule: dict, namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter sends for the pods of one HPA: its Go template, filled in as the
    adapter fills it (label matchers on the resources' labels, grouped by the pod label)."""
    series = rule["seriesQuery"].split("{")[0]
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod"))


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"(\d+)([KMG]i)?", quantity).groups()
    return int(number) * units.get(unit, 1)


# ----- the manifests -----------------------------------------------------------------

def test_each_overlay_renders_the_deployment_and_what_runs_it(rendered):
    _, objects = rendered
    assert set(objects) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"] == labels
    assert objects["Service"]["spec"]["selector"] == labels
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels


def test_every_rendered_object_passes_strict_schema_validation(rendered):
    import kubernetes_validate

    _, objects = rendered
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises on any error
    # strict really is strict: a field Kubernetes does not know fails
    stray = {**objects["Service"], "spec": {**objects["Service"]["spec"], "replicas": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(stray, KUBERNETES_VERSION, strict=True)


def test_rollout_never_drops_capacity_and_probes_use_bentoml_health_endpoints(rendered):
    _, objects = rendered
    assert objects["Deployment"]["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    main = container(objects)
    probes = {kind: main[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": {"path": "/readyz", "port": "http"},
                      "readinessProbe": {"path": "/readyz", "port": "http"},
                      "livenessProbe": {"path": "/livez", "port": "http"}}
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # a model load is not a failure


def test_grace_period_covers_endpoint_propagation_and_the_longest_request(rendered):
    """terminationGracePeriodSeconds >= preStop sleep + REQUEST_TIMEOUT_S + margin, from the values
    the pod really runs with (its env, else service.core.settings's defaults)."""
    _, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    main = container(objects)
    env = pod_env(objects)
    defaults = ServiceConfig()
    request_timeout = int(env.get("REQUEST_TIMEOUT_S", defaults.request_timeout_s))
    assert request_timeout == defaults.request_timeout_s  # the comments' arithmetic uses the default
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 5  # kube-proxy and ingresses learn of the endpoint's removal within seconds
    args = main["args"]
    assert int(args[args.index("--timeout-graceful-shutdown") + 1]) == request_timeout
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + request_timeout + SHUTDOWN_MARGIN_S
    assert int(env["MAX_LATENCY_MS"]) / 1000 < request_timeout  # an admitted request is answered well before


def test_pod_runs_unprivileged_on_a_read_only_root_with_the_model_read_only(rendered):
    _, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    main = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["model"]["readOnly"] is True and volumes["model"]["persistentVolumeClaim"]["readOnly"] is True
    assert pod_env(objects)["CHECKPOINT_DIR"] == mounts["model"]["mountPath"]
    # every path the service writes is a volume: uploads (TMPDIR) and bentoml's home (its metrics)
    assert mounts["tmp"]["mountPath"] == pod_env(objects)["TMPDIR"]
    assert mounts["bentoml-home"]["mountPath"] == "/home/app/bentoml"  # the Dockerfile's BENTOML_HOME
    assert "BENTOML_HOME=/home/app/bentoml" in (ROOT / "Dockerfile").read_text()


def test_upload_tmpfs_holds_every_worker_at_full_concurrency_within_the_memory_limit(rendered):
    _, objects = rendered
    env = pod_env(objects)
    tmp = next(v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp")
    size = quantity_bytes(tmp["emptyDir"]["sizeLimit"])
    assert tmp["emptyDir"]["medium"] == "Memory"
    assert size >= int(env["API_WORKERS"]) * int(env["MAX_CONCURRENCY"]) * int(env["MAX_BODY_BYTES"])
    limits = container(objects)["resources"]["limits"]
    # a memory-backed emptyDir counts against the container's memory: room for the workers beside it
    assert quantity_bytes(limits["memory"]) >= size + int(env["API_WORKERS"]) * 2**29


def test_overlays_choose_their_layout_through_the_service_own_logic(rendered, monkeypatch):
    overlay, objects = rendered
    env = pod_env(objects)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = ServiceConfig.from_env()
    limits = container(objects)["resources"]["limits"]
    cores = int(limits["cpu"])
    gpus = int(limits.get("nvidia.com/gpu", 0))
    layout = Layout.choose(config, cores=64, gpus=gpus)  # a big node: the env, not the node, must decide
    if overlay == "gpu":
        assert gpus == 1 and env["LAYOUT"] == "split"
        assert (layout.split, layout.model_workers, layout.api_workers) == (True, 1, cores - 1)
    else:
        assert gpus == 0 and "nvidia.com/gpu" not in container(objects)["resources"]["requests"]
        assert (layout.split, layout.api_workers, config.torch_threads) == (False, cores, cores)


@needs_kubectl
def test_ports_agree_with_the_dockerfile_and_the_scrape_annotations():
    objects = render("cpu")
    main = container(objects)
    dockerfile = (ROOT / "Dockerfile").read_text()
    port = int(re.search(r'"--port", "(\d+)"', dockerfile).group(1))
    assert f"EXPOSE {port}" in dockerfile
    assert main["ports"] == [{"name": "http", "containerPort": port}]
    assert main["args"][main["args"].index("--port") + 1] == str(port)
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}


@needs_kubectl
def test_hpa_scales_the_deployment_on_the_metric_the_adapter_rule_serves():
    objects = render("cpu")
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": objects["Deployment"]["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    rule = adapter_rule()
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert 0 < float(metric["pods"]["target"]["averageValue"].rstrip("m")) / 1000 < 1  # below "full" (1.0)
    assert hpa["spec"]["minReplicas"] >= 2  # one pod may be disrupted (the PDB) and one still serves


def relabel(rules: list[dict], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus' relabelling (keep and replace, as the scrape job uses them) of one target's labels;
    None when it is dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if rule.get("action", "replace") == "keep":
            if not match:
                return None
        elif match:  # Prometheus writes $1 where Python writes \1
            labels[rule["target_label"]] = match.expand(re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1")))
    return labels


def sanitized(prefix: str, name: str) -> str:
    """A Kubernetes label or annotation name as discovery names its meta label."""
    return prefix + re.sub(r"[^a-zA-Z0-9_]", "_", name)


@needs_kubectl
def test_scrape_job_keeps_the_pods_and_labels_them_for_the_dashboard_and_the_adapter():
    (job,) = yaml.safe_load((KUBERNETES / "base" / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    assert job["job_name"] == JOB  # what ops/alerts.yml and the dashboard select
    template = render("cpu")["Deployment"]["spec"]["template"]
    port = container({"Deployment": {"spec": {"template": template}}})["ports"][0]

    # the labels Kubernetes discovery (role: pod) gives one container port of a pod of the Deployment
    pod = {"__address__": f"10.1.2.3:{port['containerPort']}", "__meta_kubernetes_namespace": "cnn",
           "__meta_kubernetes_pod_name": "cnn-service-7d9f-abcde", "__meta_kubernetes_pod_node_name": "node-1",
           "__meta_kubernetes_pod_container_port_name": port["name"], "__metrics_path__": "/metrics"}
    pod.update({sanitized("__meta_kubernetes_pod_label_", k): v for k, v in template["metadata"]["labels"].items()})
    pod.update({sanitized("__meta_kubernetes_pod_annotation_", k): v
                for k, v in template["metadata"]["annotations"].items()})
    kept = relabel(job["relabel_configs"], pod)
    assert kept is not None
    assert kept["__address__"] == f"10.1.2.3:{port['containerPort']}"
    assert kept["__metrics_path__"] == "/metrics"
    assert (kept["namespace"], kept["pod"]) == ("cnn", "cnn-service-7d9f-abcde")  # the adapter rule's labels
    other_app = {**pod, "__meta_kubernetes_pod_label_app_kubernetes_io_name": "something-else"}
    assert relabel(job["relabel_configs"], other_app) is None


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make system-deps)")
def test_scrape_job_is_valid_prometheus_config(tmp_path):
    """promtool checks the job, with its discovery swapped for a static target: Debian builds
    Prometheus without Kubernetes discovery, so its promtool rejects `kubernetes_sd_configs` itself."""
    scrape = yaml.safe_load((KUBERNETES / "base" / "prometheus-scrape.yaml").read_text())
    (job,) = scrape["scrape_configs"]
    assert set(job["kubernetes_sd_configs"][0]) == {"role"} and job["kubernetes_sd_configs"][0]["role"] == "pod"
    job["static_configs"] = [{"targets": ["127.0.0.1:3000"]}]
    del job["kubernetes_sd_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    result = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----- against the running service -----------------------------------------------------

@pytest.fixture(scope="module")
def pods(cli_env, registered_model, tmp_path_factory):
    """Two services started with the cpu overlay's environment, as two pods would run; only what names
    a path of the pod, or sizes it for a 4-CPU pod, is changed for this machine."""
    if KUBECTL is None:
        pytest.skip("kubectl not installed (kustomize renders the manifests)")
    env = pod_env(render("cpu"))
    del env["CHECKPOINT_DIR"]  # the tests' model store instead of the pod's volume
    directories = [tmp_path_factory.mktemp(name) for name in ("cnn-service-a", "cnn-service-b")]
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(start_server, cli_env, directory,
                              **{**env, "TMPDIR": str(directory), "MPLCONFIGDIR": str(directory / "matplotlib"),
                                 "API_WORKERS": "1", "TORCH_THREADS": "1"})
                  for directory in directories]
    servers = [start.result() for start in starts if start.exception() is None]
    try:
        assert len(servers) == 2, [start.exception() for start in starts]
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_probe_paths_and_the_hpa_metric_exist_on_the_running_service(pods):
    objects = render("cpu")
    main = container(objects)
    server = pods[0]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert httpx.get(f"{server.url}{main[kind]['httpGet']['path']}", timeout=10).status_code == 200, kind
    assert httpx.get(f"{server.url}/no-such-probe", timeout=10).status_code == 404  # the 200s mean something
    path = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    metrics = httpx.get(f"{server.url}{path}", timeout=10).text
    name = objects["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f"# TYPE {name} gauge" in metrics
    assert (name, ()) in metric_samples(server.url)  # one series per pod: no labels to split it


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (make system-deps)")
def test_adapter_rule_gives_one_series_per_pod_from_a_real_prometheus(pods, tmp_path):
    prometheus = Prometheus(tmp_path, rule_files=())
    try:
        names = ["cnn-service-a", "cnn-service-b"]
        addresses = {name: server.url.removeprefix("http://") for name, server in zip(names, pods)}
        # the labels the Kubernetes scrape job gives each pod (prometheus-scrape.yaml)
        prometheus.set_targets(addresses, {name: {"namespace": "cnn", "pod": name} for name in names})
        rule = adapter_rule()
        series = prometheus.wait_for(rule["seriesQuery"], lambda r: len(r) == 2)  # what the adapter discovers
        assert {s["metric"]["pod"] for s in series} == set(names)
        # samples in the rule's averaging window, for both pods
        result = prometheus.wait_for(adapter_query(rule, "cnn", names), lambda r: len(r) == 2)
        assert sorted(r["metric"]["pod"] for r in result) == names
        assert all(set(r["metric"]) == {"pod"} for r in result)
        assert all(0 <= float(r["value"][1]) < 1 for r in result)  # idle pods: well under full
        # and the pods of another namespace are not counted
        assert prometheus.query(adapter_query(rule, "elsewhere", names)) == []
    finally:
        prometheus.stop()


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_but_no_new_ones(pods):
    """What the Deployment's shutdown assumes (base/deployment.yaml): on SIGTERM bentoml finishes the
    requests it holds -- here a slow upload still arriving -- but answers no new one: its port stays
    open (the supervisor holds the socket) and a new connection waits there unanswered until the
    process exits, then is reset. A request routed to it after SIGTERM fails; hence the preStop
    sleep. (Stops the second pod: runs last.)"""
    server = pods[1]
    finish = threading.Event()  # the upload's last piece waits for it: in flight however slow the machine
    with ThreadPoolExecutor(2) as pool:
        upload = pool.submit(slow_upload, server.url, "", 2.0, finish)
        wait_until(lambda: _classify_in_progress(server.url) > 0, 30, "the upload in progress at the server")
        os.kill(server.process.pid, signal.SIGTERM)  # the supervisor, as Kubernetes signals the container's PID 1
        wait_until(lambda: not _answered(f"{server.url}/readyz", timeout=2), 60, "no answer to new requests")
        late = pool.submit(_outcome, f"{server.url}/readyz")  # routed to it after SIGTERM
        finish.set()
        assert upload.result() == "200"  # the request it held is answered ...
        assert late.result() in {"ConnectError", "ReadError", "RemoteProtocolError"}  # ... the late one is dropped
    assert server.process.wait(timeout=60) == 0


def _classify_in_progress(url: str) -> float:
    """/classify requests the server has begun (headers read) and not answered: BentoML's own gauge
    (0 while a scrape times out: a busy machine's, seen once in CI; the caller polls again)."""
    try:
        samples = metric_samples(url)
    except httpx.TimeoutException:
        return 0
    return sum(value for (name, labels), value in samples.items()
               if name.endswith("request_in_progress") and dict(labels).get("endpoint") == "/classify")


def _answered(url: str, timeout: float) -> bool:
    try:
        httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return False
    return True


def _outcome(url: str) -> str:
    """The status code, or the error's name (the connection refused, reset or closed unanswered)."""
    try:
        return str(httpx.get(url, timeout=60).status_code)
    except httpx.HTTPError as err:
        return type(err).__name__


UNSHARE = shutil.which("unshare")


@pytest.mark.slow
@pytest.mark.skipif(UNSHARE is None or os.geteuid() != 0, reason="needs root and unshare (a private mount namespace)")
def test_service_serves_from_a_read_only_root_with_only_the_pods_volumes_writable(tiny_run, tmp_path):
    """readOnlyRootFilesystem, for real: `bentoml serve` in a mount namespace whose root is remounted
    read-only, with in-memory mounts where the pod has its emptyDirs (TMPDIR, BENTOML_HOME) and the
    cpu overlay's environment."""
    if KUBECTL is None:
        pytest.skip("kubectl not installed (kustomize renders the manifests)")
    env = pod_env(render("cpu"))
    tmp, home = tmp_path / "tmp", tmp_path / "bentoml"
    tmp.mkdir()
    home.mkdir()
    env.update({"CHECKPOINT_DIR": str(tiny_run), "TMPDIR": str(tmp), "MPLCONFIGDIR": str(tmp / "matplotlib"),
                "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "PYTHONDONTWRITEBYTECODE": "1",
                "API_WORKERS": "1", "TORCH_THREADS": "1", "PATH": os.environ["PATH"], "HOME": "/nonexistent"})
    port = free_port()
    serve = " ".join(shlex.quote(part) for part in serve_command(port, "127.0.0.1"))
    script = (f"mount -o remount,bind,ro / && mount -t tmpfs -o size=256m tmpfs {tmp} "
              f"&& mount -t tmpfs -o size=64m tmpfs {home} && ! touch {ROOT}/.write-probe 2>/dev/null "
              f"&& exec {serve} --timeout-graceful-shutdown 30")
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen([UNSHARE, "-m", "--propagation", "private", "sh", "-c", script], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ready(url, 120, alive=lambda: process.poll() is None), (tmp_path / "server.log").read_text()
        image = shapes(1)[0]
        files = [("images", (image.name, image.data, image.content_type))]
        assert httpx.post(f"{url}/classify", files=files, timeout=30).status_code == 200
        one = [("image", (image.name, image.data, image.content_type))]
        assert httpx.post(f"{url}/feature_maps", files=one, timeout=30).status_code == 200
        assert httpx.post(f"{url}/explain", files=one, timeout=30).status_code == 200
        assert httpx.get(f"{url}/atlas?layer=conv1&channel=0", timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
    assert not (ROOT / ".write-probe").exists()
    text = (tmp_path / "server.log").read_text()
    assert "Read-only file system" not in text and "Permission denied" not in text, text[-3000:]
