#!/usr/bin/env python3
"""Submit a request over AMQP with pika and read its result from the results stream (service-contract §5).

No HTTP involved: the request goes to the `fleet.submit` queue, where a dispatcher validates it and routes
the job; every lifecycle event of it comes back on the `fleet.results` stream.

    pip install pika==1.4.4
    python3 examples/amqp_pika.py --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f \
        --endpoint sprint --prompt "a red fox in the snow" --size square --out images

It publishes `{endpoint, input, request_id}` (persistent, JSON, `message_id` = request id) with publisher
confirms, so it knows the broker has it; then it reads the stream from a time shortly before the submit
(a stream consumer needs a prefetch, manual acks and an `x-stream-offset`: `first`, `next`, an offset or a
timestamp), skips other requests' events, prints its own (queued, started, progress) on stderr until the
terminal one, saves the images under OUT/<request_id>/ and prints the request id and result body as one
JSON object on stdout. tests/examples.rs runs it in CI.
"""
import argparse
import datetime
import json
import pathlib
import sys
import time
import urllib.request
import uuid

import pika

# Messages of this type on the stream are the dispatchers' own position markers, not events.
MARKER_TYPE = "fleet.marker"


def image_size(text):
    """A preset name (square_hd, landscape_16_9, ...) or WIDTHxHEIGHT."""
    if "x" in text:
        width, height = text.split("x", 1)
        return {"width": int(width), "height": int(height)}
    return text


def submit(channel, prefix, endpoint, request_input):
    request_id = str(uuid.uuid4())
    body = {"endpoint": endpoint, "input": request_input, "request_id": request_id}
    channel.confirm_delivery()
    # With confirms on, basic_publish returns once the broker has the message; it raises
    # pika.exceptions.UnroutableError (no such queue: is a dispatcher or worker running on this prefix?)
    # or NackError otherwise.
    channel.basic_publish(
        exchange="",
        routing_key=f"{prefix}.submit",
        body=json.dumps(body).encode(),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=request_id,
        ),
        mandatory=True,
    )
    return request_id


def follow(channel, prefix, request_id, since, deadline):
    """The request's terminal event, read from the results stream; its other events go to stderr."""
    # One unacked delivery at a time, and the terminal event is left unacked: then nothing is pending when the
    # consumer is cancelled. (pika rejects pending deliveries on cancel, and a stream queue refuses
    # basic.reject by closing the connection.)
    channel.basic_qos(prefetch_count=1)
    stream = channel.consume(
        f"{prefix}.results",
        auto_ack=False,
        arguments={"x-stream-offset": since},
        inactivity_timeout=1.0,
    )
    try:
        for method, properties, body in stream:
            if time.monotonic() > deadline:
                sys.exit(f"no terminal event for {request_id} in time")
            if method is None:
                continue  # nothing new for a second
            if properties.type == MARKER_TYPE:
                channel.basic_ack(method.delivery_tag)
                continue
            event = json.loads(body)
            if event.get("request_id") != request_id or event["event"] in ("queued", "started", "progress"):
                channel.basic_ack(method.delivery_tag)
            if event.get("request_id") != request_id:
                continue
            offset = (properties.headers or {}).get("x-stream-offset")
            kind = event["event"]
            if kind == "queued":
                print(f"queued (stream offset {offset})", file=sys.stderr)
            elif kind == "started":
                print(f"started on {event['worker']}", file=sys.stderr)
            elif kind == "progress":
                print(f"step {event['step']}/{event['total']}", file=sys.stderr)
            else:
                return event
    finally:
        channel.cancel()
    sys.exit("the results stream ended")


def main():
    parser = argparse.ArgumentParser(description="Submit over AMQP and read the result from the stream.")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--prefix", default="fleet", help="the fleet's --topology-prefix")
    parser.add_argument("--endpoint", choices=["base", "sprint"], default="sprint")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--size", type=image_size, default="square_hd", help="preset or WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("images"))
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the result")
    args = parser.parse_args()

    request_input = {"prompt": args.prompt, "image_size": args.size, "output_format": args.format}
    if args.steps is not None:
        request_input["num_inference_steps"] = args.steps
    if args.seed is not None:
        request_input["seed"] = args.seed

    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    # A timestamp offset starts at the stream chunk holding that time, so every event of the request comes
    # after it; the minute of slack covers a clock difference between this host and the broker.
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=60)
    request_id = submit(channel, args.prefix, args.endpoint, request_input)
    print(f"request {request_id}", file=sys.stderr)
    event = follow(channel, args.prefix, request_id, since, time.monotonic() + args.timeout)
    connection.close()
    if event["event"] != "completed":
        detail = f" {json.dumps(event['detail'])}" if event.get("detail") else ""
        sys.exit(f"{event['event']} ({event.get('error_type')}): {event.get('error')}{detail}")

    result = event["result"]
    print(f"completed: {event['billable_units']} billable units, inference {event['inference_time']:.3f} s",
          file=sys.stderr)
    target = args.out / request_id
    target.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result["images"]):
        name = pathlib.Path(image.get("file_name") or f"{i}.{args.format}").name
        with urllib.request.urlopen(image["url"], timeout=300) as resp:
            (target / name).write_bytes(resp.read())
        print(f"saved {target / name}", file=sys.stderr)
    print(json.dumps({"request_id": request_id, "result": result}))


if __name__ == "__main__":
    main()
