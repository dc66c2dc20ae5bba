"""fal's own Python client (fal-client from PyPI, pinned by .ci/python-env.sh) against the fleet dispatcher.

Run by tests/fal_client_compat.rs with .ci/.venv/bin/python. The client is pointed at the dispatcher only
through the configuration it offers: FAL_QUEUE_RUN_HOST / FAL_RUN_HOST (read by fal_client.auth at import),
FAL_KEY (sent as `Authorization: Key ...`) and SSL_CERT_FILE (honoured by httpx for the self-signed cert).

Two phases, separated by a line `READY_FOR_WORKER` on stdout (the Rust test starts the worker when it reads it):
  1. no worker yet: a wrong key and a validation error surface as FalClientHTTPError; two sprint requests are
     queued (positions 0 and 1) and cancelled, one with fal_client.cancel, one with handle.cancel; the client
     sees them COMPLETED with error_type client_cancelled and handle.get() raises the 499.
  2. worker running: submit -> status(with_logs) -> iter_events -> get for sprint; subscribe with
     on_queue_update for base; images are downloaded and their sizes read from the PNG/JPEG headers.
The last stdout line is `SUMMARY <json>`; any failed check raises (exit status 1) with the reason.
"""

import json
import os
import struct
import sys
import time
import urllib.request

import fal_client
from fal_client import client as fal_impl

APP = "local/sana"
OVERALL_DEADLINE = time.monotonic() + float(os.environ.get("FAL_COMPAT_DEADLINE_S", "300"))


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def status_name(status):
    return type(status).__name__


