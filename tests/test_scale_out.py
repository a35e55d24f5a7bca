"""Scale-out on one machine: training as two torchrun "nodes" (c10d rendezvous on loopback, gloo), and
serving on a local Ray cluster with two Ray Serve replicas (skipped when ray is not installed).

Everything runs on one thread per process: the machine has two cores."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ternlm.train import main as train_main

pytestmark = pytest.mark.slow  # PyTorch, Ray and several processes

from test_server import wait_until  # the tests folder is on sys.path under pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- training: torchrun across two "nodes" --------------------------------------------------------
TEXT = (Path(__file__).parent / "data" / "hamlet_heldout.txt").read_text(encoding="utf-8")
TRAIN_ARGS = ["--preset", "tiny", "--vocab-size", "300", "--context", "32", "--batch-size", "8", "--micro-batch", "4",
              "--steps", "40", "--warmup", "2", "--threads", "1", "--eval-every", "20", "--heldout-fraction", "0.1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "hamlet.txt").write_text(TEXT, encoding="utf-8")
    return folder


def torchrun_node(args: list[str], port: int) -> subprocess.Popen:
    """One torchrun agent: a "node" of one worker, meeting the other at a c10d rendezvous on loopback."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}",
               "-m", "ternlm.train", *args]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def first_node(args: list[str], port: int) -> subprocess.Popen:
    """The node that hosts the rendezvous (it binds the endpoint's port), as node 1 of a real cluster."""
    node = torchrun_node(args, port)
    wait_until(lambda: port_open(port) or node.poll() is not None, "the rendezvous store")
    return node


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def finish(nodes: list[subprocess.Popen], timeout: float = 180) -> str:
    """Waits for the nodes to end (each must succeed); returns their output."""
    outputs = []
    try:
        for node in nodes:
            out, _ = node.communicate(timeout=timeout)
            assert node.returncode == 0, out
            outputs.append(out)
    finally:
        for node in nodes:
            node.kill()  # no-op for those that ended
    return "\n".join(outputs)


def history(out_dir: Path) -> dict:
    return json.loads((out_dir / "history.json").read_text())


@pytest.fixture(scope="module")
def two_node_run(corpus, tmp_path_factory) -> Path:
    """An uninterrupted run on two nodes; returns its output directory."""
    pytest.importorskip("torch", reason='training needs PyTorch: pip install "ternlm[train]"')
    out_dir = tmp_path_factory.mktemp("two-nodes")
    args, port = [*TRAIN_ARGS, "--data", str(corpus), "--out-dir", str(out_dir)], free_port()
    output = finish([first_node(args, port), torchrun_node(args, port)])
    assert "2 process(es)" in output  # one worker on each node: a world of two
    return out_dir


def test_two_nodes_split_each_batch_by_global_rank(tmp_path, corpus, two_node_run):
    """Two nodes train as one process does: each worker takes its part of every batch by global rank (by
    local rank, both would take the first half, and the losses would differ)."""
    assert train_main([*TRAIN_ARGS, "--data", str(corpus), "--out-dir", str(tmp_path)]) == 0
    one, two = history(tmp_path), history(two_node_run)
    # float sums in another order (two halves, then gloo's all-reduce): equal to rounding
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)
    np.testing.assert_allclose([h[1] for h in two["heldout"]], [h[1] for h in one["heldout"]], rtol=1e-4)


def test_two_nodes_stopped_and_started_again_end_as_if_uninterrupted(tmp_path, corpus, two_node_run):
    """Both nodes stop at a checkpoint (step 15 of 40, as after losing a node), then run the same command
    again: --auto-resume continues from the checkpoint, and the losses are bit for bit those of the
    uninterrupted run on two nodes."""
    args = [*TRAIN_ARGS, "--data", str(corpus), "--out-dir", str(tmp_path), "--auto-resume"]
    port = free_port()
    finish([first_node([*args, "--until-step", "15"], port), torchrun_node([*args, "--until-step", "15"], port)])
    assert len(history(tmp_path)["losses"]) == 15
    port = free_port()
    output = finish([first_node(args, port), torchrun_node(args, port)])
    assert "2 process(es), step 15/40" in output
    assert history(tmp_path)["losses"] == history(two_node_run)["losses"]
    assert history(tmp_path)["heldout"] == history(two_node_run)["heldout"]


