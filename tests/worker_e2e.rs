//! Worker end to end on the real RabbitMQ and S3 (Garage), with the deterministic stand-in pipeline:
//! a published job yields `started`, one `progress` per step and a `completed` event whose URLs download
//! to images of the requested size and format, with the billing units of contract §6 and the safety
//! checker's flags applied (flagged images are uploaded black).

mod common;

use std::time::Duration;

use common::standin::{Probe, StandInFactory};
use common::{EventLog, RunningWorker};
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use fleet::queue::Publisher;
use fleet::storage::Storage;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

struct Expect {
    kind: EndpointKind,
    input: Value,
    size: (u32, u32),
    format: image::ImageFormat,
    content_type: &'static str,
    units: u64,
    /// Expected `has_nsfw_concepts`; flagged images must be black.
    flags: Vec<bool>,
}

#[tokio::test]
async fn jobs_complete_with_downloadable_images_and_billing() {
    let storage_config = common::s3_config();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _dropped) = Probe::new();
    let worker_id = format!("w-e2e-{}", uuid::Uuid::new_v4().simple());
    let worker = RunningWorker::spawn(
        common::worker_config(&topology, &worker_id, storage_config.clone()),
        StandInFactory::boxed(probe, None),
    );
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;

    let cases = [
        Expect {
            kind: EndpointKind::Sprint,
            input: json!({"prompt": "a fox", "image_size": "square_hd"}),
            size: (1024, 1024),
            format: image::ImageFormat::Jpeg,
            content_type: "image/jpeg",
            units: 1,
            flags: vec![false],
        },
        Expect {
            kind: EndpointKind::Base,
            input: json!({"prompt": "a city at night", "num_inference_steps": 3}),
            size: (3840, 2160),
            format: image::ImageFormat::Jpeg,
            content_type: "image/jpeg",
            units: 8, // ceil(8 294 400 / 1 048 576) = 8
            flags: vec![false],
        },
        Expect {
            kind: EndpointKind::Sprint,
            input: json!({"prompt": "four owls", "image_size": "square_hd", "num_images": 4, "output_format": "png"}),
            size: (1024, 1024),
            format: image::ImageFormat::Png,
            content_type: "image/png",
            units: 4,
            flags: vec![false; 4],
        },
        Expect {
            kind: EndpointKind::Sprint,
            input: json!({"prompt": "[red] flagged", "image_size": {"width": 300, "height": 200}, "output_format": "png"}),
            size: (300, 200),
            format: image::ImageFormat::Png,
            content_type: "image/png",
            units: 1,
            flags: vec![true],
        },
        Expect {
            kind: EndpointKind::Sprint,
            input: json!({"prompt": "[red] unchecked", "image_size": {"width": 300, "height": 200},
                          "output_format": "png", "enable_safety_checker": false}),
            size: (300, 200),
            format: image::ImageFormat::Png,
            content_type: "image/png",
            units: 1,
            flags: vec![false],
        },
    ];

    let jobs: Vec<_> = cases
        .iter()
        .map(|c| common::job(c.kind, c.input.clone()))
        .collect();
    for job in &jobs {
        publisher.publish_job(job).await.expect("publish job");
    }
    let storage = Storage::new(storage_config).expect("storage");
    for (case, job) in cases.iter().zip(&jobs) {
        let done = log.terminal(&job.request_id, WAIT).await;
        assert_eq!(done.event, EventKind::Completed, "{done:?}");
        assert_eq!(
            done.billable_units,
            Some(case.units),
            "billing of {}",
            case.input
        );
        assert_eq!(done.worker.as_deref(), Some(worker_id.as_str()));
        assert!(done.inference_time.is_some_and(|t| t >= 0.0));
        let result = done
            .result
            .as_ref()
            .expect("completed carries the result body");
        assert_eq!(result["seed"], 42);
        assert_eq!(result["prompt"], case.input["prompt"]);
        assert!(result["timings"]["inference"].as_f64().is_some());
        assert_eq!(result["has_nsfw_concepts"], json!(case.flags));

        let started: Vec<_> = log
            .of(&job.request_id)
            .into_iter()
            .filter(|e| e.event == EventKind::Started)
            .collect();
        assert_eq!(started.len(), 1);
        assert_eq!(
            (started[0].attempt, started[0].worker.as_deref()),
            (Some(1), Some(worker_id.as_str()))
        );
        let steps = log.count(&job.request_id, EventKind::Progress);
        assert_eq!(
            steps as u32, job.input.num_inference_steps,
            "one progress event per step"
        );

        let images = result["images"].as_array().expect("images array");
        assert_eq!(images.len(), case.flags.len());
        let ext = if case.content_type == "image/png" {
            "png"
        } else {
            "jpeg"
        };
        for (i, meta) in images.iter().enumerate() {
            assert_eq!(meta["width"], case.size.0);
            assert_eq!(meta["height"], case.size.1);
            assert_eq!(meta["content_type"], case.content_type);
            assert_eq!(meta["file_name"], format!("{i}.{ext}"));
            let url = meta["url"].as_str().expect("url");
            let (status, _, body) = common::http_get(url).await;
            assert_eq!(status, 200, "GET {url}");
            assert_eq!(meta["file_size"], body.len());
            assert_eq!(
                image::guess_format(&body).expect("image bytes"),
                case.format
            );
            let img = image::load_from_memory(&body).expect("decodes").to_rgb8();
            assert_eq!(img.dimensions(), case.size);
            if case.flags[i] {
                assert!(
                    img.pixels().all(|p| p.0 == [0, 0, 0]),
                    "a flagged image is uploaded black"
                );
            } else if case.input["prompt"]
                .as_str()
                .is_some_and(|p| p.contains("[red]"))
            {
                assert!(
                    img.pixels().all(|p| p.0 == [255, 0, 0]),
                    "checker off: the image is kept"
                );
            }
        }
        let prefix = format!("{}/{}/", case.kind.as_str(), job.request_id);
        let keys = storage.list_keys(&prefix).await.expect("list");
        let expected: Vec<_> = (0..images.len())
            .map(|i| format!("{prefix}{i}.{ext}"))
            .collect();
        assert_eq!(keys, expected, "deterministic keys, one set");
    }
    assert_eq!(worker.stop(WAIT).await, fleet::worker::WorkerExit::Shutdown);
    common::drop_topology(&conn, &topology).await;
}
