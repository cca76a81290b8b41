"""The processes ops run beside the workers, and the webhook of an alias.

``reembed exporter``: the scale signal for Prometheus, needing nothing but Redis. An autoscaler
(KEDA, a Prometheus alert, a script) scales the workers on how many batches wait and how long
the oldest has waited; the search service need not run for it. Read at scrape time from the
broker, so two exporters, or one restarted, always agree.

``reembed webhooks``: delivers migration events to webhooks (``producer.webhooks``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import click
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cli.common import emit, json_option, run_guarded, stack
from reembed.errors import ReembedError
from reembed.progress import redis_client
from reembed.queue_depth import batches_in_flight, queue_depths
from reembed.settings import Settings


class QueueCollector(Collector):
    def __init__(self, redis_url: str) -> None:
        self.client = redis_client(redis_url)

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily("reembed_queue_waiting_batches", "Messages waiting in a queue (batches on "
                                    "reembed.batches): what to scale workers on.", labels=["queue"])
        oldest = GaugeMetricFamily("reembed_queue_oldest_wait_seconds", "How long the oldest waiting message "
                                   "has waited (absent when the queue is empty).", labels=["queue"])
        in_flight = GaugeMetricFamily("reembed_batches_in_flight", "Batches sent and not yet finished, waiting "
                                      "or being embedded, over every migration.")
        up = GaugeMetricFamily("reembed_queue_up", "1 when Redis could be read for this scrape.")
        try:
            for depth in queue_depths(self.client):
                waiting.add_metric([depth.queue], depth.waiting)
                if depth.oldest_wait_s is not None:
                    oldest.add_metric([depth.queue], depth.oldest_wait_s)
            in_flight.add_metric([], batches_in_flight(self.client))
            up.add_metric([], 1)
        except ReembedError:
            up.add_metric([], 0)
        yield from (waiting, oldest, in_flight, up)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=9477, show_default=True)
@click.pass_obj
def exporter(settings: Settings, host: str, port: int) -> None:
    """Serve the queue's depth for Prometheus at /metrics (what to scale workers on)."""
    def run() -> None:
        with stack(settings, 0) as local:
            registry = CollectorRegistry()
            registry.register(QueueCollector(local.settings.redis_url))
            server, thread = start_http_server(port, addr=host, registry=registry)
            click.echo(f"reembed: queue metrics at http://{host}:{port}/metrics", err=True)
            try:
                threading.Event().wait()  # until interrupted
            finally:
                server.shutdown()
                thread.join(timeout=5)
    run_guarded(run)


@click.command()
@click.pass_obj
def webhooks(settings: Settings) -> None:
    """Deliver migration events to their webhooks (signed, at least once, in order per URL); run one."""
    def run() -> None:
        from producer.webhooks import Deliverer
        from reembed.registry import Registry
        from reembed.store import Store

        with stack(settings, 0) as local:
            deliverer = Deliverer(redis_client(local.settings.redis_url),
                                  Registry(Store.from_settings(local.settings)), local.settings.webhook_secret)
            click.echo("reembed: delivering migration events to webhooks", err=True)
            stop = threading.Event()
            try:
                deliverer.run(stop)
            finally:
                stop.set()
    run_guarded(run)


@click.command()
@click.argument("alias")
@click.option("--set", "url", metavar="URL", help="Deliver the events of ALIAS's migrations to URL.")
@click.option("--remove", is_flag=True, help="Deliver them nowhere.")
@json_option
@click.pass_obj
def webhook(settings: Settings, alias: str, url: str | None, remove: bool, as_json: bool) -> None:
    """Show, set or remove where the events of ALIAS's migrations are POSTed."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, 0) as local:
            plane = ControlPlane(local.settings)
            shown = plane.set_webhook(alias, None if remove else url) if (url or remove) else plane.webhook(alias)
        emit(as_json, shown, f"{alias}: {shown['webhook_url'] or 'no webhook'}")
    run_guarded(run)