def image_size(data):
    """(width, height) from a PNG IHDR or a JPEG SOFn segment."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">II", data[16:24])
    check(data[:2] == b"\xff\xd8", "neither PNG nor JPEG")
    i = 2
    while i + 4 <= len(data):
        check(data[i] == 0xFF, f"bad JPEG marker at {i}")
        marker = data[i + 1]
        seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + seg_len
    raise AssertionError("JPEG without a SOF segment")


def check_images(result, width, height, n, seed, content_type):
    check(result.get("seed") == seed, f"seed {result.get('seed')} != {seed}")
    images = result.get("images")
    check(isinstance(images, list) and len(images) == n, f"expected {n} images: {result}")
    check(len(result.get("has_nsfw_concepts") or []) == n, f"has_nsfw_concepts: {result}")
    sizes = []
    for img in images:
        check(img.get("content_type") == content_type, f"content_type {img}")
        with urllib.request.urlopen(img["url"], timeout=30) as resp:
            check(resp.status == 200, f"GET {img['url']} -> {resp.status}")
            body = resp.read()
        got = image_size(body)
        check(got == (width, height), f"downloaded image is {got}, requested {(width, height)}")
        check((img.get("width"), img.get("height")) == (width, height), f"metadata {img}")
        sizes.append(list(got))
    return sizes


def phase_without_worker(summary):
    # The client really targets the dispatcher (no fal.ai host can be reached or used).
    summary["queue_url_format"] = fal_impl.QUEUE_URL_FORMAT
    check(fal_impl.QUEUE_URL_FORMAT == f"https://{os.environ['FAL_QUEUE_RUN_HOST']}/",
          f"QUEUE_URL_FORMAT {fal_impl.QUEUE_URL_FORMAT}")

    # A wrong key: the client's own error type with the 401.
    try:
        fal_client.SyncClient(key="not-the-key").submit(f"{APP}/sprint", arguments={"prompt": "x"})
        raise AssertionError("a wrong key was accepted")
    except fal_client.FalClientHTTPError as e:
        summary["wrong_key_status"] = e.status_code

    # Validation: FastAPI's detail[] naming the field, carried by FalClientHTTPError.
    try:
        fal_client.submit(f"{APP}/sprint", arguments={"prompt": "a fox", "num_images": 9})
        raise AssertionError("num_images 9 was accepted")
    except fal_client.FalClientHTTPError as e:
        detail = e.message
        check(isinstance(detail, list) and detail, f"422 detail is FastAPI's list: {detail!r}")
        summary["validation"] = {
            "status_code": e.status_code,
            "loc": detail[0].get("loc"),
            "billable_units": e.response_headers.get("x-fal-billable-units"),
        }

    # Two queued requests (no worker yet), cancelled through the module function and the handle.
    args = {"prompt": "never runs", "image_size": "square", "seed": 7}
    first = fal_client.submit(f"{APP}/sprint", arguments=args)
    second = fal_client.submit(f"{APP}/sprint", arguments=args)
    s1, s2 = first.status(), second.status(with_logs=True)
    check(isinstance(s1, fal_client.Queued) and isinstance(s2, fal_client.Queued), f"{s1} {s2}")
    positions_before = [s1.position, s2.position]
    fal_client.cancel(f"{APP}/sprint", first.request_id)
    s2_after = second.status()
    check(isinstance(s2_after, fal_client.Queued), f"{s2_after}")
    second.cancel()
    cancelled = []
    for handle in (first, second):
        events = [e for e in handle.iter_events(with_logs=True)]
        final = events[-1]
        check(isinstance(final, fal_client.Completed), f"{final}")
        try:
            handle.get()
            raise AssertionError("the result of a cancelled request was served")
        except fal_client.FalClientHTTPError as e:
            get_error = {"status_code": e.status_code, "error_type": e.error_type, "message": str(e)}
        cancelled.append({
            "request_id": handle.request_id,
            "final_status": status_name(final),
            "error": final.error,
            "error_type": final.error_type,
            "get_error": get_error,
        })
    # Cancelling again: the dispatcher answers ALREADY_COMPLETED (400), which the client raises.
    try:
        first.cancel()
        raise AssertionError("a second cancel succeeded")
    except fal_client.FalClientHTTPError as e:
        summary["second_cancel_status"] = e.status_code
    summary["cancel"] = {
        "positions_before": positions_before,
        "position_after_first_cancel": s2_after.position,
        "requests": cancelled,
    }


def phase_with_worker(summary):
    # submit -> status(with_logs) -> iter_events -> get, on sprint.
    w, h, seed = 320, 192, 1234
    handle = fal_client.submit(
        f"{APP}/sprint",
        arguments={"prompt": "a red fox in the snow", "image_size": {"width": w, "height": h},
                   "seed": seed, "num_images": 2, "output_format": "png"},
    )
    first_status = handle.status(with_logs=True)
    check(isinstance(first_status, (fal_client.Queued, fal_client.InProgress, fal_client.Completed)),
          f"{first_status}")
    seen, logs, completed = [], [], None
    for event in handle.iter_events(with_logs=True, interval=0.05):
        check(time.monotonic() < OVERALL_DEADLINE, "sprint request did not complete in time")
        if not seen or seen[-1] != status_name(event):
            seen.append(status_name(event))
        if isinstance(event, (fal_client.InProgress, fal_client.Completed)) and event.logs:
            logs = event.logs
        if isinstance(event, fal_client.Completed):
            completed = event
    check(completed is not None and completed.error is None, f"sprint failed: {completed}")
    result = handle.get()
    sizes = check_images(result, w, h, 2, seed, "image/png")
    again = fal_client.result(f"{APP}/sprint", handle.request_id)
    check(again == result, "fal_client.result serves the same body")
    status_again = fal_client.status(f"{APP}/sprint", handle.request_id, with_logs=True)
    summary["sprint"] = {
        "request_id": handle.request_id,
        "first_status": status_name(first_status),
        "statuses": seen,
        "inference_time": completed.metrics.get("inference_time"),
        "log_keys": sorted(logs[0].keys()) if logs else [],
        "log_count": len(logs),
        "module_status": status_name(status_again),
        "seed": result["seed"],
        "sizes": sizes,
    }

    # subscribe with on_queue_update, on base (JPEG).
    updates = []
    enqueued = []

    def on_update(status):
        check(time.monotonic() < OVERALL_DEADLINE, "base request did not complete in time")
        updates.append(status_name(status))

    w, h, seed = 256, 160, 99
    result = fal_client.subscribe(
        APP,
        arguments={"prompt": "a lighthouse at dusk", "image_size": {"width": w, "height": h},
                   "seed": seed, "num_inference_steps": 3},
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=on_update,
        start_timeout=120,
        priority="low",
        interval=0.05,
    )
    sizes = check_images(result, w, h, 1, seed, "image/jpeg")
    summary["base"] = {
        "request_id": enqueued[0] if enqueued else None,
        "updates": [u for i, u in enumerate(updates) if i == 0 or updates[i - 1] != u],
        "seed": result["seed"],
        "sizes": sizes,
    }

    # The cancelled requests stayed cancelled after the worker drained the queue past them.
    for req in summary["cancel"]["requests"]:
        st = fal_client.status(f"{APP}/sprint", req["request_id"])
        check(isinstance(st, fal_client.Completed) and st.error_type == "client_cancelled",
              f"cancelled request {req['request_id']} is now {st}")
    summary["cancelled_still_cancelled"] = True


def main():
    summary = {"fal_client_version": fal_client.__version__}
    phase_without_worker(summary)
    print("READY_FOR_WORKER", flush=True)
    phase_with_worker(summary)
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # the Rust test shows stderr; exit 1 marks the failure
        print(f"fal_client_compat failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