# -- serving: Ray Serve, two replicas of one thread each -------------------------------------------
def test_serve_ray_flags_give_clear_errors(monkeypatch, capsys):
    from ternlm.cli import build_parser, main

    for bad in (["--autoscale", "3:1"], ["--autoscale", "2"], ["--replicas", "2", "--autoscale", "1:2"],
                ["--threads-per-replica", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--ray", *bad])
        assert "error:" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--ray", "--autoscale", "0:4"]).autoscale == (0, 4)
    assert main(["serve", "--replicas", "2"]) == 1
    assert "go with --ray" in capsys.readouterr().err
    assert main(["serve", "--ray", "-t", "2"]) == 1
    assert "--threads-per-replica" in capsys.readouterr().err
    if importlib.util.find_spec("ray") is not None:
        assert main(["serve", "--ray", "--replicas", "64"]) == 1  # before starting anything
        assert "need 64 CPUs" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", "--ray"]) == 1
    assert 'pip install "ternlm[ray]"' in capsys.readouterr().err


MODEL_ID = "ternlm-default"
PROMPTS = ["To be, or not to be", "ROMEO:", "Now is the winter", "KING HENRY:", "O, what a rogue", "Friends, Romans",
           "HAMLET:", "My lord,"]


@pytest.fixture(scope="module")
def ray_serve():
    """A local Ray head (loopback) with two replicas of the shipped model; yields the proxy's URL."""
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "ternlm[ray]"')
    from ternlm.server import ServerOptions
    from ternlm.server.ray_deploy import RayOptions, deploy, undeploy

    # two sequences per replica, so that a handful of requests keeps both busy and the rest wait in Ray
    options = ServerOptions(max_batch=2, max_waiting=32)
    try:
        yield deploy(None, MODEL_ID, {}, options, RayOptions(replicas=2, threads_per_replica=1), port=free_port())
    finally:
        undeploy()


def client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def streamed_chat(url: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    """(answer, replica) of one streamed chat completion."""
    raw = client(url).chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True)
    return "".join(c.choices[0].delta.content or "" for c in raw.parse()), raw.headers["x-ternlm-replica"]


def test_replicas_serve_the_same_app_and_share_the_requests(ray_serve, default_model):
    """Concurrent streams through Ray's proxy: each answer is the model's own greedy answer, both replicas
    answered, and errors and the other routes are those of `ternlm serve`."""
    import httpx
    import openai

    url = ray_serve
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: streamed_chat(url, p, 24), PROMPTS))
    assert [text for text, _ in answers] == [default_model.chat([{"role": "user", "content": p}], max_tokens=24,
                                                                        temperature=0)
                                             for p in PROMPTS]
    by_replica = Counter(replica for _, replica in answers)
    assert len(by_replica) == 2, by_replica  # a replica takes two at a time: eight streams need both

    with pytest.raises(openai.NotFoundError) as missing:
        client(url).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context"):
        client(url).chat.completions.create(model=MODEL_ID, max_tokens=1000, messages=[{"role": "user", "content": "x"}])
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": MODEL_ID}
    scraped = httpx.get(f"{url}/metrics")
    assert scraped.headers["x-ternlm-replica"] in by_replica
    assert "ternlm_generated_tokens_total" in scraped.text


def replica_actors() -> dict[str, tuple[str, str]]:
    """The live replicas' Ray actors: replica id (as in X-Ternlm-Replica) -> (actor name, namespace)."""
    import ray

    return {actor["name"].rsplit("#", 1)[1]: (actor["name"], actor["namespace"])
            for actor in ray.util.list_named_actors(all_namespaces=True) if actor["name"].startswith("SERVE_REPLICA::")}


def all_replicas_running() -> bool:
    from ray import serve

    from ternlm.server.ray_deploy import APP_NAME, DEPLOYMENT_NAME

    states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].replica_states
    return states == {"RUNNING": 2}


def test_a_killed_replica_loses_no_request_that_had_not_started_streaming(ray_serve):
    """Twelve long streams on two replicas of two slots each: four stream, eight wait in Ray's queue.
    Killing one replica breaks its two streams; all the others finish, and Ray starts a new replica."""
    import ray

    url, n = ray_serve, 12
    started: dict[int, str] = {}            # request -> replica, once its response (a stream) has begun
    finished: dict[int, str | None] = {}    # request -> finish_reason, None for a stream that broke off

    def run(i: int) -> None:
        reason = None
        try:
            raw = client(url).completions.with_raw_response.create(
                model=MODEL_ID, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=200, temperature=0, stream=True)
            started[i] = raw.headers["x-ternlm-replica"]
            for chunk in raw.parse():
                reason = (chunk.choices[0].finish_reason if chunk.choices else None) or reason
        except Exception:  # a stream cut off mid-way: the client library's error, whichever it is
            pass
        finished[i] = reason

    with ThreadPoolExecutor(n) as pool:
        for i in range(n):
            pool.submit(run, i)
        wait_until(lambda: len(started) >= 4, "both replicas to stream")
        killed = started[min(started)]
        streaming_at_kill = {i for i, replica in started.items() if replica == killed}
        waiting_at_kill = set(range(n)) - set(started)
        name, namespace = replica_actors()[killed]
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    assert len(streaming_at_kill) == 2 and len(waiting_at_kill) >= n - 4
    lost = {i for i, reason in finished.items() if reason not in ("length", "stop")}
    assert lost <= streaming_at_kill, f"lost {lost}; only {streaming_at_kill} had started on the killed replica"
    assert all(started[i] != killed for i in waiting_at_kill)

    wait_until(lambda: killed not in replica_actors() and len(replica_actors()) == 2 and all_replicas_running(),
               "Ray to replace the replica", timeout=120)
    with ThreadPoolExecutor(8) as pool:
        replicas = {replica for _, replica in pool.map(lambda p: streamed_chat(url, p, 8), PROMPTS)}
    assert len(replicas) == 2 and killed not in replicas
