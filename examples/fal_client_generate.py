#!/usr/bin/env python3
"""Generate images with fal's own Python client (fal-client, unchanged) against a fleet dispatcher.

fal-client speaks HTTPS only and reads where to send requests from the environment, so run the dispatcher
with TLS (`--tls-cert`/`--tls-key`) and point the client at it:

    pip install fal-client==1.0.3
    export FAL_QUEUE_RUN_HOST=127.0.0.1:8443 FAL_RUN_HOST=127.0.0.1:8443
    export FAL_KEY=<one of the dispatcher's --api-keys> SSL_CERT_FILE=cert.pem   # the dispatcher's certificate
    python3 examples/fal_client_generate.py --prompt "a red fox in the snow" --size square --out images

It submits through fal's queue API, prints the queue position and the worker's log lines (one per
denoising step) on stderr while it waits, saves the images under OUT/<request_id>/, and prints the request
id and result body as one JSON object on stdout. tests/examples.rs runs it in CI.
"""
import argparse
import json
import pathlib
import sys
import urllib.request

import fal_client


def image_size(text):
    """A preset name (square_hd, landscape_16_9, ...) or WIDTHxHEIGHT."""
    if "x" in text:
        width, height = text.split("x", 1)
        return {"width": int(width), "height": int(height)}
    return text


def main():
    parser = argparse.ArgumentParser(description="Generate images through fal-client.")
    parser.add_argument("--app", default="local/sana", help="owner/app of the dispatcher (default local/sana)")
    parser.add_argument("--endpoint", choices=["base", "sprint"], default="sprint")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--size", type=image_size, default="square_hd", help="preset or WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("images"))
    args = parser.parse_args()

    application = args.app if args.endpoint == "base" else f"{args.app}/sprint"
    arguments = {
        "prompt": args.prompt,
        "image_size": args.size,
        "num_images": args.num_images,
        "output_format": args.format,
    }
    if args.steps is not None:
        arguments["num_inference_steps"] = args.steps
    if args.seed is not None:
        arguments["seed"] = args.seed

    handle = fal_client.submit(application, arguments=arguments)
    print(f"request {handle.request_id}", file=sys.stderr)
    position, shown = None, 0
    for status in handle.iter_events(with_logs=True, interval=0.1):
        if isinstance(status, fal_client.Queued):
            if status.position != position:
                position = status.position
                print(f"queued: position {position}", file=sys.stderr)
        elif isinstance(status, (fal_client.InProgress, fal_client.Completed)):
            logs = status.logs or []
            for line in logs[shown:]:
                print(line["message"], file=sys.stderr)
            shown = len(logs)
    result = handle.get()  # raises fal_client.FalClientHTTPError when the request failed

    target = args.out / handle.request_id
    target.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result["images"]):
        name = pathlib.Path(image.get("file_name") or f"{i}.{args.format}").name
        with urllib.request.urlopen(image["url"], timeout=300) as resp:
            (target / name).write_bytes(resp.read())
        print(f"saved {target / name}", file=sys.stderr)
    print(json.dumps({"request_id": handle.request_id, "result": result}))


if __name__ == "__main__":
    main()
