"""`ternlm serve --ray`: the same app as `ternlm serve`, as a Ray Serve deployment.

Every replica is a Ray actor that loads the model itself and builds its own app with create_app(): its
own engine (`threads_per_replica` threads), scheduler and continuous batching, and therefore the same
routes, errors and streams as a single server. Ray's HTTP proxy spreads the requests over the replicas
and streams the answers through; Ray's controller replaces a replica that dies. Every response names
the replica that produced it in the X-Ternlm-Replica header, and each replica's /metrics counts its
own requests and tokens.

Ray hands a replica at most `max_batch` requests at a time. Requests beyond that wait in Ray's queue
and go to whichever replica frees a slot first (rather than queueing behind one replica's batch), and
a replica that dies takes only the requests it was already generating with it: Ray sends the ones it
had not handed over yet to the others.

Needs the `ray` extra: pip install "ternlm[ray]".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..errors import MissingExtraError
from .app import ServerOptions, create_app

APP_NAME = "ternlm"
DEPLOYMENT_NAME = "TernlmServer"
REPLICA_HEADER = "X-Ternlm-Replica"


@dataclass
class RayOptions:
    address: str | None = None              # an existing cluster's address; None: Ray on this machine
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled by Ray Serve with the load
    threads_per_replica: int = 1


def import_serve():
    """Ray Serve, or an error that says which extra to install."""
    try:
        from ray import serve
    except ImportError as e:
        raise MissingExtraError(f'ternlm serve --ray needs Ray Serve: pip install "ternlm[ray]" ({e})') from None
    return serve


class ReplicaHeader:
    """Plain ASGI middleware (streams pass straight through) that names the replica in every response."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def naming_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, naming_send)


def replica_app(model: str | None, model_id: str, load_options: dict, options: ServerOptions):
    """One replica's app, built in the replica's own process."""
    from ray import serve

    from ..api import load

    app = create_app(load(model, **load_options), model_id, options)
    app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
    return app


def application(model: str | None, model_id: str, load_options: dict, options: ServerOptions,
                ray_options: RayOptions):
    """The Ray Serve application. `model` must name the same model on every node: None (the shipped
    one), a path all nodes can read, or an HF repo id pulled on each node; `load_options` are
    ternlm.load's other arguments except threads."""
    serve = import_serve()
    threads = ray_options.threads_per_replica
    if ray_options.autoscale:
        low, high = ray_options.autoscale
        # a replica is "busy" when its batch is full, so that is the load each replica is sized for
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                          "target_ongoing_requests": options.max_batch}}
    else:
        scaling = {"num_replicas": ray_options.replicas}
    load_options = {**load_options, "threads": threads}

    def build():  # a plain function: Ray Serve calls it in each replica as it starts
        return replica_app(model, model_id, load_options, options)

    deployment = serve.deployment(serve.ingress(build)(), name=DEPLOYMENT_NAME,
                                  ray_actor_options={"num_cpus": threads},
                                  max_ongoing_requests=options.max_batch,
                                  max_queued_requests=options.max_waiting, **scaling)
    return deployment.bind()


def deploy(model: str | None, model_id: str, load_options: dict, options: ServerOptions, ray_options: RayOptions,
           host: str = "127.0.0.1", port: int = 8000) -> str:
    """Joins the cluster at ray_options.address (or starts Ray on this machine), deploys, and returns
    the proxy's URL once the replicas are up."""
    serve = import_serve()
    import ray

    if ray_options.address is None:
        _check_fits(os.cpu_count() or 1, ray_options)
    if not ray.is_initialized():  # a second deploy from one process (a benchmark) replaces the first
        ray.init(address=ray_options.address, logging_level="warning")
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(model, model_id, load_options, options, ray_options), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def undeploy() -> None:
    """Removes the deployment and disconnects (which stops Ray if this process started it)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.delete(APP_NAME)
        ray.shutdown()


def serve_on_ray(model: str | None, model_id: str, load_options: dict, options: ServerOptions,
                 ray_options: RayOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`ternlm serve --ray`: deploys, then runs until interrupted."""
    import_serve()  # without Ray, the error that says how to install it, and nothing to clean up
    try:
        url = deploy(model, model_id, load_options, options, ray_options, host, port)
        print(f"ternlm: serving {model_id!r} on Ray at {url}/ (chat page) and /v1 (OpenAI API), "
              f"{_describe(ray_options)}; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    finally:
        undeploy()


def _describe(o: RayOptions) -> str:
    replicas = f"{o.autoscale[0]} to {o.autoscale[1]} replicas" if o.autoscale else f"{o.replicas} replica(s)"
    return f"{replicas} of {o.threads_per_replica} thread(s)"


def _check_fits(cpus: int, o: RayOptions) -> None:
    """On this machine alone, replicas that cannot all get their CPUs would leave the deployment waiting
    for ever: say so before starting anything."""
    needed = (o.autoscale[0] if o.autoscale else o.replicas) * o.threads_per_replica
    if needed > cpus:
        raise ValueError(f"{_describe(o)} need {needed} CPUs but this machine has {cpus}: lower --replicas or "
                         f"--threads-per-replica, or join a cluster with --address")
